"""Facts: read-only probes of a unit. Each fact is a command plus a pure parser tested on recorded output."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from orchestrator.errors import ParseError
from orchestrator.transport import Transport

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


def parse_cpu_list(text: str) -> list[int]:
    """Kernel CPU list syntax ('0-3,5,8-11:2' is not used by sysfs; '0-3,5' is) -> sorted CPU numbers."""
    text = text.strip()
    cpus: set[int] = set()
    if not text or text == "(null)":
        return []
    for part in text.split(","):
        lo, sep, hi = part.partition("-")
        try:
            if sep:
                a, b = int(lo), int(hi)
                if b < a:
                    raise ValueError
                cpus.update(range(a, b + 1))
            else:
                cpus.add(int(part))
        except ValueError:
            raise ParseError(f"not a CPU list: {text!r}") from None
    return sorted(cpus)


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


def gather_basic(transport: Transport, target: str) -> BasicFacts:
    values: dict[str, Any] = {"target": target}
    for fact in (HOSTNAME, KERNEL_RELEASE, ARCH, CPUS_ONLINE, CMDLINE, BOOT_ID):
        values[fact.name] = fact.gather(transport)
    return BasicFacts(**values)
