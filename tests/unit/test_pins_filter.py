"""The Lua filter's half of pins: it reports the key's ring position and sets the pin header
from the rendered pin table; clients cannot set it themselves."""

from typing import Any

import pytest
from lupa import luajit21

from control_plane.affinity.ring import key_hash, xxh64
from control_plane.translate.lua import lua_asset, lua_literal, render_lua_source
from tests.unit.test_lua_filter import FAKE_ENVOY, ROUTES, Exchange

BODY = b'{"model": "chat-a", "messages": [{"role": "user", "content": "hi"}]}'


def runtime(pins: dict[str, dict[str, str]]) -> Any:
    lua = luajit21.LuaRuntime(encoding=None)
    lua.execute(render_lua_source(1 << 20, pins).encode())
    lua.execute(FAKE_ENVOY.encode())
    lua.execute(f"ROUTES = {lua_literal(ROUTES)}".encode())
    return lua


def hash_of(lua: Any, key: str) -> str:
    return str(lua.globals().HOTPATH.hash(key.encode()).decode())


def send(lua: Any, key: str, **headers: str) -> Exchange:
    return Exchange(lua, {":method": "POST", ":path": "/v1/chat/completions",
                          "x-session-id": key, **headers}, BODY)


@pytest.mark.parametrize("length", [0, 1, 3, 4, 7, 8, 15, 31, 32, 33, 64, 100, 255, 256])
def test_ring_hash_is_xxh64_of_the_key(length: int) -> None:
    lua = luajit21.LuaRuntime(encoding=None)
    module = lua.execute(lua_asset("hotpath.lua").encode())
    key = bytes((i * 7 + 33) % 94 + 32 for i in range(length))
    assert module.ring_hash(key).decode() == f"{xxh64(key):016x}"


def test_known_xxh64_values() -> None:
    # The reference implementation's published values.
    assert xxh64(b"") == 0xEF46DB3751D8E999
    assert xxh64(b"a") == 0xD24EC4F1A98C6E5B
    assert xxh64(b"abc") == 0x44BC2CF5AD770999


def test_pinned_session_gets_the_pin_header_and_reports_its_ring_position() -> None:
    probe = runtime({})
    pinned, other = "user-1", "user-2"
    lua = runtime({"pool-a": {"127.0.0.1:8002": f"{hash_of(probe, pinned)},h-0000000000000001"}})
    ex = send(lua, pinned)
    assert ex.request_headers["x-hotpath-pin"] == "127.0.0.1:8002"
    meta = ex.metadata[b"envoy.filters.http.lua"]
    assert int(meta[b"ring_hash"].decode(), 16) == key_hash(pinned)
    assert "x-hotpath-pin" not in send(lua, other).request_headers


def test_pins_are_per_pool() -> None:
    probe = runtime({})
    lua = runtime({"pool-b": {"127.0.0.1:8002": hash_of(probe, "user-1")}})
    assert "x-hotpath-pin" not in send(lua, "user-1").request_headers


def test_a_client_cannot_pin_itself() -> None:
    ex = send(runtime({}), "user-1", **{"x-hotpath-pin": "10.0.0.9:80"})
    assert "x-hotpath-pin" not in ex.request_headers
