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

Real use replaces the ONNX with an insightface model pack (buffalo_l / antelopev2) and the photo
with photos of the person (docs/id_aligner.md).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch


class TinyArcFace(torch.nn.Module):
    """ArcFace-shaped: (N, 3, 112, 112) -> (N, 512), conv/BN/PReLU like the iresnet stem."""

    def __init__(self):
        super().__init__()
        n = torch.nn
        self.body = n.Sequential(
            n.Conv2d(3, 8, 3, 2, 1), n.BatchNorm2d(8), n.PReLU(8),
            n.Conv2d(8, 16, 3, 2, 1), n.BatchNorm2d(16), n.PReLU(16),
            n.AdaptiveAvgPool2d(4), n.Flatten(), n.Linear(256, 512), n.BatchNorm1d(512),
        )  # fmt: skip

    def forward(self, x):
        return self.body(x)


def write_tiny_arcface(path: Path, seed: int = 0) -> Path:
    """Export a seeded :class:`TinyArcFace` to ONNX at ``path`` (dynamic batch, opset 17)."""
    torch.manual_seed(seed)
    net = TinyArcFace().eval()
    with torch.no_grad():  # non-trivial BN statistics, as a trained network has
        for m in net.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(net, (torch.randn(1, 3, 112, 112),), str(path), dynamo=False, input_names=["input.1"],
                      output_names=["embedding"], dynamic_axes={"input.1": {0: "N"}, "embedding": {0: "N"}}, opset_version=17)
    return path


def write_photos(folder: Path) -> dict[str, Path]:
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    out = {"face": folder / "astronaut.png", "no_face": folder / "no_face.png"}
    Image.fromarray(data.astronaut()).save(out["face"])
    Image.fromarray(data.coffee()).save(out["no_face"])
    return out


def make(out: Path) -> dict[str, Path]:
    """Write everything into ``out``; returns the paths by role (``arcface``, ``face``, ``no_face``)."""
    import warnings

    with warnings.catch_warnings():  # the TorchScript exporter's deprecation notice
        warnings.simplefilter("ignore")
        paths = {"arcface": write_tiny_arcface(out / "arcface_tiny.onnx")}
    paths.update(write_photos(out))
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
