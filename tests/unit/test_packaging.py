"""rt-tune as a user installs it: a wheel built from this checkout, installed into a fresh virtual environment
and run from another directory, finds its own profiles and playbooks (shipped in the package by setup.py, not
found beside a source tree)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.unit


def test_a_wheel_in_a_fresh_venv_run_elsewhere_finds_rt_profile_and_its_playbooks(tmp_path):
    src = tmp_path / "src"  # the committed files only, so nothing a checkout has lying around is shipped by luck
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        if (REPO / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_bytes((REPO / rel).read_bytes())
    out = tmp_path / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src)],
                   check=True, capture_output=True, timeout=600)
    wheel, = out.glob("rt_tune-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"orchestrator/_data/profiles/rt-profile.yaml", "orchestrator/_data/playbooks/measurement.yaml",
            "orchestrator/_data/playbooks/rollout.yaml", "orchestrator/remote/scripts/pin_vcpus.py"} <= names

    venv = tmp_path / "venv"  # fresh: no pip, no site packages; rt-tune's dependencies come from this venv's
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    # the dependencies (paramiko, pydantic, ...) without this checkout's editable install: a path in a .pth file
    # is not a site directory, so the editable finder's own .pth there is never run
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "RT_TUNE"))}
    env.update(HOME=str(tmp_path / "home"), RT_TUNE_STATE=str(tmp_path / "state"))
    probe = subprocess.run([str(py), "-c", "import orchestrator, orchestrator.run.apply as a; "
                            "import orchestrator.changes.registry; "  # the remote scripts load at import
                            "print(orchestrator.__file__); print(a.DEFAULT_PLAN)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    module, plan = probe.stdout.split()
    assert module.startswith(str(site)) and plan.startswith(str(site)) and Path(plan).is_file()

    shown = subprocess.run([str(py), "-m", "orchestrator", "profile", "validate", "rt-profile", "--json"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    doc = json.loads(shown.stdout)
    assert doc["file"] == str(site / "orchestrator" / "_data" / "profiles" / "rt-profile.yaml")
