"""Issue #16: `vfeedback rank` argument lists, generated (Hypothesis).

Every generated list holds valid flags and overrides in a random order plus exactly one defect:
an unknown flag, a flag without its value, a value of the wrong type, a non-finite or
out-of-range number, an empty value, a path that is a folder, missing, or a file the app did
not write (the store, an existing JSONL), or a flag that does not apply with ``--export``. Each
must exit with code 2 and a one-line message naming the flag (and the value where there is one),
print no traceback, and change no byte of what is on disk. ``main`` runs in this process; a
list that would start the app is caught before any model loads (the backends are replaced by a
stub that fails the test). ``HYPOTHESIS_EXAMPLES=500`` runs more examples.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from vfeedback.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "tests" / "configs" / "rank" / "tiny-d3po.yaml"
N = int(os.environ.get("HYPOTHESIS_EXAMPLES", "0"))


class Started(Exception):
    """The command got as far as building a backend: it accepted the command line."""


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A run folder of the app (a d3po store, its config), a file the app did not write, a folder,
    and a folder a test may not write into."""
    from vfeedback.feedback.store import FeedbackStore

    top = tmp_path_factory.mktemp("rank-cli")
    run = top / "run"
    run.mkdir()
    with FeedbackStore(run / "feedback.sqlite") as s:
        s.set_meta("mode", "d3po")
        s.add_answer("d3po", 0, "rank", "a red apple", [1], [{"noise_seed": 1}, {"noise_seed": 2}], ranks=[2, 1],
                     context={"latent_seed": 5}, round_id="r0-00000000000000aa")
    (run / "config.yaml").write_text("# the app's config\n")
    (top / "notes.jsonl").write_text('{"prompt": "mine", "chosen": {}, "rejected": {}}\n')
    (top / "adir").mkdir()
    (top / "logins.txt").write_text("alice:secret\n")
    return top


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(folder.rglob("*"))}


# valid fragments of an app command line (each alone would start the app)
APP_OK = [["--port", "0"], ["--host", "127.0.0.1"], ["--host", "localhost"], ["--open"], ["--auth", "alice:secret"],
          ["--auth-file", "{top}/logins.txt"], ["sampling.steps=2"], ["rank.display_size=64"], ["seed=3"]]
OVERRIDES_OK = [["sampling.steps=2"], ["rank.display_size=64"], ["seed=3"]]
NUMBERS = ["nan", "inf", "-inf", "NaN", "1e999", "-1e999", "1.5", "1e3", "0x10", "abc", "", " "]

# one defect: (fragment, words the message must hold, where it may go: "any" | "last" | "export")
DEFECTS = st.one_of(
    # unknown flags (some close to real ones), an unknown config key
    st.sampled_from(["--bogus", "--exprot", "--ports", "-x", "--auth_file", "--Export"]).map(lambda f: ([f], [f], "any")),
    st.sampled_from([("bogus.key=1", "bogus"), ("rank.bogus=2", "rank.bogus"), ("sampling.stepz=3", "sampling.stepz")])
    .map(lambda o: ([o[0]], [o[1], "unknown key"], "any")),
    # a flag without its value (at the end, or followed by another flag)
    st.sampled_from(["--port", "--host", "--export", "--auth", "--auth-file"]).map(lambda f: ([f], [f, "expected one argument"], "last")),
    st.sampled_from(["--port", "--host", "--export", "--auth-file"]).map(lambda f: ([f, "--open"], [f, "expected one argument"], "any")),
    # wrong types and non-finite numbers for --port; a value for a switch
    # (argparse reads a value like "-inf" after a space as a flag: "expected one argument"; with "=" it is the value)
    st.sampled_from(NUMBERS).map(lambda v: (["--port", v], ["--port"] + ([] if v.startswith("-") else [repr(v)]), "any")),
    st.sampled_from(NUMBERS).map(lambda v: ([f"--port={v}"], ["--port", repr(v)], "any")),
    st.sampled_from(["--share=yes", "--open=1"]).map(lambda f: ([f], [f.split("=")[0], "ignored explicit argument"], "any")),
    # out-of-range ports
    st.sampled_from(["-1", "65536", "70000", str(2**70)]).map(lambda v: (["--port", v], ["--port", v, "out of range"], "any")),
    st.integers(65536, 2**80).map(lambda v: (["--port", str(v)], ["--port", str(v), "out of range"], "any")),
    # non-finite, wrong-typed and out-of-range numbers in config overrides
    st.tuples(st.sampled_from(["seed", "rank.port", "sampling.steps", "sampling.guidance_scale", "rank.display_size", "sampling.eta"]),
              st.sampled_from(["nan", "inf", "-inf", ".nan", ".inf", "abc", "[1]"]))
    .map(lambda kv: ([f"{kv[0]}={kv[1]}"], [kv[0]], "any")),
    st.sampled_from(["rank.port=70000", "rank.display_size=-3", "sampling.steps=0"]).map(lambda o: ([o], [o.split("=")[0]], "any")),
    # empty values
    st.sampled_from(["--host", "--auth-file", "--export"]).map(lambda f: ([f, " " if f == "--export" else ""], [f, "empty"], "any")),
    # logins that are not USER:PASSWORD; files that are not logins
    st.sampled_from(["nopassword", ":secret", "alice:", ""]).map(lambda v: (["--auth", v], ["--auth", "USER:PASSWORD"], "any")),
    st.sampled_from(["{top}/adir", "{top}/missing.txt", "{top}/run/feedback.sqlite", "{top}/notes.jsonl"])
    .map(lambda p: (["--auth-file", p], ["--auth-file"], "any")),
    # the app exposed without a login
    st.just((["--share"], ["--share", "--auth"], "nologin")),
    st.just((["--host", "0.0.0.0"], ["--host 0.0.0.0", "login"], "nologin")),
    # --export onto what the app must not write: a folder, the store, its side files, the config, a file it did not write
    st.sampled_from(["{top}/adir", "{top}/run/feedback.sqlite", "{top}/run/feedback.sqlite-wal", "{top}/run/config.yaml",
                     "{top}/notes.jsonl", "{top}/run"]).map(lambda p: (["--export", p], ["--export"], "export")),
    # --export with a flag of the app
    st.sampled_from(APP_OK[:6]).map(lambda f: (["--export", "{top}/new.jsonl", *f], ["--export", f[0], "does not apply"], "export")),
    # the config: a folder, missing, not a config (the store, a JSONL)
    st.sampled_from(["{top}/adir", "{top}/missing.yaml", "{top}/run/feedback.sqlite", "{top}/notes.jsonl"])
    .map(lambda p: (["CONFIG", p], [p], "config")),
)


@st.composite
def command_lines(draw):
    frag, words, where = draw(DEFECTS)
    config = str(CONFIG)
    if where == "config":
        config, frag = frag[1], []
    pool = OVERRIDES_OK if where == "export" else [f for f in APP_OK if not (where == "nologin" and f[0] in ("--auth", "--auth-file"))]
    fillers = draw(st.lists(st.sampled_from(pool), max_size=3, unique_by=lambda f: f[0]))
    fillers = [f for f in fillers if f[0] not in frag]  # a flag given once
    if where == "nologin":
        fillers = [f for f in fillers if f[0] not in ("--host", "--share")]
    parts = fillers + ([frag] if frag and where != "last" else [])
    order = draw(st.permutations(range(len(parts))))
    argv = ["rank", config, "output_dir={top}/run"] + [x for i in order for x in parts[i]]
    if where == "last":
        argv += frag
    return argv, words


@settings(max_examples=N or 40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=command_lines())
@example(case=(["rank", str(CONFIG), "output_dir={top}/run", "--export", ""], ["--export", "empty"]))  # was: started the app
@example(case=(["rank", str(CONFIG), "output_dir={top}/run", "--auth-file", ""], ["--auth-file", "empty"]))  # was: started the app
@example(case=(["rank", str(CONFIG), "output_dir={top}/run", "--host", ""], ["--host", "empty"]))  # was: 127.0.0.1
@example(case=(["rank", str(CONFIG), "output_dir={top}/run", "--export", "{top}/new.jsonl", "--port", "70000"],
               ["--export", "--port", "does not apply"]))  # was: the export, the port ignored
def test_rank_command_lines_with_one_defect_exit_2_with_one_line(world, capsys, monkeypatch, case):
    from vfeedback.app import backend as backend_mod

    def started(*a, **k):
        raise Started("the command line was accepted")

    for cls in ("ZOBackend", "D3POBackend", "GalleryBackend"):
        monkeypatch.setattr(backend_mod, cls, started)
    argv, words = case
    top = str(world)
    argv = [a.replace("{top}", top) for a in argv]
    words = [w.replace("{top}", top) for w in words]
    capsys.readouterr()
    before = _snapshot(world)
    try:
        rc = main(argv)
    except Started:
        pytest.fail(f"accepted: {argv}")
    finally:
        for extra in world.iterdir():  # nothing new (an export, a run folder) is left whatever happened
            if extra.name not in ("run", "notes.jsonl", "adir", "logins.txt"):
                shutil.rmtree(extra) if extra.is_dir() else extra.unlink()
    out, err = capsys.readouterr()
    assert rc == 2, (argv, out, err)
    assert "Traceback" not in err and out == "", (argv, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), (argv, err)
    assert all(w in lines[0] for w in words), (argv, words, err)
    assert _snapshot(world) == before, argv  # not a byte changed, nothing created
