"""The consent call flow as a pure state machine (sans-IO).

Events go in (:meth:`CallFlow.handle`), commands come out (both in
:mod:`consentivr.messages`). There is no ``await`` and no I/O here:
:mod:`consentivr.driver` runs the commands through a transport (ARI or FastAGI) and
feeds back what happened. Every transition is listed in ``TRANSITIONS``, one literal
table; a pair that is not listed is ignored on purpose (a late digit after the
decision, a stale timer).

Every consent decision lives here, for both modes: the answers, retries, the menu
deadline, which variables the dialplan sees (also for an unknown flow and for a call
taken back after a restart), what a decision committed too late means
(:func:`late_commit`), and whether recovery may (re)start a recording
(:func:`recovery_recording`).

Privacy by default: silence, invalid keys past the retries, a hang-up, or any
failure reported with :class:`Failed` leave every consent purpose without a yes,
and recording starts only after :class:`DecisionLogged` says the row is committed.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from consentivr.features import FEATURE_NAME as WITHDRAW_FEATURE
from consentivr.messages import (
    Answer,
    ArmDeadline,
    CallInfo,
    CallStarted,
    CancelTimer,
    Command,
    Continue,
    DeadlinePassed,
    DecisionLogged,
    DecisionRecord,
    DigitPressed,
    DisarmDeadline,
    Event,
    Failed,
    Hangup,
    HungUp,
    KeyPress,
    LateWrite,
    LogDecision,
    LoggedCall,
    MarkRecording,
    Outcome,
    Play,
    PlaybackFinished,
    RecordingStarted,
    SetVariables,
    StartRecording,
    StartTimer,
    StopPlayback,
    TimerFired,
)
from consentivr.model import Decision, Flow, Prompt, Purpose

DAY = 86400.0
LATE_COMMIT_REASON = "decision committed after the call went on"
_RECORDING_NAME = re.compile(r"[0-9a-f]{32}\.wav")
_PURPOSE_NAME = re.compile(r"[A-Za-z0-9_]+")


# --- states -----------------------------------------------------------------


class Phase(StrEnum):
    START = "start"
    LANGUAGE_PROMPT = "language_prompt"  # the language menu is playing
    LANGUAGE_WAIT = "language_wait"  # waiting for a language key
    NOTICE = "notice"  # the privacy notice is playing
    QUESTION_PROMPT = "question_prompt"  # a purpose's question is playing
    QUESTION_WAIT = "question_wait"  # waiting for the answer key
    MORE_INFO = "more_info"  # the "more information" prompt is playing
    LOGGING = "logging"  # waiting for the decision to be committed
    RECORDING = "recording"  # waiting for Asterisk to confirm MixMonitor
    DONE = "done"  # continued into the dialplan, or hung up


@dataclass
class _Progress:
    language: str
    purpose_index: int = 0
    attempts: int = 0  # attempts used on the current step
    keys: list[KeyPress] = field(default_factory=list)
    decisions: dict[str, Decision] = field(default_factory=dict)
    playback_id: str | None = None
    timer_id: str | None = None
    started_at: float = 0.0
    outcome: Outcome = Outcome.COMPLETED
    error: str | None = None  # why, when the outcome is ERROR
    hung_up: bool = False
    recording_path: str | None = None
    blocked: bool = False  # a yes to recording that the gate kept from starting


Handler = Callable[["CallFlow", Event], list[Command]]


class CallFlow:
    """One call through one flow. Feed it events; run the commands it returns."""

    def __init__(self, flow: Flow, call: CallInfo, recordings_dir: str,
                 recording_blocked: str | None = None) -> None:
        """``recording_blocked``: why no recording may start for this call (the
        withdrawal key cannot be honoured); the caller's answers are logged as given."""
        self.flow = flow
        self.call = call
        self.recordings_dir = recordings_dir.rstrip("/")
        self.recording_blocked = recording_blocked
        self.phase = Phase.START
        # By the caller's country, where the flow maps it; a language menu still asks.
        self._p = _Progress(language=flow.language_for(call.caller))
        self._counter = 0

    # -- public ----------------------------------------------------------

    @property
    def language(self) -> str:
        return self._p.language

    @property
    def decisions(self) -> Mapping[str, Decision]:
        return dict(self._p.decisions)

    @property
    def keys(self) -> tuple[KeyPress, ...]:
        return tuple(self._p.keys)

    @property
    def outcome(self) -> Outcome:
        return self._p.outcome

    def handle(self, event: Event) -> list[Command]:
        handler = TRANSITIONS.get((self.phase, type(event)))
        if handler is None:
            return []
        return handler(self, event)

    # -- helpers ---------------------------------------------------------

    def _next_id(self, kind: str) -> str:
        self._counter += 1
        return f"{self.call.call_id}-{kind}{self._counter}"

    def _play(self, prompts: list[Prompt]) -> list[Command]:
        media = tuple(m for prompt in prompts for m in prompt.media)
        self._p.playback_id = self._next_id("p")
        return [Play(self._p.playback_id, media, self._p.language)]

    def _stop_playback(self) -> list[Command]:
        pid, self._p.playback_id = self._p.playback_id, None
        return [StopPlayback(pid)] if pid else []

    def _start_wait(self, seconds: float) -> list[Command]:
        self._p.timer_id = self._next_id("t")
        return [StartTimer(self._p.timer_id, seconds)]

    def _cancel_wait(self) -> list[Command]:
        tid, self._p.timer_id = self._p.timer_id, None
        return [CancelTimer(tid)] if tid else []

    def _is_current_playback(self, event: Event) -> bool:
        return isinstance(event, PlaybackFinished) and event.playback_id == self._p.playback_id

    def _is_current_timer(self, event: Event) -> bool:
        return isinstance(event, TimerFired) and event.timer_id == self._p.timer_id

    @property
    def _purpose(self) -> Purpose:
        return self.flow.purposes[self._p.purpose_index]

    def _invalid_prompt(self) -> list[Prompt]:
        prompt = self.flow.invalid.get(self._p.language)
        return [prompt] if prompt else []

    # -- steps -----------------------------------------------------------

    def _ask_language(self, again: bool) -> list[Command]:
        menu = self.flow.language_menu
        assert menu is not None
        self.phase = Phase.LANGUAGE_PROMPT
        return self._play([*(self._invalid_prompt() if again else []), menu.prompt])

    def _play_notice(self) -> list[Command]:
        self.phase = Phase.NOTICE
        self._p.attempts = 0  # language-menu attempts must not eat the first question's retries
        return self._play([self.flow.notice[self._p.language]])

    def _replay_notice(self) -> list[Command]:
        """The notice again (the repeat key): the current question follows, retries kept."""
        self.phase = Phase.NOTICE
        return self._play([self.flow.notice[self._p.language]])

    def _play_more_info(self) -> list[Command]:
        self.phase = Phase.MORE_INFO
        return self._play([self.flow.more_info[self._p.language]])

    def _caller_help(self, event: DigitPressed, where: str) -> list[Command] | None:
        """The repeat or more-information key: never an answer, and no retry used.

        Logged among the keys with its own step (``repeat:<where>``,
        ``more_info:<where>``); the menu deadline keeps running meanwhile.
        """
        flow = self.flow
        if event.digit == flow.repeat_key:
            step, then = "repeat", self._replay_notice
        elif event.digit == flow.more_info_key and flow.more_info:
            step, then = "more_info", self._play_more_info
        else:
            return None
        self._p.keys.append(KeyPress(event.digit, event.at, f"{step}:{where}"))
        return self._stop_playback() + self._cancel_wait() + then()

    def _ask_question(self, again: bool = False) -> list[Command]:
        if self._p.purpose_index >= len(self.flow.purposes):
            return self._decide()
        self.phase = Phase.QUESTION_PROMPT
        question = self._purpose.question[self._p.language]
        return self._play([*(self._invalid_prompt() if again else []), question])

    def _answer_purpose(self, decision: Decision) -> list[Command]:
        self._p.decisions[self._purpose.name] = decision
        self._p.purpose_index += 1
        self._p.attempts = 0
        return self._ask_question()

    def _retry_or(self, give_up: Callable[[], list[Command]], ask: Callable[[bool], list[Command]],
                  retries: int) -> list[Command]:
        if self._p.attempts < retries:
            self._p.attempts += 1
            return ask(True)
        return give_up()

    def _decide(self) -> list[Command]:
        """All questions are done (or the call ended): log first, record only after."""
        for purpose in self.flow.purposes:
            self._p.decisions.setdefault(purpose.name, self._fallback_decision(purpose))
        rec = self.flow.recording_purpose
        allow_recording = (
            rec is not None
            and self._p.outcome in (Outcome.COMPLETED, Outcome.TIMEOUT)
            and self._p.decisions[rec.name].allows_processing
        )
        # A yes, but the caller could not take it back: record nothing (said in the log).
        self._p.blocked = allow_recording and self.recording_blocked is not None
        self._p.recording_path = (
            f"{self.recordings_dir}/{self.call.call_id}.wav"
            if allow_recording and not self._p.blocked else None
        )
        self.phase = Phase.LOGGING
        return [*self._stop_playback(), *self._cancel_wait(), DisarmDeadline(),
                LogDecision(self._record(decided_at=self._last_at))]

    def _fallback_decision(self, purpose: Purpose) -> Decision:
        match self._p.outcome:
            case Outcome.ABANDONED:
                return Decision.ABANDONED
            case Outcome.TIMEOUT:
                # Past the menu deadline nothing unanswered counts as a go-ahead, even
                # where only an objection would count: the caller may not have heard it.
                return Decision.NO_ANSWER
            case Outcome.ERROR:
                return Decision.ERROR
        return purpose.silent_decision

    def _record(self, decided_at: float) -> DecisionRecord:
        c = self.call
        until = {p.name: decided_at + p.retention_days * DAY for p in self.flow.purposes}
        rec = self.flow.recording_purpose
        callback = self.flow.callback_purpose
        callback_yes = (
            callback is not None and self._p.decisions[callback.name].allows_processing
        )
        return DecisionRecord(
            call_id=c.call_id,
            channel_id=c.channel_id,
            linkedid=c.linkedid or c.channel_id,
            channel_name=c.channel_name,
            caller=c.caller,
            flow=self.flow.name,
            language=self._p.language,
            notice_version=self.flow.notice_version(self._p.language),
            started_at=self._p.started_at,
            decided_at=decided_at,
            keys=tuple(self._p.keys),
            decisions=dict(self._p.decisions),
            retention_until=until,
            recording_path=self._p.recording_path,
            outcome=(f"error: {self._p.error}" if self._p.outcome is Outcome.ERROR
                     else self._p.outcome.value),
            recording_until=until[rec.name] if rec and self._p.recording_path else None,
            callback_until=until[callback.name] if callback and callback_yes else None,
        )

    def _variables(self, logged: bool) -> SetVariables:
        decisions = self._p.decisions
        rec = self.flow.recording_purpose
        recording = bool(
            logged and rec is not None and self._p.recording_path
            and decisions[rec.name].allows_processing
        )
        # Only a committed row may tell the dialplan that processing is allowed.
        values = {name: d.value if logged else Decision.ERROR.value
                  for name, d in decisions.items()}
        return call_variables(self.call.call_id, self._p.language, logged=logged,
                              recording=recording, decisions=values)

    def _finish(self, logged: bool) -> list[Command]:
        self.phase = Phase.DONE
        if self._p.hung_up:
            return []
        return [self._variables(logged), Continue(self.flow.destination)]

    # -- transition handlers ----------------------------------------------

    _last_at: float = 0.0

    def on_start(self, event: Event) -> list[Command]:
        assert isinstance(event, CallStarted)
        self._p.started_at = self._last_at = event.at
        cmds: list[Command] = [Answer(), ArmDeadline(self.flow.max_menu_seconds)]
        if self.flow.language_menu is not None and len(self.flow.languages) > 1:
            return cmds + self._ask_language(again=False)
        return cmds + self._play_notice()

    def on_language_digit(self, event: Event) -> list[Command]:
        assert isinstance(event, DigitPressed)
        self._last_at = event.at
        menu = self.flow.language_menu
        assert menu is not None
        self._p.keys.append(KeyPress(event.digit, event.at, "language"))
        cmds = self._stop_playback() + self._cancel_wait()
        language = menu.keys.get(event.digit)
        if language is not None:
            self._p.language = language
            self._p.attempts = 0
            return cmds + self._play_notice()
        return cmds + self._retry_or(self._play_notice, self._ask_language, menu.retries)

    def on_language_prompt_done(self, event: Event) -> list[Command]:
        if not self._is_current_playback(event):
            return []
        menu = self.flow.language_menu
        assert menu is not None
        self._p.playback_id = None
        self.phase = Phase.LANGUAGE_WAIT
        return self._start_wait(menu.timeout)

    def on_language_timeout(self, event: Event) -> list[Command]:
        if not self._is_current_timer(event):
            return []
        menu = self.flow.language_menu
        assert menu is not None
        self._p.timer_id = None
        return self._retry_or(self._play_notice, self._ask_language, menu.retries)

    def on_notice_digit(self, event: Event) -> list[Command]:
        """Barge-in: a key during the notice skips to the first question.

        The key is logged but is not taken as an answer: consent is given to a
        question the caller has heard, never to one they skipped.
        """
        assert isinstance(event, DigitPressed)
        self._last_at = event.at
        if (helped := self._caller_help(event, "notice")) is not None:
            return helped
        self._p.keys.append(KeyPress(event.digit, event.at, "notice"))
        return self._stop_playback() + self._ask_question()

    def on_notice_done(self, event: Event) -> list[Command]:
        if not self._is_current_playback(event):
            return []
        self._last_at = event.at  # with no purposes, the decision is taken now
        self._p.playback_id = None
        return self._ask_question()

    def _answer_digit(self, event: DigitPressed) -> list[Command]:
        purpose = self._purpose
        self._p.keys.append(KeyPress(event.digit, event.at, purpose.name))
        decision = purpose.decide(event.digit)
        if decision is not None:
            return self._answer_purpose(decision)
        return self._retry_or(
            lambda: self._answer_purpose(purpose.silent_decision),
            self._ask_question,
            purpose.retries,
        )

    def on_question_digit(self, event: Event) -> list[Command]:
        assert isinstance(event, DigitPressed)
        self._last_at = event.at
        if (helped := self._caller_help(event, self._purpose.name)) is not None:
            return helped
        return self._stop_playback() + self._cancel_wait() + self._answer_digit(event)

    def on_question_prompt_done(self, event: Event) -> list[Command]:
        if not self._is_current_playback(event):
            return []
        self._p.playback_id = None
        self.phase = Phase.QUESTION_WAIT
        return self._start_wait(self._purpose.timeout)

    def on_question_timeout(self, event: Event) -> list[Command]:
        if not self._is_current_timer(event):
            return []
        self._last_at = event.at
        self._p.timer_id = None
        purpose = self._purpose
        return self._retry_or(
            lambda: self._answer_purpose(purpose.silent_decision),
            self._ask_question,
            purpose.retries,
        )

    def on_more_info_digit(self, event: Event) -> list[Command]:
        """A key during "more information": repeat or more info again, or on to the question.

        Any other key is logged but is not an answer (as in the notice): the caller
        answers the question once it is asked again.
        """
        assert isinstance(event, DigitPressed)
        self._last_at = event.at
        if (helped := self._caller_help(event, "more_info")) is not None:
            return helped
        self._p.keys.append(KeyPress(event.digit, event.at, "more_info"))
        return self._stop_playback() + self._ask_question()

    def on_more_info_done(self, event: Event) -> list[Command]:
        """Back to where the caller was: the current question (the first one after the
        notice), asked again in full."""
        if not self._is_current_playback(event):
            return []
        self._last_at = event.at
        self._p.playback_id = None
        return self._ask_question()

    def on_menu_deadline(self, event: Event) -> list[Command]:
        assert isinstance(event, DeadlinePassed)
        self._last_at = event.at
        # The whole menu took too long: every purpose still open stays without a yes.
        self._p.outcome = Outcome.TIMEOUT
        return self._decide()

    def on_hangup_in_menu(self, event: Event) -> list[Command]:
        assert isinstance(event, HungUp)
        self._last_at = event.at
        self._p.hung_up = True
        self._p.outcome = Outcome.ABANDONED
        cmds = self._decide()
        # Nothing to stop on a dead channel; keep only the log write and our timers.
        return [c for c in cmds if isinstance(c, LogDecision | CancelTimer | DisarmDeadline)]

    def on_hangup_late(self, event: Event) -> list[Command]:
        self._p.hung_up = True
        return []

    def on_failure_in_menu(self, event: Event) -> list[Command]:
        assert isinstance(event, Failed)
        self._last_at = event.at
        self._p.outcome, self._p.error = Outcome.ERROR, event.reason
        # Any error of ours: nothing answered counts any more.
        self._p.decisions = {p.name: Decision.ERROR for p in self.flow.purposes}
        return self._decide()

    def on_logged(self, event: Event) -> list[Command]:
        assert isinstance(event, DecisionLogged)
        if not event.ok or self._p.hung_up or self._p.recording_path is None:
            cmds: list[Command] = []
            if event.ok and self._p.blocked:
                cmds.append(MarkRecording(self.call.call_id, False, self.recording_blocked))
            if event.ok and self._p.recording_path is not None:
                # Gone before recording could start: say so in the log.
                cmds.append(MarkRecording(self.call.call_id, False, "caller hung up"))
            if not event.ok:
                self._p.recording_path = None
            return cmds + self._finish(logged=event.ok)
        self.phase = Phase.RECORDING
        return [StartRecording(self._p.recording_path)]

    def on_recording_started(self, event: Event) -> list[Command]:
        assert isinstance(event, RecordingStarted)
        if not event.ok:
            self._p.recording_path = None
        mark = MarkRecording(self.call.call_id, event.ok, event.error)
        return [mark, *self._finish(logged=True)]

    def on_failure_after_menu(self, event: Event) -> list[Command]:
        """Continue itself failed: do not leave the caller hanging in our app."""
        assert isinstance(event, Failed)
        if self.phase is Phase.DONE and not self._p.hung_up:
            self._p.hung_up = True
            return [Hangup()]
        return []


# The transition table: (phase, event type) -> handler. Anything missing is ignored.
TRANSITIONS: dict[tuple[Phase, type], Handler] = {
    (Phase.START, CallStarted): CallFlow.on_start,
    (Phase.START, HungUp): CallFlow.on_hangup_in_menu,
    (Phase.START, Failed): CallFlow.on_failure_in_menu,

    (Phase.LANGUAGE_PROMPT, DigitPressed): CallFlow.on_language_digit,
    (Phase.LANGUAGE_PROMPT, PlaybackFinished): CallFlow.on_language_prompt_done,
    (Phase.LANGUAGE_PROMPT, DeadlinePassed): CallFlow.on_menu_deadline,
    (Phase.LANGUAGE_PROMPT, HungUp): CallFlow.on_hangup_in_menu,
    (Phase.LANGUAGE_PROMPT, Failed): CallFlow.on_failure_in_menu,

    (Phase.LANGUAGE_WAIT, DigitPressed): CallFlow.on_language_digit,
    (Phase.LANGUAGE_WAIT, TimerFired): CallFlow.on_language_timeout,
    (Phase.LANGUAGE_WAIT, DeadlinePassed): CallFlow.on_menu_deadline,
    (Phase.LANGUAGE_WAIT, HungUp): CallFlow.on_hangup_in_menu,
    (Phase.LANGUAGE_WAIT, Failed): CallFlow.on_failure_in_menu,

    (Phase.NOTICE, DigitPressed): CallFlow.on_notice_digit,
    (Phase.NOTICE, PlaybackFinished): CallFlow.on_notice_done,
    (Phase.NOTICE, DeadlinePassed): CallFlow.on_menu_deadline,
    (Phase.NOTICE, HungUp): CallFlow.on_hangup_in_menu,
    (Phase.NOTICE, Failed): CallFlow.on_failure_in_menu,

    (Phase.QUESTION_PROMPT, DigitPressed): CallFlow.on_question_digit,
    (Phase.QUESTION_PROMPT, PlaybackFinished): CallFlow.on_question_prompt_done,
    (Phase.QUESTION_PROMPT, DeadlinePassed): CallFlow.on_menu_deadline,
    (Phase.QUESTION_PROMPT, HungUp): CallFlow.on_hangup_in_menu,
    (Phase.QUESTION_PROMPT, Failed): CallFlow.on_failure_in_menu,

    (Phase.QUESTION_WAIT, DigitPressed): CallFlow.on_question_digit,
    (Phase.QUESTION_WAIT, TimerFired): CallFlow.on_question_timeout,
    (Phase.QUESTION_WAIT, DeadlinePassed): CallFlow.on_menu_deadline,
    (Phase.QUESTION_WAIT, HungUp): CallFlow.on_hangup_in_menu,
    (Phase.QUESTION_WAIT, Failed): CallFlow.on_failure_in_menu,

    (Phase.MORE_INFO, DigitPressed): CallFlow.on_more_info_digit,
    (Phase.MORE_INFO, PlaybackFinished): CallFlow.on_more_info_done,
    (Phase.MORE_INFO, DeadlinePassed): CallFlow.on_menu_deadline,
    (Phase.MORE_INFO, HungUp): CallFlow.on_hangup_in_menu,
    (Phase.MORE_INFO, Failed): CallFlow.on_failure_in_menu,

    (Phase.LOGGING, DecisionLogged): CallFlow.on_logged,
    (Phase.LOGGING, HungUp): CallFlow.on_hangup_late,

    (Phase.RECORDING, RecordingStarted): CallFlow.on_recording_started,
    (Phase.RECORDING, HungUp): CallFlow.on_hangup_late,

    (Phase.DONE, HungUp): CallFlow.on_hangup_late,
    (Phase.DONE, Failed): CallFlow.on_failure_after_menu,
}


# --- decisions outside one call's menu ------------------------------------------------


def call_variables(call_id: str, language: str, *, logged: bool, recording: bool,
                   decisions: Mapping[str, str]) -> SetVariables:
    """The channel variables the dialplan sees after our app, in every mode and case."""
    pairs = [
        ("CONSENTIVR_CALL_ID", call_id),
        ("CONSENTIVR_LANGUAGE", language),
        # So that stock sounds later in the dialplan speak the caller's language.
        ("CHANNEL(language)", language),
        ("CONSENTIVR_LOGGED", "yes" if logged else "no"),
        ("CONSENTIVR_RECORDING", "yes" if recording else "no"),
    ]
    if recording:
        # Arms the withdrawal key (features.conf) for when the call is bridged.
        pairs.append(("DYNAMIC_FEATURES", WITHDRAW_FEATURE))
    for name, value in decisions.items():
        pairs.append((f"CONSENTIVR_DECISION_{name.upper()}", value))
    return SetVariables(tuple(pairs))


def unknown_flow() -> list[Command]:
    """A call for a flow we do not have: nothing is asked, logged or recorded.

    ``CONSENTIVR_LOGGED`` stays unset, so the rendered dialplan runs its fallback
    (the "not recorded" prompt, every decision ``error``) in both modes.
    """
    return [SetVariables((("CONSENTIVR_RECORDING", "no"),)), Continue(None)]


def unlogged_variables(flow: Flow | None) -> SetVariables:
    """Variables for a taken-back call that has no committed row: nothing is allowed."""
    pairs = [("CONSENTIVR_LOGGED", "no"), ("CONSENTIVR_RECORDING", "no")]
    for purpose in flow.purposes if flow else ():
        pairs.append((f"CONSENTIVR_DECISION_{purpose.name.upper()}", Decision.ERROR.value))
    return SetVariables(tuple(pairs))


class RecoveryRecording(StrEnum):
    """What to do about the recording of a call taken back after a restart."""

    RUNNING = "running"  # confirmed before we died: MixMonitor outlived us in Asterisk
    START = "start"  # a committed yes that was never confirmed: start it now
    NONE = "none"  # no yes, a row we do not trust, or the call is being hung up


def recovery_recording(logged: LoggedCall, recordings_dir: str, hanging_up: bool,
                       blocked: bool = False) -> RecoveryRecording:
    """May recovery (re)start the recording of a call whose decision is committed?

    Only for the exact file the row names in our recordings dir, named by our own
    call id; never when the call is about to be hung up, nor while the withdrawal key
    cannot be honoured (``blocked``).
    """
    expected = f"{recordings_dir.rstrip('/')}/{logged.call_id}.wav"
    allowed = (logged.recording_path == expected
               and _RECORDING_NAME.fullmatch(f"{logged.call_id}.wav") is not None)
    if allowed and logged.recording_confirmed:
        return RecoveryRecording.RUNNING
    if allowed and logged.recording_confirmed is None and not hanging_up and not blocked:
        return RecoveryRecording.START
    return RecoveryRecording.NONE


def resumed_variables(logged: LoggedCall, recording: bool) -> SetVariables:
    """Variables for a taken-back call whose decision was committed before we died.

    The same set as a call that never left us, withdrawal key included when recorded.
    """
    valid = {d.value for d in Decision}
    decisions = {name: value for name, value in logged.decisions.items()
                 if _PURPOSE_NAME.fullmatch(name) and value in valid}
    return call_variables(logged.call_id, logged.language, logged=True,
                          recording=recording, decisions=decisions)


def acted_on_unlogged(record: DecisionRecord, why: str) -> DecisionRecord:
    """The row for a call that went on before its decision was committed.

    The call was told nothing is allowed (every purpose ``error``, no recording), so
    that is what the row says; the keys pressed stay, as evidence.
    """
    why = why.replace("\n", " ").replace("\r", " ")[:120]
    return dataclasses.replace(
        record,
        decisions={name: Decision.ERROR for name in record.decisions},
        recording_path=None, recording_until=None, callback_until=None,
        outcome=f"error: not logged before the call went on ({why})",
    )


def late_commit(record: DecisionRecord, *, committed: bool, error: str | None,
                at: float) -> LateWrite | None:
    """A decision write the call stopped waiting for has finished after all.

    The call went on told "not logged" (every purpose ``error``, unrecorded), so the
    log must say the same: a row that committed late and allows anything (recording
    or callback) is voided; a row that failed is written as what was acted on.
    """
    if committed:
        if not record.allows_processing:
            return None
        return LateWrite("void_late_consent", (record.call_id, LATE_COMMIT_REASON, at))
    return LateWrite("append", acted_on_unlogged(record, error or "unknown error"))
