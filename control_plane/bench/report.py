"""Turn results into numbers, and numbers into a terminal table, a JSON file and a PNG chart.

Pure except `write_json` and `write_png`. Latencies are reported in scenario seconds (wall time
divided by the simulator's time_scale), so they read as they would on real hardware.
matplotlib is optional: without it the chart is skipped with a note.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from control_plane.bench.replay import TurnResult

SCHEMA = "hotpath-bench/1"


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


@dataclass(frozen=True)
class Percentiles:
    p50: float | None
    p95: float | None
    p99: float | None

    @classmethod
    def of(cls, values: Sequence[float]) -> Percentiles:
        return cls(percentile(values, 50), percentile(values, 95), percentile(values, 99))


@dataclass(frozen=True)
class ServerCounters:
    """What a simulated server says about itself (its /metrics), after one strategy's run."""

    requests: int  # generations it ran: the client's turns plus any probes
    prompt_tokens: int
    generation_tokens: int
    cold_starts: int


@dataclass
class StrategyReport:
    name: str
    label: str
    available: bool = True
    note: str = ""
    turns: int = 0
    ok: int = 0
    errors: int = 0
    truncated: bool = False  # the replay deadline cut it short
    ttft_s: Percentiles = field(default_factory=lambda: Percentiles(None, None, None))
    e2e_s: Percentiles = field(default_factory=lambda: Percentiles(None, None, None))
    # Returning turns (turn >= 2): cached tokens / tokens the previous turn left cacheable.
    prefix_hit_ratio: float | None = None
    returning_turns_hit: float | None = None  # share of returning turns with >= 90% of it
    cold_hits: int = 0  # turns whose TTFT shows they waited for a model load
    cold_starts: int | None = None  # model loads, from the servers' metrics
    per_server: dict[str, int] = field(default_factory=dict)  # "?": backend did not say
    probe_requests: int | None = None  # generations the servers ran that no client asked for
    probe_tokens: int | None = None  # their prompt + generated tokens
    first_error: str | None = None
    # The slow-server scenario (None otherwise): which server turned slow, when (scenario s
    # after the first session), the TTFT of turns sent from then on, how many of them the slow
    # server answered, and when it answered the last (scenario s after turning slow).
    slow_server: str | None = None
    slow_from_s: float | None = None
    after_slow_ttft_s: Percentiles | None = None
    after_slow_turns: int | None = None
    slow_server_turns: int | None = None
    slow_server_last_s: float | None = None
    # The servers-join scenario (None otherwise), in scenario seconds from the first session:
    # when the servers were added and when the strategy routed to them; the returning turns
    # sent from the join on (their hit ratio and TTFT); the sessions with turns on both sides
    # of it, how many of them another server served after it than before it, and how many of
    # those had ended their first turn less than an access-log flush (wall) before it (the
    # control plane could not know them yet); turns the joining servers answered; for hotpath
    # the pins the leader added and ring changes published without their pins (its metrics).
    join_at_s: float | None = None
    joined_s: float | None = None
    after_join_turns: int | None = None
    after_join_hit_ratio: float | None = None
    after_join_ttft_s: Percentiles | None = None
    spanning_sessions: int | None = None
    moved_sessions: int | None = None
    moved_new_sessions: int | None = None
    joining_server_turns: int | None = None
    pins_added: int | None = None
    unpinned_ring_changes: int | None = None


def summarize(name: str, label: str, results: Iterable[TurnResult], *, time_scale: float,
              cold_ttft_s: float, truncated: bool = False,
              servers: Mapping[str, ServerCounters] | None = None,
              slow_server: str | None = None, slow_from_s: float | None = None
              ) -> StrategyReport:
    """One strategy's numbers. `cold_ttft_s` and `slow_from_s` (when `slow_server`, the name
    its answers carry, turned slow) are in scenario seconds from the first session."""
    rows = list(results)
    good = [r for r in rows if r.ok]
    scale = 1 / time_scale
    ttfts = [r.ttft_s * scale for r in good if r.ttft_s is not None]
    e2es = [r.e2e_s * scale for r in good if r.e2e_s is not None]
    returning = _returning(good)
    hit_ratio = _hit_ratio(returning)
    hit_turns = None
    if returning:
        hit_turns = sum((r.cached_tokens or 0) >= 0.9 * r.reusable_tokens
                        for r in returning) / len(returning)
    report = StrategyReport(
        name=name, label=label, turns=len(rows), ok=len(good), errors=len(rows) - len(good),
        truncated=truncated, ttft_s=Percentiles.of(ttfts), e2e_s=Percentiles.of(e2es),
        prefix_hit_ratio=hit_ratio, returning_turns_hit=hit_turns,
        cold_hits=sum(t >= cold_ttft_s for t in ttfts),
        per_server=dict(sorted(Counter(r.server or "?" for r in good).items())),
        first_error=next((r.error for r in rows if r.error), None),
    )
    if slow_server is not None and slow_from_s is not None:
        slow_after(report, good, slow_server, slow_from_s, time_scale)
    if servers:
        report.cold_starts = sum(s.cold_starts for s in servers.values())
        served = sum(s.requests for s in servers.values())
        # Failed turns may still have run on a server; only count what clients did not send.
        report.probe_requests = max(0, served - len(rows))
        client_tokens = sum((r.prompt_tokens or 0) + (r.completion_tokens or 0) for r in good)
        total_tokens = sum(s.prompt_tokens + s.generation_tokens for s in servers.values())
        report.probe_tokens = max(0, total_tokens - client_tokens)
    return report


def _returning(good: Iterable[TurnResult]) -> list[TurnResult]:
    """Turn 2 on of each session, where the server said what it had cached."""
    return [r for r in good if r.turn > 0 and r.reusable_tokens > 0
            and r.cached_tokens is not None]


def _hit_ratio(returning: Sequence[TurnResult]) -> float | None:
    """Cached tokens over what the previous turns left cacheable."""
    if not returning:
        return None
    cached = sum(min(r.cached_tokens or 0, r.reusable_tokens) for r in returning)
    return cached / sum(r.reusable_tokens for r in returning)


def join_after(report: StrategyReport, good: Sequence[TurnResult], joining: Collection[str],
               at_s: float, joined_s: float | None, time_scale: float,
               flush_s: float | None = None) -> None:
    """Fill the servers-join fields from the successful turns. `joining`: the names the
    joining servers' answers carry; `at_s`, `joined_s`: scenario seconds; `flush_s`: the
    access-log flush (wall seconds) when the strategy learns sessions from it (hotpath)."""
    scale = 1 / time_scale
    report.join_at_s, report.joined_s = at_s, joined_s
    after = [r for r in _returning(good) if r.sent_at_s * scale >= at_s]
    report.after_join_turns = len(after)
    report.after_join_hit_ratio = _hit_ratio(after)
    report.after_join_ttft_s = Percentiles.of([r.ttft_s * scale for r in after
                                               if r.ttft_s is not None])
    by_session: dict[str, list[TurnResult]] = {}
    for r in sorted(good, key=lambda r: (r.session, r.turn)):
        by_session.setdefault(r.session, []).append(r)
    spanning = moved = new = 0
    for turns in by_session.values():
        before = [r for r in turns if r.sent_at_s * scale < at_s]
        later = [r for r in turns if r.sent_at_s * scale >= at_s]
        if not before or not later:
            continue
        spanning += 1
        if any(r.server != before[-1].server for r in later):
            moved += 1
            first = turns[0]
            if flush_s is not None and first.turn == 0 and first.e2e_s is not None \
                    and first.sent_at_s + first.e2e_s > at_s * time_scale - flush_s:
                new += 1
    report.spanning_sessions, report.moved_sessions = spanning, moved
    report.moved_new_sessions = new if flush_s is not None else None
    report.joining_server_turns = sum(r.server in joining for r in good)


def slow_after(report: StrategyReport, good: Sequence[TurnResult], server: str, from_s: float,
               time_scale: float) -> None:
    """Fill the slow-server fields from the successful turns: those sent at or after the
    server turned slow, and which of them it answered."""
    scale = 1 / time_scale
    after = [r for r in good if r.sent_at_s * scale >= from_s]
    on_slow = [r for r in after if r.server == server]
    report.slow_server, report.slow_from_s = server, from_s
    report.after_slow_turns = len(after)
    report.after_slow_ttft_s = Percentiles.of([r.ttft_s * scale for r in after
                                               if r.ttft_s is not None])
    report.slow_server_turns = len(on_slow)
    report.slow_server_last_s = (max(r.sent_at_s * scale for r in on_slow) - from_s
                                 if on_slow else None)


def unavailable(name: str, label: str, note: str) -> StrategyReport:
    return StrategyReport(name=name, label=label, available=False, note=note)


@dataclass
class OverheadReport:
    """Gateway cost on a static upstream. Latency at one connection (added = minus direct);
    throughput at saturation."""

    name: str
    label: str
    available: bool = True
    note: str = ""
    p50_ms: float | None = None
    p99_ms: float | None = None
    added_p50_ms: float | None = None
    added_p99_ms: float | None = None
    rps: float | None = None
    load_p99_ms: float | None = None
    errors: int = 0


# -- targets (the benchmark's goals: reported, never asserted) ----------------------------------


@dataclass(frozen=True)
class Target:
    what: str
    value: float | None
    goal: str
    met: bool | None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def targets(strategies: Sequence[StrategyReport], overhead: Sequence[OverheadReport]
            ) -> list[Target]:
    by = {s.name: s for s in strategies if s.available and s.ok}
    out: list[Target] = []
    for name in ("ring_hash_prober", "ring_hash"):
        hp = by.get(name)
        if hp is None:
            continue
        rr, oracle = by.get("round_robin"), by.get("oracle")
        r = _ratio(hp.e2e_s.p95, rr.e2e_s.p95 if rr else None)
        out.append(Target(f"{name} p95 e2e / round_robin", r, "<= 0.35",
                          None if r is None else r <= 0.35))
        r = _ratio(hp.e2e_s.p95, oracle.e2e_s.p95 if oracle else None)
        out.append(Target(f"{name} p95 e2e / oracle", r, "<= 1.15",
                          None if r is None else r <= 1.15))
        h = hp.prefix_hit_ratio
        out.append(Target(f"{name} prefix-cache hit ratio, returning turns", h, ">= 0.97",
                          None if h is None else h >= 0.97))
    ov = {o.name: o for o in overhead if o.available and o.rps}
    hp_o = ov.get("hotpath")
    if hp_o is not None:
        for peer, goal in (("vllm-router", 1.5), ("nginx-hash", 0.6)):
            other = ov.get(peer)
            if other is None:
                continue
            r = _ratio(hp_o.rps, other.rps)
            out.append(Target(f"hotpath throughput / {peer}", r, f">= {goal}",
                              None if r is None else r >= goal))
            if hp_o.p99_ms is not None and other.p99_ms is not None:
                d = hp_o.p99_ms - other.p99_ms
                out.append(Target(f"hotpath p99 - {peer} p99 (ms, 1 connection)", d, "<= 1.0",
                                  d <= 1.0))
    return out


JOIN_HIT_GOAL = 0.99  # returning turns' prefix-cache hit ratio with pins
JOIN_TTFT_GOAL = 1.1  # p95 TTFT / the oracle's


def join_targets(strategies: Sequence[StrategyReport]) -> list[Target]:
    """The servers-join scenario's goals, for ring hash with pins (`ring_hash`) and, to
    compare, without (`ring_hash_no_pins`)."""
    by = {s.name: s for s in strategies if s.available and s.ok}
    oracle = by.get("oracle")
    out: list[Target] = []
    for name in ("ring_hash", "ring_hash_no_pins"):
        hp = by.get(name)
        if hp is None:
            continue
        h = hp.prefix_hit_ratio
        out.append(Target(f"{name} prefix-cache hit ratio, returning turns", h,
                          f">= {JOIN_HIT_GOAL}", None if h is None else h >= JOIN_HIT_GOAL))
        r = _ratio(hp.ttft_s.p95, oracle.ttft_s.p95 if oracle else None)
        out.append(Target(f"{name} p95 TTFT / oracle", r, f"<= {JOIN_TTFT_GOAL}",
                          None if r is None else r <= JOIN_TTFT_GOAL))
    return out


# -- output ------------------------------------------------------------------------------------


def _f(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(line.rstrip() for line in out)


def format_strategies(strategies: Sequence[StrategyReport]) -> str:
    header = ["strategy", "turns ok", "TTFT p50/p95/p99 s", "e2e p50/p95/p99 s", "prefix hit",
              "cold hits", "loads", "requests per server", "probe req"]
    rows = []
    notes = []
    for s in strategies:
        if not s.available:
            notes.append(f"{s.label}: not run: {s.note}")
            continue
        t, e = s.ttft_s, s.e2e_s
        rows.append([
            s.label, f"{s.ok}/{s.turns}" + (" (cut)" if s.truncated else ""),
            f"{_f(t.p50)}/{_f(t.p95)}/{_f(t.p99)}", f"{_f(e.p50)}/{_f(e.p95)}/{_f(e.p99)}",
            _pct(s.prefix_hit_ratio), str(s.cold_hits),
            "-" if s.cold_starts is None else str(s.cold_starts),
            " ".join(str(n) for k, n in s.per_server.items() if k != "?") or "-",
            "-" if s.probe_requests is None else str(s.probe_requests),
        ])
        if s.errors:
            notes.append(f"{s.label}: {s.errors} failed turn(s), first: {s.first_error}")
        if s.note:
            notes.append(f"{s.label}: {s.note}")
    return "\n".join([_table(header, rows), *notes])


def format_slow(strategies: Sequence[StrategyReport]) -> str:
    """The slow-server table: TTFT of the turns sent after the server turned slow, and how
    long each strategy kept sending turns to it. Empty outside that scenario."""
    runs = [s for s in strategies if s.available and s.slow_from_s is not None]
    if not runs:
        return ""
    header = ["strategy", "slow from s", "turns after", "TTFT p50/p95/p99 s after",
              "on slow server", "last one on it, s after"]
    rows = []
    for s in runs:
        t = s.after_slow_ttft_s or Percentiles(None, None, None)
        rows.append([s.label, _f(s.slow_from_s, 0), str(s.after_slow_turns),
                     f"{_f(t.p50)}/{_f(t.p95)}/{_f(t.p99)}", str(s.slow_server_turns),
                     _f(s.slow_server_last_s, 0)])
    return _table(header, rows)


def format_join(strategies: Sequence[StrategyReport]) -> str:
    """The servers-join table: when each strategy routed to the joining servers, its
    returning turns from the join on, and the sessions the join moved. Empty otherwise."""
    runs = [s for s in strategies if s.available and s.join_at_s is not None]
    if not runs:
        return ""
    header = ["strategy", "joined at s", "returning after", "hit after",
              "TTFT p50/p95/p99 s after", "spanning", "moved", "moved, new < 1 s",
              "on joining servers", "pins"]
    rows = []
    for s in runs:
        t = s.after_join_ttft_s or Percentiles(None, None, None)
        pins = "-" if s.pins_added is None else str(s.pins_added)
        if s.unpinned_ring_changes:
            pins += f" ({s.unpinned_ring_changes} unpinned)"
        rows.append([s.label, _f(s.joined_s, 1), str(s.after_join_turns),
                     _pct(s.after_join_hit_ratio), f"{_f(t.p50)}/{_f(t.p95)}/{_f(t.p99)}",
                     str(s.spanning_sessions), str(s.moved_sessions),
                     "-" if s.moved_new_sessions is None else str(s.moved_new_sessions),
                     str(s.joining_server_turns), pins])
    return _table(header, rows)


def format_overhead(overhead: Sequence[OverheadReport]) -> str:
    header = ["gateway", "p50 ms", "p99 ms", "added p50/p99 ms", "max req/s", "p99 ms @max",
              "errors"]
    rows, notes = [], []
    for o in overhead:
        if not o.available:
            notes.append(f"{o.label}: not run: {o.note}")
            continue
        rows.append([o.label, _f(o.p50_ms, 3), _f(o.p99_ms, 3),
                     f"{_f(o.added_p50_ms, 3)}/{_f(o.added_p99_ms, 3)}",
                     "-" if o.rps is None else f"{o.rps:,.0f}", _f(o.load_p99_ms, 2),
                     str(o.errors)])
        if o.note:
            notes.append(f"{o.label}: {o.note}")
    return "\n".join([_table(header, rows), *notes])


def format_targets(found: Sequence[Target]) -> str:
    rows = [[t.what, _f(t.value, 3), t.goal,
             "n/a" if t.met is None else ("met" if t.met else "NOT met")] for t in found]
    return _table(["target", "value", "goal", ""], rows) if rows else ""


def format_report(report: Mapping[str, Any]) -> str:
    parts = ["Chat replay (latencies in scenario seconds):",
             format_strategies(report["strategies_obj"])]
    slow = format_slow(report["strategies_obj"])
    if slow:
        what = report.get("slow_server") or {}
        parts += ["", f"Slow server (the last one; every first token +{what.get('ttft_s', '?')}"
                      f" s from {what.get('at_s', '?')} s on):", slow]
    join = format_join(report["strategies_obj"])
    if join:
        what = report.get("servers_join") or {}
        parts += ["", f"Servers join ({what.get('servers', '?')} of {what.get('total', '?')} "
                      f"servers join at {what.get('at_s', '?')} s; returning turns from then "
                      f"on; pool session_ttl_s {what.get('session_ttl_s', '?')} s = "
                      f"{what.get('session_ttl_wall_s', '?')} s of wall time):", join]
    if report["overhead_obj"]:
        parts += ["", "Gateway overhead (static upstream, POST bodies, rotating session ids):",
                  format_overhead(report["overhead_obj"])]
    found = format_targets(report["targets_obj"])
    if found:
        parts += ["", found]
    load = report.get("load_average")
    if isinstance(load, Mapping):
        cpus = (report.get("machine") or {}).get("cpus", "?")
        parts += ["", f"load average (1 min) on {cpus} CPUs: {load.get('start')} at the "
                      f"start, {load.get('end')} at the end"]
    return "\n".join(parts)


def build_report(meta: Mapping[str, Any], strategies: Sequence[StrategyReport],
                 overhead: Sequence[OverheadReport], with_targets: bool = True,
                 join: bool = False) -> dict[str, Any]:
    """The JSON document; the *_obj keys hold the objects for formatting and are not saved.
    The issue's targets are for the default scenario (`join`: the servers-join scenario's);
    `with_targets` False leaves them out."""
    found = [] if not with_targets else join_targets(strategies) if join else targets(
        strategies, overhead)
    return {
        "schema": SCHEMA,
        **meta,
        "strategies": [asdict(s) for s in strategies],
        "overhead": [asdict(o) for o in overhead],
        "targets": [asdict(t) for t in found],
        "strategies_obj": list(strategies),
        "overhead_obj": list(overhead),
        "targets_obj": found,
    }


def write_json(report: Mapping[str, Any], path: Path) -> None:
    data = {k: v for k, v in report.items() if not k.endswith("_obj")}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_png(report: Mapping[str, Any], path: Path) -> str | None:
    """Draw the chart; returns why not when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no chart"
    strategies = [s for s in report["strategies_obj"] if s.available and s.ok]
    overhead = [o for o in report["overhead_obj"] if o.available and o.rps]
    fig, grid = plt.subplots(2, 2, figsize=(12, 9))
    axes = list(grid.flat)
    if not overhead:
        axes[3].set_visible(False)
    labels = [s.label for s in strategies]
    x = list(range(len(strategies)))
    width = 0.27
    for ax, attr, title in ((axes[0], "e2e_s", "End-to-end latency (s)"),
                            (axes[1], "ttft_s", "Time to first token (s)")):
        for k, q in enumerate(("p50", "p95", "p99")):
            values = [getattr(getattr(s, attr), q) or 0.0 for s in strategies]
            ax.bar([i + (k - 1) * width for i in x], values, width, label=q)
        ax.set_title(title)
        ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    ax = axes[2]
    ax.bar(x, [100 * (s.prefix_hit_ratio or 0.0) for s in strategies], 0.6, color="tab:green")
    for i, s in enumerate(strategies):
        ax.annotate(f"{s.cold_hits} cold", (i, 100 * (s.prefix_hit_ratio or 0.0)),
                    ha="center", va="bottom", fontsize=7)
    ax.set_title("Prefix-cache hit, returning turns (%)")
    ax.set_ylim(0, 110)
    ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    if overhead:
        ax = axes[3]
        ox = list(range(len(overhead)))
        ax.bar(ox, [o.rps for o in overhead], 0.6, color="tab:purple")
        for i, o in enumerate(overhead):
            ax.annotate(f"p99 {o.p99_ms:.2f} ms" if o.p99_ms is not None else "",
                        (i, o.rps), ha="center", va="bottom", fontsize=7)
        ax.set_title("Gateway max throughput (req/s)")
        ax.set_xticks(ox, [o.label for o in overhead], rotation=30, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(str(report.get("title", "hotpath bench")), fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
