"""What each change kind acts through: the kernel counters that should move when the change works.

The field notes did not find their problems in cyclictest's tail but by counting: IPIs per CPU by type, the
local timer on nohz_full CPUs, RCU softirqs, KVM's WFI/WFE exits, vCPU threads moving between CPUs. A tuning
change acts through one of these mechanisms, and its counts move by orders of magnitude where the latency tail
moves by percent under noise. Each kind declares here what it targets and in which direction, so the decision
can keep a change whose latency is shown not worse and whose mechanism is shown reduced (issue #18), and the
report can show the counts beside the latency.

A mechanism names counter *classes*, not /proc/interrupts row names, because the rows differ by architecture:
function-call IPIs are `CAL` on x86 and `IPI1` on arm64, the local timer is `LOC` on x86 and the `arch_timer`
PPI on arm64. `irq_class` maps a row to its class from the description or handler the kernel prints.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from orchestrator.measure.counters import CounterDeltas, Rate, rate_of

#: IRQ classes a mechanism can count (/proc/interrupts rows, classified by `irq_class`).
IrqClass = Literal["function_call_ipi", "irq_work_ipi", "reschedule_ipi", "tlb_ipi", "local_timer", "device"]
Source = Literal["irq", "softirq", "kvm", "thread", "sysreg"]

_IPI_DESCRIPTIONS: dict[str, IrqClass] = {
    "function call interrupts": "function_call_ipi",
    "single function call interrupts": "function_call_ipi",
    "irq work interrupts": "irq_work_ipi",
    "rescheduling interrupts": "reschedule_ipi",
    "tlb shootdowns": "tlb_ipi",
    "local timer interrupts": "local_timer",
}
#: Handlers of per-CPU timer IRQs (numbered rows): arm64's architected timer; x86's IRQ 0 is the legacy PIT.
_TIMER_ACTIONS = ("arch_timer",)
_NOT_DEVICE_ACTIONS = ("arch_timer", "timer", "cascade", "arm-pmu", "kvm guest vtimer", "kvm guest ptimer")


def irq_class(name: str, description: str | None, actions: list[str]) -> IrqClass | None:
    """The class of one /proc/interrupts row: `name` its first column ("CAL", "IPI1", "27"), `description` the
    text of a named row, `actions` the handlers of a numbered row. None: a row no mechanism counts (NMI, ERR)."""
    if description is not None and not name.isdigit():
        return _IPI_DESCRIPTIONS.get(description.strip().lower())
    if not name.isdigit():
        return None
    handlers = [a.strip().lower() for a in actions]
    if any(h in _TIMER_ACTIONS for h in handlers):
        return "local_timer"
    if handlers and not any(h in _NOT_DEVICE_ACTIONS for h in handlers):
        return "device"
    return None


#: Named /proc/interrupts rows of each IPI class, x86 and arm64 (only one of each pair exists on a unit; the rate
#: sums what exists). The arm64 IPI numbers are the same on 6.1 and 6.12 for these three.
_NAMED_ROWS: dict[str, tuple[str, ...]] = {
    "function_call_ipi": ("CAL", "IPI1"),
    "irq_work_ipi": ("IWI", "IPI5"),
    "reschedule_ipi": ("RES", "IPI0"),
    "tlb_ipi": ("TLB",),
    "local_timer": ("LOC",),  # arm64: the arch_timer PPI, a numbered row found from its handler
}


@dataclass(frozen=True)
class Mechanism:
    """One counter a change targets, summed over the CPUs it concerns and read as a rate around each run.

    `source`: irq (classes of /proc/interrupts rows, IrqClass), softirq (/proc/softirqs rows, e.g. "RCU"), kvm
    (per-VM counters in KVM's debugfs, read on the host: `wfi_exit_stat`), thread (scheduler counters of the
    guest's vCPU threads on the host: `nr_migrations`), sysreg (system-register traps of the guest's vCPU threads
    on an arm64 host, by register: `ICC_SGI1R_EL1`, the IPIs the guest sends). `on`: counted on the changed target,
    or on the unit's host (KVM and vCPU threads live there). `cpus`: the RT CPUs of where it is counted, or all of
    them. `guest_only`: it counts the guest's doing, so only a change of the guest targets it."""

    label: str
    source: Source
    names: tuple[str, ...]
    on: Literal["target", "host"] = "target"
    cpus: Literal["rt", "all"] = "rt"
    direction: Literal["down"] = "down"
    guest_only: bool = False

    def public(self) -> dict[str, Any]:
        return {"label": self.label, "source": self.source, "names": list(self.names), "on": self.on,
                "cpus": self.cpus, "direction": self.direction}

    def counters(self, deltas: CounterDeltas, vm: str | None = None, tids: Sequence[int] = ()) -> list[str]:
        """The counter key patterns (measure/counters.py) this mechanism sums on a unit whose counters are
        `deltas`: IRQ classes become the row names that unit has (its numbered rows by their handlers); `vm`:
        the guest VM's name among the host's KVM counters (None: every VM); `tids`: the guest's vCPU threads on
        the host (none: every thread)."""
        if self.source == "irq":
            out = [f"irq:{row}" for cls in self.names for row in _NAMED_ROWS.get(cls, ())]
            out += [f"irq:{n}" for n, actions in sorted(deltas.irq_actions.items())
                    if irq_class(n, None, actions) in self.names]
            return out
        if self.source == "softirq":
            return [f"softirq:{n}" for n in self.names]
        if self.source == "kvm":
            return [f"kvm:{vm or '*'}:{n}" for n in self.names]
        if self.source == "sysreg":
            return [f"sysreg:{t}:{n}" for t in ([str(t) for t in tids] or ["*"]) for n in self.names]
        return [f"thread:*:{n}" for n in self.names]

    def rate(self, deltas: CounterDeltas | None, rt_cpus: Sequence[int], vm: str | None = None,
             tids: Sequence[int] = ()) -> Rate:
        """Events per second over one run, or None with the reason (no counters, a reset, none on the unit)."""
        if deltas is None:
            return Rate(value=None, keys=[], total=None, interval_s=None, reason="no counters were read")
        patterns = self.counters(deltas, vm, tids)
        if not patterns:
            return Rate(value=None, keys=[], total=None, interval_s=deltas.interval_s,
                        reason=f"{self.label}: no such counter on this unit")
        if self.cpus == "rt" and not rt_cpus:
            return Rate(value=None, keys=[], total=None, interval_s=deltas.interval_s,
                        reason=f"{self.label}: the unit declares no RT CPUs for it")
        return rate_of(deltas, patterns, sorted(rt_cpus) if self.cpus == "rt" else None)


_RESCHED = Mechanism("reschedule IPIs on the RT CPUs", "irq", ("reschedule_ipi",))
_TIMER = Mechanism("local timer interrupts on the RT CPUs", "irq", ("local_timer",))
_IRQ_WORK = Mechanism("IRQ-work IPIs on the RT CPUs", "irq", ("irq_work_ipi",))
_RCU = Mechanism("RCU softirqs on the RT CPUs", "softirq", ("RCU",))
_DEVICE = Mechanism("device interrupts on the RT CPUs", "irq", ("device",))
_WFX = Mechanism("WFI/WFE exits of the guest's VM", "kvm", ("wfi_exit_stat", "wfe_exit_stat"), on="host",
                 cpus="all")
_EXITS = Mechanism("KVM exits of the guest's VM", "kvm", ("exits",), on="host", cpus="all")
#: every IPI an arm64 guest sends is a write of ICC_SGI1R_EL1 that traps to the host (field notes section 1: the
#: trap stays even with GICv4.1, so the fix is fewer IPIs): a guest change that removes IPIs removes these traps
_SGI_TRAPS = Mechanism("IPIs the guest sends (ICC_SGI1R_EL1 traps on the host)", "sysreg", ("ICC_SGI1R_EL1",),
                       on="host", cpus="all", guest_only=True)

#: cmdline argument -> what it acts through (isolation stops the scheduler's IPIs and IRQ work there, nohz_full
#: the tick, rcu_nocbs the RCU callbacks, the trap policies the WFx exits, GICv4 direct injection the exits).
CMDLINE_MECHANISMS: dict[str, tuple[Mechanism, ...]] = {
    "isolcpus": (_RESCHED, _IRQ_WORK, _SGI_TRAPS),
    "nohz_full": (_TIMER,),
    "rcu_nocbs": (_RCU,),
    "irqaffinity": (_DEVICE,),
    "kvm-arm.wfi_trap_policy": (_WFX,),
    "kvm-arm.wfe_trap_policy": (_WFX,),
    "kvm-arm.vgic_v4_enable": (_EXITS,),
}

#: sysctl -> what it acts through: with timer migration on, a timer armed for a nohz CPU fires elsewhere and an
#: IPI wakes the CPU (field notes section 4).
SYSCTL_MECHANISMS: dict[str, tuple[Mechanism, ...]] = {
    "kernel.timer_migration": (_RESCHED, _SGI_TRAPS),
}


_TLB = Mechanism("TLB shootdowns on the RT CPUs", "irq", ("tlb_ipi",))

#: sysfs knob -> what it acts through: unbound and writeback kworkers woken on an RT CPU (reschedule IPIs);
#: khugepaged, compaction and ksmd changing mappings (TLB shootdown IPIs on x86; arm64 invalidates by broadcast
#: in hardware, so there it has no counter); cpufreq and cpuidle act on wake-up latency alone.
SYSFS_MECHANISMS: dict[str, tuple[Mechanism, ...]] = {
    "workqueue_cpumask": (_RESCHED,),
    "writeback_cpumask": (_RESCHED,),
    "transparent_hugepage": (_TLB,),
    "transparent_hugepage_defrag": (_TLB,),
    "ksm_run": (_TLB,),
}


def mechanisms_for(kind: str, params: dict[str, Any], target: str) -> tuple[Mechanism, ...]:
    """The mechanisms a resolved profile entry of `target` ("host" or "guest") targets (empty: the kind or this
    entry declares none, so only its latency can be evidence). Whether the unit has each counter is the
    measuring's question (run/evidence.py drops the system-register traps where the host has no tracepoint)."""
    if kind == "bundle":  # its members' mechanisms, each once
        found: dict[str, Mechanism] = {}
        for member in params.get("members", []):
            for m in mechanisms_for(str(member.get("kind")), member.get("params", {}), target):
                found.setdefault(m.label, m)
        return tuple(found.values())
    return tuple(m for m in _declared(kind, params) if target == "guest" or not m.guest_only)


def _declared(kind: str, params: dict[str, Any]) -> tuple[Mechanism, ...]:
    if kind == "service_disable":
        # a crash loop's core dumps kick every CPU (kick_all_cpus_sync: function-call IPIs) and queue IRQ work
        return (Mechanism("function-call and IRQ-work IPIs on the RT CPUs", "irq",
                          ("function_call_ipi", "irq_work_ipi")), _SGI_TRAPS)
    if kind == "sysctl":
        return SYSCTL_MECHANISMS.get(str(params.get("name", "")).replace("/", "."), ())
    if kind == "vcpu_pinning":
        return (Mechanism("migrations of the guest's vCPU threads", "thread", ("nr_migrations",), on="host",
                          cpus="all"),)
    if kind in ("irq_affinity", "irqbalance"):
        return (_DEVICE,)
    if kind == "sysfs":
        return SYSFS_MECHANISMS.get(str(params.get("knob", "")), ())
    if kind == "wfx_notrap":
        return (_WFX,)
    if kind == "cmdline":
        added = [str(key) for key in params.get("add", {})]
        found: list[Mechanism] = []
        for key in added:
            for mech in CMDLINE_MECHANISMS.get(key, ()):
                if mech not in found:
                    found.append(mech)
        if "nohz_full" in added:
            # nohz_full turns the tick back on by IRQ work (tick_nohz_full_kick_cpu) whenever a tick dependency
            # appears there, e.g. a second runnable task: the IRQ-work IPIs on the RT CPUs can rise or fall with
            # the workload (x86 lab, load beside cyclictest on CPU 1: +378% and +504%; arm64 lab: -96%), so the
            # change does not target them
            found = [m for m in found if m is not _IRQ_WORK]
        return tuple(found)
    return ()  # kernel (a different kernel acts through everything), other sysctls
