"""`tune check`: health checks (pytest-testinfra tests) on a unit's targets, pytest-style summary and JUnit XML."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table

from orchestrator.cli.common import _db_option, _engine, emit, err
from orchestrator.core.errors import ExitStatus, InputError


@click.command("check")
@click.argument("unit", required=False)
@click.option("--all", "all_units", is_flag=True, help="Every unit of the inventory.")
@click.option("--profile", "profile_name", default=None,
              help="Also run the check files this profile lists (`checks:` in its host and guest sections).")
@click.option("--inventory", "-i", "inventory_file", default=None, help="Inventory file (default: the lab's).")
@click.option("--junit", "junit", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the results as JUnit XML (one test suite per unit and target).")
@click.option("--timeout", "timeout_s", type=click.FloatRange(1, 3600), default=120.0, show_default=True,
              help="Seconds one check may take before it is stopped and counted as failed.")
@_db_option
@click.option("--json", "as_json", is_flag=True)
def check_cmd(unit: str | None, all_units: bool, profile_name: str | None, inventory_file: str | None,
              junit: Path | None, timeout_s: float, as_json: bool, db: str | None = None) -> None:
    """Run health checks on UNIT (or --all): rt-tune's shipped checks of what its kept changes promise (kernel
    arguments, isolated and nohz_full CPUs, sysctls, disabled services, the vCPU map, no crash loop, WFI exits
    where untrapped) and the profile's own check files, as pytest-testinfra tests through rt-tune's SSH settings.
    Checks only read: see README "Health checks". Exit 12 when any check fails or a target cannot be checked."""
    from orchestrator.config.profile import find_profile, load_profile
    from orchestrator.run.checks import check_units

    if bool(unit) == all_units:
        raise InputError("name one UNIT or --all")
    if junit is not None:
        _writable(junit)
    engine, chosen = _engine(inventory_file, db, (unit,) if unit else (), read_only=True)
    profile = load_profile(find_profile(profile_name)) if profile_name else None

    def progress(r) -> None:
        err().print(f"{escape(r.unit)}.{r.target}: {escape(r.summary())}")

    reports = check_units(engine.inventory, engine.journal, chosen, profile, check_timeout_s=timeout_s, junit=junit,
                          on_report=None if as_json else progress)
    table = Table("unit", "target", "check", "outcome", "why")
    for r in reports:
        if r.error:
            table.add_row(r.unit, r.target, "(run)", "ERROR", escape(r.error[:200]))
        for o in r.outcomes:
            if o.outcome != "passed" or not r.failed:
                table.add_row(r.unit, r.target, escape(o.nodeid.split("::", 1)[-1]), o.outcome,
                              escape(o.message.splitlines()[0][:120] if o.message else ""))
    data = [{"unit": r.unit, "target": r.target, "ok": r.ok, "error": r.error, "counts": r.counts(),
             "read_only": r.read_only,
             "outcomes": [o.model_dump() for o in r.outcomes]} for r in reports]
    emit({"reports": data, "junit": str(junit) if junit else None}, as_json, table)
    if not all(r.ok for r in reports):
        sys.exit(ExitStatus.CHECK_FAILED)


def _writable(path: Path) -> None:
    """--junit's file can be written: checked before any unit is touched, not after every check ran."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a"):
            pass
    except OSError as exc:
        raise InputError(f"--junit {path}: cannot write it: {exc.strerror or exc}") from None
