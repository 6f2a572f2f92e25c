"""Tuning profiles: the real rt-profile resolved for the lab, includes, and every bad input reported with
file:line, key path and the offending value before anything touches a unit."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from orchestrator.config.inventory import UnitSpec
from orchestrator.config.profile import (
    KIND_ORDER,
    NEEDS_REBOOT,
    ChangeSpec,
    describe,
    find_profile,
    load_profile,
    resolve,
)
from orchestrator.core.errors import InputError

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
RT_PROFILE = REPO / "profiles" / "rt-profile.yaml"
BAD = Path(__file__).resolve().parent / "profiles_bad"

# What `tune lab up` writes, plus the vars rt-profile needs that the lab inventory must gain.
LAB_VARS = {"rt_cpus": "1", "housekeeping_cpus": "0", "qemu_service": "rt-guest-vm.service", "lab": True,
            "guest_rt_cpus": "1", "guest_housekeeping_cpus": "0", "cpus": 2, "guest_cpus": 2}


def unit(vars: dict, guest: bool = True) -> UnitSpec:
    doc: dict = {"host": {"address": "127.0.0.1", "port": 2230}, "vars": vars}
    if guest:
        doc["guest"] = {"address": "127.0.0.1", "port": 2231}
    return UnitSpec.model_validate(doc)


def error_of(path: Path, vars: dict | None = None, cpus: int | None = None) -> str:
    with pytest.raises(InputError) as exc:
        load_profile(path, vars, cpus)
    return str(exc.value)


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# ---- the real profile ----------------------------------------------------------------------------------
def test_rt_profile_resolves_for_the_lab_in_order():
    profile = load_profile(RT_PROFILE, LAB_VARS)  # checks every value for these vars too
    specs = resolve(profile, "lab1", unit(LAB_VARS))
    # the bases' entries and the field notes' steps, by kind in the default order, the guest first in each kind
    assert [s.id for s in specs] == [
        "guest.service.mirobot_teleoperate.service",
        *(f"guest.sysctl.{k}" for k in ("kernel.timer_migration", "kernel.nmi_watchdog", "vm.stat_interval",
                                        "kernel.watchdog_cpumask")),
        *(f"host.sysctl.{k}" for k in ("kernel.timer_migration", "kernel.nmi_watchdog", "kernel.numa_balancing",
                                       "vm.stat_interval", "kernel.watchdog_cpumask")),
        *(f"guest.sysfs.{k}" for k in ("transparent_hugepage", "workqueue_cpumask", "writeback_cpumask")),
        *(f"host.sysfs.{k}" for k in ("transparent_hugepage", "workqueue_cpumask", "writeback_cpumask", "ksm_run")),
        "guest.kthreads", "host.kthreads", "host.vcpu_pinning", "guest.irqbalance", "host.irqbalance",
        "guest.irq_affinity", "host.irq_affinity", "guest.cmdline", "host.cmdline", "host.wfx_notrap"]
    spec_of = {s.id: s for s in specs}
    by_id = {s.id: s.model_dump(exclude={"checks"}) for s in specs}
    assert by_id["host.vcpu_pinning"] == {
        "id": "host.vcpu_pinning", "target": "host", "kind": "vcpu_pinning",
        "params": {"service": "rt-guest-vm.service", "vcpus": {"1": 1}, "housekeeping": [0], "rt_priority": None},
        "needs_reboot": False}
    assert by_id["guest.cmdline"]["params"] == {"add": {"isolcpus": "domain,managed_irq,1", "nohz_full": "1",
                                                        "rcu_nocbs": "1", "nosoftlockup": None, "irqaffinity": "0"}}
    assert by_id["host.cmdline"]["params"] == {"add": {
        "isolcpus": "domain,managed_irq,1", "nohz_full": "1", "rcu_nocbs": "1", "rcu_nocb_poll": None,
        "nosoftlockup": None, "skew_tick": "1", "irqaffinity": "0", "kvm-arm.vgic_v4_enable": "1"}}
    assert by_id["host.wfx_notrap"]["params"] == {"wfi": "notrap", "wfe": "notrap", "kernel": None}
    assert by_id["guest.sysctl.kernel.watchdog_cpumask"]["params"] == {"name": "kernel.watchdog_cpumask",
                                                                       "value": "0"}
    assert all(s.needs_reboot == (s.kind in ("cmdline", "wfx_notrap")) for s in specs)
    assert [describe(spec_of[i]) for i in ("host.vcpu_pinning", "host.irq_affinity")] == [
        "host: pin the threads of rt-guest-vm.service: vCPU 1 (guest RT CPU 1) -> host CPU 1; other vCPUs, main loop, "
        "I/O threads -> 0",
        "host: move IRQs to housekeeping CPUs 0",
    ]
    assert describe(spec_of["host.cmdline"]).endswith("kvm-arm.vgic_v4_enable=1 (reboot)")


def test_rt_profile_for_a_robot_and_found_by_name():
    assert find_profile("rt-profile", search=(REPO / "profiles",)) == REPO / "profiles" / "rt-profile.yaml"
    robot = {"rt_cpus": "1-3", "housekeeping_cpus": "0", "guest_rt_cpus": "1-3", "guest_housekeeping_cpus": "0",
             "qemu_service": "robot-vm", "cpus": 8, "guest_cpus": 4}
    specs = {s.id: s for s in resolve(load_profile(RT_PROFILE), "r1", unit(robot))}
    assert specs["host.vcpu_pinning"].params == {"service": "robot-vm.service", "vcpus": {"1": 1, "2": 2, "3": 3},
                                                 "housekeeping": [0], "rt_priority": None}
    assert specs["guest.cmdline"].params["add"]["nohz_full"] == "1-3"


def test_rt_profile_needs_guest_rt_cpus_which_the_lab_inventory_lacks_today():
    today = {k: v for k, v in LAB_VARS.items() if k in ("rt_cpus", "housekeeping_cpus", "qemu_service", "lab")}
    with pytest.raises(InputError) as exc:
        resolve(load_profile(RT_PROFILE), "lab1", unit(today))
    msg = str(exc.value)
    assert f"{RT_PROFILE}:41: host.vcpu_pinning.vcpus: undefined variable ${{guest_rt_cpus}}" in msg
    assert f"{RT_PROFILE}:53: guest.cmdline.isolcpus: undefined variable ${{guest_rt_cpus}}" in msg
    base = RT_PROFILE.parent / "realtime-virtual-guest.yaml"  # the included base's lines are named as its own
    assert f"{base}:20: guest.cmdline.irqaffinity: undefined variable ${{guest_housekeeping_cpus}}" in msg
    assert "unit lab1's inventory vars define housekeeping_cpus, lab, qemu_service, rt_cpus" in msg
    assert "(got 'domain,managed_irq,${guest_rt_cpus}')" in msg


def test_guest_changes_need_a_guest_endpoint():
    with pytest.raises(InputError, match="unit lab1 has no guest endpoint"):
        resolve(load_profile(RT_PROFILE), "lab1", unit(LAB_VARS, guest=False))


# ---- includes and order --------------------------------------------------------------------------------
def test_include_overrides_and_order(tmp_path):
    write(tmp_path, "base.yaml", """\
host:
  sysctl: {kernel.timer_migration: "0", vm.stat_interval: 10}
  cmdline: {nohz_full: "1", nosoftlockup: }
  vcpu_pinning: {service: qemu, cpus: "1"}
guest:
  services: {disable: [a, b.socket]}
""")
    top = write(tmp_path, "top.yaml", """\
name: top
include: [base.yaml]
host:
  sysctl: {vm.stat_interval: "20"}     # overrides one key, keeps the other
  vcpu_pinning: null                   # drops the inherited pinning
guest:
  services: {disable: [c], mask: true} # a list replaces the inherited list
order: [host.cmdline, guest.service.c.service]
""")
    profile = load_profile(top)
    assert profile.files == [tmp_path / "base.yaml", top]
    specs = resolve(profile, "u", unit({}))
    assert [s.id for s in specs] == ["host.cmdline", "guest.service.c.service", "host.sysctl.kernel.timer_migration",
                                     "host.sysctl.vm.stat_interval"]
    by_id = {s.id: s for s in specs}
    assert by_id["host.sysctl.vm.stat_interval"].params["value"] == "20"
    assert by_id["host.sysctl.kernel.timer_migration"].params["value"] == "0"
    assert by_id["host.cmdline"].params == {"add": {"nohz_full": "1", "nosoftlockup": None}}
    assert describe(by_id["host.cmdline"]) == "host: add kernel arguments nohz_full=1 nosoftlockup (reboot)"
    assert by_id["guest.service.c.service"].params == {"unit": "c.service", "mask": True}


def test_error_in_an_included_file_names_that_file(tmp_path):
    write(tmp_path, "base.yaml", "host:\n  sysctl:\n    kernel.timer_migration: true\n")
    top = write(tmp_path, "top.yaml", "name: top\ninclude: [base.yaml]\nguest: {}\n")
    msg = error_of(top)
    assert f"{tmp_path / 'base.yaml'}:3: host.sysctl.kernel.timer_migration: a sysctl value cannot be a boolean" \
        in msg


def test_include_cycle_is_rejected():
    msg = error_of(BAD / "cycle_a.yaml")
    assert f"{BAD / 'cycle_b.yaml'}:2: include.0: include cycle:" in msg
    assert "cycle_a.yaml -> " in msg and "cycle_b.yaml -> " in msg and "(got 'cycle_a.yaml')" in msg


def test_missing_include():
    msg = error_of(BAD / "missing_include.yaml")
    assert f"{BAD / 'missing_include.yaml'}:2: include.1: included file" in msg
    assert "(got 'no-such-file.yaml')" in msg


def test_order_naming_an_unknown_change(tmp_path):
    p = write(tmp_path, "p.yaml", "name: p\nguest:\n  sysctl: {kernel.timer_migration: 0}\norder:\n"
                                  "  - guest.sysctl.kernel.timer_migration\n  - host.cmdline\n")
    msg = error_of(p)
    assert f"{p}:6: order.1: no such change in this profile; its changes are: " \
           "guest.sysctl.kernel.timer_migration (got 'host.cmdline')" in msg


# ---- typed values --------------------------------------------------------------------------------------
def test_yaml_1_2_off_stays_a_string_and_ints_become_strings(tmp_path):
    p = write(tmp_path, "p.yaml", "name: p\nguest:\n  sysctl:\n    kernel.foo: off\n    kernel.bar: 0\n"
                                  "  cmdline: {skew_tick: 1}\n")
    specs = {s.id: s for s in resolve(load_profile(p), "u", unit({}))}
    assert specs["guest.sysctl.kernel.foo"].params == {"name": "kernel.foo", "value": "off"}
    assert specs["guest.sysctl.kernel.bar"].params["value"] == "0"
    assert specs["guest.cmdline"].params == {"add": {"skew_tick": "1"}}


def test_boolean_sysctl_value_is_rejected_with_a_hint_to_quote():
    p = BAD / "bool_sysctl.yaml"
    msg = error_of(p)
    assert f"{p}:4: guest.sysctl.kernel.timer_migration: a sysctl value cannot be a boolean: quote the value" in msg
    assert "(got False)" in msg


def test_switches_are_strict_booleans(tmp_path):
    p = write(tmp_path, "p.yaml", "name: p\nhost:\n  wfx_notrap: 'yes'\n  services: {mask: off}\n")
    msg = error_of(p)
    assert f"{p}:3: host.wfx_notrap: must be true, false or a mapping naming a patched host kernel for Linux " \
           "< 6.11: {kernel: {deb: FILE}} or {kernel: {package: NAME}} (got 'yes')" in msg
    assert f"{p}:4: host.services.mask: Input should be a valid boolean (got 'off')" in msg


# ---- bad inputs, one fixture each ------------------------------------------------------------------------
@pytest.mark.parametrize("fixture, vars, cpus, expected", [
    ("unknown_key.yaml", None, None,
     ["unknown_key.yaml:5: host.colour: Extra inputs are not permitted", "(got 'red')"]),
    ("cpu_out_of_range.yaml", {"rt_cpus": "1-5"}, 4,
     ["cpu_out_of_range.yaml:5: host.vcpu_pinning.cpus: CPUs 4-5 outside the unit's host CPUs 0-3",
      "(got '1-5' from '${rt_cpus}')"]),
    ("overlap.yaml", None, None,
     [("overlap.yaml:7: host.irq_affinity.housekeeping: housekeeping CPU 1 also in the RT CPUs of "
       "host.vcpu_pinning.cpus (1-3)"), "must not overlap (got '0-1')"]),
    ("metachar.yaml", None, None,
     ["metachar.yaml:5: guest.cmdline.nohz_full: a kernel argument value", "shell metacharacters; found ';'",
      "(got '1;reboot')"]),
    ("root_cmdline.yaml", None, None,
     ["root_cmdline.yaml:4: host.cmdline.root: rt-tune never sets root", "(got 'root=/dev/sda1')"]),
    ("undefined_var.yaml", {"rt_cpus": "1"}, None,
     ["undefined_var.yaml:5: guest.cmdline.nohz_full: undefined variable ${guest_rt_cpus}",
      "(got '${guest_rt_cpus}')"]),
    ("bad_service.yaml", None, None,
     ["bad_service.yaml:6: guest.services.disable.1: not a systemd unit name", "(got '-rf /')"]),
    ("bad_yaml.yaml", None, None, ["bad_yaml.yaml:4: not valid YAML"]),
    ("swap_service.yaml", None, None,
     ["swap_service.yaml:5: guest.services.disable.0: a .swap unit is not a service to disable", "(got "
      "'dev-sda2.swap')"]),
    ("huge_cpu_range.yaml", None, None,
     ["huge_cpu_range.yaml:5: host.cmdline.nohz_full: CPU 99999999999 is above 8191", "(got '0-99999999999')"]),
    ("huge_cpu_range.yaml", None, 4,
     ["huge_cpu_range.yaml:5: host.cmdline.nohz_full: CPU 99999999999 outside the unit's host CPUs 0-3"]),
    ("include_outside.yaml", None, None,
     ["include_outside.yaml:3: include.0: an include names a *.yaml or *.yml file", "(got '/etc/shadow')"]),
    ("newline_key.yaml", None, None,
     ["newline_key.yaml:5: host.cmdline.'quiet\\n': not a kernel argument name", "(got 'quiet\\n')"]),
])
def test_bad_input_names_file_line_key_and_value(fixture, vars, cpus, expected):
    msg = error_of(BAD / fixture, vars, cpus)
    for part in expected:
        assert part in msg, f"{part!r} not in:\n{msg}"
    assert str(BAD / fixture) in msg


def test_undefined_variable_is_only_an_error_once_vars_are_known():
    load_profile(BAD / "undefined_var.yaml")  # syntax only: fine
    msg = error_of(BAD / "undefined_var.yaml", {"rt_cpus": "1"})
    assert "undefined variable ${guest_rt_cpus}: the unit's vars define rt_cpus" in msg
    assert "rcu_nocbs" not in msg  # ${rt_cpus} is defined


def test_every_problem_in_one_error_in_line_order(tmp_path):
    p = write(tmp_path, "p.yaml", """\
name: many
host:
  cmdline:
    nohz_full: "0-1"
    init: /bin/sh
    quiet "x": "1"
  sysctl:
    Kernel: "1"
    kernel.x: "a\\nb"
  vcpu_pinning: {service: "${qemu_service}", cpus: "${cpu}"}
guest:
  services: {disable: [good, ".hidden"]}
  sysctl: {kernel.y: "$HOME"}
""")
    msg = error_of(p, {"qemu_service": "vm", "cpu": True, "guest_rt_cpus": "1", "housekeeping_cpus": "0"}, 2)
    lines = [line.strip() for line in msg.splitlines()[1:]]
    assert [line.split(": ")[0] for line in lines] == [f"{p}:{n}" for n in (4, 5, 6, 8, 9, 10, 12, 13)]
    assert "host.cmdline.nohz_full: leaves no housekeeping CPU: the unit's host has only CPUs 0-1" in lines[0]
    assert "(got 'init=/bin/sh')" in lines[1]
    assert "host.cmdline.quiet \"x\": not a kernel argument name" in lines[2]
    assert "host.sysctl.Kernel: not a sysctl name" in lines[3]
    assert "host.sysctl.kernel.x: a sysctl value must be non-empty, on one line" in lines[4]
    assert "variable ${cpu} is True; only strings and integers" in lines[5]
    assert "guest.services.disable.1: not a systemd unit name (letters" in lines[6]
    assert "guest.sysctl.kernel.y: a `$` must start a variable reference ${name} (got '$HOME')" in lines[7]


def test_duplicate_service_and_bad_cpu_count_var(tmp_path):
    p = write(tmp_path, "p.yaml", "name: p\nguest:\n  services:\n    disable: [x, x.service]\n")
    assert f"{p}:4: guest.services.disable.1: change guest.service.x.service is listed twice" in error_of(p)
    ok = write(tmp_path, "ok.yaml", "name: ok\nhost: {sysctl: {kernel.a: 1}}\n")
    with pytest.raises(ValidationError, match="vars.cpus"):
        unit({"cpus": "four"})  # the inventory's vars are typed: it is refused there first
    for bad in ("four", "4", "٤", True, 0, 99999999999):  # the resolver checks them too, strictly
        with pytest.raises(InputError, match=r"unit u's inventory vars: vars.cpus: a CPU count must be a positive "
                                             r"integer \(at most 8192, unquoted\) \(got "):
            resolve(load_profile(ok), "u", UnitSpec.model_construct(vars={"cpus": bad}, guest=None))
        with pytest.raises(InputError, match=r"unit vars: vars.cpus: a CPU count must be a positive integer"):
            load_profile(ok, {"cpus": bad})


def test_changespec_is_strict():
    with pytest.raises(ValidationError):
        ChangeSpec(id="x", target="host", kind="sysctl", params={}, colour="red")


# ---- kernel artifacts: host.kernel and wfx_notrap: {kernel: ...} ----------------------------------------
def test_kernel_changes_resolve_in_order_with_paths_relative_to_the_naming_file(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "k_1_arm64.deb").write_bytes(b"x")
    (tmp_path / "patched.deb").write_bytes(b"x")
    write(tmp_path, "sub/base.yaml", "host:\n  kernel: {deb: k_1_arm64.deb, release: 6.1.0-9-rt-arm64}\n")
    top = write(tmp_path, "top.yaml", """\
name: top
include: [sub/base.yaml]
host:
  wfx_notrap:
    kernel: {deb: patched.deb}
  cmdline: {nohz_full: "1"}
  sysctl: {kernel.timer_migration: "0"}
""")
    specs = resolve(load_profile(top), "u", unit({}, guest=False))
    assert [(s.id, s.kind, s.needs_reboot) for s in specs] == [
        ("host.sysctl.kernel.timer_migration", "sysctl", False), ("host.cmdline", "cmdline", True),
        ("host.kernel", "kernel", True), ("host.wfx_notrap", "wfx_notrap", True)]
    kernel, wfx = specs[2], specs[3]
    assert kernel.params == {"deb": str(tmp_path / "sub" / "k_1_arm64.deb"), "package": None,
                             "release": "6.1.0-9-rt-arm64"}
    assert wfx.params == {"wfi": "notrap", "wfe": "notrap",
                          "kernel": {"deb": str(tmp_path / "patched.deb"), "package": None, "release": None}}
    assert describe(kernel) == "host: install and boot kernel k_1_arm64.deb (6.1.0-9-rt-arm64) (reboot)"
    assert describe(wfx) == "host: stop trapping guest WFI/WFE (Linux < 6.11: with patched kernel patched.deb) " \
                            "(reboot)"
    assert KIND_ORDER.index("cmdline") < KIND_ORDER.index("kernel") < KIND_ORDER.index("wfx_notrap")
    assert NEEDS_REBOOT == {"cmdline", "kernel", "wfx_notrap"}


def test_kernel_from_a_package_and_vars_and_order(tmp_path):
    (tmp_path / "debs").mkdir()
    (tmp_path / "debs" / "k.deb").write_bytes(b"x")
    p = write(tmp_path, "p.yaml", """\
name: p
host:
  kernel: {package: "${kpkg}", release: "${krel}"}
  wfx_notrap: {kernel: {deb: "${kdir}/k.deb"}}
order: [host.wfx_notrap]
""")
    vars = {"kpkg": "linux-image-6.1.0-9-rt-arm64", "krel": "6.1.0-9-rt-arm64", "kdir": "debs"}
    specs = resolve(load_profile(p, vars), "u", unit(vars, guest=False))
    assert [s.id for s in specs] == ["host.wfx_notrap", "host.kernel"]
    assert specs[1].params == {"deb": None, "package": "linux-image-6.1.0-9-rt-arm64", "release": "6.1.0-9-rt-arm64"}
    assert specs[0].params["kernel"]["deb"] == str(tmp_path / "debs" / "k.deb")
    assert describe(specs[1]) == "host: install and boot kernel package linux-image-6.1.0-9-rt-arm64 " \
                                 "(6.1.0-9-rt-arm64) (reboot)"
    with pytest.raises(InputError, match=r"p.yaml:3: host.kernel.package: undefined variable \$\{kpkg\}"):
        resolve(load_profile(p), "u", unit({}, guest=False))  # load_profile without vars: syntax only


def test_bad_kernel_artifacts_name_file_line_key_and_value(tmp_path):
    (tmp_path / "k.tar").write_bytes(b"x")
    p = write(tmp_path, "p.yaml", """\
name: p
host:
  kernel:
    deb: missing.deb
    package: linux-image-rt-arm64
  wfx_notrap:
    kernel:
      package: Linux_Image
      release: "6.1.0 rt"
guest:
  kernel: {package: linux-image-cloud-arm64}
""")
    lines = [line.strip() for line in error_of(p).splitlines()[1:]]
    assert lines == [
        (f"{p}:3: host.kernel: name exactly one of `deb: FILE` (a .deb on this machine) or `package: NAME` (a "
        "package in the unit's apt repositories) (got {'deb': 'missing.deb', 'package': 'linux-image-rt-arm64'})"),
        (f"{p}:4: host.kernel.deb: no such file {tmp_path / 'missing.deb'} (a relative path is relative to the "
        f"directory of the profile file that names it, {tmp_path}) (got 'missing.deb')"),
        (f"{p}:8: host.wfx_notrap.kernel.package: not a Debian package name (lowercase letters, digits and `+.-`, "
        "at least 2 characters, starting with a letter or digit) (got 'Linux_Image')"),
        (f"{p}:9: host.wfx_notrap.kernel.release: not a kernel release as `uname -r` prints it ([A-Za-z0-9._+-], "
        "at most 64 characters, e.g. 6.1.0-41-rt-arm64) (got '6.1.0 rt')"),
        (f"{p}:11: guest.kernel: rt-tune cannot install a guest kernel yet (only host.kernel): build the guest "
        "image with the kernel you want (got {'package': 'linux-image-cloud-arm64'})"),
    ]
    q = write(tmp_path, "q.yaml", "name: q\nhost:\n  kernel: {release: 6.1.0-1-arm64}\n"
                                  f"  wfx_notrap: {{kernel: {{deb: k.tar, release: '{'9' * 65}'}}}}\n"
                                  "  cmdline: {nohz_full: '1'}\n")
    msg = error_of(q)
    assert f"{q}:3: host.kernel: name exactly one of `deb: FILE`" in msg and "(got {'release': '6.1.0-1-arm64'})" in msg
    assert f"{q}:4: host.wfx_notrap.kernel.deb: must name a Debian package file (*.deb) (got 'k.tar')" in msg
    assert f"{q}:4: host.wfx_notrap.kernel.release: not a kernel release" in msg
    r = write(tmp_path, "r.yaml", "name: r\nhost:\n  kernel: {package: linux-image-arm64, release: 6.10}\n")
    assert f"{r}:3: host.kernel.release: a kernel release must be a quoted string: YAML reads 6.10 as the " \
           "number 6.1; write e.g. \"6.10.0-1-arm64\" (got 6.1)" in error_of(r)


@pytest.mark.parametrize("value, expected", [
    ("{}", "host.wfx_notrap: must be true, false or a mapping naming a patched host kernel"),
    ("{kernel: null}", "host.wfx_notrap: must be true, false or a mapping"),
    ("{kernel: {deb: k.deb}, colour: red}", "host.wfx_notrap.colour: Extra inputs are not permitted (got 'red')"),
    ("{kernel: {deb: k.deb, url: http://x}}", "host.wfx_notrap.kernel.url: Extra inputs are not permitted"),
    ("{kernel: linux-image-rt-arm64}", "host.wfx_notrap.kernel: Input should be a valid dictionary"),
    ("1", "host.wfx_notrap: must be true, false"),
])
def test_wfx_notrap_mapping_is_strict(tmp_path, value, expected):
    (tmp_path / "k.deb").write_bytes(b"x")
    p = write(tmp_path, "p.yaml", f"name: p\nhost:\n  wfx_notrap: {value}\n")
    assert f"{p}:3: {expected}" in error_of(p)


def test_wfx_notrap_false_and_true(tmp_path):
    off = write(tmp_path, "off.yaml", "name: off\nhost:\n  wfx_notrap: false\n  sysctl: {kernel.a: 1}\n")
    assert [s.id for s in resolve(load_profile(off), "u", unit({}))] == ["host.sysctl.kernel.a"]
    on = write(tmp_path, "on.yaml", "name: on\nhost:\n  wfx_notrap: true\n")
    [spec] = resolve(load_profile(on), "u", unit({}))
    assert spec.params == {"wfi": "notrap", "wfe": "notrap", "kernel": None}
    assert describe(spec) == "host: stop trapping guest WFI/WFE (reboot)"
