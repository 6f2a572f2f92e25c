"""Running programs on the controller for the lab: argv lists only, errors that say what failed."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from orchestrator.errors import LabError


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    timeout: float | None = None,
    log: Path | None = None,
    env: dict[str, str] | None = None,
    input: bytes | None = None,
) -> str:
    """Run a program; return stdout. Output goes to `log` when given (for long builds). Raise LabError on failure."""
    args = [os.fspath(a) for a in argv]
    full_env = None if env is None else {**os.environ, **env}
    try:
        if log is not None:
            with open(log, "ab") as fh:
                fh.write(("$ " + " ".join(args) + "\n").encode())
                fh.flush()
                proc = subprocess.run(
                    args, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout, env=full_env, input=input
                )
            if proc.returncode != 0:
                tail = log.read_text(errors="replace").splitlines()[-15:]
                raise LabError(
                    f"{args[0]} failed with exit status {proc.returncode}; last lines of {log}:\n" + "\n".join(tail)
                )
            return ""
        proc = subprocess.run(args, capture_output=True, timeout=timeout, env=full_env, input=input)
    except subprocess.TimeoutExpired as exc:
        raise LabError(f"{args[0]} did not finish within {timeout} s: {' '.join(args)}") from exc
    except FileNotFoundError as exc:
        raise LabError(f"program not found: {args[0]}") from exc
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()[-2000:]
        raise LabError(f"{' '.join(args)} failed with exit status {proc.returncode}: {err}")
    return proc.stdout.decode(errors="replace")


def mounts_below(path: Path) -> list[str]:
    """Mount points at or below `path`, deepest first (what debootstrap or a chroot may leave behind)."""
    root = os.path.realpath(path)
    found = []
    with open("/proc/self/mounts") as fh:
        for line in fh:
            mnt = line.split()[1].replace("\\040", " ")
            if mnt == root or mnt.startswith(root + "/"):
                found.append(mnt)
    return sorted(found, key=len, reverse=True)


def remove_tree(path: Path) -> None:
    """Remove a build directory safely: unmount what is mounted inside it first, never cross filesystems."""
    if not path.exists():
        return
    for mnt in mounts_below(path):
        subprocess.run(["umount", "-l", mnt], capture_output=True)
    subprocess.run(["rm", "-rf", "--one-file-system", os.fspath(path)], capture_output=True)
    if path.exists():
        raise LabError(f"could not remove {path}; something is still mounted below it?")
