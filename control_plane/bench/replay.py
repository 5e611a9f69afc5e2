"""Replay a workload against OpenAI-compatible URLs with aiohttp, one task per session.

Every turn streams (`stream_options.include_usage`), so time to first token is the first data
chunk that carries text, and the usage chunk gives prompt and cached tokens. A session sends
its next turn only after the previous answer ended plus the think time, with the answer it got
in the history, as a chat app does. The whole replay stops at a deadline whatever happens.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from control_plane.bench.workload import Session, Workload, messages

SERVER_HEADERS = ("x-sim-server",)  # which backend answered, when the backend says


@dataclass(frozen=True)
class ReplaySettings:
    model: str
    time_scale: float = 1.0  # scenario seconds -> wall seconds
    session_header: str | None = "x-session-id"  # None: let the gateway derive the key
    request_timeout_s: float = 120.0  # wall seconds for one turn
    deadline_s: float = 600.0  # wall seconds for the whole replay


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


async def _stream_turn(http: aiohttp.ClientSession, url: str, body: dict[str, Any],
                       headers: dict[str, str]) -> tuple[int, str | None, float | None, str,
                                                         dict[str, Any], str | None]:
    """(status, server, seconds to first text, text, usage, error) of one streamed request."""
    loop = asyncio.get_running_loop()
    sent = loop.time()
    async with http.post(url, json=body, headers=headers) as resp:
        server = next((resp.headers[h] for h in SERVER_HEADERS if h in resp.headers), None)
        if resp.status != 200:
            return resp.status, server, None, "", {}, (await resp.text())[:300]
        ttft: float | None = None
        parts: list[str] = []
        usage: dict[str, Any] = {}
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                # An empty answer (the model stopped at once) is still an answer; its first
                # token was the end of the stream.
                if ttft is None:
                    ttft = loop.time() - sent
                break
            chunk = json.loads(data)
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices") or ():
                text = (choice.get("delta") or {}).get("content") or choice.get("text")
                if text:
                    if ttft is None:
                        ttft = loop.time() - sent
                    parts.append(text)
        return resp.status, server, ttft, "".join(parts), usage, None


async def _run_session(http: aiohttp.ClientSession, workload: Workload, session: Session,
                       route: Route, settings: ReplaySettings, t0: float,
                       results: list[TurnResult], on_turn: OnTurn | None) -> None:
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, t0 + session.start_s * settings.time_scale - loop.time()))
    url = route(session).rstrip("/") + "/v1/chat/completions"
    headers = {settings.session_header: session.id} if settings.session_header else {}
    answers: list[str] = []
    reusable = 0
    for index, turn in enumerate(session.turns):
        await asyncio.sleep(turn.think_s * settings.time_scale)
        body = {
            "model": settings.model,
            "messages": messages(workload.system_prompt, list(session.turns[: index + 1]),
                                 answers),
            "max_tokens": turn.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        sent = loop.time()
        try:
            status, server, ttft, text, usage, error = await _stream_turn(http, url, body,
                                                                         headers)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            status, server, ttft, text, usage = 0, None, None, "", {}
            error = f"{type(exc).__name__}: {exc}"[:300]
        e2e = loop.time() - sent
        ok = error is None and ttft is not None
        details = usage.get("prompt_tokens_details") or {}
        result = TurnResult(
            session=session.id, turn=index, sent_at_s=sent - t0, ok=ok, status=status,
            ttft_s=ttft, e2e_s=e2e if ok else None, server=server,
            prompt_tokens=usage.get("prompt_tokens"),
            cached_tokens=details.get("cached_tokens") if isinstance(details, dict) else None,
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
