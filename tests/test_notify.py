"""sd_notify against a real datagram socket bound by the test (what systemd does)."""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from consentivr.health import Health
from consentivr.notify import Notifier


class FakeSystemd:
    """The receiving end of $NOTIFY_SOCKET: a bound AF_UNIX datagram socket."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(5)

    def receive(self) -> str:
        return self.sock.recv(4096).decode()

    def nothing_pending(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(4096)
        except BlockingIOError:
            return True
        finally:
            self.sock.settimeout(5)
        return False


@pytest.fixture(params=["path", "abstract"])
def systemd(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[FakeSystemd, str]]:
    if request.param == "path":
        path = str(tmp_path / "notify.sock")
        fake, env = FakeSystemd(path), path
    else:
        name = f"consentivr-test-{uuid.uuid4().hex}"
        fake, env = FakeSystemd(b"\0" + name.encode()), f"@{name}"
    try:
        yield fake, env
    finally:
        fake.sock.close()


def test_ready_status_stopping(systemd: tuple[FakeSystemd, str]) -> None:
    fake, address = systemd
    n = Notifier({"NOTIFY_SOCKET": address})
    assert n.enabled
    assert n.ready("ready: ari up")
    assert fake.receive() == "READY=1\nSTATUS=ready: ari up"
    assert n.status("degraded:\n ami: down")
    assert fake.receive() == "STATUS=degraded: ami: down"  # one line, whatever it is given
    assert n.stopping()
    assert fake.receive() == "STOPPING=1"
    n.close()


def test_without_notify_socket_nothing_is_sent(tmp_path: Path) -> None:
    n = Notifier({})
    assert not n.enabled
    assert n.ready() is False and n.ping() is False
    assert Notifier({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled is False


def test_a_gone_systemd_does_not_raise(tmp_path: Path) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody.sock")})
    assert n.ready() is False


@pytest.mark.parametrize(("env", "interval"), [
    ({"WATCHDOG_USEC": "30000000"}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({}, None),
])
def test_watchdog_interval_is_half_of_watchdog_usec(env: dict[str, str],
                                                     interval: float | None) -> None:
    assert Notifier({"NOTIFY_SOCKET": "/run/x", **env}).watchdog_interval == interval


def test_watchdog_pings_from_the_loop_and_stops_when_cancelled(
        systemd: tuple[FakeSystemd, str]) -> None:
    fake, address = systemd
    n = Notifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "40000"})  # ping every 20 ms

    async def main() -> None:
        task = n.start_watchdog()
        assert task is not None
        pings = [await asyncio.to_thread(fake.receive) for _ in range(3)]
        assert pings == ["WATCHDOG=1"] * 3
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    while not fake.nothing_pending():  # drain what was sent before the cancel
        pass
    fake.sock.settimeout(0.2)
    with pytest.raises(TimeoutError):
        fake.receive()  # no ping after the cancel


def test_a_stuck_loop_stops_the_pings(systemd: tuple[FakeSystemd, str]) -> None:
    fake, address = systemd
    n = Notifier({"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "40000"})

    async def main() -> None:
        task = n.start_watchdog()
        assert task is not None
        await asyncio.to_thread(fake.receive)
        while not fake.nothing_pending():
            pass
        time.sleep(0.2)  # the loop is blocked: no ping may arrive meanwhile
        assert fake.nothing_pending()
        task.cancel()

    asyncio.run(main())


def test_no_watchdog_task_when_systemd_asked_for_none() -> None:
    async def main() -> None:
        assert Notifier({"NOTIFY_SOCKET": "/run/x"}).start_watchdog() is None
        await Notifier({}).watchdog()  # returns at once

    asyncio.run(main())


def test_follow_sends_ready_once_health_is_ok_then_status(
        systemd: tuple[FakeSystemd, str]) -> None:
    fake, address = systemd
    n = Notifier({"NOTIFY_SOCKET": address})
    h = Health(("ami", "log"))
    n.follow(h)
    assert fake.receive() == ("STATUS=degraded: ami: not connected yet; "
                              "log: not connected yet")
    h.component_up("ami", True)
    assert fake.receive() == "STATUS=degraded: log: not connected yet"
    h.component_up("log", True)
    assert fake.receive() == "READY=1\nSTATUS=ready: ami up, log up"
    h.component_up("ami", False, "connection lost")
    assert fake.receive() == "STATUS=degraded: ami: connection lost"
    h.component_up("ami", True)
    assert fake.receive() == "STATUS=ready: ami up, log up"  # READY=1 only once
