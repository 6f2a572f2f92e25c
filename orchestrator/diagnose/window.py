"""`tune diagnose`: the field notes' investigation of one unit, automated, each finding mapped to a change.

For each target (host, guest or both, at the same time) one window (orchestrator/diagnose/probe.py) brackets a trace
with two samples. From them:
1. IPI rates per CPU and type (/proc/interrupts deltas), the RT CPUs marked;
2. who sends them and what runs (ipi/csd tracepoints, or the function tracer on older kernels);
3. crash-looping services (restart counters rising, core dumps);
4. the tick on each nohz_full CPU (timer_list, sched/debug, tick_stop), timer_migration, timers firing there;
5. WFI/WFE exit rates per VM on arm64 hosts (KVM debugfs);
6. findings: evidence, and the profile change that addresses it, or why no tuning does.

The target is left as found: everything traced lives in a private tracefs instance, removed at the end; the
tracing state is compared before and after; on error, timeout or Ctrl-C the controller kills the window and
removes the instance (`_cleanup`), then checks again.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from datetime import datetime

from orchestrator.core import duration
from orchestrator.core.cpulist import parse_kernel_cpulist as parse_cpu_list
from orchestrator.core.errors import ExitStatus, InputError, ParseError, TuneError
from orchestrator.core.events import Event, EventSink, discard
from orchestrator.diagnose.analysis import analyse, state_differences
from orchestrator.diagnose.model import Diagnosis
from orchestrator.diagnose.probe import (
    PIDFILE_DIR,
    cleanup_argv,
    new_instance_name,
    parse_tracing_state,
    split_sections,
    state_argv,
    window_argv,
)
from orchestrator.remote.transport import Transport

MIN_DURATION_S = 2.0
MAX_DURATION_S = 3600.0
WINDOW_OVERHEAD_S = 240.0  # sampling, core dump query and trace read on a slow nested guest, beyond the window
#: The tracing state probe reads ~1700 event directories: 3-5 s on the arm64 lab's host, 4-8 s in its nested guest
#: idle (2026-12-05); in CI, beside the other lane and with busy loops in the guest, the probe's older form (26 s
#: idle there) ran past 60 s.
STATE_TIMEOUT_S = 180.0


class DiagnosisCancelled(TuneError):
    """The diagnosis was stopped (Ctrl-C, or another target's error) before this target's window started."""


class TracingStateChanged(TuneError):
    """The target's tracing state after the diagnosis differs from before: named item by item."""

    exit_code = ExitStatus.TRACING_CHANGED


def parse_duration(text: str) -> float:
    """`30s`, `2m`, `90` (seconds), `1.5m` -> seconds, within MIN_DURATION_S..MAX_DURATION_S."""
    return duration.parse_duration(text, what="--duration", minimum_s=MIN_DURATION_S, maximum_s=MAX_DURATION_S)


class Window:
    """One target's window: the tracing state before, the window script, the state after; `abort` from
    another thread (Ctrl-C) kills the script and removes its instance on the target."""

    def __init__(self, t: Transport, subject: str, duration_s: float, events: EventSink) -> None:
        self.t, self.subject, self.duration_s, self.events = t, subject, duration_s, events
        self.instance = new_instance_name()
        self.pidfile = f"{PIDFILE_DIR}/{self.instance}.pid"
        self.marker = "@@rt-tune-diag-" + secrets.token_hex(8)
        self.before: dict[str, str] | None = None
        self._cancelled = threading.Event()

    def state(self) -> dict[str, str]:
        return parse_tracing_state(self.t.run(state_argv(), sudo=True, timeout_s=STATE_TIMEOUT_S).stdout)

    def run(self) -> dict[str, str]:
        self.before = self.state()
        if self._cancelled.is_set():  # aborted while the state was read: never start the window
            raise DiagnosisCancelled(f"{self.t.label}: cancelled before the window started")
        out = self.t.run(window_argv(self.marker, self.duration_s, self.instance, self.pidfile), sudo=True,
                         timeout_s=self.duration_s + WINDOW_OVERHEAD_S).stdout
        return split_sections(out, self.marker)

    def abort(self) -> None:
        """Stop this window: if it has not started, it never will (`run` checks); if it may have, kill the script
        and remove the instance, twice a second apart (a script started just now may not have written its pid
        file yet). Idempotent; runs on a fresh channel of the same SSH session."""
        if self._cancelled.is_set():
            return
        self._cancelled.set()
        if self.before is None:
            return
        for pause in (1.0, 0.0):
            self.t.run(cleanup_argv(self.instance, self.pidfile), sudo=True, timeout_s=60, check=False)
            time.sleep(pause)
        self.events(Event("diagnose.window.aborted", self.subject, "window stopped, tracing instance removed",
                          data={"instance": self.instance}))


def diagnose(unit: str, transports: dict[str, Transport], *, duration_s: float,
             rt_hints: dict[str, list[int]] | None = None, events: EventSink = discard,
             now: Callable[[], datetime] | None = None) -> Diagnosis:
    """Diagnose the unit's targets (`transports`: "host"/"guest" -> an open transport) over the same window.

    On any error, a timeout or KeyboardInterrupt every window is aborted (script killed, instance removed) before
    the exception propagates; afterwards each target's tracing state must equal the state before."""
    clock = now or (lambda: datetime.now().astimezone())
    started = clock()
    windows = {name: Window(t, f"{unit}.{name}", duration_s, events) for name, t in transports.items()}
    for name, w in windows.items():  # recorded (journal) before the target is touched
        events(Event("diagnose.window.started", f"{unit}.{name}", f"{w.t.label}: tracing instance {w.instance}",
                     data={"instance": w.instance, "pidfile": w.pidfile, "duration_s": duration_s}))
    pool = ThreadPoolExecutor(max_workers=len(windows), thread_name_prefix="diagnose")
    futures = {name: pool.submit(w.run) for name, w in windows.items()}
    try:
        t0 = time.monotonic()
        while True:  # the main thread waits, so Ctrl-C reaches it; it shows the window's progress meanwhile
            done, pending = wait(list(futures.values()), timeout=1.0, return_when=FIRST_EXCEPTION)
            if any(f.exception() for f in done) or not pending:
                break
            events(Event("diagnose.window", unit, f"tracing {', '.join(windows)} for {duration_s:g} s",
                         done=min(time.monotonic() - t0, duration_s), total=duration_s))
        events(Event("diagnose.window", unit, "window done, reading the results", done=duration_s,
                     total=duration_s))
        sections = {name: f.result() for name, f in futures.items()}
    except BaseException:
        for w in windows.values():
            try:
                w.abort()
            except Exception:  # the first error is the one to report; the state check below names the rest
                pass
        pool.shutdown(wait=False, cancel_futures=True)
        for w in windows.values():
            if w.before is not None:
                _check_state(w, w.before, w.state())
        raise
    pool.shutdown()
    targets = []
    for name, w in windows.items():
        after = w.state()
        assert w.before is not None
        _check_state(w, w.before, after)
        events(Event("diagnose.window.done", w.subject, "tracing instance removed, tracing state as before",
                     data={"instance": w.instance}))
        targets.append(analyse(sections[name], target=name, label=w.t.label, rt_hint=(rt_hints or {}).get(name, []),
                               state_before=w.before, state_after=after, now=clock()))
        events(Event("diagnose.target.done", w.subject, f"{len(targets[-1].findings)} finding(s)",
                     data={"findings": [f.kind for f in targets[-1].findings]}))
    return Diagnosis(unit=unit, started=started, duration_s=duration_s, targets=targets)


def _check_state(w: Window, before: dict[str, str], after: dict[str, str]) -> None:
    diffs = state_differences(before, after)
    leftovers = [i for i in after.get("instances", "").split() if i == w.instance]
    if diffs or leftovers:
        raise TracingStateChanged(f"{w.t.label}: the tracing state after the diagnosis differs from before: "
                                  + "; ".join(diffs + [f"instance {i} still present" for i in leftovers]))


def rt_hints_from_vars(vars: dict) -> dict[str, list[int]]:
    """The inventory's `rt_cpus` (host) and `guest_rt_cpus` (guest) vars, when they are CPU lists."""
    out = {}
    for target, key in (("host", "rt_cpus"), ("guest", "guest_rt_cpus")):
        value = vars.get(key)
        if value is None:
            continue
        try:
            out[target] = parse_cpu_list(str(value))
        except ParseError as exc:
            raise InputError(f"inventory var {key}: expected a CPU list like 1-3, got {value!r} ({exc})") from None
    return out
