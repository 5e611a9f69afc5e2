"""One warm-up probe: the pool's request, sent straight to a model server, timed.

The default request is a chat completion on the pool's first model with ``max_tokens: 1``
whose prompt is the pool's shared prefix (the system prompt real sessions start with) and a
one-word user turn, so the server's prefix/KV cache holds what real sessions begin with and
the probe costs one generated token. vLLM, SGLang, TGI (Messages API) and llama.cpp's
server all accept it as is; see docs/prober.md. A pool's ``warmup.body`` replaces it.

Time to first token is measured to the first byte of the response body: for a
non-streaming ``max_tokens: 1`` request that is the whole answer, for a streaming body the
first SSE chunk.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from control_plane.config.model import DEFAULT_SYSTEM_PROMPT, Endpoint, Pool

# The user turn after the shared prefix. Some chat templates (Mistral, Gemma) refuse a
# conversation without a user message; one short word keeps the cost at a few tokens.
WARMUP_USER_MESSAGE = "Hi"
# Probes carry these headers, so a server's access log can tell them from real traffic.
PROBE_HEADER = "x-hotpath-probe"  # "1"
PROBER_HEADER = "x-hotpath-prober"  # the prober's identity (host/pid)
MAX_BODY_BYTES = 1024 * 1024


def warmup_body(pool: Pool, system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> dict[str, Any]:
    """The request body the pool's endpoints get."""
    if pool.warmup.body is not None:
        return dict(pool.warmup.body)
    return {
        "model": pool.models[0],
        "messages": [
            {"role": "system", "content": system_prompt},
            {"role": "user", "content": WARMUP_USER_MESSAGE},
        ],
        "max_tokens": 1,
        "stream": False,
    }


def probe_url(endpoint: Endpoint, path: str) -> str:
    host = f"[{endpoint.address}]" if ":" in endpoint.address else endpoint.address
    return f"http://{host}:{endpoint.port}{path}"


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass(frozen=True)
class ProbeResult:
    """``ttft_ms`` is None when the server did not answer (``error`` says why)."""

    ttft_ms: float | None
    status: int | None = None
    error: str | None = None
    usage: Usage | None = None
    # A 4xx: the server is up but refuses the warm-up request (a wrong model name or body).
    # It counts as an answer so a bad warmup setting cannot take a pool down; it is logged.
    rejected: bool = False
    detail: str = ""


def _usage_of(value: Any) -> Usage | None:
    if not isinstance(value, dict) or not isinstance(value.get("usage"), dict):
        return None
    usage = value["usage"]

    def number(v: Any) -> int:
        return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0

    details = usage.get("prompt_tokens_details")
    cached = number(details.get("cached_tokens")) if isinstance(details, dict) else 0
    return Usage(number(usage.get("prompt_tokens")), number(usage.get("completion_tokens")),
                 cached)


def parse_usage(content_type: str, body: bytes) -> Usage | None:
    """Token usage of a JSON answer or of the last SSE chunk that carries one."""
    text = body.decode("utf-8", errors="replace")
    if "text/event-stream" in content_type:
        found = None
        for line in text.splitlines():
            if line.startswith("data:"):
                payload = line[5:].strip()
                if payload and payload != "[DONE]":
                    try:
                        found = _usage_of(json.loads(payload)) or found
                    except ValueError:
                        continue
        return found
    try:
        return _usage_of(json.loads(text))
    except ValueError:
        return None


async def send_probe(session: aiohttp.ClientSession, url: str, body: Mapping[str, Any],
                     timeout_s: float, headers: Mapping[str, str] | None = None) -> ProbeResult:
    """POST the warm-up body; never raises for network or HTTP trouble."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        async with asyncio.timeout(timeout_s):
            async with session.post(url, json=dict(body), headers=dict(headers or {})) as reply:
                first = await reply.content.read(1)
                ttft_ms = (loop.time() - started) * 1000
                content = first
                while len(content) < MAX_BODY_BYTES:
                    chunk = await reply.content.read(MAX_BODY_BYTES - len(content))
                    if not chunk:
                        break
                    content += chunk
                if reply.status >= 500:
                    return ProbeResult(None, reply.status, f"HTTP {reply.status}",
                                       detail=content[:200].decode(errors="replace"))
                usage = parse_usage(reply.headers.get("content-type", ""), content)
                return ProbeResult(ttft_ms, reply.status, usage=usage,
                                   rejected=reply.status >= 400,
                                   detail=content[:200].decode(errors="replace")
                                   if reply.status >= 400 else "")
    except TimeoutError:
        return ProbeResult(None, error=f"timed out after {timeout_s:g} s")
    except (aiohttp.ClientError, OSError) as exc:
        return ProbeResult(None, error=f"{type(exc).__name__}: {exc}" if str(exc)
                           else type(exc).__name__)
