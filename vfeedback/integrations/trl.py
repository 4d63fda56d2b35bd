"""The image scorers of :mod:`rewards` as reward functions for TRL's online trainers (GRPO, RLOO, ...).

A language model's completion is turned into an image by a *renderer*, and the image is scored
by any :class:`rewards.Reward`:

- :class:`PromptToImage` (prompt rewriting): the completion is a text-to-image prompt; a
  diffusion pipeline renders it; the reward scores the image against the user's original
  request (the dataset column ``request``, else the prompt's text).
- :class:`CodeToImage` (code to image, render-and-compare as in RRVF / WebGen-Agent): the
  completion is SVG, matplotlib code or a Vega-Lite spec, rendered inside a bubblewrap boundary
  (:mod:`.sandbox`), scored against a target text (column ``target``) or a target image (column
  ``target_image``, with :class:`ImageSimilarity` as the reward).
- :class:`vfeedback.integrations.webpage.WebPage` (WebGen-Agent): the completion is a web page,
  screenshotted by headless Chromium inside the same boundary; scripted checks give a second
  reward (:func:`vfeedback.integrations.webpage.interaction_reward_function`).
- :class:`Caption`: the completion describes a given image (column ``image``); the reward
  (CLIP-style) scores that image with the completion as its prompt.

>>> from trl import GRPOTrainer
>>> clip = rewards.load("clip")
>>> fn = reward_function(clip, render=PromptToImage("stable-diffusion-v1-5/stable-diffusion-v1-5"))
>>> GRPOTrainer(model=..., reward_funcs=[fn], ...)

TRL calls ``fn(prompts=..., completions=..., completion_ids=..., **dataset_columns)`` and reads
one ``float | None`` per completion; ``None`` marks a completion that could not be rendered or
scored (TRL turns it into NaN, combines reward functions with ``nansum`` and gives a
completion that no function scored zero advantage). Such failures never raise; they are
counted on the function (:attr:`RewardFunction.failed`, by reason in :attr:`RewardFunction.failures`).
"""
from __future__ import annotations

import collections
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch

import rewards
from rewards import Reward, RewardError
from rewards.images import to_single, to_tensor

from . import sandbox as _sandbox

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# text of prompts and completions (standard or conversational)


def _content_text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # multimodal content parts
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type", "text") == "text")
    return "" if content is None else str(content)


def completion_text(completion) -> str:
    """A completion as text: a string as is; a conversation (list of messages) -> the text of
    its assistant messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return _content_text(completion.get("content"))
    if isinstance(completion, list):
        msgs = [m for m in completion if isinstance(m, dict)]
        assistant = [m for m in msgs if m.get("role") == "assistant"] or msgs
        return "\n".join(_content_text(m.get("content")) for m in assistant)
    return str(completion)


def prompt_text(prompt) -> str:
    """A prompt as text: a string as is; a conversation -> its last user message."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        users = [m for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        if users:
            return _content_text(users[-1].get("content"))
        return _content_text(prompt[-1].get("content")) if prompt and isinstance(prompt[-1], dict) else ""
    return str(prompt)


# --------------------------------------------------------------------------------------------
# renderers


@dataclass
class Rendered:
    """One completion made into something a reward can score."""

    image: Optional[torch.Tensor] = None  # (3, H, W) in [0, 1]
    prompt: Optional[str] = None  # the text the reward scores the image against
    reference: Optional[torch.Tensor] = None  # (3, H', W') target image (render-and-compare)
    error: Optional[str] = None  # why there is nothing to score
    isolation: Optional[str] = None  # the boundary untrusted code ran under (sandbox.RenderResult.isolation)
    extra: Optional[dict] = None  # what the renderer reports besides the image (web-page checks)


class Renderer:
    """Turns a batch of completions into :class:`Rendered` items (same length, same order).

    ``requests``: the text of each prompt; ``completions``: the text of each completion;
    ``columns``: the dataset's other columns, one value per completion.
    """

    name = "render"

    def __call__(self, requests: list[str], completions: list[str], columns: dict[str, list]) -> list[Rendered]:  # pragma: no cover
        raise NotImplementedError


def _image(value) -> torch.Tensor:
    """An image from a dataset cell: path, PIL, array, tensor, or nested lists (how
    ``datasets`` stores arrays) -> ``(3, H, W)`` float."""
    if isinstance(value, (list, tuple)):
        import numpy as np

        value = np.asarray(value, dtype=np.float32)
    return to_single(value).float()


def _column(columns: dict[str, list], key: Optional[str], i: int):
    if key is None or key not in columns:
        return None
    values = columns[key]
    return values[i] if isinstance(values, (list, tuple)) and i < len(values) else values


def _from_render(r, i: int, requests: list[str], columns: dict[str, list], target_column: Optional[str],
                 target_image_column: Optional[str]) -> Rendered:
    """Completion ``i``'s sandboxed render result (``sandbox.RenderResult``) as a :class:`Rendered`:
    scored against its ``target_column`` text (else the request), with the reference image of
    ``target_image_column`` when one is given (an unreadable one is the item's error)."""
    target = _column(columns, target_column, i)
    item = Rendered(image=r.image, prompt=str(target) if target is not None else requests[i], error=r.error,
                    isolation=r.isolation, extra=getattr(r, "extra", None) or None)
    ref = _column(columns, target_image_column, i)
    if ref is not None and item.error is None:
        try:
            item.reference = _image(ref)
        except Exception as e:
            item.error = f"target image: {e}"
    return item


class PromptToImage(Renderer):
    """The completion is a text-to-image prompt; ``pipeline`` renders it.

    ``pipeline``: a :class:`vfeedback.models.DiffusionModel`, a model path for
    :func:`vfeedback.models.load_model` (``tiny:sd15``, a hub id, a folder), or any callable
    ``list[str] -> images`` (a ``(B,3,H,W)`` tensor in [0, 1], or a list of PIL images). The
    image is scored against the dataset column ``request_column`` when present, else against
    the prompt's text. All completions are rendered from the same initial noise (``seed``), so
    that within a GRPO group the rewards differ by the prompt rather than by the noise.
    """

    name = "prompt_to_image"

    def __init__(self, pipeline, *, family: str = "sd15", request_column: Optional[str] = "request", num_steps: int = 20,
                 guidance_scale: float = 7.5, seed: int = 0, batch_size: int = 8, max_chars: int = 1000,
                 device: Optional[Union[str, torch.device]] = None):
        if isinstance(pipeline, str):
            from vfeedback.models import load_model

            if pipeline.startswith("tiny:sdxl"):
                family = "sdxl"
            pipeline = load_model(family, pipeline, device=torch.device(device) if device else None)
        self.pipeline = pipeline
        self.request_column = request_column
        self.num_steps = int(num_steps)
        self.guidance_scale = float(guidance_scale)
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.max_chars = int(max_chars)

    def _generate(self, prompts: list[str]) -> torch.Tensor:
        from vfeedback.models import DiffusionModel

        if isinstance(self.pipeline, DiffusionModel):
            from vfeedback.sampling import sample

            m = self.pipeline
            with torch.no_grad():
                cond = m.encode_prompt(prompts, cfg=self.guidance_scale > 1.0)
                gens = [torch.Generator().manual_seed(self.seed) for _ in prompts]
                out = sample(m, cond, num_steps=self.num_steps, guidance_scale=self.guidance_scale, generator=gens)
            return out.images.detach().float().cpu()
        return to_tensor(self.pipeline(prompts)).detach().float().cpu()

    def __call__(self, requests, completions, columns):
        out: list[Rendered] = [Rendered() for _ in completions]
        todo = []
        for i, c in enumerate(completions):
            text = c.strip()[: self.max_chars]
            req = _column(columns, self.request_column, i)
            out[i].prompt = str(req) if req is not None else requests[i]
            if not text:
                out[i].error = "empty completion"
            else:
                todo.append((i, text))
        for s in range(0, len(todo), self.batch_size):
            chunk = todo[s : s + self.batch_size]
            try:
                images = self._generate([t for _, t in chunk])
                for (i, _), img in zip(chunk, images):
                    out[i].image = img
            except Exception as e:  # one bad batch must not end the training step
                log.warning("prompt_to_image: rendering failed: %s", e)
                for i, _ in chunk:
                    out[i].error = f"render: {type(e).__name__}: {e}"
        return out


class CodeToImage(Renderer):
    """The completion is SVG, matplotlib code or a Vega-Lite spec; each is rendered inside a
    bubblewrap boundary (:func:`vfeedback.integrations.sandbox.render`: read-only system, private
    tmp, no network, seccomp, time limit, memory/CPU rlimits).

    ``sandbox``: ``strict`` (default; where bubblewrap cannot run every completion fails with
    the reason) or ``weak`` (opt in: a plain subprocess with the same limits, for trusted code).
    Each item's :attr:`Rendered.isolation` says which boundary it ran under.

    ``kind``: ``auto`` (by code fence, then content), ``svg``, ``matplotlib`` or ``vega-lite``.
    Scored against the text in ``target_column`` (else the prompt's text), and given the image
    in ``target_image_column`` as ``reference`` (path, PIL image, array or tensor) for
    render-and-compare rewards such as :class:`ImageSimilarity`.
    """

    name = "code_to_image"

    def __init__(self, kind: str = "auto", *, size: Union[int, tuple[int, int]] = 256, timeout: float = 20.0, memory_mb: int = 2048,
                 target_column: Optional[str] = "target", target_image_column: Optional[str] = "target_image",
                 workers: int = 2, isolate_network: bool = True, sandbox: str = "strict"):
        if kind != "auto" and kind not in _sandbox.KINDS:
            raise ValueError(f"kind: {kind!r} is not one of auto, {', '.join(_sandbox.KINDS)}")
        self.sandbox = _sandbox.check_mode(sandbox)
        self.kind = kind
        self.width, self.height = (size, size) if isinstance(size, int) else size
        self.timeout = float(timeout)
        self.memory_mb = int(memory_mb)
        self.target_column = target_column
        self.target_image_column = target_image_column
        self.workers = max(1, int(workers))
        self.isolate_network = isolate_network
        #: did the last renderings run in their own network namespace (None: not known yet)
        self.network_isolated: Optional[bool] = None

    def _one(self, text: str) -> _sandbox.RenderResult:
        try:
            kind, code = _sandbox.extract_code(text, self.kind)
        except ValueError as e:
            return _sandbox.RenderResult(None, str(e))
        return _sandbox.render(code, kind, width=self.width, height=self.height, timeout=self.timeout,
                               memory_mb=self.memory_mb, isolate_network=self.isolate_network, sandbox=self.sandbox)

    def __call__(self, requests, completions, columns):
        with ThreadPoolExecutor(self.workers) as pool:
            results = list(pool.map(self._one, completions))
        for r in results:
            if r.network_isolated is not None:
                self.network_isolated = r.network_isolated
        return [_from_render(r, i, requests, columns, self.target_column, self.target_image_column) for i, r in enumerate(results)]


class Caption(Renderer):
    """The completion is a caption of the image in ``image_column``; the reward scores that
    image with the completion as the prompt (CLIP-style image-text similarity).

    With a vision-language policy keep the image in TRL's ``image`` column (the policy sees it
    and TRL passes it on to reward functions). With a text-only policy use another column
    name: TRL treats a dataset with an ``image`` column as a vision dataset.
    """

    name = "caption"

    def __init__(self, image_column: str = "image"):
        self.image_column = image_column

    def __call__(self, requests, completions, columns):
        out = []
        for i, c in enumerate(completions):
            text = c.strip()
            img = _column(columns, self.image_column, i)
            if img is None:
                out.append(Rendered(error=f"no image: the dataset has no column {self.image_column!r}"))
                continue
            if not text:
                out.append(Rendered(error="empty completion"))
                continue
            try:
                out.append(Rendered(image=_image(img), prompt=text))
            except Exception as e:
                out.append(Rendered(error=f"image: {e}"))
        return out


# --------------------------------------------------------------------------------------------
# image-to-image comparison (render-and-compare)


class ImageSimilarity(Reward):
    """Similarity of each image to a reference image (``reference=`` context, ``(B,3,H,W)``).

    ``backbone``: a CLIP-type reward (``rewards.load("clip", ...)`` or its name) -> cosine of the
    two image embeddings, in [-1, 1]; ``None`` -> pixel similarity ``1 - mean |x - ref|`` after
    resizing the reference to the image, in [0, 1] (for charts and diagrams, where layout and
    colour matter more than semantics).
    """

    name = "image_similarity"
    needs_prompt = False

    def __init__(self, backbone: Union[Reward, str, None] = None, **options):
        super().__init__()
        if isinstance(backbone, str):
            backbone = rewards.load(backbone, **options)
        if backbone is not None and not hasattr(backbone, "image_embeddings"):
            raise RewardError(f"image_similarity: backbone {getattr(backbone, 'name', backbone)!r} has no image_embeddings(); use a CLIP-type reward or None")
        self.backbone = backbone
        self.differentiable = True

    def forward(self, images, prompts=None, reference=None, **context):
        if reference is None:
            raise RewardError("image_similarity: needs reference images (a target_image column)")
        ref = to_tensor(reference).to(torch.float32)
        ref = ref.to(images.device)  # pragma: no mutate: placement, equivalent on CPU
        # one reference for a batch; the arithmetic below would broadcast it too, so mutants of
        # this condition are equivalent
        if ref.shape[0] == 1 and images.shape[0] > 1:  # pragma: no mutate: see above
            ref = ref.expand(images.shape[0], -1, -1, -1)  # pragma: no mutate: see above
        if self.backbone is not None:
            a = self.backbone.image_embeddings(images)
            b = self.backbone.image_embeddings(ref)
            sim = (a * b).sum(dim=1)  # the cosine of unit embeddings (B, D); dim=1, not -1, which is the same axis
            return sim.to(images.device)  # pragma: no mutate: placement, equivalent on CPU
        # (B, 3, H, W) both; unpacked rather than sliced: a slice [-2:] of a 4-D shape equals [2:]
        _, _, h, w = images.shape
        _, _, rh, rw = ref.shape
        if (rh, rw) != (h, w):  # (interpolating to the same size would be the identity: skipped, not needed)
            # bilinear's default align_corners is False (torch.nn.functional.interpolate)
            ref = torch.nn.functional.interpolate(ref, size=(h, w), mode="bilinear", antialias=True)
        return 1.0 - (images.float() - ref).abs().mean(dim=(1, 2, 3))


# --------------------------------------------------------------------------------------------
# the reward function TRL calls


def _as_reward(reward) -> Reward:
    if isinstance(reward, Reward):
        return reward
    if isinstance(reward, str):
        return rewards.load(reward)
    if isinstance(reward, (list, tuple)):
        return rewards.combine(reward)
    if isinstance(reward, dict):
        return rewards.combine([reward])
    raise RewardError(f"reward: expected a rewards.Reward, a name or a list of specs, got {type(reward).__name__}")


class RewardFunction:
    """A TRL reward function: ``(prompts, completions, **kwargs) -> list[float | None]``.

    Not an ``nn.Module`` on purpose: TRL would treat a module as a sequence-classification
    reward model. Counters: :attr:`calls`, :attr:`scored`, :attr:`failed`, :attr:`failures`
    (a ``Counter`` of short reasons), :attr:`isolation` (a ``Counter`` of the boundaries
    untrusted code ran under: ``bwrap+seccomp``, ``weak``, ``none`` = refused, ...) and
    :attr:`last_errors` (one reason or None per completion of the last call). With TRL >= 1.x
    the fraction of failures of each batch is logged as ``<name>/failed_frac``, and the
    fraction rendered under each boundary as ``<name>/isolation/<boundary>``, through TRL's
    ``log_metric``.
    """

    def __init__(self, reward, render: Renderer, weight: float = 1.0, name: Optional[str] = None, batch_size: int = 16):
        self.reward = _as_reward(reward)
        self.render = render
        self.weight = float(weight)
        self.batch_size = int(batch_size)
        self.__name__ = name or f"{getattr(self.reward, 'name', 'reward')}_{getattr(render, 'name', 'render')}".replace("+", "_")
        self.calls = 0
        self.scored = 0
        self.failed = 0
        self.failures: collections.Counter = collections.Counter()
        self.isolation: collections.Counter = collections.Counter()
        self.last_errors: list[Optional[str]] = []

    def __repr__(self) -> str:
        return f"RewardFunction({self.__name__}, weight={self.weight}, scored={self.scored}, failed={self.failed})"

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs) -> list[Optional[float]]:
        self.calls += 1
        n = len(completions)
        log_metric = kwargs.pop("log_metric", None)
        for k in ("completion_ids", "trainer_state", "log_extra", "environments"):
            kwargs.pop(k, None)
        requests = [prompt_text(p) for p in prompts] if prompts is not None else [""] * n
        texts = [completion_text(c) for c in completions]
        try:
            items = self.render(requests, texts, kwargs)
            if len(items) != n:
                raise RuntimeError(f"renderer returned {len(items)} items for {n} completions")
        except Exception as e:  # a renderer bug must not end the training run
            log.warning("%s: renderer failed: %s", self.__name__, e)
            items = [Rendered(error=f"render: {type(e).__name__}: {e}") for _ in range(n)]
        scores = self._score(items)
        out: list[Optional[float]] = []
        for it, s in zip(items, scores):
            if s is None or not math.isfinite(s):
                self.failed += 1
                if it.error is None:
                    it.error = "score: not finite"
                self.failures[it.error.partition(":")[0][:40]] += 1  # the reason's kind: "render", "score", ...
                out.append(None)
            else:
                self.scored += 1
                out.append(self.weight * s)
        self.last_errors = [it.error for it in items]  # after the loop: includes "score: not finite"
        levels = collections.Counter(it.isolation for it in items if it.isolation is not None)
        self.isolation.update(levels)
        if callable(log_metric) and n:
            metrics = {f"{self.__name__}/failed_frac": sum(v is None for v in out) / n}
            metrics.update({f"{self.__name__}/isolation/{level}": k / n for level, k in levels.items()})
            try:
                for key, value in metrics.items():
                    log_metric(key, value)
            except Exception:  # logging is best effort
                pass
        return out

    def _score(self, items: list[Rendered]) -> list[Optional[float]]:
        scores: list[Optional[float]] = [None] * len(items)
        groups: dict[tuple, list[int]] = collections.defaultdict(list)
        for i, it in enumerate(items):
            if it.error is not None:
                continue
            if it.image is None:
                it.error = "render: no image"
                continue
            if self.reward.needs_prompt and not it.prompt:
                it.error = "score: no text to score against"
                continue
            ref = None if it.reference is None else tuple(it.reference.shape)
            groups[(tuple(it.image.shape), ref)].append(i)
        dev = self.reward.device  # pragma: no mutate: placement, equivalent on CPU (the tests' device)
        for idx in groups.values():
            for s in range(0, len(idx), self.batch_size):
                chunk = idx[s : s + self.batch_size]
                batch = torch.stack([items[i].image for i in chunk])
                batch = batch.to(dev)  # pragma: no mutate: placement, equivalent on CPU
                prompts = [items[i].prompt or "" for i in chunk]
                context = {}
                if items[chunk[0]].reference is not None:
                    ref = torch.stack([items[i].reference for i in chunk])
                    ref = ref.to(dev)  # pragma: no mutate: placement, equivalent on CPU
                    context["reference"] = ref
                try:
                    with torch.no_grad():
                        vals = self.reward(batch, prompts, **context).detach().float().cpu().tolist()
                except Exception as e:
                    log.warning("%s: scoring failed: %s", self.__name__, e)
                    for i in chunk:
                        items[i].error = f"score: {type(e).__name__}: {e}"
                    continue
                for i, v in zip(chunk, vals):
                    scores[i] = v
        return scores


def reward_function(reward, render: Renderer, weight: float = 1.0, name: Optional[str] = None, batch_size: int = 16) -> RewardFunction:
    """A TRL reward function scoring each completion's rendering with ``reward``.

    ``reward``: a :class:`rewards.Reward`, a registered name (``"clip"``), or a list of specs for
    :func:`rewards.combine`. ``render``: :class:`PromptToImage`, :class:`CodeToImage`,
    :class:`Caption` or any :class:`Renderer`. ``weight`` multiplies every score (the same as
    TRL's ``reward_weights`` entry for this function; use one or the other). ``name`` is what
    TRL's logs show (``rewards/<name>/mean``); default ``<reward>_<renderer>``.
    """
    return RewardFunction(reward, render, weight=weight, name=name, batch_size=batch_size)


__all__ = [
    "Caption",
    "CodeToImage",
    "ImageSimilarity",
    "PromptToImage",
    "Rendered",
    "Renderer",
    "RewardFunction",
    "completion_text",
    "prompt_text",
    "reward_function",
]
