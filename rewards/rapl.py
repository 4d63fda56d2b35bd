"""RAPL: a reward from a visual representation aligned to a person's preferences.

Tian et al., "What Matters to You? Towards Visual Representation Alignment for Robot
Learning" (ICLR 2024, arXiv:2310.07932). A frozen vision encoder is followed by a small
trainable projection ``phi``; the projection is fine-tuned on a few *preference triplets* so
that distances between embedded videos agree with the person's, and the robot's reward is an
optimal-transport (OT) matching of the episode's embedded frames against those of a preferred
demonstration.

Distance between two videos (embedded frames ``x_1..x_T`` and ``y_1..y_S``): the entropic OT
cost under the cosine cost ``C_ts = 1 - cos(x_t, y_s)``,

    P* = argmin_{P 1 = 1/T, P^T 1 = 1/S}  <P, C> - eps H(P)           (Sinkhorn, log domain)
    d(x, y) = <P*, C> = sum_t sum_s P*_ts C_ts

and the per-frame reward of frame ``t`` against demonstration ``y`` is
``r_t = - sum_s P*_ts C_ts`` (paper Sec. 4, the OT reward of ROT / Haldar et al. 2022; the
authors' training scripts compute it as ``-diag(P C^T)`` with ``batch_cosine_distance`` and
ddn's ``OptimalTransportLayer(gamma=1)``, i.e. ``eps = 1 / gamma = 1``, uniform marginals).

Alignment (paper Eq. 3, the scripts' ``get_batch_ot_reward``): a triplet is an anchor video
``o+`` (a preferred demonstration) and two videos ``o_a``, ``o_b`` of which the person says
``o_a`` is the more similar to ``o+`` (the closer to what they want). With ``R(o) = -d(o+, o)``
the Bradley-Terry likelihood is

    P(o_a > o_b | o+) = exp(R(o_a)) / (exp(R(o_a)) + exp(R(o_b))),   L = -log P = softplus(d_a - d_b)

(``loss="bt"``, the reference's); ``loss="hinge"`` is the classic triplet margin loss
``relu(d_a - d_b + margin)``, our option.

Our choices (stated where they differ from the reference): the encoder is frozen and only a
linear projection is trained (the reference fine-tunes a ResNet-18 end to end; the paper's
issue asks for a frozen encoder); the encoder's features are centred by their mean over the
alignment frames before the projection; with several preferred demonstrations the episode is
matched against the closest one (smallest OT distance, as ROT does); :meth:`RAPLModel.frame_rewards`
returns ``T * r_t`` (the row-conditional expected cost, independent of the episode length),
a constant factor on the reference's ``r_t`` for a fixed length. The Sinkhorn solver is ours
(30 lines, batched and differentiable, which the triplet loss needs); tests pin it against
POT (``ot.sinkhorn``) and a closed form.

A trained model is a folder: ``manifest.json`` (format, encoder spec, epsilon, the weights
file's sha256, the training report) and ``rapl.safetensors`` (projection, feature mean and the
preferred demonstrations' frames as uint8). ``rewards.load("rapl", path=FOLDER)`` loads it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .base import Reward, RewardError, register

log = logging.getLogger(__name__)

FORMAT = "vfeedback.rapl/1"
WEIGHTS = "rapl.safetensors"
MANIFEST = "manifest.json"
LOSSES = ("bt", "hinge")


# --------------------------------------------------------------------------------------------
# optimal transport


def cosine_cost(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``1 - cos(x_t, y_s)``: ``(..., T, D)``, ``(..., S, D)`` -> ``(..., T, S)`` in ``[0, 2]``."""
    xn = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    yn = y / y.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return 1.0 - xn @ yn.transpose(-1, -2)


def _check_eps(epsilon: float) -> float:
    e = float(epsilon)
    if not (e > 0 and math.isfinite(e)):
        raise RewardError(f"rapl: epsilon (the Sinkhorn entropic regularisation) must be a finite number > 0, got {epsilon!r}")
    return e


def sinkhorn_plan(cost: torch.Tensor, epsilon: float = 1.0, iters: int = 200) -> torch.Tensor:
    """Entropic OT plan with uniform marginals: ``(..., T, S)`` costs -> plan ``(..., T, S)``.

    Solves ``min <P, C> - eps H(P)`` s.t. ``P 1 = 1/T``, ``P^T 1 = 1/S`` (total mass 1; POT's
    ``ot.sinkhorn(a, b, C, reg=eps)``) by ``iters`` log-domain Sinkhorn updates of the dual
    potentials; differentiable in ``cost``.
    """
    eps = _check_eps(epsilon)
    T, S = cost.shape[-2], cost.shape[-1]
    log_a = cost.new_full((T,), -math.log(T))  # the cost's dtype and device; broadcast over the batch dims
    log_b = cost.new_full((S,), -math.log(S))
    logK = -cost / eps
    f = torch.zeros_like(log_a)  # f = eps * log u
    g = torch.zeros_like(log_b)
    for _ in range(int(iters)):
        f = log_a - torch.logsumexp(logK + g.unsqueeze(-2), dim=-1)
        g = log_b - torch.logsumexp(logK + f.unsqueeze(-1), dim=-2)
    return torch.exp(logK + f.unsqueeze(-1) + g.unsqueeze(-2))


def ot_frame_costs(x: torch.Tensor, y: torch.Tensor, epsilon: float = 1.0,
                   iters: int = 200,  # pragma: no mutate  200 or 201: on cosine costs in [0, 2] at eps 1 Sinkhorn has converged to the last bit long before
                   ) -> torch.Tensor:
    """``sum_s P*_ts C_ts`` per frame of ``x``: ``(..., T, D)``, ``(..., S, D)`` -> ``(..., T)``.

    The reference's per-frame OT reward is minus this; its sum over ``t`` is the OT distance.
    """
    c = cosine_cost(x, y)
    return (sinkhorn_plan(c, epsilon, iters) * c).sum(-1)


def ot_distance(x: torch.Tensor, y: torch.Tensor, epsilon: float = 1.0,
                iters: int = 200,  # pragma: no mutate  200 or 201: on cosine costs in [0, 2] at eps 1 Sinkhorn has converged to the last bit long before
                ) -> torch.Tensor:
    """``<P*, C>`` between two embedded videos: ``(..., T, D)``, ``(..., S, D)`` -> ``(...)``."""
    return ot_frame_costs(x, y, epsilon, iters).sum(-1)


def triplet_loss(d_pref: torch.Tensor, d_other: torch.Tensor, loss: str = "bt", margin: float = 0.0) -> torch.Tensor:
    """Per-triplet loss from the OT distances of the preferred (``d_pref``) and the other
    (``d_other``) video to the anchor; shapes broadcast, returns the same shape.

    ``bt``: ``-log(exp(-d_pref) / (exp(-d_pref) + exp(-d_other))) = softplus(d_pref - d_other)``
    (RAPL Eq. 3; ``margin`` must be 0). ``hinge``: ``relu(d_pref - d_other + margin)``.
    """
    if loss == "bt":
        if margin != 0:
            raise RewardError(f"rapl: margin={margin!r} applies to loss='hinge' only (the Bradley-Terry loss has none)")
        return F.softplus(d_pref - d_other)
    if loss == "hinge":
        if not (float(margin) >= 0 and math.isfinite(float(margin))):
            raise RewardError(f"rapl: margin must be a finite number >= 0, got {margin!r}")
        return F.relu(d_pref - d_other + float(margin))
    raise RewardError(f"rapl: loss must be one of {', '.join(LOSSES)}, got {loss!r}")


# --------------------------------------------------------------------------------------------
# the frozen encoder


class ShapesTrunk(nn.Module):
    """The shapes world judge's convolutional trunk (``rewards.shapes``), frozen: ``(B, 3, H, W)``
    in ``[0, 1]`` -> ``(B, 128 * pool * pool)``: its 8 x 8 feature maps average-pooled to
    ``pool`` x ``pool`` and flattened (a coarse spatial layout kept)."""

    def __init__(self, which: str = "judge", pool: int = 4):
        super().__init__()
        if int(pool) not in (1, 2, 4, 8):
            raise RewardError(f"rapl: encoder pool must be 1, 2, 4 or 8 (the trunk's 8 x 8 map pooled), got {pool!r}")
        self.pool = int(pool)
        from .shapes import ASSETS, load_judge

        if which not in ("judge", "judge_heldout"):
            raise RewardError(f"rapl: encoder which must be judge or judge_heldout, got {which!r}")
        self.net = load_judge(ASSETS / f"{which}.safetensors")

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from .shapes import prepare

        return F.adaptive_avg_pool2d(self.net.body(prepare(images.float())), self.pool).flatten(1)


def build_encoder(spec: dict) -> nn.Module:
    """A frozen encoder from its manifest spec (``{"kind": "shapes_trunk", "which": "judge"}``)."""
    kind = spec.get("kind")
    if kind == "shapes_trunk":
        return ShapesTrunk(spec.get("which", "judge"), spec.get("pool", 4)).eval().requires_grad_(False)
    raise RewardError(f"rapl: unknown encoder kind {kind!r}; supported: shapes_trunk")


# --------------------------------------------------------------------------------------------
# the model


def _as_frames(x) -> torch.Tensor:
    """uint8 ``(T, H, W, 3)`` / ``(T, 3, H, W)`` or float ``(T, 3, H, W)`` in [0, 1] -> float ``(T, 3, H, W)``."""
    t = torch.as_tensor(x)
    if t.ndim != 4:
        raise RewardError(f"rapl: a video must be 4-D frames (T, 3, H, W) or (T, H, W, 3), got shape {tuple(t.shape)}")
    if t.shape[1] != 3 and t.shape[-1] in (3, 4):
        t = t[..., :3].permute(0, 3, 1, 2)
    if t.dtype == torch.uint8:
        return t.float() / 255.0
    return t.float()


class RAPLModel(Reward):
    """RAPL reward: frozen ``encoder`` -> centred features -> linear projection ``phi`` (``dim``)
    -> OT matching of an episode's frames against preferred ``demos``.

    ``forward(images)``: ``images`` ``(T, 3, H, W)`` in [0, 1] are the frames of ONE episode in
    order; returns ``(T,)`` per-frame rewards (:meth:`frame_rewards`). ``demos``: preferred
    demonstrations, a tensor ``(N, S, 3, H, W)`` or a list of videos. The projection starts as a
    seeded random matrix (the *unaligned* encoder); :meth:`fit` aligns it on triplets.
    ``iters`` Sinkhorn iterations: 30 converge to float32 precision for ``epsilon = 1`` on cosine
    costs; a smaller ``epsilon`` needs more.
    """

    name = "rapl"
    differentiable = False
    needs_prompt = False

    def __init__(self, encoder: dict, demos, dim: int = 32, epsilon: float = 1.0, iters: int = 30, seed: int = 0,
                 feat_dim: Optional[int] = None):
        super().__init__()
        self.encoder_spec = dict(encoder)
        self.encoder = build_encoder(self.encoder_spec)
        self.epsilon = _check_eps(epsilon)
        self.iters = int(iters)
        if self.iters < 1:
            raise RewardError(f"rapl: iters (Sinkhorn iterations) must be >= 1, got {iters!r}")
        self.dim = int(dim)
        if self.dim < 1:
            raise RewardError(f"rapl: dim must be >= 1, got {dim!r}")
        self.seed = int(seed)
        videos = list(demos) if not isinstance(demos, torch.Tensor) else list(demos.unbind(0))
        if not videos:
            raise RewardError("rapl: needs at least one preferred demonstration (demos)")
        frames = [_as_frames(v) for v in videos]
        if len({tuple(f.shape) for f in frames}) != 1:
            raise RewardError(f"rapl: demonstrations must share one shape, got {sorted({tuple(f.shape) for f in frames})}")
        self.register_buffer("demos", (torch.stack(frames) * 255.0).round().clamp(0, 255).to(torch.uint8))
        fd = int(feat_dim) if feat_dim is not None else int(self.features(frames[0][:1]).shape[-1])
        self.register_buffer("feat_mean", torch.zeros(fd))
        self.proj = nn.Linear(fd, self.dim)
        g = torch.Generator().manual_seed(self.seed)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(self.dim, fd, generator=g) / math.sqrt(fd))
            self.proj.bias.zero_()
        self.proj.requires_grad_(False)
        self.report: dict = {}
        self._demo_emb: Optional[torch.Tensor] = None

    # -- embeddings
    @torch.no_grad()
    def features(self, frames: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Frozen encoder features ``(T, F)`` of frames ``(T, 3, H, W)`` in [0, 1]."""
        return torch.cat([self.encoder(frames[s : s + batch_size]) for s in range(0, frames.shape[0], batch_size)])

    def project(self, feats: torch.Tensor) -> torch.Tensor:
        """``(..., F)`` features -> ``(..., dim)`` aligned embeddings."""
        return self.proj(feats - self.feat_mean)

    def embed(self, frames) -> torch.Tensor:
        """Frames of one video -> ``(T, dim)`` embeddings."""
        with torch.no_grad():
            return self.project(self.features(_as_frames(frames)))

    def demo_embeddings(self) -> torch.Tensor:
        """``(N, S, dim)`` embeddings of the preferred demonstrations (cached)."""
        if self._demo_emb is None:
            n, s = self.demos.shape[:2]
            f = self.features(self.demos.flatten(0, 1).float() / 255.0)
            with torch.no_grad():
                self._demo_emb = self.project(f).view(n, s, -1)
        return self._demo_emb

    # -- rewards
    def rewards_from_embeddings(self, emb: torch.Tensor) -> torch.Tensor:
        """``(T, dim)`` episode embeddings -> ``(T,)`` rewards ``-T sum_s P*_ts C_ts`` against the
        closest preferred demonstration (smallest OT distance)."""
        with torch.no_grad():  # a block, not a decorator: mutmut skips decorated functions
            demos = self.demo_embeddings()
            costs = ot_frame_costs(emb.unsqueeze(0).expand(demos.shape[0], -1, -1), demos, self.epsilon, self.iters)  # (N, T)
            best = int(costs.sum(1).argmin())
            return -costs[best] * emb.shape[0]

    def frame_rewards(self, frames) -> torch.Tensor:
        """Frames of one episode ``(T, 3, H, W)`` -> ``(T,)`` per-frame rewards in ``[-2, 0]``."""
        return self.rewards_from_embeddings(self.embed(frames))

    def forward(self, images, prompts=None, **context):
        return self.frame_rewards(images).to(images.device)  # pragma: no mutate: placement, equivalent on CPU

    # -- alignment
    def fit(self, videos, triplets: Sequence[tuple[int, int, int]], epochs: int = 150, lr: float = 3e-3, weight_decay: float = 1e-3,
            batch_size: int = 32, loss: str = "bt", margin: float = 0.0, seed: int = 0, val_fraction: float = 0.0) -> list[float]:
        """Align the projection on preference triplets; returns the mean training loss per epoch.

        ``videos``: a tensor ``(M, T, 3, H, W)`` (or list) of equal-length videos, or their
        cached encoder features ``(M, T, F)``. ``triplets``: ``(anchor, preferred, other)``
        indices into ``videos``: the person judged ``preferred`` closer to the ``anchor`` (a
        preferred demonstration) than ``other``. Also sets the feature mean from ``videos``.
        ``val_fraction`` (our addition, for early stopping): that share of the triplets (at least
        one; a seeded draw) is held out, and the projection of the epoch with the lowest held-out
        loss is kept (``report["best_epoch"]``, ``report["val_loss"]``).
        """
        trip = [tuple(int(i) for i in t) for t in triplets]
        if not trip:
            raise RewardError("rapl: no preference triplets to fit on")
        feats = self.video_features(videos)
        m = feats.shape[0]
        bad = [t for t in trip if len(t) != 3 or min(t) < 0 or max(t) >= m]
        if bad:
            raise RewardError(f"rapl: triplet {bad[0]} is not three indices into the {m} videos")
        triplet_loss(torch.zeros(1), torch.zeros(1), loss, margin)  # validates loss / margin before training
        vf = float(val_fraction)
        if not 0.0 <= vf < 1.0:
            raise RewardError(f"rapl: val_fraction must be in [0, 1), got {val_fraction!r}")
        rng = random.Random(seed)
        val: list = []
        if vf > 0:
            if len(trip) < 2:
                raise RewardError(f"rapl: val_fraction={val_fraction} needs at least 2 triplets, got {len(trip)}")
            shuffled = trip[:]
            rng.shuffle(shuffled)
            n_val = min(len(trip) - 1, max(1, round(vf * len(trip))))
            val, trip = shuffled[:n_val], shuffled[n_val:]
        with torch.no_grad():
            self.feat_mean.copy_(feats.flatten(0, 1).mean(0))
        idx = torch.tensor(trip)
        self.proj.requires_grad_(True)
        opt = torch.optim.Adam(self.proj.parameters(), lr=lr, weight_decay=weight_decay)
        order = list(range(len(trip)))
        history = []
        best = (self.triplet_loss_on(feats, val, loss, margin), 0, {k: v.clone() for k, v in self.proj.state_dict().items()}) if val else None
        val_history = [best[0]] if val else []
        for epoch in range(1, int(epochs) + 1):
            rng.shuffle(order)
            total = 0.0
            for s in range(0, len(order), batch_size):
                b = idx[order[s : s + batch_size]]
                e = self.project(feats[b])  # (B, 3, T, dim)
                d = ot_distance(e[:, 0:1].expand(-1, 2, -1, -1), e[:, 1:], self.epsilon, self.iters)  # (B, 2)
                lo = triplet_loss(d[:, 0], d[:, 1], loss, margin).mean()
                opt.zero_grad()
                lo.backward()
                opt.step()
                total += lo.item() * len(b)
            history.append(total / len(order))
            if val:
                v = self.triplet_loss_on(feats, val, loss, margin)
                val_history.append(v)
                if v < best[0]:
                    best = (v, epoch, {k: t.detach().clone() for k, t in self.proj.state_dict().items()})
        self.proj.requires_grad_(False)
        self._demo_emb = None
        self.report = {"triplets": len(trip) + len(val), "epochs": int(epochs), "lr": lr, "weight_decay": weight_decay, "loss": loss,
                       "margin": margin, "final_loss": history[-1] if history else None}
        if val:
            self.proj.load_state_dict(best[2])
            self.report.update(val_triplets=len(val), val_loss=best[0], best_epoch=best[1], val_history=val_history,
                               val_accuracy=self.triplet_accuracy(feats, val))
        self.val_triplets = val  # the held-out split (empty without val_fraction)
        self.report["train_accuracy"] = self.triplet_accuracy(feats, trip)
        return history

    @torch.no_grad()
    def triplet_loss_on(self, feats: torch.Tensor, triplets, loss: str = "bt", margin: float = 0.0) -> float:
        """Mean triplet loss of the current projection on ``triplets`` over features ``(M, T, F)``."""
        e = self.project(feats[torch.tensor([tuple(t) for t in triplets])])
        d = ot_distance(e[:, 0:1].expand(-1, 2, -1, -1), e[:, 1:], self.epsilon, self.iters)
        return float(triplet_loss(d[:, 0], d[:, 1], loss, margin).mean())

    def video_features(self, videos) -> torch.Tensor:
        """``(M, T, F)`` frozen features of equal-length videos (passed through when already features)."""
        if isinstance(videos, torch.Tensor) and videos.ndim == 3 and videos.is_floating_point():
            return videos.float()
        vids = [_as_frames(v) for v in (videos.unbind(0) if isinstance(videos, torch.Tensor) else videos)]
        if len({v.shape[0] for v in vids}) != 1:
            raise RewardError(f"rapl: videos must share one length, got {sorted({v.shape[0] for v in vids})}")
        return torch.stack([self.features(v) for v in vids])

    @torch.no_grad()
    def triplet_accuracy(self, videos, triplets) -> float:
        """Fraction of triplets whose preferred video is the closer to the anchor under OT."""
        feats = self.video_features(videos)
        idx = torch.tensor([tuple(t) for t in triplets])
        e = self.project(feats[idx])
        d = ot_distance(e[:, 0:1].expand(-1, 2, -1, -1), e[:, 1:], self.epsilon, self.iters)
        return float((d[:, 0] < d[:, 1]).float().mean())

    # -- files
    def save(self, folder: Union[str, Path]) -> Path:
        """Write ``folder/rapl.safetensors`` and ``folder/manifest.json`` (the manifest last, so a
        folder with a manifest always has its weights); returns the folder."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"proj.weight": self.proj.weight, "proj.bias": self.proj.bias, "feat_mean": self.feat_mean, "demos": self.demos}
        tmp = folder / ("." + WEIGHTS + ".tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": FORMAT})
        os.replace(tmp, folder / WEIGHTS)
        manifest = {"format": FORMAT, "weights": WEIGHTS, "sha256": _sha256(folder / WEIGHTS), "encoder": self.encoder_spec,
                    "dim": self.dim, "feat_dim": int(self.feat_mean.numel()), "epsilon": self.epsilon, "iters": self.iters,
                    "seed": self.seed, "demos": list(self.demos.shape), "report": self.report}
        tmp = folder / ("." + MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, folder / MANIFEST)
        return folder


def _sha256(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_model(path: Union[str, Path]) -> RAPLModel:
    """A :class:`RAPLModel` from a folder written by :meth:`RAPLModel.save` (or its manifest)."""
    from safetensors.torch import load_file

    p = Path(str(path)).expanduser()
    man_path = p / MANIFEST if p.is_dir() else p
    if not man_path.is_file():
        raise RewardError(f"rapl: no {MANIFEST} at {man_path}; path must be a folder written by RAPLModel.save")
    try:
        man = json.loads(man_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RewardError(f"rapl: {man_path} is not valid JSON ({e})") from None
    if not isinstance(man, dict) or man.get("format") != FORMAT:
        fmt = man.get("format") if isinstance(man, dict) else None
        raise RewardError(f"rapl: {man_path} is not a RAPL manifest (format {fmt!r}, expected {FORMAT})")
    absent = [k for k in ("encoder", "dim", "feat_dim", "epsilon", "iters") if k not in man]
    if absent:
        raise RewardError(f"rapl: {man_path} lacks field(s) {', '.join(absent)}; save the model again with RAPLModel.save")
    w = man_path.parent / str(man.get("weights", WEIGHTS))
    if not w.is_file():
        raise RewardError(f"rapl: weights file {w} named by {man_path} is missing")
    if man.get("sha256") != _sha256(w):
        raise RewardError(f"rapl: {w} does not match the sha256 in {man_path} (changed or truncated); save the model again")
    sd = load_file(str(w))
    missing = [k for k in ("proj.weight", "proj.bias", "feat_mean", "demos") if k not in sd]
    if missing:
        raise RewardError(f"rapl: {w} lacks tensor(s) {', '.join(missing)}")
    model = RAPLModel(man["encoder"], sd["demos"], dim=int(man["dim"]), epsilon=float(man["epsilon"]), iters=int(man["iters"]),
                      seed=int(man.get("seed", 0)), feat_dim=int(man["feat_dim"]))
    with torch.no_grad():
        model.proj.weight.copy_(sd["proj.weight"])
        model.proj.bias.copy_(sd["proj.bias"])
        model.feat_mean.copy_(sd["feat_mean"])
    model.report = dict(man.get("report") or {})
    return model.eval()


@register("rapl", differentiable=False,
          description="RAPL: OT matching of an episode's frames to preferred demos in a preference-aligned embedding (path=model folder)")
def _load_rapl(path: str, fingerprint: Optional[str] = None) -> RAPLModel:
    """``path``: a folder written by :meth:`RAPLModel.save`. ``fingerprint``: ignored; part of the
    load cache key so a retrained model at the same path is not served from the cache."""
    return load_model(path)
