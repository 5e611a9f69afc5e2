"""The prober's pure state machine: probe outcomes in, warm / cold / down out.

No IO and no clock: callers pass what happened and ``now``. States have a severity,
warm < cold < down, and each probe outcome points at one of them (fast -> warm, slow ->
cold, failed -> down):

- the first outcome for an endpoint with no state sets it at once (nothing to protect yet);
- an outcome pointing at the current state clears any streak;
- ``fall`` consecutive outcomes worse than the current state move it to the mildest state
  of that streak (slow, failed -> cold: the host did answer once);
- ``rise`` consecutive outcomes better than the current state move it to the most severe
  state of that streak (failed -> fast, slow -> cold);
- a change of direction starts a new streak;
- ``release`` lets an idle host go cold on purpose (no more probes); any later outcome
  or ``unrelease`` ends that.

The prober writes ``status/<pool>/<id>`` only when ``needs_write`` says so: the state
differs from the record, or the record is half-way to going stale. Given the number of
endpoints tracked (``endpoints``), going stale takes longer in a large fleet
(translate/warmth.py ``stale_after_s``), so the steady refreshes stay within
``STATUS_WRITE_BUDGET_PER_S`` (50/s) however many endpoints there are.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import StrEnum

from control_plane.config.model import Source, Status, WarmState
from control_plane.translate.warmth import stale_after_s

SEVERITY = {WarmState.WARM: 0, WarmState.COLD: 1, WarmState.DOWN: 2}
# After an outcome that may start a transition, the next probe comes this soon (capped by a
# quarter interval), so a host is reclassified in about one interval despite ``fall`` 2.
CONFIRM_DELAY_S = 1.0


class Outcome(StrEnum):
    """What one probe showed."""

    FAST = "fast"  # answered, time to first token within cold_ttft_ms
    SLOW = "slow"  # answered, time to first token above cold_ttft_ms
    FAILED = "failed"  # no answer: connection error, timeout or a 5xx status

    @property
    def target(self) -> WarmState:
        return _TARGET[self]


_TARGET = {Outcome.FAST: WarmState.WARM, Outcome.SLOW: WarmState.COLD,
           Outcome.FAILED: WarmState.DOWN}


def classify(ttft_ms: float | None, cold_ttft_ms: float) -> Outcome:
    """None (no answer) is FAILED; above the threshold is SLOW."""
    if ttft_ms is None:
        return Outcome.FAILED
    return Outcome.SLOW if ttft_ms > cold_ttft_ms else Outcome.FAST


@dataclass(frozen=True)
class Thresholds:
    rise: int = 2  # consecutive better outcomes to move to a better state
    fall: int = 2  # consecutive worse outcomes to move to a worse state

    def __post_init__(self) -> None:
        if self.rise < 1 or self.fall < 1:
            raise ValueError(f"rise and fall must be >= 1, got {self.rise} and {self.fall}")


@dataclass(frozen=True)
class Warmth:
    """One endpoint's state as the prober sees it."""

    state: WarmState | None = None  # None: never observed
    streak: int = 0  # consecutive outcomes pointing away from ``state``
    toward: WarmState | None = None  # where the streak leads (None when streak is 0)
    ttft_ms: float | None = None  # the last measured time to first token
    released: bool = False  # let go cold on purpose: not probed

    @property
    def pending(self) -> bool:
        """Whether a transition is under way (the next probe confirms or clears it)."""
        return self.streak > 0


def observe(warmth: Warmth, outcome: Outcome, ttft_ms: float | None,
            thresholds: Thresholds) -> Warmth:
    """The state after one probe outcome."""
    target = outcome.target
    current = warmth.state
    if current is None or target is current:
        return Warmth(state=target, ttft_ms=ttft_ms)
    worse = SEVERITY[target] > SEVERITY[current]
    toward = warmth.toward
    if warmth.streak and toward is not None and (SEVERITY[toward] > SEVERITY[current]) == worse:
        streak = warmth.streak + 1
        pick = min if worse else max
        toward = pick(toward, target, key=SEVERITY.__getitem__)
    else:
        streak, toward = 1, target
    if streak >= (thresholds.fall if worse else thresholds.rise):
        return Warmth(state=toward, ttft_ms=ttft_ms)
    return Warmth(state=current, streak=streak, toward=toward, ttft_ms=ttft_ms)


def release(warmth: Warmth) -> Warmth:
    """Let an idle host go cold on purpose: cold, no streak, no more probes."""
    return Warmth(state=WarmState.COLD, ttft_ms=warmth.ttft_ms, released=True)


def unrelease(warmth: Warmth) -> Warmth:
    """Probe a released host again; it stays cold until ``rise`` fast probes."""
    return replace(warmth, released=False)


def served_traffic(warmth: Warmth) -> Warmth:
    """Real traffic was served: an endpoint never observed counts as warm."""
    if warmth.state is None:
        return Warmth(state=WarmState.WARM, ttft_ms=warmth.ttft_ms)
    return warmth


def confirm_delay_s(interval_s: float) -> float:
    return min(CONFIRM_DELAY_S, interval_s / 4)


def next_probe_delay_s(warmth: Warmth, interval_s: float) -> float:
    """Seconds until the next probe of an endpoint: sooner while a transition is pending."""
    return confirm_delay_s(interval_s) if warmth.pending else interval_s


def refresh_after_s(interval_s: float, endpoints: int = 0) -> float:
    """Age at which an unchanged record is written again: half-way to going stale. N
    ``endpoints`` then cost min(N / (max(30 s, 3 intervals) / 2), STATUS_WRITE_BUDGET_PER_S)
    refresh writes per second; 0 (the default): the fixed rule, N / 15 s at 10 s intervals."""
    return stale_after_s(interval_s, endpoints) / 2


def needs_write(warmth: Warmth, recorded: Status | None, now: float, interval_s: float,
                endpoints: int = 0, source: Source | None = None) -> bool:
    """Whether ``status/<pool>/<id>`` must be written: a new state, a new deciding signal
    (``source``: the record says which one decided), or an ageing record. ``endpoints``:
    how many endpoints the prober tracks (stale_after_s)."""
    if warmth.state is None:
        return False
    if recorded is None or recorded.state is not warmth.state:
        return True
    if source is not None and recorded.source is not source:
        return True
    return now - recorded.checked_at >= refresh_after_s(interval_s, endpoints)


@dataclass(frozen=True)
class Activity:
    """What the release choice needs to know about one endpoint."""

    state: WarmState | None
    idle_since: float  # last real traffic, or when the prober first saw the endpoint


def choose_released(endpoints: Mapping[str, Activity], min_warm: int | None,
                    idle_horizon_s: float | None, now: float) -> set[str]:
    """Endpoints to let go cold: idle past the horizon, longest idle first, while at least
    ``min_warm`` endpoints that are not down stay probed. None (the default) keeps all."""
    if min_warm is None or idle_horizon_s is None:
        return set()
    up = {eid: a for eid, a in endpoints.items() if a.state is not WarmState.DOWN}
    allowed = max(0, len(up) - min_warm)
    idle = sorted((a.idle_since, eid) for eid, a in up.items()
                  if now - a.idle_since >= idle_horizon_s)
    return {eid for _, eid in idle[:allowed]}
