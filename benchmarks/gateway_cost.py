"""Gateway cost per request, decomposed: what Envoy itself, an empty Lua filter and hotpath
(the real stack) each add over a direct call to the upstream.

One run measures, against one static fast upstream (nginx ``return 200`` when nginx is on
PATH, else a tiny aiohttp server: the table says which):

- direct: the client straight to the upstream (the latency baseline);
- minimal Envoy: one route to a round-robin cluster, the router only, no access log (what
  any Envoy costs here, whatever its config);
- bare Envoy: a static Envoy config generated from hotpath's own translation (same
  listener, routes, ring-hash cluster and hash policy), with the router only: the client
  sends the internal model/session headers the Lua filter would set;
- empty Lua: the same, plus a Lua filter whose envoy_on_request does nothing; then one that
  only reads the body (``body():getBytes``), one that also picks the route again on the
  model header (``clearRouteCache`` + route metadata), and hotpath's own filter as rendered
  for ECDS, static (no ADS, no traffic stream): the filter's cost step by step;
- hotpath: etcd + control plane + Envoy (ADS, the ECDS Lua filter, the traffic stream);
- hotpath, no traffic stream: the same with ``--no-traffic-stream`` (the gRPC access log
  off), to tell that cost from the filter's;
- the peers (control_plane/bench/peers.py, found in ``--peers-bin``): nginx ``hash
  consistent``, vllm-router ``consistent_hash``, sglang-router ``cache_aware``, in front of
  the same upstream; their CPU is their whole process tree's.

Each with 1 KiB and 100 KiB chat bodies, with and without a session header: req/s with
``--connections`` connections, p50/p99 latency with one connection (added over direct),
and Envoy CPU per request from /proc/<pid>/stat (all threads, user + system), over the
throughput run. ``wrk`` (with a Lua script for the POST body) drives the load; without
it the script stops. Finally one 8 MiB ASCII first message, sequentially, through hotpath
and bare Envoy: the difference in Envoy CPU per request is the filter's time on it (body
buffering and copy into Lua included); ``--only-8mib`` runs just that.

    .venv/bin/python benchmarks/gateway_cost.py [--duration 3] [--connections 8] [--only-8mib]
        [--peers-bin ~/.hotpath-peers/bin] [--no-peers]

The machine is shared by client, Envoy and upstream (2 cores here): compare the ratios of
one run, not absolute figures across machines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from envoy.config.bootstrap.v3 import bootstrap_pb2  # noqa: E402
from envoy.config.cluster.v3 import cluster_pb2  # noqa: E402
from envoy.config.core.v3 import address_pb2, base_pb2  # noqa: E402
from envoy.extensions.access_loggers.file.v3 import file_pb2  # noqa: E402
from envoy.extensions.filters.http.lua.v3 import lua_pb2  # noqa: E402
from envoy.extensions.filters.network.http_connection_manager.v3 import (  # noqa: E402
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import json_format  # noqa: E402

from control_plane import contract  # noqa: E402
from control_plane.bench.peers import PEERS, find_peer, start_peer  # noqa: E402
from control_plane.bench.strategies import Backend  # noqa: E402
from control_plane.config.model import Config, Endpoint, GatewaySettings, Pool  # noqa: E402
from control_plane.errors import BenchError  # noqa: E402
from control_plane.runtime import processes  # noqa: E402
from control_plane.runtime.supervisor import ProcessGroup  # noqa: E402
from control_plane.translate.listeners import LUA_FILTER_CONFIG_NAME  # noqa: E402
from control_plane.translate.resources import translate  # noqa: E402
from control_plane.xds import types  # noqa: E402
from tests.harness import Stack, make_stack, new_etcd, wait_for  # noqa: E402

MODEL = "m"
SESSION = "bench-session-0001"
CLK_TCK = os.sysconf("SC_CLK_TCK")
EIGHT_MIB = 8 * 1024 * 1024

WRK_SCRIPT = """
wrk.method = "POST"
local f = assert(io.open("{body}", "rb"))
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
{headers}
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "RESULT {{\\"requests\\": %d, \\"duration_us\\": %d, \\"errors\\": %d, \\"non2xx\\": %d, "
    .. "\\"p50_us\\": %d, \\"p99_us\\": %d}}\\n",
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99)))
end
"""

NGINX_CONF = """
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_max_body_size 16m;
  client_body_temp_path {tmp}/nginx-body;
  keepalive_requests 10000000;
  server {{
    listen 127.0.0.1:{port};
    location / {{
      default_type application/json;
      return 200 '{{"ok": true}}';
    }}
  }}
}}
"""

PY_UPSTREAM = """
import sys
from aiohttp import web
async def handle(request):
    await request.read()
    return web.json_response({"ok": True})
app = web.Application(client_max_size=64 << 20)
app.router.add_route("*", "/{tail:.*}", handle)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and of every process below it (nginx's workers)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    total = (int(fields[11]) + int(fields[12])) / CLK_TCK
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            total += sum(cpu_seconds(int(child)) for child in children.read_text().split())
        except FileNotFoundError:  # a child that just ended
            pass
    return total


@dataclass
class Target:
    name: str
    url: str
    gateway_pid: int | None = None  # Envoy, or a peer's main process
    internal_headers: bool = False  # the client sets what the Lua filter would
    other_pids: tuple[int, ...] = ()  # control plane: its CPU is reported apart


def start_upstream(tmp: Path) -> tuple[subprocess.Popen[bytes], int, str]:
    port = processes.free_port()
    nginx = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if nginx:
        conf = tmp / "nginx.conf"
        conf.write_text(NGINX_CONF.format(tmp=tmp, port=port))
        process = processes.spawn([nginx, "-p", str(tmp), "-c", str(conf)], tmp / "nginx.log")
        kind = "nginx return 200 (1 worker)"
    else:
        script = tmp / "upstream.py"
        script.write_text(PY_UPSTREAM)
        process = processes.spawn([sys.executable, str(script), str(port)], tmp / "up.log")
        kind = "aiohttp (python, 1 process)"
    wait_for(lambda: processes.port_open("127.0.0.1", port), 20, "upstream")
    return process, port, kind


# Static Lua filters between "empty" and hotpath's own, to split the filter's cost: the body
# read alone; the body read and the route picked again on the model header, as hotpath does.
BODY_LUA = """function envoy_on_request(handle)
  local body = handle:body()
  if body then
    local bytes = body:getBytes(0, body:length())
  end
end
"""
REPICK_LUA = f"""function envoy_on_request(handle)
  local body = handle:body()
  if body then
    local bytes = body:getBytes(0, body:length())
  end
  local headers = handle:headers()
  headers:replace("{contract.MODEL_HEADER}", "{MODEL}")
  handle:clearRouteCache()
  local route = handle:metadata()
  local pool = route and route:get("pool")
end
"""


def static_bootstrap(listen: int, upstream: int, lua: str | None, access_log: Path) -> str:
    """hotpath's own listener, routes and cluster as a static config: routes inline, the
    endpoint static, the Lua filter replaced by nothing (bare), by ``lua`` (a source), or by
    hotpath's own filter as it is rendered for ECDS (``"hotpath"``: no ADS, no stream)."""
    settings = GatewaySettings(listen_port=listen, access_log_path=str(access_log),
                               traffic_stream=False)
    config = Config(pools={"p": Pool("p", (MODEL,))},
                    endpoints={"p": {"e1": Endpoint("p", "e1", "127.0.0.1", upstream)}})
    out = translate(config, {("p", "e1"): "127.0.0.1"}, settings, time.time())
    listener = out[types.LISTENER][contract.LISTENER_NAME]
    routes = out[types.ROUTE][contract.ROUTE_CONFIG_NAME]
    network_filter = listener.filter_chains[0].filters[0]  # type: ignore[attr-defined]
    hcm = hcm_pb2.HttpConnectionManager()
    network_filter.typed_config.Unpack(hcm)
    hcm.ClearField("rds")
    hcm.route_config.CopyFrom(routes)
    router = hcm.http_filters[-1]
    del hcm.http_filters[:]
    if lua == "hotpath":
        ecds = out[types.EXTENSION_CONFIG][LUA_FILTER_CONFIG_NAME]
        hcm.http_filters.add(name="envoy.filters.http.lua").typed_config.CopyFrom(
            ecds.typed_config)  # type: ignore[attr-defined]
    elif lua is not None:
        source = lua_pb2.Lua(default_source_code=base_pb2.DataSource(inline_string=lua))
        hcm.http_filters.add(name="envoy.filters.http.lua").typed_config.Pack(source)
    hcm.http_filters.append(router)
    logs = [log for log in hcm.access_log if log.typed_config.Is(file_pb2.FileAccessLog.DESCRIPTOR)]
    del hcm.access_log[:]
    hcm.access_log.extend(logs)
    network_filter.typed_config.Pack(hcm)
    cluster = cluster_pb2.Cluster()
    cluster.CopyFrom(out[types.CLUSTER]["p"])
    cluster.ClearField("eds_cluster_config")
    cluster.type = cluster_pb2.Cluster.STATIC
    cluster.load_assignment.CopyFrom(out[types.ENDPOINT]["p"])
    bootstrap = bootstrap_pb2.Bootstrap()
    bootstrap.node.id = "bench"
    bootstrap.node.cluster = "bench"
    bootstrap.static_resources.listeners.append(listener)
    bootstrap.static_resources.clusters.append(cluster)
    bootstrap.admin.address.CopyFrom(address_pb2.Address(socket_address=address_pb2.SocketAddress(
        address="127.0.0.1", port_value=0)))
    return json_format.MessageToJson(bootstrap, preserving_proto_field_name=True)


def minimal_bootstrap(listen: int, upstream: int) -> str:
    """The least an Envoy proxy does: one route to a round-robin cluster of the upstream, the
    router filter only, no access log: Envoy's own floor per request on this machine."""
    def address(port: int) -> dict[str, Any]:
        return {"socket_address": {"address": "127.0.0.1", "port_value": port}}
    hcm = {"@type": "type.googleapis.com/envoy.extensions.filters.network."
                    "http_connection_manager.v3.HttpConnectionManager",
           "stat_prefix": "minimal",
           "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
               {"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}]}]},
           "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
               "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}
    return json.dumps({
        "static_resources": {
            "listeners": [{"name": "minimal", "address": address(listen), "filter_chains": [
                {"filters": [{"name": "envoy.filters.network.http_connection_manager",
                              "typed_config": hcm}]}]}],
            "clusters": [{"name": "upstream", "type": "STATIC", "connect_timeout": "2s",
                          "load_assignment": {"cluster_name": "upstream", "endpoints": [
                              {"lb_endpoints": [{"endpoint": {"address": address(upstream)}}]}]}}],
        },
        "admin": {"address": address(0)},
    })


def start_static_envoy(tmp: Path, name: str, upstream: int, lua: str | None
                       ) -> tuple[subprocess.Popen[bytes], Target]:
    """A static Envoy: ``lua`` as for static_bootstrap, or ``"minimal"`` (minimal_bootstrap)."""
    listen = processes.free_port()
    path = tmp / f"{name}.json"
    path.write_text(minimal_bootstrap(listen, upstream) if lua == "minimal" else
                    static_bootstrap(listen, upstream, lua, tmp / f"{name}-access.log"))
    process = processes.spawn(processes.envoy_command(path, tmp / f"{name}-admin.txt"),
                              tmp / f"{name}.log")
    wait_for(lambda: processes.port_open("127.0.0.1", listen), 30, f"{name} listener")
    # The client sets the headers hotpath's filter would set unless a filter that sets
    # them (hotpath's own) runs, or no route reads them (minimal).
    return process, Target(name, f"http://127.0.0.1:{listen}", process.pid,
                           lua not in ("hotpath", "minimal"))


def body_file(tmp: Path, size: int) -> Path:
    """A chat body of ``size`` bytes, its first user message ASCII."""
    shell: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": ""}]}
    filler = size - len(json.dumps(shell))
    shell["messages"][0]["content"] = ("lorem ipsum dolor sit amet " * (filler // 27 + 1))[:filler]
    path = tmp / f"body-{size}.json"
    path.write_text(json.dumps(shell))
    assert path.stat().st_size == size
    return path


def wrk(target: Target, body: Path, session: bool, connections: int, duration: int,
        tmp: Path) -> dict[str, Any]:
    headers = []
    if session:
        headers.append(f'wrk.headers["x-session-id"] = "{SESSION}"')
    if target.internal_headers:
        headers.append(f'wrk.headers["{contract.MODEL_HEADER}"] = "{MODEL}"')
        if session:
            headers.append(f'wrk.headers["{contract.SESSION_HEADER}"] = "{SESSION}"')
    script = tmp / "wrk.lua"
    script.write_text(WRK_SCRIPT.format(body=body, headers="\n".join(headers)))
    pids = ([target.gateway_pid] if target.gateway_pid else []) + list(target.other_pids)
    before = [cpu_seconds(p) for p in pids]
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--timeout", "10s", "-s",
         str(script), f"{target.url}/v1/chat/completions"],
        capture_output=True, text=True, check=True, timeout=duration + 60)
    after = [cpu_seconds(p) for p in pids]
    match = re.search(r"^RESULT (.*)$", out.stdout, re.M)
    assert match, out.stdout + out.stderr
    result: dict[str, Any] = json.loads(match.group(1))
    requests = max(result["requests"], 1)
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    cpu = [(a - b) / requests * 1e6 for a, b in zip(after, before, strict=True)]
    result["envoy_cpu_us"] = cpu[0] if target.gateway_pid else None
    result["other_cpu_us"] = sum(cpu[1:]) if target.gateway_pid else sum(cpu)
    return result


async def start_peers(group: ProcessGroup, upstream: int, peers_bin: str | None
                      ) -> list[Target]:
    """Every peer found, in front of the upstream (one backend: the same as hotpath's)."""
    targets = []
    backends = [Backend("upstream", "127.0.0.1", upstream)]
    for peer in PEERS:
        binary = find_peer(peer, peers_bin)
        if binary is None:
            print(f"{peer.label}: not found, skipped ({peer.install})")
            continue
        url, child = await start_peer(group, peer, binary, backends, "cost")
        targets.append(Target(peer.label, url, child.pid))
    return targets


async def hotpath_stack(tmp: Path, etcd_url: str, prefix: str, upstream: int,
                        extra: list[str]) -> Stack:
    stack = make_stack(tmp, etcd_url, prefix, extra=extra)
    await stack.put("pools/p", {"models": [MODEL]})
    await stack.put("endpoints/p/e1", {"address": "127.0.0.1", "port": upstream})
    await stack.wait_listener()
    await asyncio.to_thread(wait_for, lambda: "e1" in stack.envoy.hosts("p"), 30, "pool p")
    return stack


def pid_of(stack: Stack) -> tuple[int, int]:
    envoy, cp = stack.envoy.process, stack.control_plane.process
    assert envoy is not None and cp is not None
    return envoy.pid, cp.pid


def fmt(value: float | None, spec: str = ".0f") -> str:
    return "-" if value is None else format(value, spec)


async def main(args: argparse.Namespace) -> None:
    if not shutil.which("wrk"):
        raise SystemExit("wrk is not installed (apt-get install -y wrk)")
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        (tmp / "nginx-body").mkdir()
        children: list[subprocess.Popen[bytes]] = []
        stacks: list[Stack] = []
        groups: list[ProcessGroup] = []
        etcd = None
        try:
            upstream, port, kind = start_upstream(tmp)
            children.append(upstream)
            bare, bare_target = start_static_envoy(tmp, "bare", port, lua=None)
            children.append(bare)
            targets = [Target("direct", f"http://127.0.0.1:{port}"), bare_target]
            if not args.only_8mib:
                for name, source in (("minimal Envoy", "minimal"),
                                     ("empty-lua", "function envoy_on_request(handle)\nend\n"),
                                     ("lua: body read", BODY_LUA),
                                     ("lua: body + route re-pick", REPICK_LUA),
                                     ("hotpath filter, static", "hotpath")):
                    child, target = start_static_envoy(tmp, name.replace(" ", "-").replace(
                        ":", "").replace(",", "").replace("+", "and"), port, source)
                    children.append(child)
                    targets.append(target)
            etcd = new_etcd(tmp)
            stack_names: list[tuple[str, list[str], str]] = [("hotpath", [], "hotpath")]
            if not args.only_8mib:
                stack_names.append(("hotpath-nostream", ["--no-traffic-stream"],
                                    "hotpath, no traffic stream"))
            for name, extra, target_name in stack_names:
                sub = tmp / name
                sub.mkdir()
                stack = await hotpath_stack(sub, etcd.url, f"/bench-{name}/", port, extra)
                stacks.append(stack)
                envoy_pid, cp_pid = pid_of(stack)
                targets.append(Target(target_name, stack.url, envoy_pid, other_pids=(cp_pid,)))
            hotpath_target = targets[-len(stack_names)]
            if not args.only_8mib and not args.no_peers:
                group = ProcessGroup(tmp / "peers", error=BenchError)
                groups.append(group)
                targets += await start_peers(group, port, args.peers_bin)
            bodies = {} if args.only_8mib else {
                "1 KiB": body_file(tmp, 1024), "100 KiB": body_file(tmp, 100 * 1024)}
            rows: list[dict[str, Any]] = []
            for body_name, body in bodies.items():
                for session in (True, False):
                    for target in targets:
                        wrk(target, body, session, args.connections, 1, tmp)  # warm up
                        load = wrk(target, body, session, args.connections, args.duration, tmp)
                        single = wrk(target, body, session, 1, args.duration, tmp)
                        for result in (load, single):
                            assert result["errors"] == 0 and result["non2xx"] == 0, (
                                target.name, result)
                        rows.append({"target": target.name, "body": body_name,
                                     "session": session, "rps": load["rps"],
                                     "p50_us": single["p50_us"], "p99_us": single["p99_us"],
                                     "envoy_cpu_us": load["envoy_cpu_us"],
                                     "cp_cpu_us": load["other_cpu_us"]
                                     if target.other_pids else None})
            big = body_file(tmp, EIGHT_MIB - 64)
            eight = {}
            for target in (bare_target, hotpath_target):
                wrk(target, big, False, 1, 1, tmp)
                eight[target.name] = wrk(target, big, False, 1, args.duration * 2, tmp)
            report(rows, eight, kind, args)
        finally:
            for group in groups:
                group.close()
            for stack in stacks:
                stack.close()
            if etcd is not None:
                etcd.stop()
            for child in children:
                processes.terminate(child, 5)


def report(rows: list[dict[str, Any]], eight: dict[str, dict[str, Any]], kind: str,
           args: argparse.Namespace) -> None:
    print(f"upstream: {kind}; wrk -t1 -c{args.connections} (req/s, CPU) and -c1 (latency), "
          f"{args.duration:g} s each; {os.cpu_count()} CPUs shared by all")
    if rows:
        report_rows(rows)
        report_targets(rows)
    report_eight(eight)


PEER_LABELS = tuple(peer.label for peer in PEERS)


def report_targets(rows: list[dict[str, Any]]) -> None:
    """The targets per body and session case: hotpath's req/s over vllm-router's (>= 1.5),
    and its added p99 against the best peer's + 0.5 ms."""
    index = {(r["target"], r["body"], r["session"]): r for r in rows}
    cases = sorted({(r["body"], r["session"]) for r in rows})
    for body, session in cases:
        hotpath, direct = index[("hotpath", body, session)], index[("direct", body, session)]
        line = f"{body:7s} session {'yes' if session else 'no ':3s}"
        router = index.get(("vllm-router consistent_hash", body, session))
        if router:
            line += f"  hotpath/vllm-router req/s {hotpath['rps'] / router['rps']:.2f}"
        peers = [index[(label, body, session)] for label in PEER_LABELS
                 if (label, body, session) in index]
        if peers:
            best = min(p["p99_us"] - direct["p99_us"] for p in peers)
            line += (f"  added p99 hotpath {hotpath['p99_us'] - direct['p99_us']:.0f} us vs "
                     f"best peer {best:.0f} + 500 us")
        print(line)


def report_rows(rows: list[dict[str, Any]]) -> None:
    print(f"{'target':28s} {'body':7s} {'sess':4s} {'req/s':>7s} {'p50+us':>7s} "
          f"{'p99+us':>7s} {'gw us/req':>12s} {'cp us/req':>9s} "
          f"{'rps/bare':>8s} {'cpu/bare':>8s} {'cpu/lua0':>8s}")
    index = {(r["target"], r["body"], r["session"]): r for r in rows}
    for row in rows:
        key = (row["body"], row["session"])
        direct, bare, lua0 = (index[(n, *key)] for n in ("direct", "bare", "empty-lua"))
        cpu = row["envoy_cpu_us"]
        print(f"{row['target']:28s} {row['body']:7s} {'yes' if row['session'] else 'no':4s} "
              f"{row['rps']:7.0f} {row['p50_us'] - direct['p50_us']:7.0f} "
              f"{row['p99_us'] - direct['p99_us']:7.0f} {fmt(cpu):>12s} "
              f"{fmt(row['cp_cpu_us']):>9s} {row['rps'] / bare['rps']:8.2f} "
              f"{fmt(cpu / bare['envoy_cpu_us'] if cpu else None, '.2f'):>8s} "
              f"{fmt(cpu / lua0['envoy_cpu_us'] if cpu else None, '.2f'):>8s}")


def report_eight(eight: dict[str, dict[str, Any]]) -> None:
    print("8 MiB ASCII first message, one connection (Envoy CPU per request):")
    for name, result in eight.items():
        print(f"  {name:28s} {result['requests']:4d} requests  "
              f"{result['envoy_cpu_us'] / 1000:7.2f} ms/req  p50 {result['p50_us'] / 1000:7.2f} ms")
    names = list(eight)
    if len(names) == 2:
        delta = (eight[names[1]]["envoy_cpu_us"] - eight[names[0]]["envoy_cpu_us"]) / 1000
        print(f"  the filter's share (hotpath - bare): {delta:.2f} ms per request")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=3, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=8,
                        help="connections of the throughput runs")
    parser.add_argument("--peers-bin", default=os.environ.get("HOTPATH_BENCH_PEERS_BIN"),
                        help="directory holding vllm-router / sglang-router / nginx")
    parser.add_argument("--no-peers", action="store_true", help="skip nginx and the routers")
    parser.add_argument("--only-8mib", action="store_true",
                        help="only the 8 MiB first message (bare Envoy and hotpath): the "
                        "filter's cost on a large body, without the 1 KiB / 100 KiB matrix")
    asyncio.run(main(parser.parse_args()))
