"""Throughput of scoring: batched vs one image per call vs reloading the weights per call.

    OMP_NUM_THREADS=1 python bench/score_throughput.py             # tiny-but-not-trivial model, CPU
    python bench/score_throughput.py --checkpoint HPS_v2.1_compressed.pt --model ViT-H-14 --device cuda

Three ways to score N images with an HPSv2-style scorer (open_clip model + checkpoint):

- ``batched``: ``rewards.load("hpsv2", ...)`` once, ``score(images, batch_size=B)``;
- ``one_per_call``: the same loaded reward, one image per call;
- ``reload_per_call``: what HPSv2's ``hpsv2.score`` does per call — ``torch.load`` the
  checkpoint and ``load_state_dict`` it again, PIL preprocessing, tokenise, forward.

All three run in this process on the same images; ratios are against ``reload_per_call`` and
``one_per_call``. Results go to stdout and ``bench/results/score_throughput.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rewards  # noqa: E402
from rewards.images import to_pil  # noqa: E402

BENCH_MODEL = "vf-bench-clip"
# ~21M parameters, 128 px input: big enough that compute, not Python overhead, dominates
BENCH_CFG = {
    "embed_dim": 256,
    "vision_cfg": {"image_size": 128, "layers": 4, "width": 256, "patch_size": 16, "head_width": 64},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 4},
}


def make_checkpoint(folder: Path, arch: str) -> str:
    """A random-weight checkpoint in the HPS layout ({'state_dict': ...}); reused if present."""
    import open_clip

    if arch == BENCH_MODEL:
        (folder / f"{BENCH_MODEL}.json").write_text(json.dumps(BENCH_CFG))
        open_clip.add_model_config(folder / f"{BENCH_MODEL}.json")
    path = folder / f"bench_{arch}.pt"
    if not path.is_file():
        torch.manual_seed(0)
        model = open_clip.create_model(arch)
        torch.save({"state_dict": model.state_dict()}, path)
    return str(path)


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=48, help="images to score (default 48)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--size", type=int, default=256, help="side of the generated test images")
    ap.add_argument("--checkpoint", help="a real HPS checkpoint (default: a generated tiny one)")
    ap.add_argument("--model", default=None, help="open_clip architecture of --checkpoint (default ViT-H-14)")
    ap.add_argument("--arch", default=BENCH_MODEL, help="architecture of the generated random checkpoint (e.g. ViT-H-14 for HPSv2's real size)")
    ap.add_argument("--workdir", help="keep the generated checkpoint here and reuse it (default: a temp folder)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", help="dtype of the batched / one-per-call reward (float32, float16, bfloat16)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "score_throughput.json"))
    args = ap.parse_args(argv)

    import open_clip

    tmp = tempfile.TemporaryDirectory()
    if args.checkpoint:
        ckpt, arch = args.checkpoint, args.model or "ViT-H-14"
    else:
        work = Path(args.workdir) if args.workdir else Path(tmp.name)
        work.mkdir(parents=True, exist_ok=True)
        ckpt, arch = make_checkpoint(work, args.arch), args.arch
    dev = torch.device(args.device)

    g = torch.Generator().manual_seed(0)
    images = torch.rand(args.n, 3, args.size, args.size, generator=g)
    images = torch.nn.functional.avg_pool2d(images, 5, 1, 2)  # smoother than white noise
    prompts = [f"a photo number {i}" for i in range(args.n)]
    pils = to_pil(images)

    t_load = timed(lambda: rewards.load("hpsv2", checkpoint=ckpt, model=arch, device=str(dev), dtype=args.dtype))
    r = rewards.load("hpsv2", checkpoint=ckpt, model=arch, device=str(dev), dtype=args.dtype)
    r.score(images[:2], prompts[:2], batch_size=2)  # warm-up

    results: dict = {}
    batched: list = []
    results["batched"] = timed(lambda: batched.extend(r.score(images, prompts, batch_size=args.batch_size)))

    single: list = []

    def one_per_call():
        for i in range(args.n):
            r._text.store.clear()  # a fresh call would encode its prompt again
            single.extend(r.score(images[i : i + 1], prompts[i : i + 1]))

    results["one_per_call"] = timed(one_per_call)

    # HPSv2's hpsv2.score(): model built once, checkpoint torch.load-ed and loaded per call
    model, _, pp = open_clip.create_model_and_transforms(arch, pretrained=None, device=dev)
    pp = open_clip.image_transform(model.visual.image_size, is_train=False, resize_mode="longest")
    tok = open_clip.get_tokenizer(arch)
    model.eval()
    reloaded: list = []

    def reload_per_call():
        for i in range(args.n):
            sd = torch.load(ckpt, map_location=dev, weights_only=True)["state_dict"]
            model.load_state_dict(sd)
            with torch.no_grad():
                out = model(pp(pils[i])[None].to(dev), tok([prompts[i]]).to(dev))
                reloaded.append(float(torch.diagonal(out["image_features"] @ out["text_features"].T)[0]) if isinstance(out, dict) else float(torch.diagonal(out[0] @ out[1].T)[0]))

    results["reload_per_call"] = timed(reload_per_call)

    agree = max(abs(a - b) for a, b in zip(batched, single))
    agree_ref = max(abs(a - b) for a, b in zip(batched, reloaded))
    doc = {
        "bench": "score_throughput",
        "model": arch,
        "checkpoint": "generated random (%.1fM params)" % (sum(p.numel() for p in r.parameters()) / 1e6) if not args.checkpoint else args.checkpoint,
        "device": str(dev) + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""),
        "dtype": args.dtype,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "n_images": args.n,
        "image_size": args.size,
        "batch_size": args.batch_size,
        "load_seconds": round(t_load, 3),
        "modes": {k: {"seconds": round(v, 3), "images_per_s": round(args.n / v, 2)} for k, v in results.items()},
        "ratios": {
            "batched_vs_one_per_call": round(results["one_per_call"] / results["batched"], 2),
            "batched_vs_reload_per_call": round(results["reload_per_call"] / results["batched"], 2),
            "one_per_call_vs_reload_per_call": round(results["reload_per_call"] / results["one_per_call"], 2),
        },
        "max_abs_diff": {"batched_vs_one_per_call": agree, "batched_vs_reference_pipeline": agree_ref},
    }
    text = json.dumps(doc, indent=2)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
