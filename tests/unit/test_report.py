"""Reports on real cyclictest output recorded on the controller (tests/recorded/cyclictest/controller).

The results are parsed from the recorded files with the real parser; the HTML is rendered with matplotlib and
then read back: images decoded, table cells compared with the results' own figures."""

from __future__ import annotations

import base64
import io
import json
import re
import statistics
import struct
from html.parser import HTMLParser
from pathlib import Path

import pytest

from orchestrator.core.errors import InputError
from orchestrator.measure.model import CyclictestSettings, LatencyResult, LoadSpec
from orchestrator.measure.parse import parse_cyclictest_file
from orchestrator.report.latency import (
    SUMMARY_COLUMNS,
    ChangeReport,
    Report,
    load_report,
    render_html,
    save_report,
    summary_rows,
)
from orchestrator.report.plots import render_ccdf_png, render_histogram_png
from tests.conftest import RECORDED

pytestmark = pytest.mark.unit

REC = RECORDED / "cyclictest" / "controller"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FIGURE_KEYS = ("samples", "min_us", "p50_us", "p90_us", "p99_us", "p999_us", "p9999_us", "max_us", "overflows")


def _parse(name: str, **update) -> LatencyResult:
    result = parse_cyclictest_file(REC / name)
    return result.model_copy(update=update) if update else result


@pytest.fixture(scope="module")
def runs() -> dict[str, LatencyResult]:
    load = LoadSpec(kind="stress-ng", args=["--cpu", "2", "--timeout", "12"])
    return {
        # no overflows at all (the -h 8000 run)
        "h8000": _parse("histogram-h8000-2threads.txt", target="lab1.guest", started_at=1795000000.0,
                        settings=CyclictestSettings(cpus=[0, 1], interval_us=200, duration_s=10, histogram_us=8000),
                        load=LoadSpec()),
        # a few overflows; p99.99 exact for one thread only
        "h2000": _parse("histogram-h2000-2threads.txt", target="lab1.guest"),
        "h400": _parse("histogram-ansi-h400-2threads.txt", target="lab1.guest"),
        "json400": _parse("json-h400-2threads.json", target="lab1.guest"),
        # under stress-ng with a 20 us histogram: ~9% overflows, p99 among them
        "h20load": _parse("histogram-h20-2threads-load.txt", target="lab1.guest", load=load,
                          settings=CyclictestSettings(cpus=[0, 1], interval_us=200, duration_s=10, histogram_us=20)),
        "H20load": _parse("histogram-H20-2threads-load.txt", target="lab1.guest", load=load),
        # summary form: no histogram, no percentiles
        "summary": _parse("summary-q-2threads.txt", target="lab1.guest"),
    }


DECISION = {"verdict": "rollback", "action": "rollback", "final": True, "look": 1, "looks_planned": 1,
            "runs_before": 2, "runs_after": 2, "reason": "p99.9 is shown worse <b>bold?</b> & more",
            "metrics": {"p999_us": {"metric": "p999_us", "role": "primary", "before_median_us": 149.0,
                                    "after_median_us": 230.5, "rel_diff": 0.547, "ci_low": 0.1, "ci_high": 1.2,
                                    "finding": "worse"}}}


@pytest.fixture(scope="module")
def report(runs) -> Report:
    return Report(
        title="timer migration on lab1",
        changes=[ChangeReport(name="kernel.timer_migration=0", target="lab1.guest",
                              before=[runs["h2000"], runs["json400"]], after=[runs["h8000"], runs["h400"]],
                              decision=DECISION, note="recorded runs")],
        measurements=[runs["h8000"], runs["h20load"], runs["summary"]])


@pytest.fixture(scope="module")
def rendered(report, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("report") / "report.html"
    assert render_html(report, path) == path
    return path.read_text(encoding="utf-8")


class _Cells(HTMLParser):
    """(data-row, data-metric) -> cell text of every figures table."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: dict[tuple[str, str], str] = {}
        self._row: str | None = None
        self._metric: str | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr":
            self._row = a.get("data-row")
        elif tag == "td" and self._row and a.get("data-metric"):
            self._metric, self._text = a["data-metric"], []

    def handle_data(self, data):
        if self._metric:
            self._text.append(data)

    def handle_endtag(self, tag):
        if tag == "td" and self._metric:
            self.cells[(self._row, self._metric)] = "".join(self._text)
            self._metric = None
        elif tag == "tr":
            self._row = None


def _cells(text: str) -> dict[tuple[str, str], str]:
    p = _Cells()
    p.feed(text)
    return p.cells


def _images(text: str) -> list[bytes]:
    return [base64.b64decode(b, validate=True) for b in re.findall(r'src="data:image/png;base64,([^"]+)"', text)]


def _expected_cell(result: LatencyResult, stats, key: str) -> str:
    """What the table must show: the figure itself, or '≥ limit' for a percentile among the overflows."""
    value = getattr(stats, key)
    if value is not None:
        return str(value)
    assert key.startswith("p") and stats.overflows > 0, (key, stats)
    limit = result.settings.histogram_us if result.settings else max(result.all.histogram) + 1
    return f"\u2265 {limit}"


# ------------------------------------------------------------------------------------------------ HTML


def test_html_is_self_contained_with_decodable_pngs(rendered):
    from matplotlib.image import imread

    assert rendered.startswith("<!DOCTYPE html>")
    assert not re.search(r'(src|href)="(?!data:image/png;base64,|#)', rendered), "an external resource"
    assert "<link" not in rendered and "<script" not in rendered.lower()
    images = _images(rendered)
    # change: histogram + CCDF; measurements: h8000 and h20load 2 each, the summary-form one none
    assert len(images) == 6
    for png in images:
        assert png.startswith(PNG_SIGNATURE)
        assert png[12:16] == b"IHDR"
        width, height = struct.unpack(">II", png[16:24])
        assert width >= 600 and height >= 150, (width, height)
        assert len(png) > 15_000  # a drawn plot, not an empty canvas
        pixels = imread(io.BytesIO(png), format="png")
        assert pixels.shape[:2] == (height, width)
        assert pixels[..., :3].std() > 0.05  # not blank
    assert "No histogram recorded (summary form)" in rendered


def test_html_tables_show_the_results_figures(rendered, report):
    cells = _cells(rendered)
    # stand-alone measurements: every thread and the all-threads entry
    for i, res in enumerate(report.measurements, 1):
        for stats in [*res.threads, res.all]:
            row = f"measurement-{i}/{'all' if stats.thread is None else stats.thread}"
            for key in FIGURE_KEYS:
                if key.startswith("p") and getattr(stats, key) is None and stats.histogram is None:
                    assert cells[(row, key)] == "-"  # summary form: no percentiles at all
                    continue
                assert cells[(row, key)] == _expected_cell(res, stats, key), (row, key)
    # the change: every run's all-threads figures
    change = report.changes[0]
    for side, results in (("before", change.before), ("after", change.after)):
        for j, res in enumerate(results, 1):
            for key in FIGURE_KEYS:
                assert cells[(f"change-1/{side}/{j}", key)] == _expected_cell(res, res.all, key)
    # spot checks against the recorded files themselves (README: -h 8000 has no overflows)
    assert cells[("measurement-1/all", "p99_us")] == "47"
    assert cells[("measurement-1/all", "p999_us")] == "101"
    assert cells[("measurement-1/all", "overflows")] == "0"
    assert cells[("measurement-2/all", "p99_us")] == "\u2265 20"  # among the 9184 overflows of -h 20


def test_html_medians_of_runs(rendered, report):
    cells = _cells(rendered)
    change = report.changes[0]
    for side, results in (("before", change.before), ("after", change.after)):
        p99 = statistics.median(r.all.p99_us for r in results)
        assert float(cells[(f"change-1/{side}/median", "p99_us")]) == p99
        mx = statistics.median(r.all.max_us for r in results)
        assert float(cells[(f"change-1/{side}/median", "max_us")]) == mx
    # json400's p99.9 is among its overflows, and it is the larger of the two before runs: a lower bound
    assert cells[("change-1/before/median", "p999_us")].startswith("\u2265")


def test_html_marks_overflows_and_conditions(rendered, runs):
    n = runs["h20load"].all.overflows
    assert n == 9184
    assert f"{n:,}".replace(",", "\u202f") + " samples" in rendered
    assert "not plotted" in rendered and 'class="warn"' in rendered
    assert 'data-metric="overflows" class="overflow">9184<' in rendered
    # settings and load each result was measured under
    assert "stress-ng --cpu 2 --timeout 12" in rendered
    assert "histogram 20 us" in rendered and "interval 200 us" in rendered
    assert "not recorded" in rendered  # the parsed-only runs carry no settings


def test_html_decision(rendered):
    assert 'data-verdict="rollback"' in rendered
    assert "p99.9 is shown worse &lt;b&gt;bold?&lt;/b&gt; &amp; more" in rendered
    assert "+54.7%" in rendered


def test_html_escapes_all_text(runs, tmp_path):
    evil = "<script>alert('x')</script>"
    rep = Report(title=f"title {evil}", changes=[
        ChangeReport(name=f"sysctl {evil}", target=f"t&{evil}", before=[runs["h8000"]], after=[runs["h2000"]],
                     decision={"verdict": evil, "reason": evil, "metrics": {evil: {"finding": evil}}}, note=evil,
                     description=f"2 changes together: {evil} | b\" onmouseover=\"x",
                     members=[evil, 'b" onmouseover="x'], left_out=[evil])],
        measurements=[runs["h8000"].model_copy(update={"target": evil, "cmdline": f"quiet {evil}",
                                                       "raw_artifact": f"/tmp/{evil}.txt"})])
    text = render_html(rep, tmp_path / "evil.html").read_text()
    assert "<script" not in text.lower()
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in text
    assert "sysctl &lt;script&gt;" in text
    assert len(_images(text)) == 4


def test_html_with_a_real_decision(runs, tmp_path):
    from orchestrator.stats.decide import decide

    before, after = [runs["h2000"], runs["json400"]], [runs["h8000"], runs["h400"]]
    decision = decide(before, after)
    change = ChangeReport(name="isolcpus", target="lab1.guest", before=before, after=after, decision=decision)
    assert isinstance(change.decision, dict) and change.decision["verdict"] == decision.verdict
    text = render_html(Report(changes=[change]), tmp_path / "r.html").read_text()
    assert f'data-verdict="{decision.verdict}"' in text
    assert "Look 1/1" in text


def test_empty_report_and_summary_only(runs, tmp_path):
    text = render_html(Report(), tmp_path / "empty.html").read_text()
    assert "empty" in text and not _images(text)
    png = render_histogram_png([runs["summary"]])
    assert png.startswith(PNG_SIGNATURE)  # a "nothing to plot" image, not an error
    assert render_ccdf_png({"before": [runs["summary"]], "after": []}).startswith(PNG_SIGNATURE)


def test_core_imports_no_cli_or_plot_libraries():
    import subprocess
    import sys

    code = ("import sys, orchestrator.report.latency; "
            "print(sorted(m for m in ('rich', 'click', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_png_helpers(runs):
    for png in (render_histogram_png({"before": [runs["h2000"]], "after": [runs["h8000"]]}),
                render_ccdf_png({"before": [runs["h20load"]], "after": [runs["H20load"]]}),
                render_ccdf_png([runs["h8000"]])):
        assert png.startswith(PNG_SIGNATURE) and len(png) > 15_000


# ------------------------------------------------------------------------------------------------ summary


def test_summary_rows(report, runs):
    rows = summary_rows(report)
    assert [r["kind"] for r in rows] == ["change", "measurement", "measurement", "measurement"]
    for r in rows:
        assert tuple(r) == SUMMARY_COLUMNS[r["kind"]]
    change = rows[0]
    assert change["name"] == "kernel.timer_migration=0" and change["verdict"] == "rollback"
    assert change["before_p99_us"] == statistics.median([runs["h2000"].all.p99_us, runs["json400"].all.p99_us])
    assert change["after_max_us"] == statistics.median([runs["h8000"].all.max_us, runs["h400"].all.max_us])
    # json400's p99.9 fell among its overflows: counted as its histogram limit, flagged as a lower bound
    assert runs["json400"].all.p999_us is None
    assert change["before_p999_us"] == statistics.median([runs["h2000"].all.p999_us,
                                                          max(runs["json400"].all.histogram) + 1])
    assert "before_p999_us" in change["lower_bounds"] and "after_p99_us" not in change["lower_bounds"]
    m = rows[1]
    a = runs["h8000"].all
    assert (m["samples"], m["p50_us"], m["p99_us"], m["p999_us"], m["max_us"], m["overflows"]) == (
        a.samples, a.p50_us, a.p99_us, a.p999_us, a.max_us, a.overflows)
    assert m["load"] == "none" and rows[2]["load"] == "stress-ng --cpu 2 --timeout 12"
    assert rows[3]["p99_us"] is None and rows[3]["max_us"] == runs["summary"].all.max_us
    no_decision = summary_rows(Report(changes=[ChangeReport(name="x")]))[0]
    assert no_decision["verdict"] is None and no_decision["before_p99_us"] is None


# ------------------------------------------------------------------------------------------------ loading


def test_load_report_accepts_the_three_shapes(runs, report, tmp_path):
    one = tmp_path / "one.json"
    one.write_text(runs["h20load"].model_dump_json(indent=2))  # what the measurement runner writes
    loaded = load_report(one)
    assert loaded.changes == [] and loaded.measurements == [runs["h20load"]]

    many = tmp_path / "many.json"
    many.write_text(json.dumps([runs["h8000"].model_dump(mode="json"), runs["summary"].model_dump(mode="json")]))
    assert load_report(many).measurements == [runs["h8000"], runs["summary"]]

    full = save_report(report, tmp_path / "report.json")
    again = load_report(full)
    assert again == report
    assert again.changes[0].decision == DECISION


@pytest.mark.parametrize("content, expect", [
    ("this is not json", "not valid JSON"),
    (b"\xff\xfe\x00garbage", "not UTF-8"),
    ("42", "the JSON is a int"),
    ("[]", "empty JSON list"),
    ('{"hello": 1}', "keys hello"),
    ("{}", "keys none"),
    ('[{"form": "histogram"}, 3]', "item 0 of the list is not a LatencyResult"),
    ('[3]', "item 0 of the list is a int"),
    ('{"form": "histogram", "threads": [], "all": {"samples": "many"}}', "looks like a LatencyResult"),
    ('{"title": "t", "changes": [{"note": "no name"}]}', "changes.0.name"),
])
def test_load_report_rejects_garbage(tmp_path, content, expect):
    path = tmp_path / "bad.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(InputError) as err:
        load_report(path)
    msg = str(err.value)
    assert str(path) in msg and expect in msg
    assert "expected" in msg


def test_load_report_missing_file(tmp_path):
    with pytest.raises(InputError, match="cannot read"):
        load_report(tmp_path / "nope.json")


def test_load_report_result_from_a_recorded_file_roundtrip(tmp_path):
    result = parse_cyclictest_file(REC / "json-h400-2threads.json")
    path = Path(tmp_path / "r.json")
    path.write_text(result.model_dump_json())
    assert load_report(path).measurements[0].all.histogram == result.all.histogram


def test_html_lists_a_bundles_members_and_what_was_left_out(runs, tmp_path):
    what = ("3 changes together: sysctl kernel.timer_migration=0 | kernel threads: ksoftirqd/* -> fifo 2; "
            "rcuop/* -> CPUs 0 | sysfs ksm_run = 2 (left out: host.sysfs.ksm_run not applicable: no ksm)")
    members = ["sysctl kernel.timer_migration=0", "kernel threads: ksoftirqd/* -> fifo 2; rcuop/* -> CPUs 0",
               "sysfs ksm_run = 2"]  # the outcome's own list: a member's text may hold " | " or ": "
    rep = Report(changes=[ChangeReport(name="host.bundle", target="lab1.host", description=what, members=members,
                                       left_out=["host.sysfs.ksm_run not applicable: no ksm"],
                                       before=[runs["h8000"]], after=[runs["h2000"]])])
    text = render_html(rep, tmp_path / "b.html").read_text()
    assert ("<ul><li>sysctl kernel.timer_migration=0</li><li>kernel threads: ksoftirqd/* -&gt; fifo 2; rcuop/* "
            "-&gt; CPUs 0</li><li>sysfs ksm_run = 2</li></ul>") in text
    assert '<p class="meta">left out: host.sysfs.ksm_run not applicable: no ksm</p>' in text
    assert 'href="#change-1" title="3 changes together: ' in text  # the summary's link says what it is
