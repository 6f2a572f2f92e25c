"""Kernel artifacts (issue #5): a second kernel package on the lab host, booted on trial, verified with
`uname -r`, measured, kept as the default; then `tune rollback` returns to the previous default kernel, purges
the package and leaves the boot files byte for byte as before.

Debian's real linux-image-*-rt-amd64 stands in for the WFI/WFE-patched kernel; it is downloaded once into the
cache (`apt-get download`) by orchestrator.boot.artifact.

It runs on the fleet lab's third unit (a host, as the kernel change is), not on tests/lab's unit: the test is
about 5 minutes of installing, booting and measuring, and the fleet lab's lane has the room (issue #16).
"""

from __future__ import annotations

import json

import pytest

from orchestrator.config.inventory import load_inventory
from orchestrator.remote.ssh import SSHTransport
from tests.lab.test_boot import PLAYBOOK, boot_files, cmdline_of, outcome, tune, write_profile

pytestmark = pytest.mark.lab

UNIT = "lab3"  # test_ab takes lab2; test_rollout (after this file) starts from a rollback of every unit


@pytest.fixture()
def host(fleet_lab, fleet_paths):
    with SSHTransport(load_inventory(fleet_paths.lab_inventory).endpoint(UNIT, "host")) as t:
        yield t


@pytest.fixture(scope="module")
def rt_kernel_deb(fleet_paths):
    from orchestrator.boot.artifact import deb_cache_dir, fetch_deb, inspect_deb, resolve_image_package

    deb = fetch_deb(resolve_image_package("linux-image-rt-amd64"), deb_cache_dir(fleet_paths))
    return deb, inspect_deb(deb)


def test_second_kernel_trial_boot_keep_then_rollback_to_the_previous_kernel(fleet_paths, host, tmp_path,
                                                                             rt_kernel_deb):
    deb, art = rt_kernel_deb
    tune(fleet_paths, "rollback", UNIT, "--all")
    old_kernel = host.run(["uname", "-r"]).stdout.strip()
    old_cmdline = cmdline_of(host)
    files = boot_files(host)
    assert art.release != old_kernel and art.release.endswith("-rt-amd64")
    profile = write_profile(tmp_path, f"host:\n  kernel:\n    deb: {deb}\n    release: \"{art.release}\"\n")

    o = outcome(tune(fleet_paths, "apply", profile, "--unit", UNIT, "--playbook", PLAYBOOK, "--json"),
                "host.kernel")
    assert o["status"] in ("kept", "rolled_back"), o
    assert o["decision"]["runs_before"] == 4 and o["decision"]["runs_after"] == 4  # old kernel, then the trial
    if o["status"] == "kept":
        assert host.run(["uname", "-r"]).stdout.strip() == art.release
        env = host.run(["grub-editenv", "list"]).stdout
        assert f"gnulinux-{art.release}-advanced-" in env  # the default is now the new kernel's entry
        assert host.run(["dpkg-query", "-W", "-f", "${Status}", art.package]).stdout == "install ok installed"
        undone = tune(fleet_paths, "rollback", UNIT, "--all", "--json")
        assert undone.returncode == 0, undone.stderr[-3000:]
        assert "host.kernel" in json.loads(undone.stdout)["rolled_back"]

    # back on the previous kernel, the package purged, the boot files as they were, byte for byte
    assert host.run(["uname", "-r"]).stdout.strip() == old_kernel
    assert cmdline_of(host) == old_cmdline
    status = host.run(["dpkg-query", "-W", "-f", "${Status}", art.package], check=False).stdout
    assert "installed" not in status or "not-installed" in status
    assert host.run(["sh", "-c", f"ls /boot | grep -c {art.release} || true"]).stdout.strip() == "0"
    assert boot_files(host) == files
