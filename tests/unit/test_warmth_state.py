"""The prober's pure state machine: every transition, thresholds, release and the write rule."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from control_plane.config.model import Status, WarmState
from control_plane.prober.state import (
    Activity,
    Outcome,
    Thresholds,
    Warmth,
    choose_released,
    classify,
    confirm_delay_s,
    needs_write,
    next_probe_delay_s,
    observe,
    refresh_after_s,
    release,
    served_traffic,
    unrelease,
)

WARM, COLD, DOWN = WarmState.WARM, WarmState.COLD, WarmState.DOWN
FAST, SLOW, FAILED = Outcome.FAST, Outcome.SLOW, Outcome.FAILED
TTFT = {FAST: 20.0, SLOW: 2500.0, FAILED: None}


TWO = Thresholds(rise=2, fall=2)


def run(state: WarmState | None, outcomes: list[Outcome], thresholds: Thresholds = TWO
        ) -> Warmth:
    warmth = Warmth(state=state)
    for outcome in outcomes:
        warmth = observe(warmth, outcome, TTFT[outcome], thresholds)
    return warmth


# --- classification -----------------------------------------------------------------------


@pytest.mark.parametrize(("ttft", "outcome"), [
    (None, FAILED), (0.0, FAST), (999.9, FAST), (1000.0, FAST), (1000.1, SLOW), (9e9, SLOW),
])
def test_classify_against_the_cold_threshold(ttft: float | None, outcome: Outcome) -> None:
    assert classify(ttft, 1000.0) is outcome


def test_outcomes_point_at_states() -> None:
    assert (FAST.target, SLOW.target, FAILED.target) == (WARM, COLD, DOWN)


# --- every transition ---------------------------------------------------------------------


@pytest.mark.parametrize("outcome", list(Outcome))
def test_first_outcome_sets_the_state_at_once(outcome: Outcome) -> None:
    warmth = run(None, [outcome])
    assert warmth.state is outcome.target
    assert not warmth.pending
    assert warmth.ttft_ms == TTFT[outcome]


@pytest.mark.parametrize(("state", "outcome"), [(WARM, FAST), (COLD, SLOW), (DOWN, FAILED)])
def test_outcome_matching_the_state_keeps_it_and_clears_a_streak(
        state: WarmState, outcome: Outcome) -> None:
    other = FAILED if outcome is FAST else FAST
    pending = run(state, [other])
    assert pending.pending and pending.state is state
    cleared = observe(pending, outcome, TTFT[outcome], Thresholds())
    assert cleared == Warmth(state=state, ttft_ms=TTFT[outcome])


@pytest.mark.parametrize(("state", "outcomes", "after_one", "after_all"), [
    # worse: fall (2) consecutive outcomes
    (WARM, [SLOW, SLOW], WARM, COLD),
    (WARM, [FAILED, FAILED], WARM, DOWN),
    (COLD, [FAILED, FAILED], COLD, DOWN),
    # better: rise (2) consecutive outcomes
    (COLD, [FAST, FAST], COLD, WARM),
    (DOWN, [FAST, FAST], DOWN, WARM),
    (DOWN, [SLOW, SLOW], DOWN, COLD),
    # a mixed worse streak goes to its mildest state: the host did answer
    (WARM, [SLOW, FAILED], WARM, COLD),
    (WARM, [FAILED, SLOW], WARM, COLD),
    # a mixed better streak goes to its most severe state
    (DOWN, [FAST, SLOW], DOWN, COLD),
    (DOWN, [SLOW, FAST], DOWN, COLD),
])
def test_transitions(state: WarmState, outcomes: list[Outcome], after_one: WarmState,
                     after_all: WarmState) -> None:
    one = run(state, outcomes[:1])
    assert one.state is after_one
    assert one.pending and one.toward is outcomes[0].target
    done = run(state, outcomes)
    assert done.state is after_all
    assert not done.pending and done.toward is None
    assert done.ttft_ms == TTFT[outcomes[-1]]


@pytest.mark.parametrize(("state", "outcomes", "toward"), [
    (COLD, [FAST, FAILED], DOWN),  # better then worse: a new streak
    (COLD, [FAILED, FAST], WARM),  # worse then better: a new streak
    (WARM, [SLOW, FAST], None),  # back to the current state: cleared
    (DOWN, [FAST, FAILED], None),
])
def test_direction_change_starts_a_new_streak(state: WarmState, outcomes: list[Outcome],
                                              toward: WarmState | None) -> None:
    warmth = run(state, outcomes)
    assert warmth.state is state
    assert warmth.toward is toward
    assert warmth.streak == (1 if toward else 0)


def test_interrupted_streak_needs_the_full_count_again() -> None:
    assert run(WARM, [SLOW, FAST, SLOW]).state is WARM
    assert run(WARM, [SLOW, FAST, SLOW, SLOW]).state is COLD


@pytest.mark.parametrize(("rise", "fall"), [(1, 1), (1, 3), (3, 1), (4, 2)])
def test_thresholds_count_consecutive_outcomes(rise: int, fall: int) -> None:
    t = Thresholds(rise=rise, fall=fall)
    assert run(WARM, [SLOW] * (fall - 1), t).state is WARM
    assert run(WARM, [SLOW] * fall, t).state is COLD
    assert run(WARM, [FAILED] * fall, t).state is DOWN
    assert run(DOWN, [FAST] * (rise - 1), t).state is DOWN
    assert run(DOWN, [FAST] * rise, t).state is WARM
    assert run(COLD, [FAST] * rise, t).state is WARM


@pytest.mark.parametrize(("rise", "fall"), [(0, 1), (1, 0), (-1, 2)])
def test_thresholds_must_be_positive(rise: int, fall: int) -> None:
    with pytest.raises(ValueError, match="rise and fall must be >= 1"):
        Thresholds(rise=rise, fall=fall)


@given(st.sampled_from([None, WARM, COLD, DOWN]),
       st.lists(st.sampled_from(list(Outcome)), max_size=30),
       st.integers(1, 4), st.integers(1, 4))
def test_a_state_changes_only_after_enough_agreeing_outcomes(
        start: WarmState | None, outcomes: list[Outcome], rise: int, fall: int) -> None:
    thresholds = Thresholds(rise=rise, fall=fall)
    warmth = Warmth(state=start)
    severity = {WARM: 0, COLD: 1, DOWN: 2}
    streak: list[Outcome] = []
    for outcome in outcomes:
        before = warmth.state
        warmth = observe(warmth, outcome, TTFT[outcome], thresholds)
        if before is None:
            assert warmth.state is outcome.target
            streak = []
            continue
        worse = severity[outcome.target] > severity[before]
        if outcome.target is before:
            streak = []
        elif streak and (severity[streak[-1].target] > severity[before]) == worse:
            streak.append(outcome)
        else:
            streak = [outcome]
        if warmth.state is not before:
            # Moved: only after rise/fall agreeing outcomes, to a state the streak named.
            assert len(streak) == (fall if worse else rise)
            assert warmth.state in {o.target for o in streak}
            assert not warmth.pending
            streak = []
        else:
            assert warmth.streak == len(streak)


# --- release, traffic, timing ---------------------------------------------------------------


@pytest.mark.parametrize("state", [None, WARM, COLD])
def test_release_sets_cold_on_purpose_and_unrelease_keeps_it_cold(
        state: WarmState | None) -> None:
    released = release(Warmth(state=state, streak=1, toward=DOWN, ttft_ms=30.0))
    assert released == Warmth(state=COLD, ttft_ms=30.0, released=True)
    back = unrelease(released)
    assert back.state is COLD and not back.released
    assert run(COLD, [FAST, FAST]).state is WARM  # and probes bring it back as usual


def test_a_probe_outcome_ends_a_release() -> None:
    warmth = observe(release(Warmth(state=WARM)), FAST, 10.0, Thresholds())
    assert not warmth.released


def test_served_traffic_only_decides_an_unknown_endpoint() -> None:
    assert served_traffic(Warmth()).state is WARM
    for state in (WARM, COLD, DOWN):
        assert served_traffic(Warmth(state=state)).state is state


def test_next_probe_sooner_while_a_transition_is_pending() -> None:
    assert next_probe_delay_s(Warmth(state=WARM), 10.0) == 10.0
    assert next_probe_delay_s(run(WARM, [SLOW]), 10.0) == 1.0
    assert next_probe_delay_s(run(WARM, [SLOW]), 0.4) == pytest.approx(0.1)
    assert confirm_delay_s(100.0) == 1.0


# --- the write rule -------------------------------------------------------------------------

NOW = 1_700_000_000.0


def status(state: WarmState, age: float) -> Status:
    return Status("p", "e", state, 10.0, NOW - age)


def test_write_on_a_new_state_only() -> None:
    assert not needs_write(Warmth(), None, NOW, 10.0)  # nothing known yet
    assert needs_write(Warmth(state=WARM), None, NOW, 10.0)
    assert needs_write(Warmth(state=COLD), status(WARM, 0), NOW, 10.0)
    assert not needs_write(Warmth(state=WARM), status(WARM, 0), NOW, 10.0)
    # A pending transition is not a new state: no write per probe.
    assert not needs_write(run(WARM, [SLOW]), status(WARM, 1), NOW, 10.0)


@pytest.mark.parametrize(("interval", "refresh"), [(0.5, 15.0), (10.0, 15.0), (20.0, 30.0)])
def test_unchanged_record_refreshed_half_way_to_stale(interval: float, refresh: float) -> None:
    assert refresh_after_s(interval) == refresh
    warm = Warmth(state=WARM)
    assert not needs_write(warm, status(WARM, refresh - 0.01), NOW, interval)
    assert needs_write(warm, status(WARM, refresh), NOW, interval)


# --- letting idle hosts go cold ---------------------------------------------------------------


def activity(**idle: tuple[WarmState | None, float]) -> dict[str, Activity]:
    return {name: Activity(state, NOW - age) for name, (state, age) in idle.items()}


def test_default_keeps_every_host_warm() -> None:
    hosts = activity(a=(WARM, 1e6), b=(WARM, 1e6))
    assert choose_released(hosts, None, 60.0, NOW) == set()


def test_release_longest_idle_first_down_to_min_warm() -> None:
    hosts = activity(a=(WARM, 500), b=(WARM, 900), c=(WARM, 30), d=(COLD, 700))
    assert choose_released(hosts, 1, 60.0, NOW) == {"b", "d", "a"}
    assert choose_released(hosts, 2, 60.0, NOW) == {"b", "d"}
    assert choose_released(hosts, 3, 60.0, NOW) == {"b"}
    assert choose_released(hosts, 4, 60.0, NOW) == set()
    assert choose_released(hosts, 0, 60.0, NOW) == {"a", "b", "d"}  # c is not idle long enough
    assert choose_released(hosts, 1, 800.0, NOW) == {"b"}


def test_down_hosts_neither_released_nor_counted_as_kept() -> None:
    hosts = activity(a=(WARM, 900), b=(WARM, 900), c=(DOWN, 900))
    assert choose_released(hosts, 1, 60.0, NOW) == {"a"}  # b stays: a, b are the only up ones
    # A kept host going down brings a released one back.
    hosts = activity(a=(COLD, 900), b=(DOWN, 900), c=(None, 900))
    assert choose_released(hosts, 1, 60.0, NOW) == {"a"}
    assert choose_released(hosts, 2, 60.0, NOW) == set()
