"""Run a command while a directory is read-only to it, as on a read-only state directory.

root ignores permission bits, so as root the directory is bind-mounted read-only in a private mount namespace
(`unshare -m`); otherwise it is chmod 0555 for the duration. Either way a probe first checks that nothing can be
created in it (the test is skipped, saying why, on a machine that allows neither)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

_MOUNT_RO = 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" "$0" && exec "$@"'


def run_read_only(directory: Path, argv: list[str], **kw) -> subprocess.CompletedProcess:
    """`subprocess.run(argv, **kw)` with `directory` read-only to the process."""
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", 120)

    def run(cmd: list[str]) -> subprocess.CompletedProcess:
        if os.geteuid() == 0:
            cmd = ["unshare", "-m", "sh", "-c", _MOUNT_RO, str(directory), *cmd]
            return subprocess.run(cmd, check=False, **kw)
        mode = directory.stat().st_mode & 0o7777
        directory.chmod(0o555)
        try:
            return subprocess.run(cmd, check=False, **kw)
        finally:
            directory.chmod(mode)

    probe = run(["sh", "-c", 'touch "$0/.probe" 2>/dev/null && echo writable || echo read-only',
                 str(directory)])
    if probe.stdout.strip() != "read-only":
        pytest.skip(f"cannot make {directory} read-only here: {probe.stdout.strip()} {probe.stderr.strip()}")
    return run(argv)
