"""The prober's sans-IO scheduler, driven without IO: config, time, traffic and probe
results in; actions out. A fake clock; Envoy's counters fed straight into the tracker."""

from __future__ import annotations

import ast
import random
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import pytest

from control_plane.config.model import Config, Endpoint, Pool, Source, Status, WarmState, Warmup
from control_plane.prober import scheduler as scheduler_module
from control_plane.prober.probe import warmup_body
from control_plane.prober.scheduler import (
    FRESH_POLL_S,
    ORPHAN_RETRY_S,
    Action,
    CancelProbe,
    DeleteStatus,
    Forgotten,
    KeptWarm,
    Policy,
    Probe,
    Probed,
    Released,
    Scheduler,
    Skipped,
    SkipReason,
    WriteStatus,
)
from control_plane.prober.state import Outcome, Thresholds, refresh_after_s
from control_plane.prober.traffic import TrafficTracker
from control_plane.runtime.envoy_admin import EnvoyHost
from control_plane.translate.warmth import stale_after_s

P = "chat"
WALL = 1_700_000_000.0  # unix time = WALL + the monotonic clock below
INTERVAL = 1.0
COLD_MS = 100.0
FAST, SLOW = 20.0, 300.0
A, B, C = (P, "a"), (P, "b"), (P, "c")
T = TypeVar("T")


def make_pool(interval: float = INTERVAL) -> Pool:
    return Pool(name=P, models=("m",),
                warmup=Warmup(interval_s=interval, timeout_s=5.0, cold_ttft_ms=COLD_MS))


def endpoint(eid: str, port: int = 8000) -> Endpoint:
    return Endpoint(P, eid, "10.0.0.1", port)


Out = Action | Probed


class Driver:
    """One scheduler, a clock, a config as etcd has it, Envoy's counters, and model servers
    that answer each probe at once in ``ttft[id]`` ms (None: failed) unless ``hanging``."""

    def __init__(self, *ids: str, policy: Policy | None = None, seed: int = 0,
                 interval: float = INTERVAL) -> None:
        self.tracker = TrafficTracker()
        self.scheduler = Scheduler(policy or Policy(system_prompt="Be brief."), self.tracker,
                                   random.Random(seed))
        assert self.scheduler.lead(True) == []
        self.t = 100.0
        self.pool = make_pool(interval)
        self.endpoints = {eid: endpoint(eid) for eid in ids}
        self.statuses: dict[str, Status] = {}
        self.counters: dict[str, tuple[int, int]] = {}  # id -> (rq_success, rq_active)
        self.connect_failures: dict[str, int] = {}  # id -> cx_connect_fail
        self.ttft: dict[str, float | None] = dict.fromkeys(ids, FAST)
        self.hanging: set[str] = set()

    @property
    def now(self) -> float:
        return WALL + self.t

    @property
    def config(self) -> Config:
        return Config(pools={P: self.pool}, endpoints={P: dict(self.endpoints)},
                      statuses={P: dict(self.statuses)} if self.statuses else {})

    def step(self, advance: float = 0.0, *, confirm: bool = True) -> list[Out]:
        """One pass (reconcile, traffic read, decide) ``advance`` seconds later, then the
        answers to its probes. Writes are confirmed and seen back from the watch unless
        ``confirm`` is False."""
        self.t += advance
        actions: list[Out] = list(self.scheduler.reconcile(self.config, self.t, self.now))
        if self.scheduler.traffic_due(self.t):
            self.read_traffic()
        actions += self.scheduler.decide(self.t, self.now)
        for action in list(actions):
            if isinstance(action, WriteStatus) and confirm:
                self.scheduler.written(action.key, action.status)
                self.statuses[action.key[1]] = action.status
            elif isinstance(action, DeleteStatus) and confirm:
                self.statuses.pop(action.key[1], None)
            elif isinstance(action, Probe) and action.key[1] not in self.hanging:
                event = self.answer(action.key[1], self.ttft[action.key[1]])
                if event is not None:
                    actions.append(event)
        return actions

    def read_traffic(self) -> None:
        hosts = [EnvoyHost(P, eid, "10.0.0.1", 8000, "healthy", 1, active, 0, success,
                           self.connect_failures.get(eid, 0))
                 for eid, (success, active) in self.counters.items()]
        self.tracker.observe("envoy", self.now, hosts)
        self.scheduler.traffic_read(self.t)

    def serve(self, eid: str, requests: int = 1, active: int = 0) -> None:
        """Real traffic through Envoy: counters grow (read on the next traffic read)."""
        success, _ = self.counters.get(eid, (0, 0))
        self.counters[eid] = (success + requests, active)

    def refuse(self, eid: str, connections: int = 1) -> None:
        """Envoy's connections to ``eid`` fail (its requests are retried elsewhere)."""
        self.connect_failures[eid] = self.connect_failures.get(eid, 0) + connections
        self.counters.setdefault(eid, (0, 0))

    def answer(self, eid: str, ttft_ms: float | None) -> Probed | None:
        return self.scheduler.probe_done((P, eid), ttft_ms, self.t)

    def state(self, eid: str) -> WarmState | None:
        return self.scheduler.tracked[(P, eid)].warmth.state

    def record(self, eid: str, state: WarmState, age_s: float = 0.0) -> None:
        self.statuses[eid] = Status(P, eid, state, FAST, self.now - age_s)

    def run(self, seconds: float, every: float = 0.05) -> list[Out]:
        out: list[Out] = []
        end = self.t + seconds - 1e-9
        while self.t < end:
            out += self.step(every)
        return out

    def probe_until(self, eid: str, ttft_ms: float | None = FAST, passes: int = 100
                    ) -> list[Out]:
        """Passes until ``eid`` is probed (answered in ``ttft_ms``), and the next pass."""
        self.ttft[eid] = ttft_ms
        seen: list[Out] = []
        for _ in range(passes):
            actions = self.step(0.05)
            seen += actions
            if Probe in kinds(actions, (P, eid)):
                return seen + self.step()
        raise AssertionError(f"{eid} was not probed in {passes} passes: {seen}")


def kinds(actions: Sequence[Out], key: tuple[str, str] | None = None) -> list[type]:
    return [type(a) for a in actions if key is None or a.key == key]


def of(actions: Sequence[Out], kind: type[T], key: tuple[str, str] | None = None) -> list[T]:
    return [a for a in actions if isinstance(a, kind) and (key is None or a.key == key)]


def warm_up(driver: Driver, *ids: str) -> None:
    """Every endpoint probed fast once: warm, recorded."""
    for eid in ids:
        driver.probe_until(eid, FAST)
        assert driver.state(eid) is WarmState.WARM
    driver.step()


# --- the module itself --------------------------------------------------------------------


def test_the_scheduler_module_does_no_io() -> None:
    tree = ast.parse(Path(scheduler_module.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom)}
    assert not imported & {"asyncio", "aiohttp", "etcd3aio", "grpc", "socket", "time"}


# --- a new endpoint --------------------------------------------------------------------


def test_an_endpoint_that_appears_is_probed_after_its_jitter() -> None:
    d = Driver("a")
    d.hanging.add("a")
    jitter = random.Random(0).uniform(0, min(1.0, INTERVAL / 2))
    assert d.step() == []  # tracked, not due yet
    assert d.scheduler.tracked[A].next_due == pytest.approx(d.t + jitter)
    assert d.step(jitter * 0.9) == []
    assert d.step(jitter * 0.1) == [Probe(A, "http://10.0.0.1:8000/v1/chat/completions",
                                         warmup_body(d.pool, "Be brief."), 5.0)]
    assert d.run(5.0) == []  # in flight: not probed twice, nothing to write


def test_jitter_comes_from_the_random_source_and_is_bounded() -> None:
    def dues(seed: int, interval: float) -> list[float]:
        d = Driver("a", "b", "c", seed=seed, interval=interval)
        d.step()
        return [d.scheduler.tracked[k].next_due - d.t for k in (A, B, C)]

    assert dues(3, 10.0) == dues(3, 10.0)
    assert dues(3, 10.0) != dues(4, 10.0)
    assert all(0 <= j <= 1.0 for j in dues(5, 10.0))  # min(1 s, interval / 2)
    assert all(0 <= j <= 0.1 for j in dues(5, 0.2))


def test_a_fast_first_probe_makes_it_warm_and_writes_once() -> None:
    d = Driver("a")
    actions = d.probe_until("a", FAST)
    [probed] = of(actions, Probed)
    assert probed.outcome is Outcome.FAST and probed.before is None and probed.changed
    assert of(actions, WriteStatus) == [
        WriteStatus(A, Status(P, "a", WarmState.WARM, FAST, round(d.now, 3),
                              source=Source.PROBE))]
    assert d.scheduler.tracked[A].next_due == pytest.approx(d.t + INTERVAL)
    # Fast again and again: nothing changed, nothing written.
    actions = d.run(5 * INTERVAL)
    assert 4 <= len(of(actions, Probe)) <= 5
    assert of(actions, WriteStatus) == []


def test_an_endpoint_without_its_pool_is_not_tracked() -> None:
    d = Driver()
    config = Config(pools={}, endpoints={"nopool": {"x": Endpoint("nopool", "x", "h", 1)}})
    assert d.scheduler.reconcile(config, d.t, d.now) == []
    assert d.scheduler.decide(d.t + 5, d.now + 5) == []
    assert dict(d.scheduler.tracked) == {}


# --- probe results -----------------------------------------------------------------------


def test_slow_probes_turn_a_warm_endpoint_cold_after_fall_with_a_quick_confirmation() -> None:
    d = Driver("a")
    warm_up(d, "a")
    actions = d.probe_until("a", SLOW)
    assert of(actions, WriteStatus) == []  # one slow probe: pending, nothing written
    tracked = d.scheduler.tracked[A]
    assert tracked.warmth.state is WarmState.WARM and tracked.warmth.pending
    assert tracked.next_due == pytest.approx(d.t + min(1.0, INTERVAL / 4))
    actions = d.probe_until("a", SLOW)
    assert d.state("a") is WarmState.COLD
    [write] = of(actions, WriteStatus)
    assert write.status.state is WarmState.COLD and write.status.ttft_ms == SLOW


def test_failed_probes_turn_it_down_and_fast_ones_bring_it_back() -> None:
    d = Driver("a")
    warm_up(d, "a")
    d.probe_until("a", None)
    d.probe_until("a", None)
    assert d.state("a") is WarmState.DOWN
    assert d.statuses["a"].state is WarmState.DOWN and d.statuses["a"].ttft_ms is None
    d.probe_until("a", FAST)
    assert d.state("a") is WarmState.DOWN
    actions = d.probe_until("a", FAST)
    assert d.state("a") is WarmState.WARM
    assert [w.status.state for w in of(actions, WriteStatus)] == [WarmState.WARM]


def test_a_result_is_taken_only_for_a_probe_in_flight() -> None:
    d = Driver("a")
    d.hanging.add("a")
    d.run(1.0)
    event = d.answer("a", SLOW)
    assert event is not None and event.outcome is Outcome.SLOW
    assert event.before is None and event.warmth.state is WarmState.COLD
    assert d.answer("a", FAST) is None  # nothing in flight now: not taken
    assert d.state("a") is WarmState.COLD


def test_thresholds_come_from_the_policy() -> None:
    d = Driver("a", policy=Policy(system_prompt="x", thresholds=Thresholds(rise=1, fall=1)))
    warm_up(d, "a")
    d.probe_until("a", SLOW)
    assert d.state("a") is WarmState.COLD


def test_an_unchanged_record_is_rewritten_when_ageing() -> None:
    d = Driver("a")
    warm_up(d, "a")
    first = d.statuses["a"]
    writes = of(d.run(refresh_after_s(INTERVAL) + 2 * INTERVAL), WriteStatus)
    assert len(writes) == 1  # fast every interval, but written again only half-way to stale
    assert writes[0].status.checked_at - first.checked_at >= refresh_after_s(INTERVAL)
    assert writes[0].status.checked_at - first.checked_at < refresh_after_s(INTERVAL) + 1.1


def test_a_failed_write_is_asked_again_a_confirmed_one_is_not() -> None:
    d = Driver("a")
    d.probe_until("a", FAST)  # its write confirmed
    d.endpoints["b"] = endpoint("b")
    d.ttft["b"] = FAST
    first: list[WriteStatus] = []
    for _ in range(40):
        first = of(d.step(0.05, confirm=False), WriteStatus, B)
        if first:
            break
    assert len(first) == 1
    again = of(d.step(0.1, confirm=False), WriteStatus, B)  # not confirmed: the write failed
    assert len(again) == 1 and again[0].status.state is WarmState.WARM
    d.scheduler.written(B, again[0].status)  # it went through, not yet seen back in etcd
    assert of(d.step(0.1, confirm=False), WriteStatus) == []


def test_a_fresh_record_is_carried_on_without_a_rewrite() -> None:
    d = Driver("a")
    d.record("a", WarmState.COLD, age_s=1.0)
    d.step()
    assert d.state("a") is WarmState.COLD  # a restart or a new leader: no flapping
    actions = d.probe_until("a", SLOW)
    assert of(actions, WriteStatus) == []


def test_a_stale_record_is_not_carried_on() -> None:
    d = Driver("a")
    d.record("a", WarmState.COLD, age_s=stale_after_s(INTERVAL) + 1)
    d.step()
    assert d.state("a") is None
    [write] = of(d.probe_until("a", FAST), WriteStatus)
    assert write.status.state is WarmState.WARM


# --- real traffic ---------------------------------------------------------------------


def test_real_traffic_within_the_interval_skips_the_probe() -> None:
    d = Driver("a", "b")
    warm_up(d, "a", "b")
    d.serve("a", 0)
    d.read_traffic()  # Envoy's first read is a baseline
    d.serve("a", 1)
    d.read_traffic()
    actions: list[Out] = []
    for _ in range(80):  # four intervals of real traffic to a only
        d.serve("a", 1)
        actions += d.step(0.05)
    assert Probe not in kinds(actions, A)
    skips = of(actions, Skipped, A)
    assert set(skips) == {Skipped(A, SkipReason.TRAFFIC)}
    assert 3 <= len(skips) <= 4 and 3 <= len(of(actions, Probe, B)) <= 4  # once an interval
    assert d.state("a") is WarmState.WARM
    assert of(actions, WriteStatus) == []
    # Quiet for an interval: probed again.
    assert len(of(d.run(2 * INTERVAL), Probe, A)) >= 1


def test_traffic_to_an_endpoint_never_probed_counts_as_warm() -> None:
    d = Driver("a")
    d.serve("a", 0)
    d.step()  # Envoy's first read: a baseline
    d.serve("a", 2)
    actions = d.step(1.0)
    assert actions[0] == Skipped(A, SkipReason.TRAFFIC)
    assert d.state("a") is WarmState.WARM
    assert [w.status.state for w in of(actions, WriteStatus)] == [WarmState.WARM]


def test_traffic_does_not_skip_a_cold_endpoint() -> None:
    d = Driver("a", policy=Policy(system_prompt="x", thresholds=Thresholds(fall=1)))
    warm_up(d, "a")
    d.probe_until("a", SLOW)
    assert d.state("a") is WarmState.COLD
    d.serve("a", 5)
    actions = d.probe_until("a", FAST)
    assert Skipped not in kinds(actions, A)  # only a probe can find it warm again


def test_a_busy_endpoint_is_skipped_whatever_its_state() -> None:
    d = Driver("a", policy=Policy(system_prompt="x", thresholds=Thresholds(fall=1)))
    warm_up(d, "a")
    d.probe_until("a", None)
    assert d.state("a") is WarmState.DOWN
    d.serve("a", 0, active=1)
    actions = d.run(INTERVAL + 0.1)
    assert of(actions, Skipped, A) == [Skipped(A, SkipReason.BUSY)]
    assert Probe not in kinds(actions)
    assert d.scheduler.tracked[A].next_due > d.t
    d.serve("a", 1, active=0)  # done: a down host is probed again
    assert Probe in kinds(d.run(INTERVAL))


def test_connection_failures_in_traffic_probe_at_once_and_a_dead_host_goes_down() -> None:
    d = Driver("a", "b", interval=10.0)
    d.run(1.5)  # each probed once (jitter <= 1 s): warm
    assert d.state("a") is d.state("b") is WarmState.WARM
    d.serve("a", 0)
    d.read_traffic()  # Envoy's first read is a baseline
    d.serve("a", 5)
    d.step(0.5)
    # a dies while serving: a probe is not due for an interval, its traffic keeps it skipped.
    d.ttft["a"] = None
    actions: list[Out] = []
    for _ in range(80):  # 4 s of traffic whose connections to a fail (interval: 10 s)
        d.refuse("a", 2)
        actions += d.step(0.05)
    probes = of(actions, Probe, A)
    assert 2 <= len(probes) and all(p.cause for p in probes)
    assert d.state("a") is WarmState.DOWN
    assert of(actions, Probe, B) == []  # b is left alone


def test_connection_failures_seen_once_probe_once() -> None:
    d = Driver("a", interval=10.0)
    warm_up(d, "a")
    d.serve("a", 0)
    d.read_traffic()
    d.refuse("a")
    actions = d.run(3.0)  # a read every 2 s
    assert len(of(actions, Probe, A)) == 1  # the failure seen once: one probe out of turn
    assert d.state("a") is WarmState.WARM  # it answered: a failed connection was transient


def test_counters_are_read_fresh_before_a_probe_else_every_poll_period() -> None:
    d = Driver("a", interval=10.0)
    d.hanging.add("a")
    assert d.scheduler.traffic_due(d.t)  # never read
    d.step()
    d.probe_until("a")  # in flight: nothing due
    assert not d.scheduler.traffic_due(d.t + 1.0)  # every min(2 s, 10 / 4)
    assert d.scheduler.traffic_due(d.t + 2.0)
    d.answer("a", FAST)
    d.t += 20.0  # a is due: counters at most 0.1 s old
    d.read_traffic()
    assert not d.scheduler.traffic_due(d.t + FRESH_POLL_S / 2)
    assert d.scheduler.traffic_due(d.t + FRESH_POLL_S * 1.01)


def test_wait_is_until_the_next_due_endpoint_at_most_a_poll_period() -> None:
    d = Driver("a", interval=10.0)
    d.hanging.add("a")
    d.step()
    due = d.scheduler.tracked[A].next_due
    assert d.scheduler.wait_s(d.t) == pytest.approx(max(0.01, min(2.0, due - d.t)))
    d.step(due - d.t)  # probe in flight: only the poll period
    assert d.scheduler.wait_s(d.t) == 2.0
    d.answer("a", FAST)
    assert d.scheduler.wait_s(d.t) == 2.0  # next due in 10 s
    assert d.scheduler.wait_s(d.t + 100) == 0.01


# --- letting idle endpoints go cold ------------------------------------------------------


def released_policy() -> Policy:
    return Policy(system_prompt="x", min_warm=1, idle_horizon_s=5.0)


def test_idle_endpoints_beyond_min_warm_are_released_and_not_probed() -> None:
    d = Driver("a", "b", "c", policy=released_policy())
    warm_up(d, "a", "b", "c")
    actions: list[Out] = []
    for _ in range(200):  # 10 s; a serves real traffic, b and c are idle
        d.serve("a", 1)
        actions += d.step(0.05)
    released = of(actions, Released)
    # a is never idle; min warm 1 of 3 lets two go: both idle ones, each once, once idle
    # past the horizon.
    assert sorted(r.key for r in released) == [B, C]
    assert all(r.min_warm == 1 and r.idle_s >= 5.0 for r in released)
    assert d.state("b") is d.state("c") is WarmState.COLD
    assert d.scheduler.tracked[B].warmth.released
    assert d.statuses["b"].state is d.statuses["c"].state is WarmState.COLD
    later = d.run(3 * INTERVAL)
    assert Probe not in kinds(later, B) and Probe not in kinds(later, C)
    assert Skipped(B, SkipReason.RELEASED) in later and Skipped(C, SkipReason.RELEASED) in later


def test_a_kept_host_going_down_brings_a_released_one_back() -> None:
    d = Driver("a", "b", policy=released_policy())
    warm_up(d, "a", "b")
    d.run(8.0)  # both idle: one released, the other kept
    [released] = [k for k in (A, B) if d.scheduler.tracked[k].warmth.released]
    kept = B if released == A else A
    d.ttft[kept[1]] = None
    actions = d.run(3 * INTERVAL)
    assert d.state(kept[1]) is WarmState.DOWN
    assert of(actions, KeptWarm) == [KeptWarm(released)]
    assert Probe in kinds(actions, released)


def test_traffic_to_a_released_endpoint_keeps_it_warm_again_and_due_at_once() -> None:
    d = Driver("a", "b", policy=released_policy())
    warm_up(d, "a", "b")
    d.serve("b", 0)
    for _ in range(140):
        d.serve("a", 1)
        d.step(0.05)
    assert d.scheduler.tracked[B].warmth.released
    d.serve("b", 1)
    d.hanging.add("b")
    d.read_traffic()
    actions = d.step(0.05)
    assert of(actions, KeptWarm) == [KeptWarm(B)]
    assert not d.scheduler.tracked[B].warmth.released and d.state("b") is WarmState.COLD
    assert d.scheduler.tracked[B].next_due == d.t
    # Due at once: taken on the next pass (cold, so probed despite the traffic).
    assert Probe in kinds(d.step(0.01), B)


def test_releasing_cancels_the_probe_in_flight_and_drops_its_result() -> None:
    d = Driver("a", "b", policy=released_policy())
    warm_up(d, "a", "b")
    d.hanging.add("b")  # b's probes stay in flight
    actions: list[Out] = []
    for _ in range(140):
        d.serve("a", 1)
        actions = d.step(0.05)
        if Released in kinds(actions, B):
            break
    assert kinds(actions, B)[:2] == [CancelProbe, Released]
    assert d.answer("b", FAST) is None


def test_no_release_without_min_warm() -> None:
    d = Driver("a", "b", policy=Policy(system_prompt="x", idle_horizon_s=1.0))
    warm_up(d, "a", "b")
    actions = d.run(10.0)
    assert Released not in kinds(actions)
    assert len(of(actions, Probe)) >= 18


# --- endpoints that change or go; orphan statuses -----------------------------------------


def test_a_removed_endpoint_is_forgotten_its_probe_cancelled_and_its_status_deleted() -> None:
    d = Driver("a", "b")
    warm_up(d, "a", "b")
    d.hanging.add("a")
    d.probe_until("a")
    del d.endpoints["a"]
    actions = d.step(confirm=False)
    assert actions[:3] == [CancelProbe(A), Forgotten(A), DeleteStatus(A)]
    assert d.answer("a", FAST) is None  # a late answer is not taken
    # Still there (the delete failed, or is not yet seen): asked again once a period.
    start = d.t
    deletes = []
    while d.t - start < 3 * ORPHAN_RETRY_S - 0.01:
        deletes += [d.t - start for _ in of(d.step(0.1, confirm=False), DeleteStatus)]
    assert len(deletes) == 2
    assert deletes[0] == pytest.approx(ORPHAN_RETRY_S, abs=0.11)
    assert deletes[1] - deletes[0] == pytest.approx(ORPHAN_RETRY_S, abs=0.11)


def test_a_status_of_an_endpoint_never_seen_is_deleted_once() -> None:
    d = Driver("a")
    d.statuses["ghost"] = Status(P, "ghost", WarmState.COLD, None, d.now)
    assert of(d.step(), DeleteStatus) == [DeleteStatus((P, "ghost"))]
    assert of(d.run(2 * ORPHAN_RETRY_S), DeleteStatus) == []  # gone from the config


def test_a_changed_endpoint_starts_again() -> None:
    d = Driver("a")
    warm_up(d, "a")
    d.hanging.add("a")
    d.probe_until("a")
    d.endpoints["a"] = endpoint("a", port=9000)
    actions = d.step()
    assert of(actions, CancelProbe) == [CancelProbe(A)]
    assert d.state("a") is None  # a new server: no state carried over
    assert d.answer("a", SLOW) is None
    d.hanging.clear()
    actions = d.probe_until("a", FAST)
    assert of(actions, Probe)[0].url == "http://10.0.0.1:9000/v1/chat/completions"
    assert of(actions, WriteStatus) == []  # warm as recorded: no rewrite


def test_a_dropped_probe_is_due_again() -> None:
    d = Driver("a")
    d.hanging.add("a")
    d.probe_until("a")
    assert Probe not in kinds(d.run(3.0))
    d.scheduler.probe_dropped(A)
    assert Probe in kinds(d.step(0.01))


# --- leadership ---------------------------------------------------------------------------


def test_no_actions_and_no_results_when_not_the_leader() -> None:
    d = Driver("a")
    d.scheduler.lead(False)
    d.statuses["ghost"] = Status(P, "ghost", WarmState.COLD, None, d.now)
    assert d.run(10.0) == []
    assert not d.scheduler.traffic_due(d.t)
    assert dict(d.scheduler.tracked) == {}
    assert d.answer("a", FAST) is None


def test_losing_leadership_cancels_probes_forgets_and_the_next_term_starts_from_records() -> None:
    d = Driver("a", "b")
    warm_up(d, "a", "b")
    d.probe_until("a", SLOW)  # pending, not recorded
    d.hanging.update({"a", "b"})
    in_flight = of(d.run(INTERVAL), Probe)
    assert sorted(p.key for p in in_flight) == [A, B]
    term = d.scheduler.term
    assert sorted(d.scheduler.lead(False), key=repr) == [CancelProbe(A), CancelProbe(B)]
    assert d.scheduler.term == term + 1
    assert dict(d.scheduler.tracked) == {}
    assert d.answer("a", FAST) is None and d.answer("b", FAST) is None
    assert d.run(INTERVAL) == []
    assert d.scheduler.lead(True) == [] and d.scheduler.term == term + 2
    d.step()
    # The streak is gone with the term; the records say warm, and nothing is rewritten.
    assert d.state("a") is d.state("b") is WarmState.WARM
    assert not d.scheduler.tracked[A].warmth.pending
    d.hanging.clear()
    d.ttft["a"] = FAST
    assert of(d.run(3 * INTERVAL), WriteStatus) == []


def test_actions_are_frozen_values() -> None:
    d = Driver("a")
    d.hanging.add("a")
    [probe] = of(d.run(1.0), Probe)
    with pytest.raises(AttributeError):
        probe.url = "x"  # type: ignore[misc]
    assert replace(probe, timeout_s=1.0) != probe
