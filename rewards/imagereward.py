"""ImageReward v1.0 (Xu et al., 2023; github.com/THUDM/ImageReward) on transformers' BLIP.

Why not the ``image-reward`` package itself: version 1.5 (the latest) pins ``timm==0.6.13``
(open_clip_torch 3 needs ``timm>=1.0.17``), imports ``apply_chunking_to_forward`` from
``transformers.modeling_utils`` (gone in transformers 5) and imports OpenAI's ``clip``, so it
cannot live in this environment. Its model is BLIP's, which transformers ships: the ViT-L/16
visual encoder is ``BlipVisionModel`` (the same ``qkv`` / ``proj`` / ``norm`` layout) and the
BERT text encoder with cross-attention to the image is ``BlipTextModel`` (the same key names as
BLIP's ``med.py``). This module maps the package's checkpoint (``ImageReward.pt`` +
``med_config.json``, unchanged) onto those two and keeps the package's MLP head, then scores as
its ``score_gard`` / ``score`` do (``ImageReward/ImageReward.py`` lines 84-137 of image-reward
1.5): ``visual_encoder -> text_encoder(prompt ids, encoder_hidden_states=image) -> [CLS] ->
mlp -> (r - mean) / std``.

Checked against the package: ``tests/test_imagereward_reference.py`` scores seeded random
checkpoints in the real format (ImageReward's ViT-L/16, ``slow``; the package's ViT class at
width 64, CI) with this module and compares with the scores image-reward 1.5 itself gives
(recorded by ``bench/imagereward_reference.py`` in a separate environment,
``make imagereward-ref-venv``): equal to float32 rounding on the same pixels; on images that
must be resized the package's PIL uint8 resize and our float one differ slightly (README).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from . import _hub
from .base import Reward, RewardError, register
from .preprocess import OPENAI_MEAN, OPENAI_STD, PreprocessSpec, TorchPreprocess

log = logging.getLogger(__name__)

REPO = "THUDM/ImageReward"


def package_cache() -> Path:
    """Where the image-reward package downloads ``ImageReward.pt`` (``ImageReward/utils.py`` line 65)."""
    return Path.home() / ".cache" / "ImageReward"

# ImageReward/ImageReward.py lines 80-81: the reward is standardised with these
MEAN = 0.16717362830052426
STD = 1.0333394966054072
# ImageReward/ImageReward.py line 110: the package's tokenisation
MAX_LENGTH = 35
# ImageReward/ImageReward.py line 76: BLIP_Pretrain(image_size=224, vit='large'); BLIP/blip.py
# lines 33-38: ViT-L/16 (width 1024, depth 24, 16 heads); BLIP/vit.py: mlp_ratio 4, qkv_bias True,
# LayerNorm eps 1e-6 (line 138), exact GELU (nn.GELU)
VIT_LARGE = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                 image_size=224, patch_size=16, hidden_act="gelu", layer_norm_eps=1e-6)
# ImageReward/ImageReward.py lines 45-58: Linear layers at these indices of `mlp.layers` (Dropouts between)
_MLP_LINEARS = (0, 2, 4, 6, 7)


def vision_config(**overrides):
    """The ``BlipVisionConfig`` of ImageReward's visual encoder (BLIP ViT-L/16 at 224); ``overrides``
    (e.g. ``hidden_size``, ``num_hidden_layers``) serve checkpoints with a smaller ViT (tests)."""
    from transformers import BlipVisionConfig

    return BlipVisionConfig(**{**VIT_LARGE, **overrides})


def text_config(med: Mapping[str, Any], encoder_width: int = VIT_LARGE["hidden_size"]):
    """The ``BlipTextConfig`` equal to BLIP's ``med_config.json`` as ``BLIP_Pretrain`` uses it.

    ``encoder_hidden_size`` is the ViT width (``blip_pretrain.py`` line 36 sets ``encoder_width``
    to it whatever the file says); ``is_decoder=True`` only makes transformers build the
    cross-attention layers (med.py builds them for ``add_cross_attention``); scoring calls the
    model with ``is_decoder=False``: bidirectional self-attention, as ImageReward's ``mode``
    ``'multimodal'``. Raises :class:`RewardError` on a config this mapping does not cover.
    """
    from transformers import BlipTextConfig

    if not med.get("add_cross_attention", False):
        raise RewardError("imagereward: med_config has no add_cross_attention=true; it is not ImageReward's BLIP text encoder config")
    pos = med.get("position_embedding_type", "absolute")
    if pos != "absolute":
        raise RewardError(f"imagereward: med_config position_embedding_type {pos!r} is not supported (only 'absolute', as ImageReward's)")
    try:
        return BlipTextConfig(
            vocab_size=int(med["vocab_size"]), hidden_size=int(med["hidden_size"]), encoder_hidden_size=int(encoder_width),
            intermediate_size=int(med["intermediate_size"]), num_hidden_layers=int(med["num_hidden_layers"]),
            num_attention_heads=int(med["num_attention_heads"]), max_position_embeddings=int(med["max_position_embeddings"]),
            hidden_act=str(med.get("hidden_act", "gelu")), layer_norm_eps=float(med.get("layer_norm_eps", 1e-12)),
            pad_token_id=int(med.get("pad_token_id", 0)), hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
            bos_token_id=None, sep_token_id=None, eos_token_id=None, is_decoder=True,
        )
    except KeyError as e:
        raise RewardError(f"imagereward: med_config lacks {e.args[0]!r}; pass ImageReward's med_config.json") from None


def _vision_key(k: str) -> str:
    """BLIP ``vit.py`` key (without ``blip.visual_encoder.``) -> ``BlipVisionModel`` key."""
    fixed = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
             "patch_embed.proj.weight": "embeddings.patch_embedding.weight", "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
             "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}
    if k in fixed:
        return fixed[k]
    if k.startswith("blocks."):
        _, i, rest = k.split(".", 2)
        for a, b in (("norm1.", "layer_norm1."), ("norm2.", "layer_norm2."), ("attn.qkv.", "self_attn.qkv."),
                     ("attn.proj.", "self_attn.projection."), ("mlp.fc1.", "mlp.fc1."), ("mlp.fc2.", "mlp.fc2.")):
            if rest.startswith(a):
                return f"encoder.layers.{i}.{b}{rest[len(a):]}"
    raise KeyError(k)


def split_state_dict(sd: Mapping[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """ImageReward's state dict -> ``(BlipVisionModel, BlipTextModel, mlp)`` state dicts.

    Dropped: ``blip.vision_proj`` / ``blip.text_proj`` (BLIP's contrastive heads, unused by the
    reward) and med.py's ``position_ids`` buffer. Any other key this mapping does not know raises
    :class:`RewardError` (the package loads with ``strict=False``, ``utils.py`` line 79, which
    would leave a missing layer randomly initialised; we refuse instead: our choice).
    """
    vis, txt, mlp, unknown = {}, {}, {}, []
    for k, v in sd.items():
        if k.startswith("blip.visual_encoder."):
            try:
                vis[_vision_key(k[len("blip.visual_encoder."):])] = v
            except KeyError:
                unknown.append(k)
        elif k.startswith("blip.text_encoder."):
            if not k.endswith("embeddings.position_ids"):
                txt[k[len("blip.text_encoder."):]] = v
        elif k.startswith("mlp.layers."):
            mlp[k[len("mlp.layers."):]] = v
        elif not k.startswith(("blip.vision_proj.", "blip.text_proj.")):
            unknown.append(k)
    if unknown:
        raise RewardError(f"imagereward: the checkpoint has keys ImageReward's model does not: {unknown[:3]}; is it ImageReward.pt?")
    return vis, txt, mlp


def _mlp_head(width: int) -> nn.Sequential:
    # ImageReward/ImageReward.py lines 45-58 (Linear 768-1024-128-64-16-1, no activations)
    return nn.Sequential(nn.Linear(width, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                         nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def load_tokenizer(name_or_path: str):
    """BLIP's tokenizer: ``bert-base-uncased`` plus the ``[DEC]`` / ``[ENC]`` tokens (``BLIP/blip.py`` lines 16-21)."""
    from transformers import BertTokenizer

    tok = BertTokenizer.from_pretrained(name_or_path)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


@register(
    "imagereward",
    differentiable=True,
    requires=("transformers",),
    description="ImageReward v1.0 (BLIP ViT-L + BERT cross-attention + MLP human-preference model) on transformers' BLIP, "
                "THUDM/ImageReward's ImageReward.pt unchanged; scores equal image-reward 1.5's (tests/test_imagereward_reference.py), ~-2..2",
)
class ImageRewardScore(Reward):
    """ImageReward of each (image, prompt), differentiable like the package's ``score_gard``.

    Options: ``model`` (``ImageReward-v1.0``: ``THUDM/ImageReward``'s ``ImageReward.pt``, from
    ``~/.cache/ImageReward`` where the package downloads it, else the Hugging Face hub; or a local
    ``ImageReward.pt``, or a folder holding it), ``med_config`` (default: ``med_config.json``
    beside the checkpoint, else the hub's), ``tokenizer`` (hub id or folder, default
    ``bert-base-uncased``), ``device``, ``dtype``.
    """

    needs_prompt = True

    def __init__(self, model: str = "ImageReward-v1.0", med_config: Optional[str] = None, tokenizer: str = "bert-base-uncased",
                 device: Optional[str] = None, dtype: Optional[str] = None):
        super().__init__()
        spec = model
        if model == "ImageReward-v1.0":  # the package's download folder (utils.py line 65), else the hub
            spec = str(package_cache()) if (package_cache() / "ImageReward.pt").is_file() else f"hf-hub:{REPO}/ImageReward.pt"
        ckpt = _hub.resolve_file(spec, default=spec, filename="ImageReward.pt", what="imagereward", option="model")
        if med_config is None:
            beside = Path(ckpt).parent / "med_config.json"
            med_config = str(beside) if beside.is_file() else f"hf-hub:{REPO}/med_config.json"
        med_path = _hub.resolve_file(med_config, default=med_config, filename="med_config.json", what="imagereward", option="med_config")
        try:
            med = json.loads(Path(med_path).read_text())
        except (OSError, ValueError) as e:
            raise RewardError(f"imagereward: med_config {med_path} is not readable JSON ({e})") from None
        hint = ("Without a network, download bert-base-uncased's tokenizer elsewhere (`hf download bert-base-uncased vocab.txt "
                "tokenizer_config.json`) and pass tokenizer=/local/folder")
        with _hub.load_errors("imagereward", hint):
            tok = load_tokenizer(tokenizer)
        self._build(_hub.load_state_dict(ckpt, "imagereward"), med, tok, device, dtype)

    @classmethod
    def from_parts(cls, state_dict: Mapping[str, torch.Tensor], med_config: Mapping[str, Any], tokenizer, device: Optional[str] = None,
                   dtype: Optional[str] = None, vision: Optional[Mapping[str, Any]] = None) -> "ImageRewardScore":
        """The scorer from an in-memory ImageReward state dict, parsed ``med_config.json`` and
        tokenizer; ``vision``: :func:`vision_config` overrides for a checkpoint with a smaller ViT."""
        self = cls.__new__(cls)
        Reward.__init__(self)
        self._build(state_dict, med_config, tokenizer, device, dtype, vision)
        return self

    def _build(self, sd, med, tok, device, dtype, vision=None) -> None:
        from transformers import BlipTextModel, BlipVisionModel

        dev = _hub.parse_device(device)
        self._dtype = _hub.parse_dtype(dtype, dev)
        vis_sd, txt_sd, mlp_sd = split_state_dict(sd)
        vcfg = vision_config(**dict(vision or {}))
        with torch.device("meta"):  # no throw-away random init (300 M parameters at full size): every one is assigned below
            self.vision = BlipVisionModel(vcfg)
            self.text = BlipTextModel(text_config(med, vcfg.hidden_size), add_pooling_layer=False)
        self.mlp = _mlp_head(self.text.config.hidden_size)
        for what, mod, part in (("visual encoder", self.vision, vis_sd), ("text encoder", self.text, txt_sd), ("mlp head", self.mlp, mlp_sd)):
            try:
                mod.load_state_dict(part, strict=True, assign=True)
            except RuntimeError as e:
                raise RewardError(f"imagereward: the checkpoint's {what} does not fit ImageReward's architecture "
                                  f"(with this med_config): {_hub._short(e)}") from None
        # the text embeddings' position_ids is a non-persistent buffer (in no state dict): made again here
        emb = self.text.embeddings
        emb.register_buffer("position_ids", torch.arange(emb.position_embeddings.num_embeddings).expand((1, -1)), persistent=False)
        left = [n for n, t in (*self.named_parameters(), *self.named_buffers()) if t.is_meta]
        if left:  # a transformers version with more state outside the state dict
            raise RewardError(f"imagereward: {left[:3]} not set from the checkpoint (transformers {_transformers_version()})")
        self.vision.to(dev, self._dtype)
        self.text.to(dev, self._dtype)
        self.mlp.to(dev, torch.float32)  # the package scores in float32 after `.float()` (ImageReward.py line 133)
        self.eval().requires_grad_(False)
        self.tokenizer = tok
        # ImageReward/ImageReward.py lines 30-37: Resize(224, BICUBIC) on the short side, CenterCrop(224), CLIP normalisation
        self.preprocess = TorchPreprocess(PreprocessSpec(size=(224, 224), mean=OPENAI_MEAN, std=OPENAI_STD, resize_mode="shortest"))

    def tokenize(self, prompts) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)``, each ``(B, 35)``, as ImageReward.py line 110 tokenises."""
        t = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
        return t["input_ids"].to(self.device), t["attention_mask"].to(self.device)

    def score_pixels(self, pixel_values: torch.Tensor, prompts) -> torch.Tensor:
        """Rewards ``(B,)`` of already-normalised ``(B, 3, 224, 224)`` pixels (the package's ``score_gard`` input)."""
        ids, mask = self.tokenize(prompts)
        image_embeds = self.vision(pixel_values=pixel_values.to(self.device, self._dtype)).last_hidden_state
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
        out = self.text(input_ids=ids, attention_mask=mask, encoder_hidden_states=image_embeds,
                        encoder_attention_mask=image_atts, is_decoder=False)
        feats = out.last_hidden_state[:, 0, :].float()
        return ((self.mlp(feats) - MEAN) / STD).squeeze(-1)

    def forward(self, images, prompts=None, **context):
        if prompts is None:
            raise RewardError("imagereward: needs a prompt per image (pass prompts=... or --prompt)")
        if len(prompts) != images.shape[0]:
            raise RewardError(f"imagereward: {len(prompts)} prompts for {images.shape[0]} images")
        x = self.preprocess(images.to(self.device), dtype=self._dtype)
        return self.score_pixels(x, prompts).to(images.device)
