"""End-to-end: caller help on the real Asterisk 22 (issue 18), in both modes.

Hear it again (the repeat key), more information, and a language from the caller's
country, with the same flow in ARI mode (``Stasis()``) and FastAGI mode (``AGI()``).
Most calls are Local channels with real DTMF frames (the caller presses a key at a
known point of the flow); the German caller also comes in over SIP from ``sipp``,
so the +49 number travels the way a trunk would send it.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from consentivr.flow import Phase
from consentivr_testbed.sipcaller import place_call_async
from consentivr_testbed.testbed import LocalCall, Testbed, dialplan_for_tests, help_flow_yaml

pytestmark = pytest.mark.asterisk

GERMAN = "+4930123456"
# A long notice (5.5 s), so a key surely lands while it plays; a short "more information".
FLOWS = help_flow_yaml(notice="sound:demo-thanks", notice_de="sound:hello-world",
                       more_info="sound:vm-goodbye", timeout=4.0)
# SIP callers (sipp) dial 101 for the help flow.
SIP_EXTEN = "101"


@pytest.fixture(params=["ari", "agi"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def bed(pbx: Any, tmp_path_factory: pytest.TempPathFactory, mode: str) -> Testbed:
    plan = dialplan_for_tests(agent_sound="vm-goodbye").replace(
        "exten => 100,1,Goto(flow-main,1)",
        f"exten => 100,1,Goto(flow-main,1)\nexten => {SIP_EXTEN},1,Goto(flow-help,1)")
    pbx.set_dialplan(plan)
    work = Path(tmp_path_factory.mktemp("e2e-caller", numbered=True))
    return Testbed(pbx, work, FLOWS, mode=mode)


def run(bed: Testbed, scenario: Callable[[Testbed], Any], timeout: float = 90) -> Any:
    async def main() -> Any:
        await bed.start()
        try:
            return await asyncio.wait_for(scenario(bed), timeout)
        finally:
            await bed.stop()

    return asyncio.run(main())


def the_row(bed: Testbed) -> dict[str, Any]:
    conn = sqlite3.connect(bed.settings.database)
    conn.row_factory = sqlite3.Row
    try:
        [row] = [dict(r) for r in conn.execute("SELECT * FROM calls ORDER BY seq")]
    finally:
        conn.close()
    row["decisions"] = json.loads(row["decisions"])
    row["steps"] = [k["step"] for k in json.loads(row["keys"] or "[]")]
    return row


async def logged(bed: Testbed, call: LocalCall, step: str, timeout: float = 15) -> None:
    """Wait until the flow has logged a key with ``step`` (it acted on the key)."""
    async def seen() -> None:
        while True:
            s = bed.session(call)
            if s is not None and any(k.step == step for k in s.machine.keys):
                return
            await asyncio.sleep(0.02)

    await asyncio.wait_for(seen(), timeout)


async def asked(bed: Testbed, call: LocalCall, index: int, timeout: float = 20) -> None:
    """Wait until question ``index`` is being asked (playing, or waiting for the key)."""
    async def reached() -> None:
        while True:
            s = bed.session(call)
            if s is not None and s.machine.phase in (Phase.QUESTION_PROMPT,
                                                     Phase.QUESTION_WAIT) \
                    and s.machine._p.purpose_index == index:
                return
            await asyncio.sleep(0.02)

    await asyncio.wait_for(reached(), timeout)


async def ended(bed: Testbed, call: LocalCall) -> str | None:
    await bed.wait_left_app(call, timeout=30)
    await bed.channel_gone(call.stasis_id, timeout=60)
    return None


def test_repeat_during_the_notice_then_yes(bed: Testbed) -> None:
    async def scenario(bed: Testbed) -> tuple[str, float]:
        call = await bed.call(flow="help")
        await bed.wait_phase(call, Phase.NOTICE)
        call_id = bed.session(call).info.call_id
        await asyncio.sleep(0.5)
        await bed.press(call, "0")
        await logged(bed, call, "repeat:notice")
        loop = asyncio.get_running_loop()
        again = loop.time()
        assert bed.session(call).machine.phase is Phase.NOTICE
        await asked(bed, call, 0)
        replayed = loop.time() - again  # the notice played again, in full
        await bed.press(call, "1")
        await asked(bed, call, 1)
        await bed.press(call, "1")
        seen = await bed.reached_destination(call_id)
        await ended(bed, call)
        return str(seen), replayed

    seen, replayed = run(bed, scenario)
    assert replayed > 4.0, f"the notice was not played again in full ({replayed:.1f}s)"
    row = the_row(bed)
    assert row["decisions"] == {"recording": "yes", "callback": "yes"}
    assert row["steps"] == ["repeat:notice", "recording", "callback"]
    assert row["recording_confirmed"] == 1
    assert seen == "yes/yes/yes/yes/en"


def test_repeat_during_the_second_question(bed: Testbed) -> None:
    async def scenario(bed: Testbed) -> None:
        call = await bed.call(flow="help")
        await asked(bed, call, 0)
        await bed.press(call, "1")
        await asked(bed, call, 1)
        await bed.press(call, "0")
        await logged(bed, call, "repeat:callback")
        # The notice again, then the second question (not the first) again.
        await bed.wait_phase(call, Phase.NOTICE)
        await asked(bed, call, 1)
        await bed.press(call, "2")
        await ended(bed, call)

    run(bed, scenario)
    row = the_row(bed)
    assert row["decisions"] == {"recording": "yes", "callback": "no"}
    assert row["steps"] == ["recording", "repeat:callback", "callback"]
    assert row["outcome"] == "completed"


def test_more_information_then_answer(bed: Testbed) -> None:
    async def scenario(bed: Testbed) -> None:
        call = await bed.call(flow="help")
        await bed.wait_phase(call, Phase.NOTICE)
        await asyncio.sleep(0.5)
        await bed.press(call, "8")
        await logged(bed, call, "more_info:notice")
        await asked(bed, call, 0)  # after "more information" played to its end
        await bed.press(call, "2")
        await asked(bed, call, 1)
        await bed.press(call, "1")
        await ended(bed, call)

    run(bed, scenario)
    row = the_row(bed)
    assert row["decisions"] == {"recording": "no", "callback": "yes"}
    assert row["steps"] == ["more_info:notice", "recording", "callback"]
    assert row["outcome"] == "completed"  # the prompt played: no failure on the way
    flow = bed.settings.flows["help"]
    assert row["notice_version"] == flow.notice_version("en")


def test_a_german_caller_number_gets_the_german_notice(bed: Testbed) -> None:
    async def scenario(bed: Testbed) -> str:
        call = await bed.call(flow="help", caller_number=GERMAN)
        await bed.wait_phase(call, Phase.NOTICE)
        call_id = bed.session(call).info.call_id
        assert bed.session(call).machine.language == "de"
        await asked(bed, call, 0)
        await bed.press(call, "1")
        await asked(bed, call, 1)
        await bed.press(call, "2")
        seen = await bed.reached_destination(call_id)
        await ended(bed, call)
        return str(seen)

    seen = run(bed, scenario)
    row = the_row(bed)
    flow = bed.settings.flows["help"]
    assert row["language"] == "de"
    assert row["notice_version"] == flow.notice_version("de") != flow.notice_version("en")
    assert row["decisions"] == {"recording": "yes", "callback": "no"}
    assert seen.endswith("/de")  # the dialplan goes on in German (CONSENTIVR_LANGUAGE)


def test_a_german_sip_caller_gets_the_german_notice(bed: Testbed) -> None:
    """Over SIP from sipp: hello-world (1.4 s) is the German notice, a beep each question;
    the keys fall in the waits after them."""
    script: list[tuple[str, Any]] = [("pause", 3.0), ("dtmf", "1"), ("pause", 1.5),
                                     ("dtmf", "1"), ("audio", 3.0), ("hangup", 0)]

    async def scenario(bed: Testbed) -> Any:
        return await place_call_async(bed.endpoints, SIP_EXTEN, script, caller_id=GERMAN,
                                      timeout=40, work_dir=bed.workdir)

    result = run(bed, scenario)
    assert result.ok, result.describe()
    row = the_row(bed)
    assert row["language"] == "de"
    assert row["decisions"] == {"recording": "yes", "callback": "yes"}
    # The callback yes keeps the number as the PBX got it from the SIP caller.
    assert row["caller_number"] == GERMAN
