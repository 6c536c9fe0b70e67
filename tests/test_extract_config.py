"""ExtractConfig: one home for every extraction setting; `cli extract` reads its options from it."""

from __future__ import annotations

import dataclasses

import pytest
import typer.main

from cli import app
from core.errors import UserError
from core.settings import default_of, flag_of, help_of
from extract.config import ExtractConfig, parse_shard
from extract.pipeline import run_extract

EXTRACT = typer.main.get_command(app).commands["extract"]
# The flags `cli extract` had before ExtractConfig existed: none may disappear.
FLAGS_BEFORE = {"--dataset", "--root", "--out", "--model", "--layers", "--max-seconds", "--batch-seconds", "--device",
                "--dtype", "--amp", "--workers", "--streams", "--shard", "--strict", "--classes", "--json", "--quiet"}


def options() -> dict[str, object]:
    return {p.name: p for p in EXTRACT.params}


def test_every_setting_is_an_extract_option_with_the_dataclass_default_and_help():
    params = options()
    for f in dataclasses.fields(ExtractConfig):
        assert help_of(ExtractConfig, f.name), f.name
        p = params[f.name]
        assert flag_of(ExtractConfig, f.name) in p.opts
        assert p.help == help_of(ExtractConfig, f.name)
        default = default_of(ExtractConfig, f.name)
        assert p.default == (",".join(default) if f.name == "classes" else default), f.name
    flags = {o for p in EXTRACT.params for o in p.opts}
    assert FLAGS_BEFORE <= flags and {"--append", "--buffer-mb"} <= flags


@pytest.mark.parametrize("change, words", [
    (dict(dtype="bfloat16"), "--dtype is the storage dtype"),
    (dict(amp="fast"), "--amp must be one of"),
    (dict(device="gpu"), "--device must be auto, cpu or cuda[:N]"),
    (dict(max_seconds=-1.0), "--max-seconds must be >= 0"),
    (dict(batch_seconds=-2.0), "--batch-seconds must be >= 0"),
    (dict(streams=0), "--streams must be at least 1"),
    (dict(workers=-1), "--workers must be >= 0"),
    (dict(layers="1-x"), "--layers '1-x' is not"),
    (dict(shard="3/2"), "--shard 3/2: i must be between 1 and n"),
    (dict(shard="half"), "--shard must look like i/n"),
    (dict(classes=()), "--classes names no class"),
    (dict(buffer_mb=1), "--buffer-mb must be at least"),
])
def test_validate_refuses_each_bad_setting_in_one_line(change, words):
    with pytest.raises(UserError, match=r"^[^\n]+$") as err:
        ExtractConfig(**change).validate()
    assert words in str(err.value)
    with pytest.raises(UserError):  # the API validates before reading the corpus or loading a model
        run_extract("manifest", "/nonexistent/manifest.csv", ExtractConfig(**change))


def test_the_defaults_validate_and_settings_by_name_change_a_config():
    assert ExtractConfig().validate() == ExtractConfig()
    assert parse_shard("2/4", {}) == (1, 4) and parse_shard(None, {"WORLD_SIZE": "3", "RANK": "2"}) == (2, 3)
    with pytest.raises(TypeError):  # a misspelt setting is a programming error, not silently ignored
        run_extract("manifest", "x.csv", ExtractConfig(), modle="fbank")
