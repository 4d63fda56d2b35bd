"""Tiny, seeded, random-weight pipelines of the real SD1.5 / SDXL architectures.

``tiny:sd15`` and ``tiny:sdxl`` are built in code (the same component classes as the real
models, shrunk the way diffusers' own tests shrink them), written with ``save_pretrained`` to a
cache folder and then loaded through the very ``from_pretrained`` path a hub model or local
folder takes. The tokenizer is built offline from the BPE vocabulary open_clip ships, which
is the vocabulary of OpenAI's CLIP tokenizer that SD1.5 and SDXL use.
"""
from __future__ import annotations

import gzip
import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

TINY_VERSION = "1"  # bump when a builder changes so caches are rebuilt
TINY_NAMES = ("sd15", "sdxl")


def cache_root() -> Path:
    return Path(os.environ.get("VFEEDBACK_CACHE", Path.home() / ".cache" / "vfeedback"))


def write_clip_tokenizer(folder: Path) -> None:
    """Write ``vocab.json`` + ``merges.txt`` of the CLIP BPE tokenizer, from open_clip's file.

    The vocabulary is built exactly as CLIP's ``SimpleTokenizer`` does: 256 byte symbols, the
    same with ``</w>``, then one entry per merge, then the two special tokens (49408 in all).
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    byte_syms = list(bytes_to_unicode().values())
    vocab = byte_syms + [s + "</w>" for s in byte_syms]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tok = CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=77)
    tok.save_pretrained(folder)


def _text_config(projection_dim: int | None = None, hidden: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        projection_dim=projection_dim or hidden,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )


def _vae():
    from diffusers import AutoencoderKL

    # three levels -> a latent 4x smaller than the image (the real VAE is 8x with four).
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
        block_out_channels=[16, 32, 32],
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )


def _scheduler():
    from diffusers import DDIMScheduler

    # SD1.5's own scheduler settings.
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        num_train_timesteps=1000,
    )


def build_sd15(seed: int = 0):
    """Components of a tiny SD1.5 pipeline (UNet2DConditionModel, AutoencoderKL, CLIP)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    vae = _vae()
    text_encoder = CLIPTextModel(_text_config())
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, scheduler=_scheduler()), StableDiffusionPipeline


def build_sdxl(seed: int = 0):
    """Components of a tiny SDXL pipeline: two text encoders, text_time added conditioning."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        # 6 time ids x 8 + text_encoder_2's projection (32)
        projection_class_embeddings_input_dim=6 * 8 + 32,
        cross_attention_dim=64,  # 32 (encoder 1) + 32 (encoder 2), concatenated as in SDXL
        norm_num_groups=16,
    )
    vae = _vae()
    te1 = CLIPTextModel(_text_config())
    te2 = CLIPTextModelWithProjection(_text_config(projection_dim=32))
    comps = dict(unet=unet, vae=vae, text_encoder=te1, text_encoder_2=te2, scheduler=_scheduler())
    return comps, StableDiffusionXLPipeline


BUILDERS = {"sd15": build_sd15, "sdxl": build_sdxl}


#: trained tiny pipelines shipped in the package (not built in code): ``tiny:shapes`` draws the
#: shapes world (vfeedback/world, docs/world.md)
SHIPPED = {"shapes": Path(__file__).resolve().parents[1] / "assets" / "tiny-shapes"}


@contextlib.contextmanager
def _building(folder: Path, prefix: str):
    """Yield a temp folder beside ``folder`` to build into; on success it is renamed to
    ``folder`` (another process that won the race built an identical copy: ours is dropped);
    on any failure it is removed."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=folder.parent))
    try:
        yield tmp
        try:
            os.replace(tmp, folder)
        except OSError:  # another process won the race; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def tiny_path(name: str, seed: int = 0) -> Path:
    """Folder holding the saved tiny pipeline ``name``; built (atomically) on first use."""
    if name in SHIPPED:
        if not (SHIPPED[name] / "model_index.json").exists():
            from ..errors import UserError

            raise UserError(f"model.path: tiny:{name} weights are missing from {SHIPPED[name]}; run `make world` to train them")
        return SHIPPED[name]
    if name not in BUILDERS:
        from ..errors import UserError

        raise UserError(f"model.path: unknown tiny model 'tiny:{name}'; choose one of {', '.join('tiny:' + n for n in [*BUILDERS, *SHIPPED])}")
    key = hashlib.sha1(f"{name}-{seed}-{TINY_VERSION}".encode()).hexdigest()[:10]
    folder = cache_root() / "tiny" / f"{name}-{key}"
    if (folder / "model_index.json").exists():
        return folder
    with _building(folder, f".{name}-") as tmp:
        comps, pipe_cls = BUILDERS[name](seed)
        write_clip_tokenizer(tmp / "tokenizer")
        from transformers import CLIPTokenizer

        tok = CLIPTokenizer.from_pretrained(tmp / "tokenizer")
        shutil.rmtree(tmp / "tokenizer")
        comps["tokenizer"] = tok
        if name == "sdxl":
            comps["tokenizer_2"] = tok
        else:
            comps.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        if name == "sdxl":
            comps.update(image_encoder=None, feature_extractor=None)
        pipe = pipe_cls(**comps)
        pipe.save_pretrained(tmp, safe_serialization=True)
    return folder


# --------------------------------------------------------------------------------------------
# tiny IP-Adapter (tests and the CPU demo of ID-Aligner's adapter variant, docs/id_aligner.md)

TINY_IP_WEIGHT = "ip-adapter_tiny.safetensors"


def write_tiny_ip_adapter(folder, unet_config: dict, seed: int = 0, image_embed_dim: int = 16) -> Path:
    """Write a tiny, seeded, random IP-Adapter for a UNet, in the layout of ``h94/IP-Adapter``.

    ``folder/models/ip-adapter_tiny.safetensors`` holds the basic IP-Adapter (ImageProjection)
    with the keys diffusers' ``load_ip_adapter`` reads: ``image_proj.proj.weight/bias``
    (``(4 * cross_attention_dim, image_embed_dim)``: four image tokens), ``image_proj.norm.weight/bias``
    and ``ip_adapter.{1,3,5,...}.to_k_ip.weight`` / ``to_v_ip.weight`` (``(hidden, cross_attention_dim)``),
    one pair per cross-attention processor in ``unet.attn_processors`` order (the odd numbers: the
    original checkpoints number self- and cross-attention processors together).
    ``folder/models/image_encoder`` holds a tiny ``CLIPVisionModelWithProjection`` (projection
    ``image_embed_dim``, 32x32 input) and its ``CLIPImageProcessor``. Returns ``folder``.
    """
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    folder = Path(folder)
    models = folder / "models"
    models.mkdir(parents=True, exist_ok=True)
    # the processor names and sizes come from the UNet itself (built on the meta device: no weights)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
    cad = unet.config.cross_attention_dim
    blocks = list(unet.config.block_out_channels)
    g = torch.Generator().manual_seed(seed)
    sd = {
        "image_proj.proj.weight": torch.randn(4 * cad, image_embed_dim, generator=g) / image_embed_dim**0.5,
        "image_proj.proj.bias": torch.zeros(4 * cad),
        "image_proj.norm.weight": torch.ones(cad),
        "image_proj.norm.bias": torch.zeros(cad),
    }
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            hidden = blocks[-1]
        elif name.startswith("up_blocks"):
            hidden = blocks[::-1][int(name[len("up_blocks.")])]
        else:
            hidden = blocks[int(name[len("down_blocks.")])]
        for kind in ("to_k_ip", "to_v_ip"):
            sd[f"ip_adapter.{key_id}.{kind}.weight"] = torch.randn(hidden, cad, generator=g) / cad**0.5
        key_id += 2
    save_file({k: v.contiguous() for k, v in sd.items()}, str(models / TINY_IP_WEIGHT))
    torch.manual_seed(seed)
    enc = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, projection_dim=image_embed_dim, num_hidden_layers=2,
        num_attention_heads=4, image_size=32, patch_size=8, hidden_act="quick_gelu",
    ))
    enc.save_pretrained(models / "image_encoder", safe_serialization=True)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(models / "image_encoder")
    return folder


def tiny_ip_adapter_path(name: str, seed: int = 0) -> Path:
    """Folder of the tiny IP-Adapter for ``tiny:<name>`` (``sd15`` / ``sdxl``); built on first use."""
    if name not in BUILDERS:
        from ..errors import UserError

        raise UserError(f"model.ip_adapter.path: tiny:{name} is not one of {', '.join('tiny:' + n for n in BUILDERS)}")
    key = hashlib.sha1(f"ip-{name}-{seed}-{TINY_VERSION}".encode()).hexdigest()[:10]
    folder = cache_root() / "tiny" / f"ip-adapter-{name}-{key}"
    if (folder / "models" / TINY_IP_WEIGHT).exists():
        return folder
    unet_config = json.loads((tiny_path(name, seed) / "unet" / "config.json").read_text())
    with _building(folder, f".ip-{name}-") as tmp:
        write_tiny_ip_adapter(tmp, unet_config, seed)
    return folder
