"""Mechanism evidence: is the rate of an event the change targets (IPIs, local-timer interrupts, WFx exits ...)
shown to go down? See the `decide` module docstring for how the rule uses it.

Each unit (a run, or a boot for boot changes) gives one rate in events per second. The comparison is a Welch t
interval on log(rate + c), one value per unit, so the run-to-run (or boot-to-boot) variation of the rate is the
noise the change has to beat; a Poisson test on the pooled counts would take millions of events as independent
evidence and claim a "change" whenever two runs differ by more than counting noise, which they always do.

c (the continuity term) is one event per run: 1 / run_duration_s events per second, the resolution of a rate
counted over one run. It makes log(0) finite (a mechanism the change removes entirely is a ratio of about
c / before, not -inf) and damps ratios between near-zero rates, which carry little information."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from orchestrator.stats.sequential import t_ppf

MIN_UNITS = 2  # valid units per side for a Welch interval (one degree of freedom per side at least)

MechanismFinding = Literal["reduced", "increased", "not reduced", "not shown", "not available", "not declared"]


class MechanismComparison(BaseModel):
    """One targeted mechanism (expected to go down), before vs after. Ratios are after / before."""

    model_config = ConfigDict(extra="forbid")

    label: str
    units: Literal["runs", "boots"] = "runs"
    n_before: int  # units with a valid rate (None rates are left out)
    n_after: int
    before_rate: float | None = None  # median of the units' rates, events per second
    after_rate: float | None = None
    ratio: float | None = None  # exp(mean log(after + c) - mean log(before + c))
    ci_low: float | None = None  # interval of the ratio at (level, 1 - level): ci_high is the one-sided bound
    ci_high: float | None = None
    level: float | None = None  # one-sided level of the claim at this look
    continuity: float = 0.0  # c, events per second
    finding: MechanismFinding

    def describe(self) -> str:
        if self.ratio is None or self.ci_low is None or self.ci_high is None:
            return f"{self.label}: {self.finding} ({self.n_before} before / {self.n_after} after {self.units})"
        return (f"{self.label} {_pct(self.ratio - 1)} [{_pct(self.ci_low - 1)}, {_pct(self.ci_high - 1)}]"
                f" ({self.n_before} + {self.n_after} {self.units})")


def _pct(x: float) -> str:
    if not math.isfinite(x):
        return "+inf" if x > 0 else "-inf"
    return f"{x * 100:+.0f}%" if abs(x) >= 0.095 else f"{x * 100:+.1f}%"


def unit_log_rates(rates: Sequence[Sequence[float | None]], c: float) -> list[float]:
    """One value per unit: the mean of log(rate + c) over the unit's valid runs (a unit with none is left
    out). Negative or non-finite rates are refused upstream; here they count as not available."""
    out: list[float] = []
    for unit in rates:
        vals = [math.log(r + c) for r in unit if r is not None and math.isfinite(r) and r >= 0]
        if vals:
            out.append(sum(vals) / len(vals))
    return out


def compare(label: str, before: Sequence[Sequence[float | None]], after: Sequence[Sequence[float | None]], *,
            c: float, level: float, futility_level: float, min_reduction: float,
            units: Literal["runs", "boots"] = "runs") -> MechanismComparison:
    """Welch t comparison of log(rate + c) per unit (each unit a list of its runs' rates).

    "reduced": the one-sided upper bound of the ratio at `level` is below 1 - min_reduction;
    "increased": the one-sided lower bound at `level` is above 1 / (1 - min_reduction) (the mirror image);
    "not reduced": the one-sided lower bound at `futility_level` is above 1 - min_reduction (a reduction of
    that size is itself shown implausible); else "not shown"; fewer than 2 valid units a side: "not available".
    With no spread at all on either side (every unit the same value) the interval is the point itself."""
    lb, la = unit_log_rates(before, c), unit_log_rates(after, c)
    rb = [r for unit in before for r in unit if r is not None and math.isfinite(r) and r >= 0]
    ra = [r for unit in after for r in unit if r is not None and math.isfinite(r) and r >= 0]
    base = MechanismComparison(label=label, units=units, n_before=len(lb), n_after=len(la),
                               before_rate=float(np.median(rb)) if rb else None,
                               after_rate=float(np.median(ra)) if ra else None, level=level, continuity=c,
                               finding="not available")
    if len(lb) < MIN_UNITS or len(la) < MIN_UNITS:
        return base
    xb, xa = np.asarray(lb), np.asarray(la)
    diff = float(xa.mean() - xb.mean())
    vb, va = float(xb.var(ddof=1)) / len(xb), float(xa.var(ddof=1)) / len(xa)
    se = math.sqrt(vb + va)
    if se > 0:
        df = (vb + va) ** 2 / (vb ** 2 / (len(xb) - 1) + va ** 2 / (len(xa) - 1))
        q = t_ppf(1.0 - level, df) if level > 0 else math.inf
        qf = t_ppf(1.0 - futility_level, df) if futility_level > 0 else math.inf
    else:
        q = 0.0 if level > 0 else math.inf
        qf = 0.0 if futility_level > 0 else math.inf
    lo, hi = _exp(diff - q * se), _exp(diff + q * se)
    lo_fut = _exp(diff - qf * se)
    if hi < 1.0 - min_reduction:
        finding: MechanismFinding = "reduced"
    elif lo > 1.0 / (1.0 - min_reduction):
        finding = "increased"
    elif lo_fut > 1.0 - min_reduction:
        finding = "not reduced"
    else:
        finding = "not shown"
    return base.model_copy(update={"ratio": math.exp(diff), "ci_low": lo, "ci_high": hi, "finding": finding})


def _exp(x: float) -> float:
    if math.isnan(x):
        return math.nan
    return math.exp(min(x, 700.0)) if x != -math.inf else 0.0
