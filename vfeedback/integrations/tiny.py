"""Tiny, seeded, random-weight models for the integrations, built offline: a causal LM with a
character-level tokenizer (TRL) and an open_clip checkpoint (the VLM rewards).

For tests and ``--tiny`` demos of the TRL integration: a 2-layer Llama (the architecture of
the small chat models people fine-tune with GRPO, shrunk) and a ``PreTrainedTokenizerFast``
whose vocabulary is printable ASCII plus the special tokens, with a minimal chat template so
conversational datasets work too. Written with ``save_pretrained`` and loaded back with
``from_pretrained``: the same path a hub model takes.
"""
from __future__ import annotations

import string
from pathlib import Path
from typing import Union

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]


def build_tokenizer():
    """Character-level fast tokenizer (printable ASCII) with pad/bos/eos and a chat template."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {t: i for i, t in enumerate(SPECIAL + chars)}
    # A BPE without merges splits any text into single characters; Fuse joins them back.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.add_special_tokens(SPECIAL)
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        additional_special_tokens=SPECIAL[4:],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def write_tiny_lm(folder: Union[str, Path], seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """Write a tiny random ``LlamaForCausalLM`` + tokenizer to ``folder``; returns the folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    tok = build_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


TINY_CLIP = "vf-tiny-clip"
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 48, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def write_tiny_open_clip(folder: Union[str, Path], seed: int = 0) -> tuple[str, str]:
    """Register a tiny open_clip architecture and write a random checkpoint in open_clip's
    format (``{'state_dict': ...}``); returns ``(model_name, checkpoint_path)`` for
    ``rewards.load("clip", model=..., pretrained=...)``."""
    import json

    import open_clip
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = folder / f"{TINY_CLIP}.json"
    cfg.write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(cfg)
    ckpt = folder / f"{TINY_CLIP}-seed{seed}.pt"
    if not ckpt.exists():
        torch.manual_seed(seed)
        model = open_clip.create_model(TINY_CLIP)
        torch.save({"state_dict": model.state_dict()}, ckpt)
    return TINY_CLIP, str(ckpt)
