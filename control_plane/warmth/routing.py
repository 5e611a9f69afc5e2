"""How a prober status turns into routing: EDS health and weight of one endpoint."""

from __future__ import annotations

from envoy.config.core.v3 import health_check_pb2

from control_plane.model import Endpoint, Status, WarmState

# A status older than this many probe intervals is stale and counts as warm: losing the
# prober must never blackhole a pool.
STALE_INTERVALS = 3
STALE_FLOOR_S = 30.0


def is_stale(status: Status, interval_s: float, now: float) -> bool:
    return now - status.checked_at > max(STALE_FLOOR_S, STALE_INTERVALS * interval_s)


def routing_for(endpoint: Endpoint, status: Status | None, now: float,
                interval_s: float = 10.0) -> tuple[int, int]:
    """(EDS health status, load-balancing weight) for one endpoint."""
    if status is None or is_stale(status, interval_s, now):
        return health_check_pb2.HEALTHY, endpoint.weight
    if status.state is WarmState.DOWN:
        return health_check_pb2.UNHEALTHY, endpoint.weight
    return health_check_pb2.HEALTHY, endpoint.weight
