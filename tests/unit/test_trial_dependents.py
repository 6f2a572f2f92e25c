"""TrialBoot's dependents: after a host boots, the guest whose QEMU runs on it must answer again before the
trial counts as healthy (on a robot, and in the arm64 lab, the guest reboots with its host)."""

from __future__ import annotations

import sys

import pytest

from orchestrator.boot.trial import Dependent, TrialBoot
from orchestrator.core.errors import TransportError
from orchestrator.remote.local import LocalTransport

pytestmark = pytest.mark.unit


def flaky(failures: int):
    """A connect that fails `failures` times (a guest still booting), then reaches this machine."""
    calls = {"n": 0}

    def connect():
        calls["n"] += 1
        if calls["n"] <= failures:
            raise TransportError("connection refused (still booting)")
        return LocalTransport()
    return connect, calls


def trial(dependents, timeout=30.0, events=None) -> TrialBoot:  # noqa: ANN001
    return TrialBoot(loader=None, control=LocalTransport, observe=LocalTransport, subject="u.host",  # type: ignore[arg-type]
                     boot_timeout_s=timeout, poll_s=0.0, dependents=dependents,
                     events=(events.append if events is not None else (lambda e: None)), sleep=lambda s: None)


def test_a_guest_that_comes_back_after_a_while_is_waited_for():
    connect, calls = flaky(3)
    events = []
    assert trial((Dependent("u.guest", connect),), events=events).dependents_back() == []
    assert calls["n"] == 4
    assert [e.kind for e in events] == ["trial.dependents"]


def test_a_guest_that_never_answers_is_a_problem_naming_it():
    connect, calls = flaky(10**9)
    problems = trial((Dependent("u.guest", connect),), timeout=0.3).dependents_back()
    assert len(problems) == 1 and problems[0].startswith("u.guest did not answer within 0 s")
    assert "still booting" in problems[0] and calls["n"] >= 1


def test_no_dependents_no_wait():
    assert trial(()).dependents_back() == []


def test_a_guest_hung_in_its_boot_is_power_cycled_once_then_answers(tmp_path):
    mark = tmp_path / "cycled"
    argv = [sys.executable, "-c", f"open({str(mark)!r}, 'a').write('x')"]  # a real command, run once

    def connect():  # hung until its power cycle, as a guest whose QEMU is restarted
        if not mark.exists():
            raise TransportError("Error reading SSH protocol banner")
        return LocalTransport()
    events = []
    problems = trial((Dependent("u.guest", connect, argv),), timeout=0.3, events=events).dependents_back()
    assert problems == []
    assert mark.read_text() == "x"
    assert [e.kind for e in events] == ["trial.dependent_power_cycle", "trial.dependents"]
    assert "u.guest did not answer within 0 s (Error reading SSH protocol banner)" in events[0].message


def test_a_guest_still_silent_after_its_power_cycle_is_a_problem_saying_both(tmp_path):
    connect, calls = flaky(10**9)
    mark = tmp_path / "cycled"
    argv = [sys.executable, "-c", f"open({str(mark)!r}, 'a').write('x')"]
    problems = trial((Dependent("u.guest", connect, argv),), timeout=0.2).dependents_back()
    assert len(problems) == 1 and "nor within 0 s after its power cycle" in problems[0], problems
    assert mark.read_text() == "x"


def test_a_failing_guest_power_cycle_is_named_in_the_problem():
    connect, _ = flaky(10**9)
    argv = [sys.executable, "-c", "import sys; print('bmc says no'); sys.exit(3)"]
    events = []
    problems = trial((Dependent("u.guest", connect, argv),), timeout=0.2, events=events).dependents_back()
    assert len(problems) == 1 and "its power cycle failed" in problems[0] and "bmc says no" in problems[0], problems
    # journaled as a failed power cycle, like the host's
    assert [e.kind for e in events] == ["trial.dependent_power_cycle", "trial.power_cycle_failed"], events
