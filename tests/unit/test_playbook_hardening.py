"""Issue #15 items 12 and 6 (the `tune measure` half): bad measurement plans, rollout policies and
`tune measure` flags are refused before anything is touched, with FILE:LINE: key, the value and what was
expected.

Hostile plans are the bundled playbooks/measurement.yaml with one line changed here; the CLI tests use an
inventory whose unit is a closed port, so any attempt to connect would end in exit 5, not the exit 2
expected."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.config.playbook import load_decision_rule, load_measurement_plan, load_rollout_policy
from orchestrator.core.errors import InputError
from orchestrator.measure.model import CyclictestSettings, LoadSpec
from orchestrator.measure.runner import cyclictest_argv, measurement_from_flags
from orchestrator.stats.decide import MeasurementPlan
from tests.conftest import REPO

pytestmark = pytest.mark.unit

PLAN = (REPO / "playbooks" / "measurement.yaml").read_text()
ROLLOUT = (REPO / "playbooks" / "rollout.yaml").read_text()


def changed(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"{old!r} occurs {text.count(old)} times"
    return text.replace(old, new)


def write(tmp_path: Path, text: str, name: str = "plan.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def line_of(text: str, fragment: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if fragment in line)


def key_line(text: str, key: str) -> int:
    """The line of `key` ("decision.guards.max_us"; list indices skipped) in a block-style YAML text."""
    parts = [p for p in key.split(".") if not p.isdigit()]
    lines = text.splitlines()
    n = next(i for i, line in enumerate(lines) if line.startswith(parts[0] + ":"))
    for part in parts[1:]:
        n = next(i for i in range(n + 1, len(lines)) if lines[i].strip().startswith(part + ":"))
    return n + 1


# ------------------------------------------------------------------------------------------ measurement plans


def test_the_bundled_playbooks_are_valid():
    for path in (REPO / "playbooks" / "measurement.yaml", REPO / "playbooks" / "measurement-lab.yaml",
                 REPO / "tests" / "lab" / "playbook-fast.yaml",
                 REPO / "tests" / "fleet" / "playbook-fleet.yaml"):
        plan = load_measurement_plan(path)
        assert plan.cyclictest.duration_s == plan.decision.run_duration_s
    assert load_rollout_policy(REPO / "playbooks" / "rollout.yaml").policy.max_in_flight == 4


# (the line as in playbooks/measurement.yaml, its replacement, the key, the value as reported, expected text)
PLAN_MUTATIONS = [
    ("cpus: [1] ", "cpus: [99999999999, -1] ", "cyclictest.cpus.0", "99999999999",
     "less than or equal to 8191"),
    ("cpus: [1] ", "cpus: [99999999999, -1] ", "cyclictest.cpus.1", "-1", "greater than or equal to 0"),
    ("cpus: [1] ", "cpus: [1, 3, 1] ", "cyclictest.cpus", "[1, 3, 1]", "CPU 1 listed more than once"),
    ("cpus: [1] ", "cpus: [] ", "cyclictest.cpus", "[]", "at least 1 item"),
    ("cpus: [1] ", "cpus: [true] ", "cyclictest.cpus.0", "True", "not a boolean"),
    ("cpus: [1] ", 'cpus: ["1"] ', "cyclictest.cpus.0", "'1'", "valid integer"),
    ("priority: 95 ", "priority: 1000 ", "cyclictest.priority", "1000", "less than or equal to 99"),
    ("priority: 95 ", "priority: 0 ", "cyclictest.priority", "0", "policy fifo needs a priority of 1..99"),
    ("priority: 95 ", "priority: true ", "cyclictest.priority", "True", "not a boolean"),
    ("priority: 95 ", 'priority: "95" ', "cyclictest.priority", "'95'", "valid integer"),
    ("priority: 95 ", "priority: 95.0 ", "cyclictest.priority", "95.0", "valid integer"),
    ("policy: fifo", "policy: other", "cyclictest.priority", "95", "policy other takes priority 0"),
    ("policy: fifo", "policy: deadline", "cyclictest.policy", "'deadline'", "'fifo', 'rr', 'other'"),
    ("interval_us: 1000 ", "interval_us: 0 ", "cyclictest.interval_us", "0", "greater than or equal to 1"),
    ("interval_us: 1000 ", "interval_us: 1000001 ", "cyclictest.interval_us", "1000001",
     "less than or equal to 1000000"),
    ("interval_us: 1000 ", "interval_us: 3000000 ", "cyclictest.interval_us", "3000000",
     "less than or equal"),
    ("histogram_us: 20000 ", "histogram_us: -1 ", "cyclictest.histogram_us", "-1",
     "greater than or equal to 1"),
    ("histogram_us: 20000 ", "histogram_us: 0 ", "cyclictest.histogram_us", "0",
     "greater than or equal to 1"),
    ("histogram_us: 20000 ", "histogram_us: 1000001 ", "cyclictest.histogram_us", "1000001",
     "less than or equal to 1000000"),
    ("cpus: [1] ", f"cpus: [{', '.join(map(str, range(201)))}] ",
     "cyclictest.histogram_us", "20000", "20000 buckets x 201 threads is more than 4,000,000"),
    ("duration_s: 20 ", "duration_s: 0 ", "cyclictest.duration_s", "0", "greater than or equal to 1"),
    ("duration_s: 20 ", "duration_s: .nan ", "cyclictest.duration_s", "nan", "finite number"),
    ("duration_s: 20 ", "duration_s: 20.5 ", "cyclictest.duration_s", "20.5", "whole seconds"),
    ("mlockall: true", 'mlockall: "yes"', "cyclictest.mlockall", "'yes'", "valid boolean"),
    ("mlockall: true", "mlockall: 1", "cyclictest.mlockall", "1", "valid boolean"),
    ('args: ["--cpu", "1", "--vm", "1", "--vm-bytes", "64M"]', 'args: ["--cpu", "1;reboot"]', "load.args",
     "['--cpu', '1;reboot']", "load argument '1;reboot'"),
    ('args: ["--cpu", "1", "--vm", "1", "--vm-bytes", "64M"]', 'args: ["--cpu", "1\\n"]', "load.args",
     "['--cpu', '1\\n']", "load argument '1\\n'"),
    ('args: ["--cpu", "1", "--vm", "1", "--vm-bytes", "64M"]', 'args: ["--cpu", 1]', "load.args.1", "1",
     "valid string"),
    ("  kind: stress-ng", "  kind: none", "load", "", "args given for load kind 'none'"),
    ("settle_s: 2 ", "settle_s: -1 ", "load.settle_s", "-1", "greater than or equal to 0"),
    ("settle_s: 2 ", "settle_s: 61 ", "load.settle_s", "61", "less than or equal to 60"),
    ("settle_s: 2 ", "settle_s: .nan ", "load.settle_s", "nan", "finite number"),
    ("settle_s: 2 ", 'settle_s: "2" ', "load.settle_s", "'2'", "valid number"),
    ("settle_s: 2 ", "settle_s: true ", "load.settle_s", "True", "not a boolean"),
    ("run_duration_s: 20", "run_duration_s: 10", "decision", "",
     "run_duration_s (10) must be the same as cyclictest.duration_s (20)"),
    ("confidence: 0.95 ", "confidence: 0.4 ", "decision.confidence", "0.4", "greater than or equal to 0.5"),
    ("confidence: 0.95 ", "confidence: 1 ", "decision.confidence", "1", "less than 1"),
    ("confidence: 0.95 ", "confidence: .nan ", "decision.confidence", "nan", "finite number"),
    ("confidence: 0.95 ", 'confidence: "0.95" ', "decision.confidence", "'0.95'", "valid number"),
    ("k_min: 6 ", "k_min: 1 ", "decision.k_min", "1", "greater than or equal to 2"),
    ("k_min: 6 ", "k_min: 6.0 ", "decision.k_min", "6.0", "valid integer"),
    ("k_max: 40 ", "k_max: 4 ", "decision", "", "k_min (6) is larger than k_max (4)"),
    ("look_every: 2 ", "look_every: 0 ", "decision.look_every", "0", "greater than or equal to 1"),
    ("power: 0.95 ", "power: 1 ", "decision.power", "1", "less than 1"),
    ("power: 0.95 ", "power: 0 ", "decision.power", "0", "greater than 0"),
    ("boots_per_side: 3 ", "boots_per_side: 0 ", "decision.boots_per_side", "0", "greater than or equal to 1"),
    ("max_time_s: 1600 ", "max_time_s: 100 ", "decision", "", "below k_min (6)"),
    ("min_effect: 0.05 ", "min_effect: -0.1 ", "decision.min_effect", "-0.1", "greater than 0"),
    ("max_us: 0.25 ", "max_us: -1 ", "decision.guards.max_us", "-1", "greater than or equal to 0"),
    ("max_us: 0.25 ", "max_us: .inf ", "decision.guards.max_us", "inf", "finite number"),
    ("bootstrap_resamples: 2000", "bootstrap_resamples: 1000000000", "decision.bootstrap_resamples",
     "1000000000", "less than or equal to 100000"),
    ("seed: 0", "seed: -1", "decision.seed", "-1", "greater than or equal to 0"),
]


@pytest.mark.parametrize("old, new, key, got, expected", PLAN_MUTATIONS)
def test_a_bad_plan_is_refused_with_file_line_key_and_value(tmp_path, old, new, key, got, expected):
    text = changed(PLAN, old, new)
    path = write(tmp_path, text)
    with pytest.raises(InputError) as err:
        load_measurement_plan(path)
    msg = str(err.value)
    problem = next((line for line in msg.splitlines() if f": {key}: " in line), None)
    assert problem is not None, msg
    assert expected in problem, msg
    if got:
        assert f"(got {got})" in problem, msg
    assert problem.strip().startswith(f"{path}:{key_line(text, key)}: {key}: "), msg


def test_the_rule_alone_is_read_with_the_same_checks(tmp_path):
    path = write(tmp_path, changed(PLAN, "k_max: 40 ", "k_max: 101 "))
    with pytest.raises(InputError, match=r"decision\.k_max: Input should be less than or equal to 100"):
        load_decision_rule(path)


def test_every_plan_accepted_gives_a_command_line_cyclictest_runs_as_written():
    """The checks exist so that cyclictest never silently changes what was asked (HIST_MAX, policy switch)."""
    s = CyclictestSettings(cpus=[2, 3], policy="rr", priority=1, interval_us=1, duration_s=1,
                           histogram_us=1_000_000, mlockall=False)
    assert cyclictest_argv(s) == ["cyclictest", "-q", "-p1", "-i1", "-t2", "-a2,3", "-D1s", "-h1000000",
                                  "--policy=rr"]
    other = CyclictestSettings(policy="other", priority=0)
    assert {"-p0", "--policy=other"} <= set(cyclictest_argv(other))


def test_an_anchored_yaml_boolean_is_not_a_number_either():
    """ruamel reads `&a true` as ScalarBoolean, an int subclass that strict int alone would take as 1."""
    from ruamel.yaml import YAML

    doc = YAML(typ="rt").load("priority: &a true\nhistogram_us: &b false\n")
    for key in ("priority", "histogram_us"):
        with pytest.raises(ValueError, match=f"{key}\n  Value error, expected a number, not a boolean"):
            CyclictestSettings(**{key: doc[key]})


def test_plans_built_in_python_get_the_same_checks():
    with pytest.raises(ValueError, match="less than or equal to 8191"):
        CyclictestSettings(cpus=[8192])
    with pytest.raises(ValueError, match="must be the same as cyclictest.duration_s"):
        MeasurementPlan(cyclictest=CyclictestSettings(duration_s=20), load=LoadSpec(),
                        decision={"run_duration_s": 10})


# ------------------------------------------------------------------------------------------ rollout policy


@pytest.mark.parametrize("old, new, key, expected", [
    ("canary: 1 ", "canary: true ", "canary", "count or a percentage"),
    ("canary: 1 ", "canary: 2.5 ", "canary", "count or a percentage"),
    ("canary: 1 ", 'canary: "1_0%" ', "canary", "count or a percentage"),
    ("canary: 1 ", 'canary: "\u0661\u0660%" ', "canary", "count or a percentage"),
    ("canary: 1 ", "canary: 10000000 ", "canary", "0..100000"),
    ('batch: "25%"', 'batch: "250%"', "batch", "percentage must be in (0, 100]"),
    ("max_in_flight: 4 ", 'max_in_flight: "4" ', "max_in_flight", "valid integer"),
    ("max_in_flight: 4 ", "max_in_flight: true ", "max_in_flight", "not a boolean"),
    ("max_fail_percent: 10 ", "max_fail_percent: .nan ", "max_fail_percent", "finite number"),
    ("max_fail_percent: 10 ", 'max_fail_percent: "10" ', "max_fail_percent", "valid number"),
    ("  p999_us: 0.25", "  p999_us: .inf", "regression.p999_us", "finite number"),
    ("  p999_us: 0.25", "  p999_us: -0.1", "regression.p999_us", "greater than or equal to 0"),
])
def test_a_bad_rollout_policy_is_refused_with_file_line_and_key(tmp_path, old, new, key, expected):
    text = changed(ROLLOUT, old, new).replace("measurement: measurement.yaml", "measurement: plan.yaml")
    write(tmp_path, PLAN)
    path = write(tmp_path, text, "rollout.yaml")
    with pytest.raises(InputError) as err:
        load_rollout_policy(path)
    msg = str(err.value)
    line = line_of(text, new.strip())
    assert f"{path}:{line}: {key}: " in msg and expected in msg, msg


def test_a_rollout_names_its_broken_measurement_plan_before_anything_runs(tmp_path):
    plan = write(tmp_path, changed(PLAN, "interval_us: 1000 ", "interval_us: 0 "))
    path = write(tmp_path, ROLLOUT.replace("measurement: measurement.yaml", "measurement: plan.yaml"),
                 "rollout.yaml")
    with pytest.raises(InputError) as err:
        load_rollout_policy(path)
    assert f"{plan}:{line_of(plan.read_text(), 'interval_us')}: cyclictest.interval_us" in str(err.value)


# ----------------------------------------------------------------------------------------- tune measure flags


FLAGS = {"duration": "20s", "histogram_us": 20000, "interval_us": 1000}


def test_flags_build_the_same_settings_as_a_playbook():
    settings, load = measurement_from_flags(cpus="1-3", load="stress-ng", load_args=["--cpu", "1"], **FLAGS)
    assert settings == CyclictestSettings(cpus=[1, 2, 3], duration_s=20, histogram_us=20000, interval_us=1000)
    assert load == LoadSpec(kind="stress-ng", args=["--cpu", "1"])


@pytest.mark.parametrize("change, named", [
    ({"cpus": "0-99999999999"}, "--cpus: not a usable CPU list '0-99999999999': CPU 99999999999 is above"),
    ({"cpus": "1_0"}, "--cpus: not a kernel CPU list '1_0'"),
    ({"cpus": ""}, "--cpus: List should have at least 1 item"),
    ({"histogram_us": 0}, "--histogram: Input should be greater than or equal to 1 (got 0)"),
    ({"histogram_us": True}, "--histogram: expected a number, not a boolean (got True)"),
    ({"interval_us": 0}, "--interval: Input should be greater than or equal to 1 (got 0)"),
    ({"duration": "1.5s"}, ("--duration: expected whole seconds (cyclictest's -D counts seconds) "
                            "(got '1.5s')")),
    ({"duration": "\u0661\u0660s"}, "--duration: duration '\u0661\u0660s': expected a number"),
    ({"duration": "999999h"}, "--duration: Input should be less than or equal to 86400 (got '999999h')"),
    ({"load": "stress-ng", "load_args": ["--cpu", "1;reboot"]}, "--load-arg: load argument '1;reboot'"),
    ({"load_args": ["--cpu"]}, "--load-arg: args given for load kind 'none'"),
])
def test_bad_flags_are_named(change, named):
    kwargs = {"cpus": "1", **FLAGS, **change}
    with pytest.raises(InputError) as err:
        measurement_from_flags(**kwargs)
    assert named in str(err.value), str(err.value)


def test_every_bad_flag_is_reported_at_once():
    with pytest.raises(InputError) as err:
        measurement_from_flags(cpus="1", duration="20s", histogram_us=0, interval_us=0)
    msg = str(err.value)
    assert "--histogram:" in msg and "--interval:" in msg, msg


INVENTORY = """units:
  u1:
    host: {{address: 127.0.0.1, port: 1}}
    vars: {{rt_cpus: "{rt}"}}
"""


def tune(tmp_path: Path, *args: str, rt: str = "1") -> subprocess.CompletedProcess:
    inv = tmp_path / "inventory.yaml"
    inv.write_text(INVENTORY.format(rt=rt))
    env = {"RT_TUNE_STATE": str(tmp_path / "state"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], env=env, capture_output=True,
                          text=True, timeout=120, cwd=REPO, check=False)


def refused(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr and proc.stdout == "", proc.stderr
    flat = " ".join(proc.stderr.split())
    for needle in needles:
        assert needle in flat, (needle, proc.stderr)


@pytest.mark.parametrize("flags, named", [
    (["--histogram", "0", "--interval", "0"],
     ["--histogram: Input should be greater than or equal to 1 (got 0)",
      "--interval: Input should be greater than or equal to 1 (got 0)"]),
    (["--cpus", "0-99999999999"], ["--cpus: not a usable CPU list '0-99999999999'"]),
    (["--cpus", "1,1-2"], []),  # the kernel grammar allows overlapping groups: the control case below
    (["--histogram", "1000001"], ["--histogram: Input should be less than or equal to 1000000"]),
    (["--duration", "0s"], ["--duration: duration '0s': at least 1 s"]),
    (["--load", "stress-ng", "--load-arg", "x;y"], ["--load-arg: load argument 'x;y'"]),
    (["--interval", "1000000", "--duration", "5s"], ["--duration: 5 s holds fewer than 10 intervals"]),
])
def test_cli_measure_refuses_bad_flags_before_reading_the_inventory(tmp_path, flags, named):
    # a unit that does not exist and an inventory that does not exist: the flags must be refused first
    proc = tune(tmp_path, "measure", "nope.host", "-i", str(tmp_path / "missing.yaml"), *flags)
    if not named:  # valid flags get as far as the inventory, which is missing
        assert proc.returncode == 2 and "missing.yaml" in proc.stderr and "Traceback" not in proc.stderr
        return
    refused(proc, *named)
    assert "missing.yaml" not in proc.stderr


def test_cli_measure_names_a_bad_rt_cpus_var_before_connecting(tmp_path):
    # the inventory's typed vars (or, without them, tune measure itself) refuse it, naming the var and value
    refused(tune(tmp_path, "measure", "u1.host", "-i", str(tmp_path / "inventory.yaml"), rt="0-99999999999"),
            "rt_cpus", "not a usable CPU list '0-99999999999'")


def test_cli_measure_refuses_a_cpu_the_target_does_not_have_before_connecting(tmp_path):
    inv = tmp_path / "two-cpus.yaml"
    inv.write_text(INVENTORY.format(rt="1").replace("vars: {", "guest: {address: 127.0.0.1, port: 1, "
                                                     "via_host: true}\n    vars: {cpus: 2, guest_cpus: 4, "))
    refused(tune(tmp_path, "measure", "u1.host", "-i", str(inv), "--cpus", "1-2"),
            ("--cpus: not a usable CPU list '1-2': CPU 2 is above the highest CPU number 1 (unit u1's cpus "
             "var: 2 CPUs)"))
    refused(tune(tmp_path, "measure", "u1.guest", "-i", str(inv), "--cpus", "4"),
            "CPU 4 is above the highest CPU number 3 (unit u1's guest_cpus var: 4 CPUs)")
    with pytest.raises(InputError, match="not a CPU count"):
        measurement_from_flags(cpus="1", cpu_count=True, cpu_count_from="cpus var", **FLAGS)


def test_cli_apply_refuses_a_bad_playbook_before_touching_a_unit(tmp_path):
    text = changed(PLAN, "priority: 95 ", "priority: 1000 ")
    text = changed(text, "histogram_us: 20000 ", "histogram_us: -1 ")
    playbook = write(tmp_path, text, "bad-plan.yaml")
    profile = write(tmp_path, 'name: tiny\nhost:\n  sysctl:\n    kernel.timer_migration: "0"\n', "tiny.yaml")
    proc = tune(tmp_path, "apply", str(profile), "--playbook", str(playbook), "-i",
                str(tmp_path / "inventory.yaml"))
    refused(proc, f"{playbook}:{line_of(text, 'priority: 1000')}: cyclictest.priority",
            f"{playbook}:{line_of(text, 'histogram_us: -1')}: cyclictest.histogram_us")
