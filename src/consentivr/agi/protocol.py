"""The FastAGI wire protocol: the environment, one command line and one reply at a time.

Why our own, not panoramisk's FastAGI (measured with panoramisk 1.4, see
``docs/agi.md``): its server freezes the whole event loop when a TCP connection
opens and closes with nothing sent (a health check does that), and its synchronous
routes fail on Python 3.11 (``asyncio.coroutine`` is gone). Written directly on
asyncio streams it gets a time limit and size cap on the environment, a line limit
and a timeout on every command, and one bad connection can only ever end itself.

Replies are parsed in linear time: a crafted reply line cannot cost the event loop
more than reading it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from consentivr.errors import ChannelGone, ConsentivrError

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 4573
ESCAPE_DIGITS = "0123456789*#"
ENV_TIMEOUT = 5.0  # Asterisk sends the whole environment at once
ENV_MAX_BYTES = 16 * 1024  # a real one is about 600 bytes
ENV_MAX_LINES = 200
LINE_LIMIT = 8 * 1024  # per line, both ways; Asterisk's own AGI buffer is 2 KiB
COMMAND_TIMEOUT = 10.0  # a non-blocking command (SET VARIABLE...) answers at once
MAX_ID = 150  # Asterisk's uniqueid is at most 150 characters

_ENV_LINE = re.compile(r"(agi_[A-Za-z0-9_]+):(?: (.*))?")
_REPLY = re.compile(r"(\d{3})([ -])(.*)")
_NUMBER = re.compile(r"-?\d+")
_FIELD = re.compile(r"[A-Za-z_]+=\S*")
_BARE_ARG = re.compile(r'[^\s"\\]+')
_DEAD = 511  # "Command Not Permitted on a dead channel or intercept routine"


class AgiError(ConsentivrError):
    """The AGI peer sent something we cannot use, went silent, or a command failed."""


class AgiConnectionLost(AgiError, ChannelGone):
    """The connection closed (or was reset): the channel is no longer ours.

    ``partial``: the peer had sent part of a line before closing.
    """

    def __init__(self, message: str, partial: bool = False) -> None:
        super().__init__(message)
        self.partial = partial


# --- the wire protocol --------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """One AGI reply: ``200 result=1 (value) endpos=3520``."""

    code: int
    result: int | None = None
    data: str | None = None  # the text in parentheses, e.g. GET VARIABLE's value
    fields: Mapping[str, str] = field(default_factory=dict)  # e.g. endpos
    text: str = ""  # the first line as received, for messages


def parse_reply(line: str) -> Reply:
    """Parse a reply's first line; AgiError for anything that is not an AGI reply.

    ``200 result=<n>[ (<data>)][ key=value...]``. No backtracking regex: the data runs
    to the last ``)`` and what follows must be ``key=value`` fields, so a hostile
    line costs time linear in its length.
    """
    m = _REPLY.fullmatch(line)
    if m is None:
        raise AgiError(f"not an AGI reply: {line[:80]!r}")
    code, rest = int(m.group(1)), m.group(3).rstrip()
    if code != 200:
        return Reply(code, text=line)
    if not rest.startswith("result="):
        raise AgiError(f"AGI reply without a result: {line[:80]!r}")
    number, _, tail = rest[len("result="):].partition(" ")
    data: str | None = None
    if tail.startswith("("):
        close = tail.rfind(")")
        if close < 0:
            raise AgiError(f"AGI reply without a result: {line[:80]!r}")
        data, tail = tail[1:close], tail[close + 1:]
        if tail and not tail[0].isspace():  # "(data)x": fields need a space
            raise AgiError(f"AGI reply without a result: {line[:80]!r}")
    fields = tail.split()
    if not _NUMBER.fullmatch(number) or not all(_FIELD.fullmatch(f) for f in fields):
        raise AgiError(f"AGI reply without a result: {line[:80]!r}")
    extra = dict(f.split("=", 1) for f in fields)
    return Reply(200, int(number), data, extra, line)


def parse_environment(lines: list[str]) -> dict[str, str]:
    """``agi_key: value`` lines (without the blank line) as a dict; AgiError if malformed."""
    env: dict[str, str] = {}
    for line in lines:
        m = _ENV_LINE.fullmatch(line)
        if m is None or "\0" in line:  # SQLite and the caller HMAC refuse NUL
            raise AgiError(f"not an AGI environment line: {line[:80]!r}")
        env[m.group(1)] = m.group(2) or ""
    for key in ("agi_channel", "agi_uniqueid"):
        if not env.get(key):
            raise AgiError(f"AGI environment without {key}")
    uniqueid = env["agi_uniqueid"]
    if len(uniqueid) > MAX_ID or not uniqueid.isprintable():
        raise AgiError(f"AGI environment with an impossible agi_uniqueid {uniqueid[:40]!r}")
    return env


def flow_name(env: Mapping[str, str]) -> str | None:
    """The ``<flow>`` of ``agi://host:port/<flow>``; None when the URL names none."""
    script = env.get("agi_network_script", "").split("?", 1)[0].strip("/")
    return script or None


def quote(arg: str) -> str:
    """One AGI command argument, quoted the way Asterisk's ``parse_args`` reads it."""
    if any(c in arg for c in "\r\n\0"):
        raise AgiError(f"an AGI argument cannot hold a line break: {arg[:40]!r}")
    if _BARE_ARG.fullmatch(arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def parse_listen(text: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:4573`` for IPv6) -> (host, port); ValueError if malformed."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r}: expected host:port, e.g. 127.0.0.1:4573")
    host = host.removeprefix("[").removesuffix("]") or DEFAULT_HOST
    return host, int(port)


class AgiConnection:
    """One FastAGI connection: read the environment, then send commands, read replies."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.hung_up = False  # Asterisk said HANGUP (or 511): the channel is gone
        self.broken: str | None = None  # why we cannot talk any more, once we cannot
        # One watchdog timer per connection instead of an asyncio.timeout() per
        # command (that was 8% of the CPU): it fires at most once per deadline
        # passed, and re-arms only when a command's deadline is earlier.
        self._deadline: float | None = None  # loop time the pending reply is due by
        self._watchdog: asyncio.TimerHandle | None = None

    async def read_environment(self, timeout: float = ENV_TIMEOUT,
                               max_bytes: int = ENV_MAX_BYTES) -> dict[str, str]:
        lines: list[str] = []
        size = 0
        try:
            async with asyncio.timeout(timeout):
                while True:
                    try:
                        raw = await self._readline()
                    except AgiConnectionLost as exc:
                        if lines or exc.partial:
                            raise AgiError(f"connection closed after {len(lines)} "
                                           "AGI environment line(s)") from None
                        raise
                    size += len(raw)
                    if size > max_bytes or len(lines) >= ENV_MAX_LINES:
                        raise AgiError(f"AGI environment larger than {max_bytes} bytes")
                    line = _decode(raw)
                    if not line:
                        break
                    lines.append(line)
        except TimeoutError:
            raise AgiError(f"no complete AGI environment within {timeout:g}s") from None
        return parse_environment(lines)

    async def command(self, words: str, *args: str, timeout: float = COMMAND_TIMEOUT) -> Reply:
        """Send one command and wait for its reply (HANGUP lines are noted and skipped)."""
        if self.broken:
            raise AgiConnectionLost(self.broken) if self.hung_up else AgiError(self.broken)
        line = " ".join([words, *(quote(a) for a in args)])
        try:
            self.writer.write(line.encode() + b"\n")
            await self.writer.drain()
            self._expect_by(timeout)
            try:
                return await self._read_reply()
            finally:
                self._deadline = None
        except TimeoutError:
            self.broken = f"AGI {words}: no reply within {timeout:g}s"
            raise AgiError(self.broken) from None
        except (ConnectionError, OSError) as exc:
            self.broken, self.hung_up = f"AGI connection lost ({exc})", True
            raise AgiConnectionLost(self.broken) from None
        except AgiConnectionLost as exc:
            self.broken, self.hung_up = str(exc), True
            raise
        except AgiError as exc:
            self.broken = str(exc)  # out of step with Asterisk: no further commands
            raise

    def _expect_by(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        self._deadline = deadline = loop.time() + timeout
        if self._watchdog is None or self._watchdog.when() > deadline:
            if self._watchdog is not None:
                self._watchdog.cancel()
            self._watchdog = loop.call_at(deadline, self._check_deadline)

    def _check_deadline(self) -> None:
        self._watchdog = None
        deadline = self._deadline
        if deadline is None:
            return  # no reply pending: the next command arms it again
        loop = asyncio.get_running_loop()
        if loop.time() >= deadline:
            self.reader.set_exception(TimeoutError())  # wakes the pending readline
        else:
            self._watchdog = loop.call_at(deadline, self._check_deadline)

    async def _read_reply(self) -> Reply:
        while True:
            line = _decode(await self._readline())
            if line == "HANGUP":
                self.hung_up = True
                continue
            reply = parse_reply(line)
            if line[3:4] == "-":  # 520-...: usage text until "520 End of proper usage."
                while not _decode(await self._readline()).startswith(f"{reply.code} "):
                    pass
            if reply.code == _DEAD:
                self.hung_up = True
            return reply

    async def _readline(self) -> bytes:
        try:
            raw = await self.reader.readline()
        except ValueError:  # longer than the stream's limit
            raise AgiError(f"AGI line longer than {LINE_LIMIT} bytes") from None
        if not raw.endswith(b"\n"):
            raise AgiConnectionLost("AGI connection closed", partial=bool(raw))
        return raw

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):  # TimeoutError is an OSError
            await asyncio.wait_for(self.writer.wait_closed(), 5)


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "replace").rstrip("\r\n")
