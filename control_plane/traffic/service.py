"""The access-log receiver the control plane serves to its Envoys (the IO shell).

Each Envoy exports a record per request (and per flush interval while it is in flight) to
the control plane it gets its config from, on the same port as ADS: OpenTelemetry's
``LogsService/Export``, a unary call per flush (translate/listeners.py configures it). Each
record becomes an observation in the ``TrafficWindow``; the prober reads the windows of
every control plane (``/traffic``), so each Envoy counts once. A failed export never
disturbs a request: Envoy drops the records it cannot send (its
``access_logs.open_telemetry_access_log.logs_dropped`` counter) and tries again at the next
flush.

The window's coverage (how much of it some Envoy was reporting): an Envoy counts from its
first export until ``SILENT_S`` after its last; it exports only when it has records, so an
idle Envoy stops counting, and its absence is reported as no data, never as no traffic.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.logs.v1 import logs_pb2

from control_plane.runtime.metrics import Family, Histogram
from control_plane.traffic.entries import Observation, observe
from control_plane.traffic.window import DEFAULT_WINDOW_S, TrafficWindow

log = logging.getLogger(__name__)

Resolve = Callable[[str, str], str | None]  # (pool, "ip:port") -> endpoint id
SERVICE = "opentelemetry.proto.collector.logs.v1.LogsService"
# The resource attribute Envoy's logger sets to its node id (a built-in label).
NODE_ATTRIBUTE = "node_name"
# An Envoy silent this long no longer covers the window (it exports every flush, 1 s, while
# it has records): one window.
SILENT_S = DEFAULT_WINDOW_S
# The OTLP copy in xds-protos predates the rename of instrumentation_library_logs / logs to
# scope_logs / log_records (same field numbers, so the same bytes on the wire).
_FIELDS = logs_pb2.ResourceLogs.DESCRIPTOR.fields_by_name
SCOPE_LOGS = "scope_logs" if "scope_logs" in _FIELDS else "instrumentation_library_logs"
LOG_RECORDS = ("log_records" if SCOPE_LOGS == "scope_logs" else "logs")
# The receiver gives its core back every YIELD_EVERY records (~50 us of work): Envoy's
# workers share the cores with the control plane (`hotpath up`, compose on one host), and a
# worker woken behind an export (hundreds of records) otherwise waits for the scheduler's
# slice. hotpath's added p99 at 1 connection (benchmarks/gateway_cost.py's stack and wrk
# helpers, 16 KiB exports, 1 KiB, 2 cores, 3 runs each): no yield 2.2-2.4 ms; every 32
# records 1.05-1.17; every 8 0.83-0.94; every 4 0.59-0.72; every record 0.60-0.78.
YIELD_EVERY = 4


def node_of(resource_logs: Any) -> str:
    for attribute in resource_logs.resource.attributes:
        if attribute.key == NODE_ATTRIBUTE:
            return str(attribute.value.string_value) or "?"
    return "?"


class AccessLogServicer:
    def __init__(self, window: TrafficWindow, resolve: Resolve,
                 clock: Callable[[], float] = time.time) -> None:
        self.window = window
        self.resolve = resolve
        self.clock = clock
        self._reporting: dict[str, float] = {}  # Envoy node -> its last export
        self.entries = Family("hotpath_traffic_entries_total", "counter",
                              "access-log records received, by Envoy", ("envoy",))
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
        handler = grpc.unary_unary_rpc_method_handler(
            self.Export,
            request_deserializer=logs_service_pb2.ExportLogsServiceRequest.FromString,
            response_serializer=logs_service_pb2.ExportLogsServiceResponse.SerializeToString)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, {"Export": handler}),))

    def families(self) -> list[Family]:
        return [self.entries, self.requests, self.abandoned, self.ttft, self.split_requests,
                self.split_errors, self.split_ttft]

    async def Export(  # noqa: N802 (gRPC method name)
        self, request: logs_service_pb2.ExportLogsServiceRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> logs_service_pb2.ExportLogsServiceResponse:
        self.receive(request)
        return logs_service_pb2.ExportLogsServiceResponse()

    def receive(self, request: logs_service_pb2.ExportLogsServiceRequest) -> None:
        """One export: every record into the window and the counters."""
        now = self.clock()
        self.expire(now)
        for resource_logs in request.resource_logs:
            node = node_of(resource_logs)
            if node not in self._reporting:
                self.window.connected(now)
                log.info("access-log records from envoy %s", node)
            self._reporting[node] = now
            count = 0
            for scope_logs in getattr(resource_logs, SCOPE_LOGS):
                for record in getattr(scope_logs, LOG_RECORDS):
                    count += 1
                    if count % YIELD_EVERY == 0:
                        os.sched_yield()
                    obs = observe(node, record.body.string_value)
                    if obs is None:
                        continue
                    self.window.observe(obs, now)
                    if obs.final:
                        self._count(obs.pool, obs.address, obs.first_byte_ms,
                                    obs.first_byte_ms is None and not obs.upstream_failure)
                        if obs.split is not None:
                            self._count_split(obs)
            self.entries.inc(node, by=count)

    def expire(self, now: float) -> None:
        """Envoys silent for SILENT_S stop covering the window."""
        for node, last in list(self._reporting.items()):
            if now - last > SILENT_S:
                del self._reporting[node]
                self.window.disconnected(last + SILENT_S)
                log.info("access-log records from envoy %s: none for %.0f s", node, SILENT_S)

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
        self.expire(now)
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
