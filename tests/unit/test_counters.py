"""Mechanism counters (measure/counters.py, changes/mechanism.py's rates, facts/counters.py, facts/kvm.py) on recorded
output only: the diagnosis windows' interrupts and KVM sections (tests/recorded/diagnose/README.md: the x86 and
arm64 labs, Linux 6.1 and 6.12), the arm64 lab's /proc/interrupts (tests/recorded/lab-arm64), and the measurement
runs and counter reads recorded from the x86 lab (tests/recorded/counters/README.md). Bad input is a recording
broken one way each (cut mid-line, a column missing, a counter going backwards, another boot), never a
hand-written look-alike of a kernel file."""

from __future__ import annotations

import functools
import re

import pytest

from orchestrator.core.errors import ParseError, TuneError
from orchestrator.facts.counters import parse_proc_stat, parse_softirqs, parse_task_counters, parse_uptime
from orchestrator.measure.counters import (
    CounterDeltas,
    counter_deltas,
    parse_counters_output,
    parse_snapshot,
    rate,
    rate_of,
    split_key,
    split_sections,
)
from tests.conftest import RECORDED

pytestmark = pytest.mark.unit

DIAG = RECORDED / "diagnose"
COUNTERS = RECORDED / "counters"


@functools.cache
def window(prefix: str) -> dict[str, str]:
    """A recorded diagnosis window's sections (the window prints the counters' sections the same way)."""
    mark = (DIAG / f"{prefix}-marker.txt").read_text().strip()
    head, sections = split_sections((DIAG / f"{prefix}-window.txt").read_text(), mark)
    assert head == ""
    return sections


def window_deltas(prefix: str, **replace: str) -> CounterDeltas:
    sections = {**window(prefix), **replace}
    return counter_deltas(parse_snapshot(sections, "0"), parse_snapshot(sections, "1"))


def count(sections: dict[str, str], name: str, row: str, cpu: int) -> int:
    """A count as the recording prints it (read with a regex here, not with the parser under test)."""
    line = next(x for x in sections[name].split("\n") if re.match(rf"\s*{re.escape(row)}:", x))
    return int(line.split(":", 1)[1].split()[cpu])


# ---- /proc/interrupts and KVM debugfs: the diagnosis windows -------------------------------------------------


@pytest.mark.parametrize("prefix", ["x86-guest", "x86-guest-nohz-busy", "arm64-host", "arm64-host-6.1",
                                    "arm64-guest"])
def test_interrupt_deltas_per_row_and_cpu_from_the_recorded_windows(prefix):
    s = window(prefix)
    d = window_deltas(prefix)
    interval = round(float(s["uptime1"].split()[0]) - float(s["uptime0"].split()[0]), 2)
    assert d.interval_s == interval > 0
    ipi = "CAL" if prefix.startswith("x86") else "IPI1"
    for cpu in (0, 1):
        key = f"irq:{ipi}:cpu{cpu}"
        assert d.deltas[key] == count(s, "interrupts1", ipi, cpu) - count(s, "interrupts0", ipi, cpu) >= 0
        assert d.status(key) == "ok"
    assert rate(d, f"irq:{ipi}", [1]) == pytest.approx(d.deltas[f"irq:{ipi}:cpu1"] / interval)
    # the window has no boot_id, softirqs, stat or threads sections: named, and their keys simply do not exist
    assert {"boot_id 0", "softirqs 0", "stat 0"} <= {n.split(" before")[0] + " 0" for n in d.notes}
    assert not any(k.startswith(("softirq:", "cputime:", "thread:")) for k in d.deltas)
    assert not d.issues


def test_x86_and_arm64_rows_become_the_documented_keys():
    x86 = window_deltas("x86-guest")
    assert {"irq:LOC:cpu1", "irq:RES:cpu1", "irq:CAL:cpu1", "irq:TLB:cpu1", "irq:ERR", "irq:MIS"} <= set(x86.deltas)
    assert split_key("irq:CAL:cpu1") == ("irq:CAL", 1) and split_key("irq:ERR") == ("irq:ERR", None)
    arm = window_deltas("arm64-host")
    assert {f"irq:IPI{i}:cpu1" for i in range(8)} <= set(arm.deltas) and "irq:Err" in arm.deltas
    assert arm.irq_actions["11"] == ["kvm guest vtimer"] and arm.irq_actions["12"] == ["arch_timer"]
    # arm64's local timer is a numbered IRQ: found by its handler, then rated like any key
    timer = next(n for n, a in arm.irq_actions.items() if a == ["arch_timer"])
    assert rate_of(arm, f"irq:{timer}", [1]).value == pytest.approx(arm.deltas[f"irq:{timer}:cpu1"] / arm.interval_s)


def test_kvm_counters_per_vm_from_the_arm64_host_window():
    d = window_deltas("arm64-host")
    assert d.deltas["kvm:rtguest:wfi_exit_stat"] == 8038 - 7146
    assert d.deltas["kvm:rtguest:exits"] > 0 and d.deltas["kvm:rtguest:wfe_exit_stat"] == 0
    wfx = rate_of(d, "kvm:*:wfi_exit_stat,kvm:*:wfe_exit_stat")
    assert wfx.value == pytest.approx(892 / d.interval_s) and wfx.keys == ["kvm:rtguest:wfe_exit_stat",
                                                                          "kvm:rtguest:wfi_exit_stat"]
    from orchestrator.changes.mechanism import mechanisms_for

    (declared,) = mechanisms_for("wfx_notrap", {}, "host")
    assert declared.rate(d, [], vm="rtguest").value == wfx.value  # the guest's VM, by its QEMU -name
    before = parse_snapshot(window("arm64-host"), "0")
    assert before.identities == {"kvm:rtguest": "316-10"}
    # the x86 guest has no KVM (TCG, and the guest is no host): no kvm key at all
    assert not any(k.startswith("kvm:") for k in window_deltas("x86-guest").deltas)
    assert rate_of(window_deltas("x86-guest"), "kvm:*:wfi_exit_stat").reason == "no counter matches kvm:*:wfi_exit_stat"


def test_the_kvm_parser_moved_to_facts_and_diagnose_still_reads_it():
    from orchestrator.diagnose import kstate
    from orchestrator.facts import kvm

    assert kstate.parse_kvm_vms is kvm.parse_kvm_vms and kstate.VmCounters is kvm.VmCounters


# ---- broken recordings: detected per key, never a negative or zero rate -------------------------------------


def test_interrupts_cut_mid_line_leave_their_keys_absent_not_zero():
    s = window("arm64-host")
    # cut inside a numbered IRQ's row: the section does not parse, every interrupt key is absent after the run
    cut = s["interrupts1"][: s["interrupts1"].index(" 62:") + 12]
    d = window_deltas("arm64-host", interrupts1=cut)
    assert any(n.startswith("interrupts after: expected") for n in d.notes)
    assert d.status("irq:IPI1:cpu1") == "absent" and "not read after the run (expected" in d.issues[
        "irq:IPI1:cpu1"].reason
    r = rate_of(d, "irq:IPI1", [1])
    assert r.value is None and "absent" in r.reason
    assert d.status("kvm:rtguest:wfi_exit_stat") == "ok"  # one broken section costs no other counter
    # cut inside IPI1's CPU 0 count: `IPI1:      4` reads like a one-total row (ERR's form), so its per-CPU keys
    # and every later row's are absent after the run, and the total is absent before it
    cut = s["interrupts1"][: s["interrupts1"].index("IPI1:") + 12]
    d = window_deltas("arm64-host", interrupts1=cut)
    assert d.status("irq:IPI1:cpu0") == d.status("irq:IPI1:cpu1") == d.status("irq:IPI5:cpu1") == "absent"
    assert d.issues["irq:IPI1"].reason == "not read before the run"
    assert rate(d, "irq:IPI1") is None and rate(d, "irq:IPI0", [1]) is not None


def test_a_missing_column_is_detected():
    s = window("x86-guest")
    # a numbered IRQ row with one count: refused by the parser, so every interrupt key is absent after the run
    row = next(x for x in s["interrupts1"].split("\n") if x.strip().startswith("24:"))
    one_col = re.sub(r"^(\s*24:\s+\d+)\s+\d+", r"\1", row)
    d = window_deltas("x86-guest", interrupts1=s["interrupts1"].replace(row, one_col))
    assert d.status("irq:LOC:cpu1") == "absent" and rate(d, "irq:LOC", [1]) is None
    # a named row with one count reads as a total (like ERR): its per-CPU keys are absent after, not zero
    cal = next(x for x in s["interrupts1"].split("\n") if x.startswith("CAL:"))
    one_total = re.sub(r"^(CAL:\s+\d+)\s+\d+", r"\1", cal)
    d = window_deltas("x86-guest", interrupts1=s["interrupts1"].replace(cal, one_total))
    assert d.status("irq:CAL:cpu1") == "absent" and d.status("irq:CAL") == "absent"
    assert rate_of(d, "irq:CAL", [1]).value is None and d.status("irq:LOC:cpu1") == "ok"


def test_a_counter_going_backwards_is_wrapped_for_32_bit_counts_and_backwards_for_64_bit_ones():
    s = window("arm64-host")
    line = next(x for x in s["interrupts1"].split("\n") if x.strip().startswith("IPI1:"))
    before = count(s, "interrupts0", "IPI1", 1)
    lower = line.replace(str(count(s, "interrupts1", "IPI1", 1)), str(before - 5), 1)
    d = window_deltas("arm64-host", interrupts1=s["interrupts1"].replace(line, lower),
                      kvm1=s["kvm1"].replace("wfi_exit_stat 8038", "wfi_exit_stat 7000"))
    assert d.status("irq:IPI1:cpu1") == "wrapped" and "irq:IPI1:cpu1" not in d.deltas
    assert f"+{2**32 - 5}" in d.issues["irq:IPI1:cpu1"].reason
    assert d.status("kvm:rtguest:wfi_exit_stat") == "backwards"
    assert rate(d, "irq:IPI1", [1]) is None and rate(d, "kvm:*:wfi_exit_stat") is None
    assert "wrapped" in rate_of(d, "irq:IPI1,irq:IPI0", [0, 1]).reason
    assert rate(d, "irq:IPI1", [0]) is not None  # the other CPU's count is fine


def test_a_restarted_vm_is_a_reset_of_its_keys():
    s = window("arm64-host")
    d = window_deltas("arm64-host", kvm1=s["kvm1"].replace("vm 316-10 ", "vm 420-11 "))
    assert d.status("kvm:rtguest:exits") == "reset" and "316-10 -> 420-11" in d.issues["kvm:rtguest:exits"].reason


def test_uptime_going_back_without_boot_ids_is_a_reboot():
    s = window("arm64-host")
    d = window_deltas("arm64-host", uptime1="12.00 3.00\n")
    assert d.interval_s is None and {i.status for i in d.issues.values()} == {"reset"}
    assert not d.deltas and "uptime 232.72 -> 12.0" in d.notes[-1]
    assert "reset" in rate_of(d, "irq:IPI1", [1]).reason
    assert s["uptime1"] != "12.00 3.00\n"


# ---- the selector and the mechanism specs --------------------------------------------------------------------


def test_rate_needs_every_cpu_asked_for_and_says_why():
    d = window_deltas("x86-guest")
    assert rate_of(d, "irq:CAL", [1, 7]).reason == "no counter matches irq:CAL on CPU 7"
    assert rate_of(d, "irq:NOPE", [1]).reason == "no counter matches irq:NOPE on CPU 1"
    both = rate_of(d, ["irq:CAL", "irq:IPI1"], [0, 1])  # the arm64 name does not exist on x86: summed over what does
    assert both.keys == ["irq:CAL:cpu0", "irq:CAL:cpu1"] and both.total == d.deltas["irq:CAL:cpu0"] + d.deltas[
        "irq:CAL:cpu1"]
    assert rate_of(d, "irq:[0-9]*", [1]).value is not None  # every numbered IRQ on CPU 1
    assert rate(d, "irq:CAL") == pytest.approx(both.value)  # cpus None: every CPU


def test_declared_mechanisms_read_each_architectures_rows_on_the_rt_cpus():
    """changes/mechanism.py's classes become the rows a unit has: IPI1/IPI5 on arm64, the arch_timer PPI (a
    numbered row, found by its handler) for the local timer."""
    from orchestrator.changes.mechanism import mechanisms_for

    d = window_deltas("arm64-guest")
    (svc,) = mechanisms_for("service_disable", {"unit": "m.service"}, "host")
    r = svc.rate(d, [1])
    assert r.keys == ["irq:IPI1:cpu1", "irq:IPI5:cpu1"]
    assert r.value == pytest.approx((d.deltas["irq:IPI1:cpu1"] + d.deltas["irq:IPI5:cpu1"]) / d.interval_s)
    assert svc.rate(None, [1]).reason == "no counters were read"
    assert svc.rate(d, []).value is None  # no RT CPUs declared: not every CPU instead
    (tick,) = mechanisms_for("cmdline", {"add": {"nohz_full": "1"}}, "host")
    timer_rows = [k for k in tick.rate(d, [1]).keys]
    assert timer_rows and all(d.irq_actions[k.split(":")[1]] == ["arch_timer"] for k in timer_rows)


# ---- the parsers of facts/counters.py on their own -----------------------------------------------------------


def test_bad_kernel_files_are_refused_by_their_parsers():
    with pytest.raises(ParseError):
        parse_uptime("232.72\n")
    s = window("arm64-host")
    with pytest.raises(ParseError, match="expected `thread TID`"):
        parse_task_counters("voluntary_ctxt_switches:\t3\n")
    with pytest.raises(ParseError, match="/proc/softirqs"):
        parse_softirqs(s["interrupts0"])  # another file's text
    with pytest.raises(ParseError, match="cpuN"):
        parse_proc_stat(s["interrupts0"])
    with pytest.raises(TuneError, match="cut"):
        parse_counters_output("@@\nx\n@@\ny\n@@\n\n@@m uptime0\n1.00 1.00\n", "@@m")


# ---- the x86 lab's recorded measurement run and counter reads (tests/recorded/counters) ----------------------


@functools.cache
def recorded(name: str) -> tuple[str, str]:
    """(marker, stdout) of a recording in tests/recorded/counters."""
    return (COUNTERS / f"{name}-marker.txt").read_text().strip(), (COUNTERS / f"{name}.txt").read_text()


def run_sections(**replace: str) -> dict[str, str]:
    mark, text = recorded("guest-run")
    head, sections = split_sections(text.split("@@\n", 3)[3], mark)
    assert head == "" and list(sections)[-1] == "end"
    return {**sections, **replace}


def run_deltas(**replace: str) -> CounterDeltas:
    s = run_sections(**replace)
    return counter_deltas(parse_snapshot(s, "0"), parse_snapshot(s, "1"))


def test_the_recorded_run_has_every_section_around_cyclictest_and_they_all_parse():
    s = run_sections()
    names = list(s)
    assert names[names.index("run") - 1] == "threads0" and names[names.index("run") + 1] == "uptime1"
    assert "# Histogram" in s["run"] or "T:" in s["run"] or s["run"].strip()  # cyclictest's own output
    d = run_deltas()
    assert not d.issues and not d.notes and d.boot_id_before == d.boot_id_after
    assert 1.0 <= d.interval_s < 3.0  # a 1 s cyclictest and systemd-run around it
    assert d.deltas["ctxt"] > 0 and d.deltas["processes"] >= 1  # at least systemd-run's cyclictest forked
    assert {"softirq:TIMER:cpu1", "softirq:RCU:cpu1", "softirq:SCHED:cpu1"} <= set(d.deltas)
    assert {"cputime:user:cpu1", "cputime:idle:cpu1", "cputime:steal:cpu1"} <= set(d.deltas)
    assert d.deltas["irq:LOC:cpu1"] > 0  # cyclictest's 1 kHz timer on CPU 1
    # the per-CPU counts as the recording prints them
    assert d.deltas["softirq:TIMER:cpu1"] == count(s, "softirqs1", "TIMER", 1) - count(s, "softirqs0", "TIMER", 1)


def test_softirqs_and_stat_parse_as_recorded():
    s = run_sections()
    soft = parse_softirqs(s["softirqs0"])
    assert list(soft) == ["HI", "TIMER", "NET_TX", "NET_RX", "BLOCK", "IRQ_POLL", "TASKLET", "SCHED", "HRTIMER",
                          "RCU"] and set(soft["RCU"]) == {0, 1}
    stat = parse_proc_stat(s["stat0"])
    assert set(stat.cputime) == {0, 1} and len(stat.cputime[1]) == 10 and set(stat.events) == {"ctxt", "processes"}
    assert parse_uptime(s["uptime0"]) > 0


def test_a_boot_id_change_between_the_reads_resets_every_key():
    other = (RECORDED / "lab-x86" / "host-boot_id.txt").read_text()  # another machine's boot: a recorded one
    d = run_deltas(boot_id1=other)
    assert d.interval_s is None and not d.deltas
    assert {i.status for i in d.issues.values()} == {"reset"}
    assert "irq:LOC:cpu1: reset (rebooted between the reads" in rate_of(d, "irq:LOC", [1]).reason
    assert rate(d, "ctxt") is None and "rebooted between the reads (boot_id" in d.notes[-1]


def test_softirqs_cut_and_stat_cut_are_absent_keys():
    s = run_sections()
    cut = s["softirqs1"][: s["softirqs1"].index("RCU:") + 14]
    d = run_deltas(softirqs1=cut)
    assert d.status("softirq:RCU:cpu1") == "absent" and d.status("irq:LOC:cpu1") == "ok"
    assert any(n.startswith("softirqs after: expected `NAME: 2 counts`") for n in d.notes)
    d = run_deltas(stat1=s["stat1"][: s["stat1"].index("cpu1 ")])
    assert d.status("ctxt") == "absent" and d.status("cputime:user:cpu1") == "absent"
    assert rate(d, "ctxt") is None


def test_thread_counters_of_the_host_vcpu_threads_as_linux_6_1_prints_them():
    mark, text = recorded("host-read")
    snap = parse_counters_output(text, mark, "lab1.host")
    tids = [int(t) for t in (COUNTERS / "host-read-tids.txt").read_text().split()]
    assert len(tids) == 2 and not snap.errors
    for i, tid in enumerate(tids):
        assert snap.identities[f"thread:{tid}"] == f"CPU {i}/TCG"
        assert {f"thread:{tid}:{c}" for c in ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches",
                                              "nr_switches", "nr_voluntary_switches", "nr_involuntary_switches",
                                              "nr_migrations")} <= set(snap.counters)
    tasks = parse_task_counters(split_sections(text.split("@@\n", 3)[3], mark)[1]["threads0"])
    assert tasks[tids[0]].counters["nr_switches"] == (tasks[tids[0]].counters["nr_voluntary_switches"]
                                                      + tasks[tids[0]].counters["nr_involuntary_switches"])
    # the same read twice is a zero-length interval: no rate, never a division by zero
    d = counter_deltas(snap, snap)
    assert d.interval_s is None and rate_of(d, "thread:*:nr_migrations").reason.startswith("no interval")
    # a thread that exited by the second read (its lines gone): absent, and so is the rate over all threads
    gone = parse_counters_output(re.sub(rf"(thread {tids[1]}\n)(?:(?!thread |@@).*\n)*", r"\1", text), mark)
    d = counter_deltas(snap, gone)
    assert d.status(f"thread:{tids[1]}:nr_migrations") == "absent"
    assert "the thread was not there" in d.issues[f"thread:{tids[1]}:nr_migrations"].reason
