"""The facts every probe stands on: `Fact` (a command and a pure parser), gathering several in one round trip,
and the unit's basic facts (kernel, arch, CPUs, cmdline, boot id, hostname)."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from orchestrator.core.cpulist import (
    parse_kernel_cpulist as parse_cpu_list,  # for kernel output
)
from orchestrator.core.errors import ParseError
from orchestrator.remote.transport import Transport

T = TypeVar("T")


@dataclass(frozen=True)
class Fact(Generic[T]):
    name: str
    argv: tuple[str, ...]
    parse: Callable[[str], T]
    sudo: bool = False

    def gather(self, transport: Transport, timeout_s: float = 30.0) -> T:
        result = transport.run(self.argv, timeout_s=timeout_s, sudo=self.sudo)
        try:
            return self.parse(result.stdout)
        except ParseError as exc:
            raise ParseError(f"{transport.label}: fact {self.name}: {exc}") from exc


def _single_line(what: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        lines = [line for line in text.splitlines() if line.strip()]
        if len(lines) != 1:
            raise ParseError(f"expected one line of {what}, got {len(lines)}: {text[:200]!r}")
        return lines[0].strip()

    return parse


def parse_boot_id(text: str) -> str:
    value = _single_line("boot_id")(text)
    if len(value) != 36 or value.count("-") != 4:
        raise ParseError(f"not a boot_id: {value!r}")
    return value


KERNEL_RELEASE = Fact("kernel_release", ("uname", "-r"), _single_line("kernel release"))
ARCH = Fact("arch", ("uname", "-m"), _single_line("machine architecture"))
CPUS_ONLINE = Fact("cpus_online", ("cat", "/sys/devices/system/cpu/online"), parse_cpu_list)
CMDLINE = Fact("cmdline", ("cat", "/proc/cmdline"), _single_line("/proc/cmdline"))
BOOT_ID = Fact("boot_id", ("cat", "/proc/sys/kernel/random/boot_id"), parse_boot_id)
HOSTNAME = Fact("hostname", ("hostname",), _single_line("hostname"))


class BasicFacts(BaseModel):
    """What `tune apply` shows first for each machine: enough to know which kernel and boot you are looking at."""

    target: str
    hostname: str
    kernel_release: str
    arch: str
    cpus_online: list[int]
    cmdline: str
    boot_id: str


# Several facts in one round trip. Each fact's argv travels as one argument joined by the unit separator
# (\x1f); the script splits it with IFS (globbing off), so nothing is re-quoted here: the transport quotes the
# arguments, as for every command. Each fact's record starts with a random marker line (name and exit status);
# its exact stdout follows, up to the next marker. One fork per fact (its command substitution), no pipes: on a
# small unit every fork in a round trip counts.
_SEP = "\x1f"
_GATHER = ('set -f; m=$1; shift; IFS=$(printf "\\037"); for spec in "$@"; do name=${spec%%"$IFS"*}; '
           'cmd=${spec#*"$IFS"}; o=$($cmd 2>/dev/null; rc=$?; echo x; exit $rc); rc=$?; '
           'printf "%s %s %s\\n%s" "$m" "$name" "$rc" "${o%x}"; done')


def gather_facts(transport: Transport, facts: Sequence[Fact[Any]], timeout_s: float = 30.0) -> dict[str, Any]:
    """Gather facts with one command per sudo setting (one round trip), each parsed by its own parser."""
    values: dict[str, Any] = {}
    for sudo in sorted({f.sudo for f in facts}):
        group = [f for f in facts if f.sudo == sudo]
        for f in group:
            if any(_SEP in a or not a for a in (f.name, *f.argv)) or " " in f.name:
                raise ValueError(f"fact {f.name!r} cannot be gathered in a batch (separator or empty argument)")
        marker = "@@rt-tune-fact-" + secrets.token_hex(8)
        specs = [_SEP.join((f.name, *f.argv)) for f in group]
        out = transport.run(["sh", "-c", _GATHER, "-", marker, *specs], timeout_s=timeout_s, sudo=sudo).stdout
        records = out.split(marker + " ")
        if records[0] != "" or len(records) != len(group) + 1:
            raise ParseError(f"{transport.label}: unexpected answer gathering {len(group)} facts: {out[:200]!r}")
        for f, record in zip(group, records[1:], strict=False):
            head, _, text = record.partition("\n")
            name, _, rc = head.partition(" ")
            if name != f.name or not rc.isdigit():
                raise ParseError(f"{transport.label}: fact {f.name}: unexpected answer {head[:100]!r}")
            if rc != "0":
                raise ParseError(f"{transport.label}: fact {f.name}: `{' '.join(f.argv)}` exited with status {rc}")
            try:
                values[f.name] = f.parse(text)
            except ParseError as exc:
                raise ParseError(f"{transport.label}: fact {f.name}: {exc}") from exc
    return values


def gather_basic(transport: Transport, target: str) -> BasicFacts:
    facts = gather_facts(transport, (HOSTNAME, KERNEL_RELEASE, ARCH, CPUS_ONLINE, CMDLINE, BOOT_ID))
    return BasicFacts(target=target, **facts)


def one_line(what: str, text: str) -> str:
    """The single line of `text` (possibly empty), which must end with exactly one newline."""
    if not text.endswith("\n") or text.count("\n") != 1:
        raise ParseError(f"expected exactly one newline-terminated line of {what}, got {text[:200]!r}")
    return text[:-1]


def program_fact(name: str) -> Fact[bool]:
    """Whether the unit has the program `name` on its PATH."""
    return Fact(f"program:{name}", ("sh", "-c", 'command -v "$1" || true', "-", name),
                lambda text: text.strip() != "")
