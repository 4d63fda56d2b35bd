"""RAFT: Reward rAnked FineTuning (Dong et al., "RAFT: Reward rAnked FineTuning for Generative
Foundation Model Alignment", TMLR 2023, Algorithm 1).

Each round: sample K images for each of a batch of prompts from the current model, rank them by
the reward, keep the best, and fine-tune on the kept images with the ordinary supervised loss
(for a diffusion model: the epsilon-prediction denoising MSE). Reference: OptimalScale/LMFlow,
``src/lmflow/pipeline/raft_aligner.py`` (``align`` lines 585-676: rounds of collect -> train;
``_get_batch_dataset_local`` lines 423-463: K = 1 / top_reward_percentage samples per prompt,
keep the argmax; ``_get_batch_dataset_top`` lines 318-334: gather every process's samples and
keep the ``int(n * alpha)`` best of the whole round) and its diffusion example
``experimental/RAFT-diffusion/SD256-RAFT.ipynb`` (SD1.5 at 256 px, the 10 CIFAR-10 class names as
prompts, 10 images per prompt, the best of each prompt by the LAION aesthetic score, then the 8
best of those 10; 80 LoRA steps per round, batch 8, lr 9e-6, constant schedule, max grad norm 1,
via diffusers' ``train_text_to_image_lora.py``, whose loss is ``F.mse_loss(model_pred, target)``
on noised VAE latents at a uniform random timestep).

Here:

* ``raft.selection: best_of_k`` is the diffusion example's rule (best of each prompt's K, then the
  ``keep_fraction`` best of those bests over the round); ``quantile`` is LMFlow's ``top`` (the
  ``keep_fraction`` best of all the round's images). Both count ``floor(n * keep_fraction)`` (at
  least 1) over the GLOBAL round: every process's scores are gathered first, so the kept set is
  the same whatever the number of processes. Ties keep the lower index (the order images were
  drawn in); an image no scorer could score (NaN) is never kept.
* Rewards go through ``trainer.scalar_reward`` with the K images of a prompt as one group, so
  ``reward.ensemble`` / ``reward.shaping`` (PAR, win rate) / ``cost`` apply (PAR's reference: one
  image per prompt, rendered with the LoRA adapter off from its own seed, shared by the prompt's K).
* The kept images are stored as 8-bit RGB (the reference saves PNGs and trains on them) and
  fine-tuned on for ``raft.steps_per_round`` optimizer steps; each step takes a global mini-batch
  from the kept set (a fresh permutation drawn from the step's generator, cycled when the set is
  smaller than the batch) and each process its slice.
* ``mode: offline`` selects once from stored images (``raft.data``: JSONL or folder, read by
  :class:`RaftData`), scored by the run's reward or by the file's ``score`` fields, and fine-tunes
  on the kept ones for all of ``train.max_steps``.

The round's kept set is part of the checkpoint (``checkpoint_state``), so ``--resume`` in the
middle of a round continues on the same images.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..engine import derive_seed, generator
from ..errors import UserError

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ selection
def _ranked(scores: Sequence[float], idx: Sequence[int]) -> list[int]:
    """``idx`` best first by ``scores[i]``; NaN dropped; ties keep the lower position (stable)."""
    finite = [i for i in idx if not math.isnan(scores[i])]
    return sorted(finite, key=lambda i: -scores[i])  # sorted() is stable


def _count(n: int, fraction: float) -> int:
    # floor(n * fraction) as LMFlow's int(n * alpha), with 1e-9 so that 0.29 * 100 gives 29, not 28
    # (our guard against the float product landing just under an integer); at least one
    return max(1, int(math.floor(n * fraction + 1e-9)))


def select(scores: Sequence[float], groups: Sequence[int], selection: str, keep_fraction: float) -> list[int]:
    """Indices kept from one round (sorted ascending).

    ``scores``: one float per sample (higher better, NaN never kept); ``groups``: the prompt group of
    each sample; ``selection``: ``best_of_k`` (the best of each group, then the
    ``floor(n_groups * keep_fraction)`` best of those, n_groups counting groups with a finite score)
    or ``quantile`` (the ``floor(n * keep_fraction)`` best of all n samples). Ties: lower index first.
    """
    scores = [float(s) for s in scores]
    if len(scores) != len(groups):
        raise ValueError(f"{len(scores)} scores for {len(groups)} group ids")
    if selection == "best_of_k":
        members: dict[int, list[int]] = {}
        for i, g in enumerate(groups):
            members.setdefault(int(g), []).append(i)
        bests = [r[0] for r in (_ranked(scores, m) for m in members.values()) if r]
        if not bests:
            return []
        kept = _ranked(scores, bests)[: _count(len(bests), keep_fraction)]
    elif selection == "quantile":
        ranked = _ranked(scores, range(len(scores)))
        if not ranked:
            return []
        kept = ranked[: _count(len(scores), keep_fraction)]
    else:
        raise ValueError(f"selection must be best_of_k or quantile, got {selection!r}")
    return sorted(kept)


# ------------------------------------------------------------------------------ the loss
def denoising_loss(model, images: torch.Tensor, prompts: Sequence[str], generators: Sequence[torch.Generator], denoiser=None) -> torch.Tensor:
    """The standard diffusion training loss on (image, prompt) pairs: encode with the VAE (a latent
    drawn from its posterior), add noise at a uniform random training timestep, and take the MSE
    between the UNet's prediction and the target (the noise for epsilon-prediction, the velocity
    for v-prediction), averaged over everything. ``images`` (B, 3, H, W) in [0, 1]; item i draws
    its latent, noise and timestep from ``generators[i]`` (CPU), so the loss of an item does not
    depend on the batch it sits in. ``denoiser``: the (possibly DDP-wrapped) UNet to call."""
    sch = model.scheduler
    x = images.to(model.device, model.vae.dtype) * 2 - 1
    with torch.no_grad():
        dist = model.vae.encode(x).latent_dist
    shape = dist.mean.shape[1:]
    eps_lat = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(dist.mean)
    noise = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(dist.mean)
    t = torch.tensor([int(torch.randint(0, sch.config.num_train_timesteps, (1,), generator=g)) for g in generators], device=model.device)
    lat = (dist.mean + dist.std * eps_lat) * model.vae.config.scaling_factor
    noisy = sch.add_noise(lat.float(), noise.float(), t)
    target = noise.float() if sch.config.prediction_type == "epsilon" else sch.get_velocity(lat.float(), noise.float(), t)
    cond = model.encode_prompt(list(prompts), cfg=False)
    hs, added = cond.unet_inputs(False)
    net = denoiser if denoiser is not None else model.unet
    pred = net(noisy.to(model.unet.dtype), t, encoder_hidden_states=hs, added_cond_kwargs=added).sample
    return F.mse_loss(pred.float(), target.float())


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> uint8 on the CPU, rounded as a PNG writer does."""
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


# ------------------------------------------------------------------------------ offline data
@dataclass
class RaftRow:
    image: Path
    prompt: str
    score: Optional[float]
    source: str


class RaftData:
    """Scored images for ``raft.mode: offline``, validated whole before anything is built.

    * a JSONL file, one ``{"image": path, "prompt": text, "score": number}`` per line (``score``
      optional; paths relative to the file; blank lines and ``#`` lines skipped);
    * a folder of images, each with a same-name ``.txt`` holding its prompt (no scores).

    Every problem is a :class:`UserError` naming the file and line: a line that is not a JSON
    object, a missing or non-string ``image`` / ``prompt``, a ``score`` that is not a finite
    number, an image file that does not exist or does not decode. A folder image without its
    ``.txt`` is an error too (a silently skipped image would change what RAFT selects). Images of
    one prompt form one group (best_of_k keeps one per prompt).
    """

    def __init__(self, spec: str, field_name: str = "raft.data"):
        from rewards.images import IMAGE_SUFFIXES

        self.field = field_name
        p = Path(spec)
        self.rows: list[RaftRow] = []
        if p.is_dir():
            for img in sorted(x for x in p.iterdir() if x.suffix.lower() in IMAGE_SUFFIXES):
                cap = img.with_suffix(".txt")
                if not cap.is_file():
                    raise UserError(f"{field_name}: {img} has no prompt file {cap.name} (each image needs a same-name .txt)")
                self.rows.append(RaftRow(img, cap.read_text(encoding="utf-8").strip(), None, str(img)))
        elif p.is_file():
            try:
                lines = p.read_text(encoding="utf-8-sig").splitlines()
            except (OSError, UnicodeDecodeError) as e:
                raise UserError(f"{field_name}: cannot read {p} ({e})") from None
            for i, line in enumerate(lines, 1):
                s = line.strip()
                if not s or s.startswith("#"):
                    continue
                where = f"{field_name}: {p} line {i}"
                try:
                    obj = json.loads(s)
                except json.JSONDecodeError as e:
                    raise UserError(f"{where}: not valid JSON ({e.msg})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("image"), str) or not isinstance(obj.get("prompt"), str):
                    raise UserError(f"{where}: expected {{\"image\": path, \"prompt\": text, \"score\": number}} with string image and prompt")
                score = obj.get("score")
                if score is not None:
                    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
                        raise UserError(f"{where}: score {score!r} is not a finite number")
                    score = float(score)
                ip = Path(obj["image"])
                ip = ip if ip.is_absolute() else p.parent / ip
                if not ip.is_file():
                    raise UserError(f"{where}: image {ip} not found")
                self.rows.append(RaftRow(ip, obj["prompt"], score, f"{p} line {i}"))
        else:
            raise UserError(f"{field_name}: {p} not found (give a .jsonl file or a folder of images with .txt prompts)")
        if not self.rows:
            raise UserError(f"{field_name}: {p} holds no images")
        from PIL import Image, UnidentifiedImageError

        for r in self.rows:
            try:
                with Image.open(r.image) as im:
                    im.verify()
            except (OSError, UnidentifiedImageError) as e:
                raise UserError(f"{field_name}: {r.source}: {r.image} is not a readable image ({e})") from None

    def groups(self) -> list[list[int]]:
        """Row indices grouped by prompt, groups in order of first appearance."""
        g: dict[str, list[int]] = {}
        for i, r in enumerate(self.rows):
            g.setdefault(r.prompt, []).append(i)
        return list(g.values())

    def load(self, idx: Sequence[int], size: int) -> torch.Tensor:
        """Rows ``idx`` as (n, 3, size, size) float in [0, 1] (resized, bilinear with antialiasing)."""
        from rewards.images import load_image

        out = []
        for i in idx:
            t = load_image(self.rows[i].image)
            if t.shape[-2:] != (size, size):
                t = F.interpolate(t[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
            out.append(t.clamp(0, 1))
        return torch.stack(out)


# ------------------------------------------------------------------------------ the method
@dataclass
class KeptSet:
    round: int
    images: torch.Tensor  # (n, 3, H, W) uint8 on the CPU
    prompts: list[str]
    mets: dict = field(default_factory=dict)


class RAFT:
    needs_differentiable_reward = False
    #: reward guards this method feeds (vfeedback/reward_shaping.py): groups are the K images of a
    #: prompt, and the base model's images for PAR are the same seeds with the adapter off
    reward_shaping = ("par", "win_rate")
    supports_cost = True

    @staticmethod
    def check_config(cfg) -> None:
        """The checks that need no model (run by `validate` and by `train` before anything is made)."""
        r = cfg.raft
        if cfg.model.finetune == "lora" and cfg.model.lora.text_encoder:
            raise UserError("model.lora.text_encoder: raft fine-tunes the UNet (its PAR reference is the UNet with the adapter off); "
                            "set model.lora.text_encoder: false")
        if cfg.reward.shaping == "win_rate" and r.mode == "online" and r.num_samples < 2:
            raise UserError("reward.shaping: win_rate compares the K images of a prompt; raise raft.num_samples to 2 or more")
        if r.mode == "offline" and Path(r.data).exists():  # a path relative to the config's folder is checked at set-up
            data = RaftData(r.data)
            if r.offline_scores == "file":
                missing = [row.source for row in data.rows if row.score is None]
                if missing:
                    raise UserError(f"raft.offline_scores: file, but {missing[0]} has no \"score\" ({len(missing)} rows without one); "
                                    "give every row a score or set raft.offline_scores: reward")

    def __init__(self, cfg, trainer):
        self.cfg = cfg
        self.trainer = trainer
        self.kept: Optional[KeptSet] = None
        self.data: Optional[RaftData] = None
        self.ref_unet = None
        N = trainer.acc.num_processes if getattr(trainer, "acc", None) is not None else 1
        if cfg.raft.mode == "online" and cfg.raft.prompts_per_round < N:
            raise UserError(f"raft.prompts_per_round ({cfg.raft.prompts_per_round}) is below the number of processes ({N}); every "
                            "process renders whole prompts: give at least one prompt per process")
        if cfg.raft.mode == "offline":
            self.data = RaftData(str(self._resolve(cfg.raft.data)))
            if len(self.data.groups()) < N:
                raise UserError(f"raft.data: {len(self.data.groups())} prompt(s) for {N} processes; every process scores whole prompts")
            if cfg.raft.offline_scores == "file" and any(r.score is None for r in self.data.rows):
                self.check_config(cfg)  # names the row
        elif cfg.reward.shaping == "par" and cfg.model.finetune == "full":
            # PAR's reference renders: a full fine-tune has no adapter to switch off
            self.ref_unet = copy.deepcopy(trainer.model.unet).requires_grad_(False).eval()

    def _resolve(self, path: str) -> Path:
        from ..config import resolve_data_path

        return resolve_data_path(path, getattr(self.trainer, "config_source", None))

    # ---- which weights render
    @contextlib.contextmanager
    def policy(self, which: str):
        """UNet calls inside run on the current weights, unwrapped (``"current"``: no DDP collective
        while sampling), or on the base model (``"ref"``: LoRA adapter off, or the frozen copy)."""
        m = self.trainer.model
        den, lora_off = m.denoiser, False
        try:
            if which == "ref" and self.ref_unet is not None:
                m.denoiser = self.ref_unet
            else:
                m.denoiser = None
                if which == "ref":
                    m.unet.disable_adapters()
                    lora_off = True
            yield
        finally:
            if lora_off:
                m.unet.enable_adapters()
            m.denoiser = den

    @torch.no_grad()
    def render(self, prompts: Sequence[str], seeds: Sequence[int], which: str = "current") -> torch.Tensor:
        """Images (n, 3, H, W) in [0, 1] on the model's device: prompt i from seed i (initial latent
        and DDIM noise both from ``torch.Generator().manual_seed(seed)``), in chunks of
        ``raft.sample_batch_size``."""
        from ..sampling import sample

        cfg, m, s = self.cfg, self.trainer.model, self.cfg.sampling
        out = []
        bs = cfg.raft.sample_batch_size
        with self.policy(which):
            for a in range(0, len(prompts), bs):
                ps = list(prompts[a : a + bs])
                gens = [torch.Generator().manual_seed(int(x)) for x in seeds[a : a + bs]]
                cond = m.encode_prompt(ps, [cfg.prompts.negative] * len(ps), cfg=s.guidance_scale > 1)
                with self.trainer.acc.autocast():
                    o = sample(m, cond, num_steps=s.steps, guidance_scale=s.guidance_scale, eta=s.eta, generator=gens)
                out.append(o.images.float())
        return torch.cat(out)

    # ---- one round
    def _round_prompts(self, rnd: int) -> list[str]:
        """The round's prompts: a fresh permutation of the training prompts per round, cycled to
        ``prompts_per_round`` (every prompt once per round when there are enough; the reference
        renders all its 10 prompts every round)."""
        tp = self.trainer.train_prompts
        perm = torch.randperm(len(tp), generator=generator(self.cfg.seed, "raft-prompts", rnd)).tolist()
        return [tp[perm[p % len(tp)]] for p in range(self.cfg.raft.prompts_per_round)]

    def _share(self, n_groups: int) -> tuple[int, int]:
        acc = self.trainer.acc
        N, rank = acc.num_processes, acc.process_index
        return rank * n_groups // N, (rank + 1) * n_groups // N

    def _gather(self, obj: list) -> list:
        if self.trainer.acc.num_processes == 1:
            return list(obj)
        from accelerate.utils import gather_object

        return gather_object(obj)

    def _collect_online(self, rnd: int) -> KeptSet:
        cfg, tr, K = self.cfg, self.trainer, self.cfg.raft.num_samples
        prompts = self._round_prompts(rnd)
        lo, hi = self._share(len(prompts))
        # sample i = prompt i // K, its k-th image; seeds from (seed, round, i): the same image
        # whichever process draws it
        idx = [p * K + k for p in range(lo, hi) for k in range(K)]
        seeds = [derive_seed(cfg.seed, "raft-sample", rnd, i) for i in idx]
        my_prompts = [prompts[i // K] for i in idx]
        images = self.render(my_prompts, seeds) if idx else self._empty()
        groups = torch.tensor([i // K - lo for i in idx], dtype=torch.long)
        ref = None
        if tr.scalar_reward.needs_reference:
            # PAR's reference: one base-model image per prompt, from its own seed, shared by the K
            ref_seeds = [derive_seed(cfg.seed, "raft-par-ref", rnd, p) for p in range(lo, hi)]
            ref = lambda: self.render(prompts[lo:hi], ref_seeds, "ref").repeat_interleave(K, dim=0)  # noqa: E731
        final, mets = tr.scalar_reward(images, my_prompts, groups=groups, reference=ref)
        scores = self._gather([float(v) for v in final.tolist()])
        kept = select(scores, [i // K for i in range(len(scores))], cfg.raft.selection, cfg.raft.keep_fraction)
        mine = [(i, to_uint8(images[i - lo * K : i - lo * K + 1])[0]) for i in kept if lo * K <= i < hi * K]
        got = dict(self._gather(mine))
        imgs = torch.stack([got[i] for i in kept]) if kept else self._empty_u8()
        mets = {**mets, "raft/kept_score_mean": _mean([scores[i] for i in kept]), "raft/round_score_mean": _mean(scores)}
        return KeptSet(rnd, imgs, [prompts[i // K] for i in kept], mets)

    def _collect_offline(self) -> KeptSet:
        cfg, tr, data = self.cfg, self.trainer, self.data
        groups = data.groups()
        order = [i for g in groups for i in g]  # rows by prompt group: the global sample order
        gid = [n for n, g in enumerate(groups) for _ in g]
        res = self.trainer.model.resolution
        mets: dict = {}
        if cfg.raft.offline_scores == "file":
            scores = [data.rows[i].score for i in order]
        else:
            # scored prompts_per_round groups at a time (one scalar-reward batch each, so a cost's
            # multiplier takes a step per chunk), each process scoring its share of a chunk
            scores, P = [], max(cfg.raft.prompts_per_round, tr.acc.num_processes)
            starts = list(range(0, len(groups), P))
            if len(starts) > 1 and len(groups) - starts[-1] < tr.acc.num_processes:
                starts.pop()  # a last chunk with fewer prompts than processes joins the one before
            for c0, c1 in zip(starts, starts[1:] + [len(groups)]):
                chunk = groups[c0:c1]
                lo, hi = self._share(len(chunk))
                rows = [i for g in chunk[lo:hi] for i in g]
                images = data.load(rows, res).to(self.trainer.model.device) if rows else self._empty()
                gl = torch.tensor([n for n, g in enumerate(chunk[lo:hi]) for _ in g], dtype=torch.long)
                final, mets = tr.scalar_reward(images, [data.rows[i].prompt for i in rows], groups=gl)
                scores += self._gather([float(v) for v in final.tolist()])
        kept = select(scores, gid, cfg.raft.selection, cfg.raft.keep_fraction)
        rows = [order[i] for i in kept]
        imgs = to_uint8(data.load(rows, res)) if rows else self._empty_u8()
        log.info("raft offline: kept %d of %d images (%d prompts) from %s", len(rows), len(order), len(groups), cfg.raft.data)
        mets = {**mets, "raft/kept_score_mean": _mean([scores[i] for i in kept]), "raft/round_score_mean": _mean(scores)}
        return KeptSet(0, imgs, [data.rows[i].prompt for i in rows], mets)

    def _empty(self) -> torch.Tensor:
        r = self.trainer.model.resolution
        return torch.zeros(0, 3, r, r, device=self.trainer.model.device)

    def _empty_u8(self) -> torch.Tensor:
        r = self.trainer.model.resolution
        return torch.zeros(0, 3, r, r, dtype=torch.uint8)

    # ---- the engine's step
    def train_step(self, prompts, generators, step_gen: torch.Generator):
        """One micro-batch: (re)collect the round's kept set when a round starts, then the
        denoising loss on this process's slice of a global mini-batch drawn from it. ``prompts``
        (the engine's) are unused: a round draws its own; ``generators``: the engine's per-item
        generators of this process's global batch positions."""
        cfg, tr = self.cfg, self.trainer
        step = getattr(tr, "current_step", 1)
        rnd = 0 if cfg.raft.mode == "offline" else (step - 1) // cfg.raft.steps_per_round
        if self.kept is None or self.kept.round != rnd:
            self.kept = self._collect_offline() if cfg.raft.mode == "offline" else self._collect_online(rnd)
            log.info("raft round %d: kept %d images (mean score %.4f)", rnd, len(self.kept.prompts), self.kept.mets.get("raft/kept_score_mean", float("nan")))
        k = self.kept
        mets = {**k.mets, "raft/round": float(rnd), "raft/kept": float(len(k.prompts))}
        if "reward_raw_mean" in k.mets:
            mets["reward_mean"] = k.mets["reward_raw_mean"]
        n = len(k.prompts)
        if n == 0:  # no image of the round could be scored: a skipped, counted step
            return torch.zeros((), requires_grad=False) * float("nan"), mets
        acc = tr.acc
        B, N, rank = len(generators), acc.num_processes, acc.process_index
        perm = torch.randperm(n, generator=step_gen).tolist()
        pos = [perm[j % n] for j in range(rank * B, (rank + 1) * B)]
        images = k.images[pos].float().div(255)
        loss = denoising_loss(tr.model, images, [k.prompts[i] for i in pos], generators, denoiser=tr.model.denoiser)
        mets["raft/denoise_loss"] = float(loss.detach())
        return loss, mets

    # ---- checkpoint (the engine saves / restores it)
    def checkpoint_state(self):
        k = self.kept
        if k is None:
            return {}, {}
        return {"kept_images": k.images.contiguous()}, {"round": k.round, "prompts": k.prompts, "mets": k.mets}

    def load_checkpoint_state(self, tensors: dict, meta: dict) -> None:
        if "kept_images" in tensors:
            self.kept = KeptSet(int(meta["round"]), tensors["kept_images"], list(meta["prompts"]), dict(meta.get("mets", {})))


def _mean(v: Sequence[float]) -> float:
    f = [x for x in v if math.isfinite(x)]
    return sum(f) / len(f) if f else float("nan")
