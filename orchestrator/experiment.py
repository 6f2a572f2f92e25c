"""A/B experiments: two tuning profiles on one unit, measured in interleaved rounds and compared honestly.

`tune ab PROFILE_A PROFILE_B --unit U` applies profile A or B on a unit and runs cyclictest; this module is the
part that touches no unit: the schedule, the statistics, the result models and the HTML report.

The unit of analysis is the **run** (one cyclictest invocation), exactly as in `orchestrator.decide`: the
samples inside one run are strongly correlated (host activity, timer and cache state), so they are not
independent replicates of a profile. Each run gives one value per metric (all threads pooled,
`decide.run_values`), and every interval and test below works on those run-level values. The pooled
histograms of each arm are shown too (tables and plots), because they make the tails visible, but they are
never used for a claim.

Sign conventions (latency: lower is better):
  - `diff` = median(B) - median(A) in us and `ratio` = median(B) / median(A): positive diff / ratio > 1
    means B has the higher latency, i.e. **B is worse**.
  - Cliff's delta = P(B > A) - P(B < A) over all pairs of one A run and one B run: +1 = every B run is
    higher than every A run (B worse), -1 = every B run lower (B better). [1, 2, 3] vs [4, 5, 6] is +1.
  - Hodges-Lehmann shift = median of all pairwise differences B_j - A_i (us): same sign as diff.

The interval: a percentile bootstrap of the difference of medians (and, from the same resamples, of their
ratio), resampling runs within each arm, seeded, so the same data and seed give the same interval. The
difference of medians was chosen (not the log-ratio) because it is what the summary table shows in us and
what "does the CI exclude 0" reads naturally on; the ratio interval is given beside it and agrees with it in
sign resample by resample (median(A) > 0), so both exclude "no change" together.

The verdict: a percentile bootstrap of the median of a handful of runs under-covers (it can only pick among
the observed values; see the `decide` module docstring), so a difference is claimed only when BOTH the
bootstrap interval excludes 0 AND the exact two-sided Mann-Whitney rank test of the run-level values rejects
"no difference" at 1 - confidence (ties, e.g. two runs censored at the histogram size, count against the
claim, which keeps the test conservative). With 2 runs per arm the rank test can never reject (smallest
two-sided p = 1/3): that is the honest answer for 2 runs. "no difference shown" is not "no difference".

Overflows: a percentile that falls among the histogram overflows is taken as the histogram size, a lower
bound, and flagged (`censored`, `median_*_is_lower_bound`); the rank test and Cliff's delta stay correct for
such runs except that two censored runs tie.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from orchestrator import jsonio
from orchestrator import report as _report
from orchestrator.decide import METRIC_LABEL, _u_sf, median_is_bound, run_values
from orchestrator.errors import InputError
from orchestrator.measure.model import PERCENTILES, LatencyResult

__all__ = [
    "ABArm",
    "ABResult",
    "Arm",
    "MetricEffect",
    "Order",
    "ab_schedule",
    "analyse",
    "build_ab_result",
    "cliffs_delta",
    "cliffs_magnitude",
    "hodges_lehmann",
    "load_ab",
    "render_ab_html",
    "render_cdf_png",
    "render_runs_png",
    "run_sequence",
    "save_ab",
]

Arm = Literal["A", "B"]
Order = Literal["ABBA", "AB"]
ABMetric = Literal["p50_us", "p90_us", "p99_us", "p999_us", "p9999_us", "max_us", "avg_us"]
ABVerdict = Literal["B better", "A better", "no difference shown"]
Magnitude = Literal["negligible", "small", "medium", "large"]

DEFAULT_METRICS: tuple[str, ...] = ("p99_us", "p999_us", "max_us", "avg_us")
_ALL_METRICS: tuple[str, ...] = ("p50_us", "p90_us", "p99_us", "p999_us", "p9999_us", "max_us", "avg_us")
# Romano et al. (2006) thresholds on |delta|: below 0.147 negligible, below 0.33 small, below 0.474 medium
CLIFF_THRESHOLDS: tuple[tuple[float, Magnitude], ...] = ((0.147, "negligible"), (0.33, "small"), (0.474, "medium"))
ARM_COLOR = {"A": "#1f77b4", "B": "#d62728"}


# ------------------------------------------------------------------------------------------------ schedule


def ab_schedule(rounds: int, order: Order = "ABBA") -> list[Arm]:
    """The measuring order of `rounds` rounds; a round is one A block and one B block (2 * rounds blocks).

    ABBA: round i is A,B for even i and B,A for odd i (A B B A A B B A ...): a linear drift of the unit over
    time (warming up, a slow background job) then hits both arms equally within every two rounds, instead of
    always favouring the arm measured first. AB: A B A B ... (kept for comparison; drift-prone)."""
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 2:
        raise InputError(f"an A/B experiment needs at least 2 rounds (one A and one B block each), got "
                         f"{rounds!r}: fewer cannot show anything, nor balance drift between the arms")
    if order == "ABBA":
        return [arm for i in range(rounds) for arm in (("A", "B") if i % 2 == 0 else ("B", "A"))]
    if order == "AB":
        return ["A", "B"] * rounds
    raise InputError(f"order must be 'ABBA' or 'AB', not {order!r}")


# ------------------------------------------------------------------------------------------------ models


class ABArm(BaseModel):
    """One arm of the experiment: a profile and its runs, in the order they were measured."""

    model_config = ConfigDict(extra="forbid")

    name: Arm
    profile: str
    runs: list[LatencyResult] = Field(default_factory=list)


class MetricEffect(BaseModel):
    """What B did relative to A for one metric, on run-level values (see the module docstring for signs)."""

    model_config = ConfigDict(extra="forbid")

    metric: ABMetric
    runs_a: int
    runs_b: int
    median_a: float  # median over the runs of A (us)
    median_b: float
    median_a_is_lower_bound: bool = False  # a censored run sits at the median position
    median_b_is_lower_bound: bool = False
    diff: float  # median_b - median_a (us); positive = B worse
    ratio: float  # median_b / median_a; > 1 = B worse
    ci_low: float  # percentile bootstrap interval of `diff` (us) at `confidence`
    ci_high: float
    ratio_ci_low: float  # the same resamples, as median(B)/median(A)
    ratio_ci_high: float
    confidence: float
    resamples: int  # bootstrap resamples and seed: the same runs, resamples and seed give the same interval
    seed: int
    rank_p_value: float  # exact two-sided Mann-Whitney test of the run-level values (ties against a claim)
    cliffs_delta: float  # P(B > A) - P(B < A); +1 = every B run higher (worse)
    cliffs_label: Magnitude  # Romano et al. magnitude of |cliffs_delta|
    hl_shift: float  # Hodges-Lehmann: median of the pairwise differences B_j - A_i (us)
    censored: bool = False  # some run's value is only a lower bound (percentile among the overflows)
    censored_a: int = 0  # runs of A whose value is the histogram size (a lower bound)
    censored_b: int = 0
    # the same metric from each arm's exact pooled histogram (all samples of all runs): shows the tails, but
    # pooled samples are not independent, so no claim is made on these
    pooled_a: float | None = None
    pooled_b: float | None = None
    pooled_a_is_lower_bound: bool = False
    pooled_b_is_lower_bound: bool = False
    verdict: ABVerdict


class ABResult(BaseModel):
    """A whole A/B experiment: where, what, in which order, the runs, the analysis and the conditions."""

    model_config = ConfigDict(extra="forbid")

    unit: str
    target: str | None = None  # what cyclictest ran on: "guest", "host" or "u1.guest"
    profiles: dict[str, str] = Field(default_factory=dict)  # {"A": ..., "B": ...}; filled from `arms` if empty
    rounds: int = Field(ge=2)
    # the arm of every run, in the order measured (one entry per run: "AABBBBAA" for ABBA with 2 runs per block)
    order: list[Arm] = Field(default_factory=list)
    arms: list[ABArm]  # [A, B], each arm's runs in the order measured
    effects: list[MetricEffect] = Field(default_factory=list)
    settings: dict[str, Any] = Field(default_factory=dict)  # {"cyclictest": {...}, "load": {...}, ...}
    started: float | None = None  # epoch seconds, as LatencyResult.started_at
    ended: float | None = None
    notes: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> ABResult:
        if [a.name for a in self.arms] != ["A", "B"]:
            raise ValueError(f"arms must be [A, B] in that order, got {[a.name for a in self.arms]}")
        own = {a.name: a.profile for a in self.arms}
        if not self.profiles:
            self.profiles = own
        elif self.profiles != own:
            raise ValueError(f"profiles {self.profiles} do not match the arms' profiles {own}")
        if self.order:
            counts = {n: self.order.count(n) for n in ("A", "B")}
            runs = {a.name: len(a.runs) for a in self.arms}
            if counts != runs:
                raise ValueError(f"order has {counts['A']} A and {counts['B']} B runs, the arms hold "
                                 f"{runs['A']} A and {runs['B']} B runs")
        return self

    def arm(self, name: Arm) -> ABArm:
        return self.arms[0] if name == "A" else self.arms[1]

    @property
    def runs_per_block(self) -> int | None:
        """Runs per block when `order` is rounds x 2 blocks of equal size, else None."""
        blocks = 2 * self.rounds
        if not self.order or len(self.order) % blocks:
            return None
        return len(self.order) // blocks

    @property
    def design(self) -> Order | None:
        """Which block order `order` follows ("ABBA" or "AB"), None when neither (or no order recorded)."""
        k = self.runs_per_block
        if k is None:
            return None
        for design in ("ABBA", "AB"):
            if self.order == [arm for arm in ab_schedule(self.rounds, design) for _ in range(k)]:  # type: ignore[arg-type]
                return design  # type: ignore[return-value]
        return None

    def effect(self, metric: str) -> MetricEffect:
        for e in self.effects:
            if e.metric == metric:
                return e
        raise KeyError(metric)


# ------------------------------------------------------------------------------------------------ statistics


def cliffs_delta(a: Sequence[float], b: Sequence[float]) -> float:
    """P(B > A) - P(B < A) over all (a_i, b_j) pairs, in [-1, 1]; ties count 0. Positive = B higher (worse).

    Chosen for latency because it depends only on the order of the values: a run with one wild spike moves it
    by at most one pair per opposing run, unlike a difference of means."""
    x = np.asarray(a, dtype=float)
    y = np.asarray(b, dtype=float)
    if not len(x) or not len(y):
        raise InputError("Cliff's delta needs at least one value on each side")
    d = y[None, :] - x[:, None]
    return float((np.count_nonzero(d > 0) - np.count_nonzero(d < 0)) / d.size)


def cliffs_magnitude(delta: float) -> Magnitude:
    """Romano et al. (2006) labels of |delta|: < 0.147 negligible, < 0.33 small, < 0.474 medium, else large."""
    size = abs(delta)
    for bound, label in CLIFF_THRESHOLDS:
        if size < bound:
            return label
    return "large"


def hodges_lehmann(a: Sequence[float], b: Sequence[float]) -> float:
    """The Hodges-Lehmann shift: the median of all pairwise differences b_j - a_i."""
    x = np.asarray(a, dtype=float)
    y = np.asarray(b, dtype=float)
    return float(np.median((y[None, :] - x[:, None]).ravel()))


def _rank_p_value(x: np.ndarray, y: np.ndarray) -> float:
    """Exact two-sided Mann-Whitney p-value; each direction counts only strict pairs (ties against it)."""
    d = y[None, :] - x[:, None]
    sf = _u_sf(len(x), len(y))
    greater = int(np.count_nonzero(d > 0))
    less = int(np.count_nonzero(d < 0))
    return float(min(1.0, 2.0 * min(sf[greater], sf[less])))


def _check_comparable(a_runs: Sequence[LatencyResult], b_runs: Sequence[LatencyResult]) -> None:
    """Runs are only comparable under the same cyclictest settings (duration aside), load and target."""
    labeled = [(f"A run {i}", r) for i, r in enumerate(a_runs, 1)] + \
              [(f"B run {i}", r) for i, r in enumerate(b_runs, 1)]

    def differ(what: str, values: dict[str, str]) -> None:
        groups: dict[str, list[str]] = {}
        for label, v in values.items():
            groups.setdefault(v, []).append(label)
        if len(groups) > 1:
            shown = "; ".join(f"{', '.join(labels)}: {v}" for v, labels in groups.items())
            raise InputError(f"the runs were measured with different {what}, so A and B are not comparable "
                             f"({shown})")

    differ("cyclictest settings", {label: r.settings.model_dump_json(exclude={"duration_s"})
                                   for label, r in labeled if r.settings is not None})
    differ("loads", {label: r.load.model_dump_json() for label, r in labeled if r.load is not None})
    differ("targets", {label: r.target for label, r in labeled if r.target is not None})
    # without recorded settings, the histogram size still tells whether overflow bounds mean the same thing
    sizes = {label: str(r.settings.histogram_us if r.settings else None) for label, r in labeled}
    differ("histogram sizes", {k: v for k, v in sizes.items() if v != "None"})


def _pooled(runs: Sequence[LatencyResult], metric: str) -> tuple[float | None, bool]:
    """(value, is lower bound) of one metric over every sample of every run (exact pooled histogram)."""
    if metric == "avg_us":  # cyclictest's own average covers all samples, overflows included
        pairs = [(r.all.avg_us, r.all.samples) for r in runs]
        if any(v is None for v, _ in pairs) or not sum(n for _, n in pairs):
            return None, False
        return sum(v * n for v, n in pairs) / sum(n for _, n in pairs), False  # type: ignore[operator]
    d = _report._Dist(runs)
    if metric == "max_us":
        return (float(d.max_us), False) if d.max_us is not None else (None, False)
    if d.without_hist or not d.samples:
        return None, False
    v = d.percentile(PERCENTILES[metric])
    if v is not None:
        return float(v), False
    if d.overflows and d.limit is not None:
        return float(d.limit), True
    return None, False


def analyse(a_runs: Sequence[LatencyResult], b_runs: Sequence[LatencyResult], *,
            metrics: Sequence[str] = DEFAULT_METRICS, confidence: float = 0.95, resamples: int = 5000,
            seed: int = 0) -> list[MetricEffect]:
    """Compare the runs of B with the runs of A, one `MetricEffect` per metric (module docstring: the rule).

    Refuses (InputError) fewer than 2 runs per arm and runs that are not comparable (different cyclictest
    settings, load or target)."""
    if len(a_runs) < 2 or len(b_runs) < 2:
        raise InputError(f"an A/B comparison needs at least 2 runs per arm (got {len(a_runs)} A, "
                         f"{len(b_runs)} B): one run per arm says nothing about run-to-run noise")
    if not 0.5 <= confidence < 1.0:
        raise InputError(f"confidence must be in [0.5, 1), got {confidence}")
    if resamples < 200:
        raise InputError(f"at least 200 bootstrap resamples are needed for an interval, got {resamples}")
    if not metrics:
        raise InputError("no metrics to compare")
    for m in metrics:
        if m not in _ALL_METRICS:
            raise InputError(f"unknown metric {m!r}; known: {', '.join(_ALL_METRICS)}")
    if len(set(metrics)) != len(metrics):
        raise InputError(f"a metric is listed twice: {', '.join(metrics)}")
    _check_comparable(a_runs, b_runs)

    alpha = 1.0 - confidence
    effects = []
    for metric in metrics:
        x, cx = run_values(list(a_runs), metric, "A")
        y, cy = run_values(list(b_runs), metric, "B")
        # one stream per (seed, metric): a metric's interval does not depend on which other metrics are asked
        rng = np.random.default_rng([seed, _ALL_METRICS.index(metric)])
        bx = np.median(x[rng.integers(0, len(x), size=(resamples, len(x)))], axis=1)
        by = np.median(y[rng.integers(0, len(y), size=(resamples, len(y)))], axis=1)
        lo, hi = np.quantile(by - bx, [alpha / 2, 1 - alpha / 2])
        rlo, rhi = np.quantile(by / bx, [alpha / 2, 1 - alpha / 2])
        p = _rank_p_value(x, y)
        med_a, med_b = float(np.median(x)), float(np.median(y))
        delta = cliffs_delta(x, y)
        if lo > 0 and p <= alpha:
            verdict: ABVerdict = "A better"
        elif hi < 0 and p <= alpha:
            verdict = "B better"
        else:
            verdict = "no difference shown"
        pa, pa_bound = _pooled(a_runs, metric)
        pb, pb_bound = _pooled(b_runs, metric)
        effects.append(MetricEffect(
            metric=metric, runs_a=len(x), runs_b=len(y), median_a=med_a, median_b=med_b,
            median_a_is_lower_bound=median_is_bound(x, cx), median_b_is_lower_bound=median_is_bound(y, cy),
            diff=med_b - med_a, ratio=med_b / med_a, ci_low=float(lo), ci_high=float(hi),
            ratio_ci_low=float(rlo), ratio_ci_high=float(rhi), confidence=confidence, resamples=resamples, seed=seed, rank_p_value=p,
            cliffs_delta=delta, cliffs_label=cliffs_magnitude(delta), hl_shift=hodges_lehmann(x, y),
            censored=bool(cx.any() or cy.any()), censored_a=int(cx.sum()), censored_b=int(cy.sum()),
            pooled_a=pa, pooled_b=pb, pooled_a_is_lower_bound=pa_bound, pooled_b_is_lower_bound=pb_bound,
            verdict=verdict))
    return effects


def build_ab_result(unit: str, profile_a: str, profile_b: str, a_runs: Sequence[LatencyResult],
                    b_runs: Sequence[LatencyResult], *, rounds: int, order: Sequence[Arm] | None = None,
                    design: Order = "ABBA", target: str | None = None, settings: dict[str, Any] | None = None,
                    started: float | None = None, ended: float | None = None, notes: Sequence[str] = (),
                    metrics: Sequence[str] = DEFAULT_METRICS, confidence: float = 0.95, resamples: int = 5000,
                    seed: int = 0) -> ABResult:
    """An `ABResult` with its effects analysed. `order` (the arm of each run as measured) defaults to the
    `design` schedule of `rounds` rounds with equal runs per block; `settings` to the runs' own cyclictest
    settings and load (`analyse` has checked they agree); `target` to the runs' target."""
    effects = analyse(a_runs, b_runs, metrics=metrics, confidence=confidence, resamples=resamples, seed=seed)
    runs = [*a_runs, *b_runs]
    if order is None:
        k, rest = divmod(len(a_runs), rounds)
        if rest or len(b_runs) != len(a_runs):
            raise InputError(f"{len(a_runs)} A and {len(b_runs)} B runs do not fill {rounds} rounds of equal "
                             "blocks: give the order they were measured in")
        order = [arm for arm in ab_schedule(rounds, design) for _ in range(k)]
    if settings is None:
        settings = {}
        if (s := next((r.settings for r in runs if r.settings is not None), None)) is not None:
            settings["cyclictest"] = s.model_dump(mode="json")
        if (ld := next((r.load for r in runs if r.load is not None), None)) is not None:
            settings["load"] = ld.model_dump(mode="json")
    if target is None:
        target = next((r.target for r in runs if r.target), None)
    try:
        return ABResult(unit=unit, target=target, rounds=rounds, order=list(order),
                        arms=[ABArm(name="A", profile=profile_a, runs=list(a_runs)),
                              ABArm(name="B", profile=profile_b, runs=list(b_runs))],
                        effects=effects, settings=settings, started=started, ended=ended, notes=list(notes))
    except ValidationError as exc:
        raise InputError(f"not a valid A/B result: {_report._validation_problems(exc)}") from None


# ------------------------------------------------------------------------------------------------ JSON


def save_ab(result: ABResult, path: Path) -> Path:
    """Write the result as JSON (what `load_ab` reads back)."""
    path = Path(path)
    path.write_text(result.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return path


def load_ab(path: Path) -> ABResult:
    """Read an `ABResult` JSON written by `save_ab`; InputError naming the file otherwise."""
    path = Path(path)
    doc = jsonio.read_json(path, what="A/B result", max_bytes=_report.MAX_REPORT_BYTES,
                           expected="expected an A/B result as written by save_ab")
    try:
        return ABResult.model_validate(doc)
    except ValidationError as exc:
        raise InputError(f"{path}: not an A/B result as written by save_ab: "
                         f"{_report._validation_problems(exc)}") from None


# ------------------------------------------------------------------------------------------------ sequence


def run_sequence(result: ABResult) -> list[tuple[Arm, int, LatencyResult]]:
    """(arm, 1-based run number within the arm, run) in the order measured: from `order` when recorded, else
    by start time when every run has one, else A's runs then B's."""
    runs = {arm.name: arm.runs for arm in result.arms}
    if result.order:
        used = {"A": 0, "B": 0}
        out: list[tuple[Arm, int, LatencyResult]] = []
        for name in result.order:
            out.append((name, used[name] + 1, runs[name][used[name]]))
            used[name] += 1
        return out
    items: list[tuple[Arm, int, LatencyResult]] = [(arm.name, i, r) for arm in result.arms
                                                   for i, r in enumerate(arm.runs, 1)]
    if items and all(r.started_at is not None for _, _, r in items):
        return sorted(items, key=lambda t: t[2].started_at)  # type: ignore[arg-type,return-value]
    return items


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


# ------------------------------------------------------------------------------------------------ plots


@contextlib.contextmanager
def _arm_colors(names: dict[str, str]) -> Iterator[None]:
    """report's plots colour a series by its name (before/after); give the A/B series their colours while
    drawing, and restore report's table afterwards."""
    saved = dict(_report.SIDE_COLOR)
    _report.SIDE_COLOR.update(names)
    try:
        yield
    finally:
        _report.SIDE_COLOR.clear()
        _report.SIDE_COLOR.update(saved)


def _series_names(result: ABResult) -> dict[str, str]:
    return {arm.name: f"{arm.name} ({arm.profile})" for arm in result.arms}


def render_cdf_png(result: ABResult, title: str = "Latency CDF") -> bytes:
    """Overlaid CDFs of the pooled all-threads latency of each arm (fraction of samples <= x). The body of
    the distribution reads well here; the tail reads on the CCDF."""
    names = _series_names(result)
    dists = [(names[a.name], _report._Dist(a.runs), ARM_COLOR[a.name]) for a in result.arms]
    drawn = [t for t in dists if t[1].plottable]
    if not drawn:
        return _report._no_data_png(title, "no histogram recorded (summary form): nothing to plot")
    fig = _report.new_figure()
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
        label = _report._legend_name(name, d)
        if d.overflows:
            label += f"; {100 * d.overflows / d.samples:.2g}% beyond the histogram (curve stops below 1)"
        ax.plot(xs, ys, drawstyle="steps-post", color=color, linewidth=1.6, label=label)
        for key in ("p50_us", "p99_us"):
            p = d.percentile(PERCENTILES[key])
            if p is not None:
                ax.plot([p], [PERCENTILES[key]], marker="o", color=color, markersize=3.5)
    if _report._use_log_x([d for _, d, _ in drawn], with_max=False):
        _report._log_x_axis(ax, lo * 0.9, hi * 1.15)
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
    return _report.figure_png(fig)


def render_runs_png(result: ABResult, metrics: Sequence[str] = ("p999_us", "p99_us"),
                    title: str = "Run values in measuring order") -> bytes:
    """One point per run in the order measured (A and B coloured), one panel per metric, log y: drift over
    the experiment shows as a trend shared by both arms; a censored run is drawn as a triangle at its bound."""
    seq = run_sequence(result)
    if not seq:
        return _report._no_data_png(title, "no runs")
    fig = _report.new_figure(8.0, 2.3 * len(metrics) + 0.6)
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
            pts, cens = [], []
            for x, (name, _, res) in zip(xs, seq, strict=True):
                if name != arm:
                    continue
                v, c = _report._run_value(res, metric)
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
    return _report.figure_png(fig)


# ------------------------------------------------------------------------------------------------ HTML


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
        tds = "".join(f'<td class="{"l" if i == 0 else "n"}" data-col="{_report._e(h)}">{_report._e(c)}</td>'
                      for i, (h, c) in enumerate(zip(head, cells, strict=False)))
        rows.append(f'<tr data-metric="{e.metric}">{tds}'
                    f'<td class="l" data-col="verdict"><span class="verdict {cls}" '
                    f'data-verdict="{_report._e(e.verdict)}">{_report._e(e.verdict)}</span></td></tr>')
    return ('<table class="summary"><tr>' + "".join(f'<th class="l">{_report._e(h)}</th>' for h in head)
            + "</tr>" + "".join(rows) + "</table>"
            '<p class="meta">Medians over runs, in us. B \u2212 A &gt; 0 and Cliff\'s \u03b4 &gt; 0 mean B has the '
            "higher latency (worse). Interval: percentile bootstrap over runs within each arm "
            f"({first.resamples} resamples, seed {first.seed}). Cliff's \u03b4 = P(B &gt; A) \u2212 P(B &lt; A) "
            "over pairs of runs; magnitude after Romano et al. (|\u03b4| &lt; 0.147 negligible, &lt; 0.33 small, "
            "&lt; 0.474 medium, else large). HL shift: median of the pairwise differences B \u2212 A. Pooled: the "
            "percentile of all samples of the arm together (no claim is made on it).</p>")


def _runs_table(result: ABResult) -> str:
    keys = ("samples", "avg_us", "p99_us", "p999_us", "max_us", "overflows")
    head = ("#", "arm", "run", "profile", "started", *(_report.METRIC_LABEL[k] for k in keys))
    profiles = result.profiles
    rows = []
    for n, (arm, i, res) in enumerate(run_sequence(result), 1):
        a = res.all
        limit = _report._histogram_limit(res)
        texts = {k: _report._fmt_value(k, getattr(a, k), overflows=a.overflows, limit=limit,
                                       has_hist=a.histogram is not None)[0] for k in keys}
        cells = "".join(f'<td data-metric="{k}">{_report._e(texts[k])}</td>' for k in keys)
        rows.append(f'<tr data-row="{arm}/{i}"><td>{n}</td><td class="l" style="color:{ARM_COLOR[arm]}">'
                    f'<b>{arm}</b></td><td>{i}</td><td class="l">{_report._e(profiles[arm])}</td>'
                    f'<td class="l">{_report._e(_report._fmt_time(res.started_at))}</td>{cells}</tr>')
    return ('<table class="figures"><tr>' + "".join(f'<th class="l">{_report._e(h)}</th>' for h in head)
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
        rows.append(f'<tr><td class="l">{_report._e(key)}</td><td class="l">{_report._e(text)}</td></tr>')
    return '<table class="conditions">' + "".join(rows) + "</table>"


_CSS = """
.verdict.shown { background: #2c4f8a; } td.n { font-variant-numeric: tabular-nums; white-space: nowrap; }
ul.notes li { margin: 0.25em 0; }
"""


def render_ab_html(result: ABResult, path: Path) -> Path:
    """Write the experiment as one self-contained HTML file (plots as base64 PNG data URIs, inline CSS)."""
    e = _report._e
    a, b = result.arm("A"), result.arm("B")
    title = f"A/B on {result.unit}: {a.profile} (A) vs {b.profile} (B)"
    sides = {f"A ({a.profile})": a.runs, f"B ({b.profile})": b.runs}
    when = ""
    if result.started is not None:
        when = f"; {_report._fmt_time(result.started)} to {_report._fmt_time(result.ended)}"
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
    dists = [(name, _report._Dist(runs)) for name, runs in sides.items()]
    body.append("<h2>Distributions (all threads, pooled over the runs of each arm)</h2>")
    body.append(_report._overflow_warning(dists))
    with _arm_colors({name: ARM_COLOR[name[0]] for name in sides}):
        body.append(_report.img_tag(_report.render_histogram_png(sides, "Latency histogram, A vs B"),
                                 "histogram A vs B"))
        body.append(_report.img_tag(render_cdf_png(result, "Latency CDF, A vs B"), "CDF A vs B"))
        body.append(_report.img_tag(_report.render_ccdf_png(sides, "Latency tail (1 - CDF), A vs B"),
                                 "tail (complementary CDF) A vs B"))
    body.append("<h2>Runs in measuring order</h2>")
    body.append(_report.img_tag(render_runs_png(result), "p99.9 and p99 per run in measuring order"))
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
        body.append("<h3>Each run was measured under</h3>" + _report._conditions_table(labeled))
    created = datetime.now(UTC).isoformat(timespec="seconds")
    doc = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
           f"<title>{e(title)}</title><style>{_report._CSS}{_CSS}</style></head><body>\n"
           + "\n".join(body) + f'\n<p class="meta">rendered {e(created)}</p>\n</body></html>\n')
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)  # `--html new/dir/r.html`, checked writable up front
    path.write_text(doc, encoding="utf-8")
    return path
