"""Operations on the real Asterisk 22, in both modes (issue 15): after real calls the
scraped counters equal what the consent log holds, the exposition passes
``promtool check metrics``, and ``/healthz`` follows an AMI drop and reconnect."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from consentivr.features import applicationmap, withdraw_dialplan
from consentivr.flow import Phase
from consentivr_testbed.pbx import free_port
from consentivr_testbed.testbed import LocalCall, Testbed, dialplan_for_tests, flow_yaml
from tests.fault_fixtures import rows, wait_for
from tests.ops_fixtures import metrics_vs_log, scrape

pytestmark = pytest.mark.asterisk


@pytest.fixture(params=["ari", "agi"])
def bed(pbx: Any, request: pytest.FixtureRequest) -> Testbed:
    pbx.set_dialplan(dialplan_for_tests(agent_sound="demo-thanks"))
    base = pbx.shared_dir
    if base is not None:
        base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ops-", dir=base))
    port = free_port()
    return Testbed(pbx, work, flow_yaml(timeout=1.0),
                   extra_config=f'metrics: {{listen: "127.0.0.1:{port}"}}\n', mode=request.param)


def _port(bed: Testbed) -> int:
    assert bed.settings.metrics is not None
    return bed.settings.metrics.port


async def _call(bed: Testbed, keys: str) -> LocalCall:
    call = await bed.call()
    # In the menu first: a session that has not started yet has not "left" either.
    await bed.wait_phase(call, Phase.NOTICE)
    for index, key in enumerate(keys):
        await bed.wait_phase(call, Phase.QUESTION_PROMPT, index)
        await bed.press(call, key)
    await bed.wait_left_app(call, timeout=30)
    return call


async def _health(port: int) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, \
            http.get(f"http://127.0.0.1:{port}/healthz") as resp:
        return resp.status, json.loads(await resp.text())


def test_counters_equal_the_log_after_real_calls(bed: Testbed) -> None:
    async def scenario() -> str:
        await bed.start()
        try:
            calls = [await _call(bed, keys) for keys in ("11", "22", "")]
            db = bed.settings.database
            # The recording mark is not waited for by the call: wait for it here.
            await wait_for(lambda: len(rows(db)) == 3 and any(
                r["recording_confirmed"] == 1 for r in rows(db)), 20, "three rows and a mark")
            for call in calls:
                await bed.hangup(call)
            text = await scrape(_port(bed))
            assert "consentivr_calls_in_menu 0.0" in text
            return text
        finally:
            await bed.stop()

    text = asyncio.run(scenario())
    assert metrics_vs_log(text, bed.settings.database, bed.settings.flows) == []
    assert 'consentivr_recordings_total{result="started"} 1.0' in text
    assert "+31201234567" not in text, "no caller data in any label"
    promtool = shutil.which("promtool")
    assert promtool, "promtool (Debian package prometheus) is needed: ./dev setup installs it"
    check = subprocess.run([promtool, "check", "metrics"], input=text, text=True,
                           capture_output=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr


def test_healthz_follows_an_ami_drop_and_reconnect(bed: Testbed) -> None:
    async def scenario() -> list[tuple[int, dict[str, Any]]]:
        await bed.start()
        try:
            port = _port(bed)
            seen = [await _health(port)]
            assert bed.service is not None and bed.service.recording_listener is not None
            manager = bed.service.recording_listener._manager
            assert manager is not None and manager.protocol is not None
            manager.protocol.transport.close()  # the AMI connection drops
            seen.append(await wait_for(_status_is(port, 503), 10, "healthz 503"))
            seen.append(await wait_for(_status_is(port, 200), 20, "healthz 200 again"))
            return seen
        finally:
            await bed.stop()

    (first, _), (down, body), (again, _) = asyncio.run(scenario())
    assert (first, down, again) == (200, 503, 200)
    assert "ami" in json.dumps(body)


def _status_is(port: int, status: int) -> Any:
    async def check() -> tuple[int, dict[str, Any]] | None:
        got = await _health(port)
        return got if got[0] == status else None

    return check


async def _reconnect_ami(bed: Testbed) -> None:
    """Drop the listener's AMI connection; it logs in again and checks the path anew."""
    assert bed.service is not None and bed.service.recording_listener is not None
    listener = bed.service.recording_listener
    listener.checked.clear()
    manager = listener._manager
    assert manager is not None and manager.protocol is not None
    manager.protocol.transport.close()
    await asyncio.wait_for(listener.checked.wait(), 20)


def test_no_recording_while_the_withdrawal_key_cannot_work(bed: Testbed) -> None:
    """Issue 19: with the withdrawal feature missing, a yes is logged but nothing is
    recorded, and /healthz says why; once it is back, recording starts again."""
    withdrawal = bed.settings.withdrawal

    async def scenario() -> tuple[str, dict[str, Any], str]:
        await bed.start()
        try:
            port = _port(bed)
            # The sysadmin forgot the features.conf include.
            await asyncio.to_thread(bed.pbx.set_withdrawal, "",
                                    withdraw_dialplan(withdrawal))
            await _reconnect_ami(bed)
            status, body = await _health(port)
            assert status == 503
            blocked = await _call(bed, "11")
            await bed.hangup(blocked)
            # Fixed: the include is back.
            await asyncio.to_thread(bed.pbx.set_withdrawal, applicationmap(withdrawal),
                                    withdraw_dialplan(withdrawal))
            await _reconnect_ami(bed)
            assert (await _health(port))[0] == 200
            recorded = await _call(bed, "11")
            db = bed.settings.database
            await wait_for(lambda: len(rows(db)) == 2 and all(
                r["recording_confirmed"] is not None for r in rows(db)), 20, "two marks")
            await bed.hangup(recorded)
            return blocked.stasis_id, body, recorded.stasis_id
        finally:
            await bed.stop()

    blocked_id, body, recorded_id = asyncio.run(scenario())
    assert "withdrawal key cannot be honoured" in json.dumps(body)
    by_channel = {r["uniqueid"]: r for r in rows(bed.settings.database)}
    blocked, recorded = by_channel[blocked_id], by_channel[recorded_id]
    # The caller's yes is logged as given; nothing was recorded, and the log says why.
    assert blocked["decisions"]["recording"] == "yes"
    assert blocked["recording_path"] is None and blocked["recording_confirmed"] == 0
    assert "withdrawal key cannot be honoured" in blocked["recording_error"]
    assert recorded["recording_confirmed"] == 1
    assert [p.name for p in bed.recordings_dir.iterdir()] == [f"{recorded['call_id']}.wav"]
