"""Builders for the retention, subject and audit tests: a real consent log in a
temp dir, real recording files, and a config file the CLI commands can load."""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from consentivr.configfile import load_settings
from consentivr.consentlog import open_consent_log
from consentivr.messages import DecisionRecord, KeyPress
from consentivr.model import Decision
from consentivr.purgelog import open_log, open_log_for
from consentivr.retention import PurgeOptions, PurgeReport, run_purge
from consentivr.settings import Settings
from consentivr.store import CallerKey, ConsentLog
from consentivr.subject import erase_subject

DAY = 86400.0
T0 = 1_750_000_000.0  # 2025-06-15T15:06:40Z: every row is decided at or after this
KEY = b"k"
PGPASS_ENV = "CONSENTIVR_TEST_PGPASS"

CONFIG = """\
ari:
  url: http://127.0.0.1:8088
  username: consentivr
  password: secret
database: {db}
recordings:
  dir: {rec}
log_retention_days: {log_days}
caller_key: k
default_flow: main
flows:
  main:
    languages: [en]
    notice:
      en: {{media: [sound:hello-world]}}
    purposes:
      recording:
        basis: consent
        records: true
        retention_days: 90
        yes_key: "1"
        no_key: "2"
        question:
          en: {{media: [sound:press-1]}}
      callback:
        basis: consent
        callback: true
        retention_days: 30
        yes_key: "1"
        no_key: "2"
        question:
          en: {{media: [sound:press-1]}}
    destination:
      context: from-internal
"""


class CountsCommits(ConsentLog):
    """A SQLite consent log that counts its COMMITs (a batch is one commit)."""

    commits = 0

    def count_commits(self) -> None:
        self.commits = 0
        self.conn.set_trace_callback(self._trace)

    def _trace(self, sql: str) -> None:
        if sql.strip().upper() == "COMMIT":
            self.commits += 1


def record(n: int, *, decided_at: float = T0, caller: str | None = "+31201234567",
           recording: str | None = None, recording_days: float = 90,
           callback: bool = False, callback_days: float = 30) -> DecisionRecord:
    """A completed call ``c<n>``; ``recording`` is the file's full path."""
    decisions = {
        "recording": Decision.YES if recording else Decision.NO,
        "callback": Decision.YES if callback else Decision.NO,
    }
    return DecisionRecord(
        call_id=f"c{n}", channel_id=f"1750000000.{n}", linkedid=f"1750000000.{n}",
        channel_name=f"PJSIP/trunk-{n:08x}", caller=caller, flow="main", language="en",
        notice_version="nv1", started_at=decided_at - 20, decided_at=decided_at,
        keys=(KeyPress("1", decided_at - 5, "recording"),), decisions=decisions,
        retention_until={"recording": decided_at + 90 * DAY,
                         "callback": decided_at + callback_days * DAY},
        recording_path=recording, outcome="completed",
        recording_until=decided_at + recording_days * DAY if recording else None,
        callback_until=decided_at + callback_days * DAY if callback else None,
    )


@dataclass
class Env:
    """A consent log, a recordings dir and a config in one temp dir."""

    root: Path
    log_days: int = 730
    # A shared PostgreSQL log instead of the SQLite file (the ``pg_env`` fixture):
    # the same tests then run against both backends.
    pg_url: str | None = None
    db: Path = field(init=False)
    rec: Path = field(init=False)
    config: Path = field(init=False)

    def __post_init__(self) -> None:
        self.db = self.root / "var" / "consent.db"
        self.rec = self.root / "recordings"
        self.rec.mkdir(parents=True, exist_ok=True)
        self.config = self.root / "config.yaml"
        text = CONFIG.format(db=self.pg_url or self.db, rec=self.rec, log_days=self.log_days)
        if self.pg_url:
            text += f"database_password_env: {PGPASS_ENV}\nnode: n1\n"
        self.config.write_text(text)
        self.key = CallerKey(KEY)
        self._next = 1

    @property
    def settings(self) -> Settings:
        return load_settings(self.config, secrets=())

    @property
    def shared(self) -> Settings | None:
        """The ``shared`` argument of run_purge and erase_subject."""
        return self.settings if self.pg_url else None

    def purge(self, opts: PurgeOptions) -> PurgeReport:
        return run_purge(self.db, self.rec, opts, shared=self.shared)

    def erase(self, number: str, **kw: Any) -> PurgeReport:
        return erase_subject(self.db, self.rec, self.key, number, shared=self.shared, **kw)

    def tamper(self, sql: str, params: tuple[object, ...] = ()) -> None:
        """An attacker's write, straight to the database."""
        conn = sqlite3.connect(self.db) if self.pg_url is None else self.conn()
        try:
            with conn:
                conn.execute(sql, params)
        finally:
            conn.close()

    def open_log(self) -> Any:
        """The log on this Env's backend (close it)."""
        if self.pg_url:
            return open_consent_log(self.settings)
        return ConsentLog(self.db, self.key)

    def add(self, *records: DecisionRecord) -> None:
        if self.pg_url:
            shared = open_consent_log(self.settings)
            try:
                shared.append_many(list(records))
            finally:
                shared.close()
            return
        log = ConsentLog(self.db, self.key)
        try:
            log.append_many(list(records))
        finally:
            log.close()

    def call(self, *, file: str | None = None, mtime: float | None = None,
             content: bytes = b"RIFF....WAVE", **kw: object) -> int:
        """Append one call and write its recording ``file``; ``file=""`` names a
        missing one. Returns the row's seq."""
        n = self._next
        self._next += 1
        path = None
        if file == "":  # a row whose recording file is missing
            path = str(self.rec / f"c{n}.wav")
        elif file is not None:
            path = str(self.rec / file)
            self.write(file, content, mtime=mtime if mtime is not None else T0)
        self.add(record(n, recording=path, **kw))  # type: ignore[arg-type]
        return n

    def write(self, name: str, content: bytes = b"x", mtime: float = T0) -> Path:
        path = self.rec / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        os.utime(path, (mtime, mtime))
        return path

    def conn(self) -> sqlite3.Connection:
        return open_log(self.db) if self.pg_url is None else open_log_for(self.settings)

    def row(self, seq: int) -> sqlite3.Row:
        conn = self.conn()
        try:
            return conn.execute("SELECT * FROM calls WHERE seq=?", (seq,)).fetchone()
        finally:
            conn.close()

    def query(self, sql: str, params: tuple[object, ...] = ()) -> list[sqlite3.Row]:
        conn = self.conn()
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    def files(self) -> set[str]:
        return {str(p.relative_to(self.rec)) for p in self.rec.rglob("*")
                if p.is_file() or p.is_symlink()}


def backend_env(request: Any, tmp_path: Path) -> Env:
    """An Env on the backend of ``request.param`` (sqlite | postgres)."""
    if request.param == "sqlite":
        return Env(tmp_path)
    server = request.getfixturevalue("pg_server")
    request.getfixturevalue("monkeypatch").setenv(PGPASS_ENV, server.password)
    return Env(tmp_path, pg_url=server.new_database())


BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
