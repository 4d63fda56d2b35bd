"""`vfeedback rank CONFIG [key=value ...]`: the human-ranking app (docs/rank_app.md).

    vfeedback rank configs/rank/tiny-zo.yaml                      # http://127.0.0.1:7860
    vfeedback rank configs/rank/tiny-d3po.yaml --export labels.jsonl   # write the labels, no app
    vfeedback rank CONFIG --share --auth alice:secret             # a public link needs a login

Safe by default: binds 127.0.0.1; ``--share`` and non-loopback hosts refuse to start without
``--auth`` / ``--auth-file``; no upload component, requests capped at 1 MB; only the run folder
is served (its store files are blocked).
"""
from __future__ import annotations

import ipaddress
import logging
import os
from pathlib import Path
from typing import Optional

log = logging.getLogger("vfeedback")

MAX_FILE_SIZE = "1mb"


def add_parser(sub):
    p = sub.add_parser("rank", help="rank images in a browser (ZO-RankSGD rounds, D3PO labels, model galleries)",
                       description="Open the Gradio ranking app for a config; every answer is saved to OUT/feedback.sqlite.")
    p.add_argument("config", help="YAML config with a rank: section (see configs/rank/)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="override config fields, e.g. rank.port=7861")
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
            raise UserError(f"--auth-file: {p} not found")
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip() and not line.strip().startswith("#"):
                lines.append((f"--auth-file {p} line {i}", line.strip()))
    for where, s in lines:
        user, sep, pw = s.partition(":")
        if not sep or not user or not pw:
            raise UserError(f"{where}: expected USER:PASSWORD with both parts non-empty")
        out.append((user, pw))
    return out


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

    auth = auth or []
    host = host or cfg.rank.host
    port = cfg.rank.port if port is None else port
    check_safety(host, share, auth)
    root = Path(cfg.output_dir).resolve()
    if backend is None:
        backend = open_backend(cfg, annotator=auth[0][0] if auth else None)
    # gradio's file cache inside the run folder: the only folder it serves from
    os.environ["GRADIO_TEMP_DIR"] = str(root / ".gradio")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from ..app.ui import CSS, KEYS_JS, build_app

    demo = build_app(backend, title=f"vfeedback rank — {Path(cfg.output_dir).name}")
    if port == 0:
        port = _free_port(host)
    store = backend.store.path.resolve()
    blocked = [str(store), str(store) + "-wal", str(store) + "-shm", str(store) + "-journal"]
    demo.queue(default_concurrency_limit=1)
    kw = dict(server_name=host, server_port=port, share=share, auth=auth or None, allowed_paths=[str(root)], blocked_paths=blocked,
              max_file_size=MAX_FILE_SIZE, inbrowser=open_browser, quiet=True, ssr_mode=False, mcp_server=False, show_error=True,
              head=KEYS_JS, css=CSS)
    if block:
        log.info("vfeedback rank: %s mode, %d answers so far, store %s", backend.mode, backend.count(), store)
        log.info("open http://%s:%d (Ctrl+C stops; every answer is already saved)", host, port)
    _, url, _ = demo.launch(prevent_thread_lock=not block, **kw)
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

    cfg = load_config(args.config, args.overrides)
    resolve_mode(cfg)
    if args.export:
        from ..feedback.store import STORE_FILE, FeedbackStore, StoreError

        p = Path(cfg.output_dir) / STORE_FILE
        if not p.exists():
            raise UserError(f"--export: {p} does not exist; no answers were given for this config yet (output_dir {cfg.output_dir})")
        try:
            store = FeedbackStore(p)
        except StoreError as e:
            raise UserError(str(e)) from None
        n = store.export_jsonl(args.export)
        skipped = store.count("zo_ranksgd")
        print(f"wrote {n} preference records to {args.export}" + (f" ({skipped} zo_ranksgd answers are optimiser rounds, not preference pairs; they stay in {p})" if skipped else ""))
        return 0
    auth = parse_auth(args.auth, args.auth_file)
    launch(cfg, host=args.host, port=args.port, share=args.share, auth=auth, block=True, open_browser=args.open)
    return 0
