"""Renderer process: SVG / matplotlib / Vega-Lite source or a web page -> PNG.

Run by :mod:`vfeedback.integrations.sandbox` as ``python -I _render_worker.py`` with a JSON
request on stdin, normally inside bubblewrap (the boundary: a private ``/tmp``, read-only system
and interpreter, new PID / network / IPC / user namespaces). Stdlib only until the limits are
in place. Before touching the untrusted source it, in this order:

1. outside bubblewrap only (``sandbox: weak``): leaves the network with
   ``unshare(CLONE_NEWUSER | CLONE_NEWNET)``, falling back to ``unshare(CLONE_NEWNET)``;
2. sets resource limits on itself: private memory (RLIMIT_DATA), CPU seconds, file size, open
   files, processes (RLIMIT_NPROC, inside bubblewrap's user namespace only; a host root is
   exempt from it, hence step 3), no core dumps;
3. loads a seccomp filter through libseccomp (the system's ``libseccomp.so.2``, called with
   ctypes because no maintained Python binding is on PyPI): kernel-administration, tracing
   and namespace calls fail with EPERM; for the Python renderers also ``execve``, process
   creation (``fork``, ``clone`` without ``CLONE_THREAD``) and every socket that is not
   ``AF_UNIX`` -- so a fork bomb or a shell-out fails at its first call;
4. writes a header line (``{"netns": ..., "seccomp": ...}``) to its real stdout, then points
   fd 1 at stderr, so that whatever the code prints cannot be taken for the result;
5. Python renderers: replaces ``socket.socket`` / ``getaddrinfo`` with functions that raise
   (a speed bump only; steps 1-3 and the boundary are the wall).

The result is one JSON line on the saved stdout: ``{"png": base64, "extra": {...}}``. Exit
codes: 0 done, 2 rendering error (``ERROR ...`` on stderr), 3 the source asked for an
external resource.
"""
import json
import os
import sys

# x86-64 / arm64 constants (linux/sched.h, sys/socket.h)
_CLONE_THREAD = 0x00010000
_AF_UNIX = 1

# always refused: administration of the kernel, tracing other processes, new namespaces, raw I/O
_DENY_ALWAYS = (
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "mount", "umount2", "pivot_root", "chroot",
    "unshare", "setns", "keyctl", "add_key", "request_key", "bpf", "perf_event_open", "userfaultfd",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot", "swapon",
    "swapoff", "acct", "quotactl", "open_by_handle_at", "name_to_handle_at", "io_uring_setup",
    "io_uring_enter", "io_uring_register", "syslog", "iopl", "ioperm", "clock_settime", "settimeofday",
    "adjtimex", "sethostname", "setdomainname", "fanotify_init", "lookup_dcookie",
)
# refused to the Python renderers (matplotlib executes the completion; none of them needs these)
_DENY_PYTHON = ("execve", "execveat", "fork", "vfork")


def _leave_network() -> bool:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
        for flags in (CLONE_NEWUSER | CLONE_NEWNET, CLONE_NEWNET):
            if libc.unshare(flags) == 0:
                _loopback_up()
                return True
    except Exception:
        pass
    return False


def _loopback_up() -> None:
    """Bring up ``lo`` in the fresh network namespace (a web page is served on it), as
    bubblewrap does for the strict boundary: SIOCGIFFLAGS / SIOCSIFFLAGS (linux/sockios.h)."""
    import fcntl
    import socket
    import struct

    SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            flags = struct.unpack("16sh14x", fcntl.ioctl(s, SIOCGIFFLAGS, struct.pack("16sh14x", b"lo", 0)))[1]
            fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sh14x", b"lo", flags | IFF_UP))
    except OSError:
        pass  # the page falls back to file: URLs


def _limit(memory_mb: int, cpu_s: int, file_mb: int, nproc: int, count_nproc: bool) -> None:
    import resource

    def setl(which, value):
        try:
            soft, hard = resource.getrlimit(which)
            if hard != resource.RLIM_INFINITY:
                value = min(value, hard)
            resource.setrlimit(which, (value, value))
        except (ValueError, OSError):
            pass

    # RLIMIT_DATA (private writable memory, Linux >= 4.7) rather than RLIMIT_AS: V8 inside
    # vl-convert and Chromium reserve gigabytes of address space they never touch.
    setl(resource.RLIMIT_DATA, memory_mb * 1024 * 1024)
    setl(resource.RLIMIT_CPU, cpu_s)
    setl(resource.RLIMIT_FSIZE, file_mb * 1024 * 1024)
    setl(resource.RLIMIT_NOFILE, 256 if nproc <= 1 else 4096)
    setl(resource.RLIMIT_CORE, 0)
    # RLIMIT_NPROC counts the processes of the uid in the current user namespace: only inside
    # bubblewrap's fresh one does that mean the worker's own (outside, all of the user's)
    if count_nproc:
        setl(resource.RLIMIT_NPROC, max(nproc, 64))


def _seccomp(python_only: bool) -> bool:
    """Load the filter described in the module docstring; False when libseccomp is missing."""
    try:
        import ctypes

        lib = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    except OSError:
        return False

    class ArgCmp(ctypes.Structure):  # struct scmp_arg_cmp (seccomp.h)
        _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]

    SCMP_ACT_ALLOW = 0x7FFF0000
    SCMP_CMP_NE, SCMP_CMP_MASKED_EQ = 1, 7

    def errno_action(e: int) -> int:
        return 0x00050000 | (e & 0xFFFF)

    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(ArgCmp)]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    ctx = lib.seccomp_init(SCMP_ACT_ALLOW)
    if not ctx:
        return False
    EPERM, ENOSYS = 1, 38

    def rule(name: str, action: int, *cmps) -> None:
        nr = lib.seccomp_syscall_resolve_name(name.encode())
        if nr < 0:  # not a system call on this architecture (fork on arm64)
            return
        arr = (ArgCmp * len(cmps))(*cmps) if cmps else None
        if lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), arr) != 0:
            raise OSError(f"seccomp rule for {name} refused")

    try:
        for name in _DENY_ALWAYS:
            rule(name, errno_action(EPERM))
        if python_only:
            for name in _DENY_PYTHON:
                rule(name, errno_action(EPERM))
            # clone3 passes its flags in memory, out of a filter's reach: ENOSYS makes glibc
            # fall back to clone, whose flags (arg 0 on x86-64 / arm64) can be checked
            rule("clone3", errno_action(ENOSYS))
            rule("clone", errno_action(EPERM), ArgCmp(0, SCMP_CMP_MASKED_EQ, _CLONE_THREAD, 0))
            rule("socket", errno_action(EPERM), ArgCmp(0, SCMP_CMP_NE, _AF_UNIX, 0))
        return lib.seccomp_load(ctx) == 0
    except OSError:
        return False
    finally:
        lib.seccomp_release(ctx)


class ExternalResource(Exception):
    pass


def _no_sockets() -> None:
    import socket

    def refuse(*a, **k):
        raise ExternalResource("network access is disabled in the renderer sandbox")

    class NoSocket(socket.socket):  # a class, so that modules subclassing socket.socket still import
        def __init__(self, *a, **k):
            refuse()

    socket.socket = NoSocket  # type: ignore[misc]
    socket.create_connection = refuse  # type: ignore[assignment]
    socket.getaddrinfo = refuse  # type: ignore[assignment]


def _letterbox(png: bytes, width: int, height: int) -> bytes:
    """Fit the rendering into width x height on white, keeping its aspect ratio."""
    import io

    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        im.load()
        if im.mode in ("RGBA", "LA", "P"):
            im = im.convert("RGBA")
            bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(bg, im)
        im = im.convert("RGB")
        if im.size != (width, height):
            s = min(width / im.width, height / im.height)
            w, h = max(1, round(im.width * s)), max(1, round(im.height * s))
            im = im.resize((w, h), Image.BICUBIC)
            canvas = Image.new("RGB", (width, height), (255, 255, 255))
            canvas.paste(im, ((width - w) // 2, (height - h) // 2))
            im = canvas
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue()


def _svg(req: dict):
    def fetch(url, resource_type):
        u = url.geturl() if hasattr(url, "geturl") else str(url)
        if u.startswith("data:"):
            from cairosvg.url import fetch as default_fetch

            return default_fetch(u, resource_type)
        raise ExternalResource(f"external resource refused: {u[:120]}")

    # unsafe=False (the default) refuses XML entities and huge files; the fetcher refuses
    # every URL that is not inline data.
    from cairosvg.surface import PNGSurface

    png = PNGSurface.convert(bytestring=req["code"].encode("utf-8"), output_width=int(req["width"]), output_height=int(req["height"]),
                             url_fetcher=fetch, unsafe=False, background_color="white")
    return png, {}


def _matplotlib(req: dict):
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    dpi = 100
    plt.rcParams["figure.figsize"] = (int(req["width"]) / dpi, int(req["height"]) / dpi)
    plt.rcParams["figure.dpi"] = dpi
    ns = {"__name__": "__chart__", "plt": plt, "np": np, "matplotlib": matplotlib}
    exec(compile(req["code"], "<completion>", "exec"), ns)  # noqa: S102 - this is the sandboxed process
    fig = plt.gcf()
    if not fig.axes and not fig.artists and not fig.images and not fig.texts:
        raise ValueError("the code drew nothing on the current figure")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
    return buf.getvalue(), {}


def _has_url(obj) -> bool:
    if isinstance(obj, dict):
        return any((k == "url" and isinstance(v, str)) or _has_url(v) for k, v in obj.items())
    if isinstance(obj, list):
        return any(_has_url(v) for v in obj)
    return False


def _vegalite(req: dict):
    spec = json.loads(req["code"])
    if not isinstance(spec, dict):
        raise ValueError("a Vega-Lite spec must be a JSON object")
    if _has_url(spec):
        raise ExternalResource("Vega-Lite spec loads data from a URL; inline the data (data.values)")
    import vl_convert

    return vl_convert.vegalite_to_png(spec, scale=1, allowed_base_urls=[]), {}


def _serve(site: str):
    """A loopback HTTP server for the page's files (inside the sandbox's own network namespace)."""
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=site))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}/"


def _webpage(req: dict):
    """Write the page's files to the private tmp, serve them on loopback, load the page in
    headless Chromium at the viewport, screenshot it, then run the scripted steps and checks."""
    site = os.path.join(os.getcwd(), "site")
    os.makedirs(site, exist_ok=True)
    for name, text in req["files"].items():
        path = os.path.normpath(os.path.join(site, name))
        if not path.startswith(site + os.sep):
            raise ValueError(f"file name {name!r} leaves the site folder")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    try:
        srv, base = _serve(site)
    except OSError:  # loopback down (weak sandbox in a bare network namespace): file URLs
        srv, base = None, "file://" + site + "/"
    from playwright.sync_api import sync_playwright

    width, height = int(req["width"]), int(req["height"])
    action_ms = int(req.get("action_timeout_ms", 2000))
    extra: dict = {"steps": [], "checks": []}
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=req["browser"], timeout=int(req.get("launch_timeout_ms", 30000)),
            # bubblewrap is the sandbox: Chromium's own needs user namespaces, which the boundary refuses
            args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-breakpad",
                  "--disable-crash-reporter", "--no-first-run", "--disable-extensions", "--mute-audio"],
        )
        page = browser.new_page(viewport={"width": width, "height": height}, device_scale_factor=1)
        # nothing but the page's own files: the network namespace has no route anyway; refusing
        # here makes a page with a CDN link fail fast instead of waiting on DNS
        page.route("**/*", lambda route: route.continue_() if route.request.url.startswith(base) else route.abort())
        page.goto(base + "index.html", wait_until="load", timeout=int(req.get("load_timeout_ms", 10000)))
        png = page.screenshot(type="png")
        for step in req.get("steps") or []:
            ok, why = _step(page, step, action_ms)
            extra["steps"].append({"step": step, "ok": ok, "error": why})
            if not ok:  # later steps would act on the wrong state
                break
        for check in req.get("checks") or []:
            ok, why = _check(page, check, action_ms)
            extra["checks"].append({"check": check, "passed": ok, "error": why})
        browser.close()
    if srv is not None:
        srv.shutdown()
    return png, extra


def _step(page, step: dict, ms: int):
    try:
        if "click" in step:
            page.click(step["click"], timeout=ms)
        elif "type" in step:
            page.fill(step["type"], str(step.get("text", "")), timeout=ms)
        elif "press" in step:
            page.press(step.get("selector", "body"), step["press"], timeout=ms)
        elif "wait" in step:
            page.wait_for_timeout(min(float(step["wait"]), 5000))
        else:
            return False, f"unknown step {sorted(step)}"
        return True, None
    except Exception as e:
        return False, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"


def _check(page, check: dict, ms: int):
    try:
        if "visible" in check:
            loc = page.locator(check["visible"]).first
            try:
                loc.wait_for(state="visible", timeout=ms)
            except Exception:
                return False, f"{check['visible']!r} is not visible"
            return True, None
        if "text" in check:
            where = check.get("selector", "body")
            text = page.locator(where).first.inner_text(timeout=ms)
            ok = str(check["text"]) in text
            return ok, None if ok else f"{check['text']!r} not in {where}"
        return False, f"unknown check {sorted(check)}"
    except Exception as e:
        return False, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"


RENDER = {"svg": _svg, "matplotlib": _matplotlib, "vega-lite": _vegalite, "webpage": _webpage}


def main() -> int:
    import base64

    req = json.loads(sys.stdin.read())
    browser = req["kind"] == "webpage"
    netns = _leave_network() if req.get("leave_network") else None
    _limit(int(req["memory_mb"]), int(req["cpu_s"]), int(req.get("file_mb", 64)), 512 if browser else 1, bool(req.get("own_userns")))
    filtered = _seccomp(python_only=not browser) if req.get("seccomp", True) else False
    out = os.fdopen(os.dup(1), "w")
    out.write(json.dumps({"netns": netns, "seccomp": filtered}) + "\n")
    out.flush()
    os.dup2(2, 1)  # the code's prints (Python or C level) go to stderr, which the parent caps
    sys.stdout = sys.stderr
    if not browser:
        _no_sockets()
    try:
        png, extra = RENDER[req["kind"]](req)
        png = _letterbox(png, int(req["width"]), int(req["height"]))
    except ExternalResource as e:
        sys.stderr.write(f"\nERROR external: {e}\n")
        return 3
    except BaseException as e:  # anything the source does wrong is a rendering failure
        sys.stderr.write(f"\nERROR {type(e).__name__}: {str(e)[:500]}\n")
        return 2
    out.write(json.dumps({"png": base64.b64encode(png).decode("ascii"), "extra": extra}) + "\n")
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
