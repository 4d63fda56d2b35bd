"""`vfeedback train CONFIG [key=value ...] [--resume] [--num-processes N]`."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

log = logging.getLogger("vfeedback")


def add_parser(sub):
    p = sub.add_parser("train", help="fine-tune from a YAML config", description="Run a fine-tune from a YAML config into its output_dir.")
    p.add_argument("config", help="YAML run config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override config fields, e.g. train.max_steps=10")
    p.add_argument("--resume", action="store_true", help="continue the run in output_dir from its newest whole checkpoint")
    p.add_argument("--dry-run", action="store_true",
                   help="check everything and load the model up to the first step, then stop; writes nothing")
    p.add_argument("--num-processes", type=int, default=1, metavar="N",
                   help="launch N processes through `accelerate launch` (multi-GPU, or gloo on CPU)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..config import load_config
    from ..errors import UserError

    cfg = load_config(args.config, args.overrides)  # validate before anything is launched
    if args.num_processes < 1:
        raise UserError(f"--num-processes must be >= 1, got {args.num_processes}")
    if args.dry_run:
        return _dry_run(cfg, args)
    if args.num_processes > 1 and "LOCAL_RANK" not in os.environ:
        rest = ["-m", "vfeedback", "train", args.config, *args.overrides] + (["--resume"] if args.resume else [])
        if cfg.train.device == "cpu" or not _cuda():
            # CPU: torch's own launcher; accelerate's Accelerator(cpu=True) then picks up the
            # world size and runs MULTI_CPU with the gloo backend
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.num_processes),
                   "--master_addr", "127.0.0.1", "--master_port", str(_free_port())] + rest
        else:
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(args.num_processes),
                   "--num_machines", "1", "--dynamo_backend", "no"] + rest
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        return subprocess.call(cmd, env=env)
    from ..algorithms import get_method
    from ..engine import Trainer

    method = get_method(cfg.algorithm)
    if hasattr(method, "run_standalone"):
        # methods with their own loop (no gradients: ZO-RankSGD) still write the same run folder
        summary = method.run_standalone(cfg, resume=args.resume)
    else:
        summary = Trainer(cfg, resume=args.resume, config_source=args.config).fit()
    if summary is not None and _is_main():
        b, a = summary.get("eval_reward_before"), summary.get("eval_reward_after")
        print(f"done: {summary['steps']} steps in {summary['wall_time_s']:.0f}s; eval reward {_fmt(b)} -> {_fmt(a)}")
        print(f"run folder: {cfg.output_dir} (summary.json, samples/before_after.png, lora/)")
    return 0


def _dry_run(cfg, args) -> int:
    """Everything `train` does before its first step (the checks `validate` runs, the model
    loaded, the LoRA and the optimizer built), in this process, writing nothing."""
    from ..algorithms import get_method

    method = get_method(cfg.algorithm)
    if hasattr(method, "run_standalone"):
        from ..algorithms.zo_ranksgd_diffusion import load_model_for
        from ..checks import check_run

        check_run(cfg, resume=args.resume)
        load_model_for(cfg)
    else:
        from ..engine import Trainer

        Trainer(cfg, resume=args.resume, config_source=args.config).setup(dry_run=True)
    print(f"{args.config}: dry run OK ({cfg.algorithm}, {cfg.model.path} loaded; nothing written to {cfg.output_dir})")
    return 0


def _fmt(v):
    return "n/a" if v is None else f"{v:.4f}"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _is_main() -> bool:
    return os.environ.get("RANK", "0") == "0"
