"""ZO-RankSGD on synthetic functions: ranking feedback vs value feedback vs random search.

    OMP_NUM_THREADS=1 .venv/bin/python bench/zo_ranksgd_synthetic.py            # ~2-4 min, 1 core
    OMP_NUM_THREADS=1 .venv/bin/python bench/zo_ranksgd_synthetic.py --quick    # ~20 s smoke run

The synthetic study of Tang et al. (ICLR 2024, §4.1) in its spirit: minimise a quadratic and the
Rosenbrock function in d = 100 with a fixed budget of *queries*, where one query is one point
shown to the oracle (ranked, compared or evaluated). Every method gets the same budget and the
same m points per round:

* ``zo_ranksgd``        Algorithm 1, paper estimator, full ranking of m = 10 points per round;
* ``zo_ranksgd_top3``   the same with a (10, 3) top-k ranking oracle (only the 3 best, in order);
* ``zo_ranksgd_ls``     the reference code's human loop: a gradient round then a line-search
                        round (8 step sizes + previous best + current, the oracle picks one);
* ``zo_sgd``            ZO-SGD with *values*: Gaussian-smoothing forward differences on m-1
                        directions plus f(x) (Nesterov & Spokoiny 2017; Ghadimi & Lan 2013);
* ``random_search``     m-1 random points around x plus x itself; move to the best (needs only
                        a comparison oracle, like ZO-RankSGD).

Step sizes are tuned per method and function on a separate tuning seed (grid below; score: mean
log10 f over the run, i.e. the area under the plotted curve), then
each method runs on ``--seeds`` fresh seeds (start point and all noise differ per seed). Writes
bench/results/zo_ranksgd_synthetic.json (table) and .png (objective vs queries, mean and
min-max band over seeds, log scale).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vfeedback.algorithms.zo_ranksgd import ZORankSGD  # noqa: E402
from vfeedback.feedback.oracles import FunctionRankingOracle  # noqa: E402

RESULTS = ROOT / "bench" / "results"


# ------------------------------------------------------------------------------ test functions


def quadratic(x: torch.Tensor) -> torch.Tensor:
    """``sum_i x_i^2`` over the last axis (minimum 0 at 0)."""
    return (x * x).sum(-1)


def rosenbrock(x: torch.Tensor) -> torch.Tensor:
    """``sum_i 100 (x_{i+1} - x_i^2)^2 + (1 - x_i)^2`` (minimum 0 at all-ones)."""
    a, b = x[..., :-1], x[..., 1:]
    return (100.0 * (b - a * a) ** 2 + (1.0 - a) ** 2).sum(-1)


FUNCTIONS = {"quadratic": quadratic, "rosenbrock": rosenbrock}


def start_point(name: str, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(10_000 + seed)
    if name == "quadratic":  # f(x0) ~ d
        return torch.randn(d, generator=g, dtype=torch.float64)
    return torch.randn(d, generator=g, dtype=torch.float64) * 0.5  # Rosenbrock: a random start near 0


# ------------------------------------------------------------------------------ methods
# Each returns (queries, f(x)) after every round, f(x0) at 0 queries. Evaluating f(x) for the
# curve is bookkeeping, not a query.


def run_zo_ranksgd(f, x0, budget, m, seed, eta, mu, top_k=None, line_search=False):
    oracle = FunctionRankingOracle(f, minimize=True, top_k=top_k, batched=True)
    opt = ZORankSGD(x0, num_candidates=m, smoothing=mu, step_size=eta, line_search=line_search, seed=seed)
    curve = [(0, float(f(x0)))]
    while opt.n_queries + m <= budget:
        opt.step(oracle)
        curve.append((opt.n_queries, float(f(opt.x))))
    return curve


def run_zo_sgd(f, x0, budget, m, seed, eta, mu):
    g = torch.Generator().manual_seed(seed)
    x = x0.clone()
    q, curve = 0, [(0, float(f(x0)))]
    while q + m <= budget:
        u = torch.randn(m - 1, x.numel(), generator=g, dtype=x.dtype)
        fx = f(x)
        fu = f(x[None] + mu * u)
        grad = ((fu - fx) / mu)[:, None].mul(u).mean(0)
        x = x - eta * grad
        q += m
        val = float(f(x))
        if not math.isfinite(val):  # diverged: report it as such, stop
            curve.append((q, float("inf")))
            break
        curve.append((q, val))
    return curve


def run_random_search(f, x0, budget, m, seed, eta, mu=None):
    g = torch.Generator().manual_seed(seed)
    x = x0.clone()
    q, curve = 0, [(0, float(f(x0)))]
    while q + m <= budget:
        cand = torch.cat([x[None], x[None] + eta * torch.randn(m - 1, x.numel(), generator=g, dtype=x.dtype)])
        best = int(torch.argmin(f(cand)))  # only the arg-best is used: a comparison oracle suffices
        x = cand[best]
        q += m
        curve.append((q, float(f(x))))
    return curve


METHODS = {
    "zo_ranksgd": dict(fn=run_zo_ranksgd, kw={}, grid=[0.003, 0.01, 0.03, 0.1, 0.3], label="ZO-RankSGD, full ranking (m=10)"),
    "zo_ranksgd_top3": dict(fn=run_zo_ranksgd, kw={"top_k": 3}, grid=[0.003, 0.01, 0.03, 0.1, 0.3], label="ZO-RankSGD, top-3 of 10"),
    "zo_ranksgd_ls": dict(fn=run_zo_ranksgd, kw={"line_search": True}, grid=[0.1, 0.3, 1.0, 3.0], label="ZO-RankSGD + line search (reference loop)"),
    "zo_sgd": dict(fn=run_zo_sgd, kw={}, grid=[1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1], label="ZO-SGD, values (9 dirs + f(x))"),
    "random_search": dict(fn=run_random_search, kw={}, grid=[0.003, 0.01, 0.03, 0.1, 0.3], label="random search (best of 9 + x)"),
}


def final(curve):
    return curve[-1][1]


def mean_log(curve):
    """Tuning score: mean of log10 f(x) over the whole run (the area under the plotted curve),
    so a step size must both descend fast and settle low; a diverged run scores +inf."""
    vals = [v for _, v in curve]
    if not all(math.isfinite(v) for v in vals):
        return float("inf")
    return sum(math.log10(max(v, 1e-300)) for v in vals) / len(vals)


def queries_to(curve, level):
    for q, v in curve:
        if v <= level:
            return q
    return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dim", type=int, default=100, help="dimension d (paper: 100)")
    ap.add_argument("--m", type=int, default=10, help="points per round (ranked / evaluated)")
    ap.add_argument("--budget", type=int, default=20_000, help="queries per run")
    ap.add_argument("--seeds", type=int, default=5, help="evaluation seeds per method")
    ap.add_argument("--mu", type=float, default=0.01, help="smoothing radius of ZO-RankSGD and ZO-SGD")
    ap.add_argument("--quick", action="store_true", help="small budget and 2 seeds: a smoke run")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.quick:
        args.budget, args.seeds = 3000, 2
    torch.set_num_threads(1)
    t0 = time.time()
    table = {
        "setup": {
            "dim": args.dim, "m": args.m, "budget_queries": args.budget, "seeds": args.seeds, "mu": args.mu,
            "query": "one point shown to the oracle (ranked, compared or evaluated)",
            "tuning": "step size chosen on tuning seed 999 by the mean of log10 f(x) over the run (area under the curve); grid values in 'grid' are that score",
        },
        "functions": {},
    }
    curves = {}
    for fname, f in FUNCTIONS.items():
        table["functions"][fname] = {}
        for mname, spec in METHODS.items():
            # tune on a seed never used for evaluation
            x0t = start_point(fname, args.dim, 999)
            scores = {}
            for eta in spec["grid"]:
                scores[eta] = mean_log(spec["fn"](f, x0t, args.budget, args.m, 999, eta, args.mu, **spec["kw"]))
            eta = min(scores, key=scores.get)
            runs = []
            for s in range(args.seeds):
                x0 = start_point(fname, args.dim, s)
                runs.append(spec["fn"](f, x0, args.budget, args.m, s, eta, args.mu, **spec["kw"]))
            curves[(fname, mname)] = runs
            f0 = sum(r[0][1] for r in runs) / len(runs)
            finals = torch.tensor([final(r) for r in runs], dtype=torch.float64)
            hit = {}
            for frac in (1e-1, 1e-2, 1e-3):
                qs = [queries_to(r, frac * r[0][1]) for r in runs]
                hit[f"queries_to_{frac:g}_f0"] = None if any(q is None for q in qs) else sum(qs) / len(qs)
                hit[f"reached_{frac:g}_f0"] = sum(q is not None for q in qs)
            table["functions"][fname][mname] = {
                "label": spec["label"],
                "step_size": eta,
                "grid": {str(k): v for k, v in scores.items()},
                "f0_mean": f0,
                "final_mean": float(finals.mean()),
                "final_std": float(finals.std()) if len(finals) > 1 else 0.0,
                "final_min": float(finals.min()),
                "final_max": float(finals.max()),
                **hit,
            }
            print(f"{fname:10s} {mname:16s} eta={eta:<7g} f0={f0:9.3g} final={float(finals.mean()):9.3g} ± {table['functions'][fname][mname]['final_std']:.2g}  ({time.time() - t0:5.1f}s)", flush=True)
    table["wall_seconds"] = round(time.time() - t0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "zo_ranksgd_synthetic.json").write_text(json.dumps(table, indent=1))
    plot(curves, table, args.out / "zo_ranksgd_synthetic.png")
    print(f"wrote {args.out / 'zo_ranksgd_synthetic.json'} and .png in {table['wall_seconds']} s")


STYLE = {
    "zo_ranksgd": ("tab:blue", "-"),
    "zo_ranksgd_top3": ("tab:cyan", "--"),
    "zo_ranksgd_ls": ("tab:purple", "-."),
    "zo_sgd": ("tab:orange", "-"),
    "random_search": ("tab:gray", ":"),
}


def plot(curves, table, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9.5), constrained_layout=True, height_ratios=[3, 2])
    for col, fname in enumerate(FUNCTIONS):
        top, tail = axes[0, col], axes[1, col]
        s = table["setup"]
        start = s["budget_queries"] // 4
        for mname, spec in METHODS.items():
            runs = curves[(fname, mname)]
            n = min(len(r) for r in runs)
            q = torch.tensor([p[0] for p in runs[0][:n]], dtype=torch.float64)
            v = torch.tensor([[p[1] for p in r[:n]] for r in runs], dtype=torch.float64).clamp_min(1e-12)
            lo, hi = v.min(0).values, v.max(0).values
            mean = v.mean(0)
            color, ls = STYLE[mname]
            eta = table["functions"][fname][mname]["step_size"]
            for ax in (top, tail):
                sel = q >= (start if ax is tail else 0)
                ax.plot(q[sel], mean[sel], color=color, ls=ls, lw=2, label=f"{spec['label']}  (η={eta:g})")
                ax.fill_between(q[sel], lo[sel], hi[sel], color=color, alpha=0.15, lw=0)
        top.set_yscale("log")
        tail.set_yscale("log" if fname == "quadratic" else "linear")
        top.set_title(f"{fname}, d={s['dim']}: f(x) vs queries ({s['seeds']} seeds, mean; band min-max)")
        tail.set_title(f"{fname}: zoom on the last 3/4 of the budget")
        for ax in (top, tail):
            ax.set_xlabel("queries (points shown to the oracle)")
            ax.set_ylabel("f(x)")
            ax.grid(True, which="major", alpha=0.4)
            ax.grid(True, which="minor", alpha=0.12)
    axes[0, 0].legend(fontsize=8.5, loc="lower left")
    fig.suptitle("ZO-RankSGD (ranking oracle) vs ZO-SGD (values) vs random search, equal query budget", fontsize=12)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
