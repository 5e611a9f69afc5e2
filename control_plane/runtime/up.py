"""`hotpath up`: etcd, control plane, prober, simulators and Envoy, supervised.

Children get SIGTERM if `up` dies (PR_SET_PDEATHSIG). A child that exits is restarted with
backoff and a log line while the others keep running (Envoy keeps serving its last config
through a control-plane or etcd restart); a crash loop stops the stack with a message naming
the child and its log. SIGINT/SIGTERM stop every child within 10 s. ``<data>/up.json`` says
what runs and how often each child restarted (`hotpath status` shows it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from control_plane.errors import StartupError
from control_plane.runtime import processes
from control_plane.runtime.bootstrap import DELTA_DEFAULT, BootstrapSettings, render_bootstrap
from control_plane.runtime.supervisor import Child, ProcessGroup
from control_plane.store.etcd import (
    EtcdSettings,
    child_etcd_args,
    child_etcd_env,
    etcd_client,
    hold_under_lease,
    list_prefix,
)

log = logging.getLogger("hotpath.up")

STOP_DEADLINE_S = 8.0
SIM_POOL = "sim"
SIM_MODEL = "sim-model"
SIM_COUNT = 3
SIM_LEASE_TTL = 10
STATE_FILE = "up.json"


@dataclass(frozen=True)
class UpSettings:
    listen_host: str = "127.0.0.1"
    listen_port: int = 10000
    admin_port: int = 9901
    xds_port: int = 18000
    metrics_port: int = 9101
    prober_metrics_port: int = 9102
    # None: start the embedded etcd on 127.0.0.1:etcd_client_port; else use this one.
    etcd: EtcdSettings | None = None
    prefix: str = "/hotpath/"
    etcd_client_port: int = 2379
    etcd_peer_port: int = 2380
    sim_base_port: int = 8001
    with_sim: bool = True
    with_prober: bool = True
    data_dir: Path = field(default_factory=lambda: Path(".hotpath"))
    # Envoy's ADS flavour (bootstrap api_type): delta (DELTA_GRPC) or state of the world.
    delta: bool = DELTA_DEFAULT

    def etcd_settings(self) -> EtcdSettings:
        if self.etcd is not None:
            return self.etcd
        return EtcdSettings(urls=f"http://127.0.0.1:{self.etcd_client_port}", prefix=self.prefix)


def read_up_state(data_dir: Path) -> dict[str, object] | None:
    """What `up` last wrote to ``<data_dir>/up.json``; None when no `up` ran there."""
    try:
        value = json.loads((data_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


class Stack:
    def __init__(self, settings: UpSettings) -> None:
        self.settings = settings
        self.etcd = settings.etcd_settings()
        self.logs = settings.data_dir / "logs"
        self.group = ProcessGroup(self.logs)
        self._sim_task: asyncio.Task[None] | None = None

    async def spawn(self, name: str, command: list[str], check: Callable[[], object],
                    timeout: float, what: str, env: dict[str, str] | None = None) -> None:
        process = self.group.start(name, command, env=env)
        await self.group.wait(name, process, check, timeout, what)

    def check_ports_free(self) -> None:
        s = self.settings
        wanted = [(s.listen_host, s.listen_port, "Envoy listener (--listen)"),
                  ("127.0.0.1", s.admin_port, "Envoy admin (--admin-port)"),
                  ("127.0.0.1", s.xds_port, "xDS (--xds-port)"),
                  ("127.0.0.1", s.metrics_port, "control-plane metrics (--metrics-port)")]
        if s.with_prober:
            wanted.append(("127.0.0.1", s.prober_metrics_port,
                           "prober metrics (--prober-metrics-port)"))
        if s.etcd is None:
            wanted += [("127.0.0.1", s.etcd_client_port, "etcd client (--etcd-port)"),
                       ("127.0.0.1", s.etcd_peer_port, "etcd peer (--etcd-peer-port)")]
        for host, port, what in wanted:
            if processes.port_open(host, port):
                raise StartupError(f"port {port} ({what}) is already in use: stop what holds "
                                   "it or choose another port")

    async def start(self) -> list[tuple[str, str]]:
        s = self.settings
        self.check_ports_free()
        s.data_dir.mkdir(parents=True, exist_ok=True)
        where: list[tuple[str, str]] = []
        python = [sys.executable, "-m", "control_plane"]
        etcd_args = child_etcd_args(self.etcd)
        env = {**os.environ, **child_etcd_env(self.etcd)}
        if s.etcd is None:
            url = self.etcd.urls
            await self.spawn("etcd", processes.etcd_command(
                s.data_dir / "etcd", s.etcd_client_port, s.etcd_peer_port),
                lambda: processes.http_ok(f"{url}/health"), 30, "GET /health")
            where.append(("etcd", f"{url} (data in {s.data_dir / 'etcd'})"))
        else:
            where.append(("etcd", f"{self.etcd.urls} (external)"))
        await self.spawn("control-plane", python + [
            "control-plane", *etcd_args, "--xds", f"127.0.0.1:{s.xds_port}",
            "--listen", f"{s.listen_host}:{s.listen_port}",
            "--access-log", str((self.logs / "access.log").resolve()),
            "--metrics", f"127.0.0.1:{s.metrics_port}",
        ], lambda: processes.port_open("127.0.0.1", s.xds_port), 30, "xDS port", env=env)
        where.append(("control plane", f"xDS on 127.0.0.1:{s.xds_port}, "
                                        f"metrics http://127.0.0.1:{s.metrics_port}/metrics"))
        if s.with_sim and not await self._has_endpoints():
            last = s.sim_base_port + SIM_COUNT - 1
            await self.spawn("sim", python + [
                "sim", "--count", str(SIM_COUNT), "--port", str(s.sim_base_port),
                "--model", SIM_MODEL], lambda: processes.port_open("127.0.0.1", last), 30,
                "simulator ports")
            self._sim_task = asyncio.create_task(self._register_sims())
            where.append(("simulated GPUs", f"127.0.0.1:{s.sim_base_port}-{last} "
                                            f"(pool {SIM_POOL}, model {SIM_MODEL})"))
        if s.with_prober:
            self.group.start("prober", python + [
                "prober", *etcd_args, "--admin", f"http://127.0.0.1:{s.admin_port}",
                "--traffic", f"http://127.0.0.1:{s.metrics_port}",
                "--metrics", f"127.0.0.1:{s.prober_metrics_port}"], env=env)
            where.append(("prober", "probing every endpoint, metrics "
                                    f"http://127.0.0.1:{s.prober_metrics_port}/metrics"))
        bootstrap = s.data_dir / "envoy-bootstrap.yaml"
        bootstrap.write_text(render_bootstrap(BootstrapSettings(
            node_id=f"hotpath-up-{os.getpid()}", xds_port=s.xds_port, admin_port=s.admin_port,
            delta=s.delta)))
        await self.spawn("envoy", processes.envoy_command(bootstrap),
                         lambda: processes.port_open(s.listen_host, s.listen_port), 60,
                         f"listener on {s.listen_host}:{s.listen_port}")
        where.append(("envoy", f"http://{s.listen_host}:{s.listen_port} "
                               f"(admin http://127.0.0.1:{s.admin_port})"))
        where.append(("logs", str(self.logs)))
        return where

    async def _has_endpoints(self) -> bool:
        async with etcd_client(self.etcd) as client:
            _, items = await list_prefix(client, self.etcd, "endpoints/")
        return bool(items)

    async def _register_sims(self) -> None:
        """The demo pool lives under a lease: it disappears when `up` stops."""
        entries: list[tuple[str, object]] = [(f"pools/{SIM_POOL}", {"models": [SIM_MODEL]})]
        entries += [
            (f"endpoints/{SIM_POOL}/sim-{index}",
             {"address": "127.0.0.1", "port": self.settings.sim_base_port + index})
            for index in range(SIM_COUNT)
        ]
        await hold_under_lease(self.etcd, entries, SIM_LEASE_TTL)

    def write_state(self) -> None:
        """``up.json``: each child's PID and restarts, for `hotpath status`."""
        state = {"pid": os.getpid(), "written_at": round(time.time(), 3), "children": {
            c.name: {"pid": c.process.pid, "running": c.process.poll() is None,
                     "restarts": c.restarts} for c in self.group.children}}
        path = self.settings.data_dir / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(path)

    async def supervise(self) -> Child:
        """Restart children that die; returns the child of a crash loop."""
        gave_up: asyncio.Future[Child] = asyncio.get_running_loop().create_future()

        def give_up(child: Child) -> None:
            if not gave_up.done():
                gave_up.set_result(child)

        supervisor = asyncio.create_task(self.group.supervise(give_up))
        try:
            while not gave_up.done():
                self.write_state()
                await asyncio.wait({gave_up}, timeout=1.0)
            return gave_up.result()
        finally:
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor

    async def stop(self) -> None:
        if self._sim_task is not None:
            self._sim_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sim_task
        # Newest first: Envoy before the upstreams and the control plane, etcd last.
        await asyncio.to_thread(self.group.close, STOP_DEADLINE_S)
        with contextlib.suppress(OSError):
            (self.settings.data_dir / STATE_FILE).unlink()


async def run_up(settings: UpSettings) -> int:
    """Start the stack, print what runs where, supervise until cancelled (SIGINT/SIGTERM)."""
    stack = Stack(settings)
    try:
        where = await stack.start()
        width = max(len(name) for name, _ in where)
        print("hotpath is up:")
        for name, detail in where:
            print(f"  {name.ljust(width)}  {detail}")
        print(f"try: curl -s http://{settings.listen_host}:{settings.listen_port}/v1/models")
        print("Ctrl-C stops everything.", flush=True)
        child = await stack.supervise()
        raise StartupError(f"{child.name} keeps exiting (code {child.process.returncode}, "
                           f"{child.restarts} restarts); stopping. See "
                           f"{stack.group.log_path(child.name)}")
    finally:
        await stack.stop()
        print("hotpath stopped.", flush=True)
