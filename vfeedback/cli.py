"""`vfeedback` command line: argument parsing and exit codes, nothing else.

Exit codes: 0 success, 1 runtime fault (or some inputs failed to score), 2 user error.
User errors print one clear message, never a traceback; set VFEEDBACK_DEBUG=1 to see one.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

# sub-command name -> module in vfeedback.commands
COMMANDS = {
    "train": "train",
    "validate": "validate",
    "sample": "sample",
    "score": "score",
    "rewards": "rewards_list",
    "rank": "rank",
    "env": "env",
}


class UsageError(Exception):
    """A command line argparse refuses (unknown flag, missing value, wrong type): exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a refused command line is one line (the flag, the value, where to look) and
    :func:`main` returns 2 instead of argparse printing its usage block and exiting the process.
    Sub-command parsers are of this class too (argparse's add_subparsers uses the parent's class)."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = _Parser(prog="vfeedback", description="Reward-feedback fine-tuning of diffusion models.")
    p.add_argument("--version", action="version", version=f"vfeedback {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, mod in COMMANDS.items():
        try:
            module = importlib.import_module(f"vfeedback.commands.{mod}")
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("vfeedback.commands"):
                continue  # command not built yet
            raise
        module.add_parser(sub)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    try:
        # key=value overrides may come after options too (`train c.yaml --resume a.b=1`)
        args, extra = parser.parse_known_args(argv)
        if extra:
            if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
                args.overrides = list(args.overrides) + extra
            else:
                prog = f"vfeedback {args.command}" if args.command else "vfeedback"
                raise UsageError(f"{prog}: unrecognized arguments: {' '.join(extra)} (see `{prog} --help`)")
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # force: each call writes to the current stderr (tests call main() many times)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s" if args.verbose else "%(message)s",
        stream=sys.stderr,
        force=True,
    )
    # libraries that log at INFO while loading (open_clip: "Loading pretrained ..."); their lines
    # would come before, and bury, our own one-line error
    for noisy in ("httpx", "urllib3", "PIL", "matplotlib", "h5py", "torch.distributed", "accelerate", "filelock",
                  "open_clip", "timm", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not args.verbose:  # open_clip logs through the root logger itself (logging.info(...))
        for h in logging.getLogger().handlers:
            h.addFilter(lambda r: r.name != "root" or r.levelno >= logging.WARNING)
    _quiet_libraries(args.verbose)
    if not args.command:
        parser.print_help()
        return 2
    from .errors import RunError, UserError
    from rewards.base import RewardError
    from rewards.images import ImageError

    try:
        return int(args.func(args) or 0)
    except (UserError, RewardError, ImageError) as e:
        if os.environ.get("VFEEDBACK_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunError as e:
        if os.environ.get("VFEEDBACK_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _quiet_libraries(verbose: bool) -> None:
    """diffusers / transformers load-time progress bars and advisory warnings drown our own
    output; keep them for -v."""
    if verbose:
        return
    try:
        import diffusers.utils.logging as dl

        dl.set_verbosity_error()
        dl.disable_progress_bar()
    except ImportError:
        pass
    try:
        import transformers.utils.logging as tl

        tl.set_verbosity_error()
        tl.disable_progress_bar()
    except ImportError:
        pass


if __name__ == "__main__":
    sys.exit(main())
