"""Pure timing and prefix-cache model of one GPU model server (no IO, no asyncio).

Callers pass a monotonic `now` in seconds. Every duration in a `Plan` is already multiplied by
`SimParams.time_scale`, so the shell sleeps exactly what the plan says.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class SimParams:
    """Defaults approximate a 7B model on one datacenter GPU."""

    prefill_ms_per_token: float = 0.25  # uncached prompt tokens; cached ones cost nothing
    decode_ms_per_token: float = 20.0  # one decode step; also the floor of any forward pass
    cold_start_s: float = 4.0  # weights load + CUDA graph capture
    idle_to_cold_s: float = 60.0  # idle this long after the last request ends -> cold again
    cache_tokens: int = 20_000  # KV prefix cache capacity
    block_size: int = 16  # tokens per KV block; only full blocks are cached (as in vLLM)
    concurrency_slowdown: float = 0.15  # +15% step time per other running request
    max_running: int = 16  # like vLLM's max_num_seqs: more requests wait in a queue
    jitter: float = 0.05  # each request's durations scale by uniform(1 - jitter, 1 + jitter)
    time_scale: float = 1.0  # multiplies every duration: 0.1 runs ten times faster
    seed: int = 0
    default_max_tokens: int = 16
    max_tokens_cap: int = 4096  # larger max_tokens are clamped to this
    # A server that turns slow while it serves (a wedged engine, a throttled GPU): from
    # slow_after_s after it started, every request's first token comes slow_ttft_s later
    # than it otherwise would (headers still go out at once). slow_ttft_s 0: never slow.
    slow_after_s: float = 0.0
    slow_ttft_s: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name != "seed" and value < 0:
                raise ValueError(f"{f.name} must be >= 0, got {value}")
        for name in ("block_size", "max_running", "default_max_tokens", "time_scale"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.idle_to_cold_s <= 0:
            raise ValueError(f"idle_to_cold_s must be > 0, got {self.idle_to_cold_s}")
        if self.jitter >= 1:
            raise ValueError(f"jitter must be < 1, got {self.jitter}")
        if self.default_max_tokens > self.max_tokens_cap:
            raise ValueError("default_max_tokens must not exceed max_tokens_cap")


# Words split into pieces of up to 4 characters, each punctuation character its own token and
# whitespace dropped: about 1.3 tokens per English word, close to a BPE tokenizer.
_TOKEN_RE = re.compile(r"\w{1,4}|[^\w\s]")

# Chat template markers (ChatML); each is one special token.
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

# Filler words are single tokens (at most 4 word characters), so the text of an answer re-tokenizes
# to exactly the generated tokens and the next turn's prompt hits the cached answer blocks.
_FILLER = (
    "the", "warm", "gpu", "kept", "this", "chat", "fast", "and", "its", "kv", "hot", "path",
    "so", "each", "turn", "hits", "same", "node", "with", "less", "wait", "on", "a", "long", "tail",
)  # fmt: skip


def tokenize(text: str) -> list[str]:
    return _TOKEN_RE.findall(text)


def chat_tokens(messages: Sequence[tuple[str, str]]) -> list[str]:
    """Tokens of (role, text) messages under a ChatML template, ending with the generation
    prompt, so a conversation's next turn extends the previous turn's prompt and answer."""
    tokens: list[str] = []
    for role, text in messages:
        tokens += [IM_START, role, *tokenize(text), IM_END]
    return [*tokens, IM_START, "assistant"]


def filler_tokens(prompt: Sequence[str], n: int) -> tuple[str, ...]:
    """Deterministic answer of n tokens that differs between prompts."""
    digest = hashlib.blake2b("\x00".join(prompt).encode(), digest_size=4).digest()
    start = int.from_bytes(digest, "big")
    # 7 is coprime with the vocabulary size, so the answer walks through every word.
    return tuple(_FILLER[(start + 7 * i) % len(_FILLER)] for i in range(n))


class PrefixCache:
    """Automatic prefix caching as in vLLM: each full block's key hashes its parent's key and its
    tokens, so a block only matches together with its whole prefix. LRU eviction by block."""

    def __init__(self, capacity_tokens: int, block_size: int) -> None:
        self.block_size = block_size
        self.capacity_blocks = capacity_tokens // block_size
        self._blocks: OrderedDict[bytes, None] = OrderedDict()  # least recently used first

    def __len__(self) -> int:
        return len(self._blocks)

    def block_keys(self, tokens: Sequence[str]) -> list[bytes]:
        keys: list[bytes] = []
        parent = b""
        for start in range(0, len(tokens) - self.block_size + 1, self.block_size):
            block = "\x00".join(tokens[start : start + self.block_size]).encode()
            parent = hashlib.blake2b(parent + block, digest_size=16).digest()
            keys.append(parent)
        return keys

    def match(self, keys: Sequence[bytes]) -> int:
        """Number of leading keys that are cached."""
        for i, key in enumerate(keys):
            if key not in self._blocks:
                return i
        return len(keys)

    def insert(self, keys: Sequence[bytes]) -> None:
        # Touch the chain tail first so that it is evicted before its head, as vLLM frees a
        # request's blocks in reverse order: a surviving head keeps matching, a lone tail cannot.
        for key in reversed(keys):
            self._blocks[key] = None
            self._blocks.move_to_end(key)
        while len(self._blocks) > self.capacity_blocks:
            self._blocks.popitem(last=False)

    def clear(self) -> None:
        self._blocks.clear()

    @property
    def usage(self) -> float:
        """Fraction of the capacity in use, 0..1."""
        return len(self._blocks) / self.capacity_blocks if self.capacity_blocks else 0.0


@dataclass(frozen=True)
class Plan:
    """Timeline of one request, in wall-clock seconds from its admission."""

    prompt_tokens: int
    cached_tokens: int
    completion: tuple[str, ...]
    cold_start_s: float  # waiting for the model to load (0 when warm)
    prefill_s: float  # the forward pass over the prompt; it yields the first token
    decode_s: float  # per further token
    stall_s: float = 0.0  # a slow server's extra wait before the first token

    @property
    def ttft_s(self) -> float:
        return self.cold_start_s + self.stall_s + self.prefill_s

    @property
    def total_s(self) -> float:
        return self.token_at_s(len(self.completion) - 1) if self.completion else self.ttft_s

    def token_at_s(self, index: int) -> float:
        """When completion token `index` is ready."""
        return self.ttft_s + index * self.decode_s


class SimServer:
    """State of one simulated model server: warmth, prefix cache, counters."""

    def __init__(self, params: SimParams, started_at: float = 0.0) -> None:
        self.params = params
        self.started_at = started_at  # on the callers' clock; slow_after_s counts from it
        self.cache = PrefixCache(params.cache_tokens, params.block_size)
        self._rng = random.Random(params.seed)
        self._busy_until: float | None = None  # planned end of the latest request; None: never
        self._warm_at = 0.0  # when the latest model load finishes
        self.cold_starts = 0
        self.prompt_tokens_total = 0
        self.cached_tokens_total = 0

    def is_cold(self, now: float) -> bool:
        """Whether a request arriving now starts a model load."""
        if self._busy_until is None:
            return True
        return now - self._busy_until >= self.params.idle_to_cold_s * self.params.time_scale

    def is_slow(self, now: float) -> bool:
        """Whether a request admitted now waits slow_ttft_s longer for its first token."""
        p = self.params
        return p.slow_ttft_s > 0 and now - self.started_at >= p.slow_after_s * p.time_scale

    def plan(self, prompt: Sequence[str], max_tokens: int, now: float, concurrent: int) -> Plan:
        """Admit a request at `now` with `concurrent` other requests running, and update the
        cache and warmth as if it ran to completion. The slowdown is fixed at admission."""
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        p = self.params
        noise = self._rng.uniform(1 - p.jitter, 1 + p.jitter) * p.time_scale
        if self.is_cold(now):
            self.cold_starts += 1
            self.cache.clear()  # a reloaded model starts with empty GPU memory
            self._warm_at = now + p.cold_start_s * noise
        # Requests arriving during a load wait for the same load instead of starting another.
        cold_start_s = max(0.0, self._warm_at - now)

        completion = filler_tokens(prompt, max_tokens)
        # The last generated token is sampled, never fed back, so it has no KV to cache.
        keys = self.cache.block_keys([*prompt, *completion[:-1]])
        # vLLM always recomputes the last prompt token (its logits give the first output token).
        cached = self.cache.match(keys[: max(len(prompt) - 1, 0) // p.block_size]) * p.block_size
        self.cache.insert(keys)

        slowdown = (1 + p.concurrency_slowdown * concurrent) * noise
        decode_s = p.decode_ms_per_token / 1000 * slowdown
        # A forward pass never costs less than one decode step (weights are read once per pass).
        prefill_s = max(decode_s, (len(prompt) - cached) * p.prefill_ms_per_token / 1000 * slowdown)
        stall_s = p.slow_ttft_s * noise if self.is_slow(now) else 0.0
        plan = Plan(len(prompt), cached, completion, cold_start_s, prefill_s, decode_s, stall_s)

        end = now + plan.total_s
        self._busy_until = end if self._busy_until is None else max(self._busy_until, end)
        self.prompt_tokens_total += len(prompt)
        self.cached_tokens_total += cached
        return plan
