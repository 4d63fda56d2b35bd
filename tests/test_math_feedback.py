"""Exact values for the simulated judges (vfeedback/feedback/oracles.py), IterComp's ranking ->
pairs and tie levels (vfeedback/itercomp/ranking.py) and the integrations' reward formulas:
TRL's reward composition (vfeedback/integrations/trl.py) and gymnasium's VLM-RM reward,
wrapper reward, preference labeler and Bradley-Terry model (vfeedback/integrations/gym.py).
Hand-computed cases; see `make mutants`."""
import math

import numpy as np
import pytest
import torch

from rewards.analytic import Brightness
from rewards.base import Reward, RewardError
from vfeedback.feedback.oracles import (
    FunctionRankingOracle,
    ParetoPreferenceOracle,
    RewardPreferenceOracle,
    RewardRankingOracle,
    _check_top_k,
    _compare_scalar,
    order_scores,
)
from vfeedback.itercomp.ranking import Group, rank_by_scores, tie_levels

NAN = float("nan")


def _solid(v, n=1, h=2, w=2):
    return torch.full((n, 3, h, w), float(v))


# ------------------------------------------------------------------ oracles


def test_order_scores():
    s = [0.5, NAN, 2.0, 0.5, -1.0]
    assert order_scores(s) == [2, 0, 3, 4, 1]
    assert order_scores(s, higher_is_better=False) == [4, 0, 3, 2, 1]
    assert order_scores(s, top_k=2) == [2, 0]
    assert order_scores(s, top_k=1, higher_is_better=False) == [4]
    assert order_scores([NAN, NAN]) == [0, 1]


def test_check_top_k():
    assert _check_top_k(None) is None and _check_top_k(1) == 1 and _check_top_k(3) == 3
    for bad in (0, -1, True, 1.5, "2"):
        with pytest.raises(ValueError, match="top_k"):
            _check_top_k(bad)


def test_function_ranking_oracle_minimises_by_default():
    cands = torch.tensor([[1.0, 1.0], [0.0, -1.0], [3.0, 0.0]])
    o = FunctionRankingOracle(lambda x: float(x.sum()))
    assert o.rank(cands) == [1, 0, 2] and o.last_values == [2.0, -1.0, 3.0] and o.n_queries == 3
    assert FunctionRankingOracle(lambda x: float(x.sum()), minimize=False)(cands) == [2, 0, 1]
    b = FunctionRankingOracle(lambda x: x.sum(-1), batched=True, top_k=2)
    assert b.rank(cands) == [1, 0] and b.n_queries == 3
    assert b.rank(list(cands)) == [1, 0] and b.n_queries == 6
    assert o.rank(list(cands)) == [1, 0, 2]


def test_function_ranking_oracle_noise():
    vals = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]
    cands = torch.tensor(vals)[:, None]
    o = FunctionRankingOracle(lambda x: float(x), noise=0.5, seed=7)
    eps = torch.randn(6, generator=torch.Generator().manual_seed(7), dtype=torch.float64).tolist()
    want = order_scores([v + 0.5 * e for v, e in zip(vals, eps)], higher_is_better=False)
    assert want != [0, 1, 2, 3, 4, 5]
    assert o.rank(cands) == want
    assert o.last_values == pytest.approx(vals)  # noise-free values recorded
    assert FunctionRankingOracle(lambda x: float(x), noise=0.0)(cands) == [0, 1, 2, 3, 4, 5]


def test_reward_ranking_oracle():
    imgs = torch.cat([_solid(0.2), _solid(0.9), _solid(0.5)])
    o = RewardRankingOracle(Brightness())
    assert o.last_scores == [] and RewardPreferenceOracle(Brightness()).last_scores == []
    assert o.rank(imgs) == [1, 2, 0] and o.n_queries == 3
    assert o.last_scores == pytest.approx([0.2, 0.9, 0.5], abs=1e-6)
    assert RewardRankingOracle(Brightness(), top_k=1)(imgs) == [1]
    # a plain callable on a batch, and per-candidate prompts
    seen = {}

    def f(x, prompts):
        seen["p"] = prompts
        return -x.mean(dim=(1, 2, 3))

    assert RewardRankingOracle(f, prompts="p").rank(imgs) == [0, 2, 1] and seen["p"] == ["p"] * 3
    # context reaches the reward, through .score and when called directly; a list of images is stacked
    class Ctx(Reward):
        def forward(self, images, prompts=None, offset=0.0, **context):
            return images.mean(dim=(1, 2, 3)) * offset

    assert RewardRankingOracle(Ctx(), offset=-1.0).rank(imgs) == [0, 2, 1]
    g = lambda x, prompts, sign=1.0: sign * x.mean(dim=(1, 2, 3))
    assert RewardRankingOracle(g, sign=-1.0).rank(list(imgs)) == [0, 2, 1]
    assert RewardRankingOracle(g).rank(list(imgs)) == [1, 2, 0]
    with pytest.raises(ValueError, match="2 prompts for 3 candidates"):
        RewardRankingOracle(f, prompts=["a", "b"]).rank(imgs)


def test_compare_scalar():
    assert _compare_scalar(2.0, 1.0, 0.0) == 0
    assert _compare_scalar(1.0, 2.0, 0.0) == 1
    assert _compare_scalar(1.0, 1.0, 0.0) is None
    assert _compare_scalar(1.0, 1.5, 0.5) is None  # |diff| == tol is a tie
    assert _compare_scalar(1.0, 1.75, 0.5) == 1
    assert _compare_scalar(NAN, NAN, 0.0) is None
    assert _compare_scalar(NAN, -5.0, 0.0) == 1
    assert _compare_scalar(-5.0, NAN, 0.0) == 0


def test_reward_preference_oracle():
    o = RewardPreferenceOracle(Brightness(), tol=0.25)
    assert o.compare(_solid(0.75)[0], _solid(0.25)[0]) == 0
    assert o.last_scores == pytest.approx([0.75, 0.25], abs=1e-6) and o.n_queries == 2
    assert o(_solid(0.25)[0], _solid(0.75)[0]) == 1
    assert o.n_queries == 4
    assert o(_solid(0.5)[0], _solid(0.75)[0]) is None  # diff 0.25 == tol
    assert RewardPreferenceOracle(Brightness(), tol=0)(_solid(0.5)[0], _solid(0.5)[0]) is None
    with pytest.raises(ValueError, match="tol"):
        RewardPreferenceOracle(Brightness(), tol=-0.1)


def test_pareto_oracle():
    f = lambda x: x  # each candidate is its own objective vector
    t = lambda *v: torch.tensor(v, dtype=torch.float64)
    o = ParetoPreferenceOracle(f)
    assert o.compare(t(1.0, 2.0), t(1.0, 1.0)) == 0
    assert o.compare(t(1.0, 1.0), t(1.0, 2.0)) == 1
    assert o.compare(t(1.0, 2.0), t(2.0, 1.0)) is None
    assert o.compare(t(1.0, 1.0), t(1.0, 1.0)) is None
    assert o.n_queries == 8 and o.last_scores.shape == (2, 2)
    q = ParetoPreferenceOracle(f, tol=0.5)
    assert q.compare(t(1.0, 3.0), t(1.5, 1.0)) == 0  # worse by exactly tol on one, better by more on another
    assert q.compare(t(1.5, 1.0), t(1.0, 3.0)) == 1
    assert q.compare(t(1.0, 1.5), t(1.0, 1.0)) is None  # better by exactly tol: not better
    assert q.compare(t(1.0, 1.0), t(1.0, 1.5)) is None
    assert q.compare(t(1.0, 1.75), t(1.0, 1.0)) == 0
    # NaN counts as worse than any number; NaN on both sides is a tie on that objective
    assert o.compare(t(NAN, 1.0), t(0.0, 0.0)) is None
    assert o.compare(t(NAN, 1.0), t(NAN, 0.0)) == 0
    assert o.compare(t(0.0, 1.0), t(NAN, 1.0)) == 0
    # a list of rewards, one objective each
    r = ParetoPreferenceOracle([Brightness(), Brightness(target=0.5)])
    assert r.compare(_solid(0.5)[0], _solid(0.25)[0]) == 0
    assert r.compare(_solid(0.75)[0], _solid(0.5)[0]) is None  # brighter, further from 0.5
    with pytest.raises(ValueError, match="tol"):
        ParetoPreferenceOracle(f, tol=-1)
    with pytest.raises(ValueError, match="at least one objective"):
        ParetoPreferenceOracle([])


# ------------------------------------------------------------------ IterComp: ranking -> pairs


def test_group_pairs_from_ranking_and_ties():
    g = Group("p", "spatial", ["a", "b", "c"], ranking=[2, 0])
    assert g.pairs() == [(2, 0), (2, 1), (0, 1)]
    g = Group("p", "spatial", ["a", "b", "c"], ranking=[2, 0], ties=[1, 2, 1])
    assert g.pairs() == [(0, 1), (2, 1)]
    assert Group("p", "spatial", ["a", "b"]).pairs() == []
    assert Group("p", "spatial", ["a", "b", "c"], ties=[3, 1, 2]).pairs() == [(1, 0), (1, 2), (2, 0)]


def test_tie_levels():
    assert rank_by_scores([0.1, NAN, 0.9]) == [2, 0, 1]
    assert tie_levels([0.9, 0.5, 0.48, NAN, 0.1], 0.05) == [1, 2, 2, 4, 3]
    assert tie_levels([1.0, 0.75, 0.5], 0.25) == [1, 1, 1]  # within tol of the one above (chained)
    assert tie_levels([1.0, 0.75, 0.5], 0.125) == [1, 2, 3]
    assert tie_levels([NAN, 1.0, NAN], 0.1) == [2, 1, 2]
    assert tie_levels([NAN, NAN], 0.1) == [1, 1]
    assert tie_levels([0.5, 0.5], 0.0) == [1, 1]


# ------------------------------------------------------------------ TRL reward composition


class _Render:
    name = "fake"

    def __init__(self, items):
        self.items = items

    def __call__(self, requests, completions, columns):
        from vfeedback.integrations.trl import Rendered

        return [Rendered(**it) for it in self.items]


def test_trl_reward_function_weights_scores_and_fails_closed():
    from vfeedback.integrations.trl import reward_function

    items = [{"image": _solid(0.25)[0]}, {"image": _solid(0.75)[0]}, {"error": "render: boom"}, {}]
    fn = reward_function(Brightness(), _Render(items), weight=2.0, name="b")
    out = fn(["r"] * 4, ["c"] * 4)
    assert out[:2] == pytest.approx([0.5, 1.5], abs=1e-6) and out[2:] == [None, None]
    assert fn.scored == 2 and fn.failed == 2 and fn.calls == 1
    assert fn.failures["render"] == 2 and fn.last_errors[3] == "render: no image"
    assert fn.__name__ == "b"
    neg = reward_function(Brightness(), _Render(items[:2]), weight=-1.0)
    assert neg(["r", "r"], ["c", "c"]) == pytest.approx([-0.25, -0.75], abs=1e-6)


def test_trl_reward_function_nan_and_missing_prompt():
    from vfeedback.integrations.trl import reward_function
    from rewards.analytic import ColorMatch

    red = torch.tensor([0.9, 0.1, 0.1])[:, None, None].expand(3, 2, 2).clone()
    items = [{"image": red, "prompt": "a red box"}, {"image": red, "prompt": "a box"}, {"image": red}]
    fn = reward_function(ColorMatch(), _Render(items))
    out = fn(["r"] * 3, ["c"] * 3)
    assert out[0] == pytest.approx(1.0, abs=1e-6) and out[1:] == [None, None]
    assert fn.last_errors[1] == "score: not finite" and fn.last_errors[2] == "score: no text to score against"


def test_image_similarity_pixels():
    from vfeedback.integrations.trl import ImageSimilarity

    s = ImageSimilarity()
    x = torch.cat([_solid(0.25), _solid(1.0)])
    # reference (1, 3, 4, 4) of 0.75, resized to 2x2 and broadcast: 1 - |x - 0.75|
    got = s(x, reference=_solid(0.75, h=4, w=4))
    assert got.tolist() == pytest.approx([0.5, 0.75], abs=1e-6)
    with pytest.raises(RewardError, match="reference"):
        s(x)


# ------------------------------------------------------------------ gymnasium: VLM-RM, labeler, Bradley-Terry


gym_mod = pytest.importorskip("vfeedback.integrations.gym")


def test_projection_and_vlm_rm_reward():
    g, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert torch.equal(gym_mod.projection(g, None, 0.0), torch.eye(2))
    with pytest.raises(RewardError, match="baseline"):
        gym_mod.projection(g, None, 0.5)
    P = gym_mod.projection(g, b, 0.5)
    assert P.flatten().tolist() == pytest.approx([0.75, -0.25, -0.25, 0.75], abs=1e-6)
    x = torch.tensor([[3.0, 4.0]])  # normalised to (0.6, 0.8)
    assert gym_mod.vlm_rm_reward(x, g).tolist() == pytest.approx([1 - 0.5 * (0.16 + 0.64)], abs=1e-6)
    # alpha = 1: only the goal-baseline direction counts: P (x - g) = (-0.6, 0.6)
    assert gym_mod.vlm_rm_reward(x, g, b, alpha=1.0).tolist() == pytest.approx([1 - 0.5 * 0.72], abs=1e-6)
    # an embedding shorter than 1 is normalised too; the formula runs over the last dimension
    out = gym_mod.vlm_rm_reward(torch.tensor([[[0.3, 0.4]]]), g)
    assert out.shape == (1, 1) and out.flatten().tolist() == pytest.approx([1 - 0.5 * (0.16 + 0.64)], abs=1e-6)
    # a short goal-baseline difference: P = alpha d d^T / |d|^2 exactly (no clamp above 1e-12)
    P = gym_mod.projection(g, torch.tensor([0.9, 0.0]), 1.0)
    assert P.flatten().tolist() == pytest.approx([1.0, 0.0, 0.0, 0.0], abs=1e-6)
    P = gym_mod.projection(torch.tensor([0.5, 0.0]), torch.tensor([0.0, 0.25]), 0.5)
    d = torch.tensor([0.5, -0.25])
    want = 0.5 * torch.outer(d, d) / (d @ d) + 0.5 * torch.eye(2)
    assert torch.allclose(P, want, atol=1e-6)


class _FakeClip(Reward):
    """A CLIP-type scorer: the image embedding is the normalised (R, G) mean, text from a table."""

    name = "fakeclip"
    TEXT = {"up": [1.0, 0.0], "down": [0.0, 1.0], "mid": [0.6, 0.8]}

    def image_embeddings(self, images):
        e = images[:, :2].mean(dim=(2, 3))
        return e / e.norm(dim=-1, keepdim=True)

    def text_embeddings(self, prompts):
        return torch.tensor([self.TEXT[p] for p in prompts])

    def forward(self, images, prompts=None, **context):
        return self.image_embeddings(images)[:, 0]


def _rg(r, g):
    x = torch.zeros(1, 3, 2, 2)
    x[:, 0], x[:, 1] = r, g
    return x


def test_frame_scorer_is_the_vlm_rm_formula():
    fs = gym_mod.FrameScorer(_FakeClip(), goal="up", baseline="down", alpha=0.5)
    assert fs.vlm_rm
    x = torch.cat([_rg(3.0, 4.0), _rg(1.0, 0.0)])
    want = gym_mod.vlm_rm_reward(torch.tensor([[3.0, 4.0], [1.0, 0.0]]), torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), 0.5)
    assert fs(x).tolist() == pytest.approx(want.tolist(), abs=1e-6)
    assert fs(x)[1] == pytest.approx(1.0)
    # several goal prompts: their mean embedding
    fs2 = gym_mod.FrameScorer(_FakeClip(), goal=["up", "mid"])
    assert torch.allclose(fs2.g, torch.tensor([0.8, 0.4]))
    for a in (1.0, 0.0):
        gym_mod.FrameScorer(_FakeClip(), goal="up", baseline="down", alpha=a)
    for a in (1.01, -0.01):
        with pytest.raises(RewardError, match="alpha"):
            gym_mod.FrameScorer(_FakeClip(), goal="up", baseline="down", alpha=a)
    assert fs.batch_size == 64
    # two baselines: their mean embedding
    fs3 = gym_mod.FrameScorer(_FakeClip(), goal="up", baseline=["down", "mid"], alpha=0.5)
    assert torch.allclose(fs3.b, torch.tensor([0.3, 0.9]))
    # VLM-RM only for a CLIP-type reward with a goal, unless told
    off = gym_mod.FrameScorer(_FakeClip(), goal="up", vlm_rm=False)
    assert not off.vlm_rm and off(x).tolist() == pytest.approx([0.6, 1.0], abs=1e-6)
    assert not gym_mod.FrameScorer(Brightness(), goal="anything").vlm_rm

    class ImageOnly(Brightness):
        def image_embeddings(self, images):
            return images.mean(dim=(2, 3))

    assert not gym_mod.FrameScorer(ImageOnly(), goal="up").vlm_rm
    from rewards.analytic import ColorMatch

    red = gym_mod.FrameScorer(ColorMatch(), goal="a red box")
    assert red(_colour(RED)).tolist() == pytest.approx([1.0], abs=1e-6)
    with pytest.raises(RewardError, match="needs a goal"):
        gym_mod.FrameScorer(ColorMatch())
    with pytest.raises(RewardError, match="VLM-RM only"):
        gym_mod.FrameScorer(Brightness(), baseline="down")
    assert gym_mod.FrameScorer("brightness")(_solid(0.25)).tolist() == pytest.approx([0.25])
    plain = gym_mod.FrameScorer(Brightness())
    assert not plain.vlm_rm and plain(_solid(0.5)).tolist() == pytest.approx([0.5])


class _Env:
    pass


def _env(reward=1.0):
    gym = gym_mod.gym

    class E(gym.Env):
        metadata = {"render_modes": ["rgb_array"]}
        render_mode = "rgb_array"
        actions = []
        observation_space = gym.spaces.Box(0, 1, (1,))
        action_space = gym.spaces.Discrete(2)

        def reset(self, seed=None, options=None):
            return np.zeros(1, dtype=np.float32), {}

        def step(self, action):
            self.actions.append(action)
            return np.zeros(1, dtype=np.float32), reward, False, False, {}

        def render(self):
            return np.full((4, 4, 3), 51, dtype=np.uint8)  # 0.2 everywhere

    return E()


def test_wrapper_reward_replace_and_add():
    w = gym_mod.VLMRewardWrapper(_env(1.0), Brightness(), mode="replace", scale=2.0)
    w.reset()
    _, r, _, _, info = w.step(0)
    assert r == pytest.approx(0.4, abs=1e-6) and info["vlm_reward"] == pytest.approx(0.2, abs=1e-6) and info["env_reward"] == 1.0
    w = gym_mod.VLMRewardWrapper(_env(1.0), Brightness(), mode="add", scale=2.0)
    w.reset()
    assert w.step(1)[1] == pytest.approx(1.4, abs=1e-6)
    assert w.env.unwrapped.actions == [1]
    with pytest.raises(RewardError, match="mode"):
        gym_mod.VLMRewardWrapper(_env(), Brightness(), mode="sum")


def test_labeler_with_a_scorer_and_margin():
    a, b = _solid(0.75)[0], _solid(0.25)[0]
    lab = gym_mod.VLMPreferenceLabeler(Brightness())
    assert lab.label([(a, b), (b, a), (a, a)]) == [0, 1, -1]
    assert lab.queries == 3
    lab.label([(a, b)])
    assert lab.queries == 4
    assert gym_mod.VLMPreferenceLabeler(Brightness(), margin=0.5).label([(a, b)]) == [-1]  # diff == margin
    assert gym_mod.VLMPreferenceLabeler(Brightness(), margin=0.4).label([(a, b)]) == [0]
    # clips: the mean of their frames' scores (0.5 vs 0.45)
    clip_a = torch.cat([_solid(0.25), _solid(0.75)])
    clip_b = torch.cat([_solid(0.45), _solid(0.45), _solid(0.45)])
    assert lab.label([(clip_a, clip_b), (clip_b, clip_a)]) == [0, 1]


def test_labeler_with_a_judge_callable():
    calls = []

    def judge(a, b, goal):
        calls.append(goal)
        v = float(a.mean() - b.mean())
        if v == 0:
            raise RuntimeError("cannot judge")
        return 0 if v > 0 else (1 if v < -0.4 else None)

    a, b, c = _solid(0.9)[0], _solid(0.1)[0], _solid(0.8)[0]
    lab = gym_mod.VLMPreferenceLabeler(judge, goal=["stand", "other"])
    assert lab.label([(a, b), (b, a), (c, a), (a, a)]) == [0, 1, -1, -1]
    assert calls == ["stand"] * 4
    calls.clear()
    assert gym_mod.VLMPreferenceLabeler(judge).label([(a, b)]) == [0] and calls == [None]
    assert gym_mod.VLMPreferenceLabeler(judge, goal="up").label([(a, b)]) == [0] and calls == [None, "up"]


def test_bradley_terry_fit_orders_pairs_the_labelled_way():
    torch.manual_seed(0)
    e = torch.randn(40, 3)
    pairs = [(e[i], e[i + 1]) for i in range(0, 40, 2)]
    # label 1 ("b preferred") when b has the larger first feature
    labels = [1 if float(bb[0]) > float(aa[0]) else 0 for aa, bb in pairs]
    assert 0 < sum(labels) < len(labels)
    m = gym_mod.PreferenceRewardModel(dim=3, hidden=8, seed=0)
    assert m.accuracy(pairs, labels + [-1]) < 1.0
    losses = m.fit(pairs + [(e[0], e[1])], labels + [-1], epochs=100, lr=0.05, batch_size=32)
    assert losses[-1] < losses[0] - 0.3
    assert m.accuracy(pairs, labels) == 1.0
    first = m.fit(pairs, labels, epochs=1, lr=1e-3, batch_size=64)
    assert len(first) == 1
    scores = m(torch.stack([p[0] for p in pairs])), m(torch.stack([p[1] for p in pairs]))
    for i, l in enumerate(labels):
        assert (float(scores[1][i]) > float(scores[0][i])) == (l == 1)
    with pytest.raises(RewardError, match="no usable"):
        m.fit(pairs[:2], [-1, -1])


def test_bradley_terry_defaults_lazy_build_and_clips():
    torch.manual_seed(1)
    e = torch.randn(140, 2, 3)  # 70 pairs of two-frame clips: two batches of the default 64
    pairs = [(e[i], e[i + 1]) for i in range(0, 140, 2)]
    labels = [int(float(b[:, 0].sum()) > float(a[:, 0].sum())) for a, b in pairs]
    m1 = gym_mod.PreferenceRewardModel(dim=3, hidden=4, seed=2)
    m2 = gym_mod.PreferenceRewardModel(dim=3, hidden=4, seed=2)
    l1 = m1.fit(pairs, labels, epochs=3)
    l2 = m2.fit(pairs, labels, epochs=3, lr=1e-2, weight_decay=1e-4, batch_size=64, seed=0)
    assert l1 == l2
    m3 = gym_mod.PreferenceRewardModel(dim=3, hidden=4, seed=2)
    assert m3.fit(pairs, labels, epochs=3, seed=1) != l1
    assert len(m3.fit(pairs[:2], [0, 1])) == 100  # default epochs
    lazy = gym_mod.PreferenceRewardModel(hidden=4)
    out = lazy(torch.zeros(1, 2, 3))
    assert lazy.dim == 3 and out.shape == (1, 2)


def test_bradley_terry_one_step_moves_the_loss_down():
    m = gym_mod.PreferenceRewardModel(dim=2, hidden=4, seed=1)
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    pairs, labels = [(a, b), (b, a)], [1, 0]  # b-like preferred both times
    before = [m.fit(pairs, labels, epochs=1, lr=0.0, batch_size=2)[0]]
    after = m.fit(pairs, labels, epochs=2, lr=0.01, batch_size=2)
    assert after[1] < after[0] == pytest.approx(before[0], abs=1e-6)


# ------------------------------------------------------------------ prompts, defaults and arguments reach the scorer


def _colour(rgb, n=1):
    return torch.tensor(rgb, dtype=torch.float32)[None, :, None, None].expand(n, 3, 2, 2).clone()


RED, BLUE = (0.9, 0.1, 0.1), (0.1, 0.25, 0.9)


def test_oracles_pass_prompts_to_the_reward():
    from rewards.analytic import ColorMatch

    imgs = torch.cat([_colour(RED), _colour(BLUE)])
    assert RewardRankingOracle(ColorMatch(), prompts="a red kite").rank(imgs) == [0, 1]
    o = RewardRankingOracle(ColorMatch(), prompts="a red kite")
    assert o.rank(imgs, prompts="a blue kite") == [1, 0]  # a call's prompts override the oracle's
    assert o.scores(imgs, prompts=["a blue kite", "a red kite"])[0] < 0.01
    assert o.n_queries == 4 and len(o.last_scores) == 2
    p = RewardPreferenceOracle(ColorMatch(), prompts="a red kite")
    assert p.compare(imgs[0], imgs[1]) == 0 and p(imgs[0], imgs[1], prompts="a blue kite") == 1
    assert p.compare(imgs[0], imgs[1][:, :1, :1], prompts="a red kite") == 0  # two sizes: scored as a list
    q = ParetoPreferenceOracle([ColorMatch(), Brightness()], prompts="a blue kite")
    assert q.compare(imgs[1], imgs[0]) is None  # bluer, darker
    q2 = ParetoPreferenceOracle([ColorMatch()], prompts="a red kite")
    assert q2.compare(imgs[0], imgs[1]) == 0 and q2.compare(imgs[0], imgs[1], prompts="a blue kite") == 1
    assert q2.compare(imgs[0], imgs[1][:, :1, :1]) == 0
    one = ParetoPreferenceOracle(ColorMatch(color="blue"))  # a single reward object
    assert one.last_scores is None
    assert one.compare(imgs[1], imgs[0]) == 0 and one.last_scores.shape == (2, 1)
    assert one.last_scores.dtype == torch.float64 and q.last_scores.dtype == torch.float64
    f32 = ParetoPreferenceOracle(lambda x: x.float())
    f32.compare(torch.tensor([1.0]), torch.tensor([2.0]))
    assert f32.last_scores.dtype == torch.float64


def test_oracle_defaults():
    assert RewardRankingOracle(Brightness()).batch_size == 16 and RewardRankingOracle(Brightness()).top_k is None
    d = RewardPreferenceOracle(Brightness())
    assert d.tol == 0.0 and d.batch_size == 16 and d.prompts is None
    assert d(_solid(0.5)[0], _solid(0.45)[0]) == 0
    e = ParetoPreferenceOracle(lambda x: x)
    assert e.tol == 0.0 and e.batch_size == 16 and e.prompts is None
    assert ParetoPreferenceOracle(lambda x: x, tol=0).compare(torch.tensor([1.0]), torch.tensor([1.01])) == 1
    f = FunctionRankingOracle(lambda x: 0.0)
    assert f.minimize and f.top_k is None and not f.batched and f.noise == 0.0


def test_image_similarity_resize_arguments_and_backbone():
    from vfeedback.integrations.trl import ImageSimilarity

    ref = torch.zeros(1, 3, 6, 6)
    ref[..., :, :2] = 1.0
    ref[..., :3, :] += 0.5
    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    r = torch.nn.functional.interpolate(ref, size=(4, 4), mode="bilinear", antialias=True, align_corners=False)
    want = 1.0 - (x - r).abs().mean(dim=(1, 2, 3))
    assert torch.allclose(ImageSimilarity()(x, reference=ref), want, atol=1e-6)
    s = ImageSimilarity(backbone=_FakeClip())
    a = torch.cat([_rg(3.0, 4.0), _rg(1.0, 0.0)])
    assert s(a, reference=_rg(0.0, 2.0)).tolist() == pytest.approx([0.8, 0.0], abs=1e-6)
    assert s(a, reference=torch.cat([_rg(0.0, 2.0), _rg(1.0, 1.0)])).tolist() == pytest.approx([0.8, 0.5**0.5], abs=1e-6)
    assert s.differentiable is True
    with pytest.raises(RewardError, match="image_embeddings"):
        ImageSimilarity(backbone=Brightness())
    assert ImageSimilarity()(x, reference=ref.double()).dtype == torch.float32


def test_labeler_unscorable_pairs_have_no_preference():
    from rewards.analytic import ColorMatch

    lab = gym_mod.VLMPreferenceLabeler(ColorMatch(), goal="a box")  # no colour named: NaN scores
    assert lab.label([(_solid(0.2)[0], _solid(0.8)[0])]) == [-1]
    red = gym_mod.VLMPreferenceLabeler(ColorMatch(), goal="a red box")
    assert red.label([(_colour(BLUE)[0], _colour(RED)[0]), (_colour(RED)[0], _colour(BLUE)[0])]) == [1, 0]
    # uint8 HxWx3 frames
    f_red = np.zeros((2, 2, 3), dtype=np.uint8)
    f_red[..., 0] = 230
    f_red[..., 1:] = 25
    f_dark = np.zeros((2, 2, 3), dtype=np.uint8)
    assert red.label([(f_dark, f_red)]) == [1]


def test_bradley_terry_epoch_loss_is_the_bce_of_reward_differences():
    m = gym_mod.PreferenceRewardModel(dim=2, hidden=3, seed=4)
    a = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0], [1.0, 1.0]]), torch.tensor([[0.5, -1.0]])]
    b = [torch.tensor([[0.0, 2.0], [1.0, 0.0]]), torch.tensor([[2.0, 0.0]]), torch.tensor([[-1.0, 0.5]])]
    labels = [1, 0, 1]
    with torch.no_grad():
        ra = torch.stack([m.head(x).sum() for x in a])  # a clip's reward: the sum over its frames
        rb = torch.stack([m.head(x).sum() for x in b])
    want = float(torch.nn.functional.binary_cross_entropy_with_logits(rb - ra, torch.tensor([1.0, 0.0, 1.0])))
    got = m.fit(list(zip(a, b)), labels, epochs=1, lr=0.0, weight_decay=0.0, batch_size=2)
    assert got[0] == pytest.approx(want, abs=1e-6)  # clips of several lengths: one by one
    assert m.accuracy(list(zip(a, b)), labels) == pytest.approx(float(((rb > ra) == torch.tensor([True, False, True])).float().mean()))
    fresh = gym_mod.PreferenceRewardModel(hidden=3, seed=4)
    fresh.fit(list(zip(a, b)), labels, epochs=1, lr=0.0)
    assert fresh.dim == 2


def test_trl_reward_function_plumbing():
    from vfeedback.integrations.trl import Rendered, reward_function

    seen = {}

    def render(requests, completions, columns):
        seen["requests"], seen["columns"] = requests, dict(columns)
        return [Rendered(image=_solid(0.5)[0]), Rendered(error="render: x")]

    metrics = []
    fn = reward_function(Brightness(), render, name="b")
    out = fn(["p1", "p2"], ["c1", "c2"], log_metric=lambda k, v: metrics.append((k, v)), completion_ids=[1, 2],
             trainer_state=object(), log_extra=None, environments=None, target=["t1", "t2"])
    assert out == [pytest.approx(0.5), None]
    assert seen["requests"] == ["p1", "p2"] and seen["columns"] == {"target": ["t1", "t2"]}
    assert metrics == [("b/failed_frac", 0.5)]
    fn(None, ["c1", "c2"])
    assert seen["requests"] == ["", ""] and fn.calls == 2


class _Recorder(Reward):
    """Brightness (mean pixel) that records each call's batch size, prompts and context keys, and
    raises on images of side ``fail_side`` or a batch holding an image darker than ``fail_below``."""

    name = "recorder"
    needs_prompt = False

    def __init__(self, fail_side=None, fail_below=None):
        super().__init__()
        self.calls, self.fail_side, self.fail_below = [], fail_side, fail_below

    def forward(self, images, prompts=None, **context):
        self.calls.append((images.shape[0], list(prompts), sorted(context)))
        if images.shape[-1] == self.fail_side:
            raise ValueError("bad size")
        if self.fail_below is not None and float(images.mean(dim=(1, 2, 3)).min()) < self.fail_below:
            raise ValueError("too dark")
        return images.mean(dim=(1, 2, 3))


def test_trl_reward_function_renderer_faults_and_what_it_is_given():
    from vfeedback.integrations.trl import Rendered, reward_function

    seen = {}

    def render(requests, completions, columns):
        seen["completions"] = completions
        return [Rendered(image=_solid(0.5)[0]) for _ in completions]

    fn = reward_function(Brightness(), render, name="b")
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "c2"}]
    assert fn(["p", "p"], ["c1", chat]) == [pytest.approx(0.5), pytest.approx(0.5)]
    assert seen["completions"] == ["c1", "c2"]  # the completions' text, conversations reduced to the assistant's

    def boom(requests, completions, columns):
        raise ValueError("boom: at line 3")

    fn = reward_function(Brightness(), boom, name="b")
    assert fn(["p"] * 3, ["c"] * 3) == [None, None, None]  # a renderer bug fails the batch closed, not the run
    assert fn.last_errors == ["render: ValueError: boom: at line 3"] * 3
    assert fn.failures == {"render": 3} and fn.failed == 3 and fn.scored == 0
    short = reward_function(Brightness(), lambda r, c, k: [Rendered(image=_solid(0.5)[0])], name="b")
    assert short(["p", "p"], ["c", "c"]) == [None, None]
    assert short.last_errors == ["render: RuntimeError: renderer returned 1 items for 2 completions"] * 2
    long_reason = reward_function(Brightness(), _Render([{"error": "x" * 50}]), name="b")
    long_reason(["p"], ["c"])
    assert long_reason.failures == {"x" * 40: 1}  # the reason's kind: up to the first colon, at most 40 characters


def test_trl_reward_function_metrics_and_isolation_levels():
    from vfeedback.integrations.trl import reward_function

    items = [{"image": _solid(0.5)[0], "isolation": "bwrap+seccomp"}, {"error": "render: refused", "isolation": "none"},
             {"image": _solid(0.25)[0], "isolation": "bwrap+seccomp"}, {"image": _solid(0.75)[0]}]
    metrics = []
    fn = reward_function(Brightness(), _Render(items), name="b")
    assert fn(["p"] * 4, ["c"] * 4, log_metric=lambda k, v: metrics.append((k, v))) == pytest.approx([0.5, None, 0.25, 0.75])
    assert metrics == [("b/failed_frac", 0.25), ("b/isolation/bwrap+seccomp", 0.5), ("b/isolation/none", 0.25)]
    assert fn.isolation == {"bwrap+seccomp": 2, "none": 1}
    fn(["p"] * 4, ["c"] * 4)  # no log_metric: counters only
    assert fn.isolation == {"bwrap+seccomp": 4, "none": 2} and len(metrics) == 3
    empty = reward_function(Brightness(), _Render([]), name="b")
    assert empty([], [], log_metric=lambda k, v: metrics.append((k, v))) == [] and len(metrics) == 3  # nothing to log


def test_trl_reward_function_scoring_groups_batches_prompts_and_faults():
    from vfeedback.integrations.trl import reward_function

    rec = _Recorder()
    # an error, a missing image, then three scorable 2x2 images and one 4x4: errors skip only themselves
    items = [{"error": "render: x"}, {}, {"image": _solid(0.2)[0]}, {"image": _solid(0.4)[0], "prompt": "p"},
             {"image": _solid(0.6, h=4, w=4)[0]}, {"image": _solid(0.8)[0]}]
    fn = reward_function(rec, _Render(items), name="r", batch_size=2)
    assert fn(["q"] * 6, ["c"] * 6) == pytest.approx([None, None, 0.2, 0.4, 0.6, 0.8])
    # one group per image shape, in order of first appearance, cut into batches of 2
    assert rec.calls == [(2, ["", "p"], []), (1, [""], []), (1, [""], [])]
    # a prompt-scoring reward: an item without text fails alone, the next one is scored
    from rewards.analytic import ColorMatch

    red = torch.tensor([0.9, 0.1, 0.1])[:, None, None].expand(3, 2, 2).clone()
    fn = reward_function(ColorMatch(), _Render([{"image": red}, {"image": red, "prompt": "a red box"}]))
    assert fn(["r"] * 2, ["c"] * 2) == [None, pytest.approx(1.0, abs=1e-6)]
    # a scoring fault fails its batch only, with the exception named; the next group is scored
    rec = _Recorder(fail_side=2)
    fn = reward_function(rec, _Render([{"image": _solid(0.3)[0]}, {"image": _solid(0.5, h=4, w=4)[0]}]), name="r")
    assert fn(["q"] * 2, ["c"] * 2) == [None, pytest.approx(0.5)]
    assert fn.last_errors == ["score: ValueError: bad size", None] and fn.failures == {"score": 1}
    # ... and the next batch of the same group too
    fn = reward_function(_Recorder(fail_below=0.1), _Render([{"image": _solid(0.05)[0]}, {"image": _solid(0.5)[0]}]), batch_size=1)
    assert fn(["q"] * 2, ["c"] * 2) == [None, pytest.approx(0.5)] and fn.last_errors == ["score: ValueError: too dark", None]


def test_trl_reward_function_references_are_grouped_by_shape_and_passed():
    from vfeedback.integrations.trl import ImageSimilarity, reward_function

    # same image shape, references of two shapes: two batches, each with its own references
    items = [{"image": _solid(0.25)[0], "reference": _solid(0.75)[0]},
             {"image": _solid(0.5)[0], "reference": _solid(1.0, h=4, w=4)[0]},
             {"image": _solid(1.0)[0], "reference": _solid(0.5)[0]}]
    fn = reward_function(ImageSimilarity(), _Render(items), name="s")
    assert fn(["q"] * 3, ["c"] * 3) == pytest.approx([0.5, 0.5, 0.5], abs=1e-6)  # 1 - |x - ref|
    rec = _Recorder()
    reward_function(rec, _Render(items), name="r")(["q"] * 3, ["c"] * 3)
    assert rec.calls == [(2, ["", ""], ["reference"]), (1, [""], ["reference"])]


def test_image_similarity_same_size_reference_is_not_resampled():
    from vfeedback.integrations.trl import ImageSimilarity

    x = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    ref = torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    want = 1.0 - (x - ref).abs().mean(dim=(1, 2, 3))
    assert torch.equal(ImageSimilarity()(x, reference=ref), want)
    # a reference of another height only, or another width only, is resized to the image
    for h, w in ((6, 4), (4, 6)):
        r = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(4))
        rr = torch.nn.functional.interpolate(r, size=(4, 4), mode="bilinear", antialias=True, align_corners=False)
        assert torch.allclose(ImageSimilarity()(x, reference=r), 1.0 - (x - rr).abs().mean(dim=(1, 2, 3)), atol=1e-6)


def test_bradley_terry_initial_weights_and_forward_by_hand():
    m = gym_mod.PreferenceRewardModel(dim=3)  # defaults: hidden 64, seed 0
    assert m.hidden == 64 and m.head[0].out_features == 64 and m.dim == 3 and gym_mod.PreferenceRewardModel().dim is None
    small = gym_mod.PreferenceRewardModel(dim=3, hidden=2)
    g = torch.Generator().manual_seed(0)
    # each parameter ~ N(0, 1) / sqrt(fan): its last axis (W1 (2,3): 3, b1 (2,): 2, W2 (1,2): 2, b2 (1,): 1)
    want = [torch.randn(shape, generator=g) / fan**0.5 for shape, fan in [((2, 3), 3), ((2,), 2), ((1, 2), 2), ((1,), 1)]]
    got = [p.detach() for p in small.head.parameters()]
    assert all(torch.allclose(a, b, rtol=1e-6, atol=0) for a, b in zip(got, want)) and len(got) == 4  # x / s vs x * (1 / s): rounding
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]])
    w1, b1, w2, b2 = want
    r = (torch.tanh(x @ w1.T + b1) @ w2.T + b2).squeeze(-1)  # r(s) = W2 tanh(W1 e + b1) + b2
    assert torch.allclose(small(x), r, atol=1e-6)


def test_bradley_terry_embeds_images_with_a_clip_type_reward():
    m = gym_mod.PreferenceRewardModel(embed=_FakeClip(), dim=2, hidden=3)
    imgs = torch.cat([_rg(3.0, 4.0), _rg(1.0, 0.0)])
    assert torch.allclose(m.features(imgs), torch.tensor([[0.6, 0.8], [1.0, 0.0]]), atol=1e-6)  # unit (R, G) means
    assert torch.allclose(m(imgs), m.head(torch.tensor([[0.6, 0.8], [1.0, 0.0]])).squeeze(-1), atol=1e-6)
    calls = []
    f = gym_mod.PreferenceRewardModel(embed=lambda x: calls.append(x.shape) or x[:, :2].mean(dim=(2, 3)), dim=2)
    assert torch.allclose(f.features(_rg(0.5, 0.25)[0]), torch.tensor([[0.5, 0.25]])) and calls == [(1, 3, 2, 2)]  # a frame -> a batch of 1


def test_bradley_terry_fit_is_one_adam_step_on_the_bce_and_freezes_after():
    import copy

    m = gym_mod.PreferenceRewardModel(dim=2, hidden=3, seed=5)
    ref = copy.deepcopy(m.head).requires_grad_(True)
    a = [torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5]), torch.tensor([-1.0, 2.0])]
    b = [torch.tensor([0.0, 1.0]), torch.tensor([2.0, -1.0]), torch.tensor([0.0, 0.0])]
    labels = [1, 0, 1]
    # one epoch, one batch holding every pair: one Adam step on mean BCE(R(b) - R(a), label)
    opt = torch.optim.Adam(ref.parameters(), lr=0.1, weight_decay=0.5)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(ref(torch.stack(b)).squeeze(-1) - ref(torch.stack(a)).squeeze(-1),
                                                               torch.tensor([1.0, 0.0, 1.0]))
    opt.zero_grad()
    loss.backward()
    opt.step()
    got = m.fit(list(zip(a, b)), labels, epochs=1, lr=0.1, weight_decay=0.5, batch_size=8)
    assert got == [pytest.approx(loss.item(), abs=1e-6)]
    assert all(torch.allclose(p, q, atol=1e-6) for p, q in zip(m.head.parameters(), ref.parameters()))
    assert not any(p.requires_grad for p in m.head.parameters()) and not m.head.training  # frozen for scoring


def test_bradley_terry_batched_forward_and_embedding_sizes():
    m = gym_mod.PreferenceRewardModel(dim=2, hidden=3, seed=1)
    calls = []
    m.head.register_forward_hook(lambda mod, inp, out: calls.append(tuple(inp[0].shape)))
    clips = [torch.randn(2, 2, generator=torch.Generator().manual_seed(i)) for i in range(10)]  # 5 pairs of 2-frame clips
    pairs = [(clips[i], clips[i + 1]) for i in range(0, 10, 2)]
    m.fit(pairs, [1, 0, 1, 1, 0], epochs=1, lr=0.0, batch_size=3)
    assert calls == [(3, 2, 2), (3, 2, 2), (2, 2, 2), (2, 2, 2)]  # clips of one length: one forward per side and batch
    with pytest.raises(RewardError, match=r"embeddings of size \[2, 3\], expected one size$"):
        gym_mod.PreferenceRewardModel(hidden=3).fit([(torch.zeros(2), torch.zeros(3))], [1])
    with pytest.raises(RewardError, match=r"embeddings of size \[3\], expected one size \(2, the model's\)$"):
        m.fit([(torch.zeros(3), torch.zeros(3))], [1])


def test_function_oracle_batched_call_noise_draws_and_fresh_state():
    calls = []

    def f(x):  # only works on the stacked candidates
        calls.append(tuple(x.shape))
        return x[:, 0] - x[:, 1]

    o = FunctionRankingOracle(f, batched=True)
    assert o.last_values == [] and o.batched is True
    cands = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 3.0]), torch.tensor([2.0, 2.0])]
    assert o(cands) == [1, 2, 0] and calls == [(3, 2)] and o.last_values == [1.0, -3.0, 0.0]
    assert o(torch.stack(cands)) == [1, 2, 0] and calls[-1] == (3, 2)
    # noise: each value plus noise * a float64 standard normal from the oracle's generator (default seed 0)
    vals = [0.0, 0.1, 0.2, 0.3]
    noisy = FunctionRankingOracle(lambda c: float(c), noise=0.5)
    eps = torch.randn(4, generator=torch.Generator().manual_seed(0), dtype=torch.float64).tolist()
    want = order_scores([v + 0.5 * e for v, e in zip(vals, eps)], higher_is_better=False)
    assert noisy(torch.tensor(vals)) == want and want != [0, 1, 2, 3]  # the draw reorders this case
    other = FunctionRankingOracle(lambda c: float(c), noise=0.5, seed=1)
    eps1 = torch.randn(4, generator=torch.Generator().manual_seed(1), dtype=torch.float64).tolist()
    assert other(torch.tensor(vals)) == order_scores([v + 0.5 * e for v, e in zip(vals, eps1)], higher_is_better=False)


def test_frame_scorer_vlm_rm_forced_on_and_goal_rules():
    with pytest.raises(RewardError, match="VLM-RM needs a goal prompt"):
        gym_mod.FrameScorer(_FakeClip(), vlm_rm=True)
    with pytest.raises(RewardError, match="does not expose CLIP"):
        gym_mod.FrameScorer(Brightness(), goal="bright", vlm_rm=True)
    from rewards.analytic import ColorMatch

    with pytest.raises(RewardError, match="needs a goal prompt"):
        gym_mod.FrameScorer(ColorMatch())  # a prompt-scoring reward without a goal
    fs = gym_mod.FrameScorer(Brightness())  # an image-only reward needs none
    assert fs(_solid(0.25, n=2)).tolist() == pytest.approx([0.25, 0.25])


def test_function_oracle_noise_is_drawn_in_float64():
    # two values that tie after float64 noise up to 1e-8: float32 draws (rounded) would rank them the other way
    e64 = torch.randn(2, generator=torch.Generator().manual_seed(0), dtype=torch.float64).tolist()
    e32 = torch.randn(2, generator=torch.Generator().manual_seed(0)).double().tolist()
    shift = (e32[1] - e64[1]) - (e32[0] - e64[0])  # how far float32 moves the second value against the first
    assert abs(shift) > 1e-9  # the two draws differ in this torch
    x = e64[0] - e64[1] - 0.5 * shift  # float64: x + e1 - e0 = -shift / 2; float32: +shift / 2
    o = FunctionRankingOracle(lambda c: float(c), noise=1.0)
    got = o(torch.tensor([0.0, x], dtype=torch.float64))
    assert got == ([1, 0] if shift > 0 else [0, 1])
