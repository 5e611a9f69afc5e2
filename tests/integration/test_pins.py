"""Sliding-TTL pins on the real Envoy and etcd: a ring change moves no active session.

Three simulated GPU servers carry chat sessions that each send a turn every 1-2 s; a
fourth server joins. The new ring would send about a quarter of the active sessions to it:
the leader pins them to the host that served them, and the control plane publishes the new
ring only once every Envoy has the pins. New sessions reach the new server, and a pinned
session idle for longer than the pool's session_ttl_s follows the ring on its next turn.
The expected ring comes from control_plane/affinity/ring.py, checked against Envoy by
test_ring_mirror.py.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from control_plane.affinity.ring import key_hash
from control_plane.runtime import processes
from control_plane.sim.model import SimParams
from control_plane.sim.server import SERVER_HEADER, SimHandle, run_sims, stop_sims
from tests.harness import Etcd, Stack, async_wait_for, make_stack
from tests.integration.test_ring_mirror import expected

pytestmark = pytest.mark.integration

POOL = "ring"  # test_ring_mirror.expected builds the ring of this pool
MODEL = "ring-model"
TTL_S = 5
POOL_VALUE = {"models": [MODEL], "hash_balance_factor": 0, "session_ttl_s": TTL_S}
SESSIONS = 180  # 60 per server of three


async def turn(session: aiohttp.ClientSession, stack: Stack, key: str,
               url: str | None = None) -> tuple[int, str]:
    body = {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
    async with session.post(f"{url or stack.url}/v1/chat/completions", json=body,
                            headers={"x-session-id": key}) as reply:
        await reply.read()
        return reply.status, reply.headers.get(SERVER_HEADER, "")


class Chats:
    """Sessions that each send a turn every 1-2 s until stopped (bounded by ``limit_s``),
    recording every status and serving host; turns go to the ``urls`` in turn (default:
    the stack's Envoy)."""

    def __init__(self, session: aiohttp.ClientSession, stack: Stack, keys: list[str],
                 limit_s: float = 60, urls: list[str] | None = None) -> None:
        self.urls = urls or [stack.url]
        self.hosts: dict[str, list[str]] = {k: [] for k in keys}
        self.failures: list[tuple[str, int]] = []
        self._stop = asyncio.Event()
        self._deadline = time.monotonic() + limit_s
        self._tasks = [asyncio.create_task(self._talk(session, stack, k, random.Random(k)))
                       for k in keys]

    async def _talk(self, session: aiohttp.ClientSession, stack: Stack, key: str,
                    rnd: random.Random) -> None:
        sent = 0
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            status, host = await turn(session, stack, key, self.urls[sent % len(self.urls)])
            sent += 1
            if status == 200:
                self.hosts[key].append(host)
            else:
                self.failures.append((key, status))
            try:
                await asyncio.wait_for(self._stop.wait(), rnd.uniform(1, 2))
            except TimeoutError:
                pass

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    def turns(self) -> int:
        return sum(len(h) for h in self.hosts.values())


@pytest.fixture
async def sims() -> AsyncIterator[list[SimHandle]]:
    handles = await run_sims(SimParams(time_scale=0.001, seed=5), count=4, base_port=0,
                             name_prefix="rm", models=(MODEL,))
    try:
        yield handles
    finally:
        await stop_sims(handles)


async def start_pool(stack: Stack, ports: dict[str, int]) -> None:
    await stack.put(f"pools/{POOL}", POOL_VALUE)
    for eid, port in ports.items():
        await stack.put(f"endpoints/{POOL}/{eid}", {"address": "127.0.0.1", "port": port})
    await stack.wait_listener()
    await async_wait_for(lambda: asyncio.sleep(0, len(stack.envoy.hosts(POOL)) == len(ports)),
                         30, f"{len(ports)} hosts in Envoy")
    async with aiohttp.ClientSession() as session:
        async def routed() -> bool:
            status, _ = await turn(session, stack, "warm-up")
            return status == 200
        await async_wait_for(routed, 30, f"{MODEL} to route")


async def pins(stack: Stack) -> dict[str, list[object]]:
    value = await stack.get_json(f"pins/{POOL}")
    return {} if value is None else dict(value["pins"])


async def test_a_joining_server_moves_no_active_session(stack: Stack,
                                                        sims: list[SimHandle]) -> None:
    ports = {h.name: h.port for h in sims}
    joining = sorted(ports)[3]
    after = expected(ports, dict.fromkeys(ports, 1)).ring
    keys = [f"chat-{n}" for n in range(SESSIONS)]
    async with aiohttp.ClientSession() as session:
        # Active: every session served at least one access-log flush (1 s) before the
        # change; the ring changes only after the pins are in force.
        chats, before, would_move = await join_with_pins(stack, session, ports, keys)
        stored = await pins(stack)
        # New sessions follow the new ring at once: fresh keys the ring gives the new host.
        fresh = [k for k in (f"new-{n}" for n in range(2000))
                 if after.owner(key_hash(k)) == joining][:20]

        async def new_sessions_reach_it() -> bool:
            served = [await turn(session, stack, k) for k in fresh]
            return all(s == (200, joining) for s in served)

        await async_wait_for(new_sessions_reach_it, 20, "new sessions on the joining server")
        turns_at_join = chats.turns()
        await async_wait_for(lambda: asyncio.sleep(0, chats.turns() >= turns_at_join
                                                   + 2 * SESSIONS), 30,
                             "two more turns of every session")
        await chats.stop()
        moved = {k: sorted(set(h)) for k, h in chats.hosts.items() if len(set(h)) > 1}
        assert not chats.failures, chats.failures[:10]
        assert would_move, "the new ring moves no session: the test shows nothing"
        assert moved == {}, f"{len(moved)} active sessions changed server: {list(moved)[:10]}"
        assert len(stored) >= len(would_move), (len(stored), len(would_move))

        # Idle past the TTL: the pins expire and each session follows the ring.
        await async_wait_for(lambda: _no_pins(stack), TTL_S * 4,
                             "the pins to expire")
        # The filter without them reaches Envoy a push later.
        first = sorted(would_move)[0]

        async def unpinned() -> bool:
            return await turn(session, stack, first) == (200, after.owner(key_hash(first)))

        await async_wait_for(unpinned, 10, "the filter without the pins")
        back = {k: (await turn(session, stack, k)) for k in sorted(would_move)}
        wrong = {k: v for k, v in back.items() if v != (200, after.owner(key_hash(k)))}
        assert wrong == {}, wrong


async def _no_pins(stack: Stack) -> bool:
    return not await pins(stack)


async def join_with_pins(stack: Stack, session: aiohttp.ClientSession, ports: dict[str, int],
                         keys: list[str]) -> tuple[Chats, dict[str, str], set[str]]:
    """Three servers carry ``keys``; the fourth joins. Returns the chats (still running),
    each key's server before the join and the keys the new ring would have moved."""
    three = {eid: ports[eid] for eid in sorted(ports)[:3]}
    joining = sorted(ports)[3]
    await start_pool(stack, three)
    chats = Chats(session, stack, keys)
    await async_wait_for(lambda: asyncio.sleep(0, all(len(h) >= 2 for h in
                                                     chats.hosts.values())),
                         30, "two turns of every session")
    await stack.put(f"endpoints/{POOL}/{joining}",
                    {"address": "127.0.0.1", "port": ports[joining]})
    await async_wait_for(lambda: asyncio.sleep(0, len(stack.envoy.hosts(POOL)) == 4),
                         20, "the joining server in Envoy")
    before = {k: h[0] for k, h in chats.hosts.items()}
    after = expected(ports, dict.fromkeys(ports, 1)).ring
    return chats, before, {k for k in keys if after.owner(key_hash(k)) != before[k]}


async def test_a_pinned_server_going_down_fails_no_request(stack: Stack,
                                                          sims: list[SimHandle]) -> None:
    ports = {h.name: h.port for h in sims}
    keys = [f"chat-{n}" for n in range(SESSIONS)]
    async with aiohttp.ClientSession() as session:
        chats, before, pinned = await join_with_pins(stack, session, ports, keys)
        victim = sorted(ports)[0]
        assert any(before[k] == victim for k in pinned), "no session pinned to the victim"
        # The server dies: its pinned sessions' requests are refused, and retried on the
        # ring (override-host does not check health). Then the prober's verdict comes.
        await next(h for h in sims if h.name == victim).runner.cleanup()
        turns_at_death = chats.turns()
        await async_wait_for(lambda: asyncio.sleep(0, chats.turns() >= turns_at_death
                                                   + SESSIONS), 30, "a turn of every session")
        await stack.put(f"status/{POOL}/{victim}",
                        {"state": "down", "ttft_ms": None, "checked_at": time.time()})
        marked = time.monotonic()
        await async_wait_for(lambda: asyncio.sleep(0, stack.envoy.hosts(POOL).get(victim)
                                                   == "unhealthy"), 20, "the victim down")
        print(f"status down -> Envoy shows it unhealthy: {time.monotonic() - marked:.3f} s")
        turns_at_down = chats.turns()
        await async_wait_for(lambda: asyncio.sleep(0, chats.turns() >= turns_at_down
                                                   + SESSIONS), 30, "a turn of every session")
        await chats.stop()
    assert not chats.failures, chats.failures[:10]
    for key, hosts in chats.hosts.items():
        if before[key] == victim:
            assert hosts[-1] != victim, key  # moved at once
        else:
            assert set(hosts) == {before[key]}, (key, hosts)  # no other session moved


async def test_a_drained_server_takes_no_new_session_and_keeps_its_active_ones(
        stack: Stack, sims: list[SimHandle]) -> None:
    ports = {h.name: h.port for h in sims[:3]}
    await start_pool(stack, ports)
    drained = sorted(ports)[0]
    ring = expected(ports, dict.fromkeys(ports, 1)).ring
    keys = [f"chat-{n}" for n in range(90)]
    async with aiohttp.ClientSession() as session:
        chats = Chats(session, stack, keys)
        await async_wait_for(lambda: asyncio.sleep(0, all(len(h) >= 2 for h in
                                                         chats.hosts.values())),
                             30, "two turns of every session")
        before = {k: h[0] for k, h in chats.hosts.items()}
        on_drained = {k for k, host in before.items() if host == drained}
        assert on_drained, "no session on the drained server"
        drain = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "control_plane", "endpoint", "drain",
                             POOL, drained, "--timeout", "120", "--etcd", stack.etcd.urls,
                             "--prefix", stack.etcd.prefix],
            capture_output=True, text=True, timeout=30, check=False)
        assert drain.returncode == 0, drain.stderr
        await async_wait_for(lambda: asyncio.sleep(0, stack.envoy.hosts(POOL).get(drained)
                                                   == "degraded"), 20, "the drain in Envoy")
        # New sessions the ring used to give the drained server go elsewhere.
        fresh = [k for k in (f"new-{n}" for n in range(2000))
                 if ring.owner(key_hash(k)) == drained][:20]
        served = [await turn(session, stack, k) for k in fresh]
        assert all(status == 200 and host != drained for status, host in served), served
        turns_at_drain = chats.turns()
        await async_wait_for(lambda: asyncio.sleep(0, chats.turns() >= turns_at_drain
                                                   + 2 * SESSIONS // 2), 30, "more turns")
        await chats.stop()
        assert not chats.failures, chats.failures[:10]
        moved = {k: h for k, h in chats.hosts.items() if set(h) != {before[k]}}
        assert moved == {}, f"{len(moved)} sessions moved: {list(moved)[:10]}"
        # Idle past the TTL: no session is left, `hotpath status` reports it drained.
        await async_wait_for(lambda: _no_pins(stack), TTL_S * 4, "the pins to expire")

        def status() -> str | None:
            reply = subprocess.run(
                [sys.executable, "-m", "control_plane", "status", "--json", "--etcd",
                 stack.etcd.urls, "--prefix", stack.etcd.prefix, "--admin",
                 stack.envoy.admin_url, "--traffic",
                 f"http://127.0.0.1:{stack.control_plane.metrics_port}"],
                capture_output=True, text=True, timeout=30, check=True)
            rows = json.loads(reply.stdout)["endpoints"]
            return next(r["drain"] for r in rows if r["endpoint"] == drained)

        await async_wait_for(lambda: asyncio.to_thread(lambda: status() == "drained"),
                             TTL_S * 4, "status to show the server drained")


@pytest.fixture
def replicas(tmp_path: Path, etcd_server: Etcd, prefix: str) -> Iterator[list[Stack]]:
    """Two control planes on one etcd prefix, each with its own Envoy, peers of each other."""
    ports = [processes.free_port(), processes.free_port()]
    made: list[Stack] = []
    try:
        for index, name in enumerate(("one", "two")):
            (tmp_path / name).mkdir()
            peer = f"http://127.0.0.1:{ports[1 - index]}"
            made.append(make_stack(tmp_path / name, etcd_server.url, prefix,
                                   extra=["--peer", peer], metrics_port=ports[index]))
        yield made
    finally:
        for stack in made:
            stack.close()


async def test_replicas_pin_alike_and_pins_survive_restarts(replicas: list[Stack],
                                                            sims: list[SimHandle]) -> None:
    one, two = replicas
    ports = {h.name: h.port for h in sims}
    three = {eid: ports[eid] for eid in sorted(ports)[:3]}
    joining = sorted(ports)[3]
    await one.put(f"pools/{POOL}", {**POOL_VALUE, "session_ttl_s": 60})
    for eid, port in three.items():
        await one.put(f"endpoints/{POOL}/{eid}", {"address": "127.0.0.1", "port": port})
    for stack in replicas:
        await stack.wait_listener()
        await async_wait_for(lambda s=stack: asyncio.sleep(0, len(s.envoy.hosts(POOL)) == 3),
                             20, "three hosts in each Envoy")
    keys = [f"chat-{n}" for n in range(120)]
    after = expected(ports, dict.fromkeys(ports, 1)).ring
    async with aiohttp.ClientSession() as session:
        # Every session alternates between the two gateways.
        chats = Chats(session, one, keys, limit_s=90, urls=[one.url, two.url])
        await async_wait_for(lambda: asyncio.sleep(0, all(len(h) >= 2 for h in
                                                         chats.hosts.values())),
                             30, "two turns of every session")
        await one.put(f"endpoints/{POOL}/{joining}",
                      {"address": "127.0.0.1", "port": ports[joining]})
        for stack in replicas:
            await async_wait_for(lambda s=stack: asyncio.sleep(0, len(s.envoy.hosts(POOL)) == 4),
                                 20, "the joining server in each Envoy")
        before = {k: h[0] for k, h in chats.hosts.items()}
        assert any(after.owner(key_hash(k)) != before[k] for k in keys), "nothing to pin"

        async def more_turns() -> None:
            start = chats.turns()
            await async_wait_for(lambda: asyncio.sleep(0, chats.turns() >= start + len(keys)),
                                 30, "a turn of every session")

        await more_turns()
        for stack in replicas:  # restart each control plane in turn, sessions going on
            stack.control_plane.stop()
            await more_turns()  # Envoy keeps its config while its control plane is away
            await asyncio.to_thread(stack.control_plane.start)
            await more_turns()
        await chats.stop()
    assert not chats.failures, chats.failures[:10]
    moved = {k: sorted(set(h)) for k, h in chats.hosts.items() if len(set(h)) > 1}
    assert moved == {}, f"{len(moved)} sessions changed server: {list(moved)[:10]}"
