"""Kernel event counters a measurement reads before and after each run: /proc/softirqs, /proc/stat, /proc/uptime,
and per-thread scheduling counters (/proc/<tid>/status and /proc/<tid>/sched). /proc/interrupts is read by
facts/irqs.py (`parse_interrupts`), the KVM per-VM counters by facts/kvm.py. Pure parsers, tested on output
recorded from the lab's kernels (tests/recorded/lab-x86/README.md, "Counters")."""

from __future__ import annotations

import re

from pydantic import BaseModel

from orchestrator.core.errors import ParseError

#: /proc/stat's per-CPU time fields, in the kernel's order (USER_HZ ticks; fewer on old kernels).
CPUTIME_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal", "guest", "guest_nice")
#: /proc/stat's single-number lines that count events (procs_running and procs_blocked are gauges, btime a date).
STAT_EVENT_LINES = ("ctxt", "processes")

_HEADER = re.compile(r"(?:\s*CPU\d+)+\s*")


def parse_softirqs(text: str) -> dict[str, dict[int, int]]:
    """/proc/softirqs -> softirq name ("TIMER", "RCU", "SCHED", ...) -> CPU -> count. Every row must hold one
    count per CPU column of the header (offline CPUs have no column); a cut row is refused, not read short."""
    lines = [line for line in text.split("\n") if line.strip()]
    if not lines or not _HEADER.fullmatch(lines[0]):
        raise ParseError(f"expected the /proc/softirqs header of CPUn columns, got {text[:200]!r}")
    cpus = [int(h[3:]) for h in lines[0].split()]
    out: dict[str, dict[int, int]] = {}
    for line in lines[1:]:
        m = re.fullmatch(r"\s*([A-Z_]+):((?:\s+\d+)*)\s*", line)
        if not m or len(m.group(2).split()) != len(cpus):
            raise ParseError(f"expected `NAME: {len(cpus)} counts` in /proc/softirqs, got {line[:200]!r}")
        out[m.group(1)] = dict(zip(cpus, map(int, m.group(2).split()), strict=True))
    if not out:
        raise ParseError("no softirq rows in /proc/softirqs")
    return out


class ProcStat(BaseModel):
    """The counting part of /proc/stat."""

    #: CPU -> field (CPUTIME_FIELDS, as many as the kernel prints) -> USER_HZ ticks; the `cpu` total is left out.
    cputime: dict[int, dict[str, int]]
    #: `ctxt` (context switches since boot, all CPUs) and `processes` (forks since boot).
    events: dict[str, int]


def parse_proc_stat(text: str) -> ProcStat:
    """/proc/stat -> per-CPU times and the event lines. The `cpuN` lines and `ctxt` must be there (a listing cut
    before them is refused); the `intr` and `softirq` lines are skipped (/proc/interrupts and /proc/softirqs
    give the same counts per CPU)."""
    cputime: dict[int, dict[str, int]] = {}
    events: dict[str, int] = {}
    for line in text.split("\n"):
        words = line.split()
        if not words:
            continue
        m = re.fullmatch(r"cpu(\d+)", words[0])
        if m:
            values = words[1:]
            if not 4 <= len(values) <= len(CPUTIME_FIELDS) or not all(v.isdigit() for v in values):
                raise ParseError(f"expected `cpuN` and 4..{len(CPUTIME_FIELDS)} tick counts in /proc/stat, got "
                                 f"{line[:200]!r}")
            cputime[int(m.group(1))] = dict(zip(CPUTIME_FIELDS, map(int, values), strict=False))
        elif words[0] in STAT_EVENT_LINES:
            if len(words) != 2 or not words[1].isdigit():
                raise ParseError(f"expected `{words[0]} N` in /proc/stat, got {line[:200]!r}")
            events[words[0]] = int(words[1])
    if not cputime or "ctxt" not in events:
        raise ParseError(f"expected `cpuN` lines and `ctxt` in /proc/stat (cut?), got {text[:200]!r}")
    return ProcStat(cputime=cputime, events=events)


def parse_uptime(text: str) -> float:
    """/proc/uptime -> seconds since boot (the first of its two numbers, to 0.01 s)."""
    m = re.fullmatch(r"(\d+\.\d+) \d+\.\d+\n?", text)
    if not m:
        raise ParseError(f"expected /proc/uptime (`SECONDS IDLE`), got {text[:100]!r}")
    return float(m.group(1))


class TaskCounters(BaseModel):
    """One thread's scheduling counters. `name` is its comm (status `Name:`); None when the thread was not there
    (exited, or never existed): then it has no counters."""

    tid: int
    name: str | None
    #: from status: voluntary_ctxt_switches, nonvoluntary_ctxt_switches (every kernel); from sched (kernels with
    #: CONFIG_SCHED_DEBUG, as Debian's 6.1 and 6.12): nr_switches, nr_voluntary_switches,
    #: nr_involuntary_switches and nr_migrations (printed `se.nr_migrations`)
    counters: dict[str, int]


#: The lines a measurement run keeps from /proc/<tid>/status and /proc/<tid>/sched (measure_run.sh greps these).
TASK_STATUS_KEYS = ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")
TASK_SCHED_KEYS = ("se.nr_migrations", "nr_switches", "nr_voluntary_switches", "nr_involuntary_switches")


def task_counter_name(key: str) -> str:
    """`se.nr_migrations` -> `nr_migrations`; the other names as printed."""
    return key.removeprefix("se.")


def parse_task_counters(text: str) -> dict[int, TaskCounters]:
    """A `threads` section: per thread a line `thread TID`, then its status lines `Name:`, `voluntary_ctxt_switches:`,
    `nonvoluntary_ctxt_switches:` (tab after the colon) and its sched lines `nr_switches    :    N` as the kernel
    prints them. A thread with no lines after its `thread` line was not there."""
    tasks: dict[int, TaskCounters] = {}
    cur: TaskCounters | None = None
    for line in text.split("\n"):
        if not line.strip():
            continue
        m = re.fullmatch(r"thread (\d+)", line)
        if m:
            cur = TaskCounters(tid=int(m.group(1)), name=None, counters={})
            tasks[cur.tid] = cur
            continue
        if cur is None:
            raise ParseError(f"expected `thread TID` before the thread's counters, got {line[:120]!r}")
        if line.startswith("Name:\t"):
            cur.name = line[len("Name:\t"):]
            continue
        kv = re.fullmatch(r"([a-z_.]+)\s*:\s*(\d+)", line)
        if not kv or kv.group(1) not in (*TASK_STATUS_KEYS, *TASK_SCHED_KEYS):
            raise ParseError(f"expected a thread's `Name:` or a counter ({', '.join(TASK_STATUS_KEYS)}, "
                             f"{', '.join(TASK_SCHED_KEYS)}), got {line[:120]!r}")
        cur.counters[task_counter_name(kv.group(1))] = int(kv.group(2))
    return tasks
