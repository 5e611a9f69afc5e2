"""Envoy's admin API as hotpath reads it (one parser of ``/clusters?format=json``), and the
control plane's ``/traffic`` window beside it.

``parse_clusters`` is pure (admin JSON in, one ``EnvoyHost`` per upstream host out); used by
`hotpath status`, the prober's traffic tracker, the benchmark and the tests.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class EnvoyHost:
    cluster: str  # the pool
    hostname: str  # the endpoint id
    address: str
    port: int
    health: str  # healthy, degraded, unhealthy, ejected
    weight: int
    rq_active: int
    rq_total: int
    rq_success: int
    cx_connect_fail: int = 0  # connections to it that failed (refused, timed out)


def _health(flags: Mapping[str, Any]) -> str:
    if flags.get("failed_outlier_check"):
        return "ejected"
    if flags.get("eds_health_status") in ("UNHEALTHY", "DRAINING", "TIMEOUT"):
        return "unhealthy"
    if flags.get("eds_health_status") == "DEGRADED":
        return "degraded"
    return "healthy"


def parse_clusters(data: Mapping[str, Any]) -> list[EnvoyHost]:
    """Every upstream host of every cluster, from ``/clusters?format=json``."""
    hosts = []
    for cluster in data.get("cluster_statuses", []) or []:
        for host in cluster.get("host_statuses", []) or []:
            stats = {s.get("name"): int(s.get("value", 0) or 0) for s in host.get("stats", [])}
            socket_address = host.get("address", {}).get("socket_address", {})
            hosts.append(EnvoyHost(
                cluster=str(cluster.get("name", "")),
                hostname=str(host.get("hostname", "")),
                address=str(socket_address.get("address", "")),
                port=int(socket_address.get("port_value", 0) or 0),
                health=_health(host.get("health_status", {})),
                weight=int(host.get("weight", 1) or 1),
                rq_active=stats.get("rq_active", 0),
                rq_total=stats.get("rq_total", 0),
                rq_success=stats.get("rq_success", 0),
                cx_connect_fail=stats.get("cx_connect_fail", 0),
            ))
    return hosts


def get_json(url: str, timeout: float = 2.0) -> Any:
    """GET an admin URL and parse its JSON; raises OSError/ValueError when unreachable."""
    with urllib.request.urlopen(url, timeout=timeout) as reply:
        return json.load(reply)


def fetch_hosts(admin_url: str, timeout: float = 2.0) -> list[EnvoyHost] | None:
    """Envoy's own view of every upstream host; None when its admin is unreachable."""
    try:
        return parse_clusters(get_json(f"{admin_url.rstrip('/')}/clusters?format=json", timeout))
    except (urllib.error.URLError, OSError, ValueError):
        return None


def fetch_json(url: str, timeout: float = 2.0) -> Any:
    """A JSON view (a control plane's ``/traffic`` or ``/sessions``); None when unreachable."""
    try:
        return get_json(url, timeout)
    except (urllib.error.URLError, OSError, ValueError):
        return None


def fetch_traffic(metrics_url: str, timeout: float = 2.0) -> Any:
    """A control plane's ``/traffic`` window (traffic/service.py); None when unreachable."""
    return fetch_json(f"{metrics_url.rstrip('/')}/traffic", timeout)


def fetch_sessions(metrics_url: str, timeout: float = 2.0) -> Any:
    """A control plane's ``/sessions`` (active sessions per pool); None when unreachable."""
    return fetch_json(f"{metrics_url.rstrip('/')}/sessions", timeout)
