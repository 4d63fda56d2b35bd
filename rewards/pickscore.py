"""PickScore v1 (Kirstain et al., 2023; github.com/yuvalkirstain/PickScore).

A CLIP-H fine-tuned on Pick-a-Pic preferences, loaded with transformers' ``CLIPModel`` from
``yuvalkirstain/PickScore_v1``; the processor (tokenizer + image processor) is the one of
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``. The reference computes
``logit_scale.exp() * (normalised text_embs @ normalised image_embs.T)``, typically 18-24; this
scorer does the same with the image processor's resize / crop / normalisation in torch.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _hub
from .base import Reward, RewardError, register
from .clip import _TextCache
from .preprocess import TorchPreprocess, spec_from_hf_image_processor


def load_hf_clip(model: str, processor: str, device: torch.device, dtype: torch.dtype, what: str):
    """``(CLIPModel, processor)`` from hub ids or local folders (as written by ``save_pretrained``)."""
    from transformers import AutoProcessor, CLIPModel

    hint = (
        f"Without a network, download {model} and {processor} elsewhere "
        f"(`hf download {model}`) and pass model=/local/folder processor=/local/folder"
    )
    with _hub.load_errors(what, hint):
        proc = AutoProcessor.from_pretrained(processor)
        net = CLIPModel.from_pretrained(model, dtype=dtype)
    return net.to(device).eval().requires_grad_(False), proc


@register(
    "pickscore",
    differentiable=True,
    requires=("transformers",),
    description="PickScore v1: logit_scale x cosine of a preference-tuned CLIP-H (transformers), ~18-24",
)
class PickScore(Reward):
    """PickScore of each (image, prompt).

    Options: ``model`` (hub id or folder, default ``yuvalkirstain/PickScore_v1``), ``processor``
    (default ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``), ``device``, ``dtype``.
    """

    needs_prompt = True

    def __init__(self, model: str = "yuvalkirstain/PickScore_v1", processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", device: Optional[str] = None, dtype: Optional[str] = None):
        super().__init__()
        dev = _hub.parse_device(device)
        self._dtype = _hub.parse_dtype(dtype, dev)
        self.model, self.processor = load_hf_clip(model, processor, dev, self._dtype, "pickscore")
        try:
            self.preprocess = TorchPreprocess(spec_from_hf_image_processor(self.processor))
        except ValueError as e:
            raise RewardError(f"pickscore: {e}") from None
        self._text = _TextCache()

    def _encode_text(self, prompts: list[str]) -> torch.Tensor:
        tok = self.processor.tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt").to(self.device)
        out = self.model.text_model(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"])
        t = self.model.text_projection(out.pooler_output).float()
        return t / t.norm(dim=-1, keepdim=True)

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(images.to(self.device), dtype=self._dtype)
        out = self.model.vision_model(pixel_values=x)
        e = self.model.visual_projection(out.pooler_output).float()
        return e / e.norm(dim=-1, keepdim=True)

    def forward(self, images, prompts=None, **context):
        if prompts is None:
            raise RewardError("pickscore: needs a prompt per image (pass prompts=... or --prompt)")
        if len(prompts) != images.shape[0]:
            raise RewardError(f"pickscore: {len(prompts)} prompts for {images.shape[0]} images")
        img = self.image_embeddings(images)
        txt = self._text.get(list(prompts), self._encode_text).to(img.device)
        scale = self.model.logit_scale.exp().float()
        return (scale * (img * txt).sum(-1)).to(images.device)
