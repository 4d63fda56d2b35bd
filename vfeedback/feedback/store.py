"""Durable store of human feedback: one SQLite file per run folder (``OUT/feedback.sqlite``).

Every answer a person gives in the ranking app (``vfeedback rank``) is one row, committed in
its own transaction the moment it is given (WAL journal, ``synchronous=FULL``: a kill at any
moment loses nothing that was acknowledged). A row holds what the person saw and said and what
rebuilds it: the prompt, the shown items (seeds, model paths, optimiser labels), the answer,
and for ZO-RankSGD the optimiser state after the answer, so a restarted app continues at the
same round. "Undo" never deletes: it stamps ``undone`` on the row, and undone rows are left out
of the state, the counts and the export.

One process writes a store at a time: a writer holds ``flock`` on ``feedback.sqlite.lock``
beside it (the kernel drops the lock when the process ends, however it ends, so a crash leaves
no stale lock), and a second writer is refused with :class:`StoreLocked` naming the holder.
Readers (``--export``, the ``sqlite3`` shell) open the store read-only and need no lock. We chose
flock over SQLite's ``locking_mode=EXCLUSIVE``: that mode would also lock readers out, and a
second writer would only see "database is locked" after the busy timeout, not who holds it.

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
            undone REAL,      -- unix time of the undo, NULL while the answer counts
            round_id TEXT,    -- (schema 2) the id of the candidate set answered: "r<round>-<digest>";
                              -- at most one counted answer per (mode, round_id)
            user TEXT)        -- (schema 3) who answered: the app's user box (NULL: not given)
    events(id INTEGER PRIMARY KEY AUTOINCREMENT, created REAL, kind TEXT, data TEXT)
    meta(key TEXT PRIMARY KEY, value TEXT)    -- mode, config fingerprint, created

:meth:`FeedbackStore.export_jsonl` writes the counted ``d3po`` and ``gallery`` answers in the
preference format of :mod:`vfeedback.feedback.preferences` (``docs/d3po.md``); the app's own
fields (``id``, ``mode``, ``annotator``, ``user``, ``time``, per-item ``model``) ride along and
:func:`~vfeedback.feedback.preferences.load_preferences` ignores them. It writes a temporary file and renames it, and never
onto the store, its side files, a folder or an existing file that is not an earlier export.
This module needs only the standard library (any Python reads a store), hence the own lock.
"""
from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Union

__all__ = ["FeedbackStore", "Answer", "SCHEMA_VERSION", "STORE_FILE", "LOCK_SUFFIX", "StoreError", "StoreLocked",
           "RoundAnswered", "ExportRefused", "store_files", "check_export_target"]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 3
STORE_FILE = "feedback.sqlite"
LOCK_SUFFIX = ".lock"
#: files SQLite keeps beside a store (WAL, shared memory, rollback journal)
SIDE_SUFFIXES = ("-wal", "-shm", "-journal")
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

# the candidate set each answer names; one counted answer per set (undone rows leave the index)
_SCHEMA_V2 = """
ALTER TABLE answers ADD COLUMN round_id TEXT;
CREATE UNIQUE INDEX answers_round_id ON answers(mode, round_id) WHERE undone IS NULL AND round_id IS NOT NULL
"""

# who answered (the app's user box; VPL groups answers by person): NULL in rows of older stores
_SCHEMA_V3 = """
ALTER TABLE answers ADD COLUMN user TEXT
"""

#: version -> SQL that takes a store from version - 1 to version
_MIGRATIONS = {1: _SCHEMA_V1, 2: _SCHEMA_V2, 3: _SCHEMA_V3}


class StoreError(Exception):
    """The store file cannot be used (newer schema, not a store, damaged)."""


class StoreLocked(StoreError):
    """Another process writes this store (``holder``: what it wrote into the lock file)."""

    def __init__(self, message: str, holder: dict):
        super().__init__(message)
        self.holder = holder


class RoundAnswered(StoreError):
    """A counted answer to this (mode, round_id) is stored already."""


class ExportRefused(StoreError):
    """The export target would overwrite something the export did not create."""


def store_files(path: Union[str, os.PathLike]) -> list[Path]:
    """The store file, its SQLite side files and its lock file (absolute)."""
    p = Path(path).resolve()
    return [p] + [p.with_name(p.name + s) for s in SIDE_SUFFIXES + (LOCK_SUFFIX,)]


class _WriterLock:
    """An exclusive, non-blocking ``flock`` on ``<store>.lock``. The kernel drops it when the
    holder's file descriptor closes, so it dies with its process (exit, exception, kill -9).
    The holder writes its pid, host, start time and command into the file for the message a
    second writer gets. Not for network file systems whose flock is local only."""

    def __init__(self, path: Path):
        self.path = path
        self.fd: Optional[int] = None

    def acquire(self, store: Path) -> None:
        import socket
        import sys

        try:
            import fcntl
        except ImportError:  # not POSIX (Windows): no writer lock
            log.warning("%s: this platform has no flock; a second app on this run folder would not be refused", store)
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StoreError(f"{self.path}: cannot create the store's lock file ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.pread(fd, 65536, 0).decode("utf-8") or "{}")
            except (OSError, ValueError):
                holder = {}
            os.close(fd)
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["started"])) if "started" in holder else "?"
            raise StoreLocked(
                f"{store} is in use by another writer (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since {since}: "
                f"{holder.get('command', '?')}); one app per run folder: use that app, stop it, or choose another output_dir",
                holder) from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "command": " ".join(sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode("utf-8"), 0)
        self.fd = fd

    def try_quiet(self) -> bool:
        """Take the lock if it exists and is free, without writing holder info (for a reader's
        clean-up); True if taken."""
        import fcntl

        try:
            fd = os.open(self.path, os.O_RDWR)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None


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
    round_id: Optional[str] = None
    user: Optional[str] = None

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
    """The answers of one run folder. Thread-safe (one connection behind a lock).

    ``readonly=False`` (a writer): creates the store if needed, migrates it, and holds the
    store's writer lock until :meth:`close` or the end of the process (a second writer gets
    :class:`StoreLocked`). ``readonly=True``: reads an existing store, even while a writer runs;
    every write raises."""

    def __init__(self, path: Union[str, os.PathLike], readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        self._lock = threading.RLock()
        self._writer: Optional[_WriterLock] = None
        self._db: Optional[sqlite3.Connection] = None
        self._side_created: list[Path] = []
        if readonly:
            if not self.path.is_file():
                raise StoreError(f"{self.path}: no feedback store there")
            # SQLite makes -wal / -shm for a read-only WAL reader; close() removes those it made
            self._side_created = [f for f in store_files(self.path)[1:3] if not f.exists()]
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = _WriterLock(self.path.with_name(self.path.name + LOCK_SUFFIX))
            self._writer.acquire(self.path)
        try:
            if readonly:
                uri = "file:" + urllib.parse.quote(str(self.path.resolve())) + "?mode=ro"
                self._db = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None, timeout=30)
                self._version = self._db.execute("PRAGMA user_version").fetchone()[0]
                self._check_version(self._version)
                if self._version == 0:
                    raise StoreError(f"{self.path} holds no store schema; it is not a vfeedback feedback store")
            else:
                self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
                self._db.execute("PRAGMA foreign_keys=ON")
                self._migrate()
                self._version = SCHEMA_VERSION
        except sqlite3.DatabaseError as e:
            self.close()
            raise StoreError(f"{self.path}: not a usable feedback store ({e}); move it aside to start a new one") from None
        except BaseException:
            self.close()
            raise

    def _check_version(self, v: int) -> None:
        if v > SCHEMA_VERSION:
            raise StoreError(f"{self.path} was written by a newer vfeedback (store schema {v}, this one reads up to "
                             f"{SCHEMA_VERSION}); upgrade vfeedback")

    def _write(self) -> None:
        if self.readonly:
            raise StoreError(f"{self.path} is open read-only")

    # ------------------------------------------------------------------ schema
    def _migrate(self) -> None:
        with self._lock:
            v = self._db.execute("PRAGMA user_version").fetchone()[0]
            self._check_version(v)
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
        """Close the connection and drop the writer lock (idempotent)."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
            if self._writer is not None:
                self._writer.release()
                self._writer = None
            if self._side_created:
                self._remove_side_files()

    def _remove_side_files(self) -> None:
        """A reader's clean-up: remove the -wal / -shm files its connection made, if no writer
        has started meanwhile (the writer lock is free: we take it while removing)."""
        made, self._side_created = self._side_created, []
        lock = _WriterLock(self.path.with_name(self.path.name + LOCK_SUFFIX))
        try:
            if not lock.try_quiet():
                return
        except ImportError:  # no flock on this platform: leave them
            return
        try:
            for f in made:
                f.unlink(missing_ok=True)
        finally:
            lock.release()

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
        self._write()
        with self._lock:
            self._db.execute("INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                             (key, json.dumps(value)))

    def add_event(self, kind: str, data: Optional[dict] = None) -> int:
        self._write()
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
                   annotator: Optional[str] = None, round_id: Optional[str] = None, user: Optional[str] = None) -> int:
        """Commit one answer (one transaction); returns its id. ``round_id`` names the candidate
        set answered; a second counted answer to the same ``(mode, round_id)`` raises
        :class:`RoundAnswered` and stores nothing. ``user``: who answered (the app's user box)."""
        self._write()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        ranking = [int(i) for i in ranking]
        with self._lock:
            try:
                cur = self._db.execute(
                    "INSERT INTO answers(mode, round, kind, prompt, ranking, ranks, items, context, state, annotator, created, round_id, user) "
                    "VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (mode, int(round), kind, prompt, json.dumps(ranking), None if ranks is None else json.dumps(list(ranks)),
                     json.dumps(items), json.dumps(context or {}), None if state is None else sqlite3.Binary(state), annotator,
                     time.time(), round_id, user))
            except sqlite3.IntegrityError:
                raise RoundAnswered(f"{mode} round {round_id} has a counted answer already") from None
            return int(cur.lastrowid)

    def _rows(self, where: str, args: tuple, order: str = "id") -> list[Answer]:
        rid = "round_id" if self._version >= 2 else "NULL"  # a read-only store of schema 1
        usr = "user" if self._version >= 3 else "NULL"  # a read-only store of schema 1 or 2
        with self._lock:
            rows = self._db.execute(
                "SELECT id, mode, round, kind, prompt, ranking, ranks, items, context, annotator, created, undone, state IS NOT NULL, "
                f"{rid}, {usr} FROM answers WHERE {where} ORDER BY {order}", args).fetchall()
        return [Answer(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]), None if r[6] is None else json.loads(r[6]),
                       json.loads(r[7]), json.loads(r[8] or "{}"), r[9], r[10], r[11], bool(r[12]), r[13], r[14]) for r in rows]

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

    def answer_for(self, mode: str, round_id: str) -> Optional[Answer]:
        """The counted answer to the candidate set ``round_id`` of ``mode``, or None."""
        rows = self._rows("mode=? AND round_id=? AND undone IS NULL", (mode, round_id))
        return rows[0] if rows else None

    def state_of(self, answer_id: int) -> Optional[bytes]:
        with self._lock:
            row = self._db.execute("SELECT state FROM answers WHERE id=?", (answer_id,)).fetchone()
        return None if row is None or row[0] is None else bytes(row[0])

    def undo_answer(self, mode: str, answer_id: int) -> bool:
        """Stamp answer ``answer_id`` undone if, and only if, it is the newest counted answer of
        ``mode``: the check and the stamp are one UPDATE (one transaction), so an undo can never
        take back another answer than the one it names. Returns whether it was stamped."""
        self._write()
        with self._lock:
            cur = self._db.execute(
                "UPDATE answers SET undone=? WHERE id=? AND mode=? AND undone IS NULL "
                "AND id=(SELECT max(id) FROM answers WHERE mode=? AND undone IS NULL)",
                (time.time(), int(answer_id), mode, mode))
            return cur.rowcount == 1

    def undo_last(self, mode: str) -> Optional[Answer]:
        """Mark the newest counted answer of ``mode`` undone (one transaction); returns it."""
        self._write()
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
            if a.round_id:
                rec["round_id"] = a.round_id
            if a.annotator:
                rec["annotator"] = a.annotator
            if a.user:
                rec["user"] = a.user
            out.append(rec)
        return out

    def check_export_target(self, path: Union[str, os.PathLike], replace_in_run_folder: bool = False) -> Path:
        """:func:`check_export_target` for this store."""
        return check_export_target(self.path, path, replace_in_run_folder)

    def export_jsonl(self, path: Union[str, os.PathLike], modes: Iterable[str] = ("d3po", "gallery"),
                     replace_in_run_folder: bool = False) -> int:
        """Write :meth:`preference_records` to ``path`` as JSONL (a temporary file in the same
        folder, fsynced, then renamed over ``path``); returns the count. Refuses (before writing
        anything) every target :meth:`check_export_target` refuses."""
        import tempfile

        p = self.check_export_target(path, replace_in_run_folder)
        p.parent.mkdir(parents=True, exist_ok=True)
        recs = self.preference_records(p.parent, modes)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                for r in recs:
                    f.write(json.dumps(r) + "\n")
                f.flush()
                os.fsync(f.fileno())
            self.check_export_target(p, replace_in_run_folder)  # nothing else took the name meanwhile
            os.replace(tmp, p)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return len(recs)


def check_export_target(store: Union[str, os.PathLike], path: Union[str, os.PathLike], replace_in_run_folder: bool = False) -> Path:
    """The resolved export target, or :class:`ExportRefused` if writing it could lose a byte the
    export did not create: the store, its SQLite side files or lock (existing or not), a
    folder, any existing file in the store's run folder (the app's own files, an update's
    labels; unless ``replace_in_run_folder``: the app re-writing a file of its own), or an
    existing file elsewhere that is not an earlier export (empty, or every line a record with
    ``"id": "answer-N"``)."""
    given = Path(path)
    p = given.resolve()
    root = Path(store).resolve().parent
    if p in store_files(store):
        raise ExportRefused(f"{given} is the feedback store (or one of its side files); export to a new file, e.g. labels.jsonl")
    if p.is_dir():
        raise ExportRefused(f"{given} is a folder; give a file name, e.g. {given / 'labels.jsonl'}")
    if p.exists():
        if not p.is_file():
            raise ExportRefused(f"{given} exists and is not a regular file; export to a new file")
        if any(f.exists() and os.path.samefile(f, p) for f in store_files(store)):  # a hard link
            raise ExportRefused(f"{given} is the feedback store (a link to it); export to a new file")
        if root in p.parents and not replace_in_run_folder:
            raise ExportRefused(f"{given} exists in the run folder {root}; the export does not replace files there. "
                                "Export to a new file name (or outside the run folder)")
        if not _is_export(p):
            raise ExportRefused(f"{given} exists and is not an earlier export of this app; it would be overwritten. "
                                "Choose a new file name or move that file away")
    if p.parent.exists() and not p.parent.is_dir():
        raise ExportRefused(f"{given}: {p.parent} is not a folder")
    return p


def _is_export(p: Path) -> bool:
    """True if ``p`` is empty or every line is a record :meth:`FeedbackStore.export_jsonl` writes."""
    try:
        with open(p, "rb") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    return False
                if not (isinstance(rec, dict) and isinstance(rec.get("id"), str) and rec["id"].startswith("answer-")
                        and rec.get("mode") in MODES and "prompt" in rec):
                    return False
    except OSError:
        return False
    return True
