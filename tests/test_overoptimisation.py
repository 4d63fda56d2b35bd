"""The over-optimisation study's pieces (issue #18): the KL measure, the proxy judges' registry and
manifest, and the table / figure builder (bench/overoptimisation.py)."""
import importlib.util
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("overoptimisation", ROOT / "bench" / "overoptimisation.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


oo = _bench()


# ------------------------------------------------------------------------------ the KL measure
def test_step_kl_closed_form():
    mean = torch.zeros(2, 3, 2, 2)
    ref = torch.zeros(2, 3, 2, 2)
    ref[0] = 1.0  # 12 dims, each (1)^2 / (2 * 0.25) = 2
    ref[1, 0, 0, 0] = 0.5  # one dim: 0.25 / 0.5
    assert oo.step_kl(mean, ref, 0.5).tolist() == pytest.approx([24.0, 0.5], rel=1e-12)
    # the per-dim mean of vfeedback.algorithms.ddpo.gaussian_kl (GRPO's KL term) times the dimension
    from vfeedback.algorithms.ddpo import gaussian_kl

    torch.manual_seed(0)
    a, b = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    assert oo.step_kl(a, b, 0.3).tolist() == pytest.approx((gaussian_kl(a, b, torch.tensor(0.3)) * 100).tolist(), rel=1e-5)


def test_path_kl_of_a_constant_noise_offset(monkeypatch):
    """A policy whose noise prediction is the base's plus c everywhere: each DDIM step's mean
    moves by c * (sqrt(1 - a' - s^2) - sqrt(a') sqrt(1 - a) / sqrt(a)) (Song et al. 2021, eq. 12),
    so the path KL is sum_k D (that)^2 / (2 s_k^2), whatever the latents."""
    from diffusers import DDIMScheduler

    import vfeedback.sampling as smp

    sch = DDIMScheduler.from_pretrained(ROOT / "vfeedback" / "assets" / "tiny-shapes" / "scheduler")
    c, shape = 0.05, (1, 2, 2)

    def model(offset):
        return SimpleNamespace(scheduler=sch, latent_shape=shape, device=torch.device("cpu"), offset=offset, decode=lambda x: x)

    monkeypatch.setattr(smp, "predict_noise", lambda m, x, t, cond, g: 0.3 * x + m.offset)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    cond = SimpleNamespace(embeds=torch.zeros(2, 1))
    _, kl = oo.path_kl_sample(model(c), model(0.0), cond, cond, num_steps=10, guidance_scale=1.0, generators=gens)
    ac = sch.alphas_cumprod.double().tolist()
    want = 0.0
    for t in range(901, 0, -100):  # 10 "leading" steps with steps_offset 1; the last step's a' is ac[0]
        a, ap = ac[t], ac[max(t - 100, 0)]
        s2 = (1 - ap) / (1 - a) * (1 - a / ap)
        coef = math.sqrt(1 - ap - s2) - math.sqrt(ap) * math.sqrt(1 - a) / math.sqrt(a)
        want += 4 * (coef * c) ** 2 / (2 * s2)
    assert kl.tolist() == pytest.approx([want, want], rel=1e-5)
    _, zero = oo.path_kl_sample(model(0.0), model(0.0), cond, cond, num_steps=10, guidance_scale=1.0, generators=gens)
    assert zero.tolist() == [0.0, 0.0]


# ------------------------------------------------------------------------------ the proxy judges
def test_proxy_judges_load_score_and_are_listed():
    import rewards
    from rewards.shapes import ASSETS, PROXY_MANIFEST, load_judge
    from vfeedback.world.proxy_judges import N_PROXIES, sha256_file

    man = json.loads(PROXY_MANIFEST.read_text())
    assert [e["index"] for e in man["proxies"]] == list(range(N_PROXIES))
    judge = load_judge(ASSETS / "judge.safetensors")
    for e in man["proxies"]:
        p = ASSETS / e["file"]
        assert sha256_file(p) == e["sha256"] and p.stat().st_size == e["bytes"] < 400_000
        net = rewards.load("shapes_judge_proxy", index=e["index"]).net
        # the body is the training judge's, the heads are the proxy's own
        assert all(torch.equal(a, b) for a, b in zip(net.body.state_dict().values(), judge.body.state_dict().values()))
        assert not torch.equal(net.count[0].weight, judge.count[0].weight)
    from vfeedback.world.scenes import make_batch

    x, scenes = make_batch(2, seed=11, kind="attribute")
    r = rewards.load("shapes_judge_proxy", index=0)(x, [s.caption for s in scenes])
    assert r.shape == (2,) and bool(((r >= 0) & (r <= 1)).all())


def test_proxy_judge_refuses_bad_index_and_damaged_file(tmp_path, monkeypatch):
    import rewards
    import rewards.shapes as sh

    with pytest.raises(rewards.RewardError, match=r"index must be one of \[0, 1, 2\], got 7"):
        sh.proxy_weights(7)
    for f in ["proxies.json", "proxy0.safetensors", "judge.safetensors"]:
        shutil.copy(sh.ASSETS / f, tmp_path / f)
    monkeypatch.setattr(sh, "ASSETS", tmp_path)
    monkeypatch.setattr(sh, "PROXY_MANIFEST", tmp_path / "proxies.json")
    assert sh.proxy_weights(0) == tmp_path / "proxy0.safetensors"
    b = bytearray((tmp_path / "proxy0.safetensors").read_bytes())
    b[-1] ^= 1
    (tmp_path / "proxy0.safetensors").write_bytes(bytes(b))
    with pytest.raises(rewards.RewardError, match="proxy0.safetensors has sha256 .* the manifest says"):
        sh.proxy_weights(0)
    (tmp_path / "proxy0.safetensors").unlink()
    with pytest.raises(rewards.RewardError, match="are missing"):
        sh.proxy_weights(0)


# ------------------------------------------------------------------------------ cells, table, figure
def test_cells_budget_and_applicability():
    from vfeedback.config import load_config

    assert oo.applicable("refl", "kl") == "no KL term"
    assert oo.applicable("refl", "par") == "needs a gradient through the reward"
    assert oo.applicable("d3po", "win_rate") == "not offered by the method"
    assert oo.applicable("grpo", "par") is None and oo.applicable("raft", "win_rate") is None
    ov = oo.cell_overrides("grpo", "wco", 160, 4, Path("/tmp/x"))
    cfg = load_config(ROOT / "configs" / "grpo" / "shapes.yaml", ov)
    assert (cfg.train.max_steps, cfg.log.eval_every, cfg.grpo.kl_coef) == (20, 5, 0.0)  # 2 prompts x 4 images a step
    assert cfg.reward.ensemble.mode == "wco" and [r.options["index"] for r in cfg.reward.rewards] == [0, 1, 2]
    assert oo.judged_images(cfg, 5) == 40
    cfg = load_config(ROOT / "configs" / "grpo" / "shapes.yaml", oo.cell_overrides("grpo", "kl", 160, 4, Path("/tmp/x")))
    assert cfg.grpo.kl_coef == oo.KL_COEF and cfg.reward.ensemble is None
    cfg = load_config(ROOT / "configs" / "raft" / "shapes.yaml", oo.cell_overrides("raft", "none", 160, 4, Path("/tmp/x")))
    assert (cfg.train.max_steps, cfg.log.eval_every) == (50, 10)  # 5 rounds of 4 prompts x best of 8
    assert [oo.judged_images(cfg, s) for s in (0, 1, 10, 11, 50)] == [0, 32, 32, 64, 160]
    with pytest.raises(oo.BudgetError, match="--budget 100: grpo judges 8 images per step; use a multiple of 8"):
        oo.cell_overrides("grpo", "none", 100, 4, Path("/tmp/x"))


def _fake_cell(method, guard, gold_end, proxy_end):
    def ev(step, n, gold, proxy, kl):
        return {"step": step, "judged_images": n, "kl": kl, "gold": sum(gold) / len(gold), "proxy0": proxy, "proxy1": proxy,
                "proxy2": proxy, "per_image": {"gold": gold}}

    return {"method": method, "guard": guard, "status": "done",
            "curve": [ev(0, 0, [0.5] * 4, 0.2, 0.0), ev(10, 80, [0.6] * 4, 0.3, 2.0), ev(20, 160, gold_end, proxy_end, 1234.6)]}


def test_summary_table_and_figure(tmp_path):
    res = {"cells": [_fake_cell("grpo", "none", [0.3, 0.4, 0.4, 0.5], 0.4), _fake_cell("grpo", "wco", [0.5, 0.6, 0.6, 0.7], 0.25)]}
    s = oo.summarise(res["cells"][0])
    # gold diffs -0.2, -0.1, -0.1, 0: mean -0.1, sample sd sqrt(0.02 / 3), se = sd / 2
    assert s["gold_delta"] == pytest.approx(-0.1) and s["gold_delta_se"] == pytest.approx(math.sqrt(0.02 / 3) / 2)
    assert s["gold_falls"] and s["gold_from_peak"] == pytest.approx(0.4 - 0.6) and s["proxy0_delta"] == pytest.approx(0.2)
    assert not oo.summarise(res["cells"][1])["gold_falls"]
    t = oo.table(res, methods=("grpo", "refl"), guards=("none", "kl", "wco")).splitlines()
    assert t[2] == "| grpo | +0.200 / -0.100±0.041 **falls** (KL 1235) | not run | +0.050 / +0.100±0.041 (KL 1235) |"
    assert t[3] == "| refl | not run | n/a (no KL term) | not run |"
    oo.figure(res, tmp_path / "f.png")
    from PIL import Image

    with Image.open(tmp_path / "f.png") as im:
        assert im.size == (2 * 3 * 110, int(5.6 * 110))  # two guard columns at 3 in, 110 dpi


def test_bad_flags_exit_2(capsys):
    for args, msg in ((["--methods", "refl,foo"], "--methods: unknown method 'foo'; one of grpo, refl, ddpo, raft, d3po"),
                      (["--guards", "kl2"], "--guards: unknown guard 'kl2'"),
                      (["--methods", "grpo", "--guards", "none", "--budget", "100"], "--budget 100: grpo judges 8 images per step")):
        assert oo.main([*args, "--runs", "/nonexistent/x"]) == 2
        assert msg in capsys.readouterr().err
