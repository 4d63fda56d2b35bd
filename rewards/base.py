"""The Reward contract, the registry behind ``rewards.load`` and weighted combinations.

A Reward is a ``torch.nn.Module`` mapping images ``(B, 3, H, W)`` in ``[0, 1]`` (plus prompts
and any context such as reference faces) to a score per image, higher is better. Resizing and
normalisation happen inside with torch ops, so when ``differentiable`` is true gradients reach
the pixels. A scorer that cannot score an image returns NaN for it (the TRL convention);
:class:`WeightedSum` combines with ``nansum`` so one failure does not sink a batch.
"""
from __future__ import annotations

import importlib
import inspect
import logging
import math
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from .images import ImageError, to_single, to_tensor

log = logging.getLogger(__name__)


class RewardError(ValueError):
    """A user-facing problem with a reward (unknown name, bad option, missing weights)."""


class Reward(nn.Module):
    """Base class of every scorer.

    Subclasses set ``name`` and ``differentiable`` and implement :meth:`forward`.
    """

    name: str = "reward"
    differentiable: bool = True
    #: does forward() read ``prompts``? (``vfeedback score`` asks for --prompt when true)
    needs_prompt: bool = False

    def forward(self, images: torch.Tensor, prompts: Optional[Sequence[str]] = None, **context) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        for b in self.buffers():
            return b.device
        return torch.device("cpu")

    def score(self, images, prompts=None, batch_size: int = 16, **context) -> list[float]:
        """Convenience wrapper: paths, PIL images, arrays or tensors -> list of floats.

        Images of different sizes are scored in groups of one size; order is preserved.
        """
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            items = list(images)
        elif isinstance(images, (list, tuple)):
            items = [to_single(x) for x in images]
        else:
            items = [to_single(images)]
        if isinstance(prompts, str):
            prompts = [prompts] * len(items)
        if prompts is not None and len(prompts) != len(items):
            raise RewardError(f"{self.name}: {len(prompts)} prompts for {len(items)} images")
        out: list[float] = [float("nan")] * len(items)
        groups: dict[tuple, list[int]] = {}
        for i, x in enumerate(items):
            groups.setdefault(tuple(x.shape), []).append(i)
        with torch.no_grad():
            for idx in groups.values():
                for s in range(0, len(idx), batch_size):
                    chunk = idx[s : s + batch_size]
                    batch = torch.stack([items[i] for i in chunk]).to(self.device)
                    p = [prompts[i] for i in chunk] if prompts is not None else None
                    vals = self(batch, p, **context)
                    for i, v in zip(chunk, vals.detach().float().cpu().tolist()):
                        out[i] = v
        return out

    def extra_repr(self) -> str:
        return f"name={self.name!r}, differentiable={self.differentiable}"


# --------------------------------------------------------------------------------------------
# registry


@dataclass
class RewardInfo:
    name: str
    factory: Callable[..., Reward]
    differentiable: bool
    extra: Optional[str]  # pip extra that installs its dependencies, e.g. "face"
    description: str
    requires: tuple[str, ...] = ()  # importable modules it needs
    install: Optional[str] = None  # how to install them, where no extra does (or why none can)

    def install_hint(self) -> str:
        """How to install this scorer's dependencies (or why it cannot be, next to vfeedback's pins)."""
        if self.install:
            return self.install
        return f"pip install 'vfeedback[{self.extra}]'" if self.extra else f"pip install {' '.join(self.requires)}"

    @property
    def installed(self) -> bool:
        return all(importlib.util.find_spec(m) is not None for m in self.requires)


_REGISTRY: dict[str, RewardInfo] = {}
_CACHE: dict[tuple, Reward] = {}
_CACHE_LOCK = threading.Lock()


def register(name: str, *, differentiable: bool, description: str, extra: Optional[str] = None, requires: Sequence[str] = (),
             install: Optional[str] = None):
    """Decorator registering a Reward class or factory under ``name``."""

    def deco(factory):
        _REGISTRY[name] = RewardInfo(name, factory, differentiable, extra, description, tuple(requires), install)
        return factory

    return deco


def _freeze(v: Any):
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    return v


def available() -> list[RewardInfo]:
    """Every registered scorer, sorted by name (installed or not)."""
    _import_builtin()
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def load(name: str, cache: bool = True, **options) -> Reward:
    """Build the reward registered as ``name`` with ``options``; cached per (name, options).

    Raises :class:`RewardError` for an unknown name, an unknown option or missing packages,
    with a message saying what to do.
    """
    _import_builtin()
    if name not in _REGISTRY:
        raise RewardError(f"unknown reward {name!r}; available: {', '.join(sorted(_REGISTRY))} (`vfeedback rewards` lists them)")
    info = _REGISTRY[name]
    missing = [m for m in info.requires if importlib.util.find_spec(m) is None]
    if missing:
        raise RewardError(f"reward {name!r} needs the package(s) {', '.join(missing)}: {info.install_hint()}")
    sig = inspect.signature(info.factory)
    accepts_kwargs = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
    if not accepts_kwargs:
        unknown = [k for k in options if k not in sig.parameters]
        if unknown:
            allowed = [k for k in sig.parameters if k != "self"]
            raise RewardError(f"reward {name!r}: unknown option(s) {', '.join(unknown)}; allowed: {', '.join(allowed) or 'none'}")
    key = (name, _freeze(options))
    if cache:
        with _CACHE_LOCK:
            if key in _CACHE:
                return _CACHE[key]
    try:
        reward = info.factory(**options)
    except TypeError as e:
        raise RewardError(f"reward {name!r}: {e}") from None
    reward.name = name
    if cache:
        with _CACHE_LOCK:
            _CACHE[key] = reward
    return reward


def clear_cache() -> None:
    with _CACHE_LOCK:
        _CACHE.clear()


_BUILTIN_MODULES = ["analytic", "clip", "aesthetic", "pickscore", "hpsv2", "imagereward", "vqa", "face", "shapes", "composition", "itercomp_rm", "structure", "heron", "rapl", "vpl", "shapes_people"]
_imported = False


def _import_builtin() -> None:
    """Import the modules that register the built-in scorers (lazily: heavy deps stay lazy too)."""
    global _imported
    if _imported:
        return
    _imported = True
    for mod in _BUILTIN_MODULES:
        try:
            importlib.import_module(f"rewards.{mod}")
        except ModuleNotFoundError as e:  # a module whose optional dependency is absent at import
            log.debug("rewards.%s not importable: %s", mod, e)


# --------------------------------------------------------------------------------------------
# combinations


class RunningNorm(nn.Module):
    """Running mean / std (Welford, all history) used to put rewards on one scale."""

    def __init__(self):
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("m2", torch.zeros((), dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double().flatten()
        x = x[torch.isfinite(x)]
        for v in x.to(self.mean.device):
            self.count += 1
            d = v - self.mean
            self.mean += d / self.count
            self.m2 += d * (v - self.mean)

    def std(self) -> torch.Tensor:
        if self.count < 2:
            return torch.ones((), dtype=torch.float64, device=self.mean.device)  # pragma: no mutate: placement and dtype, equivalent (callers cast with .to(v))
        return (self.m2 / (self.count - 1)).sqrt().clamp_min(1e-6)


class WeightedSum(Reward):
    """``sum_i w_i * norm_i(r_i)`` over several rewards, ignoring NaN terms (``nansum``).

    ``normalize``: ``"none"``; ``"batch"`` (z-score within the batch; needs B > 1); or
    ``"running"`` (z-score against the running statistics of all scores seen so far, updated
    only while ``update_stats`` is true: a trainer sets it, evaluation leaves it off so eval
    scores stay comparable). After each call ``last_components`` holds each raw reward.
    A row where every term is NaN stays NaN.
    """

    def __init__(self, rewards: Sequence[Reward], weights: Sequence[float], normalize: str = "none", names: Optional[Sequence[str]] = None):
        super().__init__()
        if len(rewards) != len(weights):
            raise RewardError(f"{len(rewards)} rewards but {len(weights)} weights")
        if normalize not in ("none", "batch", "running"):
            raise RewardError(f"normalize must be none, batch or running, got {normalize!r}")
        self.rewards = nn.ModuleList(rewards)
        self.weights = list(map(float, weights))
        self.names = list(names) if names is not None else [r.name for r in rewards]  # every Reward has a name
        self.normalize = normalize
        self.norms = nn.ModuleList(RunningNorm() for _ in rewards)
        self.differentiable = all(r.differentiable for r in rewards)
        self.needs_prompt = any(r.needs_prompt for r in rewards)
        self.name = "+".join(self.names)
        self.last_components: dict[str, torch.Tensor] = {}
        self.update_stats = False
        # several training processes: a callable that returns every process's scores of this
        # call (a trainer sets it, e.g. accelerate's gather), so all processes update the
        # running statistics with the same global batch a single process would see
        self.stats_gather = None

    def _normed(self, v: torch.Tensor, norm: RunningNorm) -> torch.Tensor:
        """One member's scores ``v`` (B,) after ``normalize`` (none / batch / running)."""
        if self.normalize == "batch":
            finite = torch.isfinite(v)
            mu = v[finite].mean() if finite.any() else v.new_zeros(())  # pragma: no mutate: an all-NaN column gives NaN terms either way
            sd = v[finite].std() if finite.sum() > 1 else v.new_ones(())
            v = (v - mu) / sd.clamp_min(1e-6)
        elif self.normalize == "running":
            if self.update_stats:
                norm.update(self.stats_gather(v.detach()) if self.stats_gather is not None else v)
            v = (v - norm.mean.to(v)) / norm.std().to(v)  # pragma: no mutate: .to(v) moves the stats to v's device (GPU runs); on CPU float32 .to(None) is the same tensor
        return v

    def forward(self, images, prompts=None, **context):
        total = None
        all_nan = None
        self.last_components = {}
        for name, r, w, norm in zip(self.names, self.rewards, self.weights, self.norms):
            v = r(images, prompts, **context).float()
            self.last_components[name] = v.detach()
            v = self._normed(v, norm)
            term = w * v
            nan = ~torch.isfinite(term)
            all_nan = nan if all_nan is None else (all_nan & nan)
            term = torch.where(nan, torch.zeros_like(term), term)
            total = term if total is None else total + term
        return torch.where(all_nan, torch.full_like(total, float("nan")), total)  # pragma: no mutate: float("NAN") is the same NaN


ENSEMBLE_MODES = ("mean", "wco", "uwo")


class Ensemble(WeightedSum):
    """An ensemble of scorers combined conservatively (Coste et al. 2023, "Reward Model Ensembles
    Help Mitigate Overoptimization", ICLR 2024, Sec. 3, the three ensemble objectives), for
    members ``R_1..R_k`` of one image (after ``normalize``, as :class:`WeightedSum`):

    * ``mean``: ``R = (1/k) sum_i R_i``;
    * ``wco`` (worst-case optimisation): ``R = min_i R_i``;
    * ``uwo`` (uncertainty-weighted optimisation): ``R = (1/k) sum_i R_i - lambda * Var_i(R_i)``
      with the intra-ensemble variance ``Var = (1/k) sum_i (R_i - mean)^2``: the population
      variance (divisor k), as the paper defines it; ``lambda`` (``uwo_lambda``) >= 0.

    Differentiable wherever every member is (min and variance are torch ops; min passes the
    gradient to the smallest member). A member that returns NaN for an image is left out of that
    image's combination (the TRL convention WeightedSum follows); an image no member scores is NaN.
    """

    def __init__(self, rewards: Sequence[Reward], mode: str = "mean", uwo_lambda: float = 0.5, normalize: str = "none",
                 names: Optional[Sequence[str]] = None):
        if mode not in ENSEMBLE_MODES:
            raise RewardError(f"ensemble mode must be one of {', '.join(ENSEMBLE_MODES)}, got {mode!r}")
        if len(rewards) < 2:
            raise RewardError(f"an ensemble needs at least 2 members, got {len(rewards)}")
        if not (isinstance(uwo_lambda, (int, float)) and math.isfinite(uwo_lambda) and uwo_lambda >= 0):
            raise RewardError(f"uwo_lambda must be a finite number >= 0, got {uwo_lambda!r}")
        super().__init__(rewards, [1.0] * len(rewards), normalize=normalize, names=names)
        self.mode = mode
        self.uwo_lambda = float(uwo_lambda)
        self.name = f"{mode}(" + ",".join(self.names) + ")"

    def forward(self, images, prompts=None, **context):
        self.last_components = {}
        cols = []
        for name, r, norm in zip(self.names, self.rewards, self.norms):
            v = r(images, prompts, **context).float()
            self.last_components[name] = v.detach()
            cols.append(self._normed(v, norm))
        return ensemble_combine(torch.stack(cols, dim=1), self.mode, self.uwo_lambda)


def ensemble_combine(r: torch.Tensor, mode: str, uwo_lambda: float = 0.5) -> torch.Tensor:
    """Combine member scores ``r`` (B, k) into (B,) by ``mode`` (see :class:`Ensemble`); NaN
    members of a row are ignored, an all-NaN row gives NaN."""
    ok = torch.isfinite(r)
    n = ok.sum(dim=1)
    z = torch.where(ok, r, torch.zeros_like(r))
    mean = z.sum(dim=1) / n.clamp_min(1)
    if mode == "mean":
        out = mean
    elif mode == "wco":
        out = torch.where(ok, r, torch.full_like(r, math.inf)).min(dim=1).values
    elif mode == "uwo":
        dev = torch.where(ok, r - mean[:, None], torch.zeros_like(r))
        var = (dev * dev).sum(dim=1) / n.clamp_min(1)  # pragma: no mutate: population variance, divisor k (Coste et al.); the clamp only meets k = 1 (variance 0) and k = 0 (NaN row)
        out = mean - uwo_lambda * var
    else:
        raise RewardError(f"ensemble mode must be one of {', '.join(ENSEMBLE_MODES)}, got {mode!r}")
    return torch.where(n > 0, out, torch.full_like(out, float("nan")))  # pragma: no mutate: float("NAN") is the same NaN


def combine(specs: Sequence[dict], normalize: str = "none", ensemble: Optional[str] = None, uwo_lambda: float = 0.5) -> Reward:
    """Build one reward from ``[{"name": ..., "weight": ..., **options}, ...]``.

    A single spec with weight 1 and no normalisation returns the plain reward. ``ensemble``
    (``mean`` / ``wco`` / ``uwo``): the specs are the members of an :class:`Ensemble` instead of
    a weighted sum (weights must then be 1).
    """
    rewards, weights, names = [], [], []
    for spec in specs:
        spec = dict(spec)
        name = spec.pop("name")
        weight = spec.pop("weight", 1.0)
        opts = spec.pop("options", {}) or {}  # pragma: no mutate: a missing "options" gives {} through "or {}" whatever the default
        opts.update(spec)
        rewards.append(load(name, **opts))
        weights.append(weight)
        names.append(name)
    if ensemble is not None:
        # members of one scorer with different options (seeds, checkpoints) are told apart by position
        names = [n if names.count(n) == 1 else f"{n}#{i}" for i, n in enumerate(names)]
        if any(w != 1.0 for w in weights):
            raise RewardError(f"ensemble members are combined by the mode ({ensemble}), not weighted; give every weight 1, got {weights}")
        return Ensemble(rewards, ensemble, uwo_lambda, normalize=normalize, names=names)
    if len(rewards) == 1 and weights[0] == 1.0 and normalize == "none":
        return rewards[0]
    return WeightedSum(rewards, weights, normalize=normalize)  # its names: each member's, which load() sets to the spec's name
