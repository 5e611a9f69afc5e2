"""Replay a workload against OpenAI-compatible URLs with aiohttp, one task per session.

The conversation goes over one API (`ReplaySettings.api`): chat completions (the default),
the OpenAI Responses API (system prompt -> `instructions`, turns -> `input` message items) or
the Anthropic Messages API (system prompt -> `system`, turns -> `messages`). Every turn
streams, so time to first token is the first event that carries text, and the usage the
stream reports (chat: `stream_options.include_usage`) gives prompt and cached tokens. A session
sends its next turn only after the previous answer ended plus the think time, with the answer
it got in the history, as a chat app does. The whole replay stops at a deadline whatever happens.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from control_plane.bench.workload import Session, Turn, Workload, messages

SERVER_HEADERS = ("x-sim-server",)  # which backend answered, when the backend says
API_PATHS = {"chat": "/v1/chat/completions", "responses": "/v1/responses",
             "messages": "/v1/messages"}
APIS = tuple(API_PATHS)


@dataclass(frozen=True)
class ReplaySettings:
    model: str
    time_scale: float = 1.0  # scenario seconds -> wall seconds
    session_header: str | None = "x-session-id"  # None: let the gateway derive the key
    request_timeout_s: float = 120.0  # wall seconds for one turn
    deadline_s: float = 600.0  # wall seconds for the whole replay
    api: str = "chat"  # one of APIS

    def __post_init__(self) -> None:
        if self.api not in API_PATHS:
            raise ValueError(f"api must be one of {', '.join(APIS)}, got {self.api!r}")


@dataclass(frozen=True)
class TurnResult:
    """One turn as the client saw it. Times are wall seconds; `reusable_tokens` is what the
    previous turn left cacheable on its server (its prompt plus its answer)."""

    session: str
    turn: int
    sent_at_s: float
    ok: bool
    status: int
    ttft_s: float | None
    e2e_s: float | None
    server: str | None
    prompt_tokens: int | None
    cached_tokens: int | None
    completion_tokens: int | None
    reusable_tokens: int
    error: str | None = None


Route = Callable[[Session], str]  # session -> base URL (http://host:port)
OnTurn = Callable[[TurnResult], None]


def request_body(api: str, model: str, system_prompt: str, turns: list[Turn],
                 answers: list[str], max_tokens: int) -> dict[str, Any]:
    """The streamed request for the next turn of a conversation on one API: the system prompt,
    every earlier user message and the answer it got, the newest user message."""
    chat = messages(system_prompt, turns, answers)
    if api == "chat":
        return {"model": model, "messages": chat, "max_tokens": max_tokens, "stream": True,
                "stream_options": {"include_usage": True}}
    history = chat[1:]  # without the system message
    if api == "responses":
        # Stateless (the whole history each turn, store off), as coding agents use it; the
        # gateway keys on instructions + the first user item when no header is sent.
        items = [{"type": "message", "role": m["role"], "content": m["content"]}
                 for m in history]
        return {"model": model, "instructions": system_prompt, "input": items,
                "max_output_tokens": max_tokens, "stream": True, "store": False}
    if api == "messages":
        return {"model": model, "system": system_prompt, "messages": history,
                "max_tokens": max_tokens, "stream": True}
    raise ValueError(f"unknown api {api!r}")


@dataclass
class _Parsed:
    """What the stream said so far: the text parts, usage (chat's names: prompt_tokens,
    cached_tokens, completion_tokens), whether it ended, an error it reported."""

    parts: list[str]
    usage: dict[str, int | None]
    done: bool = False
    error: str | None = None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def parse_event(api: str, chunk: dict[str, Any], state: _Parsed) -> str | None:
    """Fold one streamed JSON event into `state`; the text it carries, if any."""
    if api == "chat":
        usage = chunk.get("usage")
        if usage:
            details = usage.get("prompt_tokens_details") or {}
            state.usage = {"prompt_tokens": _int(usage.get("prompt_tokens")),
                           "cached_tokens": _int(details.get("cached_tokens"))
                           if isinstance(details, dict) else None,
                           "completion_tokens": _int(usage.get("completion_tokens"))}
        text = None
        for choice in chunk.get("choices") or ():
            piece = (choice.get("delta") or {}).get("content") or choice.get("text")
            if piece:
                text = (text or "") + piece
        return text
    kind = chunk.get("type")
    if api == "responses":
        if kind == "response.output_text.delta":
            return chunk.get("delta") or None
        if kind in ("response.completed", "response.incomplete"):
            usage = (chunk.get("response") or {}).get("usage") or {}
            details = usage.get("input_tokens_details") or {}
            state.usage = {"prompt_tokens": _int(usage.get("input_tokens")),
                           "cached_tokens": _int(details.get("cached_tokens"))
                           if isinstance(details, dict) else None,
                           "completion_tokens": _int(usage.get("output_tokens"))}
            state.done = True
        elif kind in ("response.failed", "error"):
            state.error = json.dumps(chunk)[:300]
            state.done = True
        return None
    # messages: input_tokens leave out the cache reads (Anthropic's and llama.cpp's usage)
    if kind == "message_start":
        usage = (chunk.get("message") or {}).get("usage") or {}
        fresh = _int(usage.get("input_tokens"))
        read = _int(usage.get("cache_read_input_tokens"))
        created = _int(usage.get("cache_creation_input_tokens")) or 0
        state.usage["prompt_tokens"] = None if fresh is None else fresh + (read or 0) + created
        state.usage["cached_tokens"] = read
    elif kind == "content_block_delta":
        delta = chunk.get("delta") or {}
        return (delta.get("text") if delta.get("type") == "text_delta" else None) or None
    elif kind == "message_delta":
        state.usage["completion_tokens"] = _int((chunk.get("usage") or {}).get("output_tokens"))
    elif kind == "message_stop":
        state.done = True
    elif kind == "error":
        state.error = json.dumps(chunk)[:300]
        state.done = True
    return None


async def _stream_turn(http: aiohttp.ClientSession, url: str, api: str, body: dict[str, Any],
                       headers: dict[str, str]) -> tuple[int, str | None, float | None, str,
                                                         dict[str, int | None], str | None]:
    """(status, server, seconds to first text, text, usage, error) of one streamed request."""
    loop = asyncio.get_running_loop()
    sent = loop.time()
    async with http.post(url, json=body, headers=headers) as resp:
        server = next((resp.headers[h] for h in SERVER_HEADERS if h in resp.headers), None)
        if resp.status != 200:
            return resp.status, server, None, "", {}, (await resp.text())[:300]
        ttft: float | None = None
        state = _Parsed([], {})
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue  # `event:` names repeat the JSON's "type"
            data = line[5:].strip()
            if data == b"[DONE]":
                state.done = True
            else:
                text = parse_event(api, json.loads(data), state)
                if text:
                    if ttft is None:
                        ttft = loop.time() - sent
                    state.parts.append(text)
            if state.done:
                # An empty answer (the model stopped at once) is still an answer; its first
                # token was the end of the stream.
                if ttft is None and state.error is None:
                    ttft = loop.time() - sent
                break
        return resp.status, server, ttft, "".join(state.parts), state.usage, state.error


async def _run_session(http: aiohttp.ClientSession, workload: Workload, session: Session,
                       route: Route, settings: ReplaySettings, t0: float,
                       results: list[TurnResult], on_turn: OnTurn | None) -> None:
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, t0 + session.start_s * settings.time_scale - loop.time()))
    url = route(session).rstrip("/") + API_PATHS[settings.api]
    headers = {settings.session_header: session.id} if settings.session_header else {}
    answers: list[str] = []
    reusable = 0
    for index, turn in enumerate(session.turns):
        await asyncio.sleep(turn.think_s * settings.time_scale)
        body = request_body(settings.api, settings.model, workload.system_prompt,
                            list(session.turns[: index + 1]), answers, turn.max_tokens)
        sent = loop.time()
        usage: dict[str, int | None]
        try:
            status, server, ttft, text, usage, error = await _stream_turn(
                http, url, settings.api, body, headers)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            status, server, ttft, text, usage = 0, None, None, "", {}
            error = f"{type(exc).__name__}: {exc}"[:300]
        e2e = loop.time() - sent
        ok = error is None and ttft is not None
        result = TurnResult(
            session=session.id, turn=index, sent_at_s=sent - t0, ok=ok, status=status,
            ttft_s=ttft, e2e_s=e2e if ok else None, server=server,
            prompt_tokens=usage.get("prompt_tokens"),
            cached_tokens=usage.get("cached_tokens"),
            completion_tokens=usage.get("completion_tokens"), reusable_tokens=reusable,
            error=error if error is not None or ok else "no text in the answer",
        )
        results.append(result)
        if on_turn is not None:
            on_turn(result)
        if not ok:
            return  # a user whose chat broke leaves; the rest of the session is not sent
        answers.append(text)
        reusable = (result.prompt_tokens or 0) + (result.completion_tokens or 0)


async def replay(workload: Workload, route: Route, settings: ReplaySettings,
                 on_turn: OnTurn | None = None) -> tuple[list[TurnResult], bool]:
    """Run every session; (results in send order, whether the deadline cut the replay)."""
    results: list[TurnResult] = []
    timeout = aiohttp.ClientTimeout(total=settings.request_timeout_s)
    # No connection cap: each session holds at most one request, as separate users would.
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        t0 = asyncio.get_running_loop().time()
        tasks = [
            asyncio.create_task(_run_session(http, workload, s, route, settings, t0, results,
                                             on_turn))
            for s in workload.sessions
        ]
        done, pending = await asyncio.wait(tasks, timeout=settings.deadline_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task in done:
            task.result()  # a bug in the client must not pass as a result
    return sorted(results, key=lambda r: r.sent_at_s), bool(pending)
