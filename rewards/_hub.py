"""Finding weight files and turning download failures into messages a user can act on.

Every scorer accepts a local file or folder, an ``hf-hub:org/repo[/file]`` reference or an
``https://`` URL for its weights. Without a network the loaders of huggingface_hub, open_clip
and transformers raise a variety of exceptions; :func:`resolve_file` and :func:`load_errors`
turn them into :class:`rewards.RewardError` naming the file to fetch and the option that takes a
local path.
"""
from __future__ import annotations

import contextlib
import logging
import os
import pickle
from pathlib import Path
from typing import Iterator, Optional, Union

import torch

from .base import RewardError

log = logging.getLogger(__name__)

HF_PREFIX = "hf-hub:"


def cache_dir() -> Path:
    """Where URL downloads go: ``$VFEEDBACK_CACHE`` or ``~/.cache/vfeedback``."""
    return Path(os.environ.get("VFEEDBACK_CACHE") or Path.home() / ".cache" / "vfeedback")


def parse_device(device: Optional[str]) -> torch.device:
    """``None``/``"auto"`` -> CUDA when available, else CPU; anything else as given."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise RewardError(f"device: cannot use {device!r} ({e}); use cpu, cuda, cuda:1, mps or auto") from None


_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def parse_dtype(dtype: Union[str, torch.dtype, None], device: torch.device) -> torch.dtype:
    """``None``/``"auto"`` -> float16 on CUDA, float32 elsewhere; names like ``bf16`` accepted."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "", "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    key = str(dtype).lower().replace("torch.", "")
    if key not in _DTYPES:
        raise RewardError(f"dtype: unknown {dtype!r}; use float32, float16, bfloat16 or auto")
    return _DTYPES[key]


def _download_hf(repo_id: str, filename: str, what: str, option: str) -> str:
    try:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(repo_id, filename)
    except Exception as e:  # offline, gated, missing file: all become one actionable message
        raise RewardError(
            f"{what}: could not get {filename} from the Hugging Face hub repo {repo_id} ({type(e).__name__}: {_short(e)}). "
            f"Download it where there is a network (`hf download {repo_id} {filename}`) and pass {option}=/path/to/{filename}"
        ) from None


def _download_url(url: str, what: str, option: str) -> str:
    name = url.rstrip("/").rsplit("/", 1)[-1].replace("%2B", "+")
    target = cache_dir() / name
    if target.is_file() and target.stat().st_size > 0:
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(target), progress=False)
    except Exception as e:
        raise RewardError(f"{what}: could not download {url} ({type(e).__name__}: {_short(e)}). "
                          f"Download it where there is a network (`wget -O {name} '{url}'`) and pass {option}=/path/to/{name}") from None
    return str(target)


def resolve_file(spec: Optional[str], *, default: str, filename: Optional[str] = None, what: str, option: str) -> str:
    """A local path for a weight file.

    ``spec`` (or ``default`` when None) is an existing file; a folder holding ``filename``;
    ``hf-hub:org/repo/path/in/repo`` (or ``hf-hub:org/repo`` with ``filename``); or an http(s) URL.
    Raises :class:`RewardError` saying what to download and which ``option`` takes a path.
    """
    s = str(spec if spec is not None else default)
    if s.startswith(("http://", "https://")):
        return _download_url(s, what, option)
    if s.startswith(HF_PREFIX):
        ref = s[len(HF_PREFIX):].strip("/")
        parts = ref.split("/")
        if len(parts) < 2:
            raise RewardError(f"{option}: {s!r} is not hf-hub:org/repo[/file]")
        repo, fname = "/".join(parts[:2]), "/".join(parts[2:]) or filename
        if not fname:
            raise RewardError(f"{option}: {s!r} names a repo but no file; use hf-hub:{repo}/FILE")
        return _download_hf(repo, fname, what, option)
    p = Path(s).expanduser()
    if p.is_file():
        if p.stat().st_size == 0:
            raise RewardError(f"{option}: {p} is an empty file (an interrupted download?); fetch it again")
        return str(p)
    if p.is_dir():
        if filename and (p / filename).is_file():
            return str(p / filename)
        raise RewardError(f"{option}: folder {p} has no {filename or 'weight file'}")
    raise RewardError(f"{option}: no such file {p}; pass a local file, hf-hub:org/repo/file or an https URL")


def load_state_dict(path: str, what: str) -> dict:
    """Read a ``.safetensors`` or a torch file with ``weights_only=True`` (never a bare pickle)."""
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(str(path), device="cpu")
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, OSError, ValueError, EOFError) as e:
        raise RewardError(
            f"{what}: cannot read weights from {path} ({type(e).__name__}: {_short(e)}); "
            "it must be a safetensors file or a torch state dict loadable with weights_only=True"
        ) from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise RewardError(f"{what}: {path} holds a {type(sd).__name__}, not a state dict")
    return sd


def _short(e: BaseException, n: int = 300) -> str:
    s = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return s if len(s) <= n else s[: n - 3] + "..."


@contextlib.contextmanager
def load_errors(what: str, hint: str) -> Iterator[None]:
    """Turn the exceptions of a third-party loader into one :class:`RewardError` with ``hint``."""
    try:
        yield
    except RewardError:
        raise
    except (OSError, RuntimeError, ValueError, KeyError, EnvironmentError) as e:
        raise RewardError(f"{what}: {type(e).__name__}: {_short(e)}. {hint}") from None


# --------------------------------------------------------------------------------------------
# what to download, and whether it is already here (``vfeedback rewards``' "weights" column)


def open_clip_download_hint(model: str, tag: str) -> str:
    """The exact command that fetches open_clip's ``model`` / ``tag`` weights, and the option
    that then takes the file (open_clip reads ``open_clip_model.safetensors`` from its hub repo)."""
    try:
        import open_clip

        cfg = open_clip.get_pretrained_cfg(model.replace("/", "-"), tag) or {}
    except Exception:  # noqa: BLE001 - an unknown name gives the generic hint
        cfg = {}
    repo = (cfg.get("hf_hub") or "").strip("/")
    if repo:
        return (f"`hf download {repo} open_clip_model.safetensors` (open_clip_pytorch_model.bin where there is no safetensors file), "
                f"then pass the file's path instead of the tag {tag!r}")
    if cfg.get("url"):
        name = cfg["url"].rstrip("/").rsplit("/", 1)[-1]
        return f"`wget -O {name} {cfg['url']}`, then pass the file's path instead of the tag {tag!r}"
    return f"download the {model} / {tag} open_clip checkpoint and pass its path"


def _hf_cached(repo: str, filename: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo, filename), str)
    except Exception:  # noqa: BLE001
        return False


def open_clip_weights_cached(model: str, tag: str) -> bool:
    """Whether open_clip's ``model`` / ``tag`` weights are in the local Hugging Face cache."""
    try:
        import open_clip

        cfg = open_clip.get_pretrained_cfg(model, tag) or {}
    except Exception:  # noqa: BLE001
        return False
    repo = (cfg.get("hf_hub") or "").strip("/")
    return bool(repo) and any(_hf_cached(repo, f) for f in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"))


def url_cached(url: str) -> bool:
    """Whether :func:`resolve_file` already downloaded ``url`` into :func:`cache_dir`."""
    name = url.rstrip("/").rsplit("/", 1)[-1].replace("%2B", "+")
    p = cache_dir() / name
    return p.is_file() and p.stat().st_size > 0


def hf_repo_cached(repo: str, filename: str = "config.json") -> bool:
    """Whether a transformers model repo (its ``filename``) is in the local Hugging Face cache."""
    return _hf_cached(repo, filename)
