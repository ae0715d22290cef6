"""For the end-to-end tests: scrape a running service's /metrics and compare the counters
with what the consent log holds (issue 15: "the counters must equal the log").

    text = await scrape(port)
    assert metrics_vs_log(text, settings.database, settings.flows) == []
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from consentivr.metrics import UNKNOWN, outcome_class
from consentivr.model import Flow

Key = tuple[str, tuple[tuple[str, str], ...]]
COUNTERS = ("consentivr_calls_total", "consentivr_decisions_total",
            "consentivr_recordings_total", "consentivr_withdrawals_total")


async def scrape(port: int, host: str = "127.0.0.1", path: str = "/metrics") -> str:
    async with aiohttp.ClientSession() as http, http.get(f"http://{host}:{port}{path}") as resp:
        resp.raise_for_status()
        return await resp.text()


def from_exposition(text: str) -> Counter[Key]:
    """The non-zero samples of the four counters."""
    out: Counter[Key] = Counter()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in COUNTERS and s.value:
                out[(s.name, tuple(sorted(s.labels.items())))] = int(s.value)
    return out


def from_log(db: Path, flows: Mapping[str, Flow]) -> Counter[Key]:
    """What the counters must say, computed from the log's rows."""
    purposes = {name: {p.name for p in flow.purposes} for name, flow in flows.items()}
    out: Counter[Key] = Counter()
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT flow, outcome, decisions, recording_confirmed, withdrawn_by "
                            "FROM calls").fetchall()
    finally:
        conn.close()
    for flow, outcome, decisions, confirmed, withdrawn_by in rows:
        f = flow if flow in purposes else UNKNOWN
        out[("consentivr_calls_total",
             (("flow", f), ("outcome", outcome_class(outcome))))] += 1
        for purpose, decision in json.loads(decisions).items():
            p = purpose if purpose in purposes.get(f, ()) else UNKNOWN
            out[("consentivr_decisions_total",
                 (("decision", decision), ("flow", f), ("purpose", p)))] += 1
        # A voided late consent (withdrawn_by system) never tried to record.
        if confirmed is not None and withdrawn_by != "system":
            result = "started" if confirmed else "failed"
            out[("consentivr_recordings_total", (("result", result),))] += 1
        if withdrawn_by:
            out[("consentivr_withdrawals_total", (("by", withdrawn_by),))] += 1
    return out


def metrics_vs_log(text: str, db: Path, flows: Mapping[str, Flow]) -> list[str]:
    """Every series where the scrape and the log disagree (empty: they agree)."""
    got, want = from_exposition(text), from_log(db, flows)
    return [f"{name}{dict(labels)}: metrics {got[(name, labels)]}, log {want[(name, labels)]}"
            for name, labels in sorted(set(got) | set(want))
            if got[(name, labels)] != want[(name, labels)]]
