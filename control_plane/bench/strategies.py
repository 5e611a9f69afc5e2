"""What each strategy runs: simulated servers, the hotpath stack, peers, and the oracle.

Fairness rules (docs/benchmark.md explains them):
- Every strategy gets fresh simulated servers (a new process, cold, empty caches) with the same
  parameters and seeds, and replays the same workload (servers-join: all primed first).
- The hotpath stack (etcd, control plane, Envoy) is started once, and the control plane and
  Envoy again only for a strategy that needs another kind (traffic stream, pins). Between
  strategies the pool `bench` gets its new endpoints and load balancer and the bench waits
  until Envoy's admin shows both, so no request of one strategy meets the previous one's config.
- The oracle sends each session straight to a server dealt to it in arrival order, after one
  priming request per server: every turn meets a warm server that holds its prefix, with no
  gateway in between. It is the lower bound for a sticky router, not for every conceivable one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from control_plane.bench.report import ServerCounters
from control_plane.errors import BenchError
from control_plane.runtime import processes
from control_plane.runtime.bootstrap import BootstrapSettings, render_bootstrap
from control_plane.runtime.envoy_admin import get_json, parse_clusters
from control_plane.runtime.supervisor import ProcessGroup
from control_plane.sim.model import SimParams
from control_plane.store.etcd import EtcdSettings, delete, etcd_client, put_json

BENCH_POOL = "bench"
STATIC_POOL = "static"
STATIC_MODEL = "hotpath-bench-static"


@dataclass(frozen=True)
class StrategySpec:
    name: str
    label: str
    kind: str  # "hotpath", "oracle" or "peer"
    lb: str | None = None  # hotpath: the pool's lb
    prober: bool = False
    peer: str | None = None
    # hotpath + prober: whether warmth also comes from real traffic (Envoy streams its
    # timings to the control plane, the prober reads its /traffic window) or from probes
    # only (control plane with --no-traffic-stream, prober without --traffic).
    traffic: bool = False
    # Sliding-TTL pins (control_plane/affinity/): True needs them (the product's default,
    # which needs the traffic stream: pins come from the sessions Envoy reports); False runs
    # the control plane with --max-pins 0; None: either (no ring change can move sessions).
    pins: bool | None = None

    @property
    def stack(self) -> tuple[bool | None, bool | None]:
        """(traffic stream, pins) this strategy needs of the hotpath stack; None: either."""
        traffic = self.traffic if self.prober else (True if self.pins else None)
        return traffic, self.pins


STRATEGIES = (
    StrategySpec("round_robin", "round robin (Envoy)", "hotpath", lb="round_robin"),
    StrategySpec("least_request", "least request (Envoy)", "hotpath", lb="least_request"),
    StrategySpec("ring_hash", "hotpath ring hash", "hotpath", lb="ring_hash", pins=True),
    StrategySpec("ring_hash_no_pins", "hotpath ring hash, no pins", "hotpath", lb="ring_hash",
                 pins=False),
    StrategySpec("ring_hash_prober", "hotpath ring hash + prober", "hotpath", lb="ring_hash",
                 prober=True),
    StrategySpec("ring_hash_traffic", "hotpath ring hash + prober + traffic", "hotpath",
                 lb="ring_hash", prober=True, traffic=True),
    StrategySpec("oracle", "oracle (warm, sticky, direct)", "oracle"),
    StrategySpec("nginx-hash", "nginx hash consistent", "peer", peer="nginx-hash"),
    StrategySpec("vllm-router", "vllm-router consistent_hash", "peer", peer="vllm-router"),
    StrategySpec("sglang-router", "sglang-router cache_aware", "peer", peer="sglang-router"),
)
BY_NAME = {s.name: s for s in STRATEGIES}


# -- backends ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backend:
    name: str
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


_SIM_LINE = re.compile(r"^sim (\S+) on http://([0-9.]+):(\d+) model", re.MULTILINE)


async def start_sims(group: ProcessGroup, name: str, count: int, params: SimParams, model: str
                     ) -> tuple[list[Backend], subprocess.Popen[bytes]]:
    """`count` fresh simulated servers in one child process; (backends, the process). Server
    i gets seed + i."""
    command = [sys.executable, "-m", "control_plane", "sim", "--count", str(count),
               "--port", "0", "--name", name, "--model", model]
    for f in dataclasses.fields(SimParams):
        command += ["--" + f.name.replace("_", "-"), str(getattr(params, f.name))]
    log = group.log_path(name)
    log.unlink(missing_ok=True)
    child = group.start(name, command)

    def ready() -> bool:
        return log.exists() and len(_SIM_LINE.findall(log.read_text(errors="replace"))) >= count

    await group.wait(name, child, ready, 30, f"{count} servers listening")
    found = _SIM_LINE.findall(log.read_text(errors="replace"))[:count]
    return [Backend(n, host, int(port)) for n, host, port in found], child


_METRIC = re.compile(r"^([a-zA-Z_:]+)(?:\{[^}]*\})? ([0-9.eE+-]+)$", re.MULTILINE)


def parse_sim_metrics(text: str) -> ServerCounters:
    values = {name: float(v) for name, v in _METRIC.findall(text)}
    return ServerCounters(
        requests=int(values.get("vllm:time_to_first_token_seconds_count", 0)),
        prompt_tokens=int(values.get("vllm:prompt_tokens_total", 0)),
        generation_tokens=int(values.get("vllm:generation_tokens_total", 0)),
        cold_starts=int(values.get("hotpath_sim_cold_starts_total", 0)),
    )


async def scrape(backends: Sequence[Backend]) -> dict[str, ServerCounters] | None:
    """Counters of simulated servers; None when any of them has no such metrics."""
    out: dict[str, ServerCounters] = {}
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        for b in backends:
            try:
                async with http.get(f"{b.url}/metrics") as resp:
                    text = await resp.text()
            except (aiohttp.ClientError, TimeoutError):
                return None
            if "hotpath_sim_cold_starts_total" not in text:
                return None
            out[b.name] = parse_sim_metrics(text)
    return out


async def prime(backends: Sequence[Backend], model: str, system_prompt: str,
                timeout_s: float) -> None:
    """One tiny request per server (concurrently): loads the model and caches the shared system
    prompt, which is all a server can hold before the sessions start."""
    body = {"model": model, "max_tokens": 1,
            "messages": [{"role": "system", "content": system_prompt},
                         {"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as http:

        async def one(b: Backend) -> None:
            async with http.post(f"{b.url}/v1/chat/completions", json=body) as resp:
                if resp.status != 200:
                    raise BenchError(f"priming {b.url} got {resp.status}: "
                                     f"{(await resp.text())[:200]}")
                await resp.read()

        await asyncio.gather(*(one(b) for b in backends))


# -- the hotpath stack -------------------------------------------------------------------------


class HotpathStack:
    """etcd (embedded unless one is given), the control plane and one Envoy, on free ports.
    The control plane serves its metrics (and its `/traffic` window) on `metrics_url`; with
    `traffic_stream` off it runs with --no-traffic-stream, with `pins` off with --max-pins 0.
    `stop` ends the control plane and Envoy but not etcd, so a stack of another kind can start
    on the same etcd."""

    def __init__(self, group: ProcessGroup, etcd_url: str | None = None,
                 prefix: str = "/hotpath-bench/", traffic_stream: bool = True,
                 pins: bool = True) -> None:
        self.group = group
        self.etcd_url = etcd_url
        self.settings = EtcdSettings(urls=etcd_url or "", prefix=prefix)
        self.traffic_stream = traffic_stream
        self.pins = pins
        self.listen_port = 0
        self.metrics_port = 0
        self.admin_url = ""
        self._children: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listen_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    def control_plane_command(self, xds_port: int, access_log: Path) -> list[str]:
        assert self.etcd_url is not None
        return [
            sys.executable, "-m", "control_plane", "control-plane", "--etcd", self.etcd_url,
            "--prefix", self.settings.prefix, "--xds", f"127.0.0.1:{xds_port}",
            "--listen", f"127.0.0.1:{self.listen_port}", "--access-log", str(access_log),
            "--metrics", f"127.0.0.1:{self.metrics_port}",
            *([] if self.traffic_stream else ["--no-traffic-stream"]),
            *([] if self.pins else ["--max-pins", "0"])]

    async def stop(self) -> None:
        for child in reversed(self._children):
            await asyncio.to_thread(self.group.stop, child)
        self._children = []

    async def start(self) -> None:
        g = self.group
        suffix = ("" if self.traffic_stream else "-no-stream") + ("" if self.pins else "-no-pins")
        if self.etcd_url is None:
            client_port, peer_port = processes.free_port(), processes.free_port()
            self.etcd_url = f"http://127.0.0.1:{client_port}"
            etcd = g.start("etcd", processes.etcd_command(g.workdir / "etcd", client_port,
                                                          peer_port,
                                                          name="bench"))
            url = self.etcd_url
            await g.wait("etcd", etcd, lambda: processes.http_ok(f"{url}/health"), 30,
                         "GET /health")
        self.settings = dataclasses.replace(self.settings, urls=self.etcd_url)
        async with etcd_client(self.settings) as client:  # a fresh prefix: nothing left over
            await delete(client, self.settings, "", prefix=True)
        xds, self.listen_port = processes.free_port(), processes.free_port()
        self.metrics_port = processes.free_port()
        cp_name, envoy_name = f"control-plane{suffix}", f"envoy{suffix}"
        cp = g.start(cp_name, self.control_plane_command(
            xds, (g.workdir / f"{envoy_name}-access.log").resolve()))
        self._children.append(cp)
        await g.wait(cp_name, cp, lambda: processes.port_open("127.0.0.1", xds), 30,
                     "xDS port")
        bootstrap = g.workdir / f"{envoy_name}-bootstrap.yaml"
        bootstrap.write_text(render_bootstrap(BootstrapSettings(
            node_id="hotpath-bench", xds_port=xds, admin_port=0)))
        address = g.workdir / f"{envoy_name}-admin.txt"
        address.unlink(missing_ok=True)
        envoy = g.start(envoy_name, processes.envoy_command(bootstrap, address))
        self._children.append(envoy)
        await g.wait(envoy_name, envoy,
                     lambda: address.exists() and address.read_text().strip(), 30,
                     "admin address")
        self.admin_url = f"http://{address.read_text().strip()}"
        port = self.listen_port
        await g.wait(envoy_name, envoy, lambda: processes.port_open("127.0.0.1", port), 60,
                     "listener")

    async def put_pools(self, pools: dict[str, dict[str, Any]]) -> None:
        """Write the pools, then wait until Envoy knows each model (503: no endpoint yet; not
        404), so later switches only touch clusters and endpoints."""
        async with etcd_client(self.settings) as client:
            for name, value in pools.items():
                await put_json(client, self.settings, f"pools/{name}", value)
        models = [m for value in pools.values() for m in value["models"]]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            for model in models:
                last = ""
                while True:
                    # No messages: a backend would refuse it, so it can never warm one.
                    async with http.post(f"{self.url}/v1/chat/completions",
                                         json={"model": model}) as resp:
                        if resp.status in (400, 503):
                            break
                        last = f"{resp.status} {(await resp.text())[:200]}"
                    if loop.time() > deadline:
                        raise BenchError(f"Envoy did not route model {model} within 30s (last "
                                         f"answer: {last}); see {self.group.workdir}/envoy.log")
                    await asyncio.sleep(0.1)

    async def switch(self, pool: str, value: dict[str, Any], backends: Sequence[Backend],
                     old: Sequence[str] = ()) -> list[str]:
        """Replace the pool's endpoints and settings; wait until Envoy runs exactly them.
        Returns the endpoint ids (pass them as `old` to the next switch). Ids are the same in
        every strategy and run (`<pool>-<i>`): ring hash places hosts by id, so every hashing
        strategy splits the sessions the same way."""
        ids = [f"{pool}-{i}" for i in range(len(backends))]
        want = {(i, b.port) for i, b in zip(ids, backends, strict=True)}
        async with etcd_client(self.settings) as client:
            for endpoint in old:
                await delete(client, self.settings, f"endpoints/{pool}/{endpoint}")
                await delete(client, self.settings, f"status/{pool}/{endpoint}")
            await put_json(client, self.settings, f"pools/{pool}", value)
            for endpoint, b in zip(ids, backends, strict=True):
                await put_json(client, self.settings, f"endpoints/{pool}/{endpoint}",
                               {"address": b.host, "port": b.port})
        want_lb = {"round_robin": None, "least_request": "LEAST_REQUEST",
                   "ring_hash": "RING_HASH", "maglev": "MAGLEV"}[value.get("lb", "ring_hash")]

        def converged() -> bool:
            hosts = {(h.hostname, h.port) for h in parse_clusters(
                get_json(f"{self.admin_url}/clusters?format=json")) if h.cluster == pool}
            if hosts != want:
                return False
            dump = get_json(f"{self.admin_url}/config_dump?resource=dynamic_active_clusters")
            for item in dump.get("configs", []):
                cluster = item.get("cluster", {})
                if cluster.get("name") == pool:
                    return lb_policy(cluster) == want_lb
            return False

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while not await asyncio.to_thread(converged):
            if loop.time() > deadline:
                raise BenchError(f"Envoy did not converge on pool {pool} ({ids}) in 30s")
            await asyncio.sleep(0.1)
        return ids


    async def add(self, pool: str, backends: Sequence[Backend], first: int) -> list[str]:
        """Register more endpoints (ids `<pool>-<first>`, `<pool>-<first + 1>`, ...) in the
        pool, as a server that joins does; return once Envoy runs them (with pins, the control
        plane holds the ring change until the pins for it are in force)."""
        ids = [f"{pool}-{first + i}" for i in range(len(backends))]
        want = {(i, b.port) for i, b in zip(ids, backends, strict=True)}
        async with etcd_client(self.settings) as client:
            for endpoint, b in zip(ids, backends, strict=True):
                await put_json(client, self.settings, f"endpoints/{pool}/{endpoint}",
                               {"address": b.host, "port": b.port})

        def joined() -> bool:
            hosts = {(h.hostname, h.port) for h in parse_clusters(
                get_json(f"{self.admin_url}/clusters?format=json")) if h.cluster == pool}
            return want <= hosts

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while not await asyncio.to_thread(joined):
            if loop.time() > deadline:
                raise BenchError(f"Envoy did not add {ids} to pool {pool} within 30s")
            await asyncio.sleep(0.02)
        return ids

    async def metrics(self) -> dict[str, float]:
        """The control plane's own counters (`hotpath_*` lines of its /metrics, labels
        dropped: the bench has one pool that pins); {} when it does not answer."""
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
                async with http.get(f"{self.metrics_url}/metrics") as resp:
                    text = await resp.text()
        except (aiohttp.ClientError, TimeoutError):
            return {}
        return control_plane_counters(text)


_CP_METRIC = re.compile(r"^(hotpath_[a-z_]+)(\{[^}]*\})? ([0-9.eE+-]+)$")


def control_plane_counters(text: str, pool: str = BENCH_POOL) -> dict[str, float]:
    """`hotpath_*` values of a control plane's /metrics: unlabelled ones, and `pool`'s."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _CP_METRIC.match(line)
        if m and (m.group(2) is None or f'pool="{pool}"' in m.group(2)):
            out[m.group(1)] = float(m.group(3))
    return out


def lb_policy(cluster: dict[str, Any]) -> str | None:
    """A cluster's load balancer as Envoy's config dump shows it: `lb_policy` (absent for
    round robin), or the policy inside `load_balancing_policy`, where hotpath's ring-hash
    clusters put ring hash as the fallback of override-host (pins)."""
    policy = cluster.get("load_balancing_policy")
    if policy:
        text = json.dumps(policy)
        for name in ("ring_hash", "maglev", "least_request", "round_robin"):
            if f"envoy.load_balancing_policies.{name}" in text:
                return None if name == "round_robin" else name.upper()
    value = cluster.get("lb_policy")
    return value if isinstance(value, str) else None


def prober_command(stack: HotpathStack, traffic: bool = False,
                   prefill_ms_per_kib: float | None = None) -> list[str]:
    """One prober, no election, no metrics port. Envoy's admin shows it real traffic so that
    it never probes a server that is serving (the prober's own rule). With `traffic` it also
    reads the control plane's `/traffic` window and judges serving endpoints by the first
    tokens they serve; `prefill_ms_per_kib` is on the servers' clock (scaled like them)."""
    assert stack.etcd_url is not None
    command = [sys.executable, "-m", "control_plane", "prober", "--etcd", stack.etcd_url,
               "--prefix", stack.settings.prefix, "--admin", stack.admin_url,
               "--metrics", "off", "--no-election"]
    if traffic:
        command += ["--traffic", stack.metrics_url]
    if prefill_ms_per_kib is not None:
        command += ["--prefill-ms-per-kib", f"{prefill_ms_per_kib:g}"]
    return command


def prober_env() -> dict[str, str]:
    """The bench's environment without the prober's URL variables: a probe-only prober must
    not pick up HOTPATH_TRAFFIC, nor either prober another stack's admin."""
    return {k: v for k, v in os.environ.items() if k not in ("HOTPATH_TRAFFIC", "HOTPATH_ADMIN")}
