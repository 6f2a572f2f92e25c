"""`tune profile show` (issue #20): every value of a merged profile with the file and line that set it, what it
overrode (includes and overrides visible), and the change it becomes, resolved for a unit when one is named."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from orchestrator.config.inventory import Inventory
from orchestrator.config.profile import load_profile, profile_lines, resolve
from tests.conftest import REPO

pytestmark = pytest.mark.unit

BASE = """\
name: base
host:
  sysctl:
    kernel.timer_migration: "1"
    vm.stat_interval: "10"
  services:
    disable: [foo.service]
"""
TOP = """\
name: top
include: [base.yaml]
host:
  sysctl:
    kernel.timer_migration: "0"
  sysfs:
    transparent_hugepage: never
  cmdline:
    nohz_full: "${rt_cpus}"
"""


@pytest.fixture
def files(tmp_path):
    (tmp_path / "base.yaml").write_text(BASE)
    (tmp_path / "top.yaml").write_text(TOP)
    return tmp_path


def test_each_value_names_the_file_and_line_that_set_it_and_what_it_overrode(files):
    lines = {line.key: line for line in profile_lines(load_profile(files / "top.yaml"))}
    tm = lines["host.sysctl.kernel.timer_migration"]
    assert (tm.value, tm.source, tm.overrides) == ("0", f"{files}/top.yaml:5", [f"{files}/base.yaml:4: '1'"])
    assert (tm.change, tm.kind) == ("host.sysctl.kernel.timer_migration", "sysctl")
    stat = lines["host.sysctl.vm.stat_interval"]
    assert stat.source == f"{files}/base.yaml:5" and stat.overrides == []  # inherited, untouched
    assert lines["host.services.disable.0"].change == "host.service.foo.service"
    assert lines["host.services.disable.0"].kind == "service_disable"
    assert lines["host.sysfs.transparent_hugepage"].kind == "sysfs"
    assert lines["host.cmdline.nohz_full"].value == "${rt_cpus}"  # as written: no unit, no substitution
    assert lines["name"].overrides == [f"{files}/base.yaml:1: 'base'"] and lines["name"].change is None


def test_resolved_for_a_unit_each_line_shows_the_change_as_it_would_be_applied(files):
    inv = Inventory.model_validate({"units": {"u": {"host": {"address": "x.invalid"},
                                                    "vars": {"cpus": 4, "rt_cpus": "1-3"}}}})
    prof = load_profile(files / "top.yaml")
    lines = {line.key: line for line in profile_lines(prof, resolve(prof, "u", inv.unit("u")))}
    assert lines["host.cmdline.nohz_full"].resolved == "host: add kernel arguments nohz_full=1-3 (reboot)"
    assert lines["host.sysfs.transparent_hugepage"].resolved == "host: sysfs transparent_hugepage = never"


def test_the_command_prints_json_and_a_bad_profile_is_an_error_not_a_traceback(files, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), RT_TUNE_STATE=str(tmp_path / "state"))

    def tune(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "orchestrator", "profile", "show", *args], cwd=files, env=env,
                              capture_output=True, text=True, timeout=60)

    out = tune("top.yaml", "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["files"] == ["base.yaml", "top.yaml"]  # as reached from the working directory
    assert {"key": "host.sysctl.kernel.timer_migration", "source": "top.yaml:5"}.items() <= \
        next(x for x in doc["lines"] if x["key"] == "host.sysctl.kernel.timer_migration").items()
    (files / "bad.yaml").write_text("name: bad\nhost:\n  sysfs:\n    transparent_hugepage: off\n")
    bad = tune("bad.yaml")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "bad.yaml:4: host.sysfs.transparent_hugepage: expected one of always, madvise, never" in bad.stderr
    human = tune("top.yaml")
    assert human.returncode == 0 and "base.yaml" in human.stdout
