"""`hotpath sim`: simulated OpenAI-compatible GPU model servers."""

from __future__ import annotations

import argparse

from control_plane.runtime.signals import Shutdown
from control_plane.sim.server import add_sim_arguments, run_from_args


async def cmd_sim(args: argparse.Namespace, _: Shutdown) -> int:
    await run_from_args(args)
    return 0


def configure_sim(p: argparse.ArgumentParser) -> None:
    p.set_defaults(handler=cmd_sim)
    add_sim_arguments(p)


COMMANDS = {"sim": configure_sim}
