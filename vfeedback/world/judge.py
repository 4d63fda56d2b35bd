"""Train and evaluate the shapes-world judges behind the ``shapes_*`` rewards.

Each judge learns, from freshly drawn scenes every step, the count (0-3) of each of the 24
colour x shape categories and the centre of each present category. Two are trained, as
independent as one generator allows: different architecture (:class:`rewards.shapes.GridJudge`
vs :class:`rewards.shapes.ResJudge`), initialisation seed, scene stream (disjoint seed
ranges, a different captioned/free mix) and augmentation. Augmentations (blur, noise, colour
gain/offset) stand in for the softer, noisier images a diffusion model draws.

    python -m vfeedback.world.judge                 # train both, write rewards/assets/shapes
    python -m vfeedback.world.judge --eval-only     # accuracies of the shipped judges
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from rewards.shapes import ASSETS, KINDS, MAX_COUNT, N_CATEGORIES, build_judge, category, load_judge, match_prob, spec_terms

from .scenes import corrupt, make_batch

log = logging.getLogger("vfeedback.world")

#: name -> how it is built and trained. Seed ranges of the two scene streams are disjoint
#: from each other, from the diffusion model's pool (2e7..) and from the evaluation sets (< 1e6).
JUDGES = {
    "judge": dict(arch="grid", kwargs={"width": 32}, seed=1, data_seed=100_000_000, free_frac=0.5,
                  blur=1.0, noise=0.06, gain=0.10, steps=1000, batch=64, lr=2e-3, focus_steps=300),
    "judge_heldout": dict(arch="res", kwargs={"width": 24}, seed=2, data_seed=300_000_000, free_frac=0.35,
                          blur=0.8, noise=0.08, gain=0.12, steps=700, batch=64, lr=2e-3, focus_steps=200),
}
GRID = 8


def targets(scenes) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """counts (B, K) long; centre (B, K, 2) mean centre per category; present (B, K) bool;
    heat (B, K, GRID*GRID): each instance's centre splatted bilinearly on the grid, normalised."""
    b = len(scenes)
    counts = torch.zeros(b, N_CATEGORIES, dtype=torch.long)
    centre = torch.zeros(b, N_CATEGORIES, 2)
    heat = torch.zeros(b, N_CATEGORIES, GRID, GRID)
    for i, s in enumerate(scenes):
        for o in s.objects:
            k = category(o.colour, o.shape)
            counts[i, k] += 1
            centre[i, k] += torch.tensor([o.x, o.y])
            gx, gy = o.x * GRID - 0.5, o.y * GRID - 0.5
            x0, y0 = math.floor(gx), math.floor(gy)
            for xx, wx in ((x0, 1 - (gx - x0)), (x0 + 1, gx - x0)):
                for yy, wy in ((y0, 1 - (gy - y0)), (y0 + 1, gy - y0)):
                    heat[i, k, min(max(yy, 0), GRID - 1), min(max(xx, 0), GRID - 1)] += wx * wy
    present = counts > 0
    centre = centre / counts.clamp_min(1).unsqueeze(-1)
    heat = heat.flatten(2)
    heat = heat / heat.sum(-1, keepdim=True).clamp_min(1e-8)
    return counts.clamp_max(MAX_COUNT), centre, present, heat


def augment(x: torch.Tensor, g: torch.Generator, blur: float, noise: float, gain: float) -> torch.Tensor:
    """Random Gaussian blur (sigma up to ``blur`` px), per-channel gain/offset, pixel noise."""
    b = x.shape[0]
    sig = torch.rand(b, generator=g) * blur
    r = torch.arange(-2, 3, dtype=torch.float32)
    k1 = torch.exp(-(r[None] ** 2) / (2 * sig[:, None].clamp_min(1e-3) ** 2))
    k1 = k1 / k1.sum(1, keepdim=True)
    k2 = (k1[:, :, None] * k1[:, None, :])  # (B, 5, 5)
    xp = F.pad(x, (2, 2, 2, 2), mode="replicate")
    # grouped conv: each image (3 channels) with its own kernel
    w = k2.repeat_interleave(3, 0).unsqueeze(1)  # (B*3, 1, 5, 5)
    x = F.conv2d(xp.reshape(1, b * 3, *xp.shape[-2:]), w, groups=b * 3).reshape_as(x)
    x = x * (1 + (torch.rand(b, 3, 1, 1, generator=g) * 2 - 1) * gain) + (torch.rand(b, 3, 1, 1, generator=g) * 2 - 1) * gain * 0.4
    x = x + torch.randn(x.shape, generator=g) * (torch.rand(b, 1, 1, 1, generator=g) * noise)
    return x.clamp(0, 1)


def _loss(net, x, scenes):
    counts, centre, present, heat = targets(scenes)
    c_logits, coords, where = net(x)
    loss = F.cross_entropy(c_logits.reshape(-1, MAX_COUNT + 1), counts.reshape(-1))
    if where is not None:  # grid judge: cross-entropy against the splatted centres
        pos = -(heat * where.log_softmax(-1)).sum(-1)
    else:
        pos = F.smooth_l1_loss(coords, centre, reduction="none", beta=0.05).sum(-1) * 10
    return loss + (pos * present).sum() / present.sum().clamp_min(1)


def _phase(net, cfg: dict, name: str, steps: int, lr: float, kinds: list, data_seed: int, g: torch.Generator,
           pool: Optional[int] = None) -> None:
    """``steps`` AdamW steps on batches of seed ``data_seed + step``; ``pool``: cycle through only
    that many batches (a fixed data subset, seen again each epoch with fresh augmentation)."""
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    t0 = time.time()
    net.train()
    cache: dict = {}
    for step in range(steps):
        for pg in opt.param_groups:
            pg["lr"] = lr * (min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / steps)))
        if pool:  # the subset's batches are drawn once and kept
            if step % pool not in cache:
                cache[step % pool] = make_batch(cfg["batch"], seed=data_seed + step % pool, kinds=kinds)
            x, scenes = cache[step % pool]
        else:
            x, scenes = make_batch(cfg["batch"], seed=data_seed + step, kinds=kinds)
        x = augment(x, g, cfg["blur"], cfg["noise"], cfg["gain"])
        loss = _loss(net, x, scenes)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log.info("%s step %d/%d loss %.4f %.0fs", name, step, steps, loss.item(), time.time() - t0)


def train_judge(name: str, steps: Optional[int] = None, out_dir: Path = ASSETS, focus_only: bool = False) -> dict:
    """Train judge ``name`` (see :data:`JUDGES`) and write ``out_dir/name.safetensors``.

    Two phases, each with a fresh optimizer and cosine schedule: ``steps`` on the main mix
    (captioned scenes of all kinds and free scenes), then ``focus_steps`` at a quarter of the
    learning rate on count-heavy batches (several objects of one category are rare otherwise,
    and reading 2 vs 3 of them is the judge's hardest call). ``focus_only``: load the saved
    judge and run only the second phase (what a run stopped between the phases resumes with).
    """
    cfg = dict(JUDGES[name])
    steps = steps or cfg["steps"]
    torch.manual_seed(cfg["seed"])
    g = torch.Generator().manual_seed(cfg["seed"])
    t0 = time.time()
    if focus_only:
        net = load_judge(out_dir / f"{name}.safetensors").requires_grad_(True)
        g.manual_seed(cfg["seed"] + 1)
    else:
        net = build_judge(cfg["arch"], **cfg["kwargs"])
        n_free = int(round(cfg["batch"] * cfg["free_frac"]))
        kinds = ["free"] * n_free + [None] * (cfg["batch"] - n_free)
        _phase(net, cfg, name, steps, cfg["lr"], kinds, cfg["data_seed"], g)
        g.manual_seed(cfg["seed"] + 1)
    b = cfg["batch"]
    focus = ["count"] * (b // 2) + ["free"] * (b // 4) + [None] * (b - b // 2 - b // 4)
    _phase(net, cfg, name + " (count focus)", cfg["focus_steps"], cfg["lr"] / 4, focus, cfg["data_seed"] + 50_000_000, g)
    net.eval().requires_grad_(False)
    metrics = evaluate(net, n_per_kind=200, seed=7)
    metrics["train_seconds"] = round(time.time() - t0, 1)
    metrics["steps"] = steps
    out_dir.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    meta = {"config": json.dumps({"arch": cfg["arch"], "kwargs": cfg["kwargs"]}),
            "training": json.dumps({k: v for k, v in cfg.items() if k not in ("arch", "kwargs")} | {"steps": steps}),
            "metrics": json.dumps(metrics)}
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out_dir / f"{name}.safetensors"), metadata=meta)
    log.info("%s: %s", name, json.dumps(metrics))
    return metrics


@torch.no_grad()
def evaluate(net, n_per_kind: int = 200, seed: int = 7, tau: float = 0.04) -> dict:
    """Accuracies of a judge network on fresh (unaugmented) scenes of seed ``seed``.

    ``match_accuracy[kind]``: over each scene with its own caption (should match) and a hard
    negative caption (:func:`vfeedback.world.scenes.corrupt`: swapped colours, reversed
    relation, a count off by one; should not match), the fraction judged right at P = 0.5.
    ``count_exact``: scenes (of all kinds, and free 0-3-object ones) whose 24 category counts
    are all read exactly. ``centre_error``: mean distance (fraction of width) of the centre of
    single-instance categories.
    """
    rng = np.random.default_rng(seed)
    res = {"match_accuracy": {}}
    correct_all, n_all = 0, 0
    for j, kind in enumerate(KINDS):
        x, scenes = make_batch(n_per_kind, seed=seed * 1000 + j, kind=kind)
        counts, coords, _ = net(x)
        ok = 0
        for i, s in enumerate(scenes):
            neg = corrupt(s.spec, rng)
            p_pos = match_prob(spec_terms(counts[i], coords[i], s.spec, tau))
            p_neg = match_prob(spec_terms(counts[i], coords[i], neg, tau))
            ok += int(p_pos > 0.5) + int(p_neg <= 0.5)
        res["match_accuracy"][kind] = ok / (2 * len(scenes))
        correct_all += ok
        n_all += 2 * len(scenes)
    res["match_accuracy"]["overall"] = correct_all / n_all
    x, scenes = make_batch(n_per_kind, seed=seed * 1000 + 99, kinds=["free", None])
    counts, coords, _ = net(x)
    tc, centre, present, _ = targets(scenes)
    res["count_exact"] = float((counts.argmax(-1) == tc).all(1).float().mean())
    single = tc == 1
    res["centre_error"] = float((coords - centre).norm(dim=-1)[single].mean())
    return res


def train_all(steps: Optional[int] = None, out_dir: Path = ASSETS) -> dict:
    return {name: train_judge(name, steps, out_dir=out_dir) for name in JUDGES}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="train / evaluate the shapes-world judges")
    ap.add_argument("--eval-only", action="store_true")
    ap.add_argument("--only", choices=list(JUDGES), default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--focus-only", action="store_true", help="load the saved judge and run only the count-focus phase")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    names = [args.only] if args.only else list(JUDGES)
    for name in names:
        if args.eval_only:
            print(name, json.dumps(evaluate(load_judge(ASSETS / f"{name}.safetensors"))))
        else:
            train_judge(name, args.steps, focus_only=args.focus_only)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
