"""The decision procedures the benchmark judges, all driven the same way: a `Source` hands out one run's values
(p99, p99.9, max in us) for the side asked for, in the order asked for; the procedure says keep or rollback.

  - `OldRule`: the rule of orchestrator/stats/decide.py at commit 61f7220, its decision logic frozen here on
    arrays (Bonferroni over 3 looks at 5/12/20 runs per side, two-sided split, exact Mann-Whitney AND
    percentile bootstrap must agree, guards max 25% / p99 10%, stop for "no relevant improvement",
    inconclusive -> rollback). tests/unit/test_decision_bench.py checks it decision for decision against that
    commit's own code.
  - `SeqRule`: any rule with the project's driving API (`SequentialDecision(rule)`, `next_side()`,
    `add(side, LatencyResult)`, `.decision.action`), fed LatencyResults: how "new" is run.
  - `fixed_z`: the fixed-length baseline, n runs per side in ABBA order and one one-sided rank test.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from statistics import NormalDist
from typing import Any

import numpy as np

M_P99, M_P999, M_MAX = 0, 1, 2  # columns of a run's values
COLUMN = {"p99_us": M_P99, "p999_us": M_P999, "max_us": M_MAX}


# ------------------------------------------------------------------------------ exact Mann-Whitney null


@cache
def u_upper_tail(m: int, n: int) -> np.ndarray:
    """tail[s] = P(U >= s), U = the number of (x, y) pairs in one order among m x n, no ties, s = 0..mn+1.

    U's counts are the coefficients of the Gaussian binomial prod_{i=1..m} (1 - q^(n+i)) / (1 - q^i)."""
    poly = np.zeros(m * n + 1)
    poly[0] = 1.0
    for i in range(1, m + 1):
        shifted = np.zeros_like(poly)
        shifted[n + i:] = poly[:len(poly) - n - i]
        poly = poly - shifted  # times (1 - q^(n+i))
        for j in range(i, len(poly)):  # divided by (1 - q^i): a running sum with stride i
            poly[j] += poly[j - i]
    p = poly / poly.sum()
    return np.concatenate([np.cumsum(p[::-1])[::-1], [0.0]])


@cache
def u_critical(m: int, n: int, a: float) -> int:
    """Smallest count s with P(U >= s) <= a (mn + 1 when none)."""
    ok = np.nonzero(u_upper_tail(m, n) <= a + 1e-15)[0]
    return int(ok[0]) if len(ok) else m * n + 1


# ----------------------------------------------------------------------------------------- the source


class Source:
    """The runs of one simulated decision: run i in measuring order gets noise[i] (logs, one boot or several),
    an "after" run also the effect's log shift. `boots`: for a boot change, a new boot (index) starts at every
    side switch; `boot_of[i]` says which."""

    def __init__(self, model_values: Callable[[np.ndarray], np.ndarray], noise: np.ndarray, shift: np.ndarray,
                 boot_noise: np.ndarray | None = None):
        self.values_of = model_values
        self.noise = noise  # (L, k) logs, drift and run spread, one trial
        self.shift = shift  # (k,) log effect on an after run
        self.boot_noise = boot_noise  # (B, L, k) for boot changes: each boot's own series, offset included
        self.i = 0
        self.last: str | None = None
        self.boot = -1
        self.in_boot = 0
        self.sides: list[str] = []
        self.boot_of: list[int] = []

    def take(self, side: str, new_boot: bool = False) -> np.ndarray:
        if self.boot_noise is not None:
            if side != self.last or new_boot:
                self.boot += 1
                self.in_boot = 0
            logs = self.boot_noise[self.boot, self.in_boot]
            self.in_boot += 1
        else:
            logs = self.noise[self.i]
        self.i += 1
        self.last = side
        self.sides.append(side)
        self.boot_of.append(max(self.boot, 0))
        return self.values_of(logs + (self.shift if side == "after" else 0.0))


@dataclass
class Outcome:
    action: str  # keep | rollback
    verdict: str  # keep | rollback | inconclusive
    runs: int  # both sides
    boots: int = 0


# ------------------------------------------------------------------------------------------ the old rule


@dataclass
class OldRule:
    """orchestrator/stats/decide.py at 61f7220 (defaults of playbooks/measurement.yaml), on arrays."""

    name: str = "old"
    min_effect: float = 0.05
    confidence: float = 0.95
    k_min: int = 5
    k_max: int = 20
    looks: int = 3
    order: str = "ABBA"
    inconclusive: str = "rollback"
    resamples: int = 2000
    guards: tuple[tuple[str, float], ...] = (("max_us", 0.25), ("p99_us", 0.10))

    @classmethod
    def from_rule(cls, rule: Any, **over: Any) -> OldRule:
        """From a DecisionRule of the old API (pydantic model with the same fields)."""
        kw = {k: getattr(rule, k) for k in ("min_effect", "confidence", "k_min", "k_max", "looks", "order",
                                            "inconclusive")}
        kw["resamples"] = rule.bootstrap_resamples
        kw["guards"] = tuple(rule.guards.items())
        kw.update(over)
        return cls(**kw)

    def schedule(self) -> list[int]:
        if self.looks == 1 or self.k_min == self.k_max:
            return [self.k_max]
        ks = [round(self.k_min + (self.k_max - self.k_min) * i / (self.looks - 1)) for i in range(self.looks)]
        return sorted(set(ks))

    def next_side(self, look: int, nb: int, na: int, k: int) -> str:
        need = {"before": k - nb, "after": k - na}
        if self.order == "blocked":
            first, second = ("before", "after") if look % 2 == 0 else ("after", "before")
            return first if need[first] > 0 else second
        if self.order == "ABAB":
            side = "before" if nb <= na else "after"
        else:
            side = "before" if "ABBA"[(nb + na) % 4] == "A" else "after"
        if need[side] <= 0:
            side = "after" if side == "before" else "before"
        return side

    def judge(self, x: np.ndarray, y: np.ndarray, look: int, looks: int, seed: int, final: bool
              ) -> tuple[str, bool]:
        """(verdict, final) of one look on run values x (before) and y (after), shape (runs, 3)."""
        a = (1.0 - self.confidence) / looks / 2
        m, n = len(x), len(y)
        s = u_critical(m, n, a)
        shown: dict[str, bool] = {}
        roles = [("p999_us", "primary", 0.0)] + [(g, "guard", t) for g, t in self.guards]
        for idx, (metric, role, tol) in enumerate(roles):
            c = COLUMN[metric]
            xv, yv = np.maximum(x[:, c], 1.0), np.maximum(y[:, c], 1.0)
            d = (np.log(yv)[None, :] - np.log(xv)[:, None]).ravel()
            rng = np.random.default_rng([seed, look, idx])
            bx = np.median(xv[rng.integers(0, m, size=(self.resamples, m))], axis=1)
            by = np.median(yv[rng.integers(0, n, size=(self.resamples, n))], axis=1)
            lo, hi = np.quantile(by / bx - 1.0, [a, 1.0 - a])

            def below(bound: float, d: np.ndarray = d, hi: float = hi) -> bool:
                t = math.log1p(bound)
                return int(np.count_nonzero(d < t - 1e-12)) >= s and hi < bound

            def above(bound: float, d: np.ndarray = d, lo: float = lo) -> bool:
                t = math.log1p(bound)
                return int(np.count_nonzero(d > t + 1e-12)) >= s and lo > bound

            if role == "primary":
                shown["better"], shown["worse"] = below(0.0), above(0.0)
                shown["irrelevant"] = above(-self.min_effect)
            elif above(tol):
                shown["regressed"] = True
        if shown["worse"] or shown.get("regressed"):
            return "rollback", True
        if shown["better"]:
            return "keep", True
        stop = self.inconclusive == "rollback" and shown["irrelevant"]
        return "inconclusive", final or stop

    def decide(self, src: Source, seed: int) -> Outcome:
        sched = self.schedule()
        runs: dict[str, list[np.ndarray]] = {"before": [], "after": []}
        look = 0
        while True:
            k = sched[look]
            while min(len(runs["before"]), len(runs["after"])) < k:
                side = self.next_side(look, len(runs["before"]), len(runs["after"]), k)
                runs[side].append(src.take(side))
            verdict, final = self.judge(np.array(runs["before"]), np.array(runs["after"]), look + 1, len(sched),
                                        seed, look == len(sched) - 1)
            if final:
                action = self.inconclusive if verdict == "inconclusive" else verdict
                return Outcome(action, verdict, len(runs["before"]) + len(runs["after"]), src.boot + 1)
            look += 1


# ------------------------------------------------------------------------- any rule with the driving API


class SeqRule:
    """A rule driven through the project's API: `seq = make(seed)`, `seq.next_side()`, `seq.add(side, result)`,
    `seq.decision.action` / `.verdict`. Results carry the boot (`boot_id`) they were measured in."""

    def __init__(self, name: str, make: Callable[[int], Any], run_s: float, histogram_us: float = 20000):
        from orchestrator.measure.model import CyclictestSettings, LatencyResult, LatencyStats

        self.name = name
        self.make = make
        self.run_s = run_s
        self.histogram_us = int(min(histogram_us, 1_000_000))
        self._settings = CyclictestSettings(duration_s=run_s, histogram_us=self.histogram_us)
        self._stats = LatencyStats
        self._result = LatencyResult

    def result(self, v: np.ndarray, boot: int, start: float) -> Any:
        h = self.histogram_us

        def pct(x: float) -> int | None:  # a percentile among the overflows is None, as the parser gives it
            return None if x >= h else int(x)

        st = self._stats.model_construct(thread=None, samples=int(self.run_s * 1000), min_us=1, avg_us=1.0,
                                         p50_us=1, p90_us=1, p99_us=pct(v[M_P99]), p999_us=pct(v[M_P999]),
                                         p9999_us=pct(v[M_MAX]), max_us=int(v[M_MAX]),
                                         overflows=int(v[M_MAX] >= h), histogram=None)
        return self._result.model_construct(target="sim", form="json", threads=[st], all=st,
                                            settings=self._settings, load=None, started_at=start,
                                            duration_s=self.run_s, boot_id=f"boot{boot}", cmdline=None,
                                            raw_artifact=None)

    @staticmethod
    def _next(seq: Any) -> tuple[str, bool] | None:
        """(side, reboot first) from `next_step()` where the API has it (boot changes), else `next_side()`."""
        if hasattr(seq, "next_step"):
            step = seq.next_step()
            return None if step is None else (step.side, bool(getattr(step, "new_boot", False)))
        side = seq.next_side()
        return None if side is None else (side, False)

    def decide(self, src: Source, seed: int) -> Outcome:
        seq = self.make(seed)
        while (nxt := self._next(seq)) is not None:
            side, fresh = nxt
            v = src.take(side, new_boot=fresh)
            seq.add(side, self.result(v, src.boot_of[-1], 1e9 + src.i * (self.run_s + 5)))
        d = seq.decision
        return Outcome(d.action, d.verdict, src.i, src.boot + 1)


# ----------------------------------------------------------------------------------- fixed-length baseline


def abba_sides(length: int) -> np.ndarray:
    """True where run i of an ABBA sequence is an "after" run (A B B A A B B A ...)."""
    return np.array(["ABBA"[i % 4] == "B" for i in range(length)])


def fixed_z(primary: np.ndarray, shift: float, n_max: int, histogram_us: float = math.inf) -> np.ndarray:
    """z statistics of the one-sided Mann-Whitney test "after is lower" after n = 1..n_max runs per side.

    primary: (trials, 2 n_max) log p99.9 in ABBA measuring order (the first 2n runs hold n of each side);
    shift: the effect's log shift of the after runs. Returns (trials, n_max): z > z_alpha means keep.
    Whole-microsecond ties (and runs censored at the histogram size) count 1/2, the variance is the untied
    one."""
    after = abba_sides(primary.shape[1])
    x = np.clip(np.rint(np.exp(primary[:, ~after])), 1.0, histogram_us)
    y = np.clip(np.rint(np.exp(primary[:, after] + shift)), 1.0, histogram_us)
    s = (y[:, None, :] < x[:, :, None]).astype(float) + 0.5 * (y[:, None, :] == x[:, :, None])
    cs = s.cumsum(axis=1).cumsum(axis=2)
    n = np.arange(1, n_max + 1)
    u = cs[:, n - 1, n - 1]
    mean = n * n / 2.0
    sd = np.sqrt(n * n * (2 * n + 1) / 12.0)
    return np.asarray((u - mean) / sd)


NORMAL = NormalDist()


def z_alpha(alpha: float) -> float:
    return NORMAL.inv_cdf(1.0 - alpha)


def n_for_power(ns: np.ndarray, power: np.ndarray, alpha: float, target: float) -> tuple[float, str]:
    """Runs per side at which the fixed test reaches `target` power, interpolated linearly in (sqrt n,
    probit power) between the simulated grid points (the space in which a shift test's power is a straight
    line through (0, -z_alpha)); beyond the grid, extrapolated along that line from the last points.

    Returns (n, how): how is "interpolated", "extrapolated" or "below grid"."""
    za = z_alpha(alpha)
    p = np.clip(np.maximum.accumulate(power), 1e-4, 1 - 1e-4)  # power grows with n; noise aside
    q = np.array([NORMAL.inv_cdf(v) for v in p])
    tq = NORMAL.inv_cdf(min(max(target, 1e-4), 1 - 1e-4))
    r = np.sqrt(ns.astype(float))
    if tq <= q[0]:
        return float(ns[0]), "below grid"
    hit = np.nonzero(q >= tq)[0]
    if len(hit):
        j = int(hit[0])
        if q[j] == q[j - 1]:
            return float(ns[j]), "interpolated"
        rr = r[j - 1] + (tq - q[j - 1]) * (r[j] - r[j - 1]) / (q[j] - q[j - 1])
        return float(rr * rr), "interpolated"
    # the line through the last quarter of the grid's (sqrt n, probit + z_alpha), through the origin
    tail = slice(len(ns) * 3 // 4, len(ns))
    slope = float(np.sum(r[tail] * (q[tail] + za)) / np.sum(r[tail] ** 2))
    if slope <= 0:
        return math.inf, "extrapolated"
    rr = (tq + za) / slope
    return float(rr * rr), "extrapolated"
