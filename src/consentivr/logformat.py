"""Log lines for people (text) or for journald and log shippers (JSON, one object a line).

``serve`` and ``agi`` take ``--log-format json|text``; the default is JSON when
``$JOURNAL_STREAM`` is set (systemd connected stderr to the journal), text otherwise.

A JSON line holds ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``,
``exception`` when there is one, and the fields the caller passed with ``extra=``.
The driver's decision line passes :func:`decision_fields`::

    log.info("decision call=%s ...", ..., extra=decision_fields(record))

which gives ``event``, ``call_id``, ``flow``, ``language``, ``notice_version``,
``decisions`` (purpose -> decision) and ``outcome``. The fields are picked one by
one from the record, so the caller's number (and the channel name, which may hold
it) never reach the log.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

FORMATS = ("json", "text")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# Attributes every LogRecord has: anything else on a record came from ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "taskName"}


class _Decided(Protocol):
    """What :func:`decision_fields` reads of a ``DecisionRecord``."""

    call_id: str
    flow: str
    language: str
    notice_version: str
    decisions: Mapping[str, Any]
    outcome: str


def decision_fields(record: _Decided) -> dict[str, Any]:
    """The ``extra=`` of the decision log line: no caller number, no channel name."""
    return {
        "event": "decision",
        "call_id": record.call_id,
        "flow": record.flow,
        "language": record.language,
        "notice_version": record.notice_version,
        "decisions": {str(k): str(getattr(v, "value", v)) for k, v in record.decisions.items()},
        "outcome": record.outcome,
    }


class JsonFormatter(logging.Formatter):
    """One JSON object per line; ``extra=`` fields become top-level keys."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_") and key not in out:
                out[key] = value
        # exc_text first: the secret redactor (consentivr.redaction) masks it in place.
        if record.exc_text:
            out["exception"] = record.exc_text
        elif record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        # default=str: a field that is not JSON (a Path, an enum) still gives one line.
        return json.dumps(out, ensure_ascii=False, default=str)


def default_format(environ: Mapping[str, str] | None = None) -> str:
    """``json`` under systemd (stderr is the journal), ``text`` on a terminal."""
    env = os.environ if environ is None else environ
    return "json" if env.get("JOURNAL_STREAM") else "text"


def setup_logging(log_format: str | None = None, verbose: bool = False) -> logging.Handler:
    """Send the root logger to stderr in ``log_format`` (None: :func:`default_format`)."""
    fmt = log_format or default_format()
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: expected one of {', '.join(FORMATS)}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_consentivr", False)]:
        root.removeHandler(old)
    handler._consentivr = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    return handler
