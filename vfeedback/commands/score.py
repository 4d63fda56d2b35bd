"""``vfeedback score``: score image files with one or more rewards.

    vfeedback score --reward clip,aesthetic --prompt "a red ball" out/*.png
    vfeedback score --reward pickscore --prompts prompts.jsonl --json
    vfeedback score --reward hpsv2 --option checkpoint=/models/HPS_v2.1_compressed.pt imgs/

A path that does not exist is a user error (exit 2, before any reward loads). Files that
exist but cannot be decoded get one line on stderr each and are skipped; the exit code is 1 when
any file failed, 0 when all were scored, 2 for a usage error (unknown reward, missing prompt or
file, bad option or flag). Images are decoded and scored a batch at a time, a batch holding at
most ``--batch-size`` images and ``MAX_BATCH_PIXELS`` pixels, so memory stays bounded by pixels,
not by the number of files.
"""
from __future__ import annotations

import argparse
import csv
import inspect
import io
import json
import logging
import math
import sys
from pathlib import Path
from typing import Optional

from ..errors import UserError

log = logging.getLogger(__name__)

# pixels decoded at once (one image larger than this is scored alone): 2**25 pixels are 400 MB
# as float32 RGB
MAX_BATCH_PIXELS = 1 << 25


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "score",
        help="score images with rewards (table, JSON or CSV)",
        description="Score image files with one or more rewards. `vfeedback rewards` lists the rewards.",
    )
    p.add_argument("paths", nargs="*", metavar="PATHS_OR_GLOBS", help="image files, folders (searched recursively) or globs")
    p.add_argument("--reward", "-r", required=True, help="reward name(s), comma-separated, e.g. clip,aesthetic")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--prompt", "-p", help="one prompt for every image")
    g.add_argument("--prompts", metavar="FILE", help='prompts: one per line in image order, or JSONL lines {"image": ..., "prompt": ...}')
    p.add_argument("--reference", action="append", default=[], metavar="IMG", help="reference image for rewards that take one (face_id); repeat for several")
    p.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE",
                   help="reward load option, e.g. model=ViT-B-32 or clip.pretrained=/path.pt (REWARD.KEY targets one reward); repeatable")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default 16; fewer when they are large)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="JSON output")
    fmt.add_argument("--csv", action="store_true", help="CSV output")
    p.set_defaults(func=run)
    return p


# --------------------------------------------------------------------------------------------
# parsing helpers


def parse_value(v: str):
    """``key=value`` value: JSON when it parses (numbers, true/false, lists), else the string."""
    low = v.strip().lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "yes"):
        return True
    if low in ("false", "no"):
        return False
    try:
        return json.loads(v)
    except ValueError:
        return v


def parse_options(items: list[str], names: list[str]) -> dict[str, dict]:
    """``["k=v", "clip.k=v"]`` -> ``{reward_name: {k: v}}`` (unprefixed keys go to every reward)."""
    out: dict[str, dict] = {n: {} for n in names}
    for item in items:
        if "=" not in item:
            raise UserError(f"--option {item!r}: expected KEY=VALUE (or REWARD.KEY=VALUE)")
        key, value = item.split("=", 1)
        key = key.strip()
        val = parse_value(value)
        target = None
        if "." in key:
            head, rest = key.split(".", 1)
            if head in out:
                target, key = head, rest
        if not key:
            raise UserError(f"--option {item!r}: empty key")
        for n in ([target] if target else names):
            out[n][key] = val
    return out


def _accepts(name: str, param: str) -> bool:
    import rewards
    from rewards.base import _REGISTRY

    rewards.available()
    info = _REGISTRY.get(name)
    if info is None:
        return False
    try:
        sig = inspect.signature(info.factory)
    except (TypeError, ValueError):
        return False
    return param in sig.parameters


def read_prompts(path: str) -> tuple[Optional[list[str]], Optional[dict[str, str]]]:
    """Plain lines -> (list, None); JSONL with image/prompt -> (None, {image: prompt})."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--prompts: no such file {p}")
    try:
        text = p.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark is not part of line 1
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"--prompts: cannot read {p} as UTF-8 text ({e})") from None
    lines = [ln.rstrip("\n").rstrip("\r") for ln in text.splitlines()]
    nonblank = [ln for ln in lines if ln.strip()]
    if nonblank and all(ln.lstrip().startswith("{") for ln in nonblank):
        mapping: dict[str, str] = {}
        for i, ln in enumerate(lines, 1):
            if not ln.strip():
                continue
            try:
                obj = json.loads(ln)
            except ValueError as e:
                raise UserError(f"--prompts {p}:{i}: not valid JSON ({e})") from None
            if not isinstance(obj, dict) or "image" not in obj or "prompt" not in obj:
                raise UserError(f'--prompts {p}:{i}: each JSONL line needs "image" and "prompt"')
            img = Path(str(obj["image"]))
            if not img.is_absolute() and not img.exists():
                img = p.parent / img  # relative to the JSONL file
            mapping[str(img)] = str(obj["prompt"])
        return None, mapping
    return [ln for ln in lines if ln.strip()], None


def _lookup(mapping: dict[str, str], path: Path) -> Optional[str]:
    for key in (str(path), str(path.resolve())):
        if key in mapping:
            return mapping[key]
    resolved = {str(Path(k).resolve()): v for k, v in mapping.items()}
    return resolved.get(str(path.resolve()))


# --------------------------------------------------------------------------------------------
# output


def format_table(header: list[str], rows: list[list[str]], max_width: int = 60, keep_end: tuple[int, ...] = ()) -> str:
    """Plain fixed-width table; long cells are cut with an ellipsis (from the left for the
    columns in ``keep_end``, so a path keeps its file name)."""

    def cut(s, col: int) -> str:
        s = str(s).replace("\n", " ")
        if len(s) <= max_width:
            return s
        return "…" + s[-(max_width - 1):] if col in keep_end else s[: max_width - 1] + "…"

    cells = [[cut(c, i) for i, c in enumerate(header)]] + [[cut(c, i) for i, c in enumerate(r)] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(v: float) -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def _jsonable(v: float):
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else v


# --------------------------------------------------------------------------------------------


def run(args) -> int:
    import rewards
    from rewards.images import ImageError, expand_paths, load_image

    names = [n.strip() for n in args.reward.split(",") if n.strip()]
    if not names:
        raise UserError("--reward: give at least one reward name (`vfeedback rewards` lists them)")
    if len(set(names)) != len(names):
        raise UserError(f"--reward: a name is repeated in {args.reward!r}")
    if not 1 <= args.batch_size <= 4096:
        raise UserError(f"--batch-size must be between 1 and 4096, got {args.batch_size}")
    from ..checks import check_device

    check_device(args.device, "--device")
    known = {i.name for i in rewards.available()}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UserError(f"unknown reward(s) {', '.join(unknown)}; available: {', '.join(sorted(known))}")

    # prompts and the list of images
    fixed_prompt = args.prompt
    line_prompts, mapping = (None, None)
    if args.prompts:
        line_prompts, mapping = read_prompts(args.prompts)
    if args.paths:
        paths = expand_paths(args.paths)
    elif mapping is not None:
        paths = [Path(k) for k in mapping]
    else:
        raise UserError("no images given: pass files, folders or globs (or a JSONL --prompts file naming them)")
    if not paths:
        raise UserError(f"no image files matched {' '.join(args.paths)}")
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise UserError(f"no such file: {shown}; check the path(s) (nothing was scored)")
    prompts: Optional[list[str]] = None
    if fixed_prompt is not None:
        prompts = [fixed_prompt] * len(paths)
    elif line_prompts is not None:
        if len(line_prompts) != len(paths):
            raise UserError(f"--prompts {args.prompts}: {len(line_prompts)} prompts for {len(paths)} images; give one line per image, in order")
        prompts = line_prompts
    elif mapping is not None:
        prompts = []
        for p in paths:
            pr = _lookup(mapping, p)
            if pr is None:
                raise UserError(f"--prompts {args.prompts}: no prompt for {p}")
            prompts.append(pr)

    # rewards
    options = parse_options(args.option, names)
    if prompts is None:
        # fail before loading (a download can take minutes) when the class always reads prompts;
        # options may switch that off (color=...), so those are checked after loading
        from rewards.base import _REGISTRY

        for n in names:
            if not options[n] and getattr(_REGISTRY[n].factory, "needs_prompt", False):
                raise UserError(f"reward {n!r} needs a prompt: pass --prompt TEXT or --prompts FILE")
    loaded = {}
    for n in names:
        opts = dict(options[n])
        if args.device and "device" not in opts and _accepts(n, "device"):
            opts["device"] = args.device
        if args.reference and _accepts(n, "reference"):
            opts["reference"] = [str(x) for x in args.reference]
        loaded[n] = rewards.load(n, **opts)
        if loaded[n].needs_prompt and prompts is None:
            raise UserError(f"reward {n!r} needs a prompt: pass --prompt TEXT or --prompts FILE")
    if args.reference and not any(_accepts(n, "reference") for n in names):
        log.warning("--reference ignored: none of %s takes a reference image", ", ".join(names))

    # decode and score, a batch of files at a time so memory stays bounded
    results: list[dict] = []
    failed: list[dict] = []
    from tqdm import tqdm

    bar = tqdm(total=len(paths), unit="img", file=sys.stderr, disable=len(paths) <= args.batch_size or not sys.stderr.isatty())
    try:
        for chunk in _chunks(paths, args.batch_size, MAX_BATCH_PIXELS):
            ok_idx, tensors = [], []
            for i in chunk:
                try:
                    tensors.append(load_image(paths[i]))
                    ok_idx.append(i)
                except ImageError as e:
                    print(f"error: {e}", file=sys.stderr)
                    failed.append({"image": str(paths[i]), "error": str(e)})
            if ok_idx:
                chunk_prompts = [prompts[i] for i in ok_idx] if prompts is not None else None
                scores = {}
                for n, r in loaded.items():
                    scores[n] = r.score(tensors, chunk_prompts, batch_size=args.batch_size)
                for j, i in enumerate(ok_idx):
                    results.append({"image": str(paths[i]), "prompt": prompts[i] if prompts is not None else None, "scores": {n: scores[n][j] for n in names}})
            bar.update(len(chunk))
    finally:
        bar.close()

    _write(args, names, results, failed, prompts is not None)
    return 1 if failed else 0


def _chunks(paths: list[Path], max_count: int, max_pixels: int):
    """Consecutive index lists of at most ``max_count`` images and ``max_pixels`` pixels (from
    the file headers); an image over ``max_pixels`` forms a chunk of its own."""
    from rewards.images import image_pixels

    chunk, pixels = [], 0
    for i, p in enumerate(paths):
        n = image_pixels(p)
        if chunk and (len(chunk) >= max_count or pixels + n > max_pixels):
            yield chunk
            chunk, pixels = [], 0
        chunk.append(i)
        pixels += n
    if chunk:
        yield chunk


def _write(args, names, results, failed, with_prompt: bool) -> None:
    out = sys.stdout
    if args.json:
        doc = {
            "rewards": names,
            "results": [{**r, "scores": {k: _jsonable(v) for k, v in r["scores"].items()}} for r in results],
            "failed": failed,
        }
        json.dump(doc, out, indent=2)
        out.write("\n")
    elif args.csv:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["image"] + (["prompt"] if with_prompt else []) + names)
        for r in results:
            w.writerow([r["image"]] + ([r["prompt"]] if with_prompt else []) + [repr(float(r["scores"][n])) for n in names])
        out.write(buf.getvalue())
    else:
        header = ["image"] + (["prompt"] if with_prompt else []) + names
        rows = [[r["image"]] + ([r["prompt"]] if with_prompt else []) + [_fmt(r["scores"][n]) for n in names] for r in results]
        if rows:
            out.write(format_table(header, rows, keep_end=(0,)) + "\n")
        if failed:
            out.write(f"{len(failed)} of {len(results) + len(failed)} file(s) could not be read (see stderr)\n")
