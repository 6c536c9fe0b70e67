"""`cli extract --append` (issue 29): the rows of another manifest go into a finished cache made with
the same model and settings, exactly once, kill-safe like a resume, equal to a single run over the
whole corpus; the cache records every corpus it was built from; an id already there as another
utterance is refused; a head run trained before the append sees a different cache."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import soundfile as sf

import cache.writer
from cache.contents import cache_files, read_contents
from cli_runner import cli
from fs_fixtures import one_line_error
from kill_points import tree
from tests.test_cache_files import snapshot

SR = 16000
EMOTIONS = ("angry", "happy", "neutral", "sad")
A, B = range(0, 6), range(4, 14)  # B repeats two rows of A (same files, same labels)


def rows(folder: Path, ids) -> list[dict[str, str]]:
    out = []
    for i in ids:
        wav = folder / "wav" / f"u{i:03d}.wav"
        if not wav.exists():
            rng = np.random.default_rng(i)
            wav.parent.mkdir(parents=True, exist_ok=True)
            sf.write(wav, (0.1 * rng.standard_normal(int(SR * (0.3 + 0.05 * i)))).astype(np.float32), SR,
                     subtype="PCM_16")
        out.append({"path": f"wav/u{i:03d}.wav", "speaker": f"spk{i % 3}", "emotion": EMOTIONS[i % 4],
                    "valence": str(1 + i % 5), "arousal": str(1 + (2 * i) % 5), "utt_id": f"u{i:03d}"})
    return out


def write_csv(path: Path, table: list[dict[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("emo")
    return {name: write_csv(folder / f"{name}.csv", rows(folder, ids))
            for name, ids in (("A", A), ("B", B), ("full", range(0, 14)))}


def extract(csv_path: Path, out: Path, model: str, *extra) -> tuple[int, str]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cache.writer, "PART_UTTERANCES", 4)  # several parts: an index over a data folder
        return cli("extract", "--dataset", "manifest", "--root", csv_path, "--model", model, "--out", out,
                   "--workers", "0", "--quiet", "--json", *extra)


def identity(csv_path: Path) -> str:
    return f"{csv_path.parent.name}/{csv_path.name}"


def without_corpus(snap: dict) -> dict:
    return {**snap, "fingerprint": {k: v for k, v in snap["fingerprint"].items() if k != "corpus"}}


def test_append_adds_the_new_rows_equal_to_a_single_run_and_records_both_corpora(corpus, tiny_dir, tmp_path):
    model = str(tiny_dir)
    full = tmp_path / "full.h5"
    assert extract(corpus["full"], full, model)[0] == 0
    cache_ = tmp_path / "F.h5"
    code, out = extract(corpus["A"], cache_, model)
    assert code == 0, out
    before = tree(tmp_path / "F.data") | {"F.h5": cache_.read_bytes()}
    a_run = snapshot(cache_)

    code, out = extract(corpus["B"], cache_, model)  # without --append: refused, naming both, nothing written
    line = " ".join(one_line_error(out).split())
    assert code == 2 and f"(corpus: {identity(corpus['A'])!r} (cache) vs {identity(corpus['B'])!r} (now))" in line
    assert "rerun with --append" in line and "delete" not in line.lower()
    assert tree(tmp_path / "F.data") | {"F.h5": cache_.read_bytes()} == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("F.")) == ["F.data", "F.h5"]

    code, out = extract(corpus["B"], cache_, model, "--append")
    assert code == 0, out
    summary = json.loads(out)
    assert summary["written"] == len(set(B) - set(A)) and summary["corpus_in_cache_before"] == len(set(A) & set(B))
    assert summary["corpora"] == [identity(corpus["A"]), identity(corpus["B"])]
    assert summary["cache_utterances"] == 14
    appended = snapshot(cache_)
    assert without_corpus(appended) == without_corpus(snapshot(full))  # bit-equal features, masks, rows, skips
    assert appended["fingerprint"]["corpus"] == [identity(corpus["A"]), identity(corpus["B"])]
    assert all(appended["features"][u] == a_run["features"][u] for u in a_run["features"])  # kept as they were
    with h5py.File(cache_, "r") as f:  # plain h5py sees the list too
        assert json.loads(f.attrs["fingerprint"])["corpus"] == summary["corpora"]
        assert len(set(f["meta/utt_id"].asstr()[()])) == f["meta/utt_id"].shape[0] == 14

    # reruns of either command find everything done and change nothing
    for csv_path, extra in ((corpus["B"], ("--append",)), (corpus["B"], ()), (corpus["A"], ())):
        code, out = extract(csv_path, cache_, model, *extra)
        assert code == 0 and json.loads(out)["planned"] == 0 and json.loads(out)["written"] == 0, out
    assert snapshot(cache_) == appended
    code, out = cli("info", cache_, "--json")
    assert code == 0 and json.loads(out)["corpora"] == summary["corpora"]
    # other settings stay refused, --append or not
    code, out = extract(corpus["B"], cache_, model, "--append", "--max-seconds", "0.2")
    assert code == 2 and "different settings (max_seconds" in one_line_error(out)


def test_a_head_run_trained_before_an_append_sees_another_cache(corpus, tmp_path):
    from cache.reader import FeatureCache
    from core.errors import UserError
    from heads.runfolder import prepare_run_dir, run_config
    from heads.config import TrainConfig

    cache_ = tmp_path / "F.h5"
    assert extract(corpus["A"], cache_, "fbank")[0] == 0
    with FeatureCache(cache_) as c:
        before = run_config(TrainConfig(), c, [0])
    prepare_run_dir(tmp_path / "run", before)
    assert extract(corpus["B"], cache_, "fbank", "--append")[0] == 0
    with FeatureCache(cache_) as c:
        after = run_config(TrainConfig(), c, [0])
    assert after["cache_content"] != before["cache_content"] and after["fingerprint"] != before["fingerprint"]
    with pytest.raises(UserError, match="already holds a run with other settings or another cache"):
        prepare_run_dir(tmp_path / "run", after)


@pytest.mark.parametrize("change, words", [
    (lambda r, folder: r.update(path="wav/u012.wav"), "other audio ("),  # another file under u001's id
    (lambda r, folder: r.update(emotion="sad"), "other labels (emotion 'happy' (cache) vs 'sad' (now))"),
])
def test_an_id_already_in_the_cache_as_another_utterance_is_refused_before_anything_is_written(
        corpus, tmp_path, change, words):
    cache_ = tmp_path / "F.h5"
    assert extract(corpus["A"], cache_, "fbank")[0] == 0
    before = tree(tmp_path)
    folder = corpus["A"].parent
    table = rows(folder, [1, 20])
    change(table[0], folder)
    code, out = extract(write_csv(folder / f"C-{tmp_path.name}.csv", table), cache_, "fbank", "--append")
    line = " ".join(one_line_error(out).split())
    assert code == 2 and f"1 utterance(s) of this corpus are already in {cache_} as different utterances " \
                         f"(e.g. 'u001': {words}" in line, line
    assert tree(tmp_path) == before  # not even a parts folder


def test_the_same_audio_under_another_path_counts_as_the_row_already_there(corpus, tmp_path):
    cache_ = tmp_path / "F.h5"
    assert extract(corpus["A"], cache_, "fbank")[0] == 0
    moved = tmp_path / "copy"
    shutil.copytree(corpus["A"].parent / "wav", moved / "wav")
    rows(moved, [30])  # a new utterance beside the copied ones
    code, out = extract(write_csv(moved / "C.csv", rows(moved, [1, 2, 30])), cache_, "fbank", "--append")
    assert code == 0, out
    assert json.loads(out)["written"] == 1 and json.loads(out)["corpus_in_cache_before"] == 2


@pytest.mark.parametrize("base_part", [64, 3], ids=["onto-one-file", "onto-an-index"])
def test_an_append_killed_at_every_step_reruns_to_each_utterance_once_equal_to_a_single_run(corpus, tmp_path,
                                                                                           base_part):
    from cache.reader import FeatureCache
    from extract.backends import load_backend
    from extract.config import ExtractConfig
    from extract.corpora import read_corpus
    from extract.pipeline import extract_corpus
    from kill_points import KillAt, Killed

    fbank = load_backend("fbank", layers=None, device="cpu", dtype="float32")
    a, b, full = (read_corpus("manifest", corpus[k]) for k in ("A", "B", "full"))
    config = ExtractConfig(max_seconds=0.0, workers=0)
    mp = pytest.MonkeyPatch()
    try:
        extract_corpus(full, tmp_path / "full.h5", fbank, config, progress=False)
        reference = without_corpus(snapshot(tmp_path / "full.h5"))
        base = tmp_path / "base" / "F.h5"
        mp.setattr(cache.writer, "PART_UTTERANCES", base_part)
        extract_corpus(a, base, fbank, config, progress=False)
        assert len(cache_files(base)) == (1 if base_part > len(A) else 3)
        mp.setattr(cache.writer, "PART_UTTERANCES", 3)  # the appended rows in several parts
        append = ExtractConfig(max_seconds=0.0, workers=0, append=True)

        def fresh(name: str) -> Path:
            shutil.copytree(base.parent, tmp_path / name)
            return tmp_path / name / "F.h5"

        counted = fresh("count")
        with pytest.MonkeyPatch.context() as kill:
            counter = KillAt(None).install(kill)
            extract_corpus(b, counted, fbank, append, progress=False)
        assert counter.calls >= 15, counter.log  # part writes, moves into F.data/, the index, the lock
        for n in range(counter.calls):
            out = fresh(f"k{n:02d}")
            with pytest.MonkeyPatch.context() as kill:
                KillAt(n).install(kill)
                with pytest.raises(Killed):
                    extract_corpus(b, out, fbank, append, progress=False)
            extract_corpus(b, out, fbank, append, progress=False)  # the same command again
            assert without_corpus(snapshot(out)) == reference, n
            assert FeatureCache(out).fingerprint["corpus"] == [identity(corpus["A"]), identity(corpus["B"])], n
            held = [u for p in cache_files(out)[1:] for u in read_contents(p).utt_ids]
            assert sorted(held) == sorted(set(held)) == sorted(FeatureCache(out).meta.index), n  # each once
            assert sorted(p.name for p in out.parent.iterdir()) == ["F.data", "F.h5"], n  # no lock, parts, tmp
    finally:
        mp.undo()
