"""What every command shares: the invocation's consoles and environment (`Cli`, no module globals),
printing (`emit`, `Progress`), the common options, and reading the inventory and the units a command names."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.progress import Progress as RichProgress

from orchestrator.core import jsonio
from orchestrator.core.events import Event
from orchestrator.core.paths import Paths, default_inventory, inventory_search


@dataclass
class Cli:
    """One `tune` invocation: where it prints and the environment it reads. Made by `main.run` and handed to
    every command through click's context, so nothing is a module global (tests pass their own consoles)."""

    out: Console
    err: Console
    env: Mapping[str, str]
    argv: Sequence[str] = ()

    @property
    def paths(self) -> Paths:
        return Paths.from_env(dict(self.env))

    def emit(self, data: Any, as_json: bool, human: Any = None) -> None:
        if as_json:
            self.out.file.write(jsonio.dumps(data, indent=2, default=str) + "\n")  # NaN/Infinity become null
            self.out.file.flush()
        elif human is not None:
            self.out.print(human)
        else:
            self.out.print(data)


def here() -> Cli:
    """The running invocation's `Cli` (click's context object)."""
    ctx = click.get_current_context(silent=True)
    found = ctx.find_object(Cli) if ctx is not None else None
    if found is None:  # a command function called outside `run` (a test calling it directly)
        return Cli(out=Console(), err=Console(stderr=True), env=os.environ)
    return found


def err() -> Console:
    return here().err


def cli_paths() -> Paths:
    return here().paths


def emit(data: Any, as_json: bool, human: Any = None) -> None:
    here().emit(data, as_json, human)


def new_progress(quiet: bool = False) -> Progress:
    return Progress(err(), quiet=quiet)


class Progress:
    """Renders events for people on stderr (stdout stays clean for --json): a live bar for events that carry
    progress (done/total), a line for the rest."""

    def __init__(self, console: Console, quiet: bool = False) -> None:
        self.console = console
        self.quiet = quiet
        self._bars: RichProgress | None = None
        self._tasks: dict[tuple[str, str], TaskID] = {}

    def __call__(self, event: Event) -> None:
        if self.quiet:
            return
        if event.total:
            if self._bars is None:
                self._bars = RichProgress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                                          TimeElapsedColumn(), console=self.console, transient=False)
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
            err().print(f"[dim]{escape(event.subject)}[/dim] {escape(event.message)}", highlight=False)

    def close(self) -> None:
        if self._bars is not None:
            self._bars.stop()
            self._bars = None
            self._tasks.clear()


def _inventory_path(given: str | None) -> Path:
    return Path(given) if given else default_inventory(cli_paths())


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
    return (Path(given), "--inventory") if given else inventory_search(cli_paths())


def _load_inventory(given: str | None):
    """The inventory (`--inventory`, else the default); a missing one says where rt-tune looked."""
    from orchestrator.run.apply import read_inventory

    return read_inventory(cli_paths(), *_inventory_source(given))


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
    from orchestrator.run.apply import choose_units

    return choose_units(inv, units)


def _engine(inventory_file: str | None, db: str | None = None, units: tuple[str, ...] = (), *,
            read_only: bool = False):
    """The engine and the chosen units: unknown units are refused before the journal is even opened."""
    from orchestrator.run.apply import make_engine

    inv = _load_inventory(inventory_file)
    chosen = _units(inv, units)
    return make_engine(cli_paths(), inv, None, new_progress(), db=db, read_only=read_only), chosen
