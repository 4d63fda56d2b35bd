"""One DDIM sampler for every method: trajectories, per-step log-probs and a gradient window.

DDIM (Song et al. 2021, eq. 12) with stochasticity ``eta``: for timestep t and the previous
timestep t' (``t - T_train // steps``, clamped at 0: see :func:`_alpha`), with cumulative
alphas a_t, a_t'

    x0  = (x_t - sqrt(1 - a_t) * eps) / sqrt(a_t)
    s^2 = eta^2 * (1 - a_t') / (1 - a_t) * (1 - a_t / a_t')
    mu  = sqrt(a_t') * x0 + sqrt(1 - a_t' - s^2) * eps
    x_t' = mu + s * z,   z ~ N(0, I)

so each transition is a Gaussian policy ``pi(x_t' | x_t) = N(mu, s^2 I)``; its log-density is
what D3PO (and DDPO) need. At eta = 1, s^2 is the DDPM posterior variance ("fixed_small") and mu
the DDPM posterior mean, so the step is ``DDPMScheduler.step`` (ancestral sampling) on the same
timesteps: the sampler the ReFL and IterComp references use. We follow diffusers' ``DDIMScheduler.step`` for the coefficients and
ddpo-pytorch's ``ddim_step_with_logprob`` in averaging the log-density over latent dimensions.

The autograd graph is kept only on the steps a method asks for (:class:`GradWindow`): none,
ReFL's single late step predicting x0 (ImageReward's ``ReFL``: run to a random step in
[lo, hi] without grad, then one step with grad and take ``pred_original_sample``), or the last
K steps (truncated backprop, DRaFT-K style).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
import torch.utils.checkpoint

from .models.loader import Conditioning, DiffusionModel


@dataclass(frozen=True)
class GradWindow:
    """Steps (0-based index into the sampling loop) that run with autograd on.

    ``stop_at``: stop after computing the model output at that step and return its x0
    prediction as the final latents (ReFL).
    """

    grad_steps: frozenset = frozenset()
    stop_at: Optional[int] = None

    @classmethod
    def none(cls) -> "GradWindow":
        return cls()

    @classmethod
    def refl(cls, stop_step: int) -> "GradWindow":
        return cls(frozenset({stop_step}), stop_step)

    @classmethod
    def last(cls, k: int, num_steps: int) -> "GradWindow":
        return cls(frozenset(range(max(0, num_steps - k), num_steps)))

    @classmethod
    def all(cls, num_steps: int) -> "GradWindow":
        return cls(frozenset(range(num_steps)))


@dataclass
class SampleOutput:
    latents: torch.Tensor  # final latents (x_0, or ReFL's x0 prediction)
    images: Optional[torch.Tensor] = None  # (B,3,H,W) in [0,1]
    timesteps: Optional[torch.Tensor] = None  # (T,) the timesteps visited, in order
    trajectory: Optional[torch.Tensor] = None  # (B, T+1, C, h, w): x_T, ..., x_0 (detached)
    log_probs: Optional[torch.Tensor] = None  # (B, T) log pi(x_t' | x_t), mean over dims
    steps_run: int = 0


def ddim_timesteps(model: DiffusionModel, num_steps: int) -> torch.Tensor:
    """The DDIM timesteps for ``num_steps`` (a private scheduler copy: no shared state)."""
    from diffusers import DDIMScheduler

    sch = DDIMScheduler.from_config(model.scheduler.config)
    sch.set_timesteps(num_steps)
    return sch.timesteps.clone()


def _alpha(model: DiffusionModel, t: torch.Tensor) -> torch.Tensor:
    """a_t for timesteps t; a timestep below 0 (the step after the last one) is clamped to 0.

    The clamp follows ddpo-pytorch (``ddpo_pytorch/diffusers_patch/ddim_with_logprob.py``,
    ``prev_timestep = torch.clamp(prev_timestep, 0, num_train_timesteps - 1)``, line 97) and
    yk7333/d3po (the same file), rather than diffusers' ``DDIMScheduler``, which uses 1.0 there
    when the config's ``set_alpha_to_one`` is true: with a_t' = 1 the last step's std is 0 and its
    log-prob undefined, so D3PO could not train that step. With ``set_alpha_to_one`` false (SD1.5,
    SD2.x, SDXL) both give alphas_cumprod[0].
    """
    ac = model.scheduler.alphas_cumprod.to(torch.float64)
    t = torch.as_tensor(t)
    return ac[t.clamp(min=0).long().cpu()]


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """``t`` (on the CPU) on ``device`` without making the host wait: to a CUDA device through
    pinned memory with ``non_blocking=True`` (a pageable host-to-device copy synchronises the
    stream: PyTorch's ``copy_`` calls ``stream_synchronize`` for a blocking copy, which
    ``torch.cuda.set_sync_debug_mode("error")`` refuses); elsewhere a plain ``.to``. The caching
    host allocator keeps the pinned block until the copy has run."""
    device = torch.device(device)
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@dataclass(frozen=True)
class StepCoefficients:
    """What one sampling run needs per step, computed once before its loop (:func:`step_coefficients`).

    ``a_t`` / ``a_prev`` are float32 on the model's device (the float64 schedule rounded once,
    the values :func:`ddim_step` built per step before); ``stochastic[i]`` says on the host
    whether step i's std is positive, so the loop never reads a device value to branch on it
    (``std > 0`` on a CUDA tensor is a host synchronisation).
    """

    timesteps: torch.Tensor  # (T,) int64 on the device (the UNet's timestep input)
    a_t: torch.Tensor  # (T,) float32 on the device
    a_prev: torch.Tensor  # (T,) float32 on the device
    stochastic: tuple  # (T,) bool: std_i > 0 at this eta


def step_coefficients(model: DiffusionModel, timesteps: torch.Tensor, gap: int, eta: float, device) -> StepCoefficients:
    """The schedule of one run: a_t and a_t' (``_alpha``'s clamp) for every timestep, and whether
    each step draws noise, from the CPU copy of ``alphas_cumprod`` in two copies to the device.
    The std is computed here with :func:`ddim_step`'s float32 formula, so ``stochastic`` is the
    same test ``std > 0`` made on the values the step itself uses."""
    ts = torch.as_tensor(timesteps).cpu().long()
    a_t = _alpha(model, ts).float()
    a_prev = _alpha(model, ts - gap).float()
    std = ddim_std(a_t, a_prev, eta)
    both = to_device(torch.stack([a_t, a_prev]), device)
    return StepCoefficients(to_device(ts, device), both[0], both[1], tuple(bool(s > 0) for s in std))


def ddim_std(a_t: torch.Tensor, a_prev: torch.Tensor, eta: float) -> torch.Tensor:
    """The DDIM step's std ``eta * sqrt((1 - a_t') / (1 - a_t) * (1 - a_t / a_t'))`` (the module
    docstring's s), the variance clamped at 0 against rounding; :func:`ddim_step` and
    :func:`step_coefficients` both take it from here."""
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    return eta * variance.clamp(min=0).sqrt()


def step_gap(num_train_timesteps: int, num_steps: int) -> int:
    """Training timesteps between two of the ``num_steps`` DDIM steps: ``num_train_timesteps //
    num_steps`` (diffusers' ``DDIMScheduler.step``); the timestep after t is ``t - step_gap``."""
    return num_train_timesteps // num_steps


def trained_step_count(num_steps: int, fraction: float) -> int:
    """How many of a trajectory's ``num_steps`` transitions D3PO / DDPO / GRPO train per sample:
    ``int(num_steps * fraction)`` (the references' ``int(num_steps * timestep_fraction)``), and
    at least 1 (ours: a fraction below 1 / num_steps would train nothing)."""
    return max(1, int(num_steps * fraction))


def x0_clip(model: DiffusionModel) -> Optional[float]:
    """The x0 clip range the model's scheduler config asks for (``clip_sample`` /
    ``clip_sample_range``), or None. ``thresholding`` (dynamic thresholding, meant for
    pixel-space models) is refused: this sampler does not implement it."""
    from .errors import UserError

    c = model.scheduler.config
    if c.get("thresholding"):
        raise UserError(f"model.path: {getattr(model, 'path', '?')}: the scheduler config sets thresholding: true (dynamic thresholding, for "
                        "pixel-space models); vfeedback's DDIM sampler does not implement it. Use a latent diffusion model "
                        "whose scheduler has thresholding: false")
    if c.get("clip_sample"):
        return float(c.get("clip_sample_range", 1.0))
    return None


def ddim_step(model_output: torch.Tensor, x_t: torch.Tensor, a_t: torch.Tensor, a_prev: torch.Tensor, eta: float,
              prediction_type: str = "epsilon", prev_sample: Optional[torch.Tensor] = None,
              noise: Optional[torch.Tensor] = None, clip: Optional[float] = None, stochastic: Optional[bool] = None):
    """One DDIM transition (equation in the module docstring), in float32.

    ``clip``: clamp the x0 prediction to ``[-clip, clip]`` before the mean is formed, as
    ``DDIMScheduler.step`` does for ``clip_sample`` (eps is kept, its default
    ``use_clipped_model_output=False``).

    Returns ``(prev_sample, log_prob, x0_pred, mean, std)``; ``log_prob`` is
    ``log N(prev_sample; mean, std^2)`` averaged over all non-batch dims (NaN when std = 0).
    ``prev_sample`` given: score that sample (D3PO recomputing a stored transition) instead of
    drawing one with ``noise``. ``stochastic``: whether std > 0, when the caller knows it on the
    host (:class:`StepCoefficients`); None: read from ``std`` (a host synchronisation on CUDA).
    """
    x_t = x_t.float()
    out = model_output.float()
    a_t = torch.as_tensor(a_t, dtype=torch.float32, device=x_t.device)  # pragma: no mutate: device placement (the dtype: a test checks std's)
    a_prev = torch.as_tensor(a_prev, dtype=torch.float32, device=x_t.device)  # pragma: no mutate: device placement (as above)
    b_t = 1 - a_t
    if prediction_type == "epsilon":
        x0 = (x_t - b_t.sqrt() * out) / a_t.sqrt()
        eps = out
    elif prediction_type == "v_prediction":
        x0 = a_t.sqrt() * x_t - b_t.sqrt() * out
        eps = a_t.sqrt() * out + b_t.sqrt() * x_t
    elif prediction_type == "sample":
        x0 = out
        eps = (x_t - a_t.sqrt() * x0) / b_t.sqrt()
    else:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")
    if clip is not None:
        x0 = x0.clamp(-clip, clip)
    std = ddim_std(a_t, a_prev, eta)
    mean = a_prev.sqrt() * x0 + (1 - a_prev - std**2).clamp(min=0).sqrt() * eps
    if stochastic is None:
        stochastic = bool(std > 0)
    if prev_sample is None:
        if stochastic:
            if noise is None:
                raise ValueError("ddim_step: eta > 0 needs noise")
            prev_sample = mean + std * noise.to(mean)  # pragma: no mutate: a cast of the noise (prev_sample.float() follows)
        else:
            prev_sample = mean
    prev_sample = prev_sample.float()
    if stochastic:  # pragma: no mutate: at std = 0 the density below is 0/0 or inf - inf, NaN as well
        lp = -((prev_sample.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
        log_prob = lp.mean(dim=tuple(range(1, lp.ndim)))
    else:
        log_prob = torch.full((x_t.shape[0],), float("nan"), device=x_t.device)  # pragma: no mutate: device placement, float("NAN")
    return prev_sample, log_prob, x0, mean, std


def predict_noise(model: DiffusionModel, x_t: torch.Tensor, t, cond: Conditioning, guidance_scale: float) -> torch.Tensor:
    """UNet output with classifier-free guidance (``guidance_scale`` <= 1: conditional only)."""
    cfg = guidance_scale > 1.0
    hs, added = cond.unet_inputs(cfg)
    inp = torch.cat([x_t, x_t]) if cfg else x_t
    dtype = model.unet.dtype
    if added is not None:
        added = {k: v.to(dtype) for k, v in added.items()}
    tt = t if isinstance(t, torch.Tensor) and t.device == x_t.device else torch.as_tensor(t, device=x_t.device)
    net = model.denoiser if model.denoiser is not None else model.unet
    out = net(inp.to(dtype), tt, encoder_hidden_states=hs.to(dtype), added_cond_kwargs=added).sample
    if cfg:
        un, te = out.chunk(2)
        out = un + guidance_scale * (te - un)
    return out.float()


Generators = Union[torch.Generator, Sequence[torch.Generator], None]


def randn(shape, generator: Generators, device) -> torch.Tensor:
    """Standard normal noise drawn on the CPU (device independent, so a seed gives the same
    image everywhere). A list of generators draws row i from generator i, so an image depends
    only on its own seed, not on the batch it is in."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        rows = [torch.randn((1, *shape[1:]), generator=g, dtype=torch.float32) for g in generator]
        return to_device(torch.cat(rows), device)
    return to_device(torch.randn(shape, generator=generator, dtype=torch.float32), device)


def initial_latents(model: DiffusionModel, batch: int, generator: Generators = None) -> torch.Tensor:
    """Standard normal latents of the model's shape (see :func:`randn`)."""
    return randn((batch, *model.latent_shape), generator, model.device)


def sample(model: DiffusionModel, cond: Conditioning, *, num_steps: int = 50, guidance_scale: float = 7.5, eta: float = 0.0,
           latents: Optional[torch.Tensor] = None, generator: Generators = None,
           grad: GradWindow = GradWindow(), return_trajectory: bool = False, log_probs: bool = False,
           decode: bool = True, vae_checkpoint: bool = False, unet_checkpoint: bool = False) -> SampleOutput:
    """DDIM sampling for SD1.5 and SDXL conditioning.

    ``cond``: one row per image (repeat it for several images per prompt). Randomness (initial
    latents when not given, and the per-step noise when ``eta`` > 0) comes from ``generator``
    on the CPU. ``grad`` picks the steps that keep autograd; the images are decoded with grad
    when the last step run did. ``unet_checkpoint``: each UNet call that keeps autograd runs under
    ``torch.utils.checkpoint`` (non-reentrant), so a window of K steps stores K inputs instead of
    K sets of activations and recomputes each call in the backward pass (DRaFT-K / AlignProp).
    """
    b = cond.embeds.shape[0]
    if latents is None:
        latents = initial_latents(model, b, generator)
    x = to_device(latents.float(), model.device)
    timesteps = ddim_timesteps(model, num_steps)
    gap = step_gap(model.scheduler.config.num_train_timesteps, num_steps)
    pred_type = model.scheduler.config.prediction_type
    clip = x0_clip(model)
    # everything the loop reads is computed here, once: the timesteps and alphas on the device,
    # whether each step is stochastic on the host, and (eta > 0) the noise of every step the
    # run reaches, drawn in the order the loop drew it (per generator: step 0, 1, ...) and copied
    # in one transfer; the loop itself then makes no host synchronisation (issue #21)
    co = step_coefficients(model, timesteps, gap, eta, x.device)
    n_run = len(timesteps) if grad.stop_at is None else min(len(timesteps), grad.stop_at + 1)
    noise = None
    if eta > 0 and n_run:
        noise = to_device(torch.stack([randn(x.shape, generator, "cpu") for _ in range(n_run)]), x.device)
    traj = [x.detach()] if return_trajectory else None
    lps = [] if log_probs else None
    steps_run = 0
    last_grad = False
    for i in range(n_run):
        t = co.timesteps[i]
        with_grad = i in grad.grad_steps
        if with_grad and not last_grad:
            x = x.detach()
        with torch.set_grad_enabled(with_grad and torch.is_inference_mode_enabled() is False):
            if with_grad and unet_checkpoint and torch.is_grad_enabled():
                out = torch.utils.checkpoint.checkpoint(predict_noise, model, x, t, cond, guidance_scale, use_reentrant=False)
            else:
                out = predict_noise(model, x, t, cond, guidance_scale)
            x_prev, lp, x0, _, _ = ddim_step(out, x, co.a_t[i], co.a_prev[i], eta, pred_type,
                                             noise=None if noise is None else noise[i], clip=clip, stochastic=co.stochastic[i])
        steps_run += 1
        last_grad = with_grad
        if grad.stop_at is not None and i == grad.stop_at:
            x = x0
            break
        x = x_prev
        if traj is not None:
            traj.append(x.detach())
        if lps is not None:
            lps.append(lp.detach())
    images = None
    if decode:
        with torch.set_grad_enabled(last_grad):
            images = model.decode(x, checkpoint=vae_checkpoint)
    return SampleOutput(
        latents=x,
        images=images,
        timesteps=timesteps,
        trajectory=torch.stack(traj, dim=1) if traj is not None else None,
        log_probs=torch.stack(lps, dim=1) if lps else None,
        steps_run=steps_run,
    )


def transition_log_prob(model: DiffusionModel, cond: Conditioning, x_t: torch.Tensor, t, x_prev: torch.Tensor,
                        *, num_steps: int, guidance_scale: float, eta: float) -> torch.Tensor:
    """``log pi(x_prev | x_t, c)`` under the model's current weights, with autograd.

    The quantity D3PO's loss differentiates (their ``compute_log_prob``): the stored next
    latent scored under the policy's Gaussian at timestep ``t``. Returns shape (B,).
    """
    gap = step_gap(model.scheduler.config.num_train_timesteps, num_steps)
    out = predict_noise(model, x_t.float(), t, cond, guidance_scale)
    _, lp, _, _, _ = ddim_step(out, x_t, _alpha(model, t), _alpha(model, torch.as_tensor(t) - gap), eta,
                               model.scheduler.config.prediction_type, prev_sample=x_prev, clip=x0_clip(model))
    return lp
