"""A tiny random-weight open_clip backbone for CPU runs and tests (``backbone: {model: tiny:clip}``).

Written once to the cache as an open_clip ``local-dir:`` folder (``open_clip_config.json`` +
``open_clip_model.safetensors``), the layout a hub checkpoint has, so the reward model loads it
through the same ``open_clip.create_model("local-dir:...")`` path as real weights.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

TINY_BACKBONE = "tiny:clip"
CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 4, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def tiny_backbone_dir(seed: int = 0) -> Path:
    """Folder of the tiny open_clip (built on first use, atomically)."""
    from ..models.tiny import cache_root

    folder = cache_root() / "tiny" / f"itercomp-clip-v1-s{seed}"
    if (folder / "open_clip_config.json").exists():
        return folder
    import open_clip
    import torch
    from safetensors.torch import save_file

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".itercomp-clip-", dir=folder.parent))
    torch.manual_seed(seed)
    cfg = {"model_cfg": CONFIG, "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}}
    (tmp / "open_clip_config.json").write_text(json.dumps(cfg))
    model = open_clip.model.CLIP(**CONFIG)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "open_clip_model.safetensors"))
    try:
        os.replace(tmp, folder)
    except OSError:  # another process built it first; identical
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def resolve_backbone(spec: dict) -> dict:
    """Turn ``{model: tiny:clip}`` into the ``local-dir:`` spec stored with the reward model."""
    spec = dict(spec)
    if spec.get("model") == TINY_BACKBONE:
        spec = {"kind": "open_clip", "model": f"local-dir:{tiny_backbone_dir(int(spec.get('seed', 0)))}"}
    return spec
