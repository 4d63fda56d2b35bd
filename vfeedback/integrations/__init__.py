"""The scorers of :mod:`rewards` as rewards outside diffusion training.

- :mod:`vfeedback.integrations.trl`: reward functions for TRL's online trainers (GRPO, RLOO),
  with renderers that turn a completion into an image (prompt rewriting, SVG / chart code,
  captions); untrusted code is rendered inside bubblewrap by :mod:`vfeedback.integrations.sandbox`.
- :mod:`vfeedback.integrations.webpage`: web pages as a renderer (WebGen-Agent): a screenshot in
  headless Chromium inside the same boundary, and scripted checks as a second reward.
- :mod:`vfeedback.integrations.gym`: a gymnasium wrapper whose reward comes from a VLM
  (VLM-RM) and a preference labeller + reward model (RL-VLM-F).

Each submodule imports its framework (trl, gymnasium) only when imported itself.
"""
