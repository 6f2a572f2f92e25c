"""The mechanism evidence of a change in the apply report, beside its latency: how the decision was reached, the
power the rule had at `min_effect`, the targeted mechanisms' rates before and after (a table, and a plot of the
per-CPU rates), and whether the latency counted at all.

Everything here reads what the run recorded: the Decision as plain JSON (orchestrator/stats/decide.py: `kept_on`,
`reason`, `mechanisms`, `power_at_min_effect` ...), the mechanisms the change declared (the outcome's dicts:
label, source, names, on, cpus, read_on), each run's rate of each (events per second, None when the counters
could not tell) and each run's counters (`LatencyResult.counters`, the measured target's). Old reports, written
before mechanisms were recorded, have none of these: their sections say so and nothing is guessed.

The per-CPU plot is drawn only for IRQ and softirq mechanisms read on the measured target, whose per-CPU counts
are in the runs' counters; a mechanism read on the host of a guest (KVM exits, vCPU threads, a host change's
IRQs) has its per-run rates in the report but not the host's per-CPU counts."""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any

from orchestrator.changes.mechanism import Mechanism
from orchestrator.measure.counters import CounterDeltas, rate_of, split_key
from orchestrator.measure.model import METRIC_LABEL, LatencyResult
from orchestrator.report.html import escape, img_tag
from orchestrator.report.plots import RatePanel, render_cpu_rates_png

__all__ = ["cpu_rates", "decision_path", "mechanism_section", "power_html", "side_cpu_medians"]

#: How the rule's reason states the way the decision went (orchestrator/stats/decide.py `_reason`'s last part).
_PATH_MARKERS = ("Kept on latency:", "Kept on mechanism:", "Rolled back on mechanism:", "Rolled back:",
                 "Inconclusive", "Nothing is shown yet")
_PATH_END = " Boots are taken from the plan"  # a remark the boot analysis appends after the rule's last part
_SOURCE = {"irq": "/proc/interrupts", "softirq": "/proc/softirqs", "kvm": "KVM debugfs, per VM",
           "thread": "vCPU threads' scheduler counters", "sysreg": "kvm:kvm_sys_access hist of the vCPU threads"}
_PLOTTED = ("irq", "softirq")
_SD_SOURCE = {"first look": "estimated from the first look's runs", "noise profile": "from the unit's noise profile",
              "boots": "estimated from the boots"}


def _pct(x: float) -> str:
    if not math.isfinite(x):
        return "+inf" if x > 0 else "-inf"
    return f"{x * 100:+.0f}%" if abs(x) >= 0.095 else f"{x * 100:+.1f}%"


def fmt_rate(v: float | None) -> str:
    """Events per second, to about 3 digits; None: `-` (no rate: the counters could not tell)."""
    if v is None:
        return "-"
    if v == 0:
        return "0"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 1:
        return f"{v:.1f}"
    return f"{v:.2g}"


# ------------------------------------------------------------------------------------------- the decision


def _primary(decision: Mapping[str, Any]) -> str:
    for name, m in (decision.get("metrics") or {}).items():
        if isinstance(m, dict) and m.get("role") == "primary":
            return str(name)
    return "p999_us"


def decision_path(decision: Mapping[str, Any] | None) -> tuple[str, str]:
    """(kind, text): how the decision was reached. kind: `latency`, `mechanism` (kept on either), `rollback`,
    `inconclusive`, `interim` or `none`; the text is the rule's own statement (the last part of its reason:
    "Kept on mechanism: <label> -98% [-99%, -96%] (6 + 6 runs); p99.9 not worse than +5%."), or, for a decision
    whose reason does not have it, one built from its verdict and action."""
    if not decision:
        return "none", "No decision recorded."
    verdict = str(decision.get("verdict", ""))
    action = str(decision.get("action", ""))
    kept_on = decision.get("kept_on")
    if decision.get("final") is False:
        kind = "interim"
    elif verdict == "keep":
        kind = "mechanism" if kept_on == "mechanism" else "latency"
    elif verdict in ("rollback", "inconclusive"):
        kind = verdict
    else:
        kind = "none"
    reason = str(decision.get("reason") or "")
    start = max((reason.rfind(m) for m in _PATH_MARKERS), default=-1)
    if start >= 0:
        text = reason[start:]
        if _PATH_END in text:
            text = text[: text.index(_PATH_END)]
        return kind, text.strip()
    label = METRIC_LABEL.get(_primary(decision), _primary(decision))
    built = {"latency": f"Kept on latency: {label} shown better." if kept_on == "latency" else
             "Kept (a decision recorded before the mechanism path: on latency).",
             "mechanism": "Kept on mechanism.",
             "rollback": f"Rolled back on {decision.get('rolled_back_on')}." if decision.get("rolled_back_on") else
             "Rolled back.",
             "inconclusive": f"Inconclusive: policy -> {action}.",
             "interim": "Not final: an interim look that asked for more runs.",
             "none": f"Verdict {verdict or 'unknown'}, action {action or 'unknown'}."}
    return kind, built[kind]


_MIN_EFFECT = (re.compile(r"not worse than \+(\d+(?:\.\d+)?)%"), re.compile(r"power \d+% at -(\d+(?:\.\d+)?)%"),
               re.compile(r"improve by less than (\d+(?:\.\d+)?)%"))


def _min_effect(decision: Mapping[str, Any]) -> str | None:
    """min_effect as the rule stated it (the Decision does not carry the rule; its reason and power note do)."""
    for text in (decision.get("power_note"), decision.get("reason")):
        for pattern in _MIN_EFFECT:
            m = pattern.search(str(text or ""))
            if m:
                return f"{m.group(1)}%"
    return None


def power_html(decision: Mapping[str, Any] | None) -> str:
    """The power the rule had at min_effect (with the K and the spread it used), and whether the error
    guarantee holds; a shortfall or a guarantee that does not hold is shown as a warning."""
    if not decision:
        return ""
    out = []
    units = "boots" if decision.get("boots_before") is not None else "runs"
    eps = _min_effect(decision)
    primary = METRIC_LABEL.get(_primary(decision), _primary(decision))
    at = f"min_effect (-{eps} in {primary})" if eps else f"min_effect (in {primary})"
    pw = decision.get("power_at_min_effect")
    k = decision.get("k_max_used")
    sd = decision.get("sd_log")
    if isinstance(pw, (int, float)):
        facts = []
        if isinstance(k, int):
            facts.append(f"K = {k} {units} per side")
        if isinstance(sd, (int, float)):
            src = decision.get("sd_source")
            facts.append(f"run-to-run log-SD of {primary} {sd:.3g}" + (f", {_SD_SOURCE.get(src, src)}" if src else ""))
        cls = "power short" if decision.get("power_note") else "power"
        out.append(f'<p class="{cls}" data-power="{pw:.4f}"><b>Power at {escape(at)}:</b> {pw * 100:.0f}%'
                   + (f" ({escape('; '.join(facts))})" if facts else "")
                   + ": the chance the rule had to keep on latency a change that truly improves it by that much.</p>")
    elif "power_at_min_effect" in decision:  # the rule of issue #18 without a power (older decisions: none)
        if decision.get("latency_applicable") is False:
            why = "the latency does not decide this change"
        elif decision.get("guarantee_holds") is False:
            why = "the error guarantee does not hold, so no error rate or power is attached"
        elif decision.get("final") is False:
            why = "not before the first look"
        else:
            why = "no run-to-run spread to compute it from"
        out.append(f'<p class="power none"><b>Power at {escape(at)}:</b> not computed: {escape(why)}.</p>')
    if decision.get("power_note"):
        out.append(f'<p class="warn power-note">Power short of the target: {escape(decision["power_note"])}.</p>')
    if decision.get("guarantee_holds") is False:
        boots = ""
        if decision.get("boots_before") is not None:
            boots = f" ({decision['boots_before']} boot(s) before, {decision.get('boots_after')} after)"
        out.append('<p class="warn guarantee" data-guarantee="no"><b>The error guarantee does not hold</b>'
                   f"{escape(boots)}: too few boots per side for the boot-level test, so the runs were analysed as "
                   "if independent (ignoring the boot-to-boot variation): the verdict says what the runs show, "
                   "with no error rate attached.</p>")
    elif decision.get("guarantee_holds") is True:
        out.append('<p class="meta guarantee" data-guarantee="yes">The error guarantee holds (false keeps within '
                   "the rule's error budget; see the reason for its levels).</p>")
    return "".join(out)


# ------------------------------------------------------------------------------------------- per-CPU rates


def _mechanism(declared: Mapping[str, Any]) -> Mechanism | None:
    try:
        return Mechanism(label=str(declared["label"]), source=declared["source"],
                         names=tuple(str(n) for n in declared.get("names") or ()),
                         on=declared.get("on", "target"), cpus=declared.get("cpus", "rt"))
    except (KeyError, TypeError):
        return None


def cpu_rates(deltas: CounterDeltas, patterns: Sequence[str]) -> dict[int, float | None]:
    """CPU -> events per second of the keys matching `patterns` on that CPU over one run (measure/counters.py
    `rate_of` per CPU: None when a key there has an issue or the interval is unknown)."""
    cpus = sorted({cpu for key in {*deltas.deltas, *deltas.issues}
                   for base, cpu in [split_key(key)] if cpu is not None
                   and any(fnmatchcase(base, p) for p in patterns)})
    return {cpu: rate_of(deltas, patterns, [cpu]).value for cpu in cpus}


def side_cpu_medians(runs: Sequence[LatencyResult], mech: Mechanism) -> tuple[dict[int, float | None], int]:
    """(CPU -> the median over the side's runs of that CPU's rate, the runs that had counters). A CPU whose rate
    no run could tell is None."""
    per_cpu: dict[int, list[float]] = {}
    seen: set[int] = set()
    with_counters = 0
    for res in runs:
        if res.counters is None:
            continue
        with_counters += 1
        for cpu, v in cpu_rates(res.counters, mech.counters(res.counters)).items():
            seen.add(cpu)
            if v is not None:
                per_cpu.setdefault(cpu, []).append(v)
    return {cpu: (statistics.median(per_cpu[cpu]) if cpu in per_cpu else None) for cpu in sorted(seen)}, \
        with_counters


def _measured(runs: Sequence[LatencyResult]) -> str | None:
    targets = {r.target.rsplit(".", 1)[-1] for r in runs if r.target}
    return targets.pop() if len(targets) == 1 else None


def _cyclictest_cpus(runs: Sequence[LatencyResult]) -> list[int]:
    return sorted({c for r in runs if r.settings is not None for c in r.settings.cpus})


# ------------------------------------------------------------------------------------------- the section


def _where(m: Mapping[str, Any]) -> str:
    names = ", ".join(str(n) for n in m.get("names") or ())
    cpus = {"rt": "RT CPUs", "all": "all CPUs"}.get(str(m.get("cpus")), str(m.get("cpus", "")))
    if m.get("source") == "sysreg":  # counted per thread, whichever CPU it ran on
        cpus = "each vCPU thread of the guest"
    return (f"{m.get('read_on') or m.get('on') or '-'}: {_SOURCE.get(str(m.get('source')), m.get('source'))} "
            f"({names}), {cpus}")


def _run_medians(rates: Mapping[str, Sequence[Mapping[str, float | None]]], label: str, side: str) -> float | None:
    vals = [v for r in rates.get(side, []) if (v := r.get(label)) is not None]
    return statistics.median(vals) if vals else None


def mechanism_section(cid: str, name: str, mechanisms: Sequence[Mapping[str, Any]],
                      rates: Mapping[str, Sequence[Mapping[str, float | None]]],
                      decision: Mapping[str, Any] | None, before: Sequence[LatencyResult],
                      after: Sequence[LatencyResult], left_out: Sequence[Mapping[str, Any]] = ()) -> str:
    """The mechanisms' table (label, where read, before and after rate: the median over runs, the ratio with its
    interval, the finding), the per-run rates, and the per-CPU plot; `left_out`: declared mechanisms the unit
    could not count, each with why."""
    gone = "".join(f'<p class="meta" data-left-out="{escape(str(m.get("label")))}">Left out of the decision: '
                   f'{escape(str(m.get("label")))} ({escape(str(m.get("why")))}).</p>' for m in left_out)
    compared: Mapping[str, Any] = (decision or {}).get("mechanisms") or {}
    labels = [str(m.get("label")) for m in mechanisms]
    labels += [lb for lb in compared if lb not in labels]
    labels += [lb for side in ("before", "after") for r in rates.get(side, []) for lb in r if lb not in labels]
    if not labels:
        return ("<h3>Mechanism</h3><p class=\"meta\">No mechanism declared or recorded for this change: only its "
                "latency is evidence.</p>" + gone)
    declared = {str(m.get("label")): m for m in mechanisms}
    out = ["<h3>Mechanism (events per second, before &rarr; after)</h3>"]
    head = ("mechanism", "where read", "before /s", "after /s", "after / before - 1 [interval]", "level",
            "finding", "units")
    rows = []
    for label in labels:
        mc = compared.get(label) if isinstance(compared.get(label), dict) else None
        m = declared.get(label, {})
        b = mc.get("before_rate") if mc else _run_medians(rates, label, "before")
        a = mc.get("after_rate") if mc else _run_medians(rates, label, "after")
        if mc and all(isinstance(mc.get(k), (int, float)) for k in ("ratio", "ci_low", "ci_high")):
            ratio = f"{_pct(mc['ratio'] - 1)} [{_pct(mc['ci_low'] - 1)}, {_pct(mc['ci_high'] - 1)}]"
        else:
            ratio = "-"
        level = f"{mc['level']:.3g}" if mc and isinstance(mc.get("level"), (int, float)) else "-"
        finding = str(mc.get("finding")) if mc else "not in the decision"
        units = (f"{mc.get('n_before')} + {mc.get('n_after')} {mc.get('units', 'runs')}" if mc else
                 f"{len(rates.get('before', []))} + {len(rates.get('after', []))} runs")
        cls = {"reduced": "good", "increased": "bad"}.get(finding, "")
        cells = [f'<td class="l">{escape(label)}</td>', f'<td class="l">{escape(_where(m) if m else "-")}</td>',
                 f'<td data-col="before">{escape(fmt_rate(b))}</td>',
                 f'<td data-col="after">{escape(fmt_rate(a))}</td>',
                 f'<td data-col="ratio">{escape(ratio)}</td>', f"<td>{escape(level)}</td>",
                 f'<td class="l finding {cls}" data-col="finding">{escape(finding)}</td>', f"<td>{escape(units)}</td>"]
        rows.append(f'<tr data-mechanism="{escape(label)}">' + "".join(cells) + "</tr>")
    out.append('<table class="mechanisms"><tr>' + "".join(f'<th class="l">{escape(h)}</th>' for h in head) + "</tr>"
               + "".join(rows) + "</table>")
    out.append('<p class="meta">Rates are the medians over the runs of each side; the ratio compares the geometric '
               "means of rate + one event per run, over runs (or boots), and its interval is one-sided at the "
               "level shown (its upper end is the bound a \u201creduced\u201d finding needs).</p>")
    if any(rates.get(side) for side in ("before", "after")):
        prow = []
        for side in ("before", "after"):
            for i, r in enumerate(rates.get(side, [])):
                prow.append(f'<tr data-row="{cid}/rates/{side}/{i + 1}"><td class="l">{side} {i + 1}</td>'
                            + "".join(f"<td>{escape(fmt_rate(r.get(lb)))}</td>" for lb in labels) + "</tr>")
        out.append("<details><summary>rates of each run (events per second; - : the counters could not tell)"
                   "</summary><table class=\"rates\"><tr><th class=\"l\">run</th>"
                   + "".join(f"<th>{escape(lb)}</th>" for lb in labels) + "</tr>" + "".join(prow)
                   + "</table></details>")
    out.append(gone)
    out.append(_cpu_plot(name, mechanisms, before, after))
    return "".join(out)


def _cpu_plot(name: str, mechanisms: Sequence[Mapping[str, Any]], before: Sequence[LatencyResult],
              after: Sequence[LatencyResult]) -> str:
    measured = _measured([*before, *after])
    panels: list[RatePanel] = []
    skipped: list[str] = []
    for m in mechanisms:
        mech = _mechanism(m)
        if mech is None:
            continue
        read_on = m.get("read_on")
        if mech.source not in _PLOTTED:
            skipped.append(f"{mech.label} ({_SOURCE.get(mech.source, mech.source)}: not per CPU)")
            continue
        if measured is not None and read_on is not None and read_on != measured:
            skipped.append(f"{mech.label} (read on the {read_on} around each run; the runs' counters are the "
                           f"{measured}'s: per-run rates only)")
            continue
        sides = {"before": side_cpu_medians(before, mech), "after": side_cpu_medians(after, mech)}
        if not any(v for v, _ in sides.values()):
            skipped.append(f"{mech.label} (no run recorded its counters)")
            continue
        panels.append(RatePanel(title=mech.label, rates={s: v for s, (v, _) in sides.items()},
                                runs={s: n for s, (_, n) in sides.items()}))
    out = []
    if panels:
        ct = _cyclictest_cpus([*before, *after])
        out.append("<h4>Per-CPU rates (median over the runs of each side)</h4>")
        out.append(img_tag(render_cpu_rates_png(panels, f"{name}: targeted interrupts per CPU", marked=ct),
                           f"per-CPU rates before/after {name}"))
    if skipped:
        out.append('<p class="meta">Not plotted per CPU: ' + escape("; ".join(skipped)) + ".</p>")
    return "".join(out)
