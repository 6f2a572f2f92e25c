"""Records `systemctl cat` of a QEMU service through QemuAppendBackend's whole cycle on a real systemd (the
lab host VM), into tests/recorded/boot/qemu-append/. See README.md beside this file.

    RT_TUNE_STATE=/var/tmp/boot-rec-lab .venv/bin/python tests/recorded/boot/record_qemu_append.py

Boots (or reuses) a host-only lab in that state directory, installs rtvm.service and 10-rt.conf from this
directory on lab1-host (the unit is never started), runs stage -> commit -> stage -> discard -> restore with
the real backend over SSH, records `systemctl cat` after each step, removes everything it installed and stops
the lab it started.
"""

from __future__ import annotations

import sys
from pathlib import Path

from orchestrator.boot.loader import BootTarget
from orchestrator.boot.qemu_append import QemuAppendBackend, append_value
from orchestrator.core.paths import Paths
from orchestrator.lab.lab import Lab
from orchestrator.remote.ssh import SSHTransport

HERE = Path(__file__).resolve().parent / "qemu-append"
UNIT = "/etc/systemd/system/rtvm.service"
DROPIN = "/etc/systemd/system/rtvm.service.d/10-rt.conf"
FIRST = BootTarget(add={"isolcpus": "1-3", "nohz_full": "1-3", "rcu_nocbs": "1-3"})
SECOND = BootTarget(add={"nosoftlockup": None})


def main() -> int:
    lab = Lab(Paths.from_env(), events=lambda e: print(f"[lab] {e.subject}: {e.message}", flush=True))
    started = lab.load_state() is None
    state = lab.up(units=1, host_only=True)
    rec = lab.record(state, "lab1-host")
    with SSHTransport(lab.endpoint(rec)) as t:

        def cat(name: str) -> str:
            out = t.run(["systemctl", "cat", "--no-pager", "rtvm.service"]).stdout
            (HERE / name).write_text(out)
            return out

        def show(name: str) -> str:
            out = t.run(["systemctl", "show", "-p", "ExecStart", "--value", "rtvm.service"]).stdout
            (HERE / name).write_text(out)
            return out

        try:
            t.run(["mkdir", "-p", "/etc/systemd/system/rtvm.service.d"])
            t.write_file(UNIT, (HERE / "rtvm.service").read_bytes())
            t.write_file(DROPIN, (HERE / "10-rt.conf").read_bytes())
            t.run(["systemctl", "daemon-reload"])
            b = QemuAppendBackend("rtvm.service")
            initial = cat("cat-0-initial.txt")
            show("show-execstart-0-initial.txt")
            snap = b.snapshot(t)
            print("preflight:", b.preflight(t))
            b.stage_trial(t, FIRST)
            cat("cat-1-trial.txt")
            show("show-execstart-1-trial.txt")
            b.commit(t, FIRST)
            committed = cat("cat-2-committed.txt")
            show("show-execstart-2-committed.txt")
            print("committed():", b.committed(t, FIRST))
            b.stage_trial(t, SECOND)
            cat("cat-3-committed-and-trial.txt")
            b.discard(t)
            assert cat("cat-4-after-discard.txt") == committed, (
                "discard did not return to the committed state"
            )
            b.restore(t, snap)
            assert cat("cat-5-after-restore.txt") == initial, "restore did not return to the initial state"
            assert append_value(b.command(t)) == "console=ttyAMA0 root=/dev/vda rw quiet panic=10"
            missing = t.run(["systemctl", "cat", "--no-pager", "rt-tune-no-such.service"], check=False)
            (HERE / "cat-missing-unit.stdout").write_text(missing.stdout)
            (HERE / "cat-missing-unit.stderr").write_text(missing.stderr)
            (HERE / "cat-missing-unit.rc").write_text(f"{missing.exit_status}\n")
            (HERE / "systemd-version.txt").write_text(t.run(["systemctl", "--version"]).stdout)
        finally:
            t.run(
                [
                    "rm",
                    "-rf",
                    "--",
                    UNIT,
                    "/etc/systemd/system/rtvm.service.d",
                    "/run/systemd/system/rtvm.service.d",
                ],
                check=False,
            )
            t.run(["systemctl", "daemon-reload"], check=False)
    if started:
        lab.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
