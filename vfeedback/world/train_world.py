"""Build the shapes world from scratch on a CPU: judges, then ``tiny:shapes``, then its base rate.

    python -m vfeedback.world.train_world            (or: make world)
    python -m vfeedback.world.train_world --stages vae,decoder,unet --unet-minutes 38

Stages (each reads what the previous ones wrote):

- ``judges``: the two CNN judges (``rewards/assets/shapes/judge*.safetensors``), see
  :mod:`vfeedback.world.judge`.
- ``vae``: a two-level AutoencoderKL (32 px -> 4 x 16 x 16) trained on scenes; its
  ``scaling_factor`` is set to 1 / std of the latents, as SD1.5's 0.18215 is for its VAE.
- ``decoder``: the decoder trained on with the encoder frozen (so the latent space is that of
  the ``vae`` stage), on slightly noised latents, for a wall-clock budget.
- ``unet``: an SD1.5-architecture UNet2DConditionModel and a 2-layer CLIP text encoder
  trained jointly from scratch (epsilon prediction, SD1.5's scaled-linear DDPM schedule,
  10% caption dropout for classifier-free guidance, EMA weights), for a wall-clock budget:
  the step count is fixed after timing the first steps, so the cosine schedule ends on time.
  The pipeline is written with ``save_pretrained`` to ``vfeedback/assets/tiny-shapes``.
- ``unet_more``: training continued from the saved pipeline (fresh optimizer, half the
  learning rate, a new pool of scenes), for another wall-clock budget.
- ``baseline``: the shipped model sampled on a fixed, seeded prompt set and scored by both
  judges; written to ``vfeedback/assets/tiny-shapes/base_rate.json`` (tests compare to it).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .scenes import SIZE, make_batch

log = logging.getLogger("vfeedback.world")

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = ROOT / "assets" / "tiny-shapes"
WORK_DIR = Path(os.environ.get("VFEEDBACK_WORLD_WORK", "runs/world"))
#: CLIP pads prompts to this many tokens; shapes captions are at most 11
MAX_TOKENS = 16
TEXT_HIDDEN = 64

STAGES = ("judges", "vae", "decoder", "unet", "unet_more", "baseline")

# sampling settings of the base rate (and the defaults the docs recommend for tiny:shapes)
BASE_STEPS = 20
BASE_GUIDANCE = 4.0


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        block_out_channels=[16, 32], layers_per_block=1, latent_channels=4, norm_num_groups=8,
        sample_size=SIZE, mid_block_add_attention=False,
    )


def build_unet():
    from diffusers import UNet2DConditionModel

    # attention only at 8x8 and 4x4: at 16x16 it costs half the step on a CPU and the
    # convolutions see a 32 px scene well enough there
    return UNet2DConditionModel(
        sample_size=SIZE // 2, in_channels=4, out_channels=4,
        block_out_channels=(32, 64, 128), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN, attention_head_dim=8, norm_num_groups=16,
    )


def build_text(seed: int):
    from transformers import CLIPTextModel, CLIPTokenizer

    from ..models.tiny import _text_config, write_clip_tokenizer

    torch.manual_seed(seed)
    te = CLIPTextModel(_text_config(hidden=TEXT_HIDDEN))
    tmp = Path(tempfile.mkdtemp(prefix="vf-tok-"))
    try:
        write_clip_tokenizer(tmp)
        tok = CLIPTokenizer.from_pretrained(tmp, model_max_length=MAX_TOKENS)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return te, tok


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def train_vae(steps: int, batch: int, seed: int, out: Path) -> None:
    torch.manual_seed(seed)
    vae = build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    t0 = time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = 2e-3 * _cosine(step, steps, 50)
        x, _ = make_batch(batch, seed=10_000_000 + step)
        x = x * 2 - 1
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        kl = post.kl().mean() / post.mean[0].numel()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log.info("vae step %d/%d loss %.4f (l1 %.4f) %.0fs", step, steps, loss.item(), F.l1_loss(rec, x).item(), time.time() - t0)
    vae.eval()
    with torch.no_grad():
        x, _ = make_batch(256, seed=9_999)
        z = vae.encode(x * 2 - 1).latent_dist.mean
        std = float(z.std())
        rec = vae.decode(z).sample
        err = float((rec / 2 + 0.5 - x).abs().mean())
    vae.register_to_config(scaling_factor=1.0 / std)
    log.info("vae: latent std %.3f -> scaling_factor %.4f; reconstruction L1 %.4f (pixels in [0,1])", std, 1 / std, err)
    vae.save_pretrained(out)
    (out / "train_info.json").write_text(json.dumps({"steps": steps, "batch": batch, "recon_l1": err, "latent_std": std,
                                                     "seconds": time.time() - t0}, indent=1))


def train_decoder(vae_dir: Path, minutes: float, batch: int, seed: int, lr: float = 1e-3) -> None:
    """Go on training the VAE's decoder with the encoder frozen (the latent space the UNet
    learns does not move), on latents with a little noise so it forgives the UNet's errors.
    Trains for a wall-clock budget like the UNet; writes the VAE back to ``vae_dir``."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL.from_pretrained(vae_dir)
    vae.encoder.requires_grad_(False)
    vae.quant_conv.requires_grad_(False)
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    total, step, losses = 100_000, 0, []
    while step < total:
        for g in opt.param_groups:
            g["lr"] = lr * _cosine(step, total, 20)
        x, _ = make_batch(batch, seed=30_000_000 + step)
        x = x * 2 - 1
        with torch.no_grad():
            z = vae.encode(x).latent_dist.mean
            z = z + torch.randn(z.shape, generator=gen) * z.std() * 0.1
        rec = vae.decode(z).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        step += 1
        if step == 20:
            total = int(max(21, minutes * 60 / ((time.time() - t0) / 20)))
            log.info("decoder: %d steps in %.0f min", total, minutes)
        if step % 100 == 0 or step == total:
            log.info("decoder step %d/%d loss %.4f %.0fs", step, total, float(np.mean(losses[-100:])), time.time() - t0)
    vae.eval()
    with torch.no_grad():
        x, _ = make_batch(256, seed=9_999)
        err = float((vae.decode(vae.encode(x * 2 - 1).latent_dist.mean).sample / 2 + 0.5 - x).abs().mean())
    log.info("decoder: reconstruction L1 %.4f", err)
    vae.save_pretrained(vae_dir)
    info_path = vae_dir / "train_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    info["decoder"] = {"steps": total, "batch": batch, "recon_l1": err, "seconds": round(time.time() - t0, 1)}
    info_path.write_text(json.dumps(info, indent=1))


def train_unet(vae_dir: Path, minutes: float, batch: int, seed: int, out: Path, lr: float = 1e-3, max_steps: int = 100_000,
               pool: int = 40_000, resume: bool = False, pool_seed: int = 20_000_000) -> None:
    """Train the UNet and text encoder (from scratch, or with ``resume`` from the pipeline in
    ``out``: a fresh optimizer, schedule and scene pool) and save the pipeline to ``out``."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    from ..models.tiny import _scheduler

    torch.manual_seed(seed)
    vae = AutoencoderKL.from_pretrained(vae_dir).eval().requires_grad_(False)
    sf = vae.config.scaling_factor
    te, tok = build_text(seed)
    torch.manual_seed(seed + 1)
    unet = build_unet()
    prev_info = None
    if resume:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        unet = UNet2DConditionModel.from_pretrained(out / "unet", torch_dtype=torch.float32)
        te = CLIPTextModel.from_pretrained(out / "text_encoder", torch_dtype=torch.float32)
        prev_info = json.loads((out / "train_info.json").read_text()) if (out / "train_info.json").exists() else None
    unet.train()
    te.train()
    sched = _scheduler()
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    ema = [p.detach().clone() for p in params]
    acp = sched.alphas_cumprod
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    t0 = time.time()
    # a fixed pool of scenes encoded once (the encoder would cost a third of every step)
    lat, caps_pool = [], []
    with torch.no_grad():
        for s in range(0, pool, 500):
            x, scenes = make_batch(min(500, pool - s), seed=pool_seed + s)
            lat.append(torch.cat([vae.encode(x[i:i + 100] * 2 - 1).latent_dist.mean for i in range(0, len(x), 100)]) * sf)
            caps_pool += [sc.caption for sc in scenes]
    lat = torch.cat(lat)
    ids_pool = tok(caps_pool, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt").input_ids
    empty_ids = tok([""], padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids
    seen_tokens = set(ids_pool.unique().tolist()) | set(empty_ids.unique().tolist())
    log.info("unet: %d scenes encoded in %.0fs", pool, time.time() - t0)
    t0 = time.time()
    total = max_steps
    timing_steps = 30
    step = 0
    losses = []
    while step < total:
        for g in opt.param_groups:
            g["lr"] = lr * _cosine(step, total, 50 if resume else 200)
        idx = torch.from_numpy(rng.integers(0, pool, batch))
        z = lat[idx]
        ids = ids_pool[idx].clone()
        drop = torch.from_numpy(rng.random(batch) < 0.1)
        ids[drop] = empty_ids
        noise = torch.randn(z.shape, generator=gen)
        t = torch.randint(0, acp.numel(), (batch,), generator=gen)
        a = acp[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z + (1 - a).sqrt() * noise
        hs = te(ids)[0]
        pred = unet(zt, t, hs).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.lerp_(p.detach(), 1 - decay)
        losses.append(loss.item())
        step += 1
        if step == timing_steps:
            per = (time.time() - t0) / timing_steps
            total = int(min(max_steps, max(timing_steps + 1, minutes * 60 / per)))
            log.info("unet: %.3fs/step at batch %d -> %d steps in %.0f min", per, batch, total, minutes)
        if step % 200 == 0 or step == total:
            log.info("unet step %d/%d loss %.4f (mean of last 200) %.0fs", step, total, float(np.mean(losses[-200:])), time.time() - t0)
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
        # token rows never seen in training carry no meaning here; zero them so the shipped
        # weights compress (git) and an unknown word adds nothing but its position
        emb = te.get_input_embeddings().weight
        keep = torch.zeros(emb.shape[0], dtype=torch.bool)
        keep[list(seen_tokens)] = True
        emb[~keep] = 0
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()  # as on disk now (same encoder)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te.eval(), tokenizer=tok, unet=unet.eval(), scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    tmp = out.parent / f".{out.name}-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    # fp32 under the default names: a stock from_pretrained(folder) with no dtype argument must
    # run on CPU (fp16 weights there fail with "mat1 and mat2 must have the same dtype")
    pipe.to(torch.float32).save_pretrained(tmp, safe_serialization=True)
    info = {
        "unet_steps": total, "batch": batch, "lr": lr, "seconds": round(time.time() - t0, 1),
        "final_loss": float(np.mean(losses[-200:])), "threads": torch.get_num_threads(),
        "vae": json.loads((vae_dir / "train_info.json").read_text()) if (vae_dir / "train_info.json").exists() else None,
        "weights_dtype": "float32", "seed": seed, "pool": pool, "pool_seed": pool_seed,
    }
    if resume:
        info = dict(prev_info or {}, continued={k: info[k] for k in ("unet_steps", "batch", "lr", "seconds", "final_loss", "pool", "pool_seed")})
    (tmp / "train_info.json").write_text(json.dumps(info, indent=1))
    if (out / "base_rate.json").exists():
        (out / "base_rate.json").unlink()
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    log.info("unet: saved %s", out)


def base_prompts(n_per_kind: int = 32, seed: int = 123):
    """The fixed, seeded evaluation prompt set: ``n_per_kind`` captions of each kind, and a
    sampling seed per prompt."""
    from rewards.shapes import KINDS

    kinds = [k for k in KINDS for _ in range(n_per_kind)]
    _, scenes = make_batch(len(kinds), seed=seed, kinds=kinds)
    return [s.caption for s in scenes], kinds, list(range(len(kinds)))


def sample_images(model, prompts, seeds, steps: int = BASE_STEPS, guidance: float = BASE_GUIDANCE, batch: int = 32) -> torch.Tensor:
    """Images (N, 3, 32, 32) of ``prompts`` from the DDIM sampler, one generator per seed."""
    from ..sampling import sample

    out = []
    with torch.no_grad():
        for s in range(0, len(prompts), batch):
            ps, ss = prompts[s:s + batch], seeds[s:s + batch]
            cond = model.encode_prompt(ps, cfg=guidance > 1)
            gens = [torch.Generator().manual_seed(int(x)) for x in ss]
            out.append(sample(model, cond, num_steps=steps, guidance_scale=guidance, eta=0.0, generator=gens).images)
    return torch.cat(out)


def judge_table(images, prompts, kinds, which: str = "shapes_judge_heldout", weights: Optional[Path] = None) -> dict:
    """Per kind: mean P(match) and the fraction judged a match (P > 0.5), plus the terms.
    ``weights``: a judge file other than the shipped one of ``which``."""
    import rewards

    kw = {"weights": str(weights), "cache": False} if weights is not None else {}
    judge = rewards.load(which, **kw)
    parts = {}
    for part in ("all", "attribute", "spatial", "count"):
        r = judge if part == "all" else rewards.load(which, part=part, **kw)
        with torch.no_grad():
            parts[part] = torch.cat([r(images[i:i + 64], prompts[i:i + 64]) for i in range(0, len(prompts), 64)])
    table = {}
    for kind in sorted(set(kinds)) + ["overall"]:
        idx = torch.tensor([i for i, k in enumerate(kinds) if kind in ("overall", k)])
        row = {"n": len(idx), "accuracy": float((parts["all"][idx] > 0.5).float().mean()), "mean_p": float(parts["all"][idx].mean())}
        for part in ("attribute", "spatial", "count"):
            v = parts[part][idx]
            v = v[torch.isfinite(v)]
            if len(v):
                row[f"{part}_accuracy"] = float((v > 0.5).float().mean())
        table[kind] = row
    return table, parts["all"]


def baseline(out: Path, n_per_kind: int = 32, judge_dir: Optional[Path] = None, work_dir: Path = WORK_DIR) -> dict:
    """Sample the pipeline in ``out`` on the base-rate prompts, score with both judges (the
    shipped ones, or those in ``judge_dir``) and write ``out/base_rate.json``."""
    from ..models import load_model

    model = load_model("sd15", str(out))
    prompts, kinds, seeds = base_prompts(n_per_kind)
    t0 = time.time()
    images = sample_images(model, prompts, seeds)
    log.info("baseline: %d images in %.0fs", len(prompts), time.time() - t0)
    jw = (lambda n: Path(judge_dir) / f"{n}.safetensors") if judge_dir is not None else (lambda n: None)
    held, held_scores = judge_table(images, prompts, kinds, "shapes_judge_heldout", jw("judge_heldout"))
    train, _ = judge_table(images, prompts, kinds, "shapes_judge", jw("judge"))
    res = {
        "model": "tiny:shapes", "sampler": {"steps": BASE_STEPS, "guidance_scale": BASE_GUIDANCE, "eta": 0.0},
        "prompts": {"n_per_kind": n_per_kind, "seed": 123, "sampling_seeds": "0..N-1, one per prompt"},
        "heldout_judge": held, "train_judge": train,
        "heldout_scores_first16": [round(float(v), 5) for v in held_scores[:16]],
        "note": "accuracy: fraction of images whose P(match its caption) > 0.5 under the judge",
    }
    (out / "base_rate.json").write_text(json.dumps(res, indent=1))
    from .scenes import grid

    grid(images[::3][:32], nrow=8, scale=4).save(Path(work_dir) / "tiny_shapes_samples.png")
    log.info("baseline: held-out judge %s", json.dumps(held))
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stages", default="judges,vae,decoder,unet,unet_more,baseline")
    ap.add_argument("--unet-more-minutes", type=float, default=20.0)
    ap.add_argument("--decoder-minutes", type=float, default=15.0)
    ap.add_argument("--vae-steps", type=int, default=600)
    ap.add_argument("--unet-minutes", type=float, default=40.0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--judge-steps", type=int, default=None, help="judge training steps (default: judge.py's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("--model-dir", default=str(MODEL_DIR), help="where the pipeline is written (default: the shipped tiny:shapes folder)")
    ap.add_argument("--judge-dir", default=None, help="where the judges are written (default: the shipped rewards/assets/shapes)")
    ap.add_argument("--work-dir", default=str(WORK_DIR), help="intermediate VAE and sample sheets")
    ap.add_argument("--baseline-n", type=int, default=32, help="base-rate prompts per kind")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    work, model_dir = Path(args.work_dir), Path(args.model_dir)
    judge_dir = Path(args.judge_dir) if args.judge_dir else None
    work.mkdir(parents=True, exist_ok=True)
    stages = args.stages.split(",")
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        ap.error(f"--stages: unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}")
    t0 = time.time()
    if "judges" in stages:
        from .judge import train_all

        if judge_dir is not None:
            judge_dir.mkdir(parents=True, exist_ok=True)
            train_all(steps=args.judge_steps, out_dir=judge_dir)
        else:
            train_all(steps=args.judge_steps)
    if "vae" in stages:
        train_vae(args.vae_steps, args.batch, args.seed, work / "vae")
    if "decoder" in stages:
        train_decoder(work / "vae", args.decoder_minutes, args.batch, args.seed)
    if "unet" in stages:
        train_unet(work / "vae", args.unet_minutes, args.batch, args.seed, model_dir)
    if "unet_more" in stages:
        train_unet(work / "vae", args.unet_more_minutes, args.batch, args.seed + 1, model_dir, lr=5e-4, pool=30_000,
                   resume=True, pool_seed=21_000_000)
    if "baseline" in stages:
        baseline(model_dir, n_per_kind=args.baseline_n, judge_dir=judge_dir, work_dir=work)
    log.info("world: stages %s done in %.1f min", ",".join(stages), (time.time() - t0) / 60)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
