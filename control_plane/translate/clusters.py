"""Cluster per pool: EDS over ADS, consistent hashing with bounded load, GPU-pool defaults."""

from __future__ import annotations

import logging
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
from control_plane.translate.warmth import Route, ring_size

log = logging.getLogger("hotpath.translate")

# Ring points per unit of endpoint weight: the pool's ring_points_per_weight. The ring's
# minimum size is the sum of the points of the hosts in the ring (translate/warmth.py), so
# every host keeps the same points when another host joins, leaves or changes warmth, and
# only the sessions of that host move.
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


def minimum_ring_size(pool: Pool, routes: Mapping[str, Route]) -> int:
    """The pool's minimum_ring_size: the sum of its hosts' ring points, at least one
    weight unit's worth (an empty ring), at most Envoy's maximum (clamped, warned once)."""
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
    return max(pool.ring_points_per_weight, total)

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
# down and the control plane removes it from the ring and shrinks minimum_ring_size in the
# same push (CDS, then EDS): again 0 survivors moved.
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


def _pinned_ring(pool: Pool, routes: Mapping[str, Route]) -> cluster_pb2.LoadBalancingPolicy:
    """Ring hash behind Envoy's override-host policy: a request carrying ``x-hotpath-pin``
    (the Lua filter sets it from the pin table, affinity/) goes to that host if it is in the
    cluster, else, and on every retry, to the ring. Measured on Envoy 1.40: the override
    does not check health, so a pin to a dead host costs one refused connection and the
    retry goes to the ring (routes.py retries connect failures); the control plane drops the
    pin in the same push that marks the host down."""
    ring = ring_hash_pb2.RingHash(hash_function=ring_hash_pb2.RingHash.XX_HASH)
    ring.minimum_ring_size.value = minimum_ring_size(pool, routes)
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


def build_cluster(pool: Pool, routes: Mapping[str, Route]) -> cluster_pb2.Cluster:
    """The cluster of one pool. ``routes`` (translate/warmth.py ``pool_routes`` of the
    endpoints in EDS) size the ring so that only a changed host's sessions move."""
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
        cluster.load_balancing_policy.CopyFrom(_pinned_ring(pool, routes))
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
