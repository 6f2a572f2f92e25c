"""One unit-name validator with systemd's rules (used by profile, changes and facts), and the sysctl name."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from orchestrator.changes.service import ServiceDisableChange
from orchestrator.core.errors import InputError
from orchestrator.core.names import (
    DISABLE_TYPES,
    UNIT_NAME,
    UNIT_TYPES,
    InvalidName,
    check_sysctl_name,
    check_unit_name,
    service_to_disable,
    with_unit_suffix,
)
from orchestrator.facts.sysctl import sysctl_path
from orchestrator.facts.systemd import unit_state_fact, validate_unit_name

pytestmark = pytest.mark.unit

# Produced on this machine by systemd-escape (systemd 252):
#   systemd-escape -p --suffix=swap /dev/disk/by-uuid/a-b    systemd-escape --template=getty@.service "tty 1"
#   systemd-escape -p --suffix=mount "/mnt/my data"         systemd-escape --template=foo@.service "a/b:c@d"
ESCAPED = ["dev-disk-by\\x2duuid-a\\x2db.swap", "getty@tty\\x201.service", "mnt-my\\x20data.mount",
           "foo@a-b:c\\x40d.service"]


@pytest.mark.parametrize("name", [
    "foo.service", "dev-sda2.swap", "getty@tty1.service", "a@b@.service", "user@1000.service", "a.b.c.socket",
    "x:y_z.timer", "systemd-fsck-root.service", "x" * 247 + ".service", *ESCAPED,
    *(f"unit.{t}" for t in UNIT_TYPES),
])
def test_valid_unit_names(name):
    assert check_unit_name(name) == name
    assert UNIT_NAME.match(name)


@pytest.mark.parametrize("name", [
    "", "foo", ".service", "foo.", "foo.Service", "foo.bogus", "@a.service", "-rf.service", ".hidden.service",
    "x" * 248 + ".service", "foo\\bar.service", "foo\\x2.service", "a b.service", "a/b.service",
    "a;b.service",
    "é.service", "foo.service.", "foo.service\n", "foo\n.service", "foo.service\x00", 7, None,
])
def test_invalid_unit_names(name):
    with pytest.raises(InvalidName, match="not a valid systemd unit name"):
        check_unit_name(name)
    if isinstance(name, str):
        assert not UNIT_NAME.match(name)


def test_templates_only_when_asked_and_types_when_restricted():
    with pytest.raises(InvalidName, match="'getty@.service': a template: name an instance such as getty@N"):
        check_unit_name("getty@.service")
    assert check_unit_name("getty@.service", template=True) == "getty@.service"
    assert check_unit_name("a@b@.service") == "a@b@.service"  # instance "b@": systemd splits at the first @
    with pytest.raises(InvalidName, match=r"'x\.socket': a \.socket unit; expected \.service"):
        check_unit_name("x.socket", types=("service",))


@pytest.mark.skipif(shutil.which("systemd-escape") is None, reason="systemd-escape not installed")
@pytest.mark.parametrize("argv", [["-p", "--suffix=swap", "/dev/disk/by-uuid/a-b"],
                                  ["--template=getty@.service", "tty 1"],
                                  ["-p", "--suffix=mount", "/mnt/ünïcode dir"],
                                  ["--template=foo@.service", "a/b:c@d;$(reboot)"]])
def test_what_systemd_escape_writes_is_valid(argv):
    res = subprocess.run(["systemd-escape", *argv], capture_output=True, text=True, check=True)
    name = res.stdout.strip()
    assert check_unit_name(name) == name


def test_services_to_disable():
    assert service_to_disable("foo") == "foo.service"
    assert service_to_disable("foo.bar") == "foo.bar.service"  # as systemctl reads it: no known suffix
    for kind in DISABLE_TYPES:
        assert service_to_disable(f"x.{kind}") == f"x.{kind}"
    for kind in set(UNIT_TYPES) - set(DISABLE_TYPES):
        with pytest.raises(InvalidName, match=rf"a \.{kind} unit is not a service to disable"):
            service_to_disable(f"x.{kind}")
    with pytest.raises(InvalidName, match="a template"):
        service_to_disable("getty@.service")
    assert with_unit_suffix("dev-sda2.swap") == "dev-sda2.swap"


def test_service_disable_change_acts_on_the_unit_the_profile_names():
    """It appended `.service` to anything but six suffixes: `dev-sda2.swap` became dev-sda2.swap.service."""
    assert ServiceDisableChange("foo").unit == "foo.service"
    assert ServiceDisableChange("foo.socket").unit == "foo.socket"
    for bad in ("dev-sda2.swap", "home.mount", "multi-user.target", "foo.service\n", "-H.service"):
        with pytest.raises(InputError):
            ServiceDisableChange(bad)


def test_facts_uses_the_same_validator():
    assert validate_unit_name("dev-sda2.swap") == "dev-sda2.swap"
    for bad in ("foo", "foo.service\n", "getty@.service", "-x.service"):
        with pytest.raises(ValueError):
            validate_unit_name(bad)
        with pytest.raises(ValueError):
            unit_state_fact(bad)


@pytest.mark.parametrize("name, ok", [
    ("kernel.timer_migration", True), ("net.ipv4.conf.all.rp_filter", True), ("vm.stat-x_1", True),
    ("kernel", False), ("kernel..x", False), (".kernel.x", False), ("Kernel.x", False), ("kernel.x/y", False),
    ("kernel.x\n", False), ("kernel.x ", False), ("a." + "b" * 200, False), ("kernel.ｘ", False),
])
def test_sysctl_names(name, ok):
    if ok:
        assert check_sysctl_name(name) == name
        assert sysctl_path(name) == "/proc/sys/" + name.replace(".", "/")
    else:
        with pytest.raises(InvalidName, match="not a sysctl name"):
            check_sysctl_name(name)
        with pytest.raises(ValueError):
            sysctl_path(name)
