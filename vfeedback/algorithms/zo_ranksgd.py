"""ZO-RankSGD: zeroth-order descent that only ever sees a ranking of a few perturbed candidates.

Tang, Rybin & Chang, "Zeroth-Order Optimization Meets Human Feedback: Provable Learning via
Ranking Oracles", ICLR 2024 (arXiv 2303.03751); reference code: the ``RankSGD`` class of
github.com/TZW1998/Taming-Stable-Diffusion-with-Human-Ranking-Feedback (``optimizer.py``).

The method, in the paper's terms (section numbers of arXiv v3):

* §2.1, comparison oracle. For two perturbations ``x + mu*u1``, ``x + mu*u2`` with
  ``u ~ N(0, I)``, ``sign(f(x+mu*u1) - f(x+mu*u2)) * (u1 - u2)`` is, as ``mu -> 0``, a random
  vector whose mean is a positive multiple of ``grad f(x) / |grad f(x)|`` (a *normalised*
  gradient: the oracle reveals a direction, never a magnitude).
* §2.2, (m, k)-ranking oracle. ``m`` candidates ``x + mu*u_i`` are shown; the oracle returns
  the ``k`` best, in order (``k = m``: a full ranking). The answer is a DAG over the
  candidates with an edge ``i -> j`` for every pair known to satisfy "i better than j": the
  ``k(k-1)/2`` pairs among the ranked items plus ``k(m-k)`` from each ranked item to every
  unranked one, ``|E| = k(k-1)/2 + k(m-k)``. The rank-based estimator averages the pairwise
  comparison estimator over the edges::

      g = 1/|E| * sum_{(i -> j) in E} (u_j - u_i)          (estimate of the loss' gradient dir.)

  i.e. for minimisation the better point ``i`` pulls the estimate away from itself.
* §3, Algorithm 1 (ZO-RankSGD): ``x_{t+1} = x_t - eta * g_t``.

Nothing here minimises or maximises anything on its own: the optimiser moves toward what the
oracle ranks *first*. A loss oracle ranks lowest first (:class:`FunctionRankingOracle` with
``minimize=True``); a reward oracle ranks highest first (:class:`RewardRankingOracle`). The
vector this module keeps, ``direction``, is therefore the *preference-ascent* direction
``D = -g``, and every update is ``x + eta * D``.

What the reference code does differently, offered as ``estimator="reference"``:

1. Weights. Written per candidate, the paper's estimator is ``D = 1/|E| sum_i w_i u_i`` with
   ``w_i = (out-degree - in-degree)`` in the DAG: ``m - 1 - 2p`` for the item ranked at place
   ``p`` (0-based) and ``-k`` for an unranked item; these sum to zero. The reference uses
   ``m - 2p`` for ranked items (one more each) and ``-k`` for unranked ones, so its weights
   sum to ``k``: it adds ``1/|E| * sum_{top-k} u_i``, a pull toward the mean of the top k
   (evolution-strategy-like; still a descent direction on average, but not the paper's).
2. Scale. The reference multiplies the weights into ``x_i - x = mu*u_i``, not ``u_i``: its
   direction is ``mu`` times ours ("no division by mu"), so its step size means something
   else (``eta_ref = eta_paper / mu`` for the same move).
3. The loop. For people, the reference alternates a gradient round with a line-search round
   (``x + eta*2^-j*D`` for ``j = 0..m-3``, plus the best candidate of the last gradient round
   and the current point; the oracle picks one). When the current point wins, the next
   gradient estimate is averaged with the previous ones (a running mean that resets on every
   move) - a momentum the paper does not have. Here the two-mode loop is ``line_search=True``
   and the running mean ``average_directions=True``, available with either estimator.
4. Shuffling. The reference shuffles the images it *displays* but maps the answer back
   through the permutation only in line-search mode; in gradient mode it reads display
   positions as candidate indices. Here candidates are shuffled (seeded) in both modes and the
   answer is always mapped back through the same permutation.

Driving it: ``ask()`` returns candidates, ``tell(ranking)`` takes the oracle's answer
(display indices, best first, top-k allowed, ``[]`` for "cannot tell"). :meth:`ZORankSGD.step`
does both with an oracle and an optional ``decode`` that maps the flat vector to what the
oracle judges (an image from a latent, a prompt embedding, a LoRA's weights). The state is
saved with :meth:`ZORankSGD.save` (safetensors + JSON, atomic) and resumed bit-for-bit with
:meth:`ZORankSGD.load`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch

log = logging.getLogger(__name__)

STATE_FORMAT = "vfeedback.zo_ranksgd/1"
STATE_JSON = "state.json"

__all__ = [
    "ZORankSGDConfig",
    "ZORankSGD",
    "dag_edges",
    "num_edges",
    "rank_weights",
    "rank_direction",
    "validate_ranking",
]


# --------------------------------------------------------------------------------------------
# the estimator


def num_edges(m: int, k: int) -> int:
    """Edges of the DAG of an (m, k)-ranking: ``k(k-1)/2`` among the ranked + ``k(m-k)``."""
    return k * (k - 1) // 2 + k * (m - k)


def validate_ranking(ranking: Sequence[int], m: int) -> list[int]:
    """``ranking`` as a list of distinct ints in ``[0, m)``; raises ValueError naming the fault."""
    try:
        out = [int(r) for r in ranking]
    except (TypeError, ValueError):
        raise ValueError(f"a ranking is a list of candidate indices, best first; got {ranking!r}") from None
    if any(isinstance(r, bool) for r in ranking):
        raise ValueError(f"a ranking holds integer indices, not booleans; got {ranking!r}")
    bad = [r for r in out if not 0 <= r < m]
    if bad:
        raise ValueError(f"ranking {out}: index {bad[0]} is outside 0..{m - 1} ({m} candidates were shown)")
    if len(set(out)) != len(out):
        raise ValueError(f"ranking {out} names a candidate twice")
    return out


def dag_edges(ranking: Sequence[int], m: int) -> list[tuple[int, int]]:
    """The DAG (§2.2) of an (m, k)-ranking as ``(better, worse)`` pairs.

    ``ranking`` lists the k best of ``m`` candidates, best first. Every ranked item beats the
    items ranked after it and every unranked item; unranked items are not compared.
    """
    ranking = validate_ranking(ranking, m)
    ranked = set(ranking)
    unranked = [i for i in range(m) if i not in ranked]
    edges = []
    for p, i in enumerate(ranking):
        edges.extend((i, j) for j in ranking[p + 1 :])
        edges.extend((i, j) for j in unranked)
    return edges


def rank_weights(ranking: Sequence[int], m: int, estimator: str = "paper") -> torch.Tensor:
    """Per-candidate weights ``w`` (float64, shape ``(m,)``) with ``D = sum_i w_i u_i``.

    ``paper``: ``w_i = (out-degree(i) - in-degree(i)) / |E|``, the edge average of §2.2 written
    per node: ``m-1-2p`` for rank ``p``, ``-k`` unranked; sums to 0. ``reference``: the
    reference code's ``(m-2p)`` / ``-k`` over the same ``|E|``. Empty ranking: all zeros.
    """
    ranking = validate_ranking(ranking, m)
    k = len(ranking)
    w = torch.zeros(m, dtype=torch.float64)
    if k == 0 or m < 2:
        return w
    if estimator == "paper":
        w[:] = -float(k)
        for p, i in enumerate(ranking):
            w[i] = m - 1 - 2 * p
    elif estimator == "reference":
        w[:] = -float(k)
        for p, i in enumerate(ranking):
            w[i] = m - 2 * p
    else:
        raise ValueError(f"estimator must be 'paper' or 'reference', got {estimator!r}")
    return w / num_edges(m, k)


def rank_direction(noise: torch.Tensor, ranking: Sequence[int], estimator: str = "paper", smoothing: float = 1.0) -> torch.Tensor:
    """Preference-ascent direction ``D`` from the noise ``u`` (``(m, d)``) and a ranking.

    ``paper``: ``D = -g = 1/|E| sum_{(i->j) in E} (u_i - u_j)`` (§2.2), in units of ``u``.
    ``reference``: the reference code's weights applied to ``x_i - x = smoothing * u_i``.
    Shape ``(d,)``, dtype and device of ``noise``.
    """
    m = noise.shape[0]
    w = rank_weights(ranking, m, estimator)
    if estimator == "reference":
        w = w * smoothing
    # A weighted sum of rows; the same torch op in every run, so results are reproducible.
    w = w.to(device=noise.device, dtype=noise.dtype)  # pragma: no mutate: placement (equivalent on CPU); the dtype is pinned by a test
    return (w[:, None] * noise).sum(0)


# --------------------------------------------------------------------------------------------
# configuration


@dataclass
class ZORankSGDConfig:
    """Settings of one ZO-RankSGD run. Every field is saved with the state."""

    num_candidates: int = 8
    """m: candidates shown per round (>= 2; >= 3 with the line search)."""
    smoothing: float = 0.1
    """mu: perturbation scale; gradient-round candidates are ``x + mu * u``, ``u ~ N(0, I)``."""
    step_size: float = 0.1
    """eta: ``x + eta * D`` (without line search), or the largest line-search step."""
    estimator: str = "paper"
    """'paper' (§2.2 edge average, in units of u) or 'reference' (the reference code's weights, in units of mu*u)."""
    line_search: bool = False
    """False: Algorithm 1 (one gradient round, one fixed step). True: the reference's human loop,
    gradient round then line-search round in which the oracle picks the next point."""
    line_search_points: Optional[int] = None
    """Step points ``x + eta*2^-j*D`` (j = 0..n-1) in a line-search round; default m - 2, so that
    with the previous best and the current point m candidates are shown."""
    average_directions: bool = True
    """Line search only: average successive gradient estimates while the current point keeps
    winning (the reference's running mean); reset on every move."""
    shuffle: bool = True
    """Show candidates in a seeded random order (so a person cannot tell the current point or the
    step sizes by position); answers are mapped back through the same permutation."""
    seed: int = 0
    """Seed of the generator behind the noise and the shuffles."""

    def __post_init__(self):
        errors = []
        if not isinstance(self.num_candidates, int) or self.num_candidates < 2:
            errors.append(f"num_candidates must be an integer >= 2, got {self.num_candidates!r}")
        if not (isinstance(self.smoothing, (int, float)) and math.isfinite(self.smoothing) and self.smoothing > 0):
            errors.append(f"smoothing (mu) must be a positive number, got {self.smoothing!r}")
        if not (isinstance(self.step_size, (int, float)) and math.isfinite(self.step_size) and self.step_size > 0):
            errors.append(f"step_size (eta) must be a positive number, got {self.step_size!r}")
        if self.estimator not in ("paper", "reference"):
            errors.append(f"estimator must be 'paper' or 'reference', got {self.estimator!r}")
        if self.line_search:
            n = self.ls_points
            if n < 1:
                errors.append(
                    f"line_search needs at least one step point: num_candidates={self.num_candidates} leaves "
                    f"{n}; use num_candidates >= 3 or set line_search_points"
                )
        if errors:
            raise ValueError("ZORankSGDConfig: " + "; ".join(errors))
        self.smoothing = float(self.smoothing)
        self.step_size = float(self.step_size)

    @property
    def ls_points(self) -> int:
        return self.line_search_points if self.line_search_points is not None else self.num_candidates - 2


# --------------------------------------------------------------------------------------------
# the optimiser


Ranking = Sequence[int]


def _call_oracle(oracle, items) -> list[int]:
    if hasattr(oracle, "rank"):
        return list(oracle.rank(items))
    if callable(oracle):
        return list(oracle(items))
    raise TypeError(f"an oracle is a callable or has .rank(candidates); got {type(oracle).__name__}")


class ZORankSGD:
    """ZO-RankSGD over a flat parameter vector, driven one round at a time.

    ``x0``: the starting point, any shape (a latent ``(4, 64, 64)``, an embedding, a LoRA's
    flattened weights); it is flattened internally and candidates come back in its shape.
    Floating dtypes below float32 are computed in float32.

    Round protocol: ``cands = opt.ask()`` (``(n, *x0.shape)``, display order), show them to the
    oracle, ``opt.tell(ranking)`` with display indices best first. In a gradient round any
    top-k is used; in a line-search round only the first (the pick). ``tell([])`` means "cannot
    tell": the round is recorded and nothing moves.
    """

    def __init__(self, x0: torch.Tensor, config: Optional[ZORankSGDConfig] = None, **overrides):
        if config is None:
            config = ZORankSGDConfig(**overrides)
        elif overrides:
            config = ZORankSGDConfig(**{**asdict(config), **overrides})
        self.config = config
        if not isinstance(x0, torch.Tensor):
            x0 = torch.as_tensor(x0)
        if not x0.is_floating_point():
            x0 = x0.to(torch.float32)
        if x0.dtype in (torch.float16, torch.bfloat16):
            x0 = x0.to(torch.float32)
        if x0.numel() == 0:
            raise ValueError("x0 is empty: ZO-RankSGD needs at least one parameter")
        self.shape = tuple(x0.shape)
        self.x = x0.detach().reshape(-1).clone()
        self.direction = torch.zeros_like(self.x)
        self.n_averaged = 0
        self.prev_best: Optional[torch.Tensor] = None
        self.round = 0
        self.mode = "gradient"
        self.n_queries = 0
        self.history: list[dict[str, Any]] = []
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(int(config.seed))
        # The open round (after ask, before tell).
        self._pending: Optional[dict[str, Any]] = None

    # ---------------------------------------------------------------- properties

    @property
    def dim(self) -> int:
        return self.x.numel()

    def current(self) -> torch.Tensor:
        """The current point in the shape of ``x0``."""
        return self.x.reshape(self.shape)

    # ---------------------------------------------------------------- ask / tell

    def ask(self) -> torch.Tensor:
        """The candidates of the current round, ``(n, *x0.shape)``, in display order.

        Idempotent until :meth:`tell`: asking twice returns the same candidates (a GUI may
        re-render, a resumed session shows what was on screen).
        """
        if self._pending is None:
            self._pending = self._open_round()
        pts = self._pending["points"]
        perm = self._pending["perm"]
        return pts[perm].reshape(len(perm), *self.shape)

    def labels(self) -> list[str]:
        """What each displayed candidate is (display order), for logs or an operator's view."""
        self.ask()
        roles = self._pending["roles"]
        return [roles[i] for i in self._pending["perm"]]

    def _noise(self, n: int) -> torch.Tensor:
        # Drawn on the CPU generator (reproducible on any device), then moved.
        u = torch.randn((n, self.dim), generator=self.generator, dtype=self.x.dtype)
        return u.to(self.x.device)

    def _perm(self, n: int) -> list[int]:
        if not self.config.shuffle:
            return list(range(n))
        return torch.randperm(n, generator=self.generator).tolist()

    def _open_round(self) -> dict[str, Any]:
        cfg = self.config
        if self.mode == "gradient":
            u = self._noise(cfg.num_candidates)
            points = self.x[None, :] + cfg.smoothing * u
            roles = [f"perturbation {i}" for i in range(cfg.num_candidates)]
            pending = {"mode": "gradient", "noise": u, "points": points, "roles": roles}
        else:
            steps = [cfg.step_size * 2.0**-j for j in range(cfg.ls_points)]
            rows = [self.x + s * self.direction for s in steps]
            roles = [f"step eta*2^-{j}" for j in range(len(steps))]
            if self.prev_best is not None:
                rows.append(self.prev_best)
                roles.append("previous best")
            rows.append(self.x)
            roles.append("current")
            pending = {"mode": "line_search", "noise": None, "points": torch.stack(rows), "roles": roles}
        pending["perm"] = self._perm(len(pending["roles"]))
        return pending

    def tell(self, ranking: Ranking) -> dict[str, Any]:
        """Apply the oracle's answer to the open round; returns the history entry it adds.

        ``ranking``: display indices of the candidates from :meth:`ask`, best first; fewer than
        all for a top-k answer; ``[]`` to skip the round.
        """
        if self._pending is None:
            raise RuntimeError("tell() before ask(): ask for the candidates first, then tell their ranking")
        pend = self._pending
        perm = pend["perm"]
        answer = validate_ranking(ranking, len(perm))
        internal = [perm[i] for i in answer]  # un-shuffle: display position -> candidate index
        entry: dict[str, Any] = {"round": self.round, "mode": pend["mode"], "answer": answer, "ranking": internal}
        cfg = self.config
        if pend["mode"] == "gradient":
            if not internal:
                entry["event"] = "skipped"
            else:
                d = rank_direction(pend["noise"], internal, cfg.estimator, cfg.smoothing)
                if not cfg.line_search:
                    # Algorithm 1: x_{t+1} = x_t - eta * g_t  (= x_t + eta * D_t)
                    self.direction = d
                    self.x = self.x + cfg.step_size * d
                    entry["event"] = "step"
                else:
                    if cfg.average_directions:
                        # reference: running mean of the estimates since the last move
                        self.direction = (self.direction * self.n_averaged + d) / (self.n_averaged + 1)
                        self.n_averaged += 1
                    else:
                        self.direction = d
                        self.n_averaged = 1
                    self.prev_best = pend["points"][internal[0]].clone()
                    self.mode = "line_search"
                    entry["event"] = "estimated"
                    entry["averaged"] = self.n_averaged
        else:
            roles = pend["roles"]
            pick = internal[0] if internal else None
            role = roles[pick] if pick is not None else "current"
            entry["pick"] = role
            if role == "current":
                entry["event"] = "stayed"  # keep x and the averaged direction; estimate again
            else:
                self.x = pend["points"][pick].clone()
                self.direction = torch.zeros_like(self.x)
                self.n_averaged = 0
                entry["event"] = "moved"
            self.prev_best = None
            self.mode = "gradient"
        self.n_queries += len(perm)
        entry["queries"] = self.n_queries
        self.history.append(entry)
        self.round += 1
        self._pending = None
        return entry

    def step(self, oracle, decode: Optional[Callable[[torch.Tensor], Any]] = None) -> dict[str, Any]:
        """One round: ask, show (``decode`` maps each candidate, shaped like ``x0``, to what the
        oracle judges; default: the candidates tensor itself), tell. Returns the history entry."""
        cands = self.ask()
        items = cands if decode is None else [decode(c) for c in cands]
        return self.tell(_call_oracle(oracle, items))

    def run(self, oracle, rounds: int, decode=None, checkpoint_dir: Optional[Union[str, os.PathLike]] = None, callback=None) -> torch.Tensor:
        """``rounds`` rounds of :meth:`step`, saving to ``checkpoint_dir`` after each; returns x."""
        for _ in range(rounds):
            entry = self.step(oracle, decode)
            if checkpoint_dir is not None:
                self.save(checkpoint_dir)
            if callback is not None:
                callback(self, entry)
        return self.current()

    # ---------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """``{"tensors": {name: Tensor}, "meta": JSON-able dict}``: everything needed to resume."""
        tensors = {
            "x": self.x,
            "direction": self.direction,
            "rng_state": self.generator.get_state(),
        }
        if self.prev_best is not None:
            tensors["prev_best"] = self.prev_best
        meta: dict[str, Any] = {
            "format": STATE_FORMAT,
            "config": asdict(self.config),
            "shape": list(self.shape),
            "dtype": str(self.x.dtype).replace("torch.", ""),
            "round": self.round,
            "mode": self.mode,
            "n_averaged": self.n_averaged,
            "n_queries": self.n_queries,
            "history": self.history,
            "pending": None,
        }
        if self._pending is not None:
            p = self._pending
            tensors["pending_points"] = p["points"]
            if p["noise"] is not None:
                tensors["pending_noise"] = p["noise"]
            meta["pending"] = {"mode": p["mode"], "perm": p["perm"], "roles": p["roles"]}
        return {"tensors": tensors, "meta": meta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        meta, t = state["meta"], state["tensors"]
        if meta.get("format") != STATE_FORMAT:
            raise ValueError(f"not a ZO-RankSGD state (format {meta.get('format')!r}, expected {STATE_FORMAT!r})")
        dev = self.x.device
        self.config = ZORankSGDConfig(**{f.name: meta["config"][f.name] for f in fields(ZORankSGDConfig) if f.name in meta["config"]})
        self.shape = tuple(meta["shape"])
        self.x = t["x"].to(dev).clone()
        self.direction = t["direction"].to(dev).clone()
        self.prev_best = t["prev_best"].to(dev).clone() if "prev_best" in t else None
        self.generator = torch.Generator(device="cpu")
        self.generator.set_state(t["rng_state"].to(torch.uint8).cpu())
        self.round = int(meta["round"])
        self.mode = meta["mode"]
        self.n_averaged = int(meta["n_averaged"])
        self.n_queries = int(meta["n_queries"])
        self.history = list(meta["history"])
        p = meta.get("pending")
        if p is None:
            self._pending = None
        else:
            self._pending = {
                "mode": p["mode"],
                "perm": list(p["perm"]),
                "roles": list(p["roles"]),
                "points": t["pending_points"].to(dev).clone(),
                "noise": t["pending_noise"].to(dev).clone() if "pending_noise" in t else None,
            }

    def save(self, directory: Union[str, os.PathLike]) -> Path:
        """Write the state into ``directory`` atomically; returns the JSON path.

        Tensors go to a fresh ``tensors-*.safetensors`` (temp file + rename), then ``state.json``
        (temp file + rename) names that file and its SHA-256: the JSON rename is the commit
        point, so a crash at any moment leaves the previous state or the new one, never a mix.
        Older tensor files are removed afterwards.
        """
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        state = self.state_dict()
        tensors = {k: v.detach().contiguous().cpu() for k, v in state["tensors"].items()}
        name = f"tensors-{self.round:06d}-{uuid.uuid4().hex[:8]}.safetensors"
        fd, tmp = tempfile.mkstemp(prefix=".tensors-", suffix=".tmp", dir=d)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"format": STATE_FORMAT, "round": str(self.round)})
            _fsync(tmp)
            os.replace(tmp, d / name)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        meta = dict(state["meta"], tensors_file=name, tensors_sha256=_sha256(d / name))
        _atomic_write_text(d / STATE_JSON, json.dumps(meta, indent=1))
        for old in d.glob("tensors-*.safetensors"):
            if old.name != name:
                try:
                    old.unlink()
                except OSError:  # another process may be reading it; harmless to leave
                    pass
        return d / STATE_JSON

    @classmethod
    def load(cls, directory: Union[str, os.PathLike], device: Union[str, torch.device, None] = None) -> "ZORankSGD":
        """A new optimiser from ``directory`` (written by :meth:`save`); continues the same path."""
        from safetensors.torch import load_file

        d = Path(directory)
        jp = d / STATE_JSON if d.is_dir() else d
        d = jp.parent
        if not jp.exists():
            raise FileNotFoundError(f"{jp}: no ZO-RankSGD state here (save() writes {STATE_JSON} into the directory)")
        meta = json.loads(jp.read_text())
        tp = d / meta["tensors_file"]
        if not tp.exists():
            raise FileNotFoundError(f"{tp}: the tensors file named by {jp} is missing")
        if _sha256(tp) != meta["tensors_sha256"]:
            raise ValueError(f"{tp}: checksum does not match {jp}; the state is damaged")
        tensors = load_file(str(tp))
        x = tensors["x"]
        if device is not None:
            x = x.to(device)
        cfg = ZORankSGDConfig(**{f.name: meta["config"][f.name] for f in fields(ZORankSGDConfig) if f.name in meta["config"]})
        opt = cls(x.reshape(meta["shape"]), cfg)
        opt.load_state_dict({"tensors": tensors, "meta": meta})
        return opt


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
