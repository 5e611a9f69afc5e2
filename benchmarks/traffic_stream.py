"""What the access-log stream (Envoy -> control plane, every request's timings) costs.

Two parts, one run, on this machine; everything binds 127.0.0.1 and every loop is bounded.

1. Envoy CPU per request with and without the stream. One etcd, one tiny JSON upstream, and
   two stacks (control plane + Envoy) that differ only in ``--no-traffic-stream``. Each
   variant gets a warm-up, then a bounded closed loop (``--requests`` POST
   /v1/chat/completions, ``--concurrency`` in flight, rotating x-session-id) run A B A B;
   Envoy CPU per request is delta(utime+stime of /proc/<envoy>/stat) / requests, read after
   a pause of one flush interval so the stream's last flush counts. Medians of the rounds.
   The control plane's CPU per request and the entries it received are shown alongside.
2. The consumer's CPU per 1,000 entries. An in-process grpc.aio server with
   ``AccessLogServicer(TrafficWindow(), resolve)`` on a free port; a sender process (this
   file, ``--sender PORT RATE SECONDS``) streams HTTPAccessLogEntry batches shaped like
   Envoy's (custom tags, 100 upstream endpoints, session_hash metadata, periodic and final
   entries, ~16 KiB per message like Envoy's buffer) at ``--rate`` entries/s for
   ``--seconds``. The receiver's CPU is time.process_time() from stream start to stream
   end. Then ``report()`` is called once and timed. The same messages are also fed to the
   servicer without gRPC (parse, then handler) to split the cost.

    .venv/bin/python benchmarks/traffic_stream.py [--requests 20000] [--concurrency 16]
        [--rounds 2] [--rate 10000] [--seconds 10] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import pstats
import random
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # before grpc loads: no fork() notices

from envoy.data.accesslog.v3 import accesslog_pb2  # noqa: E402
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc  # noqa: E402

from control_plane.contract import ACCESS_LOG_NAME, LUA_METADATA_NS  # noqa: E402
from control_plane.traffic.entries import (  # noqa: E402
    SESSION_HASH_KEY,
    TAG_ELAPSED_MS,
    TAG_FIRST_BODY_MS,
)

POOL = "chat"
ENDPOINTS = 100
ENVOY_BUFFER_BYTES = 16384  # the gRPC access logger's default buffer_size_bytes
FLUSH_S = 1.0  # translate/listeners.py ACCESS_LOG_FLUSH_S


def endpoint_address(index: int) -> tuple[str, int]:
    return f"127.20.{index // 250}.{index % 250 + 1}", 8000  # data only, never dialled


# --- the synthetic Envoy (the sender process) -------------------------------------------


def _entry(rng: random.Random, stream_id: int, endpoint: int, final: bool,
           elapsed_ms: int, first_byte_ms: int | None) -> accesslog_pb2.HTTPAccessLogEntry:
    """An entry with the fields Envoy 1.40 fills for a proxied chat request."""
    entry = accesslog_pb2.HTTPAccessLogEntry()
    entry.protocol_version = accesslog_pb2.HTTPAccessLogEntry.HTTP11
    common = entry.common_properties
    common.downstream_remote_address.socket_address.address = "127.0.0.1"
    common.downstream_remote_address.socket_address.port_value = 40000 + stream_id % 20000
    common.downstream_local_address.socket_address.address = "127.0.0.1"
    common.downstream_local_address.socket_address.port_value = 10000
    common.downstream_direct_remote_address.CopyFrom(common.downstream_remote_address)
    address, port = endpoint_address(endpoint)
    common.upstream_remote_address.socket_address.address = address
    common.upstream_remote_address.socket_address.port_value = port
    common.upstream_local_address.socket_address.address = "127.20.255.1"
    common.upstream_local_address.socket_address.port_value = 30000 + stream_id % 30000
    common.upstream_cluster = POOL
    common.route_name = f"{POOL}/m{endpoint % 4}"
    common.start_time.FromMilliseconds(1_700_000_000_000 + stream_id)
    common.time_to_last_rx_byte.FromMilliseconds(1)
    common.time_to_first_upstream_tx_byte.FromMicroseconds(900)
    common.time_to_last_upstream_tx_byte.FromMicroseconds(950)
    common.stream_id = f"{stream_id:08x}-{rng.getrandbits(32):08x}-4c1f-9a7e-{stream_id:012x}"
    common.intermediate_log_entry = not final
    common.access_log_type = (accesslog_pb2.DownstreamEnd if final
                              else accesslog_pb2.DownstreamPeriodic)
    common.upstream_transport_failure_reason = ""
    common.custom_tags[TAG_FIRST_BODY_MS] = "-" if first_byte_ms is None else str(first_byte_ms)
    common.custom_tags[TAG_ELAPSED_MS] = str(elapsed_ms)
    common.metadata.filter_metadata[LUA_METADATA_NS].update(
        {SESSION_HASH_KEY: f"{rng.getrandbits(64):016x}"})
    if first_byte_ms is not None:
        common.time_to_first_upstream_rx_byte.FromMilliseconds(first_byte_ms)
    if final:
        common.duration.FromMilliseconds(elapsed_ms)
        common.time_to_last_upstream_rx_byte.FromMilliseconds(elapsed_ms)
        common.time_to_first_downstream_tx_byte.FromMilliseconds(first_byte_ms or elapsed_ms)
        common.time_to_last_downstream_tx_byte.FromMilliseconds(elapsed_ms)
    request = entry.request
    request.request_method = 3  # POST (envoy.config.core.v3.RequestMethod)
    request.scheme = "http"
    request.authority = "127.0.0.1:10000"
    request.path = "/v1/chat/completions"
    request.user_agent = "python-httpx/0.27.0"
    request.request_id = common.stream_id
    request.request_headers_bytes = 240
    request.request_body_bytes = 512 + stream_id % 8192
    response = entry.response
    if final or first_byte_ms is not None:
        response.response_code.value = 200
        response.response_headers_bytes = 180
        response.response_code_details = "via_upstream"
    response.response_body_bytes = 0 if not final else 4096 + stream_id % 4096
    return entry


def synthetic_entries(count: int, seed: int = 7) -> list[accesslog_pb2.HTTPAccessLogEntry]:
    """``count`` entries in arrival order: of every 4 requests, 3 end fast (final only) and
    1 streams for 2.5 s (a periodic entry at 1 s still waiting for its first byte, one at 2 s
    with it, then the final entry)."""
    rng = random.Random(seed)
    per_request = 6 / 4  # entries per request
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
    return [_entry(rng, s, e, final, elapsed, first)
            for _, s, e, final, elapsed, first in events[:count]]


def synthetic_messages(count: int, node: str = "bench-envoy"
                       ) -> list[als_pb2.StreamAccessLogsMessage]:
    """``count`` entries batched ~16 KiB a message, the first with the identifier."""
    entries = synthetic_entries(count)
    size = sum(e.ByteSize() for e in entries[:200]) / min(200, len(entries))
    batch = max(1, int(ENVOY_BUFFER_BYTES // size))
    messages: list[als_pb2.StreamAccessLogsMessage] = []
    for start in range(0, len(entries), batch):
        message = als_pb2.StreamAccessLogsMessage()
        if not messages:
            message.identifier.node.id = node
            message.identifier.log_name = ACCESS_LOG_NAME
        message.http_logs.log_entry.extend(entries[start:start + batch])
        messages.append(message)
    return messages


async def send(port: int, rate: float, seconds: float) -> dict[str, Any]:
    import grpc

    messages = synthetic_messages(int(rate * seconds))  # built before the stream opens
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        await asyncio.wait_for(channel.channel_ready(), 10)
        call = als_pb2_grpc.AccessLogServiceStub(channel).StreamAccessLogs()
        sent = 0
        start = time.perf_counter()
        for message in messages:
            delay = start + sent / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if time.perf_counter() - start > 3 * seconds:  # the receiver fell far behind
                break
            await call.write(message)
            sent += len(message.http_logs.log_entry)
        await call.done_writing()
        await asyncio.wait_for(call, 30)
        elapsed = time.perf_counter() - start
    return {"sent": sent, "messages": len(messages), "seconds": elapsed,
            "entries_per_message": len(messages[0].http_logs.log_entry),
            "message_bytes": messages[0].ByteSize()}


# --- part 2: the receiver ---------------------------------------------------------------


def _servicer() -> Any:
    from control_plane.traffic.service import AccessLogServicer
    from control_plane.traffic.window import TrafficWindow

    table = {(POOL, "{}:{}".format(*endpoint_address(i))): f"gpu-{i}" for i in range(ENDPOINTS)}

    class Timed(AccessLogServicer):
        """Records the process CPU time over each stream (the receiver, as shipped)."""

        cpu_s = 0.0
        thread_s = 0.0  # of that, the event loop's thread (the handler, grpc.aio's Python side)
        wall_s = 0.0
        profile: cProfile.Profile | None = None

        async def StreamAccessLogs(self, request_iterator: Any, context: Any) -> Any:  # noqa: N802
            cpu, thread = time.process_time(), time.thread_time()
            wall = time.perf_counter()
            if self.profile is not None:
                self.profile.enable()
            try:
                return await super().StreamAccessLogs(request_iterator, context)
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

    from control_plane.runtime import processes

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
    """The same messages without gRPC: protobuf parse, then the servicer's handler."""
    wires = [m.SerializeToString() for m in synthetic_messages(count)]
    cpu = time.process_time()
    parsed = [als_pb2.StreamAccessLogsMessage.FromString(w) for w in wires]
    parse_s = time.process_time() - cpu
    servicer = _servicer()

    async def stream() -> AsyncIterator[als_pb2.StreamAccessLogsMessage]:
        for message in parsed:
            yield message

    await servicer.StreamAccessLogs(stream(), None)
    return {"parse_s": parse_s, "handler_s": servicer.cpu_s, "entries": _received(servicer)}


# --- part 1: Envoy with and without the stream ------------------------------------------


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


async def envoy_part(requests: int, concurrency: int, rounds: int) -> list[dict[str, Any]]:
    from benchmarks.route_pick import cpu_seconds, load
    from tests.harness import Upstreams, async_wait_for, make_stack, new_etcd, wait_for

    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        etcd = new_etcd(tmp)
        upstreams = Upstreams()
        stacks: dict[str, Any] = {}
        try:
            port = await upstreams.add("u0")
            for name, extra in (("stream", []), ("no stream", ["--no-traffic-stream"])):
                sub = tmp / name.replace(" ", "-")
                sub.mkdir()
                stack = make_stack(sub, etcd.url, f"/bench-{sub.name}/", extra=extra)
                stacks[name] = stack
                await stack.put("pools/p", {"models": ["m"]})
                await stack.put("endpoints/p/u0", {"address": "127.0.0.1", "port": port})
                await stack.wait_listener()
                await asyncio.to_thread(wait_for, lambda s=stack: "u0" in s.envoy.hosts("p"),
                                        30, "the upstream")

                async def routed(s: Any = stack) -> bool:
                    return await load(s.url, ["m"], 1, 1) == 0
                await async_wait_for(routed, 60, f"{name}: a routed request")
                dump = _get(f"{stack.envoy.admin_url}/config_dump?resource=dynamic_listeners")
                has_stream = "HttpGrpcAccessLogConfig" in dump
                if has_stream != (name == "stream"):
                    raise SystemExit(f"{name}: gRPC access logger present = {has_stream}")
            for stack in stacks.values():  # warm up
                await load(stack.url, ["m"], min(2000, requests), concurrency)
            await asyncio.sleep(FLUSH_S * 1.5)
            for round_ in range(rounds):
                for name, stack in stacks.items():  # A B A B
                    envoy, cp = stack.envoy.process, stack.control_plane.process
                    metrics = f"http://127.0.0.1:{stack.control_plane.metrics_port}/metrics"
                    entries = _metric_sum(_get(metrics), "hotpath_traffic_entries_total")
                    written = _envoy_stat(stack.envoy.admin_url, "logs_written")
                    dropped = _envoy_stat(stack.envoy.admin_url, "logs_dropped")
                    before = cpu_seconds(envoy.pid), cpu_seconds(cp.pid)
                    start = time.perf_counter()
                    failures = await load(stack.url, ["m"], requests, concurrency)
                    wall = time.perf_counter() - start
                    await asyncio.sleep(FLUSH_S * 1.2)  # the stream's last flush counts
                    after = cpu_seconds(envoy.pid), cpu_seconds(cp.pid)
                    results.append({
                        "variant": name, "round": round_, "failures": failures,
                        "envoy_us": (after[0] - before[0]) / requests * 1e6,
                        "cp_us": (after[1] - before[1]) / requests * 1e6,
                        "rps": requests / wall,
                        "entries": _metric_sum(_get(metrics), "hotpath_traffic_entries_total")
                        - entries,
                        "written": _envoy_stat(stack.envoy.admin_url, "logs_written") - written,
                        "dropped": _envoy_stat(stack.envoy.admin_url, "logs_dropped") - dropped,
                    })
        finally:
            await upstreams.close()
            for stack in stacks.values():
                stack.close()
            etcd.stop()
    return results


# --- the table ---------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> None:
    if not args.skip_envoy:
        envoy_table(await envoy_part(args.requests, args.concurrency, args.rounds), args)
    await part2(args)


def envoy_table(runs: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(f"Part 1: Envoy CPU per request, {args.requests} requests x {args.rounds} rounds "
          f"(A B interleaved), concurrency {args.concurrency}")
    print(f"{'variant':10s} {'round':>5s} {'Envoy CPU/req':>14s} {'CP CPU/req':>11s} "
          f"{'req/s':>7s} {'fail':>5s} {'entries rx':>10s} {'drops':>6s}")
    for r in runs:
        print(f"{r['variant']:10s} {r['round']:5d} {r['envoy_us']:11.1f} us "
              f"{r['cp_us']:8.1f} us {r['rps']:7.0f} {r['failures']:5d} "
              f"{r['entries']:10.0f} {r['dropped']:6d}")
    medians = {name: statistics.median(r["envoy_us"] for r in runs if r["variant"] == name)
               for name in ("stream", "no stream")}
    cp = {name: statistics.median(r["cp_us"] for r in runs if r["variant"] == name)
          for name in ("stream", "no stream")}
    ratio = medians["stream"] / medians["no stream"]
    print(f"{'median':10s} {'':5s} stream {medians['stream']:.1f} us, no stream "
          f"{medians['no stream']:.1f} us: ratio {ratio:.3f} ({(ratio - 1) * 100:+.1f}%, "
          f"target <= +5%) | CP {cp['stream']:.1f} vs {cp['no stream']:.1f} us/req")
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
    print(f"  receiver CPU {rx['cpu_s'] * 1000:.0f} ms over a {rx['stream_wall_s']:.2f} s "
          f"stream: {per_k:.1f} ms CPU per 1,000 entries "
          f"({rx['cpu_s'] / rx['stream_wall_s'] * 100:.0f}% of a core; event-loop thread "
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
    if len(sys.argv) == 5 and sys.argv[1] == "--sender":
        result = asyncio.run(send(int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])))
        print(json.dumps(result), flush=True)
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rate", type=float, default=10000)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--profile", action="store_true",
                        help="also profile a second receive with cProfile")
    parser.add_argument("--skip-envoy", action="store_true", help=argparse.SUPPRESS)
    asyncio.run(main(parser.parse_args()))
