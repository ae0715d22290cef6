"""Text that goes to a terminal, a message or a generated file: one safe line.

A file name, a config path or a caller id may hold a newline (a forged dialplan
line or log line), ESC or other control bytes (terminal escapes), or bytes that
are not UTF-8. What consentivr prints or writes shows such text JSON-quoted, so
it stays one line and every odd byte is visible as an escape.
"""

from __future__ import annotations

import json
import unicodedata


def one_line(text: str) -> str:
    """``text`` as is when it is plainly printable, else JSON-quoted (ASCII escapes)."""
    if text.isprintable() and '"' not in text:
        return text
    return json.dumps(text)


def strip_controls(text: str) -> str:
    """``text`` without control or format characters (C0, C1, ESC, bidi overrides...)."""
    if text.isprintable():
        return text
    return "".join(ch for ch in text
                   if ch == " " or unicodedata.category(ch)[0] not in ("C", "Z"))
