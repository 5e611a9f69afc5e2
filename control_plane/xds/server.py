"""grpc.aio shell around AdsStream: one task per connected Envoy, snapshots fanned out."""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2

from control_plane.errors import StartupError
from control_plane.xds.protocol import AdsStream, Request, Response
from control_plane.xds.snapshot import Snapshot
from control_plane.xds.types import SHORT_NAMES

log = logging.getLogger(__name__)


@dataclass
class XdsStats:
    """Counters for /metrics and status."""

    connected: dict[int, str] = field(default_factory=dict)  # stream id -> node id
    pushes: dict[str, int] = field(default_factory=dict)  # type short name -> responses sent
    nacks: dict[str, int] = field(default_factory=dict)
    acked: dict[str, dict[str, str]] = field(default_factory=dict)  # node -> type -> version


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


class AdsServicer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    """Serves the current snapshot to every Envoy; ``publish`` pushes a new one."""

    def __init__(self) -> None:
        self.snapshot = Snapshot()
        self.stats = XdsStats()
        self._stream_ids = itertools.count(1)
        self._streams: set[asyncio.Queue[discovery_pb2.DiscoveryRequest | Snapshot | None]] = set()

    def publish(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        for events in self._streams:
            events.put_nowait(snapshot)

    async def StreamAggregatedResources(  # noqa: N802 (gRPC method name)
        self,
        request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[discovery_pb2.DiscoveryResponse]:
        peer = context.peer()
        stream_id = next(self._stream_ids)  # streams may share one connection (one peer)
        stream = AdsStream()
        # One queue per stream carries both Envoy's requests and new snapshots, in order.
        events: asyncio.Queue[discovery_pb2.DiscoveryRequest | Snapshot | None] = (
            asyncio.Queue()
        )
        node_id = "?"

        async def read() -> None:
            try:
                async for message in request_iterator:
                    await events.put(message)
            finally:
                await events.put(None)

        reader = asyncio.create_task(read())
        self._streams.add(events)
        try:
            while True:
                event = await events.get()
                if event is None:
                    return
                if isinstance(event, Snapshot):
                    responses = stream.on_snapshot(event)
                else:
                    node_id = self._note_node(stream_id, peer, event, node_id)
                    responses = self._on_request(stream, event, node_id)
                for response in responses:
                    short = SHORT_NAMES.get(response.type_url, response.type_url)
                    self.stats.pushes[short] = self.stats.pushes.get(short, 0) + 1
                    log.debug("push %s %s to %s", short, response.version_info, node_id)
                    yield to_message(response)
        finally:
            self._streams.discard(events)
            self.stats.connected.pop(stream_id, None)
            reader.cancel()
            log.info("envoy %s disconnected", node_id)

    def _note_node(self, stream_id: int, peer: str, message: discovery_pb2.DiscoveryRequest,
                   node_id: str) -> str:
        if not message.node.id:
            return node_id  # Envoy sends the node only on a stream's first request
        if stream_id not in self.stats.connected:
            log.info("envoy %s connected from %s", message.node.id, peer)
        self.stats.connected[stream_id] = message.node.id
        return str(message.node.id)

    def _on_request(self, stream: AdsStream, message: discovery_pb2.DiscoveryRequest,
                    node_id: str) -> list[Response]:
        request = to_request(message)
        responses, nack = stream.on_request(request, self.snapshot)
        short = SHORT_NAMES.get(request.type_url, request.type_url)
        if nack is not None:
            self.stats.nacks[short] = self.stats.nacks.get(short, 0) + 1
            log.error(
                "envoy %s rejected %s version %s (resources %s): %s",
                node_id, short, nack.version_info, ", ".join(nack.resource_names) or "-",
                nack.message,
            )
        self.stats.acked.setdefault(node_id, {})[short] = stream.acked(request.type_url)
        return responses


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
        try:
            probe.bind((host.strip("[]") or "0.0.0.0", int(port)))
        except OSError as exc:
            raise StartupError(f"cannot bind the xDS server to {address}: {exc.strerror}"
                               ) from None


async def start_xds_server(servicer: AdsServicer, address: str,
                           tls: XdsServerTls | None = None) -> tuple[grpc.aio.Server, int]:
    """Start the ADS server on ``host:port`` (port 0 picks one); returns it and the port."""
    server = grpc.aio.server(
        options=[
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            # A second control plane on the same port must fail, not split the Envoys.
            ("grpc.so_reuseport", 0),
        ]
    )
    ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(servicer, server)
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
