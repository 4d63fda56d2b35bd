"""DDPO and GRPO: the PPO-clip loss, the per-prompt stat tracker, group advantages and the KL
term on hand-computed cases; the training-time transition scoring equals the sampler's; one
update of each method moves its objective the right way; config checks. End-to-end, resume and
2-process runs are marked slow."""
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vfeedback.algorithms.ddpo import DDPO, PerPromptStatTracker, Samples, batch_advantages, gaussian_kl, policy_step, ppo_clip_loss
from vfeedback.algorithms.grpo import GRPO, group_advantages
from vfeedback.config import RunConfig
from vfeedback.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2", "conv_in", "conv_out"]


# ----------------------------------------------------------------------------- PPO-clip
def test_ppo_clip_loss_values_and_gradients_by_hand():
    clip, adv_max = 0.2, 5.0
    ratios = torch.tensor([1.1, 1.5, 1.5, 0.5, 1.0, 0.5])
    adv = torch.tensor([2.0, 2.0, -1.0, -1.0, 10.0, 2.0])
    old = torch.tensor([-1.0, 0.5, 0.0, 2.0, -3.0, 1.0])
    logp = (old + ratios.log()).requires_grad_(True)
    loss, ratio = ppo_clip_loss(logp, old, adv, clip, adv_max)
    assert ratio.detach().tolist() == pytest.approx(ratios.tolist(), abs=1e-6)
    # by hand, L = max(-A r, -A clamp(r, 0.8, 1.2)) with A clamped to [-5, 5]:
    #  0: A=2,  r=1.1 inside             -> -2.2
    #  1: A=2,  r=1.5 -> 1.2 binds       -> max(-3.0, -2.4) = -2.4 (gradient 0)
    #  2: A=-1, r=1.5: the unclipped term is the larger -> max(1.5, 1.2) = 1.5 (gradient kept)
    #  3: A=-1, r=0.5 -> 0.8 binds       -> max(0.5, 0.8) = 0.8 (gradient 0)
    #  4: A=10 clamped to 5, r=1         -> -5
    #  5: A=2,  r=0.5: unclipped larger  -> max(-1.0, -1.6) = -1.0
    assert loss.tolist() == pytest.approx([-2.2, -2.4, 1.5, 0.8, -5.0, -1.0], abs=1e-5)
    loss.sum().backward()
    # dL/dlogp = -A r where the unclipped term is active, 0 where the clip binds
    assert logp.grad.tolist() == pytest.approx([-2.2, 0.0, 1.5, 0.0, -5.0, -1.0], abs=1e-5)


# ----------------------------------------------------------------------------- advantages
def test_per_prompt_stat_tracker_buffer_and_min_count_by_hand():
    t = PerPromptStatTracker(buffer_size=3, min_count=2)
    adv = t.update(["a", "b", "a"], [1.0, 10.0, 3.0])
    # "a": its buffer [1, 3] has min_count 2 entries -> its own mean 2, std 1
    # "b": buffer [10] has 1 < 2 -> the batch's mean 14/3 and population std sqrt(14.888..) = 3.858612
    eps = 1e-6
    assert adv.tolist() == pytest.approx([-1 / (1 + eps), (10 - 14 / 3) / (math.sqrt(134 / 9) + eps), 1 / (1 + eps)], abs=1e-9)
    # the buffer persists across epochs and keeps the last 3: "a" -> [3, 5, 7], mean 5, std sqrt(8/3)
    adv = t.update(["a", "a"], [5.0, 7.0])
    assert adv.tolist() == pytest.approx([0.0, 2 / (math.sqrt(8 / 3) + eps)], abs=1e-9)
    assert list(t.stats["a"]) == [3.0, 5.0, 7.0] and list(t.stats["b"]) == [10.0]
    # the state round-trips (checkpoints) with its maxlen
    u = PerPromptStatTracker(3, 2)
    u.load_state_dict(json.loads(json.dumps(t.state_dict())))
    assert u.update(["a"], [9.0]).tolist() == t.update(["a"], [9.0]).tolist()
    assert list(u.stats["a"]) == [5.0, 7.0, 9.0]


def test_stat_tracker_leaves_nan_rewards_out():
    t = PerPromptStatTracker(buffer_size=8, min_count=1)
    adv = t.update(["a", "a", "a"], [1.0, float("nan"), 3.0])
    assert adv[1] == 0 and adv[0] == pytest.approx(-1 / (1 + 1e-6)) and list(t.stats["a"]) == [1.0, 3.0]
    assert batch_advantages([1.0, 3.0, float("nan")]).tolist() == pytest.approx([-1 / (1 + 1e-8), 1 / (1 + 1e-8), 0.0])


def test_group_advantages_by_hand():
    prompts = ["a", "b", "a", "b", "b"]
    r = [1.0, 0.0, 3.0, 3.0, 6.0]
    eps = 1e-4
    # "a": mean 2, std 1; "b": mean 3, population std sqrt(6)
    s6 = math.sqrt(6)
    assert group_advantages(prompts, r).tolist() == pytest.approx([-1 / (1 + eps), -3 / (s6 + eps), 1 / (1 + eps), 0.0, 3 / (s6 + eps)], abs=1e-9)
    # global_std: every group divided by the batch's std sqrt(4.24) (mean 2.6)
    g = math.sqrt(4.24)
    assert group_advantages(prompts, r, global_std=True).tolist() == pytest.approx(
        [-1 / (g + eps), -3 / (g + eps), 1 / (g + eps), 0.0, 3 / (g + eps)], abs=1e-9)
    # a group of equal rewards carries no signal
    assert group_advantages(["x", "x"], [0.7, 0.7]).tolist() == [0.0, 0.0]


# ----------------------------------------------------------------------------- KL
def test_gaussian_kl_by_hand_and_against_torch():
    mean = torch.tensor([[[[1.0, 3.0]]], [[[0.5, -0.5]]]], requires_grad=True)
    ref = torch.zeros(2, 1, 1, 2)
    std = torch.tensor([2.0, 0.5])
    kl = gaussian_kl(mean, ref, std)
    # row 0: mean((1, 9)) / (2 * 4) = 0.625; row 1: mean((0.25, 0.25)) / (2 * 0.25) = 0.5
    assert kl.tolist() == pytest.approx([0.625, 0.5], abs=1e-7)
    from torch.distributions import Normal, kl_divergence

    want = kl_divergence(Normal(mean.detach(), std.reshape(2, 1, 1, 1)), Normal(ref, std.reshape(2, 1, 1, 1))).mean(dim=(1, 2, 3))
    assert torch.allclose(kl, want, atol=1e-7)
    kl.sum().backward()  # descending it moves the policy mean toward the base's
    assert (mean.grad * mean.detach() > 0).all()


# ----------------------------------------------------------------------------- the method on the tiny model
def _cfg(algorithm="ddpo", **sec):
    return RunConfig.model_validate({
        "algorithm": algorithm, "output_dir": "unused", "model": {"family": "sd15", "path": "tiny:sd15", "resolution": 32},
        "reward": "color", "prompts": {"train": ["a red apple"]},
        "sampling": {"steps": 4, "guidance_scale": 3.0, "eta": 1.0}, algorithm: sec,
    })


def _method(model, cfg):
    import rewards
    from accelerate import Accelerator

    trainer = SimpleNamespace(model=model, reward=rewards.load("color"), acc=Accelerator(cpu=True), cfg=cfg)
    return (DDPO if cfg.algorithm == "ddpo" else GRPO)(cfg, trainer)


def _traj_logp(method, smp: Samples, which="current"):
    """log pi of every stored transition (R, T) under the current / base weights."""
    from vfeedback.sampling import ddim_timesteps

    m, s = method.trainer.model, method.cfg.sampling
    ts = ddim_timesteps(m, s.steps)
    R, T = smp.traj.shape[0], smp.traj.shape[1] - 1
    with torch.no_grad(), method.policy(which):
        return torch.stack([policy_step(m, smp.cond, smp.traj[:, k], ts[k].repeat(R), smp.traj[:, k + 1], num_steps=s.steps,
                                        guidance_scale=s.guidance_scale, eta=s.eta)[0] for k in range(T)], 1)


def test_training_transition_scores_the_sampler_exactly(fresh_sd15):
    """The stored sampling log-probs are what policy_step gives for the same weights, with each
    row at its own (shuffled) timestep in one UNet call: the first update's ratio is 1."""
    from vfeedback.sampling import ddim_timesteps, transition_log_prob

    cfg = _cfg("grpo", group_size=3)
    method = _method(fresh_sd15, cfg)
    gens = [torch.Generator().manual_seed(5)]
    smp = method.sample_micro(["a red apple"], gens, 0)
    assert smp.traj.shape[:2] == (3, 5) and smp.log_probs.shape == (3, 4) and len(smp.rewards) == 3
    assert not torch.equal(smp.traj[0, 0], smp.traj[1, 0])  # shared_noise off: independent x_T
    m, s = fresh_sd15, cfg.sampling
    ts = ddim_timesteps(m, s.steps)
    k = torch.tensor([2, 0, 3])  # a different step per row, one call
    lp, mean, std = policy_step(m, smp.cond, smp.traj[[0, 1, 2], k], ts[k], smp.traj[[0, 1, 2], k + 1], num_steps=s.steps,
                                guidance_scale=s.guidance_scale, eta=s.eta)
    assert torch.allclose(lp, smp.log_probs[[0, 1, 2], k], atol=1e-5, rtol=0)
    one = transition_log_prob(m, smp.cond.take([1]), smp.traj[[1], 0], ts[0], smp.traj[[1], 1], num_steps=s.steps,
                              guidance_scale=s.guidance_scale, eta=s.eta)
    assert torch.allclose(lp[1], one[0], atol=1e-5)
    assert (std > 0).all() and mean.shape == smp.traj[:3, 0].shape


def test_grpo_shared_noise_shares_the_initial_latent_only(fresh_sd15):
    method = _method(fresh_sd15, _cfg("grpo", group_size=2, shared_noise=True))
    smp = method.sample_micro(["a red apple"], [torch.Generator().manual_seed(5)], 0)
    assert torch.equal(smp.traj[0, 0], smp.traj[1, 0]) and not torch.equal(smp.traj[0, -1], smp.traj[1, -1])


def _one_update(method, smp, adv, lr=0.5):
    params = [p for p in method.trainer.model.unet.parameters() if p.requires_grad]
    mets = {}
    loss = method.learn(smp, torch.tensor(adv), torch.Generator().manual_seed(0), mets)
    assert loss.requires_grad is False and torch.isfinite(loss)
    assert all(p.grad is not None for p in params) and any(p.grad.abs().sum() > 0 for p in params)
    torch.optim.SGD(params, lr=lr).step()
    return mets


@pytest.mark.parametrize("algorithm", ["ddpo", "grpo"])
def test_one_update_raises_the_high_advantage_trajectory(fresh_sd15, algorithm):
    """Sample, score and normalise with the method itself (GRPO: one group of 3; DDPO: 3 draws
    of one prompt), one PPO update: the best sample's log-prob rises, the worst's falls."""
    from vfeedback.models import add_lora

    add_lora(fresh_sd15, 4, None, LORA_TARGETS)
    fresh_sd15.unet.train()
    sec = {"group_size": 3} if algorithm == "grpo" else {"min_count": 1}
    method = _method(fresh_sd15, _cfg(algorithm, clip_range=0.2, **sec))
    if algorithm == "grpo":
        smp = method.sample_micro(["a red apple"], [torch.Generator().manual_seed(3)], 0)
    else:
        smp = Samples.cat([method.sample_micro(["a red apple"], [torch.Generator().manual_seed(s)], n) for n, s in enumerate((3, 4, 5))])
    adv, mets = method.global_advantages(smp)
    assert mets["reward_mean"] == pytest.approx(float(smp.rewards.double().mean()), rel=1e-6)
    # both methods standardise over the prompt's 3 rewards (DDPO: min_count 1, the buffer is this batch)
    r = smp.rewards.double().numpy()
    want = (r - r.mean()) / (r.std() + (1e-4 if algorithm == "grpo" else 1e-6))
    assert adv.double().numpy() == pytest.approx(want, abs=1e-6)
    hi, lo = int(adv.argmax()), int(adv.argmin())
    before = _traj_logp(method, smp).sum(1)
    assert torch.allclose(before, smp.log_probs.sum(1), atol=1e-4)
    mets = _one_update(method, smp, adv.tolist())
    assert mets[f"{algorithm}/updates"] == 1 and mets[f"{algorithm}/ratio"] == pytest.approx(1.0, abs=1e-5)
    d = _traj_logp(method, smp).sum(1) - before
    assert d[hi] > 0 > d[lo], d


# slow: the default run's budget; the KL's value and gradient are pinned by the fast test above
@pytest.mark.slow
def test_kl_term_pulls_the_policy_back_to_the_base(fresh_sd15):
    """Zero advantages and kl_coef 1: the only gradient is the KL's, and one step lowers it."""
    from vfeedback.models import add_lora

    params = add_lora(fresh_sd15, 4, None, LORA_TARGETS)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # move the policy away from the base (LoRA B starts at 0)
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    fresh_sd15.unet.train()
    method = _method(fresh_sd15, _cfg("grpo", group_size=2, kl_coef=1.0))
    smp = method.sample_micro(["a red apple"], [torch.Generator().manual_seed(1)], 0)

    def kl():
        from vfeedback.sampling import ddim_timesteps

        m, s = fresh_sd15, method.cfg.sampling
        ts = ddim_timesteps(m, s.steps)
        out = []
        for k in range(s.steps):
            args = (m, smp.cond, smp.traj[:, k], ts[k].repeat(2), smp.traj[:, k + 1])
            kw = dict(num_steps=s.steps, guidance_scale=s.guidance_scale, eta=s.eta)
            with torch.no_grad():
                _, mu, std = policy_step(*args, **kw)
                with method.policy("ref"):
                    _, mu_ref, _ = policy_step(*args, **kw)
            out.append(gaussian_kl(mu, mu_ref, std))
        return torch.stack(out).mean()

    k0 = kl()
    mets = _one_update(method, smp, [0.0, 0.0], lr=1e-2)
    assert mets["grpo/kl"] == pytest.approx(float(k0), rel=1e-4)  # the logged KL is the base-relative one
    assert all(p.requires_grad for p in params)  # the adapter switch-off for the base left LoRA trainable
    assert kl() < k0


@pytest.mark.slow
def test_inner_updates_are_made_by_the_method_and_the_last_left_to_the_engine(fresh_sd15):
    """updates_per_epoch 2 x inner_epochs 2: three optimizer updates inside learn(), the fourth's
    gradients left accumulated for the engine."""
    from vfeedback.models import add_lora

    params = add_lora(fresh_sd15, 4, None, LORA_TARGETS)
    fresh_sd15.unet.train()
    method = _method(fresh_sd15, _cfg("grpo", group_size=2, updates_per_epoch=2, inner_epochs=2, timestep_fraction=0.5))
    calls = []
    opt = torch.optim.SGD(params, lr=0.1)
    method.trainer.__dict__.update(
        params=params, optimizer=opt, lr_scheduler=SimpleNamespace(step=lambda: calls.append("lr")), ema=None,
        _sync_outside_grads=lambda: None)
    orig = opt.step
    opt.step = lambda: (calls.append("opt"), orig())
    smp = method.sample_micro(["a red apple"], [torch.Generator().manual_seed(2)], 0)
    mets = {}
    method.learn(smp, torch.tensor([1.0, -1.0]), torch.Generator().manual_seed(0), mets)
    assert calls == ["opt", "lr"] * 3 and mets["grpo/updates"] == 4 and mets["grpo/timesteps"] == 2
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)  # the last update's, for the engine


@pytest.mark.parametrize("shaping", ["win_rate", pytest.param("par", marks=pytest.mark.slow)])
def test_a_grpo_step_trains_on_the_shaped_reward(fresh_sd15, shaping):
    """Rewards go through trainer.scalar_reward (vfeedback/reward_shaping.py) with a prompt's
    images as one group. win_rate: a group of 3 gets 0, 1/2, 1 in the raw reward's order; par:
    sigmoid(r - r_ref) with ONE reference per prompt draw, the base model's image from the draw's
    own "par-ref" seeds (PAR's reference: an independent base sample per prompt), so even with
    the policy equal to the base (LoRA B = 0) the advantages are not 0 and follow the raw order.
    (Rendering each sample's own seed made every image its reference: r' = 1/2, advantages 0.)"""
    import rewards

    from vfeedback.models import add_lora
    from vfeedback.reward_shaping import ScalarReward

    add_lora(fresh_sd15, 4, None, LORA_TARGETS)
    cfg = RunConfig.model_validate({**_cfg("grpo", group_size=3).model_dump(), "reward": {"rewards": [{"name": "color"}], "shaping": shaping}})
    method = _method(fresh_sd15, cfg)
    method.trainer.scalar_reward = ScalarReward(cfg, method.trainer.reward, None)
    smp = method.sample_micro(["a red apple"], [torch.Generator().manual_seed(3)], 0)
    with torch.no_grad():
        raw = rewards.load("color")(fresh_sd15.decode(smp.traj[:, -1]).float(), smp.prompts).double()
    assert len(set(raw.tolist())) == 3  # three different raw rewards
    adv, _ = method.global_advantages(smp)
    mets = method._score_metrics[-1]  # the guards' metrics of this sampling batch (train_step logs their mean)
    assert mets["reward_raw_mean"] == pytest.approx(float(raw.mean()), rel=1e-5)
    if shaping == "win_rate":
        want = torch.argsort(torch.argsort(raw)).double() / 2  # rank 0, 1, 2 -> 0, 1/2, 1
        assert smp.rewards.double().tolist() == pytest.approx(want.tolist(), abs=1e-12)
        assert (adv.argsort() == raw.argsort()).all()
    else:
        from vfeedback.engine import derive_seed
        from vfeedback.sampling import initial_latents, sample

        # the reference, rendered here from its documented seeds: base model (LoRA B = 0), the
        # draw's prompt, x_T from derive_seed(seed, "par-ref-latent"), noise from "par-ref-noise"
        s, m = cfg.sampling, fresh_sd15
        with torch.no_grad():
            cond = m.encode_prompt(["a red apple"], [cfg.prompts.negative], cfg=s.guidance_scale > 1)
            x_T = initial_latents(m, 1, torch.Generator().manual_seed(derive_seed(3, "par-ref-latent")))
            ref = sample(m, cond, num_steps=s.steps, guidance_scale=s.guidance_scale, eta=s.eta, latents=x_T,
                         generator=[torch.Generator().manual_seed(derive_seed(3, "par-ref-noise"))]).images.float()
            r_ref = float(rewards.load("color")(ref, ["a red apple"]).double())
        assert mets["reward_ref_mean"] == pytest.approx(r_ref, rel=1e-5)  # one image shared by the 3 rows
        assert all(abs(r_ref - v) > 1e-4 for v in raw.tolist())  # an independent draw, not a sample's own seed
        assert smp.rewards.double().tolist() == pytest.approx(torch.sigmoid(raw - r_ref).tolist(), abs=1e-5)
        assert (adv.argsort() == raw.argsort()).all() and adv.abs().max() > 0.5  # group-normalised: order kept, not all 0


# ----------------------------------------------------------------------------- config
def test_config_defaults_and_checks():
    c = RunConfig.model_validate({"algorithm": "ddpo", "output_dir": "x", "model": {"family": "sd15", "path": "tiny:sd15"},
                                  "reward": "color", "prompts": {"train": ["a"]}})
    assert (c.sampling.steps, c.sampling.guidance_scale, c.sampling.eta) == (50, 5.0, 1.0)
    assert (c.ddpo.clip_range, c.ddpo.adv_clip_max, c.ddpo.buffer_size, c.ddpo.min_count) == (1e-4, 5.0, 16, 16)
    base = {"output_dir": "x", "model": {"family": "sd15", "path": "tiny:sd15"}, "reward": "color", "prompts": {"train": ["a"]}}
    with pytest.raises(ValueError, match="eta > 0"):
        RunConfig.model_validate({**base, "algorithm": "grpo", "sampling": {"eta": 0.0}})
    with pytest.raises(ValueError, match=r"grpo.updates_per_epoch \(3\) must divide .* 8"):
        RunConfig.model_validate({**base, "algorithm": "grpo", "grpo": {"group_size": 4, "updates_per_epoch": 3}, "train": {"batch_size": 2}})
    with pytest.raises(ValueError, match="group_size"):
        RunConfig.model_validate({**base, "algorithm": "grpo", "grpo": {"group_size": 1}})
    with pytest.raises(UserError, match="model.lora.text_encoder"):
        DDPO.check_config(RunConfig.model_validate({**base, "algorithm": "ddpo", "model": {"family": "sd15", "path": "tiny:sd15",
                                                                                          "lora": {"text_encoder": True}}}))


def test_shipped_configs_validate_and_every_new_field_is_documented():
    """The schema and the method's own checks on every shipped config (`vfeedback validate` also
    loads the reward, whose sd15 / sdxl weights need a network), and --help-config lines."""
    from vfeedback.algorithms import get_method
    from vfeedback.config import describe_fields, load_config

    for algo in ("ddpo", "grpo"):
        for name in ("tiny", "shapes", "sd15", "sdxl"):
            cfg = load_config(ROOT / "configs" / algo / f"{name}.yaml")
            assert cfg.algorithm == algo and cfg.sampling.eta > 0
            get_method(algo).check_config(cfg)
    lines = {l.split(":")[0]: l for l in describe_fields()}
    for algo in ("ddpo", "grpo"):
        for f in ("clip_range", "adv_clip_max", "inner_epochs", "updates_per_epoch", "timestep_fraction", "kl_coef", "train_batch_size"):
            assert len(lines[f"{algo}.{f}"].split(":", 1)[1].split("[")[0].strip()) > 20, f
    for f in ("ddpo.stat_tracking", "ddpo.buffer_size", "ddpo.min_count", "grpo.group_size", "grpo.shared_noise", "grpo.global_std"):
        assert len(lines[f].split(":", 1)[1].split("[")[0].strip()) > 20, f


# ----------------------------------------------------------------------------- end to end (slow)
def _train(args, n=1):
    cmd = [sys.executable, "-m", "vfeedback", "train", *args] + (["--num-processes", str(n)] if n > 1 else [])
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]


def _lora(out):
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "lora" / "pytorch_lora_weights.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("algorithm,shaping", [("ddpo", "none"), ("grpo", "none"), ("grpo", "par")])
def test_two_process_matches_one_process(tmp_path, algorithm, shaping):
    """Per-prompt statistics and group advantages over the GLOBAL batch: 2 processes x 1 prompt
    equal 1 process x 2 prompts (the same global batch), weights and metrics. DDPO's only
    prompt makes both processes' rewards one statistic; min_count 1 uses its buffer at once.
    par: each prompt draw's reference image comes from the draw's own seeds, whichever process
    renders it."""
    from tests.test_multiprocess import TRAINED_REL, WEIGHT_ATOL

    common = [f"configs/{algorithm}/tiny.yaml", "train.max_steps=2", "sampling.steps=4", "prompts.train=[a red apple]",
              "train.adam_eps=1e-4", "train.max_grad_norm=null", f"{algorithm}.updates_per_epoch=1", "log.checkpoint_every=0"]
    if shaping != "none":
        common.append('reward={"rewards": [{"name": "color"}], "shaping": "%s"}' % shaping)
    if algorithm == "ddpo":
        common.append("ddpo.min_count=1")
    one, two = tmp_path / "one", tmp_path / "two"
    _train(common + [f"output_dir={one}", "train.batch_size=2"])
    _train(common + [f"output_dir={two}", "train.batch_size=1"], n=2)
    a, b = _lora(one), _lora(two)
    assert any(v.abs().sum() > 0 for k, v in a.items() if ".lora_B." in k)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=WEIGHT_ATOL), k
    ma = [json.loads(l) for l in (one / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(l) for l in (two / "metrics.jsonl").read_text().splitlines()]
    for ra, rb in zip(ma, mb):
        for k in ("reward_mean", "reward_std", f"{algorithm}/advantage_abs_mean") + (("reward_ref_mean",) if shaping == "par" else ()):
            assert ra[k] == pytest.approx(rb[k], rel=TRAINED_REL), k
    assert json.loads((two / "summary.json").read_text())["replicas_identical"] is True


@pytest.mark.slow
def test_ddpo_resume_restores_the_stat_tracker(tmp_path):
    """A run stopped after epoch 1 and resumed equals an uninterrupted one: the per-prompt
    buffers (the checkpoint's method_state.safetensors) carry over."""
    common = ["configs/ddpo/tiny.yaml", "sampling.steps=4", "ddpo.min_count=1", "ddpo.updates_per_epoch=1",
              "train.adam_eps=1e-4", "log.checkpoint_every=1"]
    full, part = tmp_path / "full", tmp_path / "part"
    _train(common + [f"output_dir={full}", "train.max_steps=2"])
    _train(common + [f"output_dir={part}", "train.max_steps=1"])
    from safetensors import safe_open

    with safe_open(str(part / "checkpoints" / "step-000001" / "method_state.safetensors"), framework="pt") as h:
        st = json.loads(h.metadata()["json"])
    assert sum(len(v) for v in st["tracker"]["stats"].values()) == 4  # 2 batches x 2 prompts scored in epoch 1
    _train(common + [f"output_dir={part}", "train.max_steps=2", "--resume"])
    a, b = _lora(full), _lora(part)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-6), k
