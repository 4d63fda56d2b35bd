"""Exact values for the preference methods' core math, no model download: HERON's comparator,
margins, pair labels, weighted-sum baseline, Copeland ranking and oracle (rewards/heron.py,
vfeedback/feedback/heron.py); VPL's ELBO terms, annealing, latent rescaling, reparameterised
draw, feature standardisation, decoder input and context sampling (rewards/vpl.py); RAPL's
cosine cost, entropic OT plan and cost, triplet loss, reward against the closest demonstration
and the gym wrapper's reward (rewards/rapl.py, RAPLReward in vfeedback/integrations/gym.py).
Hand-computed cases with binary fractions where a bound is tested, so the boundary is exact.
See `make mutants` (these functions are in tests/mutants.py's SCOPE)."""
import math
import statistics

import numpy as np
import pytest
import torch

from rewards.base import RewardError
from rewards.heron import _group_pairs, factor_margins, heron_compare, heron_label, weighted_label
from rewards.rapl import _check_eps, cosine_cost, ot_distance, ot_frame_costs, sinkhorn_plan, triplet_loss
from rewards.vpl import PairSet, VPLModel, _ranked_pairs, anneal, elbo_loss, kl_standard_normal, rescale_latent, sample_contexts
from vfeedback.feedback.heron import HeronPreferenceOracle, copeland_order

NAN, INF = float("nan"), float("inf")
F64 = torch.float64


def _sig(z):
    return 1.0 / (1.0 + math.exp(-z))


def _softplus(z):
    return math.log1p(math.exp(z))


# ============================================================================ HERON: the comparator
def test_heron_falls_through_a_lead_of_exactly_the_margin_at_every_level():
    # level 0: 0.625 - 0.5 = 0.125 = its margin; level 1: 0.5 - 0.25 = 0.25 = its margin; level 2 decides
    a, b, m = [0.5, 0.25, 0.0], [0.625, 0.5, 1.0], [0.125, 0.25, 0.5]
    assert heron_compare(a, b, m) == (1, 2)
    assert heron_compare(b, a, m) == (0, 2)
    # a lead 2^-20 over the margin decides at that level, in both directions
    assert heron_compare([0.5, 0.5 + 2 ** -20, 0.0], [0.625, 0.25, 1.0], m) == (0, 1)
    assert heron_compare([0.625 + 2 ** -20, 0.0], [0.5, 1.0], [0.125, 0.0]) == (0, 0)
    assert heron_compare([0.5, 1.0], [0.625 + 2 ** -20, 0.0], [0.125, 0.0]) == (1, 0)
    # zero margins: equal values fall through, any lead decides
    assert heron_compare([0.5, 0.5], [0.5, 0.75], [0.0, 0.0]) == (1, 1)
    assert heron_compare([0.5, 0.5], [0.5, 0.5], [0.0, 0.0]) == (None, None)
    w, k = heron_compare([0.25], [0.0], [0.0])
    assert (w, k) == (0, 0) and type(w) is int and type(k) is int


def test_heron_nan_rule():
    assert heron_compare([NAN, 0.5], [NAN, 0.25], [0.0, 0.0]) == (0, 1)  # both NaN: fall through, not stop
    assert heron_compare([NAN, 0.5], [0.0, 0.25], [0.0, 0.0]) == (1, 0)  # one NaN loses to any number
    assert heron_compare([0.0, 0.25], [NAN, 0.5], [0.0, 0.0]) == (0, 0)
    assert heron_compare([NAN], [NAN], [0.0]) == (None, None)


@pytest.mark.parametrize("a, b, m", [([0.1], [0.1, 0.2], [0.0, 0.0]), ([0.1, 0.2], [0.1], [0.0, 0.0]), ([0.1, 0.2], [0.1, 0.2], [0.0])])
def test_heron_compare_refuses_mismatched_lengths(a, b, m):
    with pytest.raises(ValueError, match="heron_compare"):
        heron_compare(a, b, m)


def test_factor_margins_absolute_and_std():
    v = torch.tensor([[1.0, 0.5], [3.0, NAN], [INF, -INF]], dtype=F64)
    assert factor_margins(v, [0.5, 0]) == [0.5, 0.0]  # default "absolute": as given; 0 is allowed
    # "std": column 0's finite entries 1, 3 -> unbiased std sqrt(2); column 1 has one finite entry -> 0
    got = factor_margins(v, [0.5, 2.0], "std")
    assert got == pytest.approx([0.5 * math.sqrt(2.0), 0.0], rel=1e-15, abs=0)
    assert factor_margins(v.flatten(), [0.5, 2.0], "std") == got  # (N * K,) read as (N, K)
    f32 = torch.tensor([[0.1], [0.2], [0.4]])  # float32 values: the std is taken in float64
    assert factor_margins(f32, [1.0], "std")[0] == pytest.approx(statistics.stdev(f32.flatten().tolist()), rel=1e-13)
    for bad in ([-0.25, 0.0], [NAN, 0.0]):
        with pytest.raises(ValueError, match="margins must be >= 0"):
            factor_margins(v, bad, "absolute")
    with pytest.raises(ValueError, match="margin scale"):
        factor_margins(v, [0.5, 0.5], "relative")


def test_group_pairs_within_groups_in_order():
    assert _group_pairs([1, 0, 1, 0, 1]) == [(0, 2), (0, 4), (2, 4), (1, 3)]
    assert _group_pairs([7]) == [] and _group_pairs([2, 3]) == []


# rows 0-2 one prompt, rows 3-5 another
LAB_V = torch.tensor([[0.5, 0.5], [0.5, 0.75], [1.0, 0.0], [0.25, 0.5], [0.5, 0.5], [0.0, 0.5]], dtype=F64)
LAB_G = [0, 0, 0, 1, 1, 1]


def test_heron_label_pairs_levels_ties():
    lab = heron_label(LAB_V, LAB_G, [0.25, 0.0])
    # (0,1): red equal, green 0.75 wins -> (1, 0) at level 1; (0,2), (1,2): red 1.0 leads by 0.5 > 0.25;
    # (3,4): red lead 0.25 = margin, green equal -> tie; (3,5) likewise; (4,5): red lead 0.5 -> (4, 5)
    assert lab.pairs == [(1, 0), (2, 0), (2, 1), (4, 5)]
    assert lab.levels == [1, 0, 0, 0]
    assert lab.ties == 2 and lab.margins == [0.25, 0.0] and lab.level_counts(2) == [3, 1]
    # "std": the margin is 2 x the std of red over all six rows, 0.665: no red lead (at most 0.5) decides
    sd = statistics.stdev(LAB_V[:, 0].tolist())
    lab = heron_label(LAB_V, LAB_G, [2.0, 0.0], "std")
    assert lab.margins == pytest.approx([2.0 * sd, 0.0], rel=1e-14)
    assert lab.pairs == [(1, 0), (0, 2), (1, 2)] and lab.levels == [1, 1, 1] and lab.ties == 3
    # values are read in float64: 0.3 vs 0.1 + 0.2 ties, as float32 copies (0.30000001 > 0.30000000) would not
    assert heron_label([[0.1], [0.3]], [0, 0], [0.2]).ties == 1


@pytest.mark.parametrize("values, groups, margins", [
    (torch.tensor([0.5, 0.25]), [0, 0], [0.0, 0.0]),  # not (N, K)
    (torch.zeros(2, 3), [0, 0], [0.0, 0.0]),  # K != number of margins
    (torch.zeros(3, 2), [0, 0], [0.0, 0.0]),  # N != number of group ids
])
def test_heron_label_refuses_bad_shapes(values, groups, margins):
    with pytest.raises(ValueError, match="heron_label"):
        heron_label(values, groups, margins)


def test_weighted_label_sums_skip_nan_terms_and_all_nan_loses():
    # sums with weights (2, 1): 1.25, 1.0 (NaN term skipped), NaN (all NaN), 0.75, -1.5
    v = torch.tensor([[0.5, 0.25], [NAN, 1.0], [NAN, NAN], [0.25, 0.25], [-0.5, -0.5]], dtype=F64)
    lab = weighted_label(v, [0] * 5, [2.0, 1.0], tol=0.5)
    # ties: (0,1) diff 0.25, (0,3) diff exactly 0.5, (1,3) diff 0.25; the NaN row loses to every other
    assert lab.pairs == [(0, 2), (0, 4), (1, 2), (1, 4), (3, 2), (4, 2), (3, 4)]
    assert lab.levels == [0] * 7 and lab.ties == 3 and lab.margins == [0.5]
    exact = weighted_label(v, [0] * 5, [2.0, 1.0])  # default tol 0: only equal sums tie
    assert exact.ties == 0 and exact.margins == [0.0] and (0, 1) in exact.pairs and (1, 3) in exact.pairs
    with pytest.raises(ValueError, match="weighted_label"):
        weighted_label(v, [0] * 5, [1.0])
    # values and weights are taken in float64: 0.3 vs 0.1 + 0.2 (both 0.30000000000000004) is a tie,
    # which float32 copies (0.1 -> 0.10000000149, 0.3 -> 0.30000001192) would decide
    assert weighted_label([[0.1], [0.3]], [0, 0], [1.0], tol=0.2).ties == 1
    assert weighted_label(torch.tensor([[3.0], [1.0]], dtype=F64), [0, 0], [0.1], tol=0.2).ties == 1


# ============================================================================ HERON: the oracle
def test_copeland_order_counts_a_tie_as_half_a_win():
    table = {(0, 1): None, (0, 2): 1, (0, 3): 0, (1, 2): None, (1, 3): 1, (2, 3): None}
    # wins: 0: 1/2 + 1 = 1.5; 1: 1/2 + 1/2 = 1; 2: 1 + 1/2 + 1/2 = 2; 3: 1 + 1/2 = 1.5 -> 2, then 0 and 3 by index, 1
    assert copeland_order(4, lambda i, j: table[(i, j)]) == [2, 0, 3, 1]
    assert copeland_order(3, lambda i, j: 1) == [2, 1, 0]
    assert copeland_order(0, lambda i, j: 0) == []


def _img(r, g, b=0.0):
    return torch.tensor([r, g, b], dtype=torch.float32).view(3, 1, 1)


def _red(x, prompts=None, **kw):
    return x[:, 0].mean((1, 2))


def _green(x, prompts=None, **kw):
    return x[:, 1].mean((1, 2))


def _prompt_len(x, prompts, **kw):  # a factor that reads the prompt of each image
    return torch.tensor([float(len(p)) for p in prompts])


def _red_unless_blue(x, prompts=None, **kw):  # a factor that does not apply (NaN) to blue images
    r = x[:, 0].mean((1, 2))
    return torch.where(x[:, 2].mean((1, 2)) > 0.5, torch.full_like(r, NAN), r)


def test_oracle_compare_values_and_last_level():
    o = HeronPreferenceOracle([_red, _green], [0.25, 0.0])
    assert o.compare_values([0.5, 0.0], [0.75, 0.25], [0.25, 0.0]) == 1 and o.last_level == 1
    assert o.compare_values([0.5, 0.0], [0.5, 0.0], [0.25, 0.0]) is None and o.last_level is None
    assert o.compare_values([1.0, 0.0], [0.5, 0.25], [0.25, 0.0]) == 0 and o.last_level == 0


def test_oracle_current_margins():
    a = HeronPreferenceOracle([_red, _green], [0.25, 0.5])
    assert a.current_margins() == [0.25, 0.5] and a.current_margins(LAB_V) == [0.25, 0.5]
    s = HeronPreferenceOracle([_red, _green], [1.0, 2.0], margin_scale="std")
    assert s.current_margins() == [0.0, 0.0]  # nothing scored yet
    lab_std = [statistics.stdev(LAB_V[:, 0].tolist()), 2.0 * statistics.stdev(LAB_V[:, 1].tolist())]
    assert s.current_margins(LAB_V) == pytest.approx(lab_std, rel=1e-14)
    # red 0.25 vs 0.75 (green equal): the std over the two rows seen is 0.5 / sqrt(2) < the lead of 0.5
    assert s.compare(_img(0.25, 0.5), _img(0.75, 0.5)) == 1 and s.last_level == 0
    assert s.current_margins() == pytest.approx([math.sqrt(0.125), 0.0], rel=1e-12)
    # two more rows: the spread is over all four rows seen so far
    # (green: 2 x std(0.5, 0.5, 0.25, 1.0) = 0.63 < the lead of 0.75)
    assert s.compare(_img(0.5, 0.25), _img(0.5, 1.0)) == 1 and s.last_level == 1
    assert s.current_margins() == pytest.approx([statistics.stdev([0.25, 0.75, 0.5, 0.5]), 2.0 * statistics.stdev([0.5, 0.5, 0.25, 1.0])],
                                                rel=1e-12)
    assert s.current_margins(LAB_V) == pytest.approx(lab_std, rel=1e-14)  # given values replace what was seen


def test_oracle_label_values_counts_decided_pairs():
    o = HeronPreferenceOracle([_red, _green], [0.25, 0.0])
    v = torch.tensor([[0.5, 0.5], [0.75, 0.5], [1.0, 0.0]], dtype=F64)
    d, cmp = o.label_values(v)
    assert d == [0.25, 0.0] and o.last_decided == 0
    assert cmp(0, 1) is None  # red lead 0.25 = margin, green equal
    assert cmp(1, 2) == 0  # red lead 0.25 = margin; green 0.5 > 0: the first (row 1) wins, at level 1
    assert cmp(0, 2) == 1 and o.last_decided == 2
    _, cmp = o.label_values(v)
    assert o.last_decided == 0  # reset per batch
    cmp(0, 2)
    assert o.last_decided == 1
    # the batch is read in float64: 0.3 vs 0.1 + 0.2 ties, as float32 copies would not
    _, cmp = HeronPreferenceOracle([_red], [0.2]).label_values([[0.1], [0.3]])
    assert cmp(0, 1) is None
    # std: the margins are the batch's spread, even before anything was scored
    s = HeronPreferenceOracle([_red, _green], [1.0, 2.0], margin_scale="std")
    d, _ = s.label_values(LAB_V)
    assert d == pytest.approx([statistics.stdev(LAB_V[:, 0].tolist()), 2.0 * statistics.stdev(LAB_V[:, 1].tolist())], rel=1e-14)


def test_oracle_rank_and_rank_groups():
    o = HeronPreferenceOracle([_red, _green], [0.25, 0.0])
    imgs = torch.stack([_img(0.5, 0.0), _img(1.0, 0.0), _img(0.5, 0.5)])
    # (0,1): red 1.0 leads by 0.5 -> 1; (0,2): green -> 2; (1,2): red -> 1: wins 0, 2, 1
    assert o.rank(imgs) == [1, 2, 0]
    assert o.last_scores.tolist() == [[0.5, 0.0], [1.0, 0.0], [0.5, 0.5]] and o.n_queries == 3
    assert HeronPreferenceOracle([_prompt_len], [0.0]).rank(imgs, ["a", "ccc", "bb"]) == [1, 2, 0]  # the prompts are passed on
    # candidates of two images each; factor 0 is NaN on blue images, averaged over the rest
    q = HeronPreferenceOracle([_red_unless_blue, _green], [0.0, 0.0])
    cands = torch.stack([
        torch.stack([_img(0.25, 0.0), _img(0.75, 0.0)]),  # red mean 0.5, green 0
        torch.stack([_img(0.5, 0.0, 1.0), _img(0.75, 0.5)]),  # red 0.75 (blue image skipped, not halved), green 0.25
        torch.stack([_img(1.0, 1.0, 1.0), _img(1.0, 1.0, 1.0)]),  # red NaN (all blue), green 1
    ])
    assert q.rank_groups(cands, ["p", "q"]) == [1, 0, 2]
    m = q.last_scores
    assert m[:, 1].tolist() == [0.0, 0.25, 1.0] and m[:2, 0].tolist() == [0.5, 0.75] and math.isnan(m[2, 0])
    # the i-th prompt goes with the i-th image of every candidate: lengths 1 and 3, mean 2 each
    p = HeronPreferenceOracle([_prompt_len], [0.0])
    assert p.rank_groups(cands, ["a", "ccc"]) == [0, 1, 2] and p.last_scores.tolist() == [[2.0], [2.0], [2.0]]


# ============================================================================ VPL: the ELBO's terms
def test_kl_standard_normal_by_hand_per_row():
    mu = torch.tensor([[[1.0, -0.5], [0.0, 2.0]]], dtype=F64)  # (1, 2, L = 2)
    logvar = torch.tensor([[[0.0, math.log(4.0)], [0.0, -1.0]]], dtype=F64)
    # 0.5 * sum_d (mu^2 + var - 1 - logvar)
    k0 = 0.5 * ((1.0 + 1.0 - 1.0 - 0.0) + (0.25 + 4.0 - 1.0 - math.log(4.0)))
    k1 = 0.5 * ((0.0 + 1.0 - 1.0 - 0.0) + (4.0 + math.exp(-1.0) - 1.0 + 1.0))
    got = kl_standard_normal(mu, logvar)
    assert got.shape == (1, 2) and got[0].tolist() == pytest.approx([k0, k1], rel=1e-14)
    assert kl_standard_normal(torch.zeros(3, 4), torch.zeros(3, 4)).tolist() == [0.0, 0.0, 0.0]


def test_anneal_ends_and_cycle():
    assert anneal(0, 8) == 0.1  # the baseline at a cycle's start
    assert anneal(8, 8) == pytest.approx(0.1, abs=1e-15) and anneal(12, 8) == pytest.approx(anneal(4, 8), abs=1e-15)
    assert anneal(4, 8) == pytest.approx(0.55, abs=1e-15)  # half way: (cos(-pi / 2) + 1) / 2 = 1/2
    assert anneal(2, 8) == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(0.5)) / 2, abs=1e-15)  # cos(-3 pi / 4)
    assert anneal(7, 8) == pytest.approx(0.1 + 0.9 * (math.cos(math.pi / 8) + 1) / 2, abs=1e-15)  # near 1 at the end
    assert anneal(0, 8, baseline=0.25) == 0.25 and anneal(4, 8, 0.25) == pytest.approx(0.625, abs=1e-15)
    assert anneal(3, 0) == 1.0 and anneal(3, -2) == 1.0  # no annealing
    assert anneal(0, 1) == 0.1 and anneal(5, 1) == 0.1  # a cycle of one step: always at its start


def test_elbo_loss_terms_and_the_likelihood_sign():
    rc, rr = torch.tensor([1.5, 0.0, 2.0], dtype=F64), torch.tensor([0.5, 1.0, 2.0], dtype=F64)
    mu = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=F64)
    lv = torch.tensor([[0.0, 0.0], [math.log(2.0), 0.0]], dtype=F64)
    t = elbo_loss(rc, rr, mu, lv, beta=0.25)
    nll = (_softplus(-1.0) + _softplus(1.0) + math.log(2.0)) / 3  # -log sigmoid(r_chosen - r_rejected)
    kl = (0.5 * 1.0 + 0.5 * (2.0 - 1.0 - math.log(2.0))) / 2  # mean over the two contexts
    assert float(t["nll"]) == pytest.approx(nll, rel=1e-12)
    assert float(t["kl"]) == pytest.approx(kl, rel=1e-12)
    assert float(t["loss"]) == pytest.approx(nll + 0.25 * kl, rel=1e-12)
    # the chosen scoring higher is likelier: below log 2; lower: above
    assert float(elbo_loss(torch.tensor([1.0]), torch.tensor([0.0]), None, None, 0.0)["nll"]) < math.log(2.0)
    plain = elbo_loss(rc, rr, None, None, beta=0.25)
    assert plain["kl"].shape == () and float(plain["kl"]) == 0.0 and float(plain["loss"]) == pytest.approx(nll, rel=1e-12)


def test_rescale_latent_to_norm_sqrt_l():
    z = torch.tensor([[[3.0, 4.0, 0.0, 0.0], [0.0, 0.0, -0.5, 0.0]]], dtype=F64)  # (1, 2, L = 4): norm sqrt(4) = 2 per row
    assert rescale_latent(z).shape == (1, 2, 4)
    assert rescale_latent(z).flatten().tolist() == pytest.approx([1.2, 1.6, 0.0, 0.0, 0.0, 0.0, -2.0, 0.0], rel=1e-15, abs=0)
    assert rescale_latent(torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.25]], dtype=F64)).tolist() == [[0.0] * 8 + [3.0]]
    # the 2-norm, not another p: (1, 1, 1, 1) has 2-norm 2 -> unchanged; a zero latent stays zero
    assert rescale_latent(torch.tensor([[1.0, 1.0, 1.0, -1.0], [0.0, 0.0, 0.0, 0.0]], dtype=F64)).tolist() == [[1.0, 1.0, 1.0, -1.0], [0.0] * 4]


# ============================================================================ VPL: the model's arithmetic
def test_vpl_fit_features_and_standardise():
    m = VPLModel(3, latent_dim=2, hidden=4)
    m.fit_features(torch.tensor([[1.0, 5.0, 2.0], [3.0, 5.0, 2.0], [5.0, 5.0, 8.0]], dtype=F64))
    assert m.feat_mean.tolist() == [3.0, 5.0, 4.0]
    assert m.feat_std.tolist() == pytest.approx([2.0, 1e-4, math.sqrt(12.0)], rel=1e-6)  # a constant column: the floor
    x = m.standardise(torch.tensor([[7.0, 5.0, 4.0], [1.0, 5.0, 4.0 + math.sqrt(12.0)]], dtype=F64))
    assert x.dtype == torch.float32 and x.flatten().tolist() == pytest.approx([2.0, 0.0, 0.0, -1.0, 0.0, 1.0], abs=1e-5)
    two = VPLModel(3, 0, 4)
    two.fit_features(torch.tensor([[0.0, 0.0, 1.0], [2.0, 4.0, 1.0]]))  # two rows: the spread is used
    assert two.feat_std.tolist() == pytest.approx([math.sqrt(2.0), math.sqrt(8.0), 1e-4], rel=1e-6)
    one = VPLModel(3, 0, 4)
    one.fit_features(torch.tensor([[1.0, 2.0, 3.0]]))  # one row: no spread to scale by
    assert one.feat_mean.tolist() == [1.0, 2.0, 3.0] and one.feat_std.tolist() == [1.0, 1.0, 1.0]


def test_vpl_reward_feeds_standardised_features_and_the_latent():
    torch.manual_seed(0)
    m = VPLModel(3, latent_dim=2, hidden=4)
    m.fit_features(torch.tensor([[1.0, 5.0, 2.0], [3.0, 6.0, 2.0], [5.0, 5.0, 8.0]]))
    f = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 4.0]])
    z = torch.tensor([0.5, -1.0], dtype=F64)  # one latent for the batch, float64 cast to the features' dtype
    want = m.decoder(torch.cat([(f - m.feat_mean) / m.feat_std, z.float().expand(2, 2)], 1))[:, 0]
    assert torch.allclose(m.reward(f, z), want, atol=0, rtol=0)
    zb = torch.tensor([[0.5, -1.0], [2.0, 0.0]])
    assert torch.equal(m.reward(f, zb), m.decoder(torch.cat([(f - m.feat_mean) / m.feat_std, zb], 1))[:, 0])
    assert torch.equal(m.reward(f, zb.double()), m.reward(f, zb))  # per-row latents cast too
    one = VPLModel(3, latent_dim=1, hidden=4)  # a one-dimensional latent is still a latent
    assert torch.equal(one.reward(f, torch.tensor([0.5])), one.decoder(torch.cat([f, torch.full((2, 1), 0.5)], 1))[:, 0])
    # batched latents (B1, B2, L) with features (B1, B2, D)
    f3, z3 = torch.stack([f, f.flip(0)]), torch.stack([zb, zb])
    assert m.reward(f3, z3).shape == (2, 2) and torch.allclose(m.reward(f3, z3)[0], m.reward(f, zb), rtol=0, atol=1e-6)
    with pytest.raises(RewardError, match="latent"):
        m.reward(f, None)
    bt = VPLModel(3, latent_dim=0, hidden=4)  # plain Bradley-Terry: features only
    assert torch.equal(bt.reward(f, None), bt.decoder(f)[:, 0])
    assert bt.reward(f[None], None).shape == (1, 2)


def test_vpl_sample_reparameterised_and_rescaled():
    m = VPLModel(3, latent_dim=3, hidden=4)
    mu = torch.tensor([[0.5, -0.5, 0.0], [1.0, 0.0, 0.0]], dtype=F64)
    lv = torch.tensor([[0.0, math.log(4.0), -1.0], [0.0, 0.0, 0.0]], dtype=F64)
    eps = torch.randn((2, 3), generator=torch.Generator().manual_seed(3), dtype=F64)
    z = mu + torch.tensor([[1.0, 2.0, math.exp(-0.5)], [1.0, 1.0, 1.0]], dtype=F64) * eps  # sigma = exp(logvar / 2)
    want = z / z.norm(dim=1, keepdim=True) * math.sqrt(3.0)
    got = m.sample(mu, lv, torch.Generator().manual_seed(3))
    assert got.dtype == F64 and torch.allclose(got, want, rtol=1e-12, atol=0)


def test_ranked_pairs_lower_rank_is_better_and_ties_give_none():
    assert _ranked_pairs([2, 1, 2, 3]) == [(0, 3), (1, 0), (1, 2), (1, 3), (2, 3)]


# ============================================================================ VPL: contexts
def _pairs():
    # user 0: pairs 0-4, user 1: pairs 5-6, user 2: pair 7
    return PairSet(torch.arange(8), torch.arange(8) + 8, torch.tensor([0, 0, 0, 0, 0, 1, 1, 2]), ["a", "b", "c"])


def test_sample_contexts_sizes_and_padding():
    p = _pairs()
    idx, mask = sample_contexts(p, torch.tensor([7, 5, 6]), 3, torch.Generator().manual_seed(0))
    assert idx.shape == (3, 3) and mask.dtype == torch.bool
    assert mask.tolist() == [[False] * 3, [True, False, False], [True, False, False]]  # no other pair; one other pair
    assert idx.tolist() == [[0, 0, 0], [6, 0, 0], [5, 0, 0]]  # the masked slots hold 0
    # user 0 has 4 others; k ~ U{2, 3} with context_max 3, about half each; never the target, no repeat
    t = torch.zeros(400, dtype=torch.long)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    idx, mask = sample_contexts(p, t, 3, torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), state)  # every draw from the generator given, none from the global RNG
    again = sample_contexts(p, t, 3, torch.Generator().manual_seed(1))
    assert torch.equal(again[0], idx) and torch.equal(again[1], mask)
    assert len(set(idx[:, 0].tolist())) == 4  # each target draws its own order of the 4 others
    k = mask.sum(1)
    assert set(k.tolist()) == {2, 3} and 0.4 < float((k == 3).float().mean()) < 0.6
    assert mask[:, 0].all() and mask[:, 1].all()  # valid slots first
    for row, mk in zip(idx.tolist(), mask.tolist()):
        got = [i for i, v in zip(row, mk) if v]
        assert set(got) <= {1, 2, 3, 4} and len(set(got)) == len(got)
        assert all(i == 0 for i, v in zip(row, mk) if not v)
    # context_min 1: k ~ U{1, 2, 3}; context_max above the number of pairs: padded to its width
    _, mask = sample_contexts(p, t, 3, torch.Generator().manual_seed(2), context_min=1)
    assert set(mask.sum(1).tolist()) == {1, 2, 3}
    idx, mask = sample_contexts(p, torch.tensor([0, 5]), 10, torch.Generator().manual_seed(3))
    assert idx.shape == (2, 10) and mask.sum(1).tolist()[1] == 1 and 2 <= int(mask[0].sum()) <= 4


def test_sample_contexts_top_draw_stays_in_range(monkeypatch):
    # the largest float32 rand() (1 - 2^-24) times 3 rounds below 3: the top draw gives k = lo + 2 = hi, not hi + 1
    p = _pairs()
    real = torch.rand

    def rand(*shape, generator=None):
        if len(shape) == 1:
            return torch.full(shape, 1.0 - 2 ** -24)
        return real(*shape, generator=generator)

    monkeypatch.setattr(torch, "rand", rand)
    # user 0 has 4 others; context_max 5: k ~ U{2, 3, 4} and the top draw must give 4, not 5
    _, mask = sample_contexts(p, torch.tensor([0, 1]), 5, torch.Generator().manual_seed(0))
    assert mask.sum(1).tolist() == [4, 4]


# ============================================================================ RAPL: optimal transport
def test_cosine_cost_batched_by_hand():
    x = torch.tensor([[[0.3, 0.4, 0.0], [0.0, 0.0, 0.0]]], dtype=F64)  # (1, T = 2, D = 3): norms 0.5 and 0
    y = torch.tensor([[[0.6, 0.8, 0.0], [0.0, -0.5, 0.0], [0.0, 0.0, 2.0]]], dtype=F64)  # (1, S = 3, 3)
    # cos(x0, y0) = 1, cos(x0, y1) = -0.8, cos(x0, y2) = 0; a zero vector has cosine 0 with everything
    assert torch.allclose(cosine_cost(x, y), torch.tensor([[[0.0, 1.8, 1.0], [1.0, 1.0, 1.0]]], dtype=F64), rtol=0, atol=1e-15)


def test_check_eps():
    assert _check_eps(0.5) == 0.5 and _check_eps(2) == 2.0 and type(_check_eps(2)) is float
    for bad in (0.0, -1.0, INF, NAN):
        with pytest.raises(RewardError, match="epsilon"):
            _check_eps(bad)


def test_sinkhorn_2x2_closed_form_and_cost():
    # uniform marginals force P = [[a, 1/2 - a], [1/2 - a, a]]; the entropic optimum has
    # P11 P22 / (P12 P21) = exp(-(C11 + C22 - C12 - C21) / eps): a = sigmoid(-delta / (2 eps)) / 2
    C = torch.tensor([[0.25, 1.0], [0.5, 0.0]], dtype=F64)
    eps = 0.5
    a = 0.5 * _sig(1.25 / (2 * eps))  # delta = 0.25 + 0 - 1 - 0.5 = -1.25
    P = sinkhorn_plan(C, eps, iters=200)
    assert P.dtype == F64 and torch.allclose(P, torch.tensor([[a, 0.5 - a], [0.5 - a, a]], dtype=F64), rtol=0, atol=1e-14)
    assert float((P * C).sum()) == pytest.approx(0.25 * a + (0.5 - a) * 1.5, abs=1e-14)


def test_sinkhorn_additive_cost_gives_the_uniform_plan_2x3():
    # C_ij = u_i + v_j is absorbed by the dual potentials: P = 1 / (T S), <P, C> = mean(u) + mean(v)
    u, v = torch.tensor([0.0, 1.0], dtype=F64), torch.tensor([0.5, 0.25, 2.0], dtype=F64)
    C = u[:, None] + v[None, :]
    for eps in (0.25, 1.0):
        P = sinkhorn_plan(C, eps, iters=100)
        assert torch.allclose(P, torch.full((2, 3), 1 / 6, dtype=F64), rtol=0, atol=1e-14)
        assert float((P * C).sum()) == pytest.approx(0.5 + 2.75 / 3, abs=1e-13)


def test_sinkhorn_iterations_marginals_and_batches():
    C = torch.tensor([[0.0, 2.0, 1.0], [1.5, 0.25, 0.5]], dtype=F64)
    # no iteration: the Gibbs kernel itself
    assert torch.allclose(sinkhorn_plan(C, 0.5, iters=0), torch.exp(-C / 0.5), rtol=1e-15, atol=0)
    # one iteration: the rows are fitted first, then the columns, so the columns are exact
    P1 = sinkhorn_plan(C, 0.5, iters=1)
    assert torch.allclose(P1.sum(0), torch.full((3,), 1 / 3, dtype=F64), rtol=0, atol=1e-15)
    assert not torch.allclose(P1.sum(1), torch.full((2,), 1 / 2, dtype=F64), rtol=0, atol=1e-6)
    # converged: both marginals, and the Gibbs form P_ij = exp(f_i + g_j - C_ij / eps)
    P = sinkhorn_plan(C, 0.5, iters=300)
    assert torch.allclose(P.sum(1), torch.full((2,), 1 / 2, dtype=F64), rtol=0, atol=1e-14)
    assert torch.allclose(P.sum(0), torch.full((3,), 1 / 3, dtype=F64), rtol=0, atol=1e-14)
    L = P.log() + C / 0.5
    assert torch.allclose(L - L[:, :1] - L[:1, :] + L[0, 0], torch.zeros_like(L), rtol=0, atol=1e-10)
    # batched (3 matrices of 2 x 3): each solved on its own
    B = torch.stack([C, C.flip(1) * 2.0, C.flip(0)])
    PB = sinkhorn_plan(B, 0.5, iters=300)
    assert PB.shape == (3, 2, 3) and torch.allclose(PB[0], P, rtol=0, atol=1e-15)
    for i in (1, 2):
        assert torch.allclose(PB[i], sinkhorn_plan(B[i], 0.5, 300), rtol=0, atol=1e-15)
    assert torch.allclose(sinkhorn_plan(B, 0.5, iters=0), torch.exp(-B / 0.5), rtol=1e-15, atol=0)
    # the defaults are epsilon 1 and 200 iterations (costs of range 40 are not converged by then)
    W = torch.tensor([[0.0, 40.0, 13.0], [29.0, 1.0, 7.0], [3.0, 17.0, 0.5]], dtype=F64)
    assert torch.equal(sinkhorn_plan(W), sinkhorn_plan(W, 1.0, 200))


def test_ot_frame_costs_and_distance_by_hand():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=F64)
    y = torch.tensor([[2.0, 0.0], [0.0, 0.5]], dtype=F64)  # the same directions: C = [[0, 1], [1, 0]]
    for eps in (0.5, 2.0):
        b = 0.5 * _sig(2.0 / (2 * eps))  # delta = -2: the diagonal mass
        fc = ot_frame_costs(x, y, eps)
        assert torch.allclose(fc, torch.full((2,), 0.5 - b, dtype=F64), rtol=0, atol=1e-14)
        assert ot_distance(x, y, eps).item() == pytest.approx(1.0 - 2 * b, abs=1e-14)
    # the iterations are passed on: none leaves the Gibbs kernel, P = exp(-C / eps), 2 e^-2 in all
    assert ot_frame_costs(x, y, 0.5, 0).tolist() == pytest.approx([math.exp(-2.0)] * 2, rel=1e-14)
    assert ot_distance(x, y, 0.5, iters=0).item() == pytest.approx(2 * math.exp(-2.0), rel=1e-14)
    # batched (2, T, D): each pair on its own
    xb, yb = torch.stack([x, x]), torch.stack([y, y.flip(0)])
    assert torch.allclose(ot_distance(xb, yb, 0.5), torch.stack([ot_distance(x, y, 0.5), ot_distance(x, y.flip(0), 0.5)]), rtol=0, atol=1e-15)
    # the defaults: epsilon 1 and 200 iterations
    g = torch.Generator().manual_seed(0)
    u, w = torch.randn(4, 3, generator=g, dtype=F64), torch.randn(5, 3, generator=g, dtype=F64)
    assert torch.equal(ot_frame_costs(u, w), ot_frame_costs(u, w, 1.0, 200))
    assert torch.equal(ot_distance(u, w), ot_distance(u, w, 1.0, 200))
    assert not torch.allclose(ot_distance(u, w), ot_distance(u, w, 2.0, 200))


def test_triplet_loss_sign_margin_and_bounds():
    dp, do = torch.tensor([0.25, 1.0, 0.5, 0.25], dtype=F64), torch.tensor([1.0, 0.25, 0.5, 0.5], dtype=F64)
    bt = triplet_loss(dp, do)  # default: Bradley-Terry, -log(e^-dp / (e^-dp + e^-do)) = softplus(dp - do)
    assert bt.tolist() == pytest.approx([_softplus(-0.75), _softplus(0.75), math.log(2.0), _softplus(-0.25)], rel=1e-14)
    assert bt[0] < math.log(2.0) < bt[1]  # the preferred video closer to the anchor: below chance
    assert torch.equal(triplet_loss(dp, do, "bt", 0.0), bt) and torch.equal(triplet_loss(dp, do, "bt", margin=0), bt)
    # hinge: relu(dp - do + margin); the last one sits exactly on the margin
    assert triplet_loss(dp, do, "hinge", 0.25).tolist() == [0.0, 1.0, 0.25, 0.0]
    assert triplet_loss(dp, do, "hinge", 0).tolist() == [0.0, 0.75, 0.0, 0.0]
    assert triplet_loss(dp, do, "hinge").tolist() == [0.0, 0.75, 0.0, 0.0]
    with pytest.raises(RewardError, match="applies to loss='hinge' only"):
        triplet_loss(dp, do, "bt", 0.5)
    for bad in (-0.25, INF, NAN):
        with pytest.raises(RewardError, match="margin must be"):
            triplet_loss(dp, do, "hinge", bad)
    with pytest.raises(RewardError, match="'softmax'"):
        triplet_loss(dp, do, "softmax")


# ============================================================================ RAPL: the reward
@pytest.fixture(scope="module")
def rapl_model():
    from rewards.rapl import RAPLModel

    # the encoder is only used to size the projection; the tests set the demonstrations' embeddings
    return RAPLModel({"kind": "shapes_trunk", "which": "judge", "pool": 1}, torch.zeros(1, 1, 3, 32, 32), dim=3, epsilon=0.5, iters=200)


def test_rapl_rewards_against_the_closest_demo(rapl_model):
    m = rapl_model
    emb = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    # S = 1 frame per demonstration: P_t1 = 1 / T, so r_t = -T * C_t1 / T = -(1 - cos)
    m._demo_emb = torch.tensor([[[0.0, 0.0, 1.0]], [[1.0, 0.0, 0.0]]])  # distances 1 and 1/2: demo 1 is closest
    assert m.rewards_from_embeddings(emb).tolist() == pytest.approx([0.0, -1.0], abs=1e-6)
    # S = 2: C = [[0, 1], [1, 0]] against demo 1 -> r_t = -2 (1/2 - b), b = sigmoid(1 / eps) / 2
    m._demo_emb = torch.tensor([[[-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]], [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    b = 0.5 * _sig(1.0 / 0.5)
    assert m.rewards_from_embeddings(emb).tolist() == pytest.approx([-2 * (0.5 - b)] * 2, abs=1e-6)
    # S = 3 frames, two demonstrations: the second (the episode's own directions) is closest
    demos = torch.tensor([[[0.0, -1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, -1.0]], [[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.0, 1.0, 0.0]]])
    m._demo_emb = demos
    want = -2 * ot_frame_costs(emb, demos[1], 0.5, 200)
    assert torch.allclose(m.rewards_from_embeddings(emb), want, rtol=0, atol=1e-6)
    m.iters = 0  # the model's own iteration count is used (none: the plan is the Gibbs kernel)
    try:
        assert torch.allclose(m.rewards_from_embeddings(emb), -2 * ot_frame_costs(emb, demos[1], 0.5, 0), rtol=0, atol=1e-6)
        assert not torch.allclose(m.rewards_from_embeddings(emb), want, rtol=0, atol=1e-4)
    finally:
        m.iters = 200
    m._demo_emb = None


def test_rapl_gym_wrapper_reward(rapl_model):
    gym = pytest.importorskip("gymnasium")
    from vfeedback.integrations.gym import RAPLReward

    class Tiny(gym.Env):
        metadata = {"render_modes": ["rgb_array"]}

        def __init__(self, terminate=True):
            self.render_mode, self.terminate, self.t = "rgb_array", terminate, 0
            self.observation_space = gym.spaces.Box(0.0, 10.0, (1,), np.float32)
            self.action_space = gym.spaces.Discrete(2)

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            self.t = 0
            return np.zeros(1, np.float32), {}

        def step(self, action):
            self.t, self.action = self.t + 1, action
            end = self.t >= 3
            return np.full(1, self.t, np.float32), 0.25, end and self.terminate, end and not self.terminate, {}

        def render(self):
            return np.full((2, 2, 3), self.t, np.uint8)  # the frame encodes the step

    m = rapl_model
    table = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    real_embed = m.embed
    m.embed = lambda frames: table[int(round(float(frames.reshape(-1)[0]) * 255))][None]
    m._demo_emb = torch.tensor([[[1.0, 0.0, 0.0]]])  # one demonstration of one frame: r_t = -(1 - cos(e_t, d))
    try:
        for mode, scale, terminate, want in (("replace", 0.5, True, [-0.5, -1.0, -0.5]), ("add", 2.0, False, [-1.75, -3.75, -1.75])):
            env = RAPLReward(Tiny(terminate), m, mode=mode, scale=scale)
            with pytest.raises(RewardError, match="before reset"):
                env.step(0)
            env.reset(seed=0)
            for t, (w, score) in enumerate(zip(want, [-1.0, -2.0, -1.0]), 1):
                _, r, term, trunc, info = env.step(1)
                assert env.unwrapped.action == 1
                assert r == pytest.approx(w, abs=1e-6) and info["rapl_reward"] == pytest.approx(score, abs=1e-6)
                assert info["env_reward"] == 0.25
                assert ("rapl_episode_rewards" in info) == (t == 3)
            ep = info["rapl_episode_rewards"]
            assert ep.dtype == np.float64 and ep.tolist() == pytest.approx([-1.0, -2.0, -1.0], abs=1e-6)
    finally:
        m.embed = real_embed
        m._demo_emb = None
