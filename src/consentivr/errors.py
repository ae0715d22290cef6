"""The one exception root of consentivr.

Library code raises these; only the CLI turns them into ``click.ClickException``.
"""

from __future__ import annotations


class ConsentivrError(Exception):
    """Root of every error consentivr raises on purpose."""


class ConfigError(ConsentivrError):
    """A config or dialplan YAML file is invalid.

    ``problems`` holds every problem found, each already formatted as one line
    (``file:line:col: dotted.path: message``), so callers can report all at once.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class StoreError(ConsentivrError):
    """The consent log could not be read or written."""


class AriError(ConsentivrError):
    """Talking to Asterisk's REST interface failed."""


class AmiError(ConsentivrError):
    """Talking to Asterisk's manager interface failed."""


class ChannelGone(ConsentivrError):
    """The caller's channel is gone (hung up, or its connection closed): not our failure."""
