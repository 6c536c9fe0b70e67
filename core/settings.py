"""Settings dataclasses whose fields carry their own help: one home for each default and its explanation.

A settings class (extract.config.ExtractConfig, heads.config.TrainConfig, ...) declares
each option as

    lr: float = setting(1e-3, "AdamW peak learning rate")

and `cli.py` builds the command-line option from the field: the name (`--lr`, or
`flag=`), the default and the help text. No torch, no typer here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

HELP = "help"
FLAG = "flag"


def setting(default: Any = dataclasses.MISSING, help: str = "", *, flag: str | None = None,  # noqa: A002
            cli: bool = True, default_factory: Any = dataclasses.MISSING, metavar: str | None = None,
            parse: Callable[[Any], Any] | None = None) -> Any:
    """A dataclass field with its help text (and, when it differs from `--field-name`, its flag).

    `cli=False`: a setting of the API and config.json that no command exposes as an option.
    `parse`: how the option's text becomes the value (the option is then typed as text, e.g.
    `--ensemble N|auto`, shown as `metavar`).
    """
    metadata = {HELP: help, FLAG: flag, "cli": cli, "metavar": metavar, "parse": parse}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def field_of(cls: type, name: str) -> dataclasses.Field:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f
    raise KeyError(f"{cls.__name__} has no setting {name!r}")


def help_of(cls: type, name: str) -> str:
    """The help text declared with setting `name` of `cls`."""
    return str(field_of(cls, name).metadata.get(HELP, ""))


def flag_of(cls: type, name: str) -> str:
    """The command-line flag of setting `name`: its declared flag, else `--` + the name with dashes."""
    return field_of(cls, name).metadata.get(FLAG) or "--" + name.replace("_", "-")


def default_of(cls: type, name: str) -> Any:
    f = field_of(cls, name)
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    raise KeyError(f"{cls.__name__}.{name} has no default")
