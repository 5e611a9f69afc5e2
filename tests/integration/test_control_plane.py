"""The control-plane core against the real Envoy binary and a real etcd (issue: core)."""

from __future__ import annotations

import asyncio
import re
import signal
from collections import Counter
from collections.abc import Awaitable
from typing import Any

import aiohttp
import pytest

from control_plane.runtime.envoy_admin import fetch_json
from tests.harness import Stack, Upstreams, async_wait_for, chat, wait_for

pytestmark = pytest.mark.integration

MODEL = "m1"


async def setup_pool(stack: Stack, upstreams: Upstreams, names: list[str],
                     pool: str = "p1", model: str = MODEL, **pool_fields: object) -> None:
    await stack.put(f"pools/{pool}", {"models": [model], **pool_fields})
    for name in names:
        port = await upstreams.add(name)
        await stack.put(f"endpoints/{pool}/{name}", {"address": "127.0.0.1", "port": port})
    await stack.wait_listener()
    await asyncio.to_thread(wait_for, lambda: set(stack.envoy.hosts(pool)) == set(names),
                            30, f"Envoy to have hosts {names}")


async def served_by(session: aiohttp.ClientSession, stack: Stack, key: str,
                    model: str = MODEL) -> str:
    status, headers, body = await chat(session, stack.url, model, {"x-session-id": key})
    assert status == 200, body
    assert headers["x-session-id"] == key
    return str(body["served_by"])


async def mapping(session: aiohttp.ClientSession, stack: Stack, keys: list[str]
                  ) -> dict[str, str]:
    return {key: await served_by(session, stack, key) for key in keys}


def sessions_known(stack: Stack, pool: str, placed: dict[str, str]) -> bool:
    """The control plane's /sessions has as many sessions on each host as ``placed``."""
    view = fetch_json(f"http://127.0.0.1:{stack.control_plane.metrics_port}/sessions")
    if not isinstance(view, dict):
        return False
    known = Counter(entry[1] for entry in (view.get(pool) or {}).values())
    return known == Counter(placed.values())


async def test_each_session_key_sticks_to_one_upstream_and_all_get_keys(
        stack: Stack, upstreams: Upstreams) -> None:
    await setup_pool(stack, upstreams, ["a", "b", "c"])
    keys = [f"session-{i}" for i in range(20)]
    seen: dict[str, set[str]] = {key: set() for key in keys}
    async with aiohttp.ClientSession() as session:
        for i in range(200):
            key = keys[i % len(keys)]
            seen[key].add(await served_by(session, stack, key))
    assert all(len(hosts) == 1 for hosts in seen.values()), seen
    assert {host for hosts in seen.values() for host in hosts} == {"a", "b", "c"}


async def test_removing_or_adding_an_endpoint_moves_only_that_hosts_keys(
        stack: Stack, upstreams: Upstreams) -> None:
    await setup_pool(stack, upstreams, ["a", "b", "c"])
    keys = [f"k{i}" for i in range(90)]
    async with aiohttp.ClientSession() as session:
        before = await mapping(session, stack, keys)
        assert set(before.values()) == {"a", "b", "c"}

        await stack.delete("endpoints/p1/b")
        await asyncio.to_thread(wait_for, lambda: set(stack.envoy.hosts("p1")) == {"a", "c"},
                                30, "b to leave Envoy")
        after_remove = await mapping(session, stack, keys)
        for key in keys:
            if before[key] != "b":
                assert after_remove[key] == before[key], f"{key} moved off a surviving host"
        assert set(after_remove.values()) == {"a", "c"}
        # Pins keep the sessions the control plane knows (docs/affinity.md: one that served
        # a turn within the last flush, ~1 s, is not known yet): wait until it knows them.
        await asyncio.to_thread(wait_for, lambda: sessions_known(stack, "p1", after_remove),
                                30, "the control plane to know every session's host")

        port = await upstreams.add("d")
        await stack.put("endpoints/p1/d", {"address": "127.0.0.1", "port": port})
        await asyncio.to_thread(wait_for,
                                lambda: set(stack.envoy.hosts("p1")) == {"a", "c", "d"},
                                30, "d to join Envoy")
        # The keys are active sessions: the new ring would move some of them to d, but
        # they are pinned where they are (docs/affinity.md); new sessions reach d.
        after_add = await mapping(session, stack, keys)
        assert after_add == after_remove, "an active session moved when d joined"
        fresh = await mapping(session, stack, [f"fresh-{i}" for i in range(90)])
        assert "d" in fresh.values(), "the new host got no new session"


async def test_bad_values_are_rejected_logged_and_the_last_good_value_stays(
        stack: Stack, upstreams: Upstreams) -> None:
    await setup_pool(stack, upstreams, ["a"])
    versions = await asyncio.to_thread(stack.envoy.versions)

    await stack.put("pools/p1", b'{"models": ["m1"], "hash_balance_factor": 50}')
    await stack.put("endpoints/p1/a", b'{"address": "127.0.0.1", "port": "eighty"}')
    await stack.put("pools/p2", b"{not json")
    log = stack.control_plane.log_text
    await asyncio.to_thread(wait_for, lambda: "pools/p2: value is not valid JSON" in log(), 30,
                            "the JSON error to be logged")
    assert "pools/p1: hash_balance_factor must be >= 100 (or 0 for off), got 50" in log()
    assert "endpoints/p1/a: port must be an integer" in log()
    assert await asyncio.to_thread(stack.envoy.versions) == versions
    async with aiohttp.ClientSession() as session:
        assert await served_by(session, stack, "s") == "a"

        # A later valid value applies; the old rejection no longer holds anything back.
        port = await upstreams.add("b")
        await stack.put("endpoints/p1/a", {"address": "127.0.0.1", "port": port})
        await asyncio.to_thread(wait_for, lambda: "b" == _served_sync(stack), 30,
                                "the corrected endpoint to serve")
    assert log().count("pools/p1: hash_balance_factor must be >= 100") == 1


def _served_sync(stack: Stack) -> str:
    import json
    import urllib.request

    request = urllib.request.Request(
        f"{stack.url}/v1/chat/completions", method="POST",
        data=json.dumps({"model": MODEL, "messages": []}).encode(),
        headers={"content-type": "application/json", "x-session-id": "s"})
    with urllib.request.urlopen(request, timeout=5) as reply:
        return str(json.load(reply)["served_by"])


async def test_control_plane_restart_keeps_routing_and_versions_move_forward(
        stack: Stack, upstreams: Upstreams) -> None:
    await setup_pool(stack, upstreams, ["a", "b"])
    before = await asyncio.to_thread(stack.envoy.versions)
    stack.control_plane.stop(signal.SIGKILL)
    async with aiohttp.ClientSession() as session:
        hosts = {await served_by(session, stack, f"k{i}") for i in range(20)}
        assert hosts == {"a", "b"}, "Envoy stopped routing without its control plane"

        await stack.put("pools/p2", {"models": ["m2"]})  # written while the CP is down
        stack.control_plane.start()
        port = await upstreams.add("c")
        await stack.put("endpoints/p2/c", {"address": "127.0.0.1", "port": port})
        await asyncio.to_thread(wait_for, lambda: set(stack.envoy.hosts("p2")) == {"c"}, 30,
                                "the change after restart to apply")
        status, _, body = await async_wait_for(
            lambda: _ok(chat(session, stack.url, "m2")), 30, "model m2 to route")
        assert body["served_by"] == "c"
    after = await asyncio.to_thread(stack.envoy.versions)
    for kind in ("cds", "lds", "rds"):
        assert _revision(after[kind]) >= _revision(before[kind]), (kind, before, after)


async def _ok(reply: Awaitable[tuple[int, dict[str, str], Any]]
              ) -> tuple[int, dict[str, str], Any] | None:
    result = await reply
    return result if result[0] == 200 else None


def _revision(version: str) -> int:
    match = re.match(r"(\d+)-", version)
    assert match, version
    return int(match.group(1))


async def test_two_envoys_on_one_control_plane_converge(stack: Stack,
                                                         upstreams: Upstreams) -> None:
    second = stack.add_envoy("envoy-second")
    await setup_pool(stack, upstreams, ["a", "b"])
    await asyncio.to_thread(wait_for, lambda: set(second.hosts("p1")) == {"a", "b"}, 30,
                            "the second Envoy to converge")
    await asyncio.to_thread(wait_for,
                            lambda: second.versions() == stack.envoy.versions(), 30,
                            "both Envoys on the same versions")
    metrics = await asyncio.to_thread(
        _get, f"http://127.0.0.1:{stack.control_plane.metrics_port}/metrics")
    assert "hotpath_xds_connected_envoys 2" in metrics
    assert re.search(r'hotpath_xds_responses_total\{type="CDS"\} [1-9]', metrics)
    assert "hotpath_etcd_connected 1" in metrics
    health = await asyncio.to_thread(
        _get, f"http://127.0.0.1:{stack.control_plane.metrics_port}/healthz")
    assert health.strip() == "ok"


def _get(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as reply:
        return str(reply.read().decode())


async def test_envoy_nack_is_logged_once_and_not_resent(tmp_path, etcd_server, prefix,
                                                        upstreams: Upstreams) -> None:
    from tests.harness import make_stack

    # 192.0.2.1 (TEST-NET-1) is no local address: Envoy cannot bind it and rejects the LDS.
    stack = make_stack(tmp_path, etcd_server.url, prefix, extra=["--listen", "192.0.2.1:10000"])
    try:
        await stack.put("pools/p1", {"models": [MODEL]})
        log = stack.control_plane.log_text
        await asyncio.to_thread(wait_for, lambda: "rejected LDS" in log(), 30, "the NACK log")
        # A later change still flows (CDS/EDS), and the rejected LDS is not sent again.
        port = await upstreams.add("a")
        await stack.put("endpoints/p1/a", {"address": "127.0.0.1", "port": port})
        await asyncio.to_thread(wait_for, lambda: set(stack.envoy.hosts("p1")) == {"a"}, 30,
                                "EDS to apply after the NACK")
        # Every LDS version is rejected, logged once, and never pushed a second time.
        await asyncio.to_thread(
            wait_for,
            lambda: log().count("rejected LDS") == len(set(re.findall(r"push LDS (\S+)", log()))),
            30, "one NACK log line per rejected version")
        lds_versions = re.findall(r"push LDS (\S+)", log())
        assert len(lds_versions) == len(set(lds_versions)), lds_versions
    finally:
        stack.close()


async def test_unknown_model_gets_404_with_empty_etcd(stack: Stack) -> None:
    await stack.wait_listener()
    async with aiohttp.ClientSession() as session:
        status, headers, body = await async_wait_for(
            lambda: chat(session, stack.url, "nobody"), 30, "a reply")
    assert status == 404
    assert body["error"]["code"] == "model_not_found"
