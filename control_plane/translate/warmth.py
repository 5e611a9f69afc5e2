"""How prober statuses turn into routing: EDS health, weight and ring points per endpoint.

Pure: statuses and the time in, one ``Route`` per endpoint out. The mechanism was chosen by
measuring Envoy 1.40 (docs/prober.md has the numbers):

- ``down`` hosts are UNHEALTHY. With the panic threshold at 0 they never get traffic.
- ``cold`` hosts, while the warm hosts can carry the pool within the bounded-load factor
  (``f x warm weight >= routable weight``), are DEGRADED: a ring hash or maglev balancer
  leaves degraded hosts out of its table, so they get no new sessions. DEGRADED is never
  used when the warm hosts cannot carry the pool: Envoy would then pile every session onto
  the warm ones (its degraded share still uses the healthy-only ring), and an all-DEGRADED
  pool answers 503.
- Otherwise cold hosts stay HEALTHY with a smaller weight, chosen so that the warm hosts'
  share of the ring is at most ``f`` times their fair share: the rest spills to the cold
  hosts, in proportion to their configured weights.
- A pool with no warm host (all cold) is routed as if all were warm: it still serves, and
  its ring does not change.
- A missing or stale status counts as warm: losing the prober never blackholes a pool.

Ring points: a warm host of configured weight ``w`` always has ``P w`` points, ``P`` being
the pool's ``ring_points_per_weight`` (a constant of the pool), so when one host changes only
that host's sessions move. Envoy gives a host ``min_ring_size x weight / total weight``
points (rounded as translate/clusters.py explains), so the cluster's minimum ring size is
chosen near the sum of the ``ring_points`` of the hosts in the ring (``ring_size``), where
every host gets exactly its ``ring_points``.

While some cold host takes spill, EDS weights are ``w x SPILL_SCALE`` (16) for warm hosts
and ``w x c`` for cold ones (``c`` in 1..16), and a host's points are ``P x c / 16 x w``
(warm: ``c = 16``, i.e. ``P w`` again). For that to be a whole number of points for any
``w``, ``P x c`` must be a multiple of 16: ``c`` is rounded *up* to a multiple of
``spill_step(P) = 16 / gcd(P, 16)`` (1 when P is a multiple of 16, as the default is; 16
when P is odd, so such a pool has no reduced cold weight: cold hosts spill at full weight).
Rounding up gives cold hosts a little more of the ring, so the warm share still stays
within the bounded-load factor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction

from envoy.config.core.v3 import health_check_pb2

from control_plane.config.drains import Drain
from control_plane.config.model import Endpoint, Pool, Status, WarmState

# A status older than this many probe intervals is stale and counts as warm: losing the
# prober must never blackhole a pool.
STALE_INTERVALS = 3
STALE_FLOOR_S = 30.0
# The prober rewrites an unchanged status half-way to going stale (prober/state.py), so N
# endpoints cost N / (stale_after / 2) etcd writes per second in steady state: 667/s for
# 10,000 endpoints at the default 10 s interval. With the fleet's endpoint count given,
# stale_after grows so that those refreshes stay within this budget (docs/scale.md).
STATUS_WRITE_BUDGET_PER_S = 50.0

# While cold hosts take spill, EDS weights are configured weight x this for warm hosts and
# configured weight x 1..this for cold ones; one EDS weight unit is then P/16 ring points
# (P: the pool's ring_points_per_weight; see spill_step for P not a multiple of 16).
SPILL_SCALE = 16
# The bounded-load factor that defines "room" on warm hosts when the pool has none set.
DEFAULT_CAPACITY_FACTOR = Fraction(3, 2)

HEALTHY = health_check_pb2.HEALTHY
DEGRADED = health_check_pb2.DEGRADED
UNHEALTHY = health_check_pb2.UNHEALTHY


def stale_after_s(interval_s: float, endpoints: int = 0) -> float:
    """Age at which a status no longer counts (it is then treated as warm).

    ``endpoints``: the number of endpoints the prober tracks (every endpoint of an existing
    pool, fleet-wide). Past ``STATUS_WRITE_BUDGET_PER_S x max(30 s, 3 intervals) / 2``
    endpoints (750 at the 10 s default) the bound grows to ``2 N / budget``, so the
    refreshes (every ``stale_after / 2``) stay at the budget: 400 s for 10,000 endpoints.
    0 is the fixed ``max(30 s, 3 intervals)``. The count is rounded up to a power of two, so
    the bound moves rarely (a membership change does not re-translate every pool) and a
    prober tracking fewer endpoints than the control plane sees (endpoints without a pool)
    never refreshes later than the control plane's bound.
    """
    fixed = max(STALE_FLOOR_S, STALE_INTERVALS * interval_s)
    fleet = 1 << (endpoints - 1).bit_length() if endpoints > 0 else 0
    return max(fixed, 2 * fleet / STATUS_WRITE_BUDGET_PER_S)


def is_stale(status: Status, interval_s: float, now: float, endpoints: int = 0) -> bool:
    return now - status.checked_at > stale_after_s(interval_s, endpoints)


def effective_state(status: Status | None, interval_s: float, now: float,
                    endpoints: int = 0) -> WarmState:
    """The state routing acts on: missing or stale statuses count as warm."""
    if status is None or is_stale(status, interval_s, now, endpoints):
        return WarmState.WARM
    return status.state


@dataclass(frozen=True)
class Route:
    """What Envoy gets for one endpoint."""

    state: WarmState  # the effective state (missing/stale -> warm)
    health: int  # EDS HealthStatus
    weight: int  # EDS load_balancing_weight
    ring_points: int  # points this host has on a ring-hash ring; 0 when not in the ring

    @property
    def in_ring(self) -> bool:
        return self.ring_points > 0


def capacity_factor(pool: Pool) -> Fraction:
    """How far above its fair share a host may be loaded: the pool's hash_balance_factor."""
    if pool.hash_balance_factor:
        return Fraction(pool.hash_balance_factor, 100)
    return DEFAULT_CAPACITY_FACTOR


def spill_step(points_per_weight: int) -> int:
    """The granularity of a cold host's spill scale: ``points_per_weight x scale`` must be
    a multiple of SPILL_SCALE so that every host's ring points are whole."""
    return SPILL_SCALE // math.gcd(points_per_weight, SPILL_SCALE)


def cold_spill_scale(warm_weight: int, cold_weight: int, factor: Fraction,
                     step: int = 1) -> int | None:
    """EDS weight per configured weight unit of a cold host (warm hosts have SPILL_SCALE).

    None when the warm hosts can carry the whole pool within ``factor`` of their fair share:
    cold hosts then leave the ring. Otherwise the smallest multiple of ``step`` (which
    divides SPILL_SCALE) that keeps the warm share of the ring at most ``factor x
    warm_weight / total``, in step..SPILL_SCALE.
    """
    total = warm_weight + cold_weight
    if warm_weight == 0 or cold_weight == 0 or factor * warm_weight >= total:
        return None
    # warm share K*Ww / (K*Ww + c*Wc) <= f*Ww/W  <=>  c >= K * (W - f*Ww) / (f*Wc)
    exact = Fraction(SPILL_SCALE) * (total - factor * warm_weight) / (factor * cold_weight)
    return max(step, min(SPILL_SCALE, math.ceil(exact / step) * step))


def pool_routes(pool: Pool, endpoints: Mapping[str, Endpoint], statuses: Mapping[str, Status],
                now: float, fleet_endpoints: int = 0,
                drains: Mapping[str, Drain] | None = None) -> dict[str, Route]:
    """One Route per endpoint of ``endpoints`` (pass those that will be in EDS);
    ``fleet_endpoints`` as for ``stale_after_s``. A draining endpoint (``drains``, before
    its ``until``) is DEGRADED: out of the ring, so it takes no new session, but still a
    host its pinned sessions reach; past ``until`` it is UNHEALTHY. While every endpoint
    that is not down would be draining, the drains are ignored (the pool keeps serving)."""
    interval = pool.warmup.interval_s
    states = {eid: effective_state(statuses.get(eid), interval, now, fleet_endpoints)
              for eid in endpoints}
    drains = drains or {}
    drained = {eid for eid in endpoints if eid in drains and now >= drains[eid].until}
    draining = {eid for eid in endpoints if eid in drains and eid not in drained}
    serving = {eid for eid in endpoints
               if states[eid] is not WarmState.DOWN and eid not in drained}
    if serving and serving <= draining:
        draining = set()
    in_ring = {eid: e for eid, e in endpoints.items() if eid not in draining | drained}
    warm = sum(e.weight for eid, e in in_ring.items() if states[eid] is WarmState.WARM)
    cold = sum(e.weight for eid, e in in_ring.items() if states[eid] is WarmState.COLD)
    factor = capacity_factor(pool)
    per_weight = pool.ring_points_per_weight
    spill = cold_spill_scale(warm, cold, factor, spill_step(per_weight))
    routes: dict[str, Route] = {}
    for eid, endpoint in endpoints.items():
        state = states[eid]
        full_points = per_weight * endpoint.weight
        if state is WarmState.DOWN or eid in drained:
            routes[eid] = Route(state, UNHEALTHY, endpoint.weight, 0)
        elif eid in draining or (state is WarmState.COLD and warm and spill is None):
            routes[eid] = Route(state, DEGRADED, endpoint.weight, 0)
        elif spill is None:
            # All warm, or all cold: every host in the ring at full weight.
            routes[eid] = Route(state, HEALTHY, endpoint.weight, full_points)
        else:
            scale = SPILL_SCALE if state is WarmState.WARM else spill
            # Whole: per_weight x scale is a multiple of SPILL_SCALE (spill_step).
            points = per_weight * scale // SPILL_SCALE * endpoint.weight
            routes[eid] = Route(state, HEALTHY, scale * endpoint.weight, points)
    return routes


def ring_size(routes: Mapping[str, Route]) -> int:
    """The sum of the ring points of the hosts in the ring: a minimum ring size that gives
    each host exactly its ``ring_points`` (clusters.py keeps others that do too)."""
    return sum(route.ring_points for route in routes.values())


def pinnable(routes: Mapping[str, Route]) -> set[str]:
    """Endpoints an active session may stay pinned to (affinity/): in EDS, not down, warm."""
    return {eid for eid, route in routes.items()
            if route.health != UNHEALTHY and route.state is WarmState.WARM}
