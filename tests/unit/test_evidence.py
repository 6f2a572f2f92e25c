"""The mechanism evidence read around each run (orchestrator/run/evidence.py): which counters a change's declared
mechanism is read from (the measured target's own, or its host's), whether its latency is evidence at all, and
the rate of one run. Counters are the recorded diagnosis windows (tests/recorded/diagnose: two reads of the lab's
/proc/interrupts around a real window), parsed as a run's own counters are."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from orchestrator.config.inventory import Inventory
from orchestrator.config.playbook import load_measurement_plan
from orchestrator.config.profile import ChangeSpec
from orchestrator.measure.parse import parse_cyclictest_file
from orchestrator.remote.fake import FakeTransport, FakeUnit
from orchestrator.run.context import RunContext
from orchestrator.run.evidence import MechanismProbe
from tests.conftest import REPO
from tests.unit.test_counters import count, window, window_deltas

pytestmark = pytest.mark.unit

RUN = REPO / "tests" / "recorded" / "cyclictest" / "lab" / "guest-stress-h20000-run1.json"


def ctx(tmp_path, *, guest_on_host: bool) -> RunContext:
    inv = Inventory.model_validate({"units": {"u1": {
        "host": {"address": "host.invalid"}, "guest": {"address": "guest.invalid"}, "guest_on_host": guest_on_host,
        "vars": {"cpus": 2, "guest_cpus": 2, "rt_cpus": "1", "guest_rt_cpus": "1", "housekeeping_cpus": "0",
                 "qemu_service": "rt-guest-vm.service"}}}})
    return RunContext(inventory=inv, journal=None, plan=load_measurement_plan(REPO / "tests/lab/playbook-fast.yaml"),  # type: ignore[arg-type]
                      artifacts=tmp_path)


def refused(target: str) -> None:
    raise AssertionError(f"no connection to the {target} expected")


def host_that_says(word: str, **unit: Any) -> Callable[[str], FakeTransport]:
    """The host only (a guest connection is refused) whose sysreg_tracepoint.sh prints `word` (an x86 host: no)."""
    host = FakeTransport(FakeUnit(sysreg_tracepoint=word, **unit), "u1.host")

    def connect(target: str) -> FakeTransport:
        if target != "host":
            refused(target)
        return host
    return connect


def spec(cid: str, kind: str, target: str, params: dict) -> ChangeSpec:
    return ChangeSpec(id=cid, target=target, kind=kind, params=params)  # type: ignore[arg-type]


def test_a_guest_change_is_read_from_the_guests_own_run(tmp_path):
    probe = MechanismProbe(ctx(tmp_path, guest_on_host=False), "u1",
                           spec("guest.service.m", "service_disable", "guest", {"unit": "m.service"}),
                           host_that_says("no"))
    assert probe.latency_applicable and not probe.reads_host  # an x86 host: its SGI traps are left out
    assert probe.labels == ["function-call and IRQ-work IPIs on the RT CPUs"]
    [left] = probe.left_out()
    assert left["label"] == SGI and "no kvm:kvm_sys_access" in left["why"]
    deltas = window_deltas("x86-guest")  # the x86 guest with its crash-looping service
    run = parse_cyclictest_file(RUN).model_copy(update={"counters": deltas})
    result, evidence = probe.around(lambda: run)
    assert result is run
    s = window("x86-guest")
    calls = sum(count(s, "interrupts1", row, 1) - count(s, "interrupts0", row, 1) for row in ("CAL", "IWI"))
    (label, rate), = evidence.rates.items()
    assert calls > 0 and rate == pytest.approx(calls / deltas.interval_s)
    assert evidence.missing == {}


def test_a_run_without_counters_has_no_rate_and_says_why(tmp_path):
    probe = MechanismProbe(ctx(tmp_path, guest_on_host=True), "u1",
                           spec("guest.sysctl.kernel.timer_migration", "sysctl", "guest",
                                {"name": "kernel.timer_migration", "value": "0"}), host_that_says("no-tracefs"))
    _, evidence = probe.around(lambda: parse_cyclictest_file(RUN))
    assert evidence.rates == {"reschedule IPIs on the RT CPUs": None}
    assert "no counters" in evidence.missing["reschedule IPIs on the RT CPUs"]


@pytest.mark.parametrize("on_host, applicable", [(True, True), (False, False)])
def test_a_host_change_is_read_on_the_host_and_its_guest_latency_counts_only_when_the_guest_runs_there(
        tmp_path, on_host, applicable):
    probe = MechanismProbe(ctx(tmp_path, guest_on_host=on_host), "u1",
                           spec("host.irq_affinity", "irq_affinity", "host", {"housekeeping": [0]}), refused)
    assert probe.reads_host and probe.latency_applicable is applicable
    assert probe.declared()[0]["read_on"] == "host"


def test_a_change_with_no_mechanism_reads_nothing_more(tmp_path):
    probe = MechanismProbe(ctx(tmp_path, guest_on_host=True), "u1",
                           spec("guest.sysctl.vm.swappiness", "sysctl", "guest", {"name": "vm.swappiness",
                                                                                  "value": "10"}), refused)
    assert probe.labels == [] and not probe.reads_host
    run = parse_cyclictest_file(RUN)
    assert probe.around(lambda: run)[1].rates == {}


SGI = "IPIs the guest sends (ICC_SGI1R_EL1 traps on the host)"
SYSREG = REPO / "tests" / "recorded" / "counters" / "sysreg"


def test_an_arm64_host_counts_the_sgi_traps_of_the_guests_vcpus_around_each_guest_run(tmp_path):
    meta = dict(line.split(" ", 1) for line in (SYSREG / "reads-busy-meta.txt").read_text().splitlines())
    tids = [int(t) for t in meta["tids"].split()]
    snaps = []
    for step in ("start", "stop"):  # the recorded reads, answered in turn by the fake host
        text = (SYSREG / f"reads-busy-{step}.txt").read_text().split("@@\n", 3)[3]
        snaps.append((meta[f"{step}-marker"], text[:text.rindex(f"\n{meta[f'{step}-marker']} end\n")]))
    boot_id = snaps[0][1].split(" boot_id0\n")[1].split("\n")[0]
    connect = host_that_says("yes", boot_id=boot_id, cmdline="x", counter_snapshots=snaps)
    probe = MechanismProbe(ctx(tmp_path, guest_on_host=True), "u1",
                           spec("guest.service.m", "service_disable", "guest", {"unit": "m.service"}), connect)
    assert probe.labels == ["function-call and IRQ-work IPIs on the RT CPUs", SGI] and probe.left_out() == []
    assert probe.reads_host and {"label": SGI, "read_on": "host"}.items() <= probe.declared()[1].items()
    probe._guest_vm = lambda host: (tids, "rtguest")  # type: ignore[method-assign]  # (QEMU's threads: facts/qemu)
    _, evidence = probe.around(lambda: parse_cyclictest_file(RUN))
    host = connect("host").unit
    steps = [a[10] for a in host.log if a[:3] == ("sh", "-c", a[2]) and len(a) > 10 and ":" in a[10]]
    assert [s.split(":")[0] for s in steps] == ["start", "stop"] and steps[0].split(":")[1] == steps[1].split(":")[1]
    assert evidence.host is not None
    traps = sum(evidence.host.deltas[f"sysreg:{t}:ICC_SGI1R_EL1"] for t in tids)
    assert traps == 91 and evidence.rates[SGI] == pytest.approx(traps / evidence.host.interval_s)


def test_a_failed_run_still_stops_the_hosts_trap_counting(tmp_path):
    meta = dict(line.split(" ", 1) for line in (SYSREG / "reads-busy-meta.txt").read_text().splitlines())
    text = (SYSREG / "reads-busy-start.txt").read_text().split("@@\n", 3)[3]
    snap = (meta["start-marker"], text[:text.rindex(f"\n{meta['start-marker']} end\n")])
    boot_id = snap[1].split(" boot_id0\n")[1].split("\n")[0]
    connect = host_that_says("yes", boot_id=boot_id, cmdline="x", counter_snapshots=[snap])
    probe = MechanismProbe(ctx(tmp_path, guest_on_host=True), "u1",
                           spec("guest.service.m", "service_disable", "guest", {"unit": "m.service"}), connect)
    probe._guest_vm = lambda host: ([303], "rtguest")  # type: ignore[method-assign]

    def run() -> Any:
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        probe.around(run)
    steps = [a[10] for a in connect("host").unit.log if a[:2] == ("sh", "-c") and len(a) > 10 and ":" in a[10]]
    assert [s.split(":")[0] for s in steps] == ["start", "stop"]
