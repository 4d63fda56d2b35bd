"""ZO-RankSGD on a diffusion model: refine one image's latent, a prompt embedding, or a LoRA,
from nothing but rankings of candidate images.

The optimiser itself (estimator, two-mode loop, atomic state) is :mod:`.zo_ranksgd`; this module
turns a point ``x`` into images and runs the rounds into the standard run folder.

Targets (``zo_ranksgd.target``), each a flat vector ``x`` and a deterministic renderer
``x -> images`` (DDIM with ``sampling.eta = 0``, so an image is a function of ``x`` alone):

* ``latent`` (the paper's application, §4.3 of arXiv 2303.03751 and the authors' notebook):
  ``x`` is the initial noise ``x_T`` of one image of ``zo_ranksgd.prompt``; one image per
  candidate. With ``latent_norm: shell`` every rendered latent is rescaled to norm ``sqrt(d)``,
  where almost all of a standard Gaussian's mass lies in high dimension, and the iterate is
  retracted onto that sphere after every move, so ``mu`` and ``eta`` keep a fixed meaning
  relative to the radius. The reference code does neither (it adds ``mu * u`` and ``eta * D``
  to the latent and renders it as is: its notebook is not public in a form we could read, the
  ``RankSGD`` class in ``optimizer.py`` has no projection); ``latent_norm: none`` is that.
* ``prompt_embedding``: ``x`` is the text encoder's output for the prompt (``(77, D)``; SDXL:
  the concatenated token embeddings, the pooled embedding stays fixed), the negative prompt
  fixed; each candidate is rendered with the start latents of ``prompts.eval_seeds``.
* ``lora``: ``x`` is a LoRA's flattened weights (``model.lora``: rank, alpha, target modules,
  text encoder); each candidate is rendered on ``prompts.eval`` x ``prompts.eval_seeds`` and
  ranked by the mean reward of its images. A black-box fine-tune: the reward needs no gradient
  (``face_id`` with the dlib backend).

The driving API (what a Gradio app uses; the CLI drives it with a Reward-backed oracle)::

    session = RankingSession.from_config(cfg)          # or RankingSession.restore(cfg, folder)
    c = session.ask()        # Candidates: c.images (n, k, 3, H, W) in [0, 1] on the CPU, display
                             # order; c.tiles (n, 3, H', W') one picture per candidate; c.labels
                             # (what each is: "perturbation 3", "step eta*2^-1", "current"),
                             # c.round, c.mode ("gradient" | "line_search"), c.prompts (k)
    session.tell([2, 0, 5])  # display indices, best first; top-k allowed; [] = cannot tell
    session.current_images() # (k, 3, H, W) of the current point;  session.start_images()
    session.save(folder)     # atomic; RankingSession.restore(cfg, folder) continues the same path

``ask`` is idempotent until ``tell`` (a re-rendered page shows the same candidates), and the
pending round survives ``save``/``restore``. A person's answer and a Reward's are the same
call: :meth:`RankingSession.step` takes any oracle with ``rank(tiles)`` or, for a Reward-backed
:class:`~vfeedback.feedback.oracles.RewardRankingOracle`, ranks candidates by the mean score of
their images (NaN ranks last).

``vfeedback train`` (``algorithm: zo_ranksgd``) runs :meth:`ZORankSGDMethod.run_standalone`:

    OUT/config.yaml      resolved config
    OUT/metrics.jsonl    one line per round: round (= step), mode, event, reward_best (best
                         candidate this round), reward_current (current point after the round),
                         queries (candidates shown so far), round_time_s
    OUT/summary.json     algorithm, target, rounds, wall time, eval_reward_before (start image(s))
                         and eval_reward_after (final image(s)), best reward seen, queries
    OUT/samples/         round-NNNNNN.png (start | after the round | the round's candidates, scored),
                         current-NNNNNN.png, progress.png (start and the current point after every
                         round), before_after.png, reward_curve.png
    OUT/checkpoints/     step-NNNNNN/ per round (written to a temp folder, marked COMPLETE,
                         renamed): the optimiser state, the start point and the run's counters
    OUT/lora/            target lora: pytorch_lora_weights.safetensors (diffusers format)

``--resume`` loads the newest whole checkpoint and continues at the next round; rendering and
the optimiser's generator are deterministic, so it follows the same path as an uninterrupted run
(``zo_ranksgd.rounds`` and ``log.*`` may change on resume, nothing else).
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from .zo_ranksgd import ZORankSGD, ZORankSGDConfig, _call_oracle

log = logging.getLogger(__name__)

__all__ = ["Candidates", "RankingSession", "ZORankSGDMethod", "rank_candidates"]

OPT_DIR = "optimizer"
SESSION_FILE = "session.json"
SESSION_TENSORS = "session.safetensors"


# --------------------------------------------------------------------------------------------
# targets: a flat vector <-> images


class _Target:
    """A point ``x`` (any shape) and a deterministic renderer ``points -> (n, k, 3, H, W)``."""

    name = "?"

    def __init__(self, model, cfg):
        self.model = model
        self.cfg = cfg
        self.zcfg = cfg.zo_ranksgd
        self.sampling = cfg.sampling

    def initial(self) -> torch.Tensor:
        raise NotImplementedError

    def render(self, points: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def prompts(self) -> list[str]:
        """The prompt of each of the k images of a candidate."""
        raise NotImplementedError

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Retraction applied to the iterate after each move (identity by default)."""
        return x

    def render_chunks(self, n: int) -> list[list[int]]:
        """How :meth:`render` batches ``n`` points: groups of point indices, each drawn by its
        own UNet calls, so rendering a group alone gives the very images rendering all ``n``
        does (what lets several processes share a round out and match one process)."""
        return [[i] for i in range(n)]

    def _sample(self, cond, latents: torch.Tensor) -> torch.Tensor:
        from ..sampling import sample

        s = self.sampling
        with torch.no_grad():
            out = sample(self.model, cond, num_steps=s.steps, guidance_scale=s.guidance_scale, eta=0.0, latents=latents)
        return out.images.float().cpu()

    def _cond(self, prompts: Sequence[str]):
        s = self.sampling
        with torch.no_grad():
            return self.model.encode_prompt(list(prompts), [self.cfg.prompts.negative] * len(prompts), cfg=s.guidance_scale > 1)


def _cond_rows(cond, idx: Sequence[int]):
    """The rows ``idx`` of a Conditioning."""
    from ..models.loader import Conditioning

    return Conditioning.take(cond, idx)  # every field, IP-Adapter image embeddings included


def _cat_cond(conds):
    from ..models.loader import Conditioning

    return Conditioning.cat(conds)


class LatentTarget(_Target):
    """The initial noise of one image (the paper's image refinement)."""

    name = "latent"

    def __init__(self, model, cfg, prompt: str, seed: int):
        super().__init__(model, cfg)
        self.prompt = prompt
        self.seed = seed
        self.cond = self._cond([prompt])
        self.shell = self.zcfg.latent_norm == "shell"

    def initial(self) -> torch.Tensor:
        from ..sampling import initial_latents

        return initial_latents(self.model, 1, torch.Generator().manual_seed(self.seed))[0].float().cpu()

    def _on_shell(self, z: torch.Tensor) -> torch.Tensor:
        # per row: z * sqrt(d) / |z|, where N(0, I) concentrates in high dimension
        flat = z.reshape(z.shape[0], -1).double()
        r = math.sqrt(flat.shape[1])
        return (flat * (r / flat.norm(dim=1, keepdim=True).clamp_min(1e-12))).to(z.dtype).reshape(z.shape)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self._on_shell(x.reshape(1, -1)).reshape(x.shape) if self.shell else x

    def render_chunks(self, n: int) -> list[list[int]]:
        bs = self.zcfg.batch_size
        return [list(range(s, min(n, s + bs))) for s in range(0, n, bs)]

    def render(self, points: torch.Tensor) -> torch.Tensor:
        lat = self._on_shell(points) if self.shell else points
        out = []
        bs = self.zcfg.batch_size
        for s in range(0, lat.shape[0], bs):
            chunk = lat[s : s + bs].to(self.model.device)
            out.append(self._sample(self.cond.repeat(chunk.shape[0]), chunk))
        return torch.cat(out)[:, None]

    def prompts(self) -> list[str]:
        return [self.prompt]


def _eval_latents(model, seeds: Sequence[int], index: int = 0) -> torch.Tensor:
    """Start latents of the eval grid, one per seed (the Trainer's ``generator("eval", seed, i)``)."""
    from ..engine import generator
    from ..sampling import initial_latents

    return torch.cat([initial_latents(model, 1, generator("eval", s, index)) for s in seeds]).float().cpu()


class PromptEmbeddingTarget(_Target):
    """The text encoder's output for one prompt; rendered with fixed latents per eval seed."""

    name = "prompt_embedding"

    def __init__(self, model, cfg, prompt: str):
        super().__init__(model, cfg)
        self.prompt = prompt
        self.seeds = list(cfg.prompts.eval_seeds)
        self.base = self._cond([prompt])
        self.latents = _eval_latents(model, self.seeds)

    def initial(self) -> torch.Tensor:
        return self.base.embeds[0].detach().float().cpu()

    def render_chunks(self, n: int) -> list[list[int]]:
        per_call = max(1, self.zcfg.batch_size // len(self.seeds))
        return [list(range(s, min(n, s + per_call))) for s in range(0, n, per_call)]

    def render(self, points: torch.Tensor) -> torch.Tensor:
        from ..models.loader import Conditioning

        k = len(self.seeds)
        b = self.base
        per_call = max(1, self.zcfg.batch_size // k)
        out = []
        for s in range(0, points.shape[0], per_call):
            pts = points[s : s + per_call]
            n = pts.shape[0]
            emb = pts.to(self.model.device, b.embeds.dtype).repeat_interleave(k, dim=0)
            rep = lambda v: None if v is None else v.repeat(n * k, *([1] * (v.ndim - 1)))
            repl = lambda vs: None if vs is None else [rep(v) for v in vs]
            cond = Conditioning(emb, rep(b.neg_embeds), rep(b.pooled), rep(b.neg_pooled), rep(b.time_ids),
                                repl(b.image_embeds), repl(b.neg_image_embeds))
            lat = self.latents.repeat(n, 1, 1, 1).to(self.model.device)
            out.append(self._sample(cond, lat))
        imgs = torch.cat(out)
        return imgs.reshape(points.shape[0], k, *imgs.shape[1:])

    def prompts(self) -> list[str]:
        return [self.prompt] * len(self.seeds)


class LoraTarget(_Target):
    """A LoRA's weights, flattened; rendered on the eval prompts x eval seeds."""

    name = "lora"

    def __init__(self, model, cfg, seed: int):
        super().__init__(model, cfg)
        from ..config import read_prompts
        from ..models import add_lora

        lc = cfg.model.lora
        # the LoRA's random A matrices come from the run's seed, not the global RNG
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.params = add_lora(model, lc.rank, lc.alpha, lc.target_modules, lc.text_encoder, lc.dropout)
        for p in self.params:
            p.requires_grad_(False)
        self.text_encoder = lc.text_encoder
        train = read_prompts(cfg.prompts.train, "prompts.train")
        self.eval_prompts = read_prompts(cfg.prompts.eval, "prompts.eval") if cfg.prompts.eval else train[:4]
        self.seeds = list(cfg.prompts.eval_seeds)
        # image order: seed-major, prompt-minor (the Trainer's eval grid rows)
        self._prompts = [p for _ in self.seeds for p in self.eval_prompts]
        self.latents = torch.cat([_eval_latents(model, [s], i) for s in self.seeds for i in range(len(self.eval_prompts))])
        self.cond = None if self.text_encoder else self._cond(self._prompts)
        self.numel = sum(p.numel() for p in self.params)

    def initial(self) -> torch.Tensor:
        return torch.cat([p.detach().float().reshape(-1).cpu() for p in self.params])

    def load_vector(self, x: torch.Tensor) -> None:
        """Write the flat vector ``x`` into the LoRA's parameters."""
        x = x.reshape(-1)
        o = 0
        with torch.no_grad():
            for p in self.params:
                n = p.numel()
                p.copy_(x[o : o + n].reshape(p.shape).to(p.device, p.dtype))
                o += n

    def render(self, points: torch.Tensor) -> torch.Tensor:
        out = []
        bs = self.zcfg.batch_size
        n_img = self.latents.shape[0]
        for pt in points:
            self.load_vector(pt)
            cond = self.cond if self.cond is not None else self._cond(self._prompts)
            imgs = []
            for s in range(0, n_img, bs):
                idx = list(range(s, min(n_img, s + bs)))
                imgs.append(self._sample(_cond_rows(cond, idx), self.latents[idx].to(self.model.device)))
            out.append(torch.cat(imgs))
        return torch.stack(out)

    def prompts(self) -> list[str]:
        return list(self._prompts)


def build_target(model, cfg) -> _Target:
    from ..config import read_prompts

    z = cfg.zo_ranksgd
    seed = cfg.seed if z.seed is None else z.seed
    prompt = z.prompt if z.prompt is not None else read_prompts(cfg.prompts.train, "prompts.train")[0]
    if z.target == "latent":
        return LatentTarget(model, cfg, prompt, seed)
    if z.target == "prompt_embedding":
        return PromptEmbeddingTarget(model, cfg, prompt)
    return LoraTarget(model, cfg, seed)


# --------------------------------------------------------------------------------------------
# candidates and ranking


def tile(images: torch.Tensor, pad: int = 2) -> torch.Tensor:
    """``(k, 3, H, W)`` -> one ``(3, H', W')`` picture: a near-square grid on white (k = 1: the image)."""
    k, c, h, w = images.shape
    if k == 1:
        return images[0]
    cols = math.ceil(math.sqrt(k))
    rows = math.ceil(k / cols)
    side = max(rows, cols)
    canvas = torch.ones(c, side * (h + pad) - pad, side * (w + pad) - pad, dtype=images.dtype)
    for i in range(k):
        r, q = divmod(i, cols)
        canvas[:, r * (h + pad) : r * (h + pad) + h, q * (w + pad) : q * (w + pad) + w] = images[i]
    return canvas


@dataclass
class Candidates:
    """One round as shown to the oracle, in display order."""

    images: torch.Tensor  # (n, k, 3, H, W) in [0, 1], CPU: k images per candidate
    labels: list[str]  # what each candidate is (for logs / an operator, not for the judge)
    round: int
    mode: str  # "gradient" | "line_search"
    prompts: list[str]  # the prompt of each of the k images
    scores: Optional[list[float]] = None  # mean oracle score per candidate, when the renderer scored them

    @property
    def tiles(self) -> torch.Tensor:
        """``(n, 3, H', W')``: one picture per candidate."""
        return torch.stack([tile(c) for c in self.images])

    def __len__(self) -> int:
        return self.images.shape[0]


def _mean_finite(v: Sequence[float]) -> float:
    f = [x for x in v if math.isfinite(x)]
    return sum(f) / len(f) if f else float("nan")


def score_images(oracle, images: torch.Tensor, prompts: Sequence[str]) -> list[float]:
    """Mean score per candidate of ``images`` ``(n, k, 3, H, W)`` through ``oracle.scores``."""
    n, k = images.shape[:2]
    flat = images.reshape(n * k, *images.shape[2:])
    s = oracle.scores(flat, list(prompts) * n)
    return [_mean_finite(s[i * k : (i + 1) * k]) for i in range(n)]


def rank_candidates(oracle, cands: Candidates) -> tuple[list[int], Optional[list[float]]]:
    """The oracle's ranking (display indices, best first) and, when it scores, the scores.

    An oracle with ``scores(images, prompts)`` (a Reward-backed one) ranks candidates by the mean
    score of their images, NaN last, keeping its ``top_k``; any other oracle (a person) gets
    the tiles through ``rank``. Scores that are all equal (or NaN) give ``[]``: the round is
    skipped rather than ranked in an arbitrary order.
    """
    from ..feedback.oracles import order_scores

    if hasattr(oracle, "rank_groups"):
        # a hierarchical judge (vfeedback/feedback/heron.py): ranks the candidates' images itself;
        # the scores returned are the renderer's reward scores, for the logs only
        order = oracle.rank_groups(cands.images, cands.prompts)
        if getattr(oracle, "last_decided", 1) == 0:
            return [], cands.scores  # every pair tied: "cannot tell", not the index order
        k = getattr(oracle, "top_k", None)
        return (order if k is None else order[:k]), cands.scores
    if hasattr(oracle, "scores"):
        scores = cands.scores if cands.scores is not None else score_images(oracle, cands.images, cands.prompts)
        if len({s for s in scores if math.isfinite(s)}) <= 1:
            # all tied (e.g. face_id finds no face anywhere): "cannot tell", not a random order
            return [], scores
        return order_scores(scores, higher_is_better=True, top_k=getattr(oracle, "top_k", None)), scores
    return _call_oracle(oracle, list(cands.tiles)), None


# --------------------------------------------------------------------------------------------
# the session: ask / tell over images


class RankingSession:
    """ZO-RankSGD over a diffusion target, one round at a time (see the module docstring)."""

    def __init__(self, target: _Target, optimizer: ZORankSGD, x0: torch.Tensor):
        self.target = target
        self.opt = optimizer
        self.x0 = x0.detach().float().cpu().clone()
        self._cands: Optional[Candidates] = None
        self._points: Optional[torch.Tensor] = None  # the pending round's points, display order
        self._current: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # (point, images)
        self._start: Optional[torch.Tensor] = None
        # points (n, ...) -> images (n, k, 3, H, W), or (images, per-candidate scores): how a
        # round's candidates are drawn (None: target.render here; the CLI run shares rounds
        # out over processes)
        self.renderer = None

    # ---------------------------------------------------------------- construction

    @staticmethod
    def optimizer_config(cfg) -> ZORankSGDConfig:
        z = cfg.zo_ranksgd
        return ZORankSGDConfig(
            num_candidates=z.num_candidates, smoothing=z.smoothing, step_size=z.step_size, estimator=z.estimator,
            line_search=z.line_search, line_search_points=z.line_search_points, average_directions=z.average_directions,
            shuffle=z.shuffle, seed=int(cfg.seed if z.seed is None else z.seed),
        )

    @classmethod
    def from_config(cls, cfg, model=None) -> "RankingSession":
        """A fresh session: loads the model (unless given), builds the target and the optimiser."""
        model = model if model is not None else load_model_for(cfg)
        target = build_target(model, cfg)
        x0 = target.project(target.initial())
        return cls(target, ZORankSGD(x0, cls.optimizer_config(cfg)), x0)

    @classmethod
    def restore(cls, cfg, folder: Union[str, os.PathLike], model=None) -> "RankingSession":
        """The session saved in ``folder`` (by :meth:`save`), on a model built from ``cfg``."""
        from safetensors.torch import load_file

        folder = Path(folder)
        model = model if model is not None else load_model_for(cfg)
        target = build_target(model, cfg)
        opt = ZORankSGD.load(folder / OPT_DIR)
        x0 = load_file(str(folder / SESSION_TENSORS))["x0"]
        return cls(target, opt, x0)

    def save(self, folder: Union[str, os.PathLike]) -> Path:
        """The optimiser's state and the start point into ``folder`` (each file written atomically)."""
        from safetensors.torch import save_file

        from ..rundir import atomic_write

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.opt.save(folder / OPT_DIR)
        tmp = folder / f".{SESSION_TENSORS}.tmp"
        save_file({"x0": self.x0.contiguous()}, str(tmp))
        os.replace(tmp, folder / SESSION_TENSORS)
        atomic_write(folder / SESSION_FILE, json.dumps({"target": self.target.name, "round": self.opt.round}) + "\n")
        return folder

    # ---------------------------------------------------------------- rounds

    @property
    def round(self) -> int:
        return self.opt.round

    def ask(self) -> Candidates:
        """The pending round's candidates (rendered once; the same until :meth:`tell`)."""
        if self._cands is None:
            pts = self.opt.ask()
            imgs = self.target.render(pts) if self.renderer is None else self.renderer(pts)
            scores = None
            if isinstance(imgs, tuple):
                imgs, scores = imgs
            self._points = pts
            self._cands = Candidates(imgs, self.opt.labels(), self.opt.round, self.opt._pending["mode"], self.target.prompts(), scores)
        return self._cands

    def tell(self, ranking: Sequence[int]) -> dict[str, Any]:
        """Apply the answer (display indices, best first); returns the optimiser's history entry."""
        cands, pts = self._cands, self._points
        entry = self.opt.tell(ranking)
        moved = entry.get("event") in ("step", "moved")
        if moved:
            self.opt.x = self.target.project(self.opt.x.reshape(self.opt.shape)).reshape(-1).clone()
        self._cands = self._points = None
        # the current point's images: reuse a rendered candidate when the iterate is one of them
        if cands is not None and self._current is not None and not torch.equal(self._current[0], self.opt.x):
            x = self.opt.x.reshape(self.opt.shape)
            for i in range(len(pts)):
                if torch.equal(self.target.project(pts[i]), x):
                    self._current = (self.opt.x.clone(), cands.images[i])
                    break
        return entry

    def step(self, oracle) -> tuple[dict[str, Any], Candidates, Optional[list[float]]]:
        """One round with ``oracle``: ask, rank, tell. Returns (entry, candidates, scores or None)."""
        cands = self.ask()
        ranking, scores = rank_candidates(oracle, cands)
        return self.tell(ranking), cands, scores

    def current_images(self) -> torch.Tensor:
        """``(k, 3, H, W)``: the images of the current point."""
        if self._current is None or not torch.equal(self._current[0], self.opt.x):
            self._current = (self.opt.x.clone(), self.target.render(self.opt.current()[None])[0])
        return self._current[1]

    def start_images(self) -> torch.Tensor:
        """``(k, 3, H, W)``: the images of the start point."""
        if self._start is None:
            self._start = self.target.render(self.x0[None])[0]
            if torch.equal(self.x0.reshape(-1), self.opt.x) and self._current is None:
                self._current = (self.opt.x.clone(), self._start)
        return self._start

    def current(self) -> torch.Tensor:
        """The current point, shaped like the target (a latent, an embedding, a flat LoRA vector)."""
        return self.opt.current()

    def apply(self) -> None:
        """LoRA target: write the current point into the model's LoRA (before saving it)."""
        if isinstance(self.target, LoraTarget):
            self.target.load_vector(self.opt.x)


def load_model_for(cfg, device=None):
    """The model of ``cfg`` on its device (``device``: this process's, under several processes),
    in the inference dtype (fp16/bf16 on a GPU, fp32 on CPU)."""
    from ..engine import resolve_mixed_precision
    from ..models import load_model

    cuda = torch.cuda.is_available() and cfg.train.device != "cpu"
    if device is not None:
        device = torch.device(device)
    else:
        device = torch.device(cfg.train.device) if cfg.train.device else torch.device("cuda" if cuda else "cpu")
    mp = resolve_mixed_precision(cfg.train.mixed_precision, device.type)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mp, torch.float32)
    from ..models.speed import SWITCHES

    on = [f"model.{k}" for k in SWITCHES if getattr(cfg.model, k)] + (["train.optimizer"] if cfg.train.optimizer != "adamw" else [])
    if on:  # the speed switches are applied by the Trainer of the gradient methods only
        log.warning("%s: not applied by zo_ranksgd (it runs outside the gradient trainer); the run proceeds without", ", ".join(on))
    return load_model(cfg.model.family, cfg.model.path, resolution=cfg.model.resolution, dtype=dtype, device=device,
                      revision=cfg.model.revision, variant=cfg.model.variant, attention=cfg.model.attention,
                      ip_adapter=cfg.model.ip_adapter)


# --------------------------------------------------------------------------------------------
# the run: `vfeedback train` with algorithm: zo_ranksgd


RESUMABLE = ("zo_ranksgd.rounds", "log")


class ZORankSGDMethod:
    """``algorithm: zo_ranksgd`` for ``vfeedback train``: runs its own loop (no gradients)."""

    @classmethod
    def run_standalone(cls, cfg, resume: bool = False) -> dict:
        return _Run(cfg, resume).run()


class _Run:
    def __init__(self, cfg, resume: bool):
        from ..rundir import RunDir

        self.cfg = cfg
        self.resume = resume
        self.run_dir = RunDir(cfg.output_dir)

    def run(self) -> dict:
        import rewards

        from ..config import dump_config
        from ..errors import RunError, UserError
        from ..feedback.oracles import RewardRankingOracle
        from ..rundir import atomic_write

        from accelerate import PartialState

        cfg, z, rd = self.cfg, self.cfg.zo_ranksgd, self.run_dir
        t0 = time.time()
        # several processes (`--num-processes N`, `accelerate launch`): the main one owns the
        # optimiser, the oracle's decisions and every file; each round's candidates are drawn
        # (and scored) in render chunks shared out over the processes and gathered (_render)
        st = PartialState(cpu=cfg.train.device == "cpu" or not torch.cuda.is_available())
        self.n, self.rank, self.main = st.num_processes, st.process_index, st.is_main_process
        if cfg.sampling.eta != 0 and self.main:
            log.warning("zo_ranksgd: sampling.eta=%s ignored; DDIM runs with eta 0 so an image is a function of x", cfg.sampling.eta)
        specs = [dict(name=r.name, weight=r.weight, **r.options) for r in cfg.reward.rewards]
        reward = rewards.combine(specs, normalize=cfg.reward.normalize)  # fails fast, before the model loads
        if self.main:
            from ..checks import check_run

            check_run(cfg, resume=self.resume)  # the checks `validate` runs, before anything is created
            rd.prepare(self.resume)
            rd.write_config(cfg)
        st.wait_for_everyone()
        try:
            model = load_model_for(cfg, device=st.device if self.n > 1 else None)
        except UserError:
            if self.main:
                rd.discard_created()
            raise
        reward = reward.to(model.device).eval()
        oracle = RewardRankingOracle(reward, top_k=z.top_k, batch_size=max(1, z.batch_size))
        self.oracle = oracle
        self.ranker = oracle  # who decides each round; the reward oracle still scores the logs
        if z.ranker == "heron":
            from ..feedback.heron import build_heron_oracle

            self.ranker = build_heron_oracle(cfg, "zo_ranksgd.ranker", device=model.device, batch_size=max(1, z.batch_size))
            self.ranker.top_k = z.top_k
        self.drawn_here = 0  # candidates this process rendered
        if not self.main:
            self.target = build_target(model, cfg)
            return self._serve()
        summary = None
        try:
            summary = self._lead(model, reward, oracle, t0)
        finally:
            if self.n > 1:
                self._send(("stop", summary))  # after an error too: the others end instead of waiting
        return summary

    # ---- several processes: the main one sends each round's points, all render their share
    def _send(self, msg):
        from accelerate.utils import broadcast_object_list

        box = [msg]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def _serve(self) -> Optional[dict]:
        """A process other than the main one: render its share of each round until told to stop."""
        while True:
            cmd, payload = self._send(None)
            if cmd == "stop":
                return payload
            self._render_share(payload)

    def _render(self, points: torch.Tensor):
        """The session's renderer on the main process: (images, per-candidate scores)."""
        if self.n > 1:
            self._send(("render", points))
        return self._render_share(points)

    def _render_share(self, points: torch.Tensor):
        # render chunk c (the target's own batching, so images do not depend on the split) goes
        # to process c % N, which also scores it; everything is gathered in chunk order
        chunks = self.target.render_chunks(points.shape[0])
        prompts = self.target.prompts()
        mine = []
        for c, idx in enumerate(chunks):
            if c % self.n == self.rank:
                imgs = self.target.render(points[idx])
                self.drawn_here += len(idx)
                mine.append((c, imgs, score_images(self.oracle, imgs, prompts)))
        if self.n > 1:
            from accelerate.utils import gather_object

            mine = gather_object(mine)
        got = {c: (imgs, sc) for c, imgs, sc in mine}
        assert sorted(got) == list(range(len(chunks))), f"render chunks gathered: {sorted(got)}"
        return torch.cat([got[c][0] for c in range(len(chunks))]), [v for c in range(len(chunks)) for v in got[c][1]]

    def _lead(self, model, reward, oracle, t0) -> dict:
        from ..errors import RunError

        cfg, z, rd = self.cfg, self.cfg.zo_ranksgd, self.run_dir

        ck = rd.latest_checkpoint() if self.resume else None
        state: dict[str, Any] = {"wall_time_s": 0.0, "best_reward": None, "reward_before": None}
        if ck is not None:
            try:
                session = RankingSession.restore(cfg, ck, model=model)
                state = json.loads((ck / "run_state.json").read_text())
            except Exception as e:
                raise RunError(f"--resume: cannot read checkpoint {ck} ({type(e).__name__}: {e}); delete it to fall back to the previous one") from None
            rd.truncate_metrics(session.round)
            log.info("resumed from %s (round %d)", ck, session.round)
        else:
            if self.resume:
                log.info("--resume: no whole checkpoint in %s yet; starting from round 0", rd.checkpoints)
                rd.truncate_metrics(0)  # rounds logged before a crash that left no checkpoint are redone
            session = RankingSession.from_config(cfg, model=model)
        self.target = session.target
        session.renderer = self._render
        prompts = session.target.prompts()
        start = session.start_images()
        if state["reward_before"] is None:
            state["reward_before"] = _mean_finite(oracle.scores(start, prompts))
            state["best_reward"] = state["reward_before"]
        t_offset = state["wall_time_s"]
        if session.round == 0:
            _save_tile(start, rd.samples / "current-000000.png", f"start | {state['reward_before']:.4f}")

        from tqdm.auto import tqdm

        bar = tqdm(total=z.rounds, initial=min(session.round, z.rounds), desc="zo_ranksgd", dynamic_ncols=True)
        while session.round < z.rounds:
            t_round = time.time()
            entry, cands, scores = session.step(self.ranker)
            r = entry["round"] + 1  # rounds done
            cur = session.current_images()
            r_cur = _mean_finite(oracle.scores(cur, prompts))
            finite = [s for s in (scores or []) if math.isfinite(s)]
            r_best = max(finite) if finite else float("nan")
            if math.isfinite(r_best) and (state["best_reward"] is None or r_best > state["best_reward"]):
                state["best_reward"] = r_best
            rec = {"step": r, "round": r, "mode": entry["mode"], "event": entry.get("event"), "reward_best": r_best,
                   "reward_current": r_cur, "queries": entry["queries"], "round_time_s": round(time.time() - t_round, 3)}
            if "pick" in entry:
                rec["pick"] = entry["pick"]
            rd.append_metrics(rec)
            _save_round(rd.samples, r, start, cur, cands, scores, state["reward_before"], r_cur)
            state["wall_time_s"] = t_offset + (time.time() - t0)
            self._checkpoint(session, r, state)
            bar.set_postfix(current=f"{r_cur:.4f}", best=f"{r_best:.4f}", mode=entry["mode"])
            bar.update(1)
        bar.close()

        final = session.current_images()
        after = _mean_finite(oracle.scores(final, prompts))
        if isinstance(session.target, LoraTarget):
            self._export_lora(session)
        records = rd.read_metrics()
        from ..rundir import plot_curves

        plot_curves(records, rd.samples / "reward_curve.png", keys=("reward_current", "reward_best"))
        _progress(rd.samples, session.round)
        _before_after(rd.samples / "before_after.png", start, final, state["reward_before"], after, session.round)
        summary = {
            "algorithm": "zo_ranksgd",
            "target": z.target,
            "model": cfg.model.path,
            "reward": reward.name,
            "steps": session.round,
            "rounds": session.round,
            "queries": session.opt.n_queries,
            "wall_time_s": round(t_offset + (time.time() - t0), 2),
            "eval_reward_before": state["reward_before"],
            "eval_reward_after": after,
            "best_candidate_reward": state["best_reward"],
            "moves": sum(1 for h in session.opt.history if h.get("event") in ("step", "moved")),
            "optimizer": session.opt.state_dict()["meta"]["config"],
            "prompts": prompts,
            "lora": str(rd.lora) if isinstance(session.target, LoraTarget) else None,
            "num_processes": self.n,
            "candidates_drawn_by_main": self.drawn_here,
        }
        # evaluation-only scorers (eval_rewards): the start and final images, as the engine reports them
        import rewards

        for spec in cfg.eval_rewards:
            er = rewards.load(spec.name, **spec.options).to(model.device).eval()
            with torch.no_grad():
                for key, imgs in (("before", start), ("after", final)):
                    v = er(imgs.float().to(model.device), list(prompts)).float().cpu().tolist()
                    summary[f"eval_{spec.name}_{key}"] = _mean_finite(v)
            log.info("eval reward %s: %.4f -> %.4f", spec.name, summary[f"eval_{spec.name}_before"], summary[f"eval_{spec.name}_after"])
        rd.write_summary(summary)
        return summary

    def _checkpoint(self, session: RankingSession, r: int, state: dict) -> None:
        from ..rundir import COMPLETE_MARKER, atomic_write, fsync_dir

        rd = self.run_dir
        final = rd.checkpoints / f"step-{r:06d}"
        tmp = rd.checkpoints / f".tmp-step-{r:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        session.save(tmp)
        atomic_write(tmp / "run_state.json", json.dumps(state, indent=1) + "\n")
        atomic_write(tmp / COMPLETE_MARKER, "")
        fsync_dir(tmp)
        if final.exists():
            rd.discard_checkpoint(final)
        os.replace(tmp, final)
        fsync_dir(rd.checkpoints)
        rd.prune(self.cfg.log.keep_checkpoints)

    def _export_lora(self, session: RankingSession) -> None:
        from ..models import save_lora
        from ..rundir import fsync_dir

        rd = self.run_dir
        session.apply()
        tmp, old = rd.root / ".lora-tmp", rd.root / ".lora-old"
        shutil.rmtree(tmp, ignore_errors=True)
        save_lora(session.target.model, tmp, text_encoder=self.cfg.model.lora.text_encoder)
        shutil.rmtree(old, ignore_errors=True)
        if rd.lora.exists():
            os.replace(rd.lora, old)
        os.replace(tmp, rd.lora)
        shutil.rmtree(old, ignore_errors=True)
        fsync_dir(rd.root)


# --------------------------------------------------------------------------------------------
# pictures


def _save_tile(images: torch.Tensor, path: Path, caption: str) -> None:
    from ..rundir import save_grid

    save_grid(tile(images)[None], path, captions=[caption], cell=160)


def _save_round(samples: Path, r: int, start, cur, cands: Candidates, scores, r_start: float, r_cur: float) -> None:
    """``round-r.png``: start | after round r | the round's candidates (display order, with scores);
    ``current-r.png``: the current point alone (for progress.png)."""
    from ..rundir import save_grid

    tiles = [tile(start), tile(cur)] + list(cands.tiles)
    caps = [f"start | {r_start:.4f}", f"after round {r} | {r_cur:.4f}"]
    for i, lab in enumerate(cands.labels):
        caps.append(f"{lab} | {scores[i]:.4f}" if scores is not None else lab)
    save_grid(torch.stack(_same_size(tiles)), samples / f"round-{r:06d}.png", captions=caps, ncol=min(len(tiles), 10),
              row_labels=None)
    _save_tile(cur, samples / f"current-{r:06d}.png", f"round {r} | {r_cur:.4f}")


def _same_size(tiles: list[torch.Tensor]) -> list[torch.Tensor]:
    h = max(t.shape[1] for t in tiles)
    w = max(t.shape[2] for t in tiles)
    out = []
    for t in tiles:
        if t.shape[1:] != (h, w):
            c = torch.ones(t.shape[0], h, w, dtype=t.dtype)
            c[:, : t.shape[1], : t.shape[2]] = t
            t = c
        out.append(t)
    return out


def _progress(samples: Path, rounds: int, max_cells: int = 21) -> None:
    """``progress.png``: the saved current-*.png of the start and every round, in one strip."""
    from PIL import Image

    files = [samples / f"current-{r:06d}.png" for r in range(rounds + 1)]
    files = [f for f in files if f.exists()]
    if len(files) > max_cells:  # keep the start, the end, and evenly spaced rounds between
        idx = sorted({round(i * (len(files) - 1) / (max_cells - 1)) for i in range(max_cells)})
        files = [files[i] for i in idx]
    if not files:
        return
    ims = [Image.open(f).convert("RGB") for f in files]
    h = max(i.height for i in ims)
    out = Image.new("RGB", (sum(i.width for i in ims), h), "white")
    x = 0
    for im in ims:
        out.paste(im, (x, 0))
        x += im.width
    tmp = samples / ".progress.tmp.png"
    out.save(tmp)
    os.replace(tmp, samples / "progress.png")


def _before_after(path: Path, start, final, r0: float, r1: float, rounds: int) -> None:
    from ..rundir import save_grid

    tiles = _same_size([tile(start), tile(final)])
    save_grid(torch.stack(tiles), path, captions=[f"before | {r0:.4f}", f"after {rounds} rounds | {r1:.4f}"], cell=256)
