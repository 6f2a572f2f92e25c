"""A power_cycle command that cannot run (missing program, empty argv, a hang, no permission, a failure) is a
`trial.power_cycle_failed` event with the reason, and the trial still ends on its lost-unit path.

No VMs: the unit is this machine through LocalTransport, whose boot_id never changes (the "reboot" is never
done), so every trial waits out its (short) boot timeout; the power_cycle commands are real processes."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from orchestrator.boot.loader import BootTarget
from orchestrator.boot.trial import TrialBoot, UnitLostError
from orchestrator.core.errors import TuneError
from orchestrator.core.events import Event
from orchestrator.journal.journal import Journal
from orchestrator.remote.local import LocalTransport

pytestmark = pytest.mark.unit


class NeverReboots:
    """Stands in for the bootloader: its reboot does nothing, so the unit keeps its boot_id."""

    def reboot(self, t, verb: str = "reboot") -> None:
        pass


def trial(power_cycle, events, timeout_s: float = 0.5) -> TrialBoot:
    return TrialBoot(loader=NeverReboots(), control=LocalTransport, observe=LocalTransport,  # type: ignore[arg-type]
                     subject="u.host", power_cycle=power_cycle, power_cycle_timeout_s=timeout_s,
                     boot_timeout_s=0.1, poll_s=0.05, events=events)


def boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def pgrep(pattern: str) -> list[str]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True, check=False).stdout
    return out.split()


def not_executable(tmp_path: Path) -> list[str]:
    prog = tmp_path / "pdu-off"
    prog.write_text("#!/bin/sh\nexit 0\n")
    prog.chmod(0o644)
    return [str(prog)]


def not_a_program(tmp_path: Path) -> list[str]:
    prog = tmp_path / "garbage"
    prog.write_bytes(b"\x7fELF\x00\x00 not really\n")
    prog.chmod(0o755)
    return [str(prog)]


CASES = {
    "missing program": (lambda tmp: ["/nonexistent/prog", "--port", "7"], "program not found: /nonexistent/prog"),
    "empty argv": (lambda tmp: [], "the command is empty (power_cycle: [])"),
    "hang": (lambda tmp: ["sleep", "30"], "timed out after 0.5 s (killed)"),
    "exit status": (lambda tmp: ["sh", "-c", "echo relay 4 stuck >&2; exit 3"], "exit status 3: relay 4 stuck"),
    "silent failure": (lambda tmp: ["sh", "-c", "exit 3"], "exit status 3 (no output)"),
    "killed": (lambda tmp: ["sh", "-c", "kill -9 $$"], "killed by signal 9"),
    "no permission": (not_executable, "permission denied running "),
    "not a program": (lambda tmp: not_a_program(tmp), "Exec format error"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_power_cycle_that_cannot_run_is_an_event_and_the_unit_is_lost(case: str, tmp_path: Path) -> None:
    make, reason = CASES[case]
    events: list[Event] = []
    start = time.monotonic()
    out = trial(make(tmp_path), events.append).run(BootTarget(), "old", "old-kernel", boot_id())
    assert time.monotonic() - start < 10
    assert out.result == "lost" and not out.power_cycled
    assert re.match(r"the unit did not come back within \d+ s; the power cycle failed: ", out.reason)
    assert reason in out.reason
    assert [e.kind for e in events] == ["trial.reboot", "trial.power_cycle", "trial.power_cycle_failed",
                                        "trial.lost"]
    failed = events[2]
    assert reason in failed.data["reason"] and reason in failed.message and failed.subject == "u.host"
    assert failed.message.startswith("power_cycle `")
    assert events[3].data["reason"] == out.reason


def test_a_hanging_power_cycle_is_killed_with_what_it_started(tmp_path: Path) -> None:
    """Killed as a process group: a child still holding its output would otherwise keep the trial waiting."""
    events: list[Event] = []
    start = time.monotonic()
    out = trial(["sh", "-c", "sleep 31.7071; true"], events.append, timeout_s=0.3).run(
        BootTarget(), "old", "old-kernel", boot_id())
    assert time.monotonic() - start < 5
    assert "timed out after 0.3 s (killed)" in out.reason
    deadline = time.monotonic() + 3
    while pgrep("sleep 31.7071") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pgrep("sleep 31.7071") == []


def test_the_failure_is_recorded_in_the_journal(tmp_path: Path) -> None:
    with Journal(tmp_path / "journal.sqlite") as journal:
        out = trial(["/nonexistent/prog"], journal).run(BootTarget(), "old", "old-kernel", boot_id())
        stored = {e.kind: e for e in journal.events()}
    assert out.result == "lost"
    assert stored["trial.power_cycle_failed"].data["reason"] == "program not found: /nonexistent/prog"
    assert stored["trial.power_cycle_failed"].data["argv"] == ["/nonexistent/prog"]
    assert "trial.lost" in stored


def test_a_power_cycle_that_runs_counts_as_one() -> None:
    events: list[Event] = []
    out = trial(["true"], events.append).run(BootTarget(), "old", "old-kernel", boot_id())
    assert out.result == "lost" and out.power_cycled
    assert re.fullmatch(r"the unit did not come back within \d+ s \(power cycle included\)", out.reason)
    assert "trial.power_cycle_failed" not in [e.kind for e in events]


def test_no_power_cycle_is_not_run() -> None:
    events: list[Event] = []
    out = trial(None, events.append).run(BootTarget(), "old", "old-kernel", boot_id())
    assert out.reason.endswith("and has no power_cycle") and not out.power_cycled
    assert [e.kind for e in events] == ["trial.reboot", "trial.lost"]


def test_reachable_and_back_to_default_name_the_failure() -> None:
    """The unit answers: reachable() needs no power cycle; back_to_default() reboots (never, here), fails the
    power cycle, and says so."""
    events: list[Event] = []
    t = trial(["/nonexistent/prog"], events.append)
    assert t.reachable() == boot_id()
    assert events == []
    with pytest.raises(TuneError) as info:
        t.back_to_default("old", "old-kernel")
    assert not isinstance(info.value, UnitLostError)
    assert "the power cycle failed: program not found: /nonexistent/prog" in str(info.value)
    assert [e.kind for e in events] == ["trial.reboot", "trial.power_cycle", "trial.power_cycle_failed"]


def test_reachable_raises_unit_lost_with_the_reason() -> None:
    def unreachable():
        raise TuneError("connection refused")

    events: list[Event] = []
    t = TrialBoot(loader=NeverReboots(), control=unreachable, observe=unreachable,  # type: ignore[arg-type]
                  subject="u.host", power_cycle=[], boot_timeout_s=0.1, poll_s=0.05, events=events.append)
    with pytest.raises(UnitLostError) as info:
        t.reachable()
    assert str(info.value).startswith("u.host: unreachable for 0 s; the power cycle failed: the command is empty")
    assert [e.kind for e in events] == ["trial.power_cycle", "trial.power_cycle_failed"]
