"""A sysctl: its runtime value and a drop-in file rt-tune owns, so it survives a reboot."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from orchestrator.changes.base import Change, ChangeError, State, b64, restore_file, unb64
from orchestrator.core.errors import InputError
from orchestrator.core.names import SYSCTL_NAME  # whole-string, systemd's rules
from orchestrator.facts.sysctl import sysctl_path
from orchestrator.remote.transport import Transport, read_files


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
        files = read_files(t, [self.proc_path, self.dropin])  # one round trip
        value = files[self.proc_path]
        if value is None:
            raise ChangeError(f"{t.label}: no sysctl {self.name} ({self.proc_path} does not exist)")
        return {"value": value.decode().strip(), "dropin": b64(files[self.dropin])}

    def _dropin_bytes(self) -> bytes:
        return f"# managed by rt-tune: {self.change_id}\n{self.name} = {self.value}\n".encode()

    def desired(self, before: State) -> State:
        return {"value": self.value, "dropin": b64(self._dropin_bytes())}

    def in_place(self, live: State, desired: State) -> bool:
        # compare numbers by value: the kernel prints "0", a profile may say "0" or " 0"
        return " ".join(live["value"].split()) == " ".join(str(desired["value"]).split()) and \
            live["dropin"] == desired["dropin"]

    def apply(self, t: Transport, before: State) -> None:
        t.write_file(self.dropin, self._dropin_bytes())
        t.run(["sysctl", "-q", "-w", f"{self.name}={self.value}"], timeout_s=30)

    def rollback(self, t: Transport, before: State) -> None:
        t.run(["sysctl", "-q", "-w", f"{self.name}={before['value']}"], timeout_s=30)
        restore_file(t, self.dropin, unb64(before["dropin"]))

    switch_keeps_persistence = True

    def switch(self, t: Transport, before: State, on: bool) -> None:
        """The runtime value only: the drop-in acts at the next boot, and a measurement run does not boot."""
        t.run(["sysctl", "-q", "-w", f"{self.name}={self.value if on else before['value']}"], timeout_s=30)

    def describe(self) -> str:
        return f"sysctl {self.name}={self.value}"
