"""`hotpath bench`: the routing-strategy and gateway benchmark (imported only when run)."""

from __future__ import annotations

import argparse

from control_plane.bench.run import add_bench_arguments, run_bench_from_args
from control_plane.runtime.signals import Shutdown


async def cmd_bench(args: argparse.Namespace, _: Shutdown) -> int:
    return await run_bench_from_args(args)


def configure_bench(p: argparse.ArgumentParser) -> None:
    p.set_defaults(handler=cmd_bench)
    add_bench_arguments(p)


COMMANDS = {"bench": configure_bench}
