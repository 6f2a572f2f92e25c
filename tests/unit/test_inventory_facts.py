"""Inventory and YAML errors (file, line, key, value), and fact parsers on output recorded from the lab."""

from __future__ import annotations

import pytest

from orchestrator.config.inventory import load_inventory, split_target
from orchestrator.core.cpulist import parse_kernel_cpulist
from orchestrator.core.errors import InputError, ParseError
from orchestrator.facts.base import ARCH, BOOT_ID, CMDLINE, CPUS_ONLINE, KERNEL_RELEASE
from tests.conftest import RECORDED

pytestmark = pytest.mark.unit

GOOD = """\
units:
  robot1:
    host: {address: 10.0.0.5, user: tuner, become: true, key: /k}
    guest: {address: 192.168.122.10, via_host: true}
    vars: {rt_cpus: "1-3", governor: off}
groups:
  arm: [robot1]
"""


def test_inventory_loads_and_builds_endpoints(tmp_path):
    p = tmp_path / "inv.yaml"
    p.write_text(GOOD)
    inv = load_inventory(p)
    host = inv.endpoint("robot1", "host")
    guest = inv.endpoint("robot1", "guest")
    assert (host.user, host.become, host.key_file) == ("tuner", True, "/k")
    assert guest.jump == host and guest.host == "192.168.122.10"
    assert inv.units["robot1"].vars["governor"] == "off"  # YAML 1.2: `off` stays a string


def test_inventory_error_names_file_line_key_and_value(tmp_path):
    p = tmp_path / "inv.yaml"
    p.write_text(GOOD.replace("user: tuner", "user: 'tu ner'").replace("vars:", "colour: red\n    vars:"))
    with pytest.raises(InputError) as exc:
        load_inventory(p)
    msg = str(exc.value)
    assert f"{p}:3: units.robot1.host.user" in msg and "'tu ner'" in msg
    assert f"{p}:5: units.robot1.colour" in msg and "Extra inputs are not permitted" in msg


def test_inventory_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(InputError, match="tune lab up"):
        load_inventory(tmp_path / "nope.yaml")
    p = tmp_path / "bad.yaml"
    p.write_text("units:\n  a: [\n")
    with pytest.raises(InputError, match=rf"{p}:\d+: not valid YAML"):
        load_inventory(p)


def test_unknown_unit_lists_the_known_ones(tmp_path):
    p = tmp_path / "inv.yaml"
    p.write_text(GOOD)
    with pytest.raises(InputError, match="robot1"):
        load_inventory(p).unit("robot9")


def test_split_target():
    assert split_target("lab1") == ("lab1", "host")
    assert split_target("lab1.guest") == ("lab1", "guest")
    with pytest.raises(InputError, match="UNIT.guest"):
        split_target("lab1.gust")


def _rec(name: str) -> str:
    return (RECORDED / "lab-x86" / name).read_text()


def test_fact_parsers_on_recorded_lab_output():
    assert KERNEL_RELEASE.parse(_rec("host-uname-r.txt")) == "6.1.0-50-amd64"
    assert ARCH.parse(_rec("host-uname-m.txt")) == "x86_64"
    assert CPUS_ONLINE.parse(_rec("host-cpu-online.txt")) == [0, 1]
    assert CMDLINE.parse(_rec("host-proc-cmdline.txt")).endswith("panic=10")
    assert BOOT_ID.parse(_rec("host-boot_id.txt")) == "3cb44cdb-a139-4488-8161-6b707f123119"


def test_cpu_list_forms_and_garbage():
    assert parse_kernel_cpulist("0-3,5,8-9\n") == [0, 1, 2, 3, 5, 8, 9]
    assert parse_kernel_cpulist("\n") == []
    for bad in ("a-b", "3-1", "1,,2"):
        with pytest.raises(ParseError):
            parse_kernel_cpulist(bad)


def test_truncated_output_is_an_error_not_an_empty_fact():
    with pytest.raises(ParseError):
        BOOT_ID.parse("")
    with pytest.raises(ParseError):
        BOOT_ID.parse("3cb44cdb-a139")
    with pytest.raises(ParseError):
        CMDLINE.parse("a\nb\n")


def test_ssh_config_fills_what_the_inventory_leaves_out(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # ~/.ssh/config
    (tmp_path / ".ssh").mkdir()
    (tmp_path / "robot").write_text("a key file")
    (tmp_path / ".ssh" / "config").write_text("Host robot1-host\n  HostName 10.1.2.3\n  Port 2222\n  User tuner\n"
                                              f"  IdentityFile {tmp_path}/robot\n")
    p = tmp_path / "inv.yaml"
    p.write_text("units:\n  r1:\n    host: {address: robot1-host}\n  r2:\n    host: {address: robot1-host, "
                 "port: 22, user: root}\n")
    inv = load_inventory(p)
    e1 = inv.endpoint("r1")
    assert (e1.host, e1.port, e1.user, e1.key_file) == ("10.1.2.3", 2222, "tuner", f"{tmp_path}/robot")
    e2 = inv.endpoint("r2")  # explicit inventory values win
    assert (e2.host, e2.port, e2.user) == ("10.1.2.3", 22, "root")
