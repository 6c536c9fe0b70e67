"""Read-only, permission-denied and full output folders: one `error:` line and exit code 2 from every
command, never a traceback, and no finished work lost (a rerun with space completes the run)."""

from __future__ import annotations

import json
import os

import pytest

from cli_runner import cli
from fs_fixtures import READ_ONLY_WORDS, grow_disk, one_line_error, read_only, small_disk
from head_fixtures import make_cache
from run_fixtures import write_run
from tests.corpus_fixtures import build_manifest


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return make_cache(tmp_path_factory.mktemp("cache") / "synth.h5", per_class=2)


@pytest.fixture(scope="module")
def manifest_csv(tmp_path_factory):
    return build_manifest(tmp_path_factory.mktemp("corpus"))


def refused(code: int, out: str) -> str:
    assert code == 2, out
    line = one_line_error(out)
    assert any(w in line for w in READ_ONLY_WORDS), line
    return line


@pytest.mark.parametrize("target", ["F.h5", "sub/F.h5"])
def test_extract_into_a_read_only_folder(tmp_path, manifest_csv, target):
    ro = tmp_path / "ro"
    ro.mkdir()
    with read_only(ro):
        refused(*cli("extract", "--dataset", "manifest", "--root", manifest_csv, "--model", "fbank",
                     "--out", ro / target, "--workers", "0", "--quiet"))


@pytest.mark.parametrize("extra", [["--fold", "1"], ["--all-folds", "--jobs", "2"]])
def test_train_head_into_a_read_only_folder(tmp_path, cache, extra):
    ro = tmp_path / "ro"
    ro.mkdir()
    with read_only(ro):
        refused(*cli("train-head", "--cache", cache, *extra, "--epochs", "1", "--out", ro / "run", "--quiet"))


def test_train_head_into_an_existing_run_folder_made_read_only(tmp_path, cache):
    run = tmp_path / "run"
    code, out = cli("train-head", "--cache", cache, "--fold", "1", "--epochs", "1", "--out", run, "--quiet")
    assert code == 0, out
    with read_only(run):
        refused(*cli("train-head", "--cache", cache, "--fold", "2", "--epochs", "1", "--out", run, "--quiet"))


def test_manifest_out_into_a_read_only_folder(tmp_path, manifest_csv):
    ro = tmp_path / "ro"
    ro.mkdir()
    with read_only(ro):
        refused(*cli("manifest", "--dataset", "manifest", "--root", manifest_csv, "--out", ro / "m.csv"))


def test_report_of_a_read_only_run_folder(tmp_path):
    run = write_run(tmp_path / "run")
    with read_only(run):
        refused(*cli("report", run))  # the plots cannot be written
        code, out = cli("report", run, "--no-plots")
        assert code == 0, out


def test_demo_into_a_read_only_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    with read_only(ro):
        refused(*cli("demo", "--out", ro / "demo", "--sessions", "2", "--utts-per-speaker", "4", "--epochs", "1",
                     "--backends", "fbank"))


def test_a_disk_that_fills_while_fold_outputs_are_written_then_a_rerun_completes(tmp_path, cache):
    with small_disk(tmp_path / "disk", "4m") as disk:
        run = disk / "run"
        code, out = cli("train-head", "--cache", cache, "--fold", "1", "--epochs", "1", "--out", run, "--quiet")
        assert code == 0, out
        # Fill the disk but for a few KB: config.json is rewritten, fold 2's outputs do not fit.
        filler = disk / "filler"
        stat = os.statvfs(disk)
        filler.write_bytes(b"\0" * (stat.f_bavail * stat.f_frsize - 8192))
        code, out = cli("train-head", "--cache", cache, "--all-folds", "--epochs", "1", "--out", run, "--quiet")
        assert code == 2, out
        assert "No space left on device" in one_line_error(out)
        assert not (run / "fold-02" / "metrics.json").exists()  # a cut-short fold never looks finished
        assert not list(run.rglob("*.tmp"))
        filler.unlink()
        code, out = cli("train-head", "--cache", cache, "--all-folds", "--epochs", "1", "--out", run, "--quiet")
        assert code == 0, out
        assert sorted(p.parent.name for p in run.glob("fold-*/metrics.json")) == [f"fold-{k:02d}" for k in range(1, 7)]
        assert out.count("(kept: trained before with these settings)") == 1
        assert "kept 1 finished fold(s)" in out and "training fold(s) 2, 3, 4, 5, 6" in out


def test_extract_onto_a_full_disk_then_a_rerun_completes(tmp_path, manifest_csv):
    with small_disk(tmp_path / "disk", "16k") as disk:
        args = ["extract", "--dataset", "manifest", "--root", manifest_csv, "--model", "fbank", "--out",
                disk / "F.h5", "--workers", "0", "--quiet", "--json"]
        code, out = cli(*args)
        assert code == 2, out
        assert "space" in one_line_error(out)
        grow_disk(disk, "8m")
        code, out = cli(*args)
        assert code == 0, out
        assert json.loads(out)["cache_utterances"] == 5


def test_a_cache_path_that_is_a_folder_or_a_symlink_loop(tmp_path):
    (tmp_path / "dir.h5").mkdir()
    loop = tmp_path / "loop.h5"
    loop.symlink_to(loop)
    for path in (tmp_path / "dir.h5", loop):
        for command in (["info", path], ["train-head", "--cache", path, "--fold", "1", "--quiet"]):
            code, out = cli(*command)
            assert code == 2, out
            one_line_error(out)
