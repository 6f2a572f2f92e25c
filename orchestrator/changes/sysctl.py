"""A sysctl: its runtime value and a drop-in file rt-tune owns, so it survives a reboot."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from orchestrator.changes.base import Change, ChangeError, State, b64, restore_file, unb64
from orchestrator.config.knobs import SYSCTL_TYPES
from orchestrator.core.errors import InputError, ParseError
from orchestrator.core.names import SYSCTL_NAME  # whole-string, systemd's rules
from orchestrator.facts.base import Fact, files_fact
from orchestrator.facts.sysctl import sysctl_path
from orchestrator.remote.transport import Transport, read_files, write_run_read


@dataclass
class SysctlChange(Change):
    """A sysctl: the runtime value now, and a drop-in file rt-tune owns so it survives a reboot."""

    name: str
    value: str
    kind: str = field(default="sysctl", init=False)

    def __post_init__(self) -> None:
        if not SYSCTL_NAME.match(self.name):
            raise InputError(f"sysctl name {self.name!r}: expected dotted lowercase words like kernel.timer_migration")
        if not re.fullmatch(r"[A-Za-z0-9 _./:,-]*", self.value) or "\n" in self.value:
            raise InputError(f"sysctl {self.name} value {self.value!r}: no shell metacharacters or newlines")
        self.change_id = f"sysctl.{self.name}"

    @property
    def proc_path(self) -> str:
        return sysctl_path(self.name)

    @property
    def dropin(self) -> str:
        return f"/etc/sysctl.d/90-rt-tune-{self.name}.conf"

    def read(self, t: Transport) -> State:
        return self._state(t.label, read_files(t, [self.proc_path, self.dropin]))  # one round trip

    def state_fact(self) -> Fact[State]:
        files = files_fact(f"change:{self.change_id}", [self.proc_path, self.dropin])

        def parse(text: str) -> State:
            try:
                return self._state("", files.parse(text))
            except ChangeError as exc:
                raise ParseError(str(exc)) from exc

        return Fact(files.name, files.argv, parse)

    def _state(self, label: str, files: dict[str, bytes | None]) -> State:
        value = files[self.proc_path]
        if value is None and self.name not in SYSCTL_TYPES:  # a name rt-tune does not know may be a typo
            raise ChangeError(f"{label + ': ' if label else ''}no sysctl {self.name} ({self.proc_path} does not "
                              "exist)")
        return {"value": None if value is None else value.decode().strip(), "dropin": b64(files[self.dropin])}

    def not_applicable(self, before: State) -> str | None:
        """A knob rt-tune knows (SYSCTL_TYPES) that this kernel was built without (kernel.numa_balancing needs
        CONFIG_NUMA_BALANCING): skipped, as a sysfs knob the unit lacks; a base profile applies across kernels."""
        if before["value"] is None:
            return f"this kernel has no sysctl {self.name} ({self.proc_path} does not exist)"
        return None

    def _dropin_bytes(self) -> bytes:
        """`-name = value`: systemd-sysctl logs a write the kernel refuses at boot instead of failing its unit
        (kernel.nmi_watchdog without a hard-lockup detector answers ENOTSUPP, even to its own value); a value
        that did not take is drift, which `tune verify` reads."""
        return f"# managed by rt-tune: {self.change_id}\n-{self.name} = {self.value}\n".encode()

    @staticmethod
    def _same(a: str, b: str) -> bool:
        return " ".join(str(a).split()) == " ".join(str(b).split())

    def desired(self, before: State) -> State:
        return {"value": self.value, "dropin": b64(self._dropin_bytes())}

    def in_place(self, live: State, desired: State) -> bool:
        # compare numbers by value: the kernel prints "0", a profile may say "0" or " 0"
        return self._same(live["value"], desired["value"]) and live["dropin"] == desired["dropin"]

    def apply(self, t: Transport, before: State) -> None:
        self._check_fits(t, before)
        self._write_and_set(t, before, read=())

    def apply_and_read(self, t: Transport, before: State) -> State:
        """The drop-in written, the value set and both read back: one round trip."""
        self._check_fits(t, before)
        return self._state(t.label, self._write_and_set(t, before, read=(self.proc_path, self.dropin)))

    def _check_fits(self, t: Transport, before: State) -> None:
        """vm.nr_hugepages: the pages it adds must fit in the unit's available memory, else ChangeError before
        anything is written (the kernel would reserve what it can and starve everything else)."""
        if self.name != "vm.nr_hugepages":
            return
        meminfo = parse_meminfo(t.read_file("/proc/meminfo").decode())
        add_kib = (int(self.value) - int(before["value"])) * meminfo.get("Hugepagesize", 0)
        if add_kib > meminfo.get("MemAvailable", 0):
            raise ChangeError(f"{t.label}: vm.nr_hugepages {before['value']} -> {self.value} needs "
                              f"{add_kib // 1024} MiB more; the unit has {meminfo.get('MemAvailable', 0) // 1024} MiB "
                              "available")

    def _write_and_set(self, t: Transport, before: State, read: tuple[str, ...]) -> dict[str, bytes | None]:
        """The drop-in, and the value where it is not already the one wanted: a kernel may refuse any write of
        a knob it cannot act on, its current value included."""
        set_value = () if self._same(before["value"], self.value) else \
            ("sysctl", "-q", "-w", f"{self.name}={self.value}")
        return write_run_read(t, self.dropin, self._dropin_bytes(), timeout_s=30, read=read, command=set_value)

    def _set(self, t: Transport, value: str) -> None:
        """The runtime value, written only when it differs (see `_write_and_set`): one more read, no refusal."""
        live = read_files(t, [self.proc_path])[self.proc_path]
        if live is None or not self._same(live.decode(), value):
            t.run(["sysctl", "-q", "-w", f"{self.name}={value}"], timeout_s=30)

    def rollback(self, t: Transport, before: State) -> None:
        self._set(t, before["value"])
        restore_file(t, self.dropin, unb64(before["dropin"]))

    switch_keeps_persistence = True

    def switch_command(self, before: State, on: bool) -> tuple[str, ...]:
        """The runtime value only: the drop-in acts at the next boot, and a measurement run does not boot."""
        if self._same(before["value"], self.value):
            return ()
        return ("sysctl", "-q", "-w", f"{self.name}={self.value if on else before['value']}")

    def describe(self) -> str:
        return f"sysctl {self.name}={self.value}"


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo -> {field: kB} (fields without a number are left out)."""
    out = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            out[key.strip()] = int(parts[0])
    return out
