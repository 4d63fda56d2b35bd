"""Character-structure reward: prefers images with plausible human / face structure.

ID-Aligner (Chen et al. 2024, arXiv:2404.15449) builds its *identity aesthetic reward* from two
parts: an appeal reward learned from human-annotated preference data, and a reward on
**character structure** trained on "automatically constructed feedback" (abstract). This module
is that second part: a reward model that scores a correctly structured image above a
structurally distorted version of it, trained with the pairwise ranking loss of ImageReward /
IterComp, ``-log sigmoid(r(good) - r(bad))`` (the same function as IterComp's per-aspect
reward models: :func:`rewards.itercomp_rm.pairwise_ranking_loss`).

What the paper's method section says about how the distorted images were made, and how the
structure model is built, could not be retrieved when this was written (only the abstract and
mirrors of it were reachable; the reference repository github.com/Weifeng-Chen/ID-Aligner holds
a README and no code). The recipe here is therefore ours, and said so:

- **negatives** are made from a folder of ordinary photos by structural distortions that keep
  colours and textures but break geometry, the way generated people go wrong: a smooth random
  elastic warp (melted / bent parts), a piecewise shuffle of tiles (misplaced parts), a patch
  duplicated elsewhere (an extra eye, a second face), and a region turned upside down;
- **positives** are the same photos under mild, structure-preserving augmentation (random
  resized crop, horizontal flip), and each pair is (augmented photo, distortion of exactly that
  augmented photo), so the only difference the head can learn is the structure;
- a small MLP head over the embedding of a **frozen** open_clip (or transformers CLIP) image
  encoder, trained on embeddings computed once; the scorer is differentiable in the pixels
  (ReFL backpropagates through the frozen encoder into the generated image);
- as in ImageReward, the output is standardised by the mean and std of the scores of the
  training images (good and bad), so 0 is "typical" and units are training-set stds.

A trained model is one ``.safetensors`` file whose metadata holds the format tag, the backbone
spec, the head's shape and the training report; ``rewards.load("structure", path=...)`` loads
it (a file, a folder holding ``structure_rm.safetensors``, ``hf-hub:org/repo/file`` or a URL).

Train one (a folder of photos of people; more and more varied is better)::

    python -m rewards.structure --photos data/people --out runs/structure/structure_rm.safetensors \\
        --backbone-model ViT-L-14 --backbone-pretrained openai
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import _hub
from .base import Reward, RewardError, register
from .itercomp_rm import load_backbone, pair_accuracy, pairwise_ranking_loss, read_tagged, train_pairwise_head

log = logging.getLogger(__name__)

FORMAT = "vfeedback.structure_rm/1"
DEFAULT_FILENAME = "structure_rm.safetensors"


# --------------------------------------------------------------------------------------------
# structural distortions: (3, H, W) in [0, 1] -> (3, H, W) in [0, 1], driven by a torch.Generator


def _rand(g: torch.Generator, lo: float = 0.0, hi: float = 1.0) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _randint(g: torch.Generator, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi)."""
    return int(torch.randint(lo, max(hi, lo + 1), (), generator=g))


def elastic_warp(img: torch.Tensor, g: torch.Generator, strength: float = 0.15, grid: int = 4) -> torch.Tensor:
    """A smooth random displacement field (a ``grid x grid`` random field, bicubically
    upsampled), ``strength`` in units of the image half-width: parts bend and melt."""
    _, h, w = img.shape
    disp = (torch.rand(1, 2, grid, grid, generator=g) * 2 - 1) * strength
    disp = F.interpolate(disp, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    ys, xs = torch.linspace(-1, 1, h), torch.linspace(-1, 1, w)
    base = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).unsqueeze(0)
    out = F.grid_sample(img.unsqueeze(0).float(), base + disp, mode="bilinear", padding_mode="reflection", align_corners=True)
    return out[0].clamp(0, 1)


def tile_shuffle(img: torch.Tensor, g: torch.Generator, k: Optional[int] = None) -> torch.Tensor:
    """Cut into ``k x k`` tiles (k in 2..4) and move some of them: misplaced parts."""
    _, h, w = img.shape
    k = k or _randint(g, 2, 5)
    th, tw = h // k, w // k
    out = img.clone()
    n = k * k
    perm = torch.arange(n)
    # a derangement of 2..n tiles (at least two tiles change place)
    m = _randint(g, 2, n + 1)
    chosen = torch.randperm(n, generator=g)[:m]
    rolled = chosen.roll(1)
    perm[chosen] = rolled
    for dst in range(n):
        src = int(perm[dst])
        if src == dst:
            continue
        dy, dx = divmod(dst, k)
        sy, sx = divmod(src, k)
        out[:, dy * th:(dy + 1) * th, dx * tw:(dx + 1) * tw] = img[:, sy * th:(sy + 1) * th, sx * tw:(sx + 1) * tw]
    return out


def _box(g: torch.Generator, h: int, w: int, lo: float, hi: float) -> tuple[int, int, int, int]:
    s = _rand(g, lo, hi)
    bh, bw = max(2, int(h * s)), max(2, int(w * s))
    y, x = _randint(g, 0, h - bh + 1), _randint(g, 0, w - bw + 1)
    return y, x, bh, bw


def duplicate_part(img: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Copy a region (a fifth to two fifths of the side) to another place: a duplicated part."""
    _, h, w = img.shape
    y, x, bh, bw = _box(g, h, w, 0.2, 0.4)
    for _ in range(10):  # a destination that does not mostly overlap the source
        y2, x2 = _randint(g, 0, h - bh + 1), _randint(g, 0, w - bw + 1)
        if abs(y2 - y) >= bh // 2 or abs(x2 - x) >= bw // 2:
            break
    out = img.clone()
    out[:, y2:y2 + bh, x2:x2 + bw] = img[:, y:y + bh, x:x + bw]
    return out


def flip_part(img: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Turn a region (a third to a half of the side) upside down: an inverted part."""
    _, h, w = img.shape
    y, x, bh, bw = _box(g, h, w, 0.3, 0.5)
    out = img.clone()
    out[:, y:y + bh, x:x + bw] = img[:, y:y + bh, x:x + bw].flip(1)
    return out


DISTORTIONS: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {
    "elastic": elastic_warp,
    "shuffle": tile_shuffle,
    "duplicate": duplicate_part,
    "flip": flip_part,
}


def distort(img: torch.Tensor, g: torch.Generator, kinds: Optional[Sequence[str]] = None) -> tuple[torch.Tensor, str]:
    """One random structural distortion of ``img`` (3, H, W); returns ``(image, kind)``."""
    kinds = list(kinds or DISTORTIONS)
    unknown = [k for k in kinds if k not in DISTORTIONS]
    if unknown:
        raise RewardError(f"structure: unknown distortion(s) {unknown}; known: {', '.join(DISTORTIONS)}")
    kind = kinds[_randint(g, 0, len(kinds))]
    return DISTORTIONS[kind](img, g), kind


def augment(img: torch.Tensor, g: torch.Generator, size: int) -> torch.Tensor:
    """A structure-preserving view: random resized crop (70-100% of the side, square), random
    horizontal flip, resized to ``size x size``."""
    _, h, w = img.shape
    side = min(h, w)
    s = int(side * _rand(g, 0.7, 1.0))
    y, x = _randint(g, 0, h - s + 1), _randint(g, 0, w - s + 1)
    crop = img[:, y:y + s, x:x + s].unsqueeze(0).float()
    out = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0].clamp(0, 1)
    return out.flip(2) if _rand(g) < 0.5 else out


def make_pairs(images: Sequence[torch.Tensor], variants: int, seed: int, size: int,
               kinds: Optional[Sequence[str]] = None) -> tuple[torch.Tensor, torch.Tensor, list[int], list[str]]:
    """``variants`` (good, bad) pairs per image: ``(good (N,3,S,S), bad (N,3,S,S), source index
    per pair, distortion kind per pair)``; reproducible from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    good, bad, src, kind = [], [], [], []
    for i, im in enumerate(images):
        for _ in range(variants):
            a = augment(im, g, size)
            d, k = distort(a, g, kinds)
            good.append(a)
            bad.append(d)
            src.append(i)
            kind.append(k)
    return torch.stack(good), torch.stack(bad), src, kind


# --------------------------------------------------------------------------------------------
# the head


class StructureHead(nn.Module):
    """MLP over the standardised image embedding -> one score; output standardised by stored stats."""

    def __init__(self, dim: int, hidden: int = 256, dropout: float = 0.1):
        super().__init__()
        self.dim, self.hidden, self.dropout = dim, hidden, dropout
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(hidden, max(hidden // 4, 4)), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(max(hidden // 4, 4), 1),
        )
        # as IterComp's RewardHead: a frozen encoder's embeddings of similar images are nearly
        # collinear, so each feature is centred and scaled by its training spread first
        self.register_buffer("feat_mean", torch.zeros(dim))
        self.register_buffer("feat_std", torch.ones(dim))
        self.register_buffer("mean", torch.zeros(()))
        self.register_buffer("std", torch.ones(()))

    @torch.no_grad()
    def fit_features(self, emb: torch.Tensor) -> None:
        self.feat_mean.copy_(emb.float().mean(0))
        self.feat_std.copy_(emb.float().std(0).clamp_min(1e-4) if emb.shape[0] > 1 else torch.ones(self.dim))

    def raw(self, emb: torch.Tensor) -> torch.Tensor:
        return self.mlp((emb - self.feat_mean) / self.feat_std).squeeze(-1)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return (self.raw(emb) - self.mean) / self.std.clamp_min(1e-6)

    def config(self) -> dict:
        return {"dim": self.dim, "hidden": self.hidden, "dropout": self.dropout}


def save_model(path: Union[str, Path], head: StructureHead, backbone: dict, report: Optional[dict] = None) -> Path:
    """Write a structure reward model (head weights and stats + metadata), atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "backbone": json.dumps(backbone, sort_keys=True), "head": json.dumps(head.config()),
            "report": json.dumps(report or {})}
    tmp = path.with_name("." + path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


_TRAIN_HINT = "train one with: python -m rewards.structure --photos FOLDER --out FILE (docs/id_aligner.md)"


def read_model(path: Union[str, Path]) -> tuple[StructureHead, dict, dict]:
    """``(head, backbone spec, report)`` from a file written by :func:`save_model`."""
    p = Path(path)
    sd, meta = read_tagged(p, FORMAT, "structure", "a structure reward model", "rewards.structure", _TRAIN_HINT)
    cfg = json.loads(meta["head"])
    head = StructureHead(cfg["dim"], cfg["hidden"], cfg["dropout"])
    try:
        head.load_state_dict(sd)
    except RuntimeError as e:
        raise RewardError(f"structure: {p}: weights do not match the head it describes ({str(e)[:200]})") from None
    return head, json.loads(meta["backbone"]), json.loads(meta.get("report", "{}"))


# --------------------------------------------------------------------------------------------
# the reward


@register(
    "structure",
    differentiable=True,
    description="ID-Aligner-style character-structure reward: frozen CLIP + head trained on (photo, structurally distorted photo) pairs (path=model file)",
)
class StructureReward(Reward):
    """Structure score of each image (standardised: mean 0, std 1 over the training images;
    higher = more plausible structure). Prompt-free.

    Options: ``path`` (a file written by :func:`train_structure_model`, a folder holding
    ``structure_rm.safetensors``, ``hf-hub:org/repo/file`` or a URL), ``device``, ``dtype``,
    ``fingerprint`` (ignored; part of the load cache key so a retrained file at the same path is
    not served from the cache).
    """

    def __init__(self, path: str, device: Optional[str] = None, dtype: Optional[str] = None, fingerprint: Optional[str] = None):
        super().__init__()
        if not path:
            raise RewardError(f"structure: option path is required; {_TRAIN_HINT}")
        p = Path(str(path)).expanduser()
        if not str(path).startswith(("hf-hub:", "http://", "https://")) and not p.exists():
            raise RewardError(f"structure: no reward model file {p}; {_TRAIN_HINT}")
        local = _hub.resolve_file(str(path), default=str(path), filename=DEFAULT_FILENAME, what="structure", option="path")
        head, spec, report = read_model(local)
        self.path = local
        self.report = report
        self.backbone_spec = spec
        self.backbone = load_backbone(spec, device, dtype)
        self.head = head.to(self.backbone.device).eval().requires_grad_(False)

    def forward(self, images, prompts=None, **context):
        emb = self.backbone.image_embeddings(images)
        return self.head(emb.to(self.head.mean.device)).to(images.device)


# --------------------------------------------------------------------------------------------
# training


def list_photos(photos: Union[str, os.PathLike, Sequence]) -> list[Path]:
    """Image files of a folder (recursively, sorted) or of a list of files / folders."""
    from .images import expand_paths

    items = [photos] if isinstance(photos, (str, os.PathLike)) else list(photos)
    return expand_paths(items)


def _held_out(name: str, fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little") / 2**32
    return h < fraction


@torch.no_grad()
def _embed(backbone, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([backbone.image_embeddings(x[s:s + batch_size]).float().cpu() for s in range(0, x.shape[0], batch_size)])


def train_structure_model(photos, out: Union[str, Path], backbone: dict, *, variants: int = 16, size: int = 224,
                          kinds: Optional[Sequence[str]] = None, epochs: int = 100, lr: float = 1e-3,
                          weight_decay: float = 1e-2, hidden: int = 256, dropout: float = 0.1, batch_size: int = 256,
                          val_fraction: float = 0.2, val_photos: Optional[Sequence] = None, seed: int = 0,
                          device: Optional[str] = None, dtype: Optional[str] = None, embed_batch: int = 32) -> dict:
    """Train a structure reward model on ``photos`` and save it to ``out``; return a report.

    ``photos``: a folder (recursive) or a list of files / folders of correctly structured images
    (photos of people for ID-Aligner). Each photo gives ``variants`` (augmented, distorted)
    pairs (:func:`make_pairs`). Photos are held out whole for validation: ``val_photos`` when
    given, else a hash-chosen ``val_fraction`` of them (at least one when there are two or
    more). The epoch with the lowest validation loss is kept (the IterComp trainer's rule);
    without validation photos, the last epoch. ``backbone``: ``{"kind": "open_clip", "model":
    ..., "pretrained": ...}`` or ``{"kind": "hf_clip", "model": ...}`` (as ``itercomp_rm``).
    """
    from .images import load_image

    paths = list_photos(photos)
    if not paths:
        raise RewardError(f"structure: no images found in {photos}")
    if val_photos is not None:
        val_paths = list_photos(val_photos)
        train_paths = [p for p in paths if p not in set(val_paths)]
    else:
        val_paths = [p for p in paths if _held_out(p.name, val_fraction)] if val_fraction > 0 else []
        if val_fraction > 0 and not val_paths and len(paths) >= 2:
            val_paths = [min(paths, key=lambda p: hashlib.sha256(p.name.encode()).digest())]
        if len(val_paths) == len(paths):
            val_paths = val_paths[:-1]
        train_paths = [p for p in paths if p not in set(val_paths)]
    if not train_paths:
        raise RewardError("structure: every photo is held out for validation; nothing to train on")
    bb = load_backbone(backbone, device, dtype)

    def pairs(ps, s):
        good, bad, src, kind = make_pairs([load_image(p) for p in ps], variants, s, size, kinds)
        return _embed(bb, good, embed_batch), _embed(bb, bad, embed_batch), kind

    tr_good, tr_bad, tr_kind = pairs(train_paths, seed)
    va = pairs(val_paths, seed + 1) if val_paths else None
    dim = tr_good.shape[-1]
    torch.manual_seed(seed)
    head = StructureHead(dim, hidden, dropout)
    head.fit_features(torch.cat([tr_good, tr_bad]))

    def evaluate(data):
        if data is None:
            return float("nan"), float("nan")
        head.eval()
        with torch.no_grad():
            rg, rb = head.raw(data[0]), head.raw(data[1])
        return float(pairwise_ranking_loss(rg, rb)), pair_accuracy(rg, rb)

    val_loss0, val_acc0 = evaluate(va)
    n = tr_good.shape[0]
    best_epoch, history = train_pairwise_head(
        head, lambda idx: (head.raw(tr_good[idx]), head.raw(tr_bad[idx])), n, lambda: evaluate((tr_good, tr_bad)),
        (lambda: evaluate(va)) if va is not None else None, epochs=epochs, batch_size=batch_size, lr=lr,
        weight_decay=weight_decay, seed=seed)
    train_loss, train_acc = evaluate((tr_good, tr_bad))
    val_loss, val_acc = evaluate(va)
    per_kind = {}
    if va is not None:
        with torch.no_grad():
            d = head.raw(va[0]) - head.raw(va[1])
        for k in sorted(set(va[2])):
            m = torch.tensor([x == k for x in va[2]])
            per_kind[k] = float(((d[m] > 0).float() + 0.5 * (d[m] == 0).float()).mean())
    with torch.no_grad():  # ImageReward-style output standardisation over the training images
        raw = head.raw(torch.cat([tr_good, tr_bad]))
        head.mean.fill_(float(raw.mean()))
        head.std.fill_(float(raw.std()) if raw.numel() > 1 else 1.0)
    report = {
        "photos_train": len(train_paths), "photos_val": len(val_paths), "variants": variants, "size": size,
        "kinds": list(kinds or DISTORTIONS), "pairs_train": int(n), "pairs_val": int(va[0].shape[0]) if va is not None else 0,
        "best_epoch": best_epoch, "epochs": epochs, "train_loss": train_loss, "train_accuracy": train_acc,
        "val_loss": val_loss, "val_accuracy": val_acc, "val_accuracy_at_start": val_acc0,
        "val_accuracy_by_kind": per_kind, "val_photos": [p.name for p in val_paths], "seed": seed,
    }
    save_model(out, head, backbone, report)
    report["history"] = history
    log.info("structure reward model: %d pairs train / %d val, accuracy %.3f train / %.3f val (start %.3f) -> %s",
             n, report["pairs_val"], train_acc, val_acc, val_acc0, out)
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m rewards.structure``: train a structure reward model from a folder of photos."""
    ap = argparse.ArgumentParser(prog="python -m rewards.structure", description=__doc__.split("\n\n")[0])
    ap.add_argument("--photos", required=True, nargs="+", help="folder(s) or files of correctly structured photos (people, for ID-Aligner)")
    ap.add_argument("--out", required=True, help="output .safetensors file")
    ap.add_argument("--backbone-kind", default="open_clip", choices=["open_clip", "hf_clip"])
    ap.add_argument("--backbone-model", default="ViT-L-14", help="open_clip name, hf-hub:/local-dir: folder, or a transformers CLIP id/folder")
    ap.add_argument("--backbone-pretrained", default="openai", help="open_clip pretrained tag or checkpoint file (open_clip only)")
    ap.add_argument("--val-photos", nargs="*", default=None, help="photos held out for validation (default: a hashed 20%%)")
    ap.add_argument("--variants", type=int, default=16, help="distorted pairs per photo")
    ap.add_argument("--size", type=int, default=224, help="side of the square training views")
    ap.add_argument("--kinds", nargs="*", default=None, help=f"distortions to use (default all: {' '.join(DISTORTIONS)})")
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    spec = {"kind": args.backbone_kind, "model": args.backbone_model}
    if args.backbone_kind == "open_clip" and args.backbone_pretrained and not args.backbone_model.startswith(("hf-hub:", "local-dir:")):
        spec["pretrained"] = args.backbone_pretrained
    try:
        report = train_structure_model(args.photos, args.out, spec, variants=args.variants, size=args.size, kinds=args.kinds,
                                       epochs=args.epochs, lr=args.lr, seed=args.seed, device=args.device, val_photos=args.val_photos)
    except (RewardError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report.pop("history", None)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
