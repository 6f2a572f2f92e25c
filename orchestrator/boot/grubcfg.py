"""grub.cfg as GRUB reads it, reduced to what rt-tune needs: the menu entries (ids, titles, submenu paths),
their `linux` lines (kernel path + arguments) and which one `saved_entry`/`default` selects.

Parsed from the file grub-mkconfig writes (Debian's 10_linux, 40_custom and friends); tested on grub.cfg files
recorded from the lab VMs (tests/recorded/lab-x86/).
"""

from __future__ import annotations

import re
import shlex

from pydantic import BaseModel

from orchestrator.core.errors import ParseError


class MenuEntry(BaseModel):
    title: str
    id: str | None  # --id / $menuentry_id_option
    path: str  # the id GRUB accepts in saved_entry/next_entry: "SUBMENU_ID>ENTRY_ID" inside a submenu
    index_path: str  # the same by position: "1>0"
    kernel: str | None  # /boot/vmlinuz-6.1.0-28-amd64 (as written, relative to its root)
    args: str | None  # everything after the kernel path on the `linux` line
    initrd: str | None
    body: str  # the entry's lines between the braces, verbatim

    @property
    def release(self) -> str | None:
        if self.kernel is None:
            return None
        m = re.search(r"/(?:vmlinuz|vmlinux|Image|bzImage)-([^/\s]+)\Z", self.kernel)
        return m.group(1) if m else None


_OPEN = re.compile(r"^\s*(menuentry|submenu)\s+(.*)\{\s*$")


def _entry_header(rest: str) -> tuple[str, str | None]:
    try:
        words = shlex.split(rest, posix=True)
    except ValueError as exc:
        raise ParseError(f"grub.cfg: cannot parse menu entry header {rest[:120]!r}: {exc}") from None
    if not words:
        raise ParseError(f"grub.cfg: menu entry without a title: {rest[:120]!r}")
    title, ident = words[0], None
    for i, w in enumerate(words):
        if w in ("--id", "$menuentry_id_option") and i + 1 < len(words):
            ident = words[i + 1]
        elif w.startswith("--id="):
            ident = w.split("=", 1)[1]
    return title, ident


def parse_grub_cfg(text: str) -> list[MenuEntry]:
    """Every menu entry, submenus flattened (with `>` paths), in file order."""
    entries: list[MenuEntry] = []
    stack: list[tuple[str, int, int]] = []  # open submenus: (id or title, index, count of children)
    counters = [0]
    cur: dict | None = None
    depth_in_entry = 0
    for line in text.split("\n"):
        if cur is not None:
            stripped = line.strip()
            if stripped.endswith("{") and not stripped.startswith("#"):
                depth_in_entry += 1
            if stripped == "}":
                if depth_in_entry == 0:
                    entries.append(MenuEntry(**cur))
                    cur = None
                    continue
                depth_in_entry -= 1
            cur["body"] += line + "\n"
            words = stripped.split()
            if words and words[0] in ("linux", "linux16", "linuxefi"):
                cur["kernel"] = words[1] if len(words) > 1 else None
                cur["args"] = stripped.split(None, 2)[2] if len(words) > 2 else ""
            elif words and words[0] in ("initrd", "initrd16", "initrdefi"):
                cur["initrd"] = " ".join(words[1:])
            continue
        m = _OPEN.fullmatch(line)
        if m:
            kind, rest = m.groups()
            title, ident = _entry_header(rest)
            index = counters[-1]
            counters[-1] += 1
            prefix_id = ">".join(s[0] for s in stack)
            prefix_ix = ">".join(str(s[1]) for s in stack)
            name = ident or title
            if kind == "submenu":
                stack.append((name, index, 0))
                counters.append(0)
                continue
            cur = {"title": title, "id": ident, "path": f"{prefix_id}>{name}" if stack else name,
                   "index_path": f"{prefix_ix}>{index}" if stack else str(index),
                   "kernel": None, "args": None, "initrd": None, "body": ""}
            depth_in_entry = 0
            continue
        if line.strip() == "}" and stack:
            stack.pop()
            counters.pop()
    if cur is not None:
        raise ParseError(f"grub.cfg: menu entry {cur['title']!r} is not closed (truncated file?)")
    return entries


def parse_grubenv(text: str) -> dict[str, str]:
    """`grub-editenv FILE list` output or the grubenv block itself (`#` padding ignored)."""
    out = {}
    for line in text.split("\n"):
        if not line or line.startswith("#"):
            continue
        k, sep, v = line.partition("=")
        if sep:
            out[k] = v
    return out


def default_entry(entries: list[MenuEntry], saved_entry: str | None) -> MenuEntry:
    """The entry GRUB boots with GRUB_DEFAULT=saved: `saved_entry` (by id path, title path or index path), else
    the first entry."""
    if not entries:
        raise ParseError("grub.cfg has no menu entries")
    if saved_entry:
        for e in entries:
            titles = e.path  # ids are used when present; GRUB also matches titles
            if saved_entry in (e.path, e.index_path, titles) or saved_entry == e.title:
                return e
        raise ParseError(f"grubenv saved_entry={saved_entry!r} names no entry of grub.cfg "
                         f"(entries: {', '.join(e.path for e in entries)})")
    return entries[0]


def entry_for_release(entries: list[MenuEntry], release: str) -> MenuEntry:
    """The plain (non-recovery) entry that boots kernel `release`."""
    cands = [e for e in entries if e.release == release and "recovery" not in (e.args or "").split()
             and "single" not in (e.args or "").split()]
    if not cands:
        raise ParseError(f"grub.cfg has no entry booting kernel {release} (entries: "
                         f"{', '.join(f'{e.title} ({e.release})' for e in entries)})")
    # prefer an entry inside the advanced submenu: its id names the release, so it stays the same entry
    cands.sort(key=lambda e: (">" not in e.path,))
    return cands[0]
