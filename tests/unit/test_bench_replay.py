"""The replay's request bodies and stream parsing per API, and a replay against a real (fast)
simulator over chat completions, the Responses API and the Messages API."""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import pytest

from control_plane.bench.replay import (
    API_PATHS,
    APIS,
    ReplaySettings,
    _Parsed,
    parse_event,
    replay,
    request_body,
)
from control_plane.bench.run import add_bench_arguments, config_from_args
from control_plane.bench.workload import Scenario, Turn, generate
from control_plane.sim.model import SimParams
from control_plane.sim.server import SimHandle, serve, stop_sims

TURNS = [Turn("first question", 5, 0.0), Turn("second", 7, 1.0)]
SYSTEM = "You are a helpful assistant."


def test_request_bodies_carry_the_same_conversation_on_every_api() -> None:
    chat = request_body("chat", "m", SYSTEM, TURNS, ["answer one"], 7)
    assert chat["messages"][0] == {"role": "system", "content": SYSTEM}
    assert chat["max_tokens"] == 7 and chat["stream_options"] == {"include_usage": True}
    history = chat["messages"][1:]

    responses = request_body("responses", "m", SYSTEM, TURNS, ["answer one"], 7)
    assert responses["instructions"] == SYSTEM
    assert [(i["type"], i["role"], i["content"]) for i in responses["input"]] == [
        ("message", m["role"], m["content"]) for m in history]
    assert responses["max_output_tokens"] == 7 and responses["stream"] is True
    assert "messages" not in responses and "max_tokens" not in responses

    messages = request_body("messages", "m", SYSTEM, TURNS, ["answer one"], 7)
    assert messages["system"] == SYSTEM and messages["messages"] == history
    assert messages["max_tokens"] == 7 and messages["stream"] is True
    # The stable prefix the gateway hashes (system part + first user message) is the same on
    # every turn of a conversation.
    first = request_body("messages", "m", SYSTEM, TURNS[:1], [], 5)
    assert first["messages"][0] == messages["messages"][0]
    with pytest.raises(ValueError):
        request_body("nope", "m", SYSTEM, TURNS, ["a"], 7)


def test_settings_reject_an_unknown_api() -> None:
    with pytest.raises(ValueError, match="api must be one of"):
        ReplaySettings(model="m", api="completions")
    assert set(APIS) == set(API_PATHS) == {"chat", "responses", "messages"}


def test_parse_events_per_api() -> None:
    state = _Parsed([], {})
    assert parse_event("responses", {"type": "response.output_text.delta", "delta": "hi"},
                       state) == "hi"
    parse_event("responses", {"type": "response.completed", "response": {"usage": {
        "input_tokens": 30, "input_tokens_details": {"cached_tokens": 20},
        "output_tokens": 4}}}, state)
    assert state.done and state.usage == {"prompt_tokens": 30, "cached_tokens": 20,
                                          "completion_tokens": 4}

    state = _Parsed([], {})
    parse_event("messages", {"type": "message_start", "message": {"usage": {
        "input_tokens": 10, "cache_read_input_tokens": 20, "output_tokens": 0}}}, state)
    assert parse_event("messages", {"type": "content_block_delta", "index": 0,
                                    "delta": {"type": "text_delta", "text": "yo"}},
                       state) == "yo"
    assert parse_event("messages", {"type": "content_block_delta", "index": 0, "delta": {
        "type": "input_json_delta", "partial_json": "{"}}, state) is None
    parse_event("messages", {"type": "message_delta", "usage": {"output_tokens": 3}}, state)
    assert not state.done
    parse_event("messages", {"type": "message_stop"}, state)
    # Anthropic's input_tokens leave out cache reads: the prompt is their sum.
    assert state.done and state.usage == {"prompt_tokens": 30, "cached_tokens": 20,
                                          "completion_tokens": 3}

    state = _Parsed([], {})
    parse_event("messages", {"type": "error", "error": {"type": "overloaded_error"}}, state)
    assert state.done and state.error and "overloaded_error" in state.error

    state = _Parsed([], {})
    assert parse_event("chat", {"choices": [{"delta": {"content": "a"}}]}, state) == "a"
    parse_event("chat", {"choices": [], "usage": {
        "prompt_tokens": 9, "completion_tokens": 1,
        "prompt_tokens_details": {"cached_tokens": 8}}}, state)
    assert state.usage == {"prompt_tokens": 9, "cached_tokens": 8, "completion_tokens": 1}


def test_cli_api_option_defaults_to_chat() -> None:
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    assert config_from_args(parser.parse_args([])).api == "chat"
    assert config_from_args(parser.parse_args(["--api", "messages"])).api == "messages"
    with pytest.raises(SystemExit):
        parser.parse_args(["--api", "completions"])


@pytest.fixture
async def sim() -> AsyncIterator[SimHandle]:
    params = SimParams(time_scale=0.001, idle_to_cold_s=1e6, jitter=0.0)
    handle = await serve(params, "127.0.0.1", 0, "sim-r", ["sim-model"])
    yield handle
    await stop_sims([handle])


async def test_replay_over_each_api_sees_the_same_prompts_and_cache(sim: SimHandle) -> None:
    scenario = Scenario(sessions=2, min_turns=3, max_turns=3, arrival_window_s=0,
                        min_think_s=0, max_think_s=0, system_tokens=40, min_first_tokens=10,
                        max_first_tokens=20, min_followup_tokens=5, max_followup_tokens=10,
                        min_answer_tokens=4, max_answer_tokens=6)
    seen = {}
    for i, api in enumerate(APIS):
        # Salted per API: no run finds another's prefix in the one server's cache.
        workload = generate(scenario, salt=f"api{i}")
        settings = ReplaySettings(model="sim-model", time_scale=0.001, session_header=None,
                                  request_timeout_s=10, deadline_s=30, api=api)
        results, truncated = await replay(workload, lambda _s: sim.url, settings)
        assert not truncated
        assert len(results) == 6 and all(r.ok for r in results), results
        assert all(r.server == "sim-r" for r in results)
        later = [r for r in results if r.turn > 0]
        # A later turn finds the previous turn's prompt and answer cached (all but a block).
        assert all((r.cached_tokens or 0) >= r.reusable_tokens - 16 for r in later)
        seen[api] = sorted((r.session, r.turn, r.prompt_tokens, r.completion_tokens)
                           for r in results)
    # The same conversation (salts of one length aside) is the same prompt on every API.
    assert seen["chat"] == seen["responses"] == seen["messages"]
