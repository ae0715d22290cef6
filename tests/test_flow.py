"""Table-driven tests of the pure call flow: every phase against every event, whole-call
scenarios, and a hypothesis property test of the privacy invariants."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consentivr.features import FEATURE_NAME as WITHDRAW_FEATURE
from consentivr.flow import (
    DAY,
    LATE_COMMIT_REASON,
    TRANSITIONS,
    CallFlow,
    Phase,
    RecoveryRecording,
    late_commit,
    recovery_recording,
    resumed_variables,
    unknown_flow,
    unlogged_variables,
)
from consentivr.messages import (
    EVENT_TYPES,
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
    LogDecision,
    LoggedCall,
    MarkRecording,
    Play,
    PlaybackFinished,
    RecordingStarted,
    SetVariables,
    StartRecording,
    StartTimer,
    StopPlayback,
    TimerFired,
)
from consentivr.model import Basis, Decision, Flow, Prompt
from tests.flow_fixtures import (
    CALL,
    DESTINATION,
    NO,
    OBJECT,
    RECORDINGS_DIR,
    YES,
    Driver,
    drive_to,
    make_flow,
    purpose,
    standard_purposes,
)

P = Phase
RECORDING_PATH = f"{RECORDINGS_DIR}/{CALL.call_id}.wav"
MENU_PHASES = (P.LANGUAGE_PROMPT, P.LANGUAGE_WAIT, P.NOTICE, P.QUESTION_PROMPT, P.QUESTION_WAIT,
               P.MORE_INFO)
PROMPT_PHASES = (P.LANGUAGE_PROMPT, P.NOTICE, P.QUESTION_PROMPT, P.MORE_INFO)


def types(commands: list[Command]) -> list[type]:
    return [type(c) for c in commands]


# --- (1) every phase against every event type --------------------------------


def natural_event(d: Driver, kind: type) -> Event:
    """The event of ``kind`` an adapter would send next: current ids, key "1", success."""
    at = d.tick()
    if kind is CallStarted:
        return CallStarted(at)
    if kind is DigitPressed:
        return DigitPressed("1", at)  # "en" in the language menu, yes in a question
    if kind is PlaybackFinished:
        return PlaybackFinished(d.play_id or "none", at)
    if kind is TimerFired:
        return TimerFired(d.timer_id or "none", at)  # the current wait, if one runs
    if kind is DeadlinePassed:
        return DeadlinePassed(at)
    if kind is HungUp:
        return HungUp(at)
    if kind is DecisionLogged:
        return DecisionLogged(True, at)
    if kind is RecordingStarted:
        return RecordingStarted(True, at)
    if kind is Failed:
        return Failed("boom", at)
    raise AssertionError(kind)


IGNORED: tuple[bool, list[type], None] = (False, [], None)  # not in TRANSITIONS
_LOG = [DisarmDeadline, LogDecision]  # the menu deadline is disarmed with the decision
_STOP_LOG = [StopPlayback, *_LOG]
_WAIT_LOG = [CancelTimer, *_LOG]  # the wait timer too

# (phase, event type) -> (listed in TRANSITIONS, command types, next phase or None = same)
PAIR_TABLE: dict[tuple[Phase, type], tuple[bool, list[type], Phase | None]] = {
    (P.START, CallStarted): (True, [Answer, ArmDeadline, Play], P.LANGUAGE_PROMPT),
    (P.START, DigitPressed): IGNORED,
    (P.START, PlaybackFinished): IGNORED,
    (P.START, TimerFired): IGNORED,
    (P.START, DeadlinePassed): IGNORED,
    (P.START, HungUp): (True, _LOG, P.LOGGING),
    (P.START, DecisionLogged): IGNORED,
    (P.START, RecordingStarted): IGNORED,
    (P.START, Failed): (True, _LOG, P.LOGGING),
    (P.LANGUAGE_PROMPT, CallStarted): IGNORED,
    (P.LANGUAGE_PROMPT, DigitPressed): (True, [StopPlayback, Play], P.NOTICE),
    (P.LANGUAGE_PROMPT, PlaybackFinished): (True, [StartTimer], P.LANGUAGE_WAIT),
    (P.LANGUAGE_PROMPT, TimerFired): IGNORED,  # no wait runs while a prompt plays
    (P.LANGUAGE_PROMPT, DeadlinePassed): (True, _STOP_LOG, P.LOGGING),
    (P.LANGUAGE_PROMPT, HungUp): (True, _LOG, P.LOGGING),  # nothing to stop on a dead line
    (P.LANGUAGE_PROMPT, DecisionLogged): IGNORED,
    (P.LANGUAGE_PROMPT, RecordingStarted): IGNORED,
    (P.LANGUAGE_PROMPT, Failed): (True, _STOP_LOG, P.LOGGING),
    (P.LANGUAGE_WAIT, CallStarted): IGNORED,
    (P.LANGUAGE_WAIT, DigitPressed): (True, [CancelTimer, Play], P.NOTICE),
    (P.LANGUAGE_WAIT, PlaybackFinished): IGNORED,
    (P.LANGUAGE_WAIT, TimerFired): (True, [Play], P.LANGUAGE_PROMPT),  # asked again
    (P.LANGUAGE_WAIT, DeadlinePassed): (True, _WAIT_LOG, P.LOGGING),
    (P.LANGUAGE_WAIT, HungUp): (True, _WAIT_LOG, P.LOGGING),
    (P.LANGUAGE_WAIT, DecisionLogged): IGNORED,
    (P.LANGUAGE_WAIT, RecordingStarted): IGNORED,
    (P.LANGUAGE_WAIT, Failed): (True, _WAIT_LOG, P.LOGGING),
    (P.NOTICE, CallStarted): IGNORED,
    (P.NOTICE, DigitPressed): (True, [StopPlayback, Play], P.QUESTION_PROMPT),
    (P.NOTICE, PlaybackFinished): (True, [Play], P.QUESTION_PROMPT),
    (P.NOTICE, TimerFired): IGNORED,  # no wait runs while a prompt plays
    (P.NOTICE, DeadlinePassed): (True, _STOP_LOG, P.LOGGING),
    (P.NOTICE, HungUp): (True, _LOG, P.LOGGING),
    (P.NOTICE, DecisionLogged): IGNORED,
    (P.NOTICE, RecordingStarted): IGNORED,
    (P.NOTICE, Failed): (True, _STOP_LOG, P.LOGGING),
    (P.QUESTION_PROMPT, CallStarted): IGNORED,
    (P.QUESTION_PROMPT, DigitPressed): (True, [StopPlayback, Play], P.QUESTION_PROMPT),
    (P.QUESTION_PROMPT, PlaybackFinished): (True, [StartTimer], P.QUESTION_WAIT),
    (P.QUESTION_PROMPT, TimerFired): IGNORED,  # no wait runs while a prompt plays
    (P.QUESTION_PROMPT, DeadlinePassed): (True, _STOP_LOG, P.LOGGING),
    (P.QUESTION_PROMPT, HungUp): (True, _LOG, P.LOGGING),
    (P.QUESTION_PROMPT, DecisionLogged): IGNORED,
    (P.QUESTION_PROMPT, RecordingStarted): IGNORED,
    (P.QUESTION_PROMPT, Failed): (True, _STOP_LOG, P.LOGGING),
    (P.QUESTION_WAIT, CallStarted): IGNORED,
    (P.QUESTION_WAIT, DigitPressed): (True, [CancelTimer, Play], P.QUESTION_PROMPT),
    (P.QUESTION_WAIT, PlaybackFinished): IGNORED,
    (P.QUESTION_WAIT, TimerFired): (True, [Play], P.QUESTION_PROMPT),  # asked again
    (P.QUESTION_WAIT, DeadlinePassed): (True, _WAIT_LOG, P.LOGGING),
    (P.QUESTION_WAIT, HungUp): (True, _WAIT_LOG, P.LOGGING),
    (P.QUESTION_WAIT, DecisionLogged): IGNORED,
    (P.QUESTION_WAIT, RecordingStarted): IGNORED,
    (P.QUESTION_WAIT, Failed): (True, _WAIT_LOG, P.LOGGING),
    (P.MORE_INFO, CallStarted): IGNORED,
    (P.MORE_INFO, DigitPressed): (True, [StopPlayback, Play], P.QUESTION_PROMPT),  # not an answer
    (P.MORE_INFO, PlaybackFinished): (True, [Play], P.QUESTION_PROMPT),  # back to the question
    (P.MORE_INFO, TimerFired): IGNORED,  # no wait runs while a prompt plays
    (P.MORE_INFO, DeadlinePassed): (True, _STOP_LOG, P.LOGGING),
    (P.MORE_INFO, HungUp): (True, _LOG, P.LOGGING),
    (P.MORE_INFO, DecisionLogged): IGNORED,
    (P.MORE_INFO, RecordingStarted): IGNORED,
    (P.MORE_INFO, Failed): (True, _STOP_LOG, P.LOGGING),
    (P.LOGGING, CallStarted): IGNORED,
    (P.LOGGING, DigitPressed): IGNORED,  # a late key after the decision
    (P.LOGGING, PlaybackFinished): IGNORED,
    (P.LOGGING, TimerFired): IGNORED,
    (P.LOGGING, DeadlinePassed): IGNORED,
    (P.LOGGING, HungUp): (True, [], None),  # remembered: no recording, no Continue later
    (P.LOGGING, DecisionLogged): (True, [StartRecording], P.RECORDING),
    (P.LOGGING, RecordingStarted): IGNORED,
    (P.LOGGING, Failed): IGNORED,
    (P.RECORDING, CallStarted): IGNORED,
    (P.RECORDING, DigitPressed): IGNORED,
    (P.RECORDING, PlaybackFinished): IGNORED,
    (P.RECORDING, TimerFired): IGNORED,
    (P.RECORDING, DeadlinePassed): IGNORED,
    (P.RECORDING, HungUp): (True, [], None),
    (P.RECORDING, DecisionLogged): IGNORED,
    (P.RECORDING, RecordingStarted): (True, [MarkRecording, SetVariables, Continue], P.DONE),
    (P.RECORDING, Failed): IGNORED,
    (P.DONE, CallStarted): IGNORED,
    (P.DONE, DigitPressed): IGNORED,
    (P.DONE, PlaybackFinished): IGNORED,
    (P.DONE, TimerFired): IGNORED,
    (P.DONE, DeadlinePassed): IGNORED,
    (P.DONE, HungUp): (True, [], None),
    (P.DONE, DecisionLogged): IGNORED,
    (P.DONE, RecordingStarted): IGNORED,
    (P.DONE, Failed): (True, [Hangup], None),  # Continue failed: do not strand the caller
}


def test_pair_table_covers_every_phase_and_event_type() -> None:
    assert set(PAIR_TABLE) == set(itertools.product(Phase, EVENT_TYPES))
    # and it says exactly which pairs the module lists
    assert {k for k, (listed, _, _) in PAIR_TABLE.items() if listed} == set(TRANSITIONS)


@pytest.mark.parametrize(
    ("phase", "kind"), list(PAIR_TABLE), ids=[f"{p.value}-{k.__name__}" for p, k in PAIR_TABLE]
)
def test_every_phase_against_every_event(phase: Phase, kind: type) -> None:
    listed, expected, next_phase = PAIR_TABLE[(phase, kind)]
    d = drive_to(phase)
    keys, decisions = d.cf.keys, d.cf.decisions
    commands = d.feed(natural_event(d, kind))
    assert types(commands) == expected
    assert d.phase is (next_phase or phase)
    assert ((phase, kind) in TRANSITIONS) is listed
    if not listed:
        # ignored means ignored: nothing logged, nothing decided
        assert (d.cf.keys, d.cf.decisions) == (keys, decisions)


@pytest.mark.parametrize("phase", list(Phase))
def test_hangup_in_each_phase(phase: Phase) -> None:
    """After a hang-up nothing more is said to the channel, and nothing is recorded."""
    d = drive_to(phase)
    before = len(d.commands)
    d.hangup()
    if d.phase is P.LOGGING:
        d.logged(True)
    if d.phase is P.RECORDING:
        d.recorded(True)
    later = d.commands[before:]
    assert not any(isinstance(c, Play | StartRecording | Continue | SetVariables) for c in later)
    if phase in (P.START, *MENU_PHASES):
        assert d.record.outcome == "abandoned"
        assert d.record.recording_path is None
        # a hang-up in the menu leaves the unanswered purposes abandoned
        assert Decision.ABANDONED in d.record.decisions.values()
    assert d.phase is P.DONE
    assert d.hangup() == []  # and a second hang-up changes nothing
    assert d.fail() == []  # nor a failure on the dead channel


@pytest.mark.parametrize(
    ("phase", "step"),
    [
        (P.LANGUAGE_PROMPT, "language"),
        (P.NOTICE, "notice"),
        (P.QUESTION_PROMPT, "recording"),
    ],
)
def test_a_digit_during_each_prompt_stops_that_prompt(phase: Phase, step: str) -> None:
    d = drive_to(phase)
    playing = d.play_id
    commands = d.digit(YES)
    assert commands[0] == StopPlayback(playing)
    assert d.cf.keys[-1].step == step
    assert d.cf.keys[-1].digit == YES
    # the prompt that replaces it is a new playback
    new_plays = [c for c in commands if isinstance(c, Play)]
    assert len(new_plays) == 1
    assert new_plays[0].playback_id != playing


def test_a_digit_during_the_notice_is_not_an_answer() -> None:
    d = drive_to(P.NOTICE)
    commands = d.digit(YES)  # YES is the recording question's yes key
    assert d.cf.decisions == {}
    assert d.phase is P.QUESTION_PROMPT
    assert d.current_question() == "recording"  # skipped to the first question, not past it
    play = commands[-1]
    assert isinstance(play, Play)
    assert play.media == ("sound:q-recording-en",)


@pytest.mark.parametrize(
    ("phase", "kind", "stale_id"),
    [
        (P.LANGUAGE_PROMPT, PlaybackFinished, "c1-p999"),
        (P.LANGUAGE_PROMPT, TimerFired, "c1-t999"),
        (P.LANGUAGE_WAIT, TimerFired, "c1-t999"),
        (P.NOTICE, PlaybackFinished, "c1-p999"),
        (P.NOTICE, TimerFired, "c1-t999"),
        (P.QUESTION_PROMPT, PlaybackFinished, "c1-p999"),
        (P.QUESTION_PROMPT, TimerFired, "c1-t999"),
        (P.QUESTION_WAIT, TimerFired, "c1-t999"),
        # real ids of earlier steps: the language menu's playback and wait timer
        (P.NOTICE, PlaybackFinished, "first-play"),
        (P.QUESTION_PROMPT, PlaybackFinished, "first-play"),
        (P.QUESTION_WAIT, TimerFired, "first-timer"),
    ],
)
def test_stale_playback_and_timer_ids_are_ignored(phase: Phase, kind: type, stale_id: str) -> None:
    d = drive_to(phase)
    if stale_id == "first-play":
        stale_id = d.play_ids[0]
    elif stale_id == "first-timer":
        stale_id = d.timer_ids[0]
    event = (
        PlaybackFinished(stale_id, d.tick())
        if kind is PlaybackFinished
        else TimerFired(stale_id, d.tick())
    )
    assert d.feed(event) == []
    assert d.phase is phase


@pytest.mark.parametrize("phase", MENU_PHASES)
def test_menu_deadline_ends_the_menu_without_any_go_ahead(phase: Phase) -> None:
    d = drive_to(phase)
    commands = d.deadline()
    assert isinstance(commands[-1], LogDecision)
    assert DisarmDeadline() in commands
    if d.play_id and phase in PROMPT_PHASES:
        assert StopPlayback(d.play_id) in commands
    assert d.phase is P.LOGGING
    # Past the deadline even an objection-based purpose gets no go-ahead: the
    # caller may never have heard it announced.
    assert dict(d.record.decisions) == {
        "recording": Decision.NO_ANSWER,
        "callback": Decision.NO_ANSWER,
        "survey": Decision.NO_ANSWER,
    }
    assert d.record.recording_path is None
    assert d.record.outcome == "timeout"


def test_menu_deadline_keeps_the_answers_already_given() -> None:
    d = drive_to(P.QUESTION_WAIT)
    d.digit(YES)  # recording: yes
    d.deadline()  # during the callback question
    assert dict(d.record.decisions) == {
        "recording": Decision.YES,
        "callback": Decision.NO_ANSWER,
        "survey": Decision.NO_ANSWER,
    }
    assert d.record.recording_path == RECORDING_PATH
    assert d.logged() == [StartRecording(RECORDING_PATH)]


# --- (2) whole-call scenarios -------------------------------------------------

Step = Callable[[Driver], object]


def key(digit: str) -> Step:
    return lambda d: d.digit(digit)


def played(d: Driver) -> object:
    return d.played()


def timeout(d: Driver) -> object:
    return d.timer()


def hangup(d: Driver) -> object:
    return d.hangup()


def fail(d: Driver) -> object:
    return d.fail("playback failed")


def deadline(d: Driver) -> object:
    return d.deadline()


def logged(ok: bool) -> Step:
    return lambda d: d.logged(ok)


def recorded(ok: bool) -> Step:
    return lambda d: d.recorded(ok)


def start(d: Driver) -> object:
    return d.start()


def listen(d: Driver) -> object:
    """Hear the current question to its end (PlaybackFinished), then wait."""
    return d.played()


YES_, NO_, NA, AB, ER = (
    Decision.YES,
    Decision.NO,
    Decision.NO_ANSWER,
    Decision.ABANDONED,
    Decision.ERROR,
)
OBJ, NOBJ = Decision.OBJECTED, Decision.NOT_OBJECTED

# name, steps, expected decisions (recording, callback, survey), outcome,
# StartRecording emitted, Continue emitted, CONSENTIVR_RECORDING
SCENARIOS: list[tuple[str, list[Step], tuple[Decision, ...], str, bool, bool, str | None]] = [
    (
        "all yes after listening",
        [
            start,
            played,
            listen,
            key(YES),
            listen,
            key(YES),
            listen,
            timeout,
            listen,
            timeout,
            logged(True),
            recorded(True),
        ],
        (YES_, YES_, NOBJ),
        "completed",
        True,
        True,
        "yes",
    ),
    (
        "barge-in on every question",
        [start, played, key(YES), key(NO), key(OBJECT), logged(True), recorded(True)],
        (YES_, NO_, OBJ),
        "completed",
        True,
        True,
        "yes",
    ),
    (
        "barge-in on the notice is not consent",
        [
            start,
            key(YES),
            listen,
            timeout,
            listen,
            timeout,
            listen,
            timeout,
            listen,
            timeout,
            listen,
            timeout,
            listen,
            timeout,
            logged(True),
        ],
        (NA, NA, NOBJ),
        "completed",
        False,
        True,
        "no",
    ),
    (
        "recording refused",
        [start, played, key(NO), key(YES), key(OBJECT), logged(True)],
        (NO_, YES_, OBJ),
        "completed",
        False,
        True,
        "no",
    ),
    (
        "invalid key then yes",
        [start, played, key("7"), key(YES), key(NO), key(OBJECT), logged(True), recorded(True)],
        (YES_, NO_, OBJ),
        "completed",
        True,
        True,
        "yes",
    ),
    (
        "invalid keys past the retries",
        [start, played, key("7"), key("8"), key("#"), key("*"), key("0"), key("5"), logged(True)],
        (NA, NA, NOBJ),
        "completed",
        False,
        True,
        "no",
    ),
    (
        "objection purpose: any other key is invalid",
        [start, played, key(YES), key(YES), key(YES), key(YES), logged(True), recorded(True)],
        (YES_, YES_, NOBJ),
        "completed",
        True,
        True,
        "yes",
    ),
    (
        "silence everywhere",
        [
            start,
            played,
            listen,
            timeout,
            listen,
            timeout,
            listen,
            timeout,
            listen,
            timeout,
            listen,
            timeout,
            listen,
            timeout,
            logged(True),
        ],
        (NA, NA, NOBJ),
        "completed",
        False,
        True,
        "no",
    ),
    (
        "hang-up during the notice",
        [start, hangup, logged(True)],
        (AB, AB, AB),
        "abandoned",
        False,
        False,
        None,
    ),
    (
        "hang-up after a yes keeps the yes, records nothing",
        [start, played, key(YES), hangup, logged(True)],
        (YES_, AB, AB),
        "abandoned",
        False,
        False,
        None,
    ),
    (
        "hang-up before the call started",
        [hangup, logged(True)],
        (AB, AB, AB),
        "abandoned",
        False,
        False,
        None,
    ),
    (
        "failure in the menu: all error, call continues",
        [start, played, key(YES), key(YES), fail, logged(True)],
        (ER, ER, ER),
        "error: playback failed",
        False,
        True,
        "no",
    ),
    (
        "failure before the call started",
        [fail, logged(True)],
        (ER, ER, ER),
        "error: playback failed",
        False,
        True,
        "no",
    ),
    (
        "decision not logged: no recording",
        [start, played, key(YES), key(YES), key(OBJECT), logged(False)],
        (YES_, YES_, OBJ),
        "completed",
        False,
        True,
        "no",
    ),
    (
        "recording not confirmed",
        [start, played, key(YES), key(YES), key(OBJECT), logged(True), recorded(False)],
        (YES_, YES_, OBJ),
        "completed",
        True,
        True,
        "no",
    ),
    (
        "hang-up while logging",
        [start, played, key(YES), key(YES), key(OBJECT), hangup, logged(True)],
        (YES_, YES_, OBJ),
        "completed",
        False,
        False,
        None,
    ),
    (
        "hang-up while recording starts",
        [start, played, key(YES), key(YES), key(OBJECT), logged(True), hangup, recorded(True)],
        (YES_, YES_, OBJ),
        "completed",
        True,
        False,
        None,
    ),
    (
        "menu deadline during the notice",
        [start, deadline, logged(True)],
        (NA, NA, NA),
        "timeout",
        False,
        True,
        "no",
    ),
    (
        "late events after the decision change nothing",
        [
            start,
            played,
            key(YES),
            key(YES),
            key(OBJECT),
            key(NO),
            timeout,
            deadline,
            played,
            logged(True),
            key(NO),
            recorded(True),
            key(NO),
            timeout,
            played,
        ],
        (YES_, YES_, OBJ),
        "completed",
        True,
        True,
        "yes",
    ),
]


@pytest.mark.parametrize(
    ("steps", "decisions", "outcome", "records", "continues", "recording_var"),
    [s[1:] for s in SCENARIOS],
    ids=[s[0] for s in SCENARIOS],
)
def test_scenario(
    steps: list[Step],
    decisions: tuple[Decision, ...],
    outcome: str,
    records: bool,
    continues: bool,
    recording_var: str | None,
) -> None:
    d = Driver(make_flow())
    for step in steps:
        step(d)
    rec = d.record
    assert tuple(rec.decisions[name] for name in ("recording", "callback", "survey")) == decisions
    assert rec.outcome == outcome
    assert bool(d.of_type(StartRecording)) is records
    assert d.of_type(Continue) == ([Continue(DESTINATION)] if continues else [])
    if recording_var is None:
        assert d.of_type(SetVariables) == []
    else:
        assert d.variables["CONSENTIVR_RECORDING"] == recording_var
    assert d.phase is P.DONE
    check_invariants(d)


def test_invalid_key_replays_the_question_after_the_invalid_prompt() -> None:
    d = drive_to(P.QUESTION_PROMPT)
    first = d.play_id
    commands = d.digit("7")
    assert commands == [
        StopPlayback(first),
        Play(d.play_id or "", ("sound:invalid-en", "sound:q-recording-en"), "en"),
    ]
    assert d.cf.decisions == {}
    # retries=1: the second invalid key gives up with the silent decision
    d.digit("7")
    assert d.cf.decisions == {"recording": Decision.NO_ANSWER}
    assert d.current_question() == "callback"


def test_invalid_key_without_an_invalid_prompt_just_replays() -> None:
    d = Driver(make_flow(invalid=False))
    d.start()
    d.played()
    commands = d.digit("7")
    assert isinstance(commands[-1], Play)
    assert commands[-1].media == ("sound:q-recording-en",)


def test_timeout_replays_without_the_invalid_prompt() -> None:
    d = drive_to(P.QUESTION_WAIT)
    commands = d.timer()
    assert types(commands) == [Play]
    assert isinstance(commands[0], Play)
    assert commands[0].media == ("sound:invalid-en", "sound:q-recording-en")


@pytest.mark.parametrize("retries", [0, 1, 3])
def test_retries_count_per_question(retries: int) -> None:
    d = Driver(make_flow(purposes=standard_purposes(retries=retries)))
    d.start()
    d.played()
    plays_before = len(d.of_type(Play))
    for _ in range(retries):
        d.digit("7")
        assert d.current_question() == "recording"
    d.digit("7")  # one more than the retries: give up, next question
    assert d.cf.decisions == {"recording": Decision.NO_ANSWER}
    assert d.current_question() == "callback"
    # the next question starts with a fresh count
    for _ in range(retries):
        d.played()
        d.timer()
        assert d.current_question() == "callback"
    assert len(d.of_type(Play)) == plays_before + 2 * retries + 1
    assert "callback" not in d.cf.decisions
    d.played()
    d.timer()  # silence past the retries
    assert d.cf.decisions["callback"] == Decision.NO_ANSWER


@pytest.mark.parametrize(("digit", "language"), [("1", "en"), ("2", "de")])
def test_language_menu_selects_the_language(digit: str, language: str) -> None:
    d = Driver(make_flow(language_menu=True))
    d.start()
    commands = d.digit(digit)
    notice = commands[-1]
    assert notice == Play(d.play_id or "", (f"sound:notice-{language}",), language)
    d.played()
    assert d.play_media == (f"sound:q-recording-{language}",)
    d.digit(YES)
    d.digit(YES)
    d.digit(OBJECT)
    assert d.record.language == language
    assert d.record.notice_version == d.flow.notice_version(language)
    d.logged(True)
    d.recorded(True)
    assert d.variables["CONSENTIVR_LANGUAGE"] == language


def test_language_menu_invalid_key_replays_then_defaults() -> None:
    d = Driver(make_flow(language_menu=True, menu_retries=1))
    d.start()
    commands = d.digit("8")
    assert isinstance(commands[-1], Play)
    assert commands[-1].media == ("sound:invalid-en", "sound:language-menu")
    assert d.phase is P.LANGUAGE_PROMPT
    commands = d.digit("8")
    assert d.phase is P.NOTICE
    assert d.play_media == ("sound:notice-en",)  # the default language
    assert [k.step for k in d.cf.keys] == ["language", "language"]


def test_language_menu_timeouts_do_not_use_up_the_first_questions_retries() -> None:
    d = Driver(make_flow(language_menu=True, menu_retries=1))
    d.start()
    d.played()
    d.timer()  # no language key: asked again
    d.played()
    d.timer()  # again: the default language
    assert d.phase is P.NOTICE
    d.played()
    assert d.current_question() == "recording"
    d.digit("7")  # invalid: the recording question has a retry left
    assert d.cf.decisions == {}
    assert d.current_question() == "recording"
    d.digit(YES)
    assert d.cf.decisions == {"recording": Decision.YES}


def test_language_menu_with_one_language_is_skipped() -> None:
    flow = make_flow(language_menu=True, languages=("en",))
    d = Driver(flow)
    assert types(d.start()) == [Answer, ArmDeadline, Play]
    assert d.phase is P.NOTICE


def test_call_start_answers_and_arms_the_menu_deadline() -> None:
    d = Driver(make_flow(max_menu_seconds=42.0))
    commands = d.start()
    assert commands[:2] == [Answer(), ArmDeadline(42.0)]
    assert commands[2] == Play(d.play_id or "", ("sound:notice-en",), "en")


def test_question_wait_uses_the_purpose_timeout() -> None:
    flow = make_flow(purposes=[purpose("recording", records=True, timeout=7.5)])
    d = Driver(flow)
    d.start()
    d.played()
    assert d.played() == [StartTimer(d.timer_id or "", 7.5)]


# --- the decision record ------------------------------------------------------


def test_record_fields_when_everything_is_allowed() -> None:
    d = Driver(make_flow())
    d.start()
    started = d.now
    d.played()
    d.digit(YES)
    d.digit(YES)
    d.played()
    d.timer()
    d.played()
    d.timer()  # survey: silence = not objected
    decided = d.now
    rec = d.record
    assert rec.call_id == CALL.call_id
    assert rec.channel_id == CALL.channel_id
    assert rec.linkedid == CALL.channel_id  # no linkedid given: the channel is its own
    assert rec.channel_name == CALL.channel_name
    assert rec.caller == CALL.caller
    assert rec.flow == "main"
    assert (rec.started_at, rec.decided_at) == (started, decided)
    assert rec.retention_until == {
        "recording": decided + 90 * DAY,
        "callback": decided + 30 * DAY,
        "survey": decided + 365 * DAY,
    }
    assert rec.recording_path == RECORDING_PATH
    assert CALL.caller not in rec.recording_path
    assert rec.recording_until == decided + 90 * DAY
    assert rec.callback_until == decided + 30 * DAY
    assert [(k.digit, k.step) for k in rec.keys] == [(YES, "recording"), (YES, "callback")]


@pytest.mark.parametrize(
    ("rec_key", "cb_key", "path", "rec_until", "cb_until"),
    [
        (YES, YES, True, True, True),
        (YES, NO, True, True, False),
        (NO, YES, False, False, True),
        ("7", "7", False, False, False),  # invalid and then silence after the replay
    ],
)
def test_record_deadlines_only_when_allowed(
    rec_key: str, cb_key: str, path: bool, rec_until: bool, cb_until: bool
) -> None:
    d = Driver(make_flow(purposes=standard_purposes(retries=0)))
    d.start()
    d.played()
    d.digit(rec_key)
    d.digit(cb_key)
    d.digit(OBJECT)
    rec = d.record
    assert (rec.recording_path == RECORDING_PATH) is path
    assert (rec.recording_path is None) is not path
    assert (rec.recording_until is not None) is rec_until
    assert (rec.callback_until is not None) is cb_until


@pytest.mark.parametrize("recordings_dir", ["/rec", "/rec/", "/rec//"])
def test_recording_path_is_dir_and_call_id(recordings_dir: str) -> None:
    call = CallInfo(call_id="abc123", channel_id="1.2", caller="/tmp/evil")
    d = Driver(make_flow(), call=call, recordings_dir=recordings_dir)
    d.start()
    d.played()
    for digit in (YES, YES, OBJECT):
        d.digit(digit)
    assert d.record.recording_path == "/rec/abc123.wav"
    assert d.logged() == [StartRecording("/rec/abc123.wav")]


@pytest.mark.parametrize(
    ("basis", "keys", "decision", "records"),
    [
        (Basis.LEGITIMATE_INTEREST, [], Decision.NOT_OBJECTED, True),  # silence: informed, allowed
        (Basis.LEGITIMATE_INTEREST, [OBJECT], Decision.OBJECTED, False),
        (Basis.PUBLIC_TASK, [], Decision.NOT_OBJECTED, True),
        (Basis.PUBLIC_TASK, [OBJECT], Decision.OBJECTED, False),
        (Basis.PUBLIC_TASK, ["5", "5"], Decision.NOT_OBJECTED, True),  # invalid past the retries
        (Basis.CONSENT, [], Decision.NO_ANSWER, False),
        (Basis.CONSENT, [YES], Decision.YES, True),
    ],
)
def test_recording_purpose_by_legal_basis(
    basis: Basis, keys: list[str], decision: Decision, records: bool
) -> None:
    d = Driver(make_flow(purposes=[purpose("recording", basis, records=True, retries=1)]))
    d.start()
    d.played()
    for k in keys:
        d.digit(k)
    while d.phase is not P.LOGGING:  # silence until the question gives up
        d.played()
        d.timer()
    assert d.record.decisions == {"recording": decision}
    assert (d.logged() == [StartRecording(RECORDING_PATH)]) is records


def test_flow_without_purposes_decides_when_the_notice_ends() -> None:
    d = Driver(make_flow(purposes=[]))
    d.start()
    d.played()
    assert d.phase is P.LOGGING
    assert d.record.decisions == {}
    assert d.record.decided_at == d.now  # when the notice ended, not when the call started
    d.logged(True)
    assert d.variables == {
        "CONSENTIVR_CALL_ID": CALL.call_id,
        "CONSENTIVR_LANGUAGE": "en",
        "CHANNEL(language)": "en",
        "CONSENTIVR_LOGGED": "yes",
        "CONSENTIVR_RECORDING": "no",
    }


def test_variables_after_a_confirmed_recording() -> None:
    d = drive_to(P.DONE)
    assert d.variables == {
        "CONSENTIVR_CALL_ID": CALL.call_id,
        "CONSENTIVR_LANGUAGE": "en",
        "CHANNEL(language)": "en",
        "CONSENTIVR_LOGGED": "yes",
        "CONSENTIVR_RECORDING": "yes",
        "DYNAMIC_FEATURES": "consentivr_withdraw",  # arms the withdrawal key
        "CONSENTIVR_DECISION_RECORDING": "yes",
        "CONSENTIVR_DECISION_CALLBACK": "yes",
        "CONSENTIVR_DECISION_SURVEY": "objected",
    }
    assert d.of_type(MarkRecording) == [MarkRecording(CALL.call_id, True, None)]


@pytest.mark.parametrize("phase", [P.LOGGING, P.RECORDING])
def test_variable_names_are_unique(phase: Phase) -> None:
    """A purpose named "recording" must not overwrite the recording-confirmed flag."""
    d = drive_to(phase)
    if phase is P.LOGGING:
        d.logged(True)
    d.recorded(False)
    (variables,) = d.of_type(SetVariables)
    assert isinstance(variables, SetVariables)
    names = [name for name, _ in variables.variables]
    assert len(names) == len(set(names))
    assert d.variables["CONSENTIVR_RECORDING"] == "no"


def test_variables_when_the_decision_was_not_logged() -> None:
    d = drive_to(P.LOGGING)
    assert d.logged(False)[-1] == Continue(DESTINATION)
    assert d.variables == {
        "CONSENTIVR_CALL_ID": CALL.call_id,
        "CONSENTIVR_LANGUAGE": "en",
        "CHANNEL(language)": "en",
        "CONSENTIVR_LOGGED": "no",
        "CONSENTIVR_RECORDING": "no",
        # only a committed row may allow processing
        "CONSENTIVR_DECISION_RECORDING": "error",
        "CONSENTIVR_DECISION_CALLBACK": "error",
        "CONSENTIVR_DECISION_SURVEY": "error",
    }
    assert d.of_type(StartRecording) == []


def test_recording_not_confirmed_is_marked_and_the_call_continues() -> None:
    d = drive_to(P.RECORDING)
    commands = d.recorded(False)
    assert commands[0] == MarkRecording(CALL.call_id, False, "no such channel")
    assert commands[-1] == Continue(DESTINATION)
    assert d.variables["CONSENTIVR_RECORDING"] == "no"
    assert d.variables["CONSENTIVR_LOGGED"] == "yes"


def test_failure_after_continue_hangs_up_once() -> None:
    d = drive_to(P.DONE)
    assert d.fail() == [Hangup()]
    assert d.fail() == []
    assert d.hangup() == []


# --- (3) property: random event sequences keep the privacy invariants --------

FLOWS: list[Flow] = [
    make_flow(),
    make_flow(language_menu=True),
    make_flow(language_menu=True, menu_retries=0, invalid=False),
    make_flow(purposes=standard_purposes(retries=0, recording_basis=Basis.PUBLIC_TASK)),
    make_flow(purposes=standard_purposes(retries=2)),
    make_flow(purposes=[]),
    make_flow(help_keys=True),  # repeat (0) and more information (8)
    make_flow(language_menu=True, help_keys=True, language_by_country={"49": "de"}),
]

# One flat menu of operations: progress until a random phase (so random calls get as far
# as logging and recording, and something happens there), single steps, keys, adapter news.
OPS = st.sampled_from(
    [
        *(("until", phase) for phase in Phase),
        ("progress",),
        ("progress",),
        ("progress",),
        *(("digit", digit) for digit in [YES, YES, NO, OBJECT, "0", "#", "8"]),
        ("played",),
        ("played_stale",),
        ("timer",),
        ("timer_stale",),
        ("deadline",),
        ("hangup",),
        ("fail",),
        ("start",),
        ("logged", True),
        ("logged", False),
        ("recorded", True),
        ("recorded", False),
    ]
)


def progress(d: Driver) -> None:
    """The step that moves the call on: listen to prompts, say yes, the adapter succeeds."""
    phase = d.phase
    if phase is P.START:
        d.start()
    elif phase in PROMPT_PHASES:
        d.played()
    elif phase is P.LANGUAGE_WAIT:
        d.digit("1")
    elif phase is P.QUESTION_WAIT:
        d.digit(YES)  # an invalid key for an objection purpose: replayed, then silence
    elif phase is P.LOGGING:
        d.logged(True)
    elif phase is P.RECORDING:
        d.recorded(True)


def apply(d: Driver, op: tuple) -> None:
    match op:
        case ("progress",):
            progress(d)
        case ("until", phase):
            for _ in range(30):  # a menu that never reaches the phase (retries) stops anyway
                if d.phase in (phase, P.DONE):
                    break
                progress(d)
        case ("digit", digit):
            d.digit(digit)
        case ("played",):
            d.played()
        case ("played_stale",):
            d.played(d.play_ids[0] if len(d.play_ids) > 1 else "c1-p999")
        case ("timer",):
            d.timer()
        case ("timer_stale",):
            d.timer(d.timer_ids[0] if len(d.timer_ids) > 1 else "c1-t999")
        case ("deadline",):
            d.deadline()
        case ("hangup",):
            d.hangup()
        case ("fail",):
            d.fail()
        case ("start",):
            d.start()
        case ("logged", ok):
            d.logged(ok)
        case ("recorded", ok):
            d.recorded(ok)
        case _:
            raise AssertionError(op)


def check_invariants(d: Driver) -> None:
    flow = d.flow
    rec_purpose = flow.recording_purpose
    log: LogDecision | None = None
    hung_up = continued = False
    counts = {LogDecision: 0, Continue: 0, StartRecording: 0, Hangup: 0}
    playing: str | None = None  # the last Play, until it finished
    for event, commands in d.trace:
        hung_up = hung_up or isinstance(event, HungUp)
        finished = isinstance(event, PlaybackFinished) and event.playback_id == playing
        if continued:
            # after Continue only a failure may still get a reply: hang up
            assert commands in ([], [Hangup()]), (event, commands)
            assert not commands or isinstance(event, Failed)
        for c in commands:
            for kind in counts:
                counts[kind] += isinstance(c, kind)
            if isinstance(c, LogDecision):
                log = c
            if isinstance(c, StopPlayback):
                assert c.playback_id in d.play_ids
            if isinstance(c, Play):
                playing = c.playback_id
            if isinstance(c, StartTimer):
                # a wait starts only once the prompt has been heard to its end
                assert finished, (event, playing)
            if isinstance(c, StartRecording):
                assert isinstance(event, DecisionLogged) and event.ok
                assert not hung_up
                assert log is not None and rec_purpose is not None
                assert log.record.recording_path == c.path == RECORDING_PATH
                assert log.record.decisions[rec_purpose.name].allows_processing
                assert log.record.outcome in ("completed", "timeout")
            if isinstance(c, Continue):
                assert log is not None and not hung_up
                continued = True
    assert all(n <= 1 for n in counts.values()), counts

    pressed = {
        (digit, q) for digit, phase, q in d.digits if phase in (P.QUESTION_PROMPT, P.QUESTION_WAIT)
    }
    decisions = dict(log.record.decisions) if log else d.cf.decisions
    for p in flow.purposes:
        decision = decisions.get(p.name)
        if decision is None:
            continue
        if p.basis is Basis.CONSENT:
            assert decision not in (Decision.OBJECTED, Decision.NOT_OBJECTED)
            if decision is Decision.YES:
                assert (p.yes_key, p.name) in pressed, (p.name, d.digits)
            if decision is Decision.NO:
                assert (p.no_key, p.name) in pressed, (p.name, d.digits)
        else:
            assert decision not in (Decision.YES, Decision.NO)
            # no_answer only when the menu deadline cut the call short.
            if decision is Decision.NO_ANSWER:
                assert log is not None and log.record.outcome == "timeout"
            if decision is Decision.OBJECTED:
                assert (p.object_key, p.name) in pressed

    # A help key is logged as help wherever it can be one, never as an answer.
    for k in d.cf.keys:
        if k.digit == flow.repeat_key and k.step != "language":
            assert k.step.startswith("repeat:"), k
        if k.digit == flow.more_info_key and k.step != "language":
            assert k.step.startswith("more_info:"), k

    if log is not None:
        record = log.record
        assert set(record.decisions) == {p.name for p in flow.purposes}
        assert record.recording_path in (None, RECORDING_PATH)
        if record.outcome == "abandoned":
            assert record.recording_path is None
        if record.outcome.startswith("error"):
            assert set(record.decisions.values()) <= {Decision.ERROR}
        for p in flow.purposes:
            assert record.retention_until[p.name] == record.decided_at + p.retention_days * DAY


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    flow=st.sampled_from(FLOWS),
    started=st.booleans(),
    ops=st.lists(OPS, max_size=40),
)
def test_random_event_sequences_keep_the_invariants(
    flow: Flow, started: bool, ops: list[tuple]
) -> None:
    d = Driver(flow)
    if started:
        d.start()
    for op in ops:
        apply(d, op)
    check_invariants(d)


@settings(max_examples=300, deadline=None)
@given(ops=st.lists(OPS, max_size=30))
def test_hung_up_calls_are_never_recorded_nor_continued(ops: list[tuple]) -> None:
    d = Driver(make_flow(language_menu=True))
    d.start()
    for op in ops:
        apply(d, op)
    d.hangup()
    # whatever the adapter answers afterwards
    d.logged(True)
    d.recorded(True)
    check_invariants(d)
    after = list(itertools.dropwhile(lambda t: not isinstance(t[0], HungUp), d.trace))
    later = [c for _, cmds in after for c in cmds]
    assert not any(isinstance(c, StartRecording | Continue | SetVariables | Play) for c in later)


def test_callflow_is_constructible_from_the_public_api() -> None:
    # the public names the adapters import stay available
    cf = CallFlow(make_flow(), CALL, RECORDINGS_DIR)
    assert cf.phase is P.START
    assert cf.language == "en"


def test_hangup_while_logging_a_yes_marks_the_recording_unconfirmed() -> None:
    d = drive_to(P.QUESTION_WAIT)
    d.digit(YES)  # recording: yes
    d.digit(YES)  # callback: yes
    d.deadline()  # ends the menu during the third question
    assert d.phase is P.LOGGING and d.record.recording_path == RECORDING_PATH
    assert d.hangup() == []
    commands = d.logged(True)
    assert commands == [MarkRecording(CALL.call_id, False, "caller hung up")]
    assert d.phase is P.DONE


# --- decisions outside one call's menu (issue 11): one table each -------------------


def _row(recording: bool, callback: bool) -> DecisionRecord:
    d = Driver(make_flow())
    d.start()
    d.played()
    answers = {"recording": recording, "callback": callback}
    for p in d.cf.flow.purposes:
        d.digit((p.yes_key if answers.get(p.name) else p.no_key) or "9")
    [log] = [c for _, cmds in d.trace for c in cmds if isinstance(c, LogDecision)]
    return log.record


@pytest.mark.parametrize(("recording", "callback", "committed", "expected"), [
    # committed after the call went on told "not logged": void whatever it allows
    (True, True, True, "void_late_consent"),
    (True, False, True, "void_late_consent"),
    (False, True, True, "void_late_consent"),  # a callback-only yes is voided too
    (False, False, True, None),  # nothing allowed: nothing to void
    # never committed: write what was acted on, every purpose error
    (True, True, False, "append"),
    (False, False, False, "append"),
])
def test_late_commit(recording: bool, callback: bool, committed: bool,
                     expected: str | None) -> None:
    record = _row(recording, callback)
    assert record.allows_processing is (recording or callback)
    write = late_commit(record, committed=committed, error="database is locked", at=5.0)
    assert (write.kind if write else None) == expected
    if expected == "void_late_consent":
        assert write is not None and write.payload == (record.call_id, LATE_COMMIT_REASON, 5.0)
    if expected == "append":
        assert write is not None and isinstance(write.payload, DecisionRecord)
        row = write.payload
        assert set(row.decisions.values()) == {Decision.ERROR}
        assert (row.recording_path, row.recording_until, row.callback_until) == (None,) * 3
        assert row.outcome == "error: not logged before the call went on (database is locked)"
        assert row.keys == record.keys, "the keys stay as evidence"


def test_unknown_flow_leaves_logged_unset_so_the_dialplan_fallback_runs() -> None:
    assert unknown_flow() == [SetVariables((("CONSENTIVR_RECORDING", "no"),)), Continue(None)]


def _logged(**changes: object) -> LoggedCall:
    call_id = "0123456789abcdef0123456789abcdef"
    base: dict[str, Any] = dict(
        call_id=call_id, flow="main", language="nl",
        decisions={"recording": "yes", "callback": "no", "bad name": "yes", "x": "maybe"},
        recording_path=f"/rec/{call_id}.wav", recording_confirmed=True)
    return LoggedCall(**{**base, **changes})


@pytest.mark.parametrize(("logged", "hanging_up", "expected"), [
    (_logged(), False, RecoveryRecording.RUNNING),  # MixMonitor outlived us
    (_logged(), True, RecoveryRecording.RUNNING),
    (_logged(recording_confirmed=None), False, RecoveryRecording.START),
    (_logged(recording_confirmed=None), True, RecoveryRecording.NONE),  # never on hang-up
    (_logged(recording_confirmed=False), False, RecoveryRecording.NONE),  # it failed then
    (_logged(recording_path=None), False, RecoveryRecording.NONE),  # no yes
    (_logged(recording_path="/elsewhere/x.wav", recording_confirmed=None), False,
     RecoveryRecording.NONE),  # a path we did not make
    (_logged(call_id="../../etc", recording_path="/rec/../../etc.wav",
             recording_confirmed=None), False, RecoveryRecording.NONE),
])
def test_recovery_recording(logged: LoggedCall, hanging_up: bool,
                            expected: RecoveryRecording) -> None:
    assert recovery_recording(logged, "/rec/", hanging_up) is expected


@pytest.mark.parametrize("recording", [True, False])
def test_resumed_call_variables_match_a_call_that_never_left(recording: bool) -> None:
    pairs = dict(resumed_variables(_logged(), recording).variables)
    assert pairs["CONSENTIVR_LOGGED"] == "yes"
    assert pairs["CONSENTIVR_RECORDING"] == ("yes" if recording else "no")
    # After a restart a recorded call keeps its withdrawal key.
    assert ("DYNAMIC_FEATURES" in pairs) is recording
    if recording:
        assert pairs["DYNAMIC_FEATURES"] == WITHDRAW_FEATURE
    assert pairs["CHANNEL(language)"] == pairs["CONSENTIVR_LANGUAGE"] == "nl"
    # Only well-formed names and known decisions from the row reach the dialplan.
    assert {k for k in pairs if k.startswith("CONSENTIVR_DECISION_")} == {
        "CONSENTIVR_DECISION_RECORDING", "CONSENTIVR_DECISION_CALLBACK"}


@pytest.mark.parametrize("flow", [make_flow(), None])
def test_unlogged_variables_allow_nothing(flow: Flow | None) -> None:
    pairs = dict(unlogged_variables(flow).variables)
    assert pairs["CONSENTIVR_LOGGED"] == pairs["CONSENTIVR_RECORDING"] == "no"
    assert "DYNAMIC_FEATURES" not in pairs
    decisions = {v for k, v in pairs.items() if k.startswith("CONSENTIVR_DECISION_")}
    assert decisions == ({"error"} if flow else set())


def test_the_transition_table_is_one_literal() -> None:
    # No pairs added by loops: the table in the source is the whole machine.
    import ast
    import inspect

    import consentivr.flow as module

    tree = ast.parse(inspect.getsource(module))
    [table] = [n for n in tree.body if isinstance(n, ast.AnnAssign)
               and getattr(n.target, "id", "") == "TRANSITIONS"]
    assert isinstance(table.value, ast.Dict)
    assert len(table.value.keys) == len(TRANSITIONS)
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.Subscript)
                and getattr(n.value, "id", "") == "TRANSITIONS"
                and isinstance(getattr(n, "ctx", None), ast.Store)]


# --- caller help (issue 18): repeat and more information ------------------------------

HELP_FLOW = make_flow(help_keys=True, purposes=standard_purposes()[:2])


def _run_script(d: Driver, script: tuple[str, ...]) -> None:
    """``end``: the current prompt finishes; ``wait``: the wait times out; else a key."""
    d.start()
    for token in script:
        {"end": d.played, "wait": d.timer}.get(token, lambda t=token: d.digit(t))()


def _heard(d: Driver) -> list[str]:
    return [m.removeprefix("sound:") for c in d.of_type(Play) for m in c.media]


# (name, script, what the caller hears in order, key steps logged, decisions)
HELP_CASES = [
    ("repeat-in-notice-then-yes", ("0", "end", "end", "1", "end", "1"),
     ["notice-en", "notice-en", "q-recording-en", "q-callback-en"],
     ["repeat:notice", "recording", "callback"], ("yes", "yes")),
    ("repeat-in-second-question", ("end", "end", "1", "0", "end", "end", "2"),
     ["notice-en", "q-recording-en", "q-callback-en", "notice-en", "q-callback-en"],
     ["recording", "repeat:callback", "callback"], ("yes", "no")),
    ("repeat-in-the-wait", ("end", "end", "0", "end", "end", "1", "end", "1"),
     ["notice-en", "q-recording-en", "notice-en", "q-recording-en", "q-callback-en"],
     ["repeat:recording", "recording", "callback"], ("yes", "yes")),
    # An invalid key uses the one retry; repeats after it use none.
    ("repeats-use-no-retries", ("end", "end", "7", "end", "0", "end", "end", "0", "end",
                                "end", "1", "end", "1"),
     ["notice-en", "q-recording-en", "invalid-en", "q-recording-en", "notice-en",
      "q-recording-en", "notice-en", "q-recording-en", "q-callback-en"],
     ["recording", "repeat:recording", "repeat:recording", "recording", "callback"],
     ("yes", "yes")),
    ("more-info-in-notice-then-answer", ("8", "end", "end", "1", "end", "2"),
     ["notice-en", "more-en", "q-recording-en", "q-callback-en"],
     ["more_info:notice", "recording", "callback"], ("yes", "no")),
    ("more-info-in-question-then-answer", ("end", "end", "8", "end", "end", "1", "end", "1"),
     ["notice-en", "q-recording-en", "more-en", "q-recording-en", "q-callback-en"],
     ["more_info:recording", "recording", "callback"], ("yes", "yes")),
    # A key during "more information" goes on to the question: it is not an answer.
    ("key-in-more-info-is-not-an-answer", ("8", "1", "end", "2", "end", "1"),
     ["notice-en", "more-en", "q-recording-en", "q-callback-en"],
     ["more_info:notice", "more_info", "recording", "callback"], ("no", "yes")),
    ("repeat-during-more-info", ("8", "0", "end", "end", "1", "end", "1"),
     ["notice-en", "more-en", "notice-en", "q-recording-en", "q-callback-en"],
     ["more_info:notice", "repeat:more_info", "recording", "callback"], ("yes", "yes")),
    ("more-info-twice", ("end", "end", "8", "8", "end", "1", "end", "1"),
     ["notice-en", "q-recording-en", "more-en", "more-en", "q-recording-en",
      "q-callback-en"],
     ["more_info:recording", "more_info:more_info", "recording", "callback"], ("yes", "yes")),
]


@pytest.mark.parametrize(("script", "heard", "steps", "decisions"),
                         [c[1:] for c in HELP_CASES], ids=[c[0] for c in HELP_CASES])
def test_caller_help(script: tuple[str, ...], heard: list[str], steps: list[str],
                     decisions: tuple[str, str]) -> None:
    d = Driver(HELP_FLOW)
    _run_script(d, script)
    assert _heard(d) == heard
    assert [k.step for k in d.cf.keys] == steps
    assert d.phase is P.LOGGING
    assert tuple(d.record.decisions.values()) == decisions
    # The help keys are in the log, never as an answer; the one menu deadline covers all.
    assert [k.step for k in d.record.keys] == steps
    assert len(d.of_type(ArmDeadline)) == 1
    assert d.record.outcome == "completed"


def test_without_help_keys_those_keys_are_ordinary_keys() -> None:
    d = Driver(make_flow(purposes=standard_purposes()[:2]))
    _run_script(d, ("0", "end", "8", "end"))
    assert _heard(d) == ["notice-en", "q-recording-en", "invalid-en", "q-recording-en"]
    assert [k.step for k in d.cf.keys] == ["notice", "recording"]


def test_repeats_are_bounded_by_the_menu_deadline() -> None:
    d = Driver(HELP_FLOW)
    _run_script(d, ("0", "0", "0", "end", "0"))
    d.deadline()
    assert d.record.outcome == "timeout"
    assert set(d.record.decisions.values()) == {Decision.NO_ANSWER}


def test_a_repeat_stops_the_prompt_and_the_wait() -> None:
    d = Driver(HELP_FLOW)
    _run_script(d, ("end", "end"))
    timer = d.timer_id
    assert timer is not None
    commands = d.digit("0")
    assert types(commands) == [CancelTimer, Play]
    assert d.phase is P.NOTICE


@pytest.mark.parametrize(
    ("caller", "mapping", "language"),
    [
        ("+4930123456", {"49": "de"}, "de"),
        ("004930123456", {"49": "de"}, "de"),
        ("+31201234567", {"49": "de"}, "en"),
        ("030123456", {"49": "de"}, "en"),  # a national number says no country
        ("4930123456", {"49": "de"}, "en"),  # no + or 00: not known to be international
        (None, {"49": "de"}, "en"),
        ("", {"49": "de"}, "en"),
        ("+49abc", {"49": "de"}, "en"),
        ("+4930123456", {"4": "en", "49": "de"}, "de"),  # the longest code wins
        ("+4420123456", {"4": "de", "49": "en"}, "de"),
        ("+4930123456", {}, "en"),
        ("+4930123456", {"49": "fr"}, "en"),  # not a language of the flow
    ],
)
def test_language_by_country(caller: str | None, mapping: dict[str, str],
                             language: str) -> None:
    flow = make_flow(language_by_country=mapping, purposes=standard_purposes()[:1])
    d = Driver(flow, CallInfo(call_id="c1", channel_id="1.1", caller=caller))
    _run_script(d, ("end", "end", "1"))
    assert d.cf.language == language
    assert _heard(d) == [f"notice-{language}", f"q-recording-{language}"]
    assert d.record.language == language
    assert d.record.notice_version == flow.notice_version(language)


@pytest.mark.parametrize(("script", "language"), [
    (("end", "wait"), "de"),  # no choice: the caller's country
    (("1",), "en"),  # the menu still lets the caller choose
])
def test_language_by_country_with_a_language_menu(script: tuple[str, ...],
                                                  language: str) -> None:
    flow = make_flow(language_menu=True, menu_retries=0, language_by_country={"49": "de"})
    d = Driver(flow, CallInfo(call_id="c1", channel_id="1.1", caller="+4930123456"))
    _run_script(d, script)
    assert _heard(d)[0] == "language-menu"
    assert d.cf.language == language
    assert _heard(d)[-1] == f"notice-{language}"


def test_more_info_and_repeat_key_are_part_of_the_notice_version() -> None:
    plain = make_flow()
    helped = make_flow(help_keys=True)
    assert plain.notice_version("en") != helped.notice_version("en")
    other_text = dataclasses.replace(
        helped, more_info={**helped.more_info, "en": Prompt(("sound:more-en",), "other")})
    assert other_text.notice_version("en") != helped.notice_version("en")
    assert other_text.notice_version("de") == helped.notice_version("de")
