"""The servers-join scenario's pure parts: the oracle's dealing, the join numbers and table,
the targets, the CLI preset, the stack kinds (pins on or off) and the peers' configs."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from control_plane.bench.peers import nginx_conf
from control_plane.bench.replay import TurnResult
from control_plane.bench.report import (
    Percentiles,
    ServerCounters,
    StrategyReport,
    build_report,
    format_report,
    join_after,
    join_targets,
    summarize,
)
from control_plane.bench.run import (
    DEFAULT_IDLE_TO_COLD_S,
    DEFAULT_JOIN_AT_S,
    DEFAULT_JOIN_SERVERS,
    DEFAULT_STRATEGIES,
    JOIN_SERVERS_TOTAL,
    JOIN_STRATEGIES,
    ORACLE_NEVER_COLD_S,
    _minus,
    _pool_value,
    add_bench_arguments,
    config_from_args,
)
from control_plane.bench.strategies import (
    BY_NAME,
    Backend,
    HotpathStack,
    control_plane_counters,
    lb_policy,
)
from control_plane.bench.workload import (
    Scenario,
    ServersJoin,
    generate,
    join_assignment,
)
from control_plane.runtime.supervisor import ProcessGroup


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    return parser.parse_args(list(argv))


def test_the_oracle_deals_each_session_over_the_servers_present_at_its_arrival() -> None:
    workload = generate(Scenario(sessions=12, arrival_window_s=100.0, seed=3))
    at_s = 50.0
    dealt = join_assignment(workload, 3, 5, at_s)
    for s in workload.sessions:
        assert dealt[s.id] == s.index % (3 if s.start_s < at_s else 5)
    assert {dealt[s.id] for s in workload.sessions if s.start_s < at_s} <= {0, 1, 2}
    assert {dealt[s.id] for s in workload.sessions if s.start_s >= at_s} & {3, 4}
    with pytest.raises(ValueError):
        join_assignment(workload, 0, 5, at_s)
    with pytest.raises(ValueError):
        join_assignment(workload, 6, 5, at_s)


def test_a_join_needs_a_time_a_server_and_a_ttl() -> None:
    assert ServersJoin(at_s=0.0).servers == 2
    for bad in ({"at_s": -1.0}, {"at_s": 1.0, "servers": 0},
                {"at_s": 1.0, "session_ttl_s": 0.0}):
        with pytest.raises(ValueError):
            ServersJoin(**bad)  # type: ignore[arg-type]


def _turn(session: str, turn: int, sent_s: float, server: str, *, cached: int = 100,
          reusable: int = 100, ttft_s: float = 0.01, e2e_s: float = 0.05) -> TurnResult:
    return TurnResult(session=session, turn=turn, sent_at_s=sent_s, ok=True, status=200,
                      ttft_s=ttft_s, e2e_s=e2e_s, server=server, prompt_tokens=100,
                      cached_tokens=cached if turn else 0, completion_tokens=10,
                      reusable_tokens=reusable if turn else 0)


# Wall seconds at time scale 0.1: the join at 20 scenario s is 2.0 s of wall time.
ROWS = [
    _turn("old", 0, 0.1, "a"), _turn("old", 1, 1.0, "a"), _turn("old", 2, 2.5, "a"),
    # Moved at the join; its first turn ended at 1.55 s, less than a flush (1 s) before it.
    _turn("new", 0, 1.5, "a"), _turn("new", 1, 2.2, "j", cached=20, ttft_s=0.05),
    _turn("late", 0, 2.1, "j"), _turn("late", 1, 3.0, "j"),  # arrived after the join
    _turn("early", 0, 0.2, "b"), _turn("early", 1, 1.9, "b"),  # ended before it
]


def test_join_numbers_count_spanning_and_moved_sessions_and_the_new_servers_turns() -> None:
    report = summarize("ring_hash", "hotpath ring hash", ROWS, time_scale=0.1,
                       cold_ttft_s=2.0)
    join_after(report, ROWS, {"j"}, 20.0, 21.5, 0.1, flush_s=1.0)
    assert (report.join_at_s, report.joined_s) == (20.0, 21.5)
    # Returning turns sent at or after 2.0 s: old t2, new t1, late t1.
    assert report.after_join_turns == 3
    assert report.after_join_hit_ratio == pytest.approx(220 / 300)
    ttft = report.after_join_ttft_s
    assert ttft is not None and ttft.p50 == pytest.approx(0.1)  # scenario s
    assert ttft.p99 == pytest.approx(0.492)  # the moved turn: 0.5 s
    assert (report.spanning_sessions, report.moved_sessions) == (2, 1)
    assert report.moved_new_sessions == 1
    assert report.joining_server_turns == 3

    other = summarize("nginx-hash", "nginx", ROWS, time_scale=0.1, cold_ttft_s=2.0)
    join_after(other, ROWS, {"j"}, 20.0, None, 0.1)  # no access log: nothing to say
    assert other.moved_new_sessions is None and other.joined_s is None


def test_join_table_and_targets() -> None:
    def strategy(name: str, hit: float, ttft_p95: float) -> StrategyReport:
        report = StrategyReport(name, name, ok=10, turns=10, prefix_hit_ratio=hit,
                                ttft_s=Percentiles(0.1, ttft_p95, ttft_p95))
        join_after(report, ROWS, {"j"}, 20.0, 20.5, 0.1,
                   flush_s=1.0 if name.startswith("ring") else None)
        return report

    pinned = strategy("ring_hash", 0.995, 0.52)
    pinned.pins_added, pinned.unpinned_ring_changes = 7, 1
    runs = [strategy("round_robin", 0.7, 0.9), strategy("ring_hash_no_pins", 0.98, 0.8),
            pinned, strategy("oracle", 0.997, 0.5)]
    found = {t.what: t for t in join_targets(runs)}
    assert found["ring_hash prefix-cache hit ratio, returning turns"].met is True
    assert found["ring_hash p95 TTFT / oracle"].value == pytest.approx(1.04)
    assert found["ring_hash p95 TTFT / oracle"].met is True
    assert found["ring_hash_no_pins prefix-cache hit ratio, returning turns"].met is False
    assert found["ring_hash_no_pins p95 TTFT / oracle"].met is False
    assert join_targets(runs[:3])[1].met is None  # no oracle: no ratio

    meta = {"servers_join": {"servers": 2, "total": 5, "at_s": 150.0, "session_ttl_s": 600.0,
                             "session_ttl_wall_s": 18.0}}
    report = build_report(meta, runs, [], join=True)
    assert [t["what"] for t in report["targets"]] == list(found)
    text = format_report(report)
    assert ("Servers join (2 of 5 servers join at 150.0 s; returning turns from then on; pool "
            "session_ttl_s 600.0 s = 18.0 s of wall time):") in text
    assert "moved, new < 1 s" in text and "7 (1 unpinned)" in text
    plain = build_report({}, runs, [])
    assert "Servers join" in format_report(plain)  # the rows carry join numbers
    assert all("TTFT / oracle" not in t["what"] for t in plain["targets"])


def test_servers_join_preset_and_flags() -> None:
    cfg = config_from_args(_args("--scenario", "servers-join"))
    assert cfg.join == ServersJoin(DEFAULT_JOIN_AT_S, DEFAULT_JOIN_SERVERS, 600.0)
    assert cfg.servers == JOIN_SERVERS_TOTAL and cfg.initial_servers == 3
    assert cfg.strategies == JOIN_STRATEGIES and not cfg.overhead
    assert cfg.sim.idle_to_cold_s == ORACLE_NEVER_COLD_S  # no scale-to-zero here
    sc = cfg.scenario
    assert (sc.sessions, sc.min_turns, sc.max_turns, sc.arrival_window_s) == (30, 6, 12, 300.0)
    assert all(name in BY_NAME for name in JOIN_STRATEGIES)

    cfg = config_from_args(_args("--join-at", "60", "--servers", "4", "--join-servers", "2",
                                 "--session-ttl", "120", "--idle-to-cold", "20",
                                 "--sessions", "9", "--time-scale", "0.05"))
    assert cfg.join == ServersJoin(60.0, 2, 120.0) and cfg.initial_servers == 2
    assert cfg.sim.idle_to_cold_s == 20.0 and cfg.scenario.sessions == 9
    value = _pool_value(cfg, BY_NAME["ring_hash"], "sys")
    assert value["session_ttl_s"] == pytest.approx(6.0)  # 120 scenario s x 0.05

    plain = config_from_args(_args())
    assert plain.join is None and plain.servers == 3 and plain.scenario.sessions == 25
    assert plain.sim.idle_to_cold_s == DEFAULT_IDLE_TO_COLD_S
    assert plain.strategies == DEFAULT_STRATEGIES and "ring_hash_no_pins" not in plain.strategies
    assert "session_ttl_s" not in _pool_value(plain, BY_NAME["ring_hash"], "sys")
    for bad in (("--join-servers", "2"), ("--session-ttl", "60"),
                ("--scenario", "servers-join", "--join-servers", "5"),
                ("--join-at", "10", "--slow-server-at", "10")):
        with pytest.raises(ValueError):
            config_from_args(_args(*bad))


def test_ring_hash_needs_pins_and_the_stream_and_no_pins_runs_max_pins_0(
        tmp_path: Path) -> None:
    assert BY_NAME["ring_hash"].stack == (True, True)
    assert BY_NAME["ring_hash_no_pins"].stack == (None, False)
    assert BY_NAME["round_robin"].stack == (None, None)
    assert BY_NAME["ring_hash_prober"].stack == (False, None)
    assert BY_NAME["ring_hash_traffic"].stack == (True, None)
    group = ProcessGroup(tmp_path)
    off = HotpathStack(group, "http://127.0.0.1:2379", pins=False)
    command = off.control_plane_command(18000, tmp_path / "access.log")
    assert command[command.index("--max-pins") + 1] == "0"
    on = HotpathStack(group, "http://127.0.0.1:2379")
    assert "--max-pins" not in on.control_plane_command(18000, tmp_path / "access.log")


def test_lb_policy_reads_override_host_ring_clusters() -> None:
    ring = {"load_balancing_policy": {"policies": [{"typed_extension_config": {
        "name": "envoy.load_balancing_policies.override_host",
        "typed_config": {"fallback_policy": {"policies": [{"typed_extension_config": {
            "name": "envoy.load_balancing_policies.ring_hash"}}]}}}}]}}
    assert lb_policy(ring) == "RING_HASH"
    assert lb_policy({"lb_policy": "LEAST_REQUEST"}) == "LEAST_REQUEST"
    assert lb_policy({"name": "bench"}) is None  # round robin: the enum's default


def test_control_plane_counters_and_server_counters_since_priming() -> None:
    text = "\n".join([
        "# TYPE hotpath_pins_added_total counter",
        'hotpath_pins_added_total{pool="bench"} 7',
        'hotpath_pins_added_total{pool="other"} 3',
        "hotpath_ring_changes_unpinned_total 1",
        "process_cpu_seconds_total 2.5",
    ])
    assert control_plane_counters(text) == {"hotpath_pins_added_total": 7.0,
                                            "hotpath_ring_changes_unpinned_total": 1.0}
    after = {"a": ServerCounters(12, 5000, 300, 1)}
    before = {"a": ServerCounters(1, 1300, 1, 1)}
    assert _minus(after, before) == {"a": ServerCounters(11, 3700, 299, 0)}
    assert _minus(after, None) == after


def test_nginx_keeps_bodies_in_memory_and_says_how_many_upstreams_it_runs(
        tmp_path: Path) -> None:
    backends = [Backend(f"b{i}", "127.0.0.1", 8000 + i) for i in range(5)]
    conf = nginx_conf(tmp_path, 9000, backends)
    assert "client_body_buffer_size 8m;" in conf
    assert "add_header x-bench-upstreams 5 always;" in conf
