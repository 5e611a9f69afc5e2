"""Builders with the config's view (endpoints, statuses, time) in, as translate() calls them."""

from __future__ import annotations

from collections.abc import Mapping

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2

from control_plane.config.model import Endpoint, Pool, Status
from control_plane.translate import clusters, endpoints
from control_plane.translate.warmth import pool_routes


def build_cluster(pool: Pool, eps: Mapping[str, Endpoint],
                  statuses: Mapping[str, Status] | None = None, now: float = 0.0,
                  resolved: Mapping[str, str] | None = None) -> cluster_pb2.Cluster:
    present = eps if resolved is None else {k: e for k, e in eps.items() if k in resolved}
    return clusters.build_cluster(pool, pool_routes(pool, present, statuses or {}, now))


def build_load_assignment(pool: Pool, eps: Mapping[str, Endpoint], resolved: Mapping[str, str],
                          statuses: Mapping[str, Status], now: float
                          ) -> endpoint_pb2.ClusterLoadAssignment:
    present = {k: e for k, e in eps.items() if k in resolved}
    return endpoints.build_load_assignment(pool, present, resolved,
                                           pool_routes(pool, present, statuses, now))
