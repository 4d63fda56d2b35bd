"""Two processes (gloo on CPU) train exactly what one process with the same global batch does."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.test_train_e2e import BASE


def _cfg(tmp_path, out, batch, algorithm="refl", extra=None):
    cfg = json.loads(json.dumps(BASE))
    cfg.update(output_dir=str(out))
    cfg["train"].update(max_steps=2, batch_size=batch, max_grad_norm=None)
    cfg["prompts"]["eval_seeds"] = [0]
    if extra:
        for k, v in extra.items():
            cfg.setdefault(k, {}).update(v) if isinstance(v, dict) else cfg.update({k: v})
    p = tmp_path / f"{out.name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _run(args):
    r = subprocess.run([sys.executable, "-m", "vfeedback", "train", *args], capture_output=True, text=True, timeout=900,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_two_process_refl_matches_one_process_with_the_same_global_batch(tmp_path):
    from safetensors.torch import load_file

    one = tmp_path / "one"
    two = tmp_path / "two"
    _run([str(_cfg(tmp_path, one, batch=2))])
    _run([str(_cfg(tmp_path, two, batch=1)), "--num-processes", "2"])
    a = load_file(str(one / "lora" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(two / "lora" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    changed = 0
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
        changed += int(a[k].abs().sum() > 0 and "lora.up" in k)
    assert changed > 0  # training moved the LoRA at all
    s = json.loads((two / "summary.json").read_text())
    assert s["num_processes"] == 2
    # per-step metrics are reduced across processes: the same mean loss as the 1-process run
    la = [json.loads(l)["loss"] for l in (one / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(l)["loss"] for l in (two / "metrics.jsonl").read_text().splitlines()]
    assert la == pytest.approx(lb, rel=1e-4)


def test_two_process_d3po_matches_one_process(tmp_path):
    from safetensors.torch import load_file

    d3po = {"algorithm": "d3po", "sampling": {"steps": 4, "guidance_scale": 4.0, "eta": 1.0},
            "d3po": {"group_size": 2, "timestep_fraction": 1.0, "winrate_seeds": [1000]}}

    def cfg(out, batch):
        c = json.loads(json.dumps(BASE))
        c.pop("refl")
        c.update(output_dir=str(out), algorithm="d3po", sampling=d3po["sampling"], d3po=d3po["d3po"])
        # adam_eps well above the tiny model's gradient noise: Adam's first steps are then linear
        # in the gradient rather than ~lr * sign(g), where float noise in a ~0 component would
        # flip a whole lr-sized update
        c["train"].update(max_steps=2, batch_size=batch, max_grad_norm=None, adam_eps=1e-4)
        c["prompts"]["eval_seeds"] = [0]
        p = tmp_path / f"{out.name}.yaml"
        p.write_text(yaml.safe_dump(c))
        return p

    one, two = tmp_path / "d1", tmp_path / "d2"
    _run([str(cfg(one, 2))])
    _run([str(cfg(two, 1)), "--num-processes", "2"])
    a = load_file(str(one / "lora" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(two / "lora" / "pytorch_lora_weights.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora.up" in k)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    assert "heldout_win_rate" in json.loads((two / "summary.json").read_text())
