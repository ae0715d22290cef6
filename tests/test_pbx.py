"""The test PBX itself: a real Asterisk, reachable over CLI, ARI, AMI and SIP."""

from __future__ import annotations

import asyncio
import base64
import itertools
import math
import os
import secrets
import shutil
import signal
import socket
import struct
import tempfile
import time
import urllib.error
import urllib.request
import wave
from collections.abc import Iterator
from pathlib import Path

import pytest

from consentivr_testbed.pbx import (
    Pbx,
    PbxEndpoints,
    PbxError,
    SandboxPbx,
    ami_command,
    ari_get,
    asterisk_major_version,
    external_endpoints_from_env,
)
from consentivr_testbed.sipcaller import (
    SipCallResult,
    build_rtp,
    place_call,
    place_call_async,
    write_pcap,
)

# Each call's digit lands in a GLOBAL named after its caller id.
DIGIT_DIALPLAN = """
[consentivr-test]
exten => digit,1,Answer()
 same => n,Read(D,,1,t(),,8)
 same => n,Set(GLOBAL(DIGIT_${CALLERID(num)})=${IF($["${D}" = ""]?none:${D})})
 same => n,Hangup()

exten => record,1,Answer()
 same => n,MixMonitor(${SHARED}/rec-${CALLERID(num)}.wav)
 same => n,Wait(3)
 same => n,Hangup()

exten => hold,1,Answer()
 same => n,Wait(30)
 same => n,Hangup()
"""


@pytest.fixture
def digit_dialplan(pbx: Pbx) -> None:
    shared = pbx.shared_dir or Path("/tmp")
    pbx.set_dialplan(DIGIT_DIALPLAN.replace("${SHARED}", str(shared)))


def _globals(pbx: Pbx) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in pbx.cli("dialplan show globals").splitlines():
        name, sep, value = line.strip().partition("=")
        if sep:
            out[name] = value
    return out


def _caller() -> str:
    return f"t{secrets.token_hex(4)}"


# --------------------------------------------------------------------------- basics


def test_core_show_version_is_asterisk_22_or_later(pbx: Pbx) -> None:
    out = pbx.cli("core show version")
    major = asterisk_major_version(out)
    assert major is not None and major >= 22, out


def test_ari_answers_with_auth_only(pbx: Pbx) -> None:
    ep = pbx.endpoints
    assert ep.ari_url.startswith("http://") and not ep.ari_url.endswith("/ari")

    def get(user: str, password: str) -> int:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        req = urllib.request.Request(
            f"{ep.ari_url}/ari/asterisk/info", headers={"Authorization": f"Basic {token}"}
        )
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                assert b'"system"' in resp.read()
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return exc.code

    assert get(ep.ari_user, ep.ari_password) == 200
    assert get(ep.ari_user, "wrong-" + ep.ari_password) == 401


def _ami_login(ep: PbxEndpoints, password: str) -> str:
    with socket.create_connection((ep.ami_host, ep.ami_port), timeout=5) as sock:
        reader = sock.makefile("rb")
        banner = reader.readline().decode()
        assert banner.startswith("Asterisk Call Manager/"), banner
        sock.sendall(
            f"Action: Login\r\nUsername: {ep.ami_user}\r\nSecret: {password}\r\n\r\n".encode()
        )
        lines: list[str] = []
        while (line := reader.readline().decode().strip()) or not lines:
            if line:
                lines.append(line)
        return "\n".join(lines)


def test_ami_login(pbx: Pbx) -> None:
    ep = pbx.endpoints
    assert "Response: Success" in _ami_login(ep, ep.ami_password)
    assert "Response: Error" in _ami_login(ep, "wrong-" + ep.ami_password)
    assert "Asterisk" in ami_command(ep, "core show version")


def test_listeners_are_bound_to_localhost_only(pbx: Pbx) -> None:
    if not isinstance(pbx, SandboxPbx):
        pytest.skip("only the sandbox's bindings are ours")
    assert "127.0.0.1" in pbx.cli("http show status")
    transports = pbx.cli("pjsip show transports")
    assert f"127.0.0.1:{pbx.endpoints.sip_port}" in transports, transports


def test_set_dialplan_shows_up(pbx: Pbx) -> None:
    exten = f"probe{secrets.token_hex(3)}"
    pbx.set_dialplan(f"[consentivr-test]\nexten => {exten},1,NoOp(probe)\n same => n,Hangup()\n")
    out = pbx.cli("dialplan show consentivr-test")
    assert exten in out, out


def test_set_features_shows_up(pbx: Pbx) -> None:
    pbx.set_features("consentivrprobe => *7,self,Playback(beep)\n")
    out = pbx.cli("features show")
    assert "consentivrprobe" in out, out


# --------------------------------------------------------------------------- SIP calls


def _assert_digit(pbx: Pbx, result: SipCallResult, digit: str) -> None:
    assert result.ok, result.describe()
    assert result.remote_hangup, result.describe()
    assert _globals(pbx).get(f"DIGIT_{result.caller_id}") == digit, result.describe()


@pytest.mark.usefixtures("digit_dialplan")
def test_sipp_call_sends_dtmf_7(pbx: Pbx) -> None:
    result = place_call(
        pbx.endpoints,
        "digit",
        [("pause", 1.0), ("dtmf", "7"), ("wait_hangup", 10)],
        caller_id=_caller(),
        timeout=30,
    )
    _assert_digit(pbx, result, "7")


@pytest.mark.usefixtures("digit_dialplan")
def test_sipp_dtmf_without_media_stream(pbx: Pbx) -> None:
    result = place_call(
        pbx.endpoints,
        "digit",
        [("pause", 1.0), ("dtmf", "#"), ("wait_hangup", 10)],
        audio=False,
        caller_id=_caller(),
        timeout=30,
    )
    _assert_digit(pbx, result, "#")


@pytest.mark.usefixtures("digit_dialplan")
def test_sipp_ulaw_caller(pbx: Pbx) -> None:
    result = place_call(
        pbx.endpoints,
        "digit",
        [("audio", 1.0), ("dtmf", "3"), ("wait_hangup", 10)],
        codec="PCMU",
        caller_id=_caller(),
        timeout=30,
    )
    _assert_digit(pbx, result, "3")


@pytest.mark.usefixtures("digit_dialplan")
def test_concurrent_sipp_calls(pbx: Pbx) -> None:
    digits = "0123456789*#"

    async def calls() -> list[SipCallResult]:
        return await asyncio.gather(
            *(
                place_call_async(
                    pbx.endpoints,
                    "digit",
                    [("pause", 1.0), ("dtmf", d), ("wait_hangup", 15)],
                    caller_id=_caller(),
                    timeout=40,
                )
                for d in digits
            )
        )

    results = asyncio.run(calls())
    for digit, result in zip(digits, results, strict=True):
        _assert_digit(pbx, result, digit)


@pytest.mark.usefixtures("digit_dialplan")
def test_caller_hangs_up_first(pbx: Pbx) -> None:
    result = place_call(
        pbx.endpoints, "hold", [("pause", 1.0), ("hangup", 0)], caller_id=_caller(), timeout=30
    )
    assert result.ok, result.describe()
    assert not result.remote_hangup


@pytest.mark.usefixtures("digit_dialplan")
def test_unknown_extension_fails_the_call(pbx: Pbx) -> None:
    result = place_call(pbx.endpoints, "nosuchexten", [("hangup", 0)], timeout=15)
    assert not result.ok


@pytest.mark.usefixtures("digit_dialplan")
def test_caller_audio_ends_up_in_recording(pbx: Pbx) -> None:
    if pbx.shared_dir is None:
        pytest.skip("no dir shared with this Asterisk (CONSENTIVR_TEST_SHARED_DIR)")
    result = place_call(
        pbx.endpoints, "record", [("audio", 5.0), ("wait_hangup", 10)], caller_id=_caller()
    )
    assert result.ok and result.remote_hangup, result.describe()
    path = pbx.shared_dir / f"rec-{result.caller_id}.wav"
    with wave.open(str(path), "rb") as wav:
        frames = wav.readframes(wav.getnframes())
        seconds = wav.getnframes() / wav.getframerate()
    samples = struct.unpack(f"<{len(frames) // 2}h", frames)
    rms = math.sqrt(sum(s * s for s in samples) / max(1, len(samples)))
    assert 2.5 <= seconds <= 3.5, seconds
    assert rms > 1000, rms  # the 440 Hz tone, not silence


# --------------------------------------------------------------------------- restart


@pytest.fixture
def own_sandbox(pbx: Pbx) -> Iterator[SandboxPbx]:
    """A second sandbox (0.5 s to start), so crashing it leaves the session PBX alone."""
    if not isinstance(pbx, SandboxPbx):
        pytest.skip("only the sandbox can be restarted")
    base = Path(tempfile.mkdtemp(prefix="consentivr-pbx-", dir="/tmp"))
    sandbox = SandboxPbx(base / "run", cache_dir=pbx.cache_dir)
    try:
        sandbox.start()
        yield sandbox
    finally:
        sandbox.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_restart_keeps_ports_and_dialplan(own_sandbox: SandboxPbx) -> None:
    box = own_sandbox
    box.set_dialplan("[consentivr-test]\nexten => beforerestart,1,Hangup()\n")
    before = box.endpoints
    old_pid = box.pid()
    assert old_pid is not None
    assert box.restart() == before
    assert box.pid() not in (None, old_pid)
    assert "beforerestart" in box.cli("dialplan show consentivr-test")


def test_restart_after_crash(own_sandbox: SandboxPbx) -> None:
    box = own_sandbox
    pid = box.pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while box.running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not box.running()
    with pytest.raises(PbxError, match="not running"):
        box.cli("core show version")
    before = box.endpoints
    assert box.restart() == before
    assert "Asterisk" in box.cli("core show version")
    assert ari_get(box.endpoints, "asterisk/info")


# --------------------------------------------------------------------------- no PBX needed


def test_external_endpoints_from_env() -> None:
    assert external_endpoints_from_env({}) is None
    ep = external_endpoints_from_env(
        {
            "CONSENTIVR_TEST_ARI_URL": "http://pbx.example:8088/ari/",
            "CONSENTIVR_TEST_ARI_PASSWORD": "s3cret",
            "CONSENTIVR_TEST_SIP_PORT": "5060",
        }
    )
    assert ep is not None
    assert ep.ari_url == "http://pbx.example:8088"
    assert (ep.ami_host, ep.ami_port, ep.sip_host, ep.sip_port) == (
        "pbx.example",
        5038,
        "pbx.example",
        5060,
    )
    assert ep.ari_password == "s3cret" and ep.shared_dir is None
    with pytest.raises(PbxError, match="CONSENTIVR_TEST_AMI_PORT"):
        external_endpoints_from_env(
            {"CONSENTIVR_TEST_ARI_URL": "http://x:1", "CONSENTIVR_TEST_AMI_PORT": "five"}
        )


def test_rtp_script_timing_and_dtmf_events(tmp_path: Path) -> None:
    packets, media, wait = build_rtp(
        [("pause", 0.2), ("dtmf", "12"), ("audio", 0.1), ("wait_hangup", 0.4)]
    )
    # 0.2 pause + 2 digits (0.12 each) + 0.1 gap + 0.1 audio; then 0.4 s of silence
    assert math.isclose(media, 0.64, abs_tol=1e-9)
    assert wait == 0.4
    events = [p for _, p in packets if p[1] & 0x7F == 101]
    ends = [p for p in events if p[13] & 0x80]
    assert len(events) == 16 and len(ends) == 6
    assert {p[12] for p in events} == {1, 2}
    seqs = [struct.unpack("!H", p[2:4])[0] for _, p in packets]
    assert all((b - a) & 0xFFFF == 1 for a, b in itertools.pairwise(seqs))
    pcap = tmp_path / "x.pcap"
    write_pcap(pcap, packets, 20000, 4000)
    assert pcap.stat().st_size == 24 + sum(16 + 42 + len(p) for _, p in packets)


def test_bad_scripts_are_rejected() -> None:
    with pytest.raises(ValueError, match="digits"):
        build_rtp([("dtmf", "x")])
    with pytest.raises(ValueError, match="last step"):
        build_rtp([("hangup", 0), ("pause", 1)])
    with pytest.raises(ValueError, match="unknown step"):
        build_rtp([("sing", 1)])


def test_set_dialplan_reports_parse_errors(pbx: Pbx) -> None:
    if not isinstance(pbx, SandboxPbx):
        pytest.skip("parse errors are read from the sandbox's log")
    with pytest.raises(PbxError, match=r"No closing parenthesis"):
        pbx.set_dialplan("[consentivr-test]\nexten => broken,1,NoOp(\n")
    with pytest.raises(PbxError, match=r"applicationmap"):
        pbx.set_features("nonsense => x\n")
    pbx.set_features("")
    pbx.set_dialplan("[consentivr-test]\nexten => fine,1,NoOp()\n")


def test_wav_step(tmp_path: Path) -> None:
    good = tmp_path / "good.wav"
    with wave.open(str(good), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(8000)
        wav.writeframes(struct.pack("<800h", *([1000] * 800)))  # 0.1 s
    packets, media, _ = build_rtp([("wav", str(good))], codec="PCMU")
    assert len(packets) == 5 and math.isclose(media, 0.1)
    assert {p[1] & 0x7F for _, p in packets} == {0}
    bad = tmp_path / "bad.wav"
    with wave.open(str(bad), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(16000)
        wav.writeframes(b"\0\0" * 160)
    with pytest.raises(ValueError, match="sox"):
        build_rtp([("wav", str(bad))])
