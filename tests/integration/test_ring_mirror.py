"""control_plane/affinity/ring.py against the real Envoy: for every session key, the host the
Python mirror of Envoy's ring-hash ring predicts is the host Envoy sends the request to.

The expected ring is built the way the control plane configures Envoy's: ``pool_routes``
gives each endpoint its EDS health, weight and ring points, ``minimum_ring_size`` the
cluster's minimum ring size, and the ring holds the HEALTHY hosts in endpoint-id order
(EDS order), keyed by endpoint id (the ``envoy.lb`` hash_key). The bounded-load factor is
off, so no request is deflected from its ring entry. Every case sends keys never sent before,
so no session is active (pinned to where it was served) across a ring change.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest

from control_plane.affinity.ring import Ring, RingHost, key_hash
from control_plane.config.model import Endpoint, parse_pool
from control_plane.contract import SESSION_ECHO_HEADER
from control_plane.runtime.envoy_admin import parse_clusters
from control_plane.sim.model import SimParams
from control_plane.sim.server import SERVER_HEADER, SimHandle, run_sims, stop_sims
from control_plane.translate.clusters import MAX_RING_SIZE, minimum_ring_size
from control_plane.translate.warmth import HEALTHY, pool_routes
from tests.harness import Stack, async_wait_for, wait_for
from tests.integration.test_ring_policy import ring_config

pytestmark = pytest.mark.integration

POOL = "ring"
MODEL = "ring-model"
POOL_VALUE = {"models": [MODEL], "hash_balance_factor": 0}
SESSIONS = 200
CONCURRENCY = 16


@dataclass(frozen=True)
class Expected:
    ring: Ring
    min_ring_size: int
    hosts: dict[str, tuple[str, int]]  # endpoint id -> (health, EDS weight) in Envoy's view


def expected(ports: dict[str, int], weights: dict[str, int]) -> Expected:
    """The ring the control plane makes Envoy build for these endpoints (no statuses: warm)."""
    pool = parse_pool(f"pools/{POOL}", POOL, json.dumps(POOL_VALUE))
    endpoints = {eid: Endpoint(POOL, eid, "127.0.0.1", port, weights[eid])
                 for eid, port in ports.items()}
    routes = pool_routes(pool, endpoints, {}, time.time())
    size = minimum_ring_size(pool, routes)
    hosts = [RingHost(key=eid, weight=routes[eid].weight) for eid in sorted(endpoints)
             if routes[eid].health == HEALTHY and routes[eid].ring_points > 0]
    assert len(hosts) == len(endpoints), routes
    return Expected(Ring(hosts, size, MAX_RING_SIZE), size,
                    {eid: ("healthy", route.weight) for eid, route in routes.items()})


async def apply(stack: Stack, ports: dict[str, int], weights: dict[str, int]) -> Expected:
    """Writes the endpoints and waits until Envoy shows the cluster's ring size and hosts."""
    want = expected(ports, weights)
    for eid, port in ports.items():
        await stack.put(f"endpoints/{POOL}/{eid}",
                        {"address": "127.0.0.1", "port": port, "weight": weights[eid]})

    def applied() -> bool:
        hosts = {h.hostname: (h.health, h.weight) for h in
                 parse_clusters(stack.envoy.get("/clusters?format=json")) if h.cluster == POOL}
        size = ring_config(stack.envoy, POOL).get("minimum_ring_size")
        return size == str(want.min_ring_size) and hosts == want.hosts

    await asyncio.to_thread(wait_for, applied, 20,
                            f"ring {want.min_ring_size} over {want.hosts} in Envoy")
    return want


async def served_by(session: aiohttp.ClientSession, stack: Stack, key: str) -> str:
    """The endpoint Envoy sent a request with session key ``key`` to."""
    body = {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
    async with session.post(f"{stack.url}/v1/chat/completions", json=body,
                            headers={"x-session-id": key}) as reply:
        text = await reply.text()
        assert reply.status == 200, text
        # The echo is the x-hotpath-session value Envoy hashed.
        assert reply.headers[SESSION_ECHO_HEADER] == key
        return reply.headers[SERVER_HEADER]


async def served(session: aiohttp.ClientSession, stack: Stack, keys: list[str]
                 ) -> dict[str, str]:
    limit = asyncio.Semaphore(CONCURRENCY)

    async def one(key: str) -> tuple[str, str]:
        async with limit:
            return key, await served_by(session, stack, key)

    return dict(await asyncio.gather(*(one(key) for key in keys)))


async def settle(session: aiohttp.ClientSession, stack: Stack, case: str, old: Ring,
                 new: Ring) -> None:
    """Envoy's workers take a new ring a moment after the admin shows it: wait until a
    fresh key that the change moves reaches its new host (each try a new key, so none is
    pinned to where the old ring sent it)."""
    moved = (k for k in (f"settle-{case}-{n}" for n in range(100_000))
             if old.owner(key_hash(k)) != new.owner(key_hash(k)))

    async def arrived() -> bool:
        key = next(moved)
        return await served_by(session, stack, key) == new.owner(key_hash(key))

    await async_wait_for(arrived, 20, f"the ring of case {case} in Envoy's workers")


def mismatches(ring: Ring, found: dict[str, str]) -> list[str]:
    return [f"{k} (hash {key_hash(k):#018x}): Envoy {host}, ring.py {ring.owner(key_hash(k))}"
            for k, host in found.items() if ring.owner(key_hash(k)) != host]


@pytest.fixture
async def sims() -> AsyncIterator[list[SimHandle]]:
    handles = await run_sims(SimParams(time_scale=0.001, seed=3), count=4, base_port=0,
                             name_prefix="rm", models=(MODEL,))
    try:
        yield handles
    finally:
        await stop_sims(handles)


async def test_ring_mirror_predicts_envoys_host_for_every_key(
        stack: Stack, sims: list[SimHandle]) -> None:
    ports = {h.name: h.port for h in sims}
    three = {eid: ports[eid] for eid in sorted(ports)[:3]}
    await stack.put(f"pools/{POOL}", POOL_VALUE)
    cases = [
        ("3 hosts of weight 1", three, dict.fromkeys(three, 1)),
        ("4 hosts of weight 1", ports, dict.fromkeys(ports, 1)),
        ("4 hosts, rm-1 of weight 2", ports, {**dict.fromkeys(ports, 1), "rm-1": 2}),
    ]
    previous: Ring | None = None
    async with aiohttp.ClientSession() as session:
        for case, (name, case_ports, weights) in enumerate(cases):
            want = await apply(stack, case_ports, weights)
            if previous is None:
                await stack.wait_listener()
                await async_wait_for(lambda: served_by(session, stack, "warm-up"), 20,
                                     f"{MODEL} to route")
            else:
                await settle(session, stack, str(case), previous, want.ring)
            found = await served(session, stack,
                                 [f"mirror-{case}-{n}" for n in range(SESSIONS)])
            assert set(found.values()) == set(case_ports), (name, found)
            wrong = mismatches(want.ring, found)
            assert not wrong, f"{name}: {len(wrong)} of {SESSIONS} keys differ:\n" + \
                "\n".join(wrong[:20])
            previous = want.ring
