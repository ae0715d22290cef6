"""What the service needs to be healthy, and what is wrong now: the state behind /healthz.

Sans-IO: the service reports components going up or down and named problems; the
HTTP listener (:mod:`consentivr.exporter`) and the systemd notifier
(:mod:`consentivr.notify`) read it. Which components are needed depends on the mode:
ARI only in ``serve``, AMI only when the config has an ``ami:`` section, the consent
log always. Every component starts down ("not connected yet"): a service is healthy
only once it has said so.

Thread-safe: the consent log's writer thread may report ``log`` itself. Listeners
run in the reporting thread, after the state changed (outside the lock).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

COMPONENTS = ("ari", "ami", "log")
MODES = ("serve", "agi")


def needed_components(mode: str, ami: bool = True) -> tuple[str, ...]:
    """The components a mode needs: ``serve`` ARI, AMI (if configured), log; ``agi`` no ARI."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: expected one of {', '.join(MODES)}")
    return tuple(c for c in COMPONENTS
                 if (c != "ari" or mode == "serve") and (c != "ami" or ami))


class Health:
    """Up/down per needed component plus free problems; ``ok`` when all up and none set."""

    def __init__(self, needed: Iterable[str]) -> None:
        self.needed = tuple(needed)
        unknown = [c for c in self.needed if c not in COMPONENTS]
        if unknown:
            raise ValueError(f"unknown component(s) {unknown}: expected {COMPONENTS}")
        self._down: dict[str, str] = dict.fromkeys(self.needed, "not connected yet")
        self._problems: dict[str, str] = {}
        self._listeners: list[Callable[[Health], None]] = []
        self._lock = threading.Lock()

    # -- what the service reports --------------------------------------------

    def component_up(self, name: str, up: bool, reason: str | None = None) -> None:
        """ARI, AMI or the log went up or down; a component not needed is ignored."""
        if name not in COMPONENTS:
            raise ValueError(f"unknown component {name!r}: expected {COMPONENTS}")
        if name not in self.needed:
            return
        with self._lock:
            before = self._down.get(name)
            if up:
                self._down.pop(name, None)
            else:
                self._down[name] = reason or "down"
            changed = self._down.get(name) != before
        if changed:
            self._changed()

    def set_problem(self, name: str, reason: str | None) -> None:
        """Name a problem (e.g. "withdrawal", "path not verified"); None clears it."""
        with self._lock:
            before = self._problems.get(name)
            if reason is None:
                self._problems.pop(name, None)
            else:
                self._problems[name] = reason
            changed = self._problems.get(name) != before
        if changed:
            self._changed()

    def on_change(self, listener: Callable[[Health], None]) -> None:
        """Call ``listener(self)`` after every change (the notifier's STATUS= line)."""
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in list(self._listeners):
            listener(self)

    # -- what readers see ----------------------------------------------------

    @property
    def ok(self) -> bool:
        return not self._down and not self._problems

    def is_up(self, name: str) -> bool:
        return name in self.needed and name not in self._down

    def reasons(self) -> list[str]:
        """One line per thing wrong: ``ami: connection refused``."""
        with self._lock:
            return ([f"{name}: {why}" for name, why in self._down.items()]
                    + [f"{name}: {why}" for name, why in self._problems.items()])

    def summary(self) -> str:
        """One short line for systemd's STATUS=."""
        return "ready: " + ", ".join(f"{c} up" for c in self.needed) if self.ok \
            else "degraded: " + "; ".join(self.reasons())

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "status": "ok" if self.ok else "unhealthy",
            "components": {c: "up" if self.is_up(c) else "down" for c in self.needed},
        }
        if not self.ok:
            body["reasons"] = self.reasons()
        return body
