"""systemd's notify protocol (sd_notify), for ``Type=notify`` units with ``WatchdogSec=``.

One datagram per message to the unix socket named in ``$NOTIFY_SOCKET`` (a path,
or ``@name`` for an abstract socket). Without ``$NOTIFY_SOCKET`` (not started by
systemd) every call does nothing. Written here rather than pulled in from a
library: it is one ``sendto``.

The watchdog pings ``WATCHDOG=1`` from the event loop every ``$WATCHDOG_USEC / 2``:
a loop that is stuck stops pinging, and systemd restarts the service.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Mapping

from consentivr.health import Health

log = logging.getLogger(__name__)


def _address(value: str) -> str | bytes | None:
    if value.startswith("@"):
        return b"\0" + value[1:].encode()  # abstract namespace (Linux)
    if value.startswith("/"):
        return value
    return None  # vsock and other forms: not for us


class Notifier:
    """Sends READY=1, STOPPING=1, STATUS=... and WATCHDOG=1 when run under systemd."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = _address(env.get("NOTIFY_SOCKET", ""))
        self.watchdog_interval = _watchdog_interval(env)
        self._sock: socket.socket | None = None
        self._ready = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """Send ``KEY=value`` lines as one datagram; False when not sent (never raises)."""
        if self.address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(fields).encode(), self.address)
            return True
        except OSError as exc:
            # systemd gone or socket not writable: the service goes on regardless.
            log.debug("sd_notify %s: %s", fields, exc)
            return False

    def ready(self, status: str | None = None) -> bool:
        """The service is up (ARI, AMI and the log): systemd finishes ``start``."""
        self._ready = True
        return self.send("READY=1", *([f"STATUS={_line(status)}"] if status else []))

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def status(self, text: str) -> bool:
        """A free line shown by ``systemctl status``."""
        return self.send(f"STATUS={_line(text)}")

    def ping(self) -> bool:
        return self.send("WATCHDOG=1")

    def follow(self, health: Health) -> None:
        """Send READY=1 the first time ``health`` is ok, and STATUS= on every change."""

        def changed(h: Health) -> None:
            if h.ok and not self._ready:
                self.ready(h.summary())
            else:
                self.status(h.summary())

        health.on_change(changed)
        changed(health)

    async def watchdog(self) -> None:
        """Ping until cancelled; returns at once when systemd asked for no watchdog."""
        if self.watchdog_interval is None or self.address is None:
            return
        while True:
            self.ping()
            await asyncio.sleep(self.watchdog_interval)

    def start_watchdog(self) -> asyncio.Task[None] | None:
        """The watchdog as a task on the running loop (None when not asked for)."""
        if self.watchdog_interval is None or self.address is None:
            return None
        return asyncio.get_running_loop().create_task(self.watchdog(), name="sd-watchdog")

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None


def _watchdog_interval(env: Mapping[str, str]) -> float | None:
    """Half of ``$WATCHDOG_USEC`` in seconds, if the watchdog is meant for this process."""
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID")
    if usec <= 0 or (pid and pid != str(os.getpid())):
        return None
    return usec / 2 / 1_000_000


def _line(text: str) -> str:
    return " ".join(text.split())[:200]
