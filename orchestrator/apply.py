"""Wiring for `tune apply` and friends: inventory, journal, measurement plan, profile -> the Engine.

Kept out of cli.py so the CLI only parses and prints.
"""

from __future__ import annotations

import time
from pathlib import Path

from orchestrator.decide import load_measurement_plan
from orchestrator.engine import ApplyResult, Connect, Engine, ssh_connect
from orchestrator.events import Event, EventSink, discard
from orchestrator.inventory import Inventory, load_inventory
from orchestrator.journal import Journal
from orchestrator.paths import Paths
from orchestrator.profile import PROFILES_DIR
from orchestrator.report import ChangeReport, Report, render_html, save_report

PLAYBOOKS_DIR = PROFILES_DIR.parent / "playbooks"
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
                connect: Connect = ssh_connect, db: str | None = None) -> Engine:
    plan = load_measurement_plan(playbook or DEFAULT_PLAN)
    artifacts = paths.state / "artifacts" / time.strftime("%Y%m%dT%H%M%S")
    journal = open_controller_journal(paths, db)
    return Engine(inventory=inv, journal=journal, plan=plan, artifacts=artifacts, events=events, connect=connect)


def load_for_apply(paths: Paths, inventory: Path, events: EventSink) -> tuple[Inventory, bool]:
    booted = ensure_lab(paths, inventory, events)
    return load_inventory(inventory), booted


def evidence_note(outcome) -> str:
    """A trial's evidence besides latency, for the report (wfx_notrap: the host's WFI exit rates)."""
    wfi = (outcome.evidence or {}).get("wfi_exits")
    if not wfi:
        return ""
    after = "unreadable" if wfi.get("rate_after") is None else f"{wfi['rate_after']:.1f}/s"
    return f" | WFI exits (host, all VMs): {wfi.get('rate_before') or 0:.1f}/s before, {after} on the trial " \
           f"boot: {wfi.get('reason', '')}"


def _report(results: list[ApplyResult], title: str) -> Report:
    return Report(title=title, changes=[
        ChangeReport(name=o.id, target=f"{r.unit}.{o.target}", before=o.before, after=o.after,
                     decision=o.decision, note=(f"{o.status}: {o.reason}" + evidence_note(o))[:2000])
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
def open_controller_journal(paths: Paths, db: str | None) -> Journal:
    """The journal a rollout shares with other controllers: `--db postgresql://...`, a SQLite file, or the
    default SQLite file in the state directory."""
    return Journal(db if db else journal_path(paths))


def fleet_runner(paths: Paths, journal: Journal, inv: Inventory, loaded_policy, events: EventSink, *,
                 workers: int | None = None, accept_boot_risk: bool = False, boot_timeout_s: float = 300.0,
                 connect: Connect = ssh_connect):
    """A FleetRunner whose engines share `journal` and the playbook's measurement plan; each unit's raw runs
    and report go to their own artifacts directory."""
    from orchestrator.fleet import FleetRunner

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
    from orchestrator.fleet import render_fleet_html

    artifacts.mkdir(parents=True, exist_ok=True)
    summary = summary.model_copy(update={"report_html": str(artifacts / "fleet.html"),
                                         "report_json": str(artifacts / "fleet.json")})
    (artifacts / "fleet.json").write_text(summary.model_dump_json(indent=2))
    render_fleet_html(summary, artifacts / "fleet.html")
    return artifacts / "fleet.json", artifacts / "fleet.html"
