"""The shapes world: scenes, caption parsing, the shipped judges as rewards, and tiny:shapes."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import rewards
from rewards.shapes import ASSETS, Item, Spec, load_judge, parse
from vfeedback.world.scenes import corrupt, make_batch, render, sample_scene


def test_scenes_are_deterministic_in_the_seed():
    a, sa = make_batch(12, seed=3)
    b, sb = make_batch(12, seed=3)
    c, _ = make_batch(12, seed=4)
    assert torch.equal(a, b) and [s.labels() for s in sa] == [s.labels() for s in sb]
    assert not torch.equal(a, c)
    assert a.shape == (12, 3, 32, 32) and 0 <= a.min() and a.max() <= 1
    assert render(sa[0], 64).shape == (3, 64, 64)


def test_scene_labels_agree_with_captions():
    rng = np.random.default_rng(0)
    for kind in ("attribute", "spatial", "count"):
        for _ in range(30):
            s = sample_scene(rng, kind)
            assert parse(s.caption) == s.spec
            cats = s.counts()
            for it in s.spec.items:
                assert cats[it.category] == (it.count or 1)
            if kind == "spatial":
                a, b = s.objects
                d = {"left of": b.x - a.x, "right of": a.x - b.x, "above": b.y - a.y, "below": a.y - b.y}[s.spec.relation]
                assert d > 0.1
            assert corrupt(s.spec, rng) != s.spec


def test_parse_captions():
    assert parse("A red circle and a blue square.") == Spec("attribute", (Item("red", "circle"), Item("blue", "square")))
    assert parse("two green crosses") == Spec("count", (Item("green", "cross", 2),))
    assert parse("a green triangle to the left of a yellow circle") == Spec(
        "spatial", (Item("green", "triangle"), Item("yellow", "circle")), "left of")
    assert parse("a cyan square on top of a red circle").relation == "above"
    assert parse("a photo of a cat") is None and parse("a red circle and a red circle") is None


@pytest.mark.parametrize("name", ["judge", "judge_heldout"])
def test_judge_accuracy_on_generator_scenes(name):
    from vfeedback.world.judge import evaluate

    res = evaluate(load_judge(ASSETS / f"{name}.safetensors"), n_per_kind=40, seed=11)
    assert res["match_accuracy"]["overall"] >= 0.95, res
    assert min(res["match_accuracy"][k] for k in ("attribute", "spatial", "count")) >= 0.9, res


def test_judge_reward_scores_and_gradients_reach_pixels():
    x, scenes = make_batch(6, seed=5, kinds=["attribute", "spatial", "count"])
    prompts = [s.caption for s in scenes]
    judge = rewards.load("shapes_judge")
    assert judge.differentiable and judge.needs_prompt
    assert (judge(x, prompts) > 0.5).all()
    # a 64 px image (resized inside with torch ops) and the log form, as training uses it
    big = torch.nn.functional.interpolate(x, size=64, mode="nearest").requires_grad_(True)
    r = rewards.load("shapes_judge", log=True)(big, prompts)
    r.sum().backward()
    assert torch.isfinite(big.grad).all() and big.grad.abs().sum() > 0
    # per-category parts: NaN where the caption has no such term
    sp = rewards.load("shapes_spatial")(x, prompts)
    assert torch.isnan(sp[[0, 2]]).all() and torch.isfinite(sp[1])
    assert torch.isnan(rewards.load("shapes_judge_heldout")(x[:1], ["a photo of a cat"])).all()


def test_rewards_does_not_import_vfeedback():
    code = "import sys, rewards; rewards.load('shapes_judge'); print('vfeedback' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert out.stdout.strip() == "False"


def test_tiny_shapes_loads_and_matches_recorded_base_rate():
    from vfeedback.models import load_model
    from vfeedback.models.tiny import SHIPPED
    from vfeedback.world.train_world import BASE_GUIDANCE, BASE_STEPS, base_prompts, sample_images

    rec = json.loads((SHIPPED["shapes"] / "base_rate.json").read_text())
    model = load_model("sd15", "tiny:shapes")
    assert type(model.pipe).__name__ == "StableDiffusionPipeline" and model.resolution == 32
    prompts, kinds, seeds = base_prompts(rec["prompts"]["n_per_kind"])
    n = len(rec["heldout_scores_first16"])
    images = sample_images(model, prompts[:n], seeds[:n], steps=BASE_STEPS, guidance=BASE_GUIDANCE)
    scores = rewards.load("shapes_judge_heldout")(images, prompts[:n])
    expected = torch.tensor(rec["heldout_scores_first16"])
    assert abs(scores.mean().item() - expected.mean().item()) < 0.05
    assert ((scores > 0.5) == (expected > 0.5)).float().mean() >= 0.85


def test_pretrain_data_from_the_world_generator():
    """refl.pretrain.data: world:shapes draws captioned generator scenes from the step's generator."""
    from rewards.shapes import parse

    from vfeedback.algorithms.refl import PretrainData
    from vfeedback.errors import UserError

    d = PretrainData("world:shapes")
    a, ca = d.batch(6, torch.Generator().manual_seed(3), 32)
    b, cb = d.batch(6, torch.Generator().manual_seed(3), 32)
    c, _ = d.batch(6, torch.Generator().manual_seed(4), 64)
    assert a.shape == (6, 3, 32, 32) and c.shape == (6, 3, 64, 64)
    assert torch.equal(a, b) and ca == cb and all(parse(t) is not None for t in ca)
    assert 0.0 <= float(a.min()) and float(a.max()) <= 1.0
    with pytest.raises(UserError, match="world:shapes"):
        PretrainData("world:cubes")


@pytest.mark.slow
def test_make_world_end_to_end_elsewhere(tmp_path):
    """Every stage of `make world` in one go, with minute-sized budgets, into temp folders (the
    shipped weights are not touched): judges, VAE, decoder, UNet, more UNet, base rate. ~13 min."""
    import json

    from vfeedback.world.train_world import main

    model, judges, work = tmp_path / "model", tmp_path / "judges", tmp_path / "work"
    rc = main(["--judge-steps", "40", "--vae-steps", "20", "--decoder-minutes", "0.2", "--unet-minutes", "0.5",
               "--unet-more-minutes", "0.3", "--baseline-n", "4", "--model-dir", str(model), "--judge-dir", str(judges),
               "--work-dir", str(work)])
    assert rc == 0
    assert (judges / "judge.safetensors").exists() and (judges / "judge_heldout.safetensors").exists()
    rate = json.loads((model / "base_rate.json").read_text())
    assert rate["heldout_judge"]["overall"]["n"] == 12
    from vfeedback.models import load_model

    load_model("sd15", str(model))  # loads like a hub folder
