"""Device IRQs on the housekeeping CPUs, now and at every boot."""

from __future__ import annotations

from dataclasses import dataclass, field

from orchestrator.changes.base import Change, ChangeError, State, b64, restore_file, unb64
from orchestrator.core.cpulist import parse_kernel_cpulist as parse_cpu_list
from orchestrator.core.errors import InputError
from orchestrator.facts.irqs import IRQ_AFFINITY
from orchestrator.facts.systemd import symlink_fact
from orchestrator.remote.transport import Transport, read_optional

IRQ_UNIT = "/etc/systemd/system/rt-tune-irq-affinity.service"


IRQ_UNIT_LINK = "/etc/systemd/system/multi-user.target.wants/rt-tune-irq-affinity.service"


@dataclass
class IrqAffinityChange(Change):
    """Move every movable device IRQ to the housekeeping CPUs (smp_affinity_list), now and at every boot (a
    oneshot unit of rt-tune's: /proc/irq settings do not survive the reboots of trial boots); rollback restores
    each IRQ and removes the unit."""

    housekeeping: list[int]
    kind: str = field(default="irq_affinity", init=False)

    def __post_init__(self) -> None:
        if not self.housekeeping:
            raise InputError("IRQ affinity needs at least one housekeeping CPU")
        self.change_id = "irq_affinity"

    def _want(self) -> str:
        return ",".join(str(c) for c in self.housekeeping)

    def _unit_bytes(self) -> bytes:
        return (
            "# rt-tune: irq_affinity change (removed when rt-tune rolls it back)\n"
            "[Unit]\nDescription=rt-tune: device IRQs to housekeeping CPUs " + self._want() + "\n"
            # after udev has probed every device present at boot: a driver that coldplug loads (virtio_net, a
            # NIC's) allocates its IRQs then, and an IRQ allocated after this unit ran would keep all CPUs
            "DefaultDependencies=no\nWants=systemd-udev-settle.service\n"
            "After=systemd-udev-settle.service local-fs.target\n\n"
            "[Service]\nType=oneshot\nRemainAfterExit=yes\n"
            "ExecStart=/bin/sh -c 'for f in /proc/irq/[0-9]*/smp_affinity_list; do "
            f"echo {self._want()} > \"$$f\" 2>/dev/null || true; done'\n\n"
            "[Install]\nWantedBy=multi-user.target\n"
        ).encode()

    def read(self, t: Transport) -> State:
        """Each IRQ's affinity and which ones the kernel refuses to move (facts.irqs.IRQ_AFFINITY), and
        rt-tune's boot-time unit."""
        irqs = IRQ_AFFINITY.gather(t, timeout_s=60)
        link = symlink_fact(IRQ_UNIT_LINK).gather(t)
        return {"irqs": irqs.irqs, "fixed": irqs.fixed, "unit": b64(read_optional(t, IRQ_UNIT)),
                "enabled": link is not None}

    def desired(self, before: State) -> State:
        want = self._want()
        return {"irqs": {irq: want for irq in before["irqs"] if irq not in before["fixed"]},
                "unit": b64(self._unit_bytes()), "enabled": True}

    def in_place(self, live: State, desired: State) -> bool:
        """Every IRQ that exists and can move now is on the housekeeping CPUs. (After a reboot an IRQ may have
        become one the kernel manages, e.g. with isolcpus=managed_irq: that is the kernel's call, not drift.)"""
        fixed = set(live.get("fixed", []))
        irqs_ok = all(irq not in live["irqs"] or irq in fixed
                      or parse_cpu_list(live["irqs"][irq]) == parse_cpu_list(v)
                      for irq, v in desired["irqs"].items())
        persist_ok = "unit" not in desired or (live.get("unit") == desired["unit"]
                                               and live.get("enabled") == desired["enabled"])
        return irqs_ok and persist_ok

    def _move_irqs(self, t: Transport, before: State) -> None:
        movable = [irq for irq in before["irqs"] if irq not in before["fixed"]]
        script = 'want=$1; shift; for irq in "$@"; do echo "$want" > /proc/irq/"$irq"/smp_affinity_list; done'
        t.run(["sh", "-c", script, "-", self._want(), *movable], timeout_s=60)

    def apply(self, t: Transport, before: State) -> None:
        self._move_irqs(t, before)
        t.write_file(IRQ_UNIT, self._unit_bytes())
        t.run(["systemctl", "daemon-reload"], timeout_s=60)
        t.run(["systemctl", "enable", "rt-tune-irq-affinity.service"], timeout_s=60)

    def rollback(self, t: Transport, before: State) -> None:
        if not before.get("enabled"):
            t.run(["systemctl", "disable", "rt-tune-irq-affinity.service"], timeout_s=60, check=False)
        restore_file(t, IRQ_UNIT, unb64(before.get("unit")))
        t.run(["systemctl", "daemon-reload"], timeout_s=60)
        self._restore_irqs(t, before)

    switch_keeps_persistence = True

    def switch(self, t: Transport, before: State, on: bool) -> None:
        """The IRQs' affinity only: the boot-time unit stays from the first apply to the decision (installing
        and removing it costs two systemd reloads each way) and acts only at boot."""
        if on:
            self._move_irqs(t, before)
        else:
            self._restore_irqs(t, before)

    def _restore_irqs(self, t: Transport, before: State) -> None:
        pairs = [f"{irq}={cpus}" for irq, cpus in sorted(before["irqs"].items())]
        script = ('for p in "$@"; do irq=${p%%=*}; cpus=${p#*=}; '
                  'echo "$cpus" > /proc/irq/"$irq"/smp_affinity_list 2>/dev/null || true; done')
        t.run(["sh", "-c", script, "-", *pairs], timeout_s=60)

    def verify_rolled_back(self, t: Transport, before: State) -> None:
        state = self.read(t)
        live, fixed = state["irqs"], set(state["fixed"])
        wrong = [i for i, v in before["irqs"].items()
                 if i in live and i not in fixed and parse_cpu_list(live[i]) != parse_cpu_list(v)]
        if wrong:
            raise ChangeError(f"{t.label}: IRQs {', '.join(wrong)} did not return to their previous affinity")
        if state["unit"] != before.get("unit") or state["enabled"] != bool(before.get("enabled")):
            raise ChangeError(f"{t.label}: {IRQ_UNIT} is not back to its previous state")

    def describe(self) -> str:
        return f"IRQ affinity -> housekeeping CPUs {','.join(map(str, self.housekeeping))}"
