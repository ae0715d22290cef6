"""Secret redaction for log records: passwords and keys never reach a log line.

Why a record factory and not only a handler filter: a filter on one handler misses
handlers added later (a syslog handler, pytest's caplog), and a filter on a logger
misses records that propagate from its children. The factory rewrites every record
when it is made, so every handler sees the redacted text.

Two layers:

- every known secret (ARI/AMI passwords, the caller HMAC key, the ARI basic-auth
  token) is replaced wherever it appears, also inside ``repr`` of dicts and in
  exception text;
- ``Secret:``/``password=``/``Authorization:`` style fields are masked whatever their
  value, which covers secrets we were never told about (for example panoramisk's
  ``Fail to send {'Action': 'Login', ..., 'Secret': ...}``).
"""

from __future__ import annotations

import base64
import logging
import re
import threading
import traceback
from collections.abc import Iterable
from typing import Any

MASK = "[redacted]"
# Shorter "secrets" would mask ordinary words; such passwords get a warning instead.
MIN_SECRET_LENGTH = 4

# key: value / key=value / 'key': 'value' for keys that only ever hold secrets.
_FIELD = re.compile(
    r"""(?ix)
    (?P<key>\b(?:secret|password|passwd|authorization|caller_key)\b['"]?\s*[:=]\s*)
    (?P<quote>['"]?)
    (?:basic\s+)?
    (?P<value>[^\s'",}\]]+)
    """
)


class SecretRedactor(logging.Filter):
    """Masks known secrets and secret-looking fields in a log record (never drops it)."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._secrets: tuple[str, ...] = ()
        self.add(*secrets)

    def add(self, *secrets: str | bytes | None) -> list[str]:
        """Learn more secrets; return those too short to redact safely (to warn about)."""
        short: list[str] = []
        found = set(self._secrets)
        for secret in secrets:
            if secret is None:
                continue
            text = secret.decode("utf-8", "replace") if isinstance(secret, bytes) else secret
            text = text.strip()
            if not text:
                continue
            if len(text) < MIN_SECRET_LENGTH:
                short.append(text)
                continue
            found.add(text)
        with self._lock:
            # Longest first, so a secret that contains another is masked whole.
            self._secrets = tuple(sorted(found, key=len, reverse=True))
        return short

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return _FIELD.sub(lambda m: f"{m['key']}{m['quote']}{MASK}", text)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: keep what we can, redacted
            message = f"{record.msg!s} {record.args!r}"
        record.msg = self.redact(message)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        return True


_installed: SecretRedactor | None = None
_install_lock = threading.Lock()


def install(secrets: Iterable[str | bytes | None]) -> SecretRedactor:
    """Redact these secrets in every log record of this process from now on.

    Idempotent: a second call adds its secrets to the same redactor.
    """
    global _installed
    with _install_lock:
        if _installed is None:
            redactor = SecretRedactor()
            previous = logging.getLogRecordFactory()

            def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
                record = previous(*args, **kwargs)
                redactor.filter(record)
                return record

            logging.setLogRecordFactory(factory)
            _installed = redactor
    short = _installed.add(*secrets)
    if short:
        logging.getLogger(__name__).warning(
            "%d configured secret(s) shorter than %d characters cannot be redacted from "
            "logs reliably: use long random secrets", len(short), MIN_SECRET_LENGTH)
    return _installed


def basic_auth_token(username: str, password: str) -> str:
    """The ``Authorization: Basic`` token, which reveals the password: redact it too."""
    return base64.b64encode(f"{username}:{password}".encode()).decode()
