"""Runs pooled: each run's value of a metric (a percentile among the overflows taken as the histogram size, a
lower bound, and flagged), their median, and all-threads histograms pooled over runs. What reports plot and what
the A/B analysis shows beside its run-level statistics."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

from orchestrator.measure.model import PERCENTILES, LatencyResult


def histogram_limit(result: LatencyResult) -> int | None:
    """A lower bound (us) for every overflow sample: the histogram size, else the largest bucket + 1."""
    if result.settings is not None:
        return result.settings.histogram_us
    if result.all.histogram:
        return max(result.all.histogram) + 1
    return None


def run_value(result: LatencyResult, metric: str) -> tuple[float | None, bool]:
    """(value, censored): a percentile among the overflows is taken as the histogram limit (a lower bound)."""
    v = getattr(result.all, metric)
    if v is not None:
        return float(v), False
    if metric in PERCENTILES and result.all.overflows > 0:
        limit = histogram_limit(result)
        if limit is not None:
            return float(limit), True
    return None, False


def run_median(results: Sequence[LatencyResult], metric: str) -> tuple[float | None, bool]:
    """Median over runs of one metric and whether it is only a lower bound (a censored run at or below the
    median position). Runs without the metric (summary form, no histogram) are left out."""
    pairs = sorted((v, c) for v, c in (run_value(r, metric) for r in results) if v is not None)
    if not pairs:
        return None, False
    k = len(pairs)
    mid = pairs[(k - 1) // 2: k // 2 + 1]
    return statistics.median(v for v, _ in pairs), any(c for _, c in mid)


class PooledRuns:
    """All-threads histograms pooled over runs: what the plots and the 'pooled' table rows show."""

    def __init__(self, results: Sequence[LatencyResult]):
        self.runs = len(results)
        with_hist = [r for r in results if r.all.histogram is not None]
        self.without_hist = self.runs - len(with_hist)
        self.hist: dict[int, int] = {}
        for r in with_hist:
            for bucket, count in (r.all.histogram or {}).items():
                self.hist[int(bucket)] = self.hist.get(int(bucket), 0) + count
        self.overflows = sum(r.all.overflows for r in with_hist)
        self.samples = sum(self.hist.values()) + self.overflows
        limits = [lim for r in with_hist if (lim := histogram_limit(r)) is not None]
        self.limit = min(limits) if limits else None  # every overflow sample is at least this
        maxes = [r.all.max_us for r in with_hist]
        self.max_us = max(maxes) if maxes and all(m is not None for m in maxes) else None  # type: ignore

    @property
    def plottable(self) -> bool:
        return bool(self.hist)

    def percentile(self, fraction: float) -> int | None:
        """Exact, as in the model: the smallest bucket where the cumulative count reaches fraction x samples."""
        if not self.samples:
            return None
        q = Fraction(str(fraction))  # 0.999 exactly, as the parser does
        cumulative = 0
        for bucket in sorted(self.hist):
            cumulative += self.hist[bucket]
            if cumulative * q.denominator >= q.numerator * self.samples:
                return bucket
        return None

    def stats(self) -> dict[str, Any]:
        buckets = sorted(self.hist)
        avg = (sum(b * c for b, c in self.hist.items()) / self.samples) if self.samples and not self.overflows \
            else None
        out: dict[str, Any] = {"samples": self.samples, "min_us": buckets[0] if buckets else None, "avg_us": avg,
                               "max_us": self.max_us, "overflows": self.overflows}
        out.update({k: self.percentile(f) for k, f in PERCENTILES.items()})
        return out
