"""Reading ``config.yaml`` into :class:`~consentivr.settings.Settings`.

Loading collects every problem, each with file, line, column and dotted key, and
raises one :class:`~consentivr.errors.ConfigError` holding them all. Secrets may be
given inline, as ``*_env`` (an environment variable) or as ``*_file`` (a file); they
never appear in ``repr`` or in error messages. The flows it names are read by
``consentivr.flowfile``.
"""

from __future__ import annotations

import os
import re
import socket
import stat
from collections.abc import Callable, Collection
from pathlib import Path
from typing import TypeVar

import yaml

from consentivr.errors import ConfigError
from consentivr.flowfile import SAFE_SOUND, FlowScope, read_file, read_flows, read_menus
from consentivr.settings import (
    DEFAULT_APP,
    AmiSettings,
    AriSettings,
    CallerSettings,
    Contact,
    MetricsSettings,
    PurgeSettings,
    RecordingSettings,
    Settings,
    WithdrawalSettings,
)
from consentivr.text import one_line
from consentivr.validation import (
    Field,
    Problems,
    UnreadableFile,
    bad_path,
    field_path,
    load_document,
    read_small_file,
)

# --- secrets ----------------------------------------------------------------


T = TypeVar("T")

def _secret(fields: dict[str, Field], name: str, required: bool, parent: Field,
            resolve: bool = True) -> str | None:
    """A secret given inline, as ``*_env`` or as ``*_file``.

    ``resolve=False``: only check how it is given, and return "" instead of reading the
    environment or the file (a command that does not use it needs neither).
    """
    given = [k for k in (name, f"{name}_env", f"{name}_file") if k in fields]
    if len(given) > 1:
        parent.error(f"give only one of {', '.join(given)}")
        return None
    if not given:
        if required:
            parent.error(f"missing required key '{name}' (or '{name}_env', '{name}_file')")
        return None
    key = given[0]
    if not resolve:
        return ""
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
        if bad_path(f, value):
            return None
        path = field_path(f, value)
        try:
            mode = path.stat().st_mode
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                f.error(f"{one_line(str(path))} is readable by others: chmod 600 it")
                return None
            text = read_small_file(path, MAX_SECRET_BYTES)
        except OSError as exc:
            f.error(f"cannot read {one_line(str(path))}: {exc.strerror}")
            return None
        except UnreadableFile as exc:
            f.error(f"{one_line(str(path))}: {exc}")
            return None
        assert isinstance(text, str)
        return text.strip()
    return value


MAX_SECRET_BYTES = 64 * 1024


# --- the service config -----------------------------------------------------

_TOP_KEYS = (
    "ari", "ami", "database", "recordings", "prompts_dir", "flows", "menus", "dialplan",
    "default_flow", "log_retention_days", "caller_key", "caller_key_env", "caller_key_file",
    "recovery", "withdrawal", "metrics", "purge", "controller", "dpo", "callers",
    "database_password", "database_password_env", "database_password_file", "node",
)


# The sections whose secrets a command may need; each command asks for its own.
SECRET_SECTIONS = ("ari", "ami")


def load_settings(path: str | os.PathLike[str], secrets: Collection[str] = SECRET_SECTIONS,
                  require: Collection[str] = ()) -> Settings:
    """Load and check ``config.yaml`` and every dialplan file it names.

    ``secrets``: the sections (``ari``, ``ami``) whose passwords are read from the
    config, the environment or their files. The others are checked for form only and
    get an empty password, so that, say, ``purge`` runs without the ARI and AMI
    passwords in its environment. ``require``: optional sections this use needs
    (``ari`` for ARI mode; FastAGI mode and the admin commands do without it).
    """
    source = Path(path)
    problems = Problems(str(path))
    root = load_document(source, problems)
    if root is None:
        raise ConfigError(problems.sorted())
    fields = root.mapping(required=("database", "recordings", *require), optional=_TOP_KEYS)
    if fields is None:
        raise ConfigError(problems.sorted())
    ari = _ari(fields["ari"], "ari" in secrets) if "ari" in fields else None
    ami = _ami(fields["ami"], "ami" in secrets) if "ami" in fields else None
    database_url, database_password, node = _shared_log(fields, root)
    database = (field_path(fields["database"], fields["database"].string() or ".")
                if "database" in fields and database_url is None else None)
    if database_url is not None:
        database = source.resolve().parent / "postgresql-log-not-a-file"
    recordings = _recordings(fields["recordings"]) if "recordings" in fields else None
    prompts_dir = (field_path(fields["prompts_dir"], fields["prompts_dir"].string() or ".")
                   if "prompts_dir" in fields else source.resolve().parent / "prompts")
    scope = FlowScope(prompts_dir)
    extra_problems: list[str] = []
    # Inline flows may use inline menus; each dialplan file has its own menus.
    menus = read_menus(fields["menus"], scope) if "menus" in fields else {}
    if "flows" in fields:
        read_flows(fields["flows"], scope, menus)
    if "dialplan" in fields:
        for item in fields["dialplan"].items() or []:
            value = item.string()
            if value is not None:
                extra_problems.extend(read_file(field_path(item, value), scope))
    flows = scope.flows
    if not flows and "flows" not in fields and "dialplan" not in fields:
        root.error("missing 'flows' (or 'dialplan' files that define them)")
    default_flow = fields["default_flow"].string() if "default_flow" in fields else None
    if default_flow is not None and flows and default_flow not in flows:
        fields["default_flow"].error(f"no flow named '{default_flow}'")
    log_days = (fields["log_retention_days"].integer(1, 36500)
                if "log_retention_days" in fields else 730)
    key = _secret(fields, "caller_key", required=False, parent=root)
    recovery = (fields["recovery"].choice(("continue", "hangup"))
                if "recovery" in fields else "continue")
    withdrawal = (_withdrawal(fields["withdrawal"]) if "withdrawal" in fields
                  else WithdrawalSettings())
    metrics = _metrics(fields["metrics"]) if "metrics" in fields else None
    purge = _purge(fields["purge"]) if "purge" in fields else PurgeSettings()
    contacts = {k: _contact(fields[k]) for k in ("controller", "dpo") if k in fields}
    callers = _callers(fields["callers"]) if "callers" in fields else CallerSettings()
    lines = problems.sorted() + extra_problems
    if lines:
        raise ConfigError(lines)
    assert database is not None and recordings is not None
    assert log_days is not None
    return Settings(
        source=source.resolve(), ari=ari, ami=ami, database=database, recordings=recordings,
        prompts_dir=prompts_dir, flows=flows,
        default_flow=default_flow or next(iter(flows), ""),
        log_retention_days=log_days, caller_key=key.encode() if key else None,
        menus=dict(scope.menus), recovery=recovery or "continue",
        withdrawal=withdrawal or WithdrawalSettings(),
        metrics=metrics, purge=purge or PurgeSettings(),
        controller=contacts.get("controller"), dpo=contacts.get("dpo"),
        callers=callers or CallerSettings(),
        database_url=database_url, database_password=database_password,
        node=node or socket.gethostname(),
    )


def _shared_log(fields: dict[str, Field], root: Field) -> tuple[str | None, str | None,
                                                                 str | None]:
    """``database: postgresql://user@host:port/dbname``, its password and ``node``."""
    node = None
    if "node" in fields:
        node = fields["node"].string()
        if node is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", node):
            fields["node"].error("a node name is 1-63 letters, digits, '.', '_' or '-'")
            node = None
    text = fields["database"].string() if "database" in fields else None
    if text is None or not text.startswith(("postgresql://", "postgres://")):
        for key in ("database_password", "database_password_env", "database_password_file"):
            if key in fields:
                fields[key].error("only for a PostgreSQL database (database: postgresql://...)")
        return None, None, node
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018  # raises on a bad port
    except ValueError as exc:
        fields["database"].error(f"not a PostgreSQL URL: {exc}")
        return None, None, node
    if parts.password:
        fields["database"].error("no password in the URL: use database_password_env or "
                                 "database_password_file")
    if not parts.path.strip("/"):
        fields["database"].error("name the database: postgresql://user@host:port/dbname")
    if not any(k in fields for k in ("caller_key", "caller_key_env", "caller_key_file")):
        root.error("a shared PostgreSQL log needs caller_key (or _env, _file): every node "
                   "must pseudonymise callers with the same key")
    password = _secret(fields, "database_password", required=False, parent=root)
    return text, password, node



def _section(f: Field, key: str, default: T,
             read: Callable[[Field, str], T | None]) -> T | None:
    """A section with one optional key: ``default`` without it, ``read(field, value)``
    with it; None (a problem was recorded) when the section or the value is wrong."""
    fields = f.mapping(optional=(key,))
    if fields is None:
        return None
    if key not in fields:
        return default
    value = fields[key].string()
    return None if value is None else read(fields[key], value)


def _callers(f: Field) -> CallerSettings | None:
    return _section(f, "default_region", CallerSettings(), _region)


def _region(f: Field, value: str) -> CallerSettings | None:
    from consentivr.callers import regions

    if value.upper() not in regions():
        f.error("expected an ISO 3166 region code that has a numbering plan, "
                "e.g. NL, BE, DE, GB")
        return None
    return CallerSettings(default_region=value.upper())


def _ari(f: Field, resolve: bool = True) -> AriSettings | None:
    fields = f.mapping(required=("url", "username"),
                       optional=("password", "password_env", "password_file", "app",
                                 "connections", "timeout", "rest_over_websocket"))
    if fields is None:
        return None
    url = fields["url"].string() if "url" in fields else None
    if url is not None and not url.startswith(("http://", "https://")):
        fields["url"].error("expected an http:// or https:// URL")
        url = None
    user = fields["username"].string() if "username" in fields else None
    password = _secret(fields, "password", required=True, parent=f, resolve=resolve)
    app = fields["app"].name() if "app" in fields else DEFAULT_APP
    conns = fields["connections"].integer(1, 80) if "connections" in fields else 20
    timeout = fields["timeout"].seconds() if "timeout" in fields else 10.0
    over_ws = (_auto_on_off(fields["rest_over_websocket"]) if "rest_over_websocket" in fields
               else "auto")
    if None in (url, user, password, app, conns, timeout, over_ws):
        return None
    return AriSettings(url=str(url).rstrip("/").removesuffix("/ari"), username=str(user),
                       password=str(password), app=str(app), connections=int(conns or 1),
                       timeout=float(timeout or 1), rest_over_websocket=str(over_ws))


def _auto_on_off(f: Field) -> str | None:
    # Read the raw scalar: YAML 1.1 turns an unquoted on/off into a boolean.
    text = f.node.value if isinstance(f.node, yaml.ScalarNode) else None
    if isinstance(text, str) and text.lower() in ("auto", "on", "off"):
        return text.lower()
    f.error("expected auto, on or off")
    return None


def _ami(f: Field, resolve: bool = True) -> AmiSettings | None:
    fields = f.mapping(required=("host", "port", "username"),
                       optional=("password", "password_env", "password_file", "connections",
                                 "timeout"))
    if fields is None:
        return None
    host = fields["host"].string() if "host" in fields else None
    port = fields["port"].integer(1, 65535) if "port" in fields else None
    user = fields["username"].string() if "username" in fields else None
    password = _secret(fields, "password", required=True, parent=f, resolve=resolve)
    conns = fields["connections"].integer(1, 16) if "connections" in fields else 2
    timeout = fields["timeout"].seconds() if "timeout" in fields else 5.0
    if None in (host, port, user, password, conns, timeout):
        return None
    return AmiSettings(host=str(host), port=int(port or 0), username=str(user),
                       password=str(password), connections=int(conns or 1),
                       timeout=float(timeout or 1))


def _recordings(f: Field) -> RecordingSettings | None:
    fields = f.mapping(required=("dir",), optional=("dir", "options", "previous_dirs"))
    if fields is None or "dir" not in fields:
        return None
    value = fields["dir"].string()
    options = fields["options"].string(allow_empty=True) if "options" in fields else "b"
    if value is None or options is None:
        return None
    if not options.isalnum() and options != "":
        fields["options"].error("expected MixMonitor option letters, e.g. b")
        return None
    previous: list[str] = []
    for item in (fields["previous_dirs"].items() if "previous_dirs" in fields else []):
        old = item.string()
        if old is None:
            continue
        if not old.startswith("/") or "\0" in old:
            item.error("expected an absolute path, as the old log rows spell it")
            continue
        # As spelled, not resolved: the rows hold the old spelling, symlinks and all.
        previous.append(os.path.normpath(old))
    # Not resolved: the dir may be a symlink to a volume, and a symlink that
    # dangles (the volume not mounted) must still name the same dir. The purge
    # reads rows under the resolved spelling too (RecordingsDir).
    base = Path(fields["dir"].problems.file).resolve().parent
    spelled = Path(os.path.normpath(base / os.path.expanduser(value)))
    return RecordingSettings(dir=spelled, options=options, previous_dirs=tuple(previous))


_FEATURE_KEYS = re.compile(r"[0-9*#A-D]{2,8}")


def _withdrawal(f: Field) -> WithdrawalSettings | None:
    fields = f.mapping(optional=("keys", "on_withdraw", "confirmation"))
    if fields is None:
        return None
    default = WithdrawalSettings()
    keys: str | None = default.keys
    if "keys" in fields:
        keys = fields["keys"].string()
        if keys is not None and not _FEATURE_KEYS.fullmatch(keys):
            fields["keys"].error('expected 2 to 8 DTMF keys (0-9, *, #, A-D), e.g. "*9" '
                                 "(quote it; one key could be pressed by accident)")
            keys = None
    action = (fields["on_withdraw"].choice(("delete", "keep")) if "on_withdraw" in fields
              else default.on_withdraw)
    sounds: tuple[str, ...] | None = default.confirmation
    if "confirmation" in fields:
        names = [n.removeprefix("sound:") for n in fields["confirmation"].strings()]
        bad = [n for n in names if not SAFE_SOUND.fullmatch(n)]
        if bad or not names:
            fields["confirmation"].error(
                "expected sound names for Playback(), e.g. [beep, cancelled] (letters, "
                "digits and . / _ - + = @ ~)")
            sounds = None
        else:
            sounds = tuple(names)
    if keys is None or action is None or sounds is None:
        return None
    return WithdrawalSettings(keys=keys, on_withdraw=action, confirmation=sounds)


# --- operations: metrics listener and purge textfile --------------------------

_LISTEN = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(?P<port>[0-9]{1,5})")


def parse_listen(value: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:9468`` for IPv6) -> (host, port); raises ValueError."""
    match = _LISTEN.fullmatch(value.strip())
    port = int(match["port"]) if match else 0
    if match is None or not 1 <= port <= 65535:
        raise ValueError(f"expected host:port, e.g. 127.0.0.1:9468, got {value!r}")
    return match["host"].strip("[]"), port


def _metrics(f: Field) -> MetricsSettings | None:
    fields = f.mapping(required=("listen",))
    if fields is None or "listen" not in fields:
        return None
    value = fields["listen"].string()
    if value is None:
        return None
    try:
        host, port = parse_listen(value)
    except ValueError as exc:
        fields["listen"].error(str(exc))
        return None
    return MetricsSettings(host=host, port=port)


def _purge(f: Field) -> PurgeSettings | None:
    return _section(f, "metrics_file", PurgeSettings(), _purge_textfile)


def _purge_textfile(f: Field, value: str) -> PurgeSettings | None:
    if not value.endswith(".prom"):
        # node_exporter's textfile collector reads only *.prom files.
        f.error("expected a file name ending in .prom (node_exporter reads only those)")
        return None
    return PurgeSettings(metrics_file=field_path(f, value))


_CONTACT_KEYS = ("name", "email", "phone", "address")


def _contact(f: Field) -> Contact | None:
    """``controller:`` or ``dpo:``: a name and how to reach them."""
    fields = f.mapping(required=("name",), optional=_CONTACT_KEYS)
    if fields is None:
        return None
    values = {k: fields[k].string() for k in _CONTACT_KEYS if k in fields}
    if "name" not in fields or None in values.values():
        return None
    return Contact(**values)  # type: ignore[arg-type]
