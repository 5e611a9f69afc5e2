"""Nothing lost, nothing reshuffled: faults under load through the real Envoy.

A bounded load (a few concurrent clients, rotating session keys) runs through Envoy while
the control plane is SIGKILLed and restarted, while etcd is down, and while an upstream
dies with streams in flight; then hostile HTTP per the contract. Each test prints what it
measured (run with -s). The scenario functions take their load as parameters:
benchmarks/faults.py runs them with larger loads and prints a table.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from control_plane.runtime import processes
from tests.harness import (
    Etcd,
    Stack,
    Upstreams,
    async_wait_for,
    chat,
    make_stack,
    new_etcd,
    start,
    stop,
    wait_for,
)

pytestmark = pytest.mark.integration

MODEL = "load-model"
TIMEOUT = aiohttp.ClientTimeout(total=20)


# -- load ----------------------------------------------------------------------------------


@dataclass
class Load:
    """A bounded load: ``clients`` loops, each stopping at ``stop``, ``max_s`` or when
    ``max_requests`` were sent in all."""

    url: str
    model: str
    clients: int = 4
    sessions: int = 32
    max_requests: int = 100_000
    max_s: float = 60.0
    sent: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    async def _client(self, session: aiohttp.ClientSession, index: int, deadline: float
                      ) -> None:
        turn = 0
        while (not self.stop.is_set() and time.monotonic() < deadline
               and self.sent < self.max_requests):
            self.sent += 1
            key = f"load-{(index * 7919 + turn) % self.sessions}"
            turn += 1
            try:
                status, _, body = await chat(session, self.url, self.model,
                                             {"x-session-id": key})
            except (TimeoutError, aiohttp.ClientError) as exc:
                status, body = -1, repr(exc)
            if status != 200:
                self.failed += 1
                if len(self.errors) < 10:
                    self.errors.append(f"{status} {body!r}"[:300])

    async def _run(self) -> None:
        deadline = time.monotonic() + self.max_s
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            await asyncio.gather(*(self._client(session, i, deadline)
                                   for i in range(self.clients)))

    def begin(self) -> Load:
        self.task = asyncio.create_task(self._run())
        return self

    async def progressed(self, more: int, timeout: float = 30) -> None:
        """Wait (with a deadline) until ``more`` further requests were sent."""
        target = self.sent + more

        async def sent_enough() -> bool:
            return self.sent >= target or (self.task is not None and self.task.done())

        await async_wait_for(sent_enough, timeout, f"{more} more requests of load")
        assert self.sent >= target, f"the load ended early, after {self.sent} requests"

    async def end(self) -> Load:
        self.stop.set()
        assert self.task is not None
        await asyncio.wait_for(self.task, 60)
        return self


# -- setup helpers -------------------------------------------------------------------------


async def register(stack: Stack, pool: str, ports: dict[str, int], models: list[str],
                   **fields: Any) -> None:
    await stack.put(f"pools/{pool}", {"models": models, **fields})
    for name, port in ports.items():
        await stack.put(f"endpoints/{pool}/{name}", {"address": "127.0.0.1", "port": port})
    await stack.wait_listener()
    await asyncio.to_thread(wait_for, lambda: set(stack.envoy.hosts(pool)) == set(ports), 30,
                            f"pool {pool} in Envoy")


async def routable(url: str, model: str, timeout: float = 30) -> float:
    """Seconds until ``model`` answers 200 through Envoy (polled with a deadline)."""
    began = time.monotonic()
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        async def ok() -> bool:
            return (await chat(session, url, model))[0] == 200
        await async_wait_for(ok, timeout, f"{model} to route", 0.02)
    return time.monotonic() - began


async def echo_pool(stack: Stack, upstreams: Upstreams, pool: str = "load",
                    hosts: tuple[str, ...] = ("l0", "l1", "l2"), model: str = MODEL,
                    **fields: Any) -> None:
    ports = {name: await upstreams.add(name) for name in hosts}
    await register(stack, pool, ports, [model], **fields)
    await routable(stack.url, model)


async def put_retrying(stack: Stack, key: str, value: Any, timeout: float = 30) -> None:
    """A write right after etcd came back: the client may still be reconnecting."""
    async def written() -> bool:
        await stack.put(key, value)
        return True
    await async_wait_for(written, timeout, f"the write of {key}", 0.05)


# -- 1. the control plane SIGKILLed under load -----------------------------------------------


async def control_plane_kill(stack: Stack, upstreams: Upstreams, clients: int = 4,
                             outage_s: float = 3.0, max_requests: int = 100_000
                             ) -> dict[str, Any]:
    await echo_pool(stack, upstreams)
    load = Load(stack.url, MODEL, clients=clients, max_requests=max_requests).begin()
    try:
        await load.progressed(20)
        await asyncio.to_thread(stack.control_plane.stop, signal.SIGKILL)
        killed = time.monotonic()
        # Written while the control plane is away: Envoy can learn it only after the restart.
        port = await upstreams.add("late-0")
        await stack.put("pools/late", {"models": ["late-model"]})
        await stack.put("endpoints/late/late-0", {"address": "127.0.0.1", "port": port})
        during_before = load.sent
        await asyncio.sleep(max(0.0, outage_s - (time.monotonic() - killed)))  # the outage
        await asyncio.to_thread(stack.control_plane.start)  # same xDS port; returns listening
        listening = time.monotonic()
        during = load.sent - during_before
        await asyncio.to_thread(wait_for, lambda: "late-0" in stack.envoy.hosts("late"), 30,
                                "the pool written during the outage to reach Envoy", 0.01)
        reconnect = time.monotonic() - listening
        await routable(stack.url, "late-model")
        to_routable = time.monotonic() - listening
        await load.progressed(20)  # the load keeps running on the restarted control plane
    finally:
        await load.end()
    return {"sent": load.sent, "failed": load.failed, "errors": load.errors,
            "during_outage": during, "outage_s": listening - killed,
            "reconnect_s": reconnect, "routable_s": to_routable}


async def chat_once(url: str, model: str, headers: dict[str, str] | None = None
                    ) -> tuple[int, dict[str, str], Any]:
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        return await chat(session, url, model, headers)


async def test_control_plane_sigkilled_under_load_loses_nothing(
        stack: Stack, upstreams: Upstreams) -> None:
    figures = await control_plane_kill(stack, upstreams)
    assert figures["failed"] == 0, figures
    assert figures["during_outage"] > 0, "no load ran during the outage"
    assert (await chat_once(stack.url, MODEL))[0] == 200
    print(f"\ncontrol plane SIGKILLed {figures['outage_s']:.1f} s under 4 clients: "
          f"{figures['failed']:.0f}/{figures['sent']:.0f} requests failed "
          f"({figures['during_outage']:.0f} while it was down); the pool written during the "
          f"outage reached Envoy {figures['reconnect_s']:.2f} s and routed "
          f"{figures['routable_s']:.2f} s after the restart listened")


# -- 2. etcd down under load -----------------------------------------------------------------


async def etcd_outage(tmp: Path, upstreams: Upstreams, clients: int = 4, outage_s: float = 5.0,
                      max_requests: int = 100_000) -> dict[str, Any]:
    etcd: Etcd = await asyncio.to_thread(new_etcd, tmp)  # private: the shared one stays up
    stack: Stack | None = None
    try:
        stack = await asyncio.to_thread(make_stack, tmp, etcd.url, "/outage/")
        await echo_pool(stack, upstreams)
        load = Load(stack.url, MODEL, clients=clients, max_requests=max_requests).begin()
        try:
            await load.progressed(20)
            await asyncio.to_thread(etcd.stop, signal.SIGKILL)
            down = time.monotonic()
            during_before = load.sent
            await asyncio.sleep(max(0.0, outage_s - (time.monotonic() - down)))  # the outage
            assert stack.control_plane.process is not None
            assert stack.control_plane.process.poll() is None, "the control plane died"
            await asyncio.to_thread(etcd.start)  # returns once /health answers
            back = time.monotonic()
            during = load.sent - during_before
            port = await upstreams.add("after-0")
            await put_retrying(stack, "pools/after", {"models": ["after-model"]})
            written = time.monotonic()
            await put_retrying(stack, "endpoints/after/after-0",
                               {"address": "127.0.0.1", "port": port})
            await routable(stack.url, "after-model")
            applied = time.monotonic()
            await load.progressed(20)
        finally:
            await load.end()
        return {"sent": load.sent, "failed": load.failed, "errors": load.errors,
                "during_outage": during,
                "outage_s": back - down, "write_after_s": written - back,
                "applied_s": applied - back}
    finally:
        if stack is not None:
            await asyncio.to_thread(stack.close)
        await asyncio.to_thread(etcd.stop)


async def test_etcd_outage_under_load_loses_nothing_and_a_later_change_applies(
        tmp_path: Path, upstreams: Upstreams) -> None:
    figures = await etcd_outage(tmp_path, upstreams)
    assert figures["failed"] == 0, figures
    assert figures["during_outage"] > 0, "no load ran during the outage"
    print(f"\netcd down {figures['outage_s']:.1f} s under 4 clients: "
          f"{figures['failed']:.0f}/{figures['sent']:.0f} requests failed "
          f"({figures['during_outage']:.0f} while it was down); a pool written "
          f"{figures['write_after_s']:.2f} s after etcd was back routed "
          f"{figures['applied_s']:.2f} s after etcd was back")


# -- 3. an upstream killed with streams in flight --------------------------------------------

# A streaming upstream in a process of its own, so that it can be SIGKILLed: JSON at once for
# a non-streaming request; else an SSE chunk every 100 ms, then [DONE].
SSE_SERVER = r"""
import asyncio, json, sys
from aiohttp import web

port, name, chunks = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])

async def handle(request):
    try:
        body = json.loads(await request.read())
    except ValueError:
        body = {}
    headers = {"x-served-by": name}
    if not body.get("stream"):
        return web.json_response({"served_by": name}, headers=headers)
    reply = web.StreamResponse(headers={"content-type": "text/event-stream", **headers})
    await reply.prepare(request)
    for index in range(chunks):
        await reply.write(f"data: {json.dumps({'chunk': index})}\n\n".encode())
        await asyncio.sleep(0.1)
    await reply.write(b"data: [DONE]\n\n")
    return reply

app = web.Application()
app.router.add_post("/{tail:.*}", handle)
web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)
"""


@dataclass
class SseServers:
    tmp: Path
    chunks: int = 30
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)

    def add(self, name: str) -> int:
        port = processes.free_port()
        self.processes[name] = start([sys.executable, "-c", SSE_SERVER, str(port), name,
                                      str(self.chunks)], self.tmp / f"sse-{name}.log")
        self.ports[name] = port
        wait_for(lambda: processes.port_open("127.0.0.1", port), 30, f"upstream {name}")
        return port

    def kill(self, name: str) -> None:
        stop(self.processes.pop(name), signal.SIGKILL)

    def close(self) -> None:
        for process in self.processes.values():
            stop(process)
        self.processes.clear()


@dataclass
class Stream:
    key: str
    status: int = 0
    host: str = ""
    chunks: int = 0
    done: bool = False
    error: str = ""


async def stream_one(session: aiohttp.ClientSession, url: str, model: str, stream: Stream
                     ) -> None:
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    try:
        async with session.post(f"{url}/v1/chat/completions", json=body,
                                headers={"x-session-id": stream.key}) as reply:
            stream.status = reply.status
            stream.host = reply.headers.get("x-served-by", "")
            async for line in reply.content:
                if line.startswith(b"data: [DONE]"):
                    stream.done = True
                elif line.startswith(b"data:"):
                    stream.chunks += 1
    except (TimeoutError, aiohttp.ClientError) as exc:
        stream.error = repr(exc)


async def placements(url: str, model: str, keys: list[str], concurrency: int = 20
                     ) -> dict[str, str]:
    """session key -> host that served it (non-streaming), or "failed: <status>"."""
    gate = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        async def one(key: str) -> tuple[str, str]:
            async with gate:
                try:
                    status, headers, _ = await chat(session, url, model,
                                                    {"x-session-id": key})
                except (TimeoutError, aiohttp.ClientError) as exc:
                    return key, f"failed: {exc!r}"
            return key, headers["x-served-by"] if status == 200 else f"failed: {status}"
        return dict(await asyncio.gather(*(one(key) for key in keys)))


@pytest.fixture
async def sse_servers(tmp_path: Path) -> AsyncIterator[SseServers]:
    servers = SseServers(tmp_path)
    try:
        yield servers
    finally:
        await asyncio.to_thread(servers.close)


async def upstream_death(stack: Stack, servers: SseServers, sessions: int = 60
                         ) -> dict[str, Any]:
    hosts = ["s0", "s1", "s2"]
    ports = {name: await asyncio.to_thread(servers.add, name) for name in hosts}
    await register(stack, "stream", ports, ["stream-model"], hash_balance_factor=0)
    await routable(stack.url, "stream-model")
    keys = [f"stream-session-{i}" for i in range(sessions)]
    before = await placements(stack.url, "stream-model", keys)
    counts = Counter(before.values())
    assert set(counts) == set(hosts), counts  # every request served, by every host
    dead = "s1"

    streams = [Stream(key) for key in keys]
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120),
                                     connector=connector) as session:
        tasks = [asyncio.create_task(stream_one(session, stack.url, "stream-model", s))
                 for s in streams]
        try:
            async def all_started() -> bool:
                return all(s.chunks > 0 or s.error or s.done for s in streams)
            await async_wait_for(all_started, 30, "every stream's first chunk")
            assert not [s for s in streams if s.error], [s.error for s in streams if s.error]
            # In flight on the host about to die: started, and not finished yet.
            in_flight = {s.key for s in streams if s.host == dead and not s.done}
            await asyncio.to_thread(servers.kill, dead)
            killed = time.monotonic()
            # Every request that starts after the kill succeeds, on the ring's next host.
            after = await placements(stack.url, "stream-model", keys)
            after_s = time.monotonic() - killed
            await asyncio.wait_for(asyncio.gather(*tasks), 60)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    failed = {s.key for s in streams if not s.done}
    survivors = [k for k, host in before.items() if host != dead]
    moved = [k for k in survivors if after[k] != before[k]]
    return {
        "sessions": sessions, "placement": dict(sorted(counts.items())),
        "in_flight_dead": len(in_flight), "failed": len(failed),
        # Streams placed elsewhere than before, or refused: none may be.
        "misplaced": [(s.key, s.status, s.host, before[s.key]) for s in streams
                      if s.status != 200 or s.host != before[s.key]],
        "failed_not_in_flight": sorted(failed - in_flight),
        "in_flight_not_failed": sorted(in_flight - failed),
        "failed_before_headers": sorted(k for k in failed
                                        if next(s for s in streams if s.key == k).chunks == 0),
        "survivor_streams_ok": sum(s.done for s in streams if before[s.key] != dead),
        "survivor_streams": len(survivors),
        "after_failed": sorted(k for k, host in after.items() if host.startswith("failed")),
        "after_on_dead": sorted(k for k, host in after.items() if host == dead),
        "after_s": after_s, "survivors_moved": len(moved),
        "orphans_to": dict(Counter(after[k] for k in keys if before[k] == dead))}


async def test_an_upstream_killed_with_streams_in_flight_fails_only_its_streams(
        stack: Stack, sse_servers: SseServers) -> None:
    f = await upstream_death(stack, sse_servers)
    assert f["in_flight_dead"] > 0 and f["misplaced"] == [], f
    # Only the streams in flight on the dead host fail, and only after their headers.
    assert f["failed_not_in_flight"] == [] and f["in_flight_not_failed"] == [], f
    assert f["failed_before_headers"] == [], f
    # Every request started after the kill succeeds; no session of a survivor moves.
    assert f["after_failed"] == [] and f["after_on_dead"] == [], f
    assert f["survivors_moved"] == 0, f
    print(f"\nupstream killed mid-stream: {f['sessions']} sessions {f['placement']}; "
          f"{f['failed']}/{f['in_flight_dead']} streams in flight on it failed (after their "
          f"headers), {f['survivor_streams_ok']}/{f['survivor_streams']} on survivors "
          f"completed; {f['sessions']}/{f['sessions']} requests after the kill succeeded "
          f"in {f['after_s']:.2f} s (its sessions to {f['orphans_to']}); "
          f"{f['survivors_moved']} survivor sessions moved")


# -- 4. hostile HTTP -------------------------------------------------------------------------


def openai_error(body: Any) -> dict[str, Any]:
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), body
    error: dict[str, Any] = body["error"]
    assert {"message", "type", "code"} <= set(error), error
    return error


async def raw_post(url: str, data: Any, headers: dict[str, str] | None = None
                   ) -> tuple[int, dict[str, str], Any]:
    # A session per request: Envoy may close the connection after a protocol error.
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session, session.post(
            f"{url}/v1/chat/completions", data=data,
            headers={"content-type": "application/json", **(headers or {})}) as reply:
        text = await reply.text(errors="replace")
        try:
            body = json.loads(text)
        except ValueError:
            body = text
        return reply.status, dict(reply.headers), body


async def test_hostile_http_gets_contract_errors_and_the_stack_keeps_serving(
        stack: Stack, upstreams: Upstreams) -> None:
    # Bounded load off: concurrent placements must be the ring's alone to be compared.
    await echo_pool(stack, upstreams, "chat", ("a", "b", "c"), "chat-model",
                    hash_balance_factor=0)
    await echo_pool(stack, upstreams, "other", ("o",), "other-model")
    url = stack.url
    seen: dict[str, int] = {}

    # A 100 KiB header (Envoy's limit is 60 KiB) is refused; its body is the next test's.
    status, _, body = await raw_post(url, json.dumps({"model": "chat-model"}).encode(),
                                     {"x-padding": "p" * (100 * 1024)})
    seen["100 KiB header"] = status
    assert status == 431, (status, body)

    # Invalid UTF-8 in the body, in a string value and in the model name.
    for where, raw in (
            ("content", b'{"model": "chat-model", "messages": [{"role": "user", '
                        b'"content": "bad \xff\xfe bytes"}]}'),
            ("model", b'{"model": "chat-\xc3(model", "messages": []}')):
        status, _, body = await raw_post(url, raw)
        seen[f"invalid UTF-8 ({where})"] = status
        assert status == 400, (where, status, body)
        assert openai_error(body)["type"] == "invalid_request_error"

    # A slow body, sent in pieces over ~1 s, still routes.
    payload = json.dumps({"model": "chat-model", "messages": [
        {"role": "user", "content": "slow " * 2000}]}).encode()
    pieces = [payload[i:i + len(payload) // 10 + 1]
              for i in range(0, len(payload), len(payload) // 10 + 1)]

    async def trickle() -> AsyncIterator[bytes]:
        for piece in pieces:
            yield piece
            await asyncio.sleep(0.1)  # the client's pacing under test

    began = time.monotonic()
    status, _, body = await raw_post(url, trickle(), {"x-session-id": "slow"})
    seen["slow body"] = status
    assert status == 200 and body["served_by"] in {"a", "b", "c"}, (status, body)
    assert body["bytes"] == len(payload)
    assert time.monotonic() - began >= 0.5

    # Spoofed internal headers: the routing follows the body, and the session the client
    # names (or none), never the forged x-hotpath-session.
    keys = [f"spoof-{i}" for i in range(12)]
    honest = await placements(url, "chat-model", keys)
    assert set(honest.values()) <= {"a", "b", "c"}, honest
    for key in keys:
        status, headers, body = await chat_once(url, "chat-model", {
            "x-session-id": key, "x-hotpath-model": "other-model",
            "x-hotpath-session": "forged"})
        assert status == 200 and body["model"] == "chat-model", body
        assert body["served_by"] == honest[key] and body["session"] == key, (key, body)
    status, headers, body = await chat_once(url, "other-model", {"x-hotpath-model": "chat-model"})
    assert status == 200 and body["served_by"] == "o" and body["model"] == "other-model"
    status, headers, body = await chat_once(url, "chat-model", {"x-hotpath-session": "forged"})
    assert status == 200 and body["session"] != "forged"
    assert headers["x-session-id"] != "forged"
    seen["spoofed x-hotpath-*"] = 200

    # The stack keeps serving, the processes are alive.
    for model in ("chat-model", "other-model"):
        assert (await chat_once(url, model))[0] == 200
    for process in (stack.control_plane.process, stack.envoy.process):
        assert process is not None and process.poll() is None
    print(f"\nhostile HTTP: {seen}; the stack kept serving")


async def test_a_100_kib_header_gets_an_openai_shaped_431(stack: Stack) -> None:
    await stack.wait_listener()
    status, _, body = await raw_post(stack.url, json.dumps({"model": "chat-model"}).encode(),
                                     {"x-padding": "p" * (100 * 1024)})
    assert status == 431, (status, body)
    assert openai_error(body)["code"] == "headers_too_large"
