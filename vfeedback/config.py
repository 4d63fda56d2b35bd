"""The run configuration: one YAML file, validated by a typed schema before any weight loads.

Every field has a description (``vfeedback validate --help-config`` prints them); unknown keys
are errors; all errors are reported at once with their field path. ``key=value`` overrides from
the command line are applied before validation.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import UserError


# a seed every generator takes: accelerate's set_seed hands it to numpy, whose range is [0, 2**32)
SEED_MAX = 2**32 - 1
Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]
NonEmptyStr = Annotated[str, Field(min_length=1)]
# a config is a few KB; a bigger file is a mistake (or /dev/zero), and is refused before parsing
MAX_CONFIG_BYTES = 1 << 20
# YAML nodes after alias expansion: refuses an alias bomb before it is built (shipped configs: < 1000)
MAX_YAML_NODES = 100_000
MAX_PROMPT_FILE_BYTES = 64 << 20


class Section(BaseModel):
    # allow_inf_nan=False: nan / inf / -inf are refused in every float field of every section
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class LoraConfig(Section):
    rank: int = Field(4, ge=1, le=1024, description="LoRA rank r")
    alpha: Optional[float] = Field(None, gt=0, description="LoRA alpha (scale alpha/r); default: equal to rank")
    target_modules: list[NonEmptyStr] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"], min_length=1, description="UNet module names that get LoRA")
    text_encoder: bool = Field(False, description="also train LoRA on the text encoder(s)")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout")


class IPAdapterConfig(Section):
    """An IP-Adapter loaded into the pipeline (diffusers' ``load_ip_adapter``) and conditioned on
    reference image(s) of a face: ID-Aligner's adapter variant (docs/id_aligner.md). The UNet LoRA
    trains with the adapter in place; the adapter's own weights stay frozen."""

    path: str = Field(..., description="hub id (e.g. h94/IP-Adapter) or local folder holding the adapter; tiny:sd15 / tiny:sdxl: "
                      "a tiny random adapter in the real format (tests)")
    subfolder: str = Field("models", description="folder of the weight file inside path (h94/IP-Adapter: models for SD1.5, sdxl_models for SDXL)")
    weight_name: str = Field("ip-adapter_sd15.safetensors", description="adapter weight file, e.g. ip-adapter-plus-face_sd15.safetensors")
    image_encoder: str = Field("image_encoder", description="CLIP image encoder: a folder name inside subfolder, a path inside path "
                               "(with a '/', e.g. models/image_encoder for the ViT-H SDXL face adapters), or a local folder")
    scale: float = Field(1.0, ge=0, description="IP-Adapter scale (0: the adapter has no effect; 1: full)")
    reference: list[str] = Field(..., min_length=1, description="image file(s) of the face the adapter is conditioned on "
                                 "(several: one image token group each, as diffusers does); relative paths: from the current folder, else the config's")


class ModelConfig(Section):
    family: Literal["sd15", "sdxl"] = Field(..., description="architecture: sd15 or sdxl")
    path: str = Field(..., description="hub id, local diffusers folder, single checkpoint file, or tiny:sd15 / tiny:sdxl")
    revision: Optional[str] = Field(None, description="hub revision")
    variant: Optional[str] = Field(None, description="hub weight variant, e.g. fp16")
    resolution: Optional[int] = Field(None, ge=8, le=4096, description="image size in pixels; default: the model's native size")
    finetune: Literal["lora", "full"] = Field("lora", description="train a LoRA (default) or the whole UNet")
    lora: LoraConfig = Field(default_factory=LoraConfig)
    gradient_checkpointing: bool = Field(True, description="UNet activation checkpointing (saves memory)")
    vae_checkpointing: bool = Field(True, description="checkpoint the VAE decode that rewards backprop through")
    attention: Literal["auto", "sdpa", "xformers"] = Field("auto", description="auto: xformers when installed on CUDA, else PyTorch SDPA")
    ip_adapter: Optional[IPAdapterConfig] = Field(None, description="optional IP-Adapter conditioned on a reference face (ID-Aligner's adapter variant)")
    # performance switches (vfeedback/models/speed.py): each leaves the results unchanged to
    # floating-point tolerance (tests/test_speed_switches.py)
    compile: bool = Field(False, description="regional torch.compile of the UNet's repeated blocks (compile time stays small; the "
                                             "first steps are slow while they compile; needs a C compiler for inductor)")
    channels_last: bool = Field(False, description="UNet and VAE in channels-last (NHWC) memory format (faster convolutions on GPU)")
    fuse_qkv: bool = Field(False, description="fuse the attention q/k/v projections into one matmul (diffusers' fused projections) "
                                              "where no LoRA or trainable weight sits on them; a LoRA is never fused away")
    cache_text_embeddings: bool = Field(False, description="encode each prompt once and keep the text encoders on the CPU (frees their "
                                                           "GPU memory); not with model.lora.text_encoder: true")

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, v):
        if v is not None and v % 8:
            raise ValueError(f"must be a multiple of 8, got {v}")
        return v


def finite_options(v: dict) -> dict:
    """A scorer's ``options`` mapping, refused when any number in it (nested too) is not finite."""
    def walk(x, where):
        if isinstance(x, float) and not math.isfinite(x):
            raise ValueError(f"{where} is {x}; give a finite number")
        if isinstance(x, dict):
            for k, y in x.items():
                walk(y, f"{where}.{k}")
        elif isinstance(x, (list, tuple)):
            for i, y in enumerate(x):
                walk(y, f"{where}.{i}")
    walk(v, "option")
    return v


def resolve_data_path(path: str, config_source) -> Path:
    """A data path as given when it exists (or is absolute), else relative to the config file's
    folder when it exists there (``config_source``: the config's path, or None)."""
    p = Path(path)
    if not p.exists() and not p.is_absolute() and config_source:
        alt = Path(config_source).resolve().parent / p
        if alt.exists():
            return alt
    return p


class RewardSpec(Section):
    name: str = Field(..., description="registered reward name (`vfeedback rewards` lists them)")
    weight: float = Field(1.0, description="weight in the combination")
    options: dict[str, Any] = Field(default_factory=dict, description="options passed to rewards.load")

    @field_validator("options")
    @classmethod
    def _finite_options(cls, v):
        return finite_options(v)


# --- reward guards (ensembles, shaping, cost constraint: docs/raft_and_guards.md) ---
class EnsembleConfig(Section):
    """Coste et al. 2023, "Reward Model Ensembles Help Mitigate Overoptimization": reward.rewards
    are the members, combined per image by the mode (rewards/base.py ``Ensemble``)."""

    mode: Literal["mean", "wco", "uwo"] = Field(..., description="mean: average of the members; wco: worst case (min over members); "
                                                "uwo: mean - uwo_lambda * (population) variance over members")
    uwo_lambda: float = Field(0.5, ge=0, description="uwo: weight of the intra-ensemble variance (our default; the paper reports UWO robust to it)")


class WinRateConfig(Section):
    judge: Literal["reward", "pareto", "heron"] = Field("reward", description="comparator of two samples of a group: reward (the scalar reward, "
                                               "closer than tie_tol is a tie), pareto (each reward/ensemble member an objective; "
                                               "neither dominating is a tie) or heron (the heron section's ranked factors with margins)")
    tie_tol: float = Field(0.0, ge=0, description="scores closer than this tie (a tie counts 1/2)")


class CostConfig(Section):
    """A cost kept under a budget by a Lagrange multiplier (Safe RLHF-V's Lagrangian form):
    maximise reward - lambda * (cost - budget), lambda >= 0 raised by dual ascent while the mean
    cost exceeds the budget (vfeedback/reward_shaping.py)."""

    name: str = Field(..., description="registered scorer giving the cost of an image (higher = worse), e.g. a detector")
    options: dict[str, Any] = Field(default_factory=dict, description="options passed to rewards.load")
    budget: float = Field(..., ge=0, description="d: the allowed mean cost per image")
    lr_lambda: float = Field(0.05, ge=0, description="dual step size: lambda <- max(0, lambda + lr_lambda * (mean cost - budget)) per batch (0: a fixed penalty)")
    lambda_init: float = Field(0.0, ge=0, description="lambda at step 0")

    @field_validator("options")
    @classmethod
    def _finite_options(cls, v):
        return finite_options(v)


class RewardConfig(Section):
    rewards: list[RewardSpec] = Field(..., min_length=1, description="one or more rewards, combined as a weighted sum (or an ensemble: reward.ensemble)")
    normalize: Literal["none", "batch", "running"] = Field("none", description="per-reward normalisation before weighting")
    ensemble: Optional[EnsembleConfig] = Field(None, description="combine reward.rewards as an ensemble (mean / wco / uwo) instead of a weighted sum; every weight must be 1")
    shaping: Literal["none", "par", "win_rate"] = Field(
        "none", description="par: sigmoid(r - r_ref), r_ref the reward of one frozen-base-model image for the same prompt, "
        "drawn from its own seed and shared by the prompt's samples (Fu et al. 2025); win_rate: each sample's share of the other samples of its group it beats (Swamy et al. 2024, SPO); "
        "computed over the global batch")
    win_rate: WinRateConfig = Field(default_factory=WinRateConfig, description="shaping: win_rate settings")

    @model_validator(mode="after")
    def _ensemble_checks(self):
        if self.ensemble is not None:
            if len(self.rewards) < 2:
                raise ValueError(f"ensemble needs at least 2 members under reward.rewards, got {len(self.rewards)}")
            bad = [i for i, r in enumerate(self.rewards) if r.weight != 1.0]
            if bad:
                raise ValueError(f"ensemble: members are combined by the mode, not weighted; reward.rewards.{bad[0]}.weight must be 1 "
                                 f"(got {self.rewards[bad[0]].weight})")
        return self

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v):
        # `reward: color`, `reward: {name: color}` or `reward: [{name: ...}, ...]` all work
        if isinstance(v, str):
            return {"rewards": [{"name": v}]}
        if isinstance(v, list):
            return {"rewards": v}
        if isinstance(v, dict) and "name" in v:
            return {"rewards": [v]}
        return v


class PromptConfig(Section):
    train: Union[Annotated[list[str], Field(min_length=1)], NonEmptyStr] = Field(..., description="training prompts: a list, or a .txt (one per line) / .jsonl ({\"prompt\": ...}) file")
    eval: Union[Annotated[list[str], Field(min_length=1)], NonEmptyStr, None] = Field(None, description="fixed evaluation prompts (default: the first 4 training prompts)")
    negative: str = Field("", description="negative prompt for classifier-free guidance")
    eval_seeds: list[Seed] = Field(default_factory=lambda: [0, 1], min_length=1, description="seeds for the evaluation grid; every prompt is drawn with each")


class SamplingConfig(Section):
    steps: int = Field(40, ge=1, le=1000, description="DDIM steps")
    guidance_scale: float = Field(7.5, ge=0, description="classifier-free guidance scale (<= 1 disables CFG)")
    eta: float = Field(0.0, ge=0, le=1, description="DDIM stochasticity (0 deterministic, 1 DDPM-like)")


class PretrainConfig(Section):
    data: str = Field(..., description="image-text data: a folder of images with same-name .txt captions, a JSONL file of {\"image\": path, \"text\": caption}, or world:shapes (generated shapes-world scenes)")
    weight: float = Field(1.0, ge=0, description="weight of the denoising loss added to the reward loss")
    batch_size: int = Field(1, ge=1, description="image-text pairs per step in the denoising loss")


class ReflConfig(Section):
    """ImageReward's ReFL (Xu et al. 2023); defaults are their reference's."""

    stop_range: tuple[int, int] = Field((30, 39), description="random step index in [lo, hi] (inclusive) where sampling stops and x0 is predicted with grad")
    margin: float = Field(2.0, description="loss = relu(margin - reward) * grad_scale")
    grad_scale: float = Field(1e-3, gt=0, description="scale of the reward loss")
    pretrain: Optional[PretrainConfig] = Field(None, description="optional pre-training (denoising) loss on user data")


class ZORankSGDSection(Section):
    """ZO-RankSGD (Tang, Rybin & Chang, ICLR 2024): gradient-free descent from rankings of perturbed
    candidates. See docs/zo_ranksgd.md and vfeedback/algorithms/zo_ranksgd_diffusion.py."""

    target: Literal["latent", "prompt_embedding", "lora"] = Field(
        "latent", description="what is optimised: the initial latent noise of one image (the paper's image refinement), "
        "the prompt's text embedding, or a LoRA's flattened weights (black-box fine-tuning)")
    rounds: int = Field(20, ge=1, description="oracle rounds (each shows num_candidates candidates); the reference needs 10-20 for refinement")
    num_candidates: int = Field(8, ge=2, le=256, description="m: candidates shown (rendered and ranked) per round")
    smoothing: float = Field(0.1, gt=0, description="mu: candidates are x + mu*u with u ~ N(0, I) (latent target: relative to the shell radius sqrt(d), so 0.1 is a ~0.1 rad perturbation)")
    step_size: float = Field(1.0, gt=0, description="eta: the step x + eta*D (the largest line-search step when line_search is on)")
    estimator: Literal["paper", "reference"] = Field("paper", description="rank-based estimator: 'paper' (the DAG edge average of section 2.2) or 'reference' (the authors' code: weights m-2p and no division by mu)")
    ranker: Literal["reward", "heron"] = Field("reward", description="who ranks the candidates: reward (the mean reward of each candidate's images) "
                                               "or heron (the heron section's ranked factors, each averaged over a candidate's images; ranked by wins)")
    line_search: bool = Field(True, description="the reference's human loop: a gradient round, then a round in which the oracle picks among step sizes eta*2^-j, the previous best and the current point; false: Algorithm 1 (a fixed step each round)")
    line_search_points: Optional[int] = Field(None, ge=1, description="step sizes shown in a line-search round (default num_candidates - 2)")
    average_directions: bool = Field(True, description="line search only: average successive gradient estimates while the current point keeps winning (the reference's running mean)")
    top_k: Optional[int] = Field(None, ge=1, description="the oracle ranks only its k best candidates (null: a full ranking)")
    shuffle: bool = Field(True, description="show candidates in a seeded random order (a person cannot tell the current point by position)")
    prompt: Optional[str] = Field(None, description="prompt of the refined image (latent, prompt_embedding targets); default: the first of prompts.train")
    seed: Optional[Seed] = Field(None, description="seed of the start latent and of the optimiser's perturbations; default: the run's seed")
    latent_norm: Literal["shell", "none"] = Field(
        "shell", description="latent target: 'shell' keeps every rendered latent at norm sqrt(d) (where Gaussian noise lives) and retracts the iterate there after each move; 'none': the raw iterate")
    batch_size: int = Field(8, ge=1, description="images rendered per UNet call")

    @model_validator(mode="after")
    def _check(self):
        if self.top_k is not None and self.top_k > self.num_candidates:
            raise ValueError(f"top_k ({self.top_k}) cannot exceed num_candidates ({self.num_candidates})")
        if self.line_search and self.line_search_points is None and self.num_candidates < 3:
            raise ValueError(f"line_search needs num_candidates >= 3 (got {self.num_candidates}) or line_search_points set")
        return self


class D3POConfig(Section):
    """D3PO (Yang et al., CVPR 2024): DPO applied to every denoising step of pairs of trajectories
    that share their initial latent. Defaults are the reference's (yk7333/d3po config/base.py);
    see docs/d3po.md."""

    beta: float = Field(0.1, gt=0, description="DPO temperature: loss = -log sigmoid(beta * (log ratio_preferred - log ratio_rejected)) per step")
    ratio_clip: Optional[float] = Field(0.1, gt=0, lt=1, description="eps: each step's ratio pi_theta/pi_ref is clamped to [1 - eps, 1 + eps] (the reference's train.eps; its human-label script uses 0.2); null: no clamp")
    group_size: int = Field(2, ge=2, le=64, description="images per prompt, all from one shared initial latent; every pair the judge can tell apart is trained")
    timestep_fraction: float = Field(1.0, gt=0, le=1, description="fraction of the denoising steps trained per trajectory: a random subset, the same for every member of a group")
    mode: Literal["online", "offline"] = Field("online", description="online: sample and label a fresh group per prompt each step; offline: train on a fixed preference set (from d3po.file, or sampled from the base model and labelled once)")
    preference: Literal["reward", "pareto", "file", "heron"] = Field("reward", description="the judge: reward (the reward section as one scalar oracle), pareto (each reward an objective; a pair counts when one image dominates), file (labels, e.g. human, from d3po.file), heron (the heron section's ranked factors)")
    file: Optional[str] = Field(None, description="preference file (.jsonl / .json: labelled pairs or ranked groups; format in docs/d3po.md), for preference: file")
    offline_groups: int = Field(64, ge=1, description="mode offline with preference reward/pareto: groups sampled from the base model and labelled once at the start")
    tie_tol: float = Field(0.0, ge=0, description="judge scores closer than this are a tie (the pair is skipped)")
    winrate_seeds: list[Seed] = Field(default_factory=lambda: [1000, 1001, 1002, 1003], min_length=1, description="held-out seeds for the final win rate of the tuned model over the base (eval prompts x these seeds, judged by the same oracle)")

    @model_validator(mode="after")
    def _check(self):
        if self.preference == "file" and not self.file:
            raise ValueError("preference: file needs d3po.file (a .jsonl/.json preference file)")
        if self.preference == "file" and self.mode != "offline":
            raise ValueError("preference: file trains on stored labels; set d3po.mode: offline")
        return self


class GalleryModel(Section):
    path: str = Field(..., description="hub id, local diffusers folder, single checkpoint file, or tiny:sd15 / tiny:sdxl")
    family: Optional[Literal["sd15", "sdxl"]] = Field(None, description="architecture; default: sdxl for tiny:sdxl, sd15 for other tiny: models, else model.family")
    lora: Optional[str] = Field(None, description="optional LoRA folder (diffusers format, e.g. a run's OUT/lora) loaded onto the model")
    name: Optional[str] = Field(None, description="label stored with the ranking (default: path, plus the LoRA folder)")
    steps: Optional[int] = Field(None, ge=1, le=1000, description="itercomp: this member's sampling steps (a gallery model is rendered with its own recommended settings; default sampling.steps)")
    guidance_scale: Optional[float] = Field(None, ge=0, description="itercomp: this member's classifier-free guidance scale (default sampling.guidance_scale)")


class RankConfig(Section):
    """`vfeedback rank CONFIG`: the Gradio app where a person ranks images (docs/rank_app.md)."""

    mode: Optional[Literal["zo_ranksgd", "d3po", "gallery"]] = Field(
        None, description="zo_ranksgd: rank candidates of ZO-RankSGD rounds; d3po: label pairs/groups and run D3PO updates in "
        "the background; gallery: rank one prompt's images from several models (IterComp); default: the algorithm")
    host: str = Field("127.0.0.1", description="address the app binds; anything but a loopback address needs --auth")
    port: int = Field(7860, ge=0, le=65535, description="port (0: any free port)")
    labels_per_update: int = Field(8, ge=0, description="d3po: run a D3PO update in the background after this many new labels (0: only on the button)")
    update_steps: int = Field(20, ge=1, description="d3po: optimizer steps of each background update (offline D3PO on every label so far)")
    group_size: Optional[int] = Field(None, ge=2, le=9, description="d3po: images shown per prompt (2: a pair); default d3po.group_size")
    gallery: list[Union[str, GalleryModel]] = Field(default_factory=list, description="gallery: the models compared (a path like tiny:sd15, or {path, family, lora, name})")
    gallery_seeds: list[int] = Field(default_factory=lambda: [0], min_length=1, description="gallery: seeds shared by every model; one round per prompt x seed")
    gallery_prompts: Union[list[str], str, None] = Field(None, description="gallery: compositional prompts (list or .txt/.jsonl file); default prompts.train")
    display_size: int = Field(256, ge=32, le=2048, description="pixels each candidate is shown at (small images are upscaled without smoothing)")
    annotator: Optional[str] = Field(None, description="name stored with every answer (default: the --auth user, else none)")
    probe_prompts: list[str] = Field(default_factory=list, description="d3po: fixed probe captions; after every update the current model's images of them are shown beside the base model's (same seeds), scored by probe_reward (empty: no probe panel)")
    probe_seeds: list[int] = Field(default_factory=lambda: [0], min_length=1, max_length=16, description="d3po: seeds of the probe images (each probe caption x each seed)")
    probe_reward: Optional[str] = Field(None, description="a check shown in the app, never trained on (e.g. shapes_judge_heldout): d3po: scores the probe images after each update; zo_ranksgd: scores the current image after each round (none: no check)")

    @model_validator(mode="after")
    def _check(self):
        if self.mode == "gallery" and len(self.gallery) < 2:
            raise ValueError(f"mode: gallery compares models; list at least two under rank.gallery (got {len(self.gallery)})")
        if self.probe_prompts and not self.probe_reward:
            raise ValueError("probe_prompts: set rank.probe_reward to the judge that scores the probes (e.g. shapes_judge_heldout)")
        return self


class IterCompRankerConfig(Section):
    kind: Literal["auto", "human", "heron"] = Field("auto", description="auto: rank each gallery group by the category's composition scorer; "
                                          "human: read rankings a person gave (ranking JSONL, docs/itercomp.md) from file or OUT/iter-K/rankings.jsonl; "
                                          "heron: rank every group by the heron section's ranked factors (wins under the hierarchy)")
    file: Optional[str] = Field(None, description="human: ranking JSONL (prompt, category, images, ranking best-first; or the rank app's export); "
                                "groups it lacks are looked up in OUT/iter-K/rankings.jsonl")
    scorers: dict[str, RewardSpec] = Field(
        default_factory=lambda: {
            "attribute": RewardSpec(name="composition_attribute"),
            "spatial": RewardSpec(name="composition_spatial"),
            "nonspatial": RewardSpec(name="composition_nonspatial"),
            "count": RewardSpec(name="composition_count"),
        },
        description="auto: the composition scorer ranking each category ({category: {name, options}}); also the per-iteration composition measure")
    tie_tol: float = Field(0.0, ge=0, description="auto: scores within this of the next better one tie with it (no pair is trained between them)")


class IterCompRewardModelConfig(Section):
    backbone: dict[str, Any] = Field(default_factory=lambda: {"kind": "open_clip", "model": "ViT-L-14", "pretrained": "openai"},
                                     description="frozen image-text backbone: {kind: open_clip, model, pretrained} or {kind: hf_clip, model, processor}")
    hidden: int = Field(256, ge=4, description="width of each category's MLP head")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout in the head")
    epochs: int = Field(200, ge=1, description="passes over the ranking pairs per iteration")
    batch_size: int = Field(256, ge=1, description="pairs per optimizer step")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate of the heads")
    weight_decay: float = Field(1e-4, ge=0)
    val_fraction: float = Field(0.2, ge=0, lt=1, description="share of prompts held out to report validation pair accuracy (the best epoch by validation loss is kept)")
    val_split: Literal["prompt", "group"] = Field("prompt", description="what is held out: whole prompts (accuracy on unseen prompts) or ranked groups (unseen images of seen prompts)")
    refine: bool = Field(True, description="start each iteration's heads from the previous iteration's (IterComp's self-refinement); false: from scratch")


class IterCompSection(Section):
    """IterComp (Zhang et al. 2024): a gallery of models renders compositional prompts, the images
    are ranked per category, composition-aware reward models learn from the rankings, ReFL
    refines the base model with them, and the result joins the gallery. See docs/itercomp.md."""

    gallery: list[Union[str, GalleryModel]] = Field(default_factory=list, description="models rendering every prompt with shared seeds (path like tiny:sd15 or a hub id, or {path, family, lora, name}); the base model (model.*) joins as 'base'")
    iterations: int = Field(3, ge=1, description="rounds of render -> rank -> train reward models -> ReFL -> add the refined model to the gallery")
    categories: list[Literal["attribute", "spatial", "nonspatial", "count"]] = Field(
        default_factory=lambda: ["attribute", "spatial", "nonspatial"], min_length=1, description="composition categories, one reward model each")
    weights: dict[str, float] = Field(default_factory=dict, description="weight of each category's reward model in ReFL (default 1 each)")
    prompts: dict[str, Union[list[str], str]] = Field(default_factory=dict, description="prompts per category (list or .txt/.jsonl file); default: the shipped vfeedback/itercomp/prompts/<category>.txt")
    max_prompts: Optional[int] = Field(None, ge=1, description="use at most this many prompts per category (the first ones)")
    seeds: list[Seed] = Field(default_factory=lambda: [0], min_length=1, description="seeds shared by every gallery model; one ranked group per prompt x seed")
    gallery_batch_size: int = Field(8, ge=1, description="images rendered per UNet call")
    gallery_guidance_scale: Optional[float] = Field(
        None, ge=0, description="CFG scale of the base and each refined model's gallery renders (the images that are ranked); "
        "default sampling.guidance_scale, which is the ReFL sampler's (1.0 = no CFG in the reference recipes)")
    ranker: IterCompRankerConfig = Field(default_factory=IterCompRankerConfig)
    reward_model: IterCompRewardModelConfig = Field(default_factory=IterCompRewardModelConfig)
    refl_steps: int = Field(100, ge=1, description="ReFL optimizer steps per iteration (train.max_steps of each iteration's inner ReFL run)")
    hinge: bool = Field(True, description="ReFL loss sum_c w_c relu(margin - r_c) over the category reward models (the reference); false: relu(margin - sum_c w_c r_c)")

    @model_validator(mode="after")
    def _check(self):
        bad = [k for k in self.weights if k not in self.categories]
        if bad:
            raise ValueError(f"weights name {bad}, not among categories {self.categories}")
        bad = [k for k in self.prompts if k not in self.categories]
        if bad:
            raise ValueError(f"prompts name {bad}, not among categories {self.categories}")
        if self.ranker.kind == "auto":
            missing = [c for c in self.categories if c not in self.ranker.scorers]
            if missing:
                raise ValueError(f"ranker.scorers has no scorer for {missing}; add {{name: ..., options: ...}} for each category")
        if self.ranker.kind == "human" and self.ranker.file is not None and not self.ranker.file.endswith((".jsonl", ".json")):
            raise ValueError(f"ranker.file must be a .jsonl ranking file, got {self.ranker.file!r}")
        return self


# --- ddpo / grpo ---
class PolicyGradientSection(Section):
    """Settings shared by DDPO and GRPO (vfeedback/algorithms/ddpo.py). One engine step is one
    epoch: train.gradient_accumulation_steps sampling batches of train.batch_size prompts per
    process, then inner_epochs x updates_per_epoch optimizer updates on those samples."""

    clip_range: float = Field(1e-4, gt=0, lt=1, description="PPO clip range: the per-step importance ratio is clipped to [1 - clip_range, 1 + clip_range] (ddpo-pytorch config/base.py train.clip_range)")
    adv_clip_max: float = Field(5.0, gt=0, description="advantages are clamped to [-adv_clip_max, adv_clip_max] (ddpo-pytorch train.adv_clip_max)")
    inner_epochs: int = Field(1, ge=1, le=100, description="passes over each epoch's samples (ddpo-pytorch train.num_inner_epochs)")
    updates_per_epoch: int = Field(1, ge=1, description="optimizer updates per inner epoch; must divide the samples per process per epoch "
                                   "(train.gradient_accumulation_steps x train.batch_size [x grpo.group_size]); the reference's "
                                   "samples_per_epoch / (train.batch_size x num_gpus x train.gradient_accumulation_steps)")
    timestep_fraction: float = Field(1.0, gt=0, le=1, description="fraction of each trajectory's denoising steps trained, a random subset per sample and inner epoch")
    kl_coef: float = Field(0.0, ge=0, description="weight of the per-step Gaussian KL between the policy's and the frozen base's transition (Flow-GRPO's train.beta); 0: off")
    train_batch_size: Optional[int] = Field(None, ge=1, description="rows per UNet forward/backward in the training phase (memory only: an update still averages over all its samples); null: all rows of an update at once")


class DDPOConfig(PolicyGradientSection):
    """DDPO (Black et al., ICLR 2024), PPO-clip on DDIM trajectories; defaults are the reference's
    (kvablack/ddpo-pytorch config/base.py). See docs/ddpo_grpo.md."""

    stat_tracking: bool = Field(True, description="per-prompt advantage normalisation (ddpo-pytorch's PerPromptStatTracker); false: the whole batch's mean and std")
    buffer_size: int = Field(16, ge=1, description="rewards kept per prompt across epochs for its mean and std (per_prompt_stat_tracking.buffer_size)")
    min_count: int = Field(16, ge=1, description="below this many buffered rewards a prompt uses the batch's mean and std (per_prompt_stat_tracking.min_count)")


class GRPOConfig(PolicyGradientSection):
    """GRPO for diffusion (Flow-GRPO / DanceGRPO adapted to DDIM, eta > 0): group_size images per
    prompt, advantage (r - group mean) / (group std + 1e-4), PPO-clip, optional KL to the base.
    See docs/ddpo_grpo.md."""

    group_size: int = Field(8, ge=2, le=256, description="G: images sampled per prompt; a prompt's images form its group (Flow-GRPO sample.num_image_per_prompt, DanceGRPO num_generations)")
    shared_noise: bool = Field(False, description="every image of a group starts from the same initial latent (DanceGRPO); false: independent x_T (Flow-GRPO)")
    global_std: bool = Field(False, description="divide by the std of the whole batch instead of the group's (Flow-GRPO sample.global_std)")
# --- raft ---
class RaftConfig(Section):
    """RAFT: Reward rAnked FineTuning (Dong et al. 2023, TMLR). Each round samples num_samples images
    per prompt, keeps the best by reward and fine-tunes on them with the denoising loss. Defaults
    are the reference's diffusion example (OptimalScale/LMFlow experimental/RAFT-diffusion); see
    docs/raft_and_guards.md and vfeedback/algorithms/raft.py."""

    mode: Literal["online", "offline"] = Field("online", description="online: fresh samples from the current model every round; "
                                               "offline: select once from raft.data (a JSONL or folder of images) and fine-tune on the kept ones")
    num_samples: int = Field(10, ge=1, le=256, description="K: images sampled per prompt each round (the reference's num_images_per_prompt 10)")
    prompts_per_round: int = Field(10, ge=1, description="prompts sampled per round over all processes (the reference: its 10 CIFAR-10 class prompts)")
    selection: Literal["best_of_k", "quantile"] = Field(
        "best_of_k", description="best_of_k: the best of each prompt's K images, then the keep_fraction best of those over the round "
        "(the reference's diffusion example); quantile: the keep_fraction best of all the round's images (LMFlow's 'top' strategy)")
    keep_fraction: float = Field(0.8, gt=0, le=1, description="best_of_k: share of the prompts' best images kept (reference: top 8 of 10); "
                                 "quantile: share of all images kept; floor(n * keep_fraction), at least 1")
    steps_per_round: int = Field(80, ge=1, description="optimizer steps on one round's kept images before the next round is sampled (reference: 80)")
    sample_batch_size: int = Field(8, ge=1, description="images rendered per UNet call while sampling a round")
    data: Optional[str] = Field(None, description="offline: a JSONL file of {\"image\": path, \"prompt\": text, \"score\": number (optional)} "
                                "(paths relative to the file) or a folder of images with same-name .txt prompts")
    offline_scores: Literal["reward", "file"] = Field("reward", description="offline: score the images with the run's reward (with ensemble / "
                                                      "shaping / cost) or take each row's \"score\" from raft.data")

    @model_validator(mode="after")
    def _check(self):
        if self.mode == "offline" and not self.data:
            raise ValueError("mode: offline needs raft.data (a JSONL file or a folder of scored images)")
        return self
# --- diffusion_dpo ---
class DiffusionDPOSection(Section):
    """Diffusion-DPO (Wallace et al., CVPR 2024): DPO on the denoising loss of preferred and rejected
    images of one caption, against the frozen base model. Defaults are the reference's
    (SalesforceAIResearch/DiffusionDPO train.py, launchers/sd15.sh); see docs/diffusion_dpo.md."""

    data: Optional[NonEmptyStr] = Field(
        None, description="the pairs: a Pick-a-Pic-format dataset (a .parquet file, a folder of them, or a datasets save_to_disk "
        "folder with columns caption, jpg_0, jpg_1, label_0; label 0.5 = tie, dropped), a preference .jsonl/.json with image "
        "files (vfeedback rank --export, D3PO's format), or world:shapes (pairs sampled from the base model for prompts.train "
        "and labelled by the reward section); relative paths: from the current folder, else the config's")
    split: NonEmptyStr = Field("train", description="the split read from a Pick-a-Pic folder (parquet file names starting with it, or a DatasetDict key)")
    beta: float = Field(5000.0, gt=0, description="beta of the loss -log sigmoid(-beta/2 * [(err_w - err_w_ref) - (err_l - err_l_ref)]), "
                        "err = the denoising MSE averaged over latent pixels (the reference's --beta_dpo, 5000 for SD1.5 and SDXL)")
    max_pairs: Optional[int] = Field(None, ge=1, description="train on the first N pairs only (the reference's --max_train_samples; null: all)")
    world_pairs: int = Field(128, ge=1, description="world:shapes: pairs sampled from the base model and judged once at the start (2 judged images each)")
    tie_tol: float = Field(0.0, ge=0, description="world:shapes: judge scores closer than this are a tie (the pair is dropped)")
    cache_dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float16", description="dtype of the cached VAE latent mean / std (OUT/latent_cache; 2 x 4 x (res/8)^2 values per image)")
    cache_chunk: int = Field(64, ge=1, description="pairs per latent-cache file; a chunk is VAE-encoded the first time a batch needs one of its pairs")
# --- draft ---
class DraftConfig(Section):
    """DRaFT (Clark et al., ICLR 2024) and AlignProp (Prabhudesai et al. 2023): the reward's gradient
    backpropagated through the last K denoising steps. See docs/draft.md and
    vfeedback/algorithms/draft.py."""

    k: int = Field(1, ge=1, le=1000, description="K: backpropagate through the last K sampling steps (1: DRaFT-1; "
                   "sampling.steps: full DRaFT); ignored when k_range or k_gauss is set")
    k_range: Optional[tuple[int, int]] = Field(None, description="AlignProp's randomized truncation: K drawn uniformly from "
                                               "[lo, hi] (both included) at every step; null: the fixed k")
    k_gauss: Optional[tuple[float, float]] = Field(None, description="AlignProp's default (gaussian) randomized truncation, "
                                                   "[mean, std] in its terms: the index of the first sampling step that keeps the "
                                                   "gradient is int(N(mean, std)), redrawn until in [1, sampling.steps - 1], and "
                                                   "K = sampling.steps - index, at every step ([42, 5] on 50 steps: its aesthetic / "
                                                   "HPS recipes, K about 8 +- 5); not with k_range; null: off")
    lv: int = Field(0, ge=0, le=64, description="DRaFT-LV: n > 0 re-noises the final sample n times to the last timestep and "
                    "averages the reward gradient of the n single last steps (needs k: 1, no k_range); 0: off")
    grad_scale: float = Field(1.0, gt=0, description="loss = -grad_scale * mean reward (AlignProp's loss_coeff x grad_scale)")
    unet_checkpoint: bool = Field(True, description="checkpoint each UNet call inside the gradient window "
                                  "(torch.utils.checkpoint): memory grows by about one latent per extra step of K, "
                                  "at the cost of one more UNet forward per step")
    pretrain: Optional[PretrainConfig] = Field(None, description="optional pre-training (denoising) loss on user data, as refl.pretrain")

    @model_validator(mode="after")
    def _check(self):
        if self.k_range is not None and not (1 <= self.k_range[0] <= self.k_range[1]):
            raise ValueError(f"k_range {list(self.k_range)} must satisfy 1 <= lo <= hi")
        if self.lv and (self.k != 1 or self.k_range is not None or self.k_gauss is not None):
            raise ValueError(f"lv: {self.lv} is DRaFT-LV, defined for K = 1; set k: 1, k_range: null and k_gauss: null, or lv: 0")
        if self.k_gauss is not None:
            if self.k_range is not None:
                raise ValueError("k_gauss and k_range are two ways to draw K (gaussian, uniform); set one, the other null")
            if self.k_gauss[1] <= 0:
                raise ValueError(f"k_gauss {list(self.k_gauss)}: [mean, std] needs std > 0")
        return self


# --- heron ---
class HeronFactor(Section):
    name: str = Field(..., description="registered reward scoring this factor, higher better (`vfeedback rewards` lists them)")
    options: dict[str, Any] = Field(default_factory=dict, description="options passed to rewards.load")
    margin: float = Field(0.0, ge=0, allow_inf_nan=False, description="a sample wins at this level only when its value exceeds the other's by more "
                          "than the margin (margin_scale absolute: in the factor's units; std: times the factor's std); otherwise the next factor decides")

    @field_validator("options")
    @classmethod
    def _finite_options(cls, v):
        return finite_options(v)


class HeronConfig(Section):
    """HERON (Bukharin et al. 2023, arXiv:2309.02632): two samples are compared on the most important
    factor and fall through to the next when they are within its margin (docs/heron.md). Used by
    d3po.preference: heron, reward.win_rate.judge: heron and zo_ranksgd.ranker: heron."""

    factors: list[HeronFactor] = Field(..., min_length=1, description="the factors, most important first: [{name, options, margin}, ...]")
    margin_scale: Literal["absolute", "std"] = Field("absolute", description="absolute: margins in each factor's units; std: margin x the "
                                                     "factor's standard deviation over the samples labelled (the reference's scale-free margins)")


class TrainConfig(Section):
    max_steps: int = Field(100, ge=1, description="optimizer steps")
    batch_size: int = Field(2, ge=1, description="prompts per step per process")
    gradient_accumulation_steps: int = Field(1, ge=1)
    lr: float = Field(1e-5, gt=0, le=1, description="learning rate")
    weight_decay: float = Field(1e-2, ge=0)
    adam_betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = Field(
        (0.9, 0.999), description="AdamW (beta1, beta2), each in [0, 1)")
    adam_eps: float = Field(1e-8, gt=0)
    optimizer: Literal["adamw", "adamw8bit"] = Field("adamw", description="adamw (torch) or adamw8bit (bitsandbytes' 8-bit AdamW: "
                                                     "a quarter of the optimizer-state memory; `pip install bitsandbytes`)")
    max_grad_norm: Optional[float] = Field(1.0, gt=0, description="gradient clipping (null: off)")
    lr_warmup_steps: int = Field(0, ge=0)
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field("auto", description="auto: bf16 on a GPU that has it, else fp16 on GPU, fp32 on CPU")
    max_consecutive_nan: int = Field(5, ge=1, description="stop after this many non-finite losses in a row (each is skipped)")
    device: Optional[Annotated[str, Field(pattern=r"^(cpu|cuda(:[0-9]+)?|mps)$")]] = Field(
        None, description="force a device (cpu, cuda, cuda:N, mps); default: accelerate's choice")
    ema: bool = Field(False, description="keep an exponential moving average of the trained weights (diffusers' EMAModel, as "
                                         "ImageReward's ReFL --use_ema); the averaged weights are what is evaluated and exported")
    ema_decay: float = Field(0.9999, gt=0, lt=1, description="EMA decay cap; the decay at update n is min(ema_decay, (1 + n) / (10 + n)) "
                                                             "(EMAModel's default schedule)")


class LogConfig(Section):
    every: int = Field(1, ge=1, description="log metrics every N steps")
    eval_every: int = Field(0, ge=0, description="eval grid every N steps (0: only before and after)")
    checkpoint_every: int = Field(0, ge=0, description="write a resumable checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = Field(2, ge=1, description="checkpoints kept; older ones are pruned after a new one is whole")
    trackers: list[str] = Field(default_factory=lambda: ["tensorboard"], description="accelerate trackers (tensorboard, wandb, ...); skipped with a warning when not installed")


class RunConfig(Section):
    algorithm: Literal["refl", "zo_ranksgd", "d3po", "itercomp", "raft", "ddpo", "grpo", "diffusion_dpo", "draft"] = Field(..., description="method: refl, zo_ranksgd, d3po, itercomp, raft, ddpo, grpo, diffusion_dpo, draft")
    output_dir: NonEmptyStr = Field(..., description="run folder (new, empty, or an earlier run's with --resume)")
    seed: Seed = Field(0, description="global seed in [0, 2**32); every step's randomness derives from (seed, step)")
    model: ModelConfig
    reward: RewardConfig
    prompts: PromptConfig
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    log: LogConfig = Field(default_factory=LogConfig)
    refl: ReflConfig = Field(default_factory=ReflConfig)
    eval_rewards: list[RewardSpec] = Field(default_factory=list, description="extra scorers for the eval grids only (never trained on), e.g. a held-out judge; their before/after means land in summary.json")
    zo_ranksgd: ZORankSGDSection = Field(default_factory=ZORankSGDSection, description="ZO-RankSGD settings (algorithm: zo_ranksgd)")
    d3po: D3POConfig = Field(default_factory=D3POConfig, description="D3PO settings (algorithm: d3po)")
    itercomp: IterCompSection = Field(default_factory=IterCompSection, description="IterComp settings (algorithm: itercomp)")
    heron: Optional[HeronConfig] = Field(None, description="HERON hierarchical comparator (ranked factors with margins) for d3po.preference / reward.win_rate.judge / zo_ranksgd.ranker: heron")
    ddpo: DDPOConfig = Field(default_factory=DDPOConfig, description="DDPO settings (algorithm: ddpo)")
    grpo: GRPOConfig = Field(default_factory=GRPOConfig, description="GRPO settings (algorithm: grpo)")
    raft: RaftConfig = Field(default_factory=RaftConfig, description="RAFT settings (algorithm: raft)")
    cost: Optional[CostConfig] = Field(None, description="a cost kept under a budget by a Lagrange multiplier (reward - lambda * (cost - budget))")
    diffusion_dpo: DiffusionDPOSection = Field(default_factory=DiffusionDPOSection, description="Diffusion-DPO settings (algorithm: diffusion_dpo)")
    draft: DraftConfig = Field(default_factory=DraftConfig, description="DRaFT / AlignProp settings (algorithm: draft)")
    rank: RankConfig = Field(default_factory=RankConfig, description="the ranking app (vfeedback rank)")

    @model_validator(mode="after")
    def _cross_checks(self):
        lo, hi = self.refl.stop_range
        if self.algorithm in ("refl", "itercomp") and not (0 <= lo <= hi < self.sampling.steps):
            raise ValueError(f"refl.stop_range {list(self.refl.stop_range)} must satisfy 0 <= lo <= hi < sampling.steps ({self.sampling.steps})")
        return self

    @model_validator(mode="after")
    def _speed_checks(self):
        if self.model.cache_text_embeddings and self.model.lora.text_encoder:
            raise ValueError("model.cache_text_embeddings: the text encoders train (model.lora.text_encoder: true), so their "
                             "embeddings change every step and cannot be cached; set one of the two to false")
        return self

    @model_validator(mode="after")
    def _ema_checks(self):
        if self.train.ema and self.algorithm == "zo_ranksgd":
            raise ValueError("train.ema: zo_ranksgd makes no optimizer updates to average; set train.ema: false "
                             "(it is for refl, d3po and itercomp)")
        return self

    @model_validator(mode="before")
    @classmethod
    def _d3po_sampling_defaults(cls, data):
        # D3PO samples with the reference's DDIM settings (20 steps, CFG 5, eta 1) unless the
        # config says otherwise: its policy is the stochastic (eta > 0) DDIM transition
        if isinstance(data, dict) and data.get("algorithm") == "d3po":
            s = data.get("sampling")
            if s is None or isinstance(s, dict):
                data = {**data, "sampling": {"steps": 20, "guidance_scale": 5.0, "eta": 1.0, **(s or {})}}
        return data

    @model_validator(mode="after")
    def _d3po_checks(self):
        if self.algorithm == "d3po" and self.sampling.eta <= 0:
            raise ValueError(f"sampling.eta is {self.sampling.eta}: d3po's policy is the stochastic DDIM transition, whose log-prob "
                             "needs eta > 0 (the reference uses 1.0)")
        return self

    @model_validator(mode="before")
    @classmethod
    def _ddpo_grpo_sampling_defaults(cls, data):
        # DDPO / GRPO sample with the references' DDIM settings (50 steps, CFG 5, eta 1:
        # ddpo-pytorch config/base.py, DanceGRPO fastvideo/config_sd/base.py) unless the config
        # says otherwise: their policy is the stochastic (eta > 0) DDIM transition
        if isinstance(data, dict) and data.get("algorithm") in ("ddpo", "grpo"):
            s = data.get("sampling")
            if s is None or isinstance(s, dict):
                data = {**data, "sampling": {"steps": 50, "guidance_scale": 5.0, "eta": 1.0, **(s or {})}}
        return data

    def _policy_gradient_checks(self, name: str, rows: int):
        sec = getattr(self, name)
        if self.sampling.eta <= 0:
            raise ValueError(f"sampling.eta is {self.sampling.eta}: {name}'s policy is the stochastic DDIM transition, whose "
                             "log-prob needs eta > 0 (the reference uses 1.0)")
        if rows % sec.updates_per_epoch:
            raise ValueError(f"{name}.updates_per_epoch ({sec.updates_per_epoch}) must divide the samples per process per epoch, "
                             f"{rows} (train.gradient_accumulation_steps x train.batch_size"
                             + (" x grpo.group_size" if name == "grpo" else "") + ")")
        return self

    @model_validator(mode="after")
    def _ddpo_checks(self):
        if self.algorithm == "ddpo":
            self._policy_gradient_checks("ddpo", self.train.gradient_accumulation_steps * self.train.batch_size)
        return self

    @model_validator(mode="after")
    def _grpo_checks(self):
        if self.algorithm == "grpo":
            self._policy_gradient_checks("grpo", self.train.gradient_accumulation_steps * self.train.batch_size * self.grpo.group_size)
        return self

    @model_validator(mode="after")
    def _raft_checks(self):
        if self.algorithm == "raft" and self.raft.mode == "offline" and self.reward.shaping == "par":
            raise ValueError("reward.shaping: par compares each image with a base-model image rendered for its prompt in the same round; "
                             "raft.mode: offline scores stored images and renders nothing; use shaping none or win_rate")
        if self.algorithm == "raft" and self.raft.mode == "offline" and self.raft.offline_scores == "file" and (
                self.reward.shaping != "none" or self.cost is not None or self.reward.ensemble is not None):
            raise ValueError("raft.offline_scores: file takes the scores as given; reward.ensemble / reward.shaping / cost apply to scores "
                             "the run computes (set raft.offline_scores: reward)")
        return self

    @model_validator(mode="after")
    def _diffusion_dpo_checks(self):
        if self.algorithm == "diffusion_dpo" and not self.diffusion_dpo.data:
            raise ValueError("diffusion_dpo.data is required: a Pick-a-Pic .parquet file / folder, a preference .jsonl "
                             "(vfeedback rank --export), or world:shapes")
        return self


    @model_validator(mode="after")
    def _draft_checks(self):
        if self.algorithm != "draft":
            return self
        n = self.sampling.steps
        hi = self.draft.k_range[1] if self.draft.k_range is not None else self.draft.k
        where = "draft.k_range" if self.draft.k_range is not None else "draft.k"
        if self.draft.k_gauss is not None:
            mean, std = self.draft.k_gauss
            # the redraw loop of draw_k_gaussian needs an index in [1, steps - 1] to be likely
            if not 1 <= mean <= n - 1:
                raise ValueError(f"draft.k_gauss: mean {mean} must lie in [1, sampling.steps - 1] = [1, {n - 1}] "
                                 f"(the index of the first step with gradient)")
            if std > n:
                raise ValueError(f"draft.k_gauss: std {std} exceeds sampling.steps ({n}); the redraws into [1, {n - 1}] "
                                 f"would rarely end")
        elif hi > n:
            raise ValueError(f"{where}: K up to {hi} exceeds sampling.steps ({n}); K counts sampling steps, at most {n}")
        return self


# --------------------------------------------------------------------------------------------


def format_errors(err: ValidationError, source: str) -> str:
    """One line for one problem (``SOURCE: field: what (got value)``), else a count and a list."""
    lines = [f"{source}: {err.error_count()} problem(s) in the config:"]
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; `vfeedback validate --help-config` lists the fields)"
        elif e["type"] == "missing":
            msg = "required field is missing"
        inp = e.get("input")
        got = "" if e["type"] in ("missing",) or isinstance(inp, dict) else f" (got {inp!r})"
        lines.append(f"  - {loc}: {msg}{got}")
    if len(lines) == 2:
        return f"{source}: {lines[1][4:]}"
    return "\n".join(lines)


def parse_override(s: str) -> tuple[list[str], Any]:
    if "=" not in s:
        raise UserError(f"override {s!r}: expected key=value, e.g. train.max_steps=10")
    key, val = s.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise UserError(f"override {s!r}: bad key {key!r}")
    try:
        value = parse_yaml(val, f"override {key}") if val != "" else ""
    except UserError as e:
        if "syntax error" not in str(e):
            raise  # duplicate keys, an alias bomb: refused, not taken as a string
        value = val
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for ov in overrides:
        keys, value = parse_override(ov)
        d = data
        for i, k in enumerate(keys[:-1]):
            if d.get(k) is None:
                d[k] = {}
            elif not isinstance(d[k], dict):
                # a shorthand (`reward: color`) or a list: setting one key inside it would silently drop it
                path = ".".join(keys[:i + 1])
                hint = (f"{path}={{rewards: [{{name: {d[k]}}}], {keys[i + 1]}: ...}}" if path == "reward" and isinstance(d[k], str)
                        else f"{path}={{...}} with every field it needs")
                raise UserError(f"override {ov!r}: {path} is {d[k]!r} in this config, not a mapping of fields, so "
                                f"{'.'.join(keys)} cannot be set inside it; override the whole field in its long form, e.g. {hint}")
            d = d[k]
        d[keys[-1]] = value
    return data


class _DuplicateKey(yaml.constructor.ConstructorError):
    pass


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last
    silently). Merge keys (``<<: *base``) may still be overridden: that is what they are for."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    hash(key)
                except TypeError:
                    continue  # PyYAML reports an unhashable key itself
                if key in seen:
                    raise _DuplicateKey(None, None, f"key {key!r} is given twice (lines {seen[key].line + 1} and "
                                        f"{key_node.start_mark.line + 1}); keep one", key_node.start_mark)
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node, memo: dict, stack: set) -> int:
    """Nodes of the document once every alias is expanded, without expanding it (memoised per
    node, so an alias bomb costs as many calls as it has distinct nodes)."""
    key = id(node)
    if key in memo:
        return memo[key]
    if key in stack:
        raise UserError("a YAML alias refers to the mapping or list that contains it (a recursive structure)")
    stack.add(key)
    n = 1
    if isinstance(node, yaml.SequenceNode):
        n += sum(_expanded_size(c, memo, stack) for c in node.value)
    elif isinstance(node, yaml.MappingNode):
        n += sum(_expanded_size(k, memo, stack) + _expanded_size(v, memo, stack) for k, v in node.value)
    stack.discard(key)
    memo[key] = n
    return n


def parse_yaml(text: str, source: str) -> Any:
    """Parse one YAML document with the safe loader; refuse duplicate keys, alias expansions
    past ``MAX_YAML_NODES`` nodes and absurd nesting, each as a :class:`UserError` naming ``source``."""
    loader = _StrictLoader(text)
    try:
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            try:
                size = _expanded_size(node, {}, set())
            except UserError as e:
                raise UserError(f"{source}: {e}") from None
            if size > MAX_YAML_NODES:
                raise UserError(f"{source}: the YAML expands to {size} values through its aliases (limit {MAX_YAML_NODES}); "
                                "write the values out instead of nesting aliases")
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except _DuplicateKey as e:
        raise UserError(f"{source}: {e.problem}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{source}: YAML syntax error{where}: {problem}") from None
    except RecursionError:
        raise UserError(f"{source}: the YAML is nested too deeply") from None


def read_yaml(path: Union[str, Path]) -> dict:
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: config file not found")
    if p.is_dir():
        raise UserError(f"{p}: is a folder; give a YAML config file")
    try:
        # bounded read: a device or a pipe (/dev/zero, /dev/stdin) may never end
        with open(p, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            raise UserError(f"{p}: larger than {MAX_CONFIG_BYTES // 1024} KiB; a run config is a few KB of YAML")
        text = raw.decode("utf-8-sig")  # a leading UTF-8 byte-order mark is dropped
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{p}: cannot read ({e})") from None
    data = parse_yaml(text, str(p))
    if data is None:
        raise UserError(f"{p}: the file is empty")
    if not isinstance(data, dict):
        raise UserError(f"{p}: the top level must be a mapping of keys (algorithm:, model:, ...), got a {type(data).__name__}")
    return data


def load_config(path: Union[str, Path], overrides: Optional[list[str]] = None) -> RunConfig:
    """Read, override and validate; raise UserError listing every problem."""
    data = apply_overrides(read_yaml(path), overrides or [])
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as e:
        raise UserError(format_errors(e, str(path))) from None
    # resolve relative file paths against the config's folder when they do not exist from cwd
    base = Path(path).resolve().parent
    for field_name in ("train", "eval"):
        v = getattr(cfg.prompts, field_name)
        if isinstance(v, str) and not Path(v).exists() and (base / v).exists():
            setattr(cfg.prompts, field_name, str(base / v))
    dd = cfg.diffusion_dpo.data
    if dd and not dd.startswith("world:") and not Path(dd).exists() and (base / dd).exists():
        cfg.diffusion_dpo.data = str(base / dd)
    ip = cfg.model.ip_adapter
    if ip is not None:  # reference faces must exist and decode before any weight loads
        from PIL import Image, UnidentifiedImageError

        refs = []
        for i, r in enumerate(ip.reference):
            rp = Path(r) if Path(r).exists() or Path(r).is_absolute() else base / r
            if not rp.is_file():
                raise UserError(f"model.ip_adapter.reference.{i}: {r}: no such image file")
            try:
                with Image.open(rp) as im:
                    im.verify()
            except (OSError, UnidentifiedImageError) as e:
                raise UserError(f"model.ip_adapter.reference.{i}: {rp} is not a readable image ({e})") from None
            refs.append(str(rp))
        ip.reference = refs
    return cfg


def read_prompts(spec: Union[list[str], str], field: str) -> list[str]:
    """Prompts from a list, a .txt file (one per line, # comments) or a .jsonl file."""
    if isinstance(spec, list):
        prompts = [p for p in spec if isinstance(p, str) and p.strip()]
        if not prompts:
            raise UserError(f"{field}: the prompt list is empty")
        return prompts
    p = Path(spec)
    if not p.exists():
        raise UserError(f"{field}: prompt file {p} not found")
    if not p.is_file():
        what = "a folder" if p.is_dir() else "not a regular file (a pipe or a device)"
        raise UserError(f"{field}: {p} is {what}; give a .txt or .jsonl prompt file")
    if p.stat().st_size > MAX_PROMPT_FILE_BYTES:
        raise UserError(f"{field}: {p} is larger than {MAX_PROMPT_FILE_BYTES >> 20} MiB; is it a prompt file?")
    prompts = []
    try:
        lines = p.read_text(encoding="utf-8-sig").splitlines()  # -sig: a byte-order mark is not part of line 1
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{field}: cannot read {p} ({e})") from None
    for i, line in enumerate(lines, 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        if p.suffix == ".jsonl":
            try:
                obj = json.loads(s)
            except json.JSONDecodeError as e:
                raise UserError(f"{field}: {p} line {i}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise UserError(f"{field}: {p} line {i}: expected an object with a string \"prompt\" field")
            prompts.append(obj["prompt"])
        else:
            prompts.append(s)
    if not prompts:
        raise UserError(f"{field}: prompt file {p} has no prompts")
    return prompts


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False)


def describe_fields(model=RunConfig, prefix: str = "") -> list[str]:
    """One line per field: dotted path, type, default, description (for --help-config)."""
    out = []
    for name, f in model.model_fields.items():
        ann = f.annotation
        sub = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if sub is None and getattr(ann, "__args__", None):
            subs = [a for a in ann.__args__ if isinstance(a, type) and issubclass(a, BaseModel)]
            sub = subs[0] if subs else None
        if sub is not None:
            out.extend(describe_fields(sub, prefix + name + "."))
            continue
        default = "required" if f.is_required() else f"default {f.get_default(call_default_factory=True)!r}"
        out.append(f"{prefix}{name}: {f.description or ''} [{default}]")
    return out

    @model_validator(mode="after")
    def _heron_checks(self):
        users = []
        if self.algorithm == "d3po" and self.d3po.preference == "heron":
            users.append("d3po.preference: heron")
        if self.reward.shaping == "win_rate" and self.reward.win_rate.judge == "heron":
            users.append("reward.win_rate.judge: heron")
        if self.algorithm == "zo_ranksgd" and self.zo_ranksgd.ranker == "heron":
            users.append("zo_ranksgd.ranker: heron")
        if self.algorithm == "itercomp" and self.itercomp.ranker.kind == "heron":
            users.append("itercomp.ranker.kind: heron")
        if users and self.heron is None:
            raise ValueError(f"{users[0]} needs a heron section: heron: {{factors: [{{name: REWARD, margin: M}}, ...]}} "
                             "(most important factor first; docs/heron.md)")
        return self
