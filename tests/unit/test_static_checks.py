"""The static checks CI runs beside the tests, as tests (README command (b) runs them): ruff over the checkout
with the rules in pyproject.toml, and mypy over the package (strict on the core packages, see pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.unit


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *argv], cwd=REPO, capture_output=True, text=True, timeout=900)


def test_ruff_finds_nothing():
    proc = _run("ruff", "check", "--no-cache", ".")
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


def test_ruff_would_see_a_problem():
    """The check is live: the same ruff, on a file with an unused import and a long line, fails."""
    bad = "import os\nx = '" + "y" * 130 + "'\n"
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--stdin-filename",
                           "orchestrator/bad.py", "-"], cwd=REPO, input=bad, capture_output=True, text=True)
    assert proc.returncode == 1 and "F401" in proc.stdout and "E501" in proc.stdout


def test_mypy_finds_nothing():
    """pyproject.toml's [tool.mypy]: the whole package, strict on core, stats, journal, changes, facts and the
    run context and transaction."""
    proc = _run("mypy", "--no-incremental")
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "Success: no issues found" in proc.stdout


def test_mypy_is_strict_on_the_core(tmp_path):
    """The strict settings reach a core module: checked with an unannotated function in its place (mypy's
    --shadow-file; the source tree is not touched), orchestrator/core/duration.py is an error."""
    target = REPO / "orchestrator" / "core" / "duration.py"
    shadow = tmp_path / "duration.py"
    shadow.write_text(target.read_text() + "\n\ndef untyped(x):\n    return x\n")
    proc = _run("mypy", "--no-incremental", "--shadow-file", str(target), str(shadow), str(target))
    assert proc.returncode == 1 and "no-untyped-def" in proc.stdout, proc.stdout
