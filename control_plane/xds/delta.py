"""DeltaStream: the incremental (delta) ADS protocol for one Envoy stream, without IO.

Delta requests and snapshots go in, delta responses (and NACK reports) come out. Rules,
per type URL:

- Subscriptions: the first request of a type with no names subscribes a wildcard type
  (CDS, LDS) to everything (legacy wildcard); ``*`` in ``resource_names_subscribe`` does so
  explicitly and in ``resource_names_unsubscribe`` ends it. Other names add to or leave the
  named subscription; an unsubscribed resource is forgotten (no response needed).
- ``initial_resource_versions`` (first request of a type, after a reconnect) says what
  Envoy already has: a resource whose content hash matches is not sent again, and one it
  has that no longer exists goes out in ``removed_resources``.
- A response carries only resources whose version differs from what Envoy has, plus in
  ``removed_resources`` the subscribed ones that are gone; nothing due, nothing sent. The
  first request of a type is always answered, so Envoy's initial fetch completes.
- A request whose ``response_nonce`` is not the last one sent for its type is stale: its
  subscription changes apply, but it acknowledges nothing.
- At most one response per type is in flight; the next, when due, carries the latest
  snapshot (a slow Envoy skips the versions in between). A NACK (``error_detail``) is
  reported once; the rejected versions are not sent again, newer ones are.
- Push order is CDS before EDS, LDS before ECDS and RDS, within one change too; a CDS
  (LDS) response that re-creates clusters (listeners) owes their EDS (ECDS, RDS), sent
  right after it or with the next response of that type, as in the SotW protocol
  (xds/protocol.py), or the clusters stay warming. ECDS (the Lua filter's config) is a
  named subscription, like EDS and RDS.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field

from google.protobuf.message import Message

from control_plane.xds import types
from control_plane.xds.protocol import CHILDREN, NAMED, PARENT, Nack
from control_plane.xds.snapshot import Snapshot


@dataclass(frozen=True)
class DeltaRequest:
    type_url: str
    response_nonce: str = ""
    subscribe: tuple[str, ...] = ()
    unsubscribe: tuple[str, ...] = ()
    initial_versions: Mapping[str, str] = field(default_factory=dict)
    error_message: str | None = None


@dataclass(frozen=True)
class DeltaResponse:
    type_url: str
    system_version_info: str
    nonce: str
    resources: tuple[Message, ...]
    names: tuple[str, ...]
    versions: tuple[str, ...]
    removed: tuple[str, ...] = ()
    snapshot: Snapshot | None = field(default=None, compare=False, repr=False)


@dataclass
class _DeltaState:
    started: bool = False
    wildcard: bool = False
    names: set[str] = field(default_factory=set)
    known: dict[str, str] = field(default_factory=dict)  # name -> version Envoy has
    sent_nonce: str = ""
    sent_version: str = ""
    sent_names: tuple[str, ...] = ()
    in_flight: bool = False
    acked_version: str = ""
    reported: set[str] = field(default_factory=set)
    owed: set[str] = field(default_factory=set)
    answer: bool = False

    def wants(self, name: str) -> bool:
        return self.wildcard or name in self.names


def same_content(a: str | None, b: str | None) -> bool:
    """Versions are ``<revision>-<hash>``: equal hashes are equal content, whichever
    control plane (revision) versioned them."""
    return a is not None and b is not None and a.rsplit("-", 1)[-1] == b.rsplit("-", 1)[-1]


class DeltaStream:
    """Protocol state of one delta ADS stream."""

    def __init__(self) -> None:
        self._types: dict[str, _DeltaState] = {}
        self._nonces = itertools.count(1)

    def acked(self, type_url: str) -> str:
        """The system version of the last response Envoy acknowledged ('' before any)."""
        state = self._types.get(type_url)
        return state.acked_version if state else ""

    def subscribed(self, type_url: str) -> tuple[bool, frozenset[str]]:
        """(wildcard, names) of a type's subscription."""
        state = self._types.get(type_url)
        return (state.wildcard, frozenset(state.names)) if state else (False, frozenset())

    def on_request(self, request: DeltaRequest, snapshot: Snapshot
                   ) -> tuple[list[DeltaResponse], Nack | None]:
        state = self._types.setdefault(request.type_url, _DeltaState())
        if not state.started:
            state.started = True
            state.answer = True
            state.known.update(request.initial_versions)
            if not request.subscribe and request.type_url not in NAMED:
                state.wildcard = True
        for name in request.subscribe:
            if name == "*":
                state.wildcard = True
            elif name not in state.names:
                state.names.add(name)
                # Answered when there is something Envoy does not have yet.
                state.answer = state.answer or (
                    name not in state.known
                    and snapshot.resource_version(request.type_url, name) is not None)
        for name in request.unsubscribe:
            if name == "*":
                state.wildcard = False
            else:
                state.names.discard(name)
            if not state.wildcard:
                for gone in [n for n in state.known if n not in state.names]:
                    del state.known[gone]
        nack: Nack | None = None
        if request.response_nonce and request.response_nonce == state.sent_nonce:
            state.in_flight = False
            if request.error_message is not None:
                if state.sent_nonce not in state.reported:
                    state.reported.add(state.sent_nonce)
                    nack = Nack(request.type_url, state.sent_version, request.error_message,
                                state.sent_names)
            else:
                state.acked_version = state.sent_version
        if not snapshot.versions:
            return [], nack
        return self._flush(snapshot), nack

    def on_snapshot(self, snapshot: Snapshot) -> list[DeltaResponse]:
        return self._flush(snapshot)

    def _flush(self, snapshot: Snapshot) -> list[DeltaResponse]:
        responses: list[DeltaResponse] = []
        if not snapshot.versions:
            return responses  # nothing read from etcd yet: answer once the first snapshot exists
        held: set[str] = set()
        for type_url in types.PUSH_ORDER:
            state = self._types.get(type_url)
            if state is None or not state.started:
                continue
            due = self._due(type_url, state, snapshot)
            if due is None:
                continue
            if state.in_flight or PARENT.get(type_url) in held:
                held.add(type_url)
                continue
            responses.append(self._respond(type_url, state, snapshot, *due))
        return responses

    @staticmethod
    def _due(type_url: str, state: _DeltaState, snapshot: Snapshot
             ) -> tuple[list[str], list[str]] | None:
        """(names to send, names removed), or None when nothing is due."""
        present = snapshot.names(type_url)
        send = [n for n in present if state.wants(n)
                and (n in state.owed
                     or not same_content(state.known.get(n),
                                         snapshot.resource_version(type_url, n)))]
        removed = sorted(n for n in state.known if snapshot.resource_version(type_url, n) is None)
        if not send and not removed and not state.answer:
            state.owed.clear()
            return None
        return send, removed

    def _respond(self, type_url: str, state: _DeltaState, snapshot: Snapshot,
                 names: list[str], removed: list[str]) -> DeltaResponse:
        versions = [snapshot.resource_version(type_url, n) or "" for n in names]
        for child in CHILDREN.get(type_url, ()) if names else ():
            child_state = self._types.get(child)
            if child_state is None:
                continue
            # A cluster's load assignment has its name; a listener's routes and filter
            # configs: owe them all.
            child_state.owed.update(names if child == types.ENDPOINT else
                                    (child_state.names | set(snapshot.names(child))))
        for name, version in zip(names, versions, strict=True):
            state.known[name] = version
        for name in removed:
            state.known.pop(name, None)
        nonce = str(next(self._nonces))
        state.sent_nonce = nonce
        state.sent_version = snapshot.version(type_url)
        state.sent_names = tuple(names)
        state.in_flight = True
        state.answer = False
        state.owed.clear()
        return DeltaResponse(type_url, state.sent_version, nonce,
                             tuple(snapshot.named(type_url, names)), tuple(names),
                             tuple(versions), tuple(removed), snapshot)
