"""The per-call savings of issue 8 keep their meaning: batched variables, the AGI
watchdog, the linkedid argument, and the tracker's shortcut."""

from __future__ import annotations

import asyncio
import time

import pytest

from consentivr.agi import AgiConnection, AgiError
from consentivr.agi.server import _linkedid_arg
from consentivr.ari import ARRAY_MAX, assignments
from consentivr.tracker import Mute, RecordingTracker


@pytest.mark.parametrize(("pairs", "expected"), [
    ([], []),
    ([("A", "1")], [("A", "1")]),
    ([("A", "1"), ("B", "yes")], [("ARRAY(A,B)", "1,yes")]),
    # A function, a comma, a quote, an empty value: one request each, after the ARRAY.
    ([("A", "1"), ("CHANNEL(language)", "en"), ("B", "x,y"), ("C", 'a"b'), ("D", ""),
      ("E", "2")],
     [("ARRAY(A,E)", "1,2"), ("CHANNEL(language)", "en"), ("B", "x,y"), ("C", 'a"b'),
      ("D", "")]),
    ([("CONSENTIVR_CALL_ID", "0123abcd"), ("DYNAMIC_FEATURES", "consentivr_withdraw")],
     [("ARRAY(CONSENTIVR_CALL_ID,DYNAMIC_FEATURES)", "0123abcd,consentivr_withdraw")]),
])
def test_assignments_batch_what_array_can_carry(
        pairs: list[tuple[str, str]], expected: list[tuple[str, str]]) -> None:
    assert assignments(pairs) == expected


def test_assignments_split_long_lists() -> None:
    pairs = [(f"V{i}", str(i)) for i in range(ARRAY_MAX + 1)]
    out = assignments(pairs)
    assert len(out) == 2 and out[1] == (f"V{ARRAY_MAX}", str(ARRAY_MAX))
    names = out[0][0].removeprefix("ARRAY(").removesuffix(")").split(",")
    assert list(zip(names, out[0][1].split(","), strict=True)) == pairs[:ARRAY_MAX]


@pytest.mark.parametrize(("env", "expected"), [
    ({"agi_arg_1": "1700000000.0"}, "1700000000.0"),
    ({"agi_arg_1": ""}, None),
    ({}, None),
    ({"agi_arg_1": "bad\x01id"}, None),
    ({"agi_arg_1": ".."}, None),
])
def test_linkedid_comes_from_the_first_agi_argument(env: dict[str, str],
                                                    expected: str | None) -> None:
    assert _linkedid_arg(env) == expected


def test_agi_command_times_out_and_later_replies_still_work() -> None:
    async def main() -> tuple[str, float, str]:
        async def peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            while line := await reader.readline():
                if line.startswith(b"SILENT"):
                    continue  # never answers
                writer.write(b"200 result=1\n")
                await writer.drain()

        server = await asyncio.start_server(peer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        conn = AgiConnection(reader, writer)
        # A long blocking command first, then short ones: the watchdog must re-arm
        # for the earlier deadline.
        ok = await conn.command("STREAM FILE", "x", timeout=60)
        for _ in range(3):
            await conn.command("SET VARIABLE", "X", "y", timeout=0.3)
        started = time.monotonic()
        with pytest.raises(AgiError, match=r"no reply within 0\.2s") as info:
            await conn.command("SILENT", timeout=0.2)
        took = time.monotonic() - started
        await conn.close()
        server.close()
        return str(ok.result), took, str(info.value)

    result, took, message = asyncio.run(main())
    assert result == "1"
    assert 0.15 < took < 1.5, took
    assert "SILENT" in message


def test_tracker_without_hold_mutes_nothing_and_still_mutes_on_hold() -> None:
    t = RecordingTracker()
    t.handle({"Event": "MixMonitorStart", "Uniqueid": "1", "Channel": "PJSIP/a-1"}, 1.0)
    assert t.handle({"Event": "BridgeEnter", "Uniqueid": "1", "BridgeUniqueid": "b"}, 2.0)
    assert t.handle({"Event": "BridgeEnter", "Uniqueid": "2", "Channel": "PJSIP/b-2",
                     "BridgeUniqueid": "b"}, 3.0) == []
    [mute] = t.handle({"Event": "Hold", "Uniqueid": "2"}, 4.0)
    assert isinstance(mute, Mute) and mute.muted and mute.channel == "PJSIP/a-1"
    [unmute] = t.handle({"Event": "Unhold", "Uniqueid": "2"}, 6.0)
    assert isinstance(unmute, Mute) and not unmute.muted and unmute.seconds == 2.0
    assert t.handle({"Event": "Unhold", "Uniqueid": "2"}, 7.0) == []
