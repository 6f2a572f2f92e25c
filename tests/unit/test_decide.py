"""The keep/rollback decision: rule, sequential driver, overflow handling, and the playbook loader.

Results are built from the result model directly (plain pydantic), never from invented tool output."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest

from orchestrator.config.playbook import load_decision_rule
from orchestrator.core.errors import InputError
from orchestrator.measure.model import CyclictestSettings, LatencyResult, LatencyStats, LoadSpec
from orchestrator.measure.parse import parse_cyclictest_file
from orchestrator.stats.decide import DecisionRule, SequentialDecision, decide, run_values

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
RECORDED = REPO / "benchmarks" / "data" / "local-x86"  # real runs: cyclictest -h 5000 --json, 10 s each
SETTINGS = CyclictestSettings(duration_s=10, histogram_us=5000)
LOAD = LoadSpec(kind="stress-ng", args=["--cpu", "1"])


def run(p999: int | None, *, p99: int | None = None, mx: int | None = None, overflows: int = 0,
        settings: CyclictestSettings | None = SETTINGS) -> LatencyResult:
    """One run's all-threads figures (10 s at 1 kHz)."""
    p99 = p99 if p99 is not None else (min(p999, 4999) // 2 if p999 is not None else 40)
    mx = mx if mx is not None else (p999 * 3 if p999 is not None else 9000)
    stats = LatencyStats(samples=10000, min_us=3, avg_us=8.0, p50_us=7, p90_us=12, p99_us=p99, p999_us=p999,
                         p9999_us=None if p999 is None else min(p999 + 10, mx), max_us=mx, overflows=overflows)
    return LatencyResult(target="lab1.guest", form="json", threads=[stats.model_copy(update={"thread": 0})],
                         all=stats, settings=settings, load=LOAD, duration_s=10.0)


def lognormal_runs(rng: np.random.Generator, k: int, median: float, sd: float = 0.15,
                   max_factor: float = 3.0) -> list[LatencyResult]:
    out = []
    for _ in range(k):
        z = rng.normal(0, sd)
        p999 = round(median * math.exp(z))
        p99 = round(median / 2 * math.exp(z / 2))
        mx = round(median * max_factor * math.exp(rng.normal(0, 0.4)))
        out.append(run(p999, p99=p99, mx=max(mx, p999)))
    return out


def drive(seq: SequentialDecision, make_before, make_after) -> None:
    while (side := seq.next_side()) is not None:
        seq.add(side, make_before() if side == "before" else make_after())


# ------------------------------------------------------------------------------------------- the verdicts


def test_clear_improvement_is_kept():
    rng = np.random.default_rng(1)
    d = decide(lognormal_runs(rng, 8, 100), lognormal_runs(rng, 8, 60), DecisionRule())
    assert d.verdict == "keep" and d.action == "keep"
    p = d.metrics["p999_us"]
    assert p.finding == "better"
    assert -0.5 < p.rel_diff < -0.3 and p.ci_high < 0 and p.rank_ci_high < 0
    assert d.runs_before == d.runs_after == 8 and d.measuring_time_s == 160
    assert "Kept" in d.reason and "p99.9" in d.reason


def test_clear_regression_is_rolled_back():
    rng = np.random.default_rng(2)
    d = decide(lognormal_runs(rng, 8, 100), lognormal_runs(rng, 8, 160), DecisionRule())
    assert d.verdict == "rollback" and d.action == "rollback"
    assert d.metrics["p999_us"].finding == "worse"
    assert "shown worse" in d.reason


@pytest.mark.parametrize("seed", range(10))
def test_identical_distributions_are_not_kept(seed):
    rng = np.random.default_rng(100 + seed)
    seq = SequentialDecision(DecisionRule())
    drive(seq, lambda: lognormal_runs(rng, 1, 100, sd=0.3)[0], lambda: lognormal_runs(rng, 1, 100, sd=0.3)[0])
    d = seq.decision
    assert d.final and d.verdict != "keep" and d.action == "rollback"


def test_identical_distributions_under_policy_keep_are_kept():
    rng = np.random.default_rng(7)
    rule = DecisionRule(inconclusive="keep")
    d = decide(lognormal_runs(rng, 12, 100, sd=0.3), lognormal_runs(rng, 12, 100, sd=0.3), rule)
    assert d.verdict == "inconclusive" and d.action == "keep"
    assert "policy 'keep'" in d.reason


def test_guard_regression_rolls_back_even_when_primary_improves():
    rng = np.random.default_rng(3)
    before = lognormal_runs(rng, 8, 100, max_factor=3)
    after = lognormal_runs(rng, 8, 70, max_factor=30)  # p99.9 -30%, max about 7x
    d = decide(before, after, DecisionRule())
    assert d.metrics["p999_us"].finding == "better"
    assert d.metrics["max_us"].finding == "regressed"
    assert d.verdict == "rollback" and d.action == "rollback"
    assert "max is shown to regress beyond its 25% tolerance" in d.reason


def test_small_max_noise_within_tolerance_does_not_block_keep():
    rng = np.random.default_rng(4)
    before = lognormal_runs(rng, 8, 100, max_factor=3)
    after = lognormal_runs(rng, 8, 60, max_factor=3 * 1.1 / 0.6)  # max 10% worse: within 25%
    d = decide(before, after, DecisionRule())
    assert d.verdict == "keep"


# ------------------------------------------------------------------------------------ the sequential loop


def test_early_stop_uses_fewer_runs_than_k_max_for_a_clear_case():
    rng = np.random.default_rng(5)
    rule = DecisionRule()
    seq = SequentialDecision(rule)
    drive(seq, lambda: lognormal_runs(rng, 1, 100)[0], lambda: lognormal_runs(rng, 1, 50)[0])
    d = seq.decision
    assert d.verdict == "keep" and d.stopped_early and d.look == 1
    assert d.runs_before == d.runs_after == rule.k_min < rule.k_max
    assert d.measuring_time_s == 2 * rule.k_min * 10.0  # the runs' own durations
    assert seq.next_side() is None
    with pytest.raises(InputError):
        seq.add("before", run(100))


def test_abba_order_is_balanced_and_interim_looks_ask_for_more():
    seq = SequentialDecision(DecisionRule())
    sides = []
    rng = np.random.default_rng(6)
    while (side := seq.next_side()) is not None:
        sides.append(side)
        seq.add(side, lognormal_runs(rng, 1, 100, sd=0.3)[0])
    assert sides[:8] == ["before", "after", "after", "before"] * 2
    assert seq.history[0].final is False and "measure more" in seq.history[0].reason
    assert sides.count("before") == sides.count("after") == seq.decision.runs_before


def test_blocked_order_switches_at_most_twice_per_look():
    seq = SequentialDecision(DecisionRule(order="blocked"))
    rng = np.random.default_rng(8)
    sides = []
    while (side := seq.next_side()) is not None:
        sides.append(side)
        seq.add(side, lognormal_runs(rng, 1, 100, sd=0.3)[0])
    switches = sum(1 for a, b in itertools.pairwise(sides) if a != b)
    assert switches <= 2 * len(seq.history)
    assert sides[:5] == ["before"] * 5 and sides[5:10] == ["after"] * 5


def test_bonferroni_levels_per_look():
    rule = DecisionRule()
    assert rule.look_schedule() == [5, 12, 20]
    assert rule.alpha_per_look() == pytest.approx(0.05 / 3)
    assert DecisionRule(looks=1).look_schedule() == [20]
    assert DecisionRule(k_max=12).look_schedule() == [5, 8, 12]


def recorded(n: int) -> LatencyResult:
    """Recorded run n, with the settings it was measured under (as the runner records them)."""
    res = parse_cyclictest_file(RECORDED / f"run{n:02d}.json")
    return res.model_copy(update={"settings": SETTINGS, "load": LOAD, "duration_s": 10.0})


def test_recorded_runs_split_in_two_are_not_kept():
    # the same machine and load on both sides, runs taken alternately: nothing may be kept
    before = [recorded(n) for n in range(1, 25, 2)]
    after = [recorded(n) for n in range(2, 25, 2)]
    d = decide(before, after, DecisionRule())
    assert d.verdict != "keep" and d.action == "rollback"
    assert d.runs_before == d.runs_after == 12


# ---------------------------------------------------------------------------------------------- overflows


def test_recorded_overflow_run_is_censored_at_the_histogram_size():
    run01 = recorded(1)  # 6 samples beyond the 5000 us histogram: p99.99 lies among them
    assert run01.all.overflows == 6 and run01.all.p9999_us is None
    vals, cens = run_values([run01, recorded(2)], "p9999_us", "before")
    assert vals[0] == 5000 and cens.tolist() == [True, False]
    rule = DecisionRule(primary="p9999_us", guards={})
    d = decide([recorded(n) for n in range(1, 11)], [recorded(n) for n in range(11, 21)], rule)
    assert d.metrics["p9999_us"].censored_before >= 2


def test_none_percentiles_are_lower_bounds_not_dropped():
    before = [run(100 + i) for i in range(6)]
    after = [run(60 + i) for i in range(4)] + [run(None, p99=30, mx=7000, overflows=12) for _ in range(2)]
    vals, cens = run_values(after, "p999_us", "after")
    assert list(cens) == [False] * 4 + [True] * 2 and vals[-1] == 5000  # the histogram size
    d = decide(before, after, DecisionRule())
    p = d.metrics["p999_us"]
    assert p.censored_after == 2 and p.censored_before == 0
    assert d.verdict != "keep"  # two after runs are beyond 5 ms: ranked above every before run
    assert "beyond the histogram" in d.reason and "lower bound" in d.reason


def test_censored_median_is_flagged():
    after = [run(None, mx=9000, overflows=20) for _ in range(4)] + [run(100) for _ in range(2)]
    d = decide([run(100 + i) for i in range(6)], after, DecisionRule())
    assert d.metrics["p999_us"].after_median_is_lower_bound
    assert d.metrics["p999_us"].after_median_us == 5000
    assert d.action == "rollback"


def test_histogram_size_falls_back_to_the_histogram_when_settings_are_missing():
    stats = LatencyStats(samples=1000, min_us=5, avg_us=5.0, p99_us=40, p999_us=None, max_us=9000, overflows=3,
                         histogram={5: 900, 40: 90, 1999: 7})
    res = LatencyResult(form="histogram", threads=[stats.model_copy(update={"thread": 0})], all=stats)
    vals, cens = run_values([res], "p999_us", "after")
    assert vals[0] == 2000 and cens[0]


def test_summary_form_without_percentiles_is_an_input_error():
    stats = LatencyStats(samples=10000, min_us=3, avg_us=8.0, max_us=90)  # summary form: no histogram
    res = LatencyResult(form="summary", threads=[stats.model_copy(update={"thread": 0})], all=stats,
                        settings=SETTINGS, load=LOAD)
    with pytest.raises(InputError, match="no histogram"):
        decide([res] * 5, [res] * 5, DecisionRule())


def test_runs_under_different_loads_are_not_compared():
    before = [run(100 + i) for i in range(5)]
    after = [run(60 + i).model_copy(update={"load": LoadSpec(kind="none")}) for i in range(5)]
    with pytest.raises(InputError, match="different loads"):
        decide(before, after, DecisionRule())


# ------------------------------------------------------------------------------------ rule and playbook


def test_playbook_loads_into_the_rule():
    rule = load_decision_rule(REPO / "playbooks" / "measurement.yaml")
    assert rule.primary == "p999_us" and rule.guards == {"max_us": 0.25, "p99_us": 0.10}
    assert rule.inconclusive == "rollback" and rule.k_min <= rule.k_max


def _plan(tmp_path: Path, decision: str) -> Path:
    p = tmp_path / "measurement.yaml"
    p.write_text("cyclictest:\n  cpus: [1]\n  duration_s: 20\nload:\n  kind: stress-ng\n"
                 "decision:\n" + decision)
    return p


def test_bad_rule_values_name_file_and_line(tmp_path):
    p = _plan(tmp_path, "  primary: p999_us\n  confidence: 1.5\n  guards:\n    max_us: -1\n"
                        "  inconclusive: maybe\n")
    with pytest.raises(InputError) as exc:
        load_decision_rule(p)
    msg = str(exc.value)
    assert f"{p}:8: decision.confidence" in msg
    assert f"{p}:10: decision.guards" in msg
    assert f"{p}:11: decision.inconclusive" in msg


def test_unknown_rule_key_names_file_and_line(tmp_path):
    p = _plan(tmp_path, "  run_duration_s: 20\n  confidense: 0.9\n")
    with pytest.raises(InputError, match=rf"{p}:8: decision.confidense: Extra inputs"):
        load_decision_rule(p)


@pytest.mark.parametrize("decision, message", [
    ("  k_min: 12\n  k_max: 5\n", "k_min .12. is larger than k_max"),
    ("  k_min: 3\n", "can never show anything"),
    ("  guards: {p999_us: 0.1}\n", "cannot also be a guard"),
    ("  run_duration_s: 10\n", "must be the same"),
])
def test_inconsistent_rules_are_input_errors(tmp_path, decision, message):
    if "run_duration_s" not in decision:
        decision += "  run_duration_s: 20\n"
    with pytest.raises(InputError, match=message):
        load_decision_rule(_plan(tmp_path, decision))
