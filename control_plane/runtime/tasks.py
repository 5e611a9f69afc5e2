"""Running a process's long-lived asyncio tasks together."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence


async def run_together(tasks: Sequence[asyncio.Task[None]]) -> None:
    """Await the tasks; when one fails or this is cancelled, cancel and reap all of them."""
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
