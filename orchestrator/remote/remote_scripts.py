"""rt-tune's own programs that run on a unit, kept as real files under remote/scripts/ (shipped as package data,
read by linters) and where rt-tune installs them on a unit."""

from __future__ import annotations

from pathlib import Path

SCRIPTS_DIR = Path(__file__).resolve().parent / "scripts"

#: where the vCPU map's helper is installed on a host (run by systemd's ExecStartPost at every QEMU start)
PIN_SCRIPT = "/usr/local/sbin/rt-tune-pin-vcpus"
#: qemu-affinity, installed by rt-tune when the unit has none (removed with the change)
QA_COPY = "/usr/local/lib/rt-tune/qemu_affinity.py"


def load_script(name: str) -> str:
    """The text of remote/scripts/NAME."""
    return (SCRIPTS_DIR / name).read_text(encoding="utf-8")


#: `rt-tune-pin-vcpus`: pins a QEMU's threads to the vCPU map (and, with --list, only reads them)
PIN_VCPUS = load_script("pin_vcpus.py").replace("@QA_COPY@", QA_COPY)
#: one measurement run in one round trip: tools checked, boot and cmdline read, load started, cyclictest, load stopped
MEASURE_RUN = load_script("measure_run.sh")
#: whether a host has the tracepoint that counts its guests' system-register traps (measure_run.sh's sysreg step)
SYSREG_TRACEPOINT_SCRIPT = load_script("sysreg_tracepoint.sh")
