"""`calls list`: the REC column says withdrawn once a withdrawal is logged (issue 19)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from consentivr.cli.calls import recording_status
from consentivr.cli.main import main
from consentivr.withdrawal import RecordingLog
from tests.rights_fixtures import T0, Env


@pytest.mark.parametrize(("row", "shown"), [
    ({"recording_confirmed": 1, "withdrawn_at": None}, "confirmed"),
    ({"recording_confirmed": 0, "withdrawn_at": None}, "FAILED"),
    ({"recording_confirmed": None, "withdrawn_at": None}, "-"),
    ({"recording_confirmed": 1, "withdrawn_at": "2025-06-15T15:07:00Z",
      "withdrawn_by": "caller"}, "withdrawn(caller)"),
    # a late consent voided by the system: not recorded, and withdrawn
    ({"recording_confirmed": 0, "withdrawn_at": "2025-06-15T15:07:00Z",
      "withdrawn_by": "system"}, "withdrawn(system)"),
])
def test_rec_column(row: dict[str, object], shown: str) -> None:
    assert recording_status(row) == shown


def test_calls_list_shows_a_withdrawn_recording_as_withdrawn(tmp_path: Path) -> None:
    env = Env(tmp_path)
    env.call(file="c1.wav")
    env.call(file="c2.wav")
    log = RecordingLog(env.db)
    try:
        log.conn.execute("UPDATE calls SET recording_confirmed=1")
        log.conn.commit()
        assert log.withdraw("c1", T0 + 5, "caller", recorded=True)
    finally:
        log.close()
    result = CliRunner().invoke(main, ["calls", "list", "--config", str(env.config)])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines()[1:]}
    assert lines["c1"].endswith("withdrawn(caller)")
    assert lines["c2"].endswith("confirmed")
