"""Imports run one way: core <- cache <- extract <- heads <- sapser, cli; inside heads/, rooms by concern.

The folders tell the data flow audio -> extract -> cache -> heads; the import
layers put the cache below extraction (extract writes it, heads read it) and
`core` (what every stage shares) below all. Inside heads/ the rooms have
layers of their own (`HEADS_ROOMS`): the settings, then the run folder's
owner, then the model and the evaluation (torch modules; metrics and
reports), then training, then fine-tuning, then prediction and the demo. A
module may import its own room and the rooms below it, never one above nor a
sibling room on its own layer; and no set of modules imports itself around a
circle. Every import counts, also the lazy ones inside functions and those
under `if TYPE_CHECKING:`. Parsed with `ast`, so nothing is imported to check.

The run folder's file names are spelled in one module, heads/runfolder.py, as
the cache's HDF5 paths are in cache/format.py (`test_run_folder_names_have_one_owner`).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"core": 0, "cache": 1, "extract": 2, "heads": 3, "sapser": 4, "cli": 4}
# Inside heads/: room -> layer. The model (torch modules) and evaluation (metrics, reports) share a
# layer and must not import each other; training stands on both.
HEADS_ROOMS = {
    "heads": 0, "heads.config": 0,
    "heads.runfolder": 1,
    "heads.model": 2, "heads.evaluate": 2,
    "heads.train": 3,
    "heads.finetune": 4,
    "heads.predict": 5, "heads.demo": 5,
}
# Beyond the layers: module pairs that must not meet even within a layer.
FORBIDDEN = {
    # The reader shares the format and file contents with the writer through cache.format and
    # cache.contents; it needs nothing of the writing machinery (threads, locks, parts).
    "cache.reader": ("cache.writer", "cache.lock", "cache.parts", "cache.merge"),
}
# The libraries never import the CLI framework (DESIGN.md: cli.py only parses and delegates).
LIBRARIES = ("core", "cache", "extract", "heads")
# What the run folder holds (heads/runfolder.py); no other product module spells these names.
RUN_FOLDER_NAMES = ("config.json", "metrics.json", "predictions.csv", "utterances.csv", "head.safetensors",
                    "history.csv", "baseline.safetensors", "confusion.png", "curves.png", "wave-index.npz",
                    "layers.json", "layers.png", "segments.csv", "timeline.png")
RUN_FOLDER_OWNER = "heads.runfolder"


def modules() -> list[tuple[str, Path]]:
    found = [("cli", ROOT / "cli.py")]
    for package in LAYERS:
        folder = ROOT / package
        if folder.is_dir():
            for p in sorted(folder.rglob("*.py")):
                parts = p.relative_to(ROOT).with_suffix("").parts
                found.append((".".join(parts).removesuffix(".__init__"), p))
    return found


def imports(path: Path, known: set[str] = frozenset()) -> list[tuple[int, str]]:
    """(line, imported module) of every import statement in the file, at any depth.

    `from a.b import c` counts as importing a.b and, when a.b.c is one of the `known` modules, a.b.c.
    """
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names if f"{node.module}.{a.name}" in known]
    return out


def room(name: str) -> str | None:
    """The heads room a module belongs to (the longest HEADS_ROOMS key that is it or its package)."""
    hits = [r for r in HEADS_ROOMS if name == r or name.startswith(r + ".")]
    return max(hits, key=len) if hits else None


def upward_imports() -> list[str]:
    bad = []
    names = {n for n, _ in modules()}
    for name, path in modules():
        layer = LAYERS[name.split(".")[0]]
        for line, target in imports(path, names):
            top = target.split(".")[0]
            where = f"{path.relative_to(ROOT)}:{line} imports {target}"
            if top in LAYERS and LAYERS[top] > layer:
                bad.append(where)
            if any(target == f or target.startswith(f + ".") for f in FORBIDDEN.get(name, ())):
                bad.append(where + " (forbidden pair)")
            if top in ("typer", "click") and name.split(".")[0] in LIBRARIES:
                bad.append(where + " (the CLI framework in a library)")
            here, there = room(name), room(target)
            if here and there and target in names and here != there and there != "heads":
                if HEADS_ROOMS[there] > HEADS_ROOMS[here]:
                    bad.append(where + f" (heads: {here} stands below {there})")
                elif HEADS_ROOMS[there] == HEADS_ROOMS[here]:
                    bad.append(where + f" (heads: {here} and {there} are rooms on one layer)")
    return bad


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (packages' __init__ included)."""
    names = {n for n, _ in modules()}
    return {name: {t for _, t in imports(path, names) if t in names and t != name} for name, path in modules()}


def import_circles() -> list[list[str]]:
    """Every import circle found by a depth-first walk, each as [a, b, ..., a]."""
    graph, state, circles = import_graph(), {}, []

    def walk(node: str, stack: list[str]) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                circles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                walk(nxt, stack)
        stack.pop()
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            walk(name, [])
    return circles


def run_folder_names_outside_the_owner() -> list[str]:
    """`path:line 'literal'` of every string in product code (docstrings aside) that spells a run-folder file."""
    bad = []
    for name, path in modules():
        if name == RUN_FOLDER_OWNER or not (name.startswith("heads") or name in ("cli", "sapser")):
            continue
        tree = ast.parse(path.read_text(), str(path))
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                      and node.body and isinstance(node.body[0], ast.Expr)
                      and isinstance(node.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                if any(n in node.value for n in RUN_FOLDER_NAMES):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.value[:60]!r}")
    return bad


def test_every_package_is_found():
    names = {n for n, _ in modules()}
    assert {"core.errors", "cache.reader", "extract.pipeline", "heads.train.trainer", "heads.model.head",
            "heads.runfolder", "sapser", "cli"} <= names
    assert all(room(n) for n in names if n.startswith("heads")), "a heads module outside every room"


def test_no_import_runs_back_up_the_layers():
    assert upward_imports() == []


def test_no_import_circle():
    assert import_circles() == []


def test_run_folder_names_have_one_owner():
    assert run_folder_names_outside_the_owner() == []


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


def fake_heads(tmp_path: Path, files: dict[str, str]) -> None:
    for rel, text in {"cli.py": "", "heads/__init__.py": "", "heads/model/__init__.py": "",
                      "heads/train/__init__.py": "", "heads/evaluate/__init__.py": "", **files}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)


def test_the_check_sees_rooms_inside_heads(tmp_path, monkeypatch):
    fake_heads(tmp_path, {
        "heads/model/head.py": "from heads.train.trainer import Trainer\n",  # the model importing training
        "heads/evaluate/report.py": "from heads.model.head import SERHead\n",  # sibling rooms on one layer
        "heads/train/trainer.py": "from heads.model.head import SERHead\n",  # fine: downwards
    })
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert upward_imports() == [
        "heads/evaluate/report.py:1 imports heads.model.head (heads: heads.evaluate and heads.model are rooms on one layer)",
        "heads/model/head.py:1 imports heads.train.trainer (heads: heads.model stands below heads.train)",
    ]


def test_the_check_sees_circles_and_names(tmp_path, monkeypatch):
    fake_heads(tmp_path, {
        "heads/train/a.py": "def f():\n    from heads.train import b\n",
        "heads/train/b.py": "from heads.train.a import f\nNAME = 'metrics.json'\n",
        "heads/runfolder.py": "METRICS = 'metrics.json'\n",
    })
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert import_circles() == [["heads.train.a", "heads.train.b", "heads.train.a"]]
    assert run_folder_names_outside_the_owner() == ["heads/train/b.py:2 'metrics.json'"]
