"""kill -9 the feedback store's writer and the ranking app between and during answers: no
acknowledged answer is lost, no half-written one appears, a restart resumes the round, and a
client's retry of its answer after the crash is stored exactly once."""
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

WRITER = r"""
import os, sys
from vfeedback.feedback.store import FeedbackStore
store = FeedbackStore(sys.argv[1])
blob = os.urandom(256 * 1024)  # a big optimiser state, so a kill often lands mid-write
i = 0
while True:
    aid = store.add_answer("zo_ranksgd", i, "rank", f"prompt {i}", [i % 6, (i + 1) % 6],
                           [{"seed": i, "k": k} for k in range(6)], context={"i": i}, state=blob + i.to_bytes(4, "little"))
    print(f"ACK {aid} {i}", flush=True)
    i += 1
"""


def _check_store(path, acked):
    db = sqlite3.connect(str(path))
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = db.execute("SELECT id, round, ranking, items, context, length(state) FROM answers ORDER BY id").fetchall()
    finally:
        db.close()
    ids = {r[0] for r in rows}
    assert acked <= ids, f"acknowledged answers lost: {sorted(acked - ids)}"
    for rid, rnd, ranking, items, ctx, n in rows:  # every row whole
        assert len(json.loads(ranking)) == 2 and len(json.loads(items)) == 6 and "i" in json.loads(ctx)
        assert n == 256 * 1024 + 4
    return rows


def test_kill_9_during_and_between_store_writes_loses_nothing_acknowledged(tmp_path):
    path = tmp_path / "feedback.sqlite"
    rng = random.Random(0)
    acked: set[int] = set()
    for attempt in range(6):
        p = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        want = rng.randint(1, 15)
        got = 0
        while got < want:
            line = p.stdout.readline()
            assert line, p.stderr.read()[-2000:]
            acked.add(int(line.split()[1]))
            got += 1
        time.sleep(rng.uniform(0, 0.02))  # sometimes between answers, sometimes inside one
        p.send_signal(signal.SIGKILL)
        p.wait()
        for line in p.stdout:  # answers acknowledged before the kill landed
            if line.startswith("ACK"):
                acked.add(int(line.split()[1]))
        rows = _check_store(path, acked)
    assert len(acked) >= 6 and len(rows) >= len(acked)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_app(cfg_path, out, port):
    p = subprocess.Popen([sys.executable, "-m", "vfeedback", "rank", str(cfg_path), f"output_dir={out}", "sampling.steps=4",
                          "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    from gradio_client import Client

    deadline = time.time() + 240
    while time.time() < deadline:
        if p.poll() is not None:
            raise AssertionError(p.stderr.read().decode()[-3000:])
        try:
            return p, Client(f"http://127.0.0.1:{port}/", verbose=False)
        except Exception:
            time.sleep(1)
    p.kill()
    raise AssertionError("app did not start")


def test_kill_9_the_ranking_app_between_and_during_answers(tmp_path):
    pytest.importorskip("gradio_client")
    cfg = ROOT / "tests" / "configs" / "rank" / "tiny-zo.yaml"
    out = tmp_path / "app"
    port = _free_port()
    p, c = _start_app(cfg, out, port)
    try:
        ids = [c.predict(api_name="/status")["round_id"]]
        assert c.predict(ids[0], "3,0", "rank", api_name="/answer")["ok"]
        ids.append(c.predict(api_name="/status")["round_id"])
        assert c.predict(ids[1], "1", "rank", api_name="/answer")["ok"]
        shown = c.predict(api_name="/status")
    finally:
        p.send_signal(signal.SIGKILL)  # between answers
        p.wait()
    p, c = _start_app(cfg, out, port)
    try:
        s = c.predict(api_name="/status")
        assert s["answers"] == 2 and s["round"] == shown["round"] == 2
        job = c.submit(s["round_id"], "4,5,2", "rank", api_name="/answer")  # and kill while it is being answered
        time.sleep(0.05)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    db = sqlite3.connect(str(out / "feedback.sqlite"))
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = db.execute("SELECT round, ranking FROM answers ORDER BY id").fetchall()
    finally:
        db.close()
    assert rows[:2] == [(0, "[3, 0]"), (1, "[1]")]
    assert len(rows) in (2, 3) and (len(rows) == 2 or rows[2] == (2, "[4, 5, 2]"))  # all or nothing
    p, c = _start_app(cfg, out, port)
    try:
        s = c.predict(api_name="/status")
        assert s["answers"] == len(rows) and s["round"] == len(rows)
        # the client retries what it sent before the crash: stored once either way (idempotent)
        r = c.predict(shown["round_id"], "4,5,2", "rank", api_name="/answer")
        assert r["ok"] and r["replayed"] == (len(rows) == 3) and r["answers"] == 3, r
        r = c.predict(ids[1], "1", "rank", api_name="/answer")  # an acknowledged answer, retried
        assert r["ok"] and r["replayed"] and r["answers"] == 3
        r = c.predict(ids[1], "0", "rank", api_name="/answer")  # a different answer to an answered round
        assert r["code"] == "already_answered" and r["answers"] == 3
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    db = sqlite3.connect(str(out / "feedback.sqlite"))
    try:
        assert db.execute("SELECT round, ranking FROM answers ORDER BY id").fetchall() == [(0, "[3, 0]"), (1, "[1]"), (2, "[4, 5, 2]")]
    finally:
        db.close()
