"""Every event kind rt-tune emits is in orchestrator.core.events.KINDS (and every listed kind is emitted): read
from the source with ast, so a kind built or typed somewhere else cannot drift from what consumers look for."""

from __future__ import annotations

import ast
from typing import get_args

import pytest

from orchestrator.boot.trial import TrialOutcome
from orchestrator.core.events import CHANGE_ENDED, KINDS
from orchestrator.journal.records import TRANSITIONS
from orchestrator.run.fleet import TERMINAL_CHANGE_EVENTS
from tests.unit.test_import_graph import trees

pytestmark = pytest.mark.unit

EMITTERS = ("Event", "emit", "_emit")


def kinds_in_source() -> tuple[set[str], set[str]]:
    """(literal kinds, f-string kinds as source text) passed as the first argument of an emitter, plus the
    string defaults of parameters named `kind`."""
    literal: set[str] = set()
    built: set[str] = set()
    for _, tree in trees(set()):
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):  # a kind passed on by keyword (kind="trial.dependent_power_cycle")
                for kw in node.keywords:
                    if kw.arg == "kind" and isinstance(kw.value, ast.Constant) and "." in str(kw.value.value):
                        literal.add(kw.value.value)
            if isinstance(node, ast.Call) and node.args:
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                if name not in EMITTERS:
                    continue
                first = node.args[0]
                options = [first.body, first.orelse] if isinstance(first, ast.IfExp) else [first]
                for arg in options:
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                        literal.add(arg.value)
                    elif isinstance(arg, ast.JoinedStr):
                        built.add(ast.unparse(arg))
            elif isinstance(node, ast.FunctionDef):
                args = node.args.args + node.args.kwonlyargs
                defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + node.args.defaults + \
                    node.args.kw_defaults
                for arg, default in zip(args, defaults, strict=True):
                    if arg.arg == "kind" and isinstance(default, ast.Constant) \
                            and isinstance(default.value, str):
                        literal.add(default.value)
    return literal, built


def test_every_kind_emitted_is_listed_and_every_listed_kind_is_emitted():
    literal, built = kinds_in_source()
    # the kinds built from a value, expanded over every value it can take
    expansions = {
        "f'journal.change.{state}'": {f"journal.change.{s}" for s in TRANSITIONS if s != "intent"},
        "f'trial.{result}'": {f"trial.{r}" for r in get_args(TrialOutcome.model_fields["result"].annotation)},
    }
    assert built == set(expansions), built  # a new built kind must be expanded here
    emitted = literal | set().union(*expansions.values())
    assert emitted - set(KINDS) == set()  # emitted but not listed
    assert set(KINDS) - emitted == set()  # listed but never emitted
    assert all(KINDS[k] for k in KINDS)  # each says what it means


def test_the_rollout_counts_the_kinds_a_change_ends_with():
    assert TERMINAL_CHANGE_EVENTS == CHANGE_ENDED and set(CHANGE_ENDED) <= set(KINDS)
