"""`--seeds N` is reproducible in a stock diffusers pipeline with the README's one-liner:
image i of `vfeedback sample --prompt ... --seeds N` is DDIM (eta 0) from a CPU generator seeded
with derive_seed("eval", N, i)."""
import hashlib

import numpy as np
import torch
from PIL import Image

from vfeedback.cli import main
from vfeedback.engine import derive_seed


def test_derive_seed_is_the_documented_sha256():
    # the derivation the README and --help spell out, for users without vfeedback
    h = hashlib.sha256(b"eval/3/1").digest()
    assert derive_seed("eval", 3, 1) == int.from_bytes(h[:8], "little") & (2**63 - 1)
    assert derive_seed("eval", 0, 0) != 0


def test_readme_one_liner_reproduces_sample_in_a_stock_pipeline(tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from vfeedback.models.tiny import tiny_path

    prompts = ["a red apple", "a blue lake"]
    assert main(["sample", "--model", "tiny:sd15", "--prompt", prompts[0], "--prompt", prompts[1], "--seeds", "3",
                 "--steps", "6", "--guidance-scale", "4", "--eta", "0", "--out", str(tmp_path), "--device", "cpu"]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_path("sd15")), safety_checker=None)
    # --- the README's lines ---
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    for i, prompt in enumerate(prompts):
        ours = np.asarray(Image.open(tmp_path / f"p{i:02d}-seed3.png").convert("RGB"))
        image = pipe(prompt, num_inference_steps=6, guidance_scale=4.0, eta=0.0, height=ours.shape[0], width=ours.shape[1],
                     generator=torch.Generator().manual_seed(derive_seed("eval", 3, i))).images[0]
        # `sample` renders both prompts as one batch; batched float sums may flip a rounding to
        # uint8 (measured: one value of 3072 off by one level for prompt 0, prompt 1 identical)
        diff = np.abs(np.asarray(image).astype(int) - ours.astype(int))
        assert diff.max() <= 1 and diff.mean() < 1e-3
    # another seed gives another image (the test would pass for any seed otherwise)
    other = pipe(prompts[0], num_inference_steps=6, guidance_scale=4.0, eta=0.0, height=ours.shape[0], width=ours.shape[1],
                 generator=torch.Generator().manual_seed(3)).images[0]
    assert not (np.asarray(other) == np.asarray(Image.open(tmp_path / "p00-seed3.png").convert("RGB"))).all()
