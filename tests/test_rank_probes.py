"""The probe panel of the D3PO ranking app (vfeedback/app/probes.py) and a scripted person who
answers through the real page in headless Chromium, choosing by the shapes judge.

CI: the probe summary on hand-computed scores; base probes rendered once, scored by the held-out
judge, joined with a finished update into the curve's points, not rendered again on a restart.
Slow (`pytest -m slow`): two answers through the page on tiny:sd15 from the judge's choice; the
demo configs themselves (configs/rank/shapes-zo.yaml, shapes-d3po.yaml): N answers through the
page and the held-out check before -> after read from the page (docs/rank_app.md: the numbers)."""
from __future__ import annotations

import io
import json
import math
import re
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("gradio")
pytest.importorskip("gradio_client")

from vfeedback.config import load_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "configs" / "rank"
DEMO = ROOT / "configs" / "rank" / "shapes-d3po.yaml"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
PROBES = ["prompts.train=[two red squares, three green circles]", "rank.probe_prompts=[two red squares, a yellow triangle]",
          "rank.probe_seeds=[0, 1]", "rank.probe_reward=shapes_judge_heldout"]


def test_summarise_hand_computed():
    from vfeedback.app.probes import summarise

    s = summarise([0.9, 0.2, 0.6, float("nan"), 0.5])  # NaN skipped; 0.5 is not above the threshold
    assert s["n"] == 4 and s["match_rate"] == 0.5
    assert s["mean"] == pytest.approx((0.9 + 0.2 + 0.6 + 0.5) / 4, abs=1e-12)
    assert summarise([float("nan")]) == {"mean": None, "match_rate": None, "n": 0}


def test_probe_base_once_scores_and_update_points(tmp_path):
    import rewards

    from vfeedback.app.backend import open_backend
    from vfeedback.app.probes import panel_image, probe_list, read_probes, render_probes, save_probes

    out = tmp_path / "app"
    cfg = load_config(FIXTURES / "tiny-d3po.yaml", [f"output_dir={out}", "sampling.steps=2", "rank.labels_per_update=0", *PROBES])
    b = open_backend(cfg)
    try:
        assert probe_list(cfg) == [("two red squares", 0), ("two red squares", 1), ("a yellow triangle", 0), ("a yellow triangle", 1)]
        base = read_probes(out / "rank" / "probes")
        imgs = render_probes(b.model, cfg)
        assert imgs.shape == (4, 3, 64, 64)
        assert torch.equal(imgs, render_probes(b.model, cfg))  # fixed seeds: the same pixels every time
        assert (imgs[0] - imgs[1]).abs().max() > 0.05  # two seeds, two images
        # each stored score is the held-out judge on the stored image of its caption (PNG: 1/255 rounding)
        judge = rewards.load("shapes_judge_heldout")
        want = judge(imgs, [p for p, _ in probe_list(cfg)])
        assert base["scores"] == pytest.approx(want.tolist(), abs=0.02)
        assert base["mean"] == pytest.approx(sum(base["scores"]) / 4, abs=1e-12)
        assert base["reward"] == "shapes_judge_heldout" and base["update"] == 0
        st = b.status()["probe"]
        assert st["points"] == [{"update": 0, "labels": 0, "mean": base["mean"], "match_rate": base["match_rate"]}]

        # a finished update with probes (made here: the pixels flipped, so its scores differ), joined with its label count
        upd = out / "updates" / "update-001"
        upd.mkdir(parents=True)
        (upd / "summary.json").write_text(json.dumps({"heldout_win_rate": 0.5}))
        cur = save_probes(upd / "probes", cfg, imgs.flip(-1), update=1)
        b.store.add_event("d3po_update_started", {"n": 1, "labels": 6, "pid": 0, "dir": "updates/update-001"})
        b.updates._finish(1)
        pts = b.status()["probe"]["points"]
        assert pts[1] == {"update": 1, "labels": 6, "mean": cur["mean"], "match_rate": cur["match_rate"]}
        side = b.side()["probes"]
        assert Path(side["curve"]).exists() and side["panel"].size == panel_image(out, cfg, 1).size
    finally:
        b.close()
    # a restart reads the base probes back: not rendered again
    mtime = (out / "rank" / "probes" / "probes.json").stat().st_mtime_ns
    b = open_backend(cfg)
    try:
        assert (out / "rank" / "probes" / "probes.json").stat().st_mtime_ns == mtime
        assert [p["update"] for p in b.status()["probe"]["points"]] == [0, 1]
    finally:
        b.close()


# ---------------------------------------------------------------------------- the scripted person


from vfeedback.app.probes import JudgePerson  # noqa: E402  (the scripted person, shared with bench/rank_d3po_probes.py)


def _answer_through_page(page, person: JudgePerson, k: int) -> list[int]:
    """Answer the round on screen as the person would (clicks, then Submit or Tie); waits until the
    header counts ``k + 1`` saved answers. Returns the picks."""
    prompt = re.search(r"Prompt:\s*(.+)", page.locator("#rank-header").inner_text()).group(1).strip()
    picks = person.choose(_page_images(page), prompt)
    thumbs = page.locator("#rank-cands .thumbnail-item")
    for j, i in enumerate(picks):
        thumbs.nth(i).click()
        page.wait_for_function(f"document.querySelector('#rank-picked').innerText.includes('#{i + 1}')", timeout=60000)
    page.locator("#rank-submit" if picks else "#rank-tie").click()
    want = f"{k + 1} answer{'s' if k + 1 != 1 else ''} saved"
    page.wait_for_function(f"document.querySelector('#rank-header').innerText.includes('{want}')", timeout=120000)
    return picks


BASE_RE = re.compile(r"base model mean P\(match\) ([0-9]+\.[0-9]+)")
AFTER_RE = re.compile(r"after update ([0-9]+) \(([0-9]+) labels\): mean P\(match\) ([0-9]+\.[0-9]+)")


def _probe_text(page) -> dict:
    """The probe panel's line as the page shows it: base score, and the last update's (if any)."""
    text = page.locator("#rank-probe").inner_text()
    base, after = BASE_RE.search(text), AFTER_RE.search(text)
    assert base, text
    return {"base": float(base.group(1)), "update": int(after.group(1)) if after else 0,
            "labels": int(after.group(2)) if after else 0, "now": float(after.group(3)) if after else None}


def _browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium)")
    return pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install playwright)")


def _launch(cfg):
    from vfeedback.commands.rank import launch

    return launch(cfg, port=0, block=False)


@pytest.mark.slow  # 423 s under load 21 on this machine (the existing ZO browser test: 188 s); see docs/rank_app.md
def test_probes_and_scripted_person_through_page(tmp_path):
    """One app (tiny:sd15 fixture, probes on): the base probes are rendered once and scored by the
    held-out judge; two answers go through the real page, chosen by the judge-person from the
    images the page shows, and the store holds exactly those choices; the probe panel shows the
    base score; a finished update's probes join the curve's points; a restart reads the base
    probes back without rendering them again."""
    import sqlite3

    import rewards

    from vfeedback.app.backend import open_backend
    from vfeedback.app.probes import panel_image, probe_list, read_probes, render_probes, save_probes

    pw = _browser()
    out = tmp_path / "app"
    cfg = load_config(FIXTURES / "tiny-d3po.yaml", [f"output_dir={out}", "sampling.steps=2", "rank.labels_per_update=0",
                                                    "rank.group_size=3", "rank.display_size=64", *PROBES])
    demo, url, backend = _launch(cfg)
    person = JudgePerson(margin=0.0)  # random-weight images: any strict difference counts
    try:
        assert probe_list(cfg) == [("two red squares", 0), ("two red squares", 1), ("a yellow triangle", 0), ("a yellow triangle", 1)]
        base = read_probes(out / "rank" / "probes")
        imgs = render_probes(backend.model, cfg)
        assert imgs.shape == (4, 3, 64, 64)
        assert torch.equal(imgs, render_probes(backend.model, cfg))  # fixed seeds: the same pixels every time
        assert (imgs[0] - imgs[1]).abs().max() > 0.05  # two seeds, two images
        # each stored score is the held-out judge on the stored image of its caption (PNG: 1/255 rounding)
        want = rewards.load("shapes_judge_heldout")(imgs, [p for p, _ in probe_list(cfg)])
        assert base["scores"] == pytest.approx(want.tolist(), abs=0.02)
        assert base["mean"] == pytest.approx(sum(base["scores"]) / 4, abs=1e-12)
        assert base["reward"] == "shapes_judge_heldout" and base["update"] == 0
        assert backend.status()["probe"]["points"] == [{"update": 0, "labels": 0, "mean": base["mean"], "match_rate": base["match_rate"]}]

        with pw.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            page.locator("#rank-cands .thumbnail-item").first.wait_for(timeout=60000)
            page.wait_for_function("document.querySelector('#rank-probe') && "
                                   "document.querySelector('#rank-probe').innerText.includes('base model')", timeout=60000)
            shown = [backend.view().images]
            picks = [_answer_through_page(page, person, 0)]
            shown.append(backend.view().images)
            picks.append(_answer_through_page(page, person, 1))
            probe = _probe_text(page)
            browser.close()
        db = sqlite3.connect(str(out / "feedback.sqlite"))
        rows = db.execute("SELECT kind, ranking FROM answers ORDER BY id").fetchall()
        db.close()
        # the stored answers are the person's choices on the images the backend showed
        for (kind, ranking), imgs_shown, got, prompt in zip(rows, shown, picks, ["two red squares", "three green circles"]):
            assert got == person.choose(imgs_shown, prompt)
            assert (kind, json.loads(ranking)) == (("rank", got) if got else ("tie", []))
        assert len(rows) == 2
        assert probe["base"] == pytest.approx(base["mean"], abs=5e-4) and probe["update"] == 0 and probe["now"] is None

        # a finished update with probes (made here: the pixels flipped, so its scores differ), joined with its label count
        upd = out / "updates" / "update-001"
        upd.mkdir(parents=True)
        (upd / "summary.json").write_text(json.dumps({"heldout_win_rate": 0.5}))
        cur = save_probes(upd / "probes", cfg, imgs.flip(-1), update=1)
        backend.store.add_event("d3po_update_started", {"n": 1, "labels": 6, "pid": 0, "dir": "updates/update-001"})
        backend.updates._finish(1)
        pts = backend.status()["probe"]["points"]
        assert pts[1] == {"update": 1, "labels": 6, "mean": cur["mean"], "match_rate": cur["match_rate"]}
        side = backend.side()["probes"]
        assert Path(side["curve"]).exists() and side["panel"].size == panel_image(out, cfg, 1).size
    finally:
        demo.close()
        backend.close()
    # a restart reads the base probes back: not rendered again
    mtime = (out / "rank" / "probes" / "probes.json").stat().st_mtime_ns
    b = open_backend(cfg)
    try:
        assert (out / "rank" / "probes" / "probes.json").stat().st_mtime_ns == mtime
        assert [p["update"] for p in b.status()["probe"]["points"]] == [0, 1]
    finally:
        b.close()


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_scripted_person_moves_probe_score(tmp_path, seed):
    """The demo config: N answers through the real page by the judge-person; the background D3PO
    updates run; the held-out probe score is read from the page before and after (measured
    numbers: docs/rank_app.md). The bound is from those measurements."""
    pw = _browser()
    n_answers = 12
    out = tmp_path / "demo"
    cfg = load_config(DEMO, [f"output_dir={out}", f"seed={seed}"])
    t0 = time.time()
    demo, url, backend = _launch(cfg)
    timings = {"launch_s": time.time() - t0, "answer_s": []}
    person = JudgePerson()
    try:
        with pw.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1500, "height": 1100})
            page.goto(url)
            page.locator("#rank-cands .thumbnail-item").first.wait_for(timeout=120000)
            page.wait_for_function("document.querySelector('#rank-probe').innerText.includes('base model')", timeout=60000)
            before = _probe_text(page)
            for k in range(n_answers):
                t = time.time()
                _answer_through_page(page, person, k)
                timings["answer_s"].append(time.time() - t)
            t = time.time()
            while backend.updates.running() is not None:  # the update started by the last labels
                time.sleep(2)
            if backend.updates.labels() > max((u.get("labels", 0) for u in backend.updates._updates().values()), default=0):
                backend.updates.start()
                backend.updates.wait(timeout=1800)
            n_up = max(backend.updates._updates())
            page.wait_for_function(f"document.querySelector('#rank-probe').innerText.includes('after update {n_up} ')", timeout=120000)
            timings["last_wait_s"] = time.time() - t
            after = _probe_text(page)
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / f"rank_demo_seed{seed}.png"), full_page=True)
            browser.close()
        ups = {n: u for n, u in backend.updates._updates().items()}
        res = {"seed": seed, "answers": n_answers, "before": before, "after": after, "timings": timings,
               "update_wall_s": [json.loads((out / "updates" / f"update-{n:03d}" / "summary.json").read_text())["wall_time_s"]
                                 for n in sorted(ups) if ups[n]["state"] == "finished"],
               "points": backend.probe_status()["points"]}
        (ARTIFACTS / f"rank_demo_seed{seed}.json").write_text(json.dumps(res, indent=1))
        # the page shows the stored scores of the base model and of the last update; the movement is recorded, not
        # bounded: at this budget (12 labels, 10 steps) D3PO does not move the held-out score reliably (docs/rank_app.md)
        stored = json.loads((out / "updates" / f"update-{n_up:03d}" / "probes" / "probes.json").read_text())
        base = json.loads((out / "rank" / "probes" / "probes.json").read_text())
        assert after["update"] == n_up and after["labels"] == ups[n_up]["labels"] == backend.updates.labels()
        assert before["base"] == pytest.approx(base["mean"], abs=5e-4) and after["base"] == before["base"]
        assert math.isfinite(after["now"]) and after["now"] == pytest.approx(stored["mean"], abs=5e-4)
    finally:
        demo.close()
        backend.close()



CHECK_RE = re.compile(r"current image: start ([0-9]+\.[0-9]+), now \(round ([0-9]+)\) ([0-9]+\.[0-9]+)")


def _check_text(page) -> dict:
    m = CHECK_RE.search(page.locator("#rank-check").inner_text())
    assert m, page.locator("#rank-check").inner_text()
    return {"start": float(m.group(1)), "round": int(m.group(2)), "now": float(m.group(3))}


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_scripted_person_zo_moves_check(tmp_path, seed):
    """configs/rank/shapes-zo.yaml (the `make demo` app): N rounds through the real page by the
    judge-person (gradient rounds: its top picks; line search: its single best; skip when it
    cannot tell); the held-out judge's P(match) of the current image is read from the page at
    the start and after the last round (measured numbers: docs/rank_app.md)."""
    pw = _browser()
    n_rounds = 10
    out = tmp_path / "zo"
    cfg = load_config(ROOT / "configs" / "rank" / "shapes-zo.yaml", [f"output_dir={out}", f"seed={seed}"])
    demo, url, backend = _launch(cfg)
    person = JudgePerson(margin=0.05)
    timings = []
    try:
        with pw.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1500, "height": 1100})
            page.goto(url)
            page.locator("#rank-cands .thumbnail-item").first.wait_for(timeout=120000)
            page.wait_for_function("document.querySelector('#rank-check').innerText.includes('start')", timeout=60000)
            before = _check_text(page)
            for k in range(n_rounds):
                t = time.time()
                prompt = re.search(r"Prompt:\s*(.+)", page.locator("#rank-header").inner_text()).group(1).strip()
                max_picks = backend.view().max_picks
                picks = person.choose(_page_images(page), prompt)[:max_picks]
                thumbs = page.locator("#rank-cands .thumbnail-item")
                for i in picks:
                    thumbs.nth(i).click()
                    page.wait_for_function(f"document.querySelector('#rank-picked').innerText.includes('#{i + 1}')", timeout=60000)
                if len(picks) >= 2:  # a gradient round with picks: the README's screenshot (the last such round)
                    ARTIFACTS.mkdir(exist_ok=True)
                    page.wait_for_timeout(500)  # let the badged images paint
                    page.screenshot(path=str(ARTIFACTS / f"rank_zo_seed{seed}_picked.png"), full_page=True)
                page.locator("#rank-submit" if picks else "#rank-skip").click()
                want = f"{k + 1} answer{'s' if k + 1 != 1 else ''} saved"
                page.wait_for_function(f"document.querySelector('#rank-header').innerText.includes('{want}')", timeout=120000)
                timings.append(time.time() - t)
            page.wait_for_function(f"document.querySelector('#rank-check').innerText.includes('(round {backend.session.round})')",
                                   timeout=60000)
            after = _check_text(page)
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / f"rank_zo_seed{seed}.png"), full_page=True)
            browser.close()
        res = {"seed": seed, "rounds": n_rounds, "before": before, "after": after, "answer_s": timings,
               "points": backend.status()["check"]["points"]}
        (ARTIFACTS / f"rank_zo_seed{seed}.json").write_text(json.dumps(res, indent=1))
        assert before["round"] == 0 and after["round"] == backend.session.round
        assert after["now"] - before["start"] > ZO_MIN_MOVE, res
    finally:
        demo.close()
        backend.close()


#: the least rise of the held-out check on the ZO demo the slow test accepts: measured +0.511 (seed 0)
#: and +0.233 (seed 1, after a dip to -0.144 at round 5) in 10 rounds (docs/rank_app.md); under half the smaller
ZO_MIN_MOVE = 0.1
