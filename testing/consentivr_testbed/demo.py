"""The demo: the whole thing on a real Asterisk, in about a minute.

``./dev demo`` runs it (``python -m consentivr_testbed.demo``); it is part of the test
bench, not of the installed consentivr, because it needs the sandbox PBX.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import sqlite3
import sys
import tempfile
from pathlib import Path
from typing import Any

import click

from consentivr.errors import ConsentivrError

DEMO_CALLS: list[tuple[str, list[str | None]]] = [
    ("yes / yes", ["1", "1"]),
    ("no / no", ["2", "2"]),
    ("silence", [None, None]),
]


@click.command()
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where to keep the PBX, the consent log and the recordings "
                   "(default: a new temp dir, kept afterwards).")
@click.option("--caller", type=click.Choice(["sip", "local"]), default="sip", show_default=True,
              help="sip: sipp places real SIP calls with RFC 2833 digits; "
                   "local: Local channels with digits sent over ARI.")
@click.option("-v", "--verbose", is_flag=True, help="Show the app's log lines.")
def demo(workdir: Path | None, caller: str, verbose: bool) -> None:
    """Start the test PBX, run the app, place three real calls, print the results.

    The three callers press yes/yes, no/no, and nothing at all. Then the consent
    log and the recordings dir are printed: one recording, three decisions.
    Needs root (the PBX runs in a bwrap sandbox), or CONSENTIVR_TEST_ARI_URL etc.
    pointing at an Asterisk of your own (see asterisk/README.md).

    \b
    Example:
      sudo ./dev demo
      sudo ./dev demo --caller local --workdir /tmp/consentivr-demo
    """
    from consentivr_testbed.pbx import ExternalPbx, SandboxPbx

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    base = (workdir or Path(tempfile.mkdtemp(prefix="consentivr-demo-"))).absolute()
    base.mkdir(parents=True, exist_ok=True)
    external = ExternalPbx.from_env()
    try:
        if external is not None:
            click.echo(f"Using your Asterisk at {external.endpoints.ari_url}")
            _run(external, base, caller)
            return
        click.echo("Starting the test PBX (Asterisk 22 from Debian testing in a sandbox; "
                   "the first time this downloads it, about a minute)...")
        with SandboxPbx(base / "pbx") as pbx:
            click.echo(f"Asterisk is up: ARI {pbx.endpoints.ari_url}, log {pbx.log_path}")
            _run(pbx, pbx.shared_dir / "demo", caller)
    except ConsentivrError as exc:
        raise click.ClickException(" ".join(str(exc).split())) from None


def _run(pbx: Any, work: Path, caller: str) -> None:
    from consentivr_testbed.testbed import Testbed, dialplan_for_tests, flow_yaml

    if caller == "sip" and (shutil.which("sipp") is None or pbx.endpoints.sip_port is None):
        click.echo("sipp or a SIP port is not available: using Local channels instead.")
        caller = "local"
    work.mkdir(parents=True, exist_ok=True)
    pbx.set_dialplan(dialplan_for_tests(agent_sound="demo-thanks"))
    bed = Testbed(pbx, work, flow_yaml(notice="sound:hello-world", timeout=2.0, retries=0))
    asyncio.run(_calls(bed, caller))
    _report(bed)


async def _calls(bed: Any, caller: str) -> None:
    from consentivr.flow import Phase

    await bed.start()
    try:
        for label, keys in DEMO_CALLS:
            click.echo(f"Call: the caller answers {label} ...")
            if caller == "sip":
                await _sip_call(bed, keys)
                continue
            call = await bed.call()
            for index, key in enumerate(keys):
                if key is not None:
                    await bed.wait_phase(call, Phase.QUESTION_PROMPT, index, timeout=30)
                    await bed.press(call, key)
            await bed.wait_left_app(call, timeout=60)
            await bed.channel_gone(call.stasis_id, timeout=60)
    finally:
        await bed.stop()


async def _sip_call(bed: Any, keys: list[str | None]) -> None:
    from consentivr_testbed.sipcaller import place_call_async

    # hello-world (1.4 s) is the notice, a beep each question: press in the pauses.
    script: list[tuple[str, Any]] = [("pause", 2.5)]
    for key in keys:
        script += [("dtmf", key), ("pause", 1.2)] if key else [("pause", 3.0)]
    script += [("audio", 4.0), ("hangup", 0)]
    result = await place_call_async(bed.endpoints, "100", script, timeout=60)
    if not result.ok:
        click.echo(f"  sipp reported a problem: {result.summary()}")


def _report(bed: Any) -> None:
    db = bed.settings.database
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    rows = [dict(r) for r in conn.execute("SELECT * FROM calls ORDER BY seq")]
    conn.close()
    click.echo("")
    click.echo(f"Consent log ({db}):")
    click.echo(f"  {'CALL ID':32}  {'RECORDING':10} {'CALLBACK':10} {'NOTICE':16}  "
               "RECORDING FILE")
    for row in rows:
        d = json.loads(row["decisions"])
        confirmed = " (confirmed)" if row["recording_confirmed"] == 1 else ""
        click.echo(f"  {row['call_id']:32}  {d.get('recording', '-'):10} "
                   f"{d.get('callback', '-'):10} {row['notice_version']:16}  "
                   f"{row['recording_path'] or '-'}{confirmed}")
    click.echo("")
    rec_dir = bed.recordings_dir
    files = sorted(rec_dir.iterdir()) if rec_dir.exists() else []
    click.echo(f"Recordings ({rec_dir}): {len(files)} file(s)")
    for path in files:
        click.echo(f"  {path.name}  {path.stat().st_size} bytes")
    click.echo("")
    click.echo(f"Config used: {bed.config_path}")
    click.echo(f"Try: consentivr calls list --config {bed.config_path}")


if __name__ == "__main__":  # python -m consentivr_testbed.demo (what ./dev demo runs)
    demo(prog_name="./dev demo")
