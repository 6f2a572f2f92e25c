"""`tune check`: the shipped checks (what the journal's kept changes promise) and the profile's own check files,
run on each target of each unit; a result per unit and target, never a silent early stop."""

from __future__ import annotations

import functools
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from orchestrator.checks.promises import TargetPromise, promises
from orchestrator.checks.runner import DEFAULT_CHECK_TIMEOUT_S, CheckReport, check_files, run_checks
from orchestrator.config.inventory import Inventory
from orchestrator.config.profile import Profile
from orchestrator.core.errors import InputError, TuneError
from orchestrator.journal.journal import Journal
from orchestrator.remote.transport import Endpoint


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


#: check runs at once (each a pytest process and an SSH connection on the controller)
CHECK_WORKERS = 8


def check_units(inventory: Inventory, journal: Journal, units: Sequence[str], profile: Profile | None, *,
                check_timeout_s: float = DEFAULT_CHECK_TIMEOUT_S, junit: Path | None = None,
                on_report: Callable[[CheckReport], None] | None = None,
                workers: int = CHECK_WORKERS) -> list[CheckReport]:
    """The checks of every target of `units` (host, and guest where the inventory has one), up to `workers`
    targets at once; reports in the order of `units` and targets, `on_report` called as each one ends."""
    preflight_check_files(profile)
    jobs: list[Callable[[Path | None], CheckReport]] = []
    names: list[str] = []
    for unit in units:
        spec = inventory.unit(unit)
        targets = ["host"] + (["guest"] if spec.guest is not None else [])
        promised = promises(journal.active_changes(unit), targets)
        for target in targets:
            names.append(f"{unit}.{target}")
            try:
                endpoint = inventory.endpoint(unit, target)  # type: ignore[arg-type]
            except InputError as exc:
                jobs.append(functools.partial(_unreachable, CheckReport(unit=unit, target=target, error=str(exc))))
                continue
            jobs.append(functools.partial(_run_target, unit, target, endpoint, promised[target],
                                          user_check_files(profile, target), dict(spec.vars), check_timeout_s))
    reports: list[CheckReport | None] = [None] * len(jobs)
    with tempfile.TemporaryDirectory(prefix="rt-tune-junit-") as tmp:
        xmls = [Path(tmp) / f"{name}.xml" if junit is not None else None for name in names]
        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(jobs)))) as pool:
            futures = {pool.submit(job, xml): i for i, (job, xml) in enumerate(zip(jobs, xmls, strict=True))}
            for future in as_completed(futures):
                reports[futures[future]] = report = future.result()
                if on_report is not None:
                    on_report(report)
        done = [r for r in reports if r is not None]
        if junit is not None:
            write_junit(junit, [x for x in xmls if x is not None and x.exists()], done)
    return done


def _unreachable(report: CheckReport, _junit: Path | None) -> CheckReport:
    return report


def _run_target(unit: str, target: str, endpoint: Endpoint, promise: TargetPromise, user_files: list[Path],
                variables: dict[str, Any], check_timeout_s: float, junit: Path | None) -> CheckReport:
    try:
        return run_checks(unit, target, endpoint, promise, user_files=user_files, variables=variables, junit=junit,
                          check_timeout_s=check_timeout_s)
    except TuneError as exc:  # this target's run could not happen: its report says so, the others go on
        return CheckReport(unit=unit, target=target, error=str(exc))


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
