"""Issue #16, the ranking app's side: human answers are never lost, overwritten or misfiled.

* property tests (Hypothesis) of the answer protocol: malformed bodies, wrong / stale / answered
  round ids, duplicate answers, out-of-range and too many picks, undo; every refusal is a
  structured error and leaves the store as it was, every acknowledged answer stays;
* two clients answering one ZO-RankSGD round at the same moment (real app, HTTP): one wins, the
  other is refused, its retry of the winning answer is idempotent; two clients undoing: an undo
  names the round and the answer id, a stale one (not the newest, another client's, undone already,
  two at once) is refused and takes back nothing else; malformed HTTP bodies give structured
  errors and no server-side traceback;
* a second `vfeedback rank` on a run folder in use is refused (the writer lock), and the lock
  dies with its process (kill -9);
* `--export` onto the store (and its side files, the config, a folder, a link to the store)
  is refused and changes no byte of the run folder; CLI flags and output_dir are validated.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from vfeedback.app.backend import AnswerError, Backend, RoundView, parse_answer
from vfeedback.cli import main
from vfeedback.feedback.store import SCHEMA_VERSION, FeedbackStore, RoundAnswered, StoreError, StoreLocked

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "tests" / "configs" / "rank"  # random-weight tiny:sd15 fixtures (fast); the user-facing configs/rank/ run on tiny:shapes
KINDS = ("rank", "tie", "skip")


def _snapshot(folder: Path) -> dict:
    """Every file under ``folder`` -> sha256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _dump(store: FeedbackStore) -> list:
    return [a.to_json() for a in store.answers(include_undone=True)]


# ---------------------------------------------------------------------------- the answer protocol


class Rounds(Backend):
    """:class:`Backend`'s answer protocol and the real store on rounds that cost nothing to draw:
    round r (= counted answers so far, as in d3po / gallery) shows ``n`` 4x4 images coloured by r."""

    mode = "gallery"

    def __init__(self, store, n: int, max_picks: int, allow_tie: bool):
        super().__init__(SimpleNamespace(rank=SimpleNamespace(annotator=None, display_size=8)), store.path.parent, store)
        self.n, self.max_picks, self.allow_tie = n, max_picks, allow_tie

    def _make_view(self):
        from PIL import Image

        r = self.store.count(self.mode)
        imgs = [Image.new("RGB", (4, 4), (r % 256, r // 256, k)) for k in range(self.n)]
        return RoundView(self.mode, r, f"prompt {r}", imgs, "title", "instructions", self.max_picks, allow_tie=self.allow_tie)

    def _answer(self, v, kind, ranking, user=None):
        aid = self.store.add_answer(self.mode, v.round, kind, v.prompt, ranking, [{"k": k} for k in range(self.n)],
                                    round_id=v.round_id, user=user)
        return aid, "Saved."


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
                           lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=5), c, max_size=3), max_leaves=8)


def test_round_id_is_round_and_digest_of_what_was_shown():
    from PIL import Image

    from vfeedback.app.backend import round_id_of

    imgs = [Image.new("RGB", (4, 4), (0, 0, k)) for k in range(3)]
    v = RoundView("gallery", 7, "p", imgs, "t", "i", 2)
    rid = round_id_of(v)
    assert rid.startswith("r7-") and len(rid) == 3 + 16
    assert round_id_of(RoundView("gallery", 7, "p", [im.copy() for im in imgs], "x", "y", 2)) == rid  # titles are not shown data
    imgs2 = [im.copy() for im in imgs]
    imgs2[2].putpixel((3, 3), (0, 0, 3))  # one pixel of one candidate
    assert round_id_of(RoundView("gallery", 7, "p", imgs2, "t", "i", 2)) != rid
    assert round_id_of(RoundView("gallery", 7, "q", imgs, "t", "i", 2)) != rid
    assert round_id_of(RoundView("gallery", 7, "p", imgs, "t", "i", 3)) != rid


@given(round_id=json_values, ranking=json_values, kind=json_values)
@settings(max_examples=300, deadline=None)
def test_parse_answer_any_json_is_parsed_or_a_400(round_id, ranking, kind):
    try:
        rid, k, picks = parse_answer(round_id, ranking, kind)
    except AnswerError as e:
        body = e.to_json()
        assert body["ok"] is False and body["code"] == "bad_request" and body["status"] == 400
        assert body["field"] in ("round_id", "ranking", "kind") and body["error"].startswith(body["field"] + ":")
        return
    assert rid == round_id and k == kind and all(type(i) is int for i in picks)


def test_parse_answer_exact_cases():
    rid = "r12-0123456789abcdef"
    assert parse_answer(rid, "2, 0,5", "rank") == (rid, "rank", [2, 0, 5])
    assert parse_answer(rid, [3], "rank") == (rid, "rank", [3])
    assert parse_answer(rid, "", "skip") == (rid, "skip", [])
    for bad, field in [((rid, "1,,2", "rank"), "ranking"), ((rid, "1.5", "rank"), "ranking"), ((rid, [True], "rank"), "ranking"),
                       ((rid, "1", "tie"), "ranking"), ((rid, "1", "best"), "kind"), (("r12-0123456789ABCDEF", "1", "rank"), "round_id"),
                       ((None, "1", "rank"), "round_id"), ((rid, None, "rank"), "ranking"), ((rid, "9" * 10, "rank"), "ranking")]:
        with pytest.raises(AnswerError) as e:
            parse_answer(*bad)
        assert e.value.code == "bad_request" and e.value.detail["field"] == field


# one operation: ("undo", which answer it names) or ("answer", id choice, (ranking value, picks or None if malformed),
# (kind value, valid?)); mostly well-formed (the protocol's cases), some malformed (parse_answer has its own test above)
_plausible = st.lists(st.integers(0, 3), unique=True, min_size=1, max_size=4)
_picks = _plausible | _plausible | st.lists(st.integers(-1, 5), max_size=6)
_rankings = st.one_of(
    _picks.map(lambda p: (p, p)),
    _picks.map(lambda p: (",".join(map(str, p)), p)),
    st.one_of(json_values.filter(lambda x: not isinstance(x, (str, list))).map(lambda x: (x, None)),
              st.sampled_from(["1,x", "1;2", "one", "[1]", "1,,2", "0.5"]).map(lambda x: (x, None))),
)
_kinds = st.one_of(st.sampled_from(("rank", "rank", "rank", "tie", "skip")).map(lambda k: (k, True)),
                   st.sampled_from(("rank", "rank", "rank", "tie", "skip")).map(lambda k: (k, True)),
                   json_values.filter(lambda x: x not in KINDS).map(lambda k: (k, False)))
_ids = st.one_of(st.just(("current",)), st.just(("last",)), st.sampled_from([("current",), ("last",)]),
                 st.integers(0, 20).map(lambda i: ("seen", i)), st.just(("unknown", "r0-ffffffffffffffff")),
                 json_values.map(lambda x: ("garbage", x)))
# last: the newest counted answer, as its client names it; older: an earlier counted one; wrong_id: the newest round with
# another answer id (another client's answer); undone: an answer undone before; current: the round on screen (unanswered);
# garbage: a malformed round id or answer id
_undos = st.one_of(st.sampled_from(["last", "last", "older", "wrong_id", "undone", "current"]).map(lambda w: ("undo", w)),
                   json_values.map(lambda x: ("undo", "garbage_rid", x)),
                   json_values.filter(lambda x: not (type(x) is int and x > 0)).map(lambda x: ("undo", "garbage_aid", x)))
_ops = st.lists(st.one_of(_undos, st.tuples(st.just("answer"), _ids, _rankings, _kinds),
                          st.tuples(st.just("answer"), _ids, _rankings, _kinds)), min_size=1, max_size=25)
A0 = ("answer", ("current",), ([0, 1], [0, 1]), ("rank", True))


@given(ops=_ops, n=st.integers(2, 4), max_picks=st.integers(1, 4), allow_tie=st.booleans())
@example(ops=[A0, ("answer", ("last",), ("0,1", [0, 1]), ("rank", True))], n=3, max_picks=2, allow_tie=True)  # retry: replay
@example(ops=[A0, ("answer", ("last",), ([1, 0], [1, 0]), ("rank", True))], n=3, max_picks=2, allow_tie=True)  # already_answered
@example(ops=[A0, ("answer", ("last",), ("", []), ("skip", True))], n=3, max_picks=2, allow_tie=True)  # already_answered
@example(ops=[("answer", ("current",), ([0, 1, 2], [0, 1, 2]), ("rank", True))], n=3, max_picks=2, allow_tie=True)  # too_many_picks
@example(ops=[("answer", ("current",), ([0, 1], [0, 1]), ("rank", True))], n=3, max_picks=2, allow_tie=True)  # exactly max_picks
@example(ops=[("answer", ("current",), ("", []), ("tie", True))], n=2, max_picks=1, allow_tie=False)  # tie_not_allowed
@example(ops=[A0, ("undo", "last"), ("answer", ("seen", 0), ([1], [1]), ("rank", True))], n=3, max_picks=2, allow_tie=True)  # undone: open again
@example(ops=[A0, ("undo", "last"), ("answer", ("seen", 1), ([1], [1]), ("rank", True))], n=3, max_picks=2, allow_tie=True)  # round 1: stale
@example(ops=[A0, ("undo", "last"), ("undo", "undone")], n=3, max_picks=2, allow_tie=True)  # undone twice: nothing_to_undo
@example(ops=[A0, A0, ("undo", "older"), ("undo", "wrong_id"), ("undo", "current"), ("undo", "last"), ("undo", "undone"),
              ("undo", "older")], n=3, max_picks=2, allow_tie=True)  # stale undos change nothing; then the older one is last
@example(ops=[("answer", ("unknown", "r0-ffffffffffffffff"), ([0], [0]), ("rank", True))], n=3, max_picks=2, allow_tie=True)  # stale
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_answer_protocol_refuses_with_codes_and_loses_nothing(ops, n, max_picks, allow_tie):
    max_picks = min(max_picks, n)
    with tempfile.TemporaryDirectory() as d:
        store = FeedbackStore(Path(d) / "feedback.sqlite")
        b = Rounds(store, n, max_picks, allow_tie)
        counted: dict[str, tuple] = {}  # round_id -> (kind, picks): what the store must count
        order: list[str] = []  # counted ids, oldest first (only the last can be undone)
        aid_of: dict[str, int] = {}  # counted round id -> its answer id
        undone: list[tuple[str, int]] = []
        acked: set[int] = set()
        seen: list[str] = []
        try:
            for op in ops:
                cur = b.status()["round_id"]
                seen.append(cur)
                if op[0] == "undo":
                    w = op[1]
                    newest = (order[-1], aid_of[order[-1]]) if order else (cur, 1)
                    rid, aid = {"last": newest, "older": (order[0], aid_of[order[0]]) if order else newest,
                                "wrong_id": (newest[0], newest[1] + 1000), "undone": undone[0] if undone else newest,
                                "current": (cur, 1), "garbage_rid": (op[-1], newest[1]), "garbage_aid": (newest[0], op[-1])}[w]
                    if w.startswith("garbage"):
                        want = "bad_request"
                    elif not order:
                        want = "nothing_to_undo"
                    elif rid == order[-1] and aid_of[rid] == aid:
                        want = "ok"
                    else:  # not counted, another client's answer, or not the newest
                        want = "stale_undo"
                    before = _dump(store)
                    try:
                        r = b.undo(rid, aid)
                    except AnswerError as e:
                        body = e.to_json()
                        assert body["code"] == want, (op, rid, aid, body)
                        assert body["ok"] is False and body["status"] == (400 if want == "bad_request" else 409)
                        if want == "stale_undo":
                            assert f"round {int(rid[1:].split('-')[0]) + 1} ({rid})" in body["error"], body
                            assert body["counted"] == (rid in counted and aid_of[rid] == aid)
                        assert _dump(store) == before  # a refused undo changes nothing
                        continue
                    assert want == "ok", (op, r)
                    assert r["ok"] is True and r["undone"] == rid and r["answer_id"] == aid
                    counted.pop(order.pop())
                    undone.append((rid, aid_of.pop(rid)))
                    after = {a.id: a for a in store.answers(include_undone=True)}
                    assert after[aid].undone is not None  # exactly the named answer was stamped, nothing else changed
                    assert [x for x in before if x["id"] != aid] == [a.to_json() for a in after.values() if a.id != aid]
                    assert {a.round_id: (a.kind, a.ranking) for a in store.answers()} == counted
                    continue
                _, idc, (ranking, picks), (kind, kind_ok) = op
                rid = {"current": cur, "last": order[-1] if order else cur,  # last: the newest answered round (a duplicate)
                       "seen": seen[idc[1] % len(seen)] if idc[0] == "seen" else None, "unknown": idc[-1], "garbage": idc[-1]}[idc[0]]
                # what the app must answer, from the model
                id_ok = idc[0] != "garbage"  # garbage: any JSON value, text of at most 12 characters: never a round id
                malformed = not id_ok or picks is None or not kind_ok or (kind != "rank" and picks)
                if malformed:
                    want = "bad_request"
                elif rid in counted:
                    want = "replay" if counted[rid] == (kind, picks) else "already_answered"
                elif rid != cur:
                    want = "stale_round"
                elif kind == "tie" and not allow_tie:
                    want = "tie_not_allowed"
                elif kind == "rank" and (not picks or len(set(picks)) != len(picks) or not all(0 <= i < n for i in picks)):
                    want = "bad_pick"
                elif kind == "rank" and len(picks) > max_picks:
                    want = "too_many_picks"
                else:
                    want = "ok"
                before = _dump(store)
                try:
                    r = b.answer(rid, kind, ranking)
                except AnswerError as e:
                    body = e.to_json()
                    assert body["code"] == want, (op, body)
                    assert body["ok"] is False and body["status"] == {"bad_request": 400, "stale_round": 409, "already_answered": 409,
                                                                      "tie_not_allowed": 422, "bad_pick": 422, "too_many_picks": 422}[want]
                    assert _dump(store) == before  # a refusal stores nothing
                    continue
                assert want in ("ok", "replay"), (op, r)
                assert r["ok"] is True and r["answered"] == rid and r["replayed"] == (want == "replay")
                if want == "replay":
                    assert _dump(store) == before
                else:
                    assert r["answer_id"] not in acked
                    acked.add(r["answer_id"])
                    counted[rid] = (kind, picks)
                    order.append(rid)
                    aid_of[rid] = r["answer_id"]
                    assert b.status()["round_id"] != rid  # the next round is another candidate set
                # the store counts exactly the model's answers, and keeps every acknowledged one
                assert {a.round_id: (a.kind, a.ranking) for a in store.answers()} == counted
                assert acked <= {a.id for a in store.answers(include_undone=True)}
        finally:
            store.close()


def test_unique_counted_answer_per_round_id_in_the_store(tmp_path):
    with FeedbackStore(tmp_path / "feedback.sqlite") as s:
        s.add_answer("d3po", 0, "rank", "p", [1], [{}, {}], round_id="r0-0000000000000000")
        with pytest.raises(RoundAnswered):
            s.add_answer("d3po", 0, "rank", "p", [0], [{}, {}], round_id="r0-0000000000000000")
        assert [a.ranking for a in s.answers(include_undone=True)] == [[1]]
        s.undo_last("d3po")  # an undone answer leaves the round open again
        s.add_answer("d3po", 0, "rank", "p", [0], [{}, {}], round_id="r0-0000000000000000")
        assert [(a.ranking, a.undone is None) for a in s.answers(include_undone=True)] == [([1], False), ([0], True)]
        s.add_answer("zo_ranksgd", 0, "rank", "p", [0], [{}, {}], round_id="r0-0000000000000000")  # per mode


def test_store_undo_stamps_only_the_newest_counted_answer_it_names(tmp_path):
    with FeedbackStore(tmp_path / "feedback.sqlite") as s:
        a = s.add_answer("d3po", 0, "rank", "p", [1], [{}, {}], round_id="r0-00000000000000a0")
        b = s.add_answer("d3po", 1, "rank", "p", [0], [{}, {}], round_id="r1-00000000000000b1")
        z = s.add_answer("zo_ranksgd", 0, "rank", "p", [0], [{}, {}], round_id="r0-00000000000000c0")
        before = _dump(s)
        assert s.undo_answer("d3po", a) is False  # not the newest of its mode
        assert s.undo_answer("zo_ranksgd", b) is False and s.undo_answer("d3po", z) is False  # another mode's answer
        assert s.undo_answer("d3po", 999) is False
        assert _dump(s) == before
        assert s.undo_answer("d3po", b) is True
        assert s.undo_answer("d3po", b) is False  # undone already: nothing more
        assert [(x.id, x.undone is None) for x in s.answers(include_undone=True)] == [(a, True), (b, False), (z, True)]
        assert s.undo_answer("d3po", a) is True  # now the newest
        assert [x.id for x in s.answers()] == [z]


def test_schema_1_store_is_migrated_and_read_only_readable(tmp_path):
    from vfeedback.feedback.store import _SCHEMA_V1

    p = tmp_path / "feedback.sqlite"
    db = sqlite3.connect(str(p))
    db.executescript(_SCHEMA_V1)
    db.execute("INSERT INTO answers(mode, round, kind, prompt, ranking, items, created) VALUES('d3po', 0, 'rank', 'a red apple', '[1]', "
               "'[{\"noise_seed\": 1}, {\"noise_seed\": 2}]', 1.0)")
    db.execute("PRAGMA user_version=1")
    db.commit()
    db.close()
    with FeedbackStore(p, readonly=True) as ro:  # an old store exports as it is
        assert [(a.prompt, a.round_id) for a in ro.answers()] == [("a red apple", None)]
        with pytest.raises(StoreError, match="read-only"):
            ro.add_event("x")
    with FeedbackStore(p) as s:
        assert s.schema_version == SCHEMA_VERSION == 3
        assert [(a.prompt, a.ranking, a.round_id, a.user) for a in s.answers()] == [("a red apple", [1], None, None)]


def test_schema_2_store_gains_the_user_column_and_exports_it(tmp_path):
    from vfeedback.feedback.store import _SCHEMA_V1, _SCHEMA_V2

    p = tmp_path / "feedback.sqlite"
    db = sqlite3.connect(str(p))
    db.executescript(_SCHEMA_V1)
    db.executescript(_SCHEMA_V2)
    db.execute("INSERT INTO answers(mode, round, kind, prompt, ranking, items, created, round_id, annotator) VALUES('gallery', 0, "
               "'rank', 'a red apple', '[1]', '[{\"image\": \"a.png\"}, {\"image\": \"b.png\"}]', 1.0, 'r0-00', 'op')")
    db.execute("PRAGMA user_version=2")
    db.commit()
    db.close()
    with FeedbackStore(p, readonly=True) as ro:  # a schema-2 store reads as it is (no user column yet)
        assert [(a.round_id, a.user) for a in ro.answers()] == [("r0-00", None)]
    with FeedbackStore(p) as s:
        assert s.schema_version == 3
        cols = [r[1] for r in s._db.execute("PRAGMA table_info(answers)").fetchall()]
        assert cols[-1] == "user"
        s.add_answer("gallery", 1, "rank", "a blue cup", [0], [{"image": "c.png"}, {"image": "d.png"}], round_id="r1-00",
                     user="alice")
        assert [a.user for a in s.answers()] == [None, "alice"]
        n = s.export_jsonl(tmp_path / "prefs.jsonl")
    recs = [json.loads(x) for x in (tmp_path / "prefs.jsonl").read_text().splitlines()]
    assert n == 2 and ["user" in r for r in recs] == [False, True] and recs[1]["user"] == "alice"
    assert recs[1]["chosen"]["image"] == "c.png" and recs[0]["annotator"] == "op"


# ---------------------------------------------------------------------------- the writer lock

HOLDER = r"""
import sys, time
from vfeedback.feedback.store import FeedbackStore
s = FeedbackStore(sys.argv[1])
print("READY", flush=True)
time.sleep(600)
"""


def test_writer_lock_refuses_a_second_writer_and_dies_with_its_process(tmp_path):
    path = tmp_path / "feedback.sqlite"
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert p.stdout.readline().strip() == "READY", p.stderr.read()
        with pytest.raises(StoreLocked) as e:
            FeedbackStore(path)
        assert e.value.holder["pid"] == p.pid and f"pid {p.pid}" in str(e.value) and "one app per run folder" in str(e.value)
        with FeedbackStore(path, readonly=True) as ro:  # readers need no lock
            assert ro.count() == 0
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    with FeedbackStore(path) as s:  # the lock died with the process
        s.add_event("after")
    with FeedbackStore(path) as s:  # and close() drops it
        assert [e["kind"] for e in s.events()] == ["after"]
    with FeedbackStore(path, readonly=True) as ro:  # a reader removes the SQLite side files it made
        assert ro.count() == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["feedback.sqlite", "feedback.sqlite.lock"]


# ---------------------------------------------------------------------------- export never overwrites


def _d3po_store(out: Path) -> None:
    with FeedbackStore(out / "feedback.sqlite") as s:
        s.set_meta("mode", "d3po")
        s.add_answer("d3po", 0, "rank", "a red apple", [1], [{"noise_seed": 1, "image": "rank/d3po/a.png"},
                                                           {"noise_seed": 2, "image": "rank/d3po/b.png"}],
                     ranks=[2, 1], context={"latent_seed": 5}, round_id="r0-00000000000000aa")
    (out / "config.yaml").write_text("# the app's config\n")


@pytest.mark.parametrize("target, why", [
    ("feedback.sqlite", "is the feedback store"),
    ("./rank/../feedback.sqlite", "is the feedback store"),
    ("feedback.sqlite-wal", "is the feedback store"),  # a JSONL WAL would be read as the store's journal
    ("feedback.sqlite-shm", "is the feedback store"),
    ("feedback.sqlite.lock", "is the feedback store"),
    ("config.yaml", "exists in the run folder"),
    ("rank", "is a folder"),
    ("link-to-store.jsonl", "is the feedback store"),
    ("hardlink-to-store.jsonl", "is the feedback store"),
])
def test_export_onto_the_store_or_what_it_did_not_create_is_refused(tmp_path, capsys, target, why):
    out = tmp_path / "run"
    (out / "rank").mkdir(parents=True)
    _d3po_store(out)
    (out / "link-to-store.jsonl").symlink_to(out / "feedback.sqlite")
    os.link(out / "feedback.sqlite", out / "hardlink-to-store.jsonl")
    before = _snapshot(out)
    rc = main(["rank", str(CONFIGS / "tiny-d3po.yaml"), f"output_dir={out}", "--export", str(out / target)])
    err = capsys.readouterr().err
    assert rc == 2 and why in err and "--export" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert _snapshot(out) == before  # not a byte changed, nothing created (no temp file left)
    with FeedbackStore(out / "feedback.sqlite", readonly=True) as s:
        assert [a.ranking for a in s.answers()] == [[1]]


def test_export_writes_new_file_replaces_its_own_and_works_beside_a_running_writer(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    _d3po_store(out)
    writer = FeedbackStore(out / "feedback.sqlite")  # the app holds the writer lock meanwhile
    try:
        exp = tmp_path / "labels.jsonl"
        for _ in range(2):  # the second export replaces the first (an earlier export)
            assert main(["rank", str(CONFIGS / "tiny-d3po.yaml"), f"output_dir={out}", "--export", str(exp)]) == 0
            assert "wrote 1 preference records" in capsys.readouterr().out
            recs = [json.loads(line) for line in exp.read_text().splitlines()]
            assert len(recs) == 1 and recs[0]["chosen"]["noise_seed"] == 2 and recs[0]["round_id"] == "r0-00000000000000aa"
            assert recs[0]["chosen"]["image"] == "run/rank/d3po/b.png"  # relative to the export's folder
        other = tmp_path / "notes.jsonl"
        other.write_text('{"prompt": "mine", "chosen": {}, "rejected": {}}\n')  # a JSONL the app did not write
        assert main(["rank", str(CONFIGS / "tiny-d3po.yaml"), f"output_dir={out}", "--export", str(other)]) == 2
        assert "not an earlier export" in capsys.readouterr().err and other.read_text().startswith('{"prompt": "mine"')
        # inside the run folder: a new file is fine, an existing one (even an export) is not replaced
        inside = out / "labels.jsonl"
        assert main(["rank", str(CONFIGS / "tiny-d3po.yaml"), f"output_dir={out}", "--export", str(inside)]) == 0
        capsys.readouterr()
        first = inside.read_bytes()
        assert main(["rank", str(CONFIGS / "tiny-d3po.yaml"), f"output_dir={out}", "--export", str(inside)]) == 2
        assert "exists in the run folder" in capsys.readouterr().err and inside.read_bytes() == first
        writer.add_event("still writable")
    finally:
        writer.close()


# ---------------------------------------------------------------------------- CLI flags, output_dir


def test_rank_flags_are_validated_like_config_fields(tmp_path, capsys):
    cfg = str(CONFIGS / "tiny-zo.yaml")
    new = tmp_path / "new"
    for port in ("70000", "-1"):
        assert main(["rank", cfg, f"output_dir={new}", "--port", port]) == 2
        err = capsys.readouterr().err
        assert f"--port: {port} is out of range" in err and "Traceback" not in err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["rank", cfg, f"output_dir={new}", "--port", str(port)]) == 2
        err = capsys.readouterr().err
        assert f"--port: port {port} on 127.0.0.1 is in use" in err and "Traceback" not in err
        assert main(["rank", cfg, f"output_dir={new}", f"rank.port={port}"]) == 2
        assert f"rank.port: port {port}" in capsys.readouterr().err
    assert not new.exists()  # refused before anything was created
    assert main(["rank", cfg, f"output_dir={new}", "--host", "300.1.1.1", "--auth", "a:b"]) == 2
    assert "--host 300.1.1.1" in capsys.readouterr().err
    (tmp_path / "adir").mkdir()
    assert main(["rank", cfg, f"output_dir={new}", "--auth-file", str(tmp_path / "adir")]) == 2
    assert "--auth-file" in capsys.readouterr().err
    assert main(["rank", cfg, f"output_dir={tmp_path}", "--export", str(tmp_path / "adir")]) == 2  # no store there yet
    assert "does not exist" in capsys.readouterr().err


def test_output_dir_that_is_not_an_app_run_folder_is_refused(tmp_path, capsys):
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_rsa").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    before = _snapshot(home)
    rc = main(["rank", str(CONFIGS / "tiny-zo.yaml"), f"output_dir={home}", "--port", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and "not a run folder of `vfeedback rank`" in err and ".ssh" in err and "Traceback" not in err
    assert _snapshot(home) == before and sorted(p.name for p in home.iterdir()) == [".ssh"]


# ---------------------------------------------------------------------------- the real app: clients, HTTP, a second app


@pytest.fixture(scope="module")
def zo_app(tmp_path_factory):
    pytest.importorskip("gradio_client")
    from gradio_client import Client

    from vfeedback.commands.rank import launch
    from vfeedback.config import load_config

    out = tmp_path_factory.mktemp("zo") / "run"
    cfg = load_config(CONFIGS / "tiny-zo.yaml", [f"output_dir={out}", "sampling.steps=2"])
    demo, url, backend = launch(cfg, port=0, block=False)
    try:
        yield SimpleNamespace(url=url, backend=backend, out=out, cfg=cfg, client=lambda: Client(url, verbose=False))
    finally:
        demo.close()
        backend.close()


def _rows(out):
    db = sqlite3.connect(f"file:{out / 'feedback.sqlite'}?mode=ro", uri=True)
    try:
        return db.execute("SELECT round, kind, ranking, round_id, undone FROM answers ORDER BY id").fetchall()
    finally:
        db.close()


def test_two_clients_answer_one_round_at_once(zo_app):
    a, b = zo_app.client(), zo_app.client()
    n0 = len(_rows(zo_app.out))
    sa, sb = a.predict(api_name="/status"), b.predict(api_name="/status")
    assert sa["round_id"] == sb["round_id"] and sa["round_mode"] == "gradient"
    rid = sa["round_id"]
    go = threading.Barrier(2)
    res = {}

    def send(name, c, ranking):
        go.wait()
        res[name] = c.predict(rid, ranking, "rank", api_name="/answer")

    ts = [threading.Thread(target=send, args=("a", a, "3,0")), threading.Thread(target=send, args=("b", b, "1"))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    won = [k for k, r in res.items() if r["ok"]]
    assert len(won) == 1, res
    lost = "b" if won == ["a"] else "a"
    assert res[lost]["code"] == "already_answered" and res[lost]["status"] == 409 and res[lost]["current_round_id"] != rid
    rows = _rows(zo_app.out)[n0:]
    winning = "[3, 0]" if won == ["a"] else "[1]"
    assert rows == [(sa["round"], "rank", winning, rid, None)]  # one answer, filed under the round both saw
    # the loser retries the winning answer (e.g. after a lost reply): idempotent, nothing stored
    r = (b if lost == "b" else a).predict(rid, winning.strip("[]").replace(" ", ""), "rank", api_name="/answer")
    assert r["ok"] and r["replayed"] and len(_rows(zo_app.out)) == n0 + 1
    # a stale id (well formed, never shown) and too many picks are refused; nothing stored
    r = a.predict("r0-0123456789abcdef", "0", "rank", api_name="/answer")
    assert r["code"] == "stale_round" and r["status"] == 409
    s = a.predict(api_name="/status")
    r = a.predict(s["round_id"], ",".join(map(str, range(s["max_picks"] + 1))), "rank", api_name="/answer")
    assert r["code"] == "too_many_picks" and r["status"] == 422 and r["max_picks"] == s["max_picks"]
    assert len(_rows(zo_app.out)) == n0 + 1


def test_two_clients_undo_only_their_own_newest_answer(zo_app):
    a, b = zo_app.client(), zo_app.client()
    n0 = len(_rows(zo_app.out))
    rid0 = a.predict(api_name="/status")["round_id"]
    ra = a.predict(rid0, "0", "rank", api_name="/answer")
    rb = b.predict(ra["round_id"], "0", "rank", api_name="/answer")  # b answers the next round
    assert ra["ok"] and rb["ok"] and ra["answered"] == rid0 and rb["answered"] != rid0
    rows = _rows(zo_app.out)
    # a's answer is no longer the last one; b's round is not a's answer; no round named at all
    for args, words in [((rid0, ra["answer_id"]), "is no longer the last answered round"),
                        ((rb["answered"], ra["answer_id"]), "was answered by another client"),
                        ((rb["answered"], True), "answer_id: expected"), ((), "round_id: expected")]:
        r = a.predict(*args, api_name="/undo_answer")
        assert r["ok"] is False and r["code"] == ("bad_request" if len(args) < 2 or args[1] is True else "stale_undo"), r
        assert words in r["error"] and "Traceback" not in r["error"]
        if r["code"] == "stale_undo":
            assert f"({args[0]})" in r["error"] and r["last_round_id"] == rb["answered"] and r["status"] == 409
        assert _rows(zo_app.out) == rows  # nothing changed
    # b's undo sent twice at the same moment (a double click): one takes b's answer back, the other is
    # refused; a's answer, now the newest, is not taken with it
    go = threading.Barrier(2)
    res = []

    def send(c):
        go.wait()
        res.append(c.predict(rb["answered"], rb["answer_id"], api_name="/undo_answer"))

    ts = [threading.Thread(target=send, args=(c,)) for c in (b, zo_app.client())]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    assert sorted(r["ok"] for r in res) == [False, True], res
    lost = next(r for r in res if not r["ok"])
    assert lost["code"] == "stale_undo" and lost["counted"] is False and "has no counted answer" in lost["error"]
    rows = _rows(zo_app.out)[n0:]
    assert [(r[3], r[4] is None) for r in rows] == [(rid0, True), (rb["answered"], False)]
    assert a.predict(api_name="/status")["round_id"] == rb["answered"]  # b's round is shown again
    r = a.predict(rid0, ra["answer_id"], api_name="/undo_answer")  # now a's answer is the newest: a may undo it
    assert r["ok"] and r["undone"] == rid0 and r["round_id"] == rid0 and r["answers"] == zo_app.backend.count()
    assert all(row[4] is not None for row in _rows(zo_app.out)[n0:])


def _post(url, data):
    import httpx

    # the body as a client may send it: Python's json writes NaN / Infinity for non-finite floats
    # (httpx's json= refuses them), and a malformed client may do the same
    r = httpx.post(url.rstrip("/") + "/gradio_api/call/answer", content=json.dumps({"data": data}),
                   headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 200, r.text
    r2 = httpx.get(url.rstrip("/") + f"/gradio_api/call/answer/{r.json()['event_id']}", timeout=120)
    event = r2.text.split("\n", 1)[0]
    payload = r2.text.split("data: ", 1)[1].strip()
    return event, json.loads(payload)


@given(data=st.lists(json_values, max_size=4) | st.tuples(st.just("<current>"), json_values, json_values).map(list))
@example(data=[float("inf")])  # non-finite numbers in the body (a CI run found this one)
@example(data=["<current>", float("nan"), "zo"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_malformed_http_bodies_get_structured_errors_and_no_traceback(zo_app, capfd, data):
    cur = zo_app.backend.status()["round_id"]
    data = [cur if x == "<current>" else x for x in data]
    before = _rows(zo_app.out)
    event, payload = _post(zo_app.url, data)
    assert event == "event: complete", payload
    r = payload[0]
    if r["ok"]:  # a valid answer after all (current id, valid picks): stored once
        assert len(_rows(zo_app.out)) == len(before) + 1 and _rows(zo_app.out)[-1][3] == cur
    else:
        assert r["code"] in ("bad_request", "stale_round", "already_answered", "bad_pick", "too_many_picks") and isinstance(r["error"], str)
        assert _rows(zo_app.out) == before
    assert "Traceback" not in capfd.readouterr().err


def test_run_folder_files_the_app_did_not_write_are_not_served(zo_app):
    import httpx

    secret = zo_app.out / ".ssh" / "id_rsa"
    secret.parent.mkdir(exist_ok=True)
    secret.write_text("PRIVATE-KEY-BYTES")
    for f in (secret, zo_app.out / "config.yaml", zo_app.out / "feedback.sqlite", zo_app.out / "rank" / ".." / ".ssh" / "id_rsa"):
        r = httpx.get(f"{zo_app.url.rstrip('/')}/gradio_api/file={f}")
        assert r.status_code in (403, 404) and b"PRIVATE-KEY" not in r.content and b"SQLite" not in r.content


def test_second_app_on_a_run_folder_in_use_is_refused(zo_app, capsys):
    # the command's own code path in this process: flock refuses a second open file description
    # of the lock file in the same process as in another (the cross-process case and the lock's
    # death with its process: test_writer_lock_refuses_a_second_writer_and_dies_with_its_process)
    before = _rows(zo_app.out)
    files = sorted(p.name for p in zo_app.out.iterdir())
    rc = main(["rank", str(CONFIGS / "tiny-zo.yaml"), f"output_dir={zo_app.out}", "sampling.steps=2", "--port", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and f"is in use by another writer (pid {os.getpid()}" in err and "one app per run folder" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert _rows(zo_app.out) == before and sorted(p.name for p in zo_app.out.iterdir()) == files
    assert zo_app.client().predict(api_name="/status")["answers"] == zo_app.backend.count()  # the first app serves on


def test_user_box_value_is_checked():
    from vfeedback.app.backend import AnswerError, parse_user

    assert parse_user(None) is None and parse_user("   ") is None
    assert parse_user("  Ada   Lovelace ") == "Ada Lovelace"
    assert parse_user("x" * 64) == "x" * 64
    for bad in ("x" * 65, "a\x00b", 3, ["alice"]):
        with pytest.raises(AnswerError) as e:
            parse_user(bad)
        assert e.value.status == 400 and "user" in e.value.message
