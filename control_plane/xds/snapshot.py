"""Snapshot: one consistent set of Envoy resources with a version per type.

Pure. ``SnapshotBuilder`` refuses an inconsistent set (``check_consistent``) and gives each
type a new version only when its content changed, derived from the etcd revision, so
versions never go backwards across a control-plane restart and an unchanged etcd write
pushes nothing.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field

from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf.message import Message

from control_plane.xds import types

Resources = Mapping[str, Mapping[str, Message]]


class InconsistentSnapshot(ValueError):
    """A snapshot whose EDS/RDS names do not match what its CDS/LDS reference."""


def check_consistent(resources: Resources) -> None:
    """Refuse a snapshot whose EDS/RDS resources are not exactly what CDS/LDS reference."""
    eds_needed = {
        name
        for name, cluster in resources.get(types.CLUSTER, {}).items()
        if isinstance(cluster, cluster_pb2.Cluster) and cluster.type == cluster_pb2.Cluster.EDS
    }
    eds_have = set(resources.get(types.ENDPOINT, {}))
    if eds_needed != eds_have:
        raise InconsistentSnapshot(
            f"EDS resources {sorted(eds_have)} do not match EDS clusters {sorted(eds_needed)}"
        )
    rds_needed: set[str] = set()
    for listener in resources.get(types.LISTENER, {}).values():
        for chain in getattr(listener, "filter_chains", []):
            for network_filter in chain.filters:
                hcm = hcm_pb2.HttpConnectionManager()
                if network_filter.typed_config.Unpack(hcm) and hcm.HasField("rds"):
                    rds_needed.add(hcm.rds.route_config_name)
    rds_have = set(resources.get(types.ROUTE, {}))
    if rds_needed != rds_have:
        raise InconsistentSnapshot(
            f"RDS resources {sorted(rds_have)} do not match listener routes {sorted(rds_needed)}"
        )


def content_hash(resources: Mapping[str, Message]) -> str:
    digest = hashlib.sha256()
    for name in sorted(resources):
        digest.update(name.encode())
        digest.update(b"\0")
        digest.update(resources[name].SerializeToString(deterministic=True))
        digest.update(b"\0")
    return digest.hexdigest()[:12]


@dataclass(frozen=True)
class Snapshot:
    """Resources and version per type URL. Immutable once published."""

    resources: Resources = field(default_factory=dict)
    versions: Mapping[str, str] = field(default_factory=dict)

    def version(self, type_url: str) -> str:
        return self.versions.get(type_url, "")

    def named(self, type_url: str, names: frozenset[str] | None) -> list[Message]:
        """Resources of a type; ``names`` None means all (wildcard)."""
        by_name = self.resources.get(type_url, {})
        if names is None:
            return [by_name[n] for n in sorted(by_name)]
        return [by_name[n] for n in sorted(names) if n in by_name]


class SnapshotBuilder:
    """Gives each type a new version only when its content changed."""

    def __init__(self) -> None:
        self._hashes: dict[str, str] = {}
        self.current = Snapshot()

    def update(self, resources: Resources, revision: int) -> Snapshot | None:
        """The new snapshot, or None when nothing changed (no push)."""
        check_consistent(resources)
        versions = dict(self.current.versions)
        changed = False
        for type_url in types.PUSH_ORDER:
            digest = content_hash(resources.get(type_url, {}))
            if self._hashes.get(type_url) != digest:
                self._hashes[type_url] = digest
                # The revision orders versions across restarts; the hash tells apart two
                # contents seen at one revision (a DNS answer or a status going stale).
                versions[type_url] = f"{revision}-{digest[:8]}"
                changed = True
        if not changed:
            return None
        self.current = Snapshot(resources=resources, versions=versions)
        return self.current
