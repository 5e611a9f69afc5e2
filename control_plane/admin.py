"""Operator actions on etcd (put/list/remove pools and endpoints) and the status view."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from control_plane.model import (
    ConfigError,
    Endpoint,
    Pool,
    endpoint_to_json,
    parse_endpoint,
    parse_pool,
    pool_to_json,
)
from control_plane.state import ConfigState
from control_plane.store.etcd import EtcdSettings, delete, etcd_client, list_prefix, put_json
from control_plane.warmth.routing import is_stale


async def read_state(settings: EtcdSettings) -> ConfigState:
    state = ConfigState()
    async with etcd_client(settings) as client:
        revision, items = await list_prefix(client, settings)
    for key, value, mod_revision in sorted(items, key=lambda item: item[2]):
        state.apply(key, value, mod_revision)
    state.revision = revision
    return state


async def put_pool(settings: EtcdSettings, name: str, value: dict[str, Any]) -> Pool:
    """Validate like the control plane would, including model ownership, then write."""
    key = f"pools/{name}"
    pool = parse_pool(key, name, json.dumps(value))
    state = await read_state(settings)
    for other in state.config().pools.values():
        shared = set(other.models) & set(pool.models)
        if other.name != name and shared:
            raise ConfigError(key, f"model {sorted(shared)[0]!r} already belongs to pool "
                                   f"{other.name!r}")
    async with etcd_client(settings) as client:
        await put_json(client, settings, key, pool_to_json(pool))
    return pool


async def put_endpoint(settings: EtcdSettings, pool: str, endpoint_id: str,
                       value: dict[str, Any]) -> Endpoint:
    key = f"endpoints/{pool}/{endpoint_id}"
    endpoint = parse_endpoint(key, pool, endpoint_id, json.dumps(value))
    async with etcd_client(settings) as client:
        await put_json(client, settings, key, endpoint_to_json(endpoint))
    return endpoint


async def remove(settings: EtcdSettings, keys: Sequence[tuple[str, bool]]) -> int:
    """Delete (key, is_prefix) pairs; returns how many keys went."""
    removed = 0
    async with etcd_client(settings) as client:
        for key, prefix in keys:
            removed += await delete(client, settings, key, prefix=prefix)
    return removed


@dataclass(frozen=True)
class EnvoyHost:
    cluster: str
    hostname: str
    address: str
    health: str  # healthy, degraded, unhealthy, ejected
    weight: int
    active_requests: int
    total_requests: int


def envoy_hosts(admin_url: str, timeout: float = 2.0) -> list[EnvoyHost] | None:
    """Envoy's own view of every upstream host, from its admin; None when unreachable."""
    try:
        with urllib.request.urlopen(f"{admin_url}/clusters?format=json", timeout=timeout) as r:
            data = json.load(r)
    except (urllib.error.URLError, OSError, ValueError):
        return None
    hosts = []
    for cluster in data.get("cluster_statuses", []):
        for host in cluster.get("host_statuses", []):
            flags = host.get("health_status", {})
            if flags.get("failed_outlier_check"):
                health = "ejected"
            elif flags.get("eds_health_status") in ("UNHEALTHY", "DRAINING", "TIMEOUT"):
                health = "unhealthy"
            elif flags.get("eds_health_status") == "DEGRADED":
                health = "degraded"
            else:
                health = "healthy"
            stats = {s.get("name"): int(s.get("value", 0)) for s in host.get("stats", [])}
            socket_address = host.get("address", {}).get("socket_address", {})
            hosts.append(EnvoyHost(
                cluster=cluster.get("name", ""),
                hostname=host.get("hostname", ""),
                address=f"{socket_address.get('address')}:{socket_address.get('port_value')}",
                health=health,
                weight=int(host.get("weight", 1)),
                active_requests=stats.get("rq_active", 0),
                total_requests=stats.get("rq_total", 0),
            ))
    return hosts


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
                "active": host.active_requests if host else None,
                "requests": host.total_requests if host else None,
            })
    return rows


def format_table(rows: list[dict[str, Any]], rejected: dict[str, str]) -> str:
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
    return "\n".join(lines)

