"""LoRA through peft, saved and loaded in diffusers' format.

``save_lora`` writes ``pytorch_lora_weights.safetensors`` with the LoRA config as metadata, via
the pipeline class's own ``save_lora_weights``, so ``pipe.load_lora_weights(folder)`` of
diffusers restores it (alpha included).

Every tensor is written under its peft name (``unet.<module>.lora_A.weight``,
``text_encoder.<module>.lora_B.weight``, ``text_encoder_2.…``), one key style for the whole
file. We do not pass the state through ``diffusers.utils.convert_state_dict_to_diffusers``:
that renames only the attention projections (``to_q.lora_A`` -> ``to_q.lora.down``, its
``PEFT_TO_DIFFUSERS`` table) and leaves every other target (convs, feed-forward, time
embedding) in peft style, and diffusers' ``load_lora_adapter`` decides from the *first* key
alone whether to convert, so one of the two halves of such a mixed file is silently dropped.
A file of peft keys is taken as is by the UNet loader (its first key holds ``lora_A``) and by
the text-encoder loader (whose diffusers -> peft conversion leaves peft keys unchanged).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
ADAPTER = "default"


def add_lora(model, rank: int = 4, alpha: Optional[float] = None, target_modules: Optional[Sequence[str]] = None,
             text_encoder: bool = False, dropout: float = 0.0) -> list[torch.nn.Parameter]:
    """Add a LoRA adapter to the UNet (and the text encoders when asked); return trainable params.

    The LoRA ``B`` matrices start at zero (peft's default), so the untrained adapter leaves the
    model's output unchanged, as in the diffusers training examples.
    """
    from peft import LoraConfig

    alpha = float(rank if alpha is None else alpha)
    ucfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights=True,
                      target_modules=list(target_modules or UNET_TARGETS))
    model.unet.add_adapter(ucfg, adapter_name=ADAPTER)
    if text_encoder:
        tcfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights=True, target_modules=TEXT_TARGETS)
        from peft import inject_adapter_in_model

        for enc in model.text_encoders:
            # peft directly (what diffusers' UNet add_adapter does too): transformers' own
            # add_adapter demands a newer peft than the one released
            inject_adapter_in_model(tcfg, enc, adapter_name=ADAPTER)
            enc.peft_config = {ADAPTER: tcfg}
    params = []
    for m in [model.unet, *(model.text_encoders if text_encoder else [])]:
        for n, p in m.named_parameters():
            if "lora_" in n:
                p.requires_grad_(True)
                params.append(p)
    return params


def _peft_state(module) -> dict:
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(module, adapter_name=ADAPTER)


def lora_state_dict(model, text_encoder: bool = False) -> dict[str, torch.Tensor]:
    """peft-format LoRA tensors of the UNet (prefix ``unet.``) and text encoders, on CPU."""
    out = {f"unet.{k}": v.detach().cpu().clone() for k, v in _peft_state(model.unet).items()}
    if text_encoder:
        for i, enc in enumerate(model.text_encoders):
            out.update({f"te{i}.{k}": v.detach().cpu().clone() for k, v in _peft_state(enc).items()})
    return out


def save_lora(model, folder, text_encoder: bool = False, unwrap=lambda m: m) -> Path:
    """Write ``folder/pytorch_lora_weights.safetensors`` in diffusers' LoRA format (peft keys,
    see the module docstring), with each model's ``LoraConfig`` (rank, alpha, targets) as
    metadata; a stock ``pipe.load_lora_weights(folder)`` restores every tensor."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    unet = unwrap(model.unet)
    kwargs = dict(
        unet_lora_layers=_export_state(unet),
        unet_lora_adapter_metadata=unet.peft_config[ADAPTER].to_dict(),
        safe_serialization=True,
    )
    if text_encoder:
        encs = [unwrap(e) for e in model.text_encoders]
        kwargs["text_encoder_lora_layers"] = _export_state(encs[0])
        kwargs["text_encoder_lora_adapter_metadata"] = encs[0].peft_config[ADAPTER].to_dict()
        if len(encs) > 1:
            kwargs["text_encoder_2_lora_layers"] = _export_state(encs[1])
            kwargs["text_encoder_2_lora_adapter_metadata"] = encs[1].peft_config[ADAPTER].to_dict()
    type(model.pipe).save_lora_weights(folder, **kwargs)
    return folder / "pytorch_lora_weights.safetensors"


def _export_state(module) -> dict[str, torch.Tensor]:
    """peft-named LoRA tensors of one model, detached, contiguous, on CPU (safetensors needs all
    three); every key holds ``lora_A`` or ``lora_B`` (checked: a mixed file is what broke)."""
    sd = {k: v.detach().cpu().contiguous() for k, v in _peft_state(module).items()}
    odd = [k for k in sd if ".lora_A." not in k and ".lora_B." not in k]
    if odd:
        raise RuntimeError(f"save_lora: unexpected LoRA tensor names {odd[:3]} (expected peft lora_A / lora_B)")
    return sd


def load_lora_into(model, folder) -> None:
    """Load a saved LoRA folder into ``model.pipe`` with diffusers' ``load_lora_weights``.

    A LoRA made for another architecture raises a clear ``UserError``.
    """
    from ..errors import UserError

    folder = Path(folder)
    f = folder / "pytorch_lora_weights.safetensors" if folder.is_dir() else folder
    if not f.exists():
        raise UserError(f"--lora: {f} does not exist (expected a folder holding pytorch_lora_weights.safetensors)")
    try:
        model.pipe.load_lora_weights(str(f.parent), weight_name=f.name)
    except (ValueError, RuntimeError, KeyError) as e:
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise UserError(f"--lora: {f} does not fit this {model.family} model ({msg}); was it trained on another architecture?") from None
