"""The D3PO ranking app's probe check under a scripted person, driven through the backend the
page calls (docs/rank_app.md, "What N answers do").

A scripted person answers ``--labels`` groups of the D3PO app: it ranks the images the page
would show (``Backend.view().images``, the upscaled PNGs) by the training judge ``shapes_judge``
P(match), picks those more than ``--margin`` above the worst, best first, and answers Tie when
none is (``vfeedback.app.probes.JudgePerson``, the tests' scripted person). Every answer goes through
``Backend.answer`` (the store, the export, ``UpdateRunner.maybe_start`` and the background
``start_d3po_update`` subprocess, exactly as from the page). The person waits for each update
to finish before the next answer, so update k trains on exactly ``k * labels_per_update`` labels
and the result does not depend on the machine's speed (a person answering on the page while an
update runs can fold more labels into the next update). The check is the held-out judge
``shapes_judge_heldout`` on the probe images, as the probe panel shows it.

    OMP_NUM_THREADS=1 python bench/rank_d3po_probes.py --seed 0 --out runs/bench-rank-d3po/s0 \\
        --json bench/results/rank_d3po_probes.json train.lr=1e-3

Overrides (``key=value``) go to the config as for ``vfeedback rank``. Update CPU seconds are
``resource.getrusage(RUSAGE_CHILDREN)`` around each update's wait (start, model load, training,
grids, win rate, probes).
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _children_cpu() -> float:
    """CPU seconds used by finished child processes (the background update runs)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run(config: Path, out: Path, seed: int, labels: int, margin: float, overrides: list[str]) -> dict:
    from vfeedback.app.backend import open_backend
    from vfeedback.config import load_config

    cfg = load_config(config, [f"output_dir={out}", f"seed={seed}", *overrides])
    from vfeedback.app.probes import JudgePerson

    person = JudgePerson(margin)
    b = open_backend(cfg)
    answers, updates = [], []
    try:
        base = b.probe_status()["points"][0]
        print(f"base probe mean {base['mean']:.3f} match {base['match_rate']:.3f}", flush=True)
        while b.updates.labels() < labels:
            v = b.view()
            picks = person.choose(v.images, v.prompt)
            b.answer(v.round_id, "rank" if picks else "tie", picks)
            answers.append({"round": v.round, "prompt": v.prompt, "kind": "rank" if picks else "tie", "picks": picks})
            n = b.updates.running()
            if n is not None:
                c0, t0 = _children_cpu(), time.time()
                b.updates.wait(timeout=3600)
                u = b.updates._updates()[n]
                summ = json.loads((b.updates._dir(n) / "summary.json").read_text()) if u["state"] == "finished" else {}
                rec = {"n": n, "labels": u.get("labels"), "state": u["state"], "cpu_s": round(_children_cpu() - c0, 1),
                       "wall_s": round(time.time() - t0, 1), "probe_mean": u.get("probe_mean"),
                       "probe_match_rate": u.get("probe_match_rate"), "heldout_win_rate": summ.get("heldout_win_rate")}
                updates.append(rec)
                print(json.dumps(rec), flush=True)
        points = b.probe_status()["points"]
    finally:
        b.close()
    try:
        shown = str(Path(config).resolve().relative_to(ROOT))
    except ValueError:
        shown = str(config)
    return {"config": shown, "overrides": overrides, "seed": seed, "labels": labels, "margin": margin,
            "answers": answers, "updates": updates, "points": points,
            "probe_means": [round(p["mean"], 4) for p in points]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "rank" / "shapes-d3po.yaml")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--labels", type=int, default=12, help="labels with a preference to give (ties do not count)")
    ap.add_argument("--margin", type=float, default=0.1, help="the person picks images this far above the worst")
    ap.add_argument("--out", type=Path, required=True, help="a new folder for the app's run")
    ap.add_argument("--json", type=Path, help="append the result to this JSON list")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    a = ap.parse_args(argv)
    res = run(a.config, a.out, a.seed, a.labels, a.margin, a.overrides)
    print(json.dumps({k: res[k] for k in ("overrides", "seed", "probe_means")}), flush=True)
    if a.json:
        prev = json.loads(a.json.read_text()) if a.json.exists() else []
        a.json.write_text(json.dumps(prev + [res], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
