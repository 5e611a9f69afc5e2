"""Load assignment per pool: one LbEndpoint per endpoint, hostname = endpoint id."""

from __future__ import annotations

from collections.abc import Mapping

from envoy.config.core.v3 import address_pb2, base_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2

from control_plane.config.model import Endpoint, Pool
from control_plane.translate.warmth import Route


def _hash_key(endpoint_id: str) -> base_pb2.Metadata:
    metadata = base_pb2.Metadata()
    metadata.filter_metadata["envoy.lb"].update({"hash_key": endpoint_id})
    return metadata


def build_load_assignment(
    pool: Pool,
    endpoints: Mapping[str, Endpoint],
    resolved: Mapping[str, str],
    routes: Mapping[str, Route],
) -> endpoint_pb2.ClusterLoadAssignment:
    """``resolved`` maps endpoint id to its IP; endpoints not (yet) resolved are left out.

    Health and weight come from ``routes`` (translate/warmth.py): down hosts are UNHEALTHY,
    cold hosts DEGRADED or lighter while warm hosts have room.
    """
    present = {eid: e for eid, e in endpoints.items() if eid in resolved}
    lb_endpoints = []
    for endpoint_id, endpoint in sorted(present.items()):
        ip = resolved[endpoint_id]
        route = routes[endpoint_id]
        health, weight = route.health, route.weight
        lb_endpoints.append(
            endpoint_components_pb2.LbEndpoint(
                endpoint=endpoint_components_pb2.Endpoint(
                    address=address_pb2.Address(
                        socket_address=address_pb2.SocketAddress(
                            address=ip, port_value=endpoint.port
                        )
                    ),
                    hostname=endpoint_id,
                ),
                health_status=health,
                load_balancing_weight={"value": weight},
                # Ring hash and maglev place a host by this key instead of its IP: a server
                # that moves to a new address keeps its sessions. (use_hostname_for_hashing
                # is refused for EDS clusters.)
                metadata=_hash_key(endpoint_id),
            )
        )
    assignment = endpoint_pb2.ClusterLoadAssignment(cluster_name=pool.name)
    if lb_endpoints:
        assignment.endpoints.append(
            endpoint_components_pb2.LocalityLbEndpoints(lb_endpoints=lb_endpoints)
        )
    return assignment

