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

import logging
from pathlib import Path
from typing import Optional, Sequence

import torch

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
ADAPTER = "default"
log = logging.getLogger(__name__)


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


#: the two diffusers-style names an old vfeedback export (before one key style) mixed with peft's
_OLD_STYLE = {".lora.down.": ".lora_A.", ".lora.up.": ".lora_B.",
              ".lora_linear_layer.down.": ".lora_A.", ".lora_linear_layer.up.": ".lora_B."}


def _adapters(pipe) -> dict:
    """{component name: set of adapter names} of the pipeline's LoRA-capable models."""
    out = {}
    for name in ("unet", "text_encoder", "text_encoder_2"):
        mod = getattr(pipe, name, None)
        if mod is not None:
            out[name] = set(getattr(mod, "peft_config", {}) or {})
    return out


def load_lora_into(model, folder) -> None:
    """Load a saved LoRA folder into ``model.pipe`` with diffusers' ``load_lora_weights``, and
    check the pipeline took every tensor of the file.

    A file written by vfeedback before its export used one key style (attention projections
    renamed ``lora.down/up``, the rest ``lora_A/B``: diffusers silently skipped one half) is
    renamed to peft's names in a temp copy, metadata (alpha) kept, and loaded whole.
    A LoRA made for another architecture, or one the pipeline cannot hold whole, raises a
    clear ``UserError``.
    """
    import tempfile

    from safetensors import safe_open
    from safetensors.torch import save_file

    from ..errors import UserError

    folder = Path(folder)
    f = folder / "pytorch_lora_weights.safetensors" if folder.is_dir() else folder
    if not f.exists():
        raise UserError(f"--lora: {f} does not exist (expected a folder holding pytorch_lora_weights.safetensors)")
    with safe_open(str(f), "pt") as sf:
        keys, meta = list(sf.keys()), sf.metadata()
        old = [k for k in keys if any(o in k for o in _OLD_STYLE)]
        sd = {k: sf.get_tensor(k) for k in keys} if old else None
    before = _adapters(model.pipe)
    with tempfile.TemporaryDirectory(prefix="vf-lora-") as tmp:
        src = f
        if old:
            log.warning("--lora: %s mixes two key styles (a vfeedback export from before the fix); loading a copy with "
                        "peft names so that all %d tensors load", f, len(keys))
            ren = {}
            for k, v in sd.items():
                for o, n in _OLD_STYLE.items():
                    k = k.replace(o, n)
                ren[k] = v
            src = Path(tmp) / f.name
            save_file(ren, str(src), metadata=meta)
        try:
            model.pipe.load_lora_weights(str(src.parent), weight_name=src.name)
        except (ValueError, RuntimeError, KeyError) as e:
            msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise UserError(f"--lora: {f} does not fit this {model.family} model ({msg}); was it trained on another architecture?") from None
    from peft.utils import get_peft_model_state_dict

    held = 0
    for name, names in _adapters(model.pipe).items():
        for new in names - before.get(name, set()):
            held += len(get_peft_model_state_dict(getattr(model.pipe, name), adapter_name=new))
    if held != len(keys):
        raise UserError(f"--lora: after loading {f} ({len(keys)} LoRA tensors) the {model.family} pipeline holds {held}; "
                        f"the file does not match this model (another architecture or target modules?)")
