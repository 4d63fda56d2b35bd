"""gymnasium integration: the VLM-RM formula, the reward wrapper on CartPole frames (single and
vector envs) and the RL-VLM-F preference labeller + Bradley-Terry reward model.

The CLIP scorer is the ``clip`` reward on a tiny random open_clip checkpoint written in
open_clip's format.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

gym = pytest.importorskip("gymnasium")
pytest.importorskip("pygame")

import rewards
from rewards import RewardError
from vfeedback.integrations.gym import (
    ClipEmbedder,
    PreferenceRewardModel,
    VLMPreferenceLabeler,
    VLMRewardVectorWrapper,
    VLMRewardWrapper,
    projection,
    vlm_rm_reward,
)
from vfeedback.integrations.tiny import write_tiny_open_clip

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    name, ckpt = write_tiny_open_clip(tmp_path_factory.mktemp("clip"))
    yield rewards.load("clip", model=name, pretrained=ckpt)
    rewards.clear_cache()


def test_vlm_rm_formula_by_hand():
    # x, g, b in 2-D: x = (1, 0) (unit), g = (0, 1), b = (-1, 0)... d = g - b = (1, 1)
    x = torch.tensor([[3.0, 0.0]])  # normalised inside to (1, 0)
    g = torch.tensor([0.0, 1.0])
    b = torch.tensor([-1.0, 0.0])
    # alpha = 0: P = I, R = 1 - 0.5 * |(1, -1)|^2 = 0 = cos(x, g)
    assert vlm_rm_reward(x, g, b, alpha=0.0).item() == pytest.approx(0.0, abs=1e-6)
    assert vlm_rm_reward(x, g, None, alpha=0.0).item() == pytest.approx(0.0, abs=1e-6)
    # alpha = 1: P = d d^T / |d|^2 = [[.5,.5],[.5,.5]]; P (x - g) = P (1, -1) = (0, 0) -> R = 1
    assert vlm_rm_reward(x, g, b, alpha=1.0).item() == pytest.approx(1.0, abs=1e-6)
    # alpha = 0.5 on x = (0.6, 0.8): x - g = (0.6, -0.2); P = 0.5 * [[.5,.5],[.5,.5]] + 0.5 I
    x2 = torch.tensor([[0.6, 0.8]])
    v = np.array([[0.75, 0.25], [0.25, 0.75]]) @ np.array([0.6, -0.2])
    assert vlm_rm_reward(x2, g, b, alpha=0.5).item() == pytest.approx(1 - 0.5 * float(v @ v), abs=1e-6)
    P = projection(g, b, 1.0)
    assert torch.allclose(P @ P, P, atol=1e-6)  # a projection at alpha = 1
    with pytest.raises(rewards.RewardError):
        projection(g, None, 0.5)


def test_vlm_rm_with_clip_embeddings(clip):
    emb = ClipEmbedder(clip)
    frames = torch.rand(3, 3, 40, 60)
    x = emb.images(frames)
    g, b = emb.text(["a pole standing upright"])[0], emb.text(["a pole"])[0]
    r0 = vlm_rm_reward(x, g, b, alpha=0.0)
    assert torch.allclose(r0, x @ g, atol=1e-5)  # alpha 0 with unit g is the cosine
    r1 = vlm_rm_reward(x, g, b, alpha=1.0)
    d = (g - b) / (g - b).norm()
    assert torch.allclose(r1, 1 - 0.5 * ((x - g) @ d) ** 2, atol=1e-5)


def test_wrapper_single_env(clip):
    env = VLMRewardWrapper(gym.make("CartPole-v1", render_mode="rgb_array"), clip, goal="a pole standing upright",
                           baseline="a pole", alpha=0.5)
    obs, _ = env.reset(seed=0)
    _, r, term, trunc, info = env.step(0)
    assert isinstance(r, float) and r == pytest.approx(info["vlm_reward"]) and info["env_reward"] == 1.0
    # by hand from the rendered frame
    frame = torch.from_numpy(env.render().copy()).permute(2, 0, 1)[None].float() / 255
    e = ClipEmbedder(clip)
    want = vlm_rm_reward(e.images(frame), e.text(["a pole standing upright"])[0], e.text(["a pole"])[0], 0.5).item()
    assert r == pytest.approx(want, abs=1e-5)
    add = VLMRewardWrapper(gym.make("CartPole-v1", render_mode="rgb_array"), clip, goal="upright", mode="add", scale=0.1)
    add.reset(seed=0)
    _, r, _, _, info = add.step(1)
    assert r == pytest.approx(1.0 + 0.1 * info["vlm_reward"])
    with pytest.raises(rewards.RewardError, match="rgb_array"):
        VLMRewardWrapper(gym.make("CartPole-v1"), clip, goal="x")


def test_wrapper_vector_env_batched(clip, monkeypatch):
    venv = gym.make_vec("CartPole-v1", num_envs=3, vectorization_mode="sync", render_mode="rgb_array")
    env = VLMRewardWrapper(venv, clip, goal="a pole standing upright")
    assert isinstance(env, VLMRewardVectorWrapper)
    calls = []
    orig = clip.image_embeddings
    monkeypatch.setattr(clip, "image_embeddings", lambda x: calls.append(x.shape[0]) or orig(x))
    env.reset(seed=0)
    done_seen = False
    for t in range(40):
        _, r, term, trunc, info = env.step(np.ones(3, dtype=np.int64))  # always push right: episodes end fast
        assert r.shape == (3,) and info["vlm_reward"].shape == (3,)
        scored = info["_vlm_reward"]
        np.testing.assert_allclose(r[scored], info["vlm_reward"][scored], rtol=1e-5)
        if done_seen:
            assert not scored.all() or not prev_done.any()
        prev_done = term | trunc
        done_seen = done_seen or prev_done.any()
        if done_seen and not scored.all():
            np.testing.assert_array_equal(r[~scored], 0.0)  # the autoreset step keeps the env's reward (0)
    assert done_seen
    assert set(calls) == {3}  # one batched call per step


def test_preference_model_learns_separable_toy():
    rng = np.random.default_rng(0)
    w = rng.normal(size=8)
    a, b = rng.normal(size=(300, 8)), rng.normal(size=(300, 8))
    labels = [int(bj @ w > aj @ w) for aj, bj in zip(a, b)]
    pairs = [(torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)) for x, y in zip(a, b)]
    model = PreferenceRewardModel(embed=None, hidden=16)
    losses = model.fit(pairs[:200], labels[:200], epochs=60, lr=1e-2)
    assert losses[-1] < losses[0]
    assert model.accuracy(pairs[200:], labels[200:]) > 0.85


def test_labeler_and_reward_model_from_frames(clip):
    """RL-VLM-F loop on toy frames: label pairs with a scorer (the analytic 'color' reward:
    how red), learn a BT model on image embeddings, and use it as the wrapper's reward."""
    g = torch.Generator().manual_seed(0)

    def frame(redness):
        img = torch.rand(3, 48, 48, generator=g) * 0.2
        img[0] += redness * 0.8
        return img.clamp(0, 1)

    levels = torch.rand(160, generator=g)
    frames = [frame(float(v)) for v in levels]
    pairs = [(frames[2 * i], frames[2 * i + 1]) for i in range(80)]
    labeler = VLMPreferenceLabeler(rewards.load("color", color="red"), margin=0.0)
    labels = labeler.label(pairs)
    assert labeler.queries == 80 and set(labels) <= {0, 1, -1}
    truth = [int(levels[2 * i + 1] > levels[2 * i]) for i in range(80)]
    assert np.mean([l == t for l, t in zip(labels, truth)]) > 0.9  # the scorer sees redness
    # a pixel-statistics embedding (mean colour): the toy is separable in it
    model = PreferenceRewardModel(embed=lambda x: x.mean(dim=(2, 3)), hidden=8)
    model.fit(pairs[:60], labels[:60], epochs=150, lr=3e-2)
    assert model.accuracy(pairs[60:], labels[60:]) > 0.8
    # the same on frozen tiny-CLIP embeddings: above chance on the training pairs
    clip_model = PreferenceRewardModel(embed=clip, hidden=16)
    clip_model.fit(pairs, labels, epochs=100, lr=1e-2)
    assert clip_model.accuracy(pairs, labels) > 0.6
    # usable as the wrapper's reward
    env = VLMRewardWrapper(gym.make("CartPole-v1", render_mode="rgb_array"), model)
    env.reset(seed=0)
    _, r, _, _, info = env.step(0)
    assert np.isfinite(r) and r == pytest.approx(info["vlm_reward"])
    # a VLM-judge callable labels too; failures become "no preference"
    seen = []
    judge = VLMPreferenceLabeler(lambda a, b, goal: seen.append(goal) or (0 if a[:, 0].mean() > b[:, 0].mean() else 1), goal="red")
    assert judge.label(pairs[:5]) == [0 if a[0].mean() > b[0].mean() else 1 for a, b in pairs[:5]]
    assert seen == ["red"] * 5 and all(a.ndim == 4 for a, _ in [(VLMPreferenceLabeler._clip(p[0]), 0) for p in pairs[:1]])
    bad = VLMPreferenceLabeler(lambda a, b, goal: 1 / 0)
    assert bad.label(pairs[:2]) == [-1, -1]


def _check_env_warnings(env) -> set[str]:
    import warnings

    from gymnasium.utils.env_checker import check_env

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env)
    return {str(w.message).split("(")[0] for w in caught}


def _check_env_strict(env):
    """gymnasium's check_env, failing on any warning that the bare CartPole (made the same way)
    does not get too (its -inf observation bounds, "wrapped" notices)."""
    bare = _check_env_warnings(gym.make("CartPole-v1", render_mode="rgb_array"))
    assert _check_env_warnings(env) <= bare


def test_wrapper_passes_check_env_and_rebuilds_from_spec(clip):
    env = VLMRewardWrapper(gym.make("CartPole-v1", render_mode="rgb_array"), clip, goal="a pole standing upright",
                           baseline="a pole", alpha=0.5, mode="add", scale=0.1)
    _check_env_strict(env)
    assert env.metadata["render_modes"] == ["rgb_array"]
    # the spec records the wrapper and its arguments: gymnasium.make(spec) rebuilds it, with
    # the same scorer object (not a copy) and the same rewards
    spec = env.spec
    assert spec.additional_wrappers[-1].name == "VLMRewardWrapper"
    again = gym.make(spec)
    inner = again
    while not isinstance(inner, VLMRewardWrapper):
        inner = inner.env
    assert inner.scorer.reward is clip and inner.mode == "add" and inner.scale == 0.1 and inner.scorer.alpha == 0.5
    env.reset(seed=3)
    again.reset(seed=3)
    for a in (0, 1, 1):
        r1 = env.step(a)[1]
        r2 = again.step(a)[1]
        assert r1 == pytest.approx(r2, abs=1e-6) and r1 != 1.0


def test_preference_model_env_passes_check_env():
    """The RL-VLM-F env: CartPole whose reward is a Bradley-Terry model learnt from labels."""
    labeler = VLMPreferenceLabeler(rewards.load("color", color="red"))
    g = torch.Generator().manual_seed(0)
    frames = [torch.rand(3, 32, 32, generator=g) for _ in range(40)]
    pairs = [(frames[2 * i], frames[2 * i + 1]) for i in range(20)]
    model = PreferenceRewardModel(embed=lambda x: x.mean(dim=(2, 3)), hidden=8)
    model.fit(pairs, labeler.label(pairs), epochs=5)
    env = VLMRewardWrapper(gym.make("CartPole-v1", render_mode="rgb_array"), model)
    _check_env_strict(env)
    env.reset(seed=0)
    _, r, _, _, info = env.step(0)
    frame = torch.from_numpy(env.render().copy()).permute(2, 0, 1)[None].float() / 255
    assert r == pytest.approx(model(frame).item(), abs=1e-6) and info["env_reward"] == 1.0


@pytest.mark.parametrize("margin", [-1e-6, -1.0, float("nan"), float("inf"), float("-inf")])
def test_labeler_refuses_a_margin_that_is_negative_or_not_finite(margin):
    with pytest.raises(RewardError, match=r"margin: .*finite number >= 0"):
        VLMPreferenceLabeler(lambda a, b, goal: 0, margin=margin)
    # the bound itself is allowed: 0 means only exact ties are "no preference"
    assert VLMPreferenceLabeler(lambda a, b, goal: 0, margin=0.0).margin == 0.0
