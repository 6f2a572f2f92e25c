"""The package's import graph has no cycle, counting imports inside functions too (a function-level import once
hid the engine <-> boot runner cycle). Read from the source with ast, so no import is missed by laziness."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.unit

PACKAGE = REPO / "orchestrator"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that `path` imports anywhere in it (`from a import b` counts a.b when it is a
    module, else a); TYPE_CHECKING-only imports are skipped: they never run."""
    tree = ast.parse(path.read_text(), str(path))
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    found = set()
    me = module_name(path)
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative
                pkg = me.split(".")[: len(me.split(".")) - node.level + (path.name == "__init__.py")]
                base = ".".join(pkg + ([node.module] if node.module else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in modules:
                    found.add(sub)
                elif base in modules:
                    found.add(base)
    return found - {me}


def package_files() -> list[Path]:
    """The package's Python files (not the lab images' files, which run on the VMs)."""
    return [p for p in PACKAGE.rglob("*.py") if "files" not in p.relative_to(PACKAGE).parts[:2]]


def trees(skip: set[str]):
    """(module name, its syntax tree) for each module of the package not in `skip`."""
    for path in package_files():
        if module_name(path) not in skip:
            yield module_name(path), ast.parse(path.read_text(), str(path))


def graph() -> dict[str, set[str]]:
    files = package_files()
    modules = {module_name(p) for p in files}
    return {module_name(p): imports_of(p, modules) - {"orchestrator"} for p in files}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_the_package_imports_without_a_cycle():
    g = graph()
    assert len(g) > 40 and "orchestrator.run.boot" in g["orchestrator.run.engine"]  # the graph was read
    assert cycles(g) == []


def test_the_folders_import_each_other_one_way():
    """Arrows run one way between the package's folders too (core, config, remote, facts, changes, boot, run,
    ...): no two folders import each other, however indirectly."""
    def folder(m: str) -> str:
        parts = m.split(".")
        return parts[1] if len(parts) > 2 else m

    g = graph()
    folders: dict[str, set[str]] = {}
    for a, bs in g.items():
        folders.setdefault(folder(a), set()).update(folder(b) for b in bs if folder(b) != folder(a))
    assert {"core", "config", "remote", "facts", "changes", "boot", "run", "journal", "cli"} <= set(folders)
    assert cycles(folders) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_only_the_transaction_records_intents_and_moves_change_records():
    """One owner of "journal the intent, apply, verify, measure, decide, keep or undo": no other module calls
    the journal's record_intent or mark (runtime and boot changes and `tune ab` all go through it)."""
    journal = {m for m in graph() if m.startswith("orchestrator.journal")}
    assert "orchestrator.journal.journal" in journal
    callers = set()
    for name, tree in trees(journal | {"orchestrator.run.transaction"}):
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr in ("record_intent", "mark") and "journal" in ast.unparse(node.func.value):
                callers.add(f"{name}:{node.lineno}")
    assert callers == set()
    transaction = (PACKAGE / "run" / "transaction.py").read_text()
    assert "journal.record_intent(" in transaction and "journal.mark(" in transaction


def test_the_core_imports_neither_click_nor_rich():
    """The CLI parses and prints; everything else is the core, usable without a terminal."""
    thin = {m for m in graph() if m.startswith("orchestrator.cli")} | {"orchestrator.__main__"}
    assert "orchestrator.cli.main" in thin
    offenders = set()
    for name, tree in trees(thin):
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            offenders |= {f"{name}: {n}" for n in names if n.split(".")[0] in ("click", "rich")}
    assert offenders == set()


def test_the_statistics_and_the_journal_import_neither_reports_nor_config():
    """The decision rule and the journal are pure of presentation and of file formats: nothing they import,
    however indirectly, reads YAML or writes HTML."""
    g = graph()

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for m in g.get(todo.pop(), ()):
                if m not in seen:
                    seen.add(m)
                    todo.append(m)
        return seen

    def forbidden(m: str) -> bool:
        return m.startswith(("orchestrator.config.", "orchestrator.report."))

    pure = [m for m in g if m.startswith(("orchestrator.stats.", "orchestrator.journal."))]
    assert "orchestrator.stats.decide" in pure and "orchestrator.journal.journal" in pure
    for module in pure:
        assert {m for m in reach(module) if forbidden(m)} == set(), module
    assert "orchestrator.config.yamlio" in reach("orchestrator.config.playbook")  # the check sees a real path
