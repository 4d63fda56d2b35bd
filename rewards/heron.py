"""HERON: preferences from ranked reward factors, and the reward model trained on them.

Bukharin, Li, He, Zhao, "Deep Reinforcement Learning from Hierarchical Preference Design"
(arXiv:2309.02632, ICML 2025; code github.com/abukharin3/HERON). A person ranks the factors by
importance instead of weighing them; two samples are compared by a decision tree induced by
that ranking:

    for k = 1 .. K (most important first):
        if z_k(a) > z_k(b) + delta_k: a is preferred          (the decision is made at level k)
        if z_k(b) > z_k(a) + delta_k: b is preferred
        otherwise fall through to level k + 1
    no level decided: the pair is a tie and is not labelled

(the reference's ``RewardModel.get_loss`` in ``robots/stable_baselines3/ppo/heron.py``: strict
``>`` against ``other + margin``, so a difference of exactly ``delta_k`` falls through; ties are
skipped). The margins: ``delta_k = m_k * std(z_k)`` in the reference (``sigma * reward_signal[:,
k].std()`` over the batch being labelled; ``ClassicControl/cleanrl/rm_mountain.py`` ``train_rm``:
``reward_buffer.std(0) * sigma_mult`` over every sample so far), which makes the tree invariant to
each factor's scale. Both are offered here: ``margin_scale: "std"`` (``m_k`` times the unbiased
std of factor k over the samples given; the reference's choice) and ``"absolute"`` (``delta_k =
m_k`` in the factor's own units: our addition, natural for probabilities in [0, 1]).

NaN (a factor that does not apply, e.g. the shapes judge's count term for a caption without a
number): both NaN is a tie at that level (fall through); one NaN loses to a number (the
project-wide rule of ``vfeedback/feedback/oracles.py``).

The reward model is trained with the Bradley-Terry loss ``-log sigmoid(r(x_w) - r(x_l))`` on the
hierarchical labels (the paper's Eq. for the preference reward model; the reference's
``get_loss``), and its output standardised by the mean and std of its scores on the training
samples (``rm.mu, rm.sigma`` in ``rm_mountain.py`` with ``--rm-normalize``). The head and the
frozen backbone are IterComp's (``rewards.itercomp_rm``: one shared trainer for pairwise heads).
A trained model is one safetensors file whose metadata is its manifest (format, backbone spec,
head shape, the factor hierarchy with margins, training report); ``rewards.load("heron_rm",
path=FILE)`` loads it. Train one with ``python -m rewards.heron`` (``--help``).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import nn

from .base import Reward, RewardError, register

log = logging.getLogger(__name__)

FORMAT = "vfeedback.heron_rm/1"
MARGIN_SCALES = ("absolute", "std")

__all__ = ["heron_compare", "factor_margins", "HeronLabels", "heron_label", "weighted_label", "HeronRewardModel",
           "save_model", "read_model", "train_heron_rm"]


# --------------------------------------------------------------------------------------------
# the comparator


def heron_compare(a: Sequence[float], b: Sequence[float], margins: Sequence[float]) -> tuple[Optional[int], Optional[int]]:
    """Compare two samples by their factor values, most important factor first.

    ``a``, ``b``: K factor values each (higher better; NaN allowed); ``margins``: K absolute
    margins ``delta_k >= 0``. Returns ``(winner, level)``: winner 0 (``a``) or 1 (``b``) and the
    0-based index of the factor that decided; ``(None, None)`` when every level is within its
    margin (a tie). See the module docstring for the rule and the reference.
    """
    if not (len(a) == len(b) == len(margins)):
        raise ValueError(f"heron_compare: {len(a)} and {len(b)} factor values for {len(margins)} margins")
    for k, (x, y, m) in enumerate(zip(a, b, margins)):
        x, y, m = float(x), float(y), float(m)
        nx, ny = math.isnan(x), math.isnan(y)
        if nx and ny:
            continue
        if nx:
            return 1, k
        if ny:
            return 0, k
        if x > y + m:
            return 0, k
        if y > x + m:
            return 1, k
    return None, None


def factor_margins(values: torch.Tensor, margins: Sequence[float], scale: str = "absolute") -> list[float]:
    """The absolute margins ``delta_k`` for factor values ``values`` ``(N, K)``.

    ``scale="absolute"``: ``delta_k = margins[k]``; ``"std"``: ``margins[k]`` times the unbiased
    standard deviation of column k over its finite entries (0 when fewer than two are finite:
    no spread to scale by).
    """
    if scale not in MARGIN_SCALES:
        raise ValueError(f"margin scale must be one of {MARGIN_SCALES}, got {scale!r}")
    if any(not (float(m) >= 0) for m in margins):
        raise ValueError(f"margins must be >= 0, got {list(margins)}")
    if scale == "absolute":
        return [float(m) for m in margins]
    v = torch.as_tensor(values, dtype=torch.float64).reshape(-1, len(margins))
    out = []
    for k, m in enumerate(margins):
        col = v[:, k][torch.isfinite(v[:, k])]
        sd = float(col.std()) if col.numel() >= 2 else 0.0
        out.append(float(m) * sd)
    return out


@dataclass
class HeronLabels:
    """Labels of every within-group pair: ``pairs`` (better, worse) row indices, ``levels`` the
    deciding factor of each, ``ties`` the number of pairs no level decided, ``margins`` used."""

    pairs: list[tuple[int, int]] = field(default_factory=list)
    levels: list[int] = field(default_factory=list)
    ties: int = 0
    margins: list[float] = field(default_factory=list)

    def level_counts(self, k: int) -> list[int]:
        """How many pairs each of ``k`` levels decided."""
        return [self.levels.count(i) for i in range(k)]


def _group_pairs(groups: Sequence[int]) -> list[tuple[int, int]]:
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(int(g), []).append(i)
    return [(idx[a], idx[b]) for idx in members.values() for a in range(len(idx)) for b in range(a + 1, len(idx))]


def heron_label(values: torch.Tensor, groups: Sequence[int], margins: Sequence[float], scale: str = "absolute") -> HeronLabels:
    """HERON labels of every pair of rows that share a group id.

    ``values``: ``(N, K)`` factor values, most important first; ``groups``: N ids (the samples
    of one prompt share one); ``margins``/``scale``: see :func:`factor_margins` (with ``"std"``
    the spread is over all N rows, the reference's "batch being labelled").
    """
    v = torch.as_tensor(values, dtype=torch.float64)
    if v.ndim != 2 or v.shape[1] != len(margins) or v.shape[0] != len(groups):
        raise ValueError(f"heron_label: values {tuple(v.shape)} for {len(groups)} group ids and {len(margins)} margins")
    d = factor_margins(v, margins, scale)
    out = HeronLabels(margins=d)
    rows = v.tolist()
    for i, j in _group_pairs(groups):
        w, k = heron_compare(rows[i], rows[j], d)
        if w is None:
            out.ties += 1
            continue
        out.pairs.append((i, j) if w == 0 else (j, i))
        out.levels.append(k)
    return out


def weighted_label(values: torch.Tensor, groups: Sequence[int], weights: Sequence[float], tol: float = 0.0) -> HeronLabels:
    """The usual alternative to a hierarchy: compare ``sum_k w_k z_k`` (NaN terms skipped; all
    NaN is NaN, which loses), a tie when the sums are within ``tol``. Same output as
    :func:`heron_label` (``levels`` all 0)."""
    v = torch.as_tensor(values, dtype=torch.float64)
    w = torch.as_tensor([float(x) for x in weights], dtype=torch.float64)
    if v.ndim != 2 or v.shape[1] != len(w):
        raise ValueError(f"weighted_label: values {tuple(v.shape)} for {len(w)} weights")
    terms = v * w
    s = torch.where(torch.isfinite(terms), terms, torch.zeros_like(terms)).sum(1)
    s = torch.where(torch.isfinite(v).any(1), s, math.nan)
    out = HeronLabels(margins=[float(tol)])
    vals = s.tolist()
    for i, j in _group_pairs(groups):
        w_, _ = heron_compare([vals[i]], [vals[j]], [tol])
        if w_ is None:
            out.ties += 1
            continue
        out.pairs.append((i, j) if w_ == 0 else (j, i))
        out.levels.append(0)
    return out


# --------------------------------------------------------------------------------------------
# the reward model


def save_model(path: Union[str, Path], head: nn.Module, backbone: dict, factors: Sequence[dict], margin_scale: str,
               report: Optional[dict] = None) -> Path:
    """Write a HERON reward model: head weights and stats; metadata = the manifest (format,
    backbone spec, head config, the factor hierarchy ``[{name, margin}, ...]``, margin scale,
    training report). Written to a temp file, then renamed."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "backbone": json.dumps(backbone, sort_keys=True), "head": json.dumps(head.config()),
            "factors": json.dumps(list(factors)), "margin_scale": margin_scale, "report": json.dumps(report or {})}
    tmp = path.with_name("." + path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


_TRAIN_HINT = "train one with: python -m rewards.heron --groups FILE.jsonl --factor NAME:MARGIN ... --out FILE (docs/heron.md)"


def read_model(path: Union[str, Path]):
    """``(head, manifest)`` from a file written by :func:`save_model`; the manifest holds
    ``backbone``, ``factors``, ``margin_scale`` and ``report``."""
    from .itercomp_rm import RewardHead, read_tagged

    p = Path(path)
    sd, meta = read_tagged(p, FORMAT, "heron_rm", "a HERON reward model", "rewards.heron", _TRAIN_HINT)
    cfg = json.loads(meta["head"])
    head = RewardHead(cfg["dim"], cfg["hidden"], cfg["dropout"])
    try:
        head.load_state_dict(sd)
    except RuntimeError as e:
        raise RewardError(f"heron_rm: {p}: weights do not match the head it describes ({str(e)[:200]})") from None
    manifest = {"backbone": json.loads(meta["backbone"]), "factors": json.loads(meta.get("factors", "[]")),
                "margin_scale": meta.get("margin_scale"), "report": json.loads(meta.get("report", "{}"))}
    return head, manifest


@register(
    "heron_rm",
    differentiable=True,
    description="HERON reward model: frozen backbone + a head trained with Bradley-Terry on hierarchical (ranked-factor) preferences (path=file)",
)
class HeronRewardModel(Reward):
    """Score of a trained HERON reward model, standardised (mean 0, std 1 over its training
    images; higher better). Options: ``path`` (a file written by :func:`train_heron_rm`),
    ``device``, ``dtype``, ``fingerprint`` (ignored; part of the load cache key).
    ``manifest`` holds the factor hierarchy and the training report."""

    needs_prompt = True

    def __init__(self, path: str, device: Optional[str] = None, dtype: Optional[str] = None, fingerprint: Optional[str] = None):
        super().__init__()
        from .itercomp_rm import load_backbone

        if not path:
            raise RewardError(f"heron_rm: option path is required; {_TRAIN_HINT}")
        head, manifest = read_model(Path(str(path)).expanduser())
        self.manifest = manifest
        self.backbone = load_backbone(manifest["backbone"], device, dtype)
        self.head = head.to(self.backbone.device).eval().requires_grad_(False)

    def forward(self, images, prompts=None, **context):
        if prompts is None:
            raise RewardError(f"{self.name}: needs a prompt per image")
        if isinstance(prompts, str):
            prompts = [prompts] * images.shape[0]
        img = self.backbone.image_embeddings(images)
        txt = self.backbone.text_embeddings(list(prompts)).to(img.device)
        return self.head(img, txt).to(images.device)


@torch.no_grad()
def _embed(backbone, images: torch.Tensor, prompts: Sequence[str], batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    img, txt = [], []
    for s in range(0, images.shape[0], batch_size):
        x = images[s : s + batch_size].to(backbone.device).float()
        img.append(backbone.image_embeddings(x).float().cpu())
        txt.append(backbone.text_embeddings(list(prompts[s : s + batch_size])).float().cpu())
    return torch.cat(img), torch.cat(txt)


def train_heron_rm(images: torch.Tensor, prompts: Sequence[str], pairs: Sequence[tuple[int, int]], backbone: dict, *,
                   out: Optional[Union[str, Path]] = None, factors: Sequence[dict] = (), margin_scale: str = "absolute",
                   val_pairs: Sequence[tuple[int, int]] = (), hidden: int = 64, dropout: float = 0.0, epochs: int = 60,
                   batch_size: int = 64, lr: float = 1e-3, weight_decay: float = 1e-4, seed: int = 0,
                   report: Optional[dict] = None):
    """Train a HERON reward head with the Bradley-Terry loss on ``pairs`` (better, worse) of rows
    of ``images`` ``(N, 3, H, W)`` in [0, 1] with ``prompts`` (N); the backbone ``{kind: ...}``
    (``rewards.itercomp_rm.load_backbone``) stays frozen and features are cached once.

    ``val_pairs``: held-out pairs (the best epoch by their loss is kept; none: the last epoch).
    The output is standardised by the mean and std of the head's scores on all N images. With
    ``out`` the model is written there (:func:`save_model`). Returns ``(head, report)``.
    """
    from .itercomp_rm import RewardHead, load_backbone, pair_accuracy, pairwise_ranking_loss, train_pairwise_head

    if not pairs:
        raise RewardError("heron_rm: no labelled pairs to train on (every pair tied); lower the margins or add samples")
    bb = load_backbone(backbone)
    img, txt = _embed(bb, images, prompts)
    torch.manual_seed(seed)
    head = RewardHead(img.shape[1], hidden=hidden, dropout=dropout)
    head.fit_features(img, txt)
    P = torch.tensor(list(pairs), dtype=torch.long)
    V = torch.tensor(list(val_pairs), dtype=torch.long) if len(val_pairs) else None

    def score(idx):
        w, l = P[idx, 0], P[idx, 1]
        return head.raw(img[w], txt[w]), head.raw(img[l], txt[l])

    def evaluate(Q):
        def f():
            head.eval()
            with torch.no_grad():
                rw, rl = head.raw(img[Q[:, 0]], txt[Q[:, 0]]), head.raw(img[Q[:, 1]], txt[Q[:, 1]])
                return float(pairwise_ranking_loss(rw, rl)), pair_accuracy(rw, rl)
        return f

    best, history = train_pairwise_head(head, score, len(P), evaluate(P), evaluate(V) if V is not None else None, epochs=epochs,
                                        batch_size=batch_size, lr=lr, weight_decay=weight_decay, seed=seed)
    head.eval()
    with torch.no_grad():
        r = head.raw(img, txt)
        head.mean.fill_(float(r.mean()))
        head.std.fill_(float(r.std()) if r.numel() > 1 else 1.0)
    rep = dict(report or {})
    rep.update({"pairs": len(P), "val_pairs": 0 if V is None else len(V), "best_epoch": best, "history": history,
                "train_acc": evaluate(P)()[1], "val_acc": evaluate(V)()[1] if V is not None else None})
    if out is not None:
        save_model(out, head, backbone, factors, margin_scale, rep)
    return head, rep


# --------------------------------------------------------------------------------------------
# command line: python -m rewards.heron


def _parse_factor(s: str) -> dict:
    name, sep, m = s.rpartition(":")
    if not sep or not name:
        raise RewardError(f"--factor {s!r}: expected NAME:MARGIN (a registered reward and a margin >= 0), e.g. shapes_attribute:0.1")
    try:
        margin = float(m)
    except ValueError:
        raise RewardError(f"--factor {s!r}: margin {m!r} is not a number") from None
    if not (margin >= 0) or math.isinf(margin):
        raise RewardError(f"--factor {s!r}: margin must be a finite number >= 0")
    return {"name": name, "margin": margin}


def _read_groups(path: Path) -> tuple[list[str], list[str], list[int]]:
    """Image groups from JSONL: one object per line, ``{"prompt": ..., "images": [paths]}``
    (paths relative to the file's folder or absolute). Returns (paths, prompts, group ids)."""
    if not path.is_file():
        raise RewardError(f"--groups: {path} not found")
    paths, prompts, groups = [], [], []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise RewardError(f"--groups: {path} line {n}: not valid JSON ({e.msg})") from None
        ims = rec.get("images") if isinstance(rec, dict) else None
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) or not isinstance(ims, list) or len(ims) < 2 \
                or not all(isinstance(x, str) for x in ims):
            raise RewardError(f"--groups: {path} line {n}: expected {{\"prompt\": str, \"images\": [at least two paths]}}")
        g = len(set(groups)) if groups else 0
        for x in ims:
            p = Path(x) if os.path.isabs(x) else path.parent / x
            paths.append(str(p))
            prompts.append(rec["prompt"])
            groups.append(g)
    if not paths:
        raise RewardError(f"--groups: {path} has no groups")
    return paths, prompts, groups


def factor_values(scorers: Sequence[Reward], images: torch.Tensor, prompts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """``(N, K)`` float64 values of K scorers on ``images`` ``(N, 3, H, W)`` (no gradient)."""
    cols = []
    with torch.no_grad():
        for r in scorers:
            vals = []
            for s in range(0, images.shape[0], batch_size):
                x = images[s : s + batch_size].to(r.device)
                vals.append(r(x, list(prompts[s : s + batch_size])).double().cpu())
            cols.append(torch.cat(vals))
    return torch.stack(cols, 1)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rewards.heron", description="Train a HERON reward model: label every within-group "
                                 "pair by ranked factors (most important first), then fit a Bradley-Terry head on a frozen backbone.")
    ap.add_argument("--groups", required=True, help="JSONL, one group per line: {\"prompt\": ..., \"images\": [paths]}")
    ap.add_argument("--factor", action="append", required=True, metavar="NAME:MARGIN",
                    help="a registered reward and its margin, most important first (repeat the flag)")
    ap.add_argument("--margin-scale", choices=MARGIN_SCALES, default="absolute",
                    help="absolute: margins in the factor's units; std: margin x the factor's std over the samples (the reference)")
    ap.add_argument("--backbone", default='{"kind": "shapes", "which": "judge"}', help="frozen backbone spec (JSON), as itercomp_rm")
    ap.add_argument("--out", required=True, help="output .safetensors file")
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import rewards

    try:
        factors = [_parse_factor(f) for f in args.factor]
        try:
            backbone = json.loads(args.backbone)
        except json.JSONDecodeError as e:
            raise RewardError(f"--backbone: not valid JSON ({e.msg})") from None
        if not isinstance(backbone, dict) or "kind" not in backbone:
            raise RewardError("--backbone: expected a JSON object with a \"kind\", e.g. {\"kind\": \"shapes\", \"which\": \"judge\"}")
        if not args.out.endswith(".safetensors"):
            raise RewardError(f"--out {args.out!r}: the model is a .safetensors file; end the name with .safetensors")
        if args.epochs < 1:
            raise RewardError(f"--epochs {args.epochs}: must be >= 1")
        paths, prompts, groups = _read_groups(Path(args.groups))
        scorers = [rewards.load(f["name"]) for f in factors]
        images = torch.stack([rewards.load_image(p) for p in paths])
        values = factor_values(scorers, images, prompts)
        labels = heron_label(values, groups, [f["margin"] for f in factors], args.margin_scale)
        log.info("heron: %d pairs labelled (per level %s), %d ties", len(labels.pairs), labels.level_counts(len(factors)), labels.ties)
        _, rep = train_heron_rm(images, prompts, labels.pairs, backbone, out=args.out, factors=factors, margin_scale=args.margin_scale,
                                hidden=args.hidden, epochs=args.epochs, seed=args.seed,
                                report={"ties": labels.ties, "levels": labels.level_counts(len(factors)), "margins": labels.margins})
    except (RewardError, rewards.ImageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    log.info("heron: wrote %s (train pair accuracy %.3f)", args.out, rep["train_acc"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
