"""Exact values for ZO-RankSGD's math (vfeedback/algorithms/zo_ranksgd.py): the DAG of an
(m, k)-ranking, both estimators' weights, the direction, the config's bounds, one step of
Algorithm 1 and both branches of the reference's line search. Hand-computed cases; each
assertion fails when a sign, a bound or a constant in the code changes (`make mutants`)."""
import math

import pytest
import torch

from vfeedback.algorithms.zo_ranksgd import (
    ZORankSGD,
    ZORankSGDConfig,
    dag_edges,
    num_edges,
    rank_direction,
    rank_weights,
    validate_ranking,
)
from vfeedback.feedback.oracles import FunctionRankingOracle


def test_num_edges_counts_ranked_pairs_plus_ranked_to_unranked():
    # k(k-1)/2 + k(m-k)
    assert num_edges(4, 2) == 1 + 4
    assert num_edges(5, 5) == 10
    assert num_edges(3, 1) == 2
    assert num_edges(6, 3) == 3 + 9
    assert num_edges(4, 0) == 0
    assert isinstance(num_edges(5, 3), int)


def test_validate_ranking_bounds_and_faults():
    assert validate_ranking([0, 3], 4) == [0, 3]
    assert validate_ranking((2.0, 1), 3) == [2, 1]
    assert validate_ranking([], 3) == []
    for bad, what in (([4], "outside 0..3"), ([-1], "outside 0..3"), ([1, 1], "twice"), ([True], "booleans"), (["x"], "candidate indices")):
        with pytest.raises(ValueError, match=what):
            validate_ranking(bad, 4)


def test_dag_edges_of_a_top2_of_4():
    # 2 beats 0 and both unranked; 0 beats both unranked; unranked 1, 3 are not compared
    assert dag_edges([2, 0], 4) == [(2, 0), (2, 1), (2, 3), (0, 1), (0, 3)]
    assert dag_edges([1, 2, 0], 3) == [(1, 2), (1, 0), (2, 0)]
    assert dag_edges([], 3) == []
    assert len(dag_edges([3, 1, 4], 6)) == num_edges(6, 3)


def test_paper_weights_are_out_minus_in_degree_over_edges():
    # ranking [2, 0] of m=4: node 2: out 3, in 0; node 0: out 2, in 1; 1 and 3: in 2 each; |E| = 5
    w = rank_weights([2, 0], 4, "paper")
    assert w.dtype == torch.float64
    assert w.tolist() == pytest.approx([1 / 5, -2 / 5, 3 / 5, -2 / 5], abs=1e-15)
    assert float(w.sum()) == pytest.approx(0.0, abs=1e-15)
    # full ranking [1, 2, 0]: m-1-2p = 2, 0, -2 over |E| = 3
    assert rank_weights([1, 2, 0], 3).tolist() == pytest.approx([-2 / 3, 2 / 3, 0.0], abs=1e-15)
    # m = 2, one item ranked: +1 / -1 over one edge (the m < 2 guard must not swallow m = 2)
    assert rank_weights([1], 2).tolist() == [-1.0, 1.0]


def test_reference_weights_add_one_per_ranked_item():
    # the reference code: m - 2p for ranked, -k unranked, same |E|; sums to k / |E|
    w = rank_weights([2, 0], 4, "reference")
    assert w.tolist() == pytest.approx([2 / 5, -2 / 5, 4 / 5, -2 / 5], abs=1e-15)
    assert float(w.sum()) == pytest.approx(2 / 5, abs=1e-15)
    assert rank_weights([1, 2, 0], 3, "reference").tolist() == pytest.approx([-1 / 3, 3 / 3, 1 / 3], abs=1e-15)


def test_weights_degenerate_cases_and_bad_estimator():
    assert rank_weights([], 4).tolist() == [0.0] * 4
    assert rank_weights([0], 1).tolist() == [0.0]
    assert rank_weights([], 4, "reference").tolist() == [0.0] * 4
    with pytest.raises(ValueError, match="estimator"):
        rank_weights([0], 3, "nope")


def test_paper_direction_is_the_edge_average_of_u_better_minus_u_worse():
    u = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 1.0], [3.0, -1.0]], dtype=torch.float64)
    ranking = [2, 0]
    edges = dag_edges(ranking, 4)
    want = sum(u[i] - u[j] for i, j in edges) / len(edges)
    got = rank_direction(u, ranking)
    assert torch.allclose(got, want, atol=1e-12)
    # by hand: (1*u0 - 2*u1 + 3*u2 - 2*u3) / 5 = ((1 - 0 - 3 - 6)/5, (0 - 4 + 3 + 2)/5)
    assert got.tolist() == pytest.approx([-8 / 5, 1 / 5], abs=1e-12)


def test_reference_direction_is_scaled_by_the_smoothing():
    u = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 1.0]], dtype=torch.float32)
    d = rank_direction(u, [0, 2, 1], "reference", smoothing=0.5)
    # weights (3, -1, 1) / 3 (rank 0 -> m, rank 1 -> m - 2, rank 2 -> m - 4) times mu = 0.5
    want = 0.5 * (3 * u[0] + 1 * u[2] - 1 * u[1]) / 3
    assert d.dtype == torch.float32
    assert torch.allclose(d, want, atol=1e-7)
    assert torch.allclose(rank_direction(u, [0, 2, 1], "reference"), 2 * want, atol=1e-7)  # default smoothing 1
    # the paper estimator ignores the smoothing (its direction is in units of u)
    assert torch.allclose(rank_direction(u, [0, 2, 1], "paper", smoothing=0.5), (2 * u[0] - 2 * u[1]) / 3, atol=1e-7)


def test_config_bounds():
    assert ZORankSGDConfig(num_candidates=2).num_candidates == 2
    for kw, field in (({"num_candidates": 1}, "num_candidates"), ({"num_candidates": 2.0}, "num_candidates"),
                      ({"smoothing": 0.0}, "smoothing"), ({"smoothing": -0.1}, "smoothing"), ({"smoothing": math.inf}, "smoothing"),
                      ({"step_size": 0.0}, "step_size"), ({"step_size": math.nan}, "step_size"), ({"step_size": "1"}, "step_size"),
                      ({"estimator": "Paper"}, "estimator")):
        with pytest.raises(ValueError, match=field):
            ZORankSGDConfig(**kw)
    # line search: m - 2 step points by default; m = 2 leaves none
    assert ZORankSGDConfig(num_candidates=3, line_search=True).ls_points == 1
    assert ZORankSGDConfig(num_candidates=5).ls_points == 3
    with pytest.raises(ValueError, match="line_search needs at least one step point"):
        ZORankSGDConfig(num_candidates=2, line_search=True)
    assert ZORankSGDConfig(num_candidates=2, line_search=True, line_search_points=1).ls_points == 1
    with pytest.raises(ValueError, match="line_search"):
        ZORankSGDConfig(num_candidates=4, line_search=True, line_search_points=0)
    assert ZORankSGDConfig(estimator="reference").estimator == "reference"
    c = ZORankSGDConfig(smoothing=1, step_size=2)
    assert isinstance(c.smoothing, float) and isinstance(c.step_size, float)


def _expected_noise(seed, m, d):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((m, d), generator=g, dtype=torch.float32)


def test_one_algorithm1_step_by_hand():
    x0 = torch.tensor([1.0, -2.0])
    opt = ZORankSGD(x0, num_candidates=3, smoothing=0.5, step_size=0.2, shuffle=False, seed=3)
    u = _expected_noise(3, 3, 2)
    cands = opt.ask()
    assert torch.allclose(cands, x0 + 0.5 * u, atol=1e-7)
    assert torch.equal(opt.ask(), cands)  # idempotent until tell
    assert opt.labels() == ["perturbation 0", "perturbation 1", "perturbation 2"]
    entry = opt.tell([0, 1, 2])
    # D = (2 u0 + 0 u1 - 2 u2) / 3 ; x1 = x0 + eta * D
    d = (2 * u[0] - 2 * u[2]) / 3
    assert torch.allclose(opt.current(), x0 + 0.2 * d, atol=1e-6)
    assert torch.allclose(opt.direction, d, atol=1e-6)
    assert entry["event"] == "step" and entry["ranking"] == [0, 1, 2] and entry["queries"] == 3
    assert entry["round"] == 0 and entry["mode"] == "gradient" and opt.history == [entry]
    assert opt.round == 1 and opt.n_queries == 3 and opt.mode == "gradient"
    # "cannot tell": nothing moves, queries still count
    x1 = opt.current().clone()
    opt.ask()
    e = opt.tell([])
    assert e["event"] == "skipped" and torch.equal(opt.current(), x1) and opt.n_queries == 6 and opt.round == 2


def test_one_reference_estimator_step_is_in_units_of_mu_u():
    x0 = torch.tensor([0.0, 1.0])
    opt = ZORankSGD(x0, num_candidates=3, smoothing=0.5, step_size=0.2, estimator="reference", shuffle=False, seed=4)
    u = (opt.ask() - x0) / 0.5
    opt.tell([2, 0, 1])
    # weights (m - 2p) / |E| = (3, 1, -1) / 3 on u2, u0, u1, times mu
    want = x0 + 0.2 * 0.5 * (3 * u[2] + u[0] - u[1]) / 3
    assert torch.allclose(opt.current(), want, atol=1e-6)


def test_shuffled_answers_map_back_through_the_permutation():
    f = lambda x: float(((x - torch.tensor([3.0, -1.0])) ** 2).sum())
    runs = []
    for shuffle in (False, True):
        opt = ZORankSGD(torch.zeros(2), num_candidates=5, smoothing=0.3, step_size=0.5, shuffle=shuffle, seed=11)
        oracle = FunctionRankingOracle(f)
        e = opt.step(oracle)
        runs.append((opt.current().clone(), e))
    # the same noise (drawn before the permutation) and the same preference: the same step
    assert torch.allclose(runs[0][0], runs[1][0], atol=1e-6)
    assert runs[0][1]["ranking"] == runs[1][1]["ranking"]
    assert runs[1][1]["answer"] != runs[1][1]["ranking"]  # seed 11 does permute the display


def test_labels_follow_the_display_permutation():
    opt = ZORankSGD(torch.zeros(1), num_candidates=4, shuffle=True, seed=0)
    opt.ask()
    perm = opt._pending["perm"]
    assert sorted(perm) == [0, 1, 2, 3] and perm != [0, 1, 2, 3]
    assert opt.labels() == [f"perturbation {i}" for i in perm]


def test_a_step_moves_a_quadratic_downhill_and_a_reward_uphill():
    target = torch.tensor([2.0, -1.0, 0.5, 1.0])
    f = lambda x: float(((x - target) ** 2).sum())
    opt = ZORankSGD(torch.zeros(4), num_candidates=8, smoothing=0.05, step_size=0.3, seed=0)
    before = f(opt.current())
    opt.step(FunctionRankingOracle(f, minimize=True))
    assert f(opt.current()) < before - 0.1
    opt2 = ZORankSGD(torch.zeros(4), num_candidates=8, smoothing=0.05, step_size=0.3, seed=0)
    opt2.step(FunctionRankingOracle(f, minimize=False))
    assert f(opt2.current()) > before + 0.1


def _ls_opt(**kw):
    cfg = dict(num_candidates=4, smoothing=0.1, step_size=1.0, line_search=True, shuffle=False, seed=5)
    cfg.update(kw)
    return ZORankSGD(torch.tensor([0.5, -0.5]), **cfg)


def test_line_search_round_offers_halving_steps_previous_best_and_current():
    opt = _ls_opt()
    x0 = opt.current().clone()
    pts = opt.ask()
    e = opt.tell([1, 0, 3, 2])
    assert e["event"] == "estimated" and e["averaged"] == 1
    u = (pts - x0) / 0.1
    d = (3 * u[1] + 1 * u[0] - 1 * u[3] - 3 * u[2]) / 6
    assert torch.allclose(opt.direction, d, atol=1e-5)
    assert torch.equal(opt.current(), x0)  # a gradient round of the line search does not move
    assert opt.mode == "line_search"
    cands = opt.ask()
    assert opt.labels() == ["step eta*2^-0", "step eta*2^-1", "previous best", "current"]
    assert torch.allclose(cands[0], x0 + 1.0 * d, atol=1e-6)
    assert torch.allclose(cands[1], x0 + 0.5 * d, atol=1e-6)
    assert torch.equal(cands[2], pts[1])
    assert torch.equal(cands[3], x0)
    assert opt.state_dict()["meta"]["pending"]["mode"] == "line_search"
    e = opt.tell([1])
    assert e["event"] == "moved" and e["pick"] == "step eta*2^-1"
    assert e["mode"] == "line_search" and e["round"] == 1 and opt.history[-1] is e
    assert torch.allclose(opt.current(), x0 + 0.5 * d, atol=1e-6)
    assert float(opt.direction.abs().sum()) == 0.0 and opt.n_averaged == 0
    assert opt.mode == "gradient" and opt.prev_best is None
    assert opt.n_queries == 8


def test_line_search_picking_current_keeps_and_averages_the_direction():
    opt = _ls_opt()
    x0 = opt.current().clone()
    opt.ask()
    opt.tell([0, 1, 2, 3])
    d1 = opt.direction.clone()
    opt.ask()
    e = opt.tell([3])  # "current"
    assert e["event"] == "stayed" and torch.equal(opt.current(), x0) and torch.equal(opt.direction, d1)
    pts = opt.ask()
    opt.tell([3, 2, 1, 0])
    u = (pts - x0) / 0.1
    d2 = (3 * u[3] + u[2] - u[1] - 3 * u[0]) / 6
    assert opt.n_averaged == 2
    assert torch.allclose(opt.direction, (d1 + d2) / 2, atol=1e-5)
    # an empty answer in a line-search round stays too
    opt.ask()
    assert opt.tell([])["event"] == "stayed"


def test_line_search_without_averaging_keeps_the_last_estimate():
    opt = _ls_opt(average_directions=False)
    opt.ask()
    opt.tell([0, 1, 2, 3])
    opt.ask()
    opt.tell([3])
    pts = opt.ask()
    opt.tell([3, 2, 1, 0])
    u = (pts - opt.current()) / 0.1
    assert opt.n_averaged == 1
    assert torch.allclose(opt.direction, (3 * u[3] + u[2] - u[1] - 3 * u[0]) / 6, atol=1e-5)


def test_line_search_points_override_and_tell_before_ask():
    opt = _ls_opt(line_search_points=3)
    with pytest.raises(RuntimeError, match="ask"):
        opt.tell([0])
    opt.ask()
    opt.tell([0])
    assert [l for l in opt.labels()] == ["step eta*2^-0", "step eta*2^-1", "step eta*2^-2", "previous best", "current"]
    c = opt.ask()
    assert torch.allclose(c[2] - opt.current(), 0.25 * opt.direction, atol=1e-6)
