"""The gRPC access-log service the control plane serves to its Envoys (the IO shell).

Envoy streams an entry per request (and per flush interval while it is in flight) to the
control plane it gets its config from, on the same port as ADS (translate/listeners.py
configures it). Each entry becomes an observation in the ``TrafficWindow``; the prober reads
the windows of every control plane (``/traffic``), so each Envoy counts once. A broken
stream never disturbs a request: Envoy drops entries it cannot send (its
``access_logs.grpc_access_log.logs_dropped`` counter) and reconnects.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import grpc
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc

from control_plane.runtime.metrics import Family, Histogram
from control_plane.traffic.entries import Observation, observe
from control_plane.traffic.window import TrafficWindow

log = logging.getLogger(__name__)

Resolve = Callable[[str, str], str | None]  # (pool, "ip:port") -> endpoint id


class AccessLogServicer(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    def __init__(self, window: TrafficWindow, resolve: Resolve,
                 clock: Callable[[], float] = time.time) -> None:
        self.window = window
        self.resolve = resolve
        self.clock = clock
        self.entries = Family("hotpath_traffic_entries_total", "counter",
                              "access-log entries received, by Envoy", ("envoy",))
        self.requests = Family("hotpath_traffic_requests_total", "counter",
                               "requests that ended, by endpoint", ("pool", "endpoint"))
        self.abandoned = Family("hotpath_traffic_abandoned_total", "counter",
                                "requests that ended before their first token (client gone "
                                "or idle timeout), by endpoint", ("pool", "endpoint"))
        self.ttft = Histogram("hotpath_endpoint_ttft_seconds",
                              "time to first token, by endpoint and signal",
                              ("pool", "endpoint", "source"))
        # Splits (docs/splits.md): per (model, arm) side by side.
        self.split_requests = Family("hotpath_split_requests_total", "counter",
                                     "requests of a split that ended, by model and arm",
                                     ("model", "arm", "pool"))
        self.split_errors = Family("hotpath_split_errors_total", "counter",
                                   "requests of a split that ended in a 5xx or with no host "
                                   "answering, by model and arm", ("model", "arm", "pool"))
        self.split_ttft = Histogram("hotpath_split_ttft_seconds",
                                    "time to first token of a split's requests, by model "
                                    "and arm", ("model", "arm", "pool"))

    def add_to(self, server: grpc.aio.Server) -> None:
        als_pb2_grpc.add_AccessLogServiceServicer_to_server(self, server)

    def families(self) -> list[Family]:
        return [self.entries, self.requests, self.abandoned, self.ttft, self.split_requests,
                self.split_errors, self.split_ttft]

    async def StreamAccessLogs(  # noqa: N802 (gRPC method name)
        self, request_iterator: AsyncIterator[als_pb2.StreamAccessLogsMessage],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> als_pb2.StreamAccessLogsResponse:
        node = "?"
        self.window.connected(self.clock())
        try:
            async for message in request_iterator:
                if message.HasField("identifier"):  # the first message of a stream
                    node = message.identifier.node.id or node
                    log.info("access-log stream from envoy %s", node)
                now = self.clock()
                entries = message.http_logs.log_entry
                self.entries.inc(node, by=len(entries))
                for entry in entries:
                    obs = observe(node, entry)
                    if obs is None:
                        continue
                    self.window.observe(obs, now)
                    if obs.final:
                        self._count(obs.pool, obs.address, obs.first_byte_ms,
                                    obs.first_byte_ms is None and not obs.upstream_failure)
                        if obs.split is not None:
                            self._count_split(obs)
        finally:
            self.window.disconnected(self.clock())
        return als_pb2.StreamAccessLogsResponse()

    def _count(self, pool: str, address: str, first_byte_ms: float | None,
               abandoned: bool) -> None:
        endpoint = self.resolve(pool, address) or address
        self.requests.inc(pool, endpoint)
        if abandoned:
            self.abandoned.inc(pool, endpoint)
        if first_byte_ms is not None:
            self.ttft.observe(first_byte_ms / 1000, pool, endpoint, "traffic")

    def _count_split(self, obs: Observation) -> None:
        assert obs.split is not None
        labels = (*obs.split, obs.pool)
        self.split_requests.inc(*labels)
        if obs.upstream_failure or obs.status >= 500:
            self.split_errors.inc(*labels)
        if obs.first_byte_ms is not None:
            self.split_ttft.observe(obs.first_byte_ms / 1000, *labels)

    def report(self) -> Mapping[str, Any]:
        """``/traffic``: the window per endpoint, for the prober (which merges control
        planes) and `hotpath status`. Samples are ``[ttft_ms, request_bytes, waiting]``;
        ``requests_total`` counts since this control plane started, across cluster updates
        (Envoy's own per-host counters restart when a cluster is re-created)."""
        now = self.clock()
        endpoints = []
        for (pool, address), traffic in sorted(self.window.summary(now).items()):
            endpoints.append({
                "pool": pool, "endpoint": self.resolve(pool, address), "address": address,
                "requests": traffic.requests, "abandoned": traffic.abandoned,
                "failures": traffic.failures, "rps": round(traffic.rps, 3),
                "covered_s": round(traffic.covered_s, 3),
                "samples": [[round(s.ttft_ms, 1), s.request_bytes, int(s.waiting)]
                            for s in traffic.samples],
            })
        totals = {(labels[0][1], labels[1][1]): int(value)
                  for labels, value in self.requests.values.items()}
        return {"window_s": self.window.window_s, "at": round(now, 3), "endpoints": endpoints,
                "requests_total": [{"pool": pool, "endpoint": endpoint, "requests": count}
                                   for (pool, endpoint), count in sorted(totals.items())]}
