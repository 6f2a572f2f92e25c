"""The `tune` command: parses arguments and prints. All work happens in the core; errors map to exit codes here."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, TaskID, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress
from rich.table import Table

from orchestrator.core import jsonio
from orchestrator.core.errors import ExitStatus, TuneError
from orchestrator.core.events import Event
from orchestrator.core.paths import Paths, default_inventory, inventory_search

err_console = Console(stderr=True)
out_console = Console()


class Progress:
    """Renders events for people on stderr (stdout stays clean for --json): a live bar for events that carry
    progress (done/total), a line for the rest."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self._bars: RichProgress | None = None
        self._tasks: dict[tuple[str, str], TaskID] = {}

    def __call__(self, event: Event) -> None:
        if self.quiet:
            return
        if event.total:
            if self._bars is None:
                self._bars = RichProgress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                                          TimeElapsedColumn(), console=err_console, transient=False)
                self._bars.start()
            key = (event.kind, event.subject)
            desc = f"{event.subject}: {event.message}"
            if key not in self._tasks:
                self._tasks[key] = self._bars.add_task(desc, total=event.total)
            self._bars.update(self._tasks[key], completed=event.done or 0, total=event.total, description=desc)
            if all(t.finished for t in self._bars.tasks):
                self.close()  # every bar is full: hand the terminal back
            return
        if self._bars is not None:
            self._bars.console.print(f"[dim]{escape(event.subject)}[/dim] {escape(event.message)}", highlight=False)
        else:
            err_console.print(f"[dim]{escape(event.subject)}[/dim] {escape(event.message)}", highlight=False)

    def close(self) -> None:
        if self._bars is not None:
            self._bars.stop()
            self._bars = None
            self._tasks.clear()


def emit(data: Any, as_json: bool, human: Any = None) -> None:
    if as_json:
        click.echo(jsonio.dumps(data, indent=2, default=str))  # valid JSON: NaN/Infinity become null
    elif human is not None:
        out_console.print(human)
    else:
        out_console.print(data)


def _paths() -> Paths:
    return Paths.from_env()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="rt-tune")
@click.option("-v", "--verbose", is_flag=True,
              help="Log every remote command on stderr with its exit status and time, and every connection.")
def cli(verbose: bool) -> None:
    """rt-tune: tune real-time KVM units, measure every change, keep only what helps."""
    if verbose:
        _log_to_stderr()


def _log_to_stderr() -> None:
    """rt-tune's own debug log (not paramiko's) on stderr, with wall-clock times: where a slow or stuck unit
    spends its time. Commands are shown as their argv (cut at 200 characters), never what is sent on stdin."""
    import logging

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s.%(msecs)03d %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("orchestrator")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)


# ---- lab -----------------------------------------------------------------------------------------------
@cli.group()
def lab() -> None:
    """The rehearsal lab: robot units made of real Debian VMs (host VM + guest VM) on this machine."""


def _lab():
    from orchestrator.lab.lab import Lab

    return Lab(_paths(), events=Progress())


@lab.command("up")
@click.option("--units", default=1, show_default=True, help="How many units (host VM + guest VM each).")
@click.option("--host-only", is_flag=True, help="Units without a guest VM (saves memory).")
@click.option("--arch", type=click.Choice(["amd64", "arm64"]), default="amd64", show_default=True,
              help="arm64: an arm64 host VM (EL2) running its guest nested with KVM; built under emulation.")
@click.option("--timeout", "boot_timeout", type=float, default=None,
              help="Seconds to wait for SSH [default: 300; arm64 900].")
@click.option("--json", "as_json", is_flag=True)
def lab_up(units: int, host_only: bool, arch: str, boot_timeout: float | None, as_json: bool) -> None:
    """Build (or reuse) the images, boot the VMs, write the inventory."""
    the_lab = _lab()
    state = the_lab.up(units, host_only=host_only, boot_timeout=boot_timeout, arch=arch)
    data = {"inventory": str(the_lab.paths.lab_inventory), **json.loads(state.model_dump_json())}
    emit(data, as_json, f"lab is up; inventory: {the_lab.paths.lab_inventory}")


@lab.command("build")
@click.option("--arch", type=click.Choice(["amd64", "arm64"]), default="amd64", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def lab_build(arch: str, as_json: bool) -> None:
    """Build (or find in the cache) the lab's images without booting anything."""
    images = _lab().build(arch)
    data = {"directory": str(images.directory), "arch": images.arch, "kernel": images.kernel,
            "kernels": list(images.kernels), "nested_guest": images.nested_guest}
    emit(data, as_json, f"{arch} images: {images.directory} (kernels: {', '.join(images.kernels)})")


@lab.command("down")
@click.option("--json", "as_json", is_flag=True)
def lab_down(as_json: bool) -> None:
    """Stop every lab VM; no QEMU process is left behind."""
    stopped = _lab().down()
    emit({"stopped": stopped}, as_json, f"stopped: {', '.join(stopped) or 'nothing was running'}")


@lab.command("status")
@click.option("--json", "as_json", is_flag=True)
def lab_status(as_json: bool) -> None:
    """Each VM: running, QEMU status, SSH port and whether SSH answers."""
    rows = _lab().status()
    table = Table("VM", "unit", "role", "running", "QEMU", "SSH", "port", "pid")
    for r in rows:
        table.add_row(r.name, r.unit, r.role, str(r.running), r.qemu_status or "-", str(r.ssh), str(r.ssh_port),
                      str(r.pid or "-"))
    emit([r.model_dump() for r in rows], as_json, table if rows else "no lab (run `tune lab up`)")


@lab.command("ssh", context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.option("--user", default="root", show_default=True)
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def lab_ssh(name: str, user: str, command: tuple[str, ...]) -> None:
    """Open a shell (or run COMMAND) on lab VM NAME, host key checked."""
    argv = _lab().ssh_argv(name, list(command), user=user)
    os.execvp(argv[0], argv)


@lab.command("reset")
@click.argument("names", nargs=-1)
@click.option("--cold", is_flag=True, help="Boot on fresh disks even when a pristine snapshot could be restored.")
@click.option("--json", "as_json", is_flag=True)
def lab_reset(names: tuple[str, ...], cold: bool, as_json: bool) -> None:
    """Return VMs (default: all) to pristine: restore the snapshot taken after their first pristine boot (disk
    and memory, seconds), or boot them on fresh disks (--cold, or when no snapshot matches)."""
    state = _lab().reset(list(names) or None, cold=cold)
    emit(json.loads(state.model_dump_json()), as_json, "reset to pristine" + (" disks and booted" if cold else ""))


@lab.command("power-cycle")
@click.argument("name")
@click.option("--no-wait", is_flag=True, help="Return right after the reset, do not wait for SSH.")
@click.option("--json", "as_json", is_flag=True)
def lab_power_cycle(name: str, no_wait: bool, as_json: bool) -> None:
    """Hard-reset VM NAME like pulling a unit's power: a QMP reset; a nested guest's QEMU is killed on its host and
    systemd starts it again."""
    boot_id = _lab().power_cycle(name, wait=not no_wait)
    emit({"name": name, "boot_id": boot_id}, as_json, f"{name} power-cycled" + (f"; boot_id {boot_id}" if boot_id else ""))


@lab.command("start")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
def lab_start(name: str, as_json: bool) -> None:
    """Start a stopped or killed VM again on its current disks."""
    _lab().start(name)
    emit({"name": name, "started": True}, as_json, f"{name} is up")


@lab.command("kill")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
def lab_kill(name: str, as_json: bool) -> None:
    """Kill VM NAME at once (fault injection: a unit that lost power)."""
    _lab().kill(name)
    emit({"name": name, "killed": True}, as_json, f"{name} killed")


# ---- facts and apply -----------------------------------------------------------------------------------
def _inventory_path(given: str | None) -> Path:
    return Path(given) if given else default_inventory(_paths())


def _output_path(path: Path | str | None, flag: str, *, directory: bool = False) -> None:
    """An output written when the command ends (after minutes or hours of measuring), checked before anything
    runs, so a path that cannot be written fails at once, not after the run. Nothing is created here: the
    nearest existing directory above it must be one rt-tune can write in (the writer makes the rest)."""
    from orchestrator.core.errors import InputError

    if path is None:
        return
    path = Path(path)
    try:
        if path.exists() and not (path.is_dir() if directory else path.is_file()):
            kind = "directory" if directory else "regular file"
            raise InputError(f"{flag} {path}: exists and is not a {kind}")
        folder = path if directory else path.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir():
            raise InputError(f"{flag} {path}: {folder} is not a directory")
        if not os.access(folder, os.W_OK):
            raise InputError(f"{flag} {path}: the directory {folder} is not writable")
    except OSError as exc:
        raise InputError(f"{flag} {path}: cannot write there: {exc.strerror}") from None


def _inventory_source(given: str | None) -> tuple[Path, str]:
    """The inventory to use and where it came from (for the message when it does not exist)."""
    return (Path(given), "--inventory") if given else inventory_search(_paths())


def _load_inventory(given: str | None):
    """The inventory (`--inventory`, else the default); a missing one says where rt-tune looked."""
    from orchestrator.run.apply import read_inventory

    return read_inventory(_paths(), *_inventory_source(given))


@cli.command("facts")
@click.argument("target")
@click.option("--inventory", "-i", "inventory_file", default=None, help="Inventory file (default: the lab's).")
@click.option("--json", "as_json", is_flag=True)
def facts_cmd(target: str, inventory_file: str | None, as_json: bool) -> None:
    """Basic facts of UNIT.host or UNIT.guest: kernel, arch, CPUs, /proc/cmdline, boot_id."""
    from orchestrator.facts.base import gather_basic
    from orchestrator.config.inventory import split_target
    from orchestrator.remote.transport import SSHTransport

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
            table.add_row(r.unit, o.description, o.status, fmt(f["before_p999_us"]), fmt(f["after_p999_us"]),
                          fmt(f["before_max_us"]), fmt(f["after_max_us"]), escape(str(why)[:80]))
    return table


_boot_timeout_option = click.option(
    "--boot-timeout", type=click.FloatRange(min=10), default=300.0, show_default=True,
    help="Seconds to wait for a unit (and the guest it runs) to come back from a reboot before power-cycling it "
         "(and again after the power cycle).")
_db_option = click.option(
    "--db", default=None, metavar="URL|FILE", envvar="RT_TUNE_DB",
    help="The journal: a SQLite file (default: the state directory's) or postgresql://... shared by several "
         "controllers [env RT_TUNE_DB]. Keep the password out of the URL (it would show in `ps`): libpq reads "
         "PGPASSWORD or ~/.pgpass.")


def _units(inv, units: tuple[str, ...]) -> list[str]:
    """The units named (default: all of the inventory's); unknown ones: one InputError listing the known."""
    from orchestrator.core.errors import InputError

    unknown = [u for u in dict.fromkeys(units) if u not in inv.units]
    if unknown:
        raise InputError(f"no unit {', '.join(map(repr, unknown))} in the inventory; its units: "
                         f"{', '.join(sorted(inv.units)) or '(none)'}")
    return list(dict.fromkeys(units)) or sorted(inv.units)


@cli.command("apply")
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
    from orchestrator.run.apply import check_profile, load_for_apply, make_engine, write_reports
    from orchestrator.config.profile import find_profile

    paths = _paths()
    progress = Progress()
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
        err_console.print(f"report: {escape(str(report_html))}")


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


@cli.command("rollout")
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
    from orchestrator.run.apply import (PLAYBOOKS_DIR, check_profile, fleet_runner, load_for_apply,
                                    open_controller_journal, policy_for_journal, write_fleet_reports)
    from orchestrator.core.errors import InputError
    from orchestrator.run.fleet import (LoadedPolicy, RolloutHalted, RolloutPolicy, load_rollout_policy,
                                    rollout_summary)
    from orchestrator.config.profile import find_profile

    modes = sum(x is not None for x in (profile, resume_id, pause_id, status_id))
    if modes != 1:
        raise InputError("give exactly one of PROFILE, --resume ID, --pause ID or --status ID")
    paths = _paths()
    journal = open_controller_journal(paths, db, read_only=status_id is not None)  # --status only reads
    if status_id is not None or pause_id is not None:
        rid = pause_id if pause_id is not None else status_id
        if rid == 0:
            rows = [r.model_dump(mode="json") for r in journal.rollouts()]
            table = Table("id", "status", "profile", "reason", title="rollouts")
            for r in rows:
                table.add_row(str(r["id"]), r["status"], r["profile"], escape(r["reason"][:80]))
            emit(rows, as_json, table)
            return
        rec = journal.get_rollout(rid)
        if pause_id is not None and not journal.set_rollout_status(rid, "pausing", "pause requested",
                                                                   expect=("running",)):
            raise InputError(f"rollout {rid} is {rec.status}, not running: nothing to pause")
        summary = rollout_summary(journal, rid)
        emit(summary.model_dump(mode="json"), as_json, _rollout_table(summary))
        return
    progress = Progress()
    if resume_id is not None:
        rec = journal.get_rollout(resume_id)
        policy = LoadedPolicy(RolloutPolicy.model_validate(rec.policy), Path("/"))
        inv_path = Path(inventory_file) if inventory_file else Path(rec.inventory)
        inv, _ = load_for_apply(paths, inv_path, progress)
        runner = fleet_runner(paths, journal, inv, policy, progress, workers=workers,
                              accept_boot_risk=accept_boot_risk, boot_timeout_s=boot_timeout)
        rollout_id = resume_id
    else:
        loaded = load_rollout_policy(playbook or PLAYBOOKS_DIR / "rollout.yaml")
        profile_path = find_profile(profile)
        inv_path = _inventory_path(inventory_file)
        inv, _ = load_for_apply(paths, inv_path, progress)
        chosen = _units(inv, units)
        check_profile(inv, chosen, profile_path)  # every unit's input errors before any unit is touched
        runner = fleet_runner(paths, journal, inv, loaded, progress, workers=workers,
                              accept_boot_risk=accept_boot_risk, boot_timeout_s=boot_timeout)
        runner.policy = policy_for_journal(loaded)
        rollout_id = runner.create(profile_path.resolve(), inv_path.resolve(), chosen).id
    try:
        summary = runner.run(rollout_id, retry_failed=retry_failed)
    finally:
        progress.close()
    artifacts = paths.state / "artifacts" / f"rollout-{rollout_id}"
    report_json, report_html = write_fleet_reports(summary, artifacts)
    summary = summary.model_copy(update={"report_json": str(report_json), "report_html": str(report_html)})
    emit(summary.model_dump(mode="json"), as_json, _rollout_table(summary))
    if not as_json:
        err_console.print(f"rollout {rollout_id}: {summary.status}"
                          + (f" ({escape(summary.reason)})" if summary.reason else "")
                          + f"; report: {escape(str(report_html))}")
    if summary.status == "halted":
        raise RolloutHalted(f"rollout {rollout_id} halted: {summary.reason}")


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


@cli.command("ab")
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
    from orchestrator.run.ab import ABExperiment, write_ab_reports
    from orchestrator.run.apply import load_for_apply, make_engine
    from orchestrator.report.ab import render_ab_html
    from orchestrator.config.profile import find_profile

    _output_path(html_out, "--html")
    paths = _paths()
    progress = Progress()
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
        err_console.print(f"report: {escape(str(html_path))}")


@cli.command("plan")
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


@cli.group()
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
    from orchestrator.run.apply import check_profile
    from orchestrator.config.profile import describe, find_profile, load_profile

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


def _engine(inventory_file: str | None, db: str | None = None, units: tuple[str, ...] = (), *,
            read_only: bool = False):
    """The engine and the chosen units: unknown units are refused before the journal is even opened."""
    from orchestrator.run.apply import make_engine

    inv = _load_inventory(inventory_file)
    chosen = _units(inv, units)
    return make_engine(_paths(), inv, None, Progress(), db=db, read_only=read_only), chosen


@cli.command("status")
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


@cli.command("rollback")
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


@cli.command("verify")
@click.argument("unit")
@click.option("--inventory", "-i", "inventory_file", default=None)
@_db_option
@click.option("--json", "as_json", is_flag=True)
def verify_cmd(unit: str, inventory_file: str | None, as_json: bool, db: str | None = None) -> None:
    """Compare UNIT's live state with the journal; drift marks the unit degraded (nothing is overwritten)."""
    engine, _ = _engine(inventory_file, db, (unit,))
    report = engine.verify(unit)
    table = Table("change", "target", "in place")
    for r in report:
        table.add_row(r["change"], r["target"], "yes" if r["in_place"] else "DRIFTED")
    emit(report, as_json, table)
    if any(not r["in_place"] for r in report):
        sys.exit(ExitStatus.DRIFT)


# ---- measurement -----------------------------------------------------------------------------------------
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


@cli.command("cyclictest-parse")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def cyclictest_parse_cmd(file: Path, as_json: bool) -> None:
    """Parse cyclictest output (-q summary, -h histogram, or --json file) into exact figures."""
    from orchestrator.measure.parse import parse_cyclictest_file

    result = parse_cyclictest_file(file)
    emit(result.public(), as_json, _stats_table(result))


@cli.command("measure")
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
    from orchestrator.remote.transport import SSHTransport

    flags = {"duration": duration, "histogram_us": histogram_us, "interval_us": interval_us, "load": load,
             "load_args": load_args}
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
                         artifacts=Path(out_dir), events=Progress(quiet=False))
    emit({**result.public(), "raw_artifact": result.raw_artifact, "target": result.target}, as_json,
         _stats_table(result))


@cli.command("report")
@click.argument("result_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--html", "html_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write a self-contained HTML report with histograms and tail (CCDF) plots.")
@click.option("--json", "as_json", is_flag=True)
def report_cmd(result_file: Path, html_out: Path | None, as_json: bool) -> None:
    """Show a result (a measurement, a list of them, or a report) as tables; optionally as HTML with plots."""
    from orchestrator.report.latency import SUMMARY_COLUMNS, load_report, render_html, summary_rows

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
        out_console.print(table)
    if html_out is not None:
        err_console.print(f"HTML report: {escape(str(html_out))}")


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


@cli.command("diagnose")
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

    from orchestrator.run.apply import open_controller_journal
    from orchestrator.diagnose.window import diagnose, parse_duration, rt_hints_from_vars
    from orchestrator.report.diagnosis import save_diagnosis
    from orchestrator.remote.transport import SSHTransport

    seconds = parse_duration(duration)
    _output_path(html_file, "--html")
    inv = _load_inventory(inventory_file)
    spec = inv.unit(unit)
    target = target or ("both" if spec.guest else "host")
    roles = ["host", "guest"] if target == "both" else [target]
    hints = rt_hints_from_vars(spec.vars)
    endpoints = {role: inv.endpoint(unit, role) for role in roles}  # input errors before any connection
    progress = Progress(quiet=as_json)
    journal = open_controller_journal(_paths(), db)

    def sink(event: Event) -> None:  # the journal keeps what was done to the unit, not the progress ticks
        if event.total is None:
            journal(event)
        progress(event)

    transports = {}
    try:
        for role, ep in endpoints.items():
            transports[role] = SSHTransport(ep)
        diag = diagnose(unit, transports, duration_s=seconds, rt_hints=hints, events=sink)
    finally:
        progress.close()
        journal.close()
        for t in transports.values():
            t.close()
    out = _paths().state / "artifacts" / f"diagnose-{unit}-{time.strftime('%Y%m%dT%H%M%S')}"
    json_path, html_path = save_diagnosis(diag, out / "diagnosis.json", html_file or out / "diagnosis.html")
    data = diag.model_dump(mode="json")
    data["findings"] = [f.model_dump(mode="json") for f in diag.findings]
    data["report"], data["html"] = str(json_path), str(html_path)
    emit(data, as_json, _diagnose_table(diag))
    if not as_json:
        err_console.print(f"report: {escape(str(html_path))}")


def exit_status(exc: BaseException) -> int:
    """THE mapping of an exception to `tune`'s exit status (the table: orchestrator.core.errors.ExitStatus)."""
    if isinstance(exc, KeyboardInterrupt | click.exceptions.Abort):
        return ExitStatus.INTERRUPTED
    if isinstance(exc, click.ClickException):
        return exc.exit_code
    if isinstance(exc, TuneError):
        return exc.exit_code
    if isinstance(exc, BrokenPipeError):
        return ExitStatus.BROKEN_PIPE
    if isinstance(exc, OSError):
        return ExitStatus.IO
    return ExitStatus.INTERNAL


def _passwords_given() -> list[str]:
    """Passwords the user gave rt-tune (URLs in the arguments or RT_TUNE_DB, PGPASSWORD): kept out of logs."""
    from orchestrator.journal.urls import url_secrets

    found = [os.environ.get("PGPASSWORD", "")]
    for arg in [*sys.argv[1:], os.environ.get("RT_TUNE_DB", "")]:
        for part in (arg, arg.partition("=")[2]):  # --db URL and --db=URL
            if "://" in part or "password" in part.lower():
                found += url_secrets(part)
    return [p for p in found if p]


def _log_internal_error(exc: BaseException, passwords: list[str]) -> Path | str:
    """Write the traceback (redacted) to <state>/logs/internal-error-<time>-<pid>.log, or to the temp dir when
    the state directory is not writable; the path, or why no log could be written."""
    import platform
    import tempfile
    import time
    import traceback
    from importlib.metadata import PackageNotFoundError, version

    from orchestrator.journal.urls import redact_url

    try:
        ours = version("rt-tune")
    except PackageNotFoundError:
        ours = "unknown"
    body = redact_url(f"rt-tune {ours} internal error, {time.strftime('%Y-%m-%d %H:%M:%S %z')}\n"
                      f"python {platform.python_version()} on {platform.platform()}\n"
                      f"argv: {sys.argv!r}\n\n" + "".join(traceback.format_exception(exc)), passwords)
    name = f"internal-error-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.log"
    try:
        logs = _paths().state / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        path = logs / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as err:
        try:
            fd, tmp = tempfile.mkstemp(prefix="rt-tune-" + name.removesuffix(".log") + "-", suffix=".log")
            path = Path(tmp)
        except OSError as err2:
            return f"(no log written: {err}; {err2})"
    with os.fdopen(fd, "w", encoding="utf-8", errors="replace") as f:
        f.write(body)
    return path


def _report(exc: BaseException) -> int:
    """Print what went wrong (never a traceback) and return the exit status."""
    from orchestrator.journal.urls import redact_url

    status = exit_status(exc)
    passwords = _passwords_given()
    if isinstance(exc, KeyboardInterrupt):
        err_console.print("interrupted; nothing was left running")
    elif isinstance(exc, click.exceptions.Abort):
        err_console.print("interrupted")
    elif isinstance(exc, click.ClickException):
        exc.message = redact_url(exc.message, passwords)
        exc.show()
    elif isinstance(exc, BrokenPipeError):
        try:  # no "Exception ignored ... BrokenPipeError" when Python flushes stdout on exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
    else:
        if isinstance(exc, TuneError):
            text = f"[bold red]error:[/bold red] {escape(redact_url(str(exc), passwords))}"
        elif status == ExitStatus.IO:
            assert isinstance(exc, OSError)
            where = " ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
            what = f"{exc.strerror or exc}" + (f": {where}" if where else "")
            text = f"[bold red]error:[/bold red] {escape(redact_url(what, passwords))}"
        else:
            log = _log_internal_error(exc, passwords)
            what = redact_url(f"{type(exc).__name__}: {exc}", passwords)
            text = (f"[bold red]internal error:[/bold red] {escape(what)}\nThis is a bug in rt-tune; the "
                    f"traceback is in {escape(str(log))} (please attach it to a report).")
        err_console.print(text, highlight=False, soft_wrap=True)
    return status


def run(argv: Sequence[str] | None = None) -> int:
    """`tune ARGV...` as a function (tests, embedding): the exit status, every exception reported as `tune`
    reports it (a message, never a traceback); nothing raised. `argv=None` reads sys.argv."""
    try:
        cli.main(args=None if argv is None else list(argv), prog_name="tune" if argv is not None else None,
                 standalone_mode=False)
    except SystemExit as exc:  # a command's own exit status (`tune verify` finding drift)
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or ExitStatus.OK
        sys.stderr.write(f"{exc.code}\n")
        return ExitStatus.ERROR
    except BaseException as exc:  # noqa: BLE001 - the one place every error is turned into an exit status
        try:
            return _report(exc)
        except BaseException as failed:  # noqa: BLE001 - reporting itself failed: still no traceback
            sys.stderr.write(f"internal error: {type(exc).__name__} (and {type(failed).__name__} while "
                             "reporting it)\n")
            return ExitStatus.INTERNAL
    return ExitStatus.OK


def main() -> None:
    """The `tune` entry point: every exception ends as a message and an exit status, never a traceback."""
    sys.exit(run())
