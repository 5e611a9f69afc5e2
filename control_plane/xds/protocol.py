"""AdsStream: the state-of-the-world ADS protocol for one Envoy stream, without IO.

Requests and snapshots go in, responses (and NACK reports) come out. Rules, per type URL:

- A request whose nonce is not the last one sent for its type is stale and ignored.
- A request with ``error_detail`` is a NACK: reported once, and the rejected version is
  never sent again; only a newer snapshot version is.
- The first request of a type, a change of subscribed names, or a newer snapshot version
  gets a response.
- After a CDS (LDS) response Envoy re-creates the changed clusters (listeners) and asks for
  their EDS (RDS) again with the version and nonce it already has; that next request is
  answered, or the new clusters stay warming until the initial fetch timeout.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from google.protobuf.message import Message

from control_plane.xds import types
from control_plane.xds.snapshot import Snapshot

# After a response of the key type, the next request of the value type is answered.
_RESEND_AFTER = {types.CLUSTER: types.ENDPOINT, types.LISTENER: types.ROUTE}
# Types whose resources are requested by name; the others are wildcard subscriptions.
_NAMED = (types.ENDPOINT, types.ROUTE)


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
    names: frozenset[str] | None = None
    sent_version: str | None = None
    sent_nonce: str = ""
    sent_names: tuple[str, ...] = ()
    acked_version: str = ""
    rejected_version: str | None = None
    resend_pending: bool = False
    reported: set[str] = field(default_factory=set)


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
        first = not state.subscribed
        state.subscribed = True
        # Empty names on CDS/LDS, or the explicit "*", subscribe to everything.
        names = (
            frozenset(request.resource_names)
            if (request.type_url in _NAMED or request.resource_names)
            and "*" not in request.resource_names
            else None
        )
        names_changed = names != state.names
        state.names = names
        nack: Nack | None = None
        if request.error_message is not None:
            version = state.sent_version or ""
            state.rejected_version = version
            if version not in state.reported:
                state.reported.add(version)
                nack = Nack(request.type_url, version, request.error_message, state.sent_names)
        elif request.response_nonce:
            state.acked_version = request.version_info
        if not snapshot.versions:
            return [], nack  # nothing read from etcd yet: answer once the first snapshot exists
        resend = state.resend_pending
        state.resend_pending = False
        if first or names_changed or resend or self._is_new(state, snapshot, request.type_url):
            if request.error_message is not None and not names_changed:
                return [], nack
            return [self._respond(request.type_url, state, snapshot)], nack
        return [], nack

    def on_snapshot(self, snapshot: Snapshot) -> list[Response]:
        """Responses for every subscribed type whose version changed, in push order."""
        return [
            self._respond(type_url, self._types[type_url], snapshot)
            for type_url in types.PUSH_ORDER
            if type_url in self._types
            and self._types[type_url].subscribed
            and self._is_new(self._types[type_url], snapshot, type_url)
        ]

    @staticmethod
    def _is_new(state: _TypeState, snapshot: Snapshot, type_url: str) -> bool:
        version = snapshot.version(type_url)
        return version != state.sent_version and version != state.rejected_version

    def _respond(self, type_url: str, state: _TypeState, snapshot: Snapshot) -> Response:
        resources = tuple(snapshot.named(type_url, state.names))
        nonce = str(next(self._nonces))
        state.sent_version = snapshot.version(type_url)
        state.sent_nonce = nonce
        state.sent_names = tuple(sorted(getattr(r, "name", "") or getattr(r, "cluster_name", "")
                                        for r in resources))
        follower = _RESEND_AFTER.get(type_url)
        if follower is not None and follower in self._types:
            self._types[follower].resend_pending = True
        return Response(type_url, state.sent_version, nonce, resources)
