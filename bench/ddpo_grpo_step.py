"""Seconds per DDPO / GRPO step against a ReFL step, on tiny:sd15, in one process.

Each method runs through vfeedback's Trainer (accelerate, LoRA rank 4, the colour reward, AdamW)
with the same prompts, sampler (20 DDIM steps, eta 1, CFG 5) and batch of 2 prompts per step:

* ReFL: sampling without grad to stop step 15, one UNet call with grad, decode, reward, backward;
* DDPO: one epoch = sample 2 trajectories keeping log-probs, reward, per-prompt advantages, then
  one PPO update over every (sample, timestep): 20 UNet forward + backward passes per sample;
* GRPO: the same with 4 images per prompt (8 trajectories) and the KL term on (one more
  no-grad UNet call per trained transition, with the LoRA off).

The ratio ``method / refl`` is what the README quotes; the absolute seconds depend on the
machine. ``--device cuda`` to measure on a GPU.

    python bench/ddpo_grpo_step.py                # tiny, CPU
    python bench/ddpo_grpo_step.py --steps 5 --device cuda

Writes JSON to stdout and to bench/results/ddpo_grpo_step[-<device>].json.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STEPS, STOP, BATCH, GROUP = 20, 15, 2, 4
PROMPTS = ["a red apple", "a blue lake"]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def trainer(algorithm: str, device):
    from vfeedback.config import RunConfig
    from vfeedback.engine import Trainer

    extra = {"refl": {"refl": dict(stop_range=[STOP, STOP], grad_scale=1.0)},
             "ddpo": {"ddpo": dict(min_count=1)},
             "grpo": {"grpo": dict(group_size=GROUP, kl_coef=0.01)}}[algorithm]
    cfg = RunConfig.model_validate(dict(
        algorithm=algorithm, output_dir=tempfile.mkdtemp(),
        model=dict(family="sd15", path="tiny:sd15", gradient_checkpointing=False, vae_checkpointing=False, lora=dict(rank=4)),
        reward="color", prompts=dict(train=PROMPTS), sampling=dict(steps=STEPS, guidance_scale=5.0, eta=1.0),
        train=dict(batch_size=BATCH, lr=1e-3, mixed_precision="no", max_grad_norm=None, device=device.type),
        log=dict(trackers=[]), **extra,
    ))
    tr = Trainer(cfg)
    tr._t0, tr._time_offset, tr.nan_streak, tr.nan_total, tr.evals = time.time(), 0, 0, 0, []
    tr.setup()
    return tr


def steps(tr, n: int, device) -> list[float]:
    """``n`` engine steps (one micro-step each): train_step, backward unless the method made
    its own, optimizer step. Returns seconds per step."""
    from vfeedback.engine import generator

    out = []
    for step in range(n):
        sync(device)
        t = time.perf_counter()
        gens = [generator(0, "item", step, 0, j) for j in range(BATCH)]
        with tr.acc.accumulate(tr.model.denoiser):
            loss, _ = tr.method.train_step(PROMPTS, gens, generator(0, "step", step, 0))
            if not getattr(tr.method, "does_own_backward", False):
                tr.acc.backward(loss)
            tr.optimizer.step()
            tr.optimizer.zero_grad(set_to_none=True)
        sync(device)
        out.append(time.perf_counter() - t)
    return out


def median(xs):
    s = sorted(xs)
    return s[len(s) // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per method (after one warm-up step)")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    device = torch.device(a.device)
    torch.manual_seed(0)
    import os

    res = {"device": str(device), "torch_threads": torch.get_num_threads(), "load_average_start": os.getloadavg()[0], "model": "tiny:sd15", "sampling_steps": STEPS,
           "prompts_per_step": BATCH, "grpo_group_size": GROUP, "refl_stop_step": STOP, "methods": {}}
    trainers = {name: trainer(name, device) for name in ("refl", "ddpo", "grpo")}
    for name, tr in trainers.items():
        steps(tr, 1, device)  # warm-up
    # interleaved rounds, so a machine-load change hits every method alike
    times = {name: [] for name in trainers}
    for _ in range(a.steps):
        for name, tr in trainers.items():
            times[name] += steps(tr, 1, device)
    refl = median(times["refl"])
    for name, ts in times.items():
        res["methods"][name] = {"seconds_per_step": [round(x, 4) for x in ts], "median_s": round(median(ts), 4),
                                "ratio_to_refl": round(median(ts) / refl, 2)}
    res["load_average_end"] = os.getloadavg()[0]
    res["note"] = ("DDPO/GRPO steps are whole epochs (sampling + a PPO update over all timesteps of every sample); "
                   f"GRPO samples {GROUP}x the images of DDPO and adds the KL's base-model calls")
    print(json.dumps(res, indent=1))
    out = Path(__file__).resolve().parent / "results" / f"ddpo_grpo_step{'' if device.type == 'cpu' else '-' + device.type}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
