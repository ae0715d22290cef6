"""The DPO's report: what the consent log says, gathered into one frozen value.

:func:`gather` reads only aggregates through :class:`~consentivr.logstats.LogStats`
and checks the recordings still held against the files on disk. The result,
:class:`Report`, is plain data (``to_json()``); :mod:`consentivr.reportpage` turns
it into the HTML page. Nothing in a report is personal about a caller: no caller
numbers, call ids, channel names or recording paths, only counts, dates and the
config; the only names are the staff who exported the callback list (accountability).
"""

from __future__ import annotations

import stat
from collections import defaultdict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from consentivr.audit import ChainReport
from consentivr.errors import ConsentivrError
from consentivr.logstats import LogStats, Period
from consentivr.model import Basis, Flow, Purpose
from consentivr.recordingsdir import RecordingsDir, UnsafePath
from consentivr.retention import DAY
from consentivr.settings import Contact, Settings
from consentivr.store import iso

# Every value a purpose's decision can take, in the order the page shows them.
DECISIONS = ("yes", "no", "no_answer", "abandoned", "objected", "not_objected", "error")
WITHDRAWERS = ("caller", "agent")  # always shown; "system" (a voided late consent) if any
# The art. 30 record's fixed parts: keys the page words in its language.
DATA_CATEGORIES = ("caller_pseudonym", "callback_number", "recording_audio", "keys_pressed",
                   "times")
MEASURES = ("opt_in", "pseudonymisation", "hash_chain", "durable_log", "retention_purge",
            "file_permissions", "withdrawal", "subject_rights", "self_hosted")


def parse_day(text: str, option: str, end: bool = False) -> str:
    """``--from``/``--to``: a date (a whole UTC day) or an ISO date-time, as log text.

    ``--to 2026-03-31`` includes that day: the bound is the next midnight.
    """
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ConsentivrError(f"{option} {text!r}: expected a date like 2026-03-31 or an "
                              "ISO date-time like 2026-03-31T12:00:00Z") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    if end and len(text.strip()) == 10:
        when += timedelta(days=1)
    return iso(when.timestamp())


def period_of(start: str | None, end: str | None) -> Period:
    period = Period(parse_day(start, "--from") if start else None,
                    parse_day(end, "--to", end=True) if end else None)
    if period.start and period.end and period.start >= period.end:
        raise ConsentivrError(f"--from {start} is not before --to {end}")
    return period


def iso_week(monday: str) -> str:
    year, week, _ = date.fromisoformat(monday).isocalendar()
    return f"{year}-W{week:02d}"


@dataclass(frozen=True)
class Report:
    generated_at: str
    period: Period
    calls: int
    purposes: tuple[dict[str, Any], ...]  # per flow and purpose: counts, shares, weeks
    withdrawals: dict[str, Any]
    recordings: dict[str, Any]
    retention: dict[str, Any]
    purges: dict[str, Any]
    requests: dict[str, int]
    notices: tuple[dict[str, Any], ...]
    chain: dict[str, Any]
    art30: dict[str, Any]
    weeks: tuple[str, ...] = field(default=())  # every ISO week with calls, in order
    # The survey team's side: each export of the callback list (when, by whom, how
    # many entries) and the numbers cleared by "callbacks done". Staff, not callers.
    callbacks: dict[str, Any] = field(default_factory=dict)

    @property
    def past_retention(self) -> int:
        return int(self.retention["past_retention"])

    def to_json(self) -> dict[str, Any]:
        return {
            "generated_at": self.generated_at,
            "period": {"from": self.period.start, "to": self.period.end},
            "calls": self.calls,
            "weeks": list(self.weeks),
            "purposes": list(self.purposes),
            "withdrawals": self.withdrawals,
            "recordings": self.recordings,
            "retention": self.retention,
            "purges": self.purges,
            "requests": self.requests,
            "notices": list(self.notices),
            "chain": self.chain,
            "art30": self.art30,
            "callbacks": self.callbacks,
        }


def gather(stats: LogStats, settings: Settings, period: Period,
           now: float, verify: bool = True) -> Report:
    """Everything the report shows, as of ``now``.

    The hash chain is verified in a second thread while the database aggregates:
    SQLite releases the GIL, so both cores work.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="verify") as pool:
        chain_job = pool.submit(stats.verify) if verify else None
        calls = stats.total_calls(period)
        purposes, weeks = _purposes(stats, settings.flows, period)
        withdrawals = _withdrawals(stats, period)
        totals = stats.recordings(period)
        recordings = {
            "count": totals.count, "hours": round(totals.seconds / 3600, 2),
            "seconds": round(totals.seconds, 1), "without_duration": totals.without_duration,
        }
        retention = _retention(stats, settings, now)
        purges = _purges(stats, period)
        requests = {"access": stats.access_requests(period),
                    "erasure": stats.erasures(period)}
        notices = _notices(stats, settings.flows, period)
        done = stats.callbacks_done(period)
        callbacks = {"exports": stats.callback_exports(period), "done": done,
                     "numbers_cleared": sum(d["numbers_cleared"] for d in done)}
        chain = _chain(chain_job.result()) if chain_job is not None else {"checked": False}
    return Report(
        generated_at=iso(now), period=period, calls=calls, purposes=tuple(purposes),
        withdrawals=withdrawals, recordings=recordings, retention=retention, purges=purges,
        requests=requests, notices=tuple(notices), chain=chain,
        art30=art30_record(settings), weeks=tuple(weeks), callbacks=callbacks,
    )


def _share(n: int, total: int) -> float:
    return round(n / total, 4) if total else 0.0


def _purposes(stats: LogStats, flows: Mapping[str, Flow],
              period: Period) -> tuple[list[dict[str, Any]], list[str]]:
    by_purpose: dict[tuple[str, str], dict[str, dict[str, int]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(int)))
    all_weeks: set[str] = set()
    for c in stats.decision_counts(period):
        week = iso_week(c.week)
        all_weeks.add(week)
        by_purpose[(c.flow, c.purpose)][week][c.decision] += c.calls
    result = []
    for (flow_name, purpose_name), weeks in sorted(by_purpose.items()):
        counts: dict[str, int] = dict.fromkeys(DECISIONS, 0)
        for week_counts in weeks.values():
            for decision, n in week_counts.items():
                counts[decision] = counts.get(decision, 0) + n
        total = sum(counts.values())
        purpose = _purpose(flows, flow_name, purpose_name)
        result.append({
            "flow": flow_name, "purpose": purpose_name,
            "basis": purpose.basis.value if purpose else None,
            "total": total, "counts": counts,
            "shares": {d: _share(n, total) for d, n in counts.items()},
            "weeks": [{"week": w, "counts": {d: weeks[w].get(d, 0) for d in counts}}
                      for w in sorted(weeks)],
        })
    return result, sorted(all_weeks)


def _purpose(flows: Mapping[str, Flow], flow: str, name: str) -> Purpose | None:
    f = flows.get(flow)
    return next((p for p in f.purposes if p.name == name), None) if f else None


def _withdrawals(stats: LogStats, period: Period) -> dict[str, Any]:
    found = {w.by: w for w in stats.withdrawals(period)}
    by = []
    for who in (*WITHDRAWERS, *sorted(set(found) - set(WITHDRAWERS))):
        w = found.get(who)
        by.append({"by": who, "count": w.count if w else 0,
                   "median_seconds": (round(w.median_seconds, 1)
                                      if w and w.median_seconds is not None else None)})
    return {"total": sum(w["count"] for w in by), "by": by}


def _retention(stats: LogStats, settings: Settings, now: float) -> dict[str, Any]:
    """Every recording the log says is held, checked on disk against its deadline.

    A recording's deadline is its purpose's retention, or the log's own retention
    if that ends first (purge deletes it then too). Only regular files count.
    """
    as_of = iso(now)
    cutoff = iso(now - settings.log_retention_days * DAY)
    held = missing = past = 0
    past_by_flow: dict[str, int] = defaultdict(int)
    oldest: dict[str, Any] | None = None
    with RecordingsDir(settings.recordings.dir) as rec:
        for r in stats.held_recordings():
            try:
                present = stat.S_ISREG(rec.lstat(rec.relative(r.path)).st_mode)
            except (OSError, UnsafePath):
                present = False
            if not present:
                missing += 1
                continue
            held += 1
            log_deadline = _plus_days(r.decided_at, settings.log_retention_days)
            deadline = min(d for d in (r.recording_until, log_deadline) if d)
            if (r.recording_until is not None and r.recording_until <= as_of) \
                    or r.decided_at <= cutoff:
                past += 1
                past_by_flow[r.flow] += 1
            if oldest is None or deadline < oldest["deadline"]:
                purpose = settings.flows[r.flow].recording_purpose \
                    if r.flow in settings.flows else None
                oldest = {"flow": r.flow, "recorded_on": r.decided_at[:10],
                          "deadline": deadline,
                          "retention_days": purpose.retention_days if purpose else None,
                          "overdue": deadline <= as_of}
    return {
        "as_of": as_of, "held": held, "missing": missing, "past_retention": past,
        "past_retention_by_flow": dict(sorted(past_by_flow.items())),
        "oldest": oldest, "log_retention_days": settings.log_retention_days,
        "rows_past_log_retention": stats.rows_past_log_retention(cutoff),
    }


def _plus_days(text: str, days: int) -> str:
    when = datetime.strptime(text[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
    return iso(when.timestamp() + days * DAY)


def _purges(stats: LogStats, period: Period) -> dict[str, Any]:
    runs = stats.purge_runs(period)
    every = runs if period == Period() else stats.purge_runs(Period())
    real = [r for r in every if not r.dry_run and r.status == "done" and r.finished_at]
    problems = [r for r in runs if r.status in ("problems", "interrupted")
                or (r.status == "running" and r is not runs[-1])]
    return {
        "last_success": max((r.finished_at for r in real), default=None),
        "runs": [{
            "run": r.run_id, "started_at": r.started_at, "finished_at": r.finished_at,
            "status": r.status, "dry_run": r.dry_run,
            "recordings_deleted": r.recordings_deleted,
            "recordings_missing": r.recordings_missing, "rows_redacted": r.rows_redacted,
            "callers_cleared": r.callers_cleared, "orphans_found": r.orphans_found,
            "orphans_deleted": r.orphans_deleted, "refused": r.refused,
        } for r in runs],
        "run_count": len(runs),
        "problem_runs": len(problems),
        "recordings_deleted": sum(r.recordings_deleted for r in runs if not r.dry_run),
        "rows_redacted": sum(r.rows_redacted for r in runs if not r.dry_run),
    }


def _notices(stats: LogStats, flows: Mapping[str, Flow],
             period: Period) -> list[dict[str, Any]]:
    result = []
    for n in stats.notice_versions(period):
        flow = flows.get(n.flow)
        current = (flow is not None and n.language in flow.notice
                   and all(n.language in p.question for p in flow.purposes)
                   and flow.notice_version(n.language) == n.version)
        entry: dict[str, Any] = {
            "flow": n.flow, "language": n.language, "version": n.version, "calls": n.calls,
            "first": n.first, "last": n.last, "current": current, "parts": [],
        }
        if current and flow is not None:
            entry["parts"] = [{"step": "notice", **_said(flow.notice[n.language])}] + [
                {"step": p.name, **_said(p.question[n.language])} for p in flow.purposes]
            if n.language in flow.more_info:  # part of the version: what a caller could hear
                entry["parts"].append({"step": "more_info",
                                       **_said(flow.more_info[n.language])})
        result.append(entry)
    return result


def _said(prompt: Any) -> dict[str, Any]:
    return {"text": prompt.text, "media": list(prompt.media) if not prompt.text else []}


def _chain(report: ChainReport) -> dict[str, Any]:
    data = report.to_json()
    data.pop("bad_call_id", None)  # a call id: never in the report
    data["checked"] = True
    return data


def _contact(contact: Contact | None) -> dict[str, str] | None:
    if contact is None:
        return None
    return {k: v for k, v in vars(contact).items() if v}


def art30_record(settings: Settings) -> dict[str, Any]:
    """The record of processing activities (GDPR art. 30(1)) for these flows."""
    purposes = []
    for flow in settings.flows.values():
        for p in flow.purposes:
            if p.records:
                data, recipients = ["recording_audio", "caller_pseudonym", "keys_pressed",
                                    "times"], "staff"
            elif p.callback:
                data, recipients = ["callback_number", "caller_pseudonym", "keys_pressed",
                                    "times"], "quality_team"
            else:
                data, recipients = ["caller_pseudonym", "keys_pressed", "times"], "controller"
            purposes.append({
                "flow": flow.name, "purpose": p.name, "basis": p.basis.value,
                "opt_in": p.basis is Basis.CONSENT, "retention_days": p.retention_days,
                "data": data, "recipients": recipients,
            })
    return {
        "controller": _contact(settings.controller), "dpo": _contact(settings.dpo),
        "data_subjects": "callers",
        "purposes": purposes,
        "data_categories": list(DATA_CATEGORIES),
        "log_retention_days": settings.log_retention_days,
        "transfers": "none",
        "measures": list(MEASURES),
    }


def check_out_path(out: Path) -> None:
    parent = out.resolve().parent
    if not parent.is_dir():
        raise ConsentivrError(f"{out}: the directory {parent} does not exist")
    if out.is_dir():
        raise ConsentivrError(f"{out}: is a directory; give a file name, e.g. report.html")

