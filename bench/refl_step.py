"""Seconds per ReFL step and peak memory.

1. tiny:sd15 through the toolkit's engine (``vfeedback train`` minus I/O) against a bare,
   hand-written loop doing the same work with diffusers' scheduler + peft directly; the ratio
   is the toolkit's overhead (same process, same device, same batch, same stop step).
2. with --full (GPU): full-size SD1.5 (512 px) and SDXL (1024 px) architectures with random
   weights, LoRA rank 4, bf16 frozen weights: seconds per ReFL step and peak GPU memory, with
   the memory switches (UNet gradient checkpointing, VAE decode checkpointing) on and off.

    python bench/refl_step.py                 # tiny, this device
    python bench/refl_step.py --full sd15,sdxl  # on a GPU

Writes JSON to stdout and to bench/results/refl_step[-<device>].json.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STEPS, STOP, BATCH = 20, 15, 2
PROMPTS = ["a red apple", "a blue lake"]


def peak_mem(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux: KiB)


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def engine_steps(n: int, device) -> list[float]:
    """ReFL steps through vfeedback's Trainer (accelerate, LoRA, reward, optimizer)."""
    from vfeedback.config import RunConfig
    from vfeedback.engine import Trainer, generator

    out = tempfile.mkdtemp()
    cfg = RunConfig.model_validate(dict(
        algorithm="refl", output_dir=out, model=dict(family="sd15", path="tiny:sd15", gradient_checkpointing=False, vae_checkpointing=False),
        reward="color", prompts=dict(train=PROMPTS), sampling=dict(steps=STEPS, guidance_scale=5.0),
        refl=dict(stop_range=[STOP, STOP], grad_scale=1.0), train=dict(batch_size=BATCH, lr=1e-3, mixed_precision="no", max_grad_norm=None,
                                                                            device=device.type),
        log=dict(trackers=[]),
    ))
    tr = Trainer(cfg)
    tr._t0, tr._time_offset, tr.nan_streak, tr.nan_total, tr.evals = time.time(), 0, 0, 0, []
    tr.setup()
    times = []
    for step in range(n):
        sync(device)
        t = time.perf_counter()
        gens = [generator(0, "item", step, 0, j) for j in range(BATCH)]
        with tr.acc.accumulate(tr.model.denoiser):
            loss, _ = tr.method.train_step(PROMPTS, gens, generator(0, "step", step, 0))
            tr.acc.backward(loss)
            tr.optimizer.step()
            tr.optimizer.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - t)
    return times


def bare_steps(n: int, device) -> list[float]:
    """The same ReFL step written by hand: diffusers pipeline + scheduler.step + peft LoRA."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from peft import LoraConfig

    from vfeedback.models.tiny import tiny_path
    import rewards

    pipe = StableDiffusionPipeline.from_pretrained(tiny_path("sd15"), safety_checker=None, requires_safety_checker=False).to(device)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.requires_grad_(False)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    params = [p for n_, p in pipe.unet.named_parameters() if "lora" in n_]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-3)
    reward = rewards.load("color").to(device)
    sch = pipe.scheduler
    times = []
    for step in range(n):
        sync(device)
        t0 = time.perf_counter()
        pe, ne = pipe.encode_prompt(PROMPTS, device, 1, True, [""] * BATCH)
        hs = torch.cat([ne, pe])
        g = torch.Generator().manual_seed(step)
        lat = torch.randn((BATCH, 4, 16, 16), generator=g).to(device)
        sch.set_timesteps(STEPS)
        for i, t in enumerate(sch.timesteps):
            with torch.set_grad_enabled(i == STOP):
                eps = pipe.unet(torch.cat([lat, lat]), t, encoder_hidden_states=hs).sample
                un, te = eps.chunk(2)
                eps = un + 5.0 * (te - un)
                res = sch.step(eps, t, lat)
            if i == STOP:
                lat = res.pred_original_sample
                break
            lat = res.prev_sample
        img = (pipe.vae.decode(lat / pipe.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
        loss = torch.relu(2.0 - reward(img, PROMPTS)).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


def median(xs):
    s = sorted(xs)
    return s[len(s) // 2]


# ---------------------------------------------------------------- full-size architectures

def full_size_model(family: str, device, dtype):
    """SD1.5 / SDXL with their published architecture configs and random weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from vfeedback.models.loader import DiffusionModel
    from vfeedback.models.tiny import write_clip_tokenizer

    tokdir = Path(tempfile.mkdtemp()) / "tok"
    write_clip_tokenizer(tokdir)
    tok = CLIPTokenizer.from_pretrained(tokdir)
    sch = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    vae_kw = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
                  down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
    clip_l = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    with torch.device(device):
        if family == "sd15":
            unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8, layers_per_block=2,
                                        block_out_channels=(320, 640, 1280, 1280),
                                        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
            vae = AutoencoderKL(sample_size=512, scaling_factor=0.18215, **vae_kw)
            te = CLIPTextModel(clip_l)
            pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sch, safety_checker=None,
                                           feature_extractor=None, requires_safety_checker=False)
            res = 512
        else:
            unet = UNet2DConditionModel(sample_size=128, cross_attention_dim=2048, attention_head_dim=(5, 10, 20), layers_per_block=2,
                                        block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
                                        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                                        projection_class_embeddings_input_dim=2816)
            vae = AutoencoderKL(sample_size=1024, scaling_factor=0.13025, **vae_kw)
            te = CLIPTextModel(clip_l)
            big_g = CLIPTextConfig(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                                   max_position_embeddings=77, hidden_act="gelu", projection_dim=1280, bos_token_id=49406, eos_token_id=49407, pad_token_id=0)
            te2 = CLIPTextModelWithProjection(big_g)
            pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok, unet=unet, scheduler=sch)
            res = 1024
    pipe.to(device, dtype)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.requires_grad_(False)
    if family == "sdxl":
        pipe.text_encoder_2.requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return DiffusionModel(pipe=pipe, family=family, path=f"random:{family}", resolution=res)


def full_size_bench(family: str, device, n: int, batch: int, grad_ckpt: bool, vae_ckpt: bool, model=None):
    from vfeedback.engine import generator
    from vfeedback.models import add_lora
    from vfeedback.sampling import GradWindow, sample
    import rewards

    dtype = torch.bfloat16
    if model is None:
        model = full_size_model(family, device, dtype)
        params = add_lora(model, rank=4)
        for p in params:
            p.data = p.data.float()
        model._bench_params = params
    params = model._bench_params
    model.unet.train()
    if grad_ckpt:
        model.unet.enable_gradient_checkpointing()
    else:
        model.unet.disable_gradient_checkpointing()
    opt = torch.optim.AdamW(params, lr=1e-5)
    reward = rewards.load("color").to(device)
    prompts = (PROMPTS * batch)[:batch]
    times = []
    reset_peak(device)
    for step in range(n):
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=dtype):
            cond = model.encode_prompt(prompts, cfg=True)
            out = sample(model, cond, num_steps=40, guidance_scale=7.5, generator=[generator(step, j) for j in range(batch)],
                         grad=GradWindow.refl(35), vae_checkpoint=vae_ckpt)
            loss = torch.relu(2 - reward(out.images.float(), prompts)).mean() * 1e-3
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - t0)
    return model, {"family": family, "resolution": model.resolution, "batch": batch, "gradient_checkpointing": grad_ckpt,
                   "vae_checkpointing": vae_ckpt, "sampling_steps": 40, "stop_step": 35, "steps_timed": n - 1,
                   "s_per_step": median(times[1:]), "first_step_s": times[0], "peak_mem_mib": peak_mem(device)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8, help="tiny steps per variant (the first is warm-up)")
    ap.add_argument("--full", default="", help="comma list of full-size families to time on GPU: sd15,sdxl")
    ap.add_argument("--full-steps", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "threads": torch.get_num_threads(), "tiny": {}, "full": []}
    # alternate so that slow drift of the machine hits both equally
    eng, bare = [], []
    eng += engine_steps(args.steps, device)
    bare += bare_steps(args.steps, device)
    e, b = median(eng[1:]), median(bare[1:])
    result["tiny"] = {"model": "tiny:sd15", "batch": BATCH, "sampling_steps": STEPS, "stop_step": STOP,
                      "engine_s_per_step": e, "bare_s_per_step": b, "overhead_ratio": e / b,
                      "process_peak_mem_mib": peak_mem(device)}
    print(json.dumps(result["tiny"]), flush=True)
    for fam in [f for f in args.full.split(",") if f]:
        if device.type != "cuda":
            print(f"--full {fam}: needs a GPU; skipped", file=sys.stderr)
            continue
        model = None
        for gc_on, vae_on in ((True, True), (False, False)):
            try:
                model, r = full_size_bench(fam, device, args.full_steps, 1, gc_on, vae_on, model)
            except torch.cuda.OutOfMemoryError as err:
                r = {"family": fam, "gradient_checkpointing": gc_on, "vae_checkpointing": vae_on, "error": "out of memory"}
            result["full"].append(r)
            print(json.dumps(r), flush=True)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    out = Path(args.out or Path(__file__).parent / "results" / f"refl_step-{'gpu' if device.type == 'cuda' else 'cpu'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
