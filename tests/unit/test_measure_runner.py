"""The runner's pure parts: durations, cyclictest and load command lines, argument validation."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from orchestrator.errors import InputError
from orchestrator.measure.model import CyclictestSettings, LoadSpec
from orchestrator.measure.runner import cyclictest_argv, load_argv, parse_duration

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("text,seconds", [("60", 60), ("60s", 60), ("5m", 300), ("1h", 3600), ("1500ms", 1.5),
                                          (" 2.5 s ", 2.5)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "sixty", "60x", "-5s", "0.5s", "5 m s"])
def test_bad_durations_say_what_is_expected(text):
    with pytest.raises(InputError, match="duration"):
        parse_duration(text)


def test_cyclictest_argv_pins_one_thread_per_cpu_with_a_histogram():
    argv = cyclictest_argv(CyclictestSettings(cpus=[1, 3], duration_s=30, histogram_us=5000))
    assert argv[:2] == ["cyclictest", "-m"]
    assert {"-q", "-p95", "-i1000", "-t2", "-a1,3", "-D30s", "-h5000", "--policy=fifo"} <= set(argv)


def test_load_argv_bounds_the_load_and_rejects_shell_metacharacters():
    argv = load_argv(LoadSpec(kind="stress-ng", args=["--cpu", "2"]), 30)
    assert argv == ["stress-ng", "--cpu", "2", "--timeout", "60s", "--quiet"]
    assert load_argv(LoadSpec(kind="none"), 30) is None
    # a shell metacharacter, or a newline after an allowed argument, is refused by the model itself, before any
    # command line is built
    for bad in ("2;reboot", "2\n", "2\nreboot", "", "x" * 257):
        with pytest.raises(ValidationError, match="load argument"):
            LoadSpec(kind="stress-ng", args=["--cpu", bad])


def test_preamble_reads_boot_and_cmdline_in_one_command_and_names_missing_packages():
    from orchestrator.errors import TuneError
    from orchestrator.measure.runner import preamble
    from orchestrator.transport import LocalTransport

    t = LocalTransport()
    boot_id, cmdline = preamble(t, ["sh"])
    assert boot_id == open("/proc/sys/kernel/random/boot_id").read().strip()
    assert cmdline == open("/proc/cmdline").read().strip()
    with pytest.raises(TuneError, match=r"local: missing no-such-tool-1 \(Debian packages: \?\)"):
        preamble(t, ["sh", "no-such-tool-1"])
