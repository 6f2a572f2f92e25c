"""How often does a keep/rollback rule decide wrongly, and how much measuring time does it use?

    python benchmarks/decision_bench.py [--data DIR] [--trials N] [--fixed-trials N] [--boot-trials N] [--seed S]
        [--playbook FILE] [--boot-sd-prior SD] [--what-if-sd SD] [--quick] [--json]

Data. A folder of recorded runs (`runNN.json`: LatencyResult JSON as `orchestrator.measure.runner.measure()`
writes it, or cyclictest's own `--json`), boots taken from `boot_id` or the subfolder. Default: the lab
recording `tests/recorded/noise-lab-x86` once it holds >= 30 runs across >= 3 boots, else the
development-machine series `benchmarks/data/local-x86` (40 consecutive 10 s runs, one boot: the boot effect
is then not estimable and is set to the prior `--boot-sd-prior`, 0 unless told, and labelled so).

Model (benchmarks/decision/model.py): run-level log p99, log p99.9 and log max, each = mean + boot offset
(random per boot) + AR(1) drift between consecutive runs + independent run-level spread, fitted by REML per
metric; the components correlated across the three metrics (drift from lag-1 cross-covariances, run spread
from what is left at lag 0; boots like the drift), so the guards move with the primary as recorded.
Percentiles beyond the histogram are imputed for the fit (Tobit-style) and censored again in the simulation, as
cyclictest's overflows are. The drift's phi is per the recording's run spacing and rescaled (an
Ornstein-Uhlenbeck process) to the spacing of back-to-back runs (measure()'s wall time per run). Printed:
the fitted parameters and, as a check, the recorded series' lag-1 autocorrelation, halves' ratio and spread
next to the same figures of series simulated from the fit (where the recorded figure falls among them).
When the data is the lab's, the development-machine series is fitted and checked too.

Effects. An "after" run's values get a true effect e on the median run-level p99.9: the tail above the median
p50 is stretched so that p99.9 moves by exactly e; p99 and max move by what that stretch does to their medians
(printed). Effects -30%, -10%, 0, +10%; the same simulated noise serves every effect and rule (common random
numbers). Times are runs x the recorded run length (switching a change on and off, reboots, not counted).

Rules, in one run:
  - new: the rule in orchestrator/stats as committed now, driven through its own API (`SequentialDecision`);
  - old: orchestrator/stats/decide.py at commit 61f7220, its decision logic frozen in benchmarks/decision/rules.py
    (checked against that commit's code by tests/unit/test_decision_bench.py);
  - fixed: a fixed-length design, n runs per side (ABBA) and one one-sided Mann-Whitney test at 5%, n sized
    for 95% power at -10% (interpolated, see below).
Reference of equal error: for each rule, the fixed design at the rule's false-keep rate at 0 (as its one-sided
level, floored at 0.5%, capped at 5%) with the rule's power at -10%; its n per side is interpolated between
the simulated n = 1..n_max, linearly in (sqrt n, probit power), extrapolated on that line beyond n_max
(flagged). time_ratio = the rule's mean time (the mean of its expected times at 0 and at -10%) / 2 n x run.

Wrong: a keep at e >= 0 (false keep at 0; keep at +10%); a rollback at e <= -min_effect (= 1 - power at -10%
and -30%: under `inconclusive: rollback` every non-keep is a rollback). Goals (issue #18): false keeps <= 5%
at 0, power >= 95% at -10%, mean time <= 0.35 of the fixed-length time of equal error.

Boot changes: runs grouped by boot, order blocked, a new boot at every side switch (and whenever the rule asks
for one), the fitted boot effect present: the old rule treats all runs of a side as independent
(pseudo-replication); the new one summarises each boot to one value with its boots per side.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.decision.data import LABEL, METRICS, Series, load_series, pooled_lag1, run_files, series_figures
from benchmarks.decision.model import NoiseModel, fit_model
from benchmarks.decision.newrule import new_rule_factory
from benchmarks.decision.rules import OldRule
from benchmarks.decision.sim import Effects, fixed_curves, fixed_row, run_rule, summarise

LAB = REPO / "tests" / "recorded" / "noise-lab-x86"
LOCAL = REPO / "benchmarks" / "data" / "local-x86"
MIN_RUNS, MIN_BOOTS = 30, 3
GOALS = {"false_keep_0": ("<=", 0.05), "power_m10": (">=", 0.95), "time_ratio": ("<=", 0.35)}


def choose_data(arg: Path | None) -> tuple[Path, str]:
    if arg is not None:
        return arg, "given with --data"
    if LAB.is_dir() and run_files(LAB):
        s = load_series(LAB)
        if s.n_runs >= MIN_RUNS and len(s.boots) >= MIN_BOOTS:
            return LAB, f"the lab recording ({s.n_runs} runs, {len(s.boots)} boots)"
        return LOCAL, (f"the lab recording `{LAB.relative_to(REPO)}` has {s.n_runs} runs in {len(s.boots)} "
                       f"boot(s) so far (used from {MIN_RUNS} runs across {MIN_BOOTS} boots on)")
    return LOCAL, f"no lab recording at `{LAB.relative_to(REPO)}` yet"


def fit(series: Series, sb_prior: float) -> NoiseModel:
    return fit_model({m: series.logs(m) for m in METRICS}, series.spacing(), series.run_s, sb_prior=sb_prior,
                     spacing_s=series.spacing_s, histogram_us=series.histogram_us,
                     censored={m: series.censored(m) for m in METRICS},
                     upper={m: series.upper(m) for m in METRICS})


def check_model(series: Series, model: NoiseModel, seed: int, sims: int) -> dict[str, dict[str, Any]]:
    """Recorded figures per metric vs the same figures of `sims` simulated recordings of the same shape
    (boots and runs per boot): median and 5..95% of the simulated, and the recorded one's percentile."""
    rng = np.random.default_rng([seed, 5])
    sizes = [len(b) for b in series.boots.values()]
    # per boot: (sims, n, k), as recorded: whole us, percentiles censored at the histogram size
    sim = [np.log(model.to_values(model.simulate_logs(rng, sims, n, new_boot=True))) for n in sizes]
    out: dict[str, dict[str, Any]] = {}
    for i, m in enumerate(METRICS):
        rec = series.logs(m)

        def figures(boots: list[np.ndarray]) -> dict[str, float]:
            allv = np.concatenate(boots)
            f = series_figures(allv) if len(boots) == 1 else {
                "lag1": pooled_lag1(boots), "sd": float(np.std(np.concatenate([b - b.mean() for b in boots]))),
                "halves": max(series_figures(b)["halves"] for b in boots)}
            f["lag1"] = pooled_lag1(boots) if len(boots) > 1 else f["lag1"]
            f["boot_sd"] = float(np.std([b.mean() for b in boots], ddof=1)) if len(boots) > 1 else math.nan
            return f

        r = figures(rec)
        s = [figures([sim[b][j, :, i] for b in range(len(sizes))]) for j in range(sims)]
        out[m] = {}
        for key, val in r.items():
            if key == "n":
                continue
            vals = np.array([x[key] for x in s], float)
            vals = vals[np.isfinite(vals)]
            if not math.isfinite(val) or not len(vals):
                continue
            lo, med, hi = np.percentile(vals, [5, 50, 95])
            out[m][key] = {"recorded": val, "sim_median": float(med), "sim_5": float(lo), "sim_95": float(hi),
                           "percentile": float(np.mean(vals < val) * 100)}
    return out


def issue_figures(p: Any, local: Series) -> dict[str, float]:
    """Issue #18's figures for the development-machine series, recomputed from its files."""
    x = local.logs("p999_us")[0]
    f = series_figures(x)
    h = len(x) // 2
    p(f"Issue #18's figures for `benchmarks/data/local-x86` (lag-1 autocorrelation 0.40, halves differing 2.6x), "
      f"from the files: lag-1 autocorrelation of log p99.9 {f['lag1']:.3f} (Pearson r of runs t and t+1 over "
      f"the {len(x)} consecutive runs); geometric mean p99.9 of runs {h + 1}-{len(x)} / runs 1-{h} = "
      f"{f['halves']:.2f}x; run-to-run log-SD {f['sd']:.2f}.\n")
    return f


def goal_text(key: str, value: float, power: float = 1.0) -> str:
    op, g = GOALS[key]
    if not math.isfinite(value):
        return "n/a"
    ok = value <= g if op == "<=" else value >= g
    if key == "time_ratio" and power < 0.5:
        return f"{value:.2f}, moot: at {power:.0%} power the fixed design of equal error is as weak"
    if ok:
        return "met"
    if key == "time_ratio":
        return f"missed by {value - g:.2f} ({value / g:.1f}x the goal)"
    return f"missed by {abs(value - g) * 100:.1f} points"


def print_model(p: Any, series: Series, model: NoiseModel, check: dict, title: str) -> None:
    where = series.folder.relative_to(REPO) if series.folder.is_relative_to(REPO) else series.folder
    p(f"### {title}: `{where}`\n")
    boots = ", ".join(f"{len(b)}" for b in series.boots.values())
    cens = {m: sum(r.censored[m] for r in series.runs) for m in METRICS}
    p(f"{series.n_runs} runs of {series.run_s:g} s in {len(series.boots)} boot(s) (runs per boot: {boots}), "
      f"over {series.span_h():.2f} h; runs with a percentile among the overflows (taken as the histogram size): "
      + ", ".join(f"{LABEL[m]} {c}" for m, c in cens.items()) + ".\n")
    for n in model.note:
        p(f"**Note: {n}.**\n")
    p("| metric (log) | mean (us) | boot SD sb | drift SD sa | drift phi (lag 1) | run spread se | "
      "within-boot SD | implied lag-1 | REML loglik |")
    p("|---|---|---|---|---|---|---|---|---|")
    for m, f in zip(METRICS, model.fits, strict=True):
        sb = f"{f.sb:.3f}" + ("" if f.sb_fitted else " (prior, not fitted)")
        p(f"| {LABEL[m]} | {math.exp(f.mu):.0f} | {sb} | {f.sa:.3f} | {f.phi:.3f} | {f.se:.3f} | "
          f"{f.within_sd:.3f} | {f.lag1:.2f} | {f.loglik:.1f} |")
    names = [LABEL[m] for m in METRICS]

    def corr(r: np.ndarray) -> str:
        return ", ".join(f"{names[i]}-{names[j]} {r[i, j]:+.2f}" for i in range(3) for j in range(i + 1, 3))

    p(f"\nCorrelations between metrics: drift {corr(model.r_drift)}; run spread {corr(model.r_run)}; boot "
      "offsets taken as the drift's.\n")
    p("Check: the recorded figures vs the same figures of 400 recordings of the same shape simulated from the "
      "fit (median [5%..95%]; the recorded figure's percentile among them):\n")
    p("| metric | figure | recorded | simulated | recorded's percentile |")
    p("|---|---|---|---|---|")
    what = {"lag1": "lag-1 autocorrelation (within boots)", "halves": "halves' ratio (geometric means; the "
            "largest boot's when several)", "sd": "run-to-run log-SD (within boots)", "boot_sd": "SD of boot means"}
    for m in METRICS:
        for key, c in check[m].items():
            p(f"| {LABEL[m]} | {what.get(key, key)} | {c['recorded']:.2f} | {c['sim_median']:.2f} "
              f"[{c['sim_5']:.2f}..{c['sim_95']:.2f}] | {c['percentile']:.0f} |")
    p("")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=None, help="folder of recorded runs (default: see the docstring)")
    ap.add_argument("--trials", type=int, default=None, help="simulated decisions per effect and rule (400)")
    ap.add_argument("--fixed-trials", type=int, default=None, help="simulated fixed-length comparisons (2000)")
    ap.add_argument("--boot-trials", type=int, default=None, help="simulated boot-change decisions (300)")
    ap.add_argument("--n-max", type=int, default=150, help="largest fixed-length n per side simulated")
    ap.add_argument("--seed", type=int, default=20261206)
    ap.add_argument("--playbook", type=Path, default=None,
                    help="judge this measurement plan's decision settings as 'new' (default: the rule's defaults)")
    ap.add_argument("--boot-sd-prior", type=float, default=0.0,
                    help="boot-to-boot SD of log values assumed when the data has one boot (not estimable)")
    ap.add_argument("--what-if-sd", type=float, default=None,
                    help="what-if, not the data: all SDs scaled so the within-boot SD of log p99.9 is this")
    ap.add_argument("--quick", action="store_true", help="few trials (for the unit test): figures are rough")
    ap.add_argument("--json", action="store_true", help='print {"rules": {NAME: {...}}, ...} only')
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    trials = args.trials or (20 if args.quick else 400)
    fixed_trials = args.fixed_trials or (150 if args.quick else 2000)
    boot_trials = args.boot_trials or (10 if args.quick else 300)
    n_max = min(args.n_max, 60) if args.quick else args.n_max
    lines: list[str] = []
    p = lines.append

    folder, why = choose_data(args.data)
    series = load_series(folder)
    if series.n_runs < 8:
        print(f"need at least 8 recorded runs in {folder}, found {series.n_runs}", file=sys.stderr)
        return 2
    model = fit(series, args.boot_sd_prior)
    sims = 100 if args.quick else 400
    check = check_model(series, model, args.seed, sims)
    p("## Decision benchmark\n")
    shown = sys.argv[1:] if argv is None else argv
    p(f"`python benchmarks/decision_bench.py{' ' + ' '.join(shown) if shown else ''}` (seed {args.seed}; "
      f"{trials} decisions per effect and rule, {fixed_trials} fixed-length comparisons per effect, "
      f"{boot_trials} boot-change decisions per effect). Data: {why}.\n")
    print_model(p, series, model, check, "Noise model fitted to")
    out: dict[str, Any] = {"data": {"folder": str(folder), "runs": series.n_runs, "boots": len(series.boots),
                                    "run_s": series.run_s, "span_h": series.span_h()},
                           "model": {m: vars(f) for m, f in zip(METRICS, model.fits, strict=True)},
                           "model_check": check}
    local = series if folder.resolve() == LOCAL.resolve() else load_series(LOCAL)
    out["issue_figures"] = issue_figures(p, local)
    if folder.resolve() != LOCAL.resolve() and not args.quick:
        lm = fit(local, args.boot_sd_prior)
        out["local_check"] = check_model(local, lm, args.seed, sims)
        print_model(p, local, lm, out["local_check"], "The development-machine series, fitted and checked alike")

    med = {m: float(np.median([r.values[m] for r in series.runs])) for m in METRICS}
    eff = Effects.build(float(np.median([r.p50_us for r in series.runs])), med)
    p(f"Effects: the tail above the median p50 ({eff.m0:g} us) stretched so that the median p99.9 "
      f"({med['p999_us']:g} us) moves by e; p99 ({med['p99_us']:g} us) and max ({med['max_us']:g} us) move by: "
      + "; ".join(f"{e:+.0%}: p99 {mv[0]:+.1%}, max {mv[2]:+.1%}" for e, mv in eff.moves.items()) + ".\n")

    sim = model.at_step(series.wall_s)
    if args.what_if_sd is not None:
        k = args.what_if_sd / max(model.fits[1].within_sd, 1e-9)
        sim = sim.scaled(boot=k, drift=k, spread=k)
        out["what_if_scale"] = k
        p(f"**What-if, not the data: every fitted SD (boot, drift, run spread, all metrics) scaled by {k:.3f}, so "
          f"the within-boot SD of log p99.9 is {args.what_if_sd:g}.**\n")
    p(f"Simulated runs are {series.wall_s:.1f} s apart (a run's wall time as the rule measures back to back; the "
      f"recording's runs were {series.spacing_s:.1f} s apart): the drift is taken as an Ornstein-Uhlenbeck "
      "process, phi per simulated step = phi ** (step / recorded spacing): "
      + ", ".join(f"{LABEL[m]} {ph:.3f}" for m, ph in zip(METRICS, sim.phis(), strict=True)) + ".\n")
    new = new_rule_factory(series.run_s, noise_sd=sim.fits[1].within_sd, playbook=args.playbook,
                           histogram_us=series.histogram_us)
    old = OldRule()
    length = 2 * 100 + 4  # runs per trial: both sides at the API's largest k_max
    fixed = fixed_curves(sim, eff, fixed_trials, args.seed, n_max)
    results = {}
    rules: list[Any] = [new.run, old] + ([new.profile] if new.profile is not None and not args.quick else [])
    for rule in rules:
        r = run_rule(rule, sim, eff, trials, args.seed, length)
        results[rule.name] = summarise(r, fixed, old.min_effect)
    results["fixed"] = fixed_row(fixed)
    out["rules"] = results
    out["new_rule"] = new.label

    p(f"New rule: {new.label}. Old rule: decide.py at 61f7220 (frozen in benchmarks/decision/rules.py). "
      f"Runs of {series.run_s:g} s.\n")
    p("| rule | false keeps at 0 | power at -10% | power at -30% | keeps at +10% | time at 0 (s) | "
      "time at -10% (s) | mean time (s) | max time (s) | fixed reference of equal error (n per side, time) | "
      "time ratio |")
    p("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        ref = (f"{r['ref_n_per_side']:.1f} ({r['ref_how']}; alpha {r['ref_alpha']:.1%}), {r['ref_time_s']:.0f} s"
               if name != "fixed" else f"itself: n = {r['ref_n_per_side']:.1f} ({r['ref_how']}); rates "
               f"simulated at n = {r['rates_at_n']}"
               + (" (the grid's end)" if r["rates_at_n"] < round(r["ref_n_per_side"]) else ""))
        p(f"| {name} | {r['false_keep_0']:.1%} | {r['power_m10']:.1%} | {r['power_m30']:.1%} | "
          f"{r['keep_p10']:.1%} | {r['time_0_s']:.0f} | {r['time_m10_s']:.0f} | {r['mean_time_s']:.0f} | "
          f"{r['max_time_s']:.0f} | {ref} | {r['time_ratio']:.2f} |")
    p("\nGoals (false keeps <= 5% at 0, power >= 95% at -10%, mean time <= 0.35 of the fixed-length time):\n")
    p("| rule | false keeps | power at -10% | time ratio | least time ratio any rule can have at its error rates |")
    p("|---|---|---|---|---|")
    for name, r in results.items():
        if name == "fixed":
            continue
        p(f"| {name} | {goal_text('false_keep_0', r['false_keep_0'])} | {goal_text('power_m10', r['power_m10'])} "
          f"| {goal_text('time_ratio', r['time_ratio'], r['power_m10'])} | {r['time_ratio_bound']:.2f} |")
    p("\nThe last column is Wald's information bound (`benchmarks/decision/sim.py: information_bound`): at a "
      "false-keep rate a and a miss rate b, no sequential rule, however it looks, has a mean time of less than "
      "this fraction of the fixed-length time (0.49 at a = b = 5%). A time-ratio goal below it cannot be met.")

    out["goals"] = {name: {k: goal_text(k, r[k], r["power_m10"]) for k in GOALS}
                    for name, r in results.items() if name != "fixed"}
    out["boot_change"] = boot_change(p, sim, eff, [new.boot, new.boot_more], boot_trials, args.seed)
    out["cpu_s"] = time.process_time()
    out["wall_s"] = time.monotonic() - t0
    p(f"\nWall time {out['wall_s']:.0f} s, CPU {out['cpu_s']:.0f} s.")
    if args.json:
        print(json.dumps(out, indent=1, default=float))
    else:
        print("\n".join(lines))
    return 0


def boot_change(p: Any, model: NoiseModel, eff: Effects, new_boot: list[Any], trials: int, seed: int
                ) -> dict[str, Any]:
    """A boot change: blocked order, a new boot at each side switch, the boot effect present."""
    f = model.fits[1]
    cases = [("fitted", f"fitted (p99.9: sb = {f.sb:.3f})", model)]
    if not f.sb_fitted:
        cases = [("prior", f"prior sb = {f.sb:g} (one boot: not estimable)", model),
                 ("illustrative", "illustrative prior sb = 0.5 x within-boot SD (p99.9: "
                  f"{0.5 * f.within_sd:.3f}), not data", model.with_boot_sd(0.5))]
    p("\n### Boot changes (order blocked, runs grouped by boot, a new boot at every side switch, boot effect "
      "present)\n")
    rules = [r for r in new_boot if r is not None] + [OldRule(name="old", order="blocked")]
    out: dict[str, Any] = {}
    p("| boot effect | rule | false keeps at 0 | power at -10% | power at -30% | boots used at 0 (mean) | "
      "time at 0 (s) |")
    p("|---|---|---|---|---|---|---|")
    for key, label, m in cases:
        out[key] = {"boot_effect": label, "boot_sd_p999": m.fits[1].sb, "rules": {}}
        for rule in rules:
            r = run_rule(rule, m, eff, trials, seed + 1, 0, boot_change=True)
            d = {"false_keep_0": r.rate(0.0, "keep"), "power_m10": r.rate(-0.10, "keep"),
                 "power_m30": r.rate(-0.30, "keep"), "boots_0": float(np.mean(r.boots[0.0])),
                 "time_0_s": r.time(0.0)}
            out[key]["rules"][rule.name] = d
            p(f"| {label} | {rule.name} | {d['false_keep_0']:.1%} | {d['power_m10']:.1%} | "
              f"{d['power_m30']:.1%} | {d['boots_0']:.1f} | {d['time_0_s']:.0f} |")
    if not any(new_boot):
        p("\n(The committed rule has no boot handling yet (no `boots_per_side`): only the old rule is shown.)")
    return out


if __name__ == "__main__":
    sys.exit(main())
