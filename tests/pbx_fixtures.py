"""pytest plugin: a real Asterisk for the whole test session.

Load it from ``tests/conftest.py`` with ``pytest_plugins = ["tests.pbx_fixtures"]``.

The session fixture ``pbx`` yields a ``consentivr_testbed.pbx.Pbx`` (``.endpoints``,
``.cli()``, ``.set_dialplan()``, ``.set_rendered_dialplan()``, ``.set_features()``,
``.log_path``, ``.shared_dir``):

* by default a ``SandboxPbx`` (Debian forky's (or sid's) Asterisk under bwrap, see
  ``asterisk/README.md``) in ``/tmp/consentivr-pbx-XXXX``, whose ``shared/`` dir
  is visible to Asterisk at the same path;
* with ``CONSENTIVR_TEST_ARI_URL`` set, the user's own Asterisk (``ExternalPbx``).

If this machine cannot run the sandbox (no root, no bwrap, no network for the
first debootstrap) the tests that need it are skipped; with ``CI=true`` they fail.
Every test that uses ``pbx`` gets the ``asterisk`` marker, and when it fails, its
report shows the Asterisk log path and the log's last 30 lines.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from consentivr_testbed.pbx import (
    ExternalPbx,
    Pbx,
    PbxError,
    PbxUnavailable,
    SandboxPbx,
    tail,
)

# Also the hooks, so that ``from tests.pbx_fixtures import *`` in a conftest works.
__all__ = [
    "pbx",
    "pytest_collection_modifyitems",
    "pytest_configure",
    "pytest_runtest_makereport",
]

_ACTIVE = pytest.StashKey["Pbx | None"]()
_FAILED = pytest.StashKey[bool]()


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _unavailable(reason: str) -> None:
    if _in_ci():
        pytest.fail(f"test PBX unavailable under CI: {reason}", pytrace=False)
    pytest.skip(f"test PBX unavailable: {reason}")


@pytest.fixture(scope="session")
def pbx(request: pytest.FixtureRequest) -> Iterator[Pbx]:
    config = request.config
    # pytest.fail/skip are called outside the except blocks: no chained tracebacks.
    problem: str | None = None
    external = None
    try:
        external = ExternalPbx.from_env()
        if external is not None:
            external.check()
    except PbxError as exc:
        problem = f"external Asterisk (CONSENTIVR_TEST_ARI_URL): {exc}"
    if problem:
        pytest.fail(problem, pytrace=False)
    if external is not None:
        config.stash[_ACTIVE] = external
        yield external
        config.stash[_ACTIVE] = None
        return

    # A short /tmp path: Asterisk's control socket lives in it (108-byte limit).
    base = Path(tempfile.mkdtemp(prefix="consentivr-pbx-", dir="/tmp"))
    sandbox = SandboxPbx(base / "run", shared_dir=base / "shared")
    config.stash[_FAILED] = False
    unavailable: str | None = None
    try:
        sandbox.start()
    except PbxUnavailable as exc:
        unavailable = str(exc)
    except PbxError as exc:
        problem = f"test PBX did not start: {exc}"
    if unavailable:
        shutil.rmtree(base, ignore_errors=True)
        _unavailable(unavailable)
    if problem:
        pytest.fail(problem, pytrace=False)
    config.stash[_ACTIVE] = sandbox
    try:
        yield sandbox
    finally:
        config.stash[_ACTIVE] = None
        sandbox.stop()
        # Keep the run dir (logs, recordings) when something failed, for a post-mortem.
        if config.stash.get(_FAILED, False) or os.environ.get("CONSENTIVR_KEEP_PBX"):
            reporter = config.pluginmanager.get_plugin("terminalreporter")
            if reporter is not None:
                reporter.write_line(f"test PBX files kept in {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


def pytest_configure(config: pytest.Config) -> None:
    # Also registered in pyproject.toml; repeated here so the plugin works anywhere.
    config.addinivalue_line("markers", "asterisk: needs the real Asterisk test PBX")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "pbx" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.asterisk)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report: pytest.TestReport = yield
    if report.failed and "pbx" in getattr(item, "fixturenames", ()):
        item.config.stash[_FAILED] = True
        active = item.config.stash.get(_ACTIVE, None)
        if active is not None:
            log_path = active.log_path
            text = (
                f"{log_path} (last 30 lines):\n{tail(log_path, 30)}"
                if log_path is not None
                else "unknown; set CONSENTIVR_TEST_ASTERISK_LOG to see it here"
            )
            report.sections.append(("Asterisk log", text))
    return report
