"""D3PO: Direct Preference for Denoising Diffusion Policy Optimization.

Yang et al., "Using Human Feedback to Fine-tune Diffusion Models without Any Reward Model",
CVPR 2024; reference code github.com/yk7333/d3po (``scripts/rm/train_d3po.py`` for preferences
from a reward, ``scripts/train.py`` for stored human-ranked groups, ``config/base.py``).

Denoising is a T-step MDP whose policy at step k is the DDIM transition (eta = 1)
``pi(x_{k-1} | x_k, c) = N(mu_theta(x_k, k, c), sigma_k^2 I)``. Images of one prompt are drawn
from the *same* initial latent x_T (the reference passes ``latents=latents1[:, 0]`` to its
second pipeline call), a judge says which is better, and every denoising step of the pair is
treated as a preference between two actions; DPO's loss is applied per step (the paper's
per-step objective, Sec. 4):

    L = -log sigmoid( beta * log r(a^w_k | s^w_k) - beta * log r(a^l_k | s^l_k) ),
    r = pi_theta / pi_ref,

with pi_ref the frozen pre-trained model. As in the reference:

* log-probs are the Gaussian log-density averaged over latent dims (``ddim_step_with_logprob``
  of ddpo-pytorch; our sampler does the same), recomputed for both pi_theta (with grad) and
  pi_ref (no grad) on the stored transition; the stored sampling log-prob is not used;
* the ratio is clamped, ``torch.clamp(exp(logp - logp_ref), 1 - eps, 1 + eps)`` then ``log``
  (``train.eps`` 0.1 in ``config/base.py``; ``scripts/train.py`` hard-codes [0.8, 1.2]). We clamp
  the log-ratio to ``[log(1 - eps), log(1 + eps)]``: the same value and the same gradient
  (zero outside the range, one inside) without ``exp`` overflowing to inf (whose backward is
  0 * inf = NaN);
* the timesteps of a trajectory are shuffled (``torch.randperm(num_timesteps)`` per sample, the
  same permutation for both members: the pair shares it), and the first
  ``int(num_steps * timestep_fraction)`` are trained;
* gradients are accumulated over all trained timesteps of a batch and the optimizer steps once
  (the reference sets accelerate's ``gradient_accumulation_steps`` to
  ``train.gradient_accumulation_steps * num_train_timesteps``, which also divides each
  timestep's loss by that count: the gradient is the mean over timesteps);
* a tie (``compare`` gives ``[0, 0]`` in the reference: a constant loss, zero gradient) is
  skipped; of a ranked group every pair with different ranks is used.

Memory: one timestep at a time. For each distinct timestep we run the policy UNet with grad on
the rows that train it and call ``accelerator.backward`` at once, so at most one timestep's
activations live at a time (the reference's per-timestep backward). The engine therefore must
not backward again: this class sets ``does_own_backward`` and ``train_step`` returns the
detached total loss, which the engine still checks for NaN (a non-finite chunk stops the step
at once and the engine zeroes the accumulated gradients and skips the update).
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..engine import derive_seed
from ..errors import UserError
from ..models.loader import Conditioning
from ..sampling import initial_latents, sample, trained_step_count, transition_log_prob
from ..feedback.preferences import PreferenceGroup, PreferenceItem, load_preferences, write_preferences

log = logging.getLogger(__name__)

OFFLINE_SET_FILE = "d3po_preferences.jsonl"


# --------------------------------------------------------------------------------- the loss
def d3po_loss(logp_w: torch.Tensor, ref_w: torch.Tensor, logp_l: torch.Tensor, ref_l: torch.Tensor,
              beta: float, clip: Optional[float]):
    """Per-pair D3PO loss at one denoising step (module docstring).

    ``logp_*``: log pi_theta of the preferred (w) / rejected (l) transition, shape (P,), with
    grad; ``ref_*``: log pi_ref of the same transitions. ``clip``: eps of the ratio clamp
    ``[1 - eps, 1 + eps]`` (None: none). Returns ``(loss (P,), clipped log-ratio w, l)``.
    """
    lr_w, lr_l = logp_w - ref_w, logp_l - ref_l
    if clip is not None:
        lo, hi = math.log1p(-clip), math.log1p(clip)
        lr_w, lr_l = lr_w.clamp(lo, hi), lr_l.clamp(lo, hi)
    return -F.logsigmoid(beta * (lr_w - lr_l)), lr_w, lr_l


def loss_scale(num_processes: int, timesteps: int, pair_total: int) -> float:
    """The factor on each timestep's summed pair losses: ``num_processes / (timesteps * pair_total)``,
    so that the accumulated gradient is the mean over the global batch's ``pair_total`` pairs and
    the ``timesteps`` trained steps once DDP has averaged it over ``num_processes`` (module docstring)."""
    return num_processes / (timesteps * pair_total)


# --------------------------------------------------------------------------------- helpers
# Conditioning.take / .cat carry every field, the IP-Adapter reference image embeddings
# included, so the trajectories and both log-probs (policy and frozen reference) see the same face
def _take(cond: Conditioning, idx) -> Conditioning:
    return cond.take(idx)


def _cat(conds: Sequence[Conditioning]) -> Conditioning:
    return Conditioning.cat(conds)


def group_seeds(generator: torch.Generator, group_size: int) -> tuple[int, list[int]]:
    """The shared latent seed and the per-member noise seeds of one group, from its item generator."""
    base = generator.initial_seed()
    return derive_seed(base, "d3po-latent"), [derive_seed(base, "d3po-noise", k) for k in range(group_size)]


def sample_items(model, cond: Conditioning, items: Sequence[PreferenceItem], *, num_steps: int, guidance_scale: float,
                 eta: float, decode: bool = True):
    """Sample one trajectory per seed item (row i of ``cond``): x_T from ``latent_seed``, the
    per-step DDIM noise from ``noise_seed``. Items sharing a latent seed share x_T (a D3PO
    group). This is how a stored ``{"latent_seed", "noise_seed"}`` record is rebuilt, so an app
    that writes preference files should make its images with it. No grad; the weights used
    are whatever ``model`` holds (see :meth:`D3PO.policy`)."""
    gens = [torch.Generator().manual_seed(it.latent_seed) for it in items]
    latents = torch.cat([initial_latents(model, 1, g) for g in gens])
    noise = [torch.Generator().manual_seed(it.noise_seed) for it in items]
    with torch.no_grad():
        return sample(model, cond, num_steps=num_steps, guidance_scale=guidance_scale, eta=eta, latents=latents,
                      generator=noise, return_trajectory=True, decode=decode)


@dataclass
class _Batch:
    """Rows (one trajectory each) of a micro-batch and the preference pairs between them."""

    cond: Conditioning
    traj: torch.Tensor  # (R, T+1, C, h, w)
    group: list[int]  # group index of each row
    pairs: list[tuple[int, int]]  # (preferred row, rejected row)


class D3PO:
    needs_differentiable_reward = False
    #: reward guards (vfeedback/reward_shaping.py): a cost constraint labels pairs by the penalised
    #: reward (online, preference: reward); shaping by par / win rate is not offered: within a group
    #: of one prompt the win rate orders pairs exactly as the reward does, and PAR needs base-model
    #: renders of every member
    reward_shaping: tuple = ()
    supports_cost = True
    #: train_step backpropagates itself, one timestep at a time (see the module docstring)
    does_own_backward = True

    @staticmethod
    def check_config(cfg) -> None:
        """The checks that need no model, run by `validate` and by `train` before anything is
        created (vfeedback/checks.py)."""
        d = cfg.d3po
        if cfg.model.finetune == "lora" and cfg.model.lora.text_encoder:
            raise UserError("model.lora.text_encoder: d3po trains the UNet only (its reference policy is the UNet with the "
                            "LoRA adapter disabled); set model.lora.text_encoder: false")
        if cfg.cost is not None and (d.mode != "online" or d.preference != "reward"):
            raise UserError(f"cost: d3po takes a cost constraint with d3po.mode: online and d3po.preference: reward (the pairs are "
                            f"labelled by reward - lambda * (cost - budget) as lambda adapts); got mode {d.mode}, preference {d.preference}")
        if d.preference == "pareto" and any(r.weight <= 0 for r in cfg.reward.rewards):
            raise UserError("reward: with d3po.preference: pareto every reward is an objective to maximise; "
                            f"weights must be > 0, got {[r.weight for r in cfg.reward.rewards]}")
        if d.preference == "heron":
            from ..feedback.heron import check_heron_factors

            check_heron_factors(cfg, "d3po.preference")
        if d.preference == "file" and Path(d.file).exists():  # a relative path from the config's folder: checked at set-up
            import types

            D3PO._check_records(types.SimpleNamespace(cfg=cfg), load_preferences(Path(d.file), "d3po.file"))

    def __init__(self, cfg, trainer):
        self.cfg = cfg
        self.trainer = trainer
        d = cfg.d3po
        self.check_config(cfg)  # Trainer.setup ran it already; other callers (the rank app) may not have
        # the reference policy: the pre-trained UNet. With LoRA it is the same module with the
        # adapter switched off (no copy); a full fine-tune needs a frozen copy.
        self.ref_unet = None
        if cfg.model.finetune == "full":
            self.ref_unet = copy.deepcopy(trainer.model.unet).requires_grad_(False).eval()
        self.oracle, self.judge_name = self._build_oracle()
        self.groups: Optional[list[PreferenceGroup]] = None
        if d.preference == "file":
            self.groups = load_preferences(self._resolve(d.file), "d3po.file")
            self._check_records(self.groups)
            n = sum(len(g.pairs) for g in self.groups)
            log.info("d3po: %d records, %d preference pairs from %s", len(self.groups), n, d.file)
        self.win: Optional[dict] = None

    # ------------------------------------------------------------------ set-up
    def _resolve(self, path: str) -> Path:
        from ..config import resolve_data_path

        return resolve_data_path(path, getattr(self.trainer, "config_source", None))

    def _build_oracle(self):
        """The preference oracle (``compare(a, b, prompts) -> 0 | 1 | None``) used for labels
        (online / self-labelled offline) and for the held-out win rate."""
        from rewards.base import WeightedSum

        from ..feedback.oracles import ParetoPreferenceOracle, RewardPreferenceOracle

        d, reward = self.cfg.d3po, self.trainer.reward
        if d.preference == "heron":
            from ..feedback.heron import build_heron_oracle

            oracle = build_heron_oracle(self.cfg, "d3po.preference", device=getattr(reward, "device", None))
            return oracle, "heron(" + " > ".join(oracle.names) + ")"
        if d.preference == "pareto":
            if isinstance(reward, WeightedSum):
                if any(w <= 0 for w in reward.weights):
                    raise UserError("reward: with d3po.preference: pareto every reward is an objective to maximise; "
                                    f"weights must be > 0, got {reward.weights}")
                objs, names = list(reward.rewards), reward.names
            else:
                objs, names = [reward], [reward.name]
            return ParetoPreferenceOracle(objs, tol=d.tie_tol), "pareto(" + ",".join(names) + ")"
        name = f"reward:{reward.name}"
        if d.preference == "file":
            name += " (proxy judge: the training labels came from d3po.file)"
        return RewardPreferenceOracle(reward, tol=d.tie_tol), name

    def _check_records(self, groups: list[PreferenceGroup]) -> None:
        s = self.cfg.sampling
        want = {"steps": s.steps, "guidance_scale": s.guidance_scale, "eta": s.eta}
        for g in groups:
            for k, v in (g.sampling or {}).items():
                if not math.isclose(float(v), float(want[k]), rel_tol=1e-6, abs_tol=1e-9):
                    raise UserError(f"d3po.file: {g.source}: made with sampling.{k}={v} but this run has sampling.{k}={want[k]}; "
                                    f"the trajectories are rebuilt and scored with the run's sampler, so they must match")

    # ------------------------------------------------------------------ which weights
    @contextlib.contextmanager
    def policy(self, which: str):
        """Run UNet calls on ``which``: ``"current"`` (the trained weights, unwrapped: no DDP
        collective) or ``"ref"`` (the pre-trained weights). Training calls use the engine's
        wrapped ``model.denoiser`` outside this context."""
        m = self.trainer.model
        den = m.denoiser
        lora_off = False
        try:
            if which == "ref" and self.ref_unet is not None:
                m.denoiser = self.ref_unet
            else:
                m.denoiser = None
                if which == "ref":
                    m.unet.disable_adapters()  # diffusers/peft: LoRA layers return the base output
                    lora_off = True
            yield
        finally:
            if lora_off:
                m.unet.enable_adapters()  # also restores requires_grad on the LoRA weights
            m.denoiser = den

    def _encode(self, prompts: Sequence[str], negatives: Sequence[Optional[str]]) -> Conditioning:
        m, cfg = self.trainer.model, self.cfg
        neg = [cfg.prompts.negative if n is None else n for n in negatives]
        with torch.no_grad():
            return m.encode_prompt(list(prompts), neg, cfg=cfg.sampling.guidance_scale > 1)

    def _sample(self, cond, items, decode=True):
        s = self.cfg.sampling
        return sample_items(self.trainer.model, cond, items, num_steps=s.steps, guidance_scale=s.guidance_scale, eta=s.eta, decode=decode)

    def _label(self, images: torch.Tensor, prompt: str, scores: list) -> tuple[list[tuple[int, int]], int]:
        """All pairs of a group that the oracle can tell apart, as (better, worse); ties counted."""
        pairs, ties = [], 0
        n = images.shape[0]
        for i in range(n):
            for j in range(i + 1, n):
                c = self.oracle.compare(images[i], images[j], prompt)
                last = getattr(self.oracle, "last_scores", None)
                if last is not None:
                    scores.extend([last[0], last[1]] if not isinstance(last, torch.Tensor) else [last[0].tolist(), last[1].tolist()])
                if c == 0:
                    pairs.append((i, j))
                elif c == 1:
                    pairs.append((j, i))
                else:
                    ties += 1
        return pairs, ties

    # ------------------------------------------------------------------ one micro-batch
    def train_step(self, prompts, generators, step_gen: torch.Generator):
        d = self.cfg.d3po
        mets: dict[str, float] = {}
        if d.mode == "online":
            batch = self._online_batch(prompts, generators, mets)
        else:
            batch = self._offline_batch(generators, mets)
        acc = self.trainer.acc
        P = len(batch.pairs)
        # the pair count over all processes: each process's loss is scaled by it so that DDP's
        # gradient average equals the 1-process mean over every pair of the global batch
        P_all = P
        if acc.num_processes > 1:
            P_all = int(acc.reduce(torch.tensor([float(P)], device=acc.device), reduction="sum").item())
        if P_all == 0:  # every process agrees: nothing to learn from this batch
            mets.update({"d3po/pairs": 0.0})
            return torch.zeros(()), mets
        if P == 0:
            # other processes will all-reduce gradients: take part with a zero-weight backward
            self._participate(batch)
            mets.update({"d3po/pairs": 0.0})
            return torch.zeros(()), mets
        loss = self._train_on(batch, generators, mets, pair_total=P_all)
        return loss, mets

    def _participate(self, b) -> None:
        s, m = self.cfg.sampling, self.trainer.model
        x = b.traj.to(m.device)
        t = _timesteps(m, s.steps)[0]
        with self.trainer.acc.autocast():
            lp = transition_log_prob(m, _take(b.cond, [0]), x[[0], 0], t, x[[0], 1], num_steps=s.steps,
                                     guidance_scale=s.guidance_scale, eta=s.eta)
        self.trainer.acc.backward(lp.float().sum() * 0.0)

    def _online_batch(self, prompts, generators, mets) -> _Batch:
        """Sample a group of ``group_size`` images per prompt from one shared x_T with the
        current policy, and label every pair of each group with the oracle."""
        G = self.cfg.d3po.group_size
        items, conds = [], []
        base_cond = self._encode(prompts, [None] * len(prompts))
        for j, g in enumerate(generators):
            latent_seed, noise = group_seeds(g, G)
            items += [PreferenceItem(latent_seed=latent_seed, noise_seed=n) for n in noise]
            conds.append(_take(base_cond, [j] * G))
        cond = _cat(conds)
        with self.policy("current"), self.trainer.acc.autocast():
            out = self._sample(cond, items)
        images = out.images.float()
        pairs, ties, scores = [], 0, []
        sr = getattr(self.trainer, "scalar_reward", None)
        if sr is not None and sr.cost is not None:
            # the Lagrangian reward over the global batch, then every pair of a group compared on it
            from ..feedback.oracles import _compare_scalar

            groups = torch.arange(len(prompts)).repeat_interleave(G)
            final, smets = sr(images, [p for p in prompts for _ in range(G)], groups=groups)
            mets.update(smets)
            mets["reward_mean"] = smets["reward_raw_mean"]
            v = final.tolist()
            for j in range(len(prompts)):
                for a in range(G):
                    for b in range(a + 1, G):
                        c = _compare_scalar(v[j * G + a], v[j * G + b], self.cfg.d3po.tie_tol)
                        if c is None:
                            ties += 1
                        else:
                            pairs.append((j * G + a, j * G + b) if c == 0 else (j * G + b, j * G + a))
        else:
            for j, p in enumerate(prompts):
                gp, gt = self._label(images[j * G:(j + 1) * G], p, scores)
                pairs += [(j * G + w, j * G + l) for w, l in gp]
                ties += gt
            self._score_metrics(scores, mets)
        mets["d3po/ties"] = float(ties)
        return _Batch(cond, out.trajectory, [r // G for r in range(len(items))], pairs)

    def _score_metrics(self, scores: list, mets: dict) -> None:
        if not scores:
            return
        t = torch.tensor(scores, dtype=torch.float64)
        if t.ndim == 1:
            f = t[torch.isfinite(t)]
            if f.numel():
                mets["reward_mean"] = f.mean().item()
        else:
            names = getattr(self.oracle, "names", None) or getattr(self.trainer.reward, "names", None) or [self.trainer.reward.name]
            for k in range(t.shape[1]):
                f = t[:, k][torch.isfinite(t[:, k])]
                if f.numel():
                    mets[f"reward/{names[k] if k < len(names) else k}"] = f.mean().item()

    def _ensure_offline_set(self) -> None:
        """Offline with an oracle: sample ``offline_groups`` groups from the base model once,
        label them, keep them as seed records (and write them to the run folder in the
        preference-file format)."""
        if self.groups is not None:
            return
        cfg, d, tr = self.cfg, self.cfg.d3po, self.trainer
        G, groups, scores = d.group_size, [], []
        prompts = tr.train_prompts
        order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(derive_seed(cfg.seed, "d3po-offline"))).tolist()
        bs = max(1, cfg.train.batch_size)
        for start in range(0, d.offline_groups, bs):
            idx = list(range(start, min(start + bs, d.offline_groups)))
            ps = [prompts[order[n % len(order)]] for n in idx]
            gens = [torch.Generator().manual_seed(derive_seed(cfg.seed, "d3po-offline", n)) for n in idx]
            items = []
            for g in gens:
                ls, noise = group_seeds(g, G)
                items += [PreferenceItem(latent_seed=ls, noise_seed=s) for s in noise]
            cond = _take(self._encode(ps, [None] * len(ps)), [j for j in range(len(ps)) for _ in range(G)])
            with self.policy("ref"), tr.acc.autocast():
                out = self._sample(cond, items)
            for j, p in enumerate(ps):
                pairs, ties = self._label(out.images[j * G:(j + 1) * G].float(), p, scores)
                groups.append(PreferenceGroup(p, items[j * G:(j + 1) * G], pairs, ties=ties,
                                              sampling={"steps": cfg.sampling.steps, "guidance_scale": cfg.sampling.guidance_scale, "eta": cfg.sampling.eta},
                                              source=f"offline group {idx[j]}"))
        self.groups = groups
        if not any(g.pairs for g in groups):
            raise UserError(f"d3po: the oracle ({self.judge_name}) called every one of the {len(groups)} offline groups a tie; "
                            "raise d3po.group_size or d3po.offline_groups, or lower d3po.tie_tol")
        if tr.acc.is_main_process:
            write_preferences(tr.run.root / OFFLINE_SET_FILE, groups)
        log.info("d3po: labelled %d offline groups (%d pairs) with %s", len(groups), sum(len(g.pairs) for g in groups), self.judge_name)

    def _offline_batch(self, generators, mets) -> _Batch:
        """One stored group per batch item (drawn with replacement from the item's seed, so the
        choice is the same after a resume and on any number of processes); rebuild the
        trajectories of the items that take part in a pair."""
        self._ensure_offline_set()
        usable = [g for g in self.groups if g.pairs]
        chosen = [usable[int(torch.randint(len(usable), (1,), generator=torch.Generator().manual_seed(derive_seed(g.initial_seed(), "d3po-record"))))]
                  for g in generators]
        prompts, negs, rows_items, rows_group, pairs, owners = [], [], [], [], [], []
        for gi, grp in enumerate(chosen):
            used = sorted({k for pr in grp.pairs for k in pr})
            pos = {k: len(rows_items) + n for n, k in enumerate(used)}
            rows_items += [(grp, grp.items[k]) for k in used]
            rows_group += [gi] * len(used)
            pairs += [(pos[w], pos[l]) for w, l in grp.pairs]
            prompts.append(grp.prompt)
            negs.append(grp.negative_prompt)
        base_cond = self._encode(prompts, negs)
        cond = _take(base_cond, rows_group)
        traj: list[Optional[torch.Tensor]] = [None] * len(rows_items)
        seed_rows = [r for r, (_, it) in enumerate(rows_items) if it.trajectory is None]
        if seed_rows:
            # the labelled images were made by the base model: rebuild with the adapter off
            with self.policy("ref"), self.trainer.acc.autocast():
                out = self._sample(_take(cond, seed_rows), [rows_items[r][1] for r in seed_rows], decode=False)
            for n, r in enumerate(seed_rows):
                traj[r] = out.trajectory[n]
        for r, (grp, it) in enumerate(rows_items):
            if it.trajectory is not None:
                traj[r] = self._load_trajectory(grp, it)
        mets["d3po/ties"] = float(sum(g.ties for g in chosen))
        return _Batch(cond, torch.stack(traj), rows_group, pairs)

    def _load_trajectory(self, grp: PreferenceGroup, it: PreferenceItem) -> torch.Tensor:
        from safetensors import safe_open

        m, steps = self.trainer.model, self.cfg.sampling.steps
        with safe_open(str(grp.trajectories), framework="pt") as f:
            t = f.get_tensor(it.trajectory)
        want = (steps + 1, *m.latent_shape)
        if tuple(t.shape) != want:
            raise UserError(f"d3po.file: {grp.source}: trajectory {it.trajectory!r} in {grp.trajectories} has shape {tuple(t.shape)}; "
                            f"this run needs {want} (sampling.steps + 1 latents x_T..x_0 of the model's latent shape)")
        return t.float().to(m.device)

    def _train_on(self, b: _Batch, generators, mets: dict, pair_total: int) -> torch.Tensor:
        """Per-timestep DPO loss over the pairs of ``b``, backpropagated one timestep at a time."""
        cfg, d, m, acc = self.cfg, self.cfg.d3po, self.trainer.model, self.trainer.acc
        s = cfg.sampling
        T = b.traj.shape[1] - 1
        timesteps = _timesteps(m, s.steps)
        if len(timesteps) != T:
            raise UserError(f"d3po: trajectories have {T} steps but sampling.steps is {s.steps}")
        K = trained_step_count(T, d.timestep_fraction)  # the reference's int(num_steps * timestep_fraction)
        n_groups = max(b.group) + 1
        # one random timestep order per group, shared by all its members (so by every pair),
        # drawn from that group's own generator: the same whichever process holds the group
        trained = [set(torch.randperm(T, generator=generators[gi % len(generators)])[:K].tolist()) for gi in range(n_groups)]
        live_rows = sorted({r for pr in b.pairs for r in pr})
        # timesteps trained by at least one group that has a pair (a group of ties has none)
        rows_at = {k: [r for r in live_rows if k in trained[b.group[r]]] for k in range(T)}
        ks = [k for k in range(T) if rows_at[k]]
        pairs_at = {k: [(w, l) for w, l in b.pairs if k in trained[b.group[w]]] for k in ks}
        x = b.traj.to(m.device)

        def lp(rows, k):
            return transition_log_prob(m, _take(b.cond, rows), x[rows, k], timesteps[k], x[rows, k + 1],
                                       num_steps=s.steps, guidance_scale=s.guidance_scale, eta=s.eta)

        # pi_ref of every trained transition first, in one pass with the adapter off
        ref = torch.full((x.shape[0], T), float("nan"), device=m.device)
        with torch.no_grad(), self.policy("ref"), acc.autocast():
            for k in ks:
                ref[rows_at[k], k] = lp(rows_at[k], k).float()
        P = len(b.pairs)
        # mean over the global batch's pairs and trained timesteps (see the module docstring);
        # DDP then averages over processes, hence the num_processes factor
        scale = loss_scale(acc.num_processes, K, pair_total)
        total, stats = 0.0, {"acc": [], "lr_w": [], "lr_l": [], "clip": []}
        no_sync = getattr(acc, "no_sync", None)
        for n, k in enumerate(ks):
            rows, prs = rows_at[k], pairs_at[k]
            with acc.autocast():
                logp = lp(rows, k).float()
            pos = {r: i for i, r in enumerate(rows)}
            w = torch.tensor([pos[a] for a, _ in prs], device=logp.device)
            l = torch.tensor([pos[c] for _, c in prs], device=logp.device)
            rw = torch.tensor([a for a, _ in prs], device=logp.device)
            rl = torch.tensor([c for _, c in prs], device=logp.device)
            losses, cw, cl = d3po_loss(logp[w], ref[rw, k], logp[l], ref[rl, k], d.beta, d.ratio_clip)
            chunk = losses.sum() * scale
            if not torch.isfinite(chunk.detach()):
                log.warning("d3po: non-finite loss at timestep %s; the step will be skipped", int(timesteps[k]))
                return chunk.detach()
            # accumulate without a DDP all-reduce except on the last chunk of the micro-batch
            last = n == len(ks) - 1
            ctx = contextlib.nullcontext() if (last or no_sync is None) else acc.no_sync(m.denoiser)
            with ctx, torch.autocast(device_type=x.device.type, enabled=False):
                acc.backward(chunk)
            total += float(chunk.detach())
            with torch.no_grad():
                raw_w, raw_l = logp[w] - ref[rw, k], logp[l] - ref[rl, k]
                stats["acc"] += (raw_w > raw_l).float().tolist()
                stats["lr_w"] += raw_w.tolist()
                stats["lr_l"] += raw_l.tolist()
                if d.ratio_clip is not None:
                    stats["clip"] += ((raw_w != cw) | (raw_l != cl)).float().tolist()
        mean = lambda v: sum(v) / len(v) if v else float("nan")
        mets.update({"d3po/pairs": float(P), "d3po/timesteps": float(len(ks)), "d3po/accuracy": mean(stats["acc"]),
                     "d3po/logratio_chosen": mean(stats["lr_w"]), "d3po/logratio_rejected": mean(stats["lr_l"])})
        if d.ratio_clip is not None:
            mets["d3po/clip_frac"] = mean(stats["clip"])
        return torch.tensor(total)

    # ------------------------------------------------------------------ held-out win rate
    @torch.no_grad()
    def heldout_win_rate(self) -> dict:
        """Tuned vs base on the eval prompts x ``d3po.winrate_seeds`` (the same x_T and DDIM
        noise for both), judged by the oracle: ``win_rate = (wins + ties / 2) / n``."""
        tr, d = self.trainer, self.cfg.d3po
        prompts = list(tr.eval_prompts)
        wins = losses = ties = 0
        for seed in d.winrate_seeds:
            items = [PreferenceItem(latent_seed=derive_seed("d3po-heldout", seed, i), noise_seed=derive_seed("d3po-heldout-noise", seed, i))
                     for i in range(len(prompts))]
            cond = self._encode(prompts, [None] * len(prompts))
            with self.policy("ref"), tr.acc.autocast():
                base = self._sample(cond, items).images.float()
            with self.policy("current"), tr.acc.autocast():
                tuned = self._sample(cond, items).images.float()
            for i, p in enumerate(prompts):
                c = self.oracle.compare(tuned[i], base[i], p)
                if c == 0:
                    wins += 1
                elif c == 1:
                    losses += 1
                else:
                    ties += 1
        n = wins + losses + ties
        rate = (wins + 0.5 * ties) / n if n else None
        log.info("d3po: held-out win rate of the tuned model over the base: %s (%d wins, %d losses, %d ties; judge %s)",
                 f"{rate:.3f}" if rate is not None else "n/a", wins, losses, ties, self.judge_name)
        return {"win_rate": rate, "wins": wins, "losses": losses, "ties": ties, "n": n, "judge": self.judge_name,
                "seeds": list(d.winrate_seeds), "prompts": prompts}

    def summary_extra(self) -> dict:
        """Merged into summary.json by the engine: the held-out win rate over the base model."""
        if not self.trainer.acc.is_main_process:
            return {}
        if self.win is None:
            self.win = self.heldout_win_rate()
        return {"heldout_win_rate": self.win["win_rate"], "d3po": self.win}


def _timesteps(model, steps: int) -> torch.Tensor:
    from ..sampling import ddim_timesteps

    return ddim_timesteps(model, steps)
