"""`vfeedback rank CONFIG [key=value ...]`: the human-ranking app (docs/rank_app.md).

    vfeedback rank configs/rank/shapes-d3po.yaml                  # http://127.0.0.1:7860
    vfeedback rank configs/rank/shapes-d3po.yaml --export labels.jsonl # write the labels, no app
    vfeedback rank CONFIG --share --auth alice:secret             # a public link needs a login

Safe by default: binds 127.0.0.1; ``--share`` and non-loopback hosts refuse to start without
``--auth`` / ``--auth-file``; no upload component, requests capped at 1 MB; ``output_dir`` must be
a run folder of the app (or new / empty), and only what the app wrote there is served
(``OUT/rank/`` and gradio's cache ``OUT/.gradio/``; the store files are blocked besides). One app
per run folder (the store's writer lock). ``--export`` reads the store read-only and never
writes onto the store, a folder, an existing file in the run folder, or an existing file
elsewhere that is not an earlier export.
"""
from __future__ import annotations

import errno
import ipaddress
import logging
import os
import re
from pathlib import Path
from typing import Optional

log = logging.getLogger("vfeedback")

MAX_FILE_SIZE = "1mb"
USER_RE = re.compile(r"[A-Za-z0-9._@-]{1,64}")  # a login's user name (--auth, --auth-file)


def add_parser(sub):
    p = sub.add_parser("rank", help="rank images in a browser (ZO-RankSGD rounds, D3PO labels, model galleries)",
                       description="Open the Gradio ranking app for a config; every answer is saved to OUT/feedback.sqlite.")
    p.add_argument("config", help="YAML config with a rank: section (see configs/rank/)")
    p.add_argument("overrides", nargs="*", default=[], metavar="key=value", help="override config fields, e.g. rank.port=7861")
    p.add_argument("--export", metavar="FILE.jsonl", help="write the stored labels as a D3PO preference file and exit (no app)")
    p.add_argument("--host", help="address to bind (default rank.host, 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default rank.port; 0: any free port)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (needs --auth or --auth-file)")
    p.add_argument("--auth", metavar="USER:PASSWORD", action="append", default=[], help="require this login (repeatable)")
    p.add_argument("--auth-file", metavar="FILE", help="logins, one USER:PASSWORD per line (# comments)")
    p.add_argument("--open", action="store_true", help="open the page in the default browser")
    p.set_defaults(func=run)


def parse_auth(pairs: list[str], auth_file: Optional[str]) -> list[tuple[str, str]]:
    from ..errors import UserError

    out = []
    lines = [(f"--auth {s!r}", s) for s in pairs]
    if auth_file:
        p = Path(auth_file)
        if not p.is_file():
            raise UserError(f"--auth-file: {p} is not a file")
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--auth-file: cannot read {p} ({e})") from None
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip() and not line.strip().startswith("#"):
                lines.append((f"--auth-file {p} line {i}", line.strip()))
    for where, s in lines:
        user, sep, pw = s.partition(":")
        if not sep or not user or not pw:
            raise UserError(f"{where}: expected USER:PASSWORD with both parts non-empty")
        if not USER_RE.fullmatch(user):  # e.g. a JSON line: not a login file
            raise UserError(f"{where}: expected USER:PASSWORD, USER of letters, digits and . _ @ - (got user {user[:40]!r})")
        out.append((user, pw))
    return out


def check_port(host: str, port: int, flag: str) -> None:
    """Refuse a port out of range or one something already listens on (``flag``: where it came
    from, for the message). Port 0 (any free port) passes."""
    import socket

    from ..errors import UserError

    if not 0 <= port <= 65535:
        raise UserError(f"{flag}: {port} is out of range; use 1..65535, or 0 for any free port")
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise UserError(f"--host {host}: not an address this machine can bind ({e}); use e.g. 127.0.0.1") from None
    fam, _, _, _, addr = infos[0]
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a TIME_WAIT socket is no conflict
        try:
            s.bind(addr)
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                raise UserError(f"{flag}: port {port} on {host} is {'in use' if e.errno == errno.EADDRINUSE else 'not allowed'} "
                                f"({e.strerror}); choose another port (e.g. {flag if flag.startswith('--') else '--port'} 0 for any free port)") from None
            raise UserError(f"--host {host}: cannot bind port {port} there ({e.strerror}); use e.g. 127.0.0.1") from None


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_safety(host: str, share: bool, auth: list) -> None:
    """Refuse to expose the app without a login."""
    from ..errors import UserError

    if share and not auth:
        raise UserError("--share publishes the app on a public gradio.live link; refusing to start without a login. "
                        "Add --auth USER:PASSWORD (or --auth-file FILE)")
    if not _loopback(host) and not auth:
        raise UserError(f"--host {host}: binding beyond this machine needs a login; add --auth USER:PASSWORD (or --auth-file FILE), "
                        "or keep the default 127.0.0.1")


def launch(cfg, *, host: Optional[str] = None, port: Optional[int] = None, share: bool = False, auth: Optional[list] = None,
           block: bool = True, open_browser: bool = False, backend=None):
    """Build the backend and the page for ``cfg`` and serve it. Returns ``(demo, url, backend)``;
    with ``block=False`` the server runs in a thread (``demo.close()`` stops it)."""
    from ..app.backend import open_backend

    from ..errors import UserError
    from ..feedback.store import store_files

    auth = auth or []
    host = host or cfg.rank.host
    flag = "rank.port" if port is None else "--port"
    port = cfg.rank.port if port is None else port
    check_safety(host, share, auth)
    check_port(host, port, flag)  # before the model loads: a taken port fails in a second
    root = Path(cfg.output_dir).resolve()
    if backend is None:
        backend = open_backend(cfg, annotator=auth[0][0] if auth else None)
    try:
        # gradio's file cache inside the run folder; it serves that and OUT/rank/ (the images the app wrote), nothing else
        os.environ["GRADIO_TEMP_DIR"] = str(root / ".gradio")
        os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
        from ..app.ui import CSS, KEYS_JS, build_app

        demo = build_app(backend, title=f"vfeedback rank — {Path(cfg.output_dir).name}")
        if port == 0:
            port = _free_port(host)
        store = backend.store.path.resolve()
        blocked = [str(f) for f in store_files(store)]
        (root / "rank").mkdir(exist_ok=True)
        demo.queue(default_concurrency_limit=1)
        kw = dict(server_name=host, server_port=port, share=share, auth=auth or None, allowed_paths=[str(root / "rank")],
                  blocked_paths=blocked, max_file_size=MAX_FILE_SIZE, inbrowser=open_browser, quiet=True, ssr_mode=False,
                  mcp_server=False, show_error=True, head=KEYS_JS, css=CSS)
        if block:
            log.info("vfeedback rank: %s mode, %d answers so far, store %s", backend.mode, backend.count(), store)
            log.info("open http://%s:%d (Ctrl+C stops; every answer is already saved)", host, port)
        try:
            _, url, _ = demo.launch(prevent_thread_lock=not block, **kw)
        except OSError as e:  # the port was taken between the check and the launch
            raise UserError(f"{flag}: cannot serve on {host}:{port} ({e}); choose another port (--port 0: any free port)") from None
    except BaseException:
        backend.close()
        raise
    return demo, url, backend


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host if _loopback(host) else "", 0))
        return s.getsockname()[1]


def run(args) -> int:
    from ..app.backend import resolve_mode
    from ..config import load_config
    from ..errors import UserError

    # flag values first (an empty value is not "use the default"); then the config
    for flag, value in (("--host", args.host), ("--auth-file", args.auth_file), ("--export", args.export)):
        if value is not None and not value.strip():
            raise UserError(f"{flag}: empty value; give one (see `vfeedback rank --help`)")
    if args.export is not None:
        app_only = [f for f, given in (("--host", args.host is not None), ("--port", args.port is not None), ("--share", args.share),
                                       ("--auth", bool(args.auth)), ("--auth-file", args.auth_file is not None), ("--open", args.open))
                    if given]
        if app_only:
            raise UserError(f"--export writes the labels and exits without starting the app; {', '.join(app_only)} "
                            f"{'does' if len(app_only) == 1 else 'do'} not apply: drop {'it' if len(app_only) == 1 else 'them'}")
    if args.port is not None and not 0 <= args.port <= 65535:
        raise UserError(f"--port: {args.port} is out of range; use 1..65535, or 0 for any free port")
    cfg = load_config(args.config, args.overrides)
    resolve_mode(cfg)
    if args.export is not None:
        from ..feedback.store import STORE_FILE, FeedbackStore, StoreError, check_export_target

        p = Path(cfg.output_dir) / STORE_FILE
        if not p.exists():
            raise UserError(f"--export: {p} does not exist; no answers were given for this config yet (output_dir {cfg.output_dir})")
        try:
            check_export_target(p, args.export)  # before the store is opened: a refusal touches nothing
        except StoreError as e:
            raise UserError(f"--export: {e}") from None
        try:
            store = FeedbackStore(p, readonly=True)  # no writer lock: exporting while the app runs is fine
        except StoreError as e:
            raise UserError(f"output_dir: {e}") from None
        try:
            n = store.export_jsonl(args.export)
            skipped = store.count("zo_ranksgd")
        except StoreError as e:
            raise UserError(f"--export: {e}") from None
        except OSError as e:
            raise UserError(f"--export: cannot write {args.export} ({e.strerror or e})") from None
        finally:
            store.close()
        print(f"wrote {n} preference records to {args.export}" + (f" ({skipped} zo_ranksgd answers are optimiser rounds, not preference pairs; they stay in {p})" if skipped else ""))
        return 0
    auth = parse_auth(args.auth, args.auth_file)
    launch(cfg, host=args.host, port=args.port, share=args.share, auth=auth, block=True, open_browser=args.open)
    return 0
