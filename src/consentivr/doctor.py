"""``consentivr doctor``: is this install working? The live PBX and the host, checked.

Each check is one :class:`Check`: ok, a warning, skipped (with why), or failed with
the exact fix. ``run_checks`` returns them all, in a fixed order; nothing stops at
the first failure. It reads and writes nothing of consentivr's own state: the
consent log is only stat()ed, and the probe recording is deleted again.

The user model (see :mod:`consentivr.ownership`): Asterisk runs as ``asterisk``;
consentivr (the service and the purge) as ``consentivr``, a member of group
``asterisk``. ``--asterisk-user`` and ``--user`` name others.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import grp
import ipaddress
import os
import pwd
import secrets
import stat
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from panoramisk import Manager

from consentivr.asteriskconfig import PROBE_CONTEXT, PROBE_VARIABLE, probe_file
from consentivr.dialplan import (
    DEFAULT_AGI_URL,
    RENDER_CONTEXT,
    RENDER_VARIABLE,
    RenderOptions,
    render,
    rendered_hash,
)
from consentivr.errors import AmiError, ConsentivrError
from consentivr.model import ENTRY_CONTEXT
from consentivr.prompts import (
    PromptError,
    manifest_key,
    read_manifest,
    text_prompts,
    tool_versions,
    up_to_date,
)
from consentivr.settings import Settings
from consentivr.withdrawalpath import UserEventProbe, check_withdrawal_path

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"
FIX_SNIPPETS = ("consentivr asterisk-config --config {config} --out /etc/asterisk, then "
                "asterisk -rx 'core reload'")


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok | warn | fail | skip
    detail: str
    fix: str = ""

    @property
    def passed(self) -> bool:
        return self.status != FAIL

    def line(self) -> str:
        mark = {OK: "✔", WARN: "!", SKIP: "-", FAIL: "✘"}[self.status]
        text = f"{mark} {self.name}: {self.detail}"
        return text + (f"\n    fix: {self.fix}" if self.fix and self.status != OK else "")

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


class DoctorError(ConsentivrError):
    """A user named with --user/--asterisk-user does not exist."""


@dataclass(frozen=True)
class Account:
    """Who a check is for: a uid and its groups."""

    label: str
    uid: int
    gids: frozenset[int]

    @classmethod
    def parse(cls, spec: str, label: str) -> Account:
        """``user``, ``uid`` or ``user:group,group...`` (numbers allowed: a sandbox's
        ids; a bare uid has only the groups given)."""
        user, _, group = spec.partition(":")
        try:
            entry = pwd.getpwnam(user) if not user.isdigit() else None
        except KeyError:
            raise DoctorError(f"no user {user!r} on this host (--{label})") from None
        uid = entry.pw_uid if entry else int(user)
        gids = {entry.pw_gid} if entry else set()
        if entry:
            gids |= {g.gr_gid for g in grp.getgrall() if entry.pw_name in g.gr_mem}
        for name in filter(None, group.split(",")):
            try:
                gids.add(int(name) if name.isdigit() else grp.getgrnam(name).gr_gid)
            except KeyError:
                raise DoctorError(f"no group {name!r} on this host (--{label})") from None
        return cls(spec, uid, frozenset(gids))

    @classmethod
    def default(cls, name: str, label: str) -> Account:
        """``name`` when it exists, else whoever runs doctor."""
        try:
            return cls.parse(name, label)
        except DoctorError:
            return cls(f"{pwd.getpwuid(os.geteuid()).pw_name} (no user {name!r})",
                       os.geteuid(), frozenset(os.getgroups()) | {os.getegid()})


def may(who: Account, path: Path, want: str) -> bool:
    """Would ``who`` get ``want`` (``r``, ``w``, ``x``) on ``path``, and search every
    dir above it? The kernel's rule for an unprivileged user, from stat()."""
    if who.uid == 0:
        return True
    try:
        for parent in reversed(path.absolute().parents):
            if not _bits(who, parent.stat(), "x"):
                return False
        return _bits(who, path.stat(), want)
    except OSError:
        return False


def _bits(who: Account, st: os.stat_result, want: str) -> bool:
    shift = 6 if st.st_uid == who.uid else 3 if st.st_gid in who.gids else 0
    need = {"r": 4, "w": 2, "x": 1}
    return all(st.st_mode >> shift & need[c] for c in want)


# --------------------------------------------------------------------------- AMI


class _Ami:
    """A short-lived AMI connection with events on (call, user)."""

    def __init__(self, settings: Settings) -> None:
        assert settings.ami is not None
        self.settings = settings.ami
        self._manager: Manager | None = None
        self._probe = UserEventProbe()

    async def login(self, timeout: float = 5.0) -> None:
        ami = self.settings
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def on_login(_m: Manager) -> None:
            if not done.done():
                done.set_result(None)

        self._manager = Manager(loop=asyncio.get_running_loop(), host=ami.host,
                                port=ami.port, username=ami.username, secret=ami.password,
                                events="call,user", encoding="utf8", reconnect_timeout=1,
                                on_login=on_login, ping_delay=10)
        self._manager.register_event("UserEvent", self._on_user_event)
        try:
            self._manager.connect()
            await asyncio.wait_for(done, timeout)
        except (TimeoutError, OSError) as exc:
            raise AmiError(f"AMI {ami.host}:{ami.port}: no login within {timeout:g}s "
                           f"({exc or 'wrong user or secret, or not reachable'})") from None

    def close(self) -> None:
        if self._manager is not None:
            with contextlib.suppress(Exception):
                self._manager.close()

    async def action(self, fields: Mapping[str, str]) -> Any:
        assert self._manager is not None
        try:
            response = await asyncio.wait_for(self._manager.send_action(dict(fields)),
                                              self.settings.timeout)
        except TimeoutError as exc:
            raise AmiError(f"AMI {fields.get('Action')}: no answer") from exc
        first = response[0] if isinstance(response, list) and response else response
        if first is None or not getattr(first, "success", False):
            raise AmiError(f"AMI {fields.get('Action')}: "
                           f"{getattr(first, 'message', None) or 'no response'}")
        return response

    async def probe(self, token: str, timeout: float = 3.0) -> bool:
        return await self._probe.probe(self.action, token, timeout)

    def _on_user_event(self, _m: Manager, message: Mapping[str, Any]) -> None:
        self._probe.heard(message)


def _lines(response: Any) -> list[Mapping[str, Any]]:
    return [m for m in (response if isinstance(response, list) else [response])
            if isinstance(m, Mapping) or hasattr(m, "get")]


# --------------------------------------------------------------------------- checks


@dataclass(frozen=True)
class Options:
    config_path: str
    user: Account
    purge_user: Account
    asterisk: Account
    agi_url: str = DEFAULT_AGI_URL
    probe_wait: float = 8.0


async def run_checks(settings: Settings, options: Options) -> list[Check]:
    """Every check, in order."""
    fix_snippets = FIX_SNIPPETS.format(config=options.config_path)
    checks = [await _ari(settings, fix_snippets)]
    if settings.ami is None:
        checks.append(Check("ami", FAIL, "no ami: section in the config",
                            "add ami: (host, port, username, password_file)"))
    else:
        ami = _Ami(settings)
        try:
            await ami.login()
        except AmiError as exc:
            checks.append(Check("ami", FAIL, str(exc),
                                f"check ami: in {options.config_path} against manager.conf; "
                                + fix_snippets))
        else:
            try:
                checks.append(Check("ami", OK, f"logged in to {settings.ami.host}:"
                                                f"{settings.ami.port} as {settings.ami.username}"))
                checks += await _ami_checks(ami, settings, options, fix_snippets)
            finally:
                ami.close()
    checks += _prompts(settings, options)
    checks += _files(settings, options)
    return checks


async def _ari(settings: Settings, fix: str) -> Check:
    if settings.ari is None:
        return Check("ari", SKIP, "no ari: section: a FastAGI-only config")
    ari = settings.ari
    token = base64.b64encode(f"{ari.username}:{ari.password}".encode()).decode()
    url = f"{ari.url.rstrip('/')}/ari/asterisk/info"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http, \
                http.get(url, headers={"Authorization": f"Basic {token}"}) as resp:
            if resp.status == 401:
                return Check("ari", FAIL, f"{url}: user {ari.username!r} not authorised",
                             "the ari: password must equal ari.conf's; " + fix)
            if resp.status != 200:
                return Check("ari", FAIL, f"{url}: HTTP {resp.status}",
                             "is ARI enabled (ari.conf [general] enabled = yes)? " + fix)
            info = await resp.json()
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        return Check("ari", FAIL, f"{url}: {exc or 'no answer'}",
                     "http.conf needs enabled = yes and the port of ari.url; " + fix)
    version = (info.get("system") or {}).get("version", "?") if isinstance(info, dict) else "?"
    return Check("ari", OK, f"{url}: Asterisk {version}, user {ari.username}")


def _loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


async def _ami_checks(ami: _Ami, settings: Settings, options: Options,
                      fix: str) -> list[Check]:
    checks = [await _http_bind(ami, settings)]
    findings = await check_withdrawal_path(ami.action, ami.probe, settings.withdrawal)
    names = {"feature": "withdrawal feature", "context": "withdrawal context",
             "events": "AMI events"}
    checks += [Check(names.get(f.check, f.check), OK if f.ok else FAIL, f.detail, f.fix)
               for f in findings]
    checks.append(await _dialplan(ami, settings, options, fix))
    checks.append(await _recording_probe(ami, settings, options, fix))
    return checks


async def _http_bind(ami: _Ami, settings: Settings) -> Check:
    if settings.ari is None:
        return Check("http bind", SKIP, "no ari: section")
    try:
        response = await ami.action({"Action": "GetConfig", "Filename": "http.conf",
                                     "Category": "general"})
    except AmiError as exc:
        return Check("http bind", WARN, f"cannot read http.conf ({exc})",
                     "give the AMI user write=system")
    values = [str(v).split("=", 1) for m in _lines(response) for k, v in m.items()
              if str(k).startswith("Line-")]
    binds = [v[1].strip() for v in values if len(v) == 2 and v[0].strip() == "bindaddr"]
    bind = binds[-1] if binds else "0.0.0.0"
    if not _loopback(bind):
        return Check("http bind", WARN, f"Asterisk's HTTP server listens on {bind}: ARI "
                     "controls every call", "http.conf [general] bindaddr = 127.0.0.1")
    return Check("http bind", OK, f"Asterisk's HTTP server listens on {bind} only")


async def _contexts(ami: _Ami, context: str) -> list[Mapping[str, Any]] | None:
    try:
        return _lines(await ami.action({"Action": "ShowDialPlan", "Context": context}))
    except AmiError:
        return None


async def _dialplan(ami: _Ami, settings: Settings, options: Options, fix: str) -> Check:
    mode = "ari" if settings.ari is not None else "agi"
    app = settings.ari.app if settings.ari else "consentivr"
    try:
        fresh = rendered_hash(render(settings.flows, settings.menus,
                                     RenderOptions(app=app, mode=mode,
                                                   agi_url=options.agi_url)))
    except ConsentivrError as exc:
        return Check("dialplan", FAIL, f"cannot render the flows: {exc}",
                     f"consentivr dialplan check --config {options.config_path}")
    if any(f.numbers for f in settings.flows.values()) and \
            await _contexts(ami, ENTRY_CONTEXT) is None:
        return Check("dialplan", FAIL, f"context {ENTRY_CONTEXT} not loaded", fix)
    marker = await _contexts(ami, RENDER_CONTEXT)
    if marker is None:
        return Check("dialplan", FAIL, f"context {RENDER_CONTEXT} not loaded: Asterisk has no "
                     "(current) render of the flows", fix)
    loaded = [str(m.get("AppData", "")).partition("=")[2] for m in marker
              if str(m.get("AppData", "")).startswith(RENDER_VARIABLE + "=")]
    if fresh not in loaded:
        return Check("dialplan", FAIL, f"Asterisk runs render {loaded[-1] if loaded else '?'}, "
                     f"the config renders {fresh} ({mode} mode)", fix)
    return Check("dialplan", OK, f"{ENTRY_CONTEXT} loaded and equal to the current render "
                                 f"({fresh})")


async def _recording_probe(ami: _Ami, settings: Settings, options: Options,
                           fix: str) -> Check:
    token = secrets.token_hex(8)
    path = Path(probe_file(settings, token))
    name = "recordings dir"
    try:
        await ami.action({"Action": "Originate", "Channel": f"Local/s@{PROBE_CONTEXT}",
                          "Application": "Wait", "Data": "3", "Async": "true",
                          "Variable": f"{PROBE_VARIABLE}={token}", "Timeout": "5000"})
    except AmiError as exc:
        return Check(name, FAIL, f"cannot start the probe recording ({exc})",
                     f"the AMI user needs write=originate and the {PROBE_CONTEXT} context: "
                     + fix)
    deadline = asyncio.get_running_loop().time() + options.probe_wait
    try:
        while asyncio.get_running_loop().time() < deadline:
            if path.exists():
                return Check(name, OK, f"Asterisk wrote a probe recording into "
                                       f"{settings.recordings.dir}")
            await asyncio.sleep(0.1)
    finally:
        await asyncio.sleep(0)  # the file may land just after we gave up: remove it too
        with contextlib.suppress(OSError):
            path.unlink()
    return Check(name, FAIL, f"Asterisk wrote no probe recording into "
                             f"{settings.recordings.dir} within {options.probe_wait:g}s",
                 f"install -d -o {_name(options.user)} -g asterisk -m 2770 "
                 f"{settings.recordings.dir} (same absolute path for Asterisk); see the "
                 "Asterisk log for MixMonitor errors")


def _name(who: Account) -> str:
    with contextlib.suppress(KeyError):
        return pwd.getpwuid(who.uid).pw_name
    return str(who.uid)


def _prompts(settings: Settings, options: Options) -> list[Check]:
    items = text_prompts(settings.flows.values(), settings.menus.values())
    if not items:
        return [Check("prompts", SKIP, "the flows have no text prompts")]
    build = f"consentivr prompts build --config {options.config_path}"
    directory = settings.prompts_dir
    manifest = read_manifest(directory)
    missing = [i for i in items if not i.path.is_file()]
    if missing:
        return [Check("prompts", FAIL, f"{len(missing)} of {len(items)} not built, e.g. "
                                       f"{missing[0].path}", build)]
    try:
        tools: str | None = tool_versions()
    except PromptError:
        tools = None
    if tools is not None:
        stale = [i for i in items if not up_to_date(
            i, manifest.get(manifest_key(directory, i.stem)), tools)]
        if stale:
            return [Check("prompts", FAIL, f"{len(stale)} of {len(items)} not current, e.g. "
                                           f"{stale[0].path}", build)]
    unreadable = [i.path for i in items if not may(options.asterisk, i.path, "r")]
    if unreadable:
        return [Check("prompts", FAIL, f"Asterisk's user ({options.asterisk.label}) cannot "
                      f"read {unreadable[0]}",
                      f"chgrp -R asterisk {directory} && chmod -R g+rX {directory} (and g+x "
                      "on the dirs above)")]
    note = "" if tools is not None else " (espeak-ng/sox missing here: currency not checked)"
    return [Check("prompts", OK, f"{len(items)} built, current and readable by "
                                 f"{options.asterisk.label}{note}")]


def _shared_log(settings: Settings) -> Check:
    """A shared PostgreSQL log: reachable, and at this consentivr's schema version."""
    from consentivr.consentlog import open_reader
    from consentivr.errors import StoreError

    try:
        open_reader(settings).close()
    except StoreError as exc:
        return Check("database (PostgreSQL)", FAIL, str(exc),
                     "consentivr db status; consentivr db upgrade (docs/multinode.md)")
    return Check("database (PostgreSQL)", OK, "reachable, schema current")


def _files(settings: Settings, options: Options) -> list[Check]:
    if settings.database_url is not None:  # no local log file (docs/multinode.md)
        return [_shared_log(settings), _secrets(settings, options)]
    checks = []
    db = settings.database
    key = db.with_name(db.name + ".key")
    for who, label in ((options.user, "service"), (options.purge_user, "purge")):
        problems = []
        for path in (db, key, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
            if path.exists() and not may(who, path, "rw"):
                problems.append(str(path))
        if not may(who, db.parent, "wx"):
            problems.insert(0, f"{db.parent} (dir)")
        if problems:
            checks.append(Check(f"database ({label})", FAIL,
                                f"{who.label} cannot read and write {', '.join(problems)}",
                                f"chown {_name(who)}:asterisk {db.parent} && chmod 2750 "
                                f"{db.parent} && chown {_name(who)} {db}* && chmod 600 "
                                f"{db}* (the README's user model)"))
        else:
            what = "database and key" if db.exists() else "the database dir (no log yet)"
            checks.append(Check(f"database ({label})", OK, f"{who.label} can read and write "
                                                            f"{what}"))
    checks.append(_secrets(settings, options))
    return checks


def secret_files(settings: Settings) -> list[Path]:
    """The config itself, every ``*_file`` it names, and the caller key."""
    found = [settings.source]
    with contextlib.suppress(OSError, yaml.YAMLError):
        raw = yaml.safe_load(settings.source.read_text(encoding="utf-8")) or {}
        sections = [raw, *(raw.get(k) or {} for k in ("ari", "ami"))]
        for section in sections:
            if isinstance(section, dict):
                for k, v in section.items():
                    if str(k).endswith("_file") and isinstance(v, str):
                        found.append((settings.source.parent / v).absolute())
    key = settings.database.with_name(settings.database.name + ".key")
    if key.exists():
        found.append(key)
    return found


def _secrets(settings: Settings, options: Options) -> Check:
    problems = []
    for path in secret_files(settings):
        try:
            st = path.stat()
        except OSError as exc:
            problems.append(f"{path}: {exc.strerror}")
            continue
        if st.st_mode & stat.S_IRWXO:
            problems.append(f"{path} is mode {stat.S_IMODE(st.st_mode):o}: others may read it")
        elif st.st_uid not in (0, options.user.uid) and st.st_mode & stat.S_IRWXG:
            problems.append(f"{path} belongs to uid {st.st_uid}, group-readable")
        if not may(options.user, path, "r"):
            problems.append(f"{path}: {options.user.label} cannot read it")
    if problems:
        return Check("secrets", FAIL, "; ".join(problems),
                     f"config: chown root:{_name(options.user)} FILE && chmod 640 FILE; "
                     f"password files and the key: chown {_name(options.user)} FILE && "
                     "chmod 600 FILE")
    return Check("secrets", OK, "config, password files and caller key: not world-readable, "
                                f"readable by {options.user.label}")
