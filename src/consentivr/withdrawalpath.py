"""Can the withdrawal key be honoured right now? Three checks over AMI.

A caller who agreed to recording must be able to withdraw with one key (``*9``):
Asterisk's features map stops MixMonitor in the dialplan, and consentivr hears the
``UserEvent`` over AMI and logs the withdrawal (and deletes the partial file, if so
configured). That works only when:

- **feature**: the ``consentivr_withdraw`` entry with the configured keys is in
  Asterisk's ``[applicationmap]`` (``features.conf``, includes followed);
- **context**: the ``consentivr-withdraw`` dialplan context is loaded;
- **events**: user events reach our AMI connection (``read=call,user``), proven by a
  ``UserEvent`` we send and receive.

The service runs these at start and on every AMI (re)login; while any fails it starts
no recording (calls go on, unrecorded) and ``/healthz`` says why. ``consentivr doctor``
runs the same checks.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from consentivr.errors import AmiError
from consentivr.features import FEATURE_NAME, WITHDRAW_CONTEXT
from consentivr.settings import WithdrawalSettings

PROBE_EVENT = "ConsentivrProbe"

Action = Callable[[Mapping[str, str]], Awaitable[Any]]  # raises AmiError unless success
Probe = Callable[[str], Awaitable[bool]]  # send a UserEvent with this token; True if heard


@dataclass(frozen=True)
class Finding:
    check: str  # feature | context | events
    ok: bool
    detail: str  # what was found
    fix: str = ""  # what to do about it, when not ok


async def check_withdrawal_path(action: Action, probe: Probe,
                                withdrawal: WithdrawalSettings) -> list[Finding]:
    """The three findings, in order; each one says what it found."""
    return [await _feature(action, withdrawal), await _context(action), await _events(probe)]


def problem(findings: list[Finding]) -> str | None:
    """One line naming every failed check, or None when the path works."""
    failed = [f"{f.check}: {f.detail}" for f in findings if not f.ok]
    return "withdrawal key cannot be honoured (" + "; ".join(failed) + ")" if failed else None


async def _feature(action: Action, withdrawal: WithdrawalSettings) -> Finding:
    fix = ("write it with `consentivr asterisk-config` (or `consentivr recording features`), "
           "#include it under [applicationmap] in features.conf, then "
           "`asterisk -rx 'module reload features'`")
    try:
        response = await action({"Action": "GetConfig", "Filename": "features.conf",
                                 "Category": "applicationmap"})
    except AmiError as exc:
        return Finding("feature", False, f"cannot read features.conf over AMI ({exc})",
                       "give the AMI user write=system (GetConfig), or " + fix)
    lines = [str(v) for k, v in _fields(response).items() if k.startswith("Line-")]
    entries = [line.split("=", 1)[1].strip().lstrip(">").strip() for line in lines
               if line.split("=", 1)[0].strip() == FEATURE_NAME and "=" in line]
    if not entries:
        return Finding("feature", False, f"no {FEATURE_NAME} in [applicationmap]", fix)
    keys = entries[-1].split(",", 1)[0].strip()
    if keys != withdrawal.keys:
        return Finding("feature", False,
                       f"{FEATURE_NAME} is on {keys!r}, the config says {withdrawal.keys!r}",
                       fix)
    return Finding("feature", True, f"{FEATURE_NAME} => {keys} in [applicationmap]")


async def _context(action: Action) -> Finding:
    try:
        await action({"Action": "ShowDialPlan", "Context": WITHDRAW_CONTEXT})
    except AmiError as exc:
        return Finding("context", False, f"dialplan context {WITHDRAW_CONTEXT} not loaded "
                       f"({exc})",
                       "write it with `consentivr asterisk-config` (or `consentivr recording "
                       "features --dialplan-out ...`), #include it from extensions.conf, then "
                       "`asterisk -rx 'dialplan reload'`; ShowDialPlan needs the AMI user's "
                       "write=reporting")
    return Finding("context", True, f"dialplan context {WITHDRAW_CONTEXT} loaded")


async def _events(probe: Probe) -> Finding:
    fix = ("in manager.conf give the consentivr user read=call,user and write=system,call,"
           "user,reporting (`consentivr asterisk-config` writes it), then "
           "`asterisk -rx 'manager reload'`")
    try:
        heard = await probe(secrets.token_hex(8))
    except AmiError as exc:
        return Finding("events", False, f"cannot send a UserEvent ({exc})", fix)
    if not heard:
        return Finding("events", False, "a UserEvent we sent never came back", fix)
    return Finding("events", True, "user events reach consentivr")


def _fields(response: Any) -> Mapping[str, Any]:
    first = response[0] if isinstance(response, list) and response else response
    return first if isinstance(first, Mapping) else {}


class UserEventProbe:
    """Sends a ``UserEvent`` and waits to hear it back on an AMI event stream: proof
    that user events reach us. Feed it every event with :meth:`heard`."""

    def __init__(self) -> None:
        self._waiting: dict[str, asyncio.Future[None]] = {}

    async def probe(self, action: Action, token: str, timeout: float = 3.0) -> bool:
        waiter = asyncio.get_running_loop().create_future()
        self._waiting[token] = waiter
        try:
            await action({"Action": "UserEvent", "UserEvent": PROBE_EVENT, "Token": token})
            await asyncio.wait_for(waiter, timeout)
            return True
        except TimeoutError:
            return False
        finally:
            self._waiting.pop(token, None)

    def heard(self, event: Mapping[str, Any]) -> bool:
        """True when ``event`` is one of our probes (then it is for nobody else)."""
        if event.get("UserEvent") != PROBE_EVENT:
            return False
        waiter = self._waiting.get(str(event.get("Token", "")))
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        return True


class RecordingGate:
    """May recordings start now? Closed, with the reason, while the withdrawal path is
    not verified; the flow reads it for each new call (and records nothing while closed)."""

    def __init__(self, reason: str | None = "withdrawal path not checked yet") -> None:
        self.reason = reason

    def set(self, reason: str | None) -> bool:
        """Open (None) or close it; True when that changed its state."""
        changed = (reason is None) != (self.reason is None)
        self.reason = reason
        return changed
