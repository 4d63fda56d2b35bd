"""Vision-language rewards for gymnasium environments: VLM-RM and RL-VLM-F.

:class:`VLMRewardWrapper` renders each step's RGB frame and scores it, replacing (or adding to)
the environment's reward. With a CLIP-type scorer (``rewards.load("clip", ...)``) and a goal it
computes the VLM-RM reward (Rocamonde et al., "Vision-Language Models are Zero-Shot Reward
Models for Reinforcement Learning", ICLR 2024; reference code AlignmentResearch/vlmrm,
``projection_reward``):

    R(s) = 1 - 0.5 * || P (x - g) ||^2,    P = alpha * d d^T / ||d||^2 + (1 - alpha) * I,  d = g - b

with x the L2-normalised image embedding of the frame, g the goal embedding and b the baseline
embedding (each the mean of the normalised text embeddings of its prompts, as in the reference
code; one prompt gives a unit vector). alpha = 0 gives 1 - 0.5 ||x - g||^2 = cos(x, g) for unit
g; alpha = 1 keeps only the component along the baseline-to-goal direction. Any other
:class:`rewards.Reward` (VQAScore, an aesthetic model, the preference model below) is called as
``reward(frames, [goal] * B)``.

:class:`VLMPreferenceLabeler` (RL-VLM-F: Wang et al., "RL-VLM-F: Reinforcement Learning from
Vision Language Foundation Model Feedback", ICML 2024) labels pairs of frames or clips as
preferences with any scorer or a VLM judge, and :class:`PreferenceRewardModel` learns a
Bradley-Terry reward on frozen image embeddings from those labels; it is a
:class:`rewards.Reward`, so the wrapper can use it as its reward.

:class:`RAPLReward` (Tian et al., "What Matters to You? Towards Visual Representation Alignment
for Robot Learning", ICLR 2024) rewards each step by optimal-transport matching of the
episode's frames, embedded by a representation aligned to a person's preference triplets, to a
preferred demonstration (the model and its training: ``rewards/rapl.py``; docs/rapl.md).
"""
from __future__ import annotations

import logging
import math
import random
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

import rewards
from rewards import Reward, RewardError
from rewards.images import to_tensor

log = logging.getLogger(__name__)

Prompts = Union[str, Sequence[str]]


# --------------------------------------------------------------------------------------------
# embeddings and the VLM-RM formula


class ClipEmbedder:
    """Image and text embeddings from a CLIP-type reward (``rewards.load("clip", ...)``,
    anything with ``image_embeddings``), L2-normalised, float32, no autograd.

    Adapter around the scorer's public ``image_embeddings`` and ``text_embeddings``.
    """

    def __init__(self, reward: Reward):
        if not (hasattr(reward, "image_embeddings") and hasattr(reward, "text_embeddings")):
            raise RewardError(
                f"{getattr(reward, 'name', reward)!r} does not expose CLIP image and text embeddings; "
                "use a CLIP-type reward (rewards.load('clip', ...)) for VLM-RM, or pass goal with mode for a plain score"
            )
        self.reward = reward

    @torch.no_grad()
    def images(self, images: torch.Tensor) -> torch.Tensor:
        """``(B,3,H,W)`` in [0, 1] -> ``(B, D)`` unit vectors."""
        return self.reward.image_embeddings(images.to(self.reward.device)).float()

    @torch.no_grad()
    def text(self, prompts: Sequence[str]) -> torch.Tensor:
        """``N`` prompts -> ``(N, D)`` unit vectors."""
        return self.reward.text_embeddings(list(prompts)).float()


def projection(goal: torch.Tensor, baseline: Optional[torch.Tensor], alpha: float) -> torch.Tensor:
    """VLM-RM's ``P = alpha * d d^T / ||d||^2 + (1 - alpha) I`` with ``d = goal - baseline``; ``(D, D)``.

    Without a baseline only ``alpha = 0`` (P = I) is defined.
    """
    goal = goal.reshape(-1).float()
    eye = torch.eye(goal.numel(), device=goal.device)  # pragma: no mutate: placement (equivalent on CPU); any other change here crashes
    if baseline is None:
        if alpha != 0:
            raise RewardError(f"alpha={alpha}: the goal-baseline projection needs a baseline prompt (baseline=...)")
        return eye
    b = baseline.reshape(-1).float().to(goal.device)  # pragma: no mutate: placement, equivalent on CPU
    d = goal - b
    n2 = (d @ d).clamp_min(1e-12)
    return alpha * torch.outer(d, d) / n2 + (1.0 - alpha) * eye


def vlm_rm_reward(x: torch.Tensor, goal: torch.Tensor, baseline: Optional[torch.Tensor] = None, alpha: float = 0.0) -> torch.Tensor:
    """``1 - 0.5 * ||P (x - g)||^2`` for image embeddings ``x`` ``(B, D)`` (normalised here).

    ``goal`` / ``baseline``: ``(D,)`` embeddings, used as given (see the module docstring).
    """
    x = x.float()
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    g = goal.reshape(-1).float().to(x.device)  # pragma: no mutate: placement, equivalent on CPU
    P = projection(g, baseline, alpha).to(x.device)  # pragma: no mutate: placement, equivalent on CPU
    v = (x - g) @ P.T
    return 1.0 - 0.5 * (v * v).sum(-1)


def _prompt_list(p: Prompts) -> list[str]:
    return [p] if isinstance(p, str) else list(p)


def _frames_to_tensor(frames) -> torch.Tensor:
    """RGB frames (tuple/list of HxWx3 uint8 arrays, or one array (B,H,W,3)) -> (B,3,H,W) in [0,1]."""
    if isinstance(frames, np.ndarray) and frames.ndim == 3:
        frames = frames[None]
    arr = np.stack([np.asarray(f) for f in frames]) if not isinstance(frames, np.ndarray) else frames
    if arr.ndim != 4 or arr.shape[-1] not in (3, 4):
        raise ValueError(f"expected RGB frames of shape (H, W, 3); got {arr.shape}. Create the env with render_mode='rgb_array'")
    return torch.from_numpy(np.ascontiguousarray(arr[..., :3])).permute(0, 3, 1, 2).float().div_(255.0)


class FrameScorer:
    """Scores a batch of frames: VLM-RM with a CLIP-type reward and a goal, else ``reward(frames, [goal]*B)``.

    ``vlm_rm``: ``None`` (auto: VLM-RM when the reward exposes CLIP embeddings and a goal is
    given), True or False.
    """

    def __init__(self, reward, goal: Optional[Prompts] = None, baseline: Optional[Prompts] = None, alpha: float = 0.0,
                 vlm_rm: Optional[bool] = None, batch_size: int = 64):
        if isinstance(reward, str):
            reward = rewards.load(reward)
        if not 0.0 <= float(alpha) <= 1.0:
            raise RewardError(f"alpha must be in [0, 1], got {alpha}")
        self.reward = reward
        self.goal = goal
        self.alpha = float(alpha)
        self.batch_size = int(batch_size)
        clip_like = hasattr(reward, "image_embeddings") and hasattr(reward, "text_embeddings")
        self.vlm_rm = (clip_like and goal is not None) if vlm_rm is None else bool(vlm_rm)
        if self.vlm_rm:
            if goal is None:
                raise RewardError("VLM-RM needs a goal prompt (goal='a pole standing upright')")
            self.embedder = ClipEmbedder(reward)
            self.g = self.embedder.text(_prompt_list(goal)).mean(0)
            self.b = self.embedder.text(_prompt_list(baseline)).mean(0) if baseline is not None else None
            self.P = projection(self.g, self.b, self.alpha)
        elif baseline is not None or self.alpha != 0:
            raise RewardError("baseline / alpha apply to VLM-RM only (a CLIP-type reward with a goal)")
        elif reward.needs_prompt and goal is None:  # a rewards.Reward (its device and call are used below too)
            raise RewardError(f"reward {getattr(reward, 'name', reward)!r} needs a goal prompt (goal=...)")

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """``(B,3,H,W)`` in [0,1] -> ``(B,)`` float32 scores on the CPU."""
        outs = []
        for s in range(0, images.shape[0], self.batch_size):
            x = images[s : s + self.batch_size]
            if self.vlm_rm:
                e = self.embedder.images(x)
                v = (e - self.g.to(e.device)) @ self.P.to(e.device).T
                outs.append((1.0 - 0.5 * (v * v).sum(-1)).float().cpu())
            else:
                prompts = [self.goal if isinstance(self.goal, str) else _prompt_list(self.goal)[0]] * x.shape[0] if self.goal is not None else None
                outs.append(self.reward(x.to(self.reward.device), prompts).detach().float().cpu())
        return torch.cat(outs)


# --------------------------------------------------------------------------------------------
# the wrapper


def _gym():
    try:
        import gymnasium
    except ModuleNotFoundError:
        raise RewardError("vfeedback.integrations.gym needs gymnasium: pip install 'gymnasium[classic-control]'") from None
    return gymnasium


gym = _gym()


#: a pixel task with a known true reward for RAPL / VLM-RM comparisons (vfeedback/integrations/shapes_reach.py)
SHAPES_REACH_ID = "vfeedback/ShapesReach-v0"
if SHAPES_REACH_ID not in gym.registry:
    gym.register(SHAPES_REACH_ID, entry_point="vfeedback.integrations.shapes_reach:ShapesReachEnv", max_episode_steps=16)


def _check_mode(mode: str) -> str:
    if mode not in ("replace", "add"):
        raise RewardError(f"mode must be 'replace' or 'add', got {mode!r}")
    return mode


class _Shared:
    """Holds a scorer in a wrapper's recorded constructor arguments without copying it.

    gymnasium deep-copies an env's spec (and with it the recorded wrapper kwargs) whenever it
    reads ``env.spec``; a copy of a CLIP or VLM scorer would double its memory. The spec's
    ``make()`` gets this holder back and the new wrapper shares the same scorer.
    """

    def __init__(self, obj):
        self.obj = obj

    def __deepcopy__(self, memo):
        return self

    def __repr__(self) -> str:
        return f"<shared {getattr(self.obj, 'name', type(self.obj).__name__)}>"


class VLMRewardWrapper(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Reward from a vision-language scorer on the rendered frame after each step.

    ``reward``: a :class:`rewards.Reward` or its registered name (``clip`` for VLM-RM, ``vqa``,
    a :class:`PreferenceRewardModel`, ...). ``goal`` / ``baseline``: prompt or list of prompts.
    ``alpha``: VLM-RM's projection strength in [0, 1]. ``mode``: ``replace`` the env's reward,
    or ``add`` ``scale * score`` to it. ``info["vlm_reward"]`` carries the raw score and
    ``info["env_reward"]`` the env's own reward. The env must have ``render_mode="rgb_array"``.

    Given a gymnasium ``VectorEnv`` it returns a :class:`VLMRewardVectorWrapper` (the same
    options), which scores every sub-env's frame in one batch.

    It records its constructor arguments (``gymnasium.utils.RecordConstructorArgs``), so
    ``env.spec.make()`` / ``gymnasium.make(env.spec)`` rebuild the wrapped env, sharing the same
    scorer object; its ``metadata["render_modes"]`` is ``["rgb_array"]``, the only mode it can
    score. It passes ``gymnasium.utils.env_checker.check_env``.
    """

    def __new__(cls, env, *args, **kwargs):
        if cls is VLMRewardWrapper and isinstance(env, gym.vector.VectorEnv):
            return VLMRewardVectorWrapper(env, *args, **kwargs)
        return super().__new__(cls)

    def __init__(self, env, reward, goal: Optional[Prompts] = None, baseline: Optional[Prompts] = None, alpha: float = 0.0,
                 mode: str = "replace", scale: float = 1.0, vlm_rm: Optional[bool] = None):
        if isinstance(reward, _Shared):  # rebuilt from a spec
            reward = reward.obj
        gym.utils.RecordConstructorArgs.__init__(self, _disable_deepcopy=True, reward=_Shared(reward), goal=goal, baseline=baseline,
                                                 alpha=alpha, mode=mode, scale=scale, vlm_rm=vlm_rm)
        gym.Wrapper.__init__(self, env)
        if env.render_mode != "rgb_array":
            raise RewardError(f"VLMRewardWrapper needs frames: create the env with render_mode='rgb_array' (got {env.render_mode!r})")
        self.scorer = FrameScorer(reward, goal, baseline, alpha, vlm_rm)
        self.mode = _check_mode(mode)
        self.scale = float(scale)
        # only rgb_array frames can be scored: check_env (and users) must not ask for "human"
        self.metadata = {**env.metadata, "render_modes": ["rgb_array"]}

    def step(self, action):
        obs, env_reward, terminated, truncated, info = self.env.step(action)
        score = float(self.scorer(_frames_to_tensor(self.env.render()))[0])
        info = dict(info)
        info["vlm_reward"] = score
        info["env_reward"] = env_reward
        reward = self.scale * score if self.mode == "replace" else env_reward + self.scale * score
        return obs, reward, terminated, truncated, info


class VLMRewardVectorWrapper(gym.vector.VectorWrapper):
    """:class:`VLMRewardWrapper` for a gymnasium ``VectorEnv``: one batched scorer call per step.

    With next-step autoreset (gymnasium's default) the step after an episode's end only resets
    that sub-env; it keeps the env's reward (0) rather than a score of the fresh start frame.
    ``info["vlm_reward"]`` is an array over sub-envs (NaN where not scored) with the usual
    ``info["_vlm_reward"]`` mask.
    """

    def __init__(self, env, reward, goal: Optional[Prompts] = None, baseline: Optional[Prompts] = None, alpha: float = 0.0,
                 mode: str = "replace", scale: float = 1.0, vlm_rm: Optional[bool] = None):
        super().__init__(env)
        if env.render_mode != "rgb_array":
            raise RewardError(f"VLMRewardWrapper needs frames: create the vector env with render_mode='rgb_array' (got {env.render_mode!r})")
        self.scorer = FrameScorer(reward, goal, baseline, alpha, vlm_rm)
        self.mode = _check_mode(mode)
        self.scale = float(scale)
        am = env.metadata.get("autoreset_mode")
        self._next_step = am is None or getattr(am, "value", am) == "NextStep"
        self._resetting = np.zeros(env.num_envs, dtype=bool)

    def reset(self, **kwargs):
        self._resetting[:] = False
        return self.env.reset(**kwargs)

    def _frames(self):
        frames = self.env.render()
        if frames is None:
            frames = self.env.call("render")
        return _frames_to_tensor(frames)

    def step(self, actions):
        obs, env_reward, terminated, truncated, info = self.env.step(actions)
        env_reward = np.asarray(env_reward, dtype=np.float64)
        scores = self.scorer(self._frames()).numpy().astype(np.float64)
        scored = ~self._resetting if self._next_step else np.ones_like(self._resetting)
        vlm = self.scale * scores
        reward = np.where(scored, vlm if self.mode == "replace" else env_reward + vlm, env_reward)
        info = dict(info)
        info["vlm_reward"] = np.where(scored, scores, np.nan)
        info["_vlm_reward"] = scored.copy()
        info["env_reward"] = env_reward
        info["_env_reward"] = np.ones_like(scored)
        self._resetting = np.logical_or(terminated, truncated)
        return obs, reward.astype(np.float32), terminated, truncated, info


# --------------------------------------------------------------------------------------------
# RAPL: optimal-transport reward in a preference-aligned representation


class RAPLReward(gym.Wrapper, gym.utils.RecordConstructorArgs):
    """Reward from RAPL (Tian et al. 2024; ``rewards/rapl.py``): the episode's rendered frames,
    embedded by a preference-aligned encoder, matched by optimal transport to a preferred
    demonstration.

    ``model``: a :class:`rewards.rapl.RAPLModel` or the folder it was saved to (loaded with
    ``rewards.load("rapl", path=...)``). After each step the frames so far (the reset frame
    included) are matched against the demonstrations and the step's reward is the newest
    frame's OT reward ``-t * sum_s P*_ts C_ts`` (in ``[-2, 0]``); ``info["rapl_reward"]`` holds
    it and ``info["env_reward"]`` the env's own. When the episode ends,
    ``info["rapl_episode_rewards"]`` holds every step's reward recomputed on the whole episode,
    the reference's offline OT reward (``T`` times it). ``mode``: ``replace`` the env's reward
    or ``add`` ``scale * reward`` to it. The env must have ``render_mode="rgb_array"``.
    """

    def __init__(self, env, model, mode: str = "replace", scale: float = 1.0):
        if isinstance(model, _Shared):  # rebuilt from a spec
            model = model.obj
        if isinstance(model, (str, Path)):
            model = rewards.load("rapl", path=str(model))
        from rewards.rapl import RAPLModel

        if not isinstance(model, RAPLModel):
            raise RewardError(f"RAPLReward: model must be a rewards.rapl.RAPLModel or its saved folder, got {type(model).__name__}")
        gym.utils.RecordConstructorArgs.__init__(self, _disable_deepcopy=True, model=_Shared(model), mode=mode, scale=scale)
        gym.Wrapper.__init__(self, env)
        if env.render_mode != "rgb_array":
            raise RewardError(f"RAPLReward needs frames: create the env with render_mode='rgb_array' (got {env.render_mode!r})")
        self.model = model
        self.mode = _check_mode(mode)
        self.scale = float(scale)
        self.metadata = {**env.metadata, "render_modes": ["rgb_array"]}
        self._emb: list[torch.Tensor] = []

    def _embed_frame(self) -> None:
        self._emb.append(self.model.embed(_frames_to_tensor(self.env.render()))[0])

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self._emb = []
        self._embed_frame()
        return obs, info

    def step(self, action):
        obs, env_reward, terminated, truncated, info = self.env.step(action)
        if not self._emb:
            raise RewardError("RAPLReward: step() before reset()")
        self._embed_frame()
        rs = self.model.rewards_from_embeddings(torch.stack(self._emb))
        score = float(rs[-1])
        info = dict(info)
        info["rapl_reward"] = score
        info["env_reward"] = env_reward
        if terminated or truncated:
            info["rapl_episode_rewards"] = np.asarray(rs[1:].numpy(), dtype=np.float64)
        reward = self.scale * score if self.mode == "replace" else env_reward + self.scale * score
        return obs, reward, terminated, truncated, info


# --------------------------------------------------------------------------------------------
# RL-VLM-F: preference labels from a VLM, and a Bradley-Terry reward model


Judge = Callable[[torch.Tensor, torch.Tensor, Optional[str]], Optional[int]]


class VLMPreferenceLabeler:
    """Labels pairs of frames or clips: 0 (first better), 1 (second better) or -1 (no preference).

    ``judge``: a scorer (:class:`rewards.Reward` / its name; compared through ``FrameScorer``,
    so VLM-RM with a CLIP reward and a goal) or any callable ``judge(a, b, goal) -> 0 | 1 | None``
    taking two ``(T,3,H,W)`` clips (T = 1 for frames), e.g. a wrapper around a VLM asked the
    RL-VLM-F question "which image shows the goal better?". ``margin``: scores closer than this
    are "no preference" (RL-VLM-F drops those pairs). A clip's score is the mean of its frames'.
    """

    def __init__(self, judge, goal: Optional[Prompts] = None, baseline: Optional[Prompts] = None, alpha: float = 0.0, margin: float = 0.0):
        self.goal = goal
        self.margin = float(margin)
        if not (self.margin >= 0 and math.isfinite(self.margin)):
            raise RewardError(f"margin: scores closer than the margin are 'no preference', so it must be a finite number >= 0, got {margin!r}")
        if isinstance(judge, (Reward, str)):
            self.scorer: Optional[FrameScorer] = FrameScorer(judge, goal, baseline, alpha)
            self.judge = None
        elif callable(judge):
            self.scorer, self.judge = None, judge
        else:
            raise RewardError(f"judge: expected a rewards.Reward, a reward name or a callable, got {type(judge).__name__}")
        self.queries = 0

    @staticmethod
    def _clip(x) -> torch.Tensor:
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            t = x
        elif isinstance(x, np.ndarray) and x.ndim >= 3 and x.shape[-1] in (3, 4):
            t = _frames_to_tensor(x)
        else:
            t = to_tensor(x)
        return t if t.ndim == 4 else t[None]

    def label(self, pairs: Sequence[tuple]) -> list[int]:
        """``[(a, b), ...]`` frames (HxWx3 uint8 / (3,H,W) float) or clips -> labels in {0, 1, -1}."""
        out = []
        clips = [(self._clip(a), self._clip(b)) for a, b in pairs]
        self.queries += len(clips)
        if self.scorer is not None:
            flat = torch.cat([torch.cat([a, b]) for a, b in clips])
            scores = self.scorer(flat)
            k = 0
            for a, b in clips:
                sa = scores[k : k + len(a)].mean().item()
                k += len(a)
                sb = scores[k : k + len(b)].mean().item()
                k += len(b)
                # scores come from float32, so sa - sb and sa + sb are finite together; with margin >= 0, sa == sb is -1 before > vs >= matters
                out.append(-1 if abs(sa - sb) <= self.margin or not np.isfinite(sa - sb) else (0 if sa > sb else 1))  # pragma: no mutate: see above
            return out
        goal = self.goal if isinstance(self.goal, str) or self.goal is None else _prompt_list(self.goal)[0]
        for a, b in clips:
            try:
                r = self.judge(a, b, goal)
            except Exception as e:  # a judge that fails on one pair labels it "no preference"
                log.warning("preference judge failed: %s", e)
                r = None  # pragma: no mutate: any value outside (0, 1) labels the pair -1
            out.append(int(r) if r in (0, 1) else -1)
        return out


class PreferenceRewardModel(Reward):
    """Bradley-Terry reward ``r(s) = MLP(e(s))`` on frozen image embeddings ``e``.

    ``embed``: a CLIP-type reward (its image embeddings), any callable ``(B,3,H,W) -> (B, D)``,
    or None to take embeddings directly (``forward`` then expects ``(B, D)``). Trained with
    :meth:`fit` on labelled pairs: ``P(a > b) = sigmoid(R(a) - R(b))``, R of a clip the sum of
    its frames' rewards (Christiano et al. 2017, as RL-VLM-F does).
    """

    name = "preference_model"
    differentiable = False
    needs_prompt = False

    def __init__(self, embed=None, dim: Optional[int] = None, hidden: int = 64, seed: int = 0):
        super().__init__()
        if isinstance(embed, Reward):
            embed = ClipEmbedder(embed).images
        self.embed = embed
        self.dim: Optional[int] = None  # set by _build (now, or at the first forward / fit)
        self.hidden = int(hidden)
        self.seed = seed
        self.head: Optional[nn.Module] = None
        if dim is not None:
            self._build(dim)

    def _build(self, dim: int) -> None:
        g = torch.Generator().manual_seed(self.seed)
        head = nn.Sequential(nn.Linear(dim, self.hidden), nn.Tanh(), nn.Linear(self.hidden, 1))
        with torch.no_grad():
            for p in head.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / max(1, p.shape[-1]) ** 0.5))
        self.head = head
        self.dim = dim

    def features(self, x) -> torch.Tensor:
        if self.embed is None:
            return torch.as_tensor(x).float()
        with torch.no_grad():
            return self.embed(VLMPreferenceLabeler._clip(x)).float().cpu()

    def forward(self, images, prompts=None, **context):
        e = self.features(images)
        if self.head is None:
            self._build(e.shape[-1])
        e = e.to(next(self.head.parameters()).device)  # pragma: no mutate: placement, equivalent on CPU
        return self.head(e).squeeze(-1)

    def fit(self, pairs: Sequence[tuple], labels: Sequence[int], epochs: int = 100, lr: float = 1e-2,
            weight_decay: float = 1e-4, batch_size: int = 64, seed: int = 0) -> list[float]:
        """Train on ``pairs`` (frames, clips or embeddings) and ``labels`` (0/1; -1 skipped).
        Returns the loss per epoch."""
        keep = [(a, b, l) for (a, b), l in zip(pairs, labels) if l in (0, 1)]
        if not keep:
            raise RewardError("no usable preference labels (all -1)")
        n = len(keep)
        # every item as a clip (T, D): a single embedding (D,) is a clip of one frame
        feats = [self.features(x) for x in [a for a, _, _ in keep] + [b for _, b, _ in keep]]
        feats = [f.reshape(-1, f.shape[-1]) for f in feats]
        dims = {f.shape[1] for f in feats}
        if len(dims) != 1 or (self.dim is not None and dims != {self.dim}):
            raise RewardError(f"preference model: embeddings of size {sorted(dims)}, expected one size"
                              + (f" ({self.dim}, the model's)" if self.dim is not None else ""))
        if self.head is None:
            self._build(dims.pop())
        fa, fb = feats[:n], feats[n:]
        y = torch.tensor([float(l) for _, _, l in keep])  # 1: b preferred
        same = len({tuple(f.shape) for f in feats}) == 1
        if same:  # one tensor (N, T, D): a batched forward per step
            fa, fb = torch.stack(fa), torch.stack(fb)
        opt = torch.optim.Adam(self.head.parameters(), lr=lr, weight_decay=weight_decay)
        self.head.requires_grad_(True)
        rng = random.Random(seed)
        idx = list(range(len(keep)))
        losses = []
        self.head.train()
        for _ in range(int(epochs)):
            rng.shuffle(idx)
            total = 0.0
            for s in range(0, len(idx), batch_size):
                chunk = idx[s : s + batch_size]
                if same:
                    ra = self.head(fa[chunk]).sum(dim=(1, 2))  # (N, T, 1) -> the clip's reward (N,)
                    rb = self.head(fb[chunk]).sum(dim=(1, 2))
                else:
                    ra = torch.stack([self.head(fa[i]).sum() for i in chunk])
                    rb = torch.stack([self.head(fb[i]).sum() for i in chunk])
                loss = nn.functional.binary_cross_entropy_with_logits(rb - ra, y[chunk])
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += loss.item() * len(chunk)
            losses.append(total / len(idx))
        self.head.eval().requires_grad_(False)
        return losses

    @torch.no_grad()
    def accuracy(self, pairs: Sequence[tuple], labels: Sequence[int]) -> float:
        """Fraction of labelled pairs (0/1) whose preference the model reproduces."""
        hits = n = 0
        for (a, b), l in zip(pairs, labels):
            if l not in (0, 1):
                continue
            ra = self.head(self.features(a).reshape(-1, self.dim)).sum()
            rb = self.head(self.features(b).reshape(-1, self.dim)).sum()
            hits += int((rb > ra) == (l == 1))
            n += 1
        return hits / max(n, 1)


__all__ = [
    "ClipEmbedder",
    "FrameScorer",
    "PreferenceRewardModel",
    "RAPLReward",
    "VLMPreferenceLabeler",
    "VLMRewardVectorWrapper",
    "VLMRewardWrapper",
    "projection",
    "vlm_rm_reward",
]
