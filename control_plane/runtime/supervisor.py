"""ProcessGroup: the one way hotpath starts, watches, restarts and ends child processes.

Used by `hotpath up`, the benchmark and the tests. Every child gets PR_SET_PDEATHSIG (it dies
with its parent, even a SIGKILLed one), writes to a log file of its own, and is ended by PID:
SIGTERM, then SIGKILL at the deadline, newest first, so nothing outlives its group.
``supervise`` restarts a child that dies, with backoff, and gives up on a crash loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from control_plane.errors import StartupError
from control_plane.runtime import processes

log = logging.getLogger("hotpath.supervisor")

# Restart backoff: 0.5 s doubling to 8 s; a child that ran this long counts as healthy again.
RESTART_BASE_S = 0.5
RESTART_MAX_S = 8.0
HEALTHY_RUN_S = 30.0
# This many restarts without a healthy run is a crash loop: the group gives up on the child.
CRASH_LOOP_RESTARTS = 5


@dataclass
class Child:
    """One named child process; ``restarts`` counts how often ``supervise`` restarted it."""

    name: str
    command: list[str]
    process: subprocess.Popen[bytes]
    env: dict[str, str] | None = None
    started_at: float = field(default_factory=time.monotonic)
    restarts: int = 0


class ProcessGroup:
    def __init__(self, workdir: Path, error: type[Exception] = StartupError) -> None:
        self.workdir = workdir
        self.error = error
        self.children: list[Child] = []

    def log_path(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def start(self, name: str, command: list[str], env: dict[str, str] | None = None
              ) -> subprocess.Popen[bytes]:
        self.workdir.mkdir(parents=True, exist_ok=True)
        process = processes.spawn(command, self.log_path(name), env=env)
        self.children.append(Child(name, command, process, env))
        return process

    def child(self, name: str) -> Child:
        return next(c for c in self.children if c.name == name)

    def tail(self, name: str, lines: int = 15) -> str:
        try:
            text = self.log_path(name).read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def fail(self, name: str, why: str) -> Exception:
        return self.error(f"{name} {why}; see {self.log_path(name)}:\n{self.tail(name)}")

    async def wait(self, name: str, child: subprocess.Popen[bytes], check: Callable[[], object],
                   timeout: float, what: str) -> None:
        """Poll ``check()`` (in a thread) until true; fail early when the child exits."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if child.poll() is not None:
                raise self.fail(name, f"exited with code {child.returncode} while starting")
            if await asyncio.to_thread(check):
                return
            await asyncio.sleep(0.05)
        raise self.fail(name, f"not ready after {timeout:g}s ({what})")

    def stop(self, child: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
        processes.terminate(child, timeout)
        self.children = [c for c in self.children if c.process is not child]

    def close(self, timeout: float = 5.0) -> None:
        """End every child, newest first; all get SIGTERM at once and share the deadline."""
        for child in reversed(self.children):
            if child.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in reversed(self.children):
            processes.terminate(child.process, max(0.1, deadline - time.monotonic()))
        self.children = []

    async def supervise(self, on_give_up: Callable[[Child], None],
                        poll_s: float = 0.2) -> None:
        """Restart every child that exits, with backoff; a crash loop calls ``on_give_up``
        once and that child stays down. Runs until cancelled."""
        given_up: set[str] = set()
        due: dict[str, float] = {}
        while True:
            now = time.monotonic()
            for child in self.children:
                if child.name in given_up or child.process.poll() is None:
                    continue
                if child.name not in due:
                    if now - child.started_at >= HEALTHY_RUN_S:
                        child.restarts = 0
                    if child.restarts >= CRASH_LOOP_RESTARTS:
                        given_up.add(child.name)
                        log.error("%s exited with code %s %d times in a row; giving up on it "
                                  "(see %s)", child.name, child.process.returncode,
                                  child.restarts + 1, self.log_path(child.name))
                        on_give_up(child)
                        continue
                    delay = min(RESTART_MAX_S, RESTART_BASE_S * 2 ** child.restarts)
                    log.warning("%s exited with code %s; restarting in %.1f s (see %s)",
                                child.name, child.process.returncode, delay,
                                self.log_path(child.name))
                    due[child.name] = now + delay
                elif now >= due[child.name]:
                    del due[child.name]
                    child.process = processes.spawn(child.command, self.log_path(child.name),
                                                    env=child.env)
                    child.started_at = time.monotonic()
                    child.restarts += 1
                    log.warning("%s restarted (restart %d)", child.name, child.restarts)
            await asyncio.sleep(poll_s)
