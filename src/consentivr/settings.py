"""The service settings (``config.yaml``) as frozen dataclasses: what the service runs with.

Nothing here reads a file: ``consentivr.configfile`` builds a :class:`Settings` from
YAML, and ``consentivr.flowfile`` the flows and menus it holds. The transports (ARI,
AMI, FastAGI) import only this module.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from consentivr.model import Flow, Menu

DEFAULT_APP = "consentivr"


@dataclass(frozen=True)
class AriSettings:
    url: str  # e.g. http://127.0.0.1:8088 (without /ari)
    username: str
    password: str = field(repr=False)
    app: str = DEFAULT_APP
    connections: int = 20  # REST pool: well below http.conf sessionlimit (100)
    timeout: float = 10.0  # seconds for any one REST call
    # REST calls as RESTRequest messages on the events websocket (Asterisk 22.3+,
    # 21.8+, 20.13+): auto = when the server answers a probe at connect; on; off = HTTP.
    rest_over_websocket: str = "auto"


@dataclass(frozen=True)
class AmiSettings:
    host: str
    port: int
    username: str
    password: str = field(repr=False)
    connections: int = 2  # AMI runs one connection's actions one at a time
    timeout: float = 5.0


@dataclass(frozen=True)
class RecordingSettings:
    dir: Path
    # MixMonitor options; 'b' records only while bridged to a person, not the menu.
    options: str = "b"
    # Earlier spellings of dir (before it moved behind a symlink): log rows that
    # name a file under one of these mean the same file under dir.
    previous_dirs: tuple[str, ...] = ()


@dataclass(frozen=True)
class CallerSettings:
    """How caller numbers are read (see ``consentivr.callers``)."""

    default_region: str | None = None  # ISO 3166, e.g. NL: reads national numbers


@dataclass(frozen=True)
class WithdrawalSettings:
    """Withdrawal of consent by key while talking (see ``consentivr.features``)."""

    keys: str = "*9"  # the features.conf code; Asterisk fires it while bridged
    on_withdraw: str = "delete"  # the partial recording: delete | keep (marked withdrawn)
    confirmation: tuple[str, ...] = ("beep", "cancelled")  # sounds the caller hears


@dataclass(frozen=True)
class MetricsSettings:
    """``metrics: {listen: host:port}``: where /metrics and /healthz answer."""

    host: str = "127.0.0.1"
    port: int = 9468


@dataclass(frozen=True)
class PurgeSettings:
    """``purge:``: what the nightly purge leaves for monitoring."""

    metrics_file: Path | None = None  # a node_exporter textfile (*.prom)


@dataclass(frozen=True)
class Contact:
    """Who answers for the processing, for the art. 30 record: controller or DPO."""

    name: str
    email: str | None = None
    phone: str | None = None
    address: str | None = None


@dataclass(frozen=True)
class Settings:
    source: Path
    ari: AriSettings | None  # None: FastAGI mode and the admin commands need no ARI
    ami: AmiSettings | None
    database: Path
    recordings: RecordingSettings
    prompts_dir: Path
    flows: Mapping[str, Flow]
    default_flow: str
    log_retention_days: int = 730
    caller_key: bytes | None = field(default=None, repr=False)
    menus: Mapping[str, Menu] = field(default_factory=dict)  # from ``menus:`` sections
    # A call found in Stasis after a restart of consentivr: continue | hangup.
    recovery: str = "continue"
    withdrawal: WithdrawalSettings = field(default_factory=WithdrawalSettings)
    metrics: MetricsSettings | None = None  # None: no /metrics, /healthz listener
    purge: PurgeSettings = field(default_factory=PurgeSettings)
    controller: Contact | None = None  # the art. 30 record (``consentivr report``)
    dpo: Contact | None = None
    callers: CallerSettings = field(default_factory=CallerSettings)
    # A shared PostgreSQL log (``database: postgresql://...``); then ``database`` is
    # unused and commands that still need SQLite say so (consentivr.consentlog).
    database_url: str | None = None
    database_password: str | None = field(default=None, repr=False)
    node: str = field(default_factory=socket.gethostname)  # who wrote a row and owns its file

    def flow_for(self, name: str | None) -> Flow | None:
        return self.flows.get(name or self.default_flow)
