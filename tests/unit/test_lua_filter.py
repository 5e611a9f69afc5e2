"""The rendered inline Lua (control_plane.translate.lua) under LuaJIT with a fake handle.

The fake follows the Envoy 1.40 behaviour the filter depends on: header objects die when
body() yields, body() is nil without a body, dynamic metadata is shared with the response,
and metadata() gives the metadata of the route the current headers select, frozen at its
first read (so it must not be read before the model header is set).
"""

import json
from pathlib import Path
from typing import Any

import pytest
from lupa import luajit21

from control_plane.translate.lua import lua_asset, lua_literal, render_lua_source

# The route metadata the control plane puts on each model's route.
ROUTES = {
    "chat-a": {"pool": "pool-a", "session_header": "x-session-id"},
    "chat-b": {"pool": "pool-b", "session_header": "x-conv"},
}

FAKE_ENVOY = """
local function header_map(state)
  local alive = true
  local map = {}
  local function check()
    if not alive then error("object used outside of proper scope") end
  end
  function map:get(name) check(); return state.headers[string.lower(name)] end
  function map:remove(name) check(); state.headers[string.lower(name)] = nil end
  function map:replace(name, value) check(); state.headers[string.lower(name)] = value end
  table.insert(state.live_maps, function() alive = false end)
  return map
end

-- A request handle over `headers` (lower-case names) and `body` (nil: no body).
function fake_handle(headers, body, metadata, routes)
  local state = {headers = headers, live_maps = {}, body_calls = 0, cleared = 0,
                 metadata = metadata}
  local handle = {}
  local route_metadata
  function handle:metadata()
    if route_metadata == nil then
      local route = routes and routes[state.headers["x-hotpath-model"] or ""] or {}
      route_metadata = {get = function(_, key) return route[key] end}
    end
    return route_metadata
  end
  function handle:headers() return header_map(state) end
  function handle:body()
    state.body_calls = state.body_calls + 1
    for _, kill in ipairs(state.live_maps) do kill() end  -- body() yields
    if body == nil then return nil end
    return {length = function() return #body end,
            getBytes = function(_, start, n) return string.sub(body, start + 1, start + n) end}
  end
  function handle:respond(h, b) state.reply = {headers = h, body = b} end
  function handle:clearRouteCache() state.cleared = state.cleared + 1 end
  function handle:streamInfo()
    return {dynamicMetadata = function()
      return {
        set = function(_, ns, key, value)
          metadata[ns] = metadata[ns] or {}
          metadata[ns][key] = value
        end,
        get = function(_, ns) return metadata[ns] end,
      }
    end}
  end
  return handle, state
end
"""


class Exchange:
    """One request and its response through the rendered filter."""

    def __init__(self, lua: Any, request_headers: dict[str, str], body: bytes | None) -> None:
        headers = lua.table_from({k.encode(): v.encode() for k, v in request_headers.items()})
        self.metadata = lua.table()
        handle, self.state = lua.globals().fake_handle(headers, body, self.metadata,
                                                       lua.globals().ROUTES)
        lua.globals().envoy_on_request(handle)
        self.reply = self.state[b"reply"]
        self.hash = lua.globals().HOTPATH.hash
        # The filter has no response path: the echo is a route response header (routes.py).
        assert lua.globals().envoy_on_response is None

    def session_hash(self) -> bytes | None:
        """What the access-log stream carries of the session: its hash, never the key."""
        meta = self.metadata[b"envoy.filters.http.lua"]
        if meta is None:
            return None
        assert meta[b"session"] is None
        value: bytes | None = meta[b"session_hash"]
        return value

    @property
    def request_headers(self) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.state[b"headers"].items()}

    @property
    def cleared(self) -> int:
        return int(self.state[b"cleared"])

    @property
    def body_calls(self) -> int:
        return int(self.state[b"body_calls"])


@pytest.fixture(scope="module")
def lua() -> Any:
    runtime = luajit21.LuaRuntime(encoding=None)
    runtime.execute(render_lua_source(1 << 20).encode())
    runtime.execute(FAKE_ENVOY.encode())
    runtime.execute(f"ROUTES = {lua_literal(ROUTES)}".encode())
    return runtime


def post(lua: Any, path: str, body: bytes | None, **headers: str) -> Exchange:
    base = {":method": "POST", ":path": path, "content-type": "application/json"}
    return Exchange(lua, {**base, **{k.replace("_", "-"): v for k, v in headers.items()}}, body)


def chat(model: str, **extra: Any) -> bytes:
    messages = [{"role": "user", "content": "hello"}]
    return json.dumps({"model": model, "messages": messages, **extra}).encode()


def test_routes_with_internal_headers_and_echoes_the_key(lua: Any) -> None:
    ex = post(lua, "/v1/chat/completions", chat("chat-a", user="alice"))
    assert ex.reply is None
    assert ex.request_headers["x-hotpath-model"] == "chat-a"
    assert ex.request_headers["x-hotpath-session"] == "alice"
    assert ex.cleared == 1
    assert ex.session_hash() == ex.hash(b"alice")


def test_uses_the_pools_session_header(lua: Any) -> None:
    ex = post(lua, "/v1/chat/completions", chat("chat-b", user="alice"), x_conv="c-1")
    assert ex.request_headers["x-hotpath-session"] == "c-1"
    assert ex.session_hash() == ex.hash(b"c-1")


def test_client_copies_of_internal_headers_are_replaced(lua: Any) -> None:
    ex = post(
        lua,
        "/v1/completions",
        b'{"model":"chat-b","prompt_cache_key":"k"}',
        x_hotpath_model="chat-a",
        x_hotpath_session="forged",
        x_hotpath_lua_reply="1",
    )
    headers = ex.request_headers
    assert (headers["x-hotpath-model"], headers["x-hotpath-session"]) == ("chat-b", "k")
    assert "x-hotpath-lua-reply" not in headers


def test_pass_through_is_untouched_but_loses_forged_headers(lua: Any) -> None:
    plain = Exchange(lua, {":method": "GET", ":path": "/health"}, None)
    assert plain.reply is None and plain.body_calls == 0 and plain.cleared == 0
    assert plain.request_headers == {":method": "GET", ":path": "/health"}
    assert plain.session_hash() is None

    forged = Exchange(
        lua,
        {
            ":method": "POST",
            ":path": "/v1/embeddings",
            "x-hotpath-model": "chat-a",
            "x-hotpath-session": "s",
        },
        b"{}",
    )
    assert forged.request_headers == {":method": "POST", ":path": "/v1/embeddings"}
    assert forged.body_calls == 0 and forged.cleared == 1  # the route is re-picked


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (None, 400, "invalid_json"),
        (b"{oops", 400, "invalid_json"),
        (b'{"prompt":"p"}', 400, "missing_model"),
        (b'{"model":"nope\\n\\"x\\""}', 404, "model_not_found"),
    ],
)
def test_errors_are_openai_shaped_local_replies(
    lua: Any, body: bytes | None, status: int, code: str
) -> None:
    ex = post(lua, "/v1/chat/completions?stream=true", body)
    assert ex.reply is not None
    assert dict(ex.reply[b"headers"].items()) == {
        b":status": str(status).encode(),
        b"content-type": b"application/json",
    }
    err = json.loads(ex.reply[b"body"])["error"]
    assert (err["type"], err["code"]) == ("invalid_request_error", code)
    if status == 404:
        assert 'nope\n"x"' in err["message"]
    # Marks the request so that local_reply_config's mappers leave this body alone.
    assert ex.request_headers["x-hotpath-lua-reply"] == "1"
    assert "x-hotpath-model" not in ex.request_headers and not list(ex.metadata.keys())


# --- rendering -----------------------------------------------------------------------------


def test_render_is_module_config_filter_and_deterministic() -> None:
    source = render_lua_source(123)
    assert source.startswith("HOTPATH = (function()\n" + lua_asset("hotpath.lua"))
    assert source.endswith(lua_asset("filter.lua"))
    assert render_lua_source(123) == source
    assert source.isascii()

    runtime = luajit21.LuaRuntime(encoding=None)
    runtime.execute(source.encode())
    config = runtime.globals().HOTPATH_CONFIG
    assert dict(config.items()) == {
        b"max_body_bytes": 123, b"model_header": b"x-hotpath-model",
        b"session_header_internal": b"x-hotpath-session",
        b"lua_reply_header": b"x-hotpath-lua-reply", b"pin_header": b"x-hotpath-pin",
        b"metadata_namespace": b"envoy.filters.http.lua"}


def test_render_rejects_a_non_positive_limit() -> None:
    with pytest.raises(ValueError):
        render_lua_source(0)


def test_lua_asset_reads_the_checkout() -> None:
    lua_dir = Path(__file__).resolve().parents[2] / "lua"
    assert lua_asset("filter.lua") == (lua_dir / "filter.lua").read_text(encoding="utf-8")


TRICKY = [
    "",
    'quote " and \\ backslash',
    "new\nline\r\ttab\x00nul\x7fdel",
    "\\0491 digits after escapes \x01" + "2",
    "]] ]=] [[ long brackets",
    "caf\u00e9 \u4e2d \U0001f600",
]


@pytest.mark.parametrize("text", TRICKY)
def test_lua_literal_strings_round_trip(text: str) -> None:
    runtime = luajit21.LuaRuntime(encoding=None)
    literal = lua_literal({text: text, "n": 2**53, "t": True, "f": False, "nested": {"k": text}})
    assert literal.isascii()
    table = runtime.execute(("return " + literal).encode())
    key = text.encode()
    assert table[key] == key and table[b"nested"][b"k"] == key
    assert (table[b"n"], table[b"t"], table[b"f"]) == (2**53, True, False)


def test_lua_literal_refuses_inexact_numbers() -> None:
    with pytest.raises(ValueError):
        lua_literal({"n": 2**53 + 1})
