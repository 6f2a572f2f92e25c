"""Running programs on the controller for the lab: argv lists only, errors that say what failed."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

from orchestrator.core.errors import LabError


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    timeout: float | None = None,
    log: Path | None = None,
    env: dict[str, str] | None = None,
    input: bytes | None = None,
) -> str:
    """Run a program; return stdout. Output goes to `log` when given (for long builds). Raise LabError on failure.

    The program runs in its own process group, and on any exception (Ctrl-C included) the whole group is
    killed, so no debootstrap, dpkg or wget is left writing into a tree that is being removed.
    """
    args = [os.fspath(a) for a in argv]
    full_env = None if env is None else {**os.environ, **env}
    out_fh = open(log, "ab") if log is not None else None
    try:
        if out_fh is not None:
            out_fh.write(("$ " + " ".join(args) + "\n").encode())
            out_fh.flush()
        try:
            proc = subprocess.Popen(
                args, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                stdout=out_fh if out_fh is not None else subprocess.PIPE,
                stderr=subprocess.STDOUT if out_fh is not None else subprocess.PIPE,
                env=full_env, start_new_session=True,
            )
        except FileNotFoundError as exc:
            raise LabError(f"program not found: {args[0]}") from exc
        try:
            stdout, stderr = proc.communicate(input=input, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            _kill_group(proc)
            raise LabError(f"{args[0]} did not finish within {timeout} s: {' '.join(args)}") from exc
        except BaseException:
            _kill_group(proc)
            raise
    finally:
        if out_fh is not None:
            out_fh.close()
    if proc.returncode != 0:
        if log is not None:
            tail = log.read_text(errors="replace").splitlines()[-15:]
            raise LabError(
                f"{args[0]} failed with exit status {proc.returncode}; last lines of {log}:\n" + "\n".join(tail)
            )
        err = (stderr or b"").decode(errors="replace").strip()[-2000:]
        raise LabError(f"{' '.join(args)} failed with exit status {proc.returncode}: {err}")
    return (stdout or b"").decode(errors="replace")


def _kill_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=5)
            # the leader is gone; members may remain: SIGKILL the group once more
        except subprocess.TimeoutExpired:
            continue
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


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
