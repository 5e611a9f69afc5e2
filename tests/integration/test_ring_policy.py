"""ring_points_per_weight through the real Envoy: the ring it sizes, the sessions it keeps in
place, the values it refuses, the minimum ring size kept across weight changes (EDS only);
and the bootstrap's delta switch."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from control_plane.affinity.plan import pool_ring
from control_plane.affinity.ring import Ring, key_hash
from control_plane.config.model import Endpoint, parse_pool
from control_plane.runtime import processes
from control_plane.runtime.bootstrap import BootstrapSettings, render_bootstrap
from control_plane.runtime.envoy_admin import parse_clusters
from control_plane.translate.clusters import minimum_ring_size
from control_plane.translate.warmth import Route, pool_routes
from tests.harness import EnvoyProcess, Etcd, Stack, Upstreams, make_stack, wait_for

pytestmark = pytest.mark.integration

KEYS = [f"session-{n}" for n in range(400)]


def ring_config(envoy: EnvoyProcess, cluster: str) -> dict[str, Any]:
    return envoy.ring_config(cluster)


async def picks(url: str, model: str, keys: list[str] = KEYS) -> dict[str, str]:
    found: dict[str, str] = {}
    async with aiohttp.ClientSession() as session:
        for key in keys:
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


def cluster_modified(envoy: EnvoyProcess) -> int:
    """Clusters Envoy replaced through CDS so far (each is warmed again)."""
    text = envoy.get("/stats?filter=^cluster_manager.cluster_modified$").decode()
    return int(text.partition(": ")[2] or 0)


async def until_mirrored(stack: Stack, model: str, ring: Ring, case: str) -> None:
    """Every one of 400 keys never sent before (none is active, so none is pinned where
    it was served) reaches the host ring.py predicts, once Envoy's workers have the ring
    (they take it a moment after the admin shows it)."""
    deadline = asyncio.get_running_loop().time() + 20
    for attempt in range(1000):
        keys = [f"{case}-{attempt}-{n}" for n in range(len(KEYS))]
        found = await picks(stack.url, model, keys)
        wrong = [k for k, host in found.items() if ring.owner(key_hash(k)) != host]
        if not wrong or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.5)
    assert not wrong, f"{case}: {len(wrong)} of {len(KEYS)} keys not where ring.py puts them"


async def test_weight_changes_keep_the_cluster_while_the_ring_size_still_fits(
        stack: Stack, upstreams: Upstreams) -> None:
    """40 hosts at 16 points per weight: the minimum ring size has room for one weight unit
    either way, so a weight change or a host leaving is EDS alone (Envoy replaces no
    cluster), and Envoy's ring, built with the size kept, is the ring ring.py builds with
    the size a fresh control plane would choose."""
    value = {"models": ["wm"], "hash_balance_factor": 0, "ring_points_per_weight": 16}
    pool = parse_pool("pools/wide", "wide", json.dumps(value))
    weights = {f"w{i:02}": 1 for i in range(40)}
    ports = {eid: await upstreams.add(eid) for eid in weights}

    def routes() -> dict[str, Route]:
        eps = {eid: Endpoint("wide", eid, "127.0.0.1", ports[eid], w)
               for eid, w in weights.items()}
        return pool_routes(pool, eps, {}, time.time())

    async def put(eid: str) -> None:
        await stack.put(f"endpoints/wide/{eid}", {"address": "127.0.0.1", "port": ports[eid],
                                                  "weight": weights[eid]})

    async def applied(size: int) -> None:
        def check() -> bool:
            hosts = {h.hostname: h.weight for h in
                     parse_clusters(stack.envoy.get("/clusters?format=json"))
                     if h.cluster == "wide"}
            return (hosts == weights
                    and ring_config(stack.envoy, "wide").get("minimum_ring_size") == str(size))

        await asyncio.to_thread(wait_for, check, 20, f"ring {size} over {weights} in Envoy")

    for eid in weights:
        await put(eid)
    await stack.put("pools/wide", value)  # after the endpoints: one first translation
    first = minimum_ring_size(pool, routes())
    assert first == 640 - 16  # 640 points; room for one weight unit either way
    await applied(first)
    await stack.wait_listener()
    modified = cluster_modified(stack.envoy)

    weights["w00"] = 2  # 656 points: the size still fits (a fresh choice would be 640)
    await put("w00")
    assert minimum_ring_size(pool, routes()) == 640
    assert minimum_ring_size(pool, routes(), first) == first
    await applied(first)
    assert cluster_modified(stack.envoy) == modified
    await until_mirrored(stack, "wm", pool_ring(pool, routes())[0], "kept")

    weights["w00"] = 1  # 640 points
    await put("w00")
    await applied(first)
    del weights["w39"]  # 624 points: still fits
    await stack.delete("endpoints/wide/w39")
    await applied(first)
    assert cluster_modified(stack.envoy) == modified
    del weights["w38"]  # 608 points: below the size, so a new one, in the middle again
    await stack.delete("endpoints/wide/w38")
    second = minimum_ring_size(pool, routes(), first)
    assert second == minimum_ring_size(pool, routes()) == 608 - 16
    await applied(second)
    assert cluster_modified(stack.envoy) == modified + 1
    await until_mirrored(stack, "wm", pool_ring(pool, routes())[0], "moved")


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
