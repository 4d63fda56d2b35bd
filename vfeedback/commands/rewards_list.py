"""``vfeedback rewards``: list every scorer, whether it is installed, whether its default
weights are already in the local caches, and how to install it."""
from __future__ import annotations

import argparse
import json
import sys


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("rewards", help="list the available rewards", description="List every registered reward: differentiable or not, installed or not, whether its default weights are "
                                   "in the local caches (yes / no; '-' needs none; 'path' takes a file you give), the pip extra that installs it.")
    p.add_argument("--json", action="store_true", help="JSON output")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    import rewards

    from .score import format_table

    infos = rewards.available()
    if args.json:
        doc = [
            {
                "name": i.name,
                "differentiable": i.differentiable,
                "installed": i.installed,
                "weights": weights_present(i),
                "extra": i.extra,
                "install": None if i.installed else i.install_hint(),
                "requires": list(i.requires),
                "description": i.description,
            }
            for i in infos
        ]
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    rows = [[i.name, "yes" if i.differentiable else "no", "yes" if i.installed else "no", weights_present(i), i.extra or "-", i.description]
            for i in infos]
    sys.stdout.write(format_table(["name", "differentiable", "installed", "weights", "extra", "description"], rows, max_width=100) + "\n")
    missing = [i for i in infos if not i.installed]
    if missing:
        sys.stdout.write("\nnot installed: " + "; ".join(f"{i.name}: {i.install_hint()}" for i in missing) + "\n")
    return 0


def weights_present(info) -> str:
    """``yes`` / ``no``: the scorer's default weights are / are not in the local caches (the
    Hugging Face cache, open_clip's, ``$VFEEDBACK_CACHE``, ``~/.cache/ImageReward``, packages
    that ship them); ``-``: it needs no weights; ``path``: it takes a file you give."""
    import inspect
    from pathlib import Path

    from rewards import _hub

    n = info.name
    if n in ("color", "brightness", "saturation"):
        return "-"
    if n in ("itercomp_rm", "structure"):
        return "path"
    if n.startswith("shapes_"):
        return _yes((Path(inspect.getfile(info.factory)).parent / "assets" / "shapes").is_dir())
    if n == "face_id":  # the default backend's dlib models ship inside face_recognition_models
        return _yes(info.installed)
    if n == "clip":
        return _yes(_hub.open_clip_weights_cached("ViT-L-14", "openai"))
    if n == "aesthetic":
        from rewards.aesthetic import DEFAULT_WEIGHTS

        return _yes(_hub.url_cached(DEFAULT_WEIGHTS) and _hub.open_clip_weights_cached("ViT-L-14", "openai"))
    if n == "hpsv2":
        from rewards.hpsv2 import HPS_FILES, HPS_REPO

        return _yes(_hub.hf_repo_cached(HPS_REPO, HPS_FILES["2.1"]))
    if n == "imagereward":  # the checkpoint (the package's download folder or the hub cache) and BERT's tokenizer
        from rewards.imagereward import REPO, package_cache

        ckpt = (package_cache() / "ImageReward.pt").is_file() or _hub.hf_repo_cached(REPO, "ImageReward.pt")
        return _yes(ckpt and _hub.hf_repo_cached("bert-base-uncased", "vocab.txt"))
    try:  # transformers-backed scorers: their default model (and processor) repos
        params = inspect.signature(info.factory).parameters
    except (TypeError, ValueError):
        return "?"
    repos = [p.default for k, p in params.items() if k in ("model", "processor") and isinstance(p.default, str) and "/" in p.default]
    return _yes(all(_hub.hf_repo_cached(r) for r in repos)) if repos else "-"


def _yes(b: bool) -> str:
    return "yes" if b else "no"
