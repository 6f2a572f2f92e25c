"""What the lab needs on the controller, and which Debian package provides it."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from orchestrator.core.errors import MissingDependencyError

README_HINT = "run the README's first set-up command, or: apt-get install -y {pkgs}"


@dataclass(frozen=True)
class Requirement:
    what: str  # a program on PATH, or an absolute file path
    package: str  # the Debian package that provides it
    purpose: str

    @property
    def is_file(self) -> bool:
        return self.what.startswith("/")


X86_LAB = (
    Requirement("qemu-system-x86_64", "qemu-system-x86", "run the lab VMs"),
    Requirement("qemu-img", "qemu-utils", "make copy-on-write overlays of the cached disks"),
    Requirement("/usr/share/OVMF/OVMF_CODE_4M.fd", "ovmf", "UEFI firmware the VMs boot through"),
    Requirement("/usr/share/OVMF/OVMF_VARS_4M.fd", "ovmf", "UEFI variable store template"),
    Requirement("debootstrap", "debootstrap", "build the Debian images"),
    Requirement("mkfs.ext4", "e2fsprogs", "turn the image tree into a root filesystem"),
    Requirement("mformat", "mtools", "make the EFI system partition image"),
    Requirement("mcopy", "mtools", "copy GRUB into the EFI system partition image"),
    Requirement("ssh", "openssh-client", "`tune lab ssh`"),
    Requirement("ssh-keygen", "openssh-client", "make the lab's SSH keys"),
)


ARM64_LAB = (
    Requirement("qemu-system-aarch64", "qemu-system-arm", "run the arm64 lab's host VM (with EL2 for nested KVM)"),
    Requirement("/usr/share/AAVMF/AAVMF_CODE.fd", "qemu-efi-aarch64", "UEFI firmware the arm64 VM boots through"),
    Requirement("/usr/share/AAVMF/AAVMF_VARS.fd", "qemu-efi-aarch64", "UEFI variable store template (arm64)"),
    Requirement("qemu-aarch64-static", "qemu-user-static", "run arm64 programs while building the arm64 image"),
    Requirement("update-binfmts", "binfmt-support", "register qemu-user for arm64 programs (binfmt_misc)"),
    *[r for r in X86_LAB if r.package not in ("qemu-system-x86", "ovmf")],
)
LAB = {"amd64": X86_LAB, "arm64": ARM64_LAB}


def missing(
    requirements: tuple[Requirement, ...] = X86_LAB,
    *,
    which: Callable[[str], str | None] = shutil.which,
    exists: Callable[[str], bool] = lambda p: Path(p).exists(),
) -> list[Requirement]:
    return [r for r in requirements if not (exists(r.what) if r.is_file else which(r.what))]


def check(requirements: tuple[Requirement, ...] = X86_LAB, **probes) -> None:
    """Raise MissingDependencyError naming every missing Debian package, what needs it, and the fix."""
    absent = missing(requirements, **probes)
    if not absent:
        return
    pkgs = sorted({r.package for r in absent})
    lines = [f"  {r.what}: Debian package {r.package} (needed to {r.purpose})" for r in absent]
    raise MissingDependencyError(
        "the lab needs Debian packages that are not installed: "
        + ", ".join(pkgs)
        + "\n"
        + "\n".join(lines)
        + "\n"
        + README_HINT.format(pkgs=" ".join(pkgs))
    )
