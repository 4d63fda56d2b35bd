"""Stored preference data for D3PO: labelled pairs and ranked groups, read from JSONL / JSON.

The format (full description in ``docs/d3po.md``) is one record per line. A record names a
prompt and two or more images of it, each by what rebuilds its denoising trajectory, and says
which is better:

* a pair: ``{"prompt": ..., "chosen": ITEM, "rejected": ITEM}``;
* a ranked group: ``{"prompt": ..., "items": [ITEM, ...], "ranks": [1, 3, 2, ...]}`` with rank
  1 the best and equal ranks a tie. Every pair of the group with different ranks is used
  (the D3PO reference trains all ``combinations`` of its 7-image groups); ties are skipped.

An ITEM is either ``{"latent_seed": int, "noise_seed": int}`` (the trajectory is re-sampled
from the base model: x_T from ``latent_seed``, the per-step DDIM noise from ``noise_seed``;
``latent_seed`` may sit on the record, shared by its items as D3PO's groups share x_T) or
``{"trajectory": KEY}`` with the record's ``"trajectories"`` naming a safetensors file
(relative to the preference file) whose tensor ``KEY`` is the stored ``(T+1, C, h, w)``
trajectory x_T, ..., x_0.

Optional record fields: ``negative_prompt``, ``sampling`` (``steps`` / ``guidance_scale`` /
``eta`` used to make the images; checked against the run's config), ``id``; an item may
carry ``image`` (the file the person saw). Unknown fields are ignored (room for app metadata).

Nothing here touches a model: :func:`load_preferences` validates the whole file up front and
raises :class:`~vfeedback.errors.UserError` naming the file and the line of the first bad
record; :func:`write_preferences` writes the same format (the Gradio app and D3PO's offline
self-labelling use it).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from ..errors import UserError

__all__ = ["PreferenceItem", "PreferenceGroup", "load_preferences", "write_preferences", "pairs_from_ranks"]


@dataclass(frozen=True)
class PreferenceItem:
    """How to rebuild one image's trajectory: by seeds, or a key into a safetensors file."""

    latent_seed: Optional[int] = None
    noise_seed: Optional[int] = None
    trajectory: Optional[str] = None
    image: Optional[str] = None

    def to_json(self) -> dict:
        return {k: v for k, v in (("latent_seed", self.latent_seed), ("noise_seed", self.noise_seed),
                                  ("trajectory", self.trajectory), ("image", self.image)) if v is not None}


@dataclass
class PreferenceGroup:
    """One prompt, its images and the ordered pairs ``(better, worse)`` (indices into items)."""

    prompt: str
    items: list[PreferenceItem]
    pairs: list[tuple[int, int]]
    ranks: Optional[list[int]] = None  # None: the record was a pair
    negative_prompt: Optional[str] = None
    trajectories: Optional[Path] = None  # resolved safetensors path
    sampling: Optional[dict] = None
    source: str = ""  # "file line N", for error messages
    ties: int = 0

    def to_json(self) -> dict:
        rec: dict[str, Any] = {"prompt": self.prompt}
        if self.ranks is None and len(self.items) == 2 and self.pairs:
            w, l = self.pairs[0]
            rec["chosen"], rec["rejected"] = self.items[w].to_json(), self.items[l].to_json()
        else:
            rec["items"] = [it.to_json() for it in self.items]
            rec["ranks"] = list(self.ranks) if self.ranks is not None else _ranks_from_pairs(len(self.items), self.pairs)
        if self.negative_prompt is not None:
            rec["negative_prompt"] = self.negative_prompt
        if self.sampling is not None:
            rec["sampling"] = dict(self.sampling)
        if self.trajectories is not None:
            rec["trajectories"] = str(self.trajectories)
        return rec


def pairs_from_ranks(ranks: Sequence[float]) -> tuple[list[tuple[int, int]], int]:
    """All ``(better, worse)`` index pairs of a ranking (lower rank is better) and the tie count."""
    pairs, ties = [], 0
    for i, j in combinations(range(len(ranks)), 2):
        if ranks[i] < ranks[j]:
            pairs.append((i, j))
        elif ranks[j] < ranks[i]:
            pairs.append((j, i))
        else:
            ties += 1
    return pairs, ties


def _ranks_from_pairs(n: int, pairs: Sequence[tuple[int, int]]) -> list[int]:
    # only used to serialise a pair record as a group: winner 1, loser 2
    ranks = [1] * n
    for _, l in pairs:
        ranks[l] = 2
    return ranks


class _Bad(Exception):
    pass


def _int(v, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _Bad(f"{what} must be an integer, got {v!r}")
    if not 0 <= v < 2**63:
        raise _Bad(f"{what} must be in [0, 2^63), got {v}")
    return v


def _item(obj, what: str, default_latent: Optional[int], has_traj_file: bool) -> PreferenceItem:
    if not isinstance(obj, dict):
        raise _Bad(f"{what} must be an object like {{\"latent_seed\": 1, \"noise_seed\": 2}} or {{\"trajectory\": \"key\"}}, got {obj!r}")
    image = obj.get("image")
    if image is not None and not isinstance(image, str):
        raise _Bad(f"{what}.image must be a string path, got {image!r}")
    if "trajectory" in obj:
        key = obj["trajectory"]
        if not isinstance(key, str) or not key:
            raise _Bad(f"{what}.trajectory must be a non-empty string (a tensor name), got {key!r}")
        if not has_traj_file:
            raise _Bad(f"{what} names trajectory {key!r} but the record has no \"trajectories\" safetensors file")
        return PreferenceItem(trajectory=key, image=image)
    if "noise_seed" not in obj:
        raise _Bad(f"{what} needs \"noise_seed\" (with \"latent_seed\" here or on the record) or \"trajectory\"")
    noise = _int(obj["noise_seed"], f"{what}.noise_seed")
    latent = obj.get("latent_seed", default_latent)
    if latent is None:
        raise _Bad(f"{what} has no \"latent_seed\" (give it on the item or on the record)")
    return PreferenceItem(latent_seed=_int(latent, f"{what}.latent_seed"), noise_seed=noise, image=image)


def _parse_record(obj, base: Path) -> PreferenceGroup:
    if not isinstance(obj, dict):
        raise _Bad(f"expected a JSON object (a record), got {type(obj).__name__}")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise _Bad("needs a non-empty string \"prompt\"")
    neg = obj.get("negative_prompt")
    if neg is not None and not isinstance(neg, str):
        raise _Bad(f"\"negative_prompt\" must be a string, got {neg!r}")
    sampling = obj.get("sampling")
    if sampling is not None:
        if not isinstance(sampling, dict) or not set(sampling) <= {"steps", "guidance_scale", "eta"}:
            raise _Bad(f"\"sampling\" must be an object with steps / guidance_scale / eta, got {sampling!r}")
        for k, v in sampling.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise _Bad(f"sampling.{k} must be a number, got {v!r}")
    traj = obj.get("trajectories")
    traj_path = None
    if traj is not None:
        if not isinstance(traj, str) or not traj:
            raise _Bad(f"\"trajectories\" must be a path to a .safetensors file, got {traj!r}")
        traj_path = Path(traj) if Path(traj).is_absolute() else base / traj
        if not traj_path.is_file():
            raise _Bad(f"trajectories file {traj_path} not found")
    latent = obj.get("latent_seed")
    if latent is not None:
        latent = _int(latent, "latent_seed")
    has_pair = "chosen" in obj or "rejected" in obj
    has_group = "items" in obj or "ranks" in obj
    if has_pair and has_group:
        raise _Bad("give either \"chosen\"/\"rejected\" (a pair) or \"items\"/\"ranks\" (a ranked group), not both")
    if has_pair:
        if "chosen" not in obj or "rejected" not in obj:
            raise _Bad("a pair needs both \"chosen\" and \"rejected\"")
        items = [_item(obj["chosen"], "chosen", latent, traj_path is not None),
                 _item(obj["rejected"], "rejected", latent, traj_path is not None)]
        if items[0] == items[1]:
            raise _Bad("\"chosen\" and \"rejected\" are the same image")
        return PreferenceGroup(prompt, items, [(0, 1)], None, neg, traj_path, sampling)
    if has_group:
        raw_items, ranks = obj.get("items"), obj.get("ranks")
        if not isinstance(raw_items, list) or len(raw_items) < 2:
            raise _Bad(f"\"items\" must be a list of at least 2 images, got {raw_items!r}")
        if not isinstance(ranks, list) or len(ranks) != len(raw_items):
            raise _Bad(f"\"ranks\" must be a list with one rank per item ({len(raw_items)}), got {ranks!r}")
        for r in ranks:
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r):
                raise _Bad(f"\"ranks\" must hold numbers (1 = best, equal = tie), got {r!r}")
        items = [_item(it, f"items[{k}]", latent, traj_path is not None) for k, it in enumerate(raw_items)]
        pairs, ties = pairs_from_ranks(ranks)
        return PreferenceGroup(prompt, items, pairs, [r for r in ranks], neg, traj_path, sampling, ties=ties)
    raise _Bad("needs \"chosen\" and \"rejected\" (a pair) or \"items\" and \"ranks\" (a ranked group)")


def _check_trajectory_keys(groups: list[PreferenceGroup], path: Path) -> None:
    from safetensors import safe_open

    keys_by_file: dict[Path, set] = {}
    for g in groups:
        if g.trajectories is None:
            continue
        if g.trajectories not in keys_by_file:
            try:
                with safe_open(str(g.trajectories), framework="pt") as f:
                    keys_by_file[g.trajectories] = set(f.keys())
            except Exception as e:  # not a safetensors file, truncated, ...
                raise UserError(f"{g.source}: cannot read trajectories file {g.trajectories} ({type(e).__name__}: {e})") from None
        for it in g.items:
            if it.trajectory is not None and it.trajectory not in keys_by_file[g.trajectories]:
                raise UserError(f"{g.source}: trajectory {it.trajectory!r} is not in {g.trajectories}")


def load_preferences(path: Union[str, Path], field: str = "d3po.file", method: str = "D3PO") -> list[PreferenceGroup]:
    """Read and validate a preference file (``.jsonl``: one record per line, blank lines and
    ``#`` comments skipped; ``.json``: a list of records). Returns the groups, each with its
    ``pairs``; a group whose items all tie is kept with no pairs. Raises ``UserError`` naming
    ``field``, the file and the line of the first malformed record, or when no record yields a
    pair (``method``: who needs it, for that message)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{field}: preference file {p} not found")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{field}: cannot read {p} ({e})") from None
    base = p.parent
    groups: list[PreferenceGroup] = []
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{field}: {p} line {e.lineno}: not valid JSON ({e.msg})") from None
        if isinstance(data, dict) and "records" in data:
            data = data["records"]
        if not isinstance(data, list):
            raise UserError(f"{field}: {p}: a .json preference file holds a list of records (or {{\"records\": [...]}}); use .jsonl for one record per line")
        lines = _record_lines(text, len(data))
        for k, obj in enumerate(data):
            where = f"{p} record {k + 1}" + (f" (line {lines[k]})" if lines[k] else "")
            try:
                g = _parse_record(obj, base)
            except _Bad as e:
                raise UserError(f"{field}: {where}: {e}") from None
            g.source = where
            groups.append(g)
    else:
        for i, line in enumerate(text.splitlines(), 1):
            s = line.strip()
            if not s or s.startswith("#"):
                continue
            try:
                obj = json.loads(s)
            except json.JSONDecodeError as e:
                raise UserError(f"{field}: {p} line {i}: not valid JSON ({e.msg} at column {e.colno})") from None
            try:
                g = _parse_record(obj, base)
            except _Bad as e:
                raise UserError(f"{field}: {p} line {i}: {e}") from None
            g.source = f"{p} line {i}"
            groups.append(g)
    if not groups:
        raise UserError(f"{field}: {p} holds no preference records")
    _check_trajectory_keys(groups, p)
    if not any(g.pairs for g in groups):
        raise UserError(f"{field}: {p}: every record is a tie; {method} needs at least one pair with a preferred image")
    return groups


def _record_lines(text: str, n: int) -> list[Optional[int]]:
    """Best-effort line number of each top-level record of a JSON list (for error messages)."""
    out: list[Optional[int]] = []
    dec = json.JSONDecoder()
    i = text.find("[")
    if i < 0:
        return [None] * n
    i += 1
    for _ in range(n):
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        out.append(text.count("\n", 0, i) + 1)
        try:
            _, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            return out + [None] * (n - len(out))
    return out


def write_preferences(path: Union[str, Path], groups: Sequence[PreferenceGroup]) -> Path:
    """Write groups as JSONL (atomically), in the format :func:`load_preferences` reads."""
    from ..rundir import atomic_write

    p = Path(path)
    lines = []
    for g in groups:
        rec = g.to_json()
        if g.trajectories is not None:
            try:
                rec["trajectories"] = str(Path(g.trajectories).relative_to(p.parent))
            except ValueError:
                pass
        lines.append(json.dumps(rec))
    atomic_write(p, "\n".join(lines) + "\n")
    return p
