"""Sandboxed renderer process: SVG / matplotlib / Vega-Lite source -> PNG file.

Run by :mod:`vfeedback.integrations.sandbox` as ``python -I _render_worker.py OUT.png`` with a
JSON request on stdin. Stdlib only until the limits are in place. Before touching the
untrusted source it, in this order:

1. leaves the network: ``unshare(CLONE_NEWUSER | CLONE_NEWNET)`` (a fresh network namespace
   with only a down loopback), falling back to ``unshare(CLONE_NEWNET)``; if the kernel
   refuses both, it carries on and reports ``netns: false`` (then only step 3 stands);
2. sets resource limits on itself: private memory (RLIMIT_DATA), CPU seconds, file size, open files, no core;
3. replaces ``socket.socket`` / ``getaddrinfo`` with functions that raise (a speed bump, not a
   wall: Python code can undo it, which is why step 1 matters).

It exits 0 after writing the PNG, 2 for a rendering error (message on stderr), 3 when the
source asked for an external resource.
"""
import json
import os
import sys


def _leave_network() -> bool:
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
        for flags in (CLONE_NEWUSER | CLONE_NEWNET, CLONE_NEWNET):
            if libc.unshare(flags) == 0:
                return True
    except Exception:
        pass
    return False


def _limit(memory_mb: int, cpu_s: int, file_mb: int) -> None:
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
    # vl-convert reserves gigabytes of address space it never touches.
    setl(resource.RLIMIT_DATA, memory_mb * 1024 * 1024)
    setl(resource.RLIMIT_CPU, cpu_s)
    setl(resource.RLIMIT_FSIZE, file_mb * 1024 * 1024)
    setl(resource.RLIMIT_NOFILE, 256)
    setl(resource.RLIMIT_CORE, 0)


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


def _svg(code: str, width: int, height: int) -> bytes:
    def fetch(url, resource_type):
        u = url.geturl() if hasattr(url, "geturl") else str(url)
        if u.startswith("data:"):
            from cairosvg.url import fetch as default_fetch

            return default_fetch(u, resource_type)
        raise ExternalResource(f"external resource refused: {u[:120]}")

    # unsafe=False (the default) refuses XML entities and huge files; the fetcher refuses
    # every URL that is not inline data.
    from cairosvg.surface import PNGSurface

    return PNGSurface.convert(bytestring=code.encode("utf-8"), output_width=width, output_height=height,
                              url_fetcher=fetch, unsafe=False, background_color="white")


def _matplotlib(code: str, width: int, height: int) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    dpi = 100
    plt.rcParams["figure.figsize"] = (width / dpi, height / dpi)
    plt.rcParams["figure.dpi"] = dpi
    ns = {"__name__": "__chart__", "plt": plt, "np": np, "matplotlib": matplotlib}
    exec(compile(code, "<completion>", "exec"), ns)  # noqa: S102 - this is the sandboxed process
    fig = plt.gcf()
    if not fig.axes and not fig.artists and not fig.images and not fig.texts:
        raise ValueError("the code drew nothing on the current figure")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
    return buf.getvalue()


def _has_url(obj) -> bool:
    if isinstance(obj, dict):
        return any((k == "url" and isinstance(v, str)) or _has_url(v) for k, v in obj.items())
    if isinstance(obj, list):
        return any(_has_url(v) for v in obj)
    return False


def _vegalite(code: str, width: int, height: int) -> bytes:
    spec = json.loads(code)
    if not isinstance(spec, dict):
        raise ValueError("a Vega-Lite spec must be a JSON object")
    if _has_url(spec):
        raise ExternalResource("Vega-Lite spec loads data from a URL; inline the data (data.values)")
    import vl_convert

    return vl_convert.vegalite_to_png(spec, scale=1, allowed_base_urls=[])


RENDER = {"svg": _svg, "matplotlib": _matplotlib, "vega-lite": _vegalite}


def main() -> int:
    out_path = sys.argv[1]
    req = json.loads(sys.stdin.read())
    netns = _leave_network() if req.get("isolate_network", True) else False
    _limit(int(req["memory_mb"]), int(req["cpu_s"]), int(req.get("file_mb", 64)))
    _no_sockets()
    sys.stderr.write(json.dumps({"netns": netns}) + "\n")
    sys.stderr.flush()
    real_stdout = sys.stdout
    sys.stdout = sys.stderr  # chart code that prints must not mix with anything we read
    try:
        png = RENDER[req["kind"]](req["code"], int(req["width"]), int(req["height"]))
        png = _letterbox(png, int(req["width"]), int(req["height"]))
    except ExternalResource as e:
        sys.stderr.write(f"ERROR external: {e}\n")
        return 3
    except BaseException as e:  # anything the source does wrong is a rendering failure
        sys.stderr.write(f"ERROR {type(e).__name__}: {str(e)[:500]}\n")
        return 2
    finally:
        sys.stdout = real_stdout
    with open(out_path, "wb") as f:
        f.write(png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
