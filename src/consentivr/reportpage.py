"""The DPO's report as one self-contained HTML page, in Dutch or English.

Jinja2 fills ``templates/report.html.j2`` (autoescaped) with a
:class:`~consentivr.report.Report`; matplotlib draws the charts with its SVG
backend, inlined in the page. No script, no font, no image is fetched: the page
opens offline and prints to PDF from the browser (print CSS in the template).
"""

from __future__ import annotations

import functools
import io
import re
from collections.abc import Sequence
from datetime import date
from importlib import resources
from typing import Any

import jinja2
import yaml

from consentivr.report import DECISIONS, Report

LANGUAGES = ("en", "nl")
NONE = "\u2013"  # an en dash: no value

# One colour per decision, kept apart for colour-blind readers (Okabe-Ito).
COLOURS = {
    "yes": "#009E73", "no": "#D55E00", "no_answer": "#E69F00", "abandoned": "#999999",
    "objected": "#CC79A7", "not_objected": "#56B4E9", "error": "#000000",
}
_RELEVANT = {  # always shown for a purpose of this basis, even at zero
    "consent": ("yes", "no", "no_answer", "abandoned", "error"),
    "public_task": ("objected", "not_objected", "abandoned", "error"),
    "legitimate_interest": ("objected", "not_objected", "abandoned", "error"),
}


@functools.cache
def texts() -> dict[str, dict[str, str]]:
    raw = resources.files("consentivr").joinpath("templates/report_text.yaml").read_text(
        encoding="utf-8")
    loaded: dict[str, dict[str, str]] = yaml.safe_load(raw)
    return loaded


def shown(purpose: dict[str, Any]) -> list[str]:
    """The decision columns of one purpose: its basis's, plus any other that occurred."""
    relevant = _RELEVANT.get(purpose.get("basis") or "", DECISIONS)
    return [d for d in purpose["counts"] if d in relevant or purpose["counts"][d]]


# --- numbers and dates as the language writes them --------------------------------


def _num(value: int | float | None, lang: str) -> str:
    if value is None:
        return NONE
    text = f"{int(value):,}"
    return text.replace(",", ".") if lang == "nl" else text


def _dec(value: float | None, lang: str) -> str:
    if value is None:
        return NONE
    text = f"{value:,.2f}"
    if lang == "nl":
        text = text.replace(",", " ").replace(".", ",").replace(" ", ".")
    return text


def _pct(value: float, lang: str) -> str:
    text = f"{value * 100:.1f}%"
    return text.replace(".", ",") if lang == "nl" else text


def _when(text: str | None) -> str:
    if not text:
        return NONE
    return f"{text[:10]} {text[11:16]} UTC"


def _duration(seconds: float | None, lang: str) -> str:
    if seconds is None:
        return NONE
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}:{secs:02d}" if minutes else f"{secs} s"


# --- charts --------------------------------------------------------------------------


def _svg(fig: Any, salt: str) -> str:
    """One figure as inline SVG: text stays text, ids are unique per chart."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": salt}):
        fig.savefig(buf, format="svg", metadata={"Date": None}, bbox_inches="tight")
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):]
    svg = re.sub(r"<metadata>.*?</metadata>", "", svg, count=1, flags=re.S)  # RDF boilerplate
    # Scale with the page; keep the drawing's own aspect ratio (viewBox).
    svg = re.sub(r'<svg([^>]*?) width="[^"]*" height="[^"]*"',
                 r'<svg\1 role="img" preserveAspectRatio="xMinYMin meet"', svg, count=1)
    return svg


def _figure(width: float, height: float) -> Any:
    # The Figure class alone, not pyplot: no GUI backend, no global state.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=96)
    fig.patch.set_alpha(0)
    return fig


def _style(ax: Any) -> None:
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.grid(axis="y", color="#dddddd", linewidth=0.6)
    ax.set_axisbelow(True)
    ax.tick_params(labelsize=8)


def _every(labels: Sequence[str], most: int = 16) -> list[int]:
    step = max(1, -(-len(labels) // most))
    return list(range(0, len(labels), step))


def weeks_chart(purpose: dict[str, Any], t: dict[str, str], salt: str) -> str:
    """Stacked bars: one bar per ISO week, one colour per decision."""
    weeks = purpose["weeks"]
    if not weeks:
        return ""
    labels = [w["week"] for w in weeks]
    xs = list(range(len(labels)))
    fig = _figure(9, 2.8)
    ax = fig.add_subplot()
    bottom = [0] * len(xs)
    for d in shown(purpose):
        heights = [w["counts"].get(d, 0) for w in weeks]
        if not any(heights):
            continue
        ax.bar(xs, heights, bottom=bottom, color=COLOURS.get(d, "#444444"), width=0.8,
               label=t.get(f"d_{d}", d), linewidth=0)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    ticks = _every(labels)
    ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=45, ha="right")
    ax.set_ylabel(t["chart_calls"], fontsize=8)
    ax.set_xlim(-0.6, len(xs) - 0.4)
    _style(ax)
    ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _svg(fig, salt)


SERIES = ("recordings_deleted", "rows_redacted", "callers_cleared", "refused")
MAX_BARS = 60  # more runs than this (a nightly purge over a quarter): one bar per week


def _by_week(runs: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    weeks: dict[str, dict[str, Any]] = {}
    for r in runs:
        y, w, _ = date.fromisoformat(r["started_at"][:10]).isocalendar()
        bucket = weeks.setdefault(f"{y}-W{w:02d}", dict.fromkeys(SERIES, 0))
        for key in SERIES:
            bucket[key] += r[key]
    return list(weeks), list(weeks.values())


def purges_chart(runs: list[dict[str, Any]], t: dict[str, str], salt: str) -> str:
    """Stacked bars per purge run (per week when there are many): what it deleted,
    redacted and cleared, and what it left alone."""
    runs = [r for r in runs if not r["dry_run"]]
    if not runs:
        return ""
    if len(runs) > MAX_BARS:
        labels, runs = _by_week(runs)
    else:
        labels = [f"{r['run']} · {r['started_at'][:10]}" for r in runs]
    xs = list(range(len(runs)))
    fig = _figure(9, 2.6)
    ax = fig.add_subplot()
    bottom = [0] * len(xs)
    looks = (("deleted", "#0072B2"), ("redacted", "#E69F00"), ("cleared", "#009E73"),
             ("refused", "#D55E00"))
    for key, (label, colour) in zip(SERIES, looks, strict=True):
        heights = [r[key] for r in runs]
        if not any(heights):
            continue
        ax.bar(xs, heights, bottom=bottom, color=colour, width=0.8, label=t[label],
               linewidth=0)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    ticks = _every(labels)
    ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=45, ha="right")
    ax.set_ylabel(t["chart_items"], fontsize=8)
    ax.set_xlim(-0.6, len(xs) - 0.4)
    _style(ax)
    if any(bottom):
        ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _svg(fig, salt)


# --- the page ------------------------------------------------------------------------


def warm_up() -> None:
    """Import matplotlib (about half a second): call it in a thread while the log
    is read, so the charts do not wait for it."""
    import matplotlib.figure  # noqa: F401


@functools.cache
def _environment(lang: str) -> jinja2.Environment:
    """One environment per language: the number filters write that language's way."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("consentivr", "templates"),
        autoescape=True, undefined=jinja2.StrictUndefined,
        trim_blocks=True, lstrip_blocks=True,
    )
    env.filters.update(
        when=_when, cat=lambda key, t: t[f"c_{key}"],
        num=lambda v: _num(v, lang), dec=lambda v: _dec(v, lang),
        pct=lambda v: _pct(v, lang), duration=lambda v: _duration(v, lang),
    )
    env.globals["shown"] = shown
    return env


def render_html(report: Report, lang: str = "en") -> str:
    """The whole page; dicts are read with dots in the template (Jinja's getattr)."""
    if lang not in LANGUAGES:
        raise ValueError(f"lang={lang!r}")
    t = texts()[lang]
    data = report.to_json()
    charts = {
        "weeks": [weeks_chart(p, t, f"weeks-{i}") for i, p in enumerate(data["purposes"])],
        "purges": purges_chart(data["purges"]["runs"], t, "purges"),
    }
    template = _environment(lang).get_template("report.html.j2")
    return template.render(r=data, t=t, lang=lang, charts=charts)
