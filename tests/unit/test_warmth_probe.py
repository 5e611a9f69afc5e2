"""One warm-up probe against real HTTP servers on 127.0.0.1: the simulator and tiny fakes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from control_plane.config.model import DEFAULT_SYSTEM_PROMPT, Endpoint, Pool, Warmup
from control_plane.prober.probe import (
    PROBE_HEADER,
    Usage,
    parse_usage,
    probe_url,
    send_probe,
    warmup_body,
)
from control_plane.prober.state import Outcome, classify
from control_plane.runtime.metrics import Family, Histogram, render
from control_plane.runtime.processes import free_port
from control_plane.sim.model import SimParams
from control_plane.sim.server import serve, stop_sims

POOL = Pool(name="chat", models=("sim-model", "other"))
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def fake() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    runners: list[web.AppRunner] = []

    async def start(handler: Handler) -> str:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", handler)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        return f"http://127.0.0.1:{runner.addresses[0][1]}/v1/chat/completions"

    yield start
    for runner in runners:
        await runner.cleanup()


# --- the request --------------------------------------------------------------------------


def test_default_body_is_the_shared_prefix_and_one_token() -> None:
    body = warmup_body(POOL)
    assert body == {
        "model": "sim-model",
        "messages": [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT},
                     {"role": "user", "content": "Hi"}],
        "max_tokens": 1,
        "stream": False,
    }
    assert warmup_body(POOL, "Be terse.")["messages"][0]["content"] == "Be terse."


def test_pool_body_replaces_the_default() -> None:
    custom = {"model": "m", "prompt": "x", "max_tokens": 1}
    pool = Pool(name="p", models=("m",), warmup=Warmup(path="/v1/completions", body=custom))
    assert warmup_body(pool, "ignored") == custom


def test_probe_url() -> None:
    assert probe_url(Endpoint("p", "e", "10.0.0.1", 8000), "/v1/chat/completions") == \
        "http://10.0.0.1:8000/v1/chat/completions"
    assert probe_url(Endpoint("p", "e", "::1", 8000), "/x") == "http://[::1]:8000/x"
    assert probe_url(Endpoint("p", "e", "gpu-1.internal", 80), "/x") == \
        "http://gpu-1.internal:80/x"


@pytest.mark.parametrize(("content_type", "body", "usage"), [
    ("application/json", b'{"usage": {"prompt_tokens": 12, "completion_tokens": 1, '
     b'"prompt_tokens_details": {"cached_tokens": 8}}}', Usage(12, 1, 8)),
    ("application/json", b'{"usage": {"prompt_tokens": 12, "completion_tokens": 1}}',
     Usage(12, 1, 0)),
    ("application/json", b'{"choices": []}', None),
    ("application/json", b"not json", None),
    ("text/event-stream", b'data: {"choices": [{"delta": {}}]}\n\ndata: {"choices": [], '
     b'"usage": {"prompt_tokens": 5, "completion_tokens": 1}}\n\ndata: [DONE]\n\n',
     Usage(5, 1, 0)),
    ("text/event-stream", b"data: {oops\n\ndata: [DONE]\n\n", None),
])
def test_parse_usage(content_type: str, body: bytes, usage: Usage | None) -> None:
    assert parse_usage(content_type, body) == usage


# --- against the simulator ------------------------------------------------------------------


async def test_a_cold_simulator_is_slow_then_warm_and_the_prefix_is_cached(
        http: aiohttp.ClientSession) -> None:
    # 1000x fast: a 4 s cold start takes 4 ms, one decode step 0.02 ms.
    params = SimParams(time_scale=0.01, cold_start_s=20.0, idle_to_cold_s=1e6, jitter=0.0)
    sim = await serve(params, "127.0.0.1", 0, "sim-p", ["sim-model"])
    try:
        url = probe_url(Endpoint("chat", "sim-p", "127.0.0.1", sim.port), "/v1/chat/completions")
        long_prompt = "You are a careful assistant for GPU cluster operators. " * 8
        body = warmup_body(POOL, long_prompt)
        first = await send_probe(http, url, body, 5.0, {PROBE_HEADER: "1"})
        second = await send_probe(http, url, body, 5.0)
        assert first.ttft_ms is not None and second.ttft_ms is not None
        assert first.status == second.status == 200
        assert classify(first.ttft_ms, cold_ttft_ms=100.0) is Outcome.SLOW  # 200 ms load
        assert classify(second.ttft_ms, cold_ttft_ms=100.0) is Outcome.FAST
        assert first.usage is not None and second.usage is not None
        assert first.usage.completion_tokens == second.usage.completion_tokens == 1
        assert first.usage.cached_tokens == 0
        # The shared prefix stays in the server's prefix cache for real sessions.
        assert second.usage.cached_tokens >= 64
    finally:
        await stop_sims([sim])


# --- failures and refusals --------------------------------------------------------------------


async def test_server_errors_are_failures(http: aiohttp.ClientSession, fake: Any) -> None:
    async def loading(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "loading"}}, status=503)

    result = await send_probe(http, await fake(loading), warmup_body(POOL), 2.0)
    assert result.ttft_ms is None and result.status == 503 and result.error == "HTTP 503"
    assert classify(result.ttft_ms, 1000.0) is Outcome.FAILED


async def test_refused_request_is_an_answer_that_is_flagged(
        http: aiohttp.ClientSession, fake: Any) -> None:
    async def not_found(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "The model 'x' does not exist."}},
                                 status=404)

    result = await send_probe(http, await fake(not_found), warmup_body(POOL), 2.0)
    assert result.rejected and result.status == 404 and result.ttft_ms is not None
    assert "does not exist" in result.detail


async def test_timeout_and_refused_connection_fail(http: aiohttp.ClientSession,
                                                    fake: Any) -> None:
    async def hang(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.json_response({})

    slow = await send_probe(http, await fake(hang), warmup_body(POOL), 0.2)
    assert slow.ttft_ms is None and slow.error == "timed out after 0.2 s"
    port = free_port()
    refused = await send_probe(http, f"http://127.0.0.1:{port}/v1/chat/completions",
                               warmup_body(POOL), 2.0)
    assert refused.ttft_ms is None and refused.error and "Connect" in refused.error


async def test_ttft_is_the_first_body_byte_of_a_stream(http: aiohttp.ClientSession,
                                                       fake: Any) -> None:
    seen: dict[str, Any] = {}

    async def stream(request: web.Request) -> web.StreamResponse:
        seen["body"] = await request.json()
        seen["probe"] = request.headers.get(PROBE_HEADER)
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)  # headers at once, as vLLM does
        await asyncio.sleep(0.15)
        await response.write(b'data: {"choices": [{"delta": {"content": "x"}}]}\n\n')
        await asyncio.sleep(0.3)
        await response.write(b'data: {"choices": [], "usage": {"prompt_tokens": 3, '
                             b'"completion_tokens": 2}}\n\ndata: [DONE]\n\n')
        return response

    body = {"model": "m", "messages": [], "max_tokens": 2, "stream": True}
    result = await send_probe(http, await fake(stream), body, 2.0, {PROBE_HEADER: "1"})
    assert result.ttft_ms is not None and 140 <= result.ttft_ms < 400
    assert result.usage == Usage(3, 2, 0)
    assert seen == {"body": body, "probe": "1"}


# --- metrics text -------------------------------------------------------------------------------


def test_metrics_render_in_prometheus_text_format() -> None:
    probes = Family("x_probes_total", "counter", "probes", ("pool", "endpoint"))
    probes.inc("p", 'e"1')
    probes.inc("p", 'e"1', by=2)
    gauge = Family("x_leader", "gauge", "leader", ())
    gauge.set(1.0)
    hist = Histogram("x_seconds", "latency", ("pool",), buckets=(0.1, 1.0))
    hist.observe(0.05, "p")
    hist.observe(0.5, "p")
    text = render([probes, gauge, hist])
    assert text == "\n".join([
        "# HELP x_probes_total probes", "# TYPE x_probes_total counter",
        'x_probes_total{pool="p",endpoint="e\\"1"} 3',
        "# HELP x_leader leader", "# TYPE x_leader gauge", "x_leader 1",
        "# HELP x_seconds latency", "# TYPE x_seconds histogram",
        'x_seconds_bucket{pool="p",le="0.1"} 1', 'x_seconds_bucket{pool="p",le="1"} 2',
        'x_seconds_bucket{pool="p",le="+Inf"} 2', 'x_seconds_sum{pool="p"} 0.55',
        'x_seconds_count{pool="p"} 2',
    ]) + "\n"
    probes.remove({"endpoint": 'e"1'})
    hist.remove({"pool": "p"})
    assert probes.values == {} and hist.count("p") == 0
    with pytest.raises(ValueError):
        probes.inc("only-one-label")


def test_constant_labels_come_first_on_every_sample() -> None:
    gauge = Family("x_running", "gauge", "running", (), const_labels={"model_name": 'm"1'})
    gauge.set(2)
    hist = Histogram("x_ttft", "ttft", ("kind",), buckets=(0.5,), const_labels={"model": "m"})
    hist.declare("a")  # exposed at zero before any observation
    assert render([gauge, hist]).splitlines()[2:] == [
        'x_running{model_name="m\\"1"} 2',
        "# HELP x_ttft ttft", "# TYPE x_ttft histogram",
        'x_ttft_bucket{model="m",kind="a",le="0.5"} 0',
        'x_ttft_bucket{model="m",kind="a",le="+Inf"} 0',
        'x_ttft_sum{model="m",kind="a"} 0', 'x_ttft_count{model="m",kind="a"} 0',
    ]
    hist.observe(0.25, "a")
    hist.observe(0.75, "a")
    assert (hist.count("a"), hist.total("a")) == (2, 1.0)
    with pytest.raises(ValueError, match="both constant and variable"):
        Family("x", "gauge", "x", ("model",), const_labels={"model": "m"})


def test_json_roundtrip_of_default_body() -> None:
    assert json.loads(json.dumps(warmup_body(POOL)))["max_tokens"] == 1
