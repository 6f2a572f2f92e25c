"""Run cyclictest on a target under a declared load, keep the raw output, return a LatencyResult.

Both the load and cyclictest run as transient systemd units (`systemd-run`) with a RuntimeMaxSec, so they are
stopped on error or Ctrl-C by `systemctl stop`, and stop by themselves even if the controller dies.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from orchestrator.core import duration
from orchestrator.core.cpulist import CpuListError, parse_cpulist
from orchestrator.core.errors import InputError, TransportError, TuneError
from orchestrator.core.events import Event, EventSink, discard
from orchestrator.facts.base import BOOT_ID, CMDLINE
from orchestrator.measure.counters import CounterDeltas, CounterSnapshot, counter_deltas, marker, parse_snapshot
from orchestrator.measure.counters import split_sections as split_counter_sections
from orchestrator.measure.model import CyclictestSettings, LatencyResult, LoadSpec
from orchestrator.measure.parse import parse_cyclictest
from orchestrator.remote.remote_scripts import MEASURE_RUN
from orchestrator.remote.transport import CommandResult, Transport

LOAD_TOOLS = {"stress-ng": "stress-ng", "hackbench": "hackbench"}
DEFAULT_LOAD_ARGS = {"stress-ng": ["--cpu", "0", "--cpu-load", "80"], "hackbench": ["-l", "1000000"]}


def parse_duration(text: str) -> float:
    """'60', '60s', '5m', '1h', '500ms' -> seconds: at least one second of cyclictest."""
    return duration.parse_duration(text, minimum_s=1.0, why_minimum=" is needed for a latency measurement")


_FLAG = {"cpus": "--cpus", "duration_s": "--duration", "histogram_us": "--histogram",
         "interval_us": "--interval", "kind": "--load", "args": "--load-arg"}


def _flag_problems(exc: ValidationError, given: dict[str, Any], cpus_from: str, whole: str) -> list[str]:
    """One line per error, named by its flag (`whole` for a rule over several fields), with the value."""
    out = []
    for err in exc.errors():
        loc = err["loc"]
        name = str(loc[0]) if loc else ""
        flag = cpus_from if name == "cpus" else _FLAG.get(name, whole)
        msg = err["msg"].removeprefix("Value error, ")
        got = given.get(name or whole, err.get("input")) if len(loc) <= 1 else err.get("input")
        out.append(f"{flag}: {msg} (got {got!r})")
    return out


def measurement_from_flags(*, cpus: str, duration: str, histogram_us: Any, interval_us: Any,
                           load: str = "none", load_args: Sequence[str] = (), cpus_from: str = "--cpus",
                           cpu_count: int | None = None, cpu_count_from: str = ""
                           ) -> tuple[CyclictestSettings, LoadSpec]:
    """`tune measure`'s flags as the models a playbook is validated by, so flags and playbooks share one set
    of rules. Every bad flag is reported at once (InputError), before an inventory is read or a unit reached.
    `cpus_from` names where the CPU list came from (the flag, or a unit's var); with `cpu_count` (the target's
    CPU count, named by `cpu_count_from`) a CPU the target does not have is refused too, before connecting."""
    if cpu_count is not None and (type(cpu_count) is not int or cpu_count < 1):
        raise InputError(f"{cpu_count_from}: {cpu_count!r} is not a CPU count (expected an integer >= 1)")
    problems: list[str] = []
    raw: dict[str, Any] = {"histogram_us": histogram_us, "interval_us": interval_us}
    try:
        raw["cpus"] = parse_cpulist(cpus, **({"max_cpu": cpu_count - 1} if cpu_count else {}))
    except CpuListError as exc:
        where = f" ({cpu_count_from}: {cpu_count} CPUs)" if cpu_count else ""
        problems.append(f"{cpus_from}: {exc}{where}")
    try:
        raw["duration_s"] = parse_duration(duration)
    except InputError as exc:
        problems.append(f"--duration: {exc}")
    given = {"cpus": cpus, "duration_s": duration, "histogram_us": histogram_us, "interval_us": interval_us,
             "kind": load, "args": list(load_args), "--load-arg": list(load_args)}
    settings = load_spec = None
    try:
        settings = CyclictestSettings.model_validate(raw)
    except ValidationError as exc:
        problems += _flag_problems(exc, given, cpus_from, "flags")
    try:
        load_spec = LoadSpec.model_validate({"kind": load, "args": list(load_args)})
    except ValidationError as exc:
        problems += _flag_problems(exc, given, cpus_from, "--load-arg")
    if problems or settings is None or load_spec is None:
        raise InputError("tune measure: " + ("\n  ".join(["bad flags:", *problems]) if len(problems) > 1
                                             else problems[0]))
    return settings, load_spec


def cyclictest_argv(settings: CyclictestSettings) -> list[str]:
    cpus = ",".join(str(c) for c in settings.cpus)
    argv = ["cyclictest", "-q", f"-p{settings.priority}", f"-i{settings.interval_us}",
            f"-t{len(settings.cpus)}", f"-a{cpus}", f"-D{int(round(settings.duration_s))}s",
            f"-h{settings.histogram_us}", f"--policy={settings.policy}"]
    if settings.mlockall:
        argv.insert(1, "-m")
    return argv


def load_argv(load: LoadSpec, duration_s: float) -> list[str] | None:
    if load.kind == "none":
        return None
    args = load.args or DEFAULT_LOAD_ARGS[load.kind]
    if load.kind == "stress-ng":
        return ["stress-ng", *args, "--timeout", f"{int(duration_s) + 30}s", "--quiet"]
    return ["hackbench", *args]


def _unit_name(what: str) -> str:
    return f"rt-tune-{what}-{secrets.token_hex(4)}"


def _transient(unit: str, max_s: float, argv: list[str], *, wait: bool) -> list[str]:
    base = ["systemd-run", f"--unit={unit}", "--collect", "--quiet", f"--property=RuntimeMaxSec={int(max_s)}",
            "--property=LimitMEMLOCK=infinity"]
    if wait:
        base += ["--wait", "--pipe"]
    return [*base, "--", *argv]


def _stop(transport: Transport, unit: str) -> None:
    try:
        transport.run(["systemctl", "stop", f"{unit}.service"], timeout_s=30, check=False)
    except TransportError:
        pass  # RuntimeMaxSec stops it anyway


TOOL_PACKAGES = {"cyclictest": "rt-tests", "hackbench": "rt-tests", "stress-ng": "stress-ng",
                 "systemd-run": "systemd"}

# One round trip per run (a nested guest reached through its host pays seconds per command): check the tools,
# read the boot and the cmdline the run belongs to, start the load, let it settle, snapshot the counters
# (measure/counters.py), run cyclictest, snapshot them again, stop the load.
# Arguments: the counters' section marker, the number of tools, of load words, the settle time, the load's unit,
# the number of thread ids, then the tools, the thread ids (digits only, checked), the load's command and
# cyclictest's. The words are only ever expanded as "${N}" (eval sees the references, never a value), so no
# argument is parsed by the remote shell. The load unit is stopped on every exit of the script. Output: the tool
# check, `@@`, the boot_id, `@@`, the cmdline, `@@`, then `\n<marker> NAME\n` sections: the snapshot before
# (uptime0, boot_id0, interrupts0, softirqs0, stat0, kvm0, threads0), `run` (cyclictest's output, exactly), the
# snapshot after (NAME1), `end`. Without a command the script only takes snapshot 0 (`read_counters`).
_RUN = MEASURE_RUN


def measure_tools(load: LoadSpec) -> list[str]:
    return ["cyclictest", "systemd-run"] + ([LOAD_TOOLS[load.kind]] if load.kind != "none" else [])


@dataclass(frozen=True)
class RunOutput:
    """What one round trip of a run returned: the boot and cmdline before it started, the command's result."""

    boot_id: str
    cmdline: str
    result: CommandResult
    #: the counters right before and right after the command (None: the output did not hold them)
    counters_before: CounterSnapshot | None = None
    counters_after: CounterSnapshot | None = None
    #: the counters' sections as the unit printed them (kept beside cyclictest's output)
    counters_raw: str = ""

    def counter_deltas(self) -> CounterDeltas | None:
        if self.counters_before is None or self.counters_after is None:
            return None
        return counter_deltas(self.counters_before, self.counters_after)


def run_under_load(transport: Transport, tools: Sequence[str], load_cmd: Sequence[str] | None, load_unit: str,
                   settle_s: float, command: Sequence[str], *, timeout_s: float, tids: Sequence[int] = ()
                   ) -> RunOutput:
    """Run `command` on the target under `load_cmd` (started as it is, e.g. a `systemd-run` of unit `load_unit`,
    stopped afterwards), in one round trip, with the counters read right before and right after it (`tids`:
    threads whose scheduling counters to read as well). TuneError naming the Debian packages when a tool is
    missing (nothing is started then), or when the load does not start."""
    if not command:
        raise ValueError("run_under_load needs a command (without one the script only reads the counters)")
    for t in tids:
        if type(t) is not int or t < 1:
            raise ValueError(f"a thread id is a positive integer, not {t!r}")
    load_words = list(load_cmd or [])
    mark = marker()
    argv = ["sh", "-c", _RUN, "-", mark, str(len(tools)), str(len(load_words)), f"{settle_s:g}", load_unit,
            str(len(tids)), "-", *tools, *map(str, tids), *load_words, *command]
    res = transport.run(argv, timeout_s=timeout_s, check=False)
    parts = res.stdout.split("@@\n", 3)
    missing = [w for line in parts[0].splitlines() if line.startswith("missing ") for w in line.split()[1:]]
    if missing:
        raise TuneError(f"{transport.label}: missing {', '.join(missing)} (Debian packages: "
                        f"{', '.join(sorted({TOOL_PACKAGES.get(m, '?') for m in missing}))})")
    if len(parts) != 4:
        raise TuneError(f"{transport.label}: unexpected output from the measurement run (exit "
                        f"{res.exit_status}): {(res.stdout + res.stderr)[-300:]!r}")
    if parts[3].startswith("load-failed "):
        raise TuneError(f"{transport.label}: the load did not start ({' '.join(load_words)}; exit "
                        f"{parts[3].split()[1]}): {res.stderr[-500:]}")
    head, sections = split_counter_sections(parts[3], mark)
    if head or "run" not in sections:
        raise TuneError(f"{transport.label}: unexpected output from the measurement run (exit "
                        f"{res.exit_status}): {(res.stdout + res.stderr)[-300:]!r}")
    before_raw, _, after_raw = parts[3].partition(f"\n{mark} run\n")
    after_raw = after_raw[after_raw.find(f"\n{mark} ") if f"\n{mark} " in after_raw else len(after_raw):]
    complete = "end" in sections  # the snapshot after the command is whole only up to the end marker
    return RunOutput(BOOT_ID.parse(parts[1]), CMDLINE.parse(parts[2]),
                     CommandResult(argv=res.argv, exit_status=res.exit_status, stdout=sections["run"],
                                   stderr=res.stderr, duration_s=res.duration_s),
                     counters_before=parse_snapshot(sections, "0") if "uptime0" in sections else None,
                     counters_after=parse_snapshot(sections, "1") if complete and "uptime1" in sections else None,
                     counters_raw=before_raw + after_raw)


def measure(transport: Transport, settings: CyclictestSettings, load: LoadSpec, *, target: str,
            artifacts: Path, events: EventSink = discard, tids: Sequence[int] = ()) -> LatencyResult:
    """One cyclictest run under `load`, in one round trip; raw output kept in `artifacts`; the load is always
    stopped afterwards (by the run itself, by `systemctl stop` after an interruption, else by RuntimeMaxSec).
    The target's counters are read right before and right after cyclictest in the same round trip
    (measure/counters.py; `tids`: threads whose scheduling counters to read too): `result.counters` holds their
    deltas, the raw snapshots are kept beside cyclictest's output (`result.counters_artifact`)."""
    artifacts.mkdir(parents=True, exist_ok=True)
    load_cmd = load_argv(load, settings.duration_s)
    load_unit = _unit_name("load")
    ct_unit = _unit_name("cyclictest")
    started = time.time()
    outcome: dict[str, object] = {}

    def run_cyclictest() -> None:
        try:
            outcome["result"] = run_under_load(
                transport, measure_tools(load),
                _transient(load_unit, settings.duration_s + 60, load_cmd, wait=False) if load_cmd else None,
                load_unit, load.settle_s,
                _transient(ct_unit, settings.duration_s + 60, cyclictest_argv(settings), wait=True),
                timeout_s=settings.duration_s + load.settle_s + 120, tids=tids)
        except BaseException as exc:  # re-raised in the caller's thread
            outcome["error"] = exc

    if load_cmd:
        events(Event("measure.load", target, f"load: {' '.join(load_cmd)} (settles {load.settle_s:g} s, "
                                             "stopped after the run)"))
    try:
        worker = threading.Thread(target=run_cyclictest, daemon=True)
        worker.start()
        while worker.is_alive():
            elapsed = time.time() - started
            events(Event("measure.progress", target, "cyclictest running",
                         done=min(elapsed, settings.duration_s), total=settings.duration_s))
            worker.join(timeout=1.0)
    finally:
        events(Event("measure.progress", target, "cyclictest finished", done=settings.duration_s,
                     total=settings.duration_s))
        if "result" not in outcome and "error" not in outcome:  # interrupted: leave nothing running
            _stop(transport, ct_unit)
            if load_cmd:
                _stop(transport, load_unit)
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    run: RunOutput = outcome["result"]  # type: ignore[assignment]
    res, boot_id, cmdline = run.result, run.boot_id, run.cmdline
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(started))
    raw_path = artifacts / f"{target}-{stamp}-cyclictest.txt"
    raw_path.write_text(res.stdout)
    counters_path = None
    if run.counters_raw:
        counters_path = artifacts / f"{target}-{stamp}-counters.txt"
        counters_path.write_text(run.counters_raw)
    if res.exit_status != 0:
        raise TuneError(f"{transport.label}: cyclictest failed (exit {res.exit_status}): "
                        f"{(res.stderr or res.stdout)[-500:]}")
    result = parse_cyclictest(res.stdout, expected_threads=len(settings.cpus))
    result = result.model_copy(update={
        "target": target, "settings": settings, "load": load, "started_at": started,
        "duration_s": round(time.time() - started, 2), "boot_id": boot_id, "cmdline": cmdline,
        "raw_artifact": str(raw_path), "counters": run.counter_deltas(),
        "counters_artifact": str(counters_path) if counters_path else None,
    })
    raw_path.with_suffix(".json").write_text(result.model_dump_json(indent=2))
    events(Event("measure.done", target, f"p99.9 {result.all.p999_us} us, max {result.all.max_us} us",
                 data=result.public()["all"]))
    return result
