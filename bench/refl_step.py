"""Seconds per ReFL step and peak memory.

1. tiny:sd15 through the toolkit's engine (``vfeedback train`` minus I/O) against a bare,
   hand-written loop doing the same work with diffusers' scheduler + peft directly; the ratio
   is the toolkit's overhead (same process, same device, same batch, same stop step).
2. with --full sd15,sdxl: a batch sweep (1, 2, 4, 8, 16 until out of memory) of the ReFL step
   on full-size SD1.5 (512 px) and SDXL (1024 px) architectures with random weights (LoRA rank 4
   in fp32, bf16 frozen weights, 40 DDIM steps, CFG 7.5, grad at step 35, a random ViT-L/14
   reward), per configuration: the toolkit path, the toolkit with the memory switches (+mem) or
   the speed switches (fast), and a reference-style loop written the way ImageReward's ReFL.py
   writes its step, in the same process. Per cell: min and median s/step over --timed steps
   after --warmup, images/s, FLOPs per step (torch's flop counter), MFU against the device's
   own bf16 matmul rate measured in the same run, peak memory, images/s over the reference's.

    python bench/refl_step.py                 # tiny overhead mode, this device
    python bench/refl_step.py --full sd15,sdxl --budget-s 300     # on a GPU
    python bench/refl_step.py --full sd15 --model tiny --batches 1,2 --timed 2   # CPU smoke
    python bench/refl_step.py --table bench/results/refl_step_full-h200.json   # Markdown

Tiny mode writes bench/results/refl_step[-<device>].json; --full writes
bench/results/refl_step_full-<device>[-tiny].json (schema: bench/gpu_sweep.py).
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
sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_sweep

import gpu_sweep  # noqa: E402
from gpu_sweep import sync  # noqa: E402  (raft_step imports it from here too)

STEPS, STOP, BATCH = 20, 15, 2
PROMPTS = ["a red apple", "a blue lake"]


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


# ---------------------------------------------------------------- the --full sweep
#
# Configurations (``--configs``): the toolkit path (vfeedback.sampling.sample with
# GradWindow.refl, the method's refl_loss), the same with the memory switches (UNet gradient
# checkpointing + VAE decode checkpointing, "+mem"), the same with the speed switches of
# vfeedback.models.speed ("fast"), and the reference-style loop written the way ImageReward's
# ReFL.py writes its step ("reference"; "+mem": with UNet gradient checkpointing, which
# ImageReward's script offers; it has no VAE checkpointing).

FULL_STEPS, FULL_STOP, GUIDANCE, GRAD_SCALE, LORA_RANK = 40, 35, 7.5, 1e-3, 4
SWITCHES = ("compile", "channels_last", "fuse_qkv", "cache_text_embeddings")
CONFIGS = {
    "toolkit": dict(kind="toolkit", gc=False, vae=False, fast=False),
    "toolkit+mem": dict(kind="toolkit", gc=True, vae=True, fast=False),
    "fast": dict(kind="toolkit", gc=False, vae=False, fast=True),
    "fast+mem": dict(kind="toolkit", gc=True, vae=True, fast=True),
    "reference": dict(kind="reference", gc=False, vae=False, fast=False),
    "reference+mem": dict(kind="reference", gc=True, vae=False, fast=False),
    # every memory switch and nothing else: the SDXL 24 GiB check (text encoders off the GPU once
    # the prompts are encoded; no compile, whose cold start would eat SDXL's budget)
    "lowmem": dict(kind="toolkit", gc=True, vae=True, fast=True, switches=("cache_text_embeddings",)),
}
DEFAULT_CONFIGS = {"sd15": "toolkit,fast,reference", "sdxl": "lowmem,fast+mem,reference+mem"}
SPEED_MISSING = "vfeedback.models.speed not available"


def speed_module():
    """vfeedback.models.speed (apply_speed_switches, make_optimizer), or None where this
    checkout does not have it yet."""
    try:
        from vfeedback.models import speed
    except ImportError:
        return None
    return speed


class RandomViTReward(torch.nn.Module):
    """A differentiable reward with the cost of a real CLIP / aesthetic scorer: a CLIP ViT image
    tower with random weights (ViT-L/14 at 224 px for ``size="L"``, a 2-layer toy for tests),
    bicubic resize + CLIP normalisation inside, then a linear head on the normalised embedding.
    The scores mean nothing; the FLOPs and the memory match an aesthetic / CLIP reward's."""

    MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)

    def __init__(self, device, dtype, size: str = "L"):
        super().__init__()
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        if size == "L":
            cfg = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                                   image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
        else:
            cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   image_size=32, patch_size=8, projection_dim=16)
        cfg._attn_implementation = "sdpa"
        torch.manual_seed(0)
        with torch.device(device):
            self.tower = CLIPVisionModelWithProjection(cfg)
            self.head = torch.nn.Linear(cfg.projection_dim, 1)
        self.tower.to(dtype).requires_grad_(False).eval()
        self.head.requires_grad_(False)
        self.size, self.dtype = cfg.image_size, dtype
        self.register_buffer("mean", torch.tensor(self.MEAN, device=device).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(self.STD, device=device).view(1, 3, 1, 1))

    def forward(self, images, prompts=None):
        x = torch.nn.functional.interpolate(images.float(), size=(self.size, self.size), mode="bicubic", align_corners=False)
        x = (x - self.mean) / self.std
        emb = self.tower(pixel_values=x.to(self.dtype)).image_embeds.float()
        emb = emb / emb.norm(dim=-1, keepdim=True)
        return self.head(emb).squeeze(-1)


def make_reward(name: str, device, dtype):
    """``color`` (the cheap analytic reward), ``vitl`` (random ViT-L/14), ``vit-tiny`` (tests)."""
    if name == "color":
        import rewards

        return rewards.load("color").to(device)
    if name in ("vitl", "vit-tiny"):
        return RandomViTReward(device, dtype, "L" if name == "vitl" else "tiny")
    raise SystemExit(f"--reward: {name!r} is not one of color, vitl, vit-tiny")


def build_model(family: str, model_kind: str, device, dtype):
    """Full-size random-weight SD1.5 / SDXL (``full``) or the toolkit's tiny:<family> (``tiny``)."""
    if model_kind == "full":
        return full_size_model(family, device, dtype)
    from vfeedback.models.loader import load_model

    m = load_model(family, f"tiny:{family}", dtype=dtype, device=device, attention="sdpa")
    return m


def autocast(device):
    dev = torch.device(device)
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")


def generators(step: int, batch: int) -> list:
    return [torch.Generator().manual_seed(1000 * step + j) for j in range(batch)]


def toolkit_refl_step(family, model_kind, device, dtype, batch, cfg, *, steps, stop, reward_name, switches):
    """The toolkit's ReFL step as ``vfeedback train`` runs it (sampler with GradWindow.refl,
    the method's refl_loss), LoRA rank 4 in fp32 on bf16 frozen weights. Returns (step_fn, info)."""
    from vfeedback.algorithms.refl import refl_loss
    from vfeedback.models import add_lora
    from vfeedback.sampling import GradWindow, sample

    info = {"switches": list(switches) if cfg["fast"] else [], "gradient_checkpointing": cfg["gc"], "vae_checkpointing": cfg["vae"]}
    model = build_model(family, model_kind, device, dtype)
    params = add_lora(model, rank=LORA_RANK)
    for p in params:
        p.data = p.data.float()
    speed = speed_module() if cfg["fast"] else None
    if cfg["fast"]:
        speed.apply_speed_switches(model, **{s: True for s in switches})
    model.unet.train()
    if cfg["gc"]:
        model.unet.enable_gradient_checkpointing()
    if speed is not None:
        opt = speed.make_optimizer(params, "adamw", lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
    else:
        opt = torch.optim.AdamW(params, lr=1e-5)
    reward = make_reward(reward_name, device, dtype)
    prompts = (PROMPTS * batch)[:batch]

    def step(i):
        with autocast(device):
            cond = model.encode_prompt(prompts, cfg=True)
            out = sample(model, cond, num_steps=steps, guidance_scale=GUIDANCE, generator=generators(i, batch),
                         grad=GradWindow.refl(stop), vae_checkpoint=cfg["vae"])
            loss = refl_loss(reward(out.images.float(), prompts).float(), 2.0, GRAD_SCALE)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, info, model


def pipe_text(pipe, family, prompts, device, resolution):
    """``encoder_hidden_states`` (negatives first) and ``added_cond_kwargs`` for CFG, as the
    diffusers pipelines (and the reference scripts) build them."""
    n = len(prompts)
    if family == "sdxl":
        pe, npe, pooled, npooled = pipe.encode_prompt(prompt=prompts, device=device, num_images_per_prompt=1,
                                                      do_classifier_free_guidance=True, negative_prompt=[""] * n)
        r = resolution
        tids = torch.tensor([[r, r, 0, 0, r, r]], device=device, dtype=pe.dtype).repeat(2 * n, 1)
        return torch.cat([npe, pe]), {"text_embeds": torch.cat([npooled, pooled]), "time_ids": tids}
    pe, npe = pipe.encode_prompt(prompts, device, 1, True, [""] * n)
    return torch.cat([npe, pe]), None


def reference_refl_step(family, model_kind, device, dtype, batch, cfg, *, steps, stop, reward_name, switches=()):
    """The ReFL step written the way ImageReward's ``ReFL.py`` writes it: diffusers components
    called directly (text encoder via the pipeline, DDPMScheduler.set_timesteps + .step), a
    no-grad loop to the stop step, one UNet call with grad whose ``pred_original_sample`` is
    decoded by the VAE, ``relu(-reward + 2).mean() * grad_scale``, backward, AdamW step. LoRA
    via peft with the same rank and targets; bf16 frozen weights under bf16 autocast; SDPA
    (diffusers' default processor); no compile."""
    from diffusers import DDPMScheduler
    from peft import LoraConfig

    model = build_model(family, model_kind, device, dtype)
    pipe = model.pipe
    unet, vae = pipe.unet, pipe.vae
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    unet.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights=True, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    params = [p for n_, p in unet.named_parameters() if "lora" in n_]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    unet.train()
    if cfg["gc"]:
        unet.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(params, lr=1e-5)
    reward = make_reward(reward_name, device, dtype)
    prompts = (PROMPTS * batch)[:batch]
    c, s = unet.config.in_channels, model.resolution // model.vae_scale_factor

    def step(i):
        torch.manual_seed(i)  # ImageReward draws the initial latents on the device, no generator
        with autocast(device):
            hs, added = pipe_text(pipe, family, prompts, device, model.resolution)
            latents = torch.randn((batch, c, s, s), device=device) * noise_scheduler.init_noise_sigma
            noise_scheduler.set_timesteps(steps, device=device)
            timesteps = noise_scheduler.timesteps
            with torch.no_grad():
                for t in timesteps[:stop]:
                    inp = noise_scheduler.scale_model_input(torch.cat([latents] * 2), t)
                    noise_pred = unet(inp, t, encoder_hidden_states=hs, added_cond_kwargs=added).sample
                    uncond, text = noise_pred.chunk(2)
                    noise_pred = uncond + GUIDANCE * (text - uncond)
                    latents = noise_scheduler.step(noise_pred, t, latents).prev_sample
            t = timesteps[stop]
            inp = noise_scheduler.scale_model_input(torch.cat([latents] * 2), t)
            noise_pred = unet(inp, t, encoder_hidden_states=hs, added_cond_kwargs=added).sample
            uncond, text = noise_pred.chunk(2)
            noise_pred = uncond + GUIDANCE * (text - uncond)
            pred_original_sample = noise_scheduler.step(noise_pred, t, latents).pred_original_sample.to(vae.dtype)
            image = vae.decode(pred_original_sample / vae.config.scaling_factor).sample
            image = (image / 2 + 0.5).clamp(0, 1)
            rm_preds = reward(image.float(), prompts)
            loss = torch.nn.functional.relu(-rm_preds + 2).mean() * GRAD_SCALE
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, {"switches": [], "gradient_checkpointing": cfg["gc"], "vae_checkpointing": False}, model


class CellRunner:
    """``run_cell(config, batch)`` for :func:`gpu_sweep.sweep`: frees the previous cell's model,
    builds a fresh one (random init on the device: seconds, and every cell starts from the same
    state, so one cell's optimizer state or compiled graphs cannot leak into the next), makes
    the step function and measures it."""

    def __init__(self, family, model_kind, device, *, builders, configs, warmup, timed, extra: dict, make_kwargs: dict):
        self.family, self.model_kind, self.device = family, model_kind, torch.device(device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.builders, self.configs, self.warmup, self.timed = builders, configs, warmup, timed
        self.extra, self.kw = extra, make_kwargs
        self.flops_by_batch: dict[int, int] = {}  # the uncompiled toolkit's count, for compiled configs

    def __call__(self, config: str, batch: int) -> dict:
        cfg = self.configs[config]
        gpu_sweep.free_memory(self.device)
        kw = {**self.kw, "switches": cfg.get("switches", self.kw.get("switches", ()))}  # a config may fix its own switches
        step, info, model = self.builders[cfg["kind"]](self.family, self.model_kind, self.device, self.dtype, batch, cfg, **kw)
        info["resolution"] = model.resolution
        compiled = cfg["fast"] and "compile" in kw["switches"]
        # a compiled config is not run under the flop counter (it does not see inside compiled
        # graphs); that step becomes one more warm-up, so every config runs warmup + 1 untimed steps
        got = gpu_sweep.measure(step, warmup=self.warmup + compiled, timed=self.timed, device=self.device, flops=not compiled)
        key = (batch, cfg["gc"], cfg["vae"])
        if compiled:  # the same arithmetic, uncompiled: the toolkit config with the same memory switches at this batch
            got["flops_per_step"] = self.flops_by_batch.get(key)
            got["flops_source"] = "the uncompiled toolkit config at this batch (compile hides ops from the counter)"
        else:
            got["flops_source"] = "torch.utils.flop_counter.FlopCounterMode, one step (includes checkpointing recompute)"
            if cfg["kind"] == "toolkit":
                self.flops_by_batch.setdefault(key, got["flops_per_step"])
        del step, model
        return {**info, **self.extra, "warmup": self.warmup, "untimed_steps": self.warmup + 1, "timed": self.timed, **got}


def run_families(args, device, *, bench: str, settings: dict, families, default_configs, check_configs, builders: dict,
                 extra: dict, make_kwargs: dict, after_family=None) -> dict:
    """The sweep of both benches (``refl_step --full``, ``rollout_step``): the matmul peak once,
    then per family a :class:`CellRunner` over the configurations x ``--batches`` with the
    ``--budget-s`` left shared evenly by the families not yet run; rows are written as they come
    (:func:`partial_writer`). ``default_configs(family)``: the configurations when ``--configs``
    is empty; ``check_configs(names)``: exits on names the bench cannot run; ``after_family(family,
    rows, result)``: per-family additions (SDXL's memory check)."""
    batches = list(args.batches)
    switches = tuple(s for s in args.switches.split(",") if s)
    peak = gpu_sweep.measure_peak_flops(device, n=args.matmul_n)
    result = {"bench": bench, "env": gpu_sweep.environment(device), "peak_flops": peak,
              "settings": {"model": args.model, "reward": args.reward, "sampling_steps": args.sampling_steps, **settings,
                           "lora_rank": LORA_RANK, "warmup": args.warmup, "timed": args.timed, "batches": batches,
                           "switches": list(switches), "budget_s": args.budget_s,
                           "weights": "bf16 frozen, fp32 LoRA, bf16 autocast" if device.type == "cuda" else "fp32 (CPU)"},
              "rows": []}
    print(f"peak matmul: {peak['flops_per_s'] / 1e12:.2f} TFLOP/s ({peak['dtype']} {peak['n']}^3)", flush=True)
    t_start = time.monotonic()
    for fi, fam in enumerate(families):
        names = [c for c in (args.configs or default_configs(fam)).split(",") if c]
        check_configs(names)
        skip = {c: SPEED_MISSING for c in names if CONFIGS[c]["fast"] and speed_module() is None}
        runner = CellRunner(fam, args.model, device, builders=builders, configs=CONFIGS, warmup=args.warmup, timed=args.timed,
                            extra=extra, make_kwargs={**make_kwargs, "switches": switches})
        budget = None
        if args.budget_s is not None:
            budget = max(0.0, args.budget_s - (time.monotonic() - t_start)) / (len(families) - fi)
        n0 = len(result["rows"])
        result["rows"][n0:] = gpu_sweep.sweep(fam, names, batches, runner, peak_flops_per_s=peak["flops_per_s"], budget_s=budget,
                                              device=device, skip=skip, on_row=partial_writer(args, result))
        gpu_sweep.free_memory(device)
        if after_family is not None:
            after_family(fam, result["rows"][n0:], result)
    return result


def run_full(args, device) -> dict:
    """The ``--full`` sweep over the families in ``args.full``; the result dict (also written as JSON)."""
    def check(names):
        bad = [c for c in names if c not in CONFIGS]
        if bad:
            gpu_sweep.usage_error(f"--configs: unknown {bad}; known: {', '.join(CONFIGS)}")

    def sdxl_memory(fam, rows, result):
        if fam == "sdxl":
            result["sdxl_memory"] = sdxl_memory_check(rows)

    return run_families(args, device, bench="refl_step --full", families=[f for f in args.full.split(",") if f],
                        settings={"stop_step": args.stop_step, "guidance_scale": GUIDANCE, "grad_scale": GRAD_SCALE},
                        default_configs=DEFAULT_CONFIGS.get, check_configs=check,
                        builders={"toolkit": toolkit_refl_step, "reference": reference_refl_step},
                        extra={"sampling_steps": args.sampling_steps, "stop_step": args.stop_step, "reward": args.reward},
                        make_kwargs=dict(steps=args.sampling_steps, stop=args.stop_step, reward_name=args.reward),
                        after_family=sdxl_memory)


def partial_writer(args, result: dict):
    """on_row for :func:`gpu_sweep.sweep`: print the row, append it to ``result["rows"]`` and
    rewrite the JSON with ``"complete": false``, so a sweep killed by a timeout keeps what it measured."""
    def on_row(r):
        print(json.dumps({k: v for k, v in r.items() if k != "times_s"}), flush=True)
        result["rows"].append(r)
        gpu_sweep.write_json(args.out, {**result, "complete": False})

    return on_row


def sdxl_memory_check(rows) -> list[dict]:
    """Whether SDXL batch 1 peaks at or under 24 GiB (and 24e9 bytes) per configuration."""
    out = []
    for r in rows:
        if r["batch"] == 1 and r.get("status") == "ok" and r.get("peak_mem_bytes") is not None:
            out.append({"config": r["config"], "peak_mem_gib": r["peak_mem_bytes"] / gpu_sweep.GIB,
                        "within_24gib": r["peak_mem_bytes"] <= gpu_sweep.SDXL_LIMIT_BYTES, "within_24e9_bytes": r["peak_mem_bytes"] <= 24e9,
                        "memory_kind": r.get("peak_mem_kind")})
    return out

def add_sweep_args(ap, *, budget_default=None):
    """The flags the two sweeps (refl_step --full, rollout_step) share."""
    ap.add_argument("--model", choices=("full", "tiny"), default="full",
                    help="full: published SD1.5 / SDXL architectures, random weights (GPU); tiny: tiny:<family> (CPU tests)")
    ap.add_argument("--batches", type=gpu_sweep.batch_list, default="1,2,4,8,16", help="batch sizes, in order; a config stops at its first out-of-memory")
    ap.add_argument("--configs", default="", help=f"comma list of {', '.join(CONFIGS)} (default per family)")
    ap.add_argument("--switches", default=",".join(SWITCHES), help="speed switches of the fast configs (vfeedback.models.speed)")
    ap.add_argument("--warmup", type=gpu_sweep.nonneg_int, default=1, help="untimed steps per cell before the FLOP-count step (itself untimed) and the timed steps")
    ap.add_argument("--timed", type=gpu_sweep.positive_int, default=10, help="timed steps per cell (min and median reported)")
    ap.add_argument("--budget-s", type=gpu_sweep.positive_float, default=budget_default, help="wall seconds for the whole sweep; batch sizes that would "
                    "not fit are recorded as skipped")
    ap.add_argument("--reward", choices=("color", "vitl", "vit-tiny"), default=None,
                    help="reward in the step (default: vitl with --model full, color with --model tiny)")
    ap.add_argument("--matmul-n", type=gpu_sweep.positive_int, default=None, help="matrix size of the peak-FLOP/s measurement (default 8192 CUDA, 1024 CPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/<bench>-<device>.json)")
    ap.add_argument("--table", nargs="+", default=None, metavar="JSON", help="print the Markdown table of result files and exit")


def sweep_main(args, bench: str, run, default_steps: int):
    """Shared body of the sweep entry points: check the device, run, write the JSON, print the table."""
    if args.table:
        for f in args.table:
            print(f"\n### {f}\n")
            print(gpu_sweep.render_table(json.loads(Path(f).read_text())))
        return 0
    try:
        device = torch.device(args.device)
    except RuntimeError:
        gpu_sweep.usage_error(f"--device: {args.device!r} is not a torch device (cuda, cuda:1, cpu)")
    if args.model == "full" and device.type != "cuda":
        gpu_sweep.usage_error(f"{bench}: full-size models need a GPU (--device cuda); use --model tiny on the CPU")
    unknown = [s for s in args.switches.split(",") if s and s not in SWITCHES]
    if unknown:
        gpu_sweep.usage_error(f"--switches: unknown {unknown}; known: {', '.join(SWITCHES)}")
    args.reward = args.reward or ("vitl" if args.model == "full" else "color")
    args.sampling_steps = args.sampling_steps or default_steps
    if getattr(args, "stop_step", None) is not None and args.stop_step >= args.sampling_steps:
        gpu_sweep.usage_error(f"--stop-step {args.stop_step} must be below --sampling-steps ({args.sampling_steps})")
    tag = gpu_sweep.device_tag(device) + ("" if args.model == "full" else "-tiny")
    args.out = args.out or Path(__file__).parent / "results" / f"{bench}-{tag}.json"
    result = run(args, device)
    result["best"] = gpu_sweep.best_rows(result["rows"])
    result["complete"] = True
    out = gpu_sweep.write_json(args.out, result)
    print(gpu_sweep.render_table(result))
    print(f"wrote {out}")
    bad = [r for r in result["rows"] if r.get("status") == "error"]
    return 1 if bad else 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=gpu_sweep.positive_int, default=8, help="tiny overhead mode: steps per variant (the first is warm-up)")
    ap.add_argument("--full", default="", help="comma list of families to sweep: sd15,sdxl (the --full sweep; else the tiny overhead mode)")
    ap.add_argument("--sampling-steps", type=gpu_sweep.positive_int, default=None, help=f"--full: DDIM steps per image (default {FULL_STEPS})")
    ap.add_argument("--stop-step", type=gpu_sweep.nonneg_int, default=FULL_STOP, help="--full: ReFL step index that keeps the graph")
    add_sweep_args(ap)
    return ap


def main(argv=None):
    args = parser().parse_args(argv)
    if args.full or args.table:
        return sweep_main(args, "refl_step_full", run_full, FULL_STEPS)
    device = torch.device(args.device)
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
              "threads": torch.get_num_threads(), "tiny": {}}
    eng, bare = [], []
    eng += engine_steps(args.steps, device)
    bare += bare_steps(args.steps, device)
    e, b = median(eng[1:]), median(bare[1:])
    result["tiny"] = {"model": "tiny:sd15", "batch": BATCH, "sampling_steps": STEPS, "stop_step": STOP,
                      "engine_s_per_step": e, "bare_s_per_step": b, "overhead_ratio": e / b,
                      "process_peak_mem_mib": gpu_sweep.peak_mem_bytes(device)[0] / 2**20}
    print(json.dumps(result["tiny"]), flush=True)
    out = Path(args.out or Path(__file__).parent / "results" / f"refl_step-{'gpu' if device.type == 'cuda' else 'cpu'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
