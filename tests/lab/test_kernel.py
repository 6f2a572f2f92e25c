"""Kernel artifacts (issue #5): a second kernel package on the lab host, booted on trial, verified with
`uname -r`, measured, kept as the default; then `tune rollback` returns to the previous default kernel, purges
the package and leaves the boot files byte for byte as before.

Debian's real linux-image-*-rt-amd64 stands in for the WFI/WFE-patched kernel; it is downloaded once into the
cache (`apt-get download`) by orchestrator.boot.artifact.
"""

from __future__ import annotations

import json

import pytest

from tests.lab.test_boot import PLAYBOOK, boot_files, cmdline_of, outcome, tune, write_profile

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def rt_kernel_deb(lab_paths):
    from orchestrator.boot.artifact import deb_cache_dir, fetch_deb, inspect_deb, resolve_image_package

    deb = fetch_deb(resolve_image_package("linux-image-rt-amd64"), deb_cache_dir(lab_paths))
    return deb, inspect_deb(deb)


def test_second_kernel_trial_boot_keep_then_rollback_to_the_previous_kernel(lab, lab_paths, host, tmp_path,
                                                                             rt_kernel_deb):
    deb, art = rt_kernel_deb
    tune(lab_paths, "rollback", "lab1", "--all")
    old_kernel = host.run(["uname", "-r"]).stdout.strip()
    old_cmdline = cmdline_of(host)
    files = boot_files(host)
    assert art.release != old_kernel and art.release.endswith("-rt-amd64")
    profile = write_profile(tmp_path, f"host:\n  kernel:\n    deb: {deb}\n    release: \"{art.release}\"\n")

    o = outcome(tune(lab_paths, "apply", profile, "--unit", "lab1", "--playbook", PLAYBOOK, "--json"),
                "host.kernel")
    assert o["status"] in ("kept", "rolled_back"), o
    assert o["decision"]["runs_before"] == 4 and o["decision"]["runs_after"] == 4  # old kernel, then the trial
    if o["status"] == "kept":
        assert host.run(["uname", "-r"]).stdout.strip() == art.release
        env = host.run(["grub-editenv", "list"]).stdout
        assert f"gnulinux-{art.release}-advanced-" in env  # the default is now the new kernel's entry
        assert host.run(["dpkg-query", "-W", "-f", "${Status}", art.package]).stdout == "install ok installed"
        undone = tune(lab_paths, "rollback", "lab1", "--all", "--json")
        assert undone.returncode == 0, undone.stderr[-3000:]
        assert "host.kernel" in json.loads(undone.stdout)["rolled_back"]

    # back on the previous kernel, the package purged, the boot files as they were, byte for byte
    assert host.run(["uname", "-r"]).stdout.strip() == old_kernel
    assert cmdline_of(host) == old_cmdline
    status = host.run(["dpkg-query", "-W", "-f", "${Status}", art.package], check=False).stdout
    assert "installed" not in status or "not-installed" in status
    assert host.run(["sh", "-c", f"ls /boot | grep -c {art.release} || true"]).stdout.strip() == "0"
    assert boot_files(host) == files
