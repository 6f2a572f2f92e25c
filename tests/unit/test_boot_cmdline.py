"""Kernel cmdline tokens, the GRUB menu parser (on grub.cfg recorded from a lab VM) and trial-boot helpers."""

from pathlib import Path

import pytest

from orchestrator.boot import cmdline
from orchestrator.boot.cmdline import CmdlineError
from orchestrator.boot.grub import TRIAL_ID
from orchestrator.boot.grubcfg import default_entry, entry_for_release, parse_grub_cfg, parse_grubenv
from orchestrator.boot.trial import cpus_of, same_cmdline
from orchestrator.core.errors import ParseError

pytestmark = pytest.mark.unit
REC = Path(__file__).parent.parent / "recorded" / "lab-x86"
# recorded with `tune lab ssh lab1-host -- cat /boot/grub/grub.cfg` (real update-grub output, Debian 12)
GRUB_CFG = (REC / "host-boot-grub.cfg").read_text()
PROC = (REC / "host-proc-cmdline.txt").read_text().strip()


def test_merged_appends_only_missing_arguments_and_keeps_existing_bytes():
    existing = "root=/dev/vda ro  console=ttyS0,115200 panic=10"
    out = cmdline.merged(existing, {"isolcpus": "domain,managed_irq,1", "panic": "10", "nosoftlockup": None})
    assert out == existing + " isolcpus=domain,managed_irq,1 nosoftlockup"
    assert cmdline.merged(out, {"isolcpus": "domain,managed_irq,1"}) == out  # idempotent


def test_an_argument_already_set_to_another_value_is_a_conflict_not_a_rewrite():
    with pytest.raises(CmdlineError, match="isolcpus: the unit already has isolcpus=2-3"):
        cmdline.missing("ro isolcpus=2-3", {"isolcpus": "1"})


@pytest.mark.parametrize("add", [{"root": "/dev/sdb"}, {"init": "/bin/sh"}, {"rootwait": None},
                                 {"quiet;reboot": None}, {"a": "b c"}, {"a": "$(x)"}])
def test_dangerous_or_unquotable_arguments_are_refused(add):
    with pytest.raises(CmdlineError, match="refused kernel arguments"):
        cmdline.validate(add)


def test_size_limit_per_architecture():
    cmdline.check_size("x" * 2047, "aarch64")
    with pytest.raises(CmdlineError, match="over the aarch64 limit of 2047"):
        cmdline.check_size("x" * 2048, "aarch64")
    with pytest.raises(CmdlineError, match="riscv64"):
        cmdline.check_size("x" * 1100, "riscv64")


def test_holds_wants_every_token_exactly_once():
    assert cmdline.holds(PROC + " nohz_full=1", {"nohz_full": "1"}) == []
    assert cmdline.holds(PROC, {"nohz_full": "1"}) == ["expected nohz_full=1 once, found nothing"]
    assert cmdline.holds(PROC + " nohz_full=1 nohz_full=1", {"nohz_full": "1"})
    assert cmdline.holds(PROC + " nohz_full=0-1", {"nohz_full": "1"})


def test_recorded_grub_cfg_entries_and_default():
    entries = parse_grub_cfg(GRUB_CFG)
    assert [e.index_path for e in entries] == ["0", "1>0", "1>1"]
    first = entries[0]
    assert first.id and first.id.startswith("gnulinux-simple-")
    assert first.kernel == "/boot/vmlinuz-6.1.0-50-amd64" and first.release == "6.1.0-50-amd64"
    assert first.args.split() == ["root=/dev/vda", "ro", "console=ttyS0,115200", "panic=10"]
    assert entries[1].path.startswith("gnulinux-advanced-") and ">gnulinux-6.1.0-50-amd64-advanced-" in entries[1].path
    env = parse_grubenv((REC / "host-boot-grub-grubenv").read_text())
    assert env == {"saved_entry": "0"}
    assert default_entry(entries, env["saved_entry"]) is first
    assert default_entry(entries, entries[1].path) is entries[1]
    assert default_entry(entries, "1>0") is entries[1]
    # the recovery entry is never picked for a release
    assert entry_for_release(entries, "6.1.0-50-amd64") is entries[1]
    with pytest.raises(ParseError, match="no entry booting kernel 6.1.0-99"):
        entry_for_release(entries, "6.1.0-99-amd64")
    with pytest.raises(ParseError, match="names no entry"):
        default_entry(entries, "gone")


def test_a_truncated_grub_cfg_is_refused():
    cut = GRUB_CFG[: GRUB_CFG.index("initrd\t/boot/initrd.img")]
    with pytest.raises(ParseError, match="not closed"):
        parse_grub_cfg(cut)


def test_trial_entry_from_the_recorded_default(tmp_path):
    """The trial entry is the default's body with the arguments appended to its linux line only."""
    from orchestrator.boot.grub import GrubBackend
    from orchestrator.boot.loader import BootTarget
    from orchestrator.remote.local import LocalTransport

    (tmp_path / "grub.cfg").write_text(GRUB_CFG)
    (tmp_path / "grubenv").write_bytes((REC / "host-boot-grub-grubenv").read_bytes())
    g = GrubBackend(cfg=str(tmp_path / "grub.cfg"), grubenv=str(tmp_path / "grubenv"))
    t = LocalTransport()
    assert g.default_args(t) == "root=/dev/vda ro console=ttyS0,115200 panic=10"
    entry = g._trial_entry(t, BootTarget(add={"isolcpus": "domain,managed_irq,1", "nohz_full": "1"}))
    assert f"--id {TRIAL_ID} {{" in entry.splitlines()[0]
    linux = [ln for ln in entry.splitlines() if ln.strip().startswith("linux")]
    assert linux == ["\tlinux\t/boot/vmlinuz-6.1.0-50-amd64 root=/dev/vda ro console=ttyS0,115200 panic=10 "
                     "isolcpus=domain,managed_irq,1 nohz_full=1"]
    assert "initrd\t/boot/initrd.img-6.1.0-50-amd64" in entry
    # the trial appended to grub.cfg parses back as one more entry, and never counts as the default
    (tmp_path / "grub.cfg").write_text(GRUB_CFG + entry)
    assert [e.id for e in g.entries(t)][-1] == TRIAL_ID
    assert g.default(t).id.startswith("gnulinux-simple-")


def test_sysfs_expectations_and_cmdline_equality():
    assert cpus_of("isolcpus", "domain,managed_irq,1-3") == [1, 2, 3]
    assert cpus_of("isolcpus", "2,3") == [2, 3]
    assert cpus_of("isolcpus", "nohz,3") is None  # not a domain isolation: /sys/.../isolated stays empty
    assert cpus_of("nohz_full", "1-2") == [1, 2]
    assert cpus_of("rcu_nocbs", "1") is None
    assert same_cmdline("BOOT_IMAGE=/boot/a root=x ro", "BOOT_IMAGE=/boot/b root=x  ro")
    assert not same_cmdline("root=x ro", "root=x ro nohz_full=1")


def test_playbook_can_split_a_cmdline_section_into_one_trial_boot_per_argument():
    from orchestrator.config.profile import ChangeSpec
    from orchestrator.run.engine import split_cmdline

    spec = ChangeSpec(id="guest.cmdline", target="guest", kind="cmdline", needs_reboot=True,
                      params={"add": {"isolcpus": "domain,managed_irq,1", "nohz_full": "1", "nosoftlockup": None}})
    parts = split_cmdline(spec)
    assert [p.id for p in parts] == ["guest.cmdline.isolcpus", "guest.cmdline.nohz_full", "guest.cmdline.nosoftlockup"]
    assert [p.params for p in parts] == [{"add": {"isolcpus": "domain,managed_irq,1"}}, {"add": {"nohz_full": "1"}},
                                         {"add": {"nosoftlockup": None}}]
    other = ChangeSpec(id="guest.sysctl.x.y", target="guest", kind="sysctl", params={"name": "x.y", "value": "1"})
    assert split_cmdline(other) == [other]


def test_health_check_reads_what_this_machine_booted():
    """health_check on the controller itself (a real /proc/cmdline, uname and sysfs) through LocalTransport."""
    from orchestrator.boot.loader import BootTarget
    from orchestrator.boot.trial import health_check
    from orchestrator.remote.local import LocalTransport

    proc = Path("/proc/cmdline").read_text().strip()
    kernel = __import__("os").uname().release
    t = LocalTransport()
    first = cmdline.split(proc)[-1]
    key, _, value = first.partition("=")
    booted = health_check(t, BootTarget(add={key: value or None}), proc, kernel)
    assert booted.on_trial and booted.on_old and booted.cmdline == proc and booted.kernel == kernel
    missing = health_check(t, BootTarget(add={"rt_tune.never_booted": "1"}), proc, kernel)
    assert not missing.on_trial and missing.on_old
    assert missing.problems == ["/proc/cmdline: expected rt_tune.never_booted=1 once, found nothing"]
    other_kernel = health_check(t, BootTarget(kernel="0.0.0-none"), proc, kernel)
    assert not other_kernel.on_trial and other_kernel.problems == [f"uname -r is {kernel}, expected 0.0.0-none"]
    assert not health_check(t, BootTarget(), proc + " extra=1", kernel).on_old


def test_a_bad_boot_policy_in_a_playbook_names_file_line_key_and_value(tmp_path):
    from orchestrator.config.playbook import load_measurement_plan
    from orchestrator.core.errors import InputError

    text = (Path(__file__).parent.parent / "lab" / "playbook-fast.yaml").read_text() + "boot:\n  cmdline: per_arg\n"
    path = tmp_path / "plan.yaml"
    path.write_text(text)
    with pytest.raises(InputError) as err:
        load_measurement_plan(path)
    msg = str(err.value)
    line = text.splitlines().index("  cmdline: per_arg") + 1
    assert f"{path}:{line}" in msg and "boot.cmdline" in msg and "per_arg" in msg, msg
    assert "per_target" in msg and "per_key" in msg, msg  # what was expected
