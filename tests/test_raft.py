"""RAFT (Dong et al. 2023): selection by hand (best-of-K and quantile, ties, NaN), the denoising
loss and one optimizer step on kept images, the offline reader, runs through the CLI (online with a
cost constraint and --resume restoring the Lagrange multiplier exactly; offline from a scored
JSONL), and 2 processes against 1 with the same global batch (slow)."""
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from vfeedback.algorithms.raft import RaftData, _count, denoising_loss, select, to_uint8
from vfeedback.errors import UserError

NAN = float("nan")


# ----------------------------------------------------------------------------- selection
def test_select_best_of_k_by_hand():
    s = [0.1, 0.9, 0.9, 0.3, 0.5, NAN, 0.5, 0.2, NAN, NAN]
    g = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    # group 0: 0.9 twice -> the lower index (1); group 1: 0.5 twice -> 4; group 2: all NaN -> none
    assert select(s, g, "best_of_k", 1.0) == [1, 4]
    # of the 2 scorable groups' bests keep floor(2 * 0.5) = 1: the better one
    assert select(s, g, "best_of_k", 0.5) == [1]
    # at least one is kept
    assert select(s, g, "best_of_k", 0.1) == [1]
    # the reference's 8 of 10: bests 10, 11, ..., 19 of ten groups of 2 -> the 8 best groups' bests
    s10 = [v for p in range(10) for v in (float(p), 10.0 + p)]
    g10 = [p for p in range(10) for _ in range(2)]
    assert select(s10, g10, "best_of_k", 0.8) == [5, 7, 9, 11, 13, 15, 17, 19]
    assert select([NAN, NAN], [0, 0], "best_of_k", 1.0) == []


def test_select_quantile_by_hand():
    s = [0.1, 0.9, 0.9, 0.3, 0.5, NAN, 0.5, 0.2, NAN, NAN]
    g = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    # floor(10 * 0.3) = 3 of all ten: 0.9, 0.9, then the first 0.5 (index 4 before 6)
    assert select(s, g, "quantile", 0.3) == [1, 2, 4]
    # 5: adds 0.5 (6) and 0.3 (3); NaN never kept even when the count reaches it
    assert select(s, g, "quantile", 0.5) == [1, 2, 3, 4, 6]
    assert select(s, g, "quantile", 1.0) == [0, 1, 2, 3, 4, 6, 7]
    assert _count(100, 0.29) == 29 and _count(10, 0.8) == 8 and _count(3, 0.1) == 1
    with pytest.raises(ValueError):
        select([1.0], [0, 1], "quantile", 0.5)


# ----------------------------------------------------------------------------- the loss and one step
def test_denoising_loss_is_epsilon_mse_and_a_step_lowers_it(fresh_sd15):
    from vfeedback.models import add_lora

    m = fresh_sd15
    params = add_lora(m, 4)
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, m.resolution, m.resolution, generator=gen)
    prompts = ["a red apple", "a blue lake"]
    gens = lambda: [torch.Generator().manual_seed(10 + i) for i in range(2)]
    loss = denoising_loss(m, images, prompts, gens())
    # by hand, with the same draws: latent = mean + std * eps, x_t = add_noise, target = the noise
    with torch.no_grad():
        dist = m.vae.encode(images * 2 - 1).latent_dist
        g = gens()
        shape = dist.mean.shape[1:]
        e1 = torch.stack([torch.randn(shape, generator=x) for x in g])
        nz = torch.stack([torch.randn(shape, generator=x) for x in g])
        t = torch.tensor([int(torch.randint(0, m.scheduler.config.num_train_timesteps, (1,), generator=x)) for x in g])
        lat = (dist.mean + dist.std * e1) * m.vae.config.scaling_factor
        ab = m.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = ab.sqrt() * lat + (1 - ab).sqrt() * nz
        hs, added = m.encode_prompt(prompts, cfg=False).unet_inputs(False)
        pred = m.unet(noisy, t, encoder_hidden_states=hs).sample
        want = ((pred - nz) ** 2).mean()
    assert m.scheduler.config.prediction_type == "epsilon"
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    # one optimizer step on the kept images lowers their loss (same draws before and after)
    opt = torch.optim.SGD(params, lr=0.5)
    loss.backward()
    opt.step()
    with torch.no_grad():
        after = denoising_loss(m, images, prompts, gens())
    assert after.item() < loss.item() - 1e-4


def test_to_uint8_rounds_like_a_png_writer():
    x = torch.tensor([0.0, 0.5 / 255, 0.51 / 255, 1.0, 1.2, -0.1]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    assert to_uint8(x)[0, 0, 0].tolist() == [0, 0, 1, 255, 255, 0]


# ----------------------------------------------------------------------------- the offline reader
def _png(path, rgb=(255, 0, 0), size=8):
    from PIL import Image

    Image.new("RGB", (size, size), rgb).save(path)


def test_offline_reader_good_file_and_folder(tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png", (0, 0, 255), size=16)
    f = tmp_path / "s.jsonl"
    f.write_text('{"image": "a.png", "prompt": "red", "score": 2}\n\n# a comment\n{"image": "b.png", "prompt": "blue"}\n'
                 '{"image": "a.png", "prompt": "red", "score": -1.5}\n')
    d = RaftData(str(f))
    assert [r.score for r in d.rows] == [2.0, None, -1.5]
    assert d.groups() == [[0, 2], [1]]
    x = d.load([1], 8)
    assert x.shape == (1, 3, 8, 8) and x[0, 2].min().item() == pytest.approx(1.0) and x[0, 0].max().item() == pytest.approx(0.0)
    folder = tmp_path / "imgs"
    folder.mkdir()
    _png(folder / "x.png")
    (folder / "x.txt").write_text("a red square\n")
    assert [(r.prompt, r.score) for r in RaftData(str(folder)).rows] == [("a red square", None)]


@pytest.mark.parametrize("content, msg", [
    ('{"image": "nope.png", "prompt": "red"}\n', "line 1: image"),
    ('{"image": "a.png", "prompt": "red"}\n{"image": "a.png", "prompt": \n', "line 2: not valid JSON"),
    ('{"image": "a.png"}\n', "line 1: expected"),
    ('{"image": "a.png", "prompt": "red", "score": "high"}\n', "line 1: score 'high' is not a finite number"),
    ('{"image": "a.png", "prompt": "red", "score": NaN}\n', "line 1: score nan is not a finite number"),
    ('{"image": "bad.png", "prompt": "red"}\n', "is not a readable image"),
    ("", "holds no images"),
])
def test_offline_reader_refuses_bad_rows(tmp_path, content, msg):
    _png(tmp_path / "a.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    f = tmp_path / "s.jsonl"
    f.write_text(content)
    with pytest.raises(UserError, match="raft.data: .*" + msg.replace("(", r"\(")):
        RaftData(str(f))


def test_offline_reader_folder_needs_prompts(tmp_path):
    _png(tmp_path / "x.png")
    with pytest.raises(UserError, match="has no prompt file x.txt"):
        RaftData(str(tmp_path))
    with pytest.raises(UserError, match="not found"):
        RaftData(str(tmp_path / "missing.jsonl"))


# ----------------------------------------------------------------------------- through the CLI
BASE = {
    "algorithm": "raft",
    "seed": 0,
    "model": {"family": "sd15", "path": "tiny:sd15", "resolution": 32, "gradient_checkpointing": False,
              "lora": {"rank": 4, "target_modules": ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]}},
    "reward": [{"name": "color"}],
    "prompts": {"train": ["a red apple", "a blue lake", "a green field"], "eval": ["a red apple"], "eval_seeds": [0]},
    "sampling": {"steps": 4, "guidance_scale": 4.0},
    "raft": {"num_samples": 3, "prompts_per_round": 2, "steps_per_round": 1, "keep_fraction": 1.0},
    "train": {"max_steps": 2, "batch_size": 2, "lr": 1e-2, "weight_decay": 0.0, "max_grad_norm": None, "adam_eps": 1e-4},
    "log": {"trackers": [], "checkpoint_every": 1},
}


def _write(tmp_path, name, **over):
    c = json.loads(json.dumps(BASE))
    c["output_dir"] = str(tmp_path / name)
    for k, v in over.items():
        c[k] = {**c.get(k, {}), **v} if isinstance(v, dict) and isinstance(c.get(k), dict) else v
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(c))
    return p


def _metrics(run):
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


def test_online_par_and_cost_resume_restores_lambda_exactly(tmp_path):
    from vfeedback.cli import main

    cost = {"name": "brightness", "budget": 0.0, "lr_lambda": 2.0, "lambda_init": 0.1}
    # small: one prompt x 2 images a round, 2 sampler steps, one step, then one more after --resume
    cfg = _write(tmp_path, "run", cost=cost, reward={"rewards": [{"name": "color"}], "shaping": "par"},
                 sampling={"steps": 2, "guidance_scale": 4.0}, raft={**BASE["raft"], "num_samples": 2, "prompts_per_round": 1},
                 train={**BASE["train"], "max_steps": 1})
    assert main(["train", str(cfg)]) == 0
    run = tmp_path / "run"
    (m0,) = _metrics(run)
    # PAR's reference is one base-model image per prompt from its own seed (pinned in
    # test_online_par_reference_is_one_base_image_per_prompt): not the samples even at LoRA zero
    assert m0["reward_ref_mean"] != m0["reward_raw_mean"] and m0["reward_shaped_mean"] != 0.5
    # one multiplier step per round: lambda <- lambda + 2 * (mean brightness - 0), from lambda_init
    assert m0["lambda"] == 0.1 and m0["lambda_next"] == pytest.approx(0.1 + 2.0 * m0["cost_mean"], rel=1e-12)
    ck = json.loads((run / "checkpoints" / "step-000001" / "reward_shaping.json").read_text())
    assert ck["lambda"] == m0["lambda_next"] and ck["updates"] == 1
    assert main(["train", str(cfg), "--resume", "train.max_steps=2"]) == 0
    m = _metrics(run)
    assert len(m) == 2 and m[1]["lambda"] == m0["lambda_next"]  # bit-exact, not lambda_init
    assert m[1]["reward_shaped_mean"] != 0.5  # the trained LoRA now differs from the reference
    s = json.loads((run / "summary.json").read_text())
    assert s["algorithm"] == "raft" and s["eval_reward_exported"] == pytest.approx(s["eval_reward_after"], abs=1e-3)


def test_offline_collection_scored_by_the_reward_in_chunks(tmp_path):
    """_collect_offline without a model: the run's reward (through ScalarReward, with a cost)
    scores prompts_per_round prompts at a time, the best of each prompt is kept and re-read."""
    from types import SimpleNamespace

    import rewards
    from vfeedback.algorithms.raft import RAFT
    from vfeedback.config import RunConfig
    from vfeedback.reward_shaping import ScalarReward

    for i, rgb in enumerate([(250, 0, 0), (0, 0, 250), (0, 250, 0), (0, 0, 250)]):
        _png(tmp_path / f"{i}.png", rgb, size=8)
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps({"image": f"{i}.png", "prompt": p}) + "\n"
                         for i, p in enumerate(["a red apple", "a red apple", "a blue lake", "a blue lake"])))
    c = json.loads(json.dumps(BASE))
    c.update(output_dir=str(tmp_path / "o"), raft={"mode": "offline", "data": str(f), "prompts_per_round": 1, "keep_fraction": 1.0},
             cost={"name": "brightness", "budget": 0.0, "lr_lambda": 1.0})
    cfg = RunConfig.model_validate(c)
    tr = SimpleNamespace(acc=SimpleNamespace(num_processes=1, process_index=0), config_source=None,
                         model=SimpleNamespace(resolution=8, device=torch.device("cpu")))
    tr.scalar_reward = ScalarReward(cfg, rewards.load("color"), None, cost=rewards.load("brightness"))
    k = RAFT(cfg, tr)._collect_offline()
    # red beats blue for "a red apple", blue beats green for "a blue lake"
    assert k.prompts == ["a red apple", "a blue lake"]
    assert k.images[0, :, 0, 0].tolist() == [250, 0, 0] and k.images[1, :, 0, 0].tolist() == [0, 0, 250]
    assert tr.scalar_reward.updates == 2  # one scoring batch (and multiplier step) per prompt


def test_online_par_reference_is_one_base_image_per_prompt(tmp_path):
    """_collect_online with PAR, the renders faked: the reference is rendered once per prompt with
    the adapter off from derive_seed(seed, "raft-par-ref", round, prompt), not from the samples'
    seeds, and every sample of the prompt is shaped against it: sigmoid(r - r_ref)."""
    from types import SimpleNamespace

    import rewards
    from vfeedback.algorithms.raft import RAFT
    from vfeedback.config import RunConfig
    from vfeedback.engine import derive_seed
    from vfeedback.reward_shaping import ScalarReward

    c = json.loads(json.dumps(BASE))
    c.update(output_dir=str(tmp_path / "o"), reward={"rewards": [{"name": "color"}], "shaping": "par"})
    cfg = RunConfig.model_validate(c)  # 2 prompts a round, K = 3
    tr = SimpleNamespace(acc=SimpleNamespace(num_processes=1, process_index=0), config_source=None,
                         train_prompts=list(BASE["prompts"]["train"]), model=SimpleNamespace(resolution=8, device=torch.device("cpu")))
    tr.scalar_reward = ScalarReward(cfg, rewards.load("color"), None)
    raft, calls = RAFT(cfg, tr), []

    def render(prompts, seeds, which="current"):  # an image whose red level is set by its seed
        calls.append((which, list(prompts), list(seeds)))
        x = torch.zeros(len(seeds), 3, 8, 8)
        x[:, 0] = torch.tensor([(s % 1000) / 1000 for s in seeds]).view(-1, 1, 1)
        return x

    raft.render = render
    k = raft._collect_online(rnd=1)
    prompts = raft._round_prompts(1)
    (w0, p0, s0), (w1, p1, s1) = calls
    assert (w0, p0) == ("current", [p for p in prompts for _ in range(3)])
    assert (w1, p1, s1) == ("ref", prompts, [derive_seed(0, "raft-par-ref", 1, p) for p in range(2)])
    color = rewards.load("color")
    r = color(render(p0, s0), p0).double()
    r_ref = color(render(p1, s1), p1).double().repeat_interleave(3)
    want = torch.sigmoid(r - r_ref)
    assert k.mets["reward_ref_mean"] == pytest.approx(float(r_ref.mean()), rel=1e-6)
    assert k.mets["raft/round_score_mean"] == pytest.approx(float(want.mean()), rel=1e-6)
    best = [max(range(3), key=lambda i: float(want[g * 3 + i])) for g in range(2)]  # keep_fraction 1: each prompt's best
    assert k.mets["raft/kept_score_mean"] == pytest.approx(float(sum(want[g * 3 + b] for g, b in enumerate(best)) / 2), rel=1e-6)


@pytest.mark.slow
def test_offline_from_scored_jsonl(tmp_path):
    from safetensors import safe_open

    from vfeedback.cli import main

    for i, rgb in enumerate([(250, 0, 0), (0, 0, 250), (240, 10, 10), (0, 240, 0)]):
        _png(tmp_path / f"{i}.png", rgb, size=32)
    rows = [("0.png", "a red apple", 1.0), ("1.png", "a red apple", 3.0), ("2.png", "a blue lake", 0.5), ("3.png", "a blue lake", 0.7)]
    f = tmp_path / "scored.jsonl"
    f.write_text("".join(json.dumps({"image": a, "prompt": p, "score": s}) + "\n" for a, p, s in rows))
    cfg = _write(tmp_path, "off", raft={"mode": "offline", "data": str(f), "offline_scores": "file", "keep_fraction": 1.0},
                 train={**BASE["train"], "max_steps": 1})
    assert main(["train", str(cfg)]) == 0
    with safe_open(str(tmp_path / "off" / "checkpoints" / "step-000001" / "method_state.safetensors"), framework="pt") as h:
        meta = json.loads(h.metadata()["json"])
        kept = h.get_tensor("kept_images")
    # best of each prompt: 1.png (3.0 > 1.0) and 3.png (0.7 > 0.5), stored as 8-bit pixels
    assert meta["prompts"] == ["a red apple", "a blue lake"]
    assert kept[0, :, 0, 0].tolist() == [0, 0, 250] and kept[1, :, 0, 0].tolist() == [0, 240, 0]
    assert _metrics(tmp_path / "off")[0]["raft/kept_score_mean"] == pytest.approx((3.0 + 0.7) / 2)


def test_bad_raft_configs_exit_2(tmp_path, capsys):
    from vfeedback.cli import main

    cases = [
        (dict(raft={"mode": "offline"}), "raft: Value error, mode: offline needs raft.data"),
        (dict(raft={"selection": "top3"}), "raft.selection"),
        (dict(raft={"keep_fraction": 0}), "raft.keep_fraction"),
        (dict(raft={"mode": "offline", "data": "x.jsonl"}, reward={"rewards": [{"name": "color"}], "shaping": "par"}),
         "reward.shaping: par compares"),
        (dict(raft={"num_samples": 1}, reward={"rewards": [{"name": "color"}], "shaping": "win_rate"}), "raft.num_samples to 2"),
        (dict(model={**BASE["model"], "lora": {"rank": 4, "text_encoder": True}}), "model.lora.text_encoder"),
    ]
    for over, msg in cases:
        rc = main(["validate", str(_write(tmp_path, "bad", **over))])
        err = capsys.readouterr().err
        assert rc == 2 and msg in err, (over, err)


# ----------------------------------------------------------------------------- 2 processes
@pytest.mark.slow
def test_two_process_raft_matches_one_process(tmp_path):
    import subprocess
    import sys

    from safetensors.torch import load_file

    # win-rate shaping and a cost over the GLOBAL batch: every process must see every prompt's group
    over = dict(reward={"rewards": [{"name": "color"}], "shaping": "win_rate"},
                cost={"name": "brightness", "budget": 0.1, "lr_lambda": 1.0},
                raft={**BASE["raft"], "selection": "quantile", "keep_fraction": 0.5, "steps_per_round": 2},
                prompts={**BASE["prompts"], "eval_seeds": [0, 1]}, train={**BASE["train"], "max_steps": 3})
    one = _write(tmp_path, "one", **over)
    two = _write(tmp_path, "two", **{**over, "train": {**over["train"], "batch_size": 1}})
    for cfg, n in ((one, 1), (two, 2)):
        r = subprocess.run([sys.executable, "-m", "vfeedback", "train", str(cfg), "--num-processes", str(n)], capture_output=True,
                           text=True, timeout=1200, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr[-3000:]
    a = load_file(str(tmp_path / "one" / "lora" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "two" / "lora" / "pytorch_lora_weights.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in a.items() if ".lora_B." in k)
    for k in a:  # tolerance: tests/test_multiprocess.py WEIGHT_ATOL (float sums in another order)
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-5), k
    ma, mb = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    for x, y in zip(ma, mb):
        for key in ("raft/kept", "raft/kept_score_mean", "lambda", "lambda_next", "cost_mean", "reward_raw_mean"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-7), (x["step"], key)
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["replicas_identical"] is True


@pytest.mark.parametrize("name", ["tiny", "shapes", "sd15", "sdxl"])
def test_shipped_configs_validate(name):
    """The schema and the method's own checks (the reward weights of the GPU configs are not
    downloaded here; `vfeedback validate` checks them where they are)."""
    from vfeedback.algorithms.raft import RAFT
    from vfeedback.config import load_config
    from vfeedback.reward_shaping import check_config

    path = Path(__file__).resolve().parent.parent / "configs" / "raft" / f"{name}.yaml"
    assert "vfeedback train configs/raft/" in path.read_text()  # the header names the command
    cfg = load_config(path)
    RAFT.check_config(cfg)
    check_config(cfg, RAFT)
    assert cfg.algorithm == "raft"
