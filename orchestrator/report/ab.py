"""The A/B experiment's report: one self-contained HTML page with the summary, the notes a reader needs before the
numbers, the distributions of both arms and every run in measuring order."""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.measure.model import METRIC_LABEL, PERCENTILES
from orchestrator.measure.pooled import PooledRuns, histogram_limit, run_value
from orchestrator.report.html import BASE_CSS, escape, fmt_time, img_tag, page, write_page
from orchestrator.report.latency import conditions_table, fmt_value, overflow_warning
from orchestrator.report.plots import (
    figure_png,
    legend_name,
    log_x_axis,
    new_figure,
    no_data_png,
    render_ccdf_png,
    render_histogram_png,
    use_log_x,
)
from orchestrator.stats.ab import ABResult, run_sequence

ARM_COLOR = {"A": "#1f77b4", "B": "#d62728"}


def _rounds_of(result: ABResult) -> list[int] | None:
    """The 1-based round of each run in measuring order, when `order` is rounds of equal blocks, else None."""
    k = result.runs_per_block
    if k is None:
        return None
    return [i // (2 * k) + 1 for i in range(len(result.order))]


def _sequence_is_guess(result: ABResult) -> bool:
    """True when neither the order nor the start times of the runs were recorded."""
    items = [r for arm in result.arms for r in arm.runs]
    return not result.order and not (items and all(r.started_at is not None for r in items))


def _series_names(result: ABResult) -> dict[str, str]:
    return {arm.name: f"{arm.name} ({arm.profile})" for arm in result.arms}


def render_cdf_png(result: ABResult, title: str = "Latency CDF") -> bytes:
    """Overlaid CDFs of the pooled all-threads latency of each arm (fraction of samples <= x). The body of
    the distribution reads well here; the tail reads on the CCDF."""
    names = _series_names(result)
    dists = [(names[a.name], PooledRuns(a.runs), ARM_COLOR[a.name]) for a in result.arms]
    drawn = [t for t in dists if t[1].plottable]
    if not drawn:
        return no_data_png(title, "no histogram recorded (summary form): nothing to plot")
    fig = new_figure()
    ax = fig.add_subplot()
    lo = min(min(d.hist) for _, d, _ in drawn)
    hi = max(max(max(d.hist) + 1, d.limit or 0 if d.overflows else 0) for _, d, _ in drawn)
    for name, d, color in drawn:
        buckets = sorted(d.hist)
        xs = [buckets[0]]
        ys = [0.0]
        cum = 0
        for b in buckets:
            cum += d.hist[b]
            xs.append(b + 1)
            ys.append(cum / d.samples)
        if d.overflows and d.limit is not None and d.limit > xs[-1]:
            xs.append(d.limit)
            ys.append(ys[-1])
        label = legend_name(name, d)
        if d.overflows:
            label += f"; {100 * d.overflows / d.samples:.2g}% beyond the histogram (curve stops below 1)"
        ax.plot(xs, ys, drawstyle="steps-post", color=color, linewidth=1.6, label=label)
        for key in ("p50_us", "p99_us"):
            p = d.percentile(PERCENTILES[key])
            if p is not None:
                ax.plot([p], [PERCENTILES[key]], marker="o", color=color, markersize=3.5)
    if use_log_x([d for _, d, _ in drawn], with_max=False):
        log_x_axis(ax, lo * 0.9, hi * 1.15)
        scale = ", log scale"
    else:
        ax.set_xlim(max(lo - 1, 0), hi + 1)
        scale = ""
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(f"latency x (us){scale}; dots: p50 and p99")
    ax.set_ylabel("fraction of samples \u2264 x (CDF)")
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8, framealpha=0.95)
    return figure_png(fig)


def render_runs_png(result: ABResult, metrics: Sequence[str] = ("p999_us", "p99_us"),
                    title: str = "Run values in measuring order") -> bytes:
    """One point per run in the order measured (A and B coloured), one panel per metric, log y: drift over
    the experiment shows as a trend shared by both arms; a censored run is drawn as a triangle at its bound."""
    seq = run_sequence(result)
    if not seq:
        return no_data_png(title, "no runs")
    fig = new_figure(8.0, 2.3 * len(metrics) + 0.6)
    axes = fig.subplots(len(metrics), 1, sharex=True, squeeze=False)[:, 0]
    from matplotlib.ticker import FuncFormatter

    names = _series_names(result)
    xs = list(range(1, len(seq) + 1))
    # block boundaries: where the arm changes
    switches = [i + 0.5 for i in range(1, len(seq)) if seq[i][0] != seq[i - 1][0]]
    rounds = _rounds_of(result)
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    for ax, metric in zip(axes, metrics, strict=True):
        for arm in ("A", "B"):
            pts: list[tuple[int, float]] = []
            cens: list[tuple[int, float]] = []
            for x, (name, _, res) in zip(xs, seq, strict=True):
                if name != arm:
                    continue
                v, c = run_value(res, metric)
                if v is None:
                    continue
                (cens if c else pts).append((x, v))
            color = ARM_COLOR[arm]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o" if arm == "A" else "s", linestyle="none",
                        color=color, markersize=5, label=names[arm])
            if cens:
                ax.plot(*zip(*cens, strict=True), marker="^", linestyle="none", color=color, markersize=7,
                        markerfacecolor="white", label=f"{names[arm]}: \u2265 (overflow)")
            vals = [v for _, v in pts + cens]
            if vals:
                ax.axhline(float(np.median(vals)), color=color, linestyle="--", linewidth=0.9, alpha=0.7)
        for s in switches:
            ax.axvline(s, color="#bbbbbb", linewidth=0.6)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(plain)
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_ylabel(f"{METRIC_LABEL.get(metric, metric)} (us, log)")
        ax.grid(True, which="major", axis="y", alpha=0.3)
    if rounds is not None:  # round numbers over the top panel, round boundaries across all panels
        for i in range(1, len(rounds)):
            if rounds[i] != rounds[i - 1]:
                for ax in axes:
                    ax.axvline(i + 0.5, color="#555555", linewidth=1.0, linestyle="-.")
        top = axes[0]
        for r in sorted(set(rounds)):
            where = [x for x, rr in zip(xs, rounds, strict=True) if rr == r]
            top.annotate(f"round {r}", xy=((where[0] + where[-1]) / 2, 1.0), xycoords=("data", "axes fraction"),
                         xytext=(0, 2), textcoords="offset points", ha="center", va="bottom", fontsize=7.5,
                         color="#555555")
    axes[0].set_title(title, pad=14 if rounds is not None else 6)
    axes[0].legend(loc="best", fontsize=8, framealpha=0.9)
    axes[-1].set_xlabel("run, in measuring order" + (" (not recorded: A runs, then B runs)"
                                                     if _sequence_is_guess(result) else "")
                        + "; grey: A/B switches; dash-dot: rounds; dashed: arm medians")
    axes[-1].set_xticks(xs if len(xs) <= 40 else xs[::max(1, len(xs) // 20)])
    return figure_png(fig)


def _fmt(v: float | None, *, bound: bool = False, digits: int = 3) -> str:
    if v is None:
        return "-"
    if math.isinf(v):
        return "+inf" if v > 0 else "-inf"
    if float(v).is_integer():
        text = f"{int(v)}"
    elif abs(v) >= 10:
        text = f"{v:.1f}".rstrip("0").rstrip(".")
    else:
        text = f"{v:.{digits}g}"
    return ("\u2265 " if bound else "") + text


def _signed(v: float) -> str:
    return ("+" if v > 0 else "") + _fmt(v)


def _auto_notes(result: ABResult) -> list[str]:
    """What a reader must know to not over-read the table."""
    notes = []
    n_a, n_b = len(result.arm("A").runs), len(result.arm("B").runs)
    notes.append(f"Each row compares {n_a} A run(s) with {n_b} B run(s): one value per run (all threads pooled "
                 "within the run), because the samples of one run are not independent. The pooled columns and "
                 "the plots use every sample and are for seeing the tails only.")
    notes.append("\u201cno difference shown\u201d is not \u201cno difference\u201d: the runs were too few or "
                 "too noisy to show one at this confidence. A verdict needs both the bootstrap interval to exclude "
                 "0 and the exact rank test to reject at the same level.")
    if min(n_a, n_b) <= 3:
        notes.append(f"With {min(n_a, n_b)} run(s) in the smaller arm, the exact rank test can reach at best "
                     f"p = {2 / math.comb(n_a + n_b, min(n_a, n_b)):.3g}: more rounds are needed to show anything "
                     "at a usual confidence.")
    for arm in result.arms:
        over = [(i, r.all.overflows) for i, r in enumerate(arm.runs, 1) if r.all.overflows]
        if over:
            total = sum(o for _, o in over)
            notes.append(f"{arm.name} ({arm.profile}): {total} sample(s) beyond the histogram in {len(over)} "
                         f"run(s) (run {', '.join(str(i) for i, _ in over)}): counted but not plotted; a "
                         "percentile among them is only a lower bound (the histogram size).")
    for e in result.effects:
        if e.censored:
            notes.append(f"{METRIC_LABEL.get(e.metric, e.metric)}: {e.censored_a} A and {e.censored_b} B run(s) "
                         "had it among the overflows, taken as the histogram size (a lower bound); medians marked "
                         "\u2265 are lower bounds.")
    if _sequence_is_guess(result):
        notes.append("Neither the measuring order nor start times were recorded: the runs are shown A first, then "
                     "B, so drift over time cannot be judged.")
    elif result.order and result.design is None:
        notes.append("The runs were not measured in equal ABBA or AB blocks of the rounds: drift may not be "
                     "balanced between the arms.")
    if result.design == "AB":
        notes.append("Order AB: a drift over time favours the arm measured first in every round; ABBA balances it.")
    return notes


def _summary_table(result: ABResult) -> str:
    first = result.effects[0]
    conf = f"{first.confidence * 100:g}%"
    head = ("metric", "A median", "B median", "B \u2212 A", "B / A", f"{conf} CI of B \u2212 A",
            f"{conf} CI of B / A", "rank test p", "Cliff's \u03b4 (B vs A)", "HL shift", "A pooled", "B pooled",
            "verdict")
    rows = []
    for e in result.effects:
        cls = "none" if e.verdict == "no difference shown" else "shown"
        cells = [
            METRIC_LABEL.get(e.metric, e.metric),
            _fmt(e.median_a, bound=e.median_a_is_lower_bound), _fmt(e.median_b, bound=e.median_b_is_lower_bound),
            _signed(e.diff), f"{e.ratio:.3g}", f"{_signed(e.ci_low)} .. {_signed(e.ci_high)}",
            f"{e.ratio_ci_low:.3g} .. {e.ratio_ci_high:.3g}", f"{e.rank_p_value:.3g}",
            f"{e.cliffs_delta:+.2f} ({e.cliffs_label})", _signed(e.hl_shift),
            _fmt(e.pooled_a, bound=e.pooled_a_is_lower_bound), _fmt(e.pooled_b, bound=e.pooled_b_is_lower_bound)]
        tds = "".join(f'<td class="{"l" if i == 0 else "n"}" data-col="{escape(h)}">{escape(c)}</td>'
                      for i, (h, c) in enumerate(zip(head, cells, strict=False)))
        rows.append(f'<tr data-metric="{e.metric}">{tds}'
                    f'<td class="l" data-col="verdict"><span class="verdict {cls}" '
                    f'data-verdict="{escape(e.verdict)}">{escape(e.verdict)}</span></td></tr>')
    return ('<table class="summary"><tr>' + "".join(f'<th class="l">{escape(h)}</th>' for h in head)
            + "</tr>" + "".join(rows) + "</table>"
            '<p class="meta">Medians over runs, in us. B \u2212 A &gt; 0 and Cliff\'s \u03b4 &gt; 0 mean B has the '
            "higher latency (worse). Interval: percentile bootstrap over runs within each arm "
            f"({first.resamples} resamples, seed {first.seed}). Cliff's \u03b4 = P(B &gt; A) \u2212 P(B &lt; A) "
            "over pairs of runs; magnitude after Romano et al. (|\u03b4| &lt; 0.147 negligible, &lt; 0.33 small, "
            "&lt; 0.474 medium, else large). HL shift: median of the pairwise differences B \u2212 A. Pooled: the "
            "percentile of all samples of the arm together (no claim is made on it).</p>")


def _runs_table(result: ABResult) -> str:
    keys = ("samples", "avg_us", "p99_us", "p999_us", "max_us", "overflows")
    head = ("#", "arm", "run", "profile", "started", *(METRIC_LABEL[k] for k in keys))
    profiles = result.profiles
    rows = []
    for n, (arm, i, res) in enumerate(run_sequence(result), 1):
        a = res.all
        limit = histogram_limit(res)
        texts = {k: fmt_value(k, getattr(a, k), overflows=a.overflows, limit=limit,
                                       has_hist=a.histogram is not None)[0] for k in keys}
        cells = "".join(f'<td data-metric="{k}">{escape(texts[k])}</td>' for k in keys)
        rows.append(f'<tr data-row="{arm}/{i}"><td>{n}</td><td class="l" style="color:{ARM_COLOR[arm]}">'
                    f'<b>{arm}</b></td><td>{i}</td><td class="l">{escape(profiles[arm])}</td>'
                    f'<td class="l">{escape(fmt_time(res.started_at))}</td>{cells}</tr>')
    return ('<table class="figures"><tr>' + "".join(f'<th class="l">{escape(h)}</th>' for h in head)
            + "</tr>" + "".join(rows) + "</table>")


def _settings_html(settings: dict[str, Any]) -> str:
    if not settings:
        return "<p>No settings recorded with the experiment.</p>"
    rows = []
    for key, value in settings.items():
        if isinstance(value, dict):
            text = ", ".join(f"{k} {v}" for k, v in value.items())
        else:
            text = str(value)
        rows.append(f'<tr><td class="l">{escape(key)}</td><td class="l">{escape(text)}</td></tr>')
    return '<table class="conditions">' + "".join(rows) + "</table>"


_CSS = """
.verdict.shown { background: #2c4f8a; } td.n { font-variant-numeric: tabular-nums; white-space: nowrap; }
ul.notes li { margin: 0.25em 0; }
"""


def render_ab_html(result: ABResult, path: Path) -> Path:
    """Write the experiment as one self-contained HTML file (plots as base64 PNG data URIs, inline CSS)."""
    e = escape
    a, b = result.arm("A"), result.arm("B")
    title = f"A/B on {result.unit}: {a.profile} (A) vs {b.profile} (B)"
    sides = {f"A ({a.profile})": a.runs, f"B ({b.profile})": b.runs}
    when = ""
    if result.started is not None:
        when = f"; {fmt_time(result.started)} to {fmt_time(result.ended)}"
    design = result.design
    blocks = (f"order {design}, {result.runs_per_block} run(s) per block" if design else
              f"order {''.join(result.order) or 'not recorded'}")
    body = [f"<h1>{e(title)}</h1>",
            (f'<p class="meta">unit {e(result.unit)}; target {e(result.target or "-")}; {result.rounds} rounds, '
             f"{e(blocks)} ({e(''.join(result.order))}); {len(a.runs)} A run(s), {len(b.runs)} B "
             f"run(s){e(when)}. Latencies in microseconds; lower is better.</p>"),
            "<h2>Summary</h2>"]
    if result.effects:
        body.append(_summary_table(result))
    else:
        body.append("<p>No analysis recorded.</p>")
    notes = _auto_notes(result) + list(result.notes)
    body.append("<h2>Read this before the numbers</h2><ul class=\"notes\">"
                + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>")
    dists = [(name, PooledRuns(runs)) for name, runs in sides.items()]
    body.append("<h2>Distributions (all threads, pooled over the runs of each arm)</h2>")
    body.append(overflow_warning(dists))
    colors = {name: ARM_COLOR[name[0]] for name in sides}
    body.append(img_tag(render_histogram_png(sides, "Latency histogram, A vs B", colors=colors), "histogram A vs B"))
    body.append(img_tag(render_cdf_png(result, "Latency CDF, A vs B"), "CDF A vs B"))
    body.append(img_tag(render_ccdf_png(sides, "Latency tail (1 - CDF), A vs B", colors=colors),
                        "tail (complementary CDF) A vs B"))
    body.append("<h2>Runs in measuring order</h2>")
    body.append(img_tag(render_runs_png(result), "p99.9 and p99 per run in measuring order"))
    body.append(_runs_table(result))
    body.append("<h2>Conditions</h2>")
    body.append(f'<table class="conditions"><tr><td class="l">unit</td><td class="l">{e(result.unit)}</td></tr>'
                f'<tr><td class="l">target</td><td class="l">{e(result.target or "-")}</td></tr>'
                f'<tr><td class="l">profile A</td><td class="l">{e(a.profile)}</td></tr>'
                f'<tr><td class="l">profile B</td><td class="l">{e(b.profile)}</td></tr>'
                + (f'<tr><td class="l">analysis</td><td class="l">confidence '
                   f"{result.effects[0].confidence * 100:g}%, {result.effects[0].resamples} bootstrap resamples, "
                   f"seed {result.effects[0].seed}</td></tr>" if result.effects else "") + "</table>")
    body.append("<h3>Experiment settings</h3>" + _settings_html(result.settings))
    labeled = [(f"{arm.name} {i}", r) for arm in result.arms for i, r in enumerate(arm.runs, 1)]
    if labeled:
        body.append("<h3>Each run was measured under</h3>" + conditions_table(labeled))
    created = datetime.now(UTC).isoformat(timespec="seconds")
    footer = f'\n<p class="meta">rendered {e(created)}</p>'
    return write_page(path, page(title, body, css=BASE_CSS + _CSS, footer=footer))
