"""`vfeedback rewards`' weights column reads the local caches (a fake Hugging Face cache laid out
as huggingface_hub writes it), and imagereward says why it is not installable."""
import json

import pytest

from vfeedback.cli import main


def _fake_hf_file(cache, repo, filename):
    d = cache / ("models--" + repo.replace("/", "--"))
    (d / "refs").mkdir(parents=True)
    (d / "refs" / "main").write_text("0" * 40)
    snap = d / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap / filename).write_bytes(b"x")


def _weights(capsys):
    assert main(["rewards", "--json"]) == 0
    return {d["name"]: d for d in json.loads(capsys.readouterr().out)}


def test_weights_column_follows_the_caches(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants as hc

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("VFEEDBACK_CACHE", str(tmp_path / "vf"))
    monkeypatch.setenv("HOME", str(tmp_path))
    doc = _weights(capsys)
    assert {n: doc[n]["weights"] for n in ("clip", "aesthetic", "hpsv2", "pickscore", "vqa", "imagereward")} == dict.fromkeys(
        ("clip", "aesthetic", "hpsv2", "pickscore", "vqa", "imagereward"), "no")
    assert doc["brightness"]["weights"] == "-" and doc["composition_color"]["weights"] == "-"
    assert doc["structure"]["weights"] == "path" and doc["shapes_judge"]["weights"] == "yes"
    # ViT-L-14/openai in the hub cache: clip has its weights; aesthetic still lacks its head
    _fake_hf_file(cache, "timm/vit_large_patch14_clip_224.openai", "open_clip_model.safetensors")
    _fake_hf_file(cache, "xswu/HPSv2", "HPS_v2.1_compressed.pt")
    doc = _weights(capsys)
    assert doc["clip"]["weights"] == "yes" and doc["hpsv2"]["weights"] == "yes" and doc["aesthetic"]["weights"] == "no"
    (tmp_path / "vf").mkdir()
    (tmp_path / "vf" / "sac+logos+ava1-l14-linearMSE.pth").write_bytes(b"x")
    assert _weights(capsys)["aesthetic"]["weights"] == "yes"
    assert main(["rewards"]) == 0
    assert capsys.readouterr().out.splitlines()[0].split()[3] == "weights"


def test_imagereward_says_why_it_is_not_installed(capsys):
    doc = _weights(capsys)
    if doc["imagereward"]["installed"]:
        pytest.skip("image-reward is installed here")
    assert "timm==0.6.13" in doc["imagereward"]["install"] and "transformers 5" in doc["imagereward"]["install"]
    assert main(["validate", "configs/refl/sd15.yaml"]) == 2
    err = capsys.readouterr().err
    assert "imagereward" in err and "timm==0.6.13" in err and "Traceback" not in err


def test_offline_messages_name_the_download_commands(monkeypatch, tmp_path):
    import open_clip.pretrained
    import torch

    import rewards

    def offline(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr(open_clip.pretrained, "hf_hub_download", offline)
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setenv("VFEEDBACK_CACHE", str(tmp_path))
    clip_cmd = "`hf download timm/vit_large_patch14_clip_224.openai open_clip_model.safetensors`"
    with pytest.raises(rewards.RewardError) as e:
        rewards.load("clip", device="cpu")
    assert clip_cmd in str(e.value) and "as pretrained= instead of the tag 'openai'" in str(e.value)
    with pytest.raises(rewards.RewardError) as e:
        rewards.load("aesthetic", device="cpu")
    msg = str(e.value)
    assert "`wget -O sac+logos+ava1-l14-linearMSE.pth 'https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/" in msg
    assert "also needs the CLIP ViT-L-14 / openai image encoder: " + clip_cmd in msg and "clip_pretrained=" in msg
