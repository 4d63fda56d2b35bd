"""`vfeedback env`: the versions and devices a bug report needs, read from the installed
distributions (the same numbers importlib.metadata reports)."""
import json
from importlib.metadata import version

import torch

from vfeedback.cli import main


def test_env_reports_versions_devices_and_attention(capsys):
    assert main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    for label, dist in [("vfeedback", "vfeedback"), ("torch", "torch"), ("diffusers", "diffusers"), ("peft", "peft"),
                        ("accelerate", "accelerate"), ("transformers", "transformers"), ("open_clip", "open_clip_torch")]:
        assert info[label] == version(dist)
    for label in ("insightface", "xformers", "gradio", "image-reward"):
        assert info[label]  # a version or "not installed"
    assert info["CUDA available"] == ("yes" if torch.cuda.is_available() else "no")
    if not torch.cuda.is_available():
        assert info["devices"].startswith("cpu") and info["attention (auto)"].startswith("sdpa")
    assert main(["env"]) == 0
    text = capsys.readouterr().out
    assert "bug report" in text and f"- torch:" in text and version("torch") in text
