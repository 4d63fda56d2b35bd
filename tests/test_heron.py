"""HERON (Bukharin et al. 2023): the hierarchical comparator, its margins and NaN rule, the
oracle inside D3PO / ZO-RankSGD / win-rate shaping, the reward model's round trip through
rewards.load, and schema errors. Hand-computed cases; binary fractions where a margin bound is
tested, so the boundary is exact."""
import math
import types

import pytest
import torch
import yaml

import rewards
from rewards.heron import factor_margins, heron_compare, heron_label, read_model, save_model, train_heron_rm, weighted_label
from vfeedback.feedback.heron import HeronPreferenceOracle, copeland_order

NAN = float("nan")


# ------------------------------------------------------------------ the comparator
def test_first_factor_decides_even_when_later_ones_disagree():
    assert heron_compare([0.9, 0.1], [0.5, 0.9], [0.1, 0.1]) == (0, 0)
    # the same pair with the factors in the other order: the other sample wins
    assert heron_compare([0.1, 0.9], [0.9, 0.5], [0.1, 0.1]) == (1, 0)


def test_within_margin_falls_through_to_the_next_factor():
    assert heron_compare([0.55, 0.1], [0.5, 0.9], [0.1, 0.1]) == (1, 1)
    assert heron_compare([0.5, 0.9], [0.55, 0.1], [0.1, 0.1]) == (0, 1)
    # and to the third
    assert heron_compare([0.5, 0.5, 0.25], [0.5, 0.5, 0.75], [0.0, 0.0, 0.0]) == (1, 2)


def test_margin_bound_is_strict():
    # a lead of exactly the margin does not decide (reference: x > y + delta)
    assert heron_compare([0.75], [0.5], [0.25]) == (None, None)
    assert heron_compare([0.5], [0.75], [0.25]) == (None, None)
    assert heron_compare([0.75 + 2 ** -20], [0.5], [0.25]) == (0, 0)
    assert heron_compare([0.5], [0.75 + 2 ** -20], [0.25]) == (1, 0)
    assert heron_compare([0.75], [0.5], [0.25 - 2 ** -20]) == (0, 0)
    # per-factor margins: the first factor's margin does not apply to the second
    assert heron_compare([0.5, 0.625], [0.5, 0.5], [0.25, 0.0625]) == (0, 1)
    assert heron_compare([0.5, 0.625], [0.5, 0.5], [0.0625, 0.25]) == (None, None)


def test_ties_and_nan():
    assert heron_compare([0.5, 0.5], [0.5, 0.5], [0.0, 0.0]) == (None, None)
    assert heron_compare([NAN, 0.25], [NAN, 0.75], [0.1, 0.1]) == (1, 1)  # both NaN: the level does not apply
    assert heron_compare([NAN, 0.9], [0.1, 0.1], [0.1, 0.1]) == (1, 0)  # NaN loses to a number
    assert heron_compare([0.1, 0.1], [NAN, 0.9], [0.1, 0.1]) == (0, 0)
    assert heron_compare([NAN], [NAN], [0.0]) == (None, None)
    with pytest.raises(ValueError):
        heron_compare([0.1, 0.2], [0.1], [0.0, 0.0])


def test_std_margins_are_the_reference_scale():
    v = torch.tensor([[0.0, 1.0], [2.0, 1.0], [4.0, NAN]], dtype=torch.float64)
    # column 0: unbiased std of 0, 2, 4 = 2; column 1: one value spread 0 over finite {1, 1}
    assert factor_margins(v, [0.5, 3.0], "std") == [1.0, 0.0]
    assert factor_margins(v, [0.5, 3.0], "absolute") == [0.5, 3.0]
    with pytest.raises(ValueError):
        factor_margins(v, [-0.1, 0.0], "absolute")


def test_label_groups_and_the_weighted_sum_disagree_where_they_should():
    # group 0: rows 0-2; group 1: rows 3-4 (never paired with group 0)
    v = torch.tensor([[0.9, 0.0], [0.7, 1.0], [0.95, 0.5], [0.5, 0.5], [0.5, 0.25]], dtype=torch.float64)
    lab = heron_label(v, [0, 0, 0, 1, 1], [0.1, 0.1])
    # (0,1): 0.9 vs 0.7 -> 0 at level 0; (0,2): within -> level 1: 2 wins; (1,2): 0.95 - 0.7 > 0.1 -> 2; (3,4): level 1 -> 3
    assert lab.pairs == [(0, 1), (2, 0), (2, 1), (3, 4)]
    assert lab.levels == [0, 1, 0, 1]
    assert lab.ties == 0 and lab.level_counts(2) == [2, 2]
    ws = weighted_label(v, [0, 0, 0, 1, 1], [1.0, 1.0])
    # sums 0.9, 1.7, 1.45 | 1.0, 0.75: the sum prefers row 1 over row 0 and over row 2
    assert ws.pairs == [(1, 0), (2, 0), (1, 2), (3, 4)]
    tied = heron_label(v, [0, 0, 0, 1, 1], [1.0, 1.0])
    assert tied.pairs == [] and tied.ties == 4


# ------------------------------------------------------------------ the oracle
def _flat(rgb, n=4):
    return torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1).expand(3, n, n).clone()


def _red(x, prompts=None, **kw):  # factor 1: mean red channel
    return x[:, 0].mean((1, 2))


def _green(x, prompts=None, **kw):  # factor 2: mean green channel
    return x[:, 1].mean((1, 2))


def test_oracle_compare_rank_and_std_margins():
    a, b, c = _flat([0.5, 0.5, 0.0]), _flat([0.5625, 0.0, 0.0]), _flat([0.25, 1.0, 0.0])
    o = HeronPreferenceOracle([_red, _green], [0.125, 0.0], names=["red", "green"])
    assert o.compare(a, b) == 0 and o.last_level == 1  # red within 0.125: green decides
    assert o.compare(b, c) == 0 and o.last_level == 0
    assert o.compare(a, c) == 0 and o.last_level == 0
    assert o.last_scores.shape == (2, 2) and o.n_queries == 6
    assert o.rank(torch.stack([c, b, a])) == [2, 1, 0]
    # std scale over the group: red std of (0.25, 0.5625, 0.5) is 0.1654, so a margin of 2 x it
    # (0.331) covers every red lead (at most 0.3125): green decides everything; 1 x it (0.165) does not
    s = HeronPreferenceOracle([_red, _green], [2.0, 0.0], margin_scale="std")
    assert s.rank(torch.stack([c, b, a])) == [0, 2, 1]  # c: green 1.0 beats both; a beats b on green
    s1 = HeronPreferenceOracle([_red, _green], [1.0, 0.0], margin_scale="std")
    assert s1.rank(torch.stack([c, b, a])) == [2, 1, 0]
    with pytest.raises(ValueError):
        HeronPreferenceOracle([_red], [0.1, 0.2])


def test_copeland_order_breaks_a_cycle_by_index():
    cyc = {(0, 1): 0, (1, 2): 0, (0, 2): 1}  # 0 > 1 > 2 > 0: one win each
    assert copeland_order(3, lambda i, j: cyc[(i, j)]) == [0, 1, 2]
    assert copeland_order(3, lambda i, j: None) == [0, 1, 2]
    assert copeland_order(3, lambda i, j: 1) == [2, 1, 0]


def test_itercomp_tie_levels_follow_the_hierarchy():
    from vfeedback.algorithms.itercomp import heron_tie_levels

    dec = {(0, 1): None, (1, 2): 0, (2, 3): None, (0, 2): 0, (0, 3): 0, (1, 3): 0}
    cmp = lambda i, j: dec[(min(i, j), max(i, j))]
    assert heron_tie_levels(4, cmp, [0, 1, 2, 3]) == [1, 1, 2, 2]
    assert heron_tie_levels(4, cmp, [1, 0, 3, 2]) == [1, 1, 2, 2]
    assert heron_tie_levels(3, lambda i, j: 0, [2, 0, 1]) == [2, 3, 1]


def test_itercomp_heron_ranker_ranks_and_writes_tie_levels(tmp_path):
    from vfeedback.algorithms.itercomp import IterCompRun
    from vfeedback.itercomp.ranking import Group, read_groups

    cols = [[0.5, 0.5, 0.0], [0.5625, 0.0, 0.0], [0.25, 1.0, 0.0], [0.5, 0.5, 0.0]]
    paths = []
    for n, c in enumerate(cols):
        p = tmp_path / f"{n}.png"
        rewards.to_pil(_flat(c, 8)[None])[0].save(p)
        paths.append(str(p))
    ns = types.SimpleNamespace(ic=types.SimpleNamespace(ranker=types.SimpleNamespace(kind="heron")),
                               heron=HeronPreferenceOracle([_red, _green], [0.125, 0.0]))
    got = IterCompRun.rank(ns, [Group("p", "attribute", paths)], tmp_path, 0)
    # a (0) and its copy (3) beat b (1) on green and c (2) on red; b beats c on red; 0 and 3 tie
    assert got[0].ranking == [0, 3, 1, 2] and got[0].ties == [1, 2, 3, 1]  # a rank level per image
    back = read_groups(tmp_path / "rankings.jsonl", {"p": "attribute"})
    assert back[0].pairs() == [(0, 1), (0, 2), (1, 2), (3, 1), (3, 2)]


def test_zo_ranksgd_ranks_candidates_with_the_hierarchy():
    from vfeedback.algorithms.zo_ranksgd_diffusion import Candidates, rank_candidates

    # 3 candidates x 2 images: factor means over a candidate's images
    imgs = torch.stack([torch.stack([_flat([0.5, 0.0, 0]), _flat([0.5, 0.5, 0])]),     # red 0.5, green 0.25
                        torch.stack([_flat([0.5, 1.0, 0]), _flat([0.5, 0.0, 0])]),     # red 0.5, green 0.5
                        torch.stack([_flat([0.75, 0.0, 0]), _flat([0.75, 0.0, 0])])])  # red 0.75, green 0
    cands = Candidates(imgs, ["a", "b", "c"], 0, "gradient", ["p", "p"], scores=[0.1, 0.2, 0.3])
    o = HeronPreferenceOracle([_red, _green], [0.125, 0.0])
    assert rank_candidates(o, cands) == ([2, 1, 0], [0.1, 0.2, 0.3])
    o.top_k = 1
    assert rank_candidates(o, cands)[0] == [2]
    flat = Candidates(torch.stack([imgs[0], imgs[0]]), ["a", "b"], 0, "gradient", ["p", "p"])
    assert rank_candidates(HeronPreferenceOracle([_red], [0.0]), flat) == ([], None)  # all tied: skip the round


def _run_cfg(tmp_path, **over):
    from vfeedback.config import RunConfig

    d = {"algorithm": "d3po", "output_dir": str(tmp_path / "run"), "model": {"family": "sd15", "path": "tiny:sd15"},
         "reward": [{"name": "brightness"}], "prompts": {"train": ["a"]},
         "d3po": {"preference": "heron", "group_size": 3},
         "heron": {"factors": [{"name": "saturation", "margin": 0.1}, {"name": "brightness", "margin": 0.0}]}}
    d.update(over)
    return RunConfig.model_validate(d)


def test_d3po_labels_pairs_with_the_heron_oracle(tmp_path):
    from vfeedback.algorithms.d3po import D3PO

    cfg = _run_cfg(tmp_path)
    ns = types.SimpleNamespace(cfg=cfg, trainer=types.SimpleNamespace(reward=rewards.load("brightness")))
    ns.oracle, name = D3PO._build_oracle(ns)
    assert isinstance(ns.oracle, HeronPreferenceOracle) and name == "heron(saturation > brightness)"
    # grey: saturation 0, luminance 0.5; B: saturation 0.2, luminance 0.4425; C: saturation 0.05, luminance 0.5106
    imgs = torch.stack([_flat([0.5, 0.5, 0.5]), _flat([0.6, 0.4, 0.4]), _flat([0.55, 0.5, 0.5])])
    pairs, ties = D3PO._label(ns, imgs, "a", [])
    # B beats grey and C on saturation (lead > 0.1); C's saturation lead over grey (0.05) falls through to brightness
    assert pairs == [(1, 0), (2, 0), (1, 2)] and ties == 0
    flipped = _run_cfg(tmp_path, heron={"factors": [{"name": "brightness"}, {"name": "saturation", "margin": 0.1}]})
    ns2 = types.SimpleNamespace(cfg=flipped, trainer=ns.trainer)
    ns2.oracle, _ = D3PO._build_oracle(ns2)
    assert D3PO._label(ns2, imgs, "a", [])[0] == [(0, 1), (2, 0), (2, 1)]  # brightness first: B is darkest


def test_win_rate_shaping_with_the_heron_judge(tmp_path):
    from vfeedback.reward_shaping import ScalarReward

    cfg = _run_cfg(tmp_path, algorithm="ddpo", reward={"rewards": [{"name": "brightness"}], "shaping": "win_rate", "win_rate": {"judge": "heron"}},
                   d3po={})
    sr = ScalarReward(cfg, rewards.load("brightness"))
    imgs = torch.stack([_flat([0.5, 0.5, 0.5]), _flat([0.6, 0.4, 0.4]), _flat([0.55, 0.5, 0.5]), _flat([0.1, 0.1, 0.1])])
    out, mets = sr(imgs, ["a"] * 4, groups=torch.tensor([0, 0, 0, 1]))
    # group 0 as in the D3PO case: B beats both (1.0), C beats grey (0.5), grey 0; the lone image 1/2
    assert out.tolist() == [0.0, 1.0, 0.5, 0.5]


# ------------------------------------------------------------------ the reward model
def test_reward_model_round_trip_through_rewards_load(tmp_path):
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    prompts = ["two red squares", "a blue circle left of a green cross"] * 4
    pairs = [(i, (i + 1) % 8) for i in range(8)]
    factors = [{"name": "shapes_count", "margin": 0.1}, {"name": "shapes_attribute", "margin": 0.05}]
    out = tmp_path / "heron_rm.safetensors"
    head, rep = train_heron_rm(images, prompts, pairs, {"kind": "shapes", "which": "judge"}, out=out, factors=factors,
                               margin_scale="std", hidden=8, epochs=2, batch_size=4)
    r = rewards.load("heron_rm", path=str(out))
    got = r(images, prompts)
    assert got.shape == (8,)
    # standardised over the training images: mean 0, std 1 (the reference's rm.mu / rm.sigma)
    assert abs(float(got.mean())) < 1e-4 and abs(float(got.std()) - 1) < 1e-4
    assert r.manifest["factors"] == factors and r.manifest["margin_scale"] == "std"
    assert r.manifest["backbone"] == {"kind": "shapes", "which": "judge"} and r.manifest["report"]["pairs"] == 8
    h2, man = read_model(out)
    assert torch.equal(h2.mlp[0].weight, head.mlp[0].weight)
    bad = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(bad), metadata={"format": "something/1"})
    with pytest.raises(rewards.RewardError, match="not a HERON reward model"):
        rewards.load("heron_rm", path=str(bad))
    with pytest.raises(rewards.RewardError, match="no labelled pairs"):
        train_heron_rm(images, prompts, [], {"kind": "shapes", "which": "judge"})


# ------------------------------------------------------------------ schema errors
def _validate(tmp_path, capsys, cfg: dict) -> tuple[int, str]:
    from vfeedback.cli import main

    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    rc = main(["validate", str(p)])
    return rc, capsys.readouterr().err


def _cfg(tmp_path, **over):
    c = {"algorithm": "d3po", "output_dir": str(tmp_path / "run"), "model": {"family": "sd15", "path": "tiny:sd15"},
         "reward": [{"name": "brightness"}], "prompts": {"train": ["a"]}, "d3po": {"preference": "heron"},
         "heron": {"factors": [{"name": "saturation", "margin": 0.1}]}}
    c.update(over)
    return c


@pytest.mark.parametrize("over, field", [
    ({"heron": None}, "heron section"),
    ({"heron": {"factors": [{"name": "saturation", "margin": -0.5}]}}, "heron.factors.0.margin"),
    ({"heron": {"factors": []}}, "heron.factors"),
    ({"heron": {"factors": [{"name": "saturation"}], "margin_scale": "log"}}, "heron.margin_scale"),
    ({"heron": {"factors": [{"name": "saturation"}, {"name": "no_such_reward"}]}}, "heron.factors.1.name: unknown reward"),
])
def test_schema_errors_name_the_field(tmp_path, capsys, over, field):
    rc, err = _validate(tmp_path, capsys, _cfg(tmp_path, **over))
    assert rc == 2 and field in err and "Traceback" not in err


def test_cli_bad_factor_exits_2(tmp_path, capsys):
    from rewards.heron import main

    (tmp_path / "g.jsonl").write_text('{"prompt": "a", "images": ["x.png", "y.png"]}\n')
    assert main(["--groups", str(tmp_path / "g.jsonl"), "--factor", "shapes_count", "--out", str(tmp_path / "m.safetensors")]) == 2
    assert "--factor 'shapes_count': expected NAME:MARGIN" in capsys.readouterr().err
    assert main(["--groups", str(tmp_path / "g.jsonl"), "--factor", "shapes_count:-1", "--out", str(tmp_path / "m.safetensors")]) == 2
    assert main(["--groups", str(tmp_path / "nope.jsonl"), "--factor", "shapes_count:0.1", "--out", str(tmp_path / "m.safetensors")]) == 2
    assert "--groups" in capsys.readouterr().err and not (tmp_path / "m.safetensors").exists()


# ------------------------------------------------------------------ end to end (slow: full runs)
HERON_OV = ['heron={factors: [{name: saturation, margin: 0.02}, {name: brightness, margin: 0.0}]}']


@pytest.mark.slow
def test_d3po_run_with_the_heron_oracle(tmp_path):
    import json
    from pathlib import Path

    from vfeedback import cli

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "run"
    rc = cli.main(["train", str(root / "configs/d3po/tiny.yaml"), f"output_dir={out}", "train.max_steps=2", "sampling.steps=3",
                   "prompts.eval=[a red apple]", "prompts.eval_seeds=[0]", "d3po.winrate_seeds=[1000]", "log.trackers=[]",
                   "d3po.preference=heron", *HERON_OV])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["d3po"]["judge"] == "heron(saturation > brightness)" and 0.0 <= summary["heldout_win_rate"] <= 1.0
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and all("reward/saturation" in r and r["d3po/pairs"] + r["d3po/ties"] == 12 for r in recs)


@pytest.mark.slow
def test_zo_ranksgd_run_with_the_heron_ranker(tmp_path):
    import json
    from pathlib import Path

    from vfeedback import cli

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "run"
    rc = cli.main(["train", str(root / "configs/zo_ranksgd/tiny.yaml"), f"output_dir={out}", "zo_ranksgd.rounds=2",
                   "zo_ranksgd.ranker=heron", "log.trackers=[]", *HERON_OV])
    assert rc == 0
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and json.loads((out / "summary.json").read_text())["rounds"] == 2
