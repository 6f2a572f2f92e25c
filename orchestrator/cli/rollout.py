"""`tune rollout`: a profile rolled out to a fleet (start, resume, pause, status)."""

from __future__ import annotations

from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table

from orchestrator.cli.common import (
    _boot_timeout_option,
    _db_option,
    _inventory_path,
    cli_paths,
    emit,
    err,
    new_progress,
)


def _rollout_table(summary) -> Table:
    table = Table("unit", "wave", "state", "kept", "rolled back", "failed", "p99.9 before", "p99.9 after",
                  "max before", "max after", "detail", title=f"rollout {summary.rollout_id}: {summary.status}")
    for u in summary.units:
        o = u.get("outcome") or {}
        b, a = o.get("before") or {}, o.get("after") or {}

        def fmt(d, k):
            return "-" if d.get(k) is None else f"{d[k]:.0f}"

        table.add_row(u["unit"], str(u.get("wave_name", u["wave"])), u["state"], ", ".join(o.get("kept") or []) or "-",
                      ", ".join(o.get("rolled_back") or []) or "-", ", ".join(o.get("failed") or []) or "-",
                      fmt(b, "p999_us"), fmt(a, "p999_us"), fmt(b, "max_us"), fmt(a, "max_us"),
                      escape((o.get("regression") or u["detail"] or "")[:70]))
    return table


@click.command("rollout")
@click.argument("profile", required=False)
@click.option("--inventory", "-i", "inventory_file", default=None, help="The fleet's inventory (default: the lab's).")
@click.option("--unit", "units", multiple=True, help="Units to roll out to, in this order (default: all).")
@click.option("--playbook", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Rollout policy (default: playbooks/rollout.yaml): canary, batches, halt rules, on_halt.")
@_db_option
@click.option("--resume", "resume_id", type=int, default=None, metavar="ID",
              help="Continue rollout ID (after a crash, a pause or a halt), or join it from another controller.")
@click.option("--retry-failed", is_flag=True, help="With --resume: try the failed units again.")
@click.option("--pause", "pause_id", type=int, default=None, metavar="ID",
              help="Ask rollout ID's controllers to stop claiming units; units in flight finish.")
@click.option("--status", "status_id", type=int, default=None, metavar="ID", help="Show rollout ID; 0: list all.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Units this controller works on at once (default: the policy's max_in_flight).")
@_boot_timeout_option
@click.option("--accept-boot-risk", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
def rollout_cmd(profile: str | None, inventory_file: str | None, units: tuple[str, ...], playbook: Path | None,
                db: str | None, resume_id: int | None, retry_failed: bool, pause_id: int | None,
                status_id: int | None, workers: int | None, boot_timeout: float, accept_boot_risk: bool,
                as_json: bool) -> None:
    """Roll PROFILE out to a fleet: canary first, then batches; halt on failures or latency regressions.

    Per-unit state lives in the journal; `--resume ID` continues after a controller crash without redoing
    finished units, and several controllers may work on one rollout (`--db postgresql://...`)."""
    from orchestrator.config.profile import find_profile
    from orchestrator.core.errors import InputError
    from orchestrator.run.apply import (
        finish_rollout,
        open_controller_journal,
        pause_rollout,
        resume_rollout,
        start_rollout,
    )
    from orchestrator.run.fleet import RolloutHalted, rollout_summary

    modes = sum(x is not None for x in (profile, resume_id, pause_id, status_id))
    if modes != 1:
        raise InputError("give exactly one of PROFILE, --resume ID, --pause ID or --status ID")
    paths = cli_paths()
    journal = open_controller_journal(paths, db, read_only=status_id is not None)  # --status only reads
    if status_id == 0 or pause_id == 0:
        rows = [r.model_dump(mode="json") for r in journal.rollouts()]
        table = Table("id", "status", "profile", "reason", title="rollouts")
        for r in rows:
            table.add_row(str(r["id"]), r["status"], r["profile"], escape(r["reason"][:80]))
        emit(rows, as_json, table)
        return
    if pause_id is not None:
        pause_rollout(journal, pause_id)
    if status_id is not None or pause_id is not None:
        rid = pause_id if pause_id is not None else status_id
        assert rid is not None  # one of them, by the mode check above
        summary = rollout_summary(journal, rid)
        emit(summary.model_dump(mode="json"), as_json, _rollout_table(summary))
        return
    progress = new_progress()
    runner_kw = dict(workers=workers, accept_boot_risk=accept_boot_risk, boot_timeout_s=boot_timeout)
    if resume_id is not None:
        runner = resume_rollout(paths, journal, resume_id, Path(inventory_file) if inventory_file else None,
                                progress, **runner_kw)
        rollout_id = resume_id
    else:
        assert profile is not None  # the fourth mode, by the mode check above
        runner, rollout_id = start_rollout(paths, journal, _inventory_path(inventory_file), find_profile(profile),
                                           list(units) or None, playbook, progress, **runner_kw)
    try:
        summary = finish_rollout(paths, runner, rollout_id, retry_failed=retry_failed)
    finally:
        progress.close()
    emit(summary.model_dump(mode="json"), as_json, _rollout_table(summary))
    if not as_json:
        err().print(f"rollout {rollout_id}: {summary.status}"
                    + (f" ({escape(summary.reason)})" if summary.reason else "")
                    + f"; report: {escape(summary.report_html)}")
    if summary.status == "halted":
        raise RolloutHalted(f"rollout {rollout_id} halted: {summary.reason}")
