"""Writing a call's decisions to the consent log, the same way in every mode.

The driver asks for a decision row to be committed before the call may go on
(:meth:`ConsentWriter.log_decision`); marks (recording confirmed or not) are not
waited for. When the log does not take a write in time, the call goes on told
"not logged", and what the log must then say is the flow's decision
(:func:`consentivr.flow.late_commit`): a row that commits later and allows anything
is voided, a row that failed is written as what was acted on. Those writes, and any
mark that failed, are retried by :class:`LateLog` until the log takes them.

Adapters never talk to the committer themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Any, Protocol

from consentivr.errors import ConsentivrError
from consentivr.flow import late_commit
from consentivr.logformat import decision_fields
from consentivr.messages import Clock, DecisionLogged, DecisionRecord, LateWrite
from consentivr.tasks import cancel_and_wait

log = logging.getLogger(__name__)

# How long a call waits for its decision to be committed before it goes on
# unrecorded (a locked database waits up to its busy timeout, 5 s, per batch).
DECISION_TIMEOUT = 6.0


class Committer(Protocol):
    def submit(self, kind: str, payload: Any) -> Future[None]: ...


class LogObserver(Protocol):
    """Told what lands in the consent log (metrics count what the log holds), how long
    a decision's commit took, and whether the log is writable."""

    def log_commit(self, seconds: float) -> None: ...
    def component_up(self, name: str, up: bool, reason: str | None = None) -> None: ...
    def call_ended(self, flow: str | None, outcome: str) -> None: ...
    def decisions(self, flow: str | None, decisions: Mapping[str, Any]) -> None: ...
    def recording(self, result: str) -> None: ...
    def withdrawal(self, by: str) -> None: ...


class LateLog:
    """Writes that failed while the call went on, retried until the log takes them.

    Held in memory only: a crash loses them (the call is unrecorded either way).
    """

    def __init__(self, committer: Committer, max_delay: float = 30.0,
                 landed: Callable[[str, Any], None] | None = None) -> None:
        self.committer = committer
        self.max_delay = max_delay
        self.landed = landed or (lambda kind, payload: None)
        self.pending: deque[tuple[str, Any]] = deque()
        self._wake = asyncio.Event()
        self._retry_now = asyncio.Event()
        self.written = 0

    def add(self, kind: str, payload: Any) -> None:
        self.pending.append((kind, payload))
        self._wake.set()

    async def run(self) -> None:
        delay = 1.0
        while True:
            await self._wake.wait()
            while self.pending:
                kind, payload = self.pending[0]
                try:
                    await asyncio.shield(asyncio.wrap_future(
                        self.committer.submit(kind, payload)))
                except ConsentivrError as exc:
                    if kind == "append" and "UNIQUE" in str(exc):
                        self.pending.popleft()  # it did land after all
                        continue
                    log.warning("consent log still failing (%s); %d late write(s) "
                                "retried in %.0fs", exc, len(self.pending), delay)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._retry_now.wait(), delay)
                    self._retry_now.clear()
                    delay = min(delay * 2, self.max_delay)
                    continue
                except Exception:  # a bug: never retry it forever
                    log.exception("late %s write dropped", kind)
                    self.pending.popleft()
                    continue
                self.pending.popleft()
                self.written += 1
                self.landed(kind, payload)
                delay = 1.0
                log.info("late %s write landed in the consent log", kind)
            self._wake.clear()

    async def flush(self, timeout: float) -> None:
        """On shutdown: try once more to write what is pending."""
        self._retry_now.set()
        deadline = asyncio.get_running_loop().time() + timeout
        while self.pending and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)
        if self.pending:
            log.error("%d consent log write(s) lost at shutdown: the log was unavailable",
                      len(self.pending))


class ConsentWriter:
    """The consent log as the driver sees it: durable decisions, marks, late writes."""

    def __init__(self, committer: Committer, clock: Clock = time.time,
                 timeout: float = DECISION_TIMEOUT,
                 observer: LogObserver | None = None) -> None:
        self.committer = committer
        self.clock = clock
        self.timeout = timeout
        self.observer = observer
        self.late = LateLog(committer, landed=self._landed)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the late-write task; idempotent, called once the event loop runs."""
        if self._task is None:
            self._loop = asyncio.get_running_loop()
            self._task = self._loop.create_task(self.late.run())

    def _call_soon(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn`` on the event loop, from any thread (committer callbacks)."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(fn, *args)

    def _late(self, write: LateWrite | None) -> None:
        if write is not None:
            self.late.add(write.kind, write.payload)

    async def log_decision(self, record: DecisionRecord) -> DecisionLogged:
        """Commit the decision row; the call waits for this (and for nothing else)."""
        started = time.monotonic()
        if not await self.durable("append", record):
            log.error("call %s: decision NOT logged, call goes on unrecorded", record.call_id)
            return DecisionLogged(False, self.clock(), "consent log unavailable")
        if self.observer is not None:
            self.observer.log_commit(time.monotonic() - started)
        decisions = " ".join(f"{k}={v}" for k, v in record.decisions.items())
        log.info("decision call=%s flow=%s lang=%s notice=%s %s outcome=%s",
                 record.call_id, record.flow, record.language, record.notice_version,
                 decisions, record.outcome, extra=decision_fields(record))
        return DecisionLogged(True, self.clock())

    def mark_recording(self, call_id: str, confirmed: bool, error: str | None) -> None:
        """A status of a decision already committed: the caller does not wait for its
        fsync; a failed write is retried by the late log."""
        payload = (call_id, confirmed, error, self.clock())
        self.start()
        assert self._loop is not None
        self._loop.create_task(self._mark(payload))

    async def _mark(self, payload: tuple[Any, ...]) -> None:
        if not await self.durable("mark_recording", payload):
            log.error("call %s: consent log: recording mark not written yet; will retry",
                      payload[0])

    async def durable(self, kind: str, payload: Any, timeout: float | None = None) -> bool:
        """Write to the consent log; on failure queue what the log must say later.

        True only if committed now.
        """
        self.start()
        wait = timeout or self.timeout
        future = self.committer.submit(kind, payload)
        try:
            # shield: the committer thread still owns the future after we stop waiting.
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), wait)
        except TimeoutError:
            log.error("consent log: %s not committed within %gs", kind, wait)
            self._up(False)
            future.add_done_callback(lambda f: self._call_soon(self._settle, kind, payload, f))
            return False
        except ConsentivrError as exc:
            log.error("consent log: %s failed: %s", kind, exc)
            self._up(False)
            self._settle_failed(kind, payload, str(exc))
            return False
        self._landed(kind, payload)
        return True

    def _up(self, up: bool) -> None:
        if self.observer is not None:
            self.observer.component_up("log", up, None if up else "consent log not writable")

    def _landed(self, kind: str, payload: Any) -> None:
        """A write is in the log: count what the log now holds (calls, decisions,
        recordings confirmed or failed, voids)."""
        self._up(True)
        observer = self.observer
        if observer is None:
            return
        if kind == "append":
            observer.call_ended(payload.flow, payload.outcome)
            observer.decisions(payload.flow, payload.decisions)
        elif kind == "mark_recording":
            observer.recording("started" if payload[1] else "failed")
        elif kind == "void_late_consent":
            observer.withdrawal("system")

    def _settle(self, kind: str, payload: Any, future: Future[None]) -> None:
        """A write we stopped waiting for has finished (on the event loop)."""
        error = None if future.cancelled() else future.exception()
        if error is None:
            self._landed(kind, payload)
        if kind == "append":
            self._late(late_commit(payload, committed=error is None,
                                   error=None if error is None else str(error), at=time.time()))
        elif error is not None:
            self.late.add(kind, payload)

    def _settle_failed(self, kind: str, payload: Any, error: str) -> None:
        if kind == "append":
            self._late(late_commit(payload, committed=False, error=error, at=time.time()))
        else:
            self.late.add(kind, payload)

    async def close(self, timeout: float = 5.0) -> None:
        """Give late writes a last chance, then stop their task."""
        if self._task is None:
            return
        await self.late.flush(timeout)
        await cancel_and_wait(self._task)
        self._task = None
