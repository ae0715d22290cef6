"""ARI REST over the events websocket (issue 17, lever 1), and its HTTP fallback.

The unit tests run :class:`~consentivr.ari.AriClient` against a small aiohttp ARI
server whose websocket answers ``RESTRequest`` messages (or, like an older Asterisk,
ignores or refuses them): request matching, timeouts, the loss of the websocket, the
fallback to HTTP, and that ``RESTResponse`` never reaches the event consumer.

The ``pbx`` tests prove the same on the real Asterisk 22: a Local call answered,
played to, given variables and continued over the websocket, and the same over HTTP
with ``rest_over_websocket: off``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import WSMsgType, web

from consentivr import accelerators, ari
from consentivr.ari import AriClient
from consentivr.configfile import load_settings
from consentivr.errors import AriError, ConfigError
from consentivr.settings import AriSettings
from consentivr_testbed.testbed import flow_yaml

APP = "cvr-transport"

# --------------------------------------------------------------------------- the fake


class FakeAri:
    """ARI over HTTP and, in ``ws_mode`` "answer", RESTRequest on the events websocket.

    ``ws_mode``: "answer" (Asterisk 22.3+), "silent" (an older Asterisk ignores the
    message), "refuse" (answers 400 with no request id). Requests whose uri starts with
    ``hang/`` are never answered; ``order`` "reverse" answers a burst last-first.
    ``drop_on``: the websocket closes on the first RESTRequest whose uri contains it,
    unanswered; ``drop_after_run``: Asterisk ran it first (only the answer is lost).
    Plays keep their playback ids in ``playbacks``, as Asterisk does until they end.
    """

    def __init__(self, ws_mode: str = "answer") -> None:
        self.ws_mode = ws_mode
        self.http: list[str] = []  # "METHOD /ari/path?query" seen over HTTP
        self.ws: list[dict[str, Any]] = []  # RESTRequests seen on the websocket
        self.sockets: list[web.WebSocketResponse] = []
        self.hold: list[dict[str, Any]] = []  # requests held back (reverse order)
        self.reverse = 0  # answer the next N requests last-first
        self.drop_on: str | None = None
        self.drop_after_run = False
        self.playbacks: set[str] = set()
        self.started: list[str] = []  # every play run, by playback id
        self.disconnect_once: set[str] = set()  # HTTP paths that drop the connection once
        self.url = ""
        self._runner: web.AppRunner | None = None

    def answer_for(self, method: str, path: str, body: str) -> tuple[int, Any]:
        """(status, JSON body or None) for one request, the same over both transports."""
        if path.startswith("channels/missing"):
            return 404, {"message": "Channel not found"}
        if path.startswith("boom"):
            return 500, {"message": "Internal Server Error"}
        if path == "asterisk/info":
            return 200, {"build": {"os": "Linux"}}
        if path.startswith("echo"):
            return 200, {"method": method, "path": path, "body": json.loads(body or "null")}
        if method == "POST" and "/play/" in path:
            playback = path.rpartition("/")[2]
            self.playbacks.add(playback)
            self.started.append(playback)
            return 201, {"id": playback, "state": "queued"}
        if method == "GET" and path.startswith("playbacks/"):
            playback = path.partition("/")[2]
            if playback in self.playbacks:
                return 200, {"id": playback, "state": "playing"}
            return 404, {"message": "Playback not found"}
        if path == "channels" and method == "POST":
            return 200, {"id": "new"}
        return 204, None

    async def start(self) -> None:
        async def events(request: web.Request) -> web.StreamResponse:
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            self.sockets.append(ws)
            async for msg in ws:
                if msg.type is not WSMsgType.TEXT:
                    continue
                data = json.loads(msg.data)
                if data.get("type") != "RESTRequest":
                    continue
                self.ws.append(data)
                if self.drop_on is not None and self.drop_on in data["uri"]:
                    self.drop_on = None
                    if self.drop_after_run:
                        self._response(data)  # ran, but the answer never leaves
                    await ws.close()
                    break
                if self.ws_mode == "silent" or data["uri"].startswith("hang/"):
                    continue
                if self.ws_mode == "refuse":
                    await ws.send_json({"type": "RESTResponse", "request_id": "",
                                        "status_code": 400, "reason_phrase": "Bad request",
                                        "message_body": '{"message":"Unknown request type."}'})
                    continue
                if self.reverse:
                    self.hold.append(data)
                    self.reverse -= 1
                    if self.reverse:
                        continue
                    batch, self.hold = self.hold[::-1], []
                else:
                    batch = [data]
                for item in batch:
                    await ws.send_str(json.dumps(self._response(item)))
            return ws

        async def rest(request: web.Request) -> web.StreamResponse:
            self.http.append(f"{request.method} {request.raw_path}")
            if request.match_info["tail"] in self.disconnect_once:
                # As a keep-alive connection Asterisk closed: no answer at all.
                self.disconnect_once.discard(request.match_info["tail"])
                assert request.transport is not None
                request.transport.close()
                return web.Response(status=500)
            status, body = self.answer_for(request.method, request.match_info["tail"],
                                           await request.text())
            if body is None:
                return web.Response(status=status)
            return web.json_response(body, status=status)

        app = web.Application()
        app.router.add_get("/ari/events", events)
        app.router.add_route("*", "/ari/{tail:.*}", rest)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    def _response(self, data: dict[str, Any]) -> dict[str, Any]:
        path, _, _ = data["uri"].partition("?")
        status, body = self.answer_for(data["method"], path, data.get("message_body", ""))
        out: dict[str, Any] = {"type": "RESTResponse", "transaction_id": "",
                               "request_id": data["request_id"], "status_code": status,
                               "reason_phrase": "x", "uri": path, "application": APP}
        if body is not None:
            out["content_type"] = "application/json"
            out["message_body"] = json.dumps(body)
        return out

    async def event(self, kind: str, **fields: Any) -> None:
        for ws in self.sockets:
            if not ws.closed:
                await ws.send_json({"type": kind, "application": APP, **fields})

    async def drop(self) -> None:
        """Close every events websocket, as a restarting Asterisk would."""
        for ws in self.sockets:
            await ws.close()

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def settings(url: str, mode: str = "auto", timeout: float = 2.0) -> AriSettings:
    return AriSettings(url=url, username="u", password="p", app=APP, timeout=timeout,
                       rest_over_websocket=mode)


class Consumer:
    """Runs ``client.events()`` in a task and keeps what it yields."""

    def __init__(self, client: AriClient,
                 on_connect: Callable[[], Awaitable[None]] | None = None) -> None:
        self.client = client
        self.events: list[dict[str, Any]] = []
        self.connects = 0
        self.connected = asyncio.Event()
        self._hook = on_connect
        self._task: asyncio.Task[None] | None = None

    async def _on_connect(self) -> None:
        self.connects += 1
        if self._hook is not None:
            await self._hook()
        self.connected.set()

    async def _pump(self) -> None:
        async for event in self.client.events(APP, on_connect=self._on_connect,
                                              max_backoff=0.2):
            self.events.append(event)

    async def __aenter__(self) -> Consumer:
        self._task = asyncio.get_running_loop().create_task(self._pump())
        await asyncio.wait_for(self.connected.wait(), 5)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


@contextlib.asynccontextmanager
async def fake_and_client(ws_mode: str = "answer", mode: str = "auto",
                          timeout: float = 2.0) -> AsyncIterator[tuple[FakeAri, AriClient]]:
    server = FakeAri(ws_mode)
    await server.start()
    client = AriClient(settings(server.url, mode, timeout))
    try:
        yield server, client
    finally:
        await client.close()
        await server.close()


async def until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    async def poll() -> None:
        while not check():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), timeout)


@pytest.fixture(params=["json", "orjson"])
def codec(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with the standard json module, and with orjson when installed."""
    name = str(request.param)
    if name == "orjson" and accelerators.optional("orjson") is None:
        pytest.skip("orjson is not installed (the consentivr[fast] extra)")
    if name == "json":
        monkeypatch.setattr(accelerators, "optional", lambda module: None)
    loads, dumps, chosen = accelerators.json_codec()
    assert chosen == name
    monkeypatch.setattr(ari, "loads", loads)
    monkeypatch.setattr(ari, "dumps", dumps)
    return name


# --------------------------------------------------------------------------- detection


@pytest.mark.parametrize(("ws_mode", "mode", "expected", "probes"), [
    ("answer", "auto", "websocket", 1),  # Asterisk 22.3+
    ("silent", "auto", "http", 1),  # an older Asterisk ignores the message
    ("refuse", "auto", "http", 1),  # ... or refuses it
    ("answer", "off", "http", 0),  # forced off: never asks
    ("silent", "on", "websocket", 0),  # forced on: never asks either
])
def test_the_connect_probe_decides_the_transport(
    ws_mode: str, mode: str, expected: str, probes: int, monkeypatch: pytest.MonkeyPatch,
    codec: str,
) -> None:
    monkeypatch.setattr(ari, "PROBE_TIMEOUT", 0.3)

    async def main() -> tuple[str, list[dict[str, Any]]]:
        async with fake_and_client(ws_mode, mode) as (server, client), Consumer(client):
            return await client.rest_transport(), server.ws

    transport, seen = asyncio.run(main())
    assert transport == expected
    assert [m["uri"] for m in seen] == ["asterisk/info?only=build"] * probes


def test_requests_before_the_probe_answers_go_over_http() -> None:
    """on_connect's requests never wait for the probe (an older Asterisk never answers)."""
    async def main() -> tuple[list[str], str, list[str]]:
        async with fake_and_client("silent") as (server, client):
            async def hook() -> None:
                await client.answer("early")

            async with Consumer(client, hook):
                before = list(server.http)
                await client.answer("late")  # the probe has not timed out yet
                return before, client.transport, server.http

    before, transport, http = asyncio.run(main())
    assert before == ["POST /ari/channels/early/answer"]
    assert transport == "http"
    assert http[-1] == "POST /ari/channels/late/answer"


# --------------------------------------------------------------------------- requests


# (call, expected result or error text): the same over both transports
CASES: list[tuple[str, Callable[[AriClient], Awaitable[Any]], Any]] = [
    ("204", lambda c: c.answer("ch-1"), None),
    ("200 JSON", lambda c: c.info(), {"build": {"os": "Linux"}}),
    ("404 missing ok", lambda c: c.channel("missing"), None),
    ("404 error", lambda c: c.answer("missing"),
     "ARI POST /channels/missing/answer: HTTP 404 Channel not found"),
    ("500 error", lambda c: c.request("GET", "/boom"),
     "ARI GET /boom: HTTP 500 Internal Server Error"),
    ("JSON body", lambda c: c.request("POST", "/echo", body={"variables": {"A": "é b"}}),
     {"method": "POST", "path": "echo", "body": {"variables": {"A": "é b"}}}),
]


@pytest.mark.parametrize(("name", "call", "expected"), CASES, ids=[c[0] for c in CASES])
def test_answers_and_errors_are_the_same_on_both_transports(
    name: str, call: Callable[[AriClient], Awaitable[Any]], expected: Any, codec: str,
) -> None:
    async def outcome(client: AriClient) -> Any:
        try:
            return await call(client)
        except AriError as exc:
            return str(exc)

    async def main() -> dict[str, Any]:
        results: dict[str, Any] = {}
        for mode in ("auto", "off"):
            async with fake_and_client(mode=mode) as (server, client), Consumer(client):
                transport = await client.rest_transport()
                results[transport] = await outcome(client)
                assert client.requests[{"websocket": "ws", "http": "http"}[transport]] >= 1
                if transport == "websocket":
                    assert server.http == [], "a websocket request must not use HTTP"
        return results

    results = asyncio.run(main())
    assert results == {"websocket": expected, "http": expected}


def test_query_parameters_keep_spaces_plus_and_commas() -> None:
    """Asterisk does not read "+" as a space on the websocket: both are %-encoded."""
    async def main() -> list[str]:
        async with fake_and_client() as (server, client), Consumer(client):
            assert await client.rest_transport() == "websocket"
            await client.play("ch 1", "pb+1", ("sound:a", "sound:b"), "en")
            await client.set_variable("ch", "X", 'a b+c&d="e"')
            return [m["uri"] for m in server.ws[1:]]

    uris = asyncio.run(main())
    assert uris == [
        "channels/ch%201/play/pb%2B1?media=sound:a,sound:b&lang=en",
        "channels/ch/variable?variable=X&value=a%20b%2Bc%26d%3D%22e%22",
    ]


def test_answers_are_matched_by_request_id_in_any_order() -> None:
    async def main() -> list[Any]:
        async with fake_and_client() as (server, client), Consumer(client):
            assert await client.rest_transport() == "websocket"
            server.reverse = 5  # hold 5 requests, then answer them last-first
            return await asyncio.gather(*(
                client.request("POST", f"/echo/{i}", body={"n": i}) for i in range(5)))

    answers = asyncio.run(main())
    assert [a["body"]["n"] for a in answers] == [0, 1, 2, 3, 4]
    assert [a["path"] for a in answers] == [f"echo/{i}" for i in range(5)]


def test_no_answer_times_out_and_falls_back_to_http_until_a_probe_answers() -> None:
    async def main() -> tuple[str, float, int, str, str]:
        async with fake_and_client(timeout=0.3) as (_server, client), Consumer(client):
            assert await client.rest_transport() == "websocket"
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(AriError) as err:
                await client.request("POST", "/hang/up")
            took = loop.time() - started
            right_after = client.transport
            return str(err.value), took, len(client._pending), right_after, \
                await client.rest_transport()

    message, took, pending, right_after, later = asyncio.run(main())
    assert message == "ARI POST /hang/up: no answer in 0.3s"
    assert 0.25 < took < 2.0
    assert pending == 0, "a timed-out request must not stay in the pending table"
    assert right_after == "http"
    assert later == "websocket", "the re-probe answered: back on the websocket"


def test_forced_on_times_out_without_falling_back() -> None:
    async def main() -> tuple[str, str, list[str]]:
        async with fake_and_client("silent", mode="on", timeout=0.2) as (server, client), \
                Consumer(client):
            with pytest.raises(AriError) as err:
                await client.answer("ch-1")
            return str(err.value), client.transport, server.http

    message, transport, http = asyncio.run(main())
    assert message == "ARI POST /channels/ch-1/answer: no answer in 0.2s"
    assert transport == "websocket"
    assert http == []


def test_losing_the_websocket_fails_waiting_requests_at_once_and_http_takes_over() -> None:
    async def main() -> dict[str, Any]:
        async with fake_and_client(timeout=10) as (server, client), Consumer(client) as cons:
            assert await client.rest_transport() == "websocket"
            loop = asyncio.get_running_loop()
            post = asyncio.ensure_future(client.request("POST", "/hang/a"))
            get = asyncio.ensure_future(client.request("GET", "/hang/b"))
            await until(lambda: len(server.ws) == 3)
            started = loop.time()
            await server.drop()
            results = await asyncio.gather(post, get, return_exceptions=True)
            out: dict[str, Any] = {
                "took": loop.time() - started, "post": results[0], "get": results[1],
                "http_after_drop": list(server.http),
            }
            await until(lambda: cons.connects == 2)
            out["after_reconnect"] = await client.rest_transport()
            await client.answer("ch-2")
            out["answer_over"] = server.ws[-1]["uri"]
            return out

    out = asyncio.run(main())
    assert out["took"] < 2, "waiting requests must fail when the websocket goes, not at 10 s"
    assert isinstance(out["post"], AriError)
    assert str(out["post"]) == ("ARI POST /hang/a: the events websocket closed before "
                                "the answer")
    # A GET is safe to repeat: it went once more, over HTTP.
    assert out["get"] is None
    assert out["http_after_drop"] == ["GET /ari/hang/b"]
    assert out["after_reconnect"] == "websocket"
    assert out["answer_over"] == "channels/ch-2/answer"


# (name, call, uri part to drop on, ran before the drop, result or error, HTTP after)
LOST: list[tuple[str, Callable[[AriClient], Awaitable[Any]], str, bool, Any, list[str]]] = [
    # Repeat-safe: sent again over HTTP, and the caller gets the answer.
    ("answer", lambda c: c.answer("ch"), "/answer", True, None,
     ["POST /ari/channels/ch/answer"]),
    ("variable", lambda c: c.set_variable("ch", "X", "1"), "/variable", True, None,
     ["POST /ari/channels/ch/variable?variable=X&value=1"]),
    ("event filter", lambda c: c.request("PUT", "/applications/a/eventFilter",
                                         body={"allowed": []}), "eventFilter", True, None,
     ["PUT /ari/applications/a/eventFilter"]),
    # A play: Asterisk would take the same playback id again and play it twice, so the
    # client asks for the playback first, and plays only if it is not there.
    ("play, lost before Asterisk ran it",
     lambda c: c.request("POST", "/channels/ch/play/pb-1", {"media": "sound:x"}),
     "/play/", False, {"id": "pb-1", "state": "queued"},
     ["GET /ari/playbacks/pb-1", "POST /ari/channels/ch/play/pb-1?media=sound:x"]),
    ("play, answer lost after Asterisk ran it",
     lambda c: c.request("POST", "/channels/ch/play/pb-1", {"media": "sound:x"}),
     "/play/", True, {"id": "pb-1", "state": "playing"},
     ["GET /ari/playbacks/pb-1"]),
    # May move or create a channel, or act twice: fails closed, never sent again.
    ("continue", lambda c: c.continue_in_dialplan("ch"), "/continue", True,
     "ARI POST /channels/ch/continue: the events websocket closed before the answer", []),
    ("originate", lambda c: c.originate("Local/s@x", APP), "channels?", True,
     "ARI POST /channels: the events websocket closed before the answer", []),
    ("dtmf", lambda c: c.send_dtmf("ch", "1"), "/dtmf", True,
     "ARI POST /channels/ch/dtmf: the events websocket closed before the answer", []),
]


@pytest.mark.parametrize(("name", "call", "drop_on", "ran", "expected", "http"), LOST,
                         ids=[c[0] for c in LOST])
def test_a_request_cut_off_by_the_websocket_goes_again_only_if_repeat_safe(
    name: str, call: Callable[[AriClient], Awaitable[Any]], drop_on: str, ran: bool,
    expected: Any, http: list[str],
) -> None:
    """The server closes the websocket on the request, unanswered (issue: a network
    blip during the menu's first play cost the caller the menu)."""
    async def main() -> tuple[Any, list[str], list[str]]:
        async with fake_and_client(timeout=10) as (server, client), Consumer(client):
            assert await client.rest_transport() == "websocket"
            server.drop_on, server.drop_after_run = drop_on, ran
            try:
                result = await asyncio.wait_for(call(client), 5)
            except AriError as exc:
                result = str(exc)
            assert server.drop_on is None, "the request went on the websocket"
            return result, server.http, server.started

    result, seen, started = asyncio.run(main())
    assert result == expected
    assert seen == http
    if "/play/" in drop_on:
        assert started == ["pb-1"], "the prompt must play once, not twice"


@pytest.mark.parametrize(("call", "path", "tries", "error"), [
    (lambda c: c.channel("ch"), "channels/ch", 2, None),
    (lambda c: c.answer("ch"), "channels/ch/answer", 2, None),
    (lambda c: c.set_variable("ch", "X", "1"), "channels/ch/variable", 2, None),
    (lambda c: c.continue_in_dialplan("ch"), "channels/ch/continue", 1,
     "ARI POST /channels/ch/continue: ServerDisconnectedError"),
    # Over HTTP there is no cheap "did it start?" before a retry: fails closed.
    (lambda c: c.play("ch", "pb-1", ("sound:x",)), "channels/ch/play/pb-1", 1,
     "ARI POST /channels/ch/play/pb-1: ServerDisconnectedError"),
], ids=["get", "answer", "variable", "continue", "play"])
def test_a_dropped_http_connection_is_retried_only_if_repeat_safe(
    call: Callable[[AriClient], Awaitable[Any]], path: str, tries: int, error: str | None,
) -> None:
    async def main() -> tuple[str | None, int]:
        async with fake_and_client(mode="off") as (server, client):
            server.disconnect_once.add(path)
            try:
                await call(client)
                outcome = None
            except AriError as exc:
                outcome = str(exc)
            return outcome, sum(1 for r in server.http if f"/ari/{path}" in r)

    outcome, sent = asyncio.run(main())
    assert outcome == error
    assert sent == tries


def test_rest_responses_never_reach_the_event_consumer(codec: str) -> None:
    async def main() -> list[str]:
        async with fake_and_client() as (server, client), Consumer(client) as consumer:
            assert await client.rest_transport() == "websocket"
            await server.event("StasisStart", channel={"id": "a"})
            await client.answer("a")
            await asyncio.gather(*(client.info() for _ in range(3)))
            # A stray answer (late, or to nobody) is dropped too.
            for ws in server.sockets:
                await ws.send_json({"type": "RESTResponse", "request_id": "nobody",
                                    "status_code": 200, "application": APP})
            await server.event("StasisEnd", channel={"id": "a"})
            await until(lambda: len(consumer.events) >= 2)
            await asyncio.sleep(0.05)
            return [e["type"] for e in consumer.events]

    assert asyncio.run(main()) == ["StasisStart", "StasisEnd"]


def test_requests_are_answered_while_the_consumer_is_busy() -> None:
    """A reader task owns the websocket: an await in ``on_connect``, or inside the
    ``async for`` body, does not starve the answers."""
    async def main() -> tuple[Any, list[Any]]:
        async with fake_and_client(mode="on") as (server, client):
            got: list[Any] = []

            async def hook() -> None:
                await client.answer("in-hook")  # over the websocket (mode on)
                asyncio.get_running_loop().create_task(
                    server.event("StasisStart", channel={"id": "b"}))

            async def inline() -> None:
                async for _event in client.events(APP, on_connect=hook):
                    got.append(await client.info())
                    return

            await asyncio.wait_for(inline(), 5)
            return server.ws[0]["uri"], got

    first, got = asyncio.run(main())
    assert first == "channels/in-hook/answer"
    assert got == [{"build": {"os": "Linux"}}]


@pytest.mark.parametrize(("mode", "expected"), [
    ("auto", ["StasisStart", "RESTResponse"]),
    ("on", ["StasisStart", "RESTResponse"]),
    ("off", ["StasisStart"]),
])
def test_the_event_filter_lets_rest_responses_through(mode: str, expected: list[str]) -> None:
    """Asterisk's event filter drops RESTResponse too (seen on 22.10.1)."""
    async def main() -> Any:
        async with fake_and_client(mode=mode) as (server, client), Consumer(client):
            await client.rest_transport()
            await client.set_event_filter(APP, ["StasisStart"])
            sent = [m for m in server.ws if m["uri"].endswith("eventFilter")]
            if sent:
                return json.loads(sent[0]["message_body"])
        return None

    body = asyncio.run(main())
    if mode == "off":
        assert body is None  # went over HTTP
    else:
        assert body == {"allowed": [{"type": t} for t in expected]}


def test_the_setting_reads_auto_on_off(tmp_path: Any) -> None:
    def load(value: str | None) -> str:
        line = f"  rest_over_websocket: {value}\n" if value is not None else ""
        path = tmp_path / "c.yaml"
        path.write_text(
            "ari:\n  url: http://127.0.0.1:8088\n  username: u\n  password: p\n" + line
            + f"database: {tmp_path}/c.db\nrecordings:\n  dir: {tmp_path}/r\nflows:\n"
            + "".join(f"  {line}\n" for line in flow_yaml().splitlines()),
            encoding="utf-8")
        try:
            return load_settings(path).ari.rest_over_websocket
        except ConfigError as exc:
            return str(exc)

    assert load(None) == "auto"
    assert load("auto") == "auto"
    assert load("on") == "on"  # YAML 1.1 reads these as booleans: still accepted
    assert load("off") == "off"
    assert load('"off"') == "off"
    assert "rest_over_websocket: expected auto, on or off" in load("sometimes")


# --------------------------------------------------------------------------- real Asterisk

DIALPLAN = """\
; Generated by tests/test_ari_transport.py
[cvr-transport]
exten => s,1,NoOp(transport test)
 same => n,Stasis(${APP})
 same => n,Set(GLOBAL(CVRT_${UNIQUEID})=${CVRT_A}|${CVRT_B}|${CVRT_C})
 same => n,Hangup()
"""


async def real_call(pbx: Any, mode: str) -> dict[str, Any]:
    """One Local call through a Stasis app run by a bare AriClient in ``mode``."""
    ep = pbx.endpoints
    app = f"cvr-t-{uuid.uuid4().hex[:8]}"
    pbx.set_dialplan(DIALPLAN.replace("${APP}", app))
    base = AriSettings(url=ep.ari_url, username=ep.ari_user, password=ep.ari_password)
    caller = AriClient(AriSettings(url=base.url, username=base.username,
                                   password=base.password, app=app + "-caller",
                                   rest_over_websocket="off"))
    client = AriClient(AriSettings(url=base.url, username=base.username,
                                   password=base.password, app=app,
                                   rest_over_websocket=mode))
    events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    up = asyncio.Event()

    async def connected() -> None:
        await client.set_event_filter(app, ["StasisStart", "PlaybackFinished"])
        up.set()

    async def pump() -> None:
        async for event in client.events(app, on_connect=connected):
            events.put_nowait(event)

    async def caller_pump() -> None:
        async for _ in caller.events(app + "-caller"):
            pass

    async def next_event(kind: str) -> dict[str, Any]:
        while True:
            event = await asyncio.wait_for(events.get(), 15)
            assert event["type"] != "RESTResponse"
            if event["type"] == kind:
                return event

    tasks = [asyncio.create_task(pump()), asyncio.create_task(caller_pump())]
    out: dict[str, Any] = {}
    try:
        await asyncio.wait_for(up.wait(), 15)
        out["transport"] = await client.rest_transport()
        before = dict(client.requests)
        caller_id, far_id = f"c-{uuid.uuid4().hex}", f"s-{uuid.uuid4().hex}"
        await caller.request("POST", "/channels", {
            "endpoint": "Local/s@cvr-transport", "app": app + "-caller",
            "channelId": caller_id, "otherChannelId": far_id, "formats": "ulaw",
        })
        start = await next_event("StasisStart")
        assert start["channel"]["id"] == far_id
        await client.answer(far_id)
        await client.play(far_id, f"pb-{uuid.uuid4().hex}", ("sound:beep", "sound:beep"), "en")
        await next_event("PlaybackFinished")
        await client.set_variables(far_id, [("CVRT_A", "yes"), ("CVRT_B", "x1"),
                                            ("CVRT_C", "a b+c")])
        out["read_back"] = await client.get_variable(far_id, "CVRT_C")
        out["channel"] = (await client.channel(far_id) or {}).get("state")
        with pytest.raises(AriError) as err:
            await client.answer("no-such-channel")
        out["error"] = str(err.value)
        out["missing"] = await client.channel("no-such-channel")
        await client.continue_in_dialplan(far_id)
        for _ in range(100):
            data = await caller.request("GET", "/asterisk/variable",
                                        {"variable": f"CVRT_{far_id}"}, ok_missing=True)
            if (data or {}).get("value"):
                out["dialplan_saw"] = data["value"]
                break
            await asyncio.sleep(0.1)
        out["requests"] = {k: client.requests[k] - before[k] for k in before}
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await client.close()
        await caller.close()
    return out


@pytest.mark.parametrize(("mode", "transport"), [
    ("auto", "websocket"), ("on", "websocket"), ("off", "http"),
])
def test_a_real_call_over_each_transport(pbx: Any, mode: str, transport: str) -> None:
    out = asyncio.run(asyncio.wait_for(real_call(pbx, mode), 60))
    assert out["transport"] == transport, "Asterisk 22.10 takes REST on the websocket"
    assert out["channel"] == "Up"
    assert out["read_back"] == "a b+c"
    assert out["error"] == "ARI POST /channels/no-such-channel/answer: HTTP 404 Channel not found"
    assert out["missing"] is None
    assert out["dialplan_saw"] == "yes|x1|a b+c", "variables set, then the call continued"
    # answer, play, 2 set_variable (ARRAY + one with a space), get, channel x2,
    # answer (404), continue: 9 requests, all on the chosen transport.
    used, other = ("ws", "http") if transport == "websocket" else ("http", "ws")
    assert out["requests"][used] == 9, out["requests"]
    assert out["requests"][other] == 0, out["requests"]
