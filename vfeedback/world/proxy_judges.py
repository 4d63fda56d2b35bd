"""Small proxy judges of the shapes world: weak learned rewards to over-optimise (issue #18).

Gao et al. 2023 ("Scaling Laws for Reward Model Overoptimization", Sec. 2) train every proxy reward
model from one pretrained network on a subset of the preference data, and Coste et al. 2023
("Reward Model Ensembles Help Mitigate Overoptimization", Sec. 4) build ensembles from such models
differing in their seeds. The analogue here: the pretrained network is the training judge's conv
body (``rewards/assets/shapes/judge.safetensors``, frozen); each proxy gets fresh count and
position heads (their own initialisation seed) trained with :func:`vfeedback.world.judge._phase`
on its own small fixed pool of scenes (a disjoint seed range per proxy, 512 scenes cycled with
fresh augmentation, then 256 count-heavy ones; the training judge saw 64,000 + 19,200 fresh
scenes). Our choice, for CPU: a full small judge trained from scratch on so few scenes stayed at
chance (52% match accuracy after 500 steps of a width-16 net), and training its body on more would
take the machine for an hour. The gold reward is ``shapes_judge_heldout`` (another architecture,
seed and data).

    python -m vfeedback.world.proxy_judges            # train all, write rewards/assets/shapes/proxy*.safetensors
    python -m vfeedback.world.proxy_judges --eval-only

A proxy file holds only its heads, in float16 (every figure in the manifest is measured on the
weights as stored), and names the body file in its metadata; both files' sha256 are listed in
``rewards/assets/shapes/proxies.json``, which ``rewards.load("shapes_judge_proxy", index=i)`` checks.
"""
from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from rewards.shapes import ASSETS, KINDS, PROXY_MANIFEST, build_judge, load_judge, match_prob, spec_terms

from ..rundir import sha256_file
from .judge import _phase, evaluate
from .scenes import corrupt, make_batch

log = logging.getLogger("vfeedback.world")

N_PROXIES = 3
BODY = "judge.safetensors"
#: shared settings; per proxy: seed 11 + i, data seeds 500e6 + i * 1e6 (disjoint from each other,
#: from the two judges' 1e8 / 3e8 ranges, the diffusion pool's 2e7 and the eval sets' < 1e6).
#: ``pool`` batches of ``batch`` scenes: 512 scenes (focus: 256).
PROXY = dict(arch="grid", kwargs={"width": 32}, free_frac=0.5, blur=1.0, noise=0.06, gain=0.10,
             steps=300, batch=32, pool=16, lr=3e-3, focus_steps=100, focus_pool=8)


def proxy_config(i: int) -> dict:
    """The full training settings of proxy ``i``."""
    return dict(PROXY, seed=11 + i, data_seed=500_000_000 + i * 1_000_000)



@torch.no_grad()
def agreement(net, gold, n_per_kind: int = 200, seed: int = 8, tau: float = 0.04) -> dict:
    """How often ``net`` and ``gold`` give the same verdict (P > 0.5) on fresh scenes of seed
    ``seed``, each with its caption and a hard negative (as :func:`judge.evaluate`), per kind and
    overall; and the mean |P_net - P_gold| over the same pairs."""
    rng = np.random.default_rng(seed)
    res, same_all, n_all, absdiff = {}, 0, 0, []
    for j, kind in enumerate(KINDS):
        x, scenes = make_batch(n_per_kind, seed=seed * 1000 + j, kind=kind)
        ca, cc, _ = net(x)
        ga, gc, _ = gold(x)
        same = 0
        for i, s in enumerate(scenes):
            for spec in (s.spec, corrupt(s.spec, rng)):
                p = float(match_prob(spec_terms(ca[i], cc[i], spec, tau)))
                q = float(match_prob(spec_terms(ga[i], gc[i], spec, tau)))
                same += int((p > 0.5) == (q > 0.5))
                absdiff.append(abs(p - q))
        res[kind] = same / (2 * len(scenes))
        same_all += same
        n_all += 2 * len(scenes)
    res["overall"] = same_all / n_all
    return {"verdict_agreement": res, "mean_abs_diff": float(np.mean(absdiff))}


def train_proxy(i: int, out_dir: Path = ASSETS, steps: Optional[int] = None) -> dict:
    """Train proxy ``i`` (:func:`proxy_config`), write ``out_dir/proxy{i}.safetensors`` (float16)
    and return its manifest entry (file, sha256, bytes, config, training, metrics)."""
    from safetensors.torch import save_file

    cfg = proxy_config(i)
    if steps:
        cfg["steps"] = steps
    torch.manual_seed(cfg["seed"])
    g = torch.Generator().manual_seed(cfg["seed"])
    t0 = time.time()
    net = build_judge(cfg["arch"], **cfg["kwargs"])  # heads initialised from this proxy's seed
    body = load_judge(out_dir / BODY)
    net.body.load_state_dict(body.body.state_dict())
    net.body.requires_grad_(False)
    b = cfg["batch"]
    n_free = int(round(b * cfg["free_frac"]))
    _phase(net, cfg, f"proxy{i}", cfg["steps"], cfg["lr"], ["free"] * n_free + [None] * (b - n_free), cfg["data_seed"], g,
           pool=cfg["pool"])
    g.manual_seed(cfg["seed"] + 1)
    focus = ["count"] * (b // 2) + ["free"] * (b // 4) + [None] * (b - b // 2 - b // 4)
    _phase(net, cfg, f"proxy{i} (count focus)", cfg["focus_steps"], cfg["lr"] / 4, focus, cfg["data_seed"] + 50_000_000, g,
           pool=cfg["focus_pool"])
    secs = round(time.time() - t0, 1)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"proxy{i}.safetensors"
    meta = {"config": json.dumps({"arch": cfg["arch"], "kwargs": cfg["kwargs"]}), "body": BODY,
            "training": json.dumps({k: v for k, v in cfg.items() if k not in ("arch", "kwargs")})}
    heads = {k: v.detach().half().contiguous() for k, v in net.state_dict().items() if not k.startswith("body.")}
    save_file(heads, str(path), metadata=meta)
    entry = {"index": i, "file": path.name, "train_seconds": secs}
    entry.update(describe(path))
    log.info("proxy%d: %s", i, json.dumps(entry["metrics"]))
    return entry


def describe(path: Path) -> dict:
    """sha256, size, config, training settings and metrics of stored weights ``path``, measured on
    the weights as stored: accuracy (:func:`judge.evaluate`) and agreement with the gold judge."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    net = load_judge(path)
    gold = load_judge(ASSETS / "judge_heldout.safetensors")
    metrics = evaluate(net, n_per_kind=200, seed=7)
    metrics["vs_gold"] = agreement(net, gold)
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size, "body": meta["body"],
            "body_sha256": sha256_file(path.parent / meta["body"]), "config": json.loads(meta["config"]),
            "training": json.loads(meta["training"]), "metrics": metrics}


def write_manifest(entries: list[dict], path: Path = PROXY_MANIFEST) -> None:
    gold = load_judge(ASSETS / "judge_heldout.safetensors")
    ref = {"gold": "judge_heldout.safetensors", "gold_metrics": evaluate(gold, n_per_kind=200, seed=7)}
    body = {"about": "proxy judges for the over-optimisation study (docs/overoptimisation.md); "
                     "built by python -m vfeedback.world.proxy_judges", **ref,
            "proxies": sorted(entries, key=lambda e: e["index"])}
    path.write_text(json.dumps(body, indent=1) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="train / describe the shapes-world proxy judges")
    ap.add_argument("--n", type=int, default=N_PROXIES, help="how many proxies (default %(default)s)")
    ap.add_argument("--steps", type=int, default=None, help="main-phase steps (default: PROXY['steps'])")
    ap.add_argument("--eval-only", action="store_true", help="re-measure the stored weights and rewrite the manifest")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.eval_only:
        old = {e["index"]: e for e in json.loads(PROXY_MANIFEST.read_text())["proxies"]}
        entries = [{"index": i, "file": f"proxy{i}.safetensors", "train_seconds": old.get(i, {}).get("train_seconds"),
                    **describe(ASSETS / f"proxy{i}.safetensors")} for i in range(args.n)]
    else:
        entries = []
        for i in range(args.n):  # the manifest lists each proxy as soon as it is trained
            entries.append(train_proxy(i, steps=args.steps))
            write_manifest(entries)
    write_manifest(entries)
    print(json.dumps([{"index": e["index"], "acc": e["metrics"]["match_accuracy"]["overall"],
                       "agree_gold": e["metrics"]["vs_gold"]["verdict_agreement"]["overall"]} for e in entries]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
