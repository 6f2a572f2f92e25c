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
from orchestrator.facts.base import Fact
from orchestrator.remote.remote_scripts import SYSREG_TRACEPOINT_SCRIPT


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


# --------------------------------------------------------------------------------------------------------
# System-register traps (the host's hist trigger on kvm:kvm_sys_access, measure_run.sh's `sysreg` section)

#: GIC CPU-interface registers (Op0 3, Op1 0, CRn 12) by (CRm, Op2), as arch/arm64/include/asm/sysreg.h names
#: them: a guest sends an IPI by writing ICC_SGI1R_EL1, and that write traps to the host (field notes section 1)
GIC_SYSREGS: dict[tuple[int, int], str] = {
    (8, 0): "ICC_IAR0_EL1", (8, 1): "ICC_EOIR0_EL1", (8, 2): "ICC_HPPIR0_EL1", (8, 3): "ICC_BPR0_EL1",
    (11, 1): "ICC_DIR_EL1", (11, 3): "ICC_RPR_EL1", (11, 5): "ICC_SGI1R_EL1", (11, 6): "ICC_ASGI1R_EL1",
    (11, 7): "ICC_SGI0R_EL1", (12, 0): "ICC_IAR1_EL1", (12, 1): "ICC_EOIR1_EL1", (12, 2): "ICC_HPPIR1_EL1",
    (12, 3): "ICC_BPR1_EL1", (12, 4): "ICC_CTLR_EL1", (12, 5): "ICC_SRE_EL1", (12, 6): "ICC_IGRPEN0_EL1",
    (12, 7): "ICC_IGRPEN1_EL1",
}
#: the registers a guest sends its IPIs with (zero-filled per vCPU thread: a hist lists only what was hit)
SGI_SYSREGS = ("ICC_SGI1R_EL1", "ICC_ASGI1R_EL1", "ICC_SGI0R_EL1")


def sysreg_name(op0: int, op1: int, crn: int, crm: int, op2: int) -> str:
    """The register's name (GIC CPU interface) or its generic assembler name `S3_0_C12_C11_5`."""
    if (op0, op1, crn) == (3, 0, 12) and (crm, op2) in GIC_SYSREGS:
        return GIC_SYSREGS[(crm, op2)]
    return f"S{op0}_{op1}_C{crn}_C{crm}_{op2}"


class HistEntry(BaseModel):
    keys: dict[str, int]  # key field -> value as the hist prints it (`common_pid`, `CRn`, `CRm`, `Op2`)
    hitcount: int


class Hist(BaseModel):
    """A tracefs hist file: its trigger, one entry per key tuple that was hit, and its totals."""

    trigger: str
    entries: list[HistEntry]
    hits: int
    dropped: int


_HIST_ENTRY = re.compile(r"\{(?P<keys>[^}]*)\}\s+hitcount:\s+(?P<n>\d+)")
_HIST_KEY = re.compile(r"\s*(?P<k>\w+):\s+(?P<v>-?\d+)\s*")


def parse_hist(text: str) -> Hist:
    """The text of a tracefs `hist` file whose keys are numbers (`{ common_pid: 303, CRm: 11, Op2: 5 }
    hitcount: 90`), with its `# trigger info:` line and its `Totals:` (Hits, Entries, Dropped). ParseError on any
    other line, on a key printed other than as a plain number (`.execname`, `.sym` modifiers are not used here),
    and on totals that do not add up."""
    trigger = ""
    entries: list[HistEntry] = []
    totals: dict[str, int] = {}
    for line in text.split("\n"):
        s = line.strip()
        if not s or s == "Totals:":
            continue
        if s.startswith("#"):
            if s.startswith("# trigger info:"):
                trigger = s.removeprefix("# trigger info:").strip()
            continue
        m = _HIST_ENTRY.fullmatch(s)
        if m:
            keys: dict[str, int] = {}
            for part in m.group("keys").split(","):
                k = _HIST_KEY.fullmatch(part)
                if k is None:
                    raise ParseError(f"a hist key that is not `NAME: NUMBER`: {part.strip()[:80]!r} in {s[:160]!r}")
                keys[k.group("k")] = int(k.group("v"))
            entries.append(HistEntry(keys=keys, hitcount=int(m.group("n"))))
            continue
        t = re.fullmatch(r"(Hits|Entries|Dropped):\s+(\d+)", s)
        if t:
            totals[t.group(1)] = int(t.group(2))
            continue
        raise ParseError(f"unexpected line in a hist file: {s[:160]!r}")
    if "Hits" not in totals:
        raise ParseError("a hist file without its totals (`Hits:`): cut short?")
    if totals.get("Entries", len(entries)) != len(entries):
        raise ParseError(f"the hist lists {len(entries)} entries but its totals say {totals['Entries']}")
    if sum(e.hitcount for e in entries) != totals["Hits"]:
        raise ParseError(f"the hist's hitcounts sum to {sum(e.hitcount for e in entries)}, its totals say "
                         f"{totals['Hits']}")
    return Hist(trigger=trigger, entries=entries, hits=totals["Hits"], dropped=totals.get("Dropped", 0))


def sysreg_traps(hist: Hist) -> dict[tuple[int, str], int]:
    """(thread id, register name) -> traps, from the hist of measure_run.sh's trigger (keys common_pid, CRm,
    Op2; Op0 3, Op1 0 and CRn 12 in its filter). A key the trigger does not have is a ParseError."""
    out: dict[tuple[int, str], int] = {}
    for e in hist.entries:
        try:
            tid, crm, op2 = e.keys["common_pid"], e.keys["CRm"], e.keys["Op2"]
        except KeyError as exc:
            raise ParseError(f"a sysreg hist entry without {exc.args[0]}: {e.keys}") from None
        name = sysreg_name(3, 0, e.keys.get("CRn", 12), crm, op2)
        out[(tid, name)] = out.get((tid, name), 0) + e.hitcount
    return out


def parse_sysreg_tracepoint(text: str) -> str | None:
    """None when the host can count system-register traps (tracefs with instances and `kvm:kvm_sys_access`),
    else why not."""
    word = text.strip()
    if word == "yes":
        return None
    if word == "no":
        return "the host's kernel has no kvm:kvm_sys_access tracepoint (not an arm64 KVM host)"
    if word == "no-tracefs":
        return "the host has no tracefs with instances (or it is not readable)"
    raise ParseError(f"expected yes, no or no-tracefs, got {text.strip()[:80]!r}")


#: Whether the host can count its guests' system-register traps (measure_run.sh's `sysreg` step)
SYSREG_TRACEPOINT = Fact("sysreg_tracepoint", ("sh", "-c", SYSREG_TRACEPOINT_SCRIPT), parse_sysreg_tracepoint)
