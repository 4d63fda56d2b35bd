"""Diffusion-DPO: the loss against hand computations, one optimizer step that raises the policy's
margin of winners over losers, the pair reader on a tiny parquet in Pick-a-Pic's schema and on
a real export of the rank app (then trained on through the CLI), ties / missing / corrupt images,
the SDXL per-image micro-conditioning, the resumable latent cache, and (slow) 2 processes == 1."""
import io
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vfeedback.algorithms.diffusion_dpo import DiffusionDPO, LatentCache, denoising_error, diffusion_dpo_loss, preprocess
from vfeedback.config import RunConfig
from vfeedback.errors import UserError
from vfeedback.feedback.pairs import read_pairs

ROOT = Path(__file__).resolve().parent.parent
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"]


# ----------------------------------------------------------------------------- the loss
def test_loss_matches_hand_computation():
    beta = 10.0
    ew, el = torch.tensor([0.10, 0.30]), torch.tensor([0.20, 0.25])
    rw, rl = torch.tensor([0.12, 0.30]), torch.tensor([0.18, 0.20])
    loss, inside = diffusion_dpo_loss(ew, el, rw, rl, beta)
    # pair 0: -0.5 * 10 * ((0.10 - 0.20) - (0.12 - 0.18)) = -5 * (-0.04) = 0.2
    # pair 1: -0.5 * 10 * ((0.30 - 0.25) - (0.30 - 0.20)) = -5 * (-0.05) = 0.25
    assert inside.tolist() == pytest.approx([0.2, 0.25], abs=1e-6)
    assert loss.tolist() == pytest.approx([math.log(1 + math.exp(-0.2)), math.log(1 + math.exp(-0.25))], abs=1e-6)
    # the loser doing better than under the reference: a negative argument, a loss above log 2
    loss2, inside2 = diffusion_dpo_loss(torch.tensor([0.2]), torch.tensor([0.1]), torch.tensor([0.2]), torch.tensor([0.2]), 4.0)
    assert inside2.item() == pytest.approx(-0.2, abs=1e-6)  # -2 * (0.1 - 0) = -0.2
    assert loss2.item() == pytest.approx(math.log(1 + math.exp(0.2)), abs=1e-6)


def test_loss_gradient_lowers_the_winner_error_and_raises_the_loser_error():
    ew, el = torch.tensor([0.3], requires_grad=True), torch.tensor([0.3], requires_grad=True)
    loss, _ = diffusion_dpo_loss(ew, el, torch.tensor([0.3]), torch.tensor([0.3]), 2.0)
    loss.sum().backward()
    # d/d e_w of -log sigmoid(-beta/2 (e_w - e_l)) at 0: beta/2 * sigmoid(0) = 0.5
    assert ew.grad.item() == pytest.approx(0.5, abs=1e-6) and el.grad.item() == pytest.approx(-0.5, abs=1e-6)


def test_denoising_error_is_the_mean_over_channels_and_pixels():
    pred = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]]], [[[0.0, 0.0]], [[0.0, 2.0]]]])  # (2, 2, 1, 2)
    err = denoising_error(pred, torch.zeros_like(pred))
    assert err.tolist() == pytest.approx([(1 + 4 + 9 + 16) / 4, 4 / 4])


def test_preprocess_resizes_the_short_side_crops_the_centre_and_reports_sdxl_time_ids():
    from PIL import Image

    im = Image.new("RGB", (40, 20), (255, 0, 0))  # width 40, height 20
    im.paste((0, 0, 255), (0, 0, 6, 20))  # a blue band on the left: cropped away
    x, tids = preprocess(im, 16)
    # short side 20 -> 16, width 40 -> 32; centre crop of 16 from 32: left 8, top 0
    assert tids == [20, 40, 0, 8, 16, 16]
    assert x.shape == (3, 16, 16) and x[2].max() < 0.05 and x[0].min() > 0.95


# ----------------------------------------------------------------------------- Pick-a-Pic parquet
def _png(colour, size=(24, 16)) -> bytes:
    from PIL import Image

    b = io.BytesIO()
    Image.new("RGB", size, colour).save(b, format="PNG")
    return b.getvalue()


def write_pickapic(path: Path, rows: list[dict]) -> Path:
    """A parquet file in yuvalkirstain/pickapic_v2's schema (its columns and types), one row per
    dict (keys: caption, jpg_0, jpg_1, label_0; the rest filled in), written with datasets."""
    import datetime

    import datasets

    feats = datasets.Features({
        "are_different": datasets.Value("bool"), "best_image_uid": datasets.Value("string"), "caption": datasets.Value("string"),
        "created_at": datasets.Value("timestamp[ns]"), "has_label": datasets.Value("bool"),
        "image_0_uid": datasets.Value("string"), "image_0_url": datasets.Value("string"),
        "image_1_uid": datasets.Value("string"), "image_1_url": datasets.Value("string"),
        "jpg_0": datasets.Value("binary"), "jpg_1": datasets.Value("binary"),
        "label_0": datasets.Value("float64"), "label_1": datasets.Value("float64"),
        "model_0": datasets.Value("string"), "model_1": datasets.Value("string"),
        "ranking_id": datasets.Value("int64"), "user_id": datasets.Value("int64"), "num_example_per_prompt": datasets.Value("int64"),
    })
    cols = {k: [] for k in feats}
    for i, r in enumerate(rows):
        lab = r["label_0"]
        full = {"are_different": True, "best_image_uid": f"u{i}-{0 if lab == 1 else 1}", "caption": r["caption"],
                "created_at": datetime.datetime(2023, 5, 1, 12, 0, i), "has_label": True,
                "image_0_uid": f"u{i}-0", "image_0_url": f"https://example.invalid/{i}-0.png", "image_1_uid": f"u{i}-1",
                "image_1_url": f"https://example.invalid/{i}-1.png", "jpg_0": r["jpg_0"], "jpg_1": r["jpg_1"],
                "label_0": lab, "label_1": None if lab is None else 1 - lab, "model_0": "sd-1.5", "model_1": "sdxl",
                "ranking_id": 1000 + i, "user_id": 7, "num_example_per_prompt": 1}
        for k in cols:
            cols[k].append(full[k])
    datasets.Dataset.from_dict(cols, features=feats).to_parquet(str(path))
    return path


RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def test_pickapic_parquet_label_decides_the_winner_and_ties_are_dropped(tmp_path):
    p = write_pickapic(tmp_path / "train-00000-of-00001.parquet", [
        {"caption": "a red square", "jpg_0": _png(RED), "jpg_1": _png(GREEN), "label_0": 1.0},
        {"caption": "a blue square", "jpg_0": _png(GREEN), "jpg_1": _png(BLUE), "label_0": 0.0},
        {"caption": "a tie", "jpg_0": _png(RED), "jpg_1": _png(BLUE), "label_0": 0.5},
    ])
    for spec in (p, tmp_path):  # the file, or the folder of parquet files
        ps = read_pairs(spec, cache_dir=str(tmp_path / "hf"))
        assert len(ps) == 2 and ps.ties == 1
        assert [pr.caption for pr in ps.pairs] == ["a red square", "a blue square"]
        assert ps.load_image(0, "winner").getpixel((0, 0)) == RED and ps.load_image(0, "loser").getpixel((0, 0)) == GREEN
        assert ps.load_image(1, "winner").getpixel((0, 0)) == BLUE and ps.load_image(1, "loser").getpixel((0, 0)) == GREEN
        assert ps.pairs[1].where.endswith("train-00000-of-00001.parquet row 1")
    assert len(read_pairs(p, max_pairs=1, cache_dir=str(tmp_path / "hf"))) == 1


def test_pickapic_datasets_folder_and_split(tmp_path):
    import datasets

    p = write_pickapic(tmp_path / "x.parquet", [{"caption": "c", "jpg_0": _png(RED), "jpg_1": _png(GREEN), "label_0": 0.0}])
    ds = datasets.Dataset.from_parquet(str(p), cache_dir=str(tmp_path / "hf"))
    datasets.DatasetDict({"train": ds, "validation_unique": ds}).save_to_disk(str(tmp_path / "saved"))
    ps = read_pairs(tmp_path / "saved", split="validation_unique")
    assert len(ps) == 1 and ps.load_image(0, "winner").getpixel((0, 0)) == GREEN
    with pytest.raises(UserError, match="has splits train, validation_unique; set diffusion_dpo.split"):
        read_pairs(tmp_path / "saved", split="test")
    # a hub-layout folder: the files of the split, by name
    hub = tmp_path / "hub" / "data"
    hub.mkdir(parents=True)
    write_pickapic(hub / "validation-00000-of-00001-abc.parquet", [{"caption": "v", "jpg_0": _png(RED), "jpg_1": _png(GREEN), "label_0": 1.0}])
    with pytest.raises(UserError, match="has no parquet file of split 'train' .it has validation.; set diffusion_dpo.split"):
        read_pairs(hub, cache_dir=str(tmp_path / "hf"))
    assert read_pairs(hub, split="validation", cache_dir=str(tmp_path / "hf")).pairs[0].caption == "v"


@pytest.mark.parametrize("row,needle", [
    ({"caption": "c", "jpg_0": None, "jpg_1": b"x", "label_0": 1.0}, r"row 1: jpg_0 is empty \(the image is missing\)"),
    ({"caption": "c", "jpg_0": b"x", "jpg_1": b"x", "label_0": 0.3}, r"row 1: label_0 is 0.3"),
    ({"caption": "c", "jpg_0": b"x", "jpg_1": b"x", "label_0": None}, r"row 1: label_0 is None"),
    ({"caption": None, "jpg_0": b"x", "jpg_1": b"x", "label_0": 1.0}, r"row 1: caption is None"),
])
def test_pickapic_bad_rows_name_the_file_and_row(tmp_path, row, needle):
    good = {"caption": "ok", "jpg_0": _png(RED), "jpg_1": _png(GREEN), "label_0": 1.0}
    p = write_pickapic(tmp_path / "d.parquet", [good, row])
    with pytest.raises(UserError, match=r"diffusion_dpo.data: .*d\.parquet " + needle):
        read_pairs(p, cache_dir=str(tmp_path / "hf"))


def test_pickapic_missing_column_and_all_ties(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"caption": ["c"], "jpg_0": [b"x"]}).to_parquet(str(tmp_path / "a.parquet"))
    with pytest.raises(UserError, match="lacks the Pick-a-Pic column.s. jpg_1, label_0"):
        read_pairs(tmp_path / "a.parquet", cache_dir=str(tmp_path / "hf"))
    p = write_pickapic(tmp_path / "t.parquet", [{"caption": "c", "jpg_0": _png(RED), "jpg_1": _png(RED), "label_0": 0.5}])
    with pytest.raises(UserError, match=r"holds no preference pair \(1 ties dropped\)"):
        read_pairs(p, cache_dir=str(tmp_path / "hf"))


# ----------------------------------------------------------------------------- the latent cache
def test_latent_cache_corrupt_image_names_file_and_row_and_the_cache_is_reused(tmp_path, tiny_sd15):
    import copy

    m = copy.copy(tiny_sd15)  # the shared model, read only; this test's own resolution
    m.resolution = 32
    p = write_pickapic(tmp_path / "d.parquet", [
        {"caption": "a", "jpg_0": _png(RED), "jpg_1": _png(GREEN), "label_0": 1.0},
        {"caption": "b", "jpg_0": _png(GREEN), "jpg_1": _png(BLUE), "label_0": 0.0},
        {"caption": "c", "jpg_0": b"\x89PNG broken", "jpg_1": _png(BLUE), "label_0": 0.0},
    ])
    ps = read_pairs(p, cache_dir=str(tmp_path / "hf"))
    cache = LatentCache(tmp_path / "cache", ps, m, chunk=2, dtype="float32", main=True)
    got = cache.fetch([1, 0])
    assert got["w_mean"].shape == (2, 4, 8, 8) and got["w_tids"].tolist() == [[16, 24, 0, 8, 32, 32]] * 2
    # the cached posterior is the VAE's: pair 1's winner (jpg_1, blue) encoded directly
    x, _ = preprocess(ps.load_image(1, "winner"), 32)
    with torch.no_grad():
        d = m.vae.encode(x[None] * 2 - 1).latent_dist
    assert torch.allclose(got["w_mean"][0], d.mean[0], atol=1e-6) and torch.allclose(got["w_std"][0], d.std[0], atol=1e-6)
    with pytest.raises(UserError, match=r"diffusion_dpo.data: .*d\.parquet row 2: column jpg_0 is not a readable image"):
        cache.fetch([2])
    chunk0 = tmp_path / "cache" / "chunk-000000.safetensors"
    mtime = chunk0.stat().st_mtime_ns
    # a resumed run (same data, same model): the chunk is read, not encoded again
    again = LatentCache(tmp_path / "cache", ps, m, chunk=2, dtype="float32", main=True)
    again._encode = lambda *a: pytest.fail("encoded again")
    assert torch.equal(again.fetch([0])["l_mean"], got["l_mean"][1:])
    assert chunk0.stat().st_mtime_ns == mtime
    # other data under the same folder: the old chunks are dropped
    ps2 = read_pairs(p, max_pairs=1, cache_dir=str(tmp_path / "hf"))
    LatentCache(tmp_path / "cache", ps2, m, chunk=2, dtype="float32", main=True)
    assert not chunk0.exists()


# ----------------------------------------------------------------------------- one optimizer step
def _cfg(data, family="sd15", path="tiny:sd15", **dpo):
    return RunConfig.model_validate({
        "algorithm": "diffusion_dpo", "output_dir": "unused", "model": {"family": family, "path": path, "resolution": 32},
        "reward": "color", "prompts": {"train": ["a red apple"]}, "diffusion_dpo": {"data": str(data), **dpo},
    })


def _method(model, cfg, root):
    from accelerate import Accelerator

    trainer = SimpleNamespace(model=model, acc=Accelerator(cpu=True), run=SimpleNamespace(root=root), config_source=None)
    return DiffusionDPO(cfg, trainer)


def _margin(m, method, gens) -> float:
    """The policy's likelihood margin of winners over losers against the reference,
    -[(e_w - e_l) - (e_w,ref - e_l,ref)], averaged over the batch ``gens`` draws (the same pairs,
    timesteps, noise and posterior samples as train_step), computed here from the cache's
    winner / loser latents and plain UNet calls, independently of train_step's arithmetic."""
    sch, sf = m.scheduler, m.vae.config.scaling_factor
    idx, ts, noise, eps_w, eps_l = method.draw(gens)
    lat = method.cache.fetch(idx)
    total = 0.0
    with torch.no_grad():
        for j, i in enumerate(idx):
            x0 = torch.stack([(lat["w_mean"][j] + lat["w_std"][j] * eps_w[j]) * sf, (lat["l_mean"][j] + lat["l_std"][j] * eps_l[j]) * sf])
            tt = torch.tensor([ts[j]] * 2)
            xt = sch.add_noise(x0, noise[j].expand_as(x0), tt)
            hs = m.encode_prompt([method.data.pairs[i].caption] * 2, cfg=False).embeds
            e = denoising_error(m.unet(xt, tt, encoder_hidden_states=hs).sample, noise[j].expand_as(x0))
            with method.reference() as ref:
                r = denoising_error(ref(xt, tt, encoder_hidden_states=hs).sample, noise[j].expand_as(x0))
            total += -((e[0] - e[1]) - (r[0] - r[1])).item()
    return total / len(idx)


def test_one_optimizer_step_raises_the_margin_of_winners_over_losers(tmp_path, fresh_sd15):
    from vfeedback.models import add_lora

    m = fresh_sd15
    m.resolution = 32
    p = write_pickapic(tmp_path / "d.parquet", [
        {"caption": "a red apple", "jpg_0": _png(RED, (32, 32)), "jpg_1": _png(BLUE, (32, 32)), "label_0": 1.0},
        {"caption": "a red apple", "jpg_0": _png(GREEN, (32, 32)), "jpg_1": _png(RED, (40, 32)), "label_0": 0.0},
    ])
    params = add_lora(m, 4, None, LORA_TARGETS)
    m.unet.train()
    m.denoiser = m.unet
    method = _method(m, _cfg(p, beta=5000.0), tmp_path / "run")
    gens = lambda: [torch.Generator().manual_seed(s) for s in range(8)]
    assert _margin(m, method, gens()) == pytest.approx(0.0, abs=1e-9)  # LoRA B = 0: policy == reference
    loss, mets = method.train_step(None, gens(), None)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5) and mets["dpo/implicit_acc"] == 0.0
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    torch.optim.SGD(params, lr=1e-2).step()
    assert all(p.requires_grad for p in params)  # the reference pass switched the adapter back on
    after = _margin(m, method, gens())
    assert after > 0, after
    with torch.no_grad():
        loss2, mets2 = method.train_step(None, gens(), None)
    assert loss2.item() < math.log(2) and mets2["dpo/margin"] > 0


def test_sdxl_step_passes_each_images_own_micro_conditioning(tmp_path, tiny_sdxl):
    import copy

    from vfeedback.models import add_lora

    m = copy.copy(tiny_sdxl)
    m.pipe = copy.copy(tiny_sdxl.pipe)
    m.pipe.unet = copy.deepcopy(tiny_sdxl.unet)
    m.resolution = 32
    add_lora(m, 4, None, ["to_q", "to_k", "to_v", "to_out.0"])
    m.unet.train()
    seen = []
    m.denoiser = lambda x, t, encoder_hidden_states, added_cond_kwargs: (seen.append((added_cond_kwargs["time_ids"].clone(), t.clone())), m.unet(
        x, t, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs))[1]
    p = write_pickapic(tmp_path / "d.parquet", [
        {"caption": "a red apple", "jpg_0": _png(RED, (64, 48)), "jpg_1": _png(BLUE, (30, 40)), "label_0": 0.0},
    ])
    method = _method(m, _cfg(p, family="sdxl", path="tiny:sdxl"), tmp_path / "run")
    loss, _ = method.train_step(None, [torch.Generator().manual_seed(0)], None)
    assert torch.isfinite(loss)
    # winner jpg_1 (w 30, h 40): short side 30 -> 32, height -> int(32 * 40 / 30) = 42, crop top (42 - 32) / 2 = 5
    # loser jpg_0 (w 64, h 48): height 48 -> 32, width -> int(32 * 64 / 48) = 42, crop left 5
    assert seen[0][0].tolist() == [[40, 30, 5, 0, 32, 32], [48, 64, 0, 5, 32, 32]]
    assert seen[0][1][0] == seen[0][1][1]  # winner and loser at the same timestep


# ----------------------------------------------------------------------------- the rank app's export
def _app_export(tmp_path) -> Path:
    """Two answers given in the D3PO ranking app (its real backend, store and export): a pick and a tie."""
    from vfeedback.app.backend import open_backend
    from vfeedback.config import load_config

    cfg = load_config(ROOT / "tests/configs/rank/tiny-d3po.yaml", [f"output_dir={tmp_path / 'app'}", "sampling.steps=2",
                                                             "rank.labels_per_update=0"])
    b = open_backend(cfg)
    try:
        b.answer(b.view().round_id, "rank", [1])  # the second image is better
        b.answer(b.view().round_id, "tie", [])
        exp = tmp_path / "labels.jsonl"
        assert b.store.export_jsonl(exp) == 2
    finally:
        b.close()
    return exp


def test_a_preference_file_exported_from_the_rank_app_trains_diffusion_dpo(tmp_path):
    import yaml

    from vfeedback import cli

    exp = _app_export(tmp_path)
    recs = [json.loads(l) for l in exp.read_text().splitlines()]
    ps = read_pairs(exp)
    assert len(ps) == 1 and ps.ties == 1 and ps.pairs[0].caption == recs[0]["prompt"]
    assert Path(ps.pairs[0].winner).resolve() == (exp.parent / recs[0]["chosen"]["image"]).resolve()
    assert ps.pairs[0].winner.endswith("-1.png") and ps.pairs[0].loser.endswith("-0.png")
    out = tmp_path / "run"
    cfg = {"algorithm": "diffusion_dpo", "output_dir": str(out), "seed": 0,
           "model": {"family": "sd15", "path": "tiny:sd15", "resolution": 32, "gradient_checkpointing": False,
                     "lora": {"rank": 4, "target_modules": LORA_TARGETS}},
           "reward": [{"name": "color"}], "prompts": {"train": ["a red apple"], "eval_seeds": [0]},
           "sampling": {"steps": 2, "guidance_scale": 3.0}, "diffusion_dpo": {"data": str(exp), "cache_chunk": 4},
           "train": {"max_steps": 2, "batch_size": 2, "lr": 1e-3}, "log": {"trackers": []}}
    p = tmp_path / "dpo.yaml"
    p.write_text(yaml.safe_dump(cfg))
    assert cli.main(["train", str(p)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["algorithm"] == "diffusion_dpo" and s["diffusion_dpo"]["pairs"] == 1 and s["diffusion_dpo"]["ties_dropped"] == 1
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 2 and recs[0]["loss"] == pytest.approx(math.log(2), abs=1e-5) and recs[1]["loss"] < math.log(2)
    assert (out / "latent_cache" / "chunk-000000.safetensors").exists()
    assert (out / "lora" / "pytorch_lora_weights.safetensors").exists()


def test_preference_file_missing_image_and_imageless_items_exit_2(tmp_path, capsys):
    import yaml

    from vfeedback import cli

    prefs = tmp_path / "p.jsonl"
    (tmp_path / "a.png").write_bytes(_png(RED))
    prefs.write_text(json.dumps({"prompt": "x", "latent_seed": 1, "chosen": {"noise_seed": 1, "image": "a.png"},
                                 "rejected": {"noise_seed": 2, "image": "gone.png"}}) + "\n")
    cfg = {"algorithm": "diffusion_dpo", "output_dir": str(tmp_path / "run"), "model": {"family": "sd15", "path": "tiny:sd15"},
           "reward": "color", "prompts": {"train": ["x"]}, "diffusion_dpo": {"data": str(prefs)}, "log": {"trackers": []}}
    c = tmp_path / "c.yaml"
    c.write_text(yaml.safe_dump(cfg))
    assert cli.main(["validate", str(c)]) == 2
    err = capsys.readouterr().err
    assert f"{prefs} line 1: image {tmp_path / 'gone.png'} not found" in err
    prefs.write_text(json.dumps({"prompt": "x", "latent_seed": 1, "chosen": {"noise_seed": 1}, "rejected": {"noise_seed": 2}}) + "\n")
    assert cli.main(["train", str(c)]) == 2
    assert f"{prefs} line 1: item 0 has no \"image\"" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing was created


# ----------------------------------------------------------------------------- 2 processes
@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    import subprocess
    import sys

    import yaml
    from safetensors.torch import load_file

    p = write_pickapic(tmp_path / "d.parquet", [
        {"caption": c, "jpg_0": _png(a, (32, 32)), "jpg_1": _png(b, (32, 32)), "label_0": lab}
        for c, a, b, lab in [("a red apple", RED, BLUE, 1.0), ("a blue lake", RED, BLUE, 0.0), ("a green field", GREEN, RED, 1.0),
                             ("a red apple", GREEN, RED, 0.0), ("a tie", RED, RED, 0.5)]])

    def run(out, batch, procs):
        cfg = {"algorithm": "diffusion_dpo", "output_dir": str(out), "seed": 0,
               "model": {"family": "sd15", "path": "tiny:sd15", "resolution": 32, "gradient_checkpointing": False,
                         "lora": {"rank": 4, "target_modules": LORA_TARGETS}},
               "reward": [{"name": "color"}], "prompts": {"train": ["a red apple"], "eval": ["a red apple", "a blue lake"], "eval_seeds": [0, 1]},
               "sampling": {"steps": 2, "guidance_scale": 3.0}, "diffusion_dpo": {"data": str(p), "cache_chunk": 2},
               "train": {"max_steps": 2, "batch_size": batch, "lr": 1e-3, "adam_eps": 1e-4, "max_grad_norm": None},
               "log": {"trackers": []}}
        c = tmp_path / f"{out.name}.yaml"
        c.write_text(yaml.safe_dump(cfg))
        r = subprocess.run([sys.executable, "-m", "vfeedback", "train", str(c), "--num-processes", str(procs)], capture_output=True,
                           text=True, timeout=900, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr[-3000:]

    run(tmp_path / "one", 4, 1)
    run(tmp_path / "two", 2, 2)
    a = load_file(str(tmp_path / "one" / "lora" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "two" / "lora" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    # Tolerances. As in tests/test_multiprocess.py the two runs differ in float summation order
    # only (gloo's all-reduce), but Diffusion-DPO amplifies it: the loss's argument is
    # beta/2 = 2500 times (e_w - e_l) - (e_w,ref - e_l,ref), a difference of errors ~1 that cancel
    # to ~1e-3, so a few-ulp difference becomes ~1e-4 relative after one step (measured at lr 1e-2:
    # loss 10.74768 vs 10.74786, weights 8e-5 apart; at this test's lr 1e-3: step-2 loss 1.365660 vs
    # 1.365557, weights 5.3e-6 apart). A wrong batch or a gradient that was not all-reduced moves a
    # weight by ~lr = 1e-3; we allow lr / 20 on the weights and rel 1e-3 on the loss.
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=5e-5) for k in a), max((a[k] - b[k]).abs().max().item() for k in a)
    assert any(a[k].abs().max() > 5e-4 for k in a if ".lora_B." in k)  # training moved the LoRA by ~lr
    la = [json.loads(l)["loss"] for l in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(l)["loss"] for l in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert la[0] == pytest.approx(math.log(2), abs=1e-6) and la == pytest.approx(lb, rel=1e-3)
    s = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert s["num_processes"] == 2 and s["replicas_identical"] is True
