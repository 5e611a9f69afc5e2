"""`hotpath up` and the config CLI, as a user runs them (real etcd, Envoy, simulators)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from control_plane.runtime import processes
from control_plane.store.etcd import EtcdSettings, etcd_client, put_json
from tests.harness import REPO, wait_for
from tests.integration.test_faults_load import Load, routable

pytestmark = pytest.mark.integration


@dataclass
class Up:
    process: subprocess.Popen[str]
    workdir: Path
    ports: dict[str, int]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['listen']}"

    @property
    def etcd(self) -> str:
        return f"http://127.0.0.1:{self.ports['etcd']}"

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "control_plane", *args,
                               "--etcd", self.etcd], capture_output=True, text=True,
                              timeout=60, cwd=self.workdir)

    def output(self) -> str:
        return (self.workdir / "up.out").read_text()


def start_up(workdir: Path, *extra: str) -> Up:
    ports = {name: processes.free_port() for name in
             ("listen", "admin", "xds", "etcd", "peer", "metrics", "prober")}
    ports["sim"] = consecutive_free_ports(3)
    command = [sys.executable, "-m", "control_plane", "up",
               "--listen", f"127.0.0.1:{ports['listen']}", "--admin-port", str(ports["admin"]),
               "--xds-port", str(ports["xds"]), "--etcd-port", str(ports["etcd"]),
               "--etcd-peer-port", str(ports["peer"]), "--sim-port", str(ports["sim"]),
               "--metrics-port", str(ports["metrics"]),
               "--prober-metrics-port", str(ports["prober"]), *extra]
    out = open(workdir / "up.out", "w")  # noqa: SIM115 - the child holds it; closed below
    try:
        process = subprocess.Popen(command, cwd=workdir, stdout=out, stderr=subprocess.STDOUT,
                                   text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    finally:
        out.close()
    up = Up(process, workdir, ports)
    try:
        wait_for(lambda: "hotpath is up" in up.output() or process.poll() is not None, 90,
                 "hotpath up to start")
    except BaseException:
        stop_up(up)
        raise
    assert process.poll() is None, up.output()
    return up


def consecutive_free_ports(count: int) -> int:
    """The first of ``count`` consecutive free loopback ports (the simulators' range)."""
    for _ in range(100):
        first = processes.free_port()
        if first + count <= 65535 and not any(
                processes.port_open("127.0.0.1", first + i) for i in range(count)):
            return first
    raise AssertionError(f"no {count} consecutive free ports")


def stop_up(up: Up, sig: int = signal.SIGINT) -> int:
    if up.process.poll() is None:
        up.process.send_signal(sig)
    return up.process.wait(timeout=15)


def children_of(pid: int) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces; the ppid is the 2nd field after ')'.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.add(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def post(url: str, body: bytes, headers: dict[str, str] | None = None
         ) -> tuple[int, dict[str, str], Any]:
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"content-type": "application/json",
                                              **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, dict(reply.headers), json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), json.loads(error.read())


def chat(up: Up, model: str, **headers: str) -> tuple[int, dict[str, str], Any]:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": 2}).encode()
    return post(f"{up.url}/v1/chat/completions", body, headers)


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    running = start_up(tmp_path, "--no-sim")
    try:
        yield running
    finally:
        stop_up(running)


async def test_cli_pools_route_by_model_with_contract_errors(up: Up, upstreams: Any) -> None:
    ports = {name: await upstreams.add(name) for name in ("one-a", "one-b", "one-c", "two-a")}
    # The upstreams answer on this event loop: the blocking client runs in a thread.
    await asyncio.to_thread(_cli_scenario, up, ports)


def _cli_scenario(up: Up, ports: dict[str, int]) -> None:
    # Envoy listens with an empty etcd: unknown models get 404.
    status, _, body = chat(up, "m-one")
    assert status == 404 and body["error"]["code"] == "model_not_found"

    for pool, model in (("one", "m-one"), ("two", "m-two")):
        result = up.cli("pool", "put", pool, "--model", model)
        assert result.returncode == 0, result.stderr
    for name, port in ports.items():
        pool, endpoint = name.split("-")
        result = up.cli("endpoint", "put", pool, endpoint, "--address", "127.0.0.1",
                        "--port", str(port))
        assert result.returncode == 0, result.stderr

    wait_for(lambda: chat(up, "m-two")[0] == 200, 30, "pool two to serve")
    wait_for(lambda: chat(up, "m-one")[0] == 200, 30, "pool one to serve")
    served = {chat(up, "m-one", **{"x-session-id": f"s{i}"})[2]["served_by"] for i in range(30)}
    assert served == {"one-a", "one-b", "one-c"}
    assert chat(up, "m-two")[2]["served_by"] == "two-a"

    status, _, body = chat(up, "m-three")
    assert status == 404 and "m-three" in body["error"]["message"]
    status, _, body = post(f"{up.url}/v1/chat/completions", b"{not json")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"

    assert up.cli("pool", "put", "empty", "--model", "m-empty").returncode == 0
    wait_for(lambda: chat(up, "m-empty")[0] == 503, 30, "the empty pool to answer 503")
    status, _, body = chat(up, "m-empty")
    assert body["error"]["code"] == "no_healthy_upstream"

    # A typo is refused by the CLI before it reaches etcd, naming the field.
    result = up.cli("pool", "put", "bad", "--model", "m-bad", "--hash-balance-factor", "50")
    assert result.returncode == 2
    assert "pools/bad: hash_balance_factor must be >= 100" in result.stderr

    status_out = up.cli("status", "--admin", f"http://127.0.0.1:{up.ports['admin']}", "--json")
    rows = json.loads(status_out.stdout)["endpoints"]
    assert {(r["pool"], r["endpoint"], r["envoy"]) for r in rows if r["pool"] == "one"} == {
        ("one", name, "healthy") for name in ("a", "b", "c")}


def test_up_with_empty_etcd_serves_the_simulated_pool(tmp_path: Path) -> None:
    running = start_up(tmp_path)
    try:
        assert "simulated GPUs" in running.output()
        wait_for(lambda: chat(running, "sim-model")[0] == 200, 60, "sim-model to serve")
        status, headers, body = chat(running, "sim-model", **{"x-session-id": "demo"})
        assert status == 200 and body["object"] == "chat.completion"
        assert headers["x-session-id"] == "demo"
        assert headers["x-sim-server"].startswith("sim-")
        with urllib.request.urlopen(f"{running.url}/v1/models", timeout=5) as reply:
            models = json.load(reply)
        assert [m["id"] for m in models["data"]] == ["sim-model"]
    finally:
        assert stop_up(running) == 0


def test_up_twice_with_sigint_leaves_no_process_and_no_port(tmp_path: Path) -> None:
    for run in range(2):
        running = start_up(tmp_path, "--no-sim")
        children = children_of(running.process.pid)
        assert len(children) >= 3, f"run {run}: expected etcd, control plane and envoy"
        assert stop_up(running) == 0
        assert "hotpath stopped." in running.output()
        for pid in children:
            assert not alive(pid), f"run {run}: child {pid} survived"
        for name, port in running.ports.items():
            if name not in ("sim", "prober"):
                wait_for(lambda port=port: not processes.port_open("127.0.0.1", port), 10,
                         f"port {name} to be released")


def test_up_killed_with_sigkill_leaves_no_orphan(tmp_path: Path) -> None:
    running = start_up(tmp_path, "--no-sim")
    children = children_of(running.process.pid)
    assert children
    running.process.kill()
    running.process.wait(10)
    try:
        wait_for(lambda: not any(alive(pid) for pid in children), 15,
                 "the children of a killed `up` to die")
    finally:
        for pid in children:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def up_state(data_dir: Path) -> dict[str, Any]:
    state = json.loads((data_dir / "up.json").read_text())
    assert isinstance(state, dict)
    return state


async def test_up_restarts_a_sigkilled_control_plane_and_loses_no_request(
        tmp_path: Path, upstreams: Any) -> None:
    data = tmp_path / "data"
    running = await asyncio.to_thread(start_up, tmp_path, "--no-sim", "--no-prober",
                                      "--data-dir", str(data))
    try:
        settings = EtcdSettings(urls=running.etcd, prefix="/hotpath/")
        async with etcd_client(settings) as client:
            await put_json(client, settings, "pools/sup", {"models": ["sup-model"]})
            for name in ("u0", "u1", "u2"):
                port = await upstreams.add(name)
                await put_json(client, settings, f"endpoints/sup/{name}",
                               {"address": "127.0.0.1", "port": port})
        await routable(running.url, "sup-model", 60)
        before = up_state(data)["children"]["control-plane"]
        assert before["running"] and before["restarts"] == 0, before

        load = Load(running.url, "sup-model", clients=4).begin()
        try:
            await load.progressed(20)
            os.kill(before["pid"], signal.SIGKILL)
            killed = time.monotonic()

            def restarted() -> dict[str, Any] | None:
                child = up_state(data)["children"]["control-plane"]
                return child if (child["restarts"] == 1 and child["running"]
                                 and child["pid"] != before["pid"]) else None

            after = await asyncio.to_thread(wait_for, restarted, 30,
                                            "up.json to show the restarted control plane")
            back = time.monotonic() - killed
            # The restarted control plane serves a change made after it came back.
            async with etcd_client(settings) as client:
                await put_json(client, settings, "pools/sup", {"models": ["sup-model",
                                                                          "sup-new"]})
            await routable(running.url, "sup-new", 30)
            await load.progressed(20)
        finally:
            await load.end()
        assert load.failed == 0, f"{load.failed}/{load.sent} failed: {load.errors}"
        assert alive(after["pid"]) and not alive(before["pid"])
        assert after["pid"] in children_of(running.process.pid)

        admin = f"http://127.0.0.1:{running.ports['admin']}"
        table = await asyncio.to_thread(running.cli, "status", "--data-dir", str(data),
                                        "--admin", admin)
        assert table.returncode == 0, table.stderr
        assert "control-plane running (1 restarts)" in table.stdout, table.stdout
        as_json = await asyncio.to_thread(running.cli, "status", "--data-dir", str(data),
                                          "--admin", admin, "--json")
        children = json.loads(as_json.stdout)["up"]["children"]
        assert children["control-plane"]["restarts"] == 1
        assert children["envoy"]["restarts"] == 0 and children["etcd"]["restarts"] == 0
        assert "control-plane exited with code" in running.output()
        print(f"\nhotpath up: control plane SIGKILLed under 4 clients, {load.failed}/"
              f"{load.sent} requests failed; up.json showed it restarted (pid "
              f"{before['pid']} -> {after['pid']}) {back:.2f} s after the kill")
    finally:
        assert await asyncio.to_thread(stop_up, running) == 0
