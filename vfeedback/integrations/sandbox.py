"""Render untrusted chart / vector code (SVG, matplotlib, Vega-Lite) to an image, sandboxed.

Each rendering runs in a fresh ``python -I`` subprocess (:mod:`._render_worker`) in an empty
temporary folder, with:

- a wall-clock ``timeout`` (the whole process group is killed when it runs over);
- ``resource.setrlimit`` on private writable memory (``RLIMIT_DATA``, ``memory_mb``), CPU seconds, written file size,
  open files, and no core dumps;
- no network: the worker enters a new network namespace (``unshare(CLONE_NEWUSER|CLONE_NEWNET)``,
  needs unprivileged user namespaces or root; :attr:`RenderResult.network_isolated` says
  whether it worked), its environment has no proxy variables, sockets are disabled in
  Python, SVG external references (``href="http..."``, ``file:``, CSS imports) are refused,
  and a Vega-Lite spec with a ``url`` anywhere is refused.

What this is not: a security boundary against hostile code. The matplotlib renderer *executes
Python*; in the subprocess that code can still read any file the user running training can
read, and fork. For untrusted models at scale run the trainer itself in a container or a
jail (nsjail, gVisor, a seccomp profile); these limits keep a runaway or careless completion
from hanging, exhausting or reaching out of the training job.
"""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger(__name__)

KINDS = ("svg", "matplotlib", "vega-lite")
_WORKER = Path(__file__).with_name("_render_worker.py")
_PROXY_VARS = {"http_proxy", "https_proxy", "ftp_proxy", "all_proxy", "no_proxy"}


@dataclass
class RenderResult:
    image: Optional[torch.Tensor]  # (3, H, W) float in [0, 1], or None
    error: Optional[str] = None  # why there is no image
    network_isolated: Optional[bool] = None  # the worker's network namespace took effect


def extract_code(text: str, kind: str = "auto") -> tuple[str, str]:
    """Find the code in a completion and say which kind it is.

    A fenced block (```svg / ```xml / ```python / ```json / ```vega-lite) wins over bare text;
    an ``<svg ...>...</svg>`` element is found inside prose. ``kind="auto"`` decides by the
    fence label, then by content (``<svg`` -> svg, a JSON object -> vega-lite, otherwise
    matplotlib). Returns ``(kind, code)``.
    """
    label, code = "", text
    m = re.search(r"```([\w+-]*)[^\n]*\n(.*?)(```|\Z)", text, flags=re.S)
    if m:
        label, code = m.group(1).lower(), m.group(2)
    if kind == "auto":
        if label in ("svg", "xml", "html") or "<svg" in code:
            kind = "svg"
        elif label in ("json", "vega", "vega-lite", "vegalite") or code.lstrip().startswith("{"):
            kind = "vega-lite"
        else:
            kind = "matplotlib"
    if kind not in KINDS:
        raise ValueError(f"kind: {kind!r} is not one of auto, {', '.join(KINDS)}")
    if kind == "svg":
        s = re.search(r"<svg\b.*</svg\s*>", code, flags=re.S | re.I)
        if s:
            code = s.group(0)
    return kind, code.strip()


def _clean_env() -> dict[str, str]:
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "MPLCONFIGDIR", "FONTCONFIG_PATH", "FONTCONFIG_FILE", "XDG_CACHE_HOME", "LD_LIBRARY_PATH")
    env = {k: v for k, v in os.environ.items() if k in keep and k.lower() not in _PROXY_VARS}
    # one thread per numerical library: the address-space limit counts every thread's arena
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    return env


def render(code: str, kind: str, *, width: int = 256, height: int = 256, timeout: float = 20.0,
           memory_mb: int = 2048, cpu_s: Optional[int] = None, isolate_network: bool = True) -> RenderResult:
    """Render ``code`` of ``kind`` (svg / matplotlib / vega-lite) to a ``(3, height, width)`` image.

    Never raises for bad code: failures (syntax errors, nothing drawn, external resources,
    timeouts, memory) come back as ``RenderResult(None, error=...)``.
    """
    if kind not in KINDS:
        raise ValueError(f"kind: {kind!r} is not one of {', '.join(KINDS)}")
    if not code.strip():
        return RenderResult(None, "empty code")
    req = dict(kind=kind, code=code, width=int(width), height=int(height), memory_mb=int(memory_mb),
               cpu_s=int(cpu_s if cpu_s is not None else max(1, timeout)), isolate_network=isolate_network)
    with tempfile.TemporaryDirectory(prefix="vf-render-") as tmp:
        out = Path(tmp) / "out.png"
        proc = subprocess.Popen(
            [sys.executable, "-I", str(_WORKER), str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, cwd=tmp, env=_clean_env(), start_new_session=True,
        )
        try:
            _, err = proc.communicate(json.dumps(req).encode("utf-8"), timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            proc.communicate()
            return RenderResult(None, f"timeout: rendering ran over {timeout:g} s")
        text = err.decode("utf-8", "replace")
        netns = None
        first = text.split("\n", 1)[0]
        if first.startswith("{"):
            try:
                netns = bool(json.loads(first).get("netns"))
            except ValueError:
                pass
        if proc.returncode != 0 or not out.exists():
            msg = next((ln[6:] for ln in text.splitlines() if ln.startswith("ERROR ")), None)
            if msg is None:
                rc = proc.returncode
                why = f"killed by signal {-rc}" if rc and rc < 0 else f"exit code {rc}"
                msg = f"renderer failed ({why}; memory or CPU limit?): {text.strip()[-300:]}"
            return RenderResult(None, msg, netns)
        from rewards.images import load_image

        try:
            return RenderResult(load_image(out), None, netns)
        except Exception as e:  # a corrupt PNG from the worker
            return RenderResult(None, f"unreadable rendering: {e}", netns)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
