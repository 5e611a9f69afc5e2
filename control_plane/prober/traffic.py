"""Real traffic per endpoint, from the counters Envoy already keeps (admin /clusters).

Pure: parsed admin JSON in, "when did this host last serve real traffic, is it serving now"
out. The prober's own probes go straight to the model servers, so Envoy's counters only
ever count real traffic.

Measured on Envoy 1.40 (docs/prober.md):
- ``rq_success`` counts answered requests; a connect failure to a dead host counts in
  ``rq_error`` and ``cx_connect_fail`` only, so a dead host never looks busy.
- A host that refuses connections: ``cx_connect_fail`` grows (the route's retries send the
  request elsewhere, so the access log shows only the host that answered).
  ``connect_failed_at`` is the newest poll that saw it grow, until a poll that sees answers
  and no failure.
- A CDS update of a cluster (the ring size follows warmth) recreates its hosts: their
  counters restart at 0 and requests still in flight stay on the old host objects,
  invisible per host. The cluster-wide ``upstream_rq_active`` gauge keeps counting them,
  so while it exceeds the sum of the hosts' ``rq_active``, hosts that were busy before the
  reset still count as busy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from control_plane.runtime.envoy_admin import EnvoyHost

ACTIVE_STAT_SUFFIX = ".upstream_rq_active"


def parse_cluster_active(data: Mapping[str, Any]) -> dict[str, int]:
    """Cluster name -> upstream_rq_active from ``/stats?format=json&filter=...``."""
    active = {}
    for stat in data.get("stats", []) or []:
        name = str(stat.get("name", ""))
        if name.startswith("cluster.") and name.endswith(ACTIVE_STAT_SUFFIX):
            active[name[len("cluster."):-len(ACTIVE_STAT_SUFFIX)]] = int(stat.get("value", 0) or 0)
    return active


@dataclass
class _Host:
    rq_success: int
    rq_active: int
    cx_connect_fail: int = 0
    busy: bool = False
    connect_failed_at: float | None = None  # a poll saw failed connections, none answered
    hidden: bool = False  # was busy when its counters reset: maybe still busy, unseen
    last_traffic: float | None = None


class TrafficTracker:
    """Per (pool, endpoint id): last real traffic and whether it is being served now.

    Several Envoys (sources) can feed it; a host is busy if any of them says so.
    """

    def __init__(self) -> None:
        # (pool, endpoint id) -> source -> counters
        self._hosts: dict[tuple[str, str], dict[str, _Host]] = {}

    def observe(self, source: str, now: float, hosts: Iterable[EnvoyHost],
                cluster_active: Mapping[str, int] | None = None) -> None:
        """One poll of one Envoy admin. ``cluster_active``: its per-cluster active gauges."""
        seen_active: dict[str, int] = {}
        for counters in hosts:
            seen_active[counters.cluster] = (seen_active.get(counters.cluster, 0)
                                             + counters.rq_active)
            by_source = self._hosts.setdefault((counters.cluster, counters.hostname), {})
            previous = by_source.get(source)
            if previous is None:
                # A baseline: counts from before the prober looked say nothing about now.
                host = _Host(counters.rq_success, counters.rq_active, counters.cx_connect_fail)
                if counters.rq_active > 0:
                    host.busy, host.last_traffic = True, now
                by_source[source] = host
                continue
            served = False
            if counters.rq_success < previous.rq_success:  # counters reset (cluster rebuilt)
                served = counters.rq_success > 0
                previous.hidden = previous.hidden or previous.rq_active > 0 or previous.busy
                failed = counters.cx_connect_fail
            else:
                served = counters.rq_success > previous.rq_success
                failed = counters.cx_connect_fail - previous.cx_connect_fail
            if failed > 0:  # with or without answers: a host dying mid-poll has both
                previous.connect_failed_at = now
            elif served:
                previous.connect_failed_at = None
            previous.cx_connect_fail = counters.cx_connect_fail
            previous.rq_success = counters.rq_success
            previous.rq_active = counters.rq_active
            previous.busy = counters.rq_active > 0
            if served or previous.busy:
                previous.last_traffic = now
        for (cluster, _), by_source in self._hosts.items():
            maybe = by_source.get(source)
            if maybe is None or not maybe.hidden:
                continue
            hidden = (cluster_active or {}).get(cluster, 0) - seen_active.get(cluster, 0)
            if hidden > 0:
                maybe.busy, maybe.last_traffic = True, now
            else:
                maybe.hidden = False

    def forget(self, source: str) -> None:
        """An Envoy is unreachable: its old counters no longer say anything."""
        for by_source in self._hosts.values():
            by_source.pop(source, None)

    def connect_failed_at(self, pool: str, endpoint_id: str) -> float | None:
        """When a poll last saw some Envoy's connections to it fail, unless that Envoy saw
        it answer since without failing: real traffic says it may be dead."""
        times = [h.connect_failed_at for h in self._hosts.get((pool, endpoint_id), {}).values()
                 if h.connect_failed_at is not None]
        return max(times) if times else None

    def busy(self, pool: str, endpoint_id: str) -> bool:
        return any(h.busy for h in self._hosts.get((pool, endpoint_id), {}).values())

    def last_traffic(self, pool: str, endpoint_id: str) -> float | None:
        times = [h.last_traffic for h in self._hosts.get((pool, endpoint_id), {}).values()
                 if h.last_traffic is not None]
        return max(times) if times else None

    def served_within(self, pool: str, endpoint_id: str, seconds: float, now: float) -> bool:
        """Busy now, or served real traffic in the last ``seconds``."""
        if self.busy(pool, endpoint_id):
            return True
        last = self.last_traffic(pool, endpoint_id)
        return last is not None and now - last < seconds
