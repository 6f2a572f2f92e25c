"""The diagnosis HTML report, rendered from windows recorded on the lab (tests/recorded/diagnose/).

Every TargetDiagnosis here comes from `analyse` on a recorded window; the only edits are model copies that
re-arrange real values (a title with HTML metacharacters, the recorded tick state of a CPU) to reach the
branches the recordings do not (no recorded target had nohz_full CPUs)."""

from __future__ import annotations

import base64
import html
import json
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest

from orchestrator.diagnose.analysis import _nohz, analyse
from orchestrator.diagnose.kstate import parse_sched_debug, parse_timer_list
from orchestrator.diagnose.model import Diagnosis, TargetDiagnosis
from orchestrator.diagnose.probe import parse_tracing_state, split_sections
from orchestrator.report.diagnosis import TOP_SENDS, TOP_TIMERS, render_diagnosis_html, save_diagnosis

pytestmark = pytest.mark.unit

REC = Path(__file__).resolve().parents[1] / "recorded" / "diagnose"
NOW = datetime(2026, 11, 30, 1, 0, tzinfo=UTC)  # the recordings' hour: their core dumps are "last hour"
PREFIXES = sorted(p.name.removesuffix("-window.txt") for p in REC.glob("*-window.txt"))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CRASH_UNIT = "mirobot_teleoperate.service"


def _read(prefix: str, part: str) -> str:
    return (REC / f"{prefix}-{part}.txt").read_text()


def _sections(prefix: str) -> dict[str, str]:
    return split_sections(_read(prefix, "window"), _read(prefix, "marker").strip())


def _target(prefix: str) -> TargetDiagnosis:
    return analyse(_sections(prefix), target="host" if "-host" in prefix else "guest", label=prefix,
                   rt_hint=[1], state_before=parse_tracing_state(_read(prefix, "state-before")),
                   state_after=parse_tracing_state(_read(prefix, "state-after")), now=NOW)


def _diag(*targets: TargetDiagnosis) -> Diagnosis:
    return Diagnosis(unit="lab1", started=NOW, duration_s=10, targets=list(targets))


@pytest.fixture(scope="module")
def targets() -> dict[str, TargetDiagnosis]:
    return {p: _target(p) for p in PREFIXES}


@pytest.fixture(scope="module")
def pages(targets: dict[str, TargetDiagnosis]) -> dict[str, str]:
    return {p: render_diagnosis_html(_diag(t)) for p, t in targets.items()}


def _table(page: str, cls: str) -> str:
    tables = re.findall(rf'<table class="{cls}">.*?</table>', page, re.S)
    assert len(tables) == 1, f"expected one table of class {cls}, found {len(tables)}"
    return tables[0]


def _rows(table: str) -> list[list[tuple[str, str]]]:
    """[(css class, text)] per cell of each data row (header rows have no <td>)."""
    rows = []
    for tr in re.findall(r"<tr[^>]*>(.*?)</tr>", table, re.S):
        cells = re.findall(r'<td(?: class="([^"]*)")?>(.*?)</td>', tr, re.S)
        if cells:
            rows.append(cells)
    return rows


def _pngs(page: str) -> list[bytes]:
    found = re.findall(r'<img alt="[^"]*" src="data:image/png;base64,([^"]+)">', page)
    return [base64.b64decode(m) for m in found]


def test_recordings_are_there():
    assert {"x86-guest", "arm64-host", "arm64-guest"} <= set(PREFIXES)


@pytest.mark.parametrize("prefix", PREFIXES)
def test_every_recorded_window_renders_a_complete_page(prefix, targets, pages):
    d, page = targets[prefix], pages[prefix]
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    findings_at, ipis_at = page.index('id="findings"'), page.index('<table class="ipis">')
    assert findings_at < ipis_at
    header = _table(page, "header")
    for value in (d.kernel, d.arch, f"{d.duration_s:.1f} s", d.tracing):
        assert f"<td>{html.escape(value)}</td>" in header
    assert '<td class="rt">1</td>' in header  # the RT CPUs line, shaded
    ipi_rows = {cells[0][1]: cells for cells in _rows(_table(page, "ipis"))}
    assert {r.row for r in d.ipis} <= set(ipi_rows)
    for r in d.ipis:  # every rate and count, in CPU order, two columns per CPU
        want = [x for c in d.cpus for x in (f"{r.per_cpu[c]:.1f}", str(r.counts[c]))]
        assert [text for _, text in ipi_rows[r.row][2:]] == want
    images = _pngs(page)
    assert images and all(png.startswith(PNG_MAGIC) for png in images)
    for f in d.findings:
        assert page.index(html.escape(f.title)) < ipis_at


@pytest.mark.parametrize("prefix", ["x86-guest", "arm64-guest"])
def test_crash_loop_finding_comes_first_with_its_change_and_profile(prefix, targets, pages):
    d, page = targets[prefix], pages[prefix]
    assert [c.unit for c in d.crash_loops] == [CRASH_UNIT]
    finding = next(f for f in d.findings if f.kind == "crash_loop")
    ipis_at = page.index('<table class="ipis">')
    assert page.index(CRASH_UNIT) < ipis_at
    assert page.index(f'<code class="change">guest.service.{CRASH_UNIT}</code>') < ipis_at
    assert page.index(f'<pre class="profile">{html.escape(finding.profile)}</pre>') < ipis_at
    # the first finding on the page is the high-severity crash loop, with its evidence listed
    first = re.search(r'<div class="finding (\w+)">(.*?)</div>', page, re.S)
    assert first.group(1) == "high" and f"{CRASH_UNIT} is crash-looping" in first.group(2)
    assert all(f"<li>{html.escape(ev)}</li>" in first.group(2) for ev in finding.evidence)
    loops = _rows(_table(page, "crash-loops"))
    assert [text for _, text in loops[0][:4]] == [CRASH_UNIT, str(d.crash_loops[0].restarts_total),
                                                  str(d.crash_loops[0].restarts_in_window),
                                                  str(d.crash_loops[0].coredumps_last_hour)]


def test_findings_of_all_targets_in_the_given_order(targets):
    diag = _diag(targets["arm64-host"], targets["arm64-guest"])
    page = render_diagnosis_html(diag)
    shown = re.findall(r'<div class="finding (\w+)"><p><span class="sev \w+">\w+</span> <b>(\w+)</b>: '
                       r"(.*?)</p>", page)
    assert shown == [(f.severity, f.target, html.escape(f.title)) for f in diag.findings]
    assert len(shown) == len(targets["arm64-host"].findings) + len(targets["arm64-guest"].findings)
    assert page.index('id="findings"') < page.index('id="target-0"') < page.index('id="target-1"')


def test_rt_cpu_columns_are_marked(targets, pages):
    d, page = targets["x86-guest"], pages["x86-guest"]
    assert d.rt_cpus == [1]
    ipis = _table(page, "ipis")
    assert '<th class="rt">CPU 1 (RT CPU) /s</th>' in ipis
    assert '<th class="rt">CPU 1 (RT CPU) count</th>' in ipis
    assert '<th class="n">CPU 0 /s</th>' in ipis
    rows = {cells[0][1]: cells for cells in _rows(ipis)}
    for row in ("RES", "CAL"):
        rate = next(r for r in d.ipis if r.row == row).per_cpu
        assert rows[row][2] == ("n", f"{rate[0]:.1f}")
        assert rows[row][4] == ("rt", f"{rate[1]:.1f}")
    assert "RT CPU" in re.search(r'<p class="note">Shaded columns: (.*?)</p>', page).group(1)


@pytest.mark.parametrize(("prefix", "rows"),
                         [("arm64-host", {"IPI0", "IPI1"}), ("arm64-guest", {"IPI0", "IPI1"}),
                          ("x86-guest", {"RES", "CAL"})])
def test_ipi_rows_per_architecture(prefix, rows, pages):
    shown = {cells[0][1] for cells in _rows(_table(pages[prefix], "ipis"))}
    assert rows <= shown


def test_arm64_host_wfx_table_and_plot(targets, pages):
    d, page = targets["arm64-host"], pages["arm64-host"]
    assert [v.name for v in d.wfx] == ["rtguest"]
    vm = d.wfx[0]
    rows = _rows(_table(page, "wfx"))
    assert [text for _, text in rows[0]] == [vm.vm, str(vm.pid), "rtguest", f"{vm.wfi_per_s:.1f}",
                                             f"{vm.wfe_per_s:.1f}", f"{vm.exits_per_s:.1f}"]
    assert vm.wfi_per_s > 1  # the recorded guest traps WFI: the finding names the VM
    assert page.index("VM rtguest: guest WFI traps") < page.index('<table class="ipis">')
    images = _pngs(page)
    assert len(images) == 2 and all(png.startswith(PNG_MAGIC) for png in images)  # IPIs, WFx
    assert 'alt="arm64-host: WFI/WFE exits per second per VM"' in page


@pytest.mark.parametrize("prefix", ["x86-guest", "arm64-guest"])
def test_guests_have_no_wfx_section(prefix, pages):
    assert '<table class="wfx">' not in pages[prefix] and len(_pngs(pages[prefix])) == 1


def test_who_sends_shows_kick_all_cpus_sync_on_the_arm64_guest(targets, pages):
    d, page = targets["arm64-guest"], pages["arm64-guest"]
    sends = _rows(_table(page, "sends"))
    distinct = {(s.target_cpu, s.callsite, s.callback, s.sender) for s in d.trace.ipi_sends}
    assert len(sends) == min(TOP_SENDS, len(distinct))
    assert (f"Top {TOP_SENDS} of {len(distinct)}" in page) == (len(distinct) > TOP_SENDS)
    kicks = [row for row in sends if row[1][1] == "kick_all_cpus_sync"]
    assert kicks, "the recorded crash loop's core dumps kick all CPUs"
    for row in kicks:  # each kick row is the sum over sender CPUs of the trace's rows
        cpu = int(row[0][1].split()[0])
        assert int(row[4][1]) == sum(s.count for s in d.trace.ipi_sends if s.callsite == "kick_all_cpus_sync"
                                     and s.target_cpu == cpu and s.callback == row[2][1]
                                     and s.sender == html.unescape(row[3][1]))
    counts = [int(row[4][1]) for row in sends]
    assert counts == sorted(counts, reverse=True)
    # target CPU 1 is the RT CPU: its cells are shaded and labelled, the others are not
    assert {row[0] for row in sends} <= {("rt", "1 (RT CPU)"), ("n", "0")}
    assert ("rt", "1 (RT CPU)") in {row[0] for row in sends}
    runs = [[text for _, text in row] for row in _rows(_table(page, "callbacks"))]
    assert any(r[1] == "do_nothing" and r[3] == "yes" for r in runs)
    assert len(runs) == len(d.trace.callbacks)


def test_function_tracer_send_paths_on_the_x86_guest(targets, pages):
    d, page = targets["x86-guest"], pages["x86-guest"]
    assert d.trace.send_calls and not d.trace.ipi_sends
    assert "No IPI send events in the trace" in page
    calls = [[text for _, text in row] for row in _rows(_table(page, "send-calls"))]
    first = d.trace.send_calls[0]
    assert calls[0] == [str(first.cpu), first.function, first.caller, first.sender, str(first.count)]
    assert len(calls) == len(d.trace.send_calls)


def test_timers_top_per_cpu(targets, pages):
    d, page = targets["arm64-host"], pages["arm64-host"]
    rows = [[text for _, text in row] for row in _rows(_table(page, "timers"))]
    for cpu in sorted({t.cpu for t in d.trace.timers}):
        label = f"{cpu} (RT CPU)" if cpu in d.rt_cpus else str(cpu)
        mine = [r for r in rows if r[0] == label]
        top = max((t for t in d.trace.timers if t.cpu == cpu), key=lambda t: t.count)
        assert 0 < len(mine) <= TOP_TIMERS
        assert mine[0][1:] == [top.function, top.kind, str(top.count)]


@pytest.mark.parametrize("prefix", PREFIXES)
def test_tracing_state_notes_are_shown(prefix, targets, pages):
    notes = targets[prefix].tracing_state_notes
    shown = re.search(r'<ul class="state-notes">(.*?)</ul>', pages[prefix], re.S)
    assert (shown.group(1) if shown else "") == "".join(f"<li>{html.escape(n)}</li>" for n in notes)


@pytest.mark.parametrize("prefix", PREFIXES)
def test_tracing_state_line_and_lost_events(prefix, targets, pages):
    d, page = targets[prefix], pages[prefix]
    before, after = d.tracing_state_before, d.tracing_state_after
    same = before == after
    assert f"Tracing state after the window {'equals' if same else 'differs from'} the state before." in page
    if same:
        assert '<table class="state-diff">' not in page
    else:
        diff = [[html.unescape(text) for _, text in row] for row in _rows(_table(page, "state-diff"))]
        assert diff == [[k, before.get(k, "-"), after.get(k, "-")] for k in sorted(set(before) | set(after))
                        if before.get(k) != after.get(k)]
    if d.trace.lost:
        lost = {int(r[0][1].split()[0]): int(r[1][1]) for r in _rows(_table(page, "lost"))}
        assert lost == d.trace.lost
    else:
        assert "No trace events lost." in page and '<table class="lost">' not in page


def test_the_recorded_states_cover_both_lines(targets):
    """One recording left the state as found, one (Linux 6.1: the deferred top-level buffer) did not."""
    same = {p: d.tracing_state_before == d.tracing_state_after for p, d in targets.items()}
    assert same["arm64-host"] and not same["x86-guest"]


def test_values_with_html_metacharacters_are_escaped(targets):
    d = targets["x86-guest"]
    bad = d.findings[0].model_copy(update={"title": "<b>x</b>", "evidence": ["a < b & c"]})
    page = render_diagnosis_html(_diag(d.model_copy(update={"findings": [bad, *d.findings[1:]]})))
    assert "&lt;b&gt;x&lt;/b&gt;" in page and "<b>x</b>" not in page
    assert "<li>a &lt; b &amp; c</li>" in page
    # real values carry metacharacters too: the trace's idle task
    assert "&lt;idle&gt;" in page and "<idle>" not in page


def test_nohz_table_highlights_the_cpus_whose_tick_stayed_on(targets):
    """No recorded target had nohz_full CPUs: the table is fed each recorded CPU's own timer_list and
    sched/debug state, as `analyse` reads them for nohz_full CPUs. At least one CPU was busy with its tick on
    in every recording (the probe itself runs somewhere)."""
    bad_seen = 0
    for prefix, d in targets.items():
        if not d.nohz_full:
            assert "No nohz_full CPUs on this target." in render_diagnosis_html(_diag(d))
        s = _sections(prefix)
        nohz = _nohz(d.cpus, parse_timer_list(s["timer_list"]), parse_sched_debug(s["sched_debug"]), d.trace,
                     d.timer_irq_per_s)
        page = render_diagnosis_html(_diag(d.model_copy(update={"nohz": nohz})))
        rows = re.findall(r'<tr(?: class="([^"]*)")?>(.*?)</tr>', _table(page, "nohz"), re.S)[1:]
        assert len(rows) == len(nohz)
        for n, (cls, row) in zip(nohz, rows, strict=True):
            assert (cls == "tick-bad") == (not n.tick_ok)
            assert ("ON while busy" in row) == (not n.tick_ok)
            rt = n.cpu in d.rt_cpus
            cpu_cell = f'<td class="rt">{n.cpu} (RT CPU)</td>' if rt else f'<td class="n">{n.cpu}</td>'
            assert row.startswith(cpu_cell)
            assert html.escape(n.current or "idle") in row and f"{n.timer_irq_per_s:.1f}" in row
            bad_seen += not n.tick_ok
    assert bad_seen


def test_save_diagnosis_writes_json_and_html(targets, tmp_path):
    diag = _diag(targets["arm64-host"], targets["arm64-guest"])
    json_path, html_path = save_diagnosis(diag, tmp_path / "a" / "diagnosis.json", tmp_path / "b" / "d.html")
    assert json_path.read_text() == diag.model_dump_json(indent=2) + "\n"
    assert Diagnosis.model_validate_json(json_path.read_text()) == diag
    assert json.loads(json_path.read_text())["targets"][0]["wfx"][0]["name"] == "rtguest"
    assert html_path.read_text(encoding="utf-8") == render_diagnosis_html(diag)


def test_what_ran_per_cpu_lists_the_busy_tasks_of_the_nohz_cpu():
    """x86-guest-nohz-busy: the two busy `sh` loops (PIDs 360, 362) were switched in on CPU 1 during the window."""
    from orchestrator.diagnose.analysis import analyse
    from orchestrator.diagnose.model import Diagnosis
    from orchestrator.diagnose.probe import parse_tracing_state, split_sections

    p = REC / "x86-guest-nohz-busy"
    s = split_sections(Path(f"{p}-window.txt").read_text(), Path(f"{p}-marker.txt").read_text().strip())
    d = analyse(s, target="guest", label="nohz", rt_hint=[1],
                state_before=parse_tracing_state(Path(f"{p}-state-before.txt").read_text()),
                state_after=parse_tracing_state(Path(f"{p}-state-after.txt").read_text()),
                now=datetime(2026, 11, 30, 1, 0, tzinfo=UTC))
    busy = {t.pid: t.switches_in for t in d.trace.tasks if t.cpu == 1 and t.comm == "sh"}
    assert {360, 362} <= set(busy), busy
    page = render_diagnosis_html(Diagnosis(unit="lab1", started=datetime(2026, 11, 30, 1, 0, tzinfo=UTC),
                                           duration_s=10, targets=[d]))
    section = page[page.index("What ran per CPU"):]
    assert '<td class="n">360</td>' in section and '<td class="n">362</td>' in section, section[:2000]
