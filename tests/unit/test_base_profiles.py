"""The base profiles of issue #20 (profiles/realtime-virtual-{host,host-x86,guest}.yaml): they load and resolve
for a robot's and the lab's vars, nothing x86-only is in the arm64-first host base, and every entry cites its
source in a comment (`tune profile show` points at the line; the comment says why)."""

from __future__ import annotations

import re

import pytest

from orchestrator.config.inventory import Inventory
from orchestrator.config.profile import PROFILES_DIR, load_profile, profile_lines, resolve

pytestmark = pytest.mark.unit

BASES = ("realtime-virtual-host.yaml", "realtime-virtual-host-x86.yaml", "realtime-virtual-guest.yaml")
SOURCE = re.compile(r"\[(tuned (rt|rvh|rvg|nl|lp)|NTO|kdoc[^\]]*|field[^\]]*)")
ROBOT = {"cpus": 4, "guest_cpus": 4, "rt_cpus": "1-3", "housekeeping_cpus": "0", "guest_rt_cpus": "1-3",
         "guest_housekeeping_cpus": "0"}
LAB = {"cpus": 2, "guest_cpus": 2, "rt_cpus": "1", "housekeeping_cpus": "0", "guest_rt_cpus": "1",
       "guest_housekeeping_cpus": "0"}


def _unit(vars: dict):
    return Inventory.model_validate({"units": {"u": {"host": {"address": "h.invalid"},
                                                     "guest": {"address": "g.invalid"}, "vars": vars}}}).unit("u")


@pytest.mark.parametrize("name", BASES)
@pytest.mark.parametrize("vars", [ROBOT, LAB], ids=["robot", "lab"])
def test_each_base_resolves_for_a_robot_and_the_lab(name, vars):
    specs = resolve(load_profile(PROFILES_DIR / name), "u", _unit(vars))
    kinds = {s.kind for s in specs}
    assert {"cmdline", "sysctl"} <= kinds, kinds
    if "x86" not in name:
        assert {"sysfs", "kthreads", "irq_affinity"} <= kinds, kinds


def test_the_arm64_first_host_base_has_nothing_x86_only():
    text = (PROFILES_DIR / "realtime-virtual-host.yaml").read_text()
    for x86 in ("intel_pstate", "amd_pstate", "tsc=", "tsc:", "idle=poll", "processor.max_cstate"):
        assert x86 not in re.sub(r"#.*", "", text), x86
    x86_args = resolve(load_profile(PROFILES_DIR / "realtime-virtual-host-x86.yaml"), "u", _unit(ROBOT))
    add = next(s for s in x86_args if s.kind == "cmdline").params["add"]
    assert add["tsc"] == "reliable" and add["nosoftlockup"] is None  # the x86 file includes the base


@pytest.mark.parametrize("name", BASES)
def test_every_entry_cites_its_source(name):
    """The comment block right above each entry (or above the list of rules it belongs to) names a source."""
    path = PROFILES_DIR / name
    lines = path.read_text().splitlines()
    missing = []
    for line in profile_lines(load_profile(path)):
        if line.key in ("name", "description") or line.key.startswith("include"):
            continue
        file, _, number = line.source.rpartition(":")
        if file != str(path):
            continue  # set by an included base: checked there
        i = int(number) - 1
        block = [lines[i]]
        j = i - 1
        while j >= 0 and (lines[j].lstrip().startswith("#") or lines[j].lstrip().startswith("- ")):
            block.append(lines[j])
            j -= 1
        if not any(SOURCE.search(b) for b in block):
            missing.append(f"{line.key} ({line.source})")
    assert not missing, missing
