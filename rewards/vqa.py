"""VQAScore-style judge: the probability a vision-language model answers "Yes".

VQAScore (Lin et al., 2024; github.com/linzhiqiu/t2v_metrics) asks a VLM
``Does this figure show "{text}"? Please answer yes or no.`` and scores
``P("Yes" | image, question)``; t2v_metrics computes it as ``exp(-CE)`` of the answer tokens
under teacher forcing (for a one-token answer, the softmax of the next-token logits at "Yes").
This scorer does that for any transformers ``AutoModelForImageTextToText`` model with a
fixed-resolution image processor (LLaVA-1.5, PaliGemma, BLIP-2, ...), differentiably: the image
is resized / cropped / normalised with torch ops and the pixel values the processor would have
produced are replaced by ours; the text side (chat template, expanded image tokens) is taken from
the model's own processor, once per prompt.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from . import _hub
from .base import Reward, RewardError, register
from .preprocess import TorchPreprocess, spec_from_hf_image_processor

log = logging.getLogger(__name__)

DEFAULT_QUESTION = 'Does this image show "{prompt}"? Please answer yes or no.'


def _load_vlm(model: str, processor: Optional[str], device: torch.device, dtype: torch.dtype):
    import transformers
    from transformers import AutoProcessor

    auto = getattr(transformers, "AutoModelForImageTextToText", None) or getattr(transformers, "AutoModelForVision2Seq")
    hint = f"Without a network, download {model} elsewhere (`hf download {model}`) and pass model=/local/folder"
    with _hub.load_errors("vqa", hint):
        proc = AutoProcessor.from_pretrained(processor or model)
        net = auto.from_pretrained(model, dtype=dtype)
    return net.to(device).eval().requires_grad_(False), proc


def _is_encoder_decoder(config) -> bool:
    if getattr(config, "is_encoder_decoder", False):
        return True
    text = getattr(config, "text_config", None)
    return bool(getattr(text, "is_encoder_decoder", False))


@register(
    "vqa",
    differentiable=True,
    requires=("transformers",),
    description='VQAScore: P("Yes") of a transformers VLM asked whether the image shows the prompt, in [0, 1]',
)
class VQAScore(Reward):
    """``P(answer | image, question)`` of a vision-language model, in ``[0, 1]``.

    Options: ``model`` (hub id or folder of an image-text-to-text model, default
    ``llava-hf/llava-1.5-7b-hf``), ``processor`` (defaults to ``model``), ``question`` (with
    ``{prompt}``), ``answer`` (default ``Yes``), ``template`` (the full text before the answer,
    with ``{question}``; default the processor's chat template), ``device``, ``dtype``.
    """

    needs_prompt = True

    def __init__(
        self,
        model: str = "llava-hf/llava-1.5-7b-hf",
        processor: Optional[str] = None,
        question: str = DEFAULT_QUESTION,
        answer: str = "Yes",
        template: Optional[str] = None,
        device: Optional[str] = None,
        dtype: Optional[str] = None,
    ):
        super().__init__()
        if "{prompt}" not in question:
            raise RewardError(f"vqa: question must contain {{prompt}}, got {question!r}")
        if template is not None and "{question}" not in template:
            raise RewardError(f"vqa: template must contain {{question}}, got {template!r}")
        dev = _hub.parse_device(device)
        self._dtype = _hub.parse_dtype(dtype, dev)
        self.model, self.processor = _load_vlm(model, processor, dev, self._dtype)
        self.tokenizer = getattr(self.processor, "tokenizer", None)
        if self.tokenizer is None or not hasattr(self.processor, "image_processor"):
            raise RewardError(f"vqa: {model} has no tokenizer + image processor pair; pass processor=... naming one")
        try:
            spec = spec_from_hf_image_processor(self.processor.image_processor)
        except ValueError as e:
            raise RewardError(f"vqa: {model}: {e}") from None
        self.preprocess = TorchPreprocess(spec)
        self.question, self.answer, self.template = question, answer, template
        self.encoder_decoder = _is_encoder_decoder(self.model.config)
        pad = self.tokenizer.pad_token_id
        self._pad_id = pad if pad is not None else (self.tokenizer.eos_token_id or 0)
        self._rows: dict[str, dict] = {}
        from PIL import Image

        self._dummy = Image.new("RGB", (spec.size[1], spec.size[0]), (127, 127, 127))

    # ---------------------------------------------------------------- text side, once per prompt
    def _prompt_text(self, prompt: str) -> str:
        q = self.question.format(prompt=prompt)
        if self.template is not None:
            return self.template.format(question=q)
        if getattr(self.processor, "chat_template", None):
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return f"Question: {q} Answer:"

    def _encode(self, text: str) -> dict:
        enc = self.processor(text=[text], images=[self._dummy], return_tensors="pt")
        return dict(enc)

    def _row(self, prompt: str) -> dict:
        if prompt in self._rows:
            return self._rows[prompt]
        ptext = self._prompt_text(prompt)
        prompt_enc = self._encode(ptext)
        px = prompt_enc.pop("pixel_values", None)
        expected = (1, 3, *self.preprocess.spec.size)
        if px is None or tuple(px.shape) != expected:
            got = None if px is None else tuple(px.shape)
            raise RewardError(f"vqa: the processor gives pixel_values of shape {got}, the torch preprocessing {expected}; this model's image handling is not supported")
        answer_ids = self.tokenizer(self.answer, add_special_tokens=False)["input_ids"]
        if self.encoder_decoder:
            row = {"enc": {k: v[0] for k, v in prompt_enc.items()}, "answer": torch.tensor(answer_ids), "n": len(answer_ids)}
        else:
            sep = "" if ptext.endswith((" ", "\n")) else " "
            full_enc = self._encode(ptext + sep + self.answer)
            full_enc.pop("pixel_values", None)
            ids_p, ids_f = prompt_enc["input_ids"][0], full_enc["input_ids"][0]
            n = len(ids_f) - len(ids_p)
            if n <= 0 or not torch.equal(ids_f[: len(ids_p)], ids_p):
                # the answer merged with the prompt's last token: append its ids instead
                full_enc = {k: v for k, v in prompt_enc.items()}
                full_enc["input_ids"] = torch.cat([ids_p, torch.tensor(answer_ids, dtype=ids_p.dtype)])[None]
                full_enc["attention_mask"] = torch.ones_like(full_enc["input_ids"])
                n = len(answer_ids)
            length = full_enc["input_ids"].shape[1]
            row = {"enc": {k: v[0] for k, v in full_enc.items() if torch.is_tensor(v)}, "n": n, "len": length}
        if len(self._rows) > 4096:
            self._rows.clear()
        self._rows[prompt] = row
        return row

    @staticmethod
    def _pad_stack(tensors: list[torch.Tensor], value) -> torch.Tensor:
        t = max(x.shape[0] for x in tensors)
        out = tensors[0].new_full((len(tensors), t, *tensors[0].shape[1:]), value)
        for i, x in enumerate(tensors):
            out[i, : x.shape[0]] = x
        return out

    def _batch(self, rows: list[dict]) -> dict:
        """Right-padded batch (causal LMs then keep each row's positions; logits read per row)."""
        keys = rows[0]["enc"].keys()
        batch = {}
        for k in keys:
            vals = [r["enc"][k] for r in rows]
            if k == "input_ids":
                batch[k] = self._pad_stack(vals, self._pad_id)
            elif vals[0].ndim >= 1 and all(v.shape[0] == r["enc"]["input_ids"].shape[0] for v, r in zip(vals, rows)):
                batch[k] = self._pad_stack(vals, 0)  # attention_mask, token_type_ids, ...
            else:
                batch[k] = torch.stack(vals)
        return {k: v.to(self.device) for k, v in batch.items()}

    # ---------------------------------------------------------------- scoring
    def forward(self, images, prompts=None, **context):
        if prompts is None:
            raise RewardError("vqa: needs a prompt per image (pass prompts=... or --prompt)")
        if len(prompts) != images.shape[0]:
            raise RewardError(f"vqa: {len(prompts)} prompts for {images.shape[0]} images")
        rows = [self._row(p) for p in prompts]
        batch = self._batch(rows)
        px = self.preprocess(images.to(self.device), dtype=self._dtype)
        if self.encoder_decoder:
            labels = self._pad_stack([r["answer"] for r in rows], -100).to(self.device)
            logits = self.model(**batch, pixel_values=px, labels=labels).logits.float()
            logp = torch.log_softmax(logits, -1)
            mask = labels != -100
            tok = logp.gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
        else:
            logits = self.model(**batch, pixel_values=px).logits
            ids = batch["input_ids"]
            n_max = max(r["n"] for r in rows)
            # position t predicts token t+1: the answer tokens sit at [len-n, len)
            pos = torch.stack([torch.arange(r["len"] - r["n"] - 1, r["len"] - r["n"] - 1 + n_max) for r in rows]).to(self.device)
            mask = torch.stack([torch.arange(n_max) < r["n"] for r in rows]).to(self.device)
            pos = torch.where(mask, pos, torch.zeros_like(pos))
            sel = logits.gather(1, pos[..., None].expand(-1, -1, logits.shape[-1])).float()
            logp = torch.log_softmax(sel, -1)
            targets = ids.gather(1, (pos + 1).clamp_max(ids.shape[1] - 1))
            tok = logp.gather(-1, targets[..., None]).squeeze(-1)
        mean_logp = (tok * mask).sum(-1) / mask.sum(-1).clamp_min(1)
        return mean_logp.exp().to(images.device)
