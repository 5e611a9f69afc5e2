"""ring_points_per_weight through the real Envoy: the ring it sizes, the sessions it keeps in
place, the values it refuses; and the bootstrap's delta switch."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from control_plane.runtime import processes
from control_plane.runtime.bootstrap import BootstrapSettings, render_bootstrap
from tests.harness import EnvoyProcess, Etcd, Stack, Upstreams, make_stack, wait_for

pytestmark = pytest.mark.integration

KEYS = [f"session-{n}" for n in range(400)]


def ring_config(envoy: EnvoyProcess, cluster: str) -> dict[str, Any]:
    return envoy.ring_config(cluster)


async def picks(url: str, model: str) -> dict[str, str]:
    found: dict[str, str] = {}
    async with aiohttp.ClientSession() as session:
        for key in KEYS:
            payload = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
            async with session.post(f"{url}/v1/chat/completions", json=payload,
                                    headers={"x-session-id": key}) as reply:
                assert reply.status == 200, await reply.text()
                found[key] = reply.headers["x-served-by"]
    return found


async def wait_ring(stack: Stack, cluster: str, size: int, hosts: int) -> None:
    def check() -> bool:
        return (ring_config(stack.envoy, cluster).get("minimum_ring_size") == str(size)
                and len(stack.envoy.hosts(cluster)) == hosts)

    await asyncio.to_thread(wait_for, check, 20, f"{cluster} ring {size} on {hosts} hosts")


async def test_ring_size_is_points_times_weight_and_only_the_removed_hosts_sessions_move(
        stack: Stack, upstreams: Upstreams) -> None:
    await stack.put("pools/small", {"models": ["m"], "hash_balance_factor": 0,
                                    "ring_points_per_weight": 64})
    ports = {f"h{i}": await upstreams.add(f"h{i}") for i in range(4)}
    for name, port in ports.items():
        await stack.put(f"endpoints/small/{name}", {"address": "127.0.0.1", "port": port,
                                                    "weight": 2 if name == "h0" else 1})
    await wait_ring(stack, "small", 64 * 5, 4)
    assert ring_config(stack.envoy, "small")["maximum_ring_size"] == "8388608"
    await stack.wait_listener()
    before = await picks(stack.url, "m")
    assert set(before.values()) == set(ports)

    await stack.delete("endpoints/small/h3")
    await wait_ring(stack, "small", 64 * 4, 3)
    after = await picks(stack.url, "m")
    moved = [k for k in KEYS if before[k] != "h3" and after[k] != before[k]]
    assert moved == [], f"{len(moved)} sessions of hosts that stayed moved"
    assert {after[k] for k in KEYS if before[k] == "h3"} <= {"h0", "h1", "h2"}


async def test_default_points_and_a_bad_value_keeps_the_last_good_ring(
        stack: Stack, upstreams: Upstreams) -> None:
    await stack.put("pools/chat", {"models": ["m"]})
    port = await upstreams.add("a")
    await stack.put("endpoints/chat/a", {"address": "127.0.0.1", "port": port, "weight": 3})
    await wait_ring(stack, "chat", 128 * 3, 1)  # the documented default: 128 per weight
    await stack.put("pools/chat", {"models": ["m"], "ring_points_per_weight": 0})
    await asyncio.to_thread(
        wait_for, lambda: "pools/chat: ring_points_per_weight must be >= 1, got 0"
        in stack.control_plane.log_text(), 20, "the rejection logged with key and field")
    assert ring_config(stack.envoy, "chat")["minimum_ring_size"] == str(128 * 3)
    await stack.put("pools/chat", {"models": ["m"], "ring_points_per_weight": 4096})
    await wait_ring(stack, "chat", 4096 * 3, 1)


class BootstrapEnvoy(EnvoyProcess):
    delta = True

    def start(self) -> None:
        bootstrap = self.tmp / f"{self.name}-bootstrap.yaml"
        bootstrap.write_text(render_bootstrap(BootstrapSettings(
            node_id=self.name, xds_port=self.xds_port, admin_port=0, delta=self.delta)))
        address_path = self.tmp / f"{self.name}-admin.txt"
        self.process = processes.spawn(processes.envoy_command(bootstrap, address_path, "info"),
                                       self.tmp / f"{self.name}.log")
        address = wait_for(lambda: address_path.exists() and address_path.read_text().strip(),
                           30, "envoy admin address")
        self.admin_url = f"http://{address}"


@pytest.fixture
def delta_stack(tmp_path: Path, etcd_server: Etcd, prefix: str) -> Iterator[Stack]:
    stack = make_stack(tmp_path, etcd_server.url, prefix, envoys=0)
    try:
        envoy = BootstrapEnvoy(tmp_path, "envoy-delta", stack.control_plane.xds_port)
        stack.envoys.append(envoy)
        envoy.start()
        yield stack
    finally:
        stack.close()


async def test_delta_bootstrap_envoy_gets_the_ring_and_serves(
        delta_stack: Stack, upstreams: Upstreams) -> None:
    stack = delta_stack
    bootstrap = (stack.tmp / "envoy-delta-bootstrap.yaml").read_text()
    assert "api_type: DELTA_GRPC" in bootstrap
    await stack.put("pools/small", {"models": ["m"], "ring_points_per_weight": 16})
    for name in ("a", "b"):
        await stack.put(f"endpoints/small/{name}",
                        {"address": "127.0.0.1", "port": await upstreams.add(name)})
    await wait_ring(stack, "small", 32, 2)
    await stack.wait_listener()
    assert set((await picks(stack.url, "m")).values()) <= {"a", "b"}
    await stack.delete("endpoints/small/b")
    await wait_ring(stack, "small", 16, 1)
