"""Real calls on the sandboxed Asterisk 22 while the shared PostgreSQL log restarts.

consentivr runs with ``database: postgresql://...`` against a throwaway cluster
(tests/pg_fixtures.py). Calls are placed in a steady stream, each answering yes or
no at random; meanwhile PostgreSQL is stopped (``pg_ctl stop -m fast``) and, some
seconds later, started again; later it is frozen (SIGSTOP of its processes: a server
that neither answers nor refuses) for 9 s. Afterwards:

1. no recording without a committed yes: every recording file belongs to a row whose
   recording decision is yes and whose recording was confirmed;
2. no lost decision: every call that reached the destination has exactly one row
   (a call that went on during the outage, told "not logged", has its row written
   late, as what was acted on: not recorded; a row that committed only after its
   call went on is voided);
3. no duplicates, and the hash chain verifies.

The counts are printed (``-s``) for the closing note.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from consentivr.audit import verify_chain
from consentivr.configfile import load_settings
from consentivr.consentlog import open_reader
from consentivr.flow import Phase
from consentivr_testbed.testbed import Testbed, dialplan_for_tests, flow_yaml
from tests.pg_fixtures import PgServer

pytestmark = [pytest.mark.asterisk, pytest.mark.postgres, pytest.mark.chaos]

PGPASS_ENV = "CONSENTIVR_TEST_PGPASS"
CALLS = 48
CONCURRENCY = 4


def _shared_log_bed(pbx: Any, work: Path, mode: str, url: str) -> Testbed:
    bed = Testbed(pbx, work, flow_yaml(callback=False, timeout=3.0), mode=mode,
                  extra_config=f"caller_key: chaos-key\nnode: node-{mode}\n")
    # Testbed writes a SQLite config: point it at the shared log instead.
    text = bed.config_path.read_text()
    text = text.replace(f"database: {work / 'consent.db'}",
                        f"database: {url}\ndatabase_password_env: {PGPASS_ENV}")
    bed.config_path.write_text(text)
    bed.settings = load_settings(bed.config_path)
    assert bed.settings.database_url == url
    return bed


@pytest.fixture(params=["ari", "agi"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_postgres_restart_during_real_calls(pbx: Any, pg_server: PgServer, mode: str,
                                            tmp_path_factory: pytest.TempPathFactory,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    if not pg_server.own:
        pytest.skip("CONSENTIVR_TEST_POSTGRES_URL: not our server to restart")
    monkeypatch.setenv(PGPASS_ENV, pg_server.password)
    pbx.set_dialplan(dialplan_for_tests(agent_sound="beep"))
    shared: Path | None = pbx.shared_dir
    if shared is not None:
        import tempfile

        shared.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="pgchaos-", dir=shared))
    else:
        work = tmp_path_factory.mktemp("pgchaos")
    bed = _shared_log_bed(pbx, work, mode, pg_server.new_database())
    rng = random.Random(14)
    outcomes: dict[str, dict[str, Any]] = {}

    async def one_call(n: int) -> None:
        key = rng.choice(["1", "2"])
        call = await bed.call(caller_number=f"+3120{n:07d}")
        await bed.wait_phase(call, Phase.NOTICE, timeout=30)
        call_id = bed.session(call).info.call_id
        await bed.wait_phase(call, Phase.QUESTION_PROMPT, 0, timeout=30)
        await bed.press(call, key)
        await bed.wait_left_app(call, timeout=45)
        seen = await bed.reached_destination(call_id, timeout=20)
        await bed.channel_gone(call.stasis_id, timeout=60)
        outcomes[call_id] = {"key": key, "seen": seen}

    async def calls() -> None:
        sem = asyncio.Semaphore(CONCURRENCY)

        async def limited(n: int) -> None:
            async with sem:
                await one_call(n)

        await asyncio.gather(*(limited(n) for n in range(CALLS)))

    async def chaos() -> None:
        await asyncio.sleep(6)
        await asyncio.to_thread(pg_server.stop)  # restarted: connections refused
        await asyncio.sleep(10)
        await asyncio.to_thread(pg_server.start)
        await asyncio.sleep(6)
        paused = pg_server.pause()  # blocked: nothing answers, nothing is refused
        try:
            await asyncio.sleep(9)
        finally:
            pg_server.resume(paused)

    async def main() -> None:
        await bed.start()
        try:
            await asyncio.wait_for(asyncio.gather(calls(), chaos()), 400)
            # Late rows (decisions of the calls during the outage) land once the
            # server is back: the late-write log retries with back-off (max 30 s).
            await _until(lambda: len(_rows(bed)) >= len(outcomes), 90)
        finally:
            await bed.stop()

    try:
        asyncio.run(main())
    finally:
        if not (pg_server.datadir and (pg_server.datadir / "postmaster.pid").exists()):
            pg_server.start()

    rows = _rows(bed)
    by_id = {r["call_id"]: r for r in rows}
    files = {p.stem for p in bed.recordings_dir.rglob("*") if p.is_file()}
    not_logged = [c for c, o in outcomes.items() if o["seen"] and o["seen"].startswith("no/")]
    counts = Counter(
        "recorded" if c in files else ("not logged" if c in not_logged else "unrecorded")
        for c in outcomes)
    bad_files = sorted(f for f in files if f not in by_id or not (
        json.loads(by_id[f]["decisions"]).get("recording") == "yes"
        and by_id[f]["recording_confirmed"] == 1))
    lost = sorted(c for c in outcomes if c not in by_id)
    dupes = [c for c, k in Counter(r["call_id"] for r in rows).items() if k > 1]
    recorded_without_yes = [c for c, o in outcomes.items()
                            if c in files and o["key"] != "1"]
    conn = open_reader(bed.settings)
    try:
        chain = verify_chain(conn)
    finally:
        conn.close()
    voided = sum(1 for r in rows if r["withdrawn_by"] == "system")
    print(f"\npg chaos ({mode}): {len(outcomes)} calls, {dict(counts)}, "
          f"{len(not_logged)} told 'not logged' during the outages ({voided} of their rows "
          f"committed late and voided), rows {len(rows)}, "
          f"recordings without a committed yes {len(bad_files)}, lost decisions "
          f"{len(lost)}, duplicates {len(dupes)}, chain ok {chain.ok} ({chain.rows} rows)")
    assert len(outcomes) == CALLS
    assert all(o["seen"] for o in outcomes.values()), "every call reached the destination"
    assert not_logged, "the outage must have hit some calls (else the test proves nothing)"
    assert bad_files == [] and recorded_without_yes == []
    assert lost == [] and dupes == []
    assert chain.ok, chain.problem
    # The calls told "not logged" were not recorded, and their late rows say so.
    for c in not_logged:
        assert c not in files
        assert by_id[c]["recording_confirmed"] in (None, 0)


def _rows(bed: Testbed) -> list[dict[str, Any]]:
    try:
        conn = open_reader(bed.settings)
    except Exception:  # the server is down: nothing readable yet
        return []
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM calls ORDER BY seq")]
    except Exception:
        return []
    finally:
        conn.close()


async def _until(predicate: Callable[[], bool], timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await asyncio.to_thread(predicate):
        if loop.time() > deadline:
            return
        await asyncio.sleep(0.5)


TWO_NODES_DIALPLAN = """
[pg-two-nodes]
; Local/ari-<flow>@pg-two-nodes goes to the ARI node, agi-<flow> to the FastAGI node.
exten => _ari-.,1,Stasis(consentivr,${EXTEN:4})
 same => n,Set(CONSENTIVR_RECORDING=no)
 same => n,Goto(consentivr-dest,s,1)
exten => _agi-.,1,AGI(${PG_TEST_AGI_URL}/${EXTEN:4},${CHANNEL(linkedid)})
 same => n,Set(CONSENTIVR_RECORDING=no)
 same => n,Goto(consentivr-dest,s,1)
"""


def test_two_nodes_share_one_log(pbx: Any, pg_server: PgServer,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """An ARI node and a FastAGI node (two services, each with its own recordings
    dir) take real calls at the same time into one PostgreSQL log: on each node the
    recordings are exactly its rows with a confirmed yes, and the one chain verifies."""
    import tempfile

    monkeypatch.setenv(PGPASS_ENV, pg_server.password)
    pbx.set_dialplan(dialplan_for_tests(agent_sound="beep") + TWO_NODES_DIALPLAN)
    shared: Path = pbx.shared_dir
    shared.mkdir(parents=True, exist_ok=True)
    url = pg_server.new_database()
    beds = {mode: _shared_log_bed(pbx, Path(tempfile.mkdtemp(prefix=f"pg2-{mode}-",
                                                             dir=shared)), mode, url)
            for mode in ("ari", "agi")}
    rng = random.Random(2)
    placed: dict[str, tuple[str, str]] = {}  # call id -> (node, key)

    async def one_call(n: int) -> None:
        mode = "ari" if n % 2 else "agi"
        node, caller = beds[mode], beds["ari"]
        key = rng.choice(["1", "2"])
        call = await caller.call(context="pg-two-nodes", exten=f"{mode}-main",
                                 caller_number=f"+3130{n:07d}")
        await node.wait_phase(call, Phase.NOTICE, timeout=30)
        call_id = node.session(call).info.call_id
        await node.wait_phase(call, Phase.QUESTION_PROMPT, 0, timeout=30)
        await caller.press(call, key)
        await node.wait_left_app(call, timeout=45)
        assert await caller.reached_destination(call_id, timeout=20)
        await caller.channel_gone(call.stasis_id, timeout=60)
        placed[call_id] = (f"node-{mode}", key)

    async def main() -> None:
        await beds["ari"].start()  # the caller app lives here
        await beds["agi"].start_service()
        try:
            host, port = beds["agi"].agi.address
            await beds["ari"].caller.request("POST", "/asterisk/variable", {
                "variable": "PG_TEST_AGI_URL", "value": f"agi://{host}:{port}"})
            sem = asyncio.Semaphore(CONCURRENCY)

            async def limited(n: int) -> None:
                async with sem:
                    await one_call(n)

            await asyncio.wait_for(asyncio.gather(*(limited(n) for n in range(16))), 300)
        finally:
            await beds["agi"].stop_service()
            await beds["ari"].stop()

    asyncio.run(main())
    rows = {r["call_id"]: r for r in _rows(beds["ari"])}
    assert set(rows) == set(placed)
    for mode, bed in beds.items():
        node = f"node-{mode}"
        files = {p.stem for p in bed.recordings_dir.rglob("*") if p.is_file()}
        yes = {c for c, r in rows.items() if r["node"] == node
               and json.loads(r["decisions"]).get("recording") == "yes"
               and r["recording_confirmed"] == 1}
        assert files == yes, mode
        assert {c for c, (n, k) in placed.items() if n == node and k == "1"} == yes, mode
    assert {r["node"] for r in rows.values()} == {"node-ari", "node-agi"}
    conn = open_reader(beds["ari"].settings)
    try:
        chain = verify_chain(conn)
    finally:
        conn.close()
    assert chain.ok and chain.rows == len(placed), chain.problem
    print(f"\ntwo nodes: {len(placed)} calls, "
          f"{Counter(n for n, _ in placed.values())}, chain ok ({chain.rows} rows)")
