"""The mechanism evidence of one change, read around each of its measurement runs.

A run on the measured target brings that target's counters with it (the measurement's own round trip reads them
right before and right after cyclictest). What a change acts through is not always there: a host change acts on
the host's CPUs, the WFI/WFE exits and the vCPU threads live on the host, while cyclictest runs in the guest. For
those the host's counters are read right before and right after the guest's run (two more round trips on the
host, which is reached directly). The system-register traps of the guest's vCPU threads (arm64: every IPI the
guest sends traps) are counted in a private tracefs instance that the first of these reads creates and the second
reads and removes; where the host has no such tracepoint the mechanism is left out before the first run, so the
decision's error budget is split over the mechanisms that can be read. Each declared mechanism
(orchestrator.changes.mechanism) becomes one rate per run, events per second, or None when the counters cannot
tell (a reboot between the reads, a counter the kernel does not have): the decision rule compares the rates over
runs.

Where the latency is evidence at all: a host change is measured in a guest only when that guest runs on that
host (inventory `guest_on_host`); otherwise its latency is reported but marked not applicable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from orchestrator.changes.mechanism import Mechanism, mechanisms_for
from orchestrator.config.profile import ChangeSpec
from orchestrator.core.cpulist import parse_cpulist
from orchestrator.core.errors import TuneError
from orchestrator.facts.base import BOOT_ID
from orchestrator.facts.kvm import SYSREG_TRACEPOINT
from orchestrator.facts.qemu import QEMU_PROCESSES
from orchestrator.facts.systemd import unit_state_fact
from orchestrator.measure.counters import (
    CounterDeltas,
    CounterSnapshot,
    SysregStep,
    counter_deltas,
    read_counters,
    sysreg_instance,
)
from orchestrator.measure.model import LatencyResult
from orchestrator.remote.transport import Transport
from orchestrator.run.context import RunContext


@dataclass
class RunEvidence:
    """One run's mechanism rates (label -> events/s or None) and why a rate is missing."""

    rates: dict[str, float | None]
    missing: dict[str, str] = field(default_factory=dict)
    host: CounterDeltas | None = None  # the host's counters over a guest's run, when read


class MechanismProbe:
    """Reads one change's declared mechanisms around each run (module docstring)."""

    def __init__(self, ctx: RunContext, unit: str, spec: ChangeSpec, connect: Callable[[str], Transport]) -> None:
        self.ctx, self.unit, self.spec, self.connect = ctx, unit, spec, connect
        self.mechanisms: tuple[Mechanism, ...] = mechanisms_for(spec.kind, spec.params, spec.target)
        self.measured = ctx.measure_target(unit)
        us = ctx.inventory.unit(unit)
        self.latency_applicable = not (spec.target == "host" and self.measured == "guest" and not us.guest_on_host)
        vars_ = us.vars
        self._rt = {"host": self._cpus(vars_.get("rt_cpus")), "guest": self._cpus(vars_.get("guest_rt_cpus"))}
        self._qemu = str(vars_.get("qemu_service") or "")
        self._vcpus: tuple[str, list[int], str | None] | None = None  # (host boot_id, vCPU tids, VM name)
        #: declared mechanisms this unit cannot count (label -> why), left out of the decision
        self.unavailable: dict[str, str] = {}
        if any(m.source == "sysreg" for m in self.mechanisms):
            self._drop_sysreg_where_unreadable()

    def _drop_sysreg_where_unreadable(self) -> None:
        why: str | None
        if self.measured != "guest":  # (a sysreg mechanism is always read on the host)
            why = "counted on the host around a guest's run, and this unit's runs are not a guest's"
        else:
            try:
                why = SYSREG_TRACEPOINT.gather(self.connect("host"))
            except TuneError as exc:
                why = f"could not check the host's tracepoint: {exc}"
        if why is not None:
            self.unavailable.update({m.label: why for m in self.mechanisms if m.source == "sysreg"})
            self.mechanisms = tuple(m for m in self.mechanisms if m.source != "sysreg")

    @staticmethod
    def _cpus(value: Any) -> list[int]:
        return parse_cpulist(str(value)) if value not in (None, "") else []

    @property
    def labels(self) -> list[str]:
        return [m.label for m in self.mechanisms]

    def declared(self) -> list[dict[str, Any]]:
        return [{**m.public(), "read_on": self._where(m)} for m in self.mechanisms]

    def left_out(self) -> list[dict[str, Any]]:
        """Declared mechanisms this unit cannot count, with why (shown in the outcome, not decided on)."""
        return [{**m.public(), "why": self.unavailable[m.label]}
                for m in mechanisms_for(self.spec.kind, self.spec.params, self.spec.target)
                if m.label in self.unavailable]

    def _where(self, m: Mechanism) -> str:
        """Which target's counters hold it: the changed target's, or the host's."""
        return self.spec.target if m.on == "target" else "host"

    @property
    def reads_host(self) -> bool:
        """The host's counters are read around each run (the measured target is the guest, and a mechanism
        lives on the host)."""
        return self.measured == "guest" and any(self._where(m) == "host" for m in self.mechanisms)

    def _guest_vm(self, host: Transport) -> tuple[list[int], str | None]:
        """The vCPU thread ids and the VM name of the guest's QEMU on the host (re-read after the host reboots:
        QEMU restarts with new threads)."""
        boot = BOOT_ID.gather(host)
        if self._vcpus is not None and self._vcpus[0] == boot:
            return self._vcpus[1], self._vcpus[2]
        tids: list[int] = []
        name: str | None = None
        if self._qemu:
            pid = unit_state_fact(self._qemu).gather(host).main_pid
            for proc in QEMU_PROCESSES.gather(host) if pid else []:
                if proc.pid == pid:
                    tids, name = [v.tid for v in proc.vcpus], proc.name
        self._vcpus = (boot, tids, name)
        return tids, name

    def around(self, run: Callable[[], LatencyResult]) -> tuple[LatencyResult, RunEvidence]:
        """Run `run` (one measurement) with the host's counters read right before and after it when needed,
        and the declared mechanisms' rates of that run."""
        host_deltas: CounterDeltas | None = None
        vm: str | None = None
        missing: dict[str, str] = {}
        if not self.mechanisms:
            return run(), RunEvidence({})
        before: CounterSnapshot | None = None
        sysreg: str | None = sysreg_instance() if any(m.source == "sysreg" for m in self.mechanisms) else None
        tids: list[int] = []
        if self.reads_host:
            host = self.connect("host")
            try:
                tids, vm = self._guest_vm(host)
                before = read_counters(host, tids, sysreg=("start", sysreg) if sysreg else None)
            except TuneError as exc:  # the evidence is missing for this run; the run itself goes on
                missing["host"] = str(exc)
        stop: SysregStep | None = ("stop", sysreg) if sysreg else None
        try:
            result = run()
        except BaseException:
            if before is not None and stop is not None:  # no trigger left counting on the host
                try:
                    read_counters(self.connect("host"), tids, sysreg=stop)
                except TuneError:
                    pass  # the next run's start removes a stale instance
            raise
        if before is not None:
            try:
                host = self.connect("host")
                host_deltas = counter_deltas(before, read_counters(host, tids, sysreg=stop))
            except TuneError as exc:
                missing["host"] = str(exc)
        rates: dict[str, float | None] = {}
        for m in self.mechanisms:
            where = self._where(m)
            deltas = result.counters if where == self.measured else host_deltas
            r = m.rate(deltas, self._rt[where], vm if m.source == "kvm" else None,
                       tids if m.source == "sysreg" else ())
            rates[m.label] = r.value
            if r.value is None:
                missing[m.label] = r.reason or missing.get("host", "no counters")
        return result, RunEvidence(rates, missing, host_deltas)
