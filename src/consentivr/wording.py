"""What text prompts say about config values: placeholders and their wording per language.

A text prompt in a dialplan file may contain placeholders that are filled in from
the same values the rest of consentivr enforces, so what a caller hears cannot
drift from what happens:

    {retention.<purpose>}   that purpose's retention_days as a phrase: "three months",
                            "drie maanden" (30 days = a month, 7 = a week, 365 = a year)
    {yes_key} {no_key} {object_key}
                            in a purpose's question: the key, spoken ("1", "star", "hekje")
    {key.<language>}        in the language menu: the key that picks that language
    {key}                   in one language's part of the language menu: its key

``{{`` and ``}}`` are literal braces. Everything here is pure.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")


@dataclass(frozen=True)
class _Words:
    numbers: tuple[str, ...]  # 1..12 as words; larger numbers stay digits (TTS reads them)
    day: tuple[str, str]  # singular, plural
    week: tuple[str, str]
    month: tuple[str, str]
    year: tuple[str, str]
    star: str
    hash: str
    one: Mapping[str, str]  # unit -> "one <unit>" where the article differs per unit


_WORDS: dict[str, _Words] = {
    "en": _Words(
        numbers=("one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
                 "ten", "eleven", "twelve"),
        day=("day", "days"), week=("week", "weeks"), month=("month", "months"),
        year=("year", "years"), star="star", hash="hash", one={},
    ),
    "nl": _Words(
        # "één", not "een": the article would be read as "a month".
        numbers=("één", "twee", "drie", "vier", "vijf", "zes", "zeven", "acht", "negen",
                 "tien", "elf", "twaalf"),
        # Dutch says "twee jaar", not "twee jaren", for a duration.
        day=("dag", "dagen"), week=("week", "weken"), month=("maand", "maanden"),
        year=("jaar", "jaar"), star="sterretje", hash="hekje", one={},
    ),
    "de": _Words(
        numbers=("ein", "zwei", "drei", "vier", "fünf", "sechs", "sieben", "acht", "neun",
                 "zehn", "elf", "zwölf"),
        day=("Tag", "Tage"), week=("Woche", "Wochen"), month=("Monat", "Monate"),
        year=("Jahr", "Jahre"), star="Stern", hash="Raute",
        # A duration is accusative: "einen Monat", "eine Woche", "ein Jahr".
        one={"day": "einen Tag", "week": "eine Woche", "month": "einen Monat",
             "year": "ein Jahr"},
    ),
    "fr": _Words(
        numbers=("un", "deux", "trois", "quatre", "cinq", "six", "sept", "huit", "neuf",
                 "dix", "onze", "douze"),
        day=("jour", "jours"), week=("semaine", "semaines"), month=("mois", "mois"),
        year=("an", "ans"), star="étoile", hash="dièse",
        one={"week": "une semaine"},
    ),
}

KNOWN_LANGUAGES = tuple(sorted(_WORDS))


def _words(language: str) -> _Words | None:
    """The word table for ``nl``, ``nl_BE``, ``en-GB``...: by the base language."""
    return _WORDS.get(re.split(r"[-_]", language, maxsplit=1)[0].lower())


def has_wording(language: str) -> bool:
    return _words(language) is not None


def retention_phrase(days: int, language: str) -> str:
    """``days`` as a spoken duration: the largest whole unit that divides it exactly.

    A month is 30 days and a year 365, so 90 days is "three months" and 730 is
    "two years"; 45 days stays "45 days". Raises KeyError for an unknown language.
    """
    words = _words(language)
    if words is None:
        raise KeyError(language)
    unit, size = next((u, n) for u, n in (("year", 365), ("month", 30), ("week", 7), ("day", 1))
                      if days % n == 0)
    count = days // size
    singular, plural = getattr(words, unit)
    if count == 1:
        return words.one.get(unit, f"{words.numbers[0]} {singular}")
    number = words.numbers[count - 1] if count <= len(words.numbers) else str(count)
    return f"{number} {plural}"


def key_phrase(key: str, language: str) -> str:
    """A DTMF key as spoken: digits stay digits (the voice reads them), * and # are words."""
    words = _words(language)
    if words is None:
        raise KeyError(language)
    return {"*": words.star, "#": words.hash}.get(key, key)


class PlaceholderError(ValueError):
    """A text has an unknown placeholder or an unmatched brace."""


def placeholders(text: str) -> list[str]:
    """The placeholder names in ``text``, in order. Raises PlaceholderError on bad braces."""
    names: list[str] = []
    for match in _PLACEHOLDER.finditer(text):
        token = match.group(0)
        if token in ("{{", "}}"):
            continue
        if token in ("{", "}"):
            raise PlaceholderError(f"unmatched '{token}' (write '{token * 2}' for a brace)")
        name = match.group(1).strip()
        if not name:
            raise PlaceholderError("empty placeholder {}")
        names.append(name)
    return names


def fill(text: str, values: Mapping[str, str]) -> str:
    """Replace every placeholder; raises PlaceholderError naming an unknown one."""

    def replace(match: re.Match[str]) -> str:
        token = match.group(0)
        if token in ("{{", "}}"):
            return token[0]
        if token in ("{", "}"):
            raise PlaceholderError(f"unmatched '{token}' (write '{token * 2}' for a brace)")
        name = match.group(1).strip()
        if name not in values:
            known = ", ".join("{" + k + "}" for k in sorted(values)) or "none here"
            raise PlaceholderError(f"unknown placeholder {{{name}}} (known: {known})")
        return values[name]

    return _PLACEHOLDER.sub(replace, text)


# "This call is not recorded": the dialplan's fallback when the app is down.
NOT_RECORDED: Mapping[str, str] = {
    "en": "This call is not recorded.",
    "nl": "Dit gesprek wordt niet opgenomen.",
    "de": "Dieses Gespräch wird nicht aufgezeichnet.",
    "fr": "Cet appel n'est pas enregistré.",
}
