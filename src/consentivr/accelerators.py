"""Optional speed-ups from the ``consentivr[fast]`` extra: uvloop and orjson.

Both are optional. Without them consentivr runs on asyncio's own event loop and the
standard ``json`` module, with the same behaviour; the extra only costs less CPU.

- :func:`run` runs the CLI's main coroutine, on uvloop when it is installed.
- :data:`loads` / :data:`dumps` decode and encode ARI's JSON (orjson when installed).
"""

from __future__ import annotations

import asyncio
import importlib
import json
from collections.abc import Callable, Coroutine
from types import ModuleType
from typing import Any, TypeVar

T = TypeVar("T")

Loads = Callable[[str | bytes], Any]
Dumps = Callable[[Any], str]


def optional(name: str) -> ModuleType | None:
    """The module, or None when it is not installed (the one place that looks)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop factory when uvloop is installed; None means asyncio's default."""
    uvloop = optional("uvloop")
    return None if uvloop is None else uvloop.new_event_loop


def loop_name() -> str:
    return "asyncio" if loop_factory() is None else "uvloop"


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)``, on uvloop when it is installed."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)


def json_codec() -> tuple[Loads, Dumps, str]:
    """(loads, dumps, name): orjson when installed, else the standard library.

    Both raise ``ValueError`` subclasses on bad input, and ``dumps`` returns ``str``.
    """
    orjson = optional("orjson")
    if orjson is None:
        encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
        return json.loads, encoder.encode, "json"
    fast_dumps = orjson.dumps

    def dumps(obj: Any) -> str:
        return fast_dumps(obj).decode()

    return orjson.loads, dumps, "orjson"


loads, dumps, json_name = json_codec()
