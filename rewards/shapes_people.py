"""Simulated people of the shapes world who want different things (the VPL demonstration).

Each person's taste is a measurable property of the pixels, so it can be computed for any image
(rendered scenes and generated ones alike) without a learned judge:

- ``alice`` likes red: the fraction of red pixels (R > 0.55, G < 0.35, B < 0.35);
- ``bob`` likes blue: the fraction of blue pixels (B > 0.55, R < 0.35, G < 0.45: not cyan, not purple);
- ``carol`` likes busy images: the fraction of coloured pixels (max - min channel > 0.3; the
  background is a light grey), which grows with the number and size of the shapes.

A person prefers the image of higher utility (``prefers``); a difference below ``TIE`` (half a
percent of the pixels) is a tie (no answer). Thresholds are hard: this is an evaluation
reward (``differentiable=False``), never a training signal.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .base import Reward, RewardError, register

PEOPLE: dict[str, str] = {"alice": "red shapes", "bob": "blue shapes", "carol": "busy images (more coloured area)"}
TIE = 0.005


def utility(images: torch.Tensor, person: str) -> torch.Tensor:
    """``(B, 3, H, W)`` in [0, 1] -> ``(B,)`` in [0, 1]: the fraction of pixels ``person`` likes."""
    if person not in PEOPLE:
        raise RewardError(f"shapes_person: person must be one of {', '.join(PEOPLE)}, got {person!r}")
    r, g, b = images.float().clamp(0, 1).unbind(1)
    if person == "alice":
        m = (r > 0.55) & (g < 0.35) & (b < 0.35)
    elif person == "bob":
        m = (b > 0.55) & (r < 0.35) & (g < 0.45)
    else:
        x = images.float().clamp(0, 1)
        m = (x.amax(1) - x.amin(1)) > 0.3
    return m.float().mean((1, 2))


def prefers(u_a: torch.Tensor, u_b: torch.Tensor) -> torch.Tensor:
    """+1 where ``a`` is preferred, -1 where ``b`` is, 0 for a tie (``|u_a - u_b| < TIE``)."""
    d = u_a - u_b
    return torch.where(d.abs() < TIE, torch.zeros_like(d), d.sign())


@register("shapes_person", differentiable=False,
          description="shapes world: a simulated person's taste (person=alice: red, bob: blue, carol: busy); evaluation only")
class ShapesPerson(Reward):
    """Utility of each image to one simulated person (:func:`utility`); range [0, 1]."""

    differentiable = False

    def __init__(self, person: str = "alice"):
        super().__init__()
        if person not in PEOPLE:
            raise RewardError(f"shapes_person: person must be one of {', '.join(PEOPLE)}, got {person!r}")
        self.person = person

    def forward(self, images: torch.Tensor, prompts: Optional[Sequence[str]] = None, **context) -> torch.Tensor:
        return utility(images, self.person)


def _person(person: str):
    def make() -> ShapesPerson:
        return ShapesPerson(person)

    return make


for _p, _likes in PEOPLE.items():  # one name each, so a run can report all three side by side
    register(f"shapes_{_p}", differentiable=False, description=f"shapes world: simulated person {_p}, who likes {_likes}; evaluation only")(_person(_p))
