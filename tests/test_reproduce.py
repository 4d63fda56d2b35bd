"""bench/reproduce.py: the docs' figure blocks are what their committed JSON renders, and a rerun
outside a figure's band fails naming the figure and the value."""
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module():
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "bench" / "reproduce.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_committed_docs_match_their_json():
    rp = _module()
    assert rp.main(["--check-docs"]) == 0
    for name in rp.FIGURES:  # every figure has its committed source
        rec = json.loads((rp.RESULTS / f"{name}.json").read_text())
        assert rec["figure"] == name and set(rec["band"]) <= set(rec["measured"])


def test_a_typed_figure_is_caught(tmp_path, monkeypatch, capsys):
    rp = _module()
    for doc in {d for s in rp.FIGURES.values() for d in s["docs"]}:
        (tmp_path / doc).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / doc, tmp_path / doc)
    monkeypatch.setattr(rp, "ROOT", tmp_path)
    readme = tmp_path / "README.md"
    text = readme.read_text()
    start = text.index("<!-- figure:quickstart -->")
    i = text.index("→", start)  # change the first measured value after an arrow by hand
    readme.write_text(text[: i + 2] + "9" + text[i + 3 :])
    assert rp.main(["--check-docs"]) == 1
    assert "README.md" in capsys.readouterr().err
    assert rp.main(["--docs"]) == 0  # regenerated from the JSON ...
    assert readme.read_text() == text  # ... the committed text comes back


def test_out_of_band_names_the_figure_and_value():
    rp = _module()
    committed = {"measured": {"a": 0.250, "b": 0.100}, "band": {"a": 0.02, "b": 0.02}}
    assert rp.compare("fig", committed, {"measured": {"a": 0.2699, "b": 0.0801}}) == []
    bad = rp.compare("fig", committed, {"measured": {"a": 0.2701, "b": 0.100}})
    assert len(bad) == 1 and "figure 'fig'" in bad[0] and "a = 0.2701" in bad[0] and "±0.02" in bad[0]
    assert rp.compare("fig", committed, {"measured": {"a": float("nan"), "b": 0.1}})  # NaN is never in band


def test_unknown_figure_is_a_user_error(capsys):
    rp = _module()
    assert rp.main(["--only", "nope"]) == 2
    assert "unknown figure" in capsys.readouterr().err
