"""Controller cost per unit for a large simulated fleet: `tune rollout`'s real code (FleetRunner, Engine.apply,
SysctlChange, the measurement runner, cyclictest's parser, the decision rule, a real SQLite journal with its
claims and locks) over a SIMULATED transport.

The simulated transport stands in for SSH only: each unit is an in-memory /proc/sys and /etc/sysctl.d; every
command costs a network round trip (sleep), a connection costs a handshake, and "cyclictest" sleeps for its run
and answers with a REAL cyclictest output recorded on the lab guest (tests/recorded/cyclictest/lab/, see its
README); the pre-run probe answers with a lab host's recorded boot_id and /proc/cmdline. Nothing else is faked.
What is measured is the controller process: CPU seconds and resident memory.
"""

from __future__ import annotations

import base64
import itertools
import os
import resource
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.config.inventory import Inventory
from orchestrator.journal.journal import Journal
from orchestrator.measure.model import CyclictestSettings, LoadSpec
from orchestrator.remote.transport import CommandResult
from orchestrator.run.engine import Engine
from orchestrator.run.fleet import FleetRunner, RolloutPolicy
from orchestrator.stats.decide import DecisionRule, MeasurementPlan

REPO = Path(__file__).resolve().parents[2]
RECORDED = sorted((REPO / "tests" / "recorded" / "cyclictest" / "lab").glob("guest-stress-h20000-run*.txt"))
PROFILE = REPO / "tests" / "fleet" / "profile-fleet.yaml"
# what a lab host answered (tests/recorded/lab-x86/README.md), replayed by the simulated measurement run
RECORDED_BOOT_ID = (REPO / "tests" / "recorded" / "lab-x86" / "host-boot_id.txt").read_text()
RECORDED_CMDLINE = (REPO / "tests" / "recorded" / "lab-x86" / "host-proc-cmdline.txt").read_text()


@dataclass
class SimUnit:
    """One simulated unit's state: the files the sysctl change reads and writes."""

    files: dict[str, bytes] = field(default_factory=lambda: {"/proc/sys/kernel/timer_migration": b"1\n"})


@dataclass
class SimTransport:
    """The Transport protocol over a SimUnit, with a round-trip delay per command (as SSH on a LAN)."""

    unit: SimUnit
    name: str
    rtt_s: float
    cyclictest_s: float
    outputs: itertools.cycle

    @property
    def label(self) -> str:
        return f"sim:{self.name}"

    def _ok(self, argv, stdout: str = "") -> CommandResult:
        return CommandResult(argv=tuple(argv), exit_status=0, stdout=stdout, stderr="", duration_s=self.rtt_s)

    def run(self, argv, *, timeout_s=60.0, check=True, stdin=None, sudo=None) -> CommandResult:
        time.sleep(self.rtt_s)
        argv = list(argv)
        if argv[:2] == ["sh", "-c"] and "boot_id" in argv[2]:  # a measurement run: preamble, then cyclictest
            time.sleep(self.cyclictest_s)
            return self._ok(argv, "@@\n" + RECORDED_BOOT_ID + "@@\n" + RECORDED_CMDLINE + "@@\n"
                            + next(self.outputs))
        if argv[:2] == ["sh", "-c"] and "present" in argv[2]:  # read_files: "absent" or "present BASE64"
            marker, lines = argv[4], []  # the answer sits between two copies of the caller's marker line
            for path in argv[5:]:
                content = self.unit.files.get(path)
                lines.append("absent" if content is None else "present " + base64.b64encode(content).decode())
            return self._ok(argv, "".join(line + "\n" for line in [marker, *lines, marker]))
        if argv[0] == "sysctl":
            name, _, value = argv[-1].partition("=")
            self.unit.files["/proc/sys/" + name.replace(".", "/")] = (value + "\n").encode()
            return self._ok(argv)
        if argv[:2] == ["rm", "-f"]:
            self.unit.files.pop(argv[-1], None)
            return self._ok(argv)
        if argv[0] in ("mkdir", "systemctl", "systemd-run"):
            return self._ok(argv)
        raise AssertionError(f"the simulation does not know {argv!r}")

    def read_file(self, path: str) -> bytes:
        time.sleep(self.rtt_s)
        return self.unit.files[path]

    def write_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        time.sleep(self.rtt_s)
        self.unit.files[path] = bytes(data)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _rss_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    return 0


def run_scale(n_units: int = 1000, *, max_in_flight: int = 100, rtt_ms: float = 20.0, connect_ms: float = 150.0,
              cyclictest_s: float = 0.5) -> dict:
    """Roll the fleet profile out to `n_units` simulated units; the controller's CPU and memory per unit."""
    outputs_text = [p.read_text() for p in RECORDED]
    units = {f"u{i:04d}": SimUnit() for i in range(n_units)}
    lock = threading.Lock()
    cycle = itertools.cycle(outputs_text)

    def connect(inv, unit, target):
        time.sleep(connect_ms / 1000)
        with lock:
            outputs = itertools.cycle([next(cycle)])  # each connection replays one recorded run
        return SimTransport(units[unit], unit, rtt_ms / 1000, cyclictest_s, outputs)

    inv = Inventory.model_validate({"units": {u: {"host": {"address": "sim.invalid"}, "vars": {"cpus": 2}}
                                              for u in units}})
    plan = MeasurementPlan(
        cyclictest=CyclictestSettings(cpus=[1], priority=95, interval_us=1000, duration_s=20, mlockall=True,
                                      histogram_us=20000, policy="fifo"),
        load=LoadSpec(kind="none"),
        decision=DecisionRule(k_min=2, k_max=2, looks=1, confidence=0.5, run_duration_s=20, inconclusive="keep"))
    with tempfile.TemporaryDirectory(prefix="rt-tune-scale-") as tmp:
        journal = Journal(Path(tmp) / "journal.sqlite")
        artifacts = Path(tmp) / "artifacts"

        def engine_for(unit, sink):
            return Engine(inventory=inv, journal=journal, plan=plan, artifacts=artifacts / unit, events=sink,
                          connect=connect)

        policy = RolloutPolicy(canary=1, batch="10%", max_in_flight=max_in_flight, max_fail_percent=0,
                               regression={})
        runner = FleetRunner(journal=journal, policy=policy, engine_for=engine_for, poll_s=0.2)
        rss0 = _rss_kib("VmRSS")
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        rid = runner.create(PROFILE, Path(tmp) / "inventory.yaml", list(units)).id
        summary = runner.run(rid)
        wall = time.perf_counter() - t0
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        hwm = _rss_kib("VmHWM")
        rss1 = _rss_kib("VmRSS")
        journal_bytes = sum(f.stat().st_size for f in Path(tmp).glob("journal.sqlite*"))
        journal.close()
    done = sum(u["state"] == "done" for u in summary.units)
    if done != n_units:
        failed = [u for u in summary.units if u["state"] != "done"][:3]
        raise RuntimeError(f"the simulated rollout did not finish every unit ({done}/{n_units}): {failed}")
    applied = sum(u.files.get("/proc/sys/kernel/timer_migration") == b"0\n" for u in units.values())
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    return {
        "units": n_units, "done": done, "changed_on_units": applied, "status": summary.status,
        "max_in_flight": max_in_flight, "rtt_ms": rtt_ms, "connect_ms": connect_ms, "cyclictest_s": cyclictest_s,
        "runs_per_unit": 4, "wall_s": round(wall, 1), "cpu_s": round(cpu, 2),
        "cpu_ms_per_unit": round(cpu * 1000 / n_units, 2),
        "rss_start_mib": round(rss0 / 1024, 1), "rss_end_mib": round(rss1 / 1024, 1),
        "rss_peak_mib": round(hwm / 1024, 1),
        "rss_growth_kib_per_unit": round((rss1 - rss0) / n_units, 1),
        "journal_kib_per_unit": round(journal_bytes / 1024 / n_units, 1),
        "transport": "SIMULATED (in-memory units, sleeps for round trips; recorded real cyclictest output)",
        "pid": os.getpid(),
    }


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run_scale(int(sys.argv[1]) if len(sys.argv) > 1 else 1000), indent=2))
