"""Diffusion-DPO: Direct Preference Optimization on the denoising loss.

Wallace et al., "Diffusion Model Alignment Using Direct Preference Optimization", CVPR 2024;
reference code github.com/SalesforceAIResearch/DiffusionDPO (``train.py``, ``launchers/*.sh``).

For a caption c and two images of it, a winner x^w and a loser x^l (a person's or a judge's
preference), both are noised at the *same* random timestep t with the *same* noise eps
(``train.py``: ``timesteps.chunk(2)[0].repeat(2)``, ``noise.chunk(2)[0].repeat(2, ...)``), and
the trained model's denoising errors are compared with the frozen reference's (paper eq. 14):

    L = -log sigmoid( -beta T w(lambda_t) [ (e_w - e_w,ref) - (e_l - e_l,ref) ] ),
    e_* = || eps - eps_theta(x^*_t, t, c) ||^2,   e_*,ref likewise with the reference model.

The reference implements it with the weighting w(lambda_t) constant and T folded into beta
(its ``--beta_dpo`` 5000): ``e`` is the squared error *averaged* over the latent's channels and
pixels (``(model_pred - target).pow(2).mean(dim=[1,2,3])``), and the argument of the sigmoid is
``-0.5 * beta_dpo * (model_diff - ref_diff)`` with ``model_diff = e_w - e_l``; the loss is the
mean over the pairs. :func:`diffusion_dpo_loss` is exactly that, with our ``beta`` = their
``beta_dpo``. Minimising it lowers the trained model's error on winners relative to losers,
measured against the reference's: the policy's likelihood margin of winners over losers rises.

As in the reference: t ~ U{0, ..., num_train_timesteps - 1}; the target is the noise
(epsilon-prediction; for a v-prediction model we take the velocity, our choice, since the
reference asserts epsilon); the latents are *sampled* from the VAE's posterior each step
(``latent_dist.sample()``), from its mean and std cached once per image (below); images are
resized (shorter side) and centre-cropped to the resolution. Ours, not the reference's: no random
horizontal flip (the cache holds one latent distribution per image); a pair is drawn uniformly
with replacement for each batch item from the item's own generator (the reference iterates over a
shuffled dataset), so a run is the same on any number of processes and after a resume.

The reference model: with LoRA (the default here) the *same* UNet with the adapter switched off
(peft's ``disable_adapters``, through diffusers), so no second copy of the weights; a full
fine-tune keeps a frozen copy, as the reference's ``ref_unet``.

SDXL micro-conditioning per image: ``time_ids = (original height, original width, crop top,
crop left, target height, target width)`` from each image's own size and centre crop, as
diffusers' ``train_text_to_image_sdxl.py`` computes them (the DiffusionDPO reference passes the
constant ``(res, res, 0, 0, res, res)``; Pick-a-Pic images vary in size, so we pass the real ones).

The latent cache: encoding the images dominates an offline epoch, so each image's VAE posterior
(mean and std, before ``scaling_factor``) and its ``time_ids`` are written once to
``OUT/latent_cache/chunk-NNNNNN.safetensors`` (``diffusion_dpo.cache_chunk`` pairs per file,
encoded the first time a batch needs one of its pairs; written atomically), keyed in
``meta.json`` by the data's identity, the model and the resolution; a resumed run reuses them,
a changed dataset or model rebuilds them.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from ..engine import derive_seed
from ..errors import UserError
from ..feedback.pairs import PairSet, read_pairs

log = logging.getLogger(__name__)

CACHE_DIR = "latent_cache"
WORLD_DIR = "world_pairs"
WORLDS = ("world:shapes",)


# --------------------------------------------------------------------------------- the loss
def denoising_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error averaged over every dimension but the batch: (B, C, h, w) -> (B,) float32."""
    return (pred.float() - target.float()).pow(2).mean(dim=tuple(range(1, pred.ndim)))


def diffusion_dpo_loss(err_w: torch.Tensor, err_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor, beta: float):
    """Per-pair Diffusion-DPO loss (module docstring; reference ``train.py``).

    ``err_w`` / ``err_l``: the trained model's denoising errors (B,) on the winner / loser (with
    grad); ``ref_w`` / ``ref_l``: the reference model's on the same noisy latents. Returns
    ``(loss (B,), inside (B,))`` with ``inside = -beta / 2 * ((err_w - err_l) - (ref_w - ref_l))``
    and ``loss = -log sigmoid(inside)``; ``inside > 0`` is the reference's implicit accuracy.
    """
    inside = -0.5 * beta * ((err_w - err_l) - (ref_w - ref_l))
    return -F.logsigmoid(inside), inside


# --------------------------------------------------------------------------------- images
def preprocess(image, resolution: int) -> tuple[torch.Tensor, list[int]]:
    """A PIL image -> ``(x (3, R, R) in [0, 1], time_ids)``: the shorter side resized to R
    (bilinear, antialiased), then centre-cropped to R x R (the reference's ``Resize`` +
    ``CenterCrop``). ``time_ids = [orig_h, orig_w, crop_top, crop_left, R, R]`` with the crop's
    top-left corner in the resized image, as diffusers' SDXL training script computes it."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    w0, h0 = image.size
    img = TF.resize(image, resolution, interpolation=InterpolationMode.BILINEAR, antialias=True)
    top = max(0, int(round((img.height - resolution) / 2.0)))
    left = max(0, int(round((img.width - resolution) / 2.0)))
    img = TF.crop(img, top, left, resolution, resolution)
    return TF.to_tensor(img), [h0, w0, top, left, resolution, resolution]


# --------------------------------------------------------------------------------- the cache
class LatentCache:
    """VAE posteriors (mean, std) and SDXL ``time_ids`` of every pair's two images, encoded once
    into ``folder`` in chunks of ``chunk`` pairs (module docstring)."""

    KEEP = 8  # chunks held in memory

    def __init__(self, folder: Path, data: PairSet, model, chunk: int, dtype: str, main: bool):
        self.folder, self.data, self.model, self.chunk = Path(folder), data, model, chunk
        self.dtype = getattr(torch, dtype)
        self._mem: dict[int, dict] = {}
        ident = {"data": data.identity, "model": model.path, "family": model.family, "resolution": model.resolution,
                 "chunk": chunk, "dtype": dtype, "vae_scale": float(model.vae.config.scaling_factor)}
        self.key = hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()
        if main:
            self._prepare(ident)

    def _prepare(self, ident: dict) -> None:
        from ..rundir import atomic_write

        meta = self.folder / "meta.json"
        if meta.is_file():
            try:
                old = json.loads(meta.read_text()).get("key")
            except (OSError, json.JSONDecodeError):
                old = None
            if old == self.key:
                n = len(list(self.folder.glob("chunk-*.safetensors")))
                log.info("latent cache %s: reusing %d encoded chunk(s)", self.folder, n)
                return
            log.warning("latent cache %s was made for other data or another model; encoding again", self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        for f in self.folder.glob("chunk-*.safetensors"):
            f.unlink()
        atomic_write(meta, json.dumps({"key": self.key, **ident}, indent=1, default=str))

    def __len__(self) -> int:
        return len(self.data)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of a cached latent: the VAE's latent channels at the model's resolution."""
        m = self.model
        s = m.resolution // m.vae_scale_factor
        return (int(m.vae.config.latent_channels), s, s)

    @property
    def n_chunks(self) -> int:
        return (len(self.data) + self.chunk - 1) // self.chunk

    def fetch(self, idx: list[int]) -> dict[str, torch.Tensor]:
        """Rows of pairs ``idx``: ``w_mean``, ``w_std``, ``l_mean``, ``l_std`` (B, C, h, w, the
        cache dtype) and ``w_tids``, ``l_tids`` (B, 6, int64)."""
        rows = []
        for i in idx:
            c = i // self.chunk
            d = self._load(c)
            rows.append({k: v[i - c * self.chunk] for k, v in d.items()})
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

    def _load(self, c: int) -> dict:
        from safetensors.torch import load_file

        if c in self._mem:
            return self._mem[c]
        f = self.folder / f"chunk-{c:06d}.safetensors"
        if not f.is_file():
            self._encode(c, f)
        d = load_file(str(f))
        if len(self._mem) >= self.KEEP:
            self._mem.pop(next(iter(self._mem)))
        self._mem[c] = d
        return d

    @torch.no_grad()
    def _encode(self, c: int, f: Path) -> None:
        from safetensors.torch import save_file

        m = self.model
        lo, hi = c * self.chunk, min((c + 1) * self.chunk, len(self.data))
        out: dict[str, list] = {k: [] for k in ("w_mean", "w_std", "l_mean", "l_std", "w_tids", "l_tids")}
        for start in range(lo, hi, 8):  # 8 pairs (16 images) per VAE call
            ids = range(start, min(start + 8, hi))
            for side in ("w", "l"):
                xs, tids = [], []
                for i in ids:
                    x, t = preprocess(self.data.load_image(i, "winner" if side == "w" else "loser"), m.resolution)
                    xs.append(x)
                    tids.append(t)
                x = torch.stack(xs).to(m.device, m.vae.dtype) * 2 - 1
                dist = m.vae.encode(x).latent_dist
                out[f"{side}_mean"].append(dist.mean.to(self.dtype).cpu())
                out[f"{side}_std"].append(dist.std.to(self.dtype).cpu())
                out[f"{side}_tids"].append(torch.tensor(tids, dtype=torch.int64))
        tensors = {k: torch.cat(v).contiguous() for k, v in out.items()}
        tmp = f.with_name(f".{f.name}.{os.getpid()}.tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, f)  # two processes encoding the same chunk write the same values
        log.info("latent cache: encoded pairs %d-%d into %s", lo, hi - 1, f.name)


# --------------------------------------------------------------------------------- the method
class DiffusionDPO:
    needs_differentiable_reward = False

    @staticmethod
    def check_config(cfg) -> None:
        """Checks that need no model (run by `validate` and by `train` before anything is made)."""
        d = cfg.diffusion_dpo
        if cfg.model.finetune == "lora" and cfg.model.lora.text_encoder:
            raise UserError("model.lora.text_encoder: diffusion_dpo trains the UNet only (its reference model is the UNet with "
                            "the LoRA adapter disabled); set model.lora.text_encoder: false")
        if d.data.startswith("world:"):
            if d.data not in WORLDS:
                raise UserError(f"diffusion_dpo.data: unknown generated data {d.data!r}; available: {', '.join(WORLDS)}")
        else:
            read_pairs(d.data, "diffusion_dpo.data", d.split, d.max_pairs)

    def __init__(self, cfg, trainer):
        self.cfg, self.trainer = cfg, trainer
        d = cfg.diffusion_dpo
        self.world = d.data if d.data.startswith("world:") else None
        self.data: Optional[PairSet] = None if self.world else read_pairs(d.data, "diffusion_dpo.data", d.split, d.max_pairs)
        self.ref_unet = None
        if cfg.model.finetune == "full":  # the reference's frozen ref_unet
            self.ref_unet = copy.deepcopy(trainer.model.unet).requires_grad_(False).eval()
        self.cache: Optional[LatentCache] = None
        self.judged_images: Optional[int] = None

    # ------------------------------------------------------------------ which weights
    @contextlib.contextmanager
    def reference(self):
        """Inside: ``yield`` the frozen reference UNet (the base weights: LoRA disabled, or the
        frozen copy of a full fine-tune), unwrapped, so its calls run no DDP collective."""
        m = self.trainer.model
        if self.ref_unet is not None:
            yield self.ref_unet
            return
        m.unet.disable_adapters()  # diffusers -> peft: every LoRA layer returns its base output
        try:
            yield m.unet
        finally:
            m.unet.enable_adapters()  # and the LoRA weights are trainable again

    # ------------------------------------------------------------------ data
    def _ensure_ready(self) -> None:
        if self.cache is not None:
            return
        tr, d = self.trainer, self.cfg.diffusion_dpo
        acc = tr.acc
        if self.world is not None:
            f = tr.run.root / WORLD_DIR / "pairs.jsonl"
            if acc.is_main_process and not f.is_file():
                self._generate_world(f)
            acc.wait_for_everyone()
            self.data = read_pairs(f, "diffusion_dpo.data", d.split, d.max_pairs)
            info = json.loads((f.parent / "world.json").read_text())
            self.judged_images = int(info["judged_images"])
        self.cache = LatentCache(tr.run.root / CACHE_DIR, self.data, tr.model, d.cache_chunk, d.cache_dtype, acc.is_main_process)
        acc.wait_for_everyone()

    @torch.no_grad()
    def _generate_world(self, f: Path) -> None:
        """``world:shapes``: ``world_pairs`` pairs of the base model's images (each its own seeds)
        for the training prompts, judged by the run's reward; written as PNGs and a preference
        JSONL (the rank app's format, with the seeds that rebuild each image) in OUT/world_pairs."""
        from rewards.images import to_pil

        from ..feedback.oracles import RewardPreferenceOracle
        from ..feedback.preferences import PreferenceGroup, PreferenceItem, write_preferences
        from ..rundir import atomic_write
        from .d3po import sample_items

        cfg, d, tr = self.cfg, self.cfg.diffusion_dpo, self.trainer
        m, s = tr.model, cfg.sampling
        oracle = RewardPreferenceOracle(tr.reward, tol=d.tie_tol)
        prompts = tr.train_prompts
        order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(derive_seed(cfg.seed, "dpo-world"))).tolist()
        img_dir = f.parent / "images"
        img_dir.mkdir(parents=True, exist_ok=True)
        groups, ties, bs = [], 0, max(1, cfg.train.batch_size)
        sampling = {"steps": s.steps, "guidance_scale": s.guidance_scale, "eta": s.eta}
        den, m.denoiser = m.denoiser, None
        try:
            for start in range(0, d.world_pairs, bs):
                ns = list(range(start, min(start + bs, d.world_pairs)))
                caps = [prompts[order[n % len(order)]] for n in ns]
                items = [PreferenceItem(latent_seed=derive_seed(cfg.seed, "dpo-world-latent", n, k),
                                        noise_seed=derive_seed(cfg.seed, "dpo-world-noise", n, k)) for n in ns for k in (0, 1)]
                twice = [c for c in caps for _ in (0, 1)]
                cond = m.encode_prompt(twice, [cfg.prompts.negative] * len(twice), cfg=s.guidance_scale > 1)
                with self.reference() as base, tr.acc.autocast():
                    m.denoiser = base  # the base weights draw the pairs (a full fine-tune's frozen copy, or LoRA off)
                    out = sample_items(m, cond, items, num_steps=s.steps, guidance_scale=s.guidance_scale, eta=s.eta)
                images = out.images.float()
                pil = to_pil(images.cpu())
                for j, n in enumerate(ns):
                    names = []
                    for k in (0, 1):
                        name = f"pair-{n:06d}-{k}.png"
                        pil[2 * j + k].save(img_dir / name)
                        names.append(f"images/{name}")
                    c = oracle.compare(images[2 * j], images[2 * j + 1], caps[j])
                    ranks = [1, 2] if c == 0 else [2, 1] if c == 1 else [1, 1]
                    ties += c is None
                    its = [PreferenceItem(latent_seed=items[2 * j + k].latent_seed, noise_seed=items[2 * j + k].noise_seed, image=names[k])
                           for k in (0, 1)]
                    pairs = [] if c is None else [(c, 1 - c)]
                    groups.append(PreferenceGroup(caps[j], its, pairs, ranks, cfg.prompts.negative or None, None, sampling,
                                                  ties=int(c is None)))
        finally:
            m.denoiser = den
        info = {"judged_images": 2 * d.world_pairs, "pairs": d.world_pairs - ties, "ties": ties, "judge": f"reward:{tr.reward.name}",
                "model": cfg.model.path, "tie_tol": d.tie_tol}
        atomic_write(f.parent / "world.json", json.dumps(info, indent=1))
        write_preferences(f, groups)  # last: its presence marks the set complete (a resume reuses it)
        log.info("diffusion_dpo: %d judged images -> %d pairs (%d ties dropped) by %s in %s", 2 * d.world_pairs,
                 d.world_pairs - ties, ties, info["judge"], f)

    # ------------------------------------------------------------------ one micro-batch
    def draw(self, generators):
        """Each item's randomness, from its own generator in this order: the pair index, the
        timestep, the noise (shared by winner and loser), and the two VAE posterior draws.
        Returns ``(idx, timesteps, noise, eps_w, eps_l)``; the tensors are (B, C, h, w)."""
        self._ensure_ready()
        n, T = len(self.data), self.trainer.model.scheduler.config.num_train_timesteps
        shape = self.cache.latent_shape
        idx, ts, noise, eps_w, eps_l = [], [], [], [], []
        for g in generators:
            idx.append(int(torch.randint(n, (1,), generator=g)))
            ts.append(int(torch.randint(T, (1,), generator=g)))
            noise.append(torch.randn(shape, generator=g))
            eps_w.append(torch.randn(shape, generator=g))
            eps_l.append(torch.randn(shape, generator=g))
        return idx, ts, torch.stack(noise), torch.stack(eps_w), torch.stack(eps_l)

    def train_step(self, prompts, generators, step_gen: torch.Generator):
        """One micro-batch: a pair per item (the engine's ``prompts`` are not used: the captions
        are the pairs'), drawn, noised and scored from the item's own generator."""
        self._ensure_ready()
        cfg, m = self.cfg, self.trainer.model
        sch = m.scheduler
        idx, ts, noise, eps_w, eps_l = self.draw(generators)
        lat = self.cache.fetch(idx)
        dev, sf = m.device, m.vae.config.scaling_factor
        # the VAE posterior sample of each image (the reference's latent_dist.sample()), scaled
        xw = (lat["w_mean"].float() + lat["w_std"].float() * eps_w) * sf
        xl = (lat["l_mean"].float() + lat["l_std"].float() * eps_l) * sf
        B = len(idx)
        x0 = torch.cat([xw, xl]).to(dev)
        nz = noise.repeat(2, 1, 1, 1).to(dev)  # the same noise for winner and loser
        t = torch.tensor(ts, dtype=torch.long).repeat(2).to(dev)  # and the same timestep
        noisy = sch.add_noise(x0, nz, t)
        target = nz if sch.config.prediction_type == "epsilon" else sch.get_velocity(x0, nz, t)
        caps = [self.data.pairs[i].caption for i in idx]
        with torch.no_grad():
            cond = m.encode_prompt(caps, cfg=False).take(list(range(B)) * 2)
        if m.family == "sdxl":  # each image's own (original size, crop, target size)
            cond.time_ids = torch.cat([lat["w_tids"], lat["l_tids"]]).to(dev, cond.embeds.dtype)
        hs, added = cond.unet_inputs(False)
        xin = noisy.to(m.unet.dtype)
        pred = m.denoiser(xin, t, encoder_hidden_states=hs, added_cond_kwargs=added).sample
        with torch.no_grad(), self.reference() as ref_unet:
            ref = ref_unet(xin, t, encoder_hidden_states=hs, added_cond_kwargs=added).sample
        err, ref_err = denoising_error(pred, target), denoising_error(ref, target)
        losses, inside = diffusion_dpo_loss(err[:B], err[B:], ref_err[:B], ref_err[B:], cfg.diffusion_dpo.beta)
        loss = losses.mean()
        with torch.no_grad():
            mets = {"dpo/implicit_acc": (inside > 0).float().mean().item(),
                    "dpo/mse_policy": 0.5 * (err[:B].mean() + err[B:].mean()).item(),
                    "dpo/mse_ref": ref_err.mean().item(),
                    # the policy's likelihood margin of winners over losers, relative to the reference
                    "dpo/margin": (-((err[:B] - err[B:]) - (ref_err[:B] - ref_err[B:]))).mean().item()}
        return loss, mets

    def summary_extra(self) -> dict:
        """Merged into summary.json: where the pairs came from and how many."""
        d = self.cfg.diffusion_dpo
        info = {"data": d.data, "pairs": len(self.data) if self.data is not None else None,
                "ties_dropped": self.data.ties if self.data is not None else None, "beta": d.beta,
                "latent_cache": str(self.trainer.run.root / CACHE_DIR)}
        if self.world is not None:
            info["judged_images"] = self.judged_images
        return {"diffusion_dpo": info}
