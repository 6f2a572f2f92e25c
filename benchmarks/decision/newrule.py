""""new": the rule in orchestrator/stats as it is in this checkout, through its own driving API.

The rule's settings are the playbook's (`playbooks/measurement.yaml`, `decision:`), with the run length set
to the recorded runs' and a seed per simulated decision."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from benchmarks.decision.rules import SeqRule

REPO = Path(__file__).resolve().parents[2]
PLAYBOOK = REPO / "playbooks" / "measurement.yaml"


def stats_revision() -> str:
    """The last commit touching orchestrator/stats, and whether the checkout differs from it."""
    try:
        rev = subprocess.run(["git", "log", "-1", "--format=%h %cd", "--date=format:%Y-%m-%d %H:%M",
                              "--", "orchestrator/stats"], cwd=REPO, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "orchestrator/stats"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown revision"
    return f"{rev or 'unknown'}{' + uncommitted changes in the checkout' if dirty else ''}"


def new_rule_factory(run_s: float) -> tuple[SeqRule, str, SeqRule | None]:
    """(the rule for run changes, a label saying what it is, the rule for boot changes or None when the
    committed API has no boot handling)."""
    from orchestrator.config.playbook import load_decision_rule
    from orchestrator.stats import decide

    rule = load_decision_rule(PLAYBOOK)
    fields = set(type(rule).model_fields)
    upd: dict[str, Any] = {"run_duration_s": run_s} if "run_duration_s" in fields else {}

    def make(seed: int, **extra: Any) -> Any:
        r = rule.model_copy(update={**upd, "seed": seed % (2**63), **extra})
        return decide.SequentialDecision(r)

    grouped = "boots_per_side" in fields
    what = ("group-sequential" if grouped else
            "the pre-#18 rule: the group-sequential rule has not landed, so new = old here")
    label = f"orchestrator/stats at {stats_revision()} ({what}), playbook decision settings"
    run_rule = SeqRule("new", make, run_s)
    boot_rule = None
    if grouped:
        boot_rule = SeqRule("new (boots)", lambda seed: make(seed, order="blocked"), run_s)
    return run_rule, label, boot_rule
