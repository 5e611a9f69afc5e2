"""translate(): the config model -> every Envoy resource, by type URL and name.

Pure. Each pool's warmth routing (translate/warmth.py) is computed once and shapes both its
cluster (ring size) and its load assignment (health, weights).
"""

from __future__ import annotations

from collections.abc import Mapping

from google.protobuf.message import Message

from control_plane.config.model import Config, GatewaySettings
from control_plane.translate.clusters import build_cluster
from control_plane.translate.endpoints import build_load_assignment
from control_plane.translate.listeners import build_listener
from control_plane.translate.routes import build_route_configuration
from control_plane.translate.warmth import pool_routes
from control_plane.xds import types


def translate(
    config: Config,
    resolved: Mapping[tuple[str, str], str],
    settings: GatewaySettings,
    now: float,
) -> dict[str, dict[str, Message]]:
    """Config model -> Envoy resources by type URL and name. ``resolved``: (pool, id) -> IP."""
    by_pool: dict[str, dict[str, str]] = {}
    for (pool_name, endpoint_id), ip in resolved.items():
        by_pool.setdefault(pool_name, {})[endpoint_id] = ip
    clusters: dict[str, Message] = {}
    assignments: dict[str, Message] = {}
    for name, pool in config.pools.items():
        pool_resolved = by_pool.get(name, {})
        # Endpoints not (yet) resolved are left out of EDS, and so out of the ring size.
        present = {eid: e for eid, e in config.endpoints.get(name, {}).items()
                   if eid in pool_resolved}
        routes = pool_routes(pool, present, config.statuses.get(name, {}), now)
        clusters[name] = build_cluster(pool, routes)
        assignments[name] = build_load_assignment(pool, present, pool_resolved, routes)
    listener = build_listener(settings)
    route_config = build_route_configuration(config.pools.values(), settings)
    return {
        types.CLUSTER: clusters,
        types.ENDPOINT: assignments,
        types.LISTENER: {listener.name: listener},
        types.ROUTE: {route_config.name: route_config},
    }
