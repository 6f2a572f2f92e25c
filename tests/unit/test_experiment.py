"""A/B experiments on real cyclictest output recorded in the lab guest (tests/recorded/cyclictest/lab).

Idle runs stand in for profile A and runs under stress-ng for profile B: a difference the analysis must show.
Idle against idle (and stress against stress) is the same condition twice: a difference it must not claim.
The runs are parsed from the recorded files with the real parser (stdout and --json cross-checked); the only
thing added is the cyclictest settings the README names (`-i1000 -t1 -a1 -p95 -h20000`, 20 s)."""

from __future__ import annotations

import base64
import math
import re
import statistics

import numpy as np
import pytest
from pydantic import ValidationError

from orchestrator.core.errors import InputError
from orchestrator.measure.model import CyclictestSettings, LatencyResult, LoadSpec
from orchestrator.measure.parse import parse_cyclictest_file
from orchestrator.measure.pooled import PooledRuns
from orchestrator.report import plots
from orchestrator.report.ab import render_ab_html
from orchestrator.stats.ab import (
    ABArm,
    ABResult,
    ab_schedule,
    analyse,
    build_ab_result,
    cliffs_delta,
    cliffs_magnitude,
    hodges_lehmann,
    load_ab,
    run_sequence,
    save_ab,
)
from tests.conftest import RECORDED

pytestmark = pytest.mark.unit

LAB = RECORDED / "cyclictest" / "lab"
CONTROLLER = RECORDED / "cyclictest" / "controller"
LAB_SETTINGS = CyclictestSettings(cpus=[1], priority=95, interval_us=1000, duration_s=20, histogram_us=20000)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _lab_run(kind: str, i: int, **update) -> LatencyResult:
    stem = LAB / f"guest-{kind}-h20000-run{i}"
    result = parse_cyclictest_file(stem.with_suffix(".txt"), stem.with_suffix(".json"))
    return result.model_copy(update={"settings": LAB_SETTINGS, "target": "lab1.guest", **update})


@pytest.fixture(scope="module")
def idle() -> list[LatencyResult]:
    return [_lab_run("idle", i) for i in range(1, 5)]


@pytest.fixture(scope="module")
def stress() -> list[LatencyResult]:
    return [_lab_run("stress", i) for i in range(1, 9)]


@pytest.fixture(scope="module")
def idle_vs_stress(idle, stress):
    return {e.metric: e for e in analyse(idle, stress)}


# ------------------------------------------------------------------------------------------------ schedule


def test_abba_schedule_is_exact():
    assert ab_schedule(4) == list("ABBAABBA")
    assert ab_schedule(4, "ABBA") == ["A", "B", "B", "A", "A", "B", "B", "A"]
    assert ab_schedule(3) == list("ABBAAB")
    assert ab_schedule(2, "AB") == list("ABAB")
    for rounds in range(2, 12):
        s = ab_schedule(rounds)
        assert len(s) == 2 * rounds
        # every round holds one A and one B block; every two rounds cancel a linear drift (same mean position)
        for i in range(rounds):
            assert sorted(s[2 * i: 2 * i + 2]) == ["A", "B"]
        for start in range(0, 2 * rounds - 3, 4):
            block = s[start:start + 4]
            pos_a = [j for j, arm in enumerate(block) if arm == "A"]
            pos_b = [j for j, arm in enumerate(block) if arm == "B"]
            assert sum(pos_a) == sum(pos_b)


@pytest.mark.parametrize("rounds", [1, 0, -3, 2.5, True, "4"])
def test_schedule_refuses_too_few_rounds(rounds):
    with pytest.raises(InputError) as exc:
        ab_schedule(rounds)  # type: ignore[arg-type]
    assert repr(rounds) in str(exc.value)
    assert "at least 2 rounds" in str(exc.value)


def test_schedule_refuses_unknown_order():
    with pytest.raises(InputError, match="'ABAB'"):
        ab_schedule(4, "ABAB")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ statistics


def test_cliffs_delta_by_hand():
    # sign convention: P(B > A) - P(B < A); positive = B higher latency = B worse
    assert cliffs_delta([1, 2, 3], [4, 5, 6]) == 1.0
    assert cliffs_delta([4, 5, 6], [1, 2, 3]) == -1.0
    assert cliffs_delta([1, 2, 3], [1, 2, 3]) == 0.0
    # [1,2,3] vs [2,3,4]: B > A in 1+2+3 = 6 pairs, B < A in 1 pair (2 < 3), 2 ties: (6 - 1) / 9
    assert cliffs_delta([1, 2, 3], [2, 3, 4]) == pytest.approx(5 / 9)
    assert cliffs_delta([1, 3], [2]) == 0.0
    with pytest.raises(InputError):
        cliffs_delta([], [1.0])


@pytest.mark.parametrize(("delta", "label"), [(0.0, "negligible"), (0.146, "negligible"), (-0.146, "negligible"),
                                              (0.147, "small"), (0.329, "small"), (0.33, "medium"),
                                              (-0.473, "medium"), (0.474, "large"), (-1.0, "large")])
def test_cliffs_magnitude_romano_thresholds(delta, label):
    assert cliffs_magnitude(delta) == label


def test_hodges_lehmann_by_hand():
    # differences B - A of [1,2,3] -> [4,5,6]: 3 4 5 / 2 3 4 / 1 2 3, median 3
    assert hodges_lehmann([1, 2, 3], [4, 5, 6]) == 3.0
    assert hodges_lehmann([4, 5, 6], [1, 2, 3]) == -3.0


# ------------------------------------------------------------------------------------------------ analyse


def test_stress_is_shown_worse_than_idle(idle, stress, idle_vs_stress):
    e = idle_vs_stress["p99_us"]
    a = [r.all.p99_us for r in idle]
    b = [r.all.p99_us for r in stress]
    assert max(a) < min(b)  # what the recordings show: every stress run's p99 is above every idle run's
    assert e.median_a == statistics.median(a) and e.median_b == statistics.median(b)
    assert e.diff == pytest.approx(e.median_b - e.median_a)
    assert e.ratio == pytest.approx(e.median_b / e.median_a)
    assert e.ci_low > 0 and e.ci_low <= e.diff <= e.ci_high
    assert e.ratio_ci_low > 1
    assert e.verdict == "A better"
    assert e.cliffs_delta == 1.0 and e.cliffs_label == "large"
    # complete separation of 4 and 8 runs: the exact two-sided p is 2 / C(12, 4)
    assert e.rank_p_value == pytest.approx(2 / math.comb(12, 4))
    assert e.hl_shift > 0
    assert (e.runs_a, e.runs_b, e.confidence, e.resamples, e.seed, e.censored) == (4, 8, 0.95, 5000, 0, False)
    # p99.9 and the average are shown worse too; max varies too much between runs to show anything
    assert idle_vs_stress["p999_us"].verdict == "A better"
    assert idle_vs_stress["avg_us"].verdict == "A better"
    assert idle_vs_stress["max_us"].verdict == "no difference shown"
    assert idle_vs_stress["max_us"].ci_low < 0 < idle_vs_stress["max_us"].ci_high


def test_pooled_figures_are_the_pooled_histograms(idle, stress, idle_vs_stress):
    pooled = PooledRuns(idle)
    e = idle_vs_stress["p99_us"]
    assert e.pooled_a == pooled.percentile(0.99)
    assert idle_vs_stress["p999_us"].pooled_b == PooledRuns(stress).percentile(0.999)
    assert idle_vs_stress["max_us"].pooled_a == max(r.all.max_us for r in idle)
    assert idle_vs_stress["max_us"].pooled_b == max(r.all.max_us for r in stress)
    samples = sum(r.all.samples for r in idle)
    assert idle_vs_stress["avg_us"].pooled_a == pytest.approx(sum(r.all.avg_us * r.all.samples for r in idle)
                                                              / samples)
    assert not any(x.pooled_a_is_lower_bound or x.pooled_b_is_lower_bound for x in idle_vs_stress.values())


def test_idle_against_idle_claims_nothing(idle):
    effects = {e.metric: e for e in analyse(idle[:2], idle[2:])}
    assert all(e.verdict == "no difference shown" for e in effects.values())
    p99 = effects["p99_us"]
    assert p99.ci_low < 0 < p99.ci_high
    # what the data give honestly: idle run 1 had a hiccup (p99.9 10965 us against ~4290 in runs 2-4), so with
    # 2 runs per arm the percentile bootstrap of p99.9 alone would exclude 0 ...
    p999 = effects["p999_us"]
    assert p999.ci_high < 0
    # ... but the exact rank test cannot reject with 2 runs per arm (smallest two-sided p = 2 / C(4, 2)), so no
    # difference is claimed between two halves of the same condition
    assert p999.rank_p_value == pytest.approx(2 / math.comb(4, 2))
    assert p999.verdict == "no difference shown"


def test_stress_against_stress_claims_nothing(stress):
    for e in analyse(stress[:4], stress[4:]):
        assert e.verdict == "no difference shown"
        assert e.ci_low < 0 < e.ci_high, e.metric
        assert e.rank_p_value > 0.05


def test_seed_reproducibility(idle, stress):
    first = analyse(idle, stress, seed=7)
    again = analyse(idle, stress, seed=7)
    assert first == again
    other = analyse(idle, stress, seed=8)
    assert [e.verdict for e in other] == [e.verdict for e in first]
    assert [(e.ci_low, e.ci_high) for e in other] != [(e.ci_low, e.ci_high) for e in first]
    for e, o in zip(first, other, strict=True):
        width = e.ci_high - e.ci_low
        assert abs(o.ci_low - e.ci_low) < 0.25 * width and abs(o.ci_high - e.ci_high) < 0.25 * width
    # a metric's interval does not depend on which other metrics are analysed with it
    alone = analyse(idle, stress, metrics=("p999_us",), seed=7)[0]
    assert alone == next(e for e in first if e.metric == "p999_us")


def test_confidence_widens_the_interval(idle, stress):
    e95 = analyse(idle, stress, metrics=("p99_us",))[0]
    e99 = analyse(idle, stress, metrics=("p99_us",), confidence=0.99)[0]
    assert e99.ci_low <= e95.ci_low and e99.ci_high >= e95.ci_high and e99.confidence == 0.99


@pytest.mark.parametrize(("change", "words"), [
    ({"histogram_us": 10000}, "cyclictest settings"),
    ({"interval_us": 200}, "cyclictest settings"),
    ({"cpus": [0, 1]}, "cyclictest settings"),
])
def test_refuses_runs_measured_differently(idle, stress, change, words):
    other = LAB_SETTINGS.model_copy(update=change)
    b = [r.model_copy(update={"settings": other}) for r in stress]
    with pytest.raises(InputError, match=words) as exc:
        analyse(idle, b)
    assert "A run 1" in str(exc.value) and "B run 1" in str(exc.value)


def test_refuses_different_load_or_target_but_not_duration(idle, stress):
    b = [r.model_copy(update={"load": LoadSpec(kind="stress-ng", args=["--cpu", "2"])}) for r in stress]
    a = [r.model_copy(update={"load": LoadSpec()}) for r in idle]
    with pytest.raises(InputError, match="loads"):
        analyse(a, b)
    with pytest.raises(InputError, match="targets"):
        analyse(idle, [r.model_copy(update={"target": "lab2.guest"}) for r in stress])
    longer = LAB_SETTINGS.model_copy(update={"duration_s": 60})
    assert analyse(idle, [r.model_copy(update={"settings": longer}) for r in stress], metrics=("p99_us",))


def test_refuses_fewer_than_two_runs_and_bad_parameters(idle, stress):
    with pytest.raises(InputError, match=r"at least 2 runs per arm \(got 1 A, 8 B\)"):
        analyse(idle[:1], stress)
    with pytest.raises(InputError, match=r"got 4 A, 0 B"):
        analyse(idle, [])
    with pytest.raises(InputError, match="unknown metric 'p42_us'"):
        analyse(idle, stress, metrics=("p42_us",))
    with pytest.raises(InputError, match="resamples"):
        analyse(idle, stress, resamples=10)
    with pytest.raises(InputError, match="confidence"):
        analyse(idle, stress, confidence=1.0)


def test_percentiles_among_the_overflows_are_lower_bounds():
    # the controller's real -h 20 / -H 20 runs under stress-ng: p99 fell among the overflows in both
    settings = CyclictestSettings(cpus=[0, 1], interval_us=200, duration_s=10, histogram_us=20)
    runs = [parse_cyclictest_file(CONTROLLER / name).model_copy(update={"settings": settings})
            for name in ("histogram-h20-2threads-load.txt", "histogram-H20-2threads-load.txt")]
    assert all(r.all.p99_us is None and r.all.overflows for r in runs)
    e = analyse(runs, runs, metrics=("p99_us",))[0]
    assert e.censored and (e.censored_a, e.censored_b) == (2, 2)
    assert e.median_a == e.median_b == 20.0 and e.median_a_is_lower_bound and e.median_b_is_lower_bound
    assert e.pooled_a == 20.0 and e.pooled_a_is_lower_bound
    # censored runs tie with each other: no claim either way
    assert e.cliffs_delta == 0.0 and e.rank_p_value == 1.0 and e.verdict == "no difference shown"


# ------------------------------------------------------------------------------------------------ result


@pytest.fixture(scope="module")
def ab(idle, stress) -> ABResult:
    return build_ab_result("lab1", "idle", "stress", idle, stress[:4], rounds=4, started=1795000000.0,
                           ended=1795000200.0, notes=["B stands in for a worse profile: stress-ng ran beside it"])


def test_build_ab_result(ab, idle, stress):
    assert ab.order == list("ABBAABBA")
    assert ab.design == "ABBA" and ab.runs_per_block == 1
    assert ab.profiles == {"A": "idle", "B": "stress"}
    assert ab.target == "lab1.guest"
    assert ab.settings["cyclictest"]["histogram_us"] == 20000
    assert [e.metric for e in ab.effects] == ["p99_us", "p999_us", "max_us", "avg_us"]
    assert ab.effect("p99_us") == analyse(idle, stress[:4], metrics=("p99_us",))[0]
    seq = [(arm, i) for arm, i, _ in run_sequence(ab)]
    assert seq == [("A", 1), ("B", 1), ("B", 2), ("A", 2), ("A", 3), ("B", 3), ("B", 4), ("A", 4)]
    # 2 rounds of 2 runs per block, AB
    two = build_ab_result("lab1", "idle", "stress", idle, stress[:4], rounds=2, design="AB", metrics=("p99_us",))
    assert two.order == list("AABBAABB") and two.design == "AB" and two.runs_per_block == 2
    with pytest.raises(InputError, match="give the order"):
        build_ab_result("lab1", "idle", "stress", idle, stress[:3], rounds=2, metrics=("p99_us",))


def test_result_as_the_runner_builds_it(idle, stress):
    # the keywords orchestrator/run/ab.py passes: the arm of every run in measuring order, profiles, started/ended
    a, b = idle[:4], stress[:4]
    order = [arm for arm in ab_schedule(2) for _ in range(2)]  # ABBA, 2 runs per block
    result = ABResult(unit="u1", target="guest", profiles={"A": "a.yaml", "B": "b.yaml"}, rounds=2, order=order,
                      arms=[ABArm(name="A", profile="a.yaml", runs=a), ABArm(name="B", profile="b.yaml", runs=b)],
                      effects=analyse(a, b), settings={"cyclictest": LAB_SETTINGS.model_dump(mode="json"),
                                                       "load": LoadSpec().model_dump(mode="json"),
                                                       "runs_per_block": 2},
                      started=1795000000.0, ended=1795000300.0)
    assert result.design == "ABBA" and result.runs_per_block == 2
    assert [(arm, i) for arm, i, _ in run_sequence(result)] == [
        ("A", 1), ("A", 2), ("B", 1), ("B", 2), ("B", 3), ("B", 4), ("A", 3), ("A", 4)]


def test_run_sequence_without_order_follows_start_times(idle, stress):
    a = [r.model_copy(update={"started_at": 100.0 * t}) for r, t in zip(idle[:2], (1, 4), strict=True)]
    b = [r.model_copy(update={"started_at": 100.0 * t}) for r, t in zip(stress[:2], (2, 3), strict=True)]
    result = ABResult(unit="lab1", rounds=2, arms=[ABArm(name="A", profile="idle", runs=a),
                                                   ABArm(name="B", profile="stress", runs=b)])
    assert result.profiles == {"A": "idle", "B": "stress"} and result.design is None
    assert [(arm, i) for arm, i, _ in run_sequence(result)] == [("A", 1), ("B", 1), ("B", 2), ("A", 2)]


def test_result_refuses_inconsistent_fields(ab):
    data = ab.model_dump()
    with pytest.raises(ValidationError, match="order has 5 A and 3 B runs"):
        ABResult.model_validate({**data, "order": list("ABBAABAA")})
    assert ABResult.model_validate({**data, "order": list("ABABABAB")}).design == "AB"
    assert ABResult.model_validate({**data, "order": list("AAAABBBB")}).design is None
    with pytest.raises(ValidationError, match="arms must be"):
        ABResult.model_validate({**data, "arms": [data["arms"][1], data["arms"][0]]})
    with pytest.raises(ValidationError, match="do not match the arms"):
        ABResult.model_validate({**data, "profiles": {"A": "stress", "B": "idle"}})
    with pytest.raises(ValidationError):
        ABResult.model_validate({**data, "rounds": 1})


def test_json_round_trip(ab, tmp_path):
    path = save_ab(ab, tmp_path / "ab.json")
    back = load_ab(path)
    assert back == ab
    assert back.model_dump_json() == ab.model_dump_json()
    assert back.arm("B").runs[0].all.histogram == ab.arm("B").runs[0].all.histogram


def test_load_ab_refuses_other_files(tmp_path):
    with pytest.raises(InputError, match="cannot read"):
        load_ab(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"unit": "lab1"}')
    with pytest.raises(InputError, match="not an A/B result"):
        load_ab(bad)


# ------------------------------------------------------------------------------------------------ HTML


def test_render_ab_html(ab, tmp_path):
    colors_before = dict(plots.SIDE_COLOR)
    path = render_ab_html(ab, tmp_path / "ab.html")
    text = path.read_text(encoding="utf-8")
    assert plots.SIDE_COLOR == colors_before  # the A/B colours are passed to the plots, not lent to them

    # self-contained: every src is a data: URI, nothing is loaded from elsewhere
    srcs = re.findall(r'\bsrc\s*=\s*"([^"]*)"', text)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "http://" not in text and "https://" not in text and "<link" not in text and "<script" not in text
    pngs = [base64.b64decode(s.split(",", 1)[1]) for s in srcs]
    assert len(pngs) >= 3 and all(p.startswith(PNG_SIGNATURE) for p in pngs)
    for p in pngs:
        width, height = np.frombuffer(p[16:24], dtype=">u4")
        assert width > 300 and height > 100

    # the summary table: one row per metric with the analysis' own figures and verdict
    for e in ab.effects:
        row = re.search(rf'<tr data-metric="{e.metric}">(.*?)</tr>', text)
        assert row, e.metric
        cells = dict(re.findall(r'data-col="([^"]+)">(.*?)</td>', row.group(1)))
        assert float(cells["A median"]) == pytest.approx(e.median_a, abs=0.05)  # one decimal at most
        assert float(cells["B median"]) == pytest.approx(e.median_b, abs=0.05)
        lo, hi = (float(x) for x in cells["95% CI of B \u2212 A"].split(" .. "))
        assert (lo, hi) == (pytest.approx(e.ci_low, abs=0.05), pytest.approx(e.ci_high, abs=0.05))
        assert f'data-verdict="{e.verdict}"' in row.group(1)
        assert cells["Cliff&#x27;s \u03b4 (B vs A)"] == f"{e.cliffs_delta:+.2f} ({e.cliffs_label})"
        assert cells["rank test p"] == f"{e.rank_p_value:.3g}"

    # conditions and honest notes
    for words in ("lab1.guest", "idle", "stress", "histogram 20000 us", "interval 1000 us", "ABBA",
                  "\u201cno difference shown\u201d is not \u201cno difference\u201d",
                  "beyond the histogram", "B stands in for a worse profile"):
        assert words in text, words
    # the per-run table in measuring order
    rows = re.findall(r'<tr data-row="([AB]/\d+)">', text)
    assert rows == ["A/1", "B/1", "B/2", "A/2", "A/3", "B/3", "B/4", "A/4"]


def test_render_ab_html_notes_what_was_not_recorded(idle, stress, tmp_path):
    # AB order, 2 runs per block: the drift warning of AB; then no order and no start times at all
    two = build_ab_result("lab1", "idle", "stress", idle, stress[:4], rounds=2, design="AB", metrics=("p99_us",))
    text = render_ab_html(two, tmp_path / "ab.html").read_text(encoding="utf-8")
    assert "order AB, 2 run(s) per block (AABBAABB)" in text and "Order AB: a drift" in text
    bare = ABResult(unit="lab1", rounds=2, arms=two.arms, effects=two.effects)
    text = render_ab_html(bare, tmp_path / "bare.html").read_text(encoding="utf-8")
    assert "Neither the measuring order nor start times were recorded" in text
    assert re.findall(r'<tr data-row="([AB]/\d+)">', text) == ["A/1", "A/2", "A/3", "A/4",
                                                                 "B/1", "B/2", "B/3", "B/4"]
