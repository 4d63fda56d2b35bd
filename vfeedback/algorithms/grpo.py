"""GRPO for diffusion: group-relative advantages with PPO-clip, on DDIM (eta > 0) for SD1.5 / SDXL.

Flow-GRPO (Liu et al. 2025, github.com/yifan123/flow_grpo at commit ac4c86e) and DanceGRPO (Xue
et al. 2025, github.com/XueZeyue/DanceGRPO at commit 15cc71d) bring GRPO (Shao et al. 2024) to
image generation: G images per prompt, each image's advantage its reward standardised within its
prompt's group, ``A = (r - mean_group) / (std_group + 1e-4)``, then the PPO-clip loss of DDPO on
every denoising step, and optionally a KL penalty to the frozen base. What we follow:

* groups and statistics: Flow-GRPO's ``flow_grpo/stat_tracking.py`` (``PerPromptStatTracker.update``
  with ``type='grpo'``, lines 11-31, emptied after each epoch, ``scripts/train_sd3.py`` line 780):
  a group is every image of one prompt in the epoch's global batch (gathered over processes,
  line 742), its mean and population std (``np.std``) + 1e-4; ``global_std`` (their
  ``sample.global_std``) uses the std of the whole batch instead of the group's;
* loss: ``scripts/train_sd3.py`` lines 881-897: the PPO-clip surrogate with ``clip_range`` and
  advantages clamped to ``adv_clip_max``, plus ``kl_coef`` (their ``train.beta``) times the
  Gaussian KL between the policy's and the base's (LoRA disabled, line 877) transition means;
* shared initial noise within a group (``shared_noise``): DanceGRPO ``fastvideo/train_grpo_sd.py``
  lines 415-435 start every image of a group from the same x_T (theirs reuses one x_T for the
  whole batch "for convenience"; ours one per group, drawn from the group's seed), so the group's
  images differ only by the per-step DDIM noise.

What differs from the flow-matching originals: Flow-GRPO turns a rectified-flow ODE into an SDE
(``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py``, ``noise_level`` 0.7) to get a stochastic
policy; SD1.5 / SDXL are DDPM-trained epsilon / v predictors, whose DDIM sampler with eta > 0 is
already a Gaussian policy, so we use that transition (:mod:`vfeedback.sampling`, as DDPO and
DanceGRPO's SD script do; eta 1 is the DDPM ancestral step). The KL is therefore divided by the
DDIM step's own sigma_k (the exact Gaussian KL) rather than Flow-GRPO's ``std_dev_t``. DanceGRPO's
SD script standardises with the unbiased std + 1e-8 and skips the last denoising step; we use
Flow-GRPO's form and train every step (``timestep_fraction`` picks a random subset). Flow-GRPO's
dropping of zero-advantage samples (lines 796-817) is not done: they contribute nothing to the
PPO term and still to the KL. The training phase (inner epochs, per-sample timestep shuffles,
``updates_per_epoch``, the engine's last update) is DDPO's (:mod:`.ddpo`).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .ddpo import PolicyGradient


def group_advantages(prompts: Sequence[str], rewards, *, global_std: bool = False, eps: float = 1e-4) -> np.ndarray:
    """``(r - mean_g) / (std_g + eps)`` per group g of equal prompts (population std, as
    Flow-GRPO's ``np.std``); ``global_std``: the std of every finite reward of the batch instead
    of the group's. ``prompts`` (n,), ``rewards`` (n,) -> (n,) float64; a non-finite reward gets
    0 and is left out of the statistics. A group of equal rewards gets 0 (its std is 0)."""
    p = np.asarray(list(prompts), dtype=object)  # pragma: no mutate: a str array compares with == as an object array does
    r = np.asarray(rewards, dtype=np.float64)
    ok = np.isfinite(r)
    adv = np.zeros_like(r)
    if not ok.any():
        return adv
    gstd = r[ok].std()
    for prompt in sorted(set(p[ok].tolist())):
        m = (p == prompt) & ok
        std = gstd if global_std else r[m].std()
        adv[m] = (r[m] - r[m].mean()) / (std + eps)
    return adv


class GRPO(PolicyGradient):
    """G trajectories per prompt, group-relative advantages, PPO-clip and an optional KL to
    the base (module docstring)."""

    name = "grpo"

    @property
    def group_size(self) -> int:
        return self.sec.group_size

    def shared_latent(self) -> bool:
        return self.sec.shared_noise

    def advantages(self, prompts, rewards) -> np.ndarray:
        return group_advantages(prompts, rewards, global_std=self.sec.global_std)

