"""Which recordings must be muted, began or ended: a pure view of AMI events.

Feed it AMI events (``dict`` of headers) with their arrival time; it returns what
to do. It decides, the listener (:mod:`consentivr.listener`) acts.

Recording hygiene, on top of MixMonitor's option ``b`` (record only while bridged,
which already leaves out the consent menu, ringing and queue wait):

- **Hold.** A recorded channel is muted (``MixMonitorMute``, both directions)
  while anyone it is connected to is on hold (``Hold`` event: their phone put the
  call on hold) or hears music on hold (``MusicOnHoldStart``), itself included.
  "Connected" follows bridges and the two halves of Local channels (``LocalBridge``),
  so a queue member reached through ``Local/...`` counts like a phone.
- **Actual start and stop.** The recording really begins when the recorded channel
  first enters a bridge, and ends at ``MixMonitorStop`` or hangup.
- **Withdrawal by key.** ``UserEvent(ConsentivrWithdraw)`` from the withdraw context.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from consentivr.features import USER_EVENT

# Enough for any real call; a bound so that a huge conference cannot stall us.
_MAX_COMPONENT = 64


@dataclass(frozen=True)
class Mute:
    """Mute (or unmute) MixMonitor on a recorded channel."""

    channel: str
    uniqueid: str
    muted: bool
    why: str
    seconds: float = 0.0  # on unmute: how long it was muted


@dataclass(frozen=True)
class RecordingBegan:
    uniqueid: str
    channel: str
    at: float


@dataclass(frozen=True)
class RecordingEnded:
    uniqueid: str
    channel: str
    at: float


@dataclass(frozen=True)
class Withdrawn:
    call_id: str  # may be empty: then look the call up by uniqueid
    uniqueid: str
    channel: str
    by: str
    at: float


Command = Mute | RecordingBegan | RecordingEnded | Withdrawn


@dataclass
class RecordingTracker:
    recorded: dict[str, str] = field(default_factory=dict)  # uniqueid -> channel name
    began: set[str] = field(default_factory=set)
    names: dict[str, str] = field(default_factory=dict)
    bridge_of: dict[str, str] = field(default_factory=dict)
    members: dict[str, set[str]] = field(default_factory=dict)
    local_peer: dict[str, str] = field(default_factory=dict)
    held: set[str] = field(default_factory=set)  # Hold: their phone holds the call
    moh: set[str] = field(default_factory=set)  # they hear music on hold
    muted: dict[str, float] = field(default_factory=dict)  # uniqueid -> since

    def handle(self, event: Mapping[str, str], at: float) -> list[Command]:
        kind = event.get("Event", "")
        uid = event.get("Uniqueid", "")
        if uid and event.get("Channel"):
            self.names[uid] = event["Channel"]
        out: list[Command] = []
        match kind:
            case "MixMonitorStart" if uid:
                self.recorded[uid] = self.names.get(uid, "")
                if uid in self.bridge_of:
                    out += self._began(uid, at)
            case "MixMonitorStop" if uid in self.recorded:
                out += self._ended(uid, at)
            case "BridgeEnter" if uid and event.get("BridgeUniqueid"):
                self._leave(uid)
                bridge = event["BridgeUniqueid"]
                self.bridge_of[uid] = bridge
                self.members.setdefault(bridge, set()).add(uid)
                if uid in self.recorded:
                    out += self._began(uid, at)
            case "BridgeLeave" if uid:
                self._leave(uid)
            case "LocalBridge":
                one, two = event.get("LocalOneUniqueid", ""), event.get("LocalTwoUniqueid", "")
                if one and two:
                    self.local_peer[one], self.local_peer[two] = two, one
                    for u, name in ((one, "LocalOneChannel"), (two, "LocalTwoChannel")):
                        if event.get(name):
                            self.names[u] = event[name]
            case "Hold" if uid:
                self.held.add(uid)
            case "Unhold":
                self.held.discard(uid)
            case "MusicOnHoldStart" if uid:
                self.moh.add(uid)
            case "MusicOnHoldStop":
                self.moh.discard(uid)
            case "Rename" if uid and event.get("Newname"):
                self.names[uid] = event["Newname"]
                if uid in self.recorded:
                    self.recorded[uid] = event["Newname"]
            case "Hangup" if uid:
                if uid in self.recorded:
                    out += self._ended(uid, at)
                self._forget(uid)
            case "UserEvent" if event.get("UserEvent") == USER_EVENT:
                return [Withdrawn(
                    call_id=event.get("CallID", "").strip(), uniqueid=uid,
                    channel=event.get("Channel", ""),
                    by=event.get("By", "").strip() or "caller",
                    at=_epoch(event.get("At", ""), at),
                )]
            case _:
                return out
        return out + self._mutes(at)

    # -- state --------------------------------------------------------------

    def _began(self, uid: str, at: float) -> list[Command]:
        if uid in self.began:
            return []
        self.began.add(uid)
        return [RecordingBegan(uid, self._name(uid), at)]

    def _ended(self, uid: str, at: float) -> list[Command]:
        name = self._name(uid)
        self.recorded.pop(uid, None)
        self.began.discard(uid)
        self.muted.pop(uid, None)  # MixMonitor is gone: nothing to unmute
        return [RecordingEnded(uid, name, at)]

    def _leave(self, uid: str) -> None:
        bridge = self.bridge_of.pop(uid, None)
        if bridge is not None:
            members = self.members.get(bridge, set())
            members.discard(uid)
            if not members:
                self.members.pop(bridge, None)

    def _forget(self, uid: str) -> None:
        self._leave(uid)
        peer = self.local_peer.pop(uid, None)
        if peer is not None and self.local_peer.get(peer) == uid:
            self.local_peer.pop(peer, None)
        self.held.discard(uid)
        self.moh.discard(uid)
        self.names.pop(uid, None)

    def _name(self, uid: str) -> str:
        return self.recorded.get(uid) or self.names.get(uid, "")

    # -- muting -------------------------------------------------------------

    def connected(self, uid: str) -> set[str]:
        """The channel and everything it talks with, through bridges and Local pairs."""
        seen = {uid}
        todo = [uid]
        while todo and len(seen) < _MAX_COMPONENT:
            here = todo.pop()
            near = set(self.members.get(self.bridge_of.get(here, ""), ()))
            peer = self.local_peer.get(here)
            if peer:
                near.add(peer)
            for other in near - seen:
                seen.add(other)
                todo.append(other)
        return seen

    def _reason(self, uid: str) -> str | None:
        for other in sorted(self.connected(uid)):
            if other in self.held:
                return f"hold by {self.names.get(other, other)}"
            if other in self.moh:
                return f"music on hold on {self.names.get(other, other)}"
        return None

    def _mutes(self, at: float) -> list[Command]:
        if not (self.held or self.moh or self.muted):
            return []  # nobody holds and nothing is muted: nothing to (un)mute
        out: list[Command] = []
        for uid in sorted(self.recorded):
            why = self._reason(uid)
            if why and uid not in self.muted:
                self.muted[uid] = at
                out.append(Mute(self._name(uid), uid, True, why))
            elif not why and uid in self.muted:
                since = self.muted.pop(uid)
                out.append(Mute(self._name(uid), uid, False, "hold is over", at - since))
        return out


def _epoch(text: str, default: float) -> float:
    try:
        value = float(text)
    except ValueError:
        return default
    # A clock far off (or a garbled header) must not put the withdrawal elsewhere in time.
    return value if abs(value - default) < 3600 else default
