"""Builders for Flow objects and a driver that feeds a CallFlow and remembers what it said.

The driver tracks the current playback and wait-timer ids from the commands the
flow emitted (never from its private state), the way a real adapter would.
"""

from __future__ import annotations

from collections.abc import Iterable

from consentivr.flow import CallFlow, Phase
from consentivr.messages import (
    CallInfo,
    CallStarted,
    Command,
    DeadlinePassed,
    DecisionLogged,
    DecisionRecord,
    DigitPressed,
    Event,
    Failed,
    HungUp,
    LogDecision,
    Play,
    PlaybackFinished,
    RecordingStarted,
    SetVariables,
    StartTimer,
    TimerFired,
)
from consentivr.model import Basis, Destination, Flow, LanguageMenu, Prompt, Purpose

RECORDINGS_DIR = "/var/spool/asterisk/consentivr"
# The caller id looks like a path on purpose: it must never end up in the recording path.
CALL = CallInfo(
    call_id="c1",
    channel_id="1700000000.7",
    channel_name="PJSIP/alice-00000001",
    caller="../../etc/passwd",
)
LANGUAGES = ("en", "de")
YES, NO, OBJECT = "1", "2", "9"
REPEAT, MORE = "0", "8"  # the caller-help keys of make_flow(help_keys=True)
DESTINATION = Destination(context="from-internal", exten="200", priority=1)


def prompt(name: str) -> Prompt:
    return Prompt(media=(f"sound:{name}",), text=name)


def purpose(
    name: str,
    basis: Basis = Basis.CONSENT,
    *,
    retention_days: int = 30,
    retries: int = 1,
    timeout: float = 5.0,
    records: bool = False,
    callback: bool = False,
    languages: tuple[str, ...] = LANGUAGES,
) -> Purpose:
    consent = basis is Basis.CONSENT
    return Purpose(
        name=name,
        basis=basis,
        retention_days=retention_days,
        question={lang: prompt(f"q-{name}-{lang}") for lang in languages},
        timeout=timeout,
        retries=retries,
        yes_key=YES if consent else None,
        no_key=NO if consent else None,
        object_key=None if consent else OBJECT,
        records=records,
        callback=callback,
    )


def standard_purposes(
    retries: int = 1, recording_basis: Basis = Basis.CONSENT
) -> tuple[Purpose, ...]:
    """recording (gates MixMonitor), callback (keeps the number), survey (objection only)."""
    return (
        purpose("recording", recording_basis, retention_days=90, retries=retries, records=True),
        purpose("callback", retention_days=30, retries=retries, callback=True),
        purpose("survey", Basis.LEGITIMATE_INTEREST, retention_days=365, retries=retries),
    )


def make_flow(
    *,
    purposes: Iterable[Purpose] | None = None,
    language_menu: bool = False,
    menu_retries: int = 1,
    invalid: bool = True,
    languages: tuple[str, ...] = LANGUAGES,
    max_menu_seconds: float = 120.0,
    help_keys: bool = False,
    language_by_country: dict[str, str] | None = None,
) -> Flow:
    menu = (
        LanguageMenu(
            prompt=prompt("language-menu"),
            keys={str(i + 1): lang for i, lang in enumerate(languages)},
            timeout=4.0,
            retries=menu_retries,
        )
        if language_menu
        else None
    )
    return Flow(
        name="main",
        languages=languages,
        notice={lang: prompt(f"notice-{lang}") for lang in languages},
        purposes=tuple(standard_purposes() if purposes is None else purposes),
        destination=DESTINATION,
        language_menu=menu,
        invalid={lang: prompt(f"invalid-{lang}") for lang in languages} if invalid else {},
        max_menu_seconds=max_menu_seconds,
        repeat_key=REPEAT if help_keys else None,
        more_info={lang: prompt(f"more-{lang}") for lang in languages} if help_keys else {},
        more_info_key=MORE if help_keys else None,
        language_by_country=language_by_country or {},
    )


class Driver:
    """Feeds one CallFlow, with a clock that ticks one second per event."""

    def __init__(
        self, flow: Flow, call: CallInfo = CALL, recordings_dir: str = RECORDINGS_DIR
    ) -> None:
        self.flow = flow
        self.cf = CallFlow(flow, call, recordings_dir)
        self.now = 1000.0
        self.trace: list[tuple[Event, list[Command]]] = []
        self.play_id: str | None = None  # id of the last Play
        self.play_media: tuple[str, ...] = ()
        self.play_ids: list[str] = []
        self.timer_id: str | None = None  # id of the last wait timer (not the deadline)
        self.timer_ids: list[str] = []
        # Every digit fed, with the phase and the question current when it was pressed.
        self.digits: list[tuple[str, Phase, str | None]] = []

    @property
    def phase(self) -> Phase:
        return self.cf.phase

    def tick(self) -> float:
        self.now += 1.0
        return self.now

    def feed(self, event: Event) -> list[Command]:
        if isinstance(event, DigitPressed):
            self.digits.append((event.digit, self.phase, self.current_question()))
        commands = self.cf.handle(event)
        self.trace.append((event, commands))
        for command in commands:
            if isinstance(command, Play):
                self.play_id, self.play_media = command.playback_id, command.media
                self.play_ids.append(command.playback_id)
            elif isinstance(command, StartTimer):
                self.timer_id = command.timer_id
                self.timer_ids.append(command.timer_id)
        return commands

    # -- events, stamped with the driver's clock --------------------------

    def start(self) -> list[Command]:
        return self.feed(CallStarted(self.tick()))

    def digit(self, digit: str) -> list[Command]:
        return self.feed(DigitPressed(digit, self.tick()))

    def played(self, playback_id: str | None = None) -> list[Command]:
        """The current (or the given, possibly stale) playback finished."""
        return self.feed(PlaybackFinished(playback_id or self.play_id or "none", self.tick()))

    def timer(self, timer_id: str | None = None) -> list[Command]:
        """The current (or the given, possibly stale) wait timer fired."""
        return self.feed(TimerFired(timer_id or self.timer_id or "none", self.tick()))

    def deadline(self) -> list[Command]:
        return self.feed(DeadlinePassed(self.tick()))

    def hangup(self) -> list[Command]:
        return self.feed(HungUp(self.tick()))

    def fail(self, reason: str = "boom") -> list[Command]:
        return self.feed(Failed(reason, self.tick()))

    def logged(self, ok: bool = True) -> list[Command]:
        return self.feed(DecisionLogged(ok, self.tick(), None if ok else "disk full"))

    def recorded(self, ok: bool = True) -> list[Command]:
        return self.feed(RecordingStarted(ok, self.tick(), None if ok else "no such channel"))

    # -- what the flow said ------------------------------------------------

    @property
    def commands(self) -> list[Command]:
        return [c for _, cmds in self.trace for c in cmds]

    def of_type(self, kind: type) -> list[Command]:
        return [c for c in self.commands if isinstance(c, kind)]

    @property
    def record(self) -> DecisionRecord:
        logs = self.of_type(LogDecision)
        assert len(logs) == 1, logs
        log = logs[0]
        assert isinstance(log, LogDecision)
        return log.record

    @property
    def variables(self) -> dict[str, str]:
        sets = self.of_type(SetVariables)
        assert len(sets) == 1, sets
        var = sets[0]
        assert isinstance(var, SetVariables)
        return dict(var.variables)

    def current_question(self) -> str | None:
        """The purpose whose question the last Play asked, if any."""
        for p in self.flow.purposes:
            if any(m in self.play_media for m in p.question[self.cf.language].media):
                return p.name
        return None


def drive_to(phase: Phase, flow: Flow | None = None) -> Driver:
    """A call standing in ``phase`` on the table flow (language menu + 3 purposes).

    The path: language "en" by key, notice heard, recording yes, callback yes,
    survey objected, logged, recording confirmed.
    """
    if phase is Phase.MORE_INFO:
        # A key during the notice asks for more information.
        d = Driver(flow or make_flow(language_menu=True, help_keys=True))
        for step in (d.start, d.played, lambda: d.digit("1"), lambda: d.digit(MORE)):
            step()
        assert d.phase is phase
        return d
    d = Driver(flow or make_flow(language_menu=True))
    steps = [
        (Phase.LANGUAGE_PROMPT, d.start),
        (Phase.LANGUAGE_WAIT, d.played),
        (Phase.NOTICE, lambda: d.digit("1")),
        (Phase.QUESTION_PROMPT, d.played),
        (Phase.QUESTION_WAIT, d.played),
        (Phase.LOGGING, lambda: [*d.digit(YES), *d.digit(YES), *d.digit(OBJECT)]),
        (Phase.RECORDING, d.logged),
        (Phase.DONE, d.recorded),
    ]
    if phase is not Phase.START:
        for reached, step in steps:
            step()
            assert d.phase is reached, (d.phase, reached)
            if reached is phase:
                break
    assert d.phase is phase
    return d
