"""Lab disk images, built only from Debian packages and cached by recipe.

One debootstrap tree gives two root filesystems (the unit's host VM and its guest VM differ only in which
services are enabled), plus one EFI system partition holding GRUB. On arm64 the guest is nested: the host VM
runs it with KVM, so the guest's root filesystem (and its kernel, booted with QEMU's -kernel/-append) is a
file inside the host's. A foreign architecture is built with `debootstrap --foreign` and a second stage under
qemu-user (binfmt_misc); its initramfs holds only the modules a virtio disk needs, since mkinitramfs under
emulation is the slow part of that build. The cache key is a hash of the recipe and of
the files copied into the image, so a second `tune lab up` does not rebuild, and a changed recipe does. A build
happens in a temporary directory renamed into place at the end: an interrupted build never leaves a half cache.
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import json
import lzma
import os
import platform
import posixpath
import re
import shutil
import tempfile
import time
import urllib.request
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, cast

from orchestrator.core.errors import LabError
from orchestrator.core.events import Event, EventSink, discard
from orchestrator.lab import sh

BUILDER_VERSION = 6  # bump when the build steps change in a way the recipe does not show
FILES_DIR = Path(__file__).parent / "files"
ROLES = ("host", "guest")

BASE_PACKAGES = (
    "systemd", "systemd-sysv", "udev", "dbus", "kmod", "procps", "iproute2", "zstd", "python3",
    "openssh-server", "sudo", "rt-tests", "stress-ng", "systemd-coredump",
    "initramfs-tools", "grub2-common",
    # installed, not enabled: the irqbalance change's drop-in path is tested on a real irqbalance, and no other
    # test has IRQs moved under it (Debian has no stalld package in bookworm)
    "irqbalance",
)
ARCH_PACKAGES = {
    "amd64": ("linux-image-amd64", "grub-efi-amd64-bin", "qemu-system-x86"),
    "arm64": ("linux-image-arm64", "grub-efi-arm64-bin", "qemu-system-arm"),
}
# A second, newer kernel from this suite (its `linux-image-ARCH` metapackage's kernel, resolved at build time):
# arm64 needs >= 6.11 for kvm-arm.wf{i,e}_trap_policy, and keeps bookworm's 6.1 for the patched-kernel path.
NEW_KERNEL_SUITE = {"arm64": "bookworm-backports"}
NESTED_GUEST_ARCHES = ("arm64",)  # the guest runs inside the host VM with KVM (nested virtualization)
NATIVE_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}
QEMU_USER_BINFMT = {"arm64": "qemu-aarch64", "amd64": "qemu-x86_64"}
# modules the initramfs needs to mount a virtio root disk (MODULES=list during a foreign build)
INITRAMFS_MODULES = ("virtio_pci", "virtio_mmio", "virtio_blk", "ext4")
# What a lab unit does not need at boot, masked: each costs seconds under TCG (measured with systemd-analyze
# blame, benchmarks/lab_bench.py). Kept: systemd, udev, journald, logind, networkd, sshd, the watchdog, tracefs
# and debugfs (tune diagnose), systemd-coredump (the crash-looping service), GRUB from disk.
MASKED_UNITS = (
    "e2scrub_reap.service", "e2scrub_all.timer", "fstrim.timer", "apt-daily.timer", "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer", "systemd-tmpfiles-clean.timer",  # periodic jobs that would run inside measurements
    "getty.target", "serial-getty@.service", "getty@.service",  # nobody logs in on a console
    "modprobe@drm.service", "modprobe@fuse.service", "modprobe@dm_mod.service", "modprobe@loop.service",
    "modprobe@efi_pstore.service", "modprobe@configfs.service", "sys-kernel-config.mount",
    "sys-fs-fuse-connections.mount", "dev-hugepages.mount", "dev-mqueue.mount",
    "systemd-binfmt.service", "proc-sys-fs-binfmt_misc.automount", "systemd-pstore.service",
)
NESTED_GUEST_DIR = "var/lib/rt-lab/guest"  # inside the host's root: the nested guest's disk and kernel
NESTED_GUEST_DISK_GIB = 2
# units enabled per role; the files for both roles are in every image
ROLE_UNITS = {"host": ("rt-guest-vm.service",), "guest": ("mirobot_teleoperate.service",)}
GRUB_EFI = {"amd64": ("x86_64-efi", "BOOTX64.EFI"), "arm64": ("arm64-efi", "BOOTAA64.EFI")}
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
    new_kernel_suite: str | None = None
    nested_guest: bool = False

    @classmethod
    def default(cls, arch: str = "amd64") -> ImageRecipe:
        if arch not in ARCH_PACKAGES:
            raise LabError(f"no lab image recipe for architecture {arch!r}; known: {', '.join(ARCH_PACKAGES)}")
        nested = arch in NESTED_GUEST_ARCHES
        return cls(arch=arch, packages=BASE_PACKAGES + ARCH_PACKAGES[arch], disk_gib=7 if nested else 4,
                   new_kernel_suite=NEW_KERNEL_SUITE.get(arch), nested_guest=nested)

    def key(self) -> str:
        h = hashlib.sha256()
        h.update(json.dumps({**asdict(self), "builder": BUILDER_VERSION}, sort_keys=True).encode())
        h.update(Path(__file__).read_bytes())  # the build steps themselves are part of the recipe
        for path in sorted(p for d in file_dirs(self.arch) for p in d.rglob("*")):
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
    nested_guest: bool = False
    kernels: tuple[str, ...] = ()

    def root(self, role: str) -> Path:
        return self.directory / f"root-{role}.raw"  # (a nested guest's is inside its host's)

    @property
    def esp(self) -> Path:
        return self.directory / "esp.img"

    @classmethod
    def load(cls, directory: Path) -> ImageSet:
        manifest = json.loads((directory / "manifest.json").read_text())
        return cls(directory=directory, arch=manifest["arch"], kernel=manifest["kernel"],
                   root_uuid=manifest["root_uuid"], nested_guest=manifest.get("nested_guest", False),
                   kernels=tuple(manifest.get("kernels", (manifest["kernel"],))))


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
    foreign = recipe.arch != NATIVE_ARCH.get(platform.machine(), platform.machine())
    roles = ("guest", "host") if recipe.nested_guest else ROLES  # a nested guest's disk goes into the host's
    total = 4 + len(roles)
    t0 = time.monotonic()
    new_kernel = None
    if recipe.new_kernel_suite:
        ref = newest_kernel(recipe.mirror, recipe.new_kernel_suite, recipe.arch)
        new_kernel = fetch_deb(recipe.mirror, ref, debs)
    argv = ["debootstrap", "--variant=minbase", f"--arch={recipe.arch}", f"--cache-dir={debs}",
            "--include=" + ",".join(recipe.packages)]
    if foreign:
        ensure_binfmt(recipe.arch)
        argv.append("--foreign")
    _step(events, key, 0, total, "debootstrap (Debian packages only; "
          + ("~7 min: a foreign architecture's second stage runs under qemu-user)" if foreign else "~2 min)"))
    try:
        sh.run([*argv, recipe.suite, tree, recipe.mirror], log=log, timeout=3600)
        if foreign:
            # before any kernel's postinst: an initramfs with only what a virtio root disk needs
            modules_d = tree / "usr/share/initramfs-tools/modules.d"
            modules_d.mkdir(parents=True, exist_ok=True)
            (modules_d / "rt-lab").write_text("\n".join(INITRAMFS_MODULES) + "\n")
            (tree / "etc/initramfs-tools/conf.d").mkdir(parents=True, exist_ok=True)
            (tree / "etc/initramfs-tools/conf.d/50-rt-lab.conf").write_text("MODULES=list\n")
            repacked = repack_debs_uncompressed(tree)
            _step(events, key, 0, total, f"{repacked} packages decompressed natively for the second stage")
            unsafe_io = tree / "etc/dpkg/dpkg.cfg.d/99-rt-lab-build"
            unsafe_io.parent.mkdir(parents=True, exist_ok=True)
            unsafe_io.write_text("force-unsafe-io\n")  # no fsync per file: the tree becomes an image anyway
            try:
                sh.run(["chroot", tree, "/debootstrap/debootstrap", "--second-stage"], log=log, timeout=3600,
                       env={"LC_ALL": "C"})
            finally:
                unsafe_io.unlink(missing_ok=True)
        if new_kernel:
            shutil.copy(new_kernel, tree / "tmp" / new_kernel.name)
            _chroot(tree, "dpkg", "-i", f"/tmp/{new_kernel.name}", log=log, timeout=1800)
            (tree / "tmp" / new_kernel.name).unlink()
    except LabError:
        shutil.copy(log, cache_dir / "images" / "last-failed-build.log")
        raise
    _step(events, key, 1, total, "configuring the image")
    kernel = _configure_common(tree, recipe.arch, foreign)
    _step(events, key, 2, total, "making the EFI system partition with GRUB")
    _make_esp(tree, out / "esp.img", recipe.arch, log)
    root_uuid = {}
    for i, role in enumerate(roles):
        _step(events, key, 3 + i, total, f"root filesystem for the {role} VM")
        root_uuid[role] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"rt-tune:{key}:{role}"))
        if recipe.nested_guest and role == "guest":
            _nested_guest_disk(tree, root_uuid[role], kernel, work, log)
            continue
        _configure_role(tree, role, root_uuid[role], log)
        sh.run(["mkfs.ext4", "-q", "-F", "-L", f"rt-{role}", "-U", root_uuid[role], "-d", tree,
                out / f"root-{role}.raw", f"{recipe.disk_gib}G"], log=log, timeout=900)
        _unconfigure_role(tree, role)
    manifest = {"recipe": asdict(recipe), "key": key, "arch": recipe.arch, "kernel": kernel,
                "kernels": _kernels(tree), "nested_guest": recipe.nested_guest,
                "root_uuid": root_uuid, "build_seconds": round(time.monotonic() - t0, 1),
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for f in out.iterdir():
        f.chmod(0o444)  # bases are only ever used through overlays
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    _step(events, key, total, total, f"images built in {manifest['build_seconds']} s")


@dataclass(frozen=True)
class DebRef:
    package: str
    filename: str  # path in the mirror's pool
    sha256: str


def newest_kernel(mirror: str, suite: str, arch: str) -> DebRef:
    """The kernel package that `suite`'s linux-image-ARCH metapackage depends on (e.g. bookworm-backports'
    linux-image-6.12.73+deb12-arm64). It is installed with dpkg after debootstrap: debootstrap's
    --extra-suites would take other packages from that suite too (and break systemd)."""
    url = f"{mirror}/dists/{suite}/main/binary-{arch}/Packages.xz"
    try:
        with urllib.request.urlopen(url, timeout=60) as resp:
            text = lzma.decompress(resp.read()).decode(errors="replace")
    except (OSError, lzma.LZMAError) as exc:
        raise LabError(f"cannot read {url} to find {suite}'s kernel: {exc}") from exc
    return kernel_from_packages_index(text, arch, url)


def kernel_from_packages_index(text: str, arch: str, where: str) -> DebRef:
    stanzas: dict[str, list[dict[str, str]]] = {}
    for stanza in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines() if ": " in line and line[0] != " ")
        if "Package" in fields:
            stanzas.setdefault(fields["Package"], []).append(fields)
    meta = f"linux-image-{arch}"
    for fields in stanzas.get(meta, []):
        name = fields.get("Depends", "").split(",")[0].split("|")[0].split("(")[0].strip()
        if name.startswith("linux-image-") and name in stanzas:
            pkg = stanzas[name][-1]
            return DebRef(package=name, filename=pkg["Filename"], sha256=pkg["SHA256"])
    raise LabError(f"{where}: no {meta} package depending on a linux-image-* package listed there")


def fetch_deb(mirror: str, ref: DebRef, cache: Path) -> Path:
    """Download a .deb once into the build's package cache, checked against the index's SHA256."""
    dest = cache / posixpath.basename(ref.filename)
    if dest.exists() and hashlib.sha256(dest.read_bytes()).hexdigest() == ref.sha256:
        return dest
    tmp = dest.with_suffix(".part")
    try:
        with urllib.request.urlopen(f"{mirror}/{ref.filename}", timeout=120) as resp, open(tmp, "wb") as fh:
            shutil.copyfileobj(resp, fh)
    except OSError as exc:
        raise LabError(f"cannot download {mirror}/{ref.filename}: {exc}") from exc
    if hashlib.sha256(tmp.read_bytes()).hexdigest() != ref.sha256:
        tmp.unlink()
        raise LabError(f"{mirror}/{ref.filename}: SHA256 differs from the suite's Packages index")
    os.replace(tmp, dest)
    return dest


AR_MAGIC = b"!<arch>\n"
DECOMPRESSED = (".xz", ".gz")  # what Python decompresses here (a .zst member is left compressed)


def repack_debs_uncompressed(tree: Path) -> int:
    """Decompress the members of the .debs a foreign second stage will unpack (debootstrap's `debpaths`), here,
    natively: dpkg under qemu-user then reads plain `control.tar`/`data.tar` (dpkg-deb accepts them) instead of
    running xz emulated, which was about 210 s of a 480 s arm64 second stage. What dpkg installs is the same
    files; the .debs themselves are deleted before the image is made. Returns how many were rewritten."""
    listing = tree / "debootstrap" / "debpaths"
    count = 0
    for line in listing.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and repack_deb_uncompressed(tree / parts[1].lstrip("/")):
            count += 1
    return count


def repack_deb_uncompressed(deb: Path) -> bool:
    """Rewrite one .deb (an ar archive) with its `.xz`/`.gz` members decompressed; False if nothing was
    compressed that way (a `.zst` member, say, is left as it is). Written beside it and renamed over it."""
    members = _ar_members(deb)
    if not any(Path(name).suffix in DECOMPRESSED for name, _, _ in members):
        return False
    tmp = deb.with_name(deb.name + ".plain")
    try:
        _write_plain(deb, members, tmp)
    except (OSError, EOFError, lzma.LZMAError) as exc:  # gzip.BadGzipFile is an OSError
        tmp.unlink(missing_ok=True)
        raise LabError(f"{deb}: cannot decompress its members: {exc}") from exc
    os.replace(tmp, deb)
    return True


def _write_plain(deb: Path, members: list[tuple[str, int, int]], tmp: Path) -> None:
    with deb.open("rb") as src, tmp.open("wb") as out:
        out.write(AR_MAGIC)
        for name, offset, size in members:
            suffix = Path(name).suffix
            src.seek(offset)
            if suffix in DECOMPRESSED:
                member = cast(IO[bytes], _Slice(src, size))
                opened = lzma.open(member) if suffix == ".xz" else gzip.open(member)
                with opened as z, tempfile.TemporaryFile() as plain:
                    shutil.copyfileobj(z, plain, 1 << 20)
                    _ar_header(out, name.removesuffix(suffix), plain.tell())
                    plain.seek(0)
                    shutil.copyfileobj(plain, out, 1 << 20)
                    length = plain.tell()
            else:
                _ar_header(out, name, size)
                shutil.copyfileobj(_Slice(src, size), out, 1 << 20)
                length = size
            if length % 2:
                out.write(b"\n")


def _ar_members(path: Path) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of each member of a plain ar archive (a .deb's format)."""
    members = []
    with path.open("rb") as fh:
        if fh.read(8) != AR_MAGIC:
            raise LabError(f"{path}: not a Debian package (no ar header)")
        while header := fh.read(60):
            if len(header) < 60 or header[58:60] != b"`\n":
                raise LabError(f"{path}: truncated or damaged ar member header at byte {fh.tell() - len(header)}")
            name = header[:16].decode("ascii", "replace").strip().removesuffix("/")
            try:
                size = int(header[48:58].decode("ascii").strip())
            except ValueError:
                raise LabError(f"{path}: ar member {name!r} has no size ({header[48:58]!r})") from None
            members.append((name, fh.tell(), size))
            fh.seek(size + size % 2, os.SEEK_CUR)
    return members


def _ar_header(out, name: str, size: int) -> None:
    if len(name) > 16:
        raise LabError(f"ar member name {name!r} is longer than 16 characters")
    out.write(f"{name:<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{size:<10}`\n".encode("ascii"))


class _Slice:
    """A read-only view of `size` bytes of an open file from its current position (one ar member)."""

    def __init__(self, fh, size: int) -> None:
        self.fh, self.left = fh, size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = self.fh.read(n)
        self.left -= len(data)
        return data


def ensure_binfmt(arch: str) -> None:
    """A foreign second stage runs the target's binaries through qemu-user: binfmt_misc must know them."""
    name = QEMU_USER_BINFMT[arch]
    binfmt = Path("/proc/sys/fs/binfmt_misc")
    if not (binfmt / "register").exists():
        sh.run(["mount", "-t", "binfmt_misc", "binfmt_misc", binfmt])
    if not (binfmt / name).exists():
        sh.run(["update-binfmts", "--enable", name])
    if not (binfmt / name).exists() or "enabled" not in (binfmt / name).read_text():
        raise LabError(f"binfmt_misc has no enabled {name} entry; install qemu-user-static and binfmt-support")


def _kernels(tree: Path) -> list[str]:
    def version_key(v: str) -> list:
        return [int(p) if p.isdigit() else p for p in re.split(r"[.+-]", v)]
    return sorted((p.name.removeprefix("vmlinuz-") for p in (tree / "boot").glob("vmlinuz-*")), key=version_key)


def _chroot(tree: Path, *argv: str, log: Path, env: dict[str, str] | None = None, timeout: float = 600) -> None:
    sh.run(["chroot", tree, *argv], log=log, env={"LC_ALL": "C", **(env or {})}, timeout=timeout)


def _copy_files(src: Path, tree: Path) -> None:
    for path in sorted(src.rglob("*")):
        dest = tree / path.relative_to(src)
        if path.is_dir():
            dest.mkdir(parents=True, exist_ok=True)
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, dest)
            os.chown(dest, 0, 0)


def _small_initramfs(tree: Path, log: Path) -> None:
    """Rebuild every kernel's initramfs with only what a virtio root disk needs (MODULES=list)."""
    modules_d = tree / "usr/share/initramfs-tools/modules.d"
    modules_d.mkdir(parents=True, exist_ok=True)
    (modules_d / "rt-lab").write_text("\n".join(INITRAMFS_MODULES) + "\n")
    build_conf = tree / "etc/initramfs-tools/conf.d/99-rt-lab-build.conf"
    build_conf.write_text("MODULES=list\n")
    try:
        _chroot(tree, "update-initramfs", "-u", "-k", "all", log=log, timeout=900)
    finally:
        build_conf.unlink()


def file_dirs(arch: str) -> list[Path]:
    """The directories of files copied into an image of `arch`, in copy order: each part's common files, then
    what differs on this architecture (console, QEMU). Only these are in the recipe's key, so a change to
    another architecture's files does not rebuild this one's images."""
    dirs = []
    for part in ("common", *ROLES):
        dirs.append(FILES_DIR / part)
        if (FILES_DIR / f"{part}-{arch}").is_dir():
            dirs.append(FILES_DIR / f"{part}-{arch}")
    return dirs


def _configure_common(tree: Path, arch: str, foreign: bool) -> str:
    log = tree.parent / "build.log"
    for d in file_dirs(arch):
        _copy_files(d, tree)
    os.chmod(tree / "etc/sudoers.d/tuner", 0o440)
    (tree / "etc/resolv.conf").unlink(missing_ok=True)
    (tree / "etc/resolv.conf").write_text("nameserver 10.0.2.3\n")  # QEMU user networking's DNS
    (tree / "etc/hosts").write_text("127.0.0.1\tlocalhost\n127.0.1.1\trtlab\n::1\tlocalhost ip6-localhost\n")
    for key in (tree / "etc/ssh").glob("ssh_host_*"):
        key.unlink()  # each lab provides its own host key through fw_cfg
    _chroot(tree, "useradd", "--create-home", "--shell", "/bin/bash", "--groups", "sudo", "tuner", log=log)
    _chroot(tree, "usermod", "--password", "*", "tuner", log=log)  # no password, not locked: key login only
    _chroot(tree, "systemctl", "enable", "systemd-networkd.service", "rt-lab-provision.service", log=log)
    _chroot(tree, "systemctl", "mask", *MASKED_UNITS, log=log)  # nothing a lab unit needs, slow under TCG
    _chroot(tree, "systemctl", "disable", "irqbalance.service", log=log)  # started by the tests that want it
    if not foreign:
        # debootstrap's kernel postinst made an initramfs with most modules (30 MB: GRUB reads it and the
        # kernel unpacks it under TCG, about 10 s of each boot); the foreign build set this up before its
        # second stage. The image keeps MODULES=dep for kernels installed inside the VM.
        _small_initramfs(tree, log)
    (tree / "boot/grub").mkdir(parents=True, exist_ok=True)
    _chroot(tree, "grub-editenv", "/boot/grub/grubenv", "create", log=log)
    for d in (tree / "usr/lib/grub").iterdir():
        if d.is_dir() and d.name.endswith("-efi"):
            shutil.copytree(d, tree / "boot/grub" / d.name, dirs_exist_ok=True)  # what grub-install would copy
    shutil.rmtree(tree / "var/cache/apt/archives", ignore_errors=True)
    (tree / "var/cache/apt/archives/partial").mkdir(parents=True)
    kernels = _kernels(tree)
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
    (tree / "etc/fstab").write_text(f"UUID={root_uuid}\t/\text4\terrors=remount-ro\t0\t0\n")
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


def _nested_guest_disk(tree: Path, root_uuid: str, kernel: str, work: Path, log: Path) -> None:
    """The nested guest's root filesystem and kernel, put into the tree under NESTED_GUEST_DIR for the host.

    The guest boots `kernel` with QEMU's -kernel/-initrd/-append (its command line belongs to the host's
    rt-guest-vm.service), so its disk leaves out /boot and the other kernels' modules.
    """
    (tree / "etc/fstab").write_text(f"UUID={root_uuid}\t/\text4\terrors=remount-ro\t0\t0\n")
    (tree / "etc/hostname").write_text("rtlab-guest\n")
    (tree / "etc/machine-id").write_text(uuid.uuid5(uuid.NAMESPACE_URL, f"rt-tune:{root_uuid}").hex + "\n")
    if ROLE_UNITS["guest"]:
        _chroot(tree, "systemctl", "enable", *ROLE_UNITS["guest"], log=log)
    aside = work / "aside"
    aside.mkdir()
    left_out = [tree / "boot"] + [m for m in (tree / "usr/lib/modules").iterdir() if m.name != kernel]
    moved = []
    try:
        for i, path in enumerate(left_out):
            os.rename(path, aside / str(i))
            moved.append((aside / str(i), path))
        disk = work / "guest-root.raw"
        sh.run(["mkfs.ext4", "-q", "-F", "-L", "rt-guest", "-U", root_uuid, "-d", tree, disk,
                f"{NESTED_GUEST_DISK_GIB}G"], log=log, timeout=900)
    finally:
        for src, dest in moved:
            os.rename(src, dest)
    _unconfigure_role(tree, "guest")
    dest = tree / NESTED_GUEST_DIR
    dest.mkdir(parents=True, exist_ok=True)
    os.rename(disk, dest / "root.raw")
    shutil.copy2(tree / "boot" / f"vmlinuz-{kernel}", dest / "vmlinuz")
    shutil.copy2(tree / "boot" / f"initrd.img-{kernel}", dest / "initrd.img")


def _unconfigure_role(tree: Path, role: str) -> None:
    log = tree.parent / "build.log"
    if ROLE_UNITS[role]:
        _chroot(tree, "systemctl", "disable", *ROLE_UNITS[role], log=log)


def _make_esp(tree: Path, esp: Path, arch: str, log: Path) -> None:
    """A FAT image with EFI/BOOT/BOOT*.EFI: GRUB, which loads the root disk's own /boot/grub/grub.cfg."""
    target, efi_name = GRUB_EFI[arch]
    (tree / "tmp/embed.cfg").write_text(EMBEDDED_GRUB_CFG)
    # not every platform has every module (arm64-efi has no efi_gop-free serial driver of x86's kind)
    modules = [m for m in GRUB_MODULES if (tree / "usr/lib/grub" / target / f"{m}.mod").exists()]
    _chroot(tree, "grub-mkimage", "-d", f"/usr/lib/grub/{target}", "-O", target, "-o", f"/tmp/{efi_name}",
            "-p", "/boot/grub", "-c", "/tmp/embed.cfg", *modules, log=log)
    with open(esp, "wb") as fh:
        fh.truncate(64 * 1024 * 1024)
    sh.run(["mformat", "-i", esp, "-F", "-v", "ESP", "::"], log=log)
    sh.run(["mmd", "-i", esp, "::/EFI", "::/EFI/BOOT"], log=log)
    sh.run(["mcopy", "-i", esp, tree / "tmp" / efi_name, f"::/EFI/BOOT/{efi_name}"], log=log)
    (tree / "tmp" / efi_name).unlink()
    (tree / "tmp/embed.cfg").unlink()
