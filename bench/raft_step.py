"""Seconds per RAFT step against a ReFL step, tiny:sd15, same process, same device, same sampler.

RAFT's cost comes in two parts: a round's collection (render K images for each prompt of the
round with the current weights, score them, select) and the denoising steps on the kept images;
``raft_amortised_step_s`` = collection / steps_per_round + one denoising step, the wall time per
optimizer step over a round. ReFL's step (bench/refl_step.py's ``engine_steps``: sampling to the
stop step, one UNet call and the VAE decode with grad, the reward, backward) is the yardstick.

    python bench/raft_step.py            # this device

Writes JSON to stdout and to bench/results/raft_step[-<device>].json. Medians of the repeats;
the machine's load average is recorded with them (a shared CPU inflates every figure).
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from refl_step import BATCH, PROMPTS, STEPS, engine_steps, median, sync  # noqa: E402

K, PROMPTS_PER_ROUND, STEPS_PER_ROUND = 4, 2, 10


def raft_trainer(device):
    from vfeedback.config import RunConfig
    from vfeedback.engine import Trainer

    cfg = RunConfig.model_validate(dict(
        algorithm="raft", output_dir=tempfile.mkdtemp(),
        model=dict(family="sd15", path="tiny:sd15", gradient_checkpointing=False, vae_checkpointing=False),
        reward="color", prompts=dict(train=PROMPTS), sampling=dict(steps=STEPS, guidance_scale=5.0),
        raft=dict(num_samples=K, prompts_per_round=PROMPTS_PER_ROUND, steps_per_round=STEPS_PER_ROUND, sample_batch_size=K * PROMPTS_PER_ROUND),
        train=dict(batch_size=BATCH, lr=1e-3, mixed_precision="no", max_grad_norm=None, device=device.type),
        log=dict(trackers=[]),
    ))
    tr = Trainer(cfg)
    tr._t0, tr._time_offset, tr.nan_streak, tr.nan_total, tr.evals = time.time(), 0, 0, 0, []
    tr.setup()
    return tr


def raft_times(rounds: int, steps: int, device) -> tuple[list[float], list[float]]:
    from vfeedback.engine import generator

    tr = raft_trainer(device)
    collect = []
    for rnd in range(rounds):
        sync(device)
        t = time.perf_counter()
        tr.method.kept = tr.method._collect_online(rnd)
        sync(device)
        collect.append(time.perf_counter() - t)
    train = []
    tr.current_step = 1 + (rounds - 1) * STEPS_PER_ROUND  # inside the last collected round: no new collection
    for step in range(steps):
        sync(device)
        t = time.perf_counter()
        gens = [generator(0, "item", step, 0, j) for j in range(BATCH)]
        with tr.acc.accumulate(tr.model.denoiser):
            loss, _ = tr.method.train_step(PROMPTS, gens, generator(0, "step", step, 0))
            tr.acc.backward(loss)
            tr.optimizer.step()
            tr.optimizer.zero_grad(set_to_none=True)
        sync(device)
        train.append(time.perf_counter() - t)
    return collect, train


def main():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    refl = engine_steps(6, device)[1:]  # the first step warms up
    collect, train = raft_times(3, 11, device)
    train = train[1:]
    r_step, c, s = median(refl), median(collect), median(train)
    amort = c / STEPS_PER_ROUND + s
    res = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "model": "tiny:sd15",
        "sampler_steps": STEPS, "batch_size": BATCH,
        "raft": {"num_samples": K, "prompts_per_round": PROMPTS_PER_ROUND, "steps_per_round": STEPS_PER_ROUND},
        "refl_step_s": r_step,
        "raft_collect_s": c, "raft_denoise_step_s": s, "raft_amortised_step_s": amort,
        "ratio_raft_amortised_over_refl": amort / r_step,
        "ratio_raft_denoise_step_over_refl": s / r_step,
        "ratio_raft_collect_over_refl": c / r_step,
        "repeats": {"refl": len(refl), "raft_collect": len(collect), "raft_denoise": len(train)},
        "load_average_1min": os.getloadavg()[0],
        "command": "python bench/raft_step.py",
    }
    print(json.dumps(res, indent=1))
    out = HERE / "results" / ("raft_step.json" if device.type == "cpu" else "raft_step-gpu.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
