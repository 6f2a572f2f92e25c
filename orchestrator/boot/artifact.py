"""Kernel artifacts on the controller: what a profile's `kernel: {deb: ...}` really contains, before any unit
sees it, and fetching a kernel .deb from this machine's apt repositories.

A profile names a kernel (see orchestrator/config/profile.py, "Kernel artifacts") as
  - `deb: FILE`: a .deb here. `inspect_deb` reads its control fields and file list with dpkg-deb, finds the one
    kernel image it installs (`./boot/vmlinuz-<release>`, `Image-<release>` or `vmlinux-<release>`), so the
    kernel release it boots as, and checks it against the profile's `release`. The sha256 lets the engine
    check the copy it puts on the unit.
  - `package: NAME`: installed on the unit from the unit's own apt repositories; nothing exists here to
    inspect. Its release is the profile's `release` when given; otherwise the engine learns it on the unit after
    installing (the `/boot/vmlinuz-*` the package installed, e.g. from `dpkg -L NAME` of the resolved image
    package), and KernelArtifact.release stays None until then.
"""

from __future__ import annotations

import fcntl
import hashlib
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from orchestrator.core.errors import InputError, MissingDependencyError, ParseError, TuneError
from orchestrator.core.paths import Paths

IMAGE_PREFIXES = ("vmlinuz-", "Image-", "vmlinux-")
#: Debian architecture -> `uname -m` of the machines that boot its kernels.
UNAME_MACHINE = (("arm64", "aarch64"), ("amd64", "x86_64"), ("armhf", "armv7l"), ("i386", "i686"),
                 ("riscv64", "riscv64"), ("ppc64el", "ppc64le"), ("s390x", "s390x"))
_IMAGE = re.compile(r"^\./boot/(" + "|".join(map(re.escape, IMAGE_PREFIXES)) + r")([A-Za-z0-9._+-]+)$")
_REAL_IMAGE = re.compile(r"^linux-image-\d")  # Debian's versioned image packages; the rest are metapackages
_PRINT_URI = re.compile(r"^'(?P<uri>[^']+)' (?P<file>\S+) (?P<size>\d+) SHA256:(?P<sha>[0-9a-f]{64})$")


class ArtifactError(TuneError):
    """An apt command on the controller failed (network, repositories)."""


class KernelArtifact(BaseModel):
    """A kernel to install on a unit. `source` "deb": every field comes from the .deb at `path`. `source`
    "package": only `package` (and `release` when the profile gives it) is known until the unit installs it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: Literal["deb", "package"]
    package: str
    release: str | None
    path: Path | None = None
    sha256: str | None = None
    version: str | None = None
    arch: str | None = None  # Debian architecture (arm64, amd64)
    image: str | None = None  # the image's path inside the .deb, e.g. ./boot/vmlinuz-6.1.0-41-rt-arm64

    def check_arch(self, uname_machine: str) -> None:
        """Refuse a .deb built for another architecture than the unit's (`uname -m`): it would not boot."""
        if self.arch is None or self.arch == "all":
            return
        want = dict(UNAME_MACHINE).get(self.arch)
        if want != uname_machine:
            raise InputError(f"kernel {self.path or self.package} is built for Debian architecture {self.arch} "
                             f"(machines reporting {want or 'unknown'}), but the unit is {uname_machine}")


def _run(argv: list[str], *, cwd: Path | None = None, timeout_s: float = 120.0) -> subprocess.CompletedProcess:
    if shutil.which(argv[0]) is None:
        pkg = {"dpkg-deb": "dpkg", "apt-get": "apt", "apt-cache": "apt"}.get(argv[0], argv[0])
        raise MissingDependencyError(f"{argv[0]} is not installed on this machine: apt-get install {pkg}")
    try:
        return subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise ArtifactError(f"`{' '.join(argv)}` did not finish within {timeout_s:g} s") from None


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---- reading a .deb ------------------------------------------------------------------------------------
def parse_deb_fields(text: str, names: tuple[str, ...] = ("Package", "Version", "Architecture")) -> dict[str, str]:
    """`dpkg-deb -f FILE F1 F2 ...` output (`Name: value` lines) -> {name: value}; every name must be there."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        name, sep, value = line.partition(": ")
        if sep and name in names and value.strip():
            fields[name] = value.strip()
    missing = [n for n in names if n not in fields]
    if missing:
        raise ParseError(f"expected control fields {', '.join(missing)} from dpkg-deb -f, got {text[:200]!r}")
    return fields


def parse_deb_contents(text: str) -> list[str]:
    """`dpkg-deb -c FILE` lines (`perms owner/group size date time ./path[ -> target]`) -> the paths."""
    paths: list[str] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = line.split(None, 5)
        if len(parts) != 6 or not parts[5].startswith("./"):
            raise ParseError(f"expected `perms owner/group size date time ./path` from dpkg-deb -c, got {line[:200]!r}")
        path = parts[5]
        if parts[0].startswith("l"):
            path = path.split(" -> ", 1)[0]
        paths.append(path)
    return paths


def kernel_images(paths: list[str]) -> list[tuple[str, str]]:
    """(path, release) of every kernel image a package installs under /boot."""
    return [(p, m.group(2)) for p in paths if (m := _IMAGE.fullmatch(p))]


def inspect_deb(path: Path, release: str | None = None) -> KernelArtifact:
    """What a kernel .deb installs: its package, version, architecture, the kernel image and so the release.
    Refuses a .deb that installs no kernel image, or several, or another release than `release`."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"kernel package {path} does not exist")
    info = _run(["dpkg-deb", "-f", str(path), "Package", "Version", "Architecture"])
    if info.returncode != 0:
        raise InputError(f"{path} is not a readable Debian package: {info.stderr.strip() or info.stdout.strip()}")
    fields = parse_deb_fields(info.stdout)
    listing = _run(["dpkg-deb", "-c", str(path)], timeout_s=300)
    if listing.returncode != 0:
        raise InputError(f"cannot list the files of {path}: {listing.stderr.strip()}")
    images = kernel_images(parse_deb_contents(listing.stdout))
    wanted = "./boot/{" + ",".join(p.rstrip("-") for p in IMAGE_PREFIXES) + "}-RELEASE"
    if not images:
        raise InputError(f"{path} (package {fields['Package']}) installs no kernel image: expected {wanted}; "
                         "is it a metapackage? name the versioned linux-image-<release> package instead")
    releases = sorted({r for _, r in images})
    if len(releases) > 1:
        raise InputError(f"{path} installs kernel images for several releases ({', '.join(releases)}): expected "
                         "one, so that rt-tune knows which one to boot")
    found = releases[0]
    if release is not None and release != found:
        raise InputError(f"{path} installs kernel release {found}, but the profile says release: {release!r}")
    return KernelArtifact(source="deb", package=fields["Package"], release=found, path=path.resolve(),
                          sha256=sha256_of(path), version=fields["Version"], arch=fields["Architecture"],
                          image=images[0][0])


def resolve_artifact(params: dict[str, Any]) -> KernelArtifact:
    """A profile's kernel artifact dict ({"deb", "package", "release"}, as in ChangeSpec params) -> what is
    known about it on the controller: a .deb is inspected; a package is taken as named (see module docstring)."""
    if params.get("deb"):
        return inspect_deb(Path(params["deb"]), params.get("release"))
    if params.get("package"):
        return KernelArtifact(source="package", package=params["package"], release=params.get("release"))
    raise InputError(f"a kernel artifact names a deb or a package, got {params!r}")


# ---- fetching from this machine's apt repositories ------------------------------------------------------
def deb_cache_dir(paths: Paths | None = None) -> Path:
    """Where fetched .debs are kept: $RT_TUNE_CACHE/debs (default ~/.cache/rt-tune/debs)."""
    return (paths or Paths.from_env()).cache / "debs"


def resolve_image_package(name: str) -> str:
    """The versioned image package a kernel metapackage stands for, e.g. linux-image-rt-amd64 ->
    linux-image-6.1.0-56-rt-amd64 (its only `Depends: linux-image-<digit>...`), from this machine's apt lists.
    A versioned image package, or a package depending on no image, is returned as it is."""
    seen: list[str] = []
    while not _REAL_IMAGE.match(name):
        if name in seen or len(seen) > 3:
            raise InputError(f"kernel package {seen[0]} does not lead to a versioned linux-image package "
                             f"({' -> '.join(seen + [name])})")
        seen.append(name)
        res = _run(["apt-cache", "depends", "--no-recommends", "--no-suggests", "--no-conflicts", "--no-breaks",
                    "--no-replaces", "--no-enhances", name])
        if res.returncode != 0:
            raise InputError(f"package {name} is not known to this machine's apt lists (apt-get update?): "
                             f"{res.stderr.strip()}")
        deps = []
        for line in res.stdout.splitlines():
            kind, sep, dep = line.strip().lstrip("|").partition(": ")
            if sep and kind == "Depends" and _REAL_IMAGE.match(dep):
                deps.append(dep)
        deps = sorted(set(deps))
        if not deps:
            return name
        if len(deps) > 1:
            raise InputError(f"package {name} depends on several kernel images ({', '.join(deps)}): name one")
        name = deps[0]
    return name


def fetch_deb(package: str, dest_dir: Path, *, timeout_s: float = 1800.0) -> Path:
    """`apt-get download PACKAGE` into `dest_dir` (the candidate version of this machine's apt lists). A file
    already there with the repository's SHA256 is reused, so a cache directory downloads each version once.
    Downloads the package as named: resolve a metapackage first (resolve_image_package)."""
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as empty:  # apt prints no URI for a file already in its cwd
        res = _run(["apt-get", "download", "--print-uris", package], cwd=Path(empty))
    uris = [m for line in res.stdout.splitlines() if (m := _PRINT_URI.fullmatch(line.strip()))]
    if res.returncode != 0 or len(uris) != 1:
        raise InputError(f"apt-get cannot download package {package} on this machine: "
                         f"{res.stderr.strip() or res.stdout.strip() or 'no URI'}")
    target = dest_dir / uris[0]["file"]
    with open(dest_dir / ".fetch.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another controller (or test) fetching into this cache: wait for it
        if target.is_file() and sha256_of(target) == uris[0]["sha"]:
            return target
        res = _run(["apt-get", "download", package], cwd=dest_dir, timeout_s=timeout_s)
    if res.returncode != 0 or not target.is_file():
        raise ArtifactError(f"apt-get download {package} failed in {dest_dir}: {res.stderr.strip()}")
    if sha256_of(target) != uris[0]["sha"]:
        raise ArtifactError(f"{target} does not have the SHA256 the repository lists ({uris[0]['sha']})")
    return target
