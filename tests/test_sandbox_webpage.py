"""Web pages as a renderer (WebGen-Agent): parsing a completion into files, screenshots in
headless Chromium inside the boundary, scripted interaction, and a hostile page."""
from __future__ import annotations

import socket
import sys

import pytest
import torch

from vfeedback.integrations import sandbox
from vfeedback.integrations.trl import ImageSimilarity, reward_function
from vfeedback.integrations.webpage import WebPage, interaction_reward_function, parse_page

torch.set_num_threads(1)

OK, WHY = sandbox.bwrap_status()
BROWSER = sandbox.find_browser()
needs_browser = pytest.mark.skipif(not (OK and BROWSER), reason=f"needs bubblewrap ({WHY or 'ok'}) and Chromium ({BROWSER or 'apt-get install chromium'})")
pytest.importorskip("playwright")

COUNTER_CSS = "body { margin: 0; background: rgb(255, 0, 0); }"
COUNTER_JS = "let n = 0; document.getElementById('inc').onclick = () => { n += 1; document.getElementById('count').textContent = 'Count: ' + n; };"
COUNTER_HTML = "<html><head></head><body><button id=\"inc\">+1</button><p id=\"count\">Count: 0</p></body></html>"
GOOD = f"Here is the page.\n```html\n{COUNTER_HTML}\n```\n```css\n{COUNTER_CSS}\n```\n```javascript\n{COUNTER_JS}\n```"
BROKEN_JS = GOOD.replace("n += 1", "n += 0")  # the button does nothing
NO_BUTTON = "<html><body style='margin:0;background:#fff'><p>Count: 0</p></body></html>"
STEPS = [{"click": "#inc"}, {"click": "#inc"}]
CHECKS = [{"text": "Count: 2", "selector": "#count"}, {"visible": "#inc"}]


def test_parse_page_links_unreferenced_files():
    files = parse_page(GOOD)
    assert sorted(files) == ["index.html", "script.js", "style.css"]
    assert files["index.html"] == ('<html><head><link rel="stylesheet" href="style.css"></head><body><button id="inc">+1</button>'
                                   '<p id="count">Count: 0</p><script src="script.js"></script></body></html>')
    named = parse_page("```html\n<link href='theme.css' rel=stylesheet><p>x</p>\n```\n```css theme.css\np{}\n```")
    assert named == {"index.html": "<link href='theme.css' rel=stylesheet><p>x</p>", "theme.css": "p{}"}
    assert parse_page("<!DOCTYPE html><p>bare</p>") == {"index.html": "<!DOCTYPE html><p>bare</p>"}
    with pytest.raises(ValueError, match="no HTML"):
        parse_page("I cannot write web pages.")


def test_bad_scripts_name_the_step():
    with pytest.raises(ValueError, match=r"^WebPage: step \{'hover': '#a'\} is not one of"):
        WebPage(steps=[{"hover": "#a"}])
    with pytest.raises(ValueError, match=r"^viewport: \(8, 8\)"):
        WebPage(viewport=(8, 8))


@needs_browser
def test_screenshot_and_interaction_pass_rate():
    render = WebPage(viewport=(160, 120), steps=STEPS, checks=CHECKS, workers=2)
    target = torch.zeros(3, 120, 160)
    target[0] = 1.0  # the design: a red page
    shot = reward_function(ImageSimilarity(None), render=render, name="webpage_pixels")
    gui = interaction_reward_function(render)
    pages = [GOOD, BROKEN_JS, NO_BUTTON, "no page here"]
    scores = shot(["make a counter"] * 4, pages, target_image=[target] * 4)
    rates = gui(["make a counter"] * 4, pages)
    assert shot.isolation == {"bwrap+seccomp": 3} or shot.isolation == {"bwrap": 3}
    # red page vs red design; the button and text cover a little of it
    assert scores[0] > 0.85 and scores[1] == pytest.approx(scores[0], abs=1e-6)
    assert scores[2] < 0.4  # a white page against a red design: 1 - mean|white - red| = 1/3
    assert scores[3] is None and shot.last_errors[3] == "page: no HTML in the completion (a ```html block or a page)"
    assert rates[:3] == [1.0, 0.5, 0.0] and rates[3] is None
    assert render._cache and len(render._cache) == 4  # the second reward reused the first one's renderings
    assert gui.last_errors[2] is None and gui.failures == {"page": 1}


@needs_browser
def test_hostile_page_reaches_nothing(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("CANARY-PAGE")
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    srv.setblocking(False)
    port = srv.getsockname()[1]
    page = f"""<html><body><p id="net">pending</p><p id="file">pending</p><script>
      fetch('http://127.0.0.1:{port}/x').then(() => net.textContent = 'reached').catch(() => net.textContent = 'net-blocked');
      fetch('file://{secret}').then(r => r.text()).then(t => file.textContent = t).catch(() => file.textContent = 'file-blocked');
    </script></body></html>"""
    try:
        render = WebPage(viewport=(160, 120), steps=[{"wait": 500}],
                         checks=[{"text": "net-blocked", "selector": "#net"}, {"text": "file-blocked", "selector": "#file"}])
        (r,) = render.results([page], {})
        assert r.error is None, r.error
        assert [c["passed"] for c in r.extra["checks"]] == [True, True], r.extra
        with pytest.raises(BlockingIOError):
            srv.accept()
        # a page that never stops computing is killed at the timeout
        hang = WebPage(viewport=(160, 120), timeout=25).results(["<html><body><script>while (true) {}</script></body></html>"], {})[0]
        assert hang.image is None and (hang.error.startswith("timeout: rendering ran over 25 s") or "Timeout" in hang.error), hang.error
    finally:
        srv.close()


def test_without_bubblewrap_pages_are_refused_unless_weak(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap on PATH
    sandbox.bwrap_status.cache_clear()
    try:
        page = "<html><body style='margin:0;background:#0f0'><button id=b onclick=\"o.textContent='ok'\">b</button><p id=o></p></body></html>"
        # the refusal comes before the browser starts: any executable stands in where Chromium is absent
        gui = interaction_reward_function(WebPage(viewport=(64, 48), steps=[{"click": "#b"}], checks=[{"text": "ok", "selector": "#o"}],
                                                  browser=BROWSER or sys.executable))
        assert gui(["p"], [page]) == [None]
        assert gui.last_errors[0].startswith("sandbox: refused to run untrusted code: bubblewrap is not installed")
        assert gui.isolation == {"none": 1}
        if BROWSER is None:
            pytest.skip("no Chromium for the weak path")
        weak = WebPage(viewport=(64, 48), steps=[{"click": "#b"}], checks=[{"text": "ok", "selector": "#o"}], sandbox="weak")
        (r,) = weak.results([page], {})
        assert r.error is None and r.isolation in ("weak", "weak+seccomp"), r.error
        assert r.image[:, 40, 32].tolist() == [0.0, 1.0, 0.0]  # the green page, below the button
        assert [c["passed"] for c in r.extra["checks"]] == [True]
    finally:
        sandbox.bwrap_status.cache_clear()


@pytest.mark.slow
@needs_browser
def test_demo_tiny(tmp_path):
    """demos/webpage_reward.py --tiny end to end (about 90 s on a busy 2-core machine)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    demo = Path(__file__).resolve().parents[1] / "demos" / "webpage_reward.py"
    r = subprocess.run([sys.executable, str(demo), "--tiny", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {row["page"]: row for row in json.loads((tmp_path / "summary.json").read_text())["rows"]}
    assert [rows[n]["checks"] for n in ("good", "good, other blue", "dead button", "no styles", "CDN stylesheet")] == [1.0, 1.0, 0.5, 1.0, 1.0]
    assert rows["good"]["pixels"] > 0.999 and rows["no styles"]["pixels"] < 0.9
    assert rows["endless script"]["pixels"] is None and rows["not a page"]["pixels"] is None
    assert (tmp_path / "good.png").exists()
