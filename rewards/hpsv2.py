"""Human Preference Score v2 / v2.1 (Wu et al., 2023; github.com/tgxs002/HPSv2).

An OpenCLIP ViT-H-14 fine-tuned on human preferences. The reference ``hpsv2/img_score.py``
builds ViT-H-14, loads ``checkpoint['state_dict']`` from ``xswu/HPSv2`` (``HPS_v2_compressed.pt``
or ``HPS_v2.1_compressed.pt``), preprocesses with ``image_transform(..., resize_longest_max=True)``
(resize the long side to 224, pad with black) and scores ``diag(image_features @ text_features.T)``
of the normalised features: a plain cosine, typically 0.2-0.35. This scorer does the same with
torch preprocessing and keeps that scale.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

from . import _hub
from .base import RewardError, register
from .clip import OpenClipScorer
from .preprocess import TorchPreprocess

HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"2.0": "HPS_v2_compressed.pt", "2.1": "HPS_v2.1_compressed.pt"}


@register(
    "hpsv2",
    differentiable=True,
    requires=("open_clip",),
    description="Human Preference Score v2/v2.1 (open_clip ViT-H-14 + HPS checkpoint), cosine ~0.2-0.35",
)
class HPSv2(OpenClipScorer):
    """HPS v2 score ``cos(image, prompt)`` of the HPS-tuned ViT-H-14.

    Options: ``version`` (``2.1`` default, or ``2.0``), ``checkpoint`` (local file, or
    ``hf-hub:xswu/HPSv2/<file>``; default downloads the version's file), ``model`` (open_clip
    architecture; ViT-H-14 for the real checkpoints), ``device``, ``dtype``.
    """

    def __init__(self, version: str = "2.1", checkpoint: Optional[str] = None, model: str = "ViT-H-14", device: Optional[str] = None, dtype: Optional[str] = None):
        v = str(version).lstrip("v")
        if v not in HPS_FILES:
            raise RewardError(f"hpsv2: version must be 2.0 or 2.1, got {version!r}")
        fname = HPS_FILES[v]
        path = _hub.resolve_file(checkpoint, default=f"hf-hub:{HPS_REPO}/{fname}", filename=fname, what="hpsv2", option="checkpoint")
        # open_clip's load_checkpoint reads {'state_dict': ...} with weights_only=True, strictly
        super().__init__(model, path, device, dtype, what="hpsv2", option="checkpoint")
        self.version = v
        # HPSv2 pads to a square instead of cropping (its ResizeMaxSize)
        self.preprocess = TorchPreprocess(replace(self.preprocess.spec, resize_mode="longest", fill=0.0))

    def forward(self, images, prompts=None, **context):
        return self.cosine(images, prompts).to(images.device)
