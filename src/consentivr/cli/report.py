"""``consentivr report``: the DPO's page (or JSON) over the consent log."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import click

from consentivr.cli.common import (
    NeedsAttention,
    config_option,
    friendly_errors,
    settings_from,
    write_atomically,
)


@click.command("report")
@config_option
@click.option("--from", "start", metavar="DATE",
              help="First day of the period (UTC), e.g. 2026-01-01; default: the first call.")
@click.option("--to", "end", metavar="DATE",
              help="Last day of the period, included (UTC), e.g. 2026-03-31; default: now.")
@click.option("--lang", type=click.Choice(["nl", "en"]), default="en", show_default=True,
              help="The page's language.")
@click.option("--format", "fmt", type=click.Choice(["html", "json"]), default="html",
              show_default=True, help="A page for people, or JSON for machines.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write here (replaced in one step); default: standard output.")
@click.option("--no-verify", is_flag=True,
              help="Skip the hash-chain check (it reads every row).")
def report_command(config_path: str, start: str | None, end: str | None, lang: str, fmt: str,
                   out: Path | None, no_verify: bool) -> None:
    """The data-protection officer's report: consent rates per purpose and week,
    withdrawals, recordings, retention compliance, purges, subject requests,
    notice versions, the hash chain, and the GDPR art. 30 record.

    One self-contained HTML page (no network, prints to PDF from the browser)
    or JSON. It holds no personal data: no numbers, no call ids. Exit code 3
    when a recording is past its retention or the hash chain is broken (the
    report is still written).

    \b
    Example:
      consentivr report --from 2026-01-01 --to 2026-03-31 --lang nl --out q1.html
      consentivr report --format json | jq .retention.past_retention
    """
    from consentivr.logstats import open_stats
    from consentivr.report import check_out_path, gather, period_of
    from consentivr.reportpage import render_html, warm_up

    if fmt == "html":
        threading.Thread(target=warm_up, name="warm-up", daemon=True).start()
    settings = settings_from(config_path)
    with friendly_errors():
        period = period_of(start, end)
        if out is not None:
            check_out_path(out)
        stats = open_stats(settings.database, settings)
        try:
            report = gather(stats, settings, period, now=time.time(), verify=not no_verify)
        finally:
            stats.close()
        text = (json.dumps(report.to_json(), indent=2, ensure_ascii=False) + "\n"
                if fmt == "json" else render_html(report, lang))
        if out is None:
            sys.stdout.write(text)
        else:
            write_atomically(out, text)
    if out is not None:
        click.echo(f"wrote {out}", err=True)
    problems = []
    if report.past_retention:
        problems.append(f"{report.past_retention} recording(s) past retention")
    if report.chain.get("checked") and not report.chain.get("ok"):
        problems.append("the hash chain is broken")
    if problems:
        raise NeedsAttention("; ".join(problems) + " (see the report)")
