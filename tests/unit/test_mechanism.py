"""The mechanism each change kind declares, and the IRQ classes it counts, on /proc/interrupts recorded from the
x86 lab (tests/recorded/lab-x86) and the arm64 lab (tests/recorded/lab-arm64), whose row names differ."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.changes.mechanism import CMDLINE_MECHANISMS, irq_class, mechanisms_for
from orchestrator.facts.irqs import parse_interrupts, parse_irqs

REC = Path(__file__).resolve().parent.parent / "recorded"


def classes(irqs) -> dict[str, str | None]:
    return {i.irq: irq_class(i.irq, i.description, i.actions) for i in irqs}


def test_x86_rows_are_classified_by_what_the_kernel_prints():
    c = classes(parse_irqs((REC / "lab-x86" / "guest-facts-irqs.txt").read_text()))
    assert (c["CAL"], c["IWI"], c["RES"], c["TLB"], c["LOC"]) == (
        "function_call_ipi", "irq_work_ipi", "reschedule_ipi", "tlb_ipi", "local_timer")
    assert c["0"] is None  # the legacy PIT ("timer") is neither the local timer nor a device
    assert c["26"] == "device" and c["4"] == "device"  # virtio queues, the serial port
    assert c["NMI"] is None and c["ERR"] is None and c["MCP"] is None


@pytest.mark.parametrize("which", ["host", "guest"])
def test_arm64_rows_are_classified_by_description_and_handler(which):
    c = classes(parse_interrupts((REC / "lab-arm64" / f"{which}-proc-interrupts.txt").read_text()))
    assert (c["IPI0"], c["IPI1"], c["IPI5"]) == ("reschedule_ipi", "function_call_ipi", "irq_work_ipi")
    assert c["IPI2"] is None and c["IPI4"] is None  # CPU stop, timer broadcast: nothing declares them
    timers = [name for name, cls in c.items() if cls == "local_timer"]
    assert timers and all(name.isdigit() for name in timers)  # the arch_timer PPI, a numbered row
    assert "device" in c.values()


def test_each_kind_of_the_rt_profile_declares_its_mechanism():
    (svc,) = mechanisms_for("service_disable", {"unit": "mirobot_teleoperate.service"}, "host")
    assert svc.names == ("function_call_ipi", "irq_work_ipi") and svc.on == "target" and svc.cpus == "rt"
    tm = mechanisms_for("sysctl", {"name": "kernel.timer_migration", "value": "0"}, "host")
    assert tm[0].names == ("reschedule_ipi",)
    assert mechanisms_for("sysctl", {"name": "kernel/timer_migration", "value": "0"}, "host")  # the /proc/sys spelling
    assert mechanisms_for("sysctl", {"name": "vm.swappiness", "value": "10"}, "host") == ()  # nothing declared
    (pin,) = mechanisms_for("vcpu_pinning", {"cpus": [1]}, "host")
    assert (pin.source, pin.names, pin.on) == ("thread", ("nr_migrations",), "host")
    assert mechanisms_for("irq_affinity", {"housekeeping": [0]}, "host")[0].names == ("device",)
    (wfx,) = mechanisms_for("wfx_notrap", {}, "host")
    assert (wfx.source, wfx.on, set(wfx.names)) == ("kvm", "host", {"wfi_exit_stat", "wfe_exit_stat"})
    assert mechanisms_for("kernel", {"deb": "/x.deb"}, "host") == ()


def test_a_guest_change_that_removes_ipis_also_targets_the_sgi_register_traps_they_cost_the_host():
    sgi = "IPIs the guest sends (ICC_SGI1R_EL1 traps on the host)"
    for kind, params in (("service_disable", {"unit": "m.service"}),
                         ("sysctl", {"name": "kernel.timer_migration", "value": "0"}),
                         ("cmdline", {"add": {"isolcpus": "1", "nohz_full": "1"}})):
        guest = {m.label: m for m in mechanisms_for(kind, params, "guest")}
        host = [m.label for m in mechanisms_for(kind, params, "host")]
        assert sgi in guest and sgi not in host, kind  # a host change does not make its guest send fewer IPIs
        assert set(guest) - {sgi} == set(host), kind
        assert (guest[sgi].source, guest[sgi].on, guest[sgi].names) == ("sysreg", "host", ("ICC_SGI1R_EL1",))
    # GICv4.1 does not remove the trap (field notes section 1): vgic_v4_enable stays on the VM's exits
    (v4,) = mechanisms_for("cmdline", {"add": {"kvm-arm.vgic_v4_enable": "1"}}, "guest")
    assert v4.names == ("exits",)
    assert [m.source for m in mechanisms_for("vcpu_pinning", {"cpus": [1]}, "guest")] == ["thread"]


def test_a_cmdline_change_targets_the_union_of_its_arguments_once_each():
    mechs = mechanisms_for("cmdline", {"add": {"isolcpus": "domain,managed_irq,1", "nohz_full": "1",
                                               "rcu_nocbs": "1", "quiet": None}}, "host")
    names = [m.names for m in mechs]
    # nohz_full kicks its tick on by IRQ work: with it in the change, the IRQ-work IPIs are not a target
    assert names == [("reschedule_ipi",), ("local_timer",), ("RCU",)]
    alone = mechanisms_for("cmdline", {"add": {"isolcpus": "domain,managed_irq,1"}}, "host")
    assert [m.names for m in alone] == [("reschedule_ipi",), ("irq_work_ipi",)]
    both = mechanisms_for("cmdline", {"add": {"kvm-arm.wfi_trap_policy": "notrap",
                                              "kvm-arm.wfe_trap_policy": "notrap"}}, "host")
    assert len(both) == 1 and both == CMDLINE_MECHANISMS["kvm-arm.wfi_trap_policy"]
    assert mechanisms_for("cmdline", {"add": {"quiet": None}}, "host") == ()
