"""The ``consentivr[fast]`` extra (issue 17, lever 2): uvloop and orjson when installed,
asyncio and json when not, with the same results either way.

"Not installed" is simulated by making the one import helper,
:func:`consentivr.accelerators.optional`, find nothing.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from typing import Any

import pytest

from consentivr import accelerators


@pytest.fixture(params=["without extra", "with extra"])
def extra(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    present = request.param == "with extra"
    if present:
        missing = [m for m in ("uvloop", "orjson") if accelerators.optional(m) is None]
        if missing:
            pytest.skip(f"not installed: {', '.join(missing)} (pip install consentivr[fast])")
    else:
        monkeypatch.setattr(accelerators, "optional", lambda name: None)
    return present


def test_run_picks_uvloop_only_when_installed(extra: bool) -> None:
    async def main() -> str:
        await asyncio.sleep(0)
        return type(asyncio.get_running_loop()).__module__

    module = accelerators.run(main())
    assert module.startswith("uvloop") == extra
    assert accelerators.loop_name() == ("uvloop" if extra else "asyncio")


def test_run_returns_the_result_and_raises_the_error(extra: bool) -> None:
    async def fine() -> int:
        return 42

    async def broken() -> None:
        raise ValueError("boom")

    assert accelerators.run(fine()) == 42
    with pytest.raises(ValueError, match="boom"):
        accelerators.run(broken())


ARI_SAMPLES: list[Any] = [
    {"type": "StasisStart", "channel": {"id": "1700000000.42", "name": "PJSIP/é-0001"},
     "args": ["main"], "timestamp": "2026-11-29T16:13:59.999+0000"},
    {"variables": {"CONSENTIVR_CALL_ID": "abc", "X": "a b,c \"q\""}},
    {"allowed": [{"type": "StasisStart"}, {"type": "RESTResponse"}]},
    [], {}, "text", 12, 1.5, None, True,
]


@pytest.mark.parametrize("value", ARI_SAMPLES, ids=range(len(ARI_SAMPLES)))
def test_json_codec_round_trips_like_the_standard_library(extra: bool, value: Any) -> None:
    loads, dumps, name = accelerators.json_codec()
    assert name == ("orjson" if extra else "json")
    text = dumps(value)
    assert isinstance(text, str)
    assert loads(text) == value
    assert loads(text.encode()) == value  # bytes too, as HTTP bodies come
    assert json.loads(text) == value  # what Asterisk's JSON parser would read


def test_json_codec_raises_value_error_on_bad_input(extra: bool) -> None:
    loads, _, _ = accelerators.json_codec()
    for bad in ("", "{", "not json", "<html>"):
        with pytest.raises(ValueError):
            loads(bad)


def test_the_cli_starts_without_the_extra() -> None:
    """The default install: with uvloop and orjson unimportable, the package and its
    CLI still load and run."""
    code = (
        "import sys; sys.modules['uvloop'] = None; sys.modules['orjson'] = None\n"
        "from consentivr import accelerators, ari\n"
        "assert accelerators.json_name == 'json' and accelerators.loop_name() == 'asyncio'\n"
        "from consentivr.cli.main import main\n"
        "main(['--version'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "consentivr" in proc.stdout


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_ami_connection_lost_before_panoramisk_attaches_still_reconnects(
    loop: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """uvloop can report an AMI connection lost before panoramisk's Manager has
    attached itself to it (found by the chaos suite: tracebacks, and no reconnect).
    Here that order is forced on a real socket: the loss must reach the Manager
    once it attaches, and it must connect again."""
    from consentivr.ami import AmiProtocol, _Connection

    if loop == "uvloop" and accelerators.optional("uvloop") is None:
        pytest.skip("uvloop is not installed (the consentivr[fast] extra)")
    if loop == "asyncio":
        monkeypatch.setattr(accelerators, "optional", lambda name: None)

    async def main() -> int:
        accepted = 0
        first_closed = asyncio.Event()

        async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal accepted
            accepted += 1
            writer.close()

        server = await asyncio.start_server(drop, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        manager = _Connection("test", loop=asyncio.get_running_loop(), host="127.0.0.1",
                              port=port, username="u", secret="p", reconnect_timeout=0)
        running = asyncio.get_running_loop()

        class Watched(AmiProtocol):  # type: ignore[misc]
            def connection_lost(self, exc: BaseException | None) -> None:
                super().connection_lost(exc)
                first_closed.set()

        connected = running.create_future()
        connected.set_result(await running.create_connection(Watched, "127.0.0.1", port))
        await asyncio.wait_for(first_closed.wait(), 5)  # lost, with no Manager attached
        manager.connection_made(connected)  # panoramisk attaches only now
        for _ in range(100):
            if accepted >= 2:
                break
            await asyncio.sleep(0.02)
        manager.close()
        server.close()
        return accepted

    caplog.set_level("INFO")
    accepted = accelerators.run(main())
    assert accepted >= 2, "the Manager must connect again after the early loss"
    tracebacks = [r for r in caplog.records if r.exc_info or "Exception in callback" in r.message]
    assert not tracebacks, [r.getMessage() for r in tracebacks]


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_ami_reconnects_without_tracebacks_on_either_loop(
    loop: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    """An AMI server that drops every connection at once (the chaos suite's AMI drop).

    On uvloop panoramisk learned of the loss before it had attached itself to the
    connection: it logged tracebacks and never reconnected. Found by the chaos suite.
    """
    from consentivr.ami import AmiPool
    from consentivr.settings import AmiSettings

    if loop == "uvloop" and accelerators.optional("uvloop") is None:
        pytest.skip("uvloop is not installed (the consentivr[fast] extra)")
    if loop == "asyncio":
        monkeypatch.setattr(accelerators, "optional", lambda name: None)

    async def main() -> tuple[int, str]:
        accepted = 0

        async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal accepted
            accepted += 1
            writer.close()

        server = await asyncio.start_server(drop, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        pool = AmiPool(AmiSettings(host="127.0.0.1", port=port, username="u", password="p",
                                   connections=1, timeout=1))
        await pool.connect()
        for _ in range(100):
            if accepted >= 3:
                break
            await asyncio.sleep(0.05)
        pool.close()
        server.close()
        return accepted, type(asyncio.get_running_loop()).__module__

    caplog.set_level("INFO")
    accepted, module = accelerators.run(main())
    assert module.startswith(loop)
    assert accepted >= 3, "the AMI connection must keep trying to reconnect"
    tracebacks = [r for r in caplog.records if r.exc_info or "Exception in callback" in r.message]
    assert not tracebacks, [r.getMessage() for r in tracebacks]
