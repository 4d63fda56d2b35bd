"""`vfeedback sample`: render prompts with a model (and optionally a trained LoRA) to PNGs."""
from __future__ import annotations

from pathlib import Path


def add_parser(sub):
    p = sub.add_parser("sample", help="render prompts, optionally with a trained LoRA",
                       description="Render prompts with the DDIM sampler; --config takes model and sampling settings from a run config.")
    p.add_argument("--config", help="run config to take model / sampling settings from")
    p.add_argument("--model", help="model path (hub id, folder, tiny:sd15, tiny:sdxl); overrides the config")
    p.add_argument("--family", choices=["sd15", "sdxl"], help="model family (default: from the config, or guessed from --model)")
    p.add_argument("--lora", help="LoRA folder (a run's OUT/lora) to load with diffusers' load_lora_weights")
    p.add_argument("--prompt", action="append", required=True, help="prompt (repeat for several)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, one image per prompt and seed. Image i (the i-th --prompt) of "
                   "seed N starts from torch.Generator().manual_seed(derive_seed('eval', N, i)), derive_seed = the low 63 bits of the "
                   "little-endian first 8 bytes of sha256(b'eval/N/i') (vfeedback.engine.derive_seed), not manual_seed(N); "
                   "README 'Seeds' shows the diffusers one-liner that reproduces it")
    p.add_argument("--steps", type=int, help="DDIM steps")
    p.add_argument("--guidance-scale", type=float)
    p.add_argument("--eta", type=float)
    p.add_argument("--out", default="samples", help="output folder for PNGs (and grid.png)")
    p.add_argument("--device", default=None)
    p.set_defaults(func=run)


def _flags(args, steps: int, gs: float, eta: float):
    """The sampling flags, checked by the config schema's own fields (SamplingConfig): the same
    bounds as sampling.* in a config, reported under the flag's name."""
    from pydantic import ValidationError

    from ..config import SEED_MAX, SamplingConfig
    from ..errors import UserError

    flag = {"steps": "--steps", "guidance_scale": "--guidance-scale", "eta": "--eta"}
    try:
        sc = SamplingConfig(steps=args.steps if args.steps is not None else steps,
                            guidance_scale=args.guidance_scale if args.guidance_scale is not None else gs,
                            eta=args.eta if args.eta is not None else eta)
    except ValidationError as e:
        first = e.errors()[0]
        name = flag.get(str(first["loc"][0]), str(first["loc"][0]))
        raise UserError(f"{name}: {first['msg']} (got {first.get('input')!r})") from None
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds: expected comma-separated integers, got {args.seeds!r}") from None
    if not seeds:
        raise UserError(f"--seeds: no seed in {args.seeds!r}; give e.g. --seeds 0,1")
    bad = [s for s in seeds if not 0 <= s <= SEED_MAX]
    if bad:
        raise UserError(f"--seeds: {bad[0]} is outside 0..{SEED_MAX}")
    prompts = [p for p in args.prompt if p.strip()]
    if len(prompts) != len(args.prompt):
        raise UserError("--prompt: an empty prompt; give text, e.g. --prompt 'a red apple'")
    return sc.steps, sc.guidance_scale, sc.eta, seeds


def _out_folder(out: Path, names: list[str]) -> None:
    """--out: a folder (new, or existing) where none of the files this command writes exists."""
    from ..errors import UserError

    if not str(out).strip():
        raise UserError("--out: empty path; give a folder, e.g. --out samples")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out: {out} exists and is not a folder")
    clash = [n for n in names if (out / n).exists()]
    if clash:
        raise UserError(f"--out: {out} already holds {', '.join(clash[:3])}{' ...' if len(clash) > 3 else ''}; "
                        "they are left alone: choose another --out folder")


def run(args) -> int:
    import sys

    import torch
    from tqdm.auto import tqdm

    from rewards.images import to_pil

    from ..checks import check_device
    from ..config import load_config
    from ..engine import generator
    from ..errors import UserError
    from ..models import load_lora_into, load_model
    from ..rundir import save_grid
    from ..sampling import sample

    steps, gs, eta, family, path, res, ip = 40, 7.5, 0.0, args.family, args.model, None, None
    if args.config:
        cfg = load_config(args.config)
        steps, gs, eta = cfg.sampling.steps, cfg.sampling.guidance_scale, cfg.sampling.eta
        family = family or cfg.model.family
        path = path or cfg.model.path
        res = cfg.model.resolution
        ip = cfg.model.ip_adapter if not args.model else None  # the adapter the LoRA was trained with
    if not path:
        raise UserError("sample: give --model or --config")
    if family is None:
        family = "sdxl" if "xl" in path.lower() else "sd15"
    steps, gs, eta, seeds = _flags(args, steps, gs, eta)
    check_device(args.device, "--device")
    out = Path(args.out)
    names = [f"p{i:02d}-seed{seed}.png" for seed in seeds for i in range(len(args.prompt))] + ["grid.png"]
    _out_folder(out, names)
    if args.lora and not Path(args.lora).exists():
        raise UserError(f"--lora: {args.lora}: no such folder; give a run's OUT/lora folder")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_model(family, path, resolution=res, device=device, ip_adapter=ip)
    if args.lora:
        load_lora_into(model, args.lora)
    out.mkdir(parents=True, exist_ok=True)
    imgs, caps = [], []
    bar = tqdm(total=len(seeds) * len(args.prompt), unit="img", desc="sample", file=sys.stderr, dynamic_ncols=True)
    with torch.no_grad():
        for seed in seeds:
            gens = [generator("eval", seed, i) for i in range(len(args.prompt))]
            cond = model.encode_prompt(args.prompt, cfg=gs > 1)
            res_ = sample(model, cond, num_steps=steps, guidance_scale=gs, eta=eta, generator=gens)
            for i, (p, im) in enumerate(zip(args.prompt, to_pil(res_.images))):
                f = out / f"p{i:02d}-seed{seed}.png"
                im.save(f)
                bar.write(str(f), file=sys.stdout)
            bar.update(len(args.prompt))
            imgs.append(res_.images.cpu())
            caps += args.prompt
    bar.close()
    save_grid(torch.cat(imgs), out / "grid.png", captions=caps, ncol=len(args.prompt))
    print(out / "grid.png")
    return 0
