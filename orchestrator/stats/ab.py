"""A/B experiments: two tuning profiles on one unit, measured in interleaved rounds and compared honestly.

`tune ab PROFILE_A PROFILE_B --unit U` applies profile A or B on a unit and runs cyclictest; this module is the
part that touches no unit: the schedule, the statistics and the result models (its HTML report is
orchestrator/report/ab.py).

The unit of analysis is the **run** (one cyclictest invocation), exactly as in `orchestrator.stats.decide`: the
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

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from orchestrator.core import jsonio
from orchestrator.core.errors import InputError
from orchestrator.core.validation import validation_problems
from orchestrator.measure.model import PERCENTILES, LatencyResult
from orchestrator.measure.pooled import PooledRuns
from orchestrator.stats.decide import _u_sf, median_is_bound, run_values

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
#: The largest A/B result file read (every run of both arms, histograms included): as a report's limit.
MAX_AB_BYTES = 256 * 2**20


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
        own: dict[str, str] = {a.name: a.profile for a in self.arms}
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
            if self.order == [arm for arm in ab_schedule(self.rounds, design) for _ in range(k)]:
                return design
        return None

    def effect(self, metric: str) -> MetricEffect:
        for e in self.effects:
            if e.metric == metric:
                return e
        raise KeyError(metric)


# ------------------------------------------------------------------------------------------------ statistics


def cliffs_delta(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
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


def hodges_lehmann(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
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
        avgs = [r.all.avg_us for r in runs]
        total = sum(r.all.samples for r in runs)
        if any(v is None for v in avgs) or not total:
            return None, False
        return sum((v or 0.0) * r.all.samples for v, r in zip(avgs, runs, strict=True)) / total, False
    d = PooledRuns(runs)
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
            ratio_ci_low=float(rlo), ratio_ci_high=float(rhi), confidence=confidence, resamples=resamples, seed=seed,
            rank_p_value=p,
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
        raise InputError(f"not a valid A/B result: {validation_problems(exc)}") from None


# ------------------------------------------------------------------------------------------------ JSON


def save_ab(result: ABResult, path: Path) -> Path:
    """Write the result as JSON (what `load_ab` reads back)."""
    path = Path(path)
    path.write_text(result.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return path


def load_ab(path: Path) -> ABResult:
    """Read an `ABResult` JSON written by `save_ab`; InputError naming the file otherwise."""
    path = Path(path)
    doc = jsonio.read_json(path, what="A/B result", max_bytes=MAX_AB_BYTES,
                           expected="expected an A/B result as written by save_ab")
    try:
        return ABResult.model_validate(doc)
    except ValidationError as exc:
        raise InputError(f"{path}: not an A/B result as written by save_ab: "
                         f"{validation_problems(exc)}") from None


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


# ------------------------------------------------------------------------------------------------ plots


# ------------------------------------------------------------------------------------------------ HTML


