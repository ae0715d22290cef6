"""Prometheus metrics of one ``serve`` or ``agi`` process.

The driver calls plain methods (:class:`Metrics`); the HTTP listener
(:mod:`consentivr.exporter`) serves :meth:`Metrics.exposition`. Counting is always
on (a few microseconds a call); only the listener depends on the ``metrics:``
config section, so the driver never needs to ask whether metrics are enabled.

No caller data can reach a label, by construction: every label value comes from a
fixed set known at start (the configured flow and purpose names, the decision
enum, fixed outcome, result, withdrawal and component names). Anything else is
mapped to ``(unknown)`` (or, for outcomes, to ``error``/``other``), so a bad value
can neither leak into a label nor grow the number of series.

Each instance has its own :class:`~prometheus_client.CollectorRegistry`, so two
services in one process (tests) never share counters.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
)

from consentivr import __version__
from consentivr.health import COMPONENTS, Health, needed_components
from consentivr.model import Decision, Flow

CONTENT_TYPE = CONTENT_TYPE_LATEST
# The *_created series double the exposition and no alert or panel uses them.
# (A process-wide switch of prometheus_client: consentivr is its only user here.)
disable_created_metrics()
UNKNOWN = "(unknown)"  # not a valid flow or purpose name: cannot clash with one
# What calls_total{outcome} may say. Free text ("error: <reason>") maps to its class.
OUTCOMES = ("completed", "abandoned", "timeout", "error", "other")
RECORDING_RESULTS = ("started", "failed")
# system: a decision committed only after the call went on unrecorded is voided.
WITHDRAWN_BY = ("caller", "agent", "system")
DECISIONS = tuple(d.value for d in Decision)
# Commits of the consent log: group commits of SQLite take ~1 ms; seconds are trouble.
COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                  2.5, 5.0, 10.0)


def outcome_class(outcome: str) -> str:
    """The bounded label for a call's outcome: ``error: ARI gone`` -> ``error``."""
    head = outcome.split(":", 1)[0].strip().lower()
    return head if head in OUTCOMES else "other"


class Metrics:
    """The series of issue 15, with methods named after what happened.

    ``flows`` (name -> Flow) fixes the allowed flow and purpose labels; ``mode`` and
    ``ami`` decide which ``*_up`` gauges exist (and which components
    :attr:`health` needs).
    """

    def __init__(self, flows: Mapping[str, Flow] | None = None, *, mode: str = "serve",
                 ami: bool = True, version: str = __version__) -> None:
        self.health = Health(needed_components(mode, ami))
        self.registry = CollectorRegistry(auto_describe=True)
        self._purposes: dict[str, tuple[str, ...]] = {
            name: tuple(p.name for p in flow.purposes) for name, flow in (flows or {}).items()}
        r = self.registry
        self._calls = Counter("consentivr_calls", "Calls that left the consent menu, by flow "
                              "and outcome.", ("flow", "outcome"), registry=r)
        self._decisions = Counter("consentivr_decisions", "Logged decisions, by flow, purpose "
                                  "and decision.", ("flow", "purpose", "decision"), registry=r)
        self._recordings = Counter("consentivr_recordings", "Recordings after a logged yes: "
                                   "started or failed to start.", ("result",), registry=r)
        self._withdrawals = Counter("consentivr_withdrawals", "Consent withdrawn during a "
                                    "call: by caller or agent (a key), or system (voided).",
                                    ("by",), registry=r)
        self._in_menu = Gauge("consentivr_calls_in_menu", "Calls in the consent menu now.",
                              registry=r)
        self._commit = Histogram("consentivr_log_commit_seconds", "Time to commit a write to "
                                 "the consent log (durable on disk).", buckets=COMMIT_BUCKETS,
                                 registry=r)
        help_up = {"ari": "1 while the ARI connection (events websocket) is up.",
                   "ami": "1 while the AMI connection is up.",
                   "log": "1 while the consent log takes writes."}
        names = {"ari": "consentivr_ari_up", "ami": "consentivr_ami_up",
                 "log": "consentivr_log_writable"}
        self._up = {c: Gauge(names[c], help_up[c], registry=r) for c in self.health.needed}
        Info("consentivr_build", "The consentivr version running.", registry=r).info(
            {"version": version})
        # Every known series exists from the start at 0: rate() and absent-based
        # alerts then work before the first event.
        for flow, purposes in self._purposes.items():
            for outcome in OUTCOMES:
                self._calls.labels(flow, outcome)
            for purpose in purposes:
                for decision in DECISIONS:
                    self._decisions.labels(flow, purpose, decision)
        for result in RECORDING_RESULTS:
            self._recordings.labels(result)
        for by in WITHDRAWN_BY:
            self._withdrawals.labels(by)

    # -- label hygiene ----------------------------------------------------------

    def _flow(self, flow: str | None) -> str:
        return flow if flow in self._purposes else UNKNOWN

    def _purpose(self, flow: str, purpose: str) -> str:
        return purpose if purpose in self._purposes.get(flow, ()) else UNKNOWN

    # -- what the driver calls ----------------------------------------------------

    def call_ended(self, flow: str | None, outcome: str) -> None:
        """A call left the menu (its row is logged): ``outcome`` may be free text."""
        self._calls.labels(self._flow(flow), outcome_class(outcome)).inc()

    def decision(self, flow: str | None, purpose: str, decision: Decision | str) -> None:
        """One purpose's logged decision."""
        f = self._flow(flow)
        value = str(decision.value if isinstance(decision, Decision) else decision)
        self._decisions.labels(f, self._purpose(f, purpose),
                               value if value in DECISIONS else UNKNOWN).inc()

    def decisions(self, flow: str | None, decisions: Mapping[str, Decision | str]) -> None:
        """Every purpose of one logged row (``DecisionRecord.decisions``)."""
        for purpose, decision in decisions.items():
            self.decision(flow, purpose, decision)

    def recording(self, result: str) -> None:
        """``started`` (MixMonitor confirmed) or ``failed``."""
        if result not in RECORDING_RESULTS:
            raise ValueError(f"recording result {result!r}: expected {RECORDING_RESULTS}")
        self._recordings.labels(result).inc()

    def withdrawal(self, by: str) -> None:
        """Consent withdrawn, by ``caller`` or ``agent`` (a key) or ``system`` (voided)."""
        self._withdrawals.labels(by if by in WITHDRAWN_BY else UNKNOWN).inc()

    def menu_entered(self) -> None:
        self._in_menu.inc()

    def menu_left(self) -> None:
        self._in_menu.dec()

    def log_commit(self, seconds: float) -> None:
        """How long one commit (or group commit) of the consent log took."""
        self._commit.observe(max(0.0, seconds))

    def component_up(self, name: str, up: bool, reason: str | None = None) -> None:
        """ARI, AMI or the log (``ari``/``ami``/``log``) went up or down."""
        if name not in COMPONENTS:
            raise ValueError(f"unknown component {name!r}: expected {COMPONENTS}")
        if name in self._up:
            self._up[name].set(1 if up else 0)
        self.health.component_up(name, up, reason)

    def set_problem(self, name: str, reason: str | None) -> None:
        """A reason /healthz reports (503) until cleared with None."""
        self.health.set_problem(name, reason)

    # -- what the listener serves ---------------------------------------------------

    def exposition(self) -> bytes:
        """The text format Prometheus scrapes."""
        return generate_latest(self.registry)

    def sample(self, name: str, labels: Mapping[str, str] | None = None) -> float | None:
        """One sample's value (tests, and a service's own checks)."""
        return self.registry.get_sample_value(name, dict(labels or {}))

