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
import json
import logging
import os
import shlex
import signal
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from control_plane.config.model import endpoint_to_json, parse_endpoint
from control_plane.errors import HealthTimeout
from control_plane.runtime import processes
from control_plane.runtime.signals import Shutdown
from control_plane.store.etcd import EtcdSettings, hold_under_lease

log = logging.getLogger("hotpath.register")

# etcd's smallest lease is 1.5 election timeouts (1.5 s with default settings).
MIN_TTL_S = 2
HEALTH_POLL_S = 0.5


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
                child: asyncio.subprocess.Process | None, signals: Shutdown) -> int:
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


async def run_register(settings: EtcdSettings, registration: Registration,
                       signals: Shutdown) -> int:
    """Run (optionally) the command, register once healthy, deregister and drain on stop
    (``signals.stop``; ``signals.hurry`` cuts the drain short)."""
    child: asyncio.subprocess.Process | None = None
    try:
        if registration.command:
            child = await asyncio.create_subprocess_exec(
                *registration.command, start_new_session=True,
                preexec_fn=processes.die_with_parent())
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
        if child is not None and child.returncode is None:  # only on an unexpected error
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            await child.wait()
