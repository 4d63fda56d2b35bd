"""Learned judges of the shapes world: differentiable rewards that read coloured shapes.

The shapes world (``vfeedback.world``) draws 1-3 flat coloured shapes on a plain light
background at 32 px and captions them in three kinds, after GenEval / T2I-CompBench:

- attribute binding: ``a red circle and a blue square`` (or one object: ``a red circle``)
- spatial relation:  ``a green triangle left of a yellow circle`` (``right of``, ``above``, ``below``)
- counting:          ``two red squares`` (``one`` .. ``three``)

A judge is a small CNN that reads, for each of the 24 categories (colour x shape), a
distribution over how many are present (0-3) and where they are (a softmax over an 8x8 grid,
or a regressed centre). A caption is parsed into a :class:`Spec` and the judge scores the
probability that the image matches it, as a product of differentiable terms:

    attribute: prod_o P(count_o >= 1)
    count:     P(count_o == n)
    spatial:   P(count_a >= 1) P(count_b >= 1) sigmoid((coord_b - coord_a) / tau)

Two judges ship in ``rewards/assets/shapes``: ``shapes_judge`` (the training reward) and
``shapes_judge_heldout`` (another architecture, seed and data stream; for evaluation only,
so a method that games the first is caught by the second). The vocabulary and the caption
parser live here so that ``rewards`` stays importable without ``vfeedback``.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import Reward, RewardError, register

#: sRGB in [0, 1] of the world's colours (hue-spaced so 32 px renders stay distinct).
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "yellow": (0.95, 0.85, 0.10),
    "green": (0.10, 0.70, 0.15),
    "cyan": (0.10, 0.80, 0.85),
    "blue": (0.10, 0.25, 0.90),
    "purple": (0.60, 0.15, 0.75),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
NUMBERS: dict[str, int] = {"one": 1, "two": 2, "three": 3}
NUMBER_WORDS: dict[int, str] = {v: k for k, v in NUMBERS.items()}
MAX_COUNT = 3
N_CATEGORIES = len(COLOURS) * len(SHAPES)
KINDS: tuple[str, ...] = ("attribute", "spatial", "count")
RESOLUTION = 32  # judges read 32 x 32 images; other sizes are resized inside (antialiased)
ASSETS = Path(__file__).parent / "assets" / "shapes"
#: the proxy judges of the over-optimisation study: file names, sha256 and measured accuracy
PROXY_MANIFEST = ASSETS / "proxies.json"


def category(colour: str, shape: str) -> int:
    """Index of (colour, shape) among the ``N_CATEGORIES`` judge outputs."""
    return COLOUR_NAMES.index(colour) * len(SHAPES) + SHAPES.index(shape)


def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


@dataclass(frozen=True)
class Item:
    """One mentioned object: colour, shape and the exact count asked for (None: at least one)."""

    colour: str
    shape: str
    count: Optional[int] = None

    @property
    def category(self) -> int:
        return category(self.colour, self.shape)


@dataclass(frozen=True)
class Spec:
    """A parsed caption. ``relation`` (one of :data:`RELATIONS`) relates ``items[0]`` to
    ``items[1]`` ("items[0] is left of items[1]")."""

    kind: str
    items: tuple[Item, ...]
    relation: Optional[str] = None

    def caption(self) -> str:
        """The canonical caption of this spec (``parse(spec.caption()) == spec``)."""
        def np_(it: Item) -> str:
            if it.count is None:
                return f"a {it.colour} {it.shape}"
            noun = it.shape if it.count == 1 else plural(it.shape)
            return f"{NUMBER_WORDS[it.count]} {it.colour} {noun}"

        if self.kind == "spatial":
            return f"{np_(self.items[0])} {self.relation} {np_(self.items[1])}"
        return " and ".join(np_(it) for it in self.items)


_C = "|".join(COLOUR_NAMES)
_S = "|".join(SHAPES)
_NP = rf"(a|an|one|two|three)\s+({_C})\s+({_S})(?:e?s)?"
_SPATIAL = re.compile(rf"^{_NP}\s+(?:is\s+)?(?:(?:to\s+the\s+)?(left|right)\s+of|(above|below|on\s+top\s+of|under))\s+{_NP}$")
_ONE_NP = re.compile(rf"^{_NP}$")


def _item(det: str, colour: str, shape: str, counting: bool) -> Item:
    return Item(colour, shape, NUMBERS.get(det) if counting else None)  # pragma: no mutate: without counting det is a/an, which NUMBERS maps to None anyway


def parse(caption: str) -> Optional[Spec]:
    """Parse a shapes-world caption into a :class:`Spec`; None when it is not one.

    Case, a trailing full stop and ``an``/``to the``/``is`` are tolerated; ``on top of`` reads
    as ``above`` and ``under`` as ``below``.
    """
    text = " ".join(re.sub(r"[.,!]+\s*$", "", caption.strip().lower()).split())
    m = _SPATIAL.match(text)
    if m:
        d1, c1, s1, lr, ab, d2, c2, s2 = m.groups()
        rel = f"{lr} of" if lr else {"above": "above", "below": "below", "on top of": "above", "under": "below"}[ab]
        if (c1, s1) == (c2, s2):
            return None
        return Spec("spatial", (Item(c1, s1), Item(c2, s2)), rel)
    parts = [p.strip() for p in text.split(" and ")]
    items = []
    counting = False  # pragma: no mutate: None is as falsy; only truth is read
    for p in parts:
        m = _ONE_NP.match(p)
        if not m:
            return None
        det, c, s = m.groups()
        counting = counting or det in NUMBERS
        items.append((det, c, s))
    if not items:
        return None
    kind = "count" if counting else "attribute"
    out = tuple(_item(d, c, s, counting) for d, c, s in items)
    if len({it.category for it in out}) != len(out):
        return None
    return Spec(kind, out)


# --------------------------------------------------------------------------------------------
# judge networks: (B, 3, 32, 32) in [0, 1] -> count logits (B, K, 4), centres (B, K, 2) in [0, 1]


def _gn(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(8, c)


class GridJudge(nn.Module):
    """Plain conv stack; counts from pooled features, centres as the expectation of a softmax
    over an 8x8 grid per category (the ``shapes_judge`` architecture)."""

    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        conv = lambda i, o, s=1: [nn.Conv2d(i, o, 3, s, 1), _gn(o), nn.SiLU()]
        self.body = nn.Sequential(
            *conv(3, w), *conv(w, w),
            *conv(w, 2 * w, 2), *conv(2 * w, 2 * w),
            *conv(2 * w, 4 * w, 2), *conv(4 * w, 4 * w), *conv(4 * w, 4 * w),
        )
        f = 4 * w
        self.count = nn.Sequential(nn.Linear(2 * f, 256), nn.SiLU(), nn.Linear(256, N_CATEGORIES * (MAX_COUNT + 1)))
        self.where = nn.Conv2d(f, N_CATEGORIES, 1)

    def forward(self, x):
        h = self.body(x)  # (B, f, 8, 8)
        pooled = torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1)
        counts = self.count(pooled).view(-1, N_CATEGORIES, MAX_COUNT + 1)
        logits = self.where(h).flatten(2)  # (B, K, 64)
        return counts, _soft_centres(logits, h.shape[-1]), logits


def _soft_centres(logits: torch.Tensor, g: int) -> torch.Tensor:
    """(B, K, g*g) logits over a g x g grid -> expected (x, y) in [0, 1], shape (B, K, 2)."""
    p = logits.softmax(-1).view(*logits.shape[:2], g, g)
    coords = torch.arange(g, device=logits.device, dtype=p.dtype)  # pragma: no mutate: placement, equivalent on the CPU tests run on
    coords = (coords + 0.5) / g
    return torch.stack([(p.sum(2) * coords).sum(-1), (p.sum(3) * coords).sum(-1)], -1)


class _Res(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.f = nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c, 3, 1, 1), nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c, 3, 1, 1))

    def forward(self, x):
        return x + self.f(x)


class ResJudge(nn.Module):
    """Residual net with BatchNorm, ReLU, a 5x5 stem and max-pool downsampling (the held-out
    judge's architecture); counts from pooled features through a wider MLP, centres from a
    separate 3x3 conv head over the 8x8 map."""

    def __init__(self, width: int = 24):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(3, w, 5, 1, 2), _Res(w), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, 1, 1), _Res(2 * w), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, 1, 1), _Res(4 * w), _Res(4 * w), nn.BatchNorm2d(4 * w), nn.ReLU(),
        )
        f = 4 * w
        self.count = nn.Sequential(nn.Linear(2 * f, 384), nn.ReLU(), nn.Linear(384, N_CATEGORIES * (MAX_COUNT + 1)))
        self.where = nn.Sequential(nn.Conv2d(f, f, 3, 1, 1), nn.ReLU(), nn.Conv2d(f, N_CATEGORIES, 1))

    def forward(self, x):
        h = self.body(x)  # (B, f, 8, 8)
        pooled = torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1)
        counts = self.count(pooled).view(-1, N_CATEGORIES, MAX_COUNT + 1)
        logits = self.where(h).flatten(2)
        return counts, _soft_centres(logits, h.shape[-1]), logits


ARCHS = {"grid": GridJudge, "res": ResJudge}


def build_judge(arch: str, **kw) -> nn.Module:
    if arch not in ARCHS:
        raise RewardError(f"shapes judge: unknown arch {arch!r}; one of {', '.join(ARCHS)}")
    return ARCHS[arch](**kw)


def load_judge(path) -> nn.Module:
    """A judge from ``*.safetensors`` (config in the file's metadata); eval mode, frozen."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise RewardError(f"shapes judge weights not found at {path}; run `make world` (python -m vfeedback.world.train_world) to build them")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    cfg = json.loads(meta.get("config", "{}"))
    net = build_judge(cfg.get("arch", "grid"), **cfg.get("kwargs", {}))
    state = load_file(str(path))
    if meta.get("body"):  # heads only (the proxy judges): the conv body comes from another judge's file
        body = path.parent / meta["body"]
        if not body.exists():
            raise RewardError(f"shapes judge {path.name}: its body weights {body} are missing; run `make world`")
        state = {**{k: v for k, v in load_file(str(body)).items() if k.startswith("body.")}, **state}
    net.load_state_dict(state)
    net.eval().requires_grad_(False)
    return net


def prepare(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, 3, 32, 32) float32, resized with torch ops (keeps grad)."""
    x = images.float()
    if x.shape[-2:] != (RESOLUTION, RESOLUTION):
        x = F.interpolate(x, size=(RESOLUTION, RESOLUTION), mode="bilinear", antialias=True, align_corners=False)
    return x


def spec_terms(counts: torch.Tensor, coords: torch.Tensor, spec: Spec, tau: float = 0.04) -> dict[str, torch.Tensor]:
    """Probabilities of one image's reading matching ``spec``: ``attribute`` (every object
    present), ``count`` (exact counts; only when the spec counts) and ``spatial`` (the
    relation between the two centres; only for spatial specs). ``counts`` (K, 4) logits,
    ``coords`` (K, 2)."""
    p = counts.float().softmax(-1)  # pragma: no mutate: counts is (K, 4), so dim 1 is the last dim; the softmax itself is pinned by tests
    present = torch.stack([1 - p[it.category, 0] for it in spec.items]).prod()
    out = {"attribute": present}
    if spec.kind == "count":
        out["count"] = torch.stack([p[it.category, it.count] for it in spec.items]).prod()
    if spec.kind == "spatial":
        a, b = coords[spec.items[0].category].float(), coords[spec.items[1].category].float()
        d = {"left of": b[0] - a[0], "right of": a[0] - b[0], "above": b[1] - a[1], "below": a[1] - b[1]}[spec.relation]
        out["spatial"] = torch.sigmoid(d / tau)
    return out


def match_prob(terms: dict[str, torch.Tensor]) -> torch.Tensor:
    """P(the whole caption holds) from :func:`spec_terms`: the exact count when the caption
    counts (it implies presence), else presence, times the relation when there is one."""
    p = terms["count"] if "count" in terms else terms["attribute"]
    return p * terms["spatial"] if "spatial" in terms else p


PARTS = ("all", "attribute", "spatial", "count")


class ShapesJudge(Reward):
    """Probability that the image matches its shapes-world caption, under a learned judge.

    ``part``: ``all`` (every term of the caption multiplied: what a GenEval-style check would
    pass), or one term: ``attribute`` (all named coloured shapes present), ``spatial`` (the
    relation holds between their centres; NaN for captions without one) or ``count`` (exact
    counts; NaN for captions without a number). ``log``: return the log-probability instead
    (a smoother training signal). A caption that is not a shapes-world caption scores NaN.
    Range ``[0, 1]`` (``(-inf, 0]`` with ``log``).
    """

    needs_prompt = True

    def __init__(self, weights: Optional[str] = None, part: str = "all", log: bool = False, tau: float = 0.04, which: str = "judge"):
        super().__init__()
        if part not in PARTS:
            raise RewardError(f"shapes judge: part must be one of {', '.join(PARTS)}, got {part!r}")
        if tau <= 0:
            raise RewardError(f"shapes judge: tau must be > 0, got {tau}")
        self.net = load_judge(weights or ASSETS / f"{which}.safetensors")
        self.part, self.log, self.tau = part, bool(log), float(tau)

    def read(self, images: torch.Tensor):
        """The judge's reading: count logits (B, K, 4) and centres (B, K, 2) in [0, 1]."""
        counts, coords, _ = self.net(prepare(images).to(self.device))
        return counts, coords

    def forward(self, images, prompts=None, **context):
        if prompts is None:
            raise RewardError(f"{self.name}: needs a prompt per image (a shapes-world caption)")
        if isinstance(prompts, str):
            prompts = [prompts] * images.shape[0]
        counts, coords = self.read(images)
        vals = []
        for i, prompt in enumerate(prompts):
            spec = parse(prompt)
            nan = counts.new_full((), float("nan"))  # pragma: no mutate: float("NAN") is the same NaN
            if spec is None:
                vals.append(nan)
                continue
            terms = spec_terms(counts[i], coords[i], spec, self.tau)
            if self.part == "all":
                v = match_prob(terms)
            else:
                v = terms.get(self.part, nan)
            vals.append(v)
        out = torch.stack(vals).to(images.device)  # pragma: no mutate: placement, equivalent on CPU
        return out.clamp_min(1e-6).log() if self.log else out


def _factory(which: str, part: str):
    def make(weights: Optional[str] = None, log: bool = False, tau: float = 0.04, part: str = part) -> ShapesJudge:
        return ShapesJudge(weights=weights, part=part, log=log, tau=tau, which=which)

    return make


register("shapes_judge", differentiable=True,
         description="shapes world: P(image matches its caption: colours, shapes, relation, count) under a learned CNN judge")(_factory("judge", "all"))
register("shapes_attribute", differentiable=True,
         description="shapes world: P(every coloured shape the caption names is present)")(_factory("judge", "attribute"))
register("shapes_spatial", differentiable=True,
         description="shapes world: P(the caption's left/right/above/below relation holds); NaN without one")(_factory("judge", "spatial"))
register("shapes_count", differentiable=True,
         description="shapes world: P(the exact counts the caption names); NaN without a number")(_factory("judge", "count"))
register("shapes_judge_heldout", differentiable=True,
         description="shapes world: the held-out judge (other architecture, seed and data); for evaluation only")(_factory("judge_heldout", "all"))


def proxy_weights(index: int) -> Path:
    """Path of proxy judge ``index`` (``rewards/assets/shapes/proxies.json``), its sha256 checked
    against the manifest. Raises :class:`RewardError` for an index out of range, a missing
    manifest or file, or a checksum mismatch."""
    import hashlib

    if not PROXY_MANIFEST.exists():
        raise RewardError(f"shapes_judge_proxy: no manifest at {PROXY_MANIFEST}; run `python -m vfeedback.world.proxy_judges` to build the proxies")
    entries = {e["index"]: e for e in json.loads(PROXY_MANIFEST.read_text())["proxies"]}
    if isinstance(index, bool) or not isinstance(index, int) or index not in entries:
        raise RewardError(f"shapes_judge_proxy: index must be one of {sorted(entries)}, got {index!r}")
    e = entries[index]
    path = ASSETS / e["file"]
    if not path.exists():
        raise RewardError(f"shapes_judge_proxy: weights {path} listed in {PROXY_MANIFEST.name} are missing; "
                          "run `python -m vfeedback.world.proxy_judges` to rebuild them")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != e["sha256"]:
        raise RewardError(f"shapes_judge_proxy: {path} has sha256 {digest[:12]}.., the manifest says {e['sha256'][:12]}..; "
                          "the file is damaged or was rebuilt without its manifest (python -m vfeedback.world.proxy_judges)")
    return path


def _proxy(index: int = 0, log: bool = False, tau: float = 0.04, part: str = "all") -> ShapesJudge:
    j = ShapesJudge(weights=str(proxy_weights(index)), part=part, log=log, tau=tau)
    return j


register("shapes_judge_proxy", differentiable=True,
         description="shapes world: small proxy judge number `index` (weak: a small data subset; docs/overoptimisation.md), "
                     "the reward an over-optimisation study optimises")(_proxy)
