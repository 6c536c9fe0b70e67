"""bench/mutate.py's table still fits the code (issue 12): no mutant silently stops being planted.

Each entry's original text must occur exactly once in its file, the mutated file must
still compile (a planted bug, not a syntax error), and the tests it names must exist.
Nothing here runs pytest inside pytest; `python bench/mutate.py` does the measuring.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Loaded by path: putting bench/ on sys.path would let bench/extract.py shadow the extract package.
_spec = importlib.util.spec_from_file_location("mutate", ROOT / "bench" / "mutate.py")
mutate = importlib.util.module_from_spec(_spec)
sys.modules["mutate"] = mutate  # dataclasses look their module up while the class is built
_spec.loader.exec_module(mutate)

MUTATIONS = mutate.MUTATIONS


@pytest.mark.parametrize("m", MUTATIONS, ids=[m.name for m in MUTATIONS])
def test_each_mutation_applies_exactly_once_and_still_compiles(m):
    assert mutate.problem(m) is None
    source = mutate.mutated(m, (ROOT / m.file).read_text())
    assert source != (ROOT / m.file).read_text()
    compile(source, m.file, "exec")


@pytest.mark.parametrize("m", MUTATIONS, ids=[m.name for m in MUTATIONS])
def test_each_mutation_names_tests_that_exist(m):
    assert m.tests
    for test in m.tests:
        file, _, node = test.partition("::")
        assert (ROOT / file).is_file(), test
        if node:
            name = re.sub(r"\[.*\]$", "", node)
            assert re.search(rf"^def {re.escape(name)}\(", (ROOT / file).read_text(), re.MULTILINE), test


def test_the_table_holds_the_four_known_bugs_and_at_least_sixteen_new_ones():
    names = [m.name for m in MUTATIONS]
    assert len(names) == len(set(names))
    assert sum(m.known for m in MUTATIONS) == 4
    assert sum(not m.known for m in MUTATIONS) >= 16
    assert not [m.name for m in MUTATIONS if not m.known and m.file in mutate.LEAD_OWNED]


def test_issue_27s_three_classes_each_hold_at_least_four_mutants():
    kinds = [m.kind for m in MUTATIONS if m.kind]
    assert set(kinds) == set(mutate.KINDS) and all(kinds.count(k) >= 4 for k in mutate.KINDS)
    assert not [m.name for m in MUTATIONS if m.kind and m.known]


def test_the_report_counts_each_class_and_an_appended_section_is_dated():
    rows = [(m, mutate.Outcome("killed" if i % 3 else "survived", 1.0)) for i, m in enumerate(MUTATIONS) if m.kind]
    text = mutate.report(rows, mutate.Outcome("passed", 2.0), 60.0, "python bench/mutate.py --kind split", section=True)
    first = text.splitlines()[0]
    assert first.startswith("## 20") and "issue 27: split, align, option" in first
    for kind in mutate.KINDS:
        assert f"{kind} ({mutate.KINDS[kind]}) {mutate.kill_rate(rows, kind=kind)}" in text
    assert "- Command: `python bench/mutate.py --kind split`" in text and "- Commit: " in text


def test_a_text_that_is_not_exactly_once_in_its_file_is_refused_in_one_line(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\nx = 1\n")
    twice = mutate.Mutation("twice", "a.py", "x = 1", "x = 2", "d", ("tests/t.py",))
    absent = mutate.Mutation("absent", "a.py", "y = 1", "y = 2", "d", ("tests/t.py",))
    assert mutate.problem(twice, tmp_path) == "twice: the original text occurs 2 times in a.py, not exactly once"
    assert mutate.problem(absent, tmp_path) == "absent: the original text occurs 0 times in a.py, not exactly once"
    assert mutate.problem(mutate.Mutation("gone", "b.py", "x", "y", "d", ()), tmp_path) == "gone: b.py does not exist"
