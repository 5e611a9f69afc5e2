"""A new Lua filter version reaches Envoy over ECDS without replacing the listener.

Real etcd, control plane and Envoy. A 60 s SSE stream is open through Envoy while the
control plane restarts (same xDS port) with a patched filter (``HOTPATH_LUA_DIR``, the
folder whose Lua replaces the shipped one): Envoy takes a new ECDS version, keeps the
listener (same version, nothing modified or draining), new requests run the new code (a
lower body limit, enforced by the filter) and the open stream gets every chunk.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from control_plane.translate.lua import LUA_DIR_ENV, lua_asset
from tests.harness import Stack, async_wait_for, chat, env, wait_for

pytestmark = pytest.mark.integration

STREAM_S = 60
PATCHED_LIMIT = 2048


async def sse_upstream() -> tuple[web.AppRunner, int]:
    """A model server whose every answer is an SSE stream of one chunk a second for
    ``?chunks=N`` seconds (default: a short JSON answer)."""

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        chunks = int(request.query.get("chunks", "0"))
        if not chunks:
            return web.json_response({"bytes": len(body)})
        reply = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await reply.prepare(request)
        for index in range(chunks):
            await reply.write(f"data: {json.dumps({'chunk': index})}\n\n".encode())
            await asyncio.sleep(1)
        await reply.write(b"data: [DONE]\n\n")
        await reply.write_eof()
        return reply

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, port


def dump(stack: Stack) -> dict[str, Any]:
    with urllib.request.urlopen(f"{stack.envoy.admin_url}/config_dump", timeout=5) as reply:
        return dict(json.load(reply))


def filter_and_listener(stack: Stack) -> dict[str, Any]:
    """ECDS version of the Lua filter, and the listener's version and last update."""
    found: dict[str, Any] = {}
    for section in dump(stack)["configs"]:
        kind = section["@type"].rsplit(".", 1)[-1]
        if kind == "EcdsConfigDump":
            for item in section.get("ecds_filters", []):
                found["ecds"] = item.get("version_info")
        elif kind == "ListenersConfigDump":
            found["lds"] = section.get("version_info")
            for listener in section.get("dynamic_listeners", []):
                active = listener.get("active_state") or {}
                found["listener"] = (active.get("version_info"), active.get("last_updated"))
                found["warming"] = "warming_state" in listener
    return found


def stats(stack: Stack) -> dict[str, int]:
    text = stack.envoy.get("/stats").decode()
    values: dict[str, int] = {}
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if value.isdigit():
            values[name] = int(value)
    return values


@pytest.fixture
async def sse_pool(stack: Stack) -> AsyncIterator[Stack]:
    runner, port = await sse_upstream()
    try:
        await stack.put("pools/chat", {"models": ["chat-model"]})
        await stack.put("endpoints/chat/gpu-0", {"address": "127.0.0.1", "port": port})
        await stack.wait_listener()
        await asyncio.to_thread(wait_for, lambda: "gpu-0" in stack.envoy.hosts("chat"), 30,
                                "pool chat in Envoy")
        yield stack
    finally:
        await runner.cleanup()


def patched_lua(folder: Path) -> Path:
    """The shipped filter with a lower body limit: new code, same listener."""
    folder.mkdir()
    (folder / "hotpath.lua").write_text(lua_asset("hotpath.lua"))
    (folder / "filter.lua").write_text(
        f"HOTPATH_CONFIG.max_body_bytes = {PATCHED_LIMIT}\n" + lua_asset("filter.lua"))
    return folder


async def test_new_filter_version_applies_without_cutting_a_stream(
        sse_pool: Stack, tmp_path: Path) -> None:
    stack = sse_pool
    body = "x" * (2 * PATCHED_LIMIT)
    async with aiohttp.ClientSession() as session:
        status, _, _ = await chat(session, stack.url, "chat-model")
        assert status == 200
        assert (await chat(session, stack.url, "chat-model", extra=body))[0] == 200
        before = filter_and_listener(stack)
        assert before["ecds"] and before["listener"][0] and not before["warming"]
        counters = stats(stack)

        async def stream() -> tuple[int, list[bytes], float]:
            started = time.monotonic()
            lines: list[bytes] = []
            payload = {"model": "chat-model", "stream": True,
                       "messages": [{"role": "user", "content": "tell me a long story"}]}
            async with session.post(f"{stack.url}/v1/chat/completions?chunks={STREAM_S}",
                                    json=payload,
                                    timeout=aiohttp.ClientTimeout(total=STREAM_S + 30)
                                    ) as reply:
                async for line in reply.content:
                    if line.startswith(b"data:"):
                        lines.append(line.strip())
                return reply.status, lines, time.monotonic() - started

        task = asyncio.create_task(stream())
        await asyncio.sleep(3)
        assert not task.done()

        # The new filter version: the control plane restarts on the same xDS port with it.
        stack.control_plane.stop()
        with env(**{LUA_DIR_ENV: str(patched_lua(tmp_path / "lua-v2"))}):
            stack.control_plane.start()

        async def new_filter() -> bool:
            return filter_and_listener(stack).get("ecds") not in (None, before["ecds"])
        await async_wait_for(new_filter, 30, "the new ECDS version in Envoy")
        after = filter_and_listener(stack)
        print("filter update: before", before, "after", after)  # noqa: T201 (-s: the record)
        assert after["listener"] == before["listener"], "the listener was replaced"
        assert not after["warming"]

        # New requests run the new code: the filter's own limit now refuses the body.
        status, _, reply = await chat(session, stack.url, "chat-model", extra=body)
        assert status == 413, reply
        assert f"limit of {PATCHED_LIMIT} bytes" in reply["error"]["message"]
        assert (await chat(session, stack.url, "chat-model"))[0] == 200

        status, lines, took = await task
        assert status == 200
        assert lines[:-1] == [f"data: {json.dumps({'chunk': i})}".encode()
                              for i in range(STREAM_S)]
        assert lines[-1] == b"data: [DONE]"
        assert took >= STREAM_S - 1
        now = stats(stack)
        for name in ("listener_manager.listener_modified", "listener_manager.listener_removed",
                     "listener_manager.listener_in_place_updated",
                     "http.hotpath.downstream_cx_drain_close"):
            assert now.get(name, 0) == counters.get(name, 0), name
        assert now["listener_manager.total_listeners_draining"] == 0
        assert (now["extension_config_discovery.http_filter.hotpath-lua.config_reload"]
                > counters["extension_config_discovery.http_filter.hotpath-lua.config_reload"])
