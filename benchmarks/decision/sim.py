"""The simulation: effects, rules over many trials with common random numbers, the fixed-length reference."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from benchmarks.decision.model import NoiseModel
from benchmarks.decision.rules import M_P999, Source, fixed_z, n_for_power, z_alpha

EFFECTS = (-0.30, -0.10, 0.0, 0.10)  # true relative effect on the median run-level p99.9 (negative = better)


@dataclass
class Effects:
    """Log shifts of an after run per effect. The change stretches the latency tail above the median p50 m0
    (v -> m0 + (v - m0) s) so that p99.9 moves by exactly e; p99 and max move by what that stretch does to
    their medians (the old benchmark's effect, on run-level values)."""

    m0: float
    med: dict[str, float]
    shifts: dict[float, np.ndarray] = field(default_factory=dict)
    moves: dict[float, tuple[float, float, float]] = field(default_factory=dict)

    @classmethod
    def build(cls, m0: float, med: dict[str, float], effects: tuple[float, ...] = EFFECTS) -> Effects:
        out = cls(m0, med)
        p = med["p999_us"]
        for e in effects:
            s = 1.0 + e * p / max(p - m0, 1e-9)
            mv = []
            for k in ("p99_us", "p999_us", "max_us"):
                v = med[k]
                mv.append(e if k == "p999_us" else ((s - 1.0) * (v - m0) / v if v > m0 else 0.0))
            out.moves[e] = (mv[0], mv[1], mv[2])
            out.shifts[e] = np.log1p(np.array(mv))
        return out


@dataclass
class RuleResult:
    name: str
    actions: dict[float, list[str]]
    verdicts: dict[float, list[str]]
    runs: dict[float, list[int]]
    boots: dict[float, list[int]]
    run_s: float

    def rate(self, e: float, action: str) -> float:
        return float(np.mean([a == action for a in self.actions[e]]))

    def time(self, e: float) -> float:
        return float(np.mean(self.runs[e])) * self.run_s

    def max_time(self) -> float:
        return max(max(r) for r in self.runs.values()) * self.run_s


def noise_for_trial(model: NoiseModel, seed: int, trial: int, length: int) -> np.ndarray:
    """One trial's runs in measuring order, one boot (drift and run spread; the boot's offset is common to
    both sides and left out)."""
    rng = np.random.default_rng([seed, 11, trial])
    return model.simulate_logs(rng, 1, length, new_boot=False)[0]


def boot_noise_for_trial(model: NoiseModel, seed: int, trial: int, boots: int, per_boot: int) -> np.ndarray:
    """One trial's boots, each its own series with its own offset: (boots, per_boot, k)."""
    rng = np.random.default_rng([seed, 12, trial])
    return model.simulate_logs(rng, boots, per_boot, new_boot=True)


def run_rule(rule: Any, model: NoiseModel, eff: Effects, trials: int, seed: int, length: int,
             boot_change: bool = False, boots: int = 12, per_boot: int = 60) -> RuleResult:
    res = RuleResult(rule.name, {e: [] for e in eff.shifts}, {e: [] for e in eff.shifts},
                     {e: [] for e in eff.shifts}, {e: [] for e in eff.shifts}, model.run_s)
    for t in range(trials):
        if boot_change:
            bn = boot_noise_for_trial(model, seed, t, boots, per_boot)
            noise = bn[0]
        else:
            bn = None
            noise = noise_for_trial(model, seed, t, length)
        for e, shift in eff.shifts.items():
            src = Source(model.to_values, noise, shift, boot_noise=bn)
            out = rule.decide(src, seed * 100003 + t)
            res.actions[e].append(out.action)
            res.verdicts[e].append(out.verdict)
            res.runs[e].append(out.runs)
            res.boots[e].append(out.boots)
    return res


@dataclass
class FixedCurves:
    """z statistics of the fixed-length test per effect: z[e] has shape (trials, n_max)."""

    z: dict[float, np.ndarray]
    ns: np.ndarray
    run_s: float

    def keep_rate(self, e: float, alpha: float) -> np.ndarray:
        return np.asarray(np.mean(self.z[e] > z_alpha(alpha), axis=0))

    def n_for(self, alpha: float, power: float) -> tuple[float, str]:
        return n_for_power(self.ns, self.keep_rate(-0.10, alpha), alpha, power)


def fixed_curves(model: NoiseModel, eff: Effects, trials: int, seed: int, n_max: int, chunk: int = 50
                 ) -> FixedCurves:
    """The same trials' first 2 n_max runs (ABBA), tested once after every n = 1..n_max runs per side."""
    z: dict[float, list[np.ndarray]] = {e: [] for e in eff.shifts}
    for start in range(0, trials, chunk):
        block = np.array([noise_for_trial(model, seed, t, 2 * n_max)[:, M_P999]
                          for t in range(start, min(trials, start + chunk))])
        for e, shift in eff.shifts.items():
            z[e].append(fixed_z(block, float(shift[M_P999]), n_max, model.histogram_us))
    return FixedCurves({e: np.concatenate(v) for e, v in z.items()}, np.arange(1, n_max + 1), model.run_s)


def information_bound(alpha: float, beta: float) -> float:
    """The least time ratio any rule can have at these error rates: no sequential test that keeps a null change
    with probability alpha and misses the alternative with probability beta can take, in expectation, fewer
    observations under either hypothesis than Wald's information bound (the stopped sample's Kullback-Leibler
    divergence is at least the decision's: E1[N] KL >= (1-b) ln((1-b)/a) + b ln(b/(1-a)), and likewise under
    the null), and the fixed-length test needs (z_a + z_b)^2 / (2 KL) observations; the ratio of the mean of the
    two expectations to that is free of the effect and the spread (normal shift, known variance, continuous
    monitoring: a rule that looks every 2 runs, estimates the spread and ranks can only do worse). Equality is
    approached by Wald's SPRT. E.g. 0.49 at alpha = beta = 0.05."""
    a, b = min(max(alpha, 1e-6), 0.5), min(max(beta, 1e-6), 0.5)  # power below 50%: a ratio is moot
    g1 = (1 - b) * math.log((1 - b) / a) + b * math.log(b / (1 - a))
    g0 = (1 - a) * math.log((1 - a) / b) + a * math.log(a / (1 - b))
    return (g0 + g1) / (z_alpha(a) + z_alpha(b)) ** 2


def summarise(r: RuleResult, fixed: FixedCurves, min_effect: float) -> dict[str, Any]:
    """The benchmark's figures for one rule, and its fixed-length reference of equal error."""
    fk = r.rate(0.0, "keep")
    power = r.rate(-0.10, "keep")
    alpha = min(max(fk, 0.005), 0.05)
    n_ref, how = fixed.n_for(alpha, min(max(power, 0.01), 0.999))
    ref_s = 2 * n_ref * fixed.run_s
    mean_t = (r.time(0.0) + r.time(-0.10)) / 2
    return {
        "false_keep_0": fk,
        "power_m10": power,
        "power_m30": r.rate(-0.30, "keep"),
        "keep_p10": r.rate(0.10, "keep"),
        "wrong_rollback_m10": r.rate(-0.10, "rollback") if min_effect <= 0.10 else 0.0,
        "inconclusive_0": float(np.mean([v == "inconclusive" for v in r.verdicts[0.0]])),
        "time_0_s": r.time(0.0),
        "time_m10_s": r.time(-0.10),
        "time_m30_s": r.time(-0.30),
        "time_p10_s": r.time(0.10),
        "mean_time_s": mean_t,
        "max_time_s": r.max_time(),
        "ref_alpha": alpha,
        "ref_n_per_side": n_ref,
        "ref_how": how,
        "ref_time_s": ref_s,
        "time_ratio": mean_t / ref_s if ref_s > 0 and math.isfinite(ref_s) else math.nan,
        "time_ratio_bound": information_bound(alpha, 1.0 - min(power, 0.999)) if power >= 0.5 else math.nan,
        "trials": len(r.actions[0.0]),
    }


def fixed_row(fixed: FixedCurves, alpha: float = 0.05, power: float = 0.95) -> dict[str, Any]:
    """The fixed-length design sized for the goal (one-sided alpha, power at -10%), n interpolated; its error
    rates simulated at the nearest whole n."""
    n_goal, how = fixed.n_for(alpha, power)
    j = int(min(max(round(n_goal), 1), len(fixed.ns))) - 1
    t = 2 * n_goal * fixed.run_s
    return {
        "false_keep_0": float(fixed.keep_rate(0.0, alpha)[j]),
        "power_m10": float(fixed.keep_rate(-0.10, alpha)[j]),
        "power_m30": float(fixed.keep_rate(-0.30, alpha)[j]),
        "keep_p10": float(fixed.keep_rate(0.10, alpha)[j]),
        "wrong_rollback_m10": 1.0 - float(fixed.keep_rate(-0.10, alpha)[j]),
        "time_0_s": t, "time_m10_s": t, "time_m30_s": t, "time_p10_s": t,
        "mean_time_s": t, "max_time_s": t, "ref_alpha": alpha, "ref_n_per_side": n_goal, "ref_how": how,
        "ref_time_s": t, "time_ratio": 1.0, "time_ratio_bound": information_bound(alpha, 1.0 - power),
        "rates_at_n": j + 1, "trials": int(fixed.z[0.0].shape[0]),
    }
