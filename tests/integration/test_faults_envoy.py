"""Faults against the real Envoy 1.40: many models, a control-plane restart, a dead host.

Each test prints what it measured (run with -s to see it).
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from typing import Any

import aiohttp
import pytest

from control_plane.config import limits
from tests.harness import Stack, Upstreams, async_wait_for, chat, ring_hash_settings, wait_for

pytestmark = pytest.mark.integration


def rejected_updates(stack: Stack) -> dict[str, int]:
    """Envoy's xDS update_rejected counters (CDS, LDS, RDS, EDS): NACKs it sent."""
    stats = stack.envoy.get("/stats?format=json&filter=update_rejected")["stats"]
    return {s["name"]: int(s["value"]) for s in stats if "value" in s}


async def register_pool(stack: Stack, upstreams: Upstreams, pool: str, hosts: list[str],
                        **fields: Any) -> None:
    await stack.put(f"pools/{pool}", fields)
    for name in hosts:
        port = await upstreams.add(name)
        await stack.put(f"endpoints/{pool}/{name}", {"address": "127.0.0.1", "port": port})
    await stack.wait_listener()
    await asyncio.to_thread(wait_for, lambda: set(stack.envoy.hosts(pool)) == set(hosts), 30,
                            f"pool {pool} in Envoy")


async def test_5000_models_route_through_the_matcher_and_nothing_is_nacked(
        stack: Stack, upstreams: Upstreams) -> None:
    models = [f"acme-research/llama-3.1-70b-instruct-{i:05d}" for i in range(5000)]
    await register_pool(stack, upstreams, "first", ["f0"], models=models[:2500])
    await register_pool(stack, upstreams, "second", ["s0"], models=models[2500:])
    async with aiohttp.ClientSession() as session:
        async def last_routes() -> bool:
            return (await chat(session, stack.url, models[-1]))[0] == 200
        start = time.monotonic()
        await async_wait_for(last_routes, 60, "the last of 5,000 models to route")
        print(f"\n5,000 models: last model routable {time.monotonic() - start:.2f} s after "
              "its pool reached Envoy")
        for model, pool_host in ((models[0], "f0"), (models[2499], "f0"),
                                 (models[2500], "s0"), (models[-1], "s0")):
            status, _, body = await chat(session, stack.url, model)
            assert status == 200 and body["served_by"] == pool_host, (model, body)
            assert body["model"] == model
        status, _, body = await chat(session, stack.url, "not-a-model")
        assert status == 404 and body["error"]["code"] == "model_not_found"
        async with session.get(f"{stack.url}/v1/models") as reply:
            assert reply.status == 200
            listed = await reply.json()
            size = int(reply.headers["content-length"])
        assert [m["id"] for m in listed["data"]] == models
        print(f"/v1/models: {len(listed['data'])} models, {size} bytes")
        async with session.get(f"{stack.url}/nowhere") as reply:
            assert reply.status == 404
    rejected = rejected_updates(stack)
    assert rejected and not any(rejected.values()), rejected
    assert "NACK" not in stack.control_plane.log_text()


async def test_envoy_reconnects_to_a_restarted_control_plane_within_seconds(
        stack: Stack, upstreams: Upstreams) -> None:
    await register_pool(stack, upstreams, "before", ["b0"], models=["m-before"])
    stack.control_plane.stop(signal.SIGKILL)
    # Written while the control plane is away: Envoy gets it only over a new ADS stream.
    port = await upstreams.add("a0")
    await stack.put("pools/after", {"models": ["m-after"]})
    await stack.put("endpoints/after/a0", {"address": "127.0.0.1", "port": port})
    # Let Envoy's backoff grow while nothing answers: after 10 s, Envoy's default (500 ms
    # doubling to 30 s, jittered) may wait another 8 s or more; hotpath's caps it at 1 s.
    outage = 10
    await asyncio.sleep(outage)
    await asyncio.to_thread(stack.control_plane.start)  # same xDS port; returns once it listens
    listening = time.monotonic()
    await asyncio.to_thread(wait_for, lambda: "a0" in stack.envoy.hosts("after"), 10,
                            "the new pool to reach Envoy after the restart", 0.01)
    reconnect = time.monotonic() - listening
    print(f"\nafter a {outage:.0f} s outage, Envoy had the pool written during it "
          f"{reconnect:.2f} s after the restarted control plane listened")
    assert reconnect < 3, reconnect
    async with aiohttp.ClientSession() as session:
        async def routes() -> bool:
            return (await chat(session, stack.url, "m-after"))[0] == 200
        await async_wait_for(routes, 10, "m-after to route")
        assert (await chat(session, stack.url, "m-before"))[0] == 200


SESSIONS = 300
CONCURRENCY = 30


async def placement(session: aiohttp.ClientSession, stack: Stack, model: str,
                    keys: list[str]) -> dict[str, str]:
    """session key -> host that served it; every request must succeed."""
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(key: str) -> tuple[str, str]:
        async with gate:
            status, _, body = await chat(session, stack.url, model, {"x-session-id": key})
        assert status == 200, (key, status, body)
        return key, str(body["served_by"])

    return dict(await asyncio.gather(*(one(key) for key in keys)))


async def test_a_dead_host_moves_no_survivor_sessions(stack: Stack,
                                                      upstreams: Upstreams) -> None:
    hosts = ["g0", "g1", "g2"]
    await register_pool(stack, upstreams, "gpu", hosts, models=["gpu-model"],
                        hash_balance_factor=0)
    keys = [f"conversation-{i}" for i in range(SESSIONS)]
    async with aiohttp.ClientSession() as session:
        async def ready() -> bool:
            return (await chat(session, stack.url, "gpu-model"))[0] == 200
        await async_wait_for(ready, 30, "gpu-model to route")
        before = await placement(session, stack, "gpu-model", keys)
        assert before == await placement(session, stack, "gpu-model", keys)  # deterministic
        counts = Counter(before.values())
        assert set(counts) == set(hosts), counts
        dead = "g1"
        orphans = [key for key, host in before.items() if host == dead]
        survivors = [key for key, host in before.items() if host != dead]

        await upstreams.remove(dead)  # the GPU server is gone; Envoy still has it healthy
        start = time.monotonic()
        retried = await placement(session, stack, "gpu-model", keys)
        retried_s = time.monotonic() - start
        moved = [key for key in survivors if retried[key] != before[key]]
        assert all(retried[key] != dead for key in keys)
        assert moved == [], f"{len(moved)} survivor sessions moved"
        # The dead host's sessions go, deterministically, to the next host on the ring.
        assert retried == await placement(session, stack, "gpu-model", keys)

        # The prober's verdict: down, fresh. The control plane takes the host out of the
        # ring and shrinks the minimum ring size in the same push.
        await stack.put(f"status/gpu/{dead}", {"state": "down", "ttft_ms": None,
                                               "checked_at": time.time()})
        await asyncio.to_thread(wait_for, lambda: stack.envoy.hosts("gpu").get(dead)
                                == "unhealthy", 30, "the dead host to be unhealthy in Envoy")
        ring = stack.envoy.config_dump()
        down = await placement(session, stack, "gpu-model", keys)
        moved_after = [key for key in survivors if down[key] != before[key]]
        orphans_moved = [key for key in orphans if down[key] != retried[key]]
        assert moved_after == [], f"{len(moved_after)} survivor sessions moved when marked down"
        assert orphans_moved == [], f"{len(orphans_moved)} of the dead host's sessions moved again"
    rings = [ring_hash_settings(c["cluster"])["minimum_ring_size"]
             for section in ring["configs"] if section["@type"].endswith("ClustersConfigDump")
             for c in section.get("dynamic_active_clusters", [])
             if c["cluster"]["name"] == "gpu"]
    points = limits.RING_POINTS_PER_WEIGHT_DEFAULT
    assert rings == [str(2 * points)], rings  # the ring shrank by the dead host's points
    assert not any(rejected_updates(stack).values())
    print(f"\ndead host: {SESSIONS} sessions ({dict(sorted(counts.items()))}); host {dead} "
          f"killed: {len(orphans)} of its sessions retried to "
          f"{dict(Counter(retried[k] for k in orphans))}, 0/{len(survivors)} survivors moved, "
          f"0 failures ({SESSIONS} requests in {retried_s:.2f} s at concurrency "
          f"{CONCURRENCY}); marked down: 0 survivors moved, 0 of its sessions moved again "
          f"(minimum ring {3 * points} -> {2 * points})")

