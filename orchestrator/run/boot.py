"""Boot changes in the apply loop: kernel cmdline, kernel artifacts and the WFI/WFE no-trap change.

Same contract as a runtime change (journal the intent with the exact previous boot configuration, apply,
verify, measure before/after, keep or roll back), with a trial boot in place of "apply":

  facts -> plan (no-op when the default entry already has every argument) -> preflight (refused unless the
  user accepts the risk) -> journal -> `before` runs on the current boot -> stage + arm the trial entry ->
  TrialBoot -> healthy? `after` runs : rolled back by fallback -> decide -> commit (the default entry gets the
  arguments; no extra reboot) or restore the journaled files byte for byte and boot the old default.

Measurement order is forced to `blocked` (every side switch costs a reboot). A failed trial needs no extra
reboot to undo: the one-shot entry is gone and the unit already runs the old default.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Self

from orchestrator.boot import cmdline
from orchestrator.boot.loader import Bootloader, BootTarget, cancel_reboot
from orchestrator.boot.trial import Dependent, Health, TrialBoot, UnitLostError
from orchestrator.config.profile import ChangeSpec
from orchestrator.core.errors import InputError, TransportError, TuneError
from orchestrator.core.events import Event
from orchestrator.facts.base import ARCH, BOOT_ID, CMDLINE, KERNEL_RELEASE
from orchestrator.facts.bootloader import BOOTLOADER
from orchestrator.remote.transport import Transport
from orchestrator.run.context import ChangeOutcome, SharedConnections
from orchestrator.run.transaction import ChangeUndone, Planned, UnitLost, run_change

if TYPE_CHECKING:
    from orchestrator.run.context import RunContext



def loader_for(kind: str, vars: dict[str, Any], target: str) -> Bootloader:
    from orchestrator.boot.registry import backend_for

    if kind == "qemu-append":
        return backend_for(kind, service=str(vars["qemu_service"]))
    if kind == "libvirt":
        return backend_for(kind, domain=str(vars.get("libvirt_domain", "")))
    return backend_for(kind)


@dataclass
class BootPlan:
    """Everything decided before the unit is touched."""

    target: BootTarget
    loader: Bootloader
    control_target: str
    old_cmdline: str
    old_kernel: str
    old_boot_id: str
    default_args: str
    noop: bool
    summary: str
    skip_reason: str = ""
    artifact: dict | None = None  # the kernel artifact to install (kernel targets)
    wfi_rate_before: float | None = None  # wfx_notrap: the guest's idle WFI exit rate before (exits/s)
    wfi_unread_why: str = ""  # wfx_notrap: why that rate could not be read
    install_package: str | None = None  # the package rt-tune will install (None: the kernel is already there)
    evidence: dict | None = None  # what the trial showed beyond health (wfx_notrap: the WFI exit-rate verdict)


class BootChangeRunner:
    """Runs one boot ChangeSpec in a RunContext (its journal, connections, measurement plan and events)."""

    def __init__(self, context: RunContext):
        self.e = context
        self.shared = SharedConnections(lambda unit, target: self.e.connect(self.e.inventory, unit, target))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shared.drop()

    # ---- planning ----------------------------------------------------------------------------------------
    def _conn(self, unit: str, target: str):
        """The steps' connection to `target`, shared until the next reboot (see SharedConnections)."""
        return lambda: self.shared.use(unit, target)

    def _fresh(self, unit: str, target: str):
        """A new connection each time: what a trial boot uses to watch a unit go down and come back."""
        return lambda: self.e.connect(self.e.inventory, unit, target)

    def _vars(self, unit: str) -> dict[str, Any]:
        return dict(self.e.inventory.unit(unit).vars)

    def _loader_kind(self, unit: str, target: str, t: Transport) -> tuple[str, str]:
        """(bootloader kind, control target): inventory vars `bootloader` / `guest_bootloader` override facts."""
        override = self._vars(unit).get("bootloader" if target == "host" else "guest_bootloader")
        if override in ("qemu-append", "libvirt"):
            if target != "guest":
                raise InputError(f"inventory: unit {unit}: bootloader {override!r} only applies to a guest")
            return str(override), "host"
        if override:
            return str(override), target
        info = BOOTLOADER.gather(t)
        if info.kind == "unknown":
            raise TuneError(f"{unit}.{target}: no supported bootloader found (GRUB, systemd-boot, extlinux, "
                            "U-Boot env); set `bootloader:` in the unit's inventory vars")
        return info.kind, target

    def boot_target(self, spec: ChangeSpec, arch: str, kernel: str) -> tuple[BootTarget | None, dict | None, str]:
        """(what to boot, kernel artifact to install, skip reason) for this spec; None target when it does not
        apply to this unit."""
        p = spec.params
        if spec.kind == "cmdline":
            return BootTarget(add=dict(p["add"])), None, ""
        if spec.kind == "kernel":
            return BootTarget(kernel=self._release(p)), dict(p), ""
        from orchestrator.boot.wfx import choose_method

        method = choose_method(arch, kernel, p)
        if method.method == "not_applicable":
            return None, None, method.reason
        if method.method == "cmdline":
            return BootTarget(add=dict(method.add)), None, ""
        art = dict(method.artifact or {})
        return BootTarget(kernel=self._release(art)), art, ""

    @staticmethod
    def _release(artifact: dict) -> str:
        release = artifact.get("release")
        if not release:
            from orchestrator.boot.artifact import inspect_deb

            if not artifact.get("deb"):
                raise InputError("a kernel artifact given as `package` needs `release` (its `uname -r`)")
            release = inspect_deb(artifact["deb"], artifact.get("release")).release
        return str(release)

    def plan(self, unit: str, spec: ChangeSpec) -> BootPlan:
        with self._conn(unit, spec.target)() as t:
            arch, kernel = ARCH.gather(t), KERNEL_RELEASE.gather(t)
            old_cmdline, boot_id = CMDLINE.gather(t), BOOT_ID.gather(t)
            target, artifact, why = self.boot_target(spec, arch, kernel)
            kind, control = self._loader_kind(unit, spec.target, t)
        loader = loader_for(kind, self._vars(unit), spec.target)
        if target is None:
            return BootPlan(BootTarget(), loader, control, old_cmdline, kernel, boot_id, "", True, why,
                            skip_reason=why)
        with self._conn(unit, control)() as c:
            args = loader.default_args(c)
            add = cmdline.missing(args, target.add)
            cmdline.check_size(cmdline.merged(args, add), arch)
            default_kernel = getattr(loader, "default", None)
            on_kernel = target.kernel is None or (
                default_kernel is not None and default_kernel(c).release == target.kernel)
            install = None
            if target.kernel and artifact is not None:
                from orchestrator.boot.kernel import kernel_present, package_of

                install = None if kernel_present(c, target.kernel) else package_of(artifact)
        target = replace(target, add=add)
        live_ok = not cmdline.holds(old_cmdline, add) and (target.kernel is None or kernel == target.kernel)
        noop = not add and on_kernel and live_ok
        what = " ".join(cmdline.tokens(add)) or "(no new arguments)"
        summary = (f"{kind}: boot {target.kernel or kernel} with +{what}" if target.kernel
                   else f"{kind}: add {what}")
        return BootPlan(target, loader, control, old_cmdline, kernel, boot_id, args, noop, summary,
                        artifact=artifact, install_package=install)

    @staticmethod
    def wfi_rate(c: Transport, seconds: float = 5.0) -> tuple[float | None, str]:
        """The host's WFI exit rate (all VMs) over `seconds`, from KVM's debugfs counters; (None, why) when
        they cannot be read."""
        import time as _time

        from orchestrator.boot.wfx import WFX_EXITS, wfi_exit_rate

        a = WFX_EXITS.gather(c)
        if not a.available or a.wfi is None:
            return None, a.reason
        _time.sleep(seconds)
        b = WFX_EXITS.gather(c)
        if not b.available or b.wfi is None:
            return None, b.reason
        return wfi_exit_rate(a.wfi, b.wfi, b.uptime_s - a.uptime_s), ""

    def wfx_evidence(self, unit: str, spec: ChangeSpec, plan: BootPlan) -> str | None:
        """After a healthy wfx_notrap trial: None when the WFI exit rate shows no-trap in effect, else why not
        (the cmdline alone is not evidence: a kernel may accept the parameter and still trap)."""
        from orchestrator.boot.wfx import verify_notrap

        if plan.wfi_rate_before is None:
            why = ("no WFI exit rate from before the change (KVM debugfs counters unreadable"
                   + (f": {plan.wfi_unread_why}" if plan.wfi_unread_why else "") + "): cannot verify")
            plan.evidence = {"wfi_exits": {"rate_before": None, "rate_after": None, "in_effect": False,
                                           "reason": why}}
            return why
        with self._conn(unit, plan.control_target)() as c:
            after, why = self.wfi_rate(c)
        if after is None:
            plan.evidence = {"wfi_exits": {"rate_before": plan.wfi_rate_before, "rate_after": None, "reason": why}}
            return f"cannot read the WFI exit counters on the trial boot: {why}"
        verdict = verify_notrap(plan.wfi_rate_before, after)
        plan.evidence = {"wfi_exits": verdict.model_dump()}
        self.e.publish(Event("wfx.evidence", f"{unit}.{spec.target}", verdict.reason,
                           data=verdict.model_dump()))
        return None if verdict.in_effect else verdict.reason

    def preflight(self, unit: str, plan: BootPlan) -> list[str]:
        with self._conn(unit, plan.control_target)() as c:
            problems = plan.loader.preflight(c)
        spec = self.e.inventory.unit(unit)
        if not spec.power_cycle:
            with self._conn(unit, plan.control_target)() as c:
                wd = c.run(["systemctl", "show", "-p", "RuntimeWatchdogUSec", "--value"], timeout_s=30,
                           check=False).stdout.strip()
            if wd in ("", "0", "infinity"):
                problems.append("no power_cycle command in the inventory and no systemd hardware watchdog "
                                "(RuntimeWatchdogSec): a trial kernel that hangs would need a human to reset it")
        return problems

    def trial(self, unit: str, target: str, plan: BootPlan) -> TrialBoot:
        us = self.e.inventory.unit(unit)
        power = us.power_cycle if target == "host" else (us.guest_power_cycle or None)
        services: tuple[str, ...] = ()
        dependents: tuple[Dependent, ...] = ()
        qemu = us.vars.get("qemu_service")
        if target == "host" and qemu and us.guest is not None:
            services = (str(qemu),)
            # its QEMU restarts with the host
            dependents = (Dependent(f"{unit}.guest", self._fresh(unit, "guest"), us.guest_power_cycle or None),)
        return TrialBoot(loader=plan.loader, control=self._fresh(unit, plan.control_target),
                         observe=self._fresh(unit, target), subject=f"{unit}.{target}",
                         power_cycle=power, boot_timeout_s=self.e.boot_timeout_s, services=services,
                         dependents=dependents, events=self.e.publish)

    # ---- running -----------------------------------------------------------------------------------------
    def run(self, unit: str, run_id: int, spec: ChangeSpec) -> ChangeOutcome:
        """One boot change through the transaction (orchestrator.run.transaction), trial-booted."""
        return run_change(self.e, unit, run_id, spec, BootActive(self, unit, spec))

    def undo(self, unit: str, target: str, before: dict, boot: BootTarget | None, *, on_trial: bool | None) -> Health:
        """Back to the journaled boot configuration, byte for byte, and onto the old default. `on_trial=None`:
        look at the unit to find out (reconcile after a crash: the unit may be about to reboot, rebooting, or up
        on the trial; a connection lost in the middle is retried once the unit is back)."""
        loader = loader_for(before["loader"], self._vars(unit), target)
        plan = BootPlan(boot or BootTarget(), loader, before["control"], before["cmdline"], before["kernel"],
                        before["boot_id"], "", False, "")
        trial = self.trial(unit, target, plan)
        for attempt in (1, 2):
            try:
                if on_trial is None:
                    self.shared.drop()  # the unit may be rebooting
                    trial.reachable()
                return self._undo_once(unit, target, before, loader, trial, on_trial=on_trial)
            except TransportError:
                if attempt == 2 or on_trial is not None:
                    raise
                self.e.publish(Event("trial.reconnect", f"{unit}.{target}", "the unit went away during the undo "
                                   "(a scheduled reboot?): waiting for it, then undoing again"))
        raise AssertionError("unreachable")

    def _undo_once(self, unit: str, target: str, before: dict, loader: Bootloader, trial: TrialBoot, *,
                   on_trial: bool | None) -> Health:
        with self._conn(unit, before["control"])() as c:
            cancel_reboot(c)  # a reboot into the trial that a dead controller scheduled must not happen now
            loader.restore(c, before["snapshot"])
        with self._conn(unit, target)() as t:
            live_cmdline, live_kernel = CMDLINE.gather(t), KERNEL_RELEASE.gather(t)
        from orchestrator.boot.trial import same_cmdline

        needs_reboot = not (same_cmdline(live_cmdline, before["cmdline"]) and live_kernel == before["kernel"])
        if on_trial is not None:
            needs_reboot = needs_reboot or on_trial
        health = Health(boot_id="", kernel=live_kernel, cmdline=live_cmdline, on_trial=False, on_old=True)
        if needs_reboot:
            self.shared.drop()  # the unit reboots
            health = trial.back_to_default(before["cmdline"], before["kernel"])
        if before.get("installed_package"):  # only now: never purge the kernel the unit is running
            from orchestrator.boot.kernel import remove_kernel

            with self._conn(unit, before["control"])() as c:
                remove_kernel(c, before["installed_package"])
                loader.restore(c, before["snapshot"])  # the purge's update-grub rewrote grub.cfg
        return health

    def verify(self, unit: str, rec) -> dict[str, Any]:
        """A kept boot change is in place when the default entry still has its arguments/kernel and the running
        kernel booted with them."""
        before = rec.before
        loader = loader_for(before["loader"], self._vars(unit), rec.target)
        state = rec.desired["state"]
        target = BootTarget(add=state.get("add") or {}, kernel=state.get("kernel"))
        with self._conn(unit, before["control"])() as c:
            problems = loader.committed(c, target)
        with self._conn(unit, rec.target)() as t:
            live, kernel = CMDLINE.gather(t), KERNEL_RELEASE.gather(t)
        problems += [f"/proc/cmdline: {p}" for p in cmdline.holds(live, target.add)]
        if target.kernel and kernel != target.kernel:
            problems.append(f"running {kernel}, not {target.kernel}")
        return {"in_place": not problems, "live": {"problems": problems, "cmdline": live, "kernel": kernel}}


class BootActive:
    """A boot change's side of the transaction: applied by staging a trial entry, in effect (and verified) once
    the trial boots healthy, switched by rebooting, kept by committing the entry as the default, undone by
    restoring the journaled boot files byte for byte and booting the old default. Measured `blocked`: every
    side switch costs a reboot. A failed trial needs no extra reboot to undo: the one-shot entry is gone and
    the unit already runs the old default."""

    eager = False
    order = "blocked"

    def __init__(self, runner: BootChangeRunner, unit: str, spec: ChangeSpec) -> None:
        self.r, self.ctx, self.unit, self.spec = runner, runner.e, unit, spec
        self.subject = f"{unit}.{spec.target}"
        self._plan: BootPlan | None = None
        self._trial: TrialBoot | None = None
        self.before: dict = {}

    @property
    def evidence(self) -> dict | None:
        return self._plan.evidence if self._plan is not None else None

    @property
    def p(self) -> BootPlan:
        assert self._plan is not None, "plan() first"
        return self._plan

    @property
    def trial(self) -> TrialBoot:
        if self._trial is None:
            self._trial = self.r.trial(self.unit, self.spec.target, self.p)
        return self._trial

    def plan(self) -> Planned:
        r, unit, spec = self.r, self.unit, self.spec
        self._plan = plan = r.plan(unit, spec)
        out = Planned(summary=plan.summary, noop=plan.noop, skip_reason=plan.skip_reason)
        if plan.noop or plan.skip_reason:
            return out
        out.problems = r.preflight(unit, plan)
        if out.problems and not self.ctx.accept_boot_risk:
            return out
        with r._conn(unit, plan.control_target)() as c:
            snap = plan.loader.snapshot(c)
            if spec.kind == "wfx_notrap":
                plan.wfi_rate_before, why = r.wfi_rate(c)
                plan.wfi_unread_why = why
                if why:
                    self.ctx.emit("wfx.evidence", self.subject,
                                  f"WFI exit counters unreadable before the change: {why}")
        self.before = {"loader": plan.loader.kind, "control": plan.control_target, "snapshot": snap,
                       "cmdline": plan.old_cmdline, "kernel": plan.old_kernel, "boot_id": plan.old_boot_id,
                       "installed_package": plan.install_package}
        out.before = self.before
        out.state = {"add": plan.target.add, "kernel": plan.target.kernel}
        return out

    def prepare(self) -> None:
        plan = self.p
        if plan.target.kernel and plan.artifact is not None:
            from orchestrator.boot.kernel import install_kernel

            self.ctx.emit("kernel.install", self.subject, f"installing {plan.install_package or 'nothing'} "
                          f"for kernel {plan.target.kernel}")
            with self.r._conn(self.unit, plan.control_target)() as c:
                install_kernel(c, plan.artifact, plan.target.kernel, plan.loader)

    def apply(self) -> str | None:
        with self.r._conn(self.unit, self.p.control_target)() as c:
            self.p.loader.stage_trial(c, self.p.target)
        return "trial entry staged and armed for one boot"

    def verify(self) -> dict | None:
        """The trial boot: healthy (the health journaled), or ChangeUndone / UnitLost."""
        r, plan, spec = self.r, self.p, self.spec
        with r._conn(self.unit, spec.target)() as t:
            bid = BOOT_ID.gather(t)
        r.shared.drop()  # the unit reboots
        out = self.trial.run(plan.target, plan.old_cmdline, plan.old_kernel, bid)
        if out.result == "healthy" and spec.kind == "wfx_notrap":
            problem = r.wfx_evidence(self.unit, spec, plan)
            if problem is not None:
                out = out.model_copy(update={"result": "unhealthy", "reason": f"booted the trial, but: {problem}"})
        if out.result == "healthy" and spec.checks:
            problem = self.user_checks()
            if problem is not None:
                out = out.model_copy(update={"result": "unhealthy", "reason": f"booted the trial, but: {problem}"})
        if out.result == "healthy":
            return out.health.model_dump() if out.health else None
        if out.result == "lost":
            raise UnitLost(f"{self.subject}: {out.reason}; the trial was armed for one boot only, so its next "
                           "successful boot is the old default", reason=out.reason,
                           attention="the unit did not come back; it needs a human (its boot configuration "
                                     "still has the journaled default entry)")
        # fallback (old default already running) or unhealthy trial (reboot into the untouched default)
        r.undo(self.unit, spec.target, self.before, plan.target, on_trial=out.result == "unhealthy")
        raise ChangeUndone("rolled back by fallback: " + out.reason if out.result == "fallback"
                           else "rolled back: " + out.reason)

    def user_checks(self) -> str | None:
        """The profile's check files for the rebooted target, on the trial boot: None when they all pass, else
        which failed (an unhealthy trial, rolled back)."""
        from pathlib import Path

        from orchestrator.checks.promises import TargetPromise
        from orchestrator.checks.runner import run_checks

        unit_spec = self.ctx.inventory.unit(self.unit)
        report = run_checks(self.unit, self.spec.target, self.ctx.inventory.endpoint(self.unit, self.spec.target),
                            TargetPromise(target=self.spec.target), user_files=[Path(f) for f in self.spec.checks],
                            variables=dict(unit_spec.vars), shipped=False)
        self.ctx.emit("trial.checks", self.subject, f"the profile's checks on the trial: {report.summary()}",
                      passed=report.ok, failed=[o.nodeid.split("::", 1)[-1] for o in report.failed])
        if report.ok:
            return None
        failed = "; ".join(f"{o.nodeid.split('::', 1)[-1]}: {o.message.splitlines()[0] if o.message else ''}"
                           for o in report.failed[:5])
        return f"the profile's checks failed ({report.summary()}): {failed or report.error}"

    def switch(self, on: bool) -> None:
        if on:
            self.apply()
            self.verify()
            return
        with self.r._conn(self.unit, self.p.control_target)() as c:
            self.p.loader.discard(c)
        self.r.shared.drop()  # the unit reboots
        try:
            self.trial.back_to_default(self.p.old_cmdline, self.p.old_kernel)
        except UnitLostError as exc:
            raise UnitLost(str(exc), reason=str(exc), attention="the unit did not come back from its reboot into "
                           "the old default; it needs a human") from exc

    def keep(self, on: bool) -> None:
        if not on:
            self.switch(True)
        with self.r._conn(self.unit, self.p.control_target)() as c:
            self.p.loader.commit(c, self.p.target)
            problems = self.p.loader.committed(c, self.p.target)
        if problems:
            raise TuneError("commit did not take: " + "; ".join(problems))

    def undo(self, on: bool | None) -> None:
        self.r.undo(self.unit, self.spec.target, self.before, self.p.target, on_trial=on)

    def measure_on(self) -> Transport:
        return self.r.shared.get(self.unit, self.ctx.measure_target(self.unit))

    def connection(self, target: str) -> Transport:
        return self.r.shared.get(self.unit, target)

    def mark(self) -> None:
        with self.r._conn(self.unit, self.spec.target)() as t:
            self.ctx.write_marker(t, self.unit, self.spec.target)
