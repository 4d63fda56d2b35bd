"""Reward over-optimisation in the shapes world (issue #18): every method x guard against proxy judges.

The setup of Gao et al. 2023 ("Scaling Laws for Reward Model Overoptimization", Sec. 2: a proxy
reward model is optimised, a gold one scores the result, both against the KL to the initial
policy), which Coste et al. 2023 ("Reward Model Ensembles Help Mitigate Overoptimization") extend
with ensembles: each cell fine-tunes ``tiny:shapes`` from ``configs/<method>/shapes.yaml`` with a
small proxy judge (``shapes_judge_proxy``, vfeedback/world/proxy_judges.py) as the reward and
measures, at several points, the proxies, the gold judge (``shapes_judge_heldout``) and the KL of
the tuned model to the base.

    OMP_NUM_THREADS=1 python bench/overoptimisation.py                     # every planned cell, resumable
    python bench/overoptimisation.py --methods grpo --guards none,wco --budget 160
    python bench/overoptimisation.py --report                             # JSON, table, figure from finished cells

Guards (a cell exists only where the method supports the guard; the table says why not):

- ``none``: proxy 0 alone (GRPO's config KL switched off: ``grpo.kl_coef=0``);
- ``kl``: ``kl_coef`` = :data:`KL_COEF` (DDPO, GRPO: the only methods with a KL term);
- ``mean`` / ``wco`` / ``uwo``: the ensemble of all proxies (``reward.ensemble``; UWO's lambda 0.5);
- ``par`` / ``win_rate``: ``reward.shaping`` on proxy 0 (methods that sample groups: DDPO, GRPO, RAFT).

Budget: ``--budget`` images judged by the training reward per run (counted as bench/world_compare.py
does; PAR also scores as many base-model images, not counted). Measurement at step 0 and
``--evals`` more points: ``--n-eval`` captions per kind from the scene generator (a seed nothing
trained on), one image each with fixed seeds, scored by every proxy, the gold judge and the
training judge ``shapes_judge``:

- scores on the method's own sampler (what it optimises: DDIM, its steps, CFG and eta);
- KL to the base: for DDIM with eta = 1 the path KL of the tuned model's sampler to the base's,
  on trajectories of the tuned model: ``sum_k (1/2 sigma_k^2) ||mu_theta(x_k) - mu_base(x_k)||^2``
  summed over the latent's dims and the steps (the chain rule of KL for the Markov chain, each step
  a Gaussian of the same sigma_k: nats per image; the per-step term is vfeedback.algorithms.ddpo
  ``gaussian_kl`` times the latent's dimension). Methods that sample with eta = 0 (ReFL, RAFT)
  have a deterministic sampler with no density; for them (our choice) the same measure on the
  eta = 1 version of their sampler (same UNet, steps and CFG). The base is a separate, frozen
  ``tiny:shapes`` (text encoder included: ReFL trains a text-encoder LoRA).

Writes ``bench/results/overoptimisation.json`` (every cell: config overrides, curves, final),
``docs/overoptimisation.png`` and the markdown table (stdout; docs/overoptimisation.md holds it).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

log = logging.getLogger("overoptimisation")

METHODS = ("grpo", "refl", "ddpo", "raft", "d3po")
GUARDS = ("none", "kl", "mean", "wco", "uwo", "par", "win_rate")
#: cells in the order they run (issue #18's priorities); --methods / --guards filter this list
PLAN = [("grpo", g) for g in GUARDS] + [("refl", g) for g in ("none", "mean", "wco", "uwo")] + \
       [("ddpo", "none"), ("ddpo", "kl"), ("raft", "none"), ("raft", "wco"), ("d3po", "none")]
PLAN += [(m, g) for m in ("ddpo", "raft", "d3po") for g in GUARDS if (m, g) not in PLAN]  # the rest of the matrix
from vfeedback.world.proxy_judges import N_PROXIES  # noqa: E402  (3: the ensemble guards use all)
KL_COEF = 0.01  # Flow-GRPO's PickScore setting, configs/grpo/shapes.yaml's value
UWO_LAMBDA = 0.5
EVAL_SEED = 4_000_000  # caption seed of the measurement set: outside every training range (docs/world.md)
GOLD, TRAIN_JUDGE = "shapes_judge_heldout", "shapes_judge"
RUNS = ROOT / "runs" / "overopt"
OUT = ROOT / "bench" / "results" / "overoptimisation.json"
FIG = ROOT / "docs" / "overoptimisation.png"


# ------------------------------------------------------------------------------ cells
class BudgetError(ValueError):
    """A --budget a method cannot spend exactly."""


def applicable(method: str, guard: str) -> Optional[str]:
    """None when ``guard`` applies to ``method``; else why not (one short phrase)."""
    if guard == "kl" and method not in ("ddpo", "grpo"):
        return "no KL term"
    if guard in ("par", "win_rate"):
        from vfeedback.algorithms import get_method

        if guard not in tuple(getattr(get_method(method), "reward_shaping", ())):
            return "needs a gradient through the reward" if getattr(get_method(method), "needs_differentiable_reward", False) else "not offered by the method"
    return None


def reward_override(guard: str) -> dict:
    """The ``reward`` section of a cell."""
    single = [{"name": "shapes_judge_proxy", "options": {"index": 0}}]
    if guard in ("mean", "wco", "uwo"):
        members = [{"name": "shapes_judge_proxy", "options": {"index": i}} for i in range(N_PROXIES)]
        return {"rewards": members, "ensemble": {"mode": guard, "uwo_lambda": UWO_LAMBDA}}
    if guard in ("par", "win_rate"):
        return {"rewards": single, "shaping": guard}
    return {"rewards": single}


def per_step_images(cfg) -> int:
    """Images the training reward judges per optimizer step (RAFT: per round)."""
    a = cfg.algorithm
    b = cfg.train.batch_size * cfg.train.gradient_accumulation_steps
    if a == "refl":
        return b
    if a == "ddpo":
        return b
    if a == "grpo":
        return b * cfg.grpo.group_size
    if a == "d3po":
        return b * cfg.d3po.group_size
    if a == "raft":
        return cfg.raft.prompts_per_round * cfg.raft.num_samples
    raise ValueError(a)


def judged_images(cfg, step: int) -> int:
    """Images judged by the training reward after ``step`` optimizer steps."""
    if cfg.algorithm == "raft":
        return math.ceil(step / cfg.raft.steps_per_round) * per_step_images(cfg)
    return step * per_step_images(cfg)


def cell_overrides(method: str, guard: str, budget: int, evals: int, out_dir: Path) -> list[str]:
    """Config overrides of one cell (on configs/<method>/shapes.yaml)."""
    ov = [f"output_dir={out_dir}", f"reward={json.dumps(reward_override(guard))}", "log.checkpoint_every=0", "log.trackers=[]"]
    if method in ("ddpo", "grpo"):
        ov.append(f"{method}.kl_coef={KL_COEF if guard == 'kl' else 0.0}")
    if method == "raft":
        ov += ["raft.prompts_per_round=4"]  # 4 prompts x best of 8 = 32 judged images a round
    if method == "d3po":
        ov += ["d3po.winrate_seeds=[1000]"]  # its own final win rate: one seed (not used here)
    from vfeedback.config import load_config

    cfg = load_config(ROOT / "configs" / method / "shapes.yaml", ov)
    per = per_step_images(cfg)
    if budget % per:
        raise BudgetError(f"--budget {budget}: {method} judges {per} images per {'round' if method == 'raft' else 'step'}; "
                          f"use a multiple of {per}")
    if method == "raft":
        rounds = budget // per
        steps = rounds * cfg.raft.steps_per_round
        every = cfg.raft.steps_per_round * max(1, rounds // evals)
    else:
        steps = budget // per
        every = max(1, steps // evals)
    return ov + [f"train.max_steps={steps}", f"log.eval_every={every}"]


# ------------------------------------------------------------------------------ the measure
def step_kl(mean: torch.Tensor, mean_ref: torch.Tensor, std) -> torch.Tensor:
    """KL(N(mean, std^2 I) || N(mean_ref, std^2 I)) per row, summed over the non-batch dims:
    ``||mean - mean_ref||^2 / (2 std^2)`` (nats), shape (B,)."""
    d = ((mean.double() - mean_ref.double()) ** 2).sum(dim=tuple(range(1, mean.ndim)))
    return d / (2 * torch.as_tensor(std, dtype=torch.float64) ** 2)


def eval_captions(n_per_kind: int) -> list[str]:
    """``n_per_kind`` generator captions of each kind (attribute, spatial, count), seed EVAL_SEED."""
    from rewards.shapes import KINDS
    from vfeedback.world.scenes import make_batch

    return [s.caption for j, k in enumerate(KINDS) for s in make_batch(n_per_kind, seed=EVAL_SEED + j, kind=k)[1]]


@torch.no_grad()
def path_kl_sample(policy, base, cond, cond_base, *, num_steps: int, guidance_scale: float, generators, eta: float = 1.0):
    """Sample with ``policy`` (DDIM, ``eta`` > 0) and, along its trajectory, sum :func:`step_kl`
    of its transition to ``base``'s at the same x_k. Returns (images (B, 3, H, W), kl (B,) nats)."""
    from vfeedback.sampling import _alpha, ddim_step, ddim_timesteps, initial_latents, predict_noise, randn, x0_clip

    x = initial_latents(policy, cond.embeds.shape[0], generators)
    ts = ddim_timesteps(policy, num_steps)
    gap = policy.scheduler.config.num_train_timesteps // num_steps
    pred, clip = policy.scheduler.config.prediction_type, x0_clip(policy)
    kl = torch.zeros(x.shape[0], dtype=torch.float64)
    for t in ts:
        noise = randn(x.shape, generators, x.device)
        a_t, a_prev = _alpha(policy, t), _alpha(policy, t - gap)
        e_p = predict_noise(policy, x, t, cond, guidance_scale)
        e_b = predict_noise(base, x, t, cond_base, guidance_scale)
        x_prev, _, _, mean_p, std = ddim_step(e_p, x, a_t, a_prev, eta, pred, noise=noise, clip=clip)
        _, _, _, mean_b, _ = ddim_step(e_b, x, a_t, a_prev, eta, pred, noise=noise, clip=clip)
        kl += step_kl(mean_p, mean_b, std).cpu()
        x = x_prev
    return policy.decode(x).float(), kl


def _finite_mean(v) -> float:
    f = [x for x in v if math.isfinite(x)]
    return sum(f) / len(f) if f else float("nan")


def run_cell(method: str, guard: str, budget: int, evals: int, n_eval: int, out_dir: Path) -> dict:
    """Train one cell in this process and return its record (also written to out_dir/overopt.json)."""
    import rewards
    from vfeedback.config import load_config
    from vfeedback.engine import Trainer, generator
    from vfeedback.models import load_model
    from vfeedback.sampling import sample

    ov = cell_overrides(method, guard, budget, evals, out_dir)
    cfg = load_config(ROOT / "configs" / method / "shapes.yaml", ov)
    captions = eval_captions(n_eval)
    proxies = [rewards.load("shapes_judge_proxy", index=i) for i in range(N_PROXIES)]
    gold, tj = rewards.load(GOLD), rewards.load(TRAIN_JUDGE)
    base = load_model("sd15", "tiny:shapes", resolution=cfg.model.resolution, dtype=torch.float32, device=torch.device("cpu"))
    s = cfg.sampling
    curve: list[dict] = []

    # step 0 is the base model (a fresh LoRA is zero) on the same captions, seeds and sampler for every
    # cell of a method: measured once, then reused
    step0 = out_dir.parent / f"step0-{method}-n{n_eval}.json"

    class Measured(Trainer):
        def evaluate(self, step: int) -> float:
            if step == 0 and step0.exists():
                rec = json.loads(step0.read_text())
                curve[:] = [c for c in curve if c["step"] != 0] + [rec]
                self.evals = [e for e in self.evals if e["step"] != 0] + [{"step": 0, "eval_reward": rec["proxy0"]}]
                log.info("%s/%s step 0: the base model's measurement from %s", method, guard, step0.name)
                return rec["proxy0"]
            t0 = time.time()
            m = self.model
            den, m.denoiser = m.denoiser, None  # the unwrapped UNet, as the engine's own eval
            try:
                n = len(captions)
                neg = [cfg.prompts.negative] * n
                use_cfg = s.guidance_scale > 1
                cond = m.encode_prompt(captions, neg, cfg=use_cfg)
                cond_b = base.encode_prompt(captions, neg, cfg=use_cfg)
                gens = lambda tag: [generator("overopt", tag, i) for i in range(n)]
                img_kl, kl = path_kl_sample(m, base, cond, cond_b, num_steps=s.steps, guidance_scale=s.guidance_scale,
                                            generators=gens("x"), eta=s.eta if s.eta > 0 else 1.0)
                if s.eta > 0:
                    images = img_kl  # the method's own sampler is the one the KL was measured on
                else:
                    images = sample(m, cond, num_steps=s.steps, guidance_scale=s.guidance_scale, eta=0.0,
                                    generator=gens("x")).images.float()
                sc = {f"proxy{i}": p(images, captions).float().tolist() for i, p in enumerate(proxies)}
                sc["gold"] = gold(images, captions).float().tolist()
                sc["train_judge"] = tj(images, captions).float().tolist()
            finally:
                m.denoiser = den
            rec = {"step": step, "judged_images": judged_images(cfg, step), "kl": float(kl.mean()),
                   "kl_sem": float(kl.std() / math.sqrt(len(kl))) if len(kl) > 1 else 0.0,
                   **{k: _finite_mean(v) for k, v in sc.items()},
                   "gold_acc": _finite_mean([float(v > 0.5) for v in sc["gold"]]),
                   "proxy0_acc": _finite_mean([float(v > 0.5) for v in sc["proxy0"]]),
                   "per_image": {**sc, "kl": kl.tolist()}, "eval_seconds": round(time.time() - t0, 1)}
            curve[:] = [c for c in curve if c["step"] != step] + [rec]
            if step == 0:
                step0.write_text(json.dumps(rec))
            log.info("%s/%s step %d (%d judged): proxy0 %.3f gold %.3f KL %.3f (%.0fs)", method, guard, step,
                     rec["judged_images"], rec["proxy0"], rec["gold"], rec["kl"], rec["eval_seconds"])
            self.evals = [e for e in self.evals if e["step"] != step] + [{"step": step, "eval_reward": rec["proxy0"]}]
            return rec["proxy0"]

        def check_export(self, final):  # the engine re-renders its own eval grid; this bench measures its own set
            return None

    t0 = time.time()
    Measured(cfg).fit()
    curve.sort(key=lambda c: c["step"])
    rec = {"method": method, "guard": guard, "budget": budget, "overrides": ov, "captions": captions,
           "wall_seconds": round(time.time() - t0, 1), "curve": curve, "status": "done"}
    (out_dir / "overopt.json").write_text(json.dumps(rec))
    return rec


# ------------------------------------------------------------------------------ report
def summarise(cell: dict) -> dict:
    """Final-vs-start deltas of one finished cell: proxy0, the optimised reward's members' mean,
    gold (with the paired standard error over images), gold's fall from its best point, final KL."""
    c = cell["curve"]
    first, last = c[0], c[-1]
    g0, g1 = first["per_image"]["gold"], last["per_image"]["gold"]
    diffs = [b - a for a, b in zip(g0, g1) if math.isfinite(a) and math.isfinite(b)]
    md = sum(diffs) / len(diffs)
    se = math.sqrt(sum((d - md) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs)) if len(diffs) > 1 else float("nan")
    proxies = sorted(k for k in first if k.startswith("proxy") and k[5:].isdigit())
    return {"proxy0_delta": last["proxy0"] - first["proxy0"],
            "proxies_delta": sum(last[k] - first[k] for k in proxies) / len(proxies),
            "gold_delta": md, "gold_delta_se": se,
            "gold_from_peak": last["gold"] - max(e["gold"] for e in c),
            "kl": last["kl"], "judged_images": last["judged_images"],
            "gold_falls": md < -2 * se}


def table(results: dict, methods=METHODS, guards=GUARDS) -> str:
    """Markdown table at the fixed budget: rows methods, columns guards; a cell reads
    ``proxy0 delta / gold delta +- se (KL)``, or why it did not run."""
    cells = {(c["method"], c["guard"]): c for c in results["cells"]}
    lines = ["| method | " + " | ".join(guards) + " |", "|---" * (len(guards) + 1) + "|"]
    for m in methods:
        row = []
        for g in guards:
            why = applicable(m, g)
            c = cells.get((m, g))
            if why:
                row.append(f"n/a ({why})")
            elif c is None or c.get("status") != "done":
                row.append("not run")
            else:
                s = summarise(c)
                mark = " **falls**" if s["gold_falls"] else ""
                row.append(f"{s['proxy0_delta']:+.3f} / {s['gold_delta']:+.3f}±{s['gold_delta_se']:.3f}{mark} (KL {s['kl']:.0f})")
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def figure(results: dict, path: Path) -> None:
    """Gold (solid) and proxy 0 (dashed) against judged images (top) and KL (bottom), one column per guard."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [c for c in results["cells"] if c.get("status") == "done"]
    guards = [g for g in GUARDS if any(c["guard"] == g for c in done)]
    if not guards:
        raise SystemExit("no finished cell to plot")
    colours = dict(zip(METHODS, ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]))
    fig, axes = plt.subplots(2, len(guards), figsize=(max(4.5, 3.0 * len(guards)), 5.6), squeeze=False, sharey=True)
    for j, g in enumerate(guards):
        for c in done:
            if c["guard"] != g:
                continue
            xs = [e["judged_images"] for e in c["curve"]]
            kl = [e["kl"] for e in c["curve"]]
            for row, x in ((0, xs), (1, kl)):
                ax = axes[row][j]
                ax.plot(x, [e["gold"] for e in c["curve"]], "-o", ms=3, color=colours[c["method"]], label=f"{c['method']} gold")
                ax.plot(x, [e["proxy0"] for e in c["curve"]], "--", color=colours[c["method"]], alpha=0.7, label=f"{c['method']} proxy0")
        axes[0][j].set_title(f"guard: {g}")
        axes[0][j].set_xlabel("judged images")
        axes[1][j].set_xlabel("KL to base (nats / image)")
        axes[1][j].set_xscale("symlog", linthresh=1.0)
        axes[0][j].legend(fontsize=6)
    axes[0][0].set_ylabel("mean P(match)")
    axes[1][0].set_ylabel("mean P(match)")
    fig.suptitle("gold judge (solid) vs proxy 0 (dashed)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def collect(runs: Path, budget: int) -> dict:
    """Every finished cell under ``runs`` at ``budget``, with the proxies' manifest figures."""
    from rewards.shapes import PROXY_MANIFEST

    man = json.loads(PROXY_MANIFEST.read_text())
    cells = []
    for p in sorted(runs.glob(f"b{budget}-*/overopt.json")):
        c = json.loads(p.read_text())
        c["summary"] = summarise(c)
        cells.append(c)
    return {"budget": budget, "n_proxies": N_PROXIES, "gold": GOLD,
            "proxies": [{"index": e["index"], "accuracy": e["metrics"]["match_accuracy"]["overall"],
                         "agreement_with_gold": e["metrics"]["vs_gold"]["verdict_agreement"]["overall"]} for e in man["proxies"]],
            "gold_accuracy": man["gold_metrics"]["match_accuracy"]["overall"], "cells": cells}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return pid > 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--guards", default=",".join(GUARDS))
    ap.add_argument("--budget", type=int, default=160, help="images judged by the training reward per run (default %(default)s)")
    ap.add_argument("--evals", type=int, default=4, help="measurements after step 0 (default %(default)s)")
    ap.add_argument("--n-eval", type=int, default=8, help="measurement captions per kind (default %(default)s)")
    ap.add_argument("--runs", type=Path, default=RUNS)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--fig", type=Path, default=FIG)
    ap.add_argument("--report", action="store_true", help="only collect finished cells: JSON, table, figure")
    ap.add_argument("--cell", nargs=2, metavar=("METHOD", "GUARD"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    methods = [m for m in args.methods.split(",") if m]
    guards = [g for g in args.guards.split(",") if g]
    for m in methods:
        if m not in METHODS:
            print(f"--methods: unknown method {m!r}; one of {', '.join(METHODS)}", file=sys.stderr)
            return 2
    for g in guards:
        if g not in GUARDS:
            print(f"--guards: unknown guard {g!r}; one of {', '.join(GUARDS)}", file=sys.stderr)
            return 2
    if args.cell:
        m, g = args.cell
        run_cell(m, g, args.budget, args.evals, args.n_eval, args.runs / f"b{args.budget}-{m}-{g}")
        return 0
    if not args.report:
        todo = [(m, g) for m, g in PLAN if m in methods and g in guards and applicable(m, g) is None]
        try:  # every cell's budget is checked before the first one trains
            for m, g in todo:
                cell_overrides(m, g, args.budget, args.evals, args.runs / "check")
        except BudgetError as e:
            print(e, file=sys.stderr)
            return 2
        for m, g in todo:
            d = args.runs / f"b{args.budget}-{m}-{g}"
            if (d / "overopt.json").exists():
                log.info("%s/%s: done, skipped", m, g)
                continue
            lock = args.runs / f"b{args.budget}-{m}-{g}.lock"  # another invocation may be running this cell
            if lock.exists() and _alive(int(lock.read_text() or 0)):
                log.info("%s/%s: running in process %s, skipped", m, g, lock.read_text())
                continue
            shutil.rmtree(d, ignore_errors=True)  # an unfinished cell starts again
            args.runs.mkdir(parents=True, exist_ok=True)
            lock.write_text(str(os.getpid()))
            t0 = time.time()
            rc = subprocess.call([sys.executable, __file__, "--cell", m, g, "--budget", str(args.budget), "--evals", str(args.evals),
                                  "--n-eval", str(args.n_eval), "--runs", str(args.runs)], env={**os.environ, "PYTHONPATH": str(ROOT)})
            log.info("%s/%s: exit %d after %.0fs", m, g, rc, time.time() - t0)
            lock.unlink(missing_ok=True)
    res = collect(args.runs, args.budget)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    if res["cells"]:
        figure(res, args.fig)
    print(table(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
