"""Web pages as a renderer (WebGen-Agent): a completion that writes a web page is screenshotted
by headless Chromium inside the renderer boundary, and the screenshot is scored by any reward.

WebGen-Agent (Lu et al., 2025) scores a generated website by a VLM's judgement of its
screenshot and by a GUI agent's testing of it. Here, in small:

- :class:`WebPage`: the completion is an HTML page, or a few fenced files (```html, ```css,
  ```js; a name after the label, e.g. ```css theme.css, names the file). The files are written
  to the sandbox's private ``/tmp``, served on the sandbox's own loopback, loaded in Chromium
  (Playwright, ``--no-sandbox`` because bubblewrap is the sandbox) at ``viewport`` with every
  request that is not the page's own refused, and screenshotted. The screenshot goes to any
  reward through :func:`vfeedback.integrations.trl.reward_function` (a VLM judge, CLIP against
  the request, :class:`~vfeedback.integrations.trl.ImageSimilarity` against a target design).
- Scripted interaction, in place of WebGen-Agent's GUI agent: ``steps`` (``{"click": sel}``,
  ``{"type": sel, "text": ...}``, ``{"press": key, "selector": sel}``, ``{"wait": ms}``), run
  in order after the screenshot, then ``checks`` (``{"visible": sel}``, ``{"text": ...,
  "selector": sel}``). :func:`interaction_reward_function` returns the fraction of checks that
  pass as a second TRL reward function; it reuses the same renderings (one browser run per
  completion). Our choice: a step that fails stops the remaining steps (they would act on the
  wrong state) and the checks still run, so a page that half works gets partial credit.

Per-row steps and checks come from the dataset column ``interaction`` (a dict with ``steps``
and ``checks``), else from the constructor.
"""
from __future__ import annotations

import collections
import json
import logging
import math
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, Sequence, Union

from . import sandbox as _sandbox
from .trl import Renderer, _column, _from_render, completion_text

log = logging.getLogger(__name__)

MAX_PAGE_CHARS = 512 * 1024
_FENCE = re.compile(r"```([\w+-]*)[ \t]*([^\n`]*)\n(.*?)(?:```|\Z)", flags=re.S)
_DEFAULT_NAME = {"html": "index.html", "css": "style.css", "js": "script.js"}
_LABEL = {"html": "html", "htm": "html", "xhtml": "html", "css": "css", "js": "js", "javascript": "js"}


def parse_page(text: str) -> dict[str, str]:
    """The files of a completion: ``{"index.html": ..., "style.css": ..., ...}``.

    Fenced ```html / ```css / ```js blocks (a file name after the label names the file; the
    first HTML file is the page); without fences, a text that looks like HTML is the page.
    A stylesheet or script the page does not mention is linked into it. Raises ValueError
    (no HTML, too large, a bad file name).
    """
    files: dict[str, str] = {}
    page: Optional[str] = None
    for label, hint, body in _FENCE.findall(text):
        kind = _LABEL.get(label.lower())
        if kind is None:
            continue
        hint = hint.strip()
        name = hint if re.fullmatch(r"[\w.-]+(/[\w.-]+)*\.(html?|css|js)", hint) else _DEFAULT_NAME[kind]
        if kind == "html" and page is None:
            name, page = "index.html", name
        while name in files:  # two unnamed blocks of one kind
            stem, dot, ext = name.rpartition(".")
            name = f"{stem}_{len(files)}.{ext}"
        files[name] = body.strip()
    if "index.html" not in files and re.search(r"<\s*(!doctype|html|body|div|h1|p|main|button)\b", text, flags=re.I):
        files["index.html"] = text.strip()
    if "index.html" not in files:
        raise ValueError("no HTML in the completion (a ```html block or a page)")
    if sum(len(v) for v in files.values()) > MAX_PAGE_CHARS:
        raise ValueError(f"page over {MAX_PAGE_CHARS // 1024} KiB")
    html = files["index.html"]
    for name in files:
        if name == "index.html" or name in html:
            continue
        tag = f'<link rel="stylesheet" href="{name}">' if name.endswith(".css") else f'<script src="{name}"></script>' if name.endswith(".js") else ""
        if not tag:
            continue
        anchor = "</head>" if name.endswith(".css") else "</body>"
        i = html.lower().rfind(anchor)
        html = html[:i] + tag + html[i:] if i >= 0 else (tag + html if name.endswith(".css") else html + tag)
    files["index.html"] = html
    return files


class WebPage(Renderer):
    """The completion is a web page; each is screenshotted by headless Chromium inside the
    renderer boundary (:mod:`vfeedback.integrations.sandbox`).

    ``viewport``: ``(width, height)`` of the browser window and of the image. ``steps`` /
    ``checks``: the scripted interaction for every row (the ``interaction_column`` overrides
    them per row). The screenshot is scored against ``target_column`` (else the prompt's text)
    and given ``target_image_column`` as ``reference``. ``sandbox``: ``strict`` (bubblewrap) or
    ``weak`` (opt in; trusted pages only). ``browser``: the Chromium binary (default
    :func:`~vfeedback.integrations.sandbox.find_browser`).
    """

    name = "webpage"

    def __init__(self, *, viewport: tuple[int, int] = (640, 480), timeout: float = 60.0, memory_mb: int = 4096,
                 steps: Optional[list[dict]] = None, checks: Optional[list[dict]] = None,
                 interaction_column: Optional[str] = "interaction", target_column: Optional[str] = "target",
                 target_image_column: Optional[str] = "target_image", workers: int = 1, sandbox: str = "strict",
                 browser: Optional[str] = None, action_timeout_ms: int = 2000):
        self.width, self.height = int(viewport[0]), int(viewport[1])
        if not (16 <= self.width <= 4096 and 16 <= self.height <= 4096):
            raise ValueError(f"viewport: {viewport!r} must be two sizes between 16 and 4096 pixels")
        self.timeout = float(timeout)
        self.memory_mb = int(memory_mb)
        self.steps, self.checks = list(steps or []), list(checks or [])
        _validate_script(self.steps, self.checks, "WebPage")
        self.interaction_column = interaction_column
        self.target_column = target_column
        self.target_image_column = target_image_column
        self.workers = max(1, int(workers))
        self.sandbox = _sandbox.check_mode(sandbox)
        self.browser = browser
        self.action_timeout_ms = int(action_timeout_ms)
        # the renderings of the latest batches, so that the screenshot reward and the
        # interaction reward of one training step share one browser run per page
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self._cache_size = 64
        self._lock = threading.Lock()

    def _script(self, columns: dict, i: int) -> tuple[list, list]:
        row = _column(columns, self.interaction_column, i)
        if row is None:
            return self.steps, self.checks
        if isinstance(row, str):
            row = json.loads(row)
        steps, checks = list(row.get("steps") or []), list(row.get("checks") or [])
        _validate_script(steps, checks, f"column {self.interaction_column!r}, row {i}")
        return steps, checks

    def render_one(self, text: str, steps: Sequence[dict] = (), checks: Sequence[dict] = ()) -> _sandbox.RenderResult:
        """Screenshot one completion and run its interaction; never raises for a bad page."""
        key = json.dumps([text, list(steps), list(checks)], sort_keys=True)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        try:
            files = parse_page(text)
        except ValueError as e:
            res = _sandbox.RenderResult(None, f"page: {e}")
        else:
            browser = self.browser or _sandbox.find_browser()
            if browser is None:
                res = _sandbox.RenderResult(None, "browser: no Chromium found (apt-get install chromium, or set VFEEDBACK_CHROMIUM)")
            else:
                res = _sandbox.run_worker(dict(kind="webpage", files=files, browser=browser, steps=list(steps), checks=list(checks),
                                               action_timeout_ms=self.action_timeout_ms),
                                          width=self.width, height=self.height, timeout=self.timeout, memory_mb=self.memory_mb,
                                          sandbox=self.sandbox, tmp_mb=256)
        with self._lock:
            self._cache[key] = res
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return res

    def results(self, completions: list[str], columns: dict) -> list[_sandbox.RenderResult]:
        """One :class:`~vfeedback.integrations.sandbox.RenderResult` per completion (cached:
        the screenshot reward and the interaction reward of one step share them)."""
        scripts = [self._script(columns, i) for i in range(len(completions))]
        self._cache_size = max(64, 2 * len(completions))  # two batches: this one and the one before
        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(lambda a: self.render_one(*a), [(c, s, k) for c, (s, k) in zip(completions, scripts)]))

    def __call__(self, requests, completions, columns):
        return [_from_render(r, i, requests, columns, self.target_column, self.target_image_column)
                for i, r in enumerate(self.results(completions, columns))]


def _validate_script(steps: list, checks: list, where: str) -> None:
    for s in steps:
        if not isinstance(s, dict) or not ({"click", "type", "press", "wait"} & set(s)):
            raise ValueError(f"{where}: step {s!r} is not one of {{click: sel}}, {{type: sel, text: ...}}, {{press: key}}, {{wait: ms}}")
    for c in checks:
        if not isinstance(c, dict) or not ({"visible", "text"} & set(c)):
            raise ValueError(f"{where}: check {c!r} is not one of {{visible: sel}}, {{text: ..., selector: sel}}")


def pass_rate(result: _sandbox.RenderResult) -> Optional[float]:
    """Fraction of a rendering's checks that passed, in [0, 1]; None without checks or image."""
    checks = (result.extra or {}).get("checks") or []
    if result.error is not None or not checks:
        return None
    return sum(bool(c.get("passed")) for c in checks) / len(checks)


class InteractionReward:
    """A TRL reward function: the fraction of the scripted checks each page passes.

    Shares :class:`WebPage`'s renderings (pass the same renderer to
    :func:`~vfeedback.integrations.trl.reward_function` for the screenshot's score). ``None``
    for a page that could not be rendered or a row without checks; counters as on
    :class:`~vfeedback.integrations.trl.RewardFunction`.
    """

    def __init__(self, render: WebPage, weight: float = 1.0, name: str = "webpage_interaction"):
        if not isinstance(render, WebPage):
            raise TypeError(f"render: expected a WebPage, got {type(render).__name__}")
        self.render, self.weight, self.__name__ = render, float(weight), name
        self.calls = self.scored = self.failed = 0
        self.failures: collections.Counter = collections.Counter()
        self.isolation: collections.Counter = collections.Counter()
        self.last_errors: list[Optional[str]] = []

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs) -> list[Optional[float]]:
        self.calls += 1
        log_metric = kwargs.pop("log_metric", None)
        texts = [completion_text(c) for c in completions]
        try:
            results = self.render.results(texts, kwargs)
        except Exception as e:  # a bad interaction column must not end the training run
            log.warning("%s: %s", self.__name__, e)
            results = [_sandbox.RenderResult(None, f"render: {type(e).__name__}: {e}") for _ in texts]
        out: list[Optional[float]] = []
        self.last_errors = []
        for r in results:
            if r.isolation is not None:
                self.isolation[r.isolation] += 1
            v = pass_rate(r)
            err = r.error if r.error else (None if v is not None else "interaction: no checks")
            self.last_errors.append(err)
            if v is None or not math.isfinite(v):
                self.failed += 1
                self.failures[err.split(":", 1)[0][:40]] += 1
                out.append(None)
            else:
                self.scored += 1
                out.append(self.weight * v)
        if callable(log_metric) and texts:
            try:
                log_metric(f"{self.__name__}/failed_frac", sum(v is None for v in out) / len(texts))
            except Exception:
                pass
        return out


def interaction_reward_function(render: WebPage, weight: float = 1.0, name: str = "webpage_interaction") -> InteractionReward:
    """The second reward of a web-page run: pass rate of ``render``'s scripted checks."""
    return InteractionReward(render, weight=weight, name=name)


__all__ = ["InteractionReward", "WebPage", "interaction_reward_function", "parse_page", "pass_rate"]
