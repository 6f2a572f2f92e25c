"""sysctl: a live value, and the sysctl.d files that set it at boot (which one wins)."""

from __future__ import annotations

import base64
import binascii

from pydantic import BaseModel

from orchestrator.core.errors import ParseError
from orchestrator.core.names import check_sysctl_name
from orchestrator.facts.base import Fact, one_line


def sysctl_path(name: str) -> str:
    """/proc/sys path of a dotted sysctl name; refuses anything but [a-z0-9_-] words (no '..', no '/')."""
    return "/proc/sys/" + check_sysctl_name(name).replace(".", "/")


def sysctl_fact(name: str) -> Fact[str]:
    """The current value of one sysctl, as the kernel prints it minus the final newline ('1', '4\\t4\\t1\\t7').

    Only single-line sysctls are accepted; a missing sysctl makes `cat` fail (CommandFailed)."""
    path = sysctl_path(name)

    def parse(text: str) -> str:
        return one_line(f"sysctl {name} ({path})", text)

    return Fact(f"sysctl:{name}", ("cat", path), parse)


class SysctlFile(BaseModel):
    """One sysctl.d configuration file, as systemd-sysctl reads it (see sysctl.d(5))."""

    path: str
    content: str
    #: key (dotted form) -> value, the last assignment in the file winning.
    settings: dict[str, str]
    #: keys written with a leading '-' (systemd-sysctl ignores failures to set them).
    ignore_failure: list[str]
    #: 1-based numbers of lines that are neither blank, comments nor `key = value` (systemd-sysctl skips them).
    invalid_lines: list[int]


#: Directories systemd-sysctl reads, highest precedence first (a file name in an earlier one masks later ones).
SYSCTL_DIRS = ("/etc/sysctl.d", "/run/sysctl.d", "/usr/local/lib/sysctl.d", "/usr/lib/sysctl.d")
# Debian's /etc/sysctl.conf is read through the /etc/sysctl.d/99-sysctl.conf symlink, so it is not listed apart.
_SYSCTL_FILES_SCRIPT = (
    "for f in "
    + " ".join(f"{d}/*.conf" for d in SYSCTL_DIRS)
    + '; do [ -f "$f" ] || continue; '
    + 'if c=$(base64 -w0 -- "$f"); then printf \'file %s\\n%s\\n\' "$f" "$c"; '
    + "else printf 'unreadable %s\\n' \"$f\"; fi; done; echo end"
)


def normalize_sysctl_key(key: str) -> str:
    """sysctl.d(5): if the first separator is '/', dots and slashes are swapped; give the dotted form."""
    for ch in key:
        if ch == "/":
            return key.translate(str.maketrans("/.", "./"))
        if ch == ".":
            break
    return key


def parse_sysctl_conf(path: str, content: str) -> SysctlFile:
    settings: dict[str, str] = {}
    ignore: list[str] = []
    invalid: list[int] = []
    for lineno, raw in enumerate(content.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key:
            invalid.append(lineno)
            continue
        if key.startswith("-"):
            key = key[1:].strip()
            ignore.append(normalize_sysctl_key(key))
        settings[normalize_sysctl_key(key)] = value.strip()
    return SysctlFile(
        path=path, content=content, settings=settings, ignore_failure=ignore, invalid_lines=invalid
    )


def parse_sysctl_files(text: str) -> list[SysctlFile]:
    """Output of _SYSCTL_FILES_SCRIPT: pairs of lines `file PATH` / base64 of the content, then `end`."""
    lines = text.split("\n")
    if lines[-2:] != ["end", ""]:
        raise ParseError(f"expected `file PATH` / base64 line pairs and a final `end`, got {text[-200:]!r}")
    lines = lines[:-2]
    files: list[SysctlFile] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("unreadable /"):
            raise ParseError(
                f"sysctl file {line[len('unreadable ') :]!r} could not be read (expected readable)"
            )
        if not line.startswith("file /") or i + 1 >= len(lines):
            raise ParseError(f"expected `file PATH` followed by a base64 line, got {line[:200]!r}")
        path, encoded = line[len("file ") :], lines[i + 1]
        try:
            content = base64.b64decode(encoded, validate=True).decode("utf-8", "replace")
        except (binascii.Error, ValueError):
            raise ParseError(f"expected base64 content of {path}, got {encoded[:200]!r}") from None
        files.append(parse_sysctl_conf(path, content))
        i += 2
    return files


def effective_sysctl_settings(files: list[SysctlFile]) -> dict[str, tuple[str, str]]:
    """key -> (value, path) after systemd-sysctl's rules: one file per name (the earliest SYSCTL_DIRS entry
    wins), files applied in name order, later assignments overriding earlier ones."""
    chosen: dict[str, SysctlFile] = {}
    rank = {d: i for i, d in enumerate(SYSCTL_DIRS)}
    for f in files:
        directory, _, base = f.path.rpartition("/")
        old = chosen.get(base)
        if old is None or rank.get(directory, 99) < rank.get(old.path.rpartition("/")[0], 99):
            chosen[base] = f
    result: dict[str, tuple[str, str]] = {}
    for base in sorted(chosen):
        for key, value in chosen[base].settings.items():
            result[key] = (value, chosen[base].path)
    return result


SYSCTL_FILES = Fact("sysctl_files", ("sh", "-c", _SYSCTL_FILES_SCRIPT), parse_sysctl_files)
