"""Statuses -> EDS health, weight and ring points (pure), and what the builders make of it."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from envoy.config.core.v3 import health_check_pb2
from hypothesis import given
from hypothesis import strategies as st

from control_plane.config.model import Endpoint, Pool, Status, WarmState, Warmup
from control_plane.translate.warmth import (
    DEFAULT_CAPACITY_FACTOR,
    RING_POINTS_PER_WEIGHT,
    SPILL_SCALE,
    Route,
    capacity_factor,
    cold_spill_scale,
    effective_state,
    is_stale,
    pool_routes,
    ring_size,
)
from tests.unit.builders import build_cluster, build_load_assignment

HEALTHY, DEGRADED, UNHEALTHY = (health_check_pb2.HEALTHY, health_check_pb2.DEGRADED,
                                health_check_pb2.UNHEALTHY)
WARM, COLD, DOWN = WarmState.WARM, WarmState.COLD, WarmState.DOWN
NOW = 1_700_000_000.0
POOL = Pool(name="p", models=("m",))


def endpoints(*weights: int) -> dict[str, Endpoint]:
    return {f"e{i}": Endpoint("p", f"e{i}", f"10.0.0.{i + 1}", 80, w)
            for i, w in enumerate(weights)}


def statuses(*states: WarmState | None, age: float = 1.0) -> dict[str, Status]:
    return {f"e{i}": Status("p", f"e{i}", s, None, NOW - age)
            for i, s in enumerate(states) if s is not None}


def routes(states: list[WarmState | None], weights: list[int] | None = None,
           pool: Pool = POOL) -> dict[str, Route]:
    return pool_routes(pool, endpoints(*(weights or [1] * len(states))), statuses(*states), NOW)


def envoy_points(routes: dict[str, Route]) -> dict[str, Fraction]:
    """Ring points Envoy's ring hash gives each host in the ring, computed as Envoy does
    (ring_hash_lb.cc) with exact arithmetic, for minimum_ring_size = ring_size(routes)."""
    ring = {k: r for k, r in routes.items() if r.health == HEALTHY}
    total = sum(r.weight for r in ring.values())
    min_norm = Fraction(min(r.weight for r in ring.values()), total)
    scale = math.ceil(min_norm * max(1024, ring_size(routes))) / min_norm
    return {k: scale * Fraction(r.weight, total) for k, r in ring.items()}


# --- staleness ------------------------------------------------------------------------------


def test_missing_or_stale_status_counts_as_warm() -> None:
    assert effective_state(None, 10.0, NOW) is WARM
    fresh = Status("p", "e", DOWN, None, NOW - 30)
    stale = Status("p", "e", DOWN, None, NOW - 30.01)
    assert effective_state(fresh, 10.0, NOW) is DOWN
    assert effective_state(stale, 10.0, NOW) is WARM
    assert not is_stale(Status("p", "e", COLD, None, NOW - 59), 20.0, NOW)
    assert is_stale(Status("p", "e", COLD, None, NOW - 61), 20.0, NOW)


# --- the regimes ------------------------------------------------------------------------------


def test_all_warm_is_the_plain_configuration() -> None:
    r = routes([WARM, None, WARM], [1, 2, 3])
    assert [(x.health, x.weight, x.ring_points) for x in r.values()] == [
        (HEALTHY, 1, 1024), (HEALTHY, 2, 2048), (HEALTHY, 3, 3072)]
    assert ring_size(r) == 6144


def test_one_cold_of_three_leaves_the_ring_while_the_warm_two_have_room() -> None:
    r = routes([WARM, WARM, COLD])
    assert r["e2"] == Route(COLD, DEGRADED, 1, 0)
    assert r["e0"] == r["e1"] == Route(WARM, HEALTHY, 1, 1024)
    assert ring_size(r) == 2048


def test_two_cold_of_three_take_the_spill_beyond_the_balance_factor() -> None:
    r = routes([WARM, COLD, COLD])
    # The warm host takes 1.5 x its fair third = half of the ring; the cold ones the rest.
    assert r["e0"] == Route(WARM, HEALTHY, 16, 1024)
    assert r["e1"] == r["e2"] == Route(COLD, HEALTHY, 8, 512)
    assert ring_size(r) == 2048


def test_all_cold_serves_like_all_warm() -> None:
    cold, warm = routes([COLD, COLD, COLD]), routes([WARM, WARM, WARM])
    assert [(x.health, x.weight, x.ring_points) for x in cold.values()] == \
        [(x.health, x.weight, x.ring_points) for x in warm.values()]
    assert all(x.state is COLD for x in cold.values())


def test_down_is_unhealthy_and_out_of_the_capacity_count() -> None:
    r = routes([WARM, COLD, DOWN])
    assert r["e2"] == Route(DOWN, UNHEALTHY, 1, 0)
    # Warm 1 of 2 routable: it may take 75 %; the cold host gets weight 6 against 16.
    assert r["e0"].weight == 16 and r["e1"].weight == 6
    assert Fraction(16, 22) <= Fraction(3, 4)
    assert routes([DOWN, DOWN])["e0"].health == UNHEALTHY
    assert ring_size(routes([DOWN, DOWN])) == 0


def test_down_and_cold_only_still_serves_on_the_cold() -> None:
    r = routes([COLD, DOWN, COLD])
    assert r["e0"] == r["e2"] == Route(COLD, HEALTHY, 1, 1024)


def test_balance_factor_sets_the_warm_room() -> None:
    loose = Pool(name="p", models=("m",), hash_balance_factor=200)
    r = routes([WARM, COLD, COLD], pool=loose)
    assert r["e1"].weight == 4  # warm share 16 / 24 = 2/3 = 2 x its fair third
    off = Pool(name="p", models=("m",), hash_balance_factor=0)
    assert capacity_factor(off) == DEFAULT_CAPACITY_FACTOR
    assert routes([WARM, COLD, COLD], pool=off) == routes([WARM, COLD, COLD])


def test_configured_weights_count_in_the_capacity() -> None:
    # A warm host of weight 3 among 4: 1.5 x 3/4 >= 1: the cold one leaves the ring.
    assert routes([WARM, COLD], [3, 1])["e1"].health == DEGRADED
    # A warm host of weight 1 against a cold one of 3: spill, the cold keeps most.
    r = routes([WARM, COLD], [1, 3])
    assert r["e0"] == Route(WARM, HEALTHY, 16, 1024)
    assert r["e1"].health == HEALTHY and r["e1"].ring_points == 64 * r["e1"].weight


def test_stale_cold_status_is_warm_again() -> None:
    r = pool_routes(POOL, endpoints(1, 1, 1), statuses(WARM, COLD, COLD, age=31), NOW)
    assert all(x.health == HEALTHY and x.weight == 1 for x in r.values())


@pytest.mark.parametrize(("warm", "cold", "factor", "scale"), [
    (0, 3, Fraction(3, 2), None), (3, 0, Fraction(3, 2), None), (2, 1, Fraction(3, 2), None),
    (1, 2, Fraction(3, 2), 8), (1, 3, Fraction(3, 2), 9), (2, 2, Fraction(3, 2), 6),
    (1, 2, Fraction(2), 4), (1, 100, Fraction(3, 2), 11), (1, 1, Fraction(1), 16),
])
def test_cold_spill_scale(warm: int, cold: int, factor: Fraction, scale: int | None) -> None:
    assert cold_spill_scale(warm, cold, factor) == scale


# --- properties ------------------------------------------------------------------------------

state_lists = st.lists(st.sampled_from([WARM, COLD, DOWN, None]), min_size=1, max_size=8)


@given(state_lists, st.data(), st.sampled_from([0, 100, 125, 150, 200, 400]))
def test_routing_properties(states: list[WarmState | None], data: st.DataObject,
                            factor: int) -> None:
    weights = data.draw(st.lists(st.integers(1, 128), min_size=len(states),
                                 max_size=len(states)))
    pool = Pool(name="p", models=("m",), hash_balance_factor=factor)
    r = routes(states, weights, pool)
    eff = [WARM if s is None else s for s in states]
    up = [i for i, s in enumerate(eff) if s is not DOWN]
    warm_w = sum(weights[i] for i in up if eff[i] is WARM)
    total = sum(weights[i] for i in up)
    f = capacity_factor(pool)
    for i, s in enumerate(eff):
        route = r[f"e{i}"]
        assert route.state is s
        assert (route.health == UNHEALTHY) is (s is DOWN)
        assert (route.health == DEGRADED) is (s is COLD and warm_w > 0 and f * warm_w >= total)
        if s is WARM or (s is COLD and warm_w == 0):
            # Every host at full weight keeps exactly 1024 points per configured weight.
            assert route.ring_points == RING_POINTS_PER_WEIGHT * weights[i]
    if up:
        assert any(x.in_ring for x in r.values()), "never blackhole a pool with a live host"
        in_ring = {k: x for k, x in r.items() if x.in_ring}
        assert envoy_points(r) == {k: x.ring_points for k, x in in_ring.items()}
        ring_warm = sum(x.ring_points for x in in_ring.values() if x.state is WARM)
        if warm_w and warm_w < total and f * warm_w < total:
            # Spill: the warm share of the ring is at most f x the warm fair share.
            assert Fraction(ring_warm, ring_size(r)) <= f * Fraction(warm_w, total)
            assert all(1 <= x.weight // weights[int(k[1:])] <= SPILL_SCALE
                       for k, x in in_ring.items())


@given(state_lists, state_lists)
def test_only_changed_hosts_change_points(before: list[WarmState | None],
                                          after: list[WarmState | None]) -> None:
    n = min(len(before), len(after))
    a, b = routes(before[:n]), routes(after[:n])
    for i in range(n):
        if a[f"e{i}"].state is WARM and b[f"e{i}"].state is WARM:
            assert a[f"e{i}"].ring_points == b[f"e{i}"].ring_points == 1024


# --- the builders ------------------------------------------------------------------------------


def _lb(assignment: object) -> dict[str, object]:
    return {e.endpoint.hostname: e for loc in assignment.endpoints  # type: ignore[attr-defined]
            for e in loc.lb_endpoints}


def test_load_assignment_carries_health_and_weight() -> None:
    eps = endpoints(1, 1, 1)
    resolved = {k: e.address for k, e in eps.items()}
    assignment = build_load_assignment(POOL, eps, resolved, statuses(WARM, COLD, COLD), NOW)
    by_id = _lb(assignment)
    assert [(by_id[k].health_status, by_id[k].load_balancing_weight.value)  # type: ignore
            for k in ("e0", "e1", "e2")] == [(HEALTHY, 16), (HEALTHY, 8), (HEALTHY, 8)]
    assert by_id["e1"].metadata.filter_metadata["envoy.lb"]["hash_key"] == "e1"  # type: ignore


def test_unresolved_endpoints_count_neither_in_eds_nor_in_the_ring() -> None:
    eps = endpoints(1, 1, 1)
    resolved = {"e0": "10.0.0.1", "e1": "10.0.0.2"}
    sts = statuses(WARM, COLD, COLD)
    by_id = _lb(build_load_assignment(POOL, eps, resolved, sts, NOW))
    # Among e0 (warm) and e1 (cold): 1.5 x 1/2 < 1, so e1 takes spill (weight 6 of 16).
    assert set(by_id) == {"e0", "e1"}
    cluster = build_cluster(POOL, eps, sts, NOW, resolved=resolved)
    assert cluster.ring_hash_lb_config.minimum_ring_size.value == 1024 + 64 * 6


@pytest.mark.parametrize(("states", "ring"), [
    ([WARM, WARM, WARM], 3072), ([WARM, WARM, COLD], 2048), ([WARM, COLD, COLD], 2048),
    ([COLD, COLD, COLD], 3072), ([WARM, WARM, DOWN], 2048), ([DOWN, DOWN, DOWN], 1024),
])
def test_cluster_ring_follows_the_hosts_in_the_ring(states: list[WarmState], ring: int) -> None:
    cluster = build_cluster(POOL, endpoints(1, 1, 1), statuses(*states), NOW)
    assert cluster.ring_hash_lb_config.minimum_ring_size.value == ring


def test_cluster_without_statuses_counts_every_endpoint_warm() -> None:
    eps = endpoints(1, 2)
    assert build_cluster(POOL, eps).ring_hash_lb_config.minimum_ring_size.value == 3072


def test_stale_threshold_follows_the_pool_interval() -> None:
    pool = Pool(name="p", models=("m",), warmup=Warmup(interval_s=20.0))
    r = pool_routes(pool, endpoints(1, 1), statuses(DOWN, WARM, age=59), NOW)
    assert r["e0"].health == UNHEALTHY
    r = pool_routes(pool, endpoints(1, 1), statuses(DOWN, WARM, age=61), NOW)
    assert r["e0"].health == HEALTHY
