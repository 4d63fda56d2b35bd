"""End to end through the CLI on tiny models: run folder, LoRA, resume, NaN steps, user errors."""
import json
import os
from pathlib import Path

import pytest
import torch
import yaml

import rewards
from vfeedback.cli import main

BASE = {
    "algorithm": "refl",
    "seed": 0,
    "model": {"family": "sd15", "path": "tiny:sd15", "resolution": 32, "gradient_checkpointing": True,
              "lora": {"rank": 4, "target_modules": ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]}},
    "reward": [{"name": "color"}],
    "prompts": {"train": ["a red apple", "a blue lake", "a green field"], "eval": ["a red apple", "a blue lake"], "eval_seeds": [0]},
    "sampling": {"steps": 6, "guidance_scale": 4.0},
    "refl": {"stop_range": [3, 5], "grad_scale": 1.0},
    "train": {"max_steps": 3, "batch_size": 2, "lr": 1e-2, "weight_decay": 0.0},
    "log": {"trackers": []},
}


def write_cfg(tmp_path, out, **over):
    cfg = json.loads(json.dumps(BASE))
    cfg["output_dir"] = str(out)
    for k, v in over.items():
        d = cfg
        keys = k.split(".")
        for kk in keys[:-1]:
            d = d.setdefault(kk, {})
        d[keys[-1]] = v
    p = tmp_path / f"cfg-{abs(hash(str(over))) % 10**8}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _lora(out):
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "lora" / "pytorch_lora_weights.safetensors"))


def test_train_sd15_writes_the_run_folder_and_a_loadable_lora(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = write_cfg(tmp_path, out, **{"log.checkpoint_every": 2}, eval_rewards=[{"name": "brightness"}])
    assert main(["train", str(cfg)]) == 0
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert names == ["checkpoints", "config.yaml", "fingerprint.json", "lora", "metrics.jsonl", "samples", "summary.json"]
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert all(0 <= r["reward_mean"] <= 1 and r["loss"] > 0 for r in recs)
    s = json.loads((out / "summary.json").read_text())
    assert s["algorithm"] == "refl" and s["steps"] == 3 and s["eval_reward_before"] is not None and s["eval_reward_after"] is not None
    assert 0 < s["eval_brightness_before"] < 1 and 0 < s["eval_brightness_after"] < 1  # held-out eval scorer
    for f in ("step-000000.png", "step-000003.png", "before_after.png", "reward_curve.png"):
        assert (out / "samples" / f).stat().st_size > 0
    cks = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert cks == ["step-000002", "step-000003"] and (out / "checkpoints" / "step-000003" / "COMPLETE").exists()
    # the resolved config round-trips
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["refl"]["stop_range"] == [3, 5] and saved["train"]["max_steps"] == 3
    # the LoRA loads with diffusers and changes the images
    from vfeedback.models import load_model
    from vfeedback.sampling import sample

    m = load_model("sd15", "tiny:sd15", resolution=32)
    cond = m.encode_prompt(["a red apple"], cfg=True)
    g = lambda: torch.Generator().manual_seed(0)
    with torch.no_grad():
        before = sample(m, cond, num_steps=6, guidance_scale=4.0, generator=g()).images
        m.pipe.load_lora_weights(str(out / "lora"))
        after = sample(m, cond, num_steps=6, guidance_scale=4.0, generator=g()).images
    assert (after - before).abs().max() > 1e-3
    # the sample command renders with it
    assert main(["sample", "--config", str(cfg), "--lora", str(out / "lora"), "--prompt", "a red apple",
                 "--out", str(tmp_path / "renders")]) == 0
    assert (tmp_path / "renders" / "grid.png").exists()


def test_train_sdxl_tiny(tmp_path):
    out = tmp_path / "xl"
    cfg = write_cfg(tmp_path, out, **{"model.family": "sdxl", "model.path": "tiny:sdxl", "train.max_steps": 2})
    assert main(["train", str(cfg)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["steps"] == 2
    from safetensors import safe_open

    with safe_open(str(out / "lora" / "pytorch_lora_weights.safetensors"), "pt") as f:
        assert any(k.startswith("unet.") for k in f.keys())


def test_resume_after_a_crash_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    over = {"train.max_steps": 4, "log.checkpoint_every": 2, "sampling.eta": 1.0}
    full = tmp_path / "full"
    assert main(["train", str(write_cfg(tmp_path, full, **over))]) == 0

    crashed = tmp_path / "crashed"
    cfg = write_cfg(tmp_path, crashed, **over)
    from vfeedback.algorithms.refl import ReFL

    real = ReFL.train_step
    calls = {"n": 0}

    def dying(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # step 3, after the step-2 checkpoint
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(ReFL, "train_step", dying)
    assert main(["train", str(cfg)]) == 130
    assert (crashed / "checkpoints" / "step-000002" / "COMPLETE").exists()
    assert not (crashed / "lora").exists()
    monkeypatch.setattr(ReFL, "train_step", real)
    assert main(["train", str(cfg), "--resume"]) == 0
    a, b = _lora(full), _lora(crashed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    ra = [json.loads(l) for l in (full / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(l) for l in (crashed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rb] == [1, 2, 3, 4]
    assert [r["loss"] for r in ra] == pytest.approx([r["loss"] for r in rb], rel=1e-5)


@rewards.register("test_nan", differentiable=True, description="test only: NaN for every image")
class _NaNReward(rewards.Reward):
    def forward(self, images, prompts=None, **ctx):
        return images.mean(dim=(1, 2, 3)) * float("nan")


def test_non_finite_steps_are_skipped_counted_and_stop_the_run(tmp_path, capsys):
    out = tmp_path / "nan"
    cfg = write_cfg(tmp_path, out, reward=[{"name": "test_nan"}], **{"train.max_steps": 5, "train.max_consecutive_nan": 2})
    assert main(["train", str(cfg)]) == 1
    err = capsys.readouterr().err
    assert "2 steps in a row" in err and "Traceback" not in err
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in recs] == [True, True] and recs[-1]["nan_total"] == 2


def test_user_errors_exit_2_without_traceback_and_leave_runs_untouched(tmp_path, capsys):
    out = tmp_path / "run"
    cfg = write_cfg(tmp_path, out, **{"train.max_steps": 1})
    assert main(["train", str(cfg)]) == 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    # same folder again without --resume
    assert main(["train", str(cfg)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    # resume with a changed model
    assert main(["train", str(cfg), "--resume", "model.lora.rank=8"]) == 2
    assert "model.lora.rank" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    # config problems
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    bad = write_cfg(tmp_path, tmp_path / "x", **{"train.lr": "fast", "model.bogus": 1})
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "train.lr" in err and "model.bogus" in err and "Traceback" not in err
    assert main(["train", str(write_cfg(tmp_path, tmp_path / "y", reward=[{"name": "no_such_reward"}]))]) == 2
    assert "unknown reward" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()  # nothing created before validation passed
    # validate runs train's checks: the finished run is refused as train would refuse it, and
    # accepted as the same run with --resume
    assert main(["validate", str(cfg)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["validate", str(cfg), "--resume"]) == 0
    assert "OK" in capsys.readouterr().out


def test_unwritable_output_dir(tmp_path, capsys):
    if os.geteuid() == 0:
        target = "/proc/vfeedback-run"  # root ignores permission bits; /proc refuses everyone
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        target = str(ro / "run")
    cfg = write_cfg(tmp_path, target)
    assert main(["train", str(cfg)]) == 2
    assert "output_dir" in capsys.readouterr().err


def test_refl_with_pretraining_loss_on_an_image_text_folder(tmp_path):
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    for i, (name, col) in enumerate([("red", (220, 20, 20)), ("blue", (20, 40, 220))]):
        Image.new("RGB", (40, 40), col).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"a {name} square")
    out = tmp_path / "pre"
    cfg = write_cfg(tmp_path, out, **{"train.max_steps": 2, "refl.pretrain": {"data": str(data), "weight": 0.5}})
    assert main(["train", str(cfg)]) == 0
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["pretrain_loss"] > 0 for r in recs)
    assert all(r["loss"] == pytest.approx(r["refl_loss"] + 0.5 * r["pretrain_loss"], rel=1e-4) for r in recs)
    # a JSONL with a broken line names the line
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "0.png", "text": "x"}\n{"image": 3}\n')
    cfg2 = write_cfg(tmp_path, tmp_path / "pre2", **{"refl.pretrain": {"data": str(bad)}})
    assert main(["train", str(cfg2)]) == 2
    assert not (tmp_path / "pre2").exists()
