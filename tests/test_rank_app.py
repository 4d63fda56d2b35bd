"""The ranking app (`vfeedback rank`): every mode driven through gradio_client on tiny models,
answers in the store, restart resumes the round, export matches; safety refusals; one
click-through in headless Chromium (skipped without chromium / playwright)."""
from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("gradio")
pytest.importorskip("gradio_client")

from vfeedback.cli import main  # noqa: E402
from vfeedback.config import load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "tests" / "configs" / "rank"  # random-weight tiny:sd15 fixtures (fast); the user-facing configs/rank/ run on tiny:shapes
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def _cfg(name, out, *extra):
    return load_config(CONFIGS / f"{name}.yaml", [f"output_dir={out}", *extra])


class App:
    """The app of a config served on a free loopback port, with a gradio_client on it."""

    def __init__(self, cfg):
        from gradio_client import Client

        from vfeedback.commands.rank import launch

        self.demo, self.url, self.backend = launch(cfg, port=0, block=False)
        self.client = Client(self.url, verbose=False)

    def call(self, name, *args):
        return self.client.predict(*args, api_name=f"/{name}")

    def answer(self, ranking, kind="rank"):
        """Answer the round on screen, naming its id (as the page does)."""
        return self.call("answer", self.call("status")["round_id"], ranking, kind)

    def close(self):
        self.demo.close()
        self.backend.store.close()


def _rows(out):
    db = sqlite3.connect(str(Path(out) / "feedback.sqlite"))
    try:
        return db.execute("SELECT round, kind, ranking, undone FROM answers ORDER BY id").fetchall()
    finally:
        db.close()


# ---------------------------------------------------------------------------- safety


def test_share_without_auth_refuses(capsys, tmp_path):
    rc = main(["rank", str(CONFIGS / "tiny-zo.yaml"), f"output_dir={tmp_path / 'r'}", "--share"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "--share" in err and "--auth" in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()  # refused before anything was created
    rc = main(["rank", str(CONFIGS / "tiny-zo.yaml"), f"output_dir={tmp_path / 'r'}", "--host", "0.0.0.0"])
    assert rc == 2 and "needs a login" in capsys.readouterr().err
    rc = main(["rank", str(CONFIGS / "tiny-zo.yaml"), "--share", "--auth", "nopassword"])
    assert rc == 2 and "USER:PASSWORD" in capsys.readouterr().err


# ---------------------------------------------------------------------------- zo_ranksgd


def test_zo_rounds_store_undo_restart_resume(tmp_path):
    out = tmp_path / "zo"
    cfg = _cfg("tiny-zo", out, "sampling.steps=4")
    app = App(cfg)
    try:
        s = app.call("status")
        assert s["round"] == 0 and s["round_mode"] == "gradient" and s["candidates"] == 6 and s["answers"] == 0
        r = app.answer("3,0", "rank")  # gradient round: top-2
        assert r["answers"] == 1 and r["round_mode"] == "line_search" and r["max_picks"] == 1
        assert _rows(out) == [(0, "rank", "[3, 0]", None)]  # committed at once
        r = app.answer("1", "rank")  # line search: the pick
        assert r["answers"] == 2 and r["round_mode"] == "gradient"
        r = app.answer("4,5,2", "rank")
        assert r["answers"] == 3
        r = app.call("undo_answer", r["answered"], r["answer_id"])  # names the answer it takes back
        assert r["ok"] and r["answers"] == 2 and r["round"] == 2 and "Undid" in r["message"]
        r = app.answer("9", "rank")
        assert r["ok"] is False and r["code"] == "bad_pick" and r["status"] == 422 and r["answers"] == 2  # out of range: nothing stored
        r = app.answer("5,2", "rank")
        assert r["answers"] == 3 and r["round_mode"] == "line_search"
        # only the run folder is served, and not its store
        import httpx

        store = (out / "feedback.sqlite").resolve()
        outside = tmp_path / "secret.txt"
        outside.write_text("do-not-serve-me")
        for f in (store, outside):
            resp = httpx.get(f"{app.url.rstrip('/')}/gradio_api/file={f}")
            assert resp.status_code in (403, 404) and b"do-not-serve-me" not in resp.content and b"SQLite" not in resp.content
        inside = (out / "rank" / "zo" / "current-000000.png").resolve()
        assert httpx.get(f"{app.url.rstrip('/')}/gradio_api/file={inside}").status_code == 200  # the route itself works
        # the run folder itself is not served, only what the app wrote under rank/
        resp = httpx.get(f"{app.url.rstrip('/')}/gradio_api/file={(out / 'config.yaml').resolve()}")
        assert resp.status_code in (403, 404) and b"output_dir" not in resp.content
        x_before = app.backend.session.opt.x.clone()
        shown_before = app.backend.view().images
        rid_before = app.call("status")["round_id"]
    finally:
        app.close()
    rows = _rows(out)
    assert [r[:3] for r in rows] == [(0, "rank", "[3, 0]"), (1, "rank", "[1]"), (2, "rank", "[4, 5, 2]"), (2, "rank", "[5, 2]")]
    assert rows[2][3] is not None and rows[3][3] is None  # the undone answer is kept, stamped

    # a restart (same config) resumes at the same round with the same optimiser state
    app = App(cfg)
    try:
        s = app.call("status")
        assert s["round"] == 3 and s["answers"] == 3 and s["round_mode"] == "line_search"
        assert s["round_id"] == rid_before and rid_before.startswith("r3-")  # the same candidate set, the same id
        assert torch.equal(app.backend.session.opt.x, x_before)
        shown_after = app.backend.view().images
        assert [im.tobytes() for im in shown_after] == [im.tobytes() for im in shown_before]  # the same candidates
    finally:
        app.close()

    # the store's path equals an uninterrupted session told the same answers
    from vfeedback.algorithms.zo_ranksgd_diffusion import RankingSession

    ref = RankingSession.from_config(cfg)
    for ans in ([3, 0], [1], [5, 2]):
        ref.ask()
        ref.tell(ans)
    assert torch.allclose(ref.opt.x, x_before)
    # a changed config is refused, naming the field
    with pytest.raises(Exception, match="zo_ranksgd"):
        from vfeedback.app.backend import open_backend

        open_backend(_cfg("tiny-zo", out, "sampling.steps=4", "zo_ranksgd.num_candidates=4"))


# ---------------------------------------------------------------------------- d3po


def test_d3po_labels_export_background_update(tmp_path, capsys):
    from vfeedback.feedback.preferences import load_preferences

    out = tmp_path / "d3po"
    # small update so the test stays short: 1 step, 4 sampling steps, one eval prompt and seed
    cfg = _cfg("tiny-d3po", out, "rank.labels_per_update=2", "rank.update_steps=1", "sampling.steps=4",
               "prompts.eval=[a red apple]", "d3po.winrate_seeds=[1000]")
    app = App(cfg)
    try:
        s = app.call("status")
        assert s["candidates"] == 2 and s["max_picks"] == 1 and s["prompt"] == "a red apple"
        assert app.answer("1", "rank")["answers"] == 1
        assert app.answer("", "tie")["answers"] == 2
        assert app.answer("", "skip")["answers"] == 3
        r = app.answer("0", "rank")
        assert r["answers"] == 4 and r["labels"] == 2 and "Started D3PO update 1" in r["message"]
        assert r["update"]["running"] == 1
        shown = app.backend.view().prompt
        n = app.backend.updates.wait(timeout=240)
        assert n == 1
        st = app.call("status")["update"]
        log = (out / "updates" / "update-001.log").read_text()
        assert st["running"] is None and st.get("last", {}).get("n") == 1, log[-2000:]
        assert Path(st["last"]["before_after"]).exists() and (Path(st["last"]["lora"]) / "pytorch_lora_weights.safetensors").exists()
        assert json.loads((out / "updates" / "update-001" / "summary.json").read_text())["algorithm"] == "d3po"
    finally:
        app.close()

    # export: the CLI writes the D3PO preference format; D3PO's reader takes it
    exp = tmp_path / "labels.jsonl"
    assert main(["rank", str(CONFIGS / "tiny-d3po.yaml"), f"output_dir={out}", "--export", str(exp)]) == 0
    assert "wrote 3 preference records" in capsys.readouterr().out
    recs = [json.loads(l) for l in exp.read_text().splitlines()]
    assert [r.get("kind") for r in recs] == ["rank", "tie", "rank"]
    assert recs[0]["prompt"] == "a red apple" and recs[2]["prompt"] == "a yellow sun"  # round 3 (the skip was round 2)
    assert recs[0]["chosen"]["noise_seed"] != recs[0]["rejected"]["noise_seed"] and recs[0]["sampling"]["steps"] == 4
    assert recs[1]["ranks"] == [1, 1]
    groups = load_preferences(exp)
    assert [len(g.pairs) for g in groups] == [1, 0, 1]
    assert groups[0].items[0].latent_seed == recs[0]["latent_seed"]
    assert (exp.parent / recs[0]["chosen"]["image"]).exists()
    # the chosen image is rebuilt from its seeds by D3PO's own sampler
    from PIL import Image

    from vfeedback.algorithms.d3po import sample_items
    from vfeedback.algorithms.zo_ranksgd_diffusion import load_model_for

    model = load_model_for(cfg)
    it = groups[0].items[0]
    s = cfg.sampling
    cond = model.encode_prompt(["a red apple"], [""], cfg=True)
    img = sample_items(model, cond, [it], num_steps=s.steps, guidance_scale=s.guidance_scale, eta=s.eta).images[0]
    seen = torch.from_numpy(__import__("numpy").array(Image.open(exp.parent / it.image))).permute(2, 0, 1).float() / 255
    assert (img.float() - seen).abs().max() < 2 / 255

    # restart: the same round comes back, the finished update is remembered
    app = App(cfg)
    try:
        s = app.call("status")
        assert s["round"] == 4 and s["answers"] == 4 and s["prompt"] == shown and s["update"]["last"]["n"] == 1
    finally:
        app.close()


# ---------------------------------------------------------------------------- gallery


def test_gallery_rank_store_export_resume(tmp_path, capsys):
    from vfeedback.feedback.preferences import load_preferences

    out = tmp_path / "gal"
    cfg = _cfg("tiny-gallery", out, "sampling.steps=4", "rank.gallery_seeds=[0]")
    app = App(cfg)
    try:
        s = app.call("status")
        assert s["candidates"] == 2 and s["round"] == 0 and s["prompt"] == "a red cube left of a blue ball"
        r = app.answer("1,0", "rank")
        assert r["answers"] == 1 and r["round"] == 1 and "Saved:" in r["message"]
        order = app.backend.store.answers()[0].context["order"]
    finally:
        app.close()
    app = App(cfg)  # restart: round 1 (the second prompt)
    try:
        s = app.call("status")
        assert s["round"] == 1 and s["prompt"] == "two green apples on a yellow plate"
        app.answer("", "tie")
        s = app.call("status")
        assert s["done"] and s["answers"] == 2
    finally:
        app.close()
    exp = tmp_path / "exp" / "rankings.jsonl"
    assert main(["rank", str(CONFIGS / "tiny-gallery.yaml"), f"output_dir={out}", "sampling.steps=4", "rank.gallery_seeds=[0]",
                 "--export", str(exp)]) == 0
    recs = [json.loads(l) for l in exp.read_text().splitlines()]
    assert len(recs) == 2 and recs[0]["mode"] == "gallery"
    models = ["tiny:sd15", "tiny:sdxl"]
    # two models: a pair; display index 1 was picked first, so the model shown there is chosen
    assert recs[0]["chosen"]["model"] == models[order[1]] and recs[0]["rejected"]["model"] == models[order[0]]
    assert (exp.parent / recs[0]["chosen"]["image"]).exists()
    assert recs[1]["ranks"] == [1, 1]
    groups = load_preferences(exp)  # the trajectories file resolves relative to the export
    from safetensors import safe_open

    with safe_open(str(groups[0].trajectories), framework="pt") as f:
        keys = set(f.keys())
        t = f.get_tensor(groups[0].items[0].trajectory)
    assert keys == {"m0", "m1"} and t.shape[0] == 5  # steps + 1 latents


# ---------------------------------------------------------------------------- the browser


def test_browser_click_through_zo_round(tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)")
    pw = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install playwright)")
    out = tmp_path / "zo-browser"
    app = App(_cfg("tiny-zo", out, "sampling.steps=4"))
    try:
        with pw.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(app.url)
            thumbs = page.locator("#rank-cands .thumbnail-item")
            thumbs.first.wait_for(timeout=60000)
            assert thumbs.count() == 6
            page.locator("#rank-user input, #rank-user textarea").first.fill("alice")  # the user box: stored with each answer
            other = browser.new_page(viewport={"width": 1400, "height": 900})  # a second tab on the same round
            other.goto(app.url)
            other.locator("#rank-cands .thumbnail-item").first.wait_for(timeout=60000)
            thumbs.nth(2).click()  # mouse: candidate 3 is the best
            page.wait_for_function("document.querySelector('#rank-picked').innerText.includes('#3')", timeout=20000)
            page.keyboard.press("5")  # keyboard: candidate 5 second
            page.wait_for_function("document.querySelector('#rank-picked').innerText.includes('#5')", timeout=20000)
            time.sleep(0.5)  # let the badged images paint
            ARTIFACTS.mkdir(exist_ok=True)
            shot = ARTIFACTS / "rank_app.png"
            page.screenshot(path=str(shot), full_page=True)
            page.keyboard.press("Enter")
            page.wait_for_function("document.querySelector('#rank-header').innerText.includes('Line search')", timeout=60000)
            assert _rows(out) == [(0, "rank", "[2, 4]", None)]
            # the second tab still shows round 0: its skip names round 0's id and is refused; the tab moves on
            other.get_by_role("button", name="Skip / can't tell (s)").click()
            other.wait_for_function("document.querySelector('#rank-status').innerText.includes('answered elsewhere')", timeout=60000)
            assert "Line search" in other.locator("#rank-header").inner_text()
            assert _rows(out) == [(0, "rank", "[2, 4]", None)]  # nothing stored from the stale tab
            other.keyboard.press("u")  # the second tab gave no answer: its undo takes back nothing (not the first tab's)
            other.wait_for_function("document.querySelector('#rank-status').innerText.includes('no answer of its own')", timeout=60000)
            assert _rows(out) == [(0, "rank", "[2, 4]", None)]
            other.close()
            page.keyboard.press("1")
            page.wait_for_function("document.querySelector('#rank-picked').innerText.includes('#1')", timeout=20000)
            page.get_by_role("button", name="Submit (Enter)").click()
            page.wait_for_function("document.querySelector('#rank-header').innerText.includes('2 answers saved')", timeout=60000)
            page.keyboard.press("u")
            page.wait_for_function("document.querySelector('#rank-header').innerText.includes('1 answer saved')", timeout=60000)
            page.screenshot(path=str(ARTIFACTS / "rank_app_after_undo.png"), full_page=True)
            browser.close()
        rows = _rows(out)
        assert [r[:3] for r in rows] == [(0, "rank", "[2, 4]"), (1, "rank", "[0]")] and rows[1][3] is not None
        db = sqlite3.connect(str(out / "feedback.sqlite"))
        try:  # the name typed in the user box is on both answers of that tab
            assert db.execute("SELECT user FROM answers ORDER BY id").fetchall() == [("alice",), ("alice",)]
        finally:
            db.close()
        assert shot.stat().st_size > 10_000
    finally:
        app.close()
