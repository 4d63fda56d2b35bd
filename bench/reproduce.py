"""Measured figures of README.md and docs/, each rerun from its command and checked against the
committed JSON it came from (``bench/results/figures/<name>.json``).

    make reproduce                                   # = python bench/reproduce.py: rerun every figure, check
    python bench/reproduce.py --only quickstart      # one figure
    python bench/reproduce.py --only quickstart --update   # rerun and rewrite its committed JSON + the docs
    python bench/reproduce.py --docs                 # rewrite the docs' figure blocks from the JSON files
    python bench/reproduce.py --check-docs           # exit 1 if a doc's figure block is not what its JSON renders

A figure's text in README.md / docs/ sits between ``<!-- figure:NAME -->`` and
``<!-- /figure:NAME -->`` and is generated from its JSON (``--docs``), never typed; the test
suite checks that every block matches its JSON. A rerun fails, naming the figure and the value,
when a value falls outside the noise band the JSON (and the rendered text) states for it.

The bands are our choice: a rerun with the same seed on the same software is bit-identical on
one machine; another CPU (thread count, BLAS kernels) changes the last float bits, which 40
training steps can carry into the eval grid's mean. Wall-clock times are reported, never checked.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "figures"


def _f(v: float) -> str:
    return f"{v:.3f}"


def _render_quickstart(r: dict) -> str:
    m, b = r["measured"], r["band"]
    mins, secs = divmod(round(m["wall_time_s"]), 60)
    return (
        f"Measured (`{r['command']}`, {r['machine']}, training {mins} min {secs:02d} s): "
        f"training judge {_f(m['eval_reward_before'])} → {_f(m['eval_reward_after'])}, held-out judge "
        f"{_f(m['eval_shapes_judge_heldout_before'])} → {_f(m['eval_shapes_judge_heldout_after'])} on 8 held-out "
        f"captions × 2 seeds; the exported LoRA, reloaded into a fresh pipeline by the run itself, scores "
        f"{_f(m['eval_reward_exported'])} / {_f(m['eval_shapes_judge_heldout_exported'])}. "
        f"`make reproduce` reruns it and fails outside ±{b['eval_reward_after']} on each score "
        f"(source: `bench/results/figures/quickstart.json`)."
    )


ITERCOMP_CATS = ("spatial", "attribute", "nonspatial")


def _read_itercomp(out, cats=ITERCOMP_CATS) -> dict:
    """The IterComp summary flattened: composition per model, reward-model val accuracy and the
    inner ReFL's reward-model reward per iteration."""
    s = json.loads((Path(out) / "summary.json").read_text())
    got = {"wall_time_s": s["wall_time_s"]}
    for h in s["composition_history"]:
        got["composition_" + ("base" if h["after_iteration"] is None else f"iter{h['after_iteration']}")] = h["all"]
    for r in s["reward_model_accuracy"]:
        for c in cats:
            got[f"rm_val_iter{r['iteration']}_{c}"] = r[c]["val"]
    for r in s["per_iteration"]:
        got[f"refl_before_iter{r['iteration']}"] = r["refl"]["eval_reward_before"]
        got[f"refl_after_iter{r['iteration']}"] = r["refl"]["eval_reward_after"]
    return got


def _render_itercomp_tiny(r: dict) -> str:
    m, b = r["measured"], r["band"]
    its = [0, 1]
    rows = [
        "| | iteration 0 | iteration 1 |",
        "|---|---|---|",
        "| reward-model val pair accuracy (" + " / ".join(ITERCOMP_CATS) + ") | "
        + " | ".join(" / ".join(f"{m[f'rm_val_iter{i}_{c}']:.2f}" for c in ITERCOMP_CATS) for i in its) + " |",
        "| inner ReFL, reward-model reward before -> after | "
        + " | ".join(f"{m[f'refl_before_iter{i}']:.2f} -> {m[f'refl_after_iter{i}']:.2f}" for i in its) + " |",
        f"| composition oracle of the model (base {m['composition_base']:.4f}) | "
        + " | ".join(f"{m[f'composition_iter{i}']:.4f}" for i in its) + " |",
    ]
    return (f"Measured (`{r['command']}`, {r['machine']}, {round(m['wall_time_s'])} s; source "
            f"`bench/results/figures/itercomp_tiny.json`; `make reproduce` bands: composition "
            f"±{b['composition_iter1']}, pair accuracy ±{b['rm_val_iter1_spatial']}, ReFL reward ±{b['refl_after_iter1']}):\n\n"
            + "\n".join(rows))


def _rm_acc_span(m: dict, cats) -> str:
    """"lo–hi" of the reward models' validation pair accuracies over both iterations and ``cats``."""
    accs = [m[f"rm_val_iter{i}_{c}"] for i in (0, 1) for c in cats]
    return f"{min(accs):.2f}–{max(accs):.2f}"


def _render_itercomp_tiny_short(r: dict) -> str:
    m = r["measured"]
    return (f"* `configs/itercomp/tiny.yaml`: reward-model validation pair accuracy {_rm_acc_span(m, ITERCOMP_CATS)} per\n"
            f"  category; the composition score {m['composition_base']:.4f} (base) → {m['composition_iter0']:.4f} → "
            f"{m['composition_iter1']:.4f} over two iterations\n  (`bench/results/figures/itercomp_tiny.json`; not a robust "
            f"rise: with random tiny models the gallery has no\n  member better than the base; see the doc).")


ITERCOMP_SHAPES_CATS = ("attribute", "spatial", "count")


def _read_itercomp_shapes(out) -> dict:
    """IterComp on the shapes world: :func:`_read_itercomp` plus the held-out judge on each inner
    ReFL run's eval grid (``iter-K/refl/summary.json``)."""
    got = _read_itercomp(out, ITERCOMP_SHAPES_CATS)
    for k in (0, 1):
        r = json.loads((Path(out) / f"iter-{k}" / "refl" / "summary.json").read_text())
        got[f"heldout_before_iter{k}"] = r.get("eval_shapes_judge_heldout_before")
        got[f"heldout_after_iter{k}"] = r.get("eval_shapes_judge_heldout_after")
    return got


def _render_itercomp_shapes(r: dict) -> str:
    m = r["measured"]
    acc = lambda i: " / ".join(f"{m[f'rm_val_iter{i}_{c}']:.2f}" for c in ITERCOMP_SHAPES_CATS)
    mins = round(m["wall_time_s"] / 60)
    return (f"Measured through each refined model's exported LoRA (`{r['command']}` after `make quickstart`, "
            f"{r['machine']}, {mins} min; source `bench/results/figures/itercomp_shapes.json`; not rerun by "
            f"`make reproduce`: `python bench/reproduce.py --only itercomp_shapes` reruns and checks it):\n\n"
            "| | value |\n|---|---|\n"
            f"| reward-model val pair accuracy ({' / '.join(ITERCOMP_SHAPES_CATS)}), iteration 0 | {acc(0)} |\n"
            f"| the same, iteration 1 | {acc(1)} |\n"
            f"| composition (training judge on the gallery prompts): base -> iter 0 -> iter 1 | "
            f"{m['composition_base']:.3f} -> {m['composition_iter0']:.3f} -> {m['composition_iter1']:.3f} |\n"
            f"| held-out judge on the inner ReFL eval grids: base -> iter 0 -> iter 1 | "
            f"{m['heldout_before_iter0']:.3f} -> {m['heldout_after_iter0']:.3f} -> {m['heldout_after_iter1']:.3f} |")


def _render_itercomp_shapes_short(r: dict) -> str:
    m = r["measured"]
    return (f"* `configs/itercomp/shapes.yaml` (tiny:shapes, judge-ranked gallery incl. the quickstart's LoRA,\n"
            f"  after `make quickstart`; every refined model through its exported LoRA): reward-model pair accuracy "
            f"{_rm_acc_span(m, ITERCOMP_SHAPES_CATS)};\n  composition {m['composition_base']:.3f} → {m['composition_iter0']:.3f} → "
            f"{m['composition_iter1']:.3f} across two iterations, held-out judge on the inner ReFL grids "
            f"{m['heldout_before_iter0']:.3f} → {m['heldout_after_iter0']:.3f} → {m['heldout_after_iter1']:.3f}:\n"
            f"  no gain in this world (`bench/results/figures/itercomp_shapes.json`; docs/itercomp.md). Its gallery grid "
            f"(rows: base, CFG 1.5,\n  CFG 8, the quickstart LoRA, after iteration 0, after iteration 1): "
            f"[docs/itercomp_shapes_gallery.png](docs/itercomp_shapes_gallery.png).")


def _read_d3po(out) -> dict:
    s = json.loads((Path(out) / "summary.json").read_text())
    w = s["d3po"]
    return {k: s[k] for k in ("eval_reward_before", "eval_reward_after", "eval_reward_exported", "heldout_win_rate", "wall_time_s")} | {
        "wins": w["wins"], "losses": w["losses"], "ties": w["ties"], "n": w["n"]}


def _render_d3po_tiny(r: dict) -> str:
    m, b = r["measured"], r["band"]
    off = m["heldout_win_rate"] - 0.5
    verdict = ("no measurable effect in this setting" if abs(off) <= b["heldout_win_rate"]
               else "the oracle prefers the tuned model" if off > 0 else "the oracle prefers the base model")
    return (f"* `configs/d3po/tiny.yaml`: held-out win rate of the tuned model over the base, judged by the\n"
            f"  same oracle, {m['heldout_win_rate']:.3f} ({m['wins']} wins / {m['losses']} losses / {m['ties']} ties of {m['n']}); eval reward "
            f"{m['eval_reward_before']:.4f} → {m['eval_reward_after']:.4f}\n  (exported LoRA {m['eval_reward_exported']:.4f}): "
            f"{verdict} (`{r['command']}`, {round(m['wall_time_s'])} s;\n  "
            f"`bench/results/figures/d3po_tiny.json`; `make reproduce` bands: win rate ±{b['heldout_win_rate']}, "
            f"eval reward ±{b['eval_reward_after']}).")


def _render_zo_tiny(r: dict) -> str:
    m, b = r["measured"], r["band"]
    return (f"* `configs/zo_ranksgd/tiny.yaml` (latent refinement, `color` reward as the oracle, line search):\n"
            f"  reward {m['eval_reward_before']:.4f} → {m['eval_reward_after']:.4f} in {round(m['rounds'])} rounds, {round(m['moves'])} moves "
            f"(`{r['command']}`, {round(m['wall_time_s'])} s;\n  `bench/results/figures/zo_ranksgd_tiny.json`; "
            f"`make reproduce` band ±{b['eval_reward_after']}).")


REWARD_SCENE_KINDS = ["attribute", "spatial", "count"] * 2  # make_batch(6, seed=2026, kinds=...) in bench/reward_scores.py
REWARD_PART = {"attribute": "shapes_attribute", "spatial": "shapes_spatial", "count": "shapes_count"}
REWARD_SCENE_NAMES = ["shapes_judge", "shapes_judge_heldout", "shapes_attribute", "shapes_spatial", "shapes_count",
                      "composition_color", "color", "brightness", "saturation"]


def _reward_key_list() -> list[str]:
    keys = []
    for i, kind in enumerate(REWARD_SCENE_KINDS):
        for which in ("caption", "negative"):
            # shapes_spatial / shapes_count are NaN for a caption without a relation / a number
            keys += [f"scene{i}_{which}_{r}" for r in REWARD_SCENE_NAMES
                     if not (r in ("shapes_spatial", "shapes_count") and r != REWARD_PART[kind])]
    return keys + [f"{p}_{r}" for p in ("astronaut", "grace_hopper") for r in ("face_id", "brightness", "saturation")]


def _read_reward_scores(out) -> dict:
    d = json.loads((Path(out) / "scores.json").read_text())
    flat = {}
    for k, row in enumerate(d["scenes"]):
        for r, v in row["scores"].items():
            if v is not None:
                flat[f"scene{k // 2}_{row['which']}_{r}"] = v
        flat[f"scene{k // 2}_{row['which']}_prompt"] = row["prompt"]
    for row in d["photos"]:
        for r, v in row["scores"].items():
            flat[f"{row['image']}_{r}"] = v
    return flat


def _render_reward_scores(r: dict) -> str:
    m = r["measured"]
    lines = ["| scene | prompt | `shapes_judge` | `shapes_judge_heldout` | its part (`shapes_<kind>`) | `composition_color` | `brightness` |",
             "|---|---|---|---|---|---|---|"]
    for i, kind in enumerate(REWARD_SCENE_KINDS):
        for which in ("caption", "negative"):
            k = f"scene{i}_{which}_"
            label = f"{i} ({kind})" if which == "caption" else "″ (hard negative)"
            lines.append(f"| {label} | {r['prompts'][f'{k}prompt']} | {m[k + 'shapes_judge']:.3f} | {m[k + 'shapes_judge_heldout']:.3f} "
                         f"| {m[k + REWARD_PART[kind]]:.3f} | {m[k + 'composition_color']:.3f} | {m[k + 'brightness']:.3f} |")
    return "\n".join(lines) + (
        f"\n\n`face_id` (dlib detector + 128-d embedding, the astronaut photo as the reference person): the astronaut "
        f"{m['astronaut_face_id']:.3f}, Grace Hopper {m['grace_hopper_face_id']:.3f}. Scored through `vfeedback score --json` "
        f"by `{r['command']}` ({r['machine']}; `bench/results/figures/reward_scores.json`, every score in the JSON); "
        f"`make reproduce` fails outside ±{r['band']['scene0_caption_shapes_judge']} on a learned judge's score and "
        f"±{r['band']['scene0_caption_brightness']} on an analytic one.")


#: world_compare's rows, in the order its JSON holds them
WORLD_LABELS = {
    "refl": "ReFL", "refl_half": "ReFL (the quickstart: 40 steps)", "d3po": "D3PO", "d3po_x3": "D3PO",
    "zo_ranksgd": "ZO-RankSGD (LoRA)", "zo_ranksgd_x3": "ZO-RankSGD (LoRA)", "ddpo": "DDPO", "grpo": "GRPO (G = 4, KL 0.01)",
    "raft": "RAFT (online, best of 8)", "diffusion_dpo": "Diffusion-DPO (judge-labelled pairs)",
    "draft_k1": "DRaFT-1", "draft_k2": "DRaFT-2", "draft_k4": "DRaFT-4",
}


def _render_world_compare(r: dict) -> str:
    """The world comparison table from bench/results/world_compare.json (no rerun: about an hour
    of CPU; `make reproduce` does not run it)."""
    b = r["base"]
    n = b["heldout_judge"]["overall"]["n"]
    lines = ["| | judged images | training judge acc | held-out judge acc | held-out change (95% CI) | gap | training time |",
             "|---|---|---|---|---|---|---|",
             f"| base | | {_f(b['train_judge']['overall']['accuracy'])} | {_f(b['heldout_judge']['overall']['accuracy'])} | | | |"]
    up, down = [], []
    for name, m in r["methods"].items():
        label = WORLD_LABELS.get(name, name)
        lo, hi = m["heldout_delta_ci95"]
        d = m["heldout_judge_accuracy"][1] - m["heldout_judge_accuracy"][0]
        (up if lo > 0 else down if hi < 0 else []).append(f"{label} ({m['budget_images']})")
        mins = round(m["wall_time_s"] / 60)
        lines.append(f"| {label} | {m['budget_images']} | {_f(m['train_judge_accuracy'][1])} | {_f(m['heldout_judge_accuracy'][1])} "
                     f"| {d:+.3f} [{lo:+.3f}, {hi:+.3f}] | {m['gap']:+.3f} | {mins} min |")
    verdict = (f"Held-out interval above 0: {', '.join(up) or 'none'}; below 0: {', '.join(down) or 'none'}; "
               f"every other row is within noise.")
    return "\n".join(lines) + (
        f"\n\n{n} held-out captions ({n // 3} per kind), one image each, {r['eval']['sampler']}; the change is the "
        f"held-out judge's accuracy minus the base's with a paired bootstrap interval over captions; `gap` is "
        f"how much more the training judge rose than the held-out one (reward hacking shows as a large "
        f"positive gap). {verdict} Measured by `{r['command']}` ({r['machine']}; `bench/results/world_compare.json`).")


def _render_overopt(r: dict) -> str:
    """The over-optimisation table at one budget from its bench JSON (bench/overoptimisation.py's
    own ``table``: `--report` prints the same; the cells take hours of CPU, not rerun here)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # the bench scripts import each other this way
    from overoptimisation import table

    done = sum(c.get("status") == "done" for c in r["cells"])
    return table(r) + (f"\n\n{done} cells at {r['budget']} judged images; each: `proxy 0 change / gold change ± paired "
                          f"standard error over the measurement images (KL to the base, nats per image)`, "
                          f"**falls** where gold dropped by more than two standard errors.")


#: figures rendered from a committed bench JSON but not rerun by `make reproduce` (too slow):
#: name -> (JSON file, {doc: render})
DOC_TABLES: dict[str, tuple[Path, dict]] = {
    "world_compare": (ROOT / "bench" / "results" / "world_compare.json",
                      {"README.md": _render_world_compare, "docs/world.md": _render_world_compare}),
    "overoptimisation": (ROOT / "bench" / "results" / "overoptimisation.json",
                         {"README.md": _render_overopt, "docs/overoptimisation.md": _render_overopt}),
    "overoptimisation_b640": (ROOT / "bench" / "results" / "overoptimisation_b640.json",
                              {"docs/overoptimisation.md": _render_overopt}),
}


#: name -> how to run it and what to keep. ``command`` runs from the repository root with
#: ``{out}`` a fresh temp folder; ``read`` turns that folder into ``{value name: float}``;
#: ``band`` is the allowed |rerun - committed| per checked value; ``docs`` maps each file holding
#: the figure's block to the function that writes it.
FIGURES: dict[str, dict] = {
    "quickstart": {
        "command": "vfeedback train configs/quickstart.yaml output_dir={out}",
        "shown": "make quickstart",
        "read": lambda out: json.loads((Path(out) / "summary.json").read_text()),
        "keys": ["eval_reward_before", "eval_reward_after", "eval_reward_exported", "eval_shapes_judge_heldout_before",
                 "eval_shapes_judge_heldout_after", "eval_shapes_judge_heldout_exported", "wall_time_s"],
        "band": {k: 0.02 for k in ["eval_reward_before", "eval_reward_after", "eval_reward_exported",
                                   "eval_shapes_judge_heldout_before", "eval_shapes_judge_heldout_after",
                                   "eval_shapes_judge_heldout_exported"]},
        "docs": {"README.md": _render_quickstart},
    },
    "itercomp_tiny": {
        "command": "vfeedback train configs/itercomp/tiny.yaml output_dir={out}",
        "shown": "vfeedback train configs/itercomp/tiny.yaml",
        "read": _read_itercomp,
        "keys": ["wall_time_s", "composition_base", "composition_iter0", "composition_iter1",
                 *[f"rm_val_iter{i}_{c}" for i in (0, 1) for c in ITERCOMP_CATS],
                 *[f"refl_{w}_iter{i}" for i in (0, 1) for w in ("before", "after")]],
        # the composition oracle moves by ~0.015 between iterations; a validation pair accuracy
        # is a count over a few pairs; the reward-model reward is an unnormalised hinge score
        "band": {"composition_base": 0.005, "composition_iter0": 0.005, "composition_iter1": 0.005,
                 **{f"rm_val_iter{i}_{c}": 0.2 for i in (0, 1) for c in ITERCOMP_CATS},
                 **{f"refl_{w}_iter{i}": 0.5 for i in (0, 1) for w in ("before", "after")}},
        "docs": {"docs/itercomp.md": _render_itercomp_tiny, "README.md": _render_itercomp_tiny_short},
    },
    "itercomp_shapes": {
        "command": "vfeedback train configs/itercomp/shapes.yaml output_dir={out}",
        "shown": "vfeedback train configs/itercomp/shapes.yaml",
        "slow": True,  # ~15 min on 2 idle cores plus the quickstart's LoRA: only with --only
        "needs": "runs/quickstart/lora",
        "read": _read_itercomp_shapes,
        "keys": ["wall_time_s", "composition_base", "composition_iter0", "composition_iter1",
                 *[f"rm_val_iter{i}_{c}" for i in (0, 1) for c in ITERCOMP_SHAPES_CATS],
                 *[f"heldout_{w}_iter{i}" for i in (0, 1) for w in ("before", "after")]],
        # our choice, not measured by a rerun on another machine: composition is a mean over 24
        # prompts x 16 seeds, the held-out judge over 16 eval images
        "band": {"composition_base": 0.01, "composition_iter0": 0.01, "composition_iter1": 0.01,
                 **{f"heldout_after_iter{i}": 0.03 for i in (0, 1)}},
        "docs": {"docs/itercomp.md": _render_itercomp_shapes, "README.md": _render_itercomp_shapes_short},
    },
    "zo_ranksgd_tiny": {
        "command": "vfeedback train configs/zo_ranksgd/tiny.yaml output_dir={out}",
        "shown": "vfeedback train configs/zo_ranksgd/tiny.yaml",
        "read": lambda out: json.loads((Path(out) / "summary.json").read_text()),
        "keys": ["eval_reward_before", "eval_reward_after", "rounds", "moves", "wall_time_s"],
        # the rankings' order decides each move: a flipped comparison can change the path
        "band": {"eval_reward_before": 0.002, "eval_reward_after": 0.01},
        "docs": {"README.md": _render_zo_tiny},
    },
    "reward_scores": {
        "command": "python bench/reward_scores.py --out {out}",
        "shown": "python bench/reward_scores.py --out DIR",
        "read": _read_reward_scores,
        "keys": _reward_key_list(),
        # the learned judges are float32 CNNs (another CPU's kernels move the last bits, a
        # P near 0.5 moves most); the analytic rewards are means over fixed pixels
        "band": {k: (0.01 if any(j in k for j in ("shapes_", "face_id")) else 1e-4) for k in _reward_key_list()},
        "text": lambda got: {k: v for k, v in got.items() if k.endswith("_prompt")},
        "docs": {"README.md": _render_reward_scores},
    },
    "d3po_tiny": {
        "command": "vfeedback train configs/d3po/tiny.yaml output_dir={out}",
        "shown": "vfeedback train configs/d3po/tiny.yaml",
        "read": _read_d3po,
        "keys": ["eval_reward_before", "eval_reward_after", "eval_reward_exported", "heldout_win_rate", "wins", "losses",
                 "ties", "n", "wall_time_s"],
        # 36 held-out comparisons: one flipped comparison moves the win rate by 1/36
        "band": {"heldout_win_rate": 0.1, "eval_reward_before": 0.005, "eval_reward_after": 0.005, "eval_reward_exported": 0.005},
        "docs": {"README.md": _render_d3po_tiny},
    },
}


def machine() -> str:
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 0)
    return f"{n} CPU cores" if n else platform.machine()


def run_figure(name: str) -> dict:
    """Run the figure's command in a temp folder; return its record (command, measured, band)."""
    spec = FIGURES[name]
    if spec.get("needs") and not (ROOT / spec["needs"]).exists():
        raise SystemExit(f"reproduce: figure {name!r} needs {spec['needs']}: run `make quickstart` first")
    with tempfile.TemporaryDirectory(prefix=f"reproduce-{name}-") as tmp:
        out = Path(tmp) / "out"
        cmd = spec["command"].format(out=out).split()
        if cmd[0] == "vfeedback":
            cmd = [sys.executable, "-m", "vfeedback", *cmd[1:]]
        elif cmd[0] == "python":
            cmd = [sys.executable, *cmd[1:]]
        print(f"[{name}] +", " ".join(cmd), flush=True)
        proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        if proc.returncode != 0:
            raise SystemExit(f"reproduce: figure {name!r}: the command exited {proc.returncode}: {' '.join(cmd)}")
        return record(name, out)


def record(name: str, out: Path) -> dict:
    """The figure's record from a finished output folder of its command."""
    spec = FIGURES[name]
    got = spec["read"](out)
    missing = [k for k in spec["keys"] if got.get(k) is None]
    if missing:
        raise SystemExit(f"reproduce: figure {name!r}: {out} holds no {', '.join(missing)}")
    rec = {"figure": name, "command": spec["shown"], "machine": machine(),
           "measured": {k: got[k] for k in spec["keys"]}, "band": spec["band"]}
    if "text" in spec:  # strings the rendering shows (prompts), kept beside the numbers
        rec["prompts"] = spec["text"](got)
    return rec


def compare(name: str, committed: dict, rerun: dict) -> list[str]:
    """The values outside their band, one line each (empty: the figure reproduces)."""
    bad = []
    for k, band in committed["band"].items():
        a, b = committed["measured"][k], rerun["measured"][k]
        if not abs(a - b) <= band:
            bad.append(f"figure {name!r}: {k} = {b:.4f} on this rerun, {a:.4f} committed (band ±{band})")
    return bad


def block(name: str, text: str) -> str:
    return f"<!-- figure:{name} -->\n{text}\n<!-- /figure:{name} -->"


_BLOCK = re.compile(r"<!-- figure:(?P<name>[\w-]+) -->\n.*?\n<!-- /figure:(?P=name) -->", re.S)


def rendered_docs() -> dict[Path, str]:
    """Every doc with its figure blocks regenerated from the committed JSON files."""
    out = {}
    sources = [(name, RESULTS / f"{name}.json", spec["docs"]) for name, spec in FIGURES.items()]
    sources += [(name, path, docs) for name, (path, docs) in DOC_TABLES.items()]
    for name, path, docs in sources:
        rec = json.loads(path.read_text())
        for doc, render in docs.items():
            p = ROOT / doc
            text = out.get(p, p.read_text())
            if f"<!-- figure:{name} -->" not in text:
                raise SystemExit(f"reproduce: {doc} has no <!-- figure:{name} --> block")
            out[p] = _BLOCK.sub(lambda m: block(name, render(rec)) if m["name"] == name else m[0], text)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help=f"comma-separated figures (of {', '.join(FIGURES)}); default all")
    ap.add_argument("--update", action="store_true", help="write the rerun's values as the committed JSON, then the docs")
    ap.add_argument("--from-run", default="", help="with --update and one --only figure: record an output folder its command "
                    "already wrote instead of rerunning")
    ap.add_argument("--machine", default="", help="with --update: how to describe the machine (default: its CPU count)")
    ap.add_argument("--docs", action="store_true", help="rewrite the docs' figure blocks from the JSON; run nothing")
    ap.add_argument("--check-docs", action="store_true", help="exit 1 if a figure block differs from its JSON; run nothing")
    args = ap.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or [n for n, spec in FIGURES.items() if not spec.get("slow")]
    unknown = [n for n in names if n not in FIGURES]
    if unknown:
        print(f"reproduce: --only: unknown figure(s) {', '.join(unknown)}; choose from {', '.join(FIGURES)}", file=sys.stderr)
        return 2
    if args.docs or args.check_docs:
        stale = [p for p, t in rendered_docs().items() if p.read_text() != t]
        if args.check_docs:
            for p in stale:
                print(f"reproduce: {p.relative_to(ROOT)}: a figure block differs from its JSON (python bench/reproduce.py --docs)", file=sys.stderr)
            return 1 if stale else 0
        for p, t in rendered_docs().items():
            p.write_text(t)
        return 0
    failures = []
    if args.from_run and not (args.update and len(names) == 1):
        print("reproduce: --from-run needs --update and exactly one --only figure", file=sys.stderr)
        return 2
    for name in names:
        rerun = record(name, Path(args.from_run)) if args.from_run else run_figure(name)
        if args.update:
            if args.machine:
                rerun["machine"] = args.machine
            RESULTS.mkdir(parents=True, exist_ok=True)
            (RESULTS / f"{name}.json").write_text(json.dumps(rerun, indent=1) + "\n")
            print(f"[{name}] wrote {RESULTS / f'{name}.json'}")
            continue
        committed = json.loads((RESULTS / f"{name}.json").read_text())
        bad = compare(name, committed, rerun)
        print(f"[{name}] " + ("reproduces" if not bad else "OUT OF BAND"), flush=True)
        failures += bad
    if args.update:
        for p, t in rendered_docs().items():
            p.write_text(t)
    for line in failures:
        print("reproduce:", line, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
