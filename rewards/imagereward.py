"""ImageReward v1.0 (Xu et al., 2023; github.com/THUDM/ImageReward) through the ``image-reward`` package.

The model is BLIP (ViT-L visual encoder + a BERT text encoder cross-attending to the image) with
an MLP head on the ``[CLS]`` feature, standardised with the constants the package ships
(``mean=0.16717...``, ``std=1.03333...``). The package's ``score`` / ``inference_rank`` read PIL
images; its ``score_gard`` is the differentiable path used by ReFL. This scorer follows
``score_gard``: ``visual_encoder -> text_encoder(prompt ids, encoder_hidden_states=image) ->
[CLS] -> mlp -> (r - mean) / std``, with the package's transform (Resize 224 bicubic, CenterCrop
224, CLIP normalisation) done in torch. Prompts are tokenised as the package does
(``padding='max_length', truncation=True, max_length=35``).
"""
from __future__ import annotations

import inspect
import os
from typing import Optional

import torch

from . import _hub
from .base import Reward, RewardError, register
from .preprocess import OPENAI_MEAN, OPENAI_STD, PreprocessSpec, TorchPreprocess


@register(
    "imagereward",
    differentiable=True,
    requires=("ImageReward",),
    # why no extra installs it, and how to get it elsewhere (`vfeedback rewards`, validate and train say this)
    install=("image-reward 1.5 (the latest) pins timm==0.6.13 while open_clip_torch 3.x needs timm>=1.0.17, "
             "imports transformers.modeling_utils.apply_chunking_to_forward (removed in transformers 5), and imports the "
             "OpenAI `clip` package it does not declare; so it is not in any extra. In a separate environment with "
             "transformers<5: pip install image-reward git+https://github.com/openai/CLIP.git"),
    description="ImageReward v1.0 (BLIP + MLP human-preference model, image-reward package; not installable beside "
                "transformers 5 / open_clip 3, see `vfeedback rewards`), ~-2..2",
)
class ImageRewardScore(Reward):
    """ImageReward of each (image, prompt), differentiable like the package's ``score_gard``.

    Options: ``model`` (``ImageReward-v1.0`` or a local ``ImageReward.pt``), ``med_config`` (a
    local ``med_config.json``, needed offline), ``download_root``, ``device``, ``dtype``.
    """

    needs_prompt = True

    def __init__(self, model: str = "ImageReward-v1.0", med_config: Optional[str] = None, download_root: Optional[str] = None, device: Optional[str] = None, dtype: Optional[str] = None):
        super().__init__()
        import ImageReward as RM

        dev = _hub.parse_device(device)
        self._dtype = _hub.parse_dtype(dtype, dev)
        if model not in RM.available_models() and not os.path.isfile(model):
            raise RewardError(f"imagereward: {model!r} is neither one of {RM.available_models()} nor a local checkpoint file")
        kwargs = {"device": str(dev), "download_root": download_root}
        if med_config is not None:
            if "med_config" not in inspect.signature(RM.load).parameters:
                raise RewardError("imagereward: this image-reward version has no med_config option; upgrade it (pip install -U image-reward)")
            kwargs["med_config"] = med_config
        hint = (
            "Without a network, download THUDM/ImageReward's ImageReward.pt and med_config.json and "
            "bert-base-uncased's tokenizer elsewhere, then pass model=/path/ImageReward.pt med_config=/path/med_config.json "
            "(with HF_HOME pointing at a cache that holds bert-base-uncased)"
        )
        with _hub.load_errors("imagereward", hint):
            ir = RM.load(model, **kwargs)
        ir = ir.to(dev).eval().requires_grad_(False)
        ir.blip.to(self._dtype)
        ir.mlp.float()
        ir.device = dev  # the package reads self.device in its own methods
        self.ir = ir
        self.preprocess = TorchPreprocess(PreprocessSpec(size=(224, 224), mean=OPENAI_MEAN, std=OPENAI_STD, resize_mode="shortest"))

    def forward(self, images, prompts=None, **context):
        if prompts is None:
            raise RewardError("imagereward: needs a prompt per image (pass prompts=... or --prompt)")
        if len(prompts) != images.shape[0]:
            raise RewardError(f"imagereward: {len(prompts)} prompts for {images.shape[0]} images")
        dev = self.device
        tok = self.ir.blip.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=35, return_tensors="pt").to(dev)
        x = self.preprocess(images.to(dev), dtype=self._dtype)
        image_embeds = self.ir.blip.visual_encoder(x)
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=dev)
        out = self.ir.blip.text_encoder(
            tok.input_ids,
            attention_mask=tok.attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
            return_dict=True,
        )
        feats = out.last_hidden_state[:, 0, :].float()
        r = self.ir.mlp(feats).squeeze(-1)
        return ((r - self.ir.mean) / self.ir.std).to(images.device)
