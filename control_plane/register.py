"""`hotpath register`: keep one endpoint in etcd, under a lease, while a model server lives.

How a registration ends:

- this process is killed (SIGKILL, OOM, node loss): nobody keeps the lease alive and etcd
  deletes the key within ``--ttl`` seconds;
- SIGTERM or SIGINT: deregister first (revoke the lease, so Envoy stops sending new
  requests), wait ``--drain-s`` so in-flight streams finish, then SIGTERM the wrapped
  command and wait for it; a second signal cuts the drain short;
- the wrapped command exits on its own: deregister, then exit with its status.

Wrapper mode (``-- COMMAND ...``) starts the model server as a child in a session of its
own, so a terminal's Ctrl-C reaches only this process and the server keeps serving through
the drain; the child gets SIGTERM if this process dies (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import logging
import os
import shlex
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from control_plane.model import ConfigError, endpoint_to_json, parse_endpoint
from control_plane.store.etcd import EtcdSettings, EtcdSettingsError, hold_under_lease

log = logging.getLogger("hotpath.register")

# etcd's smallest lease is 1.5 election timeouts (1.5 s with default settings).
MIN_TTL_S = 2
HEALTH_POLL_S = 0.5
PR_SET_PDEATHSIG = 1


class HealthTimeout(RuntimeError):
    """--wait-healthy gave up: the server never answered 200."""


@dataclass(frozen=True)
class Registration:
    """One endpoint to hold in etcd, and how to run and stop its server."""

    pool: str
    id: str
    value: dict[str, Any]
    ttl: int = 10
    drain_s: float = 10.0
    wait_healthy: str | None = None
    wait_timeout_s: float | None = None
    stop_timeout_s: float = 20.0
    command: tuple[str, ...] = field(default=())

    @property
    def key(self) -> str:
        return f"endpoints/{self.pool}/{self.id}"


def registration_from_args(args: argparse.Namespace) -> Registration:
    """Validates the endpoint exactly as the control plane will (ConfigError otherwise)."""
    key = f"endpoints/{args.pool}/{args.id}"
    value: dict[str, Any] = {"address": args.address, "port": args.port}
    if args.weight is not None:
        value["weight"] = args.weight
    endpoint = parse_endpoint(key, args.pool, args.id, json.dumps(value))
    command = list(args.command)
    if command[:1] == ["--"]:  # argparse keeps the separator for this kind of positional
        command = command[1:]
    return Registration(pool=args.pool, id=args.id, value=endpoint_to_json(endpoint),
                        ttl=args.ttl, drain_s=args.drain_s, wait_healthy=args.wait_healthy,
                        wait_timeout_s=args.wait_timeout, stop_timeout_s=args.stop_timeout,
                        command=tuple(command))


class _Signals:
    """The first SIGTERM/SIGINT asks for a graceful stop; the next one cuts the drain short."""

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.hurry = asyncio.Event()

    def fire(self) -> None:
        if self.stop.is_set():
            self.hurry.set()
        self.stop.set()


async def _race(**waits: Awaitable[Any]) -> str:
    """Wait until one of ``waits`` finishes, cancel the others; the first finisher's name
    (in argument order when several finish together). Its exception, if any, propagates."""
    tasks = {name: asyncio.ensure_future(wait) for name, wait in waits.items()}
    try:
        await asyncio.wait(tasks.values(), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
    for name, task in tasks.items():
        if task.done() and not task.cancelled():
            task.result()
            return name
    raise AssertionError("asyncio.wait returned with nothing done")


def _die_with(parent_pid: int) -> Callable[[], None]:
    """preexec_fn: SIGTERM the child when we die. Compares with our pid rather than 1,
    because in a container without an init this process is pid 1."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None

    def preexec() -> None:
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent_pid:  # we died before prctl took effect
            os._exit(1)

    return preexec


async def _child_exit(child: asyncio.subprocess.Process | None) -> None:
    if child is None:
        await asyncio.get_running_loop().create_future()  # no child: never exits
    else:
        await child.wait()


def _exit_status(child: asyncio.subprocess.Process) -> int:
    code = child.returncode
    assert code is not None
    # As a shell reports it: killed by signal N -> 128 + N.
    return 128 - code if code < 0 else code


async def wait_healthy(url: str, timeout_s: float | None) -> None:
    """Poll ``url`` until it answers 200; HealthTimeout after ``timeout_s`` (None: forever)."""
    loop = asyncio.get_running_loop()
    deadline = None if timeout_s is None else loop.time() + timeout_s
    last = "no answer yet"
    log.info("waiting for %s to answer 200 before registering", url)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while True:
            try:
                async with session.get(url) as reply:
                    if reply.status == 200:
                        return
                    last = f"HTTP {reply.status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                last = str(exc) or type(exc).__name__
            if deadline is not None and loop.time() >= deadline:
                raise HealthTimeout(f"{url} did not answer 200 within {timeout_s:g}s "
                                    f"(last: {last})")
            await asyncio.sleep(HEALTH_POLL_S)


async def _stop_child(child: asyncio.subprocess.Process | None, timeout_s: float) -> int:
    """SIGTERM the wrapped command, SIGKILL its whole session after ``timeout_s``."""
    if child is None:
        return 0
    if child.returncode is None:
        log.info("stopping the command (SIGTERM to pid %d)", child.pid)
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(child.wait(), timeout_s)
        except TimeoutError:
            log.warning("command still running %gs after SIGTERM; killing it", timeout_s)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)  # its session: no orphaned workers
            await child.wait()
    status = _exit_status(child)
    log.info("command exited with status %d", status)
    return status


async def _announce(registered: asyncio.Event, settings: EtcdSettings,
                    registration: Registration) -> None:
    await registered.wait()
    value = registration.value
    log.info("registered %s%s -> %s:%s (lease ttl %ds)", settings.prefix, registration.key,
             value["address"], value["port"], registration.ttl)


async def _hold(settings: EtcdSettings, registration: Registration,
                child: asyncio.subprocess.Process | None, signals: _Signals) -> int:
    registered = asyncio.Event()
    holder = asyncio.create_task(hold_under_lease(
        settings, [(registration.key, registration.value)], registration.ttl, registered))
    announce = asyncio.create_task(_announce(registered, settings, registration))
    try:
        first = await _race(exited=_child_exit(child), stop=signals.stop.wait())
    finally:
        announce.cancel()
        # Cancelling the holder revokes the lease: the key goes now, not after the TTL.
        holder.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await holder
        log.info("deregistered %s%s", settings.prefix, registration.key)
    if first == "exited":
        assert child is not None
        status = _exit_status(child)
        log.warning("command exited with status %d; deregistered first", status)
        return status
    log.info("draining for %gs so in-flight requests finish (signal again to skip)",
             registration.drain_s)
    await _race(exited=_child_exit(child), hurry=signals.hurry.wait(),
                drained=asyncio.sleep(registration.drain_s))
    return await _stop_child(child, registration.stop_timeout_s)


async def run_register(settings: EtcdSettings, registration: Registration) -> int:
    """Run (optionally) the command, register once healthy, deregister and drain on stop."""
    loop = asyncio.get_running_loop()
    signals = _Signals()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, signals.fire)
    child: asyncio.subprocess.Process | None = None
    try:
        if registration.command:
            child = await asyncio.create_subprocess_exec(
                *registration.command, start_new_session=True,
                preexec_fn=_die_with(os.getpid()))
            log.info("started %s (pid %d)", shlex.join(registration.command), child.pid)
        if registration.wait_healthy is not None:
            try:
                first = await _race(
                    exited=_child_exit(child), stop=signals.stop.wait(),
                    healthy=wait_healthy(registration.wait_healthy, registration.wait_timeout_s))
            except HealthTimeout as exc:
                log.error("%s; not registering", exc)
                await _stop_child(child, registration.stop_timeout_s)
                return 1
            if first == "exited":
                assert child is not None
                log.error("command exited with status %d before it was healthy",
                          _exit_status(child))
                return _exit_status(child)
            if first == "stop":  # never registered: nothing to drain
                return await _stop_child(child, registration.stop_timeout_s)
        return await _hold(settings, registration, child, signals)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        if child is not None and child.returncode is None:  # only on an unexpected error
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            await child.wait()


def _at_least(minimum: float, kind: type[int] | type[float]) -> Any:
    def parse(text: str) -> int | float:
        value = kind(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum:g}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its "invalid ..." message
    return parse


def add_register_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pool", help="pool the endpoint joins")
    parser.add_argument("id", help="endpoint id, unique in the pool (Envoy's hostname for it)")
    parser.add_argument("--address", required=True,
                        help="IP or hostname the gateway reaches the server at")
    parser.add_argument("--port", type=int, required=True, help="the server's port")
    parser.add_argument("--weight", type=int, help="load-balancing weight, 1-128 (default 1)")
    parser.add_argument("--ttl", type=_at_least(MIN_TTL_S, int), default=10,
                        help="lease seconds: the key vanishes this long after this process "
                             "dies without deregistering (default %(default)s)")
    parser.add_argument("--wait-healthy", metavar="URL",
                        help="register only once URL answers 200 (e.g. the server's /health)")
    parser.add_argument("--wait-timeout", type=_at_least(0, float), metavar="S",
                        help="give up (exit 1) if --wait-healthy is not 200 after S seconds "
                             "(default: wait as long as the command runs)")
    parser.add_argument("--drain-s", type=_at_least(0, float), default=10.0, metavar="S",
                        help="on SIGTERM/SIGINT, seconds between deregistering and stopping "
                             "the command, for in-flight streams (default %(default)s)")
    parser.add_argument("--stop-timeout", type=_at_least(0, float), default=20.0, metavar="S",
                        help="seconds the command gets to exit after SIGTERM before SIGKILL "
                             "(default %(default)s)")
    command = parser.add_argument(
        "command", nargs=argparse.PARSER, default=[], metavar="-- COMMAND",
        help="optional: the model server to run and supervise; its exit status becomes ours")
    # PARSER ("A...") only matches after the options, unlike "*" or REMAINDER, which
    # swallow or drop them on Python 3.11; it is required by default.
    command.required = False


async def run_register_from_args(args: argparse.Namespace) -> int:
    from control_plane.cli import etcd_settings  # imported here: cli imports this module

    return await run_register(etcd_settings(args), registration_from_args(args))


def main(argv: Sequence[str] | None = None) -> int:
    """``hotpath register`` on its own (the same arguments as the subcommand)."""
    from control_plane.cli import _add_etcd_options, _setup_logging

    parser = argparse.ArgumentParser(
        prog="hotpath register",
        description="Keep a model server registered in a pool while it runs.")
    _add_etcd_options(parser)
    add_register_arguments(parser)
    args = parser.parse_args(argv)
    _setup_logging(False)
    try:
        return asyncio.run(run_register_from_args(args))
    except (ConfigError, EtcdSettingsError) as exc:
        print(f"hotpath: {exc}", file=sys.stderr)
        return 2
