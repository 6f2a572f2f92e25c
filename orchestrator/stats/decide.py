"""Keep or roll back one tuning change, on the evidence of repeated cyclictest runs before and after it.

The experimental unit is the **run** (one cyclictest invocation of `run_duration_s`). Each run gives one value
per metric (`result.all.<metric>`: its exact histogram percentile, or its max). Runs differ from each other far
more than the samples inside one run suggest (host activity, cache and timer state, interrupts that land in one
run and not the next), so the samples of a run are *not* independent replicates of the change: pooling the
histograms of k runs and bootstrapping samples would treat 10^5 correlated samples as 10^5 independent ones
and give confidence intervals far too narrow (pseudo-replication). Everything below therefore works on the k
run-level values per side; the run-to-run spread is exactly the noise the change has to beat.

Why the median of run-level values and not the percentile of the pooled histogram: a pooled percentile with
runs (not samples) resampled would be honest too, but the pooled tail is dominated by whichever run had the
most spikes: one wild run (a cron job, a host hiccup) moves the pooled p99.9 by itself, while it moves the
median of k run-level values by at most one rank. The run-level values are also what an exact rank test
needs (one exchangeable value per run), so the interval and the test judge the same quantity.

The rule, precisely
-------------------
Notation: for a metric m, x_1..x_k are the before values and y_1..y_k the after values (whole microseconds;
0 is read as 1 us, the tool's resolution, so ratios exist). The effect is the relative difference
delta_m = median(after) / median(before) - 1 (negative = lower latency = better). eps = `min_effect`,
tol_g = the guard tolerance of guard metric g, alpha = 1 - `confidence`.

Looks. Runs are taken in interleaved order (`order`, default ABBA blocks: before, after, after, before, ...,
which cancels a linear drift within every block of four) and analysed at L = `looks` planned looks, at
k_1 = `k_min`, ..., k_L = `k_max` runs per side (evenly spaced). Each look gets the error level
alpha_l = alpha / L (Bonferroni alpha spending: the chance that *any* look makes a false claim is at most
alpha, whatever the looks see, so stopping early is honest; it costs a little power against a Pocock or
O'Brien-Fleming boundary and needs no assumption about the correlation between looks). Every one-sided claim
below is made at level alpha_l / 2 (the two-sided interval is at confidence 1 - alpha_l).

A claim "delta_m < c" (after is better than (1+c) x before) is made only when BOTH
  1. the exact one-sided Mann-Whitney rank test of the run-level values, after divided by (1+c) against
     before, rejects "after/(1+c) is not smaller" at level alpha_l/2 (ties count against the claim, which
     keeps the test conservative; the null distribution is the exact one, so the level holds for any run
     distribution and for k as small as 5; the matching Hodges-Lehmann estimate and interval of the ratio are
     reported as `rank_estimate`, `rank_ci_low`..`rank_ci_high`), and
  2. the percentile bootstrap interval (confidence 1 - alpha_l, `bootstrap_resamples` resamples, `seed`) of
     delta_m, resampling runs within each side, lies entirely below c.
"delta_m > c" is the mirror image. The bootstrap interval is the effect size a human reads; the exact rank
test is there because a percentile bootstrap of the median of 5-12 runs under-covers (it can only pick
among the observed values), so requiring both keeps the false-claim rate at or below the exact test's level.

Verdict at a look:
  - **rollback** if the primary is shown worse (delta_p > 0), or any guard is shown to regress beyond its
    tolerance (delta_g > tol_g).
  - **keep** if the primary is shown better (delta_p < 0) and no guard is shown to regress beyond its
    tolerance. (A guard blocks a keep only on evidence: max is one sample per run and its run-to-run spread
    is many times that of p99.9, so demanding proof that max did *not* get worse would block nearly every
    keep; see the defaults below.)
  - otherwise no verdict yet. The measurement stops early when the outcome can no longer change by more than
    the indifference zone: under policy "rollback", once the primary is shown to have no relevant
    improvement (delta_p > -eps: even more runs could at best show an improvement smaller than eps, which the
    rule does not keep); under policy "keep", once no relevant regression is possible (delta_p < +eps and
    every guard delta_g < tol_g shown). Such a stop, and a final look without a verdict, give
    **inconclusive**, and the action is `inconclusive` (the policy): "rollback" by default, because a change
    that does not prove itself is not kept.
A keep or rollback reached at a look is final (the boundary was crossed at the spent level).

Error guarantees (under exchangeable runs on each side, i.e. no drift the interleaving does not cancel):
P(keep | delta_p >= 0) <= alpha/2; P(stop as "no relevant improvement" | delta_p <= -eps) <= alpha/2; a
guard rollback when the guard is within tolerance <= alpha/2 per guard. What is not guaranteed is power: an
improvement of eps that the run-to-run noise hides until k_max ends inconclusive; `decision_bench.py` shows
how often on recorded data.

Overflows. A percentile that falls among the histogram overflows is None in the result (cyclictest only
counts samples beyond the histogram). It is neither dropped nor guessed: it is taken as the lower bound
H = the histogram size (`settings.histogram_us`, else the largest bucket + 1) and flagged. Every in-histogram
value is < H, so the ranks the test uses are right except that censored runs tie with each other (ties count
against every claim, so this can only make a claim harder); medians and ratios that involve a censored run
are lower bounds, and `Decision.metrics[m].censored_*` says how many runs were censored.

Defaults, and why:
  - primary p99.9: the tail a 1 kHz control loop feels every second, yet with >= 10 samples beyond it in a
    20 s run, so it is estimated per run (p99.99 has one or two samples, max has one).
  - guards: max 25%, p99 10%. A guard only acts on evidence (the rank test + bootstrap, at alpha_l), so the
    tolerance is a *relevance* bound, not a noise allowance: noise is the test's job. Max is one sample per
    run and varies several-fold between runs, so only a gross max regression can be shown within k_max runs
    (on the noisy development-machine recordings, run-to-run log-SD of max about 1.2, a regression of about
    3x is shown at k_max = 12 with even odds); 25% is the size of regression the rule still acts on once it
    is shown (a worst case 25% longer eats a real part of a control loop's deadline margin). p99 varies far less
    between runs than the tail, so 10% of it is both relevant and detectable; it catches a change that trades
    the body of the distribution for the tail.
  - eps 5%, confidence 95%, k_min 5 (the smallest k where the exact rank test can reach alpha_l/2 with 3
    looks: 1/C(10,5) = 0.004), k_max 20, 3 looks (at 5, 12, 20 runs per side), runs of 20 s: at most
    800 s of measuring per change. On the lab guest's recorded runs (p99.9 run-to-run log-SD about 0.1-0.15)
    this settles +-30% effects at the first or second look and keeps a non-improvement in about 2% of
    cases, but shows a -10% improvement only about 60% of the time (see `benchmarks/decision_bench.py`);
    more runs buy power at about k ~ 2 * (4 * sd / effect)^2 per side (sd: run-to-run log-SD of the metric).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cache
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from orchestrator.core.errors import InputError
from orchestrator.measure.model import METRIC_LABEL, CyclictestSettings, Int, LatencyResult, LoadSpec, Number

MetricName = Literal["p50_us", "p90_us", "p99_us", "p999_us", "p9999_us", "max_us", "avg_us"]
PERCENTILE_METRICS = ("p50_us", "p90_us", "p99_us", "p999_us", "p9999_us")
Side = Literal["before", "after"]
Verdict = Literal["keep", "rollback", "inconclusive"]
Action = Literal["keep", "rollback"]
Tolerance = Annotated[Number, Field(ge=0.0, le=10.0)]  # 0.25 = 25% worse



_DEFAULT_GUARDS: dict[MetricName, float] = {"max_us": 0.25, "p99_us": 0.10}


class DecisionRule(BaseModel):
    """How one change is judged (see the module docstring for the rule itself)."""

    model_config = ConfigDict(extra="forbid")

    primary: MetricName = "p999_us"
    # guard metric -> relative tolerance: a regression beyond it, once shown, rolls the change back
    guards: dict[MetricName, Tolerance] = Field(default_factory=lambda: _DEFAULT_GUARDS.copy())
    min_effect: Number = Field(0.05, gt=0.0, lt=1.0)  # eps: smaller relative effects are irrelevant
    confidence: Number = Field(0.95, ge=0.5, lt=1.0)  # overall, over all looks (Bonferroni-split)
    k_min: Int = Field(5, ge=2, le=100)  # runs per side at the first look
    k_max: Int = Field(20, ge=2, le=100)  # runs per side at the last look
    looks: Int = Field(3, ge=1, le=20)  # planned analyses (1 = fixed k_max, no early stop)
    order: Literal["ABBA", "ABAB", "blocked"] = "ABBA"  # blocked: one switch per side per look (reboots)
    run_duration_s: Number = Field(20.0, ge=1.0, le=86400.0)  # = cyclictest.duration_s in a plan
    inconclusive: Action = "rollback"  # what is done when the evidence decides nothing
    # each resample draws k_max run indices per side (8 bytes each): 100,000 x 100 x 8 = 80 MB at most
    bootstrap_resamples: Int = Field(2000, ge=200, le=100_000)
    seed: Int = Field(0, ge=0, le=2**63 - 1)

    @model_validator(mode="after")
    def _consistent(self) -> DecisionRule:
        if self.k_min > self.k_max:
            raise ValueError(f"k_min ({self.k_min}) is larger than k_max ({self.k_max})")
        if self.primary in self.guards:
            raise ValueError(f"the primary metric {self.primary} cannot also be a guard")
        n_looks = len(self.look_schedule())
        if self.looks > 1 and n_looks < self.looks:
            raise ValueError(f"{self.looks} looks do not fit between k_min={self.k_min} and k_max={self.k_max}")
        a = self.alpha_per_look() / 2
        if _u_tail_min(self.k_min, self.k_min) > a:
            raise ValueError(
                f"k_min={self.k_min} runs per side can never show anything at the per-look level "
                f"{a:.4g} (the exact rank test's smallest p-value is 1/C({2 * self.k_min},{self.k_min}) = "
                f"{_u_tail_min(self.k_min, self.k_min):.4g}); raise k_min or lower `looks`")
        return self

    def look_schedule(self) -> list[int]:
        """Runs per side at each planned look: evenly spaced from k_min to k_max."""
        if self.looks == 1 or self.k_min == self.k_max:
            return [self.k_max]
        ks = [round(self.k_min + (self.k_max - self.k_min) * i / (self.looks - 1)) for i in range(self.looks)]
        return sorted(set(ks))

    def alpha_per_look(self) -> float:
        return (1.0 - self.confidence) / len(self.look_schedule())


class BootPolicy(BaseModel):
    """How boot changes are tried. `cmdline: per_target` (default) tries a target's cmdline section as one
    change, i.e. one trial boot for isolcpus+nohz_full+rcu_nocbs together (they belong together, and each trial
    boot costs a reboot per side switch); `per_key` tries each argument alone: finer decisions, more boots."""

    model_config = ConfigDict(extra="forbid")

    cmdline: Literal["per_target", "per_key"] = "per_target"


class MeasurementPlan(BaseModel):
    """`playbooks/measurement.yaml`: how each run is measured, and how the runs are judged."""

    model_config = ConfigDict(extra="forbid")

    cyclictest: CyclictestSettings
    load: LoadSpec
    decision: DecisionRule = Field(default_factory=DecisionRule)
    boot: BootPolicy = Field(default_factory=BootPolicy)

    @field_validator("decision")
    @classmethod
    def _same_duration(cls, decision: DecisionRule, info: ValidationInfo) -> DecisionRule:
        """Runs are judged as runs of `run_duration_s`: the plan's runs must be exactly that long."""
        cyclictest = info.data.get("cyclictest")
        if cyclictest is not None and abs(cyclictest.duration_s - decision.run_duration_s) > 1e-9:
            raise ValueError(f"run_duration_s ({decision.run_duration_s:g}) must be the same as "
                             f"cyclictest.duration_s ({cyclictest.duration_s:g})")
        return decision


class MetricComparison(BaseModel):
    model_config = ConfigDict(extra="forbid")

    metric: MetricName
    role: Literal["primary", "guard"]
    tolerance: float | None = None  # guards: the relative regression that counts
    before_median_us: float
    after_median_us: float
    before_median_is_lower_bound: bool = False  # the median involves a run censored by histogram overflow
    after_median_is_lower_bound: bool = False
    rel_diff: float  # median(after) / median(before) - 1; negative = better
    ci_low: float  # bootstrap percentile interval of rel_diff at the look's confidence
    ci_high: float
    rank_estimate: float  # Hodges-Lehmann estimate of the ratio - 1
    # interval from inverting the exact rank test (may be -1 / inf when k is tiny; JSON has no infinity, so the
    # JSON forms of a Decision show an infinite bound as null: "unbounded")
    rank_ci_low: float
    rank_ci_high: float
    censored_before: int = 0  # runs whose value fell among the overflows (taken as the histogram size)
    censored_after: int = 0
    finding: Literal["better", "worse", "no relevant improvement", "no relevant regression", "regressed",
                     "within tolerance", "not shown"]


class Decision(BaseModel):
    model_config = ConfigDict(extra="forbid")

    verdict: Verdict
    action: Action
    final: bool  # False: an interim look that asks for more runs (verdict is then "inconclusive")
    stopped_early: bool
    look: int  # 1-based
    looks_planned: int
    confidence_per_look: float  # 1 - alpha_l: the level of every interval reported here
    runs_before: int
    runs_after: int
    measuring_time_s: float
    metrics: dict[str, MetricComparison]
    reason: str


# --------------------------------------------------------------------------------------------- statistics


@cache
def _u_sf(m: int, n: int) -> np.ndarray:
    """sf[s] = P(U >= s) for the Mann-Whitney count U of m x n pairs under the null (no ties), s = 0..mn+1."""
    # counts of arrangements with U = u are the coefficients of the Gaussian binomial [m+n choose m]_q
    prev = [np.ones(1) for _ in range(n + 1)]  # prev[j]: polynomial for (i-1, j); i = 0: all ones
    for i in range(1, m + 1):
        cur = [np.ones(1) for _ in range(n + 1)]  # cur[0]; cur[1..n] are computed below
        for j in range(1, n + 1):
            a = prev[j]  # (i-1, j) shifted by j
            b = cur[j - 1]  # (i, j-1)
            out = np.zeros(i * j + 1)
            out[j:j + len(a)] += a
            out[:len(b)] += b
            cur[j] = out
        prev = cur
    counts = prev[n]
    p = counts / counts.sum()
    sf = np.concatenate([np.cumsum(p[::-1])[::-1], [0.0]])
    return np.asarray(sf, dtype=float)


def _u_tail_min(m: int, n: int) -> float:
    return 1.0 / math.comb(m + n, m)


def _crit(m: int, n: int, a: float) -> int:
    """Smallest s with P(U >= s) <= a (mn + 1 when no count can reach the level)."""
    sf = _u_sf(m, n)
    ok = np.nonzero(sf <= a + 1e-15)[0]
    return int(ok[0]) if len(ok) else m * n + 1


def _log_diffs(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.asarray((np.log(y)[None, :] - np.log(x)[:, None]).ravel(), dtype=float)


def _rank_claims(d: np.ndarray, m: int, n: int, a: float, bound: float) -> tuple[bool, bool]:
    """(after < (1+bound) before shown, after > (1+bound) before shown) at one-sided level a each."""
    s = _crit(m, n, a)
    t = math.log1p(bound)
    below = int(np.count_nonzero(d < t - 1e-12))  # ties count against the claim
    above = int(np.count_nonzero(d > t + 1e-12))
    return below >= s, above >= s


def _rank_interval(d: np.ndarray, m: int, n: int, a: float) -> tuple[float, float, float]:
    """Hodges-Lehmann estimate and the interval from inverting the exact test, as relative differences."""
    ds = np.sort(d)
    est = math.expm1(float(np.median(ds)))
    s = _crit(m, n, a)
    if s > m * n:
        return est, -1.0, math.inf
    return est, math.expm1(float(ds[m * n - s])), math.expm1(float(ds[s - 1]))


def _bootstrap(x: np.ndarray, y: np.ndarray, a: float, resamples: int, rng: np.random.Generator
               ) -> tuple[float, float]:
    """Percentile bootstrap interval (a, 1-a) of median(y)/median(x) - 1, runs resampled within each side."""
    bx = np.median(x[rng.integers(0, len(x), size=(resamples, len(x)))], axis=1)
    by = np.median(y[rng.integers(0, len(y), size=(resamples, len(y)))], axis=1)
    r = by / bx - 1.0
    lo, hi = np.quantile(r, [a, 1.0 - a])
    return float(lo), float(hi)


# ------------------------------------------------------------------------------------------ run values


def _histogram_size(res: LatencyResult) -> int:
    if res.settings is not None:
        return res.settings.histogram_us
    if res.all.histogram:
        return max(res.all.histogram) + 1
    if res.all.max_us is not None:  # nothing better known: the max is above every bucket anyway
        return res.all.max_us
    raise InputError("a run has a percentile among the histogram overflows but neither its histogram size "
                     "(settings) nor its histogram is known, so not even a lower bound can be given")


def run_values(results: list[LatencyResult], metric: str, side: str) -> tuple[np.ndarray, np.ndarray]:
    """One value per run (float us, >= 1) and a mask of runs censored by overflow (value = lower bound)."""
    vals, cens = [], []
    for i, res in enumerate(results, 1):
        v = getattr(res.all, metric)
        censored = False
        if v is None:
            if metric in PERCENTILE_METRICS and res.all.overflows > 0:
                v, censored = _histogram_size(res), True
            elif metric in PERCENTILE_METRICS and res.all.histogram is None:
                raise InputError(f"{side} run {i} has no {metric}: its result has no histogram (summary form); "
                                 f"measure with a histogram (-h/--json) to decide on percentiles")
            else:
                raise InputError(f"{side} run {i} has no {metric} ({res.all.samples} samples)")
        vals.append(max(float(v), 1.0))
        cens.append(censored)
    return np.asarray(vals), np.asarray(cens, dtype=bool)


def median_is_bound(vals: np.ndarray, cens: np.ndarray) -> bool:
    """True when a censored value is at or below the median position (so the median is only a lower bound)."""
    if not cens.any():
        return False
    k = len(vals)
    order = np.argsort(vals, kind="stable")
    mid = order[(k - 1) // 2: k // 2 + 1]
    return bool(cens[mid].any())


def _check_comparable(before: list[LatencyResult], after: list[LatencyResult]) -> None:
    runs = before + after
    settings = {r.settings.model_dump_json(exclude={"duration_s"}) for r in runs if r.settings is not None}
    if len(settings) > 1:
        raise InputError("the runs were measured with different cyclictest settings; before and after are only "
                         "comparable under the same settings")
    loads = {r.load.model_dump_json() for r in runs if r.load is not None}
    if len(loads) > 1:
        raise InputError("the runs were measured under different loads; before and after are only comparable "
                         "under the same load")
    targets = {r.target for r in runs if r.target is not None}
    if len(targets) > 1:
        raise InputError(f"the runs come from different targets: {', '.join(sorted(targets))}")


def _run_time(res: LatencyResult, rule: DecisionRule) -> float:
    if res.duration_s is not None:
        return res.duration_s
    if res.settings is not None:
        return res.settings.duration_s
    return rule.run_duration_s


# ------------------------------------------------------------------------------------------- decision


def _pct(x: float) -> str:
    if math.isinf(x):
        return "+inf" if x > 0 else "-inf"
    return f"{x * 100:+.1f}%"


def decide(before: list[LatencyResult], after: list[LatencyResult], rule: DecisionRule | None = None, *,
           look: int = 1, looks_planned: int = 1, final: bool = True) -> Decision:
    """Judge one change from its before and after runs (see the module docstring for the rule).

    Called on its own it is one analysis at the rule's full confidence. `SequentialDecision` calls it at each
    planned look with `look`/`looks_planned`, so each look uses alpha / looks_planned, and `final=False` on
    interim looks (no verdict then means: measure more)."""
    rule = rule or DecisionRule()
    if len(before) < 2 or len(after) < 2:
        raise InputError(f"need at least 2 runs per side to judge a change (got {len(before)} before, "
                         f"{len(after)} after)")
    if not 1 <= look <= looks_planned:
        raise InputError(f"look {look} is outside 1..{looks_planned}")
    _check_comparable(before, after)
    alpha_l = (1.0 - rule.confidence) / looks_planned
    a = alpha_l / 2
    m, n = len(before), len(after)
    eps = rule.min_effect

    metrics: dict[str, MetricComparison] = {}
    shown: dict[str, dict[str, bool]] = {}
    roles: list[tuple[MetricName, Literal["primary", "guard"], float]] = [(rule.primary, "primary", 0.0)]
    roles += [(g, "guard", t) for g, t in rule.guards.items()]  # a primary's tolerance is never read
    for idx, (metric, role, tol) in enumerate(roles):
        x, cx = run_values(before, metric, "before")
        y, cy = run_values(after, metric, "after")
        d = _log_diffs(x, y)
        rng = np.random.default_rng([rule.seed, look, idx])
        lo, hi = _bootstrap(x, y, a, rule.bootstrap_resamples, rng)
        est, rlo, rhi = _rank_interval(d, m, n, a)

        # delta < c shown by both the rank test and the bootstrap
        def below(c: float, d: np.ndarray = d, hi: float = hi) -> bool:
            return _rank_claims(d, m, n, a, c)[0] and hi < c

        def above(c: float, d: np.ndarray = d, lo: float = lo) -> bool:
            return _rank_claims(d, m, n, a, c)[1] and lo > c

        if role == "primary":
            s = {"better": below(0.0), "worse": above(0.0), "irrelevant": above(-eps),
                 "no_rel_regression": below(eps)}
            finding = ("better" if s["better"] else "worse" if s["worse"] else
                       "no relevant improvement" if s["irrelevant"] else
                       "no relevant regression" if s["no_rel_regression"] else "not shown")
        else:
            s = {"regressed": above(tol), "within": below(tol)}
            finding = "regressed" if s["regressed"] else "within tolerance" if s["within"] else "not shown"
        shown[metric] = s
        med_x, med_y = float(np.median(x)), float(np.median(y))
        metrics[metric] = MetricComparison(
            metric=metric, role=role, tolerance=tol, before_median_us=med_x, after_median_us=med_y,
            before_median_is_lower_bound=median_is_bound(x, cx), after_median_is_lower_bound=median_is_bound(y, cy),
            rel_diff=med_y / med_x - 1.0, ci_low=lo, ci_high=hi, rank_estimate=est, rank_ci_low=rlo,
            rank_ci_high=rhi, censored_before=int(cx.sum()), censored_after=int(cy.sum()), finding=finding)

    p = shown[rule.primary]
    regressed = [g for g in rule.guards if shown[g]["regressed"]]
    stop_reason = ""
    if p["worse"] or regressed:
        verdict: Verdict = "rollback"
    elif p["better"]:
        verdict = "keep"
    else:
        verdict = "inconclusive"
        if rule.inconclusive == "rollback" and p["irrelevant"]:
            stop_reason = "irrelevant"
        elif rule.inconclusive == "keep" and p["no_rel_regression"] and all(shown[g]["within"] for g in rule.guards):
            stop_reason = "harmless"
    is_final = final or verdict != "inconclusive" or bool(stop_reason)
    action: Action = rule.inconclusive if verdict == "inconclusive" else verdict
    runs_time = sum(_run_time(r, rule) for r in before + after)

    reason = _reason(rule, metrics, verdict, action, is_final, stop_reason, regressed, m, n, 1 - alpha_l,
                     look, looks_planned)
    return Decision(verdict=verdict, action=action, final=is_final, stopped_early=is_final and look < looks_planned,
                    look=look, looks_planned=looks_planned, confidence_per_look=1 - alpha_l, runs_before=m,
                    runs_after=n, measuring_time_s=runs_time, metrics=metrics, reason=reason)


def _describe(c: MetricComparison) -> str:
    lb_b = ">=" if c.before_median_is_lower_bound else ""
    lb_a = ">=" if c.after_median_is_lower_bound else ""
    text = (f"{METRIC_LABEL[c.metric]} {lb_b}{c.before_median_us:g} -> {lb_a}{c.after_median_us:g} us "
            f"({_pct(c.rel_diff)}, CI {_pct(c.ci_low)}..{_pct(c.ci_high)})")
    if c.censored_before or c.censored_after:
        text += (f" [{c.censored_before} before / {c.censored_after} after runs beyond the histogram, "
                 f"taken as its size: a lower bound]")
    return text


def _reason(rule: DecisionRule, metrics: dict[str, MetricComparison], verdict: str, action: str, final: bool,
            stop_reason: str, regressed: Sequence[MetricName], m: int, n: int, conf: float, look: int,
            looks: int) -> str:
    prim = metrics[rule.primary]
    head = (f"Look {look}/{looks}, {m} before and {n} after runs of {rule.run_duration_s:g} s, "
            f"intervals at {conf * 100:.2f}% (overall {rule.confidence * 100:g}% split over {looks} look(s)). "
            f"Primary {_describe(prim)}.")
    guards = "; ".join(_describe(metrics[g]) for g in rule.guards)
    if guards:
        head += f" Guards: {guards}."
    if verdict == "rollback":
        why = []
        if prim.finding == "worse":
            why.append(f"{METRIC_LABEL[rule.primary]} is shown worse")
        for g in regressed:
            why.append(f"{METRIC_LABEL[g]} is shown to regress beyond its {rule.guards[g] * 100:g}% tolerance")
        tail = "Rolled back: " + " and ".join(why) + "."
    elif verdict == "keep":
        tail = (f"Kept: {METRIC_LABEL[rule.primary]} is shown better (rank test and bootstrap interval agree) and "
                f"no guard is shown to regress beyond its tolerance.")
    elif not final:
        tail = "Nothing is shown yet at this look: measure more runs."
    elif stop_reason == "irrelevant":
        tail = (f"Inconclusive, stopped: {METRIC_LABEL[rule.primary]} is shown to improve by less than "
                f"{rule.min_effect * 100:g}% at best, so more runs cannot make it a relevant keep; "
                f"policy '{rule.inconclusive}' -> {action}.")
    elif stop_reason == "harmless":
        tail = (f"Inconclusive, stopped: no relevant regression of {METRIC_LABEL[rule.primary]} or any guard "
                f"remains possible; policy '{rule.inconclusive}' -> {action}.")
    else:
        tail = (f"Inconclusive: the runs show neither an improvement nor a regression; "
                f"policy '{rule.inconclusive}' -> {action} (a change that does not prove itself is "
                f"{'not kept' if action == 'rollback' else 'kept unless shown harmful'}).")
    return f"{head} {tail}"


# ---------------------------------------------------------------------------------------- the loop side


class SequentialDecision:
    """Drives the measurement of one change: which side to measure next, and when to stop.

        seq = SequentialDecision(rule)
        while (side := seq.next_side()) is not None:
            ensure_change_state(applied=(side == "after"))   # the caller applies / reverts the change
            seq.add(side, measure_one_run())
        decision = seq.decision

    Order: ABBA (default) = before, after, after, before, ... (every even prefix is balanced and a linear drift
    cancels in each block of four); ABAB; blocked = at each look all missing runs of one side, then of the
    other, the first side alternating between looks (at most two switches per look: for changes that need a
    reboot). Looks happen when both sides reach the look's k; early stopping is the Bonferroni-spent
    group-sequential rule of the module docstring, so stopping early does not raise the error rates.
    """

    def __init__(self, rule: DecisionRule | None = None):
        self.rule = rule or DecisionRule()
        self.schedule = self.rule.look_schedule()
        self.runs: dict[str, list[LatencyResult]] = {"before": [], "after": []}
        self.sequence: list[str] = []  # sides in the order measured
        self.history: list[Decision] = []
        self._look = 0  # index into schedule of the next look

    @property
    def done(self) -> bool:
        return bool(self.history) and self.history[-1].final

    @property
    def decision(self) -> Decision | None:
        """The latest analysis (final once `done`)."""
        return self.history[-1] if self.history else None

    def _target(self) -> int:
        return self.schedule[self._look]

    def next_side(self) -> Side | None:
        if self.done:
            return None
        k = self._target()
        nb, na = len(self.runs["before"]), len(self.runs["after"])
        need = {"before": k - nb, "after": k - na}
        order = self.rule.order
        if order == "blocked":
            first: Side
            second: Side
            first, second = ("before", "after") if self._look % 2 == 0 else ("after", "before")
            return first if need[first] > 0 else second
        if order == "ABAB":
            side = "before" if nb <= na else "after"
        else:
            side = "before" if "ABBA"[(nb + na) % 4] == "A" else "after"
        if need[side] <= 0:
            side = "after" if side == "before" else "before"
        return side  # type: ignore[return-value]

    def add(self, side: Side, result: LatencyResult) -> Decision | None:
        """Record one run; returns the analysis when this run completed a look, else None."""
        if self.done:
            raise InputError("this change is already decided; no more runs are needed")
        if side not in ("before", "after"):
            raise InputError(f"side must be 'before' or 'after', not {side!r}")
        self.runs[side].append(result)
        self.sequence.append(side)
        k = self._target()
        if min(len(self.runs["before"]), len(self.runs["after"])) < k:
            return None
        last = self._look == len(self.schedule) - 1
        d = decide(self.runs["before"], self.runs["after"], self.rule, look=self._look + 1,
                   looks_planned=len(self.schedule), final=last)
        self.history.append(d)
        if not d.final:
            self._look += 1
        return d
