"""A thin, typed asyncio client for Asterisk's REST Interface (ARI), on aiohttp.

Why our own: the ``ari`` package on PyPI is Python 2 only, and the maintained
alternatives measured here either overrun ``http.conf`` ``sessionlimit`` with
their pool, hard-code a tiny pool, or die on one network error.

- REST calls share one connection pool, bounded well below ``sessionlimit``,
  and every call has a timeout.
- One events websocket per app, reconnecting with capped exponential backoff.
- REST calls go as ``RESTRequest`` messages on that websocket when the server takes
  them (Asterisk 22.3+, 21.8+, 20.13+; ``ari.rest_over_websocket``): no HTTP request
  and response per command. A probe at every connect decides; until it has answered,
  and whenever the websocket is down, the same calls go over HTTP.
- A request whose answer was lost with the websocket (or a keep-alive connection)
  goes again over HTTP only if repeating it is harmless (``_AGAIN``: reads, answer,
  variables, a play Asterisk does not have); the others fail closed.
- It decides nothing: the app layer maps events to the pure call flow.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import random
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any
from urllib.parse import quote

import aiohttp

from consentivr.accelerators import dumps, loads
from consentivr.errors import AriError
from consentivr.settings import AriSettings
from consentivr.tasks import cancel_and_wait

log = logging.getLogger(__name__)

Params = Mapping[str, str | int | float]

# ARRAY(A,B,...) sets plain variables from one comma-separated value: only names and
# values that its argument parser (commas, quotes, backslashes) leaves intact go in.
_ARRAY_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ARRAY_VALUE = re.compile(r"[A-Za-z0-9_.:/@+=~-]+")
ARRAY_MAX = 50  # func_array takes up to 100 names

REST_RESPONSE = "RESTResponse"
PROBE_URI = "asterisk/info?only=build"
PROBE_TIMEOUT = 2.0  # seconds: Asterisk answers in about a millisecond, or never
# Query characters sent as they are, as aiohttp does over HTTP. Over the websocket
# Asterisk does not read "+" as a space, so spaces and "+" are always %-encoded.
_QUERY_SAFE = ":,/@"
# Most ids, names and values need no quoting: skip urllib's quote() (a few µs each).
_PLAIN_QUERY = re.compile(r"[A-Za-z0-9_.~:,/@-]*")
_PLAIN_SEGMENT = re.compile(r"[A-Za-z0-9_.~-]*")
_CLOSED: Any = object()  # the events queue's end marker

# What a request may do when it cannot know whether Asterisk ran it: the events
# websocket went away before the answer, or (over HTTP) the keep-alive connection did.
# Only requests whose repeat changes nothing go again, over HTTP; any other (continue,
# originate, dtmf, ...) fails closed with AriError, as a repeat could act twice.
# Checked on Asterisk 22.10.1 (docs/reliability.md).
RESEND = "resend"
RESEND_IF_NO_PLAYBACK = "resend if no playback"
_AGAIN: tuple[tuple[str, re.Pattern[str], str], ...] = (
    ("GET", re.compile(r"/.*"), RESEND),  # a read
    # A second DELETE finds nothing: 404, which hangup and stop_playback take as done.
    ("DELETE", re.compile(r"/.*"), RESEND),
    # Answering an Up channel answers 204 again, and does nothing.
    ("POST", re.compile(r"/channels/[^/]+/answer"), RESEND),
    # The same value set twice is the same value.
    ("POST", re.compile(r"/channels/[^/]+/variable"), RESEND),
    ("PUT", re.compile(r"/applications/[^/]+/eventFilter"), RESEND),  # the same filter
    # Asterisk takes an id that is already playing (201) and queues a second playback
    # under it: the prompt would play twice. Ask for our playback first.
    ("POST", re.compile(r"/channels/[^/]+/play/(?P<playback>[^/]+)"), RESEND_IF_NO_PLAYBACK),
)


def again(method: str, path: str) -> tuple[str, str] | None:
    """(what to do, playback id or "") for a request that may or may not have run, or
    None: it must not go again."""
    for verb, pattern, action in _AGAIN:
        if verb == method and (match := pattern.fullmatch(path)) is not None:
            return action, match.groupdict().get("playback") or ""
    return None


class _WebsocketLost(Exception):
    """The events websocket went away before the answer came."""


class _NotSent(_WebsocketLost):
    """The websocket was closing: the request never left, so HTTP may send it."""


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
        self._socket: aiohttp.ClientWebSocketResponse | None = None  # the events websocket
        self._rest_ws: aiohttp.ClientWebSocketResponse | None = None  # ...once it takes REST
        self._probe: asyncio.Task[None] | None = None
        self._pending: dict[str, tuple[asyncio.Future[dict[str, Any]], object]] = {}
        self._next_id = 0
        # REST requests sent, by transport: the benchmark reports them per call.
        self.requests = {"http": 0, "ws": 0}

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

    @property
    def transport(self) -> str:
        """Where REST calls go now: ``"websocket"`` or ``"http"``."""
        return "http" if self._rest_ws is None else "websocket"

    async def rest_transport(self) -> str:
        """:attr:`transport` once the connect's probe (if any) has decided."""
        while (probe := self._probe) is not None and not probe.done():
            await asyncio.wait({probe})  # a new probe may replace a cancelled one
        return self.transport

    async def close(self) -> None:
        self._stop_probe()
        if self._socket is not None:
            self._websocket_gone(self._socket)
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

        On the events websocket when it takes REST requests, else over HTTP; the
        answers and errors are the same either way. A request that meets a lost
        websocket, or a dropped keep-alive connection (Asterisk restarted), may have
        taken effect: it goes again over HTTP only if :func:`again` says a repeat is
        harmless, else it fails.
        """
        ws = self._rest_ws
        if ws is not None:
            try:
                return await self._ws_request(ws, method, path, params, body, ok_missing)
            except _NotSent:
                pass  # never left: HTTP sends it once
            except _WebsocketLost as exc:
                return await self._resend(method, path, params, body, ok_missing, exc)
        return await self._http_request(method, path, params, body, ok_missing)

    async def _resend(self, method: str, path: str, params: Params | None, body: Any,
                      ok_missing: bool, lost: _WebsocketLost) -> Any:
        """The websocket went away before the answer: over HTTP if a repeat is harmless."""
        rule = again(method, path)
        if rule is None:
            raise AriError(f"ARI {method} {path}: the events websocket closed "
                           "before the answer") from lost
        action, playback = rule
        if action == RESEND_IF_NO_PLAYBACK:
            found = await self._http_request("GET", f"/playbacks/{playback}", None, None,
                                             True)
            if found is not None:  # it did start: the answer to the play is the playback
                log.info("ARI %s %s: the events websocket closed before the answer; the "
                         "playback is there", method, path)
                return found
        log.info("ARI %s %s: the events websocket closed before the answer; sent again "
                 "over HTTP", method, path)
        return await self._http_request(method, path, params, body, ok_missing)

    async def _http_request(self, method: str, path: str, params: Params | None, body: Any,
                            ok_missing: bool) -> Any:
        url = f"{self.settings.url}/ari{path}"
        query = {k: str(v) for k, v in (params or {}).items()}
        data = None if body is None else dumps(body)
        headers = None if body is None else {"Content-Type": "application/json"}
        for attempt in range(2):
            self.requests["http"] += 1
            try:
                async with self.session.request(method, url, params=query, data=data,
                                                headers=headers) as resp:
                    if resp.status == 404 and ok_missing:
                        return None
                    if resp.status >= 400:
                        text = (await resp.text())[:200]
                        raise AriError(
                            f"ARI {method} {path}: HTTP {resp.status} {_message(text)}")
                    if resp.status == 204:
                        return None
                    raw = await resp.read()
                    return loads(raw) if raw else None
            except TimeoutError as exc:
                raise AriError(
                    f"ARI {method} {path}: no answer in {self.settings.timeout:g}s") from exc
            except aiohttp.ClientConnectionError as exc:
                # A keep-alive connection Asterisk closed: did the request run? Once
                # more only if a repeat is harmless (a play's check is not worth it here).
                if attempt == 0 and (rule := again(method, path)) and rule[0] == RESEND:
                    continue
                raise AriError(f"ARI {method} {path}: {type(exc).__name__}") from exc
            except aiohttp.ClientError as exc:
                raise AriError(f"ARI {method} {path}: {type(exc).__name__}") from exc
            except ValueError as exc:  # not JSON: a proxy or a broken server
                raise AriError(f"ARI {method} {path}: the answer is not JSON") from exc
        raise AssertionError("unreachable")

    async def _ws_request(self, ws: aiohttp.ClientWebSocketResponse, method: str, path: str,
                          params: Params | None, body: Any, ok_missing: bool) -> Any:
        uri = path[1:] if path.startswith("/") else path
        if params:
            uri += "?" + "&".join(f"{_query_quote(k)}={_query_quote(str(v))}"
                                  for k, v in params.items())
        timeout = self.settings.timeout
        try:
            answer = await self._exchange(ws, method, uri, body, timeout)
        except TimeoutError as exc:
            if self.settings.rest_over_websocket == "auto" and self._rest_ws is ws:
                # Maybe the server stopped answering here (an event filter without
                # RESTResponse): HTTP until a new probe says otherwise.
                log.warning("ARI %s %s: no answer on the events websocket in %gs; "
                            "REST goes over HTTP until a probe answers", method, path, timeout)
                self._rest_ws = None
                self._start_probe(ws)
            raise AriError(f"ARI {method} {path}: no answer in {timeout:g}s") from exc
        status = answer.get("status_code")
        text = answer.get("message_body") or ""
        if not isinstance(status, int):
            raise AriError(f"ARI {method} {path}: a RESTResponse without a status")
        if status == 404 and ok_missing:
            return None
        if status >= 400:
            raise AriError(f"ARI {method} {path}: HTTP {status} {_message(text[:200])}")
        if status == 204 or not text:
            return None
        try:
            return loads(text)
        except ValueError as exc:
            raise AriError(f"ARI {method} {path}: the answer is not JSON") from exc

    async def _exchange(self, ws: aiohttp.ClientWebSocketResponse, method: str, uri: str,
                        body: Any, timeout: float) -> dict[str, Any]:
        """Send one RESTRequest on ``ws`` and wait for its RESTResponse.

        Raises ``TimeoutError`` after ``timeout`` s and :class:`_WebsocketLost` when the
        websocket goes away first.
        """
        self._next_id += 1
        request_id = str(self._next_id)
        message: dict[str, Any] = {"type": "RESTRequest", "request_id": request_id,
                                   "method": method, "uri": uri}
        if body is not None:
            message["content_type"] = "application/json"
            message["message_body"] = dumps(body)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[dict[str, Any]] = loop.create_future()
        timer = loop.call_later(timeout, _expire, future)  # one timer, no task per call
        self._pending[request_id] = (future, ws)
        try:
            try:
                await ws.send_str(dumps(message))
            except (aiohttp.ClientError, ConnectionError, RuntimeError) as exc:
                raise _NotSent() from exc
            self.requests["ws"] += 1
            return await future
        finally:
            timer.cancel()
            self._pending.pop(request_id, None)

    def _answered(self, message: dict[str, Any]) -> None:
        entry = self._pending.get(str(message.get("request_id")))
        if entry is not None and not entry[0].done():
            entry[0].set_result(message)
        else:  # a late answer (timed out) or someone else's
            log.debug("ARI RESTResponse for no waiting request: %s", message.get("request_id"))

    # -- the websocket transport's life -----------------------------------

    def _websocket_up(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._socket = ws
        mode = self.settings.rest_over_websocket
        if mode == "on":
            self._rest_ws = ws
        elif mode == "auto":
            self._start_probe(ws)

    def _websocket_gone(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """Back to HTTP; the requests waiting on ``ws`` fail now, not at their timeout."""
        if self._socket is ws:
            self._socket = None
            self._stop_probe()
        if self._rest_ws is ws:
            self._rest_ws = None
            log.info("ARI REST requests go over HTTP while the events websocket is down")
        for future, owner in list(self._pending.values()):
            if owner is ws and not future.done():
                future.set_exception(_WebsocketLost())

    def _start_probe(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._stop_probe()
        self._probe = asyncio.get_running_loop().create_task(self._run_probe(ws))

    def _stop_probe(self) -> None:
        if self._probe is not None and not self._probe.done():
            self._probe.cancel()
        self._probe = None

    async def _run_probe(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """Does the server take REST requests on ``ws``? Older ones ignore or refuse."""
        why = ""
        try:
            answer = await self._exchange(ws, "GET", PROBE_URI, None, PROBE_TIMEOUT)
            status = answer.get("status_code")
            if status == 200:
                if self._socket is ws:
                    self._rest_ws = ws
                    log.info("ARI REST requests go over the events websocket")
                return
            why = f"it answered {status} {_message(answer.get('message_body') or '')}"
        except TimeoutError:
            why = f"no answer in {PROBE_TIMEOUT:g}s"
        except _WebsocketLost:
            return
        log.info("ARI REST requests go over HTTP: the events websocket does not take "
                 "them (%s; Asterisk 22.3+, 21.8+ or 20.13+ does)", why.strip())

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
        """Ask Asterisk to send this app only these event types (Asterisk 20.8+/21.3+).

        ``RESTResponse`` is always let through: the filter drops it too, and REST over
        the websocket needs it.
        """
        types = list(allowed)
        if self.settings.rest_over_websocket != "off" and REST_RESPONSE not in types:
            types.append(REST_RESPONSE)
        await self.request("PUT", f"/applications/{_seg(app)}/eventFilter",
                           body={"allowed": [{"type": t} for t in types]})
        socket = self._socket
        if (self.settings.rest_over_websocket == "auto" and socket is not None
                and self._rest_ws is None):
            # A filter left over from before may have hidden the connect's probe.
            self._start_probe(socket)

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
        max_backoff: float = 5.0, on_lost: Callable[[str], None] | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """Yield this app's events forever, reconnecting with backoff.

        ``on_connect`` runs after every (re)connect, before events flow, so the app
        can take back channels left in Stasis while it was away. A reader task owns
        the websocket: it hands RESTResponses to the requests waiting for them (they
        never reach the caller), so REST calls get answers even while the caller is
        busy, and queues the events. ``on_lost(why)`` is told when the connection goes
        away or cannot be made (health: ARI down).
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
                    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
                    reader = loop.create_task(self._read(ws, app, queue))
                    try:
                        self._websocket_up(ws)
                        if on_connect is not None:
                            try:
                                await on_connect()
                            except Exception:  # a bug in the hook must not stop the events
                                log.exception("ARI on_connect hook failed; events go on")
                        while (event := await queue.get()) is not _CLOSED:
                            yield event
                    finally:
                        await cancel_and_wait(reader)
                lost_at = loop.time()
                log.warning("ARI events connection for app %s lost; reconnecting", app)
                if on_lost is not None:
                    on_lost("ARI events connection lost; reconnecting")
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
                if on_lost is not None:
                    on_lost(f"ARI unavailable ({why})")
            await asyncio.sleep(delay * (0.8 + 0.4 * random.random()))
            delay = min(delay * 2, max_backoff)

    async def _read(self, ws: aiohttp.ClientWebSocketResponse, app: str,
                    queue: asyncio.Queue[dict[str, Any]]) -> None:
        """Read ``ws`` until it closes: answers to their requests, this app's events
        to ``queue``, then the end marker."""
        try:
            async for msg in ws:
                if msg.type is aiohttp.WSMsgType.TEXT:
                    try:
                        event = loads(msg.data)
                    except ValueError:
                        log.warning("ARI sent an event that is not JSON; ignored")
                        continue
                    if not isinstance(event, dict):
                        continue
                    if event.get("type") == REST_RESPONSE:
                        self._answered(event)
                    # Other apps' events reach us too (e.g. the far half of a Local
                    # channel): keep only ours.
                    elif event.get("application", app) == app:
                        queue.put_nowait(event)
                elif msg.type in (aiohttp.WSMsgType.ERROR, aiohttp.WSMsgType.CLOSED):
                    break
        finally:
            self._websocket_gone(ws)
            queue.put_nowait(_CLOSED)


def _expire(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())


def _seg(value: str) -> str:
    """One URL path segment: channel data must never add segments or a query.

    ``.``/``..`` would survive quoting (URL normalisation resolves them), so ids made
    only of dots, like empty ids, are refused.
    """
    text = str(value)
    if not text.strip("."):
        raise AriError(f"refusing the id {text!r} in an ARI path")
    return text if _PLAIN_SEGMENT.fullmatch(text) else quote(text, safe="")


def _query_quote(text: str) -> str:
    return text if _PLAIN_QUERY.fullmatch(text) else quote(text, safe=_QUERY_SAFE)


def _message(text: str) -> str:
    try:
        data = loads(text)
    except ValueError:
        # An HTML error page (e.g. 503 while Asterisk shuts down) says nothing more.
        return "" if text.lstrip().startswith("<") else " ".join(text.split())
    return str(data.get("message", "")) if isinstance(data, dict) else ""
