"""The sysfs knobs rt-tune may write (its allow-list) and what each one takes: data and pure checks, shared by
the profile's resolver (errors with file and line) and the change (orchestrator/changes/sysfs.py)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from orchestrator.core.cpulist import CpuListError, cpus_of_mask, parse_cpulist

CPU_DIR = "/sys/devices/system/cpu"


@dataclass(frozen=True)
class Knob:
    """One allow-listed knob: where it lives and what it takes."""

    #: "choice" (one of `choices`; a bracketed list when read), "cpumask" (a CPU list, written as the kernel's
    #: hex mask), "word" (a name such as a cpufreq governor), "flag" (0 or 1)
    type: str
    #: the file (a fixed knob) or, for a per-CPU knob, a pattern with {cpu} and maybe {state}
    path: str
    choices: tuple[str, ...] = ()
    per_cpu: bool = False
    #: why a real-time unit sets it (shown in `tune plan` and the profile docs)
    why: str = ""


KNOBS: dict[str, Knob] = {
    "transparent_hugepage": Knob(
        "choice", "/sys/kernel/mm/transparent_hugepage/enabled", ("always", "madvise", "never"),
        why="khugepaged collapsing pages and THP faults stall RT tasks (tuned realtime: never)"),
    "transparent_hugepage_defrag": Knob(
        "choice", "/sys/kernel/mm/transparent_hugepage/defrag",
        ("always", "defer", "defer+madvise", "madvise", "never"),
        why="direct compaction on a page fault is an unbounded stall"),
    "workqueue_cpumask": Knob(
        "cpumask", "/sys/devices/virtual/workqueue/cpumask",
        why="unbound kworkers run only on the housekeeping CPUs (kernel-per-CPU-kthreads.rst)"),
    "writeback_cpumask": Knob(
        "cpumask", "/sys/bus/workqueue/devices/writeback/cpumask",
        why="dirty-page writeback kworkers off the RT CPUs (kernel-per-CPU-kthreads.rst)"),
    "ksm_run": Knob(
        "choice", "/sys/kernel/mm/ksm/run", ("0", "1", "2"),
        why="ksmd scanning and merging pages interferes with every CPU's memory (tuned realtime-virtual-host: 0)"),
    "cpufreq_governor": Knob(
        "word", CPU_DIR + "/cpu{cpu}/cpufreq/scaling_governor", per_cpu=True,
        why="a fixed frequency: no ramp-up delay when the RT task wakes (tuned: performance)"),
    "cpuidle_disable": Knob(
        "flag", CPU_DIR + "/cpu{cpu}/cpuidle/state{state}/disable", per_cpu=True,
        why="deep idle states' exit latency adds to every wake-up of an RT CPU"),
}

GOVERNOR = re.compile(r"[a-z][a-z0-9_]{0,31}")


def check_knob(knob: str, value: str, cpus: Sequence[int] = (), states: Sequence[int] = ()) -> str | None:
    """What is wrong with setting `knob` to `value` (on `cpus`, idle `states`), or None."""
    spec = KNOBS.get(knob)
    if spec is None:
        return f"not a knob rt-tune knows; known: {', '.join(KNOBS)}"
    ok = {"choice": lambda: value in spec.choices, "cpumask": lambda: bool(_cpus(value)),
          "word": lambda: bool(GOVERNOR.fullmatch(value)), "flag": lambda: value in ("0", "1")}[spec.type]
    if not ok():
        expected = {"choice": "one of " + ", ".join(spec.choices), "cpumask": "a non-empty CPU list",
                    "word": "a name of lowercase letters, digits and _ (e.g. performance)",
                    "flag": "0 or 1"}[spec.type]
        return f"expected {expected}"
    if spec.per_cpu and not cpus:
        return "a per-CPU knob needs its CPUs"
    if "{state}" in spec.path and not states:
        return "name the idle states to disable"
    return None


def _cpus(text: str) -> list[int]:
    try:
        return parse_cpulist(text)
    except CpuListError:
        return []


def selected_choice(text: str) -> str:
    """The selected word of a bracketed choice file ("always [madvise] never" -> "madvise"); the text itself
    (stripped) when it has no brackets (`ksm/run` prints "0")."""
    m = re.search(r"\[([^\]]+)\]", text)
    return m.group(1) if m else text.strip()


def normal_value(spec: Knob, text: str | None) -> object:
    """A knob file's content in the knob's terms, for comparing: a cpumask's CPUs, a choice's selected word,
    else the stripped text (None: the file does not exist)."""
    if text is None:
        return None
    if spec.type == "cpumask":
        return cpus_of_mask(text)
    if spec.type == "choice":
        return selected_choice(text)
    return text.strip()


# ---- sysctls with a type: where a wrong value is costly ---------------------------------------------------
@dataclass(frozen=True)
class SysctlType:
    """What a known sysctl takes: "int" (lo..hi), "flag" (0 or 1) or "cpulist" (the target's CPUs)."""

    type: str
    lo: int = 0
    hi: int = 1
    why: str = ""


SYSCTL_TYPES: dict[str, SysctlType] = {
    "kernel.sched_rt_runtime_us": SysctlType(
        "int", -1, 1_000_000, "RT throttling: how much of each period SCHED_FIFO/RR tasks may run; -1 turns it "
                              "off (then a runaway RT task starves the CPU's kernel threads unless stalld runs)"),
    "kernel.sched_rt_period_us": SysctlType("int", 1, 2**31 - 1, "the RT throttling period"),
    "kernel.timer_migration": SysctlType("flag", why="timers armed on a nohz CPU fire where they were armed"),
    "kernel.nmi_watchdog": SysctlType("flag", why="the NMI watchdog's perf interrupts on every CPU (tuned: 0)"),
    "kernel.watchdog": SysctlType("flag", why="the soft and NMI lockup detectors"),
    "kernel.watchdog_cpumask": SysctlType("cpulist", why="lockup detectors on the housekeeping CPUs only"),
    "kernel.numa_balancing": SysctlType("flag", why="NUMA hinting faults unmap pages under running tasks"),
    "vm.stat_interval": SysctlType("int", 1, 3600, "seconds between per-CPU vmstat updates (tuned realtime: 10)"),
    "vm.nr_hugepages": SysctlType("int", 0, 2**31 - 1, "hugepages of the default size reserved now (checked "
                                                       "against the unit's free memory at plan)"),
}

#: hugepage sizes a kernel argument may name: a number and K, M or G (the architecture decides which exist)
HUGEPAGE_SIZE = re.compile(r"[1-9][0-9]{0,5}[KMG]")


def check_hugepage_arg(key: str, value: str) -> str | None:
    """What is wrong with a boot-time hugepage argument (`hugepagesz`, `default_hugepagesz`: a size such as 2M
    or 1G; `hugepages`: a count), or None (other arguments: None)."""
    if key in ("hugepagesz", "default_hugepagesz") and not HUGEPAGE_SIZE.fullmatch(value):
        return "expected a hugepage size such as 2M or 1G (arm64 with 4K pages: 64K, 2M, 32M, 1G)"
    if key == "hugepages" and not re.fullmatch(r"[0-9]{1,9}", value):
        return "expected a number of hugepages"
    return None

#: acknowledgements a profile section can give (`acknowledge: [...]`) for a setting rt-tune refuses without one
ACKNOWLEDGEMENTS = {
    "rt_throttling_off": "kernel.sched_rt_runtime_us: -1 without stalld enabled in the same section",
}
STALLD = "stalld.service"


def check_sysctl_value(name: str, value: str) -> str | None:
    """What is wrong with `value` for a typed sysctl (a cpulist is the resolver's to check), or None."""
    spec = SYSCTL_TYPES.get(name)
    if spec is None or spec.type == "cpulist":
        return None
    if not re.fullmatch(r"-?[0-9]+", value.strip()):
        return f"expected {'0 or 1' if spec.type == 'flag' else 'an integer'}"
    n = int(value)
    if not spec.lo <= n <= spec.hi:
        return "expected 0 or 1" if spec.type == "flag" else f"expected an integer in {spec.lo}..{spec.hi}"
    return None


# ---- kernel thread rules (orchestrator/changes/kthreads.py) ---------------------------------------------------
#: what a thread name pattern may hold: a name's characters and the shell's * ? [ ]
KTHREAD_PATTERN = re.compile(r"[A-Za-z0-9_./:+*?\[\]-]{1,64}")


def check_kthread_rule(r: dict[str, Any]) -> str | None:
    """What is wrong with a kthreads rule {match, policy, priority, cpus}, or None."""
    if not isinstance(r.get("match"), str) or not KTHREAD_PATTERN.fullmatch(r["match"]):
        return ("match: a thread name pattern of letters, digits, `_./:+-` and the shell's `* ? [ ]`, at most 64 "
                "characters")
    policy, priority = r.get("policy"), r.get("priority")
    if policy not in (None, "fifo", "rr", "other"):
        return f"policy {policy!r}: expected fifo, rr or other"
    if (policy in ("fifo", "rr")) != (priority is not None):
        return "fifo and rr need a priority (1..99); other takes none"
    if priority is not None and not 1 <= priority <= 99:
        return f"priority {priority}: expected 1..99"
    if policy is None and r.get("cpus") is None:
        return "set a policy, CPUs or both"
    return None
