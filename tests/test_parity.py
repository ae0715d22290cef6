"""One scenario table, run through both modes with in-memory fakes (issue 11).

Each scenario is a caller's script (what they do at each prompt) and what must
follow: the decision row, the recording, the variables the dialplan sees, where the
call goes, and what the log is told later. It runs through the real ARI adapter
(:class:`~consentivr.stasis.StasisApp`, with a scripted fake ARI client) and the real
FastAGI adapter (:class:`~consentivr.agi.AgiServer`, with a scripted fake Asterisk
on a local socket), both over the one shared driver. A scenario that passes in one
mode and fails in the other fails.

The same cases run on the real Asterisk in ``tests/test_e2e.py`` and
``tests/test_parity_pbx.py``.

Script tokens, one per notice or question played (an "invalid" prompt in front of a
question takes none):

- ``""``: listen to the end, then stay silent (the wait times out);
- ``"~1"``: listen to the end, then press 1 while we wait;
- ``"1"``: press 1 while the prompt plays (barge-in);
- ``"hangup"``: hang up while the prompt plays.
"""

from __future__ import annotations

import asyncio
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from consentivr.agi import AgiServer
from consentivr.consentwriter import ConsentWriter
from consentivr.features import FEATURE_NAME
from consentivr.settings import Settings
from consentivr.stasis import StasisApp
from consentivr.withdrawalpath import RecordingGate
from consentivr_testbed.testbed import flow_yaml, help_flow_yaml
from tests.fault_fixtures import FakeAri, FakeCommitter, FakeRecorder, settings_in, wait_for

MODES = ("ari", "agi")
CHANNEL = "1700000000.7"
PROMPTS = ("notice", "question")  # sound names (and their _de forms) that take a token
FLOW = flow_yaml(timeout=0.2, retries=1, notice="sound:notice", question="sound:question") + \
    help_flow_yaml(timeout=0.2, retries=1, notice="sound:notice", notice_de="sound:notice_de",
                   question="sound:question", question_de="sound:question_de",
                   more_info="sound:moreinfo")
CALLER = "+31201234567"


def _takes_token(name: str) -> bool:
    return name.removeprefix("sound:").split("_")[0] in PROMPTS


@dataclass(frozen=True)
class Case:
    name: str
    script: tuple[str, ...]
    decisions: dict[str, str] | None  # the committed row's decisions; None: no row
    outcome: str = "completed"
    recording: str = "none"  # none | started | failed
    logged: str | None = "yes"  # CONSENTIVR_LOGGED as the dialplan sees it (None: unset)
    continued: bool = True  # went on into the dialplan (not hung up on us)
    late: tuple[str, ...] = ()  # what the log is told after the call went on
    flow: str = "main"
    log_fails: int = 0  # so many writes fail
    log_delay: float = 0.0  # each write takes this long (the call waits 0.2 s at most)
    recorder_fails: bool = False
    caller: str = CALLER
    heard: tuple[str, ...] | None = None  # the sounds played, in order (None: not checked)
    language: str = "en"  # the committed row's language
    steps: tuple[str, ...] | None = None  # the committed row's key steps (None: not checked)
    blocked: str | None = None  # the recording gate is closed for this reason


YES_YES = {"recording": "yes", "callback": "yes"}
CASES = [
    Case("yes-yes", ("", "~1", "~1"), YES_YES, recording="started"),
    Case("no-no", ("", "~2", "~2"), {"recording": "no", "callback": "no"}),
    Case("silence", ("", "", "", "", ""), {"recording": "no_answer", "callback": "no_answer"}),
    Case("barge-in", ("1", "1", "2"), {"recording": "yes", "callback": "no"},
         recording="started"),
    Case("invalid-then-valid", ("", "~9", "~1", "~2"), {"recording": "yes", "callback": "no"},
         recording="started"),
    Case("hangup-in-notice", ("hangup",), {"recording": "abandoned", "callback": "abandoned"},
         outcome="abandoned", logged=None, continued=False),
    Case("hangup-in-question", ("", "~1", "hangup"),
         {"recording": "yes", "callback": "abandoned"}, outcome="abandoned", logged=None,
         continued=False),
    Case("log-fails", ("", "~1", "~1"), None, logged="no", late=("append",), log_fails=1),
    Case("recorder-fails", ("", "~1", "~1"), YES_YES, recording="failed",
         recorder_fails=True),
    Case("late-commit-callback-only", ("", "~2", "~1"), None, logged="no",
         late=("void_late_consent",), log_delay=0.5),
    Case("late-commit-nothing-allowed", ("", "~2", "~2"), None, logged="no", log_delay=0.5),
    Case("unknown-flow", (), None, flow="nope", logged=None),
    # Caller help (issue 18): repeat key 0, more information on 8, +49 starts in German.
    Case("repeat-in-notice-then-yes", ("0", "", "~1", "~1"), YES_YES, recording="started",
         flow="help", heard=("notice", "notice", "question", "question"),
         steps=("repeat:notice", "recording", "callback")),
    Case("repeat-in-second-question", ("", "~1", "0", "", "~2"),
         {"recording": "yes", "callback": "no"}, recording="started", flow="help",
         heard=("notice", "question", "question", "notice", "question"),
         steps=("recording", "repeat:callback", "callback")),
    Case("more-info-then-answer", ("8", "~1", "~1"), YES_YES, recording="started",
         flow="help", heard=("notice", "moreinfo", "question", "question"),
         steps=("more_info:notice", "recording", "callback")),
    Case("german-caller-gets-the-german-notice", ("", "~1", "~2"),
         {"recording": "yes", "callback": "no"}, recording="started", flow="help",
         caller="+4930123456", language="de",
         heard=("notice_de", "question_de", "question_de"), steps=("recording", "callback")),
    # Issue 19: the withdrawal key cannot work, so a yes is logged but not recorded.
    Case("withdrawal-path-broken", ("", "~1", "~1"), YES_YES,
         blocked="withdrawal key cannot be honoured (feature: missing)"),
]


@dataclass
class Seen:
    """What one mode did with one scenario, in terms both modes share."""

    decisions: dict[str, str] | None = None
    outcome: str | None = None
    recording: str = "none"
    variables: dict[str, str] = field(default_factory=dict)
    continued: bool = False
    late: tuple[str, ...] = ()
    heard: tuple[str, ...] = ()
    language: str | None = None
    steps: tuple[str, ...] = ()
    marks: list[tuple[bool, str | None]] = field(default_factory=list)


# --- ARI: the real StasisApp with a scripted fake ARI client ------------------------


class ScriptedAri(FakeAri):
    def __init__(self, script: tuple[str, ...]) -> None:
        super().__init__()
        self.script = list(script)
        self.heard: list[str] = []

    async def play(self, channel_id: str, playback_id: str, media: tuple[str, ...],
                   language: str | None = None) -> None:
        self._note("play", channel_id, playback_id, media)
        self.heard.extend(m.removeprefix("sound:") for m in media)
        takes = any(_takes_token(m) for m in media)
        token = self.script.pop(0) if takes and self.script else ""
        finished = {"type": "PlaybackFinished",
                    "playback": {"id": playback_id, "target_uri": f"channel:{channel_id}"}}
        if token == "hangup":
            self._emit({"type": "ChannelHangupRequest", "channel": {"id": channel_id}}, 0.01)
        elif token and not token.startswith("~"):
            self._emit(_dtmf(channel_id, token), 0.01)
            self._emit(finished, 0.05)  # stopped: a stale id the flow ignores
        else:
            self._emit(finished, 0.01)
            if token:
                self._emit(_dtmf(channel_id, token[1:]), 0.06)


class TriedRecorder(FakeRecorder):
    tried = 0

    async def start(self, channel: str, path: str, options: str) -> None:
        self.tried += 1
        await super().start(channel, path, options)


def _dtmf(channel_id: str, digit: str) -> dict[str, Any]:
    return {"type": "ChannelDtmfReceived", "digit": digit, "channel": {"id": channel_id}}


async def run_ari(settings: Settings, case: Case, committer: FakeCommitter) -> Seen:
    ari = ScriptedAri(case.script)
    recorder = TriedRecorder(fail=case.recorder_fails)
    app = StasisApp(settings, ari, recorder, ConsentWriter(committer, timeout=0.2),
                    gate=RecordingGate(case.blocked))
    ari.app = app
    app.handle_event({
        "type": "StasisStart", "application": "consentivr", "args": [case.flow],
        "channel": {"id": CHANNEL, "name": "PJSIP/alice-00000007", "linkedid": CHANNEL,
                    "caller": {"name": "x", "number": case.caller}},
    })
    await wait_for(lambda: not app.tasks, 10, "the call to end")
    seen = await _settle(app.writer, committer, case)
    seen.recording = ("started" if recorder.started else "failed" if recorder.tried
                      else "none")
    seen.variables = ari.variables.get(CHANNEL, {})
    seen.continued = CHANNEL in ari.continued
    seen.heard = tuple(ari.heard)
    return seen


# --- FastAGI: the real AgiServer with a scripted fake Asterisk ----------------------------


class ScriptedAsterisk:
    """Asterisk's side of one FastAGI call, answering from the caller's script."""

    def __init__(self, script: tuple[str, ...], mixmonitor_fails: bool,
                 caller: str = CALLER) -> None:
        self.script = list(script)
        self.caller = caller
        self.heard: list[str] = []
        self.mixmonitor_fails = mixmonitor_fails
        self.commands: list[str] = []
        self.wait_reply = "200 result=0\n"
        self.hung_up = False

    def reply(self, command: str) -> str | None:
        if command.startswith("STREAM FILE"):
            name = shlex.split(command)[2]
            self.heard.append(name)
            if not _takes_token(name):
                return "200 result=0 endpos=800\n"
            token = self.script.pop(0) if self.script else ""
            if token == "hangup":
                self.hung_up = True
                return None  # the channel is gone: Asterisk closes the connection
            if token and not token.startswith("~"):
                return f"200 result={ord(token)} endpos=100\n"
            self.wait_reply = f"200 result={ord(token[1])}\n" if token else "200 result=0\n"
            return "200 result=0 endpos=800\n"
        if command.startswith("WAIT FOR DIGIT"):
            reply, self.wait_reply = self.wait_reply, "200 result=0\n"
            return reply
        if command.startswith("EXEC MixMonitor"):
            return "200 result=-2\n" if self.mixmonitor_fails else "200 result=0\n"
        if command.startswith("CHANNEL STATUS"):
            return "200 result=6\n"
        return "200 result=1\n" if command.startswith("SET VARIABLE") else "200 result=0\n"

    async def call(self, port: int, flow: str) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        env = {"agi_network": "yes", "agi_network_script": flow, "agi_channel":
               "PJSIP/alice-00000007", "agi_language": "en", "agi_uniqueid": CHANNEL,
               "agi_callerid": self.caller, "agi_arg_1": CHANNEL}
        writer.write("".join(f"{k}: {v}\n" for k, v in env.items()).encode() + b"\n")
        await writer.drain()
        try:
            while line := await asyncio.wait_for(reader.readline(), 10):
                command = line.decode().rstrip("\n")
                self.commands.append(command)
                reply = self.reply(command)
                if reply is None:
                    break
                writer.write(reply.encode())
                await writer.drain()
        finally:
            writer.close()

    def variables(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for command in self.commands:
            if command.startswith("SET VARIABLE "):
                _set, _var, name, value = shlex.split(command)
                if name.startswith("ARRAY("):
                    out.update(zip(name[6:-1].split(","), value.split(","), strict=True))
                else:
                    out[name] = value
        return out


async def run_agi(settings: Settings, case: Case, committer: FakeCommitter) -> Seen:
    writer = ConsentWriter(committer, timeout=0.2)
    server = AgiServer(settings, writer, gate=RecordingGate(case.blocked))
    _host, port = await server.start("127.0.0.1", 0)
    peer = ScriptedAsterisk(case.script, case.recorder_fails, case.caller)
    try:
        await asyncio.wait_for(peer.call(port, case.flow), 10)
        await wait_for(lambda: not server.sessions, 10, "the call to end")
    finally:
        await server.stop(drain=2)
    seen = await _settle(writer, committer, case)
    sent_mixmonitor = any(c.startswith("EXEC MixMonitor") for c in peer.commands)
    seen.recording = ("none" if not sent_mixmonitor
                      else "failed" if case.recorder_fails else "started")
    seen.variables = peer.variables()
    # Without a caller hang-up the connection closing returns the call to the dialplan.
    seen.continued = not peer.hung_up and "HANGUP" not in peer.commands
    seen.heard = tuple(peer.heard)
    return seen


# --- both ------------------------------------------------------------------------------


async def _settle(writer: ConsentWriter, committer: FakeCommitter, case: Case) -> Seen:
    """Wait for what the log is told after the call (late rows, voids), then read it."""
    if case.log_delay or case.log_fails:
        await asyncio.sleep(case.log_delay + 0.3)
        await wait_for(lambda: not writer.late.pending, 10, "late writes")
    await writer.close(1)
    seen = Seen()
    writes = [(k, p) for k, p in committer.written if k != "mark_recording"]
    if writes and not case.log_fails and not case.log_delay:
        row = writes[0][1]  # committed while the call waited
        seen.decisions = {k: str(v) for k, v in row.decisions.items()}
        seen.outcome = row.outcome
        seen.language = row.language
        seen.steps = tuple(k.step for k in row.keys)
    # After the first attempt at the decision row (unless that failed outright).
    seen.late = tuple(k for k, _ in writes[0 if case.log_fails else 1:])
    seen.marks = [p[1:3] for k, p in committer.written if k == "mark_recording"]
    return seen


RUNNERS = {"ari": run_ari, "agi": run_agi}


def run_case(tmp_path: Path, mode: str, case: Case) -> Seen:
    settings = settings_in(tmp_path / mode, flows=FLOW)
    committer = FakeCommitter(fail=case.log_fails, delay=case.log_delay)
    return asyncio.run(RUNNERS[mode](settings, case, committer))


def consentivr_variables(variables: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in variables.items()
            if (k.startswith("CONSENTIVR_") and k != "CONSENTIVR_CALL_ID")
            or k == "DYNAMIC_FEATURES"}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_scenario(tmp_path: Path, mode: str, case: Case) -> None:
    seen = run_case(tmp_path, mode, case)
    assert seen.decisions == case.decisions
    if case.decisions is not None:
        assert seen.outcome == case.outcome
        assert seen.language == case.language
    if case.heard is not None:
        assert seen.heard == case.heard
    if case.steps is not None:
        assert seen.steps == case.steps
    assert seen.recording == case.recording
    assert seen.variables.get("CONSENTIVR_LOGGED") == case.logged
    assert seen.continued == case.continued
    assert seen.late == case.late
    recorded = seen.recording == "started"
    assert (seen.variables.get("CONSENTIVR_RECORDING") == "yes") == recorded
    # The withdrawal key is armed exactly when the call is being recorded.
    assert (seen.variables.get("DYNAMIC_FEATURES") == FEATURE_NAME) == recorded
    if case.blocked:  # the log says why the yes was not recorded
        assert seen.marks == [(False, case.blocked)]
    if case.logged == "no":
        # Only a committed row may tell the dialplan that processing is allowed.
        assert {v for k, v in seen.variables.items()
                if k.startswith("CONSENTIVR_DECISION_")} == {"error"}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_both_modes_leave_the_dialplan_the_same_variables(tmp_path: Path, case: Case) -> None:
    ari, agi = (run_case(tmp_path, mode, case) for mode in MODES)
    assert consentivr_variables(ari.variables) == consentivr_variables(agi.variables)
    assert (ari.decisions, ari.recording, ari.continued, ari.late, ari.language) == (
        agi.decisions, agi.recording, agi.continued, agi.late, agi.language)
    if case.heard is not None:
        assert (ari.heard, ari.steps) == (agi.heard, agi.steps)
