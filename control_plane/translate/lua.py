"""The Lua filter's inline source: lua/hotpath.lua + the rendered config + lua/filter.lua.

Envoy's inline Lua cannot `require` files, so the module is inlined as the global HOTPATH and
the gateway-wide config as the global HOTPATH_CONFIG, both read by lua/filter.lua. The
source reaches Envoy over ECDS (translate/listeners.py), so a new source never replaces the
listener.

``HOTPATH_LUA_DIR`` (environment of the control plane) names a folder whose hotpath.lua
and filter.lua replace the shipped ones: a patched or newer filter rolled out to running
Envoys without reinstalling the control plane and without cutting a stream (the tests use
it to change the filter under an open stream).
"""

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TypeAlias

from control_plane import contract
from control_plane.runtime.assets import asset_text

LuaValue: TypeAlias = str | int | bool | Mapping[str, "LuaValue"]

# Lua numbers are doubles: larger integers would silently lose precision.
_LUA_MAX_EXACT_INT = 2**53


def lua_asset(name: str) -> str:
    """A file of lua/."""
    return asset_text("lua", name)


LUA_DIR_ENV = "HOTPATH_LUA_DIR"


def filter_asset(name: str) -> str:
    """A file of the filter: from $HOTPATH_LUA_DIR when set, else the shipped lua/."""
    folder = os.environ.get(LUA_DIR_ENV)
    if folder:
        return (Path(folder) / name).read_text(encoding="utf-8")
    return lua_asset(name)


def _lua_string(value: str) -> str:
    # Printable ASCII as is, every other byte of the UTF-8 form as a 3-digit decimal escape
    # (3 digits, so a following digit cannot extend it): the literal is pure ASCII.
    out = []
    for b in value.encode("utf-8"):
        if 0x20 <= b < 0x7F and b not in (0x22, 0x5C):
            out.append(chr(b))
        else:
            out.append(f"\\{b:03d}")
    return '"' + "".join(out) + '"'


def lua_literal(value: LuaValue) -> str:
    """A Lua expression for value; tables have their keys sorted, so output is deterministic."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        if abs(value) > _LUA_MAX_EXACT_INT:
            raise ValueError(f"integer {value} is not exact as a Lua number")
        return str(value)
    if isinstance(value, str):
        return _lua_string(value)
    items = (f"[{_lua_string(key)}]={lua_literal(item)}" for key, item in sorted(value.items()))
    return "{" + ",".join(items) + "}"


# pool -> "ip:port" -> comma-separated session hashes pinned there (affinity/).
LuaPins = Mapping[str, Mapping[str, str]]


def render_lua_source(max_body_bytes: int, pins: LuaPins | None = None) -> str:
    """The complete inline Lua for the filter. It holds no pool config (that is route
    metadata), only the pins of active sessions."""
    if max_body_bytes <= 0:
        raise ValueError(f"max_body_bytes must be positive, not {max_body_bytes}")
    config: dict[str, LuaValue] = {
        "max_body_bytes": max_body_bytes,
        "model_header": contract.MODEL_HEADER,
        "session_header_internal": contract.SESSION_HEADER,
        "lua_reply_header": contract.LUA_REPLY_HEADER,
        "pin_header": contract.PIN_HEADER,
        "metadata_namespace": contract.LUA_METADATA_NS,
    }
    if pins:
        config["pins"] = {pool: dict(hosts) for pool, hosts in pins.items() if hosts}
    return (
        f"HOTPATH = (function()\n{filter_asset('hotpath.lua')}\nend)()\n"
        f"HOTPATH_CONFIG = {lua_literal(config)}\n"
        f"{filter_asset('filter.lua')}"
    )
