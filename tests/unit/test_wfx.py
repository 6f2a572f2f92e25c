"""WFI/WFE no-trap: the method picked from a host's arch and kernel release, the KVM debugfs counter probe (run
for real on a temporary tree holding files in debugfs's format), and the decision that no-trap is in effect.

No arm64 hardware here: the only recorded figures are the lab notes' 6600 -> 6732 in 5 s (trapping on)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from orchestrator.boot.wfx import (
    WFX_EXITS,
    WfxEvidenceError,
    WfxExits,
    WfxNeedsKernelError,
    choose_method,
    parse_kernel_version,
    parse_stat_file,
    parse_wfx_exits,
    verify_notrap,
    vm_dirs_of,
    wfi_exit_rate,
    wfx_exits_fact,
    wfx_exits_script,
)
from orchestrator.config.inventory import UnitSpec
from orchestrator.config.profile import load_profile, resolve
from orchestrator.core.errors import InputError, ParseError

pytestmark = pytest.mark.unit

NOTRAP = {"kvm-arm.wfi_trap_policy": "notrap", "kvm-arm.wfe_trap_policy": "notrap"}
ARTIFACT = {"deb": "/srv/k/linux-image-6.1.0-41-rt-arm64_6.1.158-1_arm64.deb", "package": None,
            "release": "6.1.0-41-rt-arm64"}


# ---- kernel releases -----------------------------------------------------------------------------------
@pytest.mark.parametrize("release, version", [
    ("6.1.0-41-arm64", (6, 1, 0)),
    ("6.12.9+bpo-arm64", (6, 12, 9)),
    ("6.11", (6, 11, 0)),
    ("5.10.120-rt70", (5, 10, 120)),
    ("6.11.0-rc3", (6, 11, 0)),
    ("2.6.32.27-xen", (2, 6, 32)),
    ("6.1.0-41-rt-arm64\n", (6, 1, 0)),
])
def test_kernel_release_parses(release, version):
    assert parse_kernel_version(release) == version


@pytest.mark.parametrize("release", ["", "linux-6.1", "6", "6.x", "v6.11", "6.-1"])
def test_kernel_release_garbage_is_a_parse_error(release):
    with pytest.raises(ParseError, match="not a kernel release"):
        parse_kernel_version(release)


# ---- the method ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch, release", [("aarch64", "6.12.9+bpo-arm64"), ("arm64", "6.11"),
                                           ("aarch64", "6.11.0-1-arm64")])
def test_linux_6_11_and_later_use_the_boot_parameters(arch, release):
    m = choose_method(arch, release, {"wfi": "notrap", "wfe": "notrap", "kernel": None})
    assert m.method == "cmdline"
    assert m.add == NOTRAP
    assert m.artifact is None and release in m.reason


def test_boot_parameters_win_over_a_named_kernel_when_the_host_has_them():
    m = choose_method("aarch64", "6.12.9+bpo-arm64", {"kernel": ARTIFACT})
    assert (m.method, m.add, m.artifact) == ("cmdline", NOTRAP, None)
    assert "not needed" in m.reason


@pytest.mark.parametrize("release", ["6.1.0-41-arm64", "6.10.14", "5.10.120-rt70"])
def test_older_arm64_kernels_use_the_named_patched_kernel(release):
    m = choose_method("aarch64", release, {"wfi": "notrap", "wfe": "notrap", "kernel": ARTIFACT})
    assert m.method == "kernel"
    assert m.artifact == ARTIFACT and m.add == {}
    assert not m.running
    assert "install and boot the patched kernel /srv/k/linux-image-6.1.0-41-rt-arm64" in m.reason


def test_a_host_already_running_the_patched_kernel_says_so():
    m = choose_method("aarch64", "6.1.0-41-rt-arm64", {"kernel": ARTIFACT})
    assert (m.method, m.running) == ("kernel", True)
    assert "already runs the patched kernel" in m.reason


@pytest.mark.parametrize("params", [{"wfi": "notrap", "wfe": "notrap", "kernel": None}, {}])
def test_older_arm64_kernel_without_a_named_kernel_is_refused_with_the_fix(params):
    with pytest.raises(WfxNeedsKernelError) as exc:
        choose_method("aarch64", "6.1.0-41-arm64", params)
    assert isinstance(exc.value, InputError)
    msg = str(exc.value)
    assert "host kernel 6.1.0-41-arm64 (Linux 6.1)" in msg
    assert "need Linux >= 6.11" in msg
    assert "`wfx_notrap: {kernel: {deb: " in msg
    assert "kvm-arm.wfi_trap_policy=notrap" in msg


@pytest.mark.parametrize("arch", ["x86_64", "riscv64"])
def test_other_architectures_have_nothing_to_untrap(arch):
    m = choose_method(arch, "6.1.0-41-amd64", {"kernel": None})
    assert m.method == "not_applicable"
    assert m.add == {} and m.artifact is None
    assert f"on {arch} there is nothing to untrap" in m.reason and "arm64 instructions" in m.reason


def test_method_from_a_resolved_profile(tmp_path):
    """End to end from YAML: the artifact the profile resolves is the one the method carries."""
    (tmp_path / "debs").mkdir()
    deb = tmp_path / "debs" / "k_1_arm64.deb"
    deb.write_bytes(b"!<arch>\n")
    p = tmp_path / "p.yaml"
    p.write_text("name: p\nhost:\n  wfx_notrap:\n    kernel: {deb: debs/k_1_arm64.deb, release: 6.1.0-9-rt-arm64}\n")
    unit = UnitSpec.model_validate({"host": {"address": "127.0.0.1"}, "vars": {}})
    [spec] = resolve(load_profile(p), "u", unit)
    m = choose_method("aarch64", "6.1.0-41-arm64", spec.params)
    assert m.method == "kernel"
    assert m.artifact == {"deb": str(deb), "package": None, "release": "6.1.0-9-rt-arm64"}
    assert choose_method("aarch64", "6.13.1-arm64", spec.params).add == NOTRAP


# ---- KVM debugfs counters ------------------------------------------------------------------------------
def test_stat_file_is_one_integer_and_a_newline():
    assert parse_stat_file("6600\n") == 6600
    assert parse_stat_file("0\n") == 0
    for bad in ("6600", "", "\n", "6600\n6732\n", "-1\n", "66 00\n", "0x10\n"):
        with pytest.raises(ParseError, match="one decimal integer and a newline"):
            parse_stat_file(bad)


def _probe(uptime="12722.14", debugfs="yes", access="yes", kvm="yes", vms=(), wfi="6600\n", wfe="17\n"):
    out = f"uptime {uptime}\ndebugfs {debugfs}\naccess {access}\nkvm {kvm}\n"
    out += "".join(f"vm {v}\n" for v in vms)
    for name, raw in (("wfi_exit_stat", wfi), ("wfe_exit_stat", wfe)):
        out += f"absent {name}\n" if raw is None else f"@@ {name}\n{raw}"
    return out + "end\n"


def test_counters_parse():
    e = parse_wfx_exits(_probe(vms=("4242-11", "4243-12")))
    assert e == WfxExits(scope="global", available=True, wfi=6600, wfe=17, uptime_s=12722.14,
                         vms=["4242-11", "4243-12"])
    assert vm_dirs_of(e, 4242) == ["4242-11"] and vm_dirs_of(e, 424) == []


@pytest.mark.parametrize("kwargs, scope, reason", [
    ({"debugfs": "no", "kvm": "no", "wfi": None, "wfe": None}, "global", "debugfs is not mounted"),
    ({"access": "no", "kvm": "no", "wfi": None, "wfe": None}, "global", "readable by root only"),
    ({"kvm": "no", "wfi": None, "wfe": None}, "global", "/sys/kernel/debug/kvm does not exist"),
    ({"wfi": None, "wfe": None}, "global", "wfi_exit_stat, wfe_exit_stat absent in /sys/kernel/debug/kvm"),
    ({"wfe": None}, "4242-11", "wfe_exit_stat absent in /sys/kernel/debug/kvm/4242-11 (that VM is gone"),
])
def test_counters_not_available_carry_no_numbers(kwargs, scope, reason):
    e = parse_wfx_exits(_probe(vms=("4242-11",), **kwargs), scope)
    assert not e.available
    assert reason in e.reason
    assert (e.wfi, e.wfe, e.vms) == (None, None, [])


@pytest.mark.parametrize("text, match", [
    (_probe()[:-4], "final `end`"),
    (_probe().replace("access yes\n", ""), "probe lines for access"),
    (_probe(wfe=None).replace("absent wfe_exit_stat\n", ""), "probe lines for wfe_exit_stat"),
    (_probe(wfi=""), "one decimal integer"),  # an empty file: the next header is not a number
    (_probe(wfi="6600"), "one decimal integer"),  # no newline: the next header is glued to it
    (_probe().replace("uptime 12722.14", "uptime soon"), "seconds from /proc/uptime"),
    (_probe(vms=("../etc",)), "unexpected line"),
])
def test_counter_probe_output_that_does_not_parse(text, match):
    with pytest.raises(ParseError, match=match):
        parse_wfx_exits(text)


def _run_probe(tmp_path: Path, vm: str | None = None) -> str:
    return subprocess.run(["sh", "-c", wfx_exits_script(vm, debugfs=str(tmp_path))], capture_output=True,
                          text=True, check=True).stdout


def test_probe_script_reads_real_files_in_debugfs_format(tmp_path):
    """The shell probe on a tree laid out like KVM's debugfs, with the lab notes' counter value."""
    kvm = tmp_path / "kvm"
    (kvm / "4242-11").mkdir(parents=True)
    (kvm / "wfi_exit_stat").write_text("6600\n")
    (kvm / "wfe_exit_stat").write_text("17\n")
    (kvm / "4242-11" / "wfi_exit_stat").write_text("6732\n")
    (kvm / "4242-11" / "wfe_exit_stat").write_text("3\n")
    out = _run_probe(tmp_path)
    assert "debugfs no\n" in out  # a temporary directory is not a debugfs mount ...
    assert not parse_wfx_exits(out).available
    e = parse_wfx_exits(out.replace("debugfs no\n", "debugfs yes\n"))  # ... so pretend, to check the rest
    assert (e.available, e.wfi, e.wfe, e.vms) == (True, 6600, 17, ["4242-11"])
    one = parse_wfx_exits(_run_probe(tmp_path, "4242-11").replace("debugfs no\n", "debugfs yes\n"), "4242-11")
    assert (one.scope, one.wfi, one.wfe) == ("4242-11", 6732, 3)
    gone = parse_wfx_exits(_run_probe(tmp_path, "9-9").replace("debugfs no\n", "debugfs yes\n"), "9-9")
    assert not gone.available and "absent in /sys/kernel/debug/kvm/9-9" in gone.reason


def test_probe_script_on_this_machine_agrees_with_its_mounts():
    """The real probe, unprivileged paths included, on the machine running the tests."""
    out = subprocess.run(["sh", "-c", WFX_EXITS.argv[2]], capture_output=True, text=True, check=True).stdout
    e = parse_wfx_exits(out)
    mounted = any(line.split()[1:3] == ["/sys/kernel/debug", "debugfs"]
                  for line in Path("/proc/mounts").read_text().splitlines())
    if not mounted:
        assert not e.available and "debugfs is not mounted" in e.reason
    assert e.uptime_s > 0
    if not Path("/sys/kernel/debug/kvm/wfi_exit_stat").exists():
        assert not e.available and e.wfi is None


def test_counter_fact_needs_sudo_and_refuses_odd_vm_names():
    assert WFX_EXITS.sudo and WFX_EXITS.name == "wfx_exits"
    fact = wfx_exits_fact("4242-11")
    assert fact.sudo and fact.name == "wfx_exits:4242-11"
    assert 'd="$k"/4242-11' in fact.argv[2]
    assert fact.parse(_probe()).scope == "4242-11"
    for bad in ("../../etc", "4242", "a-b", "1-2; reboot"):
        with pytest.raises(ValueError, match="expected <pid>-<fd>"):
            wfx_exits_fact(bad)


# ---- rates and the verdict -----------------------------------------------------------------------------
def test_rate_of_the_lab_notes_figures():
    assert wfi_exit_rate(6600, 6732, 5) == pytest.approx(26.4)
    assert wfi_exit_rate(6732, 6732, 5) == 0.0
    with pytest.raises(WfxEvidenceError, match="went down from 6732 to 12"):
        wfi_exit_rate(6732, 12, 5)
    with pytest.raises(ValueError, match="must be positive"):
        wfi_exit_rate(6600, 6732, 0)


@pytest.mark.parametrize("before, after, in_effect, drop, text", [
    (26.4, 0.0, True, 1.0, "near zero"),
    (26.4, 0.8, True, pytest.approx(0.9697, abs=1e-3), "near zero"),
    (26.4, 2.4, True, pytest.approx(0.909, abs=1e-3), "down 91% (>= 90%), no-trap is in effect"),
    (26.4, 5.0, False, pytest.approx(0.8106, abs=1e-3), "down only 81%"),
    (26.4, 30.0, False, pytest.approx(-0.136, abs=1e-3), "up 14%"),
])
def test_verdict(before, after, in_effect, drop, text):
    v = verify_notrap(before, after)
    assert (v.in_effect, v.drop, v.already_untrapped) == (in_effect, drop, False)
    assert text in v.reason and f"{before:.1f} -> {after:.1f} WFI exits/s" in v.reason
    assert (v.rate_before, v.rate_after) == (before, after)


def test_verdict_when_wfi_did_not_trap_before_either():
    v = verify_notrap(0.0, 0.0)
    assert v.in_effect and v.already_untrapped and v.drop is None
    assert "proves nothing about the change" in v.reason
    worse = verify_notrap(0.4, 12.0)
    assert not worse.in_effect and worse.already_untrapped and "appeared after the change" in worse.reason
    with pytest.raises(ValueError):
        verify_notrap(-1.0, 0.0)


def test_a_trial_without_a_rate_from_before_records_why_and_the_report_says_unreadable():
    """CI, 2026-12-07: a wfx_notrap trial ended with no evidence at all. Now an unreadable 'before' is recorded
    with its reason, and the report line says "unreadable", not "0.0/s"."""
    from types import SimpleNamespace

    from orchestrator.run.apply import evidence_note
    from orchestrator.run.boot import BootChangeRunner

    plan = SimpleNamespace(wfi_rate_before=None, wfi_unread_why="debugfs is not mounted", evidence=None)
    problem = BootChangeRunner.wfx_evidence(SimpleNamespace(), "u1", SimpleNamespace(target="host"), plan)
    assert problem is not None and "debugfs is not mounted" in problem and "cannot verify" in problem
    wfi = plan.evidence["wfi_exits"]
    assert wfi["in_effect"] is False and wfi["rate_before"] is None and wfi["reason"] == problem
    note = evidence_note(SimpleNamespace(evidence=plan.evidence))
    assert "unreadable before, unreadable on the trial boot" in note and "0.0/s" not in note
    note = evidence_note(SimpleNamespace(evidence={"wfi_exits": {"rate_before": 26.4, "rate_after": 0.2,
                                                                 "reason": "dropped"}}))
    assert "26.4/s before, 0.2/s on the trial boot: dropped" in note
    assert evidence_note(SimpleNamespace(evidence=None)) == ""
