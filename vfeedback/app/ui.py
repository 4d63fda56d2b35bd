"""The Gradio page of ``vfeedback rank``: candidates to click in order, Submit, Undo, shortcuts.

The page holds no state of its own beyond the round on screen (its id) and its picks (per browser
tab); every answer names that round's id and goes straight to the backend, which commits it to
the store or refuses it (another tab or person answered the round first: the tab shows the
current round and says so). Each tab also keeps the answers it gave (round id, answer id), and
its undo names the newest of them: the backend takes it back only while it is the newest answer
in the store, so a tab never undoes another tab's (or person's) answer. Keyboard: 1-9 pick the
n-th image (again: unpick), Enter submits, u undoes this tab's last answer, c clears the picks,
t = tie, s = skip. Scripts and tests use the API endpoints ``/answer`` (round_id, ranking,
kind), ``/undo_answer`` (round_id, answer_id), ``/status`` and (d3po)
``/run_update`` (docs/rank_app.md); a refused answer comes back as ``{"ok": false, "code",
"status", "error", ...}``, never as a server-side traceback.
"""
from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

KEYS_JS = """
<script>
(function () {
  if (window.__vfeedbackRankKeys) return;
  window.__vfeedbackRankKeys = true;
  function press(id) {
    const el = document.getElementById(id);
    const b = el && (el.tagName === 'BUTTON' ? el : el.querySelector('button'));
    if (b && !b.disabled && b.offsetParent !== null) { b.click(); return true; }
    return false;
  }
  document.addEventListener('keydown', function (e) {
    const t = e.target;
    if (t && (t.tagName === 'INPUT' || t.tagName === 'TEXTAREA' || t.isContentEditable)) return;
    if (e.ctrlKey || e.metaKey || e.altKey || e.repeat) return;
    let done = false;
    if (/^[1-9]$/.test(e.key)) {
      const items = document.querySelectorAll('#rank-cands .thumbnail-item');
      const it = items[parseInt(e.key, 10) - 1];
      if (it) { it.click(); done = true; }
    } else if (e.key === 'Enter') { done = press('rank-submit'); }
    else if (e.key === 'u' || e.key === 'U') { done = press('rank-undo'); }
    else if (e.key === 'c' || e.key === 'C' || e.key === 'Escape') { done = press('rank-clear'); }
    else if (e.key === 't' || e.key === 'T') { done = press('rank-tie'); }
    else if (e.key === 's' || e.key === 'S') { done = press('rank-skip'); }
    if (done) e.preventDefault();
  });
})();
</script>
"""

CSS = """
#rank-cands .thumbnail-item { cursor: pointer; }
#rank-header h2 { margin-bottom: 0.2em; }
#rank-picked p { font-size: 1.1em; }
.rank-keys { font-size: 0.85em; opacity: 0.8; }
"""

BADGE = (230, 60, 30)


def badge(img, place: int):
    """A copy of ``img`` with a numbered disc (``place``, 1 = best) in its top-right corner and a border."""
    from PIL import ImageDraw, ImageFont

    im = img.convert("RGB").copy()
    w, h = im.size
    d = ImageDraw.Draw(im)
    r = max(12, min(w, h) // 9)
    bw = max(3, min(w, h) // 60)
    d.rectangle([0, 0, w - 1, h - 1], outline=BADGE, width=bw)
    x0 = w - bw - 4 - 2 * r  # top-right: the gallery's label covers the top-left corner of the first image
    d.ellipse([x0, bw + 4, x0 + 2 * r, bw + 4 + 2 * r], fill=BADGE, outline=(255, 255, 255), width=max(2, bw // 2))
    try:
        font = ImageFont.load_default(size=int(r * 1.3))
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    d.text((x0 + r, bw + 4 + r), str(place), fill=(255, 255, 255), font=font, anchor="mm")
    return im


def _pad_short_calls(demo, api_name: str, defaults: list) -> None:
    """Gradio refuses a call that sends fewer values than the endpoint has parameters with its
    own ValueError (a traceback in the server's log, an empty error for the client). For
    ``api_name`` we pad such a call with the parameters' defaults instead, so that the endpoint
    answers it with a structured error naming the missing field. Relies on gradio passing the
    same list on to preprocessing (gradio 6; tests/test_store_hardening.py posts short bodies)."""
    orig = demo.validate_inputs

    def validate_inputs(block_fn, inputs):
        if getattr(block_fn, "api_name", None) == api_name and isinstance(inputs, list) and len(inputs) < len(defaults):
            inputs.extend(defaults[len(inputs):])
        return orig(block_fn, inputs)

    demo.validate_inputs = validate_inputs


def build_app(backend, title: str = "vfeedback rank"):
    """The ``gr.Blocks`` of the app around ``backend`` (see :mod:`vfeedback.app.backend`)."""
    import gradio as gr

    from .backend import AnswerError

    mode = backend.mode

    def header(v, msg: str = "") -> str:
        n = backend.count()
        lines = [f"## {v.title}", f"**Prompt:** {v.prompt}" if v.prompt else "",
                 f"Round {v.round + 1} &nbsp;·&nbsp; **{n} answer{'s' if n != 1 else ''} saved** &nbsp;·&nbsp; {mode}", "", v.instructions]
        return "\n\n".join(x for x in lines if x is not None)

    def picked_md(v, picks) -> str:
        if v.done:
            return ""
        if not picks:
            return "Picked: *nothing yet* — click images (or press 1-9), best first."
        return "Picked (best first): " + " → ".join(f"**#{i + 1}**" for i in picks)

    def cands_value(v, picks):
        out = []
        for i, im in enumerate(v.images):
            cap = f"{i + 1}"
            if i in picks:
                im = badge(im, picks.index(i) + 1)
                cap = f"{i + 1} — picked {picks.index(i) + 1}"
            out.append((im, cap))
        return out

    def side_values():
        s = backend.side()
        if mode == "zo_ranksgd":
            out = [s.get("current"), s.get("history", [])]
            if zo_check_on:
                c = s.get("check") or {}
                pts = c.get("points") or []
                md = ""
                if pts:
                    md = (f"**Check** ({c['reward']}): P(image matches the caption) of the current image: start "
                          f"**{pts[0]['score']:.3f}**, now (round {pts[-1]['round']}) **{pts[-1]['score']:.3f}**.\n\n"
                          "*A judge that is never trained on; it is not what you are asked to optimise: pick by what you see.*")
                out += [md, c.get("curve")]
            return out
        if mode == "d3po":
            u = s.get("update") or {}
            out = [update_md(u), update_bar(u), (u.get("last") or {}).get("before_after")]
            if probes_on:
                pr = s.get("probes") or {}
                out += [probe_md(pr), pr.get("panel"), pr.get("curve")]
            return out
        return []

    probes_on = mode == "d3po" and bool(backend.cfg.rank.probe_prompts)
    zo_check_on = mode == "zo_ranksgd" and bool(backend.cfg.rank.probe_reward)

    def probe_md(pr: dict) -> str:
        if not pr:
            return ""
        pts = pr["points"]
        base, last = pts[0], pts[-1]
        line = (f"**Probe check** ({pr['reward']}, {pr['n']} fixed probe images): base model mean P(match) "
                f"**{base['mean']:.3f}**, match rate {base['match_rate']:.2f}")
        if last["update"]:
            line += (f"; after update {last['update']} ({last['labels']} labels): mean P(match) **{last['mean']:.3f}**, "
                     f"match rate {last['match_rate']:.2f}")
        return (line + ".\n\n*A check on what your answers do, measured by a judge that is never trained on; "
                "it is not what you are asked to optimise: rank by what you see.*")

    def update_md(u: dict) -> str:
        if not u:
            return ""
        every = u.get("labels_per_update")
        n = u["labels"]
        lines = [f"**{n} label{'s' if n != 1 else ''}** with a preference so far."]
        if u.get("running") is not None:
            lines.append(f"D3PO update {u['running']} running: {u.get('phase', '')}.")
        elif every:
            lines.append(f"Next background update at {u['next_at']} labels.")
        last = u.get("last")
        if last:
            wr = last.get("win_rate")
            lines.append(f"Update {last['n']} finished: held-out win rate over the base model "
                         f"{'n/a' if wr is None else f'{wr:.2f}'}; LoRA in `{last['lora']}`.")
        if u.get("failed") is not None and (not last or u["failed"] > last["n"]):
            lines.append(f"Update {u['failed']} did not finish; see `{u.get('failed_log')}`.")
        return "\n\n".join(lines)

    def update_bar(u: dict) -> str:
        if not u or u.get("running") is None:
            return ""
        p = max(0.0, min(1.0, float(u.get("progress") or 0.0)))
        return (f"<div style='border:1px solid #999;border-radius:4px;height:14px;width:100%'>"
                f"<div style='background:#e63c1e;height:100%;width:{p * 100:.0f}%'></div></div>"
                f"<div class='rank-keys'>{p * 100:.0f}% of {backend.cfg.rank.update_steps} steps</div>")

    def refresh(picks, msg=""):
        v = backend.view()
        picks = [p for p in (picks or []) if p < len(v.images)]
        return [picks, v.round_id, header(v), gr.update(value=cands_value(v, picks), columns=min(4, max(1, len(v.images)))),
                picked_md(v, picks), msg] + side_values()

    moved_on = "⚠ This round was answered elsewhere (another tab or person); here is the current round."

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        picks = gr.State([])
        shown = gr.State("")  # the id of the round this tab shows
        mine = gr.State([])  # [round_id, answer_id] of each counted answer this tab gave, oldest first
        with gr.Row():
            with gr.Column(scale=3):
                head = gr.Markdown(elem_id="rank-header")
                user_box = gr.Textbox(label="Your name (stored with every answer; tells people apart, e.g. for VPL: docs/vpl.md)",
                                      value=backend.annotator or "", max_lines=1, max_length=64, elem_id="rank-user")
                cands = gr.Gallery(label="Candidates — click in order, best first", show_label=True, columns=4, height="auto",
                                   allow_preview=False, interactive=False, object_fit="contain", elem_id="rank-cands",
                                   buttons=[], format="png")
                picked = gr.Markdown(elem_id="rank-picked")
                with gr.Row():
                    submit = gr.Button("Submit (Enter)", variant="primary", elem_id="rank-submit")
                    clear = gr.Button("Clear picks (c)", elem_id="rank-clear")
                    tie = gr.Button("Tie (t)", elem_id="rank-tie", visible=mode in ("d3po", "gallery"))
                    skip = gr.Button("Skip / can't tell (s)", elem_id="rank-skip")
                    undo = gr.Button("Undo my last answer (u)", elem_id="rank-undo")
                status = gr.Markdown(elem_id="rank-status")
                gr.Markdown("Keys: **1-9** pick / unpick · **Enter** submit · **u** undo · **c** clear · **t** tie · **s** skip. "
                            "Every answer is saved the moment you give it.", elem_classes=["rank-keys"])
            with gr.Column(scale=2):
                side: list = []
                if mode == "zo_ranksgd":
                    side.append(gr.Image(label="Current best", interactive=False, elem_id="rank-current", height=320, buttons=[]))
                    side.append(gr.Gallery(label="History (start → now, last 12)", columns=6, height=260, allow_preview=True,
                                           fit_columns=False, interactive=False, elem_id="rank-history", buttons=[], format="png"))
                    if zo_check_on:
                        side.append(gr.Markdown(elem_id="rank-check"))
                        side.append(gr.Image(label="Check (not the objective): held-out judge, current image per round", interactive=False,
                                             elem_id="rank-check-curve", buttons=[], format="png"))
                elif mode == "d3po":
                    side.append(gr.Markdown(elem_id="rank-update"))
                    side.append(gr.HTML(elem_id="rank-update-bar"))
                    side.append(gr.Image(label="Last update: before | after", interactive=False, elem_id="rank-before-after", buttons=[]))
                    run_btn = gr.Button("Run a D3PO update now", elem_id="rank-run-update")
                    if probes_on:  # the probe panel (vfeedback/app/probes.py)
                        side.append(gr.Markdown(elem_id="rank-probe"))
                        side.append(gr.Image(label="Probes: base model | current model (same seeds)", interactive=False,
                                             elem_id="rank-probe-panel", buttons=[], format="png"))
                        side.append(gr.Image(label="Check (not the objective): held-out judge on the probes", interactive=False,
                                             elem_id="rank-probe-curve", buttons=[], format="png"))
                    timer = gr.Timer(2.0)
                else:
                    gr.Markdown("Images of one prompt from several models, same seed, random order. "
                                "Rank them; the models are named after you submit.")
        outs = [picks, shown, head, cands, picked, status] + side

        def on_load(p):
            return refresh(p)

        def on_select(p, sid, evt: gr.SelectData):
            v = backend.view()
            if sid != v.round_id:  # the click was on a round that is gone
                return refresh([], moved_on)
            i = evt.index if isinstance(evt.index, int) else evt.index[0]
            p = list(p or [])
            if i in p:
                p.remove(i)
            elif len(p) < v.max_picks:
                p.append(i)
            elif v.max_picks == 1:
                p = [i]
            return refresh(p)

        on_select.__annotations__["evt"] = gr.SelectData  # a real class: this module has postponed annotations

        def do(kind):
            def fn(p, sid, m, u):
                m = list(m or [])
                try:
                    r = backend.answer(sid, kind, list(p or []) if kind == "rank" else [], u)
                except AnswerError as e:
                    if e.status == 409:
                        return refresh([], moved_on if e.code in ("stale_round", "already_answered") else f"⚠ {e.message}") + [m]
                    return refresh(p, f"⚠ {e.message}") + [m]
                if [r["answered"], r["answer_id"]] not in m:  # a replay (this answer, sent again) is this tab's too
                    m.append([r["answered"], r["answer_id"]])
                return refresh([], r["message"]) + [m]
            return fn

        def on_undo(p, m):
            m = list(m or [])
            if not m:
                return refresh(p, "⚠ This tab has no answer of its own to undo (answers given in another tab, by another "
                                  "person or before a reload are undone there).") + [m]
            rid, aid = m[-1]
            try:
                r = backend.undo(rid, aid)
            except AnswerError as e:
                if not e.detail.get("counted", True):  # undone elsewhere already: nothing of this tab's to keep
                    m.pop()
                return refresh(p, f"⚠ {e.message}") + [m]
            m.pop()
            return refresh([], r["message"]) + [m]

        demo.load(on_load, [picks], outs, api_visibility="private")
        cands.select(on_select, [picks, shown], outs, api_visibility="private")
        submit.click(do("rank"), [picks, shown, mine, user_box], outs + [mine], api_visibility="private")
        tie.click(do("tie"), [picks, shown, mine, user_box], outs + [mine], api_visibility="private")
        skip.click(do("skip"), [picks, shown, mine, user_box], outs + [mine], api_visibility="private")
        clear.click(lambda p: refresh([]), [picks], outs, api_visibility="private")
        undo.click(on_undo, [picks, mine], outs + [mine], api_visibility="private")
        if mode == "d3po":
            def on_run(p):
                n = backend.updates.start()
                return refresh(p, f"Started D3PO update {n}." if n else "An update is running already, or there are no labels yet.")

            run_btn.click(on_run, [picks], outs, api_visibility="private")
            timer.tick(lambda: side_values(), None, side, api_visibility="private")

        # ---- API for scripts and tests (gradio_client)
        def answer(round_id: Any = None, ranking: Any = None, kind: Any = "rank", user: Any = None) -> dict:
            """Answer the round ``round_id`` names (the ``round_id`` of /status): ranking = display
            indices best first, 0-based, as "2,0,5" (or a JSON list); kind = rank | tie | skip;
            user = who answers (optional, stored with the answer).
            Returns {"ok": true, "message", "answer_id", "answered", "replayed", ...status after}
            or {"ok": false, "code", "status", "error", ...status}: nothing stored."""
            try:
                r = backend.answer(round_id, kind, ranking, user)
            except AnswerError as e:
                return {**backend.status(), **e.to_json()}
            except Exception as e:  # a fault of ours (the store, the disk): logged, reported, not stored
                log.exception("/answer failed")
                return {**backend.status(), "ok": False, "code": "internal", "status": 500, "error": f"{type(e).__name__}: {e}"}
            return {**backend.status(), **r}

        def undo_answer(round_id: Any = None, answer_id: Any = None) -> dict:
            """Take back your answer: round_id = the "answered" and answer_id = the "answer_id" of
            the reply to it. Only the newest counted answer can be undone. Returns {"ok": true,
            "undone", "answer_id", "message", ...status after} or {"ok": false, "code"
            (bad_request | stale_undo | nothing_to_undo), "status", "error", ...status}: nothing changed."""
            try:
                r = backend.undo(round_id, answer_id)
            except AnswerError as e:
                return {**backend.status(), **e.to_json()}
            except Exception as e:  # a fault of ours (the store, the disk): logged, reported
                log.exception("/undo_answer failed")
                return {**backend.status(), "ok": False, "code": "internal", "status": 500, "error": f"{type(e).__name__}: {e}"}
            return {**backend.status(), **r}

        def status_() -> dict:
            """The shown round and the answer count."""
            return backend.status()

        gr.api(answer, api_name="answer")
        _pad_short_calls(demo, "answer", [None, None, "rank", None])
        gr.api(undo_answer, api_name="undo_answer")
        _pad_short_calls(demo, "undo_answer", [None, None])
        gr.api(status_, api_name="status")
        if mode == "d3po":
            def run_update() -> dict:
                """Start a D3PO update on every label so far (if none is running)."""
                return {"started": backend.updates.start(), **backend.status()}

            gr.api(run_update, api_name="run_update")
    return demo
