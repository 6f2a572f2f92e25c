"""The latency plots every report draws (histogram, tail as 1 - CDF), the per-CPU rates of a change's targeted
mechanisms before and after, and the plotting plumbing the other reports share, so all of them look alike.
matplotlib is imported only when a plot is drawn, with the Agg backend, without pyplot.

Plots are drawn from the exact histograms of the results (all threads pooled; for a change, pooled over the runs
of each side). Samples beyond the histogram range (cyclictest's overflows) cannot be plotted: every plot says
how many there were."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from orchestrator.measure.model import METRIC_LABEL, PERCENTILES, LatencyResult
from orchestrator.measure.pooled import PooledRuns

CCDF_MARKS = ("p50_us", "p99_us", "p999_us", "p9999_us")


SIDE_COLOR: Mapping[str, str] = MappingProxyType({"before": "#1f77b4", "after": "#d62728"})


SINGLE_COLOR = "#2c7a3f"


def new_figure(width: float = 8.0, height: float = 3.8):
    import matplotlib

    matplotlib.use("Agg", force=False)  # no display needed; harmless if pyplot chose Agg already
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def use_log_x(dists: Sequence[PooledRuns], *, with_max: bool) -> bool:
    """Log x when the plotted range spans more than a decade and a half (the tail is then far from the body)."""
    lo = min(min(d.hist) for d in dists if d.plottable)
    hi = max(max(max(d.hist) + 1, (d.max_us or 0) if with_max else 0) for d in dists if d.plottable)
    return lo >= 1 and hi / lo > 30


def log_x_axis(ax, lo: float, hi: float) -> None:
    """Log x with plain-number ticks at 1-2-5 steps (10, 20, 50, 100 ... us), not 10^n."""
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    fmt = ScalarFormatter()
    fmt.set_scientific(False)
    ax.xaxis.set_major_formatter(fmt)
    ax.xaxis.set_minor_formatter(NullFormatter())


def _series(sides: Mapping[str, Sequence[LatencyResult]] | Sequence[LatencyResult],
            colors: Mapping[str, str]) -> list[tuple[str, PooledRuns, str]]:
    if isinstance(sides, Mapping):
        return [(name, PooledRuns(results), colors.get(name, SINGLE_COLOR)) for name, results in sides.items()]
    return [("", PooledRuns(sides), SINGLE_COLOR)]


def thin_number(n: int) -> str:
    return f"{n:,}".replace(",", "\u202f")  # thin space: 109 857


def legend_name(name: str, d: PooledRuns, *, censored: Sequence[str] = ()) -> str:
    parts = []
    if name:
        n = d.runs - d.without_hist
        parts.append(f"{name}: {n} run{'s' if n != 1 else ''}")
    parts.append(f"{thin_number(d.samples)} samples")
    if d.max_us is not None:
        parts.append(f"max {d.max_us} us")
    if censored:
        parts.append(f"{'/'.join(censored)} \u2265 {d.limit} us (overflow)")
    return ", ".join(parts)


def overflow_note(name: str, d: PooledRuns) -> str | None:
    if not d.overflows:
        return None
    where = f"\u2265 {d.limit} us" if d.limit is not None else "beyond the histogram"
    top = f", max {d.max_us} us" if d.max_us is not None else ""
    who = f"{name}: " if name else ""
    return f"{who}{thin_number(d.overflows)} samples ({100 * d.overflows / d.samples:.2g}%) {where} not plotted{top}"


def note_box(ax, notes: Sequence[str], x: float, ha: str) -> None:
    if notes:
        ax.text(x, 0.98, "\n".join(notes), transform=ax.transAxes, ha=ha, va="top", fontsize=8,
                color="#8a4b00", zorder=5,
                bbox={"boxstyle": "round", "facecolor": "#fff4e0", "edgecolor": "#e0a040", "alpha": 0.95})


def _stairs(hist: dict[int, int]) -> tuple[list[int], list[int]]:
    """Step values and edges for 1 us buckets [b, b+1), a run of empty buckets merged into one zero step
    (a sparse tail to 20 ms would otherwise be 20000 steps)."""
    values: list[int] = []
    edges: list[int] = []
    for b in sorted(hist):
        if edges and edges[-1] < b:
            values.append(0)
            edges.append(b)
        if not edges:
            edges.append(b)
        values.append(hist[b])
        edges.append(b + 1)
    return values, edges


def no_data_png(title: str, message: str) -> bytes:
    fig = new_figure(8.0, 1.6)
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes)
    return figure_png(fig)


def render_histogram_png(sides: Mapping[str, Sequence[LatencyResult]] | Sequence[LatencyResult],
                         title: str = "Latency histogram", *, colors: Mapping[str, str] = SIDE_COLOR) -> bytes:
    """Histogram(s) of the all-threads latency (1 us buckets, log-scale counts), pooled over the runs of each
    side and overlaid (`{"before": [...], "after": [...]}`, coloured by `colors`), or of one list of
    results. PNG bytes."""
    series = _series(sides, colors)
    drawn = [(n, d, c) for n, d, c in series if d.plottable]
    if not drawn:
        return no_data_png(title, "no histogram recorded (summary form): nothing to plot")
    log_x = use_log_x([d for _, d, _ in drawn], with_max=False)
    fig = new_figure()
    ax = fig.add_subplot()
    lo = min(min(d.hist) for _, d, _ in drawn)
    hi = max(max(d.hist) for _, d, _ in drawn)
    top = 1
    for i, (name, d, color) in enumerate(drawn):
        counts, edges = _stairs(d.hist)
        top = max(top, max(counts))
        ax.stairs(counts, edges, baseline=0.5, fill=True, color=color, alpha=0.25 if i == 0 else 0.18)
        ax.stairs(counts, edges, baseline=0.5, color=color, linewidth=1.1, label=legend_name(name, d))
    limits = sorted({d.limit for _, d, _ in drawn if d.overflows and d.limit is not None})
    for limit in limits:
        ax.axvline(limit, color="#555555", linestyle=":", linewidth=1.2)
        ax.annotate(f"histogram limit {limit} us", xy=(limit, 0.0), xycoords=("data", "axes fraction"),
                    xytext=(-3, 4), textcoords="offset points", ha="right", va="bottom", fontsize=8,
                    rotation=90, color="#555555", zorder=5)
    ax.set_yscale("log")
    ax.set_ylim(0.5, top * 8)  # headroom for the legend and the overflow note
    right = max([hi + 1, *limits])
    if log_x:
        log_x_axis(ax, lo * 0.9, right * 1.15)
    else:
        ax.set_xlim(max(lo - 1, 0), right + 1)
    ax.set_xlabel("latency (us)" + (", log scale" if log_x else "") + "; bucket b holds samples of b us")
    ax.set_ylabel("samples per 1 us bucket (log)")
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper right", fontsize=8, framealpha=0.95)
    note_box(ax, [n for n in (overflow_note(name, d) for name, d, _ in drawn) if n], 0.01, "left")
    return figure_png(fig)


def render_ccdf_png(sides: Mapping[str, Sequence[LatencyResult]] | Sequence[LatencyResult],
                    title: str = "Latency tail (1 - CDF)", *, colors: Mapping[str, str] = SIDE_COLOR) -> bytes:
    """Complementary CDF: the fraction of samples >= x on a log axis, so p99 (1e-2), p99.9 (1e-3) and p99.99
    (1e-4) are readable; each side's percentiles are marked with vertical lines. Beyond the histogram only
    bounds are known: a shaded band up to the max. PNG bytes."""
    series = _series(sides, colors)
    drawn = [(n, d, c) for n, d, c in series if d.plottable]
    if not drawn:
        return no_data_png(title, "no histogram recorded (summary form): nothing to plot")
    log_x = use_log_x([d for _, d, _ in drawn], with_max=True)
    fig = new_figure(8.0, 4.6)
    ax = fig.add_subplot()
    n_max = max(d.samples for _, d, _ in drawn)
    bottom = 0.4 / n_max
    lo = min(min(d.hist) for _, d, _ in drawn)
    right: float = lo + 1
    notes = []
    for i, (name, d, color) in enumerate(drawn):
        buckets = sorted(d.hist)
        xs, ys = [buckets[0]], [1.0]
        remaining = d.samples
        for b in buckets:  # fraction of samples >= b; steps-pre holds it over (previous bucket, b]
            xs.append(b)
            ys.append(remaining / d.samples)
            remaining -= d.hist[b]
        # up to the histogram limit nothing more is in the histogram: the curve is exact there
        exact_end = max(buckets[-1] + 1, d.limit or 0) if d.overflows else buckets[-1]
        if d.overflows:
            xs.append(exact_end)
            ys.append(d.overflows / d.samples)
        right = max(right, exact_end)
        censored = [METRIC_LABEL[k] for k in CCDF_MARKS if d.percentile(PERCENTILES[k]) is None
                    and 1.0 - PERCENTILES[k] >= 1.0 / d.samples]
        ax.plot(xs, ys, drawstyle="steps-pre", color=color, linewidth=1.6,
                label=legend_name(name, d, censored=censored))
        if d.overflows:  # beyond the limit: between 1/N and overflows/N, shape unknown, up to the max
            frac = d.overflows / d.samples
            if d.max_us is None or d.max_us > exact_end:  # (runs with different limits: max may lie inside)
                end: float = d.max_us if d.max_us is not None else exact_end * 1.5
                ax.fill_between([exact_end, end], [1.0 / d.samples] * 2, [frac] * 2, color=color, alpha=0.10,
                                hatch="//", edgecolor=color, linewidth=0)
                ax.plot([exact_end, end], [frac, frac], color=color, linestyle="--", linewidth=1.0)
                right = max(right, end)
            notes.append(f"{name + ': ' if name else ''}{thin_number(d.overflows)} samples \u2265 {d.limit} us: "
                         "shape unknown (shaded)")
        if d.max_us is not None:
            ax.plot([d.max_us], [1.0 / d.samples], marker="x", color=color, markersize=7, linestyle="none")
            right = max(right, d.max_us + 1)
        # percentile markers: a vertical line from the bottom up to where the curve crosses 1 - q
        # labels in the quadrants the falling curve leaves empty: first side lower left, others upper right
        lower_left = len(drawn) > 1 and i == 0
        for key in CCDF_MARKS:
            q = PERCENTILES[key]
            level = 1.0 - q
            if level < 1.0 / d.samples:
                continue  # too few samples for this percentile
            p = d.percentile(q)
            if p is None:
                continue  # among the overflows: said in the legend
            ax.vlines(p, bottom, level, color=color, linestyle=":", linewidth=1.0)
            ax.plot([p], [level], marker="o", color=color, markersize=3.5)
            ax.annotate(f"{METRIC_LABEL[key]} {p}", xy=(p, level), xytext=(-4, -3) if lower_left else (4, 3),
                        textcoords="offset points", ha="right" if lower_left else "left",
                        va="top" if lower_left else "bottom", fontsize=7.5, color=color, zorder=5,
                        bbox={"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none",
                              "alpha": 0.7})
    for key in CCDF_MARKS[1:]:
        level = 1.0 - PERCENTILES[key]
        if level >= bottom:
            ax.axhline(level, color="#999999", linewidth=0.7, alpha=0.6)
            ax.annotate(METRIC_LABEL[key], xy=(1.0, level), xycoords=("axes fraction", "data"), xytext=(3, 0),
                        textcoords="offset points", va="center", fontsize=8, color="#555555")
    ax.set_yscale("log")
    ax.set_ylim(bottom, 1.6)
    if log_x:
        log_x_axis(ax, lo * 0.9, right * 1.25)
    else:
        ax.set_xlim(max(lo - 1, 0), right + 1)
    ax.set_xlabel("latency x (us)" + (", log scale" if log_x else "") + ";  \u00d7 = max")
    ax.set_ylabel("fraction of samples \u2265 x  (1 \u2212 CDF)")
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    fig.legend(loc="outside lower center", fontsize=8, frameon=False)  # below the axes: hides no data
    note_box(ax, notes, 0.99, "right")
    return figure_png(fig)


# ------------------------------------------------------------------------------------------- per-CPU rates


@dataclass(frozen=True)
class RatePanel:
    """One mechanism's per-CPU rates: side -> CPU -> events per second (the median over that side's runs; None:
    no run could tell), and side -> the runs that had counters."""

    title: str
    rates: Mapping[str, Mapping[int, float | None]]
    runs: Mapping[str, int]


def short_rate(v: float) -> str:
    if v >= 1000:
        return f"{v / 1000:.3g}k"
    if v >= 10:
        return f"{v:.0f}"
    if v >= 1:
        return f"{v:.1f}"
    return f"{v:.2g}"


def render_cpu_rates_png(panels: Sequence[RatePanel], title: str = "Targeted interrupts per CPU", *,
                         marked: Sequence[int] = (), colors: Mapping[str, str] = SIDE_COLOR) -> bytes:
    """Grouped bars, one group per CPU, one bar per side (before, after), one panel per mechanism; log y when the
    rates span more than a decade and a half. A zero rate is written as 0 at the foot of its bar, a rate no run
    could tell as n/a; above each group the change after / before. `marked`: CPUs named in the tick labels (where
    cyclictest ran). PNG bytes."""
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    drawn = [p for p in panels if any(p.rates.get(s) for s in p.rates)]
    if not drawn:
        return no_data_png(title, "no per-CPU counters recorded: nothing to plot")
    fig = new_figure(8.0, 1.2 + 2.9 * len(drawn))
    axes = fig.subplots(len(drawn), 1, squeeze=False)[:, 0]
    for ax, panel in zip(axes, drawn, strict=True):
        sides = [s for s in ("before", "after") if s in panel.rates] + [
            s for s in panel.rates if s not in ("before", "after")]
        cpus = sorted({c for s in sides for c in panel.rates[s]})
        values = [v for s in sides for v in panel.rates[s].values() if v is not None]
        positive = [v for v in values if v > 0]
        log_y = bool(positive) and (max(positive) / min(positive) > 30 or len(positive) < len(values))
        width = 0.8 / max(len(sides), 1)
        top = max(values, default=1.0) or 1.0
        floor = min(positive) / 4 if positive else 0.1
        for i, side in enumerate(sides):
            xs = [j + (i - (len(sides) - 1) / 2) * width for j in range(len(cpus))]
            hs = [panel.rates[side].get(c) for c in cpus]
            n = panel.runs.get(side, 0)
            base = floor if log_y else 0.0  # on a log axis the bars start at the floor, below every rate
            ax.bar(xs, [max((h or 0) - base, 0) for h in hs], width=width * 0.92, bottom=base, alpha=0.85,
                   color=colors.get(side, SINGLE_COLOR), label=f"{side}: {n} run{'s' if n != 1 else ''}")
            for x, h in zip(xs, hs, strict=True):
                text = "n/a" if h is None else "0" if h == 0 else short_rate(h) if len(cpus) <= 16 else None
                if text is None:
                    continue
                y = floor if log_y and not h else (h or 0)
                ax.annotate(text, xy=(x, y), xytext=(0, 2), textcoords="offset points", ha="center", va="bottom",
                            fontsize=7, color="#333333")
        if {"before", "after"} <= set(sides) and len(cpus) <= 32:
            for j, c in enumerate(cpus):
                b, a = panel.rates["before"].get(c), panel.rates["after"].get(c)
                if b and a is not None:
                    change = a / b - 1
                    ax.annotate(f"{change * 100:+.0f}%", xy=(j, 1.0), xycoords=("data", "axes fraction"),
                                xytext=(0, -3), textcoords="offset points", ha="center", va="top", fontsize=8,
                                fontweight="bold", color="#2c7a3f" if change < 0 else "#b3261e")
        ax.set_xticks(range(len(cpus)))
        ax.set_xticklabels([f"CPU {c}" + ("\ncyclictest" if c in marked else "") for c in cpus], fontsize=8)
        ax.set_xlim(-0.6, len(cpus) - 0.4)
        if log_y:
            ax.set_yscale("log")
            ax.set_ylim(floor, top * 12)
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            fmt = ScalarFormatter()
            fmt.set_scientific(False)
            ax.yaxis.set_major_formatter(fmt)
            ax.yaxis.set_minor_formatter(NullFormatter())
        else:
            ax.set_ylim(0, top * 1.3 if math.isfinite(top) else 1)
        ax.set_ylabel("events/s" + (" (log)" if log_y else ""))
        ax.set_title(panel.title, fontsize=10)
        ax.grid(True, axis="y", which="major", alpha=0.3)
        ax.legend(loc="upper right", fontsize=8, framealpha=0.95, bbox_to_anchor=(1.0, 0.9))
    fig.suptitle(title)
    return figure_png(fig)
