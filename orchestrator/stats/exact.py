"""Exact rank statistics and run-level values shared by the keep/rollback rule (`decide`), A/B experiments
(`ab`) and fleets: the exact null distribution of the Mann-Whitney count, the claims and intervals made from it,
and one value per run (with overflow censoring). See the `decide` module docstring for how they are used."""

from __future__ import annotations

import math
from functools import cache

import numpy as np

from orchestrator.core.errors import InputError
from orchestrator.measure.model import LatencyResult

PERCENTILE_METRICS = ("p50_us", "p90_us", "p99_us", "p999_us", "p9999_us")


@cache
def _u_sf(m: int, n: int) -> np.ndarray:
    """sf[s] = P(U >= s) for the Mann-Whitney count U of m x n pairs under the null (no ties), s = 0..mn+1."""
    # counts of arrangements with U = u are the coefficients of the Gaussian binomial [m+n choose m]_q
    prev = [np.ones(1) for _ in range(n + 1)]  # prev[j]: polynomial for (i-1, j); i = 0: all ones
    for i in range(1, m + 1):
        cur = [np.ones(1) for _ in range(n + 1)]  # cur[0]; cur[1..n] are computed below
        for j in range(1, n + 1):
            a = prev[j]  # (i-1, j) shifted by j
            b = cur[j - 1]  # (i, j-1)
            out = np.zeros(i * j + 1)
            out[j:j + len(a)] += a
            out[:len(b)] += b
            cur[j] = out
        prev = cur
    counts = prev[n]
    p = counts / counts.sum()
    sf = np.concatenate([np.cumsum(p[::-1])[::-1], [0.0]])
    sf[0] = 1.0  # P(U >= 0), exactly (the sum above can round to 1 - 1e-16)
    return np.asarray(sf, dtype=float)


def _u_tail_min(m: int, n: int) -> float:
    return 1.0 / math.comb(m + n, m)


def _crit(m: int, n: int, a: float) -> int:
    """Smallest s with P(U >= s) <= a (mn + 1 when no count can reach the level)."""
    sf = _u_sf(m, n)
    ok = np.nonzero(sf <= a + 1e-15)[0]
    return int(ok[0]) if len(ok) else m * n + 1


def _log_diffs(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.asarray((np.log(y)[None, :] - np.log(x)[:, None]).ravel(), dtype=float)


def _rank_claims(d: np.ndarray, m: int, n: int, a: float, bound: float) -> tuple[bool, bool]:
    """(after < (1+bound) before shown, after > (1+bound) before shown) at one-sided level a each."""
    s = _crit(m, n, a)
    t = math.log1p(bound)
    below = int(np.count_nonzero(d < t - 1e-12))  # ties count against the claim
    above = int(np.count_nonzero(d > t + 1e-12))
    return below >= s, above >= s


def _rank_interval(d: np.ndarray, m: int, n: int, a: float) -> tuple[float, float, float]:
    """Hodges-Lehmann estimate and the interval from inverting the exact test, as relative differences."""
    ds = np.sort(d)
    est = math.expm1(float(np.median(ds)))
    s = _crit(m, n, a)
    if s > m * n:
        return est, -1.0, math.inf
    return est, math.expm1(float(ds[m * n - s])), math.expm1(float(ds[s - 1]))


def _bootstrap(x: np.ndarray, y: np.ndarray, a: float, resamples: int, rng: np.random.Generator
               ) -> tuple[float, float]:
    """Percentile bootstrap interval (a, 1-a) of median(y)/median(x) - 1, runs resampled within each side."""
    bx = np.median(x[rng.integers(0, len(x), size=(resamples, len(x)))], axis=1)
    by = np.median(y[rng.integers(0, len(y), size=(resamples, len(y)))], axis=1)
    r = by / bx - 1.0
    lo, hi = np.quantile(r, [a, 1.0 - a])
    return float(lo), float(hi)


def _histogram_size(res: LatencyResult) -> int:
    if res.settings is not None:
        return res.settings.histogram_us
    if res.all.histogram:
        return max(res.all.histogram) + 1
    if res.all.max_us is not None:  # nothing better known: the max is above every bucket anyway
        return res.all.max_us
    raise InputError("a run has a percentile among the histogram overflows but neither its histogram size "
                     "(settings) nor its histogram is known, so not even a lower bound can be given")


def run_values(results: list[LatencyResult], metric: str, side: str) -> tuple[np.ndarray, np.ndarray]:
    """One value per run (float us, >= 1) and a mask of runs censored by overflow (value = lower bound)."""
    vals, cens = [], []
    for i, res in enumerate(results, 1):
        v = getattr(res.all, metric)
        censored = False
        if v is None:
            if metric in PERCENTILE_METRICS and res.all.overflows > 0:
                v, censored = _histogram_size(res), True
            elif metric in PERCENTILE_METRICS and res.all.histogram is None:
                raise InputError(f"{side} run {i} has no {metric}: its result has no histogram (summary form); "
                                 f"measure with a histogram (-h/--json) to decide on percentiles")
            else:
                raise InputError(f"{side} run {i} has no {metric} ({res.all.samples} samples)")
        vals.append(max(float(v), 1.0))
        cens.append(censored)
    return np.asarray(vals), np.asarray(cens, dtype=bool)


def median_is_bound(vals: np.ndarray, cens: np.ndarray) -> bool:
    """True when a censored value is at or below the median position (so the median is only a lower bound)."""
    if not cens.any():
        return False
    k = len(vals)
    order = np.argsort(vals, kind="stable")
    mid = order[(k - 1) // 2: k // 2 + 1]
    return bool(cens[mid].any())
