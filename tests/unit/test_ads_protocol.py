"""AdsStream, the sans-IO state-of-the-world ADS protocol, driven by a checking fake Envoy.

In the style of go-control-plane's server tests: every response the stream sends goes through
``FakeEnvoy._sent``, which checks that nonces strictly increase on the stream, that the type
URL is one we serve, that every resource is of that type, that the version is the one the
snapshot holds for the type, that CDS/LDS responses carry every resource (state of the world)
and that at most one response per type is in flight (the next waits for Envoy's answer).
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import extension_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from google.protobuf import any_pb2
from google.protobuf.message import Message

from control_plane.xds import types
from control_plane.xds.protocol import AdsStream, Nack, Request, Response
from control_plane.xds.snapshot import Snapshot

CDS, EDS, LDS, RDS = types.CLUSTER, types.ENDPOINT, types.LISTENER, types.ROUTE
ECDS = types.EXTENSION_CONFIG
LUA = "hotpath-lua"


def make_snapshot(
    versions: str | dict[str, str],
    clusters: Iterable[str] = ("a", "b"),
    routes: Iterable[str] = ("hotpath",),
) -> Snapshot:
    """A snapshot with one ClusterLoadAssignment per cluster; versions per type or for all."""
    clusters = list(clusters)
    resources: dict[str, dict[str, Message]] = {
        CDS: {n: cluster_pb2.Cluster(name=n, type=cluster_pb2.Cluster.EDS) for n in clusters},
        EDS: {n: endpoint_pb2.ClusterLoadAssignment(cluster_name=n) for n in clusters},
        LDS: {"hotpath": listener_pb2.Listener(name="hotpath")},
        RDS: {n: route_pb2.RouteConfiguration(name=n) for n in routes},
        ECDS: {LUA: extension_pb2.TypedExtensionConfig(name=LUA)},
    }
    if isinstance(versions, str):
        versions = {t: versions for t in types.PUSH_ORDER}
    return Snapshot(resources=resources, versions=versions)


def bump(snapshot: Snapshot, *type_urls: str, version: str) -> Snapshot:
    return Snapshot(resources=snapshot.resources,
                    versions={**snapshot.versions, **{t: version for t in type_urls}})


def resource_name(resource: Message) -> str:
    return str(getattr(resource, "name", "") or getattr(resource, "cluster_name", ""))


class FakeEnvoy:
    """Drives one AdsStream the way Envoy does, and checks every response it sends."""

    def __init__(self) -> None:
        self.stream = AdsStream()
        self.sent: list[Response] = []
        self.nacks: list[Nack] = []
        self.last: dict[str, Response] = {}
        self._last_nonce = 0
        self._unanswered: dict[str, str] = {}  # type -> nonce of the response in flight

    def _sent(self, responses: list[Response], snapshot: Snapshot) -> list[Response]:
        for response in responses:
            assert response.type_url in types.PUSH_ORDER, response.type_url
            nonce = int(response.nonce)
            assert nonce > self._last_nonce, f"nonce {nonce} after {self._last_nonce}"
            self._last_nonce = nonce
            assert response.version_info == snapshot.version(response.type_url)
            assert response.version_info, "a response must carry a version"
            assert response.type_url not in self._unanswered, "two responses in flight"
            self._unanswered[response.type_url] = response.nonce
            if response.type_url in (CDS, LDS):
                assert [resource_name(r) for r in response.resources] == sorted(
                    snapshot.resources[response.type_url])
            for resource in response.resources:
                packed = any_pb2.Any()
                packed.Pack(resource)
                assert packed.type_url == response.type_url
            self.last[response.type_url] = response
        self.sent.extend(responses)
        return responses

    def request(self, type_url: str, snapshot: Snapshot, *, version: str = "",
                nonce: str = "", names: Iterable[str] = (), error: str | None = None
                ) -> list[Response]:
        if nonce and self._unanswered.get(type_url) == nonce:
            del self._unanswered[type_url]
        responses, nack = self.stream.on_request(
            Request(type_url, version, nonce, tuple(names), error), snapshot
        )
        if nack is not None:
            self.nacks.append(nack)
        return self._sent(responses, snapshot)

    def ack(self, response: Response, snapshot: Snapshot, names: Iterable[str] = ()
            ) -> list[Response]:
        return self.request(response.type_url, snapshot, version=response.version_info,
                            nonce=response.nonce, names=names)

    def nack(self, response: Response, snapshot: Snapshot, accepted: str = "",
             names: Iterable[str] = (), error: str = "bad cluster") -> list[Response]:
        return self.request(response.type_url, snapshot, version=accepted,
                            nonce=response.nonce, names=names, error=error)

    def publish(self, snapshot: Snapshot) -> list[Response]:
        return self._sent(self.stream.on_snapshot(snapshot), snapshot)

    def connect(self, snapshot: Snapshot, eds: Iterable[str] = ("a", "b"),
                rds: Iterable[str] = ("hotpath",), ecds: bool = False) -> None:
        """Envoy's start-up: CDS, its EDS, LDS, its RDS (and ECDS, which Envoy asks for once
        it has the listener that references it); every response ACKed."""
        steps = [(CDS, ()), (EDS, eds), (LDS, ()), (RDS, rds)]
        if ecds:
            steps.insert(3, (ECDS, (LUA,)))
        for type_url, names in steps:
            (response,) = self.request(type_url, snapshot, names=names)
            assert self.ack(response, snapshot, names=names) == []


V1 = make_snapshot("v1")


def test_initial_requests_answered() -> None:
    envoy = FakeEnvoy()
    (cds,) = envoy.request(CDS, V1)
    assert cds.version_info == "v1"
    assert [resource_name(r) for r in cds.resources] == ["a", "b"]  # wildcard: all
    (eds,) = envoy.request(EDS, V1, names=["b"])
    assert [resource_name(r) for r in eds.resources] == ["b"]  # named: only those
    (lds,) = envoy.request(LDS, V1)
    assert [resource_name(r) for r in lds.resources] == ["hotpath"]
    (rds,) = envoy.request(RDS, V1, names=["hotpath"])
    assert [resource_name(r) for r in rds.resources] == ["hotpath"]
    assert [r.type_url for r in envoy.sent] == [CDS, EDS, LDS, RDS]
    assert envoy.nacks == []


def test_initial_request_with_a_version_from_a_previous_control_plane_answered() -> None:
    envoy = FakeEnvoy()
    (cds,) = envoy.request(CDS, V1, version="v0")
    assert cds.version_info == "v1"


def test_named_request_for_unknown_resource_answered_without_it() -> None:
    envoy = FakeEnvoy()
    (eds,) = envoy.request(EDS, V1, names=["a", "gone"])
    assert [resource_name(r) for r in eds.resources] == ["a"]


@pytest.mark.parametrize(
    ("type_url", "names"), [(CDS, ()), (EDS, ("a",)), (LDS, ()), (RDS, ("hotpath",))]
)
def test_ack_not_answered_again(type_url: str, names: tuple[str, ...]) -> None:
    envoy = FakeEnvoy()
    (response,) = envoy.request(type_url, V1, names=names)
    assert envoy.ack(response, V1, names=names) == []
    assert envoy.stream.acked(type_url) == "v1"
    assert envoy.publish(V1) == []  # same snapshot again: nothing to send


def test_acked_empty_before_any_ack() -> None:
    envoy = FakeEnvoy()
    assert envoy.stream.acked(CDS) == ""
    envoy.request(CDS, V1)
    assert envoy.stream.acked(CDS) == ""


def test_one_response_per_type_in_flight_and_latest_wins() -> None:
    envoy = FakeEnvoy()
    (first,) = envoy.request(CDS, V1)
    # Envoy has not answered v1 yet: v2 and v3 wait, and only the latest goes out.
    assert envoy.publish(bump(V1, CDS, version="v2")) == []
    v3 = bump(V1, CDS, version="v3")
    assert envoy.publish(v3) == []
    (latest,) = envoy.ack(first, v3)
    assert latest.version_info == "v3"
    assert envoy.stream.acked(CDS) == "v1"
    assert envoy.ack(latest, v3) == []
    assert [r.version_info for r in envoy.sent] == ["v1", "v3"]


def test_stale_nonce_ignored() -> None:
    envoy = FakeEnvoy()
    (zero,) = envoy.request(CDS, V1)
    v2 = bump(V1, CDS, version="v2")
    (first,) = envoy.ack(zero, v2)
    assert first.version_info == "v2"
    v3 = bump(V1, CDS, version="v3")
    (second,) = envoy.request(CDS, v3, version="v1", nonce=first.nonce)  # a re-request
    assert second.version_info == "v3"
    # Envoy ACKs the first response after we sent the second: stale, ignored.
    assert envoy.ack(first, v3) == []
    assert envoy.stream.acked(CDS) == "v1"
    # A NACK of the superseded response is stale as well: not reported, nothing re-sent.
    assert envoy.nack(first, v3) == []
    assert envoy.nacks == []
    # A nonce this stream never sent for the type (here: another type's) is stale too.
    (eds,) = envoy.request(EDS, v3, names=["a"])
    assert envoy.request(CDS, v3, version="v3", nonce=eds.nonce) == []
    assert envoy.stream.acked(CDS) == "v1"
    assert envoy.ack(second, v3) == []
    assert envoy.stream.acked(CDS) == "v3"


def test_stale_request_with_new_names_ignored() -> None:
    envoy = FakeEnvoy()
    (first,) = envoy.request(EDS, V1, names=["a"])
    v2 = bump(V1, EDS, version="v2")
    (second,) = envoy.ack(first, v2, names=["a"])
    assert envoy.request(EDS, v2, version="v1", nonce=first.nonce, names=["a", "b"]) == []
    (more,) = envoy.ack(second, v2, names=["a", "b"])
    assert [resource_name(r) for r in more.resources] == ["b"]


def test_nack_reported_once_and_rejected_version_never_resent() -> None:
    envoy = FakeEnvoy()
    envoy.connect(V1)
    v2 = bump(V1, CDS, version="v2")
    pushed, owed = envoy.publish(v2)
    assert pushed.type_url == CDS and pushed.version_info == "v2"
    assert owed.type_url == EDS  # the re-created clusters' load assignments follow
    assert envoy.ack(owed, v2, names=["a", "b"]) == []
    assert envoy.nack(pushed, v2, accepted="v1", error="cluster b: bad lb") == []
    assert envoy.nacks == [Nack(CDS, "v2", "cluster b: bad lb", ("a", "b"))]
    assert envoy.stream.acked(CDS) == "v1"  # a NACK acknowledges nothing
    # Envoy repeats the NACK (e.g. after another type's push): reported once, no re-send.
    assert envoy.nack(pushed, v2, accepted="v1", error="cluster b: bad lb") == []
    assert len(envoy.nacks) == 1
    # The same snapshot again (an unrelated etcd write): v2 is still rejected.
    assert envoy.publish(v2) == []
    # Another type changes: only that type goes out, never the rejected CDS v2.
    v2b = bump(v2, EDS, version="v2b")
    assert [r.type_url for r in envoy.publish(v2b)] == [EDS]
    assert all(r.type_url != CDS for r in envoy.ack(envoy.last[EDS], v2b, names=["a", "b"]))
    # A newer CDS version is sent, and a NACK of it is reported again.
    v3 = bump(v2b, CDS, version="v3")
    fixed, _ = envoy.publish(v3)
    assert fixed.type_url == CDS and fixed.version_info == "v3"
    envoy.nack(fixed, v3, accepted="v1", error="still bad")
    assert [n.version_info for n in envoy.nacks] == ["v2", "v3"]


def test_nack_of_named_type_reports_the_names_sent() -> None:
    envoy = FakeEnvoy()
    (eds,) = envoy.request(EDS, V1, names=["b"])
    assert envoy.nack(eds, V1, names=["b"], error="bad endpoint") == []
    assert envoy.nacks == [Nack(EDS, "v1", "bad endpoint", ("b",))]


def test_nack_then_newer_version_in_the_snapshot_given_to_the_request() -> None:
    # The server hands on_request its latest snapshot: the NACK ends the response in
    # flight, so the newer version goes out at once, and not again on publish.
    envoy = FakeEnvoy()
    (cds,) = envoy.request(CDS, V1)
    v2 = bump(V1, CDS, version="v2")
    (pushed,) = envoy.nack(cds, v2)
    assert [n.version_info for n in envoy.nacks] == ["v1"]
    assert pushed.version_info == "v2"
    assert envoy.publish(v2) == []


@pytest.mark.parametrize(("parent", "child", "names"),
                         [(CDS, EDS, ("a", "b")), (LDS, RDS, ("hotpath",))])
def test_parent_push_sends_the_recreated_childrens_resources_after_it(
        parent: str, child: str, names: tuple[str, ...]) -> None:
    envoy = FakeEnvoy()
    envoy.connect(V1)
    v2 = bump(V1, parent, version="v2")
    # Envoy re-creates the changed clusters (listeners), which wait for their EDS (RDS)
    # even though it did not change: it follows the parent, at its unchanged version.
    pushed, again = envoy.publish(v2)
    assert (pushed.type_url, again.type_url) == (parent, child)
    assert again.version_info == "v1"
    assert [resource_name(r) for r in again.resources] == sorted(names)
    assert envoy.ack(pushed, v2) == []
    # Envoy's re-request carries the version and nonce it has: nothing more is owed.
    assert envoy.request(child, v2, version="v1", nonce=again.nonce, names=names) == []


@pytest.mark.parametrize(("parent", "child", "names"),
                         [(CDS, EDS, ("a", "b")), (LDS, RDS, ("hotpath",))])
def test_rerequest_after_parent_push_is_answered_when_child_was_in_flight(
        parent: str, child: str, names: tuple[str, ...]) -> None:
    envoy = FakeEnvoy()
    envoy.connect(V1)
    v2 = bump(V1, child, version="v2")
    (in_flight,) = envoy.publish(v2)
    assert in_flight.type_url == child
    v3 = bump(v2, parent, version="v3")
    (pushed,) = envoy.publish(v3)  # the child owes the re-created ones but waits
    assert pushed.type_url == parent
    assert envoy.ack(pushed, v3) == []
    # Envoy re-created the clusters (listeners) and asks for their EDS (RDS) again with the
    # version and nonce it already has: looks like an ACK, must be answered.
    (again,) = envoy.request(child, v3, version="v2", nonce=in_flight.nonce, names=names)
    assert again.type_url == child
    assert again.version_info == "v2"
    assert [resource_name(r) for r in again.resources] == sorted(names)
    # Answered once: the ACK of that answer is not answered again.
    assert envoy.ack(again, v3, names=names) == []


@pytest.mark.parametrize(("parent", "child", "names"),
                         [(CDS, EDS, ("a", "b")), (LDS, RDS, ("hotpath",))])
def test_rerequest_without_parent_push_not_answered(parent: str, child: str,
                                                    names: tuple[str, ...]) -> None:
    envoy = FakeEnvoy()
    envoy.connect(V1)
    child_response = envoy.last[child]
    other = EDS if child == RDS else RDS  # a push of an unrelated type sets nothing up
    v2 = bump(V1, other, version="v2")
    envoy.publish(v2)
    assert envoy.request(child, v2, version=child_response.version_info,
                         nonce=child_response.nonce, names=names) == []


def test_cds_with_a_new_cluster_then_its_eds_when_subscribed() -> None:
    envoy = FakeEnvoy()
    envoy.connect(V1)
    v2 = make_snapshot({CDS: "v2", EDS: "v1", LDS: "v1", RDS: "v1"}, clusters=("a", "b", "c"))
    cds, eds = envoy.publish(v2)
    assert [resource_name(r) for r in cds.resources] == ["a", "b", "c"]
    assert [resource_name(r) for r in eds.resources] == ["a", "b"]  # re-created, subscribed
    (new,) = envoy.ack(eds, v2, names=["a", "b", "c"])
    assert [resource_name(r) for r in new.resources] == ["c"]
    assert envoy.ack(new, v2, names=["a", "b", "c"]) == []


@pytest.mark.parametrize(("parent", "child", "names"),
                         [(CDS, EDS, ("a", "b")), (LDS, RDS, ("hotpath",))])
def test_child_pushed_with_parent_then_quiet(
        parent: str, child: str, names: tuple[str, ...]) -> None:
    envoy = FakeEnvoy()
    envoy.connect(V1)
    v2 = bump(V1, parent, child, version="v2")
    assert [r.type_url for r in envoy.publish(v2)] == [parent, child]
    # The EDS (RDS) response went after the parent's, so the re-created clusters
    # (listeners) got theirs: the ACKs are not answered.
    assert envoy.ack(envoy.last[parent], v2) == []
    assert envoy.ack(envoy.last[child], v2, names=names) == []


def test_only_changed_named_resources_are_sent() -> None:
    envoy = FakeEnvoy()
    snapshot = Snapshot(resources=V1.resources, versions=V1.versions,
                        resource_versions={EDS: {"a": "1-a", "b": "1-b"}})
    envoy.connect(snapshot)
    v2 = Snapshot(resources=V1.resources, versions={**V1.versions, EDS: "v2"},
                  resource_versions={EDS: {"a": "2-a", "b": "1-b"}})
    (eds,) = envoy.publish(v2)  # pool A changed: no EDS for pool B
    assert [resource_name(r) for r in eds.resources] == ["a"]
    assert eds.version_info == "v2"
    assert envoy.ack(eds, v2, names=["a", "b"]) == []


def test_change_of_an_unsubscribed_resource_sends_nothing() -> None:
    envoy = FakeEnvoy()
    snapshot = Snapshot(resources=V1.resources, versions=V1.versions,
                        resource_versions={EDS: {"a": "1-a", "b": "1-b"}})
    envoy.connect(snapshot, eds=["b"])
    v2 = Snapshot(resources=V1.resources, versions={**V1.versions, EDS: "v2"},
                  resource_versions={EDS: {"a": "2-a", "b": "1-b"}})
    assert envoy.publish(v2) == []
    v3 = Snapshot(resources=V1.resources, versions={**V1.versions, EDS: "v3"},
                  resource_versions={EDS: {"a": "2-a", "b": "3-b"}})
    (eds,) = envoy.publish(v3)
    assert [resource_name(r) for r in eds.resources] == ["b"]


def test_cds_waits_in_flight_and_eds_waits_behind_it() -> None:
    envoy = FakeEnvoy()
    envoy.connect(V1)
    v2 = bump(V1, CDS, EDS, version="v2")
    cds, eds = envoy.publish(v2)
    assert envoy.ack(eds, v2, names=["a", "b"]) == []
    # CDS v2 is not ACKed yet; v3 changes both: EDS must not overtake its CDS.
    v3 = bump(v2, CDS, EDS, version="v3")
    assert envoy.publish(v3) == []
    assert [(r.type_url, r.version_info) for r in envoy.ack(cds, v3)] == [
        (CDS, "v3"), (EDS, "v3")]


def test_names_change_answered_with_the_new_names() -> None:
    envoy = FakeEnvoy()
    (eds,) = envoy.request(EDS, V1, names=["a"])
    assert envoy.ack(eds, V1, names=["a"]) == []
    (more,) = envoy.ack(eds, V1, names=["a", "b"])  # same version and nonce, new names
    assert [resource_name(r) for r in more.resources] == ["b"]  # a: Envoy has it
    assert more.version_info == "v1"
    # Fewer names: nothing to send (SotW EDS responses never remove resources).
    assert envoy.ack(more, V1, names=["b"]) == []
    # Name order is not a change.
    assert envoy.ack(more, V1, names=["b"]) == []
    # A name subscribed again is sent again: Envoy dropped it when it unsubscribed.
    (back,) = envoy.ack(more, V1, names=["b", "a"])
    assert [resource_name(r) for r in back.resources] == ["a"]
    assert envoy.ack(back, V1, names=["a", "b"]) == []


def test_publish_sends_only_subscribed_names() -> None:
    envoy = FakeEnvoy()
    (eds,) = envoy.request(EDS, V1, names=["b"])
    envoy.ack(eds, V1, names=["b"])
    v2 = bump(V1, EDS, version="v2")
    (pushed,) = envoy.publish(v2)
    assert [resource_name(r) for r in pushed.resources] == ["b"]


def test_no_answer_before_first_snapshot_then_everything_subscribed() -> None:
    envoy = FakeEnvoy()
    empty = Snapshot()
    assert envoy.request(CDS, empty) == []
    assert envoy.request(LDS, empty) == []
    assert envoy.request(EDS, empty, names=["a"]) == []
    pushed = envoy.publish(V1)
    assert [r.type_url for r in pushed] == [CDS, EDS, LDS]  # RDS: not subscribed yet
    assert [resource_name(r) for r in envoy.last[EDS].resources] == ["a"]
    assert envoy.publish(V1) == []


def test_publish_sends_nothing_to_a_stream_with_no_subscription() -> None:
    envoy = FakeEnvoy()
    assert envoy.publish(V1) == []
    (cds,) = envoy.request(CDS, V1)
    assert cds.version_info == "v1"


def test_on_snapshot_sends_only_changed_types_in_push_order() -> None:
    envoy = FakeEnvoy()
    # Subscribed in reverse order: the push order is the protocol's, not the subscriptions'.
    subscribed = {RDS: ("hotpath",), LDS: (), EDS: ("a", "b"), CDS: ()}
    for type_url, names in subscribed.items():
        # A listener (cluster) response also sends the routes (load assignments) it owes.
        for response in envoy.request(type_url, V1, names=names):
            envoy.ack(response, V1, names=subscribed[response.type_url])

    def pushed(snapshot: Snapshot) -> list[str]:
        responses = envoy.publish(snapshot)
        for response in responses:
            assert envoy.ack(response, snapshot, names=subscribed[response.type_url]) == []
        return [r.type_url for r in responses]

    assert pushed(make_snapshot("v2")) == [CDS, EDS, LDS, RDS]
    v3 = bump(make_snapshot("v2"), RDS, EDS, version="v3")
    assert pushed(v3) == [EDS, RDS]
    # A new listener version re-creates the listener: its routes follow, unchanged.
    assert pushed(bump(v3, LDS, version="v4")) == [LDS, RDS]


def test_request_with_newer_snapshot_answers_with_it() -> None:
    envoy = FakeEnvoy()
    (cds,) = envoy.request(CDS, V1)
    v2 = bump(V1, CDS, version="v2")
    (answer,) = envoy.ack(cds, v2)  # published but not yet pushed to this stream
    assert answer.version_info == "v2"
    assert envoy.publish(v2) == []  # already sent: not again


def test_nonces_strictly_increase_across_types_and_operations() -> None:
    envoy = FakeEnvoy()
    envoy.connect(V1)
    for i in range(2, 6):
        snapshot = make_snapshot(f"v{i}")
        for response in envoy.publish(snapshot):
            names = [resource_name(r) for r in response.resources] if response.type_url in (
                EDS, RDS) else []
            envoy.ack(response, snapshot, names=names)
    nonces = [int(r.nonce) for r in envoy.sent]
    assert nonces == sorted(set(nonces))
    assert len(envoy.sent) >= 4 + 4 * 4  # start-up and every push


def test_two_streams_are_independent() -> None:
    one, two = FakeEnvoy(), FakeEnvoy()
    (a,) = one.request(CDS, V1)
    (b,) = two.request(CDS, V1)
    assert a.nonce == b.nonce == "1"
    assert one.ack(a, V1) == []
    assert two.stream.acked(CDS) == ""


def test_explicit_wildcard_subscription_gets_every_resource() -> None:
    envoy = FakeEnvoy()
    (cds,) = envoy.request(CDS, V1, names=["*"])
    assert [resource_name(r) for r in cds.resources] == ["a", "b"]


# --- ECDS (the Lua filter's config) ---------------------------------------------------------


def test_ecds_is_a_named_subscription_asked_for_after_the_listener() -> None:
    envoy = FakeEnvoy()
    (lds,) = envoy.request(LDS, V1)
    assert envoy.ack(lds, V1) == []
    (ecds,) = envoy.request(ECDS, V1, names=[LUA])
    assert (ecds.type_url, [resource_name(r) for r in ecds.resources]) == (ECDS, [LUA])
    assert envoy.ack(ecds, V1, names=[LUA]) == []
    # Named, not wildcard: an empty request subscribes to nothing.
    other = FakeEnvoy()
    (empty,) = other.request(ECDS, V1)
    assert empty.resources == ()


def test_filter_change_pushes_only_ecds() -> None:
    # A new Lua source is an ECDS update: no LDS, so the listener and its streams stay.
    envoy = FakeEnvoy()
    envoy.connect(V1, ecds=True)
    v2 = bump(V1, ECDS, version="v2")
    (pushed,) = envoy.publish(v2)
    assert (pushed.type_url, pushed.version_info) == (ECDS, "v2")
    assert [resource_name(r) for r in pushed.resources] == [LUA]
    assert envoy.ack(pushed, v2, names=[LUA]) == []


def test_listener_push_goes_before_ecds_and_owes_it() -> None:
    envoy = FakeEnvoy()
    envoy.connect(V1, ecds=True)
    # Both changed: LDS first, then the filter, then the routes (a new filter must handle
    # the routes it finds; an old one may not understand new route metadata).
    v2 = bump(V1, LDS, ECDS, RDS, version="v2")
    assert [r.type_url for r in envoy.publish(v2)] == [LDS, ECDS, RDS]
    envoy.ack(envoy.last[LDS], v2)
    envoy.ack(envoy.last[ECDS], v2, names=[LUA])
    envoy.ack(envoy.last[RDS], v2, names=["hotpath"])
    # Only the listener changed: the re-created listener gets its filter config and routes
    # again, at their unchanged versions.
    v3 = bump(v2, LDS, version="v3")
    lds, ecds, rds = envoy.publish(v3)
    assert (lds.type_url, ecds.type_url, rds.type_url) == (LDS, ECDS, RDS)
    assert ecds.version_info == "v2" and [resource_name(r) for r in ecds.resources] == [LUA]


def test_ecds_waits_behind_a_listener_in_flight() -> None:
    envoy = FakeEnvoy()
    envoy.connect(V1, ecds=True)
    v2 = bump(V1, LDS, version="v2")
    lds, _, rds = envoy.publish(v2)
    envoy.ack(envoy.last[ECDS], v2, names=[LUA])
    envoy.ack(rds, v2, names=["hotpath"])
    v3 = bump(v2, LDS, ECDS, version="v3")
    assert envoy.publish(v3) == []  # LDS in flight: the filter waits behind it
    after = envoy.ack(lds, v3)
    assert [r.type_url for r in after] == [LDS, ECDS, RDS]
    assert envoy.last[ECDS].version_info == "v3"


def test_ecds_nack_reported_and_not_resent() -> None:
    envoy = FakeEnvoy()
    envoy.connect(V1, ecds=True)
    v2 = bump(V1, ECDS, version="v2")
    (pushed,) = envoy.publish(v2)
    assert envoy.nack(pushed, v2, accepted="v1", names=[LUA], error="lua syntax") == []
    assert [(n.type_url, n.version_info, n.resource_names) for n in envoy.nacks] == [
        (ECDS, "v2", (LUA,))]
    assert envoy.publish(v2) == []
