"""The checks of a run that need files, the reward registry or the model's layout but no
diffusion weights, in one place: ``vfeedback validate`` runs them and ``vfeedback train`` runs
the same ones before it creates anything, so both accept exactly the same configs (the property
test in tests/test_input_properties.py holds them to it).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .config import RunConfig, read_prompts
from .errors import UserError

log = logging.getLogger(__name__)

# fields a --resume may change, per algorithm (the rest define the run)
RESUMABLE = {
    "refl": ("train.max_steps", "log"),
    "d3po": ("train.max_steps", "log"),
    "zo_ranksgd": ("zo_ranksgd.rounds", "log"),
    "itercomp": ("itercomp.iterations", "log"),
    "ddpo": ("train.max_steps", "log"),
    "grpo": ("train.max_steps", "log"),
    "raft": ("train.max_steps", "log"),
    "diffusion_dpo": ("train.max_steps", "log"),
    "draft": ("train.max_steps", "log"),
}


def check_device(device: Optional[str], flag: str) -> None:
    """Refuse a device this machine does not have (``cuda`` without a GPU, ``cuda:3`` with two),
    rather than falling back to another one silently."""
    if device is None:
        return
    import torch

    if device == "cpu":
        return
    if device == "cuda" or device.startswith("cuda:"):
        idx = device.split(":", 1)[1] if ":" in device else "0"
        if not idx.isdigit():
            raise UserError(f"{flag}: {device!r} is not a device; use cpu, cuda, cuda:N or mps")
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise UserError(f"{flag}: {device} asked for, but no CUDA GPU is visible here; use cpu (or leave it unset)")
        if int(idx) >= n:
            raise UserError(f"{flag}: {device} asked for, but there are {n} GPU(s) (cuda:0..cuda:{n - 1})")
        return
    if device == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(f"{flag}: mps asked for, but this machine has no Apple GPU; use cpu (or leave it unset)")
        return
    raise UserError(f"{flag}: unknown device {device!r}; use cpu, cuda, cuda:N or mps")


def check_lora_targets(family: str, src: str, targets: list[str], field_name: str = "model.lora.target_modules") -> None:
    """Every LoRA target module name must match a module of the UNet (peft's own matching rule),
    checked on the UNet built from its config on the meta device: no weights are read. Hub ids
    not yet downloaded are skipped here (train refuses them when peft does)."""
    cfg_file = Path(src) / "unet" / "config.json"
    if not cfg_file.is_file():
        return
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(json.loads(cfg_file.read_text()))
    names = [n for n, _ in unet.named_modules() if n]
    bad = [t for t in targets if not any(check_target_module_exists(LoraConfig(target_modules=[t]), n) for n in names)]
    if bad:
        import torch

        layers = sorted({".".join(n.split(".")[-2:]) if n.split(".")[-1].isdigit() else n.split(".")[-1]
                         for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))})
        raise UserError(f"{field_name}: no UNet module is named {', '.join(map(repr, bad))}; "
                        f"this UNet's linear and conv layers are named {', '.join(layers)}")


@dataclass
class Checked:
    """What the checks read, for the caller to use rather than read twice."""

    train_prompts: list[str]
    eval_prompts: list[str]
    reward: object = None
    eval_rewards: dict = field(default_factory=dict)
    model_source: Optional[str] = None
    cost: object = None  # the cost scorer of cfg.cost (vfeedback/reward_shaping.py)


def check_run(cfg: RunConfig, resume: bool = False, main_process: bool = True) -> Checked:
    """Everything about a run that can be checked without diffusion weights and without
    creating anything: prompts, rewards (built: their options are checked by their own code),
    the method's own inputs, the device, the model's source and LoRA targets, the run folder
    (see :meth:`RunDir.check`) and, with ``resume``, that the saved run is the same run.
    Raises :class:`UserError`."""
    import rewards

    from .algorithms import get_method
    from .rundir import RunDir

    train_p = read_prompts(cfg.prompts.train, "prompts.train")
    eval_p = read_prompts(cfg.prompts.eval, "prompts.eval") if cfg.prompts.eval else train_p[:4]
    method = get_method(cfg.algorithm)
    specs = [dict(name=r.name, weight=r.weight, **r.options) for r in cfg.reward.rewards]
    ens = cfg.reward.ensemble
    try:
        reward = rewards.combine(specs, normalize=cfg.reward.normalize, ensemble=ens.mode if ens else None,
                                 uwo_lambda=ens.uwo_lambda if ens else 0.5)
    except rewards.RewardError as e:
        raise UserError(f"reward: {e}") from None
    from .reward_shaping import check_config as check_guards

    check_guards(cfg, method)
    cost = None
    if cfg.cost is not None:
        try:
            cost = rewards.load(cfg.cost.name, **cfg.cost.options)
        except rewards.RewardError as e:
            raise UserError(f"cost: {e}") from None
    if cfg.heron is not None:  # the hierarchical judge's factors: known, installed, their options valid
        from .feedback.heron import check_heron_factors

        check_heron_factors(cfg, "heron")
        for i, f in enumerate(cfg.heron.factors):
            try:
                rewards.load(f.name, **f.options)
            except rewards.RewardError as e:
                raise UserError(f"heron.factors.{i}: {e}") from None
    names = [s.name for s in cfg.eval_rewards]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"eval_rewards: {', '.join(dup)} listed twice; each eval reward is reported under its name, list it once")
    eval_rewards = {}
    for i, spec in enumerate(cfg.eval_rewards):
        try:
            eval_rewards[spec.name] = rewards.load(spec.name, **spec.options)
        except rewards.RewardError as e:
            raise UserError(f"eval_rewards.{i}: {e}") from None
    if getattr(method, "needs_differentiable_reward", False) and not reward.differentiable:
        raise UserError(f"reward: {reward.name} is not differentiable; {cfg.algorithm} backpropagates through the reward "
                        "(use d3po or zo_ranksgd for black-box rewards)")
    check = getattr(method, "check_config", None)
    if check is not None:
        check(cfg)
    check_device(cfg.train.device, "train.device")
    import torch

    gpu = torch.cuda.is_available() and cfg.train.device != "cpu"
    if cfg.train.mixed_precision == "fp16" and not gpu:
        raise UserError("train.mixed_precision: fp16 needs a GPU; use auto, no or bf16 on CPU")
    if cfg.model.attention == "xformers":
        from .models.loader import xformers_usable

        if not (gpu and xformers_usable(torch.device("cuda"))):
            raise UserError("model.attention: xformers needs CUDA and `pip install 'vfeedback[gpu]'`; use attention: auto or sdpa")
    if cfg.train.optimizer == "adamw8bit":
        from .models.speed import bitsandbytes_missing

        msg = bitsandbytes_missing()
        if msg:
            raise UserError(msg)
    from .models.loader import model_source

    src = model_source(cfg.model.family, cfg.model.path)
    if cfg.model.finetune == "lora":
        check_lora_targets(cfg.model.family, src, list(cfg.model.lora.target_modules))
    if main_process:
        rd = RunDir(cfg.output_dir)
        rd.check(resume)
        if resume:
            rd.check_resume_config(cfg, RESUMABLE.get(cfg.algorithm, ("log",)))
            ck = rd.latest_checkpoint()
            if ck is not None and RESUMABLE.get(cfg.algorithm, ("",))[0] == "train.max_steps":
                done = int(ck.name.split("-")[1])
                if cfg.train.max_steps < done:
                    raise UserError(f"--resume: train.max_steps={cfg.train.max_steps} is below the step of the run's newest checkpoint "
                                    f"({ck.name}, step {done}); give train.max_steps >= {done}, or start a new output_dir")
    return Checked(train_p, eval_p, reward, eval_rewards, src, cost)
