"""Paths and corpora that are not what a command expects: each is one line (or a clean result)."""

from __future__ import annotations

import json
import os

from cli_runner import cli
from fs_fixtures import one_line_error
from head_fixtures import make_cache
from tests.test_bad_rows import good_rows, write_manifest


def extract(csv_path, out):
    return cli("extract", "--dataset", "manifest", "--root", csv_path, "--model", "fbank", "--out", out,
               "--workers", "0", "--quiet", "--json")


def test_train_head_out_is_an_existing_file(tmp_path):
    cache = make_cache(tmp_path / "c.h5", per_class=1)
    (tmp_path / "file").write_text("x")
    code, out = cli("train-head", "--cache", cache, "--fold", "1", "--epochs", "1", "--out", tmp_path / "file", "--quiet")
    assert code == 2 and "file" in one_line_error(out), out


def test_extract_out_is_a_folder(tmp_path):
    csv_path = write_manifest(tmp_path / "corpus", good_rows(tmp_path / "corpus", 4))
    (tmp_path / "F.h5").mkdir()
    code, out = extract(csv_path, tmp_path / "F.h5")
    assert code == 2, out
    one_line_error(out)


def test_a_manifest_of_random_bytes(tmp_path):
    csv_path = tmp_path / "manifest.csv"
    csv_path.write_bytes(os.urandom(20_000))
    code, out = cli("manifest", "--dataset", "manifest", "--root", csv_path)
    assert code == 2, out
    one_line_error(out)


def test_a_manifest_with_only_a_header_extracts_an_empty_cache_that_train_head_refuses(tmp_path):
    csv_path = write_manifest(tmp_path / "corpus", [])
    code, out = extract(csv_path, tmp_path / "F.h5")
    assert code == 0, out
    assert json.loads(out)["cache_utterances"] == 0
    code, out = cli("info", tmp_path / "F.h5")
    assert code == 0, out
    code, out = cli("train-head", "--cache", tmp_path / "F.h5", "--fold", "1", "--quiet")
    assert code == 2 and "holds no utterances" in one_line_error(out), out


def test_a_manifest_whose_audio_root_is_a_symlink_loop(tmp_path):
    folder = tmp_path / "corpus"
    rows = good_rows(folder, 4)
    (folder / "loop").symlink_to(folder / "loop")
    rows[0][0] = "loop/u000.wav"
    code, out = cli("manifest", "--dataset", "manifest", "--root", write_manifest(folder, rows), "--json")
    assert code == 0, out
    assert json.loads(out)["skipped"] == {"missing_audio": 1}
