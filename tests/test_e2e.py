"""End-to-end: the consent flow on the real Asterisk 22 (issue 2, a-h), in both modes.

Every case runs twice: ARI mode (``Stasis()``) and FastAGI mode (``AGI()``), the same
flow driving both (issue 6). Calls are Local channels placed through Asterisk;
digits are real DTMF frames sent on the caller's half. The app runs in-process
against the test PBX.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import wave
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from consentivr.flow import DAY, Phase
from consentivr.store import parse_iso
from consentivr_testbed.testbed import LocalCall, Testbed, dialplan_for_tests, flow_yaml

pytestmark = pytest.mark.asterisk


@pytest.fixture(params=["ari", "agi"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def bed_factory(
    pbx: Any, tmp_path_factory: pytest.TempPathFactory, mode: str
) -> Callable[..., Testbed]:
    pbx.set_dialplan(dialplan_for_tests(agent_sound="demo-thanks") + DEST_PRIORITY_2)
    shared: Path = pbx.shared_dir

    def make(flows: str | None = None) -> Testbed:
        work = Path(
            tmp_path_factory.mktemp("e2e", numbered=True) if shared is None
            else _mkdtemp(shared)
        )
        return Testbed(pbx, work, flows or flow_yaml(), mode=mode)

    return make


# A destination entered at priority 2: P1 stays empty unless priority 1 ran too.
DEST_PRIORITY_2 = """
[consentivr-dest-p2]
exten => s,1,Set(P1=ran)
 same => n,Set(GLOBAL(CVR_${CONSENTIVR_CALL_ID})=p1:${P1}/p2)
 same => n,Hangup()
"""


def _mkdtemp(base: Path) -> Path:
    import tempfile

    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="e2e-", dir=base))


def run(bed: Testbed, scenario: Callable[[Testbed], Awaitable[Any]], timeout: float = 90) -> Any:
    async def main() -> Any:
        await bed.start()
        try:
            return await asyncio.wait_for(scenario(bed), timeout)
        finally:
            await bed.stop()

    return asyncio.run(main())


def rows(bed: Testbed) -> list[dict[str, Any]]:
    conn = sqlite3.connect(bed.settings.database)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM calls ORDER BY seq")]
    finally:
        conn.close()


def decisions(row: dict[str, Any]) -> dict[str, str]:
    import json

    return json.loads(row["decisions"])


def audio_seconds_and_rms(path: Path) -> tuple[float, float]:
    with wave.open(str(path)) as w:
        frames = w.readframes(w.getnframes())
        rate, width = w.getframerate(), w.getsampwidth()
    samples = memoryview(frames).cast("h") if width == 2 else memoryview(b"")
    n = len(samples)
    rms = (sum(s * s for s in samples) / n) ** 0.5 if n else 0.0
    return n / rate if rate else 0.0, rms


async def answer(bed: Testbed, call: LocalCall, keys: list[str | None]) -> str:
    """Answer each question with a key, or stay silent (None). Returns our call id."""
    await bed.wait_phase(call, Phase.NOTICE)
    session = bed.session(call)
    call_id = session.info.call_id
    for index, key in enumerate(keys):
        if key is None:
            continue
        await bed.wait_phase(call, Phase.QUESTION_PROMPT, index)
        await bed.press(call, key)
    await bed.wait_left_app(call, timeout=30)
    return call_id


async def finished(bed: Testbed, call: LocalCall) -> None:
    """Wait for the whole call (the agent talks a few seconds) to end."""
    await bed.channel_gone(call.stasis_id, timeout=60)


def test_a_yes_yes_records_audio_and_logs_yes(bed_factory: Callable[..., Testbed]) -> None:
    bed = bed_factory()

    async def scenario(bed: Testbed) -> str:
        call = await bed.call()
        call_id = await answer(bed, call, ["1", "1"])
        await finished(bed, call)
        return call_id

    call_id = run(bed, scenario)
    [row] = rows(bed)
    assert row["call_id"] == call_id
    assert decisions(row) == {"recording": "yes", "callback": "yes"}
    assert row["recording_confirmed"] == 1
    path = Path(row["recording_path"])
    assert path == bed.recordings_dir / f"{call_id}.wav"
    seconds, rms = audio_seconds_and_rms(path)
    assert seconds > 2.0, "the recording should hold the conversation with the agent"
    assert rms > 100, "the recording should hold audio, not silence"
    decided = parse_iso(row["decided_at"])
    assert abs(parse_iso(row["recording_until"]) - (decided + 90 * DAY)) < 1e-3
    import json

    until = {k: parse_iso(v) for k, v in json.loads(row["retention_until"]).items()}
    assert abs(until["callback"] - (decided + 30 * DAY)) < 1e-3
    # The callback yes keeps the number; recording-only rows would not.
    assert row["caller_number"] == "+31201234567"


def test_b_no_no_makes_no_file(bed_factory: Callable[..., Testbed]) -> None:
    bed = bed_factory()

    async def scenario(bed: Testbed) -> None:
        call = await bed.call()
        await answer(bed, call, ["2", "2"])
        await finished(bed, call)

    run(bed, scenario)
    [row] = rows(bed)
    assert decisions(row) == {"recording": "no", "callback": "no"}
    assert row["recording_path"] is None and row["caller_number"] is None
    assert list(bed.recordings_dir.iterdir()) == []


def test_c_silence_is_no_answer(bed_factory: Callable[..., Testbed]) -> None:
    bed = bed_factory(flow_yaml(timeout=1.0, retries=1))

    async def scenario(bed: Testbed) -> str:
        call = await bed.call()
        call_id = await answer(bed, call, [None, None])
        await finished(bed, call)
        return call_id

    call_id = run(bed, scenario)
    [row] = rows(bed)
    assert decisions(row) == {"recording": "no_answer", "callback": "no_answer"}
    assert list(bed.recordings_dir.iterdir()) == []
    assert row["call_id"] == call_id


def test_d_hangup_during_notice_is_abandoned(bed_factory: Callable[..., Testbed]) -> None:
    bed = bed_factory(flow_yaml(notice="sound:demo-thanks"))

    async def scenario(bed: Testbed) -> None:
        call = await bed.call()
        await bed.wait_phase(call, Phase.NOTICE)
        await bed.hangup(call)
        await bed.wait_left_app(call)
        await asyncio.sleep(0.5)  # let the log write land

    run(bed, scenario)
    [row] = rows(bed)
    assert decisions(row) == {"recording": "abandoned", "callback": "abandoned"}
    assert row["outcome"] == "abandoned"
    assert list(bed.recordings_dir.iterdir()) == []


def test_e_invalid_digit_then_valid(bed_factory: Callable[..., Testbed]) -> None:
    bed = bed_factory()

    async def scenario(bed: Testbed) -> None:
        call = await bed.call()
        await bed.wait_phase(call, Phase.QUESTION_PROMPT, 0)
        await bed.press(call, "7")  # not a choice: the question is asked again
        await asyncio.sleep(0.4)
        await bed.wait_phase(call, Phase.QUESTION_PROMPT, 0)
        await bed.press(call, "1")
        await bed.wait_phase(call, Phase.QUESTION_PROMPT, 1)
        await bed.press(call, "2")
        await bed.wait_left_app(call)
        await finished(bed, call)

    run(bed, scenario)
    [row] = rows(bed)
    import json

    assert decisions(row) == {"recording": "yes", "callback": "no"}
    keys = [(k["digit"], k["step"]) for k in json.loads(row["keys"])]
    assert keys == [("7", "recording"), ("1", "recording"), ("2", "callback")]
    assert Path(row["recording_path"]).exists()


def test_f_barge_in_stops_the_notice(bed_factory: Callable[..., Testbed]) -> None:
    # demo-thanks plays 5.5 s: a key must cut it short.
    bed = bed_factory(flow_yaml(notice="sound:demo-thanks"))

    async def scenario(bed: Testbed) -> float:
        call = await bed.call()
        await bed.wait_phase(call, Phase.NOTICE)
        await asyncio.sleep(0.3)
        loop = asyncio.get_running_loop()
        pressed = loop.time()
        await bed.press(call, "5")
        await bed.wait_phase(call, Phase.QUESTION_PROMPT, 0)
        # The question prompt (a beep) ends and the app waits: the notice really stopped.
        await bed.wait_phase(call, Phase.QUESTION_WAIT, 0)
        waited = loop.time() - pressed
        await bed.press(call, "2")
        await bed.wait_phase(call, Phase.QUESTION_PROMPT, 1)
        await bed.press(call, "2")
        await bed.wait_left_app(call)
        await finished(bed, call)
        return waited

    waited = run(bed, scenario)
    assert waited < 3.0, f"the notice kept playing after the key ({waited:.1f}s)"
    [row] = rows(bed)
    import json

    assert json.loads(row["keys"])[0]["step"] == "notice"
    assert decisions(row) == {"recording": "no", "callback": "no"}


def test_g_twenty_concurrent_calls_files_match_yes_rows(
    bed_factory: Callable[..., Testbed],
) -> None:
    bed = bed_factory(flow_yaml(timeout=1.0, retries=0))
    rng = random.Random(20)
    scripts: list[list[str | None] | str] = [
        rng.choice([["1", "1"], ["1", "2"], ["2", "1"], ["2", "2"], [None, None], "hangup"])
        for _ in range(20)
    ]

    async def one(bed: Testbed, script: list[str | None] | str, delay: float) -> None:
        await asyncio.sleep(delay)
        call = await bed.call(caller_number=f"+3120{rng.randrange(10**6):06d}")
        if script == "hangup":
            await bed.wait_phase(call, Phase.NOTICE)
            await bed.hangup(call)
            await bed.wait_left_app(call)
            return
        assert isinstance(script, list)
        await answer(bed, call, script)
        await finished(bed, call)

    async def scenario(bed: Testbed) -> None:
        await asyncio.gather(*(one(bed, s, i * 0.05) for i, s in enumerate(scripts)))
        await asyncio.sleep(0.5)

    run(bed, scenario, timeout=120)
    logged = rows(bed)
    assert len(logged) == 20
    yes_files = {
        Path(r["recording_path"]).name for r in logged if decisions(r)["recording"] == "yes"
    }
    files = {p.name for p in bed.recordings_dir.iterdir()}
    assert files == yes_files
    expected_yes = sum(1 for s in scripts if isinstance(s, list) and s[0] == "1")
    assert len(yes_files) == expected_yes
    assert all(r["recording_confirmed"] == 1 for r in logged if r["recording_path"])


def test_h_destination_sees_the_decision(bed_factory: Callable[..., Testbed]) -> None:
    bed = bed_factory()

    async def scenario(bed: Testbed) -> tuple[str, str | None]:
        call = await bed.call()
        call_id = await answer(bed, call, ["1", "2"])
        seen = await bed.reached_destination(call_id)
        await finished(bed, call)
        return call_id, seen

    call_id, seen = run(bed, scenario)
    # logged / recording running / recording decision / callback decision / language
    assert seen == "yes/yes/yes/no/en"
    [row] = rows(bed)
    assert row["call_id"] == call_id


def test_i_destination_priority_is_exact(bed_factory: Callable[..., Testbed]) -> None:
    # Continue(context, exten, p) must resume at p itself, not p+1 (nor 1), in both modes.
    flows = flow_yaml(destination="consentivr-dest-p2").replace("priority: 1", "priority: 2")
    bed = bed_factory(flows)

    async def scenario(bed: Testbed) -> str | None:
        call = await bed.call()
        call_id = await answer(bed, call, ["2", "2"])
        seen = await bed.reached_destination(call_id)
        await finished(bed, call)
        return seen

    assert run(bed, scenario) == "p1:/p2"


# --- FastAGI only ---------------------------------------------------------------


async def _forget_fallback(bed: Testbed) -> None:
    """A fallback call has no call id: it reports to CVR_, which may be left over."""
    await bed.caller.request("POST", "/asterisk/variable", {"variable": "CVR_", "value": ""})


async def _knock(host: str, port: int, times: int, pause: float) -> None:
    """Open and close ``times`` TCP connections that send nothing (health checks)."""
    for _ in range(times):
        _reader, writer = await asyncio.open_connection(host, port)
        writer.close()
        await writer.wait_closed()
        await asyncio.sleep(pause)


async def _server_answers(host: str, port: int) -> str:
    """A minimal FastAGI request for an unknown flow: the server must send a command."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"agi_network: yes\nagi_network_script: no-such-flow\n"
                 b"agi_channel: Local/probe;2\nagi_uniqueid: probe-1\n\n")
    await writer.drain()
    line = await asyncio.wait_for(reader.readline(), 10)
    writer.close()
    await writer.wait_closed()
    return line.decode()


@pytest.mark.parametrize("mode", ["agi"])
def test_agi_empty_connections_do_not_disturb_calls(
    bed_factory: Callable[..., Testbed],
) -> None:
    bed = bed_factory()
    scripts: list[list[str | None]] = [["1", "1"], ["2", "2"], ["1", "2"]]

    async def one(bed: Testbed, keys: list[str | None]) -> str:
        call = await bed.call()
        call_id = await answer(bed, call, keys)
        await finished(bed, call)
        return call_id

    async def scenario(bed: Testbed) -> tuple[int, str]:
        assert bed.agi is not None
        host, port = bed.agi.address
        # 100 empty connections spread over ~3 s, while three calls go through.
        await asyncio.gather(_knock(host, port, 100, 0.03), *(one(bed, s) for s in scripts))
        rejected = bed.agi.rejected
        probe = await _server_answers(host, port)
        await one(bed, ["1", "1"])  # and a call placed afterwards completes too
        return rejected, probe

    rejected, probe = run(bed, scenario, timeout=120)
    assert rejected == 100
    assert probe.startswith("SET VARIABLE CONSENTIVR_RECORDING no")
    logged = rows(bed)
    assert [decisions(r)["recording"] for r in logged].count("yes") == 3
    assert len(logged) == 4
    files = {p.name for p in bed.recordings_dir.iterdir()}
    assert files == {Path(r["recording_path"]).name for r in logged if r["recording_path"]}
    assert len(files) == 3


class _CuttingProxy:
    """Sits between Asterisk and our AGI server; cuts both sides while Asterisk
    runs our first ``STREAM FILE``: a connection dropped mid-command."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.cut = asyncio.Event()
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, a_reader: asyncio.StreamReader,
                      a_writer: asyncio.StreamWriter) -> None:
        s_reader, s_writer = await asyncio.open_connection(*self.target)

        async def upstream() -> None:  # Asterisk -> our server
            while data := await a_reader.read(4096):
                s_writer.write(data)
                await s_writer.drain()

        async def downstream() -> None:  # our server -> Asterisk, line by line
            while line := await s_reader.readline():
                a_writer.write(line)
                await a_writer.drain()
                if line.startswith(b"STREAM FILE"):
                    await asyncio.sleep(0.5)  # Asterisk is playing now
                    self.cut.set()
                    return

        up = asyncio.ensure_future(upstream())
        try:
            await downstream()
        except ConnectionError:
            pass
        finally:
            up.cancel()
            for writer in (a_writer, s_writer):
                writer.close()


@pytest.mark.parametrize("mode", ["agi"])
def test_agi_connection_cut_mid_command_then_next_call_records(
    bed_factory: Callable[..., Testbed],
) -> None:
    bed = bed_factory(flow_yaml(notice="sound:demo-thanks"))

    async def scenario(bed: Testbed) -> str | None:
        assert bed.agi is not None
        host, port = bed.agi.address
        proxy = _CuttingProxy((host, port))
        await bed.set_agi_url(f"agi://127.0.0.1:{await proxy.start()}")
        await _forget_fallback(bed)
        try:
            call = await bed.call()
            await asyncio.wait_for(proxy.cut.wait(), 20)
            await bed.wait_left_app(call)
            # Asterisk went on with the dialplan's fallback: not logged, not recorded.
            seen = await bed.reached_destination("")
            await finished(bed, call)
        finally:
            await proxy.close()
        await bed.set_agi_url(f"agi://{host}:{port}")
        call = await bed.call()
        await answer(bed, call, ["1", "1"])
        await finished(bed, call)
        return seen

    seen = run(bed, scenario, timeout=120)
    assert seen == "/no///"
    cut, ok = rows(bed)
    assert cut["outcome"] == "abandoned" and cut["recording_path"] is None
    assert decisions(cut) == {"recording": "abandoned", "callback": "abandoned"}
    assert decisions(ok) == {"recording": "yes", "callback": "yes"}
    assert [p.name for p in bed.recordings_dir.iterdir()] == [Path(ok["recording_path"]).name]


@pytest.mark.parametrize("mode", ["agi"])
def test_agi_rendered_dialplan_server_up_and_down(
    bed_factory: Callable[..., Testbed], pbx: Any,
) -> None:
    # `dialplan render --mode agi`, loaded into the real Asterisk: with the server up the
    # call is continued at the destination; with it down the fallback runs unrecorded.
    from consentivr.dialplan import RenderOptions, render
    from consentivr_testbed.pbx import free_port

    bed = bed_factory()

    def load(url: str) -> None:
        text = render(bed.settings.flows, bed.settings.menus, RenderOptions(
            mode="agi", agi_url=url))
        pbx.set_rendered_dialplan(text)

    async def scenario(bed: Testbed) -> tuple[str | None, str | None]:
        assert bed.agi is not None
        host, port = bed.agi.address
        load(f"agi://127.0.0.1:{free_port()}")  # nobody listens there
        await _forget_fallback(bed)
        call = await bed.call(context="consentivr-flow-main", exten="s")
        down = await bed.reached_destination("")
        await finished(bed, call)
        load(f"agi://{host}:{port}")
        call = await bed.call(context="consentivr-flow-main", exten="s")
        call_id = await answer(bed, call, ["1", "2"])
        up = await bed.reached_destination(call_id)
        await finished(bed, call)
        return down, up

    try:
        down, up = run(bed, scenario, timeout=120)
    finally:
        pbx.set_rendered_dialplan("")
    assert down == "no/no/error/error/en"
    assert up == "yes/yes/yes/no/en"
    [row] = rows(bed)
    assert decisions(row) == {"recording": "yes", "callback": "no"}
