"""The bench's workload generator: seeded, bounded, and shaped like a chat app's traffic."""

from __future__ import annotations

from collections import Counter

import pytest

from control_plane.bench.workload import Scenario, balanced_assignment, generate, messages
from control_plane.sim.model import chat_tokens, tokenize


def test_same_seed_same_workload_other_seed_differs() -> None:
    assert generate(Scenario(seed=3)) == generate(Scenario(seed=3))
    assert generate(Scenario(seed=3)) != generate(Scenario(seed=4))


def test_sessions_turns_and_times_stay_within_the_scenario() -> None:
    scenario = Scenario(sessions=11, min_turns=2, max_turns=5, arrival_window_s=50,
                        min_think_s=1, max_think_s=3, seed=1)
    workload = generate(scenario)
    assert len(workload.sessions) == 11
    assert len({s.id for s in workload.sessions}) == 11
    starts = [s.start_s for s in workload.sessions]
    assert starts == sorted(starts) and starts[0] == 0 and starts[-1] <= 50
    for session in workload.sessions:
        assert 2 <= len(session.turns) <= 5
        assert session.turns[0].think_s == 0
        assert all(1 <= t.think_s <= 3 for t in session.turns[1:])
        assert all(scenario.min_answer_tokens <= t.max_tokens <= scenario.max_answer_tokens
                   for t in session.turns)
    assert workload.turn_count == sum(len(s.turns) for s in workload.sessions)


def test_token_counts_match_the_simulator_tokenizer() -> None:
    scenario = Scenario(sessions=5, system_tokens=300, min_first_tokens=40,
                        max_first_tokens=40, min_followup_tokens=7, max_followup_tokens=7)
    workload = generate(scenario)
    # The opening sentence, then 300 one-token words and a full stop every 12 words.
    opening = len(tokenize("You are a helpful assistant."))
    assert len(tokenize(workload.system_prompt)) - opening == 300 + 300 // 12
    first = workload.sessions[0].turns[0].user
    assert len(tokenize(first)) == 1 + 40 + 40 // 12  # "s0", 40 words, their full stops


def test_first_messages_differ_so_derived_session_keys_differ() -> None:
    workload = generate(Scenario(sessions=40))
    assert len({s.turns[0].user for s in workload.sessions}) == 40


def test_salt_changes_the_system_prompt_and_nothing_else() -> None:
    plain, salted = generate(Scenario(seed=2)), generate(Scenario(seed=2), salt="ring_hash")
    assert plain.sessions == salted.sessions
    assert plain.system_prompt != salted.system_prompt
    assert plain.system_prompt.split(".", 1)[1] == salted.system_prompt.split(".", 1)[1]


def test_messages_grow_the_history_so_each_turn_extends_the_last() -> None:
    workload = generate(Scenario(sessions=1, min_turns=3, max_turns=3))
    turns = list(workload.sessions[0].turns)
    first = messages(workload.system_prompt, turns[:1], [])
    second = messages(workload.system_prompt, turns[:2], ["an answer"])
    assert [m["role"] for m in second] == ["system", "user", "assistant", "user"]
    assert second[:2] == first
    # The next prompt starts with the previous prompt (the simulator's cache can match it).
    previous = chat_tokens([(m["role"], m["content"]) for m in first])[:-2]
    assert chat_tokens([(m["role"], m["content"]) for m in second])[: len(previous)] == previous
    with pytest.raises(ValueError):
        messages(workload.system_prompt, turns[:2], [])


def test_balanced_assignment_deals_sessions_evenly() -> None:
    workload = generate(Scenario(sessions=31))
    counts = Counter(balanced_assignment(workload, 3).values())
    assert sorted(counts.values()) == [10, 10, 11]


@pytest.mark.parametrize("field,value", [("sessions", 0), ("min_turns", 0),
                                         ("max_turns", 1), ("min_think_s", -1)])
def test_bad_scenarios_are_refused(field: str, value: float) -> None:
    with pytest.raises(ValueError):
        Scenario(**{field: value, "min_turns": 2} if field == "max_turns"  # type: ignore[arg-type]
                 else {field: value})
