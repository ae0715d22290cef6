"""The service config (``config.yaml``) and the flows it names, as frozen dataclasses.

Loading collects every problem, each with file, line, column and dotted key, and
raises one :class:`~consentivr.errors.ConfigError` holding them all.
Secrets may be given inline, as ``*_env`` (an environment variable) or as
``*_file`` (a file); they never appear in ``repr`` or in error messages.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from consentivr.errors import ConfigError
from consentivr.model import Basis, Destination, Flow, LanguageMenu, Prompt, Purpose
from consentivr.validation import Field, Problems, load_document

DEFAULT_APP = "consentivr"


@dataclass(frozen=True)
class AriSettings:
    url: str  # e.g. http://127.0.0.1:8088 (without /ari)
    username: str
    password: str = field(repr=False)
    app: str = DEFAULT_APP
    connections: int = 20  # REST pool: well below http.conf sessionlimit (100)
    timeout: float = 10.0  # seconds for any one REST call


@dataclass(frozen=True)
class AmiSettings:
    host: str
    port: int
    username: str
    password: str = field(repr=False)
    connections: int = 2  # AMI runs one connection's actions one at a time
    timeout: float = 5.0


@dataclass(frozen=True)
class RecordingSettings:
    dir: Path
    # MixMonitor options; 'b' records only while bridged to a person, not the menu.
    options: str = "b"


@dataclass(frozen=True)
class Settings:
    source: Path
    ari: AriSettings
    ami: AmiSettings | None
    database: Path
    recordings: RecordingSettings
    prompts_dir: Path
    flows: Mapping[str, Flow]
    default_flow: str
    log_retention_days: int = 730
    caller_key: bytes | None = field(default=None, repr=False)

    def flow_for(self, name: str | None) -> Flow | None:
        return self.flows.get(name or self.default_flow)


# --- secrets ----------------------------------------------------------------


def _secret(fields: dict[str, Field], name: str, required: bool, parent: Field) -> str | None:
    given = [k for k in (name, f"{name}_env", f"{name}_file") if k in fields]
    if len(given) > 1:
        parent.error(f"give only one of {', '.join(given)}")
        return None
    if not given:
        if required:
            parent.error(f"missing required key '{name}' (or '{name}_env', '{name}_file')")
        return None
    key = given[0]
    f = fields[key]
    value = f.string()
    if value is None:
        return None
    if key.endswith("_env"):
        secret = os.environ.get(value)
        if not secret:
            f.error(f"environment variable {value} is not set")
        return secret
    if key.endswith("_file"):
        path = _path(f, value)
        try:
            mode = path.stat().st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                f.error(f"{path} is readable by others: chmod 600 it")
                return None
            return path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            f.error(f"cannot read {path}: {exc.strerror}")
            return None
    return value


def _path(f: Field, value: str) -> Path:
    base = Path(f.problems.file).resolve().parent
    return (base / os.path.expanduser(value)).resolve()


# --- prompts and flows ------------------------------------------------------


def _media(value: str) -> str:
    """Sound names become ``sound:`` URIs; URIs pass through."""
    return value if ":" in value.split("/")[0] else f"sound:{value}"


def _prompt(f: Field, flow: str, step: str, language: str, prompts_dir: Path) -> Prompt | None:
    """A prompt is ``media`` (Asterisk sounds), ``file`` (the admin's recording) or ``text``."""
    if isinstance(f.node, yaml.ScalarNode):
        value = f.string()  # shorthand: one sound name
        return Prompt(media=(_media(value),)) if value else None
    fields = f.mapping(optional=("media", "file", "text"))
    if fields is None:
        return None
    given = [k for k in ("media", "file", "text") if k in fields]
    if len(given) != 1:
        f.error("give exactly one of media, file or text")
        return None
    kind = given[0]
    if kind == "media":
        return Prompt(media=tuple(_media(m) for m in fields["media"].strings()))
    value = fields[kind].string()
    if value is None:
        return None
    if kind == "file":
        path = _path(fields[kind], value)
        return Prompt(media=(f"sound:{path.with_suffix('')}",))
    # Text is rendered by `consentivr prompts build` into a file at a fixed place.
    return Prompt(media=(f"sound:{prompt_file(prompts_dir, flow, step, language)}",), text=value)


def prompt_file(prompts_dir: Path, flow: str, step: str, language: str) -> Path:
    """Where ``prompts build`` puts a text prompt (without extension)."""
    return prompts_dir / flow / f"{step}-{language}"


def _per_language(
    f: Field, languages: tuple[str, ...], flow: str, step: str, prompts_dir: Path
) -> dict[str, Prompt]:
    result: dict[str, Prompt] = {}
    seen: set[str] = set()
    for language, value in f.entries():
        seen.add(language)
        if language not in languages:
            value.error(f"language '{language}' is not in this flow's languages")
            continue
        prompt = _prompt(value, flow, step, language, prompts_dir)
        if prompt is not None:
            result[language] = prompt
    if isinstance(f.node, yaml.MappingNode):
        for language in languages:
            if language not in seen:
                f.error(f"missing the '{language}' prompt")
    return result


_PURPOSE_KEYS = (
    "basis", "retention_days", "question", "timeout", "retries",
    "yes_key", "no_key", "object_key", "records", "callback", "default",
)


def _purpose(f: Field, name: str, languages: tuple[str, ...], flow: str,
             prompts_dir: Path) -> Purpose | None:
    fields = f.mapping(required=("basis", "retention_days", "question"), optional=_PURPOSE_KEYS)
    if fields is None:
        return None
    basis_text = fields["basis"].choice([b.value for b in Basis]) if "basis" in fields else None
    basis = Basis(basis_text) if basis_text else None
    retention = fields["retention_days"].integer(1, 36500) if "retention_days" in fields else None
    question = (
        _per_language(fields["question"], languages, flow, name, prompts_dir)
        if "question" in fields else {}
    )
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
    if basis is None or retention is None or timeout is None or retries is None:
        return None
    if records is None or callback is None or any(v is None for v in keys.values()):
        return None
    if len(question) != len(languages):
        return None
    return Purpose(
        name=name, basis=basis, retention_days=retention, question=question,
        timeout=timeout, retries=retries, records=records, callback=callback,
        yes_key=keys.get("yes_key"), no_key=keys.get("no_key"),
        object_key=keys.get("object_key"),
    )


_FLOW_KEYS = (
    "languages", "language_menu", "notice", "purposes", "destination",
    "invalid", "numbers", "max_menu_seconds",
)


def parse_flow(f: Field, name: str, prompts_dir: Path) -> Flow | None:
    fields = f.mapping(required=("languages", "notice", "purposes", "destination"),
                       optional=_FLOW_KEYS)
    if fields is None:
        return None
    languages: tuple[str, ...] = ()
    if "languages" in fields:
        languages = tuple(lang.name() or "" for lang in fields["languages"].items())
        if not languages:
            fields["languages"].error("expected at least one language")
        elif len(set(languages)) != len(languages):
            fields["languages"].error("a language is listed twice")
    notice = (_per_language(fields["notice"], languages, name, "notice", prompts_dir)
              if "notice" in fields else {})
    invalid = (_per_language(fields["invalid"], languages, name, "invalid", prompts_dir)
               if "invalid" in fields else {})
    purposes: list[Purpose] = []
    if "purposes" in fields:
        for purpose_name, pf in fields["purposes"].entries():
            if not purpose_name.replace("_", "").isalnum() or not purpose_name.isascii():
                pf.error("purpose names are letters, digits and '_'")
                continue
            purpose = _purpose(pf, purpose_name, languages, name, prompts_dir)
            if purpose is not None:
                purposes.append(purpose)
        if sum(p.records for p in purposes) > 1:
            fields["purposes"].error("only one purpose can have records: true")
        if sum(p.callback for p in purposes) > 1:
            fields["purposes"].error("only one purpose can have callback: true")
    destination = _destination(fields["destination"]) if "destination" in fields else None
    menu = (_language_menu(fields["language_menu"], languages, name, prompts_dir)
            if "language_menu" in fields else None)
    numbers = tuple(fields["numbers"].strings()) if "numbers" in fields else ()
    max_menu = fields["max_menu_seconds"].seconds() if "max_menu_seconds" in fields else 120.0
    if destination is None or not languages or len(notice) != len(languages) or max_menu is None:
        return None
    return Flow(
        name=name, languages=languages, notice=notice, purposes=tuple(purposes),
        destination=destination, language_menu=menu, invalid=invalid, numbers=numbers,
        max_menu_seconds=max_menu,
    )


def _destination(f: Field) -> Destination | None:
    fields = f.mapping(required=("context",), optional=("context", "exten", "priority"))
    if fields is None or "context" not in fields:
        return None
    context = fields["context"].string()
    exten = fields["exten"].string() if "exten" in fields else "s"
    priority = fields["priority"].integer(1, 100000) if "priority" in fields else 1
    if context is None or exten is None or priority is None:
        return None
    return Destination(context=context, exten=exten, priority=priority)


def _language_menu(f: Field, languages: tuple[str, ...], flow: str,
                   prompts_dir: Path) -> LanguageMenu | None:
    fields = f.mapping(required=("prompt", "keys"), optional=("timeout", "retries"))
    if fields is None or "prompt" not in fields or "keys" not in fields:
        return None
    prompt = _prompt(fields["prompt"], flow, "language", languages[0] if languages else "xx",
                     prompts_dir)
    keys: dict[str, str] = {}
    for key, value in fields["keys"].entries():
        if key not in "0123456789*#" or len(key) != 1:
            value.error("expected a DTMF key: 0-9, '*' or '#'")
            continue
        language = value.string()
        if language is not None and language not in languages:
            value.error(f"language '{language}' is not in this flow's languages")
            continue
        if language is not None:
            keys[key] = language
    timeout = fields["timeout"].seconds() if "timeout" in fields else 5.0
    retries = fields["retries"].integer(0, 5) if "retries" in fields else 1
    if prompt is None or timeout is None or retries is None:
        return None
    return LanguageMenu(prompt=prompt, keys=keys, timeout=timeout, retries=retries)


def parse_flows(root: Field, prompts_dir: Path) -> dict[str, Flow]:
    flows: dict[str, Flow] = {}
    for name, f in root.entries():
        if not (name.replace("-", "").replace("_", "").isalnum() and name.isascii()):
            f.error("flow names are letters, digits, '-' and '_'")
            continue
        flow = parse_flow(f, name, prompts_dir)
        if flow is not None:
            flows[name] = flow
    return flows


# --- the service config -----------------------------------------------------

_TOP_KEYS = (
    "ari", "ami", "database", "recordings", "prompts_dir", "flows", "dialplan",
    "default_flow", "log_retention_days", "caller_key", "caller_key_env", "caller_key_file",
)


def load_settings(path: str | os.PathLike[str]) -> Settings:
    """Load and check ``config.yaml`` and every dialplan file it names."""
    source = Path(path)
    problems = Problems(str(path))
    root = load_document(source, problems)
    if root is None:
        raise ConfigError(problems.lines)
    fields = root.mapping(required=("ari", "database", "recordings"), optional=_TOP_KEYS)
    if fields is None:
        raise ConfigError(problems.lines)
    ari = _ari(fields["ari"]) if "ari" in fields else None
    ami = _ami(fields["ami"]) if "ami" in fields else None
    database = _path(fields["database"], fields["database"].string() or ".") \
        if "database" in fields else None
    recordings = _recordings(fields["recordings"]) if "recordings" in fields else None
    prompts_dir = (_path(fields["prompts_dir"], fields["prompts_dir"].string() or ".")
                   if "prompts_dir" in fields else source.resolve().parent / "prompts")
    flows: dict[str, Flow] = {}
    extra_problems: list[str] = []
    if "flows" in fields:
        flows.update(parse_flows(fields["flows"], prompts_dir))
    if "dialplan" in fields:
        for item in fields["dialplan"].items() or []:
            value = item.string()
            if value is None:
                continue
            try:
                flows.update(load_flow_file(_path(item, value), prompts_dir, taken=flows))
            except ConfigError as exc:
                extra_problems.extend(exc.problems)
    if not flows and "flows" not in fields and "dialplan" not in fields:
        root.error("missing 'flows' (or 'dialplan' files that define them)")
    default_flow = fields["default_flow"].string() if "default_flow" in fields else None
    if default_flow is not None and flows and default_flow not in flows:
        fields["default_flow"].error(f"no flow named '{default_flow}'")
    log_days = (fields["log_retention_days"].integer(1, 36500)
                if "log_retention_days" in fields else 730)
    key = _secret(fields, "caller_key", required=False, parent=root)
    lines = problems.lines + extra_problems
    if lines:
        raise ConfigError(lines)
    assert ari is not None and database is not None and recordings is not None
    assert log_days is not None
    return Settings(
        source=source.resolve(), ari=ari, ami=ami, database=database, recordings=recordings,
        prompts_dir=prompts_dir, flows=flows,
        default_flow=default_flow or next(iter(flows), ""),
        log_retention_days=log_days, caller_key=key.encode() if key else None,
    )


def load_flow_file(path: Path, prompts_dir: Path,
                   taken: Mapping[str, Flow] | None = None) -> dict[str, Flow]:
    """Load a dialplan YAML file (``flows:`` at the top)."""
    problems = Problems(str(path))
    root = load_document(path, problems)
    flows: dict[str, Flow] = {}
    if root is not None:
        fields = root.mapping(required=("flows",), optional=("flows", "version"))
        if fields and "version" in fields:
            fields["version"].integer(1, 1)
        if fields and "flows" in fields:
            for name, flow in parse_flows(fields["flows"], prompts_dir).items():
                if taken and name in taken:
                    fields["flows"].error(f"flow '{name}' is defined twice")
                flows[name] = flow
    problems.raise_if_any()
    return flows


def _ari(f: Field) -> AriSettings | None:
    fields = f.mapping(required=("url", "username"),
                       optional=("password", "password_env", "password_file", "app",
                                 "connections", "timeout"))
    if fields is None:
        return None
    url = fields["url"].string() if "url" in fields else None
    if url is not None and not url.startswith(("http://", "https://")):
        fields["url"].error("expected an http:// or https:// URL")
        url = None
    user = fields["username"].string() if "username" in fields else None
    password = _secret(fields, "password", required=True, parent=f)
    app = fields["app"].name() if "app" in fields else DEFAULT_APP
    conns = fields["connections"].integer(1, 80) if "connections" in fields else 20
    timeout = fields["timeout"].seconds() if "timeout" in fields else 10.0
    if None in (url, user, password, app, conns, timeout):
        return None
    return AriSettings(url=str(url).rstrip("/").removesuffix("/ari"), username=str(user),
                       password=str(password), app=str(app), connections=int(conns or 1),
                       timeout=float(timeout or 1))


def _ami(f: Field) -> AmiSettings | None:
    fields = f.mapping(required=("host", "port", "username"),
                       optional=("password", "password_env", "password_file", "connections",
                                 "timeout"))
    if fields is None:
        return None
    host = fields["host"].string() if "host" in fields else None
    port = fields["port"].integer(1, 65535) if "port" in fields else None
    user = fields["username"].string() if "username" in fields else None
    password = _secret(fields, "password", required=True, parent=f)
    conns = fields["connections"].integer(1, 16) if "connections" in fields else 2
    timeout = fields["timeout"].seconds() if "timeout" in fields else 5.0
    if None in (host, port, user, password, conns, timeout):
        return None
    return AmiSettings(host=str(host), port=int(port or 0), username=str(user),
                       password=str(password), connections=int(conns or 1),
                       timeout=float(timeout or 1))


def _recordings(f: Field) -> RecordingSettings | None:
    fields = f.mapping(required=("dir",), optional=("dir", "options"))
    if fields is None or "dir" not in fields:
        return None
    value = fields["dir"].string()
    options = fields["options"].string(allow_empty=True) if "options" in fields else "b"
    if value is None or options is None:
        return None
    if not options.isalnum() and options != "":
        fields["options"].error("expected MixMonitor option letters, e.g. b")
        return None
    return RecordingSettings(dir=_path(fields["dir"], value), options=options)
