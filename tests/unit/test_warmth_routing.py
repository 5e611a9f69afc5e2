"""Statuses -> EDS health, weight and ring points (pure), and what the builders make of it."""

from __future__ import annotations

import math
from collections.abc import Mapping
from fractions import Fraction

import pytest
from envoy.config.core.v3 import health_check_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from control_plane.affinity.plan import ring_hosts
from control_plane.affinity.ring import Ring
from control_plane.config.model import Endpoint, Pool, Status, WarmState, Warmup
from control_plane.translate.clusters import (
    MAX_RING_SIZE,
    gives_every_host_its_points,
    minimum_ring_size,
    ring_settings,
)
from control_plane.translate.warmth import (
    DEFAULT_CAPACITY_FACTOR,
    SPILL_SCALE,
    STATUS_WRITE_BUDGET_PER_S,
    Route,
    capacity_factor,
    cold_spill_scale,
    effective_state,
    is_stale,
    pool_routes,
    ring_size,
    spill_step,
    stale_after_s,
)
from tests.unit.builders import build_cluster, build_load_assignment

HEALTHY, DEGRADED, UNHEALTHY = (health_check_pb2.HEALTHY, health_check_pb2.DEGRADED,
                                health_check_pb2.UNHEALTHY)
WARM, COLD, DOWN = WarmState.WARM, WarmState.COLD, WarmState.DOWN
NOW = 1_700_000_000.0
# The figures below are for 1024 points per weight (the pre-1.1 constant); the default and
# other values are covered by the properties and the ring_points_per_weight tests.
P = 1024
POOL = Pool(name="p", models=("m",), ring_points_per_weight=P)


def endpoints(*weights: int) -> dict[str, Endpoint]:
    return {f"e{i}": Endpoint("p", f"e{i}", f"10.0.0.{i + 1}", 80, w)
            for i, w in enumerate(weights)}


def statuses(*states: WarmState | None, age: float = 1.0) -> dict[str, Status]:
    return {f"e{i}": Status("p", f"e{i}", s, None, NOW - age)
            for i, s in enumerate(states) if s is not None}


def routes(states: list[WarmState | None], weights: list[int] | None = None,
           pool: Pool = POOL) -> dict[str, Route]:
    return pool_routes(pool, endpoints(*(weights or [1] * len(states))), statuses(*states), NOW)


def envoy_points(routes: Mapping[str, Route], size: int | None = None) -> dict[str, Fraction]:
    """Ring points Envoy's ring hash gives each host in the ring, computed as Envoy does
    (ring_hash_lb.cc) with exact arithmetic, for minimum_ring_size ``size`` (default
    ring_size(routes), the top of the window of sizes that give every host its points)."""
    ring = {k: r for k, r in routes.items() if r.health == HEALTHY}
    total = sum(r.weight for r in ring.values())
    min_norm = Fraction(min(r.weight for r in ring.values()), total)
    scale = math.ceil(min_norm * (ring_size(routes) if size is None else size)) / min_norm
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
    loose = Pool(name="p", models=("m",), hash_balance_factor=200, ring_points_per_weight=P)
    r = routes([WARM, COLD, COLD], pool=loose)
    assert r["e1"].weight == 4  # warm share 16 / 24 = 2/3 = 2 x its fair third
    off = Pool(name="p", models=("m",), hash_balance_factor=0, ring_points_per_weight=P)
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


POINTS = st.sampled_from([1, 3, 4, 8, 12, 16, 24, 100, 256, 1000, 1024, 4096])


@given(state_lists, st.data(), st.sampled_from([0, 100, 125, 150, 200, 400]), POINTS)
def test_routing_properties(states: list[WarmState | None], data: st.DataObject,
                            factor: int, per_weight: int) -> None:
    weights = data.draw(st.lists(st.integers(1, 128), min_size=len(states),
                                 max_size=len(states)))
    pool = Pool(name="p", models=("m",), hash_balance_factor=factor,
                ring_points_per_weight=per_weight)
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
            # Every host at full weight keeps exactly P points per configured weight.
            assert route.ring_points == per_weight * weights[i]
    if up:
        assert any(x.in_ring for x in r.values()), "never blackhole a pool with a live host"
        in_ring = {k: x for k, x in r.items() if x.in_ring}
        assert envoy_points(r) == {k: x.ring_points for k, x in in_ring.items()}
        # The size the cluster gets (with room both ways, translate/clusters.py) too.
        assert envoy_points(r, minimum_ring_size(pool, r)) == {
            k: x.ring_points for k, x in in_ring.items()}
        ring_warm = sum(x.ring_points for x in in_ring.values() if x.state is WARM)
        if warm_w and warm_w < total and f * warm_w < total:
            # Spill: the warm share of the ring is at most f x the warm fair share.
            assert Fraction(ring_warm, ring_size(r)) <= f * Fraction(warm_w, total)
            assert all(1 <= x.weight // weights[int(k[1:])] <= SPILL_SCALE
                       for k, x in in_ring.items())
            # Whole points, exactly weight x P x (spill scale / 16).
            assert all(x.ring_points * SPILL_SCALE == per_weight * x.weight
                       for x in in_ring.values())


# --- the minimum ring size: any size in the window, the same ring -----------------------------

SMALL_POINTS = st.sampled_from([1, 3, 16, 64, 100, 128])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([WARM, COLD, DOWN, None]), st.integers(1, 4)),
                min_size=1, max_size=6),
       st.lists(st.tuples(st.sampled_from([WARM, COLD, DOWN, None]), st.integers(1, 4)),
                min_size=1, max_size=6),
       SMALL_POINTS, st.integers(1, 4096))
def test_ring_size_with_any_history_gives_envoys_ring_of_the_points(
        first: list[tuple[WarmState | None, int]], then: list[tuple[WarmState | None, int]],
        per_weight: int, guess: int) -> None:
    """Whatever size was published before (one chosen for another state of the pool, or any
    number), the size chosen now makes Envoy build the ring of the hosts' ring points: in
    exact arithmetic every host gets exactly its points; with Envoy's doubles (ring.py)
    the ring is the very ring of a fresh choice (what affinity/plan.py pool_ring mirrors),
    and each host is at most one point off its points (the running sums' rounding, which
    does not depend on the size)."""
    pool = Pool(name="p", models=("m",), hash_balance_factor=0,
                ring_points_per_weight=per_weight)
    before = routes([s for s, _ in first], [w for _, w in first], pool)
    r = routes([s for s, _ in then], [w for _, w in then], pool)
    for previous in (minimum_ring_size(pool, before), guess):
        size = minimum_ring_size(pool, r, previous)
        assert 1 <= size <= MAX_RING_SIZE
        assert gives_every_host_its_points(r, size)
        if gives_every_host_its_points(r, previous):
            assert size == previous  # kept: the cluster does not change
        if not ring_size(r):
            continue  # an empty ring: nothing to size
        want = {k: x.ring_points for k, x in r.items() if x.in_ring}
        assert envoy_points(r, size) == want
        hosts = ring_hosts(r)
        counts = Ring(hosts, size, MAX_RING_SIZE).counts()
        assert counts == Ring(hosts, minimum_ring_size(pool, r), MAX_RING_SIZE).counts()
        assert all(abs(counts[k] - points) <= 1 for k, points in want.items()), (counts, want)


def test_the_windows_top_edge_can_fail_in_doubles_and_is_avoided() -> None:
    # 100 points per weight, weights 1 and 90: in doubles ceil(1/91 x 9100) is 101, so the
    # old choice (the sum, 9100) gave Envoy a ring of 101 points per weight unit, 1 % more
    # than the ring points; every size in the window gives the same ring in exact
    # arithmetic, not in Envoy's, and the top edge is the one at risk.
    pool = Pool(name="p", models=("m",), ring_points_per_weight=100)
    r = routes([WARM, WARM], [1, 90], pool)
    assert ring_size(r) == 9100
    hosts = ring_hosts(r)
    assert sum(Ring(hosts, 9100, MAX_RING_SIZE).counts().values()) == 91 * 101
    assert not gives_every_host_its_points(r, 9100)
    size = minimum_ring_size(pool, r)
    assert size == 9099
    # Exactly the points in total; the first host one over, the second one under: the
    # running sums' rounding in Envoy, the same for every size in the window.
    assert Ring(hosts, size, MAX_RING_SIZE).counts() == {"e0": 101, "e1": 8999}


@given(state_lists, state_lists, POINTS)
def test_only_changed_hosts_change_points(before: list[WarmState | None],
                                          after: list[WarmState | None],
                                          per_weight: int) -> None:
    n = min(len(before), len(after))
    pool = Pool(name="p", models=("m",), ring_points_per_weight=per_weight)
    a, b = routes(before[:n], pool=pool), routes(after[:n], pool=pool)
    for i in range(n):
        if a[f"e{i}"].state is WARM and b[f"e{i}"].state is WARM:
            assert a[f"e{i}"].ring_points == b[f"e{i}"].ring_points == per_weight


# --- ring_points_per_weight ---------------------------------------------------------------


def test_default_points_per_weight_is_the_documented_one() -> None:
    from control_plane.config import limits

    assert Pool(name="p", models=("m",)).ring_points_per_weight == 128
    assert limits.RING_POINTS_PER_WEIGHT_DEFAULT == 128
    r = pool_routes(Pool(name="p", models=("m",)), endpoints(1, 2), {}, NOW)
    assert [x.ring_points for x in r.values()] == [128, 256]


@pytest.mark.parametrize(("per_weight", "step"), [
    (1024, 1), (256, 1), (16, 1), (8, 2), (12, 4), (100, 4), (24, 2), (4, 4), (3, 16), (1, 16),
])
def test_spill_step_keeps_points_whole(per_weight: int, step: int) -> None:
    assert spill_step(per_weight) == step
    assert all(per_weight * c % SPILL_SCALE == 0 for c in range(step, SPILL_SCALE + 1, step))


def test_spill_with_points_not_a_multiple_of_16_rounds_the_cold_scale_up() -> None:
    # Warm 1 of 3 at factor 1.5: the exact scale is 8 (test above); with P = 100 (step 4) it
    # stays 8 -> 50 points; the (1, 3) case needs 9 -> rounded up to 12 -> 75 points.
    pool = Pool(name="p", models=("m",), ring_points_per_weight=100)
    r = routes([WARM, COLD, COLD], pool=pool)
    assert r["e0"] == Route(WARM, HEALTHY, 16, 100)
    assert r["e1"] == Route(COLD, HEALTHY, 8, 50)
    r = routes([WARM, COLD, COLD, COLD], pool=pool)
    assert r["e1"] == Route(COLD, HEALTHY, 12, 75)
    # The warm share still stays within the factor: 100 / (100 + 3 x 75) <= 1.5 / 4.
    assert Fraction(100, ring_size(r)) <= Fraction(3, 2) * Fraction(1, 4)
    assert envoy_points(r) == {k: x.ring_points for k, x in r.items()}


def test_odd_points_spill_at_full_weight() -> None:
    pool = Pool(name="p", models=("m",), ring_points_per_weight=3)
    r = routes([WARM, COLD, COLD], pool=pool)
    assert [(x.weight, x.ring_points) for x in r.values()] == [(16, 3), (16, 3), (16, 3)]
    assert cold_spill_scale(1, 2, Fraction(3, 2), spill_step(3)) == 16


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
    assert ring_settings(cluster).minimum_ring_size.value == 1024 + 64 * 6


@pytest.mark.parametrize(("states", "ring"), [
    ([WARM, WARM, WARM], 3072), ([WARM, WARM, COLD], 2048), ([WARM, COLD, COLD], 2048),
    ([COLD, COLD, COLD], 3072), ([WARM, WARM, DOWN], 2048), ([DOWN, DOWN, DOWN], 1024),
])
def test_cluster_ring_follows_the_hosts_in_the_ring(states: list[WarmState], ring: int) -> None:
    cluster = build_cluster(POOL, endpoints(1, 1, 1), statuses(*states), NOW)
    assert ring_settings(cluster).minimum_ring_size.value == ring


def test_cluster_without_statuses_counts_every_endpoint_warm() -> None:
    eps = endpoints(1, 2)
    assert ring_settings(build_cluster(POOL, eps)).minimum_ring_size.value == 3072


def test_stale_threshold_follows_the_pool_interval() -> None:
    pool = Pool(name="p", models=("m",), warmup=Warmup(interval_s=20.0))
    r = pool_routes(pool, endpoints(1, 1), statuses(DOWN, WARM, age=59), NOW)
    assert r["e0"].health == UNHEALTHY
    r = pool_routes(pool, endpoints(1, 1), statuses(DOWN, WARM, age=61), NOW)
    assert r["e0"].health == HEALTHY


# --- the status write budget ------------------------------------------------------------------


# The count is rounded up to a power of two: 1,000 -> 1,024, 10,000 -> 16,384.
@pytest.mark.parametrize(("interval", "endpoints", "stale"), [
    (10.0, 0, 30.0), (10.0, 100, 30.0), (10.0, 512, 30.0), (10.0, 1000, 40.96),
    (10.0, 10_000, 655.36), (20.0, 1500, 81.92), (20.0, 10_000, 655.36),
    (300.0, 10_000, 900.0),
])
def test_stale_after_grows_with_the_fleet(interval: float, endpoints: int,
                                          stale: float) -> None:
    assert stale_after_s(interval, endpoints) == stale


@given(st.sampled_from([0.5, 1.0, 5.0, 10.0, 20.0, 60.0]), st.integers(0, 200_000))
def test_steady_refreshes_stay_within_the_budget_and_below_staleness(
        interval: float, endpoints: int) -> None:
    from control_plane.prober.state import refresh_after_s

    refresh = refresh_after_s(interval, endpoints)
    assert refresh < stale_after_s(interval, endpoints)  # refreshed before it goes stale
    assert endpoints / refresh <= STATUS_WRITE_BUDGET_PER_S + 1e-9 or \
        refresh == stale_after_s(interval) / 2  # small fleets keep the fixed rule
    assert stale_after_s(interval, endpoints) >= stale_after_s(interval)


def test_needs_write_with_the_fleet_count() -> None:
    from control_plane.prober.state import Warmth, needs_write

    record = Status("p", "e", COLD, 1500.0, NOW - 100)
    assert needs_write(Warmth(state=COLD), record, NOW, 10.0)  # fixed rule: 15 s
    assert not needs_write(Warmth(state=COLD), record, NOW, 10.0, endpoints=10_000)  # 328 s
    assert needs_write(Warmth(state=COLD), Status("p", "e", COLD, 1.0, NOW - 400), NOW, 10.0,
                       endpoints=10_000)
    assert needs_write(Warmth(state=WARM), record, NOW, 10.0, endpoints=10_000)  # a change
    # The control plane's side of the same count: 100 s old is still cold at 10,000.
    eps = {"e": Endpoint("p", "e", "10.0.0.1", 80)}
    assert pool_routes(POOL, eps, {"e": record}, NOW, fleet_endpoints=10_000)["e"].state \
        is COLD
    assert pool_routes(POOL, eps, {"e": record}, NOW)["e"].state is WARM
