"""Seconds per DRaFT step and peak memory against K (and DRaFT-LV), with per-call UNet
checkpointing (draft.unet_checkpoint) on and off; ratios against K = 1 measured in the same
process with the same setting.

One step = DRaFT's ``train_step`` (sample with the last K steps under autograd, decode, reward)
+ backward + AdamW step on a rank-4 LoRA, batch ``--batch``, classifier-free guidance 5.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the step; on CPU the peak of the
running sum of the allocations and frees that torch's profiler records (``profile_memory=True``)
over one step, in a separate, untimed run (the profiler slows the step). Both count tensors
allocated during the step only (weights and the optimizer state made before it are excluded).

    python bench/draft_step.py                                   # tiny:sd15 on this device (CPU: seconds)
    python bench/draft_step.py --model sd15 --ks 1,2,4,8,16,50   # full-size SD1.5 architecture, GPU
    python bench/draft_step.py --model sdxl --ks 1,2,4,8         # full-size SDXL architecture, GPU

``--model sd15`` / ``sdxl``: the published architectures with random weights (bench/refl_step.py's
``full_size_model``), bf16 frozen weights, 512 / 1024 px. Writes JSON to stdout and to
bench/results/draft_step-<model>-<device>.json.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

PROMPTS = ["a red apple", "a blue lake"]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def load(model_name: str, device, steps: int):
    """(DiffusionModel, LoRA params, reward, autocast dtype or None)."""
    import rewards
    from vfeedback.models import add_lora, load_model

    if model_name == "tiny":
        m = load_model("sd15", "tiny:sd15", resolution=32, device=device)
        dtype = None
    else:
        from refl_step import full_size_model

        dtype = torch.bfloat16
        m = full_size_model(model_name, device, dtype)
    params = add_lora(m, rank=4)
    for p in params:
        p.data = p.data.float()
    m.unet.train()
    return m, params, rewards.load("color").to(device), dtype


def make_cfg(args, k: int, lv: int, ckpt: bool):
    from vfeedback.config import RunConfig

    return RunConfig.model_validate({
        "algorithm": "draft", "output_dir": "unused",
        "model": {"family": "sdxl" if args.model == "sdxl" else "sd15", "path": "tiny:sd15" if args.model == "tiny" else f"random:{args.model}",
                  "vae_checkpointing": True},
        "reward": "color", "prompts": {"train": PROMPTS},
        "sampling": {"steps": args.steps, "guidance_scale": 5.0, "eta": 1.0},
        "draft": {"k": k, "lv": lv, "unet_checkpoint": ckpt, "grad_scale": 1.0},
    })


def one_step(method, params, opt, device, dtype, step: int, batch: int):
    from vfeedback.engine import generator

    prompts = (PROMPTS * batch)[:batch]
    gens = [generator(0, "item", step, j) for j in range(batch)]
    ctx = torch.autocast(device.type, dtype=dtype) if dtype is not None else torch.autocast(device.type, enabled=False)
    with ctx:
        loss, _ = method.train_step(prompts, gens, generator(0, "step", step))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def cpu_peak_mib(fn) -> float:
    """Peak, over ``fn()``, of the running sum of the memory torch's profiler attributes to each
    event in time order (an op's own allocations minus frees; ``[memory]`` events for frees
    outside ops). A transient peak inside one op is not seen; the saved activations that grow
    with K are."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    cur = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.start):
        cur += e.self_cpu_memory_usage
        peak = max(peak, cur)
    return peak / 2**20


def measure(args, m, params, reward, dtype, device, k, lv, ckpt) -> dict:
    from vfeedback.algorithms.draft import DRaFT

    if args.model != "tiny":
        # full size: diffusers' per-block checkpointing when per-call checkpointing is off (the
        # memory switch a user has without draft.unet_checkpoint); tiny: none, to see the effect
        (m.unet.disable_gradient_checkpointing if ckpt else m.unet.enable_gradient_checkpointing)()
    method = DRaFT(make_cfg(args, k, lv, ckpt), SimpleNamespace(model=m, reward=reward))
    opt = torch.optim.AdamW(params, lr=1e-5)
    times = []
    for step in range(args.repeats + 1):  # the first is warm-up
        sync(device)
        t0 = time.perf_counter()
        one_step(method, params, opt, device, dtype, step, args.batch)
        sync(device)
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        one_step(method, params, opt, device, dtype, 999, args.batch)
        sync(device)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = cpu_peak_mib(lambda: one_step(method, params, opt, device, dtype, 999, args.batch))
    return {"k": k, "lv": lv, "unet_checkpoint": ckpt, "s_per_step": statistics.median(times[1:]), "first_step_s": times[0],
            "peak_mem_mib": round(peak, 2)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["tiny", "sd15", "sdxl"], default="tiny")
    ap.add_argument("--ks", default=None, help="comma list of K (default tiny: 1,2,4,8; full size: 1,2,4,8,16)")
    ap.add_argument("--steps", type=int, default=None, help="sampling steps (default tiny 8, full size 50)")
    ap.add_argument("--lv", type=int, default=2, help="also measure DRaFT-LV with n re-samples (0: skip)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per setting after one warm-up")
    ap.add_argument("--checkpoint", choices=["both", "on", "off"], default="both")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.model != "tiny" and device.type != "cuda":
        sys.exit(f"--model {args.model}: the full-size architecture needs a GPU; use --model tiny on {device.type}")
    args.steps = args.steps or (8 if args.model == "tiny" else 50)
    ks = [int(x) for x in (args.ks or ("1,2,4,8" if args.model == "tiny" else "1,2,4,8,16")).split(",")]
    if 1 not in ks:
        ks = [1] + ks
    if max(ks) > args.steps:
        sys.exit(f"--ks: K up to {max(ks)} exceeds --steps {args.steps}")
    torch.manual_seed(0)
    m, params, reward, dtype = load(args.model, device, args.steps)
    settings = {"both": [True, False], "on": [True], "off": [False]}[args.checkpoint]
    rows = []
    for ckpt in settings:
        for k in ks:
            try:
                r = measure(args, m, params, reward, dtype, device, k, 0, ckpt)
            except torch.cuda.OutOfMemoryError:
                r = {"k": k, "lv": 0, "unet_checkpoint": ckpt, "error": "out of memory"}
                gc.collect()
                torch.cuda.empty_cache()
            rows.append(r)
            print(json.dumps(r), flush=True)
        if args.lv:
            r = measure(args, m, params, reward, dtype, device, 1, args.lv, ckpt)
            rows.append(r)
            print(json.dumps(r), flush=True)
    for r in rows:  # ratios against K = 1 with the same checkpoint setting
        one = next(x for x in rows if x["k"] == 1 and x["lv"] == 0 and x["unet_checkpoint"] == r["unet_checkpoint"])
        if "error" not in r and "error" not in one:
            r["time_ratio_vs_k1"] = round(r["s_per_step"] / one["s_per_step"], 3)
            r["mem_ratio_vs_k1"] = round(r["peak_mem_mib"] / one["peak_mem_mib"], 3) if one["peak_mem_mib"] > 0 else None
    result = {
        "model": args.model, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
        "threads": torch.get_num_threads(), "resolution": m.resolution, "batch": args.batch, "sampling_steps": args.steps,
        "guidance_scale": 5.0, "lora_rank": 4, "repeats": args.repeats,
        "peak_memory": "torch.cuda.max_memory_allocated over one step" if device.type == "cuda"
        else "torch.profiler profile_memory: peak of allocations minus frees over one step",
        "command": "python bench/draft_step.py " + " ".join(sys.argv[1:]),
        "rows": rows,
    }
    dev = "gpu" if device.type == "cuda" else "cpu"
    out = Path(args.out or ROOT / "bench" / "results" / f"draft_step-{args.model}-{dev}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
