"""bench/reproduce.py: the docs' figure blocks are what their committed JSON renders, and a rerun
outside a figure's band fails naming the figure and the value."""
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

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
    docs = {d for s in rp.FIGURES.values() for d in s["docs"]} | {d for _, ds in rp.DOC_TABLES.values() for d in ds}
    for doc in docs:
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


def _world_compare():
    spec = importlib.util.spec_from_file_location("world_compare", ROOT / "bench" / "world_compare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_paired_bootstrap_interval_of_a_change():
    wc = _world_compare()
    assert wc.paired_delta_ci([0] * 10, [1] * 10) == [1.0, 1.0]  # every caption gained: no spread
    assert wc.paired_delta_ci([1, 0, 1, 0], [1, 0, 1, 0]) == [0.0, 0.0]
    # 400 captions, each changed by +1 or -1 with equal counts: the mean change 0 has standard
    # error sqrt(1 / 400) = 0.05, so a 95% interval is about +-1.96 * 0.05 (a 90% one: +-0.082)
    before = [0] * 200 + [1] * 200
    after = [1] * 200 + [0] * 200
    lo, hi = wc.paired_delta_ci(before, after)
    assert lo == pytest.approx(-0.098, abs=0.008) and hi == pytest.approx(0.098, abs=0.008)
    lo2, hi2 = wc.paired_delta_ci(after, before)  # the other direction mirrors the interval
    assert (lo2, hi2) == (pytest.approx(-hi, abs=1e-9), pytest.approx(-lo, abs=1e-9))
    with pytest.raises(ValueError, match="pairing"):
        wc.paired_delta_ci([0, 1], [0, 1, 1])


def test_world_table_says_which_rows_move():
    rp = _module()
    acc = lambda a: {"overall": {"accuracy": a, "n": 6}}  # noqa: E731
    row = lambda b, a, ci, gap: {"budget_images": 320, "train_judge_accuracy": [0.2, a + gap], "wall_time_s": 125.0,  # noqa: E731
                                 "heldout_judge_accuracy": [b, a], "heldout_delta_ci95": ci, "gap": gap}
    r = {"command": "python bench/world_compare.py", "machine": "2 CPU cores", "eval": {"sampler": "DDIM"},
         "base": {"train_judge": acc(0.2), "heldout_judge": acc(0.1)},
         "methods": {"refl": row(0.1, 0.3, [0.05, 0.35], 0.01), "d3po": row(0.1, 0.05, [-0.1, 0.0], 0.0),
                     "raft": row(0.1, 0.02, [-0.12, -0.04], -0.02)}}
    text = rp._render_world_compare(r)
    assert "| ReFL | 320 | 0.310 | 0.300 | +0.200 [+0.050, +0.350] | +0.010 | 2 min |" in text
    assert "above 0: ReFL (320); below 0: RAFT (online, best of 8) (320);" in text  # D3PO's touches 0: noise
    assert "6 held-out captions (2 per kind)" in text


def test_world_compare_evaluation_is_cached_per_lora_and_settings(tmp_path, monkeypatch):
    wc = _world_compare()
    calls = []

    def fake_evaluate(model, prompts, kinds, seeds):
        calls.append(model)
        return torch.full((len(prompts), 3, 2, 2), float(len(calls))), {"n": len(calls)}

    monkeypatch.setattr(wc, "evaluate", fake_evaluate)
    cache = tmp_path / "eval.pt"
    prompts = [f"p{i}" for i in range(16)]
    imgs, ev = wc.cached_evaluate(cache, "lora-a;n=96", lambda: "model-a", prompts, None, None)
    assert ev == {"n": 1} and imgs.shape == (8, 3, 2, 2)  # only the grid's row of 8 is kept
    imgs2, ev2 = wc.cached_evaluate(cache, "lora-a;n=96", lambda: "model-a", prompts, None, None)
    assert calls == ["model-a"] and ev2 == ev and torch.equal(imgs2, imgs)  # read back, not resampled
    _, ev3 = wc.cached_evaluate(cache, "lora-b;n=96", lambda: "model-b", prompts, None, None)
    assert calls == ["model-a", "model-b"] and ev3 == {"n": 2}  # another LoRA file: evaluated again
