"""The reward library's scores on pictures anyone can rebuild offline, through the user's CLI.

    python bench/reward_scores.py --out DIR        # writes DIR/scores.json (and the pictures it scored)

Every reward that ships real weights (or needs none) scores fixed inputs through
``vfeedback score --json``, the way a user scores files:

* six shapes-world scenes (``vfeedback.world.scenes.make_batch(6, seed=2026)``, two of each
  kind), each with its own caption and with a hard negative of it (``scenes.corrupt``: colours
  swapped, the relation reversed, a count off by one): the learned judges should say match for
  the first and not for the second; the analytic rewards see the same files;
* the two photos that ship with scikit-image (``astronaut.png``) and matplotlib
  (``grace_hopper.jpg``), with ``face_id`` (dlib's detector and 128-d embedding from
  face_recognition_models) against the astronaut as the reference person: the same person
  scores 1, another person less.

``bench/reproduce.py`` (``make reproduce``) reruns it and checks each score against
``bench/results/figures/reward_scores.json``; the README's table is rendered from that JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCENE_REWARDS = ["shapes_judge", "shapes_judge_heldout", "shapes_attribute", "shapes_spatial", "shapes_count",
                 "composition_color", "color", "brightness", "saturation"]
PHOTO_REWARDS = ["face_id", "brightness", "saturation"]


def photos() -> dict[str, Path]:
    """The shipped test photos: name -> path inside the installed packages."""
    import matplotlib
    import skimage

    found = {"astronaut": Path(skimage.__file__).parent / "data" / "astronaut.png",
             "grace_hopper": Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"}
    for name, p in found.items():
        if not p.exists():
            raise SystemExit(f"reward_scores: the {name} photo is not at {p} (install scikit-image and matplotlib)")
    return found


def score(paths: list[Path], rewards: list[str], prompts_file: Path | None = None, extra: list[str] = ()) -> list[dict]:
    cmd = [sys.executable, "-m", "vfeedback", "score", "--reward", ",".join(rewards), "--device", "cpu", "--json", *extra]
    if prompts_file is not None:
        cmd += ["--prompts", str(prompts_file)]
    cmd += [str(p) for p in paths]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"reward_scores: `{' '.join(cmd)}` exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    doc = json.loads(proc.stdout)
    if doc["failed"]:
        raise SystemExit(f"reward_scores: some images could not be scored: {doc['failed']}")
    return doc["results"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for the pictures and scores.json")
    args = ap.parse_args(argv)
    from vfeedback.world.scenes import corrupt, make_batch

    out = Path(args.out)
    (out / "scenes").mkdir(parents=True, exist_ok=True)
    from PIL import Image

    images, scenes = make_batch(6, seed=2026, kinds=["attribute", "spatial", "count"])
    rng = np.random.default_rng(2026)
    rows, jsonl = [], []
    for i, (img, sc) in enumerate(zip(images, scenes)):
        pic = Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
        for which, caption in (("caption", sc.caption), ("negative", corrupt(sc.spec, rng).caption())):
            p = out / "scenes" / f"{i}_{sc.kind}_{which}.png"  # one file per (picture, prompt): score maps file -> prompt
            pic.save(p)
            rows.append({"image": p.name, "kind": sc.kind, "which": which, "prompt": caption})
            jsonl.append(json.dumps({"image": str(p), "prompt": caption}))
    prompts_file = out / "scene_prompts.jsonl"
    prompts_file.write_text("\n".join(jsonl) + "\n")
    got = score([Path(json.loads(line)["image"]) for line in jsonl], SCENE_REWARDS, prompts_file)
    for row, g in zip(rows, got):
        row["scores"] = {r: g["scores"][r] for r in SCENE_REWARDS}

    ph = photos()
    for name, p in ph.items():
        shutil.copy(p, out / p.name)
    face = score([out / p.name for p in ph.values()], PHOTO_REWARDS,
                 extra=["--reference", str(ph["astronaut"]), "--option", "face_id.backend=dlib"])
    photo_rows = [{"image": name, "scores": {r: g["scores"][r] for r in PHOTO_REWARDS}} for name, g in zip(ph, face)]

    (out / "scores.json").write_text(json.dumps({"scenes": rows, "photos": photo_rows, "reference": "astronaut"}, indent=1))
    print("wrote", out / "scores.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
