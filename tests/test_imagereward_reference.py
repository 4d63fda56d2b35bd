"""``rewards/imagereward.py`` (transformers' BLIP) against the ``image-reward`` package.

The package cannot be installed beside vfeedback's pins, so its scores on a seeded checkpoint in
its real format (``bench/imagereward_fixture.py``) were recorded once by
``bench/imagereward_reference.py`` in a separate environment (``make imagereward-ref-venv``;
command, versions and ``pip freeze`` inside ``bench/results/imagereward_reference_*.json``).
Here the same checkpoint is regenerated from its seed and scored by our scorer:

- token ids equal the package's exactly;
- the model alone (``score_gard`` on the same normalised pixels) and the whole pipeline on
  224 x 224 images (no resize in either) agree to float32 accumulation error;
- on images that need resizing, our model on the package's preprocessed pixels gives its score to
  the same tolerance; the package resizes a PIL uint8 image (PIL rounds and clamps to 8 bits
  between its two passes) where we resize float tensors (differentiable), so there the whole
  pipelines differ by the first-order effect of that pixel gap, which the test bounds.

The ``small`` checkpoint (the package's ViT class at width 64, CI) runs here; the ``large`` one
(ImageReward's own ViT-L/16) and the live comparison with the package are ``slow``.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import imagereward_fixture as F  # noqa: E402

import rewards  # noqa: E402
from rewards import RewardError  # noqa: E402
from rewards.imagereward import ImageRewardScore, load_tokenizer  # noqa: E402

REF_VENV = ROOT / ".venv-ir" / "bin" / "python"
# float32 unit roundoff
EPS = float(torch.finfo(torch.float32).eps)


def _vision_overrides(vit: str) -> dict:
    v = F.VITS[vit]
    return {"hidden_size": v["embed_dim"], "intermediate_size": 4 * v["embed_dim"], "num_hidden_layers": v["depth"], "num_attention_heads": v["num_heads"]}


def _scorer(vit: str, tmp_path) -> ImageRewardScore:
    tokdir = F.write_tokenizer(tmp_path / "tok")
    if vit == "large":  # ImageReward's own architecture: as a user loads it, from ImageReward.pt + med_config.json files
        ckpt, _ = F.write_checkpoint(tmp_path / "ckpt", vit)
        return rewards.load("imagereward", model=str(ckpt), tokenizer=str(tokdir), device="cpu", dtype="float32")
    return ImageRewardScore.from_parts(F.seeded_state_dict(vit), F.MED_CONFIG, load_tokenizer(tokdir), device="cpu", dtype="float32",
                                       vision=_vision_overrides(vit))


def _recorded(vit: str) -> dict:
    return json.loads((ROOT / "bench" / "results" / f"imagereward_reference_{vit}.json").read_text())


def _model_tolerance(ref: list[float], depth: int) -> float:
    """Float32 accumulation error of two implementations of the same network: the sums are
    ordered differently (fused vs separate attention, a -1e4 vs a -inf mask), each of the
    ``depth`` ViT blocks + 2 BERT layers + the head contributes a few ulps relative to the
    activations, which LayerNorm keeps O(1); 64 ulps per layer of the largest |score| (plus one
    for the standardisation's unit) is generous for that and far below any real difference
    (a wrong mean / std, a missing LayerNorm, another GELU move scores by >1e-2)."""
    return 8 * (depth + 3) * EPS * (1.0 + max(abs(x) for x in ref))


def _pixels(imgs) -> torch.Tensor:
    return torch.stack([torch.from_numpy(a).permute(2, 0, 1).float() / 255 for a in imgs])


def _check(vit: str, tmp_path) -> None:
    rec = _recorded(vit)
    assert rec["vit_dims"] == F.VITS[vit] and rec["med_config"] == F.MED_CONFIG and rec["seed"] == F.SEED
    assert rec["prompts"] == F.PROMPTS and [tuple(s) for s in rec["image_sizes"]] == F.IMAGE_SIZES
    s = _scorer(vit, tmp_path)
    imgs = F.images_uint8()

    ids, mask = s.tokenize(F.PROMPTS)
    assert ids.tolist() == rec["input_ids"] and mask.tolist() == rec["attention_mask"]

    tol = _model_tolerance(rec["score"], F.VITS[vit]["depth"])
    sq = rec["score_gard"]["images"]
    assert sq == [0, 1, 2]
    with torch.no_grad():
        gard = s.score_pixels(s.preprocess(_pixels([imgs[i] for i in sq])), [F.PROMPTS[i] for i in sq])
    np.testing.assert_allclose(gard.numpy(), rec["score_gard"]["scores"], rtol=0, atol=tol)

    ours = s.score(imgs, F.PROMPTS)  # the pipeline: uint8 arrays in, our torch preprocessing
    np.testing.assert_allclose([ours[i] for i in sq], [rec["score"][i] for i in sq], rtol=0, atol=tol)
    for i in range(len(imgs)):
        if i in sq:
            continue
        # the package's preprocessing redone here is the package's (same mean / std of its output) ...
        x_pkg = _package_preprocess(imgs[i])
        np.testing.assert_allclose([float(x_pkg.mean()), float(x_pkg.std())], rec["preprocessed_mean_std"][i], rtol=0, atol=1e-6)
        with torch.no_grad():  # ... and our model on its pixels gives the package's score
            assert abs(float(s.score_pixels(x_pkg[None], [F.PROMPTS[i]])[0]) - rec["score"][i]) <= tol
        # our differentiable preprocessing is PIL's up to its 8-bit arithmetic: in [0, 1] units, rounding
        # alone is 0.25/255 on average; PIL also rounds and clamps between its two passes (measured:
        # 0.31/255 on average, 6.1/255 at most); a bilinear filter or a squash instead of a crop is far above
        x = s.preprocess(_pixels([imgs[i]]))
        std = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(3, 1, 1)
        gap = ((x_pkg - x[0]) * std).abs()
        assert float(gap.mean()) <= 0.5 / 255 and float(gap.max()) <= 8 / 255, (i, float(gap.mean()) * 255, float(gap.max()) * 255)
        # ... and the score gap is that pixel gap's first-order effect
        x.requires_grad_(True)
        s.score_pixels(x, [F.PROMPTS[i]]).sum().backward()
        linear = float((x.grad[0] * (x_pkg - x[0].detach())).sum())
        assert abs((rec["score"][i] - ours[i]) - linear) <= 0.25 * abs(linear) + tol, (i, ours[i], rec["score"][i], linear)

    # the package's inference_rank: every image against the first prompt, its ranks 1..n
    r = s.score(imgs, [F.PROMPTS[0]] * len(imgs))
    order = sorted(range(len(r)), key=lambda j: -r[j])
    assert [order.index(j) + 1 for j in range(len(r))] == rec["inference_rank"]["rank"]


def _package_preprocess(img: np.ndarray) -> torch.Tensor:
    """ImageReward/ImageReward.py lines 30-37: torchvision's PIL transforms (a uint8 bicubic resize
    of the short side to 224, centre crop, CLIP normalisation); ``(3, 224, 224)``."""
    from PIL import Image
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

    t = Compose([Resize(224, interpolation=InterpolationMode.BICUBIC), CenterCrop(224), ToTensor(),
                 Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])
    return t(Image.fromarray(img))


def test_imagereward_matches_the_package_small_vit(tmp_path):
    _check("small", tmp_path)


@pytest.mark.slow
def test_imagereward_matches_the_package_vit_large(tmp_path):
    _check("large", tmp_path)


def test_imagereward_refuses_what_is_not_its_checkpoint(tmp_path):
    """A checkpoint with a key ImageReward's model lacks, or a med_config that is not BLIP's
    text encoder, is refused with a RewardError naming it (the package would load with
    strict=False and leave layers random)."""
    tokdir = F.write_tokenizer(tmp_path / "tok")
    torch.save({"blip.visual_encoder.cls_token": torch.zeros(1, 1, 1024), "unet.conv_in.weight": torch.zeros(1)}, tmp_path / "ImageReward.pt")
    (tmp_path / "med_config.json").write_text(json.dumps(F.MED_CONFIG))
    with pytest.raises(RewardError, match=r"keys ImageReward's model does not: \['unet.conv_in.weight'\]"):
        ImageRewardScore(model=str(tmp_path / "ImageReward.pt"), tokenizer=str(tokdir), device="cpu")
    torch.save({"blip.visual_encoder.cls_token": torch.zeros(1, 1, 1024)}, tmp_path / "ImageReward.pt")
    (tmp_path / "med_config.json").write_text(json.dumps({**F.MED_CONFIG, "add_cross_attention": False}))
    with pytest.raises(RewardError, match="add_cross_attention"):
        ImageRewardScore(model=str(tmp_path), tokenizer=str(tokdir), device="cpu")  # a folder holding ImageReward.pt
    (tmp_path / "med_config.json").write_text(json.dumps({k: v for k, v in F.MED_CONFIG.items() if k != "vocab_size"}))
    with pytest.raises(RewardError, match="med_config lacks 'vocab_size'"):
        ImageRewardScore(model=str(tmp_path), tokenizer=str(tokdir), device="cpu")
    (tmp_path / "med_config.json").write_text(json.dumps(F.MED_CONFIG))
    with pytest.raises(RewardError, match=r"visual encoder does not fit"):  # 1 of ~300 ViT-L tensors
        ImageRewardScore(model=str(tmp_path), tokenizer=str(tokdir), device="cpu")


def test_imagereward_reference_was_really_run():
    """The recorded numbers come from image-reward 1.5 in an environment with the versions it needs."""
    for vit in ("small", "large"):
        rec = _recorded(vit)
        freeze = {l.split("==")[0].lower(): l.split("==")[1] for l in rec["pip_freeze"] if "==" in l}
        assert freeze["image-reward"] == "1.5" and freeze["timm"] == "0.6.13" and freeze["transformers"].startswith("4.")
        assert freeze["torch"].split("+")[0] == torch.__version__.split("+")[0]  # same seeded generator
        assert len(rec["score"]) == len(F.PROMPTS) and len(set(round(x, 4) for x in rec["score"])) == len(F.PROMPTS)


@pytest.mark.slow
@pytest.mark.skipif(not REF_VENV.exists(), reason="no .venv-ir (make imagereward-ref-venv)")
@pytest.mark.parametrize("vit", ["small", "large"])
def test_imagereward_reference_live(vit, tmp_path):
    """Rerun the package now and check it still gives the recorded scores (a change in the
    fixture, the seed or the environment shows up here)."""
    out = tmp_path / "ref.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([str(REF_VENV), str(ROOT / "bench" / "imagereward_reference.py"), "--vit", vit, "--out", str(out)],
                   check=True, cwd=ROOT, env=env, capture_output=True, timeout=3000)
    live, rec = json.loads(out.read_text()), _recorded(vit)
    assert live["input_ids"] == rec["input_ids"]
    tol = _model_tolerance(rec["score"], F.VITS[vit]["depth"])
    assert max(abs(a - b) for a, b in zip(live["score"], rec["score"])) <= tol
    assert math.isclose(sum(live["score_gard"]["scores"]), sum(rec["score_gard"]["scores"]), abs_tol=3 * tol)
