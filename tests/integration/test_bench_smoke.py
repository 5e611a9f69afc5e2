"""`hotpath bench` end to end on a tiny scenario: real etcd, control plane, Envoy and simulated
servers, seconds long. No session header is sent, so ring hash pins on the key the Lua filter
derives from the prompt (what a chat app gets without client changes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from control_plane.bench import BenchConfig, run_bench
from control_plane.bench.report import format_report, write_json
from control_plane.bench.workload import Scenario, ServersJoin, SlowServer
from control_plane.sim.model import SimParams
from tests.harness import Etcd

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

TINY = Scenario(sessions=7, min_turns=3, max_turns=3, arrival_window_s=6, min_think_s=1,
                max_think_s=2, system_tokens=60, min_first_tokens=150, max_first_tokens=250,
                min_followup_tokens=20, max_followup_tokens=40, min_answer_tokens=8,
                max_answer_tokens=16, seed=7)


async def test_bench_smoke_ring_hash_beats_round_robin_on_cache_hits(
        tmp_path: Path, etcd_server: Etcd, prefix: str) -> None:
    cfg = BenchConfig(
        scenario=TINY, servers=3,
        sim=SimParams(time_scale=0.1, cold_start_s=2.0, idle_to_cold_s=60.0, seed=7),
        strategies=("round_robin", "ring_hash", "ring_hash_prober", "oracle"),
        session_header=False, deadline_s=60, overhead=False, etcd=etcd_server.url,
        prefix=prefix, out_dir=tmp_path)
    report = await run_bench(cfg, progress_out=None)

    write_json(report, tmp_path / "bench.json")
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["schema"] == "hotpath-bench/1"
    assert data["turns"] == 21 and data["time_scale"] == 0.1
    by = {s["name"]: s for s in data["strategies"]}
    assert list(by) == ["round_robin", "ring_hash", "ring_hash_prober", "oracle"]
    for name in ("round_robin", "ring_hash", "oracle"):
        s = by[name]
        assert s["available"] and s["ok"] == s["turns"] == 21, s
        for key in ("ttft_s", "e2e_s"):
            assert all(s[key][q] is not None and s[key][q] > 0 for q in ("p50", "p95", "p99"))
        assert sum(s["per_server"].values()) == 21
        assert s["cold_starts"] is not None and s["probe_requests"] is not None
    assert by["ring_hash_prober"]["available"] or by["ring_hash_prober"]["note"]

    rr, rh = by["round_robin"], by["ring_hash"]
    assert rh["prefix_hit_ratio"] > rr["prefix_hit_ratio"], (rh, rr)
    assert rh["prefix_hit_ratio"] >= 0.9
    assert by["oracle"]["cold_hits"] == 0
    assert data["targets"], "the issue's targets are reported"


async def test_bench_smoke_slow_server_turns_slow_mid_run(
        tmp_path: Path, etcd_server: Etcd, prefix: str) -> None:
    """The slow-server scenario end to end: the last server's first tokens come 4 s late
    from 5 s on, through Envoy (round robin reaches it for sure), and the traffic-warmth
    variant runs with its own stack (traffic stream on, prober reading /traffic)."""
    cfg = BenchConfig(
        scenario=TINY, servers=3,
        sim=SimParams(time_scale=0.1, cold_start_s=2.0, idle_to_cold_s=60.0, seed=7),
        strategies=("round_robin", "ring_hash_traffic"), slow=SlowServer(at_s=5.0, ttft_s=4.0),
        session_header=False, deadline_s=60, overhead=False, etcd=etcd_server.url,
        prefix=prefix, out_dir=tmp_path)
    report = await run_bench(cfg, progress_out=None)

    assert report["slow_server"] == {"index": 2, "at_s": 5.0, "ttft_s": 4.0}
    assert report["targets"] == []
    by = {s["name"]: s for s in report["strategies"]}
    for name in ("round_robin", "ring_hash_traffic"):
        s = by[name]
        assert s["available"] and s["ok"] == s["turns"] == 21, s
        assert s["slow_server"] == "sim-" + name + "-slow-0"
        assert s["slow_from_s"] == pytest.approx(5.0, abs=5.0)
        assert s["after_slow_turns"] > 0
    rr = by["round_robin"]
    assert rr["slow_server_turns"] > 0
    # Its turns after the onset waited the extra 4 s (jitter: +-5%) for their first token.
    assert rr["after_slow_ttft_s"]["p99"] >= 3.5, rr
    assert "Slow server" in format_report(report)


JOINING = Scenario(sessions=8, min_turns=5, max_turns=5, arrival_window_s=30, min_think_s=3,
                   max_think_s=6, system_tokens=60, min_first_tokens=150, max_first_tokens=250,
                   min_followup_tokens=20, max_followup_tokens=40, min_answer_tokens=8,
                   max_answer_tokens=16, seed=7)


async def test_bench_smoke_servers_join_mid_run(
        tmp_path: Path, etcd_server: Etcd, prefix: str) -> None:
    """The servers-join scenario end to end: 2 of 4 servers join 15 s into the replay; ring
    hash runs on a control plane with --max-pins 0, then (restarted) with pins, and the
    leader pins the active sessions it knew; the oracle deals by arrival; nginx (when
    installed) gets the servers by a reload."""
    cfg = BenchConfig(
        scenario=JOINING, servers=4,
        sim=SimParams(time_scale=0.1, cold_start_s=2.0, idle_to_cold_s=1e9, seed=7),
        strategies=("ring_hash_no_pins", "ring_hash", "oracle", "nginx-hash"),
        join=ServersJoin(at_s=15.0, servers=2, session_ttl_s=600.0), deadline_s=60,
        overhead=False, etcd=etcd_server.url, prefix=prefix, out_dir=tmp_path)
    report = await run_bench(cfg, progress_out=None)

    assert report["servers_join"] == {"servers": 2, "total": 4, "at_s": 15.0,
                                      "session_ttl_s": 600.0, "session_ttl_wall_s": 60.0}
    by = {s["name"]: s for s in report["strategies"]}
    runs = [name for name in by if by[name]["available"]]
    assert runs[:3] == ["ring_hash_no_pins", "ring_hash", "oracle"], by
    for name in runs:
        s = by[name]
        assert s["ok"] == s["turns"] == 40, s
        assert s["joined_s"] is not None and s["joined_s"] >= 15.0, s
        assert s["joining_server_turns"] > 0 and s["spanning_sessions"] > 0, s
        assert s["probe_requests"] == 0, s  # the priming is not counted
    pinned, unpinned = by["ring_hash"], by["ring_hash_no_pins"]
    assert unpinned["pins_added"] == 0 and pinned["unpinned_ring_changes"] == 0
    assert pinned["pins_added"] > 0, pinned
    assert by["oracle"]["moved_sessions"] == 0
    assert [t["what"] for t in report["targets"]][:2] == [
        "ring_hash prefix-cache hit ratio, returning turns", "ring_hash p95 TTFT / oracle"]
    assert "Servers join (2 of 4 servers join at 15.0 s" in format_report(report)
