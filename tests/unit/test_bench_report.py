"""The bench's pure parts: statistics, the report's shape, wrk parsing, peer configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from control_plane.bench.overhead import parse_wrk, request_body, with_added, wrk_script
from control_plane.bench.peers import PEER_BY_NAME, nginx_conf, peer_command
from control_plane.bench.replay import TurnResult
from control_plane.bench.report import (
    OverheadReport,
    ServerCounters,
    build_report,
    format_report,
    percentile,
    summarize,
    targets,
    unavailable,
    write_json,
)
from control_plane.bench.strategies import Backend, parse_sim_metrics
from control_plane.sim.model import SimParams
from control_plane.sim.server import SimState, render_metrics


def turn(session: str, index: int, *, ttft: float = 0.01, e2e: float = 0.1,
         cached: int = 0, reusable: int = 0, server: str = "a", ok: bool = True,
         prompt: int = 100, completion: int = 10) -> TurnResult:
    return TurnResult(session=session, turn=index, sent_at_s=float(index), ok=ok,
                      status=200 if ok else 503, ttft_s=ttft if ok else None,
                      e2e_s=e2e if ok else None, server=server if ok else None,
                      prompt_tokens=prompt, cached_tokens=cached, completion_tokens=completion,
                      reusable_tokens=reusable, error=None if ok else "503 no upstream")


def test_percentile_interpolates_like_numpy() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile(list(map(float, range(101))), 95) == pytest.approx(95.0)


def test_summarize_scales_times_and_counts_hits_cold_and_servers() -> None:
    rows = [
        turn("s1", 0, ttft=0.3, e2e=0.5, server="a"),  # 0.3 wall = 3 s scenario: cold
        turn("s1", 1, cached=104, reusable=110, server="a"),  # hit (>= 90% of 110)
        turn("s2", 0, server="b"),
        turn("s2", 1, cached=16, reusable=110, server="c"),  # miss
        turn("s3", 0, ok=False),
    ]
    report = summarize("rr", "round robin", rows, time_scale=0.1, cold_ttft_s=2.0)
    assert (report.turns, report.ok, report.errors) == (5, 4, 1)
    assert report.first_error == "503 no upstream"
    assert report.ttft_s.p99 is not None and report.ttft_s.p99 <= 3.0 + 1e-9
    assert report.e2e_s.p50 == pytest.approx(1.0)
    assert report.cold_hits == 1
    assert report.prefix_hit_ratio == pytest.approx((104 + 16) / 220)
    assert report.returning_turns_hit == pytest.approx(0.5)
    assert report.per_server == {"a": 2, "b": 1, "c": 1}
    assert report.cold_starts is None and report.probe_requests is None


def test_server_counters_give_probe_cost_and_loads() -> None:
    rows = [turn("s1", 0), turn("s1", 1, cached=90, reusable=100)]
    servers = {"a": ServerCounters(requests=5, prompt_tokens=300, generation_tokens=22,
                                   cold_starts=1),
               "b": ServerCounters(requests=0, prompt_tokens=0, generation_tokens=0,
                                   cold_starts=0)}
    report = summarize("rh", "ring hash", rows, time_scale=1, cold_ttft_s=2, servers=servers)
    assert report.cold_starts == 1
    assert report.probe_requests == 3
    assert report.probe_tokens == 322 - 2 * 110


def test_sim_metrics_parse_into_counters() -> None:
    state = SimState(SimParams(), "sim-0", ["m"])
    state.sim.plan(["a"] * 40, 4, now=0.0, concurrent=0)
    state.ttft.observe(0.5)
    state.generation_tokens = 4
    counters = parse_sim_metrics(render_metrics(state))
    assert counters == ServerCounters(requests=1, prompt_tokens=40, generation_tokens=4,
                                      cold_starts=1)


def test_targets_compare_hotpath_with_round_robin_oracle_and_peers() -> None:
    def strat(name: str, p95: float, hit: float) -> object:
        rows = [turn("s", 0, e2e=p95), turn("s", 1, e2e=p95, cached=int(hit * 100),
                                             reusable=100)]
        return summarize(name, name, rows, time_scale=1, cold_ttft_s=99)

    strategies = [strat("round_robin", 4.0, 0.3), strat("ring_hash", 1.2, 0.99),
                  strat("oracle", 1.1, 1.0), unavailable("ring_hash_prober", "p", "absent")]
    overhead = [OverheadReport("hotpath", "h", p50_ms=0.3, p99_ms=1.0, rps=20_000),
                OverheadReport("nginx-hash", "n", p50_ms=0.1, p99_ms=0.5, rps=40_000),
                OverheadReport("vllm-router", "v", p50_ms=0.3, p99_ms=2.0, rps=10_000)]
    found = {t.what: t for t in targets(strategies, overhead)}  # type: ignore[arg-type]
    assert found["ring_hash p95 e2e / round_robin"].value == pytest.approx(0.3)
    assert found["ring_hash p95 e2e / round_robin"].met is True
    assert found["ring_hash p95 e2e / oracle"].met is True
    assert found["ring_hash prefix-cache hit ratio, returning turns"].met is True
    assert found["hotpath throughput / vllm-router"].value == pytest.approx(2.0)
    assert found["hotpath throughput / nginx-hash"].met is False
    assert found["hotpath p99 - nginx-hash p99 (ms, 1 connection)"].met is True
    assert not any(t.startswith("ring_hash_prober") for t in found)


def test_report_json_and_table(tmp_path: Path) -> None:
    rows = [turn("s1", 0), turn("s1", 1, cached=90, reusable=100)]
    strategies = [summarize("ring_hash", "hotpath ring hash", rows, time_scale=0.1,
                            cold_ttft_s=2), unavailable("vllm-router", "vllm-router", "absent")]
    overhead = with_added([OverheadReport("direct", "direct", p50_ms=0.1, p99_ms=0.2, rps=9e4),
                           OverheadReport("hotpath", "hotpath", p50_ms=0.3, p99_ms=0.9,
                                          rps=3e4)])
    assert overhead[1].added_p50_ms == pytest.approx(0.2)
    report = build_report({"title": "t", "time_scale": 0.1}, strategies, overhead)
    text = format_report(report)
    assert "hotpath ring hash" in text and "vllm-router: not run: absent" in text
    assert "30,000" in text
    write_json(report, tmp_path / "bench.json")
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["schema"] == "hotpath-bench/1"
    assert not any(k.endswith("_obj") for k in data)
    first = data["strategies"][0]
    assert set(first["ttft_s"]) == {"p50", "p95", "p99"}
    assert first["prefix_hit_ratio"] == pytest.approx(0.9)
    assert data["strategies"][1]["available"] is False
    assert data["overhead"][1]["added_p99_ms"] == pytest.approx(0.7)


def test_wrk_script_and_output() -> None:
    body = request_body("m")
    assert json.loads(body)["model"] == "m" and 800 < len(body) < 2048
    script = wrk_script(body)
    assert body in script and 'headers["x-session-id"]' in script
    result = parse_wrk("Running 5s test\nBENCH {\"requests\":1000,\"duration_us\":2000000,"
                       "\"p50_us\":250,\"p99_us\":1250,\"errors\":2}\n")
    assert result.rps == 500 and result.p50_ms == 0.25 and result.p99_ms == 1.25
    assert result.errors == 2


def test_peer_configs_hash_on_the_session_header(tmp_path: Path) -> None:
    backends = [Backend("a", "127.0.0.1", 8001), Backend("b", "127.0.0.1", 8002)]
    conf = nginx_conf(tmp_path, 9000, backends)
    assert "hash $http_x_session_id consistent;" in conf
    assert "server 127.0.0.1:8002;" in conf and "listen 127.0.0.1:9000;" in conf
    assert "proxy_buffering off;" in conf
    vllm = peer_command(PEER_BY_NAME["vllm-router"], "vllm-router", tmp_path, 9001, backends)
    assert vllm[vllm.index("--policy") + 1] == "consistent_hash"
    assert "http://127.0.0.1:8001" in vllm and vllm[vllm.index("--host") + 1] == "127.0.0.1"
    sglang = peer_command(PEER_BY_NAME["sglang-router"], "sglang-router", tmp_path, 9002,
                          backends)
    assert sglang[:2] == ["sglang-router", "launch"]
