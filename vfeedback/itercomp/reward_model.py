"""Training IterComp's composition-aware reward models on ranked gallery groups.

Per category: every ordered pair of every ranking becomes ``(prompt, better image, worse image)``;
the head learns ``-log sigmoid(r(better) - r(worse))`` (ImageReward / IterComp,
``rewards.itercomp_rm.pairwise_ranking_loss``) on frozen backbone embeddings computed once.
A share of the prompts is held out: the epoch with the lowest validation loss is kept (as the
reference's ``train_reward_models.py`` saves its best-validation model) and its validation pair
accuracy reported. With ``refine``, training starts from the previous iteration's head.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Optional, Sequence

import torch

from rewards.itercomp_rm import (RewardHead, load_backbone, pair_accuracy, pairwise_ranking_loss, read_head, save_head,
                                train_pairwise_head)

from .ranking import Group

log = logging.getLogger(__name__)


def _is_val(prompt: str, fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "little") / 2**32
    return h < fraction


@torch.no_grad()
def embed_images(backbone, paths: Sequence[str], batch_size: int = 32) -> dict[str, torch.Tensor]:
    """Backbone image embeddings of image files (grouped by size), on the CPU."""
    from rewards.images import load_image

    out: dict[str, torch.Tensor] = {}
    todo = list(dict.fromkeys(paths))
    by_size: dict[tuple, list[tuple[str, torch.Tensor]]] = {}
    for p in todo:
        t = load_image(p)
        by_size.setdefault(tuple(t.shape), []).append((p, t))
    for items in by_size.values():
        for s in range(0, len(items), batch_size):
            chunk = items[s : s + batch_size]
            e = backbone.image_embeddings(torch.stack([t for _, t in chunk])).float().cpu()
            out.update({p: v for (p, _), v in zip(chunk, e)})
    return out


def train_category(groups: Sequence[Group], category: str, rm_cfg, backbone_spec: dict, out_file: Path,
                   init_file: Optional[Path] = None, seed: int = 0, device: str = "cpu",
                   embeddings: Optional[dict] = None) -> dict:
    """Train (or refine) the head of ``category`` on its ranked groups; save it; return a report."""
    backbone = load_backbone(backbone_spec, device)
    groups = [g for g in groups if g.category == category and g.pairs()]
    if not groups:
        raise ValueError(f"no ranked groups with a strict preference for category {category!r}")
    emb = embeddings if embeddings is not None else embed_images(backbone, [p for g in groups for p in g.images])
    missing = [p for g in groups for p in g.images if p not in emb]
    if missing:
        emb.update(embed_images(backbone, missing))
    prompts = sorted({g.prompt for g in groups})
    txt = dict(zip(prompts, backbone.text_embeddings(prompts).float().cpu()))

    def tensors(gs):
        b, w, t = [], [], []
        for g in gs:
            for i, j in g.pairs():
                b.append(emb[g.images[i]])
                w.append(emb[g.images[j]])
                t.append(txt[g.prompt])
        if not b:
            return None
        return torch.stack(b), torch.stack(w), torch.stack(t)

    unit = (lambda g: g.prompt) if rm_cfg.val_split == "prompt" else (lambda g: f"{g.prompt}\x00{g.seed}\x00{len(g.images)}")
    val_groups = [g for g in groups if _is_val(unit(g), rm_cfg.val_fraction)] if rm_cfg.val_fraction > 0 else []
    if len(val_groups) == len(groups):  # too few prompts to hold any out: train on all
        val_groups = []
    train_groups = [g for g in groups if g not in val_groups]
    tr, va = tensors(train_groups), tensors(val_groups)
    dim = tr[0].shape[-1]
    torch.manual_seed(seed)
    head = RewardHead(dim, rm_cfg.hidden, rm_cfg.dropout)
    refined = False
    head.fit_features(torch.cat([tr[0], tr[1]]), torch.cat([tr[2], tr[2]]))
    if init_file is not None and Path(init_file).exists():
        prev, prev_spec, _, _ = read_head(init_file)
        if prev_spec == backbone_spec and prev.config() == head.config():
            head.load_state_dict(prev.state_dict())
            refined = True

    def evaluate(data):
        if data is None:
            return float("nan"), float("nan")
        head.eval()
        with torch.no_grad():
            rb, rw = head.raw(data[0], data[2]), head.raw(data[1], data[2])
        return float(pairwise_ranking_loss(rb, rw)), pair_accuracy(rb, rw)

    val_loss0, val_acc0 = evaluate(va)
    train_loss0, train_acc0 = evaluate(tr)
    n = tr[0].shape[0]
    best_epoch, history = train_pairwise_head(
        head, lambda idx: (head.raw(tr[0][idx], tr[2][idx]), head.raw(tr[1][idx], tr[2][idx])), n, lambda: evaluate(tr),
        (lambda: evaluate(va)) if va is not None else None, epochs=rm_cfg.epochs, batch_size=rm_cfg.batch_size,
        lr=rm_cfg.lr, weight_decay=rm_cfg.weight_decay, seed=seed, start_val_loss=val_loss0)
    train_loss, train_acc = evaluate(tr)
    val_loss, val_acc = evaluate(va)
    # ImageReward standardises its output by the training images' score statistics
    with torch.no_grad():
        imgs = list(dict.fromkeys(p for g in train_groups for p in g.images))
        t = torch.stack([txt[g.prompt] for g in train_groups for _ in g.images])
        e = torch.stack([emb[p] for g in train_groups for p in g.images])
        raw = head.raw(e, t)
        head.mean.fill_(float(raw.mean()))
        head.std.fill_(float(raw.std()) if raw.numel() > 1 else 1.0)
    report = {
        "category": category, "groups_train": len(train_groups), "groups_val": len(val_groups),
        "pairs_train": int(n), "pairs_val": int(va[0].shape[0]) if va is not None else 0,
        "images": len(imgs), "refined_from_previous": refined, "best_epoch": best_epoch,
        "train_loss": train_loss, "train_accuracy": train_acc, "val_loss": val_loss, "val_accuracy": val_acc,
        "val_accuracy_at_start": val_acc0, "train_accuracy_at_start": train_acc0, "history": history,
    }
    save_head(out_file, head, backbone_spec, category, {k: v for k, v in report.items() if k != "history"})
    log.info("reward model %s: pairs %d train / %s val, accuracy %.3f train / %.3f val (start %.3f)", category, n,
             report["pairs_val"], train_acc, val_acc, val_acc0)
    return report
