"""The simulator's HTTP shell: a real aiohttp server on 127.0.0.1, port 0, running 1000x fast."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from control_plane.sim.model import SimParams
from control_plane.sim.server import (
    SERVER_HEADER,
    TTFT_BUCKETS,
    SimHandle,
    SimState,
    add_sim_arguments,
    params_from_args,
    render_metrics,
    run_from_args,
    run_sims,
    serve,
    stop_sims,
)

# 1000x fast; idle_to_cold long enough that no test goes cold between its requests.
FAST = SimParams(time_scale=0.001, idle_to_cold_s=1e6, jitter=0.0)
SYSTEM = "You are a helpful assistant that answers questions about GPUs. " * 10


@pytest.fixture
async def sim() -> AsyncIterator[SimHandle]:
    handle = await serve(FAST, "127.0.0.1", 0, "sim-t", ["sim-model"])
    yield handle
    await stop_sims([handle])


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def chat(question: str, **extra: Any) -> dict[str, Any]:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    return {"model": "sim-model", "messages": messages, **extra}


async def post(
    http: aiohttp.ClientSession, sim: SimHandle, path: str, body: Any
) -> tuple[int, dict[str, Any]]:
    async with http.post(sim.url + path, json=body) as resp:
        assert resp.headers[SERVER_HEADER] == sim.name
        return resp.status, await resp.json()


async def sse_events(resp: aiohttp.ClientResponse) -> list[str]:
    """The payloads of the `data:` events, in order."""
    text = (await resp.read()).decode()
    assert text.endswith("\n\n")
    events = text.split("\n\n")[:-1]
    assert all(e.startswith("data: ") for e in events)
    return [e.removeprefix("data: ") for e in events]


async def test_chat_reports_cached_prefix_on_second_request(
    sim: SimHandle, http: aiohttp.ClientSession
) -> None:
    status, first = await post(http, sim, "/v1/chat/completions", chat("What is a GPU?"))
    assert status == 200
    assert first["object"] == "chat.completion"
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert first["usage"]["completion_tokens"] == 16  # the default max_tokens
    message = first["choices"][0]["message"]
    assert message["role"] == "assistant" and len(message["content"].split()) == 16

    status, second = await post(http, sim, "/v1/chat/completions", chat("And a TPU?", max_tokens=3))
    assert status == 200
    usage = second["usage"]
    assert usage["completion_tokens"] == 3
    assert 0 < usage["prompt_tokens_details"]["cached_tokens"] < usage["prompt_tokens"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + 3


async def test_next_turn_hits_the_previous_answer(
    sim: SimHandle, http: aiohttp.ClientSession
) -> None:
    body = chat("What is a GPU?", max_tokens=50)
    _, first = await post(http, sim, "/v1/chat/completions", body)
    body["messages"] += [first["choices"][0]["message"], {"role": "user", "content": "More?"}]
    _, second = await post(http, sim, "/v1/chat/completions", body)
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= first["usage"]["prompt_tokens"] + 32


async def test_max_tokens_is_clamped_to_the_cap(http: aiohttp.ClientSession) -> None:
    params = SimParams(time_scale=0.001, default_max_tokens=2, max_tokens_cap=5)
    handle = await serve(params, "127.0.0.1", 0, "capped", ["m"])
    try:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 99}
        status, answer = await post(http, handle, "/v1/chat/completions", body)
    finally:
        await stop_sims([handle])
    assert status == 200
    assert answer["usage"]["completion_tokens"] == 5


async def test_chat_stream_sends_one_chunk_per_token_then_done(
    sim: SimHandle, http: aiohttp.ClientSession
) -> None:
    body = chat("Stream it", max_tokens=5, stream=True, stream_options={"include_usage": True})
    async with http.post(sim.url + "/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        assert resp.headers[SERVER_HEADER] == sim.name
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        events = await sse_events(resp)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    tokens, (final, usage_chunk) = chunks[:-2], chunks[-2:]
    assert len(tokens) == 5
    assert tokens[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"]["content"] for c in tokens)
    assert len(text.split()) == 5
    assert final["choices"][0]["finish_reason"] == "length"
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 5


async def test_stream_without_include_usage_has_no_usage_chunk(
    sim: SimHandle, http: aiohttp.ClientSession
) -> None:
    body = {"model": "sim-model", "prompt": "Once upon a time", "max_tokens": 3, "stream": True}
    async with http.post(sim.url + "/v1/completions", json=body) as resp:
        events = await sse_events(resp)
    chunks = [json.loads(e) for e in events[:-1]]
    assert events[-1] == "[DONE]"
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, None, "length"]
    assert all("usage" not in c and c["object"] == "text_completion" for c in chunks)


async def test_completions_non_streaming(sim: SimHandle, http: aiohttp.ClientSession) -> None:
    body = {"model": "sim-model", "prompt": SYSTEM, "max_tokens": 4}
    _, first = await post(http, sim, "/v1/completions", body)
    assert first["object"] == "text_completion"
    assert len(first["choices"][0]["text"].split()) == 4
    _, second = await post(http, sim, "/v1/completions", body)
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


async def test_models_health_and_metrics(sim: SimHandle, http: aiohttp.ClientSession) -> None:
    async with http.get(sim.url + "/v1/models") as resp:
        assert resp.headers[SERVER_HEADER] == sim.name
        models = await resp.json()
    assert [m["id"] for m in models["data"]] == ["sim-model"]

    async with http.get(sim.url + "/health") as resp:
        assert resp.status == 200
        assert resp.headers[SERVER_HEADER] == sim.name

    await post(http, sim, "/v1/chat/completions", chat("one", max_tokens=2))
    await post(http, sim, "/v1/chat/completions", chat("two", max_tokens=2))
    async with http.get(sim.url + "/metrics") as resp:
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    values = dict(re.findall(r'^([a-z_:]+)(?:\{model_name="sim-model"\}) (\S+)$', text, flags=re.M))
    assert float(values["vllm:num_requests_running"]) == 0
    assert float(values["vllm:num_requests_waiting"]) == 0
    assert float(values["vllm:generation_tokens_total"]) == 4
    assert float(values["hotpath_sim_cold_starts_total"]) == 1
    queries = float(values["vllm:prefix_cache_queries_total"])
    assert queries == float(values["vllm:prompt_tokens_total"]) > 0
    assert 0 < float(values["vllm:prefix_cache_hits_total"]) < queries
    assert float(values["vllm:time_to_first_token_seconds_count"]) == 2
    assert "# TYPE vllm:time_to_first_token_seconds histogram" in text
    assert 'vllm:time_to_first_token_seconds_bucket{model_name="sim-model",le="+Inf"} 2' in text


def test_metrics_text_uses_vllm_names_and_a_cumulative_histogram() -> None:
    state = SimState(FAST, "sim-m", ['odd "model"\\name', "second"])
    label = 'model_name="odd \\"model\\"\\\\name"'  # escaped; the first model only
    before = render_metrics(state).splitlines()
    name = "vllm:time_to_first_token_seconds"
    # Exposed at zero before the first request, as vLLM does.
    assert f'{name}_bucket{{{label},le="+Inf"}} 0' in before
    assert f"{name}_count{{{label}}} 0" in before
    for value in (0.003, 0.3, 3.0):
        state.ttft.observe(value)
    state.generation_tokens = 7
    lines = render_metrics(state).splitlines()
    assert f"vllm:generation_tokens_total{{{label}}} 7" in lines
    assert "# TYPE vllm:kv_cache_usage_perc gauge" in lines
    buckets = [line for line in lines if line.startswith(name + "_bucket")]
    assert len(buckets) == len(TTFT_BUCKETS) + 1
    counts = [int(line.rsplit(" ", 1)[1]) for line in buckets]
    assert counts == sorted(counts) and counts[-1] == 3  # cumulative
    assert f'{name}_bucket{{{label},le="0.005"}} 1' in lines
    assert f'{name}_bucket{{{label},le="0.5"}} 2' in lines
    assert f"{name}_sum{{{label}}} 3.303" in lines
    assert f"{name}_count{{{label}}} 3" in lines
    assert all(line.startswith("#") or label in line for line in lines)


@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    [
        ("/v1/chat/completions", b"{not json", 400, "invalid_json"),
        ("/v1/chat/completions", b"[1, 2]", 400, "invalid_request"),
        ("/v1/chat/completions", b'{"model": "sim-model"}', 400, "invalid_messages"),
        ("/v1/chat/completions", b'{"model": "other", "messages": [{"role": "user"}]}', 404,
         "model_not_found"),
        ("/v1/chat/completions",
         b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}', 400,
         "invalid_max_tokens"),
        ("/v1/completions", b'{"prompt": {"a": 1}}', 400, "invalid"),
        ("/v1/nope", b"{}", 404, "not_found"),
    ],
)  # fmt: skip
async def test_errors_are_openai_shaped(
    sim: SimHandle, http: aiohttp.ClientSession, path: str, body: bytes, status: int, code: str
) -> None:
    async with http.post(sim.url + path, data=body) as resp:
        assert resp.status == status
        assert resp.headers[SERVER_HEADER] == sim.name
        error = (await resp.json())["error"]
    assert error["code"] == code
    assert error["type"] == "invalid_request_error"
    assert error["message"]


# --- Responses and Messages APIs ----------------------------------------------------------


async def named_events(resp: aiohttp.ClientResponse) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of each named server-sent event, in order; the name is the type."""
    text = (await resp.read()).decode()
    assert text.endswith("\n\n")
    out = []
    for block in text.split("\n\n")[:-1]:
        name, data = block.split("\n")
        assert name.startswith("event: ") and data.startswith("data: ")
        event = json.loads(data.removeprefix("data: "))
        assert event["type"] == name.removeprefix("event: ")
        out.append((event["type"], event))
    return out


def responses_body(question: str, **extra: Any) -> dict[str, Any]:
    items = [{"type": "message", "role": "user",
              "content": [{"type": "input_text", "text": question}]}]
    return {"model": "sim-model", "instructions": SYSTEM, "input": items, **extra}


def messages_body(question: str, **extra: Any) -> dict[str, Any]:
    return {"model": "sim-model", "system": SYSTEM, "max_tokens": 16,
            "messages": [{"role": "user", "content": question}], **extra}


async def test_responses_non_streaming_is_a_response_object_with_cached_prefix(
    sim: SimHandle, http: aiohttp.ClientSession
) -> None:
    status, first = await post(http, sim, "/v1/responses", responses_body("What is a GPU?"))
    assert status == 200
    assert first["object"] == "response" and first["status"] == "completed"
    assert first["id"].startswith("resp-")
    (message,) = first["output"]
    assert message["type"] == "message" and message["role"] == "assistant"
    (part,) = message["content"]
    assert part["type"] == "output_text" and part["text"] == first["output_text"]
    assert len(first["output_text"].split()) == 16  # the default max tokens
    usage = first["usage"]
    assert usage["input_tokens_details"]["cached_tokens"] == 0
    assert usage["output_tokens"] == 16
    assert usage["total_tokens"] == usage["input_tokens"] + 16

    body = responses_body("What is a GPU?", max_output_tokens=3)
    body["input"] += [{"role": "assistant", "content": first["output_text"]},
                      {"role": "user", "content": "More?"}]
    _, second = await post(http, sim, "/v1/responses", body)
    assert second["usage"]["output_tokens"] == 3
    assert second["usage"]["input_tokens_details"]["cached_tokens"] >= usage["input_tokens"]


async def test_chat_responses_and_messages_share_one_prompt_and_cache(
    sim: SimHandle, http: aiohttp.ClientSession
) -> None:
    """The same conversation is the same prompt on every API: a chat request warms the
    cache for the Responses and Messages requests that repeat it."""
    _, by_chat = await post(http, sim, "/v1/chat/completions", chat("Same question"))
    prompt = by_chat["usage"]["prompt_tokens"]
    _, by_responses = await post(http, sim, "/v1/responses",
                                 {"model": "sim-model", "instructions": SYSTEM,
                                  "input": "Same question"})
    assert by_responses["usage"]["input_tokens"] == prompt
    cached = by_responses["usage"]["input_tokens_details"]["cached_tokens"]
    assert cached >= prompt - 16  # all but the last, partial block
    _, by_messages = await post(http, sim, "/v1/messages", messages_body("Same question"))
    usage = by_messages["usage"]
    assert usage["input_tokens"] + usage["cache_read_input_tokens"] == prompt
    assert usage["cache_read_input_tokens"] == cached


async def test_responses_stream_sends_the_openai_events(
    sim: SimHandle, http: aiohttp.ClientSession
) -> None:
    body = responses_body("Stream it", max_output_tokens=4, stream=True)
    async with http.post(sim.url + "/v1/responses", json=body) as resp:
        assert resp.status == 200
        assert resp.headers[SERVER_HEADER] == sim.name
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        events = await named_events(resp)
    kinds = [k for k, _ in events]
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * 4,
                     "response.output_text.done", "response.content_part.done",
                     "response.output_item.done", "response.completed"]
    assert [e["sequence_number"] for _, e in events] == list(range(len(events)))
    created, completed = events[0][1]["response"], events[-1][1]["response"]
    assert created["status"] == "in_progress" and created["id"] == completed["id"]
    text = "".join(e["delta"] for k, e in events if k == "response.output_text.delta")
    assert completed["output_text"] == text and len(text.split()) == 4
    assert completed["usage"]["output_tokens"] == 4


async def test_messages_non_streaming_is_an_anthropic_message(
    sim: SimHandle, http: aiohttp.ClientSession
) -> None:
    body = messages_body("What is a GPU?", system=[{"type": "text", "text": SYSTEM}],
                         max_tokens=5)
    status, message = await post(http, sim, "/v1/messages", body)
    assert status == 200
    assert message["type"] == "message" and message["role"] == "assistant"
    assert message["stop_reason"] == "max_tokens" and message["stop_sequence"] is None
    (block,) = message["content"]
    assert block["type"] == "text" and len(block["text"].split()) == 5
    assert message["usage"]["output_tokens"] == 5
    assert message["usage"]["cache_read_input_tokens"] == 0
    # System blocks and a system string are the same prompt.
    _, again = await post(http, sim, "/v1/messages", messages_body("What is a GPU?"))
    assert again["usage"]["cache_read_input_tokens"] > 0


async def test_messages_stream_sends_the_anthropic_events(
    sim: SimHandle, http: aiohttp.ClientSession
) -> None:
    body = messages_body("Stream it", max_tokens=3, stream=True)
    async with http.post(sim.url + "/v1/messages", json=body) as resp:
        assert resp.status == 200
        events = await named_events(resp)
    kinds = [k for k, _ in events]
    assert kinds == ["message_start", "content_block_start", *["content_block_delta"] * 3,
                     "content_block_stop", "message_delta", "message_stop"]
    start = events[0][1]["message"]
    assert start["role"] == "assistant" and start["content"] == []
    assert start["usage"]["input_tokens"] > 0
    deltas = [e["delta"] for k, e in events if k == "content_block_delta"]
    assert all(d["type"] == "text_delta" for d in deltas)
    assert len("".join(d["text"] for d in deltas).split()) == 3
    final = events[-2][1]
    assert final["delta"]["stop_reason"] == "max_tokens"
    assert final["usage"]["output_tokens"] == 3


@pytest.mark.parametrize(
    ("path", "body", "status", "kind"),
    [
        ("/v1/messages", b"[1]", 400, "invalid_request_error"),
        ("/v1/messages", b'{"messages": []}', 400, "invalid_request_error"),
        ("/v1/messages", b'{"model": "other", "messages": [{"role": "user"}]}', 404,
         "not_found_error"),
        ("/v1/messages", b'{"system": 1, "messages": [{"role": "user"}]}', 400,
         "invalid_request_error"),
    ],
)  # fmt: skip
async def test_messages_errors_are_anthropic_shaped(
    sim: SimHandle, http: aiohttp.ClientSession, path: str, body: bytes, status: int, kind: str
) -> None:
    async with http.post(sim.url + path, data=body) as resp:
        assert resp.status == status
        answer = await resp.json()
    assert answer["type"] == "error"
    assert answer["error"]["type"] == kind and answer["error"]["message"]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b'{"input": []}', "invalid_input"),
        (b'{"input": [1]}', "invalid_input"),
        (b'{"input": "hi", "instructions": 3}', "invalid_instructions"),
        (b'{"input": "hi", "max_output_tokens": 0}', "invalid_max_tokens"),
    ],
)  # fmt: skip
async def test_responses_errors_are_openai_shaped(
    sim: SimHandle, http: aiohttp.ClientSession, body: bytes, code: str
) -> None:
    async with http.post(sim.url + "/v1/responses", data=body) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert error["code"] == code and error["type"] == "invalid_request_error"


async def test_run_sims_serves_each_under_its_own_name(http: aiohttp.ClientSession) -> None:
    handles = await run_sims(FAST, count=3, base_port=0, name_prefix="pool")
    try:
        assert [h.name for h in handles] == ["pool-0", "pool-1", "pool-2"]
        assert len({h.port for h in handles}) == 3
        for handle in handles:
            status, _ = await post(http, handle, "/v1/chat/completions", chat("hi"))
            assert status == 200
    finally:
        await stop_sims(handles)


class _LineSignal(io.StringIO):
    """Captured stdout that sets an event once `lines` lines have been printed."""

    def __init__(self, lines: int) -> None:
        super().__init__()
        self.lines = lines
        self.ready = asyncio.Event()

    def write(self, s: str) -> int:
        n = super().write(s)
        if self.getvalue().count("\n") >= self.lines:
            self.ready.set()
        return n


async def test_run_from_args_prints_servers_and_stops_on_cancel(
    http: aiohttp.ClientSession,
) -> None:
    parser = argparse.ArgumentParser()
    add_sim_arguments(parser)
    args = parser.parse_args(
        ["--port", "0", "--count", "2", "--name", "cli", "--time-scale", "0.001"]
    )
    out = _LineSignal(2)
    with contextlib.redirect_stdout(out):
        task = asyncio.create_task(run_from_args(args))
        await asyncio.wait_for(out.ready.wait(), 10)
    lines = out.getvalue().splitlines()
    urls = [m.group(1) for m in map(re.compile(r"^sim cli-\d on (\S+) model sim-model$").match,
                                    lines) if m]  # fmt: skip
    assert len(urls) == 2
    async with http.get(urls[1] + "/health") as resp:
        assert resp.headers[SERVER_HEADER] == "cli-1"

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(aiohttp.ClientConnectionError):
        async with http.get(urls[0] + "/health"):
            pass


def test_cli_parameters_map_onto_sim_params() -> None:
    parser = argparse.ArgumentParser()
    add_sim_arguments(parser)
    args = parser.parse_args(["--cold-start-s", "1.5", "--cache-tokens", "64", "--seed", "3"])
    assert (args.host, args.port, args.count, args.model) == ("127.0.0.1", 8001, 1, None)
    params = params_from_args(args)
    assert (params.cold_start_s, params.cache_tokens, params.seed) == (1.5, 64, 3)
    assert params.decode_ms_per_token == SimParams().decode_ms_per_token
