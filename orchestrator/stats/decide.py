"""Keep or roll back one tuning change, on the evidence of repeated cyclictest runs before and after it.

The experimental unit is the **run** (one cyclictest invocation of `run_duration_s`), or the **boot** for a change
that needs a reboot. Each run gives one value per metric (`result.all.<metric>`: its exact histogram percentile,
or its max). Runs differ from each other far more than the samples inside one run suggest (host activity, cache
and timer state, interrupts that land in one run and not the next), so the samples of a run are *not*
independent replicates of the change: pooling the histograms of k runs and bootstrapping samples would treat
10^5 correlated samples as 10^5 independent ones (pseudo-replication). Everything below works on one value per
unit; the unit-to-unit spread is exactly the noise the change has to beat. For the same reason the runs of one
boot are not independent replicates of a boot change: boots differ (memory layout, device and timer state,
which CPU got which IRQ), and a boot change is only replicated by booting it again.

The rule, precisely
-------------------
Notation: x_1..x_m are the before values and y_1..y_n the after values of a metric (whole microseconds; 0 is
read as 1 us, the tool's resolution, so ratios exist). delta = median(after) / median(before) - 1 (negative =
lower latency = better). eps = `min_effect`; alpha = 1 - `confidence`; alpha_g = 1 - `guard_confidence`
(default: = alpha); beta = 1 - `power`; tol_g the tolerance of guard g; r = `mechanism_min_reduction`.

The test. Every latency claim is the exact one-sided Mann-Whitney rank test of the unit values: "y/(1+c) is
smaller than x" is shown at a look when the number of pairs (i, j) with y_j < (1+c) x_i is at least that look's
critical count for the claim (ties count against the claim, which keeps the test conservative; the null law is
the exact one, so it holds for any run distribution and any k). "y/(1+c) is larger" is the mirror image.

Looks (runtime changes, order ABBA or ABAB). Runs come in blocks of four, each ABBA or BAAB at random (`seed`;
the seed and the realised order are in the Decision): every block is balanced and cancels a linear drift
within it, and the random choice keeps a periodic disturbance from lining up with one side. Looks are at
k = k_min, k_min + `look_every`, ... runs per side up to K (the last look always at K), with information
fraction t = k / K. (`looks`, kept for old playbooks: 1 = a single analysis at K; n > 1 = looks every
ceil((k_max - k_min) / (n - 1)) runs per side, overriding `look_every`.)

Error spending. Each claim family has a one-sided error budget, spent over the looks with the Hwang-Shih-DeCani
function a(t) = A (1 - exp(-gamma t)) / (1 - exp(-gamma)), gamma = `spending_gamma` (default -4: little is
spent early, close to O'Brien-Fleming, so the last look keeps nearly the level of a single analysis. Simulated
with lognormal runs and K estimated as below, 300 sequences each: at log-SD 0.12, where K = 40 is enough, the
power at -10% is 98-99% for gamma -4 .. -1 and gamma -1 saves 3 runs per side on average (19 vs 22); at log-SD
0.18, where the cap binds, gamma -4 has 83% power at -10% against 74% for -2 and -1 at the same mean length.
Power where it is short matters more than 3 runs where it is not.)

Look j's critical count c_j is the smallest count such that P(a claim at some look <= j) <= a(t_j) under
the null: exactly at the first look (the exact law of one count), and for later looks from the joint law
of the counts at all looks, which under the null depends on nothing but the ranks and is computed once on
40,000 fixed-seed null sequences; c_j is chosen so that the estimate plus two Monte Carlo standard errors stays
within a(t_j). A look whose level the discrete test cannot reach (e.g. 6 runs per side at t = 0.15) spends
nothing and leaves its share to the later looks. The families:
  - keep on latency (path 1): "primary better" (c = 0), budget A1;
  - keep on mechanism (path 2): "primary not worse than +eps" (c = eps, the non-inferiority margin), budget A2,
    and a targeted mechanism shown reduced (below), budget A2 spent over looks by Bonferroni of the
    increments a(t_j) - a(t_{j-1}) and split equally over the declared mechanisms;
  - rollback: "primary worse" (c = 0), budget alpha; each guard "worse by more than tol_g", budget alpha_g /
    number of guards;
  - futility (non-binding): "the improvement is less than eps" (y/(1-eps) larger than x), budget beta.
A1 + A2 = alpha: A2 = `mechanism_share` x alpha when path 2 is usable (`keep_on: latency_or_mechanism`, the
change declares mechanisms, and the exact test can reach A2 at K), else A1 = alpha, A2 = 0. The split is fixed
before the first look.

Verdict at a look:
  - **rollback** if the primary is shown worse or a guard is shown to regress beyond its tolerance
    (`rolled_back_on: latency`), or, with `keep_on: latency_or_mechanism` and the primary not shown better, if
    a targeted mechanism is shown increased at the rollback level alpha / number of mechanisms, at the last
    look or once an improvement of eps is shown out of reach (`rolled_back_on: mechanism`: the change feeds
    the very source of latency it claims to remove, e.g. moves a device's interrupts onto the RT CPU; the tail
    may not show it in a short measurement, the counts do);
  - **keep** (`kept_on: latency`) if the primary is shown better, or (`kept_on: mechanism`) if the primary is
    shown not worse than +eps and at least one targeted mechanism is shown reduced; either only when no guard
    is shown to regress;
  - **futility stop**: under policy `inconclusive: rollback`, once the primary is shown to improve by less
    than eps and path 2 is out of reach (not usable, the primary shown worse than +eps, or every mechanism
    shown "not reduced"); under policy `keep`, once the primary is shown not worse than +eps and every guard
    shown within its tolerance, all at the futility level (nothing relevant is left to find). The futility
    boundary is non-binding: the keep and rollback counts are computed as if it did not exist, so their error
    rates hold whether or not a futility stop is taken;
  - otherwise measure on; at the last look, or at a futility stop, **inconclusive**, and the action is the
    playbook's `inconclusive` policy ("rollback" by default: a change that does not prove itself is not kept).
A keep or rollback reached at a look is final.

K, the maximum runs per side, from a power analysis. K = min(K_power, K_cap) with K_cap = min(`k_max`,
floor(`max_time_s` / `run_duration_s` / 2)) and K_power = `runs_for_power(sd, eps, A1, power, ...)` (see
`orchestrator.stats.sequential`): the smallest K at which the keep boundary shows an improvement of eps with
probability `power`, in the normal approximation n_fixed x R, n_fixed = 2 (pi/3) sd^2 (z_{1-A1} + z_power)^2 /
log(1 - eps)^2 (pi/3: the rank test's efficiency against the t-test on normal data), R the inflation of the looks
(about 1.02 for gamma = -4). sd is the run-to-run SD of log(primary): the stored noise profile of the unit when
given (`noise_sd`), else estimated at the first look from its 2 k_min runs, pooled over both sides (the side-blind
SD, not the within-side SD: under the null it is independent of the ranks the first look tests, so choosing K from
it does not bias that look), rounded up to 2 significant digits. `power_at_min_effect` is the power the rule had
at eps with the K actually used; when the cap binds, `power_note` says by how much it falls short and which cap
bound. The power is that of the latency keep boundary (path 1) as if futility stops were never taken (the usual
convention for a non-binding boundary; they can take at most beta of it away); path 2 is not in K's sizing.

Mechanisms. `add(side, result, rates)` gives each run's rate (events per second) of the mechanisms the change
targets; all are expected to go down. A mechanism is compared as the ratio after/before of rates over units
(runs, or boots), by a Welch t interval on log(rate + c), c = one event per run (1 / `run_duration_s` per s):
the unit-to-unit variation is the noise, not the Poisson noise of the pooled counts. "Shown reduced" = the
one-sided upper bound of the ratio < 1 - r (default r = 0.5: the mechanisms a tuning change removes move by
orders of magnitude, a halving is the least that is clearly the change and not drift between runs, and it
keeps a modest real reduction from carrying a keep on its own). Runs whose rate is None (a counter reset by a
reboot, or absent on the kernel) are left out; fewer than 2 valid units a side: "not available".

Latency not applicable (`latency_applicable=False`: a host change measured in a guest that does not run on that
host). Latency is computed and reported, marked not applicable, and does not decide: keep iff a mechanism is
shown reduced (budget alpha, Bonferroni over looks and mechanisms); rollback iff one is shown increased (its
lower bound above 1 / (1 - r), budget alpha); stop when every mechanism is shown "not reduced" (at once when
the change declares none); else inconclusive -> policy. The false-keep guarantee is then alpha for "some
declared mechanism reduced below 1 - r"; nothing is claimed about latency.

Boots (order "blocked", for boot changes). `boots_per_side` boots per side (default 3) of `runs_per_boot` runs, in
the balanced order F S S F F S ... (first side F random from the seed); `next_step()` says when the next run must
come from a new boot. Runs are grouped by `LatencyResult.boot_id` (the planned boot when it is missing, and the
reason then says that a fresh boot was not checked); each boot's runs give one value per metric (the median of its
runs; a rate: the mean of its runs' log(rate + c)), and the rule above runs once, on the boot values, at the end
(no interim looks: with a handful of boots one analysis is all the error budget affords). The guarantee needs at
least 3 boots per side and 1 / C(2b, b) <= A1 (the exact test can reach the level at all; A1 = alpha unless the
mechanism path is usable with that many boots, i.e. 1 / C(2b, b) <= A2 too). When either fails, `guarantee_holds`
is False, the reason says so, and the rule runs once on the run values, as if the runs were independent (which
ignores the boot-to-boot variation: a keep or rollback then says what the runs show, with no error rate attached).

Error guarantees (runs exchangeable within a side: no drift that the ABBA blocks do not cancel; the mechanism
claims in addition need log(rate + c) per unit close enough to normal for the Welch interval):
  - false keep: P(keep | the primary is not better AND (it is worse than +eps OR no declared mechanism has a
    ratio of geometric means of rate + c below 1 - r)) <= A1 + A2 = alpha. Path 1 is a false claim with
    probability <= A1 when the primary is not better; path 2 is an intersection (non-inferiority AND a
    mechanism), so it is false with probability <= A2 whichever of its two parts is false;
  - false rollback: P(rollback on the primary | the primary is not worse) <= alpha; P(a guard rollback | every
    guard within its tolerance) <= alpha_g;
  - futility: P(a futility stop | the true improvement is at least eps) <= beta.
The spent levels are exact at the first look and up to the Monte Carlo margin (two standard errors held back)
at later looks, when K is fixed in advance (`noise_sd`, or k_min = K_cap). When K is estimated from the first
look's runs the later looks' guarantee is approximate (K depends on the first runs' spread, not on their
ranks; the unit tests check the false-keep rate by simulation). With boots, the guarantee holds only with
`guarantee_holds` True. What is never guaranteed is power: `power_at_min_effect` says what the rule had.

The bootstrap interval (`ci_low`..`ci_high`, percentile, runs resampled within each side, at `confidence`) and
the Hodges-Lehmann interval (`rank_ci_*`, at the look's keep level) are reported for a human to read; no claim
depends on them.

Overflows. A percentile that falls among the histogram overflows is None in the result (cyclictest only
counts samples beyond the histogram). It is neither dropped nor guessed: it is taken as the lower bound H = the
histogram size and flagged. Every in-histogram value is < H, so the ranks are right except that censored runs
tie with each other (ties count against every claim); medians involving a censored run are lower bounds.

Defaults, and why. Looks every 2 runs per side: one ABBA block, so every look is balanced and drift-cancelled.
Primary p99.9 (the tail a 1 kHz loop feels every second, with >= 10 samples beyond it in a 20 s run); guards max
25% and p99 10% (relevance bounds: a guard acts only on evidence); eps 5%, confidence 95%, power 95%, k_min 6 (12
runs for the first spread estimate; fewer make K a guess), k_max 40, runs of 20 s (at most 1600 s of measuring per
change); boots 3 per side of 2 runs. At the lab guest's run-to-run spread (log-SD of p99.9 about 0.1-0.15) a 95%
power at -5% needs far more than 40 runs per side; the Decision says so (`power_note`) rather than pretend.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from orchestrator.core.errors import InputError
from orchestrator.measure.model import METRIC_LABEL, CyclictestSettings, Int, LatencyResult, LoadSpec, Number
from orchestrator.stats.exact import PERCENTILE_METRICS as PERCENTILE_METRICS
from orchestrator.stats.exact import _bootstrap, _crit, _log_diffs, _rank_interval, _u_tail_min
from orchestrator.stats.exact import _u_sf as _u_sf
from orchestrator.stats.exact import median_is_bound as median_is_bound
from orchestrator.stats.exact import run_values as run_values
from orchestrator.stats.mechanism import MechanismComparison, compare
from orchestrator.stats.sequential import fixed_runs, hsd_spent, look_grid, mw_bounds, power_at, runs_for_power

__all__ = [
    "PERCENTILE_METRICS",
    "BootPolicy",
    "Decision",
    "DecisionRule",
    "MeasurementPlan",
    "MechanismComparison",
    "MetricComparison",
    "SequentialDecision",
    "Step",
    "decide",
    "fixed_runs",
    "median_is_bound",
    "power_at",
    "run_values",
    "runs_for_power",
]

MetricName = Literal["p50_us", "p90_us", "p99_us", "p999_us", "p9999_us", "max_us", "avg_us"]
Side = Literal["before", "after"]
Verdict = Literal["keep", "rollback", "inconclusive"]
Action = Literal["keep", "rollback"]
DecidedOn = Literal["latency", "mechanism"]  # the evidence a keep or a rollback rests on
Tolerance = Annotated[Number, Field(ge=0.0, le=10.0)]  # 0.25 = 25% worse

_DEFAULT_GUARDS: dict[MetricName, float] = {"max_us": 0.25, "p99_us": 0.10}


class DecisionRule(BaseModel):
    """How one change is judged (see the module docstring for the rule itself)."""

    model_config = ConfigDict(extra="forbid")

    primary: MetricName = "p999_us"
    # guard metric -> relative tolerance: a regression beyond it, once shown, rolls the change back
    guards: dict[MetricName, Tolerance] = Field(default_factory=lambda: _DEFAULT_GUARDS.copy())
    min_effect: Number = Field(0.05, gt=0.0, lt=1.0)  # eps: smaller relative effects are irrelevant
    confidence: Number = Field(0.95, ge=0.5, lt=1.0)  # 1 - the one-sided false-keep (and false-rollback) rate
    guard_confidence: Annotated[Number, Field(ge=0.5, lt=1.0)] | None = None  # guards' budget; None: confidence
    power: Number = Field(0.95, gt=0.0, lt=1.0)  # wanted at min_effect: sets K and the futility budget
    k_min: Int = Field(6, ge=2, le=100)  # runs per side at the first look
    k_max: Int = Field(40, ge=2, le=100)  # runs per side at most
    look_every: Int = Field(2, ge=1, le=100)  # runs per side between looks
    looks: Int | None = Field(None, ge=1, le=20)  # old playbooks: 1 = one analysis; n = about n looks
    spending_gamma: Number = Field(-4.0, ge=-20.0, le=20.0)  # Hwang-Shih-DeCani parameter
    max_time_s: Annotated[Number, Field(gt=0.0, le=10_000_000.0)] | None = None  # measuring time budget
    order: Literal["ABBA", "ABAB", "blocked"] = "ABBA"  # blocked: boots as units (boot changes)
    boots_per_side: Int = Field(3, ge=1, le=50)
    runs_per_boot: Int = Field(2, ge=1, le=100)
    keep_on: Literal["latency", "latency_or_mechanism"] = "latency_or_mechanism"
    mechanism_min_reduction: Number = Field(0.5, gt=0.0, lt=1.0)  # r: "reduced" = ratio shown below 1 - r
    mechanism_share: Number = Field(0.2, gt=0.0, lt=1.0)  # of the keep budget, for path 2 when usable
    run_duration_s: Number = Field(20.0, ge=1.0, le=86400.0)  # = cyclictest.duration_s in a plan
    inconclusive: Action = "rollback"  # what is done when the evidence decides nothing
    # each resample draws k run indices per side (8 bytes each): 100,000 x 100 x 8 = 80 MB at most
    bootstrap_resamples: Int = Field(2000, ge=200, le=100_000)
    seed: Int = Field(0, ge=0, le=2**63 - 1)

    @model_validator(mode="after")
    def _consistent(self) -> DecisionRule:
        if self.k_min > self.k_max:
            raise ValueError(f"k_min ({self.k_min}) is larger than k_max ({self.k_max})")
        if self.primary in self.guards:
            raise ValueError(f"the primary metric {self.primary} cannot also be a guard")
        cap = self.k_cap()
        if cap < self.k_min:
            raise ValueError(f"max_time_s ({self.max_time_s:g}) allows only {cap} runs per side of "
                             f"{self.run_duration_s:g} s, below k_min ({self.k_min})")
        a1 = self.alpha * (1.0 - self.mechanism_share) if self.keep_on == "latency_or_mechanism" else self.alpha
        if self.order != "blocked":
            if _u_tail_min(cap, cap) > a1:
                raise ValueError(
                    f"k_max={cap} runs per side can never show anything at the keep level {a1:.4g} (the exact "
                    f"rank test's smallest p-value is 1/C({2 * cap},{cap}) = {_u_tail_min(cap, cap):.4g}); "
                    f"raise k_max or lower confidence")
            if _u_tail_min(self.k_min, self.k_min) > a1:
                raise ValueError(
                    f"k_min={self.k_min} runs per side can never show anything, even at the whole keep level "
                    f"{a1:.4g} (the smallest p-value is 1/C({2 * self.k_min},{self.k_min}) = "
                    f"{_u_tail_min(self.k_min, self.k_min):.4g}); raise k_min")
        return self

    @property
    def alpha(self) -> float:
        return 1.0 - self.confidence

    @property
    def alpha_guard(self) -> float:
        return 1.0 - (self.guard_confidence if self.guard_confidence is not None else self.confidence)

    def k_cap(self) -> int:
        """The most runs per side the playbook allows: k_max, and the time budget."""
        if self.max_time_s is None:
            return self.k_max
        return max(1, min(self.k_max, math.floor(self.max_time_s / self.run_duration_s / 2 + 1e-9)))

    def step(self) -> int:
        """Runs per side between looks (`looks`, when given, overrides `look_every`)."""
        if self.looks is not None and self.looks > 1:
            return max(1, math.ceil((self.k_max - self.k_min) / (self.looks - 1)))
        return self.look_every

    def look_schedule(self, k_end: int | None = None) -> list[int]:
        """Runs per side at each look, up to k_end (default: the cap)."""
        k_end = self.k_cap() if k_end is None else k_end
        if self.looks == 1:
            return [k_end]
        return look_grid(min(self.k_min, k_end), k_end, self.step())


class BootPolicy(BaseModel):
    """How boot changes are tried. `cmdline: per_target` (default) tries a target's cmdline section as one
    change, i.e. one trial boot for isolcpus+nohz_full+rcu_nocbs together (they belong together, and each trial
    boot costs a reboot per side switch); `per_key` tries each argument alone: finer decisions, more boots."""

    model_config = ConfigDict(extra="forbid")

    cmdline: Literal["per_target", "per_key"] = "per_target"


RuntimeKindName = Literal["service_disable", "service_enable", "sysctl", "sysfs", "kthreads", "vcpu_pinning",
                          "irqbalance", "irq_affinity"]


class RuntimePolicy(BaseModel):
    """How runtime changes are tried. Each alone by default: its own before and after runs, its own decision.
    `together: [kinds]` makes a target's changes of those kinds one change (a bundle): applied together,
    measured as one, kept or rolled back together, each member's previous state journaled and restored byte for
    byte. For a base profile's small knobs, none of which a short plan could show alone, at the cost of a
    decision per knob."""

    model_config = ConfigDict(extra="forbid")

    together: list[RuntimeKindName] = []


class MeasurementPlan(BaseModel):
    """`playbooks/measurement.yaml`: how each run is measured, and how the runs are judged."""

    model_config = ConfigDict(extra="forbid")

    cyclictest: CyclictestSettings
    load: LoadSpec
    decision: DecisionRule = Field(default_factory=DecisionRule)
    boot: BootPolicy = Field(default_factory=BootPolicy)
    runtime: RuntimePolicy = Field(default_factory=RuntimePolicy)

    @field_validator("decision")
    @classmethod
    def _same_duration(cls, decision: DecisionRule, info: ValidationInfo) -> DecisionRule:
        """Runs are judged as runs of `run_duration_s`: the plan's runs must be exactly that long."""
        cyclictest = info.data.get("cyclictest")
        if cyclictest is not None and abs(cyclictest.duration_s - decision.run_duration_s) > 1e-9:
            raise ValueError(f"run_duration_s ({decision.run_duration_s:g}) must be the same as "
                             f"cyclictest.duration_s ({cyclictest.duration_s:g})")
        return decision


Finding = Literal["better", "worse", "not worse than +eps", "no relevant improvement", "no relevant regression",
                  "regressed", "within tolerance", "not shown"]


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
    ci_low: float  # bootstrap percentile interval of rel_diff at `confidence` (reported, not used)
    ci_high: float
    rank_estimate: float  # Hodges-Lehmann estimate of the ratio - 1
    rank_ci_low: float | None = None  # interval from inverting the exact test at the keep level; None: unbounded
    rank_ci_high: float | None = None
    p_better: float | None = None  # exact one-sided p of "after smaller" (ties against); primary only
    p_worse: float | None = None
    censored_before: int = 0  # units whose value fell among the overflows (taken as the histogram size)
    censored_after: int = 0
    finding: Finding


class Decision(BaseModel):
    model_config = ConfigDict(extra="forbid")

    verdict: Verdict
    action: Action
    final: bool  # False: an interim look that asks for more runs (verdict is then "inconclusive")
    stopped_early: bool
    look: int  # 1-based
    looks_planned: int
    confidence_per_look: float  # 1 - the nominal one-sided level of the latency keep claim at this look
    runs_before: int
    runs_after: int
    measuring_time_s: float
    metrics: dict[str, MetricComparison]
    reason: str
    kept_on: DecidedOn | None = None
    rolled_back_on: DecidedOn | None = None
    mechanisms: dict[str, MechanismComparison] = Field(default_factory=dict)
    levels: dict[str, float] = Field(default_factory=dict)  # one-sided nominal levels used at this look
    power_at_min_effect: float | None = None
    power_note: str | None = None  # the shortfall when a cap bound K
    k_max_used: int | None = None
    sd_log: float | None = None  # run-to-run SD of log(primary) the power analysis used
    sd_source: Literal["noise profile", "first look", "boots"] | None = None
    order_seed: int = 0
    sequence: list[Side] = Field(default_factory=list)
    guarantee_holds: bool = True
    latency_applicable: bool = True
    boots_before: int | None = None
    boots_after: int | None = None


@dataclass(frozen=True)
class Step:
    """The next run: its side, and whether it must come from a boot not measured before (reboot first)."""

    side: Side
    new_boot: bool = False


# ------------------------------------------------------------------------------------------- the analysis


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


def _pct(x: float) -> str:
    if math.isinf(x):
        return "+inf" if x > 0 else "-inf"
    return f"{x * 100:+.1f}%"


def _unit_values(groups: Sequence[Sequence[LatencyResult]], metric: str, side: str
                 ) -> tuple[np.ndarray, np.ndarray]:
    """One value per unit (the median of its runs' values) and whether it is only a lower bound."""
    if all(len(g) == 1 for g in groups):
        return run_values([g[0] for g in groups], metric, side)
    vals, cens = [], []
    for g in groups:
        v, c = run_values(list(g), metric, side)
        vals.append(float(np.median(v)))
        cens.append(median_is_bound(v, c))
    return np.asarray(vals), np.asarray(cens, dtype=bool)


@dataclass(frozen=True)
class _Thresholds:
    """Critical counts of the exact test at one look (count >= c claims) and the mechanism levels."""

    keep: int
    ni: int
    rollback: int
    guard: int
    futility: int
    mech_keep: float  # per mechanism, one-sided
    mech_rollback: float
    mech_futility: float


def _count_below(d: np.ndarray, c: float) -> int:
    return int(np.count_nonzero(d < math.log1p(c) - 1e-12))  # ties count against the claim


def _count_above(d: np.ndarray, c: float) -> int:
    return int(np.count_nonzero(d > math.log1p(c) + 1e-12))


def _unit_rates(groups: Sequence[Sequence[Mapping[str, float | None] | None]], label: str
                ) -> list[list[float | None]]:
    return [[(r or {}).get(label) for r in g] for g in groups]


@dataclass
class _Judgement:
    metrics: dict[str, MetricComparison]
    mechanisms: dict[str, MechanismComparison]
    verdict: Verdict
    kept_on: DecidedOn | None
    rolled_back_on: DecidedOn | None
    stop: str  # "", "futile", "harmless", "mechanism futile"
    regressed: list[MetricName]
    levels: dict[str, float]


def _judge(rule: DecisionRule, before: Sequence[Sequence[LatencyResult]], after: Sequence[Sequence[LatencyResult]],
           rates_before: Sequence[Sequence[Mapping[str, float | None] | None]],
           rates_after: Sequence[Sequence[Mapping[str, float | None] | None]], th: _Thresholds, *,
           declared: Sequence[str], extra_labels: Sequence[str], path2: bool, latency_applicable: bool,
           units: Literal["runs", "boots"], rng_key: int, last: bool = True) -> _Judgement:
    """One analysis of unit-grouped runs (each unit a list of runs) at the given critical counts (`last`: no
    look follows this one)."""
    m, n = len(before), len(after)
    sf = _u_sf(m, n)

    def level(c: int) -> float:
        return float(sf[c]) if c <= m * n else 0.0

    eps = rule.min_effect
    metrics: dict[str, MetricComparison] = {}
    shown: dict[str, dict[str, bool]] = {}
    roles: list[tuple[MetricName, Literal["primary", "guard"], float]] = [(rule.primary, "primary", 0.0)]
    roles += [(g, "guard", t) for g, t in rule.guards.items()]
    keep_level = level(th.keep)
    for idx, (metric, role, tol) in enumerate(roles):
        x, cx = _unit_values(before, metric, "before")
        y, cy = _unit_values(after, metric, "after")
        d = _log_diffs(x, y)
        a_ci = (1.0 - rule.confidence) / 2
        lo, hi = _bootstrap(x, y, a_ci, rule.bootstrap_resamples, np.random.default_rng([rule.seed, rng_key, idx]))
        est, rlo, rhi = _rank_interval(d, m, n, keep_level) if keep_level > 0 else (
            math.expm1(float(np.median(d))), -1.0, math.inf)
        p_better = p_worse = None
        if role == "primary":
            s = {"better": _count_below(d, 0.0) >= th.keep, "worse": _count_above(d, 0.0) >= th.rollback,
                 "ni": _count_below(d, eps) >= th.ni, "futile": _count_above(d, -eps) >= th.futility,
                 "harmless": _count_below(d, eps) >= th.futility, "ni_futile": _count_above(d, eps) >= th.futility}
            p_better = min(1.0, float(sf[_count_below(d, 0.0)]))
            p_worse = min(1.0, float(sf[_count_above(d, 0.0)]))
            finding: Finding = ("better" if s["better"] else "worse" if s["worse"] else
                                "not worse than +eps" if s["ni"] and path2 else
                                "no relevant improvement" if s["futile"] else
                                "no relevant regression" if s["harmless"] else "not shown")
        else:
            s = {"regressed": _count_above(d, tol) >= th.guard, "within": _count_below(d, tol) >= th.futility}
            finding = "regressed" if s["regressed"] else "within tolerance" if s["within"] else "not shown"
        shown[metric] = s
        med_x, med_y = float(np.median(x)), float(np.median(y))
        metrics[metric] = MetricComparison(
            metric=metric, role=role, tolerance=tol if role == "guard" else None, before_median_us=med_x,
            after_median_us=med_y, before_median_is_lower_bound=median_is_bound(x, cx),
            after_median_is_lower_bound=median_is_bound(y, cy), rel_diff=med_y / med_x - 1.0, ci_low=lo,
            ci_high=hi, rank_estimate=est, rank_ci_low=rlo if rlo > -1.0 else None,
            rank_ci_high=rhi if math.isfinite(rhi) else None, p_better=p_better, p_worse=p_worse,
            censored_before=int(cx.sum()), censored_after=int(cy.sum()), finding=finding)

    c = 1.0 / rule.run_duration_s
    mechs: dict[str, MechanismComparison] = {}
    for label in list(declared) + [x for x in extra_labels if x not in declared]:
        ub, ua = _unit_rates(rates_before, label), _unit_rates(rates_after, label)
        mc = compare(label, ub, ua, c=c, level=th.mech_keep, futility_level=th.mech_futility,
                     min_reduction=rule.mechanism_min_reduction, units=units)
        if label not in declared:
            mc = mc.model_copy(update={"finding": "not declared"})
        elif mc.finding not in ("reduced", "not available"):
            up = compare(label, ub, ua, c=c, level=th.mech_rollback, futility_level=th.mech_futility,
                         min_reduction=rule.mechanism_min_reduction, units=units)
            if up.finding == "increased":  # shown at the rollback level
                mc = mc.model_copy(update={"finding": "increased"})
            elif mc.finding == "increased":  # only at the keep level: not a rollback claim
                mc = mc.model_copy(update={"finding": "not shown"})
        mechs[label] = mc
    used = [mechs[x] for x in declared]
    reduced = [mc for mc in used if mc.finding == "reduced"]
    increased = [mc for mc in used if mc.finding == "increased"]
    mech_futile = all(mc.finding == "not reduced" for mc in used)

    p = shown[rule.primary]
    regressed = [g for g in rule.guards if shown[g]["regressed"]]
    kept_on: DecidedOn | None = None
    rolled_back_on: DecidedOn | None = None
    stop = ""
    if not latency_applicable:
        if increased:
            verdict: Verdict = "rollback"
            rolled_back_on = "mechanism"
        elif reduced:
            verdict, kept_on = "keep", "mechanism"
        else:
            verdict = "inconclusive"
            stop = "mechanism futile" if mech_futile else ""
    elif p["worse"] or regressed:
        verdict, rolled_back_on = "rollback", "latency"
    elif p["better"]:
        verdict, kept_on = "keep", "latency"
    elif increased and rule.keep_on == "latency_or_mechanism" and (last or p["futile"]):
        # the latency path has had its chance: this is the last look, or an improvement of min_effect is
        # already shown out of reach
        verdict, rolled_back_on = "rollback", "mechanism"
    elif path2 and p["ni"] and reduced:
        verdict, kept_on = "keep", "mechanism"
    else:
        verdict = "inconclusive"
        path2_out = not path2 or p["ni_futile"] or mech_futile
        if rule.inconclusive == "rollback" and p["futile"] and path2_out:
            stop = "futile"
        elif rule.inconclusive == "keep" and p["harmless"] and all(shown[g]["within"] for g in rule.guards):
            stop = "harmless"
    levels = {"keep_latency": keep_level, "rollback": level(th.rollback), "guard": level(th.guard),
              "futility": level(th.futility)}
    if path2:
        levels |= {"keep_noninferior": level(th.ni), "keep_mechanism": th.mech_keep}
    if not latency_applicable:
        levels = {"keep_mechanism": th.mech_keep, "rollback_mechanism": th.mech_rollback,
                  "futility_mechanism": th.mech_futility}
    return _Judgement(metrics, mechs, verdict, kept_on, rolled_back_on, stop, regressed, levels)


def _describe(c: MetricComparison) -> str:
    lb_b = ">=" if c.before_median_is_lower_bound else ""
    lb_a = ">=" if c.after_median_is_lower_bound else ""
    text = (f"{METRIC_LABEL[c.metric]} {lb_b}{c.before_median_us:g} -> {lb_a}{c.after_median_us:g} us "
            f"({_pct(c.rel_diff)}, bootstrap CI {_pct(c.ci_low)}..{_pct(c.ci_high)})")
    if c.p_better is not None:
        text += f" [p better {c.p_better:.2g}, p worse {c.p_worse:.2g}]"
    if c.censored_before or c.censored_after:
        text += (f" [{c.censored_before} before / {c.censored_after} after units beyond the histogram, "
                 f"taken as its size: a lower bound]")
    return text


def _reason(rule: DecisionRule, j: _Judgement, action: str, final: bool, m: int, n: int, look: int, looks: int,
            units: str, latency_applicable: bool) -> str:
    prim = j.metrics[rule.primary]
    lab = METRIC_LABEL[rule.primary]
    head = (f"Look {look}/{looks}, {m} before and {n} after {units}; keep level {j.levels.get('keep_latency', 0):.3g} "
            f"(one-sided, {rule.confidence * 100:g}% overall spent over the looks). Primary {_describe(prim)}.")
    if not latency_applicable:
        head = ("Latency is not applicable (a host change measured in a guest that does not run on that host): "
                "reported, not used. " + head)
    guards = "; ".join(_describe(j.metrics[g]) for g in rule.guards)
    if guards:
        head += f" Guards: {guards}."
    if j.mechanisms:
        head += " Mechanisms: " + "; ".join(f"{mc.describe()} {mc.finding}" for mc in j.mechanisms.values()) + "."
        if latency_applicable and "keep_mechanism" not in j.levels:
            head += (" (No keep on mechanism here: keep_on is 'latency', or the exact test cannot reach the "
                     "mechanism path's level at this number of units.)")
    if j.verdict == "rollback":
        why = []
        if j.rolled_back_on == "mechanism":
            why = [f"{mc.describe()} is shown increased" for mc in j.mechanisms.values()
                   if mc.finding == "increased"]
            tail = "Rolled back on mechanism: " + " and ".join(why)
            tail += (f" ({lab} not shown better)." if latency_applicable else " (latency not applicable).")
        else:
            if prim.finding == "worse":
                why.append(f"{lab} is shown worse")
            for g in j.regressed:
                why.append(f"{METRIC_LABEL[g]} is shown to regress beyond its {rule.guards[g] * 100:g}% tolerance")
            tail = "Rolled back: " + " and ".join(why) + "."
    elif j.verdict == "keep" and j.kept_on == "latency":
        tail = f"Kept on latency: {lab} is shown better and no guard is shown to regress beyond its tolerance."
    elif j.verdict == "keep":
        red = "; ".join(mc.describe() for mc in j.mechanisms.values() if mc.finding == "reduced")
        tail = f"Kept on mechanism: {red}"
        tail += (f"; {lab} not worse than +{rule.min_effect * 100:g}%." if latency_applicable
                 else " (latency not applicable).")
    elif not final:
        tail = "Nothing is shown yet at this look: measure more runs."
    elif j.stop == "futile":
        tail = (f"Inconclusive, stopped for futility: {lab} is shown to improve by less than "
                f"{rule.min_effect * 100:g}% at best and no mechanism keep is within reach; "
                f"policy '{rule.inconclusive}' -> {action}.")
    elif j.stop == "harmless":
        tail = (f"Inconclusive, stopped: no relevant regression of {lab} or any guard remains possible; "
                f"policy '{rule.inconclusive}' -> {action}.")
    elif j.stop == "mechanism futile":
        tail = f"Inconclusive, stopped: no targeted mechanism can be shown reduced; policy -> {action}."
    else:
        tail = (f"Inconclusive: the evidence shows neither an improvement nor a regression; "
                f"policy '{rule.inconclusive}' -> {action} (a change that does not prove itself is "
                f"{'not kept' if action == 'rollback' else 'kept unless shown harmful'}).")
    return f"{head} {tail}"


def _single_thresholds(rule: DecisionRule, m: int, n: int, a1: float, a2: float, n_mech: int,
                       latency_applicable: bool) -> _Thresholds:
    """One analysis that spends the whole budgets (a fixed design, or the boot-level analysis)."""
    g = max(len(rule.guards), 1)
    beta = 1.0 - rule.power
    # with the mechanism path unused (a2 = 0) its intervals are still shown, at alpha, and never used
    mk = (rule.alpha if not latency_applicable or a2 <= 0 else a2) / max(n_mech, 1)
    return _Thresholds(keep=_crit(m, n, a1), ni=_crit(m, n, a2) if a2 > 0 else m * n + 1,
                       rollback=_crit(m, n, rule.alpha), guard=_crit(m, n, rule.alpha_guard / g),
                       futility=_crit(m, n, beta), mech_keep=mk, mech_rollback=rule.alpha / max(n_mech, 1),
                       mech_futility=beta / max(n_mech, 1))


def _round_up(sd: float) -> float:
    """The spread to 2 significant digits, rounded up: an estimate from a dozen runs is not better than that."""
    if sd <= 0 or not math.isfinite(sd):
        return sd
    q = 10.0 ** (math.floor(math.log10(sd)) - 1)
    return math.ceil(sd / q - 1e-9) * q


def _check_rates(rates: Mapping[str, float | None] | None, side: str, i: int) -> None:
    for label, r in (rates or {}).items():
        if r is not None and (not isinstance(r, (int, float)) or isinstance(r, bool) or not math.isfinite(r)
                              or r < 0):
            raise InputError(f"{side} run {i}: the rate of {label!r} is {r!r}; a rate is a finite number >= 0 "
                             f"or None when not available (a counter that wrapped or was reset)")


def decide(before: list[LatencyResult], after: list[LatencyResult], rule: DecisionRule | None = None, *,
           rates_before: Sequence[Mapping[str, float | None] | None] | None = None,
           rates_after: Sequence[Mapping[str, float | None] | None] | None = None,
           mechanisms: Sequence[str] | None = None, latency_applicable: bool = True) -> Decision:
    """One analysis of runs as independent units, at the whole error budgets (a fixed-length comparison).

    `SequentialDecision` is the rule with looks; this is what it does at a single look at K = the runs given.
    Rates: one mapping per run (label -> events per second), as in `SequentialDecision.add`."""
    rule = rule or DecisionRule()
    if len(before) < 2 or len(after) < 2:
        raise InputError(f"need at least 2 runs per side to judge a change (got {len(before)} before, "
                         f"{len(after)} after)")
    _check_comparable(before, after)
    rb = list(rates_before) if rates_before is not None else [None] * len(before)
    ra = list(rates_after) if rates_after is not None else [None] * len(after)
    if len(rb) != len(before) or len(ra) != len(after):
        raise InputError("give one rates mapping (or None) per run")
    for side, rs in (("before", rb), ("after", ra)):
        for i, r in enumerate(rs, 1):
            _check_rates(r, side, i)
    seen = sorted({k for r in rb + ra for k in (r or {})})
    declared = list(mechanisms) if mechanisms is not None else seen
    m, n = len(before), len(after)
    a1, a2 = _split(rule, declared, latency_applicable, m, n)
    th = _single_thresholds(rule, m, n, a1, a2, len(declared), latency_applicable)
    j = _judge(rule, [[r] for r in before], [[r] for r in after], [[r] for r in rb], [[r] for r in ra], th,
               declared=declared, extra_labels=seen, path2=a2 > 0 and latency_applicable,
               latency_applicable=latency_applicable, units="runs", rng_key=1)
    return _decision(rule, j, m=m, n=n, look=1, looks=1, final=True, before=before, after=after, units="runs",
                     latency_applicable=latency_applicable)


def _split(rule: DecisionRule, declared: Sequence[str], latency_applicable: bool, m: int, n: int
           ) -> tuple[float, float]:
    """(A1, A2): the keep budget of the latency path and of the mechanism path (0 when it is not usable)."""
    if not latency_applicable:
        return 0.0, rule.alpha
    a2 = rule.alpha * rule.mechanism_share
    if rule.keep_on == "latency" or not declared or _u_tail_min(m, n) > a2:
        return rule.alpha, 0.0
    return rule.alpha - a2, a2


def _decision(rule: DecisionRule, j: _Judgement, *, m: int, n: int, look: int, looks: int, final: bool,
              before: Sequence[LatencyResult], after: Sequence[LatencyResult], units: str,
              latency_applicable: bool, **extra: object) -> Decision:
    is_final = final or j.verdict != "inconclusive" or bool(j.stop)
    action: Action = rule.inconclusive if j.verdict == "inconclusive" else j.verdict
    reason = _reason(rule, j, action, is_final, m, n, look, looks, units, latency_applicable)
    return Decision.model_validate({
        "verdict": j.verdict, "action": action, "final": is_final, "stopped_early": is_final and look < looks,
        "look": look, "looks_planned": looks, "confidence_per_look": 1.0 - j.levels.get("keep_latency", 0.0),
        "runs_before": len(before), "runs_after": len(after),
        "measuring_time_s": sum(_run_time(r, rule) for r in [*before, *after]), "metrics": j.metrics,
        "reason": reason, "kept_on": j.kept_on, "rolled_back_on": j.rolled_back_on, "mechanisms": j.mechanisms,
        "levels": j.levels,
        "latency_applicable": latency_applicable, "order_seed": rule.seed, **extra})


# ---------------------------------------------------------------------------------------- the loop side


class SequentialDecision:
    """Drives the measurement of one change: which side to measure next (and whether to reboot first), and when
    to stop.

        seq = SequentialDecision(rule)
        while (step := seq.next_step()) is not None:
            ensure_change_state(applied=(step.side == "after"), reboot=step.new_boot)
            seq.add(step.side, measure_one_run(), rates=mechanism_rates_of_that_run)
        decision = seq.decision

    `next_side()` is `next_step().side` for runtime changes. `noise_sd`: a stored run-to-run SD of
    log(primary) for this unit (fixes K before the first run); `mechanisms`: the labels the change targets
    (default: the labels of the first run's `rates`); `latency_applicable=False`: decide on the mechanisms only.
    """

    def __init__(self, rule: DecisionRule | None = None, *, noise_sd: float | None = None,
                 latency_applicable: bool = True, mechanisms: Sequence[str] | None = None,
                 seed: int | None = None):
        self.rule = rule or DecisionRule()
        if noise_sd is not None and not (math.isfinite(noise_sd) and noise_sd >= 0):
            raise InputError(f"noise_sd must be a finite number >= 0, not {noise_sd!r}")
        self.noise_sd = noise_sd
        self.latency_applicable = latency_applicable
        self.seed = self.rule.seed if seed is None else seed
        self.boots = self.rule.order == "blocked"
        self.runs: dict[str, list[LatencyResult]] = {"before": [], "after": []}
        self.rates: dict[str, list[Mapping[str, float | None] | None]] = {"before": [], "after": []}
        self.sequence: list[Side] = []  # sides in the order measured
        self.history: list[Decision] = []
        self._declared: list[str] | None = list(mechanisms) if mechanisms is not None else None
        self._seen: list[str] = []
        self._boot_index: dict[str, list[int]] = {"before": [], "after": []}  # planned boot of each run
        self.k_cap = self.rule.k_cap()
        self.k_eff: int | None = None
        self.sd_log: float | None = None
        self.sd_source: Literal["noise profile", "first look", "boots"] | None = None
        self._look = 0
        self._split: tuple[float, float] | None = None
        rng = np.random.default_rng(self.seed)
        self._blocks = ["ABBA" if b else "BAAB" for b in rng.random(64) < 0.5]
        first: Side = "before" if rng.random() < 0.5 else "after"
        other: Side = "after" if first == "before" else "before"
        b = self.rule.boots_per_side
        self.boot_plan: list[Side] = [[first, other, other, first][i % 4] for i in range(2 * b)]
        if noise_sd is not None and not self.boots:
            self.sd_log, self.sd_source = noise_sd, "noise profile"

    # --- state

    @property
    def done(self) -> bool:
        return bool(self.history) and self.history[-1].final

    @property
    def decision(self) -> Decision | None:
        """The latest analysis (final once `done`)."""
        return self.history[-1] if self.history else None

    def _schedule(self) -> list[int]:
        return self.rule.look_schedule(self.k_eff if self.k_eff is not None else self.k_cap)

    # --- what to measure next

    def next_step(self) -> Step | None:
        if self.done:
            return None
        if self.boots:
            i = len(self.sequence)
            rpb = self.rule.runs_per_boot
            if i >= len(self.boot_plan) * rpb:
                return None
            return Step(self.boot_plan[i // rpb], new_boot=i % rpb == 0)
        k = self._schedule()[min(self._look, len(self._schedule()) - 1)]
        nb, na = len(self.runs["before"]), len(self.runs["after"])
        need = {"before": k - nb, "after": k - na}
        total = nb + na
        if self.rule.order == "ABAB":
            side: Side = "before" if nb <= na else "after"
        else:
            block = self._blocks[(total // 4) % len(self._blocks)]
            side = "before" if block[total % 4] == "A" else "after"
        if need[side] <= 0:
            side = "after" if side == "before" else "before"
        return Step(side)

    def next_side(self) -> Side | None:
        step = self.next_step()
        return None if step is None else step.side

    # --- recording runs

    def add(self, side: Side, result: LatencyResult, rates: Mapping[str, float | None] | None = None
            ) -> Decision | None:
        """Record one run (and its mechanism rates, events per second; None = not available for this run);
        returns the analysis when this run completed a look, else None."""
        if self.done:
            raise InputError("this change is already decided; no more runs are needed")
        if side not in ("before", "after"):
            raise InputError(f"side must be 'before' or 'after', not {side!r}")
        if self.boots:
            step = self.next_step()
            if step is None or step.side != side:
                raise InputError(f"the boot plan asks for a {step.side if step else 'no'} run next, not {side}")
        _check_rates(rates, side, len(self.runs[side]) + 1)
        if self._declared is None:
            self._declared = sorted(rates or {})
        for label in rates or {}:
            if label not in self._seen:
                self._seen.append(label)
        if self._split is None:
            k = self.rule.boots_per_side if self.boots else self.k_cap
            self._split = _split(self.rule, self._declared, self.latency_applicable, k, k)
        self._boot_index[side].append(len(self.sequence) // self.rule.runs_per_boot)
        self.runs[side].append(result)
        self.rates[side].append(dict(rates) if rates is not None else None)
        self.sequence.append(side)
        if self.boots:
            if len(self.sequence) < len(self.boot_plan) * self.rule.runs_per_boot:
                return None
            d = self._analyse_boots()
        else:
            sched = self._schedule()
            if min(len(self.runs["before"]), len(self.runs["after"])) < sched[self._look]:
                return None
            d = self._analyse_runs()
        self.history.append(d)
        if not d.final:
            self._look += 1
        return d

    # --- the analyses

    def _power(self, k: int, a1: float, k_min: int) -> tuple[float | None, str | None, int]:
        """(power at eps with k per side, the shortfall note, K the power analysis asked for)."""
        rule = self.rule
        if self.sd_log is None or a1 <= 0:
            return None, None, k
        pw = power_at(k, self.sd_log, rule.min_effect, a1, gamma=rule.spending_gamma, k_min=k_min,
                      look_every=rule.step())
        want = math.ceil(fixed_runs(self.sd_log, rule.min_effect, a1, rule.power))
        note = None
        if pw < rule.power - 0.005:
            if self.boots:
                cap = f"boots_per_side ({rule.boots_per_side})"
            elif rule.max_time_s is not None and self.k_cap < rule.k_max:
                cap = f"max_time_s ({rule.max_time_s:g} s: {self.k_cap} runs per side)"
            else:
                cap = f"k_max ({rule.k_max})"
            unit = "boots" if self.boots else "runs"
            note = (f"power {pw * 100:.0f}% at -{rule.min_effect * 100:g}%, not {rule.power * 100:g}%: capped by "
                    f"{cap}; even a single analysis would need about {want} {unit} per side at the measured spread "
                    f"(log-SD {self.sd_log:.3f})")
        return pw, note, want

    def _analyse_runs(self) -> Decision:
        rule = self.rule
        a1, a2 = self._split or (rule.alpha, 0.0)
        if self._look == 0 and self.k_eff is None:
            if self.sd_log is None and not (rule.looks == 1 or rule.k_min >= self.k_cap):
                logs = np.log(np.concatenate([run_values(self.runs[s], rule.primary, s)[0]
                                              for s in ("before", "after")]))
                self.sd_log, self.sd_source = _round_up(float(np.std(logs, ddof=1))), "first look"
            if self.sd_log is not None and a1 > 0 and self.k_cap > rule.k_min and rule.looks != 1:
                want = runs_for_power(self.sd_log, rule.min_effect, a1, rule.power, gamma=rule.spending_gamma,
                                      k_min=rule.k_min, look_every=rule.step(), limit=self.k_cap + 1)
                self.k_eff = min(max(want, rule.k_min), self.k_cap)
            else:
                self.k_eff = self.k_cap
        sched = self._schedule()
        j = self._look
        k = sched[j]
        ks = tuple(sched)
        gamma = rule.spending_gamma
        beta = 1.0 - rule.power
        g = max(len(rule.guards), 1)
        n_mech = max(len(self._declared or []), 1)

        def bound(alpha: float) -> int:
            if alpha <= 0:
                return k * k + 1
            if j == 0:  # the first look needs only the exact law of one count
                return _crit(k, k, hsd_spent(k / ks[-1], alpha, gamma))
            return mw_bounds(ks, alpha, gamma, self.k_cap)[j]

        def inc(alpha: float) -> float:
            t0 = ks[j - 1] / ks[-1] if j > 0 else 0.0
            return (hsd_spent(k / ks[-1], alpha, gamma) - hsd_spent(t0, alpha, gamma)) / n_mech

        mech_alpha = a2 if self.latency_applicable and a2 > 0 else rule.alpha  # a2 = 0: shown, never used
        th = _Thresholds(keep=bound(a1), ni=bound(a2), rollback=bound(rule.alpha), guard=bound(rule.alpha_guard / g),
                         futility=bound(beta), mech_keep=inc(mech_alpha), mech_rollback=inc(rule.alpha),
                         mech_futility=inc(beta))
        before, after = self.runs["before"][:k], self.runs["after"][:k]
        _check_comparable(before, after)
        jd = _judge(rule, [[r] for r in before], [[r] for r in after], [[r] for r in self.rates["before"][:k]],
                    [[r] for r in self.rates["after"][:k]], th, declared=self._declared or [],
                    extra_labels=self._seen, path2=a2 > 0 and self.latency_applicable,
                    latency_applicable=self.latency_applicable, units="runs", rng_key=j + 1,
                    last=j == len(sched) - 1)
        pw, note, _ = self._power(self.k_eff or k, a1, rule.k_min if rule.looks != 1 else self.k_eff or k)
        return _decision(rule, jd, m=k, n=k, look=j + 1, looks=len(sched), final=j == len(sched) - 1,
                         before=before, after=after, units="runs", latency_applicable=self.latency_applicable,
                         power_at_min_effect=pw, power_note=note, k_max_used=self.k_eff, sd_log=self.sd_log,
                         sd_source=self.sd_source, order_seed=self.seed, sequence=list(self.sequence))

    def _analyse_boots(self) -> Decision:
        rule = self.rule
        groups: dict[str, dict[str, list[int]]] = {"before": {}, "after": {}}
        for side in ("before", "after"):
            for i, (res, planned) in enumerate(zip(self.runs[side], self._boot_index[side], strict=True)):
                key = res.boot_id if res.boot_id is not None else f"planned boot {planned}"
                groups[side].setdefault(key, []).append(i)
        nb, na = len(groups["before"]), len(groups["after"])
        a1, a2 = _split(rule, self._declared or [], self.latency_applicable, nb, na)
        holds = min(nb, na) >= 3 and (_u_tail_min(nb, na) <= a1 if self.latency_applicable
                                      else min(nb, na) >= 3)
        extra: dict[str, object] = {"boots_before": nb, "boots_after": na, "order_seed": self.seed,
                                    "sequence": list(self.sequence), "guarantee_holds": holds}
        if holds:
            units: Literal["runs", "boots"] = "boots"
            bef = [[self.runs["before"][i] for i in ix] for ix in groups["before"].values()]
            aft = [[self.runs["after"][i] for i in ix] for ix in groups["after"].values()]
            rb = [[self.rates["before"][i] for i in ix] for ix in groups["before"].values()]
            ra = [[self.rates["after"][i] for i in ix] for ix in groups["after"].values()]
            m, n = nb, na
            logs = np.log(np.concatenate([_unit_values(bef, rule.primary, "before")[0],
                                          _unit_values(aft, rule.primary, "after")[0]]))
            self.sd_log = self.noise_sd if self.noise_sd is not None else float(np.std(logs, ddof=1))
            self.sd_source = "noise profile" if self.noise_sd is not None else "boots"
        else:
            units = "runs"
            bef = [[r] for r in self.runs["before"]]
            aft = [[r] for r in self.runs["after"]]
            rb = [[r] for r in self.rates["before"]]
            ra = [[r] for r in self.rates["after"]]
            m, n = len(bef), len(aft)
            a1, a2 = _split(rule, self._declared or [], self.latency_applicable, m, n)
        _check_comparable(self.runs["before"], self.runs["after"])
        th = _single_thresholds(rule, m, n, a1, a2, len(self._declared or []), self.latency_applicable)
        jd = _judge(rule, bef, aft, rb, ra, th, declared=self._declared or [], extra_labels=self._seen,
                    path2=a2 > 0 and self.latency_applicable, latency_applicable=self.latency_applicable,
                    units=units, rng_key=1)
        pw, note = None, None
        if holds:
            pw, note, _ = self._power(min(m, n), a1, min(m, n))
        d = _decision(rule, jd, m=m, n=n, look=1, looks=1, final=True, before=self.runs["before"],
                      after=self.runs["after"], units=units, latency_applicable=self.latency_applicable,
                      power_at_min_effect=pw, power_note=note, k_max_used=rule.boots_per_side,
                      sd_log=self.sd_log if holds else None, sd_source=self.sd_source if holds else None, **extra)
        if not holds:
            why = (f"only {min(nb, na)} boot(s) on a side (at least 3 are needed)" if min(nb, na) < 3 else
                   f"the exact test on {nb} + {na} boots cannot reach the keep level {a1:.3g} "
                   f"(smallest p-value {_u_tail_min(nb, na):.3g})")
            caveat = (f"The error guarantee does not hold: {why}; the runs are analysed as if they were "
                      f"independent, which ignores the boot-to-boot variation, so this says what the runs show "
                      f"with no error rate attached. ")
            d = d.model_copy(update={"reason": caveat + d.reason})
        if any(r.boot_id is None for side in ("before", "after") for r in self.runs[side]):
            d = d.model_copy(update={"reason": d.reason + " Boots are taken from the plan: some runs carry no "
                                     "boot_id, so that each planned boot was a fresh one is not checked."})
        return d
