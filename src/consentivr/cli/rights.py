"""Retention and data-subject rights: ``purge``, ``verify``, ``subject``, ``callbacks``.

Exit codes (the same for every command here):

\b
  0  done
  1  could not run: bad config, unreadable log, I/O error, aborted, or the
     recordings dir cannot be opened or looks unmounted (nothing was marked)
  2  usage error (a bad option)
  3  ran, but something needs a person: a recording left alone (symlink,
     outside the dir, permission), a broken hash chain, an erasure left unfinished
  4  another purge or erasure is running (the lock is held): try again later

``callbacks done`` exits 0 when every id is cleared now or was already, and 3 when
an id is unknown or never asked for a callback (the other ids are cleared anyway).
"""

from __future__ import annotations

import csv
import io
import json
import re
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar

import click

from consentivr.audit import count_rows, verify_chain
from consentivr.callbacks import DoneStatus, mark_done, record_export, staff_name
from consentivr.cli.common import (
    Busy,
    NeedsAttention,
    config_option,
    friendly_errors,
    settings_from,
)
from consentivr.consentlog import caller_key_for, open_reader
from consentivr.errors import ConsentivrError, StoreError
from consentivr.purgelog import PurgeBusy, open_log_for
from consentivr.purgemetrics import recorded_purge
from consentivr.recordingsdir import show_path
from consentivr.retention import (
    DEFAULT_BATCH,
    MISSING_MIN,
    MISSING_SHARE,
    PurgeOptions,
    PurgeReport,
    count_due,
    parse_as_of,
    run_purge,
)
from consentivr.settings import Settings
from consentivr.store import CallerKey
from consentivr.subject import (
    callback_list,
    erase_plan,
    erase_subject,
    export_subject,
    normalise_number,
)
from consentivr.text import strip_controls

_SHOWN = 50  # warnings printed in full before "... and N more"


class Duration(click.ParamType):
    """Seconds, or a number with s, m, h or d: ``300``, ``5m``, ``7d``."""

    name = "duration"
    _units: ClassVar[dict[str, int]] = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        if isinstance(value, int | float):
            return float(value)
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", str(value))
        if match is None:
            self.fail(f"{value!r}: expected seconds or e.g. 5m, 2h, 7d", param, ctx)
        return float(match[1]) * self._units[match[2]]


@contextmanager
def _errors() -> Iterator[None]:
    """One-line errors; a held purge lock gets its own exit code."""
    with friendly_errors():
        try:
            yield
        except PurgeBusy as exc:
            raise Busy(str(exc)) from None


class IsoDate(click.ParamType):
    """``2025-03-01``, ``2025-03-01T12:00:00Z`` or with an offset; naive means UTC."""

    name = "iso-date"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        if isinstance(value, float):
            return value
        try:
            return parse_as_of(str(value))
        except ConsentivrError:
            self.fail(f"{value!r}: expected an ISO date or date-time, e.g. 2025-03-01T12:00:00Z",
                      param, ctx)


def _as_of(value: float | None) -> float:
    return time.time() if value is None else value


@contextmanager
def _progress(total: int | None, label: str, quiet: bool) -> Iterator[Callable[[int], None]]:
    """A bar on a terminal's stderr only: systemd and cron logs stay clean."""
    if quiet or not sys.stderr.isatty():
        yield lambda n: None
        return
    with click.progressbar(length=max(total or 0, 1), label=label, file=sys.stderr) as bar:
        yield bar.update


def _key(settings: Settings) -> CallerKey:
    with _errors():
        return caller_key_for(settings)


def _shared(settings: Settings) -> Settings | None:
    """The settings when the log is a shared PostgreSQL one (the rights library's
    ``shared`` argument), else None."""
    return settings if settings.database_url is not None else None


def _echo_list(lines: list[str], prefix: str) -> None:
    for line in lines[:_SHOWN]:
        click.echo(f"{prefix}: {line}", err=True)
    if len(lines) > _SHOWN:
        click.echo(f"{prefix}: ... and {len(lines) - _SHOWN} more (see --json)", err=True)


# --- purge -----------------------------------------------------------------------


@click.command("purge")
@config_option
@click.option("--dry-run", is_flag=True, help="List what would go; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the run's report as JSON.")
@click.option("--as-of", type=IsoDate(), metavar="ISO-DATE",
              help="Purge as if it were this date (UTC unless an offset is given).")
@click.option("--grace", type=Duration(), default="5m", show_default=True,
              help="A recording modified this recently belongs to a call in progress: kept.")
@click.option("--delete-orphans", is_flag=True,
              help="Delete files no log row refers to, once older than --orphan-grace.")
@click.option("--orphan-grace", type=Duration(), default="7d", show_default=True,
              help="How old an orphan file must be before --delete-orphans removes it.")
@click.option("--batch-size", type=click.IntRange(1, 100_000), default=DEFAULT_BATCH,
              show_default=True, help="Rows per transaction.")
@click.option("--allow-missing", is_flag=True,
              help=f"Mark due recordings missing even when many are ({MISSING_MIN} or more "
                   f"and {MISSING_SHARE:.0%} of those due) or the recordings dir is empty. "
                   "Check the volume is mounted first.")
def purge_command(config_path: str, dry_run: bool, as_json: bool, as_of: float | None,
                  grace: float, delete_orphans: bool, orphan_grace: float,
                  batch_size: int, allow_missing: bool) -> None:
    """Delete recordings past retention and redact old consent-log rows.

    Recordings go when their purpose's retention has passed; log rows lose their
    personal fields after log_retention_days (a proof row stays: decision, time,
    notice version, hash chain); callback numbers are cleared when the callback
    purpose ends. Every run, dry or not, is written to the purge log. Safe to run
    nightly from a timer (docs/retention.md has the rules).

    A recordings dir that cannot be opened (a volume not mounted), or a large
    share of due recordings missing at once, stops the run with exit 1 before
    anything is marked; --allow-missing overrides the latter.

    \b
    Exit codes: 0 done, 1 could not run (or refused: recordings dir unavailable),
    2 usage, 3 something was left alone (see the problems printed), 4 another
    purge is running.

    \b
    Example:
      consentivr purge --dry-run
      consentivr purge --json | jq .counts
      consentivr purge --as-of 2025-01-31T00:00:00Z --dry-run
    """
    settings = settings_from(config_path)
    opts = PurgeOptions(
        as_of=_as_of(as_of), log_retention_days=settings.log_retention_days,
        dry_run=dry_run, grace=grace, delete_orphans=delete_orphans,
        orphan_grace=orphan_grace, batch_size=batch_size,
    )
    interactive = sys.stderr.isatty() and not as_json
    with _errors(), recorded_purge(settings.purge.metrics_file, dry_run) as done:
        bar_total = _count_due(settings, opts) if interactive else None
        with _progress(bar_total, "purging", quiet=not interactive) as tick:
            report = run_purge(settings.database, settings.recordings.dir, opts,
                               progress=tick, previous_dirs=settings.recordings.previous_dirs,
                               allow_missing=allow_missing, shared=_shared(settings))
        done(report)  # the node_exporter textfile (purge.metrics_file), if configured
    if as_json:
        # ASCII escapes: a file name that is not UTF-8 must not crash a strict locale.
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        _print_purge(report)
    if report.problems:
        raise NeedsAttention(f"{len(report.problems)} item(s) left alone; see above")


def _count_due(settings: Settings, opts: PurgeOptions) -> int:
    conn = open_log_for(settings)
    try:
        return count_due(conn, opts)
    finally:
        conn.close()


_DRY_VERBS = {
    "recording_deleted": "would delete recording",
    "recording_missing": "would mark missing recording",
    "redacted": "would redact row",
    "caller_cleared": "would clear callback number",
    "orphan_deleted": "would delete orphan",
    "orphan_found": "orphan, kept",
}


def _print_purge(report: PurgeReport) -> None:
    c = report.counts
    verb = "would" if report.dry_run else "did"
    if report.dry_run:
        for action, seq, path in report.items:
            what = f"seq {seq}" if seq is not None else ""
            where = show_path(path) if path else ""
            click.echo(f"{_DRY_VERBS.get(action, action)}: {what}{' ' if what and where else ''}"
                       f"{where}")
    _echo_list(report.warnings, "warning")
    _echo_list(report.problems, "problem")
    recovered = (f"; finished {report.recovered} deletion(s) of an interrupted run"
                 if report.recovered else "")
    click.echo(
        f"purge run {report.run_id} ({'dry run, ' if report.dry_run else ''}as of "
        f"{report.to_json()['as_of']}): {verb} delete {c['recordings_deleted']} recording(s), "
        f"{c['recordings_missing']} missing; redact {c['rows_redacted']} row(s); clear "
        f"{c['callers_cleared']} callback number(s); {c['orphans_found']} orphan(s), "
        f"{c['orphans_deleted']} deleted; {c['in_progress']} in progress kept; "
        f"{c['refused']} left alone{recovered}"
    )


# --- verify ----------------------------------------------------------------------


@click.command("verify")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def verify_command(config_path: str, as_json: bool) -> None:
    """Check the consent log's hash chain from the first row to the last.

    Finds a row that was edited, deleted, inserted or moved, and names the first
    bad one. Redacted rows (after purge or erasure) still verify. Note the head
    hash it prints: comparing it later also proves nothing was cut off the end.

    \b
    Exit codes: 0 the chain is whole, 1 could not read the log, 3 the chain is broken.

    \b
    Example:
      consentivr verify
      consentivr verify --json | jq .head_hash
    """
    settings = settings_from(config_path)
    with _errors():
        conn = open_reader(settings)  # SQLite file or shared PostgreSQL log
        try:
            interactive = sys.stderr.isatty() and not as_json
            total = count_rows(conn) if interactive else None
            with _progress(total, "verifying", quiet=not interactive) as tick:
                report = verify_chain(conn, tick)
        except sqlite3.Error as exc:
            raise StoreError(f"{settings.database}: cannot read the consent log: {exc}") \
                from exc
        finally:
            conn.close()
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    elif report.ok:
        click.echo(f"ok: {report.rows} row(s), {report.redacted} redacted; "
                   f"head seq {report.head_seq} hash {report.head_hash}")
    if not report.ok:
        call = f" (call {report.bad_call_id})" if report.bad_call_id else ""
        raise NeedsAttention(f"chain broken at row seq {report.bad_seq}{call}: {report.problem}")


# --- subject --------------------------------------------------------------------------


@click.group("subject", short_help="Access and erasure requests (GDPR art. 15, 17).")
def subject_group() -> None:
    """Answer a data subject's access (art. 15) or erasure (art. 17) request.

    \b
    Example:
      consentivr subject export --caller +31201234567 --out /root/request-42
      consentivr subject erase --caller +31201234567
    """


@subject_group.command("export")
@config_option
@click.option("--caller", "number", required=True, metavar="NUMBER",
              help="The caller's number in any spelling, e.g. +31201234567 or 020-123 4567.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Write subject.json and copies of the recordings here (a new dir).")
def subject_export(config_path: str, number: str, out: Path | None) -> None:
    """Everything held about a number: the log rows as JSON, plus the recordings.

    Without --out, the rows are printed as JSON and the recordings are only named.

    \b
    Example:
      consentivr subject export --caller +31201234567 --out ./request-42
      consentivr subject export --caller +31201234567 | jq '.rows | length'
    """
    settings = settings_from(config_path)
    key = _key(settings)
    with _errors():
        number = normalise_number(number)
        conn = open_log_for(settings)
        try:
            export = export_subject(conn, settings.recordings.dir, key, number, out,
                                    settings.recordings.previous_dirs)
        finally:
            conn.close()
    if out is None:
        click.echo(json.dumps(export.to_json(), indent=2))
        return
    for path in export.missing:
        click.echo(f"warning: recording {show_path(path)} not found", err=True)
    click.echo(f"wrote {len(export.rows)} row(s) and {len(export.recordings)} recording(s) "
               f"to {show_path(str(out))}")


@subject_group.command("erase")
@config_option
@click.option("--caller", "number", required=True, metavar="NUMBER",
              help="The caller's number in any spelling, e.g. +31201234567 or 020-123 4567.")
@click.option("--yes", "assume_yes", is_flag=True, help="Do not ask for confirmation.")
@click.option("--json", "as_json", is_flag=True, help="Print the erase run's report as JSON.")
@click.option("--allow-missing", is_flag=True,
              help="Erase even when the recordings dir is empty or most files are missing.")
def subject_erase(config_path: str, number: str, assume_yes: bool, as_json: bool,
                  allow_missing: bool) -> None:
    """Erase a number's recordings and personal data now (GDPR art. 17).

    Rows keep their non-personal proof (decision, time, notice version) so the
    hash chain still verifies; the purge log records an 'erase' run with the row
    numbers, nothing that points back to the person.

    \b
    Exit codes: 0 erased (or nothing held), 1 aborted or could not run (the
    recordings dir cannot be opened or looks unmounted: nothing was erased),
    3 a recording was still being written (erase again later), 4 a purge is running.

    \b
    Example:
      consentivr subject erase --caller +31201234567
      consentivr subject erase --caller +31201234567 --yes --json
    """
    settings = settings_from(config_path)
    key = _key(settings)
    with _errors():
        number = normalise_number(number)
        conn = open_log_for(settings)
        try:
            plan = erase_plan(conn, key, number)
        finally:
            conn.close()
    if plan.rows == 0:
        click.echo("nothing held about this number")
        return
    if not assume_yes:
        click.confirm(f"Erase {plan.rows} log row(s) and {plan.recordings} recording(s) "
                      "of this caller? This cannot be undone", abort=True, err=True)
    with _errors():
        report = erase_subject(settings.database, settings.recordings.dir, key, number,
                               previous_dirs=settings.recordings.previous_dirs,
                               allow_missing=allow_missing, shared=_shared(settings))
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        _echo_list(report.warnings, "warning")
        _echo_list(report.problems, "problem")
        c = report.counts
        click.echo(f"erase run {report.run_id}: erased {c['rows_redacted']} row(s), deleted "
                   f"{c['recordings_deleted']} recording(s) ({c['recordings_missing']} "
                   "already missing)")
    if report.problems:
        raise NeedsAttention("the erasure is not complete; see above")


# --- callbacks ------------------------------------------------------------------------


@click.group("callbacks")
def callbacks_group() -> None:
    """The quality-survey callback list.

    \b
    Example:
      consentivr callbacks export --by "J. de Vries" > callbacks.csv
      consentivr callbacks done --by "J. de Vries" --from-file called.csv
    """


_BY = click.option("--by", "by", required=True, metavar="NAME",
                   help="Who does this (kept in the audit table, shown by calls show).")


@callbacks_group.command("export")
@config_option
@_BY
@click.option("--format", "fmt", type=click.Choice(["csv", "json"]), default="csv",
              show_default=True)
@click.option("--as-of", type=IsoDate(), metavar="ISO-DATE",
              help="The list as it was (or will be) then.")
def callbacks_export(config_path: str, by: str, fmt: str, as_of: float | None) -> None:
    """Callers who said yes to the callback and are within its retention.

    This is the list the quality team may call, and no one else: a later call
    from the same number that did not say yes takes it off, and so does
    `callbacks done`. One line per number, in E.164. The CSV quotes every field and
    prefixes a field starting with = + - @ (a spreadsheet formula) with ' as OWASP
    advises, so numbers read '+31201234567 there; the JSON has them plain. Each run
    is recorded: when, by whom and how many entries (never the numbers).

    \b
    Example:
      consentivr callbacks export --by "J. de Vries" > callbacks.csv
      consentivr callbacks export --by ops --format json | jq '.[].number'
    """
    settings = settings_from(config_path)
    when = _as_of(as_of)
    with _errors():
        by = staff_name(by)
        conn = open_log_for(settings)
        try:
            rows = callback_list(conn, settings.flows, when, settings.callers.default_region)
            record_export(conn, rows, by, time.time(), when)
        finally:
            conn.close()
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2))
        return
    buf = io.StringIO()
    fields = ["number", "call_id", "flow", "language", "decided_at", "callback_until"]
    writer = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_ALL)
    writer.writerow(fields)
    writer.writerows([_csv_cell(row.get(f)) for f in fields] for row in rows)
    click.echo(buf.getvalue(), nl=False)


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _csv_cell(value: object) -> str:
    """One CSV field a spreadsheet shows as text (OWASP CSV injection).

    Control bytes go (no CR to forge a row, no ESC for the terminal), and a
    field that starts like a formula gets a leading ' so it is never evaluated.
    """
    text = strip_controls("" if value is None else str(value))
    return f"'{text}" if text.startswith(_FORMULA_START) else text


def _ids_from_file(path: str) -> list[str]:
    """One call id a line (``#`` comments), or the CSV of ``callbacks export``."""
    try:
        with click.open_file(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise click.ClickException(f"{path}: {exc.strerror}") from None
    lines = [line.strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if lines and "call_id" in next(csv.reader([lines[0]])):  # the export's (quoted) CSV
        return [row["call_id"].removeprefix("'")
                for row in csv.DictReader(io.StringIO("\n".join(lines))) if row.get("call_id")]
    return lines


@callbacks_group.command("done")
@config_option
@click.argument("call_ids", nargs=-1, metavar="CALL_ID...")
@click.option("--from-file", "from_file", metavar="FILE",
              help="Call ids, one a line, or the CSV of callbacks export ('-': stdin).")
@_BY
@click.option("--json", "as_json", is_flag=True, help="Print one result per id as JSON.")
def callbacks_done(config_path: str, call_ids: tuple[str, ...], from_file: str | None,
                   by: str, as_json: bool) -> None:
    """The callers of these calls have been called back: clear their numbers now.

    Each number is cleared at once (also from that caller's earlier calls), the
    call leaves the next export, and who and when is kept in the audit table.
    An unknown or already cleared id is reported and the others go on.
    Exit code 0: every id cleared (now or before); 3: an id unknown or not a callback.

    \b
    Example:
      consentivr callbacks done --by "J. de Vries" 3f2a9c0d4b1e4c0e9a7d2b6f1e3c5a7b
      consentivr callbacks done --by "J. de Vries" --from-file called.csv
    """
    ids = list(call_ids) + (_ids_from_file(from_file) if from_file else [])
    if not ids:
        raise click.UsageError("give CALL_ID... or --from-file")
    settings = settings_from(config_path)
    with _errors():
        by = staff_name(by)
        conn = open_log_for(settings)
        try:
            results = mark_done(conn, dict.fromkeys(ids), by, time.time())
        finally:
            conn.close()
    words = {DoneStatus.CLEARED: "cleared", DoneStatus.ALREADY_CLEARED: "already cleared",
             DoneStatus.NOT_A_CALLBACK: "no callback asked: nothing to clear",
             DoneStatus.UNKNOWN: "unknown call id"}
    for r in results:
        if as_json:
            click.echo(json.dumps(r.to_json(), sort_keys=True))
        elif r.status is DoneStatus.CLEARED:
            click.echo(f"{r.call_id}: cleared ({r.numbers_cleared} row(s) held the number)")
        else:
            earlier = f" (by {r.done_by} at {r.done_at})" if r.done_by else ""
            click.echo(f"{r.call_id}: {words[r.status]}{earlier}",
                       err=r.status not in (DoneStatus.ALREADY_CLEARED,))
    bad = [r for r in results if r.status in (DoneStatus.UNKNOWN, DoneStatus.NOT_A_CALLBACK)]
    if bad:
        raise NeedsAttention(f"{len(bad)} of {len(results)} id(s) not cleared; see above")


COMMANDS = (purge_command, verify_command, subject_group, callbacks_group)
