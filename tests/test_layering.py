"""Imports run one way: core <- cache <- extract <- heads <- sapser, cli (issue 12).

The folders tell the data flow audio -> extract -> cache -> heads; the import
layers put the cache below extraction (extract writes it, heads read it) and
`core` (what every stage shares) below all. A module may import its own layer
and the layers below it, never one above; every import counts, also the lazy
ones inside functions. Parsed with `ast`, so nothing is imported to check.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"core": 0, "cache": 1, "extract": 2, "heads": 3, "sapser": 4, "cli": 4}
# Beyond the layers: module pairs that must not meet even within a layer.
FORBIDDEN = {
    # The reader shares the format and file contents with the writer through cache.format and
    # cache.contents; it needs nothing of the writing machinery (threads, locks, parts).
    "cache.reader": ("cache.writer", "cache.lock", "cache.parts", "cache.merge"),
}
# The libraries never import the CLI framework (DESIGN.md: cli.py only parses and delegates).
LIBRARIES = ("core", "cache", "extract", "heads")


def modules() -> list[tuple[str, Path]]:
    found = [("cli", ROOT / "cli.py")]
    for package in LAYERS:
        folder = ROOT / package
        if folder.is_dir():
            found += [(f"{package}.{p.stem}".removesuffix(".__init__"), p) for p in sorted(folder.glob("*.py"))]
    return found


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) of every import statement in the file, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
    return out


def upward_imports() -> list[str]:
    bad = []
    for name, path in modules():
        layer = LAYERS[name.split(".")[0]]
        for line, target in imports(path):
            top = target.split(".")[0]
            where = f"{path.relative_to(ROOT)}:{line} imports {target}"
            if top in LAYERS and LAYERS[top] > layer:
                bad.append(where)
            if any(target == f or target.startswith(f + ".") for f in FORBIDDEN.get(name, ())):
                bad.append(where + " (forbidden pair)")
            if top in ("typer", "click") and name.split(".")[0] in LIBRARIES:
                bad.append(where + " (the CLI framework in a library)")
    return bad


def test_every_package_is_found():
    names = {n for n, _ in modules()}
    assert {"core.errors", "cache.reader", "extract.pipeline", "heads.trainer", "sapser", "cli"} <= names


def test_no_import_runs_back_up_the_layers():
    assert upward_imports() == []


@pytest.mark.parametrize("source, expected", [
    ("from heads.folds import plan\n", "imports heads.folds"),
    ("def f():\n    import extract.audio\n", "imports extract.audio"),
])
def test_the_check_sees_top_level_and_lazy_imports(tmp_path, monkeypatch, source, expected):
    fake = tmp_path / "cache"
    fake.mkdir()
    (fake / "bad.py").write_text(source)
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    (tmp_path / "cli.py").write_text("")
    assert [b for b in upward_imports() if expected in b] == [f"cache/bad.py:{source.count(chr(10))} {expected}"]
