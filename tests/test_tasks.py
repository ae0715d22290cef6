"""A stop always ends, even when a task swallowed its cancellation (consentivr.tasks).

Found by CI: the recording listener's stop hung for ever, once in some dozen runs of
``test_withdrawal_while_consentivr_is_away_is_logged_when_it_comes_back[agi]``. Its
worker was "cancelling" but back at its queue: on Python 3.11 ``asyncio.wait_for``
drops a cancellation that arrives in the same loop turn as its inner result.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from pathlib import Path
from typing import Any

import pytest

from consentivr.configfile import load_settings
from consentivr.listener import RecordingListener
from consentivr.tasks import cancel_and_wait

ROOT = Path(__file__).resolve().parents[1]


class Worker:
    """A worker loop like the listener's: an AMI answer awaited with wait_for, then
    back to its queue. ``answer_and_cancel`` lets the answer and the stop's cancel
    arrive in one loop turn, the moment wait_for drops the cancellation on 3.11."""

    def __init__(self) -> None:
        self.waiting = asyncio.Event()
        self.answer: asyncio.Future[None] | None = None
        self.queue: asyncio.Queue[int] = asyncio.Queue()

    async def run(self) -> None:
        self.answer = asyncio.get_running_loop().create_future()
        self.waiting.set()
        await asyncio.wait_for(self.answer, 30)
        await self.queue.get()  # where a worker whose cancel was dropped stays

    async def started(self) -> asyncio.Future[None]:
        await self.waiting.wait()
        assert self.answer is not None
        return self.answer


def test_wait_for_can_swallow_a_cancellation_on_this_python() -> None:
    """Why consentivr.tasks exists: on 3.11 this worker survives one cancel()."""
    async def main() -> bool:
        worker = Worker()
        task = asyncio.create_task(worker.run())
        (await worker.started()).set_result(None)
        task.cancel()  # in the same turn as the answer
        await asyncio.wait({task}, timeout=0.5)
        alive = not task.done()
        task.cancel()
        await asyncio.wait({task}, timeout=1)
        return alive

    alive = asyncio.run(main())
    assert alive == (sys.version_info < (3, 12))


@pytest.mark.parametrize("patience", [0.05, 1.0])
def test_cancel_and_wait_ends_a_task_that_swallowed_its_cancellation(patience: float) -> None:
    async def main() -> asyncio.Task[None]:
        worker = Worker()
        task = asyncio.create_task(worker.run())
        (await worker.started()).set_result(None)
        await asyncio.wait_for(cancel_and_wait(task, patience=patience), 5 + patience)
        return task

    task = asyncio.run(main())
    assert task.cancelled()


async def _returns() -> None:
    return None


async def _fails() -> None:
    raise ValueError("bug")


@pytest.mark.parametrize(("job", "expected"), [(_returns, None), (_fails, ValueError)])
def test_cancel_and_wait_keeps_what_the_task_did(job: Any, expected: type | None) -> None:
    async def main() -> None:
        task = asyncio.create_task(job())
        await asyncio.sleep(0)  # it has ended before the stop
        await cancel_and_wait(task)

    if expected is None:
        asyncio.run(main())
    else:
        with pytest.raises(expected):
            asyncio.run(main())


def test_cancel_and_wait_does_not_swallow_the_callers_own_cancellation() -> None:
    give_up = asyncio.Event()

    async def stubborn() -> None:
        while not give_up.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(30)

    async def main() -> None:
        task = asyncio.create_task(stubborn())
        stopper = asyncio.create_task(cancel_and_wait(task, patience=10))
        await asyncio.sleep(0.05)
        stopper.cancel()  # whoever stops the task is stopped itself: that must hold
        try:
            with pytest.raises(asyncio.CancelledError):
                await stopper
        finally:
            give_up.set()
            await cancel_and_wait(task)

    asyncio.run(asyncio.wait_for(main(), 5))


def test_the_recording_listener_stops_when_its_worker_swallowed_a_cancel() -> None:
    """The CI hang itself: the listener's stop waited for ever on such a worker."""
    settings = load_settings(ROOT / "config.example.yaml", secrets=())

    async def main() -> bool:
        listener = RecordingListener(settings)
        worker = Worker()
        listener._task = asyncio.create_task(worker.run())
        (await worker.started()).set_result(None)
        stopping = asyncio.create_task(listener.stop())  # its cancel, in the answer's turn
        ended, _ = await asyncio.wait({stopping}, timeout=5)
        if not ended:  # the bug: free the worker so that this test can end
            listener._task.cancel()
            await stopping
        return bool(ended)

    assert asyncio.run(main()), "RecordingListener.stop() hung on a worker that went on"
