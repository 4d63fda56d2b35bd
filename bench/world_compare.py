"""ReFL, D3PO, ZO-RankSGD, DDPO, GRPO, RAFT, Diffusion-DPO and DRaFT-K on the shapes world, side by side: the same training prompts, the
same budget of judged images, the same training judge; then one evaluation for all of them on
held-out prompts and seeds with both judges.

    OMP_NUM_THREADS=1 python bench/world_compare.py            # train the three runs, then evaluate
    python bench/world_compare.py --no-train                    # evaluate existing run folders only

Writes bench/results/world_compare.json and world_compare.png (rows: base, then each method, on
the same held-out prompts and seeds). Called by ``bench/world_report.py --compare``.

The budget is counted in images scored by the training judge (``budget_images``):

- ReFL: ``max_steps x batch_size`` images, each with a gradient through the judge;
- D3PO: ``max_steps x batch_size x group_size`` images, each compared with its group (the
  judge only ranks);
- ZO-RankSGD (target ``lora``): ``rounds x num_candidates x (eval prompts x seeds)`` images, the
  judge only ranks candidates by their mean score.
- DDPO / GRPO: ``max_steps x batch_size x gradient_accumulation_steps``
  (x ``group_size``) images, each scored once; the score only enters through its advantage.

``refl_half`` (the quickstart's 40 steps) has half the budget; ``d3po_x3`` and ``zo_ranksgd_x3``
three times (120 steps, 30 rounds).

Evaluation (the same for every method and for the base model): ``n_per_kind`` captions of each
kind from the generator with a seed no method trained on, one sample each, the base rate's
sampler (DDIM 20 steps, eta 0, CFG 4). Per judge: mean P(match) and accuracy (P > 0.5) per kind.
``gap`` = training-judge accuracy - held-out-judge accuracy after training, minus the same
before: how much of the training judge's rise the held-out judge does not confirm (reward
hacking shows as a large positive gap).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: name -> (config, overrides); every run scores BUDGET images with shapes_judge (refl_half: half, d3po_x3: 3x)
BUDGET = 320
METHODS = {
    "refl": ("configs/refl/shapes.yaml", ["train.max_steps=80", "log.eval_every=40", "log.checkpoint_every=0"]),
    # the quickstart's recipe: half the budget (ReFL at lr 1e-3 peaks near 40 steps, then falls)
    "refl_half": ("configs/refl/shapes.yaml", ["train.max_steps=40", "log.eval_every=20", "log.checkpoint_every=0"]),
    "d3po": ("configs/d3po/shapes.yaml", ["log.eval_every=20", "log.checkpoint_every=0"]),
    "zo_ranksgd": ("configs/zo_ranksgd/shapes.yaml", ["zo_ranksgd.rounds=10"]),
    # three times the budget: D3PO's comparisons need more images than ReFL's gradients
    "zo_ranksgd_x3": ("configs/zo_ranksgd/shapes.yaml", ["zo_ranksgd.rounds=30"]),
    "d3po_x3": ("configs/d3po/shapes.yaml", ["train.max_steps=120", "log.eval_every=0", "log.checkpoint_every=40", "log.keep_checkpoints=3"]),
    # 40 epochs of 8 sampled images each
    "ddpo": ("configs/ddpo/shapes.yaml", ["log.eval_every=20", "log.checkpoint_every=0"]),
    "grpo": ("configs/grpo/shapes.yaml", ["log.eval_every=20", "log.checkpoint_every=0"]),
    # offline: 160 pairs judged once (320 images), then DPO on them
    "diffusion_dpo": ("configs/diffusion_dpo/shapes.yaml", []),
    # DRaFT-1 and DRaFT-2 (docs/draft.md): refl_half's budget (40 steps x 4 images)
    "draft_k1": ("configs/draft/shapes.yaml", ["draft.k=1", "log.eval_every=20", "log.checkpoint_every=0"]),
    "draft_k2": ("configs/draft/shapes.yaml", ["log.eval_every=20", "log.checkpoint_every=0"]),
    "draft_k4": ("configs/draft/shapes.yaml", ["draft.k=4", "log.eval_every=20", "log.checkpoint_every=0"]),
    # online RAFT: 5 rounds x 8 prompts x best of 8 samples = 320 judged images
    "raft": ("configs/raft/shapes.yaml", ["log.eval_every=0", "log.checkpoint_every=0"]),
}
DEFAULT_METHODS = list(METHODS)


def _machine() -> str:
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 0)
    return f"{n} CPU cores, {os.environ.get('OMP_NUM_THREADS', 'all')} thread(s) per run"


def budget_images(cfg) -> int:
    if cfg.algorithm in ("refl", "draft"):
        return cfg.train.max_steps * cfg.train.batch_size * cfg.train.gradient_accumulation_steps
    if cfg.algorithm == "d3po":
        return cfg.train.max_steps * cfg.train.batch_size * cfg.train.gradient_accumulation_steps * cfg.d3po.group_size
    if cfg.algorithm in ("ddpo", "grpo"):
        g = cfg.grpo.group_size if cfg.algorithm == "grpo" else 1
        return cfg.train.max_steps * cfg.train.batch_size * cfg.train.gradient_accumulation_steps * g
    if cfg.algorithm == "diffusion_dpo":  # each generated pair's two images, judged once
        return 2 * cfg.diffusion_dpo.world_pairs
    if cfg.algorithm == "raft":  # online: every round samples num_samples images for each of its prompts
        rounds = cfg.train.max_steps // cfg.raft.steps_per_round
        return rounds * cfg.raft.prompts_per_round * cfg.raft.num_samples
    if cfg.algorithm == "zo_ranksgd":
        return cfg.zo_ranksgd.rounds * cfg.zo_ranksgd.num_candidates * len(cfg.prompts.eval) * len(cfg.prompts.eval_seeds)
    raise ValueError(cfg.algorithm)


def train(name: str, out: Path, force: bool) -> float:
    cfg_path, overrides = METHODS[name]
    if (out / "summary.json").exists() and not force:
        return json.loads((out / "summary.json").read_text())["wall_time_s"]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    cmd = [sys.executable, "-m", "vfeedback", "train", str(ROOT / cfg_path), f"output_dir={out}", *overrides]
    print("+", " ".join(cmd), flush=True)
    t0 = time.time()
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    return time.time() - t0


def evaluate(model, prompts, kinds, seeds):
    from vfeedback.world.train_world import judge_table, sample_images

    images = sample_images(model, prompts, seeds)
    held, p_held = judge_table(images, prompts, kinds, "shapes_judge_heldout")
    trn, p_trn = judge_table(images, prompts, kinds, "shapes_judge")
    return images, {"train_judge": trn, "heldout_judge": held,
                    "judges_agree": float(((p_held > 0.5) == (p_trn > 0.5)).float().mean()),
                    # per caption (in prompt order): does each judge call the image a match
                    "heldout_match": [int(v) for v in (p_held > 0.5).tolist()],
                    "train_match": [int(v) for v in (p_trn > 0.5).tolist()]}


def cached_evaluate(cache: Path, key: str, make_model, prompts, kinds, seeds):
    """``evaluate`` of ``make_model()``, kept in ``cache`` (a .pt beside the run) under ``key``
    (the LoRA file's hash and the evaluation's settings): a later call with the same key reads
    it back instead of sampling 288 images again, so runs can be evaluated as they finish."""
    if cache.exists():
        got = torch.load(cache, weights_only=False)
        if got.get("key") == key:
            return got["images"], got["ev"]
    images, ev = evaluate(make_model(), prompts, kinds, seeds)
    keep = images[:: max(1, len(prompts) // 8)][:8].clone()  # the grid's row only
    torch.save({"key": key, "images": keep, "ev": ev}, cache)
    return keep, ev


def _sha256(path: Path) -> str:
    from vfeedback.rundir import sha256_file

    return sha256_file(path)


def paired_delta_ci(before, after, n_boot: int = 2000, seed: int = 0) -> list[float]:
    """95% percentile bootstrap interval of mean(after) - mean(before) over captions resampled
    in pairs (the base and the tuned model see the same captions and seeds, so the pairing
    removes the captions' own difficulty from the interval)."""
    b = torch.tensor(before, dtype=torch.float64)
    a = torch.tensor(after, dtype=torch.float64)
    if b.shape != a.shape or b.numel() == 0:
        raise ValueError(f"paired_delta_ci: {b.shape} and {a.shape} are not one non-empty pairing")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, b.numel(), (n_boot, b.numel()), generator=g)
    d = (a - b)[idx].mean(dim=1)
    return [round(float(torch.quantile(d, 0.025)), 4), round(float(torch.quantile(d, 0.975)), 4)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", default=str(ROOT / "runs" / "world-compare"), help="folder of the three run folders")
    ap.add_argument("--no-train", action="store_true", help="evaluate the run folders that exist; train nothing")
    ap.add_argument("--force", action="store_true", help="retrain even where a finished run exists")
    ap.add_argument("--train-only", action="store_true",
                    help="train the runs and stop (run several in parallel, then one --no-train evaluation of all)")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    ap.add_argument("--n-per-kind", type=int, default=96)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "world_compare.json"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)

    from vfeedback.config import load_config
    from vfeedback.models import load_model
    from vfeedback.models.lora import load_lora_into
    from vfeedback.rundir import save_grid
    from vfeedback.world.train_world import base_prompts

    runs = Path(args.runs)
    names = [m for m in args.methods.split(",") if m]
    wall = {}
    for name in names:
        if not args.no_train:
            wall[name] = train(name, runs / name, args.force)
    if args.train_only:
        return 0

    # held-out prompts (a generator seed no prompt file or base rate uses) and sampling seeds
    prompts, kinds, seeds = base_prompts(args.n_per_kind, seed=789)
    seeds = [20_000 + s for s in seeds]
    report = {"command": "OMP_NUM_THREADS=1 python bench/world_compare.py", "machine": _machine(),
              "budget_images": BUDGET, "eval": {"n_per_kind": args.n_per_kind, "prompt_seed": 789,
                                                 "sampler": "DDIM 20 steps, eta 0, CFG 4"}, "methods": {}}
    settings = f"n_per_kind={args.n_per_kind};prompt_seed=789;seeds=20000+;DDIM20;cfg4"
    runs.mkdir(parents=True, exist_ok=True)
    base_images, report["base"] = cached_evaluate(runs / "base_eval.pt", "base;" + settings,
                                                  lambda: load_model("sd15", "tiny:shapes"), prompts, kinds, seeds)
    print("base", json.dumps(report["base"]["heldout_judge"]["overall"]), flush=True)
    rows, labels = [base_images], ["base"]
    for name in names:
        folder = runs / name
        if not (folder / "summary.json").exists():
            print(f"{name}: no finished run in {folder}; skipped", flush=True)
            continue
        summary = json.loads((folder / "summary.json").read_text())
        cfg = load_config(str(folder / "config.yaml"))
        def make_model(folder=folder):
            model = load_model("sd15", "tiny:shapes")
            load_lora_into(model, folder / "lora")
            return model

        key = f"{_sha256(folder / 'lora' / 'pytorch_lora_weights.safetensors')};{settings}"
        images, ev = cached_evaluate(folder / "world_compare_eval.pt", key, make_model, prompts, kinds, seeds)
        b, a = report["base"], ev
        gap = ((a["train_judge"]["overall"]["accuracy"] - a["heldout_judge"]["overall"]["accuracy"])
               - (b["train_judge"]["overall"]["accuracy"] - b["heldout_judge"]["overall"]["accuracy"]))
        report["methods"][name] = {
            "config": METHODS[name][0], "overrides": METHODS[name][1], "algorithm": cfg.algorithm,
            "budget_images": budget_images(cfg),
            "wall_time_s": round(summary.get("wall_time_s", wall.get(name, float("nan"))), 1),
            "training_reward_before": summary.get("eval_reward_before"), "training_reward_after": summary.get("eval_reward_after"),
            "heldout": ev,
            "train_judge_accuracy": [b["train_judge"]["overall"]["accuracy"], a["train_judge"]["overall"]["accuracy"]],
            "heldout_judge_accuracy": [b["heldout_judge"]["overall"]["accuracy"], a["heldout_judge"]["overall"]["accuracy"]],
            "heldout_judge_accuracy_per_kind": {k: [b["heldout_judge"][k]["accuracy"], a["heldout_judge"][k]["accuracy"]]
                                                for k in ("attribute", "count", "spatial")},
            "gap": round(gap, 4),
            "heldout_delta_ci95": paired_delta_ci(b["heldout_match"], a["heldout_match"]),
            "train_delta_ci95": paired_delta_ci(b["train_match"], a["train_match"]),
        }
        m = report["methods"][name]
        print(f"{name}: budget {m['budget_images']} images, {m['wall_time_s']} s; train-judge acc "
              f"{m['train_judge_accuracy'][0]:.3f} -> {m['train_judge_accuracy'][1]:.3f}; held-out acc "
              f"{m['heldout_judge_accuracy'][0]:.3f} -> {m['heldout_judge_accuracy'][1]:.3f}; gap {gap:+.3f}", flush=True)
        rows.append(images)
        labels.append(name)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    shown = prompts[:: max(1, len(prompts) // 8)][:8]
    caps = [p for _ in rows for p in shown]
    save_grid(torch.cat(rows), out.with_suffix(".png"), captions=caps, ncol=len(shown), row_labels=labels)
    print("wrote", out, "and", out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
