"""Warmth from real traffic, pure parts: access-log entries, the window, the judge, and the
scheduler acting on verdicts."""

from __future__ import annotations

import os
import random

import pytest
from envoy.extensions.access_loggers.open_telemetry.v3 import logs_service_pb2 as otel_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2

from control_plane.config.model import (
    Config,
    Endpoint,
    GatewaySettings,
    Pool,
    Source,
    WarmState,
    Warmup,
)
from control_plane.prober import scheduler as sched
from control_plane.prober.service import traffic_report
from control_plane.traffic.entries import BODY_FORMAT, FIELDS, SEPARATOR, observe
from control_plane.traffic.judge import judge, merge, percentile
from control_plane.traffic.service import (
    LOG_RECORDS,
    SCOPE_LOGS,
    SILENT_S,
    YIELD_EVERY,
    AccessLogServicer,
)
from control_plane.traffic.window import (
    LOW_RATE_HORIZON_S,
    LOW_RATE_SAMPLES,
    STALE_FLIGHT_S,
    EndpointTraffic,
    Sample,
    TrafficWindow,
)
from control_plane.translate.listeners import (
    ACCESS_LOG_BUFFER_BYTES,
    ACCESS_LOG_FLUSH_S,
    build_listener,
)

NOW = 1_700_000_000.0


def entry(stream: str = "1", first_byte_ms: float | None = 120.0, elapsed_ms: float = 500.0,
          final: bool = True, body: int = 2048, cluster: str = "chat",
          address: str = "10.0.0.1", port: int = 8000, failure: bool = False,
          session_hash: str | None = "h-0011223344556677", status: int = 200,
          ring_hash: str | None = None, split: tuple[str, str] | None = None) -> str:
    """A record body as Envoy formats BODY_FORMAT (absent values: "-")."""
    values = {
        "pool": cluster or "-", "host": f"{address}:{port}" if address else "-",
        "stream": stream, "type": "DownstreamEnd" if final else "DownstreamPeriodic",
        "first_body_ms": "-" if first_byte_ms is None else f"{first_byte_ms:g}",
        "elapsed_ms": f"{elapsed_ms:g}", "request_bytes": str(body), "status": str(status),
        "flags": "UF,URX" if failure else "-", "session_hash": session_hash or "-",
        "ring_hash": ring_hash or "-", "split_arm": split[1] if split else "-",
        "split_model": split[0] if split else "-",
    }
    return SEPARATOR.join(values[name] for name, _ in FIELDS)


def test_an_entry_becomes_an_observation() -> None:
    obs = observe("envoy-1", entry())
    assert obs is not None
    assert (obs.pool, obs.address, obs.stream) == ("chat", "10.0.0.1:8000", ("envoy-1", "1"))
    assert (obs.first_byte_ms, obs.elapsed_ms, obs.request_bytes) == (120.0, 500.0, 2048)
    assert obs.final and not obs.upstream_failure and obs.session_hash == "h-0011223344556677"
    waiting = observe("envoy-1", entry(first_byte_ms=None, final=False))
    assert waiting is not None and waiting.first_byte_ms is None and not waiting.final


def test_entries_no_upstream_served_are_not_observations() -> None:
    assert observe("e", entry(cluster="")) is None  # a direct response (/v1/models, 404)
    assert observe("e", entry(address="")) is None


def feed(window: TrafficWindow, *entries: str,
         at: float = NOW) -> None:
    for item in entries:
        obs = observe("envoy-1", item)
        assert obs is not None
        window.observe(obs, at)


def one(window: TrafficWindow, at: float = NOW) -> EndpointTraffic:
    summary = window.summary(at)
    assert list(summary) == [("chat", "10.0.0.1:8000")]
    return summary[("chat", "10.0.0.1:8000")]


def test_the_window_counts_finished_and_waiting_requests() -> None:
    window = TrafficWindow(window_s=10)
    window.connected(NOW - 20)
    feed(window, entry("1", 100), entry("2", 300), entry("3", None, 700, final=False))
    traffic = one(window, NOW + 2)
    assert traffic.requests == 2 and traffic.rps == pytest.approx(0.2)
    # The request still waiting counts with its age so far: 700 ms plus 2 s since.
    assert sorted(s.ttft_ms for s in traffic.samples) == [100, 300, 2700]
    assert [s.waiting for s in traffic.samples if s.ttft_ms == 2700] == [True]


def test_a_request_that_got_its_first_byte_counts_while_it_streams() -> None:
    window = TrafficWindow()
    window.connected(NOW)
    feed(window, entry("1", 150, final=False))
    assert [(s.ttft_ms, s.waiting) for s in one(window).samples] == [(150, False)]
    feed(window, entry("1", 150, final=True))
    traffic = one(window)
    assert [(s.ttft_ms, s.waiting) for s in traffic.samples] == [(150, False)]
    assert traffic.requests == 1  # the periodic and the final entry are one request


def test_abandoned_and_failed_requests() -> None:
    window = TrafficWindow()
    window.connected(NOW)
    feed(window, entry("1", None, 9000), entry("2", None, 30, failure=True))
    traffic = one(window)
    assert (traffic.requests, traffic.abandoned, traffic.failures) == (2, 1, 1)
    # The abandoned request waited 9 s for nothing: a lower bound of its TTFT.
    assert [(s.ttft_ms, s.waiting) for s in traffic.samples] == [(9000, True)]


def test_old_requests_leave_the_window_and_silent_flights_are_dropped() -> None:
    window = TrafficWindow(window_s=10)
    window.connected(NOW)
    feed(window, entry("1", 100), entry("2", None, 500, final=False))
    assert one(window, NOW + 9).requests == 1
    assert window.summary(NOW + STALE_FLIGHT_S + 6) == {}


def test_a_low_rate_endpoint_keeps_its_last_samples_while_it_serves() -> None:
    window = TrafficWindow(window_s=10)
    window.connected(NOW - 100)
    # A request every 12 s, each slow: one per window, never enough for a verdict alone.
    for n, at in enumerate((NOW - 80, NOW - 48, NOW - 36, NOW - 24, NOW - 12, NOW)):
        feed(window, entry(str(n), 8000), at=at)
    traffic = one(window, NOW + 1)
    assert traffic.requests == 1  # the rate is the window's
    # The last LOW_RATE_SAMPLES within LOW_RATE_HORIZON_S stay samples: NOW - 80 is too old.
    assert len(traffic.samples) == LOW_RATE_SAMPLES == 4
    verdict = judge(traffic, cold_ttft_ms=1000, prefill_ms_per_kib=0)
    assert verdict is not None and verdict.slow
    # Nothing within the window and nothing in flight: idle, the probes decide.
    assert window.summary(NOW + 11) == {}


def test_a_low_rate_endpoint_with_a_request_in_flight_keeps_its_samples() -> None:
    window = TrafficWindow(window_s=10)
    window.connected(NOW - 100)
    feed(window, entry("1", 100), at=NOW - 30)
    feed(window, entry("2", None, 500, final=False), at=NOW - 1)
    traffic = one(window, NOW)
    assert sorted((s.ttft_ms, s.waiting) for s in traffic.samples) == [(100, False),
                                                                       (1500, True)]
    assert traffic.requests == 0
    assert LOW_RATE_HORIZON_S >= 30


def test_a_window_without_a_stream_says_it_has_no_data() -> None:
    window = TrafficWindow(window_s=10)
    feed(window, entry("1", 100))
    traffic = one(window)
    assert traffic.covered_s == 0 and traffic.rps == 0
    window.connected(NOW)
    assert one(window, NOW + 4).covered_s == 4
    window.disconnected(NOW + 5)
    assert one(window, NOW + 6).covered_s == 0


def traffic_of(*samples: Sample) -> EndpointTraffic:
    return EndpointTraffic(samples=samples, requests=len(samples), abandoned=0, failures=0,
                           rps=2.0, covered_s=10.0)


def test_judge_fast_slow_and_too_little() -> None:
    fast = traffic_of(*[Sample(100, 1000)] * 9, Sample(900, 1000))
    verdict = judge(fast, cold_ttft_ms=1000, prefill_ms_per_kib=0)
    assert verdict is not None and not verdict.slow and verdict.p90_ms == 100
    slow = traffic_of(*[Sample(8000, 1000)] * 5)
    verdict = judge(slow, cold_ttft_ms=1000, prefill_ms_per_kib=0)
    assert verdict is not None and verdict.slow and verdict.samples == 5
    assert judge(traffic_of(Sample(8000, 0)), cold_ttft_ms=1000) is None


def test_long_prompts_do_not_make_a_healthy_host_look_cold() -> None:
    # TTFT proportional to prompt size, 30 ms per KiB: a healthy host with 100 KiB prompts.
    samples = [Sample(30 * kib + 80, kib * 1024) for kib in (10, 40, 100, 100, 60)]
    assert judge(traffic_of(*samples), cold_ttft_ms=1000, prefill_ms_per_kib=50).slow is False
    # The same times on short prompts are a slow host.
    short = [Sample(s.ttft_ms, 512) for s in samples]
    assert judge(traffic_of(*short), cold_ttft_ms=1000, prefill_ms_per_kib=50).slow is True


def test_waiting_requests_count_only_once_past_the_threshold() -> None:
    young = [Sample(300, 0, waiting=True)] * 5
    assert judge(traffic_of(*young), cold_ttft_ms=1000) is None  # not yet known
    hung = [Sample(100, 0)] * 2 + [Sample(2500, 0, waiting=True)] * 3
    verdict = judge(traffic_of(*hung), cold_ttft_ms=1000, prefill_ms_per_kib=0)
    assert verdict is not None and verdict.slow


@given(st.lists(st.floats(0, 1e6, allow_nan=False), min_size=1, max_size=50),
       st.floats(0.01, 1))
def test_percentile_is_a_sample_and_ordered(values: list[float], q: float) -> None:
    value = percentile(values, q)
    assert value in values
    assert percentile(values, 0.5) <= percentile(values, 0.9)


def test_merge_adds_control_planes() -> None:
    a, b = traffic_of(Sample(100, 0)), traffic_of(Sample(200, 0), Sample(300, 0))
    merged = merge([a, b])
    assert merged is not None
    assert (merged.requests, merged.rps, len(merged.samples)) == (3, 4.0, 3)
    assert merge([]) is None


def test_the_control_plane_report_round_trips() -> None:
    report = {"window_s": 10, "endpoints": [
        {"pool": "chat", "endpoint": "gpu-0", "address": "10.0.0.1:8000", "requests": 2,
         "abandoned": 0, "failures": 0, "rps": 0.2, "covered_s": 10,
         "samples": [[100.0, 10, 0], [2500.0, 0, 1]]},
        {"pool": "chat", "endpoint": None, "address": "10.0.0.9:1", "requests": 1,
         "abandoned": 0, "failures": 0, "rps": 0.1, "covered_s": 10, "samples": []}]}
    parsed = traffic_report(report)
    assert list(parsed) == [("chat", "gpu-0")]
    assert parsed[("chat", "gpu-0")].samples == (Sample(100.0, 10), Sample(2500.0, 0, True))


# -- the scheduler acting on verdicts ------------------------------------------------------

POOL = Pool(name="chat", models=("m",), warmup=Warmup(interval_s=10, cold_ttft_ms=1000))
ENDPOINT = Endpoint(pool="chat", id="gpu-0", address="10.0.0.1", port=8000)
KEY = ("chat", "gpu-0")
CONFIG = Config(pools={"chat": POOL}, endpoints={"chat": {"gpu-0": ENDPOINT}})


def leader() -> sched.Scheduler:
    scheduler = sched.Scheduler(sched.Policy(system_prompt="s", prefill_ms_per_kib=0),
                                rng=random.Random(1))
    scheduler.lead(True)
    scheduler.reconcile(CONFIG, 0.0, NOW)
    return scheduler


def test_real_traffic_judges_and_no_probe_is_sent() -> None:
    scheduler = leader()
    events = scheduler.traffic_seen({KEY: traffic_of(*[Sample(120, 0)] * 6)})
    assert [type(e) for e in events] == [sched.Judged]
    actions = scheduler.decide(5.0, NOW + 5)
    assert not any(isinstance(a, sched.Probe) for a in actions)
    assert sched.Skipped(KEY, sched.SkipReason.TRAFFIC) in actions
    writes = [a for a in actions if isinstance(a, sched.WriteStatus)]
    assert len(writes) == 1
    status = writes[0].status
    assert status.state is WarmState.WARM and status.source is Source.TRAFFIC
    assert status.traffic is not None and status.traffic.p90_ms == 120


def test_slow_traffic_turns_a_busy_host_cold_after_fall_verdicts() -> None:
    scheduler = leader()
    scheduler.traffic_seen({KEY: traffic_of(*[Sample(120, 0)] * 6)})
    slow = {KEY: traffic_of(*[Sample(8000, 0, waiting=True)] * 6)}
    first = scheduler.traffic_seen(slow)
    assert isinstance(first[0], sched.Judged) and not first[0].changed
    second = scheduler.traffic_seen(slow)
    assert isinstance(second[0], sched.Judged) and second[0].changed
    assert scheduler.tracked[KEY].warmth.state is WarmState.COLD
    assert scheduler.tracked[KEY].warmth.ttft_ms == 8000


def test_without_enough_traffic_probes_decide_again() -> None:
    scheduler = leader()
    scheduler.traffic_seen({KEY: traffic_of(*[Sample(120, 0)] * 6)})
    scheduler.traffic_seen({KEY: traffic_of(Sample(120, 0))})  # too little now
    actions = scheduler.decide(5.0, NOW + 5)
    assert any(isinstance(a, sched.Probe) for a in actions)


# --- the stream's config (translate/listeners.py) and what entries.py reads from it --------


def _stream_config(settings: GatewaySettings) -> tuple[hcm_pb2.HttpConnectionManager,
                                                       otel_pb2.OpenTelemetryAccessLogConfig
                                                       | None]:
    hcm = hcm_pb2.HttpConnectionManager()
    assert build_listener(settings).filter_chains[0].filters[0].typed_config.Unpack(hcm)
    for log in hcm.access_log:
        if log.name == "envoy.access_loggers.open_telemetry":
            stream = otel_pb2.OpenTelemetryAccessLogConfig()
            assert log.typed_config.Unpack(stream)
            assert not log.HasField("filter")  # every request: never sampled
            return hcm, stream
    return hcm, None


def test_the_stream_formats_what_entries_reads_and_batches_64_kib() -> None:
    hcm, stream = _stream_config(GatewaySettings())
    assert stream is not None
    assert stream.body.string_value == BODY_FORMAT
    assert BODY_FORMAT.count("%") == 2 * len(FIELDS)  # one operator per field
    assert not stream.disable_builtin_labels  # node_name: which Envoy sent it
    common = stream.common_config
    assert common.buffer_size_bytes.value == ACCESS_LOG_BUFFER_BYTES == 65536
    assert common.buffer_flush_interval.ToMilliseconds() == ACCESS_LOG_FLUSH_S * 1000
    assert hcm.access_log_options.access_log_flush_interval.ToMilliseconds() == 1000


def test_without_the_stream_no_logger_and_no_periodic_entries() -> None:
    hcm, stream = _stream_config(GatewaySettings(traffic_stream=False))
    assert stream is None
    assert not hcm.HasField("access_log_options")  # no timer per request for nobody
    assert [log.name for log in hcm.access_log] == ["envoy.access_loggers.file"]


def test_an_entry_as_envoy_sends_it_gives_every_field_the_consumers_need() -> None:
    obs = observe("envoy-1", entry(first_byte_ms=None, elapsed_ms=1000.0, final=False,
                                   status=0, ring_hash="7c2bab23758a2d02", split=("m x", "1")))
    assert obs is not None and not obs.final and obs.first_byte_ms is None
    assert (obs.elapsed_ms, obs.status, obs.request_bytes) == (1000.0, 0, 2048)
    assert obs.ring_hash == 0x7C2BAB23758A2D02 and obs.split == ("m x", "1")
    assert obs.session_hash == "h-0011223344556677" and obs.address == "10.0.0.1:8000"


def test_records_that_are_not_ours_or_malformed_are_not_observations() -> None:
    assert observe("e", "") is None
    assert observe("e", "some other logger's line") is None
    assert observe("e", entry() + SEPARATOR) is None  # a field too many
    obs = observe("e", entry().replace("2048", "not-a-number"))
    assert obs is not None and obs.request_bytes == 0  # an unreadable number is absent
    quoted = observe("e", entry().replace("h-0011223344556677", '"h-0011223344556677"'))
    assert quoted is not None and quoted.session_hash == "h-0011223344556677"




# --- the receiver (traffic/service.py) fed exports without gRPC ---------------------------


def export(node: str, *bodies: str) -> logs_service_pb2.ExportLogsServiceRequest:
    """An export as Envoy's OpenTelemetry logger sends it: node_name among the resource
    attributes (its built-in labels), the records under one scope."""
    request = logs_service_pb2.ExportLogsServiceRequest()
    resource_logs = request.resource_logs.add()
    for key, value in (("log_name", "hotpath"), ("node_name", node)):
        resource_logs.resource.attributes.add(key=key).value.string_value = value
    scope = getattr(resource_logs, SCOPE_LOGS).add()
    for body in bodies:
        getattr(scope, LOG_RECORDS).add().body.string_value = body
    return request


def test_the_receiver_counts_each_envoy_and_its_silence_is_no_data() -> None:
    clock = [NOW]
    servicer = AccessLogServicer(TrafficWindow(window_s=10), lambda pool, address: "gpu-1",
                                 clock=lambda: clock[0])
    servicer.receive(export("envoy-a", entry("1", 100), entry("2", None, 300, final=False)))
    servicer.receive(export("envoy-b", entry("1", 200), "not a record of ours"))
    assert servicer.entries.values == {(("envoy", "envoy-a"),): 2, (("envoy", "envoy-b"),): 2}
    clock[0] = NOW + 4
    report = servicer.report()
    [endpoint] = report["endpoints"]
    # Same stream id from two Envoys: two requests; the one in flight is a waiting sample.
    assert (endpoint["endpoint"], endpoint["requests"], endpoint["covered_s"]) == ("gpu-1", 2, 4)
    assert sorted(s[0] for s in endpoint["samples"]) == [100, 200, 4300]
    clock[0] = NOW + 10 + SILENT_S  # every Envoy silent: the window has no data
    assert servicer.report()["endpoints"] == []
    servicer.receive(export("envoy-a", entry("3", 150)))
    clock[0] += 2
    [endpoint] = servicer.report()["endpoints"]
    assert endpoint["covered_s"] == 2 and endpoint["requests"] == 1


def test_the_receiver_gives_the_core_back_between_records(
        monkeypatch: pytest.MonkeyPatch) -> None:
    yields: list[int] = []
    servicer = AccessLogServicer(TrafficWindow(window_s=10), lambda pool, address: "gpu-1",
                                 clock=lambda: NOW)
    monkeypatch.setattr(os, "sched_yield", lambda: yields.append(len(yields)))
    records = [entry(str(n), 100) for n in range(10 * YIELD_EVERY + 1)]
    servicer.receive(export("envoy-a", *records))
    assert len(yields) == 10
    assert servicer.window.summary(NOW)[("chat", "10.0.0.1:8000")].requests == len(records)
