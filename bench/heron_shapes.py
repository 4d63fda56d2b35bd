"""HERON in the shapes world: labels from ranked judge factors vs a weighted sum of the same
factors, at equal numbers of labels, checked against the held-out judge.

    OMP_NUM_THREADS=1 python bench/heron_shapes.py        # samples cached in runs/heron-bench/samples.pt

Data: 96 captions from the world's generator (32 per kind, generator seed 4321, which no prompt
file, base rate or world_compare uses), 4 images each from the shipped ``tiny:shapes`` (DDIM 20
steps, CFG 4, one seed per image): the groups D3PO would label. 
Factors (the training judge ``shapes_judge``'s terms, rewards/shapes.py ``spec_terms``), most
important first: ``attribute`` (every named coloured shape present), ``count`` (the exact counts;
NaN without a number), ``spatial`` (the relation; NaN without one). Labellers of every pair of a
group: HERON (margin per factor, absolute or std-scaled), the weighted sum ``attribute + count +
spatial`` (NaN terms skipped) with its tie tolerance set so it labels exactly as many pairs as
HERON, and the training judge's own P(match) the same way. Measured: (1) agreement of each
labeller's labels with the held-out judge ``shapes_judge_heldout`` (its P(match); pairs it
separates by more than 0.1), on all groups; (2) a reward model (rewards.heron, Bradley-Terry
on the training judge's reading) trained on each labeller's labels of two thirds of the
captions, its pair accuracy against the held-out judge on the other third (3 folds, pooled).
Writes bench/results/heron_shapes.json.
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

CACHE = ROOT / "runs" / "heron-bench" / "samples.pt"
FACTORS = ("shapes_attribute", "shapes_count", "shapes_spatial")
SEP = 0.1  # the held-out judge "prefers" one image when its P(match) is higher by more than this


def samples(n_per_kind: int = 32, group: int = 4, prompt_seed: int = 4321) -> dict:
    if CACHE.exists():
        d = torch.load(CACHE, weights_only=True)
        if d["group_size"] == group and len(d["prompts"]) == 3 * n_per_kind * group and d["prompt_seed"] == prompt_seed:
            return d
    from vfeedback.models import load_model
    from vfeedback.world.train_world import base_prompts, sample_images

    P, K, _ = base_prompts(n_per_kind, seed=prompt_seed)
    prompts = [p for p in P for _ in range(group)]
    kinds = [k for k in K for _ in range(group)]
    seeds = [30000 + i for i in range(len(prompts))]
    t = time.time()
    x = sample_images(load_model("sd15", "tiny:shapes"), prompts, seeds)
    d = {"images": x.half(), "prompts": prompts, "kinds": kinds, "seeds": seeds, "group_size": group,
         "prompt_seed": prompt_seed, "seconds": time.time() - t}
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    torch.save(d, CACHE)
    return d


def top_n(values: torch.Tensor, groups, n: int):
    """The n within-group pairs a scalar separates most (better, worse): a tie tolerance set so
    that exactly n pairs are labelled (ties at the cut broken by pair order)."""
    from rewards.heron import _group_pairs

    v = values.tolist()
    cand = []
    for i, j in _group_pairs(groups):
        a, b = v[i], v[j]
        a = -math.inf if math.isnan(a) else a
        b = -math.inf if math.isnan(b) else b
        if a == b:
            continue
        gap = abs(a - b) if math.isfinite(a - b) else math.inf
        cand.append((gap, (i, j) if a > b else (j, i)))
    cand.sort(key=lambda t: -t[0])
    return [p for _, p in cand[:n]], (cand[n - 1][0] if 0 < n <= len(cand) else None)


def agreement(pairs, h: torch.Tensor) -> dict:
    """Of labelled pairs (better, worse): how many the held-out judge separates by > SEP, and the
    share of those where it agrees."""
    sep = [(w, l) for w, l in pairs if abs(float(h[w] - h[l])) > SEP]
    agree = sum(float(h[w] > h[l]) for w, l in sep)
    return {"labels": len(pairs), "heldout_separates": len(sep), "agree": agree / len(sep) if sep else float("nan")}


def evaluate_d3po(runs: Path, n_per_kind: int) -> dict:
    """Base tiny:shapes and each D3PO run's LoRA (runs/<name>/lora) on held-out captions
    (world_compare's generator seed 789 and sampling seeds), both judges."""
    sys.path.insert(0, str(ROOT / "bench"))
    from world_compare import evaluate

    from vfeedback.models import load_model
    from vfeedback.models.lora import load_lora_into
    from vfeedback.world.train_world import base_prompts

    prompts, kinds, seeds = base_prompts(n_per_kind, seed=789)
    seeds = [20_000 + s for s in seeds]
    out = {"n_captions": len(prompts)}
    _, out["base"] = evaluate(load_model("sd15", "tiny:shapes"), prompts, kinds, seeds)
    for name in ("d3po-heron", "d3po-wsum"):
        run = runs / name
        if not (run / "summary.json").exists():
            continue
        model = load_model("sd15", "tiny:shapes")
        load_lora_into(model, run / "lora")
        _, ev = evaluate(model, prompts, kinds, seeds)
        summ = json.loads((run / "summary.json").read_text())
        ev["summary"] = {k: summ.get(k) for k in ("wall_time_s", "heldout_win_rate", "judge")}
        out[name] = ev
        print(name, json.dumps({k: ev[k]["overall"] for k in ("train_judge", "heldout_judge")}), flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--margins", default="0.1,0.1,0.1", help="HERON margins for attribute,count,spatial")
    ap.add_argument("--std-margins", default="0.25,0.25,0.25", help="HERON margins with margin_scale std")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--seeds", type=int, default=2, help="reward-model training seeds per fold")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "heron_shapes.json"))
    ap.add_argument("--d3po-only", action="store_true",
                    help="only evaluate the D3PO runs in runs/heron-bench/d3po-{heron,wsum} (configs/d3po/shapes-heron.yaml, "
                         "with and without d3po.preference=reward) and add them to --out")
    ap.add_argument("--d3po-n-per-kind", type=int, default=32)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    if args.d3po_only:
        rep = json.loads(Path(args.out).read_text())
        rep["d3po"] = evaluate_d3po(ROOT / "runs" / "heron-bench", args.d3po_n_per_kind)
        Path(args.out).write_text(json.dumps(rep, indent=1))
        return 0
    import rewards
    from rewards.heron import factor_values, heron_label, train_heron_rm

    t0 = time.time()
    d = samples()
    x, prompts, G = d["images"].float(), d["prompts"], d["group_size"]
    groups = [i // G for i in range(len(prompts))]
    V = factor_values([rewards.load(f) for f in FACTORS], x, prompts)
    h = factor_values([rewards.load("shapes_judge_heldout")], x, prompts)[:, 0]
    judge = factor_values([rewards.load("shapes_judge")], x, prompts)[:, 0]
    n_groups = len(prompts) // G
    from rewards.heron import _group_pairs
    from rewards.itercomp_rm import load_backbone

    bb = load_backbone({"kind": "shapes", "which": "judge"})

    def labellers(idx):
        sub = [groups[i] for i in idx]
        out = {}
        for name, m, scale in (("heron", args.margins, "absolute"), ("heron_std", args.std_margins, "std")):
            lab = heron_label(V[idx], sub, [float(v) for v in m.split(",")], scale)
            out[name] = ([(idx[w], idx[l]) for w, l in lab.pairs], {"levels": lab.level_counts(3), "ties": lab.ties,
                                                                  "margins": [round(v, 4) for v in lab.margins]})
        n = len(out["heron"][0])
        ws = V[idx].clone()
        ws = torch.where(torch.isfinite(ws), ws, torch.zeros_like(ws)).sum(1)
        p, tol = top_n(ws, sub, n)
        out["weighted_sum"] = ([(idx[w], idx[l]) for w, l in p], {"tol": tol})
        p, tol = top_n(judge[idx], sub, n)
        out["judge_p_match"] = ([(idx[w], idx[l]) for w, l in p], {"tol": tol})
        return out

    report = {"n_images": len(prompts), "group_size": G, "groups": n_groups, "sep": SEP,
              "factors": list(FACTORS), "sampling_seconds": d["seconds"]}
    labs = labellers(list(range(len(prompts))))
    report["label_agreement"] = {k: {**agreement(p, h), **info} for k, (p, info) in labs.items()}
    # reward models, 3-fold over captions: train on two thirds' labels, test on the other third's
    # pairs that the held-out judge separates by more than SEP (its preference)
    rm = {k: {"correct": [0] * args.seeds, "test_pairs": 0, "train_labels": []} for k in labs}
    for fold in range(3):
        held = {g for g in range(n_groups) if g % 3 == fold}
        train_idx = [i for i in range(len(prompts)) if groups[i] not in held]
        hi = [i for i in range(len(prompts)) if groups[i] in held]
        test = [(i, j) if h[i] > h[j] else (j, i) for i, j in _group_pairs(groups) if groups[i] in held and abs(float(h[i] - h[j])) > SEP]
        pos = {i: n for n, i in enumerate(hi)}
        T = torch.tensor([[pos[w], pos[l]] for w, l in test])
        with torch.no_grad():
            emb = bb.image_embeddings(x[hi]), bb.text_embeddings([prompts[i] for i in hi])
        for k, (pairs, info) in labellers(train_idx).items():
            rm[k]["test_pairs"] += len(test)
            rm[k]["train_labels"].append(len(pairs))
            for s in range(args.seeds):
                head, _ = train_heron_rm(x, prompts, pairs, {"kind": "shapes", "which": "judge"}, epochs=args.epochs, seed=s, hidden=64)
                with torch.no_grad():
                    r = head(*emb)
                rm[k]["correct"][s] += int((r[T[:, 0]] > r[T[:, 1]]).sum())
        print("fold", fold, {k: v["correct"] for k, v in rm.items()}, flush=True)
    for k, v in rm.items():
        v["per_seed_acc"] = [c / v["test_pairs"] for c in v["correct"]]
        v["heldout_pair_acc"] = sum(v["per_seed_acc"]) / len(v["per_seed_acc"])
    report["reward_model"] = rm
    report["seconds"] = round(time.time() - t0, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report["label_agreement"], indent=1))
    print(json.dumps({k: v["heldout_pair_acc"] for k, v in rm.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
