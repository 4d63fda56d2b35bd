"""TRL integration: reward functions over rendered completions, run inside real GRPO steps.

A tiny random Llama with a character-level tokenizer (built offline, saved and reloaded with
``save_pretrained`` / ``from_pretrained``) runs two GRPOTrainer steps with each renderer's
reward function; the scorer is the ``clip`` reward on a tiny random open_clip checkpoint in
open_clip's format, and the diffusion pipeline is ``tiny:sd15``.
"""
from __future__ import annotations

import math

import pytest
import torch

import rewards
from vfeedback.integrations import sandbox
from vfeedback.integrations.tiny import write_tiny_lm, write_tiny_open_clip
from vfeedback.integrations.trl import (
    Caption,
    CodeToImage,
    ImageSimilarity,
    PromptToImage,
    Rendered,
    Renderer,
    completion_text,
    prompt_text,
    reward_function,
)

torch.set_num_threads(1)

SVG_RED = '<svg xmlns="http://www.w3.org/2000/svg" width="20" height="20"><rect width="20" height="20" fill="red"/></svg>'
SVG_BLUE = SVG_RED.replace("red", "blue")
SVG_BROKEN = '<svg xmlns="http://www.w3.org/2000/svg"><rect width='
SVG_EXTERNAL = ('<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" width="8" height="8">'
                '<image xlink:href="http://example.com/a.png" width="8" height="8"/></svg>')


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    name, ckpt = write_tiny_open_clip(tmp_path_factory.mktemp("clip"))
    yield rewards.load("clip", model=name, pretrained=ckpt, raw=True)
    rewards.clear_cache()


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    return str(write_tiny_lm(tmp_path_factory.mktemp("lm")))


def _grpo(model, fn, dataset, tmp_path):
    from trl import GRPOConfig, GRPOTrainer

    cfg = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_completion_length=12,
                     max_steps=2, learning_rate=1e-3, report_to="none", logging_steps=1, use_cpu=True, save_strategy="no",
                     disable_tqdm=True, gradient_checkpointing=False, seed=0)
    trainer = GRPOTrainer(model=model, reward_funcs=[fn], args=cfg, train_dataset=dataset)
    trainer.train()
    logs = [h for h in trainer.state.log_history if f"rewards/{fn.__name__}/mean" in h]
    assert len(logs) == 2, trainer.state.log_history
    return logs


class _FixedCompletions(Renderer):
    """Wraps a renderer and substitutes known completions (a random LM writes no SVG)."""

    def __init__(self, inner, texts):
        self.inner, self.texts, self.name = inner, texts, inner.name

    def __call__(self, requests, completions, columns):
        subs = [self.texts[i % len(self.texts)] for i in range(len(completions))]
        return self.inner(requests, subs, columns)


def test_text_of_standard_and_conversational():
    assert completion_text("a cat") == "a cat"
    conv = [{"role": "assistant", "content": [{"type": "text", "text": "a "}, {"type": "text", "text": "cat"}]}]
    assert completion_text(conv) == "a cat"
    assert prompt_text([{"role": "system", "content": "be brief"}, {"role": "user", "content": "draw a cat"}]) == "draw a cat"


def test_grpo_prompt_rewriting(tiny_lm, tiny_sd15, clip, tmp_path):
    from datasets import Dataset

    render = PromptToImage(tiny_sd15, num_steps=2, guidance_scale=1.0)
    fn = reward_function(clip, render=render, weight=2.0)
    assert fn.__name__ == "clip_prompt_to_image"
    ds = Dataset.from_dict({"prompt": ["Rewrite: a red cat\n", "Rewrite: a dog\n"] * 4, "request": ["a red cat", "a dog"] * 4})
    logs = _grpo(tiny_lm, fn, ds, tmp_path)
    assert fn.calls == 2 and fn.scored + fn.failed == 8  # 2 steps x 1 prompt x 4 generations
    # empty completions (a random LM may stop at once) are the only acceptable failures
    assert set(fn.failures) <= {"empty completion"}
    assert all(math.isfinite(h[f"rewards/{fn.__name__}/mean"]) for h in logs if fn.scored)
    # weight multiplies the raw cosine (|cos| <= 1)
    out = fn(["x"], ["a red cat"], request=["a red cat"])
    raw = clip(render._generate(["a red cat"]), ["a red cat"]).item()
    assert out[0] == pytest.approx(2.0 * raw, abs=1e-5)


def test_grpo_conversational_captions(tiny_lm, clip, tmp_path):
    from datasets import Dataset

    img = torch.rand(3, 32, 32).numpy()
    # a text-only policy: the image goes in a column TRL does not reserve for VLM inputs
    fn = reward_function(clip, render=Caption(image_column="picture"))
    ds = Dataset.from_dict({"prompt": [[{"role": "user", "content": "Describe the image."}]] * 8, "picture": [img.tolist()] * 8})
    _grpo(tiny_lm, fn, ds, tmp_path)
    assert fn.calls == 2 and fn.scored > 0
    # the score is the clip reward with the completion as the prompt
    t = torch.as_tensor(img)
    assert fn(["q"], [[{"role": "assistant", "content": "a cat"}]], picture=[t])[0] == pytest.approx(clip(t[None], ["a cat"]).item(), abs=1e-5)


# untrusted code renders inside bubblewrap (strict, the default) and is refused without it: CI installs
# it (`make test`: apt-get where root); elsewhere these checks skip rather than read the refusal as a result
from tests.test_sandbox import needs_bwrap  # noqa: E402


@needs_bwrap
def test_grpo_svg_render_and_compare(tiny_lm, clip, tmp_path):
    from datasets import Dataset

    target = torch.zeros(3, 32, 32)
    target[0] = 1.0  # a red square
    render = _FixedCompletions(CodeToImage("svg", size=32, timeout=20), [SVG_RED, SVG_BLUE, SVG_BROKEN, SVG_EXTERNAL])
    fn = reward_function(ImageSimilarity(None), render=render, name="svg_pixels")
    ds = Dataset.from_dict({"prompt": ["Draw a red square as SVG:\n"] * 8, "target_image": [target.numpy().tolist()] * 8})
    _grpo(tiny_lm, fn, ds, tmp_path)
    assert fn.scored == 4 and fn.failed == 4  # broken and external SVGs are None, every step
    out = fn(["p"] * 4, ["ignored"] * 4, target_image=[target] * 4)
    assert out[2] is None and out[3] is None
    assert out[0] == pytest.approx(1.0, abs=0.02) and out[1] < out[0] - 0.3
    assert "external" in fn.last_errors[3] and fn.failures["ParseError"] >= 1


@needs_bwrap
def test_svg_with_clip_text_target(clip):
    fn = reward_function(clip, render=CodeToImage("svg", size=48))
    out = fn(["draw"] * 3, [f"Here:\n```svg\n{SVG_RED}\n```", SVG_BROKEN, ""], target=["a red square"] * 3)
    assert out[0] is not None and out[1] is None and out[2] is None
    assert fn.failed == 2


@needs_bwrap
@pytest.mark.parametrize("code,ok", [
    ("```python\nplt.plot([0, 1], [1, 0])\n```", True),
    ("import socket\nsocket.create_connection(('example.com', 80))", False),
    ('{"data": {"values": [{"a": 1, "b": 2}]}, "mark": "bar", "encoding": {"x": {"field": "a"}, "y": {"field": "b"}}}', True),
    ('{"data": {"url": "https://example.com/data.csv"}, "mark": "bar"}', False),
])
def test_chart_sandbox(code, ok):
    if code.startswith("{"):
        pytest.importorskip("vl_convert")
    kind, src = sandbox.extract_code(code)
    r = sandbox.render(src, kind, width=40, height=30, timeout=30)
    assert (r.image is not None) == ok, r.error
    assert r.isolation == "bwrap+seccomp"  # every renderer runs inside the boundary
    if ok:
        assert r.image.shape == (3, 30, 40)


@needs_bwrap
def test_sandbox_time_limit():
    r = sandbox.render("while True:\n    pass", "matplotlib", timeout=2)
    assert r.image is None and "timeout" in r.error


def test_renderer_crash_and_bad_scores_are_none(clip):
    class Boom(Renderer):
        name = "boom"

        def __call__(self, requests, completions, columns):
            raise RuntimeError("renderer bug")

    fn = reward_function(clip, render=Boom())
    assert fn(["p", "q"], ["a", "b"]) == [None, None]
    assert fn.failed == 2

    class NaN(rewards.Reward):
        needs_prompt = False

        def forward(self, images, prompts=None, **context):
            return torch.tensor([float("nan"), 1.0])

    class Two(Renderer):
        def __call__(self, requests, completions, columns):
            return [Rendered(image=torch.rand(3, 8, 8)) for _ in completions]

    fn = reward_function(NaN(), render=Two())
    assert fn(["p", "q"], ["a", "b"]) == [None, 1.0]


def test_grpo_webpage_screenshot_and_interaction(tiny_lm, tmp_path):
    """WebGen-Agent in small: GRPO with two reward functions over one set of browser runs."""
    from datasets import Dataset

    from vfeedback.integrations.webpage import InteractionReward, WebPage

    if not (sandbox.bwrap_status()[0] and sandbox.find_browser()):
        pytest.skip(f"needs bubblewrap and Chromium: {sandbox.bwrap_status()[1] or 'no Chromium (apt-get install chromium)'}")
    pytest.importorskip("playwright")
    page = "<html><body style='margin:0;background:#00f'><button id=go onclick=\"msg.textContent='sent'\">Send</button><p id=msg></p></body></html>"
    pages = [page, page.replace("#00f", "#fff"), page.replace("msg.textContent='sent'", ""), "no page"]
    render = WebPage(viewport=(64, 48), steps=[{"click": "#go"}], checks=[{"text": "sent", "selector": "#msg"}], workers=2)
    shot = reward_function(ImageSimilarity(None), render=_FixedCompletions(render, pages), name="page_pixels")

    class FixedInteraction(InteractionReward):  # the same substitution for the second reward
        def __call__(self, prompts, completions, **kw):
            return super().__call__(prompts, [pages[i % 4] for i in range(len(completions))], **kw)

    gui = FixedInteraction(render)
    target = torch.zeros(3, 48, 64)
    target[2] = 1.0  # the design: a blue page
    ds = Dataset.from_dict({"prompt": ["Write a page with a Send button:\n"] * 8, "target_image": [target.numpy().tolist()] * 8})
    from trl import GRPOConfig, GRPOTrainer

    cfg = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_completion_length=12,
                     max_steps=2, learning_rate=1e-3, report_to="none", logging_steps=1, use_cpu=True, save_strategy="no",
                     disable_tqdm=True, gradient_checkpointing=False, seed=0)
    trainer = GRPOTrainer(model=tiny_lm, reward_funcs=[shot, gui], args=cfg, train_dataset=ds)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "rewards/page_pixels/mean" in h]
    assert len(logs) == 2
    assert shot.scored == 6 and shot.failed == 2 and gui.scored == 6 and gui.failed == 2
    assert len(render._cache) == 4  # four distinct pages: each rendered once for both rewards and both steps
    # the interaction reward: 1 for the working pages, 0 for the dead button, None for no page
    assert all(h["rewards/webpage_interaction/mean"] == pytest.approx(2 / 3) for h in logs)
    out = shot(["p"] * 4, ["x"] * 4, target_image=[target] * 4)
    assert out[0] > 0.8 and out[1] < 0.5 and out[3] is None
    assert shot.isolation["bwrap+seccomp"] + shot.isolation["bwrap"] == 9
