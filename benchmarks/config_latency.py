"""Time from an etcd write to Envoy having applied it (p50/p99), on this machine.

Starts a real etcd, control plane and Envoy on free loopback ports, then 100 times: writes
one new endpoint to etcd and polls Envoy's admin until the host is in the cluster. Also
times a pool change (a new model: RDS) the same way.

    .venv/bin/python benchmarks/config_latency.py [--rounds 100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.harness import make_stack, new_etcd, wait_for  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def route_models(admin: str) -> set[str]:
    with urllib.request.urlopen(f"{admin}/config_dump?resource=dynamic_route_configs",
                                timeout=5) as reply:
        dump = json.load(reply)
    names = set()
    for config in dump.get("configs", []):
        for vhost in config.get("route_config", {}).get("virtual_hosts", []):
            names |= {r.get("name", "") for r in vhost.get("routes", [])}
    return names


async def main(rounds: int) -> None:
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        etcd = new_etcd(tmp)
        stack = make_stack(tmp, etcd.url, "/bench/")
        try:
            await stack.put("pools/p", {"models": ["m"]})
            await asyncio.to_thread(wait_for, lambda: "p/m" in route_models(stack.envoy.admin_url),
                                    30, "the pool")
            endpoint_ms: list[float] = []
            for index in range(rounds):
                name = f"e{index}"
                start = time.perf_counter()
                await stack.put(f"endpoints/p/{name}",
                                {"address": "127.0.0.1", "port": 20000 + index})
                await asyncio.to_thread(wait_for, lambda n=name: n in stack.envoy.hosts("p"),
                                        30, name, 0.001)
                endpoint_ms.append((time.perf_counter() - start) * 1000)
            model_ms: list[float] = []
            for index in range(max(10, rounds // 5)):
                start = time.perf_counter()
                await stack.put("pools/p", {"models": ["m", f"m{index}"]})
                await asyncio.to_thread(
                    wait_for, lambda i=index: f"p/m{i}" in route_models(stack.envoy.admin_url),
                    30, f"model m{index}", 0.001)
                model_ms.append((time.perf_counter() - start) * 1000)
        finally:
            stack.close()
            etcd.stop()
    for label, values in (("endpoint added (CDS+EDS)", endpoint_ms),
                          ("model added (RDS)", model_ms)):
        print(f"{label:26s} n={len(values):3d}  p50 {statistics.median(values):6.1f} ms  "
              f"p99 {percentile(values, 0.99):6.1f} ms  max {max(values):6.1f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=100)
    asyncio.run(main(parser.parse_args().rounds))
