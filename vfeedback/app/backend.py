"""What the ranking app does, without the UI: one backend per mode, all answers in the store.

A backend shows one *round* at a time (:meth:`Backend.view`: a prompt and its candidate images)
and takes one answer for it (:meth:`Backend.answer`: picks best first, ``tie`` or ``skip``),
committing it to :class:`~vfeedback.feedback.store.FeedbackStore` before it returns. Every shown
candidate set has an id, ``r<round>-<digest>`` (:func:`round_id_of`: the first 16 hex digits of a
SHA-256 over the mode, the round, the prompt and the pixels shown), and an answer must name the
id it answers: an id that is not the round on screen is refused (``stale_round``, 409), a
different answer to an answered id too (``already_answered``, 409), and the same answer again
returns the stored result without storing anything (a retry after a lost reply or a crash).
An undo names the answer it takes back (:meth:`Backend.undo`: the round id and the answer id
that ``answer`` returned) and is refused (``stale_undo``, 409) unless that answer is still the
newest counted one: a later round was answered since, it was undone already, or the round was
answered by another client (another answer id). It never takes back any other answer.
Refusals are :class:`AnswerError`: a code, an HTTP-style status and a message, never a traceback. Everything a
backend keeps in memory is rebuilt from the store and the config when the app starts again:

* :class:`ZOBackend` drives a :class:`~vfeedback.algorithms.zo_ranksgd_diffusion.RankingSession`;
  each answer row carries the session state after the answer (optimiser tensors + start point as
  safetensors bytes), so a restart restores the optimiser exactly and shows the same round.
* :class:`D3POBackend` shows groups of ``rank.group_size`` images of one prompt drawn from one
  shared initial latent by the *base* model with
  :func:`~vfeedback.algorithms.d3po.sample_items`, each image named by its seeds (so the stored
  label is the D3PO preference record that rebuilds it). After ``rank.labels_per_update`` new
  labels it starts :func:`start_d3po_update`: offline D3PO on every label so far, as a
  ``vfeedback train`` subprocess into ``OUT/updates/update-NNN/``.
* :class:`GalleryBackend` renders each prompt x seed with every model of ``rank.gallery``
  (shared seeds, shown in a seeded random order) and stores the ranking with each image's model,
  seeds, PNG and trajectory.

Run folder of the app (``output_dir``)::

    OUT/config.yaml         the resolved config (the first start)
    OUT/feedback.sqlite     every answer (schema: vfeedback/feedback/store.py, docs/rank_app.md)
    OUT/rank/zo/current-NNNNNN.png      zo_ranksgd: the current point after each round (history strip)
    OUT/rank/d3po/round-NNNNNN-K.png    d3po: the images shown
    OUT/rank/gallery/round-NNNNNN/      gallery: one PNG per model + trajectories.safetensors
    OUT/updates/update-NNN/             d3po: each background update's run folder (lora/, samples/before_after.png)
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import UserError
from ..feedback.store import KINDS, LOCK_SUFFIX, STORE_FILE, FeedbackStore, RoundAnswered, StoreError, ranks_from_ranking

log = logging.getLogger(__name__)

__all__ = ["RoundView", "Backend", "ZOBackend", "D3POBackend", "GalleryBackend", "open_backend", "resolve_mode",
           "start_d3po_update", "AnswerError", "parse_answer", "parse_undo", "round_id_of"]

#: config fields a resumed app may not change (they decide what each stored round showed)
FINGERPRINT_FIELDS = ("seed", "model", "prompts", "sampling", "zo_ranksgd", "rank.mode", "rank.group_size", "rank.gallery",
                      "rank.gallery_seeds", "rank.gallery_prompts", "d3po.group_size")


@dataclass
class RoundView:
    """One round as the UI shows it."""

    mode: str
    round: int
    prompt: str
    images: list  # PIL images, display order
    title: str  # e.g. "gradient round" / "line search"
    instructions: str
    max_picks: int  # picks allowed (1: pick the single best)
    allow_tie: bool = False
    done: bool = False  # no rounds left (gallery)
    captions: list = field(default_factory=list)
    round_id: str = ""  # set by Backend.view (round_id_of)


def round_id_of(v: RoundView) -> str:
    """``r<round>-<16 hex>``: the round number and the first 16 hex digits of a SHA-256 over the
    mode, round, prompt, pick rules and every shown image's size and RGB bytes: the id of exactly
    what the person saw. A restart that renders the same pixels gives the same id."""
    h = hashlib.sha256(json.dumps([v.mode, v.round, v.prompt, v.max_picks, v.allow_tie, v.done]).encode("utf-8"))
    for im in v.images:
        im = im.convert("RGB")
        h.update(json.dumps(list(im.size)).encode("ascii"))
        h.update(im.tobytes())
    return f"r{v.round}-{h.hexdigest()[:16]}"


ROUND_ID_RE = re.compile(r"r[0-9]{1,12}-[0-9a-f]{16}")
MAX_PICKS_FIELD = 4096  # characters of a ranking string / entries of a ranking list


class AnswerError(Exception):
    """An answer (or undo) the app refuses. ``code``: bad_request (400: the body is malformed), stale_round /
    already_answered / done / stale_undo / nothing_to_undo (409: it conflicts with the stored rounds), bad_pick / too_many_picks /
    tie_not_allowed (422: not a valid answer to the round it names). ``detail``: extra fields for
    the client, e.g. ``field`` or ``current_round_id``. Nothing was stored when this is raised."""

    def __init__(self, code: str, status: int, message: str, **detail):
        super().__init__(message)
        self.code, self.status, self.message, self.detail = code, status, message, detail

    def to_json(self) -> dict:
        return {"ok": False, "code": self.code, "status": self.status, "error": self.message, **self.detail}


def _bad(field_: str, message: str) -> AnswerError:
    return AnswerError("bad_request", 400, f"{field_}: {message}", field=field_)


USER_MAX = 64


def parse_user(user: Any) -> Optional[str]:
    """The user box's value: a name of at most :data:`USER_MAX` printable characters, trimmed;
    ``None`` or blank: no name. Raises :class:`AnswerError` ``bad_request`` naming the field."""
    if user is None:
        return None
    if not isinstance(user, str):
        raise _bad("user", f"expected your name as text, got {_show(user)}")
    name = " ".join(user.split())
    if len(name) > USER_MAX or not name.isprintable():
        raise _bad("user", f"a name of at most {USER_MAX} printable characters, got {_show(user)}")
    return name or None


def parse_answer(round_id: Any, ranking: Any, kind: Any) -> tuple[str, str, list[int]]:
    """Validate a raw answer (any JSON value in each slot) into ``(round_id, kind, picks)``.

    ``round_id``: the id from ``/status`` (``r<round>-<16 hex>``); ``ranking``: display indices,
    0-based, best first, as ``"2,0,5"`` or ``[2, 0, 5]`` (``""`` / ``[]``: none); ``kind``: rank,
    tie or skip. Raises :class:`AnswerError` ``bad_request`` naming the field; range checks against
    the round are :meth:`Backend.answer`'s."""
    if not isinstance(round_id, str) or not ROUND_ID_RE.fullmatch(round_id):
        raise _bad("round_id", f"expected the round's id from /status (like 'r0-0123456789abcdef'), got {_show(round_id)}")
    if not isinstance(kind, str) or kind not in KINDS:
        raise _bad("kind", f"expected one of {', '.join(KINDS)}, got {_show(kind)}")
    if isinstance(ranking, str):
        if len(ranking) > MAX_PICKS_FIELD:
            raise _bad("ranking", f"{len(ranking)} characters; a ranking lists display indices, e.g. '2,0,5'")
        parts = [x.strip() for x in ranking.split(",")]
        if parts == [""]:
            parts = []
        if not all(re.fullmatch(r"-?[0-9]{1,9}", x) for x in parts):
            raise _bad("ranking", f"expected display indices separated by commas, best first (e.g. '2,0,5'), got {_show(ranking)}")
        picks = [int(x) for x in parts]
    elif isinstance(ranking, list):
        if len(ranking) > MAX_PICKS_FIELD or not all(isinstance(x, int) and not isinstance(x, bool) for x in ranking):
            raise _bad("ranking", f"expected a list of display indices (integers), best first, got {_show(ranking)}")
        picks = list(ranking)
    else:
        raise _bad("ranking", f"expected display indices as '2,0,5' or [2, 0, 5], got {_show(ranking)}")
    if kind != "rank" and picks:
        raise _bad("ranking", f"a {kind} takes no picks, got {picks[:10]}")
    return round_id, kind, picks


def parse_undo(round_id: Any, answer_id: Any) -> tuple[str, int]:
    """Validate a raw undo (any JSON value in each slot) into ``(round_id, answer_id)``: the
    ``answered`` and ``answer_id`` of the reply to the answer being taken back. Raises
    :class:`AnswerError` ``bad_request`` naming the field."""
    if not isinstance(round_id, str) or not ROUND_ID_RE.fullmatch(round_id):
        raise _bad("round_id", "expected the id of the round to undo (the 'answered' of the reply to your answer, like "
                               f"'r0-0123456789abcdef'), got {_show(round_id)}")
    if type(answer_id) is not int or not 0 < answer_id < 2**63:  # bool is an int subclass: refused
        raise _bad("answer_id", f"expected the 'answer_id' of the reply to your answer (a positive integer), got {_show(answer_id)}")
    return round_id, answer_id


def _round_of(round_id: str) -> int:
    """The 1-based round number of a well-formed round id (``r<round>-...``), for messages."""
    return int(round_id[1:].split("-", 1)[0]) + 1


def _show(x: Any) -> str:
    r = repr(x)
    return (r[:60] + "...") if len(r) > 60 else r


def resolve_mode(cfg) -> str:
    mode = cfg.rank.mode
    if mode is None:
        if cfg.algorithm in ("zo_ranksgd", "d3po"):
            return cfg.algorithm
        raise UserError(f"rank.mode: algorithm {cfg.algorithm!r} has no ranking mode; set rank.mode to zo_ranksgd, d3po or gallery")
    return mode


def _fingerprint(cfg) -> dict:
    data = json.loads(cfg.model_dump_json())
    out = {}
    for key in FINGERPRINT_FIELDS:
        v = data
        for part in key.split("."):
            v = v.get(part) if isinstance(v, dict) else None
        out[key] = v
    return out


def _upscale(img, size: int):
    """Nearest-neighbour upscale of a PIL image to ``size`` px on its long side (never down)."""
    from PIL import Image

    w, h = img.size
    s = max(1, size // max(w, h))
    return img.resize((w * s, h * s), Image.NEAREST) if s > 1 else img


def _pil(t: torch.Tensor, size: int):
    from rewards.images import to_pil

    return _upscale(to_pil(t)[0], size)


# --------------------------------------------------------------------------------------------
# the common part


class Backend:
    mode = "?"

    def __init__(self, cfg, root: Path, store: FeedbackStore, annotator: Optional[str] = None):
        self.cfg = cfg
        self.root = Path(root)
        self.store = store
        self.annotator = annotator or cfg.rank.annotator
        self.size = cfg.rank.display_size
        self.lock = threading.RLock()
        self._view: Optional[RoundView] = None

    # -- what the UI calls
    def view(self) -> RoundView:
        with self.lock:
            if self._view is None:
                v = self._make_view()
                v.round_id = round_id_of(v)
                self._view = v
            return self._view

    def answer(self, round_id: Any, kind: Any, ranking: Any, user: Any = None) -> dict:
        """Commit an answer to the round ``round_id`` names; returns ``{"ok": True, "message",
        "answer_id", "answered": round_id, "replayed"}``. ``replayed`` is true when that very
        answer was stored before (nothing is stored again). Raises :class:`AnswerError` (nothing
        stored) for a malformed answer, an id that is not the round on screen, a different answer
        to an answered round, or picks the round does not allow. Inputs are validated with
        :func:`parse_answer`, so they may be any JSON values. ``user``: who answers (the user box;
        :func:`parse_user`), stored with the answer."""
        round_id, kind, ranking = parse_answer(round_id, ranking, kind)
        user = parse_user(user)
        with self.lock:
            done = self.store.answer_for(self.mode, round_id)
            if done is not None:
                if done.kind == kind and done.ranking == ranking:
                    return {"ok": True, "replayed": True, "answer_id": done.id, "answered": round_id,
                            "message": f"This answer was saved already (answer {done.id}, round {done.round + 1}); nothing changed."}
                raise AnswerError("already_answered", 409,
                                  f"round {done.round + 1} ({round_id}) was answered already ({done.kind} {done.ranking}); "
                                  "your answer is not stored. Reload to see the current round.",
                                  answered_with={"kind": done.kind, "ranking": done.ranking}, current_round_id=self.view().round_id)
            v = self.view()
            if round_id != v.round_id:
                raise AnswerError("stale_round", 409,
                                  f"{round_id} is not the round on screen (now round {v.round + 1}, {v.round_id}); "
                                  "your answer is not stored. Reload to see the current round.", current_round_id=v.round_id)
            if v.done:
                raise AnswerError("done", 409, "nothing left to rank", current_round_id=v.round_id)
            n = len(v.images)
            if kind == "tie" and not v.allow_tie:
                raise AnswerError("tie_not_allowed", 422, "tie is not an answer in this mode; use skip")
            if kind == "rank":
                if not ranking:
                    raise AnswerError("bad_pick", 422, "pick at least one image (click it), or skip")
                if len(set(ranking)) != len(ranking) or any(not 0 <= i < n for i in ranking):
                    raise AnswerError("bad_pick", 422, f"picks {ranking[:10]} must be distinct indices in 0..{n - 1}")
                if len(ranking) > v.max_picks:
                    raise AnswerError("too_many_picks", 422, f"{len(ranking)} picks; this round takes at most {v.max_picks}",
                                      max_picks=v.max_picks)
            try:
                aid, msg = self._answer(v, kind, ranking, user)
            except RoundAnswered:  # the store's unique index; the checks above make this unreachable in one process
                raise AnswerError("already_answered", 409, f"round {v.round + 1} ({round_id}) was answered already") from None
            finally:  # stored or not (a fault after the commit, e.g. starting an update): draw the view from the store again
                self._view = None
            return {"ok": True, "replayed": False, "answer_id": aid, "answered": round_id, "message": msg}

    def undo(self, round_id: Any, answer_id: Any) -> dict:
        """Take back the answer ``answer_id`` to the round ``round_id`` (both from the reply to
        that answer); returns ``{"ok": True, "undone": round_id, "answer_id", "message"}``. Only the
        newest counted answer of this mode can be undone, and only by naming both its round and its
        id. Raises :class:`AnswerError` (nothing changed): ``bad_request`` (400) for malformed
        values, ``nothing_to_undo`` (409) when no answer counts, ``stale_undo`` (409) when the
        round has no counted answer (never answered, or undone already), was answered by another
        client (another answer id), or is no longer the last answered round. ``stale_undo``
        carries ``counted``: whether the named answer still counts (a client may keep it to undo
        later, after the newer answers are undone)."""
        round_id, answer_id = parse_undo(round_id, answer_id)
        n = _round_of(round_id)
        with self.lock:
            last = self.store.last(self.mode)
            if last is None:
                raise AnswerError("nothing_to_undo", 409, f"round {n} ({round_id}): there is no counted answer to undo; nothing changed",
                                  counted=False)
            named = self.store.answer_for(self.mode, round_id)
            if named is None:
                raise AnswerError("stale_undo", 409, f"round {n} ({round_id}) has no counted answer (never answered here, or undone "
                                  "already); nothing was undone. Reload to see the current round.", counted=False,
                                  last_round_id=last.round_id)
            if named.id != answer_id:
                raise AnswerError("stale_undo", 409, f"round {n} ({round_id}) was answered by another client (not by your answer "
                                  f"{answer_id}); nothing was undone. Only the client that gave an answer can "
                                  "undo it.", counted=False, last_round_id=last.round_id)
            if named.id != last.id:
                raise AnswerError("stale_undo", 409, f"round {n} ({round_id}) is no longer the last answered round (round "
                                  f"{last.round + 1}, {last.round_id}, was answered after it); nothing was undone. Only the newest "
                                  "answer can be undone: undo the newer ones first, from the client that gave them.",
                                  counted=True, last_round_id=last.round_id)
            if not self.store.undo_answer(self.mode, named.id):  # the store's own check; unreachable within one process
                raise AnswerError("stale_undo", 409, f"round {n} ({round_id}) is no longer the last answered round; nothing was "
                                  "undone. Reload to see the current round.", counted=True)
            self._undone(named)
            self._view = None
            return {"ok": True, "undone": round_id, "answer_id": named.id,
                    "message": f"Undid your answer to round {named.round + 1}; it is shown again."}

    def count(self) -> int:
        return self.store.count(self.mode)

    def side(self) -> dict:
        """Extra panels: {"current": PIL | None, "history": [(PIL, caption)], "update": dict | None}."""
        return {}

    def status(self) -> dict:
        v = self.view()
        return {"mode": self.mode, "round": v.round, "round_id": v.round_id, "prompt": v.prompt, "candidates": len(v.images),
                "title": v.title, "max_picks": v.max_picks, "allow_tie": v.allow_tie, "answers": self.count(), "done": v.done}

    # -- per mode
    def _make_view(self) -> RoundView:
        raise NotImplementedError

    def _answer(self, v: RoundView, kind: str, ranking: list[int], user: Optional[str] = None) -> tuple[int, str]:
        """Commit a checked answer to ``v``; returns (the stored answer's id, a message)."""
        raise NotImplementedError

    def _undone(self, answer) -> None:
        pass

    def close(self) -> None:
        """Close the store (drops its writer lock)."""
        self.store.close()


# --------------------------------------------------------------------------------------------
# ZO-RankSGD


def _state_bytes(session) -> bytes:
    """The session (optimiser state + start point) as safetensors bytes with the JSON meta inside."""
    from safetensors.torch import save

    st = session.opt.state_dict()
    tensors = {k: v.detach().contiguous().cpu() for k, v in st["tensors"].items()}
    tensors["x0"] = session.x0.contiguous()
    return save(tensors, metadata={"meta": json.dumps(st["meta"])})


def _read_state(blob: bytes) -> tuple[dict, dict]:
    from safetensors.torch import load

    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8 : 8 + n])
    return load(blob), json.loads(header["__metadata__"]["meta"])


class ZOBackend(Backend):
    mode = "zo_ranksgd"

    def __init__(self, cfg, root, store, annotator=None, model=None):
        super().__init__(cfg, root, store, annotator)
        from ..algorithms.zo_ranksgd_diffusion import RankingSession, build_target, load_model_for

        self.model = model if model is not None else load_model_for(cfg)
        self.dir = self.root / "rank" / "zo"
        self.dir.mkdir(parents=True, exist_ok=True)
        last = store.last(self.mode)
        if last is None:
            self.session = RankingSession.from_config(cfg, model=self.model)
            self.target = self.session.target
        else:
            self.target = build_target(self.model, cfg)
            self.session = self._session_from(store.state_of(last.id))
        self._save_current()
        if cfg.zo_ranksgd.top_k is not None:
            self.top_k = cfg.zo_ranksgd.top_k
        else:
            self.top_k = cfg.zo_ranksgd.num_candidates

    def _session_from(self, blob: Optional[bytes]):
        from ..algorithms.zo_ranksgd import ZORankSGD, ZORankSGDConfig
        from ..algorithms.zo_ranksgd_diffusion import RankingSession
        from dataclasses import fields

        if blob is None:  # back to the start (undo of the first answer): same start point, fresh optimiser
            x0 = self.session.x0
            return RankingSession(self.target, ZORankSGD(x0, RankingSession.optimizer_config(self.cfg)), x0)
        tensors, meta = _read_state(blob)
        x0 = tensors.pop("x0")
        cfg = ZORankSGDConfig(**{f.name: meta["config"][f.name] for f in fields(ZORankSGDConfig) if f.name in meta["config"]})
        opt = ZORankSGD(tensors["x"].reshape(meta["shape"]), cfg)
        opt.load_state_dict({"tensors": tensors, "meta": meta})
        return RankingSession(self.target, opt, x0)

    def _current_png(self, r: int) -> Path:
        return self.dir / f"current-{r:06d}.png"

    def _save_current(self) -> None:
        from ..algorithms.zo_ranksgd_diffusion import tile
        from rewards.images import to_pil

        r = self.session.round
        imgs = self.session.start_images() if r == 0 else self.session.current_images()
        p = self._current_png(r)
        to_pil(tile(imgs))[0].save(p.with_suffix(".tmp.png"))
        os.replace(p.with_suffix(".tmp.png"), p)

    def _make_view(self) -> RoundView:
        from ..algorithms.zo_ranksgd_diffusion import tile

        c = self.session.ask()
        ls = c.mode == "line_search"
        if ls:
            title = "Line search: pick the single best"
            instr = "One of these is the current image, the others are steps along the estimated direction. Click the best one, then Submit."
        else:
            title = "Gradient round: pick the best few, best first"
            instr = (f"Click the best image, then the next best, ... (up to {self.top_k}); the number on each is its place. "
                     "Submit when done.")
        images = [_pil(tile(im), self.size) for im in c.images]
        prompt = c.prompts[0] if len(set(c.prompts)) == 1 else "; ".join(dict.fromkeys(c.prompts))
        return RoundView(self.mode, c.round, prompt, images, title, instr, 1 if ls else self.top_k)

    def _answer(self, v: RoundView, kind: str, ranking: list[int], user: Optional[str] = None) -> tuple[int, str]:
        c = self.session.ask()
        labels = list(c.labels)
        entry = self.session.tell(ranking)
        try:
            state = _state_bytes(self.session)
            ctx = {"round_mode": c.mode, "labels": labels, "event": entry.get("event"), "pick": entry.get("pick"),
                   "ranking_internal": entry.get("ranking"), "queries": entry.get("queries")}
            items = [{"label": lab} for lab in labels]
            aid = self.store.add_answer(self.mode, v.round, kind, v.prompt, ranking, items, context=ctx, state=state,
                                        annotator=self.annotator, round_id=v.round_id, user=user)
        except BaseException:  # not stored: the optimiser goes back to the stored state
            self._undone(None)
            raise
        self._save_current()
        ev = entry.get("event")
        return aid, {"estimated": "Direction estimated; next: the line search.", "moved": f"Moved to the picked image ({entry.get('pick')}).",
                     "stayed": "The current image stays; estimating again.", "skipped": "Skipped (cannot tell).",
                     "step": "Stepped along the estimated direction."}.get(ev, "Saved.")

    def _undone(self, answer) -> None:
        last = self.store.last(self.mode)
        self.session = self._session_from(None if last is None else self.store.state_of(last.id))

    def side(self) -> dict:
        from PIL import Image

        r = self.session.round
        files = [(k, self._current_png(k)) for k in range(r + 1)]
        files = [(k, f) for k, f in files if f.exists()][-12:]
        hist = [(_upscale(Image.open(f).convert("RGB"), 96), "start" if k == 0 else f"round {k}") for k, f in files]
        cur = self._current_png(r)
        out = {"current": _upscale(Image.open(cur).convert("RGB"), self.size) if cur.exists() else None, "history": hist}
        if self.cfg.rank.probe_reward:
            from .probes import zo_curve_png

            pts = self.check_points()
            curve = self.dir / "check_curve.png"
            key = json.dumps(pts)
            if key != getattr(self, "_curve_key", None) or not curve.exists():
                zo_curve_png(pts, curve, self.cfg.rank.probe_reward)
                self._curve_key = key
            out["check"] = {"points": pts, "reward": self.cfg.rank.probe_reward, "curve": str(curve)}
        return out

    def check_points(self) -> list[dict]:
        """With ``rank.probe_reward``: ``[{"round": k, "score": P}]``, the check's score of the current
        image after each round so far (round 0: the start image), read from the saved PNGs (cached
        per file). One prompt only (the PNG is that image); several prompts score NaN."""
        import rewards
        from torchvision.transforms.functional import to_tensor
        from PIL import Image

        prompts = list(dict.fromkeys(self.session.target.prompts()))
        judge = rewards.load(self.cfg.rank.probe_reward)
        cache = self.__dict__.setdefault("_check_cache", {})
        pts = []
        for k in range(self.session.round + 1):
            f = self._current_png(k)
            if not f.exists():
                continue
            key = (k, f.stat().st_mtime_ns)
            if key not in cache:
                if len(prompts) != 1:
                    cache[key] = float("nan")
                else:
                    with torch.no_grad():
                        cache[key] = float(judge(to_tensor(Image.open(f).convert("RGB"))[None], prompts)[0])
            pts.append({"round": k, "score": cache[key]})
        return pts

    def status(self) -> dict:
        s = super().status()
        if self.cfg.rank.probe_reward:
            pts = self.check_points()
            s["check"] = {"reward": self.cfg.rank.probe_reward, "start": pts[0]["score"] if pts else None,
                          "now": pts[-1]["score"] if pts else None, "points": pts}
        s["optimizer_round"] = self.session.round
        s["round_mode"] = self.session.opt.mode if self.session.opt._pending is None else self.session.opt._pending["mode"]
        return s


# --------------------------------------------------------------------------------------------
# D3PO labelling


def _seeded_models(cfg):
    from ..algorithms.zo_ranksgd_diffusion import load_model_for

    return load_model_for(cfg)


class D3POBackend(Backend):
    mode = "d3po"

    def __init__(self, cfg, root, store, annotator=None, model=None):
        super().__init__(cfg, root, store, annotator)
        from ..config import read_prompts

        if cfg.sampling.eta <= 0:
            raise UserError(f"sampling.eta is {cfg.sampling.eta}: D3PO labels need the stochastic sampler (eta > 0, the reference uses 1.0)")
        self.model = model if model is not None else _seeded_models(cfg)
        self.prompts = read_prompts(cfg.prompts.train, "prompts.train")
        self.group = cfg.rank.group_size or cfg.d3po.group_size
        if self.group > 9:
            raise UserError(f"d3po.group_size is {self.group}; the app shows at most 9 images per label (set rank.group_size)")
        self.dir = self.root / "rank" / "d3po"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.updates = UpdateRunner(cfg, self.root, store)
        self.probe_base = None
        if cfg.rank.probe_prompts:  # the probe panel (vfeedback/app/probes.py): the base model's probes, rendered once
            from .probes import ensure_base

            self.probe_base = ensure_base(cfg, self.root, self.model)
        self._curve_key = None

    def _round(self) -> int:
        return self.store.count(self.mode)  # skips count: a skipped group is not shown again

    def _seeds(self, r: int) -> tuple[int, list[int]]:
        from ..engine import derive_seed

        return derive_seed(self.cfg.seed, "rank-d3po-latent", r), [derive_seed(self.cfg.seed, "rank-d3po-noise", r, k) for k in range(self.group)]

    def _make_view(self) -> RoundView:
        from ..algorithms.d3po import sample_items
        from ..feedback.preferences import PreferenceItem
        from rewards.images import to_pil

        r = self._round()
        prompt = self.prompts[r % len(self.prompts)]
        latent, noise = self._seeds(r)
        items = [PreferenceItem(latent_seed=latent, noise_seed=n) for n in noise]
        s = self.cfg.sampling
        with torch.no_grad():
            cond = self.model.encode_prompt([prompt] * self.group, [self.cfg.prompts.negative] * self.group, cfg=s.guidance_scale > 1)
            out = sample_items(self.model, cond, items, num_steps=s.steps, guidance_scale=s.guidance_scale, eta=s.eta)
        pil = to_pil(out.images.float().cpu())
        for k, im in enumerate(pil):
            im.save(self.dir / f"round-{r:06d}-{k}.png")
        self._items = [{"latent_seed": latent, "noise_seed": n, "image": f"rank/d3po/round-{r:06d}-{k}.png"} for k, n in enumerate(noise)]
        if self.group == 2:
            title, instr, picks = "Which is better?", "Click the better image and Submit, or press Tie / Skip.", 1
        else:
            title = f"Rank these {self.group}, best first"
            instr = "Click the best image, then the next best, ... (unpicked images tie below the picked ones); Submit. Or Tie / Skip."
            picks = self.group
        return RoundView(self.mode, r, prompt, [_upscale(p, self.size) for p in pil], title, instr, picks, allow_tie=True)

    def _answer(self, v: RoundView, kind: str, ranking: list[int], user: Optional[str] = None) -> tuple[int, str]:
        s = self.cfg.sampling
        n = len(v.images)
        ranks = ranks_from_ranking(ranking, n) if kind == "rank" else ([1] * n if kind == "tie" else None)
        ctx = {"latent_seed": self._items[0]["latent_seed"], "sampling": {"steps": s.steps, "guidance_scale": s.guidance_scale, "eta": s.eta},
               "negative_prompt": self.cfg.prompts.negative, "model": self.cfg.model.path}
        items = [{"noise_seed": it["noise_seed"], "image": it["image"]} for it in self._items]
        aid = self.store.add_answer(self.mode, v.round, kind, v.prompt, ranking, items, ranks=ranks, context=ctx,
                                    annotator=self.annotator, round_id=v.round_id, user=user)
        msg = {"rank": "Saved.", "tie": "Saved as a tie.", "skip": "Skipped."}[kind]
        started = self.updates.maybe_start()
        if started:
            msg += f" Started D3PO update {started} in the background."
        return aid, msg

    def side(self) -> dict:
        out = {"update": self.updates.status()}
        if self.probe_base is not None:
            out["probes"] = self.probe_status(images=True)
        return out

    def probe_status(self, images: bool = False) -> dict:
        """The probe check: ``points`` (one per model: labels trained on, update number, mean
        P(match), match rate; the base model first), ``last`` (the newest), ``reward``; with
        ``images``, ``panel`` (PIL: base | current) and ``curve`` (a PNG path)."""
        from .probes import curve_png, panel_image

        b = self.probe_base
        pts = [{"update": 0, "labels": 0, "mean": b["mean"], "match_rate": b["match_rate"]}]
        for n, u in sorted(self.updates._updates().items()):
            if u["state"] == "finished" and u.get("probe_mean") is not None:
                pts.append({"update": n, "labels": u.get("labels", 0), "mean": u["probe_mean"], "match_rate": u["probe_match_rate"]})
        out = {"reward": self.cfg.rank.probe_reward, "n": b["n"], "points": pts, "last": pts[-1]}
        if images:
            out["panel"] = panel_image(self.root, self.cfg, pts[-1]["update"] or None)
            curve = self.root / "rank" / "probes" / "curve.png"
            key = json.dumps(pts)
            if key != self._curve_key or not curve.exists():
                curve_png(pts, curve, self.cfg.rank.probe_reward)
                self._curve_key = key
            out["curve"] = str(curve)
        return out

    def status(self) -> dict:
        s = super().status()
        s["labels"] = self.updates.labels()
        s["update"] = self.updates.status()
        if self.probe_base is not None:
            s["probe"] = self.probe_status()
        return s


class UpdateRunner:
    """Background D3PO updates: ``vfeedback train`` subprocesses, tracked through the store's events."""

    def __init__(self, cfg, root: Path, store: FeedbackStore):
        self.cfg = cfg
        self.root = Path(root)
        self.store = store
        self.proc: Optional[subprocess.Popen] = None
        self.current: Optional[int] = None
        self._reconcile()

    def labels(self) -> int:
        """Labels that give at least one preference pair (ranked answers with two different ranks)."""
        return sum(1 for a in self.store.answers("d3po") if a.kind == "rank")

    def _dir(self, n: int) -> Path:
        return self.root / "updates" / f"update-{n:03d}"

    def _updates(self) -> dict[int, dict]:
        out: dict[int, dict] = {}
        for e in self.store.events():
            if e["kind"].startswith("d3po_update_"):
                out.setdefault(e["n"], {}).update({**e, "state": e["kind"][len("d3po_update_"):]})
        return out

    def _reconcile(self) -> None:
        """After a restart: an update whose run finished is recorded as finished, one that died as
        interrupted (its labels are trained by the next update)."""
        for n, u in self._updates().items():
            if u["state"] != "started":
                continue
            if (self._dir(n) / "summary.json").exists():
                self._finish(n)
            elif not _alive(u.get("pid")):
                self.store.add_event("d3po_update_interrupted", {"n": n})

    def _finish(self, n: int) -> None:
        from .probes import PROBE_DIR, read_probes

        summ = json.loads((self._dir(n) / "summary.json").read_text())
        probe = read_probes(self._dir(n) / PROBE_DIR) or {}  # written after training by `python -m vfeedback.app.probes`
        self.store.add_event("d3po_update_finished", {"n": n, "win_rate": summ.get("heldout_win_rate"),
                                                      "reward_before": summ.get("eval_reward_before"), "reward_after": summ.get("eval_reward_after"),
                                                      "probe_mean": probe.get("mean"), "probe_match_rate": probe.get("match_rate")})

    def running(self) -> Optional[int]:
        if self.proc is not None:
            if self.proc.poll() is None:
                return self.current
            n, rc = self.current, self.proc.returncode
            self.proc, self.current = None, None
            if rc == 0 and (self._dir(n) / "summary.json").exists():
                self._finish(n)
            else:
                self.store.add_event("d3po_update_failed", {"n": n, "returncode": rc})
            return None
        for n, u in self._updates().items():
            if u["state"] == "started" and _alive(u.get("pid")):
                return n  # started by an earlier app process that is still running
        return None

    def maybe_start(self) -> Optional[int]:
        every = self.cfg.rank.labels_per_update
        if not every or self.running() is not None:
            return None
        done = [u.get("labels", 0) for u in self._updates().values() if u["state"] in ("started", "finished")]
        if self.labels() - max(done, default=0) < every:
            return None
        return self.start()

    def start(self) -> Optional[int]:
        """Start an update on every label so far (returns its number), unless one is running."""
        if self.running() is not None:
            return None
        n = max(self._updates(), default=0) + 1
        labels = self.labels()
        if labels == 0:
            return None
        proc = start_d3po_update(self.cfg, self.root, self.store, n)
        self.proc, self.current = proc, n
        self.store.add_event("d3po_update_started", {"n": n, "labels": labels, "pid": proc.pid, "dir": str(self._dir(n).relative_to(self.root))})
        return n

    def status(self) -> dict:
        run = self.running()
        ups = self._updates()
        every = self.cfg.rank.labels_per_update
        done = [u.get("labels", 0) for u in ups.values() if u["state"] in ("started", "finished")]
        out: dict[str, Any] = {"labels": self.labels(), "labels_per_update": every, "running": run,
                               "next_at": (max(done, default=0) + every) if every else None}
        if run is not None:
            steps = [r.get("step", 0) for r in _read_jsonl(self._dir(run) / "metrics.jsonl")]
            out["progress"] = (max(steps, default=0) / self.cfg.rank.update_steps)
            out["phase"] = "training" if steps else "starting (loading the model, sampling the 'before' grid)"
            if steps and max(steps) >= self.cfg.rank.update_steps:
                out["phase"] = "finishing (held-out win rate, 'after' grid)"
        fin = [n for n, u in ups.items() if u["state"] == "finished"]
        if fin:
            n = max(fin)
            u = ups[n]
            out["last"] = {"n": n, "win_rate": u.get("win_rate"), "reward_before": u.get("reward_before"), "reward_after": u.get("reward_after"),
                           "before_after": str(self._dir(n) / "samples" / "before_after.png"), "lora": str(self._dir(n) / "lora")}
        failed = [n for n, u in ups.items() if u["state"] in ("failed", "interrupted")]
        if failed:
            out["failed"] = max(failed)
            out["failed_log"] = str(self.root / "updates" / f"update-{max(failed):03d}.log")
        return out

    def wait(self, timeout: float = 600) -> Optional[int]:
        """Block until the running update ends (tests, shutdown); returns its number."""
        n = self.current
        if self.proc is not None:
            self.proc.wait(timeout)
            self.running()
        return n


def _alive(pid) -> bool:
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError):
        return False
    try:  # a zombie child of this process is not alive
        wpid, _ = os.waitpid(int(pid), os.WNOHANG)
        return wpid == 0
    except ChildProcessError:
        return True


def _read_jsonl(p: Path) -> list[dict]:
    if not p.exists():
        return []
    out = []
    for line in p.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def start_d3po_update(cfg, root: Path, store: FeedbackStore, n: int) -> subprocess.Popen:
    """Start background D3PO update ``n``: export every counted label to
    ``OUT/updates/update-NNN.labels.jsonl``, write a run config (offline D3PO from that file,
    ``rank.update_steps`` steps, ``OUT/updates/update-NNN`` as output_dir) and run
    ``python -m vfeedback train`` on it as a subprocess (log: ``update-NNN.log``). Each update
    trains a fresh LoRA on all labels so far against the base model, as offline D3PO does."""
    import yaml

    from ..config import dump_config

    updates = Path(root) / "updates"
    updates.mkdir(parents=True, exist_ok=True)
    labels = updates / f"update-{n:03d}.labels.jsonl"
    if store.export_jsonl(labels, modes=("d3po",), replace_in_run_folder=True) == 0:  # a left-over of a crash: ours
        raise UserError("no labels to train on yet")
    data = yaml.safe_load(dump_config(cfg))
    data["algorithm"] = "d3po"
    data["output_dir"] = str((updates / f"update-{n:03d}").resolve())
    data["d3po"].update(mode="offline", preference="file", file=str(labels.resolve()))
    data["train"]["max_steps"] = cfg.rank.update_steps
    data["log"].update(trackers=[], checkpoint_every=0, eval_every=0)
    cfg_path = updates / f"update-{n:03d}.yaml"
    cfg_path.write_text("# written by `vfeedback rank`: a background D3PO update on the labels so far\n" + yaml.safe_dump(data, sort_keys=False))
    logf = open(updates / f"update-{n:03d}.log", "wb")
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    # with probes: `vfeedback train`, then the probe images of the new model, in the same subprocess (vfeedback/app/probes.py)
    cmd = ["-m", "vfeedback.app.probes"] if cfg.rank.probe_prompts else ["-m", "vfeedback", "train"]
    return subprocess.Popen([sys.executable, *cmd, str(cfg_path)], stdout=logf, stderr=subprocess.STDOUT,
                            env=env, cwd=os.getcwd())


# --------------------------------------------------------------------------------------------
# gallery ranking (IterComp)


def _gallery_models(cfg) -> list[dict]:
    from ..config import GalleryModel

    out = []
    for g in cfg.rank.gallery:
        g = GalleryModel(path=g) if isinstance(g, str) else g
        if g.steps is not None or g.guidance_scale is not None:
            # one sampler for every member: the D3PO export stores one trajectory setting per group
            raise UserError(f"rank.gallery: {g.name or g.path}: per-model steps / guidance_scale are for itercomp.gallery only; "
                            "the ranking app renders every model with the sampling section")
        fam = g.family
        if fam is None:
            fam = ("sdxl" if g.path.startswith("tiny:sdxl") else "sd15") if g.path.startswith("tiny:") else cfg.model.family
        name = g.name or (g.path + (f" + {g.lora}" if g.lora else ""))
        if g.lora and not Path(g.lora).exists():  # at start, not at the first render inside the page
            raise UserError(f"rank.gallery: {name}: the LoRA {g.lora} does not exist; train it first (for "
                            "configs/rank/shapes-gallery.yaml: `make quickstart`) or remove that entry")
        out.append({"path": g.path, "family": fam, "lora": g.lora, "name": name})
    names = [m["name"] for m in out]
    if len(set(names)) != len(names):
        raise UserError(f"rank.gallery: two models share the name {[n for n in names if names.count(n) > 1][0]!r}; give each a distinct name")
    return out


class GalleryBackend(Backend):
    mode = "gallery"

    def __init__(self, cfg, root, store, annotator=None):
        super().__init__(cfg, root, store, annotator)
        from ..config import read_prompts

        r = cfg.rank
        self.models = _gallery_models(cfg)
        spec = r.gallery_prompts if r.gallery_prompts is not None else cfg.prompts.train
        self.prompts = read_prompts(spec, "rank.gallery_prompts")
        self.rounds = [(p, s) for p in self.prompts for s in r.gallery_seeds]
        self.dir = self.root / "rank" / "gallery"
        self._loaded: dict[int, Any] = {}

    def _model(self, i: int):
        if i not in self._loaded:
            from ..engine import resolve_mixed_precision
            from ..models import load_model
            from ..models.lora import load_lora_into

            m, c = self.models[i], self.cfg
            cuda = torch.cuda.is_available() and c.train.device != "cpu"
            device = torch.device(c.train.device) if c.train.device else torch.device("cuda" if cuda else "cpu")
            mp = resolve_mixed_precision(c.train.mixed_precision, device.type)
            dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mp, torch.float32)
            model = load_model(m["family"], m["path"], resolution=c.model.resolution if m["family"] == c.model.family else None,
                               dtype=dtype, device=device, attention=c.model.attention)
            if m["lora"]:
                load_lora_into(model, m["lora"])
            self._loaded[i] = model
        return self._loaded[i]

    def _perm(self, r: int) -> list[int]:
        from ..engine import generator

        return torch.randperm(len(self.models), generator=generator(self.cfg.seed, "rank-gallery-order", r)).tolist()

    def _render(self, r: int) -> Path:
        """Render round ``r`` with every model (once; kept in OUT/rank/gallery/round-r/)."""
        from safetensors.torch import save_file

        from ..algorithms.d3po import sample_items
        from ..engine import derive_seed
        from ..feedback.preferences import PreferenceItem
        from ..rundir import atomic_write
        from rewards.images import to_pil

        d = self.dir / f"round-{r:06d}"
        if (d / "round.json").exists():
            return d
        d.mkdir(parents=True, exist_ok=True)
        prompt, seed = self.rounds[r]
        s = self.cfg.sampling
        item = PreferenceItem(latent_seed=int(seed), noise_seed=derive_seed("rank-gallery-noise", seed))
        trajs = {}
        for i in range(len(self.models)):
            model = self._model(i)
            with torch.no_grad():
                cond = model.encode_prompt([prompt], [self.cfg.prompts.negative], cfg=s.guidance_scale > 1)
                out = sample_items(model, cond, [item], num_steps=s.steps, guidance_scale=s.guidance_scale, eta=s.eta)
            to_pil(out.images.float().cpu())[0].save(d / f"m{i}.png")
            trajs[f"m{i}"] = out.trajectory[0].float().cpu().contiguous()
        save_file(trajs, str(d / "trajectories.safetensors"))
        meta = {"prompt": prompt, "seed": seed, "latent_seed": item.latent_seed, "noise_seed": item.noise_seed,
                "models": self.models, "sampling": {"steps": s.steps, "guidance_scale": s.guidance_scale, "eta": s.eta}}
        atomic_write(d / "round.json", json.dumps(meta, indent=1))
        return d

    def _round(self) -> int:
        return self.store.count(self.mode)

    def _make_view(self) -> RoundView:
        from PIL import Image

        r = self._round()
        if r >= len(self.rounds):
            return RoundView(self.mode, r, "", [], "All done", f"Every prompt x seed ({len(self.rounds)} rounds) is ranked. "
                             "Export with `vfeedback rank CONFIG --export FILE.jsonl`.", 0, done=True)
        d = self._render(r)
        perm = self._perm(r)
        self._shown = perm
        imgs = [_upscale(Image.open(d / f"m{i}.png").convert("RGB"), self.size) for i in perm]
        prompt, seed = self.rounds[r]
        return RoundView(self.mode, r, prompt, imgs, f"Rank the {len(perm)} models' images, best first (seed {seed})",
                         "Click the best image, then the next best, ... (unpicked images tie below); Submit. The models are shown in a random order.",
                         len(perm), allow_tie=True)

    def _answer(self, v: RoundView, kind: str, ranking: list[int], user: Optional[str] = None) -> tuple[int, str]:
        d = self._render(v.round)
        meta = json.loads((d / "round.json").read_text())
        rel = d.relative_to(self.root).as_posix()
        items = [{"trajectory": f"m{i}", "model": self.models[i]["name"], "model_path": self.models[i]["path"],
                  "latent_seed": meta["latent_seed"], "noise_seed": meta["noise_seed"], "image": f"{rel}/m{i}.png"} for i in self._shown]
        n = len(items)
        ranks = ranks_from_ranking(ranking, n) if kind == "rank" else ([1] * n if kind == "tie" else None)
        ctx = {"trajectories": f"{rel}/trajectories.safetensors", "sampling": meta["sampling"], "negative_prompt": self.cfg.prompts.negative,
               "seed": meta["seed"], "order": self._shown}
        aid = self.store.add_answer(self.mode, v.round, kind, v.prompt, ranking, items, ranks=ranks, context=ctx,
                                    annotator=self.annotator, round_id=v.round_id, user=user)
        if kind == "rank":
            order = " > ".join(items[i]["model"] for i in ranking)
            return aid, f"Saved: {order}."
        return aid, ("Saved as a tie." if kind == "tie" else "Skipped.")


# --------------------------------------------------------------------------------------------


def open_backend(cfg, annotator: Optional[str] = None) -> Backend:
    """The store of ``cfg.output_dir`` (created or resumed, config checked, writer lock held) and
    the mode's backend. ``output_dir`` must be a run folder of the app (it holds
    ``feedback.sqlite``), an empty folder or a new one: the app serves images from it, so it
    refuses any other folder (a home folder, a training run, a data set)."""
    from ..config import dump_config
    from ..rundir import atomic_write

    mode = resolve_mode(cfg)
    root = Path(cfg.output_dir)
    if root.exists() and not root.is_dir():
        raise UserError(f"output_dir: {root} exists and is not a folder")
    store_path = root / STORE_FILE
    if root.is_dir() and not store_path.exists():
        try:
            # the lock file alone: a start that died before SQLite created the store
            entries = sorted(p.name for p in root.iterdir() if p.name != STORE_FILE + LOCK_SUFFIX)
        except OSError as e:
            raise UserError(f"output_dir: cannot read {root} ({e.strerror})") from None
        if "config.yaml" in entries:
            raise UserError(f"output_dir: {root} holds a training run, not a ranking app's store; choose another output_dir (output_dir=...)")
        if entries:
            shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            raise UserError(f"output_dir: {root} is not a run folder of `vfeedback rank` (it holds {shown} and no {STORE_FILE}); "
                            "the app serves images from its run folder, so it starts only in a new or empty folder or one it made. "
                            "Choose another output_dir (output_dir=...)")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"output_dir: cannot create {root} ({e.strerror})") from None
    try:
        store = FeedbackStore(store_path)
    except StoreError as e:
        raise UserError(f"output_dir: {e}") from None
    try:
        fp = _fingerprint(cfg)
        old = store.get_meta("fingerprint")
        if old is None:
            store.set_meta("fingerprint", fp)
            store.set_meta("mode", mode)
            store.set_meta("created", time.time())
            atomic_write(root / "config.yaml", dump_config(cfg))
        else:
            diffs = [f"{k}: {old.get(k)!r} -> {fp.get(k)!r}" for k in fp if old.get(k) != fp.get(k)]
            if diffs:
                raise UserError(f"output_dir: {root} holds answers given under another config; these fields changed:\n  " + "\n  ".join(diffs)
                                + "\n(they decide what each stored round showed; restore them or choose another output_dir)")
        store.add_event("app_start", {"pid": os.getpid(), "mode": mode})
        cls = {"zo_ranksgd": ZOBackend, "d3po": D3POBackend, "gallery": GalleryBackend}[mode]
        return cls(cfg, root, store, annotator)
    except BaseException:
        store.close()  # drop the writer lock: this process will not use the store
        raise
