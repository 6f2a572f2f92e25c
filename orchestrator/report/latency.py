"""Reports: what was measured, what each tuning change did to the latency, and what was decided.

A `Report` is a JSON document: one `ChangeReport` per tuning change (its before and after runs, the decision as
plain JSON) and stand-alone `measurements`. It is rendered as a summary (`summary_rows`, printed by the CLI as
a table) or as one self-contained HTML file (`render_html`: plots embedded as base64 PNG, no external
resources; the plots are orchestrator/report/plots.py's).

Samples beyond the histogram range (cyclictest's overflows) cannot be plotted: every plot and table says how
many there were. A percentile that falls among them is shown as a lower bound, never guessed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from orchestrator.core import jsonio
from orchestrator.core.errors import InputError
from orchestrator.core.validation import validation_problems
from orchestrator.measure.model import METRIC_LABEL, PERCENTILES, LatencyResult, LatencyStats
from orchestrator.measure.pooled import PooledRuns, histogram_limit, run_median
from orchestrator.report.html import BASE_CSS, escape, fmt_time, img_tag, page, write_page
from orchestrator.report.mechanism import decision_path, mechanism_section, power_html
from orchestrator.report.plots import overflow_note, render_ccdf_png, render_histogram_png

__all__ = [
    "SUMMARY_COLUMNS",
    "ChangeReport",
    "Report",
    "load_report",
    "measurement_label",
    "render_html",
    "save_report",
    "summary_rows",
]

TABLE_METRICS = ("samples", "min_us", "avg_us", "p50_us", "p90_us", "p99_us", "p999_us", "p9999_us", "max_us",
                 "overflows")
CHANGE_METRICS = ("p99_us", "p999_us", "max_us")  # the run-level medians in a change's summary row
ARROW = " \u2192 "

# The keys of `summary_rows`, per row kind, in display order.
SUMMARY_COLUMNS: dict[str, tuple[str, ...]] = {
    "change": ("kind", "name", "target", "runs_before", "runs_after",
               *(f"{side}_{m}" for m in CHANGE_METRICS for side in ("before", "after")),
               "lower_bounds", "verdict", "action"),
    "measurement": ("kind", "name", "target", "form", "samples", "p50_us", "p99_us", "p999_us", "max_us",
                    "overflows", "load"),
}


# ------------------------------------------------------------------------------------------------ the model


class ChangeReport(BaseModel):
    """One tuning change: the runs before and after it, and the decision (the `Decision` as plain JSON)."""

    model_config = ConfigDict(extra="forbid")

    name: str  # e.g. "kernel.timer_migration=0"
    target: str | None = None  # e.g. "lab1.guest"
    #: what the change does, for humans ("9 changes together: sysctl ...; sysfs ..." for a bundle)
    description: str = ""
    #: a bundle's members, one line each in the report, and those left out with why
    members: list[str] = Field(default_factory=list)
    left_out: list[str] = Field(default_factory=list)
    before: list[LatencyResult] = Field(default_factory=list)
    after: list[LatencyResult] = Field(default_factory=list)
    decision: dict[str, Any] | None = None  # Decision.model_dump(mode="json"); loosely typed on purpose
    note: str = ""
    #: the mechanisms the change targets (label, source, names, on, cpus, direction, read_on), as the outcome has
    #: them; each run's rate of each ({"before": [{label: events/s or None}, ...], "after": [...]}); and whether
    #: its latency was evidence (False: a host change measured in a guest not on that host). Reports written
    #: before these were recorded load without them.
    mechanisms: list[dict[str, Any]] = Field(default_factory=list)
    rates: dict[str, list[dict[str, float | None]]] = Field(default_factory=dict)
    latency_applicable: bool = True
    #: declared mechanisms the unit could not count, each with `why` (not in the decision)
    mechanisms_left_out: list[dict[str, Any]] = Field(default_factory=list)

    @field_validator("decision", mode="before")
    @classmethod
    def _decision_as_json(cls, v: Any) -> Any:
        """A Decision (any pydantic model) is stored as its JSON form."""
        if isinstance(v, BaseModel):
            return v.model_dump(mode="json")
        return v


class Report(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: str = "rt-tune latency report"
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    changes: list[ChangeReport] = Field(default_factory=list)
    measurements: list[LatencyResult] = Field(default_factory=list)  # stand-alone runs


#: The largest report file read: one apply's report (every run of every change, histograms included) is a few
#: tens of MB at most; a larger file is refused before it is read, as anything bigger would exhaust memory.
MAX_REPORT_BYTES = 256 * 2**20

_REPORT_KEYS = set(Report.model_fields)
_RESULT_KEYS = set(LatencyResult.model_fields)
_EXPECTED = ("expected a report JSON (keys among: " + ", ".join(sorted(_REPORT_KEYS)) + "), one LatencyResult "
             "JSON (as written by `tune measure`, keys form/threads/all/...) or a JSON list of LatencyResults")


def load_report(path: Path) -> Report:
    """A Report from `path`: a Report JSON, one LatencyResult JSON, or a JSON list of LatencyResults (the latter
    two become stand-alone measurements). Anything else raises InputError naming the file and what was
    expected."""
    path = Path(path)
    doc = jsonio.read_json(path, what="report", max_bytes=MAX_REPORT_BYTES, expected=_EXPECTED)

    title = f"Latency measurements from {path.name}"
    if isinstance(doc, list):
        if not doc:
            raise InputError(f"{path}: an empty JSON list: {_EXPECTED} (at least one)")
        results = []
        for i, item in enumerate(doc):
            if not isinstance(item, dict):
                raise InputError(f"{path}: item {i} of the list is a {type(item).__name__}: expected a "
                                 "LatencyResult object")
            try:
                results.append(LatencyResult.model_validate(item))
            except ValidationError as exc:
                raise InputError(f"{path}: item {i} of the list is not a LatencyResult (expected a list of "
                                 f"LatencyResults): {validation_problems(exc, f'[{i}]')}") from None
        return Report(title=title, measurements=results)
    if not isinstance(doc, dict):
        raise InputError(f"{path}: the JSON is a {type(doc).__name__}: {_EXPECTED}")
    keys = set(doc)
    if keys & {"form", "threads", "all"}:
        try:
            return Report(title=title, measurements=[LatencyResult.model_validate(doc)])
        except ValidationError as exc:
            raise InputError(f"{path}: looks like a LatencyResult but is not valid (expected one as written by "
                             f"the measurement runner): {validation_problems(exc)}") from None
    if keys and keys <= _REPORT_KEYS:
        try:
            return Report.model_validate(doc)
        except ValidationError as exc:
            raise InputError(f"{path}: looks like a report but is not valid (expected a report as written by "
                             f"save_report): {validation_problems(exc)}") from None
    shown = ", ".join(k[:40] for k in sorted(keys)[:8]) or "none"  # a hostile key is cut, not printed whole
    raise InputError(f"{path}: a JSON object with keys {shown}: {_EXPECTED}")


def save_report(report: Report, path: Path) -> Path:
    """Write the report as JSON (what `load_report` reads back)."""
    path = Path(path)
    path.write_text(report.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------ figures


def measurement_label(result: LatencyResult, index: int | None = None) -> str:
    """A human name for a stand-alone result: target and start time, else the raw artifact, else its number."""
    parts = []
    if result.target:
        parts.append(result.target)
    if result.started_at is not None:
        parts.append(fmt_time(result.started_at))
    if not parts and result.raw_artifact:
        parts.append(Path(result.raw_artifact).name)
    if not parts:
        parts.append(f"measurement {index + 1}" if index is not None else "measurement")
    return " ".join(parts)


def _load_text(result: LatencyResult) -> str | None:
    if result.load is None:
        return None
    if result.load.kind == "none":
        return "none"
    return " ".join([result.load.kind, *result.load.args])


# ------------------------------------------------------------------------------------------------ plots


# ------------------------------------------------------------------------------------------------ summary


def summary_rows(report: Report) -> list[dict[str, Any]]:
    """One row per change, then one per stand-alone measurement; keys per kind in `SUMMARY_COLUMNS`.

    change: run-level medians (over the runs of each side, of each run's all-threads value) of p99, p99.9 and
    max before and after; `lower_bounds` lists the keys whose median involves a run whose percentile fell
    among the histogram overflows (taken as the histogram size: a lower bound); verdict/action from the
    decision, None without one. measurement: the all-threads figures of the result."""
    rows: list[dict[str, Any]] = []
    for change in report.changes:
        row: dict[str, Any] = {"kind": "change", "name": change.name, "target": change.target,
                               "runs_before": len(change.before), "runs_after": len(change.after)}
        bounds = []
        for metric in CHANGE_METRICS:
            for side, runs in (("before", change.before), ("after", change.after)):
                value, bound = run_median(runs, metric)
                row[f"{side}_{metric}"] = value
                if bound:
                    bounds.append(f"{side}_{metric}")
        row["lower_bounds"] = bounds
        decision = change.decision or {}
        row["verdict"] = decision.get("verdict")
        row["action"] = decision.get("action")
        rows.append({k: row[k] for k in SUMMARY_COLUMNS["change"]})
    for i, res in enumerate(report.measurements):
        a = res.all
        rows.append({"kind": "measurement", "name": measurement_label(res, i), "target": res.target,
                     "form": res.form, "samples": a.samples, "p50_us": a.p50_us, "p99_us": a.p99_us,
                     "p999_us": a.p999_us, "max_us": a.max_us, "overflows": a.overflows,
                     "load": _load_text(res)})
    return rows


# ------------------------------------------------------------------------------------------------ HTML

REPORT_CSS = """
p.path { background: #f3f6fb; border-left: 4px solid #1f77b4; padding: 0.35em 0.8em; }
p.path.latency, p.path.mechanism { border-left-color: #2c7a3f; } p.path.rollback { border-left-color: #b3261e; }
p.path.inconclusive { border-left-color: #7a6a2c; }
p.warn.na, p.warn.guarantee { border-color: #b3261e; background: #fdecea; }
td.finding.good { color: #2c7a3f; font-weight: 600; } td.finding.bad { color: #b3261e; font-weight: 600; }
"""


def fmt_value(metric: str, value: Any, *, overflows: int = 0, limit: int | None = None,
               has_hist: bool = True) -> tuple[str, str]:
    """(cell text, title) for one figure; a percentile among the overflows is shown as a lower bound."""
    if value is None:
        if metric in PERCENTILES and overflows and has_hist:
            bound = f"\u2265 {limit}" if limit is not None else "overflow"
            return bound, "among the histogram overflows: only a lower bound is known"
        if metric == "max_us" and overflows:
            return "overflow", "beyond the histogram and not reported"
        if metric in PERCENTILES and not has_hist:
            return "-", "no histogram recorded (summary form)"
        return "-", ""
    if isinstance(value, float):
        return (f"{value:.2f}".rstrip("0").rstrip(".") if not value.is_integer() else f"{int(value)}"), ""
    return str(value), ""


def _cells(values: dict[str, Any], *, overflows: int, limit: int | None, has_hist: bool) -> str:
    out = []
    for metric in TABLE_METRICS:
        text, title = fmt_value(metric, values.get(metric), overflows=overflows, limit=limit, has_hist=has_hist)
        cls = ' class="overflow"' if metric == "overflows" and overflows else ""
        tip = f' title="{escape(title)}"' if title else ""
        out.append(f'<td data-metric="{metric}"{cls}{tip}>{escape(text)}</td>')
    return "".join(out)


def _stats_values(s: LatencyStats) -> dict[str, Any]:
    return {k: getattr(s, k) for k in TABLE_METRICS}


def _figures_header(first: str, extra: Sequence[str] = ()) -> str:
    heads = "".join(f'<th class="l">{escape(h)}</th>' for h in (first, *extra))
    return "<tr>" + heads + "".join(f"<th>{escape(METRIC_LABEL[m])}</th>" for m in TABLE_METRICS) + "</tr>"


def conditions_table(labeled: Sequence[tuple[str, LatencyResult]]) -> str:
    """What each result was measured under, identical conditions grouped."""
    groups: dict[tuple, list[str]] = {}
    info: dict[tuple, LatencyResult] = {}
    for label, res in labeled:
        key = (res.target, res.settings.model_dump_json() if res.settings else None,
               res.load.model_dump_json() if res.load else None, res.boot_id, res.cmdline)
        groups.setdefault(key, []).append(label)
        info.setdefault(key, res)
    rows = []
    for key, labels in groups.items():
        res = info[key]
        s = res.settings
        settings = ("not recorded" if s is None else
                    f"cpus {','.join(map(str, s.cpus))}, {s.policy} priority {s.priority}, "
                    f"interval {s.interval_us} us, "
                    f"{s.duration_s:g} s, histogram {s.histogram_us} us, mlockall {'on' if s.mlockall else 'off'}")
        load = _load_text(res) or "not recorded"
        rows.append(
            "<tr>" + "".join(f'<td class="l">{escape(v)}</td>' for v in (
                ", ".join(labels), res.target or "-", settings, load, res.boot_id or "-")) +
            f'<td class="l"><code>{escape(res.cmdline or "-")}</code></td></tr>')
    head = "".join(f'<th class="l">{h}</th>' for h in ("results", "target", "cyclictest settings", "load",
                                                       "boot id", "kernel command line"))
    return f'<table class="conditions"><tr>{head}</tr>{"".join(rows)}</table>'


def overflow_warning(items: Sequence[tuple[str, PooledRuns]]) -> str:
    notes = [n for n in (overflow_note(name, d) for name, d in items) if n]
    if not notes:
        return ""
    return ('<p class="warn">Samples beyond the histogram range are counted but cannot be plotted: '
            + "; ".join(escape(n) for n in notes) + ". Percentiles among them are shown as lower bounds (\u2265).</p>")


def _pct(x: Any) -> str:
    if not isinstance(x, (int, float)):
        return "-"
    if math.isinf(x):
        return "+inf" if x > 0 else "-inf"
    return f"{x * 100:+.1f}%"


def _decision_html(decision: dict[str, Any] | None) -> str:
    if not decision:
        return '<p>Decision: <span class="verdict none">none recorded</span></p>'
    verdict = str(decision.get("verdict", "unknown"))
    cls = verdict if verdict in ("keep", "rollback", "inconclusive") else "none"
    parts = [f'<p>Decision: <span class="verdict {cls}" data-verdict="{escape(verdict)}">{escape(verdict)}</span>']
    if decision.get("action") is not None:
        parts.append(f" &rarr; action <b>{escape(decision['action'])}</b>")
    facts = []
    if "look" in decision and "looks_planned" in decision:
        facts.append(f"look {decision['look']}/{decision['looks_planned']}")
    if "runs_before" in decision and "runs_after" in decision:
        facts.append(f"{decision['runs_before']} before / {decision['runs_after']} after runs")
    if isinstance(decision.get("confidence_per_look"), (int, float)) and decision["confidence_per_look"] < 1:
        # (1: no latency keep claim at all, as when the latency is not applicable)
        facts.append(f"intervals at {decision['confidence_per_look'] * 100:.2f}%")
    if decision.get("stopped_early"):
        facts.append("stopped early")
    if decision.get("final") is False:
        facts.append("not final")
    if facts:
        parts.append(f' <span class="meta">({escape(", ".join(facts))})</span>')
    parts.append("</p>")
    if decision.get("reason"):
        parts.append(f'<p class="reason">{escape(decision["reason"])}</p>')
    metrics = decision.get("metrics")
    if isinstance(metrics, dict) and metrics:
        head = ("metric", "role", "tolerance", "before median", "after median", "difference", "bootstrap CI",
                "rank CI", "censored runs (before/after)", "finding")
        rows = []
        for name, m in metrics.items():
            if not isinstance(m, dict):
                continue
            tol = m.get("tolerance")

            def med(side: str, m: dict = m) -> str:
                v = m.get(f"{side}_median_us")
                text = "-" if v is None else f"{v:g}" if isinstance(v, (int, float)) else str(v)
                return ("\u2265 " if m.get(f"{side}_median_is_lower_bound") else "") + text

            cells = (METRIC_LABEL.get(name, name), m.get("role", "-"),
                     f"{tol * 100:g}%" if isinstance(tol, (int, float)) else "-", med("before"), med("after"),
                     _pct(m.get("rel_diff")), f"{_pct(m.get('ci_low'))} .. {_pct(m.get('ci_high'))}",
                     f"{_pct(m.get('rank_ci_low'))} .. {_pct(m.get('rank_ci_high'))}",
                     f"{m.get('censored_before', 0)} / {m.get('censored_after', 0)}", m.get("finding", "-"))
            rows.append('<tr data-metric="' + escape(name) + '">' +
                        "".join(f'<td class="l">{escape(c)}</td>' for c in cells) + "</tr>")
        parts.append('<table class="decision"><tr>' + "".join(f'<th class="l">{escape(h)}</th>' for h in head)
                     + "</tr>" + "".join(rows) + "</table>")
    parts.append("<details><summary>decision as recorded (JSON)</summary><pre>"
                 + escape(jsonio.dumps(decision, indent=2, sort_keys=True)) + "</pre></details>")
    return "".join(parts)


def _change_html(index: int, change: ChangeReport) -> str:
    cid = f"change-{index + 1}"
    out = [f'<section id="{cid}" class="change"><h2>Change {index + 1}: {escape(change.name)}</h2>']
    out.append(f'<p class="meta">target {escape(change.target or "-")}; {len(change.before)} run(s) before, '
               f"{len(change.after)} run(s) after</p>")
    if change.members:  # a bundle: one member a line
        out.append(f"<p><b>{len(change.members)} changes together:</b></p><ul>"
                   + "".join(f"<li>{escape(m)}</li>" for m in change.members) + "</ul>"
                   + (f'<p class="meta">left out: {escape("; ".join(change.left_out))}</p>'
                      if change.left_out else ""))
    elif change.description:
        out.append(f"<p><b>{escape(change.description)}</b></p>")
    if change.note:
        out.append(f'<p class="note">{escape(change.note)}</p>')
    applicable = change.latency_applicable and (change.decision or {}).get("latency_applicable") is not False
    if not applicable:
        out.append('<p class="warn na" data-latency="not applicable"><b>Latency not applicable:</b> a host change '
                   "measured in a guest that does not run on that host, so its latency is shown below but is no "
                   "evidence; the decision rested on the mechanism.</p>")
    kind, path = decision_path(change.decision)
    out.append(f'<p class="path {kind}" data-path="{kind}"><b>How it was decided:</b> {escape(path)}</p>')
    out.append(power_html(change.decision))
    out.append(_decision_html(change.decision))
    out.append(mechanism_section(cid, change.name, change.mechanisms, change.rates, change.decision, change.before,
                                 change.after, change.mechanisms_left_out))
    sides = {"before": change.before, "after": change.after}
    dists = {side: PooledRuns(runs) for side, runs in sides.items()}
    if any(d.plottable for d in dists.values()):
        out.append("<h3>Distribution (all threads, pooled over the runs of each side)</h3>")
        out.append(overflow_warning(list(dists.items())))
        out.append(img_tag(render_histogram_png(sides, f"{change.name}: latency histogram"),
                        f"histogram before/after {change.name}"))
        out.append(img_tag(render_ccdf_png(sides, f"{change.name}: latency tail (1 - CDF)"),
                        f"tail (complementary CDF) before/after {change.name}"))
    else:
        out.append(overflow_warning(list(dists.items())))
        out.append("<p>No histogram recorded (summary form): nothing to plot.</p>")
    without = sum(d.without_hist for d in dists.values())
    if without:
        out.append(f"<p>{without} run(s) without a histogram (summary form) are not in the plots.</p>")

    out.append("<h3>Figures (us, all threads)" + (": latency not applicable" if not applicable else "") + "</h3>")
    rows = [_figures_header("run", ("started",))]
    for side, runs in sides.items():
        for i, res in enumerate(runs):
            a = res.all
            rows.append(f'<tr data-row="{cid}/{side}/{i + 1}"><td class="l">{side} {i + 1}</td>'
                        f'<td class="l">{escape(fmt_time(res.started_at))}</td>'
                        + _cells(_stats_values(a), overflows=a.overflows, limit=histogram_limit(res),
                                 has_hist=a.histogram is not None) + "</tr>")
    for side, runs in sides.items():
        if not runs:
            continue
        med: dict[str, Any] = {}
        bound_any = False
        for metric in TABLE_METRICS:
            if metric in ("samples", "overflows"):
                continue
            v, bound = run_median(runs, metric)
            med[metric] = None if v is None else (f"\u2265 {v:g}" if bound else v)
            bound_any |= bound
        tip = ' title="runs whose percentile fell among the overflows count as the histogram size"' \
            if bound_any else ""
        rows.append(f'<tr class="median" data-row="{cid}/{side}/median"{tip}><td class="l">{side}: median of runs'
                    f'</td><td class="l"></td>' + _cells(med, overflows=0, limit=None, has_hist=True) + "</tr>")
    for side, d in dists.items():
        if not d.plottable:
            continue
        rows.append(f'<tr class="pooled" data-row="{cid}/{side}/pooled"><td class="l">{side}: pooled</td>'
                    f'<td class="l"></td>' + _cells(d.stats(), overflows=d.overflows, limit=d.limit, has_hist=True)
                    + "</tr>")
    out.append('<table class="figures">' + "".join(rows) + "</table>")
    out.append("<p class=\"meta\">The decision compares the run-level values (one per run); the plots and the "
               "pooled rows pool every sample of a side.</p>")
    labeled = [(f"{side} {i + 1}", r) for side, runs in sides.items() for i, r in enumerate(runs)]
    if labeled:
        out.append("<h3>Measured under</h3>" + conditions_table(labeled))
    out.append("</section>")
    return "".join(out)


def _measurement_html(index: int, res: LatencyResult) -> str:
    mid = f"measurement-{index + 1}"
    label = measurement_label(res, index)
    out = [f'<section id="{mid}" class="measurement"><h2>Measurement {index + 1}: {escape(label)}</h2>',
           f'<p class="meta">form {escape(res.form)}; {len(res.threads)} thread(s); started '
           f"{escape(fmt_time(res.started_at))}"
           + (f"; ran {res.duration_s:g} s" if res.duration_s is not None else "")
           + (f"; raw output <code>{escape(res.raw_artifact)}</code>" if res.raw_artifact else "") + "</p>"]
    d = PooledRuns([res])
    out.append(overflow_warning([("all threads", d)]))
    if d.plottable:
        out.append(img_tag(render_histogram_png([res], f"{label}: latency histogram"), f"histogram {label}"))
        out.append(img_tag(render_ccdf_png([res], f"{label}: latency tail (1 - CDF)"), f"tail {label}"))
    else:
        out.append("<p>No histogram recorded (summary form): nothing to plot, figures only.</p>")
    limit = histogram_limit(res)
    rows = [_figures_header("thread")]
    for t in [*res.threads, res.all]:
        name = "all" if t.thread is None else str(t.thread)
        cls = ' class="pooled"' if t.thread is None else ""
        rows.append(f'<tr data-row="{mid}/{name}"{cls}>'
                    f'<td class="l">{escape(name)}</td>'
                    + _cells(_stats_values(t), overflows=t.overflows, limit=limit, has_hist=t.histogram is not None)
                    + "</tr>")
    out.append("<h3>Figures (us)</h3>" + '<table class="figures">' + "".join(rows) + "</table>")
    out.append("<h3>Measured under</h3>" + conditions_table([(label, res)]))
    out.append("</section>")
    return "".join(out)


def _summary_html(report: Report) -> str:
    rows = summary_rows(report)
    out = []
    changes = [r for r in rows if r["kind"] == "change"]
    if changes:
        head = ("change", "target", "runs", *(f"{METRIC_LABEL[m]} before \u2192 after" for m in CHANGE_METRICS),
                "verdict")
        body = []
        for i, r in enumerate(changes):
            what = report.changes[i].description
            cells = [f'<td class="l"><a href="#change-{i + 1}"'
                     + (f' title="{escape(what)}"' if what else "") + f'>{escape(r["name"])}</a></td>',
                     f'<td class="l">{escape(r["target"] or "-")}</td>',
                     f"<td>{r['runs_before']} / {r['runs_after']}</td>"]
            for m in CHANGE_METRICS:
                pair = []
                for side in ("before", "after"):
                    v = r[f"{side}_{m}"]
                    text = "-" if v is None else f"{v:g}"
                    pair.append(("\u2265 " if f"{side}_{m}" in r["lower_bounds"] else "") + text)
                cells.append(f"<td>{escape(ARROW.join(pair))}</td>")
            verdict = r["verdict"] or "none"
            cls = verdict if verdict in ("keep", "rollback", "inconclusive") else "none"
            change = report.changes[i]
            how = []
            dec = change.decision or {}
            on = dec.get("kept_on") or dec.get("rolled_back_on")
            if on:
                how.append(f"on {on}")
            if not change.latency_applicable or dec.get("latency_applicable") is False:
                how.append("latency not applicable")
            cells.append(f'<td class="l"><span class="verdict {cls}">{escape(verdict)}</span>'
                         + (f' <span class="meta">{escape(", ".join(how))}</span>' if how else "") + "</td>")
            body.append("<tr>" + "".join(cells) + "</tr>")
        out.append("<h3>Changes (medians over runs, us)</h3><table class=\"summary\"><tr>"
                   + "".join(f'<th class="l">{escape(h)}</th>' for h in head) + "</tr>" + "".join(body) + "</table>")
    meas = [r for r in rows if r["kind"] == "measurement"]
    if meas:
        keys = ("samples", "p50_us", "p99_us", "p999_us", "max_us", "overflows")
        mbody: list[str] = []
        for i, (r, res) in enumerate(zip(meas, report.measurements, strict=True)):
            a = res.all
            fmt = {k: fmt_value(k, r[k], overflows=a.overflows, limit=histogram_limit(res),
                                 has_hist=a.histogram is not None)[0] for k in keys}
            figures = "".join(f'<td data-metric="{k}">{escape(fmt[k])}</td>' for k in keys)
            mbody.append(f'<tr><td class="l"><a href="#measurement-{i + 1}">{escape(r["name"])}</a></td>'
                         f'<td class="l">{escape(r["load"] or "-")}</td>{figures}</tr>')
        out.append("<h3>Measurements (all threads, us)</h3><table class=\"summary\"><tr>"
                   + "".join(f'<th class="l">{h}</th>' for h in ("measurement", "load"))
                   + "".join(f"<th>{escape(METRIC_LABEL[k])}</th>" for k in keys) + "</tr>" + "".join(mbody)
                   + "</table>")
    if not out:
        out.append("<p>The report is empty: no changes and no measurements.</p>")
    return "<h2>Summary</h2>" + "".join(out)


def render_html(report: Report, path: Path) -> Path:
    """Write the report as one self-contained HTML file (plots as base64 PNG data URIs, inline CSS)."""
    body = [f"<h1>{escape(report.title)}</h1>",
            (f'<p class="meta">created {escape(report.created_at.isoformat(timespec="seconds"))}; '
             f"{len(report.changes)} change(s), {len(report.measurements)} stand-alone measurement(s). "
             "Latencies in microseconds, all threads together unless a thread is named.</p>"),
            _summary_html(report)]
    body += [_change_html(i, c) for i, c in enumerate(report.changes)]
    body += [_measurement_html(i, m) for i, m in enumerate(report.measurements)]
    return write_page(path, page(report.title, body, css=BASE_CSS + REPORT_CSS))


