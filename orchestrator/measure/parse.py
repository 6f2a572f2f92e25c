"""Parse cyclictest (rt-tests 2.x) output into a `LatencyResult`: exact figures or a `ParseError`, no guesses.

Forms understood (detected by content):

- summary: `T: 0 (1234) P:95 I:1000 C:   5000 Min:     11 Act:   23 Avg:   26 Max:     296` per thread, once
  at exit with `-q`, or redrawn with ANSI cursor-up codes without `-q` (the last line per thread counts).
- histogram: `-h US` / `-H US`, a `# Histogram` block of `%06d` rows with one `%06lu` count per thread
  (`-H` adds an all-threads column when there are 2+ threads), then `# Total:`, `# Min/Avg/Max Latencies:`,
  `# Histogram Overflows:` and the overflow cycle numbers. May follow redrawn summary lines (no `-q`).
- json: the document written by `--json=FILE` (passed as `text`, or as `json_text` beside the stdout).

Facts this relies on (rt-tests 2.4 source `print_hist()`/`timerthread()`, confirmed on recorded runs, see
tests/recorded/cyclictest/controller/README.md): a sample of `diff` us goes into bucket `diff` when
`diff < US`, else it only increments the overflow count; `# Total:` sums the histogram rows only, so
samples = Total + Overflows = cycles. The JSON has no overflow count: overflows = cycles - sum(histogram).

Hostile or damaged input is refused with the field named (ParseError), never a traceback or a silent figure:
numbers are ASCII digits of at most 20 (cyclictest prints unsigned long), the --json document goes through
`orchestrator.core.jsonio` (size, depth, no NaN/Infinity, 64-bit integers), counts are integers (not floats or
booleans), and every thread's figures must describe one distribution (`LatencyStats` checks min <= avg <= max
and the rest). Output larger than MAX_OUTPUT_BYTES is refused unread: the largest histogram a plan may ask for
(MAX_HIST_CELLS buckets over all threads, ~7 bytes each) stays well below it.
"""

from __future__ import annotations

import re
from fractions import Fraction
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from orchestrator.core import jsonio
from orchestrator.core.errors import ParseError
from orchestrator.measure.model import HIST_MAX, MAX_CPU, PERCENTILES, LatencyResult, LatencyStats, OutputForm

__all__ = ["MAX_OUTPUT_BYTES", "parse_cyclictest", "parse_cyclictest_file", "percentile",
           "stats_from_histogram"]

#: The most cyclictest output rt-tune reads (a 20,000-bucket histogram of one thread is 280 KB; 4,000,000
#: histogram cells, the most a plan allows, about 30 MB).
MAX_OUTPUT_BYTES = 64 * 2**20

_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")
# Widths are cyclictest's printf minimums (C:%7lu Min:%7ld Act:%5ld Avg:%5ld Max:%8ld): a narrower field was
# cut off, so a line truncated inside its last number is caught instead of read as a smaller number.
# Numbers are ASCII (re.ASCII: \d would take any Unicode digit) and at most 20 digits (an unsigned long).
_SUMMARY = re.compile(
    r"T:\s*(?P<thread>\d{1,5})\s+\(\s*(?P<tid>\d{1,10})\)\s+P:\s*(?P<prio>\d{1,3})"
    r"\s+I:\s*(?P<interval>\d{1,10})"
    r"\s+C:(?P<cycles> *\d{1,20})\s+Min:(?P<min> *-?\d{1,20})\s+Act:(?P<act> *-?\d{1,20})"
    r"\s+Avg:(?P<avg> *-?\d{1,20})\s+Max:(?P<max> *-?\d{1,20})(?:\s+SMI:(?P<smi> *\d{1,20}))?",
    re.ASCII,
)
_SUMMARY_WIDTH = {"cycles": 7, "min": 7, "act": 5, "avg": 5, "max": 8, "smi": 8}
_ROW = re.compile(r"(\d{6}) (\d{6,20}(?:\t\d{6,20})*)", re.ASCII)  # %06d bucket (< HIST_MAX), %06lu counts
_TRAILER = re.compile(
    r"# (Total|Min Latencies|Avg Latencies|Max Latencies|Histogram Overflows):((?: +\d{1,20})*)", re.ASCII
)
_TRAILER_ORDER = ["Total", "Min Latencies", "Avg Latencies", "Max Latencies", "Histogram Overflows"]
_TRAILER_WIDTH = {
    "Total": 9,
    "Min Latencies": 5,
    "Avg Latencies": 5,
    "Max Latencies": 5,
    "Histogram Overflows": 5,
}
_OUTLIERS_HEADER = "# Histogram Overflow at cycle number:"
_OUTLIERS = re.compile(r"# Thread (\d{1,5}):((?: +\d{1,20})*)(?: +# +(\d{1,20}) others)?", re.ASCII)
# cyclictest 2.4 getopt string "a::A::b:c:d:D:F:h:H:i:l:MNo:p:mqrRsSt::uvD:x": letters taking an argument
_ARG_LETTERS = set("aAbcdDFhHilopt")


def _show(line: str, limit: int = 100) -> str:
    return repr(line if len(line) <= limit else line[:limit] + "...")


def _brief(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _problems(exc: ValidationError) -> str:
    """A model's complaints, each with the field and the value (a rule over several fields names them)."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        got = "" if not loc or err["type"] == "missing" else f" (got {_brief(err.get('input'))})"
        parts.append(f"{loc + ': ' if loc else ''}{err['msg'].removeprefix('Value error, ')}{got}")
    return "; ".join(parts)


def _stats(who: str, **fields: Any) -> LatencyStats:
    """LatencyStats whose checks (one distribution: min <= avg <= max, ...) fail as a ParseError naming
    `who`."""
    try:
        return LatencyStats(**fields)
    except ValidationError as exc:
        raise ParseError(f"cyclictest {who}: {_problems(exc)}: expected the figures of one run") from None


# ---------------------------------------------------------------------------------------------- pure helpers


def percentile(hist: dict[int, int], samples: int, fraction: float) -> int | None:
    """The smallest bucket (us) at which the cumulative count reaches `fraction * samples`, exactly.

    `samples` counts every sample, overflows included (so it is >= the histogram total). When the histogram
    never reaches the target the percentile lies among the overflows: None, not a guess."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction {fraction!r}: expected 0 < fraction <= 1")
    total = sum(hist.values())
    if samples <= 0 or samples < total:
        raise ValueError(f"samples {samples}: expected > 0 and >= the histogram total {total}")
    q = Fraction(str(fraction))  # 0.999 -> 999/1000 exactly, not the binary float
    cumulative = 0
    for bucket in sorted(hist):
        cumulative += hist[bucket]
        if hist[bucket] and cumulative * q.denominator >= q.numerator * samples:
            return bucket
    return None


def stats_from_histogram(
    hist: dict[int, int],
    *,
    thread: int | None = None,
    overflows: int = 0,
    min_us: int | None = None,
    avg_us: float | None = None,
    max_us: int | None = None,
) -> LatencyStats:
    """Figures for one thread (or pooled threads) from its histogram plus what cyclictest reported.

    samples = histogram total + overflows. min/max default to the histogram's when not given (max stays None
    if there are overflows: it lies beyond the histogram). avg is the exact histogram mean when there are no
    overflows (cyclictest's `avg` is the mean of the same integer us values; the text form truncates it to an
    integer), otherwise the reported `avg_us`. Given min/max are checked against the histogram: a mismatch
    means the output was garbled or mixed from two runs, and raises ParseError."""
    who = "all threads" if thread is None else f"thread {thread}"
    for bucket, count in hist.items():
        if bucket < 0 or count < 0:
            raise ParseError(f"{who}: histogram bucket {bucket} count {count}: expected non-negative values")
    if overflows < 0:
        raise ParseError(f"{who}: {overflows} overflows: expected a count >= 0")
    kept = {b: hist[b] for b in sorted(hist) if hist[b]}
    samples = sum(kept.values()) + overflows
    if samples == 0:
        raise ParseError(
            f"{who}: 0 samples (histogram empty, no overflows): expected cyclictest to have run "
            "at least one cycle; was the run too short or did the thread never start?"
        )
    if kept:
        lo, hi = min(kept), max(kept)
        if min_us is None:
            min_us = lo
        elif min_us != lo:
            raise ParseError(
                f"{who}: reported min {min_us} us but the smallest non-empty histogram bucket is "
                f"{lo} us: expected them to agree"
            )
        if max_us is None:
            max_us = hi if overflows == 0 else None
        elif overflows == 0 and max_us != hi:
            raise ParseError(
                f"{who}: reported max {max_us} us but the largest histogram bucket is {hi} us "
                "and nothing overflowed: expected them to agree"
            )
        elif overflows and max_us <= hi:
            raise ParseError(
                f"{who}: reported max {max_us} us is not above the largest histogram bucket {hi} us "
                f"although {overflows} samples overflowed the histogram"
            )
        if overflows == 0:
            avg_us = round(sum(b * c for b, c in kept.items()) / samples, 2)
    figures = {name: percentile(kept, samples, frac) for name, frac in PERCENTILES.items()}
    return _stats(
        who,
        thread=thread,
        samples=samples,
        min_us=min_us,
        avg_us=avg_us,
        max_us=max_us,
        overflows=overflows,
        histogram=kept,
        **figures,
    )


def _pool(threads: list[LatencyStats]) -> LatencyStats:
    """The all-threads entry: histograms summed per bucket, min of mins, max of maxes, sample-weighted avg."""
    samples = sum(t.samples for t in threads)
    mins = [t.min_us for t in threads if t.min_us is not None]
    maxes = [t.max_us for t in threads if t.max_us is not None]
    min_us = min(mins) if len(mins) == len(threads) else None
    max_us = max(maxes) if len(maxes) == len(threads) else None
    avg_us = None
    if all(t.avg_us is not None for t in threads):
        avg_us = round(sum((t.avg_us or 0.0) * t.samples for t in threads) / samples, 2)
    overflows = sum(t.overflows for t in threads)
    if any(t.histogram is None for t in threads):
        return _stats(
            "all threads", thread=None, samples=samples, min_us=min_us, avg_us=avg_us, max_us=max_us,
            overflows=overflows
        )
    pooled: dict[int, int] = {}
    for t in threads:
        for bucket, count in (t.histogram or {}).items():
            pooled[bucket] = pooled.get(bucket, 0) + count
    return stats_from_histogram(
        pooled, thread=None, overflows=overflows, min_us=min_us, avg_us=avg_us, max_us=max_us
    )


def _result(form: OutputForm, threads: list[LatencyStats]) -> LatencyResult:
    try:
        return LatencyResult(form=form, threads=threads, all=_pool(threads))
    except ValidationError as exc:
        raise ParseError(f"cyclictest output: {_problems(exc)}") from None


# ---------------------------------------------------------------------------------------------- text forms


def _clean_lines(text: str) -> list[str]:
    """Lines with ANSI cursor codes removed (the redrawing form) and trailing blanks stripped."""
    return [line.rstrip() for line in _ANSI.sub("", text).replace("\r\n", "\n").split("\n")]


def _summary_lines(lines: list[str]) -> list[dict[str, int]]:
    """Every `T:` line, strictly: a line that starts like one but does not parse is an error."""
    out = []
    for n, line in enumerate(lines, 1):
        if not line.lstrip().startswith("T:"):
            continue
        m = _SUMMARY.fullmatch(line.strip())
        if not m:
            raise ParseError(
                f"cyclictest summary line {n}: expected 'T:<n> (<tid>) P:<prio> I:<interval> C:<cycles> "
                f"Min:<us> Act:<us> Avg:<us> Max:<us>', found {_show(line)} (truncated or garbled)"
            )
        for key, width in _SUMMARY_WIDTH.items():
            if m.group(key) is not None and len(m.group(key)) < width:
                raise ParseError(
                    f"cyclictest summary line {n}: field {key!r} is {len(m.group(key))} characters "
                    f"wide, cyclictest prints at least {width}: the line looks cut off: {_show(line)}"
                )
        out.append({k: int(v) for k, v in m.groupdict().items() if v is not None})
    return out


def _final_summary(entries: list[dict[str, int]]) -> list[dict[str, int]]:
    """The last block of summary lines: threads 0..N-1 in order (the redrawing form repeats blocks)."""
    nthreads = max(e["thread"] for e in entries) + 1
    last = entries[-nthreads:]
    if [e["thread"] for e in last] != list(range(nthreads)):
        found = [e["thread"] for e in last]
        raise ParseError(
            f"cyclictest summary: expected the final block to list threads 0..{nthreads - 1} in "
            f"order, found threads {found} (output truncated or interleaved?)"
        )
    return last


def _parse_summary(lines: list[str], expected_threads: int | None) -> LatencyResult:
    final = _final_summary(_summary_lines(lines))
    if expected_threads is not None and len(final) != expected_threads:
        raise ParseError(f"cyclictest summary: expected {expected_threads} threads, found {len(final)}")
    threads = []
    for e in final:
        if e["cycles"] == 0:
            raise ParseError(
                f"cyclictest summary: thread {e['thread']} has C: 0 (0 samples): expected at least "
                "one cycle; was the run too short or did the thread never start?"
            )
        threads.append(
            _stats(
                f"summary: thread {e['thread']}",
                thread=e["thread"],
                samples=e["cycles"],
                min_us=e["min"],
                avg_us=float(e["avg"]),
                max_us=e["max"],
            )
        )
    return _result("summary", threads)


def _trailer_values(line: str, n: int, label: str) -> list[int]:
    m = _TRAILER.fullmatch(line)
    if not m or m.group(1) != label:
        what = "a complete histogram row or '# Total:'" if label == "Total" else f"'# {label}:'"
        raise ParseError(
            f"cyclictest histogram line {n}: expected {what}, found {_show(line)} (truncated or garbled)"
        )
    fields = m.group(2).split()
    if not fields:
        raise ParseError(f"cyclictest histogram: '# {label}:' (line {n}) has no values: {_show(line)}")
    width = _TRAILER_WIDTH[label]
    for f in fields:
        if len(f) < width:
            raise ParseError(
                f"cyclictest histogram: '# {label}:' (line {n}) value {f!r} is narrower than the "
                f"{width} digits cyclictest prints: the line looks cut off: {_show(line)}"
            )
    return [int(f) for f in fields]


def _parse_histogram(lines: list[str], expected_threads: int | None) -> LatencyResult:
    starts = [i for i, line in enumerate(lines) if line == "# Histogram"]
    if len(starts) != 1:
        raise ParseError(f"cyclictest histogram: expected one '# Histogram' line, found {len(starts)}")
    rows, i = _histogram_rows(lines, starts[0] + 1)
    trailer, i = _histogram_trailer(lines, i)
    nthreads, histofall = _histogram_shape(rows, trailer, expected_threads)
    _check_overflow_lists(lines, i, nthreads, trailer)
    threads = _thread_stats(rows, trailer, nthreads)
    result = _result("histogram", threads)
    if histofall:
        _check_all_column(rows, trailer, nthreads, result.all)

    summary = _summary_lines(lines[: starts[0]])
    if summary:  # redrawn summary lines before the histogram (no -q): they must describe the same threads
        final = _final_summary(summary)
        if len(final) != nthreads:
            raise ParseError(
                f"cyclictest output: the summary lines list {len(final)} threads but the histogram "
                f"has {nthreads}: expected the same threads"
            )
    return result


def _histogram_rows(lines: list[str], i: int) -> tuple[list[list[int]], int]:
    """The `000000 <count>...` rows from line `i`: buckets 0, 1, 2, ... without gaps, one column count."""
    rows: list[list[int]] = []
    while i < len(lines) and (m := _ROW.fullmatch(lines[i])):
        bucket, counts = int(m.group(1)), [int(c) for c in m.group(2).split("\t")]
        if bucket != len(rows):
            raise ParseError(
                f"cyclictest histogram line {i + 1}: expected bucket {len(rows):06d}, found "
                f"{_show(lines[i])} (rows must run 0, 1, 2, ... without gaps)"
            )
        if rows and len(counts) != len(rows[0]):
            raise ParseError(
                f"cyclictest histogram line {i + 1}: expected {len(rows[0])} columns like the rows "
                f"above, found {len(counts)}: {_show(lines[i])}"
            )
        rows.append(counts)
        i += 1
    if not rows:
        found = _show(lines[i]) if i < len(lines) else "end of output"
        raise ParseError(
            f"cyclictest histogram: expected rows '000000 <count>...' after '# Histogram', found {found}"
        )
    return rows, i


def _histogram_trailer(lines: list[str], i: int) -> tuple[dict[str, list[int]], int]:
    """The `# Total:` ... `# Histogram Overflows:` lines after the rows, each one required, in order."""
    trailer: dict[str, list[int]] = {}
    for label in _TRAILER_ORDER:
        if i >= len(lines) or not lines[i]:
            after = (
                f"'# {_TRAILER_ORDER[_TRAILER_ORDER.index(label) - 1]}:'" if trailer else "the histogram rows"
            )
            raise ParseError(
                f"cyclictest histogram: expected a '# {label}:' line after {after}, found "
                f"{'end of output' if i >= len(lines) else 'an empty line'} (output truncated?)"
            )
        trailer[label] = _trailer_values(lines[i], i + 1, label)
        i += 1

    return trailer, i


def _histogram_shape(rows: list[list[int]], trailer: dict[str, list[int]],
                     expected_threads: int | None) -> tuple[int, bool]:
    """(threads, whether there is -H's all-threads column): the rows and every trailer line must agree."""
    nthreads = len(trailer["Min Latencies"])
    columns = len(rows[0])
    histofall = nthreads > 1 and columns == nthreads + 1
    if columns != nthreads and not histofall:
        raise ParseError(
            f"cyclictest histogram: '# Min Latencies:' lists {nthreads} threads but the histogram "
            f"rows have {columns} columns: expected {nthreads}"
            + (f" (or {nthreads + 1} with -H)" if nthreads > 1 else "")
        )
    want = {
        "Total": columns,
        "Avg Latencies": nthreads,
        "Max Latencies": columns,
        "Histogram Overflows": columns,
    }
    for label, count in want.items():
        if len(trailer[label]) != count:
            raise ParseError(
                f"cyclictest histogram: '# {label}:' has {len(trailer[label])} values, expected "
                f"{count} ({nthreads} threads{', -H all-threads column' if histofall else ''})"
            )
    if expected_threads is not None and nthreads != expected_threads:
        raise ParseError(f"cyclictest histogram: expected {expected_threads} threads, found {nthreads}")

    return nthreads, histofall


def _check_overflow_lists(lines: list[str], i: int, nthreads: int, trailer: dict[str, list[int]]) -> None:
    """The overflow cycle numbers: up to one list per thread, `# N others` for the rest. Checking that they add
    up to the overflow count catches output cut off inside the list."""
    if i >= len(lines) or lines[i] != _OUTLIERS_HEADER:
        found = _show(lines[i]) if i < len(lines) else "end of output"
        raise ParseError(
            f"cyclictest histogram: expected {_OUTLIERS_HEADER!r} after '# Histogram Overflows:', "
            f"found {found} (output truncated?)"
        )
    i += 1
    for t in range(nthreads):
        m = _OUTLIERS.fullmatch(lines[i]) if i < len(lines) else None
        if not m or int(m.group(1)) != t:
            found = _show(lines[i]) if i < len(lines) else "end of output"
            raise ParseError(
                f"cyclictest histogram: expected '# Thread {t}: <overflow cycle numbers>', "
                f"found {found} (output truncated?)"
            )
        listed = m.group(2).split()
        if any(len(c) < 5 for c in listed):
            raise ParseError(
                f"cyclictest histogram: '# Thread {t}:' overflow cycle list looks cut off: {_show(lines[i])}"
            )
        told = len(listed) + int(m.group(3) or 0)
        if told != trailer["Histogram Overflows"][t]:
            raise ParseError(
                f"cyclictest histogram: '# Thread {t}:' accounts for {told} overflows, "
                f"'# Histogram Overflows:' says {trailer['Histogram Overflows'][t]} (output truncated?)"
            )
        i += 1


def _thread_stats(rows: list[list[int]], trailer: dict[str, list[int]], nthreads: int) -> list[LatencyStats]:
    """Each thread's exact figures from its histogram column and its trailer values."""
    threads = []
    for t in range(nthreads):
        hist = {b: row[t] for b, row in enumerate(rows) if row[t]}
        if sum(hist.values()) != trailer["Total"][t]:
            raise ParseError(
                f"cyclictest histogram: thread {t} column sums to {sum(hist.values())}, '# Total:' "
                f"says {trailer['Total'][t]}: expected them to agree"
            )
        threads.append(
            stats_from_histogram(
                hist,
                thread=t,
                overflows=trailer["Histogram Overflows"][t],
                min_us=trailer["Min Latencies"][t],
                avg_us=float(trailer["Avg Latencies"][t]),
                max_us=trailer["Max Latencies"][t],
            )
        )
    return threads


def _check_all_column(
    rows: list[list[int]], trailer: dict[str, list[int]], n: int, pooled: LatencyStats
) -> None:
    """-H prints an all-threads column; it must be what we pooled ourselves."""
    for b, row in enumerate(rows):
        if row[n] != sum(row[:n]):
            raise ParseError(
                f"cyclictest histogram: bucket {b:06d} all-threads column {row[n]} is not the sum "
                f"of the thread columns {row[:n]}"
            )
    checks = {
        "Total": sum((pooled.histogram or {}).values()),
        "Max Latencies": pooled.max_us,
        "Histogram Overflows": pooled.overflows,
    }
    for label, mine in checks.items():
        if trailer[label][n] != mine:
            raise ParseError(
                f"cyclictest histogram: '# {label}:' all-threads value {trailer[label][n]}, "
                f"expected {mine} from the thread columns"
            )


# ---------------------------------------------------------------------------------------------- JSON form


def _cmdline_has_histogram(cmdline: str | None) -> bool | None:
    """Whether cyclictest's argv asked for a histogram (-h/-H/--histogram/--histofall); None if unknown."""
    if not cmdline:
        return None
    for token in cmdline.split()[1:]:
        if token.startswith("--"):
            if token.split("=", 1)[0] in ("--histogram", "--histofall"):
                return True
        elif token.startswith("-"):
            for letter in token[1:]:
                if letter in "hH":
                    return True
                if letter in _ARG_LETTERS:
                    break  # the rest of the token is this option's argument
    return False


def _int_field(entry: dict, key: str, t: str, *, least: int = 0) -> int:
    """A count or latency: an integer in the JSON (not 5.0, not true, not "5"), at least `least`."""
    value = entry.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParseError(f"cyclictest JSON: thread {t} {key!r} is {_brief(value)}: expected an integer")
    if value < least:
        raise ParseError(f"cyclictest JSON: thread {t} {key!r} is {value}: expected an integer >= {least}")
    return value


_JSON_BUCKET = re.compile(r"0|[1-9][0-9]{0,6}", re.ASCII)  # a key written by %d: no sign, no leading zeros


def _json_histogram(raw: dict, t: str) -> dict[int, int]:
    """A thread's {"bucket": count} object, strictly: bucket keys below HIST_MAX, integer counts >= 0."""
    hist: dict[int, int] = {}
    for b, c in raw.items():
        if not _JSON_BUCKET.fullmatch(b) or int(b) >= HIST_MAX:
            raise ParseError(f"cyclictest JSON: thread {t} 'histogram' bucket {_show(b, 20)}: expected a "
                             f"whole number of us below {HIST_MAX} (cyclictest's largest histogram)")
        if isinstance(c, bool) or not isinstance(c, int) or c < 0:
            raise ParseError(f"cyclictest JSON: thread {t} 'histogram' bucket {b} count "
                             f"{_brief(c, 40)}: expected an integer >= 0")
        hist[int(b)] = c
    return hist


def _parse_json(json_text: str) -> tuple[LatencyResult, bool]:
    """The --json document -> (result, whether it carries histograms)."""
    if not json_text.strip():
        raise ParseError("cyclictest JSON: empty document: expected the file written by --json=FILE")
    doc = jsonio.loads(json_text, source="cyclictest JSON", error=ParseError,
                       expected="expected the complete document written by --json=FILE")
    if not isinstance(doc, dict):
        raise ParseError(f"cyclictest JSON: expected an object, found {type(doc).__name__}")
    per_thread = doc.get("thread")
    if not isinstance(per_thread, dict) or not per_thread:
        raise ParseError(
            f"cyclictest JSON: expected a non-empty 'thread' object, found {_brief(per_thread)} "
            f"(keys present: {_brief(sorted(doc), 200)})"
        )
    if len(per_thread) > MAX_CPU + 1:
        raise ParseError(f"cyclictest JSON: {len(per_thread)} threads: expected at most {MAX_CPU + 1} "
                         "(one per CPU)")
    keys = [str(i) for i in range(len(per_thread))]
    if set(per_thread) != set(keys):
        found = sorted(per_thread, key=lambda k: (len(k), k))
        raise ParseError(f"cyclictest JSON: expected 'thread' keys '0'..'{len(keys) - 1}', found "
                         f"{_brief(found, 200)}")
    declared = doc.get("num_threads")
    if declared is not None and (isinstance(declared, bool) or declared != len(keys)):
        raise ParseError(f"cyclictest JSON: 'num_threads' is {_brief(declared, 40)} but 'thread' has "
                         f"{len(keys)} entries")
    cmdline = doc.get("cmdline:", doc.get("cmdline"))  # rt-tests 2.x really writes the key as "cmdline:"
    if cmdline is not None and not isinstance(cmdline, str):
        raise ParseError(f"cyclictest JSON: 'cmdline:' is {_brief(cmdline, 40)}: expected a string")
    hists: dict[str, dict[int, int] | None] = {}
    for t in keys:
        entry = per_thread[t]
        if not isinstance(entry, dict):
            raise ParseError(f"cyclictest JSON: thread {t} is {_brief(entry)}: expected an object")
        raw = entry.get("histogram")
        if raw is None:
            hists[t] = None
            continue
        if not isinstance(raw, dict):
            raise ParseError(f"cyclictest JSON: thread {t} 'histogram' is {_brief(raw)}: "
                             "expected an object")
        hists[t] = _json_histogram(raw, t)
    # rt-tests writes "histogram": {} when run without -h: empty everywhere means "no histogram" unless the
    # recorded command line asked for one (then every sample overflowed).
    has_hist = any(hists.values()) or bool(
        _cmdline_has_histogram(cmdline) and all(h is not None for h in hists.values())
    )
    threads = []
    for t in keys:
        entry = per_thread[t]
        cycles = _int_field(entry, "cycles", t)
        if cycles <= 0:
            raise ParseError(f"cyclictest JSON: thread {t} has cycles {cycles}: expected at least one sample")
        min_us, max_us = _int_field(entry, "min", t), _int_field(entry, "max", t)
        if max_us < min_us:
            raise ParseError(f"cyclictest JSON: thread {t} 'max' {max_us} is below 'min' {min_us}: expected "
                             "min <= avg <= max")
        avg = entry.get("avg")
        if isinstance(avg, bool) or not isinstance(avg, (int, float)) or avg < 0:
            raise ParseError(f"cyclictest JSON: thread {t} 'avg' is {_brief(avg, 40)}: expected a "
                             "number >= 0")
        hist = hists[t]
        if has_hist:
            if hist is None:
                raise ParseError(
                    f"cyclictest JSON: thread {t} has no 'histogram' while other threads have one"
                )
            overflows = cycles - sum(hist.values())
            if overflows < 0:
                raise ParseError(
                    f"cyclictest JSON: thread {t} histogram holds {sum(hist.values())} samples, "
                    f"more than its {cycles} cycles"
                )
            threads.append(
                stats_from_histogram(
                    hist, thread=int(t), overflows=overflows, min_us=min_us, avg_us=float(avg), max_us=max_us
                )
            )
        else:
            threads.append(_stats(f"JSON: thread {t}", thread=int(t), samples=cycles, min_us=min_us,
                                  avg_us=float(avg), max_us=max_us))
    return _result("json", threads), has_hist


def _cross_check(json_result: LatencyResult, text_result: LatencyResult) -> None:
    """The stdout of the same run must describe the same threads (and, with -h, the same histograms)."""
    if len(text_result.threads) != len(json_result.threads):
        raise ParseError(
            f"cyclictest stdout lists {len(text_result.threads)} threads but the JSON has "
            f"{len(json_result.threads)}: expected the output of one run"
        )
    if text_result.form != "histogram":
        return  # summary lines without -q are redrawn every 10 ms and may lag the final figures
    for mine, theirs in zip(text_result.threads, json_result.threads, strict=True):
        for key in ("samples", "min_us", "max_us", "overflows", "histogram"):
            a, b = getattr(mine, key), getattr(theirs, key)
            if theirs.histogram is None and key in ("overflows", "histogram"):
                continue
            if a != b:
                raise ParseError(
                    f"cyclictest stdout and JSON disagree on thread {mine.thread} {key}: "
                    f"{a if key != 'histogram' else 'histogram'} vs "
                    f"{b if key != 'histogram' else 'histogram'}: expected the output of one run"
                )


# ---------------------------------------------------------------------------------------------- entry points


def _parse_text(text: str, expected_threads: int | None, quote: bool = True) -> LatencyResult:
    """`quote`: output in no cyclictest form may be quoted (a unit's error message, worth reading); a file
    the user named is not (it may be any file of the controller's: /etc/shadow)."""
    lines = _clean_lines(text)
    if any(line == "# Histogram" for line in lines):
        return _parse_histogram(lines, expected_threads)
    stray = [line for line in lines if _TRAILER.fullmatch(line) or line == _OUTLIERS_HEADER]
    if stray:
        raise ParseError(
            f"cyclictest output: found histogram lines ({_show(stray[0])}) but no '# Histogram' "
            "header: expected a complete -h/-H histogram (output truncated at the start?)"
        )
    if any(line.lstrip().startswith("T:") for line in lines):
        return _parse_summary(lines, expected_threads)
    meaningful = [line for line in lines if line.strip()]
    if not meaningful:
        found = "empty output"
    elif quote:
        more = len(meaningful) - 1
        found = _show(meaningful[0]) + (f" and {more} more lines" if more else "")
    else:
        found = f"{len(meaningful)} line{'s' if len(meaningful) > 1 else ''} of other text (not quoted)"
    raise ParseError(
        "cyclictest output: expected summary lines 'T: 0 (...) ... Max: ...', a '# Histogram' block "
        f"(-h/-H) or the --json document, found {found}"
    )


def _looks_like_json(text: str) -> bool:
    return text.lstrip().startswith("{")


def parse_cyclictest(
    text: str, json_text: str | None = None, *, expected_threads: int | None = None, quote: bool = True
) -> LatencyResult:
    """Parse cyclictest output: stdout in any form, or the --json document itself (detected by content).

    With `json_text` (the --json file of the same run) the JSON gives the figures (form "json") and `text`,
    if it holds any cyclictest output, must agree with it. `expected_threads`, when given, is checked: the
    only way to notice a `-q` summary cut off exactly between two lines."""
    for what, given in (("output", text), ("JSON", json_text)):
        if given is not None and len(given) > MAX_OUTPUT_BYTES:
            raise ParseError(f"cyclictest {what}: {len(given):,} characters, more than the "
                             f"{MAX_OUTPUT_BYTES // 2**20} MiB rt-tune reads (a run's output is far smaller)")
    if json_text is not None:
        if _looks_like_json(text):
            raise ParseError(
                "cyclictest: two JSON documents given (text and json_text): expected stdout and "
                "the --json file"
            )
        result, _ = _parse_json(json_text)
        if expected_threads is not None and len(result.threads) != expected_threads:
            raise ParseError(
                f"cyclictest JSON: expected {expected_threads} threads, found {len(result.threads)}"
            )
        lines = _clean_lines(text)
        if any(line == "# Histogram" or line.lstrip().startswith("T:") for line in lines):
            _cross_check(result, _parse_text(text, expected_threads, quote))
        return result
    if _looks_like_json(text):
        result, _ = _parse_json(text)
        if expected_threads is not None and len(result.threads) != expected_threads:
            raise ParseError(
                f"cyclictest JSON: expected {expected_threads} threads, found {len(result.threads)}"
            )
        return result
    return _parse_text(text, expected_threads, quote)


def parse_cyclictest_file(
    path: Path, json_path: Path | None = None, *, expected_threads: int | None = None
) -> LatencyResult:
    """`parse_cyclictest` on a file (UTF-8, undecodable bytes replaced), optionally with the --json file; a
    file larger than MAX_OUTPUT_BYTES is an InputError, refused before it is read into memory."""
    text = jsonio.read_limited(path, MAX_OUTPUT_BYTES, "cyclictest output").decode("utf-8-sig", errors="replace")
    json_text = None
    if json_path is not None:  # utf-8-sig: a byte-order mark (a file saved by a Windows editor) is skipped
        json_text = jsonio.read_limited(json_path, MAX_OUTPUT_BYTES, "cyclictest JSON").decode(
            "utf-8-sig", errors="replace")
    try:
        return parse_cyclictest(text, json_text, expected_threads=expected_threads, quote=False)
    except ParseError as exc:
        raise ParseError(f"{path}: {exc}") from None
