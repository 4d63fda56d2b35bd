"""One module per method (refl, d3po, itercomp, zo_ranksgd, ...).

Gradient methods (ReFL, D3PO) define a class ``Method(cfg, trainer)`` with
``train_step(prompts, generators, step_generator) -> (loss, metrics)`` that the shared loop in
:mod:`vfeedback.engine` (``Trainer``) drives. A method with its own loop (ZO-RankSGD) instead
defines a classmethod ``run_standalone(cfg, resume) -> summary dict`` and writes the same run
folder through :mod:`vfeedback.rundir`. ``METHODS`` maps the config's ``algorithm`` value to
``module:Class``.
"""
import importlib

METHODS = {
    "refl": "vfeedback.algorithms.refl:ReFL",
    "zo_ranksgd": "vfeedback.algorithms.zo_ranksgd_diffusion:ZORankSGDMethod",
    "d3po": "vfeedback.algorithms.d3po:D3PO",
    "itercomp": "vfeedback.algorithms.itercomp:IterComp",
    "ddpo": "vfeedback.algorithms.ddpo:DDPO",
    "grpo": "vfeedback.algorithms.grpo:GRPO",
    "raft": "vfeedback.algorithms.raft:RAFT",
    "diffusion_dpo": "vfeedback.algorithms.diffusion_dpo:DiffusionDPO",
    "draft": "vfeedback.algorithms.draft:DRaFT",
}


def get_method(name: str):
    mod, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(mod), cls)
