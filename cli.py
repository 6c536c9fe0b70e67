"""`cli`: a thin Typer app. Commands parse options and call plain library functions.

Every error a user can cause is a `UserError` and prints as one line on stderr
with exit code 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable

import typer

from extract.errors import UserError

app = typer.Typer(
    help="Speech emotion recognition with cached SSL features: extract once, train heads fast "
    "(Segmental Average Pooling, GAP/SAP/SR, leave-one-speaker-out).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def user_errors(fn: Callable) -> Callable:
    """Turn a UserError into `error: <message>` on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(code=2) from None

    return wrapper


# --- commands (each one: options, then one call into extract/, cache/ or heads/) ---


if __name__ == "__main__":
    app()
