"""ReFL: Reward Feedback Learning (Xu et al., "ImageReward", NeurIPS 2023, Sec. 4 / Alg. 1).

Per step, as in the reference trainer (THUDM/ImageReward ``ImageReward/ReFL.py``,
``Trainer.train``, lines 711-756; launch settings in ``scripts/train_refl.sh``):

1. sample T = 40 steps with ``DDPMScheduler`` (ancestral steps: our DDIM with ``eta`` 1 is the
   same transition, see :mod:`vfeedback.sampling`) and the prompt alone (no classifier-free
   guidance: ``guidance_scale`` 1), without grad, up to a step index ``i ~ U{lo, ..., hi}``
   drawn inclusively (``random.randint(30, 39)``);
2. at step i run the UNet once with grad and take the x0 prediction
   (``pred_original_sample``), decode it with grad;
3. ``loss = relu(margin - reward(x0)).mean() * grad_scale`` (``F.relu(-rewards + 2)``,
   ``--grad_scale 0.001``; lr 1e-5, batch 2 x accumulation 4 per GPU on 8 GPUs, EMA of the
   UNet with diffusers' ``EMAModel`` defaults: our ``train.ema``);
4. optionally add the pre-training loss (the usual denoising MSE on a user image-text set),
   which the paper uses to regularise against over-optimisation.

``sampling.eta`` 0 and ``sampling.guidance_scale`` > 1 remain available (our options, not the
reference's: they change the trajectory the gradient is taken on).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import UserError
from ..sampling import GradWindow, sample

log = logging.getLogger(__name__)


def draw_stop_step(stop_range, gen: torch.Generator) -> int:
    """The step index where sampling stops, uniform over ``[lo, hi]`` with both ends included
    (the reference's ``random.randint(lo, hi)``)."""
    lo, hi = stop_range
    return int(torch.randint(lo, hi + 1, (1,), generator=gen))


def refl_loss(r: torch.Tensor, margin: float, grad_scale: float) -> torch.Tensor:
    """``relu(margin - r).mean() * grad_scale`` over the finite rewards ``r`` (B,); NaN when
    none is finite (the engine counts and skips such a step). Minimising it raises ``r`` until
    it reaches ``margin``."""
    valid = torch.isfinite(r)
    if not valid.any():
        return r.sum() * float("nan")  # pragma: no mutate: x * NaN and x / NaN are the same NaN, as is float("NAN")
    return F.relu(margin - r[valid]).mean() * grad_scale


class ReFL:
    needs_differentiable_reward = True

    def __init__(self, cfg, trainer):
        self.cfg = cfg
        self.trainer = trainer
        self.pretrain = PretrainData(cfg.refl.pretrain.data) if cfg.refl.pretrain else None

    @staticmethod
    def check_config(cfg) -> None:
        """Fail on bad pre-training data before the run folder is created."""
        if cfg.refl.pretrain:
            PretrainData(cfg.refl.pretrain.data)

    def train_step(self, prompts, generators, step_gen: torch.Generator):
        cfg, m = self.cfg, self.trainer.model
        stop = draw_stop_step(cfg.refl.stop_range, step_gen)
        cond = m.encode_prompt(prompts, [cfg.prompts.negative] * len(prompts), cfg=cfg.sampling.guidance_scale > 1)
        out = sample(m, cond, num_steps=cfg.sampling.steps, guidance_scale=cfg.sampling.guidance_scale, eta=cfg.sampling.eta,
                     generator=generators, grad=GradWindow.refl(stop), vae_checkpoint=cfg.model.vae_checkpointing)
        r = self.trainer.reward(out.images.float(), prompts).float()
        loss = refl_loss(r, cfg.refl.margin, cfg.refl.grad_scale)  # nothing scorable: NaN, a skipped, counted step
        mets = {**reward_metrics(r, self.trainer.reward), "stop_step": stop, "refl_loss": float(loss.detach())}
        if self.pretrain is not None:
            pl = self.pretrain_loss(step_gen)
            mets["pretrain_loss"] = float(pl.detach())
            loss = loss + cfg.refl.pretrain.weight * pl
        return loss, mets

    def pretrain_loss(self, gen: torch.Generator) -> torch.Tensor:
        """Standard diffusion denoising loss on a batch of the user's image-text pairs."""
        return denoising_loss(self.trainer.model, self.pretrain, self.cfg.refl.pretrain.batch_size, gen)


def reward_metrics(r: torch.Tensor, reward) -> dict:
    """``reward_mean`` / ``reward_std`` over the finite rewards ``r`` (B,) and the mean of each
    component a combined ``reward`` scored last (``reward/<name>``); shared by the methods that
    backpropagate a reward (ReFL, DRaFT)."""
    valid = torch.isfinite(r)
    mets = {"reward_mean": r[valid].mean().item(),  # none finite: the mean of nothing, NaN
            "reward_std": r[valid].std().item() if valid.sum() > 1 else 0.0}
    for name, v in getattr(reward, "last_components", {}).items():
        fv = v[torch.isfinite(v)]
        if fv.numel():
            mets[f"reward/{name}"] = fv.mean().item()
    return mets


def denoising_loss(m, data: "PretrainData", batch_size: int, gen: torch.Generator) -> torch.Tensor:
    """The pre-training loss ImageReward's ReFL regularises with: the usual denoising MSE of the
    model ``m`` on ``batch_size`` image-text pairs drawn from ``data`` with ``gen``."""
    images, texts = data.batch(batch_size, gen, m.resolution)
    lat = m.encode_images(images)
    noise = torch.randn(lat.shape, generator=gen).to(lat)
    sch = m.scheduler
    t = torch.randint(0, sch.config.num_train_timesteps, (lat.shape[0],), generator=gen).to(lat.device)
    noisy = sch.add_noise(lat, noise, t)
    target = noise if sch.config.prediction_type == "epsilon" else sch.get_velocity(lat, noise, t)
    cond = m.encode_prompt(texts, cfg=False)
    hs, added = cond.unet_inputs(False)
    net = m.denoiser if m.denoiser is not None else m.unet
    pred = net(noisy.to(m.unet.dtype), t, encoder_hidden_states=hs, added_cond_kwargs=added).sample
    return F.mse_loss(pred.float(), target.float())


class PretrainData:
    """Image-text pairs: a folder of images with same-name ``.txt`` captions, a JSONL file
    of ``{"image": path, "text": caption}`` (paths relative to the file), or ``world:shapes``:
    fresh captioned scenes from the shapes-world generator (the data tiny:shapes was trained
    on), drawn from the step's generator, so the denoising loss anchors the model to them."""

    WORLDS = ("world:shapes",)

    def __init__(self, spec: str, field: str = "refl.pretrain.data"):
        from rewards.images import IMAGE_SUFFIXES

        self.world = None
        self.items: list[tuple[Path, str]] = []
        if str(spec).startswith("world:"):
            if spec not in self.WORLDS:
                raise UserError(f"{field}: unknown generated data {spec!r}; available: {', '.join(self.WORLDS)}")
            self.world = spec
            return
        p = Path(spec)
        if p.is_dir():
            for img in sorted(x for x in p.iterdir() if x.suffix.lower() in IMAGE_SUFFIXES):
                cap = img.with_suffix(".txt")
                if cap.exists():
                    self.items.append((img, cap.read_text(encoding="utf-8").strip()))
        elif p.is_file():
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                    img, text = obj["image"], obj["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise UserError(f"{field}: {p} line {i}: expected {{\"image\": path, \"text\": caption}}") from None
                ip = Path(img) if Path(img).is_absolute() else p.parent / img
                self.items.append((ip, text))
        else:
            raise UserError(f"{field}: {p} not found")
        if not self.items:
            raise UserError(f"{field}: {p} holds no image-text pairs (images need a same-name .txt caption)")
        for ip, _ in self.items:
            if not ip.exists():
                raise UserError(f"{field}: image {ip} not found")

    def batch(self, n: int, gen: torch.Generator, size: int):
        from rewards.images import load_image

        if self.world is not None:
            from rewards.shapes import KINDS

            from ..world.scenes import make_batch

            seed = int(torch.randint(2**31 - 1, (1,), generator=gen))
            kinds = [KINDS[i] for i in torch.randint(len(KINDS), (n,), generator=gen).tolist()]
            images, scenes = make_batch(n, seed=seed, kinds=kinds)
            if images.shape[-1] != size:
                images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            return images, [sc.caption for sc in scenes]

        idx = torch.randint(len(self.items), (n,), generator=gen).tolist()
        imgs = []
        for i in idx:
            t = load_image(self.items[i][0])
            imgs.append(F.interpolate(t[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0])
        return torch.stack(imgs), [self.items[i][1] for i in idx]
