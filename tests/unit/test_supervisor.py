"""ProcessGroup.supervise with real tiny child processes and small backoff constants."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from control_plane.runtime import processes, supervisor
from control_plane.runtime.supervisor import Child, ProcessGroup
from tests.harness import async_wait_for

EXIT_3 = [sys.executable, "-c", "import sys; sys.exit(3)"]


def run_then_exit(seconds: float) -> list[str]:
    return [sys.executable, "-c", f"import sys, time; time.sleep({seconds}); sys.exit(3)"]


class Spawns:
    """Records when the supervisor (re)starts a child: processes.spawn, wrapped."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.at: list[float] = []
        real = processes.spawn

        def spawn(command: list[str], log_path: Path, env: dict[str, str] | None = None,
                  cwd: Path | None = None) -> subprocess.Popen[bytes]:
            self.at.append(time.monotonic())
            return real(command, log_path, env=env, cwd=cwd)

        monkeypatch.setattr(supervisor.processes, "spawn", spawn)


@pytest.fixture
async def group(tmp_path: Path) -> AsyncIterator[ProcessGroup]:
    found = ProcessGroup(tmp_path / "logs")
    try:
        yield found
    finally:
        await asyncio.to_thread(found.close, 5.0)


def backoff(monkeypatch: pytest.MonkeyPatch, base: float, maximum: float = 60.0,
            healthy: float = 60.0, loop: int = 100) -> None:
    monkeypatch.setattr(supervisor, "RESTART_BASE_S", base)
    monkeypatch.setattr(supervisor, "RESTART_MAX_S", maximum)
    monkeypatch.setattr(supervisor, "HEALTHY_RUN_S", healthy)
    monkeypatch.setattr(supervisor, "CRASH_LOOP_RESTARTS", loop)


async def supervising(group: ProcessGroup, on_give_up: Callable[[Child], None],
                      until: Callable[[], bool], timeout: float, what: str) -> None:
    task = asyncio.create_task(group.supervise(on_give_up, poll_s=0.01))
    try:
        async def done() -> bool:
            if task.done():
                task.result()  # the supervisor must never end by itself
                raise AssertionError("supervise returned")
            return until()
        await async_wait_for(done, timeout, what, 0.01)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_dying_child_is_restarted_with_a_growing_delay(
        group: ProcessGroup, monkeypatch: pytest.MonkeyPatch) -> None:
    backoff(monkeypatch, base=0.1)
    group.start("crashy", EXIT_3)
    spawns = Spawns(monkeypatch)
    given_up: list[Child] = []
    await supervising(group, given_up.append, lambda: len(spawns.at) >= 4, 30,
                      "four restarts")
    child = group.child("crashy")
    assert child.restarts == len(spawns.at) >= 4
    assert given_up == []
    # Each restart waits at least its backoff (0.1, 0.2, 0.4 s) after the previous one
    # (which exited at once): the delay doubles. Upper bounds would depend on the load.
    gaps = [b - a for a, b in zip(spawns.at, spawns.at[1:], strict=False)]
    for index, gap in enumerate(gaps[:3]):
        assert gap >= 0.1 * 2 ** (index + 1) * 0.95, gaps
    assert gaps[2] > gaps[0], gaps


async def test_the_delay_is_capped(group: ProcessGroup,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    backoff(monkeypatch, base=0.05, maximum=0.1)
    group.start("crashy", EXIT_3)
    spawns = Spawns(monkeypatch)
    await supervising(group, lambda child: None, lambda: len(spawns.at) >= 6, 30,
                      "six restarts")
    gaps = [b - a for a, b in zip(spawns.at, spawns.at[1:], strict=False)]
    # Uncapped, the 5th delay would be 0.05 * 2**5 = 1.6 s; capped, each is >= 0.1 s.
    assert all(gap >= 0.1 * 0.95 for gap in gaps[1:]), gaps
    assert group.child("crashy").restarts >= 6


async def test_a_crash_loop_gives_up_once_and_stops_restarting(
        group: ProcessGroup, monkeypatch: pytest.MonkeyPatch) -> None:
    backoff(monkeypatch, base=0.01, loop=3)
    group.start("crashy", EXIT_3)
    group.start("steady", [sys.executable, "-c", "import time; time.sleep(60)"])
    steady_pid = group.child("steady").process.pid
    spawns = Spawns(monkeypatch)
    given_up: list[Child] = []
    task = asyncio.create_task(group.supervise(given_up.append, poll_s=0.01))
    try:
        async def gave_up() -> bool:
            return bool(given_up)
        await async_wait_for(gave_up, 30, "on_give_up", 0.01)
        crashy = group.child("crashy")
        assert given_up == [crashy] and crashy.restarts == 3 and len(spawns.at) == 3
        # The supervisor keeps running (the other child stays supervised) but never
        # restarts the given-up child nor calls on_give_up again: watch a bounded window.
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            assert not task.done()
            await asyncio.sleep(0.02)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert len(given_up) == 1 and len(spawns.at) == 3
    assert crashy.process.poll() == 3
    steady = group.child("steady")
    assert steady.process.pid == steady_pid and steady.process.poll() is None
    assert steady.restarts == 0


async def test_a_child_that_ran_long_enough_resets_its_count(
        group: ProcessGroup, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each run lasts 0.4 s, longer than the healthy run (0.2 s): never a crash loop, and
    # every restart waits the base delay again, however many there were.
    backoff(monkeypatch, base=0.05, healthy=0.2, loop=2)
    group.start("flaky", run_then_exit(0.4))
    spawns = Spawns(monkeypatch)
    given_up: list[Child] = []
    await supervising(group, given_up.append, lambda: len(spawns.at) >= 4, 30,
                      "four restarts")
    assert given_up == []
    assert group.child("flaky").restarts == 1  # reset to 0, then this restart


async def test_a_quick_exit_after_a_healthy_run_counts_from_one(
        group: ProcessGroup, monkeypatch: pytest.MonkeyPatch) -> None:
    """The count resets only for a run that lasted: fast exits after it accumulate again."""
    # A healthy run is 1 s: an exiting child's interpreter start-up alone took over 0.3 s
    # on a loaded 2-core machine, which counted as healthy.
    backoff(monkeypatch, base=0.01, healthy=1.0, loop=3)
    group.start("child", run_then_exit(1.5))
    child = group.child("child")
    spawns = Spawns(monkeypatch)
    given_up: list[Child] = []
    # The first run was healthy; from then on every run exits at once.
    child.command = EXIT_3
    await supervising(group, given_up.append, lambda: bool(given_up), 30, "on_give_up")
    assert given_up == [child] and child.restarts == 3 and len(spawns.at) == 3
