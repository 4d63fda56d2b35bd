"""DDPO: Denoising Diffusion Policy Optimization (Black et al., "Training Diffusion Models with
Reinforcement Learning", ICLR 2024), the PPO-clip variant (DDPO_IS), following the authors'
reference github.com/kvablack/ddpo-pytorch at commit 1958463: ``scripts/train.py`` and
``config/base.py``. The policy-gradient core here (sampling with log-probs, PPO-clip, the
training phase, the optional KL to the frozen base) is shared with GRPO (:mod:`.grpo`).

Denoising is a T-step MDP whose policy at step k is the DDIM transition with eta > 0,
``pi(x_{k-1} | x_k, c) = N(mu_theta(x_k, k, c), sigma_k^2 I)`` (:mod:`vfeedback.sampling`; its
log-density averaged over latent dims, as ``ddim_step_with_logprob``). One *epoch* of the
reference is one engine step here:

1. sampling (``train.py`` lines 306-373): ``train.gradient_accumulation_steps`` batches of
   ``train.batch_size`` prompts per process (the reference's ``sample.num_batches_per_epoch`` and
   ``sample.batch_size``) are sampled with the current weights, keeping every latent x_T..x_0
   and each step's log-prob, and scored by the reward;
2. advantages (lines 412-442): rewards and prompts are gathered over all processes; each reward
   is normalised by the mean and std of its prompt's recent rewards (:class:`PerPromptStatTracker`,
   their ``ddpo_pytorch/stat_tracking.py``: a buffer of the last ``buffer_size`` rewards per
   prompt that persists across epochs; below ``min_count`` the whole batch's mean and std are
   used), or by the batch's with ``stat_tracking: false``; then each process keeps its slice;
3. training (lines 454-593): ``inner_epochs`` passes over the samples; each shuffles the samples
   and, independently per sample, the order of its timesteps, trains the first
   ``int(steps * timestep_fraction)`` of them, and makes ``updates_per_epoch`` optimizer updates
   (the reference's ``samples_per_epoch / (train.batch_size * num_gpus *
   train.gradient_accumulation_steps)``), each averaging over its samples and timesteps
   (accelerate's accumulation over ``gradient_accumulation_steps * num_train_timesteps``);
4. the loss per sample and timestep is PPO's clipped surrogate on the importance ratio between
   the current policy and the sampling-time log-prob (lines 538-551)::

       A = clamp(advantage, -adv_clip_max, adv_clip_max),  r = exp(log pi_theta - log pi_old)
       L = max(-A * r, -A * clamp(r, 1 - clip_range, 1 + clip_range))

   with classifier-free guidance applied in training as in sampling (their ``train.cfg``: the
   same ``guidance_scale``).

KL to the frozen base (``kl_coef``; not in DDPO, Flow-GRPO's ``train.beta`` term,
github.com/yifan123/flow_grpo ``scripts/train_sd3.py`` lines 875-897): the two transitions share
their std, so the Gaussian KL per latent dim is ``(mu_theta - mu_ref)^2 / (2 sigma_k^2)``,
averaged over dims like the log-prob; mu_ref is the UNet with the LoRA adapter disabled (a frozen
copy for a full fine-tune). Flow-GRPO divides by its SDE's ``std_dev_t`` (the std before the
``sqrt(dt)`` factor); we divide by the DDIM step's own sigma_k, which makes it the exact KL.

Our choices, where the reference differs:

* the reference stops after the last inner update itself; here the engine makes the last
  optimizer update of the epoch (so its NaN guard, gradient clipping, EMA and checkpoints apply
  as for every method) and this class makes the earlier ones (:func:`apply_update`, the same
  steps); ``train.max_steps`` counts epochs;
* a reward that cannot score (NaN) gives its sample advantage 0 and stays out of the statistics;
* the global batch is put in a canonical order (micro-step, global item index, member) before
  the statistics, so the per-prompt buffers are the same whatever the number of processes;
* the timestep order of a sample is drawn from the sample's own seed, so it too does not
  depend on the process count;
* ``train_batch_size`` bounds the rows per UNet call in training (memory only);
* rewards go through ``trainer.scalar_reward`` (:mod:`vfeedback.reward_shaping`: ensembles, PAR,
  win rate within a prompt's images, the cost constraint) once per sampling batch.
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections import deque
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from ..engine import derive_seed
from ..errors import UserError
from ..models.loader import Conditioning
from ..sampling import _alpha, ddim_step, ddim_timesteps, initial_latents, sample, step_gap, trained_step_count, x0_clip

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------- the math
def ppo_clip_loss(logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, clip_range: float, adv_clip_max: float):
    """PPO's clipped surrogate per sample (ddpo-pytorch ``scripts/train.py`` lines 539-551).

    ``logp``: log pi_theta of the stored transitions (R,), with grad; ``old_logp``: their
    log-prob at sampling time (R,); ``adv``: advantages (R,). Returns ``(loss (R,), ratio (R,))``;
    minimising the mean raises the log-prob of positive-advantage samples while the ratio is
    inside ``[1 - clip_range, 1 + clip_range]`` and leaves it (zero gradient) outside.
    """
    a = adv.clamp(-adv_clip_max, adv_clip_max)
    ratio = torch.exp(logp - old_logp)
    unclipped = -a * ratio
    clipped = -a * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped), ratio


def gaussian_kl(mean: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, std^2 I) || N(mean_ref, std^2 I)) per latent dim, averaged over the non-batch
    dims: ``mean((mean - mean_ref)^2) / (2 std^2)``, shape (R,). ``std``: (R,) or a scalar."""
    d = ((mean.float() - mean_ref.float()) ** 2).mean(dim=tuple(range(1, mean.ndim)))
    return d / (2 * torch.as_tensor(std, dtype=torch.float32, device=d.device).reshape(-1) ** 2)  # pragma: no mutate: device placement (CPU-only tests)


class PerPromptStatTracker:
    """Per-prompt reward normalisation of ddpo-pytorch (``ddpo_pytorch/stat_tracking.py``): each
    prompt keeps its last ``buffer_size`` rewards across epochs; a reward's advantage is
    ``(r - mean) / (std + 1e-6)`` over its prompt's buffer (this batch's rewards included), or
    over the whole batch while that buffer holds fewer than ``min_count`` (population std, as
    ``np.std``). Ours: a non-finite reward gets advantage 0 and is not stored."""

    EPS = 1e-6  # the reference's

    def __init__(self, buffer_size: int, min_count: int):
        self.buffer_size, self.min_count = buffer_size, min_count
        self.stats: dict[str, deque] = {}

    def update(self, prompts: Sequence[str], rewards) -> np.ndarray:
        """``prompts`` (n,), ``rewards`` (n,) -> advantages (n,) float64. Prompts are visited in
        sorted order (the reference's ``np.unique``), their rewards in the given order."""
        p = np.asarray(list(prompts), dtype=object)  # pragma: no mutate: a str array compares with == as an object array does
        r = np.asarray(rewards, dtype=np.float64)
        ok = np.isfinite(r)
        adv = np.zeros_like(r)
        if not ok.any():
            return adv
        for prompt in sorted(set(p[ok].tolist())):
            m = (p == prompt) & ok
            buf = self.stats.setdefault(prompt, deque(maxlen=self.buffer_size))
            buf.extend(r[m].tolist())
            src = r[ok] if len(buf) < self.min_count else np.asarray(buf)
            adv[m] = (r[m] - src.mean()) / (src.std() + self.EPS)
        return adv

    def state_dict(self) -> dict:
        return {"buffer_size": self.buffer_size, "stats": {k: list(v) for k, v in self.stats.items()}}

    def load_state_dict(self, d: dict) -> None:
        self.stats = {k: deque(v, maxlen=self.buffer_size) for k, v in d.get("stats", {}).items()}


def batch_advantages(rewards, eps: float = 1e-8) -> np.ndarray:
    """Without per-prompt tracking: ``(r - mean) / (std + 1e-8)`` over the whole batch (ddpo-pytorch
    ``scripts/train.py`` line 435); non-finite rewards get 0 and are left out."""
    r = np.asarray(rewards, dtype=np.float64)
    ok = np.isfinite(r)
    adv = np.zeros_like(r)
    if ok.any():
        adv[ok] = (r[ok] - r[ok].mean()) / (r[ok].std() + eps)
    return adv


# --------------------------------------------------------------------------------- one transition
def policy_step(model, cond: Conditioning, x_t: torch.Tensor, t: torch.Tensor, x_prev: torch.Tensor, *, num_steps: int,
                guidance_scale: float, eta: float):
    """``log pi(x_prev | x_t, c)`` and the transition's mean and std under the weights the model
    currently runs (``model.denoiser`` when set, else ``model.unet``), with autograd.

    Row i is at its own timestep ``t[i]`` (R,) in one UNet call, as the reference batches the
    samples of a training minibatch whose timestep orders were shuffled independently
    (``sampling.predict_noise`` takes one timestep for the batch, hence this call).
    Returns ``(log_prob (R,), mean (R,C,h,w), std (R,))``.
    """
    cfg_on = guidance_scale > 1.0
    hs, added = cond.unet_inputs(cfg_on)
    dtype = model.unet.dtype
    if added is not None:
        added = {k: v.to(dtype) for k, v in added.items()}
    t = torch.as_tensor(t, device=x_t.device).long().reshape(-1)
    inp = torch.cat([x_t, x_t]) if cfg_on else x_t
    tt = torch.cat([t, t]) if cfg_on else t
    net = model.denoiser if model.denoiser is not None else model.unet
    out = net(inp.to(dtype), tt, encoder_hidden_states=hs.to(dtype), added_cond_kwargs=added).sample
    if cfg_on:
        un, te = out.chunk(2)
        out = un + guidance_scale * (te - un)
    out = out.float()
    gap = step_gap(model.scheduler.config.num_train_timesteps, num_steps)
    pred, clip = model.scheduler.config.prediction_type, x0_clip(model)
    lps, means, stds = [], [], []
    for i in range(x_t.shape[0]):  # the DDIM arithmetic per row (a scalar a_t each): cheap next to the UNet
        ti = t[i].cpu()
        _, lp, _, mean, std = ddim_step(out[i : i + 1], x_t[i : i + 1], _alpha(model, ti), _alpha(model, ti - gap), eta, pred,
                                        prev_sample=x_prev[i : i + 1], clip=clip)
        lps.append(lp)
        means.append(mean)
        stds.append(std.reshape(1))
    return torch.cat(lps), torch.cat(means), torch.cat(stds)


# --------------------------------------------------------------------------------- updates
def apply_update(trainer) -> tuple[bool, Optional[float]]:
    """One optimizer update from the gradients accumulated so far, the way the engine's loop
    makes one (``vfeedback/engine.py``, ``Trainer.fit``): text-encoder gradients all-reduced,
    gradient norm clipped (``train.max_grad_norm``), skipped when a gradient is not finite, LR
    schedule and EMA stepped, gradients cleared. Returns ``(applied, grad_norm)``."""
    cfg = trainer.cfg
    trainer._sync_outside_grads()
    gn = None
    if cfg.train.max_grad_norm:
        gn = trainer.acc.clip_grad_norm_(trainer.params, cfg.train.max_grad_norm)
    ok = all(bool(torch.isfinite(p.grad).all()) for p in trainer.params if p.grad is not None)
    if ok:
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
        if getattr(trainer, "ema", None) is not None:
            trainer.ema.step(trainer.params)
    trainer.optimizer.zero_grad(set_to_none=True)
    return ok, (float(gn) if gn is not None else None)


@dataclass
class Samples:
    """Trajectories of one sampling micro-step on this process (R rows)."""

    cond: Conditioning
    traj: torch.Tensor  # (R, T+1, C, h, w)
    log_probs: torch.Tensor  # (R, T) at sampling time
    rewards: torch.Tensor  # (R,) float32
    prompts: list[str]  # (R,)
    seeds: list[int]  # (R,) each row's own seed (its timestep orders derive from it)
    keys: list[tuple[int, int, int]]  # (R,) canonical order: (micro-step, global item index, member)

    @staticmethod
    def cat(parts: Sequence["Samples"]) -> "Samples":
        return Samples(Conditioning.cat([p.cond for p in parts]), torch.cat([p.traj for p in parts]),
                       torch.cat([p.log_probs for p in parts]), torch.cat([p.rewards for p in parts]),
                       [x for p in parts for x in p.prompts], [x for p in parts for x in p.seeds],
                       [x for p in parts for x in p.keys])


# --------------------------------------------------------------------------------- the method
class PolicyGradient:
    """The online policy-gradient loop shared by DDPO and GRPO (module docstring). Subclasses
    set ``name`` (the config section) and ``group_size``, and define :meth:`advantages`."""

    name = "ddpo"
    needs_differentiable_reward = False
    #: reward guards (vfeedback/reward_shaping.py): the epoch's rewards come from
    #: ``trainer.scalar_reward`` with groups = the prompt's index in the micro-batch, so PAR (the
    #: base model re-renders the same seeds), win rate within a prompt's images, ensembles and
    #: the cost constraint all apply
    reward_shaping: tuple = ("par", "win_rate")
    supports_cost = True
    #: train_step makes its own backward passes (one timestep column at a time) and the epoch's
    #: earlier optimizer updates; the engine makes the last update
    does_own_backward = True

    @classmethod
    def check_config(cls, cfg) -> None:
        """The checks that need no model (run by `validate` and before `train` creates anything)."""
        if cfg.model.finetune == "lora" and cfg.model.lora.text_encoder:
            raise UserError(f"model.lora.text_encoder: {cls.name} trains the UNet only (prompt embeddings are computed once at "
                            "sampling time and the KL base is the UNet with the adapter off); set model.lora.text_encoder: false")

    def __init__(self, cfg, trainer):
        self.cfg, self.trainer = cfg, trainer
        self.sec = getattr(cfg, self.name)
        self.check_config(cfg)
        self.ref_unet = None
        if cfg.model.finetune == "full" and (self.sec.kl_coef > 0 or cfg.reward.shaping == "par"):
            self.ref_unet = copy.deepcopy(trainer.model.unet).requires_grad_(False).eval()
        self.pending: list[Samples] = []
        self._score_metrics: list[dict] = []

    # D3PO's switch between the trained weights and the frozen base (LoRA off / frozen copy)
    from .d3po import D3PO as _D3PO

    policy = _D3PO.policy
    del _D3PO

    @property
    def group_size(self) -> int:
        return 1

    def shared_latent(self) -> bool:
        return False

    # ------------------------------------------------------------------ rewards
    def score(self, images: torch.Tensor, prompts: list[str], groups: torch.Tensor, reference=None) -> tuple[torch.Tensor, dict]:
        """Scalar rewards (R,) of this process's images, and metrics: through the trainer's
        :class:`~vfeedback.reward_shaping.ScalarReward` (ensemble, shaping and cost over the global
        batch; ``groups`` local ids, ``reference`` renders the base model's images), or the bare
        reward where no trainer set one up (tests, notebooks)."""
        sr = getattr(self.trainer, "scalar_reward", None)
        if sr is None:
            with torch.no_grad():
                return self.trainer.reward(images, prompts).float(), {}
        return sr(images, prompts, groups=groups, reference=reference if sr.needs_reference else None)

    # ------------------------------------------------------------------ sampling
    def sample_micro(self, prompts: list[str], generators, micro: int) -> Samples:
        """``group_size`` trajectories per prompt with the current weights (no grad), scored."""
        tr, cfg, s = self.trainer, self.cfg, self.cfg.sampling
        m, G, B = tr.model, self.group_size, len(prompts)
        with torch.no_grad():
            base = m.encode_prompt(list(prompts), [cfg.prompts.negative] * B, cfg=s.guidance_scale > 1)
        cond = base.take([j for j in range(B) for _ in range(G)])
        lat_gens, noise_gens, seeds, keys = [], [], [], []
        for j, g in enumerate(generators):
            s0 = g.initial_seed()
            for k in range(G):
                lat_gens.append(torch.Generator().manual_seed(derive_seed(s0, "pg-latent") if self.shared_latent() else derive_seed(s0, "pg-latent", k)))
                noise_gens.append(torch.Generator().manual_seed(derive_seed(s0, "pg-noise", k)))
                seeds.append(derive_seed(s0, "pg-row", k))
                keys.append((micro, tr.acc.process_index * B + j, k))
        latents = torch.cat([initial_latents(m, 1, g) for g in lat_gens])
        with torch.no_grad(), self.policy("current"), tr.acc.autocast():
            out = sample(m, cond, num_steps=s.steps, guidance_scale=s.guidance_scale, eta=s.eta, latents=latents,
                         generator=noise_gens, return_trajectory=True, log_probs=True)
        rows = [p for p in prompts for _ in range(G)]
        uniq = {p: n for n, p in enumerate(dict.fromkeys(prompts))}
        groups = torch.tensor([uniq[p] for p in rows], dtype=torch.long)  # a prompt's images: one group

        def reference() -> torch.Tensor:
            """PAR's reference (vfeedback/reward_shaping.py): ONE image of the frozen base model per
            prompt draw, from its own x_T and DDIM noise (seeds derived from the draw's generator,
            tagged "par-ref"), shared by the draw's G samples: rows j*G .. j*G+G-1 get image j."""
            rl = [torch.Generator().manual_seed(derive_seed(g.initial_seed(), "par-ref-latent")) for g in generators]
            rn = [torch.Generator().manual_seed(derive_seed(g.initial_seed(), "par-ref-noise")) for g in generators]
            x_T = torch.cat([initial_latents(m, 1, g) for g in rl])
            with torch.no_grad(), self.policy("ref"), tr.acc.autocast():
                img = sample(m, base, num_steps=s.steps, guidance_scale=s.guidance_scale, eta=s.eta, latents=x_T,
                             generator=rn).images.float()
            return img.repeat_interleave(G, dim=0)

        r, mets = self.score(out.images.float(), rows, groups, reference=reference)
        self._score_metrics.append(mets)
        return Samples(cond, out.trajectory, out.log_probs.float(), r.detach().float().cpu(), rows, seeds, keys)

    # ------------------------------------------------------------------ advantages
    def advantages(self, prompts: list[str], rewards: np.ndarray) -> np.ndarray:
        """Advantages of the global batch (canonical order), float64 (n,)."""
        sec = self.sec
        if sec.stat_tracking:
            return self.tracker.update(prompts, rewards)
        return batch_advantages(rewards)

    def global_advantages(self, smp: Samples) -> tuple[torch.Tensor, dict]:
        """Gather rewards, prompts and keys of every process, compute the advantages on the
        global batch in canonical order, and return this process's (R,) with metrics."""
        acc = self.trainer.acc
        r = smp.rewards.double()
        rows = list(zip(smp.keys, smp.prompts, r.tolist()))
        if acc.num_processes > 1:
            from accelerate.utils import gather_object

            rows = gather_object(rows)
        order = sorted(range(len(rows)), key=lambda i: rows[i][0])
        keys = [rows[i][0] for i in order]
        prompts = [rows[i][1] for i in order]
        rewards = np.asarray([rows[i][2] for i in order], dtype=np.float64)
        adv = self.advantages(prompts, rewards)
        pos = {k: n for n, k in enumerate(keys)}
        mine = torch.tensor([adv[pos[k]] for k in smp.keys], dtype=torch.float32)
        fin = rewards[np.isfinite(rewards)]
        mets = {"reward_mean": float(fin.mean()) if fin.size else float("nan"),
                "reward_std": float(fin.std()) if fin.size else float("nan"),
                f"{self.name}/advantage_abs_mean": float(np.abs(adv).mean()),
                f"{self.name}/unique_prompts": float(len(set(prompts)))}
        return mine, mets

    # ------------------------------------------------------------------ one engine micro-step
    def train_step(self, prompts, generators, step_gen: torch.Generator):
        A = self.cfg.train.gradient_accumulation_steps
        self.pending.append(self.sample_micro(list(prompts), generators, len(self.pending)))
        if len(self.pending) < A:  # the epoch's sampling is not complete yet: nothing to learn
            return torch.zeros(()), {}
        smp, self.pending = Samples.cat(self.pending), []
        adv, mets = self.global_advantages(smp)
        # the reward guards' metrics (reward_raw_mean, lambda, ...), averaged over the sampling batches
        for k in sorted({k for d in self._score_metrics for k in d}):
            v = [float(d[k]) for d in self._score_metrics if k in d and math.isfinite(float(d[k]))]
            if v:
                mets[k] = sum(v) / len(v)
        self._score_metrics = []
        if "reward_raw_mean" in mets:  # shaped / penalised: the trained reward under its own name, the raw one as reward_mean
            mets[f"{self.name}/trained_reward_mean"] = mets["reward_mean"]
            mets["reward_mean"] = mets["reward_raw_mean"]
        loss = self.learn(smp, adv, step_gen, mets)
        return loss, mets

    # ------------------------------------------------------------------ training phase
    def learn(self, smp: Samples, adv: torch.Tensor, step_gen: torch.Generator, mets: dict) -> torch.Tensor:
        """``inner_epochs`` x ``updates_per_epoch`` PPO updates on ``smp``; the last update's
        gradients are left for the engine. Returns the mean loss of the updates (detached; NaN
        when the last update's loss is not finite: the engine then skips it)."""
        tr, sec, s = self.trainer, self.sec, self.cfg.sampling
        m, acc = tr.model, tr.acc
        R, T = smp.traj.shape[0], smp.traj.shape[1] - 1
        K = trained_step_count(T, sec.timestep_fraction)
        U = sec.updates_per_epoch
        if R % U:
            raise UserError(f"{self.name}.updates_per_epoch ({U}) must divide the {R} samples per process per epoch")
        ts = ddim_timesteps(m, s.steps).to(m.device)
        x = smp.traj.to(m.device)
        old = smp.log_probs.to(m.device)
        adv = adv.to(m.device)
        mb = sec.train_batch_size or (R // U)
        stats = {"loss": [], "policy_loss": [], "kl": [], "approx_kl": [], "clipfrac": [], "ratio": []}
        skipped, n_updates, last_loss = 0, 0, float("nan")
        for e in range(sec.inner_epochs):
            perm = torch.randperm(R, generator=step_gen).tolist()  # the reference's shuffle of the samples
            # each sample's own timestep order (the reference: torch.randperm per sample)
            cols = {r: torch.randperm(T, generator=torch.Generator().manual_seed(derive_seed(smp.seeds[r], "pg-timesteps", e)))[:K].tolist()
                    for r in range(R)}
            for u in range(U):
                rows = perm[u * (R // U) : (u + 1) * (R // U)]
                last = e == sec.inner_epochs - 1 and u == U - 1
                upd_loss = self._update_grads(rows, cols, x, old, adv, ts, smp.cond, K, mb, stats, last)
                n_updates += 1
                if last:
                    last_loss = upd_loss
                    break
                # the earlier updates of the epoch are ours (the engine makes the last)
                fin = torch.tensor([float(math.isfinite(upd_loss))], device=acc.device)
                if acc.num_processes > 1:
                    fin = acc.gather(fin)
                if bool(fin.min() > 0):
                    ok, _ = apply_update(tr)
                    skipped += int(not ok)
                else:
                    log.warning("%s: non-finite loss in an inner update; that update is skipped", self.name)
                    tr.optimizer.zero_grad(set_to_none=True)
                    skipped += 1
        mean = lambda v: float(sum(v) / len(v)) if v else float("nan")
        mets.update({f"{self.name}/{k}": mean(v) for k, v in stats.items() if v})
        mets.update({f"{self.name}/updates": float(n_updates), f"{self.name}/skipped_updates": float(skipped),
                     f"{self.name}/timesteps": float(K)})
        if not math.isfinite(last_loss):
            return torch.tensor(float("nan"))
        return torch.tensor(mean(stats["loss"]))

    def _update_grads(self, rows, cols, x, old, adv, ts, cond, K, mb, stats, last_update) -> float:
        """Accumulate the gradient of one update: the mean over its rows and their K trained
        timesteps of the PPO loss (+ kl_coef * KL), one timestep column and ``mb`` rows at a time.
        DDP averages over processes (each has the same number of rows). Returns the loss."""
        tr, sec, s = self.trainer, self.sec, self.cfg.sampling
        m, acc = tr.model, tr.acc
        scale = 1.0 / (len(rows) * K)
        chunks = [(j, rows[i : i + mb]) for j in range(K) for i in range(0, len(rows), mb)]
        total = 0.0
        for n, (j, rr) in enumerate(chunks):
            k = torch.tensor([cols[r][j] for r in rr], device=x.device)  # step index of each row
            ridx = torch.tensor(rr, device=x.device)
            c = cond.take(rr)
            x_t, x_p, t = x[ridx, k], x[ridx, k + 1], ts[k]
            with acc.autocast():
                logp, mean_, std = policy_step(m, c, x_t, t, x_p, num_steps=s.steps, guidance_scale=s.guidance_scale, eta=s.eta)
            pl, ratio = ppo_clip_loss(logp, old[ridx, k], adv[ridx], sec.clip_range, sec.adv_clip_max)
            loss = pl
            if sec.kl_coef > 0:
                with torch.no_grad(), self.policy("ref"), acc.autocast():
                    _, mean_ref, _ = policy_step(m, c, x_t, t, x_p, num_steps=s.steps, guidance_scale=s.guidance_scale, eta=s.eta)
                kl = gaussian_kl(mean_, mean_ref, std)
                loss = pl + sec.kl_coef * kl
                stats["kl"] += kl.detach().tolist()
            chunk = loss.sum() * scale
            if not torch.isfinite(chunk.detach()):
                log.warning("%s: non-finite loss; the update will be skipped", self.name)
                return float("nan")
            final = n == len(chunks) - 1
            ctx = contextlib.nullcontext() if (final or getattr(acc, "no_sync", None) is None) else acc.no_sync(m.denoiser)
            with ctx, torch.autocast(device_type=x.device.type, enabled=False):
                acc.backward(chunk)
            total += float(chunk.detach())
            with torch.no_grad():
                d = logp.detach() - old[ridx, k]
                stats["policy_loss"] += pl.detach().tolist()
                stats["approx_kl"] += (0.5 * d**2).tolist()  # the reference's debugging estimate
                stats["clipfrac"] += ((ratio.detach() - 1).abs() > sec.clip_range).float().tolist()
                stats["ratio"] += ratio.detach().tolist()
        stats["loss"].append(total)
        return total


class DDPO(PolicyGradient):
    """DDPO with per-prompt advantage normalisation (module docstring)."""

    name = "ddpo"

    def __init__(self, cfg, trainer):
        super().__init__(cfg, trainer)
        self.tracker = PerPromptStatTracker(self.sec.buffer_size, self.sec.min_count)

    def checkpoint_state(self) -> tuple[dict, dict]:
        """The per-prompt reward buffers, kept in checkpoints by the engine (no tensors, JSON meta)."""
        return {}, {"tracker": self.tracker.state_dict()}

    def load_checkpoint_state(self, tensors: dict, meta: dict) -> None:
        self.tracker.load_state_dict(meta.get("tracker", {}))
