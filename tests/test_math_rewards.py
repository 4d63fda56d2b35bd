"""Exact values for the reward transforms and combinations: rewards/base.py (WeightedSum's three
normalisations, RunningNorm, combine), rewards/analytic.py (colour, brightness, saturation),
rewards/shapes.py (caption parsing, soft centres, the scoring terms) and rewards/itercomp_rm.py
(pairs of a ranking, the pairwise loss, accuracy, the head's standardisation, the hinge
combination). Hand-computed cases; see `make mutants`."""
import math

import pytest
import torch
from torch import nn

import rewards
from rewards import analytic, shapes
from rewards.base import Ensemble, Reward, RewardError, RunningNorm, WeightedSum, combine, register
from rewards.itercomp_rm import (
    CompositionRewardModel,
    RewardHead,
    pair_accuracy,
    pairwise_ranking_loss,
    ranking_pairs,
    train_pairwise_head,
)

NAN = float("nan")


class Fixed(Reward):
    """Returns the next of the given score vectors on each call."""

    def __init__(self, *values, differentiable=True, needs_prompt=False, name="fixed"):
        super().__init__()
        self.values = [torch.tensor(v, dtype=torch.float32) for v in values]
        self.calls = 0
        self.differentiable = differentiable
        self.needs_prompt = needs_prompt
        self.name = name

    def forward(self, images, prompts=None, **context):
        v = self.values[min(self.calls, len(self.values) - 1)]
        self.calls += 1
        return v.clone()


def _same(got, want, tol=1e-6):
    got = [float(x) for x in got]
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if math.isnan(w):
            assert math.isnan(g), (got, want)
        else:
            assert g == pytest.approx(w, abs=tol), (got, want)


IMGS = torch.zeros(3, 3, 2, 2)


# ------------------------------------------------------------------ WeightedSum / RunningNorm


def test_weighted_sum_plain_skips_nan_terms():
    ws = WeightedSum([Fixed([1.0, 2.0, NAN]), Fixed([0.5, NAN, NAN])], [2, -1], names=["a", "b"])
    _same(ws(IMGS), [1.5, 4.0, NAN])
    _same(ws.last_components["a"], [1.0, 2.0, NAN])
    _same(ws.last_components["b"], [0.5, NAN, NAN])
    assert ws.name == "a+b" and ws.weights == [2.0, -1.0]


class _Ctx(Reward):
    def forward(self, images, prompts=None, offset=0.0, **context):
        return images.mean(dim=(1, 2, 3)) + torch.tensor([float(len(p)) for p in prompts]) + offset


def test_weighted_sum_passes_images_prompts_and_context():
    x = torch.stack([torch.full((3, 2, 2), 0.5), torch.full((3, 2, 2), 0.25)])
    ws = WeightedSum([_Ctx(), analytic.Brightness()], [1.0, 2.0])
    _same(ws(x, ["ab", "abcd"], offset=10.0), [0.5 + 2 + 10 + 1.0, 0.25 + 4 + 10 + 0.5])


def test_weighted_sum_flags_and_errors():
    ws = WeightedSum([Fixed([1.0], name="p"), Fixed([1.0], differentiable=False, needs_prompt=True, name="q")], [1, 1])
    assert ws.differentiable is False and ws.needs_prompt is True and ws.names == ["p", "q"]
    ws = WeightedSum([Fixed([1.0]), Fixed([1.0])], [1, 1])
    assert ws.differentiable is True and ws.needs_prompt is False
    with pytest.raises(RewardError, match="2 rewards but 1 weights"):
        WeightedSum([Fixed([1.0]), Fixed([1.0])], [1])
    with pytest.raises(RewardError, match="normalize"):
        WeightedSum([Fixed([1.0])], [1], normalize="z")


def test_weighted_sum_batch_zscore():
    # mean 2, unbiased std 1
    _same(WeightedSum([Fixed([1.0, 2.0, 3.0])], [3], normalize="batch")(IMGS), [-3.0, 0.0, 3.0])
    # NaN left out of the statistics: finite [1, 3, 5]: mean 3, std 2
    x = torch.zeros(4, 3, 2, 2)
    _same(WeightedSum([Fixed([1.0, NAN, 3.0, 5.0])], [1], normalize="batch")(x), [-1.0, NAN, 0.0, 1.0])
    # one finite value: centred, std taken as 1
    _same(WeightedSum([Fixed([4.0, NAN])], [1], normalize="batch")(IMGS[:2]), [0.0, NAN])
    # a spread below 1e-6 is clamped to 1e-6: [0, 1e-7] -> +-5e-8 / 1e-6
    _same(WeightedSum([Fixed([0.0, 1e-7])], [1], normalize="batch")(IMGS[:2]), [-0.05, 0.05], tol=1e-3)


def test_running_norm_welford():
    n = RunningNorm()
    assert {b.dtype for b in (n.count, n.mean, n.m2)} == {torch.float64}  # statistics of all history in float64
    assert float(n.std()) == 1.0  # fewer than 2 values
    n.update(torch.tensor([5.0]))
    assert float(n.count) == 1 and float(n.mean) == 5.0 and float(n.std()) == 1.0
    n.update(torch.tensor([1.0, NAN, 3.0]))
    # values 5, 1, 3: mean 3, unbiased variance (4 + 4 + 0) / 2 = 4
    assert float(n.count) == 3 and float(n.mean) == pytest.approx(3.0) and float(n.m2) == pytest.approx(8.0)
    assert float(n.std()) == pytest.approx(2.0)
    n2 = RunningNorm()
    n2.update(torch.tensor([2.0, 2.0]))
    assert float(n2.std()) == pytest.approx(1e-6)


def test_weighted_sum_running_divides_by_the_std_in_float32():
    ws = WeightedSum([Fixed([1.0, 3.0, 5.0])], [1], normalize="running")
    ws.update_stats = True
    out = ws(IMGS)
    _same(out, [-1.0, 0.0, 1.0])  # mean 3, std 2
    assert out.dtype == torch.float32


def test_weighted_sum_running_updates_only_when_told():
    ws = WeightedSum([Fixed([1.0, 2.0, 3.0], [4.0], [4.0])], [2], normalize="running")
    ws.update_stats = True
    _same(ws(IMGS), [-2.0, 0.0, 2.0])  # stats of [1, 2, 3]: mean 2, std 1
    ws.update_stats = False
    _same(ws(IMGS[:1]), [4.0])  # (4 - 2) / 1 * 2, stats unchanged
    assert float(ws.norms[0].count) == 3
    seen = []
    ws.stats_gather = lambda v: (seen.append(v), torch.cat([v, torch.tensor([0.0])]))[1]
    ws.update_stats = True
    ws(IMGS[:1])
    assert len(seen) == 1 and float(ws.norms[0].count) == 5  # 4 and the gathered 0


def test_combine_single_plain_else_weighted():
    b = combine([{"name": "brightness"}])
    assert isinstance(b, analytic.Brightness)
    w = combine([{"name": "brightness", "weight": 2.0}])
    assert isinstance(w, WeightedSum) and w.weights == [2.0]
    n = combine([{"name": "brightness"}], normalize="batch")
    assert isinstance(n, WeightedSum) and n.normalize == "batch"
    t = combine([{"name": "brightness", "options": {"target": 0.25}, "weight": 1.0}])
    assert t.target == 0.25
    two = combine([{"name": "brightness", "target": 0.5}, {"name": "saturation", "weight": 0.5}])
    assert two.names == ["brightness", "saturation"] and two.weights == [1.0, 0.5]


def test_combine_ensemble_names_defaults_and_normalisation():
    members = [{"name": "brightness"}, {"name": "brightness", "target": 0.25}, {"name": "saturation"}]
    e = combine(members, ensemble="uwo")
    assert isinstance(e, Ensemble) and e.mode == "uwo" and e.uwo_lambda == 0.5  # Ensemble's and combine's default
    # two members of one scorer are told apart by position; a unique one keeps its name
    assert e.names == ["brightness#0", "brightness#1", "saturation"]
    assert e.name == "uwo(brightness#0,brightness#1,saturation)"
    assert combine(members, ensemble="mean", normalize="batch").normalize == "batch"
    assert combine(members, ensemble="wco", uwo_lambda=2.0).uwo_lambda == 2.0
    with pytest.raises(RewardError, match="not weighted"):
        combine([{"name": "brightness"}, {"name": "saturation", "weight": 2.0}], ensemble="mean")


def test_combine_names_a_weighted_sum_by_its_specs(monkeypatch):
    import rewards.base as rb

    rb._import_builtin()
    monkeypatch.setattr(rb, "_REGISTRY", dict(rb._REGISTRY))  # the alias leaves with this test

    @register("_test_alias", differentiable=True, description="brightness under another name (test)")
    def _alias(**kw):
        return analytic.Brightness(**kw)

    # load() names each reward by the name it was asked for, so a weighted sum's terms read as the specs
    w = combine([{"name": "_test_alias"}, {"name": "saturation", "weight": 0.5}])
    assert isinstance(w.rewards[0], analytic.Brightness) and w.names == ["_test_alias", "saturation"]


# ------------------------------------------------------------------ analytic


def _solid(*rgb, h=2, w=2):
    return torch.tensor(rgb, dtype=torch.float32)[None, :, None, None].expand(1, 3, h, w).clone()


def test_colour_parsing():
    assert analytic.colour_from_prompt("A big RED car, then blue") == analytic.COLORS["red"]
    assert analytic.colour_from_prompt("a reddish car") is None
    assert analytic._parse_colour("#ff8000") == pytest.approx((1.0, 128 / 255, 0.0))
    assert analytic._parse_colour("00ff00") == pytest.approx((0.0, 1.0, 0.0))
    assert analytic._parse_colour("#0a0B1c") == pytest.approx((10 / 255, 11 / 255, 28 / 255))
    assert analytic._parse_colour("Blue") == analytic.COLORS["blue"]
    assert analytic._parse_colour([0, 0.5, 1]) == (0.0, 0.5, 1.0)
    assert analytic._parse_colour(None) is None
    for bad in ([0, 0, 1.01], [-0.01, 0, 0], [0, 1], "#12345", "mauve"):
        with pytest.raises(RewardError, match="color"):
            analytic._parse_colour(bad)


def test_color_match_values():
    r = analytic.ColorMatch(color=(0, 0, 0), sharpness=0.5)
    assert r.needs_prompt is False
    x = torch.cat([_solid(0, 0, 0), _solid(0.5, 0.5, 0.5)])
    # d^2 = 3 * 0.25 = 0.75; exp(-0.75 / (2 * 0.25)) = exp(-1.5)
    _same(r(x), [1.0, math.exp(-1.5)])
    half = _solid(0, 0, 0, w=2)
    half[..., 1] = 1.0  # one column white: d^2 = 3
    _same(r(half), [(1 + math.exp(-3 / 0.5)) / 2])
    # default sharpness 0.25: exp(-0.75 / (2 * 0.0625)) = exp(-6)
    _same(analytic.ColorMatch(color=(0, 0, 0))(_solid(0.5, 0.5, 0.5)), [math.exp(-6.0)])
    p = analytic.ColorMatch()
    assert p.needs_prompt is True
    red = _solid(*analytic.COLORS["red"])
    _same(p(torch.cat([red, red]), ["a red apple", "an apple"]), [1.0, NAN])
    with pytest.raises(RewardError, match="needs prompts"):
        p(red)
    with pytest.raises(RewardError, match="sharpness"):
        analytic.ColorMatch(sharpness=0)
    assert analytic.ColorMatch(sharpness=1e-3).sharpness == 1e-3


def test_brightness_and_saturation():
    x = torch.cat([_solid(1, 0, 0), _solid(0, 1, 0), _solid(0, 0, 1)])
    _same(analytic.Brightness()(x), [0.2126, 0.7152, 0.0722])
    _same(analytic.Brightness(target=0.5)(x), [-0.2874, -0.2152, -0.4278])
    y = _solid(0.2, 0.5, 0.9)
    y[..., 0, 0] = 0.4  # one pixel grey: saturation 0
    _same(analytic.Saturation()(y), [0.7 * 3 / 4])


# ------------------------------------------------------------------ shapes


def test_categories_and_plurals():
    assert shapes.category("red", "circle") == 0
    assert shapes.category("yellow", "square") == 5
    assert shapes.category("purple", "cross") == 23 == shapes.N_CATEGORIES - 1
    assert shapes.Item("green", "triangle").category == 10
    assert shapes.plural("cross") == "crosses" and shapes.plural("circle") == "circles"


def test_parse_captions():
    S, I = shapes.Spec, shapes.Item
    assert shapes.parse("A red circle left of a blue square.") == S("spatial", (I("red", "circle"), I("blue", "square")), "left of")
    assert shapes.parse("a red circle is to the right of a blue square").relation == "right of"
    assert shapes.parse("a red circle on top of a blue square").relation == "above"
    assert shapes.parse("a red circle under a blue square").relation == "below"
    assert shapes.parse("a red circle below a blue square").relation == "below"
    assert shapes.parse("a red circle left of a red circle") is None
    assert shapes.parse("two red squares and three blue crosses") == S("count", (I("red", "square", 2), I("blue", "cross", 3)))
    assert shapes.parse("one green triangle") == S("count", (I("green", "triangle", 1),))
    assert shapes.parse("a red circle and a blue square") == S("attribute", (I("red", "circle"), I("blue", "square")))
    assert shapes.parse("a red circle and a red circle") is None
    assert shapes.parse("a pink circle") is None
    assert shapes.parse("") is None
    for cap in ("two red squares and one blue cross", "a green triangle above a yellow circle", "a cyan cross"):
        assert shapes.parse(cap).caption() == cap


def test_soft_centres_orientation():
    g = 8
    logits = torch.zeros(1, 2, g * g)
    logits[0, 0, 2 * g + 5] = 100.0  # row 2, column 5
    c = shapes._soft_centres(logits, g)
    assert c.shape == (1, 2, 2)
    assert c[0, 0].tolist() == pytest.approx([5.5 / 8, 2.5 / 8], abs=1e-6)
    assert c[0, 1].tolist() == pytest.approx([0.5, 0.5], abs=1e-6)


def _reading(pa, pb, ca, cb, a=("red", "circle"), b=("blue", "square")):
    counts = torch.zeros(shapes.N_CATEGORIES, 4)
    coords = torch.full((shapes.N_CATEGORIES, 2), 0.5)
    ia, ib = shapes.category(*a), shapes.category(*b)
    counts[ia] = torch.tensor(pa).log()
    counts[ib] = torch.tensor(pb).log()
    coords[ia] = torch.tensor(ca)
    coords[ib] = torch.tensor(cb)
    return counts, coords


def test_spec_terms_and_match_prob():
    counts, coords = _reading([0.2, 0.3, 0.4, 0.1], [0.5, 0.25, 0.15, 0.1], [0.2, 0.5], [0.6, 0.3])
    att = shapes.parse("a red circle and a blue square")
    t = shapes.spec_terms(counts, coords, att)
    assert set(t) == {"attribute"}
    assert float(t["attribute"]) == pytest.approx(0.8 * 0.5, abs=1e-6)
    assert float(shapes.match_prob(t)) == pytest.approx(0.4, abs=1e-6)
    cnt = shapes.parse("two red circles and one blue square")
    t = shapes.spec_terms(counts, coords, cnt)
    assert float(t["count"]) == pytest.approx(0.4 * 0.25, abs=1e-6)
    assert float(shapes.match_prob(t)) == pytest.approx(0.1, abs=1e-6)
    # b - a = (0.4, -0.2); tau 0.1
    want = {"left of": 4.0, "right of": -4.0, "above": -2.0, "below": 2.0}
    for rel, z in want.items():
        sp = shapes.parse(f"a red circle {rel} a blue square")
        t = shapes.spec_terms(counts, coords, sp, tau=0.1)
        s = 1 / (1 + math.exp(-z))
        assert float(t["spatial"]) == pytest.approx(s, abs=1e-6), rel
        assert float(shapes.match_prob(t)) == pytest.approx(0.4 * s, abs=1e-6), rel
    t = shapes.spec_terms(counts, coords, shapes.parse("a red circle left of a blue square"))
    assert float(t["spatial"]) == pytest.approx(1 / (1 + math.exp(-10.0)), abs=1e-6)  # default tau 0.04


def test_shapes_judge_forward_is_the_terms_of_its_reading():
    j = rewards.load("shapes_judge")
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    caps = ["not a caption", "a red circle left of a blue square", "two green crosses"]
    counts, coords = j.read(x)
    want = [float(shapes.match_prob(shapes.spec_terms(counts[i], coords[i], shapes.parse(c)))) for i, c in enumerate(caps) if i]
    _same(j(x, caps), [NAN] + want, tol=1e-6)
    _same(rewards.load("shapes_judge", log=True)(x, caps), [NAN] + [math.log(max(v, 1e-6)) for v in want], tol=1e-5)
    sp = rewards.load("shapes_spatial", tau=0.1)(x, caps)
    assert math.isnan(float(sp[2]))
    want_sp = float(shapes.spec_terms(counts[1], coords[1], shapes.parse(caps[1]), tau=0.1)["spatial"])
    assert float(sp[1]) == pytest.approx(want_sp, abs=1e-6)
    # one prompt for the whole batch
    one = j(x, caps[1])
    want_one = [float(shapes.match_prob(shapes.spec_terms(counts[i], coords[i], shapes.parse(caps[1])))) for i in range(3)]
    _same(one, want_one, tol=1e-6)
    # one prompt for a batch whose size is not the channel count (3)
    _same(j(x[:2], caps[1]), want_one[:2], tol=1e-6)
    with pytest.raises(RewardError, match="part"):
        shapes.ShapesJudge(part="colour")
    with pytest.raises(RewardError, match="tau"):
        shapes.ShapesJudge(tau=0)


# ------------------------------------------------------------------ itercomp_rm


def test_ranking_pairs():
    assert ranking_pairs([2, 0, 1]) == [(2, 0), (2, 1), (0, 1)]
    assert ranking_pairs([2], n=3) == [(2, 0), (2, 1)]
    assert ranking_pairs([1, 0], n=4) == [(1, 0), (1, 2), (1, 3), (0, 2), (0, 3)]
    assert ranking_pairs([]) == []


def test_pairwise_loss_and_accuracy():
    rb, rw = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    per = pairwise_ranking_loss(rb, rw, reduction="none")
    assert per.tolist() == pytest.approx([math.log1p(math.exp(-1)), math.log1p(math.exp(2))], abs=1e-6)
    assert float(pairwise_ranking_loss(rb, rw)) == pytest.approx((math.log1p(math.exp(-1)) + math.log1p(math.exp(2))) / 2, abs=1e-6)
    assert pair_accuracy(torch.tensor([1.0, 0.0, -1.0, 2.0]), torch.zeros(4)) == 0.625
    assert pair_accuracy(torch.tensor([1.0, 2.0, 3.0, 1.0]), torch.tensor([0.0, 2.0, 4.0, 0.0])) == 0.625
    assert pair_accuracy(torch.tensor([1.0]), torch.tensor([0.0])) == 1.0
    assert math.isnan(pair_accuracy(torch.zeros(0), torch.zeros(0)))


def test_reward_head_standardisation():
    torch.manual_seed(0)
    h = RewardHead(2, hidden=8, dropout=0.0).eval()
    img = torch.tensor([[0.0, 1.0], [2.0, 1.0], [1.0, 1.0]])
    txt = torch.tensor([[1.0, 3.0], [1.0, 5.0], [1.0, 4.0]])
    h.fit_features(img, txt)
    assert h.feat_mean.tolist() == [[1.0, 1.0], [1.0, 4.0]]
    assert h.feat_std.flatten().tolist() == pytest.approx([1.0, 1.0, 1.0, 1.0])  # std 1 / constant -> 1
    h.fit_features(img * 2, txt)
    assert h.feat_std[0].tolist() == pytest.approx([2.0, 1.0])
    h.fit_features(img[:1], txt[:1])
    assert h.feat_std.tolist() == [[1.0, 1.0], [1.0, 1.0]] and h.feat_mean[0].tolist() == [0.0, 1.0]
    # a feature whose spread is above 1e-3 is scaled by it, one below is left unscaled
    h.fit_features(torch.tensor([[0.0, 0.0], [0.002, 0.001]]), txt[:2])
    assert h.feat_std[0].tolist() == pytest.approx([0.002 / math.sqrt(2), 1.0], rel=1e-5)
    h.feat_mean.copy_(torch.tensor([[1.0, 1.0], [1.0, 4.0]]))
    h.feat_std.copy_(torch.tensor([[2.0, 1.0], [1.0, 0.5]]))
    a = torch.tensor([[3.0, 2.0]])
    t = torch.tensor([[0.0, 5.0]])
    na, nt = torch.tensor([[1.0, 1.0]]), torch.tensor([[-1.0, 2.0]])
    want_raw = h.mlp(torch.cat([na, nt, na * nt], -1)).squeeze(-1)
    assert torch.allclose(h.raw(a, t), want_raw, atol=1e-6)
    h.mean.fill_(1.0)
    h.std.fill_(2.0)
    assert torch.allclose(h(a, t), (want_raw - 1.0) / 2.0, atol=1e-6)
    # float64 prompts are cast to the image dtype; leading dimensions are kept, the last is the feature
    assert torch.allclose(h.raw(a, t.double()), want_raw, atol=1e-6)
    assert torch.allclose(h.raw(a[None].expand(1, 2, 2), t[None].expand(1, 2, 2)), want_raw.expand(1, 2), atol=1e-6)
    assert h.raw(a[None].expand(1, 2, 2), t[None].expand(1, 2, 2)).shape == (1, 2)
    h.std.fill_(0.0)
    assert torch.allclose(h(a, t), (want_raw - 1.0) / 1e-6, rtol=1e-5)


def test_train_pairwise_head_moves_the_loss_down_and_keeps_the_best_epoch():
    torch.manual_seed(0)
    feats_b = torch.randn(32, 3) + torch.tensor([1.0, 0.0, 0.0])
    feats_w = torch.randn(32, 3) - torch.tensor([1.0, 0.0, 0.0])
    head = nn.Linear(3, 1)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[-0.5, 0.1, 0.1]]))
        head.bias.zero_()
    score = lambda idx: (head(feats_b[idx]).squeeze(-1), head(feats_w[idx]).squeeze(-1))

    def ev():
        with torch.no_grad():
            rb, rw = score(torch.arange(32))
            return float(pairwise_ranking_loss(rb, rw)), pair_accuracy(rb, rw)

    l0, a0 = ev()
    best, hist = train_pairwise_head(head, score, 32, ev, None, epochs=20, batch_size=8, lr=0.05, weight_decay=0.0, seed=0)
    l1, a1 = ev()
    assert l1 < l0 - 0.3 and a1 > a0 and float(head.weight[0, 0].detach()) > 0  # the better side scores higher
    assert best == 20  # no validation: the last epoch
    assert [h["epoch"] for h in hist] == [1, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20]
    assert hist[-1]["train_loss"] == pytest.approx(l1)
    # validation that never beats the start: the starting weights are kept (epoch 0)
    w0 = head.weight.detach().clone()
    best, _ = train_pairwise_head(head, score, 32, ev, lambda: (5.0, 0.5), epochs=3, batch_size=8, lr=0.05, weight_decay=0.0,
                                  seed=0, start_val_loss=1.0)
    assert best == 0 and torch.equal(head.weight, w0)
    # validation equal to the start: still not better (strict)
    best, _ = train_pairwise_head(head, score, 32, ev, lambda: (1.0, 0.5), epochs=2, batch_size=8, lr=0.05, weight_decay=0.0,
                                  seed=0, start_val_loss=1.0)
    assert best == 0
    # falling validation: the lowest epoch wins
    vals = iter([0.9, 0.5, 0.7])
    best, _ = train_pairwise_head(head, score, 32, ev, lambda: (next(vals), 0.5), epochs=3, batch_size=8, lr=0.05,
                                  weight_decay=0.0, seed=0)
    assert best == 2


def _composition(weights, margin, comps):
    m = CompositionRewardModel.__new__(CompositionRewardModel)
    Reward.__init__(m)
    m.weights, m.hinge_margin, m.name = weights, margin, "itercomp_rm"
    # each aspect's score plus the images' mean plus 10 x the number of prompts seen
    m.components = lambda images, prompts: {k: torch.tensor(v) + images.mean(dim=(1, 2, 3)) + 10.0 * (len(prompts) - 3)
                                             for k, v in comps.items()}
    return m


def test_composition_hinge_and_weighted_sum():
    comps = {"a": [0.5, 2.0, -1.0], "b": [-1.0, 3.0, 0.25]}
    x = torch.zeros(3, 3, 2, 2)
    shifted = _composition({"a": 1.0, "b": 0.0}, None, comps)(x + 1.0, "p")
    _same(shifted, [1.5, 3.0, 0.0])  # the images reach components (+1), the prompt is expanded to 3
    # m - sum_c w_c relu(m - r_c), m = 1, w = (1, 2)
    _same(_composition({"a": 1.0, "b": 2.0}, 1.0, comps)(x, "p"), [1 - 0.5 - 4.0, 1.0, 1 - 2.0 - 1.5])
    _same(_composition({"a": 1.0, "b": 2.0}, None, comps)(x, "p"), [0.5 - 2.0, 8.0, -0.5])
    m = _composition({"a": 1.0, "b": 2.0}, None, comps)
    m(x, ["p"] * 3)
    assert set(m.last_components) == {"a", "b"}
    with pytest.raises(RewardError, match="prompt"):
        m(x)
    # one prompt for a batch of 2 (not the channel count): expanded to the batch
    two = _composition({"a": 1.0, "b": 0.0}, None, {"a": [0.5, 2.0], "b": [0.0, 0.0]})
    _same(two(torch.zeros(2, 3, 2, 2), "p"), [0.5 - 10.0, 2.0 - 10.0])


def test_train_pairwise_head_batches_seed_weight_decay_and_history():
    feats = torch.randn(10, 2, generator=torch.Generator().manual_seed(3))

    def run(seed=0, wd=0.0, epochs=2, batch_size=4):
        head = nn.Linear(2, 1)
        with torch.no_grad():
            head.weight.fill_(0.3)
            head.bias.zero_()
        seen = []

        def score(idx):
            seen.append(idx.tolist())
            return head(feats[idx]).squeeze(-1), head(-feats[idx]).squeeze(-1)

        ev = lambda: (0.0, 1.0)
        _, hist = train_pairwise_head(head, score, 10, ev, None, epochs=epochs, batch_size=batch_size, lr=0.1,
                                      weight_decay=wd, seed=seed)
        return head.weight.detach().clone(), seen, hist

    w0, seen, hist = run()
    # each epoch visits the 10 pairs once, in batches of 4, 4, 2
    assert [len(s) for s in seen] == [4, 4, 2, 4, 4, 2]
    assert sorted(sum(seen[:3], [])) == list(range(10)) and sorted(sum(seen[3:], [])) == list(range(10))
    torch.randn(5)  # the global generator plays no part
    w1, seen1, _ = run()
    assert torch.equal(w0, w1) and seen1 == seen
    assert run(seed=1)[1] != seen
    assert not torch.equal(run(wd=0.5)[0], w0)
    assert set(hist[0]) == {"epoch", "train_loss", "train_acc", "val_loss", "val_acc"}
    assert math.isnan(hist[0]["val_loss"]) and math.isnan(hist[0]["val_acc"]) and hist[0]["train_acc"] == 1.0
    assert [h["epoch"] for h in run(epochs=25, batch_size=10)[2]] == [1, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 25]
    assert [h["epoch"] for h in run(epochs=5, batch_size=10)[2]] == [1, 2, 3, 4, 5]


def test_weighted_sum_starts_with_no_components_and_frozen_stats():
    ws = WeightedSum([Fixed([1.0, 2.0, 3.0], [4.0], [4.0])], [1], normalize="running")
    assert ws.last_components == {} and ws.update_stats is False and ws.names == ["fixed"]
    ws(IMGS)  # a fresh WeightedSum does not learn statistics until a trainer says so
    assert float(ws.norms[0].count) == 0
