"""Session-sticky weighted splits through the real Envoy (docs/splits.md).

Two control planes on one etcd prefix, each with its own Envoy: they translate the same
split-slots table (one of them leads and writes it), so every session gets one arm on both.
Sessions are x-session-id keys; the test computes each one's slot with the Lua module's
hash (lupa), so it checks Envoy's arm pick against the table slot by slot.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from lupa import luajit21

from control_plane.config.splits import SLOTS, slot_of
from control_plane.store.etcd import etcd_client
from control_plane.translate.lua import lua_asset
from tests.harness import Etcd, Stack, async_wait_for, make_stack, wait_for

pytestmark = pytest.mark.integration

_lua = luajit21.LuaRuntime(encoding=None)
_M = _lua.execute(lua_asset("hotpath.lua").encode())
CONCURRENCY = 16


def session_hash(key: str) -> str:
    return str(_M.hash(key.encode()).decode())


def slot(key: str) -> int:
    return slot_of(session_hash(key), SLOTS)


@dataclass
class Model:
    """Upstream servers that say who they are and record the body's `model` they got."""

    runners: list[web.AppRunner] = field(default_factory=list)
    seen: dict[str, set[str]] = field(default_factory=dict)

    async def add(self, name: str) -> int:
        async def handle(request: web.Request) -> web.StreamResponse:
            body = await request.json()
            self.seen.setdefault(name, set()).add(
                f"{body.get('model')}{' stream' if body.get('stream') else ''}")
            if body.get("stream"):
                reply = web.StreamResponse(headers={"content-type": "text/event-stream",
                                                    "x-served-by": name})
                await reply.prepare(request)
                chunk = {"model": body.get("model"), "served_by": name}
                await reply.write(f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode())
                await reply.write_eof()
                return reply
            return web.json_response({"served_by": name, "model": body.get("model")},
                                     headers={"x-served-by": name})

        app = web.Application()
        app.router.add_post("/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.runners.append(runner)
        return int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

    async def close(self) -> None:
        for runner in self.runners:
            await runner.cleanup()


@pytest.fixture
def stacks(tmp_path: Path, etcd_server: Etcd, prefix: str) -> Iterator[list[Stack]]:
    made: list[Stack] = []
    try:
        for name in ("one", "two"):
            (tmp_path / name).mkdir()
            made.append(make_stack(tmp_path / name, etcd_server.url, prefix))
        yield made
    finally:
        for stack in made:
            stack.close()


@pytest.fixture
async def servers() -> AsyncIterator[Model]:
    model = Model()
    try:
        yield model
    finally:
        await model.close()


async def add_pool(stack: Stack, servers: Model, pool: str, ttl: float, **extra: Any) -> None:
    port = await servers.add(pool)
    await stack.put(f"pools/{pool}", {"models": [f"{pool}-own"], "session_ttl_s": ttl, **extra})
    await stack.put(f"endpoints/{pool}/{pool}-0", {"address": "127.0.0.1", "port": port})


async def ask(session: aiohttp.ClientSession, url: str, model: str, key: str,
              stream: bool = False, path: str = "/v1/chat/completions"
              ) -> tuple[int, str | None, str]:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "hi"}],
                            "max_tokens": 4}
    if stream:
        body["stream"] = True
    async with session.post(url + path, json=body, headers={"x-session-id": key}) as reply:
        text = await reply.text()
        return reply.status, reply.headers.get("x-served-by"), text


async def round_of(session: aiohttp.ClientSession, urls: list[str], model: str,
                   keys: list[str]) -> dict[str, str | None]:
    """Every key once, key i through urls[i % len(urls)], CONCURRENCY at a time: key ->
    the arm pool that served it."""
    result: dict[str, str | None] = {}
    queue = list(enumerate(keys))

    async def worker() -> None:
        while queue:
            index, key = queue.pop()
            status, served_by, text = await ask(session, urls[index % len(urls)], model, key)
            assert status == 200, text
            result[key] = served_by

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return result


async def stored_table(stack: Stack, model: str) -> dict[str, Any] | None:
    async with etcd_client(stack.etcd) as client:
        assert client.kv is not None
        reply = await client.kv.get(f"{stack.etcd.prefix}split-slots/{model}")
    return json.loads(reply.kvs[0].value) if reply.kvs else None


def expected(table: dict[str, Any] | None, key: str) -> str:
    assert table is not None
    return str(table["arms"][int(table["slots"][slot(key)], 16)])


async def routed_by(stacks: list[Stack], table: dict[str, Any] | None) -> None:
    """Every Envoy has the table's slots in its routes: etcd holding a table is not yet
    every Envoy picking arms by it."""
    assert table is not None
    for stack in stacks:
        def applied(stack: Stack = stack) -> bool:
            routes = stack.envoy.get("/config_dump?resource=dynamic_route_configs")
            return f'"{table["slots"]}"'.encode() in routes
        await asyncio.to_thread(wait_for, applied, 15, "the slot table in every Envoy")


async def routable(session: aiohttp.ClientSession, stacks: list[Stack], model: str) -> None:
    for stack in stacks:
        await stack.wait_listener()

        async def ok(stack: Stack = stack) -> bool:
            return (await ask(session, stack.url, model, "probe"))[0] == 200
        await async_wait_for(ok, 30, f"{model} to route")


async def test_split_sticky_shares_and_weight_moves(stacks: list[Stack], servers: Model
                                                    ) -> None:
    one = stacks[0]
    ttl = 4.0
    await add_pool(one, servers, "a", ttl)
    await add_pool(one, servers, "b", ttl)
    await one.put("splits/chat", {"arms": [{"pool": "a", "weight": 90},
                                           {"pool": "b", "weight": 10,
                                            "served_model": "model-x"}]})
    urls = [stack.url for stack in stacks]
    keys = [f"user-{i}" for i in range(1000)]
    async with aiohttp.ClientSession() as session:
        await routable(session, stacks, "chat")
        table = await async_wait_for(lambda: stored_table(one, "chat"), 30, "first table")
        assert table["slots"] == "0" * 900 + "1" * 100  # the initial table: ranges
        await routed_by(stacks, table)
        # 1,000 sessions x 3 turns, each turn through the other Envoy.
        turns = [await round_of(session, urls[turn % 2:] + urls[:turn % 2], "chat", keys)
                 for turn in range(3)]
        for key in keys:
            assert turns[0][key] == turns[1][key] == turns[2][key] == expected(table, key), key
        share_b = sum(arm == "b" for arm in turns[0].values()) / len(keys)
        assert 0.07 <= share_b <= 0.13, share_b
        # The rewrite: b's server got its served model, streaming or not; a's the asked one.
        on_b = next(key for key in keys if turns[0][key] == "b")
        status, served_by, text = await ask(session, urls[0], "chat", on_b, stream=True)
        assert (status, served_by) == (200, "b") and '"model": "model-x"' in text
        assert servers.seen["b"] == {"model-x", "model-x stream"}
        assert servers.seen["a"] == {"chat"}

        # 80/20 while every session is active: none moves; only idle slots do, a -> b.
        await one.put("splits/chat", {"arms": [{"pool": "a", "weight": 80},
                                               {"pool": "b", "weight": 20,
                                                "served_model": "model-x"}]})
        moving = await async_wait_for(
            lambda: _changed(one, "chat", table["slots"]), 5, "the leader's new table")
        assert all(old == "0" for old, new in zip(table["slots"], moving["slots"],
                                                  strict=True) if old != new)
        active = {slot(key) for key in keys}
        assert not {s for s in range(SLOTS) if table["slots"][s] != moving["slots"][s]} & active
        before = turns[2]
        during = await round_of(session, urls, "chat", keys)
        assert during == before

        # Idle past the TTL: the leader moves the rest of a's highest 100 slots.
        final = await async_wait_for(
            lambda: _with_count(one, "chat", "1", 200), ttl + 10, "the 80/20 table")
        assert final["slots"] == "0" * 800 + "1" * 200
        await routed_by(stacks, final)
        after = await round_of(session, urls, "chat", keys)
        again = await round_of(session, urls[::-1], "chat", keys)  # the other Envoy each
        assert after == again
        moved = [key for key in keys if after[key] != before[key]]
        assert all(before[key] == "a" and after[key] == "b" for key in moved)
        assert 0.06 <= len(moved) / len(keys) <= 0.14, len(moved)
        for key in keys:
            assert after[key] == expected(final, key)


async def _changed(stack: Stack, model: str, old: str) -> dict[str, Any] | None:
    table = await stored_table(stack, model)
    return table if table is not None and table["slots"] != old else None


async def _with_count(stack: Stack, model: str, digit: str, count: int
                      ) -> dict[str, Any] | None:
    table = await stored_table(stack, model)
    return table if table is not None and table["slots"].count(digit) == count else None


async def test_three_arms_total_weight_change_moves_only_shrinking(
        stacks: list[Stack], servers: Model) -> None:
    one = stacks[0]
    for pool in ("a", "b", "c"):
        await add_pool(one, servers, pool, 1.0)
    arms = [{"pool": "a", "weight": 50}, {"pool": "b", "weight": 30}, {"pool": "c", "weight": 20}]
    await one.put("splits/tri", {"arms": arms})
    keys = [f"tri-{i}" for i in range(300)]
    urls = [stack.url for stack in stacks]
    async with aiohttp.ClientSession() as session:
        await routable(session, stacks, "tri")
        before = await round_of(session, urls, "tri", keys)
        arms[2]["weight"] = 40  # total 100 -> 120: a and b shrink, c grows
        await one.put("splits/tri", {"arms": arms})
        # targets 417 / 250 / 333
        table = await async_wait_for(lambda: _with_count(one, "tri", "2", 333), 15,
                                     "the new table")
        await routed_by(stacks, table)
        after = await round_of(session, urls[::-1], "tri", keys)
    moved = [key for key in keys if after[key] != before[key]]
    assert moved and all(before[k] in ("a", "b") and after[k] == "c" for k in moved)
    assert 0.06 <= len(moved) / len(keys) <= 0.28, len(moved)


async def test_bad_splits_rejected_and_deleted_pools_degrade(stacks: list[Stack],
                                                             servers: Model) -> None:
    one, two = stacks
    await add_pool(one, servers, "a", 600)
    await add_pool(one, servers, "b", 600)
    await one.put("splits/chat", {"arms": [{"pool": "a", "weight": 50},
                                           {"pool": "b", "weight": 50}]})
    keys = [f"k-{i}" for i in range(200)]
    urls = [one.url, two.url]
    async with aiohttp.ClientSession() as session:
        await routable(session, stacks, "chat")
        before = await round_of(session, urls, "chat", keys)
        assert set(before.values()) == {"a", "b"}
        async with session.get(one.url + "/v1/models") as reply:
            listed = {m["id"] for m in (await reply.json())["data"]}
        assert {"chat", "a-own", "b-own"} <= listed

        bad = [
            ({"arms": [{"pool": "a", "weight": 1, "wieght": 2}]},
             "splits/chat: unknown arms[0] field(s) wieght"),
            ({"arms": [{"pool": "a", "weight": 0}]},
             "splits/chat: arms' weights must have a positive sum"),
            ({"arms": [{"pool": "a", "weight": -1}]},
             "splits/chat: arms[0].weight must be >= 0, got -1"),
            ({"arms": [{"pool": "a", "weight": 1}, {"pool": "nope", "weight": 1}]},
             "splits/chat: arms[1].pool 'nope' does not exist"),
            ({"arms": [], "extra": 1}, "splits/chat: unknown field(s) extra"),
        ]
        for value, message in bad:
            await one.put("splits/chat", value)
            for stack in stacks:
                await asyncio.to_thread(wait_for, lambda s=stack, m=message: m in s.control_plane
                                        .log_text(), 30, f"rejection {message}")
        # A pool claiming the split's model is refused too.
        await one.put("pools/thief", {"models": ["chat"]})
        await asyncio.to_thread(wait_for, lambda: "pools/thief: model 'chat' is split by "
                                "splits/chat" in one.control_plane.log_text(), 30, "refusal")
        # The last good split keeps routing, every session on its arm.
        assert await round_of(session, urls, "chat", keys) == before

        # Pool b deleted later: its sessions go to a (degraded), a's stay.
        await one.delete("pools/b")
        await asyncio.to_thread(wait_for, lambda: "split chat: degraded" in
                                one.control_plane.log_text(), 30, "degraded log line")

        async def all_on_a() -> bool:
            got = await round_of(session, urls, "chat", keys)
            return set(got.values()) == {"a"}
        await async_wait_for(all_on_a, 30, "b's sessions on a")
        metrics = await _metrics(session, one)
        assert "hotpath_split_degraded{model=\"chat\"} 1\n" in metrics

        # No arm left: 503, OpenAI- and Anthropic-shaped.
        await one.delete("pools/a")

        async def gone() -> bool:
            return all([(await ask(session, url, "chat", "x"))[0] == 503 for url in urls])
        await async_wait_for(gone, 30, "503 with no arm on both Envoys")
        status, _, text = await ask(session, two.url, "chat", "x")
        assert status == 503 and json.loads(text)["error"]["type"] == "server_error"
        status, _, text = await ask(session, one.url, "chat", "x", path="/v1/messages")
        assert status == 503 and json.loads(text)["type"] == "error"


async def _metrics(session: aiohttp.ClientSession, stack: Stack) -> str:
    url = f"http://127.0.0.1:{stack.control_plane.metrics_port}/metrics"
    async with session.get(url) as reply:
        return await reply.text()


def test_slot_matches_lua() -> None:
    """The control plane's slot of an access-log hash is the Lua filter's."""
    for index in range(200):
        key = f"user-{index}-{time.time_ns() % 97}"
        digest = _M.hash(key.encode())
        assert slot_of(digest.decode(), SLOTS) == int(_M.slot(digest, SLOTS))
