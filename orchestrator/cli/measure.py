"""`tune measure`, `ab`, `report` and `cyclictest-parse`: latency measured, compared and shown."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from orchestrator.cli.common import (
    _db_option,
    _inventory_path,
    _output_path,
    cli_paths,
    emit,
    err,
    here,
    new_progress,
)


def _ab_table(result) -> Table:
    table = Table("metric", "median A", "median B", "B - A", "CI", "Cliff's delta", "verdict",
                  title=f"A/B on {result.unit}.{result.target}: {len(result.arms[0].runs)} + "
                        f"{len(result.arms[1].runs)} runs ({' '.join(result.order)})")
    for e in result.effects:
        def f(v):
            return "-" if v is None else f"{v:.1f}"
        table.add_row(e.metric, f(e.median_a), f(e.median_b), f(e.diff), f"[{f(e.ci_low)}, {f(e.ci_high)}]",
                      f"{e.cliffs_delta:+.2f} ({e.cliffs_label})", e.verdict)
    return table


@click.command("ab")
@click.argument("profile_a")
@click.argument("profile_b")
@click.option("--unit", "unit", required=True, help="The unit to experiment on (its guest is measured if it has one).")
@click.option("--rounds", type=click.IntRange(min=2, max=1000), default=4, show_default=True,
              help="Rounds; each is one block of A and one of B, in ABBA order.")
@click.option("--runs", "runs_per_block", type=click.IntRange(min=1, max=100), default=2, show_default=True,
              help="cyclictest runs per block.")
@click.option("--order", type=click.Choice(["ABBA", "AB"]), default="ABBA", show_default=True)
@click.option("--inventory", "-i", "inventory_file", default=None)
@click.option("--playbook", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Measurement plan: cyclictest settings and load (default: playbooks/measurement.yaml).")
@click.option("--confidence", type=click.FloatRange(0.5, 0.999), default=0.95, show_default=True)
@click.option("--html", "html_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where to write the HTML report (default: beside the raw runs).")
@_db_option
@click.option("--json", "as_json", is_flag=True)
def ab_cmd(profile_a: str, profile_b: str, unit: str, rounds: int, runs_per_block: int, order: str,
           inventory_file: str | None, playbook: Path | None, confidence: float, html_out: Path | None,
           as_json: bool, db: str | None = None) -> None:
    """A/B latency experiment: PROFILE_A vs PROFILE_B on one unit, alternating ABBA under the same load; per
    metric the difference with a bootstrap confidence interval and Cliff's delta; HTML with overlaid plots."""
    from orchestrator.config.profile import find_profile
    from orchestrator.report.ab import render_ab_html
    from orchestrator.run.ab import ABExperiment, write_ab_reports
    from orchestrator.run.apply import load_for_apply, make_engine

    _output_path(html_out, "--html")
    paths = cli_paths()
    progress = new_progress()
    a, b = find_profile(profile_a), find_profile(profile_b)
    inv, _ = load_for_apply(paths, _inventory_path(inventory_file), progress)
    inv.unit(unit)
    engine = make_engine(paths, inv, playbook, progress, db=db)
    experiment = ABExperiment(engine, unit, a, b, rounds=rounds, runs_per_block=runs_per_block, order=order)
    try:
        result = experiment.run(confidence=confidence)
    finally:
        progress.close()
    json_path, html_path = write_ab_reports(result, engine.artifacts)
    if html_out is not None:
        html_path = render_ab_html(result, html_out)
    data = {**result.model_dump(mode="json", exclude={"arms"}), "report": str(json_path), "html": str(html_path)}
    emit(data, as_json, _ab_table(result))
    if not as_json:
        err().print(f"report: {escape(str(html_path))}")


def _stats_table(result) -> Table:
    table = Table("thread", "samples", "min", "avg", "p50", "p90", "p99", "p99.9", "p99.99", "max", "overflows",
                  title="latency (us)")
    rows = result.public()
    for entry in [*rows["threads"], {**rows["all"], "thread": "all"}]:
        def fmt(v):
            return "-" if v is None else (f"{v:.1f}" if isinstance(v, float) else str(v))
        table.add_row(str(entry.get("thread", "")), *(fmt(entry[k]) for k in (
            "samples", "min_us", "avg_us", "p50_us", "p90_us", "p99_us", "p999_us", "p9999_us", "max_us",
            "overflows")))
    return table


@click.command("cyclictest-parse")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def cyclictest_parse_cmd(file: Path, as_json: bool) -> None:
    """Parse cyclictest output (-q summary, -h histogram, or --json file) into exact figures."""
    from orchestrator.measure.parse import parse_cyclictest_file

    result = parse_cyclictest_file(file)
    emit(result.public(), as_json, _stats_table(result))


@click.command("measure")
@click.argument("target")
@click.option("--duration", default="60s", show_default=True, help="How long cyclictest runs (60s, 5m).")
@click.option("--load", type=click.Choice(["none", "stress-ng", "hackbench"]), default="none", show_default=True)
@click.option("--load-arg", "load_args", multiple=True, help="Extra argument for the load tool (repeatable).")
@click.option("--cpus", default=None, help="CPUs to measure on (default: the unit's rt_cpus var, else 1).")
@click.option("--histogram", "histogram_us", default=20000, show_default=True, help="Histogram size in us.")
@click.option("--interval", "interval_us", default=1000, show_default=True, help="cyclictest interval in us.")
@click.option("--out", "out_dir", default="artifacts", show_default=True, help="Where raw output and results go.")
@click.option("--inventory", "-i", "inventory_file", default=None, help="Inventory file (default: the lab's).")
@click.option("--json", "as_json", is_flag=True)
def measure_cmd(target: str, duration: str, load: str, load_args: tuple[str, ...], cpus: str | None,
                histogram_us: int, interval_us: int, out_dir: str, inventory_file: str | None,
                as_json: bool) -> None:
    """Measure latency with cyclictest on UNIT.host or UNIT.guest, under an optional declared load."""
    from orchestrator.config.inventory import load_inventory, split_target
    from orchestrator.measure.runner import measure, measurement_from_flags
    from orchestrator.remote.ssh import SSHTransport

    flags: dict[str, Any] = {"duration": duration, "histogram_us": histogram_us, "interval_us": interval_us,
                             "load": load, "load_args": load_args}
    # every flag is checked before the inventory is read or a unit reached
    settings, load_spec = measurement_from_flags(cpus=cpus if cpus is not None else "1", **flags)
    _output_path(out_dir, "--out", directory=True)
    inv = load_inventory(_inventory_path(inventory_file))
    unit, role = split_target(target)
    unit_vars, count_var = inv.unit(unit).vars, "cpus" if role == "host" else "guest_cpus"
    settings, load_spec = measurement_from_flags(  # again, against the unit's CPU count when its vars give it
        cpus=cpus if cpus is not None else str(unit_vars.get("rt_cpus", "1")),
        cpus_from="--cpus" if cpus is not None else f"unit {unit}'s rt_cpus var",
        cpu_count=unit_vars.get(count_var), cpu_count_from=f"unit {unit}'s {count_var} var", **flags)
    with SSHTransport(inv.endpoint(unit, role)) as t:
        result = measure(t, settings, load_spec, target=f"{unit}.{role}",
                         artifacts=Path(out_dir), events=new_progress())
    emit({**result.public(), "raw_artifact": result.raw_artifact, "target": result.target}, as_json,
         _stats_table(result))


@click.command("report")
@click.argument("result_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--html", "html_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write a self-contained HTML report with histograms and tail (CCDF) plots.")
@click.option("--json", "as_json", is_flag=True)
def report_cmd(result_file: Path, html_out: Path | None, as_json: bool) -> None:
    """Show a result (a measurement, a list of them, or a report) as tables; optionally as HTML with plots."""
    from orchestrator.report.latency import (
        SUMMARY_COLUMNS,
        load_report,
        render_html,
        summary_rows,
    )

    _output_path(html_out, "--html")
    report = load_report(result_file)
    rows = summary_rows(report)
    if html_out is not None:
        render_html(report, html_out)
    if as_json:
        emit({"rows": rows, "html": str(html_out) if html_out else None}, True)
        return
    for kind, columns in SUMMARY_COLUMNS.items():
        selected = [r for r in rows if r.get("kind") == kind]
        if not selected:
            continue
        table = Table(*columns, title=kind)
        for r in selected:
            table.add_row(*("-" if r.get(c) is None else str(r.get(c)) for c in columns))
        here().out.print(table)
    if html_out is not None:
        err().print(f"HTML report: {escape(str(html_out))}")
