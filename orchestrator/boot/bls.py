"""Boot Loader Specification type #1 entries (`/boot/loader/entries/*.conf`), the helpers the non-GRUB
backends share, and the GRUB-with-BLS backend of RHEL-like systems (grubby, grub2-reboot).

A BLS entry is `key value` lines: `title`, `version`, `machine-id`, `sort-key`, `linux`, `initrd`
(repeatable), `options` (repeatable: the kernel gets them joined by spaces), `devicetree`, ... and `#`
comments. systemd-boot reads the same files (see systemd_boot.py). Edits here only touch the lines they must:
appending to the last `options` line keeps every other byte of the file.

BlsGrubbyBackend (kind "grub-bls"): GRUB's blscfg reads the entries, the default is grubenv's `saved_entry`
(the entry's file name without `.conf`). The trial is a copy of the default entry, `rt-tune-trial.conf`, with
the new arguments, armed with `grub2-reboot rt-tune-trial` (GRUB boots `next_entry` once and clears it), so a
reset afterwards boots `saved_entry` again. commit runs `grubby --update-kernel=DEFAULT --args=...`, the tool
RHEL itself uses to change the arguments of an entry (it also expands RHEL 8's `$kernelopts`), then removes
the trial entry. restore writes every entry file, grubenv, /etc/kernel/cmdline and /etc/default/grub back
byte for byte.
"""

from __future__ import annotations

import posixpath
import re
import shlex
from dataclasses import dataclass
from typing import ClassVar

from orchestrator.boot import cmdline
from orchestrator.boot.common import (
    command_exists,
    default_args_problems,
    file_mode,
    grubenv_location_problems,
    path_exists,
    swap_version,
)
from orchestrator.boot.loader import (
    BootError,
    Bootloader,
    BootTarget,
    State,
    read_optional,
    restore_files,
    snapshot_files,
)
from orchestrator.remote.transport import Transport

# --------------------------------------------------------------------------------------------------------
# BLS type #1 entries

_LINE = re.compile(r"^(?P<lead>[ \t]*)(?P<key>[^ \t#]\S*)(?P<sep>[ \t]*)(?P<value>.*?)(?P<trail>[ \t]*)$")
_COUNTED = re.compile(r"^(?P<base>.+?)(?:\+(?P<left>\d+)(?:-(?P<done>\d+))?)?\.conf$")


def entry_id(file_name: str) -> str:
    """The id of an entry file: its name without the boot-counting suffix (`a+3-1.conf` -> `a.conf`)."""
    m = _COUNTED.fullmatch(file_name)
    return f"{m.group('base')}.conf" if m else file_name


@dataclass
class BlsEntry:
    """One entry file, kept as its exact text; edits return a new BlsEntry that differs only where asked."""

    text: str

    def _lines(self) -> list[str]:
        return self.text.splitlines(keepends=True)

    def _parsed(self) -> list[tuple[int, re.Match[str]]]:
        out = []
        for i, line in enumerate(self._lines()):
            body = line.rstrip("\r\n")
            if not body.strip() or body.lstrip().startswith("#"):
                continue
            m = _LINE.fullmatch(body)
            if m:
                out.append((i, m))
        return out

    def values(self, key: str) -> list[str]:
        return [m.group("value") for _, m in self._parsed() if m.group("key") == key]

    def first(self, key: str) -> str | None:
        vals = self.values(key)
        return vals[0] if vals else None

    def options(self) -> str:
        """The kernel arguments: every `options` line joined by one space (as systemd-boot and blscfg do)."""
        return " ".join(v for v in self.values("options") if v)

    def _replace_line(self, index: int, m: re.Match[str], value: str) -> BlsEntry:
        lines = self._lines()
        line = lines[index]
        ending = line[len(line.rstrip("\r\n")) :]
        sep = m.group("sep") or " "
        lines[index] = f"{m.group('lead')}{m.group('key')}{sep}{value}{m.group('trail')}{ending}"
        return BlsEntry("".join(lines))

    def with_value(self, key: str, value: str, *, occurrence: int = 0) -> BlsEntry:
        """Replace the value of the `occurrence`-th `key` line (or add `key value` at the end when absent)."""
        hits = [(i, m) for i, m in self._parsed() if m.group("key") == key]
        if hits:
            i, m = hits[occurrence]
            return self._replace_line(i, m, value)
        text = self.text if not self.text or self.text.endswith("\n") else self.text + "\n"
        return BlsEntry(f"{text}{key} {value}\n")

    def with_values(self, key: str, transform) -> BlsEntry:
        """Every `key` line's value replaced by transform(value)."""
        entry = self
        for n in range(len(self.values(key))):
            entry = entry.with_value(key, transform(entry.values(key)[n]), occurrence=n)
        return entry

    def with_args_added(self, add: dict[str, str | None]) -> BlsEntry:
        """The entry with the missing arguments of `add` appended to its last `options` line (conflicts raise
        CmdlineError; arguments already present are not repeated)."""
        extra = cmdline.tokens(cmdline.missing(self.options(), add))
        if not extra:
            return self
        hits = [(i, m) for i, m in self._parsed() if m.group("key") == "options"]
        if not hits:
            return self.with_value("options", " ".join(extra))
        i, m = hits[-1]
        value = m.group("value")
        return self._replace_line(i, m, (value + " " if value else "") + " ".join(extra))


def trial_entry(base: BlsEntry, target: BootTarget, *, title_prefix: str = "rt-tune trial: ") -> BlsEntry:
    """The trial copy of `base`: arguments added, title marked, and for `target.kernel` the `version`, `linux`
    and `initrd` values naming that release instead of the base entry's `version`."""
    entry = base.with_args_added(target.add)
    title = base.first("title")
    entry = entry.with_value("title", f"{title_prefix}{title or base.first('version') or 'default entry'}")
    if target.kernel:
        old = base.first("version")
        if not old:
            raise BootError(
                "the default entry has no `version` line: cannot derive the paths of another kernel"
            )
        if old != target.kernel:
            entry = entry.with_value("version", target.kernel)
            for key in ("linux", "initrd"):
                entry = entry.with_values(key, lambda v, old=old: swap_version([v], old, target.kernel)[0])
    return entry


# --------------------------------------------------------------------------------------------------------
# GRUB + BLS (RHEL, Fedora, CentOS Stream, Rocky, Alma): grubby, grub2-reboot, grub2-editenv

TRIAL_NAME = "rt-tune-trial"
_GRUBENV_VAR = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def parse_editenv_list(text: str) -> dict[str, str]:
    """`grub2-editenv FILE list` output: `name=value` lines (values may contain '=')."""
    env = {}
    for line in text.splitlines():
        if not line:
            continue
        name, sep, value = line.partition("=")
        if not sep:
            raise BootError(f"unexpected line in grub-editenv list output: {line[:200]!r}")
        env[name] = value
    return env


def default_grub_value(text: str) -> str | None:
    """The last GRUB_DEFAULT assignment of a /etc/default/grub (shell syntax), or None."""
    value = None
    for line in text.splitlines():
        m = re.fullmatch(r"\s*(?:export\s+)?GRUB_DEFAULT=(.*)", line)
        if m:
            try:
                words = shlex.split(m.group(1), comments=True)
            except ValueError:
                words = [m.group(1).strip()]
            value = words[0] if words else ""
    return value


class BlsGrubbyBackend(Bootloader):
    kind: ClassVar[str] = "grub-bls"

    def __init__(
        self,
        *,
        entries_dir: str = "/boot/loader/entries",
        grubenv: str = "/boot/grub2/grubenv",
        default_grub: str = "/etc/default/grub",
        kernel_cmdline: str = "/etc/kernel/cmdline",
        editenv: str = "grub2-editenv",
        grub_reboot: tuple[str, ...] = ("grub2-reboot",),
        grubby: str = "grubby",
    ):
        self.entries_dir, self.grubenv, self.default_grub = entries_dir, grubenv, default_grub
        self.kernel_cmdline, self.editenv, self.grubby = kernel_cmdline, editenv, grubby
        self.grub_reboot = tuple(grub_reboot)

    @property
    def trial_path(self) -> str:
        return f"{self.entries_dir}/{TRIAL_NAME}.conf"

    # ---- reading -------------------------------------------------------------------------------------
    def env(self, t: Transport) -> dict[str, str]:
        return parse_editenv_list(t.run([self.editenv, self.grubenv, "list"], timeout_s=30).stdout)

    def entry_files(self, t: Transport) -> list[str]:
        res = t.run(
            [
                "sh",
                "-c",
                'for f in "$1"/*.conf; do [ -f "$f" ] && printf "%s\\n" "$f"; done; true',
                "-",
                self.entries_dir,
            ],
            timeout_s=30,
        )
        return [p for p in res.stdout.splitlines() if p]

    def default_path(self, t: Transport) -> str:
        saved = self.env(t).get("saved_entry")
        if not saved:
            raise BootError(
                f"{t.label}: no saved_entry in {self.grubenv}: GRUB's default is whatever entry "
                "sorts first, so rt-tune cannot tell it (set it with `grubby --set-default`)"
            )
        path = f"{self.entries_dir}/{saved}.conf"
        if saved == TRIAL_NAME or not path_exists(t, path, "-f"):
            raise BootError(f"{t.label}: saved_entry={saved!r} names no entry in {self.entries_dir}")
        return path

    def default_entry(self, t: Transport) -> BlsEntry:
        return BlsEntry(t.read_file(self.default_path(t)).decode())

    def entry_for_version(self, t: Transport, version: str) -> BlsEntry:
        for path in self.entry_files(t):
            if path == self.trial_path:
                continue
            entry = BlsEntry(t.read_file(path).decode())
            if entry.first("version") == version:
                return entry
        raise BootError(f"{t.label}: no BLS entry in {self.entries_dir} boots kernel {version}")

    def expand(self, args: str, env: dict[str, str]) -> str:
        """`options` with grubenv variables ($kernelopts, $tuned_params) expanded as GRUB expands them."""
        return " ".join(_GRUBENV_VAR.sub(lambda m: env.get(m.group(1) or m.group(2), ""), args).split())

    def default_args(self, t: Transport) -> str:
        return self.expand(self.default_entry(t).options(), self.env(t))

    # ---- state ---------------------------------------------------------------------------------------
    def _files(self, t: Transport) -> list[str]:
        return sorted(
            {*self.entry_files(t), self.trial_path, self.grubenv, self.kernel_cmdline, self.default_grub}
        )

    def snapshot(self, t: Transport) -> State:
        return {"files": snapshot_files(t, self._files(t))}

    def restore(self, t: Transport, snap: State) -> None:
        restore_files(t, snap["files"])

    # ---- checks --------------------------------------------------------------------------------------
    def preflight(self, t: Transport) -> list[str]:
        problems = []
        for tool, why in (
            (self.grub_reboot[0], "cannot arm a one-shot trial entry"),
            (self.editenv, "cannot read or clear next_entry"),
            (self.grubby, "cannot commit arguments to the default entry"),
        ):
            if not command_exists(t, tool):
                problems.append(f"{tool} not found: rt-tune {why}")
        text = read_optional(t, self.default_grub)
        value = default_grub_value(text.decode("utf-8", "replace")) if text is not None else None
        if value != "saved":
            problems.append(
                f"GRUB_DEFAULT is {value!r} in {self.default_grub}, not 'saved': a one-shot trial "
                "entry needs GRUB_DEFAULT=saved, or a failed trial would not fall back"
            )
        if not path_exists(t, self.entries_dir, "-d"):
            problems.append(f"no BLS entries directory {self.entries_dir}")
        if read_optional(t, self.grubenv) is None:
            problems.append(f"no grubenv at {self.grubenv}: grub2-reboot cannot arm a one-shot entry")
        else:
            problems += grubenv_location_problems(t, self.grubenv)
        return problems + default_args_problems(self, t)

    # ---- changing ------------------------------------------------------------------------------------
    def stage_trial(self, t: Transport, target: BootTarget) -> None:
        cmdline.validate(target.add)
        path = self.default_path(t)
        env = self.env(t)
        base = BlsEntry(t.read_file(path).decode())
        # The trial gets the expanded arguments on one line: GRUB must not depend on grubenv variables that
        # the default entry shares (tuned or grubby may change $kernelopts meanwhile).
        args = cmdline.merged(self.expand(base.options(), env), target.add)
        flat = BlsEntry(
            "".join(
                line
                for line in base.text.splitlines(keepends=True)
                if not re.match(r"\s*options(\s|\Z)", line)
            )
        )
        flat = flat.with_value("options", args)
        entry = trial_entry(flat, BootTarget(add={}, kernel=target.kernel))
        if entry.first("id") is not None:
            entry = entry.with_value("id", TRIAL_NAME)
        if target.kernel:
            root = posixpath.dirname(posixpath.dirname(posixpath.dirname(path)))  # BOOT/loader/entries/x.conf
            for key in ("linux", "initrd"):
                for value in (w for v in entry.values(key) for w in v.split() if not w.startswith("$")):
                    if not path_exists(t, posixpath.normpath(f"{root}/{value}"), "-f"):
                        raise BootError(
                            f"{t.label}: {key} {value} of kernel {target.kernel} is not on {root}"
                        )
        t.write_file(self.trial_path, entry.text.encode(), mode=file_mode(t, path))
        t.run([*self.grub_reboot, TRIAL_NAME], timeout_s=30)
        if self.env(t).get("next_entry") != TRIAL_NAME:
            raise BootError(
                f"{t.label}: {self.grub_reboot[0]} did not set next_entry={TRIAL_NAME} in {self.grubenv}"
            )

    def _disarm(self, t: Transport) -> None:
        t.run(["rm", "-f", "--", self.trial_path], timeout_s=30)
        if self.env(t).get("next_entry") is not None:
            t.run([self.editenv, self.grubenv, "unset", "next_entry"], timeout_s=30)

    def commit(self, t: Transport, target: BootTarget) -> None:
        self._disarm(t)
        kernel_arg, args = "DEFAULT", self.default_args(t)
        if target.kernel and self.default_entry(t).first("version") != target.kernel:
            entry = self.entry_for_version(t, target.kernel)
            kernel_arg, args = f"/boot/vmlinuz-{target.kernel}", self.expand(entry.options(), self.env(t))
        add = cmdline.missing(args, target.add)
        if add:
            t.run(
                [self.grubby, f"--update-kernel={kernel_arg}", f"--args={' '.join(cmdline.tokens(add))}"],
                timeout_s=120,
            )
        if kernel_arg != "DEFAULT":
            t.run([self.grubby, f"--set-default={kernel_arg}"], timeout_s=120)

    def discard(self, t: Transport) -> None:
        self._disarm(t)

    def committed(self, t: Transport, target: BootTarget) -> list[str]:
        problems = super().committed(t, target)
        if target.kernel and self.default_entry(t).first("version") != target.kernel:
            problems.append(
                f"default entry boots {self.default_entry(t).first('version')}, not {target.kernel}"
            )
        if path_exists(t, self.trial_path):
            problems.append(f"the trial entry {self.trial_path} is still there")
        if self.env(t).get("next_entry"):
            problems.append("next_entry is still set in grubenv")
        return problems
