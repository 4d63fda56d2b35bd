"""Procedural scenes of the shapes world: 1-3 flat coloured shapes on a plain background.

A scene is drawn from a seed (``numpy.random.Generator``), captioned from templates of three
kinds (attribute binding, spatial relation, counting: see :mod:`rewards.shapes`, which holds
the vocabulary and the caption parser) and rendered with PIL at 4x supersampling, then box-
filtered down, so edges are antialiased. Everything is deterministic in the seed.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from rewards.shapes import COLOUR_NAMES, COLOURS, KINDS, MAX_COUNT, RELATIONS, SHAPES, Item, Spec, category

SIZE = 32
#: object radius as a fraction of the image width (4.5 .. 7 px at 32 px)
R_MIN, R_MAX = 0.14, 0.22
#: smallest centre offset along the relation axis for a spatial caption
REL_MARGIN = 0.15
SUPERSAMPLE = 4


@dataclass
class Obj:
    shape: str
    colour: str
    x: float  # centre, fraction of width (0 left)
    y: float  # centre, fraction of height (0 top)
    r: float  # radius, fraction of width
    rgb: tuple[float, float, float] = (0.0, 0.0, 0.0)  # the jittered colour actually drawn


@dataclass
class Scene:
    objects: list[Obj]
    background: tuple[float, float, float]
    kind: str  # attribute | spatial | count | free
    spec: Optional[Spec] = None

    @property
    def caption(self) -> str:
        return self.spec.caption() if self.spec is not None else ""

    def counts(self) -> np.ndarray:
        """Objects per category, shape (N_CATEGORIES,)."""
        from rewards.shapes import N_CATEGORIES

        c = np.zeros(N_CATEGORIES, dtype=np.int64)
        for o in self.objects:
            c[category(o.colour, o.shape)] += 1
        return c

    def labels(self) -> dict:
        """Structured labels: objects (shape, colour, x, y, r), kind and caption."""
        return {"kind": self.kind, "caption": self.caption, "background": list(self.background),
                "objects": [{k: v for k, v in asdict(o).items() if k != "rgb"} for o in self.objects]}


def _place(rng: np.random.Generator, radii: Sequence[float], tries: int = 200):
    """Centres for objects of the given radii, not overlapping; None if it does not fit."""
    out: list[tuple[float, float]] = []
    for r in radii:
        for _ in range(tries):
            x, y = rng.uniform(r + 0.02, 1 - r - 0.02, size=2)
            if all((x - a) ** 2 + (y - b) ** 2 >= (r + rb + 0.05) ** 2 for (a, b), rb in zip(out, radii)):
                out.append((float(x), float(y)))
                break
        else:
            return None
    return out


def _relation_holds(a, b, rel: str) -> bool:
    dx, dy = b[0] - a[0], b[1] - a[1]
    d, other = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[rel]
    return d >= REL_MARGIN and abs(d) >= abs(other)


def _two_categories(rng: np.random.Generator, both_differ: bool):
    while True:
        c1, c2 = rng.choice(len(COLOUR_NAMES), 2, replace=True)
        s1, s2 = rng.choice(len(SHAPES), 2, replace=True)
        if (c1, s1) == (c2, s2):
            continue
        if both_differ and (c1 == c2 or s1 == s2):
            continue
        return (COLOUR_NAMES[c1], SHAPES[s1]), (COLOUR_NAMES[c2], SHAPES[s2])


def sample_scene(rng: np.random.Generator, kind: Optional[str] = None) -> Scene:
    """One random scene. ``kind``: attribute, spatial, count, free (0-3 arbitrary objects,
    uncaptioned: judge training data) or None (attribute / spatial / count in 4:3:3)."""
    if kind is None:
        kind = KINDS[rng.choice(3, p=[0.4, 0.3, 0.3])]
    bg_level = rng.uniform(0.82, 0.95)
    background = tuple(float(np.clip(bg_level + rng.uniform(-0.02, 0.02), 0, 1)) for _ in range(3))
    while True:
        spec = None
        if kind == "attribute":
            if rng.random() < 0.25:
                cs = [(COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))], SHAPES[rng.integers(len(SHAPES))])]
            else:
                cs = list(_two_categories(rng, both_differ=rng.random() < 0.7))
            spec = Spec("attribute", tuple(Item(c, s) for c, s in cs))
        elif kind == "spatial":
            cs = list(_two_categories(rng, both_differ=rng.random() < 0.7))
            spec = Spec("spatial", tuple(Item(c, s) for c, s in cs), RELATIONS[rng.integers(len(RELATIONS))])
        elif kind == "count":
            n = int(rng.choice([1, 2, 3], p=[0.2, 0.4, 0.4]))
            c, s = COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))], SHAPES[rng.integers(len(SHAPES))]
            spec = Spec("count", (Item(c, s, n),))
            cs = [(c, s)] * n
        elif kind == "free":
            n = int(rng.choice(MAX_COUNT + 1, p=[0.1, 0.3, 0.3, 0.3]))
            cs = [(COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))], SHAPES[rng.integers(len(SHAPES))]) for _ in range(n)]
        else:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, free or None; got {kind!r}")
        radii = [float(rng.uniform(R_MIN, R_MAX)) for _ in cs]
        for _ in range(50):
            centres = _place(rng, radii)
            if centres is None:
                break
            if kind != "spatial" or _relation_holds(centres[0], centres[1], spec.relation):
                break
        else:
            centres = None
        if centres is not None:
            break
    objects = []
    for (c, s), r, (x, y) in zip(cs, radii, centres):
        rgb = tuple(float(np.clip(v + rng.uniform(-0.04, 0.04), 0, 1)) for v in COLOURS[c])
        objects.append(Obj(s, c, x, y, r, rgb))
    return Scene(objects, background, kind, spec)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        h = r * 0.85
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        # equilateral, pointing up, centred on its bounding box's centre
        h = r * 1.05
        return [(cx, cy - h), (cx + h, cy + h * 0.8), (cx - h, cy + h * 0.8)]
    if shape == "cross":
        a, w = r, r * 0.38
        return [(cx - w, cy - a), (cx + w, cy - a), (cx + w, cy - w), (cx + a, cy - w), (cx + a, cy + w), (cx + w, cy + w),
                (cx + w, cy + a), (cx - w, cy + a), (cx - w, cy + w), (cx - a, cy + w), (cx - a, cy - w), (cx - w, cy - w)]
    raise ValueError(shape)


def render(scene: Scene, size: int = SIZE) -> torch.Tensor:
    """The scene as a float tensor (3, size, size) in [0, 1]."""
    big = size * SUPERSAMPLE
    to255 = lambda rgb: tuple(int(round(v * 255)) for v in rgb)
    img = Image.new("RGB", (big, big), to255(scene.background))
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        cx, cy, r = o.x * big, o.y * big, o.r * big
        if o.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=to255(o.rgb))
        else:
            draw.polygon(_polygon(o.shape, cx, cy, r), fill=to255(o.rgb))
    img = img.resize((size, size), Image.BOX)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255.0


def make_batch(n: int, seed: int, kind: Optional[str] = None, size: int = SIZE, kinds: Optional[Sequence[Optional[str]]] = None):
    """``n`` scenes from ``seed``: (images (n, 3, size, size) in [0, 1], list of Scene).

    ``kinds``: a kind per scene (cycled) instead of one ``kind`` for all.
    """
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, kinds[i % len(kinds)] if kinds else kind) for i in range(n)]
    return torch.stack([render(s, size) for s in scenes]), scenes


def corrupt(spec: Spec, rng: np.random.Generator) -> Spec:
    """A caption the scene of ``spec`` does not match: a hard negative of the same kind.

    attribute: the colours of two objects swapped (binding) or, for one object, another
    colour or shape; spatial: the relation reversed; count: one more or one fewer.
    """
    if spec.kind == "attribute":
        if len(spec.items) == 2 and spec.items[0].colour != spec.items[1].colour and rng.random() < 0.6:
            a, b = spec.items
            return Spec("attribute", (Item(b.colour, a.shape), Item(a.colour, b.shape)))
        i = int(rng.integers(len(spec.items)))
        it = spec.items[i]
        taken = {x.category for x in spec.items}
        while True:
            if rng.random() < 0.5:
                new = Item(COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))], it.shape)
            else:
                new = Item(it.colour, SHAPES[rng.integers(len(SHAPES))])
            if new.category not in taken:
                break
        items = list(spec.items)
        items[i] = new
        return Spec("attribute", tuple(items))
    if spec.kind == "spatial":
        flip = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
        return Spec("spatial", spec.items, flip[spec.relation])
    if spec.kind == "count":
        it = spec.items[0]
        choices = [n for n in (it.count - 1, it.count + 1) if 1 <= n <= MAX_COUNT]
        return Spec("count", (Item(it.colour, it.shape, int(rng.choice(choices))),))
    raise ValueError(spec.kind)


def grid(images: torch.Tensor, nrow: int = 8, pad: int = 2, scale: int = 2) -> Image.Image:
    """A PIL grid of images (B, 3, H, W) in [0, 1], each upscaled ``scale`` x (nearest)."""
    b, _, h, w = images.shape
    ncol = (b + nrow - 1) // nrow
    canvas = torch.ones(3, ncol * (h + pad) + pad, nrow * (w + pad) + pad)
    for i in range(b):
        r, c = divmod(i, nrow)
        canvas[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = images[i].clamp(0, 1)
    arr = (canvas.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    img = Image.fromarray(arr)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)
