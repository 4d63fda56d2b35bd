"""One module per method (refl, d3po, itercomp, zo_ranksgd, ...).

Gradient methods (ReFL, D3PO) define a class with ``train_step(prompts, generators, step)``
that the shared loop in :mod:`vfeedback.engine` drives; ``METHODS`` maps the config's
``algorithm`` value to ``module:Class``.
"""
import importlib

METHODS = {
    "refl": "vfeedback.algorithms.refl:ReFL",
}


def get_method(name: str):
    mod, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(mod), cls)
