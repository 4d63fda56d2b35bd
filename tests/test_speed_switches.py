"""Performance switches (vfeedback/models/speed.py): each gives what the run gives without it, on
the tiny models. A ReFL-like step (sampling with one gradient step, decode, a loss on the pixels,
backward) is run with the switch off and on from the same seeds; the images and every LoRA
gradient must agree, and a switch that drops a LoRA or changes the math fails here."""
import logging
import os

import pytest
import torch

from vfeedback.errors import UserError
from vfeedback.models import add_lora, load_model, lora_state_dict
from vfeedback.models.speed import SWITCHES, apply_speed_switches, fuse_qkv_projections, make_optimizer
from vfeedback.sampling import GradWindow, sample

PROMPTS = ["a red apple", "a blue lake"]


def _model(family="sd15", targets=None, text_encoder=False):
    """A private tiny model with a LoRA whose B matrices are non-zero (peft starts them at zero,
    where the A gradients vanish and a dropped LoRA would change no image)."""
    m = load_model(family, f"tiny:{family}", resolution=32)
    torch.manual_seed(0)  # peft draws the A matrices from the global generator
    params = add_lora(m, 4, target_modules=targets, text_encoder=text_encoder)
    g = torch.Generator().manual_seed(1)
    for n, p in m.unet.named_parameters():
        if "lora_B" in n:
            p.data = torch.randn(p.shape, generator=g) * 0.3
    return m, params


def _refl_step(m, steps=3):
    """Images and the LoRA gradients of one ReFL-like step (grad at the last step, x0 decoded,
    a loss on the pixels), with fixed seeds."""
    cond = m.encode_prompt(PROMPTS, cfg=True)
    out = sample(m, cond, num_steps=steps, guidance_scale=3.0, generator=torch.Generator().manual_seed(0),
                 grad=GradWindow.refl(steps - 1))
    loss = ((out.images - 0.7) ** 2).mean()
    loss.backward()
    # a LoRA the forward pass never called has no gradient at all: count it as zero
    grads = {n: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
             for n, p in m.unet.named_parameters() if "lora_" in n}
    return out.images.detach(), grads


def _compare(ref, new, atol=1e-5, rtol=1e-4):
    (im0, g0), (im1, g1) = ref, new
    assert im0.dtype == im1.dtype == torch.float32
    torch.testing.assert_close(im1, im0, atol=atol, rtol=rtol)
    assert g0.keys() == g1.keys() and g0
    scale = max(g.abs().max().item() for g in g0.values())
    assert scale > 0
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], atol=atol * scale, rtol=rtol, msg=k)
    # every LoRA takes part: a dropped one (as diffusers' fuse_qkv_projections would drop) has a
    # zero gradient, where the reference has none
    assert all(g.abs().sum() > 0 for g in g1.values())


# ------------------------------------------------------------------------- fuse_qkv
@pytest.mark.parametrize("family,targets,unet_fused", [
    ("sd15", None, 0),  # default targets to_q/to_k/to_v/to_out.0: only the VAE attention fuses
    ("sd15", ["to_q", "to_out.0"], 4),  # cross-attention fuses k/v (its to_q still runs, LoRA and all)
    ("sd15", ["to_out.0", "ff.net.2"], 8),  # nothing on q/k/v: every UNet attention fuses
    ("sdxl", None, 0),
])
def test_fuse_qkv_same_images_gradients_and_export(family, targets, unet_fused, tmp_path, caplog):
    torch.manual_seed(0)
    ref_m, _ = _model(family, targets)
    ref = _refl_step(ref_m)
    m, params = _model(family, targets)
    with caplog.at_level(logging.INFO, logger="vfeedback.models.speed"):
        apply_speed_switches(m, fuse_qkv=True)
    assert "fuse_qkv: fused" in caplog.text
    from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0

    unet_attn = [a for a in m.unet.modules() if isinstance(a, Attention)]
    fused = [a for a in unet_attn if isinstance(a.processor, FusedAttnProcessor2_0)]
    assert len(fused) == unet_fused
    for a in fused:  # the fused copy stays frozen like the weights it copies
        layer = a.to_kv if a.is_cross_attention else a.to_qkv
        assert not any(p.requires_grad for p in layer.parameters())
    vae_attn = [a for a in m.vae.modules() if isinstance(a, Attention)]
    assert vae_attn and all(isinstance(a.processor, FusedAttnProcessor2_0) for a in vae_attn)
    new = _refl_step(m)
    _compare(ref, new)
    # one optimizer step on each; the exported LoRA files are equal. SGD, whose step is the
    # gradient times lr: Adam's first step is about lr * sign(g), and the sign of a gradient within
    # fp32 noise of zero follows the summation order (the thread count: then 1e-2 apart)
    for mm in (ref_m, m):
        ps = [p for n, p in mm.unet.named_parameters() if "lora_" in n]
        opt = torch.optim.SGD(ps, lr=1e-2)
        opt.step()
    from safetensors.torch import load_file

    from vfeedback.models import save_lora

    a = load_file(str(save_lora(ref_m, tmp_path / "ref")))
    b = load_file(str(save_lora(m, tmp_path / "fused")))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=1e-5, msg=k)


def test_naive_fusion_would_drop_the_lora():
    """The control: diffusers' own fuse_qkv_projections (every module) drops the q/k/v LoRA, and
    the comparison above catches it; ours leaves those modules alone."""
    torch.manual_seed(0)
    ref_m, _ = _model()
    ref = _refl_step(ref_m)
    m, _ = _model()
    m.unet.fuse_qkv_projections()
    naive = _refl_step(m)
    dropped = [k for k, g in naive[1].items() if g.abs().sum() == 0]
    assert dropped and all(".to_k." in k or ".to_v." in k or ".to_q." in k for k in dropped)
    with pytest.raises(AssertionError):
        _compare(ref, naive)


def test_fuse_qkv_keeps_trainable_projections_full_finetune():
    """Full fine-tuning: the UNet's projections are trainable, so no UNet attention fuses."""
    m = load_model("sd15", "tiny:sd15", resolution=32)
    m.unet.requires_grad_(True)
    rep = fuse_qkv_projections(m)
    assert not [n for n in rep["fused"] if n.startswith("unet.")]
    assert [n for n in rep["kept"] if n.startswith("unet.")]
    assert [n for n in rep["fused"] if n.startswith("vae.")]


# ------------------------------------------------------------------------- channels_last
def test_channels_last_same_images_and_gradients():
    torch.manual_seed(0)
    ref = _refl_step(_model()[0])
    m, _ = _model()
    apply_speed_switches(m, channels_last=True)
    assert m.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert m.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert not m.unet.conv_in.weight.is_contiguous()
    _compare(ref, _refl_step(m))


# ------------------------------------------------------------------------- compile
def _compiled_blocks(unet):
    return [n for n, mod in unet.named_modules() if getattr(mod, "_compiled_call_impl", None) is not None]


def _check_compile(monkeypatch, backend):
    monkeypatch.setenv("VFEEDBACK_COMPILE_BACKEND", backend)
    torch._dynamo.reset()
    torch.manual_seed(0)
    ref = _refl_step(_model()[0])
    m, _ = _model()
    names = set(lora_state_dict(m))
    apply_speed_switches(m, compile=True)
    blocks = _compiled_blocks(m.unet)
    # regional: the repeated transformer blocks (diffusers' _repeated_blocks), not the whole UNet
    assert blocks and all(type(m.unet.get_submodule(n)).__name__ == "BasicTransformerBlock" for n in blocks)
    assert set(lora_state_dict(m)) == names  # in place: no _orig_mod. in any name
    _compare(ref, _refl_step(m), atol=1e-4, rtol=1e-3)
    torch._dynamo.reset()  # later tests start without these compiled graphs


def test_compile_same_images_and_gradients(monkeypatch):
    """A cheap backend (AOTAutograd without inductor's code generation: the same graph capture
    and backward) keeps the test well under a minute; the inductor test below is `slow`."""
    _check_compile(monkeypatch, "aot_eager")


@pytest.mark.slow
def test_compile_inductor_same_images_and_gradients(monkeypatch):
    """Real inductor on the CPU (needs a C compiler; about a minute on two cores)."""
    _check_compile(monkeypatch, "inductor")


def test_compile_keeps_every_block_compiled_through_a_refl_step():
    """A UNet with SD1.5's block structure (four levels, three with cross-attention, small widths)
    run as a ReFL step runs it: no-grad calls, one call with grad and its backward, then an eval
    batch of another size. Every block instance shares ``BasicTransformerBlock.forward``, which
    needs a graph per width and layout, grad mode and batch size (13 here, as on the full-size
    SD1.5 UNet); at dynamo's default limit of 8 the ninth is refused and the block runs eagerly
    from then on. ``compile_unet`` raises the limit: every frame is compiled."""
    import torch._dynamo

    before = torch._dynamo.config.recompile_limit
    torch._dynamo.config.recompile_limit = 8  # the default, whatever ran before (pytest's monkeypatch
    try:  # would delete the attribute on undo: dynamo's config module does not report it as set)
        _refl_like_compiled_sequence()
    finally:
        torch._dynamo.config.recompile_limit = before
        torch._dynamo.reset()


def _refl_like_compiled_sequence():
    import torch._dynamo
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from vfeedback.models.speed import RECOMPILE_LIMIT, compile_unet

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=8, cross_attention_dim=32, attention_head_dim=8, layers_per_block=2,
                                block_out_channels=(32, 64, 128, 128), norm_num_groups=8,
                                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    for n, p in unet.named_parameters():
        p.requires_grad_("lora" in n)
    compile_unet(unet, backend="eager")
    assert torch._dynamo.config.recompile_limit == RECOMPILE_LIMIT
    hs = torch.randn(2, 7, 32)
    for i in range(3):
        with torch.no_grad():
            unet(torch.randn(2, 4, 8, 8), torch.tensor(900 - i), encoder_hidden_states=hs)
    unet(torch.randn(2, 4, 8, 8), torch.tensor(500), encoder_hidden_states=hs).sample.mean().backward()
    with torch.no_grad():
        unet(torch.randn(8, 4, 8, 8), torch.tensor(900), encoder_hidden_states=torch.randn(8, 7, 32))
    frames = torch._dynamo.utils.counters["frames"]
    assert frames["total"] == frames["ok"]  # none refused
    assert frames["ok"] > 8  # more graphs than dynamo's default allows (13)


# ------------------------------------------------------------------------- cache_text_embeddings
class _Count:
    def __init__(self, encs):
        self.rows = []
        self.handles = [e.register_forward_hook(self._hook) for e in encs]

    def _hook(self, mod, args, out):
        self.rows.append(args[0].shape[0] if args else 0)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_cache_text_embeddings(family):
    m = load_model(family, f"tiny:{family}", resolution=32)
    want = m.encode_prompt(PROMPTS, ["blurry", ""], cfg=True)
    want_nocfg = m.encode_prompt(PROMPTS[:1], cfg=False)
    apply_speed_switches(m, cache_text_embeddings=True)
    assert all(e.device.type == "cpu" for e in m.text_encoders)
    calls = _Count(m.text_encoders)
    got = m.encode_prompt(PROMPTS, ["blurry", ""], cfg=True)
    n_first = len(calls.rows)
    assert n_first == len(m.text_encoders) * 2  # prompts and negatives, once per encoder
    for f in ("embeds", "neg_embeds", "pooled", "neg_pooled", "time_ids"):
        a, b = getattr(want, f), getattr(got, f)
        assert (a is None) == (b is None), f
        if a is not None:
            assert b.device == m.device
            torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6, msg=f)
    # a second call runs no encoder; a batch in another order too
    again = m.encode_prompt(PROMPTS[::-1], ["", "blurry"], cfg=True)
    assert len(calls.rows) == n_first
    torch.testing.assert_close(again.embeds, want.embeds.flip(0))
    # a new prompt beside a cached one: only the new row is encoded
    mixed = m.encode_prompt([PROMPTS[0], "a tree"], ["blurry", ""], cfg=True)
    assert calls.rows[n_first:] == [1] * (2 * len(m.text_encoders))
    torch.testing.assert_close(mixed.embeds[:1], want.embeds[:1])
    torch.testing.assert_close(mixed.neg_embeds[1:], want.neg_embeds[1:], atol=1e-6, rtol=1e-6)  # "" as negative
    # one stored copy per negative string, shared by the rows
    assert m.text_cache[("a tree", "")]["neg_embeds"] is m.text_cache[(PROMPTS[1], "")]["neg_embeds"]
    # without CFG the negative is no part of the key
    nocfg = m.encode_prompt(PROMPTS[:1], cfg=False)
    assert nocfg.neg_embeds is None
    torch.testing.assert_close(nocfg.embeds, want_nocfg.embeds, atol=1e-6, rtol=1e-6)
    assert all(e.device.type == "cpu" for e in m.text_encoders)


def test_cache_text_embeddings_same_images():
    torch.manual_seed(0)
    ref = _refl_step(_model()[0])
    m, _ = _model()
    apply_speed_switches(m, cache_text_embeddings=True)
    _compare(ref, _refl_step(m), atol=1e-6, rtol=1e-6)


def test_cache_text_embeddings_refused_with_text_encoder_lora(tmp_path):
    m = load_model("sd15", "tiny:sd15", resolution=32)
    with pytest.raises(UserError, match=r"model\.cache_text_embeddings.*model\.lora\.text_encoder"):
        apply_speed_switches(m, cache_text_embeddings=True, lora_text_encoder=True)
    assert m.text_cache is None
    from tests.test_train_e2e import write_cfg
    from vfeedback.cli import main

    cfg = write_cfg(tmp_path, tmp_path / "run", **{"model.cache_text_embeddings": True, "model.lora.text_encoder": True})
    assert main(["validate", str(cfg)]) == 2


# ------------------------------------------------------------------------- optimizer
def test_make_optimizer_adamw_is_torch_adamw():
    p = [torch.nn.Parameter(torch.ones(3))]
    opt = make_optimizer(p, "adamw", lr=0.1, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.01)
    assert type(opt) is torch.optim.AdamW
    assert opt.defaults["betas"] == (0.8, 0.9) and opt.defaults["eps"] == 1e-6 and opt.defaults["weight_decay"] == 0.01
    with pytest.raises(UserError, match="train.optimizer"):
        make_optimizer(p, "sgd", lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0)


def _no_bitsandbytes(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))


def test_adamw8bit_without_bitsandbytes_is_a_user_error(monkeypatch, tmp_path, capsys):
    _no_bitsandbytes(monkeypatch)
    with pytest.raises(UserError, match=r"train\.optimizer.*pip install bitsandbytes"):
        make_optimizer([torch.nn.Parameter(torch.ones(3))], "adamw8bit", lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0)
    from tests.test_train_e2e import write_cfg
    from vfeedback.cli import main

    cfg = write_cfg(tmp_path, tmp_path / "run", **{"train.optimizer": "adamw8bit"})
    for cmd in ("validate", "train"):
        assert main([cmd, str(cfg)]) == 2
        err = capsys.readouterr().err
        assert "train.optimizer" in err and "pip install bitsandbytes" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_adamw8bit_tracks_adamw():
    """bitsandbytes' AdamW8bit (8-bit blockwise moments for tensors of 4096+ elements, 32-bit
    below) follows torch's AdamW closely over a few steps; runs where bitsandbytes imports (its
    CPU build does)."""
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    shapes = [(64, 128), (4, 32)]  # an 8-bit one and a small one (a LoRA matrix)
    w0 = [torch.randn(s) for s in shapes]
    a = [torch.nn.Parameter(w.clone()) for w in w0]
    b = [torch.nn.Parameter(w.clone()) for w in w0]
    kw = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)
    oa, ob = make_optimizer(a, "adamw", **kw), make_optimizer(b, "adamw8bit", **kw)
    assert type(ob).__name__ == "AdamW8bit"
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        for pa, pb in zip(a, b):
            grad = torch.randn(pa.shape, generator=g)
            pa.grad, pb.grad = grad.clone(), grad.clone()
        oa.step()
        ob.step()
    assert ob.state[b[0]]["state1"].dtype == torch.uint8  # the big one really is 8-bit
    for pa, pb, w in zip(a, b, w0):
        moved = (pa.detach() - w).abs().max().item()
        assert moved > 0.03  # 5 steps of about lr each
        assert (pa.detach() - pb.detach()).abs().max().item() < 0.1 * moved


# ------------------------------------------------------------------------- bf16 VAE, fp32 reward input
def test_bf16_vae_decode_gives_fp32_images(tmp_path):
    """Under mixed precision the trainer casts the VAE to the weight dtype (bf16) and
    DiffusionModel.decode returns float32 images, so a reward sees fp32 pixels: no field needed."""
    from tests.test_train_e2e import write_cfg
    from vfeedback.config import load_config
    from vfeedback.engine import Trainer

    tr = Trainer(load_config(str(write_cfg(tmp_path, tmp_path / "run", **{"train.mixed_precision": "bf16"}))))
    tr.setup(dry_run=True)
    m = tr.model
    assert m.vae.dtype == torch.bfloat16 and m.unet.dtype == torch.bfloat16
    z = torch.randn(1, *m.latent_shape, requires_grad=True)
    seen = []
    h = m.vae.decoder.conv_out.register_forward_hook(lambda mod, i, o: seen.append(o.dtype))
    img = m.decode(z)
    h.remove()
    assert seen == [torch.bfloat16] and img.dtype == torch.float32
    img.mean().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()


# ------------------------------------------------------------------------- trainer wiring, config
def test_trainer_applies_every_switch(tmp_path, monkeypatch):
    monkeypatch.setenv("VFEEDBACK_COMPILE_BACKEND", "aot_eager")
    from tests.test_train_e2e import write_cfg
    from vfeedback.config import load_config
    from vfeedback.engine import Trainer

    over = {f"model.{k}": True for k in SWITCHES}
    over["model.lora.target_modules"] = ["to_out.0", "conv1"]
    tr = Trainer(load_config(str(write_cfg(tmp_path, tmp_path / "run", **over))))
    tr.setup(dry_run=True)
    m = tr.model
    from diffusers.models.attention_processor import FusedAttnProcessor2_0

    assert _compiled_blocks(m.unet)
    assert m.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert any(isinstance(p, FusedAttnProcessor2_0) for p in m.unet.attn_processors.values())
    assert m.text_cache == {} and all(e.device.type == "cpu" for e in m.text_encoders)
    assert type(tr.optimizer.optimizer).__name__ == "AdamW"  # accelerate's wrapper around it
    torch._dynamo.reset()


def test_config_fields(tmp_path):
    from tests.test_config import GOOD, write
    from vfeedback.config import describe_fields, load_config

    base = GOOD.format(out=tmp_path / "run")
    cfg = load_config(write(tmp_path, base))
    assert not any(getattr(cfg.model, k) for k in SWITCHES) and cfg.train.optimizer == "adamw"  # defaults: off
    over = [f"model.{k}=true" for k in SWITCHES] + ["train.optimizer=adamw8bit"]
    cfg = load_config(write(tmp_path, base), over)
    assert all(getattr(cfg.model, k) for k in SWITCHES) and cfg.train.optimizer == "adamw8bit"
    for bad, field in (("model.compile=[1]", "model.compile"), ("model.fuse_qkv=maybe", "model.fuse_qkv"),
                       ("model.channels_last=2", "model.channels_last"),
                       ("model.cache_text_embeddings=sometimes", "model.cache_text_embeddings"),
                       ("train.optimizer=sgd", "train.optimizer")):
        with pytest.raises(UserError, match=field.replace(".", r"\.")):
            load_config(write(tmp_path, base), [bad])
    with pytest.raises(UserError, match=r"model\.cache_text_embeddings.*model\.lora\.text_encoder"):
        load_config(write(tmp_path, base), ["model.cache_text_embeddings=true", "model.lora.text_encoder=true"])
    listed = "\n".join(describe_fields())
    for k in SWITCHES:
        assert f"model.{k}" in listed
    assert "train.optimizer" in listed


def test_speed_switches_do_not_change_the_fingerprint(tmp_path):
    """They change how fast, not what: a run resumes with them flipped, and a run saved before
    they existed (no such keys) still resumes; train.optimizer: adamw8bit does define the run."""
    from tests.test_config import GOOD, write
    from vfeedback.config import load_config
    from vfeedback.rundir import fingerprint

    base = GOOD.format(out=tmp_path / "run")
    plain = fingerprint(load_config(write(tmp_path, base)))
    assert not any(k.startswith(("model.compile", "train.optimizer")) for k in plain)
    on = fingerprint(load_config(write(tmp_path, base), [f"model.{k}=true" for k in SWITCHES]))
    assert on == plain
    assert fingerprint(load_config(write(tmp_path, base), ["train.optimizer=adamw8bit"]))["train.optimizer"] == "adamw8bit"


def test_training_with_every_switch_matches_training_without(tmp_path, monkeypatch):
    """End to end through `vfeedback train` (gradient checkpointing on, CFG, three ReFL steps):
    every switch on gives the losses and the exported LoRA of a run with none."""
    monkeypatch.setenv("VFEEDBACK_COMPILE_BACKEND", "aot_eager")
    import json

    from tests.test_train_e2e import _lora, write_cfg
    from vfeedback.cli import main

    # LoRA targets off q/k/v, so the UNet's attention fuses too
    common = {"model.lora.target_modules": ["to_out.0", "conv1", "conv2"], "prompts.eval_seeds": [0],
              # Adam divides each gradient by its running RMS + eps, so fp32 noise in a gradient far below
              # eps moves a weight by up to lr; at the default 1e-8 the two runs' files differed by
              # 2.4e-4 after three steps at lr 1e-2 (thread-count dependent), at 1e-7 by 3e-5
              "train.adam_eps": 1e-7}
    off, on = tmp_path / "off", tmp_path / "on"
    assert main(["train", str(write_cfg(tmp_path, off, **common))]) == 0
    torch._dynamo.reset()
    assert main(["train", str(write_cfg(tmp_path, on, **common, **{f"model.{k}": True for k in SWITCHES}))]) == 0
    torch._dynamo.reset()
    loss = lambda out: [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert loss(on) == pytest.approx(loss(off), rel=1e-4, abs=1e-6)
    a, b = _lora(off), _lora(on)
    assert a.keys() == b.keys()
    # the files agree to 3e-5 (adam_eps above), while every B matrix (zero at the start) has moved
    # by about 2e-2; a dropped or wrong LoRA differs by that much
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=3e-4, rtol=0, msg=k)
        if ".lora_B." in k:
            assert a[k].abs().max() > 1e-2, k
    s = json.loads((on / "summary.json").read_text())
    assert s["eval_reward_after"] == pytest.approx(json.loads((off / "summary.json").read_text())["eval_reward_after"], abs=1e-5)


def test_a_projection_with_any_trainable_weight_is_not_fused_away():
    """``_untouchable``: a LoRA-wrapped projection, or one with *any* trainable parameter (a
    weight trained with its bias frozen counts), must keep being called."""
    from vfeedback.models.speed import _untouchable

    lin = torch.nn.Linear(4, 4)
    lin.requires_grad_(False)
    assert not _untouchable(lin)
    lin.weight.requires_grad_(True)
    assert _untouchable(lin)
    lin.requires_grad_(True)
    assert _untouchable(lin)
