"""The DDIM sampler: log-prob against the closed-form Gaussian, determinism, grad window."""
import math

import pytest
import torch

from vfeedback.sampling import GradWindow, _alpha, ddim_step, ddim_timesteps, sample, transition_log_prob


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
