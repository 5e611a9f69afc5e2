"""The pure simulator model: warmth, prefix cache, timing. Time is passed in explicitly."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from control_plane.sim.model import (
    PrefixCache,
    SimParams,
    SimServer,
    chat_tokens,
    filler_tokens,
    tokenize,
)

EXACT = SimParams(jitter=0.0)  # no noise: durations are exact


def toks(n: int, tag: str = "t") -> list[str]:
    return [f"{tag}{i}" for i in range(n)]


def test_first_request_cold_starts_then_warm() -> None:
    sim = SimServer(EXACT)
    first = sim.plan(toks(100), 4, now=0.0, concurrent=0)
    assert first.cold_start_s == pytest.approx(4.0)
    assert sim.cold_starts == 1
    second = sim.plan(toks(100, "u"), 4, now=first.total_s + 1.0, concurrent=0)
    assert second.cold_start_s == 0.0
    assert sim.cold_starts == 1


def test_requests_during_a_load_wait_for_it_without_a_second_load() -> None:
    sim = SimServer(EXACT)
    sim.plan(toks(10), 1, now=0.0, concurrent=0)
    joined = sim.plan(toks(10, "u"), 1, now=1.5, concurrent=1)
    assert joined.cold_start_s == pytest.approx(2.5)
    assert sim.cold_starts == 1


def test_idle_past_threshold_goes_cold_and_loses_the_cache() -> None:
    sim = SimServer(EXACT)
    prompt = toks(100)
    end = sim.plan(prompt, 2, now=0.0, concurrent=0).total_s
    # Idle is counted from the end of the last request, not its start.
    almost = sim.plan(prompt, 2, now=end + 59.9, concurrent=0)
    assert almost.cold_start_s == 0.0 and almost.cached_tokens == 96
    end = 59.9 + end + almost.total_s
    assert not sim.is_cold(end + 59.9)
    assert sim.is_cold(end + 60.0)
    again = sim.plan(prompt, 2, now=end + 60.0, concurrent=0)
    assert again.cold_start_s == pytest.approx(4.0)
    assert again.cached_tokens == 0
    assert sim.cold_starts == 2


def test_shared_prefix_hits_full_blocks_only() -> None:
    sim = SimServer(EXACT)
    assert sim.plan(toks(100), 1, now=0.0, concurrent=0).cached_tokens == 0
    # 40 shared tokens = 2 full blocks of 16; the partial third block never matches.
    diverging = toks(40) + toks(60, "x")
    assert sim.plan(diverging, 1, now=10.0, concurrent=0).cached_tokens == 32
    assert sim.plan(toks(100, "other"), 1, now=20.0, concurrent=0).cached_tokens == 0


def test_identical_prompt_recomputes_its_last_token() -> None:
    sim = SimServer(EXACT)
    sim.plan(toks(64), 1, now=0.0, concurrent=0)
    # 64 tokens are 4 full blocks, but the last token must be computed: 3 blocks hit.
    assert sim.plan(toks(64), 1, now=10.0, concurrent=0).cached_tokens == 48


def test_next_chat_turn_hits_the_previous_answer() -> None:
    sim = SimServer(EXACT)
    turn1 = [("system", "You are terse. " * 20), ("user", "Hello there, how are you?")]
    prompt1 = chat_tokens(turn1)
    plan1 = sim.plan(prompt1, 40, now=0.0, concurrent=0)
    answer = " ".join(plan1.completion)
    turn2 = [*turn1, ("assistant", answer), ("user", "And now?")]
    plan2 = sim.plan(chat_tokens(turn2), 4, now=10.0, concurrent=0)
    # Prompt and answer (minus its sampled last token) are cached, in full blocks.
    assert plan2.cached_tokens == (len(prompt1) + 40 - 1) // 16 * 16


def test_lru_evicts_least_recently_used_prompt() -> None:
    sim = SimServer(dataclasses.replace(EXACT, cache_tokens=64))  # 4 blocks
    a, b, c = toks(33, "a"), toks(33, "b"), toks(33, "c")  # 2 full blocks each
    for i, prompt in enumerate((a, b, a, c)):  # re-using a makes b the LRU one
        sim.plan(prompt, 1, now=float(i), concurrent=0)
    assert len(sim.cache) == 4
    assert sim.cache.match(sim.cache.block_keys(a)) == 2
    assert sim.cache.match(sim.cache.block_keys(c)) == 2
    assert sim.cache.match(sim.cache.block_keys(b)) == 0


def test_eviction_keeps_the_head_of_a_chain_that_does_not_fit() -> None:
    sim = SimServer(dataclasses.replace(EXACT, cache_tokens=64))  # 4 blocks
    prompt = toks(200)
    sim.plan(prompt, 1, now=0.0, concurrent=0)
    assert sim.plan(prompt, 1, now=10.0, concurrent=0).cached_tokens == 64


def test_zero_capacity_caches_nothing() -> None:
    sim = SimServer(dataclasses.replace(EXACT, cache_tokens=0))
    sim.plan(toks(100), 1, now=0.0, concurrent=0)
    assert sim.plan(toks(100), 1, now=10.0, concurrent=0).cached_tokens == 0
    assert sim.cache.usage == 0.0


def test_prefill_is_proportional_to_uncached_tokens() -> None:
    sim = SimServer(EXACT)
    short = sim.plan(toks(1600, "s"), 1, now=0.0, concurrent=0)
    long = sim.plan(toks(3200, "l"), 1, now=10.0, concurrent=0)
    assert short.prefill_s == pytest.approx(1600 * 0.25e-3)
    assert long.prefill_s == pytest.approx(2 * short.prefill_s)
    extended = sim.plan(toks(3200, "l") + toks(800, "e"), 1, now=20.0, concurrent=0)
    assert extended.cached_tokens == 3200
    assert extended.prefill_s == pytest.approx(800 * 0.25e-3)


def test_fully_cached_prefill_still_costs_one_forward_pass() -> None:
    sim = SimServer(EXACT)
    sim.plan(toks(1600), 1, now=0.0, concurrent=0)
    hit = sim.plan(toks(1600), 1, now=10.0, concurrent=0)
    assert hit.prefill_s == pytest.approx(hit.decode_s)


def test_timeline_adds_up() -> None:
    plan = SimServer(EXACT).plan(toks(400), 10, now=0.0, concurrent=0)
    assert len(plan.completion) == 10
    assert plan.decode_s == pytest.approx(0.020)
    assert plan.ttft_s == pytest.approx(plan.cold_start_s + plan.prefill_s)
    assert plan.total_s == pytest.approx(plan.ttft_s + 9 * plan.decode_s)


def test_concurrency_slows_prefill_and_decode() -> None:
    alone = SimServer(EXACT).plan(toks(1600), 4, now=0.0, concurrent=0)
    busy = SimServer(EXACT).plan(toks(1600), 4, now=0.0, concurrent=2)
    assert busy.decode_s == pytest.approx(alone.decode_s * 1.3)
    assert busy.prefill_s == pytest.approx(alone.prefill_s * 1.3)


def test_time_scale_scales_every_duration_including_idle() -> None:
    params = dataclasses.replace(EXACT, time_scale=0.1)
    full = SimServer(EXACT).plan(toks(1600), 4, now=0.0, concurrent=0)
    sim = SimServer(params)
    fast = sim.plan(toks(1600), 4, now=0.0, concurrent=0)
    assert fast.cold_start_s == pytest.approx(full.cold_start_s * 0.1)
    assert fast.prefill_s == pytest.approx(full.prefill_s * 0.1)
    assert fast.decode_s == pytest.approx(full.decode_s * 0.1)
    assert not sim.is_cold(fast.total_s + 5.9)
    assert sim.is_cold(fast.total_s + 6.0)


def test_same_seed_repeats_and_jitter_stays_in_bounds() -> None:
    def run(seed: int) -> list[float]:
        sim = SimServer(SimParams(seed=seed, jitter=0.2))
        plans = [sim.plan(toks(500, str(i)), 3, now=i * 10.0, concurrent=0) for i in range(20)]
        return [p.total_s for p in plans]

    assert run(7) == run(7)
    assert run(7) != run(8)
    decodes = [SimServer(SimParams(seed=s, jitter=0.2)).plan(toks(5), 1, 0.0, 0) for s in range(50)]
    assert all(0.016 - 1e-12 <= p.decode_s <= 0.024 + 1e-12 for p in decodes)
    assert len({p.decode_s for p in decodes}) > 1


def test_tokenizer_and_filler_round_trip() -> None:
    assert tokenize("Hello, world!") == ["Hell", "o", ",", "worl", "d", "!"]
    answer = filler_tokens(toks(10), 50)
    assert answer == filler_tokens(toks(10), 50)
    assert answer != filler_tokens(toks(11), 50)
    # The answer text re-tokenizes to the same tokens, so the next turn can hit it.
    assert tokenize(" ".join(answer)) == list(answer)


@pytest.mark.parametrize(
    "bad",
    [
        {"block_size": 0},
        {"time_scale": 0.0},
        {"decode_ms_per_token": -1.0},
        {"jitter": 1.0},
        {"idle_to_cold_s": 0.0},
        {"default_max_tokens": 10, "max_tokens_cap": 5},
    ],
)
def test_invalid_params_are_rejected(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        SimParams(**bad)  # type: ignore[arg-type]


def test_max_tokens_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_tokens"):
        SimServer(EXACT).plan(toks(5), 0, now=0.0, concurrent=0)


@given(
    prompts=st.lists(st.lists(st.sampled_from("abc"), max_size=80), min_size=1, max_size=15),
    capacity=st.integers(min_value=0, max_value=200),
    block=st.integers(min_value=1, max_value=8),
)
def test_cache_invariants(prompts: list[list[str]], capacity: int, block: int) -> None:
    sim = SimServer(dataclasses.replace(EXACT, cache_tokens=capacity, block_size=block))
    for i, prompt in enumerate(prompts):
        plan = sim.plan(prompt, 3, now=float(i), concurrent=0)
        assert plan.cached_tokens % block == 0
        assert 0 <= plan.cached_tokens <= max(len(prompt) - 1, 0)
        assert len(sim.cache) <= capacity // block


def test_prefix_cache_match_stops_at_first_miss() -> None:
    cache = PrefixCache(capacity_tokens=160, block_size=4)
    keys = cache.block_keys(toks(12))
    cache.insert(keys[:2])
    assert cache.match(keys) == 2
    # A block's key depends on its whole prefix: same tokens after a different head differ.
    assert cache.block_keys(toks(4, "z") + toks(12)[4:8])[1] != keys[1]
