"""Load a diffusion pipeline from a hub id, a local diffusers folder, a single file or ``tiny:``.

All paths end in ``from_pretrained`` (or ``from_single_file``), so the tiny models used in tests
exercise the same code that loads real weights.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..errors import UserError

log = logging.getLogger(__name__)

FAMILIES = ("sd15", "sdxl")
PIPELINE_CLASS = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}
DEFAULT_RESOLUTION = {"sd15": 512, "sdxl": 1024}


class AdapterEmbeds(list):
    """IP-Adapter image embeddings, one tensor per adapter (the list diffusers' UNet takes as
    ``added_cond_kwargs["image_embeds"]``), with ``.to`` so callers that cast every
    ``added_cond_kwargs`` value (``sampling.predict_noise``) cast each tensor."""

    def to(self, *args, **kwargs) -> "AdapterEmbeds":
        return AdapterEmbeds(t.to(*args, **kwargs) for t in self)


@dataclass
class Conditioning:
    """Text conditioning for one batch: positive and (with CFG) negative, SD1.5 or SDXL; with an
    IP-Adapter loaded, also the reference image embeddings."""

    embeds: torch.Tensor  # (B, L, D)
    neg_embeds: Optional[torch.Tensor] = None
    pooled: Optional[torch.Tensor] = None  # SDXL: text_encoder_2 projection (B, P)
    neg_pooled: Optional[torch.Tensor] = None
    time_ids: Optional[torch.Tensor] = None  # SDXL: (B, 6)
    # IP-Adapter: one tensor per adapter, (B, R, D) image embeds of the R reference images (or
    # (B, R, T, D) encoder hidden states for the Plus / full-face variants); the negatives are what
    # diffusers' pipelines use for CFG (zeros, or the encoding of a black image for Plus)
    image_embeds: Optional[list] = None
    neg_image_embeds: Optional[list] = None

    def repeat(self, n: int) -> "Conditioning":
        """Each row repeated n times (B -> B*n), e.g. several images per prompt."""
        r = lambda t: None if t is None else t.repeat_interleave(n, dim=0)
        rl = lambda ts: None if ts is None else [r(t) for t in ts]
        return Conditioning(r(self.embeds), r(self.neg_embeds), r(self.pooled), r(self.neg_pooled), r(self.time_ids),
                            rl(self.image_embeds), rl(self.neg_image_embeds))

    def take(self, idx) -> "Conditioning":
        """The rows ``idx`` (a list / tensor of indices, or a slice) of every field, the
        IP-Adapter image embeddings included."""
        if not isinstance(idx, slice):
            idx = torch.as_tensor(list(idx) if not isinstance(idx, torch.Tensor) else idx, dtype=torch.long)
        t = lambda v: None if v is None else v[idx if isinstance(idx, slice) else idx.to(v.device)]
        tl = lambda vs: None if vs is None else [t(v) for v in vs]
        return Conditioning(t(self.embeds), t(self.neg_embeds), t(self.pooled), t(self.neg_pooled), t(self.time_ids),
                            tl(self.image_embeds), tl(self.neg_image_embeds))

    @staticmethod
    def cat(conds: Sequence["Conditioning"]) -> "Conditioning":
        """Rows of several Conditionings, one after another (every field, image embeddings too)."""
        c = lambda name: None if getattr(conds[0], name) is None else torch.cat([getattr(x, name) for x in conds])
        cl = lambda name: None if getattr(conds[0], name) is None else [
            torch.cat(parts) for parts in zip(*(getattr(x, name) for x in conds))]
        return Conditioning(c("embeds"), c("neg_embeds"), c("pooled"), c("neg_pooled"), c("time_ids"),
                            cl("image_embeds"), cl("neg_image_embeds"))

    def unet_inputs(self, cfg: bool):
        """``encoder_hidden_states`` and ``added_cond_kwargs`` for one UNet call (negatives first)."""
        if cfg:
            hs = torch.cat([self.neg_embeds, self.embeds])
        else:
            hs = self.embeds
        added = None
        if self.pooled is not None:
            pooled = torch.cat([self.neg_pooled, self.pooled]) if cfg else self.pooled
            tids = torch.cat([self.time_ids, self.time_ids]) if cfg else self.time_ids
            added = {"text_embeds": pooled, "time_ids": tids}
        if self.image_embeds is not None:  # IP-Adapter: negatives first, as for the text
            ims = [torch.cat([n, p]) for n, p in zip(self.neg_image_embeds, self.image_embeds)] if cfg else list(self.image_embeds)
            added = {**(added or {}), "image_embeds": AdapterEmbeds(ims)}
        return hs, added


@dataclass
class DiffusionModel:
    """The pieces a reward-feedback method touches, around a diffusers pipeline."""

    pipe: object
    family: str
    path: str
    resolution: int
    #: the module used for UNet forward calls during training (accelerate's prepared /
    #: DDP-wrapped UNet); None: the pipeline's own UNet
    denoiser: Optional[torch.nn.Module] = None
    #: IP-Adapter: (positive, negative) reference image embeddings per adapter, batch 1, computed
    #: once at load (the reference face does not change during training); None: no adapter
    ip_image_embeds: Optional[list] = None
    #: model.cache_text_embeddings: {(prompt, negative or None): one row of each text tensor},
    #: the text encoders on the CPU (vfeedback/models/speed.py); None: no cache
    text_cache: Optional[dict] = None

    @property
    def unet(self):
        return self.pipe.unet

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def scheduler(self):
        return self.pipe.scheduler

    @property
    def text_encoders(self) -> list:
        encs = [self.pipe.text_encoder]
        if self.family == "sdxl":
            encs.append(self.pipe.text_encoder_2)
        return [e for e in encs if e is not None]

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        s = self.resolution // self.vae_scale_factor
        return (self.unet.config.in_channels, s, s)

    def encode_prompt(self, prompts: Sequence[str], negative: Optional[Sequence[str]] = None, cfg: bool = True) -> Conditioning:
        """Text conditioning through the pipeline's own ``encode_prompt`` (keeps autograd when
        a text-encoder LoRA trains). With the text-embedding cache on (:attr:`text_cache`), rows
        already encoded come from the cache and only new ones run the encoders (on the CPU)."""
        prompts = list(prompts)
        neg = list(negative) if negative is not None else [""] * len(prompts)
        if self.text_cache is not None:
            return self._cached_encode(prompts, neg, cfg)
        return self._encode(prompts, neg, cfg, self.device)

    def _encode(self, prompts: list, neg: list, cfg: bool, dev) -> Conditioning:
        if self.family == "sdxl":
            pe, npe, pooled, npooled = self.pipe.encode_prompt(
                prompt=prompts, device=dev, num_images_per_prompt=1, do_classifier_free_guidance=cfg, negative_prompt=neg
            )
            # SDXL micro-conditioning: (original_size, crop top-left, target_size); we render
            # uncropped at the training resolution, as the pipeline does by default.
            r = self.resolution
            tid = torch.tensor([r, r, 0, 0, r, r], device=dev, dtype=pe.dtype).expand(len(prompts), 6)
            return self._with_image_embeds(Conditioning(pe, npe if cfg else None, pooled, npooled if cfg else None, tid), cfg)
        pe, npe = self.pipe.encode_prompt(prompts, dev, 1, cfg, neg)
        return self._with_image_embeds(Conditioning(pe, npe if cfg else None), cfg)

    _TEXT_FIELDS = ("embeds", "neg_embeds", "pooled", "neg_pooled")

    def _cached_encode(self, prompts: list, neg: list, cfg: bool) -> Conditioning:
        """:meth:`encode_prompt` through :attr:`text_cache`, one entry per (prompt, negative) row
        (the negative only with CFG): CLIP encodes every row on its own (padded to the
        tokenizer's length), so a row's embedding does not depend on the batch it came in, and a
        training batch drawn anew each step still hits the cache row by row. Misses are encoded
        together on the CPU, where the encoders live, and moved to the UNet's device."""
        dev = self.device
        keys = [(p, n if cfg else None) for p, n in zip(prompts, neg)]
        todo = list(dict.fromkeys(k for k in keys if k not in self.text_cache))
        if todo:
            enc_dev = self.text_encoders[0].device
            with torch.no_grad():
                c = self._encode([p for p, _ in todo], [n if n is not None else "" for _, n in todo], cfg, enc_dev)
            for i, k in enumerate(todo):
                row = {f: None if getattr(c, f) is None else getattr(c, f)[i : i + 1].to(dev, copy=True)
                       for f in self._TEXT_FIELDS}
                # a negative's embedding does not depend on its prompt: one copy per negative
                # string is kept (usually one, ""), so the cache holds about one row per prompt
                # (a 3-tuple key: the rows' keys are pairs)
                if k[1] is not None:
                    shared = self.text_cache.setdefault(("negative", k[1], None), row)
                    row["neg_embeds"], row["neg_pooled"] = shared["neg_embeds"], shared["neg_pooled"]
                self.text_cache[k] = row
        rows = [self.text_cache[k] for k in keys]
        cat = {f: None if rows[0][f] is None else torch.cat([r[f] for r in rows]) for f in self._TEXT_FIELDS}
        tid = None
        if self.family == "sdxl":
            r = self.resolution
            tid = torch.tensor([r, r, 0, 0, r, r], device=dev, dtype=cat["embeds"].dtype).expand(len(prompts), 6)
        return self._with_image_embeds(Conditioning(cat["embeds"], cat["neg_embeds"], cat["pooled"], cat["neg_pooled"], tid), cfg)

    def _with_image_embeds(self, cond: Conditioning, cfg: bool) -> Conditioning:
        """Attach the IP-Adapter reference embeddings, one copy per row (the same face for every prompt)."""
        if self.ip_image_embeds is None:
            return cond
        b = cond.embeds.shape[0]
        cond.image_embeds = [pos.expand(b, *pos.shape[1:]) for pos, _ in self.ip_image_embeds]
        cond.neg_image_embeds = [neg.expand(b, *neg.shape[1:]) for _, neg in self.ip_image_embeds] if cfg else None
        return cond

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B,3,H,W) in [0,1] -> scaled latents (for the pre-training loss)."""
        x = images.to(self.device, self.vae.dtype) * 2 - 1
        lat = self.vae.encode(x).latent_dist.sample()
        return lat * self.vae.config.scaling_factor

    def decode(self, latents: torch.Tensor, checkpoint: bool = False) -> torch.Tensor:
        """Scaled latents -> images (B,3,H,W) in [0,1] (float32, whatever the VAE's dtype: the
        reward's input), keeping autograd; optionally with activation checkpointing.

        ``checkpoint``: the whole decode runs under one checkpoint (nothing of it is kept while
        the reward runs forward and backward: only the latents), and inside it the decoder's own
        per-block checkpointing (diffusers' ``Decoder`` with ``gradient_checkpointing``: the
        mid block and each up block) is on, so the backward pass recomputes one block's
        activations at a time instead of the whole decoder's at once. The gradients are the
        same (the recomputation repeats the forward); the peak is measured by
        ``bench/vae_decode_memory.py``."""
        z = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
        if checkpoint and torch.is_grad_enabled():
            out = torch.utils.checkpoint.checkpoint(self._decode_by_blocks, z, use_reentrant=False)
        else:
            out = self.vae.decode(z).sample
        return (out.float() / 2 + 0.5).clamp(0, 1)

    def _decode_by_blocks(self, z: torch.Tensor) -> torch.Tensor:
        """``vae.decode`` with the decoder's per-block checkpointing on, for this call only (the
        outer checkpoint calls it twice: forward, then the backward's rerun, and the flag must be
        on in both). diffusers' ``Decoder`` reads ``gradient_checkpointing`` and calls
        ``_gradient_checkpointing_func(block, ...)`` for its mid block and each up block when grad
        is on; we give it the non-reentrant ``torch.utils.checkpoint`` (what
        ``ModelMixin.enable_gradient_checkpointing`` gives by default)."""
        dec = self.vae.decoder
        before = getattr(dec, "gradient_checkpointing", False), getattr(dec, "_gradient_checkpointing_func", None)
        dec._gradient_checkpointing_func = _checkpoint_block
        dec.gradient_checkpointing = True
        try:
            return self.vae.decode(z).sample
        finally:
            dec.gradient_checkpointing, dec._gradient_checkpointing_func = before


def _checkpoint_block(block, *args):
    return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False)


def _detect_family(folder: Path) -> Optional[str]:
    idx = folder / "model_index.json"
    if not idx.exists():
        return None
    cls = json.loads(idx.read_text()).get("_class_name", "")
    return "sdxl" if "XL" in cls else "sd15"


def model_source(family: str, path: str) -> str:
    """Where ``path`` loads from (a tiny model's folder, a local folder or file, or a hub id),
    after the checks that need no weights: family known and matching, folder a pipeline, hub id
    shaped owner/name. Raises :class:`UserError`. ``validate`` and ``load_model`` both call it."""
    from .tiny import tiny_path

    if family not in FAMILIES:
        raise UserError(f"model.family: {family!r} is not one of {', '.join(FAMILIES)}")
    src = path
    if path.startswith("tiny:"):
        name = path.split(":", 1)[1]
        src = str(tiny_path(name))
        tiny_family = "sdxl" if name.startswith("sdxl") else "sd15"
        if tiny_family != family:
            raise UserError(f"model.family is {family!r} but model.path {path!r} is an {tiny_family} model; set model.family: {tiny_family}")
    p = Path(src)
    if p.is_dir():
        found = _detect_family(p)
        if found is None:
            raise UserError(f"model.path: {src} is a folder without model_index.json; give a diffusers pipeline folder (save_pretrained)")
        if found != family:
            raise UserError(f"model.family is {family!r} but {src} holds an {found} pipeline; set model.family: {found}")
    elif not p.is_file() and (p.exists() or "/" not in src or src.startswith(("/", "./", "../", "~"))
                              or len([x for x in src.split("/") if x]) != 2):
        raise UserError(f"model.path: {src!r}: no such folder or file, and not a hub id (owner/name) nor tiny:sd15 / tiny:sdxl")
    return src


def load_model(
    family: str,
    path: str,
    *,
    resolution: Optional[int] = None,
    dtype: torch.dtype = torch.float32,
    device: Optional[torch.device] = None,
    revision: Optional[str] = None,
    variant: Optional[str] = None,
    attention: str = "auto",
    gradient_checkpointing: bool = False,
    ip_adapter=None,
) -> DiffusionModel:
    """Load an SD1.5 or SDXL pipeline with a DDIM scheduler; weights frozen.

    ``path``: a hub id (``stable-diffusion-v1-5/stable-diffusion-v1-5``), a local diffusers
    folder, a single ``.safetensors``/``.ckpt`` file, or ``tiny:sd15`` / ``tiny:sdxl``.
    ``ip_adapter``: an :class:`~vfeedback.config.IPAdapterConfig` (or the same keys as a dict):
    load the adapter, set its scale and encode the reference face once (see :func:`_load_ip_adapter`).
    """
    import diffusers
    from diffusers import DDIMScheduler

    src = model_source(family, path)
    p = Path(src)
    pipe_cls = getattr(diffusers, PIPELINE_CLASS[family])
    kwargs = dict(dtype=dtype)
    if family == "sd15":
        kwargs.update(safety_checker=None, requires_safety_checker=False)
    try:
        if p.is_file():
            pipe = pipe_cls.from_single_file(str(p), **kwargs)
        else:
            pipe = pipe_cls.from_pretrained(src, revision=revision, variant=variant, **kwargs)
    except UserError:
        raise
    except (OSError, EnvironmentError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"model.path: could not load {src!r} ({first}). Download it first "
            f"(`huggingface-cli download {src}`) or point model.path at a local diffusers folder"
        ) from None
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    for m in (pipe.unet, pipe.vae, *[getattr(pipe, n, None) for n in ("text_encoder", "text_encoder_2")]):
        if m is not None:
            m.requires_grad_(False)
            m.eval()
    if device is not None:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    _set_attention(pipe, attention)
    if gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    if resolution is None:
        resolution = pipe.unet.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    model = DiffusionModel(pipe=pipe, family=family, path=path, resolution=int(resolution))
    if ip_adapter is not None:
        # after _set_attention: it replaces every processor, and diffusers builds the IP-Adapter
        # processors to match the current ones (SDPA or xformers)
        model.ip_image_embeds = _load_ip_adapter(pipe, ip_adapter, family)
    return model


def _load_ip_adapter(pipe, ip, family: str) -> list:
    """``pipe.load_ip_adapter`` + ``set_ip_adapter_scale``; returns the reference embeddings.

    The reference images are encoded once with the pipeline's own
    ``prepare_ip_adapter_image_embeds`` (CLIP image embeds for the basic adapter, penultimate
    hidden states for Plus / full-face, and the matching CFG negatives), then the image encoder
    is dropped: training never re-encodes the fixed reference. Every adapter weight (the
    ``to_k_ip`` / ``to_v_ip`` processors, the image projection) is frozen, so a LoRA added later
    trains alone (peft's to_k / to_v targets do not match to_k_ip / to_v_ip).
    """
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    from .tiny import TINY_IP_WEIGHT, tiny_ip_adapter_path

    ip = ip if isinstance(ip, dict) else ip.model_dump()
    src, subfolder, weight, enc = ip["path"], ip.get("subfolder", "models"), ip.get("weight_name"), ip.get("image_encoder", "image_encoder")
    if src.startswith("tiny:"):
        name = src.split(":", 1)[1]
        if name != family:
            raise UserError(f"model.ip_adapter.path: {src} is for {name} but model.family is {family}; use tiny:{family}")
        src, subfolder, weight, enc = str(tiny_ip_adapter_path(name)), "models", TINY_IP_WEIGHT, "image_encoder"
    # a local image-encoder folder (anywhere) is loaded here; diffusers only looks inside `path`
    local_enc = next((d for d in (Path(enc), Path(src) / subfolder / enc, Path(src) / enc) if (d / "config.json").is_file()), None)
    dev, dtype = pipe.unet.device, pipe.unet.dtype
    try:
        if local_enc is not None and getattr(pipe, "image_encoder", None) is None:
            pipe.register_modules(image_encoder=CLIPVisionModelWithProjection.from_pretrained(local_enc, dtype=dtype).to(dev))
            if getattr(pipe, "feature_extractor", None) is None and (local_enc / "preprocessor_config.json").is_file():
                pipe.register_modules(feature_extractor=CLIPImageProcessor.from_pretrained(local_enc))
        pipe.load_ip_adapter(src, subfolder=subfolder, weight_name=weight, image_encoder_folder=None if local_enc is not None else enc)
    except (OSError, EnvironmentError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"model.ip_adapter: could not load {weight!r} from {src!r} (subfolder {subfolder!r}, image_encoder {enc!r}): {first}") from None
    pipe.set_ip_adapter_scale(float(ip.get("scale", 1.0)))
    refs = []
    for r in ip["reference"]:
        with Image.open(r) as im:
            refs.append(im.convert("RGB"))
    with torch.no_grad():
        # one entry per adapter; a list of images for one adapter gives (1, R, ...) embeddings
        both = pipe.prepare_ip_adapter_image_embeds([refs], None, dev, 1, True)
    embeds = [tuple(t.chunk(2)[::-1]) for t in both]  # diffusers stacks (negative, positive)
    pipe.register_modules(image_encoder=None)
    pipe.unet.requires_grad_(False)  # the new processors / image projection were made trainable
    return [(pos.detach(), neg.detach()) for pos, neg in embeds]


def xformers_usable(device) -> bool:
    import importlib.util

    return torch.device(device).type == "cuda" and importlib.util.find_spec("xformers") is not None


def _set_attention(pipe, attention: str) -> None:
    """``sdpa`` (PyTorch scaled-dot-product attention, diffusers' default), ``xformers`` (CUDA
    only), or ``auto``: xformers when installed and on CUDA, else SDPA."""
    if attention not in ("auto", "sdpa", "xformers"):
        raise UserError(f"model.attention: {attention!r} is not one of auto, sdpa, xformers")
    dev = pipe.unet.device
    if attention == "xformers" and not xformers_usable(dev):
        raise UserError("model.attention: xformers needs CUDA and `pip install 'vfeedback[gpu]'`; use attention: auto or sdpa")
    if attention in ("auto", "xformers") and xformers_usable(dev):
        pipe.enable_xformers_memory_efficient_attention()
        log.info("attention: xformers")
    else:
        from diffusers.models.attention_processor import AttnProcessor2_0

        pipe.unet.set_attn_processor(AttnProcessor2_0())
        pipe.vae.set_attn_processor(AttnProcessor2_0())
