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


def test_a_run_reads_the_counters_right_before_and_after_the_command_in_the_same_round_trip(tmp_path):
    """The run script over this machine's real `sh` and /proc (LocalTransport): snapshot 0 before the command,
    snapshot 1 after it, the command's output and exit status exactly its own; thread counters for the TIDs
    given (this test's own process, and one that does not exist: absent, never zero)."""
    import os

    from orchestrator.measure.runner import run_under_load
    from orchestrator.remote.local import LocalTransport

    t = LocalTransport()
    calls: list = []

    class Counting:
        label = t.label

        def run(self, argv, **kw):
            calls.append(t.run(argv, **kw))
            return calls[-1]

    gone = 4_194_304  # above the largest pid_max: no such thread
    out = run_under_load(Counting(), ["sh"], None, "u", 0, ["sh", "-c", "sleep 0.3; printf x; exit 4"],
                         timeout_s=30, tids=[os.getpid(), gone])
    assert len(calls) == 1  # one round trip
    assert out.result.stdout == "x" and out.result.exit_status == 4
    d = out.counter_deltas()
    assert d is not None and d.interval_s is not None and d.interval_s >= 0.25
    assert d.boot_id_before == d.boot_id_after == out.boot_id and not d.notes
    assert d.deltas["ctxt"] > 0 and any(k.startswith("irq:") and k.endswith(":cpu0") for k in d.deltas)
    assert any(k.startswith("softirq:TIMER:cpu") for k in d.deltas)
    me = f"thread:{os.getpid()}:"
    assert {me + "voluntary_ctxt_switches", me + "nonvoluntary_ctxt_switches"} <= set(d.deltas)
    assert {d.status(f"thread:{gone}:{c}") for c in ("voluntary_ctxt_switches", "nr_migrations")} == {"absent"}
    # the raw snapshots as printed, without cyclictest's (here the command's) output
    assert out.counters_raw.count(" uptime0\n") == out.counters_raw.count(" uptime1\n") == 1
    mark = calls[0].argv[4]
    before, after = out.counters_raw.split(f"\n{mark} uptime1\n")
    assert calls[0].stdout.split("@@\n", 3)[3] == f"{before}\n{mark} run\nx\n{mark} uptime1\n{after}"
    with pytest.raises(ValueError, match="thread id"):
        run_under_load(t, ["sh"], None, "u", 0, ["true"], timeout_s=30, tids=["1;reboot"])  # type: ignore[list-item]


def test_read_counters_takes_one_snapshot_in_one_round_trip():
    from orchestrator.measure.counters import read_counters
    from orchestrator.remote.local import LocalTransport

    snap = read_counters(LocalTransport())
    assert snap.boot_id == open("/proc/sys/kernel/random/boot_id").read().strip()
    assert snap.uptime_s and snap.counters["ctxt"] > 0 and not snap.errors
    assert " uptime0\n" in snap.raw and " uptime1\n" not in snap.raw


COUNTERS = Path(__file__).resolve().parent.parent / "recorded" / "counters"
CYCLICTEST_LAB = Path(__file__).resolve().parent.parent / "recorded" / "cyclictest" / "lab"


def recorded_run_snapshots() -> tuple[str, str, str, str]:
    """(marker, snapshot before, cyclictest's output, snapshot after) of the measurement run recorded on the x86
    lab guest (tests/recorded/counters/README.md)."""
    mark = (COUNTERS / "guest-run-marker.txt").read_text().strip()
    text = (COUNTERS / "guest-run.txt").read_text().split("@@\n", 3)[3]
    before, rest = text.split(f"\n{mark} run\n")
    output, after = rest.split(f"\n{mark} uptime1\n")
    return mark, before, output, f"\n{mark} uptime1\n" + after.removesuffix(f"\n{mark} end\n")


def test_measure_keeps_the_counters_with_the_result_and_their_raw_text_beside_it(tmp_path):
    """measure() on the fake unit answering with the recorded run's counter snapshots around a recorded
    cyclictest output: the deltas are those of the recording, the raw snapshots are kept as an artifact, and
    the result's JSON (with or without counters: results made before them) loads back."""
    from orchestrator.measure.counters import counter_deltas, parse_snapshot, split_sections
    from orchestrator.measure.model import LatencyResult
    from orchestrator.measure.runner import measure
    from orchestrator.remote.fake import FakeTransport, FakeUnit

    mark, before, _, after = recorded_run_snapshots()
    boot_id = split_sections(before, mark)[1]["boot_id0"].strip()
    unit = FakeUnit(boot_id=boot_id, cmdline="root=/dev/vda ro",
                    cyclictest_outputs=[(CYCLICTEST_LAB / "guest-idle-h20000-run1.txt").read_text()],
                    counter_snapshots=[(mark, before), (mark, after)])
    settings = CyclictestSettings(cpus=[1], duration_s=20, histogram_us=20000)  # as the output was recorded
    result = measure(FakeTransport(unit, "lab1.guest"), settings, LoadSpec(), target="lab1.guest",
                     artifacts=tmp_path)
    expected = counter_deltas(parse_snapshot(split_sections(before, mark)[1], "0"),
                              parse_snapshot(split_sections(after, mark)[1], "1"))
    assert result.counters == expected and result.counters.interval_s and not result.counters.issues
    raw = Path(result.counters_artifact).read_text()
    assert raw.count(" uptime0\n") == raw.count(" uptime1\n") == 1 and Path(result.raw_artifact).exists()
    again = LatencyResult.model_validate_json(result.model_dump_json())
    assert again == result
    old = LatencyResult.model_validate(result.model_dump(exclude={"counters", "counters_artifact"}))
    assert old.counters is None and old.counters_artifact is None


def test_read_counters_on_the_fake_unit_answers_the_recorded_snapshot():
    from orchestrator.measure.counters import read_counters
    from orchestrator.remote.fake import FakeTransport, FakeUnit

    mark = (COUNTERS / "host-read-marker.txt").read_text().strip()
    text = (COUNTERS / "host-read.txt").read_text().split("@@\n", 3)[3].removesuffix(f"\n{mark} end\n")
    boot_id = text.split(" boot_id0\n")[1].split("\n")[0]
    unit = FakeUnit(boot_id=boot_id, cmdline="x", counter_snapshots=[(mark, text)])
    tids = [int(t) for t in (COUNTERS / "host-read-tids.txt").read_text().split()]
    snap = read_counters(FakeTransport(unit, "lab1.host"), tids)
    assert snap.boot_id == boot_id and snap.counters and not snap.errors
    assert {f"thread:{tids[0]}:nr_migrations", f"thread:{tids[0]}:voluntary_ctxt_switches"} <= set(snap.counters)
