"""A change in as few round trips as its kind allows, on real commands: `write_run_read` (write a file, run one
command, read files back: one command) and a sysctl planned with the unit's facts in one round trip, applied
and read back in one, on a private network namespace whose `net.ipv4.ip_forward` and /etc/sysctl.d are its own
(nothing of this machine changes; the test checks that)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.changes.base import plan_all
from orchestrator.changes.sysctl import SysctlChange
from orchestrator.core.errors import CommandFailed, ParseError
from orchestrator.facts.base import BASIC_FACTS, basic_facts
from orchestrator.remote.local import LocalTransport
from orchestrator.remote.transport import write_run_read

pytestmark = pytest.mark.unit

FORWARD = "/proc/sys/net/ipv4/ip_forward"


class CountingTransport(LocalTransport):
    """LocalTransport whose commands run inside `prefix` (nsenter into a namespace), counted."""

    def __init__(self, prefix: list[str] | None = None) -> None:
        super().__init__()
        object.__setattr__(self, "prefix", prefix or [])
        object.__setattr__(self, "calls", [])

    def _exec(self, argv, **kw):
        self.calls.append(list(argv))
        return super()._exec([*self.prefix, *argv], **kw)


@pytest.fixture
def netns(tmp_path) -> Iterator[tuple[CountingTransport, Path]]:
    """A process holding a new network and mount namespace in which /etc/sysctl.d is an empty directory of
    this test; commands enter it with nsenter."""
    if os.geteuid() != 0 or not shutil.which("nsenter") or not shutil.which("unshare"):
        pytest.skip("needs root, unshare and nsenter (util-linux) for a private network namespace")
    sysctl_d = tmp_path / "sysctl.d"
    sysctl_d.mkdir()
    holder = subprocess.Popen(["unshare", "--net", "--mount", "--propagation", "private", "sh", "-c",
                               'mount --bind "$0" /etc/sysctl.d && echo ready && exec sleep 600', str(sysctl_d)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        yield CountingTransport(["nsenter", "-t", str(holder.pid), "--net", "--mount", "--"]), sysctl_d
    finally:
        holder.kill()
        holder.wait()


def test_a_sysctl_planned_with_the_facts_in_one_round_trip_applied_and_verified_in_one(netns):
    t, sysctl_d = netns
    host_value = Path(FORWARD).read_text()
    host_dropins = sorted(os.listdir("/etc/sysctl.d"))
    assert t.run(["cat", FORWARD]).stdout == "0\n"  # a new namespace starts with forwarding off
    t.calls.clear()
    change = SysctlChange("net.ipv4.ip_forward", "1")

    facts, [plan] = plan_all(t, [change], BASIC_FACTS)
    assert len(t.calls) == 1
    assert basic_facts("ns", facts).kernel_release == os.uname().release
    assert plan.before == {"value": "0", "dropin": None} and not plan.noop

    live = change.apply_and_read(t, plan.before)
    assert len(t.calls) == 2
    assert change.verify(t, plan, live) == live and len(t.calls) == 2  # verified on what apply read back
    dropin = sysctl_d / "90-rt-tune-net.ipv4.ip_forward.conf"
    assert dropin.read_bytes() == b"# managed by rt-tune: sysctl.net.ipv4.ip_forward\n-net.ipv4.ip_forward = 1\n"
    assert stat.S_IMODE(dropin.stat().st_mode) == 0o644
    assert sorted(p.name for p in sysctl_d.iterdir()) == [dropin.name]  # no temp file left
    assert t.run(["cat", FORWARD]).stdout == "1\n"

    _, [again] = plan_all(t, [change])
    assert again.noop
    change.rollback(t, plan.before)
    change.verify_rolled_back(t, plan.before)
    assert not dropin.exists() and t.run(["cat", FORWARD]).stdout == "0\n"
    assert Path(FORWARD).read_text() == host_value and sorted(os.listdir("/etc/sysctl.d")) == host_dropins


def test_a_missing_sysctl_is_named_when_planned_in_a_batch(netns):
    t, _ = netns
    with pytest.raises(ParseError, match=r"no sysctl net\.ipv4\.no_such_knob \(/proc/sys/net/ipv4/no_such_knob"):
        plan_all(t, [SysctlChange("net.ipv4.no_such_knob", "1")], BASIC_FACTS)


def test_write_run_read_keeps_arguments_whole_and_reads_back_exact_bytes(tmp_path):
    t = CountingTransport()
    target = tmp_path / "a dir $(touch x)" / "f;*.conf"
    target.parent.mkdir()
    out = tmp_path / "out *"
    data = b"line one\n\x00\xff no newline at the end"
    got = write_run_read(t, str(target), data, mode=0o640,
                         command=("sh", "-c", 'printf "%s|" "$@" > "$0"; echo dropped', str(out), "a  b", "*", " "),
                         read=(str(target), str(out), str(tmp_path / "absent")))
    assert len(t.calls) == 1
    assert got == {str(target): data, str(out): b"a  b|*| |", str(tmp_path / "absent"): None}
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    # the command ran with the caller's umask, not the 077 of the temp file
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~_umask()
    assert not (tmp_path / "x").exists() and not Path("x").exists()  # no $(...) ran


def test_write_run_read_a_failing_command_is_an_error_and_nothing_is_read(tmp_path):
    t = CountingTransport()
    target = tmp_path / "f"
    with pytest.raises(CommandFailed, match="no_such_program"):
        write_run_read(t, str(target), b"x", command=("no_such_program",), read=(str(target),))
    assert target.read_bytes() == b"x"  # written first: a change's rollback restores it from what it read before
    for bad in (("",), ("a\x1fb",)):
        with pytest.raises(ValueError, match="empty argument or unit separator"):
            write_run_read(t, str(target), b"y", command=bad)
    assert target.read_bytes() == b"x" and len(t.calls) == 1


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_sysctl_apply_is_one_round_trip_where_it_was_two(netns):
    """The apply alone (no read back), as a measurement's switch or a rollout's apply uses it."""
    t, sysctl_d = netns
    change = SysctlChange("net.ipv4.ip_forward", "1")
    before = change.read(t)
    start = len(t.calls)
    change.apply(t, before)
    assert len(t.calls) == start + 1
    assert t.run(["cat", FORWARD]).stdout == "1\n" and (sysctl_d / "90-rt-tune-net.ipv4.ip_forward.conf").exists()
