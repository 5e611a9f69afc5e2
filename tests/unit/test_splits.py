"""Splits: validation (model.py, state.py), the slot table rules (config/splits.py), the Lua
arm pick and body rewrite (lua/hotpath.lua under LuaJIT), and the split routes."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lupa import luajit21

from control_plane.config.model import GatewaySettings, Split, SplitArm, SplitSlots, parse_split
from control_plane.config.splits import (
    SLOTS,
    decode,
    derive,
    initial_table,
    leader_table,
    serving_table,
    slot_of,
    targets,
)
from control_plane.config.state import ConfigState
from control_plane.errors import ConfigError
from control_plane.store.split_slots import tables_to_write
from control_plane.translate.lua import lua_asset, lua_literal
from control_plane.translate.resources import Translator
from control_plane.translate.routes import build_route_configuration

# -- validation ------------------------------------------------------------------------------


def split_error(value: Any, model: str = "chat") -> str:
    with pytest.raises(ConfigError) as info:
        parse_split(f"splits/{model}", model, json.dumps(value))
    return str(info.value)


@pytest.mark.parametrize(("value", "message"), [
    ({"arms": [{"pool": "a", "weight": 1}], "armz": 1},
     "splits/chat: unknown field(s) armz (allowed: arms)"),
    ({"arms": [{"pool": "a", "weight": 1, "wieght": 1}]},
     "splits/chat: unknown arms[0] field(s) wieght (allowed: pool, weight, served_model)"),
    ({"arms": []}, "splits/chat: arms must be a list of 1-16 arms, got []"),
    ({"arms": [{"pool": f"p{i}", "weight": 1} for i in range(17)]},
     "splits/chat: arms must be a list of 1-16 arms"),
    ({"arms": [{"weight": 1}]}, "splits/chat: arms[0].pool is required"),
    ({"arms": [{"pool": "A", "weight": 1}]},
     "splits/chat: arms[0].pool 'A' must match [a-z0-9][a-z0-9._-]{0,62}"),
    ({"arms": [{"pool": "a"}]}, "splits/chat: arms[0].weight is required (an integer >= 0)"),
    ({"arms": [{"pool": "a", "weight": 1.5}]},
     "splits/chat: arms[0].weight must be an integer, got 1.5"),
    ({"arms": [{"pool": "a", "weight": -1}]}, "splits/chat: arms[0].weight must be >= 0, got -1"),
    ({"arms": [{"pool": "a", "weight": True}]},
     "splits/chat: arms[0].weight must be an integer, got true"),
    ({"arms": [{"pool": "a", "weight": 0}, {"pool": "b", "weight": 0}]},
     "splits/chat: arms' weights must have a positive sum, got 0"),
    ({"arms": [{"pool": "a", "weight": 1}, {"pool": "a", "weight": 1}]},
     "splits/chat: arms lists a pool twice (one arm per pool)"),
    ({"arms": [{"pool": "a", "weight": 1, "served_model": ""}]},
     "splits/chat: arms[0].served_model must be a string of 1-256 chars, got \"\""),
    ({"arms": [{"pool": "a", "weight": 1, "served_model": "x\ty"}]},
     "splits/chat: arms[0].served_model 'x\\ty' contains control characters"),
    ([1], "splits/chat: value must be a JSON object, got list"),
])
def test_split_validation_messages(value: Any, message: str) -> None:
    assert split_error(value).startswith(message)


def test_split_defaults_served_model_to_the_model() -> None:
    split = parse_split("splits/m/x", "m/x", json.dumps(
        {"arms": [{"pool": "a", "weight": 9}, {"pool": "b", "weight": 1, "served_model": "y"}]}))
    assert split == Split("m/x", (SplitArm("a", 9, "m/x"), SplitArm("b", 1, "y")))


def pool(models: list[str], **extra: Any) -> bytes:
    return json.dumps({"models": models, **extra}).encode()


def split_value(*arms: tuple[str, int]) -> bytes:
    return json.dumps({"arms": [{"pool": p, "weight": w} for p, w in arms]}).encode()


def test_state_split_needs_its_pools_and_keeps_last_good() -> None:
    state = ConfigState()
    state.apply("pools/a", pool(["a-own"]), 1)
    assert state.apply("splits/chat", split_value(("a", 1), ("b", 1)), 2) is not None
    assert "chat" not in state.config().splits
    assert "arms[1].pool 'b' does not exist" in state.rejected["splits/chat"]
    state.apply("pools/b", pool(["b-own"]), 3)
    assert state.apply("splits/chat", split_value(("a", 9), ("b", 1)), 4) is None
    rejection = state.apply("splits/chat", b'{"arms": [{"pool": "a", "weight": 1, "x": 1}]}', 5)
    assert rejection is not None and "unknown arms[0] field(s) x" in rejection.message
    assert state.config().splits["chat"].arms[0].weight == 9  # last good
    # A pool deleted later: the split stays (degraded), not refused.
    state.apply("pools/b", None, 6)
    assert state.config().splits["chat"].pools == ("a", "b")


def test_state_split_model_and_pool_models_exclusive() -> None:
    state = ConfigState()
    state.apply("pools/a", pool(["a-own"]), 1)
    state.apply("splits/chat", split_value(("a", 1)), 2)
    rejection = state.apply("pools/thief", pool(["chat"]), 3)
    assert rejection is not None and "model 'chat' is split by splits/chat" in rejection.message
    assert "thief" not in state.config().pools
    # The other way: a split of a model an older pool serves.
    assert state.apply("splits/a-own", split_value(("a", 1)), 4) is not None
    assert "model 'a-own' already belongs to pool 'a'" in state.rejected["splits/a-own"]
    assert "a-own" not in state.config().splits


def test_state_relist_matches_live() -> None:
    live = ConfigState()
    items = [("pools/a", pool(["a-own"]), 1, 1), ("splits/chat", split_value(("a", 1)), 2, 2),
             ("pools/thief", pool(["chat"]), 3, 3)]
    for key, value, revision, created in items:
        live.apply(key, value, revision, created)
    relisted = ConfigState()
    relisted.apply_all(reversed(items))
    assert relisted.config() == live.config()
    assert relisted.rejected == live.rejected


def test_state_split_slots_validated() -> None:
    state = ConfigState()
    good = json.dumps({"arms": ["a", "b"], "slots": "0" * 900 + "1" * 100}).encode()
    assert state.apply("split-slots/chat", good, 1) is None
    bad = json.dumps({"arms": ["a"], "slots": "0" * 900 + "1" * 100}).encode()
    rejection = state.apply("split-slots/chat", bad, 2)
    assert rejection is not None and "arm index outside 0..0" in rejection.message
    assert state.config().split_slots["chat"].table.count("1") == 100  # last good
    short = json.dumps({"arms": ["a"], "slots": "0"}).encode()
    assert "slots must be a string of 1000" in str(state.apply("split-slots/chat", short, 3))


# -- slot tables -----------------------------------------------------------------------------


def test_targets_exact_and_deterministic() -> None:
    assert targets([90, 10]) == [900, 100]
    assert targets([1, 1, 1]) == [334, 333, 333]
    assert targets([50, 30, 40]) == [417, 250, 333]
    assert initial_table([1, 0, 1]) == "0" * 500 + "2" * 500


weights_st = st.lists(st.integers(0, 50), min_size=2, max_size=6).filter(lambda w: sum(w) > 0)


@st.composite
def change(draw: st.DrawFn) -> tuple[list[int], list[int], set[int]]:
    old = draw(weights_st)
    new = draw(st.lists(st.integers(0, 50), min_size=len(old), max_size=len(old))
               .filter(lambda w: sum(w) > 0))
    active = draw(st.sets(st.integers(0, SLOTS - 1), max_size=400))
    return old, new, active


@settings(max_examples=150, deadline=None)
@given(change())
def test_derive_moves_only_shrinking_to_growing_and_minimal(case: Any) -> None:
    old_w, new_w, active = case
    old = initial_table(old_w)
    new = derive(decode(old), new_w, active=active)
    assert new is not None and len(new) == SLOTS
    old_counts = [old.count(str(i)) for i in range(len(old_w))]
    want = targets(new_w)
    moved = [(int(a), int(b)) for a, b in zip(old, new, strict=True) if a != b]
    for source, dest in moved:
        assert old_counts[source] > want[source]  # shrinking
        assert old_counts[dest] < want[dest]  # growing
    # Minimal: exactly what the weights need, less what active slots hold back.
    assert len(moved) <= sum(max(0, c - w) for c, w in zip(old_counts, want, strict=True))
    assert not {s for s in range(SLOTS) if old[s] != new[s]} & active
    # Once idle, the rest moves: the table reaches the targets, again only shrink -> grow.
    idle = derive(decode(new), new_w)
    assert idle is not None and [idle.count(f"{i:x}") for i in range(len(new_w))] == want
    new_counts = [new.count(f"{i:x}") for i in range(len(new_w))]
    for a, b in zip(new, idle, strict=True):
        if a != b:
            assert new_counts[int(a, 16)] > want[int(a, 16)]
            assert new_counts[int(b, 16)] < want[int(b, 16)]
    # With two arms, the leaving slots do not depend on the traffic (the highest ones).
    if len(new_w) == 2:
        assert idle == derive(decode(old), new_w)


@settings(max_examples=100, deadline=None)
@given(weights_st, st.data())
def test_derive_gone_arm_slots_always_move(weights: list[int], data: st.DataObject) -> None:
    table = initial_table(weights)
    gone = data.draw(st.integers(0, len(weights) - 1))
    left = [0 if i == gone else w for i, w in enumerate(weights)]
    if sum(left) == 0:
        assert derive(decode(table), left, gone={gone}) is None
        return
    new = derive(decode(table), left, active=range(SLOTS), gone={gone})
    assert new is not None and f"{gone:x}" not in new
    # Only the gone arm's slots moved.
    assert all(a == b for a, b in zip(table, new, strict=True) if a != f"{gone:x}")


SPLIT = Split("chat", (SplitArm("a", 90, "chat"), SplitArm("b", 10, "model-x")))


def test_serving_and_leader_tables() -> None:
    assert serving_table(SPLIT, None, {"a", "b"}) == "0" * 900 + "1" * 100
    stored = SplitSlots("chat", ("a", "b"), "0" * 900 + "1" * 100)
    moved = Split("chat", (SplitArm("a", 80, "chat"), SplitArm("b", 20, "model-x")))
    # Translate waits for the leader on a weight change...
    assert serving_table(moved, stored, {"a", "b"}) == stored.table
    # ... which moves a's highest 100 slots, the active ones once idle.
    assert leader_table(moved, stored, {"a", "b"}, active=()) == "0" * 800 + "1" * 200
    partial = leader_table(moved, stored, {"a", "b"}, active={850})
    assert partial is not None and partial.count("1") == 199 and partial[850] == "0"
    # b deleted: its slots go to a at once, everywhere; both gone: no table (503).
    assert serving_table(moved, stored, {"a"}) == "0" * 1000
    assert serving_table(moved, stored, set()) is None
    # An arm list edited: mapped by pool, so a's slots stay a's.
    reordered = Split("chat", (SplitArm("b", 10, "chat"), SplitArm("a", 90, "chat")))
    assert serving_table(reordered, stored, {"a", "b"}) == "1" * 900 + "0" * 100


def test_leader_writes_only_changes() -> None:
    state = ConfigState()
    state.apply("pools/a", pool(["a-own"], session_ttl_s=5), 1)
    state.apply("pools/b", pool(["b-own"]), 2)
    state.apply("splits/chat", split_value(("a", 80), ("b", 20)), 3)
    state.apply("split-slots/old", json.dumps({"arms": ["a"], "slots": "0" * 1000}).encode(), 4)
    seen = {"a": ["h-0000000000000352"]}  # slot 0x352 % 1000 = 850

    def sessions(pool: str, now: float, ttl: float) -> list[str]:
        assert ttl == (5 if pool == "a" else 600)
        return seen.get(pool, [])

    writes = tables_to_write(state.config(), sessions, 0.0)
    assert writes["old"] is None
    chat = writes["chat"]
    assert chat is not None and chat["arms"] == ["a", "b"]
    state.apply("split-slots/chat", json.dumps(chat).encode(), 5)
    assert "chat" not in tables_to_write(state.config(), sessions, 0.0)


def test_slot_of() -> None:
    assert slot_of("h-0123456789abcdef") == 0x89ABCDEF % 1000
    with pytest.raises(ValueError):
        slot_of("s-1")


# -- Lua -------------------------------------------------------------------------------------

_lua = luajit21.LuaRuntime(encoding=None)
M = _lua.execute(lua_asset("hotpath.lua").encode())
CONFIG = _lua.execute(("return " + lua_literal({"max_body_bytes": 1 << 20})).encode())


def split_entry(table: str, served: list[str]) -> Any:
    return _lua.execute(("return " + lua_literal({
        "slots": table, "session_header": "x-session-id",
        "arm_pools": {str(i + 1): f"p{i}" for i in range(len(served))},
        "served_models": {str(i + 1): s for i, s in enumerate(served)},
    })).encode())


def lua_list(entry: Any, name: bytes) -> None:
    """lua_literal makes string keys; the filter gets arrays: convert."""
    table = entry[name]
    array = _lua.table()
    for key in list(table.keys()):
        array[int(key)] = table[key]
    entry[name] = array


def decide_split(body: dict[str, Any], key: str, table: str, served: list[str]) -> Any:
    entry = split_entry(table, served)
    lua_list(entry, b"arm_pools")
    lua_list(entry, b"served_models")
    rerouted: list[bytes] = []
    result = M.decide(CONFIG, b"POST", b"/v1/chat/completions",
                      lambda name: key.encode() if name == b"x-session-id" else None,
                      json.dumps(body).encode(), lambda model: entry, rerouted.append)
    return result, rerouted


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=40))
def test_lua_slot_matches_python(key: str) -> None:
    digest = M.hash(key.encode())
    assert int(M.slot(digest, SLOTS)) == slot_of(digest.decode())


def test_lua_picks_the_tables_arm_and_rewrites_only_when_served_differs() -> None:
    table = initial_table([50, 50])
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    for index in range(60):
        key = f"user-{index}"
        arm = int(table[slot_of(M.hash(key.encode()).decode())])
        result, rerouted = decide_split(body, key, table, ["chat", "model-x"])
        assert int(result[b"arm"]) == arm
        assert rerouted == [b"chat\t" + str(arm).encode()] == [result[b"model"]]
        assert result[b"pool"] == f"p{arm}".encode()
        if arm == 0:
            assert result[b"body"] is None
        else:
            assert json.loads(result[b"body"]) == {**body, "model": "model-x"}


def test_lua_split_with_no_arm_is_503_and_tab_models_are_unknown() -> None:
    result, rerouted = decide_split({"model": "chat"}, "k", "", ["chat"])
    assert result[b"status"] == 503 and rerouted == []
    assert json.loads(result[b"json"])["error"]["type"] == "server_error"
    entry = split_entry(initial_table([1]), ["chat"])
    tab = M.decide(CONFIG, b"POST", b"/v1/chat/completions", lambda name: None,
                   json.dumps({"model": "chat\t0"}).encode(), lambda model: entry)
    assert tab[b"status"] == 404


def test_lua_replace_model_keeps_the_rest_byte_for_byte() -> None:
    raw = b'{"stream":true, "model" : "ch\\u0061t", "x":[1,2]}'
    fields = M.extract(raw, _lua.eval("{model = true}"))
    out = M.replace_model(raw, fields[b"model"], 'm"\u00e9'.encode())
    assert out == b'{"stream":true, "model" : "m\\"\xc3\xa9", "x":[1,2]}'
    assert json.loads(out)["model"] == 'm"\u00e9'


# -- routes ----------------------------------------------------------------------------------


def test_split_routes_in_the_route_configuration() -> None:
    state = ConfigState()
    state.apply("pools/a", pool(["a-own"], session_headers=["x-conv", "x-session-id"]), 1)
    state.apply("pools/b", pool(["b-own"]), 2)
    state.apply("splits/chat", json.dumps({"arms": [
        {"pool": "a", "weight": 90}, {"pool": "b", "weight": 10, "served_model": "x"}]}
    ).encode(), 3)
    config = state.config()
    translator = Translator()
    resources = translator.translate(config, lambda e: e.address, GatewaySettings(), 0.0)
    (route_config,) = resources["type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
                                ].values()
    routes = build_route_configuration(config.pools.values(), GatewaySettings(),
                                       translator.splits)
    assert route_config == routes
    tree = route_config.virtual_hosts[0].matcher.matcher_tree.exact_match_map.map
    assert {"a-own", "b-own", "chat", "chat\t0", "chat\t1"} == set(tree)
    from envoy.config.route.v3 import route_components_pb2

    split_route = route_components_pb2.Route()
    tree["chat"].action.typed_config.Unpack(split_route)
    meta = split_route.metadata.filter_metadata["envoy.filters.http.lua"]
    assert meta["slots"] == "0" * 900 + "1" * 100
    assert list(meta["arm_pools"]) == ["a", "b"] and list(meta["served_models"]) == ["chat", "x"]
    assert list(meta["session_headers"]) == ["x-conv", "x-session-id"]  # the first arm's
    arm = route_components_pb2.Route()
    tree["chat\t1"].action.typed_config.Unpack(arm)
    assert arm.route.cluster == "b" and arm.route.hash_policy[0].header.header_name
    models = [r for r in route_config.virtual_hosts[0].matcher.on_no_match.action.typed_config
              .value.decode(errors="ignore").split('"id":"')[1:]]
    assert any(m.startswith("chat\"") for m in models)


# -- apply / export --------------------------------------------------------------------------


def test_apply_file_splits_section() -> None:
    from control_plane.config.file import Stored, parse_document, plan
    from control_plane.errors import ConfigFileError

    doc = {"pools": {"a": {"models": ["a-own"]}, "b": {"models": ["b-own"]}},
           "splits": {"chat": {"arms": [{"pool": "a", "weight": 95},
                                        {"pool": "b", "weight": 5, "served_model": "m2"}]}}}
    desired = parse_document("f.yaml", doc)
    changes = {c.key: c for c in plan("f.yaml", desired, {}, prune=False)}
    assert changes["splits/chat"].action == "created"
    assert changes["splits/chat"].value == doc["splits"]["chat"]
    stored = {"splits/chat": Stored(json.dumps(doc["splits"]["chat"]).encode(), 1, 0),
              "splits/old": Stored(b'{"arms":[{"pool":"a","weight":1}]}', 1, 0)}
    changes = {c.key: c for c in plan("f.yaml", desired, stored, prune=True)}
    assert changes["splits/chat"].action == "unchanged"
    assert changes["splits/old"].action == "deleted"
    with pytest.raises(ConfigFileError) as info:
        parse_document("f.yaml", {"pools": {"a": {"models": ["chat"]}},
                                  "splits": {"chat": {"arms": [{"pool": "a", "weight": 1,
                                                                "wait": 2}]}}})
    assert "splits/chat: unknown arms[0] field(s) wait" in str(info.value)
    with pytest.raises(ConfigFileError) as info:
        plan("f.yaml", parse_document("f.yaml", {"splits": {"chat": {"arms": [
            {"pool": "zz", "weight": 1}]}}}), {}, prune=False)
    assert "splits/chat: arms[0].pool 'zz' is neither in this file nor in etcd" in str(info.value)


def test_the_leader_counts_peer_control_planes_sessions() -> None:
    from control_plane.store.split_slots import PeerSessions

    own = {"a": ["h-00000000000003e8"]}  # slot 0 (0x3e8 = 1000)
    sessions = PeerSessions(lambda pool, now, ttl: own.get(pool, []), peers=1)
    assert sessions("a", 0.0, 600.0) is None  # the peer has not answered: unknown
    sessions.seen("http://peer:9101", {"a": ["h-00000000000003e9"]})
    assert sessions("a", 0.0, 600.0) == ["h-00000000000003e8", "h-00000000000003e9"]
    sessions.seen("http://peer:9101", None)  # unreachable again: unknown again
    assert sessions("a", 0.0, 600.0) is None
    alone = PeerSessions(lambda pool, now, ttl: own.get(pool, []), peers=0)
    assert alone("a", 0.0, 600.0) == ["h-00000000000003e8"]
