"""The slow-server scenario's pure parts: the simulator's knob, the report's slow-server
numbers, the CLI preset and the prober's command line."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from control_plane.bench.replay import TurnResult
from control_plane.bench.report import (
    Percentiles,
    build_report,
    format_report,
    summarize,
)
from control_plane.bench.run import (
    DEFAULT_SLOW_AT_S,
    DEFAULT_SLOW_TTFT_S,
    DEFAULT_STRATEGIES,
    SLOW_STRATEGIES,
    add_bench_arguments,
    config_from_args,
)
from control_plane.bench.strategies import BY_NAME, HotpathStack, prober_command
from control_plane.bench.workload import SlowServer
from control_plane.runtime.supervisor import ProcessGroup
from control_plane.sim.model import SimParams, SimServer

EXACT = SimParams(jitter=0.0)
PROMPT = [f"t{i}" for i in range(400)]


def test_a_slow_server_delays_every_first_token_from_its_onset() -> None:
    params = dataclasses.replace(EXACT, time_scale=0.5, slow_after_s=10.0, slow_ttft_s=8.0)
    sim = SimServer(params, started_at=100.0)
    before = sim.plan(PROMPT, 4, now=104.9, concurrent=0)  # 4.9 s wall < 10 s x 0.5
    after = sim.plan(PROMPT, 4, now=105.0, concurrent=0)
    assert before.stall_s == 0.0 and not sim.is_slow(104.9)
    assert after.stall_s == pytest.approx(4.0)  # 8 s x 0.5
    assert after.ttft_s == pytest.approx(after.cold_start_s + 4.0 + after.prefill_s)
    # The rest of the answer streams at the usual pace.
    assert after.decode_s == pytest.approx(before.decode_s)
    assert after.total_s - after.ttft_s == pytest.approx(before.total_s - before.ttft_s)


def test_no_slow_ttft_means_never_slow() -> None:
    sim = SimServer(dataclasses.replace(EXACT, slow_after_s=0.0))
    assert not sim.is_slow(1e9)
    assert sim.plan(PROMPT, 2, now=0.0, concurrent=0).stall_s == 0.0


def test_slow_server_needs_a_positive_delay() -> None:
    assert SlowServer(at_s=0.0).ttft_s == DEFAULT_SLOW_TTFT_S
    for bad in ({"at_s": -1.0}, {"at_s": 1.0, "ttft_s": 0.0}):
        with pytest.raises(ValueError):
            SlowServer(**bad)


def _turn(sent_s: float, server: str, ttft_s: float, ok: bool = True) -> TurnResult:
    return TurnResult(session="s", turn=1, sent_at_s=sent_s, ok=ok, status=200,
                      ttft_s=ttft_s if ok else None, e2e_s=ttft_s + 0.1 if ok else None,
                      server=server if ok else None, prompt_tokens=10, cached_tokens=0,
                      completion_tokens=2, reusable_tokens=0)


def test_summarize_reports_turns_after_the_onset_and_the_slow_servers_share() -> None:
    # Wall seconds at time scale 0.1: onset 10 scenario s = 1.0 wall.
    rows = [
        _turn(0.5, "slow", 0.01),  # before the onset: not counted
        _turn(1.0, "slow", 0.81),
        _turn(1.2, "a", 0.01),
        _turn(2.5, "slow", 0.82),  # the last one on it: 25 s, 15 s after the onset
        _turn(3.0, "b", 0.02),
        _turn(3.5, "slow", 0.0, ok=False),  # failed turns are not counted
    ]
    report = summarize("rh", "ring hash", rows, time_scale=0.1, cold_ttft_s=2.0,
                       slow_server="slow", slow_from_s=10.0)
    assert (report.slow_server, report.slow_from_s) == ("slow", 10.0)
    assert report.after_slow_turns == 4 and report.slow_server_turns == 2
    assert report.slow_server_last_s == pytest.approx(15.0)
    assert report.after_slow_ttft_s is not None
    assert report.after_slow_ttft_s.p99 == pytest.approx(8.2, abs=0.01)
    assert report.after_slow_ttft_s.p50 == pytest.approx((0.2 + 8.1) / 2, abs=0.01)
    assert report.cold_hits == 2  # slow turns count as cold hits too (TTFT >= 2 s)

    plain = summarize("rh", "ring hash", rows, time_scale=0.1, cold_ttft_s=2.0)
    assert plain.slow_server is None and plain.after_slow_ttft_s is None


def test_a_strategy_that_avoids_the_slow_server_has_no_last_turn_on_it() -> None:
    report = summarize("x", "x", [_turn(2.0, "a", 0.01)], time_scale=0.1, cold_ttft_s=2.0,
                       slow_server="slow", slow_from_s=10.0)
    assert report.slow_server_turns == 0 and report.slow_server_last_s is None
    assert report.after_slow_ttft_s == Percentiles(0.1, 0.1, 0.1)


def test_report_shows_the_slow_table_and_leaves_the_targets_out() -> None:
    rr = summarize("round_robin", "round robin (Envoy)", [_turn(2.0, "slow", 0.8)],
                   time_scale=0.1, cold_ttft_s=2.0, slow_server="slow", slow_from_s=10.0)
    meta = {"slow_server": {"index": 2, "at_s": 10.0, "ttft_s": 8.0}}
    report = build_report(meta, [rr], [], with_targets=False)
    assert report["targets"] == []
    text = format_report(report)
    assert "Slow server (the last one; every first token +8.0 s from 10.0 s on)" in text
    assert "last one on it, s after" in text and "target" not in text
    assert report["strategies"][0]["slow_server_turns"] == 1

    plain = build_report({}, [summarize("round_robin", "rr", [_turn(2.0, "a", 0.01)],
                                        time_scale=0.1, cold_ttft_s=2.0)], [])
    assert "Slow server" not in format_report(plain)


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    return parser.parse_args(list(argv))


def test_slow_server_preset_and_flags() -> None:
    cfg = config_from_args(_args("--scenario", "slow-server", "--sessions", "20"))
    assert cfg.slow == SlowServer(DEFAULT_SLOW_AT_S, DEFAULT_SLOW_TTFT_S)
    assert cfg.strategies == SLOW_STRATEGIES and not cfg.overhead
    assert cfg.scenario.sessions == 20

    cfg = config_from_args(_args("--slow-server-at", "30", "--slow-ttft", "5",
                                 "--strategies", "ring_hash,ring_hash_traffic"))
    assert cfg.slow == SlowServer(30.0, 5.0)
    assert cfg.strategies == ("ring_hash", "ring_hash_traffic")

    cfg = config_from_args(_args())
    assert cfg.slow is None and cfg.overhead and cfg.strategies == DEFAULT_STRATEGIES
    with pytest.raises(ValueError, match="--slow-ttft"):
        config_from_args(_args("--slow-ttft", "5"))
    assert all(name in BY_NAME for name in SLOW_STRATEGIES)


def test_prober_reads_the_traffic_window_only_when_asked(tmp_path: Path) -> None:
    assert BY_NAME["ring_hash_traffic"].traffic and BY_NAME["ring_hash_traffic"].prober
    assert not BY_NAME["ring_hash_prober"].traffic
    stack = HotpathStack(ProcessGroup(tmp_path), "http://127.0.0.1:2379")
    stack.admin_url, stack.metrics_port = "http://127.0.0.1:9901", 9101
    probes = prober_command(stack)
    assert "--traffic" not in probes and "--admin" in probes
    traffic = prober_command(stack, traffic=True, prefill_ms_per_kib=1.5)
    assert traffic[traffic.index("--traffic") + 1] == "http://127.0.0.1:9101"
    assert traffic[traffic.index("--prefill-ms-per-kib") + 1] == "1.5"
