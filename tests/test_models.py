"""Tiny builders, the loader's error paths, LoRA save -> diffusers load -> output changes."""
import json

import pytest
import torch

from vfeedback.errors import UserError
from vfeedback.models import add_lora, load_lora_into, load_model, save_lora


def test_tiny_models_are_real_pipelines_loaded_from_a_folder(tiny_sd15, tiny_sdxl):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    assert isinstance(tiny_sd15.pipe, StableDiffusionPipeline)
    assert isinstance(tiny_sdxl.pipe, StableDiffusionXLPipeline)
    assert tiny_sdxl.pipe.text_encoder_2 is not None
    assert tiny_sdxl.unet.config.addition_embed_type == "text_time"
    # the CLIP tokenizer built from open_clip's BPE file matches open_clip's own tokenizer
    import open_clip

    ids = tiny_sd15.pipe.tokenizer("a photo of a red cat", padding="max_length", max_length=77).input_ids
    ref = open_clip.tokenize(["a photo of a red cat"])[0].tolist()
    assert ids[: ids.index(49407) + 1] == ref[: ref.index(49407) + 1]


def test_tiny_build_is_seeded(tmp_path, monkeypatch):
    from vfeedback.models.tiny import build_sd15

    a, _ = build_sd15(0)
    b, _ = build_sd15(0)
    for (ka, va), (kb, vb) in zip(a["unet"].state_dict().items(), b["unet"].state_dict().items()):
        assert torch.equal(va, vb)


def test_family_mismatch_and_missing_paths(tmp_path):
    with pytest.raises(UserError, match="model.family"):
        load_model("sd15", "tiny:sdxl")
    with pytest.raises(UserError, match="tiny model"):
        load_model("sd15", "tiny:sd99")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="model_index.json"):
        load_model("sd15", str(tmp_path / "empty"))
    with pytest.raises(UserError, match="could not load"):
        load_model("sd15", "nobody-has/this-model-xyz")  # offline: a clear message, no traceback


def _render(model, seed=0):
    from vfeedback.sampling import sample

    cond = model.encode_prompt(["a red apple"], cfg=True)
    with torch.no_grad():
        return sample(model, cond, num_steps=4, guidance_scale=5.0, generator=torch.Generator().manual_seed(seed)).images


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_lora_saved_in_diffusers_format_loads_and_changes_output(family, tmp_path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors import safe_open

    trained = load_model(family, f"tiny:{family}")
    base_img = _render(trained)
    params = add_lora(trained, rank=4, alpha=8, text_encoder=True)
    assert torch.allclose(_render(trained), base_img, atol=1e-6)  # zero-initialised B: no change yet
    torch.manual_seed(0)
    for p in params:
        p.data += 0.05 * torch.randn_like(p)
    trained_img = _render(trained)
    f = save_lora(trained, tmp_path / "lora", text_encoder=True)
    assert f.name == "pytorch_lora_weights.safetensors"
    with safe_open(f, "pt") as sf:
        keys = list(sf.keys())
    assert any(k.startswith("unet.") for k in keys) and any(k.startswith("text_encoder.") for k in keys)
    if family == "sdxl":
        assert any(k.startswith("text_encoder_2.") for k in keys)
    # a fresh pipeline, loaded with diffusers' own load_lora_weights
    fresh = load_model(family, f"tiny:{family}")
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    assert isinstance(fresh.pipe, cls)
    fresh.pipe.load_lora_weights(str(tmp_path / "lora"))
    loaded_img = _render(fresh)
    assert (loaded_img - base_img).abs().max() > 1e-3  # the LoRA changes the output
    assert torch.allclose(loaded_img, trained_img, atol=1e-4)  # ... exactly as trained (alpha kept)


def test_lora_from_another_architecture_is_a_clear_error(tmp_path):
    xl = load_model("sdxl", "tiny:sdxl")
    add_lora(xl, rank=2)
    save_lora(xl, tmp_path / "xl")
    sd = load_model("sd15", "tiny:sd15")
    with pytest.raises(UserError, match="does not fit|another architecture"):
        load_lora_into(sd, tmp_path / "xl")
    with pytest.raises(UserError, match="does not exist"):
        load_lora_into(sd, tmp_path / "nope")


def test_vae_checkpointing_decodes_by_blocks_with_the_same_gradient(fresh_sd15):
    """``decode(checkpoint=True)``: one checkpoint around the decode and the decoder's own
    per-block checkpointing inside it, in the forward and again in the backward's rerun (each up
    block runs three times: forward, the outer rerun, its own rerun; twice with the outer
    checkpoint alone), with the image and the gradient on the latents equal to a plain decode;
    the decoder's flag is left as it was."""
    m = fresh_sd15
    ups = m.vae.decoder.up_blocks
    calls = []
    hooks = [b.register_forward_pre_hook(lambda mod, a, i=i: calls.append(i)) for i, b in enumerate(ups)]
    torch.manual_seed(0)
    z = torch.randn(2, *m.latent_shape)
    weight = torch.rand(2, 3, m.resolution, m.resolution)
    got = {}
    for ckpt in (False, True):
        calls.clear()
        zz = z.clone().requires_grad_(True)
        img = m.decode(zz, checkpoint=ckpt)
        (img * weight).sum().backward()
        got[ckpt] = (img.detach(), zz.grad, list(calls))
    for h in hooks:
        h.remove()
    assert torch.equal(got[True][0], got[False][0]) and torch.equal(got[True][1], got[False][1])
    assert got[False][2] == list(range(len(ups)))
    assert sorted(got[True][2]) == sorted(list(range(len(ups))) * 3)
    assert m.vae.decoder.gradient_checkpointing is False
    with torch.no_grad():  # without grad nothing is checkpointed: each block once
        calls.clear()
        hooks = [b.register_forward_pre_hook(lambda mod, a, i=i: calls.append(i)) for i, b in enumerate(ups)]
        assert torch.equal(m.decode(z, checkpoint=True), got[False][0])
        assert calls == list(range(len(ups)))
        for h in hooks:
            h.remove()
    assert got[True][0].dtype == torch.float32
