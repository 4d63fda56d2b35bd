"""``vfeedback score`` and ``vfeedback rewards``: outputs, bad files, exit codes.

Mostly the weight-free rewards (brightness, color) so the CLI logic is tested fast; one run uses
a tiny open_clip checkpoint through ``--option`` to show model options reach the loader.
"""
from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import rewards
from rewards.base import Reward, RewardInfo, _REGISTRY
from vfeedback.cli import main


def _png(path, rgb, size=(16, 12)):
    Image.fromarray(np.full((size[1], size[0], 3), rgb, dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def images(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    _png(d / "a_red.png", (230, 20, 20))
    _png(d / "b_dark.png", (10, 10, 10), size=(20, 20))
    _png(d / "c_white.jpg", (250, 250, 250))
    return d


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_table_default(images, capsys):
    code, out, err = _run(capsys, "score", "--reward", "brightness,saturation", str(images))
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].split() == ["image", "brightness", "saturation"]
    assert len(lines) == 2 + 3
    assert "a_red.png" in out and "c_white.jpg" in out


def test_json_values(images, capsys):
    code, out, _ = _run(capsys, "score", "--reward", "brightness", "--json", str(images / "*.png"))
    assert code == 0
    doc = json.loads(out)
    assert doc["rewards"] == ["brightness"] and doc["failed"] == []
    by = {r["image"].rsplit("/", 1)[-1]: r["scores"]["brightness"] for r in doc["results"]}
    assert set(by) == {"a_red.png", "b_dark.png"}
    assert by["b_dark.png"] == pytest.approx(10 / 255, abs=1e-4)


def test_csv_with_prompt(images, capsys):
    code, out, _ = _run(capsys, "score", "--reward", "color,brightness", "--prompt", "a red square", "--csv", str(images))
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["prompt"] for r in rows] == ["a red square"] * 3
    red = next(r for r in rows if r["image"].endswith("a_red.png"))
    dark = next(r for r in rows if r["image"].endswith("b_dark.png"))
    assert float(red["color"]) > 0.9 > float(dark["color"])


@pytest.mark.parametrize("kind", ["corrupt", "truncated", "empty", "text"])
def test_bad_file_is_reported_and_others_scored(images, tmp_path, capsys, kind):
    bad = tmp_path / f"bad_{kind}.png"
    good = (images / "a_red.png").read_bytes()
    bad.write_bytes({"corrupt": b"\x89PNG\r\n\x1a\n" + b"garbage" * 20, "truncated": good[: len(good) // 2], "empty": b"", "text": b"hello, not an image\n"}[kind])
    code, out, err = _run(capsys, "score", "--reward", "brightness", "--json", str(bad), str(images / "a_red.png"))
    assert code == 1
    err_lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(err_lines) == 1 and str(bad) in err_lines[0]
    assert "Traceback" not in err
    doc = json.loads(out)
    assert [r["image"] for r in doc["results"]] == [str(images / "a_red.png")]
    assert doc["failed"][0]["image"] == str(bad)


def test_unknown_reward_exit_2_without_traceback(images):
    proc = subprocess.run(
        [sys.executable, "-m", "vfeedback", "score", "--reward", "no_such_reward", str(images)],
        capture_output=True, text=True, env={"OMP_NUM_THREADS": "1", "PATH": ""},
    )
    assert proc.returncode == 2
    assert "unknown reward" in proc.stderr and "no_such_reward" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_prompt_needed(images, capsys):
    code, _, err = _run(capsys, "score", "--reward", "color", str(images))
    assert code == 2 and "needs a prompt" in err
    # an option that removes the need (a fixed colour) is honoured
    code, out, _ = _run(capsys, "score", "--reward", "color", "--option", "color=red", str(images))
    assert code == 0 and "a_red.png" in out


def test_prompts_file_lines_and_jsonl(images, tmp_path, capsys):
    lines = tmp_path / "p.txt"
    lines.write_text("a red thing\na black thing\na white thing\n")
    code, out, _ = _run(capsys, "score", "--reward", "color", "--prompts", str(lines), "--json", str(images))
    assert code == 0
    res = json.loads(out)["results"]
    assert [r["prompt"] for r in res] == ["a red thing", "a black thing", "a white thing"]
    assert all(r["scores"]["color"] > 0.9 for r in res)

    lines.write_text("only one\n")
    code, _, err = _run(capsys, "score", "--reward", "color", "--prompts", str(lines), str(images))
    assert code == 2 and "1 prompts for 3 images" in err

    jl = images / "prompts.jsonl"
    jl.write_text(json.dumps({"image": "b_dark.png", "prompt": "black"}) + "\n" + json.dumps({"image": "a_red.png", "prompt": "red"}) + "\n")
    code, out, _ = _run(capsys, "score", "--reward", "color", "--prompts", str(jl), "--json")
    assert code == 0
    res = json.loads(out)["results"]
    assert [r["image"].rsplit("/", 1)[-1] for r in res] == ["b_dark.png", "a_red.png"]
    assert all(r["scores"]["color"] > 0.9 for r in res)


def test_no_match_and_bad_option(tmp_path, images, capsys):
    code, _, err = _run(capsys, "score", "--reward", "brightness", str(tmp_path / "none" / "*.png"))
    assert code == 2 and "no image files matched" in err
    code, _, err = _run(capsys, "score", "--reward", "brightness", "--option", "novalue", str(images))
    assert code == 2 and "KEY=VALUE" in err
    code, _, err = _run(capsys, "score", "--reward", "brightness", "--option", "bogus=1", str(images))
    assert code == 2 and "unknown option" in err


def test_reference_goes_to_rewards_that_take_it(images, capsys, monkeypatch):
    seen = {}

    class RefReward(Reward):
        def __init__(self, reference=None):
            super().__init__()
            seen["reference"] = reference

        def forward(self, images, prompts=None, **context):
            return images.mean(dim=(1, 2, 3))

    monkeypatch.setitem(_REGISTRY, "test_ref", RewardInfo("test_ref", RefReward, True, None, "test"))
    ref = str(images / "a_red.png")
    code, out, _ = _run(capsys, "score", "--reward", "test_ref,brightness", "--reference", ref, "--json", str(images / "b_dark.png"))
    assert code == 0
    assert seen["reference"] == [ref]
    rewards.clear_cache()


def test_model_options_reach_the_loader(images, tmp_path, capsys):
    """A tiny open_clip checkpoint passed with --option clip.model=... clip.pretrained=<file>."""
    import open_clip

    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 1, "layers": 1}}
    (tmp_path / "vf-cli-clip.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "vf-cli-clip.json")
    torch.manual_seed(0)
    torch.save(open_clip.create_model("vf-cli-clip").state_dict(), tmp_path / "w.pt")
    code, out, err = _run(capsys, "score", "--reward", "clip,brightness", "--prompt", "red", "--option", "clip.model=vf-cli-clip",
                          "--option", f"clip.pretrained={tmp_path / 'w.pt'}", "--option", "clip.raw=true", "--device", "cpu", "--json", str(images))
    assert code == 0, err
    res = json.loads(out)["results"]
    assert len(res) == 3 and all(-1.0 <= r["scores"]["clip"] <= 1.0 for r in res)
    rewards.clear_cache()


def test_rewards_list(capsys):
    code, out, _ = _run(capsys, "rewards")
    assert code == 0
    header = out.splitlines()[0].split()
    assert header == ["name", "differentiable", "installed", "weights", "extra", "description"]
    for name in ("clip", "aesthetic", "pickscore", "hpsv2", "imagereward", "vqa", "brightness"):
        assert any(ln.startswith(name + " ") for ln in out.splitlines())
    code, out, _ = _run(capsys, "rewards", "--json")
    doc = {d["name"]: d for d in json.loads(out)}
    assert doc["clip"]["installed"] and doc["clip"]["differentiable"]
    assert doc["imagereward"]["requires"] == ["transformers"] and doc["imagereward"]["installed"]
    assert doc["imagereward"]["install"] is None
