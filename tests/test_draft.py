"""DRaFT-K / DRaFT-LV / AlignProp (vfeedback/algorithms/draft.py): the loss and the K draw by
hand, which UNet calls keep autograd for each K (fixed, drawn, LV), the LoRA gradient against the
last sampling steps unrolled by hand (DDIM with eta 1 and CFG, written out here from the
formulas, not through our sampler), per-call checkpointing against none, the config checks, and
(slow) two processes against one."""
import json
import math
from types import SimpleNamespace

import pytest
import torch

import rewards
from vfeedback.algorithms.draft import DRaFT, draft_loss, draw_k, draw_k_gaussian, renoise
from vfeedback.config import RunConfig

PROMPTS = ["a red apple", "a blue lake"]
SEEDS = [11, 12]
STEPS = 5
CFG_SCALE = 3.0


# ----------------------------------------------------------------------------- by hand
def test_draft_loss_by_hand():
    r = torch.tensor([0.5, 3.0, -1.0, float("nan")])
    # finite rewards 0.5, 3.0, -1.0: mean 0.8333; times -2
    assert draft_loss(r, 2.0).item() == pytest.approx(-2 * 2.5 / 3, rel=1e-6)
    assert math.isnan(draft_loss(torch.tensor([float("nan")] * 2), 1.0).item())
    x = torch.tensor([0.0, 1.0, 3.0, 5.0], requires_grad=True)
    draft_loss(x, 0.4).backward()
    assert x.grad.tolist() == pytest.approx([-0.1] * 4, abs=1e-7)  # d/dr of -0.4 * mean: -0.4 / 4


def test_k_is_fixed_or_uniform_with_both_ends():
    assert {draw_k(3, None, torch.Generator().manual_seed(s)) for s in range(20)} == {3}
    assert {draw_k(3, (2, 4), torch.Generator().manual_seed(s)) for s in range(200)} == {2, 3, 4}


def test_renoise_is_the_forward_process():
    x0, eps = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 1.0])
    # a = 0.64: 0.8 * x0 + 0.6 * eps
    assert renoise(x0, torch.tensor(0.64), eps).tolist() == pytest.approx([1.9, -0.2], abs=1e-6)


# ----------------------------------------------------------------------------- the method
def _cfg(**draft):
    return RunConfig.model_validate({
        "algorithm": "draft", "output_dir": "unused",
        "model": {"family": "sd15", "path": "tiny:sd15", "lora": {"rank": 4}, "vae_checkpointing": False},
        "reward": "color", "prompts": {"train": PROMPTS},
        "sampling": {"steps": STEPS, "guidance_scale": CFG_SCALE, "eta": 1.0},
        "draft": {"grad_scale": 1.0, **draft},
    })


@pytest.fixture(scope="module")
def _shared():
    from vfeedback.models import add_lora, load_model

    m = load_model("sd15", "tiny:sd15", resolution=32)  # 8x8 latents: the whole file in seconds
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


def _step(m, reward, step_seed=0, **draft):
    """One DRaFT train_step; returns (loss, metrics, grad-enabled flag of each UNet call made by
    the forward pass)."""
    method = DRaFT(_cfg(**draft), SimpleNamespace(model=m, reward=reward))
    calls = []
    hook = m.unet.register_forward_hook(lambda mod, i, o: calls.append(torch.is_grad_enabled()))
    try:
        loss, mets = method.train_step(PROMPTS, [torch.Generator().manual_seed(s) for s in SEEDS],
                                       torch.Generator().manual_seed(step_seed))
    finally:
        hook.remove()
    return loss, mets, calls


def _grads(params):
    out = torch.cat([p.grad.detach().reshape(-1).clone() for p in params])
    for p in params:
        p.grad = None
    return out


def _rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("k", [1, STEPS])  # K in between: the k_range test
def test_the_last_k_unet_calls_keep_autograd(k, lora_model):
    m, params, reward = lora_model
    loss, mets, calls = _step(m, reward, k=k, unet_checkpoint=False)
    assert calls == [False] * (STEPS - k) + [True] * k
    assert mets["k"] == k
    loss.backward()
    assert _grads(params).abs().max() > 0


def test_k_range_draws_k_per_step_and_the_window_follows(lora_model):
    """AlignProp's randomized truncation: K from [2, 4] per step (the step generator), and the
    grad window is the last K calls of that step."""
    m, _, reward = lora_model
    seen = set()
    for seed in range(4):
        want = draw_k(1, (2, 4), torch.Generator().manual_seed(seed))
        _, mets, calls = _step(m, reward, step_seed=seed, k_range=[2, 4], unet_checkpoint=False)
        assert mets["k"] == want
        assert calls == [False] * (STEPS - want) + [True] * want
        seen.add(want)
    assert len(seen) >= 2  # the draw really varies across steps


def test_k_gauss_draws_alignprops_gaussian_k_per_step_and_the_window_follows(lora_model):
    """AlignProp's default truncation on our 5 steps: first index with gradient int(N(2.5, 2)),
    redrawn into [1, 4], K = 5 - index; the grad window is the last K calls of that step. Seeds
    0 and 2 draw K = 4 and 1 (hand-computed: tests/test_math_methods.py; here re-derived through
    draw_k_gaussian for the other seeds)."""
    m, _, reward = lora_model
    seen = []
    for seed in range(4):
        want = draw_k_gaussian(2.5, 2.0, STEPS, torch.Generator().manual_seed(seed))
        _, mets, calls = _step(m, reward, step_seed=seed, k_gauss=[2.5, 2.0], unet_checkpoint=False)
        assert mets["k"] == want
        assert calls == [False] * (STEPS - want) + [True] * want
        seen.append(want)
    assert seen[0] == 4 and len(set(seen)) >= 2


@pytest.mark.slow  # 13-17 s on the shared 2 cores: the model load and the eval grids dominate
def test_k_gauss_training_draws_k_from_each_steps_generator(tmp_path):
    """Two optimizer steps of a tiny run through the engine (the CLI's `train`): each step's K in
    metrics.jsonl is the gaussian draw from that step's seeded generator (engine.generator(seed,
    "step", step, micro)), so a resumed or multi-process run draws the same K."""
    import yaml

    from vfeedback.cli import main
    from vfeedback.engine import generator

    cfg = yaml.safe_load(open("configs/draft/tiny.yaml"))
    cfg.update(output_dir=str(tmp_path / "run"), seed=3, draft={"k_gauss": [4.0, 2.0], "grad_scale": 1.0})
    cfg["train"].update(max_steps=2, batch_size=1)
    cfg["log"] = {"checkpoint_every": 0, "eval_every": 0, "trackers": []}
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(p)]) == 0
    ks = [json.loads(line)["k"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"k"' in line]
    assert ks == [draw_k_gaussian(4.0, 2.0, 8, generator(3, "step", s, 0)) for s in (1, 2)]


def test_lv_runs_the_chain_without_grad_then_n_last_steps_with_grad(lora_model):
    m, params, reward = lora_model
    loss, mets, calls = _step(m, reward, k=1, lv=3, unet_checkpoint=False)
    assert calls == [False] * STEPS + [True] * 3
    loss.backward()
    assert _grads(params).abs().max() > 0


def test_pretrain_loss_is_added_with_its_weight(lora_model):
    """draft.pretrain reuses ReFL's denoising loss: loss = draft_loss + weight * pretrain_loss."""
    m, params, reward = lora_model
    loss, mets, _ = _step(m, reward, k=1, unet_checkpoint=False, pretrain={"data": "world:shapes", "weight": 0.5})
    assert mets["pretrain_loss"] > 0
    assert loss.item() == pytest.approx(mets["draft_loss"] + 0.5 * mets["pretrain_loss"], rel=1e-5)


def test_bad_pretrain_data_names_the_draft_field(tmp_path):
    from vfeedback.errors import UserError

    with pytest.raises(UserError, match="draft.pretrain.data: .*nope not found"):
        DRaFT.check_config(_cfg(pretrain={"data": str(tmp_path / "nope")}))


# ----------------------------------------------------------------------------- unrolled by hand
def _text(m, prompts):
    tok = m.pipe.tokenizer(prompts, padding="max_length", max_length=m.pipe.tokenizer.model_max_length, truncation=True,
                           return_tensors="pt")
    with torch.no_grad():
        return m.pipe.text_encoder(tok.input_ids)[0]


def _noise(gens, shape):
    return torch.cat([torch.randn((1, *shape), generator=g) for g in gens])


def _hand_step(m, hs, x, t, z, eta=1.0):
    """One DDIM step written out (Song et al. 2021 eq. 12), CFG with [uncond, cond] rows."""
    ac = m.scheduler.alphas_cumprod.float()
    gap = m.scheduler.config.num_train_timesteps // STEPS
    a, ap = ac[int(t)], ac[max(int(t) - gap, 0)]
    out = m.unet(torch.cat([x, x]), t, encoder_hidden_states=hs).sample
    un, te = out.chunk(2)
    eps = un + CFG_SCALE * (te - un)
    x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
    std = eta * ((1 - ap) / (1 - a) * (1 - a / ap)).sqrt()
    return ap.sqrt() * x0 + (1 - ap - std**2).sqrt() * eps + std * z


def _hand_chain(m, k_grad):
    """x_T -> x_0 by hand with the sampler's noise order (x_T, then one z per step, per image),
    autograd on the last ``k_grad`` steps only. Returns (x_0, generators after the chain, hs)."""
    from diffusers import DDIMScheduler

    sch = DDIMScheduler.from_config(m.scheduler.config)
    sch.set_timesteps(STEPS)
    gens = [torch.Generator().manual_seed(s) for s in SEEDS]
    hs = torch.cat([_text(m, [""] * len(PROMPTS)), _text(m, PROMPTS)])
    shape = m.latent_shape
    x = _noise(gens, shape)
    for i, t in enumerate(sch.timesteps):
        z = _noise(gens, shape)
        with torch.set_grad_enabled(i >= STEPS - k_grad):
            x = _hand_step(m, hs, x, t, z)
    return x, gens, hs, sch.timesteps


def _hand_reward_loss(m, reward, x):
    img = (m.vae.decode(x / m.vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    return -reward(img, PROMPTS).mean()


def test_k2_gradient_equals_the_last_two_steps_unrolled_by_hand(lora_model):
    """DRaFT-2 on the tiny model: the same x_T and eta noise, the two last DDIM steps written out
    and differentiated by autograd: the same LoRA gradient to float32 rounding. The DRaFT-1
    gradient is far from it (the test can tell K = 1 from K = 2)."""
    m, params, reward = lora_model
    loss, _, _ = _step(m, reward, k=2, unet_checkpoint=False)
    loss.backward()
    ours = _grads(params)
    x, _, _, _ = _hand_chain(m, k_grad=2)
    ref_loss = _hand_reward_loss(m, reward, x)
    ref_loss.backward()
    ref = _grads(params)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    assert ref.abs().max() > 0
    # float32: 6 UNet calls, the decode and two different (algebraically equal) forms of the
    # posterior mean; the ReFL reference test measures 3e-7 to 6e-7 for the same pieces. 1e-4
    # still fails on a window one step short (below) or on CFG / eta changes
    assert _rel_err(ours, ref) < 1e-4
    loss1, _, _ = _step(m, reward, k=1, unet_checkpoint=False)
    loss1.backward()
    assert _rel_err(_grads(params), ref) > 1e-2


def test_lv_gradient_equals_n_renoised_last_steps_by_hand(lora_model):
    """DRaFT-LV, n = 2: x_0 from the whole chain without grad; then twice: eps and z from each
    image's generator, x_1 = sqrt(a_t1) x_0 + sqrt(1 - a_t1) eps at the last timestep t1, one
    step with grad; the loss is the mean of the two losses."""
    m, params, reward = lora_model
    loss, _, _ = _step(m, reward, k=1, lv=2, unet_checkpoint=False)
    loss.backward()
    ours = _grads(params)
    with torch.no_grad():
        x0, gens, hs, ts = _hand_chain(m, k_grad=0)
    a1 = m.scheduler.alphas_cumprod.float()[int(ts[-1])]
    losses = []
    for _ in range(2):
        eps = _noise(gens, m.latent_shape)
        z = _noise(gens, m.latent_shape)
        x1 = a1.sqrt() * x0 + (1 - a1).sqrt() * eps
        losses.append(_hand_reward_loss(m, reward, _hand_step(m, hs, x1, ts[-1], z)))
    ref_loss = (losses[0] + losses[1]) / 2
    ref_loss.backward()
    ref = _grads(params)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    assert _rel_err(ours, ref) < 1e-4


def test_per_call_checkpointing_gives_the_same_gradient(lora_model):
    """draft.unet_checkpoint on vs off: the same LoRA gradient; on, each of the K calls in the
    window runs again in the backward pass (the recomputation that saves the activations)."""
    m, params, reward = lora_model
    k = 3
    grads = {}
    for on in (False, True):
        loss, _, calls = _step(m, reward, k=k, unet_checkpoint=on)
        backward_calls = []
        # a pre-hook: the recomputation stops early, once it has what the backward needs
        hook = m.unet.register_forward_pre_hook(lambda mod, i: backward_calls.append(1))
        loss.backward()
        hook.remove()
        assert len(backward_calls) == (k if on else 0)
        grads[on] = _grads(params)
    # the recomputed forward is the same float32 arithmetic: equal up to reduction order
    assert _rel_err(grads[True], grads[False]) < 1e-6


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize("draft, msg", [
    ({"k": 6}, "draft.k: K up to 6 exceeds sampling.steps (5)"),
    ({"k_range": [2, 6]}, "draft.k_range: K up to 6 exceeds sampling.steps (5)"),
    ({"k_range": [3, 2]}, "k_range [3, 2] must satisfy 1 <= lo <= hi"),
    ({"k_range": [0, 2]}, "k_range [0, 2] must satisfy 1 <= lo <= hi"),
    ({"lv": 2, "k": 2}, "lv: 2 is DRaFT-LV, defined for K = 1"),
    ({"lv": 2, "k_range": [1, 2]}, "lv: 2 is DRaFT-LV, defined for K = 1"),
    ({"lv": 2, "k_gauss": [2, 1]}, "lv: 2 is DRaFT-LV, defined for K = 1"),
    ({"k_gauss": [2, 1], "k_range": [1, 2]}, "k_gauss and k_range are two ways to draw K"),
    ({"k_gauss": [2, 0]}, "k_gauss [2.0, 0.0]: [mean, std] needs std > 0"),
    ({"k_gauss": [2, -1]}, "k_gauss [2.0, -1.0]: [mean, std] needs std > 0"),
    # the first index with gradient lies in [1, steps - 1] = [1, 4]; std at most steps (5)
    ({"k_gauss": [0.99, 1]}, "draft.k_gauss: mean 0.99 must lie in [1, sampling.steps - 1] = [1, 4]"),
    ({"k_gauss": [4.01, 1]}, "draft.k_gauss: mean 4.01 must lie in [1, sampling.steps - 1] = [1, 4]"),
    ({"k_gauss": [2, 5.01]}, "draft.k_gauss: std 5.01 exceeds sampling.steps (5)"),
    ({"k_gauss": [2, float("nan")]}, "Input should be a finite number"),
])
def test_config_refuses_bad_k(draft, msg):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=msg.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        _cfg(**draft)
    assert _cfg(k=STEPS).draft.k == STEPS and _cfg(k_range=[1, STEPS]).draft.k_range == (1, STEPS)
    # the edges of k_gauss are allowed (k is then ignored, as with k_range)
    assert _cfg(k_gauss=[1, STEPS]).draft.k_gauss == (1.0, STEPS) and _cfg(k_gauss=[STEPS - 1, 0.1], k=STEPS + 1).draft.k_gauss


def test_validate_names_the_field(capsys):
    from vfeedback.cli import main

    assert main(["validate", "configs/draft/tiny.yaml", "draft.k=9"]) == 2
    err = capsys.readouterr()
    assert "draft.k: K up to 9 exceeds sampling.steps (8)" in err.err + err.out
    assert main(["validate", "configs/draft/tiny.yaml", "draft.k_gauss=[42,5]"]) == 2
    err = capsys.readouterr()
    assert "draft.k_gauss: mean 42.0 must lie in [1, sampling.steps - 1] = [1, 7]" in err.err + err.out
    assert "Traceback" not in err.err + err.out


# ----------------------------------------------------------------------------- processes
@pytest.mark.slow
def test_two_process_draft_matches_one_process(tmp_path):
    """K drawn per step from the step generator (the same on both processes), 2 steps: the
    2-process LoRA equals the 1-process one with the same global batch."""
    import yaml
    from safetensors.torch import load_file

    from tests.test_multiprocess import WEIGHT_ATOL, _run
    from tests.test_train_e2e import BASE

    def cfg(out, batch):
        c = json.loads(json.dumps(BASE))
        c.pop("refl")
        c.update(output_dir=str(out), algorithm="draft", draft={"k_range": [1, 3], "grad_scale": 1.0})
        c["train"].update(max_steps=2, batch_size=batch, max_grad_norm=None, adam_eps=1e-4)
        c["prompts"]["eval_seeds"] = [0, 1]
        p = tmp_path / f"{out.name}.yaml"
        p.write_text(yaml.safe_dump(c))
        return p

    one, two = tmp_path / "one", tmp_path / "two"
    _run([str(cfg(one, 2))])
    _run([str(cfg(two, 1)), "--num-processes", "2"])
    a = load_file(str(one / "lora" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(two / "lora" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    assert any(v.abs().sum() > 0 for k, v in a.items() if ".lora_B." in k)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=WEIGHT_ATOL), k
    ka = [json.loads(line)["k"] for line in (one / "metrics.jsonl").read_text().splitlines()]
    kb = [json.loads(line)["k"] for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert ka == kb
    assert json.loads((two / "summary.json").read_text())["replicas_identical"] is True
