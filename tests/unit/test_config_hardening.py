"""Hostile and careless config files (issue #15, items 6-11 and 14): YAML bombs and limits on every YAML file,
`include:` never discloses a file, whole-string names, kernel CPU lists bounded before expanding, strict types
in the inventory with typed vars; and what the user sees from `tune profile validate`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.boot import cmdline as boot_cmdline
from orchestrator.boot.qemu_append import QemuAppendBackend
from orchestrator.boot.registry import BACKENDS
from orchestrator.boot.wfx import wfx_exits_fact
from orchestrator.changes.service import ServiceDisableChange
from orchestrator.changes.sysctl import SysctlChange
from orchestrator.config.inventory import BOOTLOADERS, GUEST_BOOTLOADERS, Inventory, load_inventory
from orchestrator.config.playbook import load_measurement_plan, load_rollout_policy
from orchestrator.config.profile import PROFILES_DIR, load_profile
from orchestrator.config.yamlio import MAX_BYTES, MAX_DEPTH, read_yaml
from orchestrator.core import names
from orchestrator.core.cpulist import parse_cpulist
from orchestrator.core.errors import InputError
from orchestrator.facts.sysctl import sysctl_path
from orchestrator.facts.systemd import validate_unit_name

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
SECRET = "SECRET-LINE-7f3a9c: hunter2"  # a recognisable line that must never reach an error message


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def error_of(fn, *args, **kw) -> str:
    with pytest.raises(InputError) as exc:
        fn(*args, **kw)
    return str(exc.value)


# ---- 7. YAML limits, on every YAML file rt-tune reads --------------------------------------------------
LOADERS = {"profile": load_profile, "inventory": load_inventory, "measurement plan": load_measurement_plan,
           "rollout playbook": load_rollout_policy}


def billion_laughs() -> str:
    """The classic: 9 levels of 9 aliases each, 565 bytes of YAML that expand to 9**9 strings."""
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, cur in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("what", LOADERS)
def test_alias_bomb_is_refused_at_once(tmp_path, what):
    bomb = billion_laughs()
    assert len(bomb) < 600
    p = write(tmp_path / "bomb.yaml", bomb)
    start = time.monotonic()
    msg = error_of(LOADERS[what], p)
    assert time.monotonic() - start < 2
    assert f"{p}:1: YAML anchors and aliases (&name, *name, <<: *name) are not allowed" in msg
    # an alias alone (no anchor on that line), and a merge key, name their own line
    p2 = write(tmp_path / "alias.yaml", "x: 1\ny: *x\n")
    assert f"{p2}:2: YAML anchors and aliases" in error_of(LOADERS[what], p2)
    p3 = write(tmp_path / "merge.yaml", "name: m\nbase: {a: 1}\nhost:\n  <<: &m {a: 1}\n")
    assert f"{p3}:4: YAML anchors and aliases" in error_of(LOADERS[what], p3)


@pytest.mark.parametrize("what", LOADERS)
def test_deep_nesting_is_refused_before_the_composer_recurses(tmp_path, what):
    flow = write(tmp_path / "flow.yaml", "a: " + "[" * 100_000 + "]" * 100_000 + "\n")
    assert f"{flow}:1: nested deeper than {MAX_DEPTH} levels" in error_of(LOADERS[what], flow)
    block = write(tmp_path / "block.yaml", "a:\n" + "".join(" " * i + "- \n" for i in range(1, 200)))
    assert f"{block}:{MAX_DEPTH + 1}: nested deeper than {MAX_DEPTH} levels" in error_of(LOADERS[what], block)
    ok = write(tmp_path / "ok.yaml", "a: " + "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1) + "\n")
    assert read_yaml(ok) is not None  # the limit itself is fine: the top mapping and 63 lists


@pytest.mark.parametrize("what", LOADERS)
def test_size_limit(tmp_path, what):
    big = write(tmp_path / "big.yaml", "name: big\n" + "# padding\n" * (MAX_BYTES // 10))
    start = time.monotonic()
    msg = error_of(LOADERS[what], big)
    assert time.monotonic() - start < 1  # refused from its size, unread
    assert f"{big}: {big.stat().st_size} bytes is larger than the {MAX_BYTES} bytes" in msg


@pytest.mark.parametrize("text, line, expected", [
    ("a: !!binary aGk=\n", 1, "YAML tags (!!binary) are not allowed"),
    ("a: 1\nb: !!python/object:os.system x\n", 2, "YAML tags (!!python/object:os.system)"),
    ("a: !foo bar\n", 1, "YAML tags (!foo) are not allowed"),
    ("a: " + "9" * 5000 + "\n", 1, "a number of 5000 digits; the limit is 1000"),
    ("a: b\x00\n", 1, "not valid YAML: unacceptable character #x0000"),
    (b"a: \xe9t\xe9\n", 1, "not UTF-8 text"),
    ("name: a\nname: b\n", 2, "not valid YAML: duplicate key"),
    ("a: [\n", 2, "not valid YAML: expected the node content"),
])
def test_other_yaml_refusals_name_file_and_line(tmp_path, text, line, expected):
    p = write(tmp_path / "x.yaml", text)
    for load in LOADERS.values():
        msg = error_of(load, p)
        assert f"{p}:{line}: " in msg and expected in msg, msg


def test_not_a_regular_file(tmp_path):
    assert "not a regular file" in error_of(read_yaml, Path("/dev/zero"))
    assert "not a regular file" in error_of(read_yaml, tmp_path)


def test_duplicate_key_error_quotes_no_value(tmp_path):
    p = write(tmp_path / "dup.yaml", f"token: {SECRET}\ntoken: {SECRET}2\n")
    assert "SECRET" not in error_of(load_profile, p)


# ---- 8. include never discloses a file -----------------------------------------------------------------
def test_include_must_be_a_yaml_file_inside_the_including_files_directory(tmp_path):
    secret_dir = tmp_path / "elsewhere"
    write(secret_dir / "shadow", SECRET + "\n")
    write(secret_dir / "secret.yaml", SECRET + "\n")
    (tmp_path / "profiles").mkdir()
    os.symlink(secret_dir / "secret.yaml", tmp_path / "profiles" / "link.yaml")
    write(tmp_path / "profiles" / "notes.txt", SECRET + "\n")
    os.symlink(tmp_path / "profiles" / "notes.txt", tmp_path / "profiles" / "notes.yaml")
    cases = {
        str(secret_dir / "shadow"): "an include names a *.yaml or *.yml file",
        "/etc/shadow": "an include names a *.yaml or *.yml file",
        "../elsewhere/secret.yaml": f"this one is {secret_dir / 'secret.yaml'}",
        str(secret_dir / "secret.yaml"): f"this one is {secret_dir / 'secret.yaml'}",
        "link.yaml": f"this one is {secret_dir / 'secret.yaml'}",
        "notes.yaml": f"this one is a link to {tmp_path / 'profiles' / 'notes.txt'}",
    }
    for name, why in cases.items():
        top = write(tmp_path / "profiles" / "top.yaml", f"name: top\ninclude: [{json.dumps(name)}]\n")
        msg = error_of(load_profile, top)
        assert f"{top}:2: include.0: " in msg and why in msg, msg
        assert "SECRET" not in msg and "hunter2" not in msg, msg


@pytest.mark.parametrize("content", [
    SECRET + "\n",  # plain text: YAML reads it as one string
    f"- {SECRET}\n- more\n",  # a list
    "TOKEN: SECRET-LINE-7f3a9c\nPASSWORD: hunter2\n",  # a mapping that is not a profile
    f"{SECRET}: [unclosed\n",  # not YAML
    f"a: {SECRET}\n\tb: 1\n",  # not YAML (a tab)
    f"name: x\nname: {SECRET}\n",  # duplicate key
])
def test_a_file_that_is_not_a_profile_is_named_never_quoted(tmp_path, content):
    secret = write(tmp_path / "secret.yaml", content)
    top = write(tmp_path / "top.yaml", "name: top\ninclude: [secret.yaml]\n")
    for path in (top, secret):  # included, or given as the profile itself
        msg = error_of(load_profile, path)
        assert str(secret) in msg
        assert "SECRET" not in msg and "hunter2" not in msg, msg


def test_includes_are_relative_to_the_including_file_and_may_use_the_shipped_profiles(tmp_path, monkeypatch):
    write(tmp_path / "p" / "sub" / "base.yaml", "guest: {sysctl: {kernel.a: '1'}}\n")
    write(tmp_path / "p" / "sub" / "mid.yaml", "include: [base.yaml]\nguest: {sysctl: {kernel.b: '2'}}\n")
    shipped = PROFILES_DIR / "rt-profile.yaml"
    top = write(tmp_path / "p" / "top.yaml", f"name: top\ninclude: [sub/mid.yaml, {shipped}]\n")
    monkeypatch.chdir(tmp_path)  # not the profile's directory
    prof = load_profile(top)
    assert [f.name for f in prof.files] == ["base.yaml", "mid.yaml", "realtime-virtual-host.yaml",
                                            "realtime-virtual-guest.yaml", "rt-profile.yaml", "top.yaml"]
    assert prof.guest is not None
    assert set(prof.guest.sysctl) == {"kernel.a", "kernel.b", "kernel.timer_migration", "kernel.nmi_watchdog",
                                      "vm.stat_interval", "kernel.watchdog_cpumask"}


def test_the_cli_never_prints_a_secret(tmp_path):
    write(tmp_path / "shadow", SECRET + "\n")
    top = write(tmp_path / "top.yaml", f"name: top\ninclude: [{tmp_path / 'shadow'}]\n")
    for path in (top, tmp_path / "shadow"):
        res = tune(tmp_path, "profile", "validate", str(path))
        assert res.returncode == 2 and "SECRET" not in res.stdout + res.stderr, res
        assert "Traceback" not in res.stderr


# ---- 9. whole-string names: every validator, every control character -----------------------------------
def _profile_check(tmp_path: Path, build, vars: dict | None = None):
    def check(value: str) -> None:
        write(tmp_path / "base.yaml", "guest: {}\n")
        p = write(tmp_path / "v.yaml", json.dumps({"name": "v", **build(value)}))
        load_profile(p, vars)
    return check


def _inventory_check(tmp_path: Path, build):
    def check(value: str) -> None:
        doc = {"units": {"robot1": {"host": {"address": "10.0.0.5"}}}}
        build(doc, value)
        load_inventory(write(tmp_path / "inv.yaml", json.dumps(doc)))
    return check


def _validators(tmp_path: Path) -> dict:
    """name -> (a good value, a function that raises InputError/ValueError on a bad one)."""
    def prof(build):
        return _profile_check(tmp_path, build)

    def inv(build):
        return _inventory_check(tmp_path, build)

    def unit(doc: dict) -> dict:
        return doc["units"]["robot1"]

    return {
        "names.check_unit_name": ("rt-guest-vm.service", names.check_unit_name),
        "names.service_to_disable": ("foo.service", names.service_to_disable),
        "names.check_sysctl_name": ("kernel.timer_migration", names.check_sysctl_name),
        "validate_unit_name": ("foo.service", validate_unit_name),
        "sysctl_path": ("kernel.timer_migration", sysctl_path),
        "cpulist.parse_cpulist": ("1-3", parse_cpulist),
        "changes.ServiceDisableChange": ("foo.service", ServiceDisableChange),
        "changes.SysctlChange.name": ("kernel.timer_migration", lambda v: SysctlChange(v, "0")),
        "changes.SysctlChange.value": ("4 4 1 7", lambda v: SysctlChange("kernel.printk", v)),
        "boot.cmdline.key": ("quiet", lambda v: boot_cmdline.validate({v: None})),
        "boot.cmdline.value": ("1-3", lambda v: boot_cmdline.validate({"nohz_full": v})),
        "boot.wfx.vm_dir": ("1234-11", wfx_exits_fact),
        "boot.qemu_append.service": ("rt-guest-vm.service", QemuAppendBackend),
        "profile.cmdline.key": ("quiet", prof(lambda v: {"host": {"cmdline": {v: None}}})),
        "profile.cmdline.value": ("1", prof(lambda v: {"host": {"cmdline": {"skew_tick": v}}})),
        "profile.cpulist": ("0", prof(lambda v: {"host": {"irq_affinity": {"housekeeping": v}}})),
        "profile.sysctl.name": ("kernel.x", prof(lambda v: {"host": {"sysctl": {v: "1"}}})),
        "profile.sysctl.value": ("1 2", prof(lambda v: {"host": {"sysctl": {"kernel.x": v}}})),
        "profile.service": ("foo.service", prof(lambda v: {"guest": {"services": {"disable": [v]}}})),
        "profile.service_var": ("rt-guest-vm", _profile_var_check(tmp_path)),
        "profile.kernel.release": ("6.1.0-41-arm64", prof(
            lambda v: {"host": {"kernel": {"package": "linux-image-arm64", "release": v}}})),
        "profile.kernel.package": ("linux-image-arm64", prof(lambda v: {"host": {"kernel": {"package": v}}})),
        "profile.include": ("base.yaml", prof(lambda v: {"include": [v]})),
        "inventory.unit_name": ("robot1", inv(lambda d, v: d.update(units={v: {"host": {"address": "h"}}}))),
        "inventory.group_name": ("arm", inv(lambda d, v: d.update(groups={v: ["robot1"]}))),
        "inventory.address": ("10.0.0.5", inv(lambda d, v: unit(d)["host"].update(address=v))),
        "inventory.user": ("tuner", inv(lambda d, v: unit(d)["host"].update(user=v))),
        "inventory.key": ("/k/id", inv(lambda d, v: unit(d)["host"].update(key=v))),
        "inventory.known_hosts": ("/k/kh", inv(lambda d, v: unit(d)["host"].update(known_hosts=v))),
        "inventory.var_name": ("my_var", inv(lambda d, v: unit(d).update(vars={v: "x"}))),
        "inventory.qemu_service": ("rt-guest-vm", inv(lambda d, v: unit(d).update(vars={"qemu_service": v}))),
        "inventory.rt_cpus": ("1-3", inv(lambda d, v: unit(d).update(vars={"rt_cpus": v}))),
        "inventory.libvirt_domain": ("vm1", inv(lambda d, v: unit(d).update(vars={"libvirt_domain": v}))),
        "inventory.bootloader": ("grub", inv(lambda d, v: unit(d).update(vars={"bootloader": v}))),
    }


def _profile_var_check(tmp_path: Path):
    """A value that arrives through ${var} is checked like a literal one."""
    def check(value: str) -> None:
        doc = {"name": "v", "guest": {"services": {"disable": ["${svc}"]}}}
        p = write(tmp_path / "var.yaml", json.dumps(doc))
        load_profile(p, {"svc": value})
    return check


CONTROL = {"newline": "\n", "return": "\r", "tab": "\t", "nul": "\x00", "line-separator": "\u2028"}


@pytest.mark.parametrize("where", ["appended", "embedded"])
@pytest.mark.parametrize("char", CONTROL)
def test_every_validator_refuses_control_characters(tmp_path, char, where):
    for name, (good, check) in _validators(tmp_path).items():
        check(good)  # the baseline passes, so a refusal below is the character's doing
        c = CONTROL[char]
        half = len(good) // 2 or 1
        bad = good + c if where == "appended" else good[:half] + c + good[half:]
        with pytest.raises((InputError, ValueError)):
            check(bad)
            pytest.fail(f"{name} accepted {bad!r}")


# ---- 6 and 10. CPU lists in a profile ------------------------------------------------------------------
def test_a_huge_cpu_range_in_a_profile_is_refused_unexpanded(tmp_path):
    p = write(tmp_path / "p.yaml", 'name: p\nhost:\n  cmdline:\n    nohz_full: "0-99999999999"\n')
    start = time.monotonic()
    msg = error_of(load_profile, p)
    assert f"{p}:4: host.cmdline.nohz_full: CPU 99999999999 is above 8191, the highest CPU number" in msg
    msg = error_of(load_profile, p, {"cpus": 4})
    assert "CPU 99999999999 outside the unit's host CPUs 0-3 (4 CPUs) (got '0-99999999999')" in msg
    assert time.monotonic() - start < 2


@pytest.mark.parametrize("text", ["1_0", "+1", " 1 , 2 ", "١", "1,,2", "all", "0-3:3/2"])
def test_cpu_lists_the_kernel_refuses_are_refused(tmp_path, text):
    p = write(tmp_path / "p.yaml", f"name: p\nhost:\n  irq_affinity:\n    housekeeping: {json.dumps(text)}\n")
    msg = error_of(load_profile, p)
    assert f"{p}:4: host.irq_affinity.housekeeping: not a kernel CPU list" in msg


def test_the_kernels_stride_groups_are_cpu_lists(tmp_path):
    p = write(tmp_path / "p.yaml", 'name: p\nhost:\n  irq_affinity: {housekeeping: "0-7:1/2"}\n')
    from orchestrator.config.inventory import UnitSpec
    from orchestrator.config.profile import resolve

    spec = UnitSpec.model_validate({"host": {"address": "h"}, "vars": {"cpus": 8}})
    assert resolve(load_profile(p), "u", spec)[0].params == {"housekeeping": [0, 2, 4, 6]}


# ---- 14. services: what `disable` takes ----------------------------------------------------------------
@pytest.mark.parametrize("unit, message", [
    ("dev-sda2.swap", ("a .swap unit is not a service to disable: `services: disable:` takes .service, "
                       ".socket, .timer, .path units")),
    ("home.mount", "a .mount unit is not a service to disable"),
    ("multi-user.target", "a .target unit is not a service to disable"),
    ("getty@.service", "a template: name an instance such as getty@NAME.service"),
    ("foo\\bar", "not a systemd unit name"),
])
def test_services_disable_refuses_what_is_not_a_service(tmp_path, unit, message):
    p = write(tmp_path / "p.yaml", f"name: p\nguest:\n  services:\n    disable: [ok, {json.dumps(unit)}]\n")
    msg = error_of(load_profile, p)
    assert f"{p}:4: guest.services.disable.1: " in msg and message in msg, msg
    assert "disable.0" not in msg


# ---- 11. strict types and typed vars in the inventory --------------------------------------------------
INVENTORY = """\
units:
  robot1:
    host: {address: 10.0.0.5, user: tuner, port: 22, become: true}
    guest: {address: 192.168.122.10, via_host: true}
    vars:
      cpus: 4
      guest_cpus: 4
      rt_cpus: "1-3"
      housekeeping_cpus: "0"
      guest_rt_cpus: "1-3"
      qemu_service: rt-guest-vm
      bootloader: grub
      governor: off
      lab: false
groups:
  arm: [robot1]
"""


def test_the_good_inventory_loads_with_its_vars_as_written(tmp_path):
    inv = load_inventory(write(tmp_path / "inv.yaml", INVENTORY))
    assert inv.unit("robot1").vars == {
        "cpus": 4, "guest_cpus": 4, "rt_cpus": "1-3", "housekeeping_cpus": "0", "guest_rt_cpus": "1-3",
        "qemu_service": "rt-guest-vm", "bootloader": "grub", "governor": "off", "lab": False}
    assert Inventory.model_validate({"units": {"u": {"host": {"address": "h"}, "vars": {"rt_cpus": 1}}}}) \
        .unit("u").vars == {"rt_cpus": "1"}  # a single CPU may be written as a number


@pytest.mark.parametrize("old, new, line, expected", [
    ("port: 22", "port: true", 3, "units.robot1.host.port: Input should be a valid integer (got True)"),
    ("port: 22", "port: '22'", 3, "units.robot1.host.port: Input should be a valid integer (got '22')"),
    ("port: 22", "port: 0x16", None, None),  # YAML 1.2's hexadecimal integer 22: an integer
    ("port: 22", "port: 70000", 3, "less than or equal to 65535 (got 70000)"),
    ("become: true", "become: 'yes'", 3, "units.robot1.host.become: Input should be a valid boolean (got 'y"),
    ("become: true", "become: off", 3, "units.robot1.host.become: Input should be a valid boolean (got 'off"),
    ("become: true", "become: 1", 3, "units.robot1.host.become: Input should be a valid boolean (got 1)"),
    ("via_host: true", "via_host: 'true'", 4, "units.robot1.guest.via_host: Input should be a valid boolean"),
    ("cpus: 4", "cpus: abc", 6, "units.robot1.vars.cpus: Input should be a valid integer (got 'abc')"),
    ("cpus: 4", "cpus: '4'", 6, "units.robot1.vars.cpus: Input should be a valid integer (got '4')"),
    ("cpus: 4", "cpus: true", 6, "units.robot1.vars.cpus: Input should be a valid integer (got True)"),
    ("cpus: 4", "cpus: 0", 6, "units.robot1.vars.cpus: Input should be greater than or equal to 1 (got 0)"),
    ("cpus: 4", "cpus: 99999999999", 6, "Input should be less than or equal to 8192 (got 99999999999)"),
    ("cpus: 4", "cpus: 4.0", 6, "units.robot1.vars.cpus: Input should be a valid integer (got 4.0)"),
    ("cpus: 4", "cpus:", 6, "units.robot1.vars.cpus: Input should be a valid integer (got None)"),
    ('rt_cpus: "1-3"', 'rt_cpus: "1-5"', 8,
     "units.robot1.vars.rt_cpus: CPUs 4-5 are outside the 4 CPUs of `cpus` (0-3) (got '1-5')"),
    ('rt_cpus: "1-3"', 'rt_cpus: "1_0"', 8, "units.robot1.vars.rt_cpus: not a kernel CPU list '1_0'"),
    ('rt_cpus: "1-3"', 'rt_cpus: "0-99999999999"', 8, "CPU 99999999999 is above the highest CPU number 8191"),
    ('rt_cpus: "1-3"', 'rt_cpus: ""', 8, "units.robot1.vars.rt_cpus: must name at least one CPU"),
    ('rt_cpus: "1-3"', "rt_cpus: [1, 2]", 8, 'units.robot1.vars.rt_cpus: must be a CPU list string such as'),
    ('housekeeping_cpus: "0"', 'housekeeping_cpus: "0-1"', 9,
     "units.robot1.vars.housekeeping_cpus: CPU 1 is also in rt_cpus (1-3)"),
    ('guest_rt_cpus: "1-3"', 'guest_rt_cpus: "4"', 10,
     "units.robot1.vars.guest_rt_cpus: CPU 4 is outside the 4 CPUs of `guest_cpus`"),
    ("qemu_service: rt-guest-vm", "qemu_service: vm.socket", 11,
     "qemu_service: a .socket unit; expected .service (got 'vm.socket')"),
    ("qemu_service: rt-guest-vm", "qemu_service: '-H'", 11, "qemu_service: not a valid QEMU service: lett"),
    ("bootloader: grub", "bootloader: lilo", 12, "units.robot1.vars.bootloader: Input should be 'grub'"),
    ("bootloader: grub", "bootloader: qemu-append", 12, "units.robot1.vars.bootloader: Input should be"),
    ("governor: off", "governor: {a: 1}", 13, "units.robot1.vars.governor: a var must be a string, an integ"),
    ("governor: off", "governor: 6.10", 13, "quote a number such as 6.10"),
    ("governor: off", "governor:", 13, "units.robot1.vars.governor: a var must be"),
    ("governor: off", "bad-name: x", 13, "units.robot1.vars.bad-name: a var name must match [A-Za-z_]"),
    ("lab: false", "lab: 'yes'", 14, "units.robot1.vars.lab: Input should be a valid boolean (got 'yes')"),
    ("arm: [robot1]", "arm: [robot9]", 15, "groups: group arm: no unit 'robot9' in the inventory; units: r"),
    ("arm: [robot1]", "arm: robot1", 16, "groups.arm: Input should be a valid list (got 'robot1')"),
    ("robot1:\n", "'robot 1':\n", 2, "units.robot 1.[key]: a unit name must match"),
    ("  robot1:\n    host:", "  robot1:\n    power_cycle: []\n    host:", 3,
     "units.robot1.power_cycle: must be a command as a non-empty list"),
    ("  robot1:\n    host:", "  robot1:\n    guest_power_cycle: ['', x]\n    host:", 3,
     "units.robot1.guest_power_cycle: must be a command as a non-empty list"),
    ("  robot1:\n    host:", '  robot1:\n    power_cycle: ["a\\0b"]\n    host:', 3, "cannot contain a NUL"),
])
def test_strict_types_and_typed_vars(tmp_path, old, new, line, expected):
    text = INVENTORY.replace(old, new, 1)
    assert text != INVENTORY
    p = write(tmp_path / "inv.yaml", text)
    if expected is None:
        assert load_inventory(p).endpoint("robot1").port == 22
        return
    msg = error_of(load_inventory, p)
    assert expected in msg, msg
    assert f"{p}:{line}: " in msg, msg
    assert "Value error" not in msg


def test_bootloader_choices_are_the_registrys():
    assert set(GUEST_BOOTLOADERS) == set(BACKENDS)
    assert set(BOOTLOADERS) == set(BACKENDS) - {"qemu-append", "libvirt"}


def test_the_lab_inventory_still_validates(tmp_path):
    from orchestrator.lab.lab import QEMU_SERVICE, ROLE_CPUS

    host = {"address": "127.0.0.1", "port": 2222, "key": "/k", "known_hosts": "/kh"}
    doc = {"units": {"lab1": {"host": host,
                              "power_cycle": [sys.executable, "-m", "orchestrator", "lab", "power-cycle"],
                              "vars": {"rt_cpus": "1", "housekeeping_cpus": "0", "guest_rt_cpus": "1",
                                       "cpus": ROLE_CPUS["host"], "guest_cpus": ROLE_CPUS["guest"],
                                       "qemu_service": QEMU_SERVICE, "lab": True, "arch": "x86_64",
                                       "guest_bootloader": "qemu-append"}}},
           "groups": {"lab": ["lab1"]}}
    assert Inventory.model_validate(doc).unit("lab1").vars["guest_bootloader"] == "qemu-append"


# ---- the user's view: `tune profile validate` ----------------------------------------------------------
def tune(cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RT_TUNE_STATE": str(cwd / "state"), "RT_TUNE_CACHE": str(cwd / "cache"),
           "RT_TUNE_INVENTORY": str(cwd / "no-inventory.yaml")}
    return subprocess.run([sys.executable, "-m", "orchestrator", *argv], cwd=cwd, env=env, check=False,
                          capture_output=True, text=True, timeout=120)


def test_hostile_profiles_through_the_cli(tmp_path):
    cases = {
        "bomb.yaml": (billion_laughs(), "YAML anchors and aliases"),
        "deep.yaml": ("a: " + "[" * 100_000 + "]" * 100_000 + "\n", "nested deeper than 64 levels"),
        "cpus.yaml": ('name: c\nhost: {cmdline: {nohz_full: "0-99999999999"}}\n', "CPU 99999999999 is above"),
        "newline.yaml": ('name: n\nhost: {cmdline: {"quiet\\n": null}}\n', "not a kernel argument name"),
        "swap.yaml": ("name: s\nguest: {services: {disable: [dev-sda2.swap]}}\n", "not a service to disable"),
    }
    for name, (text, expected) in cases.items():
        p = write(tmp_path / name, text)
        res = tune(tmp_path, "profile", "validate", str(p))
        assert res.returncode == 2, (name, res)
        assert expected in res.stderr + res.stdout, (name, res)
        assert "Traceback" not in res.stderr, (name, res.stderr)


def test_the_shipped_profile_validates_for_the_lab_vars(tmp_path):
    inv = write(tmp_path / "inv.yaml", json.dumps({"units": {"lab1": {
        "host": {"address": "127.0.0.1", "port": 2230}, "guest": {"address": "127.0.0.1", "port": 2231},
        "vars": {"rt_cpus": "1", "housekeeping_cpus": "0", "guest_rt_cpus": "1", "guest_housekeeping_cpus": "0",
                 "qemu_service": "rt-guest-vm.service", "cpus": 2, "guest_cpus": 2}}}}))
    res = tune(tmp_path, "profile", "validate", str(REPO / "profiles" / "rt-profile.yaml"), "-i", str(inv))
    assert res.returncode == 0, res
    assert "valid profile 'rt-profile'" in res.stdout
