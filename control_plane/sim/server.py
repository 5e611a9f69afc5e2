"""aiohttp shell around `SimServer`: OpenAI-compatible endpoints (chat completions,
completions, the Responses API), the Anthropic Messages API and vLLM-style /metrics.

Every chat-like API (chat completions, `/v1/responses`, `/v1/messages`) turns its request into
the same (role, text) conversation, so the same history is the same prompt, and the same
prefix cache, whichever API carries it. The streamed opening events of the Responses and
Messages APIs go out with the first token, as llama.cpp's server sends them: the first body
byte is the first token on every API.

The waits are `asyncio.sleep`s of the planned durations: that sleeping is the simulation.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from control_plane.errors import UsageError
from control_plane.runtime.metrics import Family, Histogram, render
from control_plane.sim.model import Plan, SimParams, SimServer, chat_tokens, tokenize

SERVER_HEADER = "x-sim-server"
DEFAULT_MODEL = "sim-model"
MAX_BODY_BYTES = 8 * 1024 * 1024  # the gateway's documented body limit
SHUTDOWN_TIMEOUT_S = 2.0  # open streams must not hold up `hotpath up`'s 10 s stop
# vLLM's buckets for vllm:time_to_first_token_seconds.
TTFT_METRIC = "vllm:time_to_first_token_seconds"
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip

Json = dict[str, Any]


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


class SimState:
    """One simulated server: the pure model plus what only the shell knows (queue, timings)."""

    def __init__(self, params: SimParams, name: str, models: Sequence[str]) -> None:
        if not models:
            raise ValueError("a sim server needs at least one model name")
        # asyncio's clock is time.monotonic(): slow_after_s counts from this server's start.
        self.sim = SimServer(params, started_at=time.monotonic())
        self.name = name
        self.models = tuple(models)
        self.running = 0
        self.waiting = 0
        self.generation_tokens = 0
        self.labels = {"model_name": self.models[0]}
        self.ttft = Histogram(TTFT_METRIC, "Time to first token in seconds.", (), TTFT_BUCKETS,
                              const_labels=self.labels)
        self.ttft.declare()  # exposed at zero from the start, as vLLM's is
        self._slots = asyncio.Semaphore(params.max_running)
        self._ids = itertools.count()

    def next_id(self, prefix: str) -> str:
        return f"{prefix}-{self.name}-{next(self._ids)}"

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold one of max_running slots, queueing (counted as waiting) while all are busy."""
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            self._slots.release()


STATE = web.AppKey("sim_state", SimState)


def render_metrics(state: SimState) -> str:
    """Prometheus text exposition with vLLM's metric names, each sample labelled with
    ``model_name`` (the first served model)."""
    sim = state.sim

    def metric(name: str, kind: str, help_: str, value: float) -> Family:
        family = Family(name, kind, help_, (), const_labels=state.labels)
        family.set(value)
        return family

    return render([
        metric("vllm:num_requests_running", "gauge", "Requests running on the GPU.",
               state.running),
        metric("vllm:num_requests_waiting", "gauge", "Requests waiting to run.", state.waiting),
        metric("vllm:kv_cache_usage_perc", "gauge", "KV cache usage, 1 = full.",
               sim.cache.usage),
        metric("vllm:prefix_cache_queries_total", "counter",
               "Prompt tokens looked up in the prefix cache.", sim.prompt_tokens_total),
        metric("vllm:prefix_cache_hits_total", "counter",
               "Prompt tokens found in the prefix cache.", sim.cached_tokens_total),
        metric("vllm:prompt_tokens_total", "counter", "Prefill tokens.", sim.prompt_tokens_total),
        metric("vllm:generation_tokens_total", "counter", "Generated tokens.",
               state.generation_tokens),
        metric("hotpath_sim_cold_starts_total", "counter", "Simulated model loads.",
               sim.cold_starts),
        state.ttft,
    ])


MESSAGES_PATH = "/v1/messages"


def _error(status: int, message: str, code: str, path: str = "") -> web.Response:
    """OpenAI-shaped; Anthropic-shaped on /v1/messages."""
    if path == MESSAGES_PATH:
        kind = {404: "not_found_error", 413: "request_too_large"}.get(
            status, "invalid_request_error" if status < 500 else "api_error")
        anthropic = {"type": "error", "error": {"type": kind, "message": message}}
        return web.json_response(anthropic, status=status)
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "code": code}}
    return web.json_response(body, status=status)


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as e:
        return _error(e.status, e.message, e.code, request.path)
    except web.HTTPException as e:  # aiohttp's own 404, 405 and 413 in the API's shape
        if e.status < 400:
            raise
        return _error(e.status, e.reason, e.reason.lower().replace(" ", "_"), request.path)


async def _stamp_server(request: web.Request, response: web.StreamResponse) -> None:
    response.headers[SERVER_HEADER] = request.app[STATE].name


# --- request parsing -----------------------------------------------------------------------


async def _body(request: web.Request) -> Json:
    try:
        body = json.loads(await request.read())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON: {e}", "invalid_json") from e
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object", "invalid_request")
    return body


def _model(state: SimState, body: Json) -> str:
    model = body.get("model", state.models[0])  # vLLM serves its model when none is named
    if not isinstance(model, str):
        raise ApiError(400, "'model' must be a string", "invalid_model")
    if model not in state.models:
        raise ApiError(404, f"The model '{model}' does not exist.", "model_not_found")
    return model


def _max_tokens(params: SimParams, body: Json, *keys: str) -> int:
    value = next((body[k] for k in keys if body.get(k) is not None), params.default_max_tokens)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ApiError(400, f"'{keys[0]}' must be a positive integer", "invalid_max_tokens")
    return min(value, params.max_tokens_cap)


def _stream(body: Json) -> tuple[bool, bool]:
    """(stream, include_usage)."""
    stream = body.get("stream", False)
    options = body.get("stream_options") or {}
    if not isinstance(stream, bool) or not isinstance(options, dict):
        raise ApiError(400, "'stream' must be a boolean, 'stream_options' an object", "invalid")
    return stream, options.get("include_usage") is True


_TEXT_PARTS = ("text", "input_text", "output_text")  # chat, Messages; Responses


def _content_text(content: Any) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        # Text parts count as text; other parts (images...) as their JSON, which is stable.
        return " ".join(
            p["text"]
            if isinstance(p, dict) and p.get("type") in _TEXT_PARTS
            and isinstance(p.get("text"), str)
            else json.dumps(p, sort_keys=True)
            for p in content
        )
    raise ApiError(400, "message 'content' must be a string or a list", "invalid_messages")


def _messages(body: Json) -> list[tuple[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "invalid_messages")
    parsed = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, "each message needs a string 'role'", "invalid_messages")
        parsed.append((m["role"], _content_text(m.get("content"))))
    return parsed


def _responses_conversation(body: Json) -> list[tuple[str, str]]:
    """Responses API: `instructions` as the system message, then `input` (a string: one user
    message; a list: message items, typed "message" or untyped, in order). Other items
    (function calls and their outputs...) count as their JSON under their type, which is
    stable, as the chat shell counts non-text parts."""
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise ApiError(400, "'instructions' must be a string", "invalid_instructions")
    out = [("system", instructions)] if instructions else []
    items = body.get("input")
    if isinstance(items, str):
        return [*out, ("user", items)]
    if not isinstance(items, list) or not items:
        raise ApiError(400, "'input' must be a string or a non-empty list", "invalid_input")
    for item in items:
        if not isinstance(item, dict):
            raise ApiError(400, "each 'input' item must be an object", "invalid_input")
        if item.get("type", "message") == "message":
            if not isinstance(item.get("role"), str):
                raise ApiError(400, "each input message needs a string 'role'", "invalid_input")
            out.append((item["role"], _content_text(item.get("content"))))
        else:
            out.append((str(item.get("type")), json.dumps(item, sort_keys=True)))
    return out


def _anthropic_conversation(body: Json) -> list[tuple[str, str]]:
    """Messages API: `system` (a string or text blocks) as the system message, then
    `messages`."""
    system = body.get("system")
    if system is not None and not isinstance(system, str | list):
        raise ApiError(400, "'system' must be a string or a list of blocks", "invalid_system")
    text = _content_text(system)
    return ([("system", text)] if text else []) + _messages(body)


def _prompt(body: Json) -> list[str]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return tokenize(prompt)
    if isinstance(prompt, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in prompt
    ):
        return [str(t) for t in prompt]  # token ids: one token each
    raise ApiError(
        400, "'prompt' must be a string, a list of one string or a list of token ids", "invalid"
    )


# --- generation ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Request:
    chat: bool  # chat-shaped answer (chat completions); False: completions
    model: str
    prompt: list[str]
    max_tokens: int
    stream: bool
    include_usage: bool
    api: str = "openai"  # "openai" (chat, completions), "responses" or "messages"


def _usage(plan: Plan) -> Json:
    n = len(plan.completion)
    return {
        "prompt_tokens": plan.prompt_tokens,
        "completion_tokens": n,
        "total_tokens": plan.prompt_tokens + n,
        "prompt_tokens_details": {"cached_tokens": plan.cached_tokens},
    }


def _chunk_choice(req: _Request, text: str, first: bool, finish: str | None) -> Json:
    """A streamed choice; the final one (finish set) carries no text."""
    if not req.chat:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    delta: Json = {"content": text} if finish is None else {}
    if first:
        delta["role"] = "assistant"
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}


def _full_choice(req: _Request, text: str) -> Json:
    # Answers are filler that always runs to max_tokens, hence "length".
    if not req.chat:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}
    message = {"role": "assistant", "content": text}
    return {"index": 0, "message": message, "logprobs": None, "finish_reason": "length"}


async def _tokens(
    state: SimState, plan: Plan, arrival: float, admitted: float
) -> AsyncGenerator[str, None]:
    """Yield each completion token's text when the plan says it is ready."""
    loop = asyncio.get_running_loop()
    for i, token in enumerate(plan.completion):
        # Absolute deadlines, so per-token scheduling delays do not add up.
        await asyncio.sleep(max(0.0, admitted + plan.token_at_s(i) - loop.time()))
        if i == 0:
            state.ttft.observe(loop.time() - arrival)  # vLLM's TTFT includes the queue
        state.generation_tokens += 1
        yield token if i == 0 else " " + token


def _sse(data: Json | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


async def _run(
    state: SimState,
    req: _Request,
    arrival: float,
    send: Callable[[str, bool, Plan], Awaitable[None]] | None,
) -> tuple[Plan, str]:
    """Queue for a slot, then produce the completion on the plan's timeline, passing each piece
    (whether it is the first, and the plan) to `send` when streaming. Returns the plan and
    full text."""
    loop = asyncio.get_running_loop()
    async with state.slot():
        admitted = loop.time()
        plan = state.sim.plan(req.prompt, req.max_tokens, admitted, state.running - 1)
        pieces: list[str] = []
        async with aclosing(_tokens(state, plan, arrival, admitted)) as tokens:
            async for piece in tokens:
                if send is not None:
                    await send(piece, not pieces, plan)
                pieces.append(piece)
    return plan, "".join(pieces)


async def _generate(request: web.Request, req: _Request) -> web.StreamResponse:
    if req.api == "responses":
        return await _generate_response(request, req)
    if req.api == "messages":
        return await _generate_message(request, req)
    state = request.app[STATE]
    arrival = asyncio.get_running_loop().time()
    if req.chat:
        prefix, kind = "chatcmpl", "chat.completion.chunk" if req.stream else "chat.completion"
    else:
        prefix, kind = "cmpl", "text_completion"
    head: Json = {
        "id": state.next_id(prefix),
        "object": kind,
        "created": int(time.time()),
        "model": req.model,
    }
    if not req.stream:
        plan, text = await _run(state, req, arrival, None)
        choice = _full_choice(req, text)
        return web.json_response({**head, "choices": [choice], "usage": _usage(plan)})

    # Headers go out at once, as vLLM's do; the first data chunk arrives at TTFT.
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)

    async def send(piece: str, first: bool, plan: Plan) -> None:
        choice = _chunk_choice(req, piece, first, None)
        await response.write(_sse({**head, "choices": [choice]}))

    try:
        plan, _ = await _run(state, req, arrival, send)
        final = _chunk_choice(req, "", False, "length")
        await response.write(_sse({**head, "choices": [final]}))
        if req.include_usage:
            await response.write(_sse({**head, "choices": [], "usage": _usage(plan)}))
        await response.write(_sse("[DONE]"))
        await response.write_eof()
    except ConnectionResetError:
        pass  # the client went away: the request ends here, as vLLM aborts it
    return response


def _event(kind: str, data: Json) -> bytes:
    """A named server-sent event, as the Responses and Messages APIs send them."""
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def _open_stream(request: web.Request) -> web.StreamResponse:
    # Headers go out at once, as vLLM's do; the first event arrives at TTFT.
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    return response


def _responses_usage(plan: Plan) -> Json:
    n = len(plan.completion)
    return {
        "input_tokens": plan.prompt_tokens,
        "input_tokens_details": {"cached_tokens": plan.cached_tokens},
        "output_tokens": n,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": plan.prompt_tokens + n,
    }


async def _generate_response(request: web.Request, req: _Request) -> web.StreamResponse:
    """OpenAI Responses API. The answer runs to max_output_tokens; the status still says
    "completed", as llama.cpp's server says."""
    state = request.app[STATE]
    arrival = asyncio.get_running_loop().time()
    rid, mid = state.next_id("resp"), state.next_id("msg")
    created = int(time.time())

    def response_object(status: str, text: str | None, plan: Plan | None) -> Json:
        obj: Json = {"id": rid, "object": "response", "created_at": created,
                     "status": status, "model": req.model, "output": []}
        if text is not None:
            obj["output"] = [{"type": "message", "id": mid, "status": "completed",
                              "role": "assistant",
                              "content": [{"type": "output_text", "text": text,
                                           "annotations": []}]}]
            obj["output_text"] = text
        if plan is not None:
            obj["usage"] = _responses_usage(plan)
        return obj

    if not req.stream:
        plan, text = await _run(state, req, arrival, None)
        return web.json_response(response_object("completed", text, plan))

    response = await _open_stream(request)
    seq = itertools.count()

    async def emit(kind: str, data: Json) -> None:
        await response.write(_event(kind, {"type": kind, "sequence_number": next(seq), **data}))

    part = {"item_id": mid, "output_index": 0, "content_index": 0}

    async def send(piece: str, first: bool, plan: Plan) -> None:
        if first:
            await emit("response.created", {"response": response_object("in_progress", None,
                                                                        None)})
            await emit("response.in_progress",
                       {"response": response_object("in_progress", None, None)})
            await emit("response.output_item.added", {"output_index": 0, "item": {
                "type": "message", "id": mid, "status": "in_progress", "role": "assistant",
                "content": []}})
            await emit("response.content_part.added", {**part, "part": {
                "type": "output_text", "text": "", "annotations": []}})
        await emit("response.output_text.delta", {**part, "delta": piece})

    try:
        plan, text = await _run(state, req, arrival, send)
        done = response_object("completed", text, plan)
        await emit("response.output_text.done", {**part, "text": text})
        await emit("response.content_part.done", {**part, "part": done["output"][0][
            "content"][0]})
        await emit("response.output_item.done", {"output_index": 0,
                                                 "item": done["output"][0]})
        await emit("response.completed", {"response": done})
        await response.write_eof()
    except ConnectionResetError:
        pass  # the client went away: the request ends here
    return response


def _anthropic_usage(plan: Plan, output_tokens: int) -> Json:
    # Anthropic's input_tokens leave out what the cache served (llama.cpp's server agrees).
    return {"input_tokens": plan.prompt_tokens - plan.cached_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": plan.cached_tokens,
            "output_tokens": output_tokens}


async def _generate_message(request: web.Request, req: _Request) -> web.StreamResponse:
    """Anthropic Messages API. The answer runs to max_tokens: stop_reason "max_tokens"."""
    state = request.app[STATE]
    arrival = asyncio.get_running_loop().time()
    head: Json = {"id": state.next_id("msg"), "type": "message", "role": "assistant",
                  "model": req.model}
    if not req.stream:
        plan, text = await _run(state, req, arrival, None)
        return web.json_response({
            **head, "content": [{"type": "text", "text": text}], "stop_reason": "max_tokens",
            "stop_sequence": None, "usage": _anthropic_usage(plan, len(plan.completion))})

    response = await _open_stream(request)

    async def emit(kind: str, data: Json) -> None:
        await response.write(_event(kind, {"type": kind, **data}))

    async def send(piece: str, first: bool, plan: Plan) -> None:
        if first:
            await emit("message_start", {"message": {
                **head, "content": [], "stop_reason": None, "stop_sequence": None,
                "usage": _anthropic_usage(plan, 1)}})
            await emit("content_block_start", {"index": 0,
                                               "content_block": {"type": "text", "text": ""}})
        await emit("content_block_delta", {"index": 0,
                                           "delta": {"type": "text_delta", "text": piece}})

    try:
        plan, _ = await _run(state, req, arrival, send)
        await emit("content_block_stop", {"index": 0})
        await emit("message_delta", {
            "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
            "usage": {"output_tokens": len(plan.completion)}})
        await emit("message_stop", {})
        await response.write_eof()
    except ConnectionResetError:
        pass  # the client went away: the request ends here
    return response


# --- handlers ------------------------------------------------------------------------------


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = await _body(request)
    stream, include_usage = _stream(body)
    req = _Request(
        chat=True,
        model=_model(state, body),
        prompt=chat_tokens(_messages(body)),
        max_tokens=_max_tokens(state.sim.params, body, "max_completion_tokens", "max_tokens"),
        stream=stream,
        include_usage=include_usage,
    )
    return await _generate(request, req)


async def _completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = await _body(request)
    stream, include_usage = _stream(body)
    req = _Request(
        chat=False,
        model=_model(state, body),
        prompt=_prompt(body),
        max_tokens=_max_tokens(state.sim.params, body, "max_tokens"),
        stream=stream,
        include_usage=include_usage,
    )
    return await _generate(request, req)


def _agent_handler(api: str, conversation: Callable[[Json], list[tuple[str, str]]],
                   max_tokens_field: str) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """A handler for an agent API (``responses`` or ``messages``): the same generation as
    chat, the conversation read and the answer written in that API's shape."""

    async def handle(request: web.Request) -> web.StreamResponse:
        state = request.app[STATE]
        body = await _body(request)
        stream, _ = _stream(body)
        return await _generate(request, _Request(
            chat=True, model=_model(state, body), prompt=chat_tokens(conversation(body)),
            max_tokens=_max_tokens(state.sim.params, body, max_tokens_field), stream=stream,
            include_usage=True, api=api))

    return handle


async def _models(request: web.Request) -> web.Response:
    data = [
        {"id": m, "object": "model", "created": 0, "owned_by": "hotpath-sim"}
        for m in request.app[STATE].models
    ]
    return web.json_response({"object": "list", "data": data})


async def _health(request: web.Request) -> web.Response:
    # vLLM answers 200 while the model loads too; warmth shows in latency, not in health.
    return web.Response(status=200)


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(
        body=render_metrics(request.app[STATE]).encode(),
        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
    )


def make_app(params: SimParams, name: str, models: Sequence[str]) -> web.Application:
    app = web.Application(middlewares=[_errors], client_max_size=MAX_BODY_BYTES)
    app[STATE] = SimState(params, name, models)
    app.on_response_prepare.append(_stamp_server)
    app.router.add_post("/v1/chat/completions", _chat_completions)
    app.router.add_post("/v1/completions", _completions)
    app.router.add_post("/v1/responses",
                        _agent_handler("responses", _responses_conversation, "max_output_tokens"))
    app.router.add_post(MESSAGES_PATH,
                        _agent_handler("messages", _anthropic_conversation, "max_tokens"))
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/health", _health)
    app.router.add_get("/metrics", _metrics)
    return app


# --- running -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SimHandle:
    name: str
    host: str
    port: int
    models: tuple[str, ...]
    runner: web.AppRunner

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"


async def serve(
    params: SimParams,
    host: str = "127.0.0.1",
    port: int = 0,
    name: str = "sim-0",
    models: Sequence[str] = (DEFAULT_MODEL,),
) -> SimHandle:
    """Start one sim server; port 0 picks a free port (see `SimHandle.port`)."""
    runner = web.AppRunner(
        make_app(params, name, models), access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return SimHandle(name, host, runner.addresses[0][1], tuple(models), runner)


async def stop_sims(handles: Sequence[SimHandle]) -> None:
    for handle in handles:
        await handle.runner.cleanup()


async def run_sims(
    params: SimParams,
    count: int = 3,
    host: str = "127.0.0.1",
    base_port: int = 8001,
    name_prefix: str = "sim",
    models: Sequence[str] = (DEFAULT_MODEL,),
) -> list[SimHandle]:
    """Start `count` servers named <prefix>-0.. on consecutive ports from base_port (all on free
    ports when base_port is 0). Each gets seed + i so their jitter differs but repeats."""
    handles: list[SimHandle] = []
    try:
        for i in range(count):
            server_params = dataclasses.replace(params, seed=params.seed + i)
            port = base_port + i if base_port else 0
            handles.append(await serve(server_params, host, port, f"{name_prefix}-{i}", models))
    except BaseException:
        await stop_sims(handles)
        raise
    return handles


# --- CLI -----------------------------------------------------------------------------------

_PARAM_HELP = {
    "time_scale": "multiply every duration (0.1 = ten times faster)",
    "cold_start_s": "model load time at first start and after idling",
    "idle_to_cold_s": "idle seconds after which the next request cold-starts",
    "cache_tokens": "KV prefix cache capacity in tokens (LRU by block)",
    "block_size": "tokens per KV cache block",
    "prefill_ms_per_token": "prefill time per uncached prompt token",
    "decode_ms_per_token": "time per generated token",
    "concurrency_slowdown": "extra step time per other running request (0.15 = +15%%)",
    "max_running": "requests running at once; more wait in a queue",
    "jitter": "per-request random spread of durations (0.05 = +-5%%)",
    "seed": "random seed for jitter (server i uses seed + i)",
    "default_max_tokens": "max_tokens when a request gives none",
    "max_tokens_cap": "clamp larger max_tokens to this",
    "slow_after_s": "with --slow-ttft-s: seconds after start from which the server is slow",
    "slow_ttft_s": "once slow, every first token comes this many seconds later; headers still "
    "go out at once (0: never slow)",
}


def add_sim_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to bind")
    parser.add_argument(
        "--port", type=int, default=8001, help="first port; servers use consecutive ports (0: any)"
    )
    parser.add_argument("--count", type=int, default=1, help="number of servers")
    parser.add_argument("--name", default="sim", help="name prefix: servers are <name>-0, ...")
    parser.add_argument(
        "--model", action="append", help=f"served model name, repeatable (default {DEFAULT_MODEL})"
    )
    defaults = SimParams()
    for f in dataclasses.fields(SimParams):
        default = getattr(defaults, f.name)
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=type(default),
            default=default,
            help=f"{_PARAM_HELP[f.name]} (default {default})",
        )


def params_from_args(args: argparse.Namespace) -> SimParams:
    """Raises UsageError naming the bad parameter."""
    try:
        return SimParams(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SimParams)})
    except ValueError as exc:
        raise UsageError(str(exc)) from None


async def run_from_args(args: argparse.Namespace) -> None:
    """Serve until cancelled, then shut every server down."""
    if args.count < 1:
        raise UsageError(f"--count must be >= 1, got {args.count}")
    models = tuple(args.model or [DEFAULT_MODEL])
    handles = await run_sims(
        params_from_args(args), args.count, args.host, args.port, args.name, models
    )
    try:
        for h in handles:
            print(f"sim {h.name} on {h.url} model {','.join(h.models)}", flush=True)
        await asyncio.Event().wait()
    finally:
        await stop_sims(handles)
