"""Lab pieces that need no VM: dependency checks, ports, recipe keys, the cache's atomicity, QEMU argv."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.core.errors import LabError, MissingDependencyError
from orchestrator.lab import deps, images, vm

pytestmark = pytest.mark.unit


def test_missing_package_is_named_with_the_readme_command():
    with pytest.raises(MissingDependencyError) as exc:
        deps.check(which=lambda cmd: None if cmd == "qemu-system-x86_64" else f"/usr/bin/{cmd}",
                   exists=lambda p: "OVMF" not in p)
    msg = str(exc.value)
    assert "qemu-system-x86" in msg and "ovmf" in msg
    assert "README" in msg and "apt-get install -y ovmf qemu-system-x86" in msg
    assert "mtools" not in msg  # only what is really missing


def test_cli_reports_missing_package_before_doing_anything(tmp_path):
    """`tune lab up` with an empty PATH (but python itself): exit code 3 and the packages named."""
    env = {**os.environ, "PATH": str(tmp_path), "RT_TUNE_STATE": str(tmp_path / "s"),
           "RT_TUNE_CACHE": str(tmp_path / "c")}
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "lab", "up"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert "debootstrap" in proc.stderr and "qemu-system-x86" in proc.stderr
    assert not (tmp_path / "c").exists(), "nothing may be built when packages are missing"


def test_busy_port_moves_to_the_next_free_one():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        assert not vm.port_is_free(busy)
        picked = vm.pick_port(busy, taken=set())
        assert picked != busy and vm.port_is_free(picked)
        assert vm.pick_port(busy, taken={busy + 1}) not in (busy, busy + 1)


def test_no_free_port_is_a_clear_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        with pytest.raises(LabError, match="no free TCP port"):
            vm.pick_port(busy, taken=set(), span=1)


def test_recipe_key_is_stable_and_follows_the_recipe():
    a = images.ImageRecipe.default("amd64")
    assert a.key() == images.ImageRecipe.default("amd64").key()
    b = images.ImageRecipe(**{**a.__dict__, "packages": a.packages + ("htop",)})
    assert a.key() != b.key()
    with pytest.raises(LabError, match="architecture"):
        images.ImageRecipe.default("mips")


def test_recipe_key_hashes_only_the_files_its_architecture_copies(tmp_path, monkeypatch):
    """A change to the arm64 host's files rebuilds the arm64 images, not the x86 ones; a change to the common
    files rebuilds both (the key is the files images copy, nothing more or less)."""
    import shutil

    files = tmp_path / "files"
    shutil.copytree(images.FILES_DIR, files)
    monkeypatch.setattr(images, "FILES_DIR", files)
    x86, arm = images.ImageRecipe.default("amd64"), images.ImageRecipe.default("arm64")
    keys = x86.key(), arm.key()
    assert [d.name for d in images.file_dirs("amd64")] == ["common", "host", "guest"]
    assert "host-arm64" in [d.name for d in images.file_dirs("arm64")]

    service = files / "host-arm64" / "etc" / "systemd" / "system" / "rt-guest-vm.service"
    service.write_text(service.read_text().replace("panic=10 quiet", "panic=10 quiet rcu_nocbs=1"))
    assert x86.key() == keys[0] and arm.key() != keys[1]
    arm_now = arm.key()
    (files / "common" / "etc" / "rt-tune-test-marker").write_text("x\n")
    assert x86.key() != keys[0] and arm.key() != arm_now


def test_interrupted_build_leaves_no_half_cache(tmp_path, monkeypatch):
    recipe = images.ImageRecipe.default("amd64")

    def half_build(recipe, work, cache_dir, events):
        (work / "out").mkdir(parents=True)
        (work / "out" / "root-host.raw").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(images, "_build", half_build)
    with pytest.raises(KeyboardInterrupt):
        images.ensure_images(recipe, tmp_path)
    left = sorted(p.name for p in (tmp_path / "images").iterdir())
    assert left == [f"{recipe.key()}.lock"], left
    assert images.cached(recipe, tmp_path) is None


def test_finished_build_is_found_without_rebuilding(tmp_path, monkeypatch):
    recipe = images.ImageRecipe.default("amd64")
    calls = []

    def fake_build(recipe, work, cache_dir, events):
        calls.append(work)
        (work / "out").mkdir(parents=True)
        (work / "out" / "manifest.json").write_text('{"arch": "amd64", "kernel": "6.1", "root_uuid": {}}')

    monkeypatch.setattr(images, "_build", fake_build)
    first = images.ensure_images(recipe, tmp_path)
    second = images.ensure_images(recipe, tmp_path)
    assert len(calls) == 1 and first.directory == second.directory == tmp_path / "images" / recipe.key()


def test_qemu_argv_boots_through_uefi_from_the_vms_own_disks(tmp_path):
    spec = vm.VMSpec(name="u1-host", role="host", directory=tmp_path, base_image=tmp_path / "b.raw",
                     esp_image=tmp_path / "esp.img", ssh_port=2299,
                     fw_cfg={"hostname": tmp_path / "hn"})
    argv = vm.qemu_argv(spec)
    joined = " ".join(argv)
    assert f"file={vm.OVMF_CODE}" in joined and "if=pflash" in joined
    assert "-kernel" not in argv  # never bypass the bootloader
    assert "hostfwd=tcp:127.0.0.1:2299-:22" in joined
    assert "i6300esb" in argv and "watchdog=reset" in argv
    assert f"name=opt/rt-tune/hostname,file={tmp_path / 'hn'}" in argv
    assert "tcg,thread=multi,tb-size=128" in argv


def test_remove_tree_unmounts_what_a_build_left_mounted(tmp_path):
    """debootstrap or a chroot interrupted mid-way can leave mounts in the tree: they go first, then the tree."""
    from orchestrator.lab import sh

    d = tmp_path / "tree"
    (d / "proc").mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(d / "proc")], check=True)
    try:
        (d / "proc" / "inside").write_text("x")
        assert sh.mounts_below(d) == [str(d / "proc")]
        sh.remove_tree(d)
        assert not d.exists()
        assert sh.mounts_below(tmp_path) == []
    finally:
        subprocess.run(["umount", "-l", str(d / "proc")], capture_output=True)


# ---- the arm64 lab (issue #6) ---------------------------------------------------------------------------
RECORDED_INDEX = (Path(__file__).resolve().parent.parent / "recorded" / "lab"
                  / "bookworm-backports-arm64-Packages.excerpt")


def test_newest_kernel_is_what_the_suites_metapackage_depends_on():
    """On stanzas cut from the real bookworm-backports arm64 Packages index (2026-11-25): not the first kernel
    listed (6.12.57), the one linux-image-arm64 depends on, with its pool path and checksum."""
    ref = images.kernel_from_packages_index(RECORDED_INDEX.read_text(), "arm64", "recorded")
    assert ref.package == "linux-image-6.12.95+deb12-arm64"
    assert ref.filename.startswith("pool/main/l/linux-signed-arm64/linux-image-6.12.95+deb12-arm64_")
    assert len(ref.sha256) == 64
    with pytest.raises(LabError, match="no linux-image-amd64 package"):
        images.kernel_from_packages_index(RECORDED_INDEX.read_text(), "amd64", "recorded")


def test_arm64_recipe_has_two_kernels_and_a_nested_guest():
    recipe = images.ImageRecipe.default("arm64")
    assert recipe.nested_guest and recipe.new_kernel_suite == "bookworm-backports"
    assert "linux-image-arm64" in recipe.packages and "qemu-system-arm" in recipe.packages
    assert recipe.key() != images.ImageRecipe.default("amd64").key()
    with pytest.raises(LabError, match="known: amd64, arm64"):
        images.ImageRecipe.default("riscv64")


def test_arm64_qemu_argv_gives_the_host_el2_gicv3_aavmf_and_the_guests_forward(tmp_path):
    spec = vm.VMSpec(name="lab1-host", role="host", directory=tmp_path, base_image=tmp_path / "b.raw",
                     esp_image=tmp_path / "esp.img", ssh_port=2230, arch="arm64", forwards=((2231, 2222),))
    argv = vm.qemu_argv(spec)
    assert argv[0] == "qemu-system-aarch64"
    assert argv[argv.index("-machine") + 1] == "virt,virtualization=on,gic-version=3"
    assert f"if=pflash,format=raw,unit=0,readonly=on,file={vm.AAVMF_CODE}" in argv
    assert argv[argv.index("-netdev") + 1] == \
        "user,id=n0,hostfwd=tcp:127.0.0.1:2230-:22,hostfwd=tcp:127.0.0.1:2231-:2222"
    assert "i6300esb" not in argv
    x86 = vm.qemu_argv(vm.VMSpec(name="x", role="host", directory=tmp_path, base_image=tmp_path / "b.raw",
                                 esp_image=tmp_path / "e.img", ssh_port=2230))
    assert x86[0] == "qemu-system-x86_64" and "i6300esb" in x86


def test_arm64_lab_missing_packages_are_named():
    with pytest.raises(MissingDependencyError) as exc:
        deps.check(deps.LAB["arm64"], which=lambda name: None if name == "qemu-aarch64-static" else "/bin/x",
                   exists=lambda path: "AAVMF" not in path)
    msg = str(exc.value)
    assert "qemu-user-static" in msg and "qemu-efi-aarch64" in msg and "qemu-system-arm" not in msg


def test_nested_guest_is_reached_through_its_host_in_the_inventory(tmp_path):
    from orchestrator.config.inventory import load_inventory
    from orchestrator.core.paths import Paths
    from orchestrator.lab.lab import Lab, LabState, VMRecord

    lab = Lab(Paths(cache=tmp_path / "cache", state=tmp_path / "state"))
    lab.dir.mkdir(parents=True)
    state = LabState(image_dir=str(tmp_path), arch="arm64", vms=[
        VMRecord(name="lab1-host", unit="lab1", role="host", ssh_port=2230, memory_mib=2048, cpus=2),
        VMRecord(name="lab1-guest", unit="lab1", role="guest", ssh_port=2231, memory_mib=384, cpus=2,
                 nested_in="lab1-host")])
    for rec in state.vms:
        lab._keygen(lab.host_key(rec.name), rec.name)
    lab._write_known_hosts(state)
    inv = load_inventory(lab.write_inventory(state))
    guest = inv.endpoint("lab1", "guest")
    assert (guest.host, guest.port) == ("127.0.0.1", 2222) and guest.jump is not None
    assert guest.jump.port == 2230
    assert inv.unit("lab1").vars["guest_bootloader"] == "qemu-append"
    guest_key = (lab.host_key("lab1-guest").with_suffix(".pub")).read_text().split()[1]
    assert lab.nested_known_hosts("lab1-guest").read_text().startswith("[127.0.0.1]:2222 ssh-ed25519 " + guest_key)
    spec = lab.spec(state, state.vms[0])  # the host carries the guest's identity and forward
    assert spec.forwards == ((2231, 2222),) and spec.fw_cfg["guest_host_key"] == lab.host_key("lab1-guest")
    with pytest.raises(LabError, match="runs inside lab1-host"):
        lab.spec(state, state.vms[1])


def _deb(tmp_path: Path, name: str, compression: str) -> Path:
    """A real package built by the host's dpkg-deb: control, a maintainer script, a file, a symlink."""
    root = tmp_path / name
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN/control").write_text(f"Package: {name}\nVersion: 1.0\nArchitecture: all\n"
                                         "Maintainer: rt-tune <rt-tune@example.org>\nDescription: test\n")
    (root / "DEBIAN/postinst").write_text("#!/bin/sh\necho configured\n")
    (root / "DEBIAN/postinst").chmod(0o755)
    (root / "usr/share/rt").mkdir(parents=True)
    (root / "usr/share/rt/data.bin").write_bytes(os.urandom(300_001))  # odd size: ar pads members to even
    (root / "usr/share/rt/link").symlink_to("data.bin")
    deb = tmp_path / f"{name}.deb"
    subprocess.run(["dpkg-deb", f"-Z{compression}", "--root-owner-group", "-b", root, deb], check=True,
                   capture_output=True)
    return deb


def _extract(deb: Path, dest: Path) -> dict[str, bytes]:
    subprocess.run(["dpkg-deb", "-R", deb, dest], check=True)
    return {str(p.relative_to(dest)): (os.readlink(p).encode() if p.is_symlink() else p.read_bytes())
            for p in sorted(dest.rglob("*")) if p.is_file() or p.is_symlink()}


@pytest.mark.parametrize("compression", ["xz", "gzip"])
def test_a_deb_decompressed_for_the_second_stage_installs_the_same_files(tmp_path, compression):
    """The foreign build decompresses each .deb natively so that dpkg under qemu-user unpacks plain tars: what
    the host's dpkg-deb extracts from it must be what it extracts from the original, byte for byte."""
    deb = _deb(tmp_path, "rt-plain", compression)
    original = _extract(deb, tmp_path / "before")
    size = deb.stat().st_size
    assert images.repack_deb_uncompressed(deb)
    assert [name for name, _, _ in images._ar_members(deb)] == ["debian-binary", "control.tar", "data.tar"]
    assert deb.stat().st_size > size  # 300 kB of random data does not compress: the tars' padding grows
    assert _extract(deb, tmp_path / "after") == original
    assert images.repack_deb_uncompressed(deb) is False  # nothing left to decompress


def test_a_zstd_deb_is_left_alone_and_debootstrap_s_list_is_followed(tmp_path):
    tree = tmp_path / "tree"
    (tree / "debootstrap").mkdir(parents=True)
    (tree / "var/cache/apt/archives").mkdir(parents=True)
    for name, comp in (("rt-a", "xz"), ("rt-b", "zstd")):
        os.replace(_deb(tmp_path, name, comp), tree / f"var/cache/apt/archives/{name}.deb")
    (tree / "debootstrap/debpaths").write_text("rt-a /var/cache/apt/archives/rt-a.deb\n"
                                               "rt-b /var/cache/apt/archives/rt-b.deb\n")
    zstd = (tree / "var/cache/apt/archives/rt-b.deb").read_bytes()
    assert images.repack_debs_uncompressed(tree) == 1
    assert (tree / "var/cache/apt/archives/rt-b.deb").read_bytes() == zstd


def test_a_damaged_deb_is_a_lab_error_naming_it(tmp_path):
    deb = _deb(tmp_path, "rt-cut", "xz")
    deb.write_bytes(deb.read_bytes()[:100])
    with pytest.raises(LabError, match="rt-cut.deb"):
        images.repack_deb_uncompressed(deb)


def test_a_deb_cut_inside_its_data_is_a_lab_error_and_left_as_it_was(tmp_path):
    deb = _deb(tmp_path, "rt-short", "xz")
    data = bytearray(deb.read_bytes())
    offset, size = images._ar_members(deb)[2][1:]
    data[offset + size // 2:offset + size] = bytes(size - size // 2)  # the xz stream's second half zeroed
    deb.write_bytes(bytes(data))
    with pytest.raises(LabError, match="rt-short.deb: cannot decompress"):
        images.repack_deb_uncompressed(deb)
    assert deb.read_bytes() == bytes(data) and not list(tmp_path.glob("*.plain"))


def test_a_deb_whose_member_size_is_not_a_number_is_a_lab_error(tmp_path):
    deb = _deb(tmp_path, "rt-size", "xz")
    data = bytearray(deb.read_bytes())
    data[8 + 60 + 4 + 48:8 + 60 + 4 + 58] = b"12x4      "  # control.tar.xz's size field
    deb.write_bytes(bytes(data))
    with pytest.raises(LabError, match=r"rt-size.deb: ar member 'control.tar.xz' has no size"):
        images.repack_deb_uncompressed(deb)
