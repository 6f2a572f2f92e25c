"""irqbalance kept off the RT CPUs, and new IRQs' default affinity on the housekeeping CPUs (RHEL's RT-KVM host
guide; tuned realtime's [irqbalance] banned_cpus; NTO's globallyDisableIrqLoadBalancing does the same by ban).

Two parts, each where the unit has it:
- irqbalance (when its unit exists): a systemd drop-in of rt-tune's sets IRQBALANCE_BANNED_CPULIST (irqbalance
  >= 1.8) to the RT CPUs; a running irqbalance is restarted to read it. `stop: true` stops and disables it
  instead (NTO's global switch).
- /proc/irq/default_smp_affinity (the CPUs an IRQ gets when it is allocated): the housekeeping CPUs as a hex
  mask, now and at every boot (a tmpfiles.d entry of rt-tune's).
Rollback removes both files, restores the mask and irqbalance's state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from orchestrator.changes.base import Change, ChangeError, State, b64, restore_file, unb64
from orchestrator.changes.service import service_state
from orchestrator.core.cpulist import cpumask_of, cpus_of_mask, format_cpulist
from orchestrator.core.errors import InputError
from orchestrator.facts.base import Fact, compound_fact, files_fact
from orchestrator.facts.systemd import unit_state_fact
from orchestrator.remote.transport import Transport, write_values_command

UNIT = "irqbalance.service"
DROPIN = "/etc/systemd/system/irqbalance.service.d/90-rt-tune.conf"
DEFAULT_AFFINITY = "/proc/irq/default_smp_affinity"
TMPFILES = "/etc/tmpfiles.d/90-rt-tune-irq-default-affinity.conf"


@dataclass
class IrqbalanceChange(Change):
    housekeeping: list[int]
    rt: list[int]
    stop: bool = False
    kind: str = field(default="irqbalance", init=False)

    def __post_init__(self) -> None:
        if not self.housekeeping:
            raise InputError("irqbalance: no housekeeping CPUs")
        if set(self.housekeeping) & set(self.rt):
            raise InputError("irqbalance: the housekeeping and RT CPUs overlap")
        self.change_id = "irqbalance"

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> IrqbalanceChange:
        return cls(list(params["housekeeping"]), list(params.get("rt") or []), stop=bool(params.get("stop")))

    def _dropin_bytes(self) -> bytes:
        return (f"# managed by rt-tune: {self.change_id} (removed when rt-tune rolls it back)\n[Service]\n"
                f"Environment=IRQBALANCE_BANNED_CPULIST={format_cpulist(self.rt)}\n").encode()

    def _tmpfiles_bytes(self) -> bytes:
        return (f"# managed by rt-tune: {self.change_id} (removed when rt-tune rolls it back)\n"
                f"w {DEFAULT_AFFINITY} - - - - {cpumask_of(self.housekeeping)}\n").encode()

    def read(self, t: Transport) -> State:
        return self.state_fact().gather(t)

    def state_fact(self) -> Fact[State]:
        """The mask, rt-tune's two files and irqbalance's unit state: two commands, one fact."""
        files, unit = files_fact(f"change:{self.change_id}:files", [DEFAULT_AFFINITY, DROPIN, TMPFILES]), \
            unit_state_fact(UNIT)

        def combine(parts: dict[str, Any]) -> State:
            got = parts[files.name]
            mask = got[DEFAULT_AFFINITY]
            return {"default_affinity": None if mask is None else mask.decode().strip(),
                    "dropin": b64(got[DROPIN]), "tmpfiles": b64(got[TMPFILES]),
                    "service": service_state(parts[unit.name])}

        return compound_fact(f"change:{self.change_id}", [files, unit], combine)

    def _has_irqbalance(self, state: State) -> bool:
        return bool(state["service"]["load"] != "not-found")

    def desired(self, before: State) -> State:
        want: State = {"default_affinity": cpumask_of(self.housekeeping), "tmpfiles": b64(self._tmpfiles_bytes())}
        if self._has_irqbalance(before):
            if self.stop:
                want["service"] = {"file_state": "disabled", "active": "inactive"}
            else:
                want["dropin"] = b64(self._dropin_bytes())
        return want

    def in_place(self, live: State, desired: State) -> bool:
        if live["default_affinity"] is None or cpus_of_mask(live["default_affinity"]) != \
                cpus_of_mask(desired["default_affinity"]) or live["tmpfiles"] != desired["tmpfiles"]:
            return False
        if "dropin" in desired and live["dropin"] != desired["dropin"]:
            return False
        if "service" in desired:
            svc = live["service"]
            return svc["file_state"] in ("disabled", "masked") and svc["active"] == "inactive"
        return True

    def not_applicable(self, before: State) -> str | None:
        return None if before["default_affinity"] is not None else f"this unit has no {DEFAULT_AFFINITY}"

    def apply(self, t: Transport, before: State) -> None:
        t.run(list(write_values_command([(DEFAULT_AFFINITY, cpumask_of(self.housekeeping))])), timeout_s=30)
        t.write_file(TMPFILES, self._tmpfiles_bytes())
        if not self._has_irqbalance(before):
            return
        if self.stop:
            t.run(["systemctl", "disable", "--now", "--quiet", UNIT], timeout_s=90)
            return
        t.run(["mkdir", "-p", DROPIN.rsplit("/", 1)[0]], timeout_s=30)
        t.write_file(DROPIN, self._dropin_bytes())
        t.run(["systemctl", "daemon-reload"], timeout_s=60)
        if before["service"]["active"] == "active":
            t.run(["systemctl", "restart", UNIT], timeout_s=90)

    def rollback(self, t: Transport, before: State) -> None:
        if before["default_affinity"] is not None:
            t.run(list(write_values_command([(DEFAULT_AFFINITY, before["default_affinity"])])), timeout_s=30)
        restore_file(t, TMPFILES, unb64(before["tmpfiles"]))
        if not self._has_irqbalance(before):
            return
        restore_file(t, DROPIN, unb64(before["dropin"]))
        if before["dropin"] is None:  # the directory apply made for it, when nothing else is in it
            t.run(["rmdir", "--ignore-fail-on-non-empty", "--", DROPIN.rsplit("/", 1)[0]], timeout_s=30, check=False)
        t.run(["systemctl", "daemon-reload"], timeout_s=60)
        svc = before["service"]
        if self.stop and svc["file_state"] == "enabled":
            t.run(["systemctl", "enable", "--quiet", UNIT], timeout_s=30)
        if svc["active"] == "active":
            t.run(["systemctl", "restart", UNIT], timeout_s=90)

    switch_keeps_persistence = True

    def switch_command(self, before: State, on: bool) -> tuple[str, ...] | None:
        """Between measurement runs, where irqbalance is not running (or absent): the default mask is all that
        acts at run time (the drop-in acts when irqbalance starts, the tmpfiles entry at boot), so one write,
        and no `daemon-reload` (3 s on a TCG guest) per switch. A running irqbalance, or `stop`, switches by
        the whole apply or rollback: the daemon must restart with or without its ban."""
        if self.stop or before["service"]["active"] == "active" or before["default_affinity"] is None:
            return None
        mask = cpumask_of(self.housekeeping) if on else before["default_affinity"]
        return tuple(write_values_command([(DEFAULT_AFFINITY, mask)]))

    def verify_rolled_back(self, t: Transport, before: State) -> None:
        live = self.read(t)
        if cpus_of_mask(live["default_affinity"] or "") != cpus_of_mask(before["default_affinity"] or "") or \
                live["dropin"] != before["dropin"] or live["tmpfiles"] != before["tmpfiles"] or \
                live["service"]["file_state"] != before["service"]["file_state"]:
            raise ChangeError(f"{t.label}: {self.describe()}: rollback did not restore the previous state")

    def describe(self) -> str:
        ban = "stop irqbalance" if self.stop else f"irqbalance off CPUs {format_cpulist(self.rt)}"
        return f"{ban}; new IRQs on CPUs {format_cpulist(self.housekeeping)}"
