"""From the two samples and the trace of a window to a target's diagnosis: IPI rates, crash loops, the tick on
nohz_full CPUs, WFx exits, and whether the trace and the tracing state can be trusted."""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from datetime import datetime, timedelta

from orchestrator.config.knobs import selected_choice
from orchestrator.core.cpulist import parse_kernel_cpulist as parse_cpu_list
from orchestrator.core.errors import ParseError
from orchestrator.diagnose.findings import findings
from orchestrator.diagnose.kstate import (
    ServiceState,
    parse_irqbalance,
    parse_kvm_vms,
    parse_rt_throttling,
    parse_sched_debug,
    parse_service_states,
    parse_timer_list,
    parse_vmstat,
)
from orchestrator.diagnose.model import (
    CrashLoop,
    IpiRate,
    NohzCpu,
    TargetDiagnosis,
    VmWfx,
)
from orchestrator.diagnose.probe import decode_trace
from orchestrator.diagnose.tracing import TraceSummary, parse_trace, summarize_trace
from orchestrator.facts.irqs import Irq, is_ipi_row, parse_interrupts
from orchestrator.facts.kthreads import parse_kthreads
from orchestrator.facts.systemd import parse_coredumps

CRASH_RESTARTS = 3  # NRestarts at least this, with core dumps in the last hour: a crash loop even if quiet now


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
    threads = parse_kthreads(sections["kthreads"]) if sections.get("kthreads", "").strip() else []
    on_rt = sorted({k.comm for k in threads if k.movable and not k.comm.startswith("kworker/")
                    and set(parse_cpu_list(k.cpus)) & set(rt_cpus)})
    rt_runtime, rt_throttled = parse_rt_throttling(sections.get("rt_throttling", ""))
    vm0, vm1 = parse_vmstat(sections.get("vmstat0", "")), parse_vmstat(sections.get("vmstat1", ""))
    diag = TargetDiagnosis(
        target=target, label=label, kernel=meta.get("kernel", "?"), arch=meta.get("arch", "?"), duration_s=seconds,
        cpus=online, rt_cpus=rt_cpus, nohz_full=nohz_full, isolated=isolated, timer_migration=timer_migration,
        cmdline=sections.get("cmdline", "").strip(), tracing=tracing, ipis=ipis, timer_irq_per_s=timer_irq,
        trace=trace, nohz=nohz, crash_loops=loops, wfx=wfx, findings=[], kthreads_on_rt=on_rt,
        irqbalance=parse_irqbalance(sections.get("irqbalance", "")), rt_throttled=rt_throttled,
        rt_runtime_us=rt_runtime, thp=selected_choice(sections["thp"]) if sections.get("thp", "").strip() else None,
        vmstat_delta={k: vm1[k] - vm0[k] for k in vm1 if k in vm0}, tracing_state_before=state_before,
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
    instance enables an event. The configured size is the same; nothing rt-tune can or should undo (shrinking it would
    set a 7 KB buffer)."""
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
