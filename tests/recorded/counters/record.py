"""Record the mechanism counters' raw output from a running x86 lab (how the files beside this script were made).

Usage: RT_TUNE_STATE=DIR python tests/recorded/counters/record.py STEP
  STEP is one of:
  guest-read    `read_counters` on lab1.guest (one snapshot): guest-read.txt + guest-read-marker.txt
  host-read     `read_counters` on lab1.host with the vCPU thread ids of its QEMU (facts/qemu.py):
                host-read.txt + host-read-marker.txt + host-read-tids.txt
  guest-run     one measurement run on lab1.guest as measure() makes it (cyclictest 1 s on CPU 1, no load),
                with the counters: guest-run.txt + guest-run-marker.txt
  cost N        timing only, read-only, nothing written: N x (a trivial command, read_counters) round trips on
                lab1.guest, then inside the guest N snapshots against N `sh -c true`
  cost-runs     timing only: one run without the counters (the script before them, from git) and one with

Every file is the unchanged stdout of the argv measure/ sends, over SSH as the runner sends it (the transport's
default user: the lab's inventory logs in as root). Read-only on the unit apart from the 1 s cyclictest runs.
Not a test (pytest does not collect it).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from orchestrator.config.inventory import load_inventory, split_target
from orchestrator.core.paths import Paths, default_inventory
from orchestrator.facts.qemu import QEMU_PROCESSES
from orchestrator.measure.counters import counters_argv, marker, parse_counters_output
from orchestrator.measure.model import CyclictestSettings, LoadSpec
from orchestrator.measure.runner import (
    _transient,
    _unit_name,
    cyclictest_argv,
    measure_tools,
    run_under_load,
)
from orchestrator.remote.remote_scripts import MEASURE_RUN
from orchestrator.remote.ssh import SSHTransport

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent.parent
# times N snapshots ($2 = the script) and N `sh -c true` by /proc/uptime inside the unit: "SNAPSHOTS TRUES" seconds
IN_UNIT = ('up() { read -r u _ < /proc/uptime; echo "$u"; }; n=$1; s=$2; '
           'a=$(up); i=0; while [ $i -lt "$n" ]; do sh -c "$s" - @@m 0 0 0 - 0 - >/dev/null; i=$((i+1)); done; '
           'b=$(up); i=0; while [ $i -lt "$n" ]; do sh -c true; i=$((i+1)); done; c=$(up); '
           'echo "snapshots $a..$b true $b..$c"')


class Keep:
    """A transport that keeps the last result (run_under_load returns the parsed answer only)."""

    def __init__(self, t: SSHTransport) -> None:
        self.t, self.last = t, None
        self.label = t.label

    def run(self, argv, **kw):
        self.last = self.t.run(argv, **kw)
        return self.last


def transport(target: str) -> SSHTransport:
    inv = load_inventory(default_inventory(Paths.from_env()))
    unit, role = split_target(target)
    return SSHTransport(inv.endpoint(unit, role))


def one_run(t, settings: CyclictestSettings, script_argv_of=None):
    load = LoadSpec(kind="none", settle_s=0)
    command = _transient(_unit_name("cyclictest"), settings.duration_s + 60, cyclictest_argv(settings), wait=True)
    if script_argv_of is None:
        keep = Keep(t)
        start = time.monotonic()
        out = run_under_load(keep, measure_tools(load), None, "-", 0, command, timeout_s=120)
        return time.monotonic() - start, keep.last, out
    start = time.monotonic()
    res = t.run(script_argv_of(measure_tools(load), command), timeout_s=120, check=False)
    return time.monotonic() - start, res, None


def main() -> None:
    step = sys.argv[1]
    settings = CyclictestSettings(cpus=[1], duration_s=1)
    if step in ("guest-read", "host-read"):
        vm = step.split("-")[0]
        with transport(f"lab1.{vm}") as t:
            tids: list[int] = []
            if vm == "host":
                procs = QEMU_PROCESSES.gather(t)
                tids = sorted(v.tid for p in procs for v in p.vcpus)
                (HERE / "host-read-tids.txt").write_text(" ".join(map(str, tids)) + "\n")
            mark = marker()
            res = t.run(counters_argv(mark, tids), timeout_s=60)
            snap = parse_counters_output(res.stdout, mark)  # a recording must parse
            (HERE / f"{step}.txt").write_text(res.stdout)
            (HERE / f"{step}-marker.txt").write_text(mark + "\n")
            print(step, len(res.stdout), "bytes,", len(snap.counters), "keys, errors:", snap.errors, "tids:", tids)
    elif step == "guest-run":
        with transport("lab1.guest") as t:
            seconds, res, out = one_run(t, settings)
            mark = res.argv[4] if res.argv[:2] == ("sh", "-c") else None
            (HERE / "guest-run.txt").write_text(res.stdout)
            (HERE / "guest-run-marker.txt").write_text(f"{mark}\n")
            d = out.counter_deltas()
            print(f"{seconds:.2f} s, exit {res.exit_status}, interval {d.interval_s}, {len(d.deltas)} deltas, "
                  f"issues {d.issues}, notes {d.notes}")
    elif step == "cost":
        n = int(sys.argv[2])
        with transport("lab1.guest") as t:
            t.run(["true"], timeout_s=30)  # connected before timing
            trivial, reads = [], []
            for _ in range(n):
                s = time.monotonic()
                t.run(["true"], timeout_s=30)
                trivial.append(time.monotonic() - s)
                s = time.monotonic()
                t.run(counters_argv(marker()), timeout_s=30)
                reads.append(time.monotonic() - s)
            print("trivial round trip s:", " ".join(f"{x:.3f}" for x in trivial))
            print("read_counters round trip s:", " ".join(f"{x:.3f}" for x in reads))
            # inside the guest, without SSH: N snapshots (the script with no command) against N `sh -c true`
            res = t.run(["sh", "-c", IN_UNIT, "-", str(n), MEASURE_RUN], timeout_s=120)
            print("in the unit, seconds by /proc/uptime for", n, "of each:", res.stdout.strip())
    elif step == "cost-runs":
        # the script as it was before the counters (commit f5956f9)
        old = subprocess.run(["git", "-C", str(REPO), "show", "f5956f9:orchestrator/remote/scripts/measure_run.sh"],
                             check=True, capture_output=True, text=True).stdout
        with transport("lab1.guest") as t:
            t.run(["true"], timeout_s=30)
            without, res, _ = one_run(t, settings, lambda tools, command: [
                "sh", "-c", old, "-", str(len(tools)), "0", "0", "-", *tools, *command])
            print(f"run without counters: {without:.3f} s (exit {res.exit_status})")
            with_, res, _ = one_run(t, settings)
            print(f"run with counters: {with_:.3f} s (exit {res.exit_status})")
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
