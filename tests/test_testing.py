"""consentivr.testing: the shipped fakes run a real flow, and say what it did."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from consentivr.cli.main import main
from consentivr.configfile import load_settings
from consentivr.model import Decision, Flow
from consentivr.testing import HANGUP, FakeCommitter, run_call


@pytest.fixture(scope="module")
def minimal(tmp_path_factory: pytest.TempPathFactory) -> Flow:
    """The shipped example's flow, as a user would load their own."""
    out = tmp_path_factory.mktemp("example")
    result = CliRunner().invoke(main, ["example-config", "--out", str(out)])
    assert result.exit_code == 0, result.output
    for name in ("ari", "ami"):
        (out / f"{name}.password").write_text("s3cret\n")
        os.chmod(out / f"{name}.password", 0o600)
    return load_settings(Path(out / "config.yaml")).flows["minimal"]


@pytest.mark.parametrize(
    ("keys", "decision", "recorded", "outcome"),
    [
        (["1"], Decision.YES, True, "completed"),
        (["2"], Decision.NO, False, "completed"),
        ([], Decision.NO_ANSWER, False, "completed"),  # silence is no consent
        ([HANGUP], Decision.ABANDONED, False, "abandoned"),
    ],
)
def test_run_call(minimal: Flow, keys: list[str | None], decision: Decision,
                  recorded: bool, outcome: str) -> None:
    transport, log = run_call(minimal, keys)
    assert transport.commands[0] == ("answer",)
    assert transport.played, "the notice is played first"
    (row,) = log.decisions
    assert row.outcome == outcome
    assert row.decisions.get("recording") == decision
    assert bool(transport.recordings) is recorded
    assert bool(row.recording_path) is recorded
    assert transport.closed


def test_a_failed_commit_means_no_recording(minimal: Flow) -> None:
    """The fake log can fail like a locked database: the yes was pressed, but the call
    goes on unrecorded, since recording waits for the committed row."""
    transport, log = run_call(minimal, ["1"], committer=FakeCommitter(fail=1))
    assert [kind for kind, _ in log.failed] == ["append"]
    assert transport.recordings == []
    assert transport.destination is not False  # the caller still reaches the desk
