"""The DDIM sampler: log-prob against the closed-form Gaussian, determinism, grad window."""
import math

import pytest
import torch

from vfeedback.errors import UserError
from vfeedback.sampling import GradWindow, _alpha, ddim_step, ddim_timesteps, sample, transition_log_prob, x0_clip


def test_ddim_step_log_prob_matches_closed_form_gaussian():
    torch.manual_seed(0)
    x_t = torch.randn(3, 4, 5, 5)
    eps = torch.randn(3, 4, 5, 5)
    a_t, a_prev, eta = torch.tensor(0.6), torch.tensor(0.8), 1.0
    noise = torch.randn(3, 4, 5, 5)
    prev, lp, x0, mean, std = ddim_step(eps, x_t, a_t, a_prev, eta, noise=noise)
    # closed form, written independently of the implementation
    x0_ref = (x_t - math.sqrt(0.4) * eps) / math.sqrt(0.6)
    var = (1 - 0.8) / (1 - 0.6) * (1 - 0.6 / 0.8)
    sd = eta * math.sqrt(var)
    mean_ref = math.sqrt(0.8) * x0_ref + math.sqrt(1 - 0.8 - sd**2) * eps
    assert torch.allclose(x0, x0_ref, atol=1e-5)
    assert torch.allclose(mean, mean_ref, atol=1e-5)
    assert std.item() == pytest.approx(sd, rel=1e-5)
    assert torch.allclose(prev, mean_ref + sd * noise, atol=1e-5)
    dist = torch.distributions.Normal(mean_ref, sd)
    lp_ref = dist.log_prob(prev).mean(dim=(1, 2, 3))
    assert torch.allclose(lp, lp_ref, atol=1e-5)


def test_ddim_step_by_hand_at_eta_one_half():
    """One element, numbers worked out by hand: x_t = 1, eps = 0.5, a_t = 0.6, a_t' = 0.8,
    eta = 0.5, z = 2.
    x0   = (1 - sqrt(0.4) * 0.5) / sqrt(0.6)                  = 0.8827462
    s^2  = 0.5^2 * (0.2 / 0.4) * (1 - 0.6 / 0.8) = 0.25 * 0.125 = 0.03125,  s = 0.1767767
    mu   = sqrt(0.8) * x0 + sqrt(1 - 0.8 - 0.03125) * 0.5     = 0.9949481
    x_t' = mu + s * 2                                         = 1.3485015
    log p = -z^2 / 2 - log s - log(2 pi) / 2 = -2 + 1.7328680 - 0.9189385 = -1.1860705
    """
    one = lambda v: torch.full((1, 1, 1, 1), v)
    prev, lp, x0, mean, std = ddim_step(one(0.5), one(1.0), 0.6, 0.8, 0.5, noise=one(2.0))
    assert x0.item() == pytest.approx(0.8827462, abs=1e-6)
    assert std.item() == pytest.approx(0.1767767, abs=1e-6)
    assert mean.item() == pytest.approx(0.9949481, abs=1e-6)
    assert prev.item() == pytest.approx(1.3485015, abs=1e-6)
    assert lp.item() == pytest.approx(-1.1860705, abs=1e-5)
    # the same transition scored from the stored sample (D3PO's recomputation)
    _, lp2, *_ = ddim_step(one(0.5), one(1.0), 0.6, 0.8, 0.5, prev_sample=prev)
    assert lp2.item() == pytest.approx(-1.1860705, abs=1e-5)
    # v-prediction: x0 = sqrt(a) x - sqrt(1 - a) v, eps = sqrt(a) v + sqrt(1 - a) x
    _, _, x0v, meanv, _ = ddim_step(one(0.5), one(1.0), 0.6, 0.8, 0.0, prediction_type="v_prediction")
    x0_ref, eps_ref = math.sqrt(0.6) - math.sqrt(0.4) * 0.5, math.sqrt(0.6) * 0.5 + math.sqrt(0.4)
    assert x0v.item() == pytest.approx(x0_ref, abs=1e-6)
    assert meanv.item() == pytest.approx(math.sqrt(0.8) * x0_ref + math.sqrt(0.2) * eps_ref, abs=1e-6)


def test_eta_one_is_the_ddpm_ancestral_step():
    """At eta 1 the DDIM step is diffusers' DDPMScheduler.step on the same timesteps (what the
    ReFL and IterComp references sample with), to float32 rounding, for every step but the last
    (there DDPM takes a_t' = 1, we clamp to alphas_cumprod[0]; ReFL never takes that transition)."""
    from diffusers import DDPMScheduler

    from vfeedback.models.tiny import _scheduler

    ddim = _scheduler()
    ddpm = DDPMScheduler.from_config(ddim.config)
    ddpm.set_timesteps(10)
    ddim.set_timesteps(10)
    assert torch.equal(ddpm.timesteps, ddim.timesteps)
    m = type("M", (), {})()
    m.scheduler = ddim
    torch.manual_seed(2)
    x, eps = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    for t in ddpm.timesteps[:-1]:
        ref = ddpm.step(eps, t, x, generator=torch.Generator().manual_seed(int(t))).prev_sample
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(int(t)))
        ours, *_ = ddim_step(eps, x, _alpha(m, t), _alpha(m, t - 100), 1.0, noise=noise)
        assert torch.allclose(ours, ref, atol=1e-5, rtol=1e-5), int(t)


def test_ddim_step_matches_diffusers_scheduler_step():
    from diffusers import DDIMScheduler

    sch = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    sch.set_timesteps(10)
    torch.manual_seed(1)
    x, eps = torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    for t in sch.timesteps[[0, 5, 9]]:
        prev_t = t - 1000 // 10
        a_t = sch.alphas_cumprod[t]
        a_prev = sch.alphas_cumprod[prev_t] if prev_t >= 0 else sch.final_alpha_cumprod
        ours, *_ = ddim_step(eps, x, a_t, a_prev, eta=0.0)
        ref = sch.step(eps, t, x, eta=0.0).prev_sample
        assert torch.allclose(ours, ref, atol=1e-5)


def test_eta_zero_has_no_log_prob_and_is_deterministic(tiny_sd15):
    cond = tiny_sd15.encode_prompt(["a red ball"], cfg=True)
    g = lambda: torch.Generator().manual_seed(3)
    a = sample(tiny_sd15, cond, num_steps=4, guidance_scale=3.0, eta=0.0, generator=g(), log_probs=True)
    b = sample(tiny_sd15, cond, num_steps=4, guidance_scale=3.0, eta=0.0, generator=g())
    assert torch.equal(a.images, b.images)
    assert torch.isnan(a.log_probs).all()


def test_trajectory_and_log_probs_shapes_and_recompute(tiny_sd15):
    cond = tiny_sd15.encode_prompt(["a red ball", "a blue cube"], cfg=True)
    out = sample(tiny_sd15, cond, num_steps=5, guidance_scale=4.0, eta=1.0, generator=torch.Generator().manual_seed(0),
                 return_trajectory=True, log_probs=True)
    assert out.images.shape == (2, 3, 64, 64) and 0 <= out.images.min() and out.images.max() <= 1
    assert out.trajectory.shape == (2, 6, 4, 16, 16)
    assert out.log_probs.shape == (2, 5) and torch.isfinite(out.log_probs).all()
    # recomputing a stored transition's log-prob under the same weights gives the same value
    for i in (0, 3):
        lp = transition_log_prob(tiny_sd15, cond, out.trajectory[:, i], out.timesteps[i], out.trajectory[:, i + 1],
                                 num_steps=5, guidance_scale=4.0, eta=1.0)
        assert torch.allclose(lp, out.log_probs[:, i], atol=1e-4)


def test_generator_list_makes_each_image_depend_only_on_its_seed(tiny_sd15):
    gen = lambda s: torch.Generator().manual_seed(s)
    c2 = tiny_sd15.encode_prompt(["a red ball", "a blue cube"], cfg=False)
    c1 = tiny_sd15.encode_prompt(["a blue cube"], cfg=False)
    both = sample(tiny_sd15, c2, num_steps=3, guidance_scale=1.0, eta=1.0, generator=[gen(1), gen(2)])
    one = sample(tiny_sd15, c1, num_steps=3, guidance_scale=1.0, eta=1.0, generator=[gen(2)])
    assert torch.allclose(both.images[1], one.images[0], atol=1e-5)


def _lora_grads(model, window, steps=6):
    from vfeedback.models import add_lora

    params = add_lora(model, rank=2)
    cond = model.encode_prompt(["a red ball"], cfg=False)
    calls = []
    hook = model.unet.register_forward_hook(lambda m, i, o: calls.append(torch.is_grad_enabled()))
    out = sample(model, cond, num_steps=steps, guidance_scale=1.0, eta=0.0, generator=torch.Generator().manual_seed(0), grad=window)
    hook.remove()
    out.images.mean().backward()
    got = [p.grad is not None and p.grad.abs().sum() > 0 for p in params]
    return calls, out, any(got)


def test_grad_window_refl_keeps_graph_only_at_stop_step(fresh_sd15):
    calls, out, has_grad = _lora_grads(fresh_sd15, GradWindow.refl(3))
    # steps 0..2 without grad, step 3 with grad, then stop: 4 UNet calls
    assert calls == [False, False, False, True]
    assert out.steps_run == 4 and out.images.requires_grad and has_grad


def test_grad_window_last_k(fresh_sd15):
    calls, out, has_grad = _lora_grads(fresh_sd15, GradWindow.last(2, 6))
    assert calls == [False, False, False, False, True, True]
    assert has_grad


def test_grad_window_none_has_no_graph(fresh_sd15):
    cond = fresh_sd15.encode_prompt(["a"], cfg=False)
    out = sample(fresh_sd15, cond, num_steps=3, guidance_scale=1.0, generator=torch.Generator().manual_seed(0))
    assert not out.images.requires_grad


def test_sdxl_sampling_uses_added_conditioning(tiny_sdxl):
    cond = tiny_sdxl.encode_prompt(["a red ball"], cfg=True)
    assert cond.pooled is not None and cond.time_ids.shape == (1, 6)
    assert cond.embeds.shape[-1] == 64  # both encoders concatenated
    out = sample(tiny_sdxl, cond, num_steps=3, guidance_scale=5.0, eta=1.0, generator=torch.Generator().manual_seed(0), log_probs=True)
    assert out.images.shape == (1, 3, 64, 64) and torch.isfinite(out.log_probs).all()


def test_timesteps_are_descending_and_alpha_final():
    from vfeedback.models.loader import DiffusionModel

    class M:  # minimal stand-in exposing a scheduler
        pass

    from diffusers import DDIMScheduler

    m = M()
    m.scheduler = DDIMScheduler(set_alpha_to_one=False, steps_offset=1)
    assert _alpha(m, torch.tensor(-19)).item() == pytest.approx(m.scheduler.alphas_cumprod[0].item())
    # set_alpha_to_one (diffusers' DDIM default) is not followed: the previous timestep is
    # clamped to 0 as in ddpo-pytorch / d3po, so the last step keeps a non-zero std
    m.scheduler = DDIMScheduler(set_alpha_to_one=True, steps_offset=1)
    assert _alpha(m, torch.tensor(-19)).item() == pytest.approx(m.scheduler.alphas_cumprod[0].item())
    assert _alpha(m, torch.tensor(0)).item() == pytest.approx(m.scheduler.alphas_cumprod[0].item())


def _with_scheduler(model, **over):
    from diffusers import DDIMScheduler

    model.pipe.scheduler = DDIMScheduler.from_config(model.scheduler.config, **over)
    return model


def test_last_step_log_prob_is_finite_with_set_alpha_to_one(fresh_sd15):
    """diffusers' DDIM default (set_alpha_to_one: true) would give the last step std 0 and a NaN
    log-prob, so D3PO could not train it; with the clamp every step has a log-prob, and the
    stored last transition is scored the same when recomputed."""
    m = _with_scheduler(fresh_sd15, set_alpha_to_one=True)
    cond = m.encode_prompt(["a red ball"], cfg=False)
    out = sample(m, cond, num_steps=4, guidance_scale=1.0, eta=1.0, generator=torch.Generator().manual_seed(0),
                 return_trajectory=True, log_probs=True)
    assert torch.isfinite(out.log_probs).all()
    lp = transition_log_prob(m, cond, out.trajectory[:, 3], out.timesteps[3], out.trajectory[:, 4], num_steps=4,
                             guidance_scale=1.0, eta=1.0)
    assert torch.allclose(lp, out.log_probs[:, 3], atol=1e-4)


def test_clip_sample_is_applied_as_diffusers_does():
    from diffusers import DDIMScheduler

    sch = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=True,
                        clip_sample_range=0.5, set_alpha_to_one=False, steps_offset=1)
    sch.set_timesteps(10)
    torch.manual_seed(4)
    x, eps = 3 * torch.randn(2, 4, 6, 6), torch.randn(2, 4, 6, 6)
    m = type("M", (), {})()
    m.scheduler = sch
    assert x0_clip(m) == 0.5
    for t in sch.timesteps[[0, 5]]:
        ref = sch.step(eps, t, x, eta=0.0)
        prev, _, x0, _, _ = ddim_step(eps, x, _alpha(m, t), _alpha(m, t - 100), 0.0, clip=x0_clip(m))
        assert x0.abs().max() <= 0.5 and torch.allclose(x0, ref.pred_original_sample, atol=1e-5)
        assert torch.allclose(prev, ref.prev_sample, atol=1e-5)
        unclipped, *_ = ddim_step(eps, x, _alpha(m, t), _alpha(m, t - 100), 0.0)
        assert not torch.allclose(unclipped, ref.prev_sample, atol=1e-3)


def test_thresholding_is_refused_with_a_message(fresh_sd15):
    m = _with_scheduler(fresh_sd15, thresholding=True)
    with pytest.raises(UserError, match="thresholding"):
        sample(m, m.encode_prompt(["a"], cfg=False), num_steps=2, guidance_scale=1.0)


# ---------------------------------------------------------------- no host synchronisation in the loop (#21)

#: Tensor methods that read a value back to the host (a CUDA synchronisation: what
#: ``torch.cuda.set_sync_debug_mode("error")`` refuses), and CPU-side draws / tensor builds that
#: a CUDA loop would have to copy to the device with a blocking transfer
HOST_READS = {"__bool__", "item", "tolist", "numpy", "cpu", "__int__", "__float__", "__index__", "nonzero", "is_nonzero", "equal"}
HOST_BUILDS = {"randn", "rand", "tensor"}


class _LoopRecorder:
    """Records, from the first UNet call of a sampling run on, every torch call that would make
    the host wait on a CUDA device (``HOST_READS``), every CPU draw or tensor built from host
    data (``HOST_BUILDS``, and ``as_tensor`` of anything but a tensor), with the module that made
    it. A CPU stand-in for the ``gpu`` test below: the CPU has no stream to wait for, so it looks at
    what the loop asks for instead."""

    def __init__(self, model):
        from torch.overrides import TorchFunctionMode

        self.calls, self.in_loop, rec = [], False, self

        class Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                name = getattr(func, "__name__", "")
                if rec.in_loop and (name in HOST_READS or name in HOST_BUILDS
                                    or (name == "as_tensor" and args and not isinstance(args[0], torch.Tensor))):
                    import sys

                    rec.calls.append((name, sys._getframe(1).f_globals.get("__name__")))
                return func(*args, **(kwargs or {}))

        self.mode = Mode()
        self.hook = model.unet.register_forward_pre_hook(lambda *a: setattr(self, "in_loop", True))

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)
        self.hook.remove()


SYNC_FREE_CASES = [
    ("sd15", dict(eta=1.0, log_probs=True, return_trajectory=True)),  # D3PO / DDPO / GRPO rollouts
    ("sd15", dict(eta=0.0, grad=GradWindow.refl(2))),  # ReFL
    ("sd15", dict(eta=1.0, grad=GradWindow.last(2, 4), unet_checkpoint=True, vae_checkpoint=True)),  # DRaFT-K
    ("sdxl", dict(eta=1.0, log_probs=True)),
]


@pytest.mark.parametrize("family,kw", SYNC_FREE_CASES, ids=["rollout", "refl", "draft", "sdxl"])
def test_sampling_loop_reads_nothing_back_to_the_host(family, kw, tiny_sd15, tiny_sdxl):
    m = tiny_sd15 if family == "sd15" else tiny_sdxl
    cond = m.encode_prompt(["a red ball", "a cat"], cfg=True)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    with _LoopRecorder(m) as rec:
        out = sample(m, cond, num_steps=4, guidance_scale=5.0, generator=gens, **kw)
    assert rec.in_loop and out.images is not None
    assert rec.calls == []


def test_the_recorder_sees_the_host_reads_the_loop_used_to_make(tiny_sd15):
    """The stand-in can fail: a step that branches on a device value (``std > 0``), looks its
    alphas up through ``.cpu()`` and draws its noise on the CPU, as the loop did before #21, is
    caught, once per step."""
    from vfeedback.sampling import predict_noise, randn, step_gap

    m = tiny_sd15
    cond = m.encode_prompt(["a"], cfg=False)
    ts = ddim_timesteps(m, 3)
    gap, g = step_gap(m.scheduler.config.num_train_timesteps, 3), torch.Generator().manual_seed(0)
    x = randn((1, *m.latent_shape), g, m.device)
    with _LoopRecorder(m) as rec:
        for t in ts:
            out = predict_noise(m, x, t, cond, 1.0)
            x = ddim_step(out, x, _alpha(m, t), _alpha(m, t - gap), 1.0, noise=randn(x.shape, g, x.device))[0]
    names = [n for n, _ in rec.calls]
    assert names.count("__bool__") == 3  # ddim_step's own std > 0, once per step
    assert names.count("cpu") == 2 * 3  # _alpha's .cpu(), for a_t and a_t' each step
    assert names.count("randn") == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family,kw", SYNC_FREE_CASES, ids=["rollout", "refl", "draft", "sdxl"])
def test_sampling_loop_makes_no_cuda_synchronisation(family, kw):
    """The loop, from its first UNet call to the decoded images, under
    ``torch.cuda.set_sync_debug_mode("error")``: any host synchronisation raises."""
    from vfeedback.models import load_model

    m = load_model(family, f"tiny:{family}", device=torch.device("cuda"))
    cond = m.encode_prompt(["a red ball", "a cat"], cfg=True)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    ref = sample(m, cond, num_steps=4, guidance_scale=5.0, generator=gens, **kw)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    hook = m.unet.register_forward_pre_hook(lambda *a: torch.cuda.set_sync_debug_mode("error"))
    try:
        out = sample(m, cond, num_steps=4, guidance_scale=5.0, generator=gens, **kw)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        hook.remove()
    assert torch.equal(out.images, ref.images)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("steps", [4, 1000])
def test_step_coefficients_are_the_per_step_values(fresh_sd15, eta, steps):
    """The schedule computed once per run equals what each step computed for itself: a_t, a_t'
    (``_alpha``, float32) and whether the step's std is positive; without a steps offset the
    last step (t = 0, t' clamped to 0) has std 0 at any eta, so the flag is not all-or-nothing."""
    from vfeedback.sampling import step_coefficients, step_gap

    m = _with_scheduler(fresh_sd15, steps_offset=0)
    ts = ddim_timesteps(m, steps)
    gap = step_gap(m.scheduler.config.num_train_timesteps, steps)
    co = step_coefficients(m, ts, gap, eta, m.device)
    assert torch.equal(co.timesteps, ts) and co.a_t.dtype == co.a_prev.dtype == torch.float32
    x = torch.zeros(1, 1)
    want = []
    for i, t in enumerate(ts):
        assert co.a_t[i].item() == torch.tensor(_alpha(m, t).item(), dtype=torch.float32).item()
        assert co.a_prev[i].item() == torch.tensor(_alpha(m, t - gap).item(), dtype=torch.float32).item()
        want.append(bool(ddim_step(x, x, _alpha(m, t), _alpha(m, t - gap), eta, noise=x)[4] > 0))
    assert list(co.stochastic) == want
    assert sum(want) == (0 if eta == 0 else steps - 1) and not want[-1]


@pytest.mark.parametrize("per_row", [True, False])
def test_noise_drawn_up_front_is_the_per_step_draw(tiny_sd15, per_row):
    """The noise drawn before the loop is what drawing it step by step gives: a loop written by
    hand (latents, then each step's noise from the same generators, in order) reaches the same
    trajectory and log-probs; a step that reused another step's noise would not."""
    from vfeedback.sampling import predict_noise, randn, step_gap

    m = tiny_sd15
    cond = m.encode_prompt(["a red ball", "a cat"], cfg=True)
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(2)] if per_row else torch.Generator().manual_seed(7)
    out = sample(m, cond, num_steps=4, guidance_scale=5.0, eta=1.0, generator=gens(), return_trajectory=True, log_probs=True)
    g = gens()
    x = randn((2, *m.latent_shape), g, m.device)
    ts = ddim_timesteps(m, 4)
    gap = step_gap(m.scheduler.config.num_train_timesteps, 4)
    traj, lps = [x], []
    for t in ts:
        eps = predict_noise(m, x, t, cond, 5.0)
        x, lp, _, _, _ = ddim_step(eps, x, _alpha(m, t), _alpha(m, t - gap), 1.0, noise=randn(x.shape, g, x.device))
        traj.append(x)
        lps.append(lp)
    assert torch.equal(out.trajectory, torch.stack(traj, dim=1))
    assert torch.equal(out.log_probs, torch.stack(lps, dim=1))
