"""Errors a user can act on. The CLI prints their message and exits 2 (or 1), no traceback."""


class UserError(Exception):
    """Bad input from the user: a config field, a file, a value. Exit code 2."""

    exit_code = 2


class RunError(Exception):
    """A fault while running (too many NaN steps, a checkpoint that cannot be read). Exit code 1."""

    exit_code = 1
