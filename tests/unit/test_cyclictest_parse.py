"""cyclictest parsing on real output recorded on the controller (tests/recorded/cyclictest/controller).

Every expected figure is recomputed here independently of the parser: summary lines split by hand, histogram
columns read by hand, percentiles by expanding the histogram into a sorted list of samples."""

from __future__ import annotations

import json
import math
from decimal import Decimal

import pytest

from orchestrator.core.errors import InputError, ParseError
from orchestrator.measure.model import PERCENTILES, LatencyResult
from orchestrator.measure.parse import (
    parse_cyclictest,
    parse_cyclictest_file,
    percentile,
    stats_from_histogram,
)
from tests.conftest import RECORDED

pytestmark = pytest.mark.unit

REC = RECORDED / "cyclictest" / "controller"
HISTOGRAM_FILES = [
    "histogram-h20-2threads-load.txt",
    "histogram-H20-2threads-load.txt",
    "histogram-h2000-2threads.txt",
    "histogram-h8000-2threads.txt",
    "histogram-ansi-h400-2threads.txt",
    "json-h400-2threads.stdout.txt",
]


def _text(name: str) -> str:
    return (REC / name).read_text()


# ------------------------------------------------------------------------------------ independent readers


def _summary_by_hand(text: str) -> dict[int, dict[str, int]]:
    """Last `T:` line per thread, split by hand (ANSI codes cut at ESC, fields by their labels)."""
    out: dict[int, dict[str, int]] = {}
    for raw in text.split("\n"):
        line = raw.split("\x1b[")[-1]
        if "T:" not in line:
            continue
        line = line[line.index("T:") :]
        thread = int(line[2 : line.index("(")])
        fields = {}
        for label in ("C", "Min", "Avg", "Max"):
            after = line.split(f" {label}:")[1]
            fields[label] = int(after.split()[0])
        out[thread] = fields
    return out


def _histogram_by_hand(text: str) -> tuple[list[list[int]], dict[str, list[int]]]:
    """The rows (bucket, counts...) and the `# Label: values` trailer lines."""
    lines = text.split("\n")
    start = lines.index("# Histogram") + 1
    rows = []
    for line in lines[start:]:
        if line.startswith("#"):
            break
        rows.append([int(c) for c in line.split()])
    trailer = {}
    for line in lines:
        if line.startswith("# ") and ":" in line:
            label, _, values = line[2:].partition(":")
            if values.split() and all(v.isdigit() for v in values.split()):
                trailer[label] = [int(v) for v in values.split()]
    return rows, trailer


def _brute_percentile(hist: dict[int, int], overflows: int, fraction: float) -> int | None:
    """Expand into the sorted list of samples; the k-th smallest with k = ceil(fraction * n)."""
    samples = sorted([b for b, c in hist.items() for _ in range(c)] + [math.inf] * overflows)
    k = math.ceil(Decimal(str(fraction)) * len(samples))
    value = samples[k - 1]
    return None if value == math.inf else int(value)


# ------------------------------------------------------------------------------------ summary form


def test_summary_q_two_threads():
    text = _text("summary-q-2threads.txt")
    want = _summary_by_hand(text)
    r = parse_cyclictest(text)
    assert r.form == "summary"
    assert [t.thread for t in r.threads] == [0, 1] == sorted(want)
    for t in r.threads:
        w = want[t.thread]
        assert (t.samples, t.min_us, t.avg_us, t.max_us) == (w["C"], w["Min"], w["Avg"], w["Max"])
        assert t.histogram is None and t.overflows == 0
        assert all(getattr(t, k) is None for k in PERCENTILES)
    total = sum(w["C"] for w in want.values())
    assert r.all.thread is None and r.all.samples == total
    assert r.all.min_us == min(w["Min"] for w in want.values())
    assert r.all.max_us == max(w["Max"] for w in want.values())
    assert r.all.avg_us == pytest.approx(sum(w["Avg"] * w["C"] for w in want.values()) / total, abs=0.006)
    assert r.all.histogram is None and r.all.p99_us is None


@pytest.mark.parametrize("name,threads", [("summary-ansi-1thread.txt", 1), ("summary-ansi-2threads.txt", 2)])
def test_summary_with_ansi_redraws_takes_the_last_line_per_thread(name, threads):
    text = _text(name)
    assert "\x1b[" in text and text.count("T: 0") > 100  # really the redrawing form
    want = _summary_by_hand(text)
    first_c = int(text.split("C:")[1].split()[0])
    r = parse_cyclictest(text)
    assert r.form == "summary" and len(r.threads) == threads
    for t in r.threads:
        assert t.samples == want[t.thread]["C"] != first_c
        assert (t.min_us, t.max_us) == (want[t.thread]["Min"], want[t.thread]["Max"])


def test_summary_zero_samples_is_an_error_not_a_zero():
    # the first redraw of a real run: "C:      0 Min:1000000", before any cycle ran
    first_block = "\n".join(_text("summary-ansi-1thread.txt").split("\n")[:4]) + "\n"
    assert "C:      0" in first_block
    with pytest.raises(ParseError, match="0 samples"):
        parse_cyclictest(first_block)


# ------------------------------------------------------------------------------------ histogram form


@pytest.mark.parametrize("name", HISTOGRAM_FILES)
def test_histogram_figures_match_the_raw_columns(name):
    text = _text(name)
    rows, trailer = _histogram_by_hand(text)
    n = len(trailer["Min Latencies"])
    r = parse_cyclictest(text)
    assert r.form == "histogram" and len(r.threads) == n == 2
    for t in r.threads:
        j = t.thread
        column = {row[0]: row[1 + j] for row in rows if row[1 + j]}
        assert sum(column.values()) == trailer["Total"][j]
        assert t.histogram == column
        assert t.max_us == trailer["Max Latencies"][j]
        assert t.min_us == trailer["Min Latencies"][j]
        assert t.overflows == trailer["Histogram Overflows"][j]
        assert t.samples == trailer["Total"][j] + trailer["Histogram Overflows"][j]
        for key, frac in PERCENTILES.items():
            assert getattr(t, key) == _brute_percentile(column, t.overflows, frac), (j, key)
        if t.overflows == 0:  # exact mean; cyclictest prints it truncated
            assert math.floor(t.avg_us) == trailer["Avg Latencies"][j]
        else:
            assert t.avg_us == trailer["Avg Latencies"][j]
    pooled: dict[int, int] = {}
    for row in rows:
        if sum(row[1 : 1 + n]):
            pooled[row[0]] = sum(row[1 : 1 + n])
    overflows = sum(trailer["Histogram Overflows"][:n])
    assert r.all.histogram == pooled
    assert r.all.overflows == overflows
    assert r.all.samples == sum(trailer["Total"][:n]) + overflows
    assert r.all.max_us == max(trailer["Max Latencies"][:n])
    assert r.all.min_us == min(trailer["Min Latencies"][:n])
    for key, frac in PERCENTILES.items():
        assert getattr(r.all, key) == _brute_percentile(pooled, overflows, frac), key


def test_histofall_column_is_the_pooled_entry():
    rows, trailer = _histogram_by_hand(_text("histogram-H20-2threads-load.txt"))
    assert len(rows[0]) == 1 + 3  # bucket, thread 0, thread 1, all threads
    r = parse_cyclictest(_text("histogram-H20-2threads-load.txt"))
    assert len(r.threads) == 2
    assert r.all.histogram == {row[0]: row[3] for row in rows if row[3]}
    assert sum(r.all.histogram.values()) == trailer["Total"][2]
    assert r.all.max_us == trailer["Max Latencies"][2]
    assert r.all.overflows == trailer["Histogram Overflows"][2]
    garbled = _text("histogram-H20-2threads-load.txt").replace("016043\t032936", "016043\t032935")
    with pytest.raises(ParseError, match="all-threads column"):
        parse_cyclictest(garbled)


def test_overflows_are_counted_and_make_percentiles_none_not_guesses():
    loaded = parse_cyclictest(_text("histogram-h20-2threads-load.txt"))
    _, trailer = _histogram_by_hand(_text("histogram-h20-2threads-load.txt"))
    assert [t.overflows for t in loaded.threads] == trailer["Histogram Overflows"] and all(
        trailer["Histogram Overflows"]
    )
    for t in loaded.threads:  # > 8% overflowed a 20 us histogram: p99 lies among them
        assert t.overflows / t.samples > 0.01 and t.p99_us is None and t.max_us > 19
        assert t.p50_us is not None and t.p50_us <= 19
    few = parse_cyclictest(_text("histogram-h2000-2threads.txt"))
    t0 = few.threads[0]  # 4 of 49928 overflowed: p99.99 needs 49923.0072 samples, the histogram holds 49924
    assert t0.overflows == 4 and t0.p9999_us is not None and t0.p9999_us < 2000
    none = parse_cyclictest(_text("histogram-h8000-2threads.txt"))
    assert none.all.overflows == 0
    assert all(getattr(t, k) is not None for t in [*none.threads, none.all] for k in PERCENTILES)
    assert none.all.p9999_us <= none.all.max_us


def test_total_counts_only_histogram_samples_cycles_include_overflows():
    """`# Total:` + `# Histogram Overflows:` == JSON cycles of the same run (README: what # Total counts)."""
    _, trailer = _histogram_by_hand(_text("json-h400-2threads.stdout.txt"))
    doc = json.loads(_text("json-h400-2threads.json"))
    r = parse_cyclictest(_text("json-h400-2threads.stdout.txt"))
    for j, t in enumerate(r.threads):
        cycles = doc["thread"][str(j)]["cycles"]
        assert trailer["Total"][j] + trailer["Histogram Overflows"][j] == cycles == t.samples
        assert sum(doc["thread"][str(j)]["histogram"].values()) == trailer["Total"][j]
    assert trailer["Histogram Overflows"][0] > 0  # the case that tells the two readings apart


def test_redrawn_summary_before_histogram_uses_the_histogram():
    text = _text("histogram-ansi-h400-2threads.txt")
    stale = _summary_by_hand(text)
    _, trailer = _histogram_by_hand(text)
    r = parse_cyclictest(text)
    assert r.form == "histogram"
    for t in r.threads:  # the last redraw lags the final count; the histogram is the truth
        assert t.samples == trailer["Total"][t.thread] + trailer["Histogram Overflows"][t.thread]
        assert stale[t.thread]["C"] < t.samples


# ------------------------------------------------------------------------------------ JSON form


def test_json_document_as_text():
    doc = json.loads(_text("json-h400-2threads.json"))
    assert "cmdline:" in doc and "rt_test_version:" in doc and doc["rt_test_version:"] == "2.40"
    r = parse_cyclictest(_text("json-h400-2threads.json"))
    assert r.form == "json" and len(r.threads) == doc["num_threads"] == 2
    for t in r.threads:
        d = doc["thread"][str(t.thread)]
        hist = {int(b): c for b, c in d["histogram"].items() if c}
        assert t.histogram == hist
        assert t.samples == d["cycles"]
        assert t.overflows == d["cycles"] - sum(hist.values())
        assert (t.min_us, t.max_us) == (d["min"], d["max"])
        assert t.avg_us == pytest.approx(d["avg"], abs=0.011)
        for key, frac in PERCENTILES.items():
            assert getattr(t, key) == _brute_percentile(hist, t.overflows, frac), key
    assert r.threads[0].overflows == 13 and r.threads[1].overflows == 0
    assert r.all.overflows == 13 and r.all.samples == sum(d["cycles"] for d in doc["thread"].values())


def test_json_and_histogram_of_the_same_run_agree():
    from_json = parse_cyclictest(_text("json-h400-2threads.json"))
    from_text = parse_cyclictest(_text("json-h400-2threads.stdout.txt"))
    pj, pt = from_json.public(), from_text.public()
    assert pj.keys() == pt.keys() == {"threads", "all"}
    assert [t.keys() for t in pj["threads"]] == [t.keys() for t in pt["threads"]]
    assert pj["all"].keys() == pt["all"].keys()
    keys = ["samples", "min_us", "max_us", "overflows", "histogram", *PERCENTILES]
    for a, b in zip([*from_json.threads, from_json.all], [*from_text.threads, from_text.all], strict=True):
        assert {k: getattr(a, k) for k in keys} == {k: getattr(b, k) for k in keys}
    combined = parse_cyclictest(_text("json-h400-2threads.stdout.txt"), _text("json-h400-2threads.json"))
    assert combined == from_json


def test_json_without_histogram_is_like_the_summary():
    doc = json.loads(_text("json-nohist-1thread.json"))
    assert doc["thread"]["0"]["histogram"] == {}  # rt-tests writes an empty one without -h
    r = parse_cyclictest(_text("json-nohist-1thread.stdout.txt"), _text("json-nohist-1thread.json"))
    want = _summary_by_hand(_text("json-nohist-1thread.stdout.txt"))[0]
    assert r.form == "json" and r.threads[0].samples == want["C"] == doc["thread"]["0"]["cycles"]
    assert r.threads[0].histogram is None and r.threads[0].p50_us is None and r.threads[0].overflows == 0
    assert r.threads[0].avg_us == doc["thread"]["0"]["avg"]


def test_json_with_histogram_flag_and_empty_histograms_means_all_overflowed():
    doc = json.loads(_text("json-nohist-1thread.json"))
    doc["cmdline:"] += " -h 5"  # as if every sample had been >= 5 us
    r = parse_cyclictest(json.dumps(doc))
    assert r.threads[0].overflows == r.threads[0].samples == doc["thread"]["0"]["cycles"]
    assert r.threads[0].histogram == {} and r.threads[0].p50_us is None


def test_stdout_and_json_of_different_runs_are_rejected():
    with pytest.raises(ParseError, match="threads"):
        parse_cyclictest(_text("summary-q-2threads.txt"), _text("json-nohist-1thread.json"))
    with pytest.raises(ParseError, match="disagree"):
        parse_cyclictest(_text("histogram-h2000-2threads.txt"), _text("json-h400-2threads.json"))


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda d: d.pop("thread"), "'thread'"),
        (lambda d: d["thread"]["0"].update(cycles=0), "cycles 0"),
        (lambda d: d["thread"]["1"].pop("cycles"), "'cycles'"),
        (lambda d: d.update(num_threads=3), "num_threads"),
        (lambda d: d["thread"]["0"].update(cycles=10), "more than"),
        (lambda d: d["thread"].update({"5": d["thread"].pop("1")}), "keys"),
    ],
)
def test_json_garbled(mutate, match):
    doc = json.loads(_text("json-h400-2threads.json"))
    mutate(doc)
    with pytest.raises(ParseError, match=match):
        parse_cyclictest(json.dumps(doc))


# ------------------------------------------------------------------------------------ truncated and garbled


@pytest.mark.parametrize(
    "name,match",
    [
        ("histogram-h20-2threads-load.cut-before-max.txt", "expected a '# Max Latencies:' line"),
        ("histogram-h20-2threads-load.cut-in-overflow-list.txt", "Thread 1"),
        ("histogram-h2000-2threads.cut-in-rows.txt", "expected a complete histogram row or '# Total:'"),
        ("summary-q-2threads.cut-mid-line.txt", "truncated or garbled"),
        ("summary-q-2threads.cut-in-last-number.txt", "cut off"),
        ("summary-ansi-2threads.cut-mid-line.txt", "truncated or garbled"),
        ("json-h400-2threads.cut.json", "truncated or invalid"),
    ],
)
def test_truncated_copies_raise(name, match):
    with pytest.raises(ParseError, match=match):
        parse_cyclictest_file(REC / name)


def test_histogram_cut_between_two_overflow_cycle_numbers_raises():
    text = _text("histogram-h20-2threads-load.txt")
    cut = text[: text.index("# Thread 1:") + len("# Thread 1: 00002 00048")]  # no partial number to notice
    with pytest.raises(ParseError, match="accounts for 2 overflows"):
        parse_cyclictest(cut)


def test_cursor_codes_anywhere_are_ignored():
    text = _text("summary-q-2threads.txt").replace("T:", "\x1b[2K\x1b[1GT:")
    assert parse_cyclictest(text) == parse_cyclictest(_text("summary-q-2threads.txt"))


def test_truncated_json_beside_good_stdout_raises():
    with pytest.raises(ParseError, match="truncated"):
        parse_cyclictest(_text("json-h400-2threads.stdout.txt"), _text("json-h400-2threads.cut.json"))


def test_summary_cut_between_lines_needs_the_expected_thread_count():
    r = parse_cyclictest_file(REC / "summary-q-2threads.cut-at-line.txt")
    assert len(r.threads) == 1  # indistinguishable from a 1-thread run by the text alone
    with pytest.raises(ParseError, match="expected 2 threads, found 1"):
        parse_cyclictest_file(REC / "summary-q-2threads.cut-at-line.txt", expected_threads=2)
    assert len(parse_cyclictest_file(REC / "summary-q-2threads.txt", expected_threads=2).threads) == 2


@pytest.mark.parametrize(
    "text", ["", "  \n\n", "# /dev/cpu_dma_latency set to 0us\n", "Segmentation fault\n"]
)
def test_no_cyclictest_output_raises(text):
    with pytest.raises(ParseError, match="expected summary lines"):
        parse_cyclictest(text)


def test_summary_and_histogram_thread_counts_must_agree():
    one_thread_summary = _text("summary-ansi-1thread.txt")
    two_thread_histogram = _text("histogram-h20-2threads-load.txt")
    with pytest.raises(ParseError, match="summary lines list 1 threads but the histogram has 2"):
        parse_cyclictest(one_thread_summary + two_thread_histogram)


def test_histogram_garbled_rows_and_totals():
    text = _text("histogram-h20-2threads-load.txt")
    with pytest.raises(ParseError, match="columns"):
        parse_cyclictest(text.replace("000013 015625\t016622", "000013 015625"))
    with pytest.raises(ParseError, match="'# Total:'"):
        parse_cyclictest(text.replace("# Total: 000045926", "# Total: 000045925"))
    with pytest.raises(ParseError, match="bucket 000012"):
        parse_cyclictest(text.replace("000012 001403\t001404\n", ""))
    with pytest.raises(ParseError, match="reported max"):
        parse_cyclictest(
            _text("histogram-h8000-2threads.txt").replace("# Max Latencies: 04186", "# Max Latencies: 04187")
        )
    with pytest.raises(ParseError, match="no '# Histogram' header"):
        parse_cyclictest(text.replace("# Histogram\n", ""))


def test_file_reader_replaces_bad_bytes_and_reports_missing_files(tmp_path):
    p = tmp_path / "out.txt"
    p.write_bytes(b"# \xff\xfe noise\n" + (REC / "summary-q-2threads.txt").read_bytes())
    assert parse_cyclictest_file(p).threads[1].max_us == 3598
    with pytest.raises(InputError, match="cannot read"):
        parse_cyclictest_file(tmp_path / "missing.txt")


# ------------------------------------------------------------------------------------ pure helpers


def test_percentile_helper():
    hist = {10: 50, 20: 40, 30: 9, 40: 1}
    assert percentile(hist, 100, 0.5) == 10
    assert percentile(hist, 100, 0.51) == 20
    assert percentile(hist, 100, 0.9) == 20  # cumulative 90 reaches 0.9 * 100 exactly
    assert percentile(hist, 100, 0.99) == 30
    assert percentile(hist, 100, 1.0) == 40
    assert percentile(hist, 101, 0.999) is None  # 1 overflow: the top lies beyond the histogram
    assert percentile(hist, 101, 0.99) == 40
    many = {b: 1 for b in range(1000)}
    assert percentile(many, 1000, 0.999) == 998  # 999/1000 exactly, not the binary float 0.999
    for bad in [(hist, 100, 0.0), (hist, 100, 1.5), (hist, 99, 0.5), ({}, 0, 0.5)]:
        with pytest.raises(ValueError):
            percentile(*bad)


def test_stats_from_histogram_helper():
    s = stats_from_histogram({3: 1, 5: 2, 9: 1}, thread=4)
    assert (s.thread, s.samples, s.min_us, s.max_us, s.avg_us, s.p50_us, s.p99_us) == (4, 4, 3, 9, 5.5, 5, 9)
    s = stats_from_histogram({3: 1, 5: 0}, overflows=3, min_us=3, max_us=700, avg_us=400.0)
    assert (s.samples, s.histogram, s.max_us, s.avg_us, s.p50_us, s.p90_us) == (
        4,
        {3: 1},
        700,
        400.0,
        None,
        None,
    )
    assert stats_from_histogram({3: 1}, overflows=1).max_us is None  # unknown beyond the histogram
    all_over = stats_from_histogram({}, overflows=5, min_us=30, max_us=90, avg_us=50.0)
    assert all_over.samples == 5 and all_over.p50_us is None and all_over.min_us == 30
    with pytest.raises(ParseError, match="0 samples"):
        stats_from_histogram({7: 0})
    with pytest.raises(ParseError, match="reported min"):
        stats_from_histogram({3: 1}, min_us=2)


def test_result_round_trips_through_json():
    r = parse_cyclictest_file(REC / "histogram-h2000-2threads.txt")
    again = LatencyResult.model_validate_json(r.model_dump_json())
    assert again == r and again.public() == r.public()
