"""The FastAGI adapter without Asterisk: the wire protocol, whole calls against a
scripted fake Asterisk on a local socket, and malformed sessions.

The real-Asterisk runs of the same flows are in ``tests/test_e2e.py`` (mode ``agi``).
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from consentivr.agi import (
    LINE_LIMIT,
    AgiConnection,
    AgiError,
    AgiServer,
    Reply,
    flow_name,
    parse_environment,
    parse_listen,
    parse_reply,
    quote,
)
from consentivr.configfile import load_settings
from consentivr.consentwriter import ConsentWriter
from consentivr.settings import Settings
from consentivr.store import ConsentLog, GroupCommitter, load_or_create_key
from consentivr_testbed.pbx import PbxEndpoints
from consentivr_testbed.testbed import flow_yaml, write_config

DEAD = "511 Command Not Permitted on a dead channel or intercept routine\n"
ENV: dict[str, str] = {
    "agi_network": "yes",
    "agi_network_script": "main",
    "agi_request": "agi://127.0.0.1:4573/main",
    "agi_channel": "PJSIP/alice-00000001",
    "agi_language": "en",
    "agi_type": "PJSIP",
    "agi_uniqueid": "1700000000.1",
    "agi_callerid": "+31201234567",
    "agi_context": "from-trunk",
    "agi_extension": "100",
    "agi_priority": "2",
    "agi_accountcode": "",
}


def env_bytes(env: Mapping[str, str] = ENV, **changes: str | None) -> bytes:
    merged = {**env, **changes}
    lines = [f"{k}: {v}" if v else f"{k}:" for k, v in merged.items() if v is not None]
    return ("\n".join(lines) + "\n\n").encode()


# --- the wire protocol ------------------------------------------------------------


@pytest.mark.parametrize(("line", "expected"), [
    ("200 result=0", Reply(200, 0, None, {}, "200 result=0")),
    ("200 result=1 (s-basic)", Reply(200, 1, "s-basic", {}, "200 result=1 (s-basic)")),
    ("200 result=1 (bar baz)", Reply(200, 1, "bar baz", {}, "200 result=1 (bar baz)")),
    ("200 result=1 (a (b) c)", Reply(200, 1, "a (b) c", {}, "200 result=1 (a (b) c)")),
    ("200 result=0 endpos=3520", Reply(200, 0, None, {"endpos": "3520"},
                                       "200 result=0 endpos=3520")),
    ("200 result=53 endpos=5760", Reply(200, 53, None, {"endpos": "5760"},
                                        "200 result=53 endpos=5760")),
    ("200 result=-1 endpos=0", Reply(200, -1, None, {"endpos": "0"}, "200 result=-1 endpos=0")),
    ("200 result=-2", Reply(200, -2, None, {}, "200 result=-2")),
    ("510 Invalid or unknown command", Reply(510, text="510 Invalid or unknown command")),
    (DEAD.strip(), Reply(511, text=DEAD.strip())),
    ("520 End of proper usage.", Reply(520, text="520 End of proper usage.")),
])
def test_parse_reply(line: str, expected: Reply) -> None:
    assert parse_reply(line) == expected


@pytest.mark.parametrize("line", [
    "", "HTTP/1.1 200 OK", "200", "200 result=", "200 result=x", "200 ok", "20 result=0",
    "agi_channel: x", "\x00\x01\x02",
])
def test_parse_reply_rejects_garbage(line: str) -> None:
    with pytest.raises(AgiError):
        parse_reply(line)


def test_parse_environment_reads_a_real_one() -> None:
    lines = env_bytes().decode().splitlines()[:-1]
    env = parse_environment(lines)
    assert env["agi_uniqueid"] == "1700000000.1"
    assert env["agi_accountcode"] == ""
    assert env["agi_channel"] == "PJSIP/alice-00000001"


@pytest.mark.parametrize(("lines", "problem"), [
    (["GET / HTTP/1.1", "Host: x"], "not an AGI environment line"),
    (["agi_channel: PJSIP/a"], "without agi_uniqueid"),
    (["agi_uniqueid: 1.1"], "without agi_channel"),
    (["agi_channel: PJSIP/a", "agi_uniqueid:"], "without agi_uniqueid"),
    (["agi_channel PJSIP/a", "agi_uniqueid: 1.1"], "not an AGI environment line"),
    ([], "without agi_channel"),
    (["agi_channel: PJSIP/a\0b", "agi_uniqueid: 1.1"], "not an AGI environment line"),
    (["agi_channel: PJSIP/a", "agi_uniqueid: " + "9" * 151], "impossible agi_uniqueid"),
    (["agi_channel: PJSIP/a", "agi_uniqueid: 1.1\x1b[2J"], "impossible agi_uniqueid"),
])
def test_parse_environment_rejects(lines: list[str], problem: str) -> None:
    with pytest.raises(AgiError, match=problem):
        parse_environment(lines)


@pytest.mark.parametrize(("script", "expected"), [
    ("main", "main"), ("/main/", "main"), ("main?lang=nl", "main"), ("", None), ("/", None),
])
def test_flow_name(script: str, expected: str | None) -> None:
    assert flow_name({"agi_network_script": script}) == expected


@pytest.mark.parametrize(("arg", "expected"), [
    ("beep", "beep"),
    ("0123456789*#", "0123456789*#"),
    ("/var/spool/x.wav,b", "/var/spool/x.wav,b"),
    ("bar baz", '"bar baz"'),
    ("", '""'),
    ('say "hi"', '"say \\"hi\\""'),
    ("a\\b", '"a\\\\b"'),
])
def test_quote(arg: str, expected: str) -> None:
    assert quote(arg) == expected


@pytest.mark.parametrize("arg", ["a\nHANGUP", "a\rb", "a\0b"])
def test_quote_refuses_line_breaks(arg: str) -> None:
    with pytest.raises(AgiError):
        quote(arg)


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:4573", ("127.0.0.1", 4573)),
    ("0.0.0.0:1", ("0.0.0.0", 1)),
    ("[::1]:4573", ("::1", 4573)),
    (":4573", ("127.0.0.1", 4573)),
])
def test_parse_listen(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["127.0.0.1", "127.0.0.1:", "host:0", "host:65536", "h:x"])
def test_parse_listen_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="host:port"):
        parse_listen(text)


# --- a scripted fake Asterisk ---------------------------------------------------------


@dataclass
class FakeAsterisk:
    """Asterisk's side of one FastAGI call: replies by command, from a script.

    ``streams`` and ``waits`` are the replies to successive ``STREAM FILE`` and
    ``WAIT FOR DIGIT`` commands (then: played to the end / timed out).
    ``replies`` maps a command prefix to a fixed reply; a reply of None drops the
    connection there (mid-command), and "" never answers (the server must hang up).
    ``delay`` makes STREAM FILE take that long.
    """

    streams: list[str] = field(default_factory=list)
    waits: list[str] = field(default_factory=list)
    replies: dict[str, str | None] = field(default_factory=dict)  # "": never answer
    delay: float = 0.0
    uniqueid: str = ENV["agi_uniqueid"]
    commands: list[str] = field(default_factory=list)

    def reply(self, command: str) -> str | None:
        for prefix, reply in self.replies.items():
            if command.startswith(prefix):
                return reply
        if command.startswith("STREAM FILE"):
            return self.streams.pop(0) if self.streams else "200 result=0 endpos=800\n"
        if command.startswith("WAIT FOR DIGIT"):
            return self.waits.pop(0) if self.waits else "200 result=0\n"
        if command.startswith("GET VARIABLE CHANNEL(linkedid)"):
            return "200 result=1 (1700000000.0)\n"
        if command.startswith("CHANNEL STATUS"):
            return "200 result=6\n"
        if command.startswith(("SET VARIABLE", "HANGUP")):
            return "200 result=1\n"
        return "200 result=0\n"  # ANSWER, EXEC, SET CONTEXT/EXTENSION/PRIORITY

    async def call(self, port: int, env: bytes | None = None) -> list[str]:
        """Place the call; return the commands the server sent, until it hung up on us."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(env_bytes(agi_uniqueid=self.uniqueid) if env is None else env)
        await writer.drain()
        try:
            while line := await asyncio.wait_for(reader.readline(), 10):
                command = line.decode().rstrip("\n")
                self.commands.append(command)
                reply = self.reply(command)
                if reply is None:
                    break
                if command.startswith("STREAM FILE") and self.delay:
                    await asyncio.sleep(self.delay)
                writer.write(reply.encode())
                await writer.drain()
        finally:
            writer.close()
        return self.commands


@dataclass
class Bench:
    settings: Settings
    server: AgiServer
    port: int

    def rows(self) -> list[dict[str, Any]]:
        if not self.settings.database.exists():
            return []
        conn = sqlite3.connect(self.settings.database)
        conn.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in conn.execute("SELECT * FROM calls ORDER BY seq")]
        finally:
            conn.close()


def make_settings(tmp_path: Path, flows: str | None = None) -> Settings:
    endpoints = PbxEndpoints(
        ari_url="http://127.0.0.1:9", ari_user="u", ari_password="p", ami_host="127.0.0.1",
        ami_port=9, ami_user="u", ami_password="p", sip_host="127.0.0.1", sip_port=None,
        shared_dir=None,
    )
    (tmp_path / "recordings").mkdir(exist_ok=True)
    path = write_config(tmp_path / "config.yaml", endpoints, tmp_path,
                        flows or flow_yaml(timeout=0.2, retries=1))
    return load_settings(path)


Scenario = Callable[[Bench], Awaitable[Any]]


def run_bench(tmp_path: Path, scenario: Scenario, flows: str | None = None,
              env_timeout: float = 5.0) -> tuple[Bench, Any]:
    settings = make_settings(tmp_path, flows)

    async def main() -> tuple[Bench, Any]:
        key = load_or_create_key(settings.database, None)
        committer = GroupCommitter(lambda: ConsentLog(settings.database, key))
        server = AgiServer(settings, ConsentWriter(committer), env_timeout=env_timeout)
        try:
            _host, port = await server.start("127.0.0.1", 0)
            bench = Bench(settings, server, port)
            result = await asyncio.wait_for(scenario(bench), 30)
            await server.stop(drain=5)
            assert not server.sessions
            return bench, result
        finally:
            committer.close()

    return asyncio.run(main())


def decisions(row: Mapping[str, Any]) -> dict[str, str]:
    return dict(json.loads(row["decisions"]))


def variables(commands: list[str]) -> dict[str, str]:
    """What SET VARIABLE set, one name at a time or several with ARRAY(A,B)."""
    out = {}
    for command in commands:
        if command.startswith("SET VARIABLE ARRAY("):
            _, _, names, values = command.split(" ", 3)
            out.update(zip(names[6:-1].split(","), values.split(","), strict=True))
        elif command.startswith("SET VARIABLE CONSENTIVR_"):
            _, _, name, value = command.split(" ", 3)
            out[name] = value
    return {k: v for k, v in out.items() if k.startswith("CONSENTIVR_")}


def digit(d: str, playing: bool = True) -> str:
    return f"200 result={ord(d)} endpos=400\n" if playing else f"200 result={ord(d)}\n"


PLAYED = "200 result=0 endpos=800\n"
CONTINUE = ["SET CONTEXT consentivr-dest", "SET EXTENSION s", "SET PRIORITY 1"]


# --- whole calls ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "fake", "expected", "recording", "variables_seen"),
    [
        ("yes/yes while the questions play",
         FakeAsterisk(streams=[PLAYED, digit("1"), digit("1")]),
         {"recording": "yes", "callback": "yes"}, True,
         {"CONSENTIVR_LOGGED": "yes", "CONSENTIVR_RECORDING": "yes",
          "CONSENTIVR_DECISION_RECORDING": "yes", "CONSENTIVR_DECISION_CALLBACK": "yes"}),
        ("no/no in the wait after the questions",
         FakeAsterisk(waits=[digit("2", False), digit("2", False)]),
         {"recording": "no", "callback": "no"}, False,
         {"CONSENTIVR_LOGGED": "yes", "CONSENTIVR_RECORDING": "no",
          "CONSENTIVR_DECISION_RECORDING": "no"}),
        ("barge-in on the notice does not answer the first question",
         FakeAsterisk(streams=[digit("1"), PLAYED, digit("2"), digit("1")]),
         {"recording": "no", "callback": "yes"}, False, {"CONSENTIVR_RECORDING": "no"}),
        ("silence", FakeAsterisk(), {"recording": "no_answer", "callback": "no_answer"}, False,
         {"CONSENTIVR_LOGGED": "yes", "CONSENTIVR_DECISION_CALLBACK": "no_answer"}),
        ("an invalid key, then yes",
         FakeAsterisk(streams=[PLAYED, digit("7"), PLAYED, digit("1"), digit("2")]),
         {"recording": "yes", "callback": "no"}, True, {"CONSENTIVR_RECORDING": "yes"}),
        ("MixMonitor missing: yes is logged, recording is not",
         FakeAsterisk(streams=[PLAYED, digit("1"), digit("1")],
                      replies={"EXEC MixMonitor": "200 result=-2\n"}),
         {"recording": "yes", "callback": "yes"}, False,
         {"CONSENTIVR_LOGGED": "yes", "CONSENTIVR_RECORDING": "no"}),
        ("a sound that cannot be played is an error, not a question skipped",
         FakeAsterisk(streams=["200 result=-1 endpos=0\n"]),
         {"recording": "error", "callback": "error"}, False,
         {"CONSENTIVR_LOGGED": "yes", "CONSENTIVR_DECISION_RECORDING": "error"}),
        ("Asterisk rejects a command (510): an error of ours",
         FakeAsterisk(replies={"ANSWER": "510 Invalid or unknown command\n"}),
         {"recording": "error", "callback": "error"}, False,
         {"CONSENTIVR_DECISION_RECORDING": "error"}),
        ("a multi-line 520 is read to its end",
         FakeAsterisk(replies={"ANSWER": "520-Invalid command syntax.  Proper usage follows:\n"
                                         "Usage: ANSWER\n520 End of proper usage.\n"}),
         {"recording": "error", "callback": "error"}, False,
         {"CONSENTIVR_DECISION_CALLBACK": "error"}),
    ],
)
def test_whole_call(tmp_path: Path, name: str, fake: FakeAsterisk, expected: dict[str, str],
                    recording: bool, variables_seen: dict[str, str]) -> None:
    bench, commands = run_bench(tmp_path, lambda b: fake.call(b.port))
    [row] = bench.rows()
    assert decisions(row) == expected, name
    assert row["uniqueid"] == "1700000000.1"
    assert row["linkedid"] == "1700000000.0"
    assert row["channel"] == "PJSIP/alice-00000001"
    mixmonitor = [c for c in commands if c.startswith("EXEC MixMonitor")]
    if recording:
        path = bench.settings.recordings.dir / f"{row['call_id']}.wav"
        assert row["recording_path"] == str(path)
        assert row["recording_confirmed"] == 1
        assert mixmonitor == [f"EXEC MixMonitor {path},b"]
    else:
        assert row["recording_confirmed"] in (None, 0)
    assert variables_seen.items() <= variables(commands).items()
    # Back to the dialplan at the destination, and nothing after that.
    assert commands[-3:] == CONTINUE
    assert commands[0] == "GET VARIABLE CHANNEL(linkedid)"
    assert commands[1] == "ANSWER"


def test_streams_with_barge_in_keys_and_waits_in_milliseconds(tmp_path: Path) -> None:
    fake = FakeAsterisk(streams=[PLAYED, PLAYED, digit("2")])
    _bench, commands = run_bench(tmp_path, lambda b: fake.call(b.port))
    plays = [c for c in commands if c.startswith(("STREAM FILE", "WAIT FOR DIGIT"))]
    assert plays[:4] == [
        'STREAM FILE hello-world 0123456789*#',
        'STREAM FILE beep 0123456789*#',
        "WAIT FOR DIGIT 200",
        # the timeout counts as the first attempt: the question again, after "invalid"
        'STREAM FILE beep 0123456789*#',
    ]


def test_a_digit_skips_the_rest_of_a_prompt(tmp_path: Path) -> None:
    flows = flow_yaml(notice="sound:one, sound:two, sound:three", timeout=0.2)
    fake = FakeAsterisk(streams=[PLAYED, digit("5")])
    _bench, commands = run_bench(tmp_path, lambda b: fake.call(b.port), flows)
    plays = [c.split()[2] for c in commands if c.startswith("STREAM FILE")]
    assert plays[:3] == ["one", "two", "beep"]  # "three" skipped: the key moved on


def test_hangup_during_the_notice_is_abandoned(tmp_path: Path) -> None:
    fake = FakeAsterisk(streams=["200 result=-1 endpos=4000\nHANGUP\n"],
                        replies={"CHANNEL STATUS": DEAD})
    bench, commands = run_bench(tmp_path, lambda b: fake.call(b.port))
    [row] = bench.rows()
    assert row["outcome"] == "abandoned"
    assert decisions(row) == {"recording": "abandoned", "callback": "abandoned"}
    assert commands[-1] == "CHANNEL STATUS"  # then we let go: no commands on a dead channel


def test_hangup_noticed_between_commands(tmp_path: Path) -> None:
    # The caller hangs up just after a yes; Asterisk says HANGUP before the next reply.
    fake = FakeAsterisk(streams=[PLAYED, digit("1"), digit("1")],
                        replies={"EXEC MixMonitor": DEAD, "SET VARIABLE": "HANGUP\n" + DEAD})
    bench, commands = run_bench(tmp_path, lambda b: fake.call(b.port))
    [row] = bench.rows()
    assert decisions(row) == {"recording": "yes", "callback": "yes"}
    assert row["recording_confirmed"] == 0
    assert "SET CONTEXT consentivr-dest" not in commands
    assert sum(c.startswith("SET VARIABLE") for c in commands) == 1


@pytest.mark.parametrize(("menu_seconds", "streams", "waits_ms"), [
    # Notice and question take 0.6 s: the 5 s wait is cut to what is left of 0.8 s.
    (0.8, [], [(1, 200)]),
    # The question ends after the 0.5 s deadline: a key pressed in it is too late.
    (0.5, [PLAYED, digit("1")], []),
    (0.5, [], []),
])
def test_menu_deadline_is_wall_clock(tmp_path: Path, menu_seconds: float, streams: list[str],
                                     waits_ms: list[tuple[int, int]]) -> None:
    flows = flow_yaml(timeout=5, retries=1).replace(
        "  destination:", f"  max_menu_seconds: {menu_seconds}\n  destination:")
    fake = FakeAsterisk(streams=streams, delay=0.3)  # every prompt plays for 0.3 s
    bench, commands = run_bench(tmp_path, lambda b: fake.call(b.port), flows)
    [row] = bench.rows()
    assert decisions(row) == {"recording": "no_answer", "callback": "no_answer"}
    waits = [int(c.split()[-1]) for c in commands if c.startswith("WAIT FOR DIGIT")]
    assert len(waits) == len(waits_ms)
    assert all(low <= ms <= high for ms, (low, high) in zip(waits, waits_ms, strict=True))
    assert commands[-3:] == CONTINUE


def test_prompts_play_in_the_flow_language(tmp_path: Path) -> None:
    fake = FakeAsterisk()
    _bench, commands = run_bench(
        tmp_path, lambda b: fake.call(b.port, env_bytes(agi_language="de")))
    first_play = next(i for i, c in enumerate(commands) if c.startswith("STREAM FILE"))
    assert "SET VARIABLE CHANNEL(language) en" in commands[:first_play]
    # Never switched back: the caller's language stays for the rest of the dialplan.
    assert "SET VARIABLE CHANNEL(language) de" not in commands


def test_unknown_flow_leaves_the_fallback_to_the_dialplan(tmp_path: Path) -> None:
    fake = FakeAsterisk()
    bench, commands = run_bench(
        tmp_path, lambda b: fake.call(b.port, env_bytes(agi_network_script="nope")))
    assert commands == ["SET VARIABLE CONSENTIVR_RECORDING no"]
    assert bench.rows() == []


def test_no_flow_in_the_url_uses_the_default_flow(tmp_path: Path) -> None:
    fake = FakeAsterisk(streams=[PLAYED, digit("2"), digit("2")])
    bench, _ = run_bench(tmp_path, lambda b: fake.call(b.port, env_bytes(
        agi_network_script=None)))
    [row] = bench.rows()
    assert row["flow"] == "main"


def test_unknown_caller_is_no_number(tmp_path: Path) -> None:
    fake = FakeAsterisk(streams=[PLAYED, digit("2"), digit("1")])  # callback yes keeps it
    bench, _ = run_bench(tmp_path, lambda b: fake.call(b.port, env_bytes(
        agi_callerid="unknown")))
    [row] = bench.rows()
    assert row["caller_number"] is None


# --- malformed sessions ---------------------------------------------------------------


async def send_and_close(port: int, data: bytes, linger: float = 0.0) -> bytes:
    """Send raw bytes, optionally wait, close; return whatever the server sent back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    if linger:
        await asyncio.sleep(linger)
    writer.close()
    try:
        return await asyncio.wait_for(reader.read(), 5)
    except (ConnectionError, TimeoutError):
        return b""


async def stall(port: int, data: bytes) -> bytes:
    """Send raw bytes and keep the connection open until the server gives up on it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


GOOD_CALL_STREAMS = [PLAYED, digit("1"), digit("1")]


def good_call(uniqueid: str) -> FakeAsterisk:
    """A caller who says yes twice, on a channel of its own."""
    return FakeAsterisk(streams=list(GOOD_CALL_STREAMS), uniqueid=uniqueid)
HALF_ENV = b"agi_network: yes\nagi_network_script: main\nagi_channel: PJSIP/a-1\n"


@pytest.mark.parametrize(("name", "bad"), [
    ("empty connection", lambda port: send_and_close(port, b"")),
    ("HTTP health check", lambda port: send_and_close(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")),
    ("binary garbage, no newline", lambda port: send_and_close(port, bytes(range(256)) * 4)),
    ("half an environment, then closed", lambda port: send_and_close(port, HALF_ENV)),
    ("half a line, then closed", lambda port: send_and_close(port, b"agi_chan")),
    ("half an environment, then silence", lambda port: stall(port, HALF_ENV)),
    ("a line longer than the limit", lambda port: stall(port, b"a" * (LINE_LIMIT * 2))),
    ("an endless environment", lambda port: stall(port, b"agi_x: y\n" * 5000)),
    ("an environment without a channel", lambda port: stall(port, b"agi_uniqueid: 1.2\n\n")),
])
def test_malformed_session_ends_alone(tmp_path: Path, name: str,
                                      bad: Callable[[int], Awaitable[bytes]]) -> None:
    async def scenario(bench: Bench) -> tuple[bytes, int]:
        # The bad one and a good call at the same time, then the server still serves.
        sent, _ = await asyncio.gather(bad(bench.port), good_call("good-1").call(bench.port))
        await good_call("good-2").call(bench.port)
        return sent, bench.server.rejected

    bench, (sent, rejected) = run_bench(tmp_path, scenario, env_timeout=0.5)
    assert sent == b"", f"{name}: the server must not send commands to a malformed session"
    assert rejected == 1, name
    logged = bench.rows()
    assert len(logged) == 2, name
    assert all(decisions(r) == {"recording": "yes", "callback": "yes"} for r in logged)


@pytest.mark.parametrize(("name", "fake"), [
    ("dropped before ANSWER's reply", FakeAsterisk(replies={"ANSWER": None})),
    ("dropped while the notice plays", FakeAsterisk(replies={"STREAM FILE": None})),
    ("dropped mid-reply", FakeAsterisk(replies={"STREAM FILE": "200 res"})),
    ("dropped while waiting for a key", FakeAsterisk(replies={"WAIT FOR DIGIT": None})),
])
def test_connection_dropped_mid_command(tmp_path: Path, name: str, fake: FakeAsterisk) -> None:
    async def scenario(bench: Bench) -> None:
        if fake.replies.get("STREAM FILE") == "200 res":
            # A partial reply, then the connection goes: send it by hand.
            reader, writer = await asyncio.open_connection("127.0.0.1", bench.port)
            writer.write(env_bytes())
            while not (await reader.readline()).startswith(b"STREAM FILE"):
                writer.write(b"200 result=0\n")
            writer.write(b"200 res")
            await writer.drain()
            writer.close()
        else:
            await fake.call(bench.port)
        await good_call("good-1").call(bench.port)

    bench, _ = run_bench(tmp_path, scenario)
    dropped, good = bench.rows()
    assert dropped["outcome"] == "abandoned", name
    assert dropped["recording_path"] is None
    assert set(decisions(dropped).values()) == {"abandoned"}
    assert decisions(good) == {"recording": "yes", "callback": "yes"}
    assert good["recording_confirmed"] == 1


class StuckCommitter:
    """A consent log whose disk stalls: decisions commit only when released."""

    def __init__(self, real: GroupCommitter) -> None:
        self.real = real
        self.held: list[tuple[Any, Future[None]]] = []
        self.kinds: list[str] = []

    def submit(self, kind: str, payload: Any) -> Future[None]:
        self.kinds.append(kind)
        if kind != "append":
            return self.real.submit(kind, payload)
        future: Future[None] = Future()
        self.held.append((payload, future))
        return future

    def release(self) -> None:
        for payload, future in self.held:
            self.real.submit("append", payload).result(timeout=10)
            future.set_result(None)


def test_a_stalled_consent_log_does_not_hold_the_caller(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)

    async def main() -> tuple[list[str], list[str]]:
        key = load_or_create_key(settings.database, None)
        real = GroupCommitter(lambda: ConsentLog(settings.database, key))
        stuck = StuckCommitter(real)
        server = AgiServer(settings, ConsentWriter(stuck, timeout=0.3))
        try:
            _host, port = await server.start("127.0.0.1", 0)
            fake = FakeAsterisk(streams=list(GOOD_CALL_STREAMS))
            commands = await asyncio.wait_for(fake.call(port), 10)
            await server.stop(drain=1)
            # The disk comes back: the yes row lands, and is marked "not recorded".
            stuck.release()
            for _ in range(100):
                if stuck.kinds.count("void_late_consent") == 1:
                    break
                await asyncio.sleep(0.02)
            return commands, stuck.kinds
        finally:
            real.close()

    commands, kinds = asyncio.run(main())
    assert not any(c.startswith("EXEC MixMonitor") for c in commands)
    assert variables(commands)["CONSENTIVR_LOGGED"] == "no"
    assert variables(commands)["CONSENTIVR_DECISION_RECORDING"] == "error"
    assert commands[-3:] == CONTINUE
    assert kinds == ["append", "void_late_consent"]
    [row] = Bench(settings, None, 0).rows()  # type: ignore[arg-type]
    assert decisions(row)["recording"] == "yes"
    assert row["recording_confirmed"] == 0
    assert row["recording_error"] == "decision committed after the call went on"
    # The dialplan heard "error": the late row allows nothing, not even a callback.
    assert row["withdrawn_by"] == "system" and row["caller_number"] is None


def test_garbled_reply_mid_call_is_an_error_of_ours(tmp_path: Path) -> None:
    fake = FakeAsterisk(replies={"WAIT FOR DIGIT": "HTTP/1.1 400 Bad Request\n"})
    bench, commands = run_bench(tmp_path, lambda b: fake.call(b.port))
    [row] = bench.rows()
    assert row["outcome"].startswith("error: not an AGI reply")
    assert row["recording_path"] is None
    # Out of step with Asterisk: nothing more is sent after the garbled reply.
    assert commands[-1].startswith("WAIT FOR DIGIT")


def test_hundred_empty_connections_then_a_call(tmp_path: Path) -> None:
    async def scenario(bench: Bench) -> int:
        for _ in range(100):
            _reader, writer = await asyncio.open_connection("127.0.0.1", bench.port)
            writer.close()
            await writer.wait_closed()
        await good_call("good-1").call(bench.port)
        for _ in range(50):
            if bench.server.rejected == 100:
                break
            await asyncio.sleep(0.02)
        return bench.server.rejected

    bench, rejected = run_bench(tmp_path, scenario)
    assert rejected == 100
    assert len(bench.rows()) == 1


def test_the_loop_stays_free_while_a_session_stalls(tmp_path: Path) -> None:
    async def scenario(bench: Bench) -> float:
        loop = asyncio.get_running_loop()
        stalled = asyncio.ensure_future(stall(bench.port, HALF_ENV))
        started = loop.time()
        await good_call("good-1").call(bench.port)
        took = loop.time() - started
        await stalled
        return took

    bench, took = run_bench(tmp_path, scenario, env_timeout=2.0)
    assert took < 1.0, f"a good call waited {took:.2f}s behind a stalled connection"
    assert len(bench.rows()) == 1


def test_second_session_for_the_same_channel_is_refused(tmp_path: Path) -> None:
    async def scenario(bench: Bench) -> list[str]:
        first = FakeAsterisk(delay=0.5)
        task = asyncio.ensure_future(first.call(bench.port))
        while not bench.server.sessions:
            await asyncio.sleep(0.01)
        second = await FakeAsterisk().call(bench.port)
        await task
        return second

    bench, second = run_bench(tmp_path, scenario)
    assert second == []
    assert len(bench.rows()) == 1


def test_stop_cuts_off_calls_after_the_drain(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)

    async def main() -> tuple[list[str], float]:
        key = load_or_create_key(settings.database, None)
        committer = GroupCommitter(lambda: ConsentLog(settings.database, key))
        server = AgiServer(settings, ConsentWriter(committer))
        _host, port = await server.start("127.0.0.1", 0)
        fake = FakeAsterisk(replies={"STREAM FILE": ""})  # the notice "plays" forever
        call = asyncio.ensure_future(fake.call(port))
        while not server.sessions:
            await asyncio.sleep(0.01)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await server.stop(drain=0.2)
        took = loop.time() - started
        try:
            return await asyncio.wait_for(call, 5), took
        finally:
            committer.close()

    commands, took = asyncio.run(main())
    assert took < 3
    assert commands[-1].startswith("STREAM FILE")


def test_listening_twice_on_one_port_is_a_clear_error(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)

    async def main() -> None:
        committer: Any = object()
        first = AgiServer(settings, ConsentWriter(committer))
        _host, port = await first.start("127.0.0.1", 0)
        try:
            with pytest.raises(AgiError, match=f"cannot listen on 127.0.0.1:{port}"):
                await AgiServer(settings, ConsentWriter(committer)).start("127.0.0.1", port)
        finally:
            await first.stop(drain=0)

    asyncio.run(main())


def test_connection_reports_hangup_lines(tmp_path: Path) -> None:
    async def main() -> tuple[Reply, bool]:
        async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readline()
            writer.write(b"HANGUP\n200 result=1\n")
            await writer.drain()

        server = await asyncio.start_server(peer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        conn = AgiConnection(reader, writer)
        reply = await conn.command("SET VARIABLE", "X", "y")
        await conn.close()
        server.close()
        return reply, conn.hung_up

    reply, hung_up = asyncio.run(main())
    assert reply.result == 1 and hung_up


# --- the command line -----------------------------------------------------------------


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from consentivr.cli.agi import agi; agi()", *args]


def test_cli_serves_until_sigterm_and_logs_each_decision(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(_cli("--config", str(settings.source), "--listen",
                                 f"127.0.0.1:{port}"), stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "FastAGI listening" in line:
                break
        for uid in ("cli-1", "cli-2"):
            fake = FakeAsterisk(streams=list(GOOD_CALL_STREAMS), uniqueid=uid)
            asyncio.run(fake.call(port))
        proc.send_signal(signal.SIGTERM)
        rest = proc.stderr.read()
        assert proc.wait(timeout=20) == 0
    finally:
        proc.kill()
    assert rest.count(" decision call=") == 2
    assert "recording=yes callback=yes outcome=completed" in rest
    assert "Traceback" not in rest


@pytest.mark.parametrize(("args", "message"), [
    (["--listen", "nonsense"], "Invalid value for '--listen'"),
    (["--config", "/nonexistent/config.yaml"], "/nonexistent/config.yaml"),
])
def test_cli_errors_are_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    settings = make_settings(tmp_path)
    full = ["--config", str(settings.source), *args] if "--config" not in args else args
    res = subprocess.run(_cli(*full), capture_output=True, text=True, timeout=30)
    assert res.returncode != 0
    assert message in res.stderr
    assert "Traceback" not in res.stderr


def test_cli_port_in_use_is_one_line(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        res = subprocess.run(_cli("--config", str(settings.source), "--listen",
                                  f"127.0.0.1:{port}"), capture_output=True, text=True,
                             timeout=30)
    assert res.returncode == 1
    assert f"Error: cannot listen on 127.0.0.1:{port}" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("crafted", [
    "200 result=1 (x)" + " a=)" * 2000 + " !",
    "200 result=1 (" + ") a=" * 2000 + " !",
    "200 result=1 (" + " a=b)" * 1600 + "\t!",
])
def test_a_crafted_reply_is_parsed_in_linear_time(crafted: str) -> None:
    # L2: the old backtracking regex spent about 0.2 s of event-loop time on each of
    # these 8 KiB lines; a linear parser needs well under a millisecond.
    import time

    took = []
    for _ in range(3):
        start = time.perf_counter()
        with pytest.raises(AgiError):
            parse_reply(crafted)
        took.append(time.perf_counter() - start)
    assert len(crafted) <= LINE_LIMIT
    assert sorted(took)[1] < 0.02
