"""Findings: one function per thing the field notes look for, each with its evidence and the change that
addresses it (or why no tuning does)."""

from __future__ import annotations

import re
from collections import Counter

from orchestrator.boot.wfx import NEAR_ZERO_PER_S, POLICY_SINCE, parse_kernel_version
from orchestrator.core.cpulist import CpuListError, cpus_of_mask
from orchestrator.core.cpulist import parse_kernel_cpulist as parse_cpu_list
from orchestrator.core.errors import ParseError
from orchestrator.diagnose.model import SEVERITY_ORDER, Finding, TargetDiagnosis
from orchestrator.diagnose.tracing import TraceSummary

RT_IPI_PER_S = 5.0  # RES/CAL (IPI0/IPI1) per second on an RT CPU above which isolation is recommended


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
    for find in (_find_crash_loops, _find_kick_all_cpus, _find_page_table_teardown, _find_nohz_ticks,
                 _find_no_nohz_full, _find_timer_migration, _find_rt_cpu_ipis, _find_vcpu_wakeups, _find_wfx_traps,
                 _find_rt_throttling, _find_irqbalance, _find_thp_compaction, _find_kthreads_on_rt_cpus):
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
            profile=f"{t}:\n  cmdline:\n    nohz_full: \"{_cpus(rt_not_nohz)}\"\n"
                    f"    rcu_nocbs: \"{_cpus(rt_not_nohz)}\"\n"))

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


# ---- issue #20's kinds ------------------------------------------------------------------------------------------
def _housekeeping_var(target: str) -> str:
    return "${housekeeping_cpus}" if target == "host" else "${guest_housekeeping_cpus}"


def _find_rt_throttling(d: TargetDiagnosis) -> list[Finding]:
    if not d.rt_throttled:
        return []
    t = d.target
    return [Finding(
        target=t, kind="rt_throttling", severity="high",
        title=f"RT throttling activated ({d.rt_throttled} time(s) since boot): an RT task used its whole share of "
              "a CPU and was stopped for the rest of the period",
        evidence=[f"kernel log: 'sched: RT throttling activated' x{d.rt_throttled}",
                  f"kernel.sched_rt_runtime_us = {d.rt_runtime_us}"],
        change=f"{t}.sysctl.kernel.sched_rt_runtime_us",
        profile=f"{t}:\n  services:\n    enable: [stalld]\n  sysctl:\n    kernel.sched_rt_runtime_us: -1\n",
        advice="An RT task that never sleeps is a bug or a busy poll: with throttling off it starves its CPU's "
               "kernel threads for good unless stalld boosts them, which is why rt-tune wants stalld enabled in "
               "the same section (or `acknowledge: [rt_throttling_off]`)")]


def _find_irqbalance(d: TargetDiagnosis) -> list[Finding]:
    ib = d.irqbalance
    if ib is None or not ib.active or not d.rt_cpus:
        return []
    banned: set[int] = set()
    if ib.banned:
        try:
            banned = set(parse_cpu_list(ib.banned))
        except (CpuListError, ParseError):
            banned = set(cpus_of_mask(ib.banned) or [])
    exposed = sorted(set(d.rt_cpus) - banned)
    if not exposed:
        return []
    t = d.target
    return [Finding(
        target=t, kind="irqbalance", severity="medium",
        title=f"irqbalance runs and may move IRQs onto RT CPUs {_cpus(exposed)}",
        evidence=["irqbalance.service active", f"banned CPUs: {ib.banned or 'none'}"],
        change=f"{t}.irqbalance",
        profile=(f"{t}:\n  irqbalance:\n    housekeeping: \"{_housekeeping_var(t)}\"\n"
                 f"    banned: \"{_cpus(d.rt_cpus)}\"\n"))]


def _find_thp_compaction(d: TargetDiagnosis) -> list[Finding]:
    stalls, collapses = d.vmstat_delta.get("compact_stall", 0), d.vmstat_delta.get("thp_collapse_alloc", 0)
    if d.thp in (None, "never") or not (stalls or collapses):
        return []
    t = d.target
    return [Finding(
        target=t, kind="thp_compaction", severity="medium",
        title=f"transparent hugepages ({d.thp}) compacted or collapsed memory during the window",
        evidence=[f"/proc/vmstat in the window: compact_stall +{stalls}, thp_collapse_alloc +{collapses}"],
        change=f"{t}.sysfs.transparent_hugepage",
        profile=f"{t}:\n  sysfs:\n    transparent_hugepage: never\n")]


def _find_kthreads_on_rt_cpus(d: TargetDiagnosis) -> list[Finding]:
    if not d.rt_cpus or not d.kthreads_on_rt:
        return []
    t = d.target
    patterns = sorted({re.sub(r"\d+$", "*", n) for n in d.kthreads_on_rt})
    shown = ", ".join(d.kthreads_on_rt[:12]) + (f" and {len(d.kthreads_on_rt) - 12} more"
                                               if len(d.kthreads_on_rt) > 12 else "")
    rules = "".join(f"    - {{match: \"{p}\", cpus: \"{_housekeeping_var(t)}\"}}\n" for p in patterns[:8])
    return [Finding(
        target=t, kind="kthreads_on_rt_cpus", severity="info",
        title=f"{len(d.kthreads_on_rt)} movable kernel thread(s) may run on the RT CPUs {_cpus(d.rt_cpus)}",
        evidence=[f"allowed on an RT CPU: {shown}"],
        change=f"{t}.kthreads", profile=f"{t}:\n  kthreads:\n{rules}")]
