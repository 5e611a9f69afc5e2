"""AdsServicer over a real in-process grpc.aio server and a real channel (no Envoy)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.rpc import status_pb2

from control_plane.errors import StartupError
from control_plane.xds import types
from control_plane.xds.protocol import Request, Response
from control_plane.xds.server import AdsServicer, start_xds_server, to_message, to_request
from control_plane.xds.snapshot import Snapshot

CDS, EDS = types.CLUSTER, types.ENDPOINT
TIMEOUT = 5.0


def make_snapshot(version: str, clusters: tuple[str, ...] = ("chat",)) -> Snapshot:
    return Snapshot(
        resources={
            CDS: {n: cluster_pb2.Cluster(name=n, type=cluster_pb2.Cluster.EDS) for n in clusters},
            EDS: {n: endpoint_pb2.ClusterLoadAssignment(cluster_name=n) for n in clusters},
            types.LISTENER: {},
            types.ROUTE: {},
        },
        versions={t: version for t in types.PUSH_ORDER},
    )


def request(type_url: str, *, node: str = "", version: str = "", nonce: str = "",
            names: tuple[str, ...] = (), error: str | None = None
            ) -> discovery_pb2.DiscoveryRequest:
    message = discovery_pb2.DiscoveryRequest(
        type_url=type_url, version_info=version, response_nonce=nonce,
        resource_names=list(names),
    )
    if node:
        message.node.CopyFrom(base_pb2.Node(id=node, cluster="test"))
    if error is not None:
        message.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    return message


def cluster_names(response: discovery_pb2.DiscoveryResponse) -> list[str]:
    names = []
    for packed in response.resources:
        cluster = cluster_pb2.Cluster()
        assert packed.Unpack(cluster)
        names.append(cluster.name)
    return names


class Client:
    """One ADS stream over a real channel; every read is bounded by TIMEOUT."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        self.call: Any = stub.StreamAggregatedResources()
        self.nonces: list[int] = []

    async def send(self, message: discovery_pb2.DiscoveryRequest) -> None:
        await asyncio.wait_for(self.call.write(message), TIMEOUT)

    async def read(self) -> discovery_pb2.DiscoveryResponse:
        response = await asyncio.wait_for(self.call.read(), TIMEOUT)
        assert response is not grpc.aio.EOF, "stream ended"
        assert isinstance(response, discovery_pb2.DiscoveryResponse)
        assert response.type_url in types.PUSH_ORDER
        nonce = int(response.nonce)
        assert not self.nonces or nonce > self.nonces[-1]
        self.nonces.append(nonce)
        return response

    async def ack(self, response: discovery_pb2.DiscoveryResponse,
                  names: tuple[str, ...] = ()) -> None:
        await self.send(request(response.type_url, version=response.version_info,
                                nonce=response.nonce, names=names))

    async def close(self) -> None:
        """Half-close and wait for the server to end the stream (its cleanup has run)."""
        await self.send_done()
        assert await asyncio.wait_for(self.call.read(), TIMEOUT) is grpc.aio.EOF
        assert await asyncio.wait_for(self.call.code(), TIMEOUT) == grpc.StatusCode.OK

    async def send_done(self) -> None:
        await asyncio.wait_for(self.call.done_writing(), TIMEOUT)


@pytest.fixture
async def server() -> AsyncIterator[tuple[AdsServicer, int]]:
    servicer = AdsServicer()
    grpc_server, port = await start_xds_server(servicer, "127.0.0.1:0")
    try:
        yield servicer, port
    finally:
        await grpc_server.stop(0)


@pytest.fixture
async def channel(server: tuple[AdsServicer, int]) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server[1]}") as chan:
        yield chan


async def test_port_zero_picks_a_port(server: tuple[AdsServicer, int]) -> None:
    assert server[1] > 0


async def test_connect_and_receive_published_snapshot(
    server: tuple[AdsServicer, int], channel: grpc.aio.Channel
) -> None:
    servicer, _ = server
    servicer.publish(make_snapshot("1-aaaa", ("chat", "code")))
    client = Client(channel)
    await client.send(request(CDS, node="envoy-1"))
    cds = await client.read()
    assert cds.type_url == CDS
    assert cds.version_info == "1-aaaa"
    assert cluster_names(cds) == ["chat", "code"]
    assert cds.nonce
    assert list(servicer.stats.connected.values()) == ["envoy-1"]
    assert servicer.stats.pushes == {"CDS": 1}
    await client.close()
    assert servicer.stats.connected == {}


async def test_publish_pushes_update(
    server: tuple[AdsServicer, int], channel: grpc.aio.Channel
) -> None:
    servicer, _ = server
    servicer.publish(make_snapshot("1-a"))
    client = Client(channel)
    await client.send(request(CDS, node="envoy-1"))
    first = await client.read()
    await client.ack(first)
    await client.send(request(EDS, names=("chat",)))
    eds = await client.read()  # also proves the CDS ACK was processed (one ordered queue)
    assert eds.type_url == EDS
    assert servicer.stats.acked["envoy-1"]["CDS"] == "1-a"
    await client.ack(eds, names=("chat",))

    servicer.publish(make_snapshot("2-b", ("chat", "code")))
    cds = await client.read()
    assert (cds.type_url, cds.version_info) == (CDS, "2-b")
    assert cluster_names(cds) == ["chat", "code"]
    eds2 = await client.read()
    assert (eds2.type_url, eds2.version_info) == (EDS, "2-b")
    assert int(eds2.nonce) > int(cds.nonce) > int(eds.nonce)
    await client.close()
    assert servicer.stats.pushes == {"CDS": 2, "EDS": 2}


async def test_request_before_first_snapshot_answered_on_publish(
    server: tuple[AdsServicer, int], channel: grpc.aio.Channel
) -> None:
    servicer, _ = server
    client = Client(channel)
    await client.send(request(CDS, node="envoy-1"))
    servicer.publish(make_snapshot("1-a"))
    cds = await client.read()
    assert (cds.type_url, cds.version_info) == (CDS, "1-a")
    await client.close()


async def test_two_concurrent_streams_both_receive_update(
    server: tuple[AdsServicer, int],
) -> None:
    servicer, port = server
    servicer.publish(make_snapshot("1-a"))
    # A local subchannel pool each: two TCP connections, as two Envoys would have.
    own = [("grpc.use_local_subchannel_pool", 1)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=own) as chan_a, \
            grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=own) as chan_b:
        clients = [Client(chan_a), Client(chan_b)]
        for i, client in enumerate(clients):
            await client.send(request(CDS, node=f"envoy-{i}"))
            await client.ack(await client.read())
        assert sorted(servicer.stats.connected.values()) == ["envoy-0", "envoy-1"]
        servicer.publish(make_snapshot("2-b", ("chat", "code")))
        updates = await asyncio.gather(*(client.read() for client in clients))
        for client, update in zip(clients, updates, strict=True):
            assert (update.type_url, update.version_info) == (CDS, "2-b")
            assert cluster_names(update) == ["chat", "code"]
            await client.ack(update)  # one response per type in flight: the next waits
        assert servicer.stats.pushes == {"CDS": 4}
        await clients[0].close()
        assert list(servicer.stats.connected.values()) == ["envoy-1"]
        # The remaining stream still gets pushes.
        servicer.publish(make_snapshot("3-c"))
        assert (await clients[1].read()).version_info == "3-c"
        await clients[1].close()
    assert servicer.stats.connected == {}


async def test_nack_counted_once_and_not_answered(
    server: tuple[AdsServicer, int], channel: grpc.aio.Channel
) -> None:
    servicer, _ = server
    servicer.publish(make_snapshot("1-a"))
    client = Client(channel)
    await client.send(request(CDS, node="envoy-1"))
    cds = await client.read()
    for _ in range(2):
        await client.send(request(CDS, nonce=cds.nonce, error="cluster chat: bad"))
    # Requests are handled in order: once EDS is answered, both NACKs have been seen.
    await client.send(request(EDS, names=("chat",)))
    eds = await client.read()
    assert eds.type_url == EDS
    assert servicer.stats.nacks == {"CDS": 1}
    assert servicer.stats.acked["envoy-1"]["CDS"] == ""
    assert servicer.stats.pushes == {"CDS": 1, "EDS": 1}
    await client.ack(eds, names=("chat",))
    # The rejected version is never re-sent; a newer one is.
    servicer.publish(make_snapshot("2-b"))
    update = await client.read()
    assert (update.type_url, update.version_info) == (CDS, "2-b")
    assert (await client.read()).type_url == EDS
    await client.close()
    assert servicer.stats.nacks == {"CDS": 1}


async def test_stream_without_node_id_is_not_listed(
    server: tuple[AdsServicer, int], channel: grpc.aio.Channel
) -> None:
    servicer, _ = server
    servicer.publish(make_snapshot("1-a"))
    client = Client(channel)
    await client.send(request(CDS))
    await client.read()
    assert servicer.stats.connected == {}
    await client.close()


async def test_server_stop_ends_open_stream(server: tuple[AdsServicer, int]) -> None:
    servicer, port = server
    servicer.publish(make_snapshot("1-a"))
    other = AdsServicer()
    grpc_server, other_port = await start_xds_server(other, "127.0.0.1:0")
    other.publish(make_snapshot("1-a"))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{other_port}") as chan:
        client = Client(chan)
        await client.send(request(CDS, node="envoy-1"))
        await client.read()
        await grpc_server.stop(0)
        with pytest.raises(grpc.aio.AioRpcError):
            await asyncio.wait_for(client.call.read(), TIMEOUT)
    assert port != other_port


async def test_bind_to_a_port_in_use_fails() -> None:
    servicer = AdsServicer()
    first, port = await start_xds_server(servicer, "127.0.0.1:0")
    try:
        with pytest.raises(StartupError, match="in use"):
            second, _ = await start_xds_server(AdsServicer(), f"127.0.0.1:{port}")
            await second.stop(0)
    finally:
        await first.stop(0)


async def test_connected_tracks_streams_sharing_one_connection(
    server: tuple[AdsServicer, int], channel: grpc.aio.Channel
) -> None:
    servicer, _ = server
    servicer.publish(make_snapshot("1-a"))
    first, second = Client(channel), Client(channel)
    await first.send(request(CDS, node="envoy-old"))
    await first.read()
    await second.send(request(CDS, node="envoy-new"))
    await second.read()
    await first.close()
    try:
        assert list(servicer.stats.connected.values()) == ["envoy-new"]
    finally:
        await second.close()


# --- conversions ----------------------------------------------------------------------------


def test_to_request_reads_every_field() -> None:
    assert to_request(request(EDS, version="v1", nonce="3", names=("a", "b"),
                              error="boom")) == Request(EDS, "v1", "3", ("a", "b"), "boom")
    assert to_request(request(CDS)).error_message is None


def test_to_message_packs_resources() -> None:
    cluster = cluster_pb2.Cluster(name="chat")
    message = to_message(Response(CDS, "7-x", "12", (cluster,)))
    assert (message.type_url, message.version_info, message.nonce) == (CDS, "7-x", "12")
    (packed,) = message.resources
    assert packed.type_url == CDS
    assert cluster_names(message) == ["chat"]


# --- latest wins, shared encoding, delta ----------------------------------------------------


async def test_stalled_stream_receives_only_the_latest_version(
    server: tuple[AdsServicer, int], channel: grpc.aio.Channel
) -> None:
    servicer, _ = server
    servicer.publish(make_snapshot("1-a"))
    client = Client(channel)
    await client.send(request(CDS, node="envoy-slow"))
    first = await client.read()
    # Envoy is busy applying v1: every version published meanwhile waits, and only the
    # newest is sent once it answers.
    for n in range(2, 30):
        servicer.publish(make_snapshot(f"{n}-x", ("chat", f"c{n}")))
    await asyncio.sleep(0.1)
    await client.ack(first)
    latest = await client.read()
    assert (latest.type_url, latest.version_info) == (CDS, "29-x")
    assert cluster_names(latest) == ["c29", "chat"]
    await client.ack(latest)
    await client.send(request(EDS, names=("chat",)))
    assert (await client.read()).type_url == EDS
    await client.close()
    assert servicer.stats.pushes == {"CDS": 2, "EDS": 1}


def test_encoded_response_equals_the_packed_message() -> None:
    from control_plane.xds.protocol import AdsStream
    from control_plane.xds.server import encode

    snapshot = make_snapshot("1-a", ("chat", "code"))
    (response,) = AdsStream().on_request(Request(CDS), snapshot)[0]
    decoded = discovery_pb2.DiscoveryResponse.FromString(encode(response))
    assert decoded == to_message(response)
    # The entries are made once per resource version and shared by every stream.
    assert snapshot.sotw_entry(CDS, "chat") is snapshot.sotw_entry(CDS, "chat")


async def test_delta_stream_subscribes_and_receives_only_changes(
    server: tuple[AdsServicer, int], channel: grpc.aio.Channel
) -> None:
    servicer, _ = server
    servicer.publish(make_snapshot("1-a", ("chat", "code")))
    stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
    call: Any = stub.DeltaAggregatedResources()

    async def read() -> discovery_pb2.DeltaDiscoveryResponse:
        reply = await asyncio.wait_for(call.read(), TIMEOUT)
        assert isinstance(reply, discovery_pb2.DeltaDiscoveryResponse)
        return reply

    await call.write(discovery_pb2.DeltaDiscoveryRequest(
        type_url=CDS, node=base_pb2.Node(id="envoy-delta")))
    cds = await read()
    assert [r.name for r in cds.resources] == ["chat", "code"]
    assert all(r.version == "1-a" for r in cds.resources)
    await call.write(discovery_pb2.DeltaDiscoveryRequest(type_url=CDS, response_nonce=cds.nonce))
    await call.write(discovery_pb2.DeltaDiscoveryRequest(
        type_url=EDS, resource_names_subscribe=["chat"]))
    eds = await read()
    assert [r.name for r in eds.resources] == ["chat"]
    await call.write(discovery_pb2.DeltaDiscoveryRequest(type_url=EDS, response_nonce=eds.nonce))
    servicer.publish(make_snapshot("2-b", ("chat",)))
    cds2 = await read()
    assert list(cds2.removed_resources) == ["code"]
    assert [r.name for r in cds2.resources] == ["chat"]
    eds2 = await read()
    assert eds2.type_url == EDS and [r.name for r in eds2.resources] == ["chat"]
    assert list(servicer.stats.connected.values()) == ["envoy-delta"]
    await call.done_writing()
    assert await asyncio.wait_for(call.read(), TIMEOUT) is grpc.aio.EOF
