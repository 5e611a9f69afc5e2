"""`hotpath up`: etcd, control plane, prober, simulators and Envoy in one process group.

Children get SIGTERM if `up` dies (PR_SET_PDEATHSIG); SIGINT/SIGTERM stop them all within
10 s (SIGTERM, then SIGKILL at the deadline); the first child to exit on its own stops the
rest, so a half-running stack never pretends to work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

from control_plane import processes
from control_plane.bootstrap import BootstrapSettings, render_bootstrap
from control_plane.store.etcd import EtcdSettings, etcd_client, hold_under_lease, list_prefix

log = logging.getLogger("hotpath.up")

STOP_DEADLINE_S = 8.0
SIM_POOL = "sim"
SIM_MODEL = "sim-model"
SIM_COUNT = 3
SIM_LEASE_TTL = 10


@dataclass(frozen=True)
class UpSettings:
    listen_host: str = "127.0.0.1"
    listen_port: int = 10000
    admin_port: int = 9901
    xds_port: int = 18000
    metrics_port: int = 9101
    prober_metrics_port: int = 9102
    etcd_url: str | None = None  # None: start the embedded etcd
    etcd_client_port: int = 2379
    etcd_peer_port: int = 2380
    sim_base_port: int = 8001
    with_sim: bool = True
    with_prober: bool = True
    data_dir: Path = field(default_factory=lambda: Path(".hotpath"))
    prefix: str = "/hotpath/"


@dataclass
class Child:
    name: str
    process: asyncio.subprocess.Process
    log_path: Path


class UpError(RuntimeError):
    """The stack cannot start; the message says what to change."""


class Stack:
    def __init__(self, settings: UpSettings) -> None:
        self.settings = settings
        self.children: list[Child] = []
        self.logs = settings.data_dir / "logs"
        self.etcd_url = settings.etcd_url or f"http://127.0.0.1:{settings.etcd_client_port}"

    async def spawn(self, name: str, command: list[str]) -> Child:
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"{name}.log"
        with open(log_path, "ab") as out:
            process = await asyncio.create_subprocess_exec(
                *command, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
                preexec_fn=processes.die_with_parent(),
            )
        child = Child(name, process, log_path)
        self.children.append(child)
        return child

    async def wait_ready(self, child: Child, check: object, timeout: float, what: str) -> None:
        assert callable(check)
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            if child.process.returncode is not None:
                raise UpError(f"{child.name} exited with code {child.process.returncode} "
                              f"while starting; see {child.log_path}")
            if await asyncio.to_thread(check):
                return
            await asyncio.sleep(0.1)
        raise UpError(f"{child.name} not ready after {timeout:g}s ({what}); see {child.log_path}")

    def check_ports_free(self) -> None:
        s = self.settings
        wanted = [(s.listen_host, s.listen_port, "Envoy listener (--listen)"),
                  ("127.0.0.1", s.admin_port, "Envoy admin (--admin-port)"),
                  ("127.0.0.1", s.xds_port, "xDS (--xds-port)"),
                  ("127.0.0.1", s.metrics_port, "control-plane metrics (--metrics-port)")]
        if s.with_prober:
            wanted.append(("127.0.0.1", s.prober_metrics_port,
                           "prober metrics (--prober-metrics-port)"))
        if s.etcd_url is None:
            wanted += [("127.0.0.1", s.etcd_client_port, "etcd client"),
                       ("127.0.0.1", s.etcd_peer_port, "etcd peer")]
        for host, port, what in wanted:
            if processes.port_open(host, port):
                raise UpError(f"port {port} ({what}) is already in use: stop what holds it "
                              "or choose another port")

    async def start(self) -> list[tuple[str, str]]:
        s = self.settings
        self.check_ports_free()
        s.data_dir.mkdir(parents=True, exist_ok=True)
        where: list[tuple[str, str]] = []
        python = [sys.executable, "-m", "control_plane"]
        etcd_args = ["--etcd", self.etcd_url, "--prefix", s.prefix]
        if s.etcd_url is None:
            etcd = await self.spawn("etcd", processes.etcd_command(
                s.data_dir / "etcd", s.etcd_client_port, s.etcd_peer_port))
            await self.wait_ready(etcd, lambda: processes.http_ok(f"{self.etcd_url}/health"),
                                  30, "GET /health")
            where.append(("etcd", f"{self.etcd_url} (data in {s.data_dir / 'etcd'})"))
        else:
            where.append(("etcd", f"{self.etcd_url} (external)"))
        control = await self.spawn("control-plane", python + [
            "control-plane", *etcd_args, "--xds", f"127.0.0.1:{s.xds_port}",
            "--listen", f"{s.listen_host}:{s.listen_port}",
            "--access-log", str((self.logs / "access.log").resolve()),
            "--metrics", f"127.0.0.1:{s.metrics_port}",
        ])
        await self.wait_ready(control, lambda: processes.port_open("127.0.0.1", s.xds_port),
                              30, "xDS port")
        where.append(("control plane", f"xDS on 127.0.0.1:{s.xds_port}, "
                                        f"metrics http://127.0.0.1:{s.metrics_port}/metrics"))
        if s.with_sim and not await self._has_endpoints():
            sim = await self.spawn("sim", python + [
                "sim", "--count", str(SIM_COUNT), "--port", str(s.sim_base_port),
                "--model", SIM_MODEL])
            last = s.sim_base_port + SIM_COUNT - 1
            await self.wait_ready(sim, lambda: processes.port_open("127.0.0.1", last), 30,
                                  "simulator ports")
            self._sim_task = asyncio.create_task(self._register_sims())
            where.append(("simulated GPUs", f"127.0.0.1:{s.sim_base_port}-{last} "
                                            f"(pool {SIM_POOL}, model {SIM_MODEL})"))
        if s.with_prober:
            await self.spawn("prober", python + [
                "prober", *etcd_args, "--admin", f"http://127.0.0.1:{s.admin_port}",
                "--metrics", f"127.0.0.1:{s.prober_metrics_port}"])
            where.append(("prober", "probing every endpoint, metrics "
                                    f"http://127.0.0.1:{s.prober_metrics_port}/metrics"))
        bootstrap = s.data_dir / "envoy-bootstrap.yaml"
        bootstrap.write_text(render_bootstrap(BootstrapSettings(
            node_id=f"hotpath-up-{os.getpid()}", xds_port=s.xds_port, admin_port=s.admin_port)))
        envoy = await self.spawn("envoy", processes.envoy_command(bootstrap))
        await self.wait_ready(
            envoy, lambda: processes.port_open(s.listen_host, s.listen_port), 60,
            f"listener on {s.listen_host}:{s.listen_port}")
        where.append(("envoy", f"http://{s.listen_host}:{s.listen_port} "
                               f"(admin http://127.0.0.1:{s.admin_port})"))
        where.append(("logs", str(self.logs)))
        return where

    async def _has_endpoints(self) -> bool:
        settings = EtcdSettings(urls=self.etcd_url, prefix=self.settings.prefix)
        async with etcd_client(settings) as client:
            _, items = await list_prefix(client, settings, "endpoints/")
        return bool(items)

    async def _register_sims(self) -> None:
        """The demo pool lives under a lease: it disappears when `up` stops."""
        settings = EtcdSettings(urls=self.etcd_url, prefix=self.settings.prefix)
        entries: list[tuple[str, object]] = [(f"pools/{SIM_POOL}", {"models": [SIM_MODEL]})]
        entries += [
            (f"endpoints/{SIM_POOL}/sim-{index}",
             {"address": "127.0.0.1", "port": self.settings.sim_base_port + index})
            for index in range(SIM_COUNT)
        ]
        await hold_under_lease(settings, entries, SIM_LEASE_TTL)

    async def watch_children(self) -> Child:
        waits = {asyncio.ensure_future(c.process.wait()): c for c in self.children}
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in waits:
            task.cancel()
        return waits[next(iter(done))]

    async def stop(self) -> None:
        task = getattr(self, "_sim_task", None)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        # Envoy first so no request reaches a stopping upstream; etcd last.
        for child in reversed(self.children):
            if child.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.process.send_signal(signal.SIGTERM)
        deadline = asyncio.get_running_loop().time() + STOP_DEADLINE_S
        for child in reversed(self.children):
            remaining = max(0.1, deadline - asyncio.get_running_loop().time())
            try:
                await asyncio.wait_for(child.process.wait(), remaining)
            except TimeoutError:
                log.warning("%s did not stop in time; killing it", child.name)
                with contextlib.suppress(ProcessLookupError):
                    child.process.kill()
                await child.process.wait()


async def run_up(settings: UpSettings) -> int:
    stack = Stack(settings)
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    try:
        try:
            where = await stack.start()
        except (UpError, processes.MissingBinary, TimeoutError) as exc:
            print(f"hotpath up: {exc}", file=sys.stderr)
            return 1
        width = max(len(name) for name, _ in where)
        print("hotpath is up:")
        for name, detail in where:
            print(f"  {name.ljust(width)}  {detail}")
        print(f"try: curl -s http://{settings.listen_host}:{settings.listen_port}/v1/models")
        print("Ctrl-C stops everything.", flush=True)
        watcher = asyncio.ensure_future(stack.watch_children())
        stop_wait = asyncio.ensure_future(stopping.wait())
        await asyncio.wait({watcher, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if watcher.done():
            child = watcher.result()
            print(f"hotpath up: {child.name} exited with code {child.process.returncode}; "
                  f"stopping (see {child.log_path})", file=sys.stderr)
            return 1
        watcher.cancel()
        return 0
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await stack.stop()
        print("hotpath stopped.", flush=True)
