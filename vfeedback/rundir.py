"""The run folder every method writes (layout in the README / DESIGN.md):

    OUT/config.yaml  OUT/fingerprint.json  OUT/metrics.jsonl  OUT/summary.json  OUT/samples/  OUT/checkpoints/  OUT/lora/

Writes that must never be seen half-done go through :func:`atomic_write` (temp file in the
same folder, fsync, rename) or a temp folder renamed into place.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

from .errors import UserError

COMPLETE_MARKER = "COMPLETE"


def atomic_write(path: Path, data: bytes | str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class RunDir:
    def __init__(self, root):
        self.root = Path(root)

    config = property(lambda s: s.root / "config.yaml")
    metrics = property(lambda s: s.root / "metrics.jsonl")
    summary = property(lambda s: s.root / "summary.json")
    samples = property(lambda s: s.root / "samples")
    checkpoints = property(lambda s: s.root / "checkpoints")
    lora = property(lambda s: s.root / "lora")

    fingerprint = property(lambda s: s.root / "fingerprint.json")

    def holds_run(self) -> bool:
        return self.config.exists() or self.checkpoints.exists() or self.summary.exists()

    def _foreign_entries(self) -> list[str]:
        """Entries of an existing folder that no vfeedback run made: anything but the empty
        samples/ and checkpoints/ a run creates first."""
        out = []
        for p in sorted(self.root.iterdir()):
            if p.name in ("samples", "checkpoints") and p.is_dir() and not any(p.iterdir()):
                continue
            out.append(p.name)
        return out

    def _killed_before_start(self) -> bool:
        """Only the empty samples/ and checkpoints/ a run makes first (it was stopped before it
        saved its config): resuming it is starting it."""
        return self.root.is_dir() and not self.config.exists() and not self._foreign_entries()

    def check(self, resume: bool) -> None:
        """Every refusal :meth:`prepare` makes, creating nothing: a path that is empty, the
        filesystem root or the home folder; a file; a folder holding someone's own files; an
        earlier run without ``--resume``; ``--resume`` without a run and its saved config.yaml;
        a place that cannot be written."""
        raw = str(self.root)
        if not raw.strip() or raw == ".":
            raise UserError(f"output_dir: {raw!r} is empty or the current folder; give a folder for this run, e.g. output_dir=runs/my-run")
        try:
            real = self.root.expanduser().resolve()
        except (OSError, RuntimeError) as e:
            raise UserError(f"output_dir: cannot resolve {raw!r} ({e})") from None
        if real == Path(real.anchor):
            raise UserError(f"output_dir: {raw!r} is the filesystem root; give a folder for this run, e.g. output_dir=runs/my-run")
        if real == Path.home().resolve():
            raise UserError(f"output_dir: {raw!r} is the home folder; give a folder of its own for this run, e.g. output_dir=~/runs/my-run")
        if self.root.exists() and not self.root.is_dir():
            raise UserError(f"output_dir: {self.root} exists and is not a folder")
        if self.root.is_dir():
            if not resume and self.holds_run() and self._foreign_entries():
                raise UserError(f"output_dir: {self.root} already holds a run; pass --resume to continue it, or choose another output_dir (output_dir=...)")
            if not self.holds_run() and self._foreign_entries():
                names = self._foreign_entries()
                shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
                raise UserError(f"output_dir: {self.root} is not empty ({len(names)} entries: {shown}) and holds no vfeedback run; "
                                "its files are left alone: choose a new or empty folder")
        if resume:
            if not (self.root.is_dir() and self.holds_run()):
                raise UserError(f"--resume: {self.root} holds no run to resume; drop --resume to start one")
            if not self._killed_before_start():
                self.read_saved_config()
        self._check_writable()

    def _check_writable(self) -> None:
        anc = self.root
        while not anc.exists():
            if anc.parent == anc:
                break
            anc = anc.parent
        try:
            probe = Path(tempfile.mkdtemp(prefix=".vfeedback-write-test-", dir=anc))
            probe.rmdir()
        except OSError as e:
            raise UserError(f"output_dir: cannot write to {self.root} ({e.strerror} in {anc}); choose a writable folder") from None

    def read_saved_config(self) -> dict:
        """The run's saved config.yaml as a mapping; a missing or unreadable one is refused:
        a run is never resumed from the command line's config alone."""
        import yaml

        if not self.config.is_file():
            raise UserError(f"--resume: {self.config} is missing, so what this run was cannot be checked; restore it "
                            "(from a backup or a copy of the run) or start a new output_dir")
        try:
            data = yaml.safe_load(self.config.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"--resume: the run's saved {self.config} is unreadable ({first}); restore it or start a new output_dir") from None
        if not isinstance(data, dict):
            raise UserError(f"--resume: the run's saved {self.config} is not a config mapping; restore it or start a new output_dir")
        return data

    def prepare(self, resume: bool) -> None:
        """Create the folder; refuse to overwrite an earlier run unless resuming, and refuse a
        folder holding anything else. What this call creates is noted for :meth:`discard_created`."""
        self.check(resume)
        self.created: list[Path] = []
        try:
            top = self.root
            while not top.parent.exists() and top.parent != top:
                top = top.parent
            if not self.root.exists():
                self.root.mkdir(parents=True)
                self.created.append(top)
            probe = self.root / f".write-test-{os.getpid()}"
            probe.write_text("")
            probe.unlink()
            for d in (self.samples, self.checkpoints):
                if not d.exists():
                    d.mkdir()
                    self.created.append(d)
        except OSError as e:
            self.discard_created()
            raise UserError(f"output_dir: cannot write to {self.root} ({e.strerror}); choose a writable folder") from None

    def discard_created(self) -> None:
        """Remove what :meth:`prepare` created (after a user error found later): the corrected
        command then starts afresh instead of meeting 'already holds a run'."""
        for p in reversed(getattr(self, "created", [])):
            shutil.rmtree(p, ignore_errors=True)
        self.created = []

    def write_config(self, cfg) -> None:
        """config.yaml (the validated config) and fingerprint.json (what defines the run)."""
        from .config import dump_config

        atomic_write(self.config, dump_config(cfg))
        atomic_write(self.fingerprint, json.dumps({"version": 1, "fields": fingerprint(cfg)}, indent=1, sort_keys=True) + "\n")

    # ---- metrics
    def append_metrics(self, record: dict) -> None:
        with open(self.metrics, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=_json_default) + "\n")
            f.flush()

    def read_metrics(self) -> list[dict]:
        if not self.metrics.exists():
            return []
        out = []
        for line in self.metrics.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a kill mid-write
        return out

    def truncate_metrics(self, last_step: int) -> None:
        """Keep only records up to ``last_step`` (those after a resumed checkpoint are redone)."""
        kept = [r for r in self.read_metrics() if r.get("step", -1) <= last_step]
        atomic_write(self.metrics, "".join(json.dumps(r) + "\n" for r in kept))

    # ---- checkpoints
    def complete_checkpoints(self) -> list[Path]:
        if not self.checkpoints.exists():
            return []
        cks = [p for p in self.checkpoints.iterdir() if p.is_dir() and p.name.startswith("step-") and (p / COMPLETE_MARKER).exists()]
        return sorted(cks, key=lambda p: int(p.name.split("-")[1]))

    def latest_checkpoint(self) -> Optional[Path]:
        cks = self.complete_checkpoints()
        return cks[-1] if cks else None

    def discard_checkpoint(self, p: Path) -> None:
        """Remove a checkpoint folder so that a kill at any moment leaves it whole or gone: it
        is first renamed to a ``.tmp-`` name (atomic), then deleted; ``shutil.rmtree`` in place,
        killed halfway, could leave ``COMPLETE`` beside missing weights."""
        trash = p.with_name(f".tmp-del-{p.name}-{os.getpid()}")
        os.replace(p, trash)
        fsync_dir(p.parent)
        shutil.rmtree(trash, ignore_errors=True)

    def prune(self, keep: int) -> None:
        """Drop old whole checkpoints beyond ``keep`` and any half-written temp folders."""
        cks = self.complete_checkpoints()
        for p in cks[:-keep]:
            self.discard_checkpoint(p)
        for p in self.checkpoints.iterdir():
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True)

    def check_resume_config(self, cfg, resumable: tuple[str, ...]) -> None:
        """Refuse ``--resume`` when what defines the run (:func:`fingerprint`) differs from the
        saved run in a field outside ``resumable`` (dotted prefixes such as ``train.max_steps`` or
        ``log``), listing each. A run saved before fingerprint.json existed is compared on its
        config.yaml (file fields then by path)."""
        if self._killed_before_start():
            return  # nothing was saved yet: the run starts from step 0
        saved_cfg = self.read_saved_config()
        old = None
        if self.fingerprint.is_file():
            try:
                old = json.loads(self.fingerprint.read_text(encoding="utf-8"))["fields"]
            except (OSError, ValueError, KeyError, TypeError):
                old = None
        if old is not None:
            new = fingerprint(cfg)
        else:
            import yaml

            from .config import dump_config

            old = _flatten({k: v for k, v in saved_cfg.items() if k != "output_dir"})
            new = _flatten({k: v for k, v in yaml.safe_load(dump_config(cfg)).items() if k != "output_dir"})
        diffs = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                 if old.get(k) != new.get(k) and not any(k == x or k.startswith(x + ".") for x in resumable)]
        if diffs:
            allowed = " and ".join(x if "." in x else f"{x}.*" for x in resumable)
            raise UserError(
                f"--resume: the config differs from the run's saved {self.config} in fields that cannot change mid-run:\n  "
                + "\n  ".join(diffs) + f"\n(only {allowed} may change; start a new output_dir otherwise)"
            )

    def write_summary(self, summary: dict) -> None:
        atomic_write(self.summary, json.dumps(summary, indent=2, default=_json_default) + "\n")


def _flatten(d, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def sha256_file(path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _sha256_file(path: Path) -> str:
    return "sha256:" + sha256_file(path)


def _sha256_tree(folder: Path) -> str:
    """One digest of a folder: every file's path relative to it and its contents (hidden files
    included; a renamed, added, removed or edited file changes it, the folder's own path not)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return _sha256_json([[p.relative_to(folder).as_posix(), _sha256_file(p)] for p in files])


def _sha256_json(obj) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(obj, ensure_ascii=False).encode()).hexdigest()


def fingerprint(cfg) -> dict:
    """What defines a run, as flat ``{dotted.field: value}``: the validated config without
    ``output_dir`` (a run folder may move), with every input file replaced by a digest of its
    contents (prompt files: of the prompts read from them; data folders: of every file's relative
    name and contents), so the same file reached by another path matches and an edited one does not."""
    from .config import read_prompts

    data = json.loads(cfg.model_dump_json())
    data.pop("output_dir", None)
    # the speed switches (vfeedback/models/speed.py) change how fast a run computes, not what:
    # a run may resume with them flipped, and a run saved before they existed still resumes.
    # train.optimizer does define the run (its checkpointed state); its default adds nothing, so
    # the fingerprint of an adamw run is what it was before the field existed
    from .models.speed import SWITCHES

    for k in SWITCHES:
        (data.get("model") or {}).pop(k, None)
    if (data.get("train") or {}).get("optimizer") == "adamw":
        data["train"].pop("optimizer")
    pr = data["prompts"]
    for name in ("train", "eval"):
        if isinstance(pr.get(name), str):
            pr[name] = {"prompts": _sha256_json(read_prompts(pr[name], f"prompts.{name}"))}
    ic = data.get("itercomp", {})
    for cat, spec in list(ic.get("prompts", {}).items()):
        if isinstance(spec, str) and Path(spec).is_file():
            ic["prompts"][cat] = {"prompts": _sha256_json(read_prompts(spec, f"itercomp.prompts.{cat}"))}
    d3 = data.get("d3po", {})
    if d3.get("file") and Path(d3["file"]).is_file():
        d3["file"] = {"contents": _sha256_file(Path(d3["file"]))}
    pre = (data.get("refl") or {}).get("pretrain") or {}
    if pre.get("data") and Path(pre["data"]).is_file():
        pre["data"] = {"contents": _sha256_file(Path(pre["data"]))}
    elif pre.get("data") and Path(pre["data"]).is_dir():
        pre["data"] = {"contents": _sha256_tree(Path(pre["data"]))}
    ip = (data.get("model") or {}).get("ip_adapter")
    if ip:
        ip["reference"] = [{"contents": _sha256_file(Path(r))} if Path(r).is_file() else r for r in ip["reference"]]
    return _flatten(data)


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.item() if o.numel() == 1 else o.tolist()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, float) and not math.isfinite(o):
        return None
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ---- images


def save_grid(images: torch.Tensor, path: Path, captions: Optional[Sequence[str]] = None, ncol: Optional[int] = None,
              row_labels: Optional[Sequence[str]] = None, cell: int = 160) -> Path:
    """Save ``(N,3,H,W)`` images in [0,1] as one PNG, upscaled (nearest) to ``cell`` px, with an
    optional caption under each image and a label left of each row."""
    from PIL import Image, ImageDraw, ImageFont

    from rewards.images import to_pil

    pil = to_pil(images)
    n = len(pil)
    ncol = ncol or min(n, 8)
    nrow = math.ceil(n / ncol)
    cap_h = 28 if captions else 0
    lab_w = 90 if row_labels else 0
    font = ImageFont.load_default()
    W, H = lab_w + ncol * (cell + 4) + 4, nrow * (cell + cap_h + 4) + 4
    canvas = Image.new("RGB", (W, H), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, im in enumerate(pil):
        r, c = divmod(i, ncol)
        x, y = lab_w + 4 + c * (cell + 4), 4 + r * (cell + cap_h + 4)
        canvas.paste(im.resize((cell, cell), Image.NEAREST), (x, y))
        if captions:
            text = captions[i]
            lines = [text[:26], text[26:52]] if len(text) > 26 else [text]
            for k, line in enumerate(lines):
                draw.text((x, y + cell + 2 + 12 * k), line, fill=(0, 0, 0), font=font)
    if row_labels:
        for r, lab in enumerate(row_labels[:nrow]):
            draw.text((4, 4 + r * (cell + cap_h + 4) + cell // 2), lab, fill=(0, 0, 0), font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp.png")
    canvas.save(tmp)
    os.replace(tmp, path)
    return path


def plot_curves(records: Sequence[dict], path: Path, keys: Sequence[str] = ("reward_mean", "loss"), evals: Sequence[dict] = ()) -> Optional[Path]:
    """Training reward (and loss) against step, with eval rewards as markers; PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(k in r and r[k] is not None for r in records)]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5), squeeze=False)
    for ax, k in zip(axes[0], keys):
        pts = [(r["step"], r[k]) for r in records if r.get(k) is not None and math.isfinite(r[k])]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, lw=1, alpha=0.5, label=f"train {k}")
            if len(ys) >= 5:
                w = max(2, len(ys) // 10)
                sm = [sum(ys[max(0, i - w + 1): i + 1]) / len(ys[max(0, i - w + 1): i + 1]) for i in range(len(ys))]
                ax.plot(xs, sm, lw=2, label=f"{k} (moving avg)")
        if k == "reward_mean" and evals:
            ax.plot([e["step"] for e in evals], [e["eval_reward"] for e in evals], "o-", color="black", label="eval reward")
        ax.set_xlabel("step")
        ax.set_title(k)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name("." + path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path
