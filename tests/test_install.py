"""Installing it (issue 19): asterisk-config, doctor, the user model, and a stock Asterisk.

The real-server class starts the sandbox's Asterisk with Debian's STOCK /etc/asterisk
(``StockSandboxPbx``: its docstring lists the test's own tweaks, none of them
consentivr's config) plus exactly what ``consentivr asterisk-config --add-includes``
writes, runs Asterisk as the sandbox's ``asterisk`` user and consentivr as a user of
its own in Asterisk's group (the user model), places the yes call, the silent call
and a ``*9`` withdrawal with sipp, and requires ``consentivr doctor`` to be green.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import wave
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from consentivr.asteriskconfig import (
    AMI_READ,
    AMI_WRITE,
    add_includes,
    missing_includes,
    snippets,
)
from consentivr.cli.main import main
from consentivr.configfile import load_settings
from consentivr.doctor import Account, may
from consentivr.ownership import prepare_recordings_dir
from consentivr_testbed.pbx import PbxError, PbxUnavailable, SandboxPbx, StockSandboxPbx, free_port
from consentivr_testbed.sipcaller import place_call

ROOT = Path(__file__).resolve().parent.parent
CONSENTIVR = str(Path(sys.executable).with_name("consentivr"))
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def example(tmp: Path) -> Path:
    """`consentivr example-config --out tmp`, as the README says; returns the config."""
    result = CliRunner().invoke(main, ["example-config", "--out", str(tmp)])
    assert result.exit_code == 0, result.output
    return tmp / "config.yaml"


# --------------------------------------------------------------------------- pure


def test_example_config_ships_a_working_config_and_the_dialplans(tmp_path: Path) -> None:
    config = example(tmp_path)
    assert (tmp_path / "dialplan" / "minimal.yaml").is_file()
    assert (tmp_path / "dialplan" / "gemeente.yaml").is_file()
    for name in ("ari", "ami"):
        (tmp_path / f"{name}.password").write_text(f"{name}-secret\n")
        os.chmod(tmp_path / f"{name}.password", 0o600)
    settings = load_settings(config)
    assert settings.default_flow == "minimal"
    # a destination that Debian's stock extensions.conf has: the echo test
    dest = settings.flows["minimal"].destination
    assert (dest.context, dest.exten) == ("demo", "600")
    # every cached sandbox root (forky, the sid fallback) ships that stock dialplan
    for stock in Path("/var/cache/consentivr").glob("*-root/etc/asterisk/extensions.conf"):
        text = stock.read_text()
        assert "[demo]" in text and re.search(r"^exten => 600,1,", text, re.M)
    again = CliRunner().invoke(main, ["example-config", "--out", str(tmp_path)])
    assert again.exit_code == 0 and "kept" in again.output


def _settings(tmp_path: Path, extra: str = "") -> Path:
    (tmp_path / "p").write_text("s3cret\n")
    os.chmod(tmp_path / "p", 0o600)
    config = tmp_path / "config.yaml"
    config.write_text(f"""\
ari: {{url: "http://127.0.0.1:8123", username: cv, password_file: p}}
ami: {{host: 127.0.0.1, port: 5123, username: cvami, password_file: p}}
database: {tmp_path}/db/consent.db
recordings: {{dir: {tmp_path}/rec}}
prompts_dir: {tmp_path}/prompts
dialplan: [{ROOT}/dialplan/minimal.yaml]
default_flow: minimal
{extra}""")
    return config


def test_asterisk_config_has_every_part_with_the_config_values(tmp_path: Path) -> None:
    settings = load_settings(_settings(tmp_path))
    parts = {p.path: p for p in snippets(settings)}
    assert list(parts) == ["http-consentivr.conf", "ari-consentivr.conf",
                           "manager.d/consentivr.conf", "features-consentivr.conf",
                           "extensions-consentivr.conf", "extensions-consentivr-withdraw.conf"]
    assert "bindport = 8123" in parts["http-consentivr.conf"].text
    assert "bindaddr = 127.0.0.1" in parts["http-consentivr.conf"].text
    assert "[cv]" in parts["ari-consentivr.conf"].text
    assert "password = s3cret" in parts["ari-consentivr.conf"].text
    manager = parts["manager.d/consentivr.conf"].text
    assert "port = 5123" in manager and "[cvami]" in manager
    assert "read = call,user\n" in manager
    assert "write = system,call,user,reporting,originate\n" in manager
    assert {p for p, part in parts.items() if part.secret} == {
        "ari-consentivr.conf", "manager.d/consentivr.conf"}
    assert parts["features-consentivr.conf"].text.startswith("[applicationmap](+)\n")
    assert "consentivr_withdraw => *9," in parts["features-consentivr.conf"].text
    assert "[consentivr-entry]" in parts["extensions-consentivr.conf"].text
    withdraw = parts["extensions-consentivr-withdraw.conf"].text
    assert "[consentivr-withdraw]" in withdraw and "[consentivr-probe]" in withdraw
    assert f"MixMonitor({tmp_path}/rec/.consentivr-doctor-" in withdraw


@pytest.mark.parametrize(("action", "classes"), [
    # `manager show command X` on Asterisk 22.10.1: the classes that allow each action
    ("MixMonitor", {"system"}),
    ("StopMixMonitor", {"system", "call"}),
    ("MixMonitorMute", {"system", "call"}),
    ("GetConfig", {"system", "config"}),
    ("ShowDialPlan", {"config", "reporting"}),
    ("UserEvent", {"user"}),
    ("Originate", {"originate"}),
    ("Filter", {"system"}),
    ("Getvar", {"call", "reporting"}),
    ("Setvar", {"call"}),
])
def test_the_ami_user_may_run_every_action_consentivr_sends(action: str,
                                                            classes: set[str]) -> None:
    assert classes & set(AMI_WRITE), action
    assert "config" not in AMI_WRITE and "command" not in AMI_WRITE  # no config writes, no CLI
    assert set(AMI_READ) == {"call", "user"}


def test_asterisk_config_fastagi_only_has_no_ari_parts(tmp_path: Path) -> None:
    config = _settings(tmp_path)
    config.write_text(re.sub(r"^ari: .*\n", "", config.read_text(), flags=re.M))
    parts = [p.path for p in snippets(load_settings(config))]
    assert "http-consentivr.conf" not in parts and "ari-consentivr.conf" not in parts
    assert "AGI(agi://127.0.0.1:4573/minimal" in snippets(load_settings(config))[-2].text


def test_add_includes_appends_once_and_keeps_the_stock_text(tmp_path: Path) -> None:
    (tmp_path / "http.conf").write_text("[general]\nbindaddr=127.0.0.1")  # no final newline
    (tmp_path / "manager.conf").write_text('[general]\n#include "manager.d/*.conf" \n')
    added = add_includes(tmp_path)
    assert ("manager.conf", '#include "manager.d/*.conf"') not in added  # Debian has it
    assert ("http.conf", "#include http-consentivr.conf") in added
    assert (tmp_path / "http.conf").read_text().startswith("[general]\nbindaddr=127.0.0.1\n")
    assert missing_includes(tmp_path) == [] and add_includes(tmp_path) == []
    text = (tmp_path / "extensions.conf").read_text()
    assert text.count("#include extensions-consentivr.conf\n") == 1


def test_asterisk_config_cli_writes_secret_files_0640(tmp_path: Path) -> None:
    out = tmp_path / "etc"
    out.mkdir()
    result = CliRunner().invoke(main, ["asterisk-config", "--config",
                                       str(_settings(tmp_path)), "--out", str(out),
                                       "--add-includes"])
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE((out / "manager.d" / "consentivr.conf").stat().st_mode) == 0o640
    assert stat.S_IMODE((out / "ari-consentivr.conf").stat().st_mode) == 0o640
    assert stat.S_IMODE((out / "extensions-consentivr.conf").stat().st_mode) == 0o644
    assert "#include features-consentivr.conf" in (out / "features.conf").read_text()
    printed = CliRunner().invoke(main, ["asterisk-config", "--config",
                                        str(_settings(tmp_path))])
    assert "; ===== manager.d/consentivr.conf =====" in printed.output


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A dir anyone may search (pytest's tmp dirs are 0700)."""
    path = Path(tempfile.mkdtemp(dir="/tmp"))
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path)


@pytest.mark.parametrize(("mode", "owner", "group", "want", "allowed"), [
    (0o600, True, False, "rw", True),
    (0o600, False, True, "r", False),
    (0o640, False, True, "r", True),
    (0o640, False, True, "w", False),
    (0o604, False, False, "r", True),
    (0o660, False, True, "rw", True),
])
def test_may_follows_the_kernel_rules(open_dir: Path, mode: int, owner: bool, group: bool,
                                      want: str, allowed: bool) -> None:
    path = open_dir / "f"
    path.write_text("x")
    os.chmod(path, mode)
    st = path.stat()
    who = Account("t", st.st_uid if owner else 64999,
                  frozenset({st.st_gid} if group else {64998}))
    assert may(who, path, want) is allowed


def test_may_needs_search_on_every_dir_above(open_dir: Path) -> None:
    inner = open_dir / "d"
    inner.mkdir()
    (inner / "f").write_text("x")
    os.chmod(inner / "f", 0o644)
    who = Account("t", 64999, frozenset({64998}))
    assert may(who, inner / "f", "r")
    os.chmod(inner, 0o700)
    assert not may(who, inner / "f", "r")


def test_recordings_dir_is_created_2770(tmp_path: Path) -> None:
    path = tmp_path / "a" / "rec"
    prepare_recordings_dir(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o2770


def test_doctor_lists_every_check_and_fails_without_a_pbx(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["doctor", "--config", str(_settings(tmp_path)),
                                       "--json"])
    assert result.exit_code == 1
    checks = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    names = [c["name"] for c in checks]
    assert names[:2] == ["ari", "ami"]
    assert {c["status"] for c in checks if c["name"] in ("ari", "ami")} == {"fail"}
    assert all(c["fix"] for c in checks if c["status"] == "fail")
    assert "prompts" in names and "secrets" in names


def test_doctor_flags_world_readable_secrets(tmp_path: Path) -> None:
    config = _settings(tmp_path)
    os.chmod(config, 0o644)
    result = CliRunner().invoke(main, ["doctor", "--config", str(config), "--json"])
    [secrets] = [json.loads(line) for line in result.output.splitlines()
                 if '"secrets"' in line]
    assert secrets["status"] == "fail" and "others may read it" in secrets["detail"]


# --------------------------------------------------------------------------- real PBX

SERVICE_UID = 64123  # "consentivr": no such user on the host; only numbers matter


@dataclass
class Install:
    """A production-shaped install under one temp dir, seen at the same path by the
    sandboxed Asterisk: /etc/consentivr, /var/lib/consentivr, the recordings dir."""

    base: Path
    pbx: StockSandboxPbx
    config: Path
    etc: Path
    var: Path
    rec: Path
    metrics_port: int
    asterisk_gid: int

    def as_service(self, *args: str, check: bool = True,
                   timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run consentivr as the service user (uid SERVICE_UID, group asterisk)."""
        cmd = [*self.setpriv(), CONSENTIVR, *args]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                             env=self.env(), check=False)
        if check:
            assert res.returncode == 0, f"{' '.join(args)}: {res.stdout}\n{res.stderr}"
        return res

    def setpriv(self) -> list[str]:
        return ["setpriv", f"--reuid={SERVICE_UID}", f"--regid={SERVICE_UID}",
                f"--groups={self.asterisk_gid}", "--inh-caps=-all", "--"]

    def env(self) -> dict[str, str]:
        return {**os.environ, "HOME": str(self.base), "CONSENTIVR_CONFIG": str(self.config)}

    def doctor(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [CONSENTIVR, "doctor", "--config", str(self.config), "--json",
             "--user", f"{SERVICE_UID}:{SERVICE_UID},{self.asterisk_gid}",
             "--asterisk-user", f"{self.asterisk_gid}:{self.asterisk_gid}"],
            capture_output=True, text=True, timeout=120, check=False)


def _skip_or_fail(why: str) -> None:
    if IN_CI:
        pytest.fail(f"stock-config install test cannot run under CI: {why}", pytrace=False)
    pytest.skip(why)


@pytest.fixture(scope="module")
def install() -> Iterator[Install]:
    for tool in ("setpriv", "sipp", "espeak-ng", "sox", "bwrap"):
        if shutil.which(tool) is None:
            _skip_or_fail(f"{tool} is not installed (./dev setup)")
    if os.geteuid() != 0:
        _skip_or_fail("needs root (the user model is tested with real uids)")
    base = Path(tempfile.mkdtemp(prefix="cv-inst-", dir="/tmp"))
    os.chmod(base, 0o755)
    etc, var = base / "etc-consentivr", base / "var-lib-consentivr"
    rec = base / "spool-asterisk-consentivr"
    http_port, ami_port, metrics_port = free_port(), free_port(), free_port()
    pbx = StockSandboxPbx(base / "pbx", http_port=http_port, ami_port=ami_port,
                          ari_password="ari-" + os.urandom(6).hex(),
                          ami_password="ami-" + os.urandom(6).hex(), binds=[base])
    try:
        pbx.provision()
    except PbxUnavailable as exc:
        _skip_or_fail(str(exc))
    _, gid = pbx.sandbox_ids("asterisk")
    # The README's steps, with this run's paths and ports.
    etc.mkdir(mode=0o750)
    os.chown(etc, 0, SERVICE_UID)
    config = example(etc)
    text = config.read_text()
    for old, new in (("http://127.0.0.1:8088", f"http://127.0.0.1:{http_port}"),
                     ("port: 5038", f"port: {ami_port}"),
                     ("/var/lib/consentivr/consent.db", f"{var}/consent.db"),
                     ("/var/spool/asterisk/consentivr", str(rec)),
                     ("/var/lib/consentivr/prompts", f"{var}/prompts"),
                     ('"127.0.0.1:9468"', f'"127.0.0.1:{metrics_port}"')):
        assert old in text, old
        text = text.replace(old, new)
    config.write_text(text)
    (etc / "dialplan" / "minimal.yaml").write_text(
        (etc / "dialplan" / "minimal.yaml").read_text().replace(
            '{context: demo, exten: "600"}', '{context: consentivr-test-desk, exten: s}'))
    for path in etc.rglob("*"):
        os.chown(path, 0, SERVICE_UID)
        os.chmod(path, 0o750 if path.is_dir() else 0o640)
    for name, secret in (("ari", pbx._ari_password), ("ami", pbx._ami_password)):
        (etc / f"{name}.password").write_text(secret + "\n")
        os.chown(etc / f"{name}.password", SERVICE_UID, SERVICE_UID)
        os.chmod(etc / f"{name}.password", 0o600)
    var.mkdir()
    os.chown(var, SERVICE_UID, gid)
    os.chmod(var, 0o2750)
    rec.mkdir()
    os.chown(rec, SERVICE_UID, gid)
    os.chmod(rec, 0o2770)
    bed = Install(base, pbx, config, etc, var, rec, metrics_port, gid)
    bed.as_service("prompts", "build", "--config", str(config), timeout=300)
    pbx.install_stock()
    out = subprocess.run([CONSENTIVR, "asterisk-config", "--config", str(config), "--out",
                          str(pbx.etc_dir), "--add-includes"],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    # the test's desk: an "agent" that echoes, so the caller is bridged (recording
    # option b, and the withdrawal key, work only in a bridge)
    (pbx.etc_dir / "extensions-test.conf").write_text(
        "[consentivr-test-desk]\nexten => s,1,Dial(Local/agent@consentivr-test-desk,30)\n"
        " same => n,Hangup()\nexten => agent,1,Answer()\n same => n,Echo()\n")
    with (pbx.etc_dir / "extensions.conf").open("a") as fh:
        fh.write("; test: the agent's desk\n#include extensions-test.conf\n")
    try:
        pbx.start()
    except PbxError as exc:
        pytest.fail(f"stock Asterisk did not start: {exc}", pytrace=False)
    service = subprocess.Popen([*bed.setpriv(), CONSENTIVR, "serve", "--config", str(config)],
                               env=bed.env(), stdout=subprocess.DEVNULL,
                               stderr=(base / "serve.log").open("wb"))
    try:
        _wait_healthy(bed, service)
        yield bed
    finally:
        service.send_signal(signal.SIGTERM)
        try:
            service.wait(30)
        except subprocess.TimeoutExpired:
            service.kill()
        pbx.stop()
        if not os.environ.get("CONSENTIVR_KEEP_INSTALL"):
            shutil.rmtree(base, ignore_errors=True)


def _wait_healthy(bed: Install, service: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if service.poll() is not None:
            pytest.fail(f"consentivr serve exited {service.returncode}:\n"
                        + (bed.base / "serve.log").read_text()[-3000:], pytrace=False)
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{bed.metrics_port}/healthz",
                                        timeout=2) as resp:
                if resp.status == 200:
                    return
        except urllib.error.HTTPError as exc:
            last = exc.read().decode(errors="replace")
        except OSError as exc:
            last = str(exc)
        time.sleep(0.3)
    pytest.fail(f"consentivr serve not healthy within {timeout:g}s: {last}\n"
                + (bed.base / "serve.log").read_text()[-3000:], pytrace=False)


def _seconds(path: Path) -> float:
    with wave.open(str(path)) as w:
        return w.getnframes() / w.getframerate()


def _answer_at(bed: Install) -> float:
    """When the question has been asked: the notice and the question, plus a margin."""
    prompts = bed.var / "prompts" / "minimal"
    return sum(_seconds(p) for p in prompts.glob("*.wav")
               if p.name.startswith(("notice", "question"))) + 1.5


def _rows(bed: Install) -> list[dict[str, object]]:
    res = bed.as_service("calls", "list", "--json", "--config", str(bed.config))
    return [json.loads(line) for line in res.stdout.splitlines()]


def _last_seq(bed: Install) -> int:
    rows = _rows(bed)
    return max((int(str(r["seq"])) for r in rows), default=0)


def _call(bed: Install, script: list[tuple[str, float | str]]) -> dict[str, object]:
    """Place one sipp call to 101 and return its consent-log row (the next one)."""
    before = _last_seq(bed)
    result = place_call(bed.pbx.endpoints, "101", script, timeout=90)
    assert result.ok, result.describe()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        rows = [r for r in _rows(bed) if int(str(r["seq"])) > before]
        if rows:
            assert len(rows) == 1, rows
            return rows[0]
        time.sleep(0.3)
    raise AssertionError(f"no consent-log row for the call: {_rows(bed)}")


def _reread(bed: Install, row: dict[str, object]) -> dict[str, object]:
    return next(r for r in _rows(bed) if r["seq"] == row["seq"])


@pytest.mark.asterisk
class TestStockInstall:
    """Debian's stock config + asterisk-config's snippets; Asterisk as `asterisk`."""

    def test_asterisk_runs_as_its_own_user(self, install: Install) -> None:
        pid = install.pbx.pid()
        assert pid is not None
        uid = int(next(line.split()[1] for line in
                       Path(f"/proc/{pid}/status").read_text().splitlines()
                       if line.startswith("Uid:")))
        assert uid == install.pbx.sandbox_ids("asterisk")[0] != 0

    def test_doctor_is_green(self, install: Install) -> None:
        res = install.doctor()
        checks = [json.loads(line) for line in res.stdout.splitlines()]
        failed = [c for c in checks if c["status"] == "fail"]
        assert res.returncode == 0 and not failed, json.dumps(failed, indent=1) + res.stderr
        assert {c["name"] for c in checks} >= {
            "ari", "http bind", "ami", "withdrawal feature", "withdrawal context",
            "AMI events", "dialplan", "recordings dir", "prompts", "database (service)",
            "database (purge)", "secrets"}

    def test_yes_call_is_recorded_by_asterisks_user(self, install: Install) -> None:
        script = [("pause", _answer_at(install)), ("dtmf", "1"), ("pause", 2.0),
                  ("audio", 4.0), ("hangup", 0)]
        row = _call(install, script)
        assert row["decisions"] == {"recording": "yes"}, row
        assert row["recording_confirmed"] == 1 and not row["withdrawn_at"], row
        path = Path(str(row["recording_path"]))
        deadline = time.monotonic() + 10
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        st = path.stat()
        assert st.st_gid == install.asterisk_gid  # the setgid dir's group
        # the file's own mode follows Asterisk's umask; the 2770 dir keeps others out
        assert not may(Account("other", 64999, frozenset({64998})), path, "r")
        assert may(Account("consentivr", SERVICE_UID, frozenset({install.asterisk_gid})),
                   path.parent, "wx")  # so consentivr may delete it (purge, withdrawal)

    def test_silent_call_is_not_recorded(self, install: Install) -> None:
        # two tries of the question (retries: 1), each with its 5 s timeout
        script = [("pause", 2 * _answer_at(install) + 12.0), ("hangup", 0)]
        row = _call(install, script)
        assert row["decisions"] == {"recording": "no_answer"}, row
        assert not row["recording_path"] or not Path(str(row["recording_path"])).exists()

    def test_star_9_withdraws_and_the_partial_recording_is_deleted(
            self, install: Install) -> None:
        script = [("pause", _answer_at(install)), ("dtmf", "1"), ("pause", 2.0),
                  ("audio", 3.0), ("dtmf", "*9"), ("audio", 3.0), ("hangup", 0)]
        row = _call(install, script)
        deadline = time.monotonic() + 20
        while not row["withdrawn_at"] and time.monotonic() < deadline:
            time.sleep(0.3)
            row = _reread(install, row)
        assert row["withdrawn_by"] == "caller", row
        # deleted by consentivr's user, through the dir's group bits
        assert not Path(str(row["recording_path"])).exists()
        listing = install.as_service("calls", "list", "--config", str(install.config))
        assert "withdrawn(caller)" in listing.stdout

    def test_purge_runs_as_the_service_user(self, install: Install) -> None:
        res = install.as_service("purge", "--config", str(install.config), "--json")
        assert json.loads(res.stdout)["counts"] is not None

    def test_the_database_is_the_service_users_alone(self, install: Install) -> None:
        db = install.var / "consent.db"
        for path in (db, db.with_name("consent.db.key")):
            st = path.stat()
            assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (SERVICE_UID, 0o600), path
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            assert conn.execute("SELECT count(*) FROM calls").fetchone()[0] >= 1


# --------------------------------------------------------------------------- FreePBX

FREEPBX_DOC = ROOT / "docs" / "freepbx.md"


def _freepbx_blocks() -> dict[str, str]:
    """What docs/freepbx.md adds to each FreePBX custom file, read from the doc itself."""
    doc = FREEPBX_DOC.read_text(encoding="utf-8")
    found: dict[str, str] = {}
    for name, body in re.findall(r"cat >> /etc/asterisk/(\S+) <<'CONF'\n(.*?)CONF\n", doc,
                                 re.S):
        found[name] = body
    for line, name in re.findall(r"echo '([^']+)' >> /etc/asterisk/(\S+)", doc):
        found[name] = found.get(name, "") + line + "\n"
    return found


def test_the_freepbx_doc_covers_the_three_custom_files() -> None:
    assert set(_freepbx_blocks()) == {"extensions_custom.conf",
                                      "features_applicationmap_custom.conf",
                                      "manager_custom.conf"}


@pytest.fixture(scope="module")
def freepbx_pbx() -> Iterator[SandboxPbx]:
    run_dir = Path(tempfile.mkdtemp(prefix="cv-fpbx-", dir="/tmp"))
    pbx = SandboxPbx(run_dir)
    try:
        pbx.start()
    except PbxUnavailable as exc:
        _skip_or_fail(str(exc))
    try:
        yield pbx
    finally:
        pbx.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


@pytest.mark.asterisk
class TestFreePbxSnippets:
    """Every snippet of docs/freepbx.md, loaded into Asterisk 22 as FreePBX would."""

    def test_the_snippets_load_without_a_warning(self, freepbx_pbx: SandboxPbx,
                                                 tmp_path: Path) -> None:
        pbx = freepbx_pbx
        ep = pbx.endpoints
        (tmp_path / "p").write_text("fpbx-secret\n")
        os.chmod(tmp_path / "p", 0o600)
        config = tmp_path / "config.yaml"
        config.write_text(
            f"ami: {{host: 127.0.0.1, port: {ep.ami_port}, username: cvfreepbx, "
            "password_file: p}\n"
            f"database: {tmp_path}/consent.db\nrecordings: {{dir: {tmp_path}/rec}}\n"
            f"prompts_dir: {tmp_path}/prompts\n"
            f"dialplan: [{ROOT}/dialplan/gemeente.yaml]\ndefault_flow: gemeente\n")
        res = CliRunner().invoke(main, ["asterisk-config", "--config", str(config),
                                        "--out", str(pbx.etc_dir)])
        assert res.exit_code == 0, res.output
        blocks = _freepbx_blocks()
        # extensions_custom.conf and features_applicationmap_custom.conf: FreePBX
        # includes them from extensions.conf and inside [applicationmap]; so does the
        # test PBX with its project files. A warning fails the reload.
        pbx.set_dialplan(blocks["extensions_custom.conf"])
        pbx.set_features(blocks["features_applicationmap_custom.conf"])
        for context in ("consentivr-entry", "consentivr-flow-gemeente",
                        "consentivr-withdraw", "consentivr-probe", "consentivr-render"):
            assert f"'{context}'" in pbx.cli(f"dialplan show {context}"), context
        assert "AGI(agi://127.0.0.1:4573/gemeente" in pbx.cli(
            "dialplan show consentivr-flow-gemeente")
        assert "consentivr_withdraw" in pbx.cli("features show")
        # manager_custom.conf: FreePBX includes it at the end of manager.conf
        (pbx.etc_dir / "manager_custom.conf").write_text(blocks["manager_custom.conf"])
        with (pbx.etc_dir / "manager.conf").open("a") as fh:
            fh.write("#include manager_custom.conf\n")
        pbx.cli("manager reload")
        user = pbx.cli("manager show user cvfreepbx")
        assert re.search(r"read perm: call,user", user), user
        assert re.search(r"write perm: system,call,user,reporting,originate", user), user
        pbx.set_features("; emptied by the FreePBX test\n")
        pbx.set_dialplan("; emptied by the FreePBX test\n")
