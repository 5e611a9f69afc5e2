"""The warmth prober end to end: real Envoy, real etcd, real control plane, real prober
process, and model servers on 127.0.0.1 whose time to first token the tests control.

Conditions are polled with deadlines; the probe interval is short (0.5-1 s) to keep the
module quick. Timings measured here are printed (run with -s) and quoted in docs/prober.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

import aiohttp
import pytest
from aiohttp import web

from control_plane.runtime.envoy_admin import parse_clusters
from control_plane.store.etcd import etcd_client, list_prefix
from tests import harness
from tests.harness import ProberProcess, Stack, async_wait_for, wait_for

pytestmark = pytest.mark.integration

MODEL = "m1"
POOL = "p1"
COLD_MS = 200.0  # far above a loaded CI machine's 5 ms answers
SLOW_S = 0.3  # a "slow" server's time to first token: above COLD_MS
T = TypeVar("T")



# --- model servers ------------------------------------------------------------------------


class ModelServer:
    """An OpenAI-style chat server whose time to first token is ``delay``; counts probes
    (``x-hotpath-probe``) apart from real requests, which also hold for ``hold`` seconds."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = 0
        self.delay = 0.005
        self.hold = 0.0
        self.probes: list[tuple[float, str]] = []  # (monotonic time, prober identity)
        self.real: list[float] = []
        self.active = 0
        self.peak = 0
        self.runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        probe = request.headers.get("x-hotpath-probe") == "1"
        if probe:
            self.probes.append((time.monotonic(), request.headers.get("x-hotpath-prober", "")))
        else:
            self.real.append(time.monotonic())
            self.active += 1
            self.peak = max(self.peak, self.active)
        try:
            await asyncio.sleep(self.delay + (0.0 if probe else self.hold))
            return web.json_response({
                "served_by": self.name, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"},
                             "finish_reason": "length"}],
                "usage": {"prompt_tokens": 21, "completion_tokens": 1,
                          "prompt_tokens_details": {"cached_tokens": 16}},
            }, headers={"x-served-by": self.name})
        finally:
            if not probe:
                self.active -= 1

    async def start(self) -> int:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.handle)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        self.port = self.runner.addresses[0][1]
        return self.port

    async def kill(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    def probes_between(self, start: float, end: float) -> int:
        return sum(1 for t, _ in self.probes if start <= t <= end)

    def probes_since(self, start: float) -> int:
        return sum(1 for t, _ in self.probes if t >= start)


@pytest.fixture
async def models() -> AsyncIterator[dict[str, ModelServer]]:
    servers = {name: ModelServer(name) for name in ("a", "b", "c")}
    try:
        yield servers
    finally:
        for server in servers.values():
            await server.kill()


async def until(check: Callable[[], T], timeout: float, what: str) -> T:
    """Polls a plain condition on the event loop (the servers and traffic keep running)."""
    async def poll() -> T:
        return check()

    return await async_wait_for(poll, timeout, what, 0.02)


async def wait_probed_after_traffic(server: ModelServer, timeout: float = 10) -> None:
    """Until ``server`` is probed again after its last real request: the prober no longer
    skips it for real traffic, so a change of its answers is seen at the next interval."""
    last = server.real[-1] if server.real else 0.0
    await until(lambda: any(t > last for t, _ in server.probes), timeout,
                f"a probe of {server.name} after its last real request")


# --- the stack ------------------------------------------------------------------------------


@contextlib.contextmanager
def probers(*items: ProberProcess) -> Iterator[None]:
    try:
        for item in items:
            item.start()
        yield
    finally:
        for item in items:
            item.stop()


async def setup_pool(stack: Stack, models: dict[str, ModelServer], interval: float,
                     **pool: Any) -> None:
    await stack.put(f"pools/{POOL}", {"models": [MODEL], "warmup": {
        "interval_s": interval, "timeout_s": 1.0, "cold_ttft_ms": COLD_MS}, **pool})
    for name, server in models.items():
        await server.start()
        await stack.put(f"endpoints/{POOL}/{name}", {"address": "127.0.0.1",
                                                     "port": server.port})
    await stack.wait_listener()
    await asyncio.to_thread(wait_for, lambda: set(stack.envoy.hosts(POOL)) == set(models),
                            30, "Envoy to have every host")


def envoy_view(stack: Stack) -> dict[str, tuple[str, int]]:
    """hostname -> (health, weight) as Envoy has them."""
    return {h.hostname: (h.health, h.weight)
            for h in parse_clusters(stack.envoy.get("/clusters?format=json"))
            if h.cluster == POOL}


async def statuses(stack: Stack) -> dict[str, dict[str, Any]]:
    async with etcd_client(stack.etcd) as client:
        _, items = await list_prefix(client, stack.etcd, f"status/{POOL}/")
    return {key.rsplit("/", 1)[1]: {**json.loads(value), "rev": rev}
            for key, value, rev in items}


async def wait_states(stack: Stack, want: dict[str, str], timeout: float = 20) -> None:
    async def check() -> bool:
        got = await statuses(stack)
        return all(got.get(k, {}).get("state") == v for k, v in want.items())

    await async_wait_for(check, timeout, f"statuses {want}")


async def wait_envoy(stack: Stack, want: dict[str, str], timeout: float = 20) -> float:
    """Polls until Envoy's health of each host is as wanted; returns when (monotonic)."""
    def check() -> float | None:
        view = envoy_view(stack)
        if all(view.get(k, ("?", 0))[0] == v for k, v in want.items()):
            return time.monotonic()
        return None

    found: float = await asyncio.to_thread(
        wait_for, check, timeout, f"Envoy health {want}", 0.02)  # type: ignore[arg-type]
    return found


async def served(session: aiohttp.ClientSession, stack: Stack, key: str) -> str:
    status, _, body = await harness.chat(session, stack.url, MODEL, {"x-session-id": key})
    assert status == 200, body
    return str(body["served_by"])


async def mapping(session: aiohttp.ClientSession, stack: Stack, keys: list[str],
                  parallel: int = 1) -> dict[str, str]:
    """Which host serves each session key. ``parallel`` > 1 sends that many at once (few
    enough that bounded load rarely steps in), for slow hosts."""
    found: dict[str, str] = {}
    for i in range(0, len(keys), parallel):
        batch = keys[i:i + parallel]
        hosts = await asyncio.gather(*[served(session, stack, key) for key in batch])
        found.update(zip(batch, hosts, strict=True))
    return found


def hotpath_status(stack: Stack) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "control_plane", "status", "--json", "--etcd", stack.etcd.urls,
         "--prefix", stack.etcd.prefix, "--admin", stack.envoy.admin_url],
        capture_output=True, text=True, timeout=30, check=True)
    return {row["endpoint"]: row for row in json.loads(out.stdout)["endpoints"]}


# --- 1. a slow upstream ---------------------------------------------------------------------------


async def test_slow_upstream_gets_no_new_sessions_until_it_recovers(
        stack: Stack, models: dict[str, ModelServer]) -> None:
    stack, interval = stack, 1.0
    await setup_pool(stack, models, interval)
    with probers(ProberProcess(stack, "prober")):
        await wait_states(stack, {"a": "warm", "b": "warm", "c": "warm"})
        async with aiohttp.ClientSession() as session:
            before = await mapping(session, stack, [f"old-{i}" for i in range(60)])
            assert set(before.values()) == {"a", "b", "c"}
            # Quiet until c is probed again: hosts with real traffic are not probed.
            await wait_probed_after_traffic(models["c"])

            models["c"].delay = SLOW_S
            slow_at = time.monotonic()
            marked_at = await wait_envoy(stack, {"c": "degraded", "a": "healthy",
                                                 "b": "healthy"})
            took = marked_at - slow_at
            print(f"\nslow -> out of the ring in {took:.2f} s (interval {interval} s)")
            # It slowed right after a probe, the worst moment: the next probe comes an
            # interval later, the confirming one min(1 s, interval / 4) after its answer, and
            # both take SLOW_S (1.85 s here). Two intervals plus one slow answer leaves the
            # write, the push and Envoy 0.45 s.
            assert took <= 2 * interval + SLOW_S, f"took {took:.2f} s, more than two intervals"

            rows = await asyncio.to_thread(hotpath_status, stack)
            assert rows["c"]["warmth"] == "cold" and rows["c"]["envoy"] == "degraded"
            assert rows["a"]["warmth"] == "warm" and rows["a"]["envoy"] == "healthy"
            assert rows["c"]["ttft_ms"] > COLD_MS

            new = await mapping(session, stack, [f"new-{i}" for i in range(60)])
            assert "c" not in new.values()
            during = await mapping(session, stack, list(before))
            for key, host in before.items():
                if host != "c":
                    assert during[key] == host, f"{key} moved off warm host {host}"
                else:
                    assert during[key] in ("a", "b")

            await wait_probed_after_traffic(models["c"])  # quiet again, so c is probed
            models["c"].delay = 0.005
            fixed_at = time.monotonic()
            back_at = await wait_envoy(stack, {"c": "healthy"})
            print(f"recovered -> back in the ring in {back_at - fixed_at:.2f} s")
            rows = await asyncio.to_thread(hotpath_status, stack)
            assert rows["c"]["warmth"] == "warm"
            # New sessions reach it again; the sessions that moved off it while it was cold
            # are active where they are now, so its return moves none of them (pins,
            # docs/affinity.md), and none of the others either.
            again = await mapping(session, stack, [f"again-{i}" for i in range(60)])
            assert "c" in again.values()
            assert await mapping(session, stack, list(before)) == during
            assert await mapping(session, stack, list(new)) == new


# --- 2. a killed upstream ---------------------------------------------------------------------


async def test_killed_upstream_gets_no_traffic_once_marked_and_nothing_fails(
        stack: Stack, models: dict[str, ModelServer]) -> None:
    stack, interval = stack, 0.5
    await setup_pool(stack, models, interval)
    with probers(ProberProcess(stack, "prober")):
        await wait_states(stack, {"a": "warm", "b": "warm", "c": "warm"})
        keys = [f"k{i}" for i in range(30)]
        results: list[tuple[float, str, int, str]] = []  # (start, key, status, served_by)
        stop = asyncio.Event()

        async def traffic(session: aiohttp.ClientSession) -> None:
            i = 0
            while not stop.is_set():
                key = keys[i % len(keys)]
                i += 1
                started = time.monotonic()
                try:
                    status, _, body = await harness.chat(session, stack.url, MODEL,
                                                         {"x-session-id": key})
                    by = body.get("served_by", "") if isinstance(body, dict) else ""
                except aiohttp.ClientError as exc:
                    status, by = 0, repr(exc)
                results.append((started, key, status, by))
                await asyncio.sleep(0.01)

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            before = await mapping(session, stack, keys)
            assert "c" in before.values()
            runner = asyncio.create_task(traffic(session))
            try:
                await until(lambda: sum(1 for r in results if r[3] == "c") >= 5, 20,
                            "traffic to reach c")
                killed_at = time.monotonic()
                await models["c"].kill()
                marked_at = await wait_envoy(stack, {"c": "unhealthy"})
                await until(lambda: sum(1 for r in results if r[0] >= marked_at) >= 50, 20,
                            "50 requests after c was marked down")
            finally:
                stop.set()
                await runner
        window = marked_at - killed_at
        failed_before = [r for r in results if killed_at <= r[0] < marked_at and r[2] != 200]
        after = [r for r in results if r[0] >= marked_at]
        print(f"\nkilled -> marked down in {window:.2f} s; requests in that window: "
              f"{sum(1 for r in results if killed_at <= r[0] < marked_at)}, failed: "
              f"{len(failed_before)}; after marking: {len(after)}, failed: "
              f"{sum(1 for r in after if r[2] != 200)}")
        assert window < 3 * interval + 1.0
        assert after and all(status == 200 for _, _, status, _ in after), \
            [r for r in after if r[2] != 200]
        assert all(by in ("a", "b") for _, _, _, by in after)
        moved = {key: by for _, key, _, by in after}
        for key, host in before.items():
            if key in moved:
                assert moved[key] == host if host != "c" else moved[key] in ("a", "b")
        rows = await asyncio.to_thread(hotpath_status, stack)
        assert rows["c"]["warmth"] == "down" and rows["c"]["envoy"] == "unhealthy"
        # The endpoint removed for good: the prober removes its status too.
        await stack.delete(f"endpoints/{POOL}/c")

        async def status_gone() -> bool:
            return "c" not in await statuses(stack)

        await async_wait_for(status_gone, 10, "the status of a removed endpoint to go")


# --- 3. economy -------------------------------------------------------------------------------


async def test_hosts_with_live_traffic_get_no_probes_idle_ones_one_per_interval(
        stack: Stack, models: dict[str, ModelServer]) -> None:
    stack, interval = stack, 0.5
    await setup_pool(stack, models, interval)
    prober = ProberProcess(stack, "prober")
    with probers(prober):
        await wait_states(stack, {"a": "warm", "b": "warm", "c": "warm"})
        written = await statuses(stack)
        async with aiohttp.ClientSession() as session:
            on_a = [k for k, v in (await mapping(session, stack, [f"s{i}" for i in range(20)])
                                   ).items() if v == "a"]
            assert on_a
            stop = asyncio.Event()

            async def traffic() -> None:
                i = 0
                while not stop.is_set():
                    await served(session, stack, on_a[i % len(on_a)])
                    i += 1
                    await asyncio.sleep(0.05)

            skipped = prober.metric("hotpath_prober_probes_skipped_total", endpoint="a",
                                    reason="traffic")
            runner = asyncio.create_task(traffic())
            try:
                # Once the prober skips a for its traffic, no probe of a is pending any more.
                await asyncio.to_thread(wait_for, lambda: prober.metric(
                    "hotpath_prober_probes_skipped_total", endpoint="a", reason="traffic")
                    > skipped, 20, "a skipped for its real traffic")
                start = time.monotonic()
                await until(lambda: all(models[n].probes_since(start) >= 7 for n in "bc"),
                            7 * interval + 5, "seven probes of each idle host")
                end = time.monotonic()
            finally:
                stop.set()
                await runner
        counts = {n: s.probes_between(start, end) for n, s in models.items()}
        print(f"\nprobes in {end - start:.1f} s at interval {interval} s: {counts}")
        assert counts["a"] == 0, "a host serving real traffic was probed"
        # One per interval (+ probe time): seven probes span at least six intervals.
        assert end - start >= 6 * interval - 0.1, (end - start, counts)
        assert all(7 <= counts[n] <= 8 for n in "bc"), counts
        # No etcd churn: nothing changed, so nothing was written since the first records.
        assert {k: v["rev"] for k, v in (await statuses(stack)).items()} == \
            {k: v["rev"] for k, v in written.items()}
        assert prober.metric("hotpath_prober_probes_skipped_total", endpoint="a",
                             reason="traffic") >= 5
        assert prober.metric("hotpath_prober_probes_total", endpoint="a") <= 2
        assert prober.metric("hotpath_prober_probes_total", endpoint="b",
                             outcome="fast") >= 4
        sent = prober.metric("hotpath_prober_probes_total")
        assert prober.metric("hotpath_prober_tokens_total", kind="completion") == sent
        assert prober.metric("hotpath_prober_tokens_total", kind="prompt") == 21 * sent
        assert prober.metric("hotpath_prober_probe_ttft_seconds_count") == sent
        assert prober.metric("hotpath_prober_endpoint_state", endpoint="b", state="warm") == 1
        assert prober.metric("hotpath_prober_status_writes_total") == 3
        assert prober.metric("hotpath_prober_leader") == 1


# --- 4. two of three cold, all cold ---------------------------------------------------------------


async def test_two_of_three_cold_spill_within_bounds_and_all_cold_still_serves(
        stack: Stack, models: dict[str, ModelServer]) -> None:
    stack, interval = stack, 0.5
    await setup_pool(stack, models, interval)
    with probers(ProberProcess(stack, "prober")):
        await wait_states(stack, {"a": "warm", "b": "warm", "c": "warm"})
        models["b"].delay = models["c"].delay = SLOW_S
        await wait_states(stack, {"b": "cold", "c": "cold"})
        await asyncio.to_thread(wait_for, lambda: envoy_view(stack) == {
            "a": ("healthy", 16), "b": ("healthy", 8), "c": ("healthy", 8)}, 20,
            "the spill weights")
        async with aiohttp.ClientSession() as session:
            new = await mapping(session, stack, [f"n{i}" for i in range(60)], parallel=10)
            share = {h: sum(1 for v in new.values() if v == h) / len(new) for h in models}
            print(f"\n2 of 3 cold: share of new sessions {share}")
            # The warm host takes up to 1.5 x its fair third (half); the rest spills.
            assert 0.35 <= share["a"] <= 0.62, share
            assert share["b"] >= 0.12 and share["c"] >= 0.12, share

            # Under concurrent load no host goes past Envoy's bounded-load limit.
            for server in models.values():
                server.hold, server.peak = 0.4, 0
            concurrent = 30
            replies = await asyncio.gather(*[
                harness.chat(session, stack.url, MODEL, {"x-session-id": f"burst-{i}"})
                for i in range(concurrent)])
            assert all(status == 200 for status, _, _ in replies)
            peaks = {n: s.peak for n, s in models.items()}
            print(f"2 of 3 cold: peak concurrent requests per host {peaks}")
            # slots = ceil(ceil((active + 1) x 150 / 100) x weight share), share a = 1/2
            assert peaks["a"] <= math.ceil(math.ceil((concurrent + 1) * 1.5) * 0.5), peaks
            for server in models.values():
                server.hold = 0.0

            models["a"].delay = SLOW_S
            await wait_states(stack, {"a": "cold", "b": "cold", "c": "cold"})
            await asyncio.to_thread(wait_for, lambda: envoy_view(stack) == {
                "a": ("healthy", 1), "b": ("healthy", 1), "c": ("healthy", 1)}, 20,
                "all cold: plain weights")
            cold = await mapping(session, stack, [f"n{i}" for i in range(60)], parallel=10)
            share = {h: sum(1 for v in cold.values() if v == h) / len(cold) for h in models}
            print(f"all cold: share of new sessions {share}")
            assert all(0.2 <= s <= 0.47 for s in share.values()), share


# --- leader election and letting hosts go cold ---------------------------------------------


async def test_two_probers_one_probes_and_the_other_takes_over(
        stack: Stack, models: dict[str, ModelServer]) -> None:
    stack, interval = stack, 0.5
    await setup_pool(stack, models, interval)
    first, second = ProberProcess(stack, "prober-1"), ProberProcess(stack, "prober-2")
    with probers(first, second):
        await wait_states(stack, {"a": "warm", "b": "warm", "c": "warm"})
        await asyncio.to_thread(
            wait_for, lambda: first.metric("hotpath_prober_leader")
            + second.metric("hotpath_prober_leader") == 1, 20, "one leader")
        leader, standby = (first, second) if first.metric("hotpath_prober_leader") \
            else (second, first)
        start = time.monotonic()
        await until(lambda: all(s.probes_since(start) >= 3 for s in models.values()), 20,
                    "three probes of every host")
        identities = {who for s in models.values() for t, who in s.probes if t >= start}
        assert len(identities) == 1, identities
        assert standby.metric("hotpath_prober_probes_total") == 0

        records = {k: v["rev"] for k, v in (await statuses(stack)).items()}
        # SIGTERM: a clean exit that revokes the lease, so the standby takes over at once.
        assert leader.stop() == 0
        handover = time.monotonic()
        await asyncio.to_thread(wait_for, lambda: standby.metric("hotpath_prober_leader") == 1,
                                10, "the standby to lead")
        print(f"\nleader stopped -> standby leads in {time.monotonic() - handover:.2f} s")
        await asyncio.to_thread(wait_for, lambda: standby.metric(
            "hotpath_prober_probes_total") >= 3, 10, "the new leader to probe")
        # It carries on from the records: nothing changed, so nothing is rewritten.
        assert {k: v["rev"] for k, v in (await statuses(stack)).items()} == records
        models["c"].delay = SLOW_S
        await wait_states(stack, {"c": "cold"})
        later = {who for s in models.values() for t, who in s.probes if t > handover}
        assert len(later) == 1 and later != identities


async def test_idle_hosts_beyond_min_warm_are_let_go_cold(
        stack: Stack, models: dict[str, ModelServer]) -> None:
    stack, interval = stack, 0.5
    await setup_pool(stack, models, interval)
    prober = ProberProcess(stack, "prober", "--idle-horizon", "1.5", "--min-warm", "1")
    with probers(prober):
        await wait_states(stack, {"a": "warm", "b": "warm", "c": "warm"})

        async def two_released() -> list[str]:
            got = await statuses(stack)
            cold = [k for k, v in got.items() if v["state"] == "cold"]
            return cold if len(cold) == 2 else []

        released = await async_wait_for(two_released, 20, "two hosts let go cold")
        kept = ({"a", "b", "c"} - set(released)).pop()
        start = time.monotonic()
        await until(lambda: models[kept].probes_since(start) >= 4, 20,
                    "four probes of the kept host")
        await asyncio.to_thread(wait_for, lambda: prober.metric(
            "hotpath_prober_probes_skipped_total", reason="released") >= 4, 20,
            "released hosts skipped")
        end = time.monotonic()
        counts = {n: s.probes_between(start, end) for n, s in models.items()}
        print(f"\nmin warm 1: released {released}, probes in {end - start:.1f} s: {counts}")
        assert all(counts[n] == 0 for n in released), counts
        # One warm host of three cannot carry the pool: the released ones take the spill.
        view = envoy_view(stack)
        assert view[kept] == ("healthy", 16)
        assert all(view[n] == ("healthy", 8) for n in released), view
