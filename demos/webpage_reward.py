"""Web pages scored as WebGen-Agent scores them, in small: a screenshot reward and a scripted-
interaction reward, each page rendered by headless Chromium inside the bubblewrap boundary.

    # CPU, about a minute: hand-written good and broken pages of one request (a login form),
    # scored by pixel similarity to a target design and by the pass rate of scripted checks
    python demos/webpage_reward.py --tiny

    # also CLIP against the request (the tiny random open_clip under --tiny: plumbing only;
    # without --tiny the real ViT-B-32 weights, which need to be in the open_clip cache)
    python demos/webpage_reward.py --tiny --clip

Prints one row per page and writes summary.json and the screenshots (``<page>.png``) to --out.
The same two reward functions go to TRL's GRPOTrainer as ``reward_funcs=[shot, gui]``.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REQUEST = "A login page: a dark header saying 'Sign in', a name field and a blue Log in button that greets the user."

_STYLE = """body { margin: 0; font-family: sans-serif; background: #f4f4f4; }
header { background: #222; color: #fff; padding: 12px 16px; font-size: 20px; }
form { margin: 24px 16px; } input { display: block; margin-bottom: 12px; padding: 6px; width: 200px; }
#login { background: %s; color: #fff; border: 0; padding: 8px 20px; }"""
_HTML = """<html><head><title>Sign in</title></head><body><header>Sign in</header>
<form onsubmit="return false"><input id="user" placeholder="name"><button id="login">Log in</button></form>
<p id="status"></p></body></html>"""
_JS = "document.getElementById('login').onclick = () => { document.getElementById('status').textContent = 'Welcome, ' + document.getElementById('user').value; };"


def _page(style=_STYLE % "#1565c0", html=_HTML, js=_JS) -> str:
    return f"Here is the page:\n```html\n{html}\n```\n```css\n{style}\n```\n```js\n{js}\n```"


PAGES = {
    "design": _page(),  # the target design (the reference screenshot)
    "good": _page(),
    "good, other blue": _page(style=_STYLE % "#1e88e5"),
    "dead button": _page(js="// TODO"),
    "no styles": _page(style=""),
    "CDN stylesheet": _page().replace("<head>", "<head><link rel='stylesheet' href='https://cdn.example.com/x.css'>"),
    "endless script": _page(js="while (true) {}"),
    "not a page": "I would use React for this.",
}
STEPS = [{"type": "#user", "text": "ada"}, {"click": "#login"}]
CHECKS = [{"visible": "#login"}, {"text": "Welcome, ada", "selector": "#status"}]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="small viewport; with --clip a tiny random open_clip (offline)")
    ap.add_argument("--clip", action="store_true", help="add CLIP(screenshot, request) as a third score")
    ap.add_argument("--sandbox", choices=["strict", "weak"], default="strict",
                    help="strict: bubblewrap (refuses where it cannot run); weak: a plain subprocess, trusted pages only")
    ap.add_argument("--viewport", default=None, help="WIDTHxHEIGHT (default 320x240 with --tiny, else 800x600)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    try:
        w, h = (int(v) for v in (args.viewport or ("320x240" if args.tiny else "800x600")).lower().split("x"))
    except ValueError:
        print(f"--viewport: {args.viewport!r} is not WIDTHxHEIGHT (e.g. 320x240)", file=sys.stderr)
        return 2

    import torch

    import rewards
    from vfeedback.integrations import sandbox
    from vfeedback.integrations.trl import ImageSimilarity, reward_function
    from vfeedback.integrations.webpage import WebPage, interaction_reward_function

    t0 = time.time()
    out = Path(args.out or tempfile.mkdtemp(prefix="webpage-reward-"))
    out.mkdir(parents=True, exist_ok=True)
    ok, why = sandbox.bwrap_status()
    if args.sandbox == "strict" and not ok:
        print(f"sandbox: bubblewrap cannot run here ({why}); install it, or pass --sandbox weak for trusted pages", file=sys.stderr)
        return 2
    render = WebPage(viewport=(w, h), steps=STEPS, checks=CHECKS, workers=2, sandbox=args.sandbox, timeout=40)
    names = [n for n in PAGES if n != "design"]
    design = render.results([PAGES["design"]], {})[0]
    if design.image is None:
        print(f"the design page did not render: {design.error}", file=sys.stderr)
        return 1
    shot = reward_function(ImageSimilarity(None), render=render, name="pixels")
    gui = interaction_reward_function(render, name="interaction")
    texts = [PAGES[n] for n in names]
    pixels = shot([REQUEST] * len(names), texts, target_image=[design.image] * len(names))
    passed = gui([REQUEST] * len(names), texts)
    clip_scores = [None] * len(names)
    if args.clip:
        if args.tiny:
            from vfeedback.integrations.tiny import write_tiny_open_clip

            name, ckpt = write_tiny_open_clip(out / "tiny_clip")
            clip = rewards.load("clip", model=name, pretrained=ckpt, raw=True)
        else:
            clip = rewards.load("clip")
        clip_scores = reward_function(clip, render=render, name="clip")([REQUEST] * len(names), texts, target=[REQUEST] * len(names))

    from PIL import Image

    rows = []
    print(f"{'page':18s} {'pixels':>7s} {'checks':>7s} {'clip':>7s}  boundary        note")
    for i, (n, r) in enumerate(zip(names, render.results(texts, {}))):
        if r.image is not None:
            arr = (r.image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
            Image.fromarray(arr).save(out / f"{n.replace(' ', '_').replace(',', '')}.png")
        note = shot.last_errors[i] or "; ".join(c["error"] for c in (r.extra or {}).get("checks", []) if c.get("error"))
        rows.append(dict(page=n, pixels=pixels[i], checks=passed[i], clip=clip_scores[i], isolation=r.isolation, note=note or None))
        fmt = lambda v: "   None" if v is None else f"{v:7.3f}"  # noqa: E731
        print(f"{n:18s} {fmt(pixels[i])} {fmt(passed[i])} {fmt(clip_scores[i])}  {str(r.isolation):15s} {(note or '')[:70]}")
    summary = dict(request=REQUEST, viewport=[w, h], steps=STEPS, checks=CHECKS, rows=rows,
                   isolation=dict(shot.isolation), seconds=round(time.time() - t0, 1), torch=torch.__version__)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"wrote {out / 'summary.json'} ({summary['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
