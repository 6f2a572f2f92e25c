"""Kernel command lines as tokens: what rt-tune adds, checked, merged into a bootloader's arguments.

rt-tune owns only the arguments it adds. Merging never removes or rewrites another argument: a key that is
already present with the same value is left alone (and is not rt-tune's), a key present with another value
is a conflict the user must resolve by hand. Rollback never edits tokens: it restores the bootloader's files
byte for byte.
"""

from __future__ import annotations

import re
import shlex

from orchestrator.core.errors import InputError

#: Arguments that decide whether the unit boots at all; rt-tune never adds or changes them.
FORBIDDEN = ("root", "rootfstype", "rootflags", "rootwait", "rootdelay", "init", "rdinit", "initrd", "ro", "rw",
             "nfsroot", "boot_image")
KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
VALUE = re.compile(r"^[A-Za-z0-9_.,:/=+@%-]+$")
#: COMMAND_LINE_SIZE (bytes, including the final NUL) per `uname -m`: arch/*/include/uapi/asm/setup.h.
SIZE_LIMITS = {"x86_64": 2048, "aarch64": 2048, "arm64": 2048, "armv7l": 1024, "riscv64": 1024}
DEFAULT_SIZE_LIMIT = 1024


class CmdlineError(InputError):
    """A kernel argument rt-tune was asked to add is not acceptable on this unit."""


def token(key: str, value: str | None) -> str:
    return key if value is None else f"{key}={value}"


def tokens(add: dict[str, str | None]) -> list[str]:
    return [token(k, v) for k, v in add.items()]


def split(cmdline: str) -> list[str]:
    """Tokens of a kernel command line (the kernel's own rules: whitespace, double quotes group)."""
    try:
        return shlex.split(cmdline, posix=True)
    except ValueError as exc:
        raise CmdlineError(f"cannot split kernel command line {cmdline[:200]!r}: {exc}") from None


def key_of(tok: str) -> str:
    return tok.split("=", 1)[0]


def _norm(key: str) -> str:
    return key.lower().replace("-", "_")


def validate(add: dict[str, str | None]) -> None:
    """Refuse keys/values that could stop the unit booting or break quoting (the profile checks the same)."""
    problems = []
    for key, value in add.items():
        if not KEY.fullmatch(key):
            problems.append(f"{key!r}: not a kernel argument name")
        elif _norm(key).startswith("root") or _norm(key) in FORBIDDEN:
            problems.append(f"{key!r}: rt-tune never sets root, init, initrd or ro/rw arguments")
        elif value is not None and not VALUE.fullmatch(value):
            problems.append(f"{key}={value!r}: value must match [A-Za-z0-9_.,:/=+@%-]+")
    if problems:
        raise CmdlineError("refused kernel arguments: " + "; ".join(problems))


def missing(existing: str, add: dict[str, str | None]) -> dict[str, str | None]:
    """The subset of `add` not already on `existing`; a key present with another value is a conflict."""
    validate(add)
    have: dict[str, list[str | None]] = {}
    for tok in split(existing):
        k, sep, v = tok.partition("=")
        have.setdefault(_norm(k), []).append(v if sep else None)
    out: dict[str, str | None] = {}
    conflicts = []
    for key, value in add.items():
        seen = have.get(_norm(key))
        if seen is None:
            out[key] = value
        elif value not in seen:
            conflicts.append(f"{key}: the unit already has {', '.join(token(key, s) for s in seen)}, "
                             f"the profile wants {token(key, value)}")
    if conflicts:
        raise CmdlineError("kernel arguments already set to other values (rt-tune does not rewrite arguments "
                           "it did not add; remove them by hand or change the profile): " + "; ".join(conflicts))
    return out


def merged(existing: str, add: dict[str, str | None]) -> str:
    """`existing` with the missing arguments of `add` appended, separated by one space (existing bytes kept)."""
    extra = tokens(missing(existing, add))
    if not extra:
        return existing
    sep = "" if not existing or existing.endswith(" ") else " "
    return existing + sep + " ".join(extra)


def check_size(cmdline: str, arch: str) -> None:
    limit = SIZE_LIMITS.get(arch, DEFAULT_SIZE_LIMIT)
    if len(cmdline.encode()) + 1 > limit:
        raise CmdlineError(f"the kernel command line would be {len(cmdline.encode())} bytes, over the {arch} "
                           f"limit of {limit - 1} (COMMAND_LINE_SIZE {limit}): {cmdline[:120]}...")


def holds(proc_cmdline: str, add: dict[str, str | None]) -> list[str]:
    """Problems with a booted /proc/cmdline: every added token present exactly once and no other value for its
    key (an empty list means it holds exactly the intended arguments)."""
    toks = split(proc_cmdline)
    problems = []
    for key, value in add.items():
        want = token(key, value)
        same_key = [t for t in toks if _norm(key_of(t)) == _norm(key)]
        if same_key != [want]:
            problems.append(f"expected {want} once, found {same_key or 'nothing'}")
    return problems
