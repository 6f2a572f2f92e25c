"""Record rt-tune's own counter reads with the system-register trap step from a running arm64 lab (how the
`reads-*.txt` files beside this script were made).

Usage: RT_TUNE_STATE=DIR python tests/recorded/counters/sysreg/record_reads.py
For each of two windows (the nested guest busy: `stress-ng --cpu 2` for 5 s; quiet: `sleep 5`), on lab1.host:
`read_counters(tids, sysreg=("start", I))`, the window in the guest, `read_counters(tids, sysreg=("stop", I))`.
Writes reads-<window>-start.txt, reads-<window>-stop.txt (the unchanged stdout), reads-<window>-meta.txt (the
marker of each read, the vCPU thread ids, the instance), and checks that no instance is left behind. Not a test.
"""

from __future__ import annotations

from pathlib import Path

from orchestrator.config.inventory import load_inventory, split_target
from orchestrator.core.paths import Paths, default_inventory
from orchestrator.facts.qemu import QEMU_PROCESSES
from orchestrator.measure.counters import counters_argv, marker, parse_counters_output, sysreg_instance
from orchestrator.remote.ssh import SSHTransport

HERE = Path(__file__).resolve().parent


def transport(target: str) -> SSHTransport:
    inv = load_inventory(default_inventory(Paths.from_env()))
    unit, role = split_target(target)
    return SSHTransport(inv.endpoint(unit, role))


def main() -> None:
    with transport("lab1.host") as host, transport("lab1.guest") as guest:
        tids = sorted(v.tid for p in QEMU_PROCESSES.gather(host) for v in p.vcpus)
        for window, argv in (("busy", ["stress-ng", "--cpu", "2", "--timeout", "5", "--quiet"]),
                             ("quiet", ["sleep", "5"])):
            inst = sysreg_instance()
            marks = []
            for step in ("start", "stop"):
                if step == "stop":
                    guest.run(argv, timeout_s=60)
                mark = marker()
                res = host.run(counters_argv(mark, tids, (step, inst)), timeout_s=60)  # type: ignore[arg-type]
                snap = parse_counters_output(res.stdout, mark)
                (HERE / f"reads-{window}-{step}.txt").write_text(res.stdout)
                marks.append(mark)
                sysreg = {k: v for k, v in snap.counters.items() if k.startswith("sysreg:")}
                print(window, step, "errors:", snap.errors, "sysreg:", sysreg)
            (HERE / f"reads-{window}-meta.txt").write_text(
                f"start-marker {marks[0]}\nstop-marker {marks[1]}\ntids {' '.join(map(str, tids))}\n"
                f"instance {inst}\n")
        left = host.run(["sh", "-c", "ls /sys/kernel/tracing/instances"]).stdout.split()
        print("instances left:", left)
        assert not [i for i in left if i.startswith("rt-tune-sysreg-")], left


if __name__ == "__main__":
    main()
