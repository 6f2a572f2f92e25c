"""Remote checks and file helpers shared by the bootloader backends of this package."""

from __future__ import annotations

import posixpath

from orchestrator.boot import cmdline
from orchestrator.boot.loader import BootError
from orchestrator.remote.transport import Transport

# --------------------------------------------------------------------------------------------------------


def command_exists(t: Transport, name: str) -> bool:
    return t.run(["sh", "-c", 'command -v "$1" >/dev/null', "-", name], timeout_s=30, check=False).ok


def path_exists(t: Transport, path: str, test: str = "-e") -> bool:
    return t.run(["test", test, path], timeout_s=30, check=False).ok


def file_mode(t: Transport, path: str, default: int = 0o644) -> int:
    """The permission bits of `path` (for writing it, or a sibling, back with the same mode: on a FAT ESP
    chmod to any other mode than the mount's fails)."""
    res = t.run(["stat", "-c", "%a", "--", path], timeout_s=30, check=False)
    return int(res.stdout.strip(), 8) if res.ok and res.stdout.strip() else default


def remove_file(t: Transport, path: str) -> None:
    """Remove `path` and then its directory if that is left empty (a drop-in directory rt-tune created)."""
    t.run(["rm", "-f", "--", path], timeout_s=30)
    t.run(["rmdir", "--ignore-fail-on-non-empty", "--", posixpath.dirname(path)], timeout_s=30, check=False)


def panic_problem(args: str) -> str | None:
    """Why `args` would let a panicking trial kernel hang instead of resetting (None: panic=N, N != 0)."""
    try:
        toks = cmdline.split(args)
    except cmdline.CmdlineError as exc:
        return str(exc)
    panic = [tok for tok in toks if cmdline.key_of(tok) == "panic"]
    value = panic[-1].partition("=")[2] if panic else ""
    if not value.lstrip("-").isdigit() or int(value) == 0:
        return (
            "the default arguments have no panic=N (N != 0): a trial kernel that panics would hang instead "
            "of resetting into the old default"
        )
    return None


def kernel_version_of(path: str) -> str | None:
    """The release in a kernel file name as Debian/Fedora name them (`vmlinuz-6.1.0-28-arm64` ->
    `6.1.0-28-arm64`): everything after the first '-' of the base name (u-boot-update does the same)."""
    base = posixpath.basename(path)
    _, sep, version = base.partition("-")
    return version if sep and version else None


def swap_version(paths: list[str], old: str, new: str) -> list[str]:
    """`paths` with the release `old` replaced by `new` (in the base name and in directory names)."""
    if not old or not new:
        raise BootError("cannot swap kernel releases: empty release")
    out = []
    for path in paths:
        if old not in path:
            raise BootError(f"{path!r} does not name release {old!r}: cannot derive the path of {new}")
        out.append(path.replace(old, new))
    return out


UNSAFE_FS = {"btrfs", "zfs", "f2fs", "nfs", "nfs4", "tmpfs", "overlay", "squashfs"}


def grubenv_location_problems(t: Transport, grubenv: str) -> list[str]:
    """Why GRUB could not write `grubenv` at boot (it writes the file's blocks in place, which Btrfs, ZFS,
    LVM and md RAID do not allow): then a one-shot entry would never be cleared."""
    src = t.run(["findmnt", "-no", "FSTYPE,SOURCE", "-T", grubenv], timeout_s=30, check=False)
    fstype, source = (src.stdout.split() + ["", ""])[:2]
    problems = []
    if fstype in UNSAFE_FS:
        problems.append(f"grubenv is on {fstype}: GRUB cannot write it at boot, so the one-shot entry would "
                        "never be cleared")
    if source.startswith(("/dev/mapper/", "/dev/md", "/dev/dm-")):
        problems.append(f"grubenv is on {source} (LVM or RAID): GRUB cannot write it at boot")
    return problems


def default_args_problems(loader, t: Transport, what: str = "cannot read the default entry") -> list[str]:
    """Preflight of a backend's default entry: it can be read, and it reboots a panicking kernel (panic=N)."""
    try:
        args = loader.default_args(t)
    except Exception as exc:  # noqa: BLE001 - every failure here is a reason, reported as such
        return [f"{what}: {exc}"]
    p = panic_problem(args)
    return [] if p is None else [p]
