"""`cli(*args)` for tests: the CLI in-process (typer's CliRunner), every argument as a string."""

from __future__ import annotations

from typer.testing import CliRunner

from cli import app

runner = CliRunner()


def cli(*args) -> tuple[int, str]:
    """(exit code, stdout + stderr) of `cli ARGS...`."""
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.output
