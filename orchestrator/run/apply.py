"""Wiring for `tune apply` and friends: inventory, journal, measurement plan, profile -> the Engine.

Kept out of cli.py so the CLI only parses and prints.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from orchestrator.config.inventory import Inventory, load_inventory
from orchestrator.config.playbook import load_measurement_plan
from orchestrator.config.profile import ChangeSpec, load_profile, resolve
from orchestrator.core.errors import InputError
from orchestrator.core.events import Event, EventSink, discard
from orchestrator.core.paths import Paths, missing_inventory, shipped
from orchestrator.journal.journal import Journal
from orchestrator.report.latency import ChangeReport, Report, render_html, save_report
from orchestrator.run.context import Connect, ssh_connect
from orchestrator.run.engine import ApplyResult, Engine

PLAYBOOKS_DIR = shipped("playbooks")
DEFAULT_PLAN = PLAYBOOKS_DIR / "measurement.yaml"


def journal_path(paths: Paths) -> Path:
    return paths.state / "journal.sqlite"


def ensure_lab(paths: Paths, inventory: Path, events: EventSink = discard) -> bool:
    """When the inventory is the local lab's, boot the lab if it is not running. True if it was booted."""
    if inventory.resolve() != paths.lab_inventory.resolve():
        return False
    from orchestrator.lab.lab import Lab

    lab = Lab(paths, events)
    status = lab.status()
    if status and all(s.running for s in status):
        return False
    events(Event("apply.lab", "lab", "the local lab is not running: booting it"))
    state = lab.load_state()
    lab.up(arch=state.arch if state else "amd64")  # the architecture it last ran
    return True


def make_engine(paths: Paths, inv: Inventory, playbook: Path | None, events: EventSink,
                connect: Connect = ssh_connect, db: str | None = None, *, read_only: bool = False) -> Engine:
    """`read_only`: the engine only reads the journal (status, dry runs): see `Journal(read_only=True)`."""
    plan = load_measurement_plan(playbook or DEFAULT_PLAN)
    artifacts = paths.state / "artifacts" / time.strftime("%Y%m%dT%H%M%S")
    journal = open_controller_journal(paths, db, read_only=read_only)
    return Engine(inventory=inv, journal=journal, plan=plan, artifacts=artifacts, events=events, connect=connect,
                  plan_path=Path(playbook or DEFAULT_PLAN))


def read_inventory(paths: Paths, inventory: Path, source: str) -> Inventory:
    """The inventory at `inventory` (chosen from `source`, see `paths.inventory_search`); a missing one is an
    InputError saying where rt-tune looked and how to get one."""
    if not inventory.exists():
        raise InputError(missing_inventory(paths, inventory, source))
    return load_inventory(inventory)


def load_for_apply(paths: Paths, inventory: Path, events: EventSink, *, dry_run: bool = False,
                   source: str = "--inventory") -> tuple[Inventory, bool]:
    """The inventory, with the local lab booted first when it is the lab's and not running (True: booted).

    A dry run never boots anything: without an inventory, or with the lab's while the lab is down, it is an
    InputError saying how to get one."""
    if not dry_run:
        booted = ensure_lab(paths, inventory, events)
        return load_inventory(inventory), booted
    inv = read_inventory(paths, inventory, source)
    if inventory.resolve() == paths.lab_inventory.resolve():
        from orchestrator.lab.lab import Lab

        status = Lab(paths).status()
        if not status or not all(s.running for s in status):
            down = ", ".join(s.name for s in status if not s.running) or "every VM"
            raise InputError(f"the local lab is not running ({down} down), and a dry run never boots it: run "
                             "`tune lab up` first, or give --inventory FILE")
    return inv, False


def unit_specs(inv: Inventory, unit: str, profile_path: Path) -> list[ChangeSpec]:
    """The profile resolved for one unit with its vars: pure (no journal, no SSH). An unknown unit, a bad
    profile or a var the profile cannot use is an InputError."""
    spec = inv.unit(unit)
    return resolve(load_profile(profile_path, spec.vars), unit, spec)


def check_profile(inv: Inventory, units: list[str], profile_path: Path) -> dict[str, list[ChangeSpec]]:
    """Every unit's resolved profile, or one InputError with every unit's problems (see `resolve_units`)."""
    out: dict[str, list[ChangeSpec]] = {}
    resolve_units(units, lambda unit: out.__setitem__(unit, unit_specs(inv, unit, profile_path)))
    return out


def resolve_units(units: list[str], specs: Callable[[str], object]) -> None:
    """Call `specs(unit)` (resolve the profile for it) for every unit before any unit is touched; every unit's
    input errors are reported together in one InputError, each prefixed with its unit, not only the first."""
    problems: list[str] = []
    for unit in units:
        try:
            specs(unit)
        except InputError as exc:
            problems.append(f"{unit}: " + str(exc).replace("\n", "\n    "))
    if len(problems) == 1:
        raise InputError(problems[0])
    if problems:
        raise InputError(f"{len(problems)} of {len(units)} units cannot take the profile:\n"
                         + "\n".join(problems))


def evidence_note(outcome) -> str:
    """A trial's evidence besides latency, for the report (wfx_notrap: the host's WFI exit rates)."""
    wfi = (outcome.evidence or {}).get("wfi_exits")
    if not wfi:
        return ""
    before, after = ("unreadable" if wfi.get(k) is None else f"{wfi[k]:.1f}/s" for k in ("rate_before", "rate_after"))
    return f" | WFI exits (host, all VMs): {before} before, {after} on the trial boot: {wfi.get('reason', '')}"


def _report(results: list[ApplyResult], title: str) -> Report:
    return Report(title=title, changes=[
        ChangeReport(name=o.id, target=f"{r.unit}.{o.target}", description=o.description, members=o.members,
                     left_out=o.left_out, before=o.before,
                     after=o.after,
                     decision=o.decision, note=(f"{o.status}: {o.reason}" + evidence_note(o))[:2000],
                     mechanisms=o.mechanisms, rates=o.rates, latency_applicable=o.latency_applicable,
                     mechanisms_left_out=o.mechanisms_left_out)
        for r in results for o in r.outcomes if o.before or o.after])


def write_reports(results: list[ApplyResult], artifacts: Path, title: str) -> tuple[Path, Path]:
    """The JSON report (every run of every change) and the HTML report with plots, beside the raw runs."""
    report = _report(results, title)
    artifacts.mkdir(parents=True, exist_ok=True)
    json_path = save_report(report, artifacts / "report.json")
    html_path = artifacts / "report.html"
    render_html(report, html_path)
    return json_path, html_path


# ---- tune rollout --------------------------------------------------------------------------------------------
def open_controller_journal(paths: Paths, db: str | None, *, read_only: bool = False) -> Journal:
    """The journal a rollout shares with other controllers: `--db postgresql://...`, a SQLite file, or the
    default SQLite file in the state directory. `read_only` for commands that only read it: the default journal
    missing reads as empty (nothing done yet), a `--db` file missing is an error (a typo must not read as
    "nothing changed")."""
    if read_only and db and "://" not in db and not Path(db).exists():
        raise InputError(f"journal {db} (--db) does not exist")
    return Journal(db if db else journal_path(paths), read_only=read_only)


def fleet_runner(paths: Paths, journal: Journal, inv: Inventory, loaded_policy, events: EventSink, *,
                 workers: int | None = None, accept_boot_risk: bool = False, boot_timeout_s: float = 300.0,
                 connect: Connect = ssh_connect):
    """A FleetRunner whose engines share `journal` and the playbook's measurement plan; each unit's raw runs
    and report go to their own artifacts directory."""
    from orchestrator.run.fleet import FleetRunner

    plan = load_measurement_plan(loaded_policy.measurement_path or DEFAULT_PLAN)
    stamp = time.strftime("%Y%m%dT%H%M%S")

    def engine_for(unit: str, sink: EventSink) -> Engine:
        return Engine(inventory=inv, journal=journal, plan=plan,
                      artifacts=paths.state / "artifacts" / f"rollout-{stamp}" / unit, events=sink, connect=connect,
                      accept_boot_risk=accept_boot_risk, boot_timeout_s=boot_timeout_s)

    def unit_report(result: ApplyResult, engine: Engine) -> str | None:
        """Each unit's JSON report beside its raw runs (HTML on demand: `tune report FILE --html F`)."""
        if not any(o.before or o.after for o in result.outcomes):
            return None
        engine.artifacts.mkdir(parents=True, exist_ok=True)
        return str(save_report(_report([result], f"rollout: {result.unit}"), engine.artifacts / "report.json"))

    return FleetRunner(journal=journal, policy=loaded_policy.policy, engine_for=engine_for, events=events,
                       workers=workers, on_result=unit_report)


def policy_for_journal(loaded_policy):
    """The policy as stored with the rollout: the measurement plan as an absolute path, so a resume from any
    working directory measures the same way."""
    mp = loaded_policy.measurement_path or DEFAULT_PLAN
    return loaded_policy.policy.model_copy(update={"measurement": str(Path(mp).resolve())})


def write_fleet_reports(summary, artifacts: Path) -> tuple[Path, Path]:
    from orchestrator.report.fleet import render_fleet_html

    artifacts.mkdir(parents=True, exist_ok=True)
    summary = summary.model_copy(update={"report_html": str(artifacts / "fleet.html"),
                                         "report_json": str(artifacts / "fleet.json")})
    (artifacts / "fleet.json").write_text(summary.model_dump_json(indent=2))
    render_fleet_html(summary, artifacts / "fleet.html")
    return artifacts / "fleet.json", artifacts / "fleet.html"


def choose_units(inv: Inventory, units: Sequence[str]) -> list[str]:
    """The units named, in the order given (default: all of the inventory's, sorted); unknown ones are one
    InputError listing the known."""
    unknown = [u for u in dict.fromkeys(units) if u not in inv.units]
    if unknown:
        raise InputError(f"no unit {', '.join(map(repr, unknown))} in the inventory; its units: "
                         f"{', '.join(sorted(inv.units)) or '(none)'}")
    return list(dict.fromkeys(units)) or sorted(inv.units)


def unit_status(journal: Journal, units: list[str]) -> dict[str, dict[str, Any]]:
    """Per unit, from the journal: its state, kept changes, changes in flight and its lock."""
    states = journal.unit_states()
    out = {}
    for unit in units:
        lock = journal.lock_info(unit)
        st = states.get(unit)
        out[unit] = {"state": st.state if st else None, "detail": st.detail if st else None,
                     "kept": [r.change_id for r in journal.active_changes(unit)],
                     "in_flight": [r.change_id for r in journal.incomplete(unit)],
                     "lock": lock.lock_id if lock else None}
    return out


def pause_rollout(journal: Journal, rollout_id: int) -> None:
    """Ask a running rollout to pause (its controllers stop after the units they are working on)."""
    rec = journal.get_rollout(rollout_id)
    if not journal.set_rollout_status(rollout_id, "pausing", "pause requested", expect=("running",)):
        raise InputError(f"rollout {rollout_id} is {rec.status}, not running: nothing to pause")


def start_rollout(paths: Paths, journal: Journal, inv_path: Path, profile_path: Path, units: list[str] | None,
                  policy_file: Path | None, events: EventSink, **runner_kw: Any) -> tuple[Any, int]:
    """A new rollout of `profile_path` over `units` (all of the inventory's when None): every unit's input
    errors come before the rollout is recorded. The runner and the rollout's id."""
    from orchestrator.config.playbook import load_rollout_policy

    loaded = load_rollout_policy(policy_file or PLAYBOOKS_DIR / "rollout.yaml")
    inv, _ = load_for_apply(paths, inv_path, events)
    chosen = choose_units(inv, units or ())
    check_profile(inv, chosen, profile_path)
    runner = fleet_runner(paths, journal, inv, loaded, events, **runner_kw)
    runner.policy = policy_for_journal(loaded)
    return runner, runner.create(profile_path.resolve(), inv_path.resolve(), chosen).id


def resume_rollout(paths: Paths, journal: Journal, rollout_id: int, inv_path: Path | None, events: EventSink,
                   **runner_kw: Any) -> Any:
    """The runner that continues rollout `rollout_id` with the policy recorded with it (the inventory recorded
    with it too, unless another is given)."""
    from orchestrator.config.playbook import LoadedPolicy, RolloutPolicy

    rec = journal.get_rollout(rollout_id)
    policy = LoadedPolicy(RolloutPolicy.model_validate(rec.policy), Path("/"))
    inv, _ = load_for_apply(paths, inv_path or Path(rec.inventory), events)
    return fleet_runner(paths, journal, inv, policy, events, **runner_kw)


def finish_rollout(paths: Paths, runner: Any, rollout_id: int, *, retry_failed: bool = False) -> Any:
    """Run the rollout to its end (done, halted or paused) and write its reports; the summary, with them."""
    summary = runner.run(rollout_id, retry_failed=retry_failed)
    report_json, report_html = write_fleet_reports(summary, paths.state / "artifacts" / f"rollout-{rollout_id}")
    return summary.model_copy(update={"report_json": str(report_json), "report_html": str(report_html)})
