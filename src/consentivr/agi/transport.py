"""FastAGI mode: one channel's transport for the call driver.

AGI is synchronous: one command at a time, and digits pressed while no command runs
are lost, so digits are only collected inside ``STREAM FILE`` / ``SAY *`` /
``WAIT FOR DIGIT``, and each command returns the event it caused
(``pushes_events`` is False). How the flow's commands map to AGI:

- ``play`` -> ``STREAM FILE <name> "0123456789*#"`` per media item (``digits:``,
  ``number:`` and ``characters:`` use ``SAY DIGITS/NUMBER/ALPHA``). A digit ends the
  whole prompt (barge-in); the end of the last item is ``PlaybackFinished``. A file
  that cannot be played is ``Failed`` (the caller did not hear it).
- ``start_timer`` -> ``WAIT FOR DIGIT <ms>``: a digit, or ``TimerFired`` at 0.
- The menu deadline is a wall-clock deadline checked around every blocking command,
  since AGI cannot interrupt one. ``stop_playback``/``cancel_timer`` are no-ops.
- ``start_recording`` -> ``EXEC MixMonitor <path>,<options>`` on this very channel,
  confirmed when the result is 0 (no AMI account needed, as FreePBX-style setups
  rarely give one out).
- ``set_variables`` -> ``SET VARIABLE``; ``continue_`` -> ``SET CONTEXT``,
  ``SET EXTENSION``, ``SET PRIORITY`` (Asterisk resumes at that priority itself, not
  ``p+1``), or nothing for "right after our AGI()"; the server then closes.

A ``HANGUP`` line, a ``511`` reply or the connection closing is ``HungUp``; a ``-1``
result is checked with ``CHANNEL STATUS``: dead is ``HungUp``, alive means the
command failed (``Failed``). ``510``/``520``, a timeout or a garbled reply is
``Failed``.
"""

from __future__ import annotations

import logging
import math
import re
import time

from consentivr.agi.protocol import _DEAD, ESCAPE_DIGITS, AgiConnection, AgiError, Reply
from consentivr.ari import assignments
from consentivr.driver import SAFETY_MARGIN
from consentivr.messages import (
    Clock,
    DeadlinePassed,
    DigitPressed,
    Event,
    Failed,
    HungUp,
    PlaybackFinished,
    TimerFired,
)
from consentivr.model import DTMF_KEYS, Destination

log = logging.getLogger(__name__)

# MixMonitor splits its argument on ',' and Asterisk on quotes: keep paths plain.
_SAFE_PATH = re.compile(r"[A-Za-z0-9_./+=@~-]+")
# Media URI scheme -> the AGI command that plays it with digit barge-in.
_PLAYERS = {
    "sound": "STREAM FILE",
    "digits": "SAY DIGITS",
    "number": "SAY NUMBER",
    "characters": "SAY ALPHA",
}


class AgiTransport:
    """One call over one AGI connection."""

    pushes_events = False

    def __init__(self, conn: AgiConnection, *, language: str, max_menu_seconds: float,
                 recording_options: str, clock: Clock, call_id: str) -> None:
        self.conn = conn
        self.clock = clock
        self.call_id = call_id
        self.options = recording_options
        self._channel_language = language
        self._menu_deadline: float | None = None  # monotonic
        self._hard_deadline = time.monotonic() + max_menu_seconds + SAFETY_MARGIN

    # -- the transport ------------------------------------------------------------

    async def answer(self) -> Event | None:
        return await self._checked(await self.conn.command("ANSWER"), "ANSWER")

    async def play(self, playback_id: str, media: tuple[str, ...], language: str) -> Event:
        await self._use_language(language)
        for uri in media:
            if late := self._deadline_passed():
                return late
            scheme, _, name = uri.partition(":")
            words = _PLAYERS.get(scheme)
            if words is None or not name:
                return Failed(f"AGI mode cannot play {uri!r} (use sound:, digits:, number: "
                              "or characters:)", self.clock())
            reply = await self.conn.command(words, name, ESCAPE_DIGITS,
                                            timeout=self._blocking_timeout())
            event = await self._digit_or_end(reply, f"{words} {name}")
            if event is not None:
                return event
        return self._deadline_passed() or PlaybackFinished(playback_id, self.clock())

    async def stop_playback(self, playback_id: str) -> None:
        pass  # AGI plays synchronously: nothing is playing now

    async def start_timer(self, timer_id: str, seconds: float) -> Event:
        wait, deadline = seconds, False
        if self._menu_deadline is not None:
            left = self._menu_deadline - time.monotonic()
            if left <= 0:
                return DeadlinePassed(self.clock())
            if left < seconds:
                wait, deadline = left, True
        ms = max(1, math.ceil(wait * 1000))
        reply = await self.conn.command("WAIT FOR DIGIT", str(ms),
                                        timeout=self._blocking_timeout())
        event = await self._digit_or_end(reply, "WAIT FOR DIGIT")
        if event is not None:
            return event
        return DeadlinePassed(self.clock()) if deadline else TimerFired(timer_id, self.clock())

    async def cancel_timer(self, timer_id: str) -> None:
        pass  # the wait already ended with the command that returned

    async def arm_deadline(self, seconds: float) -> None:
        self._menu_deadline = time.monotonic() + seconds

    async def disarm_deadline(self) -> None:
        self._menu_deadline = None

    async def set_variables(self, pairs: tuple[tuple[str, str], ...]) -> Event | None:
        # The prompts already put the channel in this language.
        pairs = tuple(p for p in pairs if p != ("CHANNEL(language)", self._channel_language))
        for name, value in assignments(pairs):
            if hung := self._hung_up(await self.conn.command("SET VARIABLE", name, value)):
                return hung
        return None

    async def start_recording(self, path: str) -> None:
        if not _SAFE_PATH.fullmatch(path):
            raise AgiError(f"recording path {path!r} has characters MixMonitor splits on")
        reply = await self.conn.command("EXEC", "MixMonitor",
                                        f"{path},{self.options}" if self.options else path)
        if reply.code == 200 and reply.result == 0:
            return
        raise AgiError("MixMonitor is not available in this Asterisk" if reply.result == -2
                       else f"MixMonitor: {reply.text}")

    async def continue_(self, destination: Destination | None) -> Event | None:
        if destination is None:
            return None  # closing the connection returns to the dialplan after AGI()
        for words, arg in (("SET CONTEXT", destination.context),
                           ("SET EXTENSION", destination.exten),
                           ("SET PRIORITY", str(destination.priority))):
            event = await self._checked(await self.conn.command(words, arg), words)
            if event is not None:
                return event
        return None

    async def hangup(self) -> None:
        await self.conn.command("HANGUP")

    def close(self) -> None:
        pass  # the server closes the connection

    # -- replies -------------------------------------------------------------------

    def _blocking_timeout(self) -> float:
        return max(1.0, self._hard_deadline - time.monotonic())

    def _deadline_passed(self) -> DeadlinePassed | None:
        if self._menu_deadline is not None and time.monotonic() >= self._menu_deadline:
            return DeadlinePassed(self.clock())
        return None

    async def _digit_or_end(self, reply: Reply, what: str) -> Event | None:
        """A digit, a hang-up, a failure, or None when the command simply ended."""
        event = await self._checked(reply, what)
        if event is not None or not reply.result:
            return event
        digit = chr(reply.result) if 0 < reply.result < 0x110000 else ""
        if digit not in DTMF_KEYS:
            return Failed(f"AGI {what}: unexpected result {reply.result}", self.clock())
        return self._deadline_passed() or DigitPressed(digit, self.clock())

    def _hung_up(self, reply: Reply) -> HungUp | None:
        return HungUp(self.clock()) if self.conn.hung_up or reply.code == _DEAD else None

    async def _checked(self, reply: Reply, what: str) -> Event | None:
        """HungUp / Failed for a reply that is not a success, else None."""
        if hung := self._hung_up(reply):
            return hung
        if reply.code != 200:
            log.warning("call %s: AGI rejected %s: %s", self.call_id, what, reply.text)
            return Failed(f"AGI {what}: {reply.text}", self.clock())
        if reply.result is not None and reply.result < 0:
            # -1 is both "hung up" and "failed" (a missing sound file): ask the channel.
            status = await self.conn.command("CHANNEL STATUS")
            if hung := self._hung_up(status):
                return hung
            return Failed(f"AGI {what} failed", self.clock())
        return None

    async def _use_language(self, language: str) -> None:
        """Sounds follow the channel's language; ARI passes it per playback instead.

        It is not set back afterwards: the flow's SetVariables leaves the channel in
        the caller's language for the rest of the dialplan, in both modes.
        """
        if language and language != self._channel_language:
            await self.conn.command("SET VARIABLE", "CHANNEL(language)", language)
            self._channel_language = language
