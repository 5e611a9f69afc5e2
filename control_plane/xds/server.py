"""grpc.aio shell around AdsStream (SotW) and DeltaStream: one task per connected Envoy.

Publishing is latest-wins: ``publish`` only replaces the servicer's snapshot and wakes every
stream; a stream hands the newest snapshot to its protocol when it gets to it, so a slow
Envoy never works through a queue of intermediate versions. Responses are encoded from the
snapshot's shared entries (each resource serialized once per version, for every stream)
and written as bytes.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import grpc
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

from control_plane.errors import StartupError
from control_plane.xds.delta import DeltaRequest, DeltaResponse, DeltaStream
from control_plane.xds.protocol import AdsStream, Nack, Request, Response
from control_plane.xds.snapshot import Snapshot
from control_plane.xds.types import EXTENSION_CONFIG, SHORT_NAMES

log = logging.getLogger(__name__)

ADS_SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
M = TypeVar("M")


@dataclass
class XdsStats:
    """Counters for /metrics and status."""

    connected: dict[int, str] = field(default_factory=dict)  # stream id -> node id
    pushes: dict[str, int] = field(default_factory=dict)  # type short name -> responses sent
    nacks: dict[str, int] = field(default_factory=dict)
    acked: dict[str, dict[str, str]] = field(default_factory=dict)  # node -> type -> version
    bytes_sent: int = 0


def to_request(message: discovery_pb2.DiscoveryRequest) -> Request:
    error = message.error_detail.message if message.HasField("error_detail") else None
    return Request(
        type_url=message.type_url,
        version_info=message.version_info,
        response_nonce=message.response_nonce,
        resource_names=tuple(message.resource_names),
        error_message=error,
    )


def to_message(response: Response) -> discovery_pb2.DiscoveryResponse:
    resources = []
    for resource in response.resources:
        packed = any_pb2.Any()
        packed.Pack(resource)
        resources.append(packed)
    return discovery_pb2.DiscoveryResponse(
        version_info=response.version_info,
        resources=resources,
        type_url=response.type_url,
        nonce=response.nonce,
    )


def to_delta_request(message: discovery_pb2.DeltaDiscoveryRequest) -> DeltaRequest:
    error = message.error_detail.message if message.HasField("error_detail") else None
    return DeltaRequest(
        type_url=message.type_url,
        response_nonce=message.response_nonce,
        subscribe=tuple(message.resource_names_subscribe),
        unsubscribe=tuple(message.resource_names_unsubscribe),
        initial_versions=dict(message.initial_resource_versions),
        error_message=error,
    )


def encode(response: Response) -> bytes:
    """The DiscoveryResponse as bytes: a small header plus each resource's shared entry
    (concatenated serialized messages parse as their merge; repeated fields append)."""
    header = discovery_pb2.DiscoveryResponse(
        version_info=response.version_info, type_url=response.type_url, nonce=response.nonce,
    ).SerializeToString()
    snapshot = response.snapshot
    if snapshot is None or len(response.names) != len(response.resources):
        return bytes(to_message(response).SerializeToString())
    entries = (snapshot.sotw_entry(response.type_url, n) for n in response.names)
    return bytes(header) + b"".join(entries)


def to_delta_message(response: DeltaResponse) -> discovery_pb2.DeltaDiscoveryResponse:
    resources = []
    for name, version, resource in zip(response.names, response.versions, response.resources,
                                       strict=True):
        packed = any_pb2.Any()
        packed.Pack(resource, deterministic=True)
        resources.append(discovery_pb2.Resource(name=name, version=version, resource=packed))
    return discovery_pb2.DeltaDiscoveryResponse(
        system_version_info=response.system_version_info, resources=resources,
        type_url=response.type_url, nonce=response.nonce,
        removed_resources=list(response.removed),
    )


def encode_delta(response: DeltaResponse) -> bytes:
    header = discovery_pb2.DeltaDiscoveryResponse(
        system_version_info=response.system_version_info, type_url=response.type_url,
        nonce=response.nonce, removed_resources=list(response.removed),
    ).SerializeToString()
    snapshot = response.snapshot
    if snapshot is None:
        return bytes(to_delta_message(response).SerializeToString())
    entries = (snapshot.delta_entry(response.type_url, n) for n in response.names)
    return bytes(header) + b"".join(entries)


def _serialize(message: Any) -> bytes:
    return message if isinstance(message, bytes) else bytes(message.SerializeToString())


class AdsServicer:
    """Serves the current snapshot to every Envoy, over SotW and delta ADS; ``publish``
    makes a new one current (latest wins)."""

    def __init__(self) -> None:
        self.snapshot = Snapshot()
        self.stats = XdsStats()
        self._stream_ids = itertools.count(1)
        self._wakers: set[asyncio.Event] = set()
        # Called after an Envoy acknowledged a filter config (ECDS): held ring changes wait
        # for it (app.py).
        self.on_ack: Callable[[], None] | None = None

    def publish(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        for wake in self._wakers:
            wake.set()

    def add_to(self, server: grpc.aio.Server) -> None:
        """Register both ADS methods; responses are written as the bytes ``encode`` made."""
        handlers = {
            "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                self.StreamAggregatedResources,
                request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
                response_serializer=_serialize),
            "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
                self.DeltaAggregatedResources,
                request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
                response_serializer=_serialize),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(ADS_SERVICE,
                                                                              handlers),))

    async def StreamAggregatedResources(  # noqa: N802 (gRPC method name)
        self,
        request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[bytes]:
        stream = AdsStream()

        def on_request(message: discovery_pb2.DiscoveryRequest, node_id: str
                       ) -> list[tuple[str, str, bytes]]:
            request = to_request(message)
            responses, nack = stream.on_request(request, self.snapshot)
            self._note_ack(node_id, request.type_url, stream.acked(request.type_url), nack)
            return [(r.type_url, r.version_info, encode(r)) for r in responses]

        def on_snapshot(snapshot: Snapshot) -> list[tuple[str, str, bytes]]:
            return [(r.type_url, r.version_info, encode(r)) for r in stream.on_snapshot(snapshot)]

        async for data in self._serve(request_iterator, context, on_request, on_snapshot):
            yield data

    async def DeltaAggregatedResources(  # noqa: N802 (gRPC method name)
        self,
        request_iterator: AsyncIterator[discovery_pb2.DeltaDiscoveryRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[bytes]:
        stream = DeltaStream()

        def on_request(message: discovery_pb2.DeltaDiscoveryRequest, node_id: str
                       ) -> list[tuple[str, str, bytes]]:
            request = to_delta_request(message)
            responses, nack = stream.on_request(request, self.snapshot)
            self._note_ack(node_id, request.type_url, stream.acked(request.type_url), nack)
            return [(r.type_url, r.system_version_info, encode_delta(r)) for r in responses]

        def on_snapshot(snapshot: Snapshot) -> list[tuple[str, str, bytes]]:
            return [(r.type_url, r.system_version_info, encode_delta(r))
                    for r in stream.on_snapshot(snapshot)]

        async for data in self._serve(request_iterator, context, on_request, on_snapshot):
            yield data

    async def _serve(
        self,
        request_iterator: AsyncIterator[M],
        context: grpc.aio.ServicerContext[Any, Any],
        on_request: Callable[[M, str], list[tuple[str, str, bytes]]],
        on_snapshot: Callable[[Snapshot], list[tuple[str, str, bytes]]],
    ) -> AsyncIterator[bytes]:
        """One stream: Envoy's requests in order, then the newest snapshot, repeatedly.

        Everything a round sends is encoded before the first write, so a publish during a
        slow write never mixes two snapshots in one round; it wakes the next round."""
        peer = context.peer()
        stream_id = next(self._stream_ids)  # streams may share one connection (one peer)
        pending: list[M] = []
        wake = asyncio.Event()
        ended = False
        node_id = "?"

        async def read() -> None:
            nonlocal ended
            try:
                async for message in request_iterator:
                    pending.append(message)
                    wake.set()
            finally:
                ended = True
                wake.set()

        reader = asyncio.create_task(read())
        self._wakers.add(wake)
        seen: Snapshot | None = None
        try:
            while True:
                await wake.wait()
                wake.clear()
                batch: list[tuple[str, str, bytes]] = []
                while pending:
                    message = pending.pop(0)
                    node_id = self._note_node(stream_id, peer, message, node_id)
                    batch.extend(on_request(message, node_id))
                if self.snapshot is not seen:
                    seen = self.snapshot
                    batch.extend(on_snapshot(seen))
                for type_url, version, data in batch:
                    short = SHORT_NAMES.get(type_url, type_url)
                    self.stats.pushes[short] = self.stats.pushes.get(short, 0) + 1
                    self.stats.bytes_sent += len(data)
                    log.debug("push %s %s to %s", short, version, node_id)
                    yield data
                if ended and not pending:
                    return
        finally:
            self._wakers.discard(wake)
            self.stats.connected.pop(stream_id, None)
            reader.cancel()
            log.info("envoy %s disconnected", node_id)

    def _note_node(self, stream_id: int, peer: str, message: Any, node_id: str) -> str:
        if not message.node.id:
            return node_id  # Envoy sends the node only on a stream's first request
        if stream_id not in self.stats.connected:
            log.info("envoy %s connected from %s", message.node.id, peer)
        self.stats.connected[stream_id] = message.node.id
        return str(message.node.id)

    def _note_ack(self, node_id: str, type_url: str, acked: str, nack: Nack | None) -> None:
        short = SHORT_NAMES.get(type_url, type_url)
        if nack is not None:
            self.stats.nacks[short] = self.stats.nacks.get(short, 0) + 1
            log.error(
                "envoy %s rejected %s version %s (resources %s): %s",
                node_id, short, nack.version_info, ", ".join(nack.resource_names) or "-",
                nack.message,
            )
        self.stats.acked.setdefault(node_id, {})[short] = acked
        if nack is None and type_url == EXTENSION_CONFIG and self.on_ack is not None:
            self.on_ack()


@dataclass(frozen=True)
class XdsServerTls:
    """PEM contents. With ``client_ca`` every Envoy must present a certificate it signed."""

    cert: bytes
    key: bytes
    client_ca: bytes | None = None


def _check_free(address: str) -> None:
    """Refuse a port in use before gRPC tries it (gRPC's own failure is a multi-line log)."""
    host, _, port = address.rpartition(":")
    if not port.isdigit() or int(port) == 0:
        return
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As gRPC binds: connections of a killed predecessor left in TIME_WAIT do not
        # block the port, a listening socket does.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host.strip("[]") or "0.0.0.0", int(port)))
        except OSError as exc:
            raise StartupError(f"cannot bind the xDS server to {address}: {exc.strerror}"
                               ) from None


class GrpcService(Protocol):
    def add_to(self, server: grpc.aio.Server) -> None: ...


async def start_xds_server(servicer: AdsServicer, address: str,
                           tls: XdsServerTls | None = None,
                           others: Sequence[GrpcService] = ()) -> tuple[grpc.aio.Server, int]:
    """Start the ADS server on ``host:port`` (port 0 picks one), with ``others`` (the
    access-log service) on the same port; returns it and the port."""
    server = grpc.aio.server(
        options=[
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            # A second control plane on the same port must fail, not split the Envoys.
            ("grpc.so_reuseport", 0),
        ]
    )
    servicer.add_to(server)
    for service in others:
        service.add_to(server)
    _check_free(address)
    try:
        if tls is None:
            port = server.add_insecure_port(address)
        else:
            credentials = grpc.ssl_server_credentials(
                [(tls.key, tls.cert)], root_certificates=tls.client_ca,
                require_client_auth=tls.client_ca is not None)
            port = server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        raise StartupError(f"cannot bind the xDS server to {address} (in use?): {exc}") from None
    await server.start()
    return server, port
