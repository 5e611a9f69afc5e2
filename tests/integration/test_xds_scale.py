"""SotW and delta ADS against the real Envoy: both converge, and only what changed is sent."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from control_plane.runtime import processes
from control_plane.runtime.bootstrap import BootstrapSettings, render_bootstrap
from control_plane.runtime.envoy_admin import parse_clusters
from tests.harness import EnvoyProcess, Etcd, Stack, Upstreams, make_stack, wait_for

pytestmark = pytest.mark.integration


def delta_bootstrap(name: str, xds_port: int) -> str:
    """The bootstrap template has no delta switch yet: the SotW one with DELTA_GRPC."""
    text = render_bootstrap(BootstrapSettings(node_id=name, xds_port=xds_port, admin_port=0))
    assert "api_type: GRPC" in text
    return text.replace("api_type: GRPC", "api_type: DELTA_GRPC")


class DeltaEnvoy(EnvoyProcess):
    def start(self) -> None:
        bootstrap = self.tmp / f"{self.name}-bootstrap.yaml"
        bootstrap.write_text(delta_bootstrap(self.name, self.xds_port))
        address_path = self.tmp / f"{self.name}-admin.txt"
        address_path.unlink(missing_ok=True)
        self.process = processes.spawn(processes.envoy_command(bootstrap, address_path, "info"),
                                       self.tmp / f"{self.name}.log")
        address = wait_for(lambda: address_path.exists() and address_path.read_text().strip(),
                           30, "envoy admin address")
        self.admin_url = f"http://{address}"


def view(envoy: EnvoyProcess, pools: tuple[str, ...]) -> dict[str, dict[str, tuple[str, int]]]:
    """pool -> hostname -> (health, weight), as this Envoy has it."""
    found: dict[str, dict[str, tuple[str, int]]] = {p: {} for p in pools}
    for host in parse_clusters(envoy.get("/clusters?format=json")):
        if host.cluster in found:
            found[host.cluster][host.hostname] = (host.health, host.weight)
    return found


def stat(envoy: EnvoyProcess, name: str) -> int:
    text = envoy.get(f"/stats?filter=^{name}$").decode()
    for line in text.splitlines():
        key, _, value = line.partition(": ")
        if key == name:
            return int(value)
    return 0


@pytest.fixture
def two_envoys(tmp_path: Path, etcd_server: Etcd, prefix: str) -> Iterator[Stack]:
    """A control plane with one SotW Envoy and one delta Envoy."""
    stack = make_stack(tmp_path, etcd_server.url, prefix, envoys=1)
    try:
        delta = DeltaEnvoy(tmp_path, "envoy-delta", stack.control_plane.xds_port)
        stack.envoys.append(delta)
        delta.start()
        yield stack
    finally:
        stack.close()


async def converged(stack: Stack, expected: dict[str, dict[str, int]], what: str) -> None:
    pools = tuple(expected)

    def check() -> bool:
        return all({p: {h: w for h, (_, w) in hosts.items()} for p, hosts in
                    view(envoy, pools).items()} == expected for envoy in stack.envoys)

    await asyncio.to_thread(wait_for, check, 20, what)


async def test_sotw_and_delta_envoys_converge_through_adds_removes_and_weights(
        two_envoys: Stack, upstreams: Upstreams) -> None:
    stack = two_envoys
    sotw, delta = stack.envoys
    await stack.put("pools/p1", {"models": ["m1"]})
    await stack.put("pools/p2", {"models": ["m2"]})
    ports = {name: await upstreams.add(name) for name in ("a", "b", "c", "d")}
    for name, pool in (("a", "p1"), ("b", "p1"), ("c", "p2")):
        await stack.put(f"endpoints/{pool}/{name}", {"address": "127.0.0.1", "port": ports[name]})
    await converged(stack, {"p1": {"a": 1, "b": 1}, "p2": {"c": 1}}, "first config")
    await stack.wait_listener()

    # Per-resource versions: changes in p1 send no EDS for p2 to either Envoy.
    p2_before = [stat(e, "cluster.p2.update_attempt") for e in stack.envoys]
    await stack.put("endpoints/p1/d", {"address": "127.0.0.1", "port": ports["d"]})
    await converged(stack, {"p1": {"a": 1, "b": 1, "d": 1}, "p2": {"c": 1}}, "an add")
    await stack.delete("endpoints/p1/a")
    await converged(stack, {"p1": {"b": 1, "d": 1}, "p2": {"c": 1}}, "a remove")
    await stack.put("endpoints/p1/b", {"address": "127.0.0.1", "port": ports["b"], "weight": 3})
    await converged(stack, {"p1": {"b": 3, "d": 1}, "p2": {"c": 1}}, "a weight change")
    assert [stat(e, "cluster.p2.update_attempt") for e in stack.envoys] == p2_before

    # Both on the same config, nothing warming, nothing rejected.
    for envoy in (sotw, delta):
        assert stat(envoy, "cluster_manager.warming_clusters") == 0
        assert stat(envoy, "cluster_manager.cds.update_rejected") == 0
    log = stack.control_plane.log_text()
    assert "rejected" not in log, log[-2000:]

    # A new pool and its removal reach both.
    await stack.put("endpoints/p2/a", {"address": "127.0.0.1", "port": ports["a"]})
    await stack.delete("pools/p1")
    # Two writes, possibly two pushes: wait for both (p1 without a host in either Envoy).
    await converged(stack, {"p1": {}, "p2": {"a": 1, "c": 1}}, "a pool removed")


async def test_delta_envoy_reconnects_to_a_restarted_control_plane(
        two_envoys: Stack, upstreams: Upstreams) -> None:
    stack = two_envoys
    port = await upstreams.add("a")
    await stack.put("pools/p1", {"models": ["m1"]})
    await stack.put("endpoints/p1/a", {"address": "127.0.0.1", "port": port})
    await converged(stack, {"p1": {"a": 1}}, "first config")
    stack.control_plane.stop()
    stack.control_plane.start()
    port_b = await upstreams.add("b")
    await stack.put("endpoints/p1/b", {"address": "127.0.0.1", "port": port_b})
    await converged(stack, {"p1": {"a": 1, "b": 1}}, "the change after restart")
    assert stat(stack.envoys[1], "cluster_manager.warming_clusters") == 0
