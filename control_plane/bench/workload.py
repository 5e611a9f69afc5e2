"""Seeded multi-turn chat workload: who says what, when. Pure: no IO, no clock.

Times are scenario seconds (what a user would see on real hardware); the replay multiplies them
by the simulator's time_scale. Text is built from words of at most four letters, each one token
under the simulator's tokenizer, so token counts here are the counts the simulator sees (a real
BPE tokenizer sees about the same order of magnitude).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

# Short English words: one simulator token each.
_WORDS = (
    "the", "a", "of", "to", "and", "in", "is", "it", "you", "that", "for", "on", "are", "with",
    "as", "be", "this", "have", "from", "or", "one", "had", "by", "word", "but", "not", "what",
    "all", "were", "we", "when", "your", "can", "said", "use", "each", "she", "do", "how",
    "if", "will", "up", "out", "many", "then", "them", "so", "some", "her", "make", "like",
    "him", "into", "time", "has", "look", "two", "more", "go", "see", "no", "way", "cold",
    "my", "than", "been", "call", "who", "its", "now", "find", "long", "down", "day", "did",
    "get", "come", "made", "may", "part", "over", "new", "take", "only", "work", "know",
    "year", "live", "me", "back", "give", "most", "very", "good", "man", "our", "just", "name",
    "form", "much", "line", "turn", "move", "code", "data", "file", "list", "test", "bug",
    "log", "node", "pod", "disk", "load", "port", "key", "row", "sum", "map", "loop", "step",
)  # fmt: skip


@dataclass(frozen=True)
class Scenario:
    """A chat application's traffic. Defaults: a support/coding assistant with a long shared
    system prompt, a first message that often pastes something, short follow-ups."""

    sessions: int = 25  # deliberately not a multiple of the usual 3 servers
    min_turns: int = 4
    max_turns: int = 8
    arrival_window_s: float = 420.0  # sessions start at uniform random times in this window
    min_think_s: float = 5.0  # user reads the answer and types the next message
    max_think_s: float = 20.0
    system_tokens: int = 1200  # shared by every session (same app, same instructions)
    min_first_tokens: int = 150  # first message: a question, often with pasted context
    max_first_tokens: int = 600
    min_followup_tokens: int = 20
    max_followup_tokens: int = 150
    min_answer_tokens: int = 32  # max_tokens asked for; the simulator always generates them all
    max_answer_tokens: int = 160
    seed: int = 0

    def __post_init__(self) -> None:
        if self.sessions < 1:
            raise ValueError(f"sessions must be >= 1, got {self.sessions}")
        for low, high in (("min_turns", "max_turns"), ("min_think_s", "max_think_s"),
                          ("min_first_tokens", "max_first_tokens"),
                          ("min_followup_tokens", "max_followup_tokens"),
                          ("min_answer_tokens", "max_answer_tokens")):
            lo, hi = getattr(self, low), getattr(self, high)
            if lo < 0 or hi < lo:
                raise ValueError(f"need 0 <= {low} <= {high}, got {lo} and {hi}")
        if self.min_turns < 1 or self.min_answer_tokens < 1 or self.min_first_tokens < 1:
            raise ValueError("min_turns, min_first_tokens and min_answer_tokens must be >= 1")
        if self.arrival_window_s < 0 or self.system_tokens < 0:
            raise ValueError("arrival_window_s and system_tokens must be >= 0")


@dataclass(frozen=True)
class SlowServer:
    """One server turns slow while it serves: from `at_s` scenario seconds after the first
    session on, every first token it sends comes `ttft_s` later (headers still at once, as a
    wedged vLLM does). It is the last server of the pool, in every strategy."""

    at_s: float
    ttft_s: float = 8.0

    def __post_init__(self) -> None:
        if self.at_s < 0 or self.ttft_s <= 0:
            raise ValueError(f"need a slow server at >= 0 s with a TTFT > 0 s, got at "
                             f"{self.at_s} s and {self.ttft_s} s")


@dataclass(frozen=True)
class ServersJoin:
    """The fleet grows while sessions are active: the last `servers` of the pool's servers
    join `at_s` scenario seconds after the first session (before it only the others serve).
    `session_ttl_s` is the pool's `session_ttl_s` in scenario seconds: the bench writes it
    times the time scale, since the control plane counts it on the wall clock."""

    at_s: float
    servers: int = 2
    session_ttl_s: float = 600.0

    def __post_init__(self) -> None:
        if self.at_s < 0 or self.servers < 1 or self.session_ttl_s <= 0:
            raise ValueError(f"need a join at >= 0 s of >= 1 server with a session TTL > 0 s, "
                             f"got {self.at_s} s, {self.servers} and {self.session_ttl_s} s")


@dataclass(frozen=True)
class Turn:
    user: str
    max_tokens: int
    think_s: float  # pause after the previous answer ended (0 for the first turn)


@dataclass(frozen=True)
class Session:
    id: str
    index: int
    start_s: float
    turns: tuple[Turn, ...]


@dataclass(frozen=True)
class Workload:
    scenario: Scenario
    system_prompt: str
    sessions: tuple[Session, ...] = field(default_factory=tuple)

    @property
    def turn_count(self) -> int:
        return sum(len(s.turns) for s in self.sessions)


def _text(rng: random.Random, tokens: int) -> str:
    words = [rng.choice(_WORDS) for _ in range(tokens)]
    # A full stop every dozen words; punctuation is a token of its own, so keep it rare.
    for i in range(11, len(words), 12):
        words[i] += "."
    return " ".join(words)


def generate(scenario: Scenario, salt: str = "") -> Workload:
    """The same scenario (seed included) always yields the same workload. A salt changes the
    system prompt's first words and nothing else, so runs against the same real servers share
    no cached prefix and still see the same lengths and times."""
    rng = random.Random(scenario.seed)
    opening = f"You are assistant {salt}." if salt else "You are a helpful assistant."
    system_prompt = opening + " " + _text(rng, scenario.system_tokens)
    starts = sorted(rng.uniform(0, scenario.arrival_window_s) for _ in range(scenario.sessions))
    offset = starts[0]  # the first session opens the run: no idle lead-in
    sessions = []
    for index, start in enumerate(starts):
        turns = []
        for t in range(rng.randint(scenario.min_turns, scenario.max_turns)):
            first = t == 0
            n = (rng.randint(scenario.min_first_tokens, scenario.max_first_tokens) if first
                 else rng.randint(scenario.min_followup_tokens, scenario.max_followup_tokens))
            # The index in the text keeps first messages (and so derived session keys) distinct.
            user = f"s{index} " + _text(rng, n) if first else _text(rng, n)
            think = 0.0 if first else rng.uniform(scenario.min_think_s, scenario.max_think_s)
            max_tokens = rng.randint(scenario.min_answer_tokens, scenario.max_answer_tokens)
            turns.append(Turn(user, max_tokens, think))
        sessions.append(Session(f"chat-{scenario.seed}-{index:04d}", index, start - offset,
                                tuple(turns)))
    return Workload(scenario, system_prompt, tuple(sessions))


def messages(system_prompt: str, turns: list[Turn], answers: list[str]) -> list[dict[str, str]]:
    """The chat request for the next turn: the system prompt, then every earlier user message
    and the answer it got, then the newest user message (len(turns) == len(answers) + 1)."""
    if len(turns) != len(answers) + 1:
        raise ValueError("need exactly one more turn than answers")
    out = [{"role": "system", "content": system_prompt}]
    for turn, answer in zip(turns, answers, strict=False):
        out += [{"role": "user", "content": turn.user}, {"role": "assistant", "content": answer}]
    out.append({"role": "user", "content": turns[-1].user})
    return out


def balanced_assignment(workload: Workload, servers: int) -> dict[str, int]:
    """Session -> server for the oracle: sessions dealt in arrival order, so every server gets
    an equal share (off by one at most) of sessions spread evenly over time."""
    if servers < 1:
        raise ValueError("servers must be >= 1")
    return {s.id: s.index % servers for s in workload.sessions}


def join_assignment(workload: Workload, initial: int, total: int, at_s: float
                    ) -> dict[str, int]:
    """Session -> server for the oracle while servers join: each session stays on the server
    it was dealt when it arrived, dealt in arrival order over the servers present then: the
    first `initial` before `at_s` (scenario seconds), all `total` from then on."""
    if not 1 <= initial <= total:
        raise ValueError(f"need 1 <= initial <= total servers, got {initial} and {total}")
    return {s.id: s.index % (initial if s.start_s < at_s else total)
            for s in workload.sessions}
