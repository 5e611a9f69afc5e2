"""Nothing lost, nothing reshuffled: the fault scenarios with larger loads, as a table.

Runs, on free loopback ports with real etcd, control plane and Envoy processes, the
scenarios of tests/integration/test_faults_load.py:

1. the control plane SIGKILLed under load and restarted on the same xDS port,
2. etcd SIGKILLed under load and restarted (a private etcd),
3. an upstream SIGKILLed with SSE streams in flight (hash_balance_factor 0),

and prints requests sent/failed during each fault, survivor sessions moved, Envoy's
reconnect time after the control-plane restart and the time from etcd's return to a change
applied.

    .venv/bin/python benchmarks/faults.py [--clients 16] [--sessions 300]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.harness import Upstreams, make_stack, new_etcd  # noqa: E402
from tests.integration.test_faults_load import (  # noqa: E402
    SseServers,
    control_plane_kill,
    etcd_outage,
    upstream_death,
)


async def run(args: argparse.Namespace) -> list[tuple[str, str, str, str, str]]:
    rows: list[tuple[str, str, str, str, str]] = []
    with tempfile.TemporaryDirectory(prefix="hotpath-faults-") as folder:
        tmp = Path(folder)
        for name in ("shared", "cp", "etcd", "stream"):
            (tmp / name).mkdir()
        shared = new_etcd(tmp / "shared")
        try:
            stack = make_stack(tmp / "cp", shared.url, "/bench-cp/")
            upstreams = Upstreams()
            try:
                cp: dict[str, Any] = await control_plane_kill(
                    stack, upstreams, args.clients, args.cp_outage, args.max_requests)
            finally:
                stack.close()
                await upstreams.close()
            rows.append((
                f"control plane SIGKILLed {cp['outage_s']:.1f} s",
                f"{cp['sent']} ({cp['during_outage']} during)", str(cp["failed"]), "-",
                f"Envoy reconnect {cp['reconnect_s']:.2f} s, new pool routable "
                f"{cp['routable_s']:.2f} s after restart"))
            upstreams = Upstreams()
            try:
                et: dict[str, Any] = await etcd_outage(
                    tmp / "etcd", upstreams, args.clients, args.etcd_outage, args.max_requests)
            finally:
                await upstreams.close()
            rows.append((
                f"etcd SIGKILLed {et['outage_s']:.1f} s",
                f"{et['sent']} ({et['during_outage']} during)", str(et["failed"]), "-",
                f"change applied {et['applied_s']:.2f} s after etcd returned"))
            stack = make_stack(tmp / "stream", shared.url, "/bench-stream/")
            servers = SseServers(tmp / "stream", chunks=args.chunks)
            try:
                up: dict[str, Any] = await upstream_death(stack, servers, args.sessions)
            finally:
                stack.close()
                await asyncio.to_thread(servers.close)
            unexpected = (len(up["failed_not_in_flight"]) + len(up["after_failed"])
                          + len(up["misplaced"]))
            rows.append((
                f"upstream SIGKILLed, {args.sessions} streams open",
                f"{args.sessions} streams + {args.sessions} after",
                f"{up['failed']} (all in flight on it; {unexpected} others)",
                f"{up['survivors_moved']}/{up['survivor_streams']}",
                f"placement {up['placement']}; its sessions to {up['orphans_to']}; "
                f"{args.sessions} requests after the kill in {up['after_s']:.2f} s"))
            for label, figures in (("control plane", cp), ("etcd", et)):
                for error in figures["errors"]:
                    print(f"{label}: {error}", file=sys.stderr)
        finally:
            shared.stop()
    return rows


def table(rows: list[tuple[str, str, str, str, str]]) -> str:
    headers = ("fault", "requests sent", "failed", "survivors moved", "notes")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
              for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16, help="concurrent load clients")
    parser.add_argument("--max-requests", type=int, default=500_000,
                        help="upper bound on the requests of one load")
    parser.add_argument("--cp-outage", type=float, default=5.0,
                        help="seconds the control plane stays down")
    parser.add_argument("--etcd-outage", type=float, default=10.0,
                        help="seconds etcd stays down")
    parser.add_argument("--sessions", type=int, default=300,
                        help="SSE sessions open when the upstream dies")
    parser.add_argument("--chunks", type=int, default=50,
                        help="chunks per stream, one every 100 ms")
    args = parser.parse_args()
    print(table(asyncio.run(run(args))))


if __name__ == "__main__":
    main()
