"""Fleet scale: pools x endpoints, N simulated ADS clients, churn; optionally a real Envoy.

Starts a real etcd and the control plane (a child process, so its CPU is its own) on free
loopback ports, writes ``--pools`` pools of ``--endpoints`` endpoints, connects
``--clients`` simulated SotW ADS clients (grpc streams that subscribe to CDS, every EDS,
LDS and RDS and ACK every response) and, with ``--envoy``, one real Envoy. Then:

- ``--changes`` single endpoint weight changes, one at a time: time until every client got
  its EDS response, bytes per client, control-plane CPU per change, Envoy's apply time
  (its ``cluster.<pool>.update_success`` moved and nothing is warming);
- idle control-plane CPU over ``--idle-s`` seconds with nothing changing;
- with ``--churn N``: N weight changes per second on pool p0 for ``--churn-s`` seconds,
  then how long after the last write Envoy's hosts match etcd, and how many cluster (CDS)
  and host-set updates Envoy took meanwhile (a weight change should be EDS only: the
  control plane keeps the minimum ring size while it still fits, translate/clusters.py).
  ``--start-weights random`` starts from weights 1-4 instead of all 1.

``--ring-points P`` writes every pool with ``ring_points_per_weight`` P (Envoy's memory and
apply time scale with it); ``--delta`` gives the real Envoy a DELTA_GRPC bootstrap (the
simulated clients stay SotW), and the bytes Envoy received from the control plane per change
(its ``cluster.hotpath_xds.upstream_cx_rx_bytes_total``) are reported either way.

``--prober-s S`` starts the real prober (no election) once everything is loaded, waits until
every endpoint has a status, then counts etcd revisions over S seconds: the prober's steady
status writes per second (docs/scale.md compares them with the rule's N / refresh period).
The endpoints are then one in-process upstream listening on 127.1.x.y (one socket each),
so every status is ``warm``; the refresh rule is the same for every state. Use one pool.

    .venv/bin/python benchmarks/scale.py --pools 10 --endpoints 1000 --clients 10 --envoy
    .venv/bin/python benchmarks/scale.py --pools 1 --endpoints 1000 --clients 1 --envoy \\
        --changes 0 --churn 20 --churn-s 30
    .venv/bin/python benchmarks/scale.py --pools 10 --endpoints 1000 --clients 1 --envoy \\
        --ring-points 256 --delta --idle-s 0
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from envoy.service.discovery.v3 import discovery_pb2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from control_plane.runtime import processes  # noqa: E402
from control_plane.runtime.bootstrap import BootstrapSettings, render_bootstrap  # noqa: E402
from control_plane.runtime.envoy_admin import parse_clusters  # noqa: E402
from control_plane.store.etcd import (  # noqa: E402
    EtcdSettings,
    etcd_client,
    list_entries,
    put_json,
)
from control_plane.xds import types  # noqa: E402
from tests.harness import EnvoyProcess, make_stack, new_etcd, start, stop, wait_for  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
ADS = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@dataclass
class Client:
    """One simulated Envoy: subscribes to everything, ACKs everything."""

    channel: grpc.aio.Channel
    name: str
    received: list[tuple[float, str, int]] = field(default_factory=list)  # time, type, bytes
    ready: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        call: Any = self.channel.stream_stream(
            ADS, request_serializer=discovery_pb2.DiscoveryRequest.SerializeToString,
            response_deserializer=lambda raw: raw)()
        first = discovery_pb2.DiscoveryRequest(type_url=types.CLUSTER)
        first.node.id = self.name
        await call.write(first)
        await call.write(discovery_pb2.DiscoveryRequest(type_url=types.LISTENER))
        eds_names: list[str] = []
        while True:
            raw = await call.read()
            if raw is grpc.aio.EOF:
                return
            now = time.monotonic()
            reply = discovery_pb2.DiscoveryResponse.FromString(raw)
            self.received.append((now, reply.type_url, len(raw)))
            names: list[str] = []
            if reply.type_url == types.CLUSTER:
                # Cluster names without unpacking: hotpath names clusters after pools.
                names_now = sorted(_cluster_name(a.value) for a in reply.resources)
                await call.write(discovery_pb2.DiscoveryRequest(
                    type_url=types.CLUSTER, version_info=reply.version_info,
                    response_nonce=reply.nonce))
                if names_now != eds_names:
                    eds_names = names_now
                    await call.write(discovery_pb2.DiscoveryRequest(
                        type_url=types.ENDPOINT, resource_names=eds_names))
                continue
            if reply.type_url == types.ENDPOINT:
                names = eds_names
                self.ready.set()
            elif reply.type_url == types.ROUTE:
                names = ["hotpath"]
            elif reply.type_url == types.LISTENER:
                await call.write(discovery_pb2.DiscoveryRequest(
                    type_url=types.ROUTE, resource_names=["hotpath"]))
            await call.write(discovery_pb2.DiscoveryRequest(
                type_url=reply.type_url, version_info=reply.version_info,
                response_nonce=reply.nonce, resource_names=names))


def _cluster_name(value: bytes) -> str:
    # Cluster.name is field 1 (length-delimited); builders always set it first.
    assert value[0] == 0x0A
    length, pos = 0, 1
    shift = 0
    while True:
        byte = value[pos]
        length |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            break
        shift += 7
    return value[pos:pos + length].decode()


class BenchEnvoy(EnvoyProcess):
    """The harness's Envoy with the ADS flavour chosen (``delta``)."""

    delta = False

    def start(self) -> None:
        bootstrap = self.tmp / f"{self.name}-bootstrap.yaml"
        bootstrap.write_text(render_bootstrap(BootstrapSettings(
            node_id=self.name, xds_port=self.xds_port, admin_port=0, delta=self.delta)))
        address_path = self.tmp / f"{self.name}-admin.txt"
        address_path.unlink(missing_ok=True)
        self.process = processes.spawn(processes.envoy_command(bootstrap, address_path, "info"),
                                       self.tmp / f"{self.name}.log")
        address = wait_for(lambda: address_path.exists() and address_path.read_text().strip(),
                           30, "envoy admin address")
        self.admin_url = f"http://{address}"


XDS_RX = "cluster.hotpath_xds.upstream_cx_rx_bytes_total"
# Clusters replaced through CDS (each one warmed again before it takes over).
CLUSTER_MODIFIED = "cluster_manager.cluster_modified"


def envoy_stats(admin: str, names: list[str]) -> dict[str, int]:
    pattern = "|".join(f"^{n}$" for n in names)
    with urllib.request.urlopen(f"{admin}/stats?filter={pattern}", timeout=5) as reply:
        text = reply.read().decode()
    found = {}
    for line in text.splitlines():
        key, _, value = line.partition(": ")
        if value.strip().lstrip("-").isdigit():
            found[key] = int(value)
    return found


def envoy_weights(admin: str, pool: str) -> dict[str, int]:
    with urllib.request.urlopen(f"{admin}/clusters?format=json", timeout=10) as reply:
        import json

        data = json.load(reply)
    return {h.hostname: h.weight for h in parse_clusters(data) if h.cluster == pool}


async def prober_writes(client: Any, settings: EtcdSettings, etcd_url: str, tmp: Path,
                        endpoints: int, seconds: float) -> list[tuple[str, str]]:
    """The real prober's steady status writes: etcd revisions per second."""
    prober = start([sys.executable, "-m", "control_plane", "-v", "prober", "--etcd", etcd_url,
                    "--prefix", settings.prefix, "--no-election", "--metrics", "off"],
                   tmp / "prober.log")
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            _, entries = await list_entries(client, settings, "status/")
            if len(entries) >= endpoints:
                break
            await asyncio.sleep(1)
        started = time.monotonic()
        # Past the first refresh of every record (records were first written over ~1 s).
        await asyncio.sleep(20)
        rev0, _ = await list_entries(client, settings, "status/")
        cpu0, t0 = cpu_s(prober.pid), time.monotonic()
        await asyncio.sleep(seconds)
        rev1, _ = await list_entries(client, settings, "status/")
        elapsed = time.monotonic() - t0
        return [(f"prober: status writes/s over {seconds:.0f} s ({endpoints} endpoints, "
                 f"from {t0 - started:.0f} s after all had one)",
                 f"{(rev1 - rev0) / elapsed:.1f}"),
                ("prober: CPU (% of one core)",
                 f"{(cpu_s(prober.pid) - cpu0) / elapsed * 100:.0f}")]
    finally:
        stop(prober)


async def main(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="hotpath-scale-"))
    etcd = new_etcd(tmp)
    prefix = "/scale/"
    settings = EtcdSettings(urls=etcd.url, prefix=prefix)
    stack = make_stack(tmp, etcd.url, prefix, envoys=0)
    if args.envoy:
        envoy = BenchEnvoy(tmp, "envoy-0", stack.control_plane.xds_port)
        envoy.delta = args.delta
        stack.envoys.append(envoy)
        envoy.start()
    pool_value: dict[str, Any] = {}
    if args.ring_points is not None:
        pool_value["ring_points_per_weight"] = args.ring_points
    if args.hash_balance_factor is not None:
        pool_value["hash_balance_factor"] = args.hash_balance_factor
    if args.prober_s:
        pool_value["warmup"] = {"timeout_s": 1}
    cp_pid = stack.control_plane.process.pid  # type: ignore[union-attr]
    weights: dict[tuple[str, str], int] = {}
    rows: list[tuple[str, str]] = []
    try:
        async with etcd_client(settings) as client:
            for p in range(args.pools):
                await put_json(client, settings, f"pools/p{p}", {"models": [f"m{p}"], **pool_value})
            keys = [(f"p{p}", f"e{i}") for p in range(args.pools) for i in range(args.endpoints)]
            # Loopback addresses only (127.0.0.0/8): nothing here may ever reach another host,
            # whatever later sends traffic to an endpoint (Envoy, a prober).
            address = {"address": lambda p, i: f"127.{10 + p // 250}.{p % 250}.{i % 250 + 1}",
                       "port": lambda p, i: 8000 + i // 250}
            if args.prober_s:
                # Answering upstreams for the prober: one socket per endpoint, 127.1.x.y.
                from ring_policy import loopback_upstreams

                upstream_port = 18500 + os.getpid() % 1000
                runner, _ = await loopback_upstreams(args.endpoints, upstream_port)
                address = {"address": lambda p, i: f"127.1.{i // 250}.{i % 250 + 1}",
                           "port": lambda p, i: upstream_port}
            # --start-weights random: weights 1-4 from the start, so --churn is a random walk
            # of the total weight (from all 1 it drifts up by ~1.5 per write).
            start_rng = random.Random(11)
            weights = {key: start_rng.randint(1, 4) if args.start_weights == "random" else 1
                       for key in keys}
            for start in range(0, len(keys), 200):
                await asyncio.gather(*(
                    put_json(client, settings, f"endpoints/{pool}/{eid}",
                             {"address": address["address"](p, i),
                              "port": address["port"](p, i),
                              "weight": weights[(pool, eid)]})
                    for n, (pool, eid) in enumerate(keys[start:start + 200])
                    for p, i in [divmod(start + n, args.endpoints)]))
            channels = [grpc.aio.insecure_channel(
                f"127.0.0.1:{stack.control_plane.xds_port}",
                options=[("grpc.use_local_subchannel_pool", 1),
                         ("grpc.max_receive_message_length", 256 * 1024 * 1024)])
                for _ in range(args.clients)]
            clients = [Client(ch, f"sim-{n}") for n, ch in enumerate(channels)]
            tasks = [asyncio.create_task(c.run()) for c in clients]
            await asyncio.wait_for(asyncio.gather(*(c.ready.wait() for c in clients)), 120)
            admin = stack.envoy.admin_url if args.envoy else ""
            if args.envoy:
                await asyncio.to_thread(
                    wait_for, lambda: len(envoy_weights(admin, "p0")) == args.endpoints, 120,
                    "Envoy to have every host")
            # Caught up: every client has heard nothing for 2 s (the control plane follows
            # the 10,000 writes above for a while after they are done).
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                newest = max(c.received[-1][0] for c in clients)
                if time.monotonic() - newest > 2:
                    break
                await asyncio.sleep(0.2)

            if args.envoy:
                rows.append(("Envoy RSS after the initial load (MiB)",
                             f"{rss_mib(stack.envoy.process.pid):.0f}"))  # type: ignore[union-attr]
            if args.prober_s:
                rows += await prober_writes(client, settings, etcd.url, tmp, len(keys),
                                            args.prober_s)
                await runner.cleanup()
            latencies, volumes, cpus, applies, envoy_rx = [], [], [], [], []
            for n in range(args.changes):
                key = ("p0", f"e{n % args.endpoints}")
                weights[key] = 2 if weights[key] == 1 else 1
                stat_names = ["cluster.p0.update_success", "cluster_manager.warming_clusters",
                              XDS_RX]
                before_stats = envoy_stats(admin, stat_names) if args.envoy else {}
                marks = [len(c.received) for c in clients]
                cpu0 = cpu_s(cp_pid)
                t0 = time.monotonic()
                await put_json(client, settings, f"endpoints/{key[0]}/{key[1]}",
                               {"address": f"127.10.0.{int(key[1][1:]) % 250 + 1}",
                                "port": 8000 + int(key[1][1:]) // 250,
                                "weight": weights[key]})
                applied = None
                deadline = t0 + 30
                while time.monotonic() < deadline:
                    done = all(any(t == types.ENDPOINT for _, t, _ in c.received[m:])
                               for c, m in zip(clients, marks, strict=True))
                    if args.envoy and applied is None:
                        now_stats = await asyncio.to_thread(envoy_stats, admin, stat_names)
                        if (now_stats.get("cluster.p0.update_success", 0)
                                > before_stats.get("cluster.p0.update_success", 0)
                                and now_stats.get("cluster_manager.warming_clusters") == 0):
                            applied = time.monotonic() - t0
                    if done and (applied is not None or not args.envoy):
                        break
                    await asyncio.sleep(0.002)
                last = max(next(t for t, kind, _ in c.received[m:] if kind == types.ENDPOINT)
                           for c, m in zip(clients, marks, strict=True))
                latencies.append(last - t0)
                await asyncio.sleep(1.0)  # every follow-up response (re-requests) arrives
                volumes.append(statistics.mean(sum(b for _, _, b in c.received[m:])
                                               for c, m in zip(clients, marks, strict=True)))
                cpus.append(cpu_s(cp_pid) - cpu0)
                if args.envoy:
                    after = await asyncio.to_thread(envoy_stats, admin, [XDS_RX])
                    envoy_rx.append(after.get(XDS_RX, 0) - before_stats.get(XDS_RX, 0))
                if applied is not None:
                    applies.append(applied)
            if latencies:
                rows.append(("one change -> all clients (median / max ms)",
                             f"{statistics.median(latencies) * 1000:.0f} / "
                             f"{max(latencies) * 1000:.0f}"))
                rows.append(("bytes per client per change (KiB)",
                             f"{statistics.median(volumes) / 1024:.1f}"))
                rows.append(("control-plane CPU per change (ms, incl. 1 s after)",
                             f"{statistics.median(cpus) * 1000:.0f}"))
            if applies:
                rows.append(("Envoy applied (median / max ms)",
                             f"{statistics.median(applies) * 1000:.0f} / "
                             f"{max(applies) * 1000:.0f}"))
            if envoy_rx:
                rows.append(("bytes Envoy received per change (KiB, ADS "
                             f"{'delta' if args.delta else 'SotW'})",
                             f"{statistics.median(envoy_rx) / 1024:.1f}"))

            if args.idle_s > 0:
                cpu0, t0 = cpu_s(cp_pid), time.monotonic()
                await asyncio.sleep(args.idle_s)
                rows.append((f"idle control-plane CPU over {args.idle_s:.0f} s (%)",
                             f"{(cpu_s(cp_pid) - cpu0) / (time.monotonic() - t0) * 100:.2f}"))

            if args.churn:
                rng = random.Random(7)
                pool_keys = [k for k in keys if k[0] == "p0"]
                churn_stats = [CLUSTER_MODIFIED, "cluster.p0.update_success"]
                stats0 = (await asyncio.to_thread(envoy_stats, admin, churn_stats)
                          if args.envoy else {})
                cpu0 = cpu_s(cp_pid)
                start = time.monotonic()
                n = 0
                while time.monotonic() - start < args.churn_s:
                    key = rng.choice(pool_keys)
                    weights[key] = rng.randint(1, 4)
                    i = int(key[1][1:])
                    await put_json(client, settings, f"endpoints/{key[0]}/{key[1]}",
                                   {"address": f"127.10.0.{i % 250 + 1}",
                                    "port": 8000 + i // 250,
                                    "weight": weights[key]})
                    n += 1
                    await asyncio.sleep(max(0.0, start + n / args.churn - time.monotonic()))
                last_write = time.monotonic()
                rows.append((f"churn: writes at {args.churn}/s for {args.churn_s:.0f} s", str(n)))
                if args.envoy:
                    expected = {eid: w for (pool, eid), w in weights.items() if pool == "p0"}
                    await asyncio.to_thread(
                        wait_for, lambda: envoy_weights(admin, "p0") == expected, 60,
                        "Envoy to match etcd", 0.05)
                    rows.append(("churn: Envoy matches etcd after the last write (ms)",
                                 f"{(time.monotonic() - last_write) * 1000:.0f}"))
                    stats1 = await asyncio.to_thread(envoy_stats, admin, churn_stats)
                    delta = {k: stats1.get(k, 0) - stats0.get(k, 0) for k in churn_stats}
                    rows.append(("churn: cluster updates Envoy took (CDS, cluster_modified)",
                                 str(delta[CLUSTER_MODIFIED])))
                    rows.append(("churn: host-set updates Envoy took (p0 update_success)",
                                 str(delta["cluster.p0.update_success"])))
                rows.append(("churn: control-plane CPU (% of one core)",
                             f"{(cpu_s(cp_pid) - cpu0) / (time.monotonic() - start) * 100:.0f}"))
            if args.envoy:
                rows.append(("Envoy RSS (MiB)",
                             f"{rss_mib(stack.envoy.process.pid):.0f}"))  # type: ignore[union-attr]
            for task in tasks:
                task.cancel()
            for ch in channels:
                await ch.close()
    finally:
        stack.close()
        etcd.stop()
    title = (f"{args.pools} pools x {args.endpoints} endpoints, {args.clients} clients"
             + (f", real Envoy ({'delta' if args.delta else 'SotW'})" if args.envoy else "")
             + (f", ring_points_per_weight {args.ring_points}" if args.ring_points else ""))
    width = max(len(r[0]) for r in rows)
    print(f"\n{title}\n" + "\n".join(f"  {k:<{width}}  {v}" for k, v in rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pools", type=int, default=10)
    parser.add_argument("--endpoints", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--changes", type=int, default=5)
    parser.add_argument("--envoy", action="store_true", help="attach one real Envoy")
    parser.add_argument("--idle-s", type=float, default=10.0)
    parser.add_argument("--churn", type=int, default=0, help="writes per second on pool p0")
    parser.add_argument("--churn-s", type=float, default=30.0)
    parser.add_argument("--start-weights", choices=["1", "random"], default="1",
                        help="endpoint weights before the churn: all 1, or random 1-4")
    parser.add_argument("--ring-points", type=int, default=None,
                        help="ring_points_per_weight of every pool (default: hotpath's)")
    parser.add_argument("--hash-balance-factor", type=int, default=None)
    parser.add_argument("--prober-s", type=float, default=0.0,
                        help="run the real prober and count its status writes over this long")
    parser.add_argument("--delta", action="store_true",
                        help="the real Envoy uses delta ADS (DELTA_GRPC)")
    asyncio.run(main(parser.parse_args()))
