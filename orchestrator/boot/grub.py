"""GRUB on Debian-like systems (`/etc/default/grub`, `/etc/default/grub.d/*.cfg`, `update-grub`, grubenv).

Ownership: rt-tune never edits /etc/default/grub. Committed arguments go to its own drop-in,
`/etc/default/grub.d/90-rt-tune.cfg`, one `GRUB_CMDLINE_LINUX="$GRUB_CMDLINE_LINUX ..."` line per change
(grub-mkconfig sources the drop-ins after /etc/default/grub). The trial entry is `/etc/grub.d/42_rt-tune-trial`,
a copy of the default entry (or of another kernel's) with the new arguments, armed with `grub-reboot` so GRUB
boots it once and clears `next_entry`; any reset afterwards boots the saved default again. That needs
GRUB_DEFAULT=saved and a grubenv GRUB itself can write at boot (not on Btrfs, ZFS, LVM or md RAID), which
`preflight` checks. `restore` writes every touched file back byte for byte (grub.cfg and grubenv included),
so no update-grub is needed to undo.

Staging and discarding a trial write the trial script's section into grub.cfg (or take it out) where
grub-mkconfig puts it and leave the rest of the file alone, instead of running update-grub (7-10 s on the x86
lab's guest, 40-50 s on the arm64 lab's host): preflight has just checked that grub.cfg's default entry is what
grub-mkconfig makes. On a fresh grub.cfg the result is grub-mkconfig's output byte for byte (the lab test).
Committing runs update-grub (the drop-in changes GRUB_CMDLINE_LINUX), which also keeps the trial script's entry
while it exists.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from typing import ClassVar

from orchestrator.boot import cmdline
from orchestrator.boot.common import grubenv_location_problems, panic_problem
from orchestrator.boot.grubcfg import MenuEntry, default_entry, entry_for_release, parse_grub_cfg, parse_grubenv
from orchestrator.boot.loader import (
    BootError,
    Bootloader,
    BootTarget,
    State,
    read_optional,
    restore_files,
    snapshot_files,
)
from orchestrator.core.errors import ParseError, TuneError
from orchestrator.facts.bootloader import BOOTLOADER
from orchestrator.remote.transport import Transport

TRIAL_ID = "rt-tune-trial"

_SECTION_BEGIN = re.compile(r"^### BEGIN (\S+) ###$", re.M)


def with_section(cfg: str, script: str, output: str) -> str | None:
    """grub.cfg with `script`'s section added where grub-mkconfig puts it: it runs the /etc/grub.d scripts in name
    order and frames each one's output with a blank line, `### BEGIN path ###` and `### END path ###`. None when
    grub.cfg has no such frames or already has that section (update-grub then decides)."""
    begins = [(m.start(), m.group(1)) for m in _SECTION_BEGIN.finditer(cfg)]
    if not begins or any(name == script for _, name in begins) or not output.endswith("\n"):
        return None
    section = f"\n### BEGIN {script} ###\n{output}### END {script} ###\n"
    later = [pos for pos, name in begins if _bytes(name) > _bytes(script)]
    if not later:
        return cfg + section if cfg.endswith("\n") else None
    pos = later[0] - 1  # the blank line that opens the next section
    return cfg[:pos] + section + cfg[pos:] if pos >= 0 and cfg[pos] == "\n" else None


def _bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def without_section(cfg: str, script: str) -> str | None:
    """grub.cfg without `script`'s section (as grub-mkconfig makes it once the script is gone); None if absent."""
    m = re.search(rf"\n### BEGIN {re.escape(script)} ###\n.*?### END {re.escape(script)} ###\n", cfg, re.S)
    return cfg[:m.start()] + cfg[m.end():] if m else None


# What grub-mkconfig reads that a person or a package changes: its settings, its scripts, /boot (a kernel added or
# removed changes the directory's time; grub.cfg's own directory is left out, rt-tune and grub-editenv write there).
MKCONFIG_INPUTS = ("/etc/default/grub", "/etc/default/grub.d", "/etc/grub.d", "/boot")


class GrubBackend(Bootloader):
    kind: ClassVar[str] = "grub"

    def __init__(self, *, cfg: str = "/boot/grub/grub.cfg", grubenv: str = "/boot/grub/grubenv",
                 dropin: str = "/etc/default/grub.d/90-rt-tune.cfg",
                 trial_script: str = "/etc/grub.d/42_rt-tune-trial", mkconfig: str = "update-grub",
                 mkconfig_inputs: tuple[str, ...] = MKCONFIG_INPUTS):
        self.cfg, self.grubenv, self.dropin, self.trial_script, self.mkconfig = (
            cfg, grubenv, dropin, trial_script, mkconfig)
        self.mkconfig_inputs = mkconfig_inputs

    # ---- reading -------------------------------------------------------------------------------------
    def _files(self) -> list[str]:
        return [self.dropin, self.trial_script, self.cfg, self.grubenv]

    def snapshot(self, t: Transport) -> State:
        return {"files": snapshot_files(t, self._files())}

    def restore(self, t: Transport, snap: State) -> None:
        restore_files(t, snap["files"])

    def entries(self, t: Transport) -> list[MenuEntry]:
        return parse_grub_cfg(t.read_file(self.cfg).decode("utf-8", "replace"))

    def env(self, t: Transport) -> dict[str, str]:
        data = read_optional(t, self.grubenv)
        return parse_grubenv(data.decode("utf-8", "replace")) if data is not None else {}

    def default(self, t: Transport) -> MenuEntry:
        return default_entry([e for e in self.entries(t) if e.id != TRIAL_ID], self.env(t).get("saved_entry"))

    def default_args(self, t: Transport) -> str:
        entry = self.default(t)
        if entry.args is None:
            raise BootError(f"{t.label}: the default GRUB entry {entry.title!r} has no linux line")
        return entry.args.strip()

    # ---- checks --------------------------------------------------------------------------------------
    def preflight(self, t: Transport) -> list[str]:
        info = BOOTLOADER.gather(t)
        problems = []
        if info.grub_default != "saved":
            problems.append(f"GRUB_DEFAULT is {info.grub_default!r} (in {info.grub_default_source}), not "
                            "'saved': a one-shot trial entry needs GRUB_DEFAULT=saved, or a failed trial would "
                            "not fall back")
        env = read_optional(t, self.grubenv)
        if env is None:
            problems.append(f"no grubenv at {self.grubenv}: grub-reboot cannot arm a one-shot entry "
                            "(create it with `grub-editenv create`)")
        else:
            problems += grubenv_location_problems(t, self.grubenv)
            probe = t.run(["sh", "-c", 'grub-editenv "$1" set rt_tune_preflight=1 && '
                           'grub-editenv "$1" unset rt_tune_preflight', "-", self.grubenv],
                          timeout_s=30, check=False)
            if not probe.ok:
                problems.append(f"grubenv {self.grubenv} cannot be written ({probe.stderr.strip()[:200]}): "
                                "grub-reboot would fail and GRUB could not clear a one-shot entry")
            elif t.read_file(self.grubenv) != env:
                t.write_file(self.grubenv, env)  # the probe must leave no trace
        try:
            args = self.default_args(t)
        except (TuneError, ParseError) as exc:
            problems.append(f"cannot read the default entry of {self.cfg}: {exc}")
        else:
            problems += self._stale(t)
            if (p := panic_problem(args)) is not None:
                problems.append(p)
        return problems

    def changed_inputs(self, t: Transport) -> list[str] | None:
        """What grub-mkconfig reads (its settings, its scripts, the kernels in /boot) that changed after grub.cfg
        was written, by modification time; None when that cannot be told (grub.cfg dated in the future, as after
        a clock that went back, or a path that cannot be read)."""
        script = ('cfg=$1; shift; [ "$(stat -c %Y "$cfg")" -le "$(date +%s)" ] || exit 3; '
                  'for p in "$@"; do [ -e "$p" ] || continue; '
                  'find "$p" -maxdepth 1 ! -path "${cfg%/*}" -newer "$cfg" -print || exit 4; done')
        res = t.run(["sh", "-c", script, "-", self.cfg, *self.mkconfig_inputs], timeout_s=60, check=False)
        return res.stdout.split("\n")[:-1] if res.ok else None

    def _stale(self, t: Transport) -> list[str]:
        """Committing runs update-grub; when grub.cfg is out of date with /etc/default/grub (someone edited it
        without update-grub), that would change other arguments than rt-tune's: refuse instead. Running
        grub-mkconfig to compare costs 10-50 s on a small unit, so it runs only when something it reads changed
        after grub.cfg was written (an edit by hand, a kernel installed or removed); a file given an old date
        on purpose (`touch -d`, `cp -p`) goes unseen."""
        if self.changed_inputs(t) == []:
            return []
        probe = "/run/rt-tune-grub-preflight.cfg"
        res = t.run(["sh", "-c", 'grub-mkconfig -o "$1" >/dev/null 2>&1; rc=$?; cat "$1"; rm -f "$1"; exit $rc',
                     "-", probe], timeout_s=300, check=False)
        if not res.ok:
            return [f"grub-mkconfig fails on this unit (exit {res.exit_status}): update-grub could not stage a "
                    "trial entry"]
        try:
            fresh = default_entry([e for e in parse_grub_cfg(res.stdout) if e.id != TRIAL_ID],
                                  self.env(t).get("saved_entry"))
        except ParseError as exc:
            return [f"update-grub would leave no usable default entry: {exc}"]
        now = self.default(t)
        if (fresh.args or "").split() != (now.args or "").split() or fresh.kernel != now.kernel:
            return [f"{self.cfg} is out of date: update-grub would change the default entry from "
                    f"`{now.kernel} {(now.args or '').strip()}` to `{fresh.kernel} {(fresh.args or '').strip()}`; "
                    "run update-grub (and reboot) first so rt-tune's change is the only difference"]
        return []

    # ---- changing ------------------------------------------------------------------------------------
    def _mkconfig(self, t: Transport) -> None:
        t.run([self.mkconfig], timeout_s=300)

    def _trial_entry(self, t: Transport, target: BootTarget) -> str:
        base = self.default(t)
        body = base.body
        if target.kernel and target.kernel != base.release:
            kernel_entry = entry_for_release(self.entries(t), target.kernel)
            body = kernel_entry.body
            args = base.args or ""  # the default's arguments, on the other kernel
        else:
            args = base.args or ""
        new_args = cmdline.merged(args.strip(), target.add)
        lines = []
        for line in body.split("\n"):
            words = line.split()
            if words and words[0] in ("linux", "linux16", "linuxefi") and len(words) >= 2:
                indent = line[: len(line) - len(line.lstrip())]
                line = f"{indent}{words[0]}\t{words[1]} {new_args}"
            lines.append(line)
        title = f"rt-tune trial: {target.kernel or base.release} {' '.join(cmdline.tokens(target.add))}".strip()
        return (f"menuentry {shlex.quote(title)} --id {TRIAL_ID} {{\n" + "\n".join(lines).rstrip("\n")
                + "\n}\n")

    def _edit_cfg(self, t: Transport, edit: Callable[[str], str | None]) -> None:
        """grub.cfg rewritten by `edit` (same mode), or update-grub when `edit` cannot place the change (None)."""
        cfg = edit(t.read_file(self.cfg).decode("utf-8", "surrogateescape"))
        if cfg is None:
            self._mkconfig(t)
            return
        mode = t.run(["stat", "-c", "%a", "--", self.cfg], timeout_s=30).stdout.strip()
        t.write_file(self.cfg, _bytes(cfg), mode=int(mode, 8))

    def stage_trial(self, t: Transport, target: BootTarget) -> None:
        entry = self._trial_entry(t, target)
        script = "#!/bin/sh\n# rt-tune: one-shot trial entry (armed with grub-reboot); removed on commit or discard\n" \
                 "exec tail -n +4 \"$0\"\n" + entry
        t.write_file(self.trial_script, script.encode(), mode=0o755)
        self._edit_cfg(t, lambda cfg: with_section(cfg, self.trial_script, entry))
        staged = [e for e in self.entries(t) if e.id == TRIAL_ID]
        if len(staged) != 1:
            raise BootError(f"{t.label}: {self.cfg} has {len(staged)} trial entries {TRIAL_ID!r} after staging, "
                            "not one")
        self.arm(t)

    def arm(self, t: Transport) -> None:
        t.run(["grub-reboot", TRIAL_ID], timeout_s=30)
        if self.env(t).get("next_entry") != TRIAL_ID:
            raise BootError(f"{t.label}: grub-reboot did not set next_entry={TRIAL_ID} in {self.grubenv}")

    def disarm(self, t: Transport) -> None:
        t.run(["grub-editenv", self.grubenv, "unset", "next_entry"], timeout_s=30)

    def commit(self, t: Transport, target: BootTarget) -> None:
        old = read_optional(t, self.dropin)
        text = old.decode() if old is not None else (
            "# rt-tune: kernel arguments it added (one line per change). rt-tune restores this file byte for\n"
            "# byte when it rolls a change back; edit /etc/default/grub for your own arguments.\n")
        add = cmdline.missing(self.default_args(t), target.add)
        if add:
            text += f'GRUB_CMDLINE_LINUX="$GRUB_CMDLINE_LINUX {" ".join(cmdline.tokens(add))}"\n'
            t.write_file(self.dropin, text.encode())
        t.run(["rm", "-f", "--", self.trial_script], timeout_s=30)
        self.disarm(t)
        self._mkconfig(t)
        if target.kernel:
            entry = entry_for_release(self.entries(t), target.kernel)
            t.run(["grub-set-default", entry.path], timeout_s=30)

    def committed(self, t: Transport, target: BootTarget) -> list[str]:
        problems = super().committed(t, target)
        if target.kernel and self.default(t).release != target.kernel:
            problems.append(f"default entry boots {self.default(t).release}, not {target.kernel}")
        if any(e.id == TRIAL_ID for e in self.entries(t)):
            problems.append("the trial entry is still in grub.cfg")
        return problems

    def discard(self, t: Transport) -> None:
        t.run(["rm", "-f", "--", self.trial_script], timeout_s=30)
        self.disarm(t)
        self._edit_cfg(t, lambda cfg: without_section(cfg, self.trial_script))

    def pin_default(self, t: Transport) -> str:
        """Name the current default entry by its stable id path in saved_entry, so that installing a kernel
        (which re-sorts the menu) does not change what boots by default. Returns the path."""
        entry = self.default(t)
        path = entry_for_release(self.entries(t), entry.release).path if entry.release else entry.path
        t.run(["grub-set-default", path], timeout_s=30)
        return path
