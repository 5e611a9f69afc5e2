"""Snapshot: one consistent set of Envoy resources, versioned per resource and per type.

Pure. ``SnapshotBuilder`` refuses an inconsistent set (``check_consistent``) and versions
every resource by its content: ``<etcd revision it last changed at>-<content hash>``. A
type's version (the SotW ``version_info``) changes only when one of its resources was
added, removed or changed, so an unchanged etcd write pushes nothing, a change in pool A
leaves pool B's resources at their versions (no EDS for B), and versions never go
backwards across a control-plane restart.

Each resource is serialized once per version: the deterministic bytes give the content
hash and become the payload of the packed ``Any`` that every stream shares (``sotw_entry``,
``delta_entry``); a resource object the translator reused is not serialized again at all.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

from control_plane.xds import types

Resources = Mapping[str, Mapping[str, Message]]


class InconsistentSnapshot(ValueError):
    """A snapshot whose EDS/RDS/ECDS names do not match what its CDS/LDS reference."""


def _http_connection_managers(resources: Resources) -> Iterable[hcm_pb2.HttpConnectionManager]:
    for listener in resources.get(types.LISTENER, {}).values():
        for chain in getattr(listener, "filter_chains", []):
            for network_filter in chain.filters:
                hcm = hcm_pb2.HttpConnectionManager()
                if network_filter.typed_config.Unpack(hcm):
                    yield hcm


def _check_extension_configs(resources: Resources,
                             managers: list[hcm_pb2.HttpConnectionManager]) -> None:
    """Every HTTP filter a listener discovers over ECDS has its TypedExtensionConfig, of a
    type the filter accepts (Envoy would NACK it), and there is no other."""
    needed: dict[str, set[str]] = {}
    for hcm in managers:
        for http_filter in hcm.http_filters:
            if http_filter.HasField("config_discovery"):
                needed.setdefault(http_filter.name, set()).update(
                    http_filter.config_discovery.type_urls)
    have = resources.get(types.EXTENSION_CONFIG, {})
    if set(needed) != set(have):
        raise InconsistentSnapshot(
            f"ECDS resources {sorted(have)} do not match listener filters {sorted(needed)}")
    for name, config in have.items():
        type_url = getattr(getattr(config, "typed_config", None), "type_url", "")
        if needed[name] and type_url not in needed[name]:
            raise InconsistentSnapshot(
                f"ECDS resource {name} is a {type_url or '?'}, not one of {sorted(needed[name])}")


def check_consistent(resources: Resources) -> None:
    """Refuse a snapshot whose EDS/RDS/ECDS resources are not exactly what CDS/LDS
    reference."""
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
    managers = list(_http_connection_managers(resources))
    rds_needed = {hcm.rds.route_config_name for hcm in managers if hcm.HasField("rds")}
    rds_have = set(resources.get(types.ROUTE, {}))
    if rds_needed != rds_have:
        raise InconsistentSnapshot(
            f"RDS resources {sorted(rds_have)} do not match listener routes {sorted(rds_needed)}"
        )
    _check_extension_configs(resources, managers)


def serialize(resource: Message) -> bytes:
    return resource.SerializeToString(deterministic=True)


def resource_hash(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()[:12]


def _type_hash(hashes: Iterable[tuple[str, str]]) -> str:
    digest = hashlib.sha256()
    for name, value in sorted(hashes):
        digest.update(name.encode())
        digest.update(b"\0")
        digest.update(value.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:12]


def content_hash(resources: Mapping[str, Message]) -> str:
    """The hash of a type's content: of every resource's name and content hash."""
    return _type_hash((name, resource_hash(serialize(r))) for name, r in resources.items())


def resource_name(resource: Message) -> str:
    return str(getattr(resource, "name", "") or getattr(resource, "cluster_name", ""))


@dataclass
class _Encoded:
    """Wire forms of one resource version, made on first use and shared by every stream."""

    payload: bytes | None = None
    sotw: bytes | None = None
    delta: bytes | None = None


@dataclass(frozen=True)
class Snapshot:
    """Resources, a version per type URL and a version per resource. Immutable once published.

    Without ``resource_versions`` (hand-made snapshots in tests) every resource is at its
    type's version, so bumping a type's version changes all of its resources.
    """

    resources: Resources = field(default_factory=dict)
    versions: Mapping[str, str] = field(default_factory=dict)
    resource_versions: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    _encoded: dict[tuple[str, str], _Encoded] = field(
        default_factory=dict, compare=False, repr=False)

    def version(self, type_url: str) -> str:
        return self.versions.get(type_url, "")

    def resource_version(self, type_url: str, name: str) -> str | None:
        """The version of one resource; None when the snapshot has no such resource."""
        if name not in self.resources.get(type_url, {}):
            return None
        by_name = self.resource_versions.get(type_url)
        if by_name is None:
            return self.version(type_url)
        return by_name[name]

    def names(self, type_url: str) -> list[str]:
        return sorted(self.resources.get(type_url, {}))

    def named(self, type_url: str, names: Iterable[str] | None) -> list[Message]:
        """Resources of a type in name order; ``names`` None means all (wildcard)."""
        by_name = self.resources.get(type_url, {})
        if names is None:
            return [by_name[n] for n in sorted(by_name)]
        return [by_name[n] for n in sorted(names) if n in by_name]

    def _entry(self, type_url: str, name: str) -> _Encoded:
        entry = self._encoded.get((type_url, name))
        if entry is None:
            entry = self._encoded[(type_url, name)] = _Encoded()
        if entry.payload is None:
            entry.payload = serialize(self.resources[type_url][name])
        return entry

    def sotw_entry(self, type_url: str, name: str) -> bytes:
        """A DiscoveryResponse holding only this resource, serialized: concatenated to other
        entries and a header it is the whole response (protobuf merges repeated fields)."""
        entry = self._entry(type_url, name)
        if entry.sotw is None:
            packed = any_pb2.Any(type_url=type_url, value=entry.payload)
            entry.sotw = discovery_pb2.DiscoveryResponse(resources=[packed]).SerializeToString()
        return entry.sotw

    def delta_entry(self, type_url: str, name: str) -> bytes:
        """Likewise for a DeltaDiscoveryResponse: one Resource with its name and version."""
        entry = self._entry(type_url, name)
        if entry.delta is None:
            packed = any_pb2.Any(type_url=type_url, value=entry.payload)
            resource = discovery_pb2.Resource(
                name=name, version=self.resource_version(type_url, name) or "",
                resource=packed)
            entry.delta = discovery_pb2.DeltaDiscoveryResponse(
                resources=[resource]).SerializeToString()
        return entry.delta


@dataclass
class _Known:
    """What the builder last published for one resource."""

    resource: Message
    hash: str
    version: str
    encoded: _Encoded


class SnapshotBuilder:
    """Versions each resource by content; a type's version moves only when one of its
    resources did. Resource objects passed again unchanged (``is``) are not re-hashed."""

    def __init__(self) -> None:
        self._known: dict[str, dict[str, _Known]] = {}
        self.current = Snapshot()

    def update(self, resources: Resources, revision: int) -> Snapshot | None:
        """The new snapshot, or None when nothing changed (no push)."""
        check_consistent(resources)
        known: dict[str, dict[str, _Known]] = {}
        versions = dict(self.current.versions)
        changed = False
        for type_url in types.PUSH_ORDER:
            before = self._known.get(type_url, {})
            now: dict[str, _Known] = {}
            type_changed = set(before) != set(resources.get(type_url, {}))
            for name, resource in resources.get(type_url, {}).items():
                old = before.get(name)
                if old is not None and old.resource is resource:
                    now[name] = old
                    continue
                payload = serialize(resource)
                digest = resource_hash(payload)
                if old is not None and old.hash == digest:
                    now[name] = _Known(resource, digest, old.version, old.encoded)
                    continue
                # The revision orders versions across restarts; the hash tells apart two
                # contents seen at one revision (a DNS answer or a status going stale).
                now[name] = _Known(resource, digest, f"{revision}-{digest[:8]}",
                                   _Encoded(payload=payload))
                type_changed = True
            known[type_url] = now
            if type_changed or type_url not in versions:
                digest = _type_hash((n, k.hash) for n, k in now.items())
                versions[type_url] = f"{revision}-{digest[:8]}"
                changed = True
        if not changed:
            return None
        self._known = known
        self.current = Snapshot(
            resources={t: {n: k.resource for n, k in by.items()} for t, by in known.items()},
            versions=versions,
            resource_versions={t: {n: k.version for n, k in by.items()}
                               for t, by in known.items()},
            _encoded={(t, n): k.encoded for t, by in known.items() for n, k in by.items()},
        )
        return self.current
