""""new": the rule in orchestrator/stats as it is in this checkout, through its own driving API.

The rule's settings are its own defaults (`DecisionRule()`: the design the rule was built for; the playbook may
lag behind it), or a playbook's `decision:` section when given, with the run length set to the recorded runs'
and a seed per simulated decision. "new+profile" is the same rule given the unit's stored noise profile
(`noise_sd` = the fitted within-boot SD of log p99.9), which fixes its K before the first run."""

from __future__ import annotations

import inspect
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.decision.rules import SeqRule

REPO = Path(__file__).resolve().parents[2]


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


@dataclass
class NewRules:
    run: SeqRule  # runtime changes
    label: str
    profile: SeqRule | None = None  # the same with a stored noise profile (`noise_sd`), when the API takes one
    boot: SeqRule | None = None  # boot changes (boots as units), when the API has them
    boot_more: SeqRule | None = None  # the same with twice the boots per side


def new_rule_factory(run_s: float, noise_sd: float | None = None, playbook: Path | None = None,
                     histogram_us: float = 20000) -> NewRules:
    """The committed rule with its own defaults (or a playbook's `decision:` settings), run length `run_s`, a
    seed per simulated decision."""
    from orchestrator.config.playbook import load_decision_rule
    from orchestrator.stats import decide

    rule = load_decision_rule(playbook) if playbook is not None else decide.DecisionRule()
    fields = set(type(rule).model_fields)
    upd: dict[str, Any] = {"run_duration_s": run_s} if "run_duration_s" in fields else {}
    takes_sd = "noise_sd" in inspect.signature(decide.SequentialDecision).parameters

    grouped = "boots_per_side" in fields and hasattr(decide.SequentialDecision, "next_step")
    if grouped and "bootstrap_resamples" in fields:
        # the new rule reports its bootstrap interval and decides without it: 200 resamples (the least it
        # takes) give the same decisions 4x faster (checked by tests/unit/test_decision_bench.py)
        upd["bootstrap_resamples"] = 200

    def make(seed: int, sd: float | None = None, **extra: Any) -> Any:
        r = rule.model_copy(update={**upd, "seed": seed % (2**63), **extra})
        return decide.SequentialDecision(r, noise_sd=sd) if sd is not None else decide.SequentialDecision(r)

    what = ("group-sequential" if grouped else
            "the pre-#18 rule: the group-sequential rule has not landed, so new = old here")
    where = f"the decision settings of {playbook.name}" if playbook is not None else "its default settings"
    label = f"orchestrator/stats at {stats_revision()} ({what}), {where}"
    out = NewRules(SeqRule("new", make, run_s, histogram_us), label)
    if takes_sd and noise_sd is not None:
        out.profile = SeqRule("new+profile", lambda seed: make(seed, noise_sd), run_s, histogram_us)
    if grouped:
        out.boot = SeqRule(f"new ({rule.boots_per_side} boots/side)", lambda seed: make(seed, order="blocked"), run_s,
                           histogram_us)
        more = 2 * rule.boots_per_side
        out.boot_more = SeqRule(f"new ({more} boots/side)",
                                lambda seed: make(seed, order="blocked", boots_per_side=more), run_s,
                                histogram_us)
    return out
