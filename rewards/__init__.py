"""Image and VLM scorers usable as rewards by diffusion, language-model and robot training.

Standalone: imports nothing from ``vfeedback``.

>>> import rewards
>>> r = rewards.load("color")
>>> r.score(["a.png"], prompts=["a red ball"])
"""
from .base import (
    Reward,
    RewardError,
    RewardInfo,
    Ensemble,
    RunningNorm,
    WeightedSum,
    available,
    clear_cache,
    combine,
    load,
    register,
)
from .images import ImageError, expand_paths, load_image, to_pil, to_tensor

__all__ = [
    "Reward",
    "RewardError",
    "RewardInfo",
    "Ensemble",
    "RunningNorm",
    "WeightedSum",
    "available",
    "clear_cache",
    "combine",
    "load",
    "register",
    "ImageError",
    "expand_paths",
    "load_image",
    "to_pil",
    "to_tensor",
]
