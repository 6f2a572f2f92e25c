"""Reports: what was measured, what each tuning change did to the latency, and what was decided.

A `Report` is a JSON document: one `ChangeReport` per tuning change (its before and after runs, the decision as
plain JSON) and stand-alone `measurements`. It is rendered as a summary (`summary_rows`, printed by the CLI as
a table) or as one self-contained HTML file (`render_html`: plots embedded as base64 PNG, no external
resources). matplotlib is imported only when a plot is drawn, with the Agg backend, without pyplot.

Plots are drawn from the exact histograms of the results (all threads pooled; for a change, pooled over the runs
of each side). Samples beyond the histogram range (cyclictest's overflows) cannot be plotted: every plot and
table says how many there were. A percentile that falls among them is shown as a lower bound, never guessed.
"""

from __future__ import annotations

import base64
import html
import io
import math
import statistics
from collections.abc import Sequence
from datetime import UTC, datetime
from fractions import Fraction
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from orchestrator import jsonio
from orchestrator.errors import InputError
from orchestrator.measure.model import PERCENTILES, LatencyResult, LatencyStats

__all__ = [
    "SUMMARY_COLUMNS",
    "ChangeReport",
    "Report",
    "load_report",
    "measurement_label",
    "render_ccdf_png",
    "render_histogram_png",
    "render_html",
    "figure_png",
    "img_tag",
    "new_figure",
    "save_report",
    "summary_rows",
]

METRIC_LABEL = {"samples": "samples", "min_us": "min", "avg_us": "avg", "p50_us": "p50", "p90_us": "p90",
                "p99_us": "p99", "p999_us": "p99.9", "p9999_us": "p99.99", "max_us": "max",
                "overflows": "overflows"}
TABLE_METRICS = ("samples", "min_us", "avg_us", "p50_us", "p90_us", "p99_us", "p999_us", "p9999_us", "max_us",
                 "overflows")
CHANGE_METRICS = ("p99_us", "p999_us", "max_us")  # the run-level medians in a change's summary row
CCDF_MARKS = ("p50_us", "p99_us", "p999_us", "p9999_us")
ARROW = " \u2192 "
SIDE_COLOR = {"before": "#1f77b4", "after": "#d62728"}
SINGLE_COLOR = "#2c7a3f"

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
    before: list[LatencyResult] = Field(default_factory=list)
    after: list[LatencyResult] = Field(default_factory=list)
    decision: dict[str, Any] | None = None  # Decision.model_dump(mode="json"); loosely typed on purpose
    note: str = ""

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


def _got(e: Any) -> str:
    """' (got VALUE)' for a field's error, short; nothing for a missing field or a rule over a whole object."""
    if e["type"] == "missing" or isinstance(e.get("input"), (dict, list)):
        return ""
    text = repr(e.get("input"))
    return f" (got {text if len(text) <= 60 else text[:60] + '...'})"


def _validation_problems(exc: ValidationError, prefix: str = "", limit: int = 5) -> str:
    errors = exc.errors()
    parts = []
    for e in errors[:limit]:
        loc = ".".join(str(p) for p in (prefix, *e["loc"]) if p != "")
        parts.append(f"{loc or '(top)'}: {e['msg'].removeprefix('Value error, ')}{_got(e)}")
    more = f" (and {len(errors) - limit} more)" if len(errors) > limit else ""
    return "; ".join(parts) + more


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
                                 f"LatencyResults): {_validation_problems(exc, f'[{i}]')}") from None
        return Report(title=title, measurements=results)
    if not isinstance(doc, dict):
        raise InputError(f"{path}: the JSON is a {type(doc).__name__}: {_EXPECTED}")
    keys = set(doc)
    if keys & {"form", "threads", "all"}:
        try:
            return Report(title=title, measurements=[LatencyResult.model_validate(doc)])
        except ValidationError as exc:
            raise InputError(f"{path}: looks like a LatencyResult but is not valid (expected one as written by "
                             f"the measurement runner): {_validation_problems(exc)}") from None
    if keys and keys <= _REPORT_KEYS:
        try:
            return Report.model_validate(doc)
        except ValidationError as exc:
            raise InputError(f"{path}: looks like a report but is not valid (expected a report as written by "
                             f"save_report): {_validation_problems(exc)}") from None
    shown = ", ".join(k[:40] for k in sorted(keys)[:8]) or "none"  # a hostile key is cut, not printed whole
    raise InputError(f"{path}: a JSON object with keys {shown}: {_EXPECTED}")


def save_report(report: Report, path: Path) -> Path:
    """Write the report as JSON (what `load_report` reads back)."""
    path = Path(path)
    path.write_text(report.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------ figures


def _fmt_time(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def measurement_label(result: LatencyResult, index: int | None = None) -> str:
    """A human name for a stand-alone result: target and start time, else the raw artifact, else its number."""
    parts = []
    if result.target:
        parts.append(result.target)
    if result.started_at is not None:
        parts.append(_fmt_time(result.started_at))
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


def _histogram_limit(result: LatencyResult) -> int | None:
    """A lower bound (us) for every overflow sample: the histogram size, else the largest bucket + 1."""
    if result.settings is not None:
        return result.settings.histogram_us
    if result.all.histogram:
        return max(result.all.histogram) + 1
    return None


def _run_value(result: LatencyResult, metric: str) -> tuple[float | None, bool]:
    """(value, censored): a percentile among the overflows is taken as the histogram limit (a lower bound)."""
    v = getattr(result.all, metric)
    if v is not None:
        return float(v), False
    if metric in PERCENTILES and result.all.overflows > 0:
        limit = _histogram_limit(result)
        if limit is not None:
            return float(limit), True
    return None, False


def _run_median(results: Sequence[LatencyResult], metric: str) -> tuple[float | None, bool]:
    """Median over runs of one metric and whether it is only a lower bound (a censored run at or below the
    median position). Runs without the metric (summary form, no histogram) are left out."""
    pairs = sorted((v, c) for v, c in (_run_value(r, metric) for r in results) if v is not None)
    if not pairs:
        return None, False
    k = len(pairs)
    mid = pairs[(k - 1) // 2: k // 2 + 1]
    return statistics.median(v for v, _ in pairs), any(c for _, c in mid)


class _Dist:
    """All-threads histograms pooled over runs: what the plots and the 'pooled' table rows show."""

    def __init__(self, results: Sequence[LatencyResult]):
        self.runs = len(results)
        with_hist = [r for r in results if r.all.histogram is not None]
        self.without_hist = self.runs - len(with_hist)
        self.hist: dict[int, int] = {}
        for r in with_hist:
            for bucket, count in (r.all.histogram or {}).items():
                self.hist[int(bucket)] = self.hist.get(int(bucket), 0) + count
        self.overflows = sum(r.all.overflows for r in with_hist)
        self.samples = sum(self.hist.values()) + self.overflows
        limits = [lim for r in with_hist if (lim := _histogram_limit(r)) is not None]
        self.limit = min(limits) if limits else None  # every overflow sample is at least this
        maxes = [r.all.max_us for r in with_hist]
        self.max_us = max(maxes) if maxes and all(m is not None for m in maxes) else None  # type: ignore

    @property
    def plottable(self) -> bool:
        return bool(self.hist)

    def percentile(self, fraction: float) -> int | None:
        """Exact, as in the model: the smallest bucket where the cumulative count reaches fraction x samples."""
        if not self.samples:
            return None
        q = Fraction(str(fraction))  # 0.999 exactly, as the parser does
        cumulative = 0
        for bucket in sorted(self.hist):
            cumulative += self.hist[bucket]
            if cumulative * q.denominator >= q.numerator * self.samples:
                return bucket
        return None

    def stats(self) -> dict[str, Any]:
        buckets = sorted(self.hist)
        avg = (sum(b * c for b, c in self.hist.items()) / self.samples) if self.samples and not self.overflows \
            else None
        out: dict[str, Any] = {"samples": self.samples, "min_us": buckets[0] if buckets else None, "avg_us": avg,
                               "max_us": self.max_us, "overflows": self.overflows}
        out.update({k: self.percentile(f) for k, f in PERCENTILES.items()})
        return out


# ------------------------------------------------------------------------------------------------ plots


def _figure(width: float = 8.0, height: float = 3.8):
    import matplotlib

    matplotlib.use("Agg", force=False)  # no display needed; harmless if pyplot chose Agg already
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _use_log_x(dists: Sequence[_Dist], *, with_max: bool) -> bool:
    """Log x when the plotted range spans more than a decade and a half (the tail is then far from the body)."""
    lo = min(min(d.hist) for d in dists if d.plottable)
    hi = max(max(max(d.hist) + 1, (d.max_us or 0) if with_max else 0) for d in dists if d.plottable)
    return lo >= 1 and hi / lo > 30


def _log_x_axis(ax, lo: float, hi: float) -> None:
    """Log x with plain-number ticks at 1-2-5 steps (10, 20, 50, 100 ... us), not 10^n."""
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    fmt = ScalarFormatter()
    fmt.set_scientific(False)
    ax.xaxis.set_major_formatter(fmt)
    ax.xaxis.set_minor_formatter(NullFormatter())


def _series(sides: dict[str, Sequence[LatencyResult]] | Sequence[LatencyResult]) -> list[tuple[str, _Dist, str]]:
    if isinstance(sides, dict):
        return [(name, _Dist(results), SIDE_COLOR.get(name, SINGLE_COLOR)) for name, results in sides.items()]
    return [("", _Dist(sides), SINGLE_COLOR)]


def _num(n: int) -> str:
    return f"{n:,}".replace(",", "\u202f")  # thin space: 109 857


def _legend_name(name: str, d: _Dist, *, censored: Sequence[str] = ()) -> str:
    parts = []
    if name:
        n = d.runs - d.without_hist
        parts.append(f"{name}: {n} run{'s' if n != 1 else ''}")
    parts.append(f"{_num(d.samples)} samples")
    if d.max_us is not None:
        parts.append(f"max {d.max_us} us")
    if censored:
        parts.append(f"{'/'.join(censored)} \u2265 {d.limit} us (overflow)")
    return ", ".join(parts)


def _overflow_note(name: str, d: _Dist) -> str | None:
    if not d.overflows:
        return None
    where = f"\u2265 {d.limit} us" if d.limit is not None else "beyond the histogram"
    top = f", max {d.max_us} us" if d.max_us is not None else ""
    who = f"{name}: " if name else ""
    return f"{who}{_num(d.overflows)} samples ({100 * d.overflows / d.samples:.2g}%) {where} not plotted{top}"


def _note_box(ax, notes: Sequence[str], x: float, ha: str) -> None:
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


def _no_data_png(title: str, message: str) -> bytes:
    fig = _figure(8.0, 1.6)
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes)
    return _png(fig)


def render_histogram_png(sides: dict[str, Sequence[LatencyResult]] | Sequence[LatencyResult],
                         title: str = "Latency histogram") -> bytes:
    """Histogram(s) of the all-threads latency (1 us buckets, log-scale counts), pooled over the runs of each
    side and overlaid (`{"before": [...], "after": [...]}`), or of one list of results. PNG bytes."""
    series = _series(sides)
    drawn = [(n, d, c) for n, d, c in series if d.plottable]
    if not drawn:
        return _no_data_png(title, "no histogram recorded (summary form): nothing to plot")
    log_x = _use_log_x([d for _, d, _ in drawn], with_max=False)
    fig = _figure()
    ax = fig.add_subplot()
    lo = min(min(d.hist) for _, d, _ in drawn)
    hi = max(max(d.hist) for _, d, _ in drawn)
    top = 1
    for i, (name, d, color) in enumerate(drawn):
        counts, edges = _stairs(d.hist)
        top = max(top, max(counts))
        ax.stairs(counts, edges, baseline=0.5, fill=True, color=color, alpha=0.25 if i == 0 else 0.18)
        ax.stairs(counts, edges, baseline=0.5, color=color, linewidth=1.1, label=_legend_name(name, d))
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
        _log_x_axis(ax, lo * 0.9, right * 1.15)
    else:
        ax.set_xlim(max(lo - 1, 0), right + 1)
    ax.set_xlabel("latency (us)" + (", log scale" if log_x else "") + "; bucket b holds samples of b us")
    ax.set_ylabel("samples per 1 us bucket (log)")
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper right", fontsize=8, framealpha=0.95)
    _note_box(ax, [n for n in (_overflow_note(name, d) for name, d, _ in drawn) if n], 0.01, "left")
    return _png(fig)


def render_ccdf_png(sides: dict[str, Sequence[LatencyResult]] | Sequence[LatencyResult],
                    title: str = "Latency tail (1 - CDF)") -> bytes:
    """Complementary CDF: the fraction of samples >= x on a log axis, so p99 (1e-2), p99.9 (1e-3) and p99.99
    (1e-4) are readable; each side's percentiles are marked with vertical lines. Beyond the histogram only
    bounds are known: a shaded band up to the max. PNG bytes."""
    series = _series(sides)
    drawn = [(n, d, c) for n, d, c in series if d.plottable]
    if not drawn:
        return _no_data_png(title, "no histogram recorded (summary form): nothing to plot")
    log_x = _use_log_x([d for _, d, _ in drawn], with_max=True)
    fig = _figure(8.0, 4.6)
    ax = fig.add_subplot()
    n_max = max(d.samples for _, d, _ in drawn)
    bottom = 0.4 / n_max
    lo = min(min(d.hist) for _, d, _ in drawn)
    right = lo + 1
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
                label=_legend_name(name, d, censored=censored))
        if d.overflows:  # beyond the limit: between 1/N and overflows/N, shape unknown, up to the max
            frac = d.overflows / d.samples
            if d.max_us is None or d.max_us > exact_end:  # (runs with different limits: max may lie inside)
                end = d.max_us if d.max_us is not None else exact_end * 1.5
                ax.fill_between([exact_end, end], [1.0 / d.samples] * 2, [frac] * 2, color=color, alpha=0.10,
                                hatch="//", edgecolor=color, linewidth=0)
                ax.plot([exact_end, end], [frac, frac], color=color, linestyle="--", linewidth=1.0)
                right = max(right, end)
            notes.append(f"{name + ': ' if name else ''}{_num(d.overflows)} samples \u2265 {d.limit} us: "
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
        _log_x_axis(ax, lo * 0.9, right * 1.25)
    else:
        ax.set_xlim(max(lo - 1, 0), right + 1)
    ax.set_xlabel("latency x (us)" + (", log scale" if log_x else "") + ";  \u00d7 = max")
    ax.set_ylabel("fraction of samples \u2265 x  (1 \u2212 CDF)")
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    fig.legend(loc="outside lower center", fontsize=8, frameon=False)  # below the axes: hides no data
    _note_box(ax, notes, 0.99, "right")
    return _png(fig)


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
                value, bound = _run_median(runs, metric)
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

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2em auto; max-width: 1100px;
       color: #1d1d1f; padding: 0 1em; }
h1 { margin-bottom: 0.1em; } h2 { margin-top: 2.2em; border-bottom: 2px solid #ddd; padding-bottom: 0.2em; }
h3 { margin-top: 1.4em; }
.meta { color: #666; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.88em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.55em; text-align: right; vertical-align: top; }
th { background: #f3f3f3; } td.l, th.l { text-align: left; }
tr.pooled td { background: #f7f7fb; } tr.median td { background: #eef5ee; font-weight: 600; }
td.overflow, span.overflow { color: #a04000; font-weight: 600; }
.warn { background: #fff4e0; border: 1px solid #e0a040; padding: 0.4em 0.8em; border-radius: 4px; }
.verdict { display: inline-block; padding: 0.15em 0.7em; border-radius: 4px; color: white; font-weight: 700; }
.verdict.keep { background: #2c7a3f; } .verdict.rollback { background: #b3261e; }
.verdict.inconclusive { background: #7a6a2c; } .verdict.none { background: #777; }
.reason { white-space: pre-wrap; }
img { max-width: 100%; display: block; margin: 0.4em 0; }
code, pre { font-size: 0.85em; } pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; }
.note { font-style: italic; }
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _fmt_value(metric: str, value: Any, *, overflows: int = 0, limit: int | None = None,
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
        text, title = _fmt_value(metric, values.get(metric), overflows=overflows, limit=limit, has_hist=has_hist)
        cls = ' class="overflow"' if metric == "overflows" and overflows else ""
        tip = f' title="{_e(title)}"' if title else ""
        out.append(f'<td data-metric="{metric}"{cls}{tip}>{_e(text)}</td>')
    return "".join(out)


def _stats_values(s: LatencyStats) -> dict[str, Any]:
    return {k: getattr(s, k) for k in TABLE_METRICS}


def _figures_header(first: str, extra: Sequence[str] = ()) -> str:
    heads = "".join(f'<th class="l">{_e(h)}</th>' for h in (first, *extra))
    return "<tr>" + heads + "".join(f"<th>{_e(METRIC_LABEL[m])}</th>" for m in TABLE_METRICS) + "</tr>"


def _conditions_table(labeled: Sequence[tuple[str, LatencyResult]]) -> str:
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
                    f"cpus {','.join(map(str, s.cpus))}, {s.policy} priority {s.priority}, interval {s.interval_us} us, "
                    f"{s.duration_s:g} s, histogram {s.histogram_us} us, mlockall {'on' if s.mlockall else 'off'}")
        load = _load_text(res) or "not recorded"
        rows.append(
            "<tr>" + "".join(f'<td class="l">{_e(v)}</td>' for v in (
                ", ".join(labels), res.target or "-", settings, load, res.boot_id or "-")) +
            f'<td class="l"><code>{_e(res.cmdline or "-")}</code></td></tr>')
    head = "".join(f'<th class="l">{h}</th>' for h in ("results", "target", "cyclictest settings", "load",
                                                       "boot id", "kernel command line"))
    return f'<table class="conditions"><tr>{head}</tr>{"".join(rows)}</table>'


def _overflow_warning(items: Sequence[tuple[str, _Dist]]) -> str:
    notes = [n for n in (_overflow_note(name, d) for name, d in items) if n]
    if not notes:
        return ""
    return ('<p class="warn">Samples beyond the histogram range are counted but cannot be plotted: '
            + "; ".join(_e(n) for n in notes) + ". Percentiles among them are shown as lower bounds (\u2265).</p>")


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
    parts = [f'<p>Decision: <span class="verdict {cls}" data-verdict="{_e(verdict)}">{_e(verdict)}</span>']
    if decision.get("action") is not None:
        parts.append(f" &rarr; action <b>{_e(decision['action'])}</b>")
    facts = []
    if "look" in decision and "looks_planned" in decision:
        facts.append(f"look {decision['look']}/{decision['looks_planned']}")
    if "runs_before" in decision and "runs_after" in decision:
        facts.append(f"{decision['runs_before']} before / {decision['runs_after']} after runs")
    if isinstance(decision.get("confidence_per_look"), (int, float)):
        facts.append(f"intervals at {decision['confidence_per_look'] * 100:.2f}%")
    if decision.get("stopped_early"):
        facts.append("stopped early")
    if decision.get("final") is False:
        facts.append("not final")
    if facts:
        parts.append(f' <span class="meta">({_e(", ".join(facts))})</span>')
    parts.append("</p>")
    if decision.get("reason"):
        parts.append(f'<p class="reason">{_e(decision["reason"])}</p>')
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
            rows.append('<tr data-metric="' + _e(name) + '">' +
                        "".join(f'<td class="l">{_e(c)}</td>' for c in cells) + "</tr>")
        parts.append('<table class="decision"><tr>' + "".join(f'<th class="l">{_e(h)}</th>' for h in head)
                     + "</tr>" + "".join(rows) + "</table>")
    parts.append("<details><summary>decision as recorded (JSON)</summary><pre>"
                 + _e(jsonio.dumps(decision, indent=2, sort_keys=True)) + "</pre></details>")
    return "".join(parts)


def _change_html(index: int, change: ChangeReport) -> str:
    cid = f"change-{index + 1}"
    out = [f'<section id="{cid}" class="change"><h2>Change {index + 1}: {_e(change.name)}</h2>']
    out.append(f'<p class="meta">target {_e(change.target or "-")}; {len(change.before)} run(s) before, '
               f"{len(change.after)} run(s) after</p>")
    if change.note:
        out.append(f'<p class="note">{_e(change.note)}</p>')
    out.append(_decision_html(change.decision))
    sides = {"before": change.before, "after": change.after}
    dists = {side: _Dist(runs) for side, runs in sides.items()}
    out.append(_overflow_warning(list(dists.items())))
    if any(d.plottable for d in dists.values()):
        out.append("<h3>Distribution (all threads, pooled over the runs of each side)</h3>")
        out.append(_img(render_histogram_png(sides, f"{change.name}: latency histogram"),
                        f"histogram before/after {change.name}"))
        out.append(_img(render_ccdf_png(sides, f"{change.name}: latency tail (1 - CDF)"),
                        f"tail (complementary CDF) before/after {change.name}"))
    else:
        out.append("<p>No histogram recorded (summary form): nothing to plot.</p>")
    without = sum(d.without_hist for d in dists.values())
    if without:
        out.append(f"<p>{without} run(s) without a histogram (summary form) are not in the plots.</p>")

    out.append("<h3>Figures (us, all threads)</h3>")
    rows = [_figures_header("run", ("started",))]
    for side, runs in sides.items():
        for i, res in enumerate(runs):
            a = res.all
            rows.append(f'<tr data-row="{cid}/{side}/{i + 1}"><td class="l">{side} {i + 1}</td>'
                        f'<td class="l">{_e(_fmt_time(res.started_at))}</td>'
                        + _cells(_stats_values(a), overflows=a.overflows, limit=_histogram_limit(res),
                                 has_hist=a.histogram is not None) + "</tr>")
    for side, runs in sides.items():
        if not runs:
            continue
        med: dict[str, Any] = {}
        bound_any = False
        for metric in TABLE_METRICS:
            if metric in ("samples", "overflows"):
                continue
            v, bound = _run_median(runs, metric)
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
        out.append("<h3>Measured under</h3>" + _conditions_table(labeled))
    out.append("</section>")
    return "".join(out)


def _measurement_html(index: int, res: LatencyResult) -> str:
    mid = f"measurement-{index + 1}"
    label = measurement_label(res, index)
    out = [f'<section id="{mid}" class="measurement"><h2>Measurement {index + 1}: {_e(label)}</h2>',
           f'<p class="meta">form {_e(res.form)}; {len(res.threads)} thread(s); started '
           f"{_e(_fmt_time(res.started_at))}"
           + (f"; ran {res.duration_s:g} s" if res.duration_s is not None else "")
           + (f"; raw output <code>{_e(res.raw_artifact)}</code>" if res.raw_artifact else "") + "</p>"]
    d = _Dist([res])
    out.append(_overflow_warning([("all threads", d)]))
    if d.plottable:
        out.append(_img(render_histogram_png([res], f"{label}: latency histogram"), f"histogram {label}"))
        out.append(_img(render_ccdf_png([res], f"{label}: latency tail (1 - CDF)"), f"tail {label}"))
    else:
        out.append("<p>No histogram recorded (summary form): nothing to plot, figures only.</p>")
    limit = _histogram_limit(res)
    rows = [_figures_header("thread")]
    for t in [*res.threads, res.all]:
        name = "all" if t.thread is None else str(t.thread)
        cls = ' class="pooled"' if t.thread is None else ""
        rows.append(f'<tr data-row="{mid}/{name}"{cls}>'
                    f'<td class="l">{_e(name)}</td>'
                    + _cells(_stats_values(t), overflows=t.overflows, limit=limit, has_hist=t.histogram is not None)
                    + "</tr>")
    out.append("<h3>Figures (us)</h3>" + '<table class="figures">' + "".join(rows) + "</table>")
    out.append("<h3>Measured under</h3>" + _conditions_table([(label, res)]))
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
            cells = [f'<td class="l"><a href="#change-{i + 1}">{_e(r["name"])}</a></td>',
                     f'<td class="l">{_e(r["target"] or "-")}</td>',
                     f"<td>{r['runs_before']} / {r['runs_after']}</td>"]
            for m in CHANGE_METRICS:
                pair = []
                for side in ("before", "after"):
                    v = r[f"{side}_{m}"]
                    text = "-" if v is None else f"{v:g}"
                    pair.append(("\u2265 " if f"{side}_{m}" in r["lower_bounds"] else "") + text)
                cells.append(f"<td>{_e(ARROW.join(pair))}</td>")
            verdict = r["verdict"] or "none"
            cls = verdict if verdict in ("keep", "rollback", "inconclusive") else "none"
            cells.append(f'<td class="l"><span class="verdict {cls}">{_e(verdict)}</span></td>')
            body.append("<tr>" + "".join(cells) + "</tr>")
        out.append("<h3>Changes (medians over runs, us)</h3><table class=\"summary\"><tr>"
                   + "".join(f'<th class="l">{_e(h)}</th>' for h in head) + "</tr>" + "".join(body) + "</table>")
    meas = [r for r in rows if r["kind"] == "measurement"]
    if meas:
        keys = ("samples", "p50_us", "p99_us", "p999_us", "max_us", "overflows")
        body = []
        for i, (r, res) in enumerate(zip(meas, report.measurements, strict=True)):
            a = res.all
            fmt = {k: _fmt_value(k, r[k], overflows=a.overflows, limit=_histogram_limit(res),
                                 has_hist=a.histogram is not None)[0] for k in keys}
            cells = "".join(f'<td data-metric="{k}">{_e(fmt[k])}</td>' for k in keys)
            body.append(f'<tr><td class="l"><a href="#measurement-{i + 1}">{_e(r["name"])}</a></td>'
                        f'<td class="l">{_e(r["load"] or "-")}</td>{cells}</tr>')
        out.append("<h3>Measurements (all threads, us)</h3><table class=\"summary\"><tr>"
                   + "".join(f'<th class="l">{h}</th>' for h in ("measurement", "load"))
                   + "".join(f"<th>{_e(METRIC_LABEL[k])}</th>" for k in keys) + "</tr>" + "".join(body)
                   + "</table>")
    if not out:
        out.append("<p>The report is empty: no changes and no measurements.</p>")
    return "<h2>Summary</h2>" + "".join(out)


def render_html(report: Report, path: Path) -> Path:
    """Write the report as one self-contained HTML file (plots as base64 PNG data URIs, inline CSS)."""
    body = [f"<h1>{_e(report.title)}</h1>",
            (f'<p class="meta">created {_e(report.created_at.isoformat(timespec="seconds"))}; '
             f"{len(report.changes)} change(s), {len(report.measurements)} stand-alone measurement(s). "
             "Latencies in microseconds, all threads together unless a thread is named.</p>"),
            _summary_html(report)]
    body += [_change_html(i, c) for i, c in enumerate(report.changes)]
    body += [_measurement_html(i, m) for i, m in enumerate(report.measurements)]
    doc = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
           f"<title>{_e(report.title)}</title><style>{_CSS}</style></head><body>\n"
           + "\n".join(body) + "\n</body></html>\n")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)  # `--html new/dir/r.html`, checked writable up front
    path.write_text(doc, encoding="utf-8")
    return path


# Public names for the plotting plumbing, for other reports (fleet, A/B) to draw in the same style.
new_figure = _figure
figure_png = _png
img_tag = _img
