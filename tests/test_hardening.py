"""Regression tests for the outside security review (issue 12).

Each test names its finding (H1, M2-M4, L1, L3-L7); M1 and the E.164 part are in
test_callers.py. Every one of them failed on the code before the fix.
"""

from __future__ import annotations

import csv
import gc
import io
import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from consentivr import flowfile as config_module
from consentivr.cli.main import main
from consentivr.configfile import load_settings
from consentivr.errors import ConfigError, ConsentivrError, StoreError
from consentivr.flowfile import load_dialplans
from consentivr.purgelog import purge_lock
from consentivr.retention import PurgeOptions, run_purge
from consentivr.store import load_or_create_key, open_database
from consentivr.subject import erase_subject, export_subject
from consentivr.validation import Field, Problems
from consentivr.withdrawal import RecordingLog, apply_withdrawal
from tests.rights_fixtures import DAY, T0, Env

REC_UNTIL = T0 + 90 * DAY
CONSENTIVR = str(Path(sys.executable).with_name("consentivr"))
ALICE = "+31201234567"


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


def purged(env: Env) -> list[int]:
    return [r["seq"] for r in env.query(
        "SELECT seq FROM calls WHERE recording_purged_at IS NOT NULL ORDER BY seq")]


def as_of(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


# --- H1: a missing or unmounted recordings dir -----------------------------------------


def test_h1_purge_stops_when_the_recordings_root_is_gone(env: Env) -> None:
    for n in range(3):
        env.call(file=f"c{n + 1}.wav")
    volume = env.rec.rename(env.root / "volume")
    env.rec.symlink_to(env.root / "unmounted")  # a symlink to a volume not mounted
    code, out, err = cli("purge", "--config", str(env.config), "--as-of", as_of(REC_UNTIL))
    assert code == 1, (out, err)
    assert len(err.strip().splitlines()) == 1 and "recordings dir" in err, err
    assert purged(env) == []
    assert sorted(p.name for p in volume.iterdir()) == ["c1.wav", "c2.wav", "c3.wav"]
    statuses = [r["status"] for r in env.query("SELECT status FROM purge_runs")]
    assert "done" not in statuses and "running" not in statuses


def test_h1_purge_refuses_when_most_due_files_are_missing_at_once(env: Env) -> None:
    for n in range(12):
        env.call(file=f"c{n + 1}.wav")
    for path in env.rec.iterdir():
        path.unlink()  # an empty mount point: the files are on the unmounted volume
    code, out, err = cli("purge", "--config", str(env.config), "--as-of", as_of(REC_UNTIL))
    assert code == 1, (out, err)
    assert "missing" in err and "--allow-missing" in err and len(err.strip().splitlines()) == 1
    assert purged(env) == []
    code, out, err = cli("purge", "--config", str(env.config), "--as-of", as_of(REC_UNTIL),
                         "--allow-missing")
    assert code == 0, (out, err)
    assert purged(env) == list(range(1, 13))


def test_h1_a_few_missing_files_among_many_are_still_marked(env: Env) -> None:
    for n in range(20):
        env.call(file=f"c{n + 1}.wav")
    (env.rec / "c3.wav").unlink()
    report = run_purge(env.db, env.rec, PurgeOptions(as_of=REC_UNTIL, log_retention_days=730))
    assert report.counts["recordings_missing"] == 1
    assert report.counts["recordings_deleted"] == 19


def test_h1_erase_stops_when_the_recordings_root_is_gone(env: Env) -> None:
    env.call(file="a1.wav", caller=ALICE)
    env.rec.rename(env.root / "volume")
    with pytest.raises(StoreError, match="recordings dir"):
        erase_subject(env.db, env.rec, env.key, ALICE)
    assert env.row(1)["redacted_at"] is None and env.row(1)["recording_purged_at"] is None
    code, _, err = cli("subject", "erase", "--config", str(env.config), "--caller", ALICE,
                       "--yes")
    assert code == 1 and "recordings dir" in err and len(err.strip().splitlines()) == 1


def test_h1_withdrawal_stops_when_the_recordings_root_is_gone(env: Env) -> None:
    env.call(file="c1.wav")
    with RecordingLog(env.db) as log_:
        log_.conn.execute("UPDATE calls SET recording_confirmed=1")
    env.rec.rename(env.root / "volume")
    with RecordingLog(env.db) as log_, pytest.raises(ConsentivrError, match="recordings dir"):
        apply_withdrawal(log_, env.rec, "c1", "agent", T0 + 60, "delete")
    row = env.row(1)
    assert row["withdrawn_at"] is not None  # the withdrawal itself is logged
    assert row["recording_purged_at"] is None  # but the file is not called gone


# --- M1: callbacks export CSV injection -------------------------------------------


def test_m1_callbacks_csv_quotes_every_field_and_defuses_formulas(tmp_path: Path) -> None:
    """M1: a hostile caller id stored before intake checks never reaches a spreadsheet."""
    env = Env(tmp_path)
    env.call(caller="+31611110002", callback=True)
    env.call(caller="+31611110003", callback=True)
    env.call(caller="+31611110004", callback=True)
    env.call(caller="+31611110005", callback=True)
    hostile = ['=HYPERLINK("http://evil","x")', "+31200000001\r+31699999999",
               "\x1b]0;pwned\x07+31611110004", "@SUM(1+1)"]
    conn = env.conn()
    try:
        for seq, number in enumerate(hostile, start=2):
            conn.execute("UPDATE calls SET caller_number=? WHERE seq=?", (number, seq))
    finally:
        conn.close()
    result = CliRunner().invoke(main, ["callbacks", "export", "--by", "test", "--config",
                                       str(env.config), "--as-of", "2025-06-16"])
    assert result.exit_code == 0, result.output
    text = result.output
    assert "\x1b" not in text and "\x07" not in text and "\r" not in text
    lines = text.splitlines()
    assert all(line.startswith('"') and line.endswith('"') for line in lines), lines
    table = list(csv.reader(io.StringIO(text)))
    numbers = [row[0] for row in table[1:]]
    assert numbers == ["'+31611110002"], table
    for row in table:
        for cell in row:
            assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")), cell
    assert result.stderr_bytes is None or b"\x1b" not in (result.stderr_bytes or b"")



# --- M2: paths and names never reach the dialplan or a message unescaped ------------


def test_m2_a_config_path_with_a_newline_never_becomes_dialplan(tmp_path: Path) -> None:
    env = Env(tmp_path)
    evil = tmp_path / "x\nexten => 666,1,System(touch pwned)\n;.yaml"
    evil.write_text(env.config.read_text())
    code, out, err = cli("dialplan", "render", "--config", str(evil))
    assert code == 0, err
    assert not any(line.startswith("exten => 666") for line in out.splitlines())
    assert "System(" not in out.replace("\\n", "") or "\\nexten" in out


def test_m2_check_messages_stay_one_line_per_problem(tmp_path: Path) -> None:
    bad = tmp_path / "a\nb\x1b[2J.yaml"
    bad.write_text("version: 1\nflows:\n  main:\n    languages: [nl]\n")
    code, out, _ = cli("dialplan", "check", str(bad))
    assert code == 1
    lines = out.splitlines()
    assert "\x1b" not in out
    assert len(lines) == len([x for x in lines if ":" in x and ".yaml" in x]), lines
    assert all(line.startswith('"') for line in lines), lines


def test_m2_errors_never_carry_control_bytes_to_the_terminal(tmp_path: Path) -> None:
    code, _out, err = cli("config", "check", "--config",
                         str(tmp_path / "no\x1b]0;owned\x07such.yaml"))
    assert code == 1 and "\x1b" not in err and "\x07" not in err
    assert len(err.strip().splitlines()) == 1


# --- M3: private dirs whatever the umask, owner and mode of key and log --------------


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def test_m3_dirs_are_created_private_under_umask_000(tmp_path: Path) -> None:
    db = tmp_path / "a" / "b" / "consent.db"
    with umask(0):
        open_database(db).close()
        load_or_create_key(db, None)
        with purge_lock(tmp_path / "c" / "consent.db"):
            pass
    for d in (tmp_path / "a", tmp_path / "a" / "b", tmp_path / "c"):
        assert d.stat().st_mode & 0o777 == 0o700, d
    assert db.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "a/b/consent.db.key").stat().st_mode & 0o777 == 0o600


def test_m3_private_dir_helper_makes_every_missing_parent(tmp_path: Path) -> None:
    from consentivr.paths import make_private_dir

    with umask(0):
        make_private_dir(tmp_path / "x" / "y" / "rec", 0o750)
    assert (tmp_path / "x").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "x/y/rec").stat().st_mode & 0o777 == 0o750


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_m3_a_key_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "var" / "consent.db"
    load_or_create_key(db, None)
    key = db.with_name("consent.db.key")
    key.write_text("attacker" * 8)
    os.chown(key, 4242, 4242)
    with pytest.raises(StoreError, match="owned by"):
        load_or_create_key(db, None)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_m3_a_log_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "var" / "consent.db"
    open_database(db).close()
    os.chown(db, 4242, 4242)
    with pytest.raises(StoreError, match="owned by"):
        open_database(db)


def test_m3_a_log_writable_by_others_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "var" / "consent.db"
    open_database(db).close()
    os.chmod(db, 0o666)
    with pytest.raises(StoreError, match="writable by group or others"):
        open_database(db)


def test_m3_a_world_writable_parent_is_refused(tmp_path: Path) -> None:
    var = tmp_path / "var"
    var.mkdir()
    os.chmod(var, 0o777)
    with pytest.raises(StoreError, match="world-writable"):
        load_or_create_key(var / "consent.db", None)
    with pytest.raises(StoreError, match="world-writable"):
        open_database(var / "consent.db")
    os.chmod(var, 0o1777)  # sticky, like /tmp: others cannot swap our files
    load_or_create_key(var / "consent.db", None)


# --- M4: a recordings dir moved behind a symlink --------------------------------------


def _old_spelling(env: Env) -> Path:
    old = env.root / "spool"
    old.symlink_to(env.rec)
    return old


def test_m4_an_orphan_held_by_a_row_under_another_spelling_is_never_deleted(env: Env) -> None:
    old = _old_spelling(env)
    env.write("c1.wav")
    env.add(_record_at(1, str(old / "c1.wav")))
    env.write("c2.wav")
    env.add(_record_at(2, "/somewhere/else/entirely/c2.wav"))  # matched by call id
    opts = PurgeOptions(as_of=T0 + DAY, log_retention_days=730, delete_orphans=True,
                        orphan_grace=0)
    report = run_purge(env.db, env.rec, opts)
    assert (env.rec / "c1.wav").exists() and (env.rec / "c2.wav").exists()
    assert report.counts["orphans_deleted"] == 0


def test_m4_previous_dirs_migrate_old_paths(env: Env) -> None:
    old = _old_spelling(env)
    env.write("c1.wav")
    env.add(_record_at(1, str(old / "c1.wav")))
    code, out, err = cli("purge", "--config", str(env.config), "--as-of", as_of(REC_UNTIL))
    assert code == 3, (out, err)  # outside the dir: left alone, every night
    text = env.config.read_text().replace(
        f"  dir: {env.rec}\n", f"  dir: {env.rec}\n  previous_dirs: [{old}]\n")
    env.config.write_text(text)
    code, out, err = cli("purge", "--config", str(env.config), "--as-of", as_of(REC_UNTIL))
    assert code == 0, (out, err)
    assert not (env.rec / "c1.wav").exists() and purged(env) == [1]


def _record_at(n: int, path: str):  # type: ignore[no-untyped-def]
    from tests.rights_fixtures import record

    return record(n, recording=path)


# --- L1: a non-UTF-8 file name in the recordings dir ----------------------------------


def test_l1_a_non_utf8_file_name_never_crashes_purge(env: Env) -> None:
    env.call(file="c1.wav")
    name = os.fsencode(env.rec) + b"/\xff\xfe-odd.wav"
    with open(name, "wb") as fh:
        fh.write(b"x")
    os.utime(name, (T0, T0))
    for extra in ([], ["--json"]):
        proc = subprocess.run(
            [CONSENTIVR, "purge", "--config", str(env.config), "--as-of", as_of(T0 + DAY),
             "--delete-orphans", "--orphan-grace", "0", *extra],
            capture_output=True, timeout=60,
            env={**os.environ, "LC_ALL": "C.UTF-8", "PYTHONIOENCODING": "utf-8:strict",
                 "PYTHONUTF8": "0"})
        assert b"Traceback" not in proc.stderr, proc.stderr.decode(errors="replace")
        assert proc.returncode in (0, 3), proc.stderr
        proc.stdout.decode("utf-8")  # valid UTF-8 whatever the names
    assert "running" not in [r["status"] for r in env.query("SELECT status FROM purge_runs")]


# --- L3: a recording replaced by a FIFO -----------------------------------------------


def test_l3_export_never_hangs_on_a_fifo(env: Env, tmp_path: Path) -> None:
    env.call(file="a1.wav", caller=ALICE)
    (env.rec / "a1.wav").unlink()
    os.mkfifo(env.rec / "a1.wav")
    result: list[object] = []

    def run() -> None:
        conn = env.conn()
        try:
            result.append(export_subject(conn, env.rec, env.key, ALICE, tmp_path / "out"))
        except Exception as exc:  # reported below
            result.append(exc)
        finally:
            conn.close()

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(10)
    if worker.is_alive():  # unblock it, then fail
        fd = os.open(env.rec / "a1.wav", os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        pytest.fail("subject export hangs on a FIFO")
    export = result[0]
    assert not isinstance(export, Exception), export
    assert export.missing == [str(env.rec / "a1.wav")]  # type: ignore[attr-defined]


# --- L4: hostile inputs give one-line errors, fast ------------------------------------


def _limited() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


def _check(config: Path | str, timeout: float = 20) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run([CONSENTIVR, "config", "check", "--config", str(config)],
                              capture_output=True, timeout=timeout, preexec_fn=_limited)
    except subprocess.TimeoutExpired:
        pytest.fail(f"config check of {config} hangs")


def _one_line_error(proc: subprocess.CompletedProcess[bytes], expect: str) -> None:
    err = proc.stderr.decode()
    assert proc.returncode == 1, err
    assert "Traceback" not in err and expect in err, err


def test_l4_dev_zero_as_config(tmp_path: Path) -> None:
    started = time.monotonic()
    _one_line_error(_check("/dev/zero"), "not a regular file")
    assert time.monotonic() - started < 15


def test_l4_a_fifo_as_config(tmp_path: Path) -> None:
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)
    _one_line_error(_check(fifo), "not a regular file")


def test_l4_an_oversized_config(tmp_path: Path) -> None:
    big = tmp_path / "config.yaml"
    with open(big, "w") as fh:
        fh.write(("# " + "x" * 1000 + "\n") * 20_000)
    _one_line_error(_check(big), "too large")


def _with_password_file(env: Env, target: Path) -> None:
    env.config.write_text(env.config.read_text().replace(
        "  password: secret\n", f"  password_file: {target}\n"))


def test_l4_a_fifo_as_secret_file(env: Env) -> None:
    fifo = env.root / "secret"
    os.mkfifo(fifo, 0o600)
    _with_password_file(env, fifo)
    _one_line_error(_check(env.config), "not a regular file")


def test_l4_a_non_utf8_secret(env: Env) -> None:
    secret = env.root / "secret"
    secret.write_bytes(b"\xff\xfesecret")
    os.chmod(secret, 0o600)
    _with_password_file(env, secret)
    with pytest.raises(ConfigError) as info:
        load_settings(env.config)
    assert any("ari.password_file: " in p and "UTF-8" in p for p in info.value.problems)


@pytest.mark.parametrize(("name", "message"), [
    ('"a\\0b.wav"', "NUL"),
    ("a" * 300 + ".wav", "255 bytes"),
])
def test_l4_bad_prompt_file_names(env: Env, name: str, message: str) -> None:
    env.config.write_text(env.config.read_text().replace(
        "en: {media: [sound:hello-world]}", f"en: {{file: {name}}}"))
    with pytest.raises(ConfigError) as info:
        load_settings(env.config)
    assert any("flows.main.notice.en.file: " in p and message in p
               for p in info.value.problems), info.value.problems


# --- L5: the duplicate check on numbers is linear ---------------------------------------


def _numbers_time(n: int) -> float:
    text = "numbers:\n" + "".join(f"  - '{100000 + i}'\n" for i in range(n))
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    best = float("inf")
    for _ in range(3):
        field = Field(node, "", Problems("x.yaml"))
        numbers = field.mapping(optional=("numbers",))["numbers"]  # type: ignore[index]
        scope = config_module.FlowScope(Path("/nonexistent"))
        gc.disable()  # a collection during the large run is not the check's cost
        try:
            started = time.perf_counter()
            config_module._numbers(numbers, "main", scope)
            best = min(best, time.perf_counter() - started)
        finally:
            gc.enable()
    return best


def test_l5_duplicate_check_on_numbers_is_linear() -> None:
    small, large = _numbers_time(4000), _numbers_time(32000)
    # Linear: about 8x for 8x the numbers; quadratic would be about 64x.
    assert large / small < 24, (small, large)


# --- L6: check rejects what render rejects; Asterisk's length limits ----------------------


DIALPLAN = """\
version: 1
flows:
  {flow}:
    numbers: ["{number}"]
    languages: [en]
    notice:
      en: {{media: ["{sound}"]}}
    not_recorded:
      en: {{media: [sound:beep]}}
    purposes: {{}}
    destination: {{context: "{context}"}}
"""


@pytest.mark.parametrize(("field", "value", "where"), [
    ("sound", "sound:hello\\nworld", "notice.en.media"),
    ("sound", "sound:a)b", "notice.en.media"),
    ("sound", "sound:a,b", "notice.en.media"),
    ("sound", "sound:${EVIL}", "notice.en.media"),
    ("flow", "f" * 70, "flows"),
    ("context", "c" * 80, "destination.context"),
    ("number", "1" * 80, "numbers"),
])
def test_l6_check_rejects_what_render_rejects(tmp_path: Path, field: str, value: str,
                                               where: str) -> None:
    values = {"flow": "main", "number": "100", "sound": "sound:hello", "context": "desk"}
    values[field] = value
    path = tmp_path / "d.yaml"
    path.write_text(DIALPLAN.format(**values))
    with pytest.raises(ConfigError) as info:
        load_dialplans([path], tmp_path)
    problems = info.value.problems
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{path}:"), problems
    assert where in problems[0], problems
    code, out, _ = cli("dialplan", "check", str(path), "--prompts-dir", str(tmp_path))
    assert code == 1 and out.startswith(f"{path}:")


# --- L7: subject export --out never writes into someone else's dir -------------------------


def test_l7_export_out_is_private_or_refused(env: Env, tmp_path: Path) -> None:
    env.call(file="a1.wav", caller=ALICE)
    given = tmp_path / "given"
    given.mkdir()
    os.chmod(given, 0o777)
    conn = env.conn()
    try:
        export_subject(conn, env.rec, env.key, ALICE, given)
    finally:
        conn.close()
    assert given.stat().st_mode & 0o777 == 0o700
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir()
    conn = env.conn()
    try:
        with pytest.raises(ConsentivrError, match="symlink"):
            export_subject(conn, env.rec, env.key, ALICE, link)
    finally:
        conn.close()
    assert not (tmp_path / "elsewhere" / "subject.json").exists()
