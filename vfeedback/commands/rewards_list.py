"""``vfeedback rewards``: list every scorer, whether it is installed, and how to install it."""
from __future__ import annotations

import argparse
import json
import sys


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("rewards", help="list the available rewards", description="List every registered reward: differentiable or not, installed or not, the pip extra that installs it.")
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
                "extra": i.extra,
                "install": None if i.installed else _install_hint(i),
                "requires": list(i.requires),
                "description": i.description,
            }
            for i in infos
        ]
        json.dump(doc, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    rows = [[i.name, "yes" if i.differentiable else "no", "yes" if i.installed else "no", i.extra or "-", i.description] for i in infos]
    sys.stdout.write(format_table(["name", "differentiable", "installed", "extra", "description"], rows, max_width=100) + "\n")
    missing = [i for i in infos if not i.installed]
    if missing:
        sys.stdout.write("\nnot installed: " + "; ".join(f"{i.name}: {_install_hint(i)}" for i in missing) + "\n")
    return 0


def _install_hint(info) -> str:
    return f"pip install 'vfeedback[{info.extra}]'" if info.extra else f"pip install {' '.join(info.requires)}"
