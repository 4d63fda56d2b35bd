"""Gallery rankings: one JSON object per line, the images of one prompt ranked best first.

The format (docs/itercomp.md)::

    {"prompt": "a dog to the left of a bicycle", "category": "spatial", "seed": 0,
     "images": ["iter-0/gallery/base/spatial-000-s0.png", "iter-0/gallery/sdxl/spatial-000-s0.png", ...],
     "models": ["base", "sdxl", ...],
     "ranking": [1, 0, 2]}

``images`` are relative to the file's folder (or absolute); ``ranking`` lists indices into
``images``, best first (IterComp's reference stores the same information as a rank per model).
A ranking may list only the k best: unlisted images then count as worse than every listed one.
``models`` and ``seed`` are optional (kept for provenance); ``scores`` is written by the
automatic ranker. The ranking app's export (``items: [{"image": ...}]`` with ``ranks``, one
rank per item, 1 = best, equal = tie; or ``chosen`` / ``rejected``) reads too.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

from ..errors import UserError
from ..rundir import atomic_write


@dataclass
class Group:
    """The images of one prompt (and seed) from several gallery models, with a ranking once
    ranked. ``images`` are absolute paths."""

    prompt: str
    category: str
    images: list[str]
    models: list[str] = field(default_factory=list)
    seed: Optional[int] = None
    ranking: Optional[list[int]] = None  # best first
    ties: Optional[list[int]] = None  # ranks per image (1 = best; equal = tie), when given so
    scores: Optional[list[float]] = None

    @property
    def key(self) -> tuple:
        return (self.prompt, tuple(sorted(os.path.abspath(p) for p in self.images)))

    def pairs(self) -> list[tuple[int, int]]:
        """Ordered ``(better, worse)`` index pairs of this group's ranking."""
        from rewards.itercomp_rm import ranking_pairs

        if self.ties is not None:
            r = self.ties
            return [(i, j) for i in range(len(r)) for j in range(len(r)) if r[i] < r[j]]
        if self.ranking is None:
            return []
        return ranking_pairs(self.ranking, len(self.images))

    def to_record(self, base: Path) -> dict:
        def rel(p):
            try:
                return os.path.relpath(p, base)
            except ValueError:
                return p

        rec = {"prompt": self.prompt, "category": self.category, "seed": self.seed, "images": [rel(p) for p in self.images],
               "models": self.models, "ranking": self.ranking}
        if self.ties is not None:
            rec["ranks"] = list(self.ties)
        if self.scores is not None:
            rec["scores"] = [None if not math.isfinite(s) else round(s, 6) for s in self.scores]
        return rec


def write_groups(path: Path, groups: Sequence[Group]) -> None:
    """Write ranking JSONL (paths relative to the file's folder), atomically."""
    path = Path(path)
    atomic_write(path, "".join(json.dumps(g.to_record(path.parent.resolve())) + "\n" for g in groups))


def read_groups(path: Union[str, Path], categories_by_prompt: Optional[dict[str, str]] = None, field_name: str = "itercomp.ranker.file") -> list[Group]:
    """Read ranking JSONL (this module's format or the ranking app's export) into groups.

    A record without ``category`` takes the category its prompt has in the run's prompt lists.
    Raises :class:`UserError` naming the line of any malformed record.
    """
    p = Path(path)
    if not p.exists():
        raise UserError(f"{field_name}: ranking file {p} not found")
    base = p.parent.resolve()
    out = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{field_name}: {p} line {n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
            raise UserError(f"{where}: expected an object with a string \"prompt\"")
        prompt = rec["prompt"]
        cat = rec.get("category") or (categories_by_prompt or {}).get(prompt)
        if cat is None:
            raise UserError(f"{where}: no \"category\" and the prompt is not among the run's prompts; add \"category\": attribute|spatial|nonspatial|count")
        ranking, ties = None, None
        if "chosen" in rec and "rejected" in rec:
            items = [rec["chosen"], rec["rejected"]]
            images = [it["image"] if isinstance(it, dict) else it for it in items]
            ranking = [0, 1]
        elif "items" in rec:
            images = [it.get("image") if isinstance(it, dict) else it for it in rec["items"]]
            ties = rec.get("ranks")
            if not isinstance(ties, list) or len(ties) != len(images):
                raise UserError(f"{where}: \"ranks\" must give one rank per item")
        else:
            images = rec.get("images")
            ranking = rec.get("ranking")
            if not isinstance(ranking, list):
                raise UserError(f"{where}: \"ranking\" (indices into images, best first) is missing")
            if rec.get("ranks") is not None:  # optional tie levels (1 = best; equal = tie)
                ties = rec["ranks"]
                if not isinstance(ties, list) or len(ties) != len(images or []) or not all(isinstance(r, int) for r in ties):
                    raise UserError(f"{where}: \"ranks\" must give one integer rank per image")
        if not isinstance(images, list) or len(images) < 2 or not all(isinstance(x, str) for x in images):
            raise UserError(f"{where}: \"images\" must list at least two image paths")
        if ranking is not None:
            if not all(isinstance(i, int) and 0 <= i < len(images) for i in ranking) or len(set(ranking)) != len(ranking) or len(ranking) < 1:
                raise UserError(f"{where}: \"ranking\" must list distinct indices into images (0..{len(images) - 1}), best first")
        paths = [x if os.path.isabs(x) else str((base / x).resolve()) for x in images]
        models = rec.get("models") or [it.get("model", "") for it in rec.get("items", []) if isinstance(it, dict)] or []
        out.append(Group(prompt, cat, paths, list(models), rec.get("seed"), ranking, ties))
    return out


def tie_levels(scores: Sequence[float], tol: float) -> list[int]:
    """Rank levels (1 = best; equal = tie) of scores: walking down from the best, a score within
    ``tol`` of the one above it shares its level, so only pairs the scorer clearly separates
    are trained (two near-zero composition scores are not a preference). NaN: the last level."""
    order = rank_by_scores(scores)
    levels = [0] * len(scores)  # pragma: no mutate: every entry is assigned below, the initial value is never read
    level, prev = 1, None
    for i in order:
        s = scores[i]
        if not math.isfinite(s):
            if prev is None or math.isfinite(prev):
                level += prev is not None
            levels[i] = level
            prev = s  # pragma: no mutate: only NaN follow a NaN (they sort last), and prev None or NaN both keep the level
            continue
        if prev is not None and (prev - s) > tol:
            level += 1
        levels[i] = level
        prev = s
    return levels


def rank_by_scores(scores: Sequence[float]) -> list[int]:
    """Indices best first (higher score better, NaN last, ties by index)."""
    from ..feedback.oracles import order_scores

    return order_scores(
        scores,
        higher_is_better=True,  # pragma: no mutate: True is also the default, dropping it is equivalent
    )
