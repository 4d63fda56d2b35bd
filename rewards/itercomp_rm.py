"""IterComp's composition-aware reward models: a frozen image-text backbone, one head per aspect.

IterComp (Zhang et al. 2024, arXiv:2410.07171, Sec. 3.2; github.com/YangLing0818/IterComp
``train/``) trains one reward model per compositional aspect (attribute binding, spatial,
non-spatial) on image-rank pairs from a gallery of models, with ImageReward's (Xu et al. 2023)
pairwise ranking loss: for every ordered pair of a ranking (better ``x_w``, worse ``x_l``) of
the images of one prompt ``y``,

    L = - E_(y, x_w, x_l) [ log sigmoid( r(x_w, y) - r(x_l, y) ) ]

(the reference writes it as cross-entropy over ``[r_w, r_l]`` with target 0, the same thing).
The reference fine-tunes BLIP with an MLP head; here the backbone (open_clip or transformers
CLIP) stays frozen and each aspect gets a small MLP head over the image embedding, the prompt
embedding and their product, so heads train in seconds on cached embeddings and the scorer is
differentiable in the pixels (ReFL backpropagates through it). As in ImageReward the output is
standardised by the mean and std of the training images' scores.

A trained model is a safetensors file (one per aspect) whose metadata holds the backbone spec,
the head's shape and its training report; ``rewards.load("itercomp_rm", path=...)`` loads one
file, several, or a folder of them. With several aspects the score is their weighted sum, or,
with ``hinge_margin=m``, ``m - sum_c w_c relu(m - r_c)``: ReFL's ``relu(m - reward)`` on that is
exactly the reference's multi-reward loss ``sum_c relu(m - r_c)`` (``feedback_train.py``).
"""
from __future__ import annotations

import json
import logging
import math
import threading
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import _hub
from .base import Reward, RewardError, register

log = logging.getLogger(__name__)

FORMAT = "vfeedback.itercomp_rm/1"


# --------------------------------------------------------------------------------------------
# the loss


def ranking_pairs(ranking: Sequence[int], n: Optional[int] = None) -> list[tuple[int, int]]:
    """Every ordered pair ``(better, worse)`` of a best-first ranking.

    ``ranking`` lists indices best first; with ``n`` given, indices in ``range(n)`` missing from
    the ranking (a top-k answer) count as worse than every ranked one, unordered among
    themselves.
    """
    ranked = [int(i) for i in ranking]
    pairs = [(ranked[a], ranked[b]) for a in range(len(ranked)) for b in range(a + 1, len(ranked))]
    if n is not None:
        rest = [i for i in range(n) if i not in set(ranked)]
        pairs += [(r, u) for r in ranked for u in rest]
    return pairs


def pairwise_ranking_loss(r_better: torch.Tensor, r_worse: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """``-log sigmoid(r_better - r_worse)`` per pair (ImageReward / IterComp), averaged."""
    loss = -F.logsigmoid(r_better - r_worse)
    return loss.mean() if reduction == "mean" else loss


def pair_accuracy(r_better: torch.Tensor, r_worse: torch.Tensor) -> float:
    """Fraction of pairs the scores order correctly (ties count half)."""
    d = (r_better - r_worse).detach()
    if d.numel() == 0:
        return math.nan
    return float(((d > 0).float() + 0.5 * (d == 0).float()).mean())


def train_pairwise_head(head: nn.Module, score: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], n: int,
                        evaluate_train: Callable[[], tuple[float, float]],
                        evaluate_val: Optional[Callable[[], tuple[float, float]]] = None, *, epochs: int,
                        batch_size: int, lr: float, weight_decay: float, seed: int,
                        start_val_loss: float = math.inf) -> tuple[int, list[dict]]:
    """Train a reward head on ``n`` (better, worse) pairs with ``pairwise_ranking_loss``; keep the best epoch.

    Each epoch visits the pairs in a fresh ``torch.randperm(n)`` order (a generator seeded with
    ``seed``) in mini-batches of ``batch_size``; ``score(idx)`` gives the head's
    ``(r_better, r_worse)`` for the pair indices ``idx``; AdamW steps on the mean loss.
    ``evaluate_val()`` / ``evaluate_train()`` give ``(loss, pair accuracy)``. With validation,
    the epoch with the lowest validation loss is kept (epoch 0, the starting weights, when
    none beats ``start_val_loss``); without, the last epoch. A history record (train and
    validation loss and accuracy) is taken at epoch 1, every ``epochs // 10`` and the last.
    The kept weights are loaded into ``head``; returns ``(best epoch, history)``.
    """
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(seed)
    has_val = evaluate_val is not None
    # best[0] is read only when there is a validation set (without one every epoch replaces best)
    best = (start_val_loss, 0, {k: v.clone() for k, v in head.state_dict().items()})
    history = []
    for epoch in range(1, epochs + 1):
        head.train()
        perm = torch.randperm(n, generator=g)
        for s in range(0, n, batch_size):
            idx = perm[s : s + batch_size]
            loss = pairwise_ranking_loss(*score(idx))
            opt.zero_grad(set_to_none=True)  # pragma: no mutate: zeroed or freed gradients give the same AdamW step
            loss.backward()
            opt.step()
        vl, vacc = evaluate_val() if has_val else (float("nan"), float("nan"))  # pragma: no mutate: float("NAN") is the same NaN
        if not has_val or vl < best[0]:
            best = (vl, epoch, {k: v.clone() for k, v in head.state_dict().items()})
        if epoch == 1 or epoch % max(1, epochs // 10) == 0 or epoch == epochs:
            tl, tacc = evaluate_train()
            history.append({"epoch": epoch, "train_loss": tl, "train_acc": tacc, "val_loss": vl, "val_acc": vacc})
    head.load_state_dict(best[2])
    return best[1], history


# --------------------------------------------------------------------------------------------
# backbones: images and prompts -> L2-normalised embeddings


_BACKBONES: dict[tuple, "Backbone"] = {}
_LOCK = threading.Lock()


class Backbone(nn.Module):
    """A frozen CLIP: ``spec = {"kind": "open_clip", "model": ..., "pretrained": ...}`` (any
    open_clip name, ``hf-hub:`` or ``local-dir:`` folder) or ``{"kind": "hf_clip", "model":
    hub id or folder, "processor": optional}``. Differentiable in the pixels."""

    def __init__(self, spec: dict, device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.spec = dict(spec)
        kind = self.spec.get("kind", "open_clip")
        self._dtype = dtype
        self._text: dict[str, torch.Tensor] = {}
        from .preprocess import TorchPreprocess

        if kind == "open_clip":
            from .clip import load_open_clip
            from .preprocess import spec_from_open_clip

            self.model, self.tokenizer = load_open_clip(self.spec["model"], self.spec.get("pretrained"), device, dtype, "itercomp_rm", "backbone.pretrained")
            self.preprocess = TorchPreprocess(spec_from_open_clip(self.model))
        elif kind == "hf_clip":
            from .pickscore import load_hf_clip
            from .preprocess import spec_from_hf_image_processor

            self.model, self.processor = load_hf_clip(self.spec["model"], self.spec.get("processor") or self.spec["model"], device, dtype, "itercomp_rm")
            self.preprocess = TorchPreprocess(spec_from_hf_image_processor(self.processor))
        elif kind == "shapes":
            # the shapes world's frozen "image-text backbone" (CPU runs): the learned judge reads
            # the image, the caption parser reads the prompt (ShapesReader)
            self.model = ShapesReader(self.spec.get("which", "judge"), self.spec.get("weights")).to(device)
        else:
            raise RewardError(f"itercomp_rm: backbone kind must be open_clip, hf_clip or shapes, got {kind!r}")
        self.kind = kind

    @property
    def device(self):
        return next(self.model.parameters()).device

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        if self.kind == "shapes":
            return self.model.image_embeddings(images.to(self.device))
        x = self.preprocess(images.to(self.device), dtype=self._dtype)
        if self.kind == "open_clip":
            e = self.model.encode_image(x).float()
        else:
            e = self.model.visual_projection(self.model.vision_model(pixel_values=x).pooler_output).float()
        return e / e.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def _encode_text(self, prompts: list[str]) -> torch.Tensor:
        if self.kind == "shapes":
            return self.model.text_embeddings(prompts).to(self.device)
        if self.kind == "open_clip":
            t = self.model.encode_text(self.tokenizer(prompts).to(self.device)).float()
        else:
            tok = self.processor.tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt").to(self.device)
            t = self.model.text_projection(self.model.text_model(**tok).pooler_output).float()
        return t / t.norm(dim=-1, keepdim=True)

    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        missing = list(dict.fromkeys(p for p in prompts if p not in self._text))
        if missing:
            if len(self._text) > 8192:
                self._text.clear()
            for p, e in zip(missing, self._encode_text(missing)):
                self._text[p] = e
        return torch.stack([self._text[p] for p in prompts])


class ShapesReader(nn.Module):
    """Backbone ``{"kind": "shapes", "which": "judge"}``: image-text embeddings in the shapes world.

    Image: the frozen judge's reading (``rewards.shapes``), per colour x shape category the count
    distribution (4) and the centre (2, centred), flattened. Prompt: the parsed caption in the same
    layout, the count asked for (one-hot; "a red circle": uniform over 1-3) and, for a relation,
    the direction each object should lie from the other (left of: -x for the first object, +x
    for the second). Their product, which the head sees, pairs each reading with what the
    caption asks of it, so a head can learn composition from a few hundred pairs; the reading
    stays differentiable in the pixels. Not L2-normalised: the head standardises features.
    """

    def __init__(self, which: str = "judge", weights: Optional[str] = None):
        super().__init__()
        from .shapes import ASSETS, load_judge

        if which not in ("judge", "judge_heldout"):
            raise RewardError(f"itercomp_rm: backbone which must be judge or judge_heldout, got {which!r}")
        self.net = load_judge(weights or ASSETS / f"{which}.safetensors")

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        from .shapes import prepare

        counts, coords, _ = self.net(prepare(images.float()))
        return torch.cat([counts.softmax(-1), coords - 0.5], -1).flatten(1)

    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        from .shapes import N_CATEGORIES, parse

        out = torch.zeros(len(prompts), N_CATEGORIES, 6)
        axis = {"left of": (0, -1.0), "right of": (0, 1.0), "above": (1, -1.0), "below": (1, 1.0)}
        for i, p in enumerate(prompts):
            spec = parse(p)
            if spec is None:
                raise RewardError(f"itercomp_rm: backbone shapes reads shapes-world captions only, got {p!r}")
            for it in spec.items:
                if it.count is None:
                    out[i, it.category, 1:4] = 1 / 3
                else:
                    out[i, it.category, it.count] = 1.0
            if spec.relation is not None:
                a, sign = axis[spec.relation]
                out[i, spec.items[0].category, 4 + a] = sign
                out[i, spec.items[1].category, 4 + a] = -sign
        return out.flatten(1)


def load_backbone(spec: dict, device=None, dtype=None) -> Backbone:
    """A cached, frozen :class:`Backbone` for ``spec``."""
    dev = _hub.parse_device(device)
    dt = _hub.parse_dtype(dtype, dev) if dtype is not None else torch.float32
    key = (json.dumps(spec, sort_keys=True), str(dev), str(dt))
    with _LOCK:
        if key not in _BACKBONES:
            _BACKBONES[key] = Backbone(spec, dev, dt).requires_grad_(False).eval()
        return _BACKBONES[key]


# --------------------------------------------------------------------------------------------
# the head


class RewardHead(nn.Module):
    """MLP over ``[e_img, e_txt, e_img * e_txt]`` -> one score; standardised by stored stats."""

    def __init__(self, dim: int, hidden: int = 256, dropout: float = 0.1):
        super().__init__()
        self.dim, self.hidden, self.dropout = dim, hidden, dropout
        self.mlp = nn.Sequential(
            nn.Linear(3 * dim, hidden), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(hidden, max(hidden // 4, 4)), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(max(hidden // 4, 4), 1),
        )
        # output statistics (ImageReward's standardisation) and input feature statistics: a
        # frozen backbone's embeddings of similar images are nearly collinear, so each feature
        # is centred and scaled by its spread over the training set before the MLP
        self.register_buffer("mean", torch.zeros(()))
        self.register_buffer("std", torch.ones(()))
        self.register_buffer("feat_mean", torch.zeros(2, dim))
        self.register_buffer("feat_std", torch.ones(2, dim))

    @torch.no_grad()
    def fit_features(self, img: torch.Tensor, txt: torch.Tensor) -> None:
        """Set the input standardisation from training embeddings ``(N, dim)`` each."""
        for k, x in enumerate((img, txt)):
            self.feat_mean[k] = x.float().mean(0)
            if x.shape[0] > 1:
                # a feature constant over the training set (a sparse caption code: a category no
                # training prompt names) is left unscaled, not blown up by a tiny spread
                std = x.float().std(0)
                self.feat_std[k] = torch.where(std > 1e-3, std, torch.ones_like(std))
            else:
                self.feat_std[k] = 1.0

    def raw(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        txt = txt.to(img)
        img = (img - self.feat_mean[0]) / self.feat_std[0]
        txt = (txt - self.feat_mean[1]) / self.feat_std[1]
        return self.mlp(torch.cat([img, txt, img * txt], -1)).squeeze(-1)

    def forward(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        return (self.raw(img, txt) - self.mean) / self.std.clamp_min(1e-6)

    def config(self) -> dict:
        return {"dim": self.dim, "hidden": self.hidden, "dropout": self.dropout}


def save_head(path: Union[str, Path], head: RewardHead, backbone: dict, category: str, report: Optional[dict] = None) -> Path:
    """Write one aspect's reward model: head weights + stats, metadata (format, backbone spec,
    head config, category, training report). Written to a temp file, then renamed."""
    import os

    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT, "backbone": json.dumps(backbone, sort_keys=True), "head": json.dumps(head.config()),
            "category": category, "report": json.dumps(report or {})}
    tmp = path.with_name("." + path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def read_tagged(p: Path, fmt: str, who: str, what: str, written_by: str, hint: str = "") -> tuple[dict, dict]:
    """``(state dict, metadata)`` of a safetensors file whose metadata ``format`` is ``fmt``;
    a missing, unreadable or foreign file is a :class:`RewardError` naming it (``who``: the
    reward's name, ``what``: what the file should be, ``written_by``: what writes one,
    ``hint``: appended to each message)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    tail = f"; {hint}" if hint else ""
    if not p.is_file():
        raise RewardError(f"{who}: no reward model file {p}{tail}")
    try:
        with safe_open(str(p), "pt") as f:
            meta = f.metadata() or {}
        sd = load_file(str(p))
    except Exception as e:  # not a safetensors file
        raise RewardError(f"{who}: cannot read {p} ({type(e).__name__}: {str(e)[:200]}); expected a .safetensors file "
                          f"written by {written_by}{tail}") from None
    if meta.get("format") != fmt:
        raise RewardError(f"{who}: {p} is not {what} (metadata format {meta.get('format')!r}, expected {fmt}){tail}")
    return sd, meta


def read_head(path: Union[str, Path]) -> tuple[RewardHead, dict, str, dict]:
    """``(head, backbone spec, category, report)`` from a file written by :func:`save_head`."""
    p = Path(path)
    sd, meta = read_tagged(p, FORMAT, "itercomp_rm", "an IterComp reward model", "the itercomp loop")
    cfg = json.loads(meta["head"])
    head = RewardHead(cfg["dim"], cfg["hidden"], cfg["dropout"])
    head.load_state_dict(sd)
    return head, json.loads(meta["backbone"]), meta.get("category", p.stem), json.loads(meta.get("report", "{}"))


def _files(path) -> list[Path]:
    items = path if isinstance(path, (list, tuple)) else [path]
    out: list[Path] = []
    for it in items:
        p = Path(str(it)).expanduser()
        if p.is_dir():
            found = sorted(p.glob("*.safetensors"))
            if not found:
                raise RewardError(f"itercomp_rm: folder {p} holds no *.safetensors reward models")
            out.extend(found)
        else:
            out.append(p)
    return out


@register(
    "itercomp_rm",
    differentiable=True,
    description="IterComp composition-aware reward model(s): frozen CLIP + a head per aspect trained on gallery rankings (path=file, files or folder)",
)
class CompositionRewardModel(Reward):
    """Scores of one or several trained aspect heads sharing one frozen backbone.

    Options: ``path`` (a ``.safetensors`` file, a list of files, or a folder of them, one per
    aspect), ``weights`` (``{aspect: weight}``; default 1 each), ``hinge_margin`` (None: the
    weighted sum; a number m: ``m - sum_c w_c relu(m - r_c)``, see the module docstring),
    ``device``, ``dtype``, ``fingerprint`` (ignored; part of the load cache key so a retrained
    file at the same path is not served from the cache). Each aspect's score is standardised
    (mean 0, std 1 over its training images). ``last_components`` holds each aspect's score.
    """

    needs_prompt = True

    def __init__(self, path: Union[str, Sequence[str]], weights: Optional[dict] = None, hinge_margin: Optional[float] = None,
                 device: Optional[str] = None, dtype: Optional[str] = None, fingerprint: Optional[str] = None):
        super().__init__()
        heads, spec = {}, None
        self.reports = {}
        for f in _files(path):
            head, bb, cat, report = read_head(f)
            if spec is not None and bb != spec:
                raise RewardError(f"itercomp_rm: {f} uses backbone {bb}, the others {spec}; heads loaded together must share one backbone")
            spec = bb
            if cat in heads:
                raise RewardError(f"itercomp_rm: two reward models for aspect {cat!r} (second: {f})")
            heads[cat] = head
            self.reports[cat] = report
        self.backbone_spec = spec
        self.backbone = load_backbone(spec, device, dtype)
        self.heads = nn.ModuleDict(heads).to(self.backbone.device).eval().requires_grad_(False)
        weights = dict(weights or {})
        unknown = [k for k in weights if k not in heads]
        if unknown:
            raise RewardError(f"itercomp_rm: weights name aspect(s) {unknown} not among the loaded {sorted(heads)}")
        self.weights = {c: float(weights.get(c, 1.0)) for c in heads}
        self.hinge_margin = None if hinge_margin is None else float(hinge_margin)
        self.last_components: dict[str, torch.Tensor] = {}

    @property
    def categories(self) -> list[str]:
        return list(self.heads)

    def components(self, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Each aspect's standardised score ``(B,)``."""
        img = self.backbone.image_embeddings(images)
        txt = self.backbone.text_embeddings(list(prompts)).to(img.device)
        return {c: h(img, txt) for c, h in self.heads.items()}

    def forward(self, images, prompts=None, **context):
        if prompts is None:
            raise RewardError(f"{self.name}: needs a prompt per image")
        if isinstance(prompts, str):
            prompts = [prompts] * images.shape[0]
        comps = self.components(images, prompts)
        self.last_components = {c: v.detach() for c, v in comps.items()}
        if self.hinge_margin is not None:
            m = self.hinge_margin
            total = m - sum(self.weights[c] * F.relu(m - v) for c, v in comps.items())
        else:
            total = sum(self.weights[c] * v for c, v in comps.items())
        return total.to(images.device)  # pragma: no mutate: placement, equivalent on CPU
