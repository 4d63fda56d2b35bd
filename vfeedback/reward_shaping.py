"""Reward-side guards that need the batch, the base model or training state: the scalar reward a
sampling method (RAFT, DDPO, GRPO, D3PO's labels) trains on.

Ensembles need only scores and live in ``rewards`` (:class:`rewards.Ensemble`, built into
``trainer.reward`` from ``reward.ensemble``), so every method, ReFL included, gets them. What
lives here needs more than one image's scores, and says so:

* ``reward.shaping: par`` (Preference As Reward; Fu et al. 2025, "Reward Shaping to Mitigate
  Reward Hacking in RLHF"): ``r' = sigmoid(r - r_ref)``, ``r_ref`` the reward of a sample of the
  frozen base model for the same prompt. As in their code (github.com/PorUna-byte/PAR,
  ``trainers/reward_shaper.py`` ``calculate_relative_sigmoid`` over ``sftref_rewards``: rewards of
  SFT-model responses stored per prompt, shared by every response to it), the reference is
  drawn independently of the policy's sample and shared by all samples of the prompt; one
  reference (their M = 1, which they find enough). The method passes ``reference``, a callable
  giving one base-model image per row, the same image for the rows of one prompt draw. (Rendering
  the base from the *same* seed as each sample, as this module first did, makes every image equal
  its reference while the LoRA is still zero: r' = 1/2 everywhere, group advantages 0, and DDPO /
  GRPO never leave the base.)
* ``reward.shaping: win_rate`` (Swamy et al. 2024, "A Minimaximalist Approach to RLHF", SPO):
  a sample's reward is the fraction of the *other* samples of its group that it beats under a
  comparator, a tie counting 1/2: ``r'_i = (1 / (n_g - 1)) sum_{j in g, j != i} P(i beats j)``.
  The comparator is the scalar reward (``judge: reward``, the ``RewardPreferenceOracle`` rule of
  vfeedback/feedback/oracles.py with ``tie_tol``) or Pareto dominance over the reward's members
  (``judge: pareto``, the ``ParetoPreferenceOracle``) or HERON's ranked factors with margins
  (``judge: heron``, the ``heron`` section; vfeedback/feedback/heron.py: each factor is scored on
  the global batch and a ``std`` margin scale uses the batch's spread). A sample alone in its group
  gets 1/2 (our choice: no opponent, no information).
* ``cost`` (Safe RLHF-V's Lagrangian form, Ji et al. 2025, after Safe RLHF, Dai et al. 2023):
  the objective ``r' - lambda * (c - d)`` with ``c`` a cost scorer's value, ``d`` the budget and
  ``lambda >= 0`` the multiplier. After each batch, projected dual ascent on the batch's mean
  cost: ``lambda <- max(0, lambda + lr_lambda * (mean(c) - d))``. (Safe RLHF steps ``log
  lambda`` instead; the projected step is our choice: it can return to exactly 0 once the
  constraint holds.) The penalty uses the multiplier before the update.

Order: ensemble (inside the reward) -> shaping -> cost penalty. Everything is computed on the
GLOBAL batch: each process's scores (and costs, reference scores, group ids) are gathered,
shaped and penalised identically on every process, and each process takes back its slice, so
the result does not depend on the number of processes, and the multiplier stays identical
everywhere. A NaN score (a scorer that could not score an image) stays NaN for that sample
(win rate: it loses to every number); a NaN cost makes the sample's reward NaN and is left out
of the multiplier's update.

Which method supports what is declared on the method class: ``reward_shaping`` (a tuple of the
shaping values it can feed: ``("par", "win_rate")`` for a method that samples groups and can
render the base model's images) and ``supports_cost`` (bool). :func:`check_config` refuses the
rest before anything is built.
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Optional, Sequence

import torch

from .errors import UserError

log = logging.getLogger(__name__)

__all__ = ["ScalarReward", "check_config", "par_shaping", "win_rates", "lagrange_step", "penalise"]


# ------------------------------------------------------------------------------ pure pieces
def par_shaping(r: torch.Tensor, r_ref: torch.Tensor) -> torch.Tensor:
    """PAR (Fu et al. 2025): ``sigmoid(r - r_ref)`` elementwise, in (0, 1); NaN stays NaN."""
    return torch.sigmoid(r - r_ref)


def win_rates(scores: torch.Tensor, groups: torch.Tensor, compare: Callable[[int, int], Optional[int]]) -> torch.Tensor:
    """Each sample's win rate against the other members of its group.

    ``scores``: (n,) or (n, k) (only passed through to ``compare``); ``groups``: (n,) group ids;
    ``compare(i, j)``: 0 when i is better, 1 when j is, None for a tie (the preference-oracle
    contract). Returns (n,) float64 in [0, 1]: ``(wins + ties / 2) / (n_g - 1)``; 0.5 for a
    sample alone in its group.
    """
    n = len(groups)
    g = groups.tolist()
    out = torch.full((n,), 0.5, dtype=torch.float64)
    members: dict[int, list[int]] = {}
    for i, gi in enumerate(g):
        members.setdefault(gi, []).append(i)
    for idx in members.values():
        if len(idx) < 2:
            continue
        won = {i: 0.0 for i in idx}
        for a in range(len(idx)):
            for b in range(a + 1, len(idx)):
                i, j = idx[a], idx[b]
                c = compare(i, j)
                if c == 0:
                    won[i] += 1.0
                elif c == 1:
                    won[j] += 1.0
                else:
                    won[i] += 0.5
                    won[j] += 0.5
        for i in idx:
            out[i] = won[i] / (len(idx) - 1)
    return out


def penalise(r: torch.Tensor, cost: torch.Tensor, lam: float, budget: float) -> torch.Tensor:
    """The Lagrangian objective per sample: ``r - lam * (cost - budget)``."""
    return r - lam * (cost - budget)


def lagrange_step(lam: float, mean_cost: float, budget: float, lr: float) -> float:
    """Projected dual ascent: ``max(0, lam + lr * (mean_cost - budget))``; unchanged when the
    batch had no finite cost (``mean_cost`` NaN)."""
    if not math.isfinite(mean_cost):
        return lam
    return max(0.0, lam + lr * (mean_cost - budget))


# ------------------------------------------------------------------------------ config checks
def check_config(cfg, method) -> None:
    """Refuse a shaping or a cost the method cannot feed (a :class:`UserError` naming the field).
    ``method``: the method class of ``cfg.algorithm``."""
    shaping = cfg.reward.shaping
    supported = tuple(getattr(method, "reward_shaping", ()))
    if shaping != "none" and shaping not in supported:
        why = {
            "par": "it needs a frozen-base-model image rendered for each prompt while it samples, which this method does not do",
            "win_rate": "it needs groups of samples of one prompt scored without gradient",
        }[shaping]
        grad = " (and it backpropagates through the reward: a shaped reward has no gradient)" if getattr(method, "needs_differentiable_reward", False) else ""
        ok = ", ".join(sorted(_methods_supporting(shaping))) or "none"
        raise UserError(f"reward.shaping: {shaping} is not supported by algorithm {cfg.algorithm}: {why}{grad}. "
                        f"Use reward.shaping: none, or an algorithm that supports it ({ok})")
    if cfg.cost is not None and not getattr(method, "supports_cost", False):
        raise UserError(f"cost: algorithm {cfg.algorithm} does not take a cost constraint; remove the cost section "
                        f"(algorithms that do: {', '.join(sorted(_methods_supporting('cost'))) or 'none'})")
    if shaping == "win_rate" and cfg.reward.win_rate.judge == "heron":
        from .feedback.heron import check_heron_factors

        check_heron_factors(cfg, "reward.win_rate.judge")
    if shaping == "win_rate" and cfg.reward.win_rate.judge == "pareto" and len(cfg.reward.rewards) < 2:
        raise UserError("reward.win_rate.judge: pareto compares samples on several objectives; list at least two rewards under "
                        "reward.rewards (or use judge: reward)")


def _methods_supporting(what: str) -> list[str]:
    from .algorithms import METHODS, get_method

    out = []
    for name in METHODS:
        try:
            m = get_method(name)
        except Exception:  # a method whose optional dependency is missing cannot be asked
            continue
        if (what == "cost" and getattr(m, "supports_cost", False)) or what in tuple(getattr(m, "reward_shaping", ())):
            out.append(name)
    return out


# ------------------------------------------------------------------------------ the scalar reward
class ScalarReward:
    """The reward a sampling method trains on: ``trainer.reward`` (weighted sum or ensemble), then
    ``reward.shaping``, then the ``cost`` penalty, over the global batch (module docstring).

    ``reward``: the run's reward module; ``accelerator``: accelerate's (None: one process, tests);
    ``cost``: the cost scorer (default: built from ``cfg.cost``).
    """

    def __init__(self, cfg, reward: torch.nn.Module, accelerator=None, cost: Optional[torch.nn.Module] = None):
        self.cfg = cfg
        self.reward = reward
        self.acc = accelerator
        self.shaping = cfg.reward.shaping
        self.needs_reference = self.shaping == "par"
        self.cost_cfg = cfg.cost
        self.cost = None
        if self.cost_cfg is not None:
            if cost is None:
                import rewards

                try:
                    cost = rewards.load(self.cost_cfg.name, **self.cost_cfg.options)
                except rewards.RewardError as e:
                    raise UserError(f"cost: {e}") from None
            self.cost = cost
            if accelerator is not None:
                self.cost.to(accelerator.device)
            self.cost.requires_grad_(False)
            self.cost.eval()
        self.heron = None
        if self.shaping == "win_rate" and cfg.reward.win_rate.judge == "heron":
            from .feedback.heron import build_heron_oracle

            self.heron = build_heron_oracle(cfg, "reward.win_rate.judge", device=None if accelerator is None else accelerator.device)
        self.lam = float(self.cost_cfg.lambda_init) if self.cost_cfg is not None else 0.0
        self.updates = 0

    # ---- state (the Lagrange multiplier), kept in checkpoints by the engine
    def state_dict(self) -> dict:
        return {"lambda": self.lam, "updates": self.updates}

    def load_state_dict(self, d: dict) -> None:
        self.lam = float(d["lambda"])
        self.updates = int(d.get("updates", 0))

    # ---- gathering over processes
    @property
    def _n(self) -> int:
        return 1 if self.acc is None else self.acc.num_processes

    def _gather(self, t: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Concatenate every process's rows of ``t`` (B_p, ...) in process order (processes may
        hold different B_p); returns (global rows as float64 on CPU, this process's offset)."""
        t = t.detach().double()
        if self._n == 1:
            return t.cpu(), 0
        dev = self.acc.device
        sizes = self.acc.gather(torch.tensor([t.shape[0]], device=dev)).tolist()
        pad = max(sizes) - t.shape[0]
        x = t.to(dev)
        if pad:
            x = torch.cat([x, x.new_full((pad, *x.shape[1:]), float("nan"))])
        allx = self.acc.gather(x.contiguous()).reshape(self._n, max(sizes), *t.shape[1:]).cpu()
        rows = torch.cat([allx[p, : sizes[p]] for p in range(self._n)])
        return rows, sum(sizes[: self.acc.process_index])

    # ---- the call
    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str], *, groups: Optional[torch.Tensor] = None,
                 reference: Optional[Callable[[], torch.Tensor]] = None) -> tuple[torch.Tensor, dict]:
        """Final scalar rewards of this process's ``images`` (B, 3, H, W) in [0, 1] and metrics.

        ``groups``: LongTensor (B,) of group ids local to this process (samples of one group share
        a prompt; None: every image its own group); ``reference``: zero-argument callable giving
        one frozen-base-model image per row, the same image for the rows of one prompt draw (PAR's
        reference, module docstring; called only when
        :attr:`needs_reference`). Returns (Tensor (B,) float32 on ``images.device``, no grad;
        dict of floats, identical on every process).
        """
        B = images.shape[0]
        r_local = self.reward(images, list(prompts)).float()
        R, off = self._gather(r_local)
        mets = {"reward_raw_mean": _finite_mean(R)}
        if groups is None:
            groups = torch.arange(B)
        groups = torch.as_tensor(groups).long().cpu()
        # group ids are local to a process: make them global (process p's ids shifted past p-1's)
        G, _ = self._gather(groups.double())
        sizes = self._sizes(B)
        gid = torch.empty(len(G), dtype=torch.long)
        base = 0
        for p, (s0, n) in enumerate(sizes):
            part = G[s0 : s0 + n].long()
            gid[s0 : s0 + n] = part + base
            base += int(part.max()) + 1 if n else 0
        shaped = R
        if self.shaping == "par":
            if reference is None:
                raise RuntimeError("reward.shaping par: the method gave no reference images (a bug in the method)")
            upd = getattr(self.reward, "update_stats", None)
            if upd is not None:  # the base model's images must not move a running normalisation
                self.reward.update_stats = False
            try:
                ref_images = reference()
                r_ref_local = self.reward(ref_images, list(prompts)).float()
            finally:
                if upd is not None:
                    self.reward.update_stats = upd
            Rref, _ = self._gather(r_ref_local)
            shaped = par_shaping(R, Rref)
            mets["reward_ref_mean"] = _finite_mean(Rref)
        elif self.shaping == "win_rate":
            shaped = self._win_rates(R, gid, images, prompts)
        if self.shaping != "none":
            mets["reward_shaped_mean"] = _finite_mean(shaped)
        final = shaped
        if self.cost is not None:
            c_local = self.cost(images, list(prompts)).float()
            C, _ = self._gather(c_local)
            cc = self.cost_cfg
            lam = self.lam
            final = penalise(shaped, C, lam, cc.budget)
            mean_c = _finite_mean(C)
            self.lam = lagrange_step(lam, mean_c, cc.budget, cc.lr_lambda)
            self.updates += 1
            mets.update({"cost_mean": mean_c, "lambda": lam, "lambda_next": self.lam,
                         "cost_violation": mean_c - cc.budget if math.isfinite(mean_c) else float("nan")})
        mets["reward_final_mean"] = _finite_mean(final)
        out = final[off : off + B].to(torch.float32).to(images.device)
        return out, mets

    def _sizes(self, B: int) -> list[tuple[int, int]]:
        if self._n == 1:
            return [(0, B)]
        sizes = self.acc.gather(torch.tensor([B], device=self.acc.device)).tolist()
        starts = [sum(sizes[:p]) for p in range(len(sizes))]
        return list(zip(starts, sizes))

    def _win_rates(self, R: torch.Tensor, gid: torch.Tensor, images: Optional[torch.Tensor] = None,
                   prompts: Optional[Sequence[str]] = None) -> torch.Tensor:
        from .feedback.oracles import ParetoPreferenceOracle, _compare_scalar

        wr = self.cfg.reward.win_rate
        if wr.judge == "heron":
            # every factor on this process's images, gathered: the global batch, labelled at once
            V, _ = self._gather(self.heron.factor_values(images, list(prompts)).float())
            _, cmp = self.heron.label_values(V)
            return win_rates(V, gid, cmp)
        if wr.judge == "pareto":
            comps = getattr(self.reward, "last_components", None) or {}
            if len(comps) < 2:
                raise UserError("reward.win_rate.judge: pareto needs a reward with several members (reward.rewards)")
            local = torch.stack([v.float() for v in comps.values()], dim=1)
            K, _ = self._gather(local)
            oracle = ParetoPreferenceOracle(lambda x: x, tol=wr.tie_tol)
            return win_rates(K, gid, lambda i, j: oracle.compare(K[i], K[j]))
        vals = R.tolist()
        return win_rates(R, gid, lambda i, j: _compare_scalar(vals[i], vals[j], wr.tie_tol))


def _finite_mean(t: torch.Tensor) -> float:
    f = t[torch.isfinite(t)]
    return float(f.mean()) if f.numel() else float("nan")
