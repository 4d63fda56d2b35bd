"""``vfeedback env``: what a bug report needs (versions, CUDA, devices, attention backend),
in the spirit of ``accelerate env`` / ``diffusers-cli env``: paste its output into an issue."""
from __future__ import annotations

import argparse
import json
import platform
import sys

#: distribution name (for the installed version) of every library a run may touch
PACKAGES = (
    ("vfeedback", "vfeedback"),
    ("torch", "torch"),
    ("torchvision", "torchvision"),
    ("diffusers", "diffusers"),
    ("peft", "peft"),
    ("accelerate", "accelerate"),
    ("transformers", "transformers"),
    ("open_clip", "open_clip_torch"),
    ("insightface", "insightface"),
    ("onnxruntime", "onnxruntime"),
    ("image-reward", "image-reward"),
    ("xformers", "xformers"),
    ("gradio", "gradio"),
    ("trl", "trl"),
    ("gymnasium", "gymnasium"),
)


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("env", help="print versions and devices for a bug report",
                              description="Print the versions of vfeedback and the libraries it builds on, Python, the platform, "
                                          "CUDA, the devices and the attention backend `model.attention: auto` would choose.")
    p.add_argument("--json", action="store_true", help="JSON output")
    p.set_defaults(func=run)
    return p


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def collect() -> dict:
    """Everything ``vfeedback env`` prints, as a flat ``{label: text}`` dict (insertion ordered)."""
    import torch

    from ..models.loader import xformers_usable

    info: dict[str, str] = {"platform": platform.platform(), "python": sys.version.split()[0]}
    for label, dist in PACKAGES:
        info[label] = _version(dist)
    cuda = torch.cuda.is_available()
    info["torch CUDA build"] = torch.version.cuda or "none (CPU build)"
    info["CUDA available"] = "yes" if cuda else "no"
    if cuda:
        n = torch.cuda.device_count()
        names = [torch.cuda.get_device_name(i) for i in range(n)]
        mem = [torch.cuda.get_device_properties(i).total_memory / 2**30 for i in range(n)]
        info["devices"] = "; ".join(f"cuda:{i} {nm} ({m:.0f} GiB)" for i, (nm, m) in enumerate(zip(names, mem)))
        info["bf16 supported"] = "yes" if torch.cuda.is_bf16_supported() else "no"
    else:
        info["devices"] = "cpu"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        info["devices"] += "; mps"
    info["CPU threads"] = str(torch.get_num_threads())
    dev = "cuda" if cuda else "cpu"
    # the same rule models.loader._set_attention applies for `model.attention: auto`
    info["attention (auto)"] = "xformers" if xformers_usable(dev) else "sdpa (torch scaled_dot_product_attention)"
    return info


def run(args) -> int:
    info = collect()
    if args.json:
        json.dump(info, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    width = max(len(k) for k in info)
    sys.stdout.write("Copy and paste this into your bug report:\n\n")
    sys.stdout.write("".join(f"- {k + ':':<{width + 1}} {v}\n" for k, v in info.items()))
    return 0
