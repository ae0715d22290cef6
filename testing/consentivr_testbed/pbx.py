"""A real Asterisk for tests and the demo: a sandboxed test PBX, or an existing one.

``SandboxPbx`` runs Debian testing's (forky) Asterisk inside a ``bwrap`` sandbox whose
root is a cached ``debootstrap`` tree (Debian 12 has no Asterisk package, and the newer
packages need a newer libc than the host has). When forky has no usable Asterisk it
falls back to sid; ``CONSENTIVR_PBX_SUITE`` picks one suite and nothing else. Each
suite has its own cached root, ``<cache>/<suite>-root``. The run dir and any extra ``binds`` are
bind-mounted at the same absolute path inside, so Asterisk and consentivr agree on
every file path (recordings, prompts). All listeners are bound to 127.0.0.1 on free
ports.

``ExternalPbx`` wraps an Asterisk the user runs themselves (see
``external_endpoints_from_env``); it offers the same small interface (``Pbx``).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import json
import logging
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from string import Template
from types import TracebackType
from typing import IO, Protocol, Self
from urllib.parse import urlsplit

from consentivr.errors import ConsentivrError

log = logging.getLogger(__name__)

CACHE_ENV = "CONSENTIVR_PBX_CACHE"
DEFAULT_CACHE_DIR = Path("/var/cache/consentivr")
MIRROR_ENV = "CONSENTIVR_PBX_MIRROR"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
SUITE_ENV = "CONSENTIVR_PBX_SUITE"
# Debian testing by its codename, not "testing": the cache is keyed by suite name, and
# a name that moved to the next release would keep serving the old tree.
DEFAULT_SUITE = "forky"
# Tried when the default suite yields no working Asterisk (a broken testing day, or
# Asterisk removed from testing). Never tried when CONSENTIVR_PBX_SUITE is set.
FALLBACK_SUITE = "sid"
ASSETS_ENV = "CONSENTIVR_ASTERISK_ASSETS"
ASTERISK_PACKAGES = ("asterisk", "asterisk-modules", "asterisk-core-sounds-en-gsm")

ASTERISK_BIN = "/usr/sbin/asterisk"
ARI_USER = "consentivr"
AMI_USER = "consentivr"
# Asterisk's RTP range lives below Linux's ephemeral range (32768+), so it cannot
# clash with the port-0 ports picked for HTTP/AMI/SIP; sipcaller uses 20000-32000.
_RTP_LOW, _RTP_HIGH, _RTP_WIDTH = 10000, 20000, 2000
# sun_path is 108 bytes; Asterisk's control socket lives in the run dir.
_MAX_SOCKET_PATH = 100


class PbxError(ConsentivrError):
    """The test PBX could not be provisioned, started or driven."""


class PbxUnavailable(PbxError):
    """This machine cannot run the sandboxed PBX at all (no root, no bwrap, no network).

    Test fixtures skip on this (fail under CI); any other ``PbxError`` is a real failure.
    """


@dataclass(frozen=True)
class PbxEndpoints:
    """How to reach an Asterisk: ARI, AMI and SIP, all on 127.0.0.1 for the sandbox."""

    ari_url: str  # "http://127.0.0.1:PORT", without the /ari suffix
    ari_user: str
    ari_password: str
    ami_host: str
    ami_port: int
    ami_user: str
    ami_password: str
    sip_host: str
    sip_port: int | None
    # A host dir visible at the SAME absolute path inside Asterisk (recordings,
    # prompts); None when Asterisk runs elsewhere and no such dir is known.
    shared_dir: Path | None


class Pbx(Protocol):
    """What tests and the demo need from a running Asterisk, sandboxed or not."""

    @property
    def endpoints(self) -> PbxEndpoints: ...
    @property
    def log_path(self) -> Path | None: ...
    @property
    def shared_dir(self) -> Path | None: ...
    def cli(self, command: str) -> str: ...
    def set_dialplan(self, text: str) -> None: ...
    def set_rendered_dialplan(self, text: str) -> None: ...
    def set_features(self, text: str) -> None: ...
    def set_withdrawal(self, features: str, dialplan: str) -> None: ...


# --------------------------------------------------------------------------- helpers


def assets_dir() -> Path:
    """The repo's ``asterisk/`` dir (config templates, sipp scenarios).

    ``$CONSENTIVR_ASTERISK_ASSETS`` overrides it, e.g. for an installed package.
    """
    env = os.environ.get(ASSETS_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "asterisk"


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR)


def tail(path: Path | None, lines: int = 20) -> str:
    """The last ``lines`` lines of a text file, or a note why there are none."""
    if path is None:
        return "(no log file known)"
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            data = fh.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"(cannot read {path}: {exc.strerror})"
    return "\n".join(data.splitlines()[-lines:]) or "(empty)"


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port on 127.0.0.1 that the kernel says is free right now."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def port_is_free(port: int, kind: int = socket.SOCK_DGRAM) -> bool:
    with socket.socket(socket.AF_INET, kind) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _pick_rtp_range() -> tuple[int, int]:
    # A random block per run keeps parallel PBXes (pytest-xdist) apart; spot-check it.
    for _ in range(20):
        start = random.randrange(_RTP_LOW, _RTP_HIGH - _RTP_WIDTH, 100)
        if all(port_is_free(p) for p in (start, start + 1, start + _RTP_WIDTH - 2)):
            return start, start + _RTP_WIDTH - 1
    raise PbxError(f"no free RTP port block in {_RTP_LOW}-{_RTP_HIGH} on 127.0.0.1")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def ari_get(endpoints: PbxEndpoints, resource: str, timeout: float = 5.0) -> object:
    """GET ``/ari/<resource>`` with basic auth and return the decoded JSON."""
    url = f"{endpoints.ari_url}/ari/{resource.lstrip('/')}"
    token = base64.b64encode(f"{endpoints.ari_user}:{endpoints.ari_password}".encode()).decode()
    req = urllib.request.Request(url, headers={"Authorization": f"Basic {token}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        raise PbxError(f"ARI GET {url}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise PbxError(f"ARI GET {url}: {reason}") from None


def ami_command(endpoints: PbxEndpoints, command: str, timeout: float = 10.0) -> str:
    """Run a CLI command over AMI (``Action: Command``) and return its output."""
    action_id = secrets.token_hex(4)
    where = f"AMI {endpoints.ami_host}:{endpoints.ami_port}"
    try:
        with socket.create_connection((endpoints.ami_host, endpoints.ami_port), timeout) as sock:
            reader = sock.makefile("rb")
            reader.readline()  # banner: "Asterisk Call Manager/x.y.z"
            sock.sendall(
                (
                    f"Action: Login\r\nUsername: {endpoints.ami_user}\r\n"
                    f"Secret: {endpoints.ami_password}\r\nEvents: off\r\n\r\n"
                ).encode()
            )
            login = _ami_read_message(reader)
            if login.get("Response") != "Success":
                raise PbxError(f"{where}: login failed: {login.get('Message', login)}")
            sock.sendall(
                f"Action: Command\r\nCommand: {command}\r\nActionID: {action_id}\r\n\r\n".encode()
            )
            while True:
                lines = _ami_read_lines(reader)
                msg = _ami_parse(lines)
                if msg.get("ActionID") != action_id:
                    continue  # an event that slipped through
                if msg.get("Response") != "Success":
                    raise PbxError(f"{where}: {command!r}: {msg.get('Message', msg)}")
                out = [ln[len("Output: ") :] for ln in lines if ln.startswith("Output: ")]
                return "\n".join(out) + ("\n" if out else "")
    except OSError as exc:
        raise PbxError(f"{where}: {exc}") from None


def _ami_read_lines(reader: IO[bytes]) -> list[str]:
    lines: list[str] = []
    while True:
        raw = reader.readline()
        if not raw:
            raise PbxError("AMI connection closed")
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not line:
            if lines:
                return lines
            continue
        lines.append(line)


def _ami_parse(lines: list[str]) -> dict[str, str]:
    msg: dict[str, str] = {}
    for line in lines:
        key, _, value = line.partition(":")
        msg.setdefault(key.strip(), value.strip())
    return msg


def _ami_read_message(reader: IO[bytes]) -> dict[str, str]:
    return _ami_parse(_ami_read_lines(reader))


# --------------------------------------------------------------------------- sandbox


@dataclass(frozen=True)
class _Ports:
    http: int
    ami: int
    sip: int
    rtp_start: int
    rtp_end: int


def suites_to_try(env: dict[str, str] | None = None) -> tuple[str, ...]:
    """The Debian suites to provision from, in order: the chosen one, or forky then sid."""
    chosen = (os.environ if env is None else env).get(SUITE_ENV, "").strip()
    return (chosen,) if chosen else (DEFAULT_SUITE, FALLBACK_SUITE)


def suite_root(cache_dir: Path, suite: str) -> Path:
    """Where the cached tree of one suite lives (e.g. ``/var/cache/consentivr/forky-root``)."""
    return cache_dir / f"{suite}-root"


class SandboxPbx:
    """Debian's Asterisk 22 in a bwrap sandbox, configured from ``asterisk/templates``.

    Asterisk runs as root without ``-U``/``-G`` (with a run user it drops the
    capabilities it needs to read Debian's config files) and with ``--die-with-parent``:
    it dies with the thread that called ``start()``, so call it from a long-lived
    thread (the main thread, or a pytest session fixture).
    """

    def __init__(
        self,
        run_dir: Path,
        *,
        cache_dir: Path | None = None,
        binds: Sequence[Path] = (),
        shared_dir: Path | None = None,
        http_sessionlimit: int = 100,
        run_as: str | None = None,
    ) -> None:
        self.run_dir = Path(run_dir).absolute()
        # Asterisk's run user in the sandbox (e.g. "asterisk": -U/-G, as Debian's service
        # runs it); None: root. See _grant_run_user.
        self.run_as = run_as
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.suites = suites_to_try()
        # The suite and root in use: the first suite's until provision() settles them.
        self.suite = self.suites[0]
        self.root = suite_root(self.cache_dir, self.suite)
        self.binds = [Path(b).absolute() for b in binds]
        self._shared_dir = Path(shared_dir).absolute() if shared_dir else self.run_dir / "shared"
        self.http_sessionlimit = http_sessionlimit
        self.etc_dir = self.run_dir / "etc"
        self.log_dir = self.run_dir / "log"
        self.dialplan_path = self.run_dir / "extensions_project.conf"
        self.rendered_dialplan_path = self.run_dir / "extensions_rendered.conf"
        self.features_path = self.run_dir / "features_project.conf"
        # consentivr's own withdrawal parts, apart from what tests put in the files above.
        self.withdraw_features_path = self.run_dir / "features_withdraw.conf"
        self.withdraw_dialplan_path = self.run_dir / "extensions_withdraw.conf"
        self.console_log_path = self.log_dir / "console.log"
        self._ports: _Ports | None = None
        self._ari_password = secrets.token_urlsafe(18)
        self._ami_password = secrets.token_urlsafe(18)
        self._proc: subprocess.Popen[bytes] | None = None
        self._console: IO[bytes] | None = None
        self._endpoints: PbxEndpoints | None = None

    # -- properties ------------------------------------------------------------

    @property
    def log_path(self) -> Path:
        """Asterisk's full log (``messages`` in the run dir)."""
        return self.log_dir / "messages"

    @property
    def shared_dir(self) -> Path:
        return self._shared_dir

    @property
    def endpoints(self) -> PbxEndpoints:
        if self._endpoints is None:
            raise PbxError("the test PBX is not started")
        return self._endpoints

    @property
    def asterisk_conf(self) -> Path:
        return self.etc_dir / "asterisk.conf"

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- provisioning ------------------------------------------------------------

    def provision(self) -> Path:
        """Make sure ``<cache>/<suite>-root`` holds a working Asterisk; debootstrap it if not.

        Suites are tried in order (``suites_to_try``): forky, then sid when forky yields
        no working Asterisk; ``self.suite`` and ``self.root`` say which one is in use.
        A tree is built in ``<suite>-root.tmp`` and renamed into place only once
        ``asterisk -V`` works in it, so an interrupted run never leaves a broken cache.
        """
        _require_tool("bwrap", "bubblewrap")
        failures: list[str] = []
        for suite in self.suites:
            root = suite_root(self.cache_dir, suite)
            try:
                self._provision_suite(suite, root)
            except PbxUnavailable as exc:
                failures.append(f"Debian {suite}: {exc}")
                if suite != self.suites[-1]:
                    log.warning("Debian %s gave no usable Asterisk; trying the next suite", suite)
                continue
            if failures:
                log.warning("using Debian %s's Asterisk instead (%s)", suite, failures[0])
            self.suite, self.root = suite, root
            return root
        raise PbxUnavailable("\n".join(failures))

    def _provision_suite(self, suite: str, root: Path) -> None:
        if self._root_works(root):
            return
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PbxUnavailable(f"cannot create the PBX cache {self.cache_dir}: {exc}") from None
        with self._cache_lock():
            if self._root_works(root):  # another process built it meanwhile
                return
            self._debootstrap(suite, root)

    @contextlib.contextmanager
    def _cache_lock(self) -> Iterator[None]:
        with (self.cache_dir / ".provision.lock").open("w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _root_works(self, root: Path) -> bool:
        if not (root / ASTERISK_BIN.lstrip("/")).exists():
            return False
        try:
            res = subprocess.run(
                [*self._bwrap_base(root), ASTERISK_BIN, "-V"],
                capture_output=True,
                timeout=30,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            return False
        return res.returncode == 0 and res.stdout.startswith(b"Asterisk ")

    def _debootstrap(self, suite: str, root: Path) -> None:
        if os.geteuid() != 0:
            raise PbxUnavailable(
                f"building the Asterisk sandbox in {root} needs root (debootstrap); "
                "or point the tests at an existing Asterisk (CONSENTIVR_TEST_ARI_URL)"
            )
        _require_tool("debootstrap", "debootstrap")
        mirror = os.environ.get(MIRROR_ENV) or DEFAULT_MIRROR
        tmp = root.with_name(root.name + ".tmp")
        log_file = self.cache_dir / f"debootstrap-{suite}.log"
        shutil.rmtree(tmp, ignore_errors=True)  # leftover of an interrupted run
        cmd = [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(ASTERISK_PACKAGES)}",
            suite,
            str(tmp),
            mirror,
        ]
        # An older debootstrap knows no script for a newer suite ("No such script:
        # .../forky"); every Debian suite since buster uses the same one, sid's.
        scripts = Path("/usr/share/debootstrap/scripts")
        if not (scripts / suite).exists() and (scripts / "sid").exists():
            cmd.append(str(scripts / "sid"))
        log.info("provisioning Asterisk: %s (about a minute; log: %s)", " ".join(cmd), log_file)
        started = time.monotonic()
        rc = self._run_debootstrap(cmd, log_file)
        if rc != 0 or not self._root_works(tmp):
            shutil.rmtree(tmp, ignore_errors=True)  # a broken tree is no cache: free its space
            why = f"exited with {rc}" if rc else "installed no working asterisk"
            raise PbxUnavailable(
                f"debootstrap of Debian {suite} from {mirror} {why} (no network, or a broken "
                f"{suite} day?); see {log_file}; last lines:\n{tail(log_file)}"
            )
        old = root.with_name(root.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if root.exists():
            root.rename(old)
        tmp.rename(root)
        shutil.rmtree(old, ignore_errors=True)
        log.info("Asterisk sandbox ready in %s (%.0f s)", root, time.monotonic() - started)

    def _run_debootstrap(self, cmd: list[str], log_file: Path) -> int:
        """Run debootstrap with its output in ``log_file``; its exit status (-1: timeout)."""
        with log_file.open("wb") as out:
            try:
                return subprocess.run(
                    cmd, stdout=out, stderr=subprocess.STDOUT, timeout=1800, check=False
                ).returncode
            except subprocess.TimeoutExpired:
                return -1

    # -- bwrap -----------------------------------------------------------------

    def _bwrap_base(self, root: Path) -> list[str]:
        # Read-only root: several PBXes can share one cache. /tmp and /run are private.
        return [
            "bwrap",
            "--ro-bind", str(root), "/",
            "--dev", "/dev",
            "--proc", "/proc",
            "--tmpfs", "/tmp",
            "--tmpfs", "/run",
            "--die-with-parent",
        ]  # fmt: skip

    def _bwrap(self) -> list[str]:
        cmd = self._bwrap_base(self.root)
        for path in self._mounts():
            self._ensure_mountpoint(path)
            cmd += ["--bind", str(path), str(path)]
        return cmd

    def _mounts(self) -> list[Path]:
        paths = [self.run_dir, *self.binds]
        if not self._shared_dir.is_relative_to(self.run_dir):
            paths.append(self._shared_dir)
        return paths

    def _ensure_mountpoint(self, path: Path) -> None:
        # The root is bound read-only, so bwrap cannot create mount points in it;
        # create them (empty dirs) in the cached tree. /tmp and /run are tmpfs inside.
        if any(path.is_relative_to(top) for top in ("/tmp", "/run")):
            return
        inside = self.root
        for part in path.parts[1:]:
            inside = inside / part
            if inside.is_symlink():
                raise PbxError(
                    f"cannot bind {path} into the sandbox: {inside} is a symlink there; "
                    "use a path under /tmp or another dir"
                )
        inside.mkdir(parents=True, exist_ok=True)

    # -- configuration ---------------------------------------------------------

    def _module_dir(self) -> str:
        found = sorted(self.root.glob("usr/lib/*/asterisk/modules"))
        if not found:
            raise PbxError(f"no Asterisk module dir under {self.root}/usr/lib")
        return "/" + str(found[0].relative_to(self.root))

    def _template_vars(self, ports: _Ports) -> dict[str, str]:
        return {
            "rundir": str(self.run_dir),
            "etcdir": str(self.etc_dir),
            "moddir": self._module_dir(),
            "http_port": str(ports.http),
            "http_sessionlimit": str(self.http_sessionlimit),
            "ami_port": str(ports.ami),
            "ami_user": AMI_USER,
            "ami_password": self._ami_password,
            "ari_user": ARI_USER,
            "ari_password": self._ari_password,
            "sip_port": str(ports.sip),
            "rtp_start": str(ports.rtp_start),
            "rtp_end": str(ports.rtp_end),
            "dialplan_file": str(self.dialplan_path),
            "rendered_dialplan_file": str(self.rendered_dialplan_path),
            "features_file": str(self.features_path),
            "withdraw_features_file": str(self.withdraw_features_path),
            "withdraw_dialplan_file": str(self.withdraw_dialplan_path),
        }

    def _write_config(self, ports: _Ports) -> None:
        templates = assets_dir() / "templates"
        names = sorted(templates.glob("*.conf"))
        if not names:
            raise PbxError(f"no Asterisk config templates in {templates} (set ${ASSETS_ENV})")
        for sub in ("etc", "log", "run", "spool", "db", "cache"):
            (self.run_dir / sub).mkdir(parents=True, exist_ok=True)
        self._shared_dir.mkdir(parents=True, exist_ok=True)
        values = self._template_vars(ports)
        for tpl in names:
            try:
                text = Template(tpl.read_text(encoding="utf-8")).substitute(values)
            except (KeyError, ValueError) as exc:
                raise PbxError(f"bad template {tpl}: {exc!r}") from None
            _write_atomic(self.etc_dir / tpl.name, text)
        # Project files survive restarts; only create them the first time.
        if not self.dialplan_path.exists():
            _write_atomic(self.dialplan_path, "; written by tests / the demo (set_dialplan)\n")
        if not self.features_path.exists():
            _write_atomic(self.features_path, "; written by tests / the demo (set_features)\n")

    def sandbox_ids(self, name: str) -> tuple[int, int]:
        """The uid and gid of a user of the sandbox's root (its /etc/passwd, not the host's:
        Debian's ``asterisk`` there may be another name's number here)."""
        for line in (self.root / "etc" / "passwd").read_text(encoding="utf-8").splitlines():
            fields = line.split(":")
            if len(fields) > 3 and fields[0] == name:
                return int(fields[2]), int(fields[3])
        raise PbxError(f"no user {name!r} in {self.root}/etc/passwd")

    def _grant_run_user(self) -> None:
        """Let a non-root Asterisk read its config and write its own dirs.

        With -U, Asterisk drops root's capabilities: the run dir must be searchable by
        its group, its config group-readable, and log/run/spool/db/cache its own.
        Nothing is opened to others.
        """
        assert self.run_as is not None
        uid, gid = self.sandbox_ids(self.run_as)
        os.chown(self.run_dir, -1, gid)
        os.chmod(self.run_dir, 0o750)
        for path in self.etc_dir.rglob("*"):
            os.chown(path, -1, gid)
            os.chmod(path, 0o750 if path.is_dir() else 0o640)
        os.chown(self.etc_dir, -1, gid)
        os.chmod(self.etc_dir, 0o750)
        for sub in ("log", "run", "spool", "db", "cache"):
            for path in [self.run_dir / sub, *(self.run_dir / sub).rglob("*")]:
                os.chown(path, uid, gid)

    def _allocate_ports(self) -> _Ports:
        rtp_start, rtp_end = _pick_rtp_range()
        return _Ports(
            http=free_port(socket.SOCK_STREAM),
            ami=free_port(socket.SOCK_STREAM),
            sip=free_port(socket.SOCK_DGRAM),
            rtp_start=rtp_start,
            rtp_end=rtp_end,
        )

    # -- lifecycle -------------------------------------------------------------

    def start(self, timeout: float = 120) -> PbxEndpoints:
        """Provision if needed, write configs, launch Asterisk, wait until ARI answers.

        ``timeout`` covers Asterisk's startup, not a first-time debootstrap. A restart
        reuses the ports and passwords of the first start.
        """
        if self.running():
            return self.endpoints
        self.provision()  # may take a minute; not part of the startup timeout
        deadline = time.monotonic() + timeout
        sock_path = self.run_dir / "run" / "asterisk.ctl"
        if len(str(sock_path)) > _MAX_SOCKET_PATH:
            raise PbxError(
                f"run dir {self.run_dir} is too long for Asterisk's control socket; "
                "use a shorter path (e.g. tempfile.mkdtemp(dir='/tmp'))"
            )
        if self._ports is None:
            self._ports = self._allocate_ports()
        ports = self._ports
        self._write_config(ports)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._console = self.console_log_path.open("ab")
        user: list[str] = []
        if self.run_as:
            self._grant_run_user()
            user = ["-U", self.run_as, "-G", self.run_as]
        cmd = [*self._bwrap(), ASTERISK_BIN, "-f", "-n", *user, "-C", str(self.asterisk_conf)]
        log.info("starting Asterisk: %s", " ".join(cmd))
        try:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=self._console,
                stderr=subprocess.STDOUT,
                # Own session: Ctrl-C reaches Python, which then stops Asterisk cleanly.
                start_new_session=True,
            )
        except OSError as exc:
            self._close_console()
            raise PbxUnavailable(f"cannot run bwrap: {exc}") from None
        self._endpoints = PbxEndpoints(
            ari_url=f"http://127.0.0.1:{ports.http}",
            ari_user=ARI_USER,
            ari_password=self._ari_password,
            ami_host="127.0.0.1",
            ami_port=ports.ami,
            ami_user=AMI_USER,
            ami_password=self._ami_password,
            sip_host="127.0.0.1",
            sip_port=ports.sip,
            shared_dir=self._shared_dir,
        )
        try:
            self._wait_ready(deadline)
        except BaseException:
            self.stop()
            raise
        log.info(
            "Asterisk up: ARI %s, AMI %d, SIP %d", self._endpoints.ari_url, ports.ami, ports.sip
        )
        return self._endpoints

    def _wait_ready(self, deadline: float) -> None:
        assert self._proc is not None
        booted = False
        last = "no answer yet"
        while time.monotonic() < deadline:
            rc = self._proc.poll()
            if rc is not None:
                raise self._failure(f"Asterisk exited with code {rc} during startup")
            try:
                if not booted:
                    out = self._rx(
                        "core waitfullybooted", timeout=max(1.0, deadline - time.monotonic())
                    )
                    booted = "fully booted" in out.lower()
                    last = out.strip() or last
                if booted:
                    info = ari_get(self.endpoints, "asterisk/info", timeout=5)
                    if isinstance(info, dict) and "system" in info:
                        return
            except PbxError as exc:
                last = str(exc)
            time.sleep(0.2)
        raise self._failure(f"Asterisk not ready within the timeout ({last})")

    def _failure(self, what: str) -> PbxError:
        console = tail(self.console_log_path, 5)
        return PbxError(
            f"{what}; log: {self.log_path}; last lines:\n{tail(self.log_path)}"
            + (f"\nconsole ({self.console_log_path}):\n{console}" if console != "(empty)" else "")
        )

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        """Stop Asterisk: ``core stop now``, then SIGTERM, then SIGKILL. Idempotent."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(PbxError):
                self._rx("core stop now", timeout=10)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log.warning("Asterisk ignored 'core stop now'; terminating it")
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
        self._proc = None
        self._close_console()

    def _close_console(self) -> None:
        if self._console is not None:
            self._console.close()
            self._console = None

    def restart(self, timeout: float = 120) -> PbxEndpoints:
        """Stop and start again on the same ports and passwords."""
        self.stop()
        return self.start(timeout)

    def pid(self) -> int | None:
        """Host pid of the asterisk process (for fault tests), or None if not running."""
        if not self.running():
            return None
        assert self._proc is not None
        todo = [self._proc.pid]
        while todo:
            pid = todo.pop()
            try:
                comm = Path(f"/proc/{pid}/comm").read_text().strip()
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            except OSError:
                continue
            if comm == "asterisk":
                return pid
            todo.extend(int(c) for c in children)
        return None

    # -- driving it ------------------------------------------------------------

    def _rx(self, command: str, timeout: float = 30) -> str:
        cmd = [
            *self._bwrap_base(self.root),
            "--bind", str(self.run_dir), str(self.run_dir),
            ASTERISK_BIN, "-C", str(self.asterisk_conf), "-rx", command,
        ]  # fmt: skip
        try:
            res = subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise PbxError(f"asterisk -rx {command!r} timed out after {timeout:.0f} s") from None
        out = res.stdout.decode("utf-8", "replace")
        if res.returncode != 0 or out.startswith("Unable to connect"):
            err = (out + res.stderr.decode("utf-8", "replace")).strip().splitlines()
            raise PbxError(f"asterisk -rx {command!r}: {err[-1] if err else res.returncode}")
        return out

    def cli(self, command: str) -> str:
        """Run an Asterisk CLI command in the running instance and return its output."""
        if not self.running():
            raise PbxError(f"the test PBX is not running (log: {self.log_path})")
        return self._rx(command)

    def set_dialplan(self, text: str) -> None:
        """Replace ``extensions_project.conf`` and reload the dialplan.

        Raises PbxError listing Asterisk's complaints if the file has parse problems.
        """
        _write_atomic(self.dialplan_path, text)
        self._reload_checked("dialplan reload", "reloaded")

    def set_rendered_dialplan(self, text: str) -> None:
        """Replace ``extensions_rendered.conf`` (e.g. a dialplan consentivr rendered)."""
        _write_atomic(self.rendered_dialplan_path, text)
        self._reload_checked("dialplan reload", "reloaded")

    def set_features(self, text: str) -> None:
        """Replace ``features_project.conf`` (inside ``[applicationmap]``) and reload."""
        _write_atomic(self.features_path, text)
        self._reload_checked("module reload features", "")

    def set_withdrawal(self, features: str, dialplan: str) -> None:
        """Install consentivr's withdrawal feature and context, as a production PBX has
        them (``consentivr recording features``); reload only what changed."""
        for path, text, reload, needle in (
                (self.withdraw_features_path, features, "module reload features", ""),
                (self.withdraw_dialplan_path, dialplan, "dialplan reload", "reloaded")):
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                _write_atomic(path, text)
                self._reload_checked(reload, needle)

    def _reload_checked(self, command: str, expect: str) -> None:
        # Asterisk reports config problems only in its log, after the command returns.
        # Logging is queued in order, so a marker logged afterwards bounds the lines.
        start = self.log_path.stat().st_size if self.log_path.exists() else 0
        out = self.cli(command)
        if expect and expect not in out.lower():
            raise PbxError(f"{command} failed: {out.strip()!r}; see {self.log_path}")
        marker = f"reload-{secrets.token_hex(6)}"
        self.cli(f"dialplan set global CONSENTIVR_RELOAD_MARK {marker}")
        deadline = time.monotonic() + 3
        new = ""
        while time.monotonic() < deadline:
            with self.log_path.open("rb") as fh:
                fh.seek(start)
                new = fh.read().decode("utf-8", "replace")
            if marker in new:
                break
            time.sleep(0.02)
        problems = [
            line
            for line in new.splitlines()
            if re.search(r"\b(WARNING|ERROR)\[", line) and _CONFIG_SOURCES.search(line)
        ]
        if problems:
            raise PbxError(
                f"{command}: Asterisk rejected parts of the config (log: {self.log_path}):\n"
                + "\n".join(problems)
            )


class StockSandboxPbx(SandboxPbx):
    """Debian's STOCK ``/etc/asterisk`` (from the sandbox root), as a new install has it,
    run as the sandbox's ``asterisk`` user. The install test adds exactly what
    ``consentivr asterisk-config --add-includes`` writes; these are the test's own
    tweaks, none of them consentivr's config:

    - ``asterisk.conf``: etc, db, spool, run, log and cache dirs in the run dir (the
      sandbox root is read-only and shared by parallel test PBXes); Debian's
      ``[directories](!)`` is a template, which Asterisk ignores, so the ``(!)`` goes;
    - ``modules.conf``: ``noload`` for channel drivers that bind fixed ports on every
      address (IAX2, MGCP, Unistim), so parallel PBXes cannot clash;
    - ``rtp.conf``: a free RTP port block;
    - ``pjsip.conf``: a UDP transport on a free loopback port and the sipp caller's
      endpoint, whose calls land in ``consentivr-entry``.

    HTTP and AMI ports come from consentivr's config, through ``asterisk-config``.
    """

    NOLOAD = ("chan_iax2.so", "chan_mgcp.so", "chan_unistim.so", "chan_skinny.so",
              "chan_ooh323.so", "res_phoneprov.so", "res_pjsip_phoneprov_provider.so")

    def __init__(self, run_dir: Path, *, http_port: int, ami_port: int, ari_password: str,
                 ami_password: str, binds: Sequence[Path] = (),
                 shared_dir: Path | None = None, run_as: str | None = "asterisk") -> None:
        super().__init__(run_dir, binds=binds, shared_dir=shared_dir, run_as=run_as)
        self._ari_password = ari_password
        self._ami_password = ami_password
        self._http_port, self._ami_port = http_port, ami_port

    @property
    def log_path(self) -> Path:
        return self.log_dir / "messages.log"  # Debian's logger.conf

    def _allocate_ports(self) -> _Ports:
        ports = super()._allocate_ports()
        return _Ports(self._http_port, self._ami_port, ports.sip, ports.rtp_start,
                      ports.rtp_end)

    def install_stock(self) -> Path:
        """Copy the stock config into the run dir and apply the test's tweaks (once).
        Returns the config dir, the run's /etc/asterisk."""
        self.provision()
        if (self.etc_dir / "asterisk.conf").exists():
            return self.etc_dir
        if self._ports is None:
            self._ports = self._allocate_ports()
        ports = self._ports
        shutil.copytree(self.root / "etc" / "asterisk", self.etc_dir, symlinks=True)
        for sub in ("log", "run", "spool", "db", "cache"):
            (self.run_dir / sub).mkdir(parents=True, exist_ok=True)
        self._shared_dir.mkdir(parents=True, exist_ok=True)
        conf = self.etc_dir / "asterisk.conf"
        moved = {"astetcdir": self.etc_dir, "astdbdir": self.run_dir / "db",
                 "astspooldir": self.run_dir / "spool", "astrundir": self.run_dir / "run",
                 "astlogdir": self.run_dir / "log", "astcachedir": self.run_dir / "cache"}
        lines = []
        for line in conf.read_text(encoding="utf-8").splitlines():
            if line.startswith("[directories](!)"):  # Debian's: a template, so unused
                line = "[directories]"
            key = line.split("=>", 1)[0].strip()
            lines.append(f"{key} => {moved[key]}" if key in moved and "=>" in line else line)
        _write_atomic(conf, "\n".join(lines) + "\n")
        self._append("modules.conf", "; test: no fixed-port channel drivers\n[modules](+)\n"
                      + "".join(f"noload => {m}\n" for m in self.NOLOAD))
        self._append("rtp.conf", f"; test: a free RTP block\n[general](+)\n"
                                 f"rtpstart = {ports.rtp_start}\nrtpend = {ports.rtp_end}\n")
        _write_atomic(self.etc_dir / "pjsip-test.conf", _TEST_PJSIP.format(port=ports.sip))
        self._append("pjsip.conf", "; test: the sipp caller\n#include pjsip-test.conf\n")
        return self.etc_dir

    def _append(self, name: str, text: str) -> None:
        path = self.etc_dir / name
        _write_atomic(path, path.read_text(encoding="utf-8") + "\n" + text)

    def _write_config(self, ports: _Ports) -> None:
        self.install_stock()


_TEST_PJSIP = """\
; The install test's SIP caller (sipp on 127.0.0.1), identified by address.
[transport-test]
type = transport
protocol = udp
bind = 127.0.0.1:{port}

[caller]
type = endpoint
transport = transport-test
context = consentivr-entry
disallow = all
allow = alaw,ulaw
dtmf_mode = rfc4733
direct_media = no
rtp_symmetric = yes
aors = caller

[caller]
type = aor
max_contacts = 1

[caller]
type = identify
endpoint = caller
match = 127.0.0.1
"""


_CONFIG_SOURCES = re.compile(r"\] (config|pbx_config|features_config|config_options)\.c:")


# --------------------------------------------------------------------------- external


def external_endpoints_from_env(env: dict[str, str] | None = None) -> PbxEndpoints | None:
    """Endpoints of a user-run Asterisk from ``CONSENTIVR_TEST_*``, or None if unset.

    ``CONSENTIVR_TEST_ARI_URL`` switches it on; the rest default to the ARI host,
    AMI port 5038 and user/password ``consentivr``/``consentivr``.
    """
    env = dict(os.environ) if env is None else env
    url = env.get("CONSENTIVR_TEST_ARI_URL", "").strip()
    if not url:
        return None
    url = url.rstrip("/")
    url = url.removesuffix("/ari")
    host = urlsplit(url).hostname or "127.0.0.1"

    def port(name: str, default: int | None) -> int | None:
        raw = env.get(name, "").strip()
        if not raw:
            return default
        try:
            return int(raw)
        except ValueError:
            raise PbxError(f"{name}={raw!r} is not a port number") from None

    shared = env.get("CONSENTIVR_TEST_SHARED_DIR", "").strip()
    return PbxEndpoints(
        ari_url=url,
        ari_user=env.get("CONSENTIVR_TEST_ARI_USER", "consentivr"),
        ari_password=env.get("CONSENTIVR_TEST_ARI_PASSWORD", "consentivr"),
        ami_host=env.get("CONSENTIVR_TEST_AMI_HOST", host),
        ami_port=port("CONSENTIVR_TEST_AMI_PORT", 5038) or 5038,
        ami_user=env.get("CONSENTIVR_TEST_AMI_USER", "consentivr"),
        ami_password=env.get("CONSENTIVR_TEST_AMI_PASSWORD", "consentivr"),
        sip_host=env.get("CONSENTIVR_TEST_SIP_HOST", host),
        sip_port=port("CONSENTIVR_TEST_SIP_PORT", None),
        shared_dir=Path(shared) if shared else None,
    )


class ExternalPbx:
    """An Asterisk the user runs; driven over AMI ``Command``.

    ``set_dialplan`` needs a file that this Asterisk ``#include``s (for example
    ``$CONSENTIVR_TEST_DIALPLAN_FILE``), likewise ``set_features``.
    """

    def __init__(
        self,
        endpoints: PbxEndpoints,
        *,
        dialplan_file: Path | None = None,
        rendered_dialplan_file: Path | None = None,
        features_file: Path | None = None,
        log_path: Path | None = None,
    ) -> None:
        self._endpoints = endpoints
        self.dialplan_path = dialplan_file
        self.rendered_dialplan_path = rendered_dialplan_file
        self.features_path = features_file
        self._log_path = log_path

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> ExternalPbx | None:
        env = dict(os.environ) if env is None else env
        endpoints = external_endpoints_from_env(env)
        if endpoints is None:
            return None

        def path(name: str) -> Path | None:
            raw = env.get(name, "").strip()
            return Path(raw) if raw else None

        return cls(
            endpoints,
            dialplan_file=path("CONSENTIVR_TEST_DIALPLAN_FILE"),
            rendered_dialplan_file=path("CONSENTIVR_TEST_RENDERED_DIALPLAN_FILE"),
            features_file=path("CONSENTIVR_TEST_FEATURES_FILE"),
            log_path=path("CONSENTIVR_TEST_ASTERISK_LOG"),
        )

    @property
    def endpoints(self) -> PbxEndpoints:
        return self._endpoints

    @property
    def log_path(self) -> Path | None:
        return self._log_path

    @property
    def shared_dir(self) -> Path | None:
        return self._endpoints.shared_dir

    def check(self) -> None:
        """Fail with one clear line unless ARI and AMI both answer."""
        ari_get(self._endpoints, "asterisk/info")
        self.cli("core show version")

    def cli(self, command: str) -> str:
        return ami_command(self._endpoints, command)

    def _replace(self, path: Path | None, env_name: str, text: str, reload: str) -> None:
        if path is None:
            raise PbxError(f"set {env_name} to a file your Asterisk #includes")
        _write_atomic(path, text)
        self.cli(reload)

    def set_dialplan(self, text: str) -> None:
        self._replace(self.dialplan_path, "CONSENTIVR_TEST_DIALPLAN_FILE", text, "dialplan reload")

    def set_rendered_dialplan(self, text: str) -> None:
        self._replace(
            self.rendered_dialplan_path,
            "CONSENTIVR_TEST_RENDERED_DIALPLAN_FILE",
            text,
            "dialplan reload",
        )

    def set_features(self, text: str) -> None:
        self._replace(
            self.features_path, "CONSENTIVR_TEST_FEATURES_FILE", text, "module reload features"
        )

    def set_withdrawal(self, features: str, dialplan: str) -> None:
        """Your Asterisk is expected to have consentivr's withdrawal parts installed (as in
        production); with ``CONSENTIVR_TEST_WITHDRAW_FEATURES_FILE`` and
        ``CONSENTIVR_TEST_WITHDRAW_DIALPLAN_FILE`` set, the tests write them there."""
        for env, text, reload in (
                ("CONSENTIVR_TEST_WITHDRAW_FEATURES_FILE", features, "module reload features"),
                ("CONSENTIVR_TEST_WITHDRAW_DIALPLAN_FILE", dialplan, "dialplan reload")):
            if os.environ.get(env):
                self._replace(Path(os.environ[env]), env, text, reload)


# --------------------------------------------------------------------------- misc


def _require_tool(name: str, package: str) -> None:
    if shutil.which(name) is None:
        raise PbxUnavailable(f"{name} is not installed (Debian package {package!r})")


def _expect(output: str, needle: str, what: str, log_path: Path | None) -> None:
    if needle.lower() not in output.lower():
        raise PbxError(f"{what} failed: {output.strip()!r}; see {log_path}")


def asterisk_major_version(version_output: str) -> int | None:
    """22 for 'Asterisk 22.10.1+dfsg...'; None if the text has no version."""
    m = re.search(r"Asterisk (\d+)\.", version_output)
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------- by hand


def env_lines(pbx: SandboxPbx) -> list[str]:
    """``CONSENTIVR_TEST_*`` settings that point tests/the demo at this running PBX."""
    ep = pbx.endpoints
    values = {
        "CONSENTIVR_TEST_ARI_URL": ep.ari_url,
        "CONSENTIVR_TEST_ARI_USER": ep.ari_user,
        "CONSENTIVR_TEST_ARI_PASSWORD": ep.ari_password,
        "CONSENTIVR_TEST_AMI_HOST": ep.ami_host,
        "CONSENTIVR_TEST_AMI_PORT": str(ep.ami_port),
        "CONSENTIVR_TEST_AMI_USER": ep.ami_user,
        "CONSENTIVR_TEST_AMI_PASSWORD": ep.ami_password,
        "CONSENTIVR_TEST_SIP_PORT": str(ep.sip_port),
        "CONSENTIVR_TEST_SHARED_DIR": str(pbx.shared_dir),
        "CONSENTIVR_TEST_DIALPLAN_FILE": str(pbx.dialplan_path),
        "CONSENTIVR_TEST_RENDERED_DIALPLAN_FILE": str(pbx.rendered_dialplan_path),
        "CONSENTIVR_TEST_FEATURES_FILE": str(pbx.features_path),
        "CONSENTIVR_TEST_ASTERISK_LOG": str(pbx.log_path),
    }
    return [f"export {k}={v}" for k, v in values.items()]


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m consentivr_testbed.pbx provision|run``: build the sandbox, or run the PBX."""
    parser = argparse.ArgumentParser(prog="python -m consentivr_testbed.pbx", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    prov = sub.add_parser("provision", help="debootstrap the Asterisk sandbox unless cached")
    run = sub.add_parser("run", help="start the test PBX; print its settings; stop on Ctrl-C")
    run.add_argument("--dir", type=Path, help="run dir (default: new /tmp/consentivr-pbx-*)")
    for p in (prov, run):
        p.add_argument(
            "--cache-dir", type=Path, help=f"default: ${CACHE_ENV} or {DEFAULT_CACHE_DIR}"
        )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    try:
        if args.cmd == "provision":
            pbx = SandboxPbx(Path(tempfile.gettempdir()), cache_dir=args.cache_dir)
            root = pbx.provision()
            chosen = "chosen by $" + SUITE_ENV if os.environ.get(SUITE_ENV) else (
                "the default" if pbx.suite == DEFAULT_SUITE else f"fallback: no usable "
                f"Asterisk from {DEFAULT_SUITE}")
            log.info("Asterisk sandbox ready: Debian %s (%s), %s", pbx.suite, chosen, root)
            return 0
        run_dir = args.dir or Path(tempfile.mkdtemp(prefix="consentivr-pbx-", dir="/tmp"))
        pbx = SandboxPbx(run_dir, cache_dir=args.cache_dir)
        # SIGTERM gets the same clean 'core stop now' as Ctrl-C.
        signal.signal(signal.SIGTERM, _interrupt)
        with pbx:
            sys.stdout.write("\n".join(env_lines(pbx)) + "\n")
            sys.stdout.flush()
            log.info("test PBX running in %s; log: %s; Ctrl-C stops it", run_dir, pbx.log_path)
            while pbx.running():
                time.sleep(0.5)
            log.error("Asterisk exited; log: %s\n%s", pbx.log_path, tail(pbx.log_path))
            return 1
    except KeyboardInterrupt:
        return 0
    except PbxError as exc:
        log.error("%s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
