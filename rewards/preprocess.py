"""Differentiable image preprocessing shared by every model-backed scorer: torchvision's
``transforms.v2`` (Resize with antialias, CenterCrop, Pad, Normalize) on tensors, driven by a
spec read from each library's own config.

Scorers receive ``(B, 3, H, W)`` in ``[0, 1]`` and must resize, crop and normalise with torch
ops so gradients reach the pixels; ``transforms.v2`` on a float tensor is exactly that. The
reference pipelines do the same with PIL:

- open_clip ``image_transform`` (``resize_mode='shortest'``): ``Resize(size, BICUBIC)`` on the
  short side, ``CenterCrop``, ``ToTensor``, ``Normalize`` (also what OpenAI CLIP, ImageReward and
  the LAION aesthetic predictor use); ``'longest'``: resize the long side and pad (HPSv2's
  ``ResizeMaxSize``); ``'squash'``: resize both sides.
- transformers image processors (``CLIPImageProcessor``: ``shortest_edge`` + ``crop_size``;
  ``BlipImageProcessor``: ``height``/``width``).

Antialiased bicubic resizing uses the same separable kernel as PIL's ``BICUBIC`` (a = -0.5,
support scaled on downsampling), so results agree with the PIL pipelines to within uint8
rounding; ``tests/test_rewards_library.py`` checks that on photos, and that gradients flow.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import nn

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

_RESIZE_MODES = ("shortest", "longest", "squash")


def _pair(x: Union[int, Sequence[int]]) -> tuple[int, int]:
    if isinstance(x, int):
        return (x, x)
    x = tuple(int(v) for v in x)
    return (x[0], x[0]) if len(x) == 1 else (x[0], x[1])


@dataclass(frozen=True)
class PreprocessSpec:
    """What a model expects.

    ``size``: final ``(H, W)`` fed to the model. ``resize_mode``: ``shortest`` (scale the short
    side to ``resize_to``, then centre-crop to ``size``), ``longest`` (scale the long side to fit
    ``size``, then pad with ``fill``) or ``squash`` (resize to ``size``). ``resize_to`` defaults to
    ``min(size)`` (it differs from the crop when a processor resizes to 256 and crops 224).
    ``crop_rounding``: ``round`` (torchvision) or ``floor`` (transformers' ``center_crop``).
    """

    size: tuple[int, int] = (224, 224)
    mean: tuple[float, ...] = OPENAI_MEAN
    std: tuple[float, ...] = OPENAI_STD
    resize_mode: str = "shortest"
    resize_to: Optional[int] = None
    interpolation: str = "bicubic"
    fill: float = 0.0
    crop: bool = True
    crop_rounding: str = "round"

    def __post_init__(self):
        if self.resize_mode not in _RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {_RESIZE_MODES}, got {self.resize_mode!r}")


def _interp(name: str):
    from torchvision.transforms.v2 import InterpolationMode

    return InterpolationMode.BILINEAR if name == "bilinear" else InterpolationMode.BICUBIC


def _resize(x: torch.Tensor, size, interpolation: str) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as TF

    y = TF.resize(x, list(size), interpolation=_interp(interpolation), antialias=True)
    # PIL clamps to the uint8 range; bicubic overshoot would otherwise reach the model
    return y if y is x else y.clamp(0.0, 1.0)


def resize_shortest(x: torch.Tensor, short: int, interpolation: str = "bicubic") -> torch.Tensor:
    """Scale so the short side is ``short`` (torchvision ``Resize(short)``: long side ``int(short * long / short_side)``)."""
    return _resize(x, [short], interpolation)


def resize_longest(x: torch.Tensor, size: tuple[int, int], interpolation: str = "bicubic") -> torch.Tensor:
    """Scale so the image fits in ``size`` keeping its aspect (open_clip ``ResizeKeepRatio(longest=1)``)."""
    h, w = x.shape[-2:]
    ratio = max(h / size[0], w / size[1])
    return _resize(x, (round(h / ratio), round(w / ratio)), interpolation)


def center_crop_or_pad(x: torch.Tensor, size: tuple[int, int], fill: float = 0.0, rounding: str = "round") -> torch.Tensor:
    """Centre crop to ``size``, padding with ``fill`` first where the image is smaller
    (torchvision ``CenterCrop`` / open_clip ``CenterCropOrPad``). ``rounding="floor"`` places
    the crop as transformers' ``center_crop`` does (``(h - th) // 2``)."""
    from torchvision.transforms.v2 import functional as TF

    th, tw = size
    h, w = x.shape[-2:]
    if th > h or tw > w:
        pad = [(tw - w) // 2 if tw > w else 0, (th - h) // 2 if th > h else 0,
               (tw - w + 1) // 2 if tw > w else 0, (th - h + 1) // 2 if th > h else 0]  # left, top, right, bottom
        x = TF.pad(x, pad, fill=fill)
        h, w = x.shape[-2:]
    if (h, w) == (th, tw):
        return x
    if rounding == "floor":
        return TF.crop(x, (h - th) // 2, (w - tw) // 2, th, tw)
    return TF.center_crop(x, [th, tw])


def preprocess(images: torch.Tensor, spec: PreprocessSpec, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``(B, 3, H, W)`` in ``[0, 1]`` -> normalised ``(B, 3, *spec.size)``, differentiable.

    Resizing runs in float32 (antialiased bicubic is not implemented for every half type);
    the result is cast to ``dtype`` (default: the input's dtype).
    """
    from torchvision.transforms.v2 import functional as TF

    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
    out_dtype = dtype or (images.dtype if images.is_floating_point() else torch.float32)
    x = images.float()
    if spec.resize_mode == "shortest":
        x = resize_shortest(x, spec.resize_to or min(spec.size), spec.interpolation)
        if spec.crop:
            x = center_crop_or_pad(x, spec.size, spec.fill, spec.crop_rounding)
    elif spec.resize_mode == "longest":
        x = resize_longest(x, spec.size, spec.interpolation)
        x = center_crop_or_pad(x, spec.size, spec.fill, spec.crop_rounding)
    else:
        x = _resize(x, spec.size, spec.interpolation)
    return TF.normalize(x, list(spec.mean), list(spec.std)).to(out_dtype)


class TorchPreprocess(nn.Module):
    """``nn.Module`` wrapper of :func:`preprocess` holding a :class:`PreprocessSpec`."""

    def __init__(self, spec: PreprocessSpec):
        super().__init__()
        self.spec = spec

    def forward(self, images: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        return preprocess(images, self.spec, dtype)

    def extra_repr(self) -> str:
        return repr(self.spec)


# --------------------------------------------------------------------------------------------
# specs read from the libraries' own configs


def spec_from_open_clip(model) -> PreprocessSpec:
    """The spec equal to open_clip's inference transform for ``model`` (``model.visual.preprocess_cfg``)."""
    cfg = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    size = _pair(cfg.get("size", getattr(model.visual, "image_size", 224)))
    mean = cfg.get("mean") or OPENAI_MEAN
    std = cfg.get("std") or OPENAI_STD
    mean = tuple(mean) if isinstance(mean, (list, tuple)) else (float(mean),) * 3
    std = tuple(std) if isinstance(std, (list, tuple)) else (float(std),) * 3
    interp = cfg.get("interpolation") or "bicubic"
    mode = cfg.get("resize_mode") or "shortest"
    fill = float(cfg.get("fill_color", 0) or 0) / 255.0
    return PreprocessSpec(size=size, mean=mean, std=std, resize_mode=mode, interpolation="bilinear" if interp == "bilinear" else "bicubic", fill=fill)


def spec_from_hf_image_processor(proc) -> PreprocessSpec:
    """The spec equal to a transformers image processor of the CLIP / BLIP / SigLIP kind.

    Supports ``size={"shortest_edge": n}`` (+ optional ``crop_size``) and
    ``size={"height": h, "width": w}``. Processors that tile or pick a resolution per image
    (LLaVA-NeXT, Qwen2-VL, Idefics) are refused with ``ValueError``.
    """
    if hasattr(proc, "image_processor"):
        proc = proc.image_processor
    size = getattr(proc, "size", None) or {}
    if not isinstance(size, dict):
        size = {"shortest_edge": size} if isinstance(size, int) else dict(size)
    mean = tuple(float(v) for v in (getattr(proc, "image_mean", None) or OPENAI_MEAN))
    std = tuple(float(v) for v in (getattr(proc, "image_std", None) or OPENAI_STD))
    if getattr(proc, "do_normalize", True) is False:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    resample = getattr(proc, "resample", 3)
    resample = getattr(resample, "value", resample)
    interp = "bilinear" if resample in (2, "bilinear") else "bicubic"
    for attr in ("image_grid_pinpoints", "max_pixels", "do_image_splitting"):
        if getattr(proc, attr, None):
            raise ValueError(f"{type(proc).__name__} picks a resolution or tiles per image ({attr}); not supported by the torch preprocessing")
    do_crop = bool(getattr(proc, "do_center_crop", False))
    crop = getattr(proc, "crop_size", None)
    if crop is not None and not isinstance(crop, dict):
        crop = {"height": crop, "width": crop} if isinstance(crop, int) else dict(crop)
    if "shortest_edge" in size and size["shortest_edge"]:
        short = int(size["shortest_edge"])
        if do_crop and crop:
            out = (int(crop["height"]), int(crop["width"]))
            return PreprocessSpec(size=out, mean=mean, std=std, resize_mode="shortest", resize_to=short, interpolation=interp, crop=True, crop_rounding="floor")
        raise ValueError(f"{type(proc).__name__}: shortest_edge resize without a centre crop gives a size per image; not supported")
    if "height" in size and "width" in size:
        out = (int(size["height"]), int(size["width"]))
        if do_crop and crop:
            # resize to (h, w) then crop
            spec = PreprocessSpec(size=(int(crop["height"]), int(crop["width"])), mean=mean, std=std, resize_mode="squash", interpolation=interp)
            if (int(crop["height"]), int(crop["width"])) != out:
                raise ValueError(f"{type(proc).__name__}: resize to {out} then crop to a different size is not supported")
            return spec
        return PreprocessSpec(size=out, mean=mean, std=std, resize_mode="squash", interpolation=interp, crop=False)
    raise ValueError(f"{type(proc).__name__}: unsupported size setting {size!r}")


__all__ = [
    "OPENAI_MEAN",
    "OPENAI_STD",
    "PreprocessSpec",
    "TorchPreprocess",
    "center_crop_or_pad",
    "preprocess",
    "resize_longest",
    "resize_shortest",
    "spec_from_hf_image_processor",
    "spec_from_open_clip",
]
