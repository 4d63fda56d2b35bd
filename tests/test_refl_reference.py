"""ReFL against its reference: the loss and stop-step draw by hand, one training step against
ImageReward's ReFL loop written out here with diffusers' real DDPMScheduler, and one optimizer
step that must raise the reward.

The reference loop (THUDM/ImageReward ``ImageReward/ReFL.py``, ``Trainer.train`` lines 711-756):
``DDPMScheduler.set_timesteps(40)``; ``mid = random.randint(30, 39)``; ``mid`` ancestral steps
without grad, conditional UNet only (no classifier-free guidance); one UNet call with grad at
``timesteps[mid]`` and ``step(...).pred_original_sample``; VAE decode; ``relu(2 - reward)``
mean times ``grad_scale``.
"""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import rewards
from vfeedback.algorithms.refl import ReFL, draw_stop_step, refl_loss
from vfeedback.config import RunConfig
from vfeedback.sampling import randn

PROMPTS = ["a red apple", "a blue lake"]
SEEDS = [11, 12]


# ----------------------------------------------------------------------------- by hand
def test_refl_loss_by_hand():
    r = torch.tensor([0.5, 3.0, -1.0, float("nan")])
    # finite rewards 0.5, 3.0, -1.0: relu(2 - r) = 1.5, 0, 3.0; mean 1.5; times 1e-3
    assert refl_loss(r, 2.0, 1e-3).item() == pytest.approx(1.5e-3, rel=1e-6)
    assert refl_loss(torch.tensor([1.25]), 2.0, 0.5).item() == pytest.approx(0.375, rel=1e-6)
    assert refl_loss(torch.tensor([2.5, 4.0]), 2.0, 1.0).item() == 0.0  # above the margin: no loss
    assert math.isnan(refl_loss(torch.tensor([float("nan")] * 2), 2.0, 1.0).item())
    # the gradient: d/dr relu(m - r).mean() * s = -s / n for each r below the margin, 0 above
    x = torch.tensor([0.0, 1.0, 3.0], requires_grad=True)
    refl_loss(x, 2.0, 0.3).backward()
    assert x.grad.tolist() == pytest.approx([-0.1, -0.1, 0.0], abs=1e-7)


def test_stop_step_is_drawn_from_both_ends_inclusive():
    seen = {draw_stop_step((3, 5), torch.Generator().manual_seed(s)) for s in range(200)}
    assert seen == {3, 4, 5}
    assert {draw_stop_step((7, 7), torch.Generator().manual_seed(s)) for s in range(5)} == {7}


# ----------------------------------------------------------------------------- the reference loop
def _cfg(stop, steps=8, **over):
    data = {
        "algorithm": "refl", "output_dir": "unused",
        "model": {"family": "sd15", "path": "tiny:sd15", "lora": {"rank": 4}},
        "reward": "color", "prompts": {"train": PROMPTS},
        "sampling": {"steps": steps, "guidance_scale": 1.0, "eta": 1.0},
        "refl": {"stop_range": [stop, stop], "margin": 2.0, "grad_scale": 1e-3},
    }
    for k, v in over.items():
        data[k].update(v)
    return RunConfig.model_validate(data)


@pytest.fixture(scope="module")
def _shared():
    from vfeedback.models import add_lora, load_model

    m = load_model("sd15", "tiny:sd15")
    return m, add_lora(m, rank=4), rewards.load("color")


@pytest.fixture
def lora_model(_shared):
    """The module's tiny SD1.5 with a LoRA set to fixed non-zero weights (A and B both, so every
    LoRA weight has a gradient), reset for each test."""
    m, params, reward = _shared
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            p.grad = None
    return m, params, reward


def _reference_loss(m, reward, stop, steps, margin=2.0, grad_scale=1e-3):
    """ImageReward's ReFL step (module docstring), on our tiny model, with diffusers' DDPMScheduler.

    Noise: the reference draws x_T with ``torch.randn`` and the ancestral noise inside
    ``DDPMScheduler.step``; here both come from per-image generators (the same draws our sampler
    makes), so the two computations can be compared number for number."""
    from diffusers import DDPMScheduler

    sch = DDPMScheduler.from_config(m.scheduler.config)
    sch.set_timesteps(steps)
    timesteps = sch.timesteps
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    latents = randn((len(PROMPTS), *m.latent_shape), gens, "cpu")
    tok = m.pipe.tokenizer(PROMPTS, padding="max_length", max_length=m.pipe.tokenizer.model_max_length, truncation=True,
                           return_tensors="pt")
    with torch.no_grad():
        hs = m.pipe.text_encoder(tok.input_ids)[0]
    for t in timesteps[:stop]:
        with torch.no_grad():
            noise_pred = m.unet(sch.scale_model_input(latents, t), t, encoder_hidden_states=hs).sample
            latents = sch.step(noise_pred, t, latents, generator=gens).prev_sample
    t = timesteps[stop]
    noise_pred = m.unet(sch.scale_model_input(latents, t), t, encoder_hidden_states=hs).sample
    x0 = sch.step(noise_pred, t, latents, generator=gens).pred_original_sample
    image = m.vae.decode(x0 / m.vae.config.scaling_factor).sample
    image = (image / 2 + 0.5).clamp(0, 1)
    r = reward(image, PROMPTS)
    return F.relu(-r + margin).mean() * grad_scale, r


def _grads(params):
    out = [p.grad.detach().clone() for p in params]
    for p in params:
        p.grad = None
    return torch.cat([g.reshape(-1) for g in out])


@pytest.mark.parametrize("stop", [3, 5])
def test_refl_step_equals_the_reference_loop_with_ddpm(stop, lora_model):
    """eta 1 and no CFG: our DDIM sampler and ReFL step are the reference's DDPM loop. Same loss,
    same LoRA gradient, to float32 rounding (the two compute the same posterior mean by
    different, algebraically equal formulas)."""
    steps = 6  # stop 5: the last index, the x0 prediction at the final timestep
    m, params, reward = lora_model
    refl = ReFL(_cfg(stop, steps), SimpleNamespace(model=m, reward=reward))
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    loss, mets = refl.train_step(PROMPTS, gens, torch.Generator().manual_seed(0))
    assert mets["stop_step"] == stop
    loss.backward()
    ours = _grads(params)
    ref_loss, ref_r = _reference_loss(m, reward, stop, steps)
    ref_loss.backward()
    ref = _grads(params)
    assert mets["reward_mean"] == pytest.approx(ref_r.mean().item(), rel=1e-4)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-4)
    assert ref.abs().max() > 0
    # float32: each of the stop + 1 UNet calls and the decode round at ~1e-7 relative, and the
    # posterior mean's two formulas differ by a few ulps per step: measured relative error of
    # the gradient 3e-7 to 6e-7 over stop steps 0..7. 1e-4 leaves room for that and still fails
    # on any change of the sampler (eta 0 or CFG: test below; cosine 0.66 on the real model)
    assert _rel_err(ours, ref) < 1e-4


def _rel_err(a, b):
    """|a - b| / |b| in float64 (the gradients at late stop steps are ~1e-9: below the 1e-8
    norm floor of torch's cosine_similarity)."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def test_refl_with_eta_zero_or_cfg_is_not_the_reference(lora_model):
    """The options we keep (eta 0, classifier-free guidance) really change the gradient: the
    comparison above would catch a recipe that claims the reference with them."""
    stop, steps = 3, 6
    m, params, reward = lora_model
    ref_loss, _ = _reference_loss(m, reward, stop, steps)
    ref_loss.backward()
    ref = _grads(params)
    for over in ({"eta": 0.0}, {"guidance_scale": 4.0}):
        refl = ReFL(_cfg(stop, steps, sampling=over), SimpleNamespace(model=m, reward=reward))
        loss, _ = refl.train_step(PROMPTS, [torch.Generator().manual_seed(s) for s in SEEDS], torch.Generator().manual_seed(0))
        loss.backward()
        ours = _grads(params)
        assert _rel_err(ours, ref) > 1e-2, over


def test_one_optimizer_step_raises_the_reward(lora_model):
    """One SGD step on the ReFL loss, then the same step (same x_T, noise and stop step) again:
    the loss must fall and the reward rise (a sign error in the loss would lower it)."""
    stop, steps = 4, 6
    m, params, reward = lora_model
    refl = ReFL(_cfg(stop, steps, refl={"grad_scale": 1.0}), SimpleNamespace(model=m, reward=reward))

    def step():
        gens = [torch.Generator().manual_seed(s) for s in SEEDS]
        return refl.train_step(PROMPTS, gens, torch.Generator().manual_seed(0))

    loss0, mets0 = step()
    assert mets0["reward_mean"] < 2.0  # below the margin: the hinge is active
    loss0.backward()
    g = [p.grad for p in params]
    norm = torch.sqrt(sum((x**2).sum() for x in g))
    lr = 0.05 / norm.item()  # a small step along the gradient (first order holds)
    with torch.no_grad():
        for p in params:
            p -= lr * p.grad
            p.grad = None
    loss1, mets1 = step()
    # first order: the loss falls by about lr * |g|^2 = 0.05 * |g|
    drop = loss0.item() - loss1.item()
    assert drop > 0.25 * 0.05 * norm.item()
    assert mets1["reward_mean"] > mets0["reward_mean"]
