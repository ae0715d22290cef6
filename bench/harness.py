"""Shared parts of the benchmarks in ``bench/``: CPU accounting, percentiles, tables.

Not part of the installed package: ``bench/calls`` and ``bench/log`` import it from
their own directory (Python puts a script's directory first on ``sys.path``).
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a whole process (all its threads), from /proc/<pid>/stat.

    The resolution is one clock tick (10 ms): take deltas over many calls.
    """
    raw = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) may hold spaces or parentheses: split after its ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / CLOCK_TICKS


@dataclass
class CpuMeter:
    """CPU used by one process between ``start()`` and ``stop()``; None if no pid."""

    pid: int | None
    _start: float | None = None
    used: float | None = None

    def start(self) -> None:
        self._start = self._read()

    def stop(self) -> float | None:
        end = self._read()
        if self._start is not None and end is not None:
            self.used = end - self._start
        return self.used

    def _read(self) -> float | None:
        if self.pid is None:
            return None
        try:
            return cpu_seconds(self.pid)
        except (OSError, ValueError, IndexError):
            return None


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100), nearest-rank; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def fmt(value: float | None, digits: int = 1, unit: str = "") -> str:
    """A number for a table cell, or 'n/a'."""
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}{unit}"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: first column left-aligned, the rest right-aligned."""
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        out = [str(c).ljust(w) if i == 0 else str(c).rjust(w)
               for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "  ".join(out).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def filesystem_of(path: Path) -> str:
    """The filesystem type holding ``path`` (e.g. ext4, tmpfs), from /proc/mounts."""
    path = path.resolve()
    best, kind = "", "unknown"
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return kind
    for entry in mounts:
        parts = entry.split()
        if len(parts) < 3:
            continue
        mount_point = parts[1].replace("\\040", " ")
        if (path == Path(mount_point) or Path(mount_point) in path.parents) and \
                len(mount_point) >= len(best):
            best, kind = mount_point, parts[2]
    return kind
