"""What a call flow is: frozen dataclasses built by the config loader.

Nothing here does I/O. The loader (``flowfile.py``) fills these from YAML; the pure
call flow (``flow.py``) reads them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

DTMF_KEYS = frozenset("0123456789*#")


class Basis(StrEnum):
    """The GDPR art. 6 legal basis of a purpose."""

    CONSENT = "consent"  # opt-in: only an explicit yes counts
    PUBLIC_TASK = "public_task"  # announced; the caller may object
    LEGITIMATE_INTEREST = "legitimate_interest"  # announced; the caller may object

    @property
    def needs_opt_in(self) -> bool:
        return self is Basis.CONSENT


class Decision(StrEnum):
    """What the log says about one purpose of one call."""

    YES = "yes"  # explicit consent
    NO = "no"  # explicit refusal
    NO_ANSWER = "no_answer"  # timed out or only invalid keys: privacy by default
    ABANDONED = "abandoned"  # hung up before answering
    ERROR = "error"  # a failure of ours: privacy by default
    OBJECTED = "objected"  # objection-based purpose: the caller objected
    NOT_OBJECTED = "not_objected"  # objection-based purpose: informed, did not object

    @property
    def allows_processing(self) -> bool:
        return self in (Decision.YES, Decision.NOT_OBJECTED)


@dataclass(frozen=True)
class Prompt:
    """Something to play: one or more Asterisk media URIs, played in order.

    ``text`` is what the prompt says, where known; it feeds the notice version.
    ``digest`` is the content hash of the rendered or recorded files, where known.
    """

    media: tuple[str, ...]
    text: str | None = None
    digest: str | None = None
    voice: str | None = None  # the espeak-ng voice of a text prompt (``prompts build``)

    def fingerprint(self) -> dict[str, object]:
        return {"media": list(self.media), "text": self.text, "digest": self.digest}


@dataclass(frozen=True)
class Purpose:
    """One thing we ask or announce, e.g. ``recording`` or ``callback``."""

    name: str
    basis: Basis
    retention_days: int
    question: Mapping[str, Prompt]  # per language
    timeout: float  # seconds to wait for a key after the question ends
    retries: int  # extra attempts after a timeout or an invalid key
    yes_key: str | None = None  # consent
    no_key: str | None = None  # consent
    object_key: str | None = None  # public_task / legitimate_interest
    records: bool = False  # this purpose gates MixMonitor
    callback: bool = False  # a yes keeps the caller's number for a callback

    def decide(self, digit: str) -> Decision | None:
        """The decision a key means, or None for an invalid key."""
        if self.basis.needs_opt_in:
            if digit == self.yes_key:
                return Decision.YES
            if digit == self.no_key:
                return Decision.NO
            return None
        return Decision.OBJECTED if digit == self.object_key else None

    @property
    def silent_decision(self) -> Decision:
        """What silence means: no for consent, go-ahead where only objection counts."""
        return Decision.NO_ANSWER if self.basis.needs_opt_in else Decision.NOT_OBJECTED


@dataclass(frozen=True)
class LanguageMenu:
    prompt: Prompt
    keys: Mapping[str, str]  # digit -> language code
    timeout: float
    retries: int
    # The per-language parts ``prompt`` plays in turn ("Kies 1..." in a Dutch voice,
    # "Press 2..." in an English one); empty when the menu is one single prompt.
    parts: Mapping[str, Prompt] = field(default_factory=dict)


@dataclass(frozen=True)
class Destination:
    """Where the call goes in the dialplan once the menu is done."""

    context: str
    exten: str = "s"
    priority: int = 1


# Every context the rendered dialplan defines starts with this, so one file can be
# included next to an existing dialplan without name clashes.
CONTEXT_PREFIX = "consentivr-"
ENTRY_CONTEXT = f"{CONTEXT_PREFIX}entry"


def flow_context(flow: str) -> str:
    """The dialplan context that runs ``flow`` (``Stasis(app,flow)`` plus the fallback)."""
    return f"{CONTEXT_PREFIX}flow-{flow}"


def menu_context(menu: str) -> str:
    """The dialplan context of a department menu from a dialplan file's ``menus:``."""
    return f"{CONTEXT_PREFIX}menu-{menu}"


@dataclass(frozen=True)
class Menu:
    """A plain DTMF menu after the consent questions, rendered into dialplan.

    The prompt is chosen by ``${CONSENTIVR_LANGUAGE}``; the first language is the
    default. After ``retries`` invalid keys or timeouts the call goes to ``default``
    (or is hung up when there is none).
    """

    name: str
    prompt: Mapping[str, Prompt]  # per language
    options: Mapping[str, Destination]  # DTMF key -> where to go
    timeout: float = 5.0
    retries: int = 2
    invalid: Mapping[str, Prompt] = field(default_factory=dict)  # per language
    default: Destination | None = None


@dataclass(frozen=True)
class Flow:
    name: str
    languages: tuple[str, ...]  # the first is the default
    notice: Mapping[str, Prompt]  # per language
    purposes: tuple[Purpose, ...]  # asked in this order
    destination: Destination
    language_menu: LanguageMenu | None = None
    invalid: Mapping[str, Prompt] = field(default_factory=dict)  # "that key is not valid"
    numbers: tuple[str, ...] = ()  # dialled numbers that select this flow
    max_menu_seconds: float = 120.0  # hard cap on the whole menu: a stuck call ends unrecorded
    # "This call is not recorded", per language: the rendered dialplan plays it when
    # the app is down (STASISSTATUS=FAILED). The app itself does not use it.
    not_recorded: Mapping[str, Prompt] = field(default_factory=dict)
    # Pressed during the notice or a question: the notice again, then that question.
    repeat_key: str | None = None
    # "More information" (say, the full privacy statement), per language, on its own key.
    more_info: Mapping[str, Prompt] = field(default_factory=dict)
    more_info_key: str | None = None
    # Country calling code ("49") -> the language a caller from there starts in.
    language_by_country: Mapping[str, str] = field(default_factory=dict)

    def language_for(self, caller: str | None) -> str:
        """The language a call starts in: by the caller's country code, else the first.

        Only an international number (``+49...`` or ``0049...``) says its country; the
        longest code of ``language_by_country`` it starts with wins ("1" vs "1868").
        """
        default = self.languages[0]
        if not caller or not self.language_by_country:
            return default
        number = caller.strip()
        if number.startswith("+"):
            digits = number[1:]
        elif number.startswith("00"):
            digits = number[2:]
        else:
            return default  # a national number says nothing about a country
        if not digits.isdigit():
            return default
        for length in (3, 2, 1):  # ITU country codes are one to three digits
            language = self.language_by_country.get(digits[:length])
            if language is not None and language in self.languages:
                return language
        return default

    @property
    def callback_purpose(self) -> Purpose | None:
        return next((p for p in self.purposes if p.callback), None)

    @property
    def recording_purpose(self) -> Purpose | None:
        return next((p for p in self.purposes if p.records), None)

    def notice_version(self, language: str) -> str:
        """A content hash of everything the caller hears before deciding, in one language.

        It changes when a text, a file, a key or a retention period changes.
        """
        payload: dict[str, object] = {
            "notice": self.notice[language].fingerprint(),
            "purposes": [
                {
                    "name": p.name,
                    "basis": p.basis.value,
                    "retention_days": p.retention_days,
                    "keys": [p.yes_key, p.no_key, p.object_key],
                    "question": p.question[language].fingerprint(),
                }
                for p in self.purposes
            ],
        }
        # Only when set, so that the versions of flows without them stay what they were.
        if self.repeat_key is not None:
            payload["repeat_key"] = self.repeat_key
        if self.more_info:
            payload["more_info"] = {"key": self.more_info_key,
                                    "prompt": self.more_info[language].fingerprint()}
        blob = json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()
        return hashlib.sha256(blob).hexdigest()[:16]
