"""`tune diagnose` refuses bad input before it connects: the unit's address is a closed port, so any attempt to
connect would end in a connection error (exit 5), not the input error (exit 2) these tests expect."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.unit

INVENTORY = """units:
  u1:
    host: {{address: 127.0.0.1, port: 1}}
    vars: {{rt_cpus: "{rt}"}}
  u2:
    host: {{address: 127.0.0.1, port: 1}}
    guest: {{address: 127.0.0.1, port: 1, via_host: true}}
    vars: {{guest_rt_cpus: "1"}}
"""


def tune(tmp_path, *args: str, rt: str = "1") -> subprocess.CompletedProcess:
    inv = tmp_path / "inventory.yaml"
    inv.write_text(INVENTORY.format(rt=rt))
    env = {"RT_TUNE_STATE": str(tmp_path / "state"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    return subprocess.run([sys.executable, "-m", "orchestrator", "diagnose", *args, "-i", str(inv)], env=env,
                          capture_output=True, text=True, timeout=150, cwd=REPO)


@pytest.mark.parametrize("value", ["abc", "0s", "2h", "5000s"])
def test_bad_duration_is_refused_with_the_value(tmp_path, value):
    proc = tune(tmp_path, "u1", "--duration", value)
    assert proc.returncode == 2, proc.stderr
    assert "--duration" in proc.stderr and repr(value) in proc.stderr


def test_unknown_unit_and_missing_guest_are_refused(tmp_path):
    proc = tune(tmp_path, "nope")
    assert proc.returncode == 2 and "no unit 'nope'" in proc.stderr and "u1, u2" in proc.stderr, proc.stderr
    proc = tune(tmp_path, "u1", "--target", "guest")
    assert proc.returncode == 2 and "has no guest endpoint" in proc.stderr, proc.stderr


def test_bad_rt_cpus_var_is_named(tmp_path):
    proc = tune(tmp_path, "u1", rt="one-three")
    assert proc.returncode == 2, proc.stderr
    assert "rt_cpus" in proc.stderr and "one-three" in proc.stderr


def test_good_input_does_try_to_connect(tmp_path):
    """The control case: with valid input the command gets as far as the (closed) port."""
    proc = tune(tmp_path, "u2", "--duration", "5s")
    assert proc.returncode == 5, proc.stderr
    assert "127.0.0.1" in proc.stderr
