"""Every command documents itself and every option (issue 6: `--help` is complete)."""

import click
import pytest
import typer.main
from typer.testing import CliRunner

from cli import app

COMMANDS = typer.main.get_command(app).commands
CONTRACT = {"manifest", "extract", "info", "train-head", "ablate", "report", "finetune", "predict", "demo"}


def test_the_contract_commands_exist():
    assert CONTRACT <= set(COMMANDS)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_is_complete(name):
    command = COMMANDS[name]
    assert (command.help or "").strip(), f"{name} has no description"
    undocumented = [p.name for p in command.params
                    if isinstance(p, click.Option) and p.name != "help" and not (p.help or "").strip()]
    assert undocumented == []
    result = CliRunner().invoke(app, [name, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output
