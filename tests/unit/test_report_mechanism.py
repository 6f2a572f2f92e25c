"""The apply report's mechanism evidence (issue #18 item 7), on recorded data only.

Latency: the x86 lab guest's cyclictest runs (tests/recorded/cyclictest/lab: 8 under stress-ng, 4 idle, `-a1 -i1000
-D20s -h20000`), parsed with the real parser. Counters: the diagnosis windows' two /proc/interrupts reads
(tests/recorded/diagnose: the x86 guest with the crash-looping service, the same guest booted with nohz_full=1
and two busy loops on CPU 1, and the arm64 lab host on 6.12 and 6.1), parsed into CounterDeltas by
measure/counters.py as a run's own counters are. Which recording stands for "before" and which for "after" is
this test's choice (the lab has no before/after recording of one change yet); every count is the kernel's. Rates
come from the counters through the change kind's declared mechanism (changes/mechanism.py, as run/evidence.py
computes them), the decisions from the real rule fed run by run (stats/decide.py), and the reports from
run/apply.py's own report builder over ChangeOutcomes."""

from __future__ import annotations

import base64
import functools
import html as htmllib
import json
import math
import re
import statistics

import pytest

from orchestrator.changes.mechanism import Mechanism, mechanisms_for
from orchestrator.measure.counters import CounterDeltas, counter_deltas, parse_snapshot, rate_of
from orchestrator.measure.model import CyclictestSettings, LatencyResult
from orchestrator.measure.parse import parse_cyclictest_file
from orchestrator.report.latency import Report, load_report, render_html
from orchestrator.report.mechanism import cpu_rates, decision_path, fmt_rate, side_cpu_medians
from orchestrator.report.plots import RatePanel, render_cpu_rates_png
from orchestrator.run.apply import _report
from orchestrator.run.context import ChangeOutcome
from orchestrator.run.engine import ApplyResult
from orchestrator.stats.decide import DecisionRule, SequentialDecision
from tests.conftest import RECORDED, REPO
from tests.unit.test_counters import count, window, window_deltas

pytestmark = pytest.mark.unit

LAB = RECORDED / "cyclictest" / "lab"
PNG = b"\x89PNG\r\n\x1a\n"
#: the recorded command's settings (tests/recorded/cyclictest/lab/README.md): -p95 -i1000 -t1 -a1 -D20s -h20000
SETTINGS = CyclictestSettings(cpus=[1], priority=95, interval_us=1000, duration_s=20, histogram_us=20000)
RT_CPUS = [1]


@functools.cache
def deltas(prefix: str) -> CounterDeltas:
    return window_deltas(prefix)


def recorded_count(prefix: str, row: str, cpu: int) -> int:
    """A row's count over the window on one CPU, read from the recording with a regex (not the parser)."""
    return count(window(prefix), "interrupts1", row, cpu) - count(window(prefix), "interrupts0", row, cpu)


def interval(prefix: str) -> float:
    s = window(prefix)
    return round(float(s["uptime1"].split()[0]) - float(s["uptime0"].split()[0]), 2)


def lab_run(kind: str, i: int, counters: CounterDeltas | None) -> LatencyResult:
    res = parse_cyclictest_file(LAB / f"guest-{kind}-h20000-run{i}.json")
    return res.model_copy(update={"target": "lab1.guest", "settings": SETTINGS, "counters": counters})


def lab_noise_sd() -> float:
    """The lab guest's run-to-run SD of log p99.9 under stress (the 8 recorded runs): its noise profile."""
    return statistics.stdev(math.log(lab_run("stress", i, None).all.p999_us) for i in range(1, 9))


def run_rule(rule: DecisionRule, mech: Mechanism, before: list[LatencyResult], after: list[LatencyResult],
             rates_of, *, latency_applicable: bool = True, noise_sd: float | None = None):
    """The rule fed run by run in the order it asks for, as the transaction does; rates_of(result) -> the rate."""
    seq = SequentialDecision(rule, latency_applicable=latency_applicable, mechanisms=[mech.label],
                             noise_sd=noise_sd)
    queue = {"before": list(before), "after": list(after)}
    rates: dict[str, list[dict[str, float | None]]] = {"before": [], "after": []}
    while (step := seq.next_step()) is not None:
        res = queue[step.side].pop(0)
        r = {mech.label: rates_of(res)}
        rates[step.side].append(r)
        seq.add(step.side, res, r)
    assert seq.decision is not None
    return json.loads(seq.decision.model_dump_json()), rates, seq.runs


def outcome(change_id: str, kind: str, target: str, mech: Mechanism, read_on: str, decision, rates, runs,
            latency_applicable: bool = True) -> ChangeOutcome:
    status = "kept" if decision["action"] == "keep" else "rolled_back"
    return ChangeOutcome(id=change_id, target=target, kind=kind, description=change_id, status=status,
                         reason=decision["reason"][:200], decision=decision, before=runs["before"],
                         after=runs["after"], mechanisms=[{**mech.public(), "read_on": read_on}], rates=rates,
                         latency_applicable=latency_applicable)


SERVICE = mechanisms_for("service_disable", {}, "host")[0]
TIMER_MIGRATION = mechanisms_for("sysctl", {"name": "kernel.timer_migration"}, "host")[0]
(NOHZ,) = mechanisms_for("cmdline", {"add": {"nohz_full": "1"}}, "host")


@pytest.fixture(scope="module")
def service() -> ChangeOutcome:
    """Disabling the crash-looping service, measured in the guest: before = the window with the crash loop."""
    before = [lab_run("stress", i, deltas("x86-guest")) for i in (1, 2, 3, 4, 5, 7)]
    after = [lab_run("stress", i, deltas("x86-guest-nohz-busy")) for i in (6, 8)]
    after += [lab_run("idle", i, deltas("x86-guest-nohz-busy")) for i in (1, 2, 3, 4)]
    rule = DecisionRule(k_min=6, k_max=6, min_effect=0.1)
    dec, rates, runs = run_rule(rule, SERVICE, before, after, lambda r: SERVICE.rate(r.counters, RT_CPUS).value,
                                noise_sd=lab_noise_sd())
    return outcome("mirobot_teleoperate.disabled", "service_disable", "guest", SERVICE, "guest", dec, rates, runs)


@pytest.fixture(scope="module")
def host_sysctl() -> ChangeOutcome:
    """A host sysctl measured in the x86 lab's sibling guest (latency not applicable); its mechanism is read on
    the host: the arm64 lab host's windows (6.12 before, 6.1 after) stand for the host's counters."""
    before = [lab_run("stress", i, deltas("x86-guest")) for i in (1, 2, 3, 4)]
    after = [lab_run("stress", i, deltas("x86-guest")) for i in (5, 6, 7, 8)]
    host = {id(r): deltas("arm64-host") for r in before} | {id(r): deltas("arm64-host-6.1") for r in after}
    rule = DecisionRule(k_min=4, k_max=4)
    dec, rates, runs = run_rule(rule, TIMER_MIGRATION, before, after,
                                lambda r: TIMER_MIGRATION.rate(host[id(r)], RT_CPUS).value, latency_applicable=False)
    return outcome("kernel.timer_migration=0", "sysctl", "host", TIMER_MIGRATION, "host", dec, rates, runs,
                   latency_applicable=False)


@pytest.fixture(scope="module")
def boot_change() -> ChangeOutcome:
    """A boot change with one boot per side (the playbook allowed fewer than 3): no error guarantee."""
    before = [lab_run("idle", i, deltas("x86-guest")) for i in (1, 2, 3)]
    after = [lab_run("stress", i, deltas("x86-guest-nohz-busy")) for i in (1, 2, 3)]
    rule = DecisionRule(order="blocked", boots_per_side=1, runs_per_boot=3, k_min=3, k_max=3)
    dec, rates, runs = run_rule(rule, NOHZ, before, after, lambda r: NOHZ.rate(r.counters, RT_CPUS).value)
    return outcome("cmdline.guest", "cmdline", "guest", NOHZ, "guest", dec, rates, runs)


@pytest.fixture(scope="module")
def report(service, host_sysctl, boot_change) -> Report:
    result = ApplyResult(unit="lab1", profile="rt-profile", dry_run=False,
                         outcomes=[service, host_sysctl, boot_change])
    return _report([result], "tune apply rt-profile")


@pytest.fixture(scope="module")
def html(report, tmp_path_factory) -> str:
    path = render_html(report, tmp_path_factory.mktemp("mech") / "report.html")
    return path.read_text()


def section(html: str, n: int) -> str:
    start = html.index(f'<section id="change-{n}"')
    return html[start:html.index("</section>", start)]


def cell(sec: str, label: str, col: str) -> str:
    row = re.search(rf'<tr data-mechanism="{re.escape(label)}">(.*?)</tr>', sec).group(1)
    return re.search(rf'data-col="{col}">(.*?)</td>', row).group(1)


def images(sec: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', sec)]


# ---- the report model ----------------------------------------------------------------------------------------


def test_apply_report_carries_mechanisms_rates_and_applicability(report, service, host_sysctl):
    first, second, _ = report.changes
    assert first.mechanisms == service.mechanisms and first.mechanisms[0]["read_on"] == "guest"
    assert first.rates == service.rates and len(first.rates["before"]) == 6 and first.latency_applicable
    assert second.latency_applicable is False and second.rates == host_sysctl.rates


def test_a_report_saved_before_the_mechanism_fields_loads_and_renders(report, tmp_path):
    doc = json.loads(report.model_dump_json())
    for change in doc["changes"]:
        for key in ("mechanisms", "rates", "latency_applicable"):
            del change[key]
        # and the decision as the rule wrote it before issue #18: no kept_on, power or mechanisms
        for key in ("kept_on", "mechanisms", "power_at_min_effect", "power_note", "k_max_used", "sd_log", "sd_source",
                    "guarantee_holds", "latency_applicable", "boots_before", "boots_after"):
            change["decision"].pop(key, None)
    path = tmp_path / "old.json"
    path.write_text(json.dumps(doc))
    old = load_report(path)
    assert [c.mechanisms for c in old.changes] == [[], [], []] and all(c.latency_applicable for c in old.changes)
    text = render_html(old, tmp_path / "old.html").read_text()
    assert "data-latency=" not in text and "<b>Power at" not in text and "data-guarantee=" not in text
    assert text.count("No mechanism declared or recorded for this change") == 3
    assert text.count('data-path="') == 3


# ---- how the decision was reached, and the power --------------------------------------------------------------


def test_kept_on_mechanism_line_from_the_real_rule(html, service):
    dec = service.decision
    assert dec["verdict"] == "keep" and dec["kept_on"] == "mechanism"
    mc = dec["mechanisms"][SERVICE.label]
    sec = section(html, 1)
    line = re.search(r'<p class="path mechanism" data-path="mechanism"><b>How it was decided:</b> (.*?)</p>',
                     sec).group(1)
    pct = f"{(mc['ratio'] - 1) * 100:+.0f}%"
    assert line.startswith(f"Kept on mechanism: {SERVICE.label} {pct} [")
    assert line.endswith("p99.9 not worse than +10%.")
    assert "on mechanism" in html[:html.index('<section id="change-1"')]  # the summary says so too


def test_power_line_states_the_power_k_and_spread_the_rule_used(html, service):
    dec = service.decision
    assert isinstance(dec["power_at_min_effect"], float) and dec["k_max_used"] == 6
    assert dec["sd_source"] == "noise profile" and dec["sd_log"] == pytest.approx(lab_noise_sd())
    sec = section(html, 1)
    power = re.search(r'<p class="power[^"]*" data-power="([0-9.]+)"><b>Power at min_effect \(-10% in p99.9\):</b> '
                      r"(\d+)% \(K = 6 runs per side; run-to-run log-SD of p99.9 ([0-9.]+), from the unit&#x27;s noise "
                      r"profile\)", sec)
    assert power, sec[:3000]
    assert float(power.group(1)) == pytest.approx(dec["power_at_min_effect"], abs=1e-4)
    assert power.group(2) == f"{dec['power_at_min_effect'] * 100:.0f}"
    assert float(power.group(3)) == pytest.approx(dec["sd_log"], rel=1e-2)
    # K = 6 is below what the spread asks for: the rule's shortfall note is shown as a warning
    assert dec["power_note"] and "Power short of the target: " + dec["power_note"].split(":")[0] in sec
    assert 'data-guarantee="yes"' in sec


def test_latency_not_applicable_is_visible_and_the_decision_rests_on_the_mechanism(html, host_sysctl):
    dec = host_sysctl.decision
    assert dec["latency_applicable"] is False
    sec = section(html, 2)
    assert '<p class="warn na" data-latency="not applicable"><b>Latency not applicable:</b>' in sec
    assert "Figures (us, all threads): latency not applicable" in sec
    assert "Power at min_effect" in sec and "not computed: the latency does not decide this change" in sec
    kind, text = decision_path(dec)
    assert kind == dec["verdict"] and f'data-path="{kind}"' in sec and text in htmllib.unescape(sec)
    # the host's mechanism is not in the guest's counters: per-run rates, and said why there is no per-CPU plot
    assert "read on the host around each run; the runs&#x27; counters are the guest&#x27;s" in sec
    assert images(sec) and len(images(sec)) == 2  # the two latency plots only
    summary = html[:html.index('<section id="change-1"')]
    assert summary.count("latency not applicable") == 1


def test_boot_change_without_the_guarantee_says_so(html, boot_change):
    dec = boot_change.decision
    assert dec["guarantee_holds"] is False and dec["boots_before"] == 1
    sec = section(html, 3)
    assert ('<p class="warn guarantee" data-guarantee="no"><b>The error guarantee does not hold</b> '
            "(1 boot(s) before, 1 after)") in sec
    assert "not computed: the error guarantee does not hold" in sec
    assert "Boots are taken from the plan" not in re.search(r'data-path="[a-z]+">(.*?)</p>', sec).group(1)


# ---- the mechanism table and the per-CPU plot --------------------------------------------------------------------


def test_mechanism_table_shows_the_recorded_rates(html, service):
    sec = section(html, 1)
    # the rates on the RT CPU, counted from the recordings with a regex: CAL + IWI rows of x86
    before = sum(recorded_count("x86-guest", row, 1) for row in ("CAL", "IWI")) / interval("x86-guest")
    after = sum(recorded_count("x86-guest-nohz-busy", row, 1) for row in ("CAL", "IWI")) / interval(
        "x86-guest-nohz-busy")
    assert cell(sec, SERVICE.label, "before") == fmt_rate(before) == "38.0"
    assert cell(sec, SERVICE.label, "after") == fmt_rate(after) == "4.1"
    mc = service.decision["mechanisms"][SERVICE.label]
    assert mc["before_rate"] == pytest.approx(before) and mc["after_rate"] == pytest.approx(after)
    lo, hi = (f"{(mc[k] - 1) * 100:+.0f}%" for k in ("ci_low", "ci_high"))
    assert cell(sec, SERVICE.label, "ratio") == f"{(mc['ratio'] - 1) * 100:+.0f}% [{lo}, {hi}]"
    assert cell(sec, SERVICE.label, "finding") == "reduced"
    assert "guest: /proc/interrupts (function_call_ipi, irq_work_ipi), RT CPUs" in sec
    # every run's rate, in the details table
    for side, n in (("before", 6), ("after", 6)):
        assert len(re.findall(rf'data-row="change-1/rates/{side}/\d+"', sec)) == n


def test_per_cpu_rates_are_the_recorded_counts_per_cpu(service):
    d = deltas("x86-guest")
    per_cpu = cpu_rates(d, SERVICE.counters(d))
    assert set(per_cpu) == {0, 1}
    for cpu in (0, 1):
        expect = sum(recorded_count("x86-guest", row, cpu) for row in ("CAL", "IWI")) / interval("x86-guest")
        assert per_cpu[cpu] == pytest.approx(expect)
    assert per_cpu[1] == pytest.approx(rate_of(d, SERVICE.counters(d), RT_CPUS).value)
    medians, n = side_cpu_medians(service.before, SERVICE)
    assert n == 6 and medians == pytest.approx(per_cpu)
    # the recording broken one way: CAL on CPU 0 read as 0 after the run (the 32-bit count went down: wrapped);
    # that run gives no rate on CPU 0, and the median there is over the other runs
    s = window("x86-guest")
    cut = re.sub(r"(\n\s*CAL:\s+)\d+", r"\g<1>0", s["interrupts1"], count=1)
    assert cut != s["interrupts1"]
    broken = counter_deltas(parse_snapshot(s, "0"), parse_snapshot({**s, "interrupts1": cut}, "1"))
    assert broken.status("irq:CAL:cpu0") == "wrapped" and broken.status("irq:CAL:cpu1") == "ok"
    assert cpu_rates(broken, SERVICE.counters(broken)) == {0: None, 1: pytest.approx(per_cpu[1])}
    runs = [service.before[0].model_copy(update={"counters": broken}), *service.before[1:3]]
    medians, n = side_cpu_medians(runs, SERVICE)
    assert n == 3 and medians[0] == pytest.approx(per_cpu[0]) and medians[1] == pytest.approx(per_cpu[1])


def test_per_cpu_plot_is_in_the_report(html):
    sec = section(html, 1)
    pngs = images(sec)
    assert len(pngs) == 3 and all(p.startswith(PNG) for p in pngs)  # histogram, tail, per-CPU rates
    assert 'alt="per-CPU rates before/after mirobot_teleoperate.disabled"' in sec
    assert "<h4>Per-CPU rates (median over the runs of each side)</h4>" in sec
    sec3 = section(html, 3)
    assert 'alt="per-CPU rates before/after cmdline.guest"' in sec3


def test_per_cpu_plot_helper_handles_zero_and_unknown_rates():
    d0, d1 = deltas("x86-guest"), deltas("x86-guest-nohz-busy")
    b, a = cpu_rates(d0, ["irq:TLB"]), cpu_rates(d1, ["irq:TLB"])
    panel = RatePanel("TLB shootdowns", {"before": b, "after": {**a, 1: None}}, {"before": 1, "after": 1})
    png = render_cpu_rates_png([panel], "recorded TLB", marked=[1])
    assert png.startswith(PNG)
    empty = render_cpu_rates_png([RatePanel("none", {"before": {}, "after": {}}, {})], "nothing")
    assert empty.startswith(PNG)


def test_decision_path_of_each_verdict(service, host_sysctl, boot_change):
    for o in (service, host_sysctl, boot_change):
        kind, text = decision_path(o.decision)
        assert text and text in o.decision["reason"]
    assert decision_path(None) == ("none", "No decision recorded.")
    interim = {**service.decision, "final": False, "verdict": "inconclusive",
               "reason": "Look 1/3 ... Nothing is shown yet at this look: measure more runs."}
    assert decision_path(interim) == ("interim", "Nothing is shown yet at this look: measure more runs.")
    old = {"verdict": "keep", "action": "keep", "reason": "p99.9 is shown better"}
    assert decision_path(old)[0] == "latency"


def test_a_mechanism_the_unit_could_not_count_is_named_in_the_report_with_why(tmp_path):
    left = {"label": "IPIs the guest sends (ICC_SGI1R_EL1 traps on the host)", "source": "sysreg",
            "why": "the host's kernel has no kvm:kvm_sys_access tracepoint (not an arm64 KVM host)"}
    run = parse_cyclictest_file(REPO / "tests/recorded/cyclictest/lab/guest-stress-h20000-run1.json")
    sgi = {"label": "IPIs the guest sends (ICC_SGI1R_EL1 traps on the host)", "source": "sysreg",
           "names": ["ICC_SGI1R_EL1"], "on": "host", "cpus": "all", "direction": "down", "read_on": "host"}
    outcome = ChangeOutcome(id="guest.service.m", target="guest", kind="service_disable", description="d",
                            status="rolled_back", before=[run], after=[run], mechanisms_left_out=[left])
    counted = outcome.model_copy(update={"id": "guest.cmdline", "mechanisms_left_out": [], "mechanisms": [sgi],
                                         "rates": {"before": [{sgi["label"]: 28.4}], "after": [{sgi["label"]: 0.0}]}})
    page = render_html(_report([ApplyResult(unit="u1", profile="p", dry_run=False, outcomes=[counted])], "t"),
                       tmp_path / "counted.html").read_text()
    assert "host: kvm:kvm_sys_access hist of the vCPU threads (ICC_SGI1R_EL1), each vCPU thread of the guest" \
        in htmllib.unescape(page)
    report = _report([ApplyResult(unit="u1", profile="p", dry_run=False, outcomes=[outcome])], "t")
    assert report.changes[0].mechanisms_left_out == [left]
    page = render_html(report, tmp_path / "r.html").read_text()
    assert 'data-left-out="IPIs the guest sends (ICC_SGI1R_EL1 traps on the host)"' in page
    assert "no kvm:kvm_sys_access tracepoint" in page
    path = tmp_path / "r.json"
    path.write_text(report.model_dump_json())
    assert load_report(path).changes[0].mechanisms_left_out == [left]  # the saved report keeps it
