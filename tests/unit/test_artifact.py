"""Kernel artifacts on the controller: real .debs built with dpkg-deb --build, and Debian's real RT kernel
image fetched once from the mirror into the rt-tune cache ($RT_TUNE_CACHE/debs, default ~/.cache/rt-tune/debs)
and inspected."""

from __future__ import annotations

import hashlib
import re
import subprocess
from pathlib import Path

import pytest

from orchestrator.boot.artifact import (
    KernelArtifact,
    deb_cache_dir,
    fetch_deb,
    inspect_deb,
    parse_deb_contents,
    parse_deb_fields,
    resolve_artifact,
    resolve_image_package,
)
from orchestrator.core.errors import InputError, ParseError
from orchestrator.core.paths import Paths

pytestmark = pytest.mark.unit

RT_META = "linux-image-rt-amd64"  # Debian's metapackage: depends on the current linux-image-6.1.0-N-rt-amd64


def build_deb(tmp_path: Path, files: dict[str, bytes], package: str = "linux-image-6.1.0-99-rt-arm64",
              version: str = "6.1.999-1", arch: str = "arm64") -> Path:
    """A real (tiny) .deb holding `files` (paths relative to /)."""
    root = tmp_path / f"{package}-tree"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {package}\nVersion: {version}\nArchitecture: {arch}\nMaintainer: t <t@example.org>\n"
        "Description: test kernel\n")
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    out = tmp_path / f"{package}_{version}_{arch}.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(root), str(out)], check=True,
                   capture_output=True)
    return out


KERNEL_FILES = {"boot/vmlinuz-6.1.0-99-rt-arm64": b"MZ fake arm64 Image\n",
                "boot/config-6.1.0-99-rt-arm64": b"CONFIG_PREEMPT_RT=y\n",
                "lib/modules/6.1.0-99-rt-arm64/modules.order": b""}


# ---- tiny real .debs -----------------------------------------------------------------------------------
def test_a_kernel_deb_is_inspected(tmp_path):
    deb = build_deb(tmp_path, KERNEL_FILES)
    a = inspect_deb(deb, release="6.1.0-99-rt-arm64")
    assert a == KernelArtifact(source="deb", package="linux-image-6.1.0-99-rt-arm64", release="6.1.0-99-rt-arm64",
                               path=deb.resolve(), sha256=hashlib.sha256(deb.read_bytes()).hexdigest(),
                               version="6.1.999-1", arch="arm64", image="./boot/vmlinuz-6.1.0-99-rt-arm64")
    assert inspect_deb(deb).release == "6.1.0-99-rt-arm64"  # release discovered when the profile omits it
    a.check_arch("aarch64")
    with pytest.raises(InputError, match="built for Debian architecture arm64 .*aarch64.*, but the unit is x86_64"):
        a.check_arch("x86_64")


@pytest.mark.parametrize("image", ["boot/Image-6.1.0-99-rt-arm64", "boot/vmlinux-6.1.0-99-rt-arm64"])
def test_other_kernel_image_names(tmp_path, image):
    a = inspect_deb(build_deb(tmp_path, {image: b"x"}))
    assert (a.release, a.image) == ("6.1.0-99-rt-arm64", "./" + image)


def test_a_deb_without_a_kernel_image_is_refused(tmp_path):
    deb = build_deb(tmp_path, {"boot/config-6.1.0-99-rt-arm64": b"x", "usr/share/doc/k/README": b"x"},
                    package="linux-image-rt-arm64")
    with pytest.raises(InputError) as exc:
        inspect_deb(deb)
    msg = str(exc.value)
    assert f"{deb} (package linux-image-rt-arm64) installs no kernel image" in msg
    assert "./boot/{vmlinuz,Image,vmlinux}-RELEASE" in msg and "metapackage" in msg


def test_a_release_other_than_the_profile_says_is_refused(tmp_path):
    deb = build_deb(tmp_path, KERNEL_FILES)
    with pytest.raises(InputError, match=r"installs kernel release 6\.1\.0-99-rt-arm64, but the profile says "
                                         r"release: '6\.1\.0-41-rt-arm64'"):
        inspect_deb(deb, "6.1.0-41-rt-arm64")


def test_a_deb_with_two_kernels_is_refused(tmp_path):
    deb = build_deb(tmp_path, {"boot/vmlinuz-6.1.0-1-arm64": b"a", "boot/vmlinuz-6.1.0-2-arm64": b"b"})
    with pytest.raises(InputError, match=r"several releases \(6\.1\.0-1-arm64, 6\.1\.0-2-arm64\)"):
        inspect_deb(deb)


def test_not_a_deb_or_missing(tmp_path):
    junk = tmp_path / "junk.deb"
    junk.write_text("not an archive\n")
    with pytest.raises(InputError, match=f"{junk} is not a readable Debian package: .*not a Debian format"):
        inspect_deb(junk)
    with pytest.raises(InputError, match="does not exist"):
        inspect_deb(tmp_path / "none.deb")


def test_resolve_artifact_from_changespec_params(tmp_path):
    deb = build_deb(tmp_path, KERNEL_FILES)
    assert resolve_artifact({"deb": str(deb), "package": None, "release": None}).sha256 is not None
    with pytest.raises(InputError, match="but the profile says"):
        resolve_artifact({"deb": str(deb), "package": None, "release": "6.1.0-1-arm64"})
    pkg = resolve_artifact({"deb": None, "package": "linux-image-rt-arm64", "release": None})
    assert pkg == KernelArtifact(source="package", package="linux-image-rt-arm64", release=None)
    pkg.check_arch("aarch64")  # unknown until installed: nothing to refuse here


# ---- parsers on dpkg-deb's literal output --------------------------------------------------------------
def test_dpkg_deb_output_parsers():
    listing = (
        "drwxr-xr-x root/root         0 2026-07-02 13:50 ./boot/\n"
        "-rw-r--r-- root/root   8222656 2026-07-02 13:50 ./boot/vmlinuz-6.1.0-50-amd64\n"
        "lrwxrwxrwx root/root         0 2026-07-02 13:50 ./usr/lib/x -> ../y z\n"
        "-rw-r--r-- root/root        10 2026-07-02 13:50 ./usr/share/doc/a file with spaces\n"
    )
    assert parse_deb_contents(listing) == ["./boot/", "./boot/vmlinuz-6.1.0-50-amd64", "./usr/lib/x",
                                           "./usr/share/doc/a file with spaces"]
    with pytest.raises(ParseError, match="from dpkg-deb -c"):
        parse_deb_contents("garbage\n")
    fields = "Package: linux-image-6.1.0-50-amd64\nVersion: 6.1.176-1\nArchitecture: amd64"  # no final newline
    assert parse_deb_fields(fields) == {"Package": "linux-image-6.1.0-50-amd64", "Version": "6.1.176-1",
                                        "Architecture": "amd64"}
    with pytest.raises(ParseError, match="expected control fields Architecture"):
        parse_deb_fields("Package: x\nVersion: 1\n")


def test_deb_cache_dir_honours_rt_tune_cache(monkeypatch, tmp_path):
    assert deb_cache_dir(Paths.from_env({"RT_TUNE_CACHE": "/c"})) == Path("/c/debs")
    assert deb_cache_dir(Paths.from_env({"HOME": "/home/u"})) == Path("/home/u/.cache/rt-tune/debs")
    monkeypatch.setenv("RT_TUNE_CACHE", str(tmp_path))
    assert deb_cache_dir() == tmp_path / "debs"


# ---- Debian's real RT kernel, fetched once -------------------------------------------------------------
@pytest.fixture(scope="session")
def rt_image():
    """(image package, fetched .deb, apt's SHA256 for it, inspected artifact): ~70 MB the first time, then the
    cached file (its hash checked against the repository's)."""
    name = resolve_image_package(RT_META)
    uri = subprocess.run(["apt-get", "download", "--print-uris", name], capture_output=True, text=True,
                         check=True).stdout
    sha = re.search(r"SHA256:([0-9a-f]{64})", uri).group(1)
    deb = fetch_deb(name, deb_cache_dir())
    return name, deb, sha, inspect_deb(deb)


def test_metapackage_resolves_to_the_versioned_image_package():
    name = resolve_image_package(RT_META)
    assert re.fullmatch(r"linux-image-6\.1\.0-\d+-rt-amd64", name), name
    assert resolve_image_package(name) == name  # already versioned
    with pytest.raises(InputError, match="not known to this machine's apt lists"):
        resolve_image_package("rt-tune-no-such-package")


def test_real_rt_kernel_deb_is_fetched_and_inspected(rt_image):
    name, deb, sha, a = rt_image
    assert deb.parent == deb_cache_dir() and deb.name.startswith(f"{name}_")
    release = name.removeprefix("linux-image-")  # Debian names image packages after their release
    assert (a.source, a.package, a.release, a.arch) == ("deb", name, release, "amd64")
    assert a.image == f"./boot/vmlinuz-{release}"
    assert a.sha256 == sha  # the repository's hash: the file is the real package
    assert re.fullmatch(r"6\.1\.\d+-\d+", a.version)


def test_the_real_metapackage_is_downloaded_and_refused_as_no_kernel(tmp_path):
    """A fresh download (the metapackage is 1.5 kB): what a profile naming it as `deb:` would get."""
    deb = fetch_deb(RT_META, tmp_path)
    assert deb.parent == tmp_path and deb.name.startswith(f"{RT_META}_")
    with pytest.raises(InputError, match=f"package {RT_META}\\) installs no kernel image.*metapackage"):
        inspect_deb(deb)


def test_fetch_reuses_the_cached_deb(rt_image):
    name, deb, _, _ = rt_image
    before = deb.stat()
    assert fetch_deb(name, deb.parent) == deb
    after = deb.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_fetch_of_an_unknown_package_is_refused(tmp_path):
    with pytest.raises(InputError, match="apt-get cannot download package rt-tune-no-such-package"):
        fetch_deb("rt-tune-no-such-package", tmp_path)
