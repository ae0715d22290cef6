"""The withdrawal-path checks (issue 19), against scripted AMI answers.

The same checks run on the real Asterisk in ``tests/test_e2e_ops.py`` (fail closed
while the feature is missing, in both modes)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import pytest

from consentivr.errors import AmiError
from consentivr.settings import WithdrawalSettings
from consentivr.withdrawalpath import RecordingGate, check_withdrawal_path, problem

FEATURE = {"Response": "Success", "Category-000000": "applicationmap",
           "Line-000000-000000": "consentivr_withdraw=*9,self,Gosub(consentivr-withdraw,s,1)"}
OTHER_KEYS = {**FEATURE, "Line-000000-000000": "consentivr_withdraw=#81,self,Gosub(x,s,1)"}
NO_FEATURE = {"Response": "Success", "Category-000000": "applicationmap"}
CONTEXT = [{"Response": "Success", "EventList": "start"}, {"Event": "ShowDialPlanComplete"}]


def _run(getconfig: Any, showdialplan: Any, heard: bool | Exception) -> list[Any]:
    async def action(fields: Mapping[str, str]) -> Any:
        answer = {"GetConfig": getconfig, "ShowDialPlan": showdialplan}[fields["Action"]]
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def probe(token: str) -> bool:
        assert len(token) == 16
        if isinstance(heard, Exception):
            raise heard
        return heard

    return asyncio.run(check_withdrawal_path(action, probe, WithdrawalSettings(keys="*9")))


@pytest.mark.parametrize(("getconfig", "showdialplan", "heard", "failed", "says"), [
    (FEATURE, CONTEXT, True, [], None),
    (NO_FEATURE, CONTEXT, True, ["feature"], "no consentivr_withdraw in [applicationmap]"),
    (OTHER_KEYS, CONTEXT, True, ["feature"], "is on '#81', the config says '*9'"),
    (AmiError("AMI GetConfig: Permission denied"), CONTEXT, True, ["feature"],
     "cannot read features.conf"),
    (FEATURE, AmiError("AMI ShowDialPlan: Did not find context consentivr-withdraw"), True,
     ["context"], "not loaded"),
    (FEATURE, CONTEXT, False, ["events"], "never came back"),
    (FEATURE, CONTEXT, AmiError("AMI UserEvent: Permission denied"), ["events"],
     "cannot send a UserEvent"),
    (NO_FEATURE, AmiError("x"), False, ["feature", "context", "events"], None),
])
def test_withdrawal_path_findings(getconfig: Any, showdialplan: Any, heard: Any,
                                  failed: list[str], says: str | None) -> None:
    findings = _run(getconfig, showdialplan, heard)
    assert [f.check for f in findings] == ["feature", "context", "events"]
    assert [f.check for f in findings if not f.ok] == failed
    assert all(f.fix for f in findings if not f.ok), "every failure says how to fix it"
    reason = problem(findings)
    assert (reason is None) == (not failed)
    if says:
        assert says in (reason or "")


def test_the_gate_reports_state_changes_only() -> None:
    gate = RecordingGate()
    assert gate.reason is not None, "closed until checked"
    assert gate.set(None) is True and gate.reason is None
    assert gate.set(None) is False
    assert gate.set("broken") is True
    assert gate.set("still broken, other words") is False
