"""RAFT on the shapes world, evaluated as bench/world_compare.py evaluates ReFL, D3PO and
ZO-RankSGD: the same held-out prompts (generator seed 789, ``n_per_kind`` per kind), the same
sampling seeds and sampler, both judges, base model against the trained LoRA.

    OMP_NUM_THREADS=1 python bench/raft_shapes.py                 # train configs/raft/shapes.yaml, then evaluate
    python bench/raft_shapes.py --run runs/raft-shapes --no-train  # evaluate an existing run folder

Writes bench/results/raft_shapes.json. ``gap`` is world_compare's: training-judge accuracy minus
held-out-judge accuracy after training, minus the same before (reward hacking shows as a large
positive gap). The budget (images scored by the training judge) is rounds x prompts_per_round x
num_samples: 320 with the shipped config, world_compare's BUDGET.
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
sys.path.insert(0, str(ROOT / "bench"))

CONFIG = "configs/raft/shapes.yaml"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default=str(ROOT / "runs" / "raft-shapes"))
    ap.add_argument("--no-train", action="store_true")
    ap.add_argument("--n-per-kind", type=int, default=96)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "raft_shapes.json"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    run = Path(args.run)
    cmd = [sys.executable, "-m", "vfeedback", "train", str(ROOT / CONFIG), f"output_dir={run}"]
    if not args.no_train and not (run / "summary.json").exists():
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")))

    from world_compare import evaluate

    from vfeedback.config import load_config
    from vfeedback.models import load_model
    from vfeedback.models.lora import load_lora_into
    from vfeedback.world.train_world import base_prompts

    prompts, kinds, seeds = base_prompts(args.n_per_kind, seed=789)  # world_compare's held-out set
    seeds = [20_000 + s for s in seeds]
    t0 = time.time()
    _, base = evaluate(load_model("sd15", "tiny:shapes"), prompts, kinds, seeds)
    model = load_model("sd15", "tiny:shapes")
    load_lora_into(model, run / "lora")
    _, ev = evaluate(model, prompts, kinds, seeds)
    summary = json.loads((run / "summary.json").read_text())
    cfg = load_config(str(run / "config.yaml"))
    r = cfg.raft
    rounds = -(-cfg.train.max_steps // r.steps_per_round)
    acc = lambda d, j: d[j]["overall"]["accuracy"]
    gap = (acc(ev, "train_judge") - acc(ev, "heldout_judge")) - (acc(base, "train_judge") - acc(base, "heldout_judge"))
    res = {
        "config": CONFIG, "command": "python " + " ".join(["bench/raft_shapes.py", *(argv if argv is not None else sys.argv[1:])]),
        "train_command": f"vfeedback train {CONFIG} output_dir={run}",
        "budget_images": rounds * r.prompts_per_round * r.num_samples,
        "wall_time_s": summary.get("wall_time_s"),
        "eval": {"n_per_kind": args.n_per_kind, "prompt_seed": 789, "sampler": "DDIM 20 steps, eta 0, CFG 4", "eval_time_s": round(time.time() - t0, 1)},
        "training_reward_before": summary.get("eval_reward_before"), "training_reward_after": summary.get("eval_reward_after"),
        "train_judge_accuracy": [acc(base, "train_judge"), acc(ev, "train_judge")],
        "heldout_judge_accuracy": [acc(base, "heldout_judge"), acc(ev, "heldout_judge")],
        "heldout_judge_accuracy_per_kind": {k: [base["heldout_judge"][k]["accuracy"], ev["heldout_judge"][k]["accuracy"]]
                                            for k in ("attribute", "count", "spatial")},
        "gap": round(gap, 4),
        "base": base, "raft": ev,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(f"raft: budget {res['budget_images']} images; train-judge acc {res['train_judge_accuracy'][0]:.3f} -> "
          f"{res['train_judge_accuracy'][1]:.3f}; held-out acc {res['heldout_judge_accuracy'][0]:.3f} -> "
          f"{res['heldout_judge_accuracy'][1]:.3f}; gap {gap:+.3f}; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
