"""Kernel artifacts on a unit: install a kernel package (a .deb from the controller, or a package from the
unit's own repositories) so a trial boot can try it, and remove it again on rollback.

Installing a kernel re-sorts GRUB's menu (a newer version becomes the first entry), so before installing,
the default is pinned to the current kernel's entry by its stable id (`pin_default`): installing alone never
changes what boots by default; only a commit after a healthy trial does.
"""

from __future__ import annotations

import hashlib
import shlex
from pathlib import Path

from orchestrator.boot.loader import BootError
from orchestrator.remote.transport import Transport

REMOTE_DIR = "/var/cache/rt-tune/kernels"
ENV = ["env", "DEBIAN_FRONTEND=noninteractive"]


def kernel_present(c: Transport, release: str) -> bool:
    res = c.run(["sh", "-c", 'ls /boot/vmlinuz-"$1" /boot/Image-"$1" /boot/vmlinux-"$1" 2>/dev/null | head -1',
                 "-", release], timeout_s=30, check=False)
    return bool(res.stdout.strip())


def package_of(artifact: dict) -> str:
    if artifact.get("deb"):
        from orchestrator.boot.artifact import inspect_deb

        return inspect_deb(artifact["deb"], artifact.get("release")).package
    return str(artifact["package"])


def install_kernel(c: Transport, artifact: dict, release: str, loader) -> None:
    """Install the artifact (after pinning the current default); checks that /boot has the new kernel."""
    if hasattr(loader, "pin_default"):
        loader.pin_default(c)
    if kernel_present(c, release):
        return  # already installed (by the unit's image, or by hand): nothing to install, nothing to purge later
    if artifact.get("deb"):
        path = Path(artifact["deb"])
        data = path.read_bytes()
        remote = f"{REMOTE_DIR}/{hashlib.sha256(data).hexdigest()[:16]}-{path.name}"
        c.run(["mkdir", "-p", REMOTE_DIR], timeout_s=30)
        c.write_file(remote, data)
        c.run([*ENV, "dpkg", "-i", remote], timeout_s=1200)
        c.run(["rm", "-f", "--", remote], timeout_s=30)
    else:
        c.run([*ENV, "apt-get", "install", "-y", "--no-install-recommends", str(artifact["package"])],
              timeout_s=1800)
    if not kernel_present(c, release):
        raise BootError(f"{c.label}: installed {shlex.quote(package_of(artifact))} but /boot has no kernel "
                        f"{release}: is `release` right?")


def remove_kernel(c: Transport, package: str) -> None:
    """Purge a kernel package rt-tune installed (never one that was there before)."""
    c.run([*ENV, "dpkg", "--purge", package], timeout_s=1200)
