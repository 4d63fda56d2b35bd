"""Write the tiny face models that configs/id_aligner/tiny.yaml uses (CPU plumbing demo).

    python demos/make_tiny_face_models.py            # -> runs/tiny-face/
    python demos/make_tiny_face_models.py --out DIR

Writes into the folder:

- ``arcface_tiny.onnx``: a tiny, seeded, random network with ArcFace's interface ((N, 3, 112, 112)
  input normalised (255 x - 127.5) / 127.5 -> a 512-d embedding), exported to ONNX the way
  insightface's recognisers are, so ``face_id`` with ``backend: insightface, differentiable: true``
  converts it to torch with onnx2torch exactly as it does a real ``w600k_r50.onnx``. Its
  embeddings carry no identity knowledge: it tests the plumbing, not face recognition.
- ``astronaut.png``: scikit-image's astronaut photo (Eileen Collins, public domain), a real face
  for the reference (the detector, MTCNN from facenet-pytorch, is real).
- ``no_face.png``: scikit-image's coffee cup, to see the "no face in reference" error.
- ``structure_rm.safetensors``: a character-structure reward model (``rewards.structure``, the
  structure part of ID-Aligner's identity aesthetic reward) on the tiny random open_clip
  backbone, trained in a few seconds on the 100 LFW faces that ship with scikit-image
  (``structure-photos/``) against structural distortions of them. Real use trains one on
  photos of people with a real CLIP (``python -m rewards.structure``, docs/id_aligner.md).

Real use replaces the ONNX with an insightface model pack (buffalo_l / antelopev2) and the photo
with photos of the person (docs/id_aligner.md).
"""
from __future__ import annotations

import argparse
from pathlib import Path


from vfeedback.models.tiny_face import write_tiny_arcface


def write_photos(folder: Path) -> dict[str, Path]:
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    out = {"face": folder / "astronaut.png", "no_face": folder / "no_face.png"}
    Image.fromarray(data.astronaut()).save(out["face"])
    Image.fromarray(data.coffee()).save(out["no_face"])
    return out


def write_structure_model(out: Path, seed: int = 0) -> Path:
    """A tiny structure reward model trained on skimage's LFW faces (seconds on one CPU core)."""
    import numpy as np
    from PIL import Image
    from skimage import data

    from rewards.structure import train_structure_model
    from vfeedback.itercomp.tiny import resolve_backbone

    photos = out / "structure-photos"
    photos.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(data.lfw_subset()[:100]):  # the first 100 of the subset are faces
        Image.fromarray((np.asarray(f) * 255).astype(np.uint8)).save(photos / f"lfw{i:03d}.png")
    target = out / "structure_rm.safetensors"
    train_structure_model(photos, target, resolve_backbone({"model": "tiny:clip"}), variants=4, size=32, epochs=20, seed=seed)
    return target


def make(out: Path) -> dict[str, Path]:
    """Write everything into ``out``; returns the paths by role (``arcface``, ``face``,
    ``no_face``, ``structure``)."""
    import warnings

    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice
        warnings.simplefilter("ignore")
        paths = {"arcface": write_tiny_arcface(out / "arcface_tiny.onnx")}
    paths.update(write_photos(out))
    paths["structure"] = write_structure_model(out)
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/tiny-face", help="output folder (default runs/tiny-face)")
    args = ap.parse_args(argv)
    for role, p in make(Path(args.out)).items():
        print(f"{role:8s} {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
