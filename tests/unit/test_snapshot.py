"""translate(), check_consistent() and SnapshotBuilder versioning."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import extension_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from google.protobuf.message import Message

from control_plane.config.model import Config, Endpoint, GatewaySettings, Pool, Status, WarmState
from control_plane.translate.listeners import build_lua_filter_config
from control_plane.translate.lua import LUA_DIR_ENV, lua_asset
from control_plane.translate.resources import translate
from control_plane.xds import types
from control_plane.xds.snapshot import (
    InconsistentSnapshot,
    Snapshot,
    SnapshotBuilder,
    check_consistent,
    content_hash,
)

NOW = 1_700_000_000.0
SETTINGS = GatewaySettings()

CHAT = Pool(name="chat", models=("llama",))
CODE = Pool(name="code", models=("coder",), lb="maglev")


def make_config(**changes: Any) -> Config:
    base: dict[str, Any] = {
        "pools": {"chat": CHAT, "code": CODE},
        "endpoints": {
            "chat": {
                "gpu-0": Endpoint("chat", "gpu-0", "10.0.0.1", 8000),
                "gpu-1": Endpoint("chat", "gpu-1", "gpu-1.internal", 8000),
            },
            "code": {"c-0": Endpoint("code", "c-0", "10.0.1.1", 9000)},
            "orphan": {"x": Endpoint("orphan", "x", "10.0.9.9", 1)},
        },
        "statuses": {},
    }
    base.update(changes)
    return Config(**base)


RESOLVED = {("chat", "gpu-0"): "10.0.0.1", ("chat", "gpu-1"): "10.0.0.2",
            ("code", "c-0"): "10.0.1.1"}


def resources(config: Config | None = None, resolved: dict[tuple[str, str], str] | None = None,
              settings: GatewaySettings = SETTINGS) -> dict[str, dict[str, Message]]:
    return translate(config or make_config(), RESOLVED if resolved is None else resolved,
                     settings, NOW)


# --- translate ------------------------------------------------------------------------------


def test_translate_names() -> None:
    out = resources()
    assert list(out) == [types.CLUSTER, types.ENDPOINT, types.LISTENER,
                         types.EXTENSION_CONFIG, types.ROUTE]
    assert list(out[types.CLUSTER]) == ["chat", "code"]
    assert all(c.name == n for n, c in out[types.CLUSTER].items())  # type: ignore[attr-defined]
    assert list(out[types.ENDPOINT]) == ["chat", "code"]  # endpoints of no pool: no resource
    assert all(
        a.cluster_name == n for n, a in out[types.ENDPOINT].items()  # type: ignore[attr-defined]
    )
    assert list(out[types.LISTENER]) == ["hotpath"]
    assert list(out[types.ROUTE]) == ["hotpath"]
    assert list(out[types.EXTENSION_CONFIG]) == ["hotpath-lua"]
    assert isinstance(out[types.CLUSTER]["chat"], cluster_pb2.Cluster)
    assert isinstance(out[types.ENDPOINT]["chat"], endpoint_pb2.ClusterLoadAssignment)
    assert isinstance(out[types.LISTENER]["hotpath"], listener_pb2.Listener)
    assert isinstance(out[types.ROUTE]["hotpath"], route_pb2.RouteConfiguration)
    check_consistent(out)


def test_translate_uses_resolved_ips_per_pool() -> None:
    out = resources(resolved={("chat", "gpu-0"): "10.0.0.1", ("code", "gpu-1"): "10.9.9.9"})
    chat = out[types.ENDPOINT]["chat"]
    hosts = [e.endpoint.hostname for e in chat.endpoints[0].lb_endpoints]  # type: ignore[attr-defined]
    assert hosts == ["gpu-0"]  # ("code", "gpu-1") must not leak into pool chat


def test_translate_empty_config_is_consistent() -> None:
    out = translate(Config(), {}, SETTINGS, NOW)
    assert out[types.CLUSTER] == {} and out[types.ENDPOINT] == {}
    assert list(out[types.LISTENER]) == ["hotpath"] and list(out[types.ROUTE]) == ["hotpath"]
    check_consistent(out)


def test_translate_pool_without_endpoints_has_empty_assignment() -> None:
    out = resources(make_config(endpoints={}))
    assert set(out[types.ENDPOINT]) == {"chat", "code"}
    assert len(out[types.ENDPOINT]["chat"].endpoints) == 0  # type: ignore[attr-defined]


# --- check_consistent -----------------------------------------------------------------------


def without(out: dict[str, dict[str, Message]], type_url: str, name: str
            ) -> dict[str, dict[str, Message]]:
    changed = {t: dict(r) for t, r in out.items()}
    del changed[type_url][name]
    return changed


def test_missing_eds_refused() -> None:
    with pytest.raises(InconsistentSnapshot, match=r"EDS resources \['code'\] do not match "
                       r"EDS clusters \['chat', 'code'\]"):
        check_consistent(without(resources(), types.ENDPOINT, "chat"))


def test_extra_eds_refused() -> None:
    with pytest.raises(InconsistentSnapshot, match="EDS"):
        check_consistent(without(resources(), types.CLUSTER, "code"))


def test_missing_ecds_refused() -> None:
    # The listener's Lua filter names its ECDS resource: without it the listener would warm
    # for 15 s, then answer every request with the filter's fail-closed default (503).
    with pytest.raises(InconsistentSnapshot, match=r"ECDS resources \[\] do not match "
                       r"listener filters \['hotpath-lua'\]"):
        check_consistent(without(resources(), types.EXTENSION_CONFIG, "hotpath-lua"))


def test_extra_ecds_refused() -> None:
    out = resources()
    out[types.EXTENSION_CONFIG]["other"] = extension_pb2.TypedExtensionConfig(name="other")
    with pytest.raises(InconsistentSnapshot, match="ECDS"):
        check_consistent(out)


def test_ecds_of_another_type_refused() -> None:
    # Envoy would NACK it: the filter accepts only the Lua config type.
    out = resources()
    wrong = extension_pb2.TypedExtensionConfig(name="hotpath-lua")
    wrong.typed_config.Pack(router_pb2.Router())
    out[types.EXTENSION_CONFIG] = {"hotpath-lua": wrong}
    with pytest.raises(InconsistentSnapshot, match="Router, not one of"):
        check_consistent(out)


def test_ecds_without_listener_refused() -> None:
    out = without(resources(), types.LISTENER, "hotpath")
    out[types.ROUTE] = {}
    with pytest.raises(InconsistentSnapshot, match="ECDS"):
        check_consistent(out)


def test_lua_change_moves_only_ecds(monkeypatch: pytest.MonkeyPatch,
                                    tmp_path: Path) -> None:
    builder = SnapshotBuilder()
    first = builder.update(resources(), 10)
    assert first is not None
    for name in ("hotpath.lua", "filter.lua"):
        (tmp_path / name).write_text(lua_asset(name) + "\n-- v2\n")
    monkeypatch.setenv(LUA_DIR_ENV, str(tmp_path))
    build_lua_filter_config.cache_clear()
    try:
        second = builder.update(translate(make_config(), RESOLVED, SETTINGS, NOW), 11)
    finally:
        build_lua_filter_config.cache_clear()
    assert second is not None
    assert {t for t in types.PUSH_ORDER if first.version(t) != second.version(t)} == {
        types.EXTENSION_CONFIG}
    assert second.version(types.EXTENSION_CONFIG).startswith("11-")


def test_static_cluster_needs_no_eds() -> None:
    out = without(resources(), types.CLUSTER, "code")
    out[types.ENDPOINT] = {"chat": out[types.ENDPOINT]["chat"]}
    out[types.CLUSTER]["static"] = cluster_pb2.Cluster(name="static",
                                                       type=cluster_pb2.Cluster.STATIC)
    check_consistent(out)


def test_missing_rds_refused() -> None:
    with pytest.raises(InconsistentSnapshot, match=r"RDS resources \[\] do not match "
                       r"listener routes \['hotpath'\]"):
        check_consistent(without(resources(), types.ROUTE, "hotpath"))


def test_extra_rds_refused() -> None:
    out = resources()
    out[types.ROUTE]["spare"] = route_pb2.RouteConfiguration(name="spare")
    with pytest.raises(InconsistentSnapshot, match="RDS"):
        check_consistent(out)


def test_rds_without_listener_refused() -> None:
    with pytest.raises(InconsistentSnapshot, match="RDS"):
        check_consistent(without(resources(), types.LISTENER, "hotpath"))


# --- SnapshotBuilder ------------------------------------------------------------------------


def test_first_update_versions_every_type_with_revision_prefix() -> None:
    builder = SnapshotBuilder()
    out = resources()
    snapshot = builder.update(out, 42)
    assert snapshot is not None
    assert builder.current is snapshot
    assert list(snapshot.versions) == list(types.PUSH_ORDER)
    for type_url in types.PUSH_ORDER:
        version = snapshot.version(type_url)
        assert version == f"42-{content_hash(out[type_url])[:8]}"
    assert snapshot.resources == out


def test_nothing_changed_returns_none() -> None:
    builder = SnapshotBuilder()
    first = builder.update(resources(), 1)
    assert builder.update(resources(), 2) is None
    assert builder.update(copy.deepcopy(resources()), 3) is None
    assert builder.current is first


def _changed_types(before: Snapshot, after: Snapshot) -> set[str]:
    return {t for t in types.PUSH_ORDER if before.version(t) != after.version(t)}


def _short(type_urls: set[str]) -> set[str]:
    return {types.SHORT_NAMES[t] for t in type_urls}


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        # A host moves: only its address in EDS.
        (lambda: resources(resolved={**RESOLVED, ("chat", "gpu-0"): "10.0.0.9"}), {"EDS"}),
        # The prober marks a host down: EDS health, and the ring size (CDS) so that the
        # other hosts keep their points and their sessions.
        (lambda: resources(make_config(statuses={"chat": {
            "gpu-0": Status("chat", "gpu-0", WarmState.DOWN, None, NOW)}})), {"CDS", "EDS"}),
        # The lb policy of a pool: CDS only.
        (lambda: resources(make_config(pools={"chat": dataclasses.replace(CHAT, lb="maglev"),
                                               "code": CODE})), {"CDS"}),
        # A new session header: route metadata (RDS) only; the listener never changes.
        (lambda: resources(make_config(pools={
            "chat": dataclasses.replace(CHAT, session_headers=("x-conv",)), "code": CODE})),
         {"RDS"}),
        # A new model: routes (RDS) only.
        (lambda: resources(make_config(pools={
            "chat": dataclasses.replace(CHAT, models=("llama", "llama-2")), "code": CODE})),
         {"RDS"}),
        # A weight: ring size (CDS) and endpoint weight (EDS).
        (lambda: resources(make_config(endpoints={
            "chat": {"gpu-0": Endpoint("chat", "gpu-0", "10.0.0.1", 8000, weight=2),
                     "gpu-1": Endpoint("chat", "gpu-1", "gpu-1.internal", 8000)}})),
         {"CDS", "EDS"}),
        # Route idle timeout from the settings: RDS and the HCM's stream idle timeout.
        (lambda: resources(settings=GatewaySettings(idle_timeout_s=60)), {"LDS", "RDS"}),
    ],
)
def test_only_changed_types_get_a_new_version(change: Any, expected: set[str]) -> None:
    builder = SnapshotBuilder()
    before = builder.update(resources(), 10)
    assert before is not None
    after = builder.update(change(), 11)
    assert after is not None
    changed = _changed_types(before, after)
    assert _short(changed) == expected
    for type_url in types.PUSH_ORDER:
        prefix = "11-" if type_url in changed else "10-"
        assert after.version(type_url).startswith(prefix)


def test_content_back_to_earlier_value_gets_a_new_version() -> None:
    builder = SnapshotBuilder()
    first = builder.update(resources(), 1)
    moved = builder.update(resources(resolved={**RESOLVED, ("chat", "gpu-0"): "10.0.0.9"}), 2)
    back = builder.update(resources(), 3)
    assert first and moved and back
    versions = [s.version(types.ENDPOINT) for s in (first, moved, back)]
    assert len(set(versions)) == 3
    assert versions[2].startswith("3-")


def test_same_revision_different_content_differs() -> None:
    builder = SnapshotBuilder()
    first = builder.update(resources(), 5)
    stale = builder.update(resources(make_config(statuses={"chat": {
        "gpu-0": Status("chat", "gpu-0", WarmState.DOWN, None, NOW)}})), 5)
    assert first and stale
    assert first.version(types.ENDPOINT) != stale.version(types.ENDPOINT)
    assert stale.version(types.ENDPOINT).startswith("5-")


def test_inconsistent_update_refused_and_nothing_changes() -> None:
    builder = SnapshotBuilder()
    first = builder.update(resources(), 1)
    with pytest.raises(InconsistentSnapshot):
        builder.update(without(resources(), types.ENDPOINT, "chat"), 2)
    assert builder.current is first
    assert builder.update(resources(), 3) is None  # hashes untouched by the refused update


def test_restart_at_later_revision_never_goes_backwards() -> None:
    old = SnapshotBuilder().update(resources(), 7)
    new = SnapshotBuilder().update(resources(), 9)
    assert old and new
    for type_url in types.PUSH_ORDER:
        assert int(new.version(type_url).split("-")[0]) > int(old.version(type_url).split("-")[0])


def test_content_hash_independent_of_insertion_order() -> None:
    out = resources()
    clusters = out[types.CLUSTER]
    assert content_hash(clusters) == content_hash(dict(reversed(list(clusters.items()))))
    assert content_hash({}) != content_hash(clusters)


def test_snapshot_named_and_version() -> None:
    out = resources()
    snapshot = Snapshot(resources=out, versions={types.CLUSTER: "1-a"})
    assert snapshot.version(types.CLUSTER) == "1-a"
    assert snapshot.version(types.ROUTE) == ""
    assert [c.name for c in snapshot.named(types.CLUSTER, None)] == ["chat", "code"]  # type: ignore[attr-defined]
    named = snapshot.named(types.ENDPOINT, frozenset({"code", "missing"}))
    assert [a.cluster_name for a in named] == ["code"]  # type: ignore[attr-defined]
    assert snapshot.named(types.ENDPOINT, frozenset()) == []
    assert Snapshot().named(types.CLUSTER, None) == []


# --- per-resource versions and the memoized Translator --------------------------------------


def test_a_change_in_one_pool_keeps_the_other_pools_resource_versions() -> None:
    builder = SnapshotBuilder()
    first = builder.update(resources(), 1)
    moved = builder.update(resources(resolved={**RESOLVED, ("chat", "gpu-0"): "10.0.0.9"}), 2)
    assert first and moved
    assert moved.resource_version(types.ENDPOINT, "code") == first.resource_version(
        types.ENDPOINT, "code")
    assert str(moved.resource_version(types.ENDPOINT, "chat")).startswith("2-")
    assert moved.resource_version(types.ENDPOINT, "gone") is None


def test_translator_rebuilds_only_the_pools_whose_inputs_changed() -> None:
    from control_plane.translate.resources import Translator

    translator = Translator()

    def run(config: Config) -> dict[str, dict[str, Message]]:
        return translator.translate(config, lambda e: RESOLVED.get((e.pool, e.id)), SETTINGS,
                                    NOW)

    first = run(make_config())
    assert translator.rebuilt_pools == 2
    again = run(make_config())  # equal inputs, other objects: nothing rebuilt
    assert translator.rebuilt_pools == 2
    assert again[types.CLUSTER]["chat"] is first[types.CLUSTER]["chat"]
    assert again[types.ROUTE]["hotpath"] is first[types.ROUTE]["hotpath"]
    changed = make_config(endpoints={
        "chat": {"gpu-0": Endpoint("chat", "gpu-0", "10.0.0.1", 8000, weight=2)},
        "code": {"c-0": Endpoint("code", "c-0", "10.0.1.1", 9000)}})
    out = run(changed)
    assert translator.rebuilt_pools == 3
    assert out[types.ENDPOINT]["code"] is first[types.ENDPOINT]["code"]
    assert out == translate(changed, RESOLVED, SETTINGS, NOW)


def test_translator_says_when_a_status_goes_stale_and_rebuilds_then() -> None:
    from control_plane.translate.resources import Translator
    from control_plane.translate.warmth import stale_after_s

    translator = Translator()
    status = Status("chat", "gpu-0", WarmState.DOWN, None, NOW)
    config = make_config(statuses={"chat": {"gpu-0": status}})
    before = translator.translate(config, lambda e: RESOLVED.get((e.pool, e.id)), SETTINGS, NOW)
    deadline = NOW + stale_after_s(CHAT.warmup.interval_s)
    assert translator.next_change() == deadline
    same = translator.translate(config, lambda e: RESOLVED.get((e.pool, e.id)), SETTINGS,
                                deadline)
    assert same[types.ENDPOINT]["chat"] is before[types.ENDPOINT]["chat"]
    stale = translator.translate(config, lambda e: RESOLVED.get((e.pool, e.id)), SETTINGS,
                                 deadline + 0.01)
    assert stale[types.ENDPOINT]["chat"] != before[types.ENDPOINT]["chat"]  # down -> warm
    assert translator.next_change() == float("inf")
