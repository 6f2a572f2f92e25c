"""CPU lists in the kernel's grammar, bounded before they are expanded: the one CPU-list parser of rt-tune.

The grammar is lib/bitmap-str.c bitmap_parselist's: comma-separated groups `N`, `N-M` (N <= M) and
`N-M:A/B` (in N..M, the first A CPUs of every group of B, e.g. 0-7:1/2 = 0,2,4,6), decimal numbers of ASCII
digits. rt-tune takes a strict subset of what the kernel takes, on purpose: no whitespace (a kernel command
line splits on it), no empty groups (",1"), no `all` and no `N` for the last CPU (rt-tune must know the CPU
numbers to check overlaps); and nothing Python's int() would add (`+1`, `1_0`, `١`, " 1 "). "" is the empty
list: callers that need CPUs say so.

Every number is checked against `max_cpu` (the unit's highest CPU when known, else CPU_CEILING) before any
range is expanded, and the expansion works on a bitmap of max_cpu + 1 entries, so "0-99999999999" or a
megabyte of groups costs no memory and little time.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from orchestrator.core.errors import InputError, ParseError

#: Highest CPU number rt-tune accepts when the unit's CPU count is unknown: Linux's NR_CPUS is at most 8192.
CPU_CEILING = 8191
#: Longer texts are refused unread: 8192 CPUs as "0,2,4,..." take about 20,000 characters.
MAX_TEXT = 65536

_GROUP = re.compile(r"([0-9]+)(?:-([0-9]+)(?::([0-9]+)/([0-9]+))?)?", re.ASCII)
_DIGITS_SHOWN = 12
_MAX_DIGITS = 30


class CpuListError(InputError, ValueError):
    """Not a CPU list rt-tune accepts: an InputError (exit 2) for the CLI, a ValueError for pydantic
    validators. `cpu` is the out-of-range CPU number when that is the problem (None otherwise, or when it is
    too long to be worth converting)."""

    def __init__(self, message: str, *, cpu: int | None = None):
        super().__init__(message)
        self.cpu = cpu


def _show(text: str) -> str:
    return repr(text) if len(text) <= 80 else repr(text[:77]) + "..."


def _number(digits: str, limit: int, text: str, what: str, *, cpu: bool) -> int:
    """`digits` as an int no larger than `limit`; a number of more than _MAX_DIGITS digits is refused
    unconverted (int() of 5000 digits is slow, and refused by Python itself)."""
    significant = digits.lstrip("0") or "0"
    if len(significant) > _MAX_DIGITS:
        shown = significant[:_DIGITS_SHOWN] + "..."
        raise CpuListError(f"not a usable CPU list {_show(text)}: {what} {shown} ({len(significant)} digits) "
                           f"is above {limit}")
    n = int(significant)
    if n > limit:
        if cpu:
            raise CpuListError(f"not a usable CPU list {_show(text)}: CPU {n} is above the highest CPU "
                               f"number {limit}", cpu=n)
        raise CpuListError(f"not a usable CPU list {_show(text)}: {what} {n} is above {limit}")
    return n


def parse_cpulist(text: str, *, max_cpu: int = CPU_CEILING) -> list[int]:
    """`text` in the kernel's CPU list grammar (see the module docstring) -> sorted CPU numbers, each at most
    `max_cpu`. Raises CpuListError naming the text and what is wrong."""
    if not isinstance(text, str):
        raise CpuListError(f"a CPU list must be a string such as \"1-3,5\", not {type(text).__name__}")
    if max_cpu < 0:
        raise ValueError(f"max_cpu must be at least 0, got {max_cpu}")
    max_cpu = min(max_cpu, CPU_CEILING)
    if len(text) > MAX_TEXT:
        raise CpuListError(f"a CPU list of {len(text)} characters is longer than {MAX_TEXT}")
    if text == "":
        return []
    bitmap = bytearray(max_cpu + 1)
    for i, group in enumerate(text.split(",")):
        m = _GROUP.fullmatch(group)
        if m is None:
            what = "an empty group" if group == "" else f"group {_show(group)}"
            raise CpuListError(f"not a kernel CPU list {_show(text)}: {what} (group {i + 1}) is not N, N-M "
                               "or N-M:A/B of ASCII digits, e.g. \"1-3,5\"")
        start = _number(m.group(1), max_cpu, text, "CPU", cpu=True)
        end = start if m.group(2) is None else _number(m.group(2), max_cpu, text, "CPU", cpu=True)
        if end < start:
            raise CpuListError(f"not a kernel CPU list {_show(text)}: range {start}-{end} goes backwards")
        if m.group(3) is None:
            bitmap[start:end + 1] = b"\x01" * (end + 1 - start)
            continue
        used = _number(m.group(3), max_cpu + 1, text, "used size", cpu=False)
        size = _number(m.group(4), max_cpu + 1, text, "group size", cpu=False)
        if size == 0 or used > size:
            raise CpuListError(f"not a kernel CPU list {_show(text)}: in {group}, A/B needs 0 <= A <= B and "
                               "B >= 1 (the first A CPUs of every B)")
        # whichever loop is shorter: at most sqrt(max_cpu + 1) slice assignments per group
        if used <= (end - start) // size + 1:
            for offset in range(used):
                first = start + offset
                if first <= end:
                    bitmap[first:end + 1:size] = b"\x01" * len(range(first, end + 1, size))
        else:
            for block in range(start, end + 1, size):
                stop = min(block + used, end + 1)
                bitmap[block:stop] = b"\x01" * (stop - block)
    return [cpu for cpu, on in enumerate(bitmap) if on]


def parse_kernel_cpulist(text: str, *, max_cpu: int = CPU_CEILING) -> list[int]:
    """A CPU list as the kernel prints it (sysfs, /proc/*/status, trace fields): surrounding blanks and the
    final newline are dropped, "(null)" (an unset nohz_full) is no CPUs. What does not parse is a ParseError:
    the unit's output, not the user's input, is wrong."""
    stripped = text.strip(" \t\n")
    if stripped == "(null)":
        return []
    try:
        return parse_cpulist(stripped, max_cpu=max_cpu)
    except CpuListError as exc:
        raise ParseError(str(exc)) from None


def format_cpulist(cpus: Iterable[int]) -> str:
    """Sorted CPU numbers as the kernel prints them: [0, 1, 2, 5] -> "0-2,5"."""
    out: list[str] = []
    run: list[int] = []
    for c in sorted(set(cpus)):
        if run and c == run[-1] + 1:
            run.append(c)
            continue
        if run:
            out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
        run = [c]
    if run:
        out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
    return ",".join(out)


def cpumask_of(cpus: Sequence[int]) -> str:
    """The kernel's hex cpumask of `cpus`: 32-bit groups, most significant first, comma-separated ("3",
    "1,00000000")."""
    bits = 0
    for c in cpus:
        bits |= 1 << c
    text = format(bits, "x")
    groups: list[str] = []
    while text:
        groups.insert(0, text[-8:])
        text = text[:-8]
    return ",".join([groups[0]] + [g.rjust(8, "0") for g in groups[1:]]) if groups else "0"


def cpus_of_mask(text: str) -> list[int] | None:
    """The CPUs of a hex cpumask as the kernel prints it; None when it is not one."""
    raw = text.strip().replace(",", "")
    if not raw or not re.fullmatch(r"[0-9a-fA-F]+", raw):
        return None
    bits = int(raw, 16)
    return [i for i in range(bits.bit_length()) if bits >> i & 1]
