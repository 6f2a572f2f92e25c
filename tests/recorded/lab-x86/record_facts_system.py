"""Record the stdout of the system facts' commands from a running lab (how the *-facts-* files were made).

    export RT_TUNE_STATE=/var/tmp/facts-lab   # a lab of its own, not the default one
    tune lab up
    python tests/recorded/lab-x86/record_facts_system.py [guest] [host]   # both when none is named
    tune lab down

Each file is the stdout of one fact's argv, run through SSHTransport exactly as `Fact.gather` runs it (same
argv, same sudo), written unchanged. Waits where the state must be reached first (the guest's service has
crashed at least once; it is between two crashes in `auto-restart`). The last step changes the host VM: it pins
vCPU thread 1 of rt-guest-vm's QEMU to CPU 1 with `taskset -pc 1 TID` and records QEMU_PROCESSES again.
Not a test (pytest does not collect it).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from orchestrator.config.inventory import load_inventory
from orchestrator.core.paths import Paths
from orchestrator.facts.base import Fact
from orchestrator.facts.bootloader import BOOTLOADER
from orchestrator.facts.cpus import CPUS_POSSIBLE, ISOLATED_CPUS, NOHZ_FULL_CPUS
from orchestrator.facts.irqs import IRQS
from orchestrator.facts.qemu import QEMU_PROCESSES
from orchestrator.facts.sysctl import SYSCTL_FILES, sysctl_fact
from orchestrator.facts.systemd import COREDUMPS, coredumps_fact, unit_state_fact
from orchestrator.remote.ssh import SSHTransport

HERE = Path(__file__).resolve().parent
MIROBOT = "mirobot_teleoperate.service"

COMMON = {
    "sysctl-kernel.timer_migration": sysctl_fact("kernel.timer_migration"),
    "sysctl-files": SYSCTL_FILES,
    "isolated": ISOLATED_CPUS,
    "nohz_full": NOHZ_FULL_CPUS,
    "cpus-possible": CPUS_POSSIBLE,
    "unit-nonexistent": unit_state_fact("rt-tune-no-such-unit.service"),
    "coredumps-3600s": COREDUMPS,
    "qemu-processes": QEMU_PROCESSES,
    "bootloader": BOOTLOADER,
    "irqs": IRQS,
}
PER_VM = {
    "host": {"unit-rt-guest-vm": unit_state_fact("rt-guest-vm.service")},
    "guest": {
        "unit-mirobot_teleoperate": unit_state_fact(MIROBOT),
        "coredumps-600s-mirobot_teleoperate": coredumps_fact(600, unit=MIROBOT),
    },
}


def record(t: SSHTransport, vm: str, stem: str, fact: Fact) -> object:
    result = t.run(fact.argv, sudo=fact.sudo, timeout_s=60)
    value = fact.parse(result.stdout)  # a recording must parse
    path = HERE / f"{vm}-facts-{stem}.txt"
    path.write_text(result.stdout)
    print(f"{path.name}: {len(result.stdout)} chars", file=sys.stderr)
    return value


def wait(t: SSHTransport, fact: Fact, ok, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not ok(fact.gather(t)):
        if time.monotonic() > deadline:
            raise SystemExit(f"{t.label}: {fact.name} did not reach the wanted state in {timeout_s} s")
        time.sleep(0.5)


def main(vms: list[str]) -> int:
    inventory = load_inventory(Paths.from_env().lab_inventory)
    if "guest" in vms:
        with SSHTransport(inventory.endpoint("lab1", "guest")) as guest:
            mirobot = unit_state_fact(MIROBOT)
            wait(guest, mirobot, lambda s: (s.n_restarts or 0) >= 2 and s.sub_state == "running")
            for stem, fact in {**PER_VM["guest"], **COMMON}.items():
                record(guest, "guest", stem, fact)
            wait(guest, mirobot, lambda s: s.sub_state == "auto-restart")
            record(guest, "guest", "unit-mirobot_teleoperate-auto-restart", mirobot)
    if "host" not in vms:
        return 0
    with SSHTransport(inventory.endpoint("lab1", "host")) as host:
        wait(host, QEMU_PROCESSES, lambda ps: len(ps) == 1 and len(ps[0].vcpus) == 2)
        for stem, fact in {**PER_VM["host"], **COMMON}.items():
            record(host, "host", stem, fact)
        (qemu,) = QEMU_PROCESSES.gather(host)
        host.run(["taskset", "-pc", "1", str(qemu.vcpus[1].tid)])
        record(host, "host", "qemu-processes-vcpu1-pinned", QEMU_PROCESSES)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["guest", "host"]))
