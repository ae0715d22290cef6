"""Tools to break things on purpose, shared by the fault tests and the chaos suite.

- :class:`TcpProxy` sits between consentivr and Asterisk (ARI or AMI): ``cut()`` drops
  every connection as a network hiccup would, ``refuse`` makes it look down.
  :class:`RestCutProxy` cuts by itself when a given REST request passes on the ARI
  events websocket, before Asterisk gets it or after Asterisk ran it.
- :func:`crash` abandons an in-process :class:`~consentivr.service.Service` the way
  ``kill -9`` would: no drain, no continue, no goodbye to Asterisk.
- :func:`db_lock` holds an exclusive SQLite lock from another connection.
- :func:`small_fs` mounts a tiny tmpfs (root only) to fill up or make read-only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from consentivr.configfile import load_settings
from consentivr.messages import DecisionRecord, KeyPress
from consentivr.model import Decision
from consentivr.service import Service
from consentivr.settings import Settings
from consentivr.store import ConsentLog, load_or_create_key
from consentivr_testbed.pbx import PbxEndpoints
from consentivr_testbed.testbed import flow_yaml, write_config

SECRETS = ("ari-Pa55word-xyz", "ami-Pa55word-xyz")
DUMMY = PbxEndpoints(
    ari_url="http://127.0.0.1:1", ari_user="consentivr", ari_password=SECRETS[0],
    ami_host="127.0.0.1", ami_port=1, ami_user="consentivr", ami_password=SECRETS[1],
    sip_host="127.0.0.1", sip_port=None, shared_dir=None,
)


def settings_in(workdir: Path, extra: str = "", flows: str | None = None) -> Settings:
    workdir.mkdir(parents=True, exist_ok=True)
    path = write_config(workdir / "config.yaml", DUMMY, workdir, flows or flow_yaml(),
                        extra=extra)
    return load_settings(path)


def record(call_id: str | None = None, channel_id: str = "ch", caller: str | None = "+31",
           recording: bool = False, directory: str = "/rec") -> DecisionRecord:
    call_id = call_id or uuid.uuid4().hex
    now = time.time()
    return DecisionRecord(
        call_id=call_id, channel_id=channel_id, linkedid=channel_id, channel_name="PJSIP/a-1",
        caller=caller, flow="main", language="en", notice_version="v1", started_at=now - 5,
        decided_at=now, keys=(KeyPress("1", now, "recording"),),
        decisions={"recording": Decision.YES if recording else Decision.NO},
        retention_until={"recording": now + 86400},
        recording_path=f"{directory}/{call_id}.wav" if recording else None,
        outcome="completed", recording_until=now + 86400 if recording else None,
    )


class TcpProxy:
    """A TCP relay on 127.0.0.1 with a kill switch."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.refuse = False
        self.port = 0
        self.cuts = 0
        self._server: asyncio.Server | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refuse:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        pair = (writer, up_writer)
        self._pairs.add(pair)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                       upstream: bool) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await src.read(65536):
                    out, cut = self.relay(pair, upstream, data)
                    if out:
                        dst.write(out)
                        await dst.drain()
                    if cut:
                        self.cut()
                        break
            dst.close()

        try:
            await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))
        finally:
            self._pairs.discard(pair)

    def relay(self, conn: object, upstream: bool, data: bytes) -> tuple[bytes, bool]:
        """What to pass on of ``data`` (client to server if ``upstream``), and whether
        to cut every connection after it. A subclass may hold bytes back."""
        return data, False

    def cut(self) -> int:
        """Drop every open connection (both directions); return how many."""
        self.cuts += 1
        pairs = list(self._pairs)
        for down, up in pairs:
            for w in (down, up):
                transport = w.transport
                if transport is not None:
                    transport.abort()
        self._pairs.clear()
        return len(pairs)

    async def close(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)


class _WsFrames:
    """One direction of a websocket connection, split into frames (RFC 6455): the HTTP
    upgrade head first, then each frame with its text if it is a whole text frame."""

    def __init__(self) -> None:
        self.buf = b""
        self.in_head = True

    def feed(self, data: bytes) -> list[tuple[bytes, str | None]]:
        self.buf += data
        out: list[tuple[bytes, str | None]] = []
        if self.in_head:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return out
            out.append((self.buf[:end + 4], None))
            self.buf, self.in_head = self.buf[end + 4:], False
        while (frame := self._frame()) is not None:
            out.append(frame)
        return out

    def _frame(self) -> tuple[bytes, str | None] | None:
        b = self.buf
        if len(b) < 2:
            return None
        length, pos = b[1] & 0x7F, 2
        if length >= 126:
            size = 2 if length == 126 else 8
            if len(b) < pos + size:
                return None
            length, pos = int.from_bytes(b[pos:pos + size], "big"), pos + size
        mask = b""
        if b[1] & 0x80:  # the client's frames are masked
            if len(b) < pos + 4:
                return None
            mask, pos = b[pos:pos + 4], pos + 4
        if len(b) < pos + length:
            return None
        payload = b[pos:pos + length]
        if mask:
            payload = bytes(x ^ mask[i % 4] for i, x in enumerate(payload))
        raw, self.buf = b[:pos + length], b[pos + length:]
        assert not b[0] & 0x40, "a compressed frame: Asterisk does not compress"
        whole_text = b[0] & 0x80 and b[0] & 0x0F == 1
        return raw, payload.decode() if whole_text else None


class RestCutProxy(TcpProxy):
    """A :class:`TcpProxy` that cuts every connection, once, when a ``RESTRequest``
    whose uri contains ``uri_part`` passes on an ARI events websocket:

    - ``when="request"``: the request is held back, so Asterisk never runs it;
    - ``when="answer"``: Asterisk runs it; its ``RESTResponse`` is dropped at the cut.

    ``fired`` is set at the cut; ``request`` is the RESTRequest it cut on.
    """

    def __init__(self, host: str, port: int, uri_part: str, when: str) -> None:
        super().__init__(host, port)
        assert when in ("request", "answer")
        self.uri_part, self.when = uri_part, when
        self.fired = asyncio.Event()
        self.request: dict[str, Any] | None = None
        self._streams: dict[tuple[object, bool], _WsFrames | None] = {}

    def relay(self, conn: object, upstream: bool, data: bytes) -> tuple[bytes, bool]:
        if self.fired.is_set():
            return data, False
        key = (conn, upstream)
        if key not in self._streams:
            # Only the events websocket is parsed; plain REST over HTTP passes as it is.
            is_ws = data.startswith(b"GET /ari/events") if upstream \
                else self._streams.get((conn, True)) is not None
            self._streams[key] = _WsFrames() if is_ws else None
        stream = self._streams[key]
        if stream is None:
            return data, False
        out = b""
        for raw, text in stream.feed(data):
            message = _json_object(text)
            kind = message.get("type")
            if upstream and kind == "RESTRequest" and self.request is None \
                    and self.uri_part in str(message.get("uri", "")):
                self.request = message
                if self.when == "request":
                    self.fired.set()
                    return out, True
            elif (not upstream and kind == "RESTResponse" and self.request is not None
                  and message.get("request_id") == self.request.get("request_id")):
                self.fired.set()
                return out, True
            out += raw
        return out, False


def _json_object(text: str | None) -> dict[str, Any]:
    if text is None:
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def committed_yes(bed: Any, channel_id: str) -> str:
    """A committed yes-to-recording row for this channel, as if a process that has just
    died wrote it; returns its call id."""
    call_id = uuid.uuid4().hex
    log = ConsentLog(bed.settings.database, load_or_create_key(bed.settings.database, None))
    try:
        log.append(record(call_id, channel_id=channel_id, recording=True,
                          directory=str(bed.recordings_dir)))
    finally:
        log.close()
    return call_id


async def crash(service: Service) -> None:
    """Abandon a running in-process service as ``kill -9`` would, in either mode.

    Nothing is continued or hung up: ARI calls stay in Stasis, FastAGI connections
    just close. Only our own resources are released (sockets close, as they do when a
    process dies).
    """
    if service._pump is not None:
        service._pump.cancel()
    tasks = list(service.app.tasks) if service.app is not None else []
    if service.agi is not None and service.agi._server is not None:
        service.agi._server.close()
        tasks += list(service.agi.tasks)
    for task in tasks:
        task.cancel()
    if service.writer is not None and service.writer._task is not None:
        service.writer._task.cancel()
    await asyncio.sleep(0)
    if service.ari is not None:
        await service.ari.close()
    if service.recording_listener is not None:
        await service.recording_listener.stop()
    if service.pool is not None:
        service.pool.close()
    if service.committer is not None:
        service.committer.close()


@contextlib.contextmanager
def db_lock(path: Path, seconds: float | None = None) -> Iterator[sqlite3.Connection]:
    """Hold ``BEGIN EXCLUSIVE`` on the consent log (while the block runs, or ``seconds``)."""
    conn = sqlite3.connect(path, timeout=10, isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")
    try:
        yield conn
        if seconds:
            time.sleep(seconds)
    finally:
        conn.execute("ROLLBACK")
        conn.close()


def hold_lock_in_thread(path: Path, seconds: float) -> threading.Thread:
    """Hold the lock for ``seconds`` from another thread; the caller's loop runs on."""
    locked = threading.Event()

    def hold() -> None:
        conn = sqlite3.connect(path, timeout=10, isolation_level=None)
        try:
            conn.execute("BEGIN EXCLUSIVE")
            locked.set()
            time.sleep(seconds)
            conn.execute("ROLLBACK")
        finally:
            conn.close()

    thread = threading.Thread(target=hold, name="db-lock", daemon=True)
    thread.start()
    if not locked.wait(15):
        raise RuntimeError("could not take the database lock")
    return thread


@contextlib.contextmanager
def small_fs(where: Path, size_kb: int = 512) -> Iterator[Path]:
    """A tmpfs of ``size_kb`` at ``where`` (root only; skips otherwise)."""
    where.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k,mode=0700",
                          "tmpfs", str(where)], capture_output=True, check=False)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


def fill_up(directory: Path) -> Path:
    """Write a file until the file system is full."""
    ballast = directory / "ballast"
    with ballast.open("wb", buffering=0) as fh, contextlib.suppress(OSError):
        while True:
            fh.write(b"\0" * 4096)
    return ballast


def remount(where: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(where)], check=True,
                   capture_output=True)


def rows(database: Path) -> list[dict[str, Any]]:
    if not database.exists():
        return []
    conn = sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True, timeout=10)
    conn.row_factory = sqlite3.Row
    try:
        found = [dict(r) for r in conn.execute("SELECT * FROM calls ORDER BY seq")]
    finally:
        conn.close()
    for row in found:
        row["decisions"] = json.loads(row["decisions"])
    return found


async def wait_for(predicate: Any, timeout: float, what: str, step: float = 0.05) -> Any:
    """Poll ``predicate`` (sync or async) until it returns something truthy."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(step)


# --------------------------------------------------------------------------- fakes


class FakeAri:
    """ARI as the app sees it: records every call, plays instantly, emits the events.

    ``channels`` holds the channels Asterisk "has" (for ``channel()`` and recovery);
    ``in_app`` the ids ``GET /applications`` lists.
    """

    def __init__(self, play_seconds: float = 0.005) -> None:
        self.app: Any = None
        self.play_seconds = play_seconds
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.variables: dict[str, dict[str, str]] = {}
        self.channels: dict[str, dict[str, Any]] = {}
        self.in_app: set[str] = set()
        self.continued: dict[str, tuple[str, str, int]] = {}
        self.hung_up: set[str] = set()
        self.paths: list[str] = []  # every id that would reach a URL path

    def _note(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))

    def _emit(self, event: dict[str, Any], delay: float = 0.0) -> None:
        loop = asyncio.get_running_loop()
        loop.call_later(delay, self.app.handle_event, event)

    async def answer(self, channel_id: str) -> None:
        self._note("answer", channel_id)
        self.paths.append(channel_id)

    async def play(self, channel_id: str, playback_id: str, media: tuple[str, ...],
                   language: str | None = None) -> None:
        self._note("play", channel_id, playback_id, media)
        self.paths += [channel_id, playback_id]
        self._emit({"type": "PlaybackFinished",
                    "playback": {"id": playback_id, "target_uri": f"channel:{channel_id}"}},
                   self.play_seconds)

    async def stop_playback(self, playback_id: str) -> None:
        self._note("stop_playback", playback_id)
        self.paths.append(playback_id)

    async def set_variable(self, channel_id: str, name: str, value: str) -> None:
        self._note("set_variable", channel_id, name, value)
        self.paths.append(channel_id)
        self.variables.setdefault(channel_id, {})[name] = value

    async def set_variables(self, channel_id: str, pairs: Sequence[tuple[str, str]]) -> None:
        for name, value in pairs:  # the real client packs them into ARRAY(); same effect
            await self.set_variable(channel_id, name, value)

    async def get_variable(self, channel_id: str, name: str) -> str | None:
        self.paths.append(channel_id)
        return self.variables.get(channel_id, {}).get(name)

    async def continue_in_dialplan(self, channel_id: str, context: str = "",
                                   extension: str = "", priority: int = 0) -> None:
        self._note("continue", channel_id, context, extension, priority)
        self.paths.append(channel_id)
        self.continued[channel_id] = (context, extension, priority)
        self.in_app.discard(channel_id)
        self._emit({"type": "StasisEnd", "channel": {"id": channel_id}})

    async def hangup(self, channel_id: str) -> None:
        self._note("hangup", channel_id)
        self.paths.append(channel_id)
        self.hung_up.add(channel_id)
        self.in_app.discard(channel_id)
        self.channels.pop(channel_id, None)

    async def channel(self, channel_id: str) -> dict[str, Any] | None:
        self.paths.append(channel_id)
        return self.channels.get(channel_id)

    async def application(self, app: str) -> dict[str, Any] | None:
        return {"name": app, "channel_ids": sorted(self.in_app)}


class FakeRecorder:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.started: list[tuple[str, str, str]] = []

    async def start(self, channel: str, path: str, options: str) -> None:
        from consentivr.errors import AmiError

        if self.fail:
            raise AmiError("AMI MixMonitor: not connected to 127.0.0.1:5038")
        self.started.append((channel, path, options))


class FakeCommitter:
    """Collects writes; can fail the next ``fail`` writes or answer after ``delay`` s."""

    def __init__(self, fail: int = 0, delay: float = 0.0, log: Any = None) -> None:
        self.fail = fail
        self.delay = delay
        self.log = log  # a real ConsentLog to write through, if given
        self.written: list[tuple[str, Any]] = []
        self.failed: list[tuple[str, Any]] = []
        self._lock = threading.Lock()

    def submit(self, kind: str, payload: Any) -> Any:
        from concurrent.futures import Future

        from consentivr.errors import StoreError

        fut: Future[None] = Future()

        def finish() -> None:
            with self._lock:
                failing = self.fail > 0
                if failing:
                    self.fail -= 1
            if failing:
                self.failed.append((kind, payload))
                fut.set_exception(StoreError("consent.db: cannot write the consent log: "
                                             "database is locked"))
                return
            try:
                if self.log is not None:
                    if kind == "append":
                        self.log.append(payload)
                    else:
                        getattr(self.log, kind)(*payload)
            except Exception as exc:
                fut.set_exception(exc)
                return
            self.written.append((kind, payload))
            fut.set_result(None)

        if self.delay:
            threading.Timer(self.delay, finish).start()
        else:
            finish()
        return fut
