"""JSON log lines (issue 15): the formatter, the decision fields, and ``--log-format``
on a real ``consentivr agi`` process."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from consentivr.logformat import (
    JsonFormatter,
    decision_fields,
    default_format,
    setup_logging,
)
from consentivr.model import Decision
from consentivr.redaction import MASK, SecretRedactor
from tests.rights_fixtures import CONFIG, record

CALLER = "+31201234567"


def make(msg: str, *args: object, extra: dict | None = None,
         exc: BaseException | None = None) -> logging.LogRecord:
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    rec = logging.getLogger("consentivr.test").makeRecord(
        "consentivr.test", logging.WARNING, __file__, 1, msg, args, exc_info, extra=extra)
    return rec


def line(rec: logging.LogRecord) -> dict:
    text = JsonFormatter().format(rec)
    assert "\n" not in text  # one object per line, whatever the message holds
    return json.loads(text)


@pytest.mark.parametrize(("rec", "expected"), [
    (make("plain"), {"message": "plain"}),
    (make("call %s: %d keys", "c1", 2), {"message": "call c1: 2 keys"}),
    (make("two\nlines"), {"message": "two\nlines"}),
    (make("x", extra={"call_id": "c1", "decisions": {"recording": "yes"}}),
     {"message": "x", "call_id": "c1", "decisions": {"recording": "yes"}}),
    (make("x", extra={"path": Path("/a/b"), "decision": Decision.NO}),
     {"path": "/a/b", "decision": "no"}),
    (make("ünï"), {"message": "ünï"}),
])
def test_json_lines(rec: logging.LogRecord, expected: dict) -> None:
    got = line(rec)
    assert {k: got[k] for k in expected} == expected
    assert got["level"] == "warning" and got["logger"] == "consentivr.test"
    assert got["time"].endswith("Z") and got["time"][:2] == "20"
    assert not {"args", "msg", "exc_info", "levelno", "pathname"} & set(got)


def test_an_exception_is_one_field() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError as exc:
        got = line(make("failed", exc=exc))
    assert got["message"] == "failed"
    assert got["exception"].startswith("Traceback") and "RuntimeError: boom" in got["exception"]


def test_the_secret_redactor_still_masks_exception_text() -> None:
    redactor = SecretRedactor(["hunter2hunter2"])
    try:
        raise RuntimeError("login with hunter2hunter2 failed")
    except RuntimeError as exc:
        rec = make("AMI login: %s", "hunter2hunter2", exc=exc)
    redactor.filter(rec)  # what the record factory does in the service
    got = line(rec)
    assert "hunter2hunter2" not in json.dumps(got)
    assert MASK in got["message"] and MASK in got["exception"]


def test_decision_fields_carry_the_decision_and_never_the_caller() -> None:
    rec = record(7, caller=CALLER, recording="/rec/c7.wav")
    fields = decision_fields(rec)
    assert fields == {
        "event": "decision", "call_id": "c7", "flow": "main", "language": "en",
        "notice_version": "nv1", "decisions": {"recording": "yes", "callback": "no"},
        "outcome": "completed",
    }
    got = line(make("decision call=%s", rec.call_id, extra=fields))
    text = json.dumps(got)
    assert got["call_id"] == "c7" and got["decisions"]["recording"] == "yes"
    assert CALLER not in text and "31201234567" not in text
    assert rec.channel_name not in text  # a trunk channel name may hold the number


@pytest.mark.parametrize(("env", "fmt"), [
    ({"JOURNAL_STREAM": "8:12345"}, "json"),
    ({"JOURNAL_STREAM": ""}, "text"),
    ({}, "text"),
])
def test_default_format_follows_journal_stream(env: dict[str, str], fmt: str) -> None:
    assert default_format(env) == fmt


def test_setup_logging_replaces_its_own_handler_only() -> None:
    root = logging.getLogger()
    other = logging.NullHandler()
    root.addHandler(other)
    level = root.level
    try:
        first = setup_logging("json")
        second = setup_logging("text", verbose=True)
        ours = [h for h in root.handlers if getattr(h, "_consentivr", False)]
        assert ours == [second] and first not in root.handlers and other in root.handlers
        assert root.level == logging.DEBUG
        assert not isinstance(second.formatter, JsonFormatter)
        with pytest.raises(ValueError, match="log format"):
            setup_logging("xml")
    finally:
        root.removeHandler(other)
        for h in [h for h in root.handlers if getattr(h, "_consentivr", False)]:
            root.removeHandler(h)
        root.setLevel(level)


# --- the option on a real process -------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _first_line(tmp_path: Path, args: list[str], env: dict[str, str]) -> str:
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG.format(db=tmp_path / "c.db", rec=tmp_path / "rec", log_days=730))
    exe = Path(sys.executable).parent / "consentivr"
    base = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    child = subprocess.Popen(
        [str(exe), "agi", "-c", str(config), "--listen", f"127.0.0.1:{_free_port()}", *args],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env={**base, **env}, text=True)
    try:
        assert child.stderr is not None
        for line in child.stderr:  # the start line; a redaction warning may come first
            if "listening" in line:
                return line
        raise AssertionError("the agi command never said it was listening")
    finally:
        child.send_signal(signal.SIGTERM)
        child.wait(timeout=30)


@pytest.mark.parametrize(("args", "env", "fmt"), [
    (["--log-format", "json"], {}, "json"),
    ([], {"JOURNAL_STREAM": "8:1"}, "json"),
    ([], {}, "text"),
    (["--log-format", "text"], {"JOURNAL_STREAM": "8:1"}, "text"),
])
def test_agi_log_format(tmp_path: Path, args: list[str], env: dict[str, str],
                        fmt: str) -> None:
    first = _first_line(tmp_path, args, env)  # the agi command's start line
    if fmt == "json":
        got = json.loads(first)
        assert got["logger"].startswith("consentivr.") and got["level"] == "info"
    else:
        assert not first.startswith("{") and " INFO consentivr." in first
