"""A playbook that asks in so many words for a mechanism keep cannot be used with a change kind that declares no
mechanism: refused with the playbook's file, line and key before anything is touched (issue #18, bad input). Left
at its default, such a change is kept on latency alone."""

from __future__ import annotations

import pytest

from orchestrator.config.inventory import Inventory
from orchestrator.config.playbook import check_keep_on, load_measurement_plan
from orchestrator.core.errors import InputError
from orchestrator.run.engine import Engine
from tests.conftest import REPO

pytestmark = pytest.mark.unit

FAST = REPO / "tests" / "lab" / "playbook-fast.yaml"


def playbook(tmp_path, keep_on: str | None, together: str = "[]"):
    """The fast plan, each runtime change alone unless `together` says otherwise."""
    text = FAST.read_text().replace("  together: [sysctl, sysfs, kthreads, irqbalance]", f"  together: {together}")
    assert f"together: {together}" in text
    if keep_on is not None:
        text = text.replace("  inconclusive: keep\n", f"  inconclusive: keep\n  keep_on: {keep_on}\n")
    path = tmp_path / "plan.yaml"
    path.write_text(text)
    return path


def engine(tmp_path, plan_path) -> Engine:
    inv = Inventory.model_validate({"units": {"u1": {"host": {"address": "u1.invalid"}, "vars": {"cpus": 2}}}})
    return Engine(inventory=inv, journal=None, plan=load_measurement_plan(plan_path),  # type: ignore[arg-type]
                  artifacts=tmp_path, plan_path=plan_path)


def profile(tmp_path, body: str):
    path = tmp_path / "profile.yaml"
    path.write_text("name: t\nhost:\n  sysctl:\n" + body)
    return path


def test_an_explicit_mechanism_keep_with_a_kind_that_has_none_names_file_line_and_key(tmp_path):
    plan = playbook(tmp_path, "latency_or_mechanism")
    line = next(i for i, t in enumerate(plan.read_text().splitlines(), 1) if t.startswith("  keep_on:"))
    e = engine(tmp_path, plan)
    with pytest.raises(InputError) as err:
        e.specs("u1", profile(tmp_path, '    kernel.timer_migration: "0"\n    vm.swappiness: "10"\n'))
    msg = str(err.value)
    assert msg.startswith(f"{plan}:{line}: decision.keep_on:"), msg
    assert "host.sysctl.vm.swappiness (sysctl)" in msg and "timer_migration" not in msg
    assert "got 'latency_or_mechanism'" in msg and "keep_on: latency" in msg


@pytest.mark.parametrize("keep_on", [None, "latency"])
def test_the_default_or_a_latency_keep_accepts_every_kind(tmp_path, keep_on):
    e = engine(tmp_path, playbook(tmp_path, keep_on))
    specs = e.specs("u1", profile(tmp_path, '    vm.swappiness: "10"\n'))
    assert [s.id for s in specs] == ["host.sysctl.vm.swappiness"]


def test_a_profile_whose_kinds_all_declare_a_mechanism_is_accepted(tmp_path):
    e = engine(tmp_path, playbook(tmp_path, "latency_or_mechanism"))
    assert [s.id for s in e.specs("u1", profile(tmp_path, '    kernel.timer_migration: "0"\n'))] == [
        "host.sysctl.kernel.timer_migration"]
    plan = load_measurement_plan(playbook(tmp_path, "latency_or_mechanism"))
    check_keep_on(plan, None, [("x", "sysctl", True)])  # no file known: nothing to name, nothing refused
    with pytest.raises(InputError, match="^measurement plan: decision.keep_on"):
        check_keep_on(plan, None, [("x", "kernel", False)])


def test_a_bundle_declares_its_members_mechanisms_so_a_mechanism_keep_is_possible_for_it(tmp_path):
    """Measured together, a sysctl without a mechanism rides with one that has one: the bundle can be kept on
    its members' mechanisms, so the playbook is accepted; alone, the same plan is refused (test above)."""
    e = engine(tmp_path, playbook(tmp_path, "latency_or_mechanism", together="[sysctl]"))
    (spec,) = e.specs("u1", profile(tmp_path, '    kernel.timer_migration: "0"\n    vm.swappiness: "10"\n'))
    assert spec.id == "host.bundle" and [m["id"] for m in spec.params["members"]] == [
        "host.sysctl.kernel.timer_migration", "host.sysctl.vm.swappiness"]
    e = engine(tmp_path, playbook(tmp_path, "latency_or_mechanism", together="[sysctl]"))
    with pytest.raises(InputError, match=r"host.bundle \(bundle\)"):  # no member with a mechanism
        e.specs("u1", profile(tmp_path, '    vm.swappiness: "10"\n    vm.dirty_ratio: "10"\n'))
