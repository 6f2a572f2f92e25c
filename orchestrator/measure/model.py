"""The result of one latency measurement: per thread and all threads together, exact from the histogram."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

PERCENTILES: dict[str, float] = {"p50_us": 0.50, "p90_us": 0.90, "p99_us": 0.99, "p999_us": 0.999,
                                 "p9999_us": 0.9999}
OutputForm = Literal["summary", "histogram", "json"]


class LatencyStats(BaseModel):
    """Figures for one thread (or all threads pooled). Percentiles are exact when the histogram covers every
    sample: the smallest bucket value (us) at which the cumulative count reaches the fraction of samples.
    Samples beyond the histogram are `overflows`; a percentile that falls among them is None (not a guess)."""

    model_config = ConfigDict(extra="forbid")

    thread: int | None = None  # None for the all-threads entry
    samples: int
    min_us: int | None
    avg_us: float | None
    p50_us: int | None = None
    p90_us: int | None = None
    p99_us: int | None = None
    p999_us: int | None = None
    p9999_us: int | None = None
    max_us: int | None
    overflows: int = 0
    # bucket (us) -> count, only non-empty buckets; absent for the summary form (no histogram there)
    histogram: dict[int, int] | None = None


class CyclictestSettings(BaseModel):
    """What cyclictest was asked to do (the measurement is only comparable under the same settings)."""

    model_config = ConfigDict(extra="forbid")

    cpus: list[int] = Field(default_factory=lambda: [1])  # threads pinned here, one thread per CPU
    priority: int = 95
    interval_us: int = 1000
    duration_s: float = 60.0
    mlockall: bool = True
    histogram_us: int = 20000  # buckets 0..histogram_us-1; sized so the tail stays exact on slow targets
    policy: str = "fifo"


class LoadSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["none", "stress-ng", "hackbench"] = "none"
    args: list[str] = Field(default_factory=list)  # extra arguments for the load tool (validated, no shell)


class LatencyResult(BaseModel):
    """One measurement: what was run, where, under which load, and the figures."""

    model_config = ConfigDict(extra="forbid")

    target: str | None = None  # e.g. "lab1.guest"
    form: OutputForm
    threads: list[LatencyStats]
    all: LatencyStats
    settings: CyclictestSettings | None = None
    load: LoadSpec | None = None
    started_at: float | None = None
    duration_s: float | None = None
    boot_id: str | None = None
    cmdline: str | None = None
    raw_artifact: str | None = None  # path of the raw cyclictest output kept beside the result

    def public(self) -> dict:
        """The stable CLI contract of `tune cyclictest-parse --json`: {"threads": [...], "all": {...}}."""
        keys = ("samples", "min_us", "avg_us", "p50_us", "p90_us", "p99_us", "p999_us", "p9999_us", "max_us",
                "overflows")

        def entry(s: LatencyStats) -> dict:
            d = {k: getattr(s, k) for k in keys}
            if s.thread is not None:
                d = {"thread": s.thread, **d}
            return d

        return {"threads": [entry(t) for t in self.threads], "all": entry(self.all)}
