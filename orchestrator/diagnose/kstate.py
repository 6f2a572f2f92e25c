"""Parsers of kernel and systemd state the diagnosis reads: /proc/timer_list, /sys/kernel/debug/sched/debug,
`systemctl show` of many units, and the KVM per-VM debugfs counters. Pure functions, tested on output recorded
from the lab's 6.1 (x86) and 6.12 (arm64) kernels (tests/recorded/diagnose/README.md)."""

from __future__ import annotations

import re

from pydantic import BaseModel

from orchestrator.core.errors import ParseError
from orchestrator.diagnose.model import IrqbalanceState

# The KVM per-VM debugfs counters' parser lives in facts/ (measure/ reads them around every run too); the
# diagnosis imports it from here as before.
from orchestrator.facts.kvm import VmCounters as VmCounters
from orchestrator.facts.kvm import parse_kvm_vms as parse_kvm_vms

# --------------------------------------------------------------------------------------------------------
# /proc/timer_list (field notes §3: "which timers are active on that CPU, and whether tick_stopped is 1")


class CpuTimers(BaseModel):
    cpu: int
    #: The callback of each active hrtimer on this CPU, all clock bases ("tick_sched_timer", "posix_timer_fn").
    active: list[str]
    #: The tick-sched fields (".tick_stopped", ".nohz_mode", ".idle_calls", ...) as printed, without the dot.
    tick: dict[str, str]

    @property
    def tick_stopped(self) -> bool | None:
        value = self.tick.get("tick_stopped")
        return None if value is None else value.strip() != "0"


_TIMER_ROW = re.compile(r"\s#\d+: <[0-9a-f]+>, (?P<fn>[^,]+), S:[0-9a-f]+")
_FIELD = re.compile(r"\s+\.(?P<key>[a-z_]+)\s*: ?(?P<value>.*)")
_CLOCK_BASE_KEYS = ("base", "index", "resolution", "get_time", "offset")


def parse_timer_list(text: str) -> dict[int, CpuTimers]:
    """/proc/timer_list -> per CPU: active hrtimers and the tick-sched fields (tick_stopped, nohz_mode ...)."""
    if not text.startswith("Timer List Version:"):
        raise ParseError(f"expected /proc/timer_list (`Timer List Version: ...`), got {text[:100]!r}")
    cpus: dict[int, CpuTimers] = {}
    cur: CpuTimers | None = None
    for line in text.split("\n"):
        m = re.fullmatch(r"cpu: (\d+)", line)
        if m:
            cur = CpuTimers(cpu=int(m.group(1)), active=[], tick={})
            cpus[cur.cpu] = cur
            continue
        if cur is None:
            continue
        if line.startswith("Tick Device:") or line.startswith("jiffies:"):
            cur = None
            continue
        t = _TIMER_ROW.match(line)
        if t:
            cur.active.append(t.group("fn").split(" [")[0].strip())
            continue
        f = _FIELD.fullmatch(line)  # tick-sched fields; the clock bases' own fields are left out
        if f and line.startswith("  .") and not line.startswith("   ") and f.group("key") not in _CLOCK_BASE_KEYS:
            cur.tick[f.group("key")] = f.group("value").strip()
    if not cpus:
        raise ParseError("no `cpu: N` section in /proc/timer_list")
    return cpus


# --------------------------------------------------------------------------------------------------------
# /sys/kernel/debug/sched/debug (field notes §3: "the CPU's cfs_rq nr_running and its runnable task list")


class SchedTask(BaseModel):
    state: str  # "R" runnable, "S" sleeping, "I" idle kthread, ...
    current: bool  # the task on the CPU when the file was read (">R")
    comm: str
    pid: int


class SchedCpu(BaseModel):
    cpu: int
    nr_running: int
    curr_pid: int | None
    tasks: list[SchedTask]  # every task on this CPU's run queue lists, sleeping ones too (6.1 and 6.12 alike)

    @property
    def runnable(self) -> list[SchedTask]:
        return [t for t in self.tasks if t.state == "R"]


def parse_sched_debug(text: str) -> dict[int, SchedCpu]:
    """/sys/kernel/debug/sched/debug -> per CPU: `.nr_running`, `.curr->pid`, and the `runnable tasks:` table.
    The table's rows are ` S %15s %5d ...` (">R" marks the current task), so the comm is read by column: it may
    hold spaces (QEMU's "CPU 0/KVM")."""
    if not text.startswith("Sched Debug Version:"):
        raise ParseError(f"expected /sys/kernel/debug/sched/debug (`Sched Debug Version: ...`), got {text[:100]!r}")
    cpus: dict[int, SchedCpu] = {}
    cur: SchedCpu | None = None
    section = ""
    in_tasks = False
    for line in text.split("\n"):
        m = re.match(r"cpu#(\d+)", line)
        if m:
            cur = SchedCpu(cpu=int(m.group(1)), nr_running=0, curr_pid=None, tasks=[])
            cpus[cur.cpu] = cur
            section, in_tasks = "cpu", False
            continue
        if cur is None:
            continue
        if not line.strip():
            in_tasks = False
            continue
        if re.match(r"(cfs_rq|rt_rq|dl_rq|dl_server)\[", line):
            section = line.split("[", 1)[0]
            continue
        if line.startswith("runnable tasks:"):
            in_tasks = True
            continue
        if in_tasks:
            if line.startswith(" S ") and "task" in line and "PID" in line or set(line.strip()) == {"-"}:
                continue
            if len(line) < 20 or line[2] != " ":
                raise ParseError(f"expected a `runnable tasks:` row (` S            comm   PID ...`), got "
                                 f"{line[:120]!r}")
            rest = line[19:].split()
            if not rest or not rest[0].isdigit():
                raise ParseError(f"expected the PID after the 15-column comm, got {line[:120]!r}")
            state = line[:2]
            cur.tasks.append(SchedTask(state="R" if state == ">R" else state.strip(), current=state == ">R",
                                       comm=line[3:18].strip(), pid=int(rest[0])))
            continue
        f = _FIELD.fullmatch(line)
        if f and section == "cpu":
            if f.group("key") == "nr_running":
                cur.nr_running = int(f.group("value").split()[0])
        elif line.startswith("  .curr->pid") and section == "cpu":
            cur.curr_pid = int(line.split(":", 1)[1].split()[0])
    if not cpus:
        raise ParseError("no `cpu#N` section in sched/debug")
    return cpus


# --------------------------------------------------------------------------------------------------------
# systemctl show -p ... '*.service' (field notes §1: "find it (restart counts, coredumps) and stop it")


class ServiceState(BaseModel):
    id: str
    n_restarts: int
    active_state: str
    sub_state: str
    unit_file_state: str
    result: str
    main_pid: int


def parse_service_states(text: str) -> dict[str, ServiceState]:
    """`systemctl show -p Id,NRestarts,ActiveState,SubState,UnitFileState,Result,ExecMainPID '*.service'`:
    blank-line separated blocks of KEY=VALUE, in any key order."""
    units: dict[str, ServiceState] = {}
    for block in re.split(r"\n\s*\n", text.strip()):
        if not block.strip():
            continue
        kv: dict[str, str] = {}
        for line in block.split("\n"):
            key, sep, value = line.partition("=")
            if not sep:
                raise ParseError(f"expected KEY=VALUE in `systemctl show` output, got {line[:120]!r}")
            kv[key] = value
        if "Id" not in kv:
            raise ParseError(f"a `systemctl show` block without Id=: {block[:200]!r}")
        try:
            restarts = int(kv.get("NRestarts") or 0)
            pid = int(kv.get("ExecMainPID") or 0)
        except ValueError:
            raise ParseError(f"expected numbers in NRestarts/ExecMainPID, got {block[:200]!r}") from None
        units[kv["Id"]] = ServiceState(id=kv["Id"], n_restarts=restarts, active_state=kv.get("ActiveState", ""),
                                       sub_state=kv.get("SubState", ""), unit_file_state=kv.get("UnitFileState", ""),
                                       result=kv.get("Result", ""), main_pid=pid)
    return units


# ---- issue #20's probes: irqbalance, RT throttling, THP and compaction -------------------------------------------
def parse_irqbalance(text: str) -> IrqbalanceState | None:
    """The `irqbalance` section (systemctl show LoadState/ActiveState/Environment, then any IRQBALANCE_BANNED_*
    line of /etc/default/irqbalance): None where the unit has no irqbalance (or no systemd)."""
    kv = dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("IRQBALANCE"))
    if kv.get("LoadState", "not-found") == "not-found":
        return None
    banned = None
    for word in kv.get("Environment", "").split() + [x for x in text.splitlines() if x.startswith("IRQBALANCE")]:
        key, _, value = word.partition("=")
        if key in ("IRQBALANCE_BANNED_CPULIST", "IRQBALANCE_BANNED_CPUS") and value.strip('"'):
            banned = value.strip('"')
    return IrqbalanceState(active=kv.get("ActiveState") in ("active", "activating", "reloading"), banned=banned)


def parse_rt_throttling(text: str) -> tuple[int | None, int | None]:
    """(sched_rt_runtime_us, `RT throttling activated` messages in the kernel log) from `rt_throttling`."""
    kv = dict(line.split(" ", 1) for line in text.splitlines() if " " in line)
    runtime = kv.get("runtime_us", "").strip()
    throttled = kv.get("throttled", "").strip()
    return (int(runtime) if re.fullmatch(r"-?\d+", runtime) else None,
            int(throttled) if throttled.isdigit() else None)


def parse_vmstat(text: str) -> dict[str, int]:
    """`name value` lines of /proc/vmstat."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            raise ParseError(f"unexpected /proc/vmstat line {line[:100]!r}")
        out[parts[0]] = int(parts[1])
    return out
