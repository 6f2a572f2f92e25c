"""Interrupts: /proc/interrupts per CPU with each IRQ's affinity; IPI counts."""

from __future__ import annotations

import re

from pydantic import BaseModel

from orchestrator.core.cpulist import (
    parse_kernel_cpulist as parse_cpu_list,  # for kernel output
)
from orchestrator.core.errors import ParseError
from orchestrator.facts.base import Fact


class Irq(BaseModel):
    """One row of /proc/interrupts; numeric IRQs also carry their /proc/irq/N affinities."""

    #: "24", or a name such as LOC, RES, CAL, IPI0.
    irq: str
    #: CPU numbers of the count columns (from the header; offline CPUs have no column).
    cpus: list[int]
    #: The counts as printed; one per CPU when `per_cpu`, else (ERR, MIS) a single total.
    per_cpu_counts: list[int]
    per_cpu: bool
    #: Numeric IRQs: the irq chip ("IO-APIC", "PCI-MSI", "GICv3").
    chip: str | None = None
    #: Numeric IRQs: the hardware IRQ number in the chip's domain.
    hwirq: str | None = None
    #: Numeric IRQs: the flow handler / trigger ("edge", "fasteoi", "Level").
    trigger: str | None = None
    #: Numeric IRQs: the devices/handlers registered on it.
    actions: list[str] = []
    #: Named rows: the description ("Local timer interrupts", "Rescheduling interrupts").
    description: str | None = None
    smp_affinity_list: list[int] | None = None
    effective_affinity_list: list[int] | None = None

    @property
    def total(self) -> int:
        return sum(self.per_cpu_counts)


IRQS_SCRIPT = (
    "cat /proc/interrupts || exit\n"
    "echo '@@ affinity'\n"
    "for d in /proc/irq/[0-9]*; do\n"
    '  s=$(cat "$d/smp_affinity_list" 2>/dev/null) || s=-\n'
    '  e=$(cat "$d/effective_affinity_list" 2>/dev/null) || e=-\n'
    '  printf \'irq %s smp=%s eff=%s\\n\' "${d##*/}" "$s" "$e"\n'
    "done\n"
    "echo end\n"
)

_IRQ_ROW = re.compile(r"\s*([0-9A-Za-z_]+):(.*)")
_NUMERIC_REST = re.compile(
    r"\s+(?P<chip>\S+)"
    r"(?:\s+(?P<hwirq>\d+)?-(?P<handler>\S+)|\s+(?P<hwirq2>\d+)(?=\s|$))?"
    r"(?:\s+(?P<level>Level|Edge)(?:-(?P<handler2>\S+))?)?"
    r"(?:\s+(?P<actions>\S.*?))?\s*"
)
#: /proc/interrupts rows that count IPIs: x86 RES/CAL/TLB/IWI, arm64 IPI0..IPIn (IPI0 reschedule,
#: IPI1 function call, IPI5 IRQ work, per the field notes).
_X86_IPI_ROWS = ("RES", "CAL", "TLB", "IWI")


def _parse_interrupts_table(lines: list[str]) -> list[Irq]:
    if not lines:
        raise ParseError("expected the /proc/interrupts header line (CPU0 CPU1 ...), got nothing")
    header = lines[0].split()
    if not header or not all(re.fullmatch(r"CPU\d+", h) for h in header):
        raise ParseError(f"expected the /proc/interrupts header of CPUn columns, got {lines[0][:200]!r}")
    cpus = [int(h[3:]) for h in header]
    n = len(cpus)
    irqs: list[Irq] = []
    for line in lines[1:]:
        if not line.strip():
            continue
        m = _IRQ_ROW.fullmatch(line)
        if not m:
            raise ParseError(f"expected `IRQ: counts...` in /proc/interrupts, got {line[:200]!r}")
        label, rest = m.group(1), m.group(2)
        tokens = rest.split()
        counts: list[int] = []
        pos = 0
        for tok in tokens[:n]:
            if not tok.isdigit():
                break
            counts.append(int(tok))
            pos = rest.index(tok, pos) + len(tok)
        remainder = rest[pos:]
        if not counts:
            raise ParseError(f"expected counts after {label}: in /proc/interrupts, got {line[:200]!r}")
        if label.isdigit():
            if len(counts) != n:
                raise ParseError(f"expected {n} per-CPU counts for IRQ {label}, got {line[:200]!r}")
            r = _NUMERIC_REST.fullmatch(remainder)
            if not r:
                raise ParseError(
                    f"expected `chip hwirq-handler actions` after the counts of IRQ {label}, "
                    f"got {line[:200]!r}"
                )
            actions = r.group("actions")
            irqs.append(
                Irq(
                    irq=label,
                    cpus=cpus,
                    per_cpu_counts=counts,
                    per_cpu=True,
                    chip=r.group("chip"),
                    hwirq=r.group("hwirq") or r.group("hwirq2"),
                    trigger=r.group("handler") or r.group("level") or None,
                    actions=[a.strip() for a in actions.split(", ")] if actions else [],
                )
            )
        else:
            if len(counts) not in (1, n):
                raise ParseError(
                    f"expected 1 or {n} counts for {label} in /proc/interrupts, got {line[:200]!r}"
                )
            description = remainder.strip() or None
            if description is not None and description.split()[0].isdigit():
                raise ParseError(f"expected {n} counts then a description for {label}, got {line[:200]!r}")
            irqs.append(
                Irq(
                    irq=label,
                    cpus=cpus,
                    per_cpu_counts=counts,
                    per_cpu=len(counts) == n and (n > 1 or description is not None),
                    description=description,
                )
            )
    return irqs


def parse_interrupts(text: str) -> list[Irq]:
    """Plain /proc/interrupts (x86 LOC/RES/CAL/TLB rows, arm64 IPI0..IPIn rows), without affinities."""
    return _parse_interrupts_table(text.rstrip("\n").split("\n"))


def parse_irqs(text: str) -> list[Irq]:
    """Output of IRQS_SCRIPT: /proc/interrupts, a `@@ affinity` line, `irq N smp=LIST eff=LIST` lines, `end`."""
    lines = text.split("\n")
    if lines[-2:] != ["end", ""]:
        raise ParseError(f"expected /proc/interrupts, affinity lines and a final `end`, got {text[-200:]!r}")
    lines = lines[:-2]
    try:
        sep = lines.index("@@ affinity")
    except ValueError:
        raise ParseError("expected a `@@ affinity` line after /proc/interrupts (truncated output?)") from None
    irqs = _parse_interrupts_table(lines[:sep])
    affinity: dict[str, tuple[list[int] | None, list[int] | None]] = {}
    for line in lines[sep + 1 :]:
        m = re.fullmatch(r"irq (\d+) smp=(\S*) eff=(\S*)", line)
        if not m:
            raise ParseError(f"expected `irq N smp=LIST eff=LIST`, got {line[:200]!r}")
        smp, eff = (None if v == "-" else parse_cpu_list(v) for v in (m.group(2), m.group(3)))
        affinity[m.group(1)] = (smp, eff)
    for irq in irqs:
        if irq.irq in affinity:
            irq.smp_affinity_list, irq.effective_affinity_list = affinity[irq.irq]
    return irqs


IRQS = Fact("irqs", ("sh", "-c", IRQS_SCRIPT), parse_irqs)


def is_ipi_row(irq: Irq) -> bool:
    return irq.irq in _X86_IPI_ROWS or re.fullmatch(r"IPI\d+", irq.irq) is not None


def ipi_counts(irqs: list[Irq]) -> dict[str, list[int]]:
    """IPI row name -> per-CPU counts (x86 RES/CAL/TLB/IWI, arm64 IPI0..IPIn), in /proc/interrupts order."""
    return {i.irq: list(i.per_cpu_counts) for i in irqs if is_ipi_row(i) and i.per_cpu}


#: Each IRQ's smp_affinity_list and whether the kernel lets it move: found by writing the current value back,
#: which changes nothing for an IRQ that can move and fails for one that cannot (per-CPU, managed, the timer).
#: That write is the only probe the kernel offers; it leaves every affinity as it was.
IRQ_AFFINITY_SCRIPT = ('for d in /proc/irq/[0-9]*; do f="$d/smp_affinity_list"; [ -r "$f" ] || continue; '
                       'cur=$(cat "$f"); if echo "$cur" > "$f" 2>/dev/null; then m=1; else m=0; fi; '
                       'printf "%s %s %s\\n" "${d##*/}" "$cur" "$m"; done; echo end')


class IrqAffinity(BaseModel):
    """IRQ number -> its smp_affinity_list, and the IRQs the kernel refuses to move."""

    irqs: dict[str, str]
    fixed: list[str]


def parse_irq_affinity(text: str) -> IrqAffinity:
    """`IRQ CPULIST MOVABLE` lines and a final `end` (a cut listing is refused, not read as fewer IRQs)."""
    lines = text.splitlines()
    if not lines or lines[-1] != "end":
        raise ParseError(f"truncated IRQ listing (no final `end`): {text[-200:]!r}")
    irqs: dict[str, str] = {}
    fixed: list[str] = []
    for line in lines[:-1]:
        parts = line.split(" ")
        if len(parts) != 3 or not parts[0].isdigit() or parts[2] not in ("0", "1"):
            raise ParseError(f"expected `IRQ CPULIST 0|1`, got {line[:200]!r}")
        parse_cpu_list(parts[1])  # a cpulist the kernel printed, or the listing is not what it claims
        irqs[parts[0]] = parts[1]
        if parts[2] != "1":
            fixed.append(parts[0])
    return IrqAffinity(irqs=irqs, fixed=sorted(fixed, key=int))


IRQ_AFFINITY = Fact("irq_affinity", ("sh", "-c", IRQ_AFFINITY_SCRIPT), parse_irq_affinity)
