"""`hotpath status` as a table: config, prober status and Envoy's view, joined by pool/id."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from control_plane.config.splits import serving_table, shares
from control_plane.config.state import ConfigState
from control_plane.runtime.envoy_admin import EnvoyHost
from control_plane.traffic.judge import percentile
from control_plane.translate.warmth import is_stale


def traffic_rows(reports: Iterable[Mapping[str, Any]]
                 ) -> dict[tuple[str, str], dict[str, Any]]:
    """Per endpoint, real traffic as every control plane's ``/traffic`` shows it: p50/p90
    time to first token and rate over the window, requests since each control plane
    started (these survive Envoy's cluster updates)."""
    samples: dict[tuple[str, str], list[float]] = {}
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for report in reports:
        for item in report.get("endpoints", []):
            key = (str(item["pool"]), str(item.get("endpoint") or item["address"]))
            row = rows.setdefault(key, {"rps": 0.0, "requests_total": 0})
            row["rps"] += float(item["rps"])
            samples.setdefault(key, []).extend(float(s[0]) for s in item["samples"])
        for item in report.get("requests_total", []):
            key = (str(item["pool"]), str(item["endpoint"]))
            row = rows.setdefault(key, {"rps": 0.0, "requests_total": 0})
            row["requests_total"] += int(item["requests"])
    for key, values in samples.items():
        if values:
            rows[key]["p50_ms"] = percentile(values, 0.5)
            rows[key]["p90_ms"] = percentile(values, 0.9)
    return rows


def session_counts(views: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], int]:
    """Per endpoint, the active sessions every control plane's ``/sessions`` shows (a
    session both saw counts once, on the endpoint that served it last)."""
    latest: dict[tuple[str, str], tuple[float, str]] = {}  # (pool, session) -> (seen, eid)
    for view in views:
        for pool, sessions in view.items():
            if not isinstance(sessions, Mapping):
                continue
            for session, item in sessions.items():
                if isinstance(item, list) and len(item) == 3 and isinstance(item[1], str):
                    seen = float(item[2])
                    if (pool, session) not in latest or latest[(pool, session)][0] < seen:
                        latest[(pool, session)] = (seen, item[1])
    counts: dict[tuple[str, str], int] = {}
    for (pool, _), (_, endpoint) in latest.items():
        counts[(pool, endpoint)] = counts.get((pool, endpoint), 0) + 1
    return counts


def drain_state(until: float | None, now: float, left: int) -> str | None:
    """``draining`` while sessions are left before ``until``; ``drained`` after (None: no
    drain)."""
    if until is None:
        return None
    return "draining" if now < until and left else "drained"


def status_rows(state: ConfigState, hosts: list[EnvoyHost] | None, now: float,
                traffic: Mapping[tuple[str, str], Mapping[str, Any]] | None = None,
                sessions: Mapping[tuple[str, str], int] | None = None
                ) -> list[dict[str, Any]]:
    """One row per endpoint: config, prober status, real traffic and active sessions (from
    the control planes), pins, a planned drain, and Envoy's view, joined by pool/id."""
    config = state.config()
    pins: dict[tuple[str, str], int] = {}
    for pool_name, table in config.pins.items():
        for pin in table.pins.values():
            pins[(pool_name, pin.endpoint)] = pins.get((pool_name, pin.endpoint), 0) + 1
    fleet = sum(len(members) for members in config.endpoints.values())
    by_host = {(h.cluster, h.hostname): h for h in hosts or []}
    rows: list[dict[str, Any]] = []
    for pool_name in sorted(set(config.pools) | set(config.endpoints)):
        pool = config.pools.get(pool_name)
        endpoints = config.endpoints.get(pool_name, {})
        if not endpoints:
            rows.append({"pool": pool_name, "models": list(pool.models) if pool else [],
                         "endpoint": None})
            continue
        for endpoint_id, endpoint in endpoints.items():
            status = config.statuses.get(pool_name, {}).get(endpoint_id)
            interval = pool.warmup.interval_s if pool else 10.0
            warmth = "unknown"
            if status is not None:
                warmth = status.state.value + (" (stale)" if is_stale(status, interval, now, fleet)
                                               else "")
            host = by_host.get((pool_name, endpoint_id))
            seen = (traffic or {}).get((pool_name, endpoint_id), {})
            active = (sessions or {}).get((pool_name, endpoint_id), 0) if sessions is not None \
                else None
            pinned = pins.get((pool_name, endpoint_id), 0)
            drain = config.drains.get(pool_name, {}).get(endpoint_id)
            rows.append({
                "pool": pool_name,
                "models": list(pool.models) if pool else [],
                "endpoint": endpoint_id,
                "address": f"{endpoint.address}:{endpoint.port}",
                "weight": endpoint.weight,
                "warmth": warmth,
                "ttft_ms": status.ttft_ms if status else None,
                "source": status.source.value if status and status.source else None,
                "traffic_p50_ms": seen.get("p50_ms"),
                "traffic_p90_ms": seen.get("p90_ms"),
                "rps": seen.get("rps"),
                "requests_total": seen.get("requests_total"),
                "sessions": active,
                "pins": pinned,
                "drain": drain_state(drain.until if drain else None, now,
                                     max(pinned, active or 0)),
                "envoy": host.health if host else ("unknown" if hosts is None else "absent"),
                "active": host.rq_active if host else None,
                "requests": host.rq_total if host else None,
            })
    return rows


def _ms(value: Any) -> str:
    return f"{value:.0f}" if isinstance(value, (int, float)) else "-"


def format_table(rows: list[dict[str, Any]], rejected: dict[str, str],
                 up: Mapping[str, Any] | None = None) -> str:
    headers = ["POOL", "MODELS", "ENDPOINT", "ADDRESS", "W", "WARMTH", "BY", "TTFT ms",
               "REAL p50/p90 ms", "REQ/S", "SESSIONS", "PINS", "ENVOY", "ACTIVE", "REQUESTS"]
    table = []
    for row in rows:
        p50, p90 = row.get("traffic_p50_ms"), row.get("traffic_p90_ms")
        total = row.get("requests_total")
        table.append([
            row["pool"], ",".join(row["models"]) or "(no pool)", row["endpoint"] or "(none)",
            row.get("address", "-"), str(row.get("weight", "-")),
            row.get("warmth", "-") + (f", {row['drain']}" if row.get("drain") else ""),
            row.get("source") or "-", _ms(row.get("ttft_ms")),
            f"{_ms(p50)}/{_ms(p90)}" if p50 is not None else "-",
            f"{row['rps']:.1f}" if row.get("rps") is not None else "-",
            str(row["sessions"]) if row.get("sessions") is not None else "-",
            str(row.get("pins", "-")),
            row.get("envoy", "-"),
            str(row["active"]) if row.get("active") is not None else "-",
            str(total if total is not None else row.get("requests", "-")),
        ])
    widths = [max(len(h), *(len(r[i]) for r in table)) if table else len(h)
              for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in table]
    if not table:
        lines.append("(no pools configured: add one with `hotpath pool put NAME --model M`)")
    for _key, reason in sorted(rejected.items()):
        lines.append(f"REJECTED {reason}")
    if up:
        children = up.get("children", {})
        lines.append("hotpath up (pid {}): ".format(up.get("pid", "?")) + ", ".join(
            f"{name} {'running' if c.get('running') else 'DOWN'}"
            + (f" ({c.get('restarts')} restarts)" if c.get("restarts") else "")
            for name, c in children.items()))
    return "\n".join(lines)



def split_rows(state: ConfigState, traffic: Mapping[tuple[str, str], Mapping[str, Any]]
               | None = None) -> list[dict[str, Any]]:
    """One row per split arm: weight, share of sessions (slots of the table Envoy uses),
    and its pool's real time to first token side by side (docs/splits.md)."""
    config = state.config()
    latency: dict[str, list[float]] = {}
    for (pool, _), row in (traffic or {}).items():
        if row.get("p50_ms") is not None:
            latency.setdefault(pool, []).append(float(row["p50_ms"]))
    rows: list[dict[str, Any]] = []
    for model, split in config.splits.items():
        table = serving_table(split, config.split_slots.get(model), set(config.pools))
        gone = [arm.pool for arm in split.arms if arm.pool not in config.pools]
        health = "no arm left (503)" if table is None else ("degraded" if gone else "ok")
        for index, share in enumerate(shares(table or "", len(split.arms))):
            arm = split.arms[index]
            p50s = latency.get(arm.pool)
            rows.append({"model": model, "arm": index, "pool": arm.pool, "weight": arm.weight,
                         "served_model": arm.served_model, "share": round(share, 4),
                         "state": health if arm.pool in config.pools else "pool deleted",
                         "leader_table": model in config.split_slots,
                         "traffic_p50_ms": percentile(p50s, 0.5) if p50s else None})
    return rows


def format_splits(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    headers = ["SPLIT", "ARM", "POOL", "WEIGHT", "SESSIONS", "SERVED MODEL", "REAL p50 ms",
               "STATE"]
    table = [[r["model"], str(r["arm"]), r["pool"], str(r["weight"]), f"{100 * r['share']:.1f}%",
              r["served_model"], _ms(r.get("traffic_p50_ms")), r["state"]] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in table]
    return "\n".join(lines)
