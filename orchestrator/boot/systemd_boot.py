"""systemd-boot: BLS type #1 entries on the ESP (or XBOOTLDR) and `bootctl`.

The default entry is what systemd-boot itself would pick, short of the one-shot: the first entry, in the
boot menu's order (taken from `bootctl list --json=short`, which sorts exactly like the boot loader), that
matches the `LoaderEntryDefault` EFI variable (`bootctl set-default`), else loader.conf's `default` glob, else
the first entry. Boot counting (`NAME+LEFT-DONE.conf`) is handled through the ids bootctl reports (the name
without the counter) and the file paths it reports (with it).

Trial: a copy of the default entry, `rt-tune-trial.conf` beside it, with the arguments added (and the
`version`/`linux`/`initrd` of another kernel when asked), armed with `bootctl set-oneshot rt-tune-trial.conf`:
systemd-boot boots it once and deletes the variable, so any reset afterwards boots the default. The copy gets
a `sort-key` that sorts after the default's, and stage_trial checks with bootctl that the trial would not
become the default by sort order (which would defeat the fallback) before arming it.
commit appends the arguments to the default entry's last `options` line and removes the trial entry.
"""

from __future__ import annotations

import fnmatch
import json
import posixpath
from typing import Any, ClassVar

from orchestrator.boot import cmdline
from orchestrator.boot.bls import BlsEntry, entry_id, trial_entry
from orchestrator.boot.common import command_exists, default_args_problems, file_mode, path_exists
from orchestrator.boot.loader import (
    BootError,
    Bootloader,
    BootTarget,
    State,
    read_optional,
    restore_files,
    snapshot_files,
)
from orchestrator.core.errors import ParseError
from orchestrator.remote.transport import Transport

TRIAL_ID = "rt-tune-trial.conf"
LOADER_GUID = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f"
ENTRIES_DIRS = ("/boot/efi/loader/entries", "/efi/loader/entries", "/boot/loader/entries")
LOADER_CONFS = ("/boot/efi/loader/loader.conf", "/efi/loader/loader.conf", "/boot/loader/loader.conf")


def parse_bootctl_list(text: str) -> list[dict[str, Any]]:
    """`bootctl list --json=short`: one JSON object per line (systemd 252) or one JSON array; each entry needs
    an `id`. Returned in the order bootctl printed them, which is the boot menu's order."""
    stripped = text.strip()
    if not stripped:
        return []
    try:
        if stripped.startswith("["):
            items = json.loads(stripped)
        else:
            items = [json.loads(line) for line in stripped.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise ParseError(
            f"cannot parse `bootctl list --json=short` output: {exc}: {stripped[:200]!r}"
        ) from None
    if not isinstance(items, list) or not all(
        isinstance(i, dict) and isinstance(i.get("id"), str) for i in items
    ):
        raise ParseError(f"expected bootctl entries with an `id`, got {stripped[:200]!r}")
    return items


def parse_loader_conf(text: str) -> dict[str, str]:
    """loader.conf: `key value` lines, `#` comments; a later line wins."""
    conf = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition(" ") if " " in line else line.partition("\t")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        conf[key.strip()] = value
    return conf


def decode_efivar_string(data: bytes) -> str:
    """An efivarfs file holding a string variable: 4 bytes of attributes, then NUL-terminated UTF-16LE."""
    if len(data) < 4:
        raise ParseError(f"EFI variable file too short ({len(data)} bytes)")
    return data[4:].decode("utf-16-le", "replace").split("\0", 1)[0]


def select_default(entries: list[dict[str, Any]], patterns: list[str]) -> dict[str, Any] | None:
    """systemd-boot's choice without the one-shot: the first entry (menu order) matching the first pattern
    that matches anything (ids and patterns case-folded, glob syntax), else the first entry."""
    for pattern in patterns:
        for entry in entries:
            if fnmatch.fnmatchcase(entry["id"].lower(), pattern.lower()):
                return entry
    return entries[0] if entries else None


class SystemdBootBackend(Bootloader):
    kind: ClassVar[str] = "systemd-boot"

    def __init__(
        self,
        *,
        esp_path: str | None = None,
        entries_dir: str | None = None,
        loader_conf: str | None = None,
        bootctl: str = "bootctl",
        efivars: str = "/sys/firmware/efi/efivars",
    ):
        self.esp_path = esp_path
        self._entries_dir = entries_dir or (f"{esp_path}/loader/entries" if esp_path else None)
        self._loader_conf = loader_conf or (f"{esp_path}/loader/loader.conf" if esp_path else None)
        self.bootctl, self.efivars = bootctl, efivars

    def _bootctl(self, *args: str) -> list[str]:
        return [self.bootctl, *([f"--esp-path={self.esp_path}"] if self.esp_path else []), *args]

    # ---- locating ------------------------------------------------------------------------------------
    def _first_existing(self, t: Transport, paths: tuple[str, ...], test: str) -> str | None:
        res = t.run(
            [
                "sh",
                "-c",
                f'for p in "$@"; do if [ {test} "$p" ]; then printf "%s\\n" "$p"; break; fi; done',
                "-",
                *paths,
            ],
            timeout_s=30,
        )
        return res.stdout.strip() or None

    def entries_dir(self, t: Transport) -> str | None:
        return self._entries_dir or self._first_existing(t, ENTRIES_DIRS, "-d")

    def loader_conf(self, t: Transport) -> str | None:
        return self._loader_conf or self._first_existing(t, LOADER_CONFS, "-f")

    def efivar(self, t: Transport, name: str) -> str | None:
        data = read_optional(t, f"{self.efivars}/{name}-{LOADER_GUID}")
        return None if data is None else decode_efivar_string(data)

    # ---- reading -------------------------------------------------------------------------------------
    def listing(self, t: Transport) -> list[dict[str, Any]]:
        """Every boot entry bootctl sees, in menu order."""
        return parse_bootctl_list(
            t.run(self._bootctl("--no-pager", "list", "--json=short"), timeout_s=60).stdout
        )

    def patterns(self, t: Transport) -> list[str]:
        """What selects the default: LoaderEntryDefault, then loader.conf's `default` (in that order)."""
        out = []
        if var := self.efivar(t, "LoaderEntryDefault"):
            out.append(var)
        conf_path = self.loader_conf(t)
        conf = read_optional(t, conf_path) if conf_path else None
        default = (
            parse_loader_conf(conf.decode("utf-8", "replace")).get("default") if conf is not None else None
        )
        if default:
            if default.startswith("@"):
                raise BootError(
                    f"{t.label}: loader.conf says `default {default}`: the default is the entry "
                    "booted or selected last, which rt-tune cannot pin; name an entry instead"
                )
            out.append(default)
        return out

    def default_entry(self, t: Transport, *, with_trial: bool = False) -> dict[str, Any]:
        entries = [e for e in self.listing(t) if with_trial or e["id"] != TRIAL_ID]
        chosen = select_default(entries, self.patterns(t))
        if chosen is None:
            raise BootError(f"{t.label}: bootctl lists no boot entries")
        if not with_trial and not str(chosen.get("path", "")).endswith(".conf"):
            raise BootError(
                f"{t.label}: the default boot entry {chosen['id']!r} is not a BLS type #1 .conf entry "
                f"(path {chosen.get('path')!r}): a unified kernel image carries its own command line"
            )
        return chosen

    def default_path(self, t: Transport) -> str:
        return str(self.default_entry(t)["path"])

    def default_args(self, t: Transport) -> str:
        return BlsEntry(t.read_file(self.default_path(t)).decode()).options()

    # ---- state ---------------------------------------------------------------------------------------
    def _conf_files(self, t: Transport, directory: str) -> list[str]:
        res = t.run(
            [
                "sh",
                "-c",
                'for f in "$1"/*.conf; do [ -f "$f" ] && printf "%s\\n" "$f"; done; true',
                "-",
                directory,
            ],
            timeout_s=30,
        )
        return [p for p in res.stdout.splitlines() if p]

    def snapshot(self, t: Transport) -> State:
        directory = posixpath.dirname(self.default_path(t))
        paths = sorted({*self._conf_files(t, directory), f"{directory}/{TRIAL_ID}"})
        conf = self.loader_conf(t)
        if conf:
            paths.append(conf)
        return {"files": snapshot_files(t, paths), "dir": directory}

    def restore(self, t: Transport, snap: State) -> None:
        files: dict[str, str | None] = dict(snap["files"])
        # systemd-boot renames a counted entry (a+3.conf -> a+2-1.conf) at every boot: put the bytes back into
        # the file that holds that entry now instead of adding a second copy under the old name.
        current = {entry_id(posixpath.basename(p)): p for p in self._conf_files(t, snap["dir"])}
        for path in list(files):
            if files[path] is None or not path.startswith(snap["dir"] + "/"):
                continue
            now = current.get(entry_id(posixpath.basename(path)))
            if now is not None and now != path and now not in files:
                files[now] = files.pop(path)
        restore_files(t, files)
        if self.efivar(t, "LoaderEntryOneShot") == TRIAL_ID:
            t.run(self._bootctl("set-oneshot", ""), timeout_s=30)

    # ---- checks --------------------------------------------------------------------------------------
    def preflight(self, t: Transport) -> list[str]:
        problems = []
        if not command_exists(t, self.bootctl):
            problems.append("bootctl not found: rt-tune needs it to list entries and to arm a one-shot entry")
        else:
            res = t.run(self._bootctl("is-installed"), timeout_s=30, check=False)
            if not res.ok:
                problems.append(
                    f"`bootctl is-installed` says {(res.stdout + res.stderr).strip()[:200]!r}: "
                    "systemd-boot is not installed on the ESP"
                )
        if self.entries_dir(t) is None:
            problems.append(f"no loader entries directory (looked for {', '.join(ENTRIES_DIRS)})")
        if not path_exists(t, self.efivars, "-d"):
            problems.append(f"no EFI variables at {self.efivars}: `bootctl set-oneshot` cannot arm the trial")
        if problems:
            return problems
        return problems + default_args_problems(self, t, 'cannot tell the default entry')

    # ---- changing ------------------------------------------------------------------------------------
    def _trial_text(self, t: Transport, path: str, target: BootTarget) -> BlsEntry:
        base = BlsEntry(t.read_file(path).decode())
        entry = trial_entry(base, target)
        if (key := base.first("sort-key")) is not None:
            # A longer key with the same prefix sorts after the default's (strcmp), never before it.
            entry = entry.with_value("sort-key", f"{key}~rt-tune-trial")
        if target.kernel:
            root = posixpath.dirname(posixpath.dirname(posixpath.dirname(path)))  # ROOT/loader/entries/x.conf
            for key in ("linux", "initrd"):
                for value in (w for v in entry.values(key) for w in v.split() if not w.startswith("$")):
                    if not path_exists(t, posixpath.normpath(f"{root}/{value}"), "-f"):
                        raise BootError(
                            f"{t.label}: {key} {value} of kernel {target.kernel} is not on {root}"
                        )
        return entry

    def stage_trial(self, t: Transport, target: BootTarget) -> None:
        cmdline.validate(target.add)
        default = self.default_entry(t)
        path = str(default["path"])
        entry = self._trial_text(t, path, target)
        trial = f"{posixpath.dirname(path)}/{TRIAL_ID}"
        t.write_file(trial, entry.text.encode(), mode=file_mode(t, path))
        chosen = self.default_entry(t, with_trial=True)
        if chosen["id"] == TRIAL_ID:
            t.run(["rm", "-f", "--", trial], timeout_s=30)
            raise BootError(
                f"{t.label}: systemd-boot would pick {TRIAL_ID} as its default by sort order (nothing "
                f"pins {default['id']}): add `default {default['id']}` to loader.conf, then retry"
            )
        t.run(self._bootctl("set-oneshot", TRIAL_ID), timeout_s=30)

    def _check_kernel(self, t: Transport, path: str, target: BootTarget) -> None:
        version = BlsEntry(t.read_file(path).decode()).first("version")
        if target.kernel and version != target.kernel:
            raise BootError(
                f"{t.label}: the default entry boots {version}, not {target.kernel}: rt-tune only adds "
                f"arguments to the default entry; make {target.kernel}'s entry the default "
                "(`bootctl set-default`), then commit again"
            )

    def commit(self, t: Transport, target: BootTarget) -> None:
        path = self.default_path(t)
        self._check_kernel(t, path, target)
        old = t.read_file(path)
        new = BlsEntry(old.decode()).with_args_added(target.add).text.encode()
        if new != old:
            t.write_file(path, new, mode=file_mode(t, path))
        self.discard(t)

    def discard(self, t: Transport) -> None:
        directory = posixpath.dirname(self.default_path(t))
        t.run(["rm", "-f", "--", f"{directory}/{TRIAL_ID}"], timeout_s=30)
        t.run(self._bootctl("set-oneshot", ""), timeout_s=30)

    def committed(self, t: Transport, target: BootTarget) -> list[str]:
        problems = super().committed(t, target)
        path = self.default_path(t)
        version = BlsEntry(t.read_file(path).decode()).first("version")
        if target.kernel and version != target.kernel:
            problems.append(f"default entry boots {version}, not {target.kernel}")
        if path_exists(t, f"{posixpath.dirname(path)}/{TRIAL_ID}"):
            problems.append(f"the trial entry {TRIAL_ID} is still there")
        return problems
