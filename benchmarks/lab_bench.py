"""How fast the lab boots and resets, per VM kind: what the CI budget (issue #16) is made of.

    .venv/bin/python benchmarks/lab_bench.py [--arch amd64|arm64|all] [--repeat 3] [--json]

Runs its own lab (a private RT_TUNE_STATE; the image cache is the user's, built first if needed) and times,
`--repeat` times each (the median is the figure, min and max beside it):

  ssh_alone        a VM started on fresh disks with no other lab VM running, until SSH answers with its host key
  ssh_with_sibling both VMs of the unit started together on fresh disks (the x86 unit), each one's time to SSH
  reboot           `systemctl reboot` inside the VM until SSH answers on a new boot_id (the arm64 host: until its
                   nested guest answers too)
  cold_reset       `Lab.reset(cold=True)`: stop, fresh overlay and UEFI vars, boot, snapshot (the old path)
  snapshot_reset   `Lab.reset()`: restore the pristine snapshot (disk and RAM), resync the clock, check the
                   host key and boot_id
  idle CPU         after the first boot has settled (30 s; 90 s on arm64, whose nested guest was still booting
                   its services 30 s after it answered: 23.7% then, 7% minutes later), the VM's QEMU process's CPU
                   time over 30 s, as % of one host CPU: what an idle lab takes from the tests beside it (the arm64
                   host's QEMU runs its nested guest too)

The peer is the cold reset, measured in the same run: the table shows snapshot_reset / cold_reset.
Goals (issue #16): an x86 VM alone at SSH <= 20 s, a snapshot reset <= 10 s, an arm64 host reboot with its
nested guest back <= 120 s. Numbers are for this machine kind (2 CPUs, TCG); the boot phases inside the VM
(`systemd-analyze`) are printed per kind as well.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchestrator.boot.loader import one_second_later  # noqa: E402
from orchestrator.core.events import Event  # noqa: E402
from orchestrator.core.paths import Paths  # noqa: E402
from orchestrator.facts.base import BOOT_ID
from orchestrator.lab import snapshot  # noqa: E402
from orchestrator.lab.lab import Lab  # noqa: E402
from orchestrator.remote.ssh import SSHTransport  # noqa: E402

GOALS = {("amd64", "ssh_alone"): 20.0, ("any", "snapshot_reset"): 10.0, ("arm64-host", "reboot"): 120.0}


def _quiet(_event: Event) -> None:
    pass


def _fresh_start(lab: Lab, names: list[str]) -> dict[str, float]:
    """Start `names` together on fresh disks (a cold reset); each one's seconds to SSH."""
    t0 = time.monotonic()
    seen: dict[str, float] = {}
    lab.events = lambda e: seen.setdefault(e.subject, time.monotonic() - t0) if e.kind == "lab.vm.ssh" else None
    try:
        lab.reset(names, boot_timeout=900, cold=True)
    finally:
        lab.events = _quiet
    return {n: round(seen[n], 1) for n in names}


def _stop_all(lab: Lab) -> None:
    for rec in lab.load_state().vms:
        if not rec.nested_in:
            lab.kill(rec.name)


def _reboot(lab: Lab, name: str, also: list[str]) -> float:
    state = lab.load_state()
    names = [name, *also]
    old = {}
    for n in names:
        with SSHTransport(lab.endpoint(lab.record(state, n)), connect_deadline_s=30) as t:
            old[n] = BOOT_ID.gather(t)
    with SSHTransport(lab.endpoint(lab.record(state, name)), connect_deadline_s=30) as t:
        t0 = time.monotonic()
        t.run(one_second_later(["systemctl", "reboot"]))
    lab.wait_ssh(state, names, 900, old_boot_ids=old)
    return round(time.monotonic() - t0 - 1.0, 1)  # the reboot starts 1 s after the command


def cpu_seconds(stat: str, ticks_per_s: float) -> float:
    """User + system CPU seconds of a process from its /proc/PID/stat line (fields 14 and 15, counted after the
    command name, which is in parentheses and may hold spaces)."""
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / ticks_per_s


def _idle_cpu(lab: Lab, name: str, settle_s: float = 30.0, window_s: float = 30.0) -> float:
    """% of one host CPU that `name`'s QEMU process takes while the VM idles."""
    import os

    pid = lab.record(lab.load_state(), name).pid
    if pid is None:
        raise SystemExit(f"{name}: no QEMU process recorded")
    ticks = os.sysconf("SC_CLK_TCK")
    stat = Path(f"/proc/{pid}/stat")
    time.sleep(settle_s)
    a, t0 = cpu_seconds(stat.read_text(), ticks), time.monotonic()
    time.sleep(window_s)
    b, t1 = cpu_seconds(stat.read_text(), ticks), time.monotonic()
    return round(100.0 * (b - a) / (t1 - t0), 1)


def _timed(fn) -> float:
    t0 = time.monotonic()
    fn()
    return round(time.monotonic() - t0, 1)


def _analyze(lab: Lab, name: str) -> str:
    state = lab.load_state()
    with SSHTransport(lab.endpoint(lab.record(state, name)), connect_deadline_s=30) as t:
        return t.run(["systemd-analyze"], check=False).stdout.splitlines()[0].removeprefix("Startup finished in ")


def bench_arch(arch: str, repeat: int, progress) -> dict[str, dict[str, list[float]]]:
    """Every measurement for one architecture's unit: {vm kind: {measure: [seconds per repetition]}}."""
    with tempfile.TemporaryDirectory(prefix=f"rt-tune-lab-bench-{arch}-") as tmp:
        lab = Lab(Paths(cache=Paths.from_env().cache, state=Path(tmp)), events=_quiet)
        lab.up(units=1, arch=arch)
        kinds = {"amd64": {"amd64-host": "lab1-host", "amd64-guest": "lab1-guest"},
                 "arm64": {"arm64-host": "lab1-host"}}[arch]
        out: dict[str, dict[str, list[float]]] = {k: {} for k in kinds}
        analyze: dict[str, str] = {}
        idle: dict[str, list[float]] = {}
        try:
            for i in range(repeat):
                for kind, name in kinds.items():
                    progress(f"{arch} {i + 1}/{repeat}: {name} alone")
                    _stop_all(lab)
                    names = [name] + (["lab1-guest"] if arch == "arm64" else [])
                    out[kind].setdefault("ssh_alone", []).append(_fresh_start(lab, names)[names[-1]])
                    analyze[kind] = _analyze(lab, name)
                    progress(f"{arch} {i + 1}/{repeat}: {name} idle CPU")
                    idle.setdefault(kind, []).append(_idle_cpu(lab, name, settle_s=90.0 if arch == "arm64" else 30.0))
                    if arch == "arm64":
                        analyze["arm64-nested-guest"] = _analyze(lab, "lab1-guest")
                if arch == "amd64":
                    progress(f"{arch} {i + 1}/{repeat}: host and guest together")
                    _stop_all(lab)
                    both = _fresh_start(lab, ["lab1-host", "lab1-guest"])
                    out["amd64-host"].setdefault("ssh_with_sibling", []).append(both["lab1-host"])
                    out["amd64-guest"].setdefault("ssh_with_sibling", []).append(both["lab1-guest"])
                else:
                    _stop_all(lab)
                    lab.start("lab1-host", boot_timeout=900)
                    lab.wait_ssh(lab.load_state(), ["lab1-guest"], 900)
                for kind, name in kinds.items():
                    also = ["lab1-guest"] if arch == "arm64" else []
                    progress(f"{arch} {i + 1}/{repeat}: {name} reboot")
                    out[kind].setdefault("reboot", []).append(_reboot(lab, name, also))
                    progress(f"{arch} {i + 1}/{repeat}: {name} cold reset")
                    out[kind].setdefault("cold_reset", []).append(
                        _timed(lambda names=[name, *also]: lab.reset(names, boot_timeout=900, cold=True)))
                    if arch not in snapshot.RESTORABLE_ARCHES:
                        continue  # its resets boot (snapshot.RESTORABLE_ARCHES says why)
                    progress(f"{arch} {i + 1}/{repeat}: {name} snapshot reset")
                    events: list[Event] = []
                    lab.events = events.append
                    seconds = _timed(lambda names=[name, *also]: lab.reset(names))
                    lab.events = _quiet
                    if not any(e.kind == "lab.reset.restored" for e in events):
                        raise SystemExit(f"{name}: the snapshot reset booted instead: "
                                         + "; ".join(e.message for e in events))
                    out[kind].setdefault("snapshot_reset", []).append(seconds)
        finally:
            lab.down()
        for kind, text in analyze.items():
            out.setdefault(kind, {})["systemd_analyze"] = text  # type: ignore[assignment]
        for kind, values in idle.items():
            out[kind]["idle_cpu_pct"] = values
        return out


def summarize(results: dict[str, dict[str, object]]) -> list[dict[str, object]]:
    rows = []
    for kind, measures in results.items():
        cold = measures.get("cold_reset")
        for measure, values in measures.items():
            if measure in ("systemd_analyze", "idle_cpu_pct"):
                continue
            assert isinstance(values, list)
            median = statistics.median(values)
            goal = GOALS.get((kind, measure)) or GOALS.get((kind.split("-")[0], measure)) \
                or GOALS.get(("any", measure))
            row: dict[str, object] = {"kind": kind, "measure": measure, "median_s": median, "min_s": min(values),
                                      "max_s": max(values), "runs": values, "goal_s": goal,
                                      "meets_goal": None if goal is None else median <= goal}
            if measure == "snapshot_reset" and isinstance(cold, list):
                row["vs_cold_reset"] = round(median / statistics.median(cold), 3)
            rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", choices=["amd64", "arm64", "all"], default="all")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not 1 <= args.repeat <= 20:
        ap.error(f"--repeat: expected 1..20 (got {args.repeat})")
    arches = ["amd64", "arm64"] if args.arch == "all" else [args.arch]

    def progress(msg: str) -> None:
        print(f"[lab_bench] {msg}", file=sys.stderr, flush=True)

    results: dict[str, dict[str, object]] = {}
    for arch in arches:
        results.update(bench_arch(arch, args.repeat, progress))  # type: ignore[arg-type]
    rows = summarize(results)
    analyze = {k: v.get("systemd_analyze") for k, v in results.items() if v.get("systemd_analyze")}
    idle = {k: {"median_pct": statistics.median(v["idle_cpu_pct"]), "runs": v["idle_cpu_pct"]}  # type: ignore
            for k, v in results.items() if v.get("idle_cpu_pct")}
    if args.json:
        print(json.dumps({"repeat": args.repeat, "rows": rows, "systemd_analyze": analyze, "idle_cpu": idle},
                         indent=2))
        return 0
    print(f"{'VM kind':<14} {'measure':<17} {'median s':>9} {'min':>6} {'max':>6}  {'goal':>6}  note")
    for r in rows:
        goal = "" if r["goal_s"] is None else f"<={r['goal_s']:.0f}"
        note = "" if r["meets_goal"] is None else ("meets goal" if r["meets_goal"] else "MISSES goal")
        if "vs_cold_reset" in r:
            note += f"  {r['vs_cold_reset']:.3f}x the cold reset"
        print(f"{r['kind']:<14} {r['measure']:<17} {r['median_s']:>9.1f} {r['min_s']:>6.1f} {r['max_s']:>6.1f}  "
              f"{goal:>6}  {note}")
    print("\nidle CPU (the VM's QEMU, % of one host CPU, median):")
    for kind, v in idle.items():
        print(f"  {kind:<20} {v['median_pct']:.1f}%")
    print("\nsystemd-analyze (last boot of each kind):")
    for kind, text in analyze.items():
        print(f"  {kind:<20} {text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
