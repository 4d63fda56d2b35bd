"""LAION "improved aesthetic predictor" (Schuhmann, github.com/christophschuhmann/improved-aesthetic-predictor).

A linear stack ``768 -> 1024 -> 128 -> 64 -> 16 -> 1`` (dropouts between, no activations, as in
the reference ``simple_inference.py``) applied to the L2-normalised CLIP ViT-L/14 (OpenAI) image
embedding. The published ``sac+logos+ava1-l14-linearMSE.pth`` is a plain state dict with keys
``layers.0.weight`` ... ``layers.7.bias``; scores land roughly in ``[1, 10]`` (AVA scale).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import _hub
from .base import RewardError, register
from .clip import OpenClipScorer, _is_path_like

DEFAULT_WEIGHTS = "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/sac+logos+ava1-l14-linearMSE.pth"


class AestheticMLP(nn.Module):
    """The reference head; module indices match the published state dict (``layers.{0,2,4,6,7}``)."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def load_head(path: str) -> AestheticMLP:
    """Read the head from ``.pth`` (``weights_only=True``) or ``.safetensors``; input size from the weights."""
    sd = _hub.load_state_dict(path, "aesthetic")
    if "layers.0.weight" not in sd:
        keys = ", ".join(list(sd)[:5])
        raise RewardError(f"aesthetic: {path} is not an aesthetic-predictor state dict (expected layers.0.weight ..., found {keys})")
    head = AestheticMLP(int(sd["layers.0.weight"].shape[1]))
    try:
        head.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise RewardError(f"aesthetic: {path} does not fit the 768-1024-128-64-16-1 head: {str(e).splitlines()[0]}") from None
    return head


@register(
    "aesthetic",
    differentiable=True,
    requires=("open_clip",),
    description="LAION improved aesthetic predictor (MLP on CLIP ViT-L/14 image embeddings), ~1-10",
)
class Aesthetic(OpenClipScorer):
    """Aesthetic score of each image (prompts ignored).

    Options: ``weights`` (the head: local ``.pth``/``.safetensors``, ``hf-hub:org/repo/file`` or URL;
    default the published LAION file), ``clip_model`` / ``clip_pretrained`` (the embedding model,
    default ``ViT-L-14`` / ``openai``; the head only fits a 768-d embedding), ``device``, ``dtype``.
    """

    needs_prompt = False

    def __init__(self, weights: Optional[str] = None, clip_model: str = "ViT-L-14", clip_pretrained: Optional[str] = "openai", device: Optional[str] = None, dtype: Optional[str] = None):
        also = ""
        if clip_pretrained and not _is_path_like(clip_pretrained):
            also = (f"; aesthetic also needs the CLIP {clip_model} / {clip_pretrained} image encoder: "
                    + _hub.open_clip_download_hint(clip_model, clip_pretrained).replace("instead of the tag", "as clip_pretrained= instead of the tag"))
        try:
            path = _hub.resolve_file(weights, default=DEFAULT_WEIGHTS, what="aesthetic", option="weights")
        except RewardError as e:
            raise RewardError(f"{e}{also}") from None
        head = load_head(path)
        super().__init__(clip_model, clip_pretrained, device, dtype, what="aesthetic", option="clip_pretrained")
        dim = self.model.visual.output_dim if hasattr(self.model.visual, "output_dim") else None
        if dim is not None and dim != head.input_size:
            raise RewardError(f"aesthetic: the head takes {head.input_size}-d embeddings but {clip_model} gives {dim}-d; use clip_model=ViT-L-14")
        # the head is tiny: keep it in float32 for precision whatever the CLIP dtype
        self.head = head.to(self.device).eval().requires_grad_(False)

    def forward(self, images, prompts=None, **context):
        emb = self.image_embeddings(images)
        return self.head(emb).squeeze(-1).to(images.device)
