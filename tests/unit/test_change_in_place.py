"""What counts as "in place" for the runtime changes whose live state the kernel or QEMU reshapes. The IRQ
states are rt-tune's own read() snapshots (not tool output), cut down from those the CI lab run of 2026-11-25
journaled on lab1-host: IRQs 32/33 (virtio1-req.0/1) were movable on the first boot and kernel-managed after a
reboot with isolcpus=managed_irq,1. The vCPU thread listings are recorded from the x86 lab host
(tests/recorded/lab-x86/README.md, "QEMU's threads for the vCPU map")."""

import json
from pathlib import Path

import pytest

from orchestrator.changes.irq_affinity import IrqAffinityChange
from orchestrator.changes.vcpu_pinning import VcpuPinningChange
from orchestrator.config.profile import describe_vcpu_map
from orchestrator.core.errors import InputError

pytestmark = pytest.mark.unit

RECORDED = Path(__file__).parent.parent / "recorded" / "lab-x86"
PRISTINE = json.loads((RECORDED / "host-vcpu-threads-pristine.json").read_text())
MAPPED = json.loads((RECORDED / "host-vcpu-threads-mapped.json").read_text())


def test_irq_that_the_kernel_manages_after_a_reboot_is_not_drift():
    change = IrqAffinityChange([0])
    before = {"irqs": {"24": "0-1", "25": "0", "32": "0-1", "33": "0-1"}, "fixed": ["25"], "unit": None,
              "enabled": False}
    desired = change.desired(before)
    assert desired["irqs"] == {"24": "0", "32": "0", "33": "0"}
    after_reboot = {"irqs": {"24": "0", "25": "0", "32": "0", "33": "1"}, "fixed": ["25", "32", "33"],
                    "unit": desired["unit"], "enabled": True}
    assert change.in_place(after_reboot, desired)
    moved_back = dict(after_reboot, irqs={**after_reboot["irqs"], "24": "0-1"})  # a movable IRQ off housekeeping
    assert not change.in_place(moved_back, desired)
    unit_gone = dict(after_reboot, enabled=False)  # would not survive the next reboot
    assert not change.in_place(unit_gone, desired)


def _state(listing: dict, files: dict | None = None) -> dict:
    threads = {k: listing[k] for k in ("main", "vcpus", "threads")}
    return {"threads": threads, "dropin": None, "script": None, "qa_copy": None, "unit_has_qemu_affinity": False,
            **(files or {})}


def test_the_vcpu_map_puts_the_guest_rt_vcpu_alone_on_the_isolated_cpu():
    """The guest's RT CPU 1 is vCPU 1: it goes to host CPU 1, vCPU 0 (the guest's housekeeping CPU) does not."""
    change = VcpuPinningChange("rt-guest-vm.service", {1: 1}, [0])
    before = _state(PRISTINE)
    desired = change.desired(before)
    assert not change.in_place(before, desired)
    assert set(change.misplaced(PRISTINE)) == {
        "vCPU 1: allowed on 0-1, want 1", "vCPU 0: allowed on 0-1, want housekeeping 0",
        "main loop: allowed on 0-1, want housekeeping 0", "qemu-system-x86: allowed on 0-1, want housekeeping 0",
        "IO mon_iothread: allowed on 0-1, want housekeeping 0"}
    live = _state(MAPPED, {k: desired[k] for k in ("dropin", "script", "qa_copy")})
    assert change.misplaced(MAPPED) == [] and change.in_place(live, desired)
    assert not change.in_place(dict(live, dropin=None), desired)  # would not survive a QEMU restart


def test_the_old_map_vcpu0_on_the_isolated_cpu_is_not_in_place():
    """What rt-tune did before (vCPU i -> i-th RT CPU: vCPU 0 on CPU 1, vCPU 1 floating) is drift now."""
    change = VcpuPinningChange("rt-guest-vm.service", {1: 1}, [0])
    old = json.loads(json.dumps(MAPPED))
    old["vcpus"]["0"]["cpus"], old["vcpus"]["1"]["cpus"] = "1", "0-1"
    assert set(change.misplaced(old)) == {"vCPU 1: allowed on 0-1, want 1", "vCPU 0: allowed on 1, want housekeeping 0"}
    stray = json.loads(json.dumps(MAPPED))
    stray["threads"]["IO mon_iothread"][0]["cpus"] = "0-1"  # an I/O thread allowed on the RT CPU
    assert change.misplaced(stray) == ["IO mon_iothread: allowed on 0-1, want housekeeping 0"]


def test_sched_fifo_is_part_of_the_map_when_asked():
    change = VcpuPinningChange("rt-guest-vm.service", {1: 1}, [0], rt_priority=1)
    assert change.misplaced(MAPPED) == ["vCPU 1: other 0, want fifo 1"]
    fifo = json.loads(json.dumps(MAPPED))
    fifo["vcpus"]["1"].update(policy="fifo", prio=1)
    assert change.misplaced(fifo) == []
    assert b"--fifo 1" in change._dropin_bytes()


def test_the_dropin_repins_with_the_whole_map():
    change = VcpuPinningChange("robot-vm.service", {3: 3, 1: 1, 2: 2}, [0])
    assert change._dropin_bytes().decode().endswith(
        "ExecStartPost=-/usr/local/sbin/rt-tune-pin-vcpus $MAINPID --map 1:1,2:2,3:3 --housekeeping 0\n")


@pytest.mark.parametrize("args, message", [
    (({}, [0]), "at least one guest vCPU"),
    (({1: 1}, []), "housekeeping CPUs"),
    (({1: 1, 2: 1}, [0]), "its own host CPU"),
    (({1: 1}, [0, 1]), "overlap"),
    (({1: 1}, [0], 100), "outside 1..99"),
])
def test_a_bad_map_is_refused(args, message):
    with pytest.raises(InputError, match=message):
        VcpuPinningChange("rt-guest-vm.service", *args)


def test_a_change_journaled_before_the_map_is_rebuilt_as_it_was_made():
    """{service, cpus} records (vCPU i -> cpus[i], other threads untouched) still verify and roll back."""
    change = VcpuPinningChange.from_params({"service": "rt-guest-vm.service", "cpus": [1]})
    assert change.vcpus == {0: 1} and change.housekeeping is None
    old_live = json.loads(json.dumps(PRISTINE))
    old_live["vcpus"]["0"]["cpus"] = "1"
    assert change.misplaced(old_live) == []  # the other threads were never rt-tune's then


def test_plan_line_names_the_map():
    text = describe_vcpu_map({"vcpus": {"1": 1}, "housekeeping": [0], "rt_priority": None})
    assert text == "vCPU 1 (guest RT CPU 1) -> host CPU 1; other vCPUs, main loop, I/O threads -> 0"


@pytest.mark.parametrize("service", ["rt-guest-vm.service\n", "dev-sda2.swap", "vm@.service", "-x.service", ""])
def test_the_qemu_service_must_be_a_service_unit(service):
    with pytest.raises(InputError, match="QEMU service name"):
        VcpuPinningChange(service, {1: 1}, [0])


def test_the_plan_names_the_map_against_the_live_vcpus():
    """`tune plan` shows which vCPU goes where, the other vCPUs by number as read from the unit's QEMU."""
    change = VcpuPinningChange("rt-guest-vm.service", {1: 1}, [0])
    others = sorted(int(v) for v in PRISTINE["vcpus"] if int(v) not in change.vcpus)
    assert change.describe(others) == ("pin the threads of rt-guest-vm.service: vCPU 1 (guest RT CPU 1) -> host "
                                       "CPU 1; vCPU 0, main loop, I/O threads -> 0")
    legacy = VcpuPinningChange.from_params({"service": "rt-guest-vm.service", "cpus": [1]})
    assert legacy.describe() == "pin the threads of rt-guest-vm.service: vCPU 0 (guest RT CPU 0) -> host CPU 1"
