"""The mechanism evidence read around each run (orchestrator/run/evidence.py): which counters a change's declared
mechanism is read from (the measured target's own, or its host's), whether its latency is evidence at all, and
the rate of one run. Counters are the recorded diagnosis windows (tests/recorded/diagnose: two reads of the lab's
/proc/interrupts around a real window), parsed as a run's own counters are."""

from __future__ import annotations

import pytest

from orchestrator.config.inventory import Inventory
from orchestrator.config.playbook import load_measurement_plan
from orchestrator.config.profile import ChangeSpec
from orchestrator.measure.parse import parse_cyclictest_file
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


def spec(cid: str, kind: str, target: str, params: dict) -> ChangeSpec:
    return ChangeSpec(id=cid, target=target, kind=kind, params=params)  # type: ignore[arg-type]


def test_a_guest_change_is_read_from_the_guests_own_run(tmp_path):
    probe = MechanismProbe(ctx(tmp_path, guest_on_host=False), "u1",
                           spec("guest.service.m", "service_disable", "guest", {"unit": "m.service"}), refused)
    assert probe.latency_applicable and not probe.reads_host
    assert probe.labels == ["function-call and IRQ-work IPIs on the RT CPUs"]
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
                                {"name": "kernel.timer_migration", "value": "0"}), refused)
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
