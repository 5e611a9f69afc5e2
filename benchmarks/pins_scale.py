"""Sliding-TTL pins at scale: what N pins cost the control plane's ECDS push, Envoy and etcd.

Starts a real etcd, the control plane and one real Envoy on free loopback ports, a ring-hash
pool of ``--endpoints`` in-process upstreams (tests/harness.py ``Upstreams``: they answer
with their name), then for each N of ``--counts`` writes ``pins/<pool>`` (the leader's pin
table, config/pins.py) holding N pins and measures:

- the Lua filter's ECDS resource (TypedExtensionConfig) the translator builds from them
  (bytes, in-process with control_plane/translate, exactly as the control plane does), and
  the bytes Envoy received from the control plane over the write
  (``cluster.hotpath_xds.upstream_cx_rx_bytes_total``: ADS framing included, and whatever
  else was pushed in that window);
- push and apply time: from just before the etcd write until Envoy's
  ``upstream_cx_rx_bytes_total`` from the control plane moved (push: the etcd watch,
  translate, serialize, send) and until its ``extension_config_discovery.*.config_reload``
  counter moved (apply: the new Lua source accepted; each worker runs it, building the
  pool -> hash -> host table), polled every ``--poll-ms``; and until the first request of
  a session pinned by that table only (to a host its ring owner is not) reaches its pinned
  host ("pin routed": a worker runs the new filter). A table that renders the same
  filter as the one in force (N = 0 after the leader's empty table) is not pushed at all:
  that row only checks that nothing reloads;
- the etcd value's size;
- per request with the pins in place: p50/p99 of ``--requests`` requests for a pinned
  session and as many for an unpinned one, interleaved, one at a time over one keep-alive
  connection (client and upstream share this process, so the figures are loopback + Lua +
  aiohttp; compare the two columns and the rows, not the absolute numbers); every pinned
  request must reach its pinned host (the ring would send it elsewhere);
- Envoy's RSS (/proc) and its allocator's view (admin /memory).

The pool's ``session_ttl_s`` is an hour and every pin is seen "now", pointing at an existing
(warm: no prober runs, so no status) endpoint, so the leader's re-plan keeps them all; the
table carries the ring fingerprint the leader wrote for the pool, so it is not rewritten.
At N > 0 one of the N pins is the measured pinned session, at N > 1 one more is that
write's probe session. ``--rounds`` different tables are written per N (push/apply/routed:
median / max over them; per-request figures with the last one in place).

    .venv/bin/python benchmarks/pins_scale.py [--counts 0,1000,10000] [--requests 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import random
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from control_plane.affinity.plan import pool_ring  # noqa: E402
from control_plane.affinity.ring import key_hash  # noqa: E402
from control_plane.config.model import (  # noqa: E402
    Config,
    Endpoint,
    GatewaySettings,
    parse_endpoint,
    parse_pool,
)
from control_plane.config.pins import Pin, PinTable, parse_pins, pins_to_json  # noqa: E402
from control_plane.translate.lua import lua_asset  # noqa: E402
from control_plane.translate.resources import Translator  # noqa: E402
from control_plane.translate.warmth import pool_routes  # noqa: E402
from control_plane.xds import types  # noqa: E402
from tests.harness import Stack, Upstreams, make_stack, new_etcd  # noqa: E402

POOL = "pinpool"
MODEL = "pin-model"
PREFIX = "/pins-bench/"
TTL_S = 3600
PINNED_KEY = "bench-pinned-session"
FREE_KEY = "bench-free-session"
XDS_RX = "cluster.hotpath_xds.upstream_cx_rx_bytes_total"


@functools.cache
def _lua_module() -> Any:
    from lupa import luajit21

    return luajit21.LuaRuntime(encoding=None).execute(lua_asset("hotpath.lua").encode())


def session_hash(key: str) -> str:
    """The Lua filter's session hash of a key (lua/hotpath.lua M.hash, run with LuaJIT)."""
    return str(_lua_module().hash(key.encode()).decode())


def admin_get(admin: str, path: str, timeout: float = 5) -> bytes:
    with urllib.request.urlopen(f"{admin}{path}", timeout=timeout) as reply:
        return bytes(reply.read())


def envoy_counters(admin: str, pattern: str) -> dict[str, int]:
    text = admin_get(admin, f"/stats?filter={pattern}").decode()
    found = {}
    for line in text.splitlines():
        key, _, value = line.partition(": ")
        if value.strip().isdigit():
            found[key] = int(value)
    return found


def ecds_counters(admin: str) -> tuple[int, int]:
    """(config_reload, config_fail) summed over Envoy's extension_config_discovery stats."""
    stats = envoy_counters(admin, r"^extension_config_discovery\.")
    reload = sum(v for k, v in stats.items() if k.endswith(".config_reload"))
    fail = sum(v for k, v in stats.items() if k.endswith(".config_fail"))
    return reload, fail


def ecds_version(admin: str) -> str:
    dump = json.loads(admin_get(admin, "/config_dump?resource=ecds_filters"))
    versions = [c.get("version_info", "") for c in dump.get("configs", [])]
    return ",".join(versions) or "-"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def allocated_mib(admin: str) -> float:
    return int(json.loads(admin_get(admin, "/memory"))["allocated"]) / 2**20


def cp_metric(stack: Stack, name: str) -> float:
    """Sum of a control-plane /metrics family's samples."""
    url = f"http://127.0.0.1:{stack.control_plane.metrics_port}/metrics"
    text = admin_get(url, "").decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#")
               and line[len(name):len(name) + 1] in ("{", " "))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def pin_table(n: int, ring: str, fixed: list[tuple[str, str]], endpoints: list[str],
              now: float, seed: int) -> PinTable:
    """N pins: the ``fixed`` ones first ((session hash, endpoint): the measured sessions'),
    then random ones spread over the endpoints, all seen ``now``."""
    rng = random.Random(seed)
    pins: dict[str, Pin] = {}
    for session, endpoint in fixed[:n]:
        pins[session] = Pin(endpoint, now)
    while len(pins) < n:
        pins[f"h-{rng.getrandbits(64):016x}"] = Pin(endpoints[len(pins) % len(endpoints)], now)
    return PinTable(POOL, ring, pins)


def ecds_resource(config: Config) -> bytes:
    """The ECDS resource (serialized) the control plane builds for ``config``."""
    resources = Translator().translate(config, lambda e: e.address, GatewaySettings(),
                                       time.time())
    return b"".join(r.SerializeToString(deterministic=True)
                    for _, r in sorted(resources[types.EXTENSION_CONFIG].items()))


async def turn(http: aiohttp.ClientSession, url: str, key: str) -> tuple[float, int, str]:
    body = {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]}
    start = time.perf_counter()
    async with http.post(f"{url}/v1/chat/completions", json=body,
                         headers={"x-session-id": key}) as reply:
        await reply.read()
        return time.perf_counter() - start, reply.status, reply.headers.get("x-served-by", "")


WATCHED = rf"^extension_config_discovery\.|^{re.escape(XDS_RX)}$"


async def wait_applied(admin: str, before: dict[str, int], t0: float, timeout: float,
                       poll_s: float, probe: Callable[[], Awaitable[bool]] | None
                       ) -> tuple[float | None, float | None, float | None]:
    """(first bytes from the control plane, ECDS config_reload moved, ``probe`` true: a
    request of the session newly pinned reached its pin), seconds after t0; None: not
    within ``timeout``."""
    reloads = sum(v for k, v in before.items() if k.endswith(".config_reload"))
    pushed = applied = routed = None
    deadline = t0 + timeout
    while time.monotonic() < deadline and (applied is None
                                           or (probe is not None and routed is None)):
        if applied is None:
            now = await asyncio.to_thread(envoy_counters, admin, WATCHED)
            elapsed = time.monotonic() - t0
            if pushed is None and now.get(XDS_RX, 0) > before.get(XDS_RX, 0):
                pushed = elapsed
            if sum(v for k, v in now.items() if k.endswith(".config_reload")) > reloads:
                applied = elapsed
                pushed = elapsed if pushed is None else pushed
        if probe is not None and routed is None and await probe():
            routed = time.monotonic() - t0
        await asyncio.sleep(poll_s)
    return pushed, applied, routed


def log_lines(path: Path, pattern: str) -> list[str]:
    if not path.exists():
        return []
    regex = re.compile(pattern, re.IGNORECASE)
    return [line for line in path.read_text(errors="replace").splitlines() if regex.search(line)]


async def main(args: argparse.Namespace) -> None:
    counts = [int(c) for c in args.counts.split(",")]
    started = time.monotonic()
    rows: list[dict[str, str]] = []
    notes: list[str] = []
    tmp = Path(tempfile.mkdtemp(prefix="hotpath-pins-"))
    etcd = new_etcd(tmp)
    upstreams = Upstreams()
    stack: Stack | None = None
    try:
        stack = make_stack(tmp, etcd.url, PREFIX)
        admin = stack.envoy.admin_url
        envoy_pid = stack.envoy.process.pid  # type: ignore[union-attr]
        names = [f"e{i}" for i in range(args.endpoints)]
        ports = {name: await upstreams.add(name) for name in names}
        pool_value = {"models": [MODEL], "session_ttl_s": TTL_S}
        await stack.put(f"pools/{POOL}", pool_value)
        for name in names:
            await stack.put(f"endpoints/{POOL}/{name}",
                            {"address": "127.0.0.1", "port": ports[name]})
        await stack.wait_listener()
        # The ring every control plane computes for the pool (all warm: no statuses).
        pool = parse_pool(f"pools/{POOL}", POOL, json.dumps(pool_value))
        endpoints: dict[str, Endpoint] = {
            n: parse_endpoint(f"endpoints/{POOL}/{n}", POOL, n,
                              json.dumps({"address": "127.0.0.1", "port": ports[n]}))
            for n in names}
        ring, ring_fp = pool_ring(pool, pool_routes(pool, endpoints, {}, time.time()))
        connector = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=connector) as http:
            async def routed() -> bool:
                _, status, host = await turn(http, stack.url, FREE_KEY)
                return status == 200 and len(stack.envoy.hosts(POOL)) == len(names)

            deadline = time.monotonic() + 30
            while not await routed():
                if time.monotonic() > deadline:
                    raise AssertionError(f"{MODEL} did not route to {len(names)} hosts")
                await asyncio.sleep(0.1)
            # The leader writes the (empty) table of the pool with the ring it computed
            # (once per ring while the endpoints arrived): wait for the 3-host ring's.
            stored = None
            deadline = time.monotonic() + 15
            while stored is None or (stored["ring"] != ring_fp
                                     and time.monotonic() < deadline):
                if stored is None and time.monotonic() > deadline:
                    raise AssertionError(f"the leader wrote no pins/{POOL}")
                await asyncio.sleep(0.2)
                stored = await stack.get_json(f"pins/{POOL}")
            if stored["ring"] != ring_fp:
                notes.append(f"leader's ring id {stored['ring']} != computed {ring_fp}; "
                             "using the leader's")
            ring_fp = stored["ring"]
            _, _, ring_host = await turn(http, stack.url, PINNED_KEY)
            if ring.owner(key_hash(PINNED_KEY)) != ring_host:
                notes.append(f"{PINNED_KEY}: served by {ring_host}, the ring model says "
                             f"{ring.owner(key_hash(PINNED_KEY))}")
            pin_host = next(n for n in names if n != ring_host)
            pinned = (session_hash(PINNED_KEY), pin_host)

            def with_pins(table: PinTable) -> Config:
                return Config(pools={POOL: pool}, endpoints={POOL: endpoints},
                              pins={POOL: table})

            published = ecds_resource(with_pins(parse_pins(f"pins/{POOL}", POOL,
                                                           json.dumps(stored))))

            async def write(n: int, seed: int) -> dict[str, Any]:
                """One table of n pins written and applied: what it cost."""
                nonlocal published
                # A session pinned by this table only, to a host its ring owner is not: the
                # first of its requests that reaches that host shows a worker has the table.
                probe_key = f"probe-{seed}"
                owner = str(ring.owner(key_hash(probe_key)))
                probe_host = names[(names.index(owner) + 1) % len(names)]

                async def probe() -> bool:
                    _, status, host = await turn(http, stack.url, probe_key)
                    return status == 200 and host == probe_host

                table = pin_table(n, ring_fp, [pinned, (session_hash(probe_key), probe_host)],
                                  names, time.time(), seed)
                raw = pins_to_json(table)
                # What every control plane does with it, in-process: parse, render.
                cpu0 = time.perf_counter()
                resource = ecds_resource(with_pins(parse_pins(f"pins/{POOL}", POOL, raw)))
                render_s = time.perf_counter() - cpu0
                changed, published = resource != published, resource
                before = await asyncio.to_thread(envoy_counters, admin, WATCHED)
                reload0, fail0 = await asyncio.to_thread(ecds_counters, admin)
                nacks0 = cp_metric(stack, "hotpath_xds_nacks_total")
                t0 = time.monotonic()
                await stack.put(f"pins/{POOL}", raw)
                # An unchanged filter is not pushed: then only check that nothing reloads.
                pushed, applied, routed = await wait_applied(
                    admin, before, t0, args.apply_timeout if changed else 2.0,
                    args.poll_ms / 1000, probe if n >= 2 else None)
                await asyncio.sleep(1.5)  # follow-up pushes (a leader rewrite) arrive
                reload1, fail1 = await asyncio.to_thread(ecds_counters, admin)
                rx1 = (await asyncio.to_thread(envoy_counters, admin, f"^{XDS_RX}$")).get(XDS_RX, 0)
                nacks1 = cp_metric(stack, "hotpath_xds_nacks_total")
                now_stored = await stack.get_json(f"pins/{POOL}")
                kept = len(now_stored["pins"]) if now_stored else 0
                if kept != n or (now_stored and now_stored["ring"] != ring_fp):
                    notes.append(f"N={n}: etcd holds {kept} pins, ring "
                                 f"{now_stored and now_stored['ring']} after the leader's re-plan")
                if reload1 - reload0 != int(changed):
                    notes.append(f"N={n}: {reload1 - reload0} ECDS reloads over the write")
                if fail1 > fail0 or nacks1 > nacks0:
                    notes.append(f"N={n}: ECDS config_fail +{fail1 - fail0}, control-plane NACKs "
                                 f"+{nacks1 - nacks0:.0f}")
                if changed and applied is None:
                    notes.append(f"N={n}: not applied within {args.apply_timeout:g} s")
                if n >= 2 and changed and routed is None:
                    notes.append(f"N={n}: {probe_key} never reached its pinned {probe_host}")
                return {"changed": changed, "pushed": pushed, "applied": applied,
                        "routed": routed,
                        "rx": rx1 - before.get(XDS_RX, 0), "ecds": len(resource),
                        "etcd": len(raw), "render": render_s}

            def spread(values: list[float | None]) -> str:
                """median / max in ms; 'timeout' when one did not happen."""
                if any(v is None for v in values):
                    return "timeout"
                done = [v for v in values if v is not None]
                return f"{statistics.median(done) * 1000:.0f} / {max(done) * 1000:.0f}"

            for index, n in enumerate(counts):
                # N = 0 renders the same filter every time: one write shows it.
                writes = [await write(n, seed=index * 1000 + r)
                          for r in range(args.rounds if n else 1)]
                changed = any(w["changed"] for w in writes)
                # Per request, with the pins in place.
                for _ in range(50):
                    await turn(http, stack.url, PINNED_KEY)
                    await turn(http, stack.url, FREE_KEY)
                pinned_s: list[float] = []
                free_s: list[float] = []
                off_pin = errors = 0
                for _ in range(args.requests):
                    elapsed, status, host = await turn(http, stack.url, PINNED_KEY)
                    pinned_s.append(elapsed)
                    errors += status != 200
                    off_pin += n > 0 and host != pin_host
                    elapsed, status, host = await turn(http, stack.url, FREE_KEY)
                    free_s.append(elapsed)
                    errors += status != 200
                if off_pin or errors:
                    notes.append(f"N={n}: {off_pin} pinned requests off their pinned host "
                                 f"{pin_host}, {errors} non-200")
                rows.append({
                    "pins": str(n),
                    "ECDS B": str(writes[-1]["ecds"]),
                    "Envoy rx B": str(int(statistics.median(w["rx"] for w in writes))),
                    "etcd B": str(writes[-1]["etcd"]),
                    "CP parse+render ms":
                        f"{statistics.median(w['render'] for w in writes) * 1000:.0f}",
                    "push ms": spread([w["pushed"] for w in writes]) if changed else "-",
                    "apply ms": spread([w["applied"] for w in writes]) if changed
                    else "unchanged",
                    "pin routed ms": spread([w["routed"] for w in writes]) if n >= 2 else "-",
                    "pinned p50/p99 ms": f"{statistics.median(pinned_s) * 1000:.2f} / "
                                         f"{percentile(pinned_s, 0.99) * 1000:.2f}",
                    "unpinned p50/p99 ms": f"{statistics.median(free_s) * 1000:.2f} / "
                                           f"{percentile(free_s, 0.99) * 1000:.2f}",
                    "RSS MiB": f"{rss_mib(envoy_pid):.1f}",
                    "alloc MiB": f"{await asyncio.to_thread(allocated_mib, admin):.1f}",
                    "ECDS version": await asyncio.to_thread(ecds_version, admin),
                })
        lua_lines = log_lines(tmp / "envoy-0.log", r"\[lua\]|\[(warning|error|critical)\]")
        # Envoy logs this once per Lua source it loads (the filter has no response hook).
        loads = sum("envoy_on_response() function not found" in line for line in lua_lines)
        envoy_log = [line for line in lua_lines
                     if "envoy_on_response() function not found" not in line]
        concurrency = json.loads(admin_get(admin, "/server_info"))[
            "command_line_options"]["concurrency"]
        cp_log = log_lines(stack.control_plane.log, r"nack|reject|warning|error|traceback")
    finally:
        await upstreams.close()
        if stack is not None:
            stack.close()
        etcd.stop()
    headers = list(rows[0])
    widths = {h: max(len(h), *(len(r[h]) for r in rows)) for h in headers}
    print(f"\n{args.endpoints} endpoints (ring hash, session_ttl_s {TTL_S}), one real Envoy "
          f"(concurrency {concurrency}), {args.requests} requests per session per row, Envoy "
          f"polled every {args.poll_ms:g} ms")
    print("  ".join(h.rjust(widths[h]) for h in headers))
    for row in rows:
        print("  ".join(row[h].rjust(widths[h]) for h in headers))
    print(f"\nEnvoy: Lua loads logged {loads} (the default config, then one per ECDS reload); "
          f"other [lua]/warning/error lines: {len(envoy_log)}")
    for line in envoy_log[:10]:
        print(f"  {line[:200]}")
    print(f"control-plane log lines matching nack/reject/warning/error: {len(cp_log)}")
    for line in cp_log[:10]:
        print(f"  {line[:200]}")
    for note in notes:
        print(f"note: {note}")
    print(f"total {time.monotonic() - started:.0f} s; logs in {tmp}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--counts", default="0,1000,10000", help="pin counts, comma-separated")
    parser.add_argument("--endpoints", type=int, default=3)
    parser.add_argument("--requests", type=int, default=2000,
                        help="requests per session (pinned, unpinned) per row")
    parser.add_argument("--rounds", type=int, default=3,
                        help="tables written per N (each different), for the push/apply spread")
    parser.add_argument("--poll-ms", type=float, default=5.0)
    parser.add_argument("--apply-timeout", type=float, default=30.0)
    asyncio.run(main(parser.parse_args()))
