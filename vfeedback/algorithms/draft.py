"""DRaFT-K / DRaFT-LV (Clark et al., "Directly Fine-Tuning Diffusion Models on Differentiable
Rewards", ICLR 2024) and AlignProp's randomized truncation (Prabhudesai et al. 2023).

Both maximise a differentiable reward r(x_0, c) by backpropagating it through the sampler into
the LoRA weights. Per step (DRaFT's Algorithm 1, "DRaFT with options for DRaFT-K and DRaFT-LV"):

* **DRaFT-K** (``draft.k``): sample x_T -> x_0 with the current weights; the first T - K steps
  run without autograd, the last K with it (``GradWindow.last``); decode x_0, score it and
  ``loss = -grad_scale * mean r``. K = 1 is DRaFT-1, K = T full DRaFT.
* **DRaFT-LV** (``draft.lv`` = n): sample all T steps without autograd, then n times: draw
  eps ~ N(0, I), re-noise the final latent to the last sampling timestep t_1,
  ``x_1 = sqrt(a_t1) * x_0 + sqrt(1 - a_t1) * eps`` (the forward process q(x_1 | x_0)), run that
  one sampling step with autograd and score its output. The paper's Algorithm 1 sums the n
  gradients; we average the n losses (the same direction, n times smaller: our choice, so
  that ``grad_scale`` and the learning rate mean the same for every n). The paper text was not
  reachable from our machine when this was written: the re-noising and the sum are as we read
  Algorithm 1 and Sec. 3 ("lower-variance gradient estimates for K = 1"), checked against
  nothing else; docs/draft.md says so.
* **AlignProp** (``draft.k_range`` or ``draft.k_gauss``): K is drawn afresh at every step. The
  reference (github:mihirp1998/AlignProp ``sd_pipeline.py`` lines 124-132) draws the index of
  the first step that keeps the gradient, ``backprop_timestep``, by one of three strategies
  (``gaussian`` N(42, 5), the default in ``config/alignprop_config.py`` lines 111-112 and the one
  its ``aesthetic.sh`` / ``hps.sh`` pass, line 6 of each; ``uniform`` ``randint(0, 50)``;
  ``fixed`` 49, its ``*_k1.sh``) and redraws until it lies in [1, steps - 1]; the steps before it
  run the UNet but detach its output (lines 224-225), so K = steps - backprop_timestep.
  ``draft.k_range`` is the uniform strategy as K ~ U{lo, ..., hi} (both ends included; the
  reference's uniform draw is K ~ U{1, ..., 49} on 50 steps); ``draft.k_gauss`` = [mean, std]
  is the gaussian one in the reference's terms (:func:`draw_k_gaussian`).
  Where the gradient stops differs in form, not in value: the reference keeps the latent chain
  differentiable and detaches the early UNet outputs, we run the early steps under no_grad;
  the early latents depend on no trainable weight either way, so the LoRA gradient is the same.
  Its loss (``alignprop_trainer.py`` lines 108-131, 330-331) is ``-reward * grad_scale`` (or
  ``1 - score`` for HPS: the same gradient) times ``loss_coeff`` 0.01: our ``grad_scale``.
* **Memory**: the reference wraps every UNet call in ``torch.utils.checkpoint`` (non-reentrant;
  ``sd_pipeline.py`` lines 206-214); ``draft.unet_checkpoint`` does that for the calls inside the
  gradient window, so a window of K steps keeps K latents rather than K UNets' activations
  (bench/draft_step.py measures it).
* The pre-training loss that ImageReward's ReFL adds against over-optimisation is available as
  ``draft.pretrain`` (the same data and loss as ``refl.pretrain``: :func:`.refl.denoising_loss`).

Every random draw comes from the engine's generators: x_T, the eta noise and the LV re-noising
from the per-image ones, K from the step's, so a 2-process run does what 1 process does and all
processes draw the same K (their backward passes then match, as DDP needs).
"""
from __future__ import annotations

import logging

import torch

from ..sampling import GradWindow, _alpha, ddim_step, predict_noise, randn, sample, step_gap, x0_clip
from .refl import PretrainData, denoising_loss, draw_stop_step, reward_metrics

log = logging.getLogger(__name__)


def draw_k(k: int, k_range, gen: torch.Generator, k_gauss=None, steps: int | None = None) -> int:
    """K for this step: AlignProp's gaussian draw when ``k_gauss`` = (mean, std) is given (needs
    ``steps``, the sampling steps: :func:`draw_k_gaussian`), else uniform over ``k_range`` =
    [lo, hi] with both ends included (AlignProp's uniform truncation), else ``k``."""
    if k_gauss is not None:
        return draw_k_gaussian(k_gauss[0], k_gauss[1], steps, gen)
    if k_range is None:
        return int(k)
    return draw_stop_step(k_range, gen)


def draw_k_gaussian(mean: float, std: float, steps: int, gen: torch.Generator) -> int:
    """AlignProp's gaussian truncation (github:mihirp1998/AlignProp ``sd_pipeline.py`` lines
    124-128): the index of the first sampling step that keeps the gradient is
    ``b = int(x)``, x ~ N(mean, std) (Python's ``int``: truncation toward zero), redrawn while
    ``b < 1`` or ``b >= steps``; steps b..steps-1 keep it (line 224: ``i < b`` is detached), so
    K = ``steps - b`` lies in [1, steps - 1]. Returns K.

    The reference draws one b per sampler call from the process's global torch RNG (a float32
    ``torch.distributions.Normal`` sample); we draw x = mean + std * z with z ~ N(0, 1) (torch's
    float32 normal) from ``gen``, the step's generator, as ``draft.k_range`` does (our choice: every
    process and a resumed run draw the same K). ``mean`` and ``std`` are in sampling-step
    indices of this run, as the reference's are of its ``sample_num_steps``: (42, 5) is its
    recipe for 50 steps; for another step count we do not rescale them (our choice; the config
    refuses a mean outside [1, steps - 1] and a std above ``steps``, so that a draw lands in
    range at least about one time in five and the redraw loop ends). Out-of-range draws are
    redrawn, as the reference does, not clipped."""
    while True:
        b = int(mean + std * torch.randn((), generator=gen).item())
        if 1 <= b < steps:
            return steps - b


def draft_loss(r: torch.Tensor, grad_scale: float) -> torch.Tensor:
    """``-grad_scale * mean(r)`` over the finite rewards ``r`` (B,); NaN when none is finite (the
    engine counts and skips such a step). Minimising it raises every reward."""
    valid = torch.isfinite(r)
    if not valid.any():
        return r.sum() * float("nan")  # pragma: no mutate: x * NaN and x / NaN are the same NaN, as is float("NAN")
    return -r[valid].mean() * grad_scale


def renoise(x0: torch.Tensor, alpha: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """q(x_t | x_0): ``sqrt(alpha) * x0 + sqrt(1 - alpha) * eps`` in float32 (``alpha`` = a_t,
    the cumulative product of the scheduler's alphas at t)."""
    a = torch.as_tensor(alpha, dtype=torch.float32, device=x0.device)  # pragma: no mutate: device placement; a 0-dim alpha leaves the product float32 either way
    return a.sqrt() * x0.float() + (1 - a).sqrt() * eps.float()


class DRaFT:
    """``algorithm: draft``: one micro-batch -> the negated reward of images whose last K
    sampling steps (or LV re-samples of the last step) carry the gradient."""

    needs_differentiable_reward = True

    def __init__(self, cfg, trainer):
        self.cfg = cfg
        self.trainer = trainer
        p = cfg.draft.pretrain
        self.pretrain = PretrainData(p.data, "draft.pretrain.data") if p else None

    @staticmethod
    def check_config(cfg) -> None:
        """Fail on bad pre-training data before the run folder is created."""
        if cfg.draft.pretrain:
            PretrainData(cfg.draft.pretrain.data, "draft.pretrain.data")

    def train_step(self, prompts, generators, step_gen: torch.Generator):
        cfg, d, m = self.cfg, self.cfg.draft, self.trainer.model
        s = cfg.sampling
        cond = m.encode_prompt(prompts, [cfg.prompts.negative] * len(prompts), cfg=s.guidance_scale > 1)
        if d.lv:
            loss, r = self._lv_loss(cond, prompts, generators)
            k = 1
        else:
            k = draw_k(d.k, d.k_range, step_gen, k_gauss=d.k_gauss, steps=s.steps)
            out = sample(m, cond, num_steps=s.steps, guidance_scale=s.guidance_scale, eta=s.eta, generator=generators,
                         grad=GradWindow.last(k, s.steps), vae_checkpoint=cfg.model.vae_checkpointing,
                         unet_checkpoint=d.unet_checkpoint)
            r = self.trainer.reward(out.images.float(), prompts).float()
            loss = draft_loss(r, d.grad_scale)  # nothing scorable: NaN, a skipped, counted step
        mets = {**reward_metrics(r, self.trainer.reward), "k": k, "draft_loss": float(loss.detach())}
        if self.pretrain is not None:
            pl = denoising_loss(m, self.pretrain, d.pretrain.batch_size, step_gen)
            mets["pretrain_loss"] = float(pl.detach())
            loss = loss + d.pretrain.weight * pl
        return loss, mets

    def _lv_loss(self, cond, prompts, generators):
        """DRaFT-LV: x_0 without grad, then ``draft.lv`` re-noised last steps with grad; returns
        the mean of their losses and all their rewards (n * B,)."""
        cfg, d, m = self.cfg, self.cfg.draft, self.trainer.model
        s = cfg.sampling
        with torch.no_grad():
            out = sample(m, cond, num_steps=s.steps, guidance_scale=s.guidance_scale, eta=s.eta, generator=generators, decode=False)
        x0 = out.latents.detach().float()
        t1 = out.timesteps[-1]
        gap = step_gap(m.scheduler.config.num_train_timesteps, s.steps)
        a_t, a_prev = _alpha(m, t1), _alpha(m, t1 - gap)
        pred_type, clip = m.scheduler.config.prediction_type, x0_clip(m)
        losses, rs = [], []
        for _ in range(d.lv):
            x1 = renoise(x0, a_t, randn(x0.shape, generators, x0.device))
            noise = randn(x0.shape, generators, x0.device) if s.eta > 0 else None
            if d.unet_checkpoint:
                eps = torch.utils.checkpoint.checkpoint(predict_noise, m, x1, t1, cond, s.guidance_scale, use_reentrant=False)
            else:
                eps = predict_noise(m, x1, t1, cond, s.guidance_scale)
            x_prev = ddim_step(eps, x1, a_t, a_prev, s.eta, pred_type, noise=noise, clip=clip)[0]
            r = self.trainer.reward(m.decode(x_prev, checkpoint=cfg.model.vae_checkpointing).float(), prompts).float()
            losses.append(draft_loss(r, d.grad_scale))
            rs.append(r)
        return torch.stack(losses).mean(), torch.cat(rs)
