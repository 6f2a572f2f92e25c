"""Record the x86 lab guest's run-to-run latency noise over several boots and hours (issue #18's noise data).

Usage: RT_TUNE_STATE=DIR python tests/recorded/noise-lab-x86/record.py [--boots 3] [--runs-per-boot 18]
       [--every 120] [--histogram-us 100000] [--out tests/recorded/noise-lab-x86]

Each run is the product's own measurement path (orchestrator.measure.runner.measure: one round trip, the load as a
transient unit, cyclictest as another) with the cyclictest settings and load of playbooks/measurement.yaml (20 s
runs at 1 kHz on guest CPU 1 under stress-ng; the histogram 100 ms wide unless told), started every `--every`
seconds. Between boots the lab is reset with `tune lab reset --cold` (fresh disks, a real boot: a new boot_id), so
the runs show the boot-to-boot effect as well as the spread and the drift within a boot. Writes, per run,
`bootB/runNN.json` (the LatencyResult measure() returns: its parse of cyclictest's output plus the boot_id, cmdline,
start time and duration) and `bootB/runNN-cyclictest.txt.xz` (cyclictest's unchanged stdout, xz-compressed: a
-h100000 histogram is mostly zero rows, 1.4 MB raw, about 25 kB as xz). Files appear as runs finish, so a partial
recording is usable.
"""

from __future__ import annotations

import argparse
import lzma
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))

from orchestrator.config.inventory import load_inventory  # noqa: E402
from orchestrator.config.playbook import load_measurement_plan  # noqa: E402
from orchestrator.core.paths import Paths, default_inventory  # noqa: E402
from orchestrator.measure.runner import measure  # noqa: E402
from orchestrator.remote.ssh import SSHTransport  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--boots", type=int, default=3)
    ap.add_argument("--runs-per-boot", type=int, default=18)
    ap.add_argument("--every", type=float, default=120.0)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    ap.add_argument("--first-boot", type=int, default=1)
    # the playbook's 20 ms histogram cuts the lab guest's p99.9 off when the machine is busy: record wider
    ap.add_argument("--histogram-us", type=int, default=100_000)
    args = ap.parse_args()
    plan = load_measurement_plan(REPO / "playbooks" / "measurement.yaml")
    plan = plan.model_copy(update={"cyclictest": plan.cyclictest.model_copy(
        update={"histogram_us": args.histogram_us})})
    paths = Paths.from_env()
    tune = [sys.executable, "-m", "orchestrator"]
    for boot in range(args.first_boot, args.first_boot + args.boots):
        subprocess.run([*tune, "lab", "reset", "--cold"], check=True, cwd=REPO)
        inv = load_inventory(default_inventory(paths))
        folder = args.out / f"boot{boot}"
        folder.mkdir(parents=True, exist_ok=True)
        start = time.monotonic()
        for i in range(1, args.runs_per_boot + 1):
            wait = start + (i - 1) * args.every - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            with tempfile.TemporaryDirectory() as tmp, SSHTransport(inv.endpoint("lab1", "guest")) as t:
                res = measure(t, plan.cyclictest, plan.load, target="lab1.guest", artifacts=Path(tmp))
                raw = Path(res.raw_artifact or "")
                with raw.open("rb") as src, lzma.open(folder / f"run{i:02d}-cyclictest.txt.xz", "wb") as dst:
                    shutil.copyfileobj(src, dst)
            public = res.model_copy(update={"raw_artifact": f"run{i:02d}-cyclictest.txt.xz"})
            (folder / f"run{i:02d}.json").write_text(public.model_dump_json(indent=1) + "\n")
            print(f"boot {boot} run {i}: p99.9 {res.all.p999_us} us, max {res.all.max_us} us, "
                  f"{res.all.samples} samples", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
