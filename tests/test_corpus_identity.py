"""One cache, one corpus: the fingerprint names the corpus, default file names differ per corpus,
and a second corpus into the same file is refused, while a moved corpus still resumes."""

from __future__ import annotations

import json
import shutil

from typer.testing import CliRunner

from cache.format import fingerprint_diff
from cli import app
from extract.corpora import corpus_identity, corpus_slug, read_corpus
from fs_fixtures import one_line_error
from tests.test_bad_rows import good_rows, write_manifest

runner = CliRunner()


def extract(csv_path, *extra):
    result = runner.invoke(app, ["extract", "--dataset", "manifest", "--root", str(csv_path), "--model", "fbank",
                                 "--workers", "0", "--quiet", "--json", *map(str, extra)])
    return result.exit_code, result.output


def corpus_in(folder, n=6):
    return write_manifest(folder, good_rows(folder, n))


def test_two_manifest_corpora_get_their_own_default_caches(tmp_path, monkeypatch):
    a, b = corpus_in(tmp_path / "crema"), corpus_in(tmp_path / "ravdess")
    monkeypatch.chdir(tmp_path)
    outs = []
    for csv_path in (a, b):
        code, out = extract(csv_path)
        assert code == 0, out
        outs.append(json.loads(out)["out"])
    assert outs == ["features/crema-fbank.h5", "features/ravdess-fbank.h5"]


def test_a_second_corpus_into_the_same_cache_is_refused_naming_both(tmp_path):
    a, b = corpus_in(tmp_path / "crema"), corpus_in(tmp_path / "ravdess")
    cache = tmp_path / "F.h5"
    assert extract(a, "--out", cache)[0] == 0
    code, out = extract(b, "--out", cache)
    assert code == 2
    line = " ".join(one_line_error(out).split())
    assert "corpus: 'crema/manifest.csv' (cache) vs 'ravdess/manifest.csv' (now)" in line
    # the utterance ids are the same in both corpora: nothing of b was let in
    info = json.loads(runner.invoke(app, ["info", str(cache), "--json"]).stdout)
    assert info["fingerprint"]["corpus"] == "crema/manifest.csv" and info["utterances"] == 6


def test_the_same_corpus_moved_elsewhere_still_resumes(tmp_path):
    a = corpus_in(tmp_path / "disk1" / "crema")
    cache = tmp_path / "F.h5"
    assert extract(a, "--out", cache)[0] == 0
    shutil.copytree(tmp_path / "disk1" / "crema", tmp_path / "disk2" / "crema")
    code, out = extract(tmp_path / "disk2" / "crema" / "manifest.csv", "--out", cache)
    assert code == 0, out
    assert json.loads(out)["planned"] == 0 and json.loads(out)["resumed_from"] == 6


def test_identity_and_slug_of_each_kind_of_corpus(tmp_path):
    csv_path = corpus_in(tmp_path / "emo db")
    corpus = read_corpus("manifest", csv_path)
    assert corpus_identity(corpus) == "emo db/manifest.csv" and corpus_slug(corpus) == "emo-db"
    train = tmp_path / "emo db" / "train.csv"
    shutil.copy(csv_path, train)
    assert corpus_slug(read_corpus("manifest", train)) == "emo-db-train"
    syn = read_corpus("synthetic", tmp_path / "syn", classes=("angry", "happy", "neutral", "sad"))
    assert corpus_identity(syn) == "syn/manifest.csv" and corpus_slug(syn) == "synthetic-syn"


def test_caches_from_before_the_corpus_key_resume_for_named_corpora_only():
    old = {"dataset": "iemocap", "model": "m"}
    assert fingerprint_diff({**old, "corpus": "iemocap"}, old) == []
    old_manifest = {"dataset": "manifest", "model": "m"}
    assert fingerprint_diff({**old_manifest, "corpus": "a/manifest.csv"}, old_manifest) == ["corpus"]
