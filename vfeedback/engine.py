"""The shared training loop: accelerate, logging, eval grids, checkpoints, LoRA export.

A method (ReFL, D3PO, ...) only says how one micro-batch becomes a loss; everything else, the
same for all, lives here:

* accelerate for devices, mixed precision, gradient accumulation and multi-process;
* randomness derived from ``(seed, step, micro-step, item)`` rather than carried in global RNG
  state, so a resumed run replays exactly what an uninterrupted one would have done, and a
  2-process run draws the same global batch as a 1-process one;
* a non-finite loss (or gradient) skips the optimizer step on every process and is counted;
  ``train.max_consecutive_nan`` in a row stops the run with a message;
* eval grids of fixed prompts and seeds before / during / after training;
* checkpoints written to a temp folder, marked complete, renamed into place, then pruned.
"""
from __future__ import annotations

import contextlib
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

import rewards

from .config import RunConfig, dump_config, read_prompts
from .errors import RunError, UserError
from .rundir import COMPLETE_MARKER, RunDir, atomic_write, fsync_dir, plot_curves, save_grid

log = logging.getLogger(__name__)

TRAINABLE_FILE = "trainable.safetensors"
STATE_FILE = "trainer_state.json"
REWARD_STATE_FILE = "reward_state.safetensors"
SHAPING_STATE_FILE = "reward_shaping.json"
METHOD_STATE_FILE = "method_state.safetensors"
EMA_FILE = "ema.safetensors"


def derive_seed(*parts) -> int:
    """A 63-bit seed from any parts; stable across processes, Python versions and restarts."""
    h = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def generator(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


def resolve_mixed_precision(choice: str, device_type: str) -> str:
    if choice != "auto":
        if device_type == "cpu" and choice == "fp16":
            raise UserError("train.mixed_precision: fp16 needs a GPU; use auto, no or bf16 on CPU")
        return choice
    if device_type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


class Trainer:
    """Runs one gradient method from a validated config into a run folder."""

    def __init__(self, cfg: RunConfig, resume: bool = False, config_source: Optional[str] = None):
        self.cfg = cfg
        self.resume = resume
        self.run = RunDir(cfg.output_dir)
        self.config_source = config_source

    # ------------------------------------------------------------------ set-up
    def setup(self, dry_run: bool = False) -> None:
        """Check every input, load the model, add the LoRA, build the optimizer, then (not on a
        dry run) create the run folder: a user error found on the way creates nothing.
        ``dry_run``: stop before the run folder, having written nothing."""
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration, set_seed

        from .checks import check_run

        cfg = self.cfg
        # prompts, rewards (built before any diffusion weight loads: a bad option fails fast),
        # held-out eval scorers (reward hacking shows as the training reward rising while these
        # do not), method inputs, device, model source, LoRA targets, the run folder and resume;
        # the same checks as `vfeedback validate`. Only the main process checks the run folder
        # (the others would see the folder it makes as "an earlier run").
        main = os.environ.get("RANK", "0") == "0"
        checked = check_run(cfg, resume=self.resume, main_process=main)
        self.train_prompts, self.eval_prompts = checked.train_prompts, checked.eval_prompts
        self.reward, self.eval_rewards = checked.reward, checked.eval_rewards
        self._cost_scorer = checked.cost

        cpu = cfg.train.device == "cpu" or not torch.cuda.is_available()
        mp = resolve_mixed_precision(cfg.train.mixed_precision, "cpu" if cpu else "cuda")
        trackers = [t for t in cfg.log.trackers if self._tracker_available(t)]
        # one process may run several trainings (IterComp iterations, tests, notebooks): a new
        # Accelerator reuses accelerate's process-wide state (process group, device, mixed
        # precision) and takes the new gradient accumulation; only a different mixed precision
        # cannot be changed within a process (accelerate's rule), which is said plainly here
        try:
            self.acc = Accelerator(
                mixed_precision=mp,
                gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
                log_with=trackers or None,
                project_config=ProjectConfiguration(project_dir=str(self.run.root), logging_dir=str(self.run.root / "logs")),
                cpu=cpu,
            )
        except ValueError as e:
            if "already been initialized" not in str(e):
                raise
            raise RunError(f"train.mixed_precision={mp!r} (or train.device): this Python process already ran a training with another "
                           "setting, and accelerate fixes it once per process; run this training in a new process") from None
        self.acc.wait_for_everyone()
        set_seed(cfg.seed)
        weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mp, torch.float32)
        from .models import add_lora, load_model

        self.model = load_model(
            cfg.model.family, cfg.model.path, resolution=cfg.model.resolution, dtype=torch.float32,
            revision=cfg.model.revision, variant=cfg.model.variant, attention=cfg.model.attention,
            device=self.acc.device, gradient_checkpointing=cfg.model.gradient_checkpointing,
            ip_adapter=cfg.model.ip_adapter,
        )
        self.method = self.method_cls(cfg, self)  # may keep a frozen reference copy, etc.
        m = self.model
        if cfg.model.finetune == "lora":
            # frozen weights in the compute dtype, trainable LoRA in fp32 (diffusers' recipe)
            for mod in [m.unet, m.vae, *m.text_encoders]:
                mod.to(dtype=weight_dtype)
            try:
                params = add_lora(m, cfg.model.lora.rank, cfg.model.lora.alpha, cfg.model.lora.target_modules,
                                  cfg.model.lora.text_encoder, cfg.model.lora.dropout)
            except ValueError as e:  # peft: a target module the model lacks (a hub model validate could not see)
                raise UserError(f"model.lora.target_modules: {str(e).splitlines()[0]}") from None
            for p in params:
                p.data = p.data.float()
        else:
            m.unet.requires_grad_(True)
            for mod in [m.vae, *m.text_encoders]:
                mod.to(dtype=weight_dtype)
            params = [p for p in m.unet.parameters()]
        m.unet.train()
        self.params = params
        from .models.speed import SWITCHES, apply_speed_switches, make_optimizer

        # after the LoRA and the casts (fusion must see which projections carry a LoRA; the
        # compiled blocks must hold the final modules), before accelerate wraps the UNet
        apply_speed_switches(m, **{k: getattr(cfg.model, k) for k in SWITCHES},
                             lora_text_encoder=cfg.model.finetune == "lora" and cfg.model.lora.text_encoder)
        self.optimizer = make_optimizer(params, cfg.train.optimizer, lr=cfg.train.lr, betas=cfg.train.adam_betas,
                                        eps=cfg.train.adam_eps, weight_decay=cfg.train.weight_decay)
        from diffusers.optimization import get_scheduler

        self.lr_scheduler = get_scheduler("constant_with_warmup" if cfg.train.lr_warmup_steps else "constant", self.optimizer,
                                          num_warmup_steps=cfg.train.lr_warmup_steps * self.acc.num_processes)
        self.acc.register_save_state_pre_hook(self._save_hook)
        self.acc.register_load_state_pre_hook(self._load_hook)
        unet, self.optimizer, self.lr_scheduler = self.acc.prepare(m.unet, self.optimizer, self.lr_scheduler)
        m.denoiser = unet
        # trainable parameters outside the prepared (DDP-wrapped) UNet: the text encoders' LoRA
        # (model.lora.text_encoder; SDXL has two). DDP never sees them, so their gradients are
        # all-reduced here before each optimizer step (_sync_outside_grads); the encoders stay
        # unwrapped, so encode_prompt runs no collective and eval on one process cannot hang
        in_unet = {id(p) for p in m.unet.parameters()}
        self.outside_params = [p for p in params if id(p) not in in_unet]
        for r in [self.reward, *self.eval_rewards.values()]:
            r.to(self.acc.device)
            r.requires_grad_(False)
            r.eval()
        from .reward_shaping import ScalarReward

        # the scalar reward sampling methods train on: shaping and the cost constraint over the
        # global batch (vfeedback/reward_shaping.py); its Lagrange multiplier is checkpointed
        self.scalar_reward = ScalarReward(cfg, self.reward, self.acc, cost=self._cost_scorer)
        if dry_run:
            return
        # everything is checked and loaded: only now the run folder is made (by the main
        # process; the others wait for it)
        if main:
            self.run.prepare(self.resume)
        self.acc.wait_for_everyone()
        if trackers and self.acc.is_main_process:
            self.acc.init_trackers("vfeedback", config=_flat_scalars(json.loads(self.cfg.model_dump_json())))
        log.info("device %s, mixed precision %s, %d processes, %d trainable parameters", self.acc.device, mp,
                 self.acc.num_processes, sum(p.numel() for p in params))

    @property
    def method_cls(self):
        from .algorithms import get_method

        return get_method(self.cfg.algorithm)

    def method_needs_gradient_reward(self) -> bool:
        return getattr(self.method_cls, "needs_differentiable_reward", False)

    @staticmethod
    def _tracker_available(name: str) -> bool:
        import importlib.util

        mod = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml", "aim": "aim"}.get(name, name)
        ok = importlib.util.find_spec(mod) is not None
        if not ok:
            log.warning("log.trackers: %s is not installed; skipped", name)
        return ok

    # ---- checkpoint hooks: only the trainable weights, not the frozen base model
    def _trainable_state(self) -> dict[str, torch.Tensor]:
        if self.cfg.model.finetune == "lora":
            from .models import lora_state_dict

            unet = self.acc.unwrap_model(self.model.denoiser)
            sd = {f"unet.{k}": v for k, v in _peft(unet).items()}
            if self.cfg.model.lora.text_encoder:
                for i, enc in enumerate(self.model.text_encoders):
                    sd.update({f"te{i}.{k}": v for k, v in _peft(enc).items()})
            return {k: v.detach().float().cpu().contiguous() for k, v in sd.items()}
        return {k: v.detach().cpu().contiguous() for k, v in self.acc.unwrap_model(self.model.denoiser).state_dict().items()}

    def _save_hook(self, models, weights, output_dir):
        from safetensors.torch import save_file

        if self.acc.is_main_process:
            save_file(self._trainable_state(), os.path.join(output_dir, TRAINABLE_FILE))
        while weights:
            weights.pop()

    def _load_hook(self, models, input_dir):
        from safetensors.torch import load_file

        sd = load_file(os.path.join(input_dir, TRAINABLE_FILE))
        while models:
            models.pop()
        unet = self.acc.unwrap_model(self.model.denoiser)
        if self.cfg.model.finetune == "lora":
            from peft.utils import set_peft_model_state_dict

            set_peft_model_state_dict(unet, {k[5:]: v for k, v in sd.items() if k.startswith("unet.")}, adapter_name="default")
            for i, enc in enumerate(self.model.text_encoders):
                part = {k[len(f"te{i}."):]: v for k, v in sd.items() if k.startswith(f"te{i}.")}
                if part:
                    set_peft_model_state_dict(enc, part, adapter_name="default")
            for p in self.params:
                p.data = p.data.float()
        else:
            unet.load_state_dict(sd)

    def save_checkpoint(self, step: int) -> Path:
        """Write a whole checkpoint, or none: a full disk is reported as such (the previous
        checkpoint is untouched, the half-written one removed)."""
        try:
            return self._save_checkpoint(step)
        except (OSError, RuntimeError) as e:
            if not _disk_full(e):
                raise
            tmp = self.run.checkpoints / f".tmp-step-{step:06d}"
            if self.acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)
            prev = self.run.latest_checkpoint()
            kept = f"the previous checkpoint {prev} is whole" if prev is not None else "no earlier checkpoint exists"
            raise RunError(f"disk full while writing the step-{step} checkpoint in {self.run.checkpoints}; {kept}. "
                           f"Free space there and run again with --resume") from None

    def _save_checkpoint(self, step: int) -> Path:
        """accelerate's ``save_state`` into a temp folder, then our COMPLETE marker and an atomic
        rename: ours because accelerate writes in place and marks nothing complete, so a run killed
        mid-save would leave a checkpoint that ``--resume`` cannot tell from a whole one."""
        final = self.run.checkpoints / f"step-{step:06d}"
        tmp = self.run.checkpoints / f".tmp-step-{step:06d}"
        if self.acc.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        self.acc.wait_for_everyone()
        self.acc.save_state(str(tmp))
        self.acc.wait_for_everyone()
        if self.acc.is_main_process:
            state = dict(step=step, nan_streak=self.nan_streak, nan_total=self.nan_total, evals=self.evals,
                         wall_time_s=self.wall_time(), algorithm=self.cfg.algorithm)
            atomic_write(tmp / STATE_FILE, json.dumps(state, indent=1))
            if self.ema is not None:
                self._save_ema(tmp)
            rstate = {k: v.detach().cpu() for k, v in self.reward.state_dict().items() if "norms." in k}
            if rstate:
                from safetensors.torch import save_file

                save_file(rstate, str(tmp / REWARD_STATE_FILE))
            # the Lagrange multiplier: a Python float, written with repr (exact round trip)
            atomic_write(tmp / SHAPING_STATE_FILE, json.dumps(self.scalar_reward.state_dict()))
            mstate = getattr(self.method, "checkpoint_state", None)
            if mstate is not None:  # a method's own state (RAFT's kept set of the current round)
                from safetensors.torch import save_file

                tensors, meta = mstate()
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / METHOD_STATE_FILE), metadata={"json": json.dumps(meta)})
            atomic_write(tmp / COMPLETE_MARKER, "")
            fsync_dir(tmp)
            if final.exists():
                self.run.discard_checkpoint(final)
            os.replace(tmp, final)
            fsync_dir(self.run.checkpoints)
            self.run.prune(self.cfg.log.keep_checkpoints)
        self.acc.wait_for_everyone()
        return final

    def load_checkpoint(self) -> int:
        ck = self.run.latest_checkpoint()
        if ck is None:
            log.info("--resume: no whole checkpoint in %s yet; starting from step 0", self.run.checkpoints)
            if self.acc.is_main_process:
                self.run.truncate_metrics(0)  # steps logged by the killed run are redone
            return 0
        try:
            self.acc.load_state(str(ck))
            state = json.loads((ck / STATE_FILE).read_text())
        except Exception as e:  # a checkpoint we wrote and marked complete should always load
            raise RunError(f"--resume: cannot read checkpoint {ck} ({type(e).__name__}: {e}); delete it to fall back to the previous one") from None
        if self.ema is not None:
            self._load_ema(ck)
        rfile = ck / REWARD_STATE_FILE
        if rfile.exists():
            from safetensors.torch import load_file

            self.reward.load_state_dict(load_file(str(rfile)), strict=False)
        sfile = ck / SHAPING_STATE_FILE
        if sfile.exists():
            self.scalar_reward.load_state_dict(json.loads(sfile.read_text()))
        mfile = ck / METHOD_STATE_FILE
        if mfile.exists() and hasattr(self.method, "load_checkpoint_state"):
            from safetensors import safe_open

            with safe_open(str(mfile), framework="pt") as h:
                meta = json.loads((h.metadata() or {}).get("json", "{}"))
                tensors = {k: h.get_tensor(k) for k in h.keys()}
            self.method.load_checkpoint_state(tensors, meta)
        self.nan_streak, self.nan_total = state["nan_streak"], state["nan_total"]
        self.evals = state.get("evals", [])
        self._time_offset = state.get("wall_time_s", 0.0)
        if self.acc.is_main_process:
            self.run.truncate_metrics(state["step"])
        log.info("resumed from %s (step %d)", ck, state["step"])
        return state["step"]

    # ---- EMA of the trained weights (train.ema)
    ema = None

    def _init_ema(self) -> None:
        """diffusers' EMAModel with its default schedule, as ImageReward's ReFL ``--use_ema``
        (``ImageReward/ReFL.py`` lines 424-428; stepped after each optimizer update, line 773).
        Only the trainable weights (with LoRA the frozen base is its own average). Made after
        ``setup`` so that weights a subclass loads there (IterComp's previous iteration) start it."""
        if self.cfg.train.ema:
            from diffusers.training_utils import EMAModel

            self.ema = EMAModel(self.params, decay=self.cfg.train.ema_decay)

    def _save_ema(self, folder: Path) -> None:
        from safetensors.torch import save_file

        sd = self.ema.state_dict()
        tensors = {f"shadow.{i}": p.detach().float().cpu().contiguous() for i, p in enumerate(sd.pop("shadow_params"))}
        save_file(tensors, str(folder / EMA_FILE), metadata={k: json.dumps(v) for k, v in sd.items()})

    def _load_ema(self, ck: Path) -> None:
        from safetensors import safe_open

        f = ck / EMA_FILE
        if not f.exists():
            raise RunError(f"--resume: checkpoint {ck} has no {EMA_FILE} but train.ema is on; it was written by a run without "
                           "train.ema (resume with the same config)")
        with safe_open(str(f), framework="pt") as h:
            meta = {k: json.loads(v) for k, v in (h.metadata() or {}).items()}
            shadow = [h.get_tensor(f"shadow.{i}") for i in range(len(self.params))]
        self.ema.load_state_dict({**meta, "shadow_params": shadow})
        self.ema.to(self.acc.device)

    @contextlib.contextmanager
    def ema_weights(self):
        """With train.ema on, the averaged weights stand in the model inside this block (eval
        grids, export); the trained ones are put back after."""
        if self.ema is None:
            yield
            return
        self.ema.store(self.params)
        self.ema.copy_to(self.params)
        try:
            yield
        finally:
            self.ema.restore(self.params)

    def wall_time(self) -> float:
        return self._time_offset + (time.time() - self._t0)

    # ------------------------------------------------------------------ eval
    @torch.no_grad()
    def evaluate(self, step: int) -> float:
        """Eval grid of the fixed prompts x seeds at this step; returns the mean eval reward.

        The grid's rows (one per eval seed, all eval prompts, rendered and scored as one batch)
        are shared out over the processes with accelerate's ``split_between_processes``
        (contiguous runs of rows); images, scores and the held-out eval scores come back to every
        process with ``gather_for_metrics`` and the main one writes the grid and logs it, with
        the eval rewards, to the trackers. A row is always one batch and every image has its
        own generator, so the grid and the numbers are the same whatever the number of processes.
        """
        cfg = self.cfg
        seeds = list(cfg.prompts.eval_seeds)
        n = self.acc.num_processes
        # eval never moves a running normalisation (it would also drift apart across processes)
        upd = getattr(self.reward, "update_stats", None)
        if upd is not None:
            self.reward.update_stats = False
        try:
            with self.acc.split_between_processes(list(enumerate(seeds))) as share:
                mine = [self._eval_row(j, seed) for j, seed in share]
        finally:
            if upd is not None:
                self.reward.update_stats = upd
        if n > 1:
            mine = self.acc.gather_for_metrics(mine, use_gather_object=True)
        rows = {r["row"]: r for r in mine}
        assert sorted(rows) == list(range(len(seeds))), f"eval rows gathered: {sorted(rows)}"
        rows = [rows[j] for j in range(len(seeds))]
        scores = [v for r in rows for v in r["scores"]]
        extra = {name: [v for r in rows for v in r["extra"][name]] for name in self.eval_rewards}
        caps = [f"{p} | {v:.3f}" for r in rows for p, v in zip(self.eval_prompts, r["scores"])]
        finite = [s for s in scores if math.isfinite(s)]
        mean = sum(finite) / len(finite) if finite else float("nan")
        grid = self.run.samples / f"step-{step:06d}.png"
        if self.acc.is_main_process:
            save_grid(torch.cat([r["images"] for r in rows]), grid, captions=caps,
                      ncol=len(self.eval_prompts), row_labels=[f"seed {s}" for s in seeds])
        rec = {"step": step, "eval_reward": mean}
        for name, vals in extra.items():
            f = [v for v in vals if math.isfinite(v)]
            rec[f"eval/{name}"] = sum(f) / len(f) if f else float("nan")
        self.evals = [e for e in self.evals if e["step"] != step] + [rec]
        if self.acc.is_main_process:
            scalars = {"eval/eval_reward": mean, **{k: v for k, v in rec.items() if k.startswith("eval/")}}
            self._log_to_trackers(step, {k: v for k, v in scalars.items() if math.isfinite(v)}, {"eval/grid": grid})
        log.info("eval at step %d: reward %.4f%s", step, mean,
                 "".join(f", {k[5:]} {v:.4f}" for k, v in rec.items() if k.startswith("eval/")))
        return mean

    def _log_to_trackers(self, step: int, scalars: dict, images: dict) -> None:
        """Scalars and PNG files to every accelerate tracker of this run (main process only).

        Images go through each tracker's own ``log_images``: TensorBoard as ``(1, H, W, 3)``
        uint8 (``dataformats="NHWC"``), W&B / others as a list of one ``(H, W, 3)`` array.
        """
        if not self.acc.trackers:
            return
        if scalars:
            self.acc.log(scalars, step=step)
        import numpy as np
        from PIL import Image

        arrays = {}
        for tag, path in images.items():
            if Path(path).exists():
                with Image.open(path) as im:
                    arrays[tag] = np.asarray(im.convert("RGB"))
        if not arrays:
            return
        for tracker in self.acc.trackers:
            if not hasattr(tracker, "log_images"):
                continue
            try:
                if tracker.name == "tensorboard":
                    tracker.log_images({k: v[None] for k, v in arrays.items()}, step=step, dataformats="NHWC")
                else:
                    tracker.log_images({k: [v] for k, v in arrays.items()}, step=step)
            except Exception as e:  # a tracker that cannot take images keeps its scalars
                log.warning("tracker %s: could not log images (%s: %s)", tracker.name, type(e).__name__, e)

    def _eval_row(self, row: int, seed: int) -> dict:
        """One row of the eval grid: every eval prompt at ``seed``, one batch, on this process."""
        from .sampling import sample

        cfg, m, prompts = self.cfg, self.model, self.eval_prompts
        den, m.denoiser = m.denoiser, None  # unwrapped UNet: no DDP collective in eval
        try:
            gens = [generator("eval", seed, i) for i in range(len(prompts))]
            cond = m.encode_prompt(prompts, [cfg.prompts.negative] * len(prompts), cfg=cfg.sampling.guidance_scale > 1)
            with self.acc.autocast():
                out = sample(m, cond, num_steps=cfg.sampling.steps, guidance_scale=cfg.sampling.guidance_scale,
                             eta=cfg.sampling.eta, generator=gens)
            images = out.images.float()
            r = self.reward(images, prompts).float().cpu().tolist()
            extra = {name: er(images, prompts).float().cpu().tolist() for name, er in self.eval_rewards.items()}
        finally:
            m.denoiser = den
        return {"row": row, "images": images.cpu(), "scores": r, "extra": extra}

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict:
        self._t0 = time.time()
        self._time_offset = 0.0
        self.nan_streak = self.nan_total = 0
        self.evals: list[dict] = []
        try:
            self.setup()
        except UserError:
            self.run.discard_created()  # the corrected command must not meet a half-made run folder
            raise
        self._init_ema()
        cfg, acc = self.cfg, self.acc
        if acc.is_main_process and not self.resume:
            self.run.write_config(cfg)
        start = self.load_checkpoint() if self.resume else 0
        if acc.is_main_process and self.resume:
            self.run.write_config(cfg)
        if start == 0 and not any(e["step"] == 0 for e in self.evals):
            with self.ema_weights():
                self.evaluate(0)
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.train.max_steps, initial=start, disable=not acc.is_main_process, desc=cfg.algorithm, dynamic_ncols=True)
        A, B, N, rank = cfg.train.gradient_accumulation_steps, cfg.train.batch_size, acc.num_processes, acc.process_index
        if hasattr(self.reward, "update_stats"):
            self.reward.update_stats = True
        if N > 1 and hasattr(self.reward, "stats_gather"):
            # running reward normalisation: statistics from the global batch, the same on every process
            self.reward.stats_gather = lambda v: acc.gather(v.contiguous().to(acc.device)).to(v.device)
        step = start
        for step in range(start + 1, cfg.train.max_steps + 1):
            t_step = time.time()
            metrics_acc: dict[str, list[float]] = {}
            skipped = False
            for micro in range(A):
                # the global batch of this micro-step, the same whatever the process count;
                # this process takes its slice
                g = generator(cfg.seed, "batch", step, micro)
                idx = torch.randint(len(self.train_prompts), (B * N,), generator=g).tolist()
                mine = list(range(rank * B, (rank + 1) * B))
                prompts = [self.train_prompts[idx[j]] for j in mine]
                gens = [generator(cfg.seed, "item", step, micro, j) for j in mine]
                step_gen = generator(cfg.seed, "step", step, micro)
                self.current_step, self.current_micro = step, micro  # for methods that work in rounds (RAFT)
                with acc.accumulate(self.model.denoiser):
                    with acc.autocast():
                        loss, mets = self.method.train_step(prompts, gens, step_gen)
                    finite = torch.isfinite(loss.detach()).float().reshape(1)
                    all_finite = bool(acc.gather(finite).min().item() > 0)
                    if not all_finite:
                        skipped = True
                        self.optimizer.zero_grad(set_to_none=True)
                        continue
                    if not getattr(self.method, "does_own_backward", False):
                        # a method that backpropagates in chunks inside train_step (D3PO: one
                        # denoising step at a time, to bound memory) returns a detached loss
                        acc.backward(loss)
                    for k, v in mets.items():
                        metrics_acc.setdefault(k, []).append(float(v))
                    metrics_acc.setdefault("loss", []).append(float(loss.detach()))
                    if acc.sync_gradients and not skipped:
                        self._sync_outside_grads()
                        gn = None
                        if cfg.train.max_grad_norm:
                            gn = acc.clip_grad_norm_(self.params, cfg.train.max_grad_norm)
                        gfin = all(torch.isfinite(p.grad).all() for p in self.params if p.grad is not None)
                        if gfin:
                            self.optimizer.step()
                            self.lr_scheduler.step()
                            if self.ema is not None:
                                self.ema.step(self.params)
                        else:
                            skipped = True
                        if gn is not None:
                            metrics_acc["grad_norm"] = [float(gn)]
                    self.optimizer.zero_grad(set_to_none=True)
            if skipped:
                self.optimizer.zero_grad(set_to_none=True)
                self.nan_streak += 1
                self.nan_total += 1
                log.warning("step %d: non-finite loss or gradient; step skipped (%d in a row)", step, self.nan_streak)
            else:
                self.nan_streak = 0
            rec = {"step": step, **{k: _mean(v) for k, v in metrics_acc.items()}, "lr": self.lr_scheduler.get_last_lr()[0],
                   "skipped": skipped, "nan_total": self.nan_total, "step_time_s": time.time() - t_step}
            rec = self._reduce(rec)
            if acc.is_main_process:
                if step % cfg.log.every == 0 or step == cfg.train.max_steps:
                    self.run.append_metrics(rec)
                    acc.log({k: v for k, v in rec.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}, step=step)
                # a method whose labels come from several factors (D3PO with HERON) logs no scalar reward_mean
                post = {"reward": f"{rec['reward_mean']:.4f}"} if "reward_mean" in rec else {}
                bar.set_postfix(**post, loss=f"{rec.get('loss', float('nan')):.3g}")
            bar.update(1)
            if self.nan_streak >= cfg.train.max_consecutive_nan:
                bar.close()
                self._end_training()
                raise RunError(f"{self.nan_streak} steps in a row had a non-finite loss or gradient (step {step}); stopping. "
                               f"Lower train.lr, check the reward for NaN, or raise train.max_consecutive_nan. "
                               f"Metrics so far are in {self.run.metrics}")
            if cfg.log.eval_every and step % cfg.log.eval_every == 0 and step != cfg.train.max_steps:
                with self.ema_weights():
                    self.evaluate(step)
            if cfg.log.checkpoint_every and step % cfg.log.checkpoint_every == 0 and step != cfg.train.max_steps:
                self.save_checkpoint(step)
        bar.close()
        if hasattr(self.reward, "update_stats"):
            self.reward.update_stats = False
        final = cfg.train.max_steps
        with self.ema_weights():
            if not any(e["step"] == final for e in self.evals):
                self.evaluate(final)
        self.save_checkpoint(final)
        with self.ema_weights():
            self.export()
        # a fresh pipeline loads the exported file: compared with the final eval, which ran on the
        # same (EMA, when on) weights
        self._export_check = self.check_export(final)
        self._replicas_identical = self.replicas_identical()
        with self.ema_weights():  # a method's own summary figures (D3PO's win rate) on the exported weights
            summary = self.write_summary(final)
        if acc.is_main_process:  # the reward curve and before / after, as images, at the final step
            self._log_to_trackers(final, {}, {"curves/reward_curve": self.run.samples / "reward_curve.png",
                                              "eval/before_after": self.run.samples / "before_after.png"})
        self._end_training()
        bad = self._export_check.get("mismatch") if self._export_check else None
        if bad:
            raise RunError(bad)
        return summary

    def _sync_outside_grads(self) -> None:
        """Average the gradients of the trainable parameters DDP does not wrap over processes,
        as DDP does for the UNet's: a process without a gradient for a parameter counts zero,
        and a parameter no process has a gradient for keeps none (the optimizer skips it)."""
        ps = self.outside_params
        if self.acc.num_processes == 1 or not ps:
            return
        dev = self.acc.device
        has = torch.tensor([float(p.grad is not None) for p in ps], device=dev)
        flat = torch.cat([(p.grad.detach().float() if p.grad is not None else torch.zeros(p.shape, device=dev)).reshape(-1).to(dev)
                          for p in ps] + [has])
        flat = self.acc.reduce(flat, reduction="sum")
        o = 0
        n = self.acc.num_processes
        for p in ps:
            k = p.numel()
            g = (flat[o : o + k] / n).reshape(p.shape)
            o += k
            p.grad = g.to(p.dtype) if p.grad is None else p.grad.copy_(g)
        for p, h in zip(ps, flat[o:].tolist()):
            if h == 0:
                p.grad = None

    def replicas_identical(self) -> Optional[bool]:
        """Multi-process: whether every process holds bit-identical trainable weights (a
        gradient that was never all-reduced shows here); None with one process."""
        if self.acc.num_processes == 1:
            return None
        from accelerate.utils import gather_object

        h = hashlib.sha256()
        for k, v in sorted(self._trainable_state().items()):
            h.update(k.encode())
            h.update(v.contiguous().float().numpy().tobytes())
        digests = gather_object([h.hexdigest()])
        same = len(set(digests)) == 1
        if not same:
            log.warning("the processes' trainable weights differ after training (%d distinct); the main process's are saved",
                        len(set(digests)))
        return same

    # a caller that goes on using the process group after fit() (IterComp's outer loop) sets this
    keep_process_group = False

    def _end_training(self) -> None:
        """accelerate's end_training (trackers finished, process group destroyed), keeping the
        process group when the caller still needs it."""
        if not self.keep_process_group:
            self.acc.end_training()
            return
        for tracker in self.acc.trackers:
            tracker.finish()

    def _reduce(self, rec: dict) -> dict:
        """Average numeric metrics over processes (each process saw its own slice)."""
        if self.acc.num_processes == 1:
            return rec
        keys = sorted(k for k, v in rec.items() if isinstance(v, float))
        t = torch.tensor([rec[k] for k in keys], device=self.acc.device, dtype=torch.float64)
        t = self.acc.reduce(t, reduction="mean")
        return {**rec, **dict(zip(keys, t.tolist()))}

    def export(self) -> None:
        """The trained LoRA (diffusers format) into OUT/lora, or the full UNet into OUT/unet."""
        if not self.acc.is_main_process:
            self.acc.wait_for_everyone()
            return
        root = self.run.root
        tmp = root / ".lora-tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        unet = self.acc.unwrap_model(self.model.denoiser)
        if self.cfg.model.finetune == "lora":
            from .models import save_lora

            save_lora(self.model, tmp, text_encoder=self.cfg.model.lora.text_encoder, unwrap=self.acc.unwrap_model)
            dest = self.run.lora
        else:
            unet.save_pretrained(tmp, safe_serialization=True)
            dest = root / "unet"
        old = root / ".lora-old"
        shutil.rmtree(old, ignore_errors=True)
        if dest.exists():
            os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
        fsync_dir(root)
        self.acc.wait_for_everyone()

    #: how far the exported weights' eval reward may stray from the trainer's own (float noise):
    #: ``atol * (1 + |reward|)``. Our choice. fp32: the same tensors in the same operations (the
    #: quickstart reloads to the same mean to all printed digits); bf16 / fp16: the reloaded LoRA
    #: is stored in the half dtype where the trainer keeps fp32 masters, an allowance not measured
    #: on a GPU yet. The broken export this guards against moved the quickstart's reward by ~0.1.
    EXPORT_ATOL = {"no": 1e-3, "bf16": 2e-2, "fp16": 2e-2, "fp8": 2e-2}

    @torch.no_grad()
    def check_export(self, final: int) -> Optional[dict]:
        """Reload what :meth:`export` wrote, the way a user would (a fresh pipeline from
        ``model.path``, then diffusers' ``load_lora_weights`` of OUT/lora, or OUT/unet), render the
        same eval grid (prompts, seeds, sampler) and score it with the same rewards.

        Returns ``eval_reward_exported`` (and ``eval_<name>_exported`` per held-out reward) and,
        when a score differs from the trainer's own final eval beyond :attr:`EXPORT_ATOL`, a
        ``mismatch`` message (``fit`` then fails the run after writing summary.json). Runs on the
        main process; the result is shared with the others.
        """
        res: Optional[dict] = None
        if self.acc.is_main_process:
            res = self._check_export_main(final)
        if self.acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            box = [res]
            broadcast_object_list(box, from_process=0)
            res = box[0]
        return res

    def _check_export_main(self, final: int) -> Optional[dict]:
        cfg = self.cfg
        ref = next((e for e in self.evals if e["step"] == final), None)
        if ref is None:
            return None
        from .models import load_lora_into, load_model

        wdtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.acc.mixed_precision, torch.float32)
        fresh = load_model(cfg.model.family, cfg.model.path, resolution=cfg.model.resolution, dtype=torch.float32,
                           revision=cfg.model.revision, variant=cfg.model.variant, attention=cfg.model.attention,
                           device=self.acc.device, ip_adapter=cfg.model.ip_adapter)
        for mod in [fresh.unet, fresh.vae, *fresh.text_encoders]:
            mod.to(dtype=wdtype)
        if cfg.model.finetune == "lora":
            where = self.run.lora / "pytorch_lora_weights.safetensors"
            try:
                load_lora_into(fresh, self.run.lora)
            except UserError as e:  # our own file for our own model: a fault of the export, not of input
                return {"eval_reward_exported": None,
                        "mismatch": f"the exported LoRA does not load back into a fresh pipeline: {e}. The last checkpoint is in {self.run.checkpoints}."}
        else:
            from diffusers import UNet2DConditionModel

            where = self.run.root / "unet"
            # into the fresh pipeline's own UNet (which keeps its attention / IP-Adapter processors)
            fresh.unet.load_state_dict(UNet2DConditionModel.from_pretrained(where).state_dict(), strict=False)
            fresh.unet.to(self.acc.device, wdtype)
        trained, self.model = self.model, fresh
        try:
            rows = [self._eval_row(j, seed) for j, seed in enumerate(cfg.prompts.eval_seeds)]
        finally:
            self.model = trained
            del fresh  # a second pipeline: free it before the summary (GPU memory)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        res = {"eval_reward_exported": _mean([v for r in rows for v in r["scores"]])}
        pairs = [("eval_reward", ref["eval_reward"], res["eval_reward_exported"])]
        for name in self.eval_rewards:
            res[f"eval_{name}_exported"] = _mean([v for r in rows for v in r["extra"][name]])
            pairs.append((f"eval_{name}", ref.get(f"eval/{name}"), res[f"eval_{name}_exported"]))
        atol = self.EXPORT_ATOL.get(self.acc.mixed_precision, 2e-2)
        bad = [(k, a, b) for k, a, b in pairs if a is not None and not _close(a, b, atol)]
        log.info("exported weights reloaded from %s: eval reward %.4f (trainer's own: %.4f)", where,
                 res["eval_reward_exported"], ref["eval_reward"])
        if bad:
            res["mismatch"] = (
                f"the exported weights ({where}), reloaded into a fresh pipeline, do not reproduce the trained model: "
                + "; ".join(f"{k} {b:.4f} after reload vs {a:.4f} in training" for k, a, b in bad)
                + f" (allowed: {atol:g} x (1 + |reward|)). The export is kept for inspection; the last checkpoint is in "
                f"{self.run.checkpoints}. Please report this with the config."
            )
        return res

    def write_summary(self, final: int) -> dict:
        records = self.run.read_metrics() if self.acc.is_main_process else []
        evals = sorted(self.evals, key=lambda e: e["step"])
        before = next((e["eval_reward"] for e in evals if e["step"] == 0), None)
        after = next((e["eval_reward"] for e in evals if e["step"] == final), None)
        train_r = [r["reward_mean"] for r in records if r.get("reward_mean") is not None]
        summary = {
            "algorithm": self.cfg.algorithm,
            "model": self.cfg.model.path,
            "reward": self.reward.name,
            "steps": final,
            "wall_time_s": round(self.wall_time(), 2),
            "eval_reward_before": before,
            "eval_reward_after": after,
            # the same eval grid from the exported weights, reloaded into a fresh pipeline
            "eval_reward_exported": (getattr(self, "_export_check", None) or {}).get("eval_reward_exported"),
            "eval_history": evals,
            "train_reward_first": train_r[0] if train_r else None,
            "train_reward_last": train_r[-1] if train_r else None,
            "skipped_steps": self.nan_total,
            "num_processes": self.acc.num_processes,
            "replicas_identical": getattr(self, "_replicas_identical", None),
            "lora": str(self.run.lora) if self.cfg.model.finetune == "lora" else None,
        }
        first = next((e for e in evals if e["step"] == 0), {})
        last = next((e for e in evals if e["step"] == final), {})
        for name in self.eval_rewards:
            summary[f"eval_{name}_before"] = first.get(f"eval/{name}")
            summary[f"eval_{name}_after"] = last.get(f"eval/{name}")
            summary[f"eval_{name}_exported"] = (getattr(self, "_export_check", None) or {}).get(f"eval_{name}_exported")
        summary.update(getattr(self.method, "summary_extra", lambda: {})())
        if self.acc.is_main_process:
            self.run.write_summary(summary)
            plot_curves(records, self.run.samples / "reward_curve.png", evals=evals)
            _before_after(self.run.samples, final)
        return summary


def _disk_full(e: BaseException) -> bool:
    """A write that failed for lack of space: ENOSPC / EDQUOT from Python, or torch's C++ writer
    (PytorchStreamWriter: 'file write failed', which hides the errno)."""
    import errno

    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    msg = str(e)
    return "No space left on device" in msg or "file write failed" in msg


def _before_after(samples: Path, final: int) -> None:
    """Stack the step-0 grid over the final grid into samples/before_after.png."""
    from PIL import Image, ImageDraw

    a, b = samples / "step-000000.png", samples / f"step-{final:06d}.png"
    if not (a.exists() and b.exists()):
        return
    ia, ib = Image.open(a).convert("RGB"), Image.open(b).convert("RGB")
    w = max(ia.width, ib.width)
    out = Image.new("RGB", (w, ia.height + ib.height + 40), "white")
    d = ImageDraw.Draw(out)
    d.text((6, 4), "before (step 0)", fill="black")
    out.paste(ia, (0, 18))
    d.text((6, ia.height + 22), f"after (step {final})", fill="black")
    out.paste(ib, (0, ia.height + 38))
    tmp = samples / ".before_after.tmp.png"
    out.save(tmp)
    os.replace(tmp, samples / "before_after.png")


def _peft(module) -> dict:
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(module, adapter_name="default")


def _close(a: float, b: float, atol: float) -> bool:
    """|a - b| <= atol * (1 + |a|); two NaNs (no image scored) count as equal."""
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= atol * (1 + abs(a))


def _mean(v: list[float]) -> float:
    f = [x for x in v if math.isfinite(x)]
    return sum(f) / len(f) if f else float("nan")


def _flat_scalars(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat_scalars(v, key + "."))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
        elif v is not None:
            out[key] = str(v)
    return out
