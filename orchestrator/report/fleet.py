"""The rollout's report: one page with the rollout's status and reason, a row per unit, and a before/after plot
of p99.9 and max per unit."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.report.html import escape, img_tag, page, write_page
from orchestrator.report.plots import figure_png, new_figure

if TYPE_CHECKING:
    from orchestrator.run.fleet import RolloutSummary

_CSS = """body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;
padding:4px 8px;font-size:90%}th{background:#eee}.halted{color:#b00;font-weight:bold}"""


def render_fleet_html(summary: RolloutSummary, path: Path) -> Path:
    """One page: the rollout's status and reason, a table per unit, and a before/after plot of p99.9 and max."""
    rows = []
    names, before, after = [], [], []
    for u in summary.units:
        o = u.get("outcome") or {}
        b, a = o.get("before") or {}, o.get("after") or {}
        bounds = set(o.get("bounds") or [])
        b, a = {**b, "_side": "before"}, {**a, "_side": "after"}

        def f(d: dict, k: str, bounds: set = bounds) -> str:
            if d.get(k) is None:
                return "-"
            return (">=" if f"{d['_side']}.{k}" in bounds else "") + f"{d[k]:.0f}"

        rows.append("<tr>" + "".join(f"<td>{escape(str(x))}</td>" for x in (
            u["unit"], u.get("wave_name", u["wave"]), u["state"], ", ".join(o.get("kept") or []) or
            "-", ", ".join(o.get("rolled_back") or []) or "-", ", ".join(o.get("failed") or []) or "-",
            f(b, "p999_us"), f(a, "p999_us"), f(b, "max_us"), f(a, "max_us"), o.get("regression") or "",
            u["detail"])) + "</tr>")
        if b.get("p999_us") is not None and a.get("p999_us") is not None:
            names.append(u["unit"])
            before.append((b["p999_us"], b.get("max_us")))
            after.append((a["p999_us"], a.get("max_us")))
    plot = ""
    if names:
        fig = new_figure(9.0, 3.6)
        ax = fig.add_subplot()
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], [v[0] for v in before], width=0.4, label="p99.9 before", color="#999999")
        ax.bar([i + 0.2 for i in x], [v[0] for v in after], width=0.4, label="p99.9 after", color="#1f77b4")
        ax.scatter([i - 0.2 for i in x], [v[1] for v in before], marker="v", color="#444444", label="max before")
        ax.scatter([i + 0.2 for i in x], [v[1] for v in after], marker="v", color="#d62728", label="max after")
        ax.set_xticks(list(x), names)
        ax.set_ylabel("latency (us), median over runs")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
        plot = img_tag(figure_png(fig), "p99.9 and max before and after, per unit")
    head = ("unit", "wave", "state", "kept", "rolled back (evidence)", "failed", "p99.9 before", "p99.9 after",
            "max before", "max after", "regression", "detail")
    reports = [(u["unit"], (u.get("outcome") or {}).get("report")) for u in summary.units]
    link = "".join(f"<li>{escape(unit)}: {escape(r)} (`tune report {escape(r)} --html F` draws "
                   "every change's runs)</li>" for unit, r in reports if r)
    link = f"<p>Per-unit reports (every run of every change):</p><ul>{link}</ul>" if link else ""
    body = f"""<h1>Rollout {summary.rollout_id}: {escape(summary.profile)}</h1>
<p class="{escape(summary.status)}">status: <b>{escape(summary.status)}</b>
{(' &mdash; ' + escape(summary.reason)) if summary.reason else ''}</p>
<p>Waves: {' | '.join(escape(', '.join(w)) for w in summary.waves)}. Latency figures are medians over the
cyclictest runs of the unit's first measured state (before) and of the state the rollout left it in (after);
"&gt;=" marks a median that is only a lower bound (runs whose percentile fell beyond the histogram).</p>
<table><tr>{''.join(f'<th>{h}</th>' for h in head)}</tr>{''.join(rows)}</table>
{plot}{link}"""
    return write_page(path, page(f"rollout {summary.rollout_id}", [body], css=_CSS))
