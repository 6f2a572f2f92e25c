"""Which bootloader a unit boots with, and the files and tools that configure it."""

from __future__ import annotations

import fnmatch
import re
import shlex
from typing import Literal

from pydantic import BaseModel

from orchestrator.core.errors import ParseError
from orchestrator.facts.base import Fact

BootloaderKind = Literal["grub", "systemd-boot", "extlinux", "u-boot", "unknown"]

_GRUB_CFGS = ("/boot/grub/grub.cfg", "/boot/grub2/grub.cfg", "/boot/efi/EFI/*/grub.cfg")
_GRUBENVS = ("/boot/grub/grubenv", "/boot/grub2/grubenv", "/boot/efi/EFI/*/grubenv")
_LOADER_CONFS = ("/boot/efi/loader/loader.conf", "/efi/loader/loader.conf", "/boot/loader/loader.conf")
_LOADER_ENTRIES = ("/boot/efi/loader/entries", "/efi/loader/entries", "/boot/loader/entries")
_EXTLINUX = ("/boot/extlinux/extlinux.conf", "/extlinux/extlinux.conf")
_BOOT_FILES = ("/etc/default/grub", *_GRUB_CFGS, *_GRUBENVS, *_LOADER_CONFS, *_EXTLINUX, "/etc/fw_env.config")
_GRUB_MKCONFIG = ("update-grub", "grub-mkconfig", "grub2-mkconfig")
_BOOT_COMMANDS = (
    *_GRUB_MKCONFIG, "grub-reboot", "grub2-reboot", "grub-editenv", "grub2-editenv",
    "bootctl", "fw_printenv", "fw_setenv",
)  # fmt: skip

# Lines: `file yes|no PATH`, `entries yes DIR N` / `entries no DIR`, `command yes NAME PATH` /
# `command no NAME`, `bootctl-is-installed RC STDOUT`, `grub-default-in FILE` then `grub-default LINE`, `end`.
BOOTLOADER_SCRIPT = (
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
    f"for f in {' '.join(_BOOT_FILES)}; do\n"
    '  if [ -e "$f" ]; then echo "file yes $f"; else echo "file no $f"; fi\n'
    "done\n"
    f"for d in {' '.join(_LOADER_ENTRIES)}; do\n"
    '  if [ -d "$d" ]; then n=0; for e in "$d"/*.conf; do [ -e "$e" ] && n=$((n+1)); done; '
    'echo "entries yes $d $n"; else echo "entries no $d"; fi\n'
    "done\n"
    f"for c in {' '.join(_BOOT_COMMANDS)}; do\n"
    '  if p=$(command -v "$c"); then echo "command yes $c $p"; else echo "command no $c"; fi\n'
    "done\n"
    "if command -v bootctl >/dev/null; then\n"
    "  out=$(bootctl is-installed 2>/dev/null); rc=$?\n"
    "  printf 'bootctl-is-installed %s %s\\n' \"$rc\" \"$(printf %s \"$out\" | tr '\\n' ' ')\"\n"
    "fi\n"
    "for f in /etc/default/grub /etc/default/grub.d/*.cfg; do\n"
    '  [ -f "$f" ] || continue\n'
    "  grep -E '^[[:space:]]*(export[[:space:]]+)?GRUB_DEFAULT=' \"$f\" | while IFS= read -r l; do\n"
    '    printf \'grub-default-in %s\\ngrub-default %s\\n\' "$f" "$l"\n'
    "  done\n"
    "done\n"
    "echo end\n"
)


class BootloaderInfo(BaseModel):
    """Which bootloader holds the kernel cmdline, from files and commands found on the unit."""

    kind: BootloaderKind
    #: Every kind with evidence, in the priority order used to choose `kind` (grub, systemd-boot, extlinux, u-boot).
    candidates: list[str]
    #: What was found for `kind` ("file /etc/default/grub", "command update-grub at /usr/sbin/update-grub").
    evidence: list[str]
    #: Every probed path -> exists (glob patterns that matched nothing are listed as not existing).
    files: dict[str, bool]
    #: Every probed command -> its path, or None when not on PATH.
    commands: dict[str, str | None]
    #: systemd-boot entry directories that exist -> number of *.conf entries.
    loader_entries: dict[str, int]
    #: `bootctl is-installed` said yes (None: no bootctl).
    bootctl_is_installed: bool | None
    #: GRUB_DEFAULT's value (the last assignment in /etc/default/grub and /etc/default/grub.d/*.cfg).
    grub_default: str | None
    grub_default_source: str | None
    grub_default_saved: bool
    #: The first grubenv found (/boot/grub/grubenv, /boot/grub2/grubenv, ESP); None when there is none.
    grubenv: str | None


def _shell_assignment_value(line: str) -> str:
    _, sep, rhs = line.partition("=")
    if not sep:
        raise ParseError(f"expected a shell assignment GRUB_DEFAULT=VALUE, got {line[:200]!r}")
    try:
        words = shlex.split(rhs, comments=True, posix=True)
    except ValueError:
        raise ParseError(f"expected a shell assignment GRUB_DEFAULT=VALUE, got {line[:200]!r}") from None
    if len(words) > 1:
        raise ParseError(f"expected one word after GRUB_DEFAULT=, got {line[:200]!r}")
    return words[0] if words else ""


def _existing(files: dict[str, bool], patterns: tuple[str, ...]) -> list[str]:
    pats = [re.compile(fnmatch.translate(p)) for p in patterns]
    return [f for f, ok in files.items() if ok and any(p.match(f) for p in pats)]


def choose_bootloader(
    files: dict[str, bool],
    commands: dict[str, str | None],
    loader_entries: dict[str, int],
    bootctl_is_installed: bool | None,
) -> tuple[BootloaderKind, list[str], list[str]]:
    """(kind, candidates, evidence for kind) from what the probe found. Rules, in priority order:
    grub: /etc/default/grub + update-grub/grub-mkconfig/grub2-mkconfig + a grub.cfg;
    systemd-boot: `bootctl is-installed` yes, a loader.conf, or *.conf loader entries;
    extlinux: an extlinux.conf; u-boot: fw_printenv + /etc/fw_env.config."""
    evidence: dict[str, list[str]] = {}
    mk = [f"command {c} at {commands[c]}" for c in _GRUB_MKCONFIG if commands.get(c)]
    cfgs = _existing(files, _GRUB_CFGS)
    if files.get("/etc/default/grub") and mk and cfgs:
        evidence["grub"] = ["file /etc/default/grub", *mk, *(f"file {f}" for f in cfgs)]
    sd = ["bootctl is-installed: yes"] if bootctl_is_installed else []
    sd += [f"file {f}" for f in _existing(files, _LOADER_CONFS)]
    sd += [f"{n} entries in {d}" for d, n in loader_entries.items() if n]
    if sd:
        evidence["systemd-boot"] = sd
    if ext := _existing(files, _EXTLINUX):
        evidence["extlinux"] = [f"file {f}" for f in ext]
    if commands.get("fw_printenv") and files.get("/etc/fw_env.config"):
        evidence["u-boot"] = [f"command fw_printenv at {commands['fw_printenv']}", "file /etc/fw_env.config"]
    candidates = list(evidence)
    if not candidates:
        return "unknown", [], []
    kind = candidates[0]
    return kind, candidates, evidence[kind]  # type: ignore[return-value]


def parse_bootloader(text: str) -> BootloaderInfo:
    files: dict[str, bool] = {}
    commands: dict[str, str | None] = {}
    entries: dict[str, int] = {}
    bootctl: bool | None = None
    grub_default: str | None = None
    grub_default_source: str | None = None
    pending_source: str | None = None
    lines = text.split("\n")
    if lines[-2:] != ["end", ""]:
        raise ParseError(f"expected bootloader probe lines and a final `end`, got {text[-200:]!r}")
    for line in lines[:-2]:
        parts = line.split(" ")
        word = parts[0]
        if word == "file" and len(parts) >= 3 and parts[1] in ("yes", "no"):
            files[line.split(" ", 2)[2]] = parts[1] == "yes"
        elif word == "entries" and len(parts) == 4 and parts[1] == "yes" and parts[3].isdigit():
            entries[parts[2]] = int(parts[3])
        elif word == "entries" and len(parts) == 3 and parts[1] == "no":
            pass
        elif word == "command" and len(parts) >= 4 and parts[1] == "yes":
            commands[parts[2]] = line.split(" ", 3)[3]
        elif word == "command" and len(parts) == 3 and parts[1] == "no":
            commands[parts[2]] = None
        elif word == "bootctl-is-installed" and len(parts) >= 2 and parts[1].isdigit():
            bootctl = parts[1] == "0" and " ".join(parts[2:]).strip() == "yes"
        elif word == "grub-default-in" and len(parts) >= 2:
            pending_source = line.split(" ", 1)[1]
        elif word == "grub-default" and pending_source is not None:
            grub_default = _shell_assignment_value(line.split(" ", 1)[1])
            grub_default_source, pending_source = pending_source, None
        else:
            raise ParseError(f"unexpected line in bootloader probe output: {line[:200]!r}")
    missing = [f for f in ("/etc/default/grub", "/etc/fw_env.config") if f not in files]
    missing += [c for c in _BOOT_COMMANDS if c not in commands]
    if missing or pending_source is not None:
        raise ParseError(
            f"expected probe lines for {', '.join(missing) or 'grub-default'} (truncated output?)"
        )
    if commands.get("bootctl") and bootctl is None:
        raise ParseError("expected a bootctl-is-installed line when bootctl exists")

    kind, candidates, evidence = choose_bootloader(files, commands, entries, bootctl)
    grubenvs = _existing(files, _GRUBENVS)
    return BootloaderInfo(
        kind=kind,
        candidates=candidates,
        evidence=evidence,
        files=files,
        commands=commands,
        loader_entries=entries,
        bootctl_is_installed=bootctl,
        grub_default=grub_default,
        grub_default_source=grub_default_source,
        grub_default_saved=grub_default == "saved",
        grubenv=grubenvs[0] if grubenvs else None,
    )


# bootctl needs root to look at the ESP.
BOOTLOADER = Fact("bootloader", ("sh", "-c", BOOTLOADER_SCRIPT), parse_bootloader, sudo=True)
