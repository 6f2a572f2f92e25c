"""The diagnosis maps its findings to issue #20's change kinds: RT throttling, irqbalance on the RT CPUs, THP
compaction, movable kernel threads allowed on RT CPUs. The new sections' parsers on real output
(tests/recorded/diagnose/README.md), added to a real lab window; the decisions on the resulting model, with
values set on the model where no recording of such a unit exists (never as made-up tool output)."""

from __future__ import annotations

import pytest

from orchestrator.diagnose.analysis import analyse
from orchestrator.diagnose.findings import findings
from orchestrator.diagnose.kstate import parse_irqbalance, parse_rt_throttling, parse_vmstat
from orchestrator.diagnose.model import IrqbalanceState
from tests.conftest import REPO
from tests.unit.test_diagnose import NOW, _sections, _state

pytestmark = pytest.mark.unit

NEW = REPO / "tests" / "recorded" / "diagnose" / "issue20-controller-6.18"
KTHREADS = REPO / "tests" / "recorded" / "kthreads" / "controller-6.18.txt"
WINDOW = "x86-guest"


def _with_new_sections():
    sections = dict(_sections(WINDOW))
    for name in ("vmstat0", "vmstat1", "rt_throttling", "thp", "irqbalance"):
        sections[name] = (NEW / f"{name}.txt").read_text()
    sections["kthreads"] = KTHREADS.read_text()
    return analyse(sections, target="guest", label=WINDOW, rt_hint=[1], state_before=_state(WINDOW, "before"),
                   state_after=_state(WINDOW, "after"), now=NOW[WINDOW])


def test_the_new_sections_parse_as_recorded():
    assert parse_rt_throttling((NEW / "rt_throttling.txt").read_text()) == (950000, 0)
    vm = parse_vmstat((NEW / "vmstat0.txt").read_text())
    assert set(vm) == {"compact_stall", "compact_fail", "compact_success", "thp_fault_alloc", "thp_collapse_alloc",
                       "thp_split_page"}
    assert parse_irqbalance((NEW / "irqbalance.txt").read_text()) is None  # no systemd, no irqbalance


def test_a_quiet_unit_gets_only_the_kernel_threads_finding():
    d = _with_new_sections()
    assert d.rt_throttled == 0 and d.thp == "madvise" and d.vmstat_delta["compact_stall"] == 0
    assert "rcu_preempt" in d.kthreads_on_rt  # movable, allowed on CPU 1 in the recording
    assert not any(n.startswith(("ksoftirqd/", "kworker/")) for n in d.kthreads_on_rt)  # per-CPU / workqueue
    new = {f.kind: f for f in d.findings if f.kind in ("rt_throttling", "irqbalance", "thp_compaction",
                                                         "kthreads_on_rt_cpus")}
    assert set(new) == {"kthreads_on_rt_cpus"}
    f = new["kthreads_on_rt_cpus"]
    assert f.change == "guest.kthreads" and 'cpus: "${guest_housekeeping_cpus}"' in f.profile


def test_throttling_irqbalance_and_compaction_each_name_the_change_that_addresses_them():
    # the decisions on the model: a real window's analysis, with what a throttled, compacting unit running
    # irqbalance would have shown set on it (no recording of such a unit exists here)
    d = _with_new_sections()
    d.rt_throttled, d.vmstat_delta["compact_stall"] = 3, 7
    d.irqbalance = IrqbalanceState(active=True, banned="0")
    by_kind = {f.kind: f for f in findings(d)}
    assert by_kind["rt_throttling"].severity == "high"
    assert by_kind["rt_throttling"].change == "guest.sysctl.kernel.sched_rt_runtime_us"
    assert "enable: [stalld]" in by_kind["rt_throttling"].profile
    assert by_kind["irqbalance"].change == "guest.irqbalance" and "RT CPUs 1" in by_kind["irqbalance"].title
    assert by_kind["thp_compaction"].change == "guest.sysfs.transparent_hugepage"
    assert "compact_stall +7" in by_kind["thp_compaction"].evidence[0]
    d.irqbalance = IrqbalanceState(active=True, banned="1")  # the RT CPU banned: nothing to say
    assert "irqbalance" not in {f.kind for f in findings(d)}


def test_an_older_window_without_the_new_sections_still_analyses():
    d = analyse(_sections(WINDOW), target="guest", label=WINDOW, rt_hint=[1], state_before=_state(WINDOW, "before"),
                state_after=_state(WINDOW, "after"), now=NOW[WINDOW])
    assert d.kthreads_on_rt == [] and d.irqbalance is None and d.rt_throttled is None and d.thp is None
