"""`tune apply`, `plan`, `status`, `rollback`, `verify`, `facts` and `profile validate`: one unit's changes."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table

from orchestrator.cli.common import (
    _boot_timeout_option,
    _db_option,
    _engine,
    _inventory_source,
    _load_inventory,
    _units,
    cli_paths,
    emit,
    err,
    new_progress,
)
from orchestrator.core.errors import ExitStatus, InputError


@click.command("facts")
@click.argument("target")
@click.option("--inventory", "-i", "inventory_file", default=None, help="Inventory file (default: the lab's).")
@click.option("--json", "as_json", is_flag=True)
def facts_cmd(target: str, inventory_file: str | None, as_json: bool) -> None:
    """Basic facts of UNIT.host or UNIT.guest: kernel, arch, CPUs, /proc/cmdline, boot_id."""
    from orchestrator.config.inventory import split_target
    from orchestrator.facts.base import gather_basic
    from orchestrator.remote.ssh import SSHTransport

    inv = _load_inventory(inventory_file)
    unit, role = split_target(target)
    with SSHTransport(inv.endpoint(unit, role)) as t:
        f = gather_basic(t, target)
    emit(f.model_dump(), as_json, _facts_table([f]))


def _facts_table(rows: list) -> Table:
    table = Table("target", "fact", "value", show_lines=False)
    for f in rows:
        for key, value in (("hostname", f.hostname), ("kernel", f.kernel_release), ("arch", f.arch),
                           ("CPUs online", ",".join(map(str, f.cpus_online))), ("/proc/cmdline", f.cmdline),
                           ("boot_id", f.boot_id)):
            table.add_row(f.target if key == "hostname" else "", key, value)
    return table


def _apply_table(results) -> Table:
    table = Table("unit", "change", "status", "p99.9 before", "p99.9 after", "max before", "max after", "why")
    for r in results:
        for o in r.outcomes:
            f = o.figures()

            def fmt(v):
                return "-" if v is None else f"{v:.0f}"

            if o.status in ("failed", "skipped"):
                why = o.reason
            elif o.status in ("planned", "noop"):
                why = ""
            else:
                why = (o.decision or {}).get("verdict", o.reason)
            wfi = (o.evidence or {}).get("wfi_exits")
            if wfi and wfi.get("rate_after") is not None:  # wfx_notrap's own evidence, besides latency
                why = f"WFI exits {wfi.get('rate_before') or 0:.0f}/s -> {wfi['rate_after']:.0f}/s; {why}"
            table.add_row(r.unit, escape(o.description), o.status, fmt(f["before_p999_us"]), fmt(f["after_p999_us"]),
                          fmt(f["before_max_us"]), fmt(f["after_max_us"]), escape(str(why)[:80]))
    return table


@click.command("apply")
@click.argument("profile")
@click.option("--inventory", "-i", "inventory_file", default=None, help="Inventory file (default: the lab's).")
@click.option("--unit", "units", multiple=True, help="Units to apply to (default: all in the inventory).")
@click.option("--playbook", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Measurement plan and decision rule (default: playbooks/measurement.yaml).")
@click.option("--dry-run", is_flag=True, help="Only show the plan: what would change, nothing is touched.")
@click.option("--force-unlock", default=None, metavar="LOCK_ID", help="Take over a stale lock by its id.")
@click.option("--accept-boot-risk", is_flag=True,
              help="Trial-boot cmdline/kernel changes even where preflight finds that a failed trial could not "
                   "fall back by itself (e.g. GRUB_DEFAULT is not saved).")
@_boot_timeout_option
@_db_option
@click.option("--json", "as_json", is_flag=True)
def apply_cmd(profile: str, inventory_file: str | None, units: tuple[str, ...], playbook: Path | None,
              dry_run: bool, force_unlock: str | None, as_json: bool, accept_boot_risk: bool = False,
              boot_timeout: float = 300.0, db: str | None = None) -> None:
    """Apply PROFILE (e.g. rt-profile): each change measured before and after, kept only on evidence.

    Against the local lab's inventory, boots the lab first when it is not running (a dry run never does).
    """
    from orchestrator.config.profile import find_profile
    from orchestrator.run.apply import (
        check_profile,
        load_for_apply,
        make_engine,
        write_reports,
    )

    paths = cli_paths()
    progress = new_progress()
    profile_path = find_profile(profile)
    inv_path, source = _inventory_source(inventory_file)
    inv, booted = load_for_apply(paths, inv_path, progress, dry_run=dry_run, source=source)
    chosen = _units(inv, units)
    check_profile(inv, chosen, profile_path)  # every unit's input errors before the journal or a unit
    engine = make_engine(paths, inv, playbook, progress, db=db, read_only=dry_run)
    engine.accept_boot_risk = accept_boot_risk
    engine.boot_timeout_s = boot_timeout
    results = []
    for unit in chosen:
        results.append(engine.apply(unit, profile_path, dry_run=dry_run, force_unlock=force_unlock))
    report_json = report_html = None
    if not dry_run:
        report_json, report_html = write_reports(results, engine.artifacts, f"tune apply {profile}")
    data = {"lab_booted": booted, "results": [r.model_dump(mode="json", exclude={"outcomes": {"__all__": {
        "before", "after"}}}) for r in results], "report": str(report_json) if report_json else None,
        "html": str(report_html) if report_html else None}
    emit(data, as_json, _apply_table(results))
    if report_html and not as_json:
        err().print(f"report: {escape(str(report_html))}")


@click.command("plan")
@click.argument("profile")
@click.option("--inventory", "-i", "inventory_file", default=None)
@click.option("--unit", "units", multiple=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def plan_cmd(ctx: click.Context, profile: str, inventory_file: str | None, units: tuple[str, ...],
             as_json: bool) -> None:
    """Dry run of `tune apply PROFILE`: the diff per unit; nothing is changed."""
    ctx.invoke(apply_cmd, profile=profile, inventory_file=inventory_file, units=units, playbook=None,
               dry_run=True, force_unlock=None, as_json=as_json)


@click.group()
def profile() -> None:
    """Tuning profiles."""


@profile.command("validate")
@click.argument("name", metavar="PROFILE")
@click.option("--inventory", "-i", "inventory_file", default=None, help="Check against these units' vars.")
@click.option("--unit", "units", multiple=True)
@click.option("--json", "as_json", is_flag=True)
def profile_validate(name: str, inventory_file: str | None, units: tuple[str, ...], as_json: bool) -> None:
    """Check PROFILE (a file, or a name as `tune apply` takes it: rt-profile) and, with an inventory, resolve
    it for each unit (every unit's errors at once) without touching anything."""
    from orchestrator.config.profile import describe, find_profile, load_profile
    from orchestrator.run.apply import check_profile

    file = find_profile(name)
    prof = load_profile(file)
    out: dict = {"profile": prof.name, "file": str(file), "units": {}}
    inv_path, _ = _inventory_source(inventory_file)
    if inventory_file or inv_path.exists():
        inv = _load_inventory(inventory_file)
        specs = check_profile(inv, _units(inv, units), file)
        out["units"] = {unit: [describe(c) for c in unit_specs] for unit, unit_specs in specs.items()}
    human = "\n".join([f"{file}: valid profile {prof.name!r}"] + [f"  {u}: {line}" for u, lines in
                                                                  out["units"].items() for line in lines])
    emit(out, as_json, human)


@profile.command("show")
@click.argument("name", metavar="PROFILE")
@click.option("--unit", default=None, help="Resolve it for this unit (its inventory vars): the change each line "
                                           "becomes, as it would be applied.")
@click.option("--inventory", "-i", "inventory_file", default=None)
@click.option("--json", "as_json", is_flag=True)
def profile_show(name: str, unit: str | None, inventory_file: str | None, as_json: bool) -> None:
    """PROFILE merged (its includes applied), every value with the file and line that set it, what it
    overrode, and the change kind it becomes."""
    from orchestrator.config.profile import find_profile, load_profile, profile_lines, resolve

    file = find_profile(name)
    prof = load_profile(file)
    specs = None
    if unit is not None:
        inv = _load_inventory(inventory_file)
        specs = resolve(prof, unit, inv.unit(unit))
    lines = profile_lines(prof, specs)
    here = f"{file.parent}/"  # the table names files beside the profile by name alone (the JSON in full)

    def short(text: str) -> str:
        return text.replace(here, "")

    table = Table(title=f"{prof.name}: {', '.join(short(str(f)) for f in prof.files)} (in {file.parent})")
    for col in ("key", "value", "set in", "overrides", "change" if unit is None else "change (resolved)"):
        table.add_column(col, overflow="fold")  # a file and line is never cut short
    for line in lines:
        change = line.resolved or (f"{line.change} ({line.kind})" if line.change else "")
        table.add_row(escape(line.key), escape(str(line.value)), escape(short(line.source)),
                      escape("\n".join(short(o) for o in line.overrides)), escape(change))
    emit({"profile": prof.name, "files": [str(f) for f in prof.files], "unit": unit,
          "lines": [line.model_dump() for line in lines]}, as_json, table)


@click.command("status")
@click.option("--inventory", "-i", "inventory_file", default=None)
@click.option("--unit", "units", multiple=True)
@_db_option
@click.option("--json", "as_json", is_flag=True)
def status_cmd(inventory_file: str | None, units: tuple[str, ...], as_json: bool, db: str | None = None) -> None:
    """What rt-tune has changed on each unit (kept changes), unit states and locks, from the journal."""
    engine, chosen = _engine(inventory_file, db, units, read_only=True)  # works on a read-only state dir
    j = engine.journal
    states = j.unit_states()
    data = {}
    table = Table("unit", "state", "kept changes", "in flight", "lock")
    for unit in chosen:
        kept = [r.change_id for r in j.active_changes(unit)]
        flight = [r.change_id for r in j.incomplete(unit)]
        lock = j.lock_info(unit)
        st = states.get(unit)
        data[unit] = {"state": st.state if st else None, "detail": st.detail if st else None, "kept": kept,
                      "in_flight": flight, "lock": lock.lock_id if lock else None}
        table.add_row(unit, st.state if st else "-", "\n".join(kept) or "-", "\n".join(flight) or "-",
                      lock.lock_id if lock else "-")
    emit(data, as_json, table)


@click.command("rollback")
@click.argument("unit")
@click.option("--all", "all_", is_flag=True, help="Undo every kept change, newest first.")
@click.option("--change", "change_id", default=None, help="Undo one kept change (its id from `tune status`).")
@click.option("--inventory", "-i", "inventory_file", default=None)
@click.option("--force-unlock", default=None, metavar="LOCK_ID")
@_boot_timeout_option
@_db_option
@click.option("--json", "as_json", is_flag=True)
def rollback_cmd(unit: str, all_: bool, change_id: str | None, inventory_file: str | None,
                 force_unlock: str | None, as_json: bool, db: str | None = None,
                 boot_timeout: float = 300.0) -> None:
    """Return UNIT to its state before rt-tune: every kept change (--all) or one (--change ID)."""
    from orchestrator.core.errors import InputError

    if all_ == (change_id is not None):
        raise InputError("give exactly one of --all or --change ID")
    engine, _ = _engine(inventory_file, db, (unit,))
    engine.boot_timeout_s = boot_timeout
    undone = engine.rollback(unit, change_id, force_unlock=force_unlock)
    emit({"unit": unit, "rolled_back": undone}, as_json, f"{unit}: rolled back {', '.join(undone) or 'nothing'}")


@click.command("verify")
@click.argument("unit")
@click.option("--inventory", "-i", "inventory_file", default=None)
@click.option("--checks", "with_checks", is_flag=True,
              help="Also run the health checks (as `tune check UNIT`): the shipped ones and --profile's files.")
@click.option("--profile", "profile_name", default=None, help="With --checks: the profile whose check files run.")
@_db_option
@click.option("--json", "as_json", is_flag=True)
def verify_cmd(unit: str, inventory_file: str | None, as_json: bool, with_checks: bool = False,
               profile_name: str | None = None, db: str | None = None) -> None:
    """Compare UNIT's live state with the journal; drift marks the unit degraded (nothing is overwritten).
    With --checks, the health checks run too; a failing one exits 12 when nothing drifted."""
    engine, _ = _engine(inventory_file, db, (unit,))
    profile = None
    if profile_name is not None:
        if not with_checks:
            raise InputError("--profile names check files: use it with --checks")
        from orchestrator.config.profile import find_profile, load_profile

        profile = load_profile(find_profile(profile_name))
    report = engine.verify(unit)
    table = Table("change", "target", "in place")
    for r in report:
        table.add_row(r["change"], r["target"], "yes" if r["in_place"] else "DRIFTED")
    checks_ok = True
    if with_checks:
        from orchestrator.run.checks import check_units

        reports = check_units(engine.inventory, engine.journal, [unit], profile)
        checks_ok = all(r.ok for r in reports)
        for r in reports:
            table.add_row(f"health checks ({r.summary()})", r.target, "yes" if r.ok else "FAILED")
        emit({"changes": report, "checks": [{"target": r.target, "ok": r.ok, "error": r.error,
                                             "counts": r.counts(), "failed": [o.model_dump() for o in r.failed]}
                                            for r in reports]}, as_json, table)
    else:
        emit(report, as_json, table)
    if any(not r["in_place"] for r in report):
        sys.exit(ExitStatus.DRIFT)
    if not checks_ok:
        sys.exit(ExitStatus.CHECK_FAILED)
