"""Running checks: one pytest process per target under test, with rt-tune's plugin, the shipped checks and the
user's files; its outcomes read back as a `CheckReport`.

A process of its own: a user's check is their code, and a hang or a crash in it must not take rt-tune down (a
check that hangs is stopped by pytest-timeout and counts as failed). pytest reads no configuration of the user's
directories (`-c` an empty ini) and imports each file on its own (`--import-mode=importlib`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from orchestrator.checks.plugin import CheckSpec, endpoint_to_dict
from orchestrator.checks.promises import TargetPromise
from orchestrator.core.errors import InputError, TuneError
from orchestrator.remote.transport import Endpoint

SHIPPED = Path(__file__).resolve().parent / "shipped" / "test_promises.py"
DEFAULT_CHECK_TIMEOUT_S = 120.0
#: pytest's own start and collection, beyond the checks' deadlines.
PROCESS_GRACE_S = 60.0


class CheckOutcome(BaseModel):
    nodeid: str
    outcome: str  # passed / failed / skipped (a failed setup or teardown: failed)
    duration_s: float
    message: str = ""
    shipped: bool


class CheckReport(BaseModel):
    unit: str
    target: str
    outcomes: list[CheckOutcome] = Field(default_factory=list)
    error: str = ""  # the run itself failed (could not connect, pytest crashed)
    #: whether the checks' commands ran in a read-only mount namespace (None: no check connected)
    read_only: bool | None = None

    @property
    def failed(self) -> list[CheckOutcome]:
        return [o for o in self.outcomes if o.outcome == "failed"]

    @property
    def ok(self) -> bool:
        return not self.error and not self.failed

    def counts(self) -> dict[str, int]:
        out = {"passed": 0, "failed": 0, "skipped": 0}
        for o in self.outcomes:
            out[o.outcome] = out.get(o.outcome, 0) + 1
        return out

    def summary(self) -> str:
        c = self.counts()
        text = f"{c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped"
        if self.read_only is False:
            text += " (NOT read-only: no `unshare` or no root on the target)"
        return f"{text}; {self.error}" if self.error else text


def _pytest_argv(files: Sequence[Path], ini: Path, extra: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "pytest", "-c", str(ini), "--rootdir", "/", "-p", "no:cacheprovider",
            "-p", "no:pytest11.testinfra", "-p", "no:randomly", "-p", "orchestrator.checks.plugin",
            "--import-mode=importlib", "-q", "--no-header", *extra, *map(str, files)]


def _env() -> dict[str, str]:
    here = str(Path(__file__).resolve().parents[2])  # the package's parent: importable in the child as here
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": here + (os.pathsep + path if path else ""), "PYTHONDONTWRITEBYTECODE": "1"}


def check_files(files: Sequence[Path], where: str) -> None:
    """A user's check files must exist, import and define at least one test: collected (nothing connects)
    before anything touches a unit. InputError naming the file otherwise."""
    for f in files:
        if not f.is_file():
            raise InputError(f"{where}: check file {f} does not exist")
    if not files:
        return
    with tempfile.TemporaryDirectory(prefix="rt-tune-checks-") as tmp:
        ini = Path(tmp) / "pytest.ini"
        ini.write_text("[pytest]\n")
        proc = subprocess.run(_pytest_argv(files, ini, ["--collect-only"]), capture_output=True, text=True,
                              timeout=PROCESS_GRACE_S * 2, env=_env(), cwd=tmp, check=False)
    collected = {line.split("::", 1)[0] for line in proc.stdout.splitlines() if "::" in line}
    if proc.returncode not in (0, 5):
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise InputError(f"{where}: the check files do not load (pytest --collect-only, exit {proc.returncode}):\n"
                         f"{tail}")
    for f in files:
        if not any(Path(c).name == f.name or c.endswith(str(f)) for c in collected):
            raise InputError(f"{where}: check file {f} defines no test (a check is a `test_*` function)")


def run_checks(unit: str, target: str, endpoint: Endpoint, promise: TargetPromise, *, user_files: Sequence[Path] = (),
               variables: dict[str, Any] | None = None, junit: Path | None = None,
               check_timeout_s: float = DEFAULT_CHECK_TIMEOUT_S, read_only: bool = True,
               shipped: bool = True) -> CheckReport:
    """Run the shipped checks (for `promise`) and `user_files` against one target; never raises for a failing
    check (the report says), a TuneError when pytest cannot be run at all."""
    files = ([SHIPPED] if shipped else []) + list(user_files)
    report = CheckReport(unit=unit, target=target)
    if not files:
        return report
    with tempfile.TemporaryDirectory(prefix="rt-tune-checks-") as tmp:
        results = Path(tmp) / "results.jsonl"
        run_timeout_s = check_timeout_s * 50 + PROCESS_GRACE_S
        spec = CheckSpec(unit=unit, target=target, endpoint=endpoint_to_dict(endpoint), promise=promise,
                         vars=variables or {}, command_timeout_s=min(check_timeout_s, 300.0), read_only=read_only,
                         lifetime_s=run_timeout_s, results=str(results))
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(spec.model_dump_json())
        ini = Path(tmp) / "pytest.ini"
        ini.write_text("[pytest]\n")
        extra = ["--rt-tune-spec", str(spec_path), "--timeout", str(int(check_timeout_s))]
        if junit is not None:
            extra += ["--junitxml", str(junit), "-o", f"junit_suite_name=rt-tune {unit}.{target}"]
        try:
            proc = subprocess.run(_pytest_argv(files, ini, extra), capture_output=True, text=True, env=_env(),
                                  cwd=tmp, timeout=run_timeout_s, check=False)
        except subprocess.TimeoutExpired:
            report.error = "the check run did not finish"
            return report
        except OSError as exc:
            raise TuneError(f"cannot run pytest for the checks: {exc}") from exc
        seen: dict[str, CheckOutcome] = {}
        if results.exists():
            for line in results.read_text().splitlines():
                r = json.loads(line)
                if "read_only" in r:
                    report.read_only = r["read_only"]
                    continue
                prior = seen.get(r["nodeid"])
                if prior is not None and prior.outcome == "failed":
                    continue  # a failed call stays failed whatever its teardown did
                seen[r["nodeid"]] = CheckOutcome(nodeid=r["nodeid"], outcome=r["outcome"],
                                                 duration_s=r["duration_s"], message=r["message"],
                                                 shipped=("/" + r["nodeid"].split("::")[0]) == str(SHIPPED))
        report.outcomes = list(seen.values())
        if proc.returncode not in (0, 1) or (proc.returncode == 1 and not report.failed):
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-10:])
            report.error = f"pytest exit {proc.returncode}: {tail}"
    return report
