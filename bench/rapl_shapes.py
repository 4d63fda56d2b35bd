"""RAPL vs VLM-RM vs an unaligned encoder on ``vfeedback/ShapesReach-v0`` (docs/rapl.md).

For each number of preferences (10 / 50 / 200 triplets from the scripted person) and seed, the
projection on the frozen shapes-judge trunk is aligned (rewards/rapl.py) and every reward is
correlated with the true reward on held-out scripted episodes: per frame (Pearson, Spearman)
and per episode return (Spearman). One CPU thread:

    OMP_NUM_THREADS=1 python bench/rapl_shapes.py --out bench/results/rapl_shapes.json

Bad arguments exit 2 with one line naming the flag.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _ints(flag: str, text: str, lo: int) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        vals = []
    if not vals or min(vals) < lo:
        raise SystemExit(f"{flag}: expected comma-separated integers >= {lo}, got {text!r}")
    return vals


def corr(pred: np.ndarray, true: np.ndarray) -> dict:
    from scipy.stats import pearsonr, spearmanr

    p, t = pred.ravel(), true.ravel()
    ep_p, ep_t = pred.sum(1), true.sum(1)
    return {"pearson": float(pearsonr(p, t)[0]), "spearman": float(spearmanr(p, t)[0]),
            "episode_spearman": float(spearmanr(ep_p, ep_t)[0])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefs", default="10,50,200", help="numbers of preference triplets (comma-separated)")
    ap.add_argument("--seeds", default="0,1,2", help="seeds (triplet draw and projection init)")
    ap.add_argument("--pool", type=int, default=100, help="scripted episodes the person is asked about")
    ap.add_argument("--test", type=int, default=40, help="held-out scripted episodes scored")
    ap.add_argument("--demos", type=int, default=4, help="preferred demonstrations (expert episodes)")
    ap.add_argument("--steps", type=int, default=150, help="gradient steps per alignment")
    ap.add_argument("--val-fraction", type=float, default=0.0, help="share of the person's triplets held out for early stopping")
    ap.add_argument("--epsilon", type=float, default=1.0, help="Sinkhorn entropic regularisation")
    ap.add_argument("--out", default=None, help="JSON file to write")
    try:
        args = ap.parse_args(argv)
        prefs = _ints("--prefs", args.prefs, 1)
        seeds = _ints("--seeds", args.seeds, 0)
        for flag, v, lo in (("--pool", args.pool, 2), ("--test", args.test, 3), ("--demos", args.demos, 1), ("--steps", args.steps, 1)):
            if v < lo:
                raise SystemExit(f"{flag}: must be >= {lo}, got {v}")
        if not 0.0 <= args.val_fraction < 1.0:
            raise SystemExit(f"--val-fraction: must be in [0, 1), got {args.val_fraction}")
        if not (args.epsilon > 0 and math.isfinite(args.epsilon)):
            raise SystemExit(f"--epsilon: must be a finite number > 0, got {args.epsilon}")
    except SystemExit as e:
        if isinstance(e.code, str):
            print(f"rapl_shapes: {e.code}", file=sys.stderr)
            return 2
        return 2 if e.code else 0
    torch.set_num_threads(1)

    import rewards
    from rewards.itercomp_rm import ShapesReader
    from rewards.rapl import RAPLModel
    from vfeedback.integrations.gym import vlm_rm_reward
    from vfeedback.integrations.shapes_reach import GOAL_CAPTIONS, ScriptedPerson, scripted_episodes

    t0 = time.time()
    tchw = lambda a: torch.from_numpy(a).permute(0, 1, 4, 2, 3)
    demos, demo_rw = scripted_episodes(args.demos, 1, expert=True)
    pool, pool_rw = scripted_episodes(args.pool, 0)
    test, test_rw = scripted_episodes(args.test, 99)
    spec = {"kind": "shapes_trunk", "which": "judge", "pool": 4}
    base = RAPLModel(spec, tchw(demos), epsilon=args.epsilon)
    feats = base.video_features(torch.cat([tchw(demos), tchw(pool)]))
    test_feats = base.video_features(tchw(test))
    n_demo = args.demos
    person = ScriptedPerson(np.concatenate([demo_rw.sum(1), pool_rw.sum(1)]))
    data_s = time.time() - t0

    def score(model) -> np.ndarray:
        return torch.stack([model.rewards_from_embeddings(model.project(f)) for f in test_feats]).numpy()

    results: dict = {"baselines": {}, "rapl": {}}
    # caption-grounded baselines (not CLIP: the shapes world's judge; see docs/rapl.md)
    frames = tchw(test).flatten(0, 1).float() / 255.0
    judge = rewards.load("shapes_judge")
    with torch.no_grad():
        p = torch.stack([judge(frames, [c] * len(frames)) for c in GOAL_CAPTIONS]).mean(0)
    results["baselines"]["judge_p_caption"] = corr(p.view(test_rw.shape).numpy(), test_rw)
    reader = ShapesReader("judge")
    with torch.no_grad():
        x = reader.image_embeddings(frames)
        g = reader.text_embeddings(list(GOAL_CAPTIONS))
        g = (g / g.norm(dim=-1, keepdim=True)).mean(0)
    results["baselines"]["vlm_rm_reader"] = corr(vlm_rm_reward(x, g).view(test_rw.shape).numpy(), test_rw)
    results["baselines"]["unaligned_uncentred"] = {}
    results["baselines"]["unaligned"] = {}
    for s in seeds:
        m = RAPLModel(spec, tchw(demos), epsilon=args.epsilon, seed=s)
        results["baselines"]["unaligned_uncentred"][str(s)] = corr(score(m), test_rw)
        with torch.no_grad():
            m.feat_mean.copy_(feats.flatten(0, 1).mean(0))
        m._demo_emb = None
        results["baselines"]["unaligned"][str(s)] = corr(score(m), test_rw)
    for n in prefs:
        results["rapl"][str(n)] = {}
        for s in seeds:
            trip = person.triplets(n, list(range(n_demo)), list(range(n_demo, n_demo + args.pool)), seed=1000 * s + n)
            m = RAPLModel(spec, tchw(demos), epsilon=args.epsilon, seed=s)
            n_train = n - (min(n - 1, max(1, round(args.val_fraction * n))) if args.val_fraction > 0 else 0)
            steps_per_epoch = math.ceil(n_train / 32)
            t = time.time()
            hist = m.fit(feats, trip, epochs=max(1, math.ceil(args.steps / steps_per_epoch)), seed=s, val_fraction=args.val_fraction)
            r = corr(score(m), test_rw)
            r.update(train_accuracy=m.report["train_accuracy"], final_loss=hist[-1], fit_s=round(time.time() - t, 1),
                     best_epoch=m.report.get("best_epoch"), epochs=len(hist))
            results["rapl"][str(n)][str(s)] = r
            print(f"prefs {n} seed {s}: {r}", file=sys.stderr, flush=True)

    def agg(d: dict) -> dict:
        keys = ("pearson", "spearman", "episode_spearman")
        return {k: [round(float(np.mean([v[k] for v in d.values()])), 3), round(float(np.std([v[k] for v in d.values()])), 3)] for k in keys}

    summary = {"judge_p_caption": {k: round(v, 3) for k, v in results["baselines"]["judge_p_caption"].items()},
               "vlm_rm_reader": {k: round(v, 3) for k, v in results["baselines"]["vlm_rm_reader"].items()},
               "unaligned": agg(results["baselines"]["unaligned"]),
               "unaligned_uncentred": agg(results["baselines"]["unaligned_uncentred"])}
    for n in prefs:
        summary[f"rapl_{n}"] = agg(results["rapl"][str(n)])
    out = {"command": "python bench/rapl_shapes.py " + " ".join(sys.argv[1:] if argv is None else argv), "args": vars(args),
           "env": "vfeedback/ShapesReach-v0", "summary (mean, std over seeds)": summary, "results": results,
           "data_s": round(data_s, 1), "total_s": round(time.time() - t0, 1), "torch_threads": torch.get_num_threads()}
    text = json.dumps(out, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
