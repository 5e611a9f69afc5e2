"""Envoy CPU per request at 10 and 5,000 models, through the real stack, on this machine.

Starts a real etcd, control plane and Envoy (with hotpath's Lua filter) on free loopback
ports and one tiny upstream; for each model count, writes one pool with that many models,
then runs a bounded closed loop (``--concurrency`` requests in flight, ``--requests`` in all,
each for a random model of the pool) and reads Envoy's CPU time (utime + stime of
/proc/<pid>/stat) before and after. Everything binds 127.0.0.1.

    .venv/bin/python benchmarks/route_pick.py [--models 10 5000] [--requests 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.harness import Upstreams, async_wait_for, make_stack, new_etcd, wait_for  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # fields 14, 15 of stat(5)


async def load(url: str, models: list[str], requests: int, concurrency: int) -> int:
    """Closed loop: ``concurrency`` workers share ``requests``; returns the non-200 count."""
    remaining = requests
    failures = 0
    rng = random.Random(1)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as s:
        async def worker() -> None:
            nonlocal remaining, failures
            while remaining > 0:
                remaining -= 1
                body = {"model": rng.choice(models), "messages": [{"role": "user",
                                                                   "content": "hi"}]}
                async with s.post(f"{url}/v1/chat/completions", json=body,
                                  headers={"x-session-id": f"s{remaining % 1000}"}) as reply:
                    await reply.read()
                    failures += reply.status != 200
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return failures


async def main(counts: list[int], requests: int, concurrency: int) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        etcd = new_etcd(tmp)
        stack = make_stack(tmp, etcd.url, "/bench/")
        upstreams = Upstreams()
        try:
            port = await upstreams.add("u0")
            await stack.put("endpoints/p/u0", {"address": "127.0.0.1", "port": port})
            envoy = stack.envoy.process
            assert envoy is not None
            for count in counts:
                models = [f"acme-research/llama-3.1-70b-instruct-{i:05d}" for i in range(count)]
                await stack.put("pools/p", {"models": models})
                await stack.wait_listener()
                await asyncio.to_thread(wait_for, lambda: "u0" in stack.envoy.hosts("p"), 30,
                                        "the upstream")
                async def routed(last: str = models[-1]) -> bool:
                    return await load(stack.url, [last], 1, 1) == 0
                await async_wait_for(routed, 60, f"{count} models to route")
                await load(stack.url, models, min(2000, requests), concurrency)  # warm up
                before, start = cpu_seconds(envoy.pid), time.perf_counter()
                failures = await load(stack.url, models, requests, concurrency)
                cpu, wall = cpu_seconds(envoy.pid) - before, time.perf_counter() - start
                rows.append((count, cpu / requests * 1e6, requests / wall, failures))
        finally:
            await upstreams.close()
            stack.close()
            etcd.stop()
    print(f"{'models':>7s}  {'Envoy CPU/request':>18s}  {'requests/s':>10s}  failures")
    for count, us, rps, failures in rows:
        print(f"{count:7d}  {us:15.1f} us  {rps:10.0f}  {failures}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, nargs="+", default=[10, 5000])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    asyncio.run(main(args.models, args.requests, args.concurrency))
