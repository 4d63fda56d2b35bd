"""Durable store of human feedback: one SQLite file per run folder (``OUT/feedback.sqlite``).

Every answer a person gives in the ranking app (``vfeedback rank``) is one row, committed in
its own transaction the moment it is given (WAL journal, ``synchronous=FULL``: a kill at any
moment loses nothing that was acknowledged). A row holds what the person saw and said and what
rebuilds it: the prompt, the shown items (seeds, model paths, optimiser labels), the answer,
and for ZO-RankSGD the optimiser state after the answer, so a restarted app continues at the
same round. "Undo" never deletes: it stamps ``undone`` on the row, and undone rows are left out
of the state, the counts and the export.

Schema (``PRAGMA user_version`` = :data:`SCHEMA_VERSION`)::

    answers(id INTEGER PRIMARY KEY AUTOINCREMENT,
            mode TEXT,        -- zo_ranksgd | d3po | gallery
            round INTEGER,    -- the round the answer closes (0-based, per mode)
            kind TEXT,        -- rank (ordered picks) | tie | skip
            prompt TEXT,
            ranking TEXT,     -- JSON list: display indices picked, best first
            ranks TEXT,       -- JSON list, one rank per shown item (1 = best, equal = tie), or NULL
            items TEXT,       -- JSON list, one object per shown item: how to rebuild it
            context TEXT,     -- JSON object: sampling settings, labels, optimiser entry, ...
            state BLOB,       -- zo_ranksgd: the session state after the answer; else NULL
            annotator TEXT,
            created REAL,     -- unix time
            undone REAL)      -- unix time of the undo, NULL while the answer counts
    events(id INTEGER PRIMARY KEY AUTOINCREMENT, created REAL, kind TEXT, data TEXT)
    meta(key TEXT PRIMARY KEY, value TEXT)    -- mode, config fingerprint, created

:meth:`FeedbackStore.export_jsonl` writes the counted ``d3po`` and ``gallery`` answers in the
preference format of :mod:`vfeedback.feedback.preferences` (``docs/d3po.md``); the app's own
fields (``id``, ``mode``, ``annotator``, ``time``, per-item ``model``) ride along and
:func:`~vfeedback.feedback.preferences.load_preferences` ignores them. This module needs only
the standard library.
"""
from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Union

__all__ = ["FeedbackStore", "Answer", "SCHEMA_VERSION", "STORE_FILE", "StoreError"]

SCHEMA_VERSION = 1
STORE_FILE = "feedback.sqlite"
MODES = ("zo_ranksgd", "d3po", "gallery")
KINDS = ("rank", "tie", "skip")

_SCHEMA_V1 = """
CREATE TABLE answers (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    mode TEXT NOT NULL,
    round INTEGER NOT NULL,
    kind TEXT NOT NULL,
    prompt TEXT NOT NULL,
    ranking TEXT NOT NULL,
    ranks TEXT,
    items TEXT NOT NULL,
    context TEXT,
    state BLOB,
    annotator TEXT,
    created REAL NOT NULL,
    undone REAL
);
CREATE INDEX answers_mode_round ON answers(mode, round);
CREATE TABLE events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    kind TEXT NOT NULL,
    data TEXT
);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT);
"""

#: version -> SQL that takes a store from version - 1 to version
_MIGRATIONS = {1: _SCHEMA_V1}


class StoreError(Exception):
    """The store file cannot be used (newer schema, not a store, damaged)."""


@dataclass
class Answer:
    id: int
    mode: str
    round: int
    kind: str
    prompt: str
    ranking: list[int]
    ranks: Optional[list[float]]
    items: list[dict]
    context: dict
    annotator: Optional[str]
    created: float
    undone: Optional[float]
    has_state: bool

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        d.pop("has_state")
        return d


def ranks_from_ranking(ranking: list[int], n: int) -> list[int]:
    """Ranks (1 = best) of ``n`` shown items from picks best-first; unpicked items tie last."""
    ranks = [len(ranking) + 1] * n
    for p, i in enumerate(ranking):
        ranks[i] = p + 1
    return ranks


class FeedbackStore:
    """The answers of one run folder. Thread-safe (one connection behind a lock)."""

    def __init__(self, path: Union[str, os.PathLike]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        try:
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path}: not a usable feedback store ({e}); move it aside to start a new one") from None

    # ------------------------------------------------------------------ schema
    def _migrate(self) -> None:
        with self._lock:
            v = self._db.execute("PRAGMA user_version").fetchone()[0]
            if v > SCHEMA_VERSION:
                raise StoreError(f"{self.path} was written by a newer vfeedback (store schema {v}, this one reads up to "
                                 f"{SCHEMA_VERSION}); upgrade vfeedback")
            if v == 0 and self._db.execute("SELECT count(*) FROM sqlite_master WHERE type='table'").fetchone()[0]:
                raise StoreError(f"{self.path} holds tables but no store schema version; it is not a vfeedback feedback store")
            for target in range(v + 1, SCHEMA_VERSION + 1):
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    # statement by statement: executescript() would COMMIT mid-transaction
                    for stmt in _MIGRATIONS[target].split(";"):
                        if stmt.strip():
                            self._db.execute(stmt)
                    self._db.execute(f"PRAGMA user_version={target}")
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise

    @property
    def schema_version(self) -> int:
        with self._lock:
            return self._db.execute("PRAGMA user_version").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ meta / events
    def get_meta(self, key: str, default: Any = None) -> Any:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])

    def set_meta(self, key: str, value: Any) -> None:
        with self._lock:
            self._db.execute("INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                             (key, json.dumps(value)))

    def add_event(self, kind: str, data: Optional[dict] = None) -> int:
        with self._lock:
            cur = self._db.execute("INSERT INTO events(created, kind, data) VALUES(?, ?, ?)", (time.time(), kind, json.dumps(data or {})))
            return int(cur.lastrowid)

    def events(self, kind: Optional[str] = None) -> list[dict]:
        q, args = "SELECT id, created, kind, data FROM events", ()
        if kind is not None:
            q, args = q + " WHERE kind=?", (kind,)
        with self._lock:
            rows = self._db.execute(q + " ORDER BY id", args).fetchall()
        return [{"id": r[0], "created": r[1], "kind": r[2], **json.loads(r[3] or "{}")} for r in rows]

    # ------------------------------------------------------------------ answers
    def add_answer(self, mode: str, round: int, kind: str, prompt: str, ranking: Iterable[int], items: list[dict],
                   ranks: Optional[list[float]] = None, context: Optional[dict] = None, state: Optional[bytes] = None,
                   annotator: Optional[str] = None) -> int:
        """Commit one answer (one transaction); returns its id."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        ranking = [int(i) for i in ranking]
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO answers(mode, round, kind, prompt, ranking, ranks, items, context, state, annotator, created) "
                "VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (mode, int(round), kind, prompt, json.dumps(ranking), None if ranks is None else json.dumps(list(ranks)),
                 json.dumps(items), json.dumps(context or {}), None if state is None else sqlite3.Binary(state), annotator, time.time()))
            return int(cur.lastrowid)

    def _rows(self, where: str, args: tuple, order: str = "id") -> list[Answer]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, mode, round, kind, prompt, ranking, ranks, items, context, annotator, created, undone, state IS NOT NULL "
                f"FROM answers WHERE {where} ORDER BY {order}", args).fetchall()
        return [Answer(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]), None if r[6] is None else json.loads(r[6]),
                       json.loads(r[7]), json.loads(r[8] or "{}"), r[9], r[10], r[11], bool(r[12])) for r in rows]

    def answers(self, mode: Optional[str] = None, include_undone: bool = False) -> list[Answer]:
        """Answers in the order given (counted ones only unless ``include_undone``)."""
        conds, args = [], []
        if mode is not None:
            conds.append("mode=?")
            args.append(mode)
        if not include_undone:
            conds.append("undone IS NULL")
        return self._rows(" AND ".join(conds) or "1", tuple(args))

    def count(self, mode: Optional[str] = None, kinds: Optional[Iterable[str]] = None) -> int:
        q, args = "SELECT count(*) FROM answers WHERE undone IS NULL", []
        if mode is not None:
            q += " AND mode=?"
            args.append(mode)
        if kinds is not None:
            kinds = list(kinds)
            q += f" AND kind IN ({','.join('?' * len(kinds))})"
            args += kinds
        with self._lock:
            return int(self._db.execute(q, tuple(args)).fetchone()[0])

    def last(self, mode: str) -> Optional[Answer]:
        rows = self._rows("mode=? AND undone IS NULL", (mode,), order="id DESC LIMIT 1")
        return rows[0] if rows else None

    def state_of(self, answer_id: int) -> Optional[bytes]:
        with self._lock:
            row = self._db.execute("SELECT state FROM answers WHERE id=?", (answer_id,)).fetchone()
        return None if row is None or row[0] is None else bytes(row[0])

    def undo_last(self, mode: str) -> Optional[Answer]:
        """Mark the newest counted answer of ``mode`` undone (one transaction); returns it."""
        with self._lock:
            a = self.last(mode)
            if a is None:
                return None
            self._db.execute("UPDATE answers SET undone=? WHERE id=?", (time.time(), a.id))
            a.undone = time.time()
            return a

    # ------------------------------------------------------------------ export
    def preference_records(self, base: Optional[Path] = None, modes: Iterable[str] = ("d3po", "gallery")) -> list[dict]:
        """The counted, non-skipped answers of ``modes`` as preference records (docs/rank_app.md).

        Relative paths in items (``image``) and ``trajectories`` are resolved against the store's
        folder and written relative to ``base`` (the export file's folder) when possible."""
        root = self.path.parent.resolve()
        base = Path(base).resolve() if base is not None else root

        def rel(p: str) -> str:
            q = (root / p).resolve()
            try:
                return os.path.relpath(q, base)
            except ValueError:  # another drive on Windows
                return str(q)

        out = []
        for a in self.answers():
            if a.mode not in modes or a.kind == "skip":
                continue
            ctx = a.context
            items = []
            for it in a.items:
                it = dict(it)
                if "image" in it:
                    it["image"] = rel(it["image"])
                items.append(it)
            n = len(items)
            ranks = a.ranks if a.ranks is not None else ([1] * n if a.kind == "tie" else ranks_from_ranking(a.ranking, n))
            rec: dict[str, Any] = {"prompt": a.prompt}
            if "latent_seed" in ctx:
                rec["latent_seed"] = ctx["latent_seed"]
            if n == 2 and a.kind == "rank" and len(set(ranks)) == 2:
                w = ranks.index(min(ranks))
                rec["chosen"], rec["rejected"] = items[w], items[1 - w]
            else:
                rec["items"], rec["ranks"] = items, ranks
            if ctx.get("negative_prompt") is not None:
                rec["negative_prompt"] = ctx["negative_prompt"]
            if ctx.get("sampling") is not None:
                rec["sampling"] = ctx["sampling"]
            if ctx.get("trajectories") is not None:
                rec["trajectories"] = rel(ctx["trajectories"])
            rec.update({"id": f"answer-{a.id}", "mode": a.mode, "kind": a.kind, "round": a.round, "time": a.created})
            if a.annotator:
                rec["annotator"] = a.annotator
            out.append(rec)
        return out

    def export_jsonl(self, path: Union[str, os.PathLike], modes: Iterable[str] = ("d3po", "gallery")) -> int:
        """Write :meth:`preference_records` to ``path`` as JSONL (atomically); returns the count."""
        import tempfile

        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        recs = self.preference_records(p.parent, modes)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                for r in recs:
                    f.write(json.dumps(r) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, p)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return len(recs)
