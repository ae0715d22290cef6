"""A real SIP caller for tests and the demo: ``sipp`` driven by a small call script.

A script is a sequence of steps::

    ("pause", 2.0)        # stay on the line for 2 s (sending silence)
    ("dtmf", "1#")        # RFC 4733 digits: 100 ms each, 100 ms apart
    ("audio", 3.0)        # 3 s of a 440 Hz tone (real audio, e.g. for recordings)
    ("wav", "/x.wav")     # play a WAV file (8 kHz mono 16 bit: sox in.wav -r 8000 -c 1 -b 16 x.wav)
    ("hangup", 0)         # send BYE (the default end of every script)
    ("wait_hangup", 10)   # keep the line (silence) until Asterisk hangs up; BYE after 10 s

The whole media script becomes ONE pcap with one continuous RTP stream (audio,
silence and DTMF events, like a real phone sends), played with sipp's
``play_pcap_audio``. A BYE from Asterisk at any time is answered and reported as
``remote_hangup``. Each call runs its own ``sipp -m 1`` on its own local ports, so
many calls can run at once (see ``place_call_async``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import math
import os
import random
import re
import secrets
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
import wave
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from string import Template
from typing import Literal

from consentivr.errors import ConsentivrError
from consentivr_testbed.pbx import PbxEndpoints, assets_dir, port_is_free, tail

Step = tuple[str, float | str]
Codec = Literal["PCMA", "PCMU"]

SAMPLE_RATE = 8000
FRAME = 160  # 20 ms at 8 kHz
PTIME = 0.020
DTMF_PT = 101
DTMF_ON = 0.100
DTMF_GAP = 0.100
DTMF_END_PACKETS = 3  # RFC 4733: the end packet is sent three times
TONE_HZ = 440.0
_DTMF_EVENTS = {d: i for i, d in enumerate("0123456789*#ABCD")}  # RFC 4733 event codes
_PAYLOAD_TYPES: dict[str, int] = {"PCMU": 0, "PCMA": 8}
# sipp's local ports: above Asterisk's RTP block (10000-20000), below Linux's
# ephemeral range (32768+), where port-0 listeners land.
_PORT_LOW, _PORT_HIGH, _PORT_BLOCK = 20000, 32000, 8


class SipCallError(ConsentivrError):
    """sipp could not be run at all (not installed, no free ports, no SIP port known)."""


@dataclass(frozen=True)
class SipCallResult:
    returncode: int  # sipp's: 0 = the call completed as scripted, 1 = it failed
    caller_id: str  # the From user, i.e. CALLERID(num) in Asterisk
    remote_hangup: bool  # Asterisk sent the BYE
    duration: float  # wall-clock seconds
    stderr_tail: str
    errors_tail: str  # sipp's unexpected-message log

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def summary(self) -> str:
        """One line: rc, caller, who hung up, and sipp's last complaint if any."""
        last = (self.errors_tail or self.stderr_tail).strip().splitlines()
        why = f": {last[-1]}" if last and not self.ok else ""
        who = "Asterisk" if self.remote_hangup else "caller"
        return f"sipp rc={self.returncode} caller={self.caller_id} hung up by {who}{why}"

    def describe(self) -> str:
        """A few lines for an assertion message."""
        return (
            f"sipp rc={self.returncode} caller={self.caller_id} remote_hangup={self.remote_hangup} "
            f"duration={self.duration:.1f}s\nstderr: {self.stderr_tail}\nerrors: {self.errors_tail}"
        )


# --------------------------------------------------------------------------- G.711


def _linear2alaw(pcm: int) -> int:
    pcm >>= 3
    if pcm >= 0:
        mask = 0xD5
    else:
        mask = 0x55
        pcm = -pcm - 1
    for seg, end in enumerate((0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF)):
        if pcm <= end:
            aval = seg << 4
            aval |= (pcm >> 1) & 0x0F if seg < 2 else (pcm >> seg) & 0x0F
            return aval ^ mask
    return 0x7F ^ mask


def _linear2ulaw(pcm: int) -> int:
    pcm >>= 2
    if pcm < 0:
        pcm, mask = -pcm, 0x7F
    else:
        mask = 0xFF
    pcm = min(pcm, 8159) + (0x84 >> 2)
    for seg, end in enumerate((0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF)):
        if pcm <= end:
            return ((seg << 4) | ((pcm >> (seg + 1)) & 0x0F)) ^ mask
    return 0x7F ^ mask


@cache
def _g711_table(codec: Codec) -> bytes:
    enc = _linear2alaw if codec == "PCMA" else _linear2ulaw
    return bytes(enc(s) for s in range(-32768, 32768))


def encode_g711(samples: Sequence[int], codec: Codec) -> bytes:
    table = _g711_table(codec)
    return bytes(table[s + 32768] for s in samples)


# --------------------------------------------------------------------------- media


def _tone(seconds: float, hz: float = TONE_HZ, amplitude: int = 8000) -> list[int]:
    n = round(seconds * SAMPLE_RATE)
    return [int(amplitude * math.sin(2 * math.pi * hz * i / SAMPLE_RATE)) for i in range(n)]


def _read_wav(path: Path) -> list[int]:
    try:
        with wave.open(str(path), "rb") as wav:
            if (wav.getnchannels(), wav.getsampwidth(), wav.getframerate()) != (1, 2, SAMPLE_RATE):
                raise ValueError(
                    f"{path}: need 8 kHz mono 16-bit WAV; convert with "
                    f"'sox {path} -r 8000 -c 1 -b 16 out.wav'"
                )
            data = wav.readframes(wav.getnframes())
    except (OSError, wave.Error) as exc:
        raise ValueError(f"cannot read WAV {path}: {exc}") from None
    return list(struct.unpack(f"<{len(data) // 2}h", data))


class _RtpStream:
    """Builds the RTP packets of one call: 20 ms media frames and RFC 4733 events."""

    def __init__(self, codec: Codec, send_media: bool) -> None:
        self.codec = codec
        self.pt = _PAYLOAD_TYPES[codec]
        self.send_media = send_media
        self.silence = encode_g711([0] * FRAME, codec)
        self.seq = random.randrange(1 << 16)
        self.ts = random.randrange(1 << 32)
        self.ssrc = random.randrange(1 << 32)
        self.clock = 0.0  # seconds since the stream started
        self.packets: list[tuple[float, bytes]] = []
        self._marker = True

    def _rtp(self, pt: int, marker: bool, ts: int, payload: bytes) -> None:
        head = struct.pack(
            "!BBHII", 0x80, (0x80 if marker else 0) | pt, self.seq, ts & 0xFFFFFFFF, self.ssrc
        )
        self.packets.append((self.clock, head + payload))
        self.seq = (self.seq + 1) & 0xFFFF

    def _tick(self) -> None:
        self.clock += PTIME
        self.ts = (self.ts + FRAME) & 0xFFFFFFFF

    def samples(self, pcm: Sequence[int]) -> None:
        for off in range(0, len(pcm), FRAME):
            chunk = list(pcm[off : off + FRAME])
            chunk += [0] * (FRAME - len(chunk))
            if self.send_media:
                self._rtp(self.pt, self._marker, self.ts, encode_g711(chunk, self.codec))
                self._marker = False
            self._tick()

    def silence_for(self, seconds: float) -> None:
        for _ in range(round(seconds / PTIME)):
            if self.send_media:
                self._rtp(self.pt, self._marker, self.ts, self.silence)
                self._marker = False
            self._tick()

    def digit(self, digit: str) -> None:
        event = _DTMF_EVENTS[digit]
        start = self.ts
        frames = round(DTMF_ON / PTIME)
        for i in range(1, frames + 1):
            self._rtp(DTMF_PT, i == 1, start, struct.pack("!BBH", event, 10, i * FRAME))
            self._tick()
        # The end packet goes out three times back to back (as Asterisk does);
        # same timestamp and duration, new sequence numbers.
        for _ in range(DTMF_END_PACKETS):
            self._rtp(DTMF_PT, False, start, struct.pack("!BBH", event, 0x80 | 10, frames * FRAME))
        self._tick()
        self._marker = True  # media resumes: a new talkspurt


def _normalise(script: Sequence[Step]) -> tuple[list[Step], float]:
    """Validate the script; split off its ending. Returns (media steps, wait seconds)."""
    steps = list(script)
    wait = 0.0
    if steps and steps[-1][0] in ("hangup", "wait_hangup"):
        kind, arg = steps.pop()
        wait = float(arg) if kind == "wait_hangup" else 0.0
    for kind, arg in steps:
        if kind in ("pause", "audio"):
            if not isinstance(arg, int | float) or arg < 0:
                raise ValueError(f"step ({kind!r}, {arg!r}): needs seconds >= 0")
        elif kind == "dtmf":
            if not isinstance(arg, str) or not arg or any(d not in _DTMF_EVENTS for d in arg):
                raise ValueError(f"step ('dtmf', {arg!r}): digits must be from 0-9*#A-D")
        elif kind == "wav":
            if not isinstance(arg, str | os.PathLike):
                raise ValueError(f"step ('wav', {arg!r}): needs a file path")
        elif kind in ("hangup", "wait_hangup"):
            raise ValueError(f"step {kind!r} must be the last step of the script")
        else:
            raise ValueError(f"unknown step {kind!r}")
    if wait < 0:
        raise ValueError("wait_hangup needs seconds >= 0")
    return steps, wait


def build_rtp(
    script: Sequence[Step], *, codec: Codec = "PCMA", audio: bool = True
) -> tuple[list[tuple[float, bytes]], float, float]:
    """RTP packets (offset seconds, bytes) for a script, media seconds, wait seconds.

    With ``audio=False`` only the DTMF events go on the wire ("audio" and "wav"
    steps become plain pauses), like sipp's stock dtmf pcaps.
    """
    steps, wait = _normalise(script)
    stream = _RtpStream(codec, send_media=audio)
    for kind, arg in steps:
        if kind == "pause":
            stream.silence_for(float(arg))
        elif kind == "audio":
            stream.samples(_tone(float(arg)))
        elif kind == "wav":
            stream.samples(_read_wav(Path(str(arg))))
        elif kind == "dtmf":
            for i, digit in enumerate(str(arg)):
                if i:
                    stream.silence_for(DTMF_GAP)
                stream.digit(digit)
    media = stream.clock
    # Keep the line alive (silence) while waiting for Asterisk's BYE.
    stream.silence_for(wait)
    return stream.packets, media, wait


def write_pcap(path: Path, packets: Sequence[tuple[float, bytes]], sport: int, dport: int) -> None:
    """Write RTP payloads as Ethernet/IPv4/UDP frames; sipp rewrites the addresses."""
    src, dst = socket.inet_aton("127.0.0.1"), socket.inet_aton("127.0.0.1")
    base = 1_700_000_000.0
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)]
    for ident, (offset, rtp) in enumerate(packets):
        udp = struct.pack("!HHHH", sport, dport, 8 + len(rtp), 0) + rtp
        ip = bytearray(
            struct.pack(
                "!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), ident & 0xFFFF, 0, 64, 17, 0, src, dst
            )
        )
        ip[10:12] = struct.pack("!H", _ip_checksum(bytes(ip)))
        frame = b"\x00" * 12 + b"\x08\x00" + bytes(ip) + udp
        when = base + offset
        sec = int(when)
        out.append(struct.pack("<IIII", sec, round((when - sec) * 1e6), len(frame), len(frame)))
        out.append(frame)
    path.write_bytes(b"".join(out))


def _ip_checksum(header: bytes) -> int:
    total: int = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


# --------------------------------------------------------------------------- ports


class _PortPool:
    """Hands out blocks of local UDP ports, never the same one twice in a row.

    Process-wide, so concurrent calls in one test run never collide; the random
    start keeps parallel test processes apart, and each block is checked free.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next = random.randrange(_PORT_LOW, _PORT_HIGH, _PORT_BLOCK)

    def take(self) -> tuple[int, int]:
        """(sip port, media port); media is even, media+1..3 are free as well."""
        with self._lock:
            for _ in range((_PORT_HIGH - _PORT_LOW) // _PORT_BLOCK):
                base = self._next
                self._next += _PORT_BLOCK
                if self._next + _PORT_BLOCK > _PORT_HIGH:
                    self._next = _PORT_LOW
                sip, media = base, base + 4
                if all(port_is_free(p) for p in (sip, media, media + 1, media + 2, media + 3)):
                    return sip, media
        raise SipCallError(f"no free UDP ports for sipp in {_PORT_LOW}-{_PORT_HIGH}")


_ports = _PortPool()


# --------------------------------------------------------------------------- calls


def _local_ip_for(host: str, port: int) -> str:
    """The local address that reaches ``host``: 127.0.0.1 for the sandbox."""
    try:
        if ipaddress.ip_address(socket.gethostbyname(host)).is_loopback:
            return "127.0.0.1"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.connect((host, port))  # UDP: no packet is sent, only a route lookup
            addr: str = sock.getsockname()[0]
            return addr
    except OSError as exc:
        raise SipCallError(f"cannot reach SIP host {host}: {exc}") from None


@dataclass(frozen=True)
class _Prepared:
    argv: list[str]
    work: Path
    caller_id: str
    timeout: float


def _prepare(
    endpoints: PbxEndpoints,
    exten: str,
    script: Sequence[Step],
    *,
    audio: bool,
    caller_id: str | None,
    codec: Codec,
    timeout: float,
    work_dir: Path | None,
) -> _Prepared:
    sipp = shutil.which("sipp")
    if sipp is None:
        raise SipCallError("sipp is not installed (Debian package 'sip-tester')")
    if endpoints.sip_port is None:
        raise SipCallError("this PBX has no SIP port configured (CONSENTIVR_TEST_SIP_PORT)")
    caller = caller_id or f"sipp{secrets.token_hex(3)}"
    if not re.fullmatch(r"[A-Za-z0-9_.+-]{1,40}", caller):
        raise ValueError(f"caller_id {caller!r}: use 1-40 letters, digits or _.+-")
    packets, media, wait = build_rtp(script, codec=codec, audio=audio)
    template = Template((assets_dir() / "sipp" / "caller.xml").read_text(encoding="utf-8"))
    local_ip = _local_ip_for(endpoints.sip_host, endpoints.sip_port)
    sip_port, media_port = _ports.take()
    work = Path(tempfile.mkdtemp(prefix=f"sipcall-{caller}-", dir=work_dir))
    pcap = work / "media.pcap"
    play = ""
    lead = packets[0][0] if packets else media
    if packets:
        write_pcap(pcap, [(t - lead, p) for t, p in packets], media_port, 4000)
        play = f'<exec play_pcap_audio="{pcap}"/>'
    scenario = work / "caller.xml"
    scenario.write_text(
        template.substitute(
            caller_id=caller,
            pt=_PAYLOAD_TYPES[codec],
            codec=codec,
            play=play,
            lead_ms=max(1, round(lead * 1000)),
            media_ms=max(1, round((media - lead) * 1000)),
            # 1 ms: "hangup" still takes an Asterisk BYE that crossed ours.
            wait_ms=max(1, round(wait * 1000)),
        ),
        encoding="ISO-8859-1",
    )
    argv = [
        sipp,
        f"{endpoints.sip_host}:{endpoints.sip_port}",
        "-sf", str(scenario),
        "-s", exten,
        "-i", local_ip,
        "-p", str(sip_port),
        "-mp", str(media_port),
        "-m", "1",
        "-l", "1",
        "-nostdin",
        "-aa",
        "-timeout", f"{math.ceil(timeout)}s",
        "-timeout_error",
        "-trace_err", "-error_file", str(work / "errors.log"),
        "-trace_logs", "-log_file", str(work / "actions.log"),
    ]  # fmt: skip
    return _Prepared(argv, work, caller, timeout)


def _result(prep: _Prepared, rc: int, stderr: bytes, started: float) -> SipCallResult:
    actions = prep.work / "actions.log"
    try:
        logged = actions.read_text(encoding="utf-8", errors="replace")
    except OSError:
        logged = ""
    err_text = "\n".join(stderr.decode("utf-8", "replace").strip().splitlines()[-10:])
    errors = prep.work / "errors.log"
    result = SipCallResult(
        returncode=rc,
        caller_id=prep.caller_id,
        remote_hangup="remote-bye" in logged,
        duration=time.monotonic() - started,
        stderr_tail=err_text,
        errors_tail=tail(errors, 20) if errors.exists() else "",
    )
    # The result carries sipp's complaints; keep the files only when asked to.
    if not os.environ.get("CONSENTIVR_KEEP_SIPP"):
        shutil.rmtree(prep.work, ignore_errors=True)
    return result


def place_call(
    endpoints: PbxEndpoints,
    exten: str,
    script: Sequence[Step],
    *,
    audio: bool = True,
    caller_id: str | None = None,
    codec: Codec = "PCMA",
    timeout: float = 60,
    work_dir: Path | None = None,
) -> SipCallResult:
    """Call ``exten`` on the PBX's SIP endpoint and follow ``script``; blocks until done.

    The call's files (scenario, pcap, sipp logs) go to a temp dir under ``work_dir``
    that is removed afterwards unless ``$CONSENTIVR_KEEP_SIPP`` is set.
    """
    prep = _prepare(
        endpoints, exten, script, audio=audio, caller_id=caller_id, codec=codec,
        timeout=timeout, work_dir=work_dir,
    )  # fmt: skip
    started = time.monotonic()
    try:
        res = subprocess.run(
            prep.argv,
            cwd=prep.work,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=timeout + 15,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        return _result(prep, -9, exc.stderr or b"sipp hung; killed", started)
    return _result(prep, res.returncode, res.stderr, started)


async def place_call_async(
    endpoints: PbxEndpoints,
    exten: str,
    script: Sequence[Step],
    *,
    audio: bool = True,
    caller_id: str | None = None,
    codec: Codec = "PCMA",
    timeout: float = 60,
    work_dir: Path | None = None,
) -> SipCallResult:
    """``place_call`` for asyncio: run many with ``asyncio.gather``."""
    prep = _prepare(
        endpoints, exten, script, audio=audio, caller_id=caller_id, codec=codec,
        timeout=timeout, work_dir=work_dir,
    )  # fmt: skip
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *prep.argv,
        cwd=prep.work,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _, stderr = await asyncio.wait_for(proc.communicate(), timeout + 15)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        return _result(prep, -9, b"sipp hung; killed", started)
    except asyncio.CancelledError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        raise
    assert proc.returncode is not None
    return _result(prep, proc.returncode, stderr, started)


def script_duration(script: Sequence[Step]) -> float:
    """Seconds of media a script plays (without its final wait)."""
    _, media, _ = build_rtp(script, audio=False)
    return media


def iter_digits(digits: str, pause: float = 0.3) -> Iterator[Step]:
    """Steps that press ``digits`` one by one with ``pause`` seconds between them."""
    for i, d in enumerate(digits):
        if i:
            yield ("pause", pause)
        yield ("dtmf", d)
