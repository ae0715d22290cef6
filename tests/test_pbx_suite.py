"""Which Debian suite the sandbox PBX is built from: forky, sid as the fallback.

No debootstrap runs here: ``FakeDebootstrap`` stands in for it and for the
``asterisk -V`` check, so the fallback is tested without a network or root. The real
provisioning runs in ``./dev test`` before the suite (and in test_pbx.py's fixtures).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from consentivr_testbed.pbx import (
    DEFAULT_SUITE,
    FALLBACK_SUITE,
    SUITE_ENV,
    PbxUnavailable,
    SandboxPbx,
    main,
    suites_to_try,
)


class FakeDebootstrap(SandboxPbx):
    """debootstrap that yields a working Asterisk only for the suites in ``good``."""

    def __init__(self, cache_dir: Path, good: set[str]) -> None:
        super().__init__(cache_dir / "run", cache_dir=cache_dir)
        self.good = good
        self.ran: list[str] = []

    def _root_works(self, root: Path) -> bool:
        return (root / "asterisk-works").exists()

    def _run_debootstrap(self, cmd: list[str], log_file: Path) -> int:
        suite, target = cmd[3], Path(cmd[4])
        self.ran.append(suite)
        target.mkdir(parents=True)
        if suite in self.good:
            (target / "asterisk-works").touch()
        return 0  # debootstrap "succeeded" either way; the asterisk check decides


@pytest.fixture
def as_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("os.geteuid", lambda: 0)
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.delenv(SUITE_ENV, raising=False)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, ("forky", "sid")),
        ({SUITE_ENV: ""}, ("forky", "sid")),
        ({SUITE_ENV: "sid"}, ("sid",)),
        ({SUITE_ENV: "trixie"}, ("trixie",)),
    ],
)
def test_suites_to_try(env: dict[str, str], expected: tuple[str, ...]) -> None:
    assert (DEFAULT_SUITE, FALLBACK_SUITE) == ("forky", "sid")
    assert suites_to_try(env) == expected


@pytest.mark.parametrize(
    ("good", "env", "ran", "used"),
    [
        # forky works: sid is never built.
        ({"forky", "sid"}, None, ["forky"], "forky"),
        # forky has no usable Asterisk: sid is built and used.
        ({"sid"}, None, ["forky", "sid"], "sid"),
        # The variable chooses one suite, with no fallback.
        ({"forky", "sid"}, "sid", ["sid"], "sid"),
    ],
)
def test_provision_falls_back_to_sid(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    as_root: None,
    good: set[str],
    env: str | None,
    ran: list[str],
    used: str,
) -> None:
    if env:
        monkeypatch.setenv(SUITE_ENV, env)
    pbx = FakeDebootstrap(tmp_path, good)
    root = pbx.provision()
    assert pbx.ran == ran
    assert (pbx.suite, pbx.root, root) == (used, tmp_path / f"{used}-root", root)
    assert (root / "asterisk-works").exists()
    # The failed tree never takes the place of a cache: nothing but the working root.
    assert sorted(p.name for p in tmp_path.glob("*-root*")) == [f"{used}-root"]


def test_no_suite_works_reports_each(tmp_path: Path, as_root: None) -> None:
    pbx = FakeDebootstrap(tmp_path, good=set())
    with pytest.raises(PbxUnavailable) as caught:
        pbx.provision()
    assert pbx.ran == ["forky", "sid"]
    text = str(caught.value)
    assert "Debian forky: debootstrap of Debian forky" in text
    assert "Debian sid: debootstrap of Debian sid" in text


def test_cached_sid_root_serves_when_forky_cannot_be_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, as_root: None
) -> None:
    """An old sid cache keeps working where forky cannot be built (here: not root)."""
    (tmp_path / "sid-root").mkdir()
    (tmp_path / "sid-root" / "asterisk-works").touch()
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    pbx = FakeDebootstrap(tmp_path, good={"forky"})
    assert pbx.provision() == tmp_path / "sid-root"
    assert (pbx.ran, pbx.suite) == ([], "sid")


def test_provision_command_says_which_suite(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    as_root: None,
) -> None:
    (tmp_path / "sid-root").mkdir()
    (tmp_path / "sid-root" / "asterisk-works").touch()
    monkeypatch.setattr(SandboxPbx, "_root_works", FakeDebootstrap._root_works)
    monkeypatch.setattr(SandboxPbx, "_run_debootstrap", lambda self, cmd, log: 1)
    with caplog.at_level(logging.INFO):
        assert main(["provision", "--cache-dir", str(tmp_path)]) == 0
    assert (
        f"Asterisk sandbox ready: Debian sid (fallback: no usable Asterisk from forky), "
        f"{tmp_path / 'sid-root'}"
    ) in caplog.text
