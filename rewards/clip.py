"""CLIP score with any open_clip model, and the open_clip loader the other CLIP-based scorers share.

CLIP score follows torchmetrics' ``CLIPScore`` (Hessel et al., 2021): ``max(100 * cos(E_I, E_T), 0)``
with both embeddings L2-normalised; ``raw=True`` returns the cosine itself (in ``[-1, 1]``).
Images go through :mod:`rewards.preprocess` built from the model's own open_clip preprocess
config, so the score matches open_clip's PIL pipeline and is differentiable in the pixels.
"""
from __future__ import annotations

import logging
import threading
from typing import Optional, Sequence

import torch
from torch import nn

from . import _hub
from .base import Reward, RewardError, register
from .preprocess import TorchPreprocess, spec_from_open_clip

log = logging.getLogger(__name__)

_BACKBONES: dict[tuple, tuple] = {}
_BACKBONE_LOCK = threading.Lock()


def load_open_clip(model: str, pretrained: Optional[str], device: torch.device, dtype: torch.dtype, what: str, option: str = "pretrained"):
    """``(model, tokenizer)`` for an open_clip model, frozen, in eval mode, cached per arguments.

    ``model``: an open_clip architecture name (``ViT-L-14``), ``hf-hub:org/repo`` or
    ``local-dir:/folder``. ``pretrained``: a tag (``openai``), a local checkpoint file, or
    ``hf-hub:org/repo/file``; the file is read by open_clip's own ``load_checkpoint``
    (safetensors, or ``torch.load(weights_only=True)``).
    """
    key = (model, pretrained, str(device), str(dtype))
    with _BACKBONE_LOCK:
        if key in _BACKBONES:
            return _BACKBONES[key]
    import open_clip

    if pretrained and (pretrained.startswith(_hub.HF_PREFIX) or pretrained.startswith(("http://", "https://"))):
        pretrained = _hub.resolve_file(pretrained, default=pretrained, what=what, option=option)
    schema = model.startswith(("hf-hub:", "local-dir:"))
    name = model if schema else model.replace("/", "-")
    if schema:
        pretrained = None  # the weights come with the hub repo / folder
    if not schema and name not in open_clip.list_models():
        raise RewardError(f"{what}: unknown open_clip model {model!r}; see open_clip.list_models() (e.g. ViT-L-14, ViT-H-14, ViT-B-32)")
    tags = [] if schema else open_clip.list_pretrained_tags_by_model(name)
    if pretrained and not _is_path_like(pretrained) and pretrained not in tags:
        raise RewardError(f"{what}: {pretrained!r} is neither a pretrained tag of {name} ({', '.join(tags) or 'none'}) nor an existing file")
    if pretrained and _is_path_like(pretrained):
        pretrained = _hub.resolve_file(pretrained, default=pretrained, what=what, option=option)
    if pretrained and not _is_path_like(pretrained):
        hint = f"The weights for {model} / {pretrained} could not be loaded; without a network, fetch them elsewhere: " + \
            _hub.open_clip_download_hint(name, pretrained).replace("instead of the tag", f"as {option}= instead of the tag")
    else:
        hint = (f"The weights for {model} / {pretrained} could not be loaded; pass {option}=/path/to/checkpoint "
                "(open_clip format, .safetensors or .bin/.pt)")
    with _hub.load_errors(what, hint):
        net = open_clip.create_model(name, pretrained=pretrained or None, device="cpu", require_pretrained=bool(pretrained))
        tokenizer = open_clip.get_tokenizer(name)
    net = net.to(device=device, dtype=dtype).eval().requires_grad_(False)
    with _BACKBONE_LOCK:
        _BACKBONES[key] = (net, tokenizer)
    return net, tokenizer


def _is_path_like(s: str) -> bool:
    import os

    return os.sep in s or "/" in s or s.endswith((".pt", ".pth", ".bin", ".safetensors")) or os.path.exists(s)


class _TextCache:
    """Normalised text embeddings per prompt: prompts repeat across a training run."""

    def __init__(self, limit: int = 4096):
        self.limit = limit
        self.store: dict[str, torch.Tensor] = {}

    def get(self, prompts: Sequence[str], encode) -> torch.Tensor:
        missing = list(dict.fromkeys(p for p in prompts if p not in self.store))
        if missing:
            with torch.no_grad():
                emb = encode(missing)
            if len(self.store) + len(missing) > self.limit:
                self.store.clear()
            for p, e in zip(missing, emb):
                self.store[p] = e
        return torch.stack([self.store[p] for p in prompts])


class OpenClipScorer(Reward):
    """Base of the scorers that compare an open_clip image embedding with a text embedding."""

    needs_prompt = True

    def __init__(self, model: str, pretrained: Optional[str], device=None, dtype=None, what: str = "clip", option: str = "pretrained"):
        super().__init__()
        dev = _hub.parse_device(device)
        dt = _hub.parse_dtype(dtype, dev)
        self.model, self.tokenizer = load_open_clip(model, pretrained, dev, dt, what, option)
        self.preprocess = TorchPreprocess(spec_from_open_clip(self.model))
        self._text = _TextCache()
        self._dtype = dt

    def _encode_text(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts).to(self.device)
        t = self.model.encode_text(tokens).float()
        return t / t.norm(dim=-1, keepdim=True)

    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts -> L2-normalised float32 text embeddings ``(B, D)`` (no cache, with grad off)."""
        with torch.no_grad():
            return self._encode_text(list(prompts))

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """``(B,3,H,W)`` in ``[0,1]`` -> L2-normalised float32 embeddings ``(B, D)``."""
        x = self.preprocess(images.to(self.device), dtype=self._dtype)
        e = self.model.encode_image(x).float()
        return e / e.norm(dim=-1, keepdim=True)

    def cosine(self, images: torch.Tensor, prompts: Optional[Sequence[str]]) -> torch.Tensor:
        if prompts is None:
            raise RewardError(f"{self.name}: needs a prompt per image (pass prompts=... or --prompt)")
        if len(prompts) != images.shape[0]:
            raise RewardError(f"{self.name}: {len(prompts)} prompts for {images.shape[0]} images")
        img = self.image_embeddings(images)
        txt = self._text.get(list(prompts), self._encode_text).to(img.device)
        return (img * txt).sum(-1)


@register(
    "clip",
    differentiable=True,
    requires=("open_clip",),
    description="CLIP score: 100 x cosine(image, prompt) clamped at 0, any open_clip model (default ViT-L-14/openai)",
)
class ClipScore(OpenClipScorer):
    """CLIP score (torchmetrics ``CLIPScore`` scale): ``max(100 * cos, 0)``, or ``cos`` with ``raw=True``.

    Options: ``model`` (open_clip name, ``hf-hub:`` or ``local-dir:``), ``pretrained`` (tag, local
    file or ``hf-hub:org/repo/file``), ``device``, ``dtype``, ``raw``.
    """

    def __init__(self, model: str = "ViT-L-14", pretrained: Optional[str] = "openai", device: Optional[str] = None, dtype: Optional[str] = None, raw: bool = False):
        super().__init__(model, pretrained, device, dtype, what="clip")
        self.raw = bool(raw)

    def forward(self, images, prompts=None, **context):
        cos = self.cosine(images, prompts)
        out = cos if self.raw else (100.0 * cos).clamp_min(0.0)
        return out.to(images.device)
