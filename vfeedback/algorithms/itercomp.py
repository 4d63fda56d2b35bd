"""IterComp: Iterative Composition-Aware Feedback Learning from a Model Gallery (Zhang et al.,
arXiv:2410.07171, ICLR 2025; reference github.com/YangLing0818/IterComp).

Each iteration K (Alg. 1 of the paper, the reference's ``data/model_gallery.py`` ->
``train/train_reward_models.py`` -> ``iterative_fl.py`` -> ``data/iterative_expand_gallery.py``):

1. **gallery**: every model of the gallery renders every compositional prompt (per category,
   shared seeds); members rendered in an earlier iteration are reused;
2. **rank**: each (prompt, seed) group of images, one per model, is ranked best first, by the
   category's automatic composition scorer or by a person (ranking JSONL);
3. **reward models**: one head per category learns the rankings with the pairwise loss
   ``-log sigmoid(r_w - r_l)``, refined from the previous iteration's head;
4. **ReFL**: the base model (with the LoRA of the previous iteration) is fine-tuned with
   ReFL against the weighted reward models, ``sum_c w_c relu(margin - r_c)`` as in the
   reference's ``feedback_train.py``, by the shared engine (``Trainer``) into ``iter-K/refl``;
5. **expand**: the refined model (base + that LoRA) joins the gallery for iteration K+1.

Run folder::

    OUT/config.yaml  OUT/summary.json  OUT/metrics.jsonl (one record per iteration)
    OUT/iter-K/gallery/<model>/         renders (images.jsonl, COMPLETE)
    OUT/iter-K/rankings.jsonl           the rankings used (auto: with scores)
    OUT/iter-K/reward_models/<category>.safetensors, report.json
    OUT/iter-K/refl/                    the inner ReFL run folder (config, metrics, samples, lora)
    OUT/iter-K/lora/                    the LoRA after this iteration (diffusers format + trainable.safetensors)
    OUT/iter-K/composition.json         composition scores of every gallery model (the ``reward`` section)
    OUT/iter-K/samples/gallery.png      prompts x models grid
    OUT/iter-K/COMPLETE                 written last; --resume skips complete iterations and redoes
                                        a half-done one (reusing its complete gallery renders)
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Optional

import torch

from ..config import RunConfig, dump_config, read_prompts
from ..errors import RunError, UserError
from ..rundir import COMPLETE_MARKER, RunDir, atomic_write, fsync_dir, save_grid

log = logging.getLogger(__name__)


class IterComp:
    """``algorithm: itercomp``: run by ``vfeedback train`` through :meth:`run_standalone`."""

    @classmethod
    def run_standalone(cls, cfg: RunConfig, resume: bool = False) -> dict:
        return IterCompRun(cfg, resume).run()

    @staticmethod
    def check_config(cfg: RunConfig) -> None:
        """The checks that load no model, run by `validate` and by `train` before anything is
        created (vfeedback/checks.py), so validate accepts exactly what train accepts."""
        run = IterCompRun(cfg, resume=False)
        run.check_static()
        import rewards

        if cfg.itercomp.ranker.kind == "auto":
            info = {i.name: i for i in rewards.available()}
            for c in cfg.itercomp.categories:
                name = cfg.itercomp.ranker.scorers[c].name
                if name not in info:
                    raise UserError(f"itercomp.ranker.scorers.{c}.name: unknown reward {name!r}; available: {', '.join(sorted(info))}")
                if not info[name].installed:
                    raise UserError(f"itercomp.ranker.scorers.{c}.name: {name!r} is not installed: {info[name].install_hint()}")


def heron_tie_levels(n: int, compare, ranking: list[int]) -> list[int]:
    """Rank levels (1 = best; equal = tie) of a HERON-ranked group: walking down the ranking, an
    image the hierarchy cannot tell from the one above it shares that one's level (as
    :func:`~vfeedback.itercomp.ranking.tie_levels` does for scores); images on different levels
    are trained in ranking order."""
    levels = [0] * n
    level = 1
    for pos, i in enumerate(ranking):
        if pos and compare(ranking[pos - 1], i) is not None:
            level += 1
        levels[i] = level
    return levels


def _mean(xs) -> Optional[float]:
    f = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(f) / len(f) if f else None


class IterCompRun:
    def __init__(self, cfg: RunConfig, resume: bool):
        self.cfg, self.resume = cfg, resume
        self.ic = cfg.itercomp
        self.run_dir = RunDir(cfg.output_dir)
        self.root = self.run_dir.root

    # ------------------------------------------------------------------ set-up
    def prompts(self) -> dict[str, list[str]]:
        from ..itercomp import PROMPTS_DIR

        out = {}
        for c in self.ic.categories:
            spec = self.ic.prompts.get(c)
            if spec is None:
                spec = str(PROMPTS_DIR / f"{c}.txt")
            ps = read_prompts(spec, f"itercomp.prompts.{c}")
            out[c] = ps[: self.ic.max_prompts] if self.ic.max_prompts else ps
        return out

    def check_inputs(self) -> None:
        self.check_static()
        if getattr(self, "main", True):  # only the main process scores, ranks and trains reward models
            self.load_scorers()

    def check_static(self) -> None:
        """Finetune mode, the human ranking file, the gallery and the category prompts (no model,
        no scorer weights)."""
        cfg = self.cfg
        if cfg.model.finetune != "lora":
            raise UserError("model.finetune: itercomp adds each iteration's refined model to the gallery as base + LoRA; use finetune: lora")
        if self.ic.ranker.kind == "human" and self.ic.ranker.file and not Path(self.ic.ranker.file).exists():
            raise UserError(f"itercomp.ranker.file: {self.ic.ranker.file} not found")
        from ..itercomp.gallery import entries_from_config

        self.entries = entries_from_config(cfg)
        if len(self.entries) < 2:
            raise UserError("itercomp.gallery: list at least one model besides the base model (model.path); a ranking needs two images")
        self.category_prompts = self.prompts()
        self.by_prompt = {p: c for c, ps in self.category_prompts.items() for p in ps}

    def load_scorers(self) -> None:
        import rewards

        cfg = self.cfg
        try:
            self.eval_reward = rewards.combine([dict(name=r.name, weight=r.weight, **r.options) for r in cfg.reward.rewards], normalize="none")
            self.scorers = {}
            if self.ic.ranker.kind == "heron":
                from ..feedback.heron import build_heron_oracle

                self.heron = build_heron_oracle(cfg, "itercomp.ranker.kind")
            if self.ic.ranker.kind == "auto":
                for c in self.ic.categories:
                    s = self.ic.ranker.scorers[c]
                    self.scorers[c] = rewards.load(s.name, **s.options)
        except rewards.RewardError as e:
            raise UserError(f"itercomp: {e}") from None

    # ------------------------------------------------------------------ several processes
    # Under `--num-processes N` / `accelerate launch` every process runs this loop in step. The
    # main process alone reads the run folder's state, scores, ranks, trains the reward models
    # and writes every file (on_main: its result, or its failure, is broadcast); gallery renders
    # are shared out (ensure_render) and the inner ReFL is the engine's multi-process Trainer.
    def on_main(self, fn):
        """``fn()`` on the main process, its (picklable) result on every process."""
        if self.n == 1:
            return fn()
        from accelerate.utils import broadcast_object_list

        box = [None]
        if self.main:
            try:
                box[0] = ("ok", fn())
            except BaseException as e:
                broadcast_object_list([("error", getattr(e, "exit_code", 130 if isinstance(e, KeyboardInterrupt) else 1))], from_process=0)
                raise
        broadcast_object_list(box, from_process=0)
        status, value = box[0]
        if status == "error":  # the main process reports it; the others leave quietly
            raise SystemExit(value)
        return value

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        from accelerate import PartialState

        t0 = time.time()
        st = PartialState(cpu=self.cfg.train.device == "cpu" or not torch.cuda.is_available())
        self.n, self.proc, self.main = st.num_processes, st.process_index, st.is_main_process
        self.device = st.device if self.n > 1 else None
        self.check_inputs()

        def prepare():
            self.run_dir.prepare(self.resume)
            if self.resume:
                self.run_dir.check_resume_config(self.cfg, ("itercomp.iterations", "log"))
            self.run_dir.write_config(self.cfg)

        self.on_main(prepare)
        records = []
        offset = 0.0
        for k in range(self.ic.iterations):
            d = self.root / f"iter-{k}"
            rec = self.on_main(lambda: json.loads((d / "iteration.json").read_text()) if (d / COMPLETE_MARKER).exists() else None)
            if rec is not None:
                records.append(rec)
                offset = rec.get("wall_time_total_s", offset)
                log.info("iteration %d: complete, skipped", k)
                continue
            t_iter = time.time()
            rec = self.iteration(k, d)
            rec["wall_time_s"] = round(time.time() - t_iter, 2)
            rec["wall_time_total_s"] = round(offset + (time.time() - t0), 2)
            records.append(rec)

            def finish():
                atomic_write(d / "iteration.json", json.dumps(rec, indent=1, default=str))
                atomic_write(d / COMPLETE_MARKER, "")
                fsync_dir(d)
                self.run_dir.append_metrics(_metrics(rec))
                self.write_summary(records, offset + (time.time() - t0))

            self.on_main(finish)
        return self.on_main(lambda: self.write_summary(records, offset + (time.time() - t0)))

    def gallery_entries(self, k: int):
        """Configured gallery + the refined models of iterations before k."""
        from ..itercomp.gallery import GalleryEntry

        out = list(self.entries)
        for j in range(k):
            out.append(GalleryEntry(f"itercomp-iter{j}", self.cfg.model.path, self.cfg.model.family, str(self.root / f"iter-{j}" / "lora"),
                                    guidance_scale=self.cfg.itercomp.gallery_guidance_scale))
        return out

    def items(self) -> list[tuple[str, int, str]]:
        return [(c, i, p) for c, ps in self.category_prompts.items() for i, p in enumerate(ps)]

    def ensure_render(self, entry, d: Path) -> Path:
        from ..itercomp.gallery import find_render, render

        folder = self.on_main(lambda: find_render(self.root, entry.name))
        if folder is not None:
            return folder
        folder = d / "gallery" / entry.name
        items, seeds, bs = self.items(), list(self.ic.seeds), self.ic.gallery_batch_size
        if self.main:
            log.info("gallery: rendering %s (%d prompts x %d seeds, %d processes)", entry.name, len(items), len(seeds), self.n)
        if self.n == 1:
            render(entry, items, seeds, folder, self.cfg, batch_size=bs)
            return folder
        # shared out in units of whole UNet batches: render() draws the (prompt, seed) jobs of
        # its items in batches of bs, so a unit of lcm(bs, S) / S prompts (S seeds) is a whole
        # number of batches, and every image comes from the same batch as in a 1-process run.
        # Unit u goes to process u % N, into a part folder; the main process merges them.
        per = math.lcm(bs, len(seeds)) // len(seeds)
        units = [items[j : j + per] for j in range(0, len(items), per)]
        mine = [it for u, unit in enumerate(units) if u % self.n == self.proc for it in unit]
        parts = d / ".gallery-parts" / entry.name
        self.on_main(lambda: shutil.rmtree(parts, ignore_errors=True))
        if mine:
            render(entry, mine, seeds, parts / str(self.proc), self.cfg, batch_size=bs, device=self.device)
        from accelerate import PartialState

        PartialState().wait_for_everyone()  # every part written before the main process merges
        self.on_main(lambda: self._merge_parts(entry, parts, folder, items, seeds))
        return folder

    def _merge_parts(self, entry, parts: Path, folder: Path, items, seeds) -> None:
        """The processes' part renders -> one gallery folder, records in the 1-process order."""
        from ..itercomp.gallery import read_render

        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        recs = {}
        for part in sorted(p for p in parts.iterdir() if p.is_dir()):
            if not (part / COMPLETE_MARKER).exists():
                raise RunError(f"gallery: the render part {part} is incomplete")
            for r in read_render(part):
                os.replace(part / r["image"], folder / r["image"])
                recs[(r["category"], r["prompt"], r["seed"])] = r
        order = [recs[(c, p, s)] for (c, _, p) in items for s in seeds]
        atomic_write(folder / "images.jsonl", "".join(json.dumps(r) + "\n" for r in order))
        atomic_write(folder / "model.json", json.dumps(entry.to_dict(), indent=1))
        atomic_write(folder / COMPLETE_MARKER, "")
        fsync_dir(folder)
        shutil.rmtree(parts, ignore_errors=True)

    def iteration(self, k: int, d: Path) -> dict:
        from ..itercomp.gallery import GalleryEntry

        self.on_main(lambda: self._reset(k, d))
        entries = self.gallery_entries(k)
        # 1. gallery (every process renders its share)
        renders = {e.name: self.ensure_render(e, d) for e in entries}
        # 2. rank, 3. reward models (main process)
        pre = self.on_main(lambda: self._rank_and_learn(k, d, entries, renders))
        # 4. ReFL (the engine's Trainer on every process)
        refl_summary = self.refl(k, d)
        # 5. expand: render the refined model (next iteration's gallery member; this one's "after")
        new = GalleryEntry(f"itercomp-iter{k}", self.cfg.model.path, self.cfg.model.family, str(d / "lora"),
                           guidance_scale=self.cfg.itercomp.gallery_guidance_scale)
        folder = self.ensure_render(new, d)
        return self.on_main(lambda: self._after(k, d, entries, renders, new, folder, pre, refl_summary))

    def _reset(self, k: int, d: Path) -> None:
        if d.exists():  # half done: redo it, keeping complete gallery renders and a person's rankings
            log.info("iteration %d: incomplete, redoing it", k)
            keep = {"gallery"} | ({"rankings.jsonl"} if self.ic.ranker.kind == "human" else set())
            for child in d.iterdir():
                if child.name in keep:
                    continue
                shutil.rmtree(child) if child.is_dir() else child.unlink()
            g = d / "gallery"
            if g.exists():
                for m in g.iterdir():
                    if not (m / COMPLETE_MARKER).exists():
                        shutil.rmtree(m, ignore_errors=True)
        d.mkdir(parents=True, exist_ok=True)

    def _rank_and_learn(self, k: int, d: Path, entries, renders: dict) -> dict:
        from ..itercomp.gallery import read_render
        from ..itercomp.ranking import Group

        index = {}
        for name, folder in renders.items():
            for r in read_render(folder):
                index[(name, r["category"], r["prompt"], r["seed"])] = str((folder / r["image"]).resolve())
        groups = []
        for c, ps in self.category_prompts.items():
            for p in ps:
                for s in self.ic.seeds:
                    names = [e.name for e in entries]
                    groups.append(Group(p, c, [index[(n, c, p, s)] for n in names], names, s))
        # composition measure of every gallery model (the run's reward section)
        composition = self.composition_scores(groups, d)
        # 2. rank
        groups = self.rank(groups, d, k)
        # 3. reward models
        rm_reports = self.train_reward_models(groups, d, k)
        return {"composition": composition, "groups": len(groups), "rm_reports": rm_reports}

    def _after(self, k: int, d: Path, entries, renders: dict, new, folder: Path, pre: dict, refl_summary: dict) -> dict:
        from ..itercomp.gallery import read_render
        from ..itercomp.ranking import Group

        composition, rm_reports = pre["composition"], pre["rm_reports"]
        after_groups = []
        for r in read_render(folder):
            after_groups.append(Group(r["prompt"], r["category"], [str((folder / r["image"]).resolve())], [new.name], r["seed"]))
        composition.update(self.composition_scores(after_groups, d, write=False))
        atomic_write(d / "composition.json", json.dumps(composition, indent=1))
        self.gallery_grid(d, renders | {new.name: folder})
        current = "base" if k == 0 else f"itercomp-iter{k - 1}"
        return {
            "iteration": k,
            "gallery": [e.to_dict() for e in entries],
            "groups": pre["groups"],
            "reward_models": rm_reports,
            "refl": {key: refl_summary.get(key) for key in ("steps", "eval_reward_before", "eval_reward_after", "train_reward_first", "train_reward_last", "wall_time_s", "skipped_steps")},
            "composition": composition,
            "composition_before": composition[current]["all"],
            "composition_after": composition[new.name]["all"],
        }

    # ------------------------------------------------------------------ pieces
    def composition_scores(self, groups, d: Path, write: bool = True) -> dict:
        """Mean of the run's reward section per gallery model and category (+ "all")."""
        from rewards.images import load_image

        per: dict[str, dict[str, list[float]]] = {}
        done = set()
        for g in groups:
            for name, path in zip(g.models, g.images):
                if path in done:
                    continue
                done.add(path)
                per.setdefault(name, {}).setdefault(g.category, []).append((path, g.prompt))
        out = {}
        for name, cats in per.items():
            out[name] = {}
            alls = []
            for c, items in cats.items():
                vals = []
                for s in range(0, len(items), 16):
                    chunk = items[s : s + 16]
                    x = torch.stack([load_image(p) for p, _ in chunk])
                    with torch.no_grad():
                        vals += self.eval_reward(x.to(self.eval_reward.device), [p for _, p in chunk]).float().cpu().tolist()
                out[name][c] = _mean(vals)
                alls += vals
            out[name]["all"] = _mean(alls)
        return out

    def rank(self, groups, d: Path, k: int):
        from ..itercomp.ranking import rank_by_scores, read_groups, tie_levels, write_groups
        from rewards.images import load_image

        path = d / "rankings.jsonl"
        if self.ic.ranker.kind == "auto":
            for g in groups:
                x = torch.stack([load_image(p) for p in g.images])
                scorer = self.scorers[g.category]
                with torch.no_grad():
                    g.scores = scorer(x.to(scorer.device), [g.prompt] * len(g.images)).float().cpu().tolist()
                g.ranking = rank_by_scores(g.scores)
                if self.ic.ranker.tie_tol > 0:
                    g.ties = tie_levels(g.scores, self.ic.ranker.tie_tol)
            write_groups(path, groups)
            return groups
        if self.ic.ranker.kind == "heron":
            # every category ranked by the heron section's factors: wins under the hierarchy
            # (vfeedback/feedback/heron.py); pairs no factor separates are tie levels, not trained
            from ..feedback.heron import copeland_order

            for g in groups:
                x = torch.stack([load_image(p) for p in g.images])
                with torch.no_grad():
                    v = self.heron.factor_values(x, [g.prompt] * len(g.images))
                _, cmp = self.heron.label_values(v)
                g.ranking = copeland_order(len(g.images), cmp)
                g.ties = heron_tie_levels(len(g.images), cmp, g.ranking)
            write_groups(path, groups)
            return groups
        # human: the rankings file and this iteration's rankings.jsonl; every group of the
        # current gallery must be ranked (the new model's images in particular)
        known = []
        if self.ic.ranker.file:
            known += read_groups(self.ic.ranker.file, self.by_prompt)
        if path.exists():
            known += read_groups(path, self.by_prompt, field_name=str(path))
        ranked = {g.key: g for g in known}
        missing = [g for g in groups if g.key not in ranked]
        if missing:
            write_groups(d / "to_rank.jsonl", missing)
            raise UserError(
                f"iteration {k}: {len(missing)} of {len(groups)} gallery groups have no human ranking yet. They are listed in "
                f"{d / 'to_rank.jsonl'} (same format, \"ranking\": null). Rank them (the ranking app, or by hand: fill \"ranking\" "
                f"with image indices best first; format in docs/itercomp.md), save the file as {path}, and rerun with --resume")
        # train on every human ranking known (earlier, smaller galleries included)
        return list({g.key: g for g in known}.values())

    def train_reward_models(self, groups, d: Path, k: int) -> dict:
        from ..itercomp.reward_model import embed_images, train_category
        from ..itercomp.tiny import resolve_backbone
        from rewards.itercomp_rm import load_backbone

        spec = resolve_backbone(self.ic.reward_model.backbone)
        dev = "cuda" if torch.cuda.is_available() and self.cfg.train.device != "cpu" else "cpu"
        try:
            backbone = load_backbone(spec, dev)
        except Exception as e:
            raise UserError(f"itercomp.reward_model.backbone: {e}") from None
        emb = embed_images(backbone, [p for g in groups for p in g.images])
        out_dir = d / "reward_models"
        reports = {}
        for c in self.ic.categories:
            init = self.root / f"iter-{k - 1}" / "reward_models" / f"{c}.safetensors" if (k > 0 and self.ic.reward_model.refine) else None
            try:
                reports[c] = train_category(groups, c, self.ic.reward_model, spec, out_dir / f"{c}.safetensors", init_file=init,
                                            seed=self.cfg.seed + 1000 * k, device=dev, embeddings=emb)
            except ValueError as e:
                raise RunError(f"iteration {k}: reward model {c}: {e} (all gallery images tied? add gallery models or seeds)") from None
        atomic_write(out_dir / "report.json", json.dumps(reports, indent=1))
        return {c: {key: r[key] for key in ("pairs_train", "pairs_val", "train_accuracy", "val_accuracy", "val_accuracy_at_start", "best_epoch", "refined_from_previous")}
                for c, r in reports.items()}

    def refl_config(self, k: int, d: Path) -> RunConfig:
        cfg, ic = self.cfg, self.ic
        data = json.loads(cfg.model_dump_json())
        rm_dir = d / "reward_models"
        fp = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(rm_dir.glob("*.safetensors")))).hexdigest()[:16]
        weights = {c: float(ic.weights.get(c, 1.0)) for c in ic.categories}
        options = {"path": str(rm_dir), "weights": weights, "fingerprint": fp}
        if ic.hinge:
            options["hinge_margin"] = cfg.refl.margin
        data.update(algorithm="refl", output_dir=str(d / "refl"), seed=cfg.seed + k,
                    reward={"rewards": [{"name": "itercomp_rm", "options": options}], "normalize": "none"})
        data["train"]["max_steps"] = ic.refl_steps
        data.pop("itercomp", None)
        return RunConfig.model_validate(data)

    def refl(self, k: int, d: Path) -> dict:
        from ..engine import TRAINABLE_FILE

        # the config names the reward models' fingerprint: read on the main process
        rcfg = RunConfig.model_validate(self.on_main(lambda: json.loads(self.refl_config(k, d).model_dump_json())))
        init = self.root / f"iter-{k - 1}" / "lora" / TRAINABLE_FILE if k > 0 else None
        summary = _ContinuedTrainer(rcfg, init).fit()
        self.on_main(lambda: self._keep_lora(d))
        return summary

    def _keep_lora(self, d: Path) -> None:
        from ..engine import TRAINABLE_FILE

        # the cumulative LoRA of this iteration: diffusers format + the trainable state
        lora = d / "lora"
        tmp = d / ".lora-tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(d / "refl" / "lora", tmp)
        ck = RunDir(d / "refl").latest_checkpoint()
        shutil.copy2(ck / TRAINABLE_FILE, tmp / TRAINABLE_FILE)
        shutil.rmtree(lora, ignore_errors=True)
        os.replace(tmp, lora)

    def gallery_grid(self, d: Path, renders: dict) -> None:
        from rewards.images import load_image

        from ..itercomp.gallery import read_render

        names = list(renders)
        first = read_render(renders[names[0]])
        seed0 = self.ic.seeds[0]
        picks = []
        for c in self.ic.categories:
            picks += [(r["category"], r["prompt"]) for r in first if r["category"] == c and r["seed"] == seed0][:3]
        imgs, caps = [], []
        for n in names:
            recs = {(r["category"], r["prompt"], r["seed"]): r for r in read_render(renders[n])}
            for c, p in picks:
                imgs.append(load_image(renders[n] / recs[(c, p, seed0)]["image"]))
                caps.append(p)
        size = max(i.shape[-1] for i in imgs)
        imgs = [torch.nn.functional.interpolate(i[None], size=(size, size), mode="bilinear")[0] if i.shape[-1] != size else i for i in imgs]
        save_grid(torch.stack(imgs), d / "samples" / "gallery.png", captions=caps, ncol=len(picks), row_labels=names)

    def write_summary(self, records: list, wall: float) -> dict:
        hist = []
        for r in records:
            cur = "base" if r["iteration"] == 0 else f"itercomp-iter{r['iteration'] - 1}"
            if not hist:
                hist.append({"model": cur, "after_iteration": None, **r["composition"][cur]})
            new = f"itercomp-iter{r['iteration']}"
            hist.append({"model": new, "after_iteration": r["iteration"], **r["composition"][new]})
        summary = {
            "algorithm": "itercomp",
            "model": self.cfg.model.path,
            "reward": self.eval_reward.name,
            "iterations_done": len(records),
            "iterations": self.ic.iterations,
            "steps": sum((r["refl"].get("steps") or 0) for r in records),
            "wall_time_s": round(wall, 2),
            "eval_reward_before": hist[0]["all"] if hist else None,
            "eval_reward_after": hist[-1]["all"] if hist else None,
            "composition_history": hist,
            "reward_model_accuracy": [{"iteration": r["iteration"], **{c: {"train": v["train_accuracy"], "val": v["val_accuracy"]} for c, v in r["reward_models"].items()}} for r in records],
            "per_iteration": records,
            "lora": str(self.root / f"iter-{len(records) - 1}" / "lora") if records else None,
            "num_processes": getattr(self, "n", 1),
        }
        self.run_dir.write_summary(summary)
        return summary


def _metrics(rec: dict) -> dict:
    m = {"step": rec["iteration"], "composition_before": rec["composition_before"], "composition_after": rec["composition_after"],
         "refl_eval_before": rec["refl"].get("eval_reward_before"), "refl_eval_after": rec["refl"].get("eval_reward_after"),
         "wall_time_s": rec.get("wall_time_s")}
    for c, v in rec["reward_models"].items():
        m[f"rm/{c}/val_accuracy"] = v["val_accuracy"]
        m[f"rm/{c}/train_accuracy"] = v["train_accuracy"]
    return m


def _continued_trainer_cls():
    from ..engine import Trainer

    class ContinuedTrainer(Trainer):
        """The engine's Trainer, starting its LoRA from an earlier iteration's trainable state
        (the refined model keeps improving across iterations instead of restarting)."""

        keep_process_group = True  # the outer loop goes on after each fit()

        def __init__(self, cfg, init_state: Optional[Path]):
            super().__init__(cfg, resume=False)
            self.init_state = init_state

        def setup(self):
            super().setup()
            if self.init_state is not None:
                if not Path(self.init_state).exists():
                    raise RunError(f"itercomp: the previous iteration's LoRA state {self.init_state} is missing; delete that iteration's COMPLETE to redo it")
                self._load_hook([], str(Path(self.init_state).parent))

    return ContinuedTrainer


def _ContinuedTrainer(cfg, init_state):
    return _continued_trainer_cls()(cfg, init_state)
