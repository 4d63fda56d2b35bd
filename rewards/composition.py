"""Composition scorers: does the image bind attributes, place objects and count as the prompt says?

IterComp (Zhang et al. 2024, arXiv:2410.07171) ranks a gallery of models per prompt along three
compositional aspects from T2I-CompBench (Huang et al. 2023): **attribute binding** (colour,
shape, texture), **spatial relationships** and **non-spatial relationships**; GenEval (Ghosh et
al. 2023) adds **counting**. These scorers rank images automatically along those aspects:

- ``composition_attribute``: a VQA judge asked about each noun phrase of the prompt separately
  ("a red car", "a blue bench") with the answers' P(yes) multiplied: T2I-CompBench's
  disentangled BLIP-VQA recipe, on the ``vqa`` reward (any transformers VLM).
- ``composition_nonspatial``: the VQA judge asked about the whole prompt (VQAScore).
- ``composition_spatial``: an open-vocabulary detector (OWLv2, Grounding DINO, OWL-ViT through
  transformers' zero-shot detection API) finds each object; the relation is checked on the
  boxes' centres, softly (``sigmoid(d / tau)``) so the score ranks and has gradients.
- ``composition_count``: the same detector, boxes above a threshold after NMS, counted per
  phrase and compared with the number the prompt names.
- ``composition_color``: an analytic oracle for CPU runs and tests with no weights: each object
  of the prompt must carry a colour word; it scores how much of the object's colour is in the
  region the relation puts it (the whole image without a relation).

The prompt parsing (which objects, which relation, which count) is :func:`parse_prompt`; the
box geometry is :func:`relation_score` / :func:`relation_holds` / :func:`count_score`, plain
functions that tests check from given boxes. Heavy imports (transformers) stay inside the
loaders.
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from . import _hub
from .base import Reward, RewardError, register

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# prompt parsing

NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10}
DETERMINERS = {"a", "an", "the", "some", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"}

#: relation phrase (as written) -> canonical relation; longest phrases are matched first
RELATION_PHRASES: dict[str, str] = {
    "on the left side of": "left of", "on the right side of": "right of",
    "to the left of": "left of", "to the right of": "right of",
    "on the left of": "left of", "on the right of": "right of",
    "left of": "left of", "right of": "right of",
    "on top of": "above", "above": "above", "over": "above",
    "underneath": "below", "beneath": "below", "below": "below", "under": "below",
    "next to": "next to", "beside": "next to", "near": "next to", "on the side of": "next to",
}
SPATIAL_RELATIONS = ("left of", "right of", "above", "below", "next to")
_REL_RE = re.compile(r"\b(?:is |are )?(" + "|".join(sorted(map(re.escape, RELATION_PHRASES), key=len, reverse=True)) + r")\b")
_SPLIT_RE = re.compile(r"\s*(?:,\s*and\s+|,\s*|\s+and\s+)\s*")


@dataclass(frozen=True)
class Phrase:
    """One object of a prompt: the phrase as written without its count (``"red car"``), its
    noun (the last word), the words before it, and the number asked for (None: unspecified)."""

    text: str
    noun: str
    attributes: tuple[str, ...] = ()
    count: Optional[int] = None

    @property
    def query(self) -> str:
        """What a detector / VQA judge is asked about: ``"a red car"``, ``"two cats"``."""
        if self.count is not None:
            word = next((k for k, v in NUMBERS.items() if v == self.count), str(self.count))
            return f"{word} {self.text}"
        return ("an " if self.text[:1] in "aeiou" else "a ") + self.text


@dataclass(frozen=True)
class CompositionSpec:
    """A parsed prompt: its objects and, for a spatial prompt, the relation of ``objects[0]``
    to ``objects[1]`` (``"left of"``: objects[0] is left of objects[1])."""

    prompt: str
    objects: tuple[Phrase, ...]
    relation: Optional[str] = None

    @property
    def counts(self) -> bool:
        return any(o.count is not None for o in self.objects)


def parse_phrase(text: str) -> Optional[Phrase]:
    """``"two red apples"`` -> Phrase("red apples", "apples", ("red",), 2); None when empty."""
    words = [w for w in re.findall(r"[a-z0-9\-']+", text.lower())]
    count = None
    while words and (words[0] in DETERMINERS or words[0].isdigit()):
        w = words.pop(0)
        if w in NUMBERS:
            count = NUMBERS[w]
        elif w.isdigit():
            count = int(w)
    if not words:
        return None
    return Phrase(" ".join(words), words[-1], tuple(words[:-1]), count)


def parse_prompt(prompt: str) -> CompositionSpec:
    """Objects, relation and counts of a compositional prompt.

    A spatial prompt is ``<phrase> [is|are] <relation> <phrase>`` with a relation from
    :data:`RELATION_PHRASES` (``left of``, ``to the right of``, ``on top of``, ``under``,
    ``next to``, ...). Otherwise the prompt is split into phrases on commas and ``and``
    (``"a red car and a blue bench"``, ``"three apples, two cups"``). A non-spatial prompt
    (``"a man riding a horse"``) parses into one phrase; its scorers read the whole prompt.
    """
    text = " ".join(re.sub(r"[.!?]+\s*$", "", prompt.strip()).lower().split())
    m = _REL_RE.search(text)
    if m:
        left, right = text[: m.start()].strip(), text[m.end():].strip()
        a, b = parse_phrase(left), parse_phrase(right)
        if a is not None and b is not None:
            return CompositionSpec(prompt, (a, b), RELATION_PHRASES[m.group(1)])
    phrases = [parse_phrase(p) for p in _SPLIT_RE.split(text) if p.strip()]
    return CompositionSpec(prompt, tuple(p for p in phrases if p is not None))


# --------------------------------------------------------------------------------------------
# box geometry: boxes are (cx, cy, w, h) normalised to [0, 1], y pointing down


def _axis_gap(a: torch.Tensor, b: torch.Tensor, relation: str) -> torch.Tensor:
    """Signed distance that is positive when ``a <relation> b`` holds (left/right/above/below)."""
    if relation == "left of":
        return b[..., 0] - a[..., 0]
    if relation == "right of":
        return a[..., 0] - b[..., 0]
    if relation == "above":
        return b[..., 1] - a[..., 1]
    if relation == "below":
        return a[..., 1] - b[..., 1]
    raise RewardError(f"relation {relation!r}: one of {', '.join(SPATIAL_RELATIONS)}")


def relation_score(box_a: torch.Tensor, box_b: torch.Tensor, relation: str, tau: float = 0.05, near: float = 0.5) -> torch.Tensor:
    """Soft truth of ``a <relation> b`` from two boxes ``(..., 4)`` (cx, cy, w, h in [0, 1]).

    left/right/above/below: ``sigmoid(gap / tau)`` where gap is the centres' signed distance
    along the relation's axis; ``next to``: ``sigmoid((near - dist) / tau)`` on the centres'
    distance. In ``(0, 1)``; differentiable in the boxes.
    """
    a, b = torch.as_tensor(box_a, dtype=torch.float32), torch.as_tensor(box_b, dtype=torch.float32)
    if relation == "next to":
        d = (a[..., :2] - b[..., :2]).norm(dim=-1)
        return torch.sigmoid((near - d) / tau)
    return torch.sigmoid(_axis_gap(a, b, relation) / tau)


def relation_holds(box_a, box_b, relation: str, near: float = 0.5) -> bool:
    """Hard check of ``a <relation> b``: the centres differ in the relation's direction and by
    more along its axis than across it (``next to``: centres closer than ``near``)."""
    a, b = torch.as_tensor(box_a, dtype=torch.float32), torch.as_tensor(box_b, dtype=torch.float32)
    if relation == "next to":
        return bool((a[:2] - b[:2]).norm() < near)
    gap = float(_axis_gap(a, b, relation))
    across = abs(float(a[1] - b[1])) if relation in ("left of", "right of") else abs(float(a[0] - b[0]))
    return gap > 0 and gap > across


def count_score(found: int, wanted: int) -> float:
    """``exp(-|found - wanted|)``: 1 for the exact count, falling off with the error."""
    return math.exp(-abs(int(found) - int(wanted)))


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU matrix of (N, 4) and (M, 4) cxcywh boxes."""
    def xyxy(x):
        return torch.stack([x[:, 0] - x[:, 2] / 2, x[:, 1] - x[:, 3] / 2, x[:, 0] + x[:, 2] / 2, x[:, 1] + x[:, 3] / 2], 1)

    a, b = xyxy(a.float()), xyxy(b.float())
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp_min(0).prod(-1)
    area = lambda x: (x[:, 2] - x[:, 0]).clamp_min(0) * (x[:, 3] - x[:, 1]).clamp_min(0)
    return inter / (area(a)[:, None] + area(b)[None, :] - inter).clamp_min(1e-9)


def count_boxes(boxes: torch.Tensor, scores: torch.Tensor, threshold: float, iou: float = 0.5) -> int:
    """Boxes scoring at least ``threshold`` that survive greedy NMS at ``iou``."""
    keep = scores >= threshold
    boxes, scores = boxes[keep], scores[keep]
    order = scores.argsort(descending=True)
    kept: list[int] = []
    for i in order.tolist():
        if kept and bool((box_iou(boxes[i : i + 1], boxes[kept]) > iou).any()):
            continue
        kept.append(i)
    return len(kept)


# --------------------------------------------------------------------------------------------
# detector scorers


class _Detector:
    """An open-vocabulary detector from transformers (OWLv2 / OWL-ViT / Grounding DINO) that
    returns, per text query, a probability and a box for every candidate box.

    Images are turned into pixel values with torch ops (resize to the processor's size,
    normalise), so the soft spatial score keeps gradients; the text side goes through the
    model's own processor.
    """

    def __init__(self, model: str, device, dtype):
        import transformers
        from transformers import AutoProcessor

        hint = f"Without a network, download {model} elsewhere (`hf download {model}`) and pass model=/local/folder"
        with _hub.load_errors("composition detector", hint):
            self.processor = AutoProcessor.from_pretrained(model)
            auto = getattr(transformers, "AutoModelForZeroShotObjectDetection")
            self.net = auto.from_pretrained(model, dtype=dtype).to(device).eval().requires_grad_(False)
        ip = self.processor.image_processor
        size = getattr(ip, "size", None) or {}
        if isinstance(size, (int, float)):
            h = w = int(size)
        else:  # a dict or transformers' SizeDict
            get = (lambda k: size.get(k)) if isinstance(size, dict) else (lambda k: getattr(size, k, None))
            h = get("height") or get("shortest_edge") or 960
            w = get("width") or h
        self.size = (int(h), int(w))
        self.mean = torch.tensor(getattr(ip, "image_mean", None) or [0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
        self.std = torch.tensor(getattr(ip, "image_std", None) or [0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
        self.device, self.dtype = device, dtype
        self.kind = type(self.net).__name__

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().to(self.device)
        h, w = x.shape[-2:]
        if h != w:  # OWL pads to a square at the bottom / right (grey); so do we
            s = max(h, w)
            x = F.pad(x, (0, s - w, 0, s - h), value=0.5)
        x = F.interpolate(x, size=self.size, mode="bilinear", antialias=True, align_corners=False)
        return ((x - self.mean.to(x)) / self.std.to(x)).to(self.dtype)

    def __call__(self, image: torch.Tensor, queries: Sequence[str]):
        """One image ``(3, H, W)``, Q queries -> (probs (N, Q), boxes (N, 4) cxcywh in [0, 1])."""
        px = self.pixels(image[None])
        if "GroundingDino" in self.kind:
            text = ". ".join(q.lower() for q in queries) + "."
            enc = self.processor.tokenizer([text], return_tensors="pt").to(self.device)
            out = self.net(pixel_values=px, **enc)
            # token logits -> one column per query: max over the query's tokens
            probs_tok = out.logits[0].float().sigmoid()  # (N, T)
            ids = enc["input_ids"][0].tolist()
            cols, start = [], 1
            for q in queries:
                n = len(self.processor.tokenizer(q.lower(), add_special_tokens=False)["input_ids"])
                cols.append(probs_tok[:, start : start + n].amax(-1))
                start += n + 1  # the "." separator
            return torch.stack(cols, 1), out.pred_boxes[0].float()
        enc = self.processor.tokenizer(list(queries), padding="max_length", max_length=16, truncation=True, return_tensors="pt")
        enc = {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        out = self.net(pixel_values=px, **enc)
        return out.logits[0].float().sigmoid(), out.pred_boxes[0].float()


class _DetectorReward(Reward):
    needs_prompt = True
    differentiable = True

    def __init__(self, model: str = "google/owlv2-base-patch16-ensemble", device: Optional[str] = None, dtype: Optional[str] = None,
                 query_template: str = "{}", threshold: float = 0.1):
        super().__init__()
        if "{}" not in query_template:
            raise RewardError(f"{self.name}: query_template must contain {{}}, got {query_template!r}")
        dev = _hub.parse_device(device)
        self.detector = _Detector(model, dev, _hub.parse_dtype(dtype, dev))
        self.net = self.detector.net  # registered: .to(), .device follow the detector
        self.template, self.threshold = query_template, float(threshold)

    def detect(self, image: torch.Tensor, spec: CompositionSpec):
        queries = [self.template.format(o.text) for o in spec.objects]
        return self.detector(image, queries)


@register(
    "composition_spatial",
    differentiable=True,
    requires=("transformers",),
    description="spatial relation of the prompt's two objects (left/right/above/below/next to) from an open-vocabulary detector (OWLv2); NaN without a relation",
)
class SpatialComposition(_DetectorReward):
    """``P(a) * P(b) * relation_score(box_a, box_b)`` for a prompt ``"<a> <relation> <b>"``.

    ``P(o)`` is the detector's best probability for object o; its box is the probability-
    weighted mean of the candidate boxes (a soft argmax with temperature ``box_temperature``
    on the probabilities). A prompt without a relation scores NaN. Options: ``model`` (hub id
    or folder of a transformers zero-shot detector; default OWLv2 base), ``tau`` (relation
    softness, fraction of the image), ``query_template`` (e.g. ``"a photo of a {}"``),
    ``device``, ``dtype``.
    """

    def __init__(self, model: str = "google/owlv2-base-patch16-ensemble", tau: float = 0.05, box_temperature: float = 0.05,
                 query_template: str = "{}", device: Optional[str] = None, dtype: Optional[str] = None):
        super().__init__(model, device, dtype, query_template)
        if tau <= 0 or box_temperature <= 0:
            raise RewardError(f"composition_spatial: tau and box_temperature must be > 0, got {tau}, {box_temperature}")
        self.tau, self.box_temperature = float(tau), float(box_temperature)

    def forward(self, images, prompts=None, **context):
        if prompts is None:
            raise RewardError(f"{self.name}: needs a prompt per image")
        out = []
        for img, prompt in zip(images, prompts):
            spec = parse_prompt(prompt)
            if spec.relation is None or len(spec.objects) != 2:
                out.append(images.new_full((), float("nan")))
                continue
            probs, boxes = self.detect(img, spec)  # (N, 2), (N, 4)
            w = torch.softmax(probs / self.box_temperature, dim=0)  # (N, 2)
            centre = w.T @ boxes  # (2, 4)
            p = probs.amax(0)
            out.append((p[0] * p[1] * relation_score(centre[0], centre[1], spec.relation, self.tau)).to(images.device))
        return torch.stack(out).to(images.dtype)


@register(
    "composition_count",
    differentiable=False,
    requires=("transformers",),
    description="counts of the prompt's objects (\"three apples and two cups\") from an open-vocabulary detector (OWLv2): prod exp(-|found - wanted|); NaN without a number",
)
class CountComposition(_DetectorReward):
    """Boxes above ``threshold`` after NMS (IoU ``nms_iou``), counted per phrase; the score is
    the product over phrases of :func:`count_score` (1 when every count is right). Phrases
    without a number count as "at least one". A prompt naming no number scores NaN."""

    differentiable = False

    def __init__(self, model: str = "google/owlv2-base-patch16-ensemble", threshold: float = 0.1, nms_iou: float = 0.5,
                 query_template: str = "{}", device: Optional[str] = None, dtype: Optional[str] = None):
        super().__init__(model, device, dtype, query_template, threshold)
        self.nms_iou = float(nms_iou)

    @torch.no_grad()
    def forward(self, images, prompts=None, **context):
        if prompts is None:
            raise RewardError(f"{self.name}: needs a prompt per image")
        out = []
        for img, prompt in zip(images, prompts):
            spec = parse_prompt(prompt)
            if not spec.counts:
                out.append(float("nan"))
                continue
            probs, boxes = self.detect(img, spec)
            s = 1.0
            for q, o in enumerate(spec.objects):
                n = count_boxes(boxes, probs[:, q], self.threshold, self.nms_iou)
                s *= count_score(n, o.count) if o.count is not None else float(n >= 1)
            out.append(s)
        return torch.tensor(out, dtype=torch.float32, device=images.device)


# --------------------------------------------------------------------------------------------
# VQA scorers (reuse the vqa reward)


class _VQAComposition(Reward):
    needs_prompt = True
    differentiable = True
    QUESTION = 'Does this image show "{prompt}"? Please answer yes or no.'

    def __init__(self, model: str = "llava-hf/llava-1.5-7b-hf", processor: Optional[str] = None, question: Optional[str] = None,
                 device: Optional[str] = None, dtype: Optional[str] = None, judge=None):
        super().__init__()
        if judge is None:
            from .vqa import VQAScore

            judge = VQAScore(model=model, processor=processor, question=question or self.QUESTION, device=device, dtype=dtype)
        self.judge = judge  # anything with judge(images, prompts) -> P(yes) (B,)

    @property
    def device(self):
        return self.judge.device if hasattr(self.judge, "device") else torch.device("cpu")


@register(
    "composition_attribute",
    differentiable=True,
    requires=("transformers",),
    description="attribute binding: a VQA judge asked about each noun phrase of the prompt (\"a red car\", \"a blue bench\"), P(yes) multiplied (T2I-CompBench's disentangled VQA)",
)
class AttributeComposition(_VQAComposition):
    """``prod_phrases P(yes | image, "Is there {phrase}?")``: each object with its attributes
    must be there, so a red car next to a blue bench beats a blue car next to a red bench.
    ``geometric=True`` takes the geometric mean instead (comparable across phrase counts).
    Options as the ``vqa`` reward (``model``, ``processor``, ``question`` with ``{prompt}``)."""

    QUESTION = 'Is there {prompt} in the image? Please answer yes or no.'

    def __init__(self, model: str = "llava-hf/llava-1.5-7b-hf", processor: Optional[str] = None, question: Optional[str] = None,
                 geometric: bool = False, device: Optional[str] = None, dtype: Optional[str] = None, judge=None):
        super().__init__(model, processor, question, device, dtype, judge)
        self.geometric = bool(geometric)

    def forward(self, images, prompts=None, **context):
        if prompts is None:
            raise RewardError(f"{self.name}: needs a prompt per image")
        idx, phrases = [], []
        for i, p in enumerate(prompts):
            objs = parse_prompt(p).objects or (parse_phrase(p),)
            for o in objs:
                idx.append(i)
                phrases.append(o.query)
        if not idx:
            return images.new_full((images.shape[0],), float("nan"))
        yes = self.judge(images[idx], phrases).float().clamp_min(1e-8).to(images.device)
        index = torch.tensor(idx, device=images.device)
        logs = torch.zeros(images.shape[0], device=images.device).index_add(0, index, yes.log())
        n = torch.bincount(index, minlength=images.shape[0]).to(logs)
        return (logs / n.clamp_min(1)).exp() if self.geometric else logs.exp()


@register(
    "composition_nonspatial",
    differentiable=True,
    requires=("transformers",),
    description="non-spatial relationships (\"a man riding a horse\"): VQAScore of the whole prompt from a VQA judge",
)
class NonSpatialComposition(_VQAComposition):
    """``P(yes | image, 'Does this image show "{prompt}"?')``: VQAScore on the whole prompt,
    which reads the verb / interaction that per-object checks miss."""

    def forward(self, images, prompts=None, **context):
        if prompts is None:
            raise RewardError(f"{self.name}: needs a prompt per image")
        return self.judge(images, list(prompts)).float().to(images.device)


# --------------------------------------------------------------------------------------------
# analytic oracle (no weights)


_REGION = {
    "left of": ((slice(None), slice(0, 1)), (slice(None), slice(1, 2))),
    "right of": ((slice(None), slice(1, 2)), (slice(None), slice(0, 1))),
    "above": ((slice(0, 1), slice(None)), (slice(1, 2), slice(None))),
    "below": ((slice(1, 2), slice(None)), (slice(0, 1), slice(None))),
}


@register(
    "composition_color",
    differentiable=True,
    description="analytic composition oracle: each object's colour word in its place (left/right/top/bottom half by the relation, anywhere without one); geometric mean over objects",
)
class ColorComposition(Reward):
    """A weight-free composition judge for CPU runs and tests.

    Every object of a spatial prompt must carry a colour word of ``rewards.analytic.COLORS``;
    in a prompt without a relation every colour word counts as one object.
    For each object, the soft fraction of pixels near its colour (the ``color`` reward's
    kernel, ``exp(-|x - c|^2 / 2 s^2)``) is taken over its region: the half of the image the
    relation assigns it (``"a red ball left of a blue box"``: red in the left half, blue in the
    right), or the whole image without a relation (attribute binding / non-spatial prompts:
    both colours must appear). The score is the geometric mean over the objects, in ``[0, 1]``;
    NaN when an object names no colour. ``next to`` is scored like a prompt without relation.
    """

    needs_prompt = True

    def __init__(self, sharpness: float = 0.25):
        super().__init__()
        if sharpness <= 0:
            raise RewardError(f"composition_color: sharpness must be > 0, got {sharpness}")
        self.sharpness = float(sharpness)

    def forward(self, images, prompts=None, **context):
        from .analytic import COLORS

        if prompts is None:
            raise RewardError(f"{self.name}: needs a prompt per image")
        b, _, h, w = images.shape
        out = []
        for i, prompt in enumerate(prompts):
            spec = parse_prompt(prompt)
            regions = _REGION.get(spec.relation) if spec.relation and len(spec.objects) == 2 else None
            if regions is not None:
                cols = [next((COLORS[a] for a in (*o.attributes, o.noun) if a in COLORS), None) for o in spec.objects]
            else:  # every colour word of the prompt, in order ("a red dog chasing a blue ball")
                words = re.findall(r"[a-z]+", prompt.lower())
                cols = [COLORS[w] for w in dict.fromkeys(words) if w in COLORS]
            if not cols or any(c is None for c in cols):
                out.append(images.new_full((), float("nan")))
                continue
            x = images[i]
            logs = []
            for k, c in enumerate(cols):
                m = torch.exp(-(x - x.new_tensor(c)[:, None, None]).pow(2).sum(0) / (2 * self.sharpness**2))
                if regions is not None:
                    rs, cs = regions[k]
                    hs = slice(None) if rs == slice(None) else slice(rs.start * h // 2, rs.stop * h // 2)
                    ws = slice(None) if cs == slice(None) else slice(cs.start * w // 2, cs.stop * w // 2)
                    m = m[hs, ws]
                logs.append(m.mean().clamp_min(1e-6).log())
            out.append(torch.stack(logs).mean().exp())
        return torch.stack(out)
