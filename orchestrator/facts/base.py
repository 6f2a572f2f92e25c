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
    #: a compound fact (`compound_fact`): read by these facts, in the same round trip as whatever it is
    #: gathered with, then `combine`d from {part name: value}; its own argv and parse are unused
    parts: tuple[Fact[Any], ...] = ()
    combine: Callable[[dict[str, Any]], T] | None = None

    def gather(self, transport: Transport, timeout_s: float = 30.0) -> T:
        if self.parts:
            value: T = gather_facts(transport, [self], timeout_s)[self.name]
            return value
        result = transport.run(self.argv, timeout_s=timeout_s, sudo=self.sudo)
        try:
            return self.parse(result.stdout)
        except ParseError as exc:
            raise ParseError(f"{transport.label}: fact {self.name}: {exc}") from exc


def _no_text(text: str) -> Any:
    raise ParseError("a compound fact has no command of its own")


def compound_fact(name: str, parts: Sequence[Fact[Any]], combine: Callable[[dict[str, Any]], T]) -> Fact[T]:
    """A state read by several commands as one fact (a change's `state_fact`), so that gathering it with others
    is still one round trip. `combine` is pure: {part name: parsed value} -> the fact's value."""
    if not parts:
        raise ValueError(f"fact {name}: a compound of no facts")
    return Fact(name, (), _no_text, parts=tuple(parts), combine=combine)


def _flat(facts: Sequence[Fact[Any]]) -> list[Fact[Any]]:
    """The simple facts to run for `facts` (compounds expanded), each name once; one name for two different
    commands is an error."""
    out: dict[str, Fact[Any]] = {}
    for f in facts:
        for part in _flat(f.parts) if f.parts else [f]:
            seen = out.setdefault(part.name, part)
            if (seen.argv, seen.sudo) != (part.argv, part.sudo):
                raise ValueError(f"two different facts are named {part.name!r}")
    return list(out.values())


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
    """Gather facts with one command per sudo setting (one round trip), each parsed by its own parser; a
    compound fact's parts are gathered with the rest, then combined."""
    values: dict[str, Any] = {}
    simple = _flat(facts)
    for sudo in sorted({f.sudo for f in simple}):
        group = [f for f in simple if f.sudo == sudo]
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
    return {f.name: _value(f, values, transport.label) for f in facts} | values


def _value(fact: Fact[Any], values: dict[str, Any], label: str) -> Any:
    if not fact.parts:
        return values[fact.name]
    assert fact.combine is not None, fact.name
    try:
        return fact.combine({p.name: _value(p, values, label) for p in fact.parts})
    except ParseError as exc:
        raise ParseError(f"{label}: fact {fact.name}: {exc}") from exc


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
