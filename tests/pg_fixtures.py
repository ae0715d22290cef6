"""A real, throwaway PostgreSQL for the tests (Debian's ``postgresql`` package).

``pg_server`` starts one cluster per test session: ``initdb`` and ``pg_ctl`` as the
``postgres`` user (when run as root) in a temp dir, listening on 127.0.0.1 at a free
port, password authentication over TCP (so the tests use ``database_password`` the
way a deployment does). ``CONSENTIVR_TEST_POSTGRES_URL`` (with
``CONSENTIVR_TEST_POSTGRES_PASSWORD``) points at a server of your own instead; the
restart tests then skip. No PostgreSQL: the tests skip, which under CI=true is a
failure (``postgres`` marker, tests/conftest.py).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)


def _tool(name: str) -> str | None:
    for d in BIN_DIRS:
        if (d / name).exists():
            return str(d / name)
    return shutil.which(name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PgServer:
    """A running cluster; ``stop()``/``start()`` for the fault tests."""

    host: str
    port: int
    user: str
    password: str
    datadir: Path | None = None
    runas: list[str] | None = None

    def url(self, dbname: str) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{dbname}"

    def _pg_ctl(self, *args: str) -> None:
        assert self.datadir is not None and self.runas is not None
        subprocess.run([*self.runas, str(_tool("pg_ctl")), "-D", str(self.datadir), "-w",
                        *args], check=True, capture_output=True, timeout=60)

    @property
    def own(self) -> bool:
        return self.datadir is not None

    def stop(self) -> None:
        self._pg_ctl("stop", "-m", "fast")

    def start(self) -> None:
        self._pg_ctl("-l", str(self.datadir / "server.log"), "start")

    def _pids(self) -> list[int]:
        """The postmaster and its children (the backends): the processes of our cluster."""
        assert self.datadir is not None
        postmaster = int((self.datadir / "postmaster.pid").read_text().split()[0])
        children = subprocess.run(["pgrep", "-P", str(postmaster)], capture_output=True,
                                  text=True, check=False).stdout.split()
        return [postmaster, *map(int, children)]

    def pause(self) -> list[int]:
        """Freeze the server (SIGSTOP): connections stay open, nothing answers, as a
        server stuck on a dead disk. Returns the pids for :meth:`resume`."""
        pids = self._pids()
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        return pids

    @staticmethod
    def resume(pids: list[int]) -> None:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)

    def new_database(self) -> str:
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url("postgres"), password=self.password,
                             autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")  # type: ignore[arg-type]  # our own name
        return self.url(name)


def _start_cluster(root: Path) -> PgServer:
    initdb = _tool("initdb")
    if initdb is None or _tool("pg_ctl") is None:
        pytest.skip("no PostgreSQL server binaries (apt-get install postgresql)")
    runas: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root: run the cluster as postgres
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no postgres user")
        os.chown(root, pw.pw_uid, pw.pw_gid)
        runas = ["runuser", "-u", "postgres", "--"]
    user = pwd.getpwuid(os.geteuid()).pw_name if not runas else "postgres"
    password = secrets.token_hex(12)
    pwfile = root / "pw"
    pwfile.write_text(password)
    if runas:
        os.chown(pwfile, pwd.getpwnam("postgres").pw_uid, -1)
    datadir = root / "data"
    subprocess.run([*runas, initdb, "-D", str(datadir), "-U", user, "--pwfile", str(pwfile),
                    "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8",
                    "--no-instructions"], check=True, capture_output=True, timeout=120)
    port = _free_port()
    with (datadir / "postgresql.conf").open("a") as fh:
        fh.write(f"\nlisten_addresses = '127.0.0.1'\nport = {port}\n"
                 f"unix_socket_directories = '{root}'\nfsync = on\n"
                 "synchronous_commit = on\nmax_connections = 50\n")
    server = PgServer("127.0.0.1", port, user, password, datadir, runas)
    server.start()
    return server


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    url = os.environ.get("CONSENTIVR_TEST_POSTGRES_URL")
    if url:
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        yield PgServer(parts.hostname or "127.0.0.1", parts.port or 5432,
                       parts.username or "postgres",
                       os.environ.get("CONSENTIVR_TEST_POSTGRES_PASSWORD", ""))
        return
    root = Path(tempfile.mkdtemp(prefix="consentivr-pg-"))
    os.chmod(root, 0o700)
    server = _start_cluster(root)
    try:
        yield server
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def pg_url(pg_server: PgServer) -> str:
    """A fresh, empty database on the session's server."""
    return pg_server.new_database()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test that asks for the server is a real-PostgreSQL test (the CI rule)."""
    for item in items:
        if "pg_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.postgres)
