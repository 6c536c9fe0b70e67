"""Named choices (poolings, norm modes, protocols, devices, VAD modes, ...): one table per list.

A `Choices` table is the one home of a list: option help (`help()`), validation
(`check()`) and report labels (`label()`) all read it, so a new entry is one
line where the table is defined. Tables hold no implementation, and this module
imports nothing heavy, so `cli.py` builds its help from them without torch.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from core.errors import UserError


@dataclass(frozen=True)
class Choice:
    """One entry: what it means (for --help) and how tables name it ("" = its name)."""

    help: str = ""
    label: str = ""


C = TypeVar("C", bound=Choice)


class Choices(Mapping[Hashable, C], Generic[C]):
    """An ordered, read-only name -> Choice table for one option (e.g. `--pooling`)."""

    def __init__(self, option: str, choices: Mapping[Hashable, C], *, note: str = "",
                 error: type[UserError] = UserError) -> None:
        self.option = option
        self._choices = dict(choices)
        self.note = note  # said after the names when a value is refused, e.g. "WebRTC aggressiveness"
        self.error = error

    def __getitem__(self, name: Hashable) -> C:
        return self._choices[name]

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._choices)

    def __len__(self) -> int:
        return len(self._choices)

    def __repr__(self) -> str:
        return f"Choices({self.option!r}, {list(self._choices)!r})"

    def check(self, value: Hashable) -> Hashable:
        """`value` itself, or the error `--option must be one of a, b, c (note); got 'x'` (`a or b` for two)."""
        if value not in self._choices:
            names = [str(name) for name in self]
            which = spoken(names) if len(names) == 2 else f"one of {', '.join(names)}"
            note = f" ({self.note})" if self.note else ""
            raise self.error(f"{self.option} must be {which}{note}; got {value!r}")
        return value

    def help(self) -> str:
        """`a (what a is), b (...) or c (...)` for the option's --help."""
        return spoken([f"{name} ({c.help})" if c.help else str(name) for name, c in self._choices.items()])

    def label(self, name: Hashable) -> str:
        """How reports name `name` (its label, else the name itself; unknown names as they are)."""
        choice = self._choices.get(name)
        return (choice.label or str(name)) if choice is not None else str(name)


def spoken(items: list[str], last: str = "or") -> str:
    """["a", "b", "c"] -> "a, b or c"."""
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} {last} {items[-1]}"
