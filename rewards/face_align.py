"""Differentiable face alignment: 5 landmarks -> the ArcFace 112x112 crop, with torch ops.

Ours, not insightface's ``face_align.norm_crop``: that one is a cv2 warp of a uint8 array, with no gradient.

insightface aligns a face for its recognisers (``insightface/utils/face_align.py``:
``estimate_norm`` + ``norm_crop``) by fitting a similarity transform (rotation, uniform scale,
translation; skimage's ``SimilarityTransform.estimate``, i.e. Umeyama's least squares) from the
five detected landmarks to a fixed template (``arcface_dst``), then ``cv2.warpAffine`` with
bilinear interpolation and a black border. Here the same two steps are written in torch so that
the crop is a differentiable function of the pixels: the transform is estimated from landmarks
that carry no gradient, and the warp is ``affine_grid`` + ``grid_sample``, so gradients of an
identity loss reach the generated image (what ID-Aligner-style tuning needs).
"""
from __future__ import annotations

from typing import Union

import numpy as np
import torch
import torch.nn.functional as F

#: insightface's ``arcface_dst``: left eye, right eye, nose tip, left and right mouth corner
#: (left / right as seen in the image) of an aligned 112x112 ArcFace input, in pixels.
ARCFACE_DST = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float32,
)


def arcface_template(image_size: int = 112) -> np.ndarray:
    """The ArcFace template scaled to ``image_size`` the way insightface's ``estimate_norm`` does.

    Sizes that are multiples of 112 scale it; multiples of 128 scale it by ``size / 128`` and
    shift it right by ``8 * size / 128`` (the 128-pixel variant of the crop).
    """
    if image_size % 112 == 0:
        ratio, diff_x = image_size / 112.0, 0.0
    elif image_size % 128 == 0:
        ratio = image_size / 128.0
        diff_x = 8.0 * ratio
    else:
        raise ValueError(f"ArcFace crop size must be a multiple of 112 or 128, got {image_size}")
    dst = ARCFACE_DST * ratio
    dst[:, 0] += diff_x
    return dst


def similarity_transform(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Least-squares similarity transforms mapping ``src`` points onto ``dst`` points.

    ``src``: ``(N, K, 2)``; ``dst``: ``(K, 2)`` or ``(N, K, 2)``. Returns ``(N, 2, 3)`` matrices
    ``M`` with ``dst ~= M @ [x, y, 1]``. In 2-D a rotation with uniform scale is multiplication by
    one complex number ``a``, so ``min_{a,b} sum |a z_k + b - w_k|^2`` has the closed form
    ``a = sum(conj(z_c) w_c) / sum |z_c|^2`` on centred points: the same minimiser as Umeyama's
    method (skimage ``SimilarityTransform.estimate``, which insightface uses), without reflection.
    """
    src = src.to(torch.float64)
    dst = dst.to(src)
    if dst.ndim == 2:
        dst = dst.expand(src.shape[0], *dst.shape)
    z = torch.complex(src[..., 0], src[..., 1])
    w = torch.complex(dst[..., 0], dst[..., 1])
    zm, wm = z.mean(-1, keepdim=True), w.mean(-1, keepdim=True)
    zc, wc = z - zm, w - wm
    denom = (zc.abs() ** 2).sum(-1).clamp_min(1e-12)
    a = (zc.conj() * wc).sum(-1) / denom  # (N,)
    b = wm.squeeze(-1) - a * zm.squeeze(-1)
    m = torch.stack(
        [
            torch.stack([a.real, -a.imag, b.real], -1),
            torch.stack([a.imag, a.real, b.imag], -1),
        ],
        -2,
    )
    return m.to(torch.float32)


def estimate_norm(landmarks: Union[torch.Tensor, np.ndarray], image_size: int = 112) -> torch.Tensor:
    """``(N, 5, 2)`` (or ``(5, 2)``) landmarks in image pixels -> ``(N, 2, 3)`` alignment matrices.

    The torch counterpart of insightface's ``face_align.estimate_norm(lmk, image_size, 'arcface')``.
    """
    lm = torch.as_tensor(np.asarray(landmarks) if not isinstance(landmarks, torch.Tensor) else landmarks)
    lm = lm.detach().float()
    if lm.ndim == 2:
        lm = lm[None]
    if lm.shape[-2:] != (5, 2):
        raise ValueError(f"expected landmarks of shape (N, 5, 2), got {tuple(lm.shape)}")
    dst = torch.from_numpy(arcface_template(image_size)).to(lm.device)
    return similarity_transform(lm, dst)


def warp_affine(images: torch.Tensor, matrices: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Differentiable ``cv2.warpAffine(img, M, (w, h), flags=INTER_LINEAR, borderValue=0)``.

    ``images``: ``(N, C, H, W)``; ``matrices``: ``(N, 2, 3)`` mapping source pixel coordinates to
    output pixel coordinates (OpenCV's convention, pixel centres at integers); ``size``:
    ``(out_h, out_w)``. Returns ``(N, C, out_h, out_w)``; samples outside the image are 0.
    """
    n, _, h, w = images.shape
    oh, ow = size
    dev = images.device
    m = matrices.to(device=dev, dtype=torch.float64)
    full = torch.zeros(n, 3, 3, dtype=torch.float64, device=dev)
    full[:, :2] = m
    full[:, 2, 2] = 1.0
    inv = torch.linalg.inv(full)  # output pixel -> source pixel

    def to_pixels(width, height):  # normalised [-1, 1] (align_corners=False) -> pixels
        return torch.tensor([[width / 2, 0, (width - 1) / 2], [0, height / 2, (height - 1) / 2], [0, 0, 1]], dtype=torch.float64, device=dev)

    def to_norm(width, height):
        return torch.linalg.inv(to_pixels(width, height))

    theta = to_norm(w, h) @ inv @ to_pixels(ow, oh)
    theta = theta[:, :2].to(images.dtype if images.is_floating_point() else torch.float32)
    grid = F.affine_grid(theta, [n, images.shape[1], oh, ow], align_corners=False)
    return F.grid_sample(images, grid.to(images.dtype), mode="bilinear", padding_mode="zeros", align_corners=False)


def norm_crop(images: torch.Tensor, landmarks, image_size: int = 112) -> torch.Tensor:
    """Aligned ArcFace crops ``(N, C, S, S)`` of ``images`` ``(N, C, H, W)`` given ``(N, 5, 2)`` landmarks.

    The torch counterpart of insightface's ``face_align.norm_crop``; differentiable in ``images``.
    """
    m = estimate_norm(landmarks, image_size).to(images.device)
    return warp_affine(images, m, (image_size, image_size))


def landmarks_68_to_5(points: np.ndarray) -> np.ndarray:
    """dlib / iBUG 68-point landmarks ``(68, 2)`` -> the 5 ArcFace points ``(5, 2)``.

    Eye centres are the means of the two six-point eye contours (36-41 and 42-47), the nose
    tip is point 30, the mouth corners are points 48 and 54.
    """
    p = np.asarray(points, dtype=np.float32)
    if p.shape != (68, 2):
        raise ValueError(f"expected (68, 2) landmarks, got {p.shape}")
    return np.stack([p[36:42].mean(0), p[42:48].mean(0), p[30], p[48], p[54]])
