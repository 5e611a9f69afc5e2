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

Ring points: a warm host of configured weight ``w`` always has ``1024 w`` points, so when
one host changes only that host's sessions move. Envoy gives a host ``min_ring_size x
weight / total weight`` points, so the cluster's minimum ring size must be the sum of the
``ring_points`` of the hosts in the ring (``ring_size``); the EDS weights are scaled by
``SPILL_SCALE`` only while some cold host takes spill.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction

from envoy.config.core.v3 import health_check_pb2

from control_plane.config.model import Endpoint, Pool, Status, WarmState

# A status older than this many probe intervals is stale and counts as warm: losing the
# prober must never blackhole a pool.
STALE_INTERVALS = 3
STALE_FLOOR_S = 30.0

# Ring points per unit of configured weight of a host in the ring at full (warm) weight.
RING_POINTS_PER_WEIGHT = 1024
# While cold hosts take spill, EDS weights are configured weight x this for warm hosts and
# configured weight x 1..this for cold ones; one EDS weight unit is then 1024/16 ring points.
SPILL_SCALE = 16
# The bounded-load factor that defines "room" on warm hosts when the pool has none set.
DEFAULT_CAPACITY_FACTOR = Fraction(3, 2)

HEALTHY = health_check_pb2.HEALTHY
DEGRADED = health_check_pb2.DEGRADED
UNHEALTHY = health_check_pb2.UNHEALTHY


def stale_after_s(interval_s: float) -> float:
    """Age at which a status no longer counts (it is then treated as warm)."""
    return max(STALE_FLOOR_S, STALE_INTERVALS * interval_s)


def is_stale(status: Status, interval_s: float, now: float) -> bool:
    return now - status.checked_at > stale_after_s(interval_s)


def effective_state(status: Status | None, interval_s: float, now: float) -> WarmState:
    """The state routing acts on: missing or stale statuses count as warm."""
    if status is None or is_stale(status, interval_s, now):
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


def cold_spill_scale(warm_weight: int, cold_weight: int, factor: Fraction) -> int | None:
    """EDS weight per configured weight unit of a cold host (warm hosts have SPILL_SCALE).

    None when the warm hosts can carry the whole pool within ``factor`` of their fair share:
    cold hosts then leave the ring. Otherwise the smallest scale that keeps the warm share of
    the ring at most ``factor x warm_weight / total``, in 1..SPILL_SCALE.
    """
    total = warm_weight + cold_weight
    if warm_weight == 0 or cold_weight == 0 or factor * warm_weight >= total:
        return None
    # warm share K*Ww / (K*Ww + c*Wc) <= f*Ww/W  <=>  c >= K * (W - f*Ww) / (f*Wc)
    exact = Fraction(SPILL_SCALE) * (total - factor * warm_weight) / (factor * cold_weight)
    return max(1, min(SPILL_SCALE, math.ceil(exact)))


def pool_routes(pool: Pool, endpoints: Mapping[str, Endpoint], statuses: Mapping[str, Status],
                now: float) -> dict[str, Route]:
    """One Route per endpoint of ``endpoints`` (pass those that will be in EDS)."""
    interval = pool.warmup.interval_s
    states = {eid: effective_state(statuses.get(eid), interval, now) for eid in endpoints}
    warm = sum(e.weight for eid, e in endpoints.items() if states[eid] is WarmState.WARM)
    cold = sum(e.weight for eid, e in endpoints.items() if states[eid] is WarmState.COLD)
    factor = capacity_factor(pool)
    spill = cold_spill_scale(warm, cold, factor)
    routes: dict[str, Route] = {}
    for eid, endpoint in endpoints.items():
        state = states[eid]
        full_points = RING_POINTS_PER_WEIGHT * endpoint.weight
        if state is WarmState.DOWN:
            routes[eid] = Route(state, UNHEALTHY, endpoint.weight, 0)
        elif state is WarmState.COLD and warm and spill is None:
            routes[eid] = Route(state, DEGRADED, endpoint.weight, 0)
        elif spill is None:
            # All warm, or all cold: every host in the ring at full weight.
            routes[eid] = Route(state, HEALTHY, endpoint.weight, full_points)
        else:
            scale = SPILL_SCALE if state is WarmState.WARM else spill
            points = RING_POINTS_PER_WEIGHT // SPILL_SCALE * scale * endpoint.weight
            routes[eid] = Route(state, HEALTHY, scale * endpoint.weight, points)
    return routes


def ring_size(routes: Mapping[str, Route]) -> int:
    """The minimum ring size that gives each host in the ring exactly its ``ring_points``."""
    return sum(route.ring_points for route in routes.values())
