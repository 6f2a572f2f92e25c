"""The result of one latency measurement: per thread and all threads together, exact from the histogram.

Also what a measurement is asked to do (`CyclictestSettings`, `LoadSpec`), validated to the ranges cyclictest
and the kernel accept, so a bad playbook or flag is refused before anything runs on a unit, never found out
by the tool after a change has been applied. Numbers are strict: `true` is not 1, `"5"` is not 5, `5.0` is
not an integer count, and no float is NaN or infinite (a file loaded from JSON or YAML gets no coercion).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import (
    AllowInfNan,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationInfo,
    field_validator,
    model_validator,
)

from orchestrator.measure.counters import CounterDeltas

PERCENTILES: dict[str, float] = {"p50_us": 0.50, "p90_us": 0.90, "p99_us": 0.99, "p999_us": 0.999,
                                 "p9999_us": 0.9999}
OutputForm = Literal["summary", "histogram", "json"]
#: How tables, plots and decisions name each figure of a result.
METRIC_LABEL: dict[str, str] = {"samples": "samples", "min_us": "min", "avg_us": "avg", "p50_us": "p50",
                                "p90_us": "p90", "p99_us": "p99", "p999_us": "p99.9", "p9999_us": "p99.99",
                                "max_us": "max", "overflows": "overflows"}

MAX_CPU = 8191  # the kernel's CONFIG_NR_CPUS ceiling (8192 CPUs): a CPU number above it cannot exist
HIST_MAX = 1_000_000  # cyclictest's HIST_MAX: a larger -h is silently cut to this many buckets
# cyclictest keeps one unsigned long per bucket and thread, and prints one row per bucket with a column per
# thread: buckets x threads bounds both its memory (8 bytes each) and the output rt-tune reads (~7 bytes each)
MAX_HIST_CELLS = 4_000_000
MAX_INTERVAL_US = 1_000_000  # 1 s: a control loop slower than that is not a real-time measurement
MAX_DURATION_S = 86_400  # one day per run
MIN_CYCLES = 10  # a run shorter than 10 intervals measures nothing (no percentile can come out of it)
MAX_COUNT = 2**63 - 1  # counts and microseconds fit in 64 bits
LOAD_ARG = re.compile(r"[A-Za-z0-9_.,:=+/%-]{1,256}")  # passed as argv (no shell), fullmatch: no newline
MAX_LOAD_ARGS = 64
Policy = Literal["fifo", "rr", "other", "batch", "idle"]  # what cyclictest's --policy recognises
RT_POLICIES = ("fifo", "rr")


def _not_bool(value: Any) -> Any:
    """`true` is not a number. ruamel's ScalarBoolean (an anchored `&a true`) is an int subclass, so strict
    int alone would take it as 1: refused by name as well."""
    if isinstance(value, bool) or type(value).__name__ == "ScalarBoolean":
        raise ValueError("expected a number, not a boolean")
    return value


#: An integer that is an integer in the file: no bool, no "5", no 5.0.
Int = Annotated[int, Strict(), BeforeValidator(_not_bool)]
#: A finite number (an integer is a number too): no bool, no "5", no NaN or infinity.
Number = Annotated[float, Strict(), AllowInfNan(False), BeforeValidator(_not_bool)]
Count = Annotated[Int, Field(ge=0, le=MAX_COUNT)]
Micros = Annotated[Int, Field(ge=0, le=MAX_COUNT)]


def _bucket(value: Any) -> Any:
    """Histogram buckets are keys: ints in Python, decimal strings in JSON. Only ASCII digits are a bucket."""
    _not_bool(value)
    if isinstance(value, str):
        if not re.fullmatch(r"[0-9]{1,7}", value):
            raise ValueError(f"histogram bucket {value[:20]!r}: expected a whole number of microseconds")
        return int(value)
    return value


Bucket = Annotated[int, Field(ge=0, lt=HIST_MAX), Strict(), BeforeValidator(_bucket)]


class LatencyStats(BaseModel):
    """Figures for one thread (or all threads pooled). Percentiles are exact when the histogram covers every
    sample: the smallest bucket value (us) at which the cumulative count reaches the fraction of samples.
    Samples beyond the histogram are `overflows`; a percentile that falls among them is None (not a guess).

    The figures must describe one distribution (checked, so a garbled or hand-edited result is refused with
    the field named instead of misleading a decision): min <= avg <= max, the percentiles in order between
    min and max, overflows <= samples, and the histogram holding exactly the samples that did not overflow."""

    model_config = ConfigDict(extra="forbid")

    thread: Annotated[Int, Field(ge=0, le=MAX_CPU)] | None = None  # None for the all-threads entry
    samples: Annotated[Int, Field(ge=1, le=MAX_COUNT)]
    min_us: Micros | None
    avg_us: Annotated[Number, Field(ge=0)] | None
    p50_us: Micros | None = None
    p90_us: Micros | None = None
    p99_us: Micros | None = None
    p999_us: Micros | None = None
    p9999_us: Micros | None = None
    max_us: Micros | None
    overflows: Count = 0
    # bucket (us) -> count, only non-empty buckets; absent for the summary form (no histogram there)
    histogram: dict[Bucket, Count] | None = None

    @model_validator(mode="after")
    def _one_distribution(self) -> LatencyStats:
        if self.overflows > self.samples:
            raise ValueError(f"overflows ({self.overflows}) is more than samples ({self.samples})")
        lo, hi = self.min_us, self.max_us
        if lo is not None and hi is not None and hi < lo:
            raise ValueError(f"max_us ({hi}) is below min_us ({lo})")
        # cyclictest's text forms print avg truncated to whole us, its JSON rounded to 0.01: both stay inside
        if self.avg_us is not None and ((lo is not None and self.avg_us < lo - 0.005)
                                        or (hi is not None and self.avg_us > hi + 0.005)):
            raise ValueError(f"avg_us ({self.avg_us:g}) is outside min_us..max_us ({lo}..{hi})")
        last_name, last = "min_us", lo
        for name in (*PERCENTILES, "max_us"):
            value = getattr(self, name)
            if value is None:
                continue
            if last is not None and value < last:
                raise ValueError(f"{name} ({value}) is below {last_name} ({last}): expected min <= p50 <= "
                                 "p90 <= p99 <= p99.9 <= p99.99 <= max")
            last_name, last = name, value
        if self.histogram is not None:
            held = sum(self.histogram.values())
            if held + self.overflows != self.samples:
                raise ValueError(f"the histogram holds {held} samples and {self.overflows} overflowed, but "
                                 f"samples is {self.samples}: expected histogram + overflows = samples")
            filled = [b for b, c in self.histogram.items() if c]
            if filled and lo is not None and lo != min(filled):
                raise ValueError(f"min_us ({lo}) is not the smallest non-empty bucket ({min(filled)})")
            if filled and hi is not None and hi < max(filled):
                raise ValueError(f"max_us ({hi}) is below the largest non-empty bucket ({max(filled)})")
        return self


class CyclictestSettings(BaseModel):
    """What cyclictest is (was) asked to do; the measurement is only comparable under the same settings.

    Ranges are those cyclictest and the kernel accept (rt-tests 2.4 `process_options()`): CPUs 0..8191, one
    thread each, no CPU twice; SCHED_FIFO/RR priorities 1..99, 0 for the other policies (cyclictest would
    silently switch a non-RT policy with a priority to FIFO); at most HIST_MAX buckets (a larger -h is cut
    silently) and at most MAX_HIST_CELLS buckets over all threads; whole seconds (cyclictest's -D)."""

    model_config = ConfigDict(extra="forbid")

    cpus: list[Annotated[Int, Field(ge=0, le=MAX_CPU)]] = Field(  # threads pinned here, one thread per CPU
        default_factory=lambda: [1], min_length=1, max_length=MAX_CPU + 1)
    policy: Policy = "fifo"
    priority: Annotated[Int, Field(ge=0, le=99)] = 95
    interval_us: Annotated[Int, Field(ge=1, le=MAX_INTERVAL_US)] = 1000
    duration_s: Annotated[Number, Field(ge=1, le=MAX_DURATION_S)] = 60.0
    mlockall: Annotated[bool, Strict()] = True
    # buckets 0..histogram_us-1; sized so the tail stays exact on slow targets
    histogram_us: Annotated[Int, Field(ge=1, le=HIST_MAX)] = 20000

    @field_validator("cpus")
    @classmethod
    def _distinct(cls, cpus: list[int]) -> list[int]:
        twice = sorted({c for c in cpus if cpus.count(c) > 1}) if len(set(cpus)) != len(cpus) else []
        if twice:
            raise ValueError(f"CPU {', '.join(map(str, twice))} listed more than once: one thread per CPU")
        return cpus

    @field_validator("priority")
    @classmethod
    def _priority_fits_policy(cls, priority: int, info: ValidationInfo) -> int:
        policy = info.data.get("policy")
        if policy in RT_POLICIES and priority < 1:
            raise ValueError(f"policy {policy} needs a priority of 1..99")
        if policy is not None and policy not in RT_POLICIES and priority != 0:
            raise ValueError(f"policy {policy} takes priority 0 (1..99 are for fifo and rr; cyclictest would "
                             "switch to fifo)")
        return priority

    @field_validator("duration_s")
    @classmethod
    def _whole_seconds_of_cycles(cls, duration: float, info: ValidationInfo) -> float:
        if duration != int(duration):
            raise ValueError("expected whole seconds (cyclictest's -D counts seconds)")
        interval = info.data.get("interval_us")
        if interval is not None and duration * 1_000_000 < MIN_CYCLES * interval:
            raise ValueError(f"{duration:g} s holds fewer than {MIN_CYCLES} intervals of {interval} us: "
                             "nothing to measure")
        return duration

    @field_validator("histogram_us")
    @classmethod
    def _bounded_cells(cls, buckets: int, info: ValidationInfo) -> int:
        threads = len(info.data.get("cpus") or [1])
        if buckets * threads > MAX_HIST_CELLS:
            raise ValueError(f"{buckets} buckets x {threads} threads is more than {MAX_HIST_CELLS:,} "
                             f"histogram cells (cyclictest's memory and output grow with both): at most "
                             f"{MAX_HIST_CELLS // threads} buckets with {threads} threads")
        return buckets


class LoadSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["none", "stress-ng", "hackbench"] = "none"
    # extra arguments for the load tool, passed as argv (no shell): letters, digits and _.,:=+/%- only
    args: list[Annotated[str, Strict()]] = Field(default_factory=list, max_length=MAX_LOAD_ARGS)
    # seconds the load runs before cyclictest starts, so that the first samples already see it at full strength
    settle_s: Annotated[Number, Field(ge=0, le=60)] = 2.0

    @field_validator("args")
    @classmethod
    def _safe_args(cls, args: list[str]) -> list[str]:
        for a in args:
            if not LOAD_ARG.fullmatch(a):
                raise ValueError(f"load argument {a[:80]!r}: expected 1..256 of letters, digits and "
                                 "_.,:=+/%- (it is passed to the tool without a shell)")
        return args

    @model_validator(mode="after")
    def _args_need_a_tool(self) -> LoadSpec:
        if self.kind == "none" and self.args:
            raise ValueError("args given for load kind 'none': name the tool (stress-ng or hackbench)")
        return self


class LatencyResult(BaseModel):
    """One measurement: what was run, where, under which load, and the figures (threads 0..n-1 in order, and
    the pooled entry whose samples and overflows are theirs summed)."""

    model_config = ConfigDict(extra="forbid")

    target: str | None = None  # e.g. "lab1.guest"
    form: OutputForm
    threads: list[LatencyStats] = Field(min_length=1, max_length=MAX_CPU + 1)
    all: LatencyStats
    settings: CyclictestSettings | None = None
    load: LoadSpec | None = None
    started_at: Annotated[Number, Field(ge=0)] | None = None
    duration_s: Annotated[Number, Field(ge=0)] | None = None
    boot_id: str | None = None
    cmdline: str | None = None
    raw_artifact: str | None = None  # path of the raw cyclictest output kept beside the result
    #: the target's mechanism counters over the run (measure/counters.py); None in results made before them
    counters: CounterDeltas | None = None
    counters_artifact: str | None = None  # path of the raw counter snapshots kept beside the result

    @model_validator(mode="after")
    def _threads_and_pool_agree(self) -> LatencyResult:
        numbers = [t.thread for t in self.threads]
        if numbers != list(range(len(numbers))):
            raise ValueError(f"threads are numbered {numbers[:10]}: expected 0..{len(numbers) - 1} in order")
        if self.all.thread is not None:
            raise ValueError(f"the all-threads entry has thread {self.all.thread}: expected none")
        for key in ("samples", "overflows"):
            total = sum(getattr(t, key) for t in self.threads)
            if getattr(self.all, key) != total:
                raise ValueError(f"all.{key} is {getattr(self.all, key)} but the threads' add up to {total}")
        if self.settings is not None:
            if len(self.settings.cpus) != len(self.threads):
                raise ValueError(f"{len(self.threads)} threads but settings.cpus lists "
                                 f"{len(self.settings.cpus)} CPUs: cyclictest runs one thread per CPU")
            top = max((b for s in (*self.threads, self.all) for b in (s.histogram or {})), default=-1)
            if top >= self.settings.histogram_us:
                raise ValueError(f"histogram bucket {top} is beyond settings.histogram_us "
                                 f"({self.settings.histogram_us} buckets)")
        return self

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
