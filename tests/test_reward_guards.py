"""Reward guards: ensembles (Coste et al. 2023), PAR shaping (Fu et al. 2025), self-play win rate
(Swamy et al. 2024), the Lagrangian cost constraint (Safe RLHF-V), on hand-computed cases, and
the config checks that refuse what a method cannot feed."""
import math
from pathlib import Path

import pytest
import torch

import rewards
from rewards.base import Ensemble, Reward, ensemble_combine
from vfeedback.config import RunConfig
from vfeedback.reward_shaping import ScalarReward, lagrange_step, par_shaping, penalise, win_rates

ROOT = Path(__file__).resolve().parent.parent


class Table(Reward):
    """Scores image i by ``values[i]`` (a fixed column), or ``scale * mean pixel`` (differentiable)."""

    def __init__(self, values=None, scale=None, name="t"):
        super().__init__()
        self.values, self.scale, self.name = values, scale, name

    def forward(self, images, prompts=None, **context):
        if self.scale is not None:
            return self.scale * images.float().mean(dim=(1, 2, 3))
        return torch.tensor(self.values[: images.shape[0]], dtype=torch.float32)


# ----------------------------------------------------------------------------- ensembles
def test_ensemble_modes_by_hand():
    r = torch.tensor([[1.0, 3.0, 2.0], [float("nan"), 2.0, 4.0], [float("nan")] * 3])
    # mean: (1+3+2)/3 = 2; (2+4)/2 = 3 (NaN member left out)
    assert ensemble_combine(r, "mean").tolist()[:2] == pytest.approx([2.0, 3.0], abs=1e-6)
    # worst case: the smallest member
    assert ensemble_combine(r, "wco").tolist()[:2] == pytest.approx([1.0, 2.0], abs=1e-6)
    # UWO, lambda 0.5, population variance (divisor k): row 0 var = (1 + 1 + 0)/3 = 2/3 -> 2 - 1/3;
    # row 1 var = (1 + 1)/2 = 1 -> 3 - 0.5. (The sample variance would give 1.5 and 2.0.)
    assert ensemble_combine(r, "uwo", 0.5).tolist()[:2] == pytest.approx([5 / 3, 2.5], abs=1e-6)
    assert ensemble_combine(r, "uwo", 2.0).tolist()[0] == pytest.approx(2 - 4 / 3, abs=1e-6)
    for mode in ("mean", "wco", "uwo"):
        assert math.isnan(ensemble_combine(r, mode)[2])


def test_ensemble_module_is_differentiable_and_wco_grad_goes_to_min():
    x = torch.full((1, 3, 4, 4), 0.5, requires_grad=True)
    ens = Ensemble([Table(scale=1.0, name="a"), Table(scale=3.0, name="b")], mode="wco")
    assert ens.differentiable
    out = ens(x)
    assert out.item() == pytest.approx(0.5)
    out.sum().backward()
    # min is member a (1 * mean): d mean / d pixel = 1/48
    assert torch.allclose(x.grad, torch.full_like(x, 1 / 48))
    x.grad = None
    ens_u = Ensemble([Table(scale=1.0, name="a"), Table(scale=3.0, name="b")], mode="uwo", uwo_lambda=1.0)
    # m = 2 * mean(x), var = (mean(x))^2 -> value 1 - 0.25 = 0.75; d/dmean = 2 - 2*0.5 = 1
    y = ens_u(x)
    assert y.item() == pytest.approx(0.75)
    y.sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, 1 / 48))


def test_combine_builds_ensembles_and_refuses_weights():
    e = rewards.combine([{"name": "color"}, {"name": "brightness"}], ensemble="wco")
    assert isinstance(e, Ensemble) and e.mode == "wco" and e.name == "wco(color,brightness)"
    with pytest.raises(rewards.RewardError, match="weight"):
        rewards.combine([{"name": "color", "weight": 2.0}, {"name": "brightness"}], ensemble="mean")
    with pytest.raises(rewards.RewardError, match="mode"):
        Ensemble([Table([1.0]), Table([2.0])], mode="median")


# ----------------------------------------------------------------------------- shaping
def test_par_by_hand():
    r = torch.tensor([0.0, 1.0, math.log(3.0), 2.0], dtype=torch.float64)
    ref = torch.tensor([0.0, 0.0, 0.0, 3.0], dtype=torch.float64)
    out = par_shaping(r, ref).tolist()
    assert out == pytest.approx([0.5, 1 / (1 + math.exp(-1)), 0.75, 1 / (1 + math.e)], abs=1e-12)


def test_win_rate_by_hand():
    from vfeedback.feedback.oracles import _compare_scalar

    s = [3.0, 1.0, 3.0, 2.0, 5.0, float("nan"), 0.0]
    g = torch.tensor([0, 0, 0, 0, 1, 2, 2])
    cmp = lambda tol: (lambda i, j: _compare_scalar(s[i], s[j], tol))
    out = win_rates(torch.tensor(s), g, cmp(0.0)).tolist()
    # group 0: item 0 beats 1 and 3, ties 2 -> 2.5/3; item 1 beats none; item 3 beats 1 -> 1/3
    # group 1: alone -> 1/2; group 2: NaN loses to 0.0
    assert out == pytest.approx([2.5 / 3, 0.0, 2.5 / 3, 1 / 3, 0.5, 0.0, 1.0], abs=1e-12)
    # with tie_tol 1: 3 vs 2 and 2 vs 1 are ties; 3 vs 1 is not
    out = win_rates(torch.tensor(s), g, cmp(1.0)).tolist()
    assert out[:4] == pytest.approx([(1 + 0.5 + 0.5) / 3, 0.5 / 3, 2 / 3, (0.5 + 0.5 + 0.5) / 3], abs=1e-12)


def _cfg(**over):
    base = dict(algorithm="d3po", output_dir="/tmp/unused", model={"family": "sd15", "path": "tiny:sd15"},
                prompts={"train": ["a"]}, reward={"rewards": [{"name": "color"}]})
    base.update(over)
    return RunConfig.model_validate(base)


def test_scalar_reward_win_rate_pareto():
    # two members; item 0 = (2, 2) dominates item 1 = (1, 1); item 2 = (3, 0) trades off with both
    ws = rewards.WeightedSum([Table([2.0, 1.0, 3.0], name="a"), Table([2.0, 1.0, 0.0], name="b")], [1.0, 1.0])
    cfg = _cfg(reward={"rewards": [{"name": "color"}, {"name": "brightness"}], "shaping": "win_rate", "win_rate": {"judge": "pareto"}})
    sr = ScalarReward(cfg, ws, None)
    out, mets = sr(torch.zeros(3, 3, 4, 4), ["p"] * 3, groups=torch.tensor([0, 0, 0]))
    assert out.tolist() == pytest.approx([(1 + 0.5) / 2, (0 + 0.5) / 2, (0.5 + 0.5) / 2])
    assert mets["reward_raw_mean"] == pytest.approx((4 + 2 + 3) / 3)


def test_scalar_reward_par_uses_reference_and_freezes_running_stats():
    ws = rewards.WeightedSum([Table([1.0, 2.0], name="a")], [1.0])
    ws.update_stats = True
    cfg = _cfg(reward={"rewards": [{"name": "color"}], "shaping": "par"})
    sr = ScalarReward(cfg, ws, None)
    assert sr.needs_reference
    seen = []

    def ref():
        seen.append(ws.update_stats)
        return torch.zeros(2, 3, 4, 4)

    # Table returns [1, 2] for any images: r = r_ref -> sigmoid(0) = 1/2 for both
    out, mets = sr(torch.zeros(2, 3, 4, 4), ["p", "q"], reference=ref)
    assert out.tolist() == [0.5, 0.5] and seen == [False] and ws.update_stats is True
    assert mets["reward_ref_mean"] == pytest.approx(1.5)


# ----------------------------------------------------------------------------- the cost constraint
def test_lagrange_update_by_hand():
    assert lagrange_step(0.5, 0.4, 0.2, 0.1) == pytest.approx(0.52, abs=1e-15)
    assert lagrange_step(0.01, 0.0, 0.2, 0.1) == 0.0  # projected onto lambda >= 0
    assert lagrange_step(0.3, float("nan"), 0.2, 0.1) == 0.3  # no finite cost: unchanged
    r, c = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.1])
    assert penalise(r, c, 0.5, 0.2).tolist() == pytest.approx([1 - 0.5 * 0.3, 2 + 0.5 * 0.1])


def test_scalar_reward_cost_penalty_and_state():
    cfg = _cfg(reward={"rewards": [{"name": "color"}]}, cost={"name": "brightness", "budget": 0.2, "lr_lambda": 0.1, "lambda_init": 0.5})
    sr = ScalarReward(cfg, Table([1.0, 2.0], name="r"), None, cost=Table([0.5, 0.3], name="c"))
    out, mets = sr(torch.zeros(2, 3, 4, 4), ["p", "q"])
    # uses lambda before the update: r - 0.5 (c - 0.2)
    assert out.tolist() == pytest.approx([1 - 0.5 * 0.3, 2 - 0.5 * 0.1], abs=1e-6)
    assert mets["lambda"] == 0.5 and mets["cost_mean"] == pytest.approx(0.4)
    # the costs arrive as float32 (0.3 is stored to ~1e-8): lr * that error bounds the difference
    assert sr.lam == pytest.approx(0.5 + 0.1 * (0.4 - 0.2), abs=1e-8) and sr.lam == mets["lambda_next"]
    st = sr.state_dict()
    other = ScalarReward(cfg, Table([1.0, 2.0]), None, cost=Table([0.5, 0.3]))
    assert other.lam == 0.5
    import json

    other.load_state_dict(json.loads(json.dumps(st)))  # the engine's JSON round trip is exact
    assert other.lam == sr.lam and other.updates == 1


# ----------------------------------------------------------------------------- config checks (exit 2, field named)
def _validate(tmp_path, capsys, extra: str):
    from vfeedback.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"output_dir: {tmp_path / 'run'}\nmodel: {{family: sd15, path: tiny:sd15}}\nprompts: {{train: [a]}}\n" + extra)
    rc = main(["validate", str(cfg)])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("extra, field", [
    ("algorithm: refl\nreward: {rewards: [{name: color}, {name: brightness}], ensemble: {mode: median}}\n", "reward.ensemble.mode"),
    ("algorithm: refl\nreward: {rewards: [{name: color}], shaping: par}\n", "reward.shaping: par is not supported by algorithm refl"),
    ("algorithm: d3po\nreward: {rewards: [{name: color}], shaping: win_rate}\n", "reward.shaping: win_rate is not supported by algorithm d3po"),
    ("algorithm: d3po\nreward: color\ncost: {name: brightness, budget: -0.1}\n", "cost.budget"),
    ("algorithm: d3po\nreward: color\ncost: {name: brightness, budget: 0.1, lr_lambda: -1}\n", "cost.lr_lambda"),
    ("algorithm: d3po\nreward: color\ncost: {name: brightness, budget: .nan}\n", "cost.budget"),
    ("algorithm: refl\nreward: color\ncost: {name: brightness, budget: 0.1}\n", "cost: algorithm refl does not take a cost"),
    ("algorithm: d3po\nreward: color\nd3po: {mode: offline}\ncost: {name: brightness, budget: 0.1}\n", "cost: d3po takes a cost constraint"),
    ("algorithm: d3po\nreward: color\ncost: {name: nosuch, budget: 0.1}\n", "cost: unknown reward 'nosuch'"),
])
def test_bad_guard_configs_exit_2(tmp_path, capsys, extra, field):
    rc, err = _validate(tmp_path, capsys, extra)
    assert rc == 2, err
    assert field in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_help_config_documents_guards():
    from vfeedback.config import describe_fields

    text = "\n".join(describe_fields())
    for f in ("reward.ensemble.mode", "reward.ensemble.uwo_lambda", "reward.shaping", "reward.win_rate.judge", "cost.budget", "cost.lr_lambda"):
        assert f in text
