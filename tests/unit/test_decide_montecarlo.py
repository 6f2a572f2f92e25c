"""Monte Carlo checks of the decision rule's error rates, with fixed seeds.

Every run here is SYNTHETIC (LatencyResults built from lognormal numbers drawn here, and rates drawn likewise):
these tests are about statistical properties (the false-keep rate at zero effect, the power at a large one),
not about what cyclictest prints. Each takes a few seconds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from orchestrator.measure.model import CyclictestSettings, LatencyResult, LatencyStats, LoadSpec
from orchestrator.stats.decide import Decision, DecisionRule, SequentialDecision
from orchestrator.stats.sequential import look_grid, mw_bounds

pytestmark = pytest.mark.unit

SETTINGS = CyclictestSettings(duration_s=10, histogram_us=20000)
LOAD = LoadSpec(kind="stress-ng", args=["--cpu", "1"])
IPI = "IPI1 on CPU 1 per s"


def run(p999: float) -> LatencyResult:
    """A synthetic run: only p99.9 matters (the rules below have no guards)."""
    v = max(2, round(p999))
    stats = LatencyStats(samples=10000, min_us=1, avg_us=1.0, p50_us=1, p90_us=1, p99_us=1, p999_us=v,
                         p9999_us=v, max_us=v)
    return LatencyResult(form="json", threads=[stats.model_copy(update={"thread": 0})], all=stats,
                         settings=SETTINGS, load=LOAD, duration_s=10.0)


def simulate(rule: DecisionRule, n: int, effect: float, *, sd: float, noise_sd: float | None, seed: int,
             mech_ratio: float | None = None) -> list[Decision]:
    """n sequences of one change whose true effect on p99.9 is `effect` (0.9 = 10% lower), lognormal runs."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        seq = SequentialDecision(rule, noise_sd=noise_sd, seed=i)
        while (side := seq.next_side()) is not None:
            med = 1000.0 if side == "before" else 1000.0 * effect
            rates = None
            if mech_ratio is not None:
                rates = {IPI: 50.0 * (mech_ratio if side == "after" else 1.0) * math.exp(rng.normal(0, 0.3))}
            seq.add(side, run(med * math.exp(rng.normal(0, sd))), rates=rates)
        assert seq.decision is not None
        out.append(seq.decision)
    return out


LATENCY_ONLY = DecisionRule(run_duration_s=10, guards={}, bootstrap_resamples=200, keep_on="latency",
                            min_effect=0.15)


def test_the_spent_boundaries_hold_alpha_on_fresh_null_sequences():
    """The critical counts, applied to 20,000 null sequences drawn independently of the ones they were
    computed on: the probability of a claim at any look is at most alpha (plus 2.5 Monte Carlo SE)."""
    rng = np.random.default_rng(2026)
    n, k_max = 20_000, 40
    x, y = rng.random((n, k_max)), rng.random((n, k_max))
    u = np.zeros((n, k_max), dtype=np.int32)
    cur = np.zeros(n, dtype=np.int32)
    for k in range(k_max):
        cur += np.count_nonzero(y[:, :k] < x[:, k:k + 1], axis=1) + np.count_nonzero(y[:, k:k + 1] < x[:, :k], axis=1)
        cur += y[:, k] < x[:, k]
        u[:, k] = cur
    se = 2.5 * math.sqrt(0.05 * 0.95 / n)
    for gamma in (-4.0, 0.0):
        for k_end in (40, 22, 12):
            ks = tuple(look_grid(6, k_end, 2))
            cross = np.zeros(n, dtype=bool)
            for k, c in zip(ks, mw_bounds(ks, 0.05, gamma, 40), strict=True):
                cross |= u[:, k - 1] >= c
            assert 0.035 < cross.mean() <= 0.05 + se, (gamma, k_end, cross.mean())  # spent, not wasted


def test_false_keeps_at_zero_effect_stay_within_alpha_with_k_fixed_in_advance():
    ds = simulate(LATENCY_ONLY, 300, 1.0, sd=0.15, noise_sd=0.15, seed=1)
    keeps = sum(d.verdict == "keep" for d in ds) / len(ds)
    assert keeps <= 0.05 + 2.5 * math.sqrt(0.05 * 0.95 / len(ds))
    assert {d.k_max_used for d in ds} == {ds[0].k_max_used} and 10 < (ds[0].k_max_used or 0) < 40
    # futility stops end most of them before K
    assert np.mean([d.runs_before for d in ds]) < 0.8 * (ds[0].k_max_used or 0)


def test_false_keeps_at_zero_effect_with_k_estimated_from_the_first_look():
    ds = simulate(LATENCY_ONLY, 300, 1.0, sd=0.15, noise_sd=None, seed=2)
    keeps = sum(d.verdict == "keep" for d in ds) / len(ds)
    assert keeps <= 0.05 + 2.5 * math.sqrt(0.05 * 0.95 / len(ds))
    assert len({d.k_max_used for d in ds}) > 3  # K really varied with the first look's spread


def test_power_at_a_large_effect_is_high_and_early():
    ds = simulate(LATENCY_ONLY, 100, 0.7, sd=0.15, noise_sd=None, seed=3)
    assert sum(d.verdict == "keep" for d in ds) / len(ds) >= 0.95
    assert np.mean([d.runs_before for d in ds]) < 12  # mostly at the first two looks
    assert all(d.verdict != "rollback" for d in ds)


def test_the_mechanism_path_holds_its_share_at_a_reduction_of_exactly_r():
    """Latency unchanged (non-inferiority true) and the mechanism halved: exactly the boundary of "reduced by
    more than r = 0.5", so a mechanism keep is a false claim; it may happen at most A2 = 1% of the time."""
    rule = LATENCY_ONLY.model_copy(update={"keep_on": "latency_or_mechanism", "min_effect": 0.05})
    ds = simulate(rule, 300, 1.0, sd=0.02, noise_sd=0.02, seed=4, mech_ratio=0.5)
    mech = sum(d.kept_on == "mechanism" for d in ds) / len(ds)
    assert mech <= 0.01 + 2.5 * math.sqrt(0.01 * 0.99 / len(ds))
    assert sum(d.verdict == "keep" for d in ds) / len(ds) <= 0.05 + 2.5 * math.sqrt(0.05 * 0.95 / len(ds))
    # and a mechanism the change really removes is always shown; it carries the keep whenever the 6 + 6 runs
    # (K from path 1's power analysis at this spread) also show latency within +5% (about 9 in 10 here)
    ds = simulate(rule, 50, 1.0, sd=0.02, noise_sd=0.02, seed=5, mech_ratio=0.02)
    assert all(d.mechanisms[IPI].finding == "reduced" for d in ds)
    assert sum(d.kept_on == "mechanism" for d in ds) / len(ds) >= 0.8
