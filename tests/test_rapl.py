"""RAPL (rewards/rapl.py, RAPLReward in vfeedback/integrations/gym.py): the entropic OT plan and
cost on hand cases and against POT, the triplet loss, alignment on a synthetic case, the
saved model as rewards.load reads it, the gym wrapper on vfeedback/ShapesReach-v0."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

gym = pytest.importorskip("gymnasium")

import rewards
from rewards import RewardError
from rewards.rapl import RAPLModel, cosine_cost, ot_distance, ot_frame_costs, sinkhorn_plan, triplet_loss

SPEC = {"kind": "shapes_trunk", "which": "judge", "pool": 4}


def _sig(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


# --------------------------------------------------------------------------------------------
# optimal transport


@pytest.mark.parametrize("eps", [0.25, 1.0, 3.0])
def test_sinkhorn_2x2_closed_form(eps):
    # uniform marginals force P = [[a, 1/2 - a], [1/2 - a, a]]; the entropic optimum has
    # P11 P22 / (P12 P21) = exp(-(C11 + C22 - C12 - C21) / eps), so a = sigmoid(-delta / (2 eps)) / 2
    C = torch.tensor([[0.3, 1.1], [0.7, 0.2]], dtype=torch.float64)
    delta = 0.3 + 0.2 - 1.1 - 0.7
    a = 0.5 * _sig(-delta / (2 * eps))
    P = sinkhorn_plan(C, eps, iters=200)
    want = torch.tensor([[a, 0.5 - a], [0.5 - a, a]], dtype=torch.float64)
    assert torch.allclose(P, want, atol=1e-12)
    # the per-frame costs and the OT cost of two embedded "videos" with this cosine cost
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    assert torch.allclose(cosine_cost(x, y), torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64), atol=1e-15)
    b = 0.5 * _sig(2.0 / (2 * eps))  # delta = -2 for C = [[0, 1], [1, 0]]
    assert torch.allclose(ot_frame_costs(x, y, eps), torch.full((2,), 0.5 - b, dtype=torch.float64), atol=1e-12)
    assert ot_distance(x, y, eps).item() == pytest.approx(1.0 - 2 * b, abs=1e-12)


def test_sinkhorn_optimality_conditions():
    # the entropic optimum is the unique plan with the given marginals and the Gibbs form
    # P_ij = exp(f_i + g_j - C_ij / eps): log P + C / eps has rank-one (additive) structure
    g = torch.Generator().manual_seed(0)
    C = torch.rand(5, 7, generator=g, dtype=torch.float64) * 2
    for eps in (0.2, 1.0):
        P = sinkhorn_plan(C, eps, iters=300)
        assert torch.allclose(P.sum(1), torch.full((5,), 1 / 5, dtype=torch.float64), atol=1e-12)
        assert torch.allclose(P.sum(0), torch.full((7,), 1 / 7, dtype=torch.float64), atol=1e-12)
        L = P.log() + C / eps
        assert torch.allclose(L - L[:, :1] - L[:1, :] + L[0, 0], torch.zeros_like(L), atol=1e-10)
    # the model's default (eps 1, 30 iterations) is converged on [0, 2] costs to float32 precision
    P30 = sinkhorn_plan(C.float(), 1.0, iters=30).double()
    assert torch.allclose(P30, sinkhorn_plan(C, 1.0, iters=300), atol=1e-7)
    # batched: each cost matrix solved on its own
    B = torch.stack([C, C.flip(0)])
    assert torch.allclose(sinkhorn_plan(B, 0.5, 300)[1], sinkhorn_plan(C.flip(0), 0.5, 300), atol=1e-14)
    with pytest.raises(RewardError, match="epsilon"):
        sinkhorn_plan(C, 0.0)


@pytest.mark.slow  # importing POT pulls in scipy.stats (seconds on a loaded CI core)
def test_sinkhorn_matches_pot():
    ot = pytest.importorskip("ot")
    g = torch.Generator().manual_seed(1)
    C = torch.rand(6, 4, generator=g, dtype=torch.float64) * 2
    for eps in (0.1, 1.0):
        ref = ot.sinkhorn(np.full(6, 1 / 6), np.full(4, 1 / 4), C.numpy(), reg=eps, numItermax=5000, stopThr=1e-14)
        assert np.allclose(sinkhorn_plan(C, eps, iters=1000).numpy(), ref, atol=1e-10)
        assert ot_distance(torch.eye(6, 3, dtype=torch.float64) + 0.1, torch.eye(4, 3, dtype=torch.float64) + 0.2, eps).item() == pytest.approx(
            float(ot.sinkhorn2(np.full(6, 1 / 6), np.full(4, 1 / 4), cosine_cost(torch.eye(6, 3, dtype=torch.float64) + 0.1,
                  torch.eye(4, 3, dtype=torch.float64) + 0.2).numpy(), reg=eps, numItermax=5000, stopThr=1e-14)), abs=1e-10)


def test_triplet_loss_sign_and_margin():
    dp, do = torch.tensor([0.2, 0.5]), torch.tensor([0.5, 0.45])
    bt = triplet_loss(dp, do)  # -log(e^-dp / (e^-dp + e^-do))
    want = [-math.log(math.exp(-0.2) / (math.exp(-0.2) + math.exp(-0.5))), -math.log(math.exp(-0.5) / (math.exp(-0.5) + math.exp(-0.45)))]
    assert bt.tolist() == pytest.approx(want, abs=1e-6)
    assert bt[0] < math.log(2) < bt[1]  # preferred closer: below chance; farther: above
    assert triplet_loss(dp, do, "hinge", 0.1).tolist() == pytest.approx([0.0, 0.15], abs=1e-6)
    assert triplet_loss(dp, do, "hinge", 0.4).tolist() == pytest.approx([0.1, 0.45], abs=1e-6)
    with pytest.raises(RewardError, match="margin"):
        triplet_loss(dp, do, "bt", 0.1)
    with pytest.raises(RewardError, match="'softmax'"):
        triplet_loss(dp, do, "softmax")


# --------------------------------------------------------------------------------------------
# the model


@pytest.fixture(scope="module")
def episodes():
    from vfeedback.integrations.shapes_reach import scripted_episodes

    demos, _ = scripted_episodes(2, 1, steps=4, expert=True)
    vids, rw = scripted_episodes(3, 5, steps=4)
    return torch.from_numpy(demos).permute(0, 1, 4, 2, 3), torch.from_numpy(vids).permute(0, 1, 4, 2, 3), rw


@pytest.fixture(scope="module")
def model(episodes):
    return RAPLModel(SPEC, episodes[0], epsilon=1.0, seed=3)


def _synthetic(n: int, seed: int, fd: int = 64, T: int = 4):
    """Videos whose quality q lives in 4 feature dimensions under distractor noise in all 64."""
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(n, generator=g)
    q[0] = 1.0  # the anchor: the preferred demonstration
    feats = 3.0 * torch.randn(n, T, fd, generator=g)
    feats[:, :, :4] += 3.0 * q[:, None, None] * torch.linspace(-1, 1, 4)
    return feats, q


def _triplets(q, n, seed):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        i, j = (int(v) for v in rng.choice(np.arange(1, len(q)), 2, replace=False))
        out.append((0, i, j) if q[i] > q[j] else (0, j, i))
    return out


def test_fit_aligns_projection_on_synthetic_triplets(episodes):
    # features given directly (64-d), so the projection is 64 -> 32; the encoder is not used
    m = RAPLModel(SPEC, episodes[0][:, :2], seed=1, feat_dim=64)
    feats, q = _synthetic(80, 0)
    train, held = _triplets(q, 60, 1), _triplets(q, 200, 2)
    before, held_before = m.triplet_accuracy(feats, train), m.triplet_accuracy(feats, held)
    hist = m.fit(feats, train, epochs=20, lr=1e-2, seed=0)
    assert hist[-1] < 0.6 * hist[0]
    assert before < 0.6 and m.report["train_accuracy"] > 0.95, (before, m.report)
    assert m.triplet_accuracy(feats, held) > held_before + 0.1
    assert m.report["triplets"] == 60 and m.report["train_accuracy"] == m.triplet_accuracy(feats, train)
    # early stopping on held-out triplets keeps the epoch with the lowest held-out loss
    m2 = RAPLModel(SPEC, episodes[0][:, :2], seed=1, feat_dim=64)
    m2.fit(feats, train, epochs=6, lr=1e-2, seed=0, val_fraction=0.25)
    rep = m2.report
    assert rep["val_triplets"] == 15 == len(m2.val_triplets) and rep["triplets"] == 60
    assert not set(m2.val_triplets) - set(train) and len(rep["val_history"]) == 7  # epoch 0 (the start) .. 6
    assert rep["best_epoch"] == int(np.argmin(rep["val_history"])) and rep["val_loss"] == min(rep["val_history"])
    assert m2.triplet_loss_on(feats, m2.val_triplets) == pytest.approx(rep["val_loss"], abs=1e-6)  # the kept projection
    with pytest.raises(RewardError, match="val_fraction"):
        m2.fit(feats, train, val_fraction=1.0)
    with pytest.raises(RewardError, match=r"triplet \(0, 1, 99\)"):
        m.fit(feats, [(0, 1, 99)])
    with pytest.raises(RewardError, match="no preference triplets"):
        m.fit(feats, [])


def test_rewards_are_ot_costs_against_the_closest_demo(model, episodes):
    _, vids, _ = episodes
    ep = vids[0].float() / 255.0
    r = model.frame_rewards(ep)
    emb, demos = model.embed(ep), model.demo_embeddings()
    costs = torch.stack([ot_frame_costs(emb, d, model.epsilon, model.iters) for d in demos])
    best = int(costs.sum(1).argmin())
    assert torch.allclose(r, -costs[best] * ep.shape[0], atol=1e-6)
    assert costs.sum(1)[best] < costs.sum(1)[1 - best]
    assert r.shape == (5,) and bool((r <= 0).all()) and bool((r >= -2).all())
    assert torch.allclose(model(ep), r)


def test_save_load_round_trip_and_bad_files(model, episodes, tmp_path):
    model.report = {"triplets": 7}
    out = model.save(tmp_path / "rm")
    man = json.loads((out / "manifest.json").read_text())
    assert man["format"] == "vfeedback.rapl/1" and man["encoder"] == SPEC and man["epsilon"] == 1.0 and man["report"] == {"triplets": 7}
    loaded = rewards.load("rapl", path=str(out), cache=False)
    ep = episodes[1][1].float() / 255.0
    for k in ("proj.weight", "proj.bias", "feat_mean", "demos"):
        assert torch.equal(loaded.state_dict()[k], model.state_dict()[k]), k
    # the same weights; float32 sums over 2048 features in another batch layout differ in the last bits
    assert torch.allclose(loaded.frame_rewards(ep), model.frame_rewards(ep), atol=1e-5, rtol=0)
    assert torch.equal(loaded.demos, model.demos) and loaded.report == {"triplets": 7}
    with pytest.raises(RewardError, match="no manifest.json"):
        rewards.load("rapl", path=str(tmp_path / "nowhere"), cache=False)
    raw = bytearray((out / "rapl.safetensors").read_bytes())
    raw[-1] ^= 1
    (out / "rapl.safetensors").write_bytes(bytes(raw))
    with pytest.raises(RewardError, match="sha256"):
        rewards.load("rapl", path=str(out), cache=False)
    (out / "manifest.json").write_text(json.dumps({k: v for k, v in man.items() if k != "epsilon"}))
    with pytest.raises(RewardError, match="lacks field.*epsilon"):
        rewards.load("rapl", path=str(out), cache=False)
    (out / "manifest.json").write_text(json.dumps({**man, "format": "other/1"}))
    with pytest.raises(RewardError, match="'other/1'"):
        rewards.load("rapl", path=str(out), cache=False)


# --------------------------------------------------------------------------------------------
# the env and the wrapper


def test_env_true_reward_and_person():
    from vfeedback.integrations.shapes_reach import GOAL, ScriptedPerson

    import warnings

    from gymnasium.utils.env_checker import check_env

    env = gym.make("vfeedback/ShapesReach-v0", render_mode="rgb_array")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(env.unwrapped)
    obs, info = env.reset(seed=4)
    assert info["true_reward"] == pytest.approx(-math.dist(obs[:2], GOAL), abs=1e-6)
    obs, r, term, trunc, info = env.step(np.array([-1.0, -1.0], dtype=np.float32))
    assert r == pytest.approx(-math.dist(obs[:2], GOAL), abs=1e-6)
    assert env.render().shape == (32, 32, 3)
    person = ScriptedPerson(np.array([-3.0, -1.0, -2.0, -2.0]))
    for a, p, o in person.triplets(20, [0], [1, 2, 3], seed=0):
        assert person.returns[p] > person.returns[o]


def test_wrapper_rewards_check_env_and_bad_env(model):
    from gymnasium.utils.env_checker import check_env

    from vfeedback.integrations.gym import RAPLReward

    env = RAPLReward(gym.make("vfeedback/ShapesReach-v0", render_mode="rgb_array"), model)
    check_env(env, skip_render_check=True)
    env.reset(seed=0)
    frames = [env.render()]
    steps = []
    info = {}
    done = False
    while not done:
        _, r, term, trunc, info = env.step(np.array([-0.5, -0.5], dtype=np.float32))
        frames.append(env.render())
        steps.append(r)
        done = term or trunc
        prefix = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2)
        assert r == pytest.approx(float(model.frame_rewards(prefix)[-1]), abs=1e-5)
        assert info["rapl_reward"] == r and "env_reward" in info
    assert len(steps) == 16
    whole = model.frame_rewards(torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2))
    assert np.allclose(info["rapl_episode_rewards"], whole[1:].numpy(), atol=1e-5)
    add = RAPLReward(gym.make("vfeedback/ShapesReach-v0", render_mode="rgb_array"), model, mode="add", scale=0.5)
    add.reset(seed=0)
    _, r, *_, info = add.step(np.zeros(2, dtype=np.float32))
    assert r == pytest.approx(info["env_reward"] + 0.5 * info["rapl_reward"])
    # the spec records the wrapper: gymnasium.make(spec) rebuilds it around the same model object
    again = gym.make(add.spec)
    assert isinstance(again, RAPLReward) and again.model is model and again.mode == "add" and again.scale == 0.5
    with pytest.raises(RewardError, match="render_mode='rgb_array'"):
        RAPLReward(gym.make("vfeedback/ShapesReach-v0"), model)
    with pytest.raises(RewardError, match="'sideways'"):
        RAPLReward(gym.make("vfeedback/ShapesReach-v0", render_mode="rgb_array"), model, mode="sideways")


def test_bench_bad_flags_exit_2(capsys):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("rapl_bench", Path(__file__).parents[1] / "bench" / "rapl_shapes.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--prefs", "10,zero"]) == 2
    assert "--prefs" in capsys.readouterr().err
    assert mod.main(["--epsilon", "-1"]) == 2
    assert "--epsilon" in capsys.readouterr().err
    assert mod.main(["--val-fraction", "1"]) == 2
    assert "--val-fraction" in capsys.readouterr().err
