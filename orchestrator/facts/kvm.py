"""KVM per-VM debugfs counters (/sys/kernel/debug/kvm/<pid>-<fd>/: `exits`, `wfi_exit_stat`, `wfe_exit_stat`,
`halt_wakeup`, ...), read on a host. Moved here from diagnose/kstate.py: `tune diagnose` reads them over its
window and measure/ around every cyclictest run.

The text both read is written by their remote scripts (diagnose_window.sh, measure_run.sh): per VM a line
`vm <pid>-<fd> COMM NAME` (COMM from /proc/<pid>/comm, NAME QEMU's `-name` argument or "-"), then one
`<counter> <value>` line per counter file (the diagnosis reads four named files; a measurement run every file of
the VM's directory whose content is a whole number, so the names are the kernel's own)."""

from __future__ import annotations

import re

from pydantic import BaseModel

from orchestrator.core.errors import ParseError


class VmCounters(BaseModel):
    vm: str  # the debugfs directory "<pid>-<fd>"
    pid: int
    comm: str
    name: str  # QEMU's -name (e.g. "rtguest,debug-threads=on" -> "rtguest"), or "-"
    counters: dict[str, int]


def parse_kvm_vms(text: str) -> dict[str, VmCounters]:
    """A `kvm` section: `vm <pid>-<fd> COMM NAME` then `<counter> <value>` lines, per VM (keyed by `<pid>-<fd>`).
    Counter names are the debugfs file names (lower case, digits and `_`: `pages_4k` on x86)."""
    vms: dict[str, VmCounters] = {}
    cur: VmCounters | None = None
    for line in text.split("\n"):
        if not line.strip():
            continue
        m = re.fullmatch(r"vm (\d+)-(\d+) (.*?) (\S+)", line)
        if m:
            name = m.group(4)
            if name != "-":  # "rtguest,debug-threads=on" or "guest=rtguest,...": the guest's name
                fields: dict[str, str] = {}
                for part in name.split(","):
                    key, eq, value = part.partition("=")
                    fields.update({key: value} if eq else {"guest": part})
                name = fields.get("guest", name)
            cur = VmCounters(vm=f"{m.group(1)}-{m.group(2)}", pid=int(m.group(1)), comm=m.group(3), name=name,
                             counters={})
            vms[cur.vm] = cur
            continue
        c = re.fullmatch(r"([a-z][a-z0-9_]*) (\d+)", line)
        if c and cur is not None:
            cur.counters[c.group(1)] = int(c.group(2))
            continue
        raise ParseError(f"unexpected line in the KVM counters section: {line[:120]!r}")
    return vms
