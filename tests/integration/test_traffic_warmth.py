"""Warm means warm under real traffic: a busy upstream that turns slow is marked cold from the
first tokens it serves, with product defaults (warmup interval 10 s) and bounded load off."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from control_plane.runtime.envoy_admin import parse_clusters
from control_plane.store.etcd import etcd_client, list_prefix
from tests.harness import ProberProcess, Stack, async_wait_for, make_stack, wait_for

pytestmark = pytest.mark.integration

POOL, MODEL = "chat", "chat-model"
HUNG = -1.0


class StreamingServer:
    """SSE chat server: headers at once, the first token after ``first_token_s`` (HUNG: never,
    until released), as vLLM does; counts real requests apart from probes."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.first_token_s = 0.005
        self.per_kib_s = 0.0  # extra time to first token per KiB of request body
        self.real = 0
        self.probes = 0
        self.release = asyncio.Event()
        self.runner: web.AppRunner | None = None

    async def start(self) -> int:
        async def chat(request: web.Request) -> web.StreamResponse:
            body = await request.read()
            if request.headers.get("x-hotpath-probe") == "1":
                self.probes += 1
            else:
                self.real += 1
            reply = web.StreamResponse(headers={"content-type": "text/event-stream",
                                                "x-served-by": self.name})
            await reply.prepare(request)
            if self.first_token_s == HUNG:
                await self.release.wait()
            else:
                await asyncio.sleep(self.first_token_s + self.per_kib_s * len(body) / 1024)
            chunk = {"object": "chat.completion.chunk",
                     "choices": [{"index": 0, "delta": {"content": "ok"}}]}
            await reply.write(f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode())
            await reply.write_eof()
            return reply

        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", chat)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return int(self.runner.addresses[0][1])

    async def close(self) -> None:
        self.release.set()
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def servers(stack: Stack) -> AsyncIterator[dict[str, StreamingServer]]:
    found = {name: StreamingServer(name) for name in ("a", "b", "c")}
    try:
        ports = {name: await server.start() for name, server in found.items()}
        await stack.put(f"pools/{POOL}", {"models": [MODEL], "hash_balance_factor": 0})
        for name, port in ports.items():
            await stack.put(f"endpoints/{POOL}/{name}", {"address": "127.0.0.1", "port": port})
        await stack.wait_listener()
        await asyncio.to_thread(wait_for, lambda: set(stack.envoy.hosts(POOL)) == set(found),
                                30, "the pool in Envoy")
        yield found
    finally:
        for server in found.values():
            await server.close()


@pytest.fixture
def prober(stack: Stack) -> Iterator[ProberProcess]:
    process = ProberProcess(
        stack, "prober", "--traffic", f"http://127.0.0.1:{stack.control_plane.metrics_port}",
        "--no-election")
    process.start()
    try:
        yield process
    finally:
        process.stop()


class Sessions:
    """New sessions arriving continuously, each one streaming request; records where each
    landed and which failed."""

    def __init__(self, stack: Stack, session: aiohttp.ClientSession) -> None:
        self.stack = stack
        self.session = session
        self.landed: list[tuple[float, str]] = []  # (started at, server)
        self.failed: list[tuple[str, str]] = []
        self._ids = itertools.count()
        self._tasks: set[asyncio.Task[str | None]] = set()

    async def one(self, body_bytes: int = 0, timeout: float = 60) -> str | None:
        key = f"s-{next(self._ids)}"
        started = time.monotonic()
        content = "x" * body_bytes or "hello"
        body = {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": content}]}
        try:
            async with self.session.post(
                    f"{self.stack.url}/v1/chat/completions", json=body,
                    headers={"x-session-id": key},
                    timeout=aiohttp.ClientTimeout(total=timeout)) as reply:
                server = reply.headers.get("x-served-by", "?")
                self.landed.append((started, server))
                await reply.read()
                if reply.status != 200:
                    self.failed.append((key, f"HTTP {reply.status}"))
                return server
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.failed.append((key, repr(exc)))
            return None

    def start(self, count: int, every_s: float) -> asyncio.Task[None]:
        async def arrive() -> None:
            for _ in range(count):
                task = asyncio.create_task(self.one())
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                await asyncio.sleep(every_s)
        return asyncio.create_task(arrive())

    async def drain(self) -> None:
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def since(self, start: float) -> list[str]:
        return [server for at, server in self.landed if at >= start]


async def status(stack: Stack, endpoint: str) -> dict[str, Any] | None:
    async with etcd_client(stack.etcd) as client:
        _, items = await list_prefix(client, stack.etcd, f"status/{POOL}/{endpoint}")
    return json.loads(items[0][1]) if items else None


def envoy_health(stack: Stack, endpoint: str) -> str:
    hosts = parse_clusters(stack.envoy.get("/clusters?format=json"))
    return next((h.health for h in hosts if h.cluster == POOL and h.hostname == endpoint), "?")


async def test_a_busy_host_turning_slow_gets_no_new_sessions_then_recovers(
        stack: Stack, servers: dict[str, StreamingServer], prober: ProberProcess) -> None:
    slow = servers["c"]
    async with aiohttp.ClientSession() as session:
        traffic = Sessions(stack, session)
        await async_wait_for(lambda: _ok(traffic.one()), 30, "the model to route")
        arrivals = traffic.start(count=600, every_s=0.1)  # 60 s of new sessions at most
        try:
            await async_wait_for(lambda: _bool("c" in traffic.since(0)), 20,
                                 "sessions on c")
            slow.first_token_s = 8.0
            turned = time.monotonic()
            # Marked cold from its own slow first tokens while it keeps getting sessions.
            await async_wait_for(lambda: _bool(envoy_health(stack, "c") != "healthy"), 30,
                                 "c out of the ring")
            marked = time.monotonic()
            record = await status(stack, "c")
            assert record is not None and record["state"] == "cold", record
            assert record["source"] == "traffic" and record["traffic"]["p90_ms"] > 1000
            after = len(traffic.landed)
            await async_wait_for(lambda: _bool(len(traffic.landed) >= after + 30), 20,
                                 "30 new sessions after c was marked")
            later = [server for at, server in traffic.landed[after:]]
            assert "c" not in later, later
            # Recovered: it gets new sessions again.
            slow.first_token_s = 0.005
            recovered = time.monotonic()
            await async_wait_for(lambda: _bool("c" in traffic.since(recovered)), 30,
                                 "new sessions on c after it recovered")
            back = time.monotonic()
        finally:
            arrivals.cancel()
            await traffic.drain()
    print(f"\nslow host marked {marked - turned:.1f} s after it turned slow; "
          f"sessions back {back - recovered:.1f} s after it recovered")
    assert not traffic.failed, traffic.failed


async def test_a_host_that_sends_headers_then_nothing_gets_no_new_sessions(
        stack: Stack, servers: dict[str, StreamingServer], prober: ProberProcess) -> None:
    hung = servers["b"]
    async with aiohttp.ClientSession() as session:
        traffic = Sessions(stack, session)
        await async_wait_for(lambda: _ok(traffic.one()), 30, "the model to route")
        arrivals = traffic.start(count=600, every_s=0.1)
        try:
            await async_wait_for(lambda: _bool("b" in traffic.since(0)), 20, "sessions on b")
            hung.first_token_s = HUNG
            cut = time.monotonic()
            await async_wait_for(lambda: _bool(envoy_health(stack, "b") != "healthy"), 30,
                                 "b out of the ring")
            after = len(traffic.landed)
            await async_wait_for(lambda: _bool(len(traffic.landed) >= after + 30), 20,
                                 "30 new sessions after b was marked")
            assert "b" not in [server for _, server in traffic.landed[after:]]
        finally:
            arrivals.cancel()
            hung.release.set()
            await traffic.drain()
    # Only requests that had started on the hung host may have failed (none here: they are
    # released before the client gives up).
    assert not traffic.failed, traffic.failed
    assert cut > 0


async def test_a_host_dying_under_traffic_is_down_before_its_next_probe_is_due(
        stack: Stack, servers: dict[str, StreamingServer], prober: ProberProcess) -> None:
    interval = 120.0  # no probe is due in the test: connection failures in traffic tell
    await stack.put(f"pools/{POOL}", {"models": [MODEL], "hash_balance_factor": 0,
                                      "warmup": {"interval_s": interval}})
    async with aiohttp.ClientSession() as session:
        traffic = Sessions(stack, session)
        await async_wait_for(lambda: _ok(traffic.one()), 30, "the model to route")
        arrivals = traffic.start(count=600, every_s=0.1)
        try:
            await async_wait_for(lambda: _judged_by_traffic(stack, "a"), 30,
                                 "a's status from traffic")
            await servers["a"].close()  # its port now refuses connections
            died = time.time()

            async def down() -> bool:
                record = await status(stack, "a")
                return record is not None and record["state"] == "down"
            await async_wait_for(down, 30, "a down")
            record = await status(stack, "a")
            assert record is not None and record["checked_at"] - died < interval
            print(f"\nkilled host marked down {record['checked_at'] - died:.1f} s after it "
                  f"died (interval {interval:.0f} s)")
            after = len(traffic.landed)
            await async_wait_for(lambda: _bool(len(traffic.landed) >= after + 20), 20,
                                 "20 new sessions after a was marked down")
        finally:
            arrivals.cancel()
            await traffic.drain()
    assert "a" not in [server for _, server in traffic.landed[after:]]
    # Requests to a were retried on the ring: none failed.
    assert not traffic.failed, traffic.failed
    assert "probed now: connection failures in real traffic" in prober.log.read_text()


async def test_long_prompts_on_a_healthy_host_keep_it_warm(
        stack: Stack, servers: dict[str, StreamingServer], prober: ProberProcess) -> None:
    for server in servers.values():
        server.per_kib_s = 0.02  # 20 ms per KiB: a 100 KiB prompt takes 2 s to first token
    async with aiohttp.ClientSession() as session:
        traffic = Sessions(stack, session)
        await async_wait_for(lambda: _ok(traffic.one()), 30, "the model to route")
        start = time.monotonic()
        for _ in range(4):  # 4 rounds of 12 concurrent long-context turns
            await asyncio.gather(*(traffic.one(body_bytes=100 * 1024) for _ in range(12)))
        assert not traffic.failed
        assert time.monotonic() - start > 8  # every turn took its 2 s
    records = {name: await status(stack, name) for name in servers}
    judged = [r for r in records.values() if r and r.get("source") == "traffic"]
    assert judged, records  # the long prompts were judged by traffic ...
    assert all(r["state"] == "warm" for r in records.values() if r), records  # ... as warm
    assert all(envoy_health(stack, name) == "healthy" for name in servers)


async def _ok(reply: Any) -> bool:
    return await reply is not None


async def _bool(value: bool) -> bool:
    return value


async def _judged_by_traffic(stack: Stack, endpoint: str) -> bool:
    record = await status(stack, endpoint)
    return record is not None and record.get("source") == "traffic"


async def test_steady_real_traffic_means_no_probes_and_source_traffic(
        stack: Stack, servers: dict[str, StreamingServer], prober: ProberProcess) -> None:
    async with aiohttp.ClientSession() as session:
        traffic = Sessions(stack, session)
        await async_wait_for(lambda: _ok(traffic.one()), 30, "the model to route")
        arrivals = traffic.start(count=1000, every_s=0.08)  # 80 s of sessions at most
        try:
            async def judged() -> bool:
                records = [await status(stack, name) for name in servers]
                return all(r and r.get("source") == "traffic" for r in records)
            await async_wait_for(judged, 40, "every endpoint's status decided by traffic")
            probes = {name: server.probes for name, server in servers.items()}
            started = time.monotonic()
            while time.monotonic() - started < 60:  # a fixed window is the point here
                await asyncio.sleep(1)
                assert not traffic.failed, traffic.failed
            sent = {name: server.probes - probes[name] for name, server in servers.items()}
        finally:
            arrivals.cancel()
            await traffic.drain()
    assert sent == {"a": 0, "b": 0, "c": 0}, sent
    assert prober.metric("hotpath_prober_probes_skipped_total", reason="traffic") > 0


async def test_two_replicas_count_both_envoys_and_survive_the_leader(
        stack: Stack, servers: dict[str, StreamingServer], tmp_path: Any,
        etcd_server: Any) -> None:
    (tmp_path / "second").mkdir()
    other = make_stack(tmp_path / "second", etcd_server.url, stack.etcd.prefix)
    probers: list[ProberProcess] = []
    try:
        await other.wait_listener()
        await asyncio.to_thread(wait_for, lambda: set(other.envoy.hosts(POOL)) == set(servers),
                                30, "the pool in the second Envoy")
        windows = [f"http://127.0.0.1:{s.control_plane.metrics_port}" for s in (stack, other)]
        for index in (1, 2):
            extra = [arg for url in windows for arg in ("--traffic", url)]
            extra += ["--admin", other.envoy.admin_url]
            probers.append(ProberProcess(stack, f"prober-{index}", *extra).start())
        async with aiohttp.ClientSession() as session:
            flows = [Sessions(s, session) for s in (stack, other)]
            for flow in flows:
                await async_wait_for(lambda f=flow: _ok(f.one()), 30, "the model to route")
            arrivals = [flow.start(count=400, every_s=0.15) for flow in flows]
            try:
                await async_wait_for(lambda: _bool(all("c" in f.since(0) for f in flows)),
                                     20, "sessions on c through both Envoys")
                leader = await _leader(probers)
                # Mid-test: once the leader has judged c from its traffic (the record a new
                # leader carries on from; killed before it, a new leader has no state for c).
                await async_wait_for(lambda: _judged_by_traffic(stack, "c"), 30,
                                     "c's status from traffic")
                leader.stop(signal.SIGKILL)  # the leader dies mid-test
                servers["c"].first_token_s = 8.0
                await async_wait_for(lambda: _bool(envoy_health(stack, "c") != "healthy"
                                                   and envoy_health(other, "c") != "healthy"),
                                     40, "c out of both rings")
            finally:
                for task in arrivals:
                    task.cancel()
                for flow in flows:
                    await flow.drain()
        # Both control planes saw c's slow first tokens; c was marked cold once.
        history = await _status_history(stack, "c")
        colds = [h for h in history if h["state"] == "cold"]
        assert len(colds) == 1 and colds[0]["source"] == "traffic", history
        for flow in flows:
            assert not flow.failed, flow.failed
    finally:
        for process in probers:
            process.stop()
        other.close()


async def _leader(probers: list[ProberProcess]) -> ProberProcess:
    async def find() -> ProberProcess | None:
        leaders = [p for p in probers if p.metric("hotpath_prober_leader") == 1.0]
        return leaders[0] if len(leaders) == 1 else None
    found = await async_wait_for(find, 30, "one prober leading")
    assert found is not None
    return found


async def _status_history(stack: Stack, endpoint: str) -> list[dict[str, Any]]:
    """Every value status/<pool>/<endpoint> had, oldest first (etcd keeps the history)."""
    key = f"{stack.etcd.prefix}status/{POOL}/{endpoint}"
    values: list[dict[str, Any]] = []
    async with etcd_client(stack.etcd) as client:
        assert client.kv is not None
        reply = await client.kv.get(key, timeout=5)
        revision = int(reply.kvs[0].mod_revision) if reply.kvs else 0
        while revision > 0:
            reply = await client.kv.get(key, revision=revision, timeout=5)
            if not reply.kvs:
                break
            values.append(json.loads(reply.kvs[0].value))
            revision = int(reply.kvs[0].mod_revision) - 1
    return values[::-1]
