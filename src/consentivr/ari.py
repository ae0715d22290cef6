"""A thin, typed asyncio client for Asterisk's REST Interface (ARI), on aiohttp.

Why our own: the ``ari`` package on PyPI is Python 2 only, and the maintained
alternatives measured here either overrun ``http.conf`` ``sessionlimit`` with
their pool, hard-code a tiny pool, or die on one network error.

- REST calls share one connection pool, bounded well below ``sessionlimit``,
  and every call has a timeout.
- One events websocket per app, reconnecting with capped exponential backoff.
- It decides nothing: the app layer maps events to the pure call flow.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import aiohttp

from consentivr.config import AriSettings
from consentivr.errors import AriError

log = logging.getLogger(__name__)

Params = Mapping[str, str | int | float]


class AriClient:
    def __init__(self, settings: AriSettings) -> None:
        self.settings = settings
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self.settings.connections)
            token = base64.b64encode(
                f"{self.settings.username}:{self.settings.password}".encode()
            ).decode()
            self._session = aiohttp.ClientSession(
                connector=connector,
                headers={"Authorization": f"Basic {token}"},
                timeout=aiohttp.ClientTimeout(total=self.settings.timeout),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def __aenter__(self) -> AriClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- REST -------------------------------------------------------------

    async def request(
        self, method: str, path: str, params: Params | None = None, body: Any = None,
        ok_missing: bool = False,
    ) -> Any:
        """One REST call. ``ok_missing``: a 404 is fine (e.g. stopping a finished playback)."""
        url = f"{self.settings.url}/ari{path}"
        query = {k: str(v) for k, v in (params or {}).items()}
        try:
            async with self.session.request(method, url, params=query, json=body) as resp:
                if resp.status == 404 and ok_missing:
                    return None
                if resp.status >= 400:
                    text = (await resp.text())[:200]
                    raise AriError(f"ARI {method} {path}: HTTP {resp.status} {_message(text)}")
                if resp.status == 204:
                    return None
                text = await resp.text()
                return json.loads(text) if text else None
        except TimeoutError as exc:
            raise AriError(f"ARI {method} {path}: no answer in {self.settings.timeout:g}s") from exc
        except aiohttp.ClientError as exc:
            raise AriError(f"ARI {method} {path}: {type(exc).__name__}") from exc

    async def info(self) -> dict[str, Any]:
        return await self.request("GET", "/asterisk/info")

    async def answer(self, channel_id: str) -> None:
        await self.request("POST", f"/channels/{channel_id}/answer")

    async def play(self, channel_id: str, playback_id: str, media: tuple[str, ...],
                   language: str | None = None) -> None:
        params: dict[str, str] = {"media": ",".join(media)}
        if language:
            params["lang"] = language
        await self.request("POST", f"/channels/{channel_id}/play/{playback_id}", params)

    async def stop_playback(self, playback_id: str) -> None:
        await self.request("DELETE", f"/playbacks/{playback_id}", ok_missing=True)

    async def set_variable(self, channel_id: str, name: str, value: str) -> None:
        await self.request("POST", f"/channels/{channel_id}/variable",
                           {"variable": name, "value": value})

    async def get_variable(self, channel_id: str, name: str) -> str | None:
        data = await self.request("GET", f"/channels/{channel_id}/variable",
                                  {"variable": name}, ok_missing=True)
        return None if data is None else data.get("value")

    async def continue_in_dialplan(self, channel_id: str, context: str = "",
                                   extension: str = "", priority: int = 0) -> None:
        """Leave Stasis; with no target, the dialplan goes on after ``Stasis()``."""
        params: dict[str, str | int] = {}
        if context:
            params["context"] = context
        if extension:
            params["extension"] = extension
        if priority:
            params["priority"] = priority
        await self.request("POST", f"/channels/{channel_id}/continue", params)

    async def hangup(self, channel_id: str) -> None:
        await self.request("DELETE", f"/channels/{channel_id}", ok_missing=True)

    async def send_dtmf(self, channel_id: str, dtmf: str, between: int = 100,
                        duration: int = 100) -> None:
        await self.request("POST", f"/channels/{channel_id}/dtmf",
                           {"dtmf": dtmf, "between": between, "duration": duration})

    async def originate(self, endpoint: str, app: str, app_args: str = "",
                        channel_id: str | None = None, caller_id: str | None = None,
                        variables: Mapping[str, str] | None = None) -> dict[str, Any]:
        params: dict[str, str] = {"endpoint": endpoint, "app": app}
        if app_args:
            params["appArgs"] = app_args
        if channel_id:
            params["channelId"] = channel_id
        if caller_id:
            params["callerId"] = caller_id
        body = {"variables": dict(variables)} if variables else None
        return await self.request("POST", "/channels", params, body)

    async def channel(self, channel_id: str) -> dict[str, Any] | None:
        return await self.request("GET", f"/channels/{channel_id}", ok_missing=True)

    async def channels(self) -> list[dict[str, Any]]:
        return await self.request("GET", "/channels") or []

    async def application(self, app: str) -> dict[str, Any] | None:
        return await self.request("GET", f"/applications/{app}", ok_missing=True)

    # -- events -----------------------------------------------------------

    async def events(
        self, app: str, on_connect: Callable[[], Awaitable[None]] | None = None,
        max_backoff: float = 5.0,
    ) -> AsyncIterator[dict[str, Any]]:
        """Yield this app's events forever, reconnecting with backoff.

        ``on_connect`` runs after every (re)connect, before events flow, so the app
        can take back channels left in Stasis while it was away.
        """
        url = f"{self.settings.url}/ari/events"
        delay = 0.2
        while True:
            try:
                async with self.session.ws_connect(
                    url, params={"app": app, "subscribeAll": "false"},
                    heartbeat=20, timeout=aiohttp.ClientWSTimeout(ws_close=5),
                ) as ws:
                    log.info("ARI events connected for app %s", app)
                    delay = 0.2
                    if on_connect is not None:
                        await on_connect()
                    async for msg in ws:
                        if msg.type is aiohttp.WSMsgType.TEXT:
                            try:
                                event = json.loads(msg.data)
                            except ValueError:
                                log.warning("ARI sent an event that is not JSON; ignored")
                                continue
                            # Other apps' events reach us too (e.g. the far half of a
                            # Local channel): keep only ours.
                            if event.get("application", app) == app:
                                yield event
                        elif msg.type in (aiohttp.WSMsgType.ERROR, aiohttp.WSMsgType.CLOSED):
                            break
                log.warning("ARI events connection closed; reconnecting")
            except (aiohttp.ClientError, TimeoutError, OSError, AriError) as exc:
                log.warning("ARI events unavailable (%s); retrying in %.1fs",
                            type(exc).__name__, delay)
            await asyncio.sleep(delay * (0.8 + 0.4 * random.random()))
            delay = min(delay * 2, max_backoff)


def _message(text: str) -> str:
    try:
        data = json.loads(text)
    except ValueError:
        return " ".join(text.split())
    return str(data.get("message", "")) if isinstance(data, dict) else ""
