"""The `hotpath` command: one parser, one exit-code map, subcommands loaded on demand.

Only the chosen subcommand's module is imported (``COMMANDS``), so `hotpath control-plane`
never loads the benchmark or the simulator. Every ``HotpathError`` ends in one line,
``hotpath: <message>``, and its class's exit code (errors.py); a bad flag is a UsageError
too. 130: interrupted before the command installed its own signal handling.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import NoReturn

import grpc
from etcd3aio import EtcdError

from control_plane.cli.options import setup_logging
from control_plane.errors import EtcdUnavailable, HotpathError, StartupError, UsageError
from control_plane.runtime.signals import run_until_stopped

log = logging.getLogger("hotpath")

# name -> (module defining COMMANDS[name], help)
COMMANDS: dict[str, tuple[str, str]] = {
    "up": ("serve", "run the whole stack on this machine (etcd, control plane, prober, "
                    "Envoy; simulated GPUs when no endpoint is configured)"),
    "control-plane": ("serve", "run the xDS control plane (etcd -> Envoy over ADS)"),
    "prober": ("serve", "keep endpoints warm with 1-token requests and report "
                        "warm/cold/down to etcd"),
    "register": ("serve", "keep a model server registered in a pool while it runs "
                          "(etcd lease)"),
    "bootstrap": ("serve", "print an Envoy bootstrap for hotpath"),
    "pool": ("config", "put, list or remove pools"),
    "endpoint": ("config", "put, list or remove endpoints"),
    "split": ("config", "put, list or remove session-sticky weighted splits of a model"),
    "apply": ("config", "make etcd match a YAML/JSON config file"),
    "export": ("config", "print pools and endpoints in apply's format"),
    "status": ("config", "pools, endpoints, warmth and Envoy's view"),
    "sim": ("sim", "run simulated OpenAI-compatible GPU model servers"),
    "bench": ("bench", "replay multi-turn chat sessions through routing strategies and "
                       "gateways, and report"),
}


class _Parser(argparse.ArgumentParser):
    """A bad flag is one line and exit code 2, like every other usage error."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see {self.prog} --help)")


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="hotpath",
        description="Session-affinity gateway for LLM model servers (Envoy + xDS + etcd).",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=_Parser)
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help) in COMMANDS.items():
        command = sub.add_parser(name, help=help, description=help)
        if name == wanted:
            importlib.import_module(f"control_plane.cli.{module}").COMMANDS[name](command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser(argv).parse_args(argv)
        setup_logging(args.verbose)
        return asyncio.run(run_until_stopped(
            lambda shutdown: args.handler(args, shutdown),
            watches_stop=getattr(args, "watches_stop", False)))
    except KeyboardInterrupt:
        return 130
    except HotpathError as exc:
        print(f"hotpath: {exc}", file=sys.stderr)
        return exc.exit_code
    except (ConnectionError, TimeoutError, EtcdError, grpc.aio.AioRpcError) as exc:
        etcd = EtcdUnavailable(f"etcd unreachable or refused the request "
                               f"({exc or type(exc).__name__})")
        print(f"hotpath: {etcd}", file=sys.stderr)
        return etcd.exit_code
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise
        error = StartupError(f"an address is already in use ({exc.strerror}): stop what "
                             "holds the port or choose another")
        print(f"hotpath: {error}", file=sys.stderr)
        return error.exit_code
