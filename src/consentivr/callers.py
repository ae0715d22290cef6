"""Caller numbers: whatever the trunk sent, read as one E.164 number, or marked.

Trunks send the same caller as ``0611110002``, ``+31611110002`` or
``0031611110002``. The consent log keys a caller by the HMAC of one spelling,
so every number is normalised to E.164 (``+31611110002``) before it is hashed
or kept for a callback. National forms need the country they were dialled in:
``callers.default_region`` in the config (an ISO 3166 code such as ``NL``).

What is not a number is never kept in clear and never called back:

* withheld (``anonymous``, ``restricted``, empty...): the pseudonym column holds
  :data:`WITHHELD`;
* unparseable (letters, control bytes, formulas, too short...): the column holds
  ``unparseable:`` and the HMAC of the raw text, so an erasure request that gives
  that exact text still finds the row.

Parsing uses ``phonenumbers`` (the Python port of Google's libphonenumber).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass

import phonenumbers

WITHHELD = "withheld"
UNPARSEABLE = "unparseable:"

# What PBXes and trunks put in CALLERID(num) when the caller hides the number.
_WITHHELD_WORDS = frozenset({
    "", "anonymous", "anonym", "restricted", "private", "withheld", "unknown",
    "unavailable", "blocked", "<unknown>", "none", "null",
})
# A number as a person or a trunk writes it: digits, one leading +, separators.
# Letters never pass: phonenumbers would read 0800-FLOWERS as digits.
_LOOKS_LIKE_A_NUMBER = re.compile(r"\+?[0-9 ()./\-]{2,40}")
_SEPARATORS = str.maketrans("", "", " ()./-")


@dataclass(frozen=True)
class Caller:
    """One caller number after intake: ``kind`` is e164, withheld or unparseable."""

    kind: str
    e164: str | None = None
    raw: str | None = None  # the text as given (unparseable ones only)


def regions() -> frozenset[str]:
    """The ISO 3166 region codes phonenumbers can read national numbers of."""
    return frozenset(phonenumbers.SUPPORTED_REGIONS)


@functools.lru_cache(maxsize=4096)  # parsing costs ~25 us; the same callers call again
def normalise(raw: str | None, region: str | None) -> Caller:
    """The caller as E.164, or why it is not a number.

    ``region`` reads national forms (``0611110002``) and the international
    prefix (``00``); without it only ``+`` forms are numbers.
    """
    text = (raw or "").strip()
    if text.lower() in _WITHHELD_WORDS:
        return Caller(WITHHELD)
    body = text.removeprefix("tel:")
    if not _LOOKS_LIKE_A_NUMBER.fullmatch(body) or body.count("+") > 1:
        return Caller("unparseable", raw=text)
    try:
        parsed = phonenumbers.parse(body, region)
    except phonenumbers.NumberParseException:
        return Caller("unparseable", raw=text)
    if not phonenumbers.is_possible_number(parsed):
        return Caller("unparseable", raw=text)
    return Caller("e164", phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164))


def spellings(text: str, region: str | None) -> list[str]:
    """Every spelling a row about this number may have been hashed from.

    E.164 first (rows written since normalisation), then the forms trunks sent
    before it: the text as typed, without separators, national, with ``00``.
    """
    forms: list[str] = []
    caller = normalise(text, region)
    if caller.e164 is not None:
        forms.append(caller.e164)
        forms.extend(_old_forms(caller.e164, region))
    stripped = text.strip()
    forms += [stripped, stripped.translate(_SEPARATORS)]
    return list(dict.fromkeys(f for f in forms if f))


def _old_forms(e164: str, region: str | None) -> Iterator[str]:
    parsed = phonenumbers.parse(e164, None)
    national = phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.NATIONAL)
    yield national.translate(_SEPARATORS)
    yield e164.removeprefix("+")
    yield "00" + e164.removeprefix("+")
    if region:
        dialled = phonenumbers.format_out_of_country_calling_number(parsed, region)
        yield dialled.translate(_SEPARATORS)


def callback_number(stored: str | None, region: str | None) -> str | None:
    """A kept number as E.164, or None if it is not one (never exported then)."""
    if stored is None:
        return None
    caller = normalise(stored, region)
    return caller.e164
