"""DeltaStream, the sans-IO incremental ADS protocol, driven by a checking fake Envoy.

Shaped like go-control-plane's delta_test.go: every response goes through
``FakeDeltaEnvoy._sent``, which checks that nonces strictly increase on the stream, that the
type URL is one we serve, that every resource is of that type and carries the snapshot's
version for it, that no resource is both sent and removed, and that at most one response
per type is in flight.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from google.protobuf import any_pb2

from control_plane.config.model import Config, GatewaySettings
from control_plane.translate.resources import translate
from control_plane.xds import types
from control_plane.xds.delta import DeltaRequest, DeltaResponse, DeltaStream
from control_plane.xds.protocol import Nack
from control_plane.xds.snapshot import Snapshot, SnapshotBuilder
from tests.unit.test_ads_protocol import make_snapshot, resource_name

CDS, EDS, LDS, RDS = types.CLUSTER, types.ENDPOINT, types.LISTENER, types.ROUTE


def versioned(clusters: Mapping[str, str]) -> Snapshot:
    """CDS and EDS resources per cluster name, each at the given version."""
    base = make_snapshot("v", clusters=clusters)
    per = {n: v for n, v in clusters.items()}
    return Snapshot(resources=base.resources,
                    versions={**base.versions, CDS: "c-" + ".".join(per.values()),
                              EDS: "e-" + ".".join(per.values())},
                    resource_versions={CDS: per, EDS: per, LDS: {"hotpath": "1-l"},
                                       RDS: {"hotpath": "1-r"}})


class FakeDeltaEnvoy:
    def __init__(self) -> None:
        self.stream = DeltaStream()
        self.sent: list[DeltaResponse] = []
        self.nacks: list[Nack] = []
        self.has: dict[str, dict[str, str]] = {}  # what Envoy holds: type -> name -> version
        self._last_nonce = 0
        self._unanswered: dict[str, str] = {}

    def _sent(self, responses: list[DeltaResponse], snapshot: Snapshot) -> list[DeltaResponse]:
        for response in responses:
            assert response.type_url in types.PUSH_ORDER
            nonce = int(response.nonce)
            assert nonce > self._last_nonce
            self._last_nonce = nonce
            assert response.type_url not in self._unanswered, "two responses in flight"
            self._unanswered[response.type_url] = response.nonce
            assert response.system_version_info == snapshot.version(response.type_url)
            assert not set(response.names) & set(response.removed)
            held = self.has.setdefault(response.type_url, {})
            for name, version, resource in zip(response.names, response.versions,
                                               response.resources, strict=True):
                packed = any_pb2.Any()
                packed.Pack(resource)
                assert packed.type_url == response.type_url
                assert resource_name(resource) == name
                assert version == snapshot.resource_version(response.type_url, name)
                held[name] = version
            for name in response.removed:
                held.pop(name, None)
        self.sent.extend(responses)
        return responses

    def request(self, type_url: str, snapshot: Snapshot, *, nonce: str = "",
                subscribe: Iterable[str] = (), unsubscribe: Iterable[str] = (),
                initial: Mapping[str, str] | None = None, error: str | None = None
                ) -> list[DeltaResponse]:
        if nonce and self._unanswered.get(type_url) == nonce:
            del self._unanswered[type_url]
        responses, nack = self.stream.on_request(
            DeltaRequest(type_url, nonce, tuple(subscribe), tuple(unsubscribe),
                         dict(initial or {}), error), snapshot)
        if nack is not None:
            self.nacks.append(nack)
        return self._sent(responses, snapshot)

    def ack(self, response: DeltaResponse, snapshot: Snapshot, **kwargs: object
            ) -> list[DeltaResponse]:
        return self.request(response.type_url, snapshot, nonce=response.nonce,
                            **kwargs)  # type: ignore[arg-type]

    def publish(self, snapshot: Snapshot) -> list[DeltaResponse]:
        return self._sent(self.stream.on_snapshot(snapshot), snapshot)

    def ack_all(self, responses: list[DeltaResponse], snapshot: Snapshot) -> None:
        for response in responses:
            assert self.ack(response, snapshot) == []

    def connect(self, snapshot: Snapshot, eds: Iterable[str] = ("a", "b")) -> None:
        """Envoy's start-up: wildcard CDS, its EDS by name, wildcard LDS, its RDS."""
        for type_url, names in ((CDS, ()), (EDS, tuple(eds)), (LDS, ()), (RDS, ("hotpath",))):
            responses = self.request(type_url, snapshot, subscribe=names)
            assert [r.type_url for r in responses] == [type_url]
            self.ack_all(responses, snapshot)


V1 = versioned({"a": "1-aa", "b": "1-bb"})


def test_wildcard_and_named_subscriptions_get_their_resources() -> None:
    envoy = FakeDeltaEnvoy()
    (cds,) = envoy.request(CDS, V1)  # no names on the first request: legacy wildcard
    assert cds.names == ("a", "b") and cds.removed == ()
    assert envoy.stream.subscribed(CDS) == (True, frozenset())
    (eds,) = envoy.request(EDS, V1, subscribe=["b"])
    assert eds.names == ("b",)
    assert envoy.stream.subscribed(EDS) == (False, frozenset({"b"}))


def test_explicit_wildcard_subscribe_and_unsubscribe() -> None:
    envoy = FakeDeltaEnvoy()
    (cds,) = envoy.request(CDS, V1, subscribe=["*"])
    assert cds.names == ("a", "b")
    envoy.ack(cds, V1, unsubscribe=["*"], subscribe=["a"])
    assert envoy.stream.subscribed(CDS) == (False, frozenset({"a"}))
    v2 = versioned({"a": "2-a2", "b": "2-b2"})
    (only_a,) = envoy.publish(v2)
    assert only_a.names == ("a",)


def test_only_changed_resources_and_removals_are_sent() -> None:
    envoy = FakeDeltaEnvoy()
    envoy.connect(V1)
    v2 = versioned({"a": "2-a2", "b": "1-bb"})
    cds, eds = envoy.publish(v2)  # pool a changed: nothing of pool b
    assert cds.names == ("a",) and eds.names == ("a",)
    envoy.ack_all([cds, eds], v2)
    v3 = versioned({"a": "2-a2"})
    cds, eds = envoy.publish(v3)
    assert (cds.names, cds.removed) == ((), ("b",))
    assert (eds.names, eds.removed) == ((), ("b",))
    assert envoy.has[CDS] == {"a": "2-a2"}
    assert envoy.ack(cds, v3) == []
    # Envoy drops the cluster's EDS subscription; nothing more to send.
    assert envoy.ack(eds, v3, unsubscribe=["b"]) == []


def test_nothing_due_nothing_sent() -> None:
    envoy = FakeDeltaEnvoy()
    envoy.connect(V1)
    assert envoy.publish(V1) == []
    other = Snapshot(resources=V1.resources, versions={**V1.versions, CDS: "other"},
                     resource_versions=V1.resource_versions)
    assert envoy.publish(other) == []  # a type version moved, no resource did


def test_initial_resource_versions_skip_what_envoy_has_and_remove_what_is_gone() -> None:
    envoy = FakeDeltaEnvoy()
    # Reconnect after a control-plane restart: same content at a later revision.
    later = versioned({"a": "9-aa", "b": "9-bb2"})
    (cds,) = envoy.request(CDS, later, initial={"a": "1-aa", "b": "1-bb", "gone": "1-x"})
    assert cds.names == ("b",)  # a: same content hash; b changed
    assert cds.removed == ("gone",)
    envoy.ack(cds, later)
    (eds,) = envoy.request(EDS, later, subscribe=["a", "b"], initial={"a": "1-aa", "b": "1-bb2"})
    assert eds.names == () and eds.removed == ()  # answered all the same: initial fetch done


def test_first_request_is_answered_even_with_nothing_to_send() -> None:
    envoy = FakeDeltaEnvoy()
    (cds,) = envoy.request(CDS, versioned({}))
    assert cds.names == () and cds.removed == ()


def test_no_answer_before_the_first_snapshot() -> None:
    envoy = FakeDeltaEnvoy()
    assert envoy.request(CDS, Snapshot()) == []
    (cds,) = envoy.publish(V1)
    assert cds.names == ("a", "b")


def test_stale_nonce_acknowledges_nothing_but_subscriptions_apply() -> None:
    envoy = FakeDeltaEnvoy()
    (first,) = envoy.request(EDS, V1, subscribe=["a"])
    envoy.ack(first, V1)
    v2 = versioned({"a": "2-a2", "b": "1-bb"})
    (second,) = envoy.publish(v2)
    assert envoy.request(EDS, v2, nonce=first.nonce, subscribe=["b"]) == []  # second in flight
    assert envoy.stream.acked(EDS) == V1.version(EDS)
    (b,) = envoy.ack(second, v2)
    assert b.names == ("b",)


def test_one_response_in_flight_latest_wins() -> None:
    envoy = FakeDeltaEnvoy()
    envoy.connect(V1)
    v2 = versioned({"a": "2-a2", "b": "1-bb"})
    cds, eds = envoy.publish(v2)
    for n in range(3, 6):
        assert envoy.publish(versioned({"a": f"{n}-a{n}", "b": "1-bb"})) == []
    latest = versioned({"a": "5-a5", "b": "1-bb"})
    (cds5,) = envoy.ack(cds, latest)
    assert cds5.versions == ("5-a5",)
    # EDS for a was sent (v2) and is still in flight: the re-created cluster's EDS waits.
    (eds5,) = envoy.ack(eds, latest)
    assert eds5.versions == ("5-a5",)
    assert [r.type_url for r in envoy.sent[-4:]] == [CDS, EDS, CDS, EDS]


def test_cds_before_eds_within_a_change() -> None:
    envoy = FakeDeltaEnvoy()
    envoy.connect(V1)
    v2 = versioned({"a": "2-a2", "b": "1-bb"})
    cds, eds = envoy.publish(v2)
    assert envoy.ack(eds, v2) == []
    v3 = versioned({"a": "3-a3", "b": "1-bb"})
    assert envoy.publish(v3) == []  # CDS in flight: EDS must not overtake it
    assert [r.type_url for r in envoy.ack(cds, v3)] == [CDS, EDS]


def test_recreated_cluster_gets_its_unchanged_eds_after_the_cds() -> None:
    envoy = FakeDeltaEnvoy()
    envoy.connect(V1)
    v2 = Snapshot(resources=V1.resources, versions={**V1.versions, CDS: "c2"},
                  resource_versions={**V1.resource_versions, CDS: {"a": "2-ca", "b": "1-bb"}})
    cds, eds = envoy.publish(v2)
    assert cds.names == ("a",)
    assert eds.names == ("a",) and eds.versions == ("1-aa",)  # owed, unchanged


def test_nack_reported_once_and_not_resent() -> None:
    envoy = FakeDeltaEnvoy()
    envoy.connect(V1)
    v2 = versioned({"a": "2-a2", "b": "1-bb"})
    cds, eds = envoy.publish(v2)
    assert envoy.request(CDS, v2, nonce=cds.nonce, error="cluster a: bad") == []
    assert envoy.nacks == [Nack(CDS, v2.version(CDS), "cluster a: bad", ("a",))]
    assert envoy.publish(v2) == []
    v3 = versioned({"a": "3-a3", "b": "1-bb"})
    (fixed,) = envoy.publish(v3)
    assert fixed.type_url == CDS and fixed.names == ("a",)


def test_with_the_snapshot_builder_a_change_in_one_pool_sends_only_it() -> None:
    builder = SnapshotBuilder()
    envoy = FakeDeltaEnvoy()
    resources = {t: r for t, r in make_snapshot("x").resources.items() if t in (CDS, EDS)}
    first = builder.update(resources, 1)
    assert first is not None
    for type_url, names in ((CDS, ()), (EDS, ("a", "b"))):
        envoy.ack_all(envoy.request(type_url, first, subscribe=names), first)
    changed = {t: dict(r) for t, r in first.resources.items()}
    changed[EDS]["a"] = type(changed[EDS]["a"])(cluster_name="a", endpoints=[{}])
    second = builder.update(changed, 2)
    assert second is not None
    (eds,) = envoy.publish(second)
    assert eds.names == ("a",) and eds.versions[0].startswith("2-")


# --- ECDS (the Lua filter's config) ---------------------------------------------------------

ECDS = types.EXTENSION_CONFIG
LUA = "hotpath-lua"


def translated(revision: int, max_body_bytes: int = 4096) -> Snapshot:
    """A real snapshot (translate() + SnapshotBuilder) of an empty config."""
    settings = GatewaySettings(max_body_bytes=max_body_bytes)
    snapshot = SnapshotBuilder().update(translate(Config(), {}, settings, 0.0), revision)
    assert snapshot is not None
    return snapshot


def connect_with_ecds(envoy: FakeDeltaEnvoy, snapshot: Snapshot,
                      initial: Mapping[str, Mapping[str, str]] | None = None
                      ) -> list[DeltaResponse]:
    """Wildcard CDS and LDS, then what the listener names: its ECDS and RDS resources."""
    sent: list[DeltaResponse] = []
    for type_url, names in ((CDS, ()), (LDS, ()), (ECDS, (LUA,)), (RDS, ("hotpath",))):
        responses = envoy.request(type_url, snapshot, subscribe=names,
                                  initial=(initial or {}).get(type_url))
        sent.extend(responses)
        envoy.ack_all(responses, snapshot)
    return sent


def test_ecds_named_subscription_gets_the_filter() -> None:
    envoy = FakeDeltaEnvoy()
    sent = connect_with_ecds(envoy, translated(5))
    ecds = [r for r in sent if r.type_url == ECDS]
    assert [r.names for r in ecds] == [(LUA,)]
    assert envoy.stream.subscribed(ECDS) == (False, frozenset({LUA}))


def test_filter_change_sends_only_ecds() -> None:
    builder = SnapshotBuilder()
    first = builder.update(translate(Config(), {}, GatewaySettings(max_body_bytes=4096), 0.0), 5)
    assert first is not None
    envoy = FakeDeltaEnvoy()
    connect_with_ecds(envoy, first)
    # Only the Lua source differs (the buffer limit, in the listener, is kept): ECDS alone.
    listener_first = first.resources[LDS]
    changed = {t: dict(r) for t, r in first.resources.items()}
    changed[ECDS] = dict(translated(6, max_body_bytes=2048).resources[ECDS])
    changed[LDS] = dict(listener_first)
    second = builder.update(changed, 6)
    assert second is not None
    (pushed,) = envoy.publish(second)
    assert (pushed.type_url, pushed.names) == (ECDS, (LUA,))
    assert pushed.versions[0].startswith("6-")
    assert second.version(LDS) == first.version(LDS)


def test_restarted_control_plane_resends_neither_listener_nor_filter() -> None:
    # A new control plane versions everything at its own revision; Envoy's initial versions
    # carry the same content hashes, so nothing of LDS or ECDS goes out again.
    old = translated(5)
    envoy = FakeDeltaEnvoy()
    connect_with_ecds(envoy, old)
    again = FakeDeltaEnvoy()
    sent = connect_with_ecds(again, translated(9), initial=envoy.has)
    assert [(r.type_url, r.names) for r in sent if r.type_url in (LDS, ECDS)] == [
        (LDS, ()), (ECDS, ())]


def test_recreated_listener_gets_its_unchanged_filter_after_it() -> None:
    snapshot = translated(5)
    envoy = FakeDeltaEnvoy()
    connect_with_ecds(envoy, snapshot)
    v2 = Snapshot(resources=snapshot.resources, versions={**snapshot.versions, LDS: "l2"},
                  resource_versions={**snapshot.resource_versions,
                                     LDS: {"hotpath": "6-other"}})
    lds, ecds, rds = envoy.publish(v2)
    assert (lds.type_url, ecds.type_url, rds.type_url) == (LDS, ECDS, RDS)
    assert ecds.names == (LUA,) and ecds.versions == (snapshot.resource_version(ECDS, LUA),)
