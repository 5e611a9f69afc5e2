"""`hotpath status` as a table: config, prober status and Envoy's view, joined by pool/id."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from control_plane.config.state import ConfigState
from control_plane.runtime.envoy_admin import EnvoyHost
from control_plane.translate.warmth import is_stale


def status_rows(state: ConfigState, hosts: list[EnvoyHost] | None, now: float
                ) -> list[dict[str, Any]]:
    """One row per endpoint: config, prober status and Envoy's view, joined by pool/id."""
    config = state.config()
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
                warmth = status.state.value + (" (stale)" if is_stale(status, interval, now)
                                               else "")
            host = by_host.get((pool_name, endpoint_id))
            rows.append({
                "pool": pool_name,
                "models": list(pool.models) if pool else [],
                "endpoint": endpoint_id,
                "address": f"{endpoint.address}:{endpoint.port}",
                "weight": endpoint.weight,
                "warmth": warmth,
                "ttft_ms": status.ttft_ms if status else None,
                "envoy": host.health if host else ("unknown" if hosts is None else "absent"),
                "active": host.rq_active if host else None,
                "requests": host.rq_total if host else None,
            })
    return rows


def format_table(rows: list[dict[str, Any]], rejected: dict[str, str],
                 up: Mapping[str, Any] | None = None) -> str:
    headers = ["POOL", "MODELS", "ENDPOINT", "ADDRESS", "W", "WARMTH", "TTFT ms", "ENVOY",
               "ACTIVE", "REQUESTS"]
    table = []
    for row in rows:
        ttft = row.get("ttft_ms")
        table.append([
            row["pool"], ",".join(row["models"]) or "(no pool)", row["endpoint"] or "(none)",
            row.get("address", "-"), str(row.get("weight", "-")), row.get("warmth", "-"),
            f"{ttft:.0f}" if isinstance(ttft, float) else "-", row.get("envoy", "-"),
            str(row["active"]) if row.get("active") is not None else "-",
            str(row["requests"]) if row.get("requests") is not None else "-",
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

