"""Cluster per pool: EDS over ADS, consistent hashing with bounded load, GPU-pool defaults."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import base_pb2, config_source_pb2, extension_pb2
from envoy.extensions.load_balancing_policies.common.v3 import common_pb2
from envoy.extensions.load_balancing_policies.override_host.v3 import override_host_pb2
from envoy.extensions.load_balancing_policies.ring_hash.v3 import ring_hash_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import any_pb2, duration_pb2, wrappers_pb2

from control_plane.config import limits
from control_plane.config.model import Pool
from control_plane.contract import PIN_HEADER
from control_plane.translate.warmth import HEALTHY, Route, ring_size

log = logging.getLogger("hotpath.translate")

# Ring points per unit of endpoint weight: the pool's ring_points_per_weight. Every host in
# the ring gets exactly its ``ring_points`` (translate/warmth.py), so every host keeps its
# points when another host joins, leaves or changes warmth, and only that host's sessions
# move.
#
# Envoy's ring builder (ring_hash_lb.cc) gives host i ``scale x e_i / E`` entries (EDS
# weights e_i, E their sum over the ring, e_min the smallest), ``scale = min(ceil(e_min / E x
# M) / (e_min / E), maximum_ring_size)``, M the minimum_ring_size. A host's points are
# proportional to its EDS weight, so every host gets exactly its points whenever
# ``ceil(e_min x M / E) == r_min`` (r_min: the points of a host of weight e_min), i.e. for
# every M in the window ``(R x (1 - 1/r_min), R]``, R the sum of the points: not only M = R.
# Every such M gives the same scale, so the same ring. M used to be R, so every weight
# change was a CDS push as well as EDS and Envoy replaced (warmed) the cluster each time. Now
# the control plane keeps the M it published while it is still in the window (hysteresis:
# the Translator passes it in) and otherwise picks one with the current R in the middle of
# the range of R that M serves, R - D with D whole weight units and D x (2 r_min - 1) < R,
# so R can move by D both ways before M must change again (a pool of a few hosts has no
# room: M = R). Measured (docs/scale.md, 30 s of 20 weight changes/s on 1,000 hosts of
# weights 1-4): Envoy replaced the cluster 9 -> 2 times at 128 points, 12 -> 0 at 16 (how
# far Envoy then lags etcd is decided by the ring changes held for pins, not by CDS).
# Every M is checked with Envoy's double arithmetic (``gives_every_host_its_points``): the
# window's top edge M = R can fail it (ceil gives r_min + 1), e.g. at 100 points per
# weight with weights 1 and 90.
#
# The empty ring (every host down, draining or cold-out) keeps the M it had: nothing to size.
#
# Envoy's maximum is 8 Mi entries. A pool whose sum is larger (e.g. 8,193 hosts of weight 1
# at 1024 points, or 33 hosts of weight 128 at 2048) is clamped to it rather than rejected
# (the sum comes from many endpoint keys, none of them wrong alone): Envoy then scales every
# host's points by 8 Mi / sum, so a membership change rescales them all and moves a few
# sessions of hosts that stayed (about |change| / total weight of each host's keys). One
# warning per pool while it is clamped; lower ring_points_per_weight to get the guarantee
# back (docs/scale.md).
MAX_RING_SIZE = limits.RING_SIZE_MAX
_clamped: set[str] = set()


def _ring_weights(routes: Mapping[str, Route]) -> tuple[int, int, int]:
    """(E, e_min, r_min) of the hosts in the ring: the sum and the smallest of their EDS
    weights, and the ring points of a host of the smallest weight (0, 0, 0: empty)."""
    total = smallest = points = 0
    for route in routes.values():
        if route.health != HEALTHY or route.ring_points <= 0:
            continue
        total += route.weight
        if not smallest or route.weight < smallest:
            smallest, points = route.weight, route.ring_points
    return total, smallest, points


def _scale(total: int, smallest: int, ceiled: float) -> float:
    """Envoy's ``scale`` from the ceil'ed ``min_normalized_weight x min_ring_size``."""
    normalized = smallest * 1.0 / total
    return min(ceiled / normalized, float(MAX_RING_SIZE))


def gives_every_host_its_points(routes: Mapping[str, Route], size: int) -> bool:
    """Whether Envoy, given minimum_ring_size ``size``, builds the ring of ``routes``'
    points: its ``scale`` is, bit for bit (the same double operations as ring_hash_lb.cc
    and affinity/ring.py), the one that gives the host of the smallest weight exactly its
    points. Then the ring is the same for every such size. True for an empty ring."""
    total, smallest, points = _ring_weights(routes)
    if not total:
        return True
    if not 1 <= size <= MAX_RING_SIZE:
        return False
    normalized = smallest * 1.0 / total
    return _scale(total, smallest, math.ceil(normalized * size)) == _scale(total, smallest,
                                                                           points)


def minimum_ring_size(pool: Pool, routes: Mapping[str, Route],
                      previous: int | None = None) -> int:
    """The pool's minimum_ring_size: one that gives every host in the ring exactly its ring
    points; ``previous`` (the size last published for the pool) while it still does, else
    one with room both ways (module comment). At most Envoy's maximum (clamped, warned
    once); an empty ring keeps ``previous`` (one weight unit's worth without one)."""
    total = ring_size(routes)
    if total > MAX_RING_SIZE:
        if pool.name not in _clamped:
            _clamped.add(pool.name)
            log.warning("pools/%s: ring needs %d points (%d per weight unit), over Envoy's "
                        "maximum %d: clamped, so a host change may move a few sessions of "
                        "other hosts; lower ring_points_per_weight to keep them in place",
                        pool.name, total, pool.ring_points_per_weight, MAX_RING_SIZE)
        return MAX_RING_SIZE
    _clamped.discard(pool.name)
    if previous is not None and 1 <= previous <= MAX_RING_SIZE and (
            gives_every_host_its_points(routes, previous)):
        return previous
    _, _, smallest = _ring_weights(routes)
    if not smallest:
        return pool.ring_points_per_weight
    # M = R - D serves every R' in [R - D, (R - D) x r_min / (r_min - 1)), which holds
    # [R - D, R + D] iff D x (2 r_min - 1) < R; D in whole weight units (R moves by those),
    # so a pool whose window is narrower than one unit (a few hosts) gets M = R.
    step = pool.ring_points_per_weight
    centred = total - step * ((total - 1) // (step * (2 * smallest - 1)))
    # Below the top edge the double arithmetic is exact enough; a few tries at most.
    low = total - total // smallest  # >= R (1 - 1/r_min), which M must be above
    for size in range(centred, max(low, centred - 8), -1):
        if gives_every_host_its_points(routes, size):
            return size
    return total

# Concurrent retries per cluster. Envoy's default of 3 turned 154 of 205 requests into 503s
# with 30 concurrent sessions on a dead host (measured, Envoy 1.40): every session of a
# dead ring-hash host is retried to the next ring entry, so retries are as many as requests.
MAX_RETRIES = 1000

_LB = {
    "ring_hash": cluster_pb2.Cluster.RING_HASH,
    "maglev": cluster_pb2.Cluster.MAGLEV,
    "round_robin": cluster_pb2.Cluster.ROUND_ROBIN,
    "least_request": cluster_pb2.Cluster.LEAST_REQUEST,
}


# No outlier detection for consistent-hash pools. Measured on Envoy 1.40 (3 hosts, 600
# sessions, 1024 ring points per host): an outlier ejection rebuilds the ring from the
# remaining hosts with the unchanged minimum ring size, so each survivor gets 1536 points and
# 55 of 395 survivor sessions moved between survivors. Without ejection, the route's retries
# (connect-failure/reset, previous_hosts, routes.py) send a dead host's sessions to the next
# ring entry deterministically: 0 survivors moved, 0 failures. The prober then marks the host
# down and the control plane removes it from the ring (EDS, and CDS in the same push when
# minimum_ring_size must change with it): again 0 survivors moved.
HASHED = ("ring_hash", "maglev")


def _seconds(value: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromMilliseconds(round(value * 1000))
    return duration


def _policy(name: str, config: ring_hash_pb2.RingHash | override_host_pb2.OverrideHost
            ) -> cluster_pb2.LoadBalancingPolicy:
    packed = any_pb2.Any()
    packed.Pack(config, deterministic=True)
    return cluster_pb2.LoadBalancingPolicy(policies=[cluster_pb2.LoadBalancingPolicy.Policy(
        typed_extension_config=extension_pb2.TypedExtensionConfig(name=name,
                                                                  typed_config=packed))])


def _pinned_ring(pool: Pool, min_ring_size: int) -> cluster_pb2.LoadBalancingPolicy:
    """Ring hash behind Envoy's override-host policy: a request carrying ``x-hotpath-pin``
    (the Lua filter sets it from the pin table, affinity/) goes to that host if it is in the
    cluster, else, and on every retry, to the ring. Measured on Envoy 1.40: the override
    does not check health, so a pin to a dead host costs one refused connection and the
    retry goes to the ring (routes.py retries connect failures); the control plane drops the
    pin in the same push that marks the host down."""
    ring = ring_hash_pb2.RingHash(hash_function=ring_hash_pb2.RingHash.XX_HASH)
    ring.minimum_ring_size.value = min_ring_size
    ring.maximum_ring_size.value = MAX_RING_SIZE
    if pool.hash_balance_factor:
        # UInt32Value >= 100: model.py validates against config/limits.py.
        ring.consistent_hashing_lb_config.CopyFrom(common_pb2.ConsistentHashingLbConfig(
            hash_balance_factor=wrappers_pb2.UInt32Value(value=pool.hash_balance_factor)))
    override = override_host_pb2.OverrideHost(
        override_host_sources=[override_host_pb2.OverrideHost.OverrideHostSource(
            header=PIN_HEADER)],
        fallback_policy=_policy("envoy.load_balancing_policies.ring_hash", ring))
    return _policy("envoy.load_balancing_policies.override_host", override)


def build_cluster(pool: Pool, routes: Mapping[str, Route],
                  min_ring_size: int | None = None) -> cluster_pb2.Cluster:
    """The cluster of one pool. ``routes`` (translate/warmth.py ``pool_routes`` of the
    endpoints in EDS) size the ring so that only a changed host's sessions move:
    ``min_ring_size`` when given (the Translator's choice, ``minimum_ring_size`` with the
    size it published last), else ``minimum_ring_size(pool, routes)``. The cluster depends
    on ``routes`` only through that size."""
    cluster = cluster_pb2.Cluster(
        name=pool.name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(
            eds_config=config_source_pb2.ConfigSource(
                ads=config_source_pb2.AggregatedConfigSource(),
                resource_api_version=config_source_pb2.V3,
            ),
        ),
        connect_timeout=_seconds(2),
        # Request bodies may be as large as the gateway's body limit.
        per_connection_buffer_limit_bytes=wrappers_pb2.UInt32Value(value=32 * 1024 * 1024),
    )
    common = cluster.common_lb_config
    # 2-3 host GPU pools: the default 50% panic threshold would send traffic to a dead host as
    # soon as one of two is down. Disabled: unhealthy hosts never get traffic.
    common.healthy_panic_threshold.CopyFrom(percent_pb2.Percent(value=0.0))
    if pool.lb == "ring_hash":
        size = minimum_ring_size(pool, routes) if min_ring_size is None else min_ring_size
        cluster.load_balancing_policy.CopyFrom(_pinned_ring(pool, size))
    else:
        cluster.lb_policy = _LB[pool.lb]
    if pool.lb == "maglev" and pool.hash_balance_factor:
        # UInt32Value >= 100: model.py validates against config/limits.py.
        common.consistent_hashing_lb_config.hash_balance_factor.value = pool.hash_balance_factor
    if pool.lb not in HASHED:
        cluster.outlier_detection.CopyFrom(
            outlier_detection_pb2.OutlierDetection(
                consecutive_5xx=wrappers_pb2.UInt32Value(value=5),
                consecutive_gateway_failure=wrappers_pb2.UInt32Value(value=3),
                enforcing_consecutive_gateway_failure=wrappers_pb2.UInt32Value(value=100),
                interval=_seconds(5),
                base_ejection_time=_seconds(15),
                # The 10% default never ejects anything in a 3-host pool; at most half may go.
                max_ejection_percent=wrappers_pb2.UInt32Value(value=50),
            )
        )
    # LLM requests are long-lived streams: the 1024 defaults would queue real traffic.
    cluster.circuit_breakers.CopyFrom(
        circuit_breaker_pb2.CircuitBreakers(
            thresholds=[
                circuit_breaker_pb2.CircuitBreakers.Thresholds(
                    priority=base_pb2.DEFAULT,
                    max_connections=wrappers_pb2.UInt32Value(value=100_000),
                    max_pending_requests=wrappers_pb2.UInt32Value(value=100_000),
                    max_requests=wrappers_pb2.UInt32Value(value=100_000),
                    max_retries=wrappers_pb2.UInt32Value(value=MAX_RETRIES),
                )
            ]
        )
    )
    return cluster


def ring_settings(cluster: cluster_pb2.Cluster) -> ring_hash_pb2.RingHash | None:
    """The ring-hash settings of a cluster built here (None: not a ring-hash cluster)."""
    policies = cluster.load_balancing_policy.policies
    while policies:
        packed = policies[0].typed_extension_config.typed_config
        ring = ring_hash_pb2.RingHash()
        if packed.Unpack(ring):
            return ring
        override = override_host_pb2.OverrideHost()
        if not packed.Unpack(override):
            return None
        policies = override.fallback_policy.policies
    return None
