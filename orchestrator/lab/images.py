"""Lab disk images, built only from Debian packages and cached by recipe.

One debootstrap tree gives two root filesystems (the unit's host VM and its guest VM differ only in which
services are enabled), plus one EFI system partition holding GRUB. The cache key is a hash of the recipe and of
the files copied into the image, so a second `tune lab up` does not rebuild, and a changed recipe does. A build
happens in a temporary directory renamed into place at the end: an interrupted build never leaves a half cache.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from orchestrator.errors import LabError
from orchestrator.events import Event, EventSink, discard
from orchestrator.lab import sh

BUILDER_VERSION = 3  # bump when the build steps change in a way the recipe does not show
FILES_DIR = Path(__file__).parent / "files"
ROLES = ("host", "guest")

BASE_PACKAGES = (
    "systemd", "systemd-sysv", "udev", "dbus", "kmod", "procps", "iproute2", "zstd", "python3",
    "openssh-server", "sudo", "rt-tests", "stress-ng", "systemd-coredump",
    "initramfs-tools", "grub2-common",
)
ARCH_PACKAGES = {
    "amd64": ("linux-image-amd64", "grub-efi-amd64-bin", "qemu-system-x86"),
}
# units enabled per role; the files for both roles are in every image
ROLE_UNITS = {"host": ("rt-guest-vm.service",), "guest": ("mirobot_teleoperate.service",)}
GRUB_EFI = {"amd64": ("x86_64-efi", "BOOTX64.EFI")}
GRUB_MODULES = (
    "part_gpt part_msdos fat ext2 normal configfile search search_fs_file search_fs_uuid search_label "
    "linux loadenv test echo gzio serial terminal efi_gop all_video sleep reboot halt ls cat true"
).split()
EMBEDDED_GRUB_CFG = """\
search --no-floppy --file --set=root /boot/grub/grub.cfg
set prefix=($root)/boot/grub
configfile $prefix/grub.cfg
"""


@dataclass(frozen=True)
class ImageRecipe:
    arch: str = "amd64"
    suite: str = "bookworm"
    mirror: str = "http://deb.debian.org/debian"
    packages: tuple[str, ...] = field(default=())
    disk_gib: int = 4

    @classmethod
    def default(cls, arch: str = "amd64") -> "ImageRecipe":
        if arch not in ARCH_PACKAGES:
            raise LabError(f"no lab image recipe for architecture {arch!r}; known: {', '.join(ARCH_PACKAGES)}")
        return cls(arch=arch, packages=BASE_PACKAGES + ARCH_PACKAGES[arch])

    def key(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps({**asdict(self), "builder": BUILDER_VERSION}, sort_keys=True).encode())
        h.update(Path(__file__).read_bytes())  # the build steps themselves are part of the recipe
        for path in sorted(FILES_DIR.rglob("*")):
            if path.is_file():
                h.update(path.relative_to(FILES_DIR).as_posix().encode())
                h.update(path.read_bytes())
                h.update(oct(path.stat().st_mode & 0o777).encode())
        return f"{self.suite}-{self.arch}-{h.hexdigest()[:16]}"


@dataclass(frozen=True)
class ImageSet:
    """A finished, cached set of images: read-only bases that VMs use through qcow2 overlays."""

    directory: Path
    arch: str
    kernel: str
    root_uuid: dict[str, str]

    def root(self, role: str) -> Path:
        return self.directory / f"root-{role}.raw"

    @property
    def esp(self) -> Path:
        return self.directory / "esp.img"

    @classmethod
    def load(cls, directory: Path) -> "ImageSet":
        manifest = json.loads((directory / "manifest.json").read_text())
        return cls(directory=directory, arch=manifest["arch"], kernel=manifest["kernel"],
                   root_uuid=manifest["root_uuid"])


def cached(recipe: ImageRecipe, cache_dir: Path) -> ImageSet | None:
    final = cache_dir / "images" / recipe.key()
    if (final / "manifest.json").is_file():
        return ImageSet.load(final)
    return None


def ensure_images(recipe: ImageRecipe, cache_dir: Path, events: EventSink = discard) -> ImageSet:
    """Return the cached images for `recipe`, building them first if needed (one builder at a time)."""
    images_dir = cache_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    key = recipe.key()
    found = cached(recipe, cache_dir)
    if found:
        events(Event("lab.build.cached", key, f"using cached images {found.directory}"))
        return found
    with open(images_dir / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another `tune lab up` building the same key: wait for it
        found = cached(recipe, cache_dir)
        if found:
            return found
        _remove_stale_builds(images_dir)
        work = images_dir / f".build-{key}-{os.getpid()}"
        try:
            _build(recipe, work, cache_dir, events)
            os.rename(work / "out", images_dir / key)
        finally:
            sh.remove_tree(work)
    return ImageSet.load(images_dir / key)


def _remove_stale_builds(images_dir: Path) -> None:
    for stale in images_dir.glob(".build-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and Path(f"/proc/{pid}").exists() and int(pid) != os.getpid():
            continue  # a live build of another key
        sh.remove_tree(stale)


def _step(events: EventSink, key: str, n: int, total: int, message: str) -> None:
    events(Event("lab.build.step", key, message, done=n, total=total))


def _build(recipe: ImageRecipe, work: Path, cache_dir: Path, events: EventSink) -> None:
    key = recipe.key()
    tree, out = work / "tree", work / "out"
    out.mkdir(parents=True)
    log = work / "build.log"
    debs = cache_dir / "debs" / f"{recipe.suite}-{recipe.arch}"
    debs.mkdir(parents=True, exist_ok=True)
    total = 4 + len(ROLES)
    t0 = time.monotonic()
    _step(events, key, 0, total, "debootstrap (Debian packages only; ~2 min)")
    try:
        sh.run(
            ["debootstrap", "--variant=minbase", f"--arch={recipe.arch}", f"--cache-dir={debs}",
             "--include=" + ",".join(recipe.packages), recipe.suite, tree, recipe.mirror],
            log=log, timeout=3600,
        )
    except LabError:
        shutil.copy(log, cache_dir / "images" / "last-failed-build.log")
        raise
    _step(events, key, 1, total, "configuring the image")
    kernel = _configure_common(tree)
    _step(events, key, 2, total, "making the EFI system partition with GRUB")
    _make_esp(tree, out / "esp.img", recipe.arch, log)
    root_uuid = {}
    for i, role in enumerate(ROLES):
        _step(events, key, 3 + i, total, f"root filesystem for the {role} VM")
        root_uuid[role] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"rt-tune:{key}:{role}"))
        _configure_role(tree, role, root_uuid[role], log)
        sh.run(["mkfs.ext4", "-q", "-F", "-L", f"rt-{role}", "-U", root_uuid[role], "-d", tree,
                out / f"root-{role}.raw", f"{recipe.disk_gib}G"], log=log, timeout=900)
        _unconfigure_role(tree, role)
    manifest = {"recipe": asdict(recipe), "key": key, "arch": recipe.arch, "kernel": kernel,
                "root_uuid": root_uuid, "build_seconds": round(time.monotonic() - t0, 1),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for f in out.iterdir():
        f.chmod(0o444)  # bases are only ever used through overlays
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    _step(events, key, total, total, f"images built in {manifest['build_seconds']} s")


def _chroot(tree: Path, *argv: str, log: Path, env: dict[str, str] | None = None) -> None:
    sh.run(["chroot", tree, *argv], log=log, env={"LC_ALL": "C", **(env or {})}, timeout=600)


def _copy_files(src: Path, tree: Path) -> None:
    for path in sorted(src.rglob("*")):
        dest = tree / path.relative_to(src)
        if path.is_dir():
            dest.mkdir(parents=True, exist_ok=True)
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest)
            os.chown(dest, 0, 0)


def _configure_common(tree: Path) -> str:
    log = tree.parent / "build.log"
    for part in ("common", *ROLES):
        _copy_files(FILES_DIR / part, tree)
    os.chmod(tree / "etc/sudoers.d/tuner", 0o440)
    (tree / "etc/resolv.conf").unlink(missing_ok=True)
    (tree / "etc/resolv.conf").write_text("nameserver 10.0.2.3\n")  # QEMU user networking's DNS
    (tree / "etc/hosts").write_text("127.0.0.1\tlocalhost\n127.0.1.1\trtlab\n::1\tlocalhost ip6-localhost\n")
    for key in (tree / "etc/ssh").glob("ssh_host_*"):
        key.unlink()  # each lab provides its own host key through fw_cfg
    _chroot(tree, "useradd", "--create-home", "--shell", "/bin/bash", "--groups", "sudo", "tuner", log=log)
    _chroot(tree, "usermod", "--password", "*", "tuner", log=log)  # no password, not locked: key login only
    _chroot(tree, "systemctl", "enable", "systemd-networkd.service", "rt-lab-provision.service", log=log)
    # nothing a robot unit needs at boot, and slow under emulation
    _chroot(tree, "systemctl", "mask", "e2scrub_reap.service", "e2scrub_all.timer", log=log)
    (tree / "boot/grub").mkdir(parents=True, exist_ok=True)
    _chroot(tree, "grub-editenv", "/boot/grub/grubenv", "create", log=log)
    for d in (tree / "usr/lib/grub").iterdir():
        if d.is_dir() and d.name.endswith("-efi"):
            shutil.copytree(d, tree / "boot/grub" / d.name, dirs_exist_ok=True)  # what grub-install would copy
    shutil.rmtree(tree / "var/cache/apt/archives", ignore_errors=True)
    (tree / "var/cache/apt/archives/partial").mkdir(parents=True)
    kernels = sorted(p.name.removeprefix("vmlinuz-") for p in (tree / "boot").glob("vmlinuz-*"))
    if not kernels:
        raise LabError("the image has no kernel in /boot; is linux-image-* in the recipe?")
    return kernels[-1]


FAKE_GRUB_PROBE = """#!/bin/sh
# Build-time stand-in for grub-probe: a chroot has no block device behind /, so answer what the VM will see.
# The real grub-probe is restored right after grub-mkconfig; inside the VM, update-grub uses the real one.
target=
while [ $# -gt 0 ]; do
  case "$1" in
    --target=*) target=${1#--target=} ;;
    -t|--target) shift; target=$1 ;;
  esac
  shift
done
case "$target" in
  device) echo /dev/vda ;;
  fs) echo ext2 ;;
  fs_uuid) echo @UUID@ ;;
  partuuid|partmap|abstraction|compatibility_hint|hints_string|cryptodisk_uuid) ;;
  drive) echo '(hd0)' ;;
  *) echo "fake grub-probe: unknown target $target" >&2; exit 1 ;;
esac
"""


def _configure_role(tree: Path, role: str, root_uuid: str, log: Path) -> None:
    (tree / "etc/fstab").write_text(f"UUID={root_uuid}\t/\text4\terrors=remount-ro\t0\t1\n")
    (tree / "etc/hostname").write_text(f"rtlab-{role}\n")
    (tree / "etc/machine-id").write_text(uuid.uuid5(uuid.NAMESPACE_URL, f"rt-tune:{root_uuid}").hex + "\n")
    if ROLE_UNITS[role]:
        _chroot(tree, "systemctl", "enable", *ROLE_UNITS[role], log=log)
    probe = tree / "usr/sbin/grub-probe"
    real = probe.with_name("grub-probe.real")
    # grub.cfg must be exactly what update-grub writes inside the VM (rt-tune refuses a stale grub.cfg): 10_linux
    # uses root=UUID= only when /dev/disk/by-uuid/UUID exists, so it exists during the build; the UEFI
    # "firmware settings" entry depends on efivars a chroot lacks, so that generator is switched off for good.
    by_uuid = tree / "dev/disk/by-uuid" / root_uuid
    by_uuid.parent.mkdir(parents=True, exist_ok=True)
    by_uuid.touch()
    (tree / "etc/grub.d/30_uefi-firmware").chmod(0o644)
    os.rename(probe, real)
    try:
        probe.write_text(FAKE_GRUB_PROBE.replace("@UUID@", root_uuid))
        probe.chmod(0o755)
        _chroot(tree, "grub-mkconfig", "-o", "/boot/grub/grub.cfg", log=log)
    finally:
        os.replace(real, probe)
        shutil.rmtree(tree / "dev/disk")
    # the initial default, as `grub-set-default 0` would leave it on a freshly installed unit
    _chroot(tree, "grub-editenv", "/boot/grub/grubenv", "set", "saved_entry=0", log=log)


def _unconfigure_role(tree: Path, role: str) -> None:
    log = tree.parent / "build.log"
    if ROLE_UNITS[role]:
        _chroot(tree, "systemctl", "disable", *ROLE_UNITS[role], log=log)


def _make_esp(tree: Path, esp: Path, arch: str, log: Path) -> None:
    """A FAT image with EFI/BOOT/BOOT*.EFI: GRUB, which loads the root disk's own /boot/grub/grub.cfg."""
    target, efi_name = GRUB_EFI[arch]
    (tree / "tmp/embed.cfg").write_text(EMBEDDED_GRUB_CFG)
    _chroot(tree, "grub-mkimage", "-d", f"/usr/lib/grub/{target}", "-O", target, "-o", f"/tmp/{efi_name}",
            "-p", "/boot/grub", "-c", "/tmp/embed.cfg", *GRUB_MODULES, log=log)
    with open(esp, "wb") as fh:
        fh.truncate(64 * 1024 * 1024)
    sh.run(["mformat", "-i", esp, "-F", "-v", "ESP", "::"], log=log)
    sh.run(["mmd", "-i", esp, "::/EFI", "::/EFI/BOOT"], log=log)
    sh.run(["mcopy", "-i", esp, tree / "tmp" / efi_name, f"::/EFI/BOOT/{efi_name}"], log=log)
    (tree / "tmp" / efi_name).unlink()
    (tree / "tmp/embed.cfg").unlink()
