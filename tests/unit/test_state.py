"""ConfigState: last good value per key, rejections, deletes, one pool per model."""

from __future__ import annotations

import json
from typing import Any

import pytest

from control_plane.config.model import Config, Endpoint, Pool, Status, WarmState
from control_plane.config.state import ConfigState, Rejection


def raw(value: Any) -> bytes:
    return json.dumps(value).encode()


POOL_A = raw({"models": ["llama"]})
POOL_A2 = raw({"models": ["llama"], "lb": "maglev"})
EP = raw({"address": "10.0.0.1", "port": 8000})
STATUS = raw({"state": "down", "checked_at": 100})


def test_empty_state() -> None:
    state = ConfigState()
    assert state.config() == Config()
    assert state.rejected == {}
    assert state.keys() == set()
    assert state.revision == 0


def test_good_values_accepted() -> None:
    state = ConfigState()
    assert state.apply("pools/chat", POOL_A, 3) is None
    assert state.apply("endpoints/chat/gpu-0", EP, 4) is None
    assert state.apply("status/chat/gpu-0", STATUS, 5) is None
    config = state.config()
    assert config.pools == {"chat": Pool(name="chat", models=("llama",))}
    assert config.endpoints == {
        "chat": {"gpu-0": Endpoint("chat", "gpu-0", "10.0.0.1", 8000)}}
    assert config.statuses == {
        "chat": {"gpu-0": Status("chat", "gpu-0", WarmState.DOWN, None, 100.0)}}
    assert state.revision == 5
    assert state.keys() == {"pools/chat", "endpoints/chat/gpu-0", "status/chat/gpu-0"}


def test_revision_never_goes_backwards() -> None:
    state = ConfigState()
    state.apply("pools/chat", POOL_A, 9)
    state.apply("pools/chat", POOL_A2, 4)
    assert state.revision == 9
    state.apply("pools/chat", None)
    assert state.revision == 9


def test_bad_value_keeps_last_good_value() -> None:
    state = ConfigState()
    state.apply("pools/chat", POOL_A2)
    bad = raw({"models": ["llama"], "hash_balance_factor": 50})
    rejection = state.apply("pools/chat", bad)
    message = "pools/chat: hash_balance_factor must be >= 100 (or 0 for off), got 50"
    assert rejection == Rejection(key="pools/chat", message=message)
    assert state.rejected == {"pools/chat": message}
    assert state.config().pools["chat"].lb == "maglev"  # last good value in force
    assert state.raw("pools/chat") == bad  # the latest value seen, refused or not


def test_bad_first_value_leaves_nothing() -> None:
    state = ConfigState()
    rejection = state.apply("endpoints/chat/gpu-0", raw({"address": "10.0.0.1"}))
    assert rejection is not None
    assert rejection.message == "endpoints/chat/gpu-0: port is required"
    assert state.config().endpoints == {}
    assert state.keys() == {"endpoints/chat/gpu-0"}


def test_rest_still_updates_while_a_key_is_rejected() -> None:
    state = ConfigState()
    state.apply("pools/chat", POOL_A)
    state.apply("pools/chat", b"{not json")
    assert state.apply("endpoints/chat/gpu-0", EP) is None
    assert state.apply("pools/code", raw({"models": ["coder"]})) is None
    config = state.config()
    assert set(config.pools) == {"chat", "code"}
    assert "gpu-0" in config.endpoints["chat"]
    assert set(state.rejected) == {"pools/chat"}


def test_good_value_clears_rejection() -> None:
    state = ConfigState()
    state.apply("pools/chat", POOL_A)
    assert state.apply("pools/chat", raw({"models": []})) is not None
    assert "pools/chat" in state.rejected
    assert state.apply("pools/chat", POOL_A2) is None
    assert state.rejected == {}
    assert state.config().pools["chat"].lb == "maglev"


def test_returned_rejected_dict_is_a_copy() -> None:
    state = ConfigState()
    state.apply("pools/chat", b"[]")
    state.rejected.clear()
    assert "pools/chat" in state.rejected


@pytest.mark.parametrize(
    ("key", "value"),
    [("pools/chat", POOL_A), ("endpoints/chat/gpu-0", EP), ("status/chat/gpu-0", STATUS)],
)
def test_delete_removes_value(key: str, value: bytes) -> None:
    state = ConfigState()
    state.apply(key, value)
    assert state.apply(key, None) is None
    assert state.config() == Config()
    assert state.keys() == set()
    assert state.raw(key) is None


def test_delete_of_rejected_key_clears_rejection_and_value() -> None:
    state = ConfigState()
    state.apply("pools/chat", POOL_A)
    state.apply("pools/chat", b"[]")
    assert state.apply("pools/chat", None) is None
    assert state.rejected == {}
    assert state.config().pools == {}


def test_delete_of_unknown_key_is_harmless() -> None:
    state = ConfigState()
    assert state.apply("pools/never-written", None) is None
    assert state.apply("garbage", None) is None
    assert state.rejected == {}


def test_delete_endpoint_leaves_others() -> None:
    state = ConfigState()
    state.apply("endpoints/chat/gpu-0", EP)
    state.apply("endpoints/chat/gpu-1", EP)
    state.apply("endpoints/chat/gpu-0", None)
    assert list(state.config().endpoints["chat"]) == ["gpu-1"]
    state.apply("endpoints/chat/gpu-1", None)
    assert state.config().endpoints == {}


def test_model_claimed_by_two_pools_second_rejected_naming_owner() -> None:
    state = ConfigState()
    assert state.apply("pools/chat", raw({"models": ["llama", "mistral"]})) is None
    rejection = state.apply("pools/other", raw({"models": ["qwen", "mistral"]}))
    assert rejection is not None
    assert rejection.message == (
        "pools/other: model 'mistral' already belongs to pool 'chat' "
        "(a model belongs to one pool)"
    )
    assert set(state.config().pools) == {"chat"}


def test_model_conflict_keeps_last_good_value_of_the_second_pool() -> None:
    state = ConfigState()
    state.apply("pools/chat", raw({"models": ["llama"]}))
    state.apply("pools/other", raw({"models": ["qwen"]}))
    assert state.apply("pools/other", raw({"models": ["qwen", "llama"]})) is not None
    assert state.config().pools["other"].models == ("qwen",)


def test_pool_may_keep_its_own_models_when_updated() -> None:
    state = ConfigState()
    state.apply("pools/chat", raw({"models": ["llama"]}))
    assert state.apply("pools/chat", raw({"models": ["llama", "extra"]})) is None
    assert state.config().pools["chat"].models == ("llama", "extra")


def test_model_free_again_after_owner_deleted_and_second_pool_rewritten() -> None:
    state = ConfigState()
    state.apply("pools/chat", raw({"models": ["llama"]}))
    state.apply("pools/other", raw({"models": ["llama"]}))
    state.apply("pools/chat", None)
    assert state.apply("pools/other", raw({"models": ["llama"]})) is None
    assert set(state.config().pools) == {"other"}


def test_refused_pool_takes_effect_when_owner_deleted() -> None:
    state = ConfigState()
    state.apply("pools/chat", raw({"models": ["llama"]}))
    state.apply("pools/other", raw({"models": ["llama"]}))
    state.apply("pools/chat", None)
    assert set(state.config().pools) == {"other"}
    assert state.rejected == {}


@pytest.mark.parametrize(
    "key",
    ["pools", "pools/chat/extra", "endpoints/chat", "endpoints/chat/gpu/0", "status/chat",
     "warmth/chat/gpu-0", "", "config"],
)
def test_unknown_key_shapes_rejected(key: str) -> None:
    state = ConfigState()
    rejection = state.apply(key, POOL_A)
    assert rejection == Rejection(
        key=key,
        message=f"{key}: unknown key (expected pools/<pool>, endpoints/<pool>/<id> or "
        "status/<pool>/<id>)",
    )
    assert state.config() == Config()


def test_key_name_validated() -> None:
    state = ConfigState()
    rejection = state.apply("pools/Chat", POOL_A)
    assert rejection is not None
    assert rejection.message.startswith("pools/Chat: pool name 'Chat' must match")
    rejection = state.apply("endpoints/chat/GPU", EP)
    assert rejection is not None
    assert rejection.message.startswith("endpoints/chat/GPU: endpoint id 'GPU' must match")


def test_config_ordering_is_sorted_regardless_of_arrival() -> None:
    state = ConfigState()
    for pool in ("zeta", "alpha", "mid"):
        state.apply(f"pools/{pool}", raw({"models": [f"model-{pool}"]}))
    for pool, eid in [("zeta", "b"), ("alpha", "z"), ("zeta", "a"), ("alpha", "a")]:
        state.apply(f"endpoints/{pool}/{eid}", EP)
        state.apply(f"status/{pool}/{eid}", STATUS)
    config = state.config()
    assert list(config.pools) == ["alpha", "mid", "zeta"]
    assert list(config.endpoints) == ["alpha", "zeta"]
    assert list(config.endpoints["alpha"]) == ["a", "z"]
    assert list(config.endpoints["zeta"]) == ["a", "b"]
    assert list(config.statuses) == ["alpha", "zeta"]
    assert list(config.statuses["zeta"]) == ["a", "b"]


def test_endpoints_of_unknown_pool_kept_in_config() -> None:
    state = ConfigState()
    state.apply("endpoints/later/gpu-0", EP)
    assert state.config().endpoints == {
        "later": {"gpu-0": Endpoint("later", "gpu-0", "10.0.0.1", 8000)}}
    assert state.config().pools == {}
