"""Gateway overhead: added latency and max throughput in front of a static, fast upstream.

The upstream answers every request with a fixed chat completion on three ports, so that
hashing has hosts to choose from: nginx `return 200` with one worker when nginx is installed
(about 100k req/s on this machine), else an Envoy direct_response (about 12k req/s, which then
caps every gateway's number).
Every request is a ~1 KiB chat-completion POST with a rotating `x-session-id`, as chat traffic
is. Each target gets a short warm-up, then latency on one connection (the median of three
short runs' p50 and p99; added latency = minus the direct line) and a throughput run at
`connections` connections.

The load generator is wrk (Debian package `wrk`) with a Lua script; without wrk a bounded
aiohttp generator runs instead (it saturates far below the gateways: its numbers are a floor).
Every run is bounded in time and requests.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from control_plane.bench.report import OverheadReport, percentile
from control_plane.bench.strategies import Backend
from control_plane.errors import BenchError
from control_plane.runtime import processes
from control_plane.runtime.supervisor import ProcessGroup

STATIC_PORTS = 3
SESSION_KEYS = 10_000
PATH = "/v1/chat/completions"
REPLY = json.dumps({
    "id": "chatcmpl-static", "object": "chat.completion", "created": 0,
    "model": "hotpath-bench-static",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 200, "completion_tokens": 1, "total_tokens": 201},
}, separators=(",", ":"))


def request_body(model: str) -> str:
    system = "You are a helpful assistant for a web shop. " + "Answer briefly and politely. " * 18
    user = "Where is my order? It was placed last week and the tracking page shows nothing. " * 3
    return json.dumps({"model": model, "max_tokens": 16, "stream": False,
                       "messages": [{"role": "system", "content": system},
                                    {"role": "user", "content": user}]},
                      separators=(",", ":"))


def static_upstream_config(ports: Sequence[int]) -> str:
    """Envoy static config: every request on every port gets REPLY. JSON is valid YAML."""
    hcm = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
    router = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
    listeners = [{
        "name": f"static-{i}",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": hcm + "HttpConnectionManager",
                "stat_prefix": f"static_{i}",
                "route_config": {"virtual_hosts": [{
                    "name": "all", "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"},
                                "direct_response": {"status": 200,
                                                    "body": {"inline_string": REPLY}},
                                "response_headers_to_add": [{"header": {
                                    "key": "content-type", "value": "application/json"}}]}],
                }]},
                "http_filters": [{"name": "envoy.filters.http.router",
                                  "typed_config": {"@type": router}}],
            },
        }]}],
    } for i, port in enumerate(ports)]
    return json.dumps({"static_resources": {"listeners": listeners}}, indent=1)


def nginx_static_conf(workdir: Path, ports: Sequence[int]) -> str:
    """nginx answering REPLY on every port, one worker, no access log: ~100k req/s here, so
    the upstream is never what limits a gateway."""
    user = "user root;\n" if os.geteuid() == 0 else ""
    servers = "\n".join(
        f"  server {{ listen 127.0.0.1:{p}; location / {{ default_type application/json; "
        f"return 200 '{REPLY}'; }} }}" for p in ports)
    return f"""{user}daemon off;
worker_processes 1;
pid {workdir}/static-nginx.pid;
error_log {workdir}/static-nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {workdir}/static-nginx-body;
{servers}
}}
"""


async def start_static_upstream(group: ProcessGroup, nginx: str | None) -> tuple[list[Backend],
                                                                                   str]:
    """The upstream on STATIC_PORTS ports; (backends, what it is). nginx when installed
    (fastest), else an Envoy with direct_response (about 10x slower on 2 cores)."""
    ports = [processes.free_port() for _ in range(STATIC_PORTS)]
    if nginx is not None:
        conf = group.workdir / "static-nginx.conf"
        conf.write_text(nginx_static_conf(group.workdir.resolve(), ports))
        command = [nginx, "-p", str(group.workdir.resolve()), "-c", str(conf.resolve()),
                   "-e", str((group.workdir / "static-nginx-error.log").resolve())]
        what = "nginx return 200, 1 worker"
    else:
        config = group.workdir / "static-upstream.yaml"
        config.write_text(static_upstream_config(ports))
        command = processes.envoy_command(config) + ["--concurrency", "1"]
        what = "Envoy direct_response, 1 worker"
    child = group.start("static-upstream", command)
    await group.wait("static-upstream", child,
                     lambda: all(processes.port_open("127.0.0.1", p) for p in ports), 30,
                     "listeners")
    return [Backend(f"static-{i}", "127.0.0.1", p) for i, p in enumerate(ports)], what


@dataclass(frozen=True)
class LoadResult:
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


WRK_SCRIPT = """
local counter = 0
local keys = %(keys)d
local body = [==[%(body)s]==]
local headers = {["Content-Type"] = "application/json"}
request = function()
  counter = counter + 1
  headers["x-session-id"] = "s-" .. (counter %% keys)
  return wrk.format("POST", "%(path)s", headers, body)
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests":%%d,"duration_us":%%d,"p50_us":%%d,"p99_us":%%d,"errors":%%d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.status + e.timeout))
end
"""


def wrk_script(body: str) -> str:
    if "]==]" in body:
        raise ValueError("request body cannot contain ]==]")
    return WRK_SCRIPT % {"keys": SESSION_KEYS, "body": body, "path": PATH}


def parse_wrk(output: str) -> LoadResult:
    found = re.search(r"^BENCH (\{.*\})$", output, re.MULTILINE)
    if found is None:
        raise BenchError(f"wrk printed no result:\n{output[-800:]}")
    data = json.loads(found.group(1))
    return LoadResult(requests=data["requests"], seconds=data["duration_us"] / 1e6,
                      p50_ms=data["p50_us"] / 1000, p99_ms=data["p99_us"] / 1000,
                      errors=data["errors"])


async def run_wrk(wrk: str, script: Path, url: str, connections: int, seconds: float,
                  threads: int = 1) -> LoadResult:
    command = [wrk, f"-t{threads}", f"-c{connections}", f"-d{max(1, round(seconds))}s",
               "--timeout", "5s", "-s", str(script), url + PATH]
    proc = await asyncio.create_subprocess_exec(*command, stdout=subprocess.PIPE,
                                                stderr=subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=seconds + 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return parse_wrk(out.decode(errors="replace"))


async def run_python_load(url: str, body: str, connections: int, seconds: float,
                          max_requests: int = 200_000) -> LoadResult:
    """Fallback generator: `connections` workers on keep-alive connections, bounded."""
    latencies: list[float] = []
    errors = 0
    counter = 0
    connector = aiohttp.TCPConnector(limit=connections)
    timeout = aiohttp.ClientTimeout(total=5)
    start = time.perf_counter()
    stop_at = start + seconds
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:

        async def worker() -> None:
            nonlocal errors, counter
            while time.perf_counter() < stop_at and counter < max_requests:
                counter += 1
                headers = {"content-type": "application/json",
                           "x-session-id": f"s-{counter % SESSION_KEYS}"}
                sent = time.perf_counter()
                try:
                    async with http.post(url + PATH, data=body, headers=headers) as resp:
                        await resp.read()
                        if resp.status != 200:
                            errors += 1
                            continue
                except (aiohttp.ClientError, TimeoutError):
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - sent)

        await asyncio.gather(*(worker() for _ in range(connections)))
    elapsed = time.perf_counter() - start
    return LoadResult(len(latencies), elapsed, 1000 * (percentile(latencies, 50) or 0.0),
                      1000 * (percentile(latencies, 99) or 0.0), errors)


@dataclass(frozen=True)
class OverheadSettings:
    latency_seconds: float = 3.0
    throughput_seconds: float = 5.0
    connections: int = 64
    wrk_threads: int = 2  # one thread cannot saturate nginx here


@dataclass
class LoadGen:
    """wrk when installed, else the Python generator."""

    body: str
    script: Path | None
    wrk: str | None

    @classmethod
    def make(cls, workdir: Path, model: str) -> LoadGen:
        body = request_body(model)
        wrk = shutil.which("wrk")
        script = None
        if wrk is not None:
            script = workdir / "overhead.lua"
            script.write_text(wrk_script(body))
        return cls(body, script, wrk)

    @property
    def name(self) -> str:
        return "wrk" if self.wrk else "python (aiohttp)"

    async def run(self, url: str, connections: int, seconds: float, threads: int
                  ) -> LoadResult:
        if self.wrk is not None and self.script is not None:
            return await run_wrk(self.wrk, self.script, url, connections, seconds, threads)
        return await run_python_load(url, self.body, connections, seconds)


async def measure(gen: LoadGen, name: str, label: str, url: str, settings: OverheadSettings,
                  on_step: Callable[[str], None] | None = None) -> OverheadReport:
    if on_step:
        on_step(f"{label}: warm-up")
    warm = await gen.run(url, 8, 1, settings.wrk_threads)
    if warm.requests == 0:
        return OverheadReport(name, label, available=False,
                              note=f"no request succeeded ({warm.errors} errors)")
    if on_step:
        on_step(f"{label}: latency, 1 connection")
    # Median of three short runs: one scheduling hiccup on a shared 2-core machine would
    # otherwise decide the p99.
    runs = [await gen.run(url, 1, max(1.0, settings.latency_seconds / 3), 1) for _ in range(3)]
    lat = LoadResult(sum(r.requests for r in runs), sum(r.seconds for r in runs),
                     statistics.median(r.p50_ms for r in runs),
                     statistics.median(r.p99_ms for r in runs), sum(r.errors for r in runs))
    if on_step:
        on_step(f"{label}: throughput, {settings.connections} connections")
    load = await gen.run(url, settings.connections, settings.throughput_seconds,
                         settings.wrk_threads)
    return OverheadReport(name, label, p50_ms=lat.p50_ms, p99_ms=lat.p99_ms, rps=load.rps,
                          load_p99_ms=load.p99_ms, errors=lat.errors + load.errors)


def with_added(reports: list[OverheadReport]) -> list[OverheadReport]:
    """Fill added latency relative to the direct line."""
    direct = next((r for r in reports if r.name == "direct" and r.available), None)
    if direct is None or direct.p50_ms is None or direct.p99_ms is None:
        return reports
    for r in reports:
        if r.available and r.p50_ms is not None and r.p99_ms is not None:
            r.added_p50_ms = r.p50_ms - direct.p50_ms
            r.added_p99_ms = r.p99_ms - direct.p99_ms
    return reports
