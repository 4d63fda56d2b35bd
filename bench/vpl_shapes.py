"""VPL vs one pooled Bradley-Terry model on simulated people of the shapes world (docs/vpl.md).

Three simulated people (``rewards.shapes_people``: alice likes red, bob blue, carol busy images)
answer pairs of rendered shapes-world scenes; their answers go into one preference JSONL (the
rank app's export format, a ``user`` per record) and the same images are written as PNGs. Two
reward models are trained through the CLI's code path (``rewards.vpl.train_from_files``) on
that file: VPL (latent 8) and a pooled Bradley-Terry model (``latent_dim 0``, the same decoder
without z). Both are loaded back with ``rewards.load("vpl", ...)`` and scored on held-out pairs
of new scenes, per person: VPL with the person's stored latent (from all their answers), VPL
with a latent from only ``--context`` of their answers (a newcomer: ``context=FILE``, several
random draws averaged), and the pooled model.

    nice -n 5 python bench/vpl_shapes.py --out runs/vpl-shapes --json bench/results/vpl_shapes.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def make_pairs(u: torch.Tensor, n: int, g: torch.Generator, lo: int = 0):
    """``n`` non-tied pairs (chosen, rejected) of image indices ``lo + i`` by utility ``u``."""
    from rewards.shapes_people import prefers

    out = []
    while len(out) < n:
        a, b = torch.randint(0, u.numel(), (2,), generator=g).tolist()
        if a == b:
            continue
        s = int(prefers(u[a], u[b]))
        if s:
            out.append((lo + a, lo + b) if s > 0 else (lo + b, lo + a))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/vpl-shapes")
    ap.add_argument("--json", default=None)
    ap.add_argument("--train-images", type=int, default=800)
    ap.add_argument("--test-images", type=int, default=400)
    ap.add_argument("--pairs", type=int, default=500, help="training answers per person")
    ap.add_argument("--test-pairs", type=int, default=400, help="held-out pairs per person")
    ap.add_argument("--context", type=int, default=8, help="answers of a newcomer whose latent is inferred at load")
    ap.add_argument("--draws", type=int, default=5, help="random newcomer contexts averaged")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--beta", type=float, default=1e-2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import rewards
    from rewards.images import to_pil
    from rewards.shapes_people import PEOPLE, utility
    from rewards.vpl import train_from_files
    from vfeedback.world.scenes import make_batch

    t0 = time.time()
    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    n_tr, n_te = args.train_images, args.test_images
    tr, _ = make_batch(n_tr, args.seed, kinds=["free", None])
    te, _ = make_batch(n_te, args.seed + 1000, kinds=["free", None])
    images = torch.cat([tr, te])
    for i, x in enumerate(images):
        to_pil(x[None])[0].save(out / "images" / f"{i:05d}.png")
    g = torch.Generator().manual_seed(args.seed)
    util = {p: utility(images, p) for p in PEOPLE}
    train = {p: make_pairs(util[p][:n_tr], args.pairs, g) for p in PEOPLE}
    test = {p: make_pairs(util[p][n_tr:], args.test_pairs, g, lo=n_tr) for p in PEOPLE}
    rec = lambda a, b, user: {"prompt": "", "chosen": {"image": f"images/{a:05d}.png"}, "rejected": {"image": f"images/{b:05d}.png"}, "user": user}
    prefs = out / "answers.jsonl"
    prefs.write_text("".join(json.dumps(rec(a, b, p)) + "\n" for p in PEOPLE for a, b in train[p]))
    spec = {"kind": "shapes", "which": "judge"}
    kw = dict(steps=args.steps, beta=args.beta, seed=args.seed)
    t1 = time.time()
    rep_vpl = train_from_files([prefs], out / "vpl", spec, latent_dim=8, **kw)
    t2 = time.time()
    rep_bt = train_from_files([prefs], out / "bt", spec, latent_dim=0, **kw)
    t3 = time.time()

    def acc(reward, pairs):
        with torch.no_grad():
            s = reward(images[n_tr:]).cpu()
        c = torch.tensor([a - n_tr for a, _ in pairs])
        r = torch.tensor([b - n_tr for _, b in pairs])
        d = s[c] - s[r]
        return float(((d > 0).float() + 0.5 * (d == 0).float()).mean())

    bt = rewards.load("vpl", path=str(out / "bt"), cache=False)
    rows = {}
    for p in PEOPLE:
        vpl = rewards.load("vpl", path=str(out / "vpl"), user=p, cache=False)
        newcomer = []
        for d in range(args.draws):
            gd = torch.Generator().manual_seed(1000 + d)
            pick = torch.randperm(len(train[p]), generator=gd)[:args.context].tolist()
            f = out / f"context_{p}_{d}.jsonl"
            f.write_text("".join(json.dumps(rec(*train[p][i], p)) + "\n" for i in pick))
            newcomer.append(acc(rewards.load("vpl", path=str(out / "vpl"), context=str(f), cache=False), test[p]))
        rows[p] = {"likes": PEOPLE[p], "train_pairs": len(train[p]), "test_pairs": len(test[p]),
                   "vpl_user_latent": acc(vpl, test[p]), f"vpl_{args.context}_answers": sum(newcomer) / len(newcomer),
                   f"vpl_{args.context}_answers_draws": newcomer, "pooled_bt": acc(bt, test[p])}
        print(p, json.dumps({k: v for k, v in rows[p].items() if not k.endswith("draws")}), flush=True)
    result = {"people": rows, "train_images": n_tr, "test_images": n_te, "context": args.context, "draws": args.draws,
              "steps": args.steps, "beta": args.beta, "seed": args.seed, "train_seconds_vpl": round(t2 - t1, 1),
              "train_seconds_bt": round(t3 - t2, 1), "wall_seconds": round(time.time() - t0, 1),
              "train_report_vpl": rep_vpl, "train_report_bt": rep_bt, "torch": torch.__version__}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
