"""`tune diagnose`: what disturbs a unit's RT CPUs."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click
from rich.markup import escape
from rich.table import Table

from orchestrator.cli.common import (
    _db_option,
    _load_inventory,
    _output_path,
    cli_paths,
    emit,
    err,
    new_progress,
)
from orchestrator.core.events import Event

if TYPE_CHECKING:
    from orchestrator.remote.transport import Transport


def _diagnose_table(diag):
    from rich.console import Group

    findings = Table("target", "severity", "finding and evidence", "change, or advice", title=f"tune diagnose "
                     f"{diag.unit}: findings", show_lines=True, expand=True)
    for f in diag.findings:
        findings.add_row(f.target, f.severity, escape(f.title) + "\n[dim]" + escape("\n".join(f.evidence)) + "[/dim]",
                         escape(f.change or f.advice or ""))
    parts: list = [findings]
    for t in diag.targets:
        ipi = Table("IPI", "type", *[f"CPU{c}" + (" RT" if c in t.rt_cpus else "") for c in t.cpus],
                    title=f"{t.target} ({t.label}, {t.kernel}): IPIs/s over {t.duration_s:.0f} s; senders from "
                          f"{t.tracing}")
        for r in t.ipis:
            ipi.add_row(r.row, escape(r.description), *[f"{r.per_cpu.get(c, 0):.1f}" for c in t.cpus])
        parts.append(ipi)
    return Group(*parts)


@click.command("diagnose")
@click.argument("unit")
@click.option("--inventory", "-i", "inventory_file", default=None, help="Inventory file (default: the lab's).")
@click.option("--target", type=click.Choice(["host", "guest", "both"]), default=None,
              help="Which machine(s) to diagnose, over the same window [default: both when the unit has a guest].")
@click.option("--duration", default="30s", show_default=True, help="The tracing window: 30s, 2m, 45.")
@click.option("--html", "html_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the report here (default: the state directory's artifacts).")
@_db_option
@click.option("--json", "as_json", is_flag=True)
def diagnose_cmd(unit: str, inventory_file: str | None, target: str | None, duration: str, html_file: Path | None,
                 as_json: bool, db: str | None = None) -> None:
    """Find what disturbs UNIT's RT CPUs: IPIs and their senders, crash loops, the tick on nohz_full CPUs,
    timers, WFI traps; each finding with the profile change that addresses it.

    Traces in a private tracefs instance and leaves the tracing state as found (also on Ctrl-C).
    """
    import time

    from orchestrator.diagnose.window import (
        diagnose,
        parse_duration,
        rt_hints_from_vars,
    )
    from orchestrator.remote.ssh import SSHTransport
    from orchestrator.report.diagnosis import save_diagnosis
    from orchestrator.run.apply import open_controller_journal

    seconds = parse_duration(duration)
    _output_path(html_file, "--html")
    inv = _load_inventory(inventory_file)
    spec = inv.unit(unit)
    target = target or ("both" if spec.guest else "host")
    roles = ["host", "guest"] if target == "both" else [target]
    hints = rt_hints_from_vars(spec.vars)
    endpoints = {role: inv.endpoint(unit, role) for role in roles}  # input errors before any connection
    progress = new_progress(quiet=as_json)
    journal = open_controller_journal(cli_paths(), db)

    def sink(event: Event) -> None:  # the journal keeps what was done to the unit, not the progress ticks
        if event.total is None:
            journal(event)
        progress(event)

    transports: dict[str, Transport] = {}
    try:
        for role, ep in endpoints.items():
            transports[role] = SSHTransport(ep)
        diag = diagnose(unit, transports, duration_s=seconds, rt_hints=hints, events=sink)
    finally:
        progress.close()
        journal.close()
        for t in transports.values():
            t.close()
    out = cli_paths().state / "artifacts" / f"diagnose-{unit}-{time.strftime('%Y%m%dT%H%M%S')}"
    json_path, html_path = save_diagnosis(diag, out / "diagnosis.json", html_file or out / "diagnosis.html")
    data = diag.model_dump(mode="json")
    data["findings"] = [f.model_dump(mode="json") for f in diag.findings]
    data["report"], data["html"] = str(json_path), str(html_path)
    emit(data, as_json, _diagnose_table(diag))
    if not as_json:
        err().print(f"report: {escape(str(html_path))}")
