"""The prober process: follow etcd, probe idle endpoints, write warmth, serve /metrics.

The IO shell around the pure parts (state.py, traffic.py, routing.py): an etcd follower
for pools, endpoints and statuses; a leader election so that one prober of several works;
a scheduler that, for each endpoint when due, either skips it (real traffic keeps it warm,
it is serving right now, or it was let go cold on purpose) or sends the pool's warm-up
request; writes of ``status/<pool>/<id>`` only on a change of state or an ageing record;
and Prometheus metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
from collections.abc import Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp
from aiohttp import web
from etcd3aio import Etcd3Client

from control_plane.config.model import (
    DEFAULT_SYSTEM_PROMPT,
    Config,
    Endpoint,
    Pool,
    Status,
    WarmState,
    status_to_json,
)
from control_plane.config.state import ConfigState
from control_plane.prober import state as machine
from control_plane.prober.probe import (
    PROBE_HEADER,
    PROBER_HEADER,
    ProbeResult,
    probe_url,
    send_probe,
    warmup_body,
)
from control_plane.prober.traffic import TrafficTracker, parse_cluster_active
from control_plane.runtime.envoy_admin import parse_clusters
from control_plane.runtime.metrics import Family, Histogram, serve_metrics
from control_plane.runtime.tasks import run_together
from control_plane.store.etcd import EtcdFollower, EtcdSettings, delete, etcd_client, put_json
from control_plane.store.leader import LeaderElection
from control_plane.translate.warmth import stale_after_s

log = logging.getLogger(__name__)

DEFAULT_METRICS = "127.0.0.1:9102"
DEFAULT_IDLE_HORIZON_S = 600.0
DEFAULT_LEADER_TTL_S = 10
ADMIN_TIMEOUT_S = 2.0
# The loop looks at Envoy's counters at least this often (capped by a quarter interval), so
# "last real traffic" is accurate to that, and right before any probe.
MAX_POLL_PERIOD_S = 2.0
FRESH_POLL_S = 0.1
ORPHAN_RETRY_S = 5.0
ACTIVE_FILTER = quote(r"\.upstream_rq_active$")

Key = tuple[str, str]  # (pool, endpoint id)


def default_identity() -> str:
    return f"{socket.gethostname()}/{os.getpid()}"


@dataclass(frozen=True)
class ProberSettings:
    etcd: EtcdSettings = field(default_factory=EtcdSettings)
    # Envoy admin URLs whose per-host counters tell real traffic apart; none: always probe.
    admin_urls: tuple[str, ...] = ()
    metrics_address: str | None = DEFAULT_METRICS  # None: no /metrics server
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    thresholds: machine.Thresholds = field(default_factory=machine.Thresholds)
    idle_horizon_s: float = DEFAULT_IDLE_HORIZON_S
    min_warm: int | None = None  # endpoints per pool kept warm; None: all
    min_warm_per_pool: Mapping[str, int] = field(default_factory=dict)
    election: bool = True
    leader_ttl_s: int = DEFAULT_LEADER_TTL_S
    identity: str = field(default_factory=default_identity)

    def min_warm_for(self, pool: str) -> int | None:
        return self.min_warm_per_pool.get(pool, self.min_warm)


@dataclass
class Tracked:
    """One endpoint the prober looks after."""

    endpoint: Endpoint
    warmth: machine.Warmth
    next_due: float  # loop time
    first_seen: float  # unix time
    written: Status | None = None  # the last record this prober wrote or found
    task: asyncio.Task[None] | None = None


class ProberMetrics:
    def __init__(self) -> None:
        self.probes = Family("hotpath_prober_probes_total", "counter",
                             "warm-up probes sent, by outcome (fast, slow, failed)",
                             ("pool", "endpoint", "outcome"))
        self.skipped = Family("hotpath_prober_probes_skipped_total", "counter",
                              "probes not sent: traffic (served real traffic within the "
                              "interval), busy (serving now), released (let go cold)",
                              ("pool", "endpoint", "reason"))
        self.rejected = Family("hotpath_prober_probes_rejected_total", "counter",
                               "probes answered with a 4xx (check the pool's warmup)",
                               ("pool", "endpoint"))
        self.latency = Histogram("hotpath_prober_probe_ttft_seconds",
                                 "time to first token of answered probes", ("pool",))
        self.tokens = Family("hotpath_prober_tokens_total", "counter",
                             "tokens the probes cost, as the servers report them "
                             "(prompt, completion, cached prompt)", ("pool", "kind"))
        self.state = Family("hotpath_prober_endpoint_state", "gauge",
                            "1 for the endpoint's current state (warm, cold, down)",
                            ("pool", "endpoint", "state"))
        self.ttft = Family("hotpath_prober_endpoint_ttft_seconds", "gauge",
                           "time to first token of the endpoint's last answered probe",
                           ("pool", "endpoint"))
        self.released = Family("hotpath_prober_endpoint_released", "gauge",
                               "1 while the endpoint is let go cold on purpose",
                               ("pool", "endpoint"))
        self.writes = Family("hotpath_prober_status_writes_total", "counter",
                             "status/<pool>/<id> writes to etcd", ("pool",))
        self.leader = Family("hotpath_prober_leader", "gauge",
                             "1 while this prober is the leader (the one that probes)", ())

    def families(self) -> list[Family]:
        return [self.probes, self.skipped, self.rejected, self.latency, self.tokens,
                self.state, self.ttft, self.released, self.writes, self.leader]

    def set_endpoint(self, key: Key, warmth: machine.Warmth) -> None:
        pool, eid = key
        for state in WarmState:
            self.state.set(1.0 if warmth.state is state else 0.0, pool, eid, state.value)
        self.released.set(1.0 if warmth.released else 0.0, pool, eid)
        if warmth.ttft_ms is not None:
            self.ttft.set(warmth.ttft_ms / 1000, pool, eid)

    def forget(self, key: Key) -> None:
        labels = {"pool": key[0], "endpoint": key[1]}
        for family in (self.probes, self.skipped, self.rejected, self.state, self.ttft,
                       self.released):
            family.remove(labels)


class Prober:
    def __init__(self, settings: ProberSettings) -> None:
        self.settings = settings
        self.config_state = ConfigState()
        self.follower = EtcdFollower(settings.etcd, self.config_state, self._on_config)
        self.tracker = TrafficTracker()
        self.tracked: dict[Key, Tracked] = {}
        self.metrics = ProberMetrics()
        self.leader = False
        self.metrics_port = 0
        self._wake = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self._client: Etcd3Client | None = None
        self._client_stack: AsyncExitStack | None = None
        self._last_poll = -1e9
        self._admin_down: set[str] = set()
        self._logged: dict[Key, str] = {}
        self._deleted: dict[Key, float] = {}  # orphan statuses deleted, when (loop time)
        self._cancelled: set[asyncio.Task[None]] = set()  # probes stopped by a step-down

    # -- lifecycle ---------------------------------------------------------------------

    def _on_config(self, _revision: int) -> None:
        self._wake.set()

    def _on_leader(self, leader: bool) -> None:
        self.leader = leader
        self.metrics.leader.set(1.0 if leader else 0.0)
        if not leader:
            # No probe and no write after leadership is gone; the next leader starts
            # from the statuses in etcd.
            for tracked in self.tracked.values():
                if tracked.task is not None:
                    tracked.task.cancel()
                    self._cancelled.add(tracked.task)
            self.tracked.clear()
        self._wake.set()

    async def serve(self, ready: asyncio.Event | None = None) -> None:
        runner = None
        async with AsyncExitStack() as stack:
            self._session = await stack.enter_async_context(aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True, limit=0),
                headers={"user-agent": "hotpath-prober"}))
            stack.push_async_callback(self._close_client)
            if self.settings.metrics_address is not None:
                runner = await self._serve_metrics(self.settings.metrics_address)
                stack.push_async_callback(runner.cleanup)
            tasks = [asyncio.create_task(self.follower.run(), name="prober-etcd-follower"),
                     asyncio.create_task(self._loop(), name="prober-loop")]
            if self.settings.election:
                election = LeaderElection(self.settings.etcd, self.settings.identity,
                                          self.settings.leader_ttl_s, self._on_leader)
                tasks.append(asyncio.create_task(election.run(), name="prober-election"))
            else:
                self._on_leader(True)
            if ready is not None:
                ready.set()
            try:
                await run_together(tasks)
            finally:
                self._on_leader(False)
                await asyncio.gather(*self._cancelled, return_exceptions=True)

    async def _serve_metrics(self, address: str) -> web.AppRunner:
        host, _, port = address.rpartition(":")
        runner = await serve_metrics(host, int(port), self.metrics.families,
                                     lambda: self.follower.connected)
        self.metrics_port = runner.addresses[0][1]
        log.info("prober metrics on http://%s:%d/metrics", host, self.metrics_port)
        return runner

    # -- the loop ----------------------------------------------------------------------

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()
            timeout = MAX_POLL_PERIOD_S
            if self.leader and self.follower.synced_revision:
                try:
                    timeout = await self.tick(loop.time(), time.time())
                except asyncio.CancelledError:
                    raise
                except Exception:  # noqa: BLE001 - one bad tick must not stop the prober
                    log.exception("prober tick failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    def _poll_period(self, config: Config) -> float:
        intervals = [p.warmup.interval_s for p in config.pools.values()]
        return max(FRESH_POLL_S, min([MAX_POLL_PERIOD_S] + [i / 4 for i in intervals]))

    async def tick(self, now_m: float, now: float) -> float:
        """One pass: reconcile, release, skip or probe what is due, write. Returns how long
        the loop may sleep before the next pass."""
        self._cancelled = {t for t in self._cancelled if not t.done()}
        config = self.config_state.config()
        await self._reconcile(config, now_m, now)
        period = self._poll_period(config)
        due = [k for k, t in self.tracked.items() if t.task is None and t.next_due <= now_m]
        if self.settings.admin_urls and (
                now_m - self._last_poll >= (FRESH_POLL_S if due else period)):
            await self._poll_admin(now)
            self._last_poll = now_m
        self._release(config, now_m, now)
        for key in due:
            tracked = self.tracked.get(key)
            if tracked is None or tracked.task is not None:
                continue
            self._decide(key, tracked, config.pools[key[0]], now_m, now)
        await self._write_changes(config, now)
        waits = [t.next_due - now_m for t in self.tracked.values() if t.task is None]
        return max(0.01, min([period] + waits))

    async def _reconcile(self, config: Config, now_m: float, now: float) -> None:
        wanted: dict[Key, tuple[Pool, Endpoint]] = {}
        for pool_name, endpoints in config.endpoints.items():
            pool = config.pools.get(pool_name)
            if pool is None:
                continue  # no pool: no model to probe with, and no cluster routes to it
            for eid, endpoint in endpoints.items():
                wanted[(pool_name, eid)] = (pool, endpoint)
        for key in [k for k in self.tracked if k not in wanted]:
            gone = self.tracked.pop(key)
            if gone.task is not None:
                gone.task.cancel()
            self.metrics.forget(key)
        for key, (pool, endpoint) in wanted.items():
            tracked = self.tracked.get(key)
            if tracked is not None and tracked.endpoint == endpoint:
                continue
            if tracked is not None and tracked.task is not None:
                tracked.task.cancel()
            recorded = config.statuses.get(key[0], {}).get(key[1])
            warmth = machine.Warmth()
            if tracked is None and recorded is not None and \
                    now - recorded.checked_at <= stale_after_s(pool.warmup.interval_s):
                # Carry on from the record (a restart or a new leader): no flapping.
                warmth = machine.Warmth(state=recorded.state, ttft_ms=recorded.ttft_ms)
            jitter = random.uniform(0, min(1.0, pool.warmup.interval_s / 2))
            self.tracked[key] = Tracked(endpoint=endpoint, warmth=warmth,
                                        next_due=now_m + jitter, first_seen=now,
                                        written=recorded)
            self.metrics.set_endpoint(key, warmth)
        # Statuses of endpoints that are gone: remove them, nobody else will.
        for pool_name, statuses in config.statuses.items():
            for eid in statuses:
                key = (pool_name, eid)
                if eid in config.endpoints.get(pool_name, {}):
                    continue
                if now_m - self._deleted.get(key, -1e9) >= ORPHAN_RETRY_S:
                    self._deleted[key] = now_m
                    await self._delete_status(key)

    def _release(self, config: Config, now_m: float, now: float) -> None:
        for pool_name in config.pools:
            keys = [k for k in self.tracked if k[0] == pool_name]
            activity = {}
            for key in keys:
                tracked = self.tracked[key]
                last = self.tracker.last_traffic(*key)
                idle_since = max(tracked.first_seen, last if last is not None else 0.0)
                activity[key[1]] = machine.Activity(tracked.warmth.state, idle_since)
            released = machine.choose_released(
                activity, self.settings.min_warm_for(pool_name), self.settings.idle_horizon_s,
                now)
            for key in keys:
                tracked = self.tracked[key]
                if key[1] in released and not tracked.warmth.released:
                    if tracked.task is not None:
                        tracked.task.cancel()
                        tracked.task = None
                    tracked.warmth = machine.release(tracked.warmth)
                    log.info("%s/%s idle for %.0f s: let go cold (min warm %s)", *key,
                             now - activity[key[1]].idle_since,
                             self.settings.min_warm_for(pool_name))
                elif key[1] not in released and tracked.warmth.released:
                    tracked.warmth = machine.unrelease(tracked.warmth)
                    tracked.next_due = now_m
                    log.info("%s/%s: kept warm again", *key)
                self.metrics.set_endpoint(key, tracked.warmth)

    def _decide(self, key: Key, tracked: Tracked, pool: Pool, now_m: float, now: float) -> None:
        interval = pool.warmup.interval_s
        warmth = tracked.warmth
        reason = None
        if warmth.released:
            reason = "released"
        elif self.tracker.busy(*key):
            reason = "busy"  # never disturb a request in flight (single-slot servers)
        elif warmth.state in (None, WarmState.WARM) and self.tracker.served_within(
                *key, interval, now):
            reason = "traffic"  # real traffic keeps it warm; cold/down need a probe
            tracked.warmth = machine.served_traffic(warmth)
        if reason is not None:
            self.metrics.skipped.inc(*key, reason)
            tracked.next_due = now_m + interval
            self.metrics.set_endpoint(key, tracked.warmth)
            return
        tracked.task = asyncio.create_task(self._probe(key, tracked, pool),
                                           name=f"probe {key[0]}/{key[1]}")

    async def _probe(self, key: Key, tracked: Tracked, pool: Pool) -> None:
        assert self._session is not None
        loop = asyncio.get_running_loop()
        try:
            result = await send_probe(
                self._session, probe_url(tracked.endpoint, pool.warmup.path),
                warmup_body(pool, self.settings.system_prompt), pool.warmup.timeout_s,
                {PROBE_HEADER: "1", PROBER_HEADER: self.settings.identity})
        finally:
            tracked.task = None
        if self.tracked.get(key) is not tracked or tracked.warmth.released:
            return  # the endpoint changed or went while the probe ran
        outcome = machine.classify(result.ttft_ms, pool.warmup.cold_ttft_ms)
        self._count(key, outcome, result)
        before = tracked.warmth.state
        tracked.warmth = machine.observe(tracked.warmth, outcome, result.ttft_ms,
                                         self.settings.thresholds)
        tracked.next_due = loop.time() + machine.next_probe_delay_s(
            tracked.warmth, pool.warmup.interval_s)
        self.metrics.set_endpoint(key, tracked.warmth)
        if tracked.warmth.state is not before:
            log.info("%s/%s: %s -> %s (%s)", *key, before.value if before else "unknown",
                     tracked.warmth.state.value if tracked.warmth.state else "unknown",
                     f"ttft {result.ttft_ms:.0f} ms" if result.ttft_ms is not None
                     else result.error)
        self._wake.set()

    def _count(self, key: Key, outcome: machine.Outcome, result: ProbeResult) -> None:
        pool, _ = key
        self.metrics.probes.inc(*key, outcome.value)
        if result.ttft_ms is not None:
            self.metrics.latency.observe(result.ttft_ms / 1000, pool)
        if result.usage is not None:
            self.metrics.tokens.inc(pool, "prompt", by=result.usage.prompt_tokens)
            self.metrics.tokens.inc(pool, "completion", by=result.usage.completion_tokens)
            self.metrics.tokens.inc(pool, "cached", by=result.usage.cached_tokens)
        if result.rejected:
            self.metrics.rejected.inc(*key)
        # Problems are logged once per distinct reason, not per probe.
        problem = (f"warm-up request refused with HTTP {result.status}: {result.detail!r}; "
                   "check the pool's warmup settings" if result.rejected else result.error)
        if problem and self._logged.get(key) != problem:
            log.warning("%s/%s: %s", *key, problem)
        if problem:
            self._logged[key] = problem
        else:
            self._logged.pop(key, None)

    # -- Envoy ------------------------------------------------------------------------

    async def _get_json(self, url: str) -> Any:
        assert self._session is not None
        async with asyncio.timeout(ADMIN_TIMEOUT_S):
            async with self._session.get(url) as reply:
                reply.raise_for_status()
                return await reply.json(content_type=None)

    async def _poll_admin(self, now: float) -> None:
        for admin in self.settings.admin_urls:
            base = admin.rstrip("/")
            try:
                clusters = await self._get_json(f"{base}/clusters?format=json")
                stats = await self._get_json(f"{base}/stats?format=json&filter={ACTIVE_FILTER}")
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                if admin not in self._admin_down:
                    self._admin_down.add(admin)
                    log.warning("Envoy admin %s unreachable (%s): probing without its "
                                "traffic counters", admin, exc or type(exc).__name__)
                self.tracker.forget(admin)
                continue
            if admin in self._admin_down:
                self._admin_down.discard(admin)
                log.info("Envoy admin %s reachable again", admin)
            self.tracker.observe(admin, now, parse_clusters(clusters),
                                 parse_cluster_active(stats))

    # -- etcd -------------------------------------------------------------------------

    async def _etcd(self) -> Etcd3Client:
        if self._client is None:
            stack = AsyncExitStack()
            self._client = await stack.enter_async_context(etcd_client(self.settings.etcd))
            self._client_stack = stack
        return self._client

    async def _close_client(self) -> None:
        stack, self._client, self._client_stack = self._client_stack, None, None
        if stack is not None:
            with contextlib.suppress(Exception):
                await stack.aclose()

    async def _write_changes(self, config: Config, now: float) -> None:
        for key, tracked in list(self.tracked.items()):
            pool = config.pools.get(key[0])
            if pool is None or not self.leader:
                continue
            recorded = config.statuses.get(key[0], {}).get(key[1])
            if tracked.written is not None and (
                    recorded is None or tracked.written.checked_at > recorded.checked_at):
                recorded = tracked.written  # ours, not yet seen back from the watch
            if not machine.needs_write(tracked.warmth, recorded, now, pool.warmup.interval_s):
                continue
            assert tracked.warmth.state is not None
            status = Status(pool=key[0], id=key[1], state=tracked.warmth.state,
                            ttft_ms=tracked.warmth.ttft_ms, checked_at=round(now, 3))
            try:
                client = await self._etcd()
                await put_json(client, self.settings.etcd, f"status/{key[0]}/{key[1]}",
                               status_to_json(status))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - etcd trouble: retried next pass
                log.warning("cannot write status/%s/%s (%s); retrying", *key, exc)
                await self._close_client()
                return
            tracked.written = status
            self.metrics.writes.inc(key[0])

    async def _delete_status(self, key: Key) -> None:
        try:
            client = await self._etcd()
            await delete(client, self.settings.etcd, f"status/{key[0]}/{key[1]}")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - retried next pass
            log.warning("cannot delete status/%s/%s (%s)", *key, exc)
            await self._close_client()


async def run_prober(settings: ProberSettings) -> None:
    await Prober(settings).serve()
