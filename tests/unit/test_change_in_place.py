"""What counts as "in place" after a reboot, for the runtime changes whose live state the kernel reshapes at
boot. The states are rt-tune's own read() snapshots (not tool output), cut down from those the CI lab run of
2026-11-25 journaled on lab1-host: IRQs 32/33 (virtio1-req.0/1) were movable on the first boot and kernel-managed
after a reboot with isolcpus=managed_irq,1; vCPU "CPU 1" restarted with affinity [0]."""

import pytest

from orchestrator.changes import IrqAffinityChange, VcpuPinningChange

pytestmark = pytest.mark.unit


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


def test_only_the_pinned_vcpus_are_compared():
    change = VcpuPinningChange("rt-guest-vm.service", [1])
    before = {"affinity": {"CPU 0": [0, 1], "CPU 1": [0, 1]}, "dropin": None, "script": None, "qa_copy": None,
              "unit_has_qemu_affinity": False}
    desired = change.desired(before)
    live = {**before, **{k: desired[k] for k in ("dropin", "script", "qa_copy")},
            "affinity": {"CPU 0": [1], "CPU 1": [0]}}  # CPU 1 restarted on the housekeeping CPU (isolcpus=1)
    assert change.in_place(live, desired)
    assert not change.in_place(dict(live, affinity={"CPU 0": [0, 1], "CPU 1": [0]}), desired)
    assert not change.in_place(dict(live, dropin=None), desired)
