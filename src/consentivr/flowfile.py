"""The flow-file loader: flows, menus and prompts from dialplan YAML into ``model`` objects.

Loading collects every problem, each with file, line, column and dotted key, and
raises one :class:`~consentivr.errors.ConfigError` holding them all. A
:class:`FlowScope` keeps flow and menu names unique across the files read into it
(``config.yaml``'s inline flows and every ``dialplan:`` file).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from consentivr.errors import ConfigError
from consentivr.model import (
    DTMF_KEYS,
    ENTRY_CONTEXT,
    Basis,
    Destination,
    Flow,
    LanguageMenu,
    Menu,
    Prompt,
    Purpose,
    flow_context,
    menu_context,
)
from consentivr.prompts import built_digest, default_voice, read_manifest
from consentivr.text import one_line
from consentivr.validation import (
    Field,
    Problems,
    bad_path,
    field_path,
    load_document,
)
from consentivr.wording import (
    KNOWN_LANGUAGES,
    NOT_RECORDED,
    PlaceholderError,
    fill,
    has_wording,
    key_phrase,
    placeholders,
    retention_phrase,
)

# Extensions of sound files that Asterisk's own format modules play.
AUDIO_EXTENSIONS = (
    "wav", "WAV", "wav16", "gsm", "ulaw", "ul", "mu", "pcm", "alaw", "al", "au", "sln",
    "raw", "sln12", "sln16", "sln24", "sln32", "sln44", "sln48", "sln96", "sln192",
    "g722", "g729", "g723", "siren7", "siren14", "ilbc", "ogg", "vox",
)
PROMPT_KEYS = ("media", "file", "text", "voice", "transcript")
PURPOSE_KEYS = (
    "basis", "retention_days", "question", "timeout", "retries",
    "yes_key", "no_key", "object_key", "records", "callback", "default",
)
LANGUAGE_MENU_KEYS = ("prompt", "keys", "timeout", "retries")
DESTINATION_KEYS = ("context", "exten", "priority", "menu")
FLOW_KEYS = (
    "languages", "language_menu", "notice", "purposes", "destination",
    "invalid", "numbers", "max_menu_seconds", "not_recorded",
    "repeat_key", "more_info", "more_info_key", "language_by_country",
)
MENU_KEYS = ("prompt", "options", "timeout", "retries", "invalid", "default")
FILE_KEYS = ("version", "flows", "menus")
# Step names a purpose cannot take: they name the flow's other prompt files.
_RESERVED_STEPS = ("notice", "invalid", "language", "not_recorded", "more_info")
_COUNTRY_CODE = re.compile(r"[1-9][0-9]{0,2}")  # ITU-T E.164 country calling codes

_LANGUAGE = re.compile(r"[a-z]{2,3}(?:[-_][A-Za-z0-9]{2,8})*")
_NAME = re.compile(r"[A-Za-z0-9_-]+")
_CONTEXT = re.compile(r"[A-Za-z0-9_.+-]+")
_EXTEN = re.compile(r"[A-Za-z0-9*#+][A-Za-z0-9*#+_-]*")
_NUMBER = re.compile(r"[A-Za-z0-9*#+][A-Za-z0-9*#+-]*|_[A-Za-z0-9*#+.!\[\]-]+")
_SPECIAL_EXTENS = ("a", "e", "h", "i", "o", "t", "T")
# Asterisk keeps contexts and extensions in 80-byte buffers (AST_MAX_CONTEXT,
# AST_MAX_EXTENSION), the NUL included: longer names are cut or refused.
AST_MAX_CONTEXT = 79
AST_MAX_EXTENSION = 79
# The contexts `dialplan render` writes; a destination must not loop back into them.
_GENERATED = (ENTRY_CONTEXT, flow_context(""), menu_context(""))
# Paths Asterisk gets in Playback(a&b) and sound: URIs: nothing it would split on.
SAFE_SOUND = re.compile(r"[A-Za-z0-9_./+=@~-]+")


def _media(value: str) -> str:
    """Sound names become ``sound:`` URIs; URIs pass through."""
    return value if ":" in value.split("/")[0] else f"sound:{value}"


def prompt_file(prompts_dir: Path, flow: str, step: str, language: str) -> Path:
    """Where ``prompts build`` puts a text prompt (without extension)."""
    return prompts_dir / flow / f"{step}-{language}"


def menu_prompt_dir(menu: str) -> str:
    """The ``flow`` part of ``prompt_file`` for a menu: a '.' no flow name can have."""
    return f"menu.{menu}"


@dataclass
class FlowScope:
    """What parsing needs beyond the node at hand: names taken so far, the manifest."""

    prompts_dir: Path
    flows: dict[str, Flow] = field(default_factory=dict)
    menus: dict[str, Menu] = field(default_factory=dict)
    numbers: dict[str, str] = field(default_factory=dict)  # dialled number -> flow
    where: dict[str, str] = field(default_factory=dict)  # "flow x"/"menu x" -> file:line
    _manifest: dict[str, dict[str, str]] | None = None

    @property
    def manifest(self) -> dict[str, dict[str, str]]:
        if self._manifest is None:
            self._manifest = read_manifest(self.prompts_dir)
        return self._manifest

    def claim(self, kind: str, name: str, parent: Field, f: Field) -> bool:
        """Register a flow or menu name; a second definition is a problem (on its key)."""
        key = f"{kind} {name}"
        node = _key_node_of(parent, name)
        if key in self.where:
            f.problems.add(node, f.path, f"{kind} '{name}' is already defined at "
                                         f"{self.where[key]}")
            return False
        self.where[key] = f"{f.problems.file}:{node.start_mark.line + 1}"
        return True


@dataclass
class _Raw:
    """A prompt as written, before placeholders are filled for its language."""

    node: Field
    media: tuple[str, ...]  # for media and file prompts
    text: str | None  # the text, or the transcript of a media/file prompt
    text_field: Field | None
    voice: str | None
    digest: str | None
    is_text: bool


def _language_code(f: Field) -> str | None:
    value = f.string()
    if value is None:
        return None
    if not _LANGUAGE.fullmatch(value):
        f.error("expected a language code such as nl, en or en_GB")
        return None
    return value


def _read_prompt(f: Field, scope: FlowScope) -> _Raw | None:
    """A prompt is ``media`` (Asterisk sounds), ``file`` (the admin's recording) or ``text``."""
    if isinstance(f.node, yaml.ScalarNode):
        value = f.string()  # shorthand: one sound name
        if value is None or not _playable(f, [value]):
            return None
        return _Raw(f, (_media(value),), None, None, None, None, False)
    fields = f.mapping(optional=PROMPT_KEYS)
    if fields is None:
        return None
    given = [k for k in ("media", "file", "text") if k in fields]
    if len(given) != 1:
        f.error("give exactly one of media, file or text")
        return None
    kind = given[0]
    if "voice" in fields and kind != "text":
        fields["voice"].error("voice goes with text (the voice that speaks it)")
    if "transcript" in fields and kind == "text":
        fields["transcript"].error("transcript goes with media or file (text is its own)")
    if kind == "text":
        text = fields["text"].string()
        voice = fields["voice"].string() if "voice" in fields else None
        if voice is not None and not _NAME.fullmatch(voice.replace("+", "")):
            fields["voice"].error("expected an espeak-ng voice name such as nl, en-gb or en+f3")
            return None
        if text is None:
            return None
        return _Raw(f, (), text, fields["text"], voice, None, True)
    transcript_field = fields.get("transcript")
    transcript = transcript_field.string() if transcript_field else None
    if kind == "media":
        values = fields["media"].strings()
        if not values:
            fields["media"].error("expected at least one sound")
            return None
        if not _playable(fields["media"], values):
            return None
        return _Raw(f, tuple(_media(v) for v in values), transcript, transcript_field,
                    None, None, False)
    value = fields["file"].string()
    if value is None:
        return None
    found = _sound_file(fields["file"], value)
    if found is None:
        return None
    stem, files = found
    digest = hashlib.sha256()
    for path in files:
        try:
            digest.update(path.read_bytes())
        except OSError as exc:
            fields["file"].error(f"cannot read {path}: {exc.strerror}")
            return None
    return _Raw(f, (f"sound:{stem}",), transcript, transcript_field, None,
                digest.hexdigest(), False)


def _playable(f: Field, values: Sequence[str]) -> bool:
    """Sound names the dialplan cannot split on (what ``dialplan render`` refuses)."""
    for value in values:
        uri = _media(value)
        if uri.startswith("sound:") and not SAFE_SOUND.fullmatch(uri.removeprefix("sound:")):
            f.error(f"sound {one_line(value)}: use letters, digits and . / _ - + = @ ~ "
                    "(no spaces, commas, brackets or ${...})")
            return False
    return True


def _sound_file(f: Field, value: str) -> tuple[Path, list[Path]] | None:
    """The sound file(s) a ``file:`` names: with a playable extension, or any such file."""
    if bad_path(f, value):
        return None
    path = field_path(f, value)
    if not SAFE_SOUND.fullmatch(str(path)):
        f.error(f"{one_line(str(path))}: a sound path may only have letters, digits and "
                ". / _ - + = @ ~")
        return None
    suffix = path.suffix[1:]
    if suffix in AUDIO_EXTENSIONS:
        if not path.is_file():
            f.error(f"sound file not found: {path}")
            return None
        return path.with_suffix(""), [path]
    if path.is_file() and suffix:
        f.error(f"Asterisk cannot play .{suffix} files: convert to .wav (8 kHz mono 16-bit), "
                ".gsm, .ulaw or .sln")
        return None
    files = [p for ext in AUDIO_EXTENSIONS if (p := Path(f"{path}.{ext}")).is_file()]
    if not files:
        f.error(f"sound file not found: {path}.wav (or .gsm, .ulaw, .sln...)")
        return None
    return path, files


def _read_per_language(f: Field, languages: tuple[str, ...] | None, scope: FlowScope,
                       what: str, owner: str = "flow") -> dict[str, _Raw]:
    """One prompt per language; a missing language is a problem.

    With ``languages=None`` (a menu's prompt) the keys define the languages.
    """
    result: dict[str, _Raw] = {}
    if not isinstance(f.node, yaml.MappingNode):
        f.error(f"expected a mapping from language to {what}")
        return result
    seen: set[str] = set()
    for language, value in f.entries():
        seen.add(language)
        if languages is None and not _LANGUAGE.fullmatch(language):
            value.problems.add(_key_node_of(f, language), value.path,
                               "expected a language code such as nl, en or en_GB")
            continue
        if languages is not None and language not in languages:
            value.error(f"language '{language}' is not in this {owner}'s languages")
            continue
        raw = _read_prompt(value, scope)
        if raw is not None:
            result[language] = raw
    for language in languages or ():
        if language not in seen:
            f.error(f"missing the '{language}' {what} (every language needs one)")
    return result


def _finish(raw: _Raw, scope: FlowScope, *, where: str, step: str, language: str,
            values: Mapping[str, str] | None,
            required: Sequence[tuple[str, str]] = (), dialplan: bool = False) -> Prompt | None:
    """Fill a prompt's placeholders for its language and check the required ones.

    ``values`` is None when there is no wording for ``language``: then any
    placeholder is a problem. ``required`` lists (placeholder, why) pairs.
    ``dialplan`` prompts are played by Playback() and must be sound files.
    """
    ok = True
    text = raw.text
    if raw.text is not None and raw.text_field is not None:
        try:
            names = set(placeholders(raw.text))
            if values is None and (names or (required and raw.is_text)):
                # Without wording a text cannot state retention or keys: record it instead.
                raise PlaceholderError(
                    f"there is no wording for language '{language}' (known: "
                    f"{', '.join(KNOWN_LANGUAGES)}): use a recorded file, and a transcript "
                    "without placeholders")
            text = fill(raw.text, values or {})
        except PlaceholderError as exc:
            raw.text_field.error(str(exc))
            return None
        for name, why in required if values is not None else ():
            if name not in names:
                raw.text_field.error(why)
                ok = False
    if dialplan and any(not m.startswith("sound:") for m in raw.media):
        raw.node.error("the dialplan plays this with Playback(): use sounds, a file or text")
        ok = False
    if not ok or (text is None and raw.is_text):
        return None
    if raw.is_text:
        assert text is not None
        stem = prompt_file(scope.prompts_dir, where, step, language)
        voice = raw.voice or default_voice(language)
        return Prompt(media=(f"sound:{stem}",), text=text, voice=voice,
                      digest=built_digest(scope.manifest, scope.prompts_dir, stem, text, voice))
    return Prompt(media=raw.media, text=text, digest=raw.digest)


def _wording(language: str, purposes: Mapping[str, int | None],
             keys: Mapping[str, str | None] | None = None) -> dict[str, str] | None:
    """The placeholders every text of a flow may use, or None without wording.

    ``keys`` are the flow's own keys (``repeat_key``, ``more_info_key``): set ones
    may be said in any of its texts.
    """
    if not has_wording(language):
        return None
    values = {
        f"retention.{name}": retention_phrase(days, language) if days else "?"
        for name, days in purposes.items()
    }
    for name, key in (keys or {}).items():
        if key is not None:
            values[name] = key_phrase(key, language)
    return values


@dataclass
class _PurposeDraft:
    name: str
    field: Field
    basis: Basis | None
    retention: int | None
    timeout: float | None
    retries: int | None
    records: bool | None
    callback: bool | None
    keys: dict[str, str | None]
    question: dict[str, _Raw]
    ok: bool  # no problem of its own so far

    def values(self, language: str) -> dict[str, str]:
        return {k: key_phrase(v, language) for k, v in self.keys.items() if v is not None}

    def required(self) -> list[tuple[str, str]]:
        if self.basis is None:
            return []
        if self.basis.needs_opt_in:
            return [(k, f"the question does not say the {k.removesuffix('_key')} key: "
                        f"add {{{k}}}") for k in ("yes_key", "no_key")]
        return [("object_key", "the question does not say how to object: add {object_key}")]


def _purpose(f: Field, name: str, languages: tuple[str, ...], scope: FlowScope) -> _PurposeDraft:
    before = len(f.problems.lines)
    fields = f.mapping(required=("basis", "retention_days", "question"),
                       optional=PURPOSE_KEYS) or {}
    basis_text = fields["basis"].choice([b.value for b in Basis]) if "basis" in fields else None
    basis = Basis(basis_text) if basis_text else None
    retention = fields["retention_days"].integer(1, 36500) if "retention_days" in fields else None
    question = (_read_per_language(fields["question"], languages, scope, "question")
                if "question" in fields else {})
    timeout = fields["timeout"].seconds() if "timeout" in fields else 5.0
    retries = fields["retries"].integer(0, 5) if "retries" in fields else 1
    records = fields["records"].boolean() if "records" in fields else False
    callback = fields["callback"].boolean() if "callback" in fields else False
    keys = {k: fields[k].dtmf_key() for k in ("yes_key", "no_key", "object_key") if k in fields}
    if basis is Basis.CONSENT:
        for k in ("yes_key", "no_key"):
            if k not in fields:
                f.error(f"a consent purpose needs '{k}'")
        if "object_key" in fields:
            fields["object_key"].error("a consent purpose has yes_key and no_key, not object_key")
        if keys.get("yes_key") and keys.get("yes_key") == keys.get("no_key"):
            fields["no_key"].error(f"key '{keys['no_key']}' is already yes_key")
        if "default" in fields:
            default = fields["default"]
            if default._value() is True or default._value() == "yes":
                default.error("a consent purpose cannot default to yes (privacy by default)")
            elif default._value() not in (False, "no"):
                default.error("expected no")
    elif basis is not None:
        if "object_key" not in fields:
            f.error(f"a {basis.value} purpose needs 'object_key' (how the caller objects)")
        for k in ("yes_key", "no_key", "default"):
            if k in fields:
                fields[k].error(f"not used with basis {basis.value}: the caller can only object")
    return _PurposeDraft(
        name=name, field=f, basis=basis, retention=retention, timeout=timeout, retries=retries,
        records=records, callback=callback, keys=keys, question=question,
        ok=len(f.problems.lines) == before,
    )


def _build_purpose(d: _PurposeDraft, questions: dict[str, Prompt],
                   languages: tuple[str, ...]) -> Purpose | None:
    if not d.ok or d.basis is None or d.retention is None or d.timeout is None:
        return None
    if d.retries is None or d.records is None or d.callback is None:
        return None
    if any(v is None for v in d.keys.values()) or len(questions) != len(languages):
        return None
    return Purpose(
        name=d.name, basis=d.basis, retention_days=d.retention, question=questions,
        timeout=d.timeout, retries=d.retries, records=d.records, callback=d.callback,
        yes_key=d.keys.get("yes_key"), no_key=d.keys.get("no_key"),
        object_key=d.keys.get("object_key"),
    )


def _languages(f: Field) -> tuple[str, ...]:
    items = f.items()
    if isinstance(f.node, yaml.SequenceNode) and not items:
        f.error("expected at least one language")
    languages: list[str] = []
    for item in items:
        code = _language_code(item)
        if code is not None and code in languages:
            item.error(f"language '{code}' is listed twice")
        elif code is not None:
            languages.append(code)
    return tuple(languages)


def _numbers(f: Field, flow: str, scope: FlowScope) -> tuple[str, ...]:
    items = f.items() if isinstance(f.node, yaml.SequenceNode) else [f]
    numbers: dict[str, None] = {}  # ordered, and a linear duplicate check
    for item in items:
        value = item.string()
        if value is None:
            continue
        if not _NUMBER.fullmatch(value) or value in _SPECIAL_EXTENS:
            item.error("expected a dialled number or an Asterisk pattern such as _0201234XXX")
            continue
        if len(value) > AST_MAX_EXTENSION:
            item.error(f"at most {AST_MAX_EXTENSION} characters (Asterisk's extension limit)")
            continue
        if value in numbers:
            item.error(f"number '{value}' is listed twice")
            continue
        other = scope.numbers.get(value)
        if other is not None:
            item.error(f"number '{value}' already selects flow '{other}'")
            continue
        scope.numbers[value] = flow
        numbers[value] = None
    return tuple(numbers)




def _parse_flow(f: Field, name: str, scope: FlowScope,
                menus: Mapping[str, Menu | None]) -> Flow | None:
    before = len(f.problems.lines)
    fields = f.mapping(required=("languages", "notice", "purposes", "destination"),
                       optional=FLOW_KEYS)
    if fields is None:
        return None
    languages = _languages(fields["languages"]) if "languages" in fields else ()
    drafts: list[_PurposeDraft] = []
    if "purposes" in fields:
        for purpose_name, pf in fields["purposes"].entries():
            if not re.fullmatch(r"[A-Za-z0-9_]+", purpose_name):
                pf.error("purpose names are letters, digits and '_'")
                continue
            if purpose_name in _RESERVED_STEPS:
                pf.error(f"'{purpose_name}' is reserved: choose another purpose name")
                continue
            drafts.append(_purpose(pf, purpose_name, languages, scope))
        for flag in ("records", "callback"):
            flagged = [d for d in drafts if getattr(d, flag)]
            for d in flagged[1:]:
                d.field.error(f"only one purpose can have {flag}: true "
                              f"('{flagged[0].name}' has it)")
    flow_keys = {k: fields[k].dtmf_key() if k in fields else None
                 for k in ("repeat_key", "more_info_key")}
    wording = {lang: _wording(lang, {d.name: d.retention for d in drafts}, flow_keys)
               for lang in languages}
    notice_required = [
        (f"retention.{d.name}", f"the notice does not state the retention of purpose "
                                f"'{d.name}': add {{retention.{d.name}}}")
        for d in drafts
    ]

    def per_language(key: str, what: str, required: list[tuple[str, str]] = [],  # noqa: B006
                     dialplan: bool = False) -> dict[str, Prompt]:
        if key not in fields or not languages:
            return {}
        raws = _read_per_language(fields[key], languages, scope, what)
        done = {lang: _finish(raw, scope, where=name, step=key, language=lang,
                              values=wording[lang], required=required, dialplan=dialplan)
                for lang, raw in raws.items()}
        return {lang: p for lang, p in done.items() if p is not None}

    notice = per_language("notice", "notice", notice_required)
    invalid = per_language("invalid", "prompt")
    not_recorded = per_language("not_recorded", "prompt", dialplan=True)
    more_info = per_language("more_info", "prompt")
    if "more_info" in fields and "more_info_key" not in fields:
        fields["more_info"].error("missing 'more_info_key': the key that plays it")
    if "more_info_key" in fields and "more_info" not in fields:
        fields["more_info_key"].error("missing 'more_info': the prompt this key plays")
    if "not_recorded" not in fields:
        not_recorded = _default_not_recorded(f, name, languages, scope)
    purposes: list[Purpose] = []
    for d in drafts:
        questions: dict[str, Prompt] = {}
        for lang, raw in d.question.items():
            values = wording[lang]
            if values is not None:
                values = {**values, **d.values(lang)}
            prompt = _finish(raw, scope, where=name, step=d.name, language=lang, values=values,
                             required=d.required())
            if prompt is not None:
                questions[lang] = prompt
        purpose = _build_purpose(d, questions, languages)
        if purpose is not None:
            purposes.append(purpose)
    destination = (_destination(fields["destination"], menus, languages)
                   if "destination" in fields else None)
    menu = (_language_menu(fields["language_menu"], languages, name, scope)
            if "language_menu" in fields else None)
    numbers = _numbers(fields["numbers"], name, scope) if "numbers" in fields else ()
    max_menu = fields["max_menu_seconds"].seconds() if "max_menu_seconds" in fields else 120.0
    _check_flow_keys(fields, flow_keys, drafts, menu)
    by_country = (_language_by_country(fields["language_by_country"], languages)
                  if "language_by_country" in fields else {})
    if len(f.problems.lines) != before or destination is None or max_menu is None:
        return None  # a partial flow must never reach a caller
    return Flow(
        name=name, languages=languages, notice=notice, purposes=tuple(purposes),
        destination=destination, language_menu=menu, invalid=invalid, numbers=numbers,
        max_menu_seconds=max_menu, not_recorded=not_recorded,
        repeat_key=flow_keys["repeat_key"], more_info=more_info,
        more_info_key=flow_keys["more_info_key"], language_by_country=by_country,
    )


def _check_flow_keys(fields: Mapping[str, Field], keys: Mapping[str, str | None],
                     drafts: Sequence[_PurposeDraft], menu: LanguageMenu | None) -> None:
    """``repeat_key`` and ``more_info_key`` must mean nothing else in the flow."""
    taken: dict[str, str] = {}
    for d in drafts:
        for name, key in d.keys.items():
            if key is not None:
                taken.setdefault(key, f"purposes.{d.name}.{name}")
    for key, language in (menu.keys.items() if menu else ()):
        taken.setdefault(key, f"language_menu.keys (language '{language}')")
    for name in ("repeat_key", "more_info_key"):
        key = keys[name]
        if key is None:
            continue
        if key in taken:
            fields[name].error(f"key '{key}' is already {taken[key]}")
        else:
            taken[key] = name


def _language_by_country(f: Field, languages: tuple[str, ...]) -> dict[str, str]:
    """Country calling code -> language: ``{"49": de, "44": en}``."""
    result: dict[str, str] = {}
    for code, value in f.entries():
        if not _COUNTRY_CODE.fullmatch(code):
            value.problems.add(_key_node_of(f, code), value.path,
                               "expected a country calling code: 1 to 3 digits, "
                               'without + or 00 (quote it: "49")')
            continue
        language = value.string()
        if language is None:
            continue
        if language not in languages:
            value.error(f"language '{language}' is not in this flow's languages")
            continue
        result[code] = language
    return result


def _default_not_recorded(f: Field, flow: str, languages: tuple[str, ...],
                          scope: FlowScope) -> dict[str, Prompt]:
    """The built-in "this call is not recorded" text, per language."""
    result: dict[str, Prompt] = {}
    for language in languages:
        text = NOT_RECORDED.get(re.split(r"[-_]", language, maxsplit=1)[0])
        if text is None:
            f.error(f"missing 'not_recorded' for language '{language}': there is no "
                    "built-in text for it")
            continue
        stem = prompt_file(scope.prompts_dir, flow, "not_recorded", language)
        voice = default_voice(language)
        result[language] = Prompt(
            media=(f"sound:{stem}",), text=text, voice=voice,
            digest=built_digest(scope.manifest, scope.prompts_dir, stem, text, voice))
    return result


def _destination(f: Field, menus: Mapping[str, Menu | None],
                 languages: tuple[str, ...]) -> Destination | None:
    """A dialplan location, or ``menu: <name>`` for a menu of this file.

    A menu that is declared but has problems of its own maps to None: the file
    is reported already, so the reference is not.
    """
    fields = f.mapping(optional=DESTINATION_KEYS)
    if fields is None:
        return None
    if "menu" in fields:
        for other in ("context", "exten", "priority"):
            if other in fields:
                fields[other].error("give either menu or context/exten/priority")
        name = fields["menu"].string()
        if name is None:
            return None
        if name in menus and menus[name] is None:
            return None
        menu = menus.get(name)
        if menu is None:
            known = ", ".join(sorted(menus)) or "none in this file"
            fields["menu"].error(f"no menu named '{name}' (menus: {known})")
            return None
        missing = [lang for lang in languages if lang not in menu.prompt]
        if missing:
            fields["menu"].error(f"menu '{name}' has no prompt for "
                                 f"{', '.join(repr(m) for m in missing)}")
            return None
        return Destination(context=menu_context(name))
    if "context" not in fields:
        f.error("missing required key 'context' (or 'menu')")
        return None
    context = fields["context"].string()
    if context is not None and not _CONTEXT.fullmatch(context):
        fields["context"].error("expected a context name: letters, digits, '_', '-', '.', '+'")
        context = None
    elif context is not None and context.startswith(_GENERATED):
        fields["context"].error(f"'{context}' is a generated context: use menu: for a menu")
        context = None
    elif context is not None and len(context) > AST_MAX_CONTEXT:
        fields["context"].error(f"at most {AST_MAX_CONTEXT} characters (Asterisk's limit)")
        context = None
    exten = fields["exten"].string() if "exten" in fields else "s"
    if exten is not None and not _EXTEN.fullmatch(exten):
        fields["exten"].error("expected an extension such as 200, s or sales (no pattern)")
        exten = None
    elif exten is not None and len(exten) > AST_MAX_EXTENSION:
        fields["exten"].error(f"at most {AST_MAX_EXTENSION} characters (Asterisk's limit)")
        exten = None
    priority = fields["priority"].integer(1, 100000) if "priority" in fields else 1
    if context is None or exten is None or priority is None:
        return None
    return Destination(context=context, exten=exten, priority=priority)


def _dtmf_entries(f: Field) -> Iterator[tuple[str, Field]]:
    """Mapping entries keyed by one DTMF key each ("1": ..., "*": ...)."""
    for key, value in f.entries():
        if len(key) != 1 or key not in DTMF_KEYS:
            value.problems.add(_key_node_of(f, key), value.path,
                               "expected one DTMF key: 0-9, '*' or '#' (quote * and #)")
            continue
        yield key, value


def _key_node_of(f: Field, key: str) -> yaml.Node:
    if isinstance(f.node, yaml.MappingNode):
        for key_node, _ in f.node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.value == key:
                return key_node
    return f.node


def _language_menu(f: Field, languages: tuple[str, ...], flow: str,
                   scope: FlowScope) -> LanguageMenu | None:
    """The first menu: one prompt, or one part per language, each in its own voice."""
    before = len(f.problems.lines)
    fields = f.mapping(required=("prompt", "keys"), optional=LANGUAGE_MENU_KEYS)
    if fields is None:
        return None
    if len(languages) < 2:
        f.error("a language menu needs at least two languages")
    keys: dict[str, str] = {}
    if "keys" in fields:
        for key, value in _dtmf_entries(fields["keys"]):
            language = value.string()
            if language is not None and language not in languages:
                value.error(f"language '{language}' is not in this flow's languages")
            elif language is not None:
                keys[key] = language
        if isinstance(fields["keys"].node, yaml.MappingNode) and len(languages) >= 2:
            for language in languages:
                if language not in keys.values():
                    fields["keys"].error(f"language '{language}' has no key")
    first_key = {lang: k for k, lang in reversed(keys.items())}

    def values(language: str) -> dict[str, str] | None:
        if not has_wording(language):
            return None
        # A language without a key is reported on ``keys``; "?" keeps it to one problem.
        result = {f"key.{lang}": key_phrase(first_key[lang], language)
                  if lang in first_key else "?" for lang in languages}
        result["key"] = key_phrase(first_key[language], language) \
            if language in first_key else "?"
        return result

    prompt: Prompt | None = None
    parts: dict[str, Prompt] = {}
    if "prompt" in fields:
        pf = fields["prompt"]
        per_language = isinstance(pf.node, yaml.MappingNode) and not any(
            isinstance(k, yaml.ScalarNode) and k.value in PROMPT_KEYS for k, _ in pf.node.value)
        if per_language:
            for lang, raw in _read_per_language(pf, languages, scope, "part").items():
                part = _finish(raw, scope, where=flow, step="language", language=lang,
                               values=values(lang))
                if part is not None:
                    parts[lang] = part
            ordered = [parts[lang] for lang in languages if lang in parts]
            texts = [p.text for p in ordered if p.text]
            digests = [p.digest for p in ordered]
            prompt = Prompt(
                media=tuple(m for p in ordered for m in p.media),
                text="\n".join(texts) if texts else None,
                digest=(hashlib.sha256("".join(d or "" for d in digests).encode()).hexdigest()
                        if all(digests) else None),
            )
        else:
            raw = _read_prompt(pf, scope)
            language = languages[0] if languages else "en"
            if raw is not None:
                prompt = _finish(raw, scope, where=flow, step="language", language=language,
                                 values=values(language))
    timeout = fields["timeout"].seconds() if "timeout" in fields else 5.0
    retries = fields["retries"].integer(0, 5) if "retries" in fields else 1
    if len(f.problems.lines) != before or prompt is None or timeout is None or retries is None:
        return None
    return LanguageMenu(prompt=prompt, keys=keys, timeout=timeout, retries=retries, parts=parts)


def read_menus(f: Field, scope: FlowScope) -> dict[str, Menu | None]:
    """A file's ``menus:``; options may lead to other menus of the same file."""
    entries = list(f.entries())
    names: set[str] = set()
    for name, mf in entries:
        if not _NAME.fullmatch(name):
            mf.error("menu names are letters, digits, '-' and '_'")
        elif len(menu_context(name)) > AST_MAX_CONTEXT:
            mf.error(f"the menu name is too long: its context {menu_context(name)} must have "
                     f"at most {AST_MAX_CONTEXT} characters (Asterisk's limit)")
        elif scope.claim("menu", name, f, mf):
            names.add(name)
    drafts = {name: _menu_draft(mf, name, scope) for name, mf in entries if name in names}
    # Check references once every menu's languages are known.
    menus: dict[str, Menu] = {}
    for name, draft in drafts.items():
        if draft is None:
            continue
        before = len(draft.field.problems.lines)
        options: dict[str, Destination] = {}
        for key, of in draft.options:
            dest = _menu_destination(of, drafts, draft.languages)
            if dest is not None:
                options[key] = dest
        default = (_menu_destination(draft.default, drafts, draft.languages)
                   if draft.default is not None else None)
        if len(draft.field.problems.lines) == before and draft.ok:
            menus[name] = Menu(name=name, prompt=draft.prompt, options=options,
                               timeout=draft.timeout, retries=draft.retries,
                               invalid=draft.invalid, default=default)
    scope.menus.update(menus)
    # Declared but broken menus map to None, so references to them stay quiet.
    return {name: menus.get(name) for name in names}


@dataclass
class _MenuDraft:
    field: Field
    languages: tuple[str, ...]
    prompt: dict[str, Prompt]
    invalid: dict[str, Prompt]
    options: list[tuple[str, Field]]
    default: Field | None
    timeout: float
    retries: int
    ok: bool


def _menu_draft(f: Field, name: str, scope: FlowScope) -> _MenuDraft | None:
    before = len(f.problems.lines)
    fields = f.mapping(required=("prompt", "options"), optional=MENU_KEYS)
    if fields is None:
        return None
    where = menu_prompt_dir(name)

    def finish(key: str, raws: Mapping[str, _Raw]) -> dict[str, Prompt]:
        done = {lang: _finish(raw, scope, where=where, step=key, language=lang,
                              values={} if has_wording(lang) else None, dialplan=True)
                for lang, raw in raws.items()}
        return {lang: p for lang, p in done.items() if p is not None}

    raws = (_read_per_language(fields["prompt"], None, scope, "prompt")
            if "prompt" in fields else {})
    languages = tuple(raws)
    prompt = finish("prompt", raws)
    invalid = (finish("invalid", _read_per_language(fields["invalid"], languages, scope,
                                                    "prompt", owner="menu"))
               if "invalid" in fields and languages else {})
    options = list(_dtmf_entries(fields["options"])) if "options" in fields else []
    if "options" in fields and isinstance(fields["options"].node, yaml.MappingNode) \
            and not options and len(f.problems.lines) == before:
        fields["options"].error("expected at least one option")
    timeout = fields["timeout"].seconds() if "timeout" in fields else 5.0
    retries = fields["retries"].integer(0, 5) if "retries" in fields else 2
    return _MenuDraft(
        field=f, languages=languages, prompt=prompt, invalid=invalid, options=options,
        default=fields.get("default"), timeout=timeout or 5.0,
        retries=retries if retries is not None else 2,
        ok=len(f.problems.lines) == before,
    )


def _menu_destination(f: Field, drafts: Mapping[str, _MenuDraft | None],
                      languages: tuple[str, ...]) -> Destination | None:
    menus = {name: Menu(name=name, prompt=d.prompt, options={}) if d and d.ok else None
             for name, d in drafts.items()}
    return _destination(f, menus, languages)




def read_flows(root: Field, scope: FlowScope,
                 menus: Mapping[str, Menu | None]) -> dict[str, Flow]:
    flows: dict[str, Flow] = {}
    entries = list(root.entries())
    if not entries and isinstance(root.node, yaml.MappingNode):
        root.error("expected at least one flow")
    for name, f in entries:
        if not _NAME.fullmatch(name):
            f.error("flow names are letters, digits, '-' and '_'")
            continue
        if len(flow_context(name)) > AST_MAX_CONTEXT:
            f.error(f"the flow name is too long: its context {flow_context(name)} must have "
                    f"at most {AST_MAX_CONTEXT} characters (Asterisk's limit)")
            continue
        if not scope.claim("flow", name, root, f):
            continue
        flow = _parse_flow(f, name, scope, menus)
        if flow is not None:
            flows[name] = flow
    scope.flows.update(flows)
    return flows


@dataclass(frozen=True)
class Dialplan:
    """Every flow and menu of some dialplan files, ready to render or build."""

    flows: Mapping[str, Flow]
    menus: Mapping[str, Menu]
    prompts_dir: Path


def read_file(path: Path, scope: FlowScope) -> list[str]:
    """Parse one dialplan file into ``scope``; returns its problems, sorted by line."""
    problems = Problems(str(path))
    root = load_document(path, problems)
    if root is not None:
        fields = root.mapping(required=("flows",), optional=FILE_KEYS)
        if fields is not None:
            if "version" in fields:
                fields["version"].integer(1, 1)
            menus = read_menus(fields["menus"], scope) if "menus" in fields else {}
            if "flows" in fields:
                read_flows(fields["flows"], scope, menus)
    return problems.sorted()


def load_dialplans(paths: Iterable[Path], prompts_dir: Path) -> Dialplan:
    """Load several dialplan files together; raises one ConfigError with every problem."""
    scope = FlowScope(prompts_dir)
    problems: list[str] = []
    for path in paths:
        problems.extend(read_file(Path(path), scope))
    if problems:
        raise ConfigError(problems)
    return Dialplan(flows=dict(scope.flows), menus=dict(scope.menus), prompts_dir=prompts_dir)


def load_flow_file(path: Path, prompts_dir: Path,
                   taken: Mapping[str, Flow] | None = None) -> dict[str, Flow]:
    """Load one dialplan YAML file (``flows:`` at the top) and return its flows."""
    scope = FlowScope(prompts_dir)
    for name, flow in (taken or {}).items():
        scope.where[f"flow {name}"] = "another file"
        for number in flow.numbers:
            scope.numbers[number] = name
    problems = read_file(Path(path), scope)
    if problems:
        raise ConfigError(problems)
    return {name: flow for name, flow in scope.flows.items()}
