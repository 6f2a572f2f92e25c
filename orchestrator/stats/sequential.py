"""Group-sequential machinery of the keep/rollback rule (see the `decide` module docstring for the rule).

Pure functions, numpy and math only: the Hwang-Shih-DeCani spending function, the per-look levels spent from it
(for the discrete exact rank test: what a look cannot use is carried to the next), the normal and Student t
distributions, and the power analysis (`runs_for_power`, `power_at`)."""

from __future__ import annotations

import math
from functools import cache

import numpy as np

from orchestrator.stats.exact import _crit

# Monte Carlo of the Brownian approximation used by the power analysis: fixed seed and size, so it is a pure
# function (same inputs, same answer); 10,000 paths give the power to about +-0.2 percentage points at 95%.
_MC_PATHS = 10_000
_MC_SEED = 20261206
ARE_MW = math.pi / 3  # runs the exact rank test needs per run the t-test needs, on normal data (ARE 3/pi)


def hsd_spent(t: float, alpha: float, gamma: float) -> float:
    """Hwang-Shih-DeCani: error spent up to information fraction t (0..1) of a total `alpha`.

    alpha(t) = alpha (1 - exp(-gamma t)) / (1 - exp(-gamma)); gamma = 0 is the linear alpha t. gamma < 0 spends
    little early (-4 is close to O'Brien-Fleming), gamma = 1 is close to Pocock."""
    t = min(max(t, 0.0), 1.0)
    if abs(gamma) < 1e-9:
        return alpha * t
    return alpha * (-math.expm1(-gamma * t)) / (-math.expm1(-gamma))


def look_grid(k_min: int, k_max: int, look_every: int) -> list[int]:
    """Runs per side at each look: k_min, k_min + look_every, ... and always k_max last."""
    if k_max <= k_min:
        return [k_max]
    ks = list(range(k_min, k_max, look_every))
    return ks + [k_max]


# ------------------------------------------------------------------------------ exact rank test boundaries

_MW_PATHS = 40_000


@cache
def _mw_paths(k_max: int) -> np.ndarray:
    """Mann-Whitney counts U_k (pairs with after < before among the first k runs of each side), k = 1..k_max,
    of 40,000 fixed-seed null sequences (iid runs). Under the null the joint law of (U_k) depends on nothing
    but the ranks, so this is the exact joint law up to Monte Carlo error, whatever the run distribution."""
    rng = np.random.default_rng(_MC_SEED + 1)
    x = rng.random((_MW_PATHS, k_max), dtype=np.float32)
    y = rng.random((_MW_PATHS, k_max), dtype=np.float32)
    u = np.zeros((_MW_PATHS, k_max), dtype=np.int32)
    cur = np.zeros(_MW_PATHS, dtype=np.int32)
    for k in range(k_max):
        cur += np.count_nonzero(y[:, :k] < x[:, k:k + 1], axis=1).astype(np.int32)
        cur += np.count_nonzero(y[:, k:k + 1] < x[:, :k], axis=1).astype(np.int32)
        cur += (y[:, k] < x[:, k]).astype(np.int32)
        u[:, k] = cur
    return u


@cache
def mw_bounds(ks: tuple[int, ...], alpha: float, gamma: float, k_paths: int, first: int | None = None
              ) -> tuple[int, ...]:
    """Group-sequential critical counts of the exact rank test at looks with ks[j] runs per side: look j claims
    when its count of supporting pairs is >= c_j (k^2 + 1: cannot claim), with the information fraction
    t_j = ks[j] / ks[-1] and the error alpha(t_j) of HSD(gamma) spent by look j.

    Look 1 uses the exact marginal null law (`first` forces its count, e.g. one computed for a longer plan,
    whose spent error is smaller). Later looks use the joint law of `_mw_paths(k_paths)`: c_j is the smallest
    count such that the estimated probability of a claim at any look up to j, plus two of its Monte Carlo
    standard errors, is at most alpha(t_j); a count the test cannot reach leaves its error to later looks."""
    k_end = ks[-1]
    u = _mw_paths(k_paths)
    n_paths = len(u)
    out: list[int] = []
    alive = np.ones(n_paths, dtype=bool)
    for j, k in enumerate(ks):
        target = hsd_spent(k / k_end, alpha, gamma)
        marginal = _crit(k, k, target)
        if j == 0:
            c = marginal if first is None else first
        else:
            crossed = n_paths - int(alive.sum())
            ge = np.cumsum(np.bincount(u[alive, k - 1], minlength=k * k + 2)[::-1])[::-1]  # ge[c]: alive, U >= c
            p = (crossed + ge) / n_paths
            ok = np.nonzero(p + 2.0 * np.sqrt(p * (1.0 - p) / n_paths) <= target)[0]
            c = max(int(ok[0]) if len(ok) else k * k + 1, marginal)
        out.append(c)
        alive &= u[:, k - 1] < c
    return tuple(out)


# ------------------------------------------------------------------------------------------- distributions


def norm_cdf(z: float) -> float:
    return 0.5 * math.erfc(-z / math.sqrt(2.0))


def norm_ppf(p: float) -> float:
    """Quantile of the standard normal (bisection on erfc: exact to 1e-12, no scipy)."""
    if not 0.0 < p < 1.0:
        return math.inf if p >= 1.0 else -math.inf
    lo, hi = -40.0, 40.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if norm_cdf(mid) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-13:
            break
    return (lo + hi) / 2


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    lbt = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(lbt) * _betacf(a, b, x) / a
    return 1.0 - math.exp(lbt) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """Student t distribution function with (possibly fractional) df > 0."""
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * _betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_ppf(p: float, df: float) -> float:
    """Quantile of the Student t distribution (bisection)."""
    if not 0.0 < p < 1.0:
        return math.inf if p >= 1.0 else -math.inf
    lo, hi = -1.0, 1.0
    while t_cdf(lo, df) > p:
        lo *= 2.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, abs(mid)):
            break
    return (lo + hi) / 2


# ------------------------------------------------------------------------------------------ power analysis


@cache
def _paths(ts_key: tuple[float, ...]) -> np.ndarray:
    """Standardised Brownian motion at information fractions t_1..t_L (paths x looks): W(t_j) / sqrt(t_j)."""
    ts = np.asarray(ts_key)
    dt = np.diff(np.concatenate([[0.0], ts]))
    rng = np.random.default_rng(_MC_SEED)
    w = np.cumsum(rng.standard_normal((_MC_PATHS, len(ts))) * np.sqrt(dt), axis=1)
    return np.asarray(w / np.sqrt(ts), dtype=float)


@cache
def _z_bounds(ts_key: tuple[float, ...], alpha: float, gamma: float) -> tuple[float, ...]:
    """Group-sequential z boundaries c_j: P(some Z_i >= c_i, i <= j) = alpha(t_j) under the null."""
    z = _paths(ts_key)
    alive = np.ones(len(z), dtype=bool)
    out: list[float] = []
    for j, t in enumerate(ts_key):
        allowed = hsd_spent(t, alpha, gamma) - (1.0 - float(alive.mean()))
        cand = np.sort(z[alive, j])[::-1]
        n_cross = int(math.floor(max(allowed, 0.0) * len(z)))
        c = float(cand[n_cross]) if n_cross < len(cand) else -math.inf
        c = max(c, norm_ppf(1.0 - hsd_spent(t, alpha, gamma)))  # never below the marginal level
        out.append(c)
        alive &= z[:, j] < c
    return tuple(out)


@cache
def power_at(k_max: int, sd_log: float, effect: float, alpha: float, *, gamma: float = -4.0, k_min: int = 6,
             look_every: int = 2) -> float:
    """Power of the keep boundary to show an improvement of relative size `effect` (e.g. 0.05 = 5% lower) with
    looks from `k_min` every `look_every` runs per side up to `k_max`, one-sided `alpha` spent with HSD(gamma).

    Normal approximation of the exact rank test on the log of the run values: at k runs per side the rank
    test behaves like a z-test with k * 3/pi runs per side, so the standardised effect at look j is
    theta sqrt(t_j) with theta = |log(1 - effect)| / sd_log * sqrt(k_max * 3/pi / 2); the boundaries are the
    group-sequential ones of the spending function (the rank test's discreteness and the futility stops are
    ignored). Computed on 10,000 fixed-seed Brownian paths."""
    if sd_log <= 0:
        return 1.0
    ks = look_grid(min(k_min, k_max), k_max, look_every)
    ts = tuple(k / k_max for k in ks)
    bounds = np.asarray(_z_bounds(ts, alpha, gamma))
    theta = abs(math.log1p(-effect)) / sd_log * math.sqrt(k_max / ARE_MW / 2.0)
    z = _paths(ts) + theta * np.sqrt(np.asarray(ts))
    return float(np.mean(np.any(z >= bounds, axis=1)))


def fixed_runs(sd_log: float, min_effect: float, alpha: float, power: float) -> float:
    """Runs per side of a single analysis: 2 (pi/3) sd^2 (z_{1-alpha} + z_power)^2 / log(1 - eps)^2."""
    delta = math.log1p(-min_effect)
    return 2.0 * ARE_MW * sd_log ** 2 * (norm_ppf(1.0 - alpha) + norm_ppf(power)) ** 2 / delta ** 2


@cache
def runs_for_power(sd_log: float, min_effect: float, alpha: float, power: float, *, gamma: float = -4.0,
                   k_min: int = 6, look_every: int = 2, limit: int = 100_000) -> int:
    """Runs per side for the group-sequential exact rank test to show an improvement of `min_effect` with
    probability `power` at one-sided level `alpha` (sd_log: run-to-run SD of log(primary)).

    n = the smallest k_max with `power_at(k_max, ...) >= power`; equivalently n = n_fixed x R where
    n_fixed = 2 (pi/3) sd_log^2 (z_{1-alpha} + z_power)^2 / log(1 - min_effect)^2 is the single-analysis size
    of the rank test (the t-test's size times pi/3, the rank test's asymptotic relative efficiency on normal
    data) and R >= 1 is the inflation of the looks (about 1.02-1.10 for gamma = -4). Never below k_min;
    `limit` when even that is not enough."""
    if not (0.0 < alpha < 1.0 and 0.0 < power < 1.0 and 0.0 < min_effect < 1.0):
        raise ValueError("alpha, power and min_effect must lie in (0, 1)")
    if sd_log <= 0:
        return k_min

    def ok(k: int) -> bool:
        return power_at(k, sd_log, min_effect, alpha, gamma=gamma, k_min=k_min, look_every=look_every) >= power

    n0 = fixed_runs(sd_log, min_effect, alpha, power)
    lo = min(max(k_min, 2, math.floor(n0) - 1), limit)  # the looks only ever cost runs: below n0 is not enough
    if lo >= limit or ok(lo):
        return lo
    hi = min(max(lo + 1, math.ceil(n0 * 1.15)), limit)
    while not ok(hi):
        if hi >= limit:
            return limit
        lo, hi = hi, min(math.ceil(hi * 1.5), limit)
    while hi - lo > 1:  # ok(hi), not ok(lo)
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi


def inflation_factor(sd_log: float, min_effect: float, alpha: float, power: float, *, gamma: float = -4.0,
                     k_min: int = 6, look_every: int = 2) -> float:
    """R = runs_for_power / n_fixed: what the looks cost in maximum runs."""
    n = runs_for_power(sd_log, min_effect, alpha, power, gamma=gamma, k_min=k_min, look_every=look_every)
    return n / fixed_runs(sd_log, min_effect, alpha, power)
