"""Controller cost per unit for a large simulated fleet: `tune rollout`'s real code (FleetRunner, Engine.apply,
SysctlChange, the measurement runner, cyclictest's parser, the decision rule, a real SQLite journal with its
claims and locks) over a SIMULATED transport.

The simulated transport is rt-tune's own in-memory unit (orchestrator/remote/fake.py, the one the engine's unit
tests use) and stands in for SSH only: each unit is an in-memory /proc/sys and /etc/sysctl.d; every command
costs a network round trip (sleep), a connection costs a handshake, and "cyclictest" sleeps for its run and
answers with a REAL cyclictest output recorded on the lab guest (tests/recorded/cyclictest/lab/, see its
README); the pre-run probe answers with a lab host's recorded boot_id and /proc/cmdline. Nothing else is faked.
What is measured is the controller process: CPU seconds and resident memory.
"""

from __future__ import annotations

import os
import resource
import tempfile
import time
from pathlib import Path

from orchestrator.config.inventory import Inventory
from orchestrator.config.playbook import RolloutPolicy
from orchestrator.journal.journal import Journal
from orchestrator.measure.model import CyclictestSettings, LoadSpec
from orchestrator.remote.fake import FakeTransport, FakeUnit
from orchestrator.run.engine import Engine
from orchestrator.run.fleet import FleetRunner
from orchestrator.stats.decide import DecisionRule, MeasurementPlan

REPO = Path(__file__).resolve().parents[2]
RECORDED = sorted((REPO / "tests" / "recorded" / "cyclictest" / "lab").glob("guest-stress-h20000-run*.txt"))
PROFILE = REPO / "tests" / "fleet" / "profile-fleet.yaml"
# what a lab host answered (tests/recorded/lab-x86/README.md), replayed by the simulated measurement run
RECORDED_BOOT_ID = (REPO / "tests" / "recorded" / "lab-x86" / "host-boot_id.txt").read_text().strip()
RECORDED_CMDLINE = (REPO / "tests" / "recorded" / "lab-x86" / "host-proc-cmdline.txt").read_text().strip()


def _rss_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    return 0


def run_scale(n_units: int = 1000, *, max_in_flight: int = 100, rtt_ms: float = 20.0, connect_ms: float = 150.0,
              cyclictest_s: float = 0.5) -> dict:
    """Roll the fleet profile out to `n_units` simulated units; the controller's CPU and memory per unit."""
    outputs_text = [p.read_text() for p in RECORDED]
    units = {f"u{i:04d}": FakeUnit(files={"/proc/sys/kernel/timer_migration": b"1\n"}, boot_id=RECORDED_BOOT_ID,
                                   cmdline=RECORDED_CMDLINE, programs={"cyclictest", "systemd-run"},
                                   cyclictest_outputs=[outputs_text[i % len(outputs_text)]])  # one recorded run each
             for i in range(n_units)}

    def connect(inv, unit, target):
        time.sleep(connect_ms / 1000)
        return FakeTransport(units[unit], unit, rtt_s=rtt_ms / 1000, run_s=cyclictest_s)

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
