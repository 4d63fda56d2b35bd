"""A tiny, seeded, ArcFace-shaped recogniser for tests and CPU demos of the insightface path.

Same input / output contract as insightface's ArcFace ONNX files ((N, 3, 112, 112) -> (N, 512)),
random weights: it exercises the loaders, the ONNX->torch conversion and the alignment warp, it
recognises no one.
"""
from __future__ import annotations

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


def tiny_arcface(seed: int = 0) -> TinyArcFace:
    """A seeded :class:`TinyArcFace` with non-trivial BatchNorm statistics, as a trained one has."""
    torch.manual_seed(seed)
    net = TinyArcFace()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return net


def write_tiny_arcface(path: Path, seed: int = 0) -> Path:
    """Export :func:`tiny_arcface` to ONNX at ``path`` (dynamic batch, opset 17)."""
    net = tiny_arcface(seed).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.onnx.export(net, (torch.randn(1, 3, 112, 112),), str(path), dynamo=False, input_names=["input.1"],
                      output_names=["embedding"], dynamic_axes={"input.1": {0: "N"}, "embedding": {0: "N"}}, opset_version=17)
    return path
