"""A seeded ImageReward checkpoint in the package's real format, and fixed inputs, for the
equivalence check of ``rewards/imagereward.py`` against the ``image-reward`` package.

Imports only torch (and numpy / PIL at call time), so it runs unchanged in vfeedback's
environment and in the separate one that holds image-reward 1.5 (``make imagereward-ref-venv``);
both draw the same tensors from the same seed with the same torch build (2.14.1 CPU generator).

Two checkpoints, both with a smaller BERT (``MED_CONFIG``: 2 layers, intermediate 256, a
64-token vocabulary; the width stays 768, ``MLP(768)`` at ``ImageReward.py`` line 78 needs it):

- ``large``: ImageReward's own visual encoder, the ViT-L/16 that ``ImageReward.py`` line 76
  hard-codes (``vit='large'``); 316 M parameters, minutes on a CPU (the ``slow`` tests).
- ``small``: the package's ``VisionTransformer`` class at width 64, depth 2, 4 heads; the
  reference script builds it by replacing ``blip_pretrain.create_vit`` (sizes only; every class
  and method that runs is the package's). Seconds on a CPU (the CI test).

The key lists are written here from the package's source; ``bench/imagereward_reference.py``
checks they equal the package model's ``state_dict()`` key for key and shape for shape.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

SEED = 20231
# BLIP/blip.py lines 33-38 (large, as ImageReward.py line 76 asks); small: our shrink (module docstring)
VITS = {"large": {"embed_dim": 1024, "depth": 24, "num_heads": 16}, "small": {"embed_dim": 64, "depth": 2, "num_heads": 4}}
# BLIP's med_config.json fields, shrunk where the package allows it (see module docstring)
MED_CONFIG = {
    "architectures": ["BertModel"],
    "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1,
    "hidden_size": 768,
    "initializer_range": 0.02,
    "intermediate_size": 256,
    "layer_norm_eps": 1e-12,
    "max_position_embeddings": 64,
    "model_type": "bert",
    "num_attention_heads": 12,
    "num_hidden_layers": 2,
    "pad_token_id": 0,
    "type_vocab_size": 2,
    "vocab_size": 64,
    "encoder_width": 768,  # BLIP's file says 768; blip_pretrain.py line 36 overwrites it with the ViT width
    "add_cross_attention": True,
}
# a WordPiece vocabulary (bert-base-uncased's special tokens at its ids 0..4 order) + BLIP's
# [DEC] / [ENC] appended by the tokenizer (ids 62, 63 < vocab_size 64)
VOCAB = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ",", ".", "!", "-", "a", "an", "the", "of", "in", "on", "at",
          "with", "and", "cat", "dog", "red", "blue", "green", "photo", "painting", "portrait", "castle", "sky", "sunset",
          "over", "mountain", "lake", "tree", "house", "old", "man", "woman", "city", "night", "light", "oil", "detailed",
          "high", "quality", "4", "##k", "##s", "##ing", "##ed", "fly", "bird", "sea", "beach", "snow", "forest", "moon",
          "star", "flower", "field", "road"])
PROMPTS = [
    "a photo of a cat",
    "An oil painting of an old castle at sunset, detailed, high quality, 4k",
    "red birds flying over the sea",
    "a portrait of a woman with a blue flower",
    "zebra unicorn",  # out of vocabulary: [UNK]s
    # longer than 35 tokens: truncated (ImageReward.py line 110)
    "a dog and a cat in a field with a tree and a house on a road in the city at night with the moon and stars over a lake and a mountain",
]
# (height, width): square 224 (no resize in either pipeline), then shapes the bicubic resize and the crop act on
IMAGE_SIZES = [(224, 224), (224, 224), (224, 224), (256, 320), (300, 224), (480, 360)]


def _vit_keys(vit: str) -> list[tuple[str, tuple[int, ...]]]:
    """``blip.visual_encoder.*`` (BLIP/vit.py lines 140-157; patch 16, image 224, mlp_ratio 4)."""
    d, depth, n = VITS[vit]["embed_dim"], VITS[vit]["depth"], (224 // 16) ** 2
    keys = [("cls_token", (1, 1, d)), ("pos_embed", (1, n + 1, d)),
            ("patch_embed.proj.weight", (d, 3, 16, 16)), ("patch_embed.proj.bias", (d,))]
    for i in range(depth):
        b = f"blocks.{i}."
        keys += [(b + "norm1.weight", (d,)), (b + "norm1.bias", (d,)),
                 (b + "attn.qkv.weight", (3 * d, d)), (b + "attn.qkv.bias", (3 * d,)),
                 (b + "attn.proj.weight", (d, d)), (b + "attn.proj.bias", (d,)),
                 (b + "norm2.weight", (d,)), (b + "norm2.bias", (d,)),
                 (b + "mlp.fc1.weight", (4 * d, d)), (b + "mlp.fc1.bias", (4 * d,)),
                 (b + "mlp.fc2.weight", (d, 4 * d)), (b + "mlp.fc2.bias", (d,))]
    keys += [("norm.weight", (d,)), ("norm.bias", (d,))]
    return [("blip.visual_encoder." + k, s) for k, s in keys]


def _bert_keys(med: dict, vit: str) -> list[tuple[str, tuple[int, ...]]]:
    """``blip.text_encoder.*`` (BLIP/med.py: BertEmbeddings without token types, BertLayer with
    crossattention from the ViT width (blip_pretrain.py line 36), no pooler: line 37)."""
    h, ff, enc = med["hidden_size"], med["intermediate_size"], VITS[vit]["embed_dim"]
    keys = [("embeddings.word_embeddings.weight", (med["vocab_size"], h)),
            ("embeddings.position_embeddings.weight", (med["max_position_embeddings"], h)),
            ("embeddings.LayerNorm.weight", (h,)), ("embeddings.LayerNorm.bias", (h,))]
    for i in range(med["num_hidden_layers"]):
        b = f"encoder.layer.{i}."
        for att, kv in (("attention", h), ("crossattention", enc)):
            keys += [(f"{b}{att}.self.query.weight", (h, h)), (f"{b}{att}.self.query.bias", (h,)),
                     (f"{b}{att}.self.key.weight", (h, kv)), (f"{b}{att}.self.key.bias", (h,)),
                     (f"{b}{att}.self.value.weight", (h, kv)), (f"{b}{att}.self.value.bias", (h,)),
                     (f"{b}{att}.output.dense.weight", (h, h)), (f"{b}{att}.output.dense.bias", (h,)),
                     (f"{b}{att}.output.LayerNorm.weight", (h,)), (f"{b}{att}.output.LayerNorm.bias", (h,))]
        keys += [(b + "intermediate.dense.weight", (ff, h)), (b + "intermediate.dense.bias", (ff,)),
                 (b + "output.dense.weight", (h, ff)), (b + "output.dense.bias", (h,)),
                 (b + "output.LayerNorm.weight", (h,)), (b + "output.LayerNorm.bias", (h,))]
    return [("blip.text_encoder." + k, s) for k, s in keys]


def _head_keys(med: dict, vit: str) -> list[tuple[str, tuple[int, ...]]]:
    """BLIP's contrastive projections (blip_pretrain.py lines 41-42, embed_dim 256) and
    ImageReward's MLP (ImageReward.py lines 45-58: Linear at indices 0, 2, 4, 6, 7)."""
    keys = [("blip.vision_proj.weight", (256, VITS[vit]["embed_dim"])), ("blip.vision_proj.bias", (256,)),
            ("blip.text_proj.weight", (256, med["hidden_size"])), ("blip.text_proj.bias", (256,))]
    dims = [med["hidden_size"], 1024, 128, 64, 16, 1]
    for idx, (i, o) in zip((0, 2, 4, 6, 7), zip(dims[:-1], dims[1:])):
        keys += [(f"mlp.layers.{idx}.weight", (o, i)), (f"mlp.layers.{idx}.bias", (o,))]
    return keys


def state_dict_shapes(vit: str, med: dict = MED_CONFIG) -> dict[str, tuple[int, ...]]:
    """Every parameter key of ImageReward's ``state_dict()`` with its shape (not the buffer)."""
    return dict(_vit_keys(vit) + _bert_keys(med, vit) + _head_keys(med, vit))


def seeded_state_dict(vit: str, med: dict = MED_CONFIG, seed: int = SEED) -> dict[str, torch.Tensor]:
    """Random float32 weights, drawn key by key in sorted order from one seeded CPU generator.

    Scales keep activations O(1) through 24 layers so scores differ across inputs: matrices
    ``N(0, 1/fan_in)``, LayerNorm weights ``1 + 0.1 N``, biases and LayerNorm shifts ``0.1 N``,
    word / position embeddings ``0.5 N``. The ViT's input embedding (patch projection, class
    token, positions) is 100x smaller, so the first LayerNorm sees a variance near 1e-4 and its
    eps (1e-6, BLIP/vit.py line 138) moves the scores measurably. Plus med.py's ``position_ids``.
    """
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in sorted(state_dict_shapes(vit, med).items()):
        x = torch.randn(shape, generator=g, dtype=torch.float32)
        if "LayerNorm.weight" in k or k.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
            x = 1.0 + 0.1 * x
        elif k.endswith("bias"):
            x = 0.1 * x
        elif k.endswith(("cls_token", "pos_embed")):
            x = 0.005 * x
        elif "embeddings" in k:
            x = 0.5 * x
        else:
            x = x / math.sqrt(math.prod(shape[1:]))
        if k.startswith("blip.visual_encoder.patch_embed."):
            x = 0.01 * x
        sd[k] = x
    # BLIP/med.py line 58: a persistent buffer, so the real ImageReward.pt holds it too
    sd["blip.text_encoder.embeddings.position_ids"] = torch.arange(med["max_position_embeddings"]).expand((1, -1)).clone()
    return sd


def images_uint8(seed: int = SEED) -> list:
    """The fixed test images: ``(H, W, 3)`` uint8 numpy arrays, smooth colour fields plus noise
    (so a resize filter matters but is not dominated by aliasing)."""
    g = torch.Generator().manual_seed(seed + 1)
    out = []
    for h, w in IMAGE_SIZES:
        coarse = torch.rand((1, 3, 6, 6), generator=g)
        field = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[0]
        noise = 0.08 * torch.randn((3, h, w), generator=g)
        img = ((field + noise).clamp(0, 1) * 255).round().to(torch.uint8)
        out.append(img.permute(1, 2, 0).contiguous().numpy())
    return out


def write_tokenizer(folder) -> Path:
    """A ``bert-base-uncased``-style tokenizer folder (``vocab.txt`` + lower-casing config)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 512}))
    return folder


def write_checkpoint(folder, vit: str, med: dict = MED_CONFIG, seed: int = SEED) -> tuple[Path, Path]:
    """Write ``ImageReward.pt`` (``torch.save`` of the state dict, as the package's
    ``utils.load`` reads it) and ``med_config.json`` into ``folder``; returns both paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ckpt, cfg = folder / "ImageReward.pt", folder / "med_config.json"
    torch.save(seeded_state_dict(vit, med, seed), ckpt)
    cfg.write_text(json.dumps(med, indent=2))
    return ckpt, cfg
