"""ConfigState: last good value per key, rejections, deletes, one pool per model."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from control_plane.config.model import Config, Endpoint, Pool, Status, WarmState
from control_plane.config.state import ConfigState, Rejection
from control_plane.store.etcd import Backoff, decode_key


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
        message=f"{key}: unknown key (expected pools/<pool>, endpoints/<pool>/<id>, "
        "status/<pool>/<id>, drain/<pool>/<id>, splits/<model>, split-slots/<model> or "
        "pins/<pool>)",
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


# -- conflicting claims: the older pool key (create revision) keeps the model -------------

def test_younger_claim_refused_live_and_on_a_fresh_read_in_any_order() -> None:
    live = ConfigState()
    live.apply("pools/owner", raw({"models": ["llama"]}), 5, created=5)
    assert live.apply("pools/late", raw({"models": ["llama"]}), 9, created=9) is not None
    assert set(live.config().pools) == {"owner"}
    # A fresh read gets the keys in mod_revision order; owner was rewritten after late.
    fresh = ConfigState()
    fresh.apply("pools/late", raw({"models": ["llama"]}), 9, created=9)
    fresh.apply("pools/owner", raw({"models": ["llama"]}), 12, created=5)
    assert fresh.config() == live.config()
    assert set(fresh.rejected) == {"pools/late"}
    assert fresh.rejected["pools/late"] == (
        "pools/late: model 'llama' already belongs to pool 'owner' (a model belongs to one pool)")


def test_older_pool_edited_to_claim_a_younger_pools_model_wins() -> None:
    state = ConfigState()
    state.apply("pools/old", raw({"models": ["a"]}), 2, created=2)
    state.apply("pools/young", raw({"models": ["b"]}), 3, created=3)
    assert state.apply("pools/old", raw({"models": ["a", "b"]}), 4) is None
    assert state.config().pools["old"].models == ("a", "b")
    assert "young" not in state.config().pools, "its last good value conflicts: out"
    assert state.rejected["pools/young"].startswith(
        "pools/young: model 'b' already belongs to pool 'old'")
    # The older pool lets go: the younger comes back at once.
    state.apply("pools/old", raw({"models": ["a"]}), 5)
    assert state.config().pools["young"].models == ("b",)
    assert state.rejected == {}


def test_younger_pool_falls_back_to_an_earlier_value_that_does_not_conflict() -> None:
    state = ConfigState()
    state.apply("pools/old", raw({"models": ["a"]}), 2, created=2)
    state.apply("pools/young", raw({"models": ["c"]}), 3, created=3)
    state.apply("pools/young", raw({"models": ["b"]}), 4)
    state.apply("pools/old", raw({"models": ["a", "b"]}), 5)
    assert state.config().pools["young"].models == ("c",)
    assert "pools/young" in state.rejected


def test_refused_value_then_conflict_keeps_the_last_accepted_value() -> None:
    """A refused value never makes the config smaller: young keeps [y]."""
    state = ConfigState()
    state.apply("pools/old", raw({"models": ["x"]}), 2, created=2)
    state.apply("pools/young", raw({"models": ["y"]}), 3, created=3)
    before = state.config()
    assert state.apply("pools/young", raw({"models": ["x"]}), 4) is not None
    assert state.apply("pools/young", b"{garbage", 5) is not None
    assert state.config() == before


def test_recreated_key_is_younger() -> None:
    state = ConfigState()
    state.apply("pools/a", raw({"models": ["m"]}), 2, created=2)
    state.apply("pools/b", raw({"models": ["n"]}), 3, created=3)
    state.apply("pools/a", None, 4)
    state.apply("pools/a", raw({"models": ["m", "n"]}), 5, created=5)
    assert state.config().pools["b"].models == ("n",)
    assert "a" not in state.config().pools


def test_history_restores_last_good_value_of_a_refused_key() -> None:
    state = ConfigState()
    state.apply("endpoints/p/e", b"not json", 30, created=1)
    assert state.wants_history("endpoints/p/e")
    assert state.remember("endpoints/p/e", b"[]", 29) is True  # refused: look further
    assert state.remember("endpoints/p/e", EP, 3) is False  # found: stop
    assert state.config().endpoints["p"]["e"].port == 8000
    assert "endpoints/p/e" in state.rejected


# -- any bytes are a value or one rejected key --------------------------------------------

HUGE = [
    b'{"models": ["m"], "hash_balance_factor": 1e400}',
    b'{"models": ["m"], "hash_balance_factor": 1' + b"0" * 5000 + b"}",
    b'{"address": "10.0.0.1", "port": 1' + b"0" * 4000 + b"}",
    b'{"state": "warm", "checked_at": 1' + b"0" * 4000 + b"}",
    b'{"state": "warm", "checked_at": -1e400}',
]


@pytest.mark.parametrize("depth", [1_000, 100_000])
@pytest.mark.parametrize("key", ["pools/p", "endpoints/p/e", "status/p/e"])
def test_deep_nesting_is_a_rejection(key: str, depth: int) -> None:
    state = ConfigState()
    for value in (b"[" * depth + b"]" * depth, b'{"a":' * depth + b"1" + b"}" * depth,
                  b'{"models": ' + b"[" * depth + b"]" * depth + b"}"):
        rejection = state.apply(key, value, 2)
        assert rejection is not None and rejection.key == key
        assert rejection.message.startswith(f"{key}: ")
    assert state.config() == Config()


@pytest.mark.parametrize("value", HUGE)
def test_huge_numbers_are_rejections(value: bytes) -> None:
    state = ConfigState()
    for key in ("pools/p", "endpoints/p/e", "status/p/e"):
        rejection = state.apply(key, value, 2)
        assert rejection is not None and rejection.message.startswith(f"{key}: ")
    assert state.config() == Config()


def test_refuse_records_one_rejected_key_until_deleted() -> None:
    state = ConfigState()
    state.refuse("pools/\\xff", b"{}", "pools/\\xff: key is not valid UTF-8", 3)
    assert state.rejected == {"pools/\\xff": "pools/\\xff: key is not valid UTF-8"}
    assert state.apply("pools/ok", POOL_A, 4) is None
    state.apply("pools/\\xff", None, 5)
    assert state.rejected == {}
    assert set(state.config().pools) == {"ok"}


@settings(max_examples=200, deadline=None)
@given(claims=st.lists(st.lists(st.sampled_from(["m1", "m2", "m3", "m4"]), min_size=1,
                                max_size=3, unique=True), min_size=1, max_size=6),
       data=st.data())
def test_fresh_read_in_any_order_settles_like_live(claims: list[list[str]],
                                                   data: st.DataObject) -> None:
    """Pools written one after another (each create is a revision) then re-read in any
    order, with later rewrites bumping mod_revision: the same pools win."""
    live = ConfigState()
    items = []
    for index, models in enumerate(claims):
        key, created = f"pools/p{index}", index + 1
        live.apply(key, raw({"models": models}), created, created=created)
        items.append((key, raw({"models": models}), created, created))
    # Rewrites of the same values (a re-apply) give later mod revisions in another order.
    order = data.draw(st.permutations(items))
    relist = [(key, value, 100 + position, created)
              for position, (key, value, _, created) in enumerate(order)]
    fresh = ConfigState()
    fresh.apply_all(data.draw(st.permutations(relist)))
    assert fresh.config() == live.config()
    assert fresh.rejected == live.rejected
    one_by_one = ConfigState()
    for key, value, revision, created in data.draw(st.permutations(relist)):
        one_by_one.apply(key, value, revision, created=created)
    assert one_by_one.config() == live.config()
    # The oldest claim of each model wins.
    owner: dict[str, str] = {}
    for index, models in enumerate(claims):
        if not set(models) & set(owner):
            owner.update({model: f"p{index}" for model in models})
    assert set(live.config().pools) == set(owner.values())


# -- etcd decoding helpers and the retry policy (pure parts of store/etcd.py) --------------

@pytest.mark.parametrize("raw_key", [b"/hp/pools/\xff", b"/hp/pools/\xc3(", b"/hp/\x80\x81",
                                     b"/hp/endpoints/p/\xed\xa0\x80"])
def test_decode_key_non_utf8_is_one_rejection_naming_the_bytes(raw_key: bytes) -> None:
    decoded = decode_key(raw_key, "/hp/")
    assert isinstance(decoded, Rejection)
    assert "\\x" in decoded.key and decoded.key.isprintable()
    assert decoded.message.startswith(f"{decoded.key}: key is not valid UTF-8")
    assert repr(raw_key[4:]) in decoded.message
    assert decode_key(raw_key, "/hp/") == decoded  # a delete of the same bytes maps to it


def test_decode_key_control_characters_rejected_escaped() -> None:
    decoded = decode_key(b"/hp/pools/a\nb", "/hp/")
    assert isinstance(decoded, Rejection)
    assert decoded.key == "pools/a\\nb"
    assert "\n" not in decoded.message


def test_decode_key_plain() -> None:
    assert decode_key(b"/hp/pools/chat", "/hp/") == "pools/chat"
    assert decode_key("/hp/pools/caf\u00e9".encode(), "/hp/") == "pools/caf\u00e9"


@given(st.binary(max_size=30))
def test_decode_key_never_raises(rest: bytes) -> None:
    decoded = decode_key(b"/hp/" + rest, "/hp/")
    if isinstance(decoded, Rejection):
        assert decoded.key.isprintable() and decoded.message.isprintable()
    else:
        assert decoded.encode() == rest


def test_backoff_bounded_to_a_second_with_jitter() -> None:
    values = iter([0.0, 1.0, 0.5] + [0.0] * 20)
    backoff = Backoff(rand=lambda: next(values))
    delays = [backoff.next_delay() for _ in range(8)]
    assert delays[:3] == pytest.approx([0.1, 0.1, 0.3])
    assert max(delays) == pytest.approx(1.0) and all(d <= 1.0 for d in delays)
    backoff.reset()
    assert backoff.next_delay() == pytest.approx(0.1)
    jittered = Backoff()
    assert all(0.5 <= jittered.next_delay() / step <= 1.0
               for step in (0.1, 0.2, 0.4, 0.8, 1.0, 1.0))
