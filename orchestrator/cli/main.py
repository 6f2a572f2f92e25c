"""`tune`: the command group, and THE mapping of every exception to an exit status and a message (never a
traceback). `run(argv, env)` is the whole command as a function."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape

from orchestrator.cli.apply import (
    apply_cmd,
    facts_cmd,
    plan_cmd,
    profile,
    rollback_cmd,
    status_cmd,
    verify_cmd,
)
from orchestrator.cli.check import check_cmd
from orchestrator.cli.common import Cli
from orchestrator.cli.diagnose import diagnose_cmd
from orchestrator.cli.lab import lab
from orchestrator.cli.measure import (
    ab_cmd,
    cyclictest_parse_cmd,
    measure_cmd,
    report_cmd,
)
from orchestrator.cli.rollout import rollout_cmd
from orchestrator.core.errors import ExitStatus, TuneError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="rt-tune")
@click.option("-v", "--verbose", is_flag=True,
              help="Log every remote command on stderr with its exit status and time, and every connection.")
def cli(verbose: bool) -> None:
    """rt-tune: tune real-time KVM units, measure every change, keep only what helps."""
    if verbose:
        _log_to_stderr()


for _command in (lab, facts_cmd, apply_cmd, rollout_cmd, ab_cmd, plan_cmd, profile, status_cmd, rollback_cmd,
                 verify_cmd, cyclictest_parse_cmd, measure_cmd, report_cmd, diagnose_cmd, check_cmd):
    cli.add_command(_command)


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


# ---- facts and apply -----------------------------------------------------------------------------------


# ---- measurement -----------------------------------------------------------------------------------------


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


def _passwords_given(inv: Cli) -> list[str]:
    """Passwords the user gave rt-tune (URLs in the arguments or RT_TUNE_DB, PGPASSWORD): kept out of logs."""
    from orchestrator.journal.urls import url_secrets

    found = [inv.env.get("PGPASSWORD", "")]
    for arg in [*inv.argv, inv.env.get("RT_TUNE_DB", "")]:
        for part in (arg, arg.partition("=")[2]):  # --db URL and --db=URL
            if "://" in part or "password" in part.lower():
                found += url_secrets(part)
    return [p for p in found if p]


def _log_internal_error(exc: BaseException, passwords: list[str], inv: Cli) -> Path | str:
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
                      f"argv: {['tune', *inv.argv]!r}\n\n" + "".join(traceback.format_exception(exc)), passwords)
    name = f"internal-error-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}.log"
    try:
        logs = inv.paths.state / "logs"
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


def _report(exc: BaseException, inv: Cli) -> int:
    """Print what went wrong (never a traceback) and return the exit status."""
    from orchestrator.journal.urls import redact_url

    status = exit_status(exc)
    passwords = _passwords_given(inv)
    if isinstance(exc, KeyboardInterrupt):
        inv.err.print("interrupted; nothing was left running")
    elif isinstance(exc, click.exceptions.Abort):
        inv.err.print("interrupted")
    elif isinstance(exc, click.ClickException):
        exc.message = redact_url(exc.message, passwords)  # type: ignore[misc]  # what click prints, redacted
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
            log = _log_internal_error(exc, passwords, inv)
            what = redact_url(f"{type(exc).__name__}: {exc}", passwords)
            text = (f"[bold red]internal error:[/bold red] {escape(what)}\nThis is a bug in rt-tune; the "
                    f"traceback is in {escape(str(log))} (please attach it to a report).")
        inv.err.print(text, highlight=False, soft_wrap=True)
    return status


def run(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None, *,
        out: Console | None = None, err: Console | None = None) -> int:
    """`tune ARGV...` as a function (tests, embedding): the exit status, every exception reported as `tune`
    reports it (a message, never a traceback); nothing raised. `argv=None` reads sys.argv, `env=None` the
    process environment; `out`/`err` default to the terminal's stdout and stderr."""
    args = list(sys.argv[1:] if argv is None else argv)
    inv = Cli(out=out or Console(), err=err or Console(stderr=True), env=os.environ if env is None else env,
              argv=args)
    try:
        cli.main(args=args, prog_name="tune", standalone_mode=False, obj=inv)
    except SystemExit as exc:  # a command's own exit status (`tune verify` finding drift)
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or ExitStatus.OK
        inv.err.file.write(f"{exc.code}\n")
        return ExitStatus.ERROR
    except BaseException as exc:  # noqa: BLE001 - the one place every error is turned into an exit status
        try:
            return _report(exc, inv)
        except BaseException as failed:  # noqa: BLE001 - reporting itself failed: still no traceback
            sys.stderr.write(f"internal error: {type(exc).__name__} (and {type(failed).__name__} while "
                             "reporting it)\n")
            return ExitStatus.INTERNAL
    return ExitStatus.OK


def main() -> None:
    """The `tune` entry point: every exception ends as a message and an exit status, never a traceback."""
    sys.exit(run())
