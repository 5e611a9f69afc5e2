"""Ring points per weight on the real Envoy: balance, keys moved, bounded-load pick cost.

Starts a real etcd, the control plane and one Envoy (tests/harness.py) on free loopback
ports, with in-process HTTP upstreams that answer with their name.

``balance`` (per ``--points`` value, one pool each, hash_balance_factor 0 so the ring alone
decides): 4 hosts of weight 1, ``--keys`` session keys through Envoy, then one host removed
and the same keys again. Reports each surviving host's share of the keys with 3 hosts
(max/min share ratio) and how many keys of the surviving hosts moved (must be 0).

``bounded``: one pool of ``--hosts`` hosts (127.0.x.y loopback addresses, one listening
socket each) and ``--requests`` requests with distinct keys at ``--concurrency``, with
hash_balance_factor 150 and with 0: Envoy's CPU per request (utime + stime of its process)
and the spread of hosts picked.

    .venv/bin/python benchmarks/ring_policy.py balance --points 16 64 128 256 1024
    .venv/bin/python benchmarks/ring_policy.py bounded --hosts 1000 --requests 4000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.harness import Stack, Upstreams, make_stack, new_etcd, wait_for  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


async def pick_all(url: str, model: str, keys: list[str], concurrency: int) -> dict[str, str]:
    """Session key -> the upstream that served it."""
    picked: dict[str, str] = {}
    queue = list(reversed(keys))
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            while queue:
                key = queue.pop()
                payload = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
                async with session.post(f"{url}/v1/chat/completions", json=payload,
                                        headers={"x-session-id": key}) as reply:
                    await reply.read()
                    picked[key] = reply.headers.get("x-served-by", f"status-{reply.status}")

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return picked


async def wait_hosts(stack: Stack, pool: str, count: int) -> None:
    await asyncio.to_thread(wait_for, lambda: len(stack.envoy.hosts(pool)) == count, 60,
                            f"Envoy to have {count} hosts in {pool}")
    await asyncio.sleep(0.5)  # the EDS update after CDS (ring size) has landed too


async def balance(stack: Stack, args: argparse.Namespace) -> list[tuple[Any, ...]]:
    upstreams = Upstreams()
    rows = []
    try:
        ports = {f"h{i}": await upstreams.add(f"h{i}") for i in range(4)}
        keys = [f"session-{n}" for n in range(args.keys)]
        for points in args.points:
            pool, model = f"r{points}", f"m{points}"
            await stack.put(f"pools/{pool}", {"models": [model], "hash_balance_factor": 0,
                                              "ring_points_per_weight": points})
            for name, port in ports.items():
                await stack.put(f"endpoints/{pool}/{name}",
                                {"address": "127.0.0.1", "port": port})
            await wait_hosts(stack, pool, 4)
            before = await pick_all(stack.url, model, keys, args.concurrency)
            await stack.delete(f"endpoints/{pool}/h3")
            await wait_hosts(stack, pool, 3)
            after = await pick_all(stack.url, model, keys, args.concurrency)
            shares = Counter(after.values())
            moved_survivors = sum(1 for k in keys if before[k] != "h3" and after[k] != before[k])
            survivor_keys = sum(1 for k in keys if before[k] != "h3")
            counts = [shares.get(f"h{i}", 0) for i in range(3)]
            rows.append((points, *counts, max(counts) / max(1, min(counts)),
                         f"{moved_survivors}/{survivor_keys}",
                         sum(1 for k in keys if before[k] == "h3")))
            print(rows[-1], flush=True)
    finally:
        await upstreams.close()
    return rows


async def loopback_upstreams(hosts: int, port: int) -> tuple[web.AppRunner, list[str]]:
    """One app, ``hosts`` listening sockets on 127.0.x.y:port (all of 127/8 is loopback)."""
    hits: Counter[str] = Counter()

    async def handle(request: web.Request) -> web.StreamResponse:
        await request.read()
        name = request.transport.get_extra_info("sockname")[0]  # type: ignore[union-attr]
        hits[name] += 1
        return web.json_response({"served_by": name}, headers={"x-served-by": name})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    addresses = [f"127.1.{i // 250}.{i % 250 + 1}" for i in range(hosts)]
    for address in addresses:
        await web.TCPSite(runner, address, port).start()
    return runner, addresses


async def bounded(stack: Stack, args: argparse.Namespace) -> list[tuple[Any, ...]]:
    port = 18500 + os.getpid() % 1000
    runner, addresses = await loopback_upstreams(args.hosts, port)
    envoy_pid = stack.envoy.process.pid  # type: ignore[union-attr]
    rows = []
    try:
        for factor in (150, 0):
            pool, model = f"b{factor}", f"bm{factor}"
            await stack.put(f"pools/{pool}", {"models": [model], "hash_balance_factor": factor,
                                              **({"ring_points_per_weight": args.ring_points}
                                                 if args.ring_points else {})})
            for start in range(0, len(addresses), 100):
                await asyncio.gather(*(
                    stack.put(f"endpoints/{pool}/e{n}", {"address": a, "port": port})
                    for n, a in enumerate(addresses[start:start + 100], start)))
            await wait_hosts(stack, pool, args.hosts)
        for round_ in range(args.rounds):
            for factor in (150, 0):
                model = f"bm{factor}"
                keys = [f"k{round_}-{n}" for n in range(args.requests)]
                await pick_all(stack.url, model, keys[:200], args.concurrency)  # warm up
                cpu0, t0 = cpu_s(envoy_pid), time.monotonic()
                picked = await pick_all(stack.url, model, keys, args.concurrency)
                elapsed = time.monotonic() - t0
                used = cpu_s(envoy_pid) - cpu0
                per_host = Counter(picked.values())
                rows.append((factor, round_, args.requests, f"{used / args.requests * 1e6:.0f}",
                             f"{args.requests / elapsed:.0f}", max(per_host.values()),
                             len(per_host)))
                print(rows[-1], flush=True)
    finally:
        await runner.cleanup()
    return rows


async def main(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="hotpath-ring-"))
    etcd = new_etcd(tmp)
    stack = make_stack(tmp, etcd.url, "/ring/")
    try:
        await stack.wait_listener()
        if args.command == "balance":
            rows = await balance(stack, args)
            print(f"\n3 hosts of weight 1 (4, then one removed), {args.keys} keys, "
                  "hash_balance_factor 0")
            print("| points/weight | h0 | h1 | h2 | max/min share | survivors' keys moved "
                  "| keys of the removed host |")
            print("|---|---|---|---|---|---|---|")
            for p, a, b, c, ratio, moved, gone in rows:
                print(f"| {p} | {a} | {b} | {c} | {ratio:.3f} | {moved} | {gone} |")
        else:
            rows = await bounded(stack, args)
            print(f"\n{args.hosts} hosts, {args.requests} requests per round at concurrency "
                  f"{args.concurrency}")
            print("| hash_balance_factor | round | requests | Envoy CPU per request (us) "
                  "| requests/s | most on one host | hosts used |")
            print("|---|---|---|---|---|---|---|")
            for row in rows:
                print("| " + " | ".join(str(x) for x in row) + " |")
    finally:
        stack.close()
        etcd.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("balance", help="share and keys moved per ring_points_per_weight")
    b.add_argument("--points", type=int, nargs="+", default=[16, 64, 128, 256, 1024])
    b.add_argument("--keys", type=int, default=10_000)
    b.add_argument("--concurrency", type=int, default=32)
    c = sub.add_parser("bounded", help="Envoy CPU per request, hash_balance_factor 150 vs 0")
    c.add_argument("--hosts", type=int, default=1000)
    c.add_argument("--requests", type=int, default=4000)
    c.add_argument("--concurrency", type=int, default=32)
    c.add_argument("--rounds", type=int, default=2)
    c.add_argument("--ring-points", type=int, default=None)
    asyncio.run(main(parser.parse_args()))
