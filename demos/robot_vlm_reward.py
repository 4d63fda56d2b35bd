"""CartPole trained by PPO on a vision-language reward (VLM-RM): the policy never sees the env's
reward; each step's frame is scored by CLIP against a goal prompt, projected along the
baseline-to-goal direction (Rocamonde et al. 2024).

    # CPU, a couple of minutes: tiny random open_clip (shows the plumbing; the reward is noise)
    python demos/robot_vlm_reward.py --tiny

    # real CLIP weights (what VLM-RM used for CartPole: a ViT-bigG / ViT-L CLIP; ViT-B-32 is faster)
    python demos/robot_vlm_reward.py --clip-model ViT-B-32 --clip-pretrained openai \\
        --goal "pole vertically upright on top of the cart" --baseline "pole and cart" --alpha 1.0 --updates 60

    # the env's own reward, for comparison
    python demos/robot_vlm_reward.py --tiny --reward env

Prints per update the mean VLM reward per step and the true episode length (CartPole's own
measure of success: 500 is perfect), and writes summary.json.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny random open_clip checkpoint (CPU, offline)")
    ap.add_argument("--clip-model", default="ViT-B-32")
    ap.add_argument("--clip-pretrained", default="openai")
    ap.add_argument("--reward", choices=["vlm", "env"], default="vlm")
    ap.add_argument("--goal", default="pole vertically upright on top of the cart")
    ap.add_argument("--baseline", default="pole and cart")
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--num-envs", type=int, default=4)
    ap.add_argument("--rollout", type=int, default=128, help="steps per env per update")
    ap.add_argument("--updates", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    import gymnasium as gym
    import torch
    from torch import nn

    import rewards
    from vfeedback.integrations.gym import VLMRewardWrapper
    from vfeedback.integrations.tiny import write_tiny_open_clip

    t0 = time.time()
    torch.manual_seed(args.seed)
    out = Path(args.out or tempfile.mkdtemp(prefix="robot-vlm-"))
    out.mkdir(parents=True, exist_ok=True)
    venv = gym.make_vec("CartPole-v1", num_envs=args.num_envs, vectorization_mode="sync", render_mode="rgb_array")
    env = venv
    if args.reward == "vlm":
        if args.tiny:
            name, ckpt = write_tiny_open_clip(out / "tiny-clip")
            clip = rewards.load("clip", model=name, pretrained=ckpt)
        else:
            clip = rewards.load("clip", model=args.clip_model, pretrained=args.clip_pretrained,
                                device="cuda" if torch.cuda.is_available() else None)
        env = VLMRewardWrapper(venv, clip, goal=args.goal, baseline=args.baseline, alpha=args.alpha)

    obs_dim = env.single_observation_space.shape[0]
    n_act = env.single_action_space.n
    actor = nn.Sequential(nn.Linear(obs_dim, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, n_act))
    critic = nn.Sequential(nn.Linear(obs_dim, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
    opt = torch.optim.Adam([*actor.parameters(), *critic.parameters()], lr=args.lr, eps=1e-5)
    gamma, lam, clip_eps = 0.99, 0.95, 0.2
    # running std of returns: VLM rewards live on a narrow band (~0.2-0.3 for CLIP cosines)
    ret_rms, ret_acc = [1e-4, 0.0, 1.0], np.zeros(args.num_envs)

    obs, _ = env.reset(seed=args.seed)
    ep_len = np.zeros(args.num_envs, dtype=int)
    history = []
    T, N = args.rollout, args.num_envs
    for update in range(args.updates):
        buf_o, buf_a, buf_lp, buf_r, buf_d, buf_v = [], [], [], [], [], []
        finished, vlm_rewards = [], []
        for _ in range(T):
            o = torch.as_tensor(obs, dtype=torch.float32)
            with torch.no_grad():
                logits, v = actor(o), critic(o).squeeze(-1)
            dist = torch.distributions.Categorical(logits=logits)
            a = dist.sample()
            obs, r, term, trunc, info = env.step(a.numpy())
            if "vlm_reward" in info:
                vlm_rewards.extend(info["vlm_reward"][info["_vlm_reward"]].tolist())
            done = np.logical_or(term, trunc)
            ep_len += 1
            for i in np.nonzero(done)[0]:
                finished.append(int(ep_len[i]))
            ep_len[done] = 0
            # normalise by a running std of discounted returns (as SB3's VecNormalize does)
            ret_acc = ret_acc * gamma * (1 - done) + r
            for x in ret_acc:
                n, mean, var = ret_rms
                n1 = n + 1
                d = x - mean
                ret_rms = [n1, mean + d / n1, var + (d * (x - mean - d / n1) - var) / n1]
            buf_o.append(o); buf_a.append(a); buf_lp.append(dist.log_prob(a)); buf_v.append(v)
            buf_r.append(torch.as_tensor(r / np.sqrt(ret_rms[2] + 1e-8), dtype=torch.float32))
            buf_d.append(torch.as_tensor(term, dtype=torch.float32))
        # (next-step autoreset: the step after an episode end is a reset step with reward 0;
        # for this short demo we let GAE treat it as an ordinary transition)
        with torch.no_grad():
            next_v = critic(torch.as_tensor(obs, dtype=torch.float32)).squeeze(-1)
        adv = torch.zeros(T, N)
        last = torch.zeros(N)
        for t in reversed(range(T)):
            nv = next_v if t == T - 1 else buf_v[t + 1]
            delta = buf_r[t] + gamma * nv * (1 - buf_d[t]) - buf_v[t]
            last = delta + gamma * lam * (1 - buf_d[t]) * last
            adv[t] = last
        ret = adv + torch.stack(buf_v)
        O, A, LP = torch.stack(buf_o).reshape(T * N, -1), torch.stack(buf_a).reshape(-1), torch.stack(buf_lp).reshape(-1)
        ADV, RET = adv.reshape(-1), ret.reshape(-1)
        for _ in range(args.epochs):
            perm = torch.randperm(T * N)
            for s in range(0, T * N, 128):
                mb = perm[s : s + 128]
                d = torch.distributions.Categorical(logits=actor(O[mb]))
                ratio = (d.log_prob(A[mb]) - LP[mb]).exp()
                a_n = (ADV[mb] - ADV[mb].mean()) / (ADV[mb].std() + 1e-8)
                pg = -torch.min(ratio * a_n, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a_n).mean()
                vl = 0.5 * (critic(O[mb]).squeeze(-1) - RET[mb]).pow(2).mean()
                loss = pg + 0.5 * vl - 0.01 * d.entropy().mean()
                opt.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_([*actor.parameters(), *critic.parameters()], 0.5)
                opt.step()
        row = {"update": update + 1, "env_steps": (update + 1) * T * N,
               "episode_len": float(np.mean(finished)) if finished else None,
               "vlm_reward": float(np.mean(vlm_rewards)) if vlm_rewards else None, "elapsed_s": round(time.time() - t0, 1)}
        history.append(row)
        print(json.dumps(row), flush=True)
    lens = [h["episode_len"] for h in history if h["episode_len"] is not None]
    summary = {"reward": args.reward, "tiny": args.tiny, "alpha": args.alpha, "goal": args.goal, "baseline": args.baseline,
               "first_episode_len": lens[0] if lens else None, "last_episode_len": lens[-1] if lens else None,
               "env_steps": args.updates * T * N, "wall_s": round(time.time() - t0, 1), "history": history}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
