"""``vfeedback/ShapesReach-v0``: a pixel gymnasium task in the shapes world with a known true reward.

A red circle (the agent) moves on a 32 px shapes-world canvas; the person wants it at a goal
point that is not drawn, up and to the left of a fixed yellow square (the landmark). A blue
triangle wanders at random and the background shade changes per episode: features the person
does not care about. The true reward of a state is ``-||agent - goal||`` (canvas units).

Observation: ``[agent x, agent y, distractor x, distractor y]`` in [0, 1] (y down); action:
a move in ``[-1, 1]^2`` scaled by ``STEP``. Episodes end after ``max_episode_steps`` (16).
Registered (by importing ``vfeedback.integrations.gym``) as ``vfeedback/ShapesReach-v0``.
``render()`` draws the scene with the shapes world's renderer (``vfeedback.world.scenes``),
the distribution the shapes judges were trained on.

:func:`scripted_episodes` rolls out behaviours of varying quality (heading for the goal or for
a random point, with noise) and :class:`ScriptedPerson` answers RAPL's triplet queries from
the true return.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from .gym import SHAPES_REACH_ID as ENV_ID, gym  # noqa: F401  (importing .gym registers the env)

GOAL = (0.25, 0.25)
LANDMARK = (0.55, 0.55)
STEP = 0.08
RADIUS = 0.15
LO, HI = RADIUS, 1.0 - RADIUS
#: the captions a caption-grounded reward gets: the goal as far as the vocabulary can say it
GOAL_CAPTIONS = ("a red circle left of a yellow square", "a red circle above a yellow square")


class ShapesReachEnv(gym.Env):
    """See the module docstring. ``render_size``: pixels of the rendered frame (32 = the judges')."""

    metadata = {"render_modes": ["rgb_array"], "render_fps": 8}

    def __init__(self, render_mode: Optional[str] = None, render_size: int = 32):
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be 'rgb_array' or None, got {render_mode!r}")
        if int(render_size) < 8:
            raise ValueError(f"render_size must be >= 8 pixels, got {render_size!r}")
        self.render_mode = render_mode
        self.render_size = int(render_size)
        self.observation_space = gym.spaces.Box(0.0, 1.0, (4,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.agent = np.array([0.5, 0.5])
        self.distractor = np.array([0.5, 0.5])
        self.background = (0.9, 0.9, 0.9)

    def _obs(self) -> np.ndarray:
        return np.concatenate([self.agent, self.distractor]).astype(np.float32)

    def true_reward(self) -> float:
        """``-||agent - goal||`` of the current state."""
        return -float(np.linalg.norm(self.agent - np.asarray(GOAL)))

    def reset(self, *, seed: Optional[int] = None, options: Optional[dict] = None):
        super().reset(seed=seed)
        r = self.np_random
        self.agent = r.uniform(LO, HI, 2)
        self.distractor = r.uniform(LO, HI, 2)
        level = float(r.uniform(0.80, 0.96))
        self.background = (level, level, float(np.clip(level + r.uniform(-0.04, 0.04), 0, 1)))
        return self._obs(), {"true_reward": self.true_reward()}

    def step(self, action):
        a = np.clip(np.asarray(action, dtype=np.float64).reshape(2), -1.0, 1.0)
        self.agent = np.clip(self.agent + STEP * a, LO, HI)
        self.distractor = np.clip(self.distractor + STEP * self.np_random.uniform(-1, 1, 2), LO, HI)
        tr = self.true_reward()
        return self._obs(), tr, False, False, {"true_reward": tr}

    def render(self):
        if self.render_mode != "rgb_array":
            return None
        from vfeedback.world.scenes import Obj, Scene, render

        objs = [Obj("square", "yellow", LANDMARK[0], LANDMARK[1], 0.13, (0.95, 0.85, 0.10)),
                Obj("triangle", "blue", float(self.distractor[0]), float(self.distractor[1]), 0.14, (0.10, 0.25, 0.90)),
                Obj("circle", "red", float(self.agent[0]), float(self.agent[1]), RADIUS, (0.90, 0.10, 0.10))]
        img = render(Scene(objs, self.background, "free"), self.render_size)
        return (img.permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)


def scripted_episodes(n: int, seed: int, steps: int = 16, expert: bool = False):
    """``n`` episodes of scripted behaviours: ``(frames uint8 (n, steps+1, 32, 32, 3), true rewards
    (n, steps+1))`` (frame 0 is the reset frame). Each episode heads for the goal (expert: always,
    with no noise) or for a random point, with a random amount of action noise."""
    rng = np.random.default_rng(seed)
    env = ShapesReachEnv(render_mode="rgb_array")
    frames, rewards = [], []
    for i in range(n):
        obs, info = env.reset(seed=int(rng.integers(2**31)))
        target = np.asarray(GOAL) if expert or rng.random() < 0.4 else rng.uniform(LO, HI, 2)
        noise = 0.0 if expert else float(rng.choice([0.0, 0.5, 1.5]))
        fr, rw = [env.render()], [info["true_reward"]]
        for _ in range(steps):
            a = np.clip((target - env.agent) / STEP + noise * rng.normal(size=2), -1, 1)
            _, r, _, _, _ = env.step(a)
            fr.append(env.render())
            rw.append(r)
        frames.append(np.stack(fr))
        rewards.append(rw)
    return np.stack(frames), np.asarray(rewards, dtype=np.float64)


class ScriptedPerson:
    """Answers RAPL's query "which of these two episodes is closer to what you want (the anchor
    demonstration)?" by the higher true return; ties (equal returns) are not asked."""

    def __init__(self, returns: np.ndarray):
        self.returns = np.asarray(returns, dtype=np.float64)

    def triplets(self, n: int, anchors: list[int], pool: list[int], seed: int) -> list[tuple[int, int, int]]:
        """``n`` triplets ``(anchor, preferred, other)``: an anchor drawn from ``anchors`` and two
        distinct episodes from ``pool``, ordered by the person."""
        rng = np.random.default_rng(seed)
        out = []
        while len(out) < n:
            a = int(anchors[rng.integers(len(anchors))])
            i, j = (int(pool[k]) for k in rng.choice(len(pool), 2, replace=False))
            if self.returns[i] == self.returns[j]:
                continue
            out.append((a, i, j) if self.returns[i] > self.returns[j] else (a, j, i))
        return out
