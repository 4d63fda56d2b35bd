"""The shapes world's report card: how well the judges read generator scenes, and how often
the shipped ``tiny:shapes`` model draws what its caption asks, per caption kind.

    OMP_NUM_THREADS=1 python bench/world_report.py [--n-per-kind 300] [--model-n-per-kind 64] [--compare]

Writes bench/results/world_report.json (and world_report_samples.png: scenes and samples).

- judges: match accuracy (each scene with its caption and with a hard negative: swapped
  colours, reversed relation, a count off by one) per kind, exact reading of all 24 category
  counts, centre error; on fresh scenes from a seed no judge trained on.
- model: tiny:shapes sampled (DDIM 20 steps, CFG 4) on a seeded prompt set; per kind, the
  fraction of images each judge says match (P > 0.5), mean P, the per-term accuracies, and
  how often the two judges agree.
- with ``--compare``: the methods side by side (bench/world_compare.py, world_compare.json).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-per-kind", type=int, default=300, help="generator scenes per kind for judge accuracy")
    ap.add_argument("--model-n-per-kind", type=int, default=64, help="tiny:shapes prompts per kind")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "world_report.json"))
    ap.add_argument("--compare", action="store_true",
                    help="also ReFL, D3PO and ZO-RankSGD on one budget (bench/world_compare.py: trains them, ~20 min on 2 cores)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)

    from rewards.shapes import ASSETS, load_judge
    from vfeedback.models import load_model
    from vfeedback.world.judge import JUDGES, evaluate
    from vfeedback.world.scenes import grid, make_batch
    from vfeedback.world.train_world import BASE_GUIDANCE, BASE_STEPS, base_prompts, judge_table, sample_images

    report = {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(), "judges": {}}
    for name in JUDGES:
        t0 = time.time()
        res = evaluate(load_judge(ASSETS / f"{name}.safetensors"), n_per_kind=args.n_per_kind, seed=31)
        res["seconds"] = round(time.time() - t0, 1)
        res["n_scenes_per_kind"] = args.n_per_kind
        report["judges"][name] = res
        print(name, json.dumps(res), flush=True)

    model = load_model("sd15", "tiny:shapes")
    # a prompt set disjoint from the recorded base rate's (seed 123)
    prompts, kinds, seeds = base_prompts(args.model_n_per_kind, seed=456)
    seeds = [10_000 + s for s in seeds]
    t0 = time.time()
    images = sample_images(model, prompts, seeds, steps=BASE_STEPS, guidance=BASE_GUIDANCE)
    secs = time.time() - t0
    held, p_held = judge_table(images, prompts, kinds, "shapes_judge_heldout")
    train, p_train = judge_table(images, prompts, kinds, "shapes_judge")
    report["model"] = {
        "model": "tiny:shapes", "n_per_kind": args.model_n_per_kind, "prompt_seed": 456,
        "sampler": {"steps": BASE_STEPS, "guidance_scale": BASE_GUIDANCE, "eta": 0.0}, "sampling_seconds": round(secs, 1),
        "heldout_judge": held, "train_judge": train,
        "judges_agree": float(((p_held > 0.5) == (p_train > 0.5)).float().mean()),
    }
    print("model", json.dumps(report["model"]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    scenes, _ = make_batch(16, seed=0)
    pick = torch.cat([images[k * args.model_n_per_kind:k * args.model_n_per_kind + 8] for k in range(3)])
    grid(torch.cat([scenes, pick]), nrow=8, scale=4).save(out.with_name("world_report_samples.png"))
    (out.with_name("world_report_samples.txt")).write_text(
        "rows 1-2: generator scenes (seed 0); rows 3-5: tiny:shapes samples of these prompts:\n"
        + "\n".join(prompts[k * args.model_n_per_kind + i] for k in range(3) for i in range(8)) + "\n")
    print("wrote", out)
    if args.compare:
        sys.path.insert(0, str(ROOT / "bench"))
        from world_compare import main as compare

        return compare([])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
