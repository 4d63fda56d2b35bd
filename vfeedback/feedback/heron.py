"""HERON as a preference / ranking oracle: ranked reward factors with per-factor margins.

The comparator itself (the decision tree, the margins, the NaN rule) is
:func:`rewards.heron.heron_compare` (Bukharin et al. 2023; see ``rewards/heron.py`` for the
rule and the reference). This module wraps it in the oracle contract of
:mod:`vfeedback.feedback.oracles`, so D3PO (``d3po.preference: heron``), the online methods'
win-rate shaping (``reward.win_rate.judge: heron``) and ZO-RankSGD (``zo_ranksgd.ranker: heron``)
use it like any other judge:

* ``compare(a, b, prompts) -> 0 | 1 | None``; ``last_scores`` the ``(2, K)`` factor values,
  ``last_level`` the deciding factor (None for a tie);
* ``rank(images, prompts) -> indices best first``: a hierarchy with margins is not transitive
  (a beats b on a small lead, b beats c, c beats a on the first factor), so a group is ranked by
  each member's wins over the others (a tie 1/2; Copeland's rule), ties broken by index. Ranking
  by wins is our choice: the paper only labels pairs.

With ``margin_scale: std`` each margin is ``m_k`` times the spread of factor k over every sample
this oracle has scored so far (the reference's buffer, ``rm_mountain.py``); over a batch that is
labelled at once (:func:`label_values`) it is that batch's spread (``robots/.../heron.py``).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch

from rewards.heron import MARGIN_SCALES, factor_margins, heron_compare

from ..errors import UserError
from .oracles import _reward_scores

__all__ = ["HeronPreferenceOracle", "build_heron_oracle", "check_heron_factors", "copeland_order"]


def copeland_order(n: int, compare) -> list[int]:
    """Indices ``0..n-1`` best first by wins over the others (a tie 1/2), ties by index.

    ``compare(i, j)``: 0 when i is better, 1 when j is, None for a tie."""
    won = [0.0] * n  # pragma: no mutate  a common starting count: any constant ranks the same
    for i in range(n):
        for j in range(i + 1, n):
            c = compare(i, j)
            if c == 0:
                won[i] += 1.0
            elif c == 1:
                won[j] += 1.0
            else:
                won[i] += 0.5
                won[j] += 0.5
    return sorted(range(n), key=lambda i: -won[i])  # sorted() is stable: equal wins keep index order


class HeronPreferenceOracle:
    """A simulated person who compares images factor by factor, most important first.

    ``factors``: K rewards (each higher-better; any ``rewards.Reward`` or a plain callable on a
    batch); ``margins``: K numbers >= 0; ``margin_scale``: ``absolute`` (the margins as given)
    or ``std`` (each times its factor's std over everything scored so far); ``names``: labels
    of the factors; ``prompts``: a default prompt (str) or one per image. ``n_queries`` counts
    images scored.
    """

    def __init__(self, factors: Sequence, margins: Sequence[float], margin_scale: str = "absolute", names: Optional[Sequence[str]] = None,
                 prompts: Union[str, Sequence[str], None] = None, batch_size: int = 16, **context):
        if len(factors) == 0:
            raise ValueError("HeronPreferenceOracle needs at least one factor")
        if len(margins) != len(factors):
            raise ValueError(f"{len(factors)} factors but {len(margins)} margins")
        if any(not (isinstance(m, (int, float)) and m >= 0 and math.isfinite(m)) for m in margins):
            raise ValueError(f"margins must be finite numbers >= 0, got {list(margins)}")
        if margin_scale not in MARGIN_SCALES:
            raise ValueError(f"margin_scale must be one of {MARGIN_SCALES}, got {margin_scale!r}")
        self.factors = list(factors)
        self.margins = [float(m) for m in margins]
        self.margin_scale = margin_scale
        self.names = list(names) if names is not None else [getattr(f, "name", f"factor{k}") for k, f in enumerate(self.factors)]
        self.prompts = prompts
        self.batch_size = batch_size
        self.context = context
        self.n_queries = 0
        self.last_scores: Optional[torch.Tensor] = None
        self.last_level: Optional[int] = None
        self._seen: list[torch.Tensor] = []  # rows scored so far (std margins only)
        self.last_decided = 0  # pairs a level decided in the last batch labelled at once

    # ---- values and margins
    def factor_values(self, images, prompts=None) -> torch.Tensor:
        """``(n, K)`` float64 factor values of ``images`` (a tensor ``(n, 3, H, W)`` or a list)."""
        p = self.prompts if prompts is None else prompts
        cols = [_reward_scores(f, images, p, self.batch_size, self.context) for f in self.factors]
        v = torch.tensor(cols, dtype=torch.float64).T.reshape(len(images), len(self.factors))
        self.n_queries += len(images)
        if self.margin_scale == "std":
            self._seen.append(v)
        return v

    def current_margins(self, values: Optional[torch.Tensor] = None) -> list[float]:
        """Absolute margins: for ``std``, over ``values`` when given, else over all rows seen."""
        if self.margin_scale == "absolute":
            return list(self.margins)
        if values is None and not self._seen:
            return [0.0] * len(self.margins)  # nothing scored yet: no spread to scale by (factor_margins' rule)
        v = values if values is not None else torch.cat(self._seen)
        return factor_margins(v, self.margins, "std")

    def compare_values(self, va: Sequence[float], vb: Sequence[float], margins: Sequence[float]) -> Optional[int]:
        w, k = heron_compare(va, vb, margins)
        self.last_level = k
        return w

    # ---- the oracle contract
    def compare(self, a, b, prompts=None) -> Optional[int]:
        """0 if ``a`` is preferred, 1 if ``b`` is, None when no factor separates them."""
        images = torch.stack([a, b]) if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape else [a, b]
        v = self.factor_values(images, prompts)
        self.last_scores = v
        return self.compare_values(v[0].tolist(), v[1].tolist(), self.current_margins())

    __call__ = compare

    def label_values(self, values: torch.Tensor):
        """Margins for a batch of factor ``values`` ``(n, K)`` labelled at once (std: the batch's
        spread) and a ``compare(i, j)`` over its rows."""
        d = self.current_margins(values)
        rows = torch.as_tensor(values, dtype=torch.float64).tolist()
        self.last_decided = 0

        def cmp(i, j):
            w = heron_compare(rows[i], rows[j], d)[0]
            self.last_decided += w is not None
            return w

        return d, cmp

    def rank(self, images, prompts=None) -> list[int]:
        """Indices of ``images`` best first by wins under the hierarchy (module docstring)."""
        v = self.factor_values(images, prompts)
        self.last_scores = v
        _, cmp = self.label_values(v)
        return copeland_order(len(images), cmp)

    def rank_groups(self, images: torch.Tensor, prompts: Sequence[str]) -> list[int]:
        """Candidates ``(n, k, 3, H, W)`` (k images each, the i-th image of every candidate made
        with ``prompts[i]``), best first: each factor is averaged over a candidate's images
        (NaN skipped), then candidates are ranked by wins (ZO-RankSGD's candidates)."""
        n, k = images.shape[:2]
        v = self.factor_values(images.reshape(n * k, *images.shape[2:]), list(prompts) * n).reshape(n, k, -1)
        finite = torch.isfinite(v)
        s = torch.where(finite, v, torch.zeros_like(v)).sum(1)
        c = finite.sum(1)
        mean = torch.where(c > 0, s / c.clamp_min(1), math.nan)
        self.last_scores = mean
        _, cmp = self.label_values(mean)
        return copeland_order(n, cmp)


def _heron_section(cfg, where: str):
    h = getattr(cfg, "heron", None)
    if h is None:
        raise UserError(f"{where}: heron needs a heron section: heron: {{factors: [{{name: REWARD, margin: M}}, ...]}} (docs/heron.md)")
    return h


def check_heron_factors(cfg, where: str) -> None:
    """Every ``heron.factors.N.name`` is a registered, installed reward (no weights loaded)."""
    import rewards

    h = _heron_section(cfg, where)
    info = {i.name: i for i in rewards.available()}
    for n, f in enumerate(h.factors):
        if f.name not in info:
            raise UserError(f"heron.factors.{n}.name: unknown reward {f.name!r}; available: {', '.join(sorted(info))}")
        if not info[f.name].installed:
            raise UserError(f"heron.factors.{n}.name: {f.name!r} is not installed: {info[f.name].install_hint()}")


def build_heron_oracle(cfg, where: str, device=None, batch_size: int = 16) -> HeronPreferenceOracle:
    """The run's :class:`HeronPreferenceOracle` from ``cfg.heron`` (factor rewards loaded)."""
    import rewards

    h = _heron_section(cfg, where)
    facs = []
    for n, f in enumerate(h.factors):
        try:
            r = rewards.load(f.name, **f.options)
        except rewards.RewardError as e:
            raise UserError(f"heron.factors.{n}: {e}") from None
        if device is not None:
            r = r.to(device)
        facs.append(r.eval().requires_grad_(False))
    names = [f.name for f in h.factors]
    return HeronPreferenceOracle(facs, [f.margin for f in h.factors], h.margin_scale, names=names, batch_size=batch_size)
