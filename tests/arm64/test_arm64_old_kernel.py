"""The arm64 lab's 6.1 kernel path (issue #6), too slow for CI: it reboots the arm64 host four times (about four
minutes each: the host under TCG, then its nested guest). Run it by hand: `pytest -m slow_lab tests/arm64`.

On bookworm's 6.1 (no trap-policy parameters) `wfx_notrap: true` is refused with what to do, before anything
changes; a profile naming a "patched" kernel that is not one (backports' 6.12, booted without the parameters)
trial-boots healthy, but the WFI exit rate does not fall, so it is rolled back on that evidence.
"""

from __future__ import annotations

import json

import pytest

from orchestrator.boot.loader import one_second_later
from tests.arm64.test_arm64 import (  # noqa: F401
    arm64_inventory,
    arm64_lab,
    arm64_paths,
    nested_playbook,
    tune,  # (fixtures)
)

pytestmark = [pytest.mark.slow_lab, pytest.mark.arm64]


def _reboot_host_into(arm64_lab, ahost, saved_entry: str) -> None:
    """Set GRUB's saved default on the host and reboot it (the guest comes back with it)."""
    old = ahost.run(["cat", "/proc/sys/kernel/random/boot_id"]).stdout.strip()
    ahost.run(["grub-set-default", saved_entry])
    ahost.run(one_second_later(["systemctl", "reboot"]))
    state = arm64_lab.load_state()
    arm64_lab.wait_ssh(state, ["lab1-host"], 600, old_boot_ids={"lab1-host": old})
    arm64_lab.wait_ssh(state, ["lab1-guest"], 600)


def test_old_host_kernel_needs_a_patched_kernel_and_an_unpatched_one_is_rolled_back_on_exit_rates(
        arm64_lab, arm64_paths, arm64_inventory, nested_playbook, tmp_path):
    """On bookworm's 6.1 (no trap-policy parameters) `wfx_notrap: true` is refused with what to do, before
    anything changes. A profile that names a 'patched' kernel which is not one (backports' 6.12, booted without
    the parameters) trial-boots healthy, but the WFI exit rate does not fall: rolled back on that evidence."""
    import re

    from orchestrator.remote.ssh import SSHTransport

    def host():
        return SSHTransport(arm64_inventory.endpoint("lab1", "host"), connect_deadline_s=60)

    tune(arm64_paths, "rollback", "lab1", "--all")
    with host() as h:
        grub_cfg = h.run(["cat", "/boot/grub/grub.cfg"]).stdout
        new_release = h.run(["uname", "-r"]).stdout.strip()
        new_package = h.run(["dpkg-query", "-S", f"/boot/vmlinuz-{new_release}"]).stdout.split(":")[0]
    submenu = re.search(r"^submenu .* \$menuentry_id_option '([^']+)'", grub_cfg, re.M).group(1)
    old_id = re.search(r"menuentry '[^']*6\.1\.0-[^']*' .*\$menuentry_id_option '(gnulinux-6\.1\.0-[^']*-advanced-"
                       r"[^']+)'", grub_cfg).group(1)
    with host() as h:
        _reboot_host_into(arm64_lab, h, f"{submenu}>{old_id}")
    try:
        with host() as h:
            old_release = h.run(["uname", "-r"]).stdout.strip()
            assert old_release.startswith("6.1.0-"), old_release
            boot_before = h.run(["sh", "-c", "cat /proc/cmdline; sha256sum /boot/grub/grub.cfg"]).stdout
        only_wfx = tmp_path / "wfx.yaml"
        only_wfx.write_text("name: wfx-only\nhost:\n  wfx_notrap: true\n")
        proc = tune(arm64_paths, "apply", str(only_wfx), "--playbook", nested_playbook, "--json")
        outcome = json.loads(proc.stdout)["results"][0]["outcomes"][0]
        assert outcome["status"] == "failed" and "not started" in outcome["reason"], outcome
        assert "Linux >= 6.11" in outcome["reason"] and "patched host kernel" in outcome["reason"]

        not_patched = tmp_path / "not-patched.yaml"
        not_patched.write_text(f"name: wfx-not-patched\nhost:\n  wfx_notrap:\n    kernel:\n"
                               f"      package: {new_package}\n      release: \"{new_release}\"\n")
        proc = tune(arm64_paths, "apply", str(not_patched), "--playbook", nested_playbook, "--json")
        outcome = json.loads(proc.stdout)["results"][0]["outcomes"][0]
        assert outcome["status"] == "rolled_back", outcome
        assert "booted the trial, but" in outcome["reason"] and "WFI" in outcome["reason"], outcome
        assert outcome["evidence"]["wfi_exits"]["in_effect"] is False
        with host() as h:  # back on the old kernel, boot files as they were
            assert h.run(["uname", "-r"]).stdout.strip() == old_release
            assert h.run(["sh", "-c", "cat /proc/cmdline; sha256sum /boot/grub/grub.cfg"]).stdout == boot_before
    finally:
        with host() as h:
            _reboot_host_into(arm64_lab, h, "0")
