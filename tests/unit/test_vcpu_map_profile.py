"""The vCPU map as a profile states it: each guest RT vCPU (by index) on its own isolated host CPU, one to one;
everything else of QEMU on the housekeeping CPUs; an optional SCHED_FIFO priority. Checked before any SSH."""

from __future__ import annotations

import pytest

from orchestrator.config.profile import describe, load_profile, resolve
from orchestrator.core.errors import InputError
from tests.unit.test_profile import RT_PROFILE, unit, write

pytestmark = pytest.mark.unit

ROBOT = {"rt_cpus": "1-3", "housekeeping_cpus": "0", "guest_rt_cpus": "1-3", "guest_housekeeping_cpus": "0",
         "qemu_service": "robot-vm", "cpus": 8, "guest_cpus": 4}


def pinning(tmp_path, body: str, vars: dict):
    p = write(tmp_path, "p.yaml", "name: p\nhost:\n  vcpu_pinning:\n" + body)
    return {s.id: s for s in resolve(load_profile(p), "r1", unit(vars))}["host.vcpu_pinning"]


def test_robot_vars_map_guest_rt_vcpus_1_to_3_onto_host_cpus_1_to_3():
    """Before the map, vCPU 0 (the guest's housekeeping CPU) took host CPU 1 and RT vCPU 3 floated."""
    spec = {s.id: s for s in resolve(load_profile(RT_PROFILE), "r1", unit(ROBOT))}["host.vcpu_pinning"]
    assert spec.params["vcpus"] == {"1": 1, "2": 2, "3": 3} and spec.params["housekeeping"] == [0]
    assert describe(spec) == ("host: pin the threads of robot-vm.service: vCPU 1 (guest RT CPU 1) -> host CPU 1; "
                              "vCPU 2 (guest RT CPU 2) -> host CPU 2; vCPU 3 (guest RT CPU 3) -> host CPU 3; "
                              "other vCPUs, main loop, I/O threads -> 0")


def test_vcpus_and_housekeeping_default_to_the_vars(tmp_path):
    spec = pinning(tmp_path, '    service: "${qemu_service}"\n    cpus: "4-5"\n    rt_priority: 1\n',
                   dict(ROBOT, rt_cpus="4-5", guest_rt_cpus="2-3", housekeeping_cpus="0-1"))
    assert spec.params == {"service": "robot-vm.service", "vcpus": {"2": 4, "3": 5}, "housekeeping": [0, 1],
                           "rt_priority": 1}
    assert "(SCHED_FIFO 1)" in describe(spec)


@pytest.mark.parametrize("body, vars, message", [
    ('    service: vm\n    cpus: "1-2"\n', ROBOT,
     'p.yaml:5: host.vcpu_pinning.cpus: 3 guest RT vCPUs (1-3) need as many isolated host CPUs, one each; got 2'),
    ('    service: vm\n    cpus: "1-3"\n    housekeeping: "0-1"\n', ROBOT,
     "p.yaml:6: host.vcpu_pinning.housekeeping: housekeeping CPU 1 also in vcpu_pinning.cpus (1-3)"),
    ('    service: vm\n    cpus: "1-3"\n    vcpus: "2-4"\n', ROBOT,
     "host.vcpu_pinning.vcpus: CPU 4 outside the unit's guest CPUs 0-3"),
    ('    service: vm\n    cpus: "1"\n', {"cpus": 2, "housekeeping_cpus": "0"},
     "host.vcpu_pinning: `vcpus` is not set and there is no `guest_rt_cpus` var to default it to"),
    ('    service: vm\n    cpus: "1-3"\n    rt_priority: 100\n', ROBOT, "host.vcpu_pinning.rt_priority"),
    ('    service: vm\n    cpus: "1-3"\n    rt_priority: "1"\n', ROBOT, "host.vcpu_pinning.rt_priority"),
    ('    service: vm\n    cpus: "1-3"\n    rt_priority: true\n', ROBOT, "host.vcpu_pinning.rt_priority"),
])
def test_a_bad_map_is_refused_with_file_line_and_key(tmp_path, body, vars, message):
    with pytest.raises(InputError) as exc:
        pinning(tmp_path, body, vars)
    assert message in str(exc.value)
