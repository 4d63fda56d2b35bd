"""GRPO teaches a causal LM to rewrite image requests into prompts that a diffusion model renders
well, by a vision reward on the rendered image (prompt rewriting, like Promptist / PRIP).

    # CPU, a couple of minutes: tiny random LM, tiny:sd15, tiny random CLIP (shows the plumbing only)
    python demos/llm_prompt_rewriter.py --tiny

    # real models (GPU): a small instruct LM, SD1.5, CLIP ViT-L/14
    python demos/llm_prompt_rewriter.py --model Qwen/Qwen2.5-0.5B-Instruct \\
        --diffusion stable-diffusion-v1-5/stable-diffusion-v1-5 --clip-model ViT-L-14 --clip-pretrained openai \\
        --steps 200 --sd-steps 20 --out runs/prompt_rewriter

The reward scores each rendering against the *original request* (column ``request``), so the
LM is paid for prompts whose images show what the user asked for.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path

REQUESTS = [
    "a red fox in the snow", "a lighthouse at night", "a bowl of ramen", "a cat wearing a hat",
    "a castle on a hill", "a robot reading a book", "sunflowers in a vase", "a sailboat at sunset",
]
TEMPLATE = "Rewrite the request as a detailed image-generation prompt.\nRequest: {r}\nPrompt:"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny random LM, tiny:sd15 and tiny random CLIP (CPU, offline)")
    ap.add_argument("--model", default=None, help="causal LM: hub id or folder (default with --tiny: a tiny random Llama)")
    ap.add_argument("--diffusion", default="tiny:sd15", help="diffusion pipeline for load_model: tiny:sd15, hub id or folder")
    ap.add_argument("--family", default="sd15", choices=["sd15", "sdxl"])
    ap.add_argument("--clip-model", default="ViT-L-14")
    ap.add_argument("--clip-pretrained", default="openai")
    ap.add_argument("--steps", type=int, default=8, help="GRPO steps")
    ap.add_argument("--num-generations", type=int, default=4)
    ap.add_argument("--max-completion-length", type=int, default=24)
    ap.add_argument("--sd-steps", type=int, default=4, help="DDIM steps per rendering")
    ap.add_argument("--guidance", type=float, default=1.0, help="CFG scale for the renderings (1: none)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--out", default=None, help="output folder (default: a temp folder)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    import rewards
    from vfeedback.integrations.tiny import write_tiny_lm, write_tiny_open_clip
    from vfeedback.integrations.trl import PromptToImage, reward_function

    t0 = time.time()
    out = Path(args.out or tempfile.mkdtemp(prefix="prompt-rewriter-"))
    out.mkdir(parents=True, exist_ok=True)
    model = args.model
    if args.tiny:
        model = model or str(write_tiny_lm(out / "tiny-lm"))
        clip_name, clip_ckpt = write_tiny_open_clip(out / "tiny-clip")
        clip = rewards.load("clip", model=clip_name, pretrained=clip_ckpt, raw=True)
    else:
        if model is None:
            ap.error("--model is required without --tiny")
        clip = rewards.load("clip", model=args.clip_model, pretrained=args.clip_pretrained)
    fn = reward_function(clip, render=PromptToImage(args.diffusion, family=args.family, num_steps=args.sd_steps,
                                                    guidance_scale=args.guidance, device="cuda" if torch.cuda.is_available() else None))
    ds = Dataset.from_dict({"prompt": [TEMPLATE.format(r=r) for r in REQUESTS], "request": REQUESTS})
    cfg = GRPOConfig(
        output_dir=str(out / "trl"), per_device_train_batch_size=args.num_generations, num_generations=args.num_generations,
        max_completion_length=args.max_completion_length, max_steps=args.steps, learning_rate=args.lr, logging_steps=1,
        report_to="none", save_strategy="no", disable_tqdm=True, use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=False, seed=0,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=[fn], args=cfg, train_dataset=ds)
    t_setup = time.time() - t0
    trainer.train()
    key = f"rewards/{fn.__name__}/mean"
    curve = [h[key] for h in trainer.state.log_history if key in h]
    summary = {
        "reward_curve": curve, "steps": len(curve), "completions_scored": fn.scored, "completions_failed": fn.failed,
        "failures": dict(fn.failures), "setup_s": round(t_setup, 1), "wall_s": round(time.time() - t0, 1), "out": str(out),
    }
    sample_prompt = TEMPLATE.format(r=REQUESTS[0])
    tok = trainer.processing_class
    ids = tok(sample_prompt, return_tensors="pt").to(trainer.model.device)
    with torch.no_grad():
        gen = trainer.model.generate(**ids, max_new_tokens=args.max_completion_length, do_sample=False)
    summary["example"] = {"request": REQUESTS[0], "rewrite": tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
