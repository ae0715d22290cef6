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
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any
from urllib.parse import quote

import aiohttp

from consentivr.config import AriSettings
from consentivr.errors import AriError

log = logging.getLogger(__name__)

Params = Mapping[str, str | int | float]

# ARRAY(A,B,...) sets plain variables from one comma-separated value: only names and
# values that its argument parser (commas, quotes, backslashes) leaves intact go in.
_ARRAY_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ARRAY_VALUE = re.compile(r"[A-Za-z0-9_.:/@+=~-]+")
ARRAY_MAX = 50  # func_array takes up to 100 names


def assignments(pairs: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Variable assignments as few requests: one ``ARRAY(...)`` for every pair it can
    carry, then the others (functions such as ``CHANNEL(language)``, values with a
    comma or a quote, empty values) one by one, in their order.

    ``ARRAY()`` sets each variable on its own, so ``VarSet`` events still fire.
    """
    plain = [(n, v) for n, v in pairs if _ARRAY_NAME.fullmatch(n) and _ARRAY_VALUE.fullmatch(v)]
    rest = [(n, v) for n, v in pairs if (n, v) not in plain]
    out: list[tuple[str, str]] = []
    for i in range(0, len(plain), ARRAY_MAX):
        chunk = plain[i:i + ARRAY_MAX]
        if len(chunk) == 1:
            out.append(chunk[0])
        else:
            out.append((f"ARRAY({','.join(n for n, _ in chunk)})",
                        ",".join(v for _, v in chunk)))
    return out + rest


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
        """One REST call. ``ok_missing``: a 404 is fine (e.g. stopping a finished playback).

        A GET or DELETE that meets a dropped keep-alive connection (Asterisk restarted)
        is tried once more on a fresh one; other methods are not, as they may have
        taken effect.
        """
        url = f"{self.settings.url}/ari{path}"
        query = {k: str(v) for k, v in (params or {}).items()}
        attempts = 2 if method in ("GET", "DELETE") else 1
        for attempt in range(attempts):
            try:
                async with self.session.request(method, url, params=query, json=body) as resp:
                    if resp.status == 404 and ok_missing:
                        return None
                    if resp.status >= 400:
                        text = (await resp.text())[:200]
                        raise AriError(
                            f"ARI {method} {path}: HTTP {resp.status} {_message(text)}")
                    if resp.status == 204:
                        return None
                    text = await resp.text()
                    return json.loads(text) if text else None
            except TimeoutError as exc:
                raise AriError(
                    f"ARI {method} {path}: no answer in {self.settings.timeout:g}s") from exc
            except aiohttp.ClientConnectionError as exc:
                if attempt + 1 < attempts:
                    continue
                raise AriError(f"ARI {method} {path}: {type(exc).__name__}") from exc
            except aiohttp.ClientError as exc:
                raise AriError(f"ARI {method} {path}: {type(exc).__name__}") from exc
            except ValueError as exc:  # not JSON: a proxy or a broken server
                raise AriError(f"ARI {method} {path}: the answer is not JSON") from exc
        raise AssertionError("unreachable")

    async def info(self) -> dict[str, Any]:
        return await self.request("GET", "/asterisk/info")

    async def answer(self, channel_id: str) -> None:
        await self.request("POST", f"/channels/{_seg(channel_id)}/answer")

    async def play(self, channel_id: str, playback_id: str, media: tuple[str, ...],
                   language: str | None = None) -> None:
        params: dict[str, str] = {"media": ",".join(media)}
        if language:
            params["lang"] = language
        await self.request("POST", f"/channels/{_seg(channel_id)}/play/{_seg(playback_id)}", params)

    async def stop_playback(self, playback_id: str) -> None:
        await self.request("DELETE", f"/playbacks/{_seg(playback_id)}", ok_missing=True)

    async def set_variable(self, channel_id: str, name: str, value: str) -> None:
        await self.request("POST", f"/channels/{_seg(channel_id)}/variable",
                           {"variable": name, "value": value})

    async def set_variables(self, channel_id: str, pairs: Sequence[tuple[str, str]]) -> None:
        """Set several variables in as few requests as :func:`assignments` allows."""
        await asyncio.gather(*(self.set_variable(channel_id, name, value)
                               for name, value in assignments(pairs)))

    async def set_event_filter(self, app: str, allowed: Sequence[str]) -> None:
        """Ask Asterisk to send this app only these event types (Asterisk 20.8+/21.3+)."""
        await self.request("PUT", f"/applications/{_seg(app)}/eventFilter",
                           body={"allowed": [{"type": t} for t in allowed]})

    async def get_variable(self, channel_id: str, name: str) -> str | None:
        data = await self.request("GET", f"/channels/{_seg(channel_id)}/variable",
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
        await self.request("POST", f"/channels/{_seg(channel_id)}/continue", params)

    async def hangup(self, channel_id: str) -> None:
        await self.request("DELETE", f"/channels/{_seg(channel_id)}", ok_missing=True)

    async def send_dtmf(self, channel_id: str, dtmf: str, between: int = 100,
                        duration: int = 100) -> None:
        await self.request("POST", f"/channels/{_seg(channel_id)}/dtmf",
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
        return await self.request("GET", f"/channels/{_seg(channel_id)}", ok_missing=True)

    async def channels(self) -> list[dict[str, Any]]:
        return await self.request("GET", "/channels") or []

    async def application(self, app: str) -> dict[str, Any] | None:
        return await self.request("GET", f"/applications/{_seg(app)}", ok_missing=True)

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
        lost_at: float | None = None  # loop time when the connection went away
        loop = asyncio.get_running_loop()
        while True:
            try:
                async with self.session.ws_connect(
                    url, params={"app": app, "subscribeAll": "false"},
                    heartbeat=10, timeout=aiohttp.ClientWSTimeout(ws_close=5),
                ) as ws:
                    if lost_at is None:
                        log.info("ARI events connected for app %s", app)
                    else:
                        log.warning("ARI events reconnected for app %s after %.1fs",
                                    app, loop.time() - lost_at)
                    lost_at = None
                    delay = 0.2
                    if on_connect is not None:
                        try:
                            await on_connect()
                        except Exception:  # a bug in the hook must not stop the events
                            log.exception("ARI on_connect hook failed; events go on")
                    async for msg in ws:
                        if msg.type is aiohttp.WSMsgType.TEXT:
                            try:
                                event = json.loads(msg.data)
                            except ValueError:
                                log.warning("ARI sent an event that is not JSON; ignored")
                                continue
                            # Other apps' events reach us too (e.g. the far half of a
                            # Local channel): keep only ours.
                            if isinstance(event, dict) and event.get("application", app) == app:
                                yield event
                        elif msg.type in (aiohttp.WSMsgType.ERROR, aiohttp.WSMsgType.CLOSED):
                            break
                lost_at = loop.time()
                log.warning("ARI events connection for app %s lost; reconnecting", app)
            except (aiohttp.ClientError, TimeoutError, OSError, AriError) as exc:
                if lost_at is None:
                    lost_at = loop.time()
                why = type(exc).__name__
                if isinstance(exc, aiohttp.WSServerHandshakeError):
                    why = f"HTTP {exc.status}"
                    if exc.status == 401:
                        why += ", check the ARI username and password"
                log.warning("ARI events for app %s unavailable (%s), down %.0fs; "
                            "retrying in %.1fs", app, why, loop.time() - lost_at, delay)
            await asyncio.sleep(delay * (0.8 + 0.4 * random.random()))
            delay = min(delay * 2, max_backoff)


def _seg(value: str) -> str:
    """One URL path segment: channel data must never add segments or a query.

    ``.``/``..`` would survive quoting (URL normalisation resolves them), so ids made
    only of dots, like empty ids, are refused.
    """
    text = str(value)
    if not text.strip("."):
        raise AriError(f"refusing the id {text!r} in an ARI path")
    return quote(text, safe="")


def _message(text: str) -> str:
    try:
        data = json.loads(text)
    except ValueError:
        # An HTML error page (e.g. 503 while Asterisk shuts down) says nothing more.
        return "" if text.lstrip().startswith("<") else " ".join(text.split())
    return str(data.get("message", "")) if isinstance(data, dict) else ""
