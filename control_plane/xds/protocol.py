"""AdsStream: the state-of-the-world ADS protocol for one Envoy stream, without IO.

Requests and snapshots go in, responses (and NACK reports) come out. Rules, per type URL:

- A request whose nonce is not the last one sent for its type is stale and ignored.
- At most one response per type is in flight: the next goes out when Envoy has answered
  the last (ACK, NACK, or any request carrying its nonce), and it carries the latest
  snapshot, so a slow Envoy skips the versions published in between (latest wins).
- A request with ``error_detail`` is a NACK: reported once, and the rejected version is
  never sent again; only a newer snapshot version is.
- The first request of a type, or newly subscribed names, get a response.
- CDS and LDS are wildcard: a response carries every resource (the protocol requires the
  full state for them). EDS, RDS and ECDS (the Lua filter's config) are per name, and a
  SotW response for them may carry a subset ("the client must not delete the unchanged
  resources", xDS protocol, grouping resources into responses): only the resources whose
  version differs from what this stream was sent go out, so a change in pool A sends no
  EDS for pool B.
- Push order is CDS before EDS and LDS before ECDS and RDS, within one change too: while a
  CDS (LDS) change waits for its in-flight response, EDS (ECDS, RDS) changes wait behind
  it. Envoy subscribes to an ECDS name only once it has a listener that references it.
- A CDS (LDS) response re-creates the changed clusters (listeners) in Envoy, and those
  wait for their EDS (RDS, ECDS) again even when it did not change: the EDS (RDS, ECDS)
  response that follows carries them, or, when one is in flight, the answer to Envoy's
  next request of that type does (Envoy re-requests with the version and nonce it has).
  Unanswered, the re-created clusters stay warming until the initial fetch timeout.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from google.protobuf.message import Message

from control_plane.xds import types
from control_plane.xds.snapshot import Snapshot

# A response of the key type re-creates resources whose value-type resources it owes.
CHILDREN = {types.CLUSTER: (types.ENDPOINT,),
            types.LISTENER: (types.ROUTE, types.EXTENSION_CONFIG)}
PARENT = {child: parent for parent, children in CHILDREN.items() for child in children}
# Types whose resources are requested by name; the others are wildcard subscriptions.
NAMED = (types.ENDPOINT, types.ROUTE, types.EXTENSION_CONFIG)


@dataclass(frozen=True)
class Request:
    type_url: str
    version_info: str = ""
    response_nonce: str = ""
    resource_names: tuple[str, ...] = ()
    error_message: str | None = None


@dataclass(frozen=True)
class Response:
    type_url: str
    version_info: str
    nonce: str
    resources: tuple[Message, ...]
    # Names of ``resources`` and the snapshot they come from: the server encodes each from
    # the snapshot's shared, serialized-once entries.
    names: tuple[str, ...] = ()
    snapshot: Snapshot | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Nack:
    """Envoy rejected a version; report it once."""

    type_url: str
    version_info: str
    message: str
    resource_names: tuple[str, ...]


@dataclass
class _TypeState:
    subscribed: bool = False
    names: frozenset[str] | None = None  # None: wildcard
    synced_version: str | None = None  # snapshot type version this stream is up to date with
    sent_version: str = ""
    sent_nonce: str = ""
    sent_names: tuple[str, ...] = ()
    in_flight: bool = False
    acked_version: str = ""
    rejected_version: str | None = None
    reported: set[str] = field(default_factory=set)
    known: dict[str, str] = field(default_factory=dict)  # name -> resource version sent
    owed: set[str] = field(default_factory=set)  # names to send again (parent re-created)
    owed_all: bool = False
    answer: bool = False  # a request that must get a response, even an empty one


def subscription(type_url: str, resource_names: tuple[str, ...]) -> frozenset[str] | None:
    """Empty names on CDS/LDS, or the explicit "*", subscribe to everything (None)."""
    if "*" in resource_names or (type_url not in NAMED and not resource_names):
        return None
    return frozenset(resource_names)


class AdsStream:
    """Protocol state of one ADS stream."""

    def __init__(self) -> None:
        self._types: dict[str, _TypeState] = {}
        self._nonces = itertools.count(1)

    def acked(self, type_url: str) -> str:
        """The last version Envoy acknowledged for a type ('' before any ACK)."""
        state = self._types.get(type_url)
        return state.acked_version if state else ""

    def on_request(self, request: Request, snapshot: Snapshot
                   ) -> tuple[list[Response], Nack | None]:
        state = self._types.setdefault(request.type_url, _TypeState())
        if request.response_nonce and request.response_nonce != state.sent_nonce:
            return [], None  # stale: Envoy has not seen our latest response yet
        if request.response_nonce:
            state.in_flight = False
        first = not state.subscribed
        state.subscribed = True
        names = subscription(request.type_url, request.resource_names)
        if first:
            state.answer = True
        elif names != state.names:
            if names is None or state.names is None:
                state.answer = True
            else:
                state.answer = state.answer or bool(names - state.names)
                for gone in state.names - names:
                    state.known.pop(gone, None)
        state.names = names
        nack: Nack | None = None
        if request.error_message is not None:
            version = state.sent_version
            state.rejected_version = version
            if version not in state.reported:
                state.reported.add(version)
                nack = Nack(request.type_url, version, request.error_message, state.sent_names)
        elif request.response_nonce:
            state.acked_version = request.version_info
        if not snapshot.versions:
            return [], nack  # nothing read from etcd yet: answer once the first snapshot exists
        return self._flush(snapshot), nack

    def on_snapshot(self, snapshot: Snapshot) -> list[Response]:
        """Responses for every subscribed type with something new, in push order."""
        return self._flush(snapshot)

    def _flush(self, snapshot: Snapshot) -> list[Response]:
        responses: list[Response] = []
        if not snapshot.versions:
            return responses  # nothing read from etcd yet: answer once the first snapshot exists
        held: set[str] = set()
        for type_url in types.PUSH_ORDER:
            state = self._types.get(type_url)
            if state is None or not state.subscribed:
                continue
            names = self._due(type_url, state, snapshot)
            if names is None:
                continue
            if state.in_flight or PARENT.get(type_url) in held:
                held.add(type_url)  # waits for the ACK (and for its parent type)
                continue
            responses.append(self._respond(type_url, state, snapshot, names))
        return responses

    @staticmethod
    def _due(type_url: str, state: _TypeState, snapshot: Snapshot) -> list[str] | None:
        """Names to send now, or None when nothing is due."""
        version = snapshot.version(type_url)
        newer = version not in (state.synced_version, state.rejected_version)
        present = snapshot.names(type_url)
        if type_url not in NAMED:
            return present if newer or state.answer else None
        if not (newer or state.answer or state.owed or state.owed_all):
            return None
        subscribed = present if state.names is None else [n for n in present
                                                          if n in state.names]
        due = [n for n in subscribed
               if state.owed_all or n in state.owed
               or snapshot.resource_version(type_url, n) != state.known.get(n)]
        if not due and not state.answer:
            state.synced_version = version  # nothing of it for this stream
            state.owed.clear()
            state.owed_all = False
            return None
        return due

    def _respond(self, type_url: str, state: _TypeState, snapshot: Snapshot,
                 names: list[str]) -> Response:
        versions = {n: snapshot.resource_version(type_url, n) or "" for n in names}
        recreated = [n for n in names if state.known.get(n) != versions[n]]
        for child in CHILDREN.get(type_url, ()) if recreated else ():
            if child not in self._types:
                continue
            if child == types.ENDPOINT:  # a cluster's load assignment has its name
                self._types[child].owed.update(recreated)
            else:  # a listener's routes and filter configs: owe them all
                self._types[child].owed_all = True
        if type_url not in NAMED:
            state.known = versions
        else:
            state.known.update(versions)
        nonce = str(next(self._nonces))
        state.synced_version = state.sent_version = snapshot.version(type_url)
        state.sent_nonce = nonce
        state.sent_names = tuple(names)
        state.in_flight = True
        state.answer = False
        state.owed.clear()
        state.owed_all = False
        return Response(type_url, state.sent_version, nonce,
                        tuple(snapshot.named(type_url, names)), tuple(names), snapshot)
