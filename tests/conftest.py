"""Shared test setup: the real-Asterisk fixtures, and the CI rule that a skipped
real-Asterisk test is a failure."""

from __future__ import annotations

import os

import pytest

pytest_plugins = ["tests.pbx_fixtures"]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    in_ci = os.environ.get("CI", "").lower() == "true"
    if in_ci and report.skipped and item.get_closest_marker("asterisk") is not None:
        # Under CI, "could not reach Asterisk" must never look like a pass.
        report.outcome = "failed"
        report.longrepr = (
            f"CI=true: real-Asterisk test {item.nodeid} was skipped: {report.longrepr}"
        )
