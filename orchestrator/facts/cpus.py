"""CPU sets: online, possible and present CPUs, isolated and nohz_full CPUs."""

from __future__ import annotations

from collections.abc import Callable

from orchestrator.core.cpulist import (
    parse_kernel_cpulist as parse_cpu_list,  # for kernel output
)
from orchestrator.core.errors import ParseError
from orchestrator.facts.base import Fact, one_line


def _parse_cpu_count(text: str) -> int:
    cpus = parse_cpu_list(one_line("/sys/devices/system/cpu/online", text))
    if not cpus:
        raise ParseError(f"expected at least one online CPU, got {text[:200]!r}")
    return len(cpus)


def _cpu_list_file(what: str) -> Callable[[str], list[int]]:
    def parse(text: str) -> list[int]:
        return parse_cpu_list(one_line(what, text))

    return parse


#: Number of online CPUs (len of /sys/devices/system/cpu/online).
CPU_COUNT = Fact("cpu_count", ("cat", "/sys/devices/system/cpu/online"), _parse_cpu_count)
CPUS_POSSIBLE = Fact(
    "cpus_possible", ("cat", "/sys/devices/system/cpu/possible"), _cpu_list_file("possible CPUs")
)
CPUS_PRESENT = Fact(
    "cpus_present", ("cat", "/sys/devices/system/cpu/present"), _cpu_list_file("present CPUs")
)




ISOLATED_CPUS = Fact(
    "isolated_cpus", ("cat", "/sys/devices/system/cpu/isolated"), _cpu_list_file("isolated CPUs")
)

_NOHZ_FULL = "/sys/devices/system/cpu/nohz_full"
_ABSENT = "(absent)"


def parse_nohz_full(text: str) -> list[int]:
    """nohz_full CPUs; the file is absent without CONFIG_NO_HZ_FULL (the script then prints '(absent)')
    and reads '(null)' when nohz_full= was not given: both mean none."""
    line = one_line(_NOHZ_FULL, text)
    if line == _ABSENT:
        return []
    return parse_cpu_list(line)


NOHZ_FULL_CPUS = Fact(
    "nohz_full_cpus",
    ("sh", "-c", f'if [ -e {_NOHZ_FULL} ]; then cat {_NOHZ_FULL}; else echo "{_ABSENT}"; fi'),
    parse_nohz_full,
)
