"""Test harness: real etcd, control plane and Envoy processes on free loopback ports.

Every process is started by PID and ended by PID in a finally, so a failing test leaves
nothing behind. Conditions are polled with deadlines, never slept on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from aiohttp import web

from control_plane.runtime import processes
from control_plane.runtime.bootstrap import BootstrapSettings, XdsClientTls, render_bootstrap
from control_plane.runtime.envoy_admin import parse_clusters
from control_plane.store.etcd import EtcdSettings, etcd_client, put_json
from control_plane.store.etcd import delete as etcd_delete

T = TypeVar("T")
REPO = Path(__file__).resolve().parent.parent


def start(command: list[str], log: Path, env: dict[str, str] | None = None
          ) -> subprocess.Popen[bytes]:
    """A child that dies with the test process, even a SIGKILLed pytest."""
    return processes.spawn(command, log, env=env, cwd=REPO)


def stop(process: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 10) -> None:
    processes.terminate(process, timeout, sig)


def wait_for(check: Callable[[], T], timeout: float = 30, what: str = "condition",
             interval: float = 0.05) -> T:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except Exception as exc:  # noqa: BLE001 - keep polling until the deadline
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


async def async_wait_for(check: Callable[[], Awaitable[T]], timeout: float = 30,
                         what: str = "condition", interval: float = 0.05) -> T:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = await check()
        except Exception as exc:  # noqa: BLE001 - keep polling until the deadline
            last = exc
        else:
            if last:
                return last
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


@dataclass
class Etcd:
    url: str
    data_dir: Path
    client_port: int
    peer_port: int
    log: Path
    process: subprocess.Popen[bytes] | None = None
    extra: list[str] = field(default_factory=list)

    def start(self) -> None:
        self.process = start(processes.etcd_command(self.data_dir, self.client_port,
                                                    self.peer_port, name="test") + self.extra,
                             self.log)
        if self.url.startswith("https"):
            wait_for(lambda: processes.port_open("127.0.0.1", self.client_port), 30,
                     "etcd port")
        else:
            wait_for(lambda: processes.http_ok(f"{self.url}/health"), 30, "etcd health")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None:
            stop(self.process, sig)
            self.process = None


def new_etcd(tmp: Path) -> Etcd:
    client, peer = processes.free_port(), processes.free_port()
    etcd = Etcd(url=f"http://127.0.0.1:{client}", data_dir=tmp / "etcd", client_port=client,
                peer_port=peer, log=tmp / "etcd.log")
    etcd.start()
    return etcd


@dataclass
class ControlPlaneProcess:
    etcd: EtcdSettings
    xds_port: int
    listen_port: int
    log: Path
    access_log: Path
    extra: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None
    metrics_port: int = field(default_factory=processes.free_port)

    def launcher(self) -> list[str]:
        """The command line up to the ``control-plane`` subcommand."""
        return [sys.executable, "-m", "control_plane", "-v"]

    def start(self) -> None:
        command = [*self.launcher(), "control-plane",
                   "--etcd", self.etcd.urls, "--prefix", self.etcd.prefix,
                   "--xds", f"127.0.0.1:{self.xds_port}",
                   "--listen", f"127.0.0.1:{self.listen_port}",
                   "--access-log", str(self.access_log),
                   "--metrics", f"127.0.0.1:{self.metrics_port}", *self.extra]
        self.process = start(command, self.log)
        wait_for(lambda: processes.port_open("127.0.0.1", self.xds_port), 30, "xDS port")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None:
            stop(self.process, sig)
            self.process = None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def ring_hash_settings(cluster: dict[str, Any]) -> dict[str, Any]:
    """The RingHash config inside a cluster's JSON (override-host -> ring hash)."""
    policy = cluster.get("load_balancing_policy", {})
    while policy:
        config = policy["policies"][0]["typed_extension_config"]["typed_config"]
        if config["@type"].endswith("RingHash"):
            return {k: v for k, v in config.items() if k != "@type"}
        policy = config.get("fallback_policy", {})
    return {}


@dataclass
class EnvoyProcess:
    tmp: Path
    name: str
    xds_port: int
    process: subprocess.Popen[bytes] | None = None
    admin_url: str = ""
    xds_tls: XdsClientTls | None = None

    def start(self) -> None:
        bootstrap = self.tmp / f"{self.name}-bootstrap.yaml"
        bootstrap.write_text(render_bootstrap(BootstrapSettings(
            node_id=self.name, xds_port=self.xds_port, admin_port=0, xds_tls=self.xds_tls)))
        address_path = self.tmp / f"{self.name}-admin.txt"
        address_path.unlink(missing_ok=True)
        self.process = start(processes.envoy_command(bootstrap, address_path, "info"),
                             self.tmp / f"{self.name}.log")
        address = wait_for(lambda: address_path.exists() and address_path.read_text().strip(),
                           30, "envoy admin address")
        self.admin_url = f"http://{address}"

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None:
            stop(self.process, sig)
            self.process = None

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"{self.admin_url}{path}", timeout=5) as reply:
            body = reply.read()
        return json.loads(body) if path.endswith("json") or "format=json" in path else body

    def config_dump(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.admin_url}/config_dump?include_eds", timeout=5) as r:
            return dict(json.load(r))

    def versions(self) -> dict[str, str]:
        """Versions Envoy applied for cds, lds and rds (the dump keeps none for EDS)."""
        found: dict[str, str] = {}
        for section in self.config_dump()["configs"]:
            kind = section["@type"].rsplit(".", 1)[-1]
            if kind == "ClustersConfigDump" and section.get("version_info"):
                found["cds"] = section["version_info"]
            elif kind == "ListenersConfigDump" and section.get("version_info"):
                found["lds"] = section["version_info"]
            elif kind == "RoutesConfigDump":
                for item in section.get("dynamic_route_configs", []):
                    found["rds"] = item.get("version_info", "")
        return found

    def ring_config(self, cluster: str) -> dict[str, Any]:
        """The cluster's ring-hash settings as Envoy applied them ({} while it has none):
        the fallback of its override-host policy (translate/clusters.py)."""
        for section in self.config_dump()["configs"]:
            if section["@type"].endswith("ClustersConfigDump"):
                for item in section.get("dynamic_active_clusters", []):
                    if item["cluster"]["name"] == cluster:
                        return ring_hash_settings(item["cluster"])
        return {}

    def hosts(self, cluster: str) -> dict[str, str]:
        """hostname -> health (healthy, degraded, unhealthy, ejected) as Envoy sees it."""
        return {h.hostname: h.health for h in parse_clusters(self.get("/clusters?format=json"))
                if h.cluster == cluster}

    def listener_ready(self, port: int) -> bool:
        return processes.port_open("127.0.0.1", port)


class Upstreams:
    """Tiny HTTP upstreams that answer with their own name (header and body)."""

    def __init__(self) -> None:
        self.runners: dict[str, web.AppRunner] = {}
        self.ports: dict[str, int] = {}
        self.hits: dict[str, int] = {}

    async def add(self, name: str, port: int = 0) -> int:
        async def handle(request: web.Request) -> web.StreamResponse:
            self.hits[name] = self.hits.get(name, 0) + 1
            body = await request.read()
            return web.json_response(
                {"served_by": name, "bytes": len(body),
                 "session": request.headers.get("x-hotpath-session"),
                 "model": request.headers.get("x-hotpath-model")},
                headers={"x-served-by": name})

        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        sockets = site._server.sockets  # type: ignore[union-attr]
        self.ports[name] = sockets[0].getsockname()[1]
        self.runners[name] = runner
        return self.ports[name]

    async def remove(self, name: str) -> None:
        runner = self.runners.pop(name)
        await runner.cleanup()

    async def close(self) -> None:
        for runner in self.runners.values():
            await runner.cleanup()
        self.runners.clear()


@dataclass
class Stack:
    """etcd (shared) + a control plane + Envoys, on a prefix of their own."""

    tmp: Path
    etcd: EtcdSettings
    control_plane: ControlPlaneProcess
    envoys: list[EnvoyProcess]
    listen_port: int

    @property
    def envoy(self) -> EnvoyProcess:
        return self.envoys[0]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listen_port}"

    def add_envoy(self, name: str, xds_tls: XdsClientTls | None = None) -> EnvoyProcess:
        envoy = EnvoyProcess(self.tmp, name, self.control_plane.xds_port, xds_tls=xds_tls)
        envoy.start()
        self.envoys.append(envoy)
        return envoy

    async def put(self, key: str, value: Any) -> None:
        async with etcd_client(self.etcd) as client:
            if isinstance(value, (bytes, str)):
                assert client.kv is not None
                await client.kv.put(self.etcd.prefix + key, value)
            else:
                await put_json(client, self.etcd, key, value)

    async def get_json(self, key: str) -> Any:
        """The JSON value of ``key`` under the prefix (None: no such key)."""
        async with etcd_client(self.etcd) as client:
            assert client.kv is not None
            reply = await client.kv.get(self.etcd.prefix + key, timeout=5)
            return json.loads(reply.kvs[0].value) if reply.kvs else None

    async def delete(self, key: str) -> None:
        async with etcd_client(self.etcd) as client:
            await etcd_delete(client, self.etcd, key)

    async def wait_listener(self) -> None:
        await asyncio.to_thread(wait_for, lambda: processes.port_open("127.0.0.1",
                                                                      self.listen_port),
                                30, "Envoy listener")

    def close(self) -> None:
        for envoy in self.envoys:
            envoy.stop()
        self.control_plane.stop()


def make_stack(tmp: Path, etcd_url: str, prefix: str, envoys: int = 1,
               extra: list[str] | None = None, etcd: EtcdSettings | None = None,
               xds_tls: XdsClientTls | None = None, metrics_port: int | None = None) -> Stack:
    listen = processes.free_port()
    settings = etcd or EtcdSettings(urls=etcd_url, prefix=prefix)
    cp = ControlPlaneProcess(settings, processes.free_port(), listen, tmp / "control-plane.log",
                             tmp / "access.log", extra or [],
                             metrics_port=metrics_port or processes.free_port())
    stack = Stack(tmp, settings, cp, [], listen)
    try:
        cp.start()
        for index in range(envoys):
            stack.add_envoy(f"envoy-{index}", xds_tls)
    except BaseException:
        stack.close()
        raise
    return stack


async def chat(session: aiohttp.ClientSession, url: str, model: str,
               headers: dict[str, str] | None = None, **body: Any
               ) -> tuple[int, dict[str, str], Any]:
    payload = {"model": model, "messages": [{"role": "user", "content": "hello"}], **body}
    async with session.post(f"{url}/v1/chat/completions", json=payload,
                            headers=headers or {}) as reply:
        text = await reply.text()
        try:
            data = json.loads(text)
        except ValueError:
            data = text
        return reply.status, dict(reply.headers), data


@contextlib.contextmanager
def env(**values: str) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class ProberProcess:
    """`hotpath prober` against a stack's etcd and Envoy admin (``extra``: more flags)."""

    def __init__(self, stack: Stack, name: str, *extra: str) -> None:
        self.metrics_port = processes.free_port()
        self.log = stack.tmp / f"{name}.log"
        self.command = [sys.executable, "-m", "control_plane", "prober", "--etcd", stack.etcd.urls,
                        "--prefix", stack.etcd.prefix, "--admin", stack.envoy.admin_url,
                        "--metrics", f"127.0.0.1:{self.metrics_port}", "--leader-ttl", "2",
                        *extra]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> ProberProcess:
        self.process = start(self.command, self.log)
        wait_for(lambda: processes.port_open("127.0.0.1", self.metrics_port), 30,
                 "prober metrics port")
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        """Stops the process; its exit code."""
        process, self.process = self.process, None
        if process is None:
            return None
        stop(process, sig)
        return process.returncode

    def metrics(self) -> dict[str, float]:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            text = reply.read().decode()
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels``."""
        total = 0.0
        for sample, value in self.metrics().items():
            base, _, rest = sample.partition("{")
            if base != name:
                continue
            found = dict(re.findall(r'(\w+)="([^"]*)"', rest))
            if labels.items() <= found.items():
                total += value
        return total
