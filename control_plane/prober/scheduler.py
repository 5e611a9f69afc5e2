"""Scheduler: which endpoint to probe, skip, let go cold or write, without IO.

Config (pools, endpoints, statuses as etcd has them), the time, Envoy's traffic (a
``TrafficTracker``), probe results and leadership go in; actions come out as frozen
dataclasses: ``Probe``, ``CancelProbe``, ``WriteStatus``, ``DeleteStatus``, plus events for
metrics and logs (``Skipped``, ``Probed``, ``Released``, ``KeptWarm``, ``Forgotten``). The
shell (service.py) follows etcd, reads Envoy's counters, executes the actions and reports
back (``probe_done``, ``written``). Two clocks: ``now_m`` (monotonic) for due times, ``now``
(unix seconds) for records and traffic. One pass is ``reconcile``, then the traffic read if
``traffic_due``, then ``decide``; ``wait_s`` says how long the shell may sleep after it.

Rules:

- Only the leader acts. A scheduler that is not the leader returns no action and takes no
  probe result; stepping down cancels every probe in flight (``CancelProbe``) and forgets
  every endpoint, so the next leader (or this one, later) starts from the records in etcd.
  The shell drops whatever is left of a pass once leadership is gone (or ``term`` moved).
- An endpoint is tracked when its pool exists (no pool: no model to probe with). A new or
  changed endpoint is first due after a jitter in ``[0, min(1 s, interval / 2)]`` drawn from
  the random source given to the scheduler; a changed one cancels its probe in flight. A
  new endpoint whose record is not stale carries on from it (state and TTFT: a restart or
  a new leader neither flaps nor rewrites); a changed one starts with no state.
- A removed endpoint is forgotten (``Forgotten``) and its probe cancelled. A status whose
  endpoint is gone is deleted (``DeleteStatus``), at most once per ``ORPHAN_RETRY_S`` per
  key: nobody else will delete it, and a failed delete is retried after that spacing.
- Envoy's counters are read before a pass at least every poll period (``min(2 s, a
  quarter of the shortest interval)``, at least 0.1 s), and at most 0.1 s old when some
  endpoint is due, so "served real traffic" is fresh right before any probe.
- Release (``--min-warm``, ``--idle-horizon``, state.choose_released): per pool, endpoints
  idle (no real traffic since they were first seen) beyond the horizon are let go cold,
  longest idle first, while ``min_warm`` that are not down stay probed. Releasing cancels
  the probe in flight and marks the endpoint cold; an endpoint no longer chosen is kept
  warm again and due at once (probed on the next pass).
- Real traffic (``traffic_seen``, every control plane's window merged, at each read) judges
  an endpoint with at least ``min_traffic_samples`` samples (traffic/judge.py): its verdict,
  fast or slow, feeds the same state machine as a probe outcome, and the state records
  ``source: traffic`` with the window's p50/p90 and rate. Such an endpoint is not probed
  while its traffic lasts; with too little traffic, probes decide (``source: probe``).
- Of the endpoints due at the start of a pass (and not in flight), each is, first match:
  skipped ``released``; skipped ``traffic`` when real traffic judged it at the last read;
  skipped ``busy`` when Envoy has a request in flight to it (never
  disturb a single-slot server); skipped ``traffic`` when it is warm (or has no state yet:
  it then counts as warm) and served real traffic within its interval; otherwise probed.
  A skipped endpoint is due again after one interval. Cold and down endpoints are probed
  between real requests: only a probe can find them warm again.
- Connection failures in real traffic (``tracker.connect_failed_at``: Envoy's connections
  to it failed, and it has not answered cleanly since) seen after its last probe was sent make an
  endpoint that is not down due at once and probed whatever else says (``Probe.cause``): a
  dead host under traffic is down after ``fall`` failed probes, not after its interval.
  Until it answers cleanly again, a fast traffic verdict (answers from before) is ignored.
- A probe result is taken only for an endpoint with that probe in flight: not one removed,
  changed, released or cancelled meanwhile. The outcome (fast / slow / failed against the
  pool's ``cold_ttft_ms``) feeds the state machine; the next probe is due after an
  interval, or after ``min(1 s, interval / 4)`` while a change is pending.
- ``WriteStatus`` when state.needs_write says so: the state differs from the record, or
  the record is half-way to going stale. The record is the newer of what etcd shows and
  what this scheduler was told it wrote (``written``), so a write not yet seen back from
  the watch is not repeated. An action not confirmed by ``written`` is emitted again on
  the next pass (the write failed: retry).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from control_plane.config.model import (
    Config,
    Endpoint,
    Pool,
    Source,
    Status,
    TrafficSummary,
    WarmState,
)
from control_plane.prober import state as machine
from control_plane.prober.probe import probe_url, warmup_body
from control_plane.prober.traffic import TrafficTracker
from control_plane.traffic.judge import (
    DEFAULT_MIN_SAMPLES,
    DEFAULT_PREFILL_MS_PER_KIB,
    Verdict,
    judge,
)
from control_plane.traffic.window import EndpointTraffic
from control_plane.translate.warmth import stale_after_s

Key = tuple[str, str]  # (pool, endpoint id)

# Envoy's counters are read at least this often (capped by a quarter interval), so "last
# real traffic" is accurate to that, and at most FRESH_POLL_S old right before any probe.
MAX_POLL_PERIOD_S = 2.0
FRESH_POLL_S = 0.1
ORPHAN_RETRY_S = 5.0
MAX_JITTER_S = 1.0
MIN_WAIT_S = 0.01


class SkipReason(StrEnum):
    TRAFFIC = "traffic"  # served real traffic within the interval: it is warm
    BUSY = "busy"  # a request in flight: never disturb it
    RELEASED = "released"  # let go cold on purpose


# -- actions: what the shell must do ---------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """Send the warm-up request; report the answer with ``probe_done``."""

    key: Key
    url: str
    body: Mapping[str, Any]
    timeout_s: float
    cause: str = ""  # why it is probed out of turn (empty: it was due)


@dataclass(frozen=True)
class CancelProbe:
    """Stop the probe in flight for ``key``; its result is no longer wanted."""

    key: Key


@dataclass(frozen=True)
class WriteStatus:
    """Put ``status/<pool>/<id>``; confirm with ``written``."""

    key: Key
    status: Status


@dataclass(frozen=True)
class DeleteStatus:
    """Delete ``status/<pool>/<id>``: its endpoint is gone."""

    key: Key


# -- events: what happened, for metrics and logs ---------------------------------------


@dataclass(frozen=True)
class Skipped:
    key: Key
    reason: SkipReason


@dataclass(frozen=True)
class Probed:
    """A probe result was taken; ``before`` is the state it found."""

    key: Key
    outcome: machine.Outcome
    before: WarmState | None
    warmth: machine.Warmth

    @property
    def changed(self) -> bool:
        return self.warmth.state is not self.before


@dataclass(frozen=True)
class Judged:
    """Real traffic decided an outcome; ``before`` is the state it found."""

    key: Key
    verdict: Verdict
    before: WarmState | None
    warmth: machine.Warmth

    @property
    def changed(self) -> bool:
        return self.warmth.state is not self.before


@dataclass(frozen=True)
class Released:
    """Let go cold: idle for ``idle_s`` with more than ``min_warm`` kept."""

    key: Key
    idle_s: float
    min_warm: int | None


@dataclass(frozen=True)
class KeptWarm:
    """A released endpoint is probed again."""

    key: Key


@dataclass(frozen=True)
class Forgotten:
    """The endpoint is gone: drop what is kept about it (its metrics)."""

    key: Key


Action = Probe | CancelProbe | WriteStatus | DeleteStatus | Skipped | Judged | Released | \
    KeptWarm | Forgotten


@dataclass(frozen=True)
class Policy:
    """The prober's settings that decide: the warm-up prompt, thresholds and release."""

    system_prompt: str
    thresholds: machine.Thresholds = field(default_factory=machine.Thresholds)
    idle_horizon_s: float = 600.0
    min_warm: int | None = None  # endpoints per pool kept warm; None: all
    min_warm_per_pool: Mapping[str, int] = field(default_factory=dict)
    # Warmth from real traffic (traffic/judge.py).
    prefill_ms_per_kib: float = DEFAULT_PREFILL_MS_PER_KIB
    min_traffic_samples: int = DEFAULT_MIN_SAMPLES

    def min_warm_for(self, pool: str) -> int | None:
        return self.min_warm_per_pool.get(pool, self.min_warm)


@dataclass
class Tracked:
    """One endpoint the scheduler looks after."""

    endpoint: Endpoint
    warmth: machine.Warmth
    next_due: float  # monotonic
    first_seen: float  # unix time
    written: Status | None = None  # the last record written, or found in etcd
    probing: bool = False
    source: Source = Source.PROBE  # which signal decided the state last
    traffic: TrafficSummary | None = None  # what real traffic showed, when it decided
    probed_at: float = 0.0  # unix time its last probe was sent


def poll_period_s(config: Config) -> float:
    intervals = [p.warmup.interval_s for p in config.pools.values()]
    return max(FRESH_POLL_S, min([MAX_POLL_PERIOD_S] + [i / 4 for i in intervals]))


class Scheduler:
    """Decisions of one prober. ``tracker`` is read, never fed: the shell feeds it."""

    def __init__(self, policy: Policy, tracker: TrafficTracker | None = None,
                 rng: random.Random | None = None) -> None:
        self.policy = policy
        self.tracker = tracker if tracker is not None else TrafficTracker()
        self.leader = False
        self.term = 0  # counts changes of leadership: actions of an older term are void
        self._rng = rng if rng is not None else random.Random()
        self._config = Config()
        self._tracked: dict[Key, Tracked] = {}
        self._last_read = -1e9  # monotonic time of the last traffic read
        self._deleted: dict[Key, float] = {}  # orphan statuses deleted, when (monotonic)
        self._verdicts: dict[Key, Verdict] = {}  # from the last read of real traffic

    @property
    def tracked(self) -> Mapping[Key, Tracked]:
        return self._tracked

    def lead(self, leader: bool) -> list[Action]:
        """Leadership changed. Losing it cancels every probe and forgets every endpoint."""
        if leader != self.leader:
            self.term += 1
        self.leader = leader
        if leader:
            return []
        cancels: list[Action] = [CancelProbe(k) for k, t in self._tracked.items() if t.probing]
        self._tracked.clear()
        return cancels

    # -- a pass ----------------------------------------------------------------------

    def reconcile(self, config: Config, now_m: float, now: float) -> list[Action]:
        """Follow the config: track new endpoints, forget removed ones, delete orphans."""
        if not self.leader:
            return []
        self._config = config
        actions: list[Action] = []
        wanted: dict[Key, tuple[Pool, Endpoint]] = {}
        for pool_name, endpoints in config.endpoints.items():
            pool = config.pools.get(pool_name)
            if pool is None:
                continue  # no pool: no model to probe with, and no cluster routes to it
            for eid, endpoint in endpoints.items():
                wanted[(pool_name, eid)] = (pool, endpoint)
        for key in [k for k in self._tracked if k not in wanted]:
            if self._tracked.pop(key).probing:
                actions.append(CancelProbe(key))
            actions.append(Forgotten(key))
        for key, (pool, endpoint) in wanted.items():
            tracked = self._tracked.get(key)
            if tracked is not None and tracked.endpoint == endpoint:
                continue
            if tracked is not None and tracked.probing:
                actions.append(CancelProbe(key))
            recorded = config.statuses.get(key[0], {}).get(key[1])
            warmth = machine.Warmth()
            if tracked is None and recorded is not None and \
                    now - recorded.checked_at <= stale_after_s(pool.warmup.interval_s,
                                                               len(wanted)):
                # Carry on from the record (a restart or a new leader): no flapping.
                warmth = machine.Warmth(state=recorded.state, ttft_ms=recorded.ttft_ms)
            jitter = self._rng.uniform(0, min(MAX_JITTER_S, pool.warmup.interval_s / 2))
            self._tracked[key] = Tracked(endpoint=endpoint, warmth=warmth,
                                         next_due=now_m + jitter, first_seen=now,
                                         written=recorded)
        for pool_name, statuses in config.statuses.items():
            for eid in statuses:
                key = (pool_name, eid)
                if eid in config.endpoints.get(pool_name, {}):
                    continue
                if now_m - self._deleted.get(key, -1e9) >= ORPHAN_RETRY_S:
                    self._deleted[key] = now_m
                    actions.append(DeleteStatus(key))
        return actions

    def traffic_due(self, now_m: float) -> bool:
        """Whether Envoy's counters should be read (into the tracker) before ``decide``."""
        if not self.leader:
            return False
        fresh = FRESH_POLL_S if self._due(now_m) else poll_period_s(self._config)
        return now_m - self._last_read >= fresh

    def traffic_read(self, now_m: float) -> None:
        """The tracker was fed a fresh read of every Envoy admin."""
        self._last_read = now_m

    def traffic_seen(self, reports: Mapping[Key, EndpointTraffic]) -> list[Action]:
        """A fresh read of real traffic (every control plane's window, merged). An endpoint
        with enough of it is judged by it (``Judged``) and is not probed while it lasts;
        the others are left to probes."""
        if not self.leader:
            return []
        self._verdicts = {}
        actions: list[Action] = []
        for key, traffic in reports.items():
            tracked = self._tracked.get(key)
            if tracked is None or tracked.warmth.released:
                continue
            pool = self._config.pools[key[0]]
            verdict = judge(traffic, pool.warmup.cold_ttft_ms, self.policy.prefill_ms_per_kib,
                            self.policy.min_traffic_samples)
            if verdict is None:
                continue
            if not verdict.slow and self.tracker.connect_failed_at(*key) is not None:
                continue  # its connections fail: answers from before say nothing; probes do
            self._verdicts[key] = verdict
            before = tracked.warmth.state
            outcome = machine.Outcome.SLOW if verdict.slow else machine.Outcome.FAST
            tracked.warmth = machine.observe(tracked.warmth, outcome, verdict.decided_ms,
                                             self.policy.thresholds)
            tracked.source = Source.TRAFFIC
            tracked.traffic = TrafficSummary(p50_ms=verdict.p50_ms, p90_ms=verdict.p90_ms,
                                             rps=verdict.rps, window_s=verdict.window_s)
            actions.append(Judged(key, verdict, before, tracked.warmth))
        return actions

    def decide(self, now_m: float, now: float) -> list[Action]:
        """Release, skip or probe what is due, then the writes."""
        if not self.leader:
            return []
        for key, candidate in self._tracked.items():
            if (not candidate.probing and candidate.next_due > now_m
                    and self._failing(key, candidate)):
                candidate.next_due = now_m  # real traffic says it may be dead: probe now
        due = self._due(now_m)
        actions = self._release(now_m, now)
        for key in due:
            tracked = self._tracked.get(key)
            if tracked is not None and not tracked.probing:
                actions.append(self._skip_or_probe(key, tracked, now_m, now))
        actions += self._writes(now)
        return actions

    def wait_s(self, now_m: float) -> float:
        """How long the shell may sleep before the next pass (a config change or a probe
        result wakes it sooner)."""
        waits = [t.next_due - now_m for t in self._tracked.values() if not t.probing]
        return max(MIN_WAIT_S, min([poll_period_s(self._config)] + waits))

    # -- reports from the shell --------------------------------------------------------

    def probe_done(self, key: Key, ttft_ms: float | None, now_m: float) -> Probed | None:
        """A probe answered in ``ttft_ms`` (None: failed). None when the result is not
        taken (see the rules)."""
        tracked = self._tracked.get(key)
        if not self.leader or tracked is None or not tracked.probing:
            return None
        tracked.probing = False
        pool = self._config.pools[key[0]]
        outcome = machine.classify(ttft_ms, pool.warmup.cold_ttft_ms)
        before = tracked.warmth.state
        tracked.warmth = machine.observe(tracked.warmth, outcome, ttft_ms,
                                         self.policy.thresholds)
        tracked.source, tracked.traffic = Source.PROBE, None
        tracked.next_due = now_m + machine.next_probe_delay_s(tracked.warmth,
                                                              pool.warmup.interval_s)
        return Probed(key, outcome, before, tracked.warmth)

    def probe_dropped(self, key: Key) -> None:
        """A probe ended without a result (it crashed): due again as it was."""
        tracked = self._tracked.get(key)
        if tracked is not None:
            tracked.probing = False

    def written(self, key: Key, status: Status) -> None:
        """A ``WriteStatus`` succeeded."""
        tracked = self._tracked.get(key)
        if tracked is not None:
            tracked.written = status

    # -- rules -----------------------------------------------------------------------

    def _due(self, now_m: float) -> list[Key]:
        return [k for k, t in self._tracked.items() if not t.probing and t.next_due <= now_m]

    def _release(self, now_m: float, now: float) -> list[Action]:
        actions: list[Action] = []
        for pool_name in self._config.pools:
            keys = [k for k in self._tracked if k[0] == pool_name]
            activity = {}
            for key in keys:
                tracked = self._tracked[key]
                last = self.tracker.last_traffic(*key)
                idle_since = max(tracked.first_seen, last if last is not None else 0.0)
                activity[key[1]] = machine.Activity(tracked.warmth.state, idle_since)
            min_warm = self.policy.min_warm_for(pool_name)
            released = machine.choose_released(activity, min_warm, self.policy.idle_horizon_s,
                                               now)
            for key in keys:
                tracked = self._tracked[key]
                if key[1] in released and not tracked.warmth.released:
                    if tracked.probing:
                        tracked.probing = False
                        actions.append(CancelProbe(key))
                    tracked.warmth = machine.release(tracked.warmth)
                    actions.append(Released(key, now - activity[key[1]].idle_since, min_warm))
                elif key[1] not in released and tracked.warmth.released:
                    tracked.warmth = machine.unrelease(tracked.warmth)
                    tracked.next_due = now_m
                    actions.append(KeptWarm(key))
        return actions

    def _failing(self, key: Key, tracked: Tracked) -> bool:
        """Connections to it failed in real traffic since its last probe was sent."""
        failed = self.tracker.connect_failed_at(*key)
        return (failed is not None and failed > tracked.probed_at
                and tracked.warmth.state is not WarmState.DOWN and not tracked.warmth.released)

    def _skip_or_probe(self, key: Key, tracked: Tracked, now_m: float, now: float) -> Action:
        pool = self._config.pools[key[0]]
        interval = pool.warmup.interval_s
        warmth = tracked.warmth
        reason = None
        failing = self._failing(key, tracked)
        if warmth.released:
            reason = SkipReason.RELEASED
        elif failing:
            pass  # whatever else says: its connections fail
        elif key in self._verdicts:
            reason = SkipReason.TRAFFIC  # judged by its real traffic: no probe needed
        elif self.tracker.busy(*key):
            reason = SkipReason.BUSY  # never disturb a request in flight (single-slot servers)
        elif warmth.state in (None, WarmState.WARM) and self.tracker.served_within(
                *key, interval, now):
            reason = SkipReason.TRAFFIC  # real traffic keeps it warm; cold/down need a probe
            tracked.warmth = machine.served_traffic(warmth)
        if reason is not None:
            tracked.next_due = now_m + interval
            return Skipped(key, reason)
        tracked.probing, tracked.probed_at = True, now
        return Probe(key, probe_url(tracked.endpoint, pool.warmup.path),
                     warmup_body(pool, self.policy.system_prompt), pool.warmup.timeout_s,
                     "connection failures in real traffic" if failing else "")

    def _writes(self, now: float) -> list[Action]:
        actions: list[Action] = []
        for key, tracked in self._tracked.items():
            pool = self._config.pools[key[0]]
            recorded = self._config.statuses.get(key[0], {}).get(key[1])
            if tracked.written is not None and (
                    recorded is None or tracked.written.checked_at > recorded.checked_at):
                recorded = tracked.written  # ours, not yet seen back from the watch
            if not machine.needs_write(tracked.warmth, recorded, now, pool.warmup.interval_s,
                                       len(self._tracked), tracked.source):
                continue
            assert tracked.warmth.state is not None
            actions.append(WriteStatus(key, Status(
                pool=key[0], id=key[1], state=tracked.warmth.state,
                ttft_ms=tracked.warmth.ttft_ms, checked_at=round(now, 3),
                source=tracked.source, traffic=tracked.traffic)))
        return actions
