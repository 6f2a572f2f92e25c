"""The runner's pure parts: durations, cyclictest and load command lines, argument validation."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from orchestrator.core.errors import InputError
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


def test_a_run_is_one_round_trip_that_passes_every_word_as_it_is_and_names_missing_packages(tmp_path):
    """The run script over a real `sh` (LocalTransport): tools checked first, then the boot and cmdline, then
    the load and the command with their words unchanged (spaces, quotes, `$(...)`, more than nine of them)."""
    from orchestrator.core.errors import TuneError
    from orchestrator.measure.runner import run_under_load
    from orchestrator.remote.local import LocalTransport

    t = LocalTransport()
    loaded, ran = tmp_path / "loaded", tmp_path / "ran"
    words = ["a b", "'q'", '"dq"', "$(touch x)", "*", "", "-n", "tab\tx", "w9", "w10", "w11"]
    load = ["sh", "-c", 'printf "%s\\n" "$@" > "$0"', str(loaded), *words]
    command = ["sh", "-c", 'printf "%s|" "$@"; echo >> "$0"; exit 3', str(ran), *words]
    out = run_under_load(t, ["sh", "cat"], load, "rt-tune-load-test", 0, command, timeout_s=30)
    assert out.boot_id == open("/proc/sys/kernel/random/boot_id").read().strip()
    assert out.cmdline == open("/proc/cmdline").read().strip()
    assert loaded.read_text() == "".join(w + "\n" for w in words)  # the load ran with its words as given
    assert out.result.stdout == "".join(w + "|" for w in words) and ran.exists()  # then the command, its own
    assert out.result.exit_status == 3  # and the command's exit status is the run's
    assert not (tmp_path / "x").exists() and not (Path.cwd() / "x").exists()

    ran.unlink()
    with pytest.raises(TuneError, match=r"local: missing no-such-tool-1, no-such-tool-2 \(Debian packages: \?\)"):
        run_under_load(t, ["sh", "no-such-tool-1", "no-such-tool-2"], load, "u", 0, command, timeout_s=30)
    with pytest.raises(TuneError, match=r"local: the load did not start \(false; exit 1\)"):
        run_under_load(t, ["sh"], ["false"], "u", 0, command, timeout_s=30)
    assert not ran.exists()  # nothing ran after a missing tool or a load that did not start
    out = run_under_load(t, ["sh"], None, "u", 0.1, ["echo", "no load"], timeout_s=30)
    assert out.result.stdout == "no load\n" and out.result.exit_status == 0
