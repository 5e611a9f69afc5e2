"""The prober process: the IO shell around the sans-IO scheduler (scheduler.py).

It follows etcd (pools, endpoints, statuses), takes part in the leader election, reads
Envoy's per-host counters into the ``TrafficTracker``, and feeds all of that, with the time,
to the ``Scheduler``; then it executes the scheduler's actions: warm-up probes over HTTP
(their results go back to the scheduler), ``status/<pool>/<id>`` writes and deletes in etcd,
and it serves the Prometheus metrics that the scheduler's events update. Every decision
(what is due, skipped, released, written) is the scheduler's; see its docstring.
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

from control_plane.config.model import DEFAULT_SYSTEM_PROMPT, WarmState, status_to_json
from control_plane.config.state import ConfigState
from control_plane.prober import state as machine
from control_plane.prober.probe import PROBE_HEADER, PROBER_HEADER, ProbeResult, send_probe
from control_plane.prober.scheduler import (
    MAX_POLL_PERIOD_S,
    Action,
    CancelProbe,
    DeleteStatus,
    Forgotten,
    Judged,
    KeptWarm,
    Key,
    Policy,
    Probe,
    Probed,
    Released,
    Scheduler,
    Skipped,
    WriteStatus,
)
from control_plane.prober.traffic import parse_cluster_active
from control_plane.runtime.envoy_admin import parse_clusters
from control_plane.runtime.metrics import Family, Histogram, serve_metrics
from control_plane.runtime.tasks import run_together
from control_plane.store.etcd import EtcdFollower, EtcdSettings, delete, etcd_client, put_json
from control_plane.store.leader import LeaderElection
from control_plane.traffic.judge import DEFAULT_PREFILL_MS_PER_KIB, merge
from control_plane.traffic.window import EndpointTraffic, Sample

log = logging.getLogger(__name__)

DEFAULT_METRICS = "127.0.0.1:9102"
DEFAULT_IDLE_HORIZON_S = 600.0
DEFAULT_LEADER_TTL_S = 10
ADMIN_TIMEOUT_S = 2.0
DROPPED_STAT = "access_logs.open_telemetry_access_log.logs_dropped"
ACTIVE_FILTER = quote(r"\.upstream_rq_active$|^" + DROPPED_STAT.replace(".", r"\.") + "$")


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
    # Control-plane metrics URLs whose /traffic windows show real traffic's time to first
    # token (every control plane whose Envoys serve the pools); none: probes only.
    traffic_urls: tuple[str, ...] = ()
    prefill_ms_per_kib: float = DEFAULT_PREFILL_MS_PER_KIB
    election: bool = True
    leader_ttl_s: int = DEFAULT_LEADER_TTL_S
    identity: str = field(default_factory=default_identity)

    def min_warm_for(self, pool: str) -> int | None:
        return self.policy.min_warm_for(pool)

    @property
    def policy(self) -> Policy:
        """What the scheduler needs of these settings."""
        return Policy(system_prompt=self.system_prompt, thresholds=self.thresholds,
                      idle_horizon_s=self.idle_horizon_s, min_warm=self.min_warm,
                      min_warm_per_pool=self.min_warm_per_pool,
                      prefill_ms_per_kib=self.prefill_ms_per_kib)


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
        self.endpoint_ttft = Histogram("hotpath_endpoint_ttft_seconds",
                                       "time to first token, by endpoint and signal (the "
                                       "control plane reports source=traffic)",
                                       ("pool", "endpoint", "source"))
        self.verdicts = Family("hotpath_prober_traffic_verdicts_total", "counter",
                               "endpoints judged by their real traffic, by verdict",
                               ("pool", "endpoint", "verdict"))
        self.dropped = Family("hotpath_envoy_access_logs_dropped", "gauge",
                              "access-log entries an Envoy could not stream (its "
                              "logs_dropped counter)", ("envoy",))

    def families(self) -> list[Family]:
        return [self.probes, self.skipped, self.rejected, self.latency, self.tokens,
                self.state, self.ttft, self.released, self.writes, self.leader,
                self.endpoint_ttft, self.verdicts, self.dropped]

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
                       self.released, self.endpoint_ttft, self.verdicts):
            family.remove(labels)


class Prober:
    def __init__(self, settings: ProberSettings, rng: random.Random | None = None) -> None:
        self.settings = settings
        self.config_state = ConfigState()
        self.follower = EtcdFollower(settings.etcd, self.config_state, self._on_config)
        self.scheduler = Scheduler(settings.policy, rng=rng)
        self.tracker = self.scheduler.tracker
        self.metrics = ProberMetrics()
        self.metrics_port = 0
        self._wake = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self._client: Etcd3Client | None = None
        self._client_stack: AsyncExitStack | None = None
        self._admin_down: set[str] = set()
        self._traffic_down: set[str] = set()
        self._logged: dict[Key, str] = {}
        self._probes: dict[Key, asyncio.Task[None]] = {}
        self._cancelled: set[asyncio.Task[None]] = set()  # probes stopped, not yet finished

    @property
    def leader(self) -> bool:
        return self.scheduler.leader

    # -- lifecycle ---------------------------------------------------------------------

    def _on_config(self, _revision: int) -> None:
        self._wake.set()

    def _on_leader(self, leader: bool) -> None:
        self.metrics.leader.set(1.0 if leader else 0.0)
        # Losing it: no probe and no write after leadership is gone; the next leader
        # starts from the statuses in etcd.
        for action in self.scheduler.lead(leader):
            if isinstance(action, CancelProbe):
                self._cancel(action.key)
        if not leader:
            for key in list(self._probes):
                self._cancel(key)
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

    async def tick(self, now_m: float, now: float) -> float:
        """One pass of the scheduler, its actions executed. Returns how long the loop may
        sleep before the next pass."""
        self._cancelled = {t for t in self._cancelled if not t.done()}
        await self._execute(self.scheduler.reconcile(self.config_state.config(), now_m, now))
        if (self.settings.admin_urls or self.settings.traffic_urls) and \
                self.scheduler.traffic_due(now_m):
            await self._poll_admin(now)
            reports = await self._poll_traffic()
            if self.settings.traffic_urls:
                await self._execute(self.scheduler.traffic_seen(reports))
            self.scheduler.traffic_read(now_m)
        await self._execute(self.scheduler.decide(now_m, now))
        self._show_endpoints()
        return self.scheduler.wait_s(now_m)

    async def _execute(self, actions: list[Action]) -> None:
        """Carry out a pass's actions in order. Once leadership is gone the rest is
        dropped; a failed write ends the pass's writes (the scheduler asks again)."""
        writing, term = True, self.scheduler.term
        for action in actions:
            if not self.leader or self.scheduler.term != term:
                return
            if isinstance(action, Probe):
                if action.cause:
                    log.info("%s/%s: probed now: %s", *action.key, action.cause)
                self._probes[action.key] = asyncio.create_task(
                    self._probe(action), name=f"probe {action.key[0]}/{action.key[1]}")
            elif isinstance(action, CancelProbe):
                self._cancel(action.key)
            elif isinstance(action, WriteStatus):
                writing = writing and await self._write_status(action)
            elif isinstance(action, DeleteStatus):
                await self._delete_status(action.key)
            elif isinstance(action, Judged):
                self._judged(action)
            elif isinstance(action, Skipped):
                self.metrics.skipped.inc(*action.key, action.reason.value)
            elif isinstance(action, Released):
                log.info("%s/%s idle for %.0f s: let go cold (min warm %s)", *action.key,
                         action.idle_s, action.min_warm)
            elif isinstance(action, KeptWarm):
                log.info("%s/%s: kept warm again", *action.key)
            elif isinstance(action, Forgotten):
                self.metrics.forget(action.key)
                self._logged.pop(action.key, None)

    def _judged(self, event: Judged) -> None:
        verdict = event.verdict
        self.metrics.verdicts.inc(*event.key, "slow" if verdict.slow else "fast")
        if event.changed:
            after = event.warmth.state
            log.info("%s/%s %s: traffic p90 TTFT %.1f s over %d requests (p50 %.1f s, %.1f "
                     "req/s in %.0f s)", *event.key, after.value if after else "unknown",
                     verdict.p90_ms / 1000, verdict.samples, verdict.p50_ms / 1000,
                     verdict.rps, verdict.window_s)

    def _show_endpoints(self) -> None:
        for key, tracked in self.scheduler.tracked.items():
            self.metrics.set_endpoint(key, tracked.warmth)

    def _cancel(self, key: Key) -> None:
        task = self._probes.pop(key, None)
        if task is not None:
            task.cancel()
            self._cancelled.add(task)

    async def _probe(self, action: Probe) -> None:
        assert self._session is not None
        loop = asyncio.get_running_loop()
        key = action.key
        try:
            result = await send_probe(
                self._session, action.url, action.body, action.timeout_s,
                {PROBE_HEADER: "1", PROBER_HEADER: self.settings.identity})
        except BaseException:
            if self._probes.get(key) is asyncio.current_task():
                del self._probes[key]
                self.scheduler.probe_dropped(key)
            raise
        if self._probes.get(key) is not asyncio.current_task():
            return  # cancelled as it finished
        del self._probes[key]
        event = self.scheduler.probe_done(key, result.ttft_ms, loop.time())
        if event is not None:
            self._count(event, result)
            if result.ttft_ms is not None:
                self.metrics.endpoint_ttft.observe(result.ttft_ms / 1000, *key, "probe")
            self.metrics.set_endpoint(key, event.warmth)
            if event.changed:
                after = event.warmth.state
                log.info("%s/%s: %s -> %s (%s)", *key,
                         event.before.value if event.before else "unknown",
                         after.value if after else "unknown",
                         f"ttft {result.ttft_ms:.0f} ms" if result.ttft_ms is not None
                         else result.error)
        self._wake.set()

    def _count(self, event: Probed, result: ProbeResult) -> None:
        key = event.key
        pool, _ = key
        self.metrics.probes.inc(*key, event.outcome.value)
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
            for stat in stats.get("stats", []) or []:
                if stat.get("name") == DROPPED_STAT:
                    self.metrics.dropped.set(float(stat.get("value", 0) or 0), admin)

    async def _poll_traffic(self) -> dict[Key, EndpointTraffic]:
        """Every control plane's window, merged per endpoint (each Envoy streams to one
        control plane, so nothing counts twice). A control plane that does not answer adds
        nothing: its Envoys' traffic then shows as none, never as invented."""
        parts: dict[Key, list[EndpointTraffic]] = {}
        for url in self.settings.traffic_urls:
            try:
                report = await self._get_json(f"{url.rstrip('/')}/traffic")
                endpoints = traffic_report(report)
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                if url not in self._traffic_down:
                    self._traffic_down.add(url)
                    log.warning("traffic window at %s unreachable (%s): its Envoys' traffic "
                                "is not counted", url, exc or type(exc).__name__)
                continue
            if url in self._traffic_down:
                self._traffic_down.discard(url)
                log.info("traffic window at %s reachable again", url)
            for key, traffic in endpoints.items():
                parts.setdefault(key, []).append(traffic)
        merged = {key: merge(items) for key, items in parts.items()}
        return {key: traffic for key, traffic in merged.items() if traffic is not None}

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

    async def _write_status(self, action: WriteStatus) -> bool:
        """Whether the write went through."""
        pool, eid = action.key
        try:
            client = await self._etcd()
            await put_json(client, self.settings.etcd, f"status/{pool}/{eid}",
                           status_to_json(action.status))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - etcd trouble: retried next pass
            log.warning("cannot write status/%s/%s (%s); retrying", pool, eid, exc)
            await self._close_client()
            return False
        self.scheduler.written(action.key, action.status)
        self.metrics.writes.inc(pool)
        return True

    async def _delete_status(self, key: Key) -> None:
        try:
            client = await self._etcd()
            await delete(client, self.settings.etcd, f"status/{key[0]}/{key[1]}")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - retried after ORPHAN_RETRY_S
            log.warning("cannot delete status/%s/%s (%s)", *key, exc)
            await self._close_client()


def traffic_report(report: Mapping[str, Any]) -> dict[Key, EndpointTraffic]:
    """A control plane's ``/traffic`` JSON (traffic/service.py ``report``) per endpoint."""
    endpoints: dict[Key, EndpointTraffic] = {}
    for item in report.get("endpoints", []):
        if not item.get("endpoint"):
            continue  # an address the control plane does not know (yet)
        endpoints[(str(item["pool"]), str(item["endpoint"]))] = EndpointTraffic(
            samples=tuple(Sample(float(t), int(b), bool(w)) for t, b, w in item["samples"]),
            requests=int(item["requests"]), abandoned=int(item["abandoned"]),
            failures=int(item["failures"]), rps=float(item["rps"]),
            covered_s=float(item["covered_s"]))
    return endpoints


async def run_prober(settings: ProberSettings) -> None:
    await Prober(settings).serve()
