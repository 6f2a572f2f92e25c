"""The `tune diagnose` report: one self-contained HTML page (inline CSS, plots as base64 PNG) and the JSON.

Findings come first because they are what the reader acts on; the tables below them are the evidence, per
target, in the order the field notes investigate: IPIs (how many, who sends them, what runs), the tick on
nohz_full CPUs, crash loops, WFI/WFE exits, timers, and whether the trace and the tracing state can be
trusted.
RT CPUs are shaded everywhere, since a disturbance matters only where the RT task runs. Every value that came
from a target is escaped: command names, unit names and cmdlines are the target's, not ours.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from orchestrator.diagnose.model import Diagnosis, Finding, TargetDiagnosis
from orchestrator.report.html import escape as _e
from orchestrator.report.html import img_tag, page, write_page
from orchestrator.report.plots import figure_png, new_figure

TOP_SENDS = 20  # rows of the "who sends them" table
TOP_TIMERS = 10  # timers shown per CPU
RT_NOTE = "RT CPU"
WFI_COLOR, WFE_COLOR = "#1f77b4", "#ff7f0e"

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2em auto;
       max-width: 1200px; color: #1d1d1f; padding: 0 1em; }
h2 { margin-top: 2em; border-bottom: 2px solid #ddd; padding-bottom: 0.2em; } h3 { margin-top: 1.4em; }
.meta { color: #666; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.86em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.55em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.n, th.n { text-align: right; }
th.rt, td.rt { background: #ffe9c2; } th.rt { font-weight: 800; }
tr.tick-bad td { background: #fde0dd; }
.finding { border-left: 6px solid #999; padding: 0.3em 0.9em; margin: 0.8em 0; background: #fafafa; }
.finding.high { border-color: #b3261e; } .finding.medium { border-color: #d08a00; }
.finding.info { border-color: #4a7ab0; }
.sev { display: inline-block; padding: 0.1em 0.6em; border-radius: 4px; color: white; font-weight: 700;
       background: #777; }
.sev.high { background: #b3261e; } .sev.medium { background: #b07400; } .sev.info { background: #4a7ab0; }
.warn { background: #fff4e0; border: 1px solid #e0a040; padding: 0.4em 0.8em; border-radius: 4px; }
img { max-width: 100%; display: block; margin: 0.4em 0; }
pre { font-size: 0.85em; background: #f6f6f6; padding: 0.6em; overflow-x: auto; }
.note { font-style: italic; color: #555; }
"""


def _rate(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _cpus(cpus: list[int]) -> str:
    return ",".join(str(c) for c in cpus) or "none"


def _cell(tag: str, value: Any) -> str:
    """A cell; `value` may be `(text, css class)`. Numbers are right-aligned."""
    cls = "n" if isinstance(value, int | float) and not isinstance(value, bool) else ""
    if isinstance(value, tuple):
        value, cls = value
    return f'<{tag} class="{cls}">{_e(value)}</{tag}>' if cls else f"<{tag}>{_e(value)}</{tag}>"


def _table(head: list[Any] | None, rows: list[list[Any]], cls: str,
           row_classes: list[str] | None = None) -> str:
    """A table whose every cell is escaped here, so no caller can forget it."""
    out = [f'<table class="{cls}">']
    if head:
        out.append("<tr>" + "".join(_cell("th", h) for h in head) + "</tr>")
    for i, row in enumerate(rows):
        rc = row_classes[i] if row_classes else ""
        out.append((f'<tr class="{rc}">' if rc else "<tr>") + "".join(_cell("td", c) for c in row) + "</tr>")
    return "".join(out) + "</table>"


def _rt(cpu: int, d: TargetDiagnosis) -> Any:
    """A CPU cell, shaded and labelled when it is an RT CPU."""
    return (f"{cpu} ({RT_NOTE})", "rt") if cpu in d.rt_cpus else cpu


# ------------------------------------------------------------------------------------------------ plots


def ipi_rates_png(d: TargetDiagnosis) -> bytes:
    """Grouped bars: IPIs/s per CPU, one bar per IPI type; RT CPUs on a shaded span with bold labels. Types
    that stayed at zero on every CPU are left out (arm64 lists eight rows, most of them always idle)."""
    rows = [r for r in d.ipis if any(r.counts.get(c, 0) for c in d.cpus)]
    fig = new_figure(8.0, 3.6)
    ax = fig.add_subplot()
    width = 0.8 / max(len(rows), 1)
    for x, cpu in enumerate(d.cpus):
        if cpu in d.rt_cpus:
            ax.axvspan(x - 0.45, x + 0.45, color="#ffe9c2", zorder=0)
    for i, r in enumerate(rows):
        xs = [x - 0.4 + width * (i + 0.5) for x in range(len(d.cpus))]
        ax.bar(xs, [r.per_cpu.get(c, 0.0) for c in d.cpus], width, label=f"{r.row} {r.description}", zorder=2)
    ax.set_xticks(range(len(d.cpus)),
                  [f"CPU {c}" + (f"\n{RT_NOTE}" if c in d.rt_cpus else "") for c in d.cpus])
    ax.set_xlim(-0.5, len(d.cpus) - 0.5)
    for label, cpu in zip(ax.get_xticklabels(), d.cpus, strict=True):
        if cpu in d.rt_cpus:
            label.set_fontweight("bold")
    if rows:
        ax.legend(fontsize=8, framealpha=0.95)
    else:
        ax.text(0.5, 0.5, "no IPIs during the window", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylabel("IPIs per second")
    ax.set_title(f"{d.label}: IPIs per CPU over {d.duration_s:.0f} s (shaded: {RT_NOTE}s)")
    ax.grid(True, axis="y", alpha=0.3)
    return figure_png(fig)


def wfx_png(d: TargetDiagnosis) -> bytes:
    """WFI and WFE exits per second per VM: the trapping that `wfx_notrap` removes."""
    fig = new_figure(7.0, 3.0)
    ax = fig.add_subplot()
    xs = range(len(d.wfx))
    ax.bar([x - 0.2 for x in xs], [v.wfi_per_s for v in d.wfx], 0.4, label="WFI exits/s", color=WFI_COLOR)
    ax.bar([x + 0.2 for x in xs], [v.wfe_per_s for v in d.wfx], 0.4, label="WFE exits/s", color=WFE_COLOR)
    ax.set_xticks(list(xs), [f"{v.name} (pid {v.pid})" for v in d.wfx])
    ax.set_ylabel("exits per second")
    ax.set_title(f"{d.label}: WFI/WFE exits per VM over {d.duration_s:.0f} s")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    return figure_png(fig)


# ------------------------------------------------------------------------------------------------ sections


def _finding_html(f: Finding) -> str:
    parts = [f'<div class="finding {_e(f.severity)}"><p><span class="sev {_e(f.severity)}">{_e(f.severity)}'
             f"</span> <b>{_e(f.target)}</b>: {_e(f.title)}</p>",
             "<ul>" + "".join(f"<li>{_e(ev)}</li>" for ev in f.evidence) + "</ul>"]
    if f.change:
        parts.append(f'<p>Profile change <code class="change">{_e(f.change)}</code>:</p>')
    if f.profile:
        parts.append(f'<pre class="profile">{_e(f.profile)}</pre>')
    if f.advice:
        parts.append(f'<p class="advice">{_e(f.advice)}</p>')
    return "".join(parts) + "</div>"


def _findings_html(diag: Diagnosis) -> str:
    items = "".join(_finding_html(f) for f in diag.findings)
    return ('<section id="findings"><h2>Findings</h2>'
            + (items or "<p>No findings: nothing in this window calls for a change.</p>") + "</section>")


def _header_html(i: int, d: TargetDiagnosis) -> str:
    rows: list[list[Any]] = [["kernel", d.kernel], ["arch", d.arch], ["window", f"{d.duration_s:.1f} s"],
            ["CPUs", _cpus(d.cpus)], ["RT CPUs", (_cpus(d.rt_cpus), "rt")], ["nohz_full", _cpus(d.nohz_full)],
            ["isolated", _cpus(d.isolated)],
            ["timer_migration", "unknown" if d.timer_migration is None else d.timer_migration],
            ["tracing rests on", d.tracing], ["cmdline", d.cmdline]]
    if d.trace is not None:
        rows.append(["trace", f"{d.trace.records} records; sources: {', '.join(d.trace.sources) or 'none'}"])
    return f'<h2 id="target-{i}">{_e(d.target)}: {_e(d.label)}</h2>' + _table(None, rows, "header")


def _ipi_html(d: TargetDiagnosis) -> str:
    head: list[Any] = ["IPI", "description"]
    for c in d.cpus:
        cls = "rt" if c in d.rt_cpus else "n"
        name = f"CPU {c}" + (f" ({RT_NOTE})" if c in d.rt_cpus else "")
        head += [(f"{name} /s", cls), (f"{name} count", cls)]
    rows = []
    for r in d.ipis:
        row: list[Any] = [r.row, r.description]
        for c in d.cpus:
            cls = "rt" if c in d.rt_cpus else "n"
            row += [(_rate(r.per_cpu.get(c)), cls), (r.counts.get(c, "-"), cls)]
        rows.append(row)
    timer: list[Any] = ["local timer", "interrupts per CPU (x86 LOC, arm64 arch_timer)"]
    for c in d.cpus:
        cls = "rt" if c in d.rt_cpus else "n"
        timer += [(_rate(d.timer_irq_per_s.get(c)), cls), ("", cls)]
    return ("<h3>IPIs per CPU</h3>"
            + _table(head, rows + [timer] if d.timer_irq_per_s else rows, "ipis")
            + f'<p class="note">Shaded columns: {RT_NOTE} ({_e(_cpus(d.rt_cpus))}). Rates per second over '
            f"the {d.duration_s:.1f} s window, counts are the /proc/interrupts delta; the plot leaves out "
            "the IPI types that stayed at zero.</p>"
            + img_tag(ipi_rates_png(d), f"{d.label}: IPIs per second per CPU and type"))


def _trace_html(d: TargetDiagnosis) -> str:
    t = d.trace
    if t is None:
        return f'<h3>Who sends them</h3><p class="warn">No trace on this target: {_e(d.tracing)}</p>'
    sends: Counter[tuple[int, str, str, str]] = Counter()
    for s in t.ipi_sends:
        sends[(s.target_cpu, s.callsite, s.callback, s.sender)] += s.count
    top = sends.most_common(TOP_SENDS)
    out = ["<h3>Who sends them</h3>"]
    if top:
        out.append(_table(["target CPU", "callsite", "callback", "sender", "count"],
                          [[_rt(k[0], d), k[1], k[2], k[3], n] for k, n in top], "sends"))
        if len(sends) > TOP_SENDS:
            rest = sum(n for _, n in sends.most_common()[TOP_SENDS:])
            out.append(f'<p class="note">Top {TOP_SENDS} of {len(sends)} (target CPU, callsite, callback, '
                       f"sender) rows; {rest} IPIs not shown.</p>")
    else:
        out.append(f'<p class="note">No IPI send events in the trace ({_e(d.tracing)}).</p>')
    if t.send_calls:
        out.append("<h3>Cross-call send paths entered (function tracer; target CPUs not recorded)</h3>"
                   + _table(["sender CPU", "function", "caller", "sender", "count"],
                            [[_rt(s.cpu, d), s.function, s.caller, s.sender, s.count] for s in t.send_calls],
                            "send-calls"))
    out.append("<h3>What runs</h3>")
    out.append(_table(["CPU", "function", "via", "from IPI", "count", "interrupted task"],
                      [[_rt(c.cpu, d), c.function, c.via, "yes" if c.from_ipi else "no", c.count,
                        c.interrupted] for c in t.callbacks], "callbacks")
               if t.callbacks else '<p class="note">No cross-call callbacks in the trace.</p>')
    return "".join(out)


def _nohz_html(d: TargetDiagnosis) -> str:
    if not d.nohz:
        return '<h3>nohz_full CPUs</h3><p class="note">No nohz_full CPUs on this target.</p>'
    def kv(m: dict[str, int]) -> str:
        return ", ".join(f"{k} {v}" for k, v in m.items()) or "-"
    rows = [[_rt(n.cpu, d), "?" if n.tick_stopped is None else ("yes" if n.tick_stopped else "no"),
             "?" if n.nr_running is None else n.nr_running, n.current or "idle", ", ".join(n.runnable) or "-",
             ", ".join(n.active_timers) or "-", kv(n.timers_fired), kv(n.tick_dependencies), n.tick_stops,
             _rate(n.timer_irq_per_s), "ok" if n.tick_ok else "ON while busy"] for n in d.nohz]
    return ("<h3>nohz_full CPUs</h3>"
            + _table(["CPU", "tick stopped", "nr_running", "current", "runnable", "active timers",
                      "timers fired", "tick dependencies", "tick stops", "timer irq/s", "tick"], rows, "nohz",
                     ["tick-bad" if not n.tick_ok else "" for n in d.nohz])
            + '<p class="note">Red rows: the tick kept running while a task ran there.</p>')


def _loops_html(d: TargetDiagnosis) -> str:
    if not d.crash_loops:
        return '<h3>Crash loops</h3><p class="note">No crash-looping service.</p>'
    return "<h3>Crash loops</h3>" + _table(
        ["unit", "restarts total", "restarts in window", "core dumps last hour", "last signal", "exe",
         "state", "unit file"],
        [[c.unit, c.restarts_total, c.restarts_in_window, c.coredumps_last_hour, c.last_signal or "-",
          c.exe or "-", c.state, c.unit_file_state] for c in d.crash_loops], "crash-loops")


def _wfx_html(d: TargetDiagnosis) -> str:
    if not d.wfx:
        return ""
    return ("<h3>WFI/WFE exits per VM</h3>"
            + _table(["VM", "pid", "name", "WFI exits/s", "WFE exits/s", "all exits/s"],
                     [[v.vm, v.pid, v.name, (_rate(v.wfi_per_s), "n"), (_rate(v.wfe_per_s), "n"),
                       (_rate(v.exits_per_s), "n")] for v in d.wfx], "wfx")
            + img_tag(wfx_png(d), f"{d.label}: WFI/WFE exits per second per VM"))


def _timers_html(d: TargetDiagnosis) -> str:
    timers = d.trace.timers if d.trace else []
    if not timers:
        return '<h3>Timers fired</h3><p class="note">No timer expiries in the trace.</p>'
    rows = []
    for cpu in sorted({t.cpu for t in timers}):
        mine = sorted((t for t in timers if t.cpu == cpu), key=lambda t: -t.count)[:TOP_TIMERS]
        rows += [[_rt(cpu, d), t.function, t.kind, t.count] for t in mine]
    return (f"<h3>Timers fired per CPU (top {TOP_TIMERS})</h3>"
            + _table(["CPU", "function", "kind", "count"], rows, "timers"))


def _tasks_html(d: TargetDiagnosis) -> str:
    """What ran on each CPU during the window (sched_switch: times each task was switched in), RT CPUs first:
    the field notes' "see what runs there"."""
    tasks = d.trace.tasks if d.trace else []
    if not tasks:
        return ""
    rows = []
    for cpu in sorted({t.cpu for t in tasks}, key=lambda c: (c not in d.rt_cpus, c)):
        mine = sorted((t for t in tasks if t.cpu == cpu), key=lambda t: -t.switches_in)[:TOP_TIMERS]
        rows += [[_rt(cpu, d), t.comm, t.pid, t.switches_in] for t in mine]
    return (f"<h3>What ran per CPU (sched_switch, top {TOP_TIMERS})</h3>"
            + _table(["CPU", "task", "PID", "switched in"], rows, "tasks"))


def _trust_html(d: TargetDiagnosis) -> str:
    """Whether the evidence is complete (lost events) and the target was left as found (tracing state)."""
    out = ["<h3>Trace completeness and tracing state</h3>"]
    lost = d.trace.lost if d.trace else {}
    if lost:
        out.append(f'<p class="warn">The ring buffer overflowed: {sum(lost.values())} trace events lost; the '
                   "counts above are lower bounds.</p>"
                   + _table(["CPU", "lost events"], [[_rt(c, d), n] for c, n in sorted(lost.items())],
                            "lost"))
    elif d.trace is not None:
        out.append("<p>No trace events lost.</p>")
    same = d.tracing_state_before == d.tracing_state_after
    out.append(f'<p class="state">Tracing state after the window {"equals" if same else "differs from"} '
               "the state before.</p>")
    if not same:
        b, a = d.tracing_state_before, d.tracing_state_after
        out.append(_table(["item", "before", "after"],
                          [[k, b.get(k, "-"), a.get(k, "-")] for k in sorted(set(b) | set(a))
                           if b.get(k) != a.get(k)],
                          "state-diff"))
    if d.tracing_state_notes:
        out.append('<ul class="state-notes">' + "".join(f"<li>{_e(n)}</li>" for n in d.tracing_state_notes)
                   + "</ul>")
    return "".join(out)


def _target_html(i: int, d: TargetDiagnosis) -> str:
    return (f'<section class="target" id="section-{i}">' + _header_html(i, d) + _ipi_html(d) + _trace_html(d)
            + _nohz_html(d) + _loops_html(d) + _wfx_html(d) + _timers_html(d) + _tasks_html(d) + _trust_html(d)
            + "</section>")


def render_diagnosis_html(diag: Diagnosis) -> str:
    """The whole page: findings of all targets first, then each target's evidence."""
    title = f"tune diagnose {diag.unit}"
    targets = ", ".join(f"{t.target} ({t.label})" for t in diag.targets)
    body = [f"<h1>{_e(title)}</h1>",
            f'<p class="meta">started {_e(diag.started.isoformat(timespec="seconds"))}; window '
            f"{diag.duration_s:g} s; targets: {_e(targets)}; {len(diag.findings)} finding(s).</p>",
            _findings_html(diag)]
    body += [_target_html(i, d) for i, d in enumerate(diag.targets)]
    return page(title, body, css=_CSS)


def save_diagnosis(diag: Diagnosis, json_path: Path, html_path: Path) -> tuple[Path, Path]:
    """Write the JSON (the whole evidence, for tooling) and the HTML page; parent directories are created."""
    json_path, html_path = Path(json_path), Path(html_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(diag.model_dump_json(indent=2) + "\n", encoding="utf-8")
    write_page(html_path, render_diagnosis_html(diag))
    return json_path, html_path
