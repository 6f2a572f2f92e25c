"""`tune check`: the shipped checks (what the journal's kept changes promise) and the profile's own check files,
run on each target of each unit; a result per unit and target, never a silent early stop."""

from __future__ import annotations

import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from pathlib import Path

from orchestrator.checks.promises import promises
from orchestrator.checks.runner import DEFAULT_CHECK_TIMEOUT_S, CheckReport, check_files, run_checks
from orchestrator.config.inventory import Inventory
from orchestrator.config.profile import Profile
from orchestrator.core.errors import InputError
from orchestrator.journal.journal import Journal


def user_check_files(profile: Profile | None, target: str) -> list[Path]:
    return [f for f, _ in profile.check_files(target)] if profile is not None else []


def preflight_check_files(profile: Profile | None) -> None:
    """Every check file the profile lists loads and defines a test: before anything touches a unit."""
    if profile is None:
        return
    for target in ("host", "guest"):
        listed = profile.check_files(target)
        if listed:
            check_files([f for f, _ in listed], ", ".join(sorted({w for _, w in listed})))


def check_units(inventory: Inventory, journal: Journal, units: Sequence[str], profile: Profile | None, *,
                check_timeout_s: float = DEFAULT_CHECK_TIMEOUT_S, junit: Path | None = None,
                on_report: Callable[[CheckReport], None] | None = None) -> list[CheckReport]:
    """The checks of every target of `units` (host, and guest where the inventory has one)."""
    preflight_check_files(profile)
    reports: list[CheckReport] = []
    suites: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="rt-tune-junit-") as tmp:
        for unit in units:
            spec = inventory.unit(unit)
            targets = ["host"] + (["guest"] if spec.guest is not None else [])
            promised = promises(journal.active_changes(unit), targets)
            for target in targets:
                xml = Path(tmp) / f"{unit}.{target}.xml" if junit is not None else None
                try:
                    endpoint = inventory.endpoint(unit, target)  # type: ignore[arg-type]
                except InputError as exc:
                    report = CheckReport(unit=unit, target=target, error=str(exc))
                else:
                    report = run_checks(unit, target, endpoint, promised[target],
                                        user_files=user_check_files(profile, target), variables=dict(spec.vars),
                                        junit=xml, check_timeout_s=check_timeout_s)
                reports.append(report)
                if xml is not None and xml.exists():
                    suites.append(xml)
                if on_report is not None:
                    on_report(report)
        if junit is not None:
            write_junit(junit, suites, reports)
    return reports


def write_junit(path: Path, suites: Sequence[Path], reports: Sequence[CheckReport]) -> None:
    """One JUnit XML for CI systems: every target's test suite, and a failed suite for a run that could not
    happen (an unreachable unit), so a CI system sees it."""
    root = ET.Element("testsuites", name="rt-tune check")
    for xml in suites:
        tree = ET.parse(xml).getroot()
        root.extend(tree.findall("testsuite") if tree.tag == "testsuites" else [tree])
    for r in reports:
        if r.error:
            suite = ET.SubElement(root, "testsuite", name=f"rt-tune {r.unit}.{r.target}", tests="1", errors="1",
                                  failures="0", skipped="0")
            case = ET.SubElement(suite, "testcase", classname=f"{r.unit}.{r.target}", name="check run")
            ET.SubElement(case, "error", message=r.error[:500]).text = r.error
    path.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)
