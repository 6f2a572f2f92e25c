"""`tune diagnose`: the field notes' investigation of one unit, automated, each finding mapped to a change.

For each target (host, guest or both, at the same time) one window (orchestrator/diagnose/probe.py) brackets a trace
with two samples. From them:
1. IPI rates per CPU and type (/proc/interrupts deltas), the RT CPUs marked;
2. who sends them and what runs (ipi/csd tracepoints, or the function tracer on older kernels);
3. crash-looping services (restart counters rising, core dumps);
4. the tick on each nohz_full CPU (timer_list, sched/debug, tick_stop), timer_migration, timers firing there;
5. WFI/WFE exit rates per VM on arm64 hosts (KVM debugfs);
6. findings: evidence, and the profile change that addresses it, or why no tuning does.

The target is left as found: everything traced lives in a private tracefs instance, removed at the end; the
tracing state is compared before and after; on error, timeout or Ctrl-C the controller kills the window and
removes the instance (`_cleanup`), then checks again.
"""

from __future__ import annotations

import re
import secrets
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from datetime import datetime, timedelta

from pydantic import BaseModel

from orchestrator.boot.wfx import NEAR_ZERO_PER_S, POLICY_SINCE, parse_kernel_version
from orchestrator.core import duration
from orchestrator.core.cpulist import parse_kernel_cpulist as parse_cpu_list
from orchestrator.diagnose.probe import (PIDFILE_DIR, cleanup_argv, decode_trace, new_instance_name,
                                    parse_tracing_state, split_sections, state_argv, window_argv)
from orchestrator.core.errors import ExitStatus, InputError, ParseError, TuneError
from orchestrator.core.events import Event, EventSink, discard
from orchestrator.facts.irqs import Irq, is_ipi_row, parse_interrupts
from orchestrator.facts.systemd import parse_coredumps
from orchestrator.diagnose.kstate import (ServiceState, parse_kvm_vms, parse_sched_debug, parse_service_states,
                                 parse_timer_list)
from orchestrator.diagnose.tracing import TraceSummary, parse_trace, summarize_trace
from orchestrator.remote.transport import Transport

MIN_DURATION_S = 2.0
MAX_DURATION_S = 3600.0
WINDOW_OVERHEAD_S = 240.0  # sampling, core dump query and trace read on a slow nested guest, beyond the window
#: The tracing state probe reads ~1700 event directories: 3-5 s on the arm64 lab's host, 4-8 s in its nested guest
#: idle (2026-12-05); in CI, beside the other lane and with busy loops in the guest, the probe's older form (26 s
#: idle there) ran past 60 s.
STATE_TIMEOUT_S = 180.0
RT_IPI_PER_S = 5.0  # RES/CAL (IPI0/IPI1) per second on an RT CPU above which isolation is recommended
SEVERITY_ORDER = {"high": 0, "medium": 1, "info": 2}
CRASH_RESTARTS = 3  # NRestarts at least this, with core dumps in the last hour: a crash loop even if quiet now


class DiagnosisCancelled(TuneError):
    """The diagnosis was stopped (Ctrl-C, or another target's error) before this target's window started."""


class TracingStateChanged(TuneError):
    """The target's tracing state after the diagnosis differs from before: named item by item."""

    exit_code = ExitStatus.TRACING_CHANGED


def parse_duration(text: str) -> float:
    """`30s`, `2m`, `90` (seconds), `1.5m` -> seconds, within MIN_DURATION_S..MAX_DURATION_S."""
    return duration.parse_duration(text, what="--duration", minimum_s=MIN_DURATION_S, maximum_s=MAX_DURATION_S)


# --------------------------------------------------------------------------------------------------------
# Result models


class IpiRate(BaseModel):
    row: str  # RES/CAL/TLB/IWI (x86), IPI0..IPIn (arm64)
    description: str
    per_cpu: dict[int, float]  # per second over the window
    counts: dict[int, int]  # the delta over the window


class NohzCpu(BaseModel):
    cpu: int
    tick_stopped: bool | None  # /proc/timer_list at the end of the window
    nr_running: int | None
    current: str | None  # "comm pid" of the task on the CPU, None when idle
    runnable: list[str]
    active_timers: list[str]
    timers_fired: dict[str, int]  # during the window (trace)
    tick_dependencies: dict[str, int]  # tick_stop success=0 dependency=..., during the window
    tick_stops: int  # tick_stop success=1 during the window
    timer_irq_per_s: float | None  # local timer interrupts (x86 LOC, arm64 arch_timer) per second
    busy: bool
    tick_ok: bool


class CrashLoop(BaseModel):
    unit: str
    restarts_total: int
    restarts_in_window: int
    coredumps_last_hour: int
    last_signal: str | None
    exe: str | None
    state: str
    unit_file_state: str


class VmWfx(BaseModel):
    vm: str
    pid: int
    name: str
    wfi_per_s: float
    wfe_per_s: float
    exits_per_s: float | None


class Finding(BaseModel):
    target: str
    kind: str  # crash_loop, kick_all_cpus, page_table_teardown, nohz_tick, no_nohz_full, timer_migration, ...
    severity: str  # "high", "medium", "info"
    title: str
    evidence: list[str]
    change: str | None = None  # the profile change that addresses it ("guest.service.mirobot_teleoperate.service")
    profile: str | None = None  # the profile YAML that asks for it
    advice: str | None = None  # where no tuning removes it: why, and what the application can do


class TargetDiagnosis(BaseModel):
    target: str  # "host" or "guest"
    label: str
    kernel: str
    arch: str
    duration_s: float
    cpus: list[int]
    rt_cpus: list[int]
    nohz_full: list[int]
    isolated: list[int]
    timer_migration: int | None
    cmdline: str
    tracing: str  # what the who-sends data rests on
    ipis: list[IpiRate]
    timer_irq_per_s: dict[int, float]
    trace: TraceSummary | None
    nohz: list[NohzCpu]
    crash_loops: list[CrashLoop]
    wfx: list[VmWfx]
    findings: list[Finding]
    tracing_state_before: dict[str, str]
    tracing_state_after: dict[str, str]
    tracing_state_notes: list[str]


class Diagnosis(BaseModel):
    unit: str
    started: datetime
    duration_s: float
    targets: list[TargetDiagnosis]

    @property
    def findings(self) -> list[Finding]:
        """All targets' findings, the most severe first."""
        return sorted((f for t in self.targets for f in t.findings), key=lambda f: SEVERITY_ORDER[f.severity])


# --------------------------------------------------------------------------------------------------------
# Analysis: pure functions of the window's sections


def _rates(before: list[Irq], after: list[Irq], seconds: float) -> list[IpiRate]:
    old = {i.irq: i for i in before}
    out = []
    for irq in after:
        if not is_ipi_row(irq) or not irq.per_cpu or irq.irq not in old:
            continue
        counts = {cpu: a - b for cpu, a, b in zip(irq.cpus, irq.per_cpu_counts, old[irq.irq].per_cpu_counts,
                                                  strict=False)}
        out.append(IpiRate(row=irq.irq, description=irq.description or "", counts=counts,
                           per_cpu={c: n / seconds for c, n in counts.items()}))
    return out


def _timer_irq_rates(before: list[Irq], after: list[Irq], seconds: float) -> dict[int, float]:
    """Local timer interrupts per CPU: x86 `LOC`, arm64 the `arch_timer` row."""
    def row(irqs: list[Irq]) -> Irq | None:
        return next((i for i in irqs if i.irq == "LOC" or "arch_timer" in i.actions), None)
    a, b = row(after), row(before)
    if a is None or b is None or not a.per_cpu:
        return {}
    return {c: (x - y) / seconds for c, x, y in zip(a.cpus, a.per_cpu_counts, b.per_cpu_counts, strict=False)}


def _crash_loops(units0: dict[str, ServiceState], units1: dict[str, ServiceState], coredumps: list,
                 now: datetime) -> list[CrashLoop]:
    dumps: dict[str, list] = defaultdict(list)
    for d in coredumps:
        if d.unit and d.timestamp >= now - timedelta(hours=1):
            dumps[d.unit].append(d)
    loops = []
    for name, u in sorted(units1.items()):
        delta = u.n_restarts - units0[name].n_restarts if name in units0 else 0
        n_dumps = len(dumps.get(name, []))
        if delta > 0 or (u.n_restarts >= CRASH_RESTARTS and n_dumps) or (u.sub_state == "auto-restart" and n_dumps):
            last = max(dumps[name], key=lambda d: d.timestamp) if n_dumps else None
            loops.append(CrashLoop(unit=name, restarts_total=u.n_restarts, restarts_in_window=max(delta, 0),
                                   coredumps_last_hour=n_dumps,
                                   last_signal=(last.signal_name or str(last.signal)) if last else None,
                                   exe=last.exe if last else None, state=f"{u.active_state}/{u.sub_state}",
                                   unit_file_state=u.unit_file_state))
    return loops


def _nohz(cpus: list[int], timer_list: dict, sched: dict, trace: TraceSummary | None,
          timer_irq: dict[int, float]) -> list[NohzCpu]:
    out = []
    for cpu in cpus:
        tl = timer_list.get(cpu)
        sd = sched.get(cpu)
        current = None
        if sd is not None and sd.curr_pid:
            cur = next((t for t in sd.tasks if t.pid == sd.curr_pid), None)
            current = f"{cur.comm} {cur.pid}" if cur else f"pid {sd.curr_pid}"
        fired = Counter({t.function: t.count for t in (trace.timers if trace else []) if t.cpu == cpu})
        deps = {t.dependency: t.count for t in (trace.tick_stops if trace else []) if t.cpu == cpu and not t.success}
        stops = sum(t.count for t in (trace.tick_stops if trace else []) if t.cpu == cpu and t.success)
        busy = bool(sd and (sd.curr_pid or sd.nr_running))
        stopped = tl.tick_stopped if tl else None
        out.append(NohzCpu(cpu=cpu, tick_stopped=stopped, nr_running=sd.nr_running if sd else None,
                           current=current, runnable=[f"{t.comm} {t.pid}" for t in (sd.runnable if sd else [])],
                           active_timers=tl.active if tl else [], timers_fired=dict(fired.most_common(8)),
                           tick_dependencies=deps, tick_stops=stops, timer_irq_per_s=timer_irq.get(cpu),
                           busy=busy, tick_ok=not (busy and stopped is False)))
    return out


def _wfx(k0: dict, k1: dict, seconds: float) -> list[VmWfx]:
    out = []
    for vm, b in k1.items():
        a = k0.get(vm)
        if a is None or "wfi_exit_stat" not in b.counters or "wfi_exit_stat" not in a.counters:
            continue
        d = {k: b.counters[k] - a.counters.get(k, 0) for k in b.counters}
        out.append(VmWfx(vm=vm, pid=b.pid, name=b.name, wfi_per_s=d["wfi_exit_stat"] / seconds,
                         wfe_per_s=d.get("wfe_exit_stat", 0) / seconds,
                         exits_per_s=d["exits"] / seconds if "exits" in d else None))
    return out


def analyse(sections: dict[str, str], *, target: str, label: str, rt_hint: list[int],
            state_before: dict[str, str], state_after: dict[str, str], now: datetime) -> TargetDiagnosis:
    """Everything from one window's sections (recorded ones in the tests)."""
    meta = dict(line.split(" ", 1) for line in sections["meta"].strip().split("\n") if " " in line)
    seconds = float(sections["uptime1"].split()[0]) - float(sections["uptime0"].split()[0])
    if seconds <= 0:
        raise ParseError(f"{label}: the window's uptime did not advance ({sections['uptime0']!r} -> "
                         f"{sections['uptime1']!r})")
    irq0, irq1 = parse_interrupts(sections["interrupts0"]), parse_interrupts(sections["interrupts1"])
    ipis = _rates(irq0, irq1, seconds)
    timer_irq = _timer_irq_rates(irq0, irq1, seconds)
    online = parse_cpu_list(sections["online"].strip())
    nohz_text = sections.get("nohz_full", "").strip()
    nohz_full = [] if nohz_text in ("", "(null)") else parse_cpu_list(nohz_text)
    isolated = parse_cpu_list(sections.get("isolated", "").strip())
    tm_text = sections.get("timer_migration", "").strip()
    timer_migration = int(tm_text) if tm_text.isdigit() else None
    rt_cpus = sorted(set(nohz_full) | set(isolated) | {c for c in rt_hint if c in online})
    trace = None
    setup = sections.get("setup", "")
    if "trace" in sections:
        records, lost = parse_trace(decode_trace(sections["trace"]))
        for cpu, n in parse_trace_overruns(sections.get("trace_stats", "")).items():
            lost[cpu] = max(lost.get(cpu, 0), n)
        trace = summarize_trace(records, {c: n for c, n in lost.items() if n})
    if "event ipi/ipi_send_cpu" in setup:
        tracing = "tracepoints ipi:ipi_send_cpu/ipi_send_cpumask" + (
            ", csd:csd_function_entry" if "event csd/csd_function_entry" in setup else "")
    elif "event ipi/ipi_raise" in setup:
        tracing = "tracepoint ipi:ipi_raise (no send callsites on this kernel)" + (
            "; function tracer on the cross-call paths" if "tracer function" in setup else "")
    elif "tracer function" in setup:
        tracing = "function tracer on the cross-call paths (this kernel has no ipi/csd send tracepoints)"
    else:
        tracing = "none: " + (setup.strip() or "no tracefs")
    timer_list = parse_timer_list(sections["timer_list"]) if sections.get("timer_list", "").strip() else {}
    sched = parse_sched_debug(sections["sched_debug"]) if sections.get("sched_debug", "").strip() else {}
    units0 = parse_service_states(sections.get("units0", ""))
    units1 = parse_service_states(sections.get("units1", ""))
    coredumps = parse_coredumps(sections.get("coredumps", ""))
    loops = _crash_loops(units0, units1, coredumps, now)
    nohz = _nohz(nohz_full, timer_list, sched, trace, timer_irq)
    wfx = _wfx(parse_kvm_vms(sections.get("kvm0", "")), parse_kvm_vms(sections.get("kvm1", "")), seconds)
    notes = tracing_state_notes(state_before, state_after)
    diag = TargetDiagnosis(
        target=target, label=label, kernel=meta.get("kernel", "?"), arch=meta.get("arch", "?"), duration_s=seconds,
        cpus=online, rt_cpus=rt_cpus, nohz_full=nohz_full, isolated=isolated, timer_migration=timer_migration,
        cmdline=sections.get("cmdline", "").strip(), tracing=tracing, ipis=ipis, timer_irq_per_s=timer_irq,
        trace=trace, nohz=nohz, crash_loops=loops, wfx=wfx, findings=[], tracing_state_before=state_before,
        tracing_state_after=state_after, tracing_state_notes=notes)
    diag.findings = findings(diag)
    return diag


def parse_trace_overruns(text: str) -> dict[int, int]:
    """The `trace_stats` section (`cpu N` + per_cpu/cpuN/stats): events lost per CPU (`overrun` + `dropped
    events`): the ring buffer was too small for the window, so the trace's counts are lower bounds."""
    lost: dict[int, int] = {}
    cpu = None
    for line in text.split("\n"):
        m = re.fullmatch(r"cpu (\d+)", line)
        if m:
            cpu = int(m.group(1))
            lost[cpu] = 0
            continue
        m = re.fullmatch(r"(overrun|dropped events): (\d+)", line)
        if m and cpu is not None:
            lost[cpu] += int(m.group(2))
    return lost


def tracing_state_notes(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """Differences between two tracing states that are not changes of state: Linux before 6.7 allocates the
    top-level ring buffer it had deferred ("7 (expanded: 1408)" -> "1410", whole pages) the first time any
    instance enables an event. The configured size is the same; nothing rt-tune can or should undo (shrinking it would set a
    7 KB buffer)."""
    notes = []
    b, a = before.get("buffer_size_kb", ""), after.get("buffer_size_kb", "")
    m = re.fullmatch(r"\d+ \(expanded: (\d+)\)", b)
    # the size shown is whole ring-buffer pages of 4080 data bytes: 1408 KB shows as 1410
    if m and a.isdigit() and 0 <= int(a) - int(m.group(1)) < 8:
        notes.append(f"top-level buffer_size_kb {b!r} -> {a!r}: the kernel allocated its deferred top-level "
                     f"buffer at its configured size ({a} KB per CPU), as any first use of tracing does "
                     "(seen on the lab's Linux 6.1; its 6.12 leaves the top level alone); nothing else changed")
    return notes


def state_differences(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """Items of the tracing state that differ, the deferred-buffer allocation excepted (tracing_state_notes)."""
    diffs = []
    expanded = bool(tracing_state_notes(before, after))
    for key in sorted(set(before) | set(after)):
        if key == "buffer_size_kb" and expanded:
            continue
        if before.get(key) != after.get(key):
            diffs.append(f"{key}: {before.get(key)!r} -> {after.get(key)!r}")
    return diffs


# --------------------------------------------------------------------------------------------------------
# Findings


def _cpus(cpus) -> str:
    return ",".join(str(c) for c in sorted(cpus)) or "-"


def _senders(trace: TraceSummary | None, paths: tuple[str, ...], callback: str | None = None) -> Counter[str]:
    """Sending task -> IPIs sent through `paths`: the tracepoints' callsite (or `callback`), or, on kernels
    without them, the function tracer's entries of the first path (its send function)."""
    out: Counter[str] = Counter()
    for s in (trace.ipi_sends if trace else []):
        if s.callsite in paths or (callback is not None and s.callback == callback):
            out[s.sender] += s.count
    for c in (trace.send_calls if trace else []):
        if c.function == paths[0]:
            out[c.sender] += c.count
    return out


def _callback_cpus(trace: TraceSummary | None, function: str, *, from_ipi_only: bool) -> Counter[int]:
    """CPU -> times `function` ran there as a cross-call callback (only the IPI-delivered ones if asked)."""
    out: Counter[int] = Counter()
    for c in (trace.callbacks if trace else []):
        if c.function == function and (c.from_ipi or not from_ipi_only):
            out[c.cpu] += c.count
    return out


def findings(d: TargetDiagnosis) -> list[Finding]:
    """What the evidence says, each with the change that addresses it or the reason none does: one function
    per kind of finding, most severe first."""
    out: list[Finding] = []
    for find in (_find_crash_loops, _find_kick_all_cpus, _find_page_table_teardown, _find_nohz_ticks, _find_no_nohz_full,
                 _find_timer_migration, _find_rt_cpu_ipis, _find_vcpu_wakeups, _find_wfx_traps):
        out += find(d)
    return sorted(out, key=lambda f: SEVERITY_ORDER[f.severity])


def _kicks(d: TargetDiagnosis) -> tuple[Counter, Counter]:
    """kick_all_cpus_sync senders and the CPUs do_nothing ran on (field notes §1)."""
    return (_senders(d.trace, ("kick_all_cpus_sync",)),
            _callback_cpus(d.trace, "do_nothing", from_ipi_only=False))


def _find_crash_loops(d: TargetDiagnosis) -> list[Finding]:
    out: list[Finding] = []
    t = d.target
    kick_senders, do_nothing = _kicks(d)
    for loop in d.crash_loops:
        ev = [f"{loop.unit}: NRestarts={loop.restarts_total}, {loop.restarts_in_window} restart(s) during the "
              f"{d.duration_s:.0f} s window, state {loop.state}, unit file {loop.unit_file_state}"]
        if loop.coredumps_last_hour:
            ev.append(f"{loop.coredumps_last_hour} core dump(s) in the last hour, last {loop.last_signal} of "
                      f"{loop.exe}")
        if kick_senders or do_nothing:
            ev.append("kick_all_cpus_sync IPIs during the window (field notes §1: core dump handling JIT-compiles "
                      "BPF, each compile kicks every CPU): "
                      + ", ".join(f"{n} sent by {s}" for s, n in kick_senders.most_common(3))
                      + (f"; do_nothing ran on CPUs {_cpus(do_nothing)} ({sum(do_nothing.values())}x)"
                         if do_nothing else ""))
        out.append(Finding(
            target=t, kind="crash_loop", severity="high", title=f"{loop.unit} is crash-looping", evidence=ev,
            change=f"{t}.service.{loop.unit}",
            profile=f"{t}:\n  services:\n    disable: [{loop.unit}]\n",
            advice="each crash runs systemd-coredump on some CPU and may IPI every CPU; disable the service "
                   "on RT units (field notes §1)"))
    return out


def _find_kick_all_cpus(d: TargetDiagnosis) -> list[Finding]:
    out: list[Finding] = []
    t = d.target
    kick_senders, do_nothing = _kicks(d)
    if (kick_senders or do_nothing) and not d.crash_loops:
        out.append(Finding(
            target=t, kind="kick_all_cpus", severity="medium",
            title="do_nothing IPI broadcasts (kick_all_cpus_sync) reach the CPUs",
            evidence=[f"sent by {s}: {n}" for s, n in kick_senders.most_common(5)]
            + ([f"do_nothing ran on CPUs {_cpus(do_nothing)} ({sum(do_nothing.values())}x)"] if do_nothing else []),
            advice="kick_all_cpus_sync runs after BPF JIT compiles and module/text changes; find what loads BPF "
                   "programs (a crash handler, a monitoring agent) and stop it on RT units"))

    return out


def _find_page_table_teardown(d: TargetDiagnosis) -> list[Finding]:
    out: list[Finding] = []
    t, trace = d.target, d.trace
    teardown_senders = _senders(trace, ("tlb_remove_table_sync_one", "tlb_remove_table"),
                                callback="tlb_remove_table_smp_sync")
    teardown_cpus = _callback_cpus(trace, "tlb_remove_table_smp_sync", from_ipi_only=True)
    if teardown_senders or teardown_cpus:
        out.append(Finding(
            target=t, kind="page_table_teardown", severity="info",
            title="page-table teardown IPIs (tlb_remove_table_smp_sync)",
            evidence=[f"processes unmapping: {', '.join(f'{s} ({n})' for s, n in teardown_senders.most_common(5))}"
                      if teardown_senders else "sender not traced on this kernel"]
            + ([f"received on CPUs {_cpus(teardown_cpus)}"] if teardown_cpus else []),
            advice="no tuning removes these: freeing page tables must IPI every CPU that may walk them "
                   "locklessly (gup_fast). In RT processes pre-fault memory, mlockall(MCL_CURRENT|MCL_FUTURE), "
                   "and avoid mmap/munmap churn; keep the unmapping processes off the unit if they are not needed"))

    return out


def _find_nohz_ticks(d: TargetDiagnosis) -> list[Finding]:
    out: list[Finding] = []
    t = d.target
    for n in d.nohz:
        if not n.tick_ok:
            ev = [f"CPU {n.cpu}: /proc/timer_list tick_stopped=0 while {n.current or 'a task'} runs "
                  f"(sched/debug nr_running={n.nr_running})"]
            if n.runnable:
                ev.append(f"runnable on CPU {n.cpu}: {', '.join(n.runnable)}")
            if n.tick_dependencies:
                ev.append("tick_stop refused: " + ", ".join(f"{k} {v}x" for k, v in n.tick_dependencies.items()))
            if n.timer_irq_per_s is not None:
                ev.append(f"local timer interrupts on CPU {n.cpu}: {n.timer_irq_per_s:.0f}/s")
            if n.timers_fired:
                ev.append("timers fired there: " + ", ".join(f"{k} {v}" for k, v in n.timers_fired.items()))
            several = (n.nr_running or 0) > 1 or len(n.runnable) > 1 or "SCHED" in n.tick_dependencies
            why = ("more than one runnable task keeps the tick on (field notes §3)" if several else
                   "a tick dependency other than the scheduler keeps it on (see tick_stop above)")
            change = f"{t}.cmdline" if t == "guest" or not several else f"{t}.vcpu_pinning"
            out.append(Finding(
                target=t, kind="nohz_tick", severity="high",
                title=f"nohz_full CPU {n.cpu}: the tick did not stop while a task runs there", evidence=ev,
                change=change,
                profile=(f"{t}:\n  cmdline:\n    isolcpus: \"domain,managed_irq,{_cpus(d.nohz_full)}\"\n"
                         f"    rcu_nocbs: \"{_cpus(d.nohz_full)}\"\n"),
                advice=f"{why}: keep one task per nohz_full CPU (isolcpus=domain keeps the scheduler's own "
                       "tasks off; pin the RT task and move the others with taskset/cpusets)"
                       + ("; RCU callbacks: add rcu_nocbs" if "RCU" in n.tick_dependencies else "")
                       + ("; a POSIX CPU timer of the task: remove it" if "POSIX_TIMER" in n.tick_dependencies
                          else "")))
    return out


def _find_no_nohz_full(d: TargetDiagnosis) -> list[Finding]:
    out: list[Finding] = []
    t = d.target
    rt_not_nohz = [c for c in d.rt_cpus if c not in d.nohz_full]
    if rt_not_nohz and not d.nohz_full:
        out.append(Finding(
            target=t, kind="no_nohz_full", severity="medium",
            title=f"RT CPU(s) {_cpus(rt_not_nohz)} not nohz_full: the tick runs there",
            evidence=[f"/sys/devices/system/cpu/nohz_full is empty; cmdline: {d.cmdline[:200]}"]
            + [f"local timer interrupts on CPU {c}: {d.timer_irq_per_s[c]:.0f}/s" for c in rt_not_nohz
               if c in d.timer_irq_per_s],
            change=f"{t}.cmdline",
            profile=f"{t}:\n  cmdline:\n    nohz_full: \"{_cpus(rt_not_nohz)}\"\n    rcu_nocbs: \"{_cpus(rt_not_nohz)}\"\n"))

    return out


def _find_timer_migration(d: TargetDiagnosis) -> list[Finding]:
    out: list[Finding] = []
    t, trace = d.target, d.trace
    if d.timer_migration == 1 and (d.nohz_full or d.rt_cpus):
        wakeups = sum(c.count for c in (trace.callbacks if trace else [])
                      if c.cpu in d.rt_cpus and c.function in ("nohz_csd_func", "sched_ttwu_pending") and c.from_ipi)
        out.append(Finding(
            target=t, kind="timer_migration", severity="medium",
            title="kernel.timer_migration=1: timers armed on RT CPUs may fire elsewhere and wake them by IPI",
            evidence=[f"/proc/sys/kernel/timer_migration = 1; RT CPUs {_cpus(d.rt_cpus)}"]
            + ([f"IPI wake-ups (nohz_csd_func/sched_ttwu_pending) on RT CPUs during the window: {wakeups}"]
               if wakeups else []),
            change=f"{t}.sysctl.kernel.timer_migration",
            profile=f"{t}:\n  sysctl:\n    kernel.timer_migration: \"0\"\n"))

    return out


def _find_rt_cpu_ipis(d: TargetDiagnosis) -> list[Finding]:
    out: list[Finding] = []
    t = d.target
    res_cal = {"RES", "CAL", "IPI0", "IPI1"}
    for cpu in d.rt_cpus:
        rate = sum(r.per_cpu.get(cpu, 0.0) for r in d.ipis if r.row in res_cal)
        if rate > RT_IPI_PER_S and cpu not in d.isolated:
            out.append(Finding(
                target=t, kind="rt_cpu_ipis", severity="medium",
                title=f"RT CPU {cpu} is not isolated and takes {rate:.0f} reschedule/function-call IPIs/s",
                evidence=[f"{r.row} ({r.description}): {r.per_cpu.get(cpu, 0):.1f}/s" for r in d.ipis
                          if r.row in res_cal],
                change=f"{t}.cmdline",
                profile=f"{t}:\n  cmdline:\n    isolcpus: \"domain,managed_irq,{_cpus(d.rt_cpus)}\"\n"))
    return out


def _find_vcpu_wakeups(d: TargetDiagnosis) -> list[Finding]:
    out: list[Finding] = []
    t, trace = d.target, d.trace
    if t != "host" or not d.wfx:
        return out
    ttwu_runs = [c for c in (trace.callbacks if trace else []) if c.function == "sched_ttwu_pending"
                 and c.from_ipi and (c.cpu in d.rt_cpus or not d.rt_cpus)]  # on the vCPUs' CPUs if known
    ttwu = sum(c.count for c in ttwu_runs)
    if ttwu:
        out.append(Finding(
            target=t, kind="vcpu_wakeup_ipis", severity="medium",
            title=f"sched_ttwu_pending cross-calls on the host: {ttwu} in {d.duration_s:.0f} s",
            evidence=[f"CPU {c.cpu}: {c.count} (interrupting {c.interrupted})" for c in ttwu_runs],
            change="host.vcpu_pinning",
            profile="host:\n  vcpu_pinning:\n    service: \"${qemu_service}\"\n    cpus: \"${rt_cpus}\"\n"
                    "    vcpus: \"${guest_rt_cpus}\"\n    housekeeping: \"${housekeeping_cpus}\"\n",
            advice="wake-ups of vCPU threads queued to another CPU; one vCPU per isolated host CPU keeps "
                   "them local (field notes §1)"))
    return out


def _find_wfx_traps(d: TargetDiagnosis) -> list[Finding]:
    out: list[Finding] = []
    t = d.target
    if t != "host":
        return out
    for vm in d.wfx:
        if vm.wfi_per_s > NEAR_ZERO_PER_S:
            try:
                since = parse_kernel_version(d.kernel) >= (*POLICY_SINCE, 0)
            except ParseError:
                since = False
            how = ("boot parameters kvm-arm.wfi_trap_policy=notrap kvm-arm.wfe_trap_policy=notrap "
                   f"(Linux {d.kernel} >= 6.11)" if since else
                   f"a patched host kernel (Linux {d.kernel} < 6.11 has no trap policy parameter)")
            out.append(Finding(
                target=t, kind="wfx_traps", severity="medium",
                title=f"VM {vm.name}: guest WFI traps to KVM {vm.wfi_per_s:.0f}/s",
                evidence=[f"{vm.vm} ({vm.name}): wfi_exit_stat {vm.wfi_per_s:.1f}/s, wfe_exit_stat "
                          f"{vm.wfe_per_s:.1f}/s" + (f", all exits {vm.exits_per_s:.0f}/s"
                                                     if vm.exits_per_s is not None else "")],
                change="host.wfx_notrap", profile="host:\n  wfx_notrap: true\n",
                advice=f"stop trapping WFI/WFE with {how} (field notes §2)"))
    return out


# --------------------------------------------------------------------------------------------------------
# Running it


class Window:
    """One target's window: the tracing state before, the window script, the state after; `abort` from
    another thread (Ctrl-C) kills the script and removes its instance on the target."""

    def __init__(self, t: Transport, subject: str, duration_s: float, events: EventSink) -> None:
        self.t, self.subject, self.duration_s, self.events = t, subject, duration_s, events
        self.instance = new_instance_name()
        self.pidfile = f"{PIDFILE_DIR}/{self.instance}.pid"
        self.marker = "@@rt-tune-diag-" + secrets.token_hex(8)
        self.before: dict[str, str] | None = None
        self._cancelled = threading.Event()

    def state(self) -> dict[str, str]:
        return parse_tracing_state(self.t.run(state_argv(), sudo=True, timeout_s=STATE_TIMEOUT_S).stdout)

    def run(self) -> dict[str, str]:
        self.before = self.state()
        if self._cancelled.is_set():  # aborted while the state was read: never start the window
            raise DiagnosisCancelled(f"{self.t.label}: cancelled before the window started")
        out = self.t.run(window_argv(self.marker, self.duration_s, self.instance, self.pidfile), sudo=True,
                         timeout_s=self.duration_s + WINDOW_OVERHEAD_S).stdout
        return split_sections(out, self.marker)

    def abort(self) -> None:
        """Stop this window: if it has not started, it never will (`run` checks); if it may have, kill the script
        and remove the instance, twice a second apart (a script started just now may not have written its pid
        file yet). Idempotent; runs on a fresh channel of the same SSH session."""
        if self._cancelled.is_set():
            return
        self._cancelled.set()
        if self.before is None:
            return
        for pause in (1.0, 0.0):
            self.t.run(cleanup_argv(self.instance, self.pidfile), sudo=True, timeout_s=60, check=False)
            time.sleep(pause)
        self.events(Event("diagnose.window.aborted", self.subject, "window stopped, tracing instance removed",
                          data={"instance": self.instance}))


def diagnose(unit: str, transports: dict[str, Transport], *, duration_s: float,
             rt_hints: dict[str, list[int]] | None = None, events: EventSink = discard,
             now: Callable[[], datetime] | None = None) -> Diagnosis:
    """Diagnose the unit's targets (`transports`: "host"/"guest" -> an open transport) over the same window.

    On any error, a timeout or KeyboardInterrupt every window is aborted (script killed, instance removed) before
    the exception propagates; afterwards each target's tracing state must equal the state before."""
    clock = now or (lambda: datetime.now().astimezone())
    started = clock()
    windows = {name: Window(t, f"{unit}.{name}", duration_s, events) for name, t in transports.items()}
    for name, w in windows.items():  # recorded (journal) before the target is touched
        events(Event("diagnose.window.started", f"{unit}.{name}", f"{w.t.label}: tracing instance {w.instance}",
                     data={"instance": w.instance, "pidfile": w.pidfile, "duration_s": duration_s}))
    pool = ThreadPoolExecutor(max_workers=len(windows), thread_name_prefix="diagnose")
    futures = {name: pool.submit(w.run) for name, w in windows.items()}
    try:
        t0 = time.monotonic()
        while True:  # the main thread waits, so Ctrl-C reaches it; it shows the window's progress meanwhile
            done, pending = wait(list(futures.values()), timeout=1.0, return_when=FIRST_EXCEPTION)
            if any(f.exception() for f in done) or not pending:
                break
            events(Event("diagnose.window", unit, f"tracing {', '.join(windows)} for {duration_s:g} s",
                         done=min(time.monotonic() - t0, duration_s), total=duration_s))
        events(Event("diagnose.window", unit, "window done, reading the results", done=duration_s,
                     total=duration_s))
        sections = {name: f.result() for name, f in futures.items()}
    except BaseException:
        for w in windows.values():
            try:
                w.abort()
            except Exception:  # the first error is the one to report; the state check below names the rest
                pass
        pool.shutdown(wait=False, cancel_futures=True)
        for w in windows.values():
            if w.before is not None:
                _check_state(w, w.before, w.state())
        raise
    pool.shutdown()
    targets = []
    for name, w in windows.items():
        after = w.state()
        assert w.before is not None
        _check_state(w, w.before, after)
        events(Event("diagnose.window.done", w.subject, "tracing instance removed, tracing state as before",
                     data={"instance": w.instance}))
        targets.append(analyse(sections[name], target=name, label=w.t.label, rt_hint=(rt_hints or {}).get(name, []),
                               state_before=w.before, state_after=after, now=clock()))
        events(Event("diagnose.target.done", w.subject, f"{len(targets[-1].findings)} finding(s)",
                     data={"findings": [f.kind for f in targets[-1].findings]}))
    return Diagnosis(unit=unit, started=started, duration_s=duration_s, targets=targets)


def _check_state(w: Window, before: dict[str, str], after: dict[str, str]) -> None:
    diffs = state_differences(before, after)
    leftovers = [i for i in after.get("instances", "").split() if i == w.instance]
    if diffs or leftovers:
        raise TracingStateChanged(f"{w.t.label}: the tracing state after the diagnosis differs from before: "
                                  + "; ".join(diffs + [f"instance {i} still present" for i in leftovers]))


def rt_hints_from_vars(vars: dict) -> dict[str, list[int]]:
    """The inventory's `rt_cpus` (host) and `guest_rt_cpus` (guest) vars, when they are CPU lists."""
    out = {}
    for target, key in (("host", "rt_cpus"), ("guest", "guest_rt_cpus")):
        value = vars.get(key)
        if value is None:
            continue
        try:
            out[target] = parse_cpu_list(str(value))
        except ParseError as exc:
            raise InputError(f"inventory var {key}: expected a CPU list like 1-3, got {value!r} ({exc})") from None
    return out
