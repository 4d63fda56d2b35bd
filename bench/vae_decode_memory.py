"""Peak memory of a VAE decode that a reward backpropagates through, by checkpointing mode.

The SD1.5 / SDXL VAE architecture (random weights: the memory does not depend on them) decodes
one batch of latents with grad, a scalar of the image is backpropagated to the latents, and the
peak is recorded, each mode in a fresh process:

* ``none``: plain decode; every activation of the decoder is kept for the backward;
* ``whole``: the whole decode under one ``torch.utils.checkpoint`` (vfeedback's
  ``model.vae_checkpointing`` before #21): nothing is kept during the forward, but the backward
  reruns the whole decoder and holds all its activations at once;
* ``blocks``: ``whole`` plus the decoder's own per-block checkpointing inside it (diffusers'
  ``Decoder.gradient_checkpointing``: mid block and each up block), vfeedback's
  ``model.vae_checkpointing`` now (``DiffusionModel.decode(checkpoint=True)``).

The gradient on the latents is compared across modes (max abs difference against ``none``).
Peak: ``torch.cuda.max_memory_allocated`` above the memory before the decode on a GPU; on the
CPU the peak resident set (``ru_maxrss``) above the one before it (coarser: the allocator's
own behaviour is included).

    python bench/vae_decode_memory.py                       # CPU, 512 px, fp32
    python bench/vae_decode_memory.py --resolution 1024     # on a GPU: bf16, SDXL size

Writes JSON to stdout and bench/results/vae_decode_memory-<device>.json.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import gpu_sweep  # noqa: E402
MODES = ("none", "whole", "blocks")
#: the published SD1.5 / SDXL VAE architecture (both: 4 latent channels, 128-256-512-512)
VAE_ARCH = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def one_mode(mode: str, resolution: int, batch: int, device: str) -> dict:
    """Decode + backward in this process under ``mode``; returns the peak and the latent grad."""
    from diffusers import AutoencoderKL

    from vfeedback.models.loader import DiffusionModel

    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(0)
    vae = AutoencoderKL(sample_size=resolution, scaling_factor=0.13025, **VAE_ARCH).to(dev, dtype)
    vae.requires_grad_(False)
    pipe = type("Pipe", (), {"vae": vae})()
    model = DiffusionModel(pipe=pipe, family="sdxl", path="random", resolution=resolution)
    z = torch.randn(batch, 4, resolution // 8, resolution // 8, generator=torch.Generator().manual_seed(1)).to(dev)
    z.requires_grad_(True)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = rss_mib()
    t0 = time.perf_counter()
    if mode == "none":
        img = model.decode(z, checkpoint=False)
    elif mode == "whole":  # the pre-#21 form: one checkpoint around the decode, nothing inside
        out = torch.utils.checkpoint.checkpoint(lambda t: vae.decode(t).sample, z.to(dtype) / vae.config.scaling_factor, use_reentrant=False)
        img = (out.float() / 2 + 0.5).clamp(0, 1)
    else:
        img = model.decode(z, checkpoint=True)
    (img * torch.linspace(0, 1, img.numel(), device=dev).view_as(img)).sum().backward()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20 - base
    else:
        peak = rss_mib() - base
    return {"mode": mode, "peak_mib": round(peak, 1), "seconds": round(time.perf_counter() - t0, 3), "grad": z.grad.float().cpu()}


def resolution(s: str) -> int:
    v = gpu_sweep.positive_int(s)
    if v % 8:
        raise argparse.ArgumentTypeError(f"{v} is not a multiple of 8 (the VAE's factor)")
    return v


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolution", type=resolution, default=None, help="image size, a multiple of 8 (default: 1024 on a GPU, 512 on the CPU)")
    ap.add_argument("--batch", type=gpu_sweep.positive_int, default=1)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--out", default=None)
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    res = args.resolution or (1024 if args.device.startswith("cuda") else 512)
    if args._child:  # one mode, in its own process; the grad goes through a file
        r = one_mode(args._child, res, args.batch, args.device)
        torch.save(r.pop("grad"), args.out)
        print(json.dumps(r))
        return
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        gpu_sweep.usage_error(f"--modes: {', '.join(bad)} not one of {', '.join(MODES)}")
    import tempfile

    rows, grads = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for m in modes:
            gpath = str(Path(tmp) / f"{m}.pt")
            p = subprocess.run([sys.executable, __file__, "--_child", m, "--resolution", str(res), "--batch", str(args.batch),
                                "--device", args.device, "--out", gpath], capture_output=True, text=True)
            if p.returncode:
                oom = "out of memory" in p.stderr.lower()
                rows.append({"mode": m, "error": "out of memory" if oom else p.stderr.strip().splitlines()[-1:]})
                print(json.dumps(rows[-1]), flush=True)
                continue
            rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
            grads[m] = torch.load(gpath)
            print(json.dumps(rows[-1]), flush=True)
    ref = grads.get("none")
    for r in rows:
        if ref is not None and r["mode"] in grads:
            r["grad_max_abs_diff_vs_none"] = float((grads[r["mode"]] - ref).abs().max())
    by = {r["mode"]: r for r in rows if "peak_mib" in r}
    result = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu", "torch": torch.__version__,
              "dtype": "bf16" if args.device.startswith("cuda") else "fp32", "resolution": res, "batch": args.batch,
              "measure": "cuda max_memory_allocated" if args.device.startswith("cuda") else "peak RSS (ru_maxrss)", "modes": rows}
    if "blocks" in by and "whole" in by:
        result["blocks_over_whole_peak"] = round(by["blocks"]["peak_mib"] / by["whole"]["peak_mib"], 3)
    if "blocks" in by and "none" in by:
        result["blocks_over_none_peak"] = round(by["blocks"]["peak_mib"] / by["none"]["peak_mib"], 3)
    gpu_sweep.write_json(args.out or ROOT / "bench" / "results" / f"vae_decode_memory-{'gpu' if args.device.startswith('cuda') else 'cpu'}.json",
                         result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
