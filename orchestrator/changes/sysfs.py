"""Kernel knobs under /sys from rt-tune's allow-list (`KNOBS`), each a typed value, now and at every boot.

A knob is one or more files (per-CPU knobs: one per CPU, or per CPU and idle state). What the unit lacks is not
an error: a file that does not exist is left out, and a knob none of whose files exist is not applicable (the
plan says so; a QEMU guest has no cpufreq). Persistence is a tmpfiles.d entry of rt-tune's (`w PATH - - - -
VALUE` per file: systemd-tmpfiles writes it early at boot, only where the file exists), removed at rollback.
The values before are journaled as read and written back byte for byte where the kernel prints what it accepts
(a cpumask, a governor, a number); for the bracketed choice files (`always [madvise] never`) the selected word
is what is written back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from orchestrator.changes.base import Change, ChangeError, State, b64, restore_file, unb64
from orchestrator.config.knobs import KNOBS, Knob, check_knob, normal_value, selected_choice
from orchestrator.core.cpulist import CpuListError, cpumask_of, format_cpulist, parse_cpulist
from orchestrator.core.errors import InputError
from orchestrator.facts.base import Fact, files_fact
from orchestrator.remote.transport import Transport, write_run_read, write_values_command


def tmpfiles_path(knob: str) -> str:
    return f"/etc/tmpfiles.d/90-rt-tune-sysfs-{knob}.conf"


@dataclass
class SysfsChange(Change):
    """One allow-listed knob set on the unit (`value`; for a per-CPU knob on `cpus`, for cpuidle on `states`)."""

    knob: str
    value: str
    cpus: list[int] = field(default_factory=list)
    states: list[int] = field(default_factory=list)
    kind: str = field(default="sysfs", init=False)
    spec: Knob = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.value = str(self.value)
        problem = check_knob(self.knob, self.value, self.cpus, self.states)
        if problem:
            raise InputError(f"sysfs {self.knob} = {self.value!r}: {problem}")
        self.spec = KNOBS[self.knob]
        self.change_id = f"sysfs.{self.knob}"

    def cpus_value(self) -> list[int]:
        try:
            return parse_cpulist(self.value)
        except CpuListError:
            return []

    @property
    def tmpfiles(self) -> str:
        return tmpfiles_path(self.knob)

    def paths(self) -> list[str]:
        if not self.spec.per_cpu:
            return [self.spec.path]
        return [self.spec.path.format(cpu=c, state=s) for c in self.cpus for s in (self.states or [0])]

    def _written(self) -> str:
        """What is written to each file."""
        return cpumask_of(self.cpus_value()) if self.spec.type == "cpumask" else self.value

    def _normal(self, text: str | None) -> object:
        """A file's content in the terms of the knob, for comparing (None: absent)."""
        return normal_value(self.spec, text)

    def _tmpfiles_bytes(self, present: Sequence[str]) -> bytes:
        lines = [f"# managed by rt-tune: {self.change_id} (removed when rt-tune rolls it back)\n"]
        lines += [f"w {p} - - - - {self._written()}\n" for p in present]
        return "".join(lines).encode()

    def read(self, t: Transport) -> State:
        return self.state_fact().gather(t)

    def state_fact(self) -> Fact[State]:
        """`read` as a fact: a bundle reads all its sysfs and sysctl members in one round trip."""
        files = files_fact(f"change:{self.change_id}", [*self.paths(), self.tmpfiles])
        return Fact(files.name, files.argv, lambda text: self._state(files.parse(text)))

    def _state(self, files: dict[str, bytes | None]) -> State:
        values = {p: None if (data := files[p]) is None else data.decode("utf-8", "replace") for p in self.paths()}
        return {"values": values, "tmpfiles": b64(files[self.tmpfiles])}

    def not_applicable(self, before: State) -> str | None:
        if all(v is None for v in before["values"].values()):
            shown = self.paths()[0] + (f" (and {len(self.paths()) - 1} more)" if len(self.paths()) > 1 else "")
            return f"this unit has no {shown}"
        return None

    def desired(self, before: State) -> State:
        present = [p for p, v in before["values"].items() if v is not None]
        return {"values": {p: self._written() for p in present}, "tmpfiles": b64(self._tmpfiles_bytes(present))}

    def in_place(self, live: State, desired: State) -> bool:
        return live["tmpfiles"] == desired["tmpfiles"] and all(
            self._normal(live["values"].get(p)) == self._normal(v) for p, v in desired["values"].items())

    def apply_and_read(self, t: Transport, before: State) -> State:
        """The values written, the tmpfiles.d entry written, both read back: one round trip."""
        want = self.desired(before)
        files = write_run_read(t, self.tmpfiles, unb64(want["tmpfiles"]) or b"", timeout_s=30,
                               command=write_values_command([(p, v) for p, v in want["values"].items()]),
                               read=[*self.paths(), self.tmpfiles])
        return self._state(files)

    def apply(self, t: Transport, before: State) -> None:
        self.apply_and_read(t, before)

    def _before_pairs(self, before: State) -> list[tuple[str, str]]:
        """(file, value) that puts each file back as it was (a choice file: its selected word)."""
        return [(p, selected_choice(v) if self.spec.type == "choice" else v.strip())
                for p, v in before["values"].items() if v is not None]

    def rollback(self, t: Transport, before: State) -> None:
        pairs = self._before_pairs(before)
        if pairs:
            t.run(list(write_values_command(pairs)), timeout_s=30)
        restore_file(t, self.tmpfiles, unb64(before["tmpfiles"]))

    switch_keeps_persistence = True

    def switch_command(self, before: State, on: bool) -> tuple[str, ...]:
        """The values only: the tmpfiles.d entry acts at the next boot, and a measurement run does not boot."""
        pairs = list(self.desired(before)["values"].items()) if on else self._before_pairs(before)
        return write_values_command(pairs) if pairs else ()

    def verify_rolled_back(self, t: Transport, before: State) -> None:
        live = self.read(t)
        wrong = [p for p, v in before["values"].items() if self._normal(live["values"].get(p)) != self._normal(v)]
        if wrong or live["tmpfiles"] != before["tmpfiles"]:
            raise ChangeError(f"{t.label}: {self.describe()}: rollback did not restore "
                              + (", ".join(wrong) if wrong else self.tmpfiles))

    def describe(self) -> str:
        where = f" on CPUs {format_cpulist(self.cpus)}" if self.spec.per_cpu else ""
        states = f" (idle states {format_cpulist(self.states)})" if self.states else ""
        return f"sysfs {self.knob} = {self.value}{where}{states}"

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> SysfsChange:
        return cls(str(params["knob"]), str(params["value"]), cpus=[int(c) for c in params.get("cpus") or []],
                   states=[int(s) for s in params.get("states") or []])
