"""extlinux.conf (syslinux syntax, read by U-Boot's distro boot / `sysboot` on most arm64 boards).

Keywords are case-insensitive: `DEFAULT label` (or `MENU DEFAULT` inside a label), `LABEL name` (the rest of
the line), `KERNEL`/`LINUX`, `INITRD`, `FDT`/`DEVICETREE`, `FDTDIR`/`DEVICETREEDIR`, `APPEND args`. Paths
starting with '/' are relative to the root of the partition U-Boot loads the file from, other paths to the
directory holding `extlinux/`.

extlinux has no one-shot entry, so the trial is a kexec: stage_trial writes nothing to the configuration; it
loads the default label's kernel and initrd (or those of `target.kernel`) with the new arguments
(`kexec -l KERNEL --initrd=INITRD --append=ARGS`), and reboot() runs `systemctl kexec`. Any reset afterwards
goes through U-Boot, which boots the untouched default label. The kexec'd kernel gets the device tree of the
running system (kexec's default), not the label's FDT file, which U-Boot would have fixed up first.
commit appends the arguments to the default label's APPEND line only; discard unloads (`kexec -u`).

u-boot-update (Debian's u-boot-menu) regenerates the file from /etc/default/u-boot on every kernel install;
`notes()` says so when the file carries its header, since an APPEND edit would then be lost.
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field
from typing import ClassVar

from orchestrator.boot import cmdline
from orchestrator.boot.common import (
    command_exists,
    file_mode,
    kernel_version_of,
    panic_problem,
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

_LINE = re.compile(r"^(?P<lead>[ \t]*)(?P<kw>\S+)(?P<sep>[ \t]*)(?P<value>.*?)(?P<trail>[ \t]*)$")


@dataclass
class Label:
    name: str
    kernel: str | None = None
    initrd: str | None = None
    fdt: str | None = None
    fdtdir: str | None = None
    #: (line index, value) of each APPEND line of the label.
    appends: list[tuple[int, str]] = field(default_factory=list)

    @property
    def append(self) -> str | None:
        return self.appends[-1][1] if self.appends else None


@dataclass
class ExtlinuxConf:
    text: str
    default: str | None
    labels: list[Label]

    def label(self, name: str) -> Label:
        for label in self.labels:
            if label.name == name:
                return label
        raise BootError(f"extlinux.conf: DEFAULT names label {name!r}, which does not exist")

    def default_label(self) -> Label:
        if self.default is None:
            raise BootError(
                "extlinux.conf has no DEFAULT (nor MENU DEFAULT): rt-tune cannot tell which label "
                "U-Boot boots"
            )
        return self.label(self.default)

    def with_append(self, label: Label, value: str) -> str:
        """The file's text with `label`'s (last) APPEND value replaced by `value`; every other byte kept."""
        if not label.appends:
            raise BootError(
                f"extlinux.conf: label {label.name!r} has no APPEND line; rt-tune only adds to an "
                "existing one (U-Boot would otherwise use its `bootargs`)"
            )
        index = label.appends[-1][0]
        lines = self.text.splitlines(keepends=True)
        line = lines[index]
        body = line.rstrip("\r\n")
        m = _LINE.fullmatch(body)
        assert m is not None
        sep = m.group("sep") or " "
        lines[index] = f"{m.group('lead')}{m.group('kw')}{sep}{value}{m.group('trail')}{line[len(body) :]}"
        return "".join(lines)


def parse_extlinux(text: str) -> ExtlinuxConf:
    default: str | None = None
    labels: list[Label] = []
    current: Label | None = None
    for index, line in enumerate(text.splitlines()):
        m = _LINE.fullmatch(line)
        if not m or m.group("kw").startswith("#"):
            continue
        kw, value = m.group("kw").lower(), m.group("value")
        if kw == "label":
            current = Label(name=value)
            labels.append(current)
        elif kw == "default":  # U-Boot ends a label at any menu-level keyword: DEFAULT is global anywhere
            default = value
        elif (
            kw == "menu"
            and value.split()[:1]
            and value.split()[0].lower() == "default"
            and current is not None
        ):
            default = current.name
        elif current is None:
            continue
        elif kw in ("kernel", "linux"):
            current.kernel = value
        elif kw == "initrd":
            current.initrd = value
        elif kw in ("fdt", "devicetree"):
            current.fdt = value
        elif kw in ("fdtdir", "devicetreedir", "devicetree-dir"):
            current.fdtdir = value
        elif kw == "append":
            current.appends.append((index, value))
    return ExtlinuxConf(text=text, default=default, labels=labels)


class ExtlinuxBackend(Bootloader):
    kind: ClassVar[str] = "extlinux"
    self_fallback: ClassVar[bool] = True

    def __init__(
        self,
        *,
        conf: str = "/boot/extlinux/extlinux.conf",
        boot_root: str | None = None,
        kexec: str = "kexec",
        kexec_loaded: str = "/sys/kernel/kexec_loaded",
        kexec_load_disabled: str = "/proc/sys/kernel/kexec_load_disabled",
        lockdown: str = "/sys/kernel/security/lockdown",
    ):
        self.conf, self._boot_root, self.kexec = conf, boot_root, kexec
        self.kexec_loaded, self.kexec_load_disabled, self.lockdown = (
            kexec_loaded,
            kexec_load_disabled,
            lockdown,
        )

    # ---- reading -------------------------------------------------------------------------------------
    def parsed(self, t: Transport) -> ExtlinuxConf:
        return parse_extlinux(t.read_file(self.conf).decode("utf-8", "replace"))

    def boot_root(self, t: Transport) -> str:
        """Where the partition U-Boot reads is mounted (paths starting with '/' are relative to it)."""
        if self._boot_root is not None:
            return self._boot_root
        return t.run(["stat", "-c", "%m", "--", self.conf], timeout_s=30).stdout.strip() or "/"

    def linux_path(self, t: Transport, path: str) -> str:
        if path.startswith("/"):
            return posixpath.normpath(f"{self.boot_root(t)}/{path}")
        return posixpath.normpath(f"{posixpath.dirname(posixpath.dirname(self.conf))}/{path}")

    def default_args(self, t: Transport) -> str:
        label = self.parsed(t).default_label()
        if label.append is None:
            raise BootError(f"{t.label}: default label {label.name!r} has no APPEND line")
        return label.append

    def notes(self, t: Transport) -> list[str]:
        """Things the user should know that do not stop a trial."""
        text = read_optional(t, self.conf)
        if text is not None and b"u-boot-update" in text:
            return [
                (
                    f"{self.conf} is generated by u-boot-update: a committed APPEND edit is lost at the next "
                    "kernel install unless the same arguments are in U_BOOT_PARAMETERS of /etc/default/u-boot"
                )
            ]
        return []

    # ---- state ---------------------------------------------------------------------------------------
    def snapshot(self, t: Transport) -> State:
        return {"files": snapshot_files(t, [self.conf])}

    def restore(self, t: Transport, snap: State) -> None:
        restore_files(t, snap["files"])
        self._unload(t)

    # ---- checks --------------------------------------------------------------------------------------
    def _read_sys(self, t: Transport, path: str) -> str | None:
        data = read_optional(t, path)
        return None if data is None else data.decode("utf-8", "replace").strip()

    def preflight(self, t: Transport) -> list[str]:
        problems = []
        if not command_exists(t, self.kexec):
            problems.append(
                f"{self.kexec} not found (package kexec-tools): extlinux has no one-shot entry, so the "
                "trial boot is a kexec"
            )
        if self._read_sys(t, self.kexec_load_disabled) == "1":
            problems.append(f"kexec is disabled ({self.kexec_load_disabled} = 1): the trial cannot be loaded")
        lockdown = self._read_sys(t, self.lockdown)
        if lockdown is not None and "[none]" not in lockdown:
            problems.append(f"the kernel is locked down ({lockdown}): kexec_load is refused")
        if read_optional(t, self.conf) is None:
            problems.append(f"no {self.conf}")
            return problems
        try:
            args = self.default_args(t)
            label = self.parsed(t).default_label()
            if label.kernel is None:
                raise BootError(f"default label {label.name!r} has no KERNEL/LINUX line")
        except BootError as exc:
            problems.append(str(exc))
        else:
            if (p := panic_problem(args)) is not None:
                problems.append(p)
        return problems

    # ---- changing ------------------------------------------------------------------------------------
    def trial_files(self, t: Transport, target: BootTarget) -> tuple[str, str | None]:
        """The kernel and initrd (paths on the running system) the trial boots."""
        label = self.parsed(t).default_label()
        if label.kernel is None:
            raise BootError(f"{t.label}: default label {label.name!r} has no KERNEL/LINUX line")
        if label.initrd is not None and "," in label.initrd:
            raise BootError(
                f"{t.label}: default label {label.name!r} has several initrds ({label.initrd}); "
                "kexec loads one"
            )
        paths = [label.kernel] + ([label.initrd] if label.initrd else [])
        if target.kernel:
            version = kernel_version_of(label.kernel)
            if version is None:
                raise BootError(
                    f"{t.label}: cannot tell the release of {label.kernel} to swap in {target.kernel}"
                )
            paths = swap_version(paths, version, target.kernel)
        files = [self.linux_path(t, p) for p in paths]
        for path in files:
            if not path_exists(t, path, "-f"):
                raise BootError(f"{t.label}: {path} (from {self.conf}) does not exist")
        return files[0], (files[1] if len(files) > 1 else None)

    def kexec_argv(self, kernel: str, initrd: str | None, args: str) -> list[str]:
        return [self.kexec, "-l", kernel, *([f"--initrd={initrd}"] if initrd else []), f"--append={args}"]

    def stage_trial(self, t: Transport, target: BootTarget) -> None:
        cmdline.validate(target.add)
        args = cmdline.merged(self.default_args(t), target.add)
        kernel, initrd = self.trial_files(t, target)
        t.run(self.kexec_argv(kernel, initrd, args), timeout_s=120)
        if self._read_sys(t, self.kexec_loaded) != "1":
            raise BootError(f"{t.label}: `kexec -l` succeeded but {self.kexec_loaded} is not 1")

    def reboot(self, t: Transport, verb: str = "reboot") -> None:
        if self._read_sys(t, self.kexec_loaded) != "1":
            raise BootError(
                f"{t.label}: no kexec kernel is loaded ({self.kexec_loaded}); stage the trial first"
            )
        super().reboot(t, "kexec")

    def commit(self, t: Transport, target: BootTarget) -> None:
        conf = self.parsed(t)
        label = conf.default_label()
        if target.kernel and kernel_version_of(label.kernel or "") != target.kernel:
            raise BootError(
                f"{t.label}: the default label {label.name!r} boots {label.kernel}, not "
                f"{target.kernel}: rt-tune only adds arguments to the default label; make a label of "
                f"{target.kernel} the DEFAULT (u-boot-update does for the newest kernel), then commit"
            )
        new = cmdline.merged(label.append or "", target.add)
        text = conf.with_append(label, new)
        if text != conf.text:
            t.write_file(self.conf, text.encode(), mode=file_mode(t, self.conf))
        self._unload(t)

    def _unload(self, t: Transport) -> None:
        if self._read_sys(t, self.kexec_loaded) in (None, "0"):
            return
        t.run([self.kexec, "-u"], timeout_s=60)
        if self._read_sys(t, self.kexec_loaded) not in (None, "0"):
            raise BootError(f"{t.label}: `kexec -u` left a kernel loaded ({self.kexec_loaded})")

    def discard(self, t: Transport) -> None:
        self._unload(t)

    def committed(self, t: Transport, target: BootTarget) -> list[str]:
        problems = super().committed(t, target)
        if self._read_sys(t, self.kexec_loaded) not in (None, "0"):
            problems.append("a kexec kernel is still loaded")
        return problems
