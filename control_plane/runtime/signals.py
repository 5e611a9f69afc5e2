"""SIGINT and SIGTERM for a whole `hotpath` process, installed in one place.

The first signal sets ``stop``; a second one sets ``hurry`` (e.g. `register` cuts its drain
short). ``run_until_stopped`` runs a command and, unless the command watches ``stop``
itself, cancels it on the first signal so its ``finally`` blocks clean up (leases revoked,
children stopped), then restores the default handlers.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Shutdown:
    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.hurry = asyncio.Event()

    def fire(self) -> None:
        (self.hurry if self.stop.is_set() else self.stop).set()


async def run_until_stopped(command: Callable[[Shutdown], Awaitable[int]],
                            watches_stop: bool = False) -> int:
    """Run ``command``; exit status 0 when a signal stopped a command that does not watch
    ``stop`` itself."""
    loop = asyncio.get_running_loop()
    shutdown = Shutdown()
    for sig in SIGNALS:
        loop.add_signal_handler(sig, shutdown.fire)
    task = asyncio.ensure_future(command(shutdown))
    stopped = asyncio.ensure_future(shutdown.stop.wait())
    try:
        if not watches_stop:
            await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done():
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    return 0
        return await task
    finally:
        stopped.cancel()
        for sig in SIGNALS:
            loop.remove_signal_handler(sig)
