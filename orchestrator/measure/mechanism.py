"""What a change kind declares about the mechanism it acts through: which counters (measure/counters.py keys), on
which CPUs, read where (the measured target, or the host of a guest target), and which way they should move.

    spec = MechanismSpec(label="function-call IPIs on the RT CPUs", counters=["irq:CAL", "irq:IPI1"])
    spec.rate(result.counters, rt_cpus=[1])          # Rate: value (events/s) or None with the reason

`counters` are patterns over a key without its `:cpu<N>` part (fnmatch: `irq:IPI*`, `kvm:*:wfi_exit_stat`,
`irq:[0-9]*` for every numbered IRQ). List the names of every architecture the kind runs on: only one of
`irq:CAL` (x86) and `irq:IPI1` (arm64) exists on a unit, and the rate sums what exists. `cpus`: "rt" (the unit's
RT CPUs, given by the caller: for a guest target its `guest_rt_cpus`), "all" (every CPU, and the counters that
are not per CPU: ctxt, processes, kvm:, thread:), or a list. `side`: "target" reads `LatencyResult.counters`;
"host" the deltas of `read_counters` on the guest's host around the run (KVM and vCPU-thread counters are only
there). The statistics over runs (a rate ratio with its interval) are the decision rule's, not this module's.

`EXAMPLES` holds the issue's mechanisms as specs, for the engineer declaring a change kind's mechanism.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from orchestrator.measure.counters import PER_CPU_PREFIXES, PREFIXES, CounterDeltas, Rate, rate_of

Pattern = Annotated[str, StringConstraints(min_length=1, max_length=200, pattern=r"^[^\s,]+$")]


class MechanismSpec(BaseModel):
    """One mechanism: counters, CPUs, where they are read, the expected direction, and how to name it."""

    model_config = ConfigDict(extra="forbid")

    #: how reports and outcomes name it: "function-call IPIs (CAL/IPI1) on the RT CPUs"
    label: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    #: key patterns without `:cpu<N>` (module docstring); their deltas are summed
    counters: list[Pattern] = Field(min_length=1, max_length=32)
    cpus: list[Annotated[int, Field(ge=0, le=8191)]] | Literal["rt", "all"] = "rt"
    side: Literal["target", "host"] = "target"
    #: the direction the change should move the rate ("down": fewer events is the change working)
    direction: Literal["down", "up"] = "down"

    @model_validator(mode="after")
    def _patterns_fit(self) -> MechanismSpec:
        for p in self.counters:
            prefix = p.split(":", 1)[0]
            if prefix not in PREFIXES:
                raise ValueError(f"counter {p!r}: expected a key pattern whose first field is one of "
                                 f"{', '.join(PREFIXES)} (measure/counters.py)")
            if self.cpus != "all" and prefix not in PER_CPU_PREFIXES:
                raise ValueError(f"counter {p!r} is not counted per CPU: use cpus: all")
        if isinstance(self.cpus, list) and (not self.cpus or len(set(self.cpus)) != len(self.cpus)):
            raise ValueError("cpus: expected distinct CPU numbers, at least one (or rt, or all)")
        return self

    def cpu_list(self, rt_cpus: Sequence[int]) -> list[int] | None:
        """The CPUs to count on (None: all); "rt" with no RT CPUs is an error, not every CPU."""
        if self.cpus == "all":
            return None
        if self.cpus == "rt":
            if not rt_cpus:
                raise ValueError(f"{self.label}: counted on the RT CPUs, but the unit has none declared")
            return sorted(rt_cpus)
        return list(self.cpus)

    def rate(self, deltas: CounterDeltas | None, rt_cpus: Sequence[int] = ()) -> Rate:
        """Events per second over one run (None with the reason when it cannot be told, see `rate_of`)."""
        if deltas is None:
            return Rate(value=None, keys=[], total=None, interval_s=None,
                        reason="no counters were read with this run")
        return rate_of(deltas, self.counters, self.cpu_list(rt_cpus))


#: The issue's mechanisms (field notes: IPI0 reschedule, IPI1 function call, IPI5 IRQ work on arm64; RES, CAL,
#: IWI on x86). Local-timer interrupts are `irq:LOC` on x86; on arm64 the timer is a numbered IRQ (`arch_timer`
#: in CounterDeltas.irq_actions), so a spec for it names that number once it is known for the unit.
EXAMPLES: dict[str, MechanismSpec] = {
    "function-call IPIs": MechanismSpec(label="function-call IPIs (CAL, IPI1) on the RT CPUs",
                                        counters=["irq:CAL", "irq:IPI1"]),
    "reschedule IPIs": MechanismSpec(label="reschedule IPIs (RES, IPI0) on the RT CPUs",
                                     counters=["irq:RES", "irq:IPI0"]),
    "IRQ-work IPIs": MechanismSpec(label="IRQ-work IPIs (IWI, IPI5) on the RT CPUs", counters=["irq:IWI", "irq:IPI5"]),
    "local-timer interrupts (x86)": MechanismSpec(label="local-timer interrupts (LOC) on the RT CPUs",
                                                  counters=["irq:LOC"]),
    "RCU softirqs": MechanismSpec(label="RCU softirqs on the RT CPUs", counters=["softirq:RCU"]),
    "device interrupts": MechanismSpec(label="device interrupts (numbered IRQs) on the RT CPUs",
                                       counters=["irq:[0-9]*"]),
    "WFx exits": MechanismSpec(label="WFI/WFE exits of the guest's VM", counters=["kvm:*:wfi_exit_stat",
                                                                                  "kvm:*:wfe_exit_stat"],
                               cpus="all", side="host"),
    "vCPU thread migrations": MechanismSpec(label="migrations of the vCPU threads", counters=["thread:*:nr_migrations"],
                                            cpus="all", side="host"),
}
