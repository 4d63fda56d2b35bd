"""Render untrusted chart / vector code (SVG, matplotlib, Vega-Lite) or a web page to an image,
inside a boundary.

The boundary (``sandbox="strict"``, the default) is bubblewrap (``bwrap``, Debian package
``bubblewrap``). Each rendering is a fresh ``python -I`` process (:mod:`._render_worker`) that sees:

- read-only: the interpreter and its virtual environment, the system's shared libraries
  (``/usr/lib*``), fonts (``/usr/share/fonts``, ``/etc/fonts``) and, for web pages, Chromium
  (under ``/usr/lib``); nothing else of the host -- no ``/root``, ``/home``, ``/work``, no
  project checkout, no dataset, no host ``/tmp``;
- writable: an empty private ``/tmp`` and ``/dev/shm`` (size-capped tmpfs that vanish with it;
  bubblewrap's own root and ``/dev`` are remounted read-only);
- new user (uid 65534 inside, every capability dropped, no further user namespaces), PID,
  network (only a loopback), IPC, UTS and cgroup namespaces, its own session, a clean
  environment, and ``--die-with-parent``;
- the worker's own limits: private memory (RLIMIT_DATA), CPU seconds, file size, open files,
  no core dumps, a seccomp filter (see :mod:`._render_worker`: no ``execve``, no new
  processes and no non-Unix sockets for the Python renderers), and a wall-clock ``timeout``
  after which the sandbox is killed. What the code prints is capped (the first and last 64 KiB
  kept), and the result travels over a pipe.

Where bubblewrap cannot run, rendering is refused (``RenderResult.error`` says why) unless the
caller opts in to ``sandbox="weak"``: the same worker and limits in a plain subprocess, which
tries to enter a network namespace of its own. That is **not** a boundary: the code can read
whatever the training user can read. Every result says which boundary it ran under
(:attr:`RenderResult.isolation`: ``bwrap+seccomp``, ``bwrap``, ``weak+seccomp``, ``weak`` or
``none`` when refused; ``None`` when nothing was run, e.g. empty code).

What the strict boundary does not cover: kernel bugs (bubblewrap shares the host kernel; this is
not a virtual machine), CPU and memory bandwidth taken from the trainer while it runs, and what
a completion *draws*: an image is the output, and a completion can draw anything.
"""
from __future__ import annotations

import base64
import collections
import functools
import io
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger(__name__)

KINDS = ("svg", "matplotlib", "vega-lite")
MODES = ("strict", "weak")
_WORKER = Path(__file__).with_name("_render_worker.py")
_GUEST_WORKER = "/opt/vfeedback/render_worker.py"
_CAP = 64 * 1024  # bytes of the worker's stderr kept at each end
_MAX_RESULT = 64 * 1024 * 1024  # a result line longer than this is refused


@dataclass
class RenderResult:
    image: Optional[torch.Tensor]  # (3, H, W) float in [0, 1], or None
    error: Optional[str] = None  # why there is no image
    network_isolated: Optional[bool] = None  # the rendering had no route out (own network namespace)
    isolation: Optional[str] = None  # bwrap+seccomp / bwrap / weak+seccomp / weak / none (refused); None: nothing ran
    extra: dict = field(default_factory=dict)  # what the renderer reports besides the image (web-page checks)


def extract_code(text: str, kind: str = "auto") -> tuple[str, str]:
    """Find the code in a completion and say which kind it is.

    A fenced block (```svg / ```xml / ```python / ```json / ```vega-lite) wins over bare text;
    an ``<svg ...>...</svg>`` element is found inside prose. ``kind="auto"`` decides by the
    fence label, then by content (``<svg`` -> svg, a JSON object -> vega-lite, otherwise
    matplotlib). Returns ``(kind, code)``.
    """
    import re

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


def check_mode(sandbox: str) -> str:
    """Validate a ``sandbox`` setting (``strict`` or ``weak``); raises ValueError naming it."""
    if sandbox not in MODES:
        raise ValueError(f"sandbox: {sandbox!r} is not one of strict (bubblewrap, the default), weak (a plain subprocess: opt in only for trusted code)")
    return sandbox


def find_browser() -> Optional[str]:
    """The Chromium binary for web pages: ``$VFEEDBACK_CHROMIUM``, Debian's
    ``/usr/lib/chromium/chromium`` (the real binary behind the ``/usr/bin/chromium`` script), or
    ``chromium`` / ``chromium-browser`` / ``google-chrome`` on PATH."""
    env = os.environ.get("VFEEDBACK_CHROMIUM")
    if env:
        return env if os.access(env, os.X_OK) else None
    if os.access("/usr/lib/chromium/chromium", os.X_OK):
        return "/usr/lib/chromium/chromium"
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return os.path.realpath(path)
    return None


def _clean_env(guest: bool) -> dict[str, str]:
    """The worker's whole environment: nothing of the trainer's (tokens, proxies, paths)."""
    home = "/tmp" if guest else "."
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": home, "TMPDIR": "/tmp" if guest else tempfile.gettempdir(),
           "MPLCONFIGDIR": f"{home}/.mpl", "XDG_CACHE_HOME": f"{home}/.cache", "XDG_CONFIG_HOME": f"{home}/.config",
           # one thread per numerical library: the memory limit counts every thread's arena
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    return env


def _ro_paths(browser: Optional[str]) -> list[str]:
    """Host paths the guest sees read-only: interpreter, libraries, fonts, the browser."""
    want = [sys.base_prefix, sys.prefix, os.path.dirname(os.path.realpath(sys.executable)),
            "/usr/lib", "/usr/lib64", "/usr/lib32", "/usr/libx32", "/usr/share/fonts", "/usr/local/share/fonts",
            "/usr/share/fontconfig", "/etc/fonts", "/var/cache/fontconfig", "/etc/ld.so.cache", "/etc/ld.so.conf",
            "/etc/ld.so.conf.d", "/usr/share/zoneinfo"]
    # site-packages outside the prefixes (a system Python's dist-packages, PYTHONPATH=... installs)
    want += [p for p in sys.path if p.rstrip("/").endswith(("site-packages", "dist-packages"))]
    if browser:
        want += [os.path.dirname(os.path.realpath(browser))]
    out: list[str] = []
    for p in want:
        p = os.path.realpath(p)
        if os.path.exists(p) and not any(p == q or p.startswith(q.rstrip("/") + "/") for q in out):
            out = [q for q in out if not q.startswith(p.rstrip("/") + "/")] + [p]
    return sorted(out)


@functools.lru_cache(maxsize=None)
def _bwrap_options(bwrap: str) -> frozenset:
    """Options of this bubblewrap that are newer than its oldest supported releases."""
    try:
        text = subprocess.run([bwrap, "--help"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.TimeoutExpired):
        return frozenset()
    return frozenset(o for o in ("--size", "--disable-userns", "--clearenv") if o in text)


def _bwrap_argv(tmp_mb: int, browser: Optional[str]) -> list[str]:
    bwrap = shutil.which("bwrap")
    have = _bwrap_options(bwrap)

    def size(mb: int) -> list[str]:  # tmpfs size caps need bubblewrap >= 0.7
        return ["--size", str(mb * 1024 * 1024)] if "--size" in have else []

    argv = [bwrap, "--unshare-all", "--unshare-user", "--uid", "65534", "--gid", "65534",
            *(["--disable-userns"] if "--disable-userns" in have else []),
            "--die-with-parent", "--new-session", "--cap-drop", "ALL", *(["--clearenv"] if "--clearenv" in have else []),
            "--hostname", "sandbox", "--proc", "/proc", "--dev", "/dev", *size(64), "--tmpfs", "/dev/shm",
            *size(tmp_mb), "--tmpfs", "/tmp", "--chdir", "/tmp"]
    for link in ("/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32"):
        if os.path.islink(link):
            argv += ["--symlink", os.readlink(link), link]
        elif os.path.isdir(link):
            argv += ["--ro-bind", link, link]
    for p in _ro_paths(browser):
        argv += ["--ro-bind", p, p]
    argv += ["--ro-bind", str(_WORKER), _GUEST_WORKER]
    # bubblewrap's own root and /dev are tmpfs without a size cap: read-only, so that the capped
    # /tmp and /dev/shm are the only writable places (device nodes stay usable)
    argv += ["--remount-ro", "/dev", "--remount-ro", "/"]
    for k, v in _clean_env(True).items():
        argv += ["--setenv", k, v]
    return argv


@functools.lru_cache(maxsize=None)
def bwrap_status() -> tuple[bool, str]:
    """Can bubblewrap run the renderer here? ``(True, "")`` or ``(False, reason)``; probed once
    per process by starting the interpreter inside the boundary."""
    if shutil.which("bwrap") is None:
        log.warning("renderer sandbox: bubblewrap is not installed; untrusted code will be refused unless sandbox='weak'")
        return False, "bubblewrap is not installed (Debian/Ubuntu: apt-get install bubblewrap)"
    try:
        r = subprocess.run(_bwrap_argv(8, None) + [sys.executable, "-I", "-c", "import json, zlib"],
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"bubblewrap failed to start: {e}"
    if r.returncode != 0:
        why = f"bubblewrap cannot run here (user namespaces disabled?): {r.stderr.decode('utf-8', 'replace').strip()[-200:]}"
        log.warning("renderer sandbox: %s; untrusted code will be refused unless sandbox='weak'", why)
        return False, why
    return True, ""


class _Capped(threading.Thread):
    """Drains a pipe, keeping the first and last ``cap`` bytes (what a flood of prints leaves)."""

    def __init__(self, pipe, cap: int, limit: Optional[int] = None):
        super().__init__(daemon=True)
        self.pipe, self.cap, self.limit = pipe, cap, limit
        self.head = bytearray()
        self.tail: collections.deque = collections.deque()
        self.tail_len = 0
        self.total = 0

    def run(self) -> None:
        while True:
            chunk = self.pipe.read1(65536) if hasattr(self.pipe, "read1") else self.pipe.read(65536)
            if not chunk:
                break
            self.total += len(chunk)
            if self.limit is not None:  # the result pipe: keep all of it up to the limit
                if self.total <= self.limit:
                    self.head += chunk
                continue
            if len(self.head) < self.cap:
                take = self.cap - len(self.head)
                self.head += chunk[:take]
                chunk = chunk[take:]
            if chunk:
                self.tail.append(chunk)
                self.tail_len += len(chunk)
                while self.tail_len - len(self.tail[0]) >= self.cap:
                    self.tail_len -= len(self.tail.popleft())

    def text(self) -> str:
        mid = b"" if self.total <= len(self.head) + self.tail_len else b"\n[... output cut ...]\n"
        return (bytes(self.head) + mid + b"".join(self.tail)[-self.cap:]).decode("utf-8", "replace")


def render(code: str, kind: str, *, width: int = 256, height: int = 256, timeout: float = 20.0,
           memory_mb: int = 2048, cpu_s: Optional[int] = None, isolate_network: bool = True,
           sandbox: str = "strict") -> RenderResult:
    """Render ``code`` of ``kind`` (svg / matplotlib / vega-lite) to a ``(3, height, width)`` image.

    ``sandbox``: ``strict`` (bubblewrap; refuses when it cannot run) or ``weak`` (a plain
    subprocess; trusted code only). Never raises for bad code: failures (syntax errors, nothing
    drawn, external resources, timeouts, memory, a refused sandbox) come back as
    ``RenderResult(None, error=...)``.
    """
    if kind not in KINDS:
        raise ValueError(f"kind: {kind!r} is not one of {', '.join(KINDS)}")
    if not code.strip():
        return RenderResult(None, "empty code")
    return run_worker(dict(kind=kind, code=code), width=width, height=height, timeout=timeout, memory_mb=memory_mb,
                      cpu_s=cpu_s, isolate_network=isolate_network, sandbox=sandbox)


def run_worker(request: dict, *, width: int, height: int, timeout: float, memory_mb: int, cpu_s: Optional[int] = None,
               isolate_network: bool = True, sandbox: str = "strict", tmp_mb: int = 64) -> RenderResult:
    """Run one worker request (see :mod:`._render_worker`) under the ``sandbox`` boundary and
    read its image back. ``tmp_mb``: size of the private ``/tmp``."""
    check_mode(sandbox)
    browser = request.get("browser")
    req = dict(request, width=int(width), height=int(height), memory_mb=int(memory_mb),
               cpu_s=int(cpu_s if cpu_s is not None else max(1, timeout)))
    if sandbox == "strict":
        ok, why = bwrap_status()
        if not ok:
            return RenderResult(None, f"sandbox: refused to run untrusted code: {why}; or set sandbox: weak to run it without a boundary", isolation="none")
    with tempfile.TemporaryDirectory(prefix="vf-render-") as tmp:
        if sandbox == "strict":
            argv = _bwrap_argv(tmp_mb, browser) + [sys.executable, "-I", _GUEST_WORKER]
            env, cwd = None, tmp  # bwrap starts with an empty environment; --setenv gives the guest its own
            req["leave_network"], req["own_userns"] = False, True
        else:
            argv = [sys.executable, "-I", str(_WORKER)]
            env, cwd = _clean_env(False), tmp
            req["leave_network"] = bool(isolate_network)
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd,
                                env=env if env is not None else {}, start_new_session=True)
        out, err = _Capped(proc.stdout, 0, limit=_MAX_RESULT), _Capped(proc.stderr, _CAP)
        out.start()
        err.start()
        try:
            proc.stdin.write(json.dumps(req).encode("utf-8"))
            proc.stdin.close()
        except BrokenPipeError:
            pass
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
            proc.wait()
        out.join(5)
        err.join(5)
        return _result(proc.returncode, bytes(out.head), out.total, err.text(), timed_out, timeout, sandbox)


def _result(rc: int, out: bytes, out_total: int, text: str, timed_out: bool, timeout: float, sandbox: str) -> RenderResult:
    lines = out.split(b"\n", 1)
    header: dict = {}
    try:
        header = json.loads(lines[0]) if lines[0] else {}
    except ValueError:
        pass
    seccomp = bool(header.get("seccomp"))
    isolation = ("bwrap" if sandbox == "strict" else "weak") + ("+seccomp" if seccomp else "")
    netns = True if sandbox == "strict" else header.get("netns")
    res = RenderResult(None, None, netns, isolation)
    if timed_out:
        res.error = f"timeout: rendering ran over {timeout:g} s"
        return res
    if out_total > _MAX_RESULT:
        res.error = f"renderer output over {_MAX_RESULT >> 20} MiB"
        return res
    body = lines[1].strip() if len(lines) > 1 else b""
    if rc != 0 or not body:
        msg = next((ln[6:] for ln in reversed(text.splitlines()) if ln.startswith("ERROR ")), None)
        if msg is None:
            why = f"killed by signal {-rc}" if rc and rc < 0 else f"exit code {rc}"
            msg = f"renderer failed ({why}; memory or CPU limit?): {text.strip()[-300:]}"
        res.error = msg
        return res
    try:
        doc = json.loads(body.split(b"\n", 1)[0])
        import numpy as np
        from PIL import Image

        with Image.open(io.BytesIO(base64.b64decode(doc["png"], validate=True))) as im:
            if im.width * im.height > 64_000_000:
                raise ValueError(f"{im.width}x{im.height} image")
            rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        res.image = torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()
        res.extra = doc.get("extra") or {}
    except Exception as e:  # a corrupt result from the worker (or from code that wrote to its pipe)
        res.image, res.error = None, f"unreadable rendering: {type(e).__name__}: {e}"[:300]
    return res


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
