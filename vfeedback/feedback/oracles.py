"""Simulated judges: ranking and preference oracles backed by a Reward or a plain function.

The contract (shared with the person-backed oracles of the Gradio app, so an algorithm never
knows which one it talks to):

* a **ranking oracle** has ``rank(candidates) -> list[int]``: indices into ``candidates``, best
  first; a top-k oracle returns only the k best (still best first);
* a **preference oracle** has ``compare(a, b) -> 0 | 1 | None``: 0 when ``a`` is better, 1 when
  ``b`` is, None when it cannot tell (a tie within tolerance, or neither Pareto-dominates).

Both are also callable (``oracle(candidates)``, ``oracle(a, b)``). "Best" is explicit in each
class: rewards are higher-better; :class:`FunctionRankingOracle` minimises by default. A score
that is NaN (a reward that could not score an image) always ranks last / loses.

This module imports nothing from diffusion code: a Reward is used only through ``score`` (or
calling it on a tensor batch), so any ``rewards.Reward`` or duck-typed scorer works.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence, Union

import torch

__all__ = [
    "order_scores",
    "FunctionRankingOracle",
    "RewardRankingOracle",
    "RewardPreferenceOracle",
    "ParetoPreferenceOracle",
]


def order_scores(scores: Sequence[float], higher_is_better: bool = True, top_k: Optional[int] = None) -> list[int]:
    """Indices of ``scores`` best first; NaN last; ties keep the lower index first (stable).

    ``top_k``: keep only the first ``top_k`` (None: all).
    """
    vals = [float(s) for s in scores]
    finite = [i for i, v in enumerate(vals) if not math.isnan(v)]
    nan = [i for i, v in enumerate(vals) if math.isnan(v)]
    finite.sort(key=lambda i: -vals[i] if higher_is_better else vals[i])  # sort() is stable
    order = finite + nan
    return order if top_k is None else order[: int(top_k)]


def _check_top_k(top_k) -> Optional[int]:
    if top_k is None:
        return None
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    return top_k


def _rows(candidates) -> list:
    if isinstance(candidates, torch.Tensor):
        return list(candidates)
    return list(candidates)


class FunctionRankingOracle:
    """Ranks candidates by ``f`` (a synthetic objective): lowest first when ``minimize``.

    ``f`` maps one candidate (a tensor) to a number; with ``batched=True`` it maps the stacked
    candidates ``(m, ...)`` to ``(m,)`` values in one call. ``noise``: standard deviation of
    Gaussian noise added to each value before ranking (a noisy judge), drawn from ``seed``.
    ``n_queries`` counts candidates judged; ``last_values`` holds the (noise-free) values.
    """

    def __init__(self, f: Callable, minimize: bool = True, top_k: Optional[int] = None, batched: bool = False, noise: float = 0.0, seed: int = 0):
        self.f = f
        self.minimize = bool(minimize)
        self.top_k = _check_top_k(top_k)
        self.batched = batched
        self.noise = float(noise)
        self._gen = torch.Generator().manual_seed(seed)
        self.n_queries = 0
        self.last_values: list[float] = []

    def values(self, candidates) -> list[float]:
        if self.batched:
            x = torch.stack(list(candidates))  # a tensor (m, ...) or a list of m tensors: (m, ...)
            vals = [float(v) for v in torch.as_tensor(self.f(x)).reshape(-1).tolist()]
        else:
            vals = [float(self.f(c)) for c in _rows(candidates)]
        self.n_queries += len(vals)
        self.last_values = vals
        return vals

    def rank(self, candidates) -> list[int]:
        vals = self.values(candidates)
        # drawn also when noise is 0 (then v + 0 * e == v): one code path, the same ranking
        eps = torch.randn(len(vals), generator=self._gen, dtype=torch.float64).tolist()
        vals = [v + self.noise * e for v, e in zip(vals, eps)]
        return order_scores(vals, higher_is_better=not self.minimize, top_k=self.top_k)

    __call__ = rank


def _reward_scores(reward, images, prompts, batch_size: int, context: dict) -> list[float]:
    """Scores of ``images`` (tensor ``(B,3,H,W)`` or a list of images) as floats, NaN kept."""
    n = len(images)
    if isinstance(prompts, str):
        prompts = [prompts] * n
    if prompts is not None and len(prompts) != n:
        raise ValueError(f"{len(prompts)} prompts for {n} candidates; give one prompt (str) or one per candidate")
    if hasattr(reward, "score"):  # pragma: no mutate: a Reward called directly scores the same as through .score
        vals = reward.score(
            images,
            prompts,
            batch_size=batch_size,  # pragma: no mutate: only splits the work into chunks, the scores are the same
            **context,
        )
        return [float(v) for v in vals]
    # a plain callable on a batch tensor
    x = images if isinstance(images, torch.Tensor) else torch.stack(list(images))  # pragma: no mutate: stacking a tensor's rows rebuilds the same tensor; the branch only skips a copy
    with torch.no_grad():
        out = reward(x, prompts, **context)
    return [float(v) for v in torch.as_tensor(out).detach().float().cpu().reshape(-1).tolist()]


class RewardRankingOracle:
    """A simulated person who ranks images by a Reward's score (higher better, NaN last).

    ``prompts``: one prompt for the whole group (a str, the usual case: a group of images of
    one prompt) or one per candidate; ``None`` for prompt-free rewards. ``top_k``: answer
    only the k best. Extra keyword arguments are passed to the reward as context (e.g.
    reference faces). ``n_queries`` counts images judged; ``last_scores`` holds the scores.
    """

    def __init__(self, reward, prompts: Union[str, Sequence[str], None] = None, top_k: Optional[int] = None, batch_size: int = 16, **context):
        self.reward = reward
        self.prompts = prompts
        self.top_k = _check_top_k(top_k)
        self.batch_size = batch_size
        self.context = context
        self.n_queries = 0
        self.last_scores: list[float] = []

    def scores(self, images, prompts=None) -> list[float]:
        p = self.prompts if prompts is None else prompts
        s = _reward_scores(self.reward, images, p, self.batch_size, self.context)
        self.n_queries += len(s)
        self.last_scores = s
        return s

    def rank(self, images, prompts=None) -> list[int]:
        return order_scores(
            self.scores(images, prompts),
            higher_is_better=True,  # pragma: no mutate: True is also the default, dropping it is equivalent
            top_k=self.top_k,
        )

    __call__ = rank


class RewardPreferenceOracle:
    """Compares two images by a Reward: 0 if the first scores higher, 1 if the second does,
    None when ``|r_a - r_b| <= tol`` (a tie) or both are NaN. A NaN score loses to a number."""

    def __init__(self, reward, prompts: Union[str, Sequence[str], None] = None, tol: float = 0.0, batch_size: int = 16, **context):
        if not (isinstance(tol, (int, float)) and tol >= 0):
            raise ValueError(f"tol must be a number >= 0, got {tol!r}")
        self.reward = reward
        self.prompts = prompts
        self.tol = float(tol)
        self.batch_size = batch_size
        self.context = context
        self.n_queries = 0
        self.last_scores: list[float] = []

    def compare(self, a, b, prompts=None) -> Optional[int]:
        p = self.prompts if prompts is None else prompts
        images = torch.stack([a, b]) if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape else [a, b]  # pragma: no mutate: a stacked batch and a list score the same
        ra, rb = _reward_scores(self.reward, images, p, self.batch_size, self.context)
        self.n_queries += 2
        self.last_scores = [ra, rb]
        return _compare_scalar(ra, rb, self.tol)

    __call__ = compare


def _compare_scalar(ra: float, rb: float, tol: float) -> Optional[int]:
    na, nb = math.isnan(ra), math.isnan(rb)
    if na and nb:
        return None
    if na:
        return 1
    if nb:
        return 0
    if abs(ra - rb) <= tol:
        return None
    return 0 if ra > rb else 1  # pragma: no mutate: ra == rb returned None above (tol >= 0), so > and >= agree


class ParetoPreferenceOracle:
    """Compares two candidates on several objectives (each higher-better) by Pareto dominance.

    ``objectives``: a sequence of rewards (one objective each, scored like
    :class:`RewardPreferenceOracle`), or one callable mapping the stacked pair ``(2, ...)`` to
    ``(2, K)`` values. Returns 0 when ``a`` dominates (no objective worse by more than ``tol``,
    at least one better by more than ``tol``), 1 when ``b`` dominates, None otherwise (a
    trade-off or a tie). A NaN objective counts as worse than any number.
    """

    def __init__(self, objectives: Union[Sequence[Any], Callable], prompts: Union[str, Sequence[str], None] = None, tol: float = 0.0, batch_size: int = 16, **context):
        if not (isinstance(tol, (int, float)) and tol >= 0):
            raise ValueError(f"tol must be a number >= 0, got {tol!r}")
        if not callable(objectives) and len(objectives) == 0:
            raise ValueError("ParetoPreferenceOracle needs at least one objective")
        self.objectives = objectives
        self.prompts = prompts
        self.tol = float(tol)
        self.batch_size = batch_size
        self.context = context
        self.n_queries = 0
        self.last_scores: Optional[torch.Tensor] = None

    def scores(self, a, b, prompts=None) -> torch.Tensor:
        """``(2, K)`` float64 objective values of ``a`` and ``b``."""
        p = self.prompts if prompts is None else prompts
        # a Reward is callable too and scores the stacked pair the same way as through .score
        if callable(self.objectives) and not isinstance(self.objectives, (list, tuple)) and not hasattr(self.objectives, "score"):  # pragma: no mutate: see above
            x = torch.stack([torch.as_tensor(a), torch.as_tensor(b)])
            s = torch.as_tensor(self.objectives(x), dtype=torch.float64).reshape(2, -1)
        else:
            objs = [self.objectives] if hasattr(self.objectives, "score") else list(self.objectives)
            images = torch.stack([a, b]) if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape else [a, b]  # pragma: no mutate: a stacked batch and a list score the same
            cols = [_reward_scores(r, images, p, self.batch_size, self.context) for r in objs]
            s = torch.tensor(cols, dtype=torch.float64).T
        self.n_queries += 2
        self.last_scores = s
        return s

    def compare(self, a, b, prompts=None) -> Optional[int]:
        s = self.scores(a, b, prompts)
        s = torch.where(torch.isnan(s), torch.full_like(s, -math.inf), s)
        diff = s[0] - s[1]
        # -inf - -inf is NaN: an objective neither could score is a tie on that objective.
        diff = torch.where(torch.isnan(diff), torch.zeros_like(diff), diff)
        a_dom = bool((diff >= -self.tol).all() and (diff > self.tol).any())
        b_dom = bool((diff <= self.tol).all() and (diff < -self.tol).any())
        if a_dom and not b_dom:
            return 0
        if b_dom and not a_dom:
            return 1
        return None

    __call__ = compare
