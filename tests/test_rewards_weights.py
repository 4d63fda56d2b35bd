"""`vfeedback rewards`' weights column reads the local caches (a fake Hugging Face cache laid out
as huggingface_hub writes it)."""
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


def test_imagereward_weights_column(tmp_path, monkeypatch, capsys):
    """imagereward's weights: ImageReward.pt (the hub cache or the package's ~/.cache/ImageReward)
    and bert-base-uncased's vocabulary (BLIP's tokenizer), both needed."""
    import huggingface_hub.constants as hc

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert _weights(capsys)["imagereward"]["weights"] == "no"
    _fake_hf_file(cache, "THUDM/ImageReward", "ImageReward.pt")
    assert _weights(capsys)["imagereward"]["weights"] == "no"
    _fake_hf_file(cache, "bert-base-uncased", "vocab.txt")
    assert _weights(capsys)["imagereward"]["weights"] == "yes"
    import shutil

    shutil.rmtree(cache / "models--THUDM--ImageReward")
    assert _weights(capsys)["imagereward"]["weights"] == "no"
    (tmp_path / ".cache" / "ImageReward").mkdir(parents=True)
    (tmp_path / ".cache" / "ImageReward" / "ImageReward.pt").write_bytes(b"x")
    assert _weights(capsys)["imagereward"]["weights"] == "yes"


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
