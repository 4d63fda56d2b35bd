"""`make mutants`: mutation testing (mutmut 3) of the core math against its fast tests.

Runs ``mutmut run`` on the functions in ``SCOPE`` (mutmut's mutant-name globs; the files to
copy and mutate and the tests to run are ``[tool.mutmut]`` in pyproject.toml), then prints each
survivor and the kill rate. A surviving mutant is either killed by a new assertion or, when
it is truly equivalent, marked ``# pragma: no mutate`` on its line with a one-line reason.
``python tests/mutants.py report`` reprints the summary of the last run without running;
``python tests/mutants.py resume`` reuses mutants/ (mutmut retests only what changed).
Not collected by pytest (no ``test_`` prefix).
"""
from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# "x_f" is a module-level function f, "x?C?m" the method m of class C (mutmut writes "xǁCǁm").
SCOPE = [
    # ZO-RankSGD: the DAG, both estimators, the config's bounds, ask/tell and the line search
    *(f"vfeedback.algorithms.zo_ranksgd.x_{f}__mutmut_*" for f in ("num_edges", "validate_ranking", "dag_edges", "rank_weights", "rank_direction")),
    "vfeedback.algorithms.zo_ranksgd.x?ZORankSGDConfig?*",
    *(f"vfeedback.algorithms.zo_ranksgd.x?ZORankSGD?{m}__mutmut_*" for m in ("ask", "labels", "_open_round", "tell")),
    # reward combinations and transforms
    "rewards.base.x?RunningNorm?*",
    "rewards.base.x?WeightedSum?*",
    "rewards.base.x_combine__mutmut_*",
    "rewards.analytic.*",
    *(f"rewards.shapes.x_{f}__mutmut_*" for f in ("category", "plural", "parse", "_item", "_soft_centres", "spec_terms", "match_prob")),
    "rewards.shapes.x?Spec?caption__mutmut_*",
    "rewards.shapes.x?ShapesJudge?forward__mutmut_*",
    # IterComp: the pairwise loss, its trainer, the head's standardisation, the hinge combination
    *(f"rewards.itercomp_rm.x_{f}__mutmut_*" for f in ("ranking_pairs", "pairwise_ranking_loss", "pair_accuracy", "train_pairwise_head")),
    *(f"rewards.itercomp_rm.x?RewardHead?{m}__mutmut_*" for m in ("fit_features", "raw", "forward")),
    "rewards.itercomp_rm.x?CompositionRewardModel?forward__mutmut_*",
    "vfeedback.itercomp.ranking.x?Group?pairs__mutmut_*",
    "vfeedback.itercomp.ranking.x_tie_levels__mutmut_*",
    "vfeedback.itercomp.ranking.x_rank_by_scores__mutmut_*",
    # simulated judges
    "vfeedback.feedback.oracles.*",
    # integrations: TRL's reward composition, VLM-RM, the wrapper's reward, labeler, Bradley-Terry
    *(f"vfeedback.integrations.trl.x?RewardFunction?{m}__mutmut_*" for m in ("__call__", "_score")),
    "vfeedback.integrations.trl.x?ImageSimilarity?forward__mutmut_*",
    "vfeedback.integrations.gym.x_projection__mutmut_*",
    "vfeedback.integrations.gym.x_vlm_rm_reward__mutmut_*",
    "vfeedback.integrations.gym.x?FrameScorer?*",
    "vfeedback.integrations.gym.x?VLMRewardWrapper?step__mutmut_*",
    "vfeedback.integrations.gym.x?VLMPreferenceLabeler?label__mutmut_*",
    "vfeedback.integrations.gym.x?PreferenceRewardModel?*",  # Bradley-Terry: init, weights, features, forward, fit, accuracy
    # the DDIM sampler: step gap, trained-step count, alphas with the clamp, x0 clip, the step and its log-prob, gradient windows
    *(f"vfeedback.sampling.x_{f}__mutmut_*" for f in ("step_gap", "trained_step_count", "_alpha", "x0_clip", "ddim_std", "ddim_step")),
    "vfeedback.sampling.x?GradWindow?*",
    # ReFL and DRaFT / AlignProp: stop step and K, the losses, re-noising, reward metrics
    *(f"vfeedback.algorithms.refl.x_{f}__mutmut_*" for f in ("draw_stop_step", "refl_loss", "reward_metrics")),
    *(f"vfeedback.algorithms.draft.x_{f}__mutmut_*" for f in ("draw_k", "draw_k_gaussian", "draft_loss", "renoise")),
    # D3PO and Diffusion-DPO: the losses and D3PO's gradient scale
    *(f"vfeedback.algorithms.d3po.x_{f}__mutmut_*" for f in ("d3po_loss", "loss_scale")),
    *(f"vfeedback.algorithms.diffusion_dpo.x_{f}__mutmut_*" for f in ("denoising_error", "diffusion_dpo_loss")),
    # DDPO / GRPO: PPO-clip, the KL, the advantages
    *(f"vfeedback.algorithms.ddpo.x_{f}__mutmut_*" for f in ("ppo_clip_loss", "gaussian_kl", "batch_advantages")),
    "vfeedback.algorithms.ddpo.x?PerPromptStatTracker?*",
    "vfeedback.algorithms.grpo.x_group_advantages__mutmut_*",
    # RAFT: the selection
    *(f"vfeedback.algorithms.raft.x_{f}__mutmut_*" for f in ("_ranked", "_count", "select", "to_uint8")),
    # ensembles, PAR, win rate, the Lagrangian cost
    "rewards.base.x_ensemble_combine__mutmut_*",
    "rewards.base.x?Ensemble?*",
    *(f"vfeedback.reward_shaping.x_{f}__mutmut_*" for f in ("par_shaping", "win_rates", "penalise", "lagrange_step")),
    # HERON: the comparator, margins, pair labels, the weighted-sum baseline, Copeland ranking, the oracle
    *(f"rewards.heron.x_{f}__mutmut_*" for f in ("heron_compare", "factor_margins", "heron_label", "weighted_label", "_group_pairs")),
    "vfeedback.feedback.heron.x_copeland_order__mutmut_*",
    *(f"vfeedback.feedback.heron.x?HeronPreferenceOracle?{m}__mutmut_*" for m in ("compare_values", "current_margins", "label_values", "rank", "rank_groups")),
    # VPL: the ELBO's terms, annealing, latent rescaling and draw, standardisation, the decoder input, contexts, ranked pairs
    *(f"rewards.vpl.x_{f}__mutmut_*" for f in ("kl_standard_normal", "anneal", "elbo_loss", "rescale_latent", "sample_contexts", "_ranked_pairs")),
    *(f"rewards.vpl.x?VPLModel?{m}__mutmut_*" for m in ("standardise", "reward", "sample", "fit_features")),
    # RAPL: cosine cost, entropic OT plan and costs, triplet loss, the reward against the closest demo, the gym wrapper's reward
    *(f"rewards.rapl.x_{f}__mutmut_*" for f in ("cosine_cost", "_check_eps", "sinkhorn_plan", "ot_frame_costs", "ot_distance", "triplet_loss")),
    "rewards.rapl.x?RAPLModel?rewards_from_embeddings__mutmut_*",
    "vfeedback.integrations.gym.x?RAPLReward?step__mutmut_*",
]

KILLED = {"killed", "timeout", "caught by type check", "segfault"}


def _mutmut() -> str:
    exe = Path(sys.executable).with_name("mutmut")
    return str(exe) if exe.exists() else "mutmut"


def results() -> dict[str, str]:
    out = subprocess.run([_mutmut(), "results", "--all", "true"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    res = {}
    for line in out.splitlines():
        m = re.match(r"\s+(\S+): (.+)$", line)
        if m and any(fnmatch.fnmatchcase(m.group(1), g) for g in SCOPE):
            res[m.group(1)] = m.group(2).strip()
    return res


def pragmas() -> int:
    n = 0
    for f in ("vfeedback", "rewards"):
        for p in (ROOT / f).rglob("*.py"):
            n += sum("# pragma: no mutate" in line for line in p.read_text().splitlines())
    return n


def report(wall: float | None = None) -> int:
    res = results()
    if not res:
        print("no mutation results in scope: run `make mutants`", file=sys.stderr)
        return 2
    by: dict[str, list[str]] = {}
    for k, v in sorted(res.items()):
        by.setdefault(v, []).append(k)
    for status in sorted(by):
        if status in KILLED:
            continue
        print(f"{status} ({len(by[status])}):")
        for k in by[status]:
            print(f"    {k}")
    killed = sum(len(v) for s, v in by.items() if s in KILLED)
    total = len(res)
    counts = ", ".join(f"{s} {len(v)}" for s, v in sorted(by.items()))
    print(f"mutants in scope: {total} ({counts}); lines marked '# pragma: no mutate': {pragmas()}")
    msg = f"KILL RATE: {killed}/{total} = {100.0 * killed / total:.1f}%"
    if wall is not None:
        msg += f" (wall {wall / 60:.1f} min, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f})"
    print(msg)
    return 0


USAGE = "usage: python tests/mutants.py [report | resume]   (no argument: a fresh run over SCOPE)"


def main(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    if len(argv) > 1 or (argv and argv[0] not in ("report", "resume")):
        print(f"mutants: unknown argument(s) {' '.join(argv)!r}\n{USAGE}", file=sys.stderr)
        return 2
    if argv[:1] == ["report"]:
        return report()
    if argv[:1] != ["resume"]:
        shutil.rmtree(ROOT / "mutants", ignore_errors=True)  # every run measures from scratch
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)  # the tests must import the mutated copy under mutants/
    t0 = time.monotonic()
    rc = subprocess.run([_mutmut(), "run", "--max-children", str(os.cpu_count() or 2), *SCOPE], cwd=ROOT, env=env).returncode
    wall = time.monotonic() - t0
    if rc != 0:
        print(f"mutmut run failed (exit {rc})", file=sys.stderr)
        return rc
    return report(wall)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
