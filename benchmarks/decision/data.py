"""Recorded runs as run-level series: one row per cyclictest run (log p99, log p99.9, log max), grouped by boot
and in the order they were measured.

A folder holds either LatencyResult JSON files as `orchestrator.measure.runner.measure()` writes them (`all.*`,
`started_at`, `boot_id`, `settings`) or cyclictest's own `--json` files (parsed by the project's parser; the start
time is cyclictest's `start_time`). Boots come from `boot_id`, else from the subfolder a run is in, else the
folder is one boot. `long*.json` and the raw `*-cyclictest.txt` are not runs of the series.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path

import numpy as np

from orchestrator.measure.model import LatencyResult
from orchestrator.measure.parse import parse_cyclictest_file

METRICS = ("p99_us", "p999_us", "max_us")  # the guards' and the primary's run-level values
LABEL = {"p99_us": "p99", "p999_us": "p99.9", "max_us": "max"}


@dataclass
class Run:
    path: Path
    boot: str
    start: float  # seconds since the epoch (NaN when unknown)
    length_s: float  # cyclictest -D (the measuring time of the run)
    wall_s: float  # the run's wall time as measure() took it (load settling and round trip included), or NaN
    values: dict[str, float]  # metric -> us (a percentile among the overflows: the histogram size, flagged)
    censored: dict[str, bool]
    p50_us: float
    histogram_us: float = math.inf


@dataclass
class Series:
    """Runs grouped by boot, each boot in measuring order."""

    folder: Path
    boots: dict[str, list[Run]] = field(default_factory=dict)

    @property
    def runs(self) -> list[Run]:
        return [r for b in self.boots.values() for r in b]

    @property
    def n_runs(self) -> int:
        return sum(len(b) for b in self.boots.values())

    @property
    def run_s(self) -> float:
        return float(np.median([r.length_s for r in self.runs]))

    @property
    def spacing_s(self) -> float:
        """The typical time between the starts of consecutive runs of a boot (the drift's time unit)."""
        steps = [np.diff([r.start for r in b]) for b in self.boots.values() if len(b) > 1]
        flat = np.concatenate(steps) if steps else np.empty(0)
        flat = flat[np.isfinite(flat) & (flat > 0)]
        return float(np.median(flat)) if len(flat) else self.run_s

    @property
    def wall_s(self) -> float:
        """A run's wall time when the rule measures runs back to back (measure()'s duration), else the recorded
        spacing (consecutive runs)."""
        w = np.array([r.wall_s for r in self.runs], float)
        w = w[np.isfinite(w)]
        return float(np.median(w)) if len(w) else self.spacing_s

    @property
    def histogram_us(self) -> float:
        return min((r.histogram_us for r in self.runs), default=math.inf)

    def logs(self, metric: str) -> list[np.ndarray]:
        """Per boot, log(value) in measuring order."""
        return [np.log([max(r.values[metric], 1.0) for r in b]) for b in self.boots.values()]

    def censored(self, metric: str) -> list[np.ndarray]:
        """Per boot, True where the run's percentile is beyond the histogram (its value is the size)."""
        return [np.array([r.censored[metric] for r in b], bool) for b in self.boots.values()]

    def upper(self, metric: str) -> list[np.ndarray]:
        """Per boot, log of what a censored percentile can be at most: the run's max (known beyond the
        histogram)."""
        return [np.log([max(r.values["max_us"], 1.0) for r in b]) for b in self.boots.values()]

    def spacing(self) -> list[np.ndarray]:
        """Per boot, the distance of each run from the boot's first in units of the typical spacing between
        consecutive runs (1, 2, 3, ... when the start times are unknown or regular)."""
        steps = [np.diff([r.start for r in b]) for b in self.boots.values() if len(b) > 1]
        flat = np.concatenate(steps) if steps else np.empty(0)
        flat = flat[np.isfinite(flat) & (flat > 0)]
        unit = float(np.median(flat)) if len(flat) else math.nan
        out = []
        for b in self.boots.values():
            t = np.array([r.start for r in b], float)
            if math.isnan(unit) or not np.all(np.isfinite(t)):
                out.append(np.arange(len(b), dtype=float))
            else:
                out.append(np.round((t - t[0]) / unit, 2))
        return out

    def span_h(self) -> float:
        t = np.array([r.start for r in self.runs], float)
        t = t[np.isfinite(t)]
        return float((t.max() - t.min()) / 3600) if len(t) else math.nan


def _hist_size(res: LatencyResult, cmdline: str = "") -> float:
    """The histogram size: from the settings, else cyclictest's -h in its command line, else unknown (inf:
    nothing is censored; a percentile among the overflows then falls back to the run's max)."""
    if res.settings is not None:
        return float(res.settings.histogram_us)
    m = re.search(r"(?:\s-h\s*|--histogram[= ]?)(\d+)", cmdline)
    return float(m.group(1)) if m else math.inf


def _cyclictest_start(doc: dict) -> float:
    try:
        return parsedate_to_datetime(doc["start_time"]).timestamp()
    except (KeyError, TypeError, ValueError):
        return math.nan


def load_run(path: Path, root: Path) -> Run:
    doc = json.loads(path.read_text())
    cmd = ""
    if "all" in doc and "threads" in doc:  # a LatencyResult written by measure()
        res = LatencyResult.model_validate_json(path.read_text())
        start = res.started_at if res.started_at is not None else math.nan
        length = res.settings.duration_s if res.settings is not None else (res.duration_s or math.nan)
        wall = res.duration_s if res.duration_s is not None else math.nan
    else:  # cyclictest --json
        res = parse_cyclictest_file(path)
        start = _cyclictest_start(doc)
        wall = math.nan
        length = res.all.samples * 1e-3  # 1 kHz unless told otherwise
        cmd = doc.get("cmdline:") or doc.get("cmdline") or ""
        for tok in cmd.split():
            if tok.startswith("-D") and tok[2:].rstrip("s").isdigit():
                length = float(tok[2:].rstrip("s"))
    rel = path.parent.relative_to(root)
    boot = res.boot_id or (rel.parts[0] if rel.parts else "boot")
    size = _hist_size(res, cmd)
    top = float(res.all.max_us or 1)
    vals, cens = {}, {}
    for m in METRICS:
        v = getattr(res.all, m)
        cens[m] = v is None
        vals[m] = float(min(size, top) if v is None else v)
    p50 = float(res.all.p50_us if res.all.p50_us is not None else min(size, top))
    return Run(path, boot, float(start), float(length), float(wall), vals, cens, p50, float(size))


def run_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("run*.json") if not p.name.startswith("long"))


def load_series(folder: Path) -> Series:
    runs = [load_run(p, folder) for p in run_files(folder)]
    s = Series(folder)
    for r in runs:
        s.boots.setdefault(r.boot, []).append(r)
    for b in s.boots.values():
        b.sort(key=lambda r: (r.start if not math.isnan(r.start) else 0.0, r.path.name))
    # boots in the order they started
    s.boots = dict(sorted(s.boots.items(), key=lambda kv: (kv[1][0].start if not math.isnan(kv[1][0].start)
                                                         else 0.0, kv[1][0].path.as_posix())))
    return s


def describe_boots(s: Series) -> str:
    return ", ".join(f"{name[:8]} {len(b)}" for name, b in s.boots.items())


# ------------------------------------------------------------------------------------- series figures


def lag1(x: np.ndarray) -> float:
    """Pearson correlation of consecutive values."""
    if len(x) < 3 or np.std(x[1:]) == 0 or np.std(x[:-1]) == 0:
        return math.nan
    return float(np.corrcoef(x[1:], x[:-1])[0, 1])


def pooled_lag1(series: list[np.ndarray]) -> float:
    """Lag-1 correlation within boots (each boot's mean removed), pooled over boots."""
    num = den0 = 0.0
    for x in series:
        if len(x) < 3:
            continue
        c = x - x.mean()
        num += float((c[1:] * c[:-1]).sum())
        den0 += float((c * c).sum())
    return num / den0 if den0 > 0 else math.nan


def halves_ratio(x: np.ndarray) -> float:
    """Ratio of the geometric means of the second and the first half of a series given as logs."""
    h = len(x) // 2
    return float(math.exp(x[h:].mean() - x[:h].mean()))


def series_figures(x: np.ndarray) -> dict[str, float]:
    """The figures issue #18 quotes for a series of log values: lag-1 autocorrelation, the halves' ratio (>= 1,
    whichever half is higher), the run-to-run log-SD."""
    hr = halves_ratio(x)
    return {"lag1": lag1(x), "halves": max(hr, 1 / hr), "sd": float(np.std(x, ddof=1)), "n": float(len(x))}
