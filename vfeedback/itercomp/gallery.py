"""The model gallery: models that each render every compositional prompt with shared seeds.

A gallery member is a model path (hub id, folder, single file, ``tiny:``) with an optional
LoRA; IterComp's refined models are the base model plus the LoRA an iteration trained. Each
member renders every (category, prompt, seed) into its own folder::

    gallery/<name>/<category>-<prompt index>-s<seed>.png
    gallery/<name>/images.jsonl     one {"category", "prompt", "seed", "image"} per image
    gallery/<name>/COMPLETE         written last: a folder without it is re-rendered

The initial latents of (prompt, seed) are the same for every member (a generator derived from
the seed and the prompt), so members differ only in the model, as in the reference gallery.
"""
from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..errors import UserError
from ..rundir import COMPLETE_MARKER, atomic_write

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GalleryEntry:
    name: str
    path: str
    family: str
    lora: Optional[str] = None
    steps: Optional[int] = None              # this member's sampler settings (None: sampling.*)
    guidance_scale: Optional[float] = None

    def to_dict(self) -> dict:
        d = {"name": self.name, "path": self.path, "family": self.family, "lora": self.lora}
        d.update({k: v for k, v in (("steps", self.steps), ("guidance_scale", self.guidance_scale)) if v is not None})
        return d


def safe_name(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s).strip("_") or "model"


def entries_from_config(cfg) -> list[GalleryEntry]:
    """The base model (``base``) followed by ``itercomp.gallery``; names made unique."""
    out = [GalleryEntry("base", cfg.model.path, cfg.model.family, guidance_scale=cfg.itercomp.gallery_guidance_scale)]
    for i, g in enumerate(cfg.itercomp.gallery):
        steps = guidance = None
        if isinstance(g, str):
            path, family, lora, name = g, None, None, None
        else:
            path, family, lora, name = g.path, g.family, g.lora, g.name
            steps, guidance = g.steps, g.guidance_scale
        if family is None:
            family = ("sdxl" if path.startswith("tiny:sdxl") else "sd15") if path.startswith("tiny:") else cfg.model.family
        if path.startswith("tiny:") and "#" in path and not re.fullmatch(r"tiny:(sd15|sdxl)#\d+", path):
            raise UserError(f"itercomp.gallery[{i}]: {path!r}: a seeded tiny model is tiny:sd15#N or tiny:sdxl#N")
        name = safe_name(name or (path.rsplit("/", 1)[-1] + (f"+{Path(lora).name}" if lora else "")))
        if lora and not Path(lora).exists():
            raise UserError(f"itercomp.gallery[{i}].lora: {lora} not found (a folder holding pytorch_lora_weights.safetensors)")
        out.append(GalleryEntry(name, path, family, lora, steps, guidance))
    seen: dict[str, int] = {}
    unique = []
    for e in out:
        n = seen.get(e.name, 0)
        seen[e.name] = n + 1
        unique.append(e if n == 0 else GalleryEntry(f"{e.name}-{n + 1}", e.path, e.family, e.lora, e.steps, e.guidance_scale))
    return unique


def find_render(root: Path, name: str) -> Optional[Path]:
    """The complete render folder of gallery member ``name`` in any ``iter-*/gallery``."""
    for d in sorted(root.glob(f"iter-*/gallery/{name}")):
        if (d / COMPLETE_MARKER).exists():
            return d
    return None


def read_render(folder: Path) -> list[dict]:
    return [json.loads(l) for l in (folder / "images.jsonl").read_text().splitlines() if l.strip()]


def resolve_path(path: str) -> str:
    """``tiny:sd15#3`` -> the folder of the tiny model built with seed 3 (other random weights:
    a cheap way to fill a CPU gallery); anything else unchanged."""
    m = re.fullmatch(r"tiny:(sd15|sdxl)#(\d+)", path)
    if not m:
        return path
    from ..models.tiny import tiny_path

    return str(tiny_path(m.group(1), seed=int(m.group(2))))


@torch.no_grad()
def render(entry: GalleryEntry, items: Sequence[tuple[str, int, str]], seeds: Sequence[int], folder: Path, cfg,
           batch_size: int = 8, device: Optional[torch.device] = None) -> list[dict]:
    """Render ``items`` (``(category, prompt index, prompt)``) x ``seeds`` with ``entry`` into
    ``folder`` (rewritten from scratch); returns the image records."""
    from rewards.images import to_pil

    from ..engine import generator
    from ..models import load_lora_into, load_model
    from ..sampling import sample

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    dev = device or torch.device("cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu")
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    model = load_model(entry.family, resolve_path(entry.path), resolution=cfg.model.resolution if entry.family == cfg.model.family else None,
                       dtype=dtype, device=dev, attention=cfg.model.attention)
    if entry.lora:
        load_lora_into(model, entry.lora)
    jobs = [(c, i, p, s) for (c, i, p) in items for s in seeds]
    steps = entry.steps or cfg.sampling.steps
    guidance = cfg.sampling.guidance_scale if entry.guidance_scale is None else entry.guidance_scale
    records = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        prompts = [p for _, _, p, _ in chunk]
        gens = [generator("itercomp-gallery", s, p) for _, _, p, s in chunk]
        cond = model.encode_prompt(prompts, [cfg.prompts.negative] * len(prompts), cfg=guidance > 1)
        out = sample(model, cond, num_steps=steps, guidance_scale=guidance, eta=cfg.sampling.eta, generator=gens)
        for (c, i, p, s), im in zip(chunk, to_pil(out.images.float().cpu())):
            rel = f"{c}-{i:03d}-s{s}.png"
            im.save(folder / rel)
            records.append({"category": c, "prompt": p, "seed": s, "image": rel})
    atomic_write(folder / "images.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    atomic_write(folder / "model.json", json.dumps(entry.to_dict(), indent=1))
    atomic_write(folder / COMPLETE_MARKER, "")
    del model
    return records
