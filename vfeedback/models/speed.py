"""Performance switches (issue #21 "Fast on a GPU"): each one leaves what a run computes unchanged
(to floating-point tolerance; tests/test_speed_switches.py compares each with the switch off on
the tiny models) and only changes how fast or in how much memory it is computed.

``model.compile``
    Regional ``torch.compile``: the UNet's repeated blocks are compiled in place, not the whole
    UNet, so compile time stays small (the PyTorch recipe "Reducing torch.compile cold start
    compilation time with regional compilation"). diffusers >= 0.35 names the repeated block of a
    model class in ``_repeated_blocks`` (``UNet2DConditionModel``: ``BasicTransformerBlock``) and
    ``ModelMixin.compile_repeated_blocks`` compiles each with ``nn.Module.compile``; where a UNet
    class names none, its down / mid / up blocks are compiled instead. ``nn.Module.compile``
    compiles the module's ``__call__`` in place, so parameter names (peft's LoRA keys, checkpoints,
    the export) do not change, unlike the ``OptimizedModule`` wrapper of ``torch.compile(module)``
    (whose state-dict keys gain ``_orig_mod.``). The backend is inductor;
    ``VFEEDBACK_COMPILE_BACKEND`` (e.g. ``aot_eager``) picks another (tests, debugging).
``model.channels_last``
    UNet and VAE weights in ``torch.channels_last``; cuDNN's convolutions are faster in NHWC, and
    a convolution with channels-last weights returns channels-last activations, so the format
    propagates through the network without copies.
``model.fuse_qkv``
    diffusers' fused attention projections (``Attention.fuse_projections`` +
    ``FusedAttnProcessor2_0``): one matmul for q, k, v (self-attention) or k, v (cross-attention)
    instead of three / two. The fused layer is a *copy* of the base weights, and the fused
    processor never calls ``to_q`` / ``to_k`` / ``to_v`` again, so a LoRA (or a trainable weight)
    on a projection it replaces would be silently dropped. We fuse only the attention modules
    where that cannot happen (see :func:`fuse_qkv_projections`), log which, and never a LoRA.
``model.cache_text_embeddings``
    Each (prompt, negative) pair is encoded once; the text encoders then live on the CPU (their
    accelerator memory is freed) and only a new prompt runs them there. The cache keeps one
    embedding per distinct prompt on the accelerator (SDXL: 77 x 2048 values, about 0.3 MB in
    bf16; one copy per distinct negative). Refused while a text-encoder LoRA trains (the
    embeddings would change under the cache).
``train.optimizer``
    ``adamw`` (torch.optim.AdamW) or ``adamw8bit`` (bitsandbytes' ``AdamW8bit``: 8-bit optimizer
    states, a quarter of AdamW's state memory); see :func:`make_optimizer`.
"""
from __future__ import annotations

import logging
import os
from typing import Iterable, Optional

import torch

from ..errors import UserError

log = logging.getLogger(__name__)

#: the ModelConfig field names of the switches, in the order they are applied
SWITCHES = ("compile", "channels_last", "fuse_qkv", "cache_text_embeddings")
OPTIMIZERS = ("adamw", "adamw8bit")
COMPILE_BACKEND_ENV = "VFEEDBACK_COMPILE_BACKEND"
#: dynamo's per-function graph limit while a UNet is compiled regionally (its default is 8): every
#: block instance runs the one ``BasicTransformerBlock.forward``, and a ReFL run alone needs a graph
#: per channel width and layout (SD1.5: 4), each with grad off and on, then again for another batch
#: size; past the limit dynamo runs the block eagerly from then on (a warning, no error), so the
#: switch would stop working in the first training step (tests/test_speed_switches.py)
RECOMPILE_LIMIT = 64


def apply_speed_switches(model, *, compile: bool = False, channels_last: bool = False, fuse_qkv: bool = False,
                         cache_text_embeddings: bool = False, lora_text_encoder: bool = False) -> None:
    """Apply the switches that are on to ``model`` (a :class:`~vfeedback.models.loader.DiffusionModel`),
    in place. Call it after the LoRA is added and the frozen weights are cast to their dtype, and
    before ``accelerate.prepare``: fusion must see which projections carry a LoRA, and the
    compiled blocks must hold the final modules. ``lora_text_encoder``: whether a text-encoder
    LoRA trains (``model.lora.text_encoder``), which ``cache_text_embeddings`` refuses."""
    if cache_text_embeddings and lora_text_encoder:
        raise UserError("model.cache_text_embeddings: the text encoders train (model.lora.text_encoder: true), so their "
                        "embeddings change every step and cannot be cached; set one of the two to false")
    # fusion first: it replaces processors and adds the fused layers, which channels_last and
    # compile then see
    if fuse_qkv:
        fuse_qkv_projections(model)
    if channels_last:
        for mod in (model.unet, model.vae):
            mod.to(memory_format=torch.channels_last)
        log.info("channels_last: UNet and VAE weights in NHWC")
    if cache_text_embeddings:
        enable_text_cache(model)
    if compile:
        compile_unet(model.unet)


# ---------------------------------------------------------------------------- compile
def compile_unet(unet, backend: Optional[str] = None) -> list[str]:
    """Regional compilation of ``unet`` in place; returns the names of the compiled modules.

    ``backend``: a ``torch.compile`` backend; default ``$VFEEDBACK_COMPILE_BACKEND`` or inductor.
    Parameters stay where they are (``nn.Module.compile`` swaps only the module's call), so the
    LoRA layers inside the blocks train as before and gradients flow through the compiled graphs
    (AOTAutograd builds the backward)."""
    backend = backend or os.environ.get(COMPILE_BACKEND_ENV) or "inductor"
    import torch._dynamo

    # the limit is process-wide: raised, never lowered (another compiled model may need more)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    repeated = set(getattr(type(unet), "_repeated_blocks", None) or ())
    if repeated:
        # what ModelMixin.compile_repeated_blocks does, keeping the names for the log
        names = [n for n, m in unet.named_modules() if type(m).__name__ in repeated]
        unet.compile_repeated_blocks(backend=backend)
        what = f"{len(names)} {'/'.join(sorted(repeated))} blocks"
    else:
        names = [f"down_blocks.{i}" for i in range(len(unet.down_blocks))]
        names += ["mid_block"] if getattr(unet, "mid_block", None) is not None else []
        names += [f"up_blocks.{i}" for i in range(len(unet.up_blocks))]
        for n in names:
            unet.get_submodule(n).compile(backend=backend)
        what = "the down / mid / up blocks"
    log.info("compile: %s of the UNet (torch.compile backend %s; the first steps are slow while they compile)", what, backend)
    return names


# ---------------------------------------------------------------------------- fused q/k/v
def _replaced(attn) -> tuple[str, ...]:
    """The projections ``FusedAttnProcessor2_0`` stops calling: q, k, v of a self-attention,
    k, v of a cross-attention (it still calls ``to_q`` and ``to_out`` there)."""
    return ("to_k", "to_v") if attn.is_cross_attention else ("to_q", "to_k", "to_v")


def _untouchable(layer) -> bool:
    """A projection that must keep being called: it carries a LoRA (peft wraps it in a tuner
    layer) or any trainable parameter (full fine-tuning)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(layer, BaseTunerLayer) or any(p.requires_grad for p in layer.parameters())


def fuse_qkv_projections(model) -> dict[str, list[str]]:
    """Fuse the q/k/v projections of every attention module of the UNet and the VAE that can be
    fused without losing anything (the LoRA-aware
    counterpart of diffusers' ``fuse_qkv_projections``); returns ``{"fused": [...], "kept": [...]}`` (module names
    prefixed ``unet.`` / ``vae.``).

    A module is fused only when (1) it runs PyTorch SDPA (``AttnProcessor2_0``: not xformers, not
    an IP-Adapter or added-KV processor, which ``FusedAttnProcessor2_0`` would replace by
    something else) and (2) none of the projections the fused processor replaces carries a LoRA
    or a trainable weight. diffusers' own ``UNet2DConditionModel.fuse_qkv_projections`` fuses
    every module regardless, which with the default LoRA targets (to_q, to_k, to_v, to_out.0)
    would train a LoRA that the forward pass never calls. With those defaults only the VAE's
    attention and, in cross-attention, nothing of the UNet is fused; with LoRA targets that
    leave the projections alone (e.g. ``[to_out.0, ff.net.2]``) the UNet's attention is fused too.
    """
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0, FusedAttnProcessor2_0

    fused, kept = [], []
    for prefix, net in (("unet", model.unet), ("vae", model.vae)):
        for name, mod in net.named_modules():
            if not isinstance(mod, Attention):
                continue
            full = f"{prefix}.{name}"
            if type(mod.processor) is not AttnProcessor2_0 or any(_untouchable(getattr(mod, p)) for p in _replaced(mod)):
                kept.append(full)
                continue
            mod.fuse_projections(fuse=True)
            # diffusers builds the fused layer as a fresh nn.Linear (trainable by default); the
            # weights it copies are frozen, so is the copy (no gradient buffers, not in any optimizer)
            for p in ("to_qkv", "to_kv"):
                if getattr(mod, p, None) is not None:
                    getattr(mod, p).requires_grad_(False)
            mod.set_processor(FusedAttnProcessor2_0())
            fused.append(full)
    log.info("fuse_qkv: fused %d attention modules%s; %d kept unfused (a LoRA or trainable weight on q/k/v, "
             "or a non-SDPA processor)%s", len(fused), f" ({_summary(fused)})" if fused else "", len(kept),
             f" ({_summary(kept)})" if kept else "")
    return {"fused": fused, "kept": kept}


def _summary(names: list[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (f", ... {len(names) - n} more" if len(names) > n else "")


# ---------------------------------------------------------------------------- text embeddings
def enable_text_cache(model) -> None:
    """Turn on the prompt-embedding cache of :meth:`DiffusionModel.encode_prompt` and move the
    text encoders to the CPU (they run there on a cache miss; the result moves to the UNet's
    device). Their dtype is kept, so a cached embedding equals what the encoder computes."""
    model.text_cache = {}
    for enc in model.text_encoders:
        enc.to("cpu")
    log.info("cache_text_embeddings: text encoders on the CPU; each prompt is encoded once")


# ---------------------------------------------------------------------------- optimizer
def bitsandbytes_missing() -> Optional[str]:
    """The message of a :class:`UserError` for ``train.optimizer: adamw8bit`` when bitsandbytes is
    not installed (a cheap look-up, no import), else None."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        return ("train.optimizer: adamw8bit needs bitsandbytes, which is not installed; `pip install bitsandbytes` "
                "(or `pip install 'vfeedback[gpu]'`), or use train.optimizer: adamw")
    return None


def make_optimizer(params: Iterable[torch.nn.Parameter], name: str, *, lr: float, betas, eps: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    """The optimizer ``train.optimizer`` names over ``params``: ``adamw`` (``torch.optim.AdamW``)
    or ``adamw8bit`` (``bitsandbytes.optim.AdamW8bit``, the same update with 8-bit blockwise
    quantised moments; bitsandbytes keeps tensors under 4096 elements in 32-bit). Raises
    :class:`UserError` for an unknown name or a missing bitsandbytes."""
    betas = tuple(betas)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "adamw8bit":
        msg = bitsandbytes_missing()
        if msg:
            raise UserError(msg)
        try:
            import bitsandbytes as bnb
        except Exception as e:  # installed but broken (no matching native library, ...)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"train.optimizer: adamw8bit: bitsandbytes does not import ({first}); reinstall it or use "
                            "train.optimizer: adamw") from None
        return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    raise UserError(f"train.optimizer: {name!r} is not one of {', '.join(OPTIMIZERS)}")
