"""IterComp (Zhang et al. 2024): model gallery, rankings, composition-aware reward models.

The loop itself is :mod:`vfeedback.algorithms.itercomp`; the scorers and the reward-model
head live in :mod:`rewards.composition` and :mod:`rewards.itercomp_rm`. The shipped prompt
files are ``prompts/<category>.txt``.
"""
from pathlib import Path

PROMPTS_DIR = Path(__file__).parent / "prompts"
CATEGORIES = ("attribute", "spatial", "nonspatial", "count")
