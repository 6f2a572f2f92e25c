"""`tune ab` on a real lab unit: ABBA blocks of cyclictest runs under load, each side's changes applied and
undone through the journal, a report with the difference, its bootstrap CI and Cliff's delta, and plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.journal.journal import Journal
from tests.fleet.test_rollout import PROFILE, live, tune

pytestmark = pytest.mark.lab

HERE = Path(__file__).resolve().parent
A = str(HERE / "profile-timer-migration-on.yaml")
FAST = str(HERE.parent / "lab" / "playbook-fast.yaml")


def test_ab_alternates_abba_reports_effects_and_leaves_the_unit_as_found(fleet_lab, fleet_paths, tmp_path):
    assert live(fleet_paths, "lab2") == ("1", False)
    html = tmp_path / "ab.html"
    proc = tune(fleet_paths, "ab", A, PROFILE, "--unit", "lab2", "--rounds", "2", "--runs", "2",
                "--playbook", FAST, "--html", str(html), "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["order"] == ["A", "A", "B", "B", "B", "B", "A", "A"]  # ABBA, 2 runs per block
    effects = {e["metric"]: e for e in result["effects"]}
    assert {"p99_us", "p999_us", "max_us"} <= set(effects)
    for e in effects.values():
        assert e["ci_low"] <= e["ci_high"]
        assert -1.0 <= e["cliffs_delta"] <= 1.0
        assert e["verdict"] in ("B better", "A better", "no difference shown")
    saved = json.loads(Path(result["report"]).read_text())
    assert [len(arm["runs"]) for arm in saved["arms"]] == [4, 4]
    # real 1 s runs at 1 kHz (fewer cycles under TCG, where the loop overruns; 1,000 at most)
    assert all(300 < r["all"]["samples"] <= 1010 for arm in saved["arms"] for r in arm["runs"])
    page = html.read_text()
    assert page.count("data:image/png;base64,") >= 3 and "Cliff" in page
    assert live(fleet_paths, "lab2") == ("1", False)  # as found: no drop-in left, timer migration back on
    with Journal(fleet_paths.state / "journal.sqlite") as j:
        recs = [r for r in j.history("lab2") if r.change_id.startswith("ab.")]
        assert {r.change_id for r in recs} == {"ab.A.host.sysctl.kernel.timer_migration",
                                               "ab.B.host.sysctl.kernel.timer_migration"}
        assert all(r.state == "rolled_back" for r in recs) and len(recs) == 3  # blocks A | B B | A
        assert not j.incomplete("lab2") and not j.active_changes("lab2")
