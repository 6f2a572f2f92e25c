"""An in-memory unit behind the Transport protocol: tests and simulations of the apply loop without VMs.

A FakeUnit is files (its /proc/sys values are files too), the programs it has, and a recorded cyclictest
output to answer measurement runs with. FakeTransport answers each command rt-tune sends by what it is: the
program (`sysctl`, `cat`, `rm`, `mkdir`, `systemctl`), or for rt-tune's own remote scripts the script itself
(the constant the caller sends, compared whole: never a guess from a piece of its text). A command it does not
know exits 127 with a message naming it, so a test that reaches one fails loudly instead of passing on a
made-up answer. Semantics (check, CommandFailed, sudo) are the real transports', from the shared base class.
"""

from __future__ import annotations

import base64
import itertools
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from orchestrator.remote.remote_scripts import MEASURE_RUN as MEASUREMENT_RUN
from orchestrator.remote.remote_scripts import SYSREG_TRACEPOINT_SCRIPT
from orchestrator.remote.transport import (
    _READ_FILES,
    _WRITE_RUN_READ,
    _WRITE_SCRIPT,
    COMMAND_SEP,
    FILE_RECORDS,
    GATHER_SCRIPT,
    RUN_COMMANDS,
    WRITE_VALUES,
    _CommandTransport,
    _Raw,
)


@dataclass
class FakeUnit:
    """One unit's state as rt-tune's runtime changes and measurements see it."""

    files: dict[str, bytes] = field(default_factory=dict)
    #: what `command -v` finds (a measurement run checks for its tools first)
    programs: set[str] = field(
        default_factory=lambda: {"cyclictest", "systemd-run", "stress-ng", "hackbench"})
    #: what a measurement run reads before it starts: give a real unit's (recorded), never made-up values
    boot_id: str = ""
    cmdline: str = ""
    #: cyclictest outputs (recorded from real runs) answered in turn by measurement runs
    cyclictest_outputs: list[str] = field(default_factory=list)
    #: counter snapshots (recorded): (the recording's section marker, the text of one snapshot's sections as
    #: measure_run.sh printed them), answered in turn, two per measurement run and one per counters read. None
    #: given: the runs' answers hold no counter sections (their results have no counters)
    counter_snapshots: list[tuple[str, str]] = field(default_factory=list)
    #: what remote/scripts/sysreg_tracepoint.sh prints on this unit (yes, no, no-tracefs; "": not asked for)
    sysreg_tracepoint: str = ""
    #: sysctls whose writes are accepted and do not take (as a kernel may do): a change's verify must catch it
    stuck_sysctls: set[str] = field(default_factory=set)
    #: sysctls whose every write the kernel refuses, its current value too (kernel.nmi_watchdog on a VM without
    #: a hard-lockup detector: the x86 lab's `sysctl -w kernel.nmi_watchdog=0` failed, 2026-12-07)
    refused_sysctls: set[str] = field(default_factory=set)
    #: every command the unit received, in order (argv as sent)
    log: list[tuple[str, ...]] = field(default_factory=list)
    _outputs: Iterator[str] | None = field(default=None, repr=False)
    _snapshots: Iterator[tuple[str, str]] | None = field(default=None, repr=False)

    def next_counter_sections(self, marker: str, suffix: str) -> str:
        """The next recorded snapshot's sections under `marker`, each name's suffix (0 or 1) replaced by `suffix`."""
        if not self.counter_snapshots:
            return ""
        self._snapshots = self._snapshots or itertools.cycle(self.counter_snapshots)
        recorded_marker, text = next(self._snapshots)
        return re.sub(rf"(?m)^{re.escape(recorded_marker)} ([a-z_]+)[01]$",
                      lambda m: f"{marker} {m.group(1)}{suffix}", text)

    def next_cyclictest_output(self) -> str:
        if not (self.cyclictest_outputs and self.boot_id and self.cmdline):
            raise AssertionError("this FakeUnit has no recorded cyclictest output, boot_id and cmdline to answer "
                                 "a measurement with")
        self._outputs = self._outputs or itertools.cycle(self.cyclictest_outputs)
        return next(self._outputs)

    def sysctl_path(self, name: str) -> str:
        return "/proc/sys/" + name.replace(".", "/")


class FakeTransport(_CommandTransport):
    """The Transport protocol over a FakeUnit (a context manager, like the real ones)."""

    def __init__(self, unit: FakeUnit, label: str = "fake", *, rtt_s: float = 0.0, run_s: float = 0.0) -> None:
        """`rtt_s`: a network round trip slept per command (a simulated fleet on a LAN); `run_s`: slept by a
        measurement run, as cyclictest runs for its duration."""
        self.unit = unit
        self._label = label
        self.rtt_s = rtt_s
        self.run_s = run_s
        self.closed = False

    @property
    def label(self) -> str:
        return self._label

    def close(self) -> None:
        self.closed = True

    def _exec(self, argv: list[str], *, timeout_s: float | None, stdin: bytes | None, sudo: bool) -> _Raw:
        start = time.monotonic()
        if self.rtt_s:
            time.sleep(self.rtt_s)
        self.unit.log.append(tuple(argv))
        status, out, err = self._answer(argv, stdin)
        data = out.encode() if isinstance(out, str) else out
        return _Raw(status, data, err.encode(), time.monotonic() - start)

    # ---- the commands ---------------------------------------------------------------------------------
    def _answer(self, argv: list[str], stdin: bytes | None) -> tuple[int, str | bytes, str]:
        files = self.unit.files
        if argv[:2] == ["sh", "-c"] and len(argv) > 2:
            script, args = argv[2], argv[4:]
            if script == _READ_FILES:
                return 0, self._file_records(args[1:], marker=args[0]), ""
            if script == FILE_RECORDS:
                return 0, self._file_records(args), ""
            if script == _WRITE_SCRIPT:  # sh TMP MODE PATH
                files[args[2]] = stdin or b""
                return 0, "", ""
            if script == _WRITE_RUN_READ:  # MARKER TMP MODE PATH COMMAND PATHS...
                files[args[3]] = stdin or b""
                if args[4]:
                    status, _out, err = self._answer(args[4].split(COMMAND_SEP), None)
                    if status:
                        return 1, "", err
                return 0, self._file_records(args[5:], marker=args[0]), ""
            if script == WRITE_VALUES:  # PATH VALUE ...: only files the unit has (sysfs files are never created)
                for path, value in zip(args[0::2], args[1::2], strict=False):
                    if path not in files:
                        return 1, "", f"fake unit {self._label}: no file {path}\n"
                    files[path] = (value + "\n").encode()
                return 0, "", ""
            if script == RUN_COMMANDS:  # each command answered by what it is; the first failure ends it
                for spec in args:
                    status, _out, err = self._answer(spec.split(COMMAND_SEP), None)
                    if status:
                        return 1, "", err
                return 0, "", ""
            if script == GATHER_SCRIPT:  # MARKER NAME<sep>ARGV...: each command answered by what it is
                out = ""
                for spec in args[1:]:
                    name, *cmd = spec.split(COMMAND_SEP)
                    status, text, _err = self._answer(cmd, None)
                    text = text.decode() if isinstance(text, bytes) else text
                    out += f"{args[0]} {name}\n{text}{args[0]} {status}\n"
                return 0, out, ""
            if script == MEASUREMENT_RUN:
                return self._measurement(args)
            if script == SYSREG_TRACEPOINT_SCRIPT and self.unit.sysreg_tracepoint:
                return 0, self.unit.sysreg_tracepoint + "\n", ""
        program = argv[0]
        if program == "cat" and argv[1:2] == ["--"] and len(argv) == 3:
            if argv[2] not in files:  # the fake's own words: no tool output is imitated
                return 1, "", f"fake unit {self._label}: no file {argv[2]}\n"
            return 0, files[argv[2]], ""
        if argv[:3] == ["rm", "-f", "--"]:
            for path in argv[3:]:
                files.pop(path, None)
            return 0, "", ""
        if program in ("mkdir", "rmdir"):  # the fake's files have no directories of their own
            return 0, "", ""
        if program == "sysctl" and argv[-1].count("=") >= 1 and "-w" in argv:
            name, _, value = argv[-1].partition("=")
            path = self.unit.sysctl_path(name)
            if path not in files:
                return 255, "", f"fake unit {self._label}: no file {path}\n"
            if name in self.unit.refused_sysctls:
                return 255, "", f"fake unit {self._label}: the kernel refuses writes to {name}\n"
            if name not in self.unit.stuck_sysctls:
                files[path] = (value + "\n").encode()
            return 0, "", ""
        if program == "systemctl" and argv[1:2] in (["stop"], ["daemon-reload"]):
            return 0, "", ""
        return 127, "", f"fake unit {self._label}: no handler for `{' '.join(argv)[:200]}`\n"

    def _file_records(self, paths: list[str], *, marker: str | None = None) -> str:
        files = self.unit.files
        lines = ["absent" if files.get(p) is None else "present " + base64.b64encode(files[p]).decode()
                 for p in paths]
        return "".join(f"{line}\n" for line in ([marker, *lines, marker] if marker else lines))

    def _measurement(self, args: list[str]) -> tuple[int, str, str]:
        """measure.runner's one round trip (MARKER NTOOLS NLOAD SETTLE LOADUNIT NTIDS SYSREG TOOLS... TIDS... LOAD...
        COMMAND...): its tools checked, the boot and the cmdline, the recorded counter snapshots (if the unit has
        any) around a recorded cyclictest output; without a command, one counter snapshot alone."""
        marker, n_tools, n_load, n_tids = args[0], int(args[1]), int(args[2]), int(args[5])
        tools = args[7:7 + n_tools]
        missing = [t for t in tools if t not in self.unit.programs]
        if missing:
            return 0, "missing " + " ".join(missing) + "\n", ""
        command = args[7 + n_tools + n_tids + n_load:]
        head = f"@@\n{self.unit.boot_id}\n@@\n{self.unit.cmdline}\n@@\n"
        if not command:
            if not (self.unit.counter_snapshots and self.unit.boot_id and self.unit.cmdline):
                raise AssertionError("this FakeUnit has no recorded counter snapshot, boot_id and cmdline to "
                                     "answer a counters read with")
            return 0, head + self.unit.next_counter_sections(marker, "0") + f"\n{marker} end\n", ""
        if self.run_s:
            time.sleep(self.run_s)
        output = self.unit.next_cyclictest_output()
        return 0, (head + self.unit.next_counter_sections(marker, "0") + f"\n{marker} run\n" + output
                   + self.unit.next_counter_sections(marker, "1") + f"\n{marker} end\n"), ""
