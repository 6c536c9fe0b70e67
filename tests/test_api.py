"""`import sapser`: the documented API, and the README's example run on a small demo's output."""

import inspect
import re
from pathlib import Path

from typer.testing import CliRunner

import sapser
from cli import app

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    """The first python block of the README's "Python API" section."""
    text = README.read_text()
    section = text[text.index("## Python API"):]
    section = section[: section.index("\n## ", 1)]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)[:1]
    return code


def test_sapser_exports_the_documented_api():
    for name in sapser.__all__:
        assert hasattr(sapser, name), name
    for fn in (sapser.extract, sapser.train_folds, sapser.ablate, sapser.summarize_run, sapser.load_predictor,
               sapser.run_finetune, sapser.read_corpus, sapser.plan_folds):
        sig = inspect.signature(fn)
        assert sig.return_annotation is not inspect.Signature.empty, fn  # typed
    # the CLI is a wrapper over the same objects
    import cli

    source = inspect.getsource(cli)
    for used in ("run_extract(", "train_folds(", "load_predictor(", "run_ablation("):
        assert used in source


def test_the_readme_example_runs_on_the_demo_output(tmp_path, monkeypatch, capsys):
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "demo-out"), "--sessions", "2",
                                      "--utts-per-speaker", "8", "--epochs", "2", "--backends", "fbank",
                                      "--jobs", "1"])
    assert result.exit_code == 0, result.output
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_example(), "README.md (Python API example)", "exec"), {"__name__": "__main__"})
    out = capsys.readouterr().out
    assert re.search(r"UA \d+\.\d% over 4 folds", out)
    assert "from the array:" in out and "seen in training by folds [2, 3, 4]" in out
    assert "32 utterances, 1 layer(s) of 80" in out
    assert (tmp_path / "demo-out" / "runs" / "api-sr" / "fold-01" / "metrics.json").is_file()
