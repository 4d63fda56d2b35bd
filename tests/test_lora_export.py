"""The exported LoRA as a user loads it: a stock diffusers pipeline, ``from_pretrained`` of the
model folder and ``load_lora_weights`` of the run's OUT/lora, holds every tensor of the file
(names, count, values, alpha) and renders the image the trainer renders from the same latents
and prompt. Targets mix attention, transformer Linear, ResNet and UNet-level convs and the time
embedding (SDXL: also the added text-time embedding), with LoRA on every text encoder."""
import pytest
import torch

from vfeedback.models import add_lora, load_model, save_lora
from vfeedback.models.tiny import tiny_path

#: every kind of UNet layer a config may target (peft matches a name at the end of a module path)
MIXED = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
         "conv1", "conv2", "conv_in", "conv_out", "time_emb_proj", "linear_1", "linear_2"]
RANK, ALPHA = 4, 8.0  # alpha != rank: a lost alpha changes the LoRA's scale from 2 to 1
PROMPT = "a red circle left of a blue square"


def _tuner_layers(module) -> dict:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {n: m for n, m in module.named_modules() if isinstance(m, BaseTunerLayer)}


def _render(pipe, latents):
    """The pipeline's own __call__: DDIM 4 steps, CFG 5, the given initial latents, [0, 1] pixels."""
    out = pipe(PROMPT, negative_prompt="", num_inference_steps=4, guidance_scale=5.0, latents=latents.clone(),
               output_type="pt", height=latents.shape[-2] * pipe.vae_scale_factor, width=latents.shape[-1] * pipe.vae_scale_factor)
    return out.images.float()


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def exported(request, tmp_path_factory):
    """(family, trained model, LoRA file) with every LoRA tensor moved off its initial value."""
    family = request.param
    trained = load_model(family, f"tiny:{family}")
    params = add_lora(trained, rank=RANK, alpha=ALPHA, target_modules=MIXED, text_encoder=True)
    g = torch.Generator().manual_seed(0)
    for p in params:
        p.data += 0.05 * torch.randn(p.shape, generator=g)
    f = save_lora(trained, tmp_path_factory.mktemp(f"lora-{family}") / "lora", text_encoder=True)
    return family, trained, f


def _stock(family):
    import diffusers

    cls = diffusers.StableDiffusionXLPipeline if family == "sdxl" else diffusers.StableDiffusionPipeline
    pipe = cls.from_pretrained(str(tiny_path(family)))  # no dtype, no variant: what a user types
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_mixed_targets_reach_every_layer_kind(exported):
    """The test's premise: the trained model has LoRA on each kind of layer named in MIXED."""
    family, trained, _ = exported
    names = list(_tuner_layers(trained.unet))
    for kind in ["attn1.to_q", "attn2.to_out.0", "proj_in", "ff.net.2", "resnets.0.conv1", "time_emb_proj",
                 "conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"]:
        assert any(n.endswith(kind) for n in names), kind
    if family == "sdxl":
        assert any(n.startswith("add_embedding.linear_") for n in names)
    for enc in trained.text_encoders:
        assert any(n.endswith("self_attn.q_proj") for n in _tuner_layers(enc))


def test_file_has_one_key_style_and_every_trained_tensor(exported):
    from safetensors.torch import load_file

    from vfeedback.models import lora_state_dict

    family, trained, f = exported
    sd = load_file(str(f))
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in sd), [k for k in sd if "lora_A" not in k and "lora_B" not in k][:3]
    prefixes = {"unet": "unet.", "te0": "text_encoder.", "te1": "text_encoder_2."}
    ours = {prefixes[k.split(".", 1)[0]] + k.split(".", 1)[1]: v for k, v in lora_state_dict(trained, text_encoder=True).items()}
    assert sorted(sd) == sorted(ours)
    for k, v in ours.items():
        assert torch.equal(sd[k], v), k
    n_layers = len(_tuner_layers(trained.unet)) + sum(len(_tuner_layers(e)) for e in trained.text_encoders)
    assert len(sd) == 2 * n_layers


def test_stock_pipeline_holds_every_tensor_with_its_scale(exported):
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    family, trained, f = exported
    sd = load_file(str(f))
    pipe = _stock(family)
    pipe.load_lora_weights(str(f.parent))
    held = {}
    parts = [("unet", pipe.unet, trained.unet), ("text_encoder", pipe.text_encoder, trained.text_encoders[0])]
    if family == "sdxl":
        parts.append(("text_encoder_2", pipe.text_encoder_2, trained.text_encoders[1]))
    for prefix, mod, ref in parts:
        (name,) = list(mod.peft_config)  # one adapter, named by diffusers
        held.update({f"{prefix}.{k}": v for k, v in get_peft_model_state_dict(mod, adapter_name=name).items()})
        # the same layers carry a LoRA, each with the trained scale alpha / r = 2
        mine, theirs = _tuner_layers(ref), _tuner_layers(mod)
        assert sorted(theirs) == sorted(mine), prefix
        for n, layer in theirs.items():
            assert layer.scaling[name] == pytest.approx(ALPHA / RANK) == mine[n].scaling["default"], (prefix, n)
    assert len(held) == len(sd)
    assert sorted(held) == sorted(sd)
    for k, v in sd.items():
        assert torch.equal(held[k].cpu(), v), k


def test_stock_pipeline_renders_the_trainers_image(exported):
    family, trained, f = exported
    pipe = _stock(family)
    # the sampler the trainer's pipeline uses (vfeedback's loader sets DDIM); the same scheduler
    # class on both sides, so only the weights can differ
    pipe.scheduler = type(trained.pipe.scheduler).from_config(pipe.scheduler.config)
    latents = torch.randn((1, *trained.latent_shape), generator=torch.Generator().manual_seed(3))
    base = _render(pipe, latents)
    pipe.load_lora_weights(str(f.parent))
    with torch.no_grad():
        mine = _render(trained.pipe, latents)
        theirs = _render(pipe, latents)
    # fp32, the same modules and operations on both sides: equal up to summation order
    assert (mine - theirs).abs().max().item() < 1e-5
    assert (mine - base).abs().max().item() > 0.05  # the LoRA matters, so the equality above does too


def test_shipped_tiny_shapes_loads_with_a_stock_call():
    """``from_pretrained(folder)`` with no dtype or variant argument gives a pipeline that runs
    on CPU: every component fp32 (fp16 weights under the default names failed with 'mat1 and
    mat2 must have the same dtype')."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_path("shapes")))
    pipe.set_progress_bar_config(disable=True)
    for name in ("unet", "vae", "text_encoder"):
        assert getattr(pipe, name).dtype == torch.float32, name
    img = pipe(PROMPT, num_inference_steps=1, output_type="pt").images
    assert img.shape == (1, 3, 32, 32) and torch.isfinite(img).all()


# ------------------------------------------------------------------ the run checks its own export
RUN = {
    "algorithm": "refl",
    "seed": 0,
    "model": {"family": "sd15", "path": "tiny:sd15", "resolution": 32, "gradient_checkpointing": False,
              "lora": {"rank": 4, "alpha": 8, "text_encoder": True, "target_modules": MIXED}},
    "reward": [{"name": "color"}],
    "eval_rewards": [{"name": "brightness"}],
    "prompts": {"train": ["a red apple", "a blue lake", "a green field"], "eval": ["a red apple", "a blue lake"], "eval_seeds": [0]},
    "sampling": {"steps": 6, "guidance_scale": 4.0},
    "refl": {"stop_range": [3, 5], "grad_scale": 1.0},
    "train": {"max_steps": 3, "batch_size": 2, "lr": 3e-2, "weight_decay": 0.0},
    "log": {"trackers": [], "checkpoint_every": 0},
}


def _run(tmp_path, name):
    import json

    import yaml

    from vfeedback.cli import main

    cfg = json.loads(json.dumps(RUN))
    cfg["output_dir"] = str(tmp_path / name)
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    rc = main(["train", str(p)])
    return rc, json.loads((tmp_path / name / "summary.json").read_text())


def test_run_reloads_its_export_and_reports_the_same_eval_reward(tmp_path):
    rc, s = _run(tmp_path, "ok")
    assert rc == 0
    # training moved the eval reward well beyond the tolerance, so agreeing below means something
    assert abs(s["eval_reward_after"] - s["eval_reward_before"]) > 1e-2
    assert s["eval_reward_exported"] == pytest.approx(s["eval_reward_after"], abs=1e-5)
    assert s["eval_brightness_exported"] == pytest.approx(s["eval_brightness_after"], abs=1e-5)


def test_an_export_that_loses_weights_fails_the_run(tmp_path, monkeypatch, capsys):
    """The old fault, re-created: the reloaded model lacks the trained ResNet / time-embedding
    LoRA (here their B matrices are written as zeros, so the file still has every key and only
    the rendered grid can tell); the run must not pass."""
    from vfeedback.models import lora

    real = lora._export_state

    def lossy(module):
        return {k: (torch.zeros_like(v) if "lora_B" in k and ("resnets" in k or "time_emb" in k) else v)
                for k, v in real(module).items()}

    monkeypatch.setattr(lora, "_export_state", lossy)
    rc, s = _run(tmp_path, "lossy")
    assert rc == 1
    err = capsys.readouterr().err
    assert "do not reproduce the trained model" in err and "eval_reward" in err
    assert s["eval_reward_exported"] is not None and abs(s["eval_reward_exported"] - s["eval_reward_after"]) > 1e-3


def test_an_old_mixed_style_file_loads_whole(exported, tmp_path):
    """A file as vfeedback wrote it before the fix (attention renamed by diffusers'
    convert_state_dict_to_diffusers, the rest in peft names) loads whole through load_lora_into
    (what `vfeedback sample --lora`, the IterComp gallery and bench/world_compare.py use)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    from vfeedback.models import load_lora_into

    family, trained, f = exported
    kw = dict(unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(trained.unet)),
              unet_lora_adapter_metadata=trained.unet.peft_config["default"].to_dict())
    names = ["text_encoder", "text_encoder_2"][: len(trained.text_encoders)]
    for name, enc in zip(names, trained.text_encoders):
        kw[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(enc))
        kw[f"{name}_lora_adapter_metadata"] = enc.peft_config["default"].to_dict()
    type(trained.pipe).save_lora_weights(tmp_path / "old", **kw)
    fresh = load_model(family, f"tiny:{family}")
    load_lora_into(fresh, tmp_path / "old")
    latents = torch.randn((1, *trained.latent_shape), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (_render(fresh.pipe, latents) - _render(trained.pipe, latents)).abs().max().item() < 1e-5


def test_load_lora_into_refuses_a_partial_load(exported, tmp_path):
    """A file the pipeline cannot hold whole (here: tensors for modules the model lacks) is a
    clear error, not a silently partial model."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from vfeedback.errors import UserError
    from vfeedback.models import load_lora_into

    family, trained, f = exported
    with safe_open(str(f), "pt") as sf:  # the LoRA config (metadata) kept: only the extra tensor is wrong
        sd, meta = {k: sf.get_tensor(k) for k in sf.keys()}, sf.metadata()
    k = next(k for k in sd if k.startswith("unet.") and "to_q.lora_A" in k)
    sd[k.replace("to_q", "to_nowhere")] = sd[k].clone()
    (tmp_path / "bad").mkdir()
    save_file(sd, str(tmp_path / "bad" / "pytorch_lora_weights.safetensors"), metadata=meta)
    fresh = load_model(family, f"tiny:{family}")
    with pytest.raises(UserError, match=r"LoRA tensors\) the sd15 pipeline holds|LoRA tensors\) the sdxl pipeline holds"):
        load_lora_into(fresh, tmp_path / "bad")
