"""The access-log stream through the real Envoy: first-token timing of real requests reaches
the control plane, a request still waiting is visible before it ends, and only a hash of the
session key leaves Envoy."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.harness import Stack, async_wait_for, wait_for

pytestmark = pytest.mark.integration


class SlowFirstToken:
    """An SSE server that sends its headers at once and its first token after ``delay_s``,
    as vLLM does under load."""

    def __init__(self) -> None:
        self.delay_s = 0.0
        self.runner: web.AppRunner | None = None
        self.release = asyncio.Event()

    async def start(self) -> int:
        async def chat(request: web.Request) -> web.StreamResponse:
            await request.read()
            reply = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await reply.prepare(request)
            if self.delay_s < 0:  # hang until released
                await self.release.wait()
            else:
                await asyncio.sleep(self.delay_s)
            for index in range(3):
                await reply.write(f"data: {json.dumps({'token': index})}\n\n".encode())
            await reply.write(b"data: [DONE]\n\n")
            await reply.write_eof()
            return reply

        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        assert site._server is not None
        return int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

    async def close(self) -> None:
        self.release.set()
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def slow(stack: Stack) -> AsyncIterator[SlowFirstToken]:
    server = SlowFirstToken()
    port = await server.start()
    try:
        await stack.put("pools/p", {"models": ["m"]})
        await stack.put("endpoints/p/gpu-0", {"address": "127.0.0.1", "port": port})
        await stack.wait_listener()
        await asyncio.to_thread(wait_for, lambda: set(stack.envoy.hosts("p")) == {"gpu-0"}, 30,
                                "the pool in Envoy")
        yield server
    finally:
        await server.close()


def traffic(stack: Stack) -> dict[str, Any]:
    url = f"http://127.0.0.1:{stack.control_plane.metrics_port}/traffic"
    with urllib.request.urlopen(url, timeout=5) as reply:
        value: dict[str, Any] = json.load(reply)
    return value


def endpoint(stack: Stack) -> dict[str, Any] | None:
    return next((e for e in traffic(stack)["endpoints"] if e["endpoint"] == "gpu-0"), None)


async def post(session: aiohttp.ClientSession, stack: Stack, key: str) -> int:
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    async with session.post(f"{stack.url}/v1/chat/completions", json=body,
                            headers={"x-session-id": key}) as reply:
        await reply.read()
        return reply.status


async def test_first_body_byte_timing_reaches_the_control_plane(
        stack: Stack, slow: SlowFirstToken) -> None:
    slow.delay_s = 1.2
    async with aiohttp.ClientSession() as session:
        async def routed() -> bool:
            return await post(session, stack, "warm-up") == 200
        await async_wait_for(routed, 30, "the model to route")
        assert await post(session, stack, "user-42") == 200

    def finished() -> dict[str, Any] | None:
        found = endpoint(stack)
        return found if found and found["requests"] >= 2 else None
    found = await asyncio.to_thread(wait_for, finished, 15, "two requests in the window")
    ttfts = [s[0] for s in found["samples"] if not s[2]]
    # The headers came at once; the first token after 1.2 s is what the stream reports.
    assert ttfts and min(ttfts) >= 1100, found
    assert found["covered_s"] > 0 and found["abandoned"] == 0
    # `hotpath status` shows real traffic beside the prober's view.
    result = await asyncio.to_thread(subprocess.run, [
        sys.executable, "-m", "control_plane", "status", "--json", "--etcd", stack.etcd.urls,
        "--prefix", stack.etcd.prefix, "--admin", stack.envoy.admin_url, "--traffic",
        f"http://127.0.0.1:{stack.control_plane.metrics_port}"],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    row = next(r for r in json.loads(result.stdout)["endpoints"] if r["endpoint"] == "gpu-0")
    assert row["traffic_p50_ms"] >= 1100 and row["requests_total"] >= 2, row
    # The key never leaves Envoy: neither the stream nor the file log has it.
    log_text = stack.control_plane.access_log.read_text()
    assert "user-42" not in log_text and "user-42" not in json.dumps(traffic(stack))


async def test_a_request_waiting_for_its_first_token_is_seen_before_it_ends(
        stack: Stack, slow: SlowFirstToken) -> None:
    async with aiohttp.ClientSession() as session:
        async def routed() -> bool:
            return await post(session, stack, "warm-up") == 200
        await async_wait_for(routed, 30, "the model to route")
        slow.delay_s = -1  # the next request hangs after its headers
        hung = asyncio.create_task(post(session, stack, "hung"))
        try:
            def waiting() -> list[Any] | None:
                found = endpoint(stack)
                ages = [s for s in (found or {}).get("samples", []) if s[2] and s[0] >= 1500]
                return ages or None
            await asyncio.to_thread(wait_for, waiting, 15, "the hung request in the window")
        finally:
            slow.release.set()
        assert await hung == 200
