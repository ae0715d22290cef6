"""The purge's last run as a node_exporter textfile, so an alert fires when purges stop.

With ``purge: {metrics_file: /var/lib/prometheus/node-exporter/consentivr_purge.prom}``
every real (not dry) ``consentivr purge`` leaves::

    consentivr_purge_last_run_timestamp_seconds      when the last run ended
    consentivr_purge_last_success_timestamp_seconds  when the last clean run ended
    consentivr_purge_success                         1 clean, 0 failed or left items alone
    consentivr_purge_duration_seconds                how long the last run took
    consentivr_purge_items{action="..."}             what the last run did, per counter

A run that could not take the lock (another purge is running) writes nothing: the
other run will. The file is written to a temporary name in the same directory and
renamed over the old one, so node_exporter never reads half a file; the temporary
name does not end in ``.prom``, so node_exporter skips it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from consentivr.purgelog import PurgeBusy
from consentivr.retention import PurgeReport

log = logging.getLogger(__name__)
_LAST_SUCCESS = "consentivr_purge_last_success_timestamp_seconds"
_COUNT_NAME = re.compile(r"[a-z_]+")


def previous_success(path: Path) -> float | None:
    """The last success time an earlier run wrote, if the file has one."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return None
    match = re.search(rf"^{_LAST_SUCCESS} (\S+)$", text, re.MULTILINE)
    try:
        return float(match[1]) if match else None
    except ValueError:
        return None


def render(*, finished_at: float, started_at: float, success: bool,
           counts: Mapping[str, int], last_success: float | None) -> str:
    """The textfile's content (the Prometheus text format)."""
    lines = [
        "# HELP consentivr_purge_last_run_timestamp_seconds When the last purge run ended.",
        "# TYPE consentivr_purge_last_run_timestamp_seconds gauge",
        f"consentivr_purge_last_run_timestamp_seconds {finished_at:.3f}",
        "# HELP consentivr_purge_success 1 if the last purge run finished with nothing "
        "left alone, else 0.",
        "# TYPE consentivr_purge_success gauge",
        f"consentivr_purge_success {1 if success else 0}",
        "# HELP consentivr_purge_duration_seconds How long the last purge run took.",
        "# TYPE consentivr_purge_duration_seconds gauge",
        f"consentivr_purge_duration_seconds {max(0.0, finished_at - started_at):.3f}",
    ]
    if last_success is not None:
        lines += [
            f"# HELP {_LAST_SUCCESS} When the last purge run that succeeded ended.",
            f"# TYPE {_LAST_SUCCESS} gauge",
            f"{_LAST_SUCCESS} {last_success:.3f}",
        ]
    items = {k: v for k, v in counts.items() if _COUNT_NAME.fullmatch(k)}
    if items:
        lines += ["# HELP consentivr_purge_items What the last purge run did, per action.",
                  "# TYPE consentivr_purge_items gauge"]
        lines += [f'consentivr_purge_items{{action="{k}"}} {int(v)}'
                  for k, v in sorted(items.items())]
    return "\n".join(lines) + "\n"


def write_textfile(path: Path, text: str) -> None:
    """Temp file in the same dir, fsync, rename; readable by node_exporter (0644)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        # The service's UMask=0077 would make it 0600; node_exporter runs as its own
        # user, and counts and times hold nothing personal.
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_run(path: Path, *, started_at: float, success: bool,
              counts: Mapping[str, int] | None = None,
              clock: Callable[[], float] = time.time) -> None:
    """Write one run's result, keeping the last success time across failures."""
    finished = clock()
    last = finished if success else previous_success(path)
    write_textfile(path, render(finished_at=finished, started_at=started_at, success=success,
                                counts=counts or {}, last_success=last))


@contextlib.contextmanager
def recorded_purge(path: Path | None, dry_run: bool = False,
                   clock: Callable[[], float] = time.time
                   ) -> Iterator[Callable[[PurgeReport], None]]:
    """Around a purge: ``with recorded_purge(path) as done: done(run_purge(...))``.

    A run that raises is written as failed (then the error goes on); one that
    reports problems is failed too; a busy lock or a dry run writes nothing.
    """
    started = clock()
    reports: list[PurgeReport] = []
    try:
        yield reports.append
    except PurgeBusy:
        raise
    except BaseException:
        if path is not None and not dry_run:
            _quietly(path, started, False, None, clock)
        raise
    if path is None or dry_run or not reports:
        return
    report = reports[-1]
    _quietly(path, started, not report.problems, report.counts, clock)


def _quietly(path: Path, started: float, success: bool, counts: Mapping[str, int] | None,
             clock: Callable[[], float]) -> None:
    """A textfile that cannot be written must not fail the purge: the alert shows it."""
    try:
        write_run(path, started_at=started, success=success, counts=counts, clock=clock)
    except OSError as exc:
        log.warning("purge metrics: cannot write %s: %s",
                                            path, exc.strerror or exc)
