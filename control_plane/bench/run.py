"""`hotpath bench`: replay one chat workload through every strategy, then measure overhead.

`add_bench_arguments` and `run_bench_from_args` are what the CLI wires; `run_bench` takes a
`BenchConfig` and returns the report (the smoke test calls it directly).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

from control_plane.bench import overhead as ov
from control_plane.bench.peers import PEER_BY_NAME, PEERS, add_backends, find_peer, start_peer
from control_plane.bench.replay import API_PATHS, APIS, ReplaySettings, Route, TurnResult, replay
from control_plane.bench.report import (
    OverheadReport,
    ServerCounters,
    StrategyReport,
    build_report,
    format_report,
    join_after,
    summarize,
    unavailable,
    write_json,
    write_png,
)
from control_plane.bench.strategies import (
    BENCH_POOL,
    BY_NAME,
    STATIC_MODEL,
    STATIC_POOL,
    STRATEGIES,
    Backend,
    HotpathStack,
    StrategySpec,
    prime,
    prober_command,
    prober_env,
    scrape,
    start_sims,
)
from control_plane.bench.workload import (
    Scenario,
    ServersJoin,
    SlowServer,
    Workload,
    balanced_assignment,
    generate,
    join_assignment,
)
from control_plane.errors import BenchError, UsageError
from control_plane.runtime.supervisor import ProcessGroup
from control_plane.sim.model import SimParams
from control_plane.sim.server import DEFAULT_MODEL
from control_plane.traffic.judge import DEFAULT_PREFILL_MS_PER_KIB
from control_plane.translate.listeners import ACCESS_LOG_FLUSH_S

DEFAULT_TIME_SCALE = 0.03  # ~16 s of wall time per strategy for the default scenario
# Servers unload the model after 20 s without a request (scale-to-zero, idle model unloading):
# as long as the longest pause within a session (think <= 20 s), so a session's own server
# stays warm while the session lasts, and shorter than the gaps that round robin leaves on
# each server while few sessions are active.
DEFAULT_IDLE_TO_COLD_S = 20.0
# Without a ring change pins change nothing: ring hash without them runs where servers join.
DEFAULT_STRATEGIES = tuple(s.name for s in STRATEGIES if s.name != "ring_hash_no_pins")
# The slow-server scenario: one server turns slow while serving; the oracle is no bound then
# (it deals sessions to the slow server too) and least request is left out to keep it short.
SLOW_STRATEGIES = ("round_robin", "ring_hash", "ring_hash_prober", "ring_hash_traffic",
                   "nginx-hash", "vllm-router", "sglang-router")
# The servers-join scenario: ring hash without pins (control plane --max-pins 0) and with them
# (the product's default) against round robin, the oracle and the peers.
JOIN_STRATEGIES = ("round_robin", "ring_hash_no_pins", "ring_hash", "oracle", "nginx-hash",
                   "vllm-router", "sglang-router")
SCENARIOS = ("default", "slow-server", "servers-join")
DEFAULT_SERVERS = 3
# servers-join: 3 servers serve, 2 more join at 150 s (the middle of the arrivals), with
# longer chats than the default so that many sessions are active on both sides of the join.
JOIN_SERVERS_TOTAL = 5
DEFAULT_JOIN_SERVERS = 2
DEFAULT_JOIN_AT_S = 150.0
JOIN_SCENARIO: dict[str, Any] = {"sessions": 30, "turns": (6, 12), "arrival_window": 300.0}
# The pool's session_ttl_s in scenario seconds (the product's default, 600 s), written as
# wall seconds (times the time scale): the control plane counts it on the wall clock.
DEFAULT_JOIN_SESSION_TTL_S = 600.0
DEFAULT_SLOW_AT_S = 120.0  # scenario seconds after the first session
DEFAULT_SLOW_TTFT_S = 8.0
# Wall seconds from the servers' start to the end of a strategy's setup (registration, Envoy
# converging, starting a peer), fixed in the slow-server scenario so that the server turns
# slow at the same scenario time in every strategy: its clock starts with its process.
SLOW_SETUP_S = 4.0
ORACLE_NEVER_COLD_S = 1e9
LEAD_S = 20.0  # scenario seconds between registering the servers and the first session
PROBE_INTERVAL_S = 10.0  # scenario seconds between probes of one server


@dataclass(frozen=True)
class BenchConfig:
    scenario: Scenario = field(default_factory=Scenario)
    servers: int = 3
    sim: SimParams = field(default_factory=lambda: SimParams(
        time_scale=DEFAULT_TIME_SCALE, idle_to_cold_s=DEFAULT_IDLE_TO_COLD_S))
    strategies: tuple[str, ...] = DEFAULT_STRATEGIES
    backends: tuple[str, ...] = ()  # real OpenAI-compatible URLs: no simulator then
    slow: SlowServer | None = None  # the slow-server scenario (simulator only)
    join: ServersJoin | None = None  # the servers-join scenario (simulator only)
    model: str = DEFAULT_MODEL
    session_header: bool = True
    api: str = "chat"  # the API the replay talks: chat, responses or messages
    cold_ttft_s: float | None = None  # scenario seconds; None: half a simulated cold start
    deadline_s: float = 300.0  # wall seconds per strategy
    peers_bin: str | None = None
    overhead: bool = True
    overhead_settings: ov.OverheadSettings = field(default_factory=ov.OverheadSettings)
    etcd: str | None = None  # None: start an embedded etcd
    prefix: str = "/hotpath-bench/"
    out_dir: Path = Path("bench-results")
    png: bool = True
    command: str = ""

    @property
    def time_scale(self) -> float:
        return self.sim.time_scale if not self.backends else 1.0

    @property
    def initial_servers(self) -> int:
        """Servers that serve from the start (all but the joining ones)."""
        return self.servers - (self.join.servers if self.join is not None else 0)

    @property
    def cold_threshold_s(self) -> float:
        if self.cold_ttft_s is not None:
            return self.cold_ttft_s
        return 0.5 * self.sim.cold_start_s if not self.backends else 3.0


class Progress:
    """A one-line progress bar on a terminal; a line per finished strategy elsewhere."""

    def __init__(self, total: int, out: TextIO = sys.stderr, enabled: bool = True) -> None:
        self.total = max(1, total)
        self.done = 0
        self.out = out
        self.enabled = enabled
        self.tty = out.isatty()
        self.label = ""
        self.started = time.monotonic()

    def stage(self, label: str) -> None:
        self.label = label
        self._draw()

    def turn(self, result: TurnResult) -> None:
        self.done += 1
        self._draw()

    def skip(self, turns: int) -> None:
        self.done += turns
        self._draw()

    def note(self, text: str) -> None:
        if self.enabled:
            if self.tty:
                self.out.write("\r\x1b[K")
            self.out.write(text + "\n")
            self.out.flush()
            self._draw()

    def _draw(self) -> None:
        if not (self.enabled and self.tty):
            return
        width = 30
        filled = min(width, width * self.done // self.total)
        elapsed = time.monotonic() - self.started
        self.out.write(f"\r\x1b[K[{'#' * filled}{'.' * (width - filled)}] "
                       f"{self.done}/{self.total} turns  {elapsed:4.0f}s  {self.label}"[:160])
        self.out.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.out.write("\r\x1b[K")
            self.out.flush()


def _backends_from_urls(urls: Sequence[str]) -> list[Backend]:
    out = []
    for i, url in enumerate(urls):
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/"):
            raise BenchError(f"backend {url!r} must look like http://host:port")
        out.append(Backend(f"backend-{i}", parts.hostname, parts.port or 80))
    return out


def _pool_value(cfg: BenchConfig, spec: StrategySpec, system_prompt: str) -> dict[str, Any]:
    value: dict[str, Any] = {"models": [cfg.model], "lb": spec.lb}
    if cfg.join is not None:  # scenario seconds -> the control plane's wall clock
        value["session_ttl_s"] = round(cfg.join.session_ttl_s * cfg.time_scale, 3)
    if spec.prober:
        scale = cfg.time_scale
        # The prober primes with the prefix every session shares (the system prompt), on the
        # simulator's clock.
        value["warmup"] = {
            "interval_s": max(0.1, PROBE_INTERVAL_S * scale),
            "timeout_s": max(5.0, 2 * cfg.sim.cold_start_s * scale),
            "cold_ttft_ms": 1000 * cfg.cold_threshold_s * scale,
            "body": {"model": cfg.model, "max_tokens": 1,
                     "messages": [{"role": "system", "content": system_prompt},
                                  {"role": "user", "content": "hi"}]},
        }
    return value


async def _join_at(when: float, join: Callable[[], Awaitable[object]] | None) -> float:
    """At `when` (the event loop's clock) add the joining servers; when they were in force."""
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, when - loop.time()))
    if join is not None:
        await join()
    return loop.time()


def _minus(after: dict[str, ServerCounters] | None,
           before: dict[str, ServerCounters] | None) -> dict[str, ServerCounters] | None:
    """Server counters since `before` (None: since the servers started)."""
    if after is None or before is None:
        return after
    zero = ServerCounters(0, 0, 0, 0)
    return {name: ServerCounters(*(getattr(c, f.name) - getattr(before.get(name, zero), f.name)
                                   for f in dataclasses.fields(ServerCounters)))
            for name, c in after.items()}


class Runner:
    def __init__(self, cfg: BenchConfig, group: ProcessGroup, progress: Progress) -> None:
        self.cfg = cfg
        self.group = group
        self.progress = progress
        self.stack: HotpathStack | None = None  # one at a time: with or without the stream
        self.stack_used = False  # whether a strategy replayed through it
        # (traffic stream, pins) of the first stack, where the first strategy does not care.
        self.first_kind: tuple[bool, bool] = (True, True)
        self.endpoint_ids: list[str] = []
        self.upstream_kind = ""
        self.started: list[subprocess.Popen[bytes]] = []  # this strategy's children

    async def ensure_stack(self, traffic_stream: bool | None = None, pins: bool | None = None,
                           fresh: bool = False) -> HotpathStack:
        """The running stack, or a new one with Envoy's traffic stream on or off and pins
        on or off (None: either will do; a new one takes `first_kind`'s, else the product's
        default: both on). Another kind, or `fresh` once a strategy used the stack (a new
        control plane knows no session yet), restarts the control plane and Envoy on the
        same etcd."""
        stack = self.stack
        if stack is not None and (
                (traffic_stream is not None and stack.traffic_stream != traffic_stream)
                or (pins is not None and stack.pins != pins) or (fresh and self.stack_used)):
            self.progress.stage("restarting the control plane and Envoy")
            etcd_url = stack.etcd_url
            await stack.stop()
            self.stack, self.endpoint_ids = None, []
            return await self._start_stack(etcd_url, traffic_stream is not False,
                                           pins is not False)
        if stack is None:
            first_stream, first_pins = self.first_kind
            return await self._start_stack(
                self.cfg.etcd, first_stream if traffic_stream is None else traffic_stream,
                first_pins if pins is None else pins)
        return stack

    async def _start_stack(self, etcd_url: str | None, traffic_stream: bool, pins: bool = True
                           ) -> HotpathStack:
        self.progress.stage("starting etcd, control plane and Envoy" if etcd_url is None
                            else "starting the control plane and Envoy")
        stack = HotpathStack(self.group, etcd_url, self.cfg.prefix, traffic_stream, pins)
        await stack.start()
        await stack.put_pools({BENCH_POOL: {"models": [self.cfg.model]},
                               STATIC_POOL: {"models": [STATIC_MODEL]}})
        self.stack, self.stack_used = stack, False
        return stack

    def availability(self, spec: StrategySpec) -> str | None:
        """Why the strategy cannot run here, or None."""
        if spec.peer is not None:
            peer = PEER_BY_NAME[spec.peer]
            if find_peer(peer, self.cfg.peers_bin) is None:
                return f"{peer.binary} not found (install: {peer.install})"
        return None

    async def servers(self, spec: StrategySpec) -> tuple[list[Backend], float | None]:
        """Fresh simulated servers for one strategy (started children go to self.started);
        (backends, when the slow one started on the event loop's clock, or None)."""
        cfg = self.cfg
        params = cfg.sim
        if spec.kind == "oracle":  # by definition every turn meets a warm server
            params = dataclasses.replace(params, idle_to_cold_s=ORACLE_NEVER_COLD_S)
        if cfg.slow is None:
            backends, sims = await start_sims(self.group, f"sim-{spec.name}", cfg.servers,
                                              params, cfg.model)
            self.started.append(sims)
            return backends, None
        # The last server runs in a process of its own that turns slow on its own clock,
        # SLOW_SETUP_S + the lead + at_s after it started; the others keep their seeds.
        scale = cfg.time_scale
        slow_params = dataclasses.replace(
            params, seed=params.seed + cfg.servers - 1, slow_ttft_s=cfg.slow.ttft_s,
            slow_after_s=(SLOW_SETUP_S + self.lead_s) / scale + cfg.slow.at_s)
        loop = asyncio.get_running_loop()

        async def slow_one() -> tuple[list[Backend], subprocess.Popen[bytes], float]:
            found, child = await start_sims(self.group, f"sim-{spec.name}-slow", 1,
                                            slow_params, cfg.model)
            return found, child, loop.time()

        others, (slow, slow_child, slow_started) = await asyncio.gather(
            start_sims(self.group, f"sim-{spec.name}", cfg.servers - 1, params, cfg.model),
            slow_one())
        self.started += [others[1], slow_child]
        return [*others[0], *slow], slow_started

    @property
    def lead_s(self) -> float:
        """Wall seconds between registering the servers and the first session."""
        return min(LEAD_S * self.cfg.time_scale, 5.0)

    async def strategy(self, spec: StrategySpec, workload: Workload) -> StrategyReport:
        cfg = self.cfg
        why = self.availability(spec)
        if why is not None:
            self.progress.skip(workload.turn_count)
            return unavailable(spec.name, spec.label, why)
        self.progress.stage(f"{spec.label}: starting")
        self.started = []
        loop = asyncio.get_running_loop()
        try:
            stack = None
            if spec.kind == "hotpath":  # before the servers: a restart is no part of setup
                traffic, pins = spec.stack
                # Under a join, a control plane that pins starts afresh: the sessions an
                # earlier strategy sent (same ids) must not look active to it.
                stack = await self.ensure_stack(traffic, pins,
                                                fresh=cfg.join is not None and pins is True)
            slow_started: float | None = None
            if cfg.backends:
                backends = _backends_from_urls(cfg.backends)
            else:
                backends, slow_started = await self.servers(spec)
            # Under a join the last servers are started (and primed) with the others but reach
            # the strategy only at the join.
            serving, joining = backends[:cfg.initial_servers], backends[cfg.initial_servers:]
            baseline: dict[str, ServerCounters] | None = None
            if cfg.join is not None:
                # Every strategy's servers have loaded the model and hold the shared system
                # prompt before they serve, the joining ones too: a server registers once
                # it is ready. Their counters from here on are the strategy's.
                self.progress.stage(f"{spec.label}: priming {len(backends)} servers")
                await prime(backends, cfg.model, workload.system_prompt,
                            timeout_s=max(30.0, 4 * cfg.sim.cold_start_s * cfg.time_scale))
                baseline = await scrape(backends)
            join: Callable[[], Awaitable[object]] | None = None
            route: Route
            if stack is not None:
                self.endpoint_ids = await stack.switch(
                    BENCH_POOL, _pool_value(cfg, spec, workload.system_prompt), serving,
                    self.endpoint_ids)
                if joining:  # the next switch removes them too, whatever happens here
                    self.endpoint_ids += [f"{BENCH_POOL}-{i}"
                                          for i in range(len(serving), len(backends))]
                    hotpath = stack

                    async def join_hotpath() -> object:
                        return await hotpath.add(BENCH_POOL, joining, len(serving))
                    join = join_hotpath
                if spec.prober:
                    self.started.append(self.group.start(
                        f"prober-{spec.name}",
                        prober_command(stack, traffic=spec.traffic,
                                       prefill_ms_per_kib=DEFAULT_PREFILL_MS_PER_KIB
                                       * cfg.time_scale),
                        env=prober_env()))
                url = stack.url
                route = lambda _s: url  # noqa: E731 - one URL for every session
            elif spec.kind == "oracle":
                if cfg.join is None:
                    self.progress.stage(f"{spec.label}: priming {len(backends)} servers")
                    await prime(backends, cfg.model, workload.system_prompt,
                                timeout_s=max(30.0, 4 * cfg.sim.cold_start_s * cfg.time_scale))
                    assignment = balanced_assignment(workload, len(backends))
                else:  # nothing to add: sessions are dealt by their arrival time
                    assignment = join_assignment(workload, len(serving), len(backends),
                                                 cfg.join.at_s)
                urls = [b.url for b in backends]
                route = lambda s: urls[assignment[s.id]]  # noqa: E731
            else:
                assert spec.peer is not None
                peer = PEER_BY_NAME[spec.peer]
                binary = find_peer(peer, cfg.peers_bin)
                assert binary is not None
                try:
                    url, child = await start_peer(self.group, peer, binary, serving, "replay")
                except BenchError as exc:  # a peer that does not start is reported, not fatal
                    self.progress.skip(workload.turn_count)
                    return unavailable(spec.name, spec.label, f"did not start: {exc}"[:500])
                self.started.append(child)
                route = lambda _s: url  # noqa: E731
                if joining:
                    peer_url, peer_child = url, child

                    async def join_peer() -> object:
                        await add_backends(self.group, peer, "replay", peer_url, peer_child,
                                           backends, joining)
                        return None
                    join = join_peer
            # Servers are registered this long before the first session, in every strategy:
            # a prober can use it to prime them; for everyone else they just stay cold. In
            # the slow-server scenario the first session comes SLOW_SETUP_S + the lead after
            # the slow server started (later when the setup took longer).
            self.progress.stage(f"{spec.label}: servers registered, traffic starts soon")
            wait = self.lead_s
            if slow_started is not None:
                wait = max(wait, slow_started + SLOW_SETUP_S + self.lead_s - loop.time())
            await asyncio.sleep(wait)
            self.progress.stage(f"{spec.label}: replaying")
            settings = ReplaySettings(
                model=cfg.model, time_scale=cfg.time_scale,
                session_header="x-session-id" if cfg.session_header else None,
                request_timeout_s=max(30.0, 120.0 * cfg.time_scale),
                deadline_s=cfg.deadline_s, api=cfg.api)
            pins_before = await stack.metrics() if stack is not None else {}
            t0 = loop.time()
            join_task = None
            if cfg.join is not None:
                join_task = asyncio.create_task(
                    _join_at(t0 + cfg.join.at_s * cfg.time_scale, join))
            try:
                results, truncated = await replay(workload, route, settings, self.progress.turn)
            finally:
                if join_task is not None and not join_task.done():
                    join_task.cancel()  # the replay ended (or failed) before the join
                if join_task is not None:
                    await asyncio.gather(join_task, return_exceptions=True)
            self.stack_used = self.stack_used or stack is not None
            self.progress.skip(workload.turn_count - len(results))
            counters = None if cfg.backends else _minus(await scrape(backends), baseline)
            slow_name = slow_from = None
            if slow_started is not None and cfg.slow is not None:
                slow_name = backends[-1].name
                # When it turned slow, in scenario seconds after the first session.
                slow_from = cfg.slow.at_s + (slow_started + SLOW_SETUP_S + self.lead_s
                                             - t0) / cfg.time_scale
            report = summarize(spec.name, spec.label, results, time_scale=cfg.time_scale,
                               cold_ttft_s=cfg.cold_threshold_s, truncated=truncated,
                               servers=counters, slow_server=slow_name, slow_from_s=slow_from)
            if spec.kind == "oracle" and report.probe_requests is not None:
                report.probe_requests = 0  # priming is the oracle's premise, not a probe cost
                report.probe_tokens = 0
                report.note = "servers primed before the replay; sessions dealt in turn"
                if cfg.slow is not None:
                    report.note += " (the slow server too: no bound here)"
                if cfg.join is not None:
                    report.note += " over the servers present at their arrival"
            if slow_from is not None and cfg.slow is not None \
                    and abs(slow_from - cfg.slow.at_s) > 5:
                report.note = (f"{report.note}; " if report.note else "") + (
                    f"setup took longer than {SLOW_SETUP_S:g} s: the server turned slow at "
                    f"{slow_from:.0f} s")
            if cfg.join is not None and join_task is not None:
                await self._join_report(report, spec, stack, results, join_task, joining, t0,
                                        pins_before)
            return report
        finally:
            for child in reversed(self.started):
                await asyncio.to_thread(self.group.stop, child)
            self.started = []

    async def _join_report(self, report: StrategyReport, spec: StrategySpec,
                           stack: HotpathStack | None, results: Sequence[TurnResult],
                           join_task: asyncio.Task[float], joining: Sequence[Backend],
                           t0: float, pins_before: dict[str, float]) -> None:
        """The servers-join numbers of one strategy (see report.join_after)."""
        cfg = self.cfg
        assert cfg.join is not None
        joined: float | None = None
        why = ""
        if join_task.cancelled():
            why = "the replay ended before the join"
        elif join_task.exception() is not None:
            exc = join_task.exception()
            if stack is not None:  # hotpath must take its own endpoints: a bug otherwise
                raise BenchError(f"{spec.label}: the servers did not join: {exc}") from exc
            why = f"the servers did not join: {exc}"[:300]
        else:
            joined = (join_task.result() - t0) / cfg.time_scale
        if why:
            report.note = (f"{report.note}; " if report.note else "") + why
        pins = stack is not None and spec.lb == "ring_hash"
        join_after(report, [r for r in results if r.ok], {b.name for b in joining},
                   cfg.join.at_s, joined, cfg.time_scale,
                   flush_s=ACCESS_LOG_FLUSH_S if pins else None)
        if pins and stack is not None:
            after = await stack.metrics()

            def grew(name: str) -> int:
                return int(after.get(name, 0) - pins_before.get(name, 0))
            report.pins_added = grew("hotpath_pins_added_total") - grew(
                "hotpath_pins_capped_total")
            report.unpinned_ring_changes = grew("hotpath_ring_changes_unpinned_total")

    async def overhead(self) -> list[OverheadReport]:
        cfg = self.cfg
        settings = cfg.overhead_settings
        gen = ov.LoadGen.make(self.group.workdir, STATIC_MODEL)
        self.progress.stage("overhead: starting the static upstream")
        upstream, self.upstream_kind = await ov.start_static_upstream(
            self.group, find_peer(PEER_BY_NAME["nginx-hash"], cfg.peers_bin))
        reports: list[OverheadReport] = []
        step = self.progress.stage
        reports.append(await ov.measure(gen, "direct", "direct (no gateway)", upstream[0].url,
                                        settings, step))
        stack = await self.ensure_stack(traffic_stream=True)  # the product's default
        await stack.switch(STATIC_POOL, {"models": [STATIC_MODEL], "lb": "ring_hash"}, upstream)
        reports.append(await ov.measure(gen, "hotpath", "hotpath (Envoy ring hash)", stack.url,
                                        settings, step))
        for peer in PEERS:
            binary = find_peer(peer, cfg.peers_bin)
            if binary is None:
                reports.append(OverheadReport(peer.name, peer.label, available=False,
                                              note=f"{peer.binary} not found "
                                                   f"(install: {peer.install})"))
                continue
            try:
                url, child = await start_peer(self.group, peer, binary, upstream, "overhead")
            except BenchError as exc:
                reports.append(OverheadReport(peer.name, peer.label, available=False,
                                              note=f"did not start: {exc}"[:500]))
                continue
            try:
                reports.append(await ov.measure(gen, peer.name, peer.label, url, settings,
                                                step))
            finally:
                await asyncio.to_thread(self.group.stop, child)
        for r in reports:
            if r.available and not r.note:
                r.note = "" if gen.wrk else "python load generator: numbers are a floor"
        return ov.with_added(reports)


def _meta(cfg: BenchConfig, workload: Workload) -> dict[str, Any]:
    return {
        "title": (f"hotpath bench: {cfg.scenario.sessions} chat sessions, {workload.turn_count}"
                  f" turns, {cfg.servers if not cfg.backends else len(cfg.backends)} servers"
                  f" ({'simulated' if not cfg.backends else 'real'})"
                  + ("" if cfg.api == "chat" else f", over {API_PATHS[cfg.api]}")),
        "command": cfg.command,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "scenario": dataclasses.asdict(cfg.scenario),
        "turns": workload.turn_count,
        "backends": list(cfg.backends) or "simulated",
        "servers": cfg.servers if not cfg.backends else len(cfg.backends),
        "sim": dataclasses.asdict(cfg.sim) if not cfg.backends else None,
        "time_scale": cfg.time_scale,
        "cold_ttft_threshold_s": cfg.cold_threshold_s,
        "session_header": cfg.session_header,
        "api": cfg.api,
        "load_generator": "wrk" if shutil.which("wrk") else "python (aiohttp)",
        "slow_server": None if cfg.slow is None else {
            "index": cfg.servers - 1, "at_s": cfg.slow.at_s, "ttft_s": cfg.slow.ttft_s},
        "servers_join": None if cfg.join is None else {
            "servers": cfg.join.servers, "total": cfg.servers, "at_s": cfg.join.at_s,
            "session_ttl_s": cfg.join.session_ttl_s,
            "session_ttl_wall_s": round(cfg.join.session_ttl_s * cfg.time_scale, 3)},
    }


async def run_bench(cfg: BenchConfig, progress_out: TextIO | None = sys.stderr
                    ) -> dict[str, Any]:
    unknown = [s for s in cfg.strategies if s not in BY_NAME]
    if unknown:
        raise BenchError(f"unknown strategies {unknown}; known: {', '.join(BY_NAME)}")
    if cfg.slow is not None and (cfg.backends or cfg.servers < 2):
        raise BenchError("the slow-server scenario needs the simulator and at least 2 servers")
    if cfg.join is not None and (cfg.backends or cfg.slow is not None
                                 or cfg.initial_servers < 1):
        raise BenchError("the servers-join scenario needs the simulator, no slow server, and "
                         "at least one server that does not join")
    workload = generate(cfg.scenario)
    load_start = os.getloadavg()[0]
    # Absolute: nginx resolves relative paths against its prefix, which is in this folder.
    workdir = (cfg.out_dir / "logs").resolve()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    group = ProcessGroup(workdir, error=BenchError)
    progress = Progress(workload.turn_count * len(cfg.strategies),
                        progress_out or sys.stderr, enabled=progress_out is not None)
    runner = Runner(cfg, group, progress)
    # The first stack is of the kind the first hotpath strategy that cares needs, so that
    # the strategies before it do not cost a restart.
    for name in cfg.strategies:
        kind = BY_NAME[name].stack
        if BY_NAME[name].kind == "hotpath" and kind != (None, None):
            runner.first_kind = (kind[0] is not False, kind[1] is not False)
            break
    strategies: list[StrategyReport] = []
    overhead: list[OverheadReport] = []
    try:
        for name in cfg.strategies:
            # Salted per strategy: real servers reused across strategies share no prefix.
            report = await runner.strategy(BY_NAME[name], generate(cfg.scenario, salt=name))
            strategies.append(report)
            if report.available:
                hit = report.prefix_hit_ratio
                progress.note(f"{report.label}: p95 TTFT {report.ttft_s.p95 or 0:.2f}s, "
                              f"p95 e2e {report.e2e_s.p95 or 0:.2f}s, "
                              f"prefix hit {'-' if hit is None else f'{100 * hit:.1f}%'}, "
                              f"{report.cold_hits} cold hits, {report.errors} errors")
            else:
                progress.note(f"{report.label}: not run ({report.note})")
        if cfg.overhead:
            overhead = await runner.overhead()
    finally:
        progress.close()
        await asyncio.to_thread(group.close)
    meta = _meta(cfg, workload)
    meta["overhead_upstream"] = runner.upstream_kind or None
    # Everything shares the machine's cores: what else ran shows in its load.
    meta["load_average"] = {"start": round(load_start, 2),
                            "end": round(os.getloadavg()[0], 2)}
    return build_report(meta, strategies, overhead, with_targets=cfg.slow is None,
                        join=cfg.join is not None)


# -- CLI ---------------------------------------------------------------------------------------


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    d = Scenario()
    s = SimParams()
    w = parser.add_argument_group("workload")
    j = JOIN_SCENARIO
    w.add_argument("--sessions", type=int, default=None,
                   help=f"chat sessions ({d.sessions}; servers-join: {j['sessions']})")
    w.add_argument("--turns", type=int, nargs=2, metavar=("MIN", "MAX"), default=None,
                   help=f"turns per session ({d.min_turns} {d.max_turns}; servers-join: "
                        f"{j['turns'][0]} {j['turns'][1]})")
    w.add_argument("--think", type=float, nargs=2, metavar=("MIN", "MAX"),
                   default=(d.min_think_s, d.max_think_s),
                   help="seconds between an answer and the next turn (5 20)")
    w.add_argument("--arrival-window", type=float, default=None,
                   help="sessions start at random times within this many seconds "
                        f"({d.arrival_window_s:g}; servers-join: {j['arrival_window']:g})")
    w.add_argument("--answer-tokens", type=int, nargs=2, metavar=("MIN", "MAX"),
                   default=(d.min_answer_tokens, d.max_answer_tokens),
                   help="max_tokens per turn (32 160)")
    w.add_argument("--system-tokens", type=int, default=d.system_tokens,
                   help="shared system prompt length (%(default)s)")
    w.add_argument("--seed", type=int, default=0, help="workload and simulator seed")
    b = parser.add_argument_group("backends")
    b.add_argument("--servers", type=int, default=None,
                   help=f"simulated servers, the joining ones included ({DEFAULT_SERVERS}; "
                        f"servers-join: {JOIN_SERVERS_TOTAL})")
    b.add_argument("--time-scale", type=float, default=DEFAULT_TIME_SCALE,
                   help="simulator clock: 0.1 runs ten times faster (%(default)s)")
    b.add_argument("--cold-start", type=float, default=s.cold_start_s,
                   help="simulated model load seconds (%(default)s)")
    b.add_argument("--idle-to-cold", type=float, default=None,
                   help="simulated scale-to-zero after this many idle seconds "
                        f"({DEFAULT_IDLE_TO_COLD_S:g}; servers-join: never)")
    b.add_argument("--cache-tokens", type=int, default=s.cache_tokens,
                   help="simulated prefix cache per server, tokens (%(default)s)")
    b.add_argument("--backend", action="append", default=[], metavar="URL",
                   help="a real OpenAI-compatible server (repeatable); replaces the simulator")
    b.add_argument("--model", default=None,
                   help=f"model name to request (default {DEFAULT_MODEL} for the simulator)")
    b.add_argument("--cold-ttft", type=float, default=None,
                   help="a TTFT at least this long (scenario s) counts as a cold hit "
                        "(default: half a cold start; 3 s for real backends)")
    sc = parser.add_argument_group("scenario")
    sc.add_argument("--scenario", choices=SCENARIOS, default="default",
                    help="slow-server: the last server turns slow while serving (every first "
                         f"token +{DEFAULT_SLOW_TTFT_S:g} s from {DEFAULT_SLOW_AT_S:g} s on), "
                         f"strategies {','.join(SLOW_STRATEGIES)}, no overhead run; "
                         f"servers-join: {DEFAULT_JOIN_SERVERS} of {JOIN_SERVERS_TOTAL} servers "
                         f"join at {DEFAULT_JOIN_AT_S:g} s, strategies "
                         f"{','.join(JOIN_STRATEGIES)}, no overhead run (default: %(default)s)")
    sc.add_argument("--slow-server-at", type=float, default=None, metavar="S",
                    help="the last server turns slow S scenario seconds after the first "
                         "session (implies --scenario slow-server)")
    sc.add_argument("--slow-ttft", type=float, default=None, metavar="S",
                    help="how much later a slow server sends each first token "
                         f"(default {DEFAULT_SLOW_TTFT_S:g})")
    sc.add_argument("--join-at", type=float, default=None, metavar="S",
                    help="the last --join-servers servers join S scenario seconds after the "
                         f"first session (default {DEFAULT_JOIN_AT_S:g}; implies --scenario "
                         "servers-join)")
    sc.add_argument("--join-servers", type=int, default=None, metavar="N",
                    help=f"how many of --servers join (default {DEFAULT_JOIN_SERVERS})")
    sc.add_argument("--session-ttl", type=float, default=None, metavar="S",
                    help="servers-join: the pool's session_ttl_s in scenario seconds, written "
                         "times --time-scale (the control plane's clock is the wall clock) "
                         f"(default {DEFAULT_JOIN_SESSION_TTL_S:g})")
    r = parser.add_argument_group("run")
    r.add_argument("--strategies", default=None,
                   help="comma-separated, in order (default: "
                        f"{','.join(DEFAULT_STRATEGIES)}; slow-server: "
                        f"{','.join(SLOW_STRATEGIES)}; servers-join: "
                        f"{','.join(JOIN_STRATEGIES)})")
    r.add_argument("--no-session-header", action="store_true",
                   help="send no x-session-id: hotpath derives the key from the prompt "
                        "(nginx and vllm-router then cannot pin)")
    r.add_argument("--api", choices=APIS, default="chat",
                   help="the API the sessions talk: chat (/v1/chat/completions), responses "
                        "(/v1/responses) or messages (/v1/messages) (default: %(default)s)")
    r.add_argument("--peers-bin", default=None,
                   help="directory holding vllm-router / sglang-router / nginx "
                        "(env HOTPATH_BENCH_PEERS_BIN)")
    r.add_argument("--no-peers", action="store_true", help="skip nginx and the routers")
    r.add_argument("--no-overhead", action="store_true", help="skip the overhead measurement")
    r.add_argument("--overhead-seconds", type=float, default=4.0,
                   help="throughput run per gateway (latency run: 3/5 of it) (%(default)s)")
    r.add_argument("--overhead-connections", type=int, default=64,
                   help="connections for the throughput run (%(default)s)")
    r.add_argument("--wrk-threads", type=int, default=2,
                   help="wrk threads for the throughput run (%(default)s)")
    r.add_argument("--deadline", type=float, default=300.0,
                   help="wall seconds a strategy's replay may take at most (%(default)s)")
    r.add_argument("--bench-etcd", default=None, metavar="URL",
                   help="use this etcd (prefix /hotpath-bench/) instead of an embedded one")
    r.add_argument("--out", default="bench-results",
                   help="directory for bench.json, bench.png and logs/ (%(default)s)")
    r.add_argument("--no-png", action="store_true", help="no chart")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    joins = args.scenario == "servers-join" or args.join_at is not None
    if not joins and (args.join_servers is not None or args.session_ttl is not None):
        raise ValueError("--join-servers and --session-ttl need --scenario servers-join or "
                         "--join-at")
    d = Scenario()
    preset: dict[str, Any] = JOIN_SCENARIO if joins else {
        "sessions": d.sessions, "turns": (d.min_turns, d.max_turns),
        "arrival_window": d.arrival_window_s}
    turns = args.turns or preset["turns"]
    scenario = Scenario(
        sessions=preset["sessions"] if args.sessions is None else args.sessions,
        min_turns=turns[0], max_turns=turns[1],
        min_think_s=args.think[0], max_think_s=args.think[1],
        arrival_window_s=(preset["arrival_window"] if args.arrival_window is None
                          else args.arrival_window),
        min_answer_tokens=args.answer_tokens[0],
        max_answer_tokens=args.answer_tokens[1], system_tokens=args.system_tokens,
        seed=args.seed)
    # servers-join keeps every server loaded (no scale-to-zero) unless told otherwise: it
    # measures what a join does to the sessions' caches, not cold starts.
    idle = args.idle_to_cold if args.idle_to_cold is not None else (
        ORACLE_NEVER_COLD_S if joins else DEFAULT_IDLE_TO_COLD_S)
    sim = SimParams(time_scale=args.time_scale, cold_start_s=args.cold_start,
                    idle_to_cold_s=idle, cache_tokens=args.cache_tokens, seed=args.seed)
    servers = args.servers if args.servers is not None else (
        JOIN_SERVERS_TOTAL if joins else DEFAULT_SERVERS)
    join = None
    if joins:
        join = ServersJoin(
            at_s=DEFAULT_JOIN_AT_S if args.join_at is None else args.join_at,
            servers=DEFAULT_JOIN_SERVERS if args.join_servers is None else args.join_servers,
            session_ttl_s=(DEFAULT_JOIN_SESSION_TTL_S if args.session_ttl is None
                           else args.session_ttl))
        if join.servers >= servers:
            raise ValueError(f"--join-servers ({join.servers}) must be fewer than --servers "
                             f"({servers})")
    slow = None
    if args.scenario == "slow-server" or args.slow_server_at is not None:
        slow = SlowServer(
            at_s=DEFAULT_SLOW_AT_S if args.slow_server_at is None else args.slow_server_at,
            ttft_s=DEFAULT_SLOW_TTFT_S if args.slow_ttft is None else args.slow_ttft)
    elif args.slow_ttft is not None:
        raise ValueError("--slow-ttft needs --scenario slow-server or --slow-server-at")
    if slow is not None and join is not None:
        raise ValueError("pick one scenario: slow-server or servers-join")
    names = args.strategies or ",".join(
        SLOW_STRATEGIES if slow else JOIN_STRATEGIES if join else DEFAULT_STRATEGIES)
    strategies = tuple(n.strip() for n in names.split(",") if n.strip())
    if args.no_peers:
        strategies = tuple(n for n in strategies if BY_NAME.get(n, STRATEGIES[0]).peer is None)
    lat = max(1.0, 0.6 * args.overhead_seconds)
    return BenchConfig(
        scenario=scenario, servers=servers, sim=sim, strategies=strategies,
        backends=tuple(args.backend), model=args.model or DEFAULT_MODEL, slow=slow, join=join,
        session_header=not args.no_session_header, api=args.api, cold_ttft_s=args.cold_ttft,
        deadline_s=args.deadline, peers_bin=args.peers_bin,
        overhead=not args.no_overhead and slow is None and join is None,
        overhead_settings=ov.OverheadSettings(latency_seconds=lat,
                                              throughput_seconds=args.overhead_seconds,
                                              connections=args.overhead_connections,
                                              wrk_threads=args.wrk_threads),
        etcd=args.bench_etcd, out_dir=Path(args.out), png=not args.no_png,
        command=shlex.join(["hotpath" if Path(sys.argv[0]).name == "hotpath" else sys.argv[0],
                            *sys.argv[1:]]))


async def run_bench_from_args(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    report = await run_bench(cfg)
    print(format_report(report))
    json_path = cfg.out_dir / "bench.json"
    write_json(report, json_path)
    print(f"\nJSON: {json_path}")
    if cfg.png:
        png_path = cfg.out_dir / "bench.png"
        why = write_png(report, png_path)
        print(f"chart: {why}" if why else f"chart: {png_path}")
    return 0
