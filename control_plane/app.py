"""The control plane process: etcd follower -> translate -> snapshot -> ADS, plus DNS.

Latest wins from etcd to every stream: the follower's ``on_change`` only marks the config
dirty and wakes the one rebuild task, which waits until etcd has been quiet for
``DEBOUNCE_S``, but never longer than ``MAX_DELAY_S`` after the first change (so continuous
churn cannot starve it), and then translates whatever etcd holds by then.
Nothing rebuilds on a timer: the rebuild task also wakes at the moment time alone changes
the output (the earliest status going stale, ``Translator.next_change``), and the DNS task
wakes it when a hostname's answer changed.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

from google.protobuf.message import Message

from control_plane.affinity.plan import Active, moves_active, ring_id, ring_points
from control_plane.config.model import Config, Endpoint, GatewaySettings
from control_plane.config.pins import MAX_PINS
from control_plane.config.splits import shares
from control_plane.config.state import ConfigState
from control_plane.runtime.envoy_admin import fetch_json
from control_plane.runtime.metrics import Family, serve_metrics
from control_plane.runtime.tasks import run_together
from control_plane.store.etcd import EtcdFollower, EtcdSettings
from control_plane.store.pins import PinWriter
from control_plane.store.split_slots import PEER_POLL_S, PeerSessions, SplitSlotsWriter
from control_plane.traffic.service import AccessLogServicer
from control_plane.traffic.window import TrafficWindow
from control_plane.translate.resources import Translator, cached_is_ip
from control_plane.translate.warmth import pinnable
from control_plane.xds import types
from control_plane.xds.server import AdsServicer, XdsServerTls, start_xds_server
from control_plane.xds.snapshot import InconsistentSnapshot, SnapshotBuilder
from control_plane.xds.types import SHORT_NAMES

log = logging.getLogger(__name__)

# Hostnames are resolved again this often (DNS answers change without an etcd write).
DNS_REFRESH_S = 30.0
# A burst of etcd events, each within this long of the previous, is translated once...
DEBOUNCE_S = 0.005
# ...but never later than this after its first event. Measured with 100 clients while
# 10,000 endpoints were written: without the bound on bursts, a rebuild per event or two
# kept the streams busy enough that the watch fell minutes behind.
MAX_DELAY_S = 0.05
# The longest a ring change waits for its pins (written by the leader, acknowledged by every
# Envoy). Measured on loopback: the write and the filter's acknowledgement take ~10-30 ms;
# without a leader (etcd down, none elected yet) the change goes out after this, logged.
HOLD_MAX_S = 2.0
# Wake this long after a status's stale moment, so that it is stale by then.
STALE_MARGIN_S = 0.01


@dataclass(frozen=True)
class ControlPlaneSettings:
    etcd: EtcdSettings = field(default_factory=EtcdSettings)
    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    xds_address: str = "127.0.0.1:18000"
    metrics_address: str | None = "127.0.0.1:9101"  # None: no /metrics server
    xds_tls: XdsServerTls | None = None
    # The other control planes' metrics URLs: the split leader counts their Envoys'
    # active sessions too (each Envoy streams to one control plane).
    peers: tuple[str, ...] = ()
    # Pins per ring-hash pool (affinity/); 0: none (a ring change may move active sessions).
    max_pins: int = MAX_PINS


def peer_active(item: object) -> Active | None:
    """One session of a peer's ``/sessions`` view (None: not in the expected shape)."""
    if not isinstance(item, list) or len(item) != 3:
        return None
    ring, endpoint, seen = item
    if not isinstance(endpoint, str) or not isinstance(seen, int | float):
        return None
    try:
        ring_hash = None if ring is None else int(str(ring), 16)
    except ValueError:
        return None
    return Active(ring_hash, endpoint, float(seen))


class Resolver:
    """Hostname -> IPv4 for EDS, which takes only IPs. Failures are logged once."""

    def __init__(self) -> None:
        self.answers: dict[str, str] = {}
        self._resolved_at: dict[str, float] = {}
        self._failed: set[str] = set()

    def due(self, config: Config, now: float) -> set[str]:
        hosts = {e.address for pool in config.endpoints.values() for e in pool.values()
                 if not cached_is_ip(e.address)}
        return {h for h in hosts if now - self._resolved_at.get(h, -DNS_REFRESH_S) >= DNS_REFRESH_S}

    async def resolve(self, host: str) -> bool:
        """Resolve one host; True when its answer changed."""
        self._resolved_at[host] = time.monotonic()
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, None, family=socket.AF_INET,
                                           type=socket.SOCK_STREAM)
        except OSError as exc:
            if host not in self._failed:
                self._failed.add(host)
                log.warning("cannot resolve endpoint host %s (%s); left out of EDS", host, exc)
            return False
        self._failed.discard(host)
        ip = str(infos[0][4][0])
        changed = self.answers.get(host) != ip
        self.answers[host] = ip
        return changed

    def resolved(self, config: Config) -> dict[tuple[str, str], str]:
        result = {}
        for pool, endpoints in config.endpoints.items():
            for endpoint_id, endpoint in endpoints.items():
                ip = endpoint.address if endpoint.is_ip else self.answers.get(endpoint.address)
                if ip is not None:
                    result[(pool, endpoint_id)] = ip
        return result


class ControlPlane:
    def __init__(self, settings: ControlPlaneSettings) -> None:
        self.settings = settings
        self.state = ConfigState()
        self.servicer = AdsServicer()
        self.builder = SnapshotBuilder()
        self.resolver = Resolver()
        self.translator = Translator()
        self.follower = EtcdFollower(settings.etcd, self.state, self.changed)
        self.xds_port = 0
        self.pushes = 0
        self.rebuilds = 0
        self.dns_epoch = 0
        self._dirty = asyncio.Event()
        self._revision = 0
        self._dns_tasks: set[asyncio.Task[None]] = set()
        self._resolving: set[str] = set()
        # Real traffic from this control plane's Envoys (warmth from real traffic).
        self._addresses: dict[tuple[str, str], str] = {}  # (pool, "ip:port") -> endpoint id
        # pool -> (its endpoints, DNS epoch, its part of _addresses) as last computed
        self._address_parts: dict[str, tuple[Mapping[str, Endpoint], int,
                                             dict[tuple[str, str], str]]] = {}
        self.traffic = AccessLogServicer(TrafficWindow(), self._endpoint_at)
        # Splits: the leader among control planes writes split-slots/<model>.
        identity = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.sessions = PeerSessions(self.traffic.window.active_sessions, len(settings.peers))
        self.split_writer = SplitSlotsWriter(settings.etcd, identity, self.state.config,
                                             self.sessions, self.state.split_keys)
        self._split_health: dict[str, str] = {}  # model -> what was last logged
        # Pins: the leader writes them; every control plane holds a ring change back until
        # the pins for the new ring are stored and acknowledged by every connected Envoy.
        self.pins = PinWriter(settings.etcd, self.state.config,
                              lambda: self.split_writer.election.leader,
                              self.translator.routes, self.placements, settings.max_pins)
        # pool -> (ring points per host, cluster, load assignment) as last published.
        self._rings: dict[str, tuple[dict[str, int], Message, Message]] = {}
        self._held_since: dict[str, float] = {}  # pool -> when its ring change was held
        self.rings_held = 0  # ring changes held for pins
        self.hold_timeouts = 0  # ring changes published without their pins (HOLD_MAX_S)
        self.servicer.on_ack = self._on_ack

    def active_sessions_view(self) -> dict[str, dict[str, list[object]]]:
        """``/sessions``: per pool, the sessions this control plane's Envoys served within
        the pool's ``session_ttl_s``, each as [ring hash (16 hex) or null, endpoint id,
        last seen (unix s)]: the leader's splits and pins count them when it is a peer."""
        now = time.time()
        view: dict[str, dict[str, list[object]]] = {}
        for name, pool in self.state.config().pools.items():
            sessions = self._own_placements(name, now, pool.session_ttl_s)
            view[name] = {h: [None if a.ring_hash is None else f"{a.ring_hash:016x}",
                              a.endpoint, round(a.seen, 3)] for h, a in sessions.items()}
        return view

    def _own_placements(self, pool: str, now: float, ttl_s: float) -> dict[str, Active]:
        result = {}
        for session, placed in self.traffic.window.placements(pool, now, ttl_s).items():
            endpoint = self._endpoint_at(pool, placed.address)
            if endpoint is not None:
                result[session] = Active(placed.ring_hash, endpoint, placed.seen)
        return result

    def placements(self, pool: str, now: float, ttl_s: float) -> dict[str, Active]:
        """Active sessions of ``pool`` as this control plane's and its peers' Envoys saw
        them, the most recent report of each."""
        merged = self._own_placements(pool, now, ttl_s)
        for report in self.sessions.reports.values():
            view = report.get(pool) if isinstance(report, dict) else None
            if not isinstance(view, dict):
                continue
            for session, item in view.items():
                active = peer_active(item)
                if active is not None and now - active.seen <= ttl_s and (
                        session not in merged or merged[session].seen < active.seen):
                    merged[session] = active
        return merged

    async def _poll_peers(self) -> None:
        logged: set[str] = set()
        while self.settings.peers:
            for url in self.settings.peers:
                report = await asyncio.to_thread(fetch_json, f"{url.rstrip('/')}/sessions")
                if report is None and url not in logged:
                    logged.add(url)
                    log.warning("peer control plane %s unreachable: no split slot moves "
                                "until it answers", url)
                elif report is not None and url in logged:
                    logged.discard(url)
                    log.info("peer control plane %s reachable again", url)
                self.sessions.seen(url, report)
            await asyncio.sleep(PEER_POLL_S)

    def _report_splits(self) -> None:
        """One log line whenever a split becomes degraded, loses its last arm, or recovers."""
        health: dict[str, str] = {}
        for routes in self.translator.splits:
            gone = [arm.pool for arm in routes.split.arms if arm.pool not in routes.pools]
            if routes.table is None:
                health[routes.split.model] = "no arm left (answers 503)"
            elif gone:
                health[routes.split.model] = ("degraded: arm pool(s) " + ", ".join(gone)
                                              + " deleted; the other arms take their sessions")
            else:
                health[routes.split.model] = "ok"
        for model, text in health.items():
            if self._split_health.get(model, "ok") != text:
                (log.info if text == "ok" else log.warning)("split %s: %s", model, text)
        self._split_health = health

    def _endpoint_at(self, pool: str, address: str) -> str | None:
        return self._addresses.get((pool, address))

    def _address_index(self, config: Config) -> dict[tuple[str, str], str]:
        """(pool, "ip:port") -> endpoint id. A pool's part is recomputed only when its
        endpoints (config() keeps an unchanged pool's dict) or the DNS answers changed."""
        index: dict[tuple[str, str], str] = {}
        cache: dict[str, tuple[Mapping[str, Endpoint], int, dict[tuple[str, str], str]]] = {}
        for pool, endpoints in config.endpoints.items():
            known = self._address_parts.get(pool)
            if known is not None and known[0] is endpoints and known[1] == self.dns_epoch:
                part = known[2]
            else:
                part = {(pool, f"{ip}:{endpoint.port}"): eid for eid, endpoint in endpoints.items()
                        if (ip := self._resolve(endpoint)) is not None}
            cache[pool] = (endpoints, self.dns_epoch, part)
            index.update(part)
        self._address_parts = cache
        return index

    def changed(self, revision: int | None = None) -> None:
        """The follower's on_change: mark dirty and wake the rebuild task; nothing more."""
        if revision:
            self._revision = max(self._revision, revision)
        self._dirty.set()

    def _resolve(self, endpoint: Endpoint) -> str | None:
        """The IP of an endpoint for EDS; a hostname never seen is resolved in the
        background (its pool is rebuilt when the answer comes)."""
        if cached_is_ip(endpoint.address):
            return endpoint.address
        host = endpoint.address
        if host not in self.resolver.answers and host not in self._resolving:
            self._start_resolve(host)
        return self.resolver.answers.get(host)

    def _on_ack(self) -> None:
        if self._held_since:
            self.changed()  # a held ring change may be free to go

    def _filter_acked(self, resources: Mapping[str, Mapping[str, Message]]) -> bool:
        """Whether every connected Envoy acknowledged the filter config in ``resources``
        (it holds the pins): it must be the one published, acknowledged by each."""
        current = self.builder.current
        mine = resources.get(types.EXTENSION_CONFIG, {})
        published = current.resources.get(types.EXTENSION_CONFIG, {})
        if set(mine) != set(published) or not all(
                published[name] is resource or published[name] == resource
                for name, resource in mine.items()):
            return False
        version = current.version(types.EXTENSION_CONFIG)
        acked = self.servicer.stats.acked
        return all(acked.get(node, {}).get(SHORT_NAMES[types.EXTENSION_CONFIG]) == version
                   for node in self.servicer.stats.connected.values())

    def _may_have_active(self, pool: str, ttl_s: float) -> bool:
        """Whether the pool may have an active session: this control plane's Envoys served
        one, a peer's did, or a peer has not answered lately (its sessions are unknown)."""
        if self.traffic.window.placements(pool, time.time(), ttl_s):
            return True
        reports = self.sessions.reports
        if len(reports) < len(self.settings.peers):
            return True
        return any(report is None or report.get(pool) for report in reports.values())

    def _translated_again(self, name: str, resources: Mapping[str, Mapping[str, Message]]
                          ) -> bool:
        """Whether the pool's cluster or endpoints are not the objects last published (the
        translator returns the very same objects for a pool it did not translate again)."""
        published = self._rings.get(name)
        return (published is None or published[1] is not resources[types.CLUSTER][name]
                or published[2] is not resources[types.ENDPOINT][name])

    def _hold_ring_changes(self, config: Config, resources: dict[str, dict[str, Message]]
                           ) -> set[str]:
        """Keep the published cluster and endpoints of every ring-hash pool whose ring change
        could move active sessions of hosts that stay (affinity/plan.py ``moves_active``)
        until the leader stored the pins for the new ring and every Envoy acknowledged the
        filter that carries them; at most HOLD_MAX_S. Returns the pools held."""
        held: set[str] = set()
        now = time.monotonic()
        acked: bool | None = None
        for name, pool in config.pools.items():
            routes = self.translator.routes(name)
            published = self._rings.get(name)
            if (pool.lb != "ring_hash" or routes is None or published is None
                    or not self._translated_again(name, resources)):
                self._held_since.pop(name, None)
                continue  # not translated again since it was published: no ring change
            if not self._may_have_active(name, pool.session_ttl_s):
                self._held_since.pop(name, None)
                continue  # nothing to keep in place: no hold
            if not moves_active(published[0], ring_points(routes), pinnable(routes)):
                self._held_since.pop(name, None)
                continue
            table = config.pins.get(name)
            if table is not None and table.ring == ring_id(pool, routes):
                acked = self._filter_acked(resources) if acked is None else acked
                if acked:
                    self._held_since.pop(name, None)
                    continue
            since = self._held_since.get(name)
            if since is None:
                self._held_since[name] = since = now
                self.rings_held += 1
                self.pins.poke()
            elif now - since > HOLD_MAX_S:
                log.warning("pools/%s: ring change published without its pins after %.1f s "
                            "(no leader, or an Envoy did not acknowledge); active sessions "
                            "may move", name, HOLD_MAX_S)
                self.hold_timeouts += 1
                del self._held_since[name]
                continue
            resources[types.CLUSTER][name] = published[1]
            resources[types.ENDPOINT][name] = published[2]
            held.add(name)
        return held

    def rebuild(self, revision: int | None = None) -> None:
        """Translate the current config; publish only when the snapshot changed."""
        if not self.follower.synced_revision:
            return  # never publish before the first full read of etcd
        self.rebuilds += 1
        config = self.state.config()
        self._addresses = self._address_index(config)
        resources = self.translator.translate(config, self._resolve, self.settings.gateway,
                                              time.time(), self.dns_epoch)
        self._report_splits()
        self.split_writer.poke()
        self.pins.poke()
        held = self._hold_ring_changes(config, resources)
        for name in config.pools:
            routes = self.translator.routes(name)
            if name not in held and routes is not None and self._translated_again(
                    name, resources):
                # Only a pool translated again: ~10 ms a rebuild for 10,000 endpoints.
                self._rings[name] = (ring_points(routes), resources[types.CLUSTER][name],
                                     resources[types.ENDPOINT][name])
        for gone in set(self._rings) - set(config.pools):
            del self._rings[gone]
        try:
            snapshot = self.builder.update(resources, revision or self.state.revision)
        except InconsistentSnapshot as exc:
            log.error("refusing inconsistent snapshot: %s", exc)
            return
        if snapshot is not None:
            log.info(
                "config revision %d: %d pool(s), %d endpoint(s); pushing %s",
                self.state.revision, len(config.pools),
                sum(len(e) for e in config.endpoints.values()),
                ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in snapshot.versions.items()),
            )
            self.pushes += 1
            self.servicer.publish(snapshot)

    def healthy(self) -> bool:
        return bool(self.builder.current.versions) and self.follower.connected

    def collect(self) -> list[Family]:
        """Families for /metrics, read from the live state at scrape time."""
        stats = self.servicer.stats
        connected = Family("hotpath_xds_connected_envoys", "gauge",
                           "Envoys with an open ADS stream", ())
        connected.set(len(stats.connected))
        responses = Family("hotpath_xds_responses_total", "counter",
                           "ADS responses sent, by type", ("type",))
        for kind, count in stats.pushes.items():
            responses.set(count, kind)
        nacks = Family("hotpath_xds_nacks_total", "counter", "versions rejected by an Envoy",
                       ("type",))
        for kind, count in stats.nacks.items():
            nacks.set(count, kind)
        published = Family("hotpath_snapshots_published_total", "counter",
                           "snapshots published (only when the translated config changed)", ())
        published.set(self.pushes)
        revision = Family("hotpath_snapshot_revision", "gauge",
                          "etcd revision of the version each type was last published at",
                          ("type",))
        for type_url, version in self.builder.current.versions.items():
            revision.set(float(version.split("-", 1)[0]), SHORT_NAMES[type_url])
        etcd_up = Family("hotpath_etcd_connected", "gauge", "1 while the etcd watch is up", ())
        etcd_up.set(1.0 if self.follower.connected else 0.0)
        etcd_revision = Family("hotpath_etcd_revision", "gauge",
                               "latest etcd revision seen by the watch", ())
        etcd_revision.set(self.follower.synced_revision)
        lag = Family("hotpath_etcd_watch_lag_seconds", "gauge",
                     "seconds the etcd watch has been behind the newest write under the prefix",
                     ())
        lag.set(self.follower.lag_seconds())
        rejected = Family("hotpath_config_rejected_keys", "gauge",
                          "etcd keys whose latest value is refused (last good value in force)", ())
        rejected.set(len(self.state.rejected))
        slots = Family("hotpath_split_slot_share", "gauge",
                       "share of a split's sessions (slots) each arm serves", ("model", "arm",
                                                                             "pool"))
        degraded = Family("hotpath_split_degraded", "gauge",
                          "1 while an arm's pool of the split is deleted (2: no arm left)",
                          ("model",))
        leader = Family("hotpath_split_leader", "gauge",
                        "1 while this control plane writes split-slots", ())
        leader.set(1.0 if self.split_writer.election.leader else 0.0)
        for routes in self.translator.splits:
            arms = routes.split.arms
            for index, share in enumerate(shares(routes.table or "", len(arms))):
                slots.set(share, routes.split.model, str(index), arms[index].pool)
            gone = any(arm.pool not in routes.pools for arm in arms)
            degraded.set(2.0 if routes.table is None else float(gone), routes.split.model)
        return [connected, responses, nacks, published, revision, etcd_up, etcd_revision, lag,
                rejected, slots, degraded, leader, *self._pin_families(),
                *self.traffic.families()]

    def _pin_families(self) -> list[Family]:
        config = self.state.config()
        pins = Family("hotpath_pins", "gauge", "pins in force per pool (pins/<pool>)",
                      ("pool",))
        for name, table in config.pins.items():
            pins.set(len(table.pins), name)
        families = [pins]
        counters = self.pins.counters
        for what, counts, text in (
                ("added", counters.added, "active sessions pinned by a ring change (kept)"),
                ("expired", counters.expired, "pins ended: session idle for session_ttl_s"),
                ("dropped", counters.dropped, "pins ended: host down, cold or gone (moved)"),
                ("released", counters.released, "pins ended: the ring agrees with them"),
                ("capped", counters.capped, "pins ended: over the per-pool cap (moved)")):
            family = Family(f"hotpath_pins_{what}_total", "counter", text + "; leader only",
                            ("pool",))
            for pool, count in counts.items():
                family.set(count, pool)
            families.append(family)
        held = Family("hotpath_ring_changes_held_total", "counter",
                      "ring changes held until their pins were stored and acknowledged", ())
        held.set(self.rings_held)
        timeouts = Family("hotpath_ring_changes_unpinned_total", "counter",
                          "ring changes published without their pins (hold timed out)", ())
        timeouts.set(self.hold_timeouts)
        return [*families, held, timeouts]

    def _start_resolve(self, host: str) -> None:
        self._resolving.add(host)
        task = asyncio.get_running_loop().create_task(self._resolve_host(host))
        self._dns_tasks.add(task)
        task.add_done_callback(self._dns_tasks.discard)

    async def _resolve_host(self, host: str) -> None:
        try:
            if await self.resolver.resolve(host):
                self.dns_epoch += 1
                self.changed()
        finally:
            self._resolving.discard(host)

    async def _refresh_dns(self) -> None:
        """Resolve every hostname again every DNS_REFRESH_S (and retry failed ones)."""
        while True:
            await asyncio.sleep(DNS_REFRESH_S)
            for host in self.resolver.due(self.state.config(), time.monotonic()):
                if host not in self._resolving:
                    self._start_resolve(host)

    async def _settle(self) -> None:
        """Wait until no change came for DEBOUNCE_S, at most MAX_DELAY_S in all."""
        deadline = time.monotonic() + MAX_DELAY_S
        while True:
            self._dirty.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                await asyncio.wait_for(self._dirty.wait(), min(DEBOUNCE_S, left))
            except TimeoutError:
                return  # quiet

    async def _rebuild_loop(self) -> None:
        """Rebuild when etcd changed (after at most DEBOUNCE_S) or when a status goes stale."""
        while True:
            wait = self.translator.next_change() + STALE_MARGIN_S - time.time()
            if self._held_since:
                wait = min(wait, min(self._held_since.values()) + HOLD_MAX_S + STALE_MARGIN_S
                           - time.monotonic())
            if not self._dirty.is_set() and wait > 0:
                try:
                    await asyncio.wait_for(self._dirty.wait(),
                                           None if math.isinf(wait) else wait)
                except TimeoutError:
                    pass
            if self._dirty.is_set():
                await self._settle()
            self._dirty.clear()
            try:
                self.rebuild(self._revision or None)
            except Exception:  # noqa: BLE001 - one bad rebuild must not stop the next ones
                log.exception("rebuild failed; Envoy keeps the last snapshot")

    async def serve(self, ready: asyncio.Event | None = None) -> None:
        server, self.xds_port = await start_xds_server(self.servicer, self.settings.xds_address,
                                                       self.settings.xds_tls, [self.traffic])
        log.info("xDS (ADS) listening on %s", self.settings.xds_address.rsplit(":", 1)[0]
                 + f":{self.xds_port}")
        metrics = None
        if self.settings.metrics_address is not None:
            host, _, port = self.settings.metrics_address.rpartition(":")
            metrics = await serve_metrics(host, int(port), self.collect, self.healthy,
                                          {"/traffic": self.traffic.report,
                                           "/sessions": self.active_sessions_view})
            log.info("metrics on http://%s/metrics", self.settings.metrics_address)
        tasks = [
            asyncio.create_task(self.follower.run(), name="etcd-follower"),
            asyncio.create_task(self._rebuild_loop(), name="rebuild"),
            asyncio.create_task(self._refresh_dns(), name="dns"),
            asyncio.create_task(self.split_writer.run(), name="split-slots"),
            asyncio.create_task(self.pins.run(), name="pins"),
            asyncio.create_task(self._poll_peers(), name="peer-sessions"),
        ]
        if ready is not None:
            ready.set()
        try:
            await run_together(tasks)
        finally:
            await server.stop(grace=1.0)
            if metrics is not None:
                await metrics.cleanup()


async def run_control_plane(settings: ControlPlaneSettings) -> None:
    await ControlPlane(settings).serve()

