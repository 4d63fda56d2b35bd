"""VPL: a personalised reward model, r(image, prompt, z), with z inferred from a person's answers.

Variational Preference Learning (Poddar et al. 2024, "Personalizing Reinforcement Learning from
Human Feedback with Variational Preference Learning", arXiv:2408.10075; reference code
github.com/WEIRDLabUW/vpl_llm, ``hidden_context/vae_utils.py``). People disagree, and one
Bradley-Terry reward fitted to everyone's answers averages them. VPL gives each person a latent
``z``: an encoder reads a handful of that person's labelled pairs (the *context*) and outputs
``q(z | context) = N(mu, diag(exp(logvar)))``; the reward is a decoder ``r(x, z)``. Training
maximises the paper's ELBO (its Eq. 3, the reference's ``VAETrainer.compute_loss``):

    E_{z ~ q(z | C_h)} [ sum_{(a, b) in target pairs of h} log sigmoid(r(a, z) - r(b, z)) ]
        - beta * KL( q(z | C_h) || N(0, I) )

with ``KL = 0.5 * sum_d (mu_d^2 + exp(logvar_d) - 1 - logvar_d)`` (closed form for a diagonal
Gaussian against the standard normal prior). Parts, each following ``vae_utils.py``:

- **pair encoder** (``PairEncoder``): an MLP (LeakyReLU 0.2) of ``[e(chosen), e(rejected)]``;
- **context encoder** (``SequenceEncoder``): one self-attention layer over the context's pair
  embeddings, averaged over the pairs, then linear ``mu`` and ``logvar`` heads. No positions,
  so ``q`` does not depend on the order of the context pairs. ``mu`` and ``logvar`` are
  clamped to ``[-1, 1]`` (``VAEModel.forward``);
- **sample** (``VAEModel.reparameterization``): ``z = mu + exp(logvar / 2) * eps``, rescaled to
  norm ``sqrt(latent_dim)``. The reference uses ``z = mu`` (unscaled) at evaluation; we use
  the rescaled ``mu`` there too, so the decoder sees latents of the norm it was trained on
  (our choice);
- **decoder** (``Decoder``): an MLP of ``[e(x), z]`` -> one score;
- **KL weight** ``beta`` (``--kl_loss_weight``; the reference's defaults are 1e-2 and, for its
  Pets runs, 1e-4) times the reference's cyclical cosine annealer (``Annealer``: baseline 0.1,
  cosine ramp to 1 over ``anneal_steps``, then again);
- **contexts** (``data_utils/add_survey_contexts.py``): each target pair of person ``h`` gets a
  context of ``k ~ U{2, ..., context_max}`` other pairs answered by ``h``, redrawn at every
  step (the reference draws them from a per-person survey pool, once per duplicate).

Where this differs from the reference (our choices): the image / prompt embeddings come from a
**frozen** backbone (``rewards.itercomp_rm.load_backbone``: open_clip, transformers CLIP or, in
the shapes world, the shipped judge's reading) and are standardised per feature, as our other
heads do; the decoder is small (hidden 64, latent 8 by default: a few people, a few hundred
pairs, not the reference's 512 / 512 over an LLM); the context excludes the target pair. With
``latent_dim=0`` the same model is a plain Bradley-Terry reward (no encoder, no KL): the pooled
baseline VPL is compared with.

A person's latent at use time is the rescaled ``mu`` of all their training answers (stored in
the model file under their name), or of a preference file given when loading (a newcomer's
handful of answers). The output is standardised, ImageReward-style, by the mean and std of the
scores under that ``z`` of a reference set of training images stored in the file.

Files: ``DIR/vpl_rm.safetensors`` (weights, per-user latents, reference features; metadata
with format, backbone, model shape, users and training report) and ``DIR/manifest.json`` (the
same metadata, readable). Train::

    python -m rewards.vpl --prefs answers.jsonl --out runs/vpl --backbone-kind shapes

Use (ReFL fine-tunes for one person with this as its reward)::

    rewards.load("vpl", path="runs/vpl", user="alice")
    rewards.load("vpl", path="runs/vpl", context="dana_answers.jsonl")
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from . import _hub
from .base import Reward, RewardError, register
from .itercomp_rm import load_backbone, pairwise_ranking_loss, read_tagged

log = logging.getLogger(__name__)

FORMAT = "vfeedback.vpl_rm/1"
DEFAULT_FILENAME = "vpl_rm.safetensors"
MANIFEST = "manifest.json"
_TRAIN_HINT = "train one with: python -m rewards.vpl --prefs FILE --out DIR (docs/vpl.md)"


# --------------------------------------------------------------------------------------------
# the ELBO's terms


def kl_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``KL(N(mu, diag(exp(logvar))) || N(0, I))`` per row: ``(B, L), (B, L) -> (B,)``.

    Closed form ``0.5 * sum_d (mu_d^2 + exp(logvar_d) - 1 - logvar_d)`` (the reference writes
    ``-0.5 * sum(1 + log_var - mean^2 - exp(log_var))``, the same)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)


def anneal(step: int, total: int, baseline: float = 0.1) -> float:
    """The reference's cyclical cosine KL annealer (``vae_utils.Annealer``, shape ``cosine``):
    ``baseline + (1 - baseline) * (cos(pi * (s / total - 1)) + 1) / 2`` with ``s = step mod
    total``: ``baseline`` at the start of each cycle, rising to 1 at its end. ``total <= 0``
    disables annealing (weight 1)."""
    if total <= 0:
        return 1.0
    s = step % total
    x = s / total
    phase = x - 1.0  # pragma: no mutate  x - 1 and x + 1 are a full period (2 pi) apart: the same cosine
    y = (math.cos(math.pi * phase) + 1.0) / 2.0
    return y * (1.0 - baseline) + baseline


def elbo_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, mu: Optional[torch.Tensor],
              logvar: Optional[torch.Tensor], beta: float) -> dict[str, torch.Tensor]:
    """The negative ELBO VPL minimises: ``{"nll", "kl", "loss"}``.

    ``nll``: mean over target pairs of ``-log sigmoid(r_chosen - r_rejected)`` (the Bradley-Terry
    log-likelihood, negated); ``kl``: mean over the batch's contexts of
    :func:`kl_standard_normal` (zero without a latent: ``mu is None``); ``loss = nll + beta * kl``
    (``beta`` already includes any annealing)."""
    nll = pairwise_ranking_loss(r_chosen, r_rejected)
    kl = kl_standard_normal(mu, logvar).mean() if mu is not None else nll.new_zeros(())
    return {"nll": nll, "kl": kl, "loss": nll + beta * kl}


def rescale_latent(z: torch.Tensor) -> torch.Tensor:
    """``z / |z| * sqrt(L)`` per row (``VAEModel.reparameterization``)."""
    return z / z.norm(dim=-1, keepdim=True).clamp_min(1e-12) * math.sqrt(z.shape[-1])  # F.normalize's formula, no p to pass


# --------------------------------------------------------------------------------------------
# the model


def _mlp(i: int, h: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(i, h), nn.LeakyReLU(0.2), nn.Linear(h, h), nn.LeakyReLU(0.2), nn.Linear(h, o))


class ContextEncoder(nn.Module):
    """Pair embeddings of a context ``(B, C, L)`` with a mask ``(B, C)`` -> ``(mu, logvar)``,
    each ``(B, L)``: one self-attention layer (``SequenceEncoder``), averaged over the valid
    pairs; invariant to the order of the pairs."""

    def __init__(self, dim: int):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.mean = nn.Linear(dim, dim)
        self.log_var = nn.Linear(dim, dim)

    def forward(self, pairs: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = mask.to(pairs.dtype)
        scores = self.q(pairs) @ self.k(pairs).transpose(1, 2) / math.sqrt(pairs.shape[-1])  # (B, C, C)
        scores = scores.masked_fill(~mask.bool()[:, None, :], float("-inf"))
        att = scores.softmax(-1) @ self.v(pairs)  # (B, C, L)
        pooled = (att * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp_min(1.0)
        return self.mean(pooled), self.log_var(pooled)


class VPLModel(nn.Module):
    """Pair encoder + context encoder + decoder over standardised features ``(.., feat_dim)``.

    ``latent_dim = 0``: a plain Bradley-Terry reward (the decoder reads the features only)."""

    def __init__(self, feat_dim: int, latent_dim: int = 8, hidden: int = 64):
        super().__init__()
        self.feat_dim, self.latent_dim, self.hidden = int(feat_dim), int(latent_dim), int(hidden)
        if self.latent_dim > 0:
            self.pair_encoder = _mlp(2 * self.feat_dim, self.hidden, self.latent_dim)
            self.context_encoder = ContextEncoder(self.latent_dim)
        self.decoder = _mlp(self.feat_dim + self.latent_dim, self.hidden, 1)
        self.register_buffer("feat_mean", torch.zeros(self.feat_dim))
        self.register_buffer("feat_std", torch.ones(self.feat_dim))

    def config(self) -> dict:
        return {"feat_dim": self.feat_dim, "latent_dim": self.latent_dim, "hidden": self.hidden}

    def fit_features(self, feats: torch.Tensor) -> None:
        """Set the per-feature standardisation from training features ``(N, feat_dim)``."""
        with torch.no_grad():  # a block, not a decorator: mutmut skips decorated functions
            self.feat_mean.copy_(feats.float().mean(0))
            self.feat_std.copy_(feats.float().std(0).clamp_min(1e-4) if feats.shape[0] > 1 else torch.ones(self.feat_dim))

    def standardise(self, feats: torch.Tensor) -> torch.Tensor:
        return (feats.float() - self.feat_mean) / self.feat_std

    def encode(self, ctx_chosen: torch.Tensor, ctx_rejected: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw features of the context pairs ``(B, C, feat_dim)`` x2, mask ``(B, C)`` ->
        ``(mu, logvar)`` ``(B, latent_dim)``, both clamped to ``[-1, 1]`` as in the reference."""
        e = self.pair_encoder(torch.cat([self.standardise(ctx_chosen), self.standardise(ctx_rejected)], -1))
        mu, logvar = self.context_encoder(e, mask)
        return mu.clamp(-1, 1), logvar.clamp(-1, 1)

    def sample(self, mu: torch.Tensor, logvar: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Reparameterised draw, rescaled: ``rescale(mu + exp(logvar / 2) * eps)``."""
        eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype)
        eps = eps.to(mu.device)  # pragma: no mutate  placement: a no-op on a CPU (.to(None) too)
        return rescale_latent(mu + (0.5 * logvar).exp() * eps)

    def reward(self, feats: torch.Tensor, z: Optional[torch.Tensor]) -> torch.Tensor:
        """Raw features ``(B, feat_dim)`` and latents ``(B, L)`` (or ``(L,)``, broadcast; None for
        a plain BT model) -> scores ``(B,)``."""
        x = self.standardise(feats)
        if self.latent_dim > 0:
            if z is None:
                raise RewardError("vpl: this model needs a user latent z")
            z = z.to(x).expand(x.shape[0], -1) if z.ndim == 1 else z.to(x)
            x = torch.cat([x, z], -1)
        return self.decoder(x).squeeze(-1)


# --------------------------------------------------------------------------------------------
# data: labelled pairs of images, each by row into a feature matrix


@dataclass
class PairSet:
    """Pairs ``(chosen row, rejected row)`` into a feature matrix, each with its user's index."""

    chosen: torch.Tensor  # (P,) long
    rejected: torch.Tensor  # (P,) long
    user: torch.Tensor  # (P,) long
    users: list[str]

    def of(self, u: int) -> torch.Tensor:
        return (self.user == u).nonzero().flatten()


def sample_contexts(pairs: PairSet, targets: torch.Tensor, context_max: int, g: torch.Generator,
                    context_min: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Context pair indices ``(B, context_max)`` (into ``pairs``) and a mask for each target
    pair: ``k ~ U{context_min, ..., context_max}`` other pairs of the target's user, without
    replacement (fewer when the user has fewer). Reference: ``add_survey_contexts.random_choice``."""
    # vectorised: every other pair of the target's user gets a random key; the k largest win
    B, P = targets.shape[0], pairs.user.numel()
    same = (pairs.user[None, :] == pairs.user[targets][:, None]) & (torch.arange(P)[None, :] != targets[:, None])
    avail = same.sum(1)
    keys = torch.rand(B, P, generator=g) - (~same).float()  # the others' keys in [-1, 0): below every valid one
    idx = keys.topk(min(context_max, P)).indices  # along the last dim, the P pairs
    idx = torch.cat([idx, idx.new_zeros(B, context_max - idx.shape[1])], 1)  # padded to context_max (width 0 when P >= it)
    hi = avail.clamp(max=context_max)
    lo = avail.clamp(max=context_min)
    # k ~ U{lo, ..., hi}: float32 rand() <= 1 - 2^-24, and (1 - 2^-24) * n rounds below n for every n < 2^24, so k <= hi
    k = lo + (torch.rand(B, generator=g) * (hi - lo + 1)).long()
    mask = torch.arange(context_max)[None, :] < k[:, None]
    idx = idx.masked_fill(~mask, 0)
    return idx, mask


def train_vpl(feats: torch.Tensor, pairs: PairSet, *, latent_dim: int = 8, hidden: int = 64, steps: int = 2000,
              batch_size: int = 64, lr: float = 1e-3, weight_decay: float = 1e-4, beta: float = 1e-2,
              anneal_steps: int = 500, context_max: int = 8, seed: int = 0) -> tuple[VPLModel, list[dict]]:
    """Fit a :class:`VPLModel` on ``pairs`` over ``feats`` ``(N, D)`` (raw backbone features):
    ``steps`` AdamW steps on :func:`elbo_loss` over mini-batches of ``batch_size`` target pairs,
    each with a fresh context (:func:`sample_contexts`) and one reparameterised ``z``. Returns
    ``(model, history)``; ``latent_dim = 0`` fits a plain Bradley-Terry model."""
    if pairs.chosen.numel() == 0:
        raise RewardError("vpl: no labelled pairs to train on")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = VPLModel(feats.shape[1], latent_dim, hidden)
    model.fit_features(feats)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    P = pairs.chosen.numel()
    history = []
    for step in range(steps):
        t = torch.randint(0, P, (min(batch_size, P),), generator=g)
        fc, fr = feats[pairs.chosen[t]], feats[pairs.rejected[t]]
        if latent_dim > 0:
            ci, cm = sample_contexts(pairs, t, context_max, g)
            mu, logvar = model.encode(feats[pairs.chosen[ci]], feats[pairs.rejected[ci]], cm)
            z = model.sample(mu, logvar, g)
            terms = elbo_loss(model.reward(fc, z), model.reward(fr, z), mu, logvar, beta * anneal(step, anneal_steps))
        else:
            terms = elbo_loss(model.reward(fc, None), model.reward(fr, None), None, None, 0.0)
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        opt.step()
        if step % max(1, steps // 20) == 0 or step == steps - 1:
            history.append({"step": step, **{k: float(v.detach()) for k, v in terms.items()}})
    return model.eval(), history


@torch.no_grad()
def user_latent(model: VPLModel, ctx_chosen: torch.Tensor, ctx_rejected: torch.Tensor) -> torch.Tensor:
    """The latent ``(L,)`` of one person from their labelled pairs' raw features ``(C, D)`` x2:
    the rescaled posterior mean."""
    if ctx_chosen.shape[0] == 0:
        raise RewardError("vpl: a user latent needs at least one labelled pair")
    mu, _ = model.encode(ctx_chosen[None], ctx_rejected[None], torch.ones(1, ctx_chosen.shape[0], dtype=torch.bool))
    return rescale_latent(mu)[0]


# --------------------------------------------------------------------------------------------
# files


def save_model(out_dir: Union[str, Path], model: VPLModel, backbone: dict, use_prompt: bool, latents: dict[str, torch.Tensor],
               ref_feats: torch.Tensor, report: Optional[dict] = None) -> Path:
    """Write ``out_dir/vpl_rm.safetensors`` (atomically) and ``out_dir/manifest.json``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    users = list(latents)
    tensors = {f"model.{k}": v.detach().cpu().float().contiguous() for k, v in model.state_dict().items()}
    tensors["ref_features"] = ref_feats.detach().cpu().float().contiguous()
    if users:
        tensors["user_latents"] = torch.stack([latents[u].detach().cpu().float() for u in users]).contiguous()
    meta = {"format": FORMAT, "backbone": json.dumps(backbone, sort_keys=True), "model": json.dumps(model.config()),
            "use_prompt": json.dumps(bool(use_prompt)), "users": json.dumps(users), "report": json.dumps(report or {})}
    path = out / DEFAULT_FILENAME
    tmp = path.with_name("." + path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    manifest = {k: (v if k == "format" else json.loads(v)) for k, v in meta.items()}
    manifest["weights"] = DEFAULT_FILENAME
    tmp = out / ("." + MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, out / MANIFEST)
    return path


def read_model(path: Union[str, Path]) -> dict:
    """Everything in a file written by :func:`save_model`: ``model`` (eval), ``backbone``,
    ``use_prompt``, ``latents`` (name -> ``(L,)``), ``ref_features``, ``report``."""
    p = Path(path)
    sd, meta = read_tagged(p, FORMAT, "vpl", "a VPL reward model", "rewards.vpl", _TRAIN_HINT)
    cfg = json.loads(meta["model"])
    model = VPLModel(cfg["feat_dim"], cfg["latent_dim"], cfg["hidden"])
    try:
        model.load_state_dict({k[len("model."):]: v for k, v in sd.items() if k.startswith("model.")})
    except RuntimeError as e:
        raise RewardError(f"vpl: {p}: weights do not match the model it describes ({str(e)[:200]})") from None
    users = json.loads(meta.get("users", "[]"))
    lat = sd.get("user_latents")
    latents = {u: lat[i] for i, u in enumerate(users)} if lat is not None else {}
    return {"model": model.eval().requires_grad_(False), "backbone": json.loads(meta["backbone"]),
            "use_prompt": json.loads(meta.get("use_prompt", "false")), "latents": latents,
            "ref_features": sd["ref_features"], "report": json.loads(meta.get("report", "{}"))}


# --------------------------------------------------------------------------------------------
# preference files: the rank app's export (docs/rank_app.md) with a user per record


def _ranked_pairs(ranks: Sequence[float]) -> list[tuple[int, int]]:
    return [(i, j) for i in range(len(ranks)) for j in range(len(ranks)) if ranks[i] < ranks[j]]


def read_preferences(path: Union[str, Path]) -> list[dict]:
    """Labelled image pairs of a preference JSONL: ``[{"user", "prompt", "chosen", "rejected"}]``
    with absolute image paths. A record is a pair (``chosen`` / ``rejected`` items) or a ranked
    group (``items`` / ``ranks``; every pair of different ranks); each item needs ``image`` (a
    file, relative to the JSONL); the person is the record's ``user`` (the rank app's user
    field), else its ``annotator``, else ``None``. Bad records raise :class:`RewardError` naming
    the file and line."""
    p = Path(path)
    if not p.is_file():
        raise RewardError(f"vpl: no preference file {p}")
    out = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{p} line {n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise RewardError(f"vpl: {where}: not JSON ({e.msg}); expected one preference record per line") from None
        if not isinstance(rec, dict):
            raise RewardError(f"vpl: {where}: a record must be a JSON object")
        if "chosen" in rec and "rejected" in rec:
            items, pairs = [rec["chosen"], rec["rejected"]], [(0, 1)]
        elif "items" in rec and "ranks" in rec:
            items, pairs = rec["items"], _ranked_pairs(rec["ranks"])
        else:
            raise RewardError(f"vpl: {where}: a record needs chosen and rejected, or items and ranks")
        paths = []
        for it in items:
            img = it.get("image") if isinstance(it, dict) else None
            if not isinstance(img, str):
                raise RewardError(f"vpl: {where}: every item needs an image file (\"image\": PATH); VPL scores the images people saw")
            q = (p.parent / img).resolve()
            if not q.is_file():
                raise RewardError(f"vpl: {where}: image {img} not found (looked at {q})")
            paths.append(str(q))
        user = rec.get("user") or rec.get("annotator")
        for a, b in pairs:
            out.append({"user": user, "prompt": rec.get("prompt", ""), "chosen": paths[a], "rejected": paths[b]})
    return out


class _Features:
    """Backbone features of images (and prompts when the model reads them), cached per file."""

    def __init__(self, backbone, use_prompt: bool):
        self.backbone, self.use_prompt = backbone, use_prompt

    def __call__(self, images: torch.Tensor, prompts: Optional[Sequence[str]]) -> torch.Tensor:
        e = self.backbone.image_embeddings(images).float()
        if self.use_prompt:
            if prompts is None:
                raise RewardError("vpl: this model reads the prompt; pass one per image")
            e = torch.cat([e, self.backbone.text_embeddings(list(prompts)).float().to(e.device)], -1)
        return e

    @torch.no_grad()
    def of_files(self, recs: list[dict], batch: int = 64) -> tuple[torch.Tensor, dict[tuple[str, str], int]]:
        """Features ``(N, D)`` of every distinct (image file, prompt) of ``recs`` and its row."""
        from .images import load_image

        keys = list(dict.fromkeys((r[s], r["prompt"]) for r in recs for s in ("chosen", "rejected")))
        rows = []
        for s in range(0, len(keys), batch):
            chunk = keys[s:s + batch]
            ims = [load_image(k[0]) for k in chunk]
            sizes = {tuple(x.shape) for x in ims}
            if len(sizes) > 1:
                rows += [self(x[None].to(self.backbone.device), [k[1]]) for x, k in zip(ims, chunk)]
            else:
                rows.append(self(torch.stack(ims).to(self.backbone.device), [k[1] for k in chunk]))
        return torch.cat(rows).cpu(), {k: i for i, k in enumerate(keys)}


def train_from_files(prefs: Sequence[Union[str, Path]], out: Union[str, Path], backbone: dict, *, use_prompt: bool = False,
                     latent_dim: int = 8, device: Optional[str] = None, ref_size: int = 256, **train_kw) -> dict:
    """Read preference files, embed their images with the frozen ``backbone``, train, and save
    to ``out`` (a folder); returns the training report. ``latent_dim = 0``: a pooled
    Bradley-Terry model (users are then optional)."""
    recs = [r for f in prefs for r in read_preferences(f)]
    if not recs:
        raise RewardError(f"vpl: no labelled pairs in {', '.join(map(str, prefs))}")
    if latent_dim > 0:
        missing = sum(r["user"] is None for r in recs)
        if missing:
            raise RewardError(f"vpl: {missing} of {len(recs)} pairs name no user (record field \"user\" or \"annotator\"); "
                              "VPL groups answers by person: fill the rank app's user box, or train a pooled model with --latent-dim 0")
    bb = load_backbone(backbone, device)
    feats, row = _Features(bb, use_prompt).of_files(recs)
    users = sorted({r["user"] or "" for r in recs})
    uidx = {u: i for i, u in enumerate(users)}
    pairs = PairSet(torch.tensor([row[(r["chosen"], r["prompt"])] for r in recs]),
                    torch.tensor([row[(r["rejected"], r["prompt"])] for r in recs]),
                    torch.tensor([uidx[r["user"] or ""] for r in recs]), users)
    model, history = train_vpl(feats, pairs, latent_dim=latent_dim, **train_kw)
    latents = {}
    with torch.no_grad():
        if latent_dim > 0:
            for u, name in enumerate(users):
                i = pairs.of(u)
                latents[name] = user_latent(model, feats[pairs.chosen[i]], feats[pairs.rejected[i]])
        per_user = {}
        for u, name in enumerate(users):
            i = pairs.of(u)
            z = latents.get(name)
            d = model.reward(feats[pairs.chosen[i]], z) - model.reward(feats[pairs.rejected[i]], z)
            per_user[name] = {"pairs": int(i.numel()), "train_accuracy": float(((d > 0).float() + 0.5 * (d == 0).float()).mean())}
    g = torch.Generator().manual_seed(0)
    ref = feats[torch.randperm(feats.shape[0], generator=g)[:ref_size]]
    report = {"pairs": int(pairs.chosen.numel()), "images": int(feats.shape[0]), "users": per_user,
              "latent_dim": latent_dim, "kind": "vpl" if latent_dim > 0 else "bradley_terry",
              "final": history[-1], **{k: v for k, v in train_kw.items() if isinstance(v, (int, float))}}
    save_model(out, model, backbone, use_prompt, latents, ref, report)
    log.info("vpl: %d pairs of %d users, %d images -> %s", report["pairs"], len(users), report["images"], out)
    return report


# --------------------------------------------------------------------------------------------
# the reward


@register(
    "vpl",
    differentiable=True,
    description="VPL personalised reward (Poddar et al. 2024): frozen backbone + latent-conditioned head; path=model folder, user=NAME or context=answers.jsonl",
)
class VPLReward(Reward):
    """One person's reward under a VPL model (standardised: mean 0, std 1 over the file's
    reference images under that person's latent; higher = that person likes it more).

    Options: ``path`` (a folder holding ``vpl_rm.safetensors``, the file itself,
    ``hf-hub:org/repo/file`` or a URL); ``user`` (a name the model was trained with; its stored
    latent) or ``context`` (a preference JSONL of one person's answers, read as in
    :func:`read_preferences`: the latent is inferred from them) or ``z`` (the latent itself, a
    list of ``latent_dim`` floats); none of them for a pooled Bradley-Terry model. ``device``,
    ``dtype``, ``fingerprint`` (ignored; part of the load cache key).
    """

    def __init__(self, path: str, user: Optional[str] = None, context: Optional[str] = None, z: Optional[Sequence[float]] = None,
                 device: Optional[str] = None, dtype: Optional[str] = None, fingerprint: Optional[str] = None):
        super().__init__()
        if not path:
            raise RewardError(f"vpl: option path is required; {_TRAIN_HINT}")
        p = Path(str(path)).expanduser()
        if not str(path).startswith(("hf-hub:", "http://", "https://")) and not p.exists():
            raise RewardError(f"vpl: no reward model at {p}; {_TRAIN_HINT}")
        local = _hub.resolve_file(str(path), default=str(path), filename=DEFAULT_FILENAME, what="vpl", option="path")
        m = read_model(local)
        model: VPLModel = m["model"]
        self.path, self.report, self.users = local, m["report"], sorted(m["latents"])
        self.backbone_spec, self.use_prompt = m["backbone"], m["use_prompt"]
        self.needs_prompt = bool(self.use_prompt)
        given = [k for k, v in (("user", user), ("context", context), ("z", z)) if v is not None]
        if len(given) > 1:
            raise RewardError(f"vpl: give one of user, context, z (got {', '.join(given)})")
        self.backbone = load_backbone(self.backbone_spec, device, dtype)
        self.features = _Features(self.backbone, self.use_prompt)
        if model.latent_dim == 0:
            if given:
                raise RewardError(f"vpl: {local} is a pooled Bradley-Terry model (no latent); drop option {given[0]}")
            lat = None
        elif user is not None:
            if user not in m["latents"]:
                raise RewardError(f"vpl: user {user!r} is not in {local}; its users: {', '.join(self.users) or 'none'} "
                                  "(or pass context=FILE of that person's answers)")
            lat = m["latents"][user]
        elif context is not None:
            recs = read_preferences(context)
            if not recs:
                raise RewardError(f"vpl: context {context} holds no labelled pairs")
            feats, row = self.features.of_files(recs)
            fc = feats[[row[(r["chosen"], r["prompt"])] for r in recs]]
            fr = feats[[row[(r["rejected"], r["prompt"])] for r in recs]]
            lat = user_latent(model, fc, fr)
        elif z is not None:
            lat = torch.tensor([float(v) for v in z])
            if lat.shape != (model.latent_dim,):
                raise RewardError(f"vpl: z must be {model.latent_dim} numbers, got {lat.numel()}")
        else:
            raise RewardError(f"vpl: say whose reward: user=NAME (one of {', '.join(self.users) or 'none'}), "
                              "context=FILE of their answers, or z=[...]")
        self.model = model.to(self.backbone.device)
        self.register_buffer("z", lat.float() if lat is not None else torch.zeros(0))
        with torch.no_grad():
            raw = self.model.reward(m["ref_features"].to(self.backbone.device), self._z())
        self.register_buffer("mean", raw.mean())
        self.register_buffer("std", raw.std().clamp_min(1e-6) if raw.numel() > 1 else torch.ones(()))

    def _z(self) -> Optional[torch.Tensor]:
        return self.z if self.z.numel() else None

    def forward(self, images, prompts=None, **context):
        if isinstance(prompts, str):
            prompts = [prompts] * images.shape[0]
        e = self.features(images, prompts)
        r = self.model.reward(e.to(self.mean.device), self._z())
        return ((r - self.mean) / self.std).to(images.device)


# --------------------------------------------------------------------------------------------
# CLI


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m rewards.vpl``: train a VPL (or pooled Bradley-Terry) reward model from answers."""
    ap = argparse.ArgumentParser(prog="python -m rewards.vpl", description=__doc__.split("\n\n")[0])
    ap.add_argument("--prefs", required=True, nargs="+", help="preference JSONL file(s): the rank app's export, records with a user")
    ap.add_argument("--out", required=True, help="output folder (vpl_rm.safetensors + manifest.json)")
    ap.add_argument("--backbone-kind", default="open_clip", choices=["open_clip", "hf_clip", "shapes"])
    ap.add_argument("--backbone-model", default="ViT-L-14", help="open_clip name or transformers CLIP id/folder (not for shapes)")
    ap.add_argument("--backbone-pretrained", default="openai", help="open_clip pretrained tag (open_clip only)")
    ap.add_argument("--use-prompt", action="store_true", help="the reward reads the prompt too (its embedding joins the image's)")
    ap.add_argument("--latent-dim", type=int, default=8, help="size of z; 0 = one pooled Bradley-Terry model")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--beta", type=float, default=1e-2, help="KL weight (the reference's kl_loss_weight)")
    ap.add_argument("--anneal-steps", type=int, default=500, help="length of one cosine KL-annealing cycle; 0 = off")
    ap.add_argument("--context-max", type=int, default=8, help="most context pairs per target pair")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("latent_dim", "hidden", "steps", "batch_size", "context_max"):
        lo = 0 if name == "latent_dim" else (2 if name == "context_max" else 1)
        if getattr(args, name) < lo:
            print(f"error: --{name.replace('_', '-')} must be >= {lo}, got {getattr(args, name)}", file=sys.stderr)
            return 2
    if args.backbone_kind == "shapes":
        spec = {"kind": "shapes", "which": "judge"}
    else:
        spec = {"kind": args.backbone_kind, "model": args.backbone_model}
        if args.backbone_kind == "open_clip" and args.backbone_pretrained:
            spec["pretrained"] = args.backbone_pretrained
    try:
        report = train_from_files(args.prefs, args.out, spec, use_prompt=args.use_prompt, latent_dim=args.latent_dim,
                                  device=args.device, hidden=args.hidden, steps=args.steps, batch_size=args.batch_size,
                                  lr=args.lr, beta=args.beta, anneal_steps=args.anneal_steps, context_max=args.context_max,
                                  seed=args.seed)
    except (RewardError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
