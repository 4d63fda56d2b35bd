"""The probe panel of the D3PO ranking app: does the model the person is teaching change?

Fixed probe captions (``rank.probe_prompts``) x fixed seeds (``rank.probe_seeds``) are rendered
by the base model once (``OUT/rank/probes/``) and by the current model (base + the newest
update's LoRA) after every background update (``OUT/updates/update-NNN/probes/``), with the
same initial latent and DDIM noise per probe, so the two columns differ only by the update. A
held-out judge (``rank.probe_reward``, e.g. ``shapes_judge_heldout``) scores every probe image;
its mean P(match) and match rate (P > 0.5) per update are the curve the app shows. It is a check
on the person's answers, never trained on and never what the person is asked to optimise.

The rendering after an update runs in the update's own subprocess (``python -m
vfeedback.app.probes UPDATE_CONFIG``: ``vfeedback train`` on the labels, then the probes), so
answers are never blocked by it.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

log = logging.getLogger(__name__)

PROBE_DIR = "probes"  # under OUT/rank/ (base) and under each update's folder (current)
MATCH = 0.5  # P(match) above this counts as a match (the judges' decision threshold, docs/world.md)


def probe_list(cfg) -> list[tuple[str, int]]:
    """``[(caption, seed)]``: every probe caption x every probe seed, caption-major."""
    return [(p, int(s)) for p in cfg.rank.probe_prompts for s in cfg.rank.probe_seeds]


def render_probes(model, cfg) -> torch.Tensor:
    """The probe images of ``model`` (whatever weights it holds): ``(P*S, 3, H, W)`` in [0, 1],
    in :func:`probe_list` order. Each probe's x_T and DDIM noise come from its seed alone
    (``derive_seed(cfg.seed, "rank-probe-latent"/"rank-probe-noise", seed)``), the sampler is the
    config's, so the same model gives the same pixels in any process."""
    from ..algorithms.d3po import sample_items
    from ..engine import derive_seed
    from ..feedback.preferences import PreferenceItem

    probes = probe_list(cfg)
    s = cfg.sampling
    items = [PreferenceItem(latent_seed=derive_seed(cfg.seed, "rank-probe-latent", seed),
                            noise_seed=derive_seed(cfg.seed, "rank-probe-noise", seed)) for _, seed in probes]
    with torch.no_grad():
        cond = model.encode_prompt([p for p, _ in probes], [cfg.prompts.negative] * len(probes), cfg=s.guidance_scale > 1)
        out = sample_items(model, cond, items, num_steps=s.steps, guidance_scale=s.guidance_scale, eta=s.eta)
    return out.images.float().cpu().clamp(0, 1)


def score_probes(cfg, images: torch.Tensor) -> list[float]:
    """P(image matches its probe caption) of each probe image under ``rank.probe_reward``, in [0, 1]."""
    import rewards

    from ..errors import UserError

    try:
        judge = rewards.load(cfg.rank.probe_reward)
    except rewards.RewardError as e:
        raise UserError(f"rank.probe_reward: {e}") from None
    with torch.no_grad():
        return [float(x) for x in judge(images, [p for p, _ in probe_list(cfg)])]


def summarise(scores: Sequence[float]) -> dict:
    """``{"mean": mean P(match), "match_rate": share with P > 0.5, "n": count}`` (NaN scores skipped)."""
    ok = [x for x in scores if x == x]
    n = len(ok)
    return {"mean": sum(ok) / n if n else None, "match_rate": sum(x > MATCH for x in ok) / n if n else None, "n": n}


def save_probes(folder: Path, cfg, images: torch.Tensor, **extra) -> dict:
    """Write ``folder/probe-K.png`` per probe and ``folder/probes.json`` (prompts, seeds, scores,
    summary, ``extra``); the JSON last, so its presence means the folder is complete."""
    from rewards.images import to_pil

    from ..rundir import atomic_write

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    scores = score_probes(cfg, images)
    for k, im in enumerate(to_pil(images)):
        im.save(folder / f"probe-{k}.png")
    data = {"prompts": [p for p, _ in probe_list(cfg)], "seeds": [s for _, s in probe_list(cfg)], "scores": scores,
            "reward": cfg.rank.probe_reward, **summarise(scores), **extra}
    atomic_write(folder / "probes.json", json.dumps(data, indent=1))
    return data


def read_probes(folder: Path) -> Optional[dict]:
    """The ``probes.json`` of a finished probe folder, or None."""
    p = Path(folder) / "probes.json"
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def ensure_base(cfg, root: Path, model) -> dict:
    """The base model's probes (rendered once into ``OUT/rank/probes/``; read back on a restart)."""
    folder = Path(root) / "rank" / PROBE_DIR
    data = read_probes(folder)
    if data is not None and data.get("prompts") == [p for p, _ in probe_list(cfg)] and data.get("seeds") == [s for _, s in probe_list(cfg)]:
        return data
    return save_probes(folder, cfg, render_probes(model, cfg), update=0, labels=0)


def panel_image(root: Path, cfg, update: Optional[int], size: int = 72):
    """A PIL image: one row per probe caption, the base model's images (one per seed) on the left,
    the current model's (update ``update``; None: none yet) on the right, each with its P(match)."""
    from PIL import Image, ImageDraw, ImageFont

    root = Path(root)
    seeds = list(cfg.rank.probe_seeds)
    prompts = list(cfg.rank.probe_prompts)
    base = read_probes(root / "rank" / PROBE_DIR) or {}
    cur_dir = root / "updates" / f"update-{update:03d}" / PROBE_DIR if update else None
    cur = (read_probes(cur_dir) if cur_dir else None) or {}
    try:
        font = ImageFont.load_default(size=12)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    ns, gap, cap_h, head = len(seeds), 10, 16, 18
    w = 2 * ns * size + gap
    h = head + len(prompts) * (cap_h + size + 14)
    im = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(im)
    d.text((2, 2), "base model", fill=(0, 0, 0), font=font)
    d.text((ns * size + gap + 2, 2), f"after update {update}" if cur else "current (no update yet)", fill=(0, 0, 0), font=font)
    for r, prompt in enumerate(prompts):
        y = head + r * (cap_h + size + 14)
        d.text((2, y), prompt, fill=(40, 40, 40), font=font)
        for side, (folder, data) in enumerate(((root / "rank" / PROBE_DIR, base), (cur_dir, cur))):
            for j in range(ns):
                k = r * ns + j
                x = side * (ns * size + gap) + j * size
                if data and folder is not None and (folder / f"probe-{k}.png").exists():
                    tile = Image.open(folder / f"probe-{k}.png").convert("RGB").resize((size - 4, size - 4), Image.NEAREST)
                    im.paste(tile, (x + 2, y + cap_h))
                    sc = data["scores"][k]
                    d.text((x + 2, y + cap_h + size - 2), f"P={sc:.2f}", fill=(0, 120, 0) if sc > MATCH else (160, 0, 0), font=font)
                else:
                    d.rectangle([x + 2, y + cap_h, x + size - 3, y + cap_h + size - 5], outline=(200, 200, 200))
    return im


def curve_png(points: list[dict], path: Path, reward: str) -> Path:
    """A small matplotlib plot of the probe score per update (x: labels trained on), to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [p["labels"] for p in points]
    fig, ax = plt.subplots(figsize=(4.2, 2.4), dpi=100)
    ax.plot(xs, [p["mean"] for p in points], "o-", color="#e63c1e", label="mean P(match)")
    ax.plot(xs, [p["match_rate"] for p in points], "s--", color="#3060c0", label="match rate (P>0.5)", alpha=0.8)
    ax.set_ylim(0, 1)
    ax.set_xlabel("labels trained on (0 = base model)", fontsize=8)
    ax.set_title(f"check (not the objective): {reward}", fontsize=8, loc="right")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7, loc="upper left")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def _save(fig, path) -> Path:
    """Write ``fig`` to ``path`` through a temp file (a reader never sees half a PNG), close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return Path(path)


def zo_curve_png(points: list[dict], path: Path, reward: str) -> Path:
    """zo_ranksgd: a small plot of the check's P(match) of the current image per round, to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 2.2), dpi=100)
    ax.plot([p["round"] for p in points], [p["score"] for p in points], "o-", color="#e63c1e", markersize=3)
    ax.set_ylim(0, 1)
    ax.set_xlabel("round (0 = start image)", fontsize=8)
    ax.set_title(f"check (not the objective): {reward}", fontsize=8, loc="right")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def run_update(cfg_path: str) -> int:
    """The body of a background update with probes: ``vfeedback train`` on the update config, then
    the current model (base + the LoRA just trained) renders and scores the probes into
    ``UPDATE_DIR/probes/``. Returns the exit code (train's, or 1 when the probes fail)."""
    from ..cli import main as cli_main
    from ..config import load_config
    from ..models.lora import load_lora_into
    from ..algorithms.zo_ranksgd_diffusion import load_model_for

    rc = cli_main(["train", cfg_path])
    if rc != 0:
        return rc
    cfg = load_config(cfg_path)
    out = Path(cfg.output_dir)
    model = load_model_for(cfg)
    load_lora_into(model, out / "lora")
    n = int(out.name.rsplit("-", 1)[1])
    save_probes(out / PROBE_DIR, cfg, render_probes(model, cfg), update=n)
    log.info("probes of update %d written to %s", n, out / PROBE_DIR)
    return 0


class JudgePerson:
    """A scripted person who prefers images that match the caption (the rank app's tests and
    ``bench/rank_d3po_probes.py``): ranks the shown images by the training judge ``shapes_judge``'s
    P(match), picks those clearly better than the worst (by more than ``margin``), best first,
    and answers Tie (an empty list) when none is."""

    def __init__(self, margin: float = 0.1):
        import rewards

        self.judge = rewards.load("shapes_judge")
        self.margin = margin

    def choose(self, images: list, prompt: str) -> list[int]:
        """Indices of ``images`` (PIL images) picked for ``prompt``, best first."""
        from torchvision.transforms.functional import to_tensor

        x = torch.stack([to_tensor(im.convert("RGB")) for im in images])
        with torch.no_grad():
            p = self.judge(x, [prompt] * len(images)).tolist()
        worst = min(p)
        return [i for i in sorted(range(len(p)), key=lambda i: -p[i]) if p[i] - worst > self.margin]


if __name__ == "__main__":  # python -m vfeedback.app.probes UPDATE_CONFIG (started by start_d3po_update)
    logging.basicConfig(level=logging.INFO)
    sys.exit(run_update(sys.argv[1]))

