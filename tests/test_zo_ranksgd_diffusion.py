"""ZO-RankSGD on tiny:sd15 through `vfeedback train`: latent refinement, resume, LoRA, prompt embedding,
and the ask/tell session an app drives."""
import json
from pathlib import Path

import pytest
import torch

from vfeedback.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "zo_ranksgd" / "tiny.yaml")
FAST = ["sampling.steps=4", "zo_ranksgd.num_candidates=6"]


def _train(out, *overrides, resume=False):
    argv = ["train", TINY, f"output_dir={out}", *FAST, *overrides] + (["--resume"] if resume else [])
    assert main(argv) == 0


def _metrics(out):
    return [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _final_x(out, rounds):
    from vfeedback.algorithms.zo_ranksgd import ZORankSGD

    return ZORankSGD.load(Path(out) / "checkpoints" / f"step-{rounds:06d}" / "optimizer").x


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("zo") / "full"
    _train(out, "zo_ranksgd.rounds=4")
    return out


def test_tiny_latent_refinement_improves_the_reward_and_writes_the_run_folder(full_run):
    out = full_run
    s = json.loads((out / "summary.json").read_text())
    assert s["algorithm"] == "zo_ranksgd" and s["target"] == "latent" and s["rounds"] == s["steps"] == 4
    assert s["eval_reward_after"] > s["eval_reward_before"]  # the oracle's reward, start image vs refined
    assert s["queries"] == 4 * 6 and s["wall_time_s"] > 0
    m = _metrics(out)
    assert [r["round"] for r in m] == [1, 2, 3, 4]
    assert [r["mode"] for r in m] == ["gradient", "line_search", "gradient", "line_search"]
    assert all({"reward_best", "reward_current", "queries"} <= set(r) for r in m)
    assert m[-1]["reward_current"] == pytest.approx(s["eval_reward_after"], rel=1e-5)
    assert (out / "config.yaml").exists()
    for f in ["before_after.png", "progress.png", "round-000001.png", "round-000004.png", "current-000000.png", "reward_curve.png"]:
        assert (out / "samples" / f).exists(), f
    ck = out / "checkpoints" / "step-000004"
    assert (ck / "COMPLETE").exists() and (ck / "optimizer" / "state.json").exists()
    x = _final_x(out, 4)
    assert x.norm().item() == pytest.approx((x.numel()) ** 0.5, rel=1e-4)  # latent_norm: shell
    assert not (out / "lora").exists()


def test_resume_follows_the_uninterrupted_path(full_run, tmp_path):
    out = tmp_path / "resumed"
    _train(out, "zo_ranksgd.rounds=2")  # stop after 2 rounds
    assert json.loads((out / "summary.json").read_text())["rounds"] == 2
    _train(out, "zo_ranksgd.rounds=4", resume=True)  # continue to 4
    assert torch.equal(_final_x(out, 4), _final_x(full_run, 4))
    a, b = _metrics(out), _metrics(full_run)
    assert [r["round"] for r in a] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert (ra["mode"], ra["event"], ra.get("pick")) == (rb["mode"], rb["event"], rb.get("pick"))
        assert ra["reward_current"] == pytest.approx(rb["reward_current"], abs=1e-6)
    s = json.loads((out / "summary.json").read_text())
    assert s["eval_reward_after"] == pytest.approx(json.loads((full_run / "summary.json").read_text())["eval_reward_after"], abs=1e-6)
    # a field that changes the path cannot change on resume
    assert main(["train", TINY, f"output_dir={out}", *FAST, "zo_ranksgd.rounds=5", "zo_ranksgd.smoothing=0.3", "--resume"]) == 2


def test_lora_target_changes_the_lora_and_saves_it_for_diffusers(tmp_path):
    from safetensors.torch import load_file

    from vfeedback.models import load_model
    from vfeedback.sampling import sample

    out = tmp_path / "lora"
    _train(out, "zo_ranksgd.target=lora", "zo_ranksgd.rounds=2", "zo_ranksgd.line_search=false", "zo_ranksgd.num_candidates=3",
           "zo_ranksgd.smoothing=0.05", "zo_ranksgd.step_size=0.05", "prompts.eval=[a red apple]", "prompts.eval_seeds=[0]",
           "model.lora.rank=2", "eval_rewards=[{name: brightness}]")
    s = json.loads((out / "summary.json").read_text())
    assert s["target"] == "lora" and s["lora"]
    # evaluation-only scorers are reported on the start and final images
    b0, b1 = s["eval_brightness_before"], s["eval_brightness_after"]
    assert 0 <= b0 <= 1 and 0 <= b1 <= 1 and b0 != b1
    sd = load_file(str(out / "lora" / "pytorch_lora_weights.safetensors"))
    ups = [v for k, v in sd.items() if ".lora_B." in k]
    assert ups and max(float(v.abs().max()) for v in ups) > 0  # B starts at zero: ZO-RankSGD moved it
    x = _final_x(out, 2)
    assert sum(float((v.double() ** 2).sum()) for v in sd.values()) == pytest.approx(float((x.double() ** 2).sum()), rel=1e-5)

    def render(m):
        cond = m.encode_prompt(["a red apple"], cfg=True)
        with torch.no_grad():
            return sample(m, cond, num_steps=4, guidance_scale=5.0, generator=torch.Generator().manual_seed(0)).images

    m = load_model("sd15", "tiny:sd15", resolution=64)
    base = render(m)
    m.pipe.load_lora_weights(str(out / "lora"))  # diffusers' own loader
    assert (render(m) - base).abs().max() > 1e-4


def test_prompt_embedding_target_smoke(tmp_path):
    out = tmp_path / "emb"
    _train(out, "zo_ranksgd.target=prompt_embedding", "zo_ranksgd.rounds=2", "zo_ranksgd.line_search=false",
           "zo_ranksgd.num_candidates=3", "prompts.eval_seeds=[0]")
    s = json.loads((out / "summary.json").read_text())
    assert s["target"] == "prompt_embedding" and s["rounds"] == 2
    from vfeedback.algorithms.zo_ranksgd import ZORankSGD

    opt = ZORankSGD.load(out / "checkpoints" / "step-000002" / "optimizer")
    assert opt.shape == (77, 32)  # tiny text encoder: 77 tokens x 32
    assert [h["event"] for h in opt.history] == ["step", "step"]


def test_session_ask_tell_for_an_app(tmp_path, tiny_sd15):
    """What a Gradio app does: show candidates, take a person's ranking, save mid-round, restore."""
    from vfeedback.algorithms.zo_ranksgd_diffusion import RankingSession
    from vfeedback.config import load_config

    cfg = load_config(TINY, ["sampling.steps=2", "zo_ranksgd.num_candidates=4", f"output_dir={tmp_path}/x"])
    s = RankingSession.from_config(cfg, model=tiny_sd15)
    c = s.ask()
    assert c.images.shape == (4, 1, 3, 64, 64) and c.tiles.shape == (4, 3, 64, 64) and c.mode == "gradient"
    assert torch.equal(s.ask().images, c.images)  # idempotent until tell
    s.tell([2, 0])  # a person's top-2
    c2 = s.ask()
    assert c2.mode == "line_search" and "current" in c2.labels
    s.save(tmp_path / "sess")  # mid-round
    r = RankingSession.restore(cfg, tmp_path / "sess", model=tiny_sd15)
    assert r.round == 1 and r.ask().labels == c2.labels and torch.allclose(r.ask().images, c2.images)
    pick = [c2.labels.index("step eta*2^-0")]
    assert r.tell(pick)["event"] == "moved" and s.tell(pick)["event"] == "moved"
    assert torch.equal(r.current(), s.current())
    assert r.current_images().shape == (1, 3, 64, 64)


def test_reward_oracle_ranks_candidates_by_mean_image_score_and_skips_full_ties():
    from vfeedback.algorithms.zo_ranksgd_diffusion import Candidates, rank_candidates
    from vfeedback.feedback.oracles import RewardRankingOracle

    # 3 candidates x 2 images; reward = mean brightness
    levels = torch.tensor([[0.2, 0.4], [0.9, 0.7], [0.1, float("nan")]])
    imgs = levels[:, :, None, None, None].expand(3, 2, 3, 4, 4).clone()
    c = Candidates(imgs, ["a", "b", "c"], 0, "gradient", ["p", "p"])
    bright = lambda x, prompts=None: x.mean(dim=(1, 2, 3))
    ranking, scores = rank_candidates(RewardRankingOracle(bright), c)
    assert ranking == [1, 0, 2] and scores[0] == pytest.approx(0.3)  # NaN images are skipped in the mean
    assert rank_candidates(RewardRankingOracle(bright, top_k=1), c)[0] == [1]
    flat = Candidates(torch.full((3, 1, 3, 4, 4), 0.5), ["a", "b", "c"], 0, "gradient", ["p"])
    assert rank_candidates(RewardRankingOracle(bright), flat)[0] == []
    assert rank_candidates(lambda tiles: [2, 1, 0], flat)[0] == [2, 1, 0]  # a person gets the tiles
