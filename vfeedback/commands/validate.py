"""`vfeedback validate CONFIG [key=value ...]`: check a config against the code, load nothing."""
from __future__ import annotations


def add_parser(sub):
    p = sub.add_parser("validate", help="check a config without running it",
                       description="Validate a YAML config: schema, prompt files, reward names and options. Loads no diffusion weights.")
    p.add_argument("config", nargs="?", help="YAML run config")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--help-config", action="store_true", help="list every config field with its default and meaning")
    p.add_argument("--resume", action="store_true", help="check it as `train --resume` would: the run in output_dir is the same run")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..checks import check_run
    from ..config import describe_fields, load_config
    from ..errors import UserError

    if args.help_config:
        print("\n".join(describe_fields()))
        return 0
    if not args.config:
        raise UserError("validate: give a config file (or --help-config)")
    cfg = load_config(args.config, args.overrides)
    # the checks `train` runs before it creates anything (vfeedback/checks.py), so validate
    # accepts exactly what train accepts; no diffusion weights load
    checked = check_run(cfg, resume=args.resume)
    n_train, n_eval = len(checked.train_prompts), len(checked.eval_prompts)
    section = getattr(cfg, cfg.algorithm, None)
    if hasattr(section, "rounds"):
        budget = f"{section.rounds} rounds"
    elif cfg.algorithm == "itercomp":
        budget = f"{section.iterations} iterations x {section.refl_steps} ReFL steps"
    else:
        budget = f"{cfg.train.max_steps} steps"
    print(f"{args.config}: OK ({cfg.algorithm}, {cfg.model.family} {cfg.model.path}, {n_train} train / {n_eval} eval prompts, "
          f"reward {' + '.join(r.name for r in cfg.reward.rewards)}, {budget} -> {cfg.output_dir})")
    return 0
