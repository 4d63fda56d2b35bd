"""The model-backed scorers, each loaded through its real loader from a tiny random checkpoint
written in the real on-disk format (no network):

- open_clip: a tiny architecture registered with ``open_clip.add_model_config`` and its state
  dict saved as ``{'state_dict': ...}`` (the HPSv2 / open_clip checkpoint layout), loaded with
  ``pretrained=<file>`` / ``checkpoint=<file>``;
- the aesthetic head: the ``layers.N.weight`` state dict as ``.pth`` and ``.safetensors``;
- transformers: a tiny ``CLIPModel`` + ``CLIPProcessor`` (PickScore) and a tiny LLaVA
  (VQAScore) written with ``save_pretrained``.

Checks: shapes, determinism, gradients reaching the pixels, batching equal to one-by-one, and
that the torch preprocessing and scores match the libraries' own PIL pipelines on photos.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import rewards
from rewards import RewardError
from rewards.images import pil_to_tensor

torch.set_num_threads(1)
TINY_CLIP = "vf-tiny-clip"


# --------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def photos():
    """Two real photos: astronaut (512x512, scikit-image) and Grace Hopper (512x600, matplotlib)."""
    from PIL import Image

    skdata = pytest.importorskip("skimage.data")
    from matplotlib import cbook

    astro = Image.fromarray(skdata.astronaut())
    with Image.open(cbook.get_sample_data("grace_hopper.jpg")) as im:
        hopper = im.convert("RGB")
    return [astro, hopper]


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory):
    """Register a tiny open_clip architecture and write its checkpoint; returns the file path."""
    import open_clip

    d = tmp_path_factory.mktemp("openclip")
    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 48, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    }
    (d / f"{TINY_CLIP}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(d / f"{TINY_CLIP}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_CLIP)
    path = d / "tiny_hps.pt"
    torch.save({"state_dict": model.state_dict(), "epoch": 1}, path)
    yield str(path)
    rewards.clear_cache()


@pytest.fixture(scope="module")
def aesthetic_weights(tmp_path_factory):
    """The LAION head's state dict (input 32 = the tiny CLIP's embedding) as .pth and .safetensors."""
    from safetensors.torch import save_file

    from rewards.aesthetic import AestheticMLP

    d = tmp_path_factory.mktemp("aesthetic")
    torch.manual_seed(1)
    head = AestheticMLP(32)
    sd = {k: v.contiguous() for k, v in head.state_dict().items()}
    assert "layers.0.weight" in sd and "layers.7.bias" in sd  # the published key layout
    torch.save(sd, d / "sac+logos+ava1-l14-linearMSE.pth")
    save_file(sd, str(d / "head.safetensors"))
    return {"pth": str(d / "sac+logos+ava1-l14-linearMSE.pth"), "safetensors": str(d / "head.safetensors"), "head": head}


def _clip_tokenizer():
    """A real CLIP BPE tokenizer for transformers, built from the vocabulary open_clip ships."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    st = SimpleTokenizer()
    merges = [tuple(p) for p, _ in sorted(st.bpe_ranks.items(), key=lambda kv: kv[1])]
    eot = "<end_of_text>"
    return CLIPTokenizer(vocab=dict(st.encoder), merges=merges, bos_token="<start_of_text>", eos_token=eot, unk_token=eot, pad_token=eot)


@pytest.fixture(scope="module")
def tiny_hf_clip(tmp_path_factory):
    """A tiny transformers CLIPModel and CLIPProcessor saved with save_pretrained (PickScore's format)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    d = tmp_path_factory.mktemp("pickscore")
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 40, "width": 40}), tokenizer=_clip_tokenizer())
    proc.save_pretrained(d / "processor")
    layer = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, projection_dim=16)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=49408, max_position_embeddings=77, **layer),
        vision_config=dict(image_size=40, patch_size=8, **layer),
        projection_dim=16,
    )
    torch.manual_seed(2)
    CLIPModel(cfg).save_pretrained(d / "model")
    return {"model": str(d / "model"), "processor": str(d / "processor")}


LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% endfor %}{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    """A tiny LLaVA (CLIP vision tower + Llama) with processor and chat template, via save_pretrained."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    words = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "USER", "ASSISTANT", ":", '"', "?", ".", "Yes", "yes", "no",
             "Does", "this", "image", "show", "Please", "answer", "or", "a", "an", "astronaut", "woman", "cat", "red", "ball"]
    vocab = {w: i for i, w in enumerate(words)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>", extra_special_tokens={"image_token": "<image>"})
    proc = LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tok, patch_size=8, vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE,
    )
    d = tmp_path_factory.mktemp("llava")
    proc.save_pretrained(d)
    cfg = LlavaConfig(
        vision_config=CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        text_config=LlamaConfig(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=2, eos_token_id=3),
        image_token_index=vocab["<image>"],
        vision_feature_layer=-1,
    )
    torch.manual_seed(3)
    LlavaForConditionalGeneration(cfg).save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def scorers(tiny_open_clip, aesthetic_weights, tiny_hf_clip, tiny_llava):
    """Every model-backed scorer, loaded through rewards.load exactly as a user would."""
    return {
        "clip": rewards.load("clip", model=TINY_CLIP, pretrained=tiny_open_clip, device="cpu", raw=True),
        "aesthetic": rewards.load("aesthetic", weights=aesthetic_weights["pth"], clip_model=TINY_CLIP, clip_pretrained=tiny_open_clip, device="cpu"),
        "hpsv2": rewards.load("hpsv2", checkpoint=tiny_open_clip, model=TINY_CLIP, device="cpu"),
        "pickscore": rewards.load("pickscore", model=tiny_hf_clip["model"], processor=tiny_hf_clip["processor"], device="cpu"),
        "vqa": rewards.load("vqa", model=tiny_llava, device="cpu"),
    }


PROMPTS = ["an astronaut", "a woman in red", "a cat", "a red ball"]


def _images(photos):
    """Four (3, 96, 96) images: the two photos downsized plus two mirrored, so batches mix content."""
    x = torch.stack([torch.nn.functional.interpolate(pil_to_tensor(p)[None], size=(96, 96), mode="area")[0] for p in photos])
    return torch.cat([x, x.flip(-1)])


# --------------------------------------------------------------------------------------------
# the contract, for every scorer


SCORERS = ["clip", "aesthetic", "hpsv2", "pickscore", "vqa"]


@pytest.mark.parametrize("name", SCORERS)
def test_shape_determinism_batching(name, scorers, photos):
    r = scorers[name]
    x = _images(photos)
    with torch.no_grad():
        a = r(x, PROMPTS)
        b = r(x, PROMPTS)
        one = torch.cat([r(x[i : i + 1], PROMPTS[i : i + 1]) for i in range(len(x))])
    assert a.shape == (4,) and a.dtype == torch.float32
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)
    torch.testing.assert_close(a, one, rtol=1e-4, atol=1e-5)
    assert r.differentiable and rewards.available()  # registered as differentiable


@pytest.mark.parametrize("name", SCORERS)
def test_gradients_reach_pixels(name, scorers, photos):
    r = scorers[name]
    x = _images(photos)[:2].clone().requires_grad_(True)
    r(x, PROMPTS[:2]).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert x.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in r.parameters())  # frozen: gradients only for the pixels


def test_score_paths_pil_and_prompt_broadcast(scorers, photos, tmp_path):
    r = scorers["clip"]
    photos[0].save(tmp_path / "a.png")
    from_path = r.score([str(tmp_path / "a.png")], "an astronaut")
    from_pil = r.score([photos[0]], ["an astronaut"])
    assert from_path == pytest.approx(from_pil, abs=1e-6)


# --------------------------------------------------------------------------------------------
# torch preprocessing == the libraries' PIL preprocessing, on photos


def _close_to_pil(mine: torch.Tensor, ref: torch.Tensor):
    """PIL rounds to uint8 and clamps between its two resize passes: allow that, nothing more."""
    assert mine.shape == ref.shape
    d = (mine - ref).abs()
    assert d.mean() < 0.01, d.mean()  # normalised units: ~0.25/255 in pixel terms
    assert torch.quantile(d.flatten(), 0.999) < 0.1


def test_preprocess_matches_open_clip(scorers, photos):
    import open_clip

    r = scorers["clip"]
    model = r.model
    from open_clip.transform import PreprocessCfg, image_transform_v2

    pp = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    for im in photos:
        ref = pp(im)[None]
        mine = r.preprocess(pil_to_tensor(im)[None])
        _close_to_pil(mine, ref)
        with torch.no_grad():
            e_ref = torch.nn.functional.normalize(model.encode_image(ref), dim=-1)
            e_mine = torch.nn.functional.normalize(model.encode_image(mine), dim=-1)
        assert (e_ref * e_mine).sum() > 0.999


def test_hpsv2_pads_like_resize_max_size(scorers, photos):
    """HPSv2 preprocesses with ResizeMaxSize (= open_clip's resize_mode='longest'): pad, not crop."""
    import open_clip

    r = scorers["hpsv2"]
    size = r.preprocess.spec.size
    assert r.preprocess.spec.resize_mode == "longest"
    pp = open_clip.image_transform(size, is_train=False, resize_mode="longest")
    im = photos[1]  # 512x600: non-square, so padding shows
    ref = pp(im)[None]
    mine = r.preprocess(pil_to_tensor(im)[None])
    _close_to_pil(mine, ref)
    black = (0 - torch.tensor(r.preprocess.spec.mean)) / torch.tensor(r.preprocess.spec.std)
    torch.testing.assert_close(mine[0, :, :, 0], black[:, None].expand(3, size[0]))


def test_preprocess_matches_hf_image_processor(scorers, photos):
    r = scorers["pickscore"]
    for im in photos:
        ref = r.processor(images=im, return_tensors="pt")["pixel_values"]
        _close_to_pil(r.preprocess(pil_to_tensor(im)[None]), ref)


# --------------------------------------------------------------------------------------------
# scores == the reference recipes


def test_clip_score_matches_reference(scorers, photos, tiny_open_clip):
    import open_clip

    r = scorers["clip"]
    model, _, pp = open_clip.create_model_and_transforms(TINY_CLIP, pretrained=tiny_open_clip)
    tok = open_clip.get_tokenizer(TINY_CLIP)
    with torch.no_grad():
        img = torch.nn.functional.normalize(model.encode_image(torch.stack([pp(p) for p in photos])), dim=-1)
        txt = torch.nn.functional.normalize(model.encode_text(tok(PROMPTS[:2])), dim=-1)
    ref = (img * txt).sum(-1)
    got = torch.tensor(r.score(photos, PROMPTS[:2]))
    torch.testing.assert_close(got, ref, atol=5e-3, rtol=0)
    clamped = rewards.load("clip", model=TINY_CLIP, pretrained=tiny_open_clip, device="cpu")
    torch.testing.assert_close(torch.tensor(clamped.score(photos, PROMPTS[:2])), (100 * got).clamp_min(0), atol=1e-3, rtol=1e-4)


def test_hpsv2_matches_reference_recipe(scorers, photos, tiny_open_clip):
    """The HPSv2 recipe: load_state_dict(ckpt['state_dict']), ResizeMaxSize, diag(img @ txt.T)."""
    import open_clip

    model = open_clip.create_model(TINY_CLIP)
    model.load_state_dict(torch.load(tiny_open_clip, weights_only=True)["state_dict"])
    model.eval()
    pp = open_clip.image_transform(model.visual.image_size, is_train=False, resize_mode="longest")
    tok = open_clip.get_tokenizer(TINY_CLIP)
    with torch.no_grad():
        out = model(torch.stack([pp(p) for p in photos]), tok(PROMPTS[:2]))
        ref = torch.diagonal(out[0] @ out[1].T)
    got = torch.tensor(scorers["hpsv2"].score(photos, PROMPTS[:2]))
    torch.testing.assert_close(got, ref, atol=5e-3, rtol=0)


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_aesthetic_matches_reference(fmt, scorers, photos, aesthetic_weights, tiny_open_clip):
    import open_clip

    r = rewards.load("aesthetic", weights=aesthetic_weights[fmt], clip_model=TINY_CLIP, clip_pretrained=tiny_open_clip, device="cpu")
    model, _, pp = open_clip.create_model_and_transforms(TINY_CLIP, pretrained=tiny_open_clip)
    head = aesthetic_weights["head"].eval()
    with torch.no_grad():
        emb = model.encode_image(torch.stack([pp(p) for p in photos]))
        ref = head(emb / emb.norm(dim=-1, keepdim=True)).squeeze(-1)
    torch.testing.assert_close(torch.tensor(r.score(photos)), ref, atol=5e-3, rtol=1e-3)
    assert r.model is scorers["clip"].model  # one CLIP backbone shared by clip and aesthetic


def test_pickscore_matches_reference(scorers, photos, tiny_hf_clip):
    """The PickScore recipe: processor -> CLIPModel -> logit_scale.exp() * cosine."""
    r = scorers["pickscore"]
    inputs = r.processor(text=PROMPTS[:2], images=photos, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        ref = torch.diagonal(r.model(**inputs).logits_per_image)
    torch.testing.assert_close(torch.tensor(r.score(photos, PROMPTS[:2])), ref, atol=2e-2, rtol=1e-3)


def test_vqa_matches_next_token_probability(scorers, photos):
    """P('Yes') from the model's own processor pipeline (PIL) and next-token softmax."""
    r = scorers["vqa"]
    text = r.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f'Does this image show "{PROMPTS[0]}"? Please answer yes or no.'}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    inputs = r.processor(text=[text], images=[photos[0]], return_tensors="pt")
    yes = r.tokenizer.convert_tokens_to_ids("Yes")
    with torch.no_grad():
        ref = torch.softmax(r.model(**inputs).logits[0, -1].float(), -1)[yes]
    got = r.score([photos[0]], PROMPTS[:1])[0]
    assert got == pytest.approx(float(ref), rel=2e-2)
    assert 0.0 < got < 1.0


# --------------------------------------------------------------------------------------------
# errors a user can act on


def test_missing_weights_say_what_to_do(tiny_open_clip, monkeypatch, tmp_path):
    with pytest.raises(RewardError, match="weights: no such file"):
        rewards.load("aesthetic", weights=str(tmp_path / "missing.pth"), clip_model=TINY_CLIP, clip_pretrained=tiny_open_clip, device="cpu")

    import huggingface_hub

    def offline(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(RewardError, match=r"HPS_v2\.1_compressed\.pt.*checkpoint=/path"):
        rewards.load("hpsv2", model=TINY_CLIP, device="cpu")
    with pytest.raises(RewardError, match="neither a pretrained tag"):
        rewards.load("clip", model=TINY_CLIP, pretrained="no-such-tag", device="cpu")
    with pytest.raises(RewardError, match="unknown open_clip model"):
        rewards.load("clip", model="ViT-Nope", device="cpu")
    with pytest.raises(RewardError, match="pass model=/local/folder"):
        rewards.load("pickscore", model=str(tmp_path / "nothing"), processor=str(tmp_path / "nothing"), device="cpu")


class _Arbitrary:
    """An object a bare pickle load would construct (weights_only=True must refuse it)."""


def test_unsafe_or_wrong_checkpoints_are_refused(tmp_path, tiny_open_clip):
    bad = tmp_path / "pickled.pth"
    torch.save({"layers.0.weight": torch.zeros(1024, 32), "x": _Arbitrary()}, bad)
    with pytest.raises(RewardError, match="weights_only"):
        rewards.load("aesthetic", weights=str(bad), clip_model=TINY_CLIP, clip_pretrained=tiny_open_clip, device="cpu")
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, wrong)
    with pytest.raises(RewardError, match="not an aesthetic-predictor state dict"):
        rewards.load("aesthetic", weights=str(wrong), clip_model=TINY_CLIP, clip_pretrained=tiny_open_clip, device="cpu")


def test_prompt_required(scorers, photos):
    with pytest.raises(RewardError, match="needs a prompt"):
        scorers["clip"](_images(photos), None)


def test_imagereward_offline_names_the_downloads(tmp_path, monkeypatch):
    """ImageReward runs on transformers' BLIP (no image-reward package): installed wherever
    vfeedback is; without its checkpoint it names the download and the option."""
    info = {i.name: i for i in rewards.available()}["imagereward"]
    assert info.requires == ("transformers",) and info.installed and info.differentiable and info.extra is None
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.cache/ImageReward (the package's download folder)
    with pytest.raises(RewardError, match=r"hf download THUDM/ImageReward ImageReward\.pt.*model=/path/to/ImageReward\.pt"):
        rewards.load("imagereward", device="cpu")
    with pytest.raises(RewardError, match=r"model: no such file"):
        rewards.load("imagereward", model=str(tmp_path / "nope.pt"), device="cpu")


def test_import_rewards_stays_light():
    code = "import sys, rewards; rewards.available(); print([m for m in ('open_clip', 'transformers') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env={"OMP_NUM_THREADS": "1", "PATH": ""})
    assert out.stdout.strip() == "[]"


def test_loaded_once_and_cached(tiny_open_clip):
    a = rewards.load("hpsv2", checkpoint=tiny_open_clip, model=TINY_CLIP, device="cpu")
    b = rewards.load("hpsv2", checkpoint=tiny_open_clip, model=TINY_CLIP, device="cpu")
    assert a is b
