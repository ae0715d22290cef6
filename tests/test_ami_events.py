"""The recording listener's AMI events skip panoramisk's parsing (perf2).

``ami.EventManager`` gets unsolicited events as plain dicts, only the ones it wants;
responses, and events that answer an action, still go through panoramisk. The proof
on a real Asterisk is in tests/test_withdrawal.py (withdrawal, hold, recording
times), with ``events_dropped == 0``: Asterisk's Filter kept out the rest.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest
from panoramisk.message import Message

from consentivr.ami import AmiProtocol, EventManager, parse_event
from consentivr.listener import EVENT_FILTER, EVENTS

HANGUP = ("Event: Hangup\r\nPrivilege: call,all\r\nChannel: Local/a@x-0001;2\r\n"
          "Uniqueid: 1750000000.12\r\nCause: 16\r\nCause-txt: Normal Clearing\r\n"
          "AppData: a: b")
USER = ("Event: UserEvent\r\nPrivilege: user,all\r\nChannel: PJSIP/a-1\r\n"
        "Uniqueid: 1.2\r\nUserEvent: ConsentivrWithdraw\r\nCallID: c1\r\nBy: caller\r\n"
        "At: 1750000000.5")
REQUEST = "Event: HangupRequest\r\nPrivilege: call,all\r\nChannel: Local/a\r\nUniqueid: 1.3"


@pytest.mark.parametrize("block", [HANGUP, USER, REQUEST,
                                   "Event: BridgeEnter\r\nBridgeUniqueid: b\r\nUniqueid: u"])
def test_parse_event_reads_what_panoramisk_reads(block: str) -> None:
    message = Message.from_line(block)
    assert parse_event(block) == {str(k): str(v) for k, v in message._store.values()
                                  if k != "content"}


@pytest.mark.parametrize(("name", "passes"), [
    ("Hangup", True), ("HangupRequest", False), ("SoftHangupRequest", False),
    ("UserEvent", True), ("MixMonitorStart", True), ("MixMonitorStop", True),
    ("Hold", True), ("Unhold", True), ("Newchannel", False), ("VarSet", False),
    ("BridgeEnter", True), ("BridgeLeaveX", False),
])
def test_the_filter_matches_whole_event_names(name: str, passes: bool) -> None:
    # Asterisk runs it as a POSIX extended regex over the whole event text, where "."
    # also matches a line break; no bracket class (slow in glibc under UTF-8).
    assert "[" not in EVENT_FILTER
    python = re.compile(EVENT_FILTER, re.DOTALL)
    assert bool(python.search(f"Event: {name}\r\nPrivilege: call,all\r\n")) is passes
    assert (name in EVENTS) is passes


class Transport:
    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


def _stream(*blocks: str) -> bytes:
    return "".join(b + "\r\n\r\n" for b in blocks).encode()


@pytest.mark.parametrize("chunk", [1, 7, 64, 100_000])
def test_events_reach_the_sink_as_dicts_and_actions_still_work(chunk: int) -> None:
    async def main() -> tuple[list[dict[str, str]], Any, int]:
        got: list[dict[str, str]] = []
        manager = EventManager(got.append, ["Hangup", "UserEvent"],
                               loop=asyncio.get_running_loop(), host="127.0.0.1", port=1,
                               username="u", secret="s", encoding="utf8")
        proto = AmiProtocol()
        proto.connection_made(Transport())  # type: ignore[arg-type]
        proto.encoding = "utf8"
        proto.factory = manager
        pong = proto.send({"Action": "Ping"})
        probe = proto.send({"Action": "UserEvent", "UserEvent": "probe"})
        sent = b"".join(proto.transport.written).decode()
        ping_id, probe_id = re.findall(r"ActionID: (\S+)", sent)
        data = b"Asterisk Call Manager/9.0.0\r\n" + _stream(
            f"Response: Success\r\nActionID: {ping_id}\r\nPing: Pong",
            HANGUP, REQUEST,
            f"Response: Success\r\nActionID: {probe_id}",
            # The UserEvent action's own event carries its ActionID: panoramisk's path.
            f"Event: UserEvent\r\nPrivilege: user,all\r\nUserEvent: probe\r\n"
            f"ActionID: {probe_id}",
            USER)
        for i in range(0, len(data), chunk):
            proto.data_received(data[i:i + chunk])
        response = await asyncio.wait_for(pong, 1)
        await asyncio.wait_for(probe, 1)
        return got, response, manager.events_dropped

    got, response, dropped = asyncio.run(main())
    assert response.ping == "Pong"
    assert [e["Event"] for e in got] == ["Hangup", "UserEvent", "UserEvent"]
    assert got[0]["Cause-txt"] == "Normal Clearing" and got[0]["AppData"] == "a: b"
    assert got[1]["UserEvent"] == "probe" and got[2]["CallID"] == "c1"
    assert dropped == 1  # HangupRequest: read up to its name, never parsed
