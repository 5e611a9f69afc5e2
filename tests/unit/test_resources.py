"""Resource builders: golden JSON for representative pools, plus targeted asserts.

Goldens live in tests/unit/golden/. ``UPDATE_GOLDEN=1 pytest tests/unit/test_resources.py``
rewrites them; review the diff before committing. The listener golden replaces the Lua
filter's inline source by a placeholder (the source is checked separately), so Lua edits do
not churn it.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import health_check_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.lua.v3 import lua_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.load_balancing_policies.ring_hash.v3 import ring_hash_pb2
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2
from envoy.type.matcher.v3 import http_inputs_pb2
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from control_plane.config import limits
from control_plane.config.model import (
    Config,
    Endpoint,
    GatewaySettings,
    Pool,
    Status,
    WarmState,
    Warmup,
)
from control_plane.contract import LISTENER_NAME, ROUTE_CONFIG_NAME
from control_plane.translate.clusters import (
    MAX_RING_SIZE,
    gives_every_host_its_points,
    minimum_ring_size,
    ring_settings,
)
from control_plane.translate.listeners import (
    LUA_FILTER_CONFIG_NAME,
    LUA_TYPE_URL,
    build_listener,
    build_lua_filter_config,
)
from control_plane.translate.lua import LUA_DIR_ENV, lua_asset, render_lua_source
from control_plane.translate.resources import Translator
from control_plane.translate.routes import (
    MODEL_HEADER,
    SESSION_HEADER,
    build_route_configuration,
)
from control_plane.translate.warmth import Route, pool_routes
from control_plane.xds import types
from control_plane.xds.snapshot import SnapshotBuilder
from tests.unit.builders import build_cluster, build_load_assignment
from tests.unit.test_warmth_routing import envoy_points

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"
LUA_PLACEHOLDER = "<inline lua source: see test_listener_lua_source>"
NOW = 1_700_000_000.0

CHAT = Pool(name="chat", models=("llama-3-8b", "llama-3-8b-instruct"))
CODE = Pool(name="code", models=("qwen-coder",), lb="maglev",
            session_headers=("x-conversation",),
            hash_balance_factor=0)
EMBED = Pool(name="embed", models=("bge-small",), lb="round_robin")

CHAT_ENDPOINTS = {
    "gpu-0": Endpoint("chat", "gpu-0", "10.0.0.1", 8000, weight=1),
    "gpu-1": Endpoint("chat", "gpu-1", "10.0.0.2", 8001, weight=2),
    "gpu-2": Endpoint("chat", "gpu-2", "gpu-2.internal", 8000, weight=3),
}
CHAT_RESOLVED = {"gpu-0": "10.0.0.1", "gpu-1": "10.0.0.2", "gpu-2": "10.0.0.3"}
CHAT_STATUSES = {
    "gpu-0": Status("chat", "gpu-0", WarmState.WARM, 35.0, NOW - 5),
    "gpu-1": Status("chat", "gpu-1", WarmState.DOWN, None, NOW - 5),
}


def as_dict(message: Message) -> dict[str, Any]:
    return MessageToDict(message, preserving_proto_field_name=True)


def check_golden(name: str, actual: dict[str, Any]) -> None:
    path = GOLDEN / f"{name}.json"
    text = json.dumps(actual, indent=2, sort_keys=True) + "\n"
    if UPDATE:
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(text)
        return
    assert path.exists(), f"{path} missing: run with UPDATE_GOLDEN=1 to create it"
    assert actual == json.loads(path.read_text()), (
        f"{path.name} differs; if the change is intended, rerun with UPDATE_GOLDEN=1"
    )


def _replace_lua(value: Any) -> Any:
    if isinstance(value, dict):
        if value.get("@type") == "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua":
            value["default_source_code"]["inline_string"] = LUA_PLACEHOLDER
        for item in value.values():
            _replace_lua(item)
    elif isinstance(value, list):
        for item in value:
            _replace_lua(item)
    return value


def endpoint_dicts(count: int, weight: int = 1) -> dict[str, Endpoint]:
    return {f"e{i}": Endpoint("p", f"e{i}", f"10.0.0.{i + 1}", 80, weight) for i in range(count)}


def hcm_of(listener: listener_pb2.Listener) -> hcm_pb2.HttpConnectionManager:
    hcm = hcm_pb2.HttpConnectionManager()
    assert listener.filter_chains[0].filters[0].typed_config.Unpack(hcm)
    return hcm


# --- goldens --------------------------------------------------------------------------------


def test_golden_cluster_ring_hash() -> None:
    check_golden("cluster_ring_hash", as_dict(build_cluster(CHAT, CHAT_ENDPOINTS)))


def test_golden_cluster_maglev() -> None:
    endpoints = {"m0": Endpoint("code", "m0", "10.1.0.1", 9000)}
    check_golden("cluster_maglev", as_dict(build_cluster(CODE, endpoints)))


def test_golden_cluster_round_robin() -> None:
    check_golden("cluster_round_robin", as_dict(build_cluster(EMBED, endpoint_dicts(2))))


def test_golden_load_assignment_ring_hash() -> None:
    assignment = build_load_assignment(CHAT, CHAT_ENDPOINTS, CHAT_RESOLVED, CHAT_STATUSES, NOW)
    check_golden("load_assignment_ring_hash", as_dict(assignment))


def test_golden_route_configuration_two_pools() -> None:
    # Given out of order: routes come out sorted by pool name.
    routes = build_route_configuration([CODE, CHAT], GatewaySettings())
    check_golden("routes_two_pools", as_dict(routes))


def test_golden_listener() -> None:
    listener = build_listener(GatewaySettings())
    check_golden("listener", _replace_lua(as_dict(listener)))


# --- clusters -------------------------------------------------------------------------------


def test_cluster_named_as_pool_and_fed_by_ads_eds() -> None:
    cluster = build_cluster(CHAT, CHAT_ENDPOINTS)
    assert cluster.name == "chat"
    assert cluster.type == cluster_pb2.Cluster.EDS
    assert cluster.eds_cluster_config.eds_config.HasField("ads")


DEFAULT_POINTS = limits.RING_POINTS_PER_WEIGHT_DEFAULT


@pytest.mark.parametrize(
    ("weights", "ring"),
    [([], 128), ([1], 128), ([1, 1, 1], 384), ([1, 2, 3], 768), ([128, 128], 32768)],
)
def test_ring_size_is_points_per_weight_times_total_weight(weights: list[int],
                                                           ring: int) -> None:
    endpoints = {f"e{i}": Endpoint("p", f"e{i}", "10.0.0.1", 80, w) for i, w in enumerate(weights)}
    cluster = build_cluster(CHAT, endpoints)
    assert ring_settings(cluster).minimum_ring_size.value == ring
    assert ring == max(1, sum(weights)) * DEFAULT_POINTS
    assert ring_settings(cluster).maximum_ring_size.value == MAX_RING_SIZE
    assert ring_settings(cluster).hash_function == ring_hash_pb2.RingHash.XX_HASH


@pytest.mark.parametrize("points", [1, 16, 100, 256, 1024, 4096])
def test_ring_size_follows_the_pools_points_per_weight(points: int) -> None:
    pool = Pool(name="p", models=("m",), ring_points_per_weight=points)
    for n in (1, 2, 3):
        eps = endpoint_dicts(n, weight=2)
        size = ring_settings(build_cluster(pool, eps)).minimum_ring_size.value
        routes = pool_routes(pool, eps, {}, NOW)
        # Every host gets exactly its 2 x points (Envoy's arithmetic, exact).
        assert set(envoy_points(routes, size).values()) == {2 * points}
        if points > 1:
            # Too few hosts for a window of a whole weight unit: the sum of the points.
            assert size == n * 2 * points
    # One point per weight unit and a smallest host of 2: any size up to the sum will do
    # (ceil(2/6 x size) = 2 for size 4..6), and the middle one leaves room both ways.
    one = Pool(name="p", models=("m",), ring_points_per_weight=1)
    assert ring_settings(build_cluster(one, endpoint_dicts(3, weight=2))
                         ).minimum_ring_size.value == 5


def test_ring_points_per_host_constant_when_a_host_leaves() -> None:
    three = ring_settings(build_cluster(CHAT, endpoint_dicts(3))).minimum_ring_size.value
    two = ring_settings(build_cluster(CHAT, endpoint_dicts(2))).minimum_ring_size.value
    assert three / 3 == two / 2 == DEFAULT_POINTS


def test_ring_size_clamped_at_envoy_maximum_and_warned_once(
        caplog: pytest.LogCaptureFixture) -> None:
    big = Pool(name="big", models=("m",), ring_points_per_weight=4096)
    # 17 x 128 x 4096 = 8,912,896 > 8 Mi.
    with caplog.at_level("WARNING", logger="hotpath.translate"):
        for _ in range(3):
            cluster = build_cluster(big, endpoint_dicts(17, weight=128))
            assert ring_settings(cluster).minimum_ring_size.value == MAX_RING_SIZE
            assert ring_settings(cluster).maximum_ring_size.value == MAX_RING_SIZE
    warned = [r.getMessage() for r in caplog.records if "pools/big" in r.getMessage()]
    assert len(warned) == 1, warned
    assert "ring needs 8912896 points (4096 per weight unit)" in warned[0]
    assert "lower ring_points_per_weight" in warned[0]
    # Back under the maximum: exact again, and a later clamp warns again.
    caplog.clear()
    with caplog.at_level("WARNING", logger="hotpath.translate"):
        fits = build_cluster(big, endpoint_dicts(16, weight=128))
        assert ring_settings(fits).minimum_ring_size.value == MAX_RING_SIZE  # exactly
        small = build_cluster(big, endpoint_dicts(2, weight=128))
        assert ring_settings(small).minimum_ring_size.value == 2 * 128 * 4096
        build_cluster(big, endpoint_dicts(17, weight=128))
    assert len([r for r in caplog.records if "pools/big" in r.getMessage()]) == 1


def test_default_fits_65536_weight_units_unclamped(caplog: pytest.LogCaptureFixture) -> None:
    # 8 Mi / 128 = 65,536 weight units: e.g. 16,384 hosts of weight 4 keep the guarantee.
    assert MAX_RING_SIZE // DEFAULT_POINTS == 65536
    pool = Pool(name="wide", models=("m",))
    eps = endpoint_dicts(512, weight=128)
    with caplog.at_level("WARNING", logger="hotpath.translate"):
        size = ring_settings(build_cluster(pool, eps)).minimum_ring_size.value
    assert not caplog.records  # not clamped
    # The sum is exactly the maximum; the size leaves room for 2 weight units either way.
    assert size == MAX_RING_SIZE - 2 * DEFAULT_POINTS
    assert set(envoy_points(pool_routes(pool, eps, {}, NOW), size).values()) == {128 * 128}


# --- the minimum ring size's window and hysteresis ------------------------------------------

WIDE = Pool(name="wide", models=("m",))  # 128 points per weight unit


def wide_routes(weights: Mapping[str, int] | None = None, count: int = 1000
                ) -> dict[str, Route]:
    """A pool of ``count`` hosts of weight 1 but for ``weights``."""
    eps = {f"e{i}": Endpoint("wide", f"e{i}", "10.0.0.1", 80, 1) for i in range(count)}
    for eid, weight in (weights or {}).items():
        eps[eid] = Endpoint("wide", eid, "10.0.0.1", 80, weight)
    return pool_routes(WIDE, eps, {}, NOW)


def test_ring_size_window_is_every_size_that_gives_the_smallest_host_its_points() -> None:
    routes = wide_routes()  # sum 128,000 points, the smallest host 128
    # ceil(size / 1000) == 128 for size in (127,000, 128,000].
    assert [gives_every_host_its_points(routes, size)
            for size in (127_000, 127_001, 128_000, 128_001)] == [False, True, True, False]
    for previous in (127_001, 127_500, 128_000):
        assert minimum_ring_size(WIDE, routes, previous) == previous
    fresh = minimum_ring_size(WIDE, routes)
    for outside in (None, 127_000, 128_001, 0, MAX_RING_SIZE + 1):
        assert minimum_ring_size(WIDE, routes, outside) == fresh
    # In the middle of the window, in whole weight units: R - D with D x 255 < R.
    assert fresh == 128_000 - 3 * 128
    assert set(envoy_points(routes, fresh).values()) == {128}


def test_ring_size_kept_across_weight_changes_both_ways() -> None:
    size = minimum_ring_size(WIDE, wide_routes())
    # The fresh size serves total weights 997..1004 (3 weight units down, 4 up).
    for weights in ({"e0": 4}, {"e0": 4, "e1": 2}, {"e0": 2, "e1": 2, "e2": 2, "e3": 2}):
        routes = wide_routes(weights, count=1000)
        assert minimum_ring_size(WIDE, routes, size) == size, weights
    for count in (997, 998, 999):
        assert minimum_ring_size(WIDE, wide_routes(count=count), size) == size, count
    # Past the margin the size moves, and then gives every host its points again.
    for routes in (wide_routes(count=996), wide_routes({"e0": 4, "e1": 3})):
        moved = minimum_ring_size(WIDE, routes, size)
        assert moved != size and gives_every_host_its_points(routes, moved)
    # The smallest host changing its weight changes the window entirely.
    heavier = wide_routes({f"e{i}": 2 for i in range(1000)})
    assert minimum_ring_size(WIDE, heavier, size) != size


def test_ring_size_of_an_empty_or_clamped_ring() -> None:
    eps = endpoint_dicts(2)
    down = {e: Status("p", e, WarmState.DOWN, None, NOW) for e in eps}
    empty = pool_routes(CHAT, eps, down, NOW)
    assert minimum_ring_size(CHAT, empty) == DEFAULT_POINTS  # one weight unit's worth
    assert minimum_ring_size(CHAT, empty, 4242) == 4242  # nothing to size: kept
    big = Pool(name="big", models=("m",), ring_points_per_weight=4096)
    clamped = pool_routes(big, endpoint_dicts(17, weight=128), {}, NOW)
    assert minimum_ring_size(big, clamped, 12_345) == MAX_RING_SIZE


def test_translator_keeps_the_cluster_while_weights_churn() -> None:
    """Weight churn on the Translator: 100 weight changes (1-4) on a 1,000-host pool of
    weights 1-4. Where the minimum ring size is kept the cluster is the very same object
    and the CDS version stays (EDS only); every published size gives every host its
    points."""
    translator = Translator()
    builder = SnapshotBuilder()
    rng = random.Random(7)
    eps = {f"e{i}": Endpoint("wide", f"e{i}", "10.0.0.1", 80, rng.randint(1, 4))
           for i in range(1000)}

    def publish(revision: int) -> tuple[Message, str, str]:
        config = Config(pools={"wide": WIDE}, endpoints={"wide": dict(eps)})
        out = translator.translate(config, lambda e: e.address, GatewaySettings(), NOW)
        snapshot = builder.update(out, revision)
        assert snapshot is not None
        cluster = out[types.CLUSTER]["wide"]
        size = ring_settings(cluster).minimum_ring_size.value  # type: ignore[arg-type]
        assert gives_every_host_its_points(translator.routes("wide") or {}, size)
        return cluster, snapshot.version(types.CLUSTER), snapshot.version(types.ENDPOINT)

    cluster, cds, eds = publish(1)
    changes = clusters = 0
    for revision in range(2, 102):
        eid = rng.choice(sorted(eps))
        weight = rng.choice([w for w in (1, 2, 3, 4) if w != eps[eid].weight])
        eps[eid] = Endpoint("wide", eid, "10.0.0.1", 80, weight)
        new_cluster, new_cds, new_eds = publish(revision)
        changes += 1
        assert new_eds != eds
        if new_cluster is not cluster:
            clusters += 1
            assert new_cds != cds
        else:
            assert new_cds == cds
        cluster, cds, eds = new_cluster, new_cds, new_eds
    # Every change used to change the cluster (each moves the total weight); the size now
    # has room for about 9 weight units either way (total ~2,500 / 255).
    assert clusters < changes / 10, clusters


@pytest.mark.parametrize(
    ("lb", "policy"),
    [("ring_hash", cluster_pb2.Cluster.RING_HASH), ("maglev", cluster_pb2.Cluster.MAGLEV),
     ("round_robin", cluster_pb2.Cluster.ROUND_ROBIN),
     ("least_request", cluster_pb2.Cluster.LEAST_REQUEST)],
)
def test_lb_policy_and_panic_threshold_zero(lb: str, policy: int) -> None:
    cluster = build_cluster(Pool(name="p", models=("m",), lb=lb), endpoint_dicts(2))
    if lb == "ring_hash":
        # Ring hash behind the override-host policy (pins): no lb_policy enum.
        assert not cluster.HasField("ring_hash_lb_config")
        assert ring_settings(cluster) is not None
    else:
        assert cluster.lb_policy == policy
        assert ring_settings(cluster) is None
    assert cluster.common_lb_config.HasField("healthy_panic_threshold")
    assert cluster.common_lb_config.healthy_panic_threshold.value == 0.0


@pytest.mark.parametrize("lb", ["ring_hash", "maglev"])
def test_hash_balance_factor_set_only_when_non_zero(lb: str) -> None:
    def factor(cluster: cluster_pb2.Cluster) -> int | None:
        ring = ring_settings(cluster)
        config = (ring if ring is not None else cluster.common_lb_config)
        if not config.HasField("consistent_hashing_lb_config"):
            return None
        return int(config.consistent_hashing_lb_config.hash_balance_factor.value)

    on = build_cluster(Pool(name="p", models=("m",), lb=lb, hash_balance_factor=125), {})
    assert factor(on) == 125
    off = build_cluster(Pool(name="p", models=("m",), lb=lb, hash_balance_factor=0), {})
    assert factor(off) is None


@pytest.mark.parametrize("lb", ["round_robin", "least_request"])
def test_hash_balance_factor_not_set_without_hashing(lb: str) -> None:
    cluster = build_cluster(Pool(name="p", models=("m",), lb=lb, hash_balance_factor=150), {})
    assert not cluster.common_lb_config.HasField("consistent_hashing_lb_config")


@pytest.mark.parametrize("lb", ["round_robin", "least_request"])
def test_outlier_detection_ejects_at_most_half(lb: str) -> None:
    cluster = build_cluster(Pool(name="p", models=("m",), lb=lb), endpoint_dicts(3))
    assert cluster.outlier_detection.max_ejection_percent.value == 50


@pytest.mark.parametrize("lb", ["ring_hash", "maglev"])
def test_no_outlier_detection_for_consistent_hashing(lb: str) -> None:
    # An ejection rebuilds the ring and moves survivors' sessions (measured: 55 of 395);
    # retries carry a dead host's sessions instead, and the prober's "down" removes it.
    cluster = build_cluster(Pool(name="p", models=("m",), lb=lb), endpoint_dicts(3))
    assert not cluster.HasField("outlier_detection")


def test_circuit_breaker_allows_a_retry_per_request() -> None:
    (threshold,) = build_cluster(CHAT, CHAT_ENDPOINTS).circuit_breakers.thresholds
    assert threshold.max_retries.value == 1000


# --- endpoints ------------------------------------------------------------------------------


def lb_endpoints(assignment: Any) -> dict[str, Any]:
    return {
        e.endpoint.hostname: e
        for locality in assignment.endpoints
        for e in locality.lb_endpoints
    }


def test_one_lb_endpoint_per_endpoint_with_id_as_hostname_and_hash_key() -> None:
    assignment = build_load_assignment(CHAT, CHAT_ENDPOINTS, CHAT_RESOLVED, {}, NOW)
    assert assignment.cluster_name == "chat"
    by_id = lb_endpoints(assignment)
    assert list(by_id) == ["gpu-0", "gpu-1", "gpu-2"]
    for endpoint_id, lb_endpoint in by_id.items():
        assert lb_endpoint.metadata.filter_metadata["envoy.lb"]["hash_key"] == endpoint_id
        address = lb_endpoint.endpoint.address.socket_address
        assert address.address == CHAT_RESOLVED[endpoint_id]
        assert address.port_value == CHAT_ENDPOINTS[endpoint_id].port
        assert lb_endpoint.load_balancing_weight.value == CHAT_ENDPOINTS[endpoint_id].weight
        assert lb_endpoint.health_status == health_check_pb2.HEALTHY


@pytest.mark.parametrize(
    ("state", "age", "health"),
    [
        (WarmState.WARM, 1, health_check_pb2.HEALTHY),
        (WarmState.COLD, 1, health_check_pb2.HEALTHY),
        (WarmState.DOWN, 1, health_check_pb2.UNHEALTHY),
        (WarmState.DOWN, 29, health_check_pb2.UNHEALTHY),
        # Stale (older than max(30 s, 3 probe intervals)): counts as warm, never blackholes.
        (WarmState.DOWN, 31, health_check_pb2.HEALTHY),
        (WarmState.DOWN, 3600, health_check_pb2.HEALTHY),
        (WarmState.COLD, 3600, health_check_pb2.HEALTHY),
    ],
)
def test_status_to_health(state: WarmState, age: float, health: int) -> None:
    endpoints = {"gpu-0": CHAT_ENDPOINTS["gpu-0"]}
    statuses = {"gpu-0": Status("chat", "gpu-0", state, None, NOW - age)}
    assignment = build_load_assignment(CHAT, endpoints, {"gpu-0": "10.0.0.1"}, statuses, NOW)
    assert lb_endpoints(assignment)["gpu-0"].health_status == health


def test_stale_threshold_follows_probe_interval() -> None:
    pool = Pool(name="chat", models=("m",), warmup=Warmup(interval_s=20.0))
    endpoints = {"gpu-0": CHAT_ENDPOINTS["gpu-0"]}
    resolved = {"gpu-0": "10.0.0.1"}

    def health(age: float) -> int:
        statuses = {"gpu-0": Status("chat", "gpu-0", WarmState.DOWN, None, NOW - age)}
        assignment = build_load_assignment(pool, endpoints, resolved, statuses, NOW)
        return int(lb_endpoints(assignment)["gpu-0"].health_status)

    assert health(59) == health_check_pb2.UNHEALTHY
    assert health(61) == health_check_pb2.HEALTHY


def test_unresolved_hostname_endpoints_left_out() -> None:
    resolved = {"gpu-0": "10.0.0.1", "gpu-1": "10.0.0.2"}  # gpu-2.internal not resolved yet
    assignment = build_load_assignment(CHAT, CHAT_ENDPOINTS, resolved, {}, NOW)
    assert list(lb_endpoints(assignment)) == ["gpu-0", "gpu-1"]


def test_no_endpoint_gives_empty_assignment() -> None:
    assignment = build_load_assignment(CHAT, {}, {}, {}, NOW)
    assert assignment.cluster_name == "chat"
    assert len(assignment.endpoints) == 0
    nothing_resolved = build_load_assignment(CHAT, CHAT_ENDPOINTS, {}, {}, NOW)
    assert len(nothing_resolved.endpoints) == 0


# --- routes ---------------------------------------------------------------------------------


def model_routes(config: route_pb2.RouteConfiguration) -> dict[str, Any]:
    """model -> its Route, from the virtual host's matcher tree."""
    (vhost,) = config.virtual_hosts
    tree = vhost.matcher.matcher_tree
    assert tree.input.typed_config.Is(http_inputs_pb2.HttpRequestHeaderMatchInput.DESCRIPTOR)
    header_input = http_inputs_pb2.HttpRequestHeaderMatchInput()
    assert tree.input.typed_config.Unpack(header_input)
    assert header_input.header_name == MODEL_HEADER == "x-hotpath-model"
    found = {}
    for model, on_match in tree.exact_match_map.map.items():
        route = route_components_pb2.Route()
        assert on_match.action.typed_config.Unpack(route)
        found[model] = route
    return found


def fallback_routes(config: route_pb2.RouteConfiguration) -> list[Any]:
    routes = route_components_pb2.RouteList()
    assert config.virtual_hosts[0].matcher.on_no_match.action.typed_config.Unpack(routes)
    return list(routes.routes)


def test_model_matcher_tree_then_404s() -> None:
    config = build_route_configuration([CODE, CHAT], GatewaySettings())
    assert config.name == ROUTE_CONFIG_NAME == "hotpath"
    (vhost,) = config.virtual_hosts
    assert list(vhost.domains) == ["*"]
    # Envoy rejects a virtual host with both a matcher and routes.
    assert not vhost.routes
    routes = model_routes(config)
    assert {model: r.name for model, r in routes.items()} == {
        "llama-3-8b": "chat/llama-3-8b", "llama-3-8b-instruct": "chat/llama-3-8b-instruct",
        "qwen-coder": "code/qwen-coder"}
    for route in routes.values():
        assert route.match.prefix == "/"
        assert route.route.cluster == route.name.split("/", 1)[0]
        (hash_policy,) = route.route.hash_policy
        assert hash_policy.header.header_name == SESSION_HEADER == "x-hotpath-session"
    fallback = fallback_routes(config)
    assert [r.name for r in fallback] == ["models", "unknown-model", "no-route"]
    assert fallback[1].direct_response.status == 404
    assert fallback[1].match.headers[0].present_match
    assert fallback[2].direct_response.status == 404
    assert list(config.response_headers_to_remove) == [MODEL_HEADER, SESSION_HEADER]


def test_route_without_pools_still_answers_404() -> None:
    # Envoy refuses an empty exact_match_map: no matcher then, the fallback routes only.
    config = build_route_configuration([], GatewaySettings())
    (vhost,) = config.virtual_hosts
    assert not vhost.HasField("matcher")
    assert [r.name for r in vhost.routes] == ["models", "unknown-model", "no-route"]
    assert vhost.HasField("retry_policy")


def test_route_timeout_zero_and_idle_timeout_from_settings() -> None:
    config = build_route_configuration([CHAT], GatewaySettings(idle_timeout_s=120.5))
    action = model_routes(config)["llama-3-8b"].route
    # Explicitly set: an absent timeout means Envoy's 15 s default.
    assert action.HasField("timeout")
    assert action.timeout.ToMilliseconds() == 0
    assert action.idle_timeout.ToMilliseconds() == 120_500


def test_retry_policy_on_the_virtual_host_previous_hosts_and_retry_on() -> None:
    config = build_route_configuration([CHAT], GatewaySettings())
    # One copy on the virtual host (it applies to matcher routes), none per route.
    assert not any(r.route.HasField("retry_policy") for r in model_routes(config).values())
    policy = config.virtual_hosts[0].retry_policy
    retry_on = policy.retry_on.split(",")
    assert "connect-failure" in retry_on
    assert "reset" in retry_on
    assert "5xx" not in retry_on  # a generation that started must not run twice
    assert policy.num_retries.value >= 1
    (predicate,) = policy.retry_host_predicate
    assert predicate.name == "envoy.retry_host_predicates.previous_hosts"
    assert predicate.typed_config.Is(previous_hosts_pb2.PreviousHostsPredicate.DESCRIPTOR)
    assert policy.host_selection_retry_max_attempts >= 1
    assert policy.retry_back_off.base_interval.ToMilliseconds() == 2
    assert policy.retry_back_off.max_interval.ToMilliseconds() == 100


def test_direct_response_limit_follows_the_models_body() -> None:
    small = build_route_configuration([CHAT], GatewaySettings())
    assert small.max_direct_response_body_size_bytes.value == 4096  # Envoy's default
    many = Pool(name="big", models=tuple(f"model-{i:05d}" for i in range(5000)))
    config = build_route_configuration([many], GatewaySettings())
    body = fallback_routes(config)[0].direct_response.body.inline_string
    assert len(body) > 300_000  # ~67 bytes per model here, well over 4096
    assert config.max_direct_response_body_size_bytes.value == len(body.encode())
    assert len(model_routes(config)) == 5000


def test_route_configuration_is_deterministic() -> None:
    first = build_route_configuration([CODE, CHAT], GatewaySettings())
    second = build_route_configuration([CHAT, CODE], GatewaySettings())
    assert first.SerializeToString(deterministic=True) == second.SerializeToString(
        deterministic=True)


# --- listener -------------------------------------------------------------------------------


def test_listener_shape() -> None:
    settings = GatewaySettings(listen_address="0.0.0.0", listen_port=10001,
                               max_body_bytes=1 << 20)
    listener = build_listener(settings)
    assert listener.name == LISTENER_NAME == "hotpath"
    assert listener.address.socket_address.address == "0.0.0.0"
    assert listener.address.socket_address.port_value == 10001
    assert listener.per_connection_buffer_limit_bytes.value == 1 << 20
    hcm = hcm_of(listener)
    assert hcm.rds.route_config_name == ROUTE_CONFIG_NAME
    assert hcm.rds.config_source.HasField("ads")
    assert [f.name for f in hcm.http_filters] == [LUA_FILTER_CONFIG_NAME,
                                                  "envoy.filters.http.router"]
    assert hcm.HasField("request_timeout") and hcm.request_timeout.ToMilliseconds() == 0
    assert hcm.stream_idle_timeout.ToMilliseconds() == 900_000


def test_listener_lua_source() -> None:
    # The source travels over ECDS, as the TypedExtensionConfig the listener's filter names.
    settings = GatewaySettings(max_body_bytes=4096)
    config = build_lua_filter_config(settings)
    assert config.name == LUA_FILTER_CONFIG_NAME == "hotpath-lua"
    assert config.typed_config.type_url == LUA_TYPE_URL
    lua = lua_pb2.Lua()
    assert config.typed_config.Unpack(lua)
    assert lua.default_source_code.inline_string == render_lua_source(4096)
    assert build_lua_filter_config(settings) is config  # cached: no re-serialization


def test_listener_discovers_the_lua_filter_over_ads_ecds() -> None:
    lua_filter = hcm_of(build_listener(GatewaySettings())).http_filters[0]
    assert not lua_filter.HasField("typed_config")
    discovery = lua_filter.config_discovery
    assert discovery.config_source.HasField("ads")
    assert discovery.config_source.resource_api_version == 2  # V3
    assert list(discovery.type_urls) == [LUA_TYPE_URL]
    # Until ECDS answers the listener warms; after the initial fetch timeout it serves this
    # fail-closed default (a 503 that says why), never requests without the filter.
    assert not discovery.apply_default_config_without_warming
    default = lua_pb2.Lua()
    assert discovery.default_config.Unpack(default)
    assert "503" in default.default_source_code.inline_string
    assert "filter_not_loaded" in default.default_source_code.inline_string


def test_listener_does_not_change_with_the_lua_source(monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    # A new filter version is an ECDS update: the listener (and every open stream) stays.
    before = build_listener(GatewaySettings(max_body_bytes=4096))
    old_source = build_lua_filter_config(GatewaySettings(max_body_bytes=4096))
    for name in ("hotpath.lua", "filter.lua"):
        (tmp_path / name).write_text(lua_asset(name) + "\n-- patched\n")
    monkeypatch.setenv(LUA_DIR_ENV, str(tmp_path))
    build_lua_filter_config.cache_clear()
    try:
        after = build_listener(GatewaySettings(max_body_bytes=4096))
        new_source = build_lua_filter_config(GatewaySettings(max_body_bytes=4096))
    finally:
        build_lua_filter_config.cache_clear()
    assert after.SerializeToString(deterministic=True) == before.SerializeToString(
        deterministic=True)
    assert new_source != old_source
    lua = lua_pb2.Lua()
    assert new_source.typed_config.Unpack(lua)
    assert "-- patched" in lua.default_source_code.inline_string


def test_listener_does_not_depend_on_pools() -> None:
    # Replacing the listener drains every connection, cutting long generations: pool
    # changes must reach Envoy through RDS (route metadata) and CDS/EDS only.
    assert build_listener(GatewaySettings()) == build_listener(GatewaySettings())


def test_model_routes_carry_pool_and_session_header_for_the_lua_filter() -> None:
    routes = model_routes(build_route_configuration([CHAT, CODE], GatewaySettings()))
    meta = routes["qwen-coder"].metadata.filter_metadata["envoy.filters.http.lua"]
    assert dict(meta) == {"pool": "code", "session_header": "x-conversation",
                          "session_headers": ["x-conversation"]}


def test_models_route_lists_every_model_sorted() -> None:
    models = fallback_routes(build_route_configuration([CODE, CHAT], GatewaySettings()))[0]
    assert models.match.path == "/v1/models"
    assert models.direct_response.status == 200
    doc = json.loads(models.direct_response.body.inline_string)
    assert [(m["id"], m["owned_by"]) for m in doc["data"]] == [
        ("llama-3-8b", "chat"), ("llama-3-8b-instruct", "chat"), ("qwen-coder", "code")]
    assert [(h.header.key, h.header.value) for h in models.response_headers_to_add] == [
        ("content-type", "application/json")]


def test_local_replies_are_openai_shaped_for_contract_statuses() -> None:
    hcm = hcm_of(build_listener(GatewaySettings()))
    by_status: Mapping[int, Any] = {
        mapper.filter.and_filter.filters[0].status_code_filter.comparison.value.default_value:
            mapper
        for mapper in hcm.local_reply_config.mappers
    }
    assert {400, 404, 413, 503, 504} <= set(by_status)
    for status, mapper in by_status.items():
        body = MessageToDict(mapper.body_format_override.json_format)
        assert set(body) == {"error"}, status
        assert set(body["error"]) == {"message", "type", "code"}, status
    assert "8388608 bytes" in MessageToDict(
        by_status[413].body_format_override.json_format)["error"]["message"]


def test_route_configuration_is_a_route_configuration() -> None:
    assert isinstance(build_route_configuration([CHAT], GatewaySettings()),
                      route_pb2.RouteConfiguration)
