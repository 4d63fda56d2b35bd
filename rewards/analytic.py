"""Closed-form differentiable rewards: no weights, effects a person can see in a grid.

They make CPU runs, tests and the quickstart meaningful without any download, and double as
sanity checks for the training loop (a method that cannot raise these is broken).
"""
from __future__ import annotations

import re
from typing import Optional, Sequence, Union

import torch

from .base import Reward, RewardError, register

#: sRGB in [0, 1] of the colour words the ``color`` reward understands.
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.75, 0.15),
    "blue": (0.10, 0.25, 0.90),
    "yellow": (0.95, 0.90, 0.10),
    "orange": (1.00, 0.55, 0.05),
    "purple": (0.55, 0.15, 0.75),
    "pink": (1.00, 0.55, 0.75),
    "cyan": (0.10, 0.85, 0.90),
    "white": (0.97, 0.97, 0.97),
    "black": (0.03, 0.03, 0.03),
    "gray": (0.50, 0.50, 0.50),
    "grey": (0.50, 0.50, 0.50),
    "brown": (0.50, 0.30, 0.10),
}
_WORD = re.compile(r"[a-z]+")


def colour_from_prompt(prompt: str) -> Optional[tuple[float, float, float]]:
    """The first colour word in ``prompt`` (case-insensitive), or None."""
    for w in _WORD.findall(prompt.lower()):
        if w in COLORS:
            return COLORS[w]
    return None


def _parse_colour(c: Union[str, Sequence[float], None]) -> Optional[tuple[float, float, float]]:
    if c is None:
        return None
    if isinstance(c, str):
        if c.lower() in COLORS:
            return COLORS[c.lower()]
        if re.fullmatch(r"#?[0-9a-fA-F]{6}", c):
            h = c.lstrip("#")  # pragma: no mutate: a hex colour never starts with the X a mutant adds
            return tuple(int(h[i : i + 2], 16) / 255 for i in (0, 2, 4))  # type: ignore[return-value]
        raise RewardError(f"color: unknown colour {c!r}; use one of {', '.join(COLORS)} or #rrggbb")
    vals = tuple(float(v) for v in c)
    if len(vals) != 3 or not all(0 <= v <= 1 for v in vals):
        raise RewardError(f"color: an RGB colour is three numbers in [0, 1], got {list(c)}")
    return vals  # type: ignore[return-value]


@register("color", differentiable=True, description="fraction of pixels close to the colour named in the prompt (or a fixed colour)")
class ColorMatch(Reward):
    """Soft fraction of pixels whose colour is near a target: ``mean_p exp(-|x_p - c|^2 / 2 s^2)``.

    The target is the first colour word of each prompt (``red``, ``blue``, ...), or ``color``
    when given. Range ``[0, 1]``; 1 means every pixel has the target colour. A prompt naming no
    colour (with no fixed ``color``) scores NaN, which combinations skip.
    """

    needs_prompt = True

    def __init__(self, color: Union[str, Sequence[float], None] = None, sharpness: float = 0.25):
        super().__init__()
        self.fixed = _parse_colour(color)
        if sharpness <= 0:
            raise RewardError(f"color: sharpness must be > 0, got {sharpness}")
        self.sharpness = float(sharpness)
        self.needs_prompt = self.fixed is None

    def forward(self, images, prompts=None, **context):
        b = images.shape[0]
        if self.fixed is not None:
            targets = [self.fixed] * b
        else:
            if prompts is None:
                raise RewardError("color: needs prompts naming a colour, or the option color=...")
            targets = [colour_from_prompt(p) for p in prompts]
        nan = torch.tensor([t is None for t in targets], device=images.device)  # pragma: no mutate: placement, equivalent on CPU
        # the placeholder colour of a caption without one is masked to NaN below, so its value is free
        c = torch.tensor([t if t is not None else (0.0, 0.0, 0.0) for t in targets], device=images.device, dtype=images.dtype)  # pragma: no mutate: see above
        d2 = (images - c[:, :, None, None]).pow(2).sum(1)
        r = torch.exp(-d2 / (2 * self.sharpness**2)).mean(dim=(1, 2))
        return torch.where(nan, torch.full_like(r, float("nan")), r)  # pragma: no mutate: float("NAN") is the same NaN


@register("brightness", differentiable=True, description="mean luminance (Rec. 709), in [0, 1]")
class Brightness(Reward):
    """Mean Rec. 709 luminance; ``target`` turns it into ``-|mean - target|``."""

    def __init__(self, target: Optional[float] = None):
        super().__init__()
        self.target = target

    def forward(self, images, prompts=None, **context):
        w = images.new_tensor([0.2126, 0.7152, 0.0722])[None, :, None, None]
        lum = (images * w).sum(1).mean(dim=(1, 2))
        return lum if self.target is None else -(lum - self.target).abs()


@register("saturation", differentiable=True, description="mean HSV-style saturation (max-min of RGB), in [0, 1]")
class Saturation(Reward):
    def forward(self, images, prompts=None, **context):
        return (images.amax(1) - images.amin(1)).mean(dim=(1, 2))
