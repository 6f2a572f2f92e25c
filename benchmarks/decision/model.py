"""A hierarchical noise model of run-level latency, fitted to recorded runs (numpy only).

For metric m (log p99, log p99.9, log max) of run t in boot b:

    y[m, b, t] = mu[m] + u[m, b] + a[m, b, t] + e[m, b, t]

  - u: the boot's offset, N(0, sb^2), one draw per boot (the same for all of its runs);
  - a: drift, a stationary AR(1) within a boot: a[t] = phi a[t-1] + innovation, SD sa, lag-1 correlation phi
    per typical run spacing (phi^dt for a gap of dt spacings); a new boot starts a fresh draw;
  - e: the run-level spread that is left, N(0, se^2), independent between runs.

Fit, per metric: restricted maximum likelihood (REML: mu integrated out, which does not bias sb downward as plain
ML does with few boots) over (sb, sa, phi, se) with the exact Gaussian likelihood of each boot's covariance
sb^2 + sa^2 phi^|dt| + se^2 [t = t'], maximised by Nelder-Mead from several starts. With one boot, sb cannot be
told apart from mu: it is fixed at a stated prior instead of fitted. Bounds: no SD above 4 (in log units), and the
within-boot SD (drift and spread) below twice the recorded one: on a short series with a trend the likelihood
otherwise drifts to a near-unit-root AR(1) with an unbounded stationary SD.

Jointly: the three metrics' components are correlated. The drift's cross-correlation comes from the lag-1
cross-covariances (cov(a_i[t+1], a_j[t]) + cov(a_i[t], a_j[t+1]) = (phi_i + phi_j) cov(a_i, a_j)), the white
part's from what is left of the lag-0 cross-covariance; boot offsets are taken to be correlated like the drift
(three boots cannot estimate a correlation). Simulated runs are whole microseconds, and ordered per run
(p99 <= p99.9 <= max) as a real run's are.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

PHI_MAX = 0.99
SD_FLOOR = 1e-3
WITHIN_MAX = 2.0  # the fitted within-boot SD stays below twice the recorded one (short series, a trend in them)
LOG_SD_MAX = math.log(4.0)  # no SD of a log value above 4 (a factor e^4 = 55 from run to run) is fitted


@dataclass
class MetricFit:
    mu: float
    sb: float  # boot-to-boot SD of the offset
    sa: float  # SD of the AR(1) drift
    phi: float  # lag-1 correlation of the drift per run spacing
    se: float  # SD of the independent run-level spread
    sb_fitted: bool = True  # False: fixed at a prior (one boot)
    loglik: float = math.nan

    @property
    def within_sd(self) -> float:
        return math.sqrt(self.sa ** 2 + self.se ** 2)

    @property
    def total_sd(self) -> float:
        return math.sqrt(self.sb ** 2 + self.sa ** 2 + self.se ** 2)

    @property
    def lag1(self) -> float:
        """Lag-1 autocorrelation of a boot's runs implied by the fit."""
        return self.phi * self.sa ** 2 / max(self.within_sd ** 2, 1e-12)


def nelder_mead(f: Callable[[np.ndarray], float], x0: np.ndarray, step: float = 0.5, iters: int = 600,
                tol: float = 1e-7) -> tuple[np.ndarray, float]:
    """Minimise f from x0 (the standard simplex method: reflect, expand, contract, shrink)."""
    n = len(x0)
    pts = [np.asarray(x0, float)] + [np.asarray(x0, float) + step * np.eye(n)[i] for i in range(n)]
    vals = [f(p) for p in pts]
    for _ in range(iters):
        order = np.argsort(vals)
        pts = [pts[i] for i in order]
        vals = [vals[i] for i in order]
        if abs(vals[-1] - vals[0]) <= tol * (abs(vals[0]) + tol):
            break
        c = np.mean(pts[:-1], axis=0)
        xr = c + (c - pts[-1])
        fr = f(xr)
        if fr < vals[0]:
            xe = c + 2 * (c - pts[-1])
            fe = f(xe)
            pts[-1], vals[-1] = (xe, fe) if fe < fr else (xr, fr)
        elif fr < vals[-2]:
            pts[-1], vals[-1] = xr, fr
        else:
            xc = c + 0.5 * (pts[-1] - c)
            fc = f(xc)
            if fc < vals[-1]:
                pts[-1], vals[-1] = xc, fc
            else:
                pts = [pts[0]] + [pts[0] + 0.5 * (p - pts[0]) for p in pts[1:]]
                vals = [vals[0]] + [f(p) for p in pts[1:]]
    i = int(np.argmin(vals))
    return pts[i], vals[i]


def _unpack(x: np.ndarray, sb_prior: float | None) -> tuple[float, float, float, float]:
    sa, se = math.exp(x[0]), math.exp(x[1])
    phi = PHI_MAX / (1.0 + math.exp(-x[2]))
    sb = sb_prior if sb_prior is not None else math.exp(x[3])
    return sb, sa, phi, se


def neg_reml(ys: Sequence[np.ndarray], ts: Sequence[np.ndarray], sb: float, sa: float, phi: float, se: float
             ) -> tuple[float, float]:
    """(-REML log-likelihood, the GLS mean) of the boots' series ys at run positions ts."""
    logdet = quad_11 = quad_1y = quad_yy = 0.0
    for y, t in zip(ys, ts, strict=True):
        d = np.abs(t[:, None] - t[None, :])
        v = sb ** 2 + sa ** 2 * phi ** d + (se ** 2 + 1e-9) * np.eye(len(y))
        try:
            c = np.linalg.cholesky(v)
        except np.linalg.LinAlgError:
            return math.inf, math.nan
        logdet += 2.0 * float(np.log(np.diag(c)).sum())
        w1 = np.linalg.solve(c, np.ones(len(y)))
        wy = np.linalg.solve(c, y)
        quad_11 += float(w1 @ w1)
        quad_1y += float(w1 @ wy)
        quad_yy += float(wy @ wy)
    mu = quad_1y / quad_11
    resid = quad_yy - 2 * mu * quad_1y + mu * mu * quad_11
    return 0.5 * (logdet + math.log(quad_11) + resid), mu


def fit_metric(ys: Sequence[np.ndarray], ts: Sequence[np.ndarray] | None = None, sb_prior: float = 0.0
               ) -> MetricFit:
    """REML fit of one metric's hierarchical model; ys[b] is boot b's series of log values."""
    ys = [np.asarray(y, float) for y in ys if len(y)]
    ts = [np.arange(len(y), dtype=float) for y in ys] if ts is None else [np.asarray(t, float) for t in ts]
    one_boot = len(ys) < 2
    prior = sb_prior if one_boot else None
    within = np.concatenate([y - y.mean() for y in ys])
    v = max(float(np.var(within)), SD_FLOOR ** 2)
    best: tuple[float, np.ndarray] | None = None
    sb0 = float(np.std([y.mean() for y in ys])) if not one_boot else 0.0
    for phi0 in (0.2, 0.5, 0.85):
        for share in (0.3, 0.7):
            x0 = [0.5 * math.log(share * v), 0.5 * math.log((1 - share) * v),
                  math.log(phi0 / (PHI_MAX - phi0))]
            if prior is None:
                x0.append(math.log(max(sb0, 0.3 * math.sqrt(v))))

            def f(x: np.ndarray) -> float:
                if np.any(np.abs(x) > 30) or x[0] > LOG_SD_MAX or x[1] > LOG_SD_MAX or (
                        len(x) > 3 and x[3] > LOG_SD_MAX):
                    return math.inf
                if math.exp(2 * x[0]) + math.exp(2 * x[1]) > WITHIN_MAX ** 2 * v:
                    return math.inf  # a near-unit-root drift with a huge SD: not what the runs show
                return neg_reml(ys, ts, *_unpack(x, prior))[0]

            x, val = nelder_mead(f, np.array(x0))
            if best is None or val < best[0]:
                best = (val, x)
    assert best is not None
    sb, sa, phi, se = _unpack(best[1], prior)
    nll, mu = neg_reml(ys, ts, sb, sa, phi, se)
    return MetricFit(mu, sb, sa, phi, se, sb_fitted=not one_boot, loglik=-nll)


def nearest_corr(r: np.ndarray, floor: float = 1e-4) -> np.ndarray:
    """The matrix with r's eigenvectors and its eigenvalues clipped at `floor`, rescaled to a unit diagonal."""
    r = (r + r.T) / 2
    w, v = np.linalg.eigh(r)
    out = (v * np.maximum(w, floor)) @ v.T
    d = np.sqrt(np.diag(out))
    return np.asarray(out / d[:, None] / d[None, :])


def cross_corr(ys: Sequence[Sequence[np.ndarray]], fits: Sequence[MetricFit]) -> tuple[np.ndarray, np.ndarray]:
    """(drift correlation, run-spread correlation) between metrics, by moments within boots.

    ys[m][b]: metric m's series in boot b."""
    k = len(fits)
    nb = len(ys[0])
    c0 = np.zeros((k, k))
    c1 = np.zeros((k, k))  # c1[i, j] = sum over t of y_i[t+1] y_j[t]
    n0 = n1 = 0
    for b in range(nb):
        z = np.array([ys[m][b] - ys[m][b].mean() for m in range(k)])
        if z.shape[1] < 3:
            continue
        c0 += z @ z.T
        c1 += z[:, 1:] @ z[:, :-1].T
        n0 += z.shape[1]
        n1 += z.shape[1] - 1
    c0 /= max(n0, 1)
    c1 /= max(n1, 1)
    total = c0 / np.sqrt(np.outer(np.diag(c0), np.diag(c0)))
    ra = np.eye(k)
    re = np.eye(k)
    for i in range(k):
        for j in range(k):
            if i == j:
                continue
            fi, fj = fits[i], fits[j]
            if fi.phi + fj.phi < 0.15 or min(fi.sa, fj.sa) < 0.05:
                ra[i, j] = total[i, j]  # drift too weak to tell apart: the total correlation
            else:
                a0 = (c1[i, j] + c1[j, i]) / (fi.phi + fj.phi)
                ra[i, j] = float(np.clip(a0 / (fi.sa * fj.sa), -0.99, 0.99))
            a_part = ra[i, j] * fi.sa * fj.sa
            if min(fi.se, fj.se) < 0.05:
                re[i, j] = total[i, j]
            else:
                re[i, j] = float(np.clip((c0[i, j] - a_part) / (fi.se * fj.se), -0.99, 0.99))
    return nearest_corr(ra), nearest_corr(re)


@dataclass
class NoiseModel:
    metrics: tuple[str, ...]
    fits: list[MetricFit]
    r_drift: np.ndarray
    r_run: np.ndarray
    r_boot: np.ndarray
    run_s: float
    note: list[str] = field(default_factory=list)
    spacing_s: float = 1.0  # the recording's time between consecutive runs: phi is per this much time
    step_s: float = 1.0  # the simulated time between consecutive runs (the drift as an Ornstein-Uhlenbeck process)
    histogram_us: float = math.inf  # percentiles at or beyond it are censored there (cyclictest's overflows)

    def at_step(self, step_s: float) -> NoiseModel:
        """The same model simulated with runs `step_s` apart (phi -> phi ** (step_s / spacing_s))."""
        return replace(self, step_s=step_s)

    def phis(self) -> np.ndarray:
        return np.array([f.phi ** (self.step_s / self.spacing_s) for f in self.fits])

    def _chol(self, r: np.ndarray, sd: np.ndarray) -> np.ndarray:
        cov = r * np.outer(sd, sd)
        return np.linalg.cholesky(cov + 1e-12 * np.eye(len(sd)))

    def simulate_logs(self, rng: np.random.Generator, n: int, length: int, *, new_boot: bool = True) -> np.ndarray:
        """n independent series of `length` consecutive runs, each in one boot: logs, shape (n, length, k).

        new_boot=False leaves out the boot offset (the same boot for everything compared)."""
        k = len(self.fits)
        phi = self.phis()
        sa = np.array([f.sa for f in self.fits])
        se = np.array([f.se for f in self.fits])
        sb = np.array([f.sb for f in self.fits])
        mu = np.array([f.mu for f in self.fits])
        a0 = self.r_drift * np.outer(sa, sa)
        q = a0 * (1.0 - np.outer(phi, phi))  # innovations of a diagonal VAR(1) with stationary covariance a0
        w, v = np.linalg.eigh((q + q.T) / 2)
        lq = v * np.sqrt(np.maximum(w, 0.0))
        la = self._chol(self.r_drift, sa)
        le = self._chol(self.r_run, se)
        out = np.empty((n, length, k))
        a = rng.standard_normal((n, k)) @ la.T
        for t in range(length):
            if t:
                a = a * phi + rng.standard_normal((n, k)) @ lq.T
            out[:, t, :] = a
        out += rng.standard_normal((n, length, k)) @ le.T
        if new_boot:
            out += (rng.standard_normal((n, k)) @ self._chol(self.r_boot, sb).T)[:, None, :]
        return out + mu

    def to_values(self, logs: np.ndarray) -> np.ndarray:
        """Logs -> whole microseconds (>= 1), each run ordered p99 <= p99.9 <= max as a real run is; the
        percentiles (not the max) censored at the histogram size, as a real run's overflows are."""
        v = np.maximum.accumulate(np.maximum(np.rint(np.exp(logs)), 1.0), axis=-1)
        v[..., :-1] = np.minimum(v[..., :-1], self.histogram_us)
        return v

    def scaled(self, boot: float = 1.0, drift: float = 1.0, spread: float = 1.0) -> NoiseModel:
        """The same model with the boot effect / the drift / the run spread scaled (what-if cases)."""
        fits = [MetricFit(f.mu, f.sb * boot, f.sa * drift, f.phi, f.se * spread, f.sb_fitted, f.loglik)
                for f in self.fits]
        return replace(self, fits=fits)

    def with_boot_sd(self, fraction: float) -> NoiseModel:
        """The same model with each metric's boot SD set to `fraction` x its within-boot SD (a stated prior
        where the data cannot estimate it)."""
        fits = [MetricFit(f.mu, fraction * f.within_sd, f.sa, f.phi, f.se, False, f.loglik) for f in self.fits]
        return replace(self, fits=fits)


def impute_censored(ys: Sequence[np.ndarray], cens: Sequence[np.ndarray], ts: Sequence[np.ndarray],
                    sb_prior: float, rounds: int = 2, upper: Sequence[np.ndarray] | None = None
                    ) -> tuple[list[np.ndarray], MetricFit]:
    """Runs whose percentile is beyond the histogram are known only to be >= log H (they are at log H in ys),
    and at most `upper` (the run's log max, which cyclictest reports even beyond the histogram).
    Tobit-style approximation: fit, replace each censored value by its conditional mean above log H under the
    fit's marginal normal (mu, total SD), kept within [log H, upper] and within 2 SDs of the first fit above
    log H (a few runs, one of them wild, must not feed on themselves), refit; two rounds. (The conditional
    variance is not added back, so the spread of a heavily censored metric is still somewhat underestimated.)"""
    cur = [np.asarray(y, float).copy() for y in ys]
    fit = fit_metric(cur, ts, sb_prior=sb_prior)
    if not any(np.any(c) for c in cens):
        return cur, fit
    reach = 2.0 * max(fit.total_sd, SD_FLOOR)
    for _ in range(rounds):
        sd = max(fit.total_sd, SD_FLOOR)
        tops = [np.minimum(t, np.asarray(y0) + reach) for t, y0 in zip(
            upper if upper is not None else [np.full(len(y), np.inf) for y in ys], ys, strict=True)]
        for y, y0, c, top in zip(cur, ys, cens, tops, strict=True):
            if not np.any(c):
                continue
            a = (y0[c] - fit.mu) / sd
            pdf = np.exp(-0.5 * a * a) / math.sqrt(2 * math.pi)
            tail = np.array([0.5 * math.erfc(v / math.sqrt(2)) for v in a])
            y[c] = np.clip(fit.mu + sd * pdf / np.maximum(tail, 1e-12), y0[c], np.maximum(top[c], y0[c]))
        fit = fit_metric(cur, ts, sb_prior=sb_prior)
    return cur, fit


def fit_model(series_by_metric: dict[str, list[np.ndarray]], ts: list[np.ndarray], run_s: float,
              sb_prior: float = 0.0, spacing_s: float = 1.0, histogram_us: float = math.inf,
              censored: dict[str, list[np.ndarray]] | None = None,
              upper: dict[str, list[np.ndarray]] | None = None) -> NoiseModel:
    names = tuple(series_by_metric)
    filled: dict[str, list[np.ndarray]] = {}
    fits = []
    note = []
    for m in names:
        cens = (censored or {}).get(m) or [np.zeros(len(y), bool) for y in series_by_metric[m]]
        filled[m], f = impute_censored(series_by_metric[m], cens, ts, sb_prior, upper=(upper or {}).get(m))
        fits.append(f)
        n_c = int(sum(int(np.sum(c)) for c in cens))
        if n_c:
            note.append(f"{m}: {n_c} of {sum(len(y) for y in series_by_metric[m])} runs beyond the histogram "
                        f"({histogram_us:g} us), imputed at their conditional mean above it (Tobit-style, at "
                        "most the run's max)")
    ra, re = cross_corr([filled[m] for m in names], fits)
    if len(ts) < 2:
        note.append(f"one boot: the boot-to-boot effect is not estimable; sb fixed at the prior {sb_prior:g}")
    return NoiseModel(names, fits, ra, re, ra.copy(), run_s, note, spacing_s, spacing_s, histogram_us)
