"""ZO-RankSGD: the estimator, the DAG, the two-mode loop, resume, and the simulated oracles."""
import json
import math

import pytest
import torch

from rewards import Reward
from vfeedback.algorithms.zo_ranksgd import (
    ZORankSGD,
    ZORankSGDConfig,
    dag_edges,
    num_edges,
    rank_direction,
    rank_weights,
    validate_ranking,
)
from vfeedback.feedback.oracles import (
    FunctionRankingOracle,
    ParetoPreferenceOracle,
    RewardPreferenceOracle,
    RewardRankingOracle,
    order_scores,
)


def sq(x):
    return float((x.double() ** 2).sum())


# ------------------------------------------------------------------------------- the DAG


@pytest.mark.parametrize("m,k", [(2, 1), (5, 5), (6, 1), (8, 3), (8, 7), (10, 10)])
def test_dag_edge_counts(m, k):
    ranking = list(range(m))[::-1][:k]
    edges = dag_edges(ranking, m)
    assert len(edges) == num_edges(m, k) == k * (k - 1) // 2 + k * (m - k)
    assert len(set(edges)) == len(edges)
    if k == m:
        assert len(edges) == m * (m - 1) // 2
    # every ranked item beats every unranked one
    unranked = set(range(m)) - set(ranking)
    assert all((i, j) in edges for i in ranking for j in unranked)


@pytest.mark.parametrize("m,ranking", [(6, [3, 0, 5, 1, 2, 4]), (8, [7, 2, 4]), (5, [1])])
def test_paper_weights_are_the_edge_average(m, ranking):
    edges = dag_edges(ranking, m)
    expect = torch.zeros(m, dtype=torch.float64)
    for i, j in edges:  # D = 1/|E| sum (u_i - u_j) for i better than j
        expect[i] += 1
        expect[j] -= 1
    expect /= len(edges)
    assert torch.allclose(rank_weights(ranking, m, "paper"), expect)
    assert abs(float(rank_weights(ranking, m, "paper").sum())) < 1e-12
    # reference: one more on each ranked item
    ref = rank_weights(ranking, m, "reference") * len(edges)
    for p, i in enumerate(ranking):
        assert ref[i] == m - 2 * p
    assert all(ref[j] == -len(ranking) for j in set(range(m)) - set(ranking))


def test_ranking_validation():
    assert validate_ranking([2, 0], 3) == [2, 0]
    with pytest.raises(ValueError, match="outside"):
        validate_ranking([3], 3)
    with pytest.raises(ValueError, match="twice"):
        validate_ranking([1, 1], 3)
    with pytest.raises(ValueError):
        ZORankSGDConfig(num_candidates=2, line_search=True)
    with pytest.raises(ValueError, match="estimator"):
        ZORankSGDConfig(estimator="nope")


# ------------------------------------------------------------------------------- the estimator


@pytest.mark.parametrize("estimator", ["paper", "reference"])
@pytest.mark.parametrize("k", [6, 2, 1])
def test_estimator_expectation_aligns_with_gradient(estimator, k):
    torch.manual_seed(0)
    d, m, draws, mu = 30, 6, 1500, 0.05
    a = torch.linspace(0.5, 3.0, d, dtype=torch.float64)  # f = 1/2 sum a_i x_i^2
    x = torch.randn(d, dtype=torch.float64)
    grad = a * x
    u = torch.randn(draws, m, d, dtype=torch.float64)
    vals = 0.5 * (a * (x + mu * u) ** 2).sum(-1)
    total = torch.zeros(d, dtype=torch.float64)
    cos_each = []
    for t in range(draws):
        ranking = order_scores(vals[t].tolist(), higher_is_better=False, top_k=k)  # loss: lowest first
        D = rank_direction(u[t], ranking, estimator, mu)  # preference-ascent = descent on f
        total += D
        cos_each.append(float(torch.nn.functional.cosine_similarity(-D, grad, dim=0)))
    cos_mean = float(torch.nn.functional.cosine_similarity(-total, grad, dim=0))
    assert sum(cos_each) / draws > 0.05  # each draw is a positive-on-average guess
    assert cos_mean > 0.9  # the expectation points along the gradient


# ------------------------------------------------------------------------------- descent


@pytest.mark.parametrize("line_search", [False, True])
@pytest.mark.parametrize("estimator", ["paper", "reference"])
def test_loss_decreases_on_quadratic(line_search, estimator):
    x0 = torch.full((10,), 2.0)
    oracle = FunctionRankingOracle(sq, minimize=True, top_k=4)
    eta = 0.1 if estimator == "paper" else 1.0
    opt = ZORankSGD(x0, num_candidates=6, smoothing=0.1, step_size=eta, estimator=estimator, line_search=line_search, seed=3)
    opt.run(oracle, 200)
    assert sq(opt.x) < 0.05 * sq(x0)
    assert opt.n_queries == oracle.n_queries == 200 * 6


def test_maximisation_with_reward_style_oracle():
    # An oracle that prefers higher values moves x up a concave bump.
    oracle = FunctionRankingOracle(lambda x: -sq(x - 3.0), minimize=False)
    opt = ZORankSGD(torch.zeros(5), num_candidates=5, smoothing=0.1, step_size=0.5, line_search=True, seed=0)
    opt.run(oracle, 150)
    assert sq(opt.x - 3.0) < 0.05 * sq(torch.zeros(5) - 3.0)


# ------------------------------------------------------------------------------- shuffling


def test_gradient_round_unshuffles_answer():
    opt = ZORankSGD(torch.zeros(4), num_candidates=5, smoothing=0.5, line_search=True, seed=7)
    shown = opt.ask()
    assert opt._pending["perm"] != list(range(5))  # this seed really shuffles
    answer = [3, 1]
    opt.tell(answer)
    assert torch.equal(opt.prev_best, shown[3])  # the best is the one *displayed* at 3
    noise = (shown - torch.zeros(4)) / 0.5
    expect = rank_direction(noise.double(), [3, 1], "paper").float()
    assert torch.allclose(opt.direction, expect, atol=1e-6)


@pytest.mark.parametrize("target", ["step eta*2^-0", "step eta*2^-2", "previous best", "current"])
def test_line_search_round_moves_to_the_picked_candidate(target):
    opt = ZORankSGD(torch.zeros(6), num_candidates=6, smoothing=0.1, step_size=1.0, line_search=True, seed=11)
    opt.ask()
    opt.tell([0, 1, 2])
    x, D, prev = opt.x.clone(), opt.direction.clone(), opt.prev_best.clone()
    shown = opt.ask()
    labels = opt.labels()
    assert sorted(labels) == sorted(["step eta*2^-0", "step eta*2^-1", "step eta*2^-2", "step eta*2^-3", "previous best", "current"])
    expect = {"step eta*2^-0": x + D, "step eta*2^-2": x + 0.25 * D, "previous best": prev, "current": x}[target]
    # a judge that looks only at the displayed candidates and picks the one equal to target
    pick = next(i for i in range(len(shown)) if torch.equal(shown[i], expect))
    assert labels[pick] == target
    entry = opt.tell([pick])
    assert entry["pick"] == target
    assert torch.equal(opt.x, expect)
    if target == "current":
        assert entry["event"] == "stayed" and opt.n_averaged == 1 and torch.equal(opt.direction, D)
    else:
        assert entry["event"] == "moved" and opt.n_averaged == 0 and not opt.direction.any()
    assert opt.mode == "gradient"


def test_skip_round_changes_nothing():
    opt = ZORankSGD(torch.ones(3), num_candidates=4, seed=0)
    opt.ask()
    entry = opt.tell([])
    assert entry["event"] == "skipped" and torch.equal(opt.x, torch.ones(3)) and opt.round == 1
    with pytest.raises(RuntimeError):
        opt.tell([0])


def test_candidates_keep_the_shape_of_x0():
    opt = ZORankSGD(torch.zeros(2, 3, 4), num_candidates=3, seed=0)
    assert opt.ask().shape == (3, 2, 3, 4)
    assert torch.equal(opt.ask(), opt.ask())  # idempotent until tell
    seen = []
    opt.step(lambda items: (seen.append(items), [0, 2, 1])[1], decode=lambda c: c.sum())
    assert len(seen[0]) == 3 and opt.current().shape == (2, 3, 4)


# ------------------------------------------------------------------------------- resume


@pytest.mark.parametrize("cfg", [dict(line_search=True, estimator="reference"), dict(line_search=False, estimator="paper")])
def test_resume_follows_the_same_path_bit_for_bit(tmp_path, cfg):
    def make_oracle():
        return FunctionRankingOracle(lambda x: sq(x - 1.0), top_k=3)

    x0 = torch.randn(16, generator=torch.Generator().manual_seed(0))
    kw = dict(num_candidates=5, smoothing=0.2, step_size=0.3, seed=5, **cfg)
    straight = ZORankSGD(x0, **kw)
    straight.run(make_oracle(), 24)

    first = ZORankSGD(x0, **kw)
    first.run(make_oracle(), 11, checkpoint_dir=tmp_path)
    first.ask()  # stopped with a round on screen: the resumed session must show the same
    shown = first.ask().clone()
    first.save(tmp_path)
    del first
    resumed = ZORankSGD.load(tmp_path)
    assert torch.equal(resumed.ask(), shown)
    resumed.run(make_oracle(), 13)

    assert torch.equal(resumed.x, straight.x)
    assert torch.equal(resumed.direction, straight.direction)
    assert resumed.history == straight.history
    assert resumed.round == straight.round == 24
    assert len(list(tmp_path.glob("tensors-*.safetensors"))) == 1
    meta = json.loads((tmp_path / "state.json").read_text())
    assert meta["round"] == 11 and meta["config"]["seed"] == 5


def test_damaged_state_is_refused(tmp_path):
    opt = ZORankSGD(torch.zeros(3), seed=0)
    opt.save(tmp_path)
    tf = next(tmp_path.glob("tensors-*.safetensors"))
    data = bytearray(tf.read_bytes())
    data[-1] ^= 0xFF
    tf.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="checksum"):
        ZORankSGD.load(tmp_path)


# ------------------------------------------------------------------------------- oracles


class Brightness(Reward):
    """Toy reward: mean brightness; NaN for an all-black image."""

    name = "brightness"

    def forward(self, images, prompts=None, **context):
        m = images.float().mean(dim=(1, 2, 3))
        return torch.where(m == 0, torch.full_like(m, float("nan")), m)


class Redness(Reward):
    name = "redness"

    def forward(self, images, prompts=None, **context):
        return images[:, 0].float().mean(dim=(1, 2)) - images[:, 1:].float().mean(dim=(1, 2, 3))


def img(r, g, b):
    return torch.tensor([r, g, b]).view(3, 1, 1).expand(3, 4, 4).clone()


def test_reward_ranking_oracle():
    images = torch.stack([img(0.2, 0.2, 0.2), img(0, 0, 0), img(0.9, 0.9, 0.9), img(0.5, 0.5, 0.5)])
    o = RewardRankingOracle(Brightness(), prompts="a grey square")
    assert o.rank(images) == [2, 3, 0, 1]  # NaN (black) last
    assert RewardRankingOracle(Brightness(), top_k=2).rank(list(images)) == [2, 3]
    assert o.n_queries == 4 and math.isnan(o.last_scores[1])


def test_reward_preference_oracle():
    o = RewardPreferenceOracle(Brightness(), tol=0.05)
    assert o.compare(img(0.9, 0.9, 0.9), img(0.1, 0.1, 0.1)) == 0
    assert o(img(0.1, 0.1, 0.1), img(0.9, 0.9, 0.9)) == 1
    assert o.compare(img(0.5, 0.5, 0.5), img(0.52, 0.52, 0.52)) is None
    assert o.compare(img(0, 0, 0), img(0.1, 0.1, 0.1)) == 1  # NaN loses


def test_pareto_preference_oracle():
    o = ParetoPreferenceOracle([Brightness(), Redness()])
    bright_red = img(1.0, 0.5, 0.5)
    dull_red = img(0.6, 0.3, 0.3)
    white = img(1.0, 1.0, 1.0)
    assert o.compare(bright_red, dull_red) == 0  # brighter and redder
    assert o.compare(dull_red, bright_red) == 1
    assert o.compare(white, dull_red) is None  # brighter but not red: a trade-off
    vec = ParetoPreferenceOracle(lambda x: torch.stack([x.sum(-1), -x.abs().sum(-1)], -1))
    assert vec.compare(torch.tensor([1.0, 0.0]), torch.tensor([2.0, 0.0])) is None
    assert vec.compare(torch.tensor([1.0, 0.0]), torch.tensor([1.0, -1.0])) == 0


def test_function_ranking_oracle():
    xs = torch.tensor([[3.0], [1.0], [float("nan")], [2.0]])
    assert FunctionRankingOracle(lambda x: float(x[0])).rank(xs) == [1, 3, 0, 2]
    assert FunctionRankingOracle(lambda x: float(x[0]), minimize=False).rank(xs) == [0, 3, 1, 2]
    assert FunctionRankingOracle(lambda x: x[:, 0], batched=True, top_k=1).rank(xs) == [1]
    with pytest.raises(ValueError):
        FunctionRankingOracle(sq, top_k=0)
