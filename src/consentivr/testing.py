"""In-memory fakes for your own tests of consentivr's call handling, no Asterisk needed.

Like panoramisk's ``testing`` module: small stand-ins for the two things a call talks
to, so a flow of yours can be run in a unit test.

- :class:`FakeTransport` is a channel (``driver.Transport``) with a scripted caller:
  it records every command consentivr sends and answers like a FastAGI channel does.
- :class:`FakeCommitter` is the consent log's writer (``consentwriter.Committer``): it
  keeps every write in memory, and can fail the next writes like a locked log.
- :func:`run_call` runs one call of a flow through both and returns them.

Example::

    from consentivr.configfile import load_settings
    from consentivr.testing import run_call

    flow = load_settings("config.yaml").flows["minimal"]
    transport, log = run_call(flow, keys=["1"])
    assert log.decisions[0].decisions == {"recording": "yes"}
    assert transport.recordings  # recording started after the committed yes

These are fakes: they prove what consentivr asks of a channel and of the log, not that
Asterisk does it. The project's own proof runs on a real Asterisk 22 (the test bench in
the source tree, ``testing/consentivr_testbed``).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future
from typing import Any

from consentivr.consentwriter import ConsentWriter
from consentivr.driver import CallDriver, call_info
from consentivr.errors import StoreError
from consentivr.messages import (
    DecisionRecord,
    DigitPressed,
    Event,
    HungUp,
    PlaybackFinished,
    TimerFired,
)
from consentivr.model import Destination, Flow

#: A step of the caller's script that hangs up instead of pressing a key.
HANGUP = "hangup"


class FakeTransport:
    """One channel with a scripted caller, FastAGI style: each command returns the
    event it caused.

    ``keys`` is what the caller does each time consentivr waits for an answer, in
    order: a digit (``"1"``), ``None`` to stay silent until the timer fires, or
    :data:`HANGUP`. Once the script is used up the caller stays silent. The caller
    listens to every prompt to its end; a ``HANGUP`` step also ends a prompt early.
    """

    pushes_events = False

    def __init__(self, keys: Iterable[str | None] = (), clock: Any = time.time) -> None:
        self.keys: list[str | None] = list(keys)
        self.clock = clock
        #: Every command, in order, as a tuple: ("play", playback_id, media, language) ...
        self.commands: list[tuple[Any, ...]] = []
        self.closed = False

    # -- what a test asks ------------------------------------------------------

    @property
    def played(self) -> list[tuple[str, ...]]:
        """The media of each prompt played, in order."""
        return [c[2] for c in self.commands if c[0] == "play"]

    @property
    def recordings(self) -> list[str]:
        """The paths recordings were started at (empty: the call was not recorded)."""
        return [c[1] for c in self.commands if c[0] == "start_recording"]

    @property
    def variables(self) -> dict[str, str]:
        """Every channel variable set, the last value of each."""
        out: dict[str, str] = {}
        for c in self.commands:
            if c[0] == "set_variables":
                out.update(dict(c[1]))
        return out

    @property
    def destination(self) -> Destination | bool | None:
        """Where the call was continued to; False if it was not continued."""
        found: Destination | bool | None = False
        for c in self.commands:
            if c[0] == "continue":
                found = c[1]
        return found

    @property
    def hung_up(self) -> bool:
        return any(c[0] == "hangup" for c in self.commands)

    # -- driver.Transport -------------------------------------------------------

    def _next_is_hangup(self) -> bool:
        if self.keys and self.keys[0] == HANGUP:
            self.keys.pop(0)
            return True
        return False

    async def answer(self) -> Event | None:
        self.commands.append(("answer",))
        return None

    async def play(self, playback_id: str, media: tuple[str, ...], language: str) -> Event:
        self.commands.append(("play", playback_id, media, language))
        if self._next_is_hangup():
            return HungUp(self.clock())
        return PlaybackFinished(playback_id, self.clock())

    async def stop_playback(self, playback_id: str) -> None:
        self.commands.append(("stop_playback", playback_id))

    async def start_timer(self, timer_id: str, seconds: float) -> Event:
        self.commands.append(("start_timer", timer_id, seconds))
        step = self.keys.pop(0) if self.keys else None
        if step == HANGUP:
            return HungUp(self.clock())
        if step is None:
            return TimerFired(timer_id, self.clock())
        return DigitPressed(step, self.clock())

    async def cancel_timer(self, timer_id: str) -> None:
        self.commands.append(("cancel_timer", timer_id))

    async def arm_deadline(self, seconds: float) -> None:
        self.commands.append(("arm_deadline", seconds))

    async def disarm_deadline(self) -> None:
        self.commands.append(("disarm_deadline",))

    async def set_variables(self, pairs: tuple[tuple[str, str], ...]) -> Event | None:
        self.commands.append(("set_variables", pairs))
        return None

    async def start_recording(self, path: str) -> None:
        self.commands.append(("start_recording", path))

    async def continue_(self, destination: Destination | None) -> Event | None:
        self.commands.append(("continue", destination))
        return None

    async def hangup(self) -> None:
        self.commands.append(("hangup",))

    def close(self) -> None:
        self.closed = True


class FakeCommitter:
    """The consent log's writer, in memory: every write succeeds at once, except the
    next ``fail`` ones, which fail as a locked database would."""

    def __init__(self, fail: int = 0) -> None:
        self.fail = fail
        #: Every committed write: (kind, payload), e.g. ("append", DecisionRecord).
        self.written: list[tuple[str, Any]] = []
        #: Every write that failed, the same way.
        self.failed: list[tuple[str, Any]] = []
        self._lock = threading.Lock()  # the real committer is called from threads too

    @property
    def decisions(self) -> list[DecisionRecord]:
        """The decision rows committed, in order."""
        return [p for kind, p in self.written if kind == "append"]

    @property
    def marks(self) -> list[tuple[Any, ...]]:
        """The recording marks committed: (call_id, confirmed, error)."""
        return [p for kind, p in self.written if kind == "mark_recording"]

    def submit(self, kind: str, payload: Any) -> Future[None]:
        future: Future[None] = Future()
        with self._lock:
            failing = self.fail > 0
            if failing:
                self.fail -= 1
                self.failed.append((kind, payload))
            else:
                self.written.append((kind, payload))
        if failing:
            future.set_exception(StoreError("fake consent log: database is locked"))
        else:
            future.set_result(None)
        return future


def run_call(
    flow: Flow,
    keys: Iterable[str | None] = (),
    *,
    caller: str | None = "+31201234567",
    recordings_dir: str = "/var/spool/asterisk/consentivr",
    committer: FakeCommitter | None = None,
) -> tuple[FakeTransport, FakeCommitter]:
    """Run one call of ``flow`` with a caller who does ``keys`` (see
    :class:`FakeTransport`); return the transport and the committer to inspect."""
    transport = FakeTransport(keys)
    log = committer or FakeCommitter()

    async def call() -> None:
        writer = ConsentWriter(log, timeout=5.0)
        info = call_info("fake-channel-1", name="PJSIP/fake-00000001", caller=caller)
        await CallDriver(flow, info, transport, writer, recordings_dir).run()
        await writer.close()

    asyncio.run(call())
    return transport, log
