"""Withdrawal during the call, and no recording of IVR, ringing or hold (issue 5).

The first half runs without Asterisk (features.conf text, the clash check, config,
the pure tracker, the consent log updates, the CLI's bad input). The second half
runs real calls on the sandboxed Asterisk: Local channels whose caller half sits in
the testbed's caller app (digits are real DTMF frames), through the consent menu,
then bridged to an "agent" from this file's dialplan.
"""

from __future__ import annotations

import array
import asyncio
import json
import sqlite3
import wave
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from consentivr.cli.dialplan import dialplan as dialplan_cli
from consentivr.cli.recording import recording as recording_cli
from consentivr.configfile import load_settings
from consentivr.errors import ConfigError
from consentivr.features import (
    FEATURE_NAME,
    applicationmap,
    check_feature_clash,
    feature_codes,
    withdraw_dialplan,
)
from consentivr.flow import Phase
from consentivr.listener import RecordingListener
from consentivr.settings import WithdrawalSettings
from consentivr.store import iso, open_database, parse_iso
from consentivr.tracker import (
    Mute,
    RecordingBegan,
    RecordingEnded,
    RecordingTracker,
    Withdrawn,
)
from consentivr.withdrawal import RecordingLog, Withdrawal, WithdrawalError, apply_withdrawal
from consentivr_testbed.testbed import LocalCall, Testbed, flow_yaml
from tests.fault_fixtures import committed_yes, crash

WAV_HEADER = 44
BYTES_PER_SECOND = 16000  # MixMonitor's .wav: 8 kHz, 16 bit, mono

# --- features.conf and the dialplan ---------------------------------------------------


def test_applicationmap_runs_the_withdraw_context_on_the_pressing_channel() -> None:
    text = applicationmap(WithdrawalSettings(keys="#77"))
    [entry] = [line for line in text.splitlines() if not line.startswith(";")]
    assert entry == f"{FEATURE_NAME} => #77,self,Gosub(consentivr-withdraw,s,1)"


def test_withdraw_context_stops_first_then_notes_and_confirms() -> None:
    text = withdraw_dialplan(WithdrawalSettings(confirmation=("beep", "custom/stopped")))
    steps = [line for line in text.splitlines() if line.startswith(("exten", " same"))]
    apps = [s.split(",", 2)[2] if s.startswith("exten") else s.split(",", 1)[1] for s in steps]
    assert apps[1] == "StopMixMonitor()"  # first thing after the already-withdrawn check
    assert any(a.startswith("Set(GLOBAL(CONSENTIVR_WITHDRAWN_${UNIQUEID})=") for a in apps)
    assert any(a.startswith("UserEvent(ConsentivrWithdraw,") for a in apps)
    assert "Playback(beep&custom/stopped)" in apps
    assert apps[-1] == "Return()"


FEATURES_CONF = """\
[general]
pickupexten = *8          ; dialled, not pressed in a call: never a clash
[featuremap]
blindxfer => #1
disconnect => *           ; the default, when Dial has h/H
[applicationmap]
consentivr_withdraw => *9,self,Gosub(consentivr-withdraw,s,1)
monkeys => *5,peer,Playback(tt-monkeys\\;x)
#include more-features.conf
[sales]
monkeys => #9
"""


def test_feature_codes_reads_every_section_but_general() -> None:
    codes = [(c.line, c.section, c.name, c.code) for c in feature_codes(FEATURES_CONF)]
    assert codes == [
        (4, "featuremap", "blindxfer", "#1"),
        (5, "featuremap", "disconnect", "*"),
        (7, "applicationmap", "consentivr_withdraw", "*9"),
        (8, "applicationmap", "monkeys", "*5"),
        (11, "sales", "monkeys", "#9"),
    ]


@pytest.mark.parametrize(("code", "clashing_lines"), [
    ("*9", [5]),  # '*' (disconnect) would fire before the 9; our own entry is skipped
    ("#1", [4]),  # the same code
    ("#", [4, 11]),  # a prefix of #1 and #9: those would never fire
    ("#95", [11]),
    ("9*", []),
    ("*8", [5]),  # '*' again; pickupexten is not an in-call code
])
def test_clash_check(code: str, clashing_lines: list[int]) -> None:
    problems = check_feature_clash(FEATURES_CONF, code, "/etc/asterisk/features.conf")
    assert [int(p.split(":")[1]) for p in problems] == clashing_lines
    assert all(p.startswith("/etc/asterisk/features.conf:") and "\n" not in p for p in problems)


# --- config -------------------------------------------------------------------------

BASE_CONFIG = """\
ari: {{url: "http://127.0.0.1:8088", username: u, password: p}}
ami: {{host: 127.0.0.1, port: 5038, username: u, password: p}}
database: {db}
recordings: {{dir: {rec}}}
flows:
  main:
    languages: [en]
    notice: {{en: {{media: [sound:hello-world]}}}}
    purposes:
      recording:
        basis: consent
        records: true
        retention_days: 90
        yes_key: "1"
        no_key: "2"
        question: {{en: {{media: [sound:beep]}}}}
    destination: {{context: dest, exten: s, priority: 1}}
"""


def write_config(tmp: Path, extra: str = "") -> Path:
    path = tmp / "config.yaml"
    path.write_text(BASE_CONFIG.format(db=tmp / "consent.db", rec=tmp / "rec") + extra)
    return path


def test_withdrawal_defaults(tmp_path: Path) -> None:
    settings = load_settings(write_config(tmp_path))
    assert settings.withdrawal == WithdrawalSettings("*9", "delete", ("beep", "cancelled"))


def test_withdrawal_config_is_read(tmp_path: Path) -> None:
    extra = 'withdrawal: {keys: "#78", on_withdraw: keep, confirmation: [sound:beep]}\n'
    settings = load_settings(write_config(tmp_path, extra))
    assert settings.withdrawal == WithdrawalSettings("#78", "keep", ("beep",))


@pytest.mark.parametrize(("extra", "message"), [
    ("withdrawal: {keys: '9'}", "withdrawal.keys: expected 2 to 8 DTMF keys"),
    ("withdrawal: {keys: '*x'}", "withdrawal.keys: expected 2 to 8 DTMF keys"),
    ("withdrawal: {on_withdraw: shred}", "withdrawal.on_withdraw: expected one of delete, keep"),
    ("withdrawal: {confirmation: ['a b']}", "withdrawal.confirmation: expected sound names"),
    ("withdrawal: {key: '*9'}", "withdrawal.key: unknown key"),
])
def test_bad_withdrawal_config_is_one_line_with_its_place(
        tmp_path: Path, extra: str, message: str) -> None:
    path = write_config(tmp_path, extra + "\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    [problem] = info.value.problems
    assert problem.startswith(f"{path}:18:") and message in problem


# --- the tracker (pure) -----------------------------------------------------------------


def ev(kind: str, uid: str = "", **fields: str) -> dict[str, str]:
    event = {"Event": kind, **fields}
    if uid:
        event.update(Uniqueid=uid, Channel=f"chan-{uid}")
    return event


def caller_bridged_to_local_agent() -> list[dict[str, str]]:
    """Caller R (recorded) bridged to a1, the ;1 half of a Local agent a1/a2."""
    return [
        ev("MixMonitorStart", "R"),
        ev("LocalBridge", LocalOneUniqueid="a1", LocalTwoUniqueid="a2",
           LocalOneChannel="chan-a1", LocalTwoChannel="chan-a2"),
        ev("BridgeEnter", "a1", BridgeUniqueid="B"),
        ev("BridgeEnter", "R", BridgeUniqueid="B"),
    ]


def feed(tracker: RecordingTracker, events: list[dict[str, str]], at: float = 100.0) -> list[Any]:
    out: list[Any] = []
    for i, event in enumerate(events):
        out += tracker.handle(event, at + i)
    return out


def test_recording_begins_when_first_bridged() -> None:
    out = feed(RecordingTracker(), [*caller_bridged_to_local_agent(),
                                    ev("BridgeLeave", "R", BridgeUniqueid="B"),
                                    ev("BridgeEnter", "R", BridgeUniqueid="C")])
    assert out == [RecordingBegan("R", "chan-R", 103.0)]  # once, at the first bridge


def test_a_bridge_before_mixmonitor_counts_when_it_starts() -> None:
    out = feed(RecordingTracker(), [ev("BridgeEnter", "R", BridgeUniqueid="B"),
                                    ev("MixMonitorStart", "R")])
    assert out == [RecordingBegan("R", "chan-R", 101.0)]


@pytest.mark.parametrize(("holding", "why"), [
    (ev("Hold", "a1"), "hold by chan-a1"),  # the agent's phone holds (PJSIP agent)
    (ev("MusicOnHoldStart", "a2", Class="default"), "music on hold on chan-a2"),  # via Local
    (ev("MusicOnHoldStart", "R", Class="default"), "music on hold on chan-R"),  # caller hears MOH
    (ev("Hold", "R"), "hold by chan-R"),  # the caller's phone holds
])
def test_hold_anywhere_in_the_call_mutes_the_recording(holding: dict[str, str], why: str) -> None:
    tracker = RecordingTracker()
    feed(tracker, caller_bridged_to_local_agent())
    assert tracker.handle(holding, 200.0) == [Mute("chan-R", "R", True, why)]
    release = {"Hold": "Unhold", "MusicOnHoldStart": "MusicOnHoldStop"}[holding["Event"]]
    assert tracker.handle(ev(release, holding["Uniqueid"]), 212.5) == [
        Mute("chan-R", "R", False, "hold is over", 12.5)]


def test_hold_in_another_call_does_not_mute() -> None:
    tracker = RecordingTracker()
    feed(tracker, [*caller_bridged_to_local_agent(), ev("BridgeEnter", "X", BridgeUniqueid="O")])
    assert tracker.handle(ev("Hold", "X"), 200.0) == []
    assert tracker.handle(ev("MusicOnHoldStart", "Y"), 201.0) == []  # not bridged at all


def test_unrecorded_calls_are_never_muted() -> None:
    tracker = RecordingTracker()
    feed(tracker, [ev("BridgeEnter", "R", BridgeUniqueid="B"),
                   ev("BridgeEnter", "A", BridgeUniqueid="B")])
    assert tracker.handle(ev("Hold", "A"), 200.0) == []


def test_a_held_peer_mutes_a_recording_that_joins_later() -> None:
    tracker = RecordingTracker()
    feed(tracker, [ev("MixMonitorStart", "R"), ev("BridgeEnter", "A", BridgeUniqueid="B"),
                   ev("Hold", "A")])
    out = tracker.handle(ev("BridgeEnter", "R", BridgeUniqueid="B"), 200.0)
    assert out == [RecordingBegan("R", "chan-R", 200.0),
                   Mute("chan-R", "R", True, "hold by chan-A")]


def test_leaving_the_held_bridge_unmutes() -> None:
    tracker = RecordingTracker()
    feed(tracker, [*caller_bridged_to_local_agent(), ev("Hold", "a1")])
    out = tracker.handle(ev("BridgeLeave", "R", BridgeUniqueid="B"), 200.0)
    assert out == [Mute("chan-R", "R", False, "hold is over", 200.0 - 104.0)]


@pytest.mark.parametrize("end", [ev("MixMonitorStop", "R"), ev("Hangup", "R")])
def test_recording_ends_at_stop_or_hangup_and_is_forgotten(end: dict[str, str]) -> None:
    tracker = RecordingTracker()
    feed(tracker, [*caller_bridged_to_local_agent(), ev("Hold", "a1")])
    assert tracker.handle(end, 300.0) == [RecordingEnded("R", "chan-R", 300.0)]
    assert tracker.handle(ev("Unhold", "a1"), 301.0) == []  # nothing left to unmute


def test_withdraw_user_event() -> None:
    event = ev("UserEvent", "R", UserEvent="ConsentivrWithdraw", CallID="c1", By="caller",
               At="99.5")
    assert RecordingTracker().handle(event, 100.0) == [Withdrawn("c1", "R", "chan-R", "caller",
                                                                 99.5)]
    garbled = {**event, "At": "x", "CallID": "", "By": ""}
    assert RecordingTracker().handle(garbled, 100.0) == [Withdrawn("", "R", "chan-R", "caller",
                                                                   100.0)]
    other = ev("UserEvent", "R", UserEvent="SomethingElse")
    assert RecordingTracker().handle(other, 100.0) == []


def test_renamed_channel_is_muted_by_its_new_name() -> None:
    tracker = RecordingTracker()
    feed(tracker, [*caller_bridged_to_local_agent(),
                   {"Event": "Rename", "Channel": "chan-R", "Newname": "PJSIP/x-1",
                    "Uniqueid": "R"}])
    assert tracker.handle(ev("Hold", "a1"), 200.0)[0].channel == "PJSIP/x-1"


# --- the consent log side (pure files) --------------------------------------------------


@pytest.fixture
def logged(tmp_path: Path) -> Iterator[tuple[RecordingLog, Path]]:
    """A log with a recorded call (c-rec, file present) and an unrecorded one (c-no)."""
    db = tmp_path / "consent.db"
    rec = tmp_path / "rec"
    rec.mkdir()
    (rec / "c-rec.wav").write_bytes(b"RIFF" + b"\0" * 100)
    conn = open_database(db)
    for seq, (call_id, path, confirmed) in enumerate(
            [("c-rec", str(rec / "c-rec.wav"), 1), ("c-no", None, None)], start=1):
        conn.execute(
            "INSERT INTO calls (seq, call_id, uniqueid, channel, flow, language, "
            "notice_version, started_at, decided_at, decisions, retention_until, outcome, "
            "personal_digest, prev_hash, row_hash, recording_path, recording_confirmed) "
            "VALUES (?,?,?,?,'main','en','v',?,?,'{}','{}','completed','d','p','h',?,?)",
            (seq, call_id, f"u-{call_id}", f"Local/{call_id}", iso(1.0), iso(2.0), path,
             confirmed))
    conn.close()
    with RecordingLog(db) as log_:
        yield log_, rec


def row(log_: RecordingLog, call_id: str) -> dict[str, Any]:
    found = log_.find(call_id)
    assert found is not None
    return found


@pytest.mark.parametrize(("on_withdraw", "file", "exists"), [("delete", "deleted", False),
                                                              ("keep", "kept", True)])
def test_withdrawal_of_a_recorded_call(logged: tuple[RecordingLog, Path], on_withdraw: str,
                                       file: str, exists: bool) -> None:
    log_, rec = logged
    result = apply_withdrawal(log_, rec, "c-rec", "caller", 50.0, on_withdraw)
    assert (result.recorded, result.first, result.file) == (True, True, file)
    assert (rec / "c-rec.wav").exists() is exists
    r = row(log_, "c-rec")
    assert (r["withdrawn_at"], r["withdrawn_by"]) == (iso(50.0), "caller")
    assert r["recording_stopped_at"] == iso(50.0)
    assert (r["recording_purged_at"] is not None) is (not exists)


def test_withdrawal_is_idempotent_and_found_by_uniqueid(logged: tuple[RecordingLog, Path]) -> None:
    log_, rec = logged
    apply_withdrawal(log_, rec, "c-rec", "caller", 50.0, "delete")
    again = apply_withdrawal(log_, rec, "u-c-rec", "agent", 60.0, "delete")
    assert (again.first, again.by, again.at, again.file) == (False, "caller", 50.0, "gone")
    assert row(log_, "c-rec")["withdrawn_by"] == "caller"


def test_withdrawal_of_a_never_recorded_call_is_a_logged_no_op(
        logged: tuple[RecordingLog, Path]) -> None:
    log_, rec = logged
    result = apply_withdrawal(log_, rec, "c-no", "agent", 50.0, "delete")
    assert (result.recorded, result.file) == (False, "none")
    assert "never recorded" in result.describe()
    r = row(log_, "c-no")
    assert (r["withdrawn_at"], r["withdrawn_by"], r["recording_stopped_at"]) == (
        iso(50.0), "agent", None)
    assert (rec / "c-rec.wav").exists()


def test_a_path_outside_the_recordings_dir_is_never_deleted(
        logged: tuple[RecordingLog, Path], tmp_path: Path) -> None:
    log_, rec = logged
    outside = tmp_path / "elsewhere.wav"
    outside.write_bytes(b"x")
    log_.conn.execute("UPDATE calls SET recording_path=? WHERE call_id='c-rec'", (str(outside),))
    result = apply_withdrawal(log_, rec, "c-rec", "caller", 50.0, "delete")
    assert result.file == "refused" and outside.exists()
    assert "NOT deleted" in result.describe()


def test_unknown_call(logged: tuple[RecordingLog, Path]) -> None:
    log_, rec = logged
    with pytest.raises(WithdrawalError, match="no call with id 'nope'"):
        apply_withdrawal(log_, rec, "nope", "agent", 50.0, "delete")


def test_recording_times(logged: tuple[RecordingLog, Path]) -> None:
    log_, _ = logged
    assert log_.recording_started("u-c-rec", 10.0)
    assert not log_.recording_started("u-c-no", 10.0)  # never recorded: nothing to start
    assert log_.recording_stopped("u-c-rec", 20.0)
    assert not log_.recording_stopped("u-c-rec", 30.0)  # the first stop stays
    r = row(log_, "c-rec")
    assert (r["recording_started_at"], r["recording_stopped_at"]) == (iso(10.0), iso(20.0))


# --- the CLI's bad input ----------------------------------------------------------------


def test_recording_stop_unknown_call_is_one_line(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    result = CliRunner().invoke(recording_cli, ["stop", "--config", str(config), "nope"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: no call with id 'nope': {tmp_path / 'consent.db'} does not exist yet"]
    open_database(tmp_path / "consent.db").close()
    result = CliRunner().invoke(recording_cli, ["stop", "--config", str(config), "nope"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Error: no call with id 'nope' in {tmp_path / 'consent.db'}"]


@pytest.mark.parametrize(("keys", "refused"), [('"*9"', True), ('"#81"', False)])
def test_dialplan_check_refuses_clashing_keys(tmp_path: Path, keys: str, refused: bool) -> None:
    config = write_config(tmp_path, f"withdrawal: {{keys: {keys}}}\n")
    features = tmp_path / "features.conf"
    features.write_text("[featuremap]\ndisconnect => *\n")
    result = CliRunner().invoke(dialplan_cli, ["check", "--config", str(config),
                                               "--features-conf", str(features)])
    if refused:
        assert result.exit_code == 1
        [line] = result.output.strip().splitlines()
        assert line.startswith(f"{features}:2: [featuremap] disconnect => '*'")
    else:
        assert result.exit_code == 0 and result.output.startswith("OK:")


def test_recording_features_writes_both_parts(tmp_path: Path) -> None:
    config = write_config(tmp_path, 'withdrawal: {keys: "#81"}\n')
    out_f, out_d = tmp_path / "f.conf", tmp_path / "e.conf"
    result = CliRunner().invoke(recording_cli, ["features", "--config", str(config),
                                                "--features-out", str(out_f),
                                                "--dialplan-out", str(out_d)])
    assert result.exit_code == 0, result.output
    assert f"{FEATURE_NAME} => #81,self," in out_f.read_text()
    assert "[consentivr-withdraw]" in out_d.read_text()


# --- real calls on Asterisk -------------------------------------------------------------

# Local/<agent>@cvrwd-in: the caller enters the consent flow; <agent> picks who answers.
TEST_DIALPLAN = """\
; Generated by tests/test_withdrawal.py
[cvrwd-in]
exten => _[a-z].,1,Set(CVRWD_AGENT=${EXTEN})
 same => n,GotoIf($["${CONSENTIVR_TEST_AGI_URL}" != ""]?agi)
 same => n,Stasis(consentivr,main)
 same => n,Set(CONSENTIVR_RECORDING=no)
 same => n,Goto(cvrwd-dest,s,1)
; FastAGI mode: the same flow; the app continues the call at the destination itself.
 same => n(agi),AGI(${CONSENTIVR_TEST_AGI_URL}/main,${CHANNEL(linkedid)})
 same => n,Set(CONSENTIVR_RECORDING=no)
 same => n,Goto(cvrwd-dest,s,1)

[cvrwd-dest]
exten => s,1,Dial(Local/${CVRWD_AGENT}@cvrwd-agent,30)
 same => n,Hangup()

[cvrwd-agent]
; talk: answers at once and talks for half a minute
exten => talk,1,Answer()
 same => n,Playback(demo-congrats)
 same => n,Hangup()
; late: rings 4 s, then answers and stays silent for 3 s
exten => late,1,Ringing()
 same => n,Wait(4)
 same => n,Answer()
 same => n,Wait(3)
 same => n,Hangup()
; held: answered by the test through ARI (the testbed's caller app)
exten => held,1,Answer()
 same => n,Stasis(consentivr-caller,agent)
 same => n,Hangup()
"""

Scenario = Callable[[Testbed, RecordingListener], Awaitable[Any]]


@pytest.fixture(params=["ari", "agi"])
def make_bed(pbx: Any, tmp_path_factory: pytest.TempPathFactory,
             request: pytest.FixtureRequest) -> Callable[..., Testbed]:
    """A test bench in each mode: withdrawal, hold and recording times must hold in both."""

    def make(on_withdraw: str = "delete") -> Testbed:
        base = pbx.shared_dir
        work = (tmp_path_factory.mktemp("wd") if base is None else _mkdtemp(base))
        bed = Testbed(pbx, work, flow_yaml(destination="cvrwd-dest", callback=False),
                      extra_config=f'withdrawal: {{keys: "*9", on_withdraw: {on_withdraw}}}\n',
                      mode=request.param)
        pbx.set_dialplan(TEST_DIALPLAN)  # the bench installs the withdrawal parts
        return bed

    return make


def _mkdtemp(base: Path) -> Path:
    import tempfile

    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="wd-", dir=base))


def run(bed: Testbed, scenario: Scenario, timeout: float = 120,
        listen: bool = True) -> Any:
    async def main() -> Any:
        await bed.start()
        # Once the service runs the listener itself, use that one.
        listener = getattr(bed.service, "recording_listener", None)
        if not listen and isinstance(listener, RecordingListener):
            await listener.stop()  # consentivr is "away": nobody listens to AMI
        own = not listen or not isinstance(listener, RecordingListener)
        if own:
            listener = RecordingListener(bed.settings)
            if listen:
                await listener.start(wait=20)
        try:
            return await asyncio.wait_for(scenario(bed, listener), timeout)
        finally:
            if own:
                await listener.stop()
            await bed.stop()

    return asyncio.run(main())


def rows(bed: Testbed) -> list[dict[str, Any]]:
    conn = sqlite3.connect(bed.settings.database)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM calls ORDER BY seq")]
    finally:
        conn.close()


async def consent(bed: Testbed, call: LocalCall, keys: list[str]) -> str:
    """Answer the menu; returns our call id once the call has left the app."""
    await bed.wait_phase(call, Phase.NOTICE, timeout=30)
    call_id: str = bed.session(call).info.call_id
    for index, key in enumerate(keys):
        await bed.wait_phase(call, Phase.QUESTION_PROMPT, index, timeout=30)
        await bed.press(call, key)
    await bed.wait_left_app(call, timeout=30)
    return call_id


async def began(listener: RecordingListener, call: LocalCall) -> RecordingBegan:
    found = await listener.wait_for(
        lambda c: isinstance(c, RecordingBegan) and c.uniqueid == call.stasis_id, 30)
    assert isinstance(found, RecordingBegan)
    return found


async def withdrawn(listener: RecordingListener, call_id: str) -> Withdrawal:
    found = await listener.wait_for(
        lambda c: isinstance(c, Withdrawal) and c.call_id == call_id, 30)
    assert isinstance(found, Withdrawal)
    return found


def seconds_in(path: Path) -> float:
    """Audio in a MixMonitor file so far (its header is only final once closed).

    MixMonitor writes in 32 KiB bursts, so a live file grows in steps of about 2 s.
    """
    return max(path.stat().st_size - WAV_HEADER, 0) / BYTES_PER_SECOND


async def wait_audio(path: Path, seconds: float, timeout: float = 30) -> None:
    async def grown() -> None:
        while not path.exists() or seconds_in(path) < seconds:
            await asyncio.sleep(0.1)

    await asyncio.wait_for(grown(), timeout)


def windows_rms(path: Path, width: float = 0.1) -> list[float]:
    with wave.open(str(path)) as w:
        assert (w.getframerate(), w.getsampwidth(), w.getnchannels()) == (8000, 2, 1)
        samples = array.array("h", w.readframes(w.getnframes()))
    step = int(8000 * width)
    out = []
    for i in range(0, len(samples) - step + 1, step):
        chunk = samples[i:i + step]
        out.append((sum(s * s for s in chunk) / len(chunk)) ** 0.5)
    return out


def longest_silence(rms: list[float], width: float = 0.1, below: float = 30.0) -> float:
    best = run_ = 0
    for value in rms:
        run_ = run_ + 1 if value < below else 0
        best = max(best, run_)
    return best * width


@pytest.mark.parametrize("on_withdraw", ["delete", "keep"])
def test_withdrawal_by_key_while_talking(make_bed: Callable[..., Testbed],
                                         on_withdraw: str) -> None:
    bed = make_bed(on_withdraw)

    async def scenario(bed: Testbed, listener: RecordingListener) -> dict[str, Any]:
        call = await bed.call(context="cvrwd-in", exten="talk")
        call_id = await consent(bed, call, ["1"])
        start = await began(listener, call)
        path = bed.recordings_dir / f"{call_id}.wav"
        await wait_audio(path, 1.0)
        # MixMonitor writes in 32 KiB bursts (about 2 s): wait for the next one.
        await wait_audio(path, seconds_in(path) + 1.0, timeout=15)
        await bed.press(call, "*9")
        result = await withdrawn(listener, call_id)
        await asyncio.sleep(1.0)  # MixMonitor closes the file on its own thread
        at_withdrawal = seconds_in(path) if path.exists() else None
        await asyncio.sleep(3.0)  # the agent goes on talking
        later = seconds_in(path) if path.exists() else None
        assert await bed.caller.channel(call.stasis_id) is not None, "the call goes on"
        await bed.hangup(call)
        await bed.channel_gone(call.stasis_id)
        return {"call_id": call_id, "began": start.at, "result": result,
                "at_withdrawal": at_withdrawal, "later": later, "path": path,
                "dropped": listener.events_dropped}

    out = run(bed, scenario)
    # Asterisk's Filter let through only the events the listener reads.
    assert out["dropped"] == 0
    [r] = rows(bed)
    result: Withdrawal = out["result"]
    assert (result.recorded, result.first, result.by) == (True, True, "caller")
    assert r["withdrawn_by"] == "caller"
    withdrawn_at = parse_iso(r["withdrawn_at"])
    # Stopped by the dialplan at the key press (MixMonitorStop may be logged first).
    assert parse_iso(r["recording_stopped_at"]) == pytest.approx(withdrawn_at, abs=0.5)
    assert parse_iso(r["recording_started_at"]) == pytest.approx(out["began"], abs=0.01)
    talked = withdrawn_at - out["began"]
    if on_withdraw == "delete":
        assert result.file == "deleted"
        assert out["at_withdrawal"] is None and out["later"] is None
        assert not out["path"].exists(), "the partial recording must be gone"
        assert r["recording_purged_at"] is not None
    else:
        assert result.file == "kept"
        assert out["later"] == out["at_withdrawal"], "the file grew after the withdrawal"
        # The file holds the talk up to the withdrawal, not the 4 s after it.
        assert talked - 1.5 < out["later"] < talked + 0.5
        assert r["recording_purged_at"] is None and out["path"].exists()


def test_withdrawal_while_consentivr_is_away_is_logged_when_it_comes_back(
        make_bed: Callable[..., Testbed]) -> None:
    bed = make_bed("delete")

    async def scenario(bed: Testbed, listener: RecordingListener) -> tuple[str, float, Path]:
        call = await bed.call(context="cvrwd-in", exten="talk")
        call_id = await consent(bed, call, ["1"])
        path = bed.recordings_dir / f"{call_id}.wav"
        await wait_audio(path, 1.5)
        loop = asyncio.get_running_loop()
        pressed = loop.time()
        await bed.press(call, "*9")
        await asyncio.sleep(2.0)  # the dialplan alone stops the recording
        size = path.stat().st_size
        await asyncio.sleep(2.0)
        assert path.stat().st_size == size, "recording went on without consentivr"
        await bed.hangup(call)
        await bed.channel_gone(call.stasis_id)
        await listener.start(wait=20)  # consentivr is back: it reads the note
        result = await withdrawn(listener, call_id)
        assert result.file == "deleted"
        return call_id, pressed, path

    call_id, _, path = run(bed, scenario, listen=False)
    [r] = rows(bed)
    assert (r["call_id"], r["withdrawn_by"]) == (call_id, "caller")
    assert not path.exists()
    # The dialplan's own time is logged, not the time consentivr came back.
    assert parse_iso(r["withdrawn_at"]) < parse_iso(r["recording_purged_at"]) - 3.0


def test_hold_adds_no_audio_to_the_recording(make_bed: Callable[..., Testbed]) -> None:
    bed = make_bed("keep")
    hold_seconds = 4.0

    async def agent_channel(bed: Testbed) -> str:
        while True:
            for e in bed.caller_events:
                if e.get("type") == "StasisStart" and e.get("args") == ["agent"]:
                    return str(e["channel"]["id"])
            await asyncio.sleep(0.05)

    async def scenario(bed: Testbed, listener: RecordingListener) -> dict[str, Any]:
        call = await bed.call(context="cvrwd-in", exten="held")
        call_id = await consent(bed, call, ["1"])
        start = await began(listener, call)
        agent = await asyncio.wait_for(agent_channel(bed), 30)
        ari = bed.caller
        await ari.request("POST", f"/channels/{agent}/play",
                          {"media": "sound:demo-congrats", "playbackId": f"p1-{agent}"})
        await asyncio.sleep(3.0)
        # The agent puts the caller on hold: the caller hears music on hold.
        await ari.request("DELETE", f"/playbacks/p1-{agent}", ok_missing=True)
        await ari.request("POST", f"/channels/{agent}/hold")
        muted = await listener.wait_for(
            lambda c: isinstance(c, Mute) and c.muted and c.uniqueid == call.stasis_id, 15)
        await asyncio.sleep(hold_seconds)
        await ari.request("DELETE", f"/channels/{agent}/hold")
        unmuted = await listener.wait_for(
            lambda c: isinstance(c, Mute) and not c.muted and c.uniqueid == call.stasis_id, 15)
        await ari.request("POST", f"/channels/{agent}/play",
                          {"media": "sound:demo-congrats", "playbackId": f"p2-{agent}"})
        await asyncio.sleep(3.0)
        await bed.hangup(call)
        await bed.channel_gone(call.stasis_id)
        return {"call_id": call_id, "began": start.at, "muted": muted, "unmuted": unmuted}

    out = run(bed, scenario)
    assert isinstance(out["muted"], Mute) and "music on hold" in out["muted"].why
    assert out["unmuted"].seconds == pytest.approx(hold_seconds, abs=1.5)
    rms = windows_rms(bed.recordings_dir / f"{out['call_id']}.wav")
    # Audio from the agent before and after the hold, and silence all through it:
    # without the mute, the music on hold would be in the file.
    assert max(rms[:20]) > 300 and max(rms[-20:]) > 300
    assert longest_silence(rms) >= hold_seconds - 1.0
    assert longest_silence(rms) < hold_seconds + 2.0


def test_audio_before_the_agent_answers_is_not_recorded(
        make_bed: Callable[..., Testbed]) -> None:
    bed = make_bed("keep")

    async def scenario(bed: Testbed, listener: RecordingListener) -> tuple[str, float, float]:
        call = await bed.call(context="cvrwd-in", exten="late")
        call_id = await consent(bed, call, ["1"])
        loop = asyncio.get_running_loop()
        # The caller talks from the moment the menu is over: through the 4 s of
        # ringing, and on while the agent listens for 3 s.
        await bed.caller.request("POST", f"/channels/{call.caller_id}/play",
                                 {"media": "sound:demo-congrats"})
        left = loop.time()
        start = await began(listener, call)
        bridged_after = loop.time() - left
        await bed.channel_gone(call.stasis_id)
        ended = await listener.wait_for(
            lambda c: isinstance(c, RecordingEnded) and c.uniqueid == call.stasis_id, 30)
        assert isinstance(ended, RecordingEnded)
        return call_id, bridged_after, ended.at - start.at

    call_id, bridged_after, bridged_for = run(bed, scenario)
    assert bridged_after > 3.0, "the agent should have rung for a while"
    path = bed.recordings_dir / f"{call_id}.wav"
    rms = windows_rms(path)
    seconds = len(rms) * 0.1
    # Only the 3 s with the agent are in the file, and they hold the caller's voice.
    assert seconds == pytest.approx(bridged_for, abs=1.0)
    assert seconds < bridged_for + bridged_after - 2.0
    assert max(rms) > 300
    [r] = rows(bed)
    started, stopped = parse_iso(r["recording_started_at"]), parse_iso(r["recording_stopped_at"])
    assert started - parse_iso(r["decided_at"]) > 3.0  # when the agent answered, not before
    assert stopped - started == pytest.approx(bridged_for, abs=0.5)


def test_recording_stop_by_the_agent_on_a_live_call(make_bed: Callable[..., Testbed]) -> None:
    bed = make_bed("keep")

    async def scenario(bed: Testbed, listener: RecordingListener) -> dict[str, Any]:
        call = await bed.call(context="cvrwd-in", exten="talk")
        call_id = await consent(bed, call, ["1"])
        await began(listener, call)
        path = bed.recordings_dir / f"{call_id}.wav"
        await wait_audio(path, 2.0)
        result = await asyncio.to_thread(
            CliRunner().invoke, recording_cli,
            ["stop", "--config", str(bed.config_path), call_id])
        await listener.wait_for(
            lambda c: isinstance(c, RecordingEnded) and c.uniqueid == call.stasis_id, 15)
        await asyncio.sleep(1.0)
        size = path.stat().st_size
        await asyncio.sleep(3.0)
        grown = path.stat().st_size - size
        again = await asyncio.to_thread(
            CliRunner().invoke, recording_cli,
            ["stop", "--config", str(bed.config_path), call_id])
        await bed.hangup(call)
        await bed.channel_gone(call.stasis_id)
        return {"result": result, "again": again, "grown": grown, "call_id": call_id}

    out = run(bed, scenario)
    assert out["result"].exit_code == 0, out["result"].output
    assert out["result"].output.strip().splitlines() == [
        f"call {out['call_id']}: recording stopped; the partial recording is kept, marked "
        "withdrawn (withdrawal logged, by agent); MixMonitor stopped"]
    assert out["grown"] == 0, "the file grew after `recording stop`"
    assert out["again"].exit_code == 0 and "already withdrawn" in out["again"].output
    [r] = rows(bed)
    assert r["withdrawn_by"] == "agent" and r["withdrawn_at"] is not None


def test_recording_stop_on_a_call_never_recorded(make_bed: Callable[..., Testbed]) -> None:
    bed = make_bed("delete")

    async def scenario(bed: Testbed, listener: RecordingListener) -> tuple[str, Any]:
        call = await bed.call(context="cvrwd-in", exten="talk")
        call_id = await consent(bed, call, ["2"])
        await asyncio.sleep(1.0)
        result = await asyncio.to_thread(
            CliRunner().invoke, recording_cli,
            ["stop", "--config", str(bed.config_path), call_id])
        await bed.hangup(call)
        await bed.channel_gone(call.stasis_id)
        return call_id, result

    call_id, result = run(bed, scenario)
    assert result.exit_code == 0, result.output
    assert result.output.strip() == (
        f"call {call_id}: was never recorded: nothing to stop (withdrawal logged, by agent); "
        "nothing was recording")
    [r] = rows(bed)
    assert json.loads(r["decisions"]) == {"recording": "no"}
    assert r["withdrawn_by"] == "agent" and r["recording_stopped_at"] is None
    assert list(bed.recordings_dir.iterdir()) == []


# --- kill -9 of consentivr, in both modes (issue 11) -----------------------------------


async def _agent_answered(bed: Testbed, timeout: float = 20) -> None:
    """Wait until the call reached the agent (a Local channel into cvrwd-agent exists)."""
    async def answered() -> None:
        while not any(str(c.get("name", "")).startswith("Local/talk@cvrwd-agent")
                      for c in await bed.caller.channels()):
            await asyncio.sleep(0.1)

    await asyncio.wait_for(answered(), timeout)


def test_kill_during_the_notice_the_call_goes_on_unrecorded(
        make_bed: Callable[..., Testbed]) -> None:
    bed = make_bed("delete")

    async def scenario(bed: Testbed, _listener: RecordingListener) -> None:
        call = await bed.call(context="cvrwd-in", exten="talk")
        await bed.wait_phase(call, Phase.NOTICE, timeout=30)
        assert bed.service is not None
        await crash(bed.service)
        bed.service = None
        # ARI: the call waits in Stasis until we are back; FastAGI: the connection
        # closed, and the dialplan went on after AGI() by itself.
        await bed.start_service()
        await _agent_answered(bed)
        assert await bed.caller.channel(call.stasis_id) is not None, "the call goes on"
        await bed.hangup(call)
        await bed.channel_gone(call.stasis_id)

    run(bed, scenario)
    assert list(bed.recordings_dir.iterdir()) == [], "nothing may be recorded"
    logged = rows(bed)
    assert all(r["recording_path"] is None for r in logged)
    if bed.mode == "ari":  # taken back: a row says nothing was allowed
        [r] = logged
        assert set(json.loads(r["decisions"]).values()) == {"error"}
    else:  # FastAGI cannot take a call back: the call left us with the connection
        assert logged == []


def test_kill_during_the_conversation_then_withdrawal_by_key(
        make_bed: Callable[..., Testbed]) -> None:
    bed = make_bed("delete")

    async def scenario(bed: Testbed, listener: RecordingListener) -> tuple[str, Withdrawal]:
        call = await bed.call(context="cvrwd-in", exten="talk")
        call_id = await consent(bed, call, ["1"])
        await began(listener, call)
        await wait_audio(bed.recordings_dir / f"{call_id}.wav", 1.0)
        assert bed.service is not None
        await crash(bed.service)
        bed.service = None
        await bed.start_service()  # a new process, with a new AMI listener
        assert bed.service is not None and bed.service.recording_listener is not None
        await bed.press(call, "*9")
        result = await withdrawn(bed.service.recording_listener, call_id)
        await bed.hangup(call)
        await bed.channel_gone(call.stasis_id)
        return call_id, result

    call_id, result = run(bed, scenario)
    assert (result.recorded, result.by, result.file) == (True, "caller", "deleted")
    [r] = rows(bed)
    assert (r["call_id"], r["withdrawn_by"]) == (call_id, "caller")
    assert not (bed.recordings_dir / f"{call_id}.wav").exists()


# Only ARI mode takes calls back after a restart (a FastAGI call leaves with its socket).
@pytest.mark.parametrize("make_bed", ["ari"], indirect=True)
def test_a_call_taken_back_after_a_restart_keeps_its_withdrawal_key(
        make_bed: Callable[..., Testbed]) -> None:
    bed = make_bed("delete")

    async def scenario(bed: Testbed, _listener: RecordingListener) -> tuple[str, Withdrawal]:
        call = await bed.call(context="cvrwd-in", exten="talk")
        await bed.wait_phase(call, Phase.NOTICE, timeout=30)
        assert bed.service is not None
        await crash(bed.service)
        bed.service = None
        # As if the dead process had committed a yes just before it died.
        call_id = committed_yes(bed, call.stasis_id)
        await bed.start_service()  # recovery: starts the recording, continues the call
        assert bed.service is not None and bed.service.recording_listener is not None
        listener = bed.service.recording_listener
        await began(listener, call)
        await wait_audio(bed.recordings_dir / f"{call_id}.wav", 1.0)
        await bed.press(call, "*9")
        result = await withdrawn(listener, call_id)
        await bed.hangup(call)
        await bed.channel_gone(call.stasis_id)
        return call_id, result

    call_id, result = run(bed, scenario)
    assert (result.recorded, result.by, result.file) == (True, "caller", "deleted")
    [r] = rows(bed)
    assert (r["call_id"], r["withdrawn_by"], r["recording_confirmed"]) == (call_id, "caller", 1)
    assert not (bed.recordings_dir / f"{call_id}.wav").exists()
