"""FastAGI mode, for dialplan-centred installations (FreePBX among them).

:mod:`~consentivr.agi.protocol` speaks the wire protocol,
:mod:`~consentivr.agi.transport` carries one call's commands for the shared driver,
:mod:`~consentivr.agi.server` accepts connections. Calls run through the same
:class:`~consentivr.driver.CallDriver` and flow as ARI mode.
"""

from consentivr.agi.protocol import (
    COMMAND_TIMEOUT,
    DEFAULT_HOST,
    DEFAULT_PORT,
    ENV_TIMEOUT,
    LINE_LIMIT,
    AgiConnection,
    AgiConnectionLost,
    AgiError,
    Reply,
    flow_name,
    parse_environment,
    parse_listen,
    parse_reply,
    quote,
)
from consentivr.agi.server import AgiServer
from consentivr.agi.transport import AgiTransport

__all__ = [
    "COMMAND_TIMEOUT",
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "ENV_TIMEOUT",
    "LINE_LIMIT",
    "AgiConnection",
    "AgiConnectionLost",
    "AgiError",
    "AgiServer",
    "AgiTransport",
    "Reply",
    "flow_name",
    "parse_environment",
    "parse_listen",
    "parse_reply",
    "quote",
]


async def serve(settings, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,  # type: ignore[no-untyped-def]
                stop=None) -> None:
    """Run consentivr in FastAGI mode until ``stop`` is set (or SIGTERM/SIGINT)."""
    from consentivr.service import serve as serve_mode

    await serve_mode(settings, stop, mode="agi", listen=(host, port))
