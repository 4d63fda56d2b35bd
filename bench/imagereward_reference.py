"""Scores of the ``image-reward`` package itself on the seeded checkpoints of
``bench/imagereward_fixture.py``: the reference that ``tests/test_imagereward_reference.py``
holds ``rewards/imagereward.py`` to.

Runs in the separate environment that holds image-reward 1.5 (it cannot be installed beside
vfeedback's pins; ``make imagereward-ref-venv`` builds it), without a network:

    make imagereward-ref-venv
    .venv-ir/bin/python bench/imagereward_reference.py --vit small --out bench/results/imagereward_reference_small.json
    .venv-ir/bin/python bench/imagereward_reference.py --vit large --out bench/results/imagereward_reference_large.json

It writes the checkpoint in the package's format (``ImageReward.pt`` + ``med_config.json``),
loads it with ``ImageReward.load(path, device='cpu', med_config=...)`` and checks the load
left nothing missing or unexpected (the package loads with ``strict=False``), then records,
for the fixed prompts and images:

- ``input_ids`` / ``attention_mask`` of the package's tokenizer (``max_length=35``);
- ``score``: ``model.score(prompt, PIL image)`` (the package's PIL preprocessing, its model);
- ``score_gard``: ``model.score_gard(ids, mask, pixels)`` on pixels normalised here in torch
  without resizing (the 224 x 224 images only): the model alone;
- ``inference_rank``: ``model.inference_rank(prompt, [images])`` for the first prompt;
- the package's preprocessed pixels' mean / std per image (a check on the preprocessing);
- the versions and ``pip freeze`` of the environment.

The tokenizer: the package calls ``BertTokenizer.from_pretrained('bert-base-uncased')``
(``BLIP/blip.py`` line 17); with no network, a Hugging Face cache made here holds the
fixture's vocabulary under that name (``HF_HUB_OFFLINE=1``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import imagereward_fixture as F  # noqa: E402


def _fake_hub_cache(root: Path) -> Path:
    """A Hugging Face hub cache in which ``bert-base-uncased`` is the fixture's tokenizer."""
    snap = root / "models--bert-base-uncased" / "snapshots" / ("0" * 40)
    F.write_tokenizer(snap)
    (root / "models--bert-base-uncased" / "refs").mkdir(parents=True, exist_ok=True)
    (root / "models--bert-base-uncased" / "refs" / "main").write_text("0" * 40)
    return root


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vit", choices=sorted(F.VITS), required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="ir-ref-"))
    os.environ["HF_HUB_CACHE"] = str(_fake_hub_cache(work / "hub"))
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"

    import numpy as np
    import torch
    from PIL import Image

    import ImageReward as RM
    from ImageReward.models.BLIP import blip_pretrain
    from ImageReward.models.BLIP.vit import VisionTransformer

    torch.set_num_threads(1)
    if args.vit != "large":  # sizes only: the package's own VisionTransformer (module docstring of the fixture)
        v = F.VITS[args.vit]

        def create_vit(vit, image_size, use_grad_checkpointing=False, ckpt_layer=0, drop_path_rate=0):
            assert vit == "large" and image_size == 224
            return VisionTransformer(img_size=224, patch_size=16, embed_dim=v["embed_dim"], depth=v["depth"], num_heads=v["num_heads"],
                                     use_grad_checkpointing=use_grad_checkpointing, ckpt_layer=ckpt_layer, drop_path_rate=0.1), v["embed_dim"]

        blip_pretrain.create_vit = create_vit

    t0 = time.time()
    ckpt, cfg = F.write_checkpoint(work / "ckpt", args.vit)
    sd = torch.load(ckpt, map_location="cpu", weights_only=True)
    model = RM.load(str(ckpt), device="cpu", med_config=str(cfg))
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = sorted(k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
    if missing or unexpected or wrong:
        raise SystemExit(f"checkpoint does not match the package's model: missing {missing[:5]}, unexpected {unexpected[:5]}, shape {wrong[:5]}")
    if not all(torch.equal(own[k], sd[k]) for k in sd):
        raise SystemExit("the package did not load the checkpoint's values")
    load_s = time.time() - t0

    imgs = F.images_uint8()
    pil = [Image.fromarray(a) for a in imgs]
    tok = model.blip.tokenizer(F.PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    t0 = time.time()
    with torch.no_grad():
        score = [model.score(p, im) for p, im in zip(F.PROMPTS, pil)]
        pre = [model.preprocess(im) for im in pil]
        square = [i for i, a in enumerate(imgs) if a.shape[:2] == (224, 224)]
        mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
        std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
        pix = torch.stack([(torch.from_numpy(imgs[i]).permute(2, 0, 1).float() / 255 - mean) / std for i in square])
        gard = model.score_gard(tok.input_ids[square], tok.attention_mask[square], pix).squeeze(-1).tolist()
        rank, rank_scores = model.inference_rank(F.PROMPTS[0], pil)
    score_s = time.time() - t0

    freeze = subprocess.run([sys.executable, "-m", "pip", "freeze", "--all"], capture_output=True, text=True, check=True).stdout.split()
    import timm
    import transformers

    doc = {
        "what": "image-reward package scores on bench/imagereward_fixture.py's seeded checkpoint and inputs",
        "command": f"{Path(sys.executable).relative_to(Path.cwd()) if Path(sys.executable).is_relative_to(Path.cwd()) else sys.executable} "
                   f"bench/imagereward_reference.py --vit {args.vit} --out {args.out}",
        "vit": args.vit, "vit_dims": F.VITS[args.vit], "med_config": F.MED_CONFIG, "seed": F.SEED,
        "prompts": F.PROMPTS, "image_sizes": F.IMAGE_SIZES,
        "input_ids": tok.input_ids.tolist(), "attention_mask": tok.attention_mask.tolist(),
        "score": score,
        "score_gard": {"images": square, "scores": gard},
        "inference_rank": {"prompt": 0, "rank": rank, "scores": rank_scores},
        "preprocessed_mean_std": [[float(x.mean()), float(x.std())] for x in pre],
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
                     "timm": timm.__version__, "image-reward": next(l.split("==")[1] for l in freeze if l.lower().startswith("image-reward=="))},
        "pip_freeze": freeze,
        "seconds": {"load": round(load_s, 1), "score": round(score_s, 1)},
        "machine": platform.machine(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps({k: doc[k] for k in ("score", "score_gard", "seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
