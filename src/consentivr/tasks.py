"""Stopping asyncio tasks so that a stop always ends.

On Python 3.11, ``asyncio.wait_for`` swallows a cancellation that arrives in the same
loop turn as the end of what it waits for (CPython gh-86296, fixed in 3.12 by the
rewrite of ``wait_for`` on ``asyncio.timeout``). The task then goes on as if it had
never been cancelled, and ``task.cancel(); await task`` waits for ever: a worker
loop back at its queue never ends, and neither does the service's stop. So a stop
cancels again until the task has ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

log = logging.getLogger(__name__)


async def cancel_and_wait(task: asyncio.Task[Any] | None, patience: float = 1.0) -> None:
    """Cancel ``task`` and return once it has ended; cancel again every ``patience``
    seconds while it goes on. Its own exception, if it failed, is raised here."""
    if task is None:
        return
    task.cancel()
    while not task.done():
        await asyncio.wait({task}, timeout=patience)
        if not task.done():
            log.debug("task %s went on after its cancellation; cancelling it again",
                      task.get_name())
            task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
