"""One place that turns files, PIL images and arrays into the image contract.

The contract everywhere in vfeedback and rewards: a float tensor ``(B, 3, H, W)`` with values in
``[0, 1]``, on any device and dtype. Every entry point (CLI, app, integrations) goes through
:func:`to_tensor` / :func:`load_image`, so decoding rules and error messages are the same.
"""
from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Iterable, Sequence, Union

import numpy as np
import torch

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
# Refuse absurd images before decoding them (a decompression bomb, a mistaken huge scan).
MAX_PIXELS = 8192 * 8192


class ImageError(ValueError):
    """A file or object that cannot be turned into an image; the message names it."""


ImageLike = Union[str, os.PathLike, "PIL.Image.Image", np.ndarray, torch.Tensor]


def load_image(path: Union[str, os.PathLike]) -> torch.Tensor:
    """Decode one image file to a ``(3, H, W)`` float tensor in ``[0, 1]``, upright.

    The EXIF orientation tag is applied (a phone photo stored sideways or mirrored is scored as
    it is shown). Grey, palette, CMYK and alpha images are converted to RGB (alpha composited on
    white). Raises :class:`ImageError` naming the file when it is missing, empty, truncated, not
    an image, not a regular file (a pipe such as ``/dev/stdin`` fed by another program), or
    larger than ``MAX_PIXELS``.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    p = Path(path)
    if not p.exists():
        raise ImageError(f"{p}: no such file")
    if p.is_dir():
        raise ImageError(f"{p}: is a folder, not an image")
    if not p.is_file():
        raise ImageError(f"{p}: not a regular file (a pipe or a device); save the image to a file and pass its path")
    if p.stat().st_size == 0:
        raise ImageError(f"{p}: empty file (0 bytes)")
    try:
        with Image.open(p) as im:
            w, h = im.size
            if w * h > MAX_PIXELS:
                raise ImageError(f"{p}: {w}x{h} pixels is larger than the {MAX_PIXELS} pixel limit; resize it first")
            im.load()
            return pil_to_tensor(ImageOps.exif_transpose(im))
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{p}: not an image file PIL can read") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated / corrupt data
        raise ImageError(f"{p}: corrupt or truncated image ({e})") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"{p}: {e}") from None


def pil_to_tensor(im) -> torch.Tensor:
    """PIL image (any mode) -> ``(3, H, W)`` float32 in ``[0, 1]``."""
    from PIL import Image

    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    im = im.convert("RGB")
    arr = np.asarray(im, dtype=np.uint8).copy()
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)


def _array_to_tensor(a: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    return _normalise_tensor(t, channels_last=t.ndim >= 3 and t.shape[-1] in (1, 3, 4) and t.shape[-3] not in (1, 3, 4))


def _normalise_tensor(t: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    if t.ndim == 2:
        t = t[None]
    if channels_last:
        t = t.movedim(-1, -3)
    if t.dtype == torch.uint8:
        t = t.float() / 255.0
    elif not t.is_floating_point():
        t = t.float()
    if t.shape[-3] == 1:
        t = t.expand(*t.shape[:-3], 3, *t.shape[-2:])
    elif t.shape[-3] == 4:
        t = t[..., :3, :, :]
    if t.shape[-3] != 3:
        raise ImageError(f"expected 1, 3 or 4 channels, got tensor of shape {tuple(t.shape)}")
    return t


def to_tensor(images) -> torch.Tensor:
    """Anything image-like -> ``(B, 3, H, W)`` float in ``[0, 1]``.

    Accepts a ``(B,3,H,W)`` / ``(3,H,W)`` tensor (uint8 or float), a path, a PIL image, an
    ``HxWxC`` array, or a list of those of one size. Float tensors keep their device, dtype and
    autograd graph.
    """
    if isinstance(images, torch.Tensor):
        t = _normalise_tensor(images)
        return t if t.ndim == 4 else t[None]
    if isinstance(images, np.ndarray):
        t = _array_to_tensor(images)
        return t if t.ndim == 4 else t[None]
    if not isinstance(images, (list, tuple)):
        images = [images]
    items = [to_single(x) for x in images]
    if not items:
        raise ImageError("no images given")
    sizes = {tuple(x.shape[-2:]) for x in items}
    if len(sizes) > 1:
        raise ImageError(f"images of different sizes in one batch: {sorted(sizes)}; score them separately or resize")
    return torch.stack(items)


def to_single(x) -> torch.Tensor:
    """One image-like object -> ``(3, H, W)``."""
    from PIL import Image

    if isinstance(x, (str, os.PathLike)):
        return load_image(x)
    if isinstance(x, Image.Image):
        return pil_to_tensor(x)
    if isinstance(x, np.ndarray):
        t = _array_to_tensor(x)
    elif isinstance(x, torch.Tensor):
        t = _normalise_tensor(x)
    else:
        raise ImageError(f"cannot read an image from a {type(x).__name__}")
    if t.ndim == 4:
        if t.shape[0] != 1:
            raise ImageError(f"expected one image, got a batch of shape {tuple(t.shape)}")
        t = t[0]
    return t


def image_pixels(path: Union[str, os.PathLike]) -> int:
    """Pixel count from the file's header (no decoding); 0 when the header cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size[0] * im.size[1]
    except Exception:  # the decode that follows reports the file's problem in words
        return 0


def expand_paths(items: Iterable[Union[str, os.PathLike]]) -> list[Path]:
    """Expand folders (recursively, image suffixes only) and globs, keeping the given order.

    A literal path that does not exist is kept, so the caller reports it as an error rather
    than silently dropping it.
    """
    out: list[Path] = []
    seen = set()
    for item in items:
        s = str(item)
        if any(ch in s for ch in "*?[") and not Path(s).exists():
            matches = sorted(glob.glob(s, recursive=True))
            found = [Path(m) for m in matches if Path(m).is_file()]
        elif Path(s).is_dir():
            found = sorted(p for p in Path(s).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            found = [Path(s)]
        for p in found:
            if p not in seen:
                seen.add(p)
                out.append(p)
    return out


def to_pil(t: torch.Tensor) -> list:
    """``(B,3,H,W)`` or ``(3,H,W)`` in ``[0,1]`` -> list of PIL RGB images."""
    from PIL import Image

    if t.ndim == 3:
        t = t[None]
    arr = (t.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]
