"""Child processes of a bench run: started with a log file each, ended by PID.

Every child gets PR_SET_PDEATHSIG (it dies with the bench) and `ProcessGroup.close` ends the
ones still running, newest first, SIGTERM then SIGKILL, so nothing outlives a run.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
from pathlib import Path

from control_plane import processes


class BenchError(RuntimeError):
    """Something the bench needs did not start; the message says what and where to look."""


class ProcessGroup:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []

    def log_path(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def start(self, name: str, command: list[str], env: dict[str, str] | None = None
              ) -> subprocess.Popen[bytes]:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path(name), "ab") as out:  # the child keeps its own descriptor
            child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out,
                                     stderr=subprocess.STDOUT, env=env,
                                     preexec_fn=processes.die_with_parent)
        self.children.append((name, child))
        return child

    def tail(self, name: str, lines: int = 15) -> str:
        try:
            text = self.log_path(name).read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def fail(self, name: str, why: str) -> BenchError:
        return BenchError(f"{name} {why}; see {self.log_path(name)}:\n{self.tail(name)}")

    async def wait(self, name: str, child: subprocess.Popen[bytes], check: object,
                   timeout: float, what: str) -> None:
        """Poll `check()` (in a thread) until true; fail early when the child exits."""
        assert callable(check)
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
        if child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        self.children = [(n, c) for n, c in self.children if c is not child]

    def close(self) -> None:
        for _, child in reversed(list(self.children)):
            self.stop(child)
