"""ID-Aligner recipe on tiny models: the IP-Adapter through diffusers' loader, ReFL training a
UNet LoRA with the adapter in place, the differentiable face_id gradient reaching the LoRA when a
face is in the image (and not when none is), and the user errors (docs/id_aligner.md)."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

pytest.importorskip("onnx2torch")
pytest.importorskip("facenet_pytorch")
pytest.importorskip("skimage")

import rewards  # noqa: E402
from vfeedback.cli import main  # noqa: E402
from vfeedback.models import load_model  # noqa: E402
from vfeedback.models.loader import DiffusionModel  # noqa: E402
from vfeedback.sampling import predict_noise  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def face_models(tmp_path_factory):
    """The demo script's tiny ArcFace ONNX + astronaut / coffee photos, in a temp folder."""
    spec = importlib.util.spec_from_file_location("make_tiny_face_models", ROOT / "demos" / "make_tiny_face_models.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.make(tmp_path_factory.mktemp("tiny-face"))


@pytest.fixture(autouse=True)
def _fresh_reward_cache():
    rewards.clear_cache()
    yield
    rewards.clear_cache()


def _ip(ref, scale=1.0, family="sd15"):
    return {"path": f"tiny:{family}", "reference": [str(ref)], "scale": scale}


def _cfg(tmp_path, face_models, out, **over):
    cfg = yaml.safe_load((ROOT / "configs" / "id_aligner" / "tiny.yaml").read_text())
    cfg["output_dir"] = str(out)
    cfg["model"]["ip_adapter"]["reference"] = [str(face_models["face"])]
    fid = cfg["reward"][0]["options"]
    fid.update(model_root=str(face_models["arcface"]), reference=[str(face_models["face"])])
    struct = [r for r in cfg["reward"] if r["name"] == "structure"]
    assert len(struct) == 1  # the paper's aesthetic reward's structure part is wired in
    struct[0]["options"]["path"] = str(face_models["structure"])
    cfg["train"]["max_steps"] = 2
    for k, v in over.items():
        d = cfg
        *head, last = k.split(".")
        for kk in head:
            d = d[kk]
        d[last] = v
    p = tmp_path / f"cfg-{len(list(tmp_path.glob('cfg-*')))}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


# --------------------------------------------------------------------------------------------
# the tiny IP-Adapter through diffusers' load_ip_adapter


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_tiny_ip_adapter_loads_and_conditions_on_the_reference(face_models, family):
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
    from safetensors.torch import load_file

    from vfeedback.models.tiny import TINY_IP_WEIGHT, tiny_ip_adapter_path

    path = f"tiny:{family}"
    m = load_model(family, path, ip_adapter=_ip(face_models["face"], family=family))
    # diffusers read our key layout: the checkpoint's to_k_ip / to_v_ip are in the processors, in order
    sd = load_file(str(tiny_ip_adapter_path(family) / "models" / TINY_IP_WEIGHT))
    cross = [p for n, p in m.unet.attn_processors.items() if n.endswith("attn2.processor")]
    assert cross and all(isinstance(p, IPAdapterAttnProcessor2_0) for p in cross)
    for i, p in enumerate(cross):
        torch.testing.assert_close(p.to_k_ip[0].weight, sd[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"])
        torch.testing.assert_close(p.to_v_ip[0].weight, sd[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"])
    assert not any(p.requires_grad for p in m.unet.parameters())  # adapter frozen like the rest
    assert m.pipe.image_encoder is None  # the reference was encoded once, the encoder dropped

    cond = m.encode_prompt(["a portrait", "a photo"], cfg=True)
    assert [tuple(t.shape) for t in cond.image_embeds] == [(2, 1, 16)]
    _, added = cond.unet_inputs(True)
    emb = added["image_embeds"][0]
    assert emb.shape == (4, 1, 16) and emb[:2].abs().sum() == 0 and emb[2:].abs().sum() > 0  # zeros as CFG negative
    rep = cond.repeat(3)
    assert rep.image_embeds[0].shape == (6, 1, 16) and rep.neg_image_embeds[0].shape == (6, 1, 16)

    x = torch.randn((2, *m.latent_shape), generator=torch.Generator().manual_seed(0))

    def eps(model):
        with torch.no_grad():
            return predict_noise(model, x, 500, model.encode_prompt(["a portrait", "a photo"], cfg=True), 4.0)

    e_face = eps(m)
    e_other = eps(load_model(family, path, ip_adapter=_ip(face_models["no_face"], family=family)))
    e_off = eps(load_model(family, path, ip_adapter=_ip(face_models["face"], scale=0.0, family=family)))
    e_none = eps(load_model(family, path))
    assert (e_face - e_other).abs().max() > 1e-2  # the output follows the reference image
    assert (e_face - e_none).abs().max() > 1e-2
    torch.testing.assert_close(e_off, e_none)  # scale 0: exactly the model without the adapter


# --------------------------------------------------------------------------------------------
# training with the adapter in place


def test_refl_trains_a_lora_with_the_adapter_in_place(tmp_path, face_models):
    from safetensors.torch import load_file

    out = tmp_path / "run"
    assert main(["train", str(_cfg(tmp_path, face_models, out))]) == 0
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2]
    # random tiny images hold no face: the identity term is the constant no-face score
    assert all(r["reward/face_id"] == -1.0 and 0 <= r["reward/saturation"] <= 1 for r in recs)
    assert all(math.isfinite(r["reward/structure"]) for r in recs)
    lora = load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))
    assert lora and all("lora" in k and "_ip" not in k for k in lora)  # only the LoRA was saved / trained
    assert any(v.abs().sum() > 0 for k, v in lora.items() if ".lora_B." in k)
    # the LoRA loads back with diffusers into a pipeline that has the adapter, and changes it
    m = load_model("sd15", "tiny:sd15", resolution=32, ip_adapter=_ip(face_models["face"]))
    x = torch.randn((1, *m.latent_shape), generator=torch.Generator().manual_seed(0))
    cond = m.encode_prompt(["a portrait of a woman smiling"], cfg=True)
    with torch.no_grad():
        before = predict_noise(m, x, 500, cond, 4.0)
        m.pipe.load_lora_weights(str(out / "lora"))
        after = predict_noise(m, x, 500, cond, 4.0)
    assert (after - before).abs().max() > 1e-4


def test_identity_gradient_reaches_the_lora_only_when_a_face_is_present(tmp_path, face_models, monkeypatch):
    """face_id alone as the reward; the decoder is replaced by 'the astronaut photo + a small
    function of the latents' (a generated face the tiny model cannot draw). The gradient of the
    identity reward flows ArcFace (onnx2torch) -> alignment warp -> pixels -> latents -> UNet LoRA;
    with a faceless image the reward is the constant no-face score and nothing flows."""
    from vfeedback.config import load_config
    from vfeedback.engine import Trainer

    cfg_path = _cfg(tmp_path, face_models, tmp_path / "run")
    data = yaml.safe_load(cfg_path.read_text())
    data["reward"] = data["reward"][:1]  # face_id only
    cfg_path.write_text(yaml.safe_dump(data))
    tr = Trainer(load_config(cfg_path))
    tr.setup()
    names = [n for n, p in tr.model.unet.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    ip_params = [p for n, p in tr.model.unet.named_parameters() if "to_k_ip" in n or "to_v_ip" in n or "encoder_hid_proj" in n]
    assert ip_params and not any(p.requires_grad for p in ip_params)  # the adapter stays frozen

    face = rewards.to_tensor(face_models["face"])
    face = F.interpolate(face, size=(192, 192), mode="bilinear", antialias=True, align_corners=False)

    def decode_with(base):
        def decode(self, latents, checkpoint=False):
            z = F.interpolate(latents[:, :3].float(), size=base.shape[-2:], mode="bilinear", align_corners=False)
            return (base.expand(latents.shape[0], -1, -1, -1) + 0.03 * torch.tanh(z)).clamp(0, 1)
        return decode

    def step():
        tr.optimizer.zero_grad(set_to_none=True)
        gens = [torch.Generator().manual_seed(i) for i in range(2)]
        loss, mets = tr.method.train_step(["a portrait of a woman", "a woman smiling"], gens, torch.Generator().manual_seed(0))
        return loss, mets

    monkeypatch.setattr(DiffusionModel, "decode", decode_with(face))
    loss, mets = step()
    assert mets["reward_mean"] > 0.5  # the (tiny) ArcFace sees the reference face again
    loss.backward()
    grads = [p.grad for n, p in tr.model.unet.named_parameters() if p.requires_grad]
    total = sum(float(g.abs().sum()) for g in grads if g is not None)
    assert total > 0 and all(torch.isfinite(g).all() for g in grads if g is not None)
    assert all(p.grad is None for p in ip_params)

    monkeypatch.setattr(DiffusionModel, "decode", decode_with(torch.full_like(face, 0.5)))
    loss, mets = step()
    assert mets["reward_mean"] == -1.0 and not loss.requires_grad  # no face: no identity gradient


# --------------------------------------------------------------------------------------------
# user errors: exit 2 before any weight loads or any folder is made


def test_reference_without_a_face_is_exit_2_naming_the_file(tmp_path, face_models, capsys):
    out = tmp_path / "run"
    cfg = _cfg(tmp_path, face_models, out)
    data = yaml.safe_load(cfg.read_text())
    data["reward"][0]["options"]["reference"] = [str(face_models["no_face"])]
    cfg.write_text(yaml.safe_dump(data))
    assert main(["train", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "no face found in reference" in err and "no_face.png" in err
    assert not out.exists()


def test_ip_adapter_config_errors(tmp_path, face_models, capsys):
    missing = tmp_path / "nobody.png"
    assert main(["validate", str(_cfg(tmp_path, face_models, tmp_path / "a", **{"model.ip_adapter.reference": [str(missing)]}))]) == 2
    assert "model.ip_adapter.reference.0" in capsys.readouterr().err
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    assert main(["validate", str(_cfg(tmp_path, face_models, tmp_path / "b", **{"model.ip_adapter.reference": [str(bad)]}))]) == 2
    assert "bad.png is not a readable image" in capsys.readouterr().err
    # every algorithm accepts the adapter now (d3po / zo_ranksgd carry the image embeddings)
    assert main(["validate", str(_cfg(tmp_path, face_models, tmp_path / "c", algorithm="zo_ranksgd"))]) == 0
    assert main(["validate", str(_cfg(tmp_path, face_models, tmp_path / "d"))]) == 0


# --------------------------------------------------------------------------------------------
# D3PO and ZO-RankSGD with the adapter: Conditioning.take / .cat carry the image embeddings


def _algo_cfg(tmp_path, name, face, scale=1.0, **over):
    cfg = yaml.safe_load((ROOT / "configs" / name / "tiny.yaml").read_text())
    cfg["output_dir"] = str(tmp_path / f"run-{name}-{scale}")
    cfg["model"]["ip_adapter"] = _ip(face, scale)
    cfg["log"] = {"trackers": []}
    for k, v in over.items():
        d = cfg
        *head, last = k.split(".")
        for kk in head:
            d = d.setdefault(kk, {})
        d[last] = v
    p = tmp_path / f"{name}-{scale}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p, Path(cfg["output_dir"])


def test_conditioning_take_and_cat_keep_the_image_embeddings(face_models):
    from vfeedback.models.loader import Conditioning

    m = load_model("sd15", "tiny:sd15", resolution=32, ip_adapter=_ip(face_models["face"]))
    base = m.encode_prompt(["a portrait", "a photo"], cfg=True)
    c = Conditioning.cat([base.take([1, 1]), base.take([0])])
    assert c.embeds.shape[0] == 3 and [t.shape[0] for t in c.image_embeds] == [3] and c.neg_image_embeds[0].shape[0] == 3
    torch.testing.assert_close(c.embeds[2], base.embeds[0])
    torch.testing.assert_close(c.image_embeds[0][0], base.image_embeds[0][1])
    plain = load_model("sd15", "tiny:sd15", resolution=32).encode_prompt(["a"], cfg=False).take([0, 0])
    assert plain.image_embeds is None and plain.neg_embeds is None and plain.embeds.shape[0] == 2


def test_d3po_trains_with_the_ip_adapter(tmp_path, face_models):
    """A D3PO run with the adapter through the CLI; then one D3PO step by hand: the trajectories
    depend on the adapter (scale 1 vs 0 from the same seeds), pi_theta == pi_ref before the step
    (both see the same reference embeddings), and the step raises the preferred trajectory's
    log-ratio and lowers the rejected one's."""
    from types import SimpleNamespace

    from accelerate import Accelerator

    from vfeedback.algorithms.d3po import D3PO, _Batch, _cat, _take, sample_items
    from vfeedback.config import load_config
    from vfeedback.feedback.preferences import PreferenceItem
    from vfeedback.models import add_lora

    from tests.test_d3po import _log_ratios

    face = face_models["face"]
    p, out = _algo_cfg(tmp_path, "d3po", face, **{"train.max_steps": 2, "sampling.steps": 3, "prompts.eval": ["a red apple"],
                                                   "prompts.eval_seeds": [0], "d3po.winrate_seeds": [1000], "model.resolution": 32})
    assert main(["train", str(p)]) == 0
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and all("d3po/pairs" in r and r["skipped"] is False for r in recs)
    assert (out / "lora" / "pytorch_lora_weights.safetensors").is_file()

    cfg = load_config(p, ["d3po.ratio_clip=null", "sampling.steps=3", "d3po.timestep_fraction=1.0"])
    s = cfg.sampling
    items = [PreferenceItem(latent_seed=7, noise_seed=1), PreferenceItem(latent_seed=7, noise_seed=2)]
    trajs = {}
    for scale in (0.0, 1.0):
        m = load_model("sd15", "tiny:sd15", resolution=32, ip_adapter=_ip(face, scale))
        base = m.encode_prompt(["a red apple"], cfg=True)
        cond = _cat([_take(base, [0]), _take(base, [0])])
        trajs[scale] = sample_items(m, cond, items, num_steps=s.steps, guidance_scale=s.guidance_scale, eta=s.eta, decode=False).trajectory
    assert (trajs[1.0] - trajs[0.0]).abs().max() > 1e-3  # the adapter shapes the sampled trajectories

    params = add_lora(m, 4, None, ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "conv1", "conv2"])
    m.unet.train()
    trainer = SimpleNamespace(model=m, reward=rewards.load("color"), config_source=None, acc=Accelerator(cpu=True),
                              eval_prompts=["a red apple"], train_prompts=["a red apple"])
    method = D3PO(cfg, trainer)
    batch = _Batch(cond, trajs[1.0], [0, 0], [(0, 1)])

    def log_ratios():
        return _log_ratios(method, batch, cfg)  # method.trainer.model is m, cfg.sampling is s

    assert torch.allclose(log_ratios(), torch.zeros(2), atol=1e-6)
    opt = torch.optim.SGD(params, lr=0.5)
    method._train_on(batch, [torch.Generator().manual_seed(0)], {}, pair_total=1)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    opt.step()
    after = log_ratios()
    assert after[0] > 0 > after[1], after


def test_zo_ranksgd_runs_with_the_ip_adapter(tmp_path, face_models):
    """ZO-RankSGD through the CLI with the adapter (latent target), and the prompt-embedding
    target (which rebuilds Conditioning itself) rendering different candidates at scale 1 and 0."""
    from vfeedback.algorithms.zo_ranksgd_diffusion import RankingSession, load_model_for
    from vfeedback.config import load_config

    face = face_models["face"]
    fast = {"sampling.steps": 3, "zo_ranksgd.num_candidates": 3, "zo_ranksgd.rounds": 2, "model.resolution": 32}
    p, out = _algo_cfg(tmp_path, "zo_ranksgd", face, **fast)
    assert main(["train", str(p)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2
    imgs = {}
    for scale in (0.0, 1.0):
        p, _ = _algo_cfg(tmp_path, "zo_ranksgd", face, scale, **fast)
        cfg = load_config(p, ["zo_ranksgd.target=prompt_embedding", "prompts.eval_seeds=[0]"])
        m = load_model_for(cfg)
        assert m.ip_image_embeds is not None  # load_model_for passes model.ip_adapter
        imgs[scale] = RankingSession.from_config(cfg, model=m).ask().images
    assert imgs[1.0].shape == imgs[0.0].shape and (imgs[1.0] - imgs[0.0]).abs().max() > 1e-3
