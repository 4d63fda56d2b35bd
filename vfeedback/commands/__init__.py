"""CLI sub-commands. Each module defines ``add_parser(subparsers)`` and ``run(args) -> int``.

``vfeedback/cli.py`` lists them in ``COMMANDS``; a new command is a new module plus one line
there.
"""
