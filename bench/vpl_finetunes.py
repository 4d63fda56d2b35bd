"""Do the per-person VPL fine-tunes move the images each person's way? (docs/vpl.md, issue #20)

    OMP_NUM_THREADS=1 python bench/vpl_finetunes.py --runs runs --json bench/results/vpl_finetunes.json

The runs are ``runs/refl-vpl-<person>`` (``configs/refl/vpl_shapes.yaml`` with that person's VPL
reward, after ``bench/vpl_shapes.py`` built the VPL model). The base ``tiny:shapes`` and each run,
loaded through its exported LoRA (diffusers' ``load_lora_weights``, via
``vfeedback.models.lora.load_lora_into``), draw one image for each of world_compare's 288
held-out captions (generator seed 789, 96 per kind; sampling seed 20000 + i; DDIM 20 steps, CFG 4:
the runs' sampler). Every image is measured by the three simulated people
(``rewards.shapes_people``: alice's red, bob's blue, carol's coloured fraction) and the held-out
judge. Reported:

* per model and person: the mean utility and its paired change over the base (95% bootstrap
  interval over captions, as world_compare);
* **judged by each person's own preference** (``rewards.shapes_people.prefers``: the higher
  utility, a difference under half a percent of the pixels a tie): for person P, P's answers
  between the image of P's own run and the image of every other model for the same caption and
  seed: wins, losses, ties, the share of decided pairs P gives to their own run, and a two-sided
  sign test on the decided pairs.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

PEOPLE = ("alice", "bob", "carol")


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign test on ``wins`` against ``losses`` (ties dropped): P(as extreme | p = 1/2)."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def duel(u_own: torch.Tensor, u_other: torch.Tensor) -> dict:
    """One person's answers between paired images (own run's vs another model's), by their utility."""
    from rewards.shapes_people import prefers

    s = prefers(u_own, u_other)
    w, l = int((s > 0).sum()), int((s < 0).sum())
    return {"wins": w, "losses": l, "ties": int((s == 0).sum()),
            "own_share": round(w / (w + l), 4) if w + l else float("nan"), "sign_test_p": float(f"{sign_test(w, l):.3g}")}


def measure(images: torch.Tensor, prompts, kinds) -> dict:
    """Per-image utilities of the three people and the held-out judge's P(match)."""
    from rewards.shapes_people import utility
    from vfeedback.world.train_world import judge_table

    out = {p: utility(images, p) for p in PEOPLE}
    _, p_held = judge_table(images, prompts, kinds, "shapes_judge_heldout")
    out["heldout"] = p_held.float()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=Path, default=ROOT / "runs", help="folder holding refl-vpl-<person> (default %(default)s)")
    ap.add_argument("--n-per-kind", type=int, default=96)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    from world_compare import paired_delta_ci

    from vfeedback.models import load_model
    from vfeedback.models.lora import load_lora_into
    from vfeedback.world.train_world import base_prompts, sample_images

    t0 = time.time()
    prompts, kinds, seeds = base_prompts(args.n_per_kind, seed=789)
    seeds = [20_000 + s for s in seeds]
    missing = [p for p in PEOPLE if not (args.runs / f"refl-vpl-{p}" / "lora" / "pytorch_lora_weights.safetensors").exists()]
    if missing:
        print(f"error: --runs {args.runs}: no exported LoRA for {', '.join(missing)} (expected refl-vpl-<person>/lora/; "
              "train them with configs/refl/vpl_shapes.yaml first)", file=sys.stderr)
        return 2
    scores = {}
    for name in ("base",) + PEOPLE:
        model = load_model("sd15", "tiny:shapes")
        if name != "base":
            load_lora_into(model, args.runs / f"refl-vpl-{name}" / "lora")
        scores[name] = measure(sample_images(model, prompts, seeds), prompts, kinds)
        print(name, {k: round(float(v.mean()), 4) for k, v in scores[name].items()}, flush=True)

    models = {}
    for name, sc in scores.items():
        models[name] = {k: {"mean": round(float(v.mean()), 5)} for k, v in sc.items()}
        if name != "base":
            for k, v in sc.items():
                d = float((v - scores["base"][k]).mean())
                models[name][k].update(delta=round(d, 5), ci95=paired_delta_ci(scores["base"][k].tolist(), v.tolist()))
    own = {p: {q: duel(scores[p][p], scores[q][p]) for q in ("base",) + PEOPLE if q != p} for p in PEOPLE}
    runs = {}
    for p in PEOPLE:
        s = json.loads((args.runs / f"refl-vpl-{p}" / "summary.json").read_text())
        runs[p] = {k: s.get(k) for k in ("wall_time_s", "eval_reward_before", "eval_reward_exported")}
    rep = {"n_captions": len(prompts), "caption_seed": 789, "sampling_seed_offset": 20_000, "models": models,
           "own_run_vs": own, "runs": runs, "wall_seconds": round(time.time() - t0, 1), "torch": torch.__version__}

    print("\n| fine-tuned for | alice: red | bob: blue | carol: coloured | held-out judge |")
    print("|---|---|---|---|---|")
    for name in ("base",) + PEOPLE:
        cells = []
        for k in PEOPLE + ("heldout",):
            m = models[name][k]
            txt = f"{m['mean']:.4f}" if name == "base" else f"{m['mean']:.4f} ({m['delta']:+.4f} [{m['ci95'][0]:+.4f}, {m['ci95'][1]:+.4f}])"
            cells.append(f"**{txt}**" if k == name else txt)
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\n| person | own run vs base | vs alice's run | vs bob's run | vs carol's run |")
    print("|---|---|---|---|---|")
    for p in PEOPLE:
        cells = []
        for q in ("base",) + PEOPLE:
            if q == p:
                cells.append("")
                continue
            d = own[p][q]
            cells.append(f"{d['wins']}-{d['losses']} ({d['ties']} ties): {d['own_share']:.2f}, p={d['sign_test_p']:.2g}")
        print(f"| {p} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rep, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
