"""Theorem 1 measured: samples and per-iteration improvement of CPI-RR and CPI-CARO as p_pi sweeps.

    python -m experiments.theory.sweep                                  # full sweep, into a temp folder
    python -m experiments.theory.sweep --out experiments/theory/results # the run docs/theory.md cites
    python -m experiments.theory.sweep --quick                          # a smoke run (seconds)

Two instance families (experiments/theory/cpi.py): the paper's H = 1 construction of Appendix A.3 ("tight")
and a 5-step chain with one critical step reached with probability p H ("chain"); in both p_pi = p exactly.

1. Samples: for each p, the smallest n (on a grid, ratio 2^(1/4)) from which, in at least 90% of R replicates
   (3 grid points in a row), Algorithm 1's estimate A_hat is within L/2 of what it estimates, A_d(pi^+), and its
   greedy policy keeps A_d(pi_hat^+) >= A_d(pi^+) - L/3, with L = tau p_pi for CPI-RR and L = tau for
   CPI-CARO: what the proof of Theorem 1 derives from its sample size (equations 13 and 15, used in Step 4).
   Done per seed; reported as the geometric mean over seeds with its standard error (as a factor).
   Also with a per-state baseline in A_hat (opt-in, not the paper's estimator).
2. Improvement: J(pi_alpha) - J(pi), exact, after one iteration, for each algorithm with its own measured n and
   with an equal budget, over many seeds (mean +- s.e.), beside Theorem 1's lower bounds.
3. Proposition 10 on the tight construction: Pr(A_hat <= 0) at n = sigma^2 / (4 A^2).
4. Sub-threshold advantage off G (the regime Table 1 excludes): the tight construction at p = 0.01 with eps
   (the advantage at x2) swept; the gain of each algorithm at a large n.
5. Horizon: the chain at p_pi = 1/64 for H = 2..32, samples and gains against H (Theorem 1: n ~ H^2, gain ~ 1/H).
6. Training runs: many iterations of each on the chain at p_pi = 0.01, J against the samples spent.

Log-log slopes are least-squares fits over the p grid, with 95% intervals from resampling seeds (bootstrap).
Table 1 says: n(CPI-RR) ~ p^-2, n(CPI-CARO) ~ p^0, gain(CPI-RR) ~ p^2, gain(CPI-CARO) ~ p^1.
Writes theory.json, theory_sweep.png, theory_eps.png and theory_training.png to --out.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from experiments.theory import cpi

TAU, R_MAX, HORIZON = 0.5, 1.0, 5
CONFIDENCE, RUN = 0.9, 3
GRID_RATIO = 2 ** 0.25


def family(name: str, p: float, eps: float | None = None, horizon: int = HORIZON):
    if name == "tight":
        return cpi.tight_construction(p, TAU, r_max=R_MAX, eps=eps)
    return cpi.critical_chain(p, horizon, TAU, r_max=R_MAX)


def estimates(rng, mdp, pi, weights, n, replicates, baseline="none", tie_break="policy"):
    """A_hat and the greedy actions of Algorithm 1 (lines 1-9) for `replicates` independent runs of n Q-samples."""
    ev = cpi.evaluate(mdp, pi)
    counts, sums = cpi.draw_cell_stats(rng, mdp, ev, weights, n, replicates=replicates)
    q_hat = cpi.fit_q(counts, sums)
    actions = cpi.greedy(q_hat, pi, tie_break, rng)
    return cpi.advantage_estimate(counts, q_hat, pi, actions, baseline), actions


def samples_to_precision(rng, mdp, pi, algorithm, replicates, baseline="none", n_max=10**11):
    """Smallest grid n from which Step 4 of the proof holds in >= 90% of replicates, RUN grid points in a row.

    Step 4 needs both consequences of the sample size: |A_hat - A_d(pi^+)| <= L/2 (equation 15) and
    A_d(pi_hat^+) >= A_d(pi^+) - L/3 (equation 13), with L = tau p_pi (CPI-RR) or tau (CPI-CARO).
    """
    ev = cpi.evaluate(mdp, pi)
    G = cpi.improvable_set(ev, TAU)
    p_pi = cpi.coverage(ev, G)
    weights = cpi.reset_weights(ev, G, algorithm)
    target = cpi.policy_advantage(ev, cpi.greedy_policy(pi, cpi.greedy(ev.q, pi)), weights)
    lower = TAU * p_pi if algorithm == "cpi-rr" else TAU
    k, first, streak = 0, None, 0
    while (n := round(4 * GRID_RATIO**k)) <= n_max:
        k += 1
        a_hat, actions = estimates(rng, mdp, pi, weights, n, replicates, baseline)
        picked = np.take_along_axis(np.broadcast_to(ev.advantage, actions.shape + ev.advantage.shape[-1:]), actions[..., None], -1)
        greedy_advantage = (weights * picked[..., 0]).sum((-2, -1))
        ok = np.mean((np.abs(a_hat - target) <= lower / 2) & (greedy_advantage >= target - lower / 3))
        if ok >= CONFIDENCE:
            first, streak = (n if streak == 0 else first), streak + 1
            if streak == RUN:
                return first
        else:
            streak = 0
    return None


def slope(p, values):
    return float(np.polyfit(np.log(p), np.log(values), 1)[0])


def bootstrap_slope(rng, p, per_seed, stat, draws=2000):
    """95% interval of the log-log slope of stat(per-seed values) against p, resampling seeds at each p."""
    per_seed = np.asarray(per_seed, float)
    idx = rng.integers(per_seed.shape[1], size=(draws, per_seed.shape[1]))
    out = []
    for row in idx:
        values = stat(per_seed[:, row])
        if (values > 0).all():
            out.append(slope(p, values))
    if not out:
        return None, 0.0
    return [float(np.percentile(out, 2.5)), float(np.percentile(out, 97.5))], len(out) / draws


def geomean(a):
    return np.exp(np.log(a).mean(axis=-1))


def mean(a):
    return np.mean(a, axis=-1)


def measure_samples(args, fam, p_grid, baseline):
    rows = {}
    for algorithm in cpi.ALGORITHMS:
        per_seed = []
        for p in p_grid:
            mdp, pi = family(fam, p)
            seeds = [samples_to_precision(np.random.default_rng([seed, 1]), mdp, pi, algorithm, args.replicates,
                                          baseline) for seed in range(args.seeds)]
            if None in seeds:
                raise RuntimeError(f"{fam} p={p} {algorithm}: precision not reached by n = 1e11")
            per_seed.append(seeds)
        rows[algorithm] = np.array(per_seed, float)
    return rows


def measure_improvement(args, fam, p_grid, n_table, step_rules=None):
    """Gains and steps of one iteration per seed, each algorithm with n = n_table[algorithm][p index]."""
    gains, alphas, right = {}, {}, {}
    for algorithm in cpi.ALGORITHMS:
        rule = (step_rules or cpi.DEFAULT_STEP_RULE)[algorithm]
        runs = []
        for i, p in enumerate(p_grid):
            mdp, pi = family(fam, p)
            n = int(np.ceil(n_table[algorithm][i]))
            runs.append([cpi.cpi_iteration(mdp, pi, algorithm=algorithm, n=n, tau=TAU, step_rule=rule,
                                           rng=np.random.default_rng([seed, 2])) for seed in range(args.gain_seeds)])
        gains[algorithm] = np.array([[run.gain for run in row] for row in runs])
        alphas[algorithm] = np.array([[run.alpha for run in row] for row in runs])
        right[algorithm] = np.array([greedy_right_on_g(fam, p, row) for p, row in zip(p_grid, runs)])
    return gains, alphas, right


def greedy_right_on_g(fam, p, runs):
    """Share of the improvable cells (over runs) where the estimated greedy action is the exact best one."""
    mdp, pi = family(fam, p)
    ev = cpi.evaluate(mdp, pi)
    G = cpi.improvable_set(ev, TAU) & (ev.d > 0)
    best = cpi.greedy(ev.q, pi)
    return float(np.mean([(run.greedy[G] == best[G]).mean() for run in runs]))


def prop10(args, p_grid):
    """Pr(A_hat <= 0) at n = sigma^2 / (4 A^2) on the tight construction, where Proposition 10 says >= 0.18."""
    out = []
    for p in p_grid:
        mdp, pi = family("tight", p)
        ev = cpi.evaluate(mdp, pi)
        G = cpi.improvable_set(ev, TAU)
        w = cpi.reset_weights(ev, G, "cpi-rr")
        y_values = mdp.n_actions * (cpi.greedy_policy(pi, cpi.greedy(ev.q, pi)) - pi) * ev.q
        cell = w[..., None] / mdp.n_actions
        a = float((cell * y_values).sum())
        sigma2 = float((cell * y_values**2).sum()) - a**2
        n = int(sigma2 / (4 * a**2))
        rng = np.random.default_rng([7, int(p * 1e6)])
        frac = {alg: float(np.mean(estimates(rng, mdp, pi, cpi.reset_weights(ev, G, alg), n, args.prop10_reps)[0] <= 0))
                for alg in cpi.ALGORITHMS}
        out.append({"p": p, "n": n, "in_regime": n >= 80**2 * mdp.n_actions**2, "A": a, "sigma2": sigma2,
                    "pr_nonpositive": frac})
    return out


def eps_sweep(args):
    p, n = 0.01, args.eps_n
    out = []
    for ratio in args.eps_ratios:
        mdp, pi = family("tight", p, eps=ratio * TAU)
        row = {"eps": ratio * TAU}
        for algorithm in cpi.ALGORITHMS:
            g = [cpi.cpi_iteration(mdp, pi, algorithm=algorithm, n=n, tau=TAU,
                                   rng=np.random.default_rng([seed, 3])).gain for seed in range(args.gain_seeds)]
            row[algorithm] = {"mean": float(np.mean(g)), "se": float(np.std(g, ddof=1) / np.sqrt(len(g)))}
        out.append(row)
    return {"p": p, "n": n, "rows": out}


def horizon_sweep(args):
    """The chain at p_pi = 1/64 for H from 2 to 32: samples and gains (each with its own n) against H."""
    p, out = 1 / 64, []
    for H in args.horizons:
        mdp, pi = family("chain", p, horizon=H)
        row = {"horizon": H, "samples": {}, "gains": {}}
        for algorithm in cpi.ALGORITHMS:
            ns = [samples_to_precision(np.random.default_rng([seed, 4]), mdp, pi, algorithm, args.replicates)
                  for seed in range(args.seeds)]
            n = int(np.ceil(geomean(np.array(ns, float))))
            gains = [cpi.cpi_iteration(mdp, pi, algorithm=algorithm, n=n, tau=TAU,
                                       rng=np.random.default_rng([seed, 5])).gain for seed in range(args.gain_seeds)]
            row["samples"][algorithm], row["gains"][algorithm] = ns, gains
        out.append(row)
    return {"p": p, "rows": out}


def training_runs(args):
    """Many iterations of each algorithm on the chain at p_pi = 0.01 (critical advantage 0.5, threshold 0.1).

    J after each iteration against the Q-rollouts (and, for CPI-CARO, the on-policy draws) spent so far; the
    Q-rollouts each needs to close 25%, 50% and 75% of the gap between J(pi_0) and the optimum.
    """
    p, tau, fractions = 0.01, 0.1, (0.25, 0.5, 0.75)
    mdp, pi0 = family("chain", p)
    j0, j_best = cpi.evaluate(mdp, pi0).j, 1.0 * R_MAX
    settings = {"cpi-rr": (10**6, args.rr_iterations), "cpi-caro": (100, args.caro_iterations)}
    out = {"p": p, "tau": tau, "j0": j0, "j_best": j_best, "fractions": fractions, "runs": {}}
    for algorithm, (n, iterations) in settings.items():
        runs = []
        for seed in range(args.train_seeds):
            rng, pi = np.random.default_rng([seed, 6]), pi0
            j, rollouts, draws = [], [], []
            for _ in range(iterations):
                it = cpi.cpi_iteration(mdp, pi, algorithm=algorithm, n=n, tau=tau, rng=rng)
                pi = it.policy
                j.append(it.j_after)
                # With p_pi = 0 the oracle marks nothing: CPI-CARO draws and rolls out nothing (trials = 0).
                rollouts.append((rollouts[-1] if rollouts else 0) + (n if it.trials else 0))
                draws.append((draws[-1] if draws else 0) + it.trials)
            keep = np.unique(np.geomspace(1, iterations, 200).astype(int)) - 1
            reach = {}
            for f in fractions:
                hit = np.flatnonzero(np.array(j) >= j0 + f * (j_best - j0))
                reach[str(f)] = (int(rollouts[hit[0]]), int(draws[hit[0]])) if len(hit) else None
            runs.append({"n": n, "j": [j[i] for i in keep], "rollouts": [rollouts[i] for i in keep],
                         "draws": [draws[i] for i in keep], "final_j": j[-1], "reach": reach})
        out["runs"][algorithm] = runs
    return out


def fmt_n(a):
    g = geomean(a)
    se = np.exp(np.log(a).std(ddof=1) / np.sqrt(len(a))) if len(a) > 1 else 1.0
    return f"{g:10.3g} x/{se:.2f}"


def fmt_gain(a):
    return f"{np.mean(a):10.3e} +- {np.std(a, ddof=1) / np.sqrt(len(a)):.1e}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: a new temp folder)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 4 p values, few seeds")
    args = parser.parse_args(argv)
    out = args.out or Path(tempfile.mkdtemp(prefix="theory-sweep-"))
    out.mkdir(parents=True, exist_ok=True)
    points = 4 if args.quick else 9
    args.seeds, args.replicates = (3, 100) if args.quick else (8, 200)
    args.gain_seeds, args.prop10_reps = (10, 400) if args.quick else (40, 2000)
    args.eps_n, args.equal_n = 10**6, 10**4
    args.horizons = [2, 8, 32] if args.quick else [2, 4, 8, 16, 32]
    args.train_seeds, args.rr_iterations, args.caro_iterations = (2, 1000, 200) if args.quick else (4, 20000, 1000)
    args.eps_ratios = [1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1] if not args.quick else [1e-3, 1e-1]
    grids = {"tight": np.geomspace(1e-3, 0.3, points), "chain": np.geomspace(1e-3, 1 / HORIZON, points)}
    boot = np.random.default_rng(0)
    start = time.time()
    result = {"tau": TAU, "r_max": R_MAX, "chain_horizon": HORIZON, "confidence": CONFIDENCE,
              "replicates": args.replicates, "seeds": args.seeds, "gain_seeds": args.gain_seeds,
              "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "families": {}}

    for fam, p_grid in grids.items():
        print(f"\n== {fam}: p_pi from {p_grid[0]:.3g} to {p_grid[-1]:.3g} "
              f"({'H = 1' if fam == 'tight' else f'H = {HORIZON}'}, |Y| = 2, tau = {TAU}, R_max = {R_MAX})")
        H = 1 if fam == "tight" else HORIZON
        fam_out = {"p": p_grid.tolist(), "horizon": H}
        samples = {b: measure_samples(args, fam, p_grid, b) for b in cpi.BASELINES}
        fam_out["samples"] = {b: {a: v.tolist() for a, v in s.items()} for b, s in samples.items()}
        print("\nSamples (Q-rollouts) to meet Step 4 of the proof in 90% of runs; geometric mean x/ s.e. factor "
              f"over {args.seeds} seeds")
        print(f"{'p_pi':>8} | {'CPI-RR':>17} | {'CPI-CARO':>17} | {'RR/CARO':>8} | {'CARO draws':>10} | "
              f"{'RR, baseline':>17} | {'CARO, baseline':>17}")
        for i, p in enumerate(p_grid):
            rr, caro = samples["none"]["cpi-rr"][i], samples["none"]["cpi-caro"][i]
            print(f"{p:8.3g} | {fmt_n(rr)} | {fmt_n(caro)} | {geomean(rr) / geomean(caro):8.3g} | "
                  f"{geomean(caro) / p:10.3g} | {fmt_n(samples['value']['cpi-rr'][i])} | "
                  f"{fmt_n(samples['value']['cpi-caro'][i])}")
        slopes = {}
        for b, s in samples.items():
            for name, per_seed, theory in [("cpi-rr", s["cpi-rr"], -2), ("cpi-caro", s["cpi-caro"], 0),
                                           ("rr/caro", s["cpi-rr"] / s["cpi-caro"], -2)]:
                ci, _ = bootstrap_slope(boot, p_grid, per_seed, geomean)
                slopes[f"samples {name} baseline={b}"] = {"slope": slope(p_grid, geomean(per_seed)), "ci95": ci,
                                                          "table1": theory}

        budgets = {"own n": {a: geomean(samples["none"][a]) for a in cpi.ALGORITHMS},
                   f"equal n = {args.equal_n}": {a: np.full(len(p_grid), args.equal_n) for a in cpi.ALGORITHMS}}
        fam_out["gains"] = {}
        for label, n_table in budgets.items():
            gains, alphas, right = measure_improvement(args, fam, p_grid, n_table)
            fam_out.setdefault("greedy_right_on_G", {})[label] = {a: v.tolist() for a, v in right.items()}
            fam_out["gains"][label] = {a: g.tolist() for a, g in gains.items()}
            fam_out.setdefault("alphas", {})[label] = {a: v.tolist() for a, v in alphas.items()}
            print(f"\nOne-iteration improvement J(pi_alpha) - J(pi), {label}; mean +- s.e. over {args.gain_seeds} "
                  "seeds; bound = Theorem 1's lower bound; right on G = share of improvable cells where the estimated greedy "
                  "action is the best one")
            print(f"{'p_pi':>8} | {'CPI-RR':>19} | {'RR bound':>9} | {'CPI-CARO':>19} | {'CARO bound':>10} | "
                  f"{'CARO/RR':>8} | {'alpha CARO/RR':>13} | {'right on G RR, CARO':>19}")
            for i, p in enumerate(p_grid):
                rr, caro = gains["cpi-rr"][i], gains["cpi-caro"][i]
                ratio = np.mean(caro) / np.mean(rr) if np.mean(rr) > 0 else float("nan")
                print(f"{p:8.3g} | {fmt_gain(rr)} | {TAU**2 * p**2 / (8 * H * R_MAX):9.2e} | {fmt_gain(caro)} | "
                      f"{TAU**2 * p / (16 * H * R_MAX):10.2e} | {ratio:8.3g} | "
                      f"{np.mean(alphas['cpi-caro'][i]) / max(np.mean(alphas['cpi-rr'][i]), 1e-300):13.3g} | "
                      f"{right['cpi-rr'][i]:9.2f}, {right['cpi-caro'][i]:8.2f}")
            for name, values, theory in [("cpi-rr", gains["cpi-rr"], 2), ("cpi-caro", gains["cpi-caro"], 1)]:
                m = mean(values)
                fit = slope(p_grid, m) if (m > 0).all() else None
                ci, kept = bootstrap_slope(boot, p_grid, values, mean)
                slopes[f"gain {name} {label}"] = {"slope": fit, "ci95": ci, "bootstrap_kept": kept, "table1": theory}
            m_rr, m_caro = mean(gains["cpi-rr"]), mean(gains["cpi-caro"])
            if (m_rr > 0).all():
                slopes[f"gain caro/rr {label}"] = {"slope": slope(p_grid, m_caro / m_rr), "table1": -1}
        fam_out["slopes"] = slopes
        print("\nFitted log-log slopes against p_pi (95% bootstrap interval over seeds) | Table 1")
        for key, s in slopes.items():
            fit = "   n/a" if s["slope"] is None else f"{s['slope']:6.2f}"
            ci = f"[{s['ci95'][0]:6.2f}, {s['ci95'][1]:6.2f}]" if s.get("ci95") else " " * 16
            print(f"  {key:38s} {fit} {ci} | {s['table1']:+d}")
        result["families"][fam] = fam_out

    result["prop10"] = prop10(args, grids["tight"])
    print("\nProposition 10 (tight construction): Pr(A_hat <= 0) at n = sigma^2/(4 A^2); the paper: >= 0.18 "
          "where n >= 80^2 |Y|^2")
    print(f"{'p_pi':>8} | {'n':>10} | {'in regime':>9} | {'CPI-RR':>7} | {'CPI-CARO':>8}")
    for row in result["prop10"]:
        print(f"{row['p']:8.3g} | {row['n']:10d} | {row['in_regime']!s:>9} | {row['pr_nonpositive']['cpi-rr']:7.3f} | "
              f"{row['pr_nonpositive']['cpi-caro']:8.3f}")

    result["eps"] = eps_sweep(args)
    print(f"\nAdvantage eps off G (tight construction, p_pi = {result['eps']['p']}, n = {result['eps']['n']} for "
          "both): mean gain +- s.e.")
    print(f"{'eps/tau':>8} | {'CPI-RR':>19} | {'CPI-CARO':>19}")
    for row in result["eps"]["rows"]:
        print(f"{row['eps'] / TAU:8.0e} | {row['cpi-rr']['mean']:10.3e} +- {row['cpi-rr']['se']:.1e} | "
              f"{row['cpi-caro']['mean']:10.3e} +- {row['cpi-caro']['se']:.1e}")

    result["horizon"] = horizon_sweep(args)
    print(f"\nHorizon (chain, p_pi = 1/64): samples to the precision (geometric mean x/ s.e. over {args.seeds} seeds) "
          f"and gain with that n (mean +- s.e. over {args.gain_seeds} seeds)")
    print(f"{'H':>4} | {'n CPI-RR':>17} | {'n CPI-CARO':>17} | {'gain CPI-RR':>19} | {'gain CPI-CARO':>19}")
    rows = result["horizon"]["rows"]
    for row in rows:
        print(f"{row['horizon']:4d} | {fmt_n(np.array(row['samples']['cpi-rr'], float))} | "
              f"{fmt_n(np.array(row['samples']['cpi-caro'], float))} | {fmt_gain(row['gains']['cpi-rr'])} | "
              f"{fmt_gain(row['gains']['cpi-caro'])}")
    hs = np.array([row["horizon"] for row in rows], float)
    h_slopes = {}
    for a in cpi.ALGORITHMS:
        h_slopes[f"samples {a}"] = {"slope": slope(hs, [geomean(np.array(r["samples"][a], float)) for r in rows]),
                                    "theorem": 2}
        h_slopes[f"gain {a}"] = {"slope": slope(hs, [np.mean(r["gains"][a]) for r in rows]), "theorem": -1}
    result["horizon"]["slopes"] = h_slopes
    print("Fitted log-log slopes against H | Theorem 1 (n ~ H^2, gain ~ 1/H)")
    for key, v in h_slopes.items():
        print(f"  {key:18s} {v['slope']:6.2f} | {v['theorem']:+d}")

    train = result["training"] = training_runs(args)
    print(f"\nTraining runs (chain, p_pi = {train['p']}, threshold tau = {train['tau']}, {args.train_seeds} seeds): "
          f"Q-rollouts (and on-policy draws) to close a share of the gap J(pi_0) = {train['j0']:.4f} -> "
          f"{train['j_best']:.3f}; geometric mean over seeds")
    print(f"{'method':>9} | {'n/iter':>7} | " + " | ".join(f"{f:>7.0%} of the gap" for f in train["fractions"])
          + " | final J")
    for algorithm, runs in train["runs"].items():
        cells = []
        for f in train["fractions"]:
            hits = [r["reach"][str(f)] for r in runs]
            if any(h is None for h in hits):
                cells.append(f"{'not reached':>18}")
            else:
                q, d = geomean(np.array([h[0] for h in hits], float)), geomean(np.array([h[1] for h in hits], float))
                cells.append(f"{q:8.2g} ({d:7.2g})")
        print(f"{algorithm:>9} | {runs[0]['n']:7d} | " + " | ".join(cells)
              + f" | {np.mean([r['final_j'] for r in runs]):.4f}")

    result["seconds"] = round(time.time() - start, 1)
    (out / "theory.json").write_text(json.dumps(result, indent=1))
    plot(result, out)
    print(f"\n{result['seconds']} s; wrote theory.json, theory_sweep.png, theory_eps.png, theory_training.png to {out}")


def plot(result, out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"cpi-rr": "tab:red", "cpi-caro": "tab:blue"}
    fams = list(result["families"])
    fig, axes = plt.subplots(2, len(fams), figsize=(6 * len(fams), 9))
    for col, fam in enumerate(fams):
        f = result["families"][fam]
        p = np.array(f["p"])
        ax = axes[0, col]
        for b, style in [("none", "-o"), ("value", ":^")]:
            for a in cpi.ALGORITHMS:
                v = np.array(f["samples"][b][a])
                g = geomean(v)
                se = np.exp(np.log(v).std(axis=1, ddof=1) / np.sqrt(v.shape[1]))
                label = f"{a.upper()}" + (", with baseline (not the paper's)" if b == "value" else "")
                ax.errorbar(p, g, yerr=[g - g / se, g * se - g], fmt=style, color=colors[a], label=label,
                            alpha=1.0 if b == "none" else 0.6, capsize=2)
        ref = geomean(np.array(f["samples"]["none"]["cpi-rr"]))[-1]
        ax.plot(p, ref * (p / p[-1]) ** -2, "k--", lw=0.8, label="slope -2 (Table 1, CPI-RR)")
        ax.set(xscale="log", yscale="log", xlabel="p_pi", ylabel="Q-rollouts to reach the precision",
               title=f"{fam} (H = {f['horizon']}): samples")
        ax.legend(fontsize=7)
        ax = axes[1, col]
        label = "own n"
        for a in cpi.ALGORITHMS:
            v = np.array(f["gains"][label][a])
            ax.errorbar(p, v.mean(1), yerr=1.96 * v.std(1, ddof=1) / np.sqrt(v.shape[1]), fmt="-o", color=colors[a],
                        label=f"{a.upper()} (95% CI)", capsize=2)
        H = f["horizon"]
        ax.plot(p, TAU**2 * p**2 / (8 * H * R_MAX), "--", color=colors["cpi-rr"], lw=0.8, label="bound tau^2 p^2/(8HR)")
        ax.plot(p, TAU**2 * p / (16 * H * R_MAX), "--", color=colors["cpi-caro"], lw=0.8, label="bound tau^2 p/(16HR)")
        ax.set(xscale="log", yscale="log", xlabel="p_pi", ylabel="J(pi_alpha) - J(pi)",
               title=f"{fam} (H = {H}): one-iteration improvement, each with its n")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "theory_sweep.png", dpi=110)
    plt.close(fig)

    train = result["training"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for a, runs in train["runs"].items():
        for k, r in enumerate(runs):
            ax.plot(r["rollouts"], r["j"], color=colors[a], alpha=0.7, label=f"{a.upper()}, Q-rollouts" if k == 0 else None)
            if a == "cpi-caro":
                ax.plot(r["draws"], r["j"], ":", color=colors[a], alpha=0.7,
                        label="CPI-CARO, on-policy draws (oracle queries)" if k == 0 else None)
    ax.axhline(train["j_best"], color="k", lw=0.6)
    ax.set(xscale="log", xlabel="samples spent", ylabel="J(pi)",
           title=f"chain, p_pi = {train['p']}: training runs (one line per seed)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "theory_training.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    rows = result["eps"]["rows"]
    eps = np.array([r["eps"] for r in rows]) / result["tau"]
    for a in cpi.ALGORITHMS:
        m = np.array([r[a]["mean"] for r in rows])
        se = np.array([r[a]["se"] for r in rows])
        ax.errorbar(eps, m, yerr=1.96 * se, fmt="-o", color=colors[a], label=a.upper(), capsize=2)
    ax.set(xscale="log", yscale="log", xlabel="eps / tau (advantage off the improvable set)",
           ylabel="J(pi_alpha) - J(pi)", title=f"tight construction, p_pi = {result['eps']['p']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "theory_eps.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
