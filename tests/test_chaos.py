"""The chaos suite (issue 7): hundreds of random calls while things break.

consentivr runs as a real subprocess (``consentivr serve``) against a sandboxed
Asterisk of its own, so that ``kill -9`` and an Asterisk restart are real. Calls are
``Local`` channels whose caller half sits in a helper Stasis app; each presses random
digits at random times and may hang up at a random point. Meanwhile faults are
injected one after another: kill -9 of consentivr (and a restart), a restart of
Asterisk, the consent log locked for seconds by another connection, and the AMI
connection dropped (through a TCP proxy).

Afterwards the invariants are checked:

1. every recording file belongs to a row whose recording decision is yes;
2. no call whose decision is not yes has a file;
3. every call that got past the menu has a row: the test dialplan notes, in Asterisk's
   log (which survives restarts), the call id and the decision each call carried into
   the destination;
4. no channel is left in Stasis;
5. the consent log's hash chain verifies (``consentivr.audit``);

plus: no secret and no traceback of a bug in consentivr's log (tracebacks that end in
one of our own errors, i.e. expected faults logged verbosely, are only counted). The
counts are printed.
``CONSENTIVR_CHAOS_CALLS`` (default 320) and ``CONSENTIVR_CHAOS_SEED`` tune a run.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from consentivr.ari import AriClient
from consentivr.configfile import load_settings
from consentivr.errors import ConsentivrError
from consentivr.features import applicationmap, withdraw_dialplan
from consentivr.settings import AriSettings, WithdrawalSettings
from consentivr.store import load_or_create_key
from consentivr_testbed.pbx import SandboxPbx
from consentivr_testbed.testbed import CALLER_APP, write_config
from tests.fault_fixtures import TcpProxy, hold_lock_in_thread, rows

pytestmark = [pytest.mark.chaos, pytest.mark.asterisk]

CALLS = int(os.environ.get("CONSENTIVR_CHAOS_CALLS", "320"))
SEED = int(os.environ.get("CONSENTIVR_CHAOS_SEED", str(random.randrange(1 << 30))))
CONCURRENCY = 16
APP = "consentivr"

DIALPLAN = """\
; consentivr chaos suite
[consentivr-test]
exten => _flow-.,1,NoOp(chaos call)
 same => n,Stasis(consentivr,${EXTEN:5})
 ; consentivr is not connected: the call goes on, unrecorded (fail-closed).
 same => n,Set(CONSENTIVR_RECORDING=no)
 same => n,Goto(consentivr-dest,s,1)

[consentivr-dest]
; Note what reached the destination in Asterisk's log, which survives restarts
; (DB() writes are "dangerous" after an ARI continue and get blocked).
exten => s,1,Set(SEEN=${CONSENTIVR_CALL_ID}/${CONSENTIVR_LOGGED}/${CONSENTIVR_RECORDING})
 same => n,Log(NOTICE,CVRSEEN ${UNIQUEID} ${SEEN}/${CONSENTIVR_DECISION_RECORDING}/${STASISSTATUS})
 same => n,Dial(Local/talk@consentivr-agent,30)
 same => n,Hangup()

[consentivr-agent]
exten => talk,1,Answer()
 same => n,Playback(hello-world)
 same => n,Hangup()
"""

FLOW = """\
main:
  languages: [en]
  notice: {en: {media: [sound:hello-world]}}
  invalid: {en: {media: [sound:beep]}}
  max_menu_seconds: 30
  purposes:
    recording:
      basis: consent
      records: true
      retention_days: 90
      yes_key: "1"
      no_key: "2"
      timeout: 1.5
      retries: 1
      question: {en: {media: [sound:beep]}}
    callback:
      basis: consent
      callback: true
      retention_days: 30
      yes_key: "1"
      no_key: "2"
      timeout: 1.5
      retries: 1
      question: {en: {media: [sound:beep]}}
  destination: {context: consentivr-dest, exten: s, priority: 1}
"""


# --------------------------------------------------------------------------- the service


class ServiceProcess:
    """``consentivr serve`` as a child process, killed and restarted at will."""

    def __init__(self, config: Path, log_path: Path) -> None:
        self.config = config
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def command(self) -> list[str]:
        script = Path(sys.executable).with_name("consentivr")
        if script.exists():
            return [str(script), "serve", "--config", str(self.config)]
        return [sys.executable, "-c", "from consentivr.cli.main import main; main()",
                "serve", "--config", str(self.config)]

    async def start(self) -> None:
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL)
        self.starts += 1
        await self.wait_log(r"ARI events (re)?connected for app consentivr\b", offset, 30)
        # Recordings start only once the withdrawal key is proven to work.
        await self.wait_log(r"withdrawal path verified", offset, 30)

    async def wait_log(self, pattern: str, offset: int, timeout: float) -> None:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"consentivr exited with {self.proc.returncode}; "
                                     f"see {self.log_path}")
            with self.log_path.open("rb") as fh:
                fh.seek(offset)
                if regex.search(fh.read().decode("utf-8", "replace")):
                    return
            await asyncio.sleep(0.05)
        raise AssertionError(f"no {pattern!r} in {self.log_path} within {timeout}s")

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    async def stop(self, timeout: float = 30) -> int:
        """SIGTERM: the service drains its calls and flushes late log writes."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.terminate()
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        return self.proc.returncode


# --------------------------------------------------------------------------- the callers


class Callers:
    """The caller app: places Local calls and learns when each caller half is gone."""

    def __init__(self, settings: AriSettings) -> None:
        self.ari = AriClient(settings)
        self.gone: dict[str, asyncio.Event] = {}
        self.ready = asyncio.Event()
        self._pump: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._pump = asyncio.get_running_loop().create_task(self._events())
        await asyncio.wait_for(self.ready.wait(), 15)

    async def _on_connect(self) -> None:
        self.ready.set()

    async def _events(self) -> None:
        async for event in self.ari.events(CALLER_APP, on_connect=self._on_connect):
            if event.get("type") in ("ChannelDestroyed", "StasisEnd"):
                gone = self.gone.get(str((event.get("channel") or {}).get("id")))
                if gone is not None:
                    gone.set()

    async def registered(self) -> bool:
        try:
            return await self.ari.application(CALLER_APP) is not None
        except ConsentivrError:
            return False

    async def call(self, caller_number: str) -> tuple[str, str]:
        caller_id, stasis_id = f"c-{uuid.uuid4().hex}", f"s-{uuid.uuid4().hex}"
        self.gone[caller_id] = asyncio.Event()
        await self.ari.request("POST", "/channels", {
            "endpoint": "Local/flow-main@consentivr-test", "app": CALLER_APP,
            "channelId": caller_id, "otherChannelId": stasis_id,
            "callerId": f'"Chaos" <{caller_number}>',
        })
        return caller_id, stasis_id

    async def wait_gone(self, channel_id: str, timeout: float) -> bool:
        """True once the channel is gone (events, or polling if events were lost)."""
        deadline = time.monotonic() + timeout
        event = self.gone[channel_id]
        while time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), 2)
            try:
                if await self.ari.channel(channel_id) is None:
                    return True
            except ConsentivrError:
                pass  # Asterisk is restarting
        return False

    async def close(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
        await self.ari.close()


# --------------------------------------------------------------------------- the run


@dataclass
class Tally:
    attempted: int = 0
    placed: int = 0
    not_placed: int = 0
    caller_hangups: int = 0
    digits: int = 0
    stuck: list[str] = field(default_factory=list)
    faults: Counter[str] = field(default_factory=Counter)
    placed_ids: list[str] = field(default_factory=list)  # the ;2 (uniqueid) of each call
    done: int = 0


class Chaos:
    def __init__(self, pbx: SandboxPbx, work: Path, rng: random.Random) -> None:
        self.pbx = pbx
        self.work = work
        self.rng = rng
        self.tally = Tally()
        self.ami_proxy = TcpProxy(pbx.endpoints.ami_host, pbx.endpoints.ami_port)
        self.config = work / "config.yaml"
        self.service = ServiceProcess(self.config, work / "consentivr.log")
        ep = pbx.endpoints
        self.callers = Callers(AriSettings(url=ep.ari_url, username=ep.ari_user,
                                           password=ep.ari_password, app=CALLER_APP,
                                           connections=30))
        self.database = work / "consent.db"

    async def setup(self) -> None:
        await self.ami_proxy.start()
        endpoints = self.pbx.endpoints
        proxied = dataclasses.replace(endpoints, ami_port=self.ami_proxy.port)
        write_config(self.config, proxied, self.work, FLOW)
        load_settings(self.config)  # fail early on a bad config
        await self.service.start()
        await self.callers.start()

    # -- one call ---------------------------------------------------------

    async def one_call(self, index: int, slots: asyncio.Semaphore) -> None:
        rng = random.Random(self.rng.random())
        async with slots:
            self.tally.attempted += 1
            number = rng.choice(["+3120", "0", "+44", "'\"; ../", "é"]) + str(index)
            try:
                caller_id, stasis_id = await self.callers.call(number)
            except ConsentivrError:
                self.tally.not_placed += 1  # Asterisk restarting: the call never existed
                return
            self.tally.placed += 1
            self.tally.placed_ids.append(stasis_id)
            started = time.monotonic()
            hang_up_at = rng.uniform(0.2, 9.0) if rng.random() < 0.3 else None
            presses = [(rng.uniform(0.1, 2.5), rng.choice("1112223#"))
                       for _ in range(rng.choice([0, 1, 2, 2, 2, 3, 4]))]
            for pause, digit in presses:
                await asyncio.sleep(pause)
                if hang_up_at is not None and time.monotonic() - started > hang_up_at:
                    break
                with contextlib.suppress(ConsentivrError):
                    await self.callers.ari.send_dtmf(caller_id, digit)
                    self.tally.digits += 1
            if hang_up_at is not None:
                await asyncio.sleep(max(0.0, hang_up_at - (time.monotonic() - started)))
                with contextlib.suppress(ConsentivrError):
                    await self.callers.ari.hangup(caller_id)
                    self.tally.caller_hangups += 1
            if not await self.callers.wait_gone(caller_id, 90):
                self.tally.stuck.append(stasis_id)
                with contextlib.suppress(ConsentivrError):
                    await self.callers.ari.hangup(caller_id)
            self.tally.done += 1

    async def calls(self, count: int) -> None:
        slots = asyncio.Semaphore(CONCURRENCY)
        tasks = []
        for index in range(count):
            tasks.append(asyncio.create_task(self.one_call(index, slots)))
            await asyncio.sleep(self.rng.uniform(0.0, 0.25))
        await asyncio.gather(*tasks)

    # -- faults -----------------------------------------------------------

    async def kill_and_restart(self) -> None:
        self.service.kill9()
        self.tally.faults["kill -9 consentivr"] += 1
        await asyncio.sleep(self.rng.uniform(0.3, 1.5))  # calls arrive while it is down
        await self.service.start()

    async def restart_asterisk(self) -> None:
        self.tally.faults["Asterisk restart"] += 1
        # Blocking on purpose: it stops this loop's callers too, as a real outage would.
        self.pbx.restart()
        deadline = time.monotonic() + 30
        while not await self.callers.registered() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)

    async def lock_database(self, seconds: float) -> None:
        self.tally.faults[f"DB locked {seconds:g}s"] += 1
        thread = hold_lock_in_thread(self.database, seconds)
        await asyncio.to_thread(thread.join)

    async def drop_ami(self, down: float) -> None:
        self.tally.faults["AMI connection dropped"] += 1
        self.ami_proxy.refuse = down > 0
        self.ami_proxy.cut()
        await asyncio.sleep(down)
        self.ami_proxy.refuse = False

    async def faults(self, count: int) -> None:
        """One fault after another, spread over the run, never two at once."""
        plan: list[tuple[float, Callable[[], Any]]] = [
            (0.06, lambda: self.drop_ami(3.0)),
            (0.14, lambda: self.lock_database(3.0)),
            (0.24, self.kill_and_restart),
            (0.36, lambda: self.lock_database(8.0)),
            (0.50, lambda: self.drop_ami(0.0)),
            (0.60, self.kill_and_restart),
            (0.72, self.restart_asterisk),
            (0.86, self.kill_and_restart),
        ]
        for at, fault in plan:
            while self.tally.attempted < at * count:
                await asyncio.sleep(0.1)
            await fault()
            await asyncio.sleep(6)  # late writes land before the next fault


# --------------------------------------------------------------------------- invariants


def destination_log(pbx: SandboxPbx) -> dict[str, list[str]]:
    """uniqueid -> [call id, logged, recording, recording decision, STASISSTATUS]."""
    seen: dict[str, list[str]] = {}
    text = pbx.log_path.read_text("utf-8", "replace")
    for uid, value in re.findall(r"CVRSEEN (\S+) (\S*)$", text, flags=re.MULTILINE):
        seen[uid] = value.split("/")
    return seen


_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", re.MULTILINE)


def tracebacks(log_text: str) -> tuple[list[str], list[str]]:
    """Log records with a traceback: (bugs, expected faults).

    A traceback that ends in one of our own errors (``consentivr.errors.*``, e.g. a
    locked database) is an expected fault logged too verbosely; anything else is a bug.
    """
    starts = [m.start() for m in _RECORD.finditer(log_text)] + [len(log_text)]
    bugs: list[str] = []
    expected: list[str] = []
    for begin, end in itertools.pairwise(starts):
        record = log_text[begin:end]
        if "Traceback (most recent call last)" not in record:
            continue
        last = record.strip().splitlines()[-1]
        (expected if last.startswith("consentivr.errors.") else bugs).append(record[:3000])
    return bugs, expected


def check(chaos: Chaos, seen: dict[str, list[str]], in_stasis: list[str],
          log_text: str, secrets: list[str]) -> tuple[list[str], dict[str, int]]:
    violations: list[str] = []
    logged = rows(chaos.database)
    by_call = {r["call_id"]: r for r in logged}
    recordings = chaos.work / "recordings"
    files = sorted(recordings.iterdir()) if recordings.exists() else []

    # 1. every recording file belongs to a row whose recording decision is yes
    for path in files:
        row = by_call.get(path.stem)
        if not re.fullmatch(r"[0-9a-f]{32}\.wav", path.name):
            violations.append(f"unexpected file name {path.name}")
        elif row is None:
            violations.append(f"{path.name}: a recording without a row")
        elif row["decisions"].get("recording") != "yes" or row["recording_path"] != str(path):
            violations.append(f"{path.name}: recorded but the row says "
                              f"{row['decisions'].get('recording')}")
    # 2. no call whose decision is not yes has a file (or a recording path)
    for row in logged:
        has_file = (recordings / f"{row['call_id']}.wav").exists()
        if row["decisions"].get("recording") != "yes" and (row["recording_path"] or has_file):
            violations.append(f"call {row['call_id']}: not yes, yet a recording")
    # 3. every call that got past the menu has a row, and carried its decision
    placed = set(chaos.tally.placed_ids)
    ours = {uid: v for uid, v in seen.items() if uid in placed}
    bypassed = 0
    for uid, (call_id, logged_flag, recording, decision, status, *_) in ours.items():
        if not call_id:  # consentivr was down: Stasis() failed, the dialplan went on
            bypassed += 1
            if status != "FAILED" or recording != "no":
                violations.append(f"{uid}: reached the destination outside our app "
                                  f"with recording={recording} status={status}")
            continue
        row = by_call.get(call_id)
        if row is None:
            violations.append(f"{uid}: call {call_id} got past the menu without a row")
            continue
        if row["uniqueid"] != uid:
            violations.append(f"{uid}: row {call_id} is for {row['uniqueid']}")
        if logged_flag == "yes" and row["decisions"].get("recording") != decision:
            violations.append(f"{uid}: the destination saw {decision}, the row says "
                              f"{row['decisions'].get('recording')}")
        if recording == "yes" and row["decisions"].get("recording") != "yes":
            violations.append(f"{uid}: recording=yes at the destination without a yes row")
    # 4. no channel left in Stasis
    violations += [f"{ch}: left in Stasis" for ch in in_stasis]
    violations += [f"{ch}: the call never ended" for ch in chaos.tally.stuck]
    # 5. the log verifies
    try:
        from consentivr.audit import verify_chain
    except ImportError:
        chain = "skipped (no consentivr.audit)"
    else:
        conn = sqlite3.connect(chaos.database)
        conn.row_factory = sqlite3.Row
        try:
            report = verify_chain(conn)
        finally:
            conn.close()
        chain = "ok" if report.ok else f"BROKEN: {report.problem}"
        if not report.ok:
            violations.append(f"hash chain: {report.problem} at seq {report.bad_seq}")
    # and: no traceback of a bug, no secret in our log
    bugs, expected = tracebacks(log_text)
    violations += [f"traceback in consentivr's log:\n{t}" for t in bugs]
    violations += [f"a secret ({s[:3]}...) in consentivr's log" for s in secrets
                   if s and s in log_text]
    counts = {
        "rows": len(logged),
        "recordings": len(files),
        "reached destination": len(ours),
        "through our app": len(ours) - bypassed,
        "bypassed while consentivr was down": bypassed,
        "recording yes rows": sum(r["decisions"].get("recording") == "yes" for r in logged),
        "late rows (log unavailable)": sum("not logged before" in r["outcome"] for r in logged),
        "taken back after a restart": sum("taken back" in r["outcome"] for r in logged),
        "recording not confirmed": sum(r["recording_confirmed"] == 0 for r in logged),
    }
    counts["tracebacks of expected faults (noise)"] = len(expected)
    counts["chain"] = chain  # type: ignore[assignment]
    return violations, counts


# --------------------------------------------------------------------------- the test


@pytest.fixture
def chaos_pbx(pbx: Any) -> Iterator[SandboxPbx]:
    """A PBX of our own: the chaos suite restarts it."""
    if not isinstance(pbx, SandboxPbx):
        pytest.skip("the chaos suite restarts Asterisk: it needs the sandboxed PBX")
    base = Path(tempfile.mkdtemp(prefix="cvr-chaos-", dir="/tmp"))
    own = SandboxPbx(base / "run", shared_dir=base / "shared")
    own.start()
    own.set_dialplan(DIALPLAN)
    # As installed in production: without the withdrawal key nothing would be recorded.
    withdrawal = WithdrawalSettings()
    own.set_withdrawal(applicationmap(withdrawal), withdraw_dialplan(withdrawal))
    own.keep = True  # type: ignore[attr-defined]  # the test clears it once it passed
    try:
        yield own
    finally:
        own.stop()
        if own.keep or os.environ.get("CONSENTIVR_KEEP_PBX"):  # type: ignore[attr-defined]
            print(f"chaos files kept in {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


def test_chaos(chaos_pbx: SandboxPbx, capsys: pytest.CaptureFixture[str]) -> None:
    rng = random.Random(SEED)
    work = chaos_pbx.shared_dir / "chaos"
    work.mkdir(parents=True)
    chaos = Chaos(chaos_pbx, work, rng)
    started = time.monotonic()

    async def main() -> tuple[list[str], list[str]]:
        await chaos.setup()
        try:
            await asyncio.gather(chaos.calls(CALLS), chaos.faults(CALLS))
            # Every call has ended; recovery has had its chance: nothing may wait in Stasis.
            deadline = time.monotonic() + 20
            in_stasis: list[str] = []
            while time.monotonic() < deadline:
                data = await chaos.callers.ari.application(APP)
                in_stasis = list((data or {}).get("channel_ids", []))
                if not in_stasis:
                    break
                await asyncio.sleep(0.5)
        finally:
            code = await chaos.service.stop()
            await chaos.callers.close()
            await chaos.ami_proxy.close()
        return in_stasis, [f"consentivr exited with {code} on SIGTERM"] if code else []

    in_stasis, exit_problems = asyncio.run(main())
    seen = destination_log(chaos_pbx)
    log_text = chaos.service.log_path.read_text("utf-8", "replace")
    ep = chaos_pbx.endpoints
    key = load_or_create_key(chaos.database, None).key.decode()
    violations, counts = check(chaos, seen, in_stasis, log_text,
                               [ep.ari_password, ep.ami_password, key])
    violations += exit_problems
    tally = chaos.tally
    faults = sum(tally.faults.values())
    lines = [
        f"chaos seed={SEED}: {tally.placed} calls placed ({tally.attempted} attempted, "
        f"{tally.not_placed} refused during the Asterisk restart), {tally.digits} digits, "
        f"{tally.caller_hangups} caller hang-ups, {time.monotonic() - started:.0f}s",
        f"faults injected: {faults} ("
        + ", ".join(f"{name} x{n}" for name, n in sorted(tally.faults.items())) + ")",
        "outcome: " + ", ".join(f"{k} {v}" for k, v in counts.items()),
        f"violations: {len(violations)}",
        *(f"  - {v}" for v in violations[:20]),
    ]
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    assert tally.placed >= 300 or CALLS < 300, "fewer than 300 calls were placed"
    assert faults >= 8
    assert counts["through our app"] > 0 and counts["recordings"] > 0
    assert not violations, "\n".join(lines)
    chaos_pbx.keep = False  # type: ignore[attr-defined]
