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
from orchestrator.remote.transport import (
    COMMAND_SEP,
    FILE_RECORDS,
    GATHER_SCRIPT,
    Transport,
    parse_file_records,
)

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


def gather_facts(transport: Transport, facts: Sequence[Fact[Any]], timeout_s: float = 30.0) -> dict[str, Any]:
    """Gather facts with one command per sudo setting (one round trip), each parsed by its own parser."""
    values: dict[str, Any] = {}
    for sudo in sorted({f.sudo for f in facts}):
        group = [f for f in facts if f.sudo == sudo]
        for f in group:
            if any(COMMAND_SEP in a or not a for a in (f.name, *f.argv)) or " " in f.name:
                raise ValueError(f"fact {f.name!r} cannot be gathered in a batch (separator or empty argument)")
        marker = "@@rt-tune-fact-" + secrets.token_hex(8)
        specs = [COMMAND_SEP.join((f.name, *f.argv)) for f in group]
        out = transport.run(["sh", "-c", GATHER_SCRIPT, "-", marker, *specs], timeout_s=timeout_s,
                            sudo=sudo).stdout
        records = out.split(marker + " ")
        if records[0] != "" or len(records) != 2 * len(group) + 1:
            raise ParseError(f"{transport.label}: unexpected answer gathering {len(group)} facts: {out[:200]!r}")
        for i, f in enumerate(group):
            name, nl, text = records[2 * i + 1].partition("\n")
            rc = records[2 * i + 2]
            if name != f.name or not nl or not rc.endswith("\n") or not rc[:-1].isdigit():
                raise ParseError(f"{transport.label}: fact {f.name}: unexpected answer "
                                 f"{(name + nl + rc)[:100]!r}")
            rc = rc[:-1]
            if rc != "0":
                raise ParseError(f"{transport.label}: fact {f.name}: `{' '.join(f.argv)}` exited with status {rc}")
            try:
                values[f.name] = f.parse(text)
            except ParseError as exc:
                raise ParseError(f"{transport.label}: fact {f.name}: {exc}") from exc
    return values


BASIC_FACTS: tuple[Fact[Any], ...] = (HOSTNAME, KERNEL_RELEASE, ARCH, CPUS_ONLINE, CMDLINE, BOOT_ID)


def gather_basic(transport: Transport, target: str) -> BasicFacts:
    return basic_facts(target, gather_facts(transport, BASIC_FACTS))


def basic_facts(target: str, values: dict[str, Any]) -> BasicFacts:
    """BasicFacts from gathered values that include BASIC_FACTS (gathered alone or with others)."""
    return BasicFacts(target=target, **{f.name: values[f.name] for f in BASIC_FACTS})


def files_fact(name: str, paths: Sequence[str]) -> Fact[dict[str, bytes | None]]:
    """The exact bytes of each file (None: it does not exist), as a Fact to gather with others."""
    if not paths:
        raise ValueError(f"fact {name}: no paths")

    def parse(text: str) -> dict[str, bytes | None]:
        try:
            return parse_file_records(paths, text)
        except ValueError as exc:
            raise ParseError(str(exc)) from exc

    return Fact(name, ("sh", "-c", FILE_RECORDS, "-", *paths), parse)


def one_line(what: str, text: str) -> str:
    """The single line of `text` (possibly empty), which must end with exactly one newline."""
    if not text.endswith("\n") or text.count("\n") != 1:
        raise ParseError(f"expected exactly one newline-terminated line of {what}, got {text[:200]!r}")
    return text[:-1]


def program_fact(name: str) -> Fact[bool]:
    """Whether the unit has the program `name` on its PATH."""
    return Fact(f"program:{name}", ("sh", "-c", 'command -v "$1" || true', "-", name),
                lambda text: text.strip() != "")
