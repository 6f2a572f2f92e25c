"""CPU time per test, the lab's QEMU processes included: with both lanes busy the suite's length is its CPU
time over two CPUs, so this (not the wall time of `--durations`) says which test to make cheaper.

Each test phase (setup, call, teardown) counts the CPU time of this pytest process and of the commands it
waited for (`tune` invocations), plus the CPU time the QEMU processes of this process's labs (an argv naming
a path under its base temp directory or a reused lab's state directory) used meanwhile. A QEMU that exits
during a phase (a power cut, `tune lab down`) loses what it used in that phase since the phase began. The
summary at the end lists the tests that used most, and each lane's total."""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import pytest

from benchmarks.lab_bench import cpu_seconds

TICK = os.sysconf("SC_CLK_TCK")
TOP = 25


def _qemu_ticks(needles: list[bytes]) -> dict[int, int]:
    """pid -> user+system ticks of every live QEMU whose argv names a path under one of `needles`."""
    out = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if not argv or b"qemu-system" not in argv[0] or not any(n in a for n in needles for a in argv):
                continue
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        out[int(proc.name)] = round(cpu_seconds(stat, 1))  # ticks: utime + stime
    return out


def _own_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _needles(config) -> list[bytes]:
    dirs = [str(config._tmp_path_factory.getbasetemp())]
    reused = ("RT_TUNE_TEST_REUSE_STATE", "RT_TUNE_TEST_REUSE_ARM64_STATE")
    dirs += [os.environ[v] for v in reused if os.environ.get(v)]
    return [os.fsencode(str(Path(d).resolve())) + b"/" for d in dirs]


def _measured(item):
    needles = _needles(item.config)
    q0, own0 = _qemu_ticks(needles), _own_seconds()
    yield
    q1, own1 = _qemu_ticks(needles), _own_seconds()
    qemu = sum(t - q0.get(pid, 0) for pid, t in q1.items() if t >= q0.get(pid, 0)) / TICK
    item.user_properties.append(("cpu_s", round(qemu + own1 - own0, 2)))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    yield from _measured(item)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    yield from _measured(item)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item):
    yield from _measured(item)


class CpuAccount:
    """Collects the phases' CPU seconds from the reports (on the xdist controller too: the workers' reports
    carry their user_properties) and prints the summary."""

    def __init__(self) -> None:
        self.cpu: dict[str, dict[str, float]] = defaultdict(dict)  # nodeid -> phase -> CPU seconds
        self.wall: dict[str, float] = defaultdict(float)  # nodeid -> seconds

    def pytest_runtest_logreport(self, report):
        self.wall[report.nodeid] += report.duration
        for name, value in report.user_properties:
            if name == "cpu_s":
                self.cpu[report.nodeid][report.when] = value

    def pytest_terminal_summary(self, terminalreporter):
        from tests.conftest import lane

        if not self.cpu:
            return
        rows = sorted(((s, phase, nodeid) for nodeid, phases in self.cpu.items()
                       for phase, s in phases.items()), reverse=True)
        tr = terminalreporter
        tr.section(f"most CPU time: {TOP} test phases (pytest, its commands and its labs' QEMU)")
        for s, phase, nodeid in rows[:TOP]:
            tr.write_line(f"{s:8.1f} CPU-s {phase:<8} {nodeid}")
        lanes: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        for nodeid, phases in self.cpu.items():
            lanes[lane(nodeid)][0] += sum(phases.values())
        for nodeid, seconds in self.wall.items():
            lanes[lane(nodeid)][1] += seconds
        tr.write_line("per lane: " + ", ".join(f"{name} {cpu / 60:.1f} CPU-min in {wall / 60:.1f} min"
                                               for name, (cpu, wall) in sorted(lanes.items())))


def pytest_configure(config):
    config.pluginmanager.register(CpuAccount(), "rt-tune-cpu-account")
