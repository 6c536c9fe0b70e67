"""Every command documents itself and every option (issue 6: `--help` is complete)."""

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
                    if p.param_type_name == "option" and p.name != "help" and not (p.help or "").strip()]
    assert undocumented == []
    # typer brings its own click: isinstance(p, click.Option) was never true, so this check never ran
    assert any(p.param_type_name == "option" for p in command.params)
    result = CliRunner().invoke(app, [name, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output


def test_training_options_are_the_settings_fields():
    """train-head, ablate, baseline and finetune declare no option of their own for a setting: each is the
    dataclass field, with its default and help (heads/config.py), so they cannot drift apart."""
    from dataclasses import fields

    from heads.config import BaselineConfig, FinetuneSettings, TrainConfig, finetune_config

    def options(name):
        return {p.name: p for p in COMMANDS[name].params}

    for command, cls, defaults in (("train-head", TrainConfig, TrainConfig()), ("ablate", TrainConfig, TrainConfig()),
                                   ("baseline", BaselineConfig, BaselineConfig()),
                                   ("finetune", FinetuneSettings, FinetuneSettings())):
        params = options(command)
        for f in fields(cls):
            if not f.metadata["cli"] or (command == "ablate" and f.name == "pooling"):
                assert f.name not in params, (command, f.name)
                continue
            default = getattr(defaults, f.name)
            assert params[f.name].default == (str(default) if f.metadata["parse"] else default), (command, f.name)
            assert params[f.name].help == f.metadata["help"], (command, f.name)
    finetune = options("finetune")
    assert finetune["lr"].default == finetune_config().lr == 3e-5  # the paper's fine-tuning rate, not the head's
    assert "min_steps" not in finetune and "ensemble" not in finetune  # head-on-cache settings
    assert options("train-head")["ensemble"].metavar == "N|auto"


def test_the_program_is_installed_as_cli_and_as_sapser():
    import tomllib
    from pathlib import Path

    scripts = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"cli": "cli:app", "sapser": "cli:app"}
