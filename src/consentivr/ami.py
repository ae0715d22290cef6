"""The AMI adapter: starts, stops and mutes MixMonitor. It decides nothing.

Why AMI and not dialplan variables: the AMI ``MixMonitor`` action answers
Success or Error, so the consent log can say whether recording was *confirmed*
started; the same connection later serves ``StopMixMonitor`` (withdrawal) and
``MixMonitorMute`` (hold). Asterisk runs one connection's actions one at a
time, so a small pool of connections keeps the round trip short under load.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Mapping
from typing import Any

from panoramisk import Manager

from consentivr.config import AmiSettings
from consentivr.errors import AmiError

log = logging.getLogger(__name__)


class AmiPool:
    """A few authenticated AMI connections, used round-robin; they reconnect by themselves."""

    def __init__(self, settings: AmiSettings) -> None:
        self.settings = settings
        self._managers: list[Manager] = []
        self._logged_in: list[asyncio.Event] = []
        self._next = itertools.count()

    async def connect(self, wait: float | None = None) -> None:
        """Open the connections; wait up to ``wait`` seconds for one login (None: don't wait)."""
        loop = asyncio.get_running_loop()
        for _ in range(self.settings.connections):
            ready = asyncio.Event()

            def on_login(_m: Manager, ready: asyncio.Event = ready) -> None:
                log.info("AMI connected to %s:%s", self.settings.host, self.settings.port)
                ready.set()

            def on_disconnect(_m: Manager, _exc: object, ready: asyncio.Event = ready) -> None:
                if ready.is_set():
                    log.warning("AMI connection lost; reconnecting")
                ready.clear()

            manager = Manager(
                loop=loop, host=self.settings.host, port=self.settings.port,
                username=self.settings.username, secret=self.settings.password,
                events="off", encoding="utf8", reconnect_timeout=1, ping_delay=10,
                on_login=on_login, on_disconnect=on_disconnect,
            )
            manager.connect()
            self._managers.append(manager)
            self._logged_in.append(ready)
        if wait:
            try:
                await asyncio.wait_for(self._any_ready(), wait)
            except TimeoutError as exc:
                raise AmiError(
                    f"AMI at {self.settings.host}:{self.settings.port}: no login within {wait:g}s"
                ) from exc

    async def _any_ready(self) -> None:
        while not any(e.is_set() for e in self._logged_in):
            await asyncio.sleep(0.05)

    def close(self) -> None:
        for manager in self._managers:
            manager.close()
            # Stop panoramisk's own reconnect loop.
            manager.connection_lost = lambda exc: None  # type: ignore[method-assign]

    async def action(self, fields: Mapping[str, str]) -> Any:
        """Send one action on a logged-in connection; AmiError unless it succeeds."""
        ready = [i for i, e in enumerate(self._logged_in) if e.is_set()]
        if not ready:
            raise AmiError("AMI is not connected")
        index = ready[next(self._next) % len(ready)]
        try:
            response = await asyncio.wait_for(
                self._managers[index].send_action(dict(fields)), self.settings.timeout
            )
        except TimeoutError as exc:
            raise AmiError(f"AMI {fields.get('Action')}: no answer in "
                           f"{self.settings.timeout:g}s") from exc
        except (OSError, AttributeError) as exc:  # AttributeError: no transport yet
            raise AmiError(f"AMI {fields.get('Action')}: connection failed") from exc
        if isinstance(response, list):
            response = response[0] if response else None
        if response is None or not getattr(response, "success", False):
            message = getattr(response, "message", None) or "no response"
            raise AmiError(f"AMI {fields.get('Action')}: {message}")
        return response


class Recorder:
    """MixMonitor control for one channel at a time, by channel name."""

    def __init__(self, pool: AmiPool) -> None:
        self.pool = pool

    async def start(self, channel: str, path: str, options: str) -> None:
        fields = {"Action": "MixMonitor", "Channel": channel, "File": path}
        if options:
            fields["Options"] = options
        await self.pool.action(fields)

    async def stop(self, channel: str) -> None:
        await self.pool.action({"Action": "StopMixMonitor", "Channel": channel})

    async def mute(self, channel: str, muted: bool, direction: str = "both") -> None:
        await self.pool.action({
            "Action": "MixMonitorMute", "Channel": channel,
            "Direction": direction, "State": "1" if muted else "0",
        })
