"""Exact values for the methods' core math, no model: the DDIM step and its log-prob, the alpha
lookup with its clamp, the x0 clip (vfeedback/sampling.py); ReFL's hinge loss and stop step
(algorithms/refl.py); DRaFT's K, loss and re-noising (algorithms/draft.py); D3PO's per-step DPO
loss (algorithms/d3po.py); DDPO's PPO-clip loss, KL and advantages, GRPO's group advantages
(algorithms/ddpo.py, grpo.py); RAFT's selection (algorithms/raft.py); Diffusion-DPO's loss
(algorithms/diffusion_dpo.py); ensembles, PAR, win rate and the Lagrange multiplier
(rewards/base.py, vfeedback/reward_shaping.py). Hand-computed cases, and for each loss one SGD
step on its inputs that moves them the way training must. See `make mutants`."""
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from rewards.base import Ensemble, Reward, RewardError, ensemble_combine
from vfeedback.algorithms.d3po import d3po_loss, loss_scale
from vfeedback.algorithms.ddpo import PerPromptStatTracker, batch_advantages, gaussian_kl, ppo_clip_loss
from vfeedback.algorithms.diffusion_dpo import denoising_error, diffusion_dpo_loss
from vfeedback.algorithms.draft import draft_loss, draw_k, draw_k_gaussian, renoise
from vfeedback.algorithms.grpo import group_advantages
from vfeedback.algorithms.raft import _count, select, to_uint8
from vfeedback.algorithms.refl import draw_stop_step, refl_loss, reward_metrics
from vfeedback.errors import UserError
from vfeedback.reward_shaping import lagrange_step, par_shaping, penalise, win_rates
from vfeedback.sampling import GradWindow, _alpha, ddim_step, step_gap, trained_step_count, x0_clip

NAN = float("nan")
LOG2PI = math.log(2 * math.pi)


def _same(got, want, tol=1e-6):
    got = [float(x) for x in torch.as_tensor(got).reshape(-1).tolist()]
    want = [float(x) for x in np.asarray(want, dtype=np.float64).reshape(-1)]
    assert len(got) == len(want), (got, want)
    for g, w in zip(got, want):
        if math.isnan(w):
            assert math.isnan(g), (got, want)
        else:
            assert g == pytest.approx(w, rel=tol, abs=tol), (got, want)


def _sgd_step(params, loss, lr=1.0):
    loss.backward()
    with torch.no_grad():
        for p in params:
            p -= lr * p.grad
            p.grad = None


# ============================================================================ the DDIM step
# a_t = 0.4, a_t' = 0.8: the DDIM variance (1 - a_t') / (1 - a_t) * (1 - a_t / a_t') = 0.2 / 0.6 * 0.5 = 1/6
A_T, A_PREV = 0.4, 0.8
X_T = torch.tensor([[1.0, -2.0]])
OUT = torch.tensor([[0.5, 1.0]])


def _eps_x0():
    return [(1.0 - math.sqrt(0.6) * 0.5) / math.sqrt(0.4), (-2.0 - math.sqrt(0.6) * 1.0) / math.sqrt(0.4)]


def test_ddim_step_epsilon_eta_half_mean_std_sample_and_log_prob():
    eta = 0.5
    noise = torch.tensor([[1.0, -2.0]])
    prev, lp, x0, mean, std = ddim_step(OUT, X_T, torch.tensor(A_T, dtype=torch.float64), torch.tensor(A_PREV, dtype=torch.float64),
                                        eta, "epsilon", noise=noise)
    s = 0.5 / math.sqrt(6)  # eta * sqrt(1/6); eta**2 in its place would give 0.25 / sqrt(6)
    assert float(std) == pytest.approx(s, rel=1e-6)
    assert std.dtype == torch.float32 and mean.dtype == torch.float32  # float64 alphas are computed in float32
    x0h = _eps_x0()
    _same(x0, [x0h])
    # mean = sqrt(a_t') x0 + sqrt(1 - a_t' - s^2) eps, s^2 = 1/24
    c = math.sqrt(0.2 - 1 / 24)
    m = [math.sqrt(0.8) * x0h[0] + c * 0.5, math.sqrt(0.8) * x0h[1] + c * 1.0]
    _same(mean, [m])
    _same(prev, [[m[0] + s * 1.0, m[1] - s * 2.0]])
    # log N averaged over the 2 dims: -(z^2)/2 - log s - log(2 pi)/2 with z = 1, -2 -> mean z^2 / 2 = 1.25
    assert lp.shape == (1,)
    _same(lp, [-1.25 - math.log(s) - 0.5 * LOG2PI])


def test_ddim_step_eta_one_is_the_ddpm_posterior():
    """At eta = 1 the transition is DDPM's posterior q(x_t' | x_t, x0): mean
    sqrt(a_t') beta / (1 - a_t) x0 + sqrt(alpha) (1 - a_t') / (1 - a_t) x_t with alpha = a_t / a_t' = 0.5,
    beta = 0.5, and variance (1 - a_t') / (1 - a_t) beta = 1/6 (an independent formula)."""
    _, _, x0, mean, std = ddim_step(OUT, X_T, A_T, A_PREV, 1.0, "epsilon", noise=torch.zeros(1, 2))
    assert float(std) ** 2 == pytest.approx(1 / 6, rel=1e-6)
    x0h = _eps_x0()
    want = [math.sqrt(0.8) * 0.5 / 0.6 * x0h[i] + math.sqrt(0.5) * 0.2 / 0.6 * float(X_T[0, i]) for i in range(2)]
    _same(mean, [want], tol=2e-6)


def test_ddim_step_log_prob_scores_a_given_sample_per_row():
    # two rows: row 0 at the mean + s, row 1 at the mean - 3 s; each row's own average over dims
    eta = 1.0
    x_t = torch.cat([X_T, X_T])
    out = torch.cat([OUT, OUT])
    _, _, _, mean, std = ddim_step(out, x_t, A_T, A_PREV, eta, noise=torch.zeros(2, 2))
    s = float(std)
    given = mean + s * torch.tensor([[1.0, 1.0], [-3.0, 0.0]])
    prev, lp, _, _, _ = ddim_step(out, x_t, A_T, A_PREV, eta, prev_sample=given)
    assert torch.equal(prev, given)
    base = -math.log(s) - 0.5 * LOG2PI
    _same(lp, [-0.5 + base, -(9 + 0) / 4 + base], tol=2e-6)


def test_ddim_step_v_prediction_and_sample_at_eta_zero():
    a, b = math.sqrt(A_T), math.sqrt(1 - A_T)
    # v: x0 = sqrt(a) x_t - sqrt(1 - a) v, eps = sqrt(a) v + sqrt(1 - a) x_t
    prev, lp, x0, mean, std = ddim_step(OUT, X_T, A_T, A_PREV, 0.0, "v_prediction")
    x0h = [a * 1.0 - b * 0.5, a * -2.0 - b * 1.0]
    eh = [a * 0.5 + b * 1.0, a * 1.0 + b * -2.0]
    _same(x0, [x0h])
    # eta 0: deterministic, std 0, the sample is the mean sqrt(a_t') x0 + sqrt(1 - a_t') eps, log-prob NaN
    want = [math.sqrt(0.8) * x0h[i] + math.sqrt(0.2) * eh[i] for i in range(2)]
    _same(mean, [want])
    assert torch.equal(prev, mean)
    assert float(std) == 0.0
    assert lp.shape == (1,) and math.isnan(float(lp[0]))
    # sample: x0 = the output, eps = (x_t - sqrt(a) x0) / sqrt(1 - a)
    _, _, x0, mean, _ = ddim_step(OUT, X_T, A_T, A_PREV, 0.0, "sample")
    _same(x0, OUT)
    eh = [(1.0 - a * 0.5) / b, (-2.0 - a * 1.0) / b]
    _same(mean, [[math.sqrt(0.8) * 0.5 + math.sqrt(0.2) * eh[0], math.sqrt(0.8) * 1.0 + math.sqrt(0.2) * eh[1]]])


def test_ddim_step_clip_clamps_x0_keeps_eps_and_needs_noise():
    # x0 (epsilon) = [0.9686, -4.3868]: clamped to [0.5, -0.5]; the mean uses the model's eps
    _, _, x0, mean, _ = ddim_step(OUT, X_T, A_T, A_PREV, 0.0, "epsilon", clip=0.5)
    _same(x0, [[0.5, -0.5]])
    _same(mean, [[math.sqrt(0.8) * 0.5 + math.sqrt(0.2) * 0.5, math.sqrt(0.8) * -0.5 + math.sqrt(0.2) * 1.0]])
    _, _, x0, _, _ = ddim_step(OUT, X_T, A_T, A_PREV, 0.0, "epsilon", clip=5.0)
    _same(x0, [_eps_x0()])
    with pytest.raises(ValueError, match="needs noise"):
        ddim_step(OUT, X_T, A_T, A_PREV, 0.5)
    with pytest.raises(ValueError, match="prediction_type"):
        ddim_step(OUT, X_T, A_T, A_PREV, 0.0, "flow")
    # the last step (a_t' = a_t): variance 0, even at eta 1
    prev, lp, _, mean, std = ddim_step(OUT, X_T, A_T, A_T, 1.0, noise=torch.ones(1, 2))
    assert float(std) == 0.0 and torch.equal(prev, mean) and math.isnan(float(lp[0]))


def _fake_model(ac=(0.9, 0.8, 0.7, 0.6), **config):
    return SimpleNamespace(path="m", scheduler=SimpleNamespace(alphas_cumprod=torch.tensor(ac), config=config))


def test_alpha_lookup_clamps_the_step_after_the_last_to_timestep_zero():
    m = _fake_model()
    a = _alpha(m, 2)
    assert a.dtype == torch.float64
    _same(a, [0.7])
    _same(_alpha(m, 0), [0.9])
    _same(_alpha(m, -1), [0.9])  # t - gap < 0: alphas_cumprod[0], not 1.0
    _same(_alpha(m, torch.tensor([3, -20, 1])), [0.6, 0.9, 0.8])


def test_step_gap_and_trained_step_count():
    assert step_gap(1000, 50) == 20
    assert step_gap(1000, 30) == 33  # floor: the previous timestep stays an integer
    assert step_gap(999, 1000) == 0
    assert trained_step_count(8, 0.5) == 4
    assert trained_step_count(10, 0.99) == 9  # truncated, as int()
    assert trained_step_count(3, 1.0) == 3
    assert trained_step_count(8, 0.1) == 1  # int(0.8) = 0 -> at least one
    assert trained_step_count(20, 0.1) == 2


def test_x0_clip_from_the_scheduler_config():
    assert x0_clip(_fake_model()) is None
    assert x0_clip(_fake_model(clip_sample=False, clip_sample_range=3.0)) is None
    assert x0_clip(_fake_model(clip_sample=True)) == 1.0
    assert x0_clip(_fake_model(clip_sample=True, clip_sample_range=2.5)) == 2.5
    assert x0_clip(_fake_model(thresholding=False, clip_sample=True, clip_sample_range=0.5)) == 0.5
    with pytest.raises(UserError, match="thresholding"):
        x0_clip(_fake_model(thresholding=True))


def test_grad_windows():
    assert GradWindow.none() == GradWindow(frozenset(), None)
    w = GradWindow.refl(5)
    assert w.grad_steps == frozenset({5}) and w.stop_at == 5
    w = GradWindow.last(3, 8)
    assert w.grad_steps == frozenset({5, 6, 7}) and w.stop_at is None
    assert GradWindow.last(1, 8).grad_steps == frozenset({7})
    assert GradWindow.last(8, 8).grad_steps == frozenset(range(8))
    assert GradWindow.last(12, 8).grad_steps == frozenset(range(8))
    assert GradWindow.last(0, 8).grad_steps == frozenset()
    assert GradWindow.all(4) == GradWindow(frozenset({0, 1, 2, 3}), None)


# ============================================================================ ReFL, DRaFT
def test_refl_stop_step_draws_both_ends_of_the_range():
    g = torch.Generator().manual_seed(0)
    seen = [draw_stop_step((3, 5), g) for _ in range(200)]
    assert set(seen) == {3, 4, 5}  # [lo, hi) would never give 5
    assert all(isinstance(s, int) for s in seen)
    g = torch.Generator().manual_seed(1)
    assert {draw_stop_step((7, 7), g) for _ in range(5)} == {7}
    # every draw comes from the given generator: the same seed, the same steps; the global RNG untouched
    state = torch.get_rng_state()
    a, b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert [draw_stop_step((0, 9), a) for _ in range(10)] == [draw_stop_step((0, 9), b) for _ in range(10)]
    assert [draw_k(1, (0, 9), a) for _ in range(10)] == [draw_k(1, (0, 9), b) for _ in range(10)]
    assert torch.equal(torch.get_rng_state(), state)
    # draw_k: a fixed K, or AlignProp's uniform K over [lo, hi]
    assert draw_k(4, None, g) == 4
    assert {draw_k(4, (1, 3), g) for _ in range(100)} == {1, 2, 3}


def test_draft_gaussian_k_is_alignprops_first_grad_index_by_hand():
    """AlignProp's gaussian truncation (its sd_pipeline.py lines 124-128, 224): index
    b = int(mean + std * z), redrawn while b < 1 or b >= steps; K = steps - b. Seed 0 gives the
    standard normals z below; with steps 5, mean 2.5, std 2 (x = 2.5 + 2z, b = int(x)):
      z = 1.5410 x = 5.58 b = 5 redrawn (b = steps)     z = -0.2934 x = 1.91 b = 1 K = 4 (round: 2)
      z = -2.1788 x = -1.86 b = -1 redrawn              z = 0.5684 x = 3.64 b = 3 K = 2
      z = -1.0845 x = 0.33 b = 0 redrawn (b = 0)        z = -1.3986 x = -0.30 b = 0 redrawn
      z = 0.4033 x = 3.31 b = 3 K = 2                   z = 0.8380 x = 4.18 b = 4 K = 1 (b = steps - 1)
    so four calls on one generator give K = 4, 2, 2, 1 (the redraws consume draws)."""
    g = torch.Generator().manual_seed(0)
    zs = [torch.randn((), generator=g).item() for _ in range(8)]
    assert zs == pytest.approx([1.5410, -0.2934, -2.1788, 0.5684, -1.0845, -1.3986, 0.4033, 0.8380], abs=1e-4)
    state = torch.get_rng_state()
    g = torch.Generator().manual_seed(0)
    assert [draw_k_gaussian(2.5, 2.0, 5, g) for _ in range(4)] == [4, 2, 2, 1]
    assert torch.equal(torch.get_rng_state(), state)  # the step's generator only
    # draw_k dispatches to it (k and k_range ignored), with the run's sampling steps
    g = torch.Generator().manual_seed(0)
    assert [draw_k(3, None, g, k_gauss=(2.5, 2.0), steps=5) for _ in range(4)] == [4, 2, 2, 1]
    # another std: z = 1.5410 -> x = 2.5 + 1.541 = 4.04, b = 4, K = 1 at once
    assert draw_k_gaussian(2.5, 1.0, 5, torch.Generator().manual_seed(0)) == 1
    # the reference's recipe, N(42, 5) on 50 steps: the mean and sd of K = 50 - b against the
    # truncated, redrawn normal computed from its CDF, P(b) = Phi((b + 1 - 42) / 5) - Phi((b - 42) / 5)
    def phi(x):
        return 0.5 * (1 + math.erf(x / math.sqrt(2)))
    p = {50 - b: phi((b + 1 - 42) / 5) - phi((b - 42) / 5) for b in range(1, 50)}
    tot = sum(p.values())
    mean = sum(k * q for k, q in p.items()) / tot
    sd = math.sqrt(sum((k - mean) ** 2 * q for k, q in p.items()) / tot)
    # 50 - 41.5 = 8.5 before the redraws; dropping b >= 50 (5.5% of the draws) raises it
    assert (mean, sd, tot) == pytest.approx((9.0887, 4.4734, 0.9452), abs=1e-4)
    n = 4000
    g = torch.Generator().manual_seed(1)
    ks = np.array([draw_k_gaussian(42, 5, 50, g) for _ in range(n)], dtype=np.float64)
    assert ks.min() >= 1 and ks.max() <= 49
    # 4 standard errors: the sample mean's sd / sqrt(n), the sample sd's ~ sd / sqrt(2n)
    assert abs(ks.mean() - mean) < 4 * sd / math.sqrt(n)
    assert abs(ks.std() - sd) < 4 * sd / math.sqrt(2 * n)


def test_refl_loss_hinge_values_and_step_raises_the_low_reward():
    r = torch.tensor([1.0, 3.0, NAN])
    # relu(2 - 1) = 1, relu(2 - 3) = 0, NaN left out: mean 0.5, times grad_scale 0.5
    assert float(refl_loss(r, 2.0, 0.5)) == pytest.approx(0.25)
    assert float(refl_loss(torch.tensor([-1.0, 0.5]), 2.0, 1.0)) == pytest.approx(2.25)
    assert math.isnan(float(refl_loss(torch.tensor([NAN, NAN]), 2.0, 1.0)))
    p = torch.tensor([1.0, 3.0], requires_grad=True)
    _sgd_step([p], refl_loss(p, 2.0, 0.5))
    # d/dr_0 = -0.5 / 2; r_1 is past the margin: no gradient
    _same(p.detach(), [1.25, 3.0])


def test_draft_loss_and_step_raise_every_reward():
    assert float(draft_loss(torch.tensor([1.0, 3.0, NAN]), 0.5)) == pytest.approx(-1.0)
    assert math.isnan(float(draft_loss(torch.tensor([NAN]), 1.0)))
    p = torch.tensor([1.0, 3.0], requires_grad=True)
    _sgd_step([p], draft_loss(p, 0.5))
    _same(p.detach(), [1.25, 3.25])


def test_draft_renoise_is_q_xt_given_x0():
    x = renoise(torch.tensor([[1.0, -2.0]], dtype=torch.float64), torch.tensor(0.64, dtype=torch.float64), torch.tensor([[0.5, 1.0]]))
    assert x.dtype == torch.float32
    _same(x, [[0.8 * 1.0 + 0.6 * 0.5, 0.8 * -2.0 + 0.6 * 1.0]])


class _Comps:
    last_components = {"a": torch.tensor([1.0, NAN, 3.0]), "b": torch.tensor([NAN, NAN])}


def test_reward_metrics():
    m = reward_metrics(torch.tensor([1.0, 3.0, NAN]), _Comps())
    assert m["reward_mean"] == pytest.approx(2.0)
    assert m["reward_std"] == pytest.approx(math.sqrt(2.0))  # the unbiased std of (1, 3)
    assert m["reward/a"] == pytest.approx(2.0)
    assert "reward/b" not in m
    m = reward_metrics(torch.tensor([4.0, NAN]), object())
    assert m == {"reward_mean": 4.0, "reward_std": 0.0}
    m = reward_metrics(torch.tensor([NAN]), object())
    assert math.isnan(m["reward_mean"]) and m["reward_std"] == 0.0


# ============================================================================ D3PO, Diffusion-DPO
def test_d3po_loss_values_clip_and_step_prefers_the_winner():
    lw, rw = torch.tensor([0.3]), torch.tensor([0.1])
    ll, rl = torch.tensor([-0.2]), torch.tensor([0.0])
    loss, cw, cl = d3po_loss(lw, rw, ll, rl, 2.0, None)
    # -log sigmoid(2 * (0.2 - (-0.2))) = log(1 + e^-0.8)
    _same(loss, [math.log1p(math.exp(-0.8))])
    _same(cw, [0.2]), _same(cl, [-0.2])
    # clip 0.1: log-ratios clamped to [log 0.9, log 1.1]
    loss, cw, cl = d3po_loss(lw, rw, ll, rl, 2.0, 0.1)
    _same(cw, [math.log(1.1)]), _same(cl, [math.log(0.9)])
    _same(loss, [math.log1p(math.exp(-2.0 * (math.log(1.1) - math.log(0.9))))])
    # both sides clamped the other way, with non-zero reference log-probs: lr_w = -0.5, lr_l = 0.5
    loss, cw, cl = d3po_loss(torch.tensor([-0.3]), torch.tensor([0.2]), torch.tensor([0.1]), torch.tensor([-0.4]), 2.0, 0.1)
    _same(cw, [math.log(0.9)]), _same(cl, [math.log(1.1)])
    loss, cw, cl = d3po_loss(torch.tensor([-0.3]), torch.tensor([0.2]), torch.tensor([0.1]), torch.tensor([-0.4]), 2.0, None)
    _same(cw, [-0.5]), _same(cl, [0.5])
    _same(loss, [math.log1p(math.exp(2.0))])
    # inside the clip range nothing changes
    loss, cw, cl = d3po_loss(torch.tensor([0.15]), rw, torch.tensor([-0.05]), rl, 2.0, 0.1)
    _same(cw, [0.05]), _same(cl, [-0.05])
    # gradient: d/d logp_w = -beta (1 - sigmoid(0.8)); one step raises the winner, lowers the loser
    pw = torch.tensor([0.3], requires_grad=True)
    pl = torch.tensor([-0.2], requires_grad=True)
    loss, _, _ = d3po_loss(pw, rw, pl, rl, 2.0, None)
    g = 2.0 * (1 - 1 / (1 + math.exp(-0.8)))
    _sgd_step([pw, pl], loss.sum())
    _same(pw.detach(), [0.3 + g]), _same(pl.detach(), [-0.2 - g])
    # a log-ratio outside the clip range gets no gradient
    pw = torch.tensor([0.3], requires_grad=True)
    d3po_loss(pw, rw, torch.tensor([0.0]), rl, 2.0, 0.1)[0].sum().backward()
    assert float(pw.grad) == 0.0


def test_d3po_loss_scale_is_the_mean_over_pairs_and_timesteps():
    assert loss_scale(1, 4, 5) == pytest.approx(0.05)
    assert loss_scale(2, 4, 5) == pytest.approx(0.1)
    assert loss_scale(3, 1, 2) == pytest.approx(1.5)


def test_diffusion_dpo_loss_values_and_step_lowers_the_winners_error():
    err = denoising_error(torch.tensor([[[[1.0, 3.0]]], [[[0.0, 2.0]]]]), torch.tensor([[[[0.0, 0.0]]], [[[1.0, 1.0]]]]))
    assert err.shape == (2,)
    _same(err, [5.0, 1.0])
    loss, inside = diffusion_dpo_loss(torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([1.5]), torch.tensor([1.0]), 4.0)
    # -beta / 2 * ((1 - 2) - (1.5 - 1)) = -2 * -1.5 = 3
    _same(inside, [3.0])
    _same(loss, [math.log1p(math.exp(-3.0))])
    ew = torch.tensor([1.0], requires_grad=True)
    el = torch.tensor([2.0], requires_grad=True)
    loss, _ = diffusion_dpo_loss(ew, el, torch.tensor([1.5]), torch.tensor([1.0]), 4.0)
    g = 2.0 * (1 - 1 / (1 + math.exp(-3.0)))  # beta / 2 * (1 - sigmoid(inside))
    _sgd_step([ew, el], loss.sum())
    _same(ew.detach(), [1.0 - g]), _same(el.detach(), [2.0 + g])


# ============================================================================ DDPO / GRPO
def test_ppo_clip_loss_values():
    logp = torch.log(torch.tensor([1.5, 1.5, 0.5, 1.0, 1.1]))
    old = torch.zeros(5)
    adv = torch.tensor([2.0, -2.0, 2.0, 10.0, -3.0])
    loss, ratio = ppo_clip_loss(logp, old, adv, 0.2, 5.0)
    _same(ratio, [1.5, 1.5, 0.5, 1.0, 1.1])
    # max(-A r, -A clamp(r, 0.8, 1.2)); A clamped to [-5, 5]
    _same(loss, [-2.4, 3.0, -1.0, -5.0, 3.3])
    # ratio from a non-zero old log-prob; the lower clip for a negative advantage; A clamped at -5
    loss, ratio = ppo_clip_loss(torch.tensor([0.2, math.log(0.5), 0.0]), torch.tensor([0.2 + math.log(1.1), 0.0, 0.0]),
                                torch.tensor([1.0, -2.0, -10.0]), 0.2, 5.0)
    _same(ratio, [1 / 1.1, 0.5, 1.0])
    _same(loss, [-1 / 1.1, 1.6, 5.0])


def test_ppo_clip_step_raises_the_log_prob_of_a_positive_advantage_inside_the_clip():
    p = torch.tensor([0.0, 0.0, math.log(1.5)], requires_grad=True)
    old = torch.zeros(3)
    loss, _ = ppo_clip_loss(p, old, torch.tensor([2.0, -1.0, 2.0]), 0.2, 5.0)
    _sgd_step([p], loss.sum(), lr=0.1)
    # d/dlogp = -A * ratio inside the range (ratio 1), 0 outside it (ratio 1.5 > 1.2 with A > 0)
    _same(p.detach(), [0.2, -0.1, math.log(1.5)])


def test_gaussian_kl():
    mean = torch.tensor([[[1.0, 3.0]], [[0.0, 2.0]]])
    ref = torch.tensor([[[0.0, 0.0]], [[0.0, 0.0]]])
    # mean((1, 9)) / (2 * 0.25) = 10; mean((0, 4)) / (2 * 4) = 0.25
    _same(gaussian_kl(mean, ref, torch.tensor([0.5, 2.0])), [10.0, 0.25])
    _same(gaussian_kl(mean, ref, 1.0), [2.5, 1.0])
    _same(gaussian_kl(mean, mean + torch.tensor([1.0, -1.0]), 1.0), [0.5, 0.5])
    assert gaussian_kl(mean, ref, torch.tensor([0.5, 2.0], dtype=torch.float64)).dtype == torch.float32


def test_per_prompt_stat_tracker():
    t = PerPromptStatTracker(buffer_size=3, min_count=2)
    adv = t.update(["a", "b", "a", "c"], [1.0, 5.0, 3.0, NAN])
    assert adv.dtype == np.float64
    # a: buffer (1, 3), mean 2, population std 1; b: 1 < min_count -> the batch's finite (1, 5, 3): mean 3, std sqrt(8/3)
    sb = math.sqrt(8 / 3)
    _same(adv, [-1 / (1 + 1e-6), 2 / (sb + 1e-6), 1 / (1 + 1e-6), 0.0], tol=1e-9)
    assert "c" not in t.stats
    adv = t.update(["a"], [6.0])  # a: (1, 3, 6): mean 10/3, std sqrt(((7/3)^2 + (1/3)^2 + (8/3)^2) / 3)
    sa = math.sqrt((49 + 1 + 64) / 27)
    _same(adv, [(6 - 10 / 3) / (sa + 1e-6)], tol=1e-9)
    adv = t.update(["a"], [0.0])  # the buffer keeps the last 3: (3, 6, 0): mean 3, std sqrt(6)
    _same(adv, [-3 / (math.sqrt(6) + 1e-6)], tol=1e-9)
    state = t.state_dict()
    assert state == {"buffer_size": 3, "stats": {"a": [3.0, 6.0, 0.0], "b": [5.0]}}
    t2 = PerPromptStatTracker(buffer_size=3, min_count=2)
    t2.load_state_dict(state)
    _same(t2.update(["b", "b"], [1.0, 3.0]), np.array([1.0 - 3.0, 3.0 - 3.0]) / (math.sqrt(8 / 3) + 1e-6), tol=1e-9)
    assert list(t2.stats["a"]) == [3.0, 6.0, 0.0] and t2.stats["b"].maxlen == 3
    assert t.update(["a"], [NAN]).tolist() == [0.0]
    # float32 rewards: the statistics in float64 (0.1 is not exact in float32)
    t3 = PerPromptStatTracker(buffer_size=3, min_count=1)
    adv = t3.update(["a", "a"], np.array([0.1, 0.3], dtype=np.float32))
    assert adv.dtype == np.float64
    r32 = np.array([0.1, 0.3], dtype=np.float32).astype(np.float64)
    assert adv.tolist() == ((r32 - r32.mean()) / (r32.std() + 1e-6)).tolist()
    t2.load_state_dict({})
    assert t2.stats == {}


def test_batch_and_group_advantages():
    _same(batch_advantages([1.0, 3.0, NAN]), [-1 / (1 + 1e-8), 1 / (1 + 1e-8), 0.0], tol=1e-12)
    _same(batch_advantages([NAN, NAN]), [0.0, 0.0])
    _same(batch_advantages([2.0, 2.0]), [0.0, 0.0])
    r32 = np.array([0.1, 0.3, 0.7], dtype=np.float32)
    for f in (batch_advantages, lambda r: group_advantages(["a"] * 3, r)):
        adv = f(r32)
        assert adv.dtype == np.float64
        r64 = r32.astype(np.float64)
        assert np.allclose(adv, (r64 - r64.mean()) / (r64.std() + (1e-8 if f is batch_advantages else 1e-4)), rtol=0, atol=1e-12)
    p = ["a", "b", "a", "b", "b", "c"]
    r = [1.0, 0.0, 3.0, 1.0, 5.0, NAN]
    sb = math.sqrt(14 / 3)  # b: (0, 1, 5), mean 2
    _same(group_advantages(p, r), [-1 / 1.0001, -2 / (sb + 1e-4), 1 / 1.0001, -1 / (sb + 1e-4), 3 / (sb + 1e-4), 0.0], tol=1e-12)
    g = float(np.std([1.0, 0.0, 3.0, 1.0, 5.0]))  # global std over the batch's finite rewards
    _same(group_advantages(p, r, global_std=True), [-1 / (g + 1e-4), -2 / (g + 1e-4), 1 / (g + 1e-4), -1 / (g + 1e-4), 3 / (g + 1e-4), 0.0],
          tol=1e-12)
    _same(group_advantages(["a", "a"], [4.0, 4.0]), [0.0, 0.0])
    _same(group_advantages(["a"], [NAN]), [0.0])
    _same(group_advantages(["a", "a"], [1.0, 2.0], eps=0.5), [-0.5, 0.5])


# ============================================================================ RAFT
def test_raft_select_best_of_k_and_quantile():
    s = [0.5, 0.9, NAN, 0.7, 0.1, 0.9]
    g = [0, 0, 0, 1, 1, 2]
    # best of each group: 1 (0.9), 3 (0.7), 5 (0.9); ranked 1, 5 (tie: lower index first), 3
    assert select(s, g, "best_of_k", 1.0) == [1, 3, 5]
    assert select(s, g, "best_of_k", 0.67) == [1, 5]  # floor(3 * 0.67) = 2
    assert select(s, g, "best_of_k", 0.5) == [1]
    assert select(s, g, "best_of_k", 0.1) == [1]  # at least one
    assert select([0.2, 0.8, 0.8], [0, 1, 2], "best_of_k", 0.5) == [1]
    # quantile: the floor(6 * 0.5) = 3 best of all (NaN never kept)
    assert select(s, g, "quantile", 0.5) == [1, 3, 5]
    assert select(s, g, "quantile", 0.34) == [1, 5]
    assert select(s, g, "quantile", 1.0) == [0, 1, 3, 4, 5]
    assert select([0.1, 0.3, 0.2], [0, 0, 0], "best_of_k", 1.0) == [1]
    assert select([NAN, NAN], [0, 1], "best_of_k", 1.0) == []
    assert select([NAN, NAN], [0, 1], "quantile", 1.0) == []
    with pytest.raises(ValueError, match="selection"):
        select([1.0], [0], "top", 1.0)
    with pytest.raises(ValueError, match="group ids"):
        select([1.0, 2.0], [0], "quantile", 1.0)


def test_raft_count_and_to_uint8():
    assert _count(100, 0.29) == 29  # float 0.29 * 100 = 28.999999999999996
    assert _count(10, 0.25) == 2
    assert _count(3, 0.1) == 1
    assert _count(4, 1.0) == 4
    u = to_uint8(torch.tensor([-0.1, 0.5, 1.2, 0.2, 1 / 255 * 0.4]))
    assert u.dtype == torch.uint8 and u.tolist() == [0, 128, 255, 51, 0]


# ============================================================================ ensembles, shaping, cost
class _Col(Reward):
    def __init__(self, values, name):
        super().__init__()
        self.values, self.name = values, name

    def forward(self, images, prompts=None, **context):
        return torch.tensor(self.values, dtype=torch.float32)


class _Echo(Reward):
    """Scores image i by its mean pixel + len(prompt i) + context["bonus"]: every input counts."""

    def __init__(self, name):
        super().__init__()
        self.name = name

    def forward(self, images, prompts=None, **context):
        return images.float().mean(dim=(1, 2, 3)) + torch.tensor([float(len(p)) for p in prompts]) + context["bonus"]


def test_ensemble_passes_images_prompts_context_and_normalises():
    imgs = torch.stack([torch.full((3, 1, 1), 0.5), torch.full((3, 1, 1), 0.25)])
    e = Ensemble([_Echo("a"), _Col([1.0, 5.0], "b")], mode="mean")
    # a: 0.5 + 2 + 10, 0.25 + 4 + 10; mean with b
    _same(e(imgs, ["ab", "abcd"], bonus=10.0), [(12.5 + 1.0) / 2, (14.25 + 5.0) / 2])
    # batch z-scores of each member: a (12.5, 14.25) -> (-1, 1) / sqrt(2) ; b (1, 5) -> the same
    b = Ensemble([_Echo("a"), _Col([1.0, 5.0], "b")], mode="mean", normalize="batch")
    _same(b(imgs, ["ab", "abcd"], bonus=10.0), [-1 / math.sqrt(2), 1 / math.sqrt(2)], tol=1e-5)
    # running statistics: updated with each member's scores while update_stats is on
    r = Ensemble([_Col([1.0, 3.0], "a"), _Col([2.0, 6.0], "b")], mode="wco", normalize="running")
    r.update_stats = True
    # a: mean 2, std sqrt(2) -> (-1, 1)/sqrt(2); b: mean 4, std sqrt(8) -> (-1, 1)/sqrt(2)
    _same(r(imgs, ["x", "y"]), [-1 / math.sqrt(2), 1 / math.sqrt(2)], tol=1e-5)
    assert float(r.norms[1].mean) == pytest.approx(4.0)


def test_ensemble_combine_modes():
    r = torch.tensor([[1.0, 3.0, 2.0], [NAN, 2.0, 4.0], [NAN, NAN, NAN], [-1.0, -1.0, 5.0], [NAN, 7.0, NAN]])
    _same(ensemble_combine(r, "mean"), [2.0, 3.0, NAN, 1.0, 7.0])
    _same(ensemble_combine(r, "wco"), [1.0, 2.0, NAN, -1.0, 7.0])
    # population variance: 2/3, 1, -, 8, 0
    _same(ensemble_combine(r, "uwo", 0.5), [2 - 1 / 3, 3 - 0.5, NAN, 1.0 - 4.0, 7.0])
    _same(ensemble_combine(r, "uwo"), [2 - 1 / 3, 3 - 0.5, NAN, 1.0 - 4.0, 7.0])
    _same(ensemble_combine(r, "uwo", 0.0), [2.0, 3.0, NAN, 1.0, 7.0])
    with pytest.raises(RewardError, match="ensemble mode"):
        ensemble_combine(r, "max")


def test_ensemble_module():
    e = Ensemble([_Col([1.0, NAN], "a"), _Col([3.0, 2.0], "b")], mode="wco")
    assert e.name == "wco(a,b)" and e.mode == "wco" and e.uwo_lambda == 0.5 and e.weights == [1.0, 1.0]
    assert e.normalize == "none" and e.names == ["a", "b"]
    _same(e(torch.zeros(2, 3, 1, 1)), [1.0, 2.0])
    assert set(e.last_components) == {"a", "b"}
    _same(e.last_components["b"], [3.0, 2.0])
    u = Ensemble([_Col([1.0, 0.0], "a"), _Col([3.0, 0.0], "b")], mode="uwo", uwo_lambda=2.0)
    _same(u(torch.zeros(2, 3, 1, 1)), [2.0 - 2.0 * 1.0, 0.0])
    assert Ensemble([_Col([1.0], "a"), _Col([3.0], "b")]).mode == "mean"
    z = Ensemble([_Col([1.0], "a"), _Col([3.0], "b")], mode="uwo", uwo_lambda=0, names=["x", "y"])
    assert z.uwo_lambda == 0.0 and z.name == "uwo(x,y)"
    _same(z(torch.zeros(1, 3, 1, 1)), [2.0])
    with pytest.raises(RewardError, match="at least 2"):
        Ensemble([_Col([1.0], "a")])
    with pytest.raises(RewardError, match="uwo_lambda"):
        Ensemble([_Col([1.0], "a"), _Col([3.0], "b")], mode="uwo", uwo_lambda=-0.1)
    with pytest.raises(RewardError, match="uwo_lambda"):
        Ensemble([_Col([1.0], "a"), _Col([3.0], "b")], mode="uwo", uwo_lambda=math.inf)
    with pytest.raises(RewardError, match="ensemble mode"):
        Ensemble([_Col([1.0], "a"), _Col([3.0], "b")], mode="median")


def test_par_penalty_and_lagrange_step():
    _same(par_shaping(torch.tensor([1.0, 0.0, NAN]), torch.tensor([0.0, 2.0, 0.0])), [1 / (1 + math.exp(-1)), 1 / (1 + math.exp(2)), NAN])
    _same(penalise(torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.0]), 0.5, 1.0), [0.0, 2.5])
    # dual ascent: a cost over the budget raises lambda, under it lowers it, never below 0
    assert lagrange_step(0.5, 3.0, 1.0, 0.1) == pytest.approx(0.7)
    assert lagrange_step(0.5, 0.0, 1.0, 0.1) == pytest.approx(0.4)
    assert lagrange_step(0.1, 0.0, 1.0, 0.5) == 0.0
    assert lagrange_step(0.3, NAN, 1.0, 0.5) == 0.3
    assert lagrange_step(0.3, math.inf, 1.0, 0.5) == 0.3


def test_win_rates():
    s = torch.tensor([3.0, 1.0, 2.0, 5.0, 1.0, 1.0, 0.0, 4.0, 6.0, 1.0, 2.0, 3.0, 1.0, 1.0, 1.0])
    groups = torch.tensor([0, 0, 0, 1, 2, 2, 2, 3, 3, 4, 4, 4, 5, 5, 5])

    def cmp(i, j):
        a, b = float(s[i]), float(s[j])
        return None if a == b else (0 if a > b else 1)

    w = win_rates(s, groups, cmp)
    assert w.dtype == torch.float64
    # group 0: 3 beats both, 1 loses both, 2 beats one; group 1 alone: 1/2;
    # group 2: the tie counts 1/2 each, both beat 0; group 3, a pair: 6 beats 4;
    # group 4: the last beats both earlier ones; group 5: three ties, 1/2 against each
    _same(w, [1.0, 0.0, 0.5, 0.5, 0.75, 0.75, 0.0, 0.0, 1.0, 0.0, 0.5, 1.0, 0.5, 0.5, 0.5])
