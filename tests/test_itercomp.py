"""IterComp: ranking loss, composition checks, the OWLv2 detector path, reward models, the loop."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

import rewards
from rewards.composition import (
    count_boxes,
    count_score,
    parse_prompt,
    relation_holds,
    relation_score,
)
from rewards.itercomp_rm import pair_accuracy, pairwise_ranking_loss, ranking_pairs

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ the loss


def test_ranking_loss_matches_hand_computation():
    rb, rw = torch.tensor([1.0, 0.0, 0.5]), torch.tensor([0.0, 2.0, 0.5])
    hand = [math.log(1 + math.exp(-1.0)), math.log(1 + math.exp(2.0)), math.log(2.0)]
    assert pairwise_ranking_loss(rb, rw).item() == pytest.approx(sum(hand) / 3, rel=1e-6)
    # the reference's form: cross-entropy over [r_better, r_worse] with target 0
    ce = torch.nn.functional.cross_entropy(torch.stack([rb, rw], 1), torch.zeros(3, dtype=torch.long))
    assert pairwise_ranking_loss(rb, rw).item() == pytest.approx(ce.item(), rel=1e-6)
    assert pair_accuracy(rb, rw) == pytest.approx((1 + 0 + 0.5) / 3)


def test_ranking_pairs_every_ordered_pair_and_top_k():
    assert ranking_pairs([2, 0, 1]) == [(2, 0), (2, 1), (0, 1)]
    # top-2 of 4: the unranked images are worse than both ranked ones
    assert ranking_pairs([3, 1], n=4) == [(3, 1), (3, 0), (3, 2), (1, 0), (1, 2)]


# ------------------------------------------------------------------ parsing and box checks


def test_parse_prompt():
    s = parse_prompt("A red ball to the left of a blue box.")
    assert s.relation == "left of" and [o.text for o in s.objects] == ["red ball", "blue box"]
    assert parse_prompt("a cat on top of a table").relation == "above"
    assert parse_prompt("a frog under a mushroom").relation == "below"
    c = parse_prompt("three apples and two cups")
    assert [(o.noun, o.count) for o in c.objects] == [("apples", 3), ("cups", 2)] and c.relation is None
    assert [o.query for o in parse_prompt("a red car, a blue bench").objects] == ["a red car", "a blue bench"]
    assert parse_prompt("a man riding a horse").relation is None


def test_spatial_checks_from_boxes():
    left, right = torch.tensor([0.2, 0.5, 0.2, 0.2]), torch.tensor([0.8, 0.55, 0.2, 0.2])
    top, bottom = torch.tensor([0.5, 0.1, 0.2, 0.2]), torch.tensor([0.52, 0.9, 0.2, 0.2])
    assert relation_holds(left, right, "left of") and not relation_holds(right, left, "left of")
    assert relation_holds(right, left, "right of")
    assert relation_holds(top, bottom, "above") and relation_holds(bottom, top, "below")
    assert not relation_holds(left, right, "above")  # mostly a horizontal offset
    assert relation_holds(left, torch.tensor([0.3, 0.5, 0.1, 0.1]), "next to") and not relation_holds(left, right, "next to", near=0.3)
    assert relation_score(left, right, "left of") > 0.99 and relation_score(right, left, "left of") < 0.01
    assert relation_score(left, left, "left of").item() == pytest.approx(0.5)
    # gradients reach the boxes
    a = left.clone().requires_grad_(True)
    relation_score(a, right, "left of", tau=0.5).backward()
    assert a.grad[0] < 0  # moving a right lowers "a left of b"
    # counting: overlapping duplicates are merged by NMS, low scores dropped
    boxes = torch.tensor([[0.2, 0.2, 0.1, 0.1], [0.21, 0.2, 0.1, 0.1], [0.7, 0.7, 0.1, 0.1], [0.5, 0.5, 0.1, 0.1]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.05])
    assert count_boxes(boxes, scores, threshold=0.1) == 2
    assert count_score(2, 2) == 1.0 and count_score(1, 3) == pytest.approx(math.exp(-2))


def test_colour_oracle_reads_layout():
    r = rewards.load("composition_color")
    x = torch.full((2, 3, 16, 16), 0.5)
    x[0, :, :, :8] = torch.tensor([0.9, 0.1, 0.1])[:, None, None]  # red left, blue right
    x[0, :, :, 8:] = torch.tensor([0.1, 0.25, 0.9])[:, None, None]
    x[1] = x[0].flip(-1)  # blue left, red right
    s = r(x, ["a red ball left of a blue box"] * 2)
    assert s[0] > 0.5 > s[1]
    both = r(x, ["a red apple and a blue cup"] * 2)
    assert both[0] == pytest.approx(both[1].item(), rel=1e-4)  # no relation: anywhere
    assert torch.isnan(r(x[:1], ["a ball left of a box"])).all()  # no colours named


def test_attribute_vqa_multiplies_phrase_answers():
    from rewards.composition import AttributeComposition, NonSpatialComposition

    asked = []

    def judge(images, prompts):
        asked.extend(prompts)
        return torch.tensor([0.5 if "red" in p else 0.8 for p in prompts])

    r = AttributeComposition(judge=judge)
    out = r(torch.rand(2, 3, 8, 8), ["a red car and a blue bench", "a blue bench"])
    assert asked == ["a red car", "a blue bench", "a blue bench"]
    assert out.tolist() == pytest.approx([0.4, 0.8])
    assert NonSpatialComposition(judge=judge)(torch.rand(1, 3, 8, 8), ["a red dog chasing a cat"]).tolist() == pytest.approx([0.5])


# ------------------------------------------------------------------ the detector path (tiny OWLv2)


@pytest.fixture(scope="module")
def tiny_owlv2(tmp_path_factory):
    from transformers import CLIPTokenizer, Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    from vfeedback.models.tiny import write_clip_tokenizer

    d = tmp_path_factory.mktemp("owlv2")
    write_clip_tokenizer(d / "tok")
    tok = CLIPTokenizer.from_pretrained(d / "tok")
    proc = Owlv2Processor(image_processor=Owlv2ImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok)
    layer = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    cfg = Owlv2Config(text_config=dict(vocab_size=49408, max_position_embeddings=16, **layer),
                      vision_config=dict(image_size=32, patch_size=8, **layer), projection_dim=32)  # = text width, as in OWLv2
    torch.manual_seed(0)
    Owlv2ForObjectDetection(cfg).save_pretrained(d)
    proc.save_pretrained(d)
    return str(d)


def test_detector_scorers_with_tiny_owlv2(tiny_owlv2):
    sp = rewards.load("composition_spatial", model=tiny_owlv2, device="cpu", cache=False)
    x = torch.rand(2, 3, 24, 24, requires_grad=True)
    s = sp(x, ["a cat to the left of a dog", "a man riding a horse"])
    assert 0 <= s[0].item() <= 1 and torch.isnan(s[1])  # no relation -> NaN
    s[0].backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    ct = rewards.load("composition_count", model=tiny_owlv2, device="cpu", threshold=0.0, cache=False)
    c = ct(torch.rand(2, 3, 24, 24), ["two cats and one dog", "a cat"])
    assert 0 <= c[0].item() <= 1 and torch.isnan(c[1])
    assert not ct.differentiable and sp.differentiable


# ------------------------------------------------------------------ reward models


def test_reward_model_beats_chance_on_a_separable_toy(tmp_path):
    from rewards.images import to_pil

    from vfeedback.config import IterCompRewardModelConfig
    from vfeedback.itercomp.ranking import Group
    from vfeedback.itercomp.reward_model import train_category
    from vfeedback.itercomp.tiny import resolve_backbone

    g = torch.Generator().manual_seed(0)
    groups = []
    for k in range(24):  # 4 images per group, ranked by how red they are
        red = torch.rand(4, generator=g)
        x = torch.rand(4, 3, 16, 16, generator=g) * 0.3
        x[:, 0] += red[:, None, None] * 0.7
        paths = []
        for i, im in enumerate(to_pil(x)):
            p = tmp_path / f"{k}-{i}.png"
            im.save(p)
            paths.append(str(p))
        groups.append(Group("a red square", "attribute", paths, seed=k, ranking=red.argsort(descending=True).tolist()))
    spec = resolve_backbone({"model": "tiny:clip"})
    cfg = IterCompRewardModelConfig(epochs=60, hidden=64, val_fraction=0.3, val_split="group")
    f = tmp_path / "rm" / "attribute.safetensors"
    rep = train_category(groups, "attribute", cfg, spec, f)
    assert rep["pairs_val"] > 0 and rep["val_accuracy"] > 0.7, rep
    # loadable by name and path; redder scores higher; standardised over the training images
    rm = rewards.load("itercomp_rm", path=str(f), device="cpu", cache=False)
    reds = torch.zeros(2, 3, 16, 16)
    reds[0, 0] = 0.95
    reds[1, 0] = 0.1
    s = rm(reds, ["a red square"] * 2)
    assert s[0] > s[1]
    # two heads with a hinge: m - sum_c w_c relu(m - r_c)
    import shutil

    shutil.copy(f, tmp_path / "rm" / "b.safetensors")
    from rewards.itercomp_rm import read_head, save_head

    head, bb, _, _ = read_head(f)
    save_head(tmp_path / "rm" / "b.safetensors", head, bb, "spatial")
    both = rewards.load("itercomp_rm", path=str(tmp_path / "rm"), weights={"spatial": 0.5}, hinge_margin=2.0, device="cpu", cache=False)
    out = both(reds, ["a red square"] * 2)
    comp = both.last_components
    want = 2.0 - torch.relu(2.0 - comp["attribute"]) - 0.5 * torch.relu(2.0 - comp["spatial"])
    assert torch.allclose(out, want)
    with pytest.raises(rewards.RewardError):
        rewards.load("itercomp_rm", path=str(tmp_path / "nothing.safetensors"), cache=False)


# ------------------------------------------------------------------ the loop, end to end


def _overrides(out: Path, iterations: int) -> list[str]:
    return [
        f"output_dir={out}", f"itercomp.iterations={iterations}", "itercomp.refl_steps=2", "itercomp.seeds=[0,1,2]",
        "itercomp.reward_model.epochs=20", "sampling.steps=4", "refl.stop_range=[2,3]", "train.batch_size=2",
        "itercomp.prompts.spatial=[a red ball left of a blue box, a green leaf above a yellow sun]",
        "itercomp.prompts.attribute=[a red apple and a green pear, a blue car and a yellow house]",
        "itercomp.prompts.nonspatial=[a green frog chasing a red fly, a red dog watching a green ball]",
        "prompts.train=[a red ball left of a blue box, a red apple and a green pear]",
        "prompts.eval=[a red ball left of a blue box]",
    ]


@pytest.fixture(scope="module")
def one_iteration(tmp_path_factory):
    from vfeedback.cli import main

    out = tmp_path_factory.mktemp("itercomp") / "run"
    rc = main(["train", str(ROOT / "configs/itercomp/tiny.yaml"), *_overrides(out, 1)])
    assert rc == 0
    return out


def test_end_to_end_one_iteration(one_iteration):
    out = one_iteration
    s = json.loads((out / "summary.json").read_text())
    assert s["algorithm"] == "itercomp" and s["iterations_done"] == 1 and s["steps"] == 2
    assert [h["model"] for h in s["composition_history"]] == ["base", "itercomp-iter0"]
    assert all(math.isfinite(h["all"]) for h in s["composition_history"])
    it = out / "iter-0"
    for f in ["COMPLETE", "rankings.jsonl", "composition.json", "samples/gallery.png", "refl/summary.json",
              "lora/pytorch_lora_weights.safetensors", "lora/trainable.safetensors", "gallery/itercomp-iter0/COMPLETE"]:
        assert (it / f).exists(), f
    rec = json.loads((it / "rankings.jsonl").read_text().splitlines()[0])
    assert sorted(rec["ranking"]) == [0, 1, 2] and len(rec["images"]) == 3 and (it / rec["images"][0]).exists()
    for c in ("spatial", "attribute", "nonspatial"):
        acc = s["reward_model_accuracy"][0][c]
        assert 0 <= acc["train"] <= 1
        rm = rewards.load("itercomp_rm", path=str(it / "reward_models" / f"{c}.safetensors"), device="cpu", cache=False)
        assert torch.isfinite(rm(torch.rand(1, 3, 32, 32), ["a red ball left of a blue box"])).all()
    # the refined model is base + the exported LoRA: diffusers loads it
    from vfeedback.models import load_lora_into, load_model

    m = load_model("sd15", "tiny:sd15", resolution=32)
    load_lora_into(m, it / "lora")


def test_resume_mid_loop_redoes_only_the_unfinished_iteration(one_iteration, monkeypatch):
    from vfeedback.algorithms import itercomp as ic
    from vfeedback.cli import main

    out = one_iteration
    done0 = (out / "iter-0" / "COMPLETE").stat().st_mtime_ns
    real = ic.IterCompRun.refl

    def crash(self, k, d):
        if k == 1:
            raise KeyboardInterrupt  # killed during iteration 1's ReFL
        return real(self, k, d)

    monkeypatch.setattr(ic.IterCompRun, "refl", crash)
    assert main(["train", str(ROOT / "configs/itercomp/tiny.yaml"), *_overrides(out, 2), "--resume"]) == 130
    assert (out / "iter-1" / "reward_models").exists() and not (out / "iter-1" / "COMPLETE").exists()
    monkeypatch.setattr(ic.IterCompRun, "refl", real)
    assert main(["train", str(ROOT / "configs/itercomp/tiny.yaml"), *_overrides(out, 2), "--resume"]) == 0
    assert (out / "iter-0" / "COMPLETE").stat().st_mtime_ns == done0  # not redone
    s = json.loads((out / "summary.json").read_text())
    assert s["iterations_done"] == 2
    assert [h["model"] for h in s["composition_history"]] == ["base", "itercomp-iter0", "itercomp-iter1"]
    it1 = json.loads((out / "iter-1" / "iteration.json").read_text())
    assert [g["name"] for g in it1["gallery"]][-1] == "itercomp-iter0"  # the refined model joined the gallery
    assert all(v["refined_from_previous"] for v in it1["reward_models"].values())
    # a changed config (other than iterations / log) is refused on resume
    assert main(["train", str(ROOT / "configs/itercomp/tiny.yaml"), *_overrides(out, 2), "itercomp.refl_steps=3", "--resume"]) == 2


def test_human_ranker_asks_for_rankings_then_uses_them(tmp_path):
    from vfeedback.cli import main

    out = tmp_path / "run"
    args = ["train", str(ROOT / "configs/itercomp/tiny.yaml"), *_overrides(out, 1), "itercomp.ranker.kind=human",
            "itercomp.prompts.spatial=[a red ball left of a blue box]", "itercomp.prompts.attribute=[a red apple and a green pear]",
            "itercomp.prompts.nonspatial=[a green frog chasing a red fly]", "itercomp.reward_model.val_fraction=0",
            "itercomp.refl_steps=1"]
    assert main(args) == 2  # no rankings yet: the groups to rank are written out
    todo = [json.loads(l) for l in (out / "iter-0" / "to_rank.jsonl").read_text().splitlines()]
    assert len(todo) == 9 and all(r["ranking"] is None for r in todo)
    for r in todo:  # "a person" prefers the second model, then the base
        r["ranking"] = [1, 0, 2]
    (out / "iter-0" / "rankings.jsonl").write_text("".join(json.dumps(r) + "\n" for r in todo))
    assert main(args + ["--resume"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["iterations_done"] == 1 and s["reward_model_accuracy"][0]["spatial"]["train"] > 0.5


def test_shapes_backbone_reward_model_learns_relations(tmp_path):
    """The shapes-world backbone (judge reading x parsed caption): a spatial head trained on
    scenes ranked above their mirror image (which reverses the relation) orders unseen pairs."""
    from rewards.images import to_pil
    from rewards.itercomp_rm import load_backbone

    from vfeedback.config import IterCompRewardModelConfig
    from vfeedback.itercomp.ranking import Group
    from vfeedback.itercomp.reward_model import train_category
    from vfeedback.world.scenes import make_batch

    images, scenes = make_batch(48, seed=5, kind="spatial")
    groups = []
    for k, (x, s) in enumerate(zip(images, scenes)):
        flip = x.flip(-1) if s.spec.relation in ("left of", "right of") else x.flip(-2)
        paths = []
        for i, im in enumerate(to_pil(torch.stack([flip, x]))):
            p = tmp_path / f"{k}-{i}.png"
            im.save(p)
            paths.append(str(p))
        groups.append(Group(s.caption, "spatial", paths, seed=k, ranking=[1, 0]))
    spec = {"kind": "shapes", "which": "judge"}
    bb = load_backbone(spec, "cpu")
    e = bb.text_embeddings(["a red circle left of a blue square"]).view(24, 6)
    assert e.abs().sum() > 0 and torch.count_nonzero(e[:, 4]) == 2 and e[:, 4].sum() == 0  # opposite x directions
    with pytest.raises(rewards.RewardError):
        bb.text_embeddings(["a photo of a cat"])
    cfg = IterCompRewardModelConfig(epochs=80, hidden=32, val_fraction=0.3, val_split="group")
    rep = train_category(groups, "spatial", cfg, spec, tmp_path / "rm" / "spatial.safetensors")
    assert rep["pairs_val"] >= 8 and rep["val_accuracy"] > 0.8, json.dumps(rep)
    # differentiable in the pixels, loadable as a reward
    rm = rewards.load("itercomp_rm", path=str(tmp_path / "rm" / "spatial.safetensors"), device="cpu", cache=False)
    x = images[:2].clone().requires_grad_(True)
    rm(x, [s.caption for s in scenes[:2]]).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_gallery_member_sampler_settings(tmp_path, monkeypatch):
    from vfeedback.config import load_config
    from vfeedback.errors import UserError
    from vfeedback.itercomp.gallery import entries_from_config

    monkeypatch.chdir(tmp_path)
    cfg = load_config(str(ROOT / "configs/itercomp/shapes.yaml"), [f"output_dir={tmp_path / 'run'}"])
    # the shipped config's strongest member is the quickstart's LoRA: missing -> a clear error
    with pytest.raises(UserError, match=r"itercomp.gallery\[2\].lora"):
        entries_from_config(cfg)
    (tmp_path / "runs" / "quickstart" / "lora").mkdir(parents=True)
    cfg = load_config(str(ROOT / "configs/itercomp/shapes.yaml"),
                      [f"output_dir={tmp_path / 'run'}", "itercomp.gallery=[{path: tiny:shapes, guidance_scale: 1.5, name: a}, "
                       "{path: tiny:shapes, steps: 8, name: b}, {path: tiny:shapes, lora: runs/quickstart/lora, name: c}]"])
    es = entries_from_config(cfg)
    assert [e.name for e in es] == ["base", "a", "b", "c"] and es[3].lora == "runs/quickstart/lora"
    assert (es[1].guidance_scale, es[1].steps) == (1.5, None) and (es[2].steps, es[2].guidance_scale) == (8, None)
    assert es[1].to_dict()["guidance_scale"] == 1.5 and "steps" not in es[1].to_dict()
    # the base (and, below, each refined model) renders its gallery images at
    # itercomp.gallery_guidance_scale; unset, at the ReFL sampler's sampling.guidance_scale
    assert es[0].guidance_scale is None
    cfg = load_config(str(ROOT / "configs/itercomp/shapes.yaml"),
                      [f"output_dir={tmp_path / 'run'}", "itercomp.gallery_guidance_scale=5.0"])
    assert entries_from_config(cfg)[0].guidance_scale == 5.0
    from vfeedback.algorithms.itercomp import IterCompRun

    ic = IterCompRun.__new__(IterCompRun)  # gallery_entries needs only cfg, entries and root
    ic.cfg, ic.entries, ic.root = cfg, entries_from_config(cfg), tmp_path / "run"
    assert [(e.name, e.guidance_scale) for e in ic.gallery_entries(2)[-2:]] == [("itercomp-iter0", 5.0), ("itercomp-iter1", 5.0)]


def test_auto_ranking_tie_levels(tmp_path):
    """ranker.tie_tol: near-equal scores tie (no pair), written as "ranks" and read back."""
    from vfeedback.itercomp.ranking import Group, read_groups, tie_levels, write_groups

    assert tie_levels([0.001, 0.6, 0.002, 0.58, float("nan")], 0.05) == [2, 1, 2, 1, 3]
    assert tie_levels([0.3, 0.2, 0.1], 0.0) == [1, 2, 3]
    g = Group("a red ball", "spatial", [str(tmp_path / f"{i}.png") for i in range(4)], seed=0, ranking=[1, 3, 2, 0],
              ties=tie_levels([0.001, 0.6, 0.002, 0.58], 0.05))
    assert sorted(g.pairs()) == [(1, 0), (1, 2), (3, 0), (3, 2)]
    write_groups(tmp_path / "r.jsonl", [g])
    (back,) = read_groups(tmp_path / "r.jsonl", {"a red ball": "spatial"})
    assert back.ties == g.ties and sorted(back.pairs()) == sorted(g.pairs())


@pytest.mark.parametrize("override,words", [
    ("itercomp.gallery=[]", "itercomp.gallery: list at least one model"),
    ("itercomp.ranker.kind=human", None),  # valid: rankings are asked for at run time
    ("itercomp.ranker.scorers.spatial.name=no_such_scorer", "itercomp.ranker.scorers.spatial.name: unknown reward"),
])
def test_validate_and_dry_run_refuse_the_same_itercomp_inputs(tmp_path, capsys, monkeypatch, override, words):
    """IterComp's own input checks run in `validate` as in `train` (vfeedback/checks.py calls
    IterComp.check_config): both exit 2 with the same message, and nothing is created."""
    from vfeedback.cli import main

    monkeypatch.chdir(ROOT)
    args = [str(ROOT / "configs/itercomp/tiny.yaml"), f"output_dir={tmp_path / 'run'}", override]
    rc_v = main(["validate", *args])
    err_v = capsys.readouterr().err
    rc_d = main(["train", *args, "--dry-run"])
    err_d = capsys.readouterr().err
    if words is None:
        assert (rc_v, rc_d) == (0, 0), err_v + err_d
    else:
        assert (rc_v, rc_d) == (2, 2) and words in err_v and words in err_d and "Traceback" not in err_v + err_d
    assert not (tmp_path / "run").exists()
