"""Trial boots: boot a staged entry once, then look at what came back.

The caller stages the trial with a Bootloader backend (armed for one boot only), then `TrialBoot.run`:
reboot -> wait for a new boot_id -> when the unit does not come back in time, run the unit's `power_cycle`
command (a PDU/BMC call; in the lab a QMP reset) and wait again -> health check. The result says which world
the unit is in, from what it reports about itself, never from what we hoped:

  healthy    booted the trial (kernel + every added argument, exactly once) and passes every check
  unhealthy  booted the trial but a check failed (sysfs disagrees, a required service is down)
  fallback   came back on the old cmdline/kernel: the bootloader fell back by itself ("rolled back by fallback")
  lost       no new boot within the timeouts, power cycle included
"""

from __future__ import annotations

import contextlib
import os
import selectors
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel

from orchestrator.boot import cmdline
from orchestrator.boot.loader import Bootloader, BootTarget
from orchestrator.core.cpulist import parse_kernel_cpulist as parse_cpu_list
from orchestrator.core.errors import TuneError
from orchestrator.core.events import Event, EventSink, discard
from orchestrator.facts.base import BOOT_ID, CMDLINE, KERNEL_RELEASE
from orchestrator.facts.cpus import ISOLATED_CPUS, NOHZ_FULL_CPUS
from orchestrator.remote.transport import Transport, printable

Connect = Callable[[], Transport]
TrialResult = Literal["healthy", "unhealthy", "fallback", "lost"]
ISOLCPUS_FLAGS = ("nohz", "domain", "managed_irq")


class UnitLostError(TuneError):
    """The unit did not come back from a trial boot, power cycle included: a human must look at it."""


class Health(BaseModel):
    boot_id: str
    kernel: str
    cmdline: str
    on_trial: bool
    on_old: bool
    problems: list[str] = []


class TrialOutcome(BaseModel):
    result: TrialResult
    seconds: float
    power_cycled: bool = False
    health: Health | None = None
    reason: str = ""


#: How much of a power_cycle command's output is kept for the reason (its tail); the rest is read and dropped,
#: so a command that prints without end cannot fill the controller's memory.
POWER_CYCLE_KEEP_BYTES = 4096
#: After the command exits, how long to keep reading output a child it left behind may still hold open.
POWER_CYCLE_EOF_GRACE_S = 1.0


def run_power_cycle(argv: Sequence[str], timeout_s: float) -> str | None:
    """Run a power_cycle command on this machine: None when it ran and exited 0, else why not (program not
    found, timed out, exit status and the tail of its output). Never raises on a command that cannot run: the
    unit did not come back either way, and the caller's lost-unit handling must still run.

    The verdict is the command's own exit, not the end of its output: a daemon it started (a console logger,
    an ssh ControlMaster) may keep its stdout open for ever. Only the last POWER_CYCLE_KEEP_BYTES of the output
    are kept; stdin is /dev/null and there is no terminal, so a command that asks for a password fails at
    once."""
    args = list(argv)
    if not args:
        return "the command is empty (power_cycle: []): the inventory must give a program and its arguments"
    try:
        # Its own process group (and session: no controlling terminal): a timeout kills what it started too.
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
    except FileNotFoundError:
        return f"program not found: {args[0]}"
    except PermissionError:
        return f"permission denied running {args[0]}"
    except (OSError, ValueError, TypeError) as exc:  # not executable, a NUL byte, an argument not a string
        return f"cannot run {args[0]!r}: {exc}"
    try:
        timed_out, out, err = _wait_keeping_tails(proc, timeout_s)
    except BaseException:
        _kill_group(proc)
        proc.wait()
        raise
    if timed_out:
        return f"timed out after {timeout_s:g} s (killed)"
    if proc.returncode == 0:
        return None
    status = f"exit status {proc.returncode}" if proc.returncode > 0 else f"killed by signal {-proc.returncode}"
    tail = printable((err.strip() or out.strip()).decode("utf-8", "replace")[-300:])
    return f"{status}: {tail}" if tail else f"{status} (no output)"


def _wait_keeping_tails(proc: subprocess.Popen, timeout_s: float) -> tuple[bool, bytes, bytes]:
    """Wait for `proc` (killing its group past `timeout_s`) while draining its stdout and stderr, keeping the
    tail of each; stop reading POWER_CYCLE_EOF_GRACE_S after it exited.
    (timed out, stdout tail, stderr tail)"""
    assert proc.stdout is not None and proc.stderr is not None
    out, err = bytearray(), bytearray()
    tails = {proc.stdout.fileno(): out, proc.stderr.fileno(): err}
    deadline = time.monotonic() + timeout_s
    exited_at: float | None = None
    timed_out = False
    with selectors.DefaultSelector() as selector:
        for pipe in (proc.stdout, proc.stderr):
            selector.register(pipe, selectors.EVENT_READ)
        while True:
            now = time.monotonic()
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if exited_at is None and now >= deadline:
                timed_out = True
                _kill_group(proc)
                proc.wait()
                exited_at = now
            if exited_at is not None and (not selector.get_map() or now - exited_at >= POWER_CYCLE_EOF_GRACE_S):
                break
            if not selector.get_map():  # both pipes closed, the command still running
                try:
                    proc.wait(timeout=max(0.0, deadline - now))
                except subprocess.TimeoutExpired:
                    pass
                continue
            limit = deadline if exited_at is None else exited_at + POWER_CYCLE_EOF_GRACE_S
            for key, _ in selector.select(min(0.5, max(0.0, limit - now))):
                chunk = os.read(key.fd, 65536)
                if not chunk:
                    selector.unregister(key.fileobj)
                    continue
                tail = tails[key.fd]
                tail += chunk
                del tail[:-POWER_CYCLE_KEEP_BYTES]
    for pipe in (proc.stdout, proc.stderr):
        pipe.close()
    return timed_out, bytes(out), bytes(err)


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def cpus_of(key: str, value: str | None) -> list[int] | None:
    """The CPU set a cmdline argument should put in sysfs (isolcpus: only with the `domain` flag or none)."""
    if value is None:
        return None
    if key == "isolcpus":
        parts = value.split(",")
        flags = []
        while parts and parts[0] in ISOLCPUS_FLAGS:
            flags.append(parts.pop(0))
        if flags and "domain" not in flags:
            return None  # isolcpus=nohz,... alone does not show in /sys/.../isolated
        return parse_cpu_list(",".join(parts))
    if key == "nohz_full":
        return parse_cpu_list(value)
    return None


def same_cmdline(a: str, b: str) -> bool:
    """Equal as argument lists, ignoring BOOT_IMAGE (GRUB adds it; it names the kernel, compared separately)."""
    def norm(s: str) -> list[str]:
        return [tok for tok in cmdline.split(s) if not tok.startswith("BOOT_IMAGE=")]
    return norm(a) == norm(b)


def health_check(t: Transport, target: BootTarget, old_cmdline: str, old_kernel: str,
                 services: tuple[str, ...] = ()) -> Health:
    """What the unit booted, and whether it is the trial, the old setup, and healthy."""
    proc = CMDLINE.gather(t)
    kernel = KERNEL_RELEASE.gather(t)
    problems = [f"/proc/cmdline: {p}" for p in cmdline.holds(proc, target.add)]
    if target.kernel and kernel != target.kernel:
        problems.append(f"uname -r is {kernel}, expected {target.kernel}")
    on_trial = not problems
    on_old = same_cmdline(proc, old_cmdline) and kernel == old_kernel
    if on_trial:
        for key, fact in (("isolcpus", ISOLATED_CPUS), ("nohz_full", NOHZ_FULL_CPUS)):
            want = cpus_of(key, target.add.get(key)) if key in target.add else None
            if want is not None:
                got = fact.gather(t)
                if sorted(got) != sorted(want):
                    problems.append(f"sysfs disagrees with {key}={target.add[key]}: the kernel reports {got}")
        state = t.run(["systemctl", "is-system-running", "--wait"], timeout_s=180, check=False).stdout.strip()
        if state not in ("running", "degraded"):
            problems.append(f"systemd reports the system {state or 'unknown'}")
        for svc in services:
            active = t.run(["systemctl", "is-active", svc], timeout_s=30, check=False).stdout.strip()
            if active != "active":
                problems.append(f"{svc} is {active or 'unknown'}, not active")
    return Health(boot_id=BOOT_ID.gather(t), kernel=kernel, cmdline=proc, on_trial=on_trial, on_old=on_old,
                  problems=problems)


@dataclass(frozen=True)
class Dependent:
    """A system that runs on the rebooted one and must answer again after it boots: a guest whose QEMU runs on
    this host (on a robot, and in the arm64 lab, the guest reboots with its host). `power_cycle` is the guest's
    own (the inventory's guest_power_cycle): run once when it does not answer in time, as for the host."""

    name: str
    connect: Connect
    power_cycle: Sequence[str] | None = None


@dataclass
class TrialBoot:
    """Reboot a unit (host, or a guest) into its armed trial entry and classify what comes back."""

    loader: Bootloader
    control: Connect  # where the bootloader lives (the target itself, or the host for a QEMU -append guest)
    observe: Connect  # the booted system itself
    subject: str
    power_cycle: list[str] | None = None
    #: How long the power_cycle command may run before it is killed (and counts as failed).
    power_cycle_timeout_s: float = 300.0
    boot_timeout_s: float = 300.0
    poll_s: float = 3.0
    services: tuple[str, ...] = ()
    dependents: tuple[Dependent, ...] = ()
    events: EventSink = discard
    sleep: Callable[[float], None] = field(default=time.sleep)

    def _emit(self, kind: str, message: str, **data) -> None:
        self.events(Event(kind, self.subject, message, data=data))

    def _poll_boot_id(self, connect: Connect, deadline: float, old: str | None) -> tuple[str | None, str]:
        """The first boot_id other than `old` that `connect` answers before `deadline`; else (None, last error)."""
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                with connect() as t:
                    bid = BOOT_ID.gather(t, timeout_s=20)
                if bid != old:
                    return bid, ""
            except (TuneError, OSError, EOFError) as exc:
                last = str(exc)
            self.sleep(self.poll_s)
        return None, last

    def boot_id(self, timeout_s: float, old: str | None) -> str | None:
        """The first boot_id different from `old` seen within `timeout_s` (None: none)."""
        return self._poll_boot_id(self.observe, time.monotonic() + timeout_s, old)[0]

    def dependents_back(self) -> list[str]:
        """Wait (up to boot_timeout_s in all) until every dependent answers; one that does not is power-cycled
        once (its own command) and waited for another boot_timeout_s. The problems of those that never do.

        A nested guest can hang in its boot while its host is fine (CI, 2026-12-05: the arm64 lab's guest did
        not answer for 900 s after a host reboot that had taken 3 minutes alone); its QEMU restarted, it boots."""
        deadline = time.monotonic() + self.boot_timeout_s
        problems = []
        for dep in self.dependents:
            bid, last = self._poll_boot_id(dep.connect, deadline, None)
            if bid is not None:
                continue
            waited = f"did not answer within {self.boot_timeout_s:.0f} s ({last})"
            if dep.power_cycle is None:
                problems.append(f"{dep.name} {waited}")
                continue
            failure = self._power_cycle(f"{dep.name} {waited}", dep.power_cycle, kind="trial.dependent_power_cycle",
                                        dependent=dep.name)
            if failure is not None:
                problems.append(f"{dep.name} {waited}; its power cycle failed: {failure}")
                continue
            bid, last = self._poll_boot_id(dep.connect, time.monotonic() + self.boot_timeout_s, None)
            if bid is None:
                problems.append(f"{dep.name} {waited}, nor within {self.boot_timeout_s:.0f} s after its power "
                                f"cycle ({last})")
        if self.dependents and not problems:
            self._emit("trial.dependents", "answering again: " + ", ".join(d.name for d in self.dependents))
        return problems

    def _power_cycle(self, why: str, argv: Sequence[str] | None = None, kind: str = "trial.power_cycle",
                     **data) -> str | None:
        """Run a power_cycle command once (the unit's, unless `argv`: a dependent's); None when it ran, else why
        it failed (also recorded as a `trial.power_cycle_failed` event, which the journal receives)."""
        self._emit(kind, f"{why}: running " + ("its" if argv is not None else "the inventory's")
                   + " power_cycle command", **data)
        argv = (self.power_cycle or []) if argv is None else argv
        failure = run_power_cycle(argv, self.power_cycle_timeout_s)
        if failure is not None:
            shown = shlex.join(str(a) for a in argv) if argv else "[]"
            self._emit("trial.power_cycle_failed", f"power_cycle `{shown}` failed: {failure}",
                       reason=failure, argv=[str(a) for a in argv])
        return failure

    def reachable(self) -> str:
        """Wait until the unit answers (a controller may have died while it rebooted); power-cycle it once when
        it does not. Returns its boot_id; raises UnitLostError."""
        bid = self.boot_id(self.boot_timeout_s, None)
        failure = None
        if bid is None and self.power_cycle is not None:
            # still waited for after a failed power cycle: the unit may come back by itself (its watchdog)
            failure = self._power_cycle("unreachable")
            bid = self.boot_id(self.boot_timeout_s, None)
        if bid is None:
            raise UnitLostError(f"{self.subject}: unreachable for {2 * self.boot_timeout_s:.0f} s"
                                + (f"; the power cycle failed: {failure}" if failure else ""))
        return bid

    def reboot_and_wait(self, old_boot_id: str) -> tuple[str | None, bool, float, str | None]:
        """Reboot through the loader (control side), wait, power-cycle once if needed.
        (boot_id, power-cycled, seconds, why the power cycle failed)"""
        start = time.monotonic()
        with self.control() as c:
            self.loader.reboot(c)
        self._emit("trial.reboot", "rebooting", timeout_s=self.boot_timeout_s)
        new = self.boot_id(self.boot_timeout_s, old_boot_id)
        failure = None
        cycled = False
        if new is None and self.power_cycle is not None:
            failure = self._power_cycle(f"no new boot after {self.boot_timeout_s:.0f} s")
            cycled = failure is None
            # still waited for after a failed power cycle: the unit may come back by itself (its watchdog)
            new = self.boot_id(self.boot_timeout_s, old_boot_id)
        return new, cycled, time.monotonic() - start, failure

    def run(self, target: BootTarget, old_cmdline: str, old_kernel: str, old_boot_id: str) -> TrialOutcome:
        new, cycled, secs, failure = self.reboot_and_wait(old_boot_id)
        if new is None:
            if failure is not None:
                reason = f"the unit did not come back within {secs:.0f} s; the power cycle failed: {failure}"
            elif cycled:
                reason = f"the unit did not come back within {secs:.0f} s (power cycle included)"
            else:
                reason = f"the unit did not come back within {secs:.0f} s and has no power_cycle"
            self._emit("trial.lost", f"no new boot within {secs:.0f} s", reason=reason)
            return TrialOutcome(result="lost", seconds=secs, power_cycled=cycled, reason=reason)
        with self.observe() as t:
            health = health_check(t, target, old_cmdline, old_kernel, self.services)
        if health.on_trial and not health.problems:
            health.problems.extend(self.dependents_back())
        if health.on_trial and not health.problems:
            result: TrialResult = "healthy"
            reason = f"booted the trial in {secs:.0f} s"
        elif health.on_trial:
            result, reason = "unhealthy", "booted the trial, but: " + "; ".join(health.problems)
        elif health.on_old:
            result = "fallback"
            reason = ("came back on the old cmdline" + (" after a power cycle" if cycled else "")
                      + f" ({'; '.join(health.problems)})")
        else:
            result, reason = "unhealthy", "came back on neither the trial nor the old cmdline: " + \
                "; ".join(health.problems)
        self._emit(f"trial.{result}", reason, seconds=round(secs, 1), power_cycled=cycled)
        return TrialOutcome(result=result, seconds=secs, power_cycled=cycled, health=health, reason=reason)

    def back_to_default(self, old_cmdline: str, old_kernel: str) -> Health:
        """Reboot into the (untouched) default and check it is the old setup; raises when it is not."""
        with self.observe() as t:
            bid = BOOT_ID.gather(t)
        new, _, secs, failure = self.reboot_and_wait(bid)
        if new is None:
            raise TuneError(f"{self.subject}: did not come back within {secs:.0f} s after a reboot into the "
                            "default entry" + (f"; the power cycle failed: {failure}" if failure else ""))
        with self.observe() as t:
            health = health_check(t, BootTarget(), old_cmdline, old_kernel, ())
        if not health.on_old:
            raise TuneError(f"{self.subject}: after the reboot into the default the unit runs "
                            f"{health.kernel} with {health.cmdline!r}, not the journaled {old_kernel} "
                            f"{old_cmdline!r}")
        problems = self.dependents_back()
        if problems:
            raise TuneError(f"{self.subject}: back on the default, but " + "; ".join(problems))
        return health
