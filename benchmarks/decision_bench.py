"""How often does the keep/rollback rule decide wrongly, and how much measuring time does it use?

    python benchmarks/decision_bench.py [--trials N] [--fixed-trials N] [--seed S] [--data DIR] [--what-if H:S,...]

Data. Recorded cyclictest runs (`--json` output, one file per run): the lab's
`tests/recorded/cyclictest/lab/guest-stress-*.json` once that folder has at least 8 of them, else
`benchmarks/data/local-x86/run*.json`
(see the README there for how they were recorded). Both are real measurements; nothing is invented.

Model (fitted to the recorded runs, nonparametric, two levels):
  - between runs: a simulated 10 s segment picks one recorded run at random, so the run-to-run spread
    (drift and bursts of the recording included) is exactly the recorded one;
  - within a run: the body (values below the tail start) and the number of tail samples ("spikes",
    overflows included) are a multinomial draw of the recorded size from that run's histogram; each tail
    sample is one of that run's own tail samples with log-normal jitter (a smoothed bootstrap: Gaussian
    kernel on log(size), Silverman bandwidth capped at 0.1), so long runs see spikes between and beyond the
    recorded ones instead of repeating the recorded maximum. The tail starts at the pooled p99.9 of all
    recorded samples. Overflow samples are known only by count and by the run's max: one is the max, the
    others are put at the histogram size (the lower bound, as the rule itself does).
  A run of duration D is D / (recorded run length) independent segments: the model for long runs, compared
  with real long runs when `long*.json` files are present ("model check"; not used in the fit).
  Drawing the recorded runs' samples again adds their sampling noise a second time, so simulated runs are a
  little noisier than real ones; this handicaps every method alike.

Effects. "After" runs get a true effect e on the latency tail: every value v above m0 (the median run-level
p50) is stretched, v -> m0 + (v - m0) * s, with s chosen so the population median of the run-level p99.9 (the
rule's estimand) changes by exactly e. The body (below the median) is untouched; p99 and max move by the
printed amounts. The same base draws serve every effect (common random numbers).

What counts as wrong (on the action taken, i.e. after the inconclusive policy): keeping a change whose true
effect on p99.9 is >= 0 (no improvement or a regression); rolling back a change whose true effect is an
improvement of at least the minimum relevant effect (e <= -min_effect). Between -min_effect and 0 neither
action is wrong (no such effect is simulated).

Baselines (fixed length, rteval-style): one long run of T seconds per side, then
  - "rteval max": keep iff max(after) < (1 - tau) * max(before) (tau = 0 is how it is done in practice);
  - "fixed p99.9": the same on the p99.9 of the one long run.
Each baseline is also given its best threshold tau in hindsight (the one minimising its worst wrong rate over
the effects, chosen knowing the simulated truth, which no real procedure can), and T* is the shortest T whose
worst wrong rate is <= the rule's worst wrong rate ("the same max error"); the time ratio is the rule's mean
measuring time / 2 T*. A second view holds fixed p99.9 to the rule's false-keep rate (again with the
threshold set from the simulated truth) and shows its wrong rollbacks. A what-if table repeats the
comparison with the run-to-run heterogeneity shrunk and with longer runs, to show what a calmer target needs.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from orchestrator.config.playbook import load_decision_rule
from orchestrator.measure.model import CyclictestSettings, LatencyResult, LatencyStats
from orchestrator.measure.parse import parse_cyclictest_file
from orchestrator.measure.runner import parse_duration
from orchestrator.stats.decide import DecisionRule, SequentialDecision

LAB = REPO / "tests" / "recorded" / "cyclictest" / "lab"
LOCAL = REPO / "benchmarks" / "data" / "local-x86"
PLAYBOOK = REPO / "playbooks" / "measurement.yaml"
MIN_RUNS = 8  # recorded runs needed to fit the between-run spread at all
LAB_PATTERN = "guest-stress-*.json"  # one condition only: runs under the same load
EFFECTS = (-0.30, -0.10, 0.0, 0.10, 0.30)
FIXED_T = (10, 30, 60, 120, 300, 600, 1200, 1800, 3600)  # seconds per side
TAUS = (0.0, 0.02, 0.05, 0.10, 0.20, 0.30, 0.50)
QS = {"p50_us": 0.50, "p90_us": 0.90, "p99_us": 0.99, "p999_us": 0.999, "p9999_us": 0.9999}


@dataclass
class Recorded:
    name: str
    values: np.ndarray  # bucket values (us), overflow pseudo-values included
    counts: np.ndarray
    overflows: int
    max_us: int
    hist_size: int
    interval_us: int
    samples: int
    duration_s: float  # from -D (a late target runs fewer cycles than duration / interval)


def load_json_run(path: Path) -> Recorded:
    """One recorded run through the project's parser (all threads pooled, as `LatencyResult.all`)."""
    res = parse_cyclictest_file(path)
    stats = res.all
    if not stats.histogram:
        raise SystemExit(f"{path}: the run has no histogram (record with -h N --json=FILE)")
    doc = json.loads(path.read_text())
    cmd = doc.get("cmdline:") or doc.get("cmdline") or ""
    m = re.search(r"(?:\s-h\s*|--histogram[= ]?)(\d+)", cmd)
    i = re.search(r"(?:\s-i\s*|--interval[= ]?)(\d+)", cmd)
    dur = re.search(r"(?:\s-D\s*|--duration[= ]?)(\d+(?:\.\d+)?(?:ms|s|m|h)?)(?:\s|$)", cmd)
    size = int(m.group(1)) if m else max(stats.histogram) + 1
    vals = sorted(stats.histogram)
    counts = [stats.histogram[v] for v in vals]
    mx = stats.max_us if stats.max_us is not None else size
    if stats.overflows > 0:  # known only by count and max: one at the max, the others at the histogram size
        vals += [size, max(mx, size)] if stats.overflows > 1 else [max(mx, size)]
        counts += [stats.overflows - 1, 1] if stats.overflows > 1 else [1]
    interval = int(i.group(1)) if i else 1000
    seconds = parse_duration(dur.group(1)) if dur else stats.samples * interval / 1e6
    return Recorded(path.name, np.asarray(vals, float), np.asarray(counts, float), stats.overflows, mx, size,
                    interval, stats.samples, seconds)


class Population:
    """The fitted two-level model: per-run body histograms, tail rates and tail sizes (smoothed)."""

    def __init__(self, runs: list[Recorded], tail_from_us: float | None = None, heterogeneity: float = 1.0):
        self.runs = runs
        self.heterogeneity = heterogeneity
        self.hist_size = min(r.hist_size for r in runs)
        if tail_from_us is None:  # the pooled p99.9 of all recorded samples: the tail is smoothed from there on
            allv = np.concatenate([r.values for r in runs])
            allc = np.concatenate([r.counts for r in runs])
            order = np.argsort(allv, kind="stable")
            cum = np.cumsum(allc[order])
            tail_from_us = float(allv[order][np.searchsorted(cum, 0.999 * cum[-1])])
        self.u = float(tail_from_us)
        self.grid = np.unique(np.concatenate([r.values[r.values < self.u] for r in runs]))
        # P[j]: run j's probabilities over the body grid, last column = "a tail sample >= u"
        self.P = np.zeros((len(runs), len(self.grid) + 1))
        self.tails: list[np.ndarray] = []  # per run: log(size - u + 1) of its tail samples (overflows included)
        for j, r in enumerate(runs):
            body = r.values < self.u
            np.add.at(self.P[j], np.searchsorted(self.grid, r.values[body]), r.counts[body])
            self.P[j, -1] = r.counts[~body].sum()
            sizes = np.repeat(np.where(r.values[~body] < r.hist_size, r.values[~body] + 0.5, r.values[~body]),
                              r.counts[~body].astype(int))
            self.tails.append(np.log(sizes - self.u + 1.0))
        self.pooled_tail = np.concatenate(self.tails)
        self.n = np.array([r.samples for r in runs])
        self.spike_rate = self.P[:, -1] / self.n
        pooled = self.P.sum(axis=0) / self.P.sum()
        self.P /= self.P.sum(axis=1, keepdims=True)
        # heterogeneity < 1 shrinks every run toward the pooled distribution (tail sizes then come from the
        # pooled tail): a what-if for calmer targets
        self.P = heterogeneity * self.P + (1.0 - heterogeneity) * pooled
        lt = self.pooled_tail
        sd = float(np.std(lt))
        iqr = float(np.subtract(*np.percentile(lt, [75, 25])))
        # Silverman's rule, capped at 0.1 (+-10%): a multimodal tail (here a cluster near 4 ms on top of a
        # decaying part) makes the rule oversmooth; the smoothing is there to avoid repeating recorded values
        self.bandwidth = min(0.1, 0.9 * min(sd, iqr / 1.34 if iqr > 0 else sd) * len(lt) ** -0.2)
        self.seg_s = float(np.median([r.duration_s for r in runs]))
        self.seg_n = round(float(np.median(self.n)))
        self.interval_us = runs[0].interval_us

    def draw(self, rng: np.random.Generator, duration_s: float) -> tuple[np.ndarray, np.ndarray]:
        """(body counts over the grid, tail values) for one simulated run of `duration_s`."""
        segs = max(1, round(duration_s / self.seg_s))
        n_seg = self.seg_n if duration_s >= self.seg_s else max(1, round(self.seg_n * duration_s / self.seg_s))
        picks = np.bincount(rng.integers(0, len(self.runs), size=segs), minlength=len(self.runs))
        out = np.zeros(len(self.grid) + 1)
        logs = []
        for j in np.nonzero(picks)[0]:
            c = rng.multinomial(int(picks[j]) * n_seg, self.P[j])
            out += c
            k = int(c[-1])
            pool = self.tails[j] if self.heterogeneity >= 1.0 or not k else self.pooled_tail
            if k:
                logs.append(pool[rng.integers(0, len(pool), size=k)])
        if not logs:
            return out[:-1], np.empty(0)
        lg = np.concatenate(logs)
        return out[:-1], np.sort(self.u - 1.0 + np.exp(lg + rng.normal(0, self.bandwidth, len(lg))))


class Effect:
    """Tail stretch above m0 such that the population median of run-level p99.9 moves by exactly e."""

    def __init__(self, grid: np.ndarray, m0: float, p999: float, e: float, hist_size: int):
        self.e = e
        self.m0 = m0
        self.s = 1.0 + e * p999 / (p999 - m0)
        self.values = self.apply(grid + 0.5)
        self.hist_size = hist_size

    def apply(self, cont: np.ndarray) -> np.ndarray:
        return np.floor(np.where(cont > self.m0, self.m0 + (cont - self.m0) * self.s, cont))


def metrics(run: tuple[np.ndarray, np.ndarray], eff: Effect) -> dict[str, float | None]:
    """Exact run-level figures of one simulated run, as cyclictest's histogram would give them."""
    counts, spikes = run
    v = eff.values
    sv = eff.apply(spikes)  # sorted, all above the body
    nb = counts.sum()
    n = nb + len(sv)
    cum = np.cumsum(counts)
    out: dict[str, float | None] = {}
    for name, q in QS.items():
        rank = math.ceil(q * n - 1e-9)
        if rank <= nb:
            val = v[int(np.searchsorted(cum, rank))]
        else:
            val = sv[rank - int(nb) - 1]
        out[name] = None if val >= eff.hist_size else val
    nz = np.nonzero(counts)[0]
    out["max_us"] = sv[-1] if len(sv) else v[nz[-1]]
    out["min_us"] = v[nz[0]] if len(nz) else sv[0]
    out["avg_us"] = float(((counts * v).sum() + sv.sum()) / n)
    out["overflows"] = float(counts[v >= eff.hist_size].sum() + np.count_nonzero(sv >= eff.hist_size))
    out["samples"] = float(n)
    return out


def recorded_metrics(r: Recorded) -> dict[str, float | None]:
    """The same figures for a recorded run, straight from its histogram (overflows stay censored)."""
    ident = Effect(r.values, 0.0, 2.0, 0.0, r.hist_size)
    ident.values = r.values.copy()
    return metrics((r.counts, np.empty(0)), ident)


def to_result(m: dict[str, float | None], settings: CyclictestSettings) -> LatencyResult:
    ints = {k: (None if m[k] is None else int(m[k])) for k in (*QS, "max_us", "min_us")}
    stats = LatencyStats(samples=int(m["samples"]), avg_us=m["avg_us"], overflows=int(m["overflows"]), **ints)
    return LatencyResult(form="json", threads=[stats.model_copy(update={"thread": 0})], all=stats,
                         settings=settings, duration_s=settings.duration_s)


def lb(x: float | None, h: int) -> float:
    return float(h) if x is None else max(float(x), 1.0)


def run_rule(pop: Population, effects: list[Effect], rule: DecisionRule, trials: int, seed: int) -> dict:
    settings = CyclictestSettings(duration_s=rule.run_duration_s, histogram_us=pop.hist_size,
                                  interval_us=pop.interval_us)
    res = {e.e: {"action": [], "verdict": [], "runs": [], "time": []} for e in effects}
    for t in range(trials):
        rng = np.random.default_rng([seed, 1, t])
        pools = {s: [pop.draw(rng, rule.run_duration_s) for _ in range(rule.k_max)] for s in ("before", "after")}
        r = rule.model_copy(update={"seed": seed * 100003 + t})
        for eff in effects:
            seq = SequentialDecision(r)
            used = {"before": 0, "after": 0}
            while (side := seq.next_side()) is not None:
                counts = pools[side][used[side]]
                used[side] += 1
                m = metrics(counts, effects[EFFECTS.index(0.0)] if side == "before" else eff)
                seq.add(side, to_result(m, settings))
            d = seq.decision
            res[eff.e]["action"].append(d.action)
            res[eff.e]["verdict"].append(d.verdict)
            res[eff.e]["runs"].append(d.runs_before + d.runs_after)
            res[eff.e]["time"].append(d.measuring_time_s)
    return res


def run_fixed(pop: Population, effects: list[Effect], T: float, trials: int, seed: int) -> dict:
    """Per effect: arrays of (after/before - 1) for max and for p99.9 of one long run per side."""
    zero = effects[EFFECTS.index(0.0)]
    out = {e.e: {"max": np.empty(trials), "p999": np.empty(trials)} for e in effects}
    for t in range(trials):
        rng = np.random.default_rng([seed, 2, int(T), t])
        b, a = pop.draw(rng, T), pop.draw(rng, T)
        mb = metrics(b, zero)
        for eff in effects:
            ma = metrics(a, eff)
            out[eff.e]["max"][t] = ma["max_us"] / max(mb["max_us"], 1.0) - 1
            out[eff.e]["p999"][t] = lb(ma["p999_us"], pop.hist_size) / lb(mb["p999_us"], pop.hist_size) - 1
    return out


def wrong(e: float, action: str, eps: float) -> bool:
    return (action == "keep" and e >= 0) or (action == "rollback" and e <= -eps)


def fixed_rates(diffs: dict, metric: str, eps: float) -> tuple[float, float, dict]:
    """Best tau in hindsight: (tau, worst wrong rate, per-effect keep rate)."""
    best = None
    for tau in TAUS:
        keep = {e: float(np.mean(d[metric] < -tau)) for e, d in diffs.items()}
        worst = max((keep[e] if e >= 0 else (1 - keep[e]) if e <= -eps else 0.0) for e in keep)
        if best is None or worst < best[1] - 1e-12:
            best = (tau, worst, keep)
    return best


@dataclass
class Scenario:
    pop: Population
    rule: DecisionRule
    effects: list[Effect]
    med: dict[str, float]
    spread: dict[str, float]
    guard_truth: dict[float, tuple[float, float]]


def scenario(pop: Population, rule: DecisionRule, seed: int) -> Scenario:
    """Pilot of 2000 simulated runs: the population medians that define the true effects."""
    rng = np.random.default_rng([seed, 0])
    ident = Effect(pop.grid, 0.0, 2.0, 0.0, pop.hist_size)
    pilot = [metrics(pop.draw(rng, rule.run_duration_s), ident) for _ in range(2000)]
    keys = ("p50_us", "p99_us", "p999_us", "max_us")
    med = {k: float(np.median([lb(p[k], pop.hist_size) for p in pilot])) for k in keys}
    spread = {k: float(np.std(np.log([lb(p[k], pop.hist_size) for p in pilot]))) for k in keys}
    m0, p999 = med["p50_us"], med["p999_us"]
    effects = [Effect(pop.grid, m0, p999, e, pop.hist_size) for e in EFFECTS]

    def moved(k: str, eff: Effect) -> float:
        v = med[k]
        return (m0 + (v + 0.5 - m0) * eff.s) / (v + 0.5) - 1 if v > m0 else 0.0

    truth = {eff.e: (moved("p99_us", eff), moved("max_us", eff)) for eff in effects}
    return Scenario(pop, rule, effects, med, spread, truth)


def evaluate(sc: Scenario, trials: int, fixed_trials: int, seed: int, fixed_t=FIXED_T) -> dict:
    eps = sc.rule.min_effect
    ours = run_rule(sc.pop, sc.effects, sc.rule, trials, seed)
    out = {"ours": ours}
    out["wrong"] = {e: float(np.mean([wrong(e, a, eps) for a in ours[e]["action"]])) for e in EFFECTS}
    out["worst"] = max(out["wrong"].values())
    out["false_keep"] = max(out["wrong"][e] for e in EFFECTS if e >= 0)
    out["time"] = {e: float(np.mean(ours[e]["time"])) for e in EFFECTS}
    out["mean_time"] = float(np.mean(list(out["time"].values())))
    cal = {}
    for T in fixed_t:
        diffs = run_fixed(sc.pop, sc.effects, T, fixed_trials, seed)
        cal[T] = {"max": fixed_rates(diffs, "max", eps), "p999": fixed_rates(diffs, "p999", eps),
                  "safe": at_safety(diffs, "p999", eps, max(out["false_keep"], 1.0 / fixed_trials)),
                  "max0": max(float(np.mean(d["max"] < 0)) if e >= 0 else float(np.mean(d["max"] >= 0))
                              for e, d in diffs.items() if e >= 0 or e <= -eps)}
    out["cal"] = cal
    for metric in ("max", "p999"):
        hit = [T for T in fixed_t if cal[T][metric][1] <= out["worst"] + 1e-12]
        out[f"T_{metric}"] = (hit[0], True) if hit else (fixed_t[-1], False)
    return out


def at_safety(diffs: dict, metric: str, eps: float, false_keep: float) -> tuple[float, dict]:
    """Threshold that keeps the false-keep rate <= `false_keep` for every e >= 0; its keep rate per effect."""
    tau = max(-float(np.quantile(d[metric], false_keep)) for e, d in diffs.items() if e >= 0)
    return tau, {e: float(np.mean(d[metric] < -tau)) for e, d in diffs.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=300, help="simulated decisions per effect (default 300)")
    ap.add_argument("--fixed-trials", type=int, default=300, help="baseline comparisons per effect and length")
    ap.add_argument("--seed", type=int, default=20261125)
    ap.add_argument("--data", type=Path, default=None, help="folder of recorded cyclictest --json runs")
    ap.add_argument("--pattern", default=None, help="file name pattern of the runs to fit (one load condition)")
    ap.add_argument("--playbook", type=Path, default=PLAYBOOK, help="measurement plan whose decision rule is judged")
    ap.add_argument("--what-if", type=str, default="1:60,0.25:0,0:0",
                    help="heterogeneity:run-seconds cases for the what-if table (0 s = the rule's; '' to skip)")
    args = ap.parse_args(argv)
    t0 = time.process_time()

    lab_files = sorted(LAB.glob(LAB_PATTERN)) if LAB.is_dir() else []
    note = ""
    if args.data:
        folder = args.data
    elif len(lab_files) >= MIN_RUNS:
        folder = LAB
    else:
        folder = LOCAL
        if lab_files:
            note = (f" (the lab folder `{LAB.relative_to(REPO)}` has only {len(lab_files)} runs so far; it is used "
                    f"from {MIN_RUNS} on)")
    pattern = args.pattern or (LAB_PATTERN if folder == LAB else "run*.json")
    files = sorted(folder.glob(pattern))
    runs = [load_json_run(p) for p in files]
    if len(runs) < MIN_RUNS:
        print(f"need at least {MIN_RUNS} recorded runs in {folder}, found {len(runs)}", file=sys.stderr)
        return 2
    longs = [load_json_run(p) for p in sorted(folder.glob("long*.json"))]
    rule = load_decision_rule(args.playbook)
    eps = rule.min_effect
    pop = Population(runs)
    sc = scenario(pop, rule, args.seed)

    where = folder.relative_to(REPO) if folder.is_relative_to(REPO) else folder
    print("## Decision benchmark\n")
    print(f"`python benchmarks/decision_bench.py` (seed {args.seed}; {args.trials} simulated decisions per effect "
          f"for the rule, {args.fixed_trials} per effect and length for each baseline).\n")
    print(f"Data: {len(runs)} recorded cyclictest runs `{where}/{pattern}` ({pop.seg_s:g} s each, {pop.seg_n} samples "
          f"at {pop.interval_us} us, histogram {pop.hist_size} us, {sum(r.overflows > 0 for r in runs)} runs with "
          f"overflows){note}.\n")
    print("Fitted model: median and log-SD across runs, recorded vs simulated runs of "
          f"{rule.run_duration_s:g} s:\n")
    print("| metric | recorded median (us) | recorded log-SD | simulated median (us) | simulated log-SD |")
    print("|---|---|---|---|---|")
    rec = {k: [lb(recorded_metrics(r)[k], r.hist_size) for r in runs] for k in ("p99_us", "p999_us", "max_us")}
    for k, vals in rec.items():
        print(f"| {k} | {np.median(vals):g} | {np.std(np.log(vals)):.2f} | {sc.med[k]:g} | "
              f"{sc.spread[k]:.2f} |")
    print(f"\nTail (samples >= {pop.u:g} us, the pooled p99.9): per-run rate median "
          f"{np.median(pop.spike_rate) * 1e4:.2f} per 10^4 samples (range {pop.spike_rate.min() * 1e4:.2f}.."
          f"{pop.spike_rate.max() * 1e4:.2f}); sizes: each run's own {len(pop.pooled_tail)} recorded tail samples "
          f"in all, jittered on log(size - {pop.u - 1:g} us) with bandwidth {pop.bandwidth:.3f}.")
    if longs:
        rng = np.random.default_rng([args.seed, 9])
        ident = Effect(pop.grid, 0.0, 2.0, 0.0, pop.hist_size)
        sim = [metrics(pop.draw(rng, longs[0].duration_s), ident) for _ in range(1000)]
        real = [recorded_metrics(r) for r in longs]
        print(f"\nModel check against {len(longs)} real runs of {longs[0].duration_s:.0f} s (not used in the fit), "
              "median / log-SD: " + "; ".join(
                  f"{k} real {np.median([lb(m[k], pop.hist_size) for m in real]):g} / "
                  f"{np.std(np.log([lb(m[k], pop.hist_size) for m in real])):.2f}, simulated "
                  f"{np.median([lb(m[k], pop.hist_size) for m in sim]):g} / "
                  f"{np.std(np.log([lb(m[k], pop.hist_size) for m in sim])):.2f}" for k in ("p999_us", "max_us")))
    print(f"\nEffects: values above m0 = {sc.med['p50_us']:g} us (median p50) stretched so the median run-level "
          f"p99.9 ({sc.med['p999_us']:g} us) moves by e; p99 and max then move by:\n")
    print("| e on p99.9 | stretch | p99 | max |")
    print("|---|---|---|---|")
    for eff in sc.effects:
        g = sc.guard_truth[eff.e]
        print(f"| {eff.e:+.0%} | {eff.s:.3f} | {g[0]:+.1%} | {g[1]:+.1%} |")
    print(f"\nRule (`decision:` of `{args.playbook.name}`): `{rule.model_dump_json()}`\n")
    print(f"Wrong = keep when e >= 0, or rollback when e <= -{eps:.0%} (the action after the inconclusive policy).\n")

    res = evaluate(sc, args.trials, args.fixed_trials, args.seed)
    cal = res["cal"]
    print("Baselines, one long run per side. Best threshold tau in hindsight and the worst wrong rate over the "
          f"effects; last columns: fixed p99.9 held to the rule's false-keep rate ({res['false_keep']:.1%}), "
          "its wrong rollbacks:\n")
    print("| T per side (s) | rteval max, tau = 0 (as practiced): worst wrong | rteval max: best tau | worst wrong | "
          "fixed p99.9: best tau | worst wrong | fixed p99.9 at equal false keeps: wrong at -30% / -10% |")
    print("|---|---|---|---|---|---|---|")
    for T in FIXED_T:
        keep_safe = cal[T]["safe"][1]
        print(f"| {T} | {cal[T]['max0']:.1%} | {cal[T]['max'][0]:.2f} | {cal[T]['max'][1]:.1%} | "
              f"{cal[T]['p999'][0]:.2f} | "
              f"{cal[T]['p999'][1]:.1%} | {1 - keep_safe[-0.30]:.0%} / {1 - keep_safe[-0.10]:.0%} |")
    (t_max, ok_max), (t_p, ok_p) = res["T_max"], res["T_p999"]
    t_same = min(FIXED_T, key=lambda T: abs(2 * T - res["mean_time"]))
    print(f"\nThe rule, and the baselines at the rule's mean measuring time (T = {t_same} s per side):\n")
    print("| e on p99.9 | wrong if | rule: keep / rollback / inconclusive | rule wrong | rule runs (both sides) | "
          f"rule time (s) | rteval max (best tau) @{t_same} s: keep | wrong | "
          f"fixed p99.9 (best tau) @{t_same} s: keep | "
          "wrong |")
    print("|---|---|---|---|---|---|---|---|---|---|")

    def keep_wrong(T: int, metric: str, e: float) -> tuple[float, float]:
        k = cal[T][metric][2][e]
        return k, (k if e >= 0 else (1 - k) if e <= -eps else 0.0)

    for e in EFFECTS:
        verds = res["ours"][e]["verdict"]
        shares = " / ".join(f"{np.mean([v == x for v in verds]):.0%}" for x in ("keep", "rollback", "inconclusive"))
        km, wm = keep_wrong(t_same, "max", e)
        kp, wp = keep_wrong(t_same, "p999", e)
        wrong_if = "keep" if e >= 0 else "rollback" if e <= -eps else "never"
        print(f"| {e:+.0%} | {wrong_if} | {shares} | {res['wrong'][e]:.1%} | {np.mean(res['ours'][e]['runs']):.1f} | "
              f"{res['time'][e]:.0f} | {km:.0%} | {wm:.1%} | {kp:.0%} | {wp:.1%} |")
    print(f"| **worst / mean** | | | **{res['worst']:.1%}** | | **{res['mean_time']:.0f}** | | "
          f"**{cal[t_same]['max'][1]:.1%}** | | **{cal[t_same]['p999'][1]:.1%}** |")

    def same_error(name: str, T: int, ok: bool) -> str:
        if not ok:
            return (f"{name} does not reach it within {T} s per side (worst wrong there "
                    f"{cal[T]['max' if 'max' in name else 'p999'][1]:.1%}): time ratio rule / {name} < "
                    f"{res['mean_time'] / (2 * T):.2f}")
        return f"{name} needs T* = {T} s per side: time ratio rule / {name} = {res['mean_time'] / (2 * T):.2f}"

    print(f"\nSame max error as the rule ({res['worst']:.1%}): {same_error('rteval max', t_max, ok_max)}; "
          f"{same_error('fixed p99.9', t_p, ok_p)}. Measuring time only: switching the change on and off is not "
          "counted for any method.")
    ratio = res["mean_time"] / (2 * t_p)
    met = res["worst"] <= 0.05 and ok_p and ratio <= 1 / 3
    print(f"\nGoal (<= 5% wrong decisions with <= 1/3 of the fixed-length time): {'met' if met else 'NOT met'} on "
          f"this data: the rule's worst wrong rate is {res['worst']:.1%} (false keeps at most "
          f"{res['false_keep']:.1%}), its mean time {res['mean_time']:.0f} s is {ratio:.2f} of the fixed p99.9 "
          "time at the same max error.")

    cases = [tuple(float(v) for v in c.split(":")) for c in args.what_if.split(",") if c.strip()]
    if cases:
        print("\nWhat if the target were calmer (every recorded run's distribution shrunk toward the pooled one: "
              "heterogeneity 1 = as recorded, 0 = runs differ only by sampling) or the runs longer; same rule "
              f"otherwise, {max(args.trials // 2, 20)} decisions per effect:\n")
        print("| heterogeneity | run (s) | run p99.9 log-SD | rule wrong at -30% / -10% / 0% | "
              "rule false keeps (worst) | "
              "rule mean time (s) | fixed p99.9: T* per side for the same max error | time ratio |")
        print("|---|---|---|---|---|---|---|---|")
        for lam, dur in cases:
            dur = dur or rule.run_duration_s
            rule2 = rule.model_copy(update={"run_duration_s": dur})
            sc2 = scenario(Population(runs, heterogeneity=lam), rule2, args.seed)
            grid = tuple(T for T in FIXED_T if T >= dur)
            r2 = evaluate(sc2, max(args.trials // 2, 20), max(args.fixed_trials // 2, 20), args.seed, fixed_t=grid)
            T2, ok2 = r2["T_p999"]
            fk = max(r2["wrong"][e] for e in EFFECTS if e >= 0)
            w = " / ".join(f"{r2['wrong'][e]:.0%}" for e in (-0.30, -0.10, 0.0))
            print(f"| {lam:g} | {dur:g} | {sc2.spread['p999_us']:.2f} | {w} | {fk:.1%} | {r2['mean_time']:.0f} | "
                  f"{'' if ok2 else '> '}{T2} (worst wrong {r2['cal'][T2]['p999'][1]:.0%}) | "
                  f"{'' if ok2 else '< '}{r2['mean_time'] / (2 * T2):.2f} |")
    print(f"\nCPU time: {time.process_time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
