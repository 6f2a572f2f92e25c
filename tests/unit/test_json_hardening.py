"""Issue #15 item 13: hostile cyclictest output, reports and JSON documents are refused with the field named.

Every hostile document is a REAL recorded cyclictest run (tests/recorded/cyclictest/lab: the x86 lab guest,
20,000-bucket histograms, stdout and --json of the same runs; tests/recorded/cyclictest/controller) with one
mutation made here: a count replaced by Infinity, a max below the min, nesting added, ... Each is fed to
the core and to the real CLI (`python -m orchestrator ...`), which must exit with the error's code, name the
field, print no traceback, and keep --json output valid JSON."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from orchestrator.core import jsonio
from orchestrator.core.errors import InputError, ParseError
from orchestrator.measure import parse
from orchestrator.measure.parse import parse_cyclictest, parse_cyclictest_file
from orchestrator.report.latency import load_report
from orchestrator.stats.ab import load_ab
from tests.conftest import RECORDED, REPO

pytestmark = pytest.mark.unit

LAB = RECORDED / "cyclictest" / "lab"
CONTROLLER = RECORDED / "cyclictest" / "controller"
RUN1_JSON = (LAB / "guest-stress-h20000-run1.json").read_text()
RUN1_TXT = (LAB / "guest-stress-h20000-run1.txt").read_text()
SUMMARY = (CONTROLLER / "summary-q-2threads.txt").read_text()


def mutate(text: str, old: str, new: str) -> str:
    """`text` with the one occurrence of `old` replaced: the mutation must hit the recorded output exactly."""
    assert text.count(old) == 1, f"{old!r} occurs {text.count(old)} times in the recording"
    return text.replace(old, new)


def tune(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd, check=False)


def assert_refused(proc: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    assert proc.stdout == "", proc.stdout  # nothing half-printed, and never invalid JSON
    flat = " ".join(proc.stderr.split())  # rich wraps long lines
    for needle in needles:
        assert needle in flat, (needle, proc.stderr)


# ------------------------------------------------------------------------------------------ the JSON loader


@pytest.mark.parametrize("text, where, got", [
    ('{"a": NaN}', "a", "NaN"),
    ('{"a": [1, {"b": Infinity}]}', "a.1.b", "Infinity"),
    ('{"a": -Infinity}', "a", "-Infinity"),
    ('{"a": 1e999}', "a", "1e999"),
    ('{"a": 99999999999999999999}', "a", "99999999999999999999"),
    ('{"a": ' + "7" * 5000 + "}", "a", "77777777777777777777... (5000 digits)"),
    ('{"a": {"b": 1, "b": 2}}', "a", "'b'"),
])
def test_loader_refuses_what_json_cannot_carry_naming_the_key(text, where, got):
    with pytest.raises(InputError) as err:
        jsonio.loads(text, source="doc.json")
    msg = str(err.value)
    assert msg.startswith(f"doc.json: {where}: ") and f"(got {got})" in msg, msg


def test_loader_counts_depth_before_parsing():
    deep = "[" * 100_000 + "]" * 100_000  # would end in RecursionError inside json.loads
    with pytest.raises(InputError, match="nested 100000 levels deep, more than the 64"):
        jsonio.loads(deep, source="deep.json")
    assert jsonio.loads("[" * 64 + "]" * 64, source="ok") is not None
    # brackets inside strings are not nesting
    assert jsonio.loads(json.dumps({"s": "[" * 1000 + '"{'}), source="ok") == {"s": "[" * 1000 + '"{'}


def test_loader_keeps_good_documents_exactly():
    assert jsonio.loads(RUN1_JSON, source="run1") == json.loads(RUN1_JSON)
    assert jsonio.loads('{"x": -9223372036854775807, "y": 1.5e300}', source="ok") == {
        "x": -9223372036854775807, "y": 1.5e300}


def test_file_size_is_checked_before_reading(tmp_path):
    big = tmp_path / "big.json"
    with big.open("wb") as f:
        f.truncate(3 * 2**20)  # sparse: costs no disk
    with pytest.raises(InputError, match=r"larger than 2 MiB"):
        jsonio.read_json(big, what="report", max_bytes=2 * 2**20)


def test_output_is_always_valid_json():
    data = {"ci": [float("-inf"), 0.25, float("inf")], "avg": float("nan"), "n": 3, "t": ("a", 1.0)}
    text = jsonio.dumps(data)
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in output")) == {
        "ci": [None, 0.25, None], "avg": None, "n": 3, "t": ["a", 1.0]}


def test_cli_emit_never_prints_nan(capsys):
    from orchestrator.cli.common import emit

    emit({"rank_ci_high": float("inf"), "avg_us": float("nan"), "p99_us": 40}, as_json=True)
    out = capsys.readouterr().out
    assert "Infinity" not in out and "NaN" not in out
    assert json.loads(out) == {"rank_ci_high": None, "avg_us": None, "p99_us": 40}


# ------------------------------------------------------------------------------------------ cyclictest --json

JSON_MUTATIONS = [
    # (old, new, what the message must name)
    ('"cycles": 11100', '"cycles": Infinity', "thread.0.cycles: not a finite number"),
    ('"cycles": 11100', '"cycles": 11100.0', "thread 0 'cycles' is 11100.0: expected an integer"),
    ('"cycles": 11100', '"cycles": true', "thread 0 'cycles' is True: expected an integer"),
    ('"cycles": 11100', '"cycles": "11100"', "thread 0 'cycles' is '11100': expected an integer"),
    ('"cycles": 11100', '"cycles": 99999999999999999999999', "thread.0.cycles: an integer beyond 64 bits"),
    ('"51": 1,', '"51": Infinity,', "thread.0.histogram.51: not a finite number"),
    ('"51": 1,', '"51": 1.5,', "bucket 51 count 1.5: expected an integer >= 0"),
    ('"51": 1,', '"51": true,', "bucket 51 count True: expected an integer >= 0"),
    ('"51": 1,', '"51": -1,', "bucket 51 count -1: expected an integer >= 0"),
    ('"51": 1,', '"-51": 1,', "bucket '-51': expected a whole number of us below 1000000"),
    ('"51": 1,', '"\u0665\u0661": 1,', "bucket '\u0665\u0661': expected a whole number of us"),
    ('"51": 1,', '"051": 1,', "bucket '051'"),
    ('"51": 1,', '"1000000": 1,', "bucket '1000000'"),
    ('"51": 1,', '"51": 1, "51": 1,',
     "thread.0.histogram: an object with a duplicate key (which one counts is ambiguous) (got '51')"),
    ('"avg": 1032.35', '"avg": NaN',
     "thread.0.avg: not a finite number (JSON has no NaN or Infinity) (got NaN)"),
    ('"avg": 1032.35', '"avg": 1e999', "thread.0.avg: a number too large for a float"),
    ('"avg": 1032.35', '"avg": -3.5', "thread 0 'avg' is -3.5: expected a number >= 0"),
    ('"avg": 1032.35', '"avg": 99999.0', "avg_us (99999) is outside min_us..max_us (51..48047)"),
    ('"min": 51', '"min": -1', "thread 0 'min' is -1: expected an integer >= 0"),
    ('"max": 48047', '"max": 50', "thread 0 'max' 50 is below 'min' 51"),
    ('"num_threads": 1', '"num_threads": true', "'num_threads' is True but 'thread' has 1 entries"),
    ('"realtime": 0', '"realtime": ' + "[" * 70 + "]" * 70, "nested 72 levels deep, more than the 64"),
    ('"cmdline:": "cyclictest', '"cmdline:": 5, "x": "cyclictest', "'cmdline:' is 5: expected a string"),
]


@pytest.mark.parametrize("old, new, named", JSON_MUTATIONS)
def test_hostile_cyclictest_json_is_refused_with_the_field_named(old, new, named):
    with pytest.raises(ParseError) as err:
        parse_cyclictest(mutate(RUN1_JSON, old, new))
    assert named in str(err.value), str(err.value)


def test_thread_keys_of_any_size_are_refused_not_converted():
    doc = mutate(RUN1_JSON, '"0": {', '"' + "1" * 5000 + '": {')  # int() of 5000 digits would raise
    with pytest.raises(ParseError, match=r"expected 'thread' keys '0'\.\.'0'"):
        parse_cyclictest(doc)


@pytest.mark.parametrize("old, new, named", [JSON_MUTATIONS[0], JSON_MUTATIONS[14], JSON_MUTATIONS[19],
                                             JSON_MUTATIONS[5], JSON_MUTATIONS[21]])
def test_cli_cyclictest_parse_refuses_each_class(tmp_path, old, new, named):
    path = tmp_path / "ct.json"
    path.write_text(mutate(RUN1_JSON, old, new))
    assert_refused(tune("cyclictest-parse", str(path), "--json"), 6, str(path), named)


def test_cli_cyclictest_parse_json_output_is_json_for_the_real_run():
    proc = tune("cyclictest-parse", str(LAB / "guest-stress-h20000-run1.json"), "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout, parse_constant=lambda c: pytest.fail(f"{c} in --json output"))
    assert out["all"]["samples"] == 11100 and out["all"]["overflows"] == 2 and out["all"]["max_us"] == 48047


# ------------------------------------------------------------------------------------------ cyclictest text


@pytest.mark.parametrize("old, new, named", [
    ("Max:     296", "Max:      10", "thread 0: max_us (10) is below min_us (11)"),
    ("Min:     11", "Min:    -11", "thread 0: min_us: Input should be greater than or equal to 0 (got -11)"),
    ("Avg:   26", "Avg:  999", "thread 0: avg_us (999) is outside min_us..max_us (11..296)"),
    ("C:   5000", "C:9999999999999999999999999", "summary line 2: expected 'T:<n>"),
    ("C:   5000", "C:\u0660\u0660\u0665000", "summary line 2: expected 'T:<n>"),  # Arabic-Indic digits
])
def test_hostile_summary_lines_are_refused(old, new, named):
    with pytest.raises(ParseError) as err:
        parse_cyclictest(mutate(SUMMARY, old, new))
    assert named in str(err.value), str(err.value)


@pytest.mark.parametrize("old, new, named", [
    ("000051 000001\n", "000051 " + "9" * 30 + "\n", "histogram line 54: expected a complete histogram row"),
    ("000051 000001\n", "000051 \u0660\u0660\u0660\u0660\u0660\u0661\n", "expected a complete histogram row"),
    ("# Min Latencies: 00051", "# Min Latencies: " + "5" * 30, "'# Min Latencies:'"),
    ("# Max Latencies: 48047", "# Max Latencies: 00049", "not above the largest histogram bucket"),
])
def test_hostile_histogram_output_is_refused(old, new, named):
    with pytest.raises(ParseError) as err:
        parse_cyclictest(mutate(RUN1_TXT, old, new))
    assert named in str(err.value), str(err.value)


def test_a_20000_bucket_histogram_is_legitimate():
    for n in (1, 2):
        text = parse_cyclictest_file(LAB / f"guest-stress-h20000-run{n}.txt")
        doc = parse_cyclictest_file(LAB / f"guest-stress-h20000-run{n}.json")
        assert text.all.histogram == doc.all.histogram and text.all.overflows == doc.all.overflows


def test_output_size_is_bounded(tmp_path, monkeypatch):
    big = tmp_path / "big.txt"
    with big.open("wb") as f:
        f.truncate(parse.MAX_OUTPUT_BYTES + 1)  # sparse: costs no disk, and is never read
    with pytest.raises(InputError, match="cyclictest output is larger than 64 MiB"):
        parse_cyclictest_file(big)
    monkeypatch.setattr(parse, "MAX_OUTPUT_BYTES", len(RUN1_TXT) - 1)  # stdout handed over by the runner
    with pytest.raises(ParseError, match="more than the"):
        parse_cyclictest(RUN1_TXT)


def test_cli_cyclictest_parse_refuses_a_huge_file_before_reading_it(tmp_path):
    big = tmp_path / "huge.txt"
    with big.open("wb") as f:
        f.truncate(2 * 2**30)  # 2 GB, sparse
    assert_refused(tune("cyclictest-parse", str(big), "--json"), 2, "larger than 64 MiB")


# ------------------------------------------------------------------------------------------ report JSON


@pytest.fixture(scope="module")
def result_json() -> str:
    """What `tune measure` writes beside a run: the LatencyResult of a real recorded run."""
    return parse_cyclictest_file(LAB / "guest-stress-h20000-run1.json").model_dump_json(indent=2)


REPORT_MUTATIONS = [
    ('"samples": 11100,\n    "min_us"', '"samples": true,\n    "min_us"', "all.samples", "not a boolean"),
    ('"samples": 11100,\n    "min_us"', '"samples": 11100.5,\n    "min_us"', "all.samples",
     "Input should be a valid integer"),
    ('"max_us": 48047,\n    "overflows": 2,\n    "histogram"',
     '"max_us": 40,\n    "overflows": 2,\n    "histogram"', "all", "max_us (40) is below"),
    ('"overflows": 2,\n    "histogram"', '"overflows": 20000,\n    "histogram"', "all",
     "overflows (20000) is more than samples (11100)"),
    ('"51": 1,\n      "53"', '"51": -1,\n      "53"', "all.histogram.51", "greater than or equal to 0"),
    ('"avg_us": 1032.35,\n    "p50_us"', '"avg_us": NaN,\n    "p50_us"', "all.avg_us", "not a finite number"),
    ('"p50_us": 154,\n    "p90_us"', '"p50_us": 9999,\n    "p90_us"', "all",
     "p90_us (3525) is below p50_us (9999)"),
]


@pytest.mark.parametrize("old, new, where, named", REPORT_MUTATIONS)
def test_hostile_report_is_refused_with_the_field_named(tmp_path, result_json, old, new, where, named):
    path = tmp_path / "result.json"
    path.write_text(mutate(result_json, old, new))
    with pytest.raises(InputError) as err:
        load_report(path)
    msg = str(err.value)
    assert str(path) in msg and re.search(rf"\b{re.escape(where)}[:\s]", msg) and named in msg, msg


def test_cli_report_refuses_deep_and_non_finite_json(tmp_path, result_json):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    assert_refused(tune("report", str(deep)), 2, str(deep), "nested 100000 levels deep")
    nan = tmp_path / "nan.json"
    nan.write_text(mutate(result_json, '"avg_us": 1032.35,\n    "p50_us"', '"avg_us": NaN,\n    "p50_us"'))
    assert_refused(tune("report", str(nan), "--json"), 2, str(nan), "all.avg_us: not a finite number")
    inconsistent = tmp_path / "maxmin.json"
    inconsistent.write_text(mutate(result_json, '"max_us": 48047,\n    "overflows": 2,\n    "histogram"',
                                   '"max_us": 40,\n    "overflows": 2,\n    "histogram"'))
    assert_refused(tune("report", str(inconsistent)), 2, "max_us (40) is below")


def test_cli_report_of_the_real_result_is_valid_json(tmp_path, result_json):
    path = tmp_path / "result.json"
    path.write_text(result_json)
    proc = tune("report", str(path), "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout, parse_constant=lambda c: pytest.fail(f"{c} in --json output"))["rows"]
    assert rows[0]["samples"] == 11100 and rows[0]["max_us"] == 48047


def test_ab_results_are_read_through_the_same_loader(tmp_path):
    path = tmp_path / "ab.json"
    path.write_text('{"unit": "lab1", "rounds": Infinity}')
    with pytest.raises(InputError, match=r"ab\.json: rounds: not a finite number"):
        load_ab(path)
