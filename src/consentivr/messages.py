"""What goes into and comes out of the pure call flow (:mod:`consentivr.flow`).

Events are what happened (fed to :meth:`CallFlow.handle`); commands are what the
flow wants done (run by :mod:`consentivr.driver` through a transport). Like h11's
``_events.py`` beside ``_state.py``: frozen dataclasses, no behaviour, no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from consentivr.model import Decision, Destination

Clock = Callable[[], float]  # epoch seconds, like time.time


class Outcome(StrEnum):
    """How a call's menu ended."""

    COMPLETED = "completed"  # every question was asked (answered, or silence past retries)
    ABANDONED = "abandoned"  # the caller hung up before the end
    TIMEOUT = "timeout"  # the whole menu ran past max_menu_seconds
    ERROR = "error"  # a failure of ours: nothing counts


# --- events -----------------------------------------------------------------


@dataclass(frozen=True)
class CallStarted:
    at: float


@dataclass(frozen=True)
class DigitPressed:
    digit: str
    at: float


@dataclass(frozen=True)
class PlaybackFinished:
    playback_id: str
    at: float


@dataclass(frozen=True)
class TimerFired:
    """A per-question (or language menu) wait ran out."""

    timer_id: str
    at: float


@dataclass(frozen=True)
class DeadlinePassed:
    """The whole menu ran past ``max_menu_seconds``."""

    at: float


@dataclass(frozen=True)
class HungUp:
    at: float


@dataclass(frozen=True)
class DecisionLogged:
    """The answer to :class:`LogDecision`: was the row durably committed?"""

    ok: bool
    at: float
    error: str | None = None


@dataclass(frozen=True)
class RecordingStarted:
    """The answer to :class:`StartRecording`: did Asterisk confirm it?"""

    ok: bool
    at: float
    error: str | None = None


@dataclass(frozen=True)
class Failed:
    """A command of ours failed (playback, answer, continue...)."""

    reason: str
    at: float


Event = (
    CallStarted
    | DigitPressed
    | PlaybackFinished
    | TimerFired
    | DeadlinePassed
    | HungUp
    | DecisionLogged
    | RecordingStarted
    | Failed
)
EVENT_TYPES: tuple[type, ...] = (
    CallStarted,
    DigitPressed,
    PlaybackFinished,
    TimerFired,
    DeadlinePassed,
    HungUp,
    DecisionLogged,
    RecordingStarted,
    Failed,
)


# --- commands ---------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    pass


@dataclass(frozen=True)
class Play:
    playback_id: str
    media: tuple[str, ...]
    language: str


@dataclass(frozen=True)
class StopPlayback:
    playback_id: str


@dataclass(frozen=True)
class StartTimer:
    """Wait ``seconds`` for a key; :class:`TimerFired` when none comes."""

    timer_id: str
    seconds: float


@dataclass(frozen=True)
class CancelTimer:
    timer_id: str


@dataclass(frozen=True)
class ArmDeadline:
    """The whole menu may take ``seconds``; then :class:`DeadlinePassed`."""

    seconds: float


@dataclass(frozen=True)
class DisarmDeadline:
    pass


@dataclass(frozen=True)
class KeyPress:
    digit: str
    at: float
    # "language", "notice", a purpose name (an answer, or an invalid key), or caller
    # help, never an answer: "repeat:<where>", "more_info:<where>" (<where> is
    # "notice", "more_info" or a purpose name) and "more_info" (a key that cut it short)
    step: str


@dataclass(frozen=True)
class DecisionRecord:
    """Everything the consent log keeps about one call's decision."""

    call_id: str
    channel_id: str
    linkedid: str
    channel_name: str
    caller: str | None
    flow: str
    language: str
    notice_version: str
    started_at: float
    decided_at: float
    keys: tuple[KeyPress, ...]
    decisions: Mapping[str, Decision]
    retention_until: Mapping[str, float]  # epoch seconds, per purpose
    recording_path: str | None  # set only when recording is allowed
    outcome: str  # completed | abandoned | timeout | error: <reason>
    recording_until: float | None = None  # retention deadline of the recording, if any
    callback_until: float | None = None  # set only when the caller asked for a callback

    @property
    def allows_processing(self) -> bool:
        """Does the row let anyone act on the call (record it, call back)?"""
        return self.recording_path is not None or self.callback_until is not None


@dataclass(frozen=True)
class LogDecision:
    record: DecisionRecord


@dataclass(frozen=True)
class StartRecording:
    path: str


@dataclass(frozen=True)
class MarkRecording:
    """Tell the log whether recording was confirmed started."""

    call_id: str
    confirmed: bool
    error: str | None = None


@dataclass(frozen=True)
class SetVariables:
    variables: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Continue:
    """Back into the dialplan: at ``destination``, or (None) right after our app."""

    destination: Destination | None


@dataclass(frozen=True)
class Hangup:
    pass


Command = (
    Answer
    | Play
    | StopPlayback
    | StartTimer
    | CancelTimer
    | ArmDeadline
    | DisarmDeadline
    | LogDecision
    | StartRecording
    | MarkRecording
    | SetVariables
    | Continue
    | Hangup
)


# --- identity and what the log already holds --------------------------------------


@dataclass(frozen=True)
class CallInfo:
    """Identity of the call, from the adapter. ``call_id`` is ours, never caller data."""

    call_id: str
    channel_id: str  # Asterisk uniqueid of the caller's channel
    linkedid: str = ""
    channel_name: str = ""
    caller: str | None = None


@dataclass(frozen=True)
class LoggedCall:
    """What the consent log durably holds for one channel (read on recovery)."""

    call_id: str
    flow: str
    language: str
    decisions: Mapping[str, str]
    recording_path: str | None  # set only when the decision allowed recording
    recording_confirmed: bool | None  # None: never marked (we died before)


@dataclass(frozen=True)
class LateWrite:
    """A consent log write to make after the call went on (see ``flow.late_commit``)."""

    kind: str  # "append" or "void_late_consent"
    payload: object
