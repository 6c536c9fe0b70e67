import csv
import inspect
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from core.frames import SSL_GRID
from core.records import CLASSES_4, CorpusError
from extract import synthetic
from extract.audio import load_audio
from extract.corpora import read_corpus
from extract.vad import vad_masks

SMALL = dict(n_sessions=2, utts_per_speaker=8)
HANGOVER = 0.2 * 16000  # WebRTC's hangover after speech, samples (see test_vad)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("syn")
    synthetic.generate(out, seed=0, **SMALL)
    return out


@pytest.fixture(scope="module")
def larger_dir(tmp_path_factory) -> Path:
    """Enough utterances per class for averages over emotions."""
    out = tmp_path_factory.mktemp("syn24")
    synthetic.generate(out, seed=0, n_sessions=2, utts_per_speaker=24)
    return out


def rows(root: Path, name: str = "manifest.csv") -> list[dict[str, str]]:
    with (root / name).open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def spans_by_utt(root: Path) -> dict[str, list[tuple[int, int]]]:
    out: dict[str, list[tuple[int, int]]] = {}
    for r in rows(root, synthetic.SEGMENTS_FILE):
        out.setdefault(r["utt_id"], []).append((round(float(r["start"]) * 16000), round(float(r["end"]) * 16000)))
    return out


def all_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_audio(corpus_dir, tmp_path):
    synthetic.generate(tmp_path / "again", seed=0, **SMALL)
    synthetic.generate(tmp_path / "other", seed=1, **SMALL)
    first, again, other = all_bytes(corpus_dir), all_bytes(tmp_path / "again"), all_bytes(tmp_path / "other")
    assert first == again
    wavs = [k for k in first if k.endswith(".wav")]
    assert len(wavs) == 32 and set(wavs) == {k for k in other if k.endswith(".wav")}
    assert all(first[k] != other[k] for k in wavs)
    assert first["manifest.csv"] != other["manifest.csv"]


def test_manifest_layout_and_balanced_counts(corpus_dir):
    table = rows(corpus_dir)
    assert list(table[0]) == ["path", "speaker", "emotion", "valence", "arousal", "session", "utt_id"]
    assert len({r["utt_id"] for r in table}) == len(table) == 32
    speakers = sorted({r["speaker"] for r in table})
    assert speakers == ["S01F", "S01M", "S02F", "S02M"]
    for spk in speakers:
        mine = [r for r in table if r["speaker"] == spk]
        assert len(mine) == 8
        assert sorted(r["emotion"] for r in mine) == sorted(CLASSES_4 * 2)
    # Session pairs: one F and one M speaker per session.
    sessions: dict[str, set[str]] = {}
    for r in table:
        sessions.setdefault(r["session"], set()).add(r["speaker"])
    assert sessions == {"S01": {"S01F", "S01M"}, "S02": {"S02F", "S02M"}}
    for r in table:
        assert not Path(r["path"]).is_absolute() and (corpus_dir / r["path"]).is_file()


def test_remainders_spread_over_classes(tmp_path):
    synthetic.generate(tmp_path, seed=3, n_sessions=2, utts_per_speaker=5)
    table = rows(tmp_path)
    per_class = {c: sum(r["emotion"] == c for r in table) for c in CLASSES_4}
    assert per_class == {c: 5 for c in CLASSES_4}  # 4 speakers x 5: each speaker's extra is another class


def test_speakers_have_distinct_base_pitch():
    speakers = synthetic.make_speakers(seed=0, n_sessions=5)
    pitches = [s.f0_hz for s in speakers]
    assert len(set(pitches)) == 10
    assert min(s.f0_hz for s in speakers if s.speaker.endswith("F")) > max(
        s.f0_hz for s in speakers if s.speaker.endswith("M"))


def test_audio_is_16k_mono_pcm16_with_labels_in_range(corpus_dir):
    for r in rows(corpus_dir):
        info = sf.info(str(corpus_dir / r["path"]))
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        assert 1.0 <= info.duration <= 6.0
        assert 1.0 <= float(r["valence"]) <= 5.0 and 1.0 <= float(r["arousal"]) <= 5.0


def test_labels_follow_the_classes(larger_dir):
    table = rows(larger_dir)

    def mean(col: str, emotion: str) -> float:
        return float(np.mean([float(r[col]) for r in table if r["emotion"] == emotion]))

    assert mean("arousal", "angry") > mean("arousal", "happy") > mean("arousal", "neutral") > mean("arousal", "sad")
    assert mean("valence", "happy") > mean("valence", "neutral") > max(mean("valence", "angry"), mean("valence", "sad"))


def test_emotion_shapes_the_spoken_parts(larger_dir):
    # Angry speech is louder and brighter than sad speech, on average over utterances.
    spans = spans_by_utt(larger_dir)
    stats: dict[str, list[tuple[float, float]]] = {"angry": [], "sad": []}
    for r in rows(larger_dir):
        if r["emotion"] not in stats:
            continue
        x = load_audio(larger_dir / r["path"]).samples
        speech = np.concatenate([x[a:b] for a, b in spans[r["utt_id"]]])
        spectrum = np.abs(np.fft.rfft(speech)) ** 2
        freqs = np.fft.rfftfreq(len(speech), 1 / 16000)
        stats[r["emotion"]].append((np.sqrt(np.mean(speech**2)), float((spectrum * freqs).sum() / spectrum.sum())))
    angry, sad = np.mean(stats["angry"], axis=0), np.mean(stats["sad"], axis=0)
    assert angry[0] > 2 * sad[0]  # level
    assert angry[1] > 1.5 * sad[1]  # spectral centroid


def test_vad_finds_the_spoken_parts_and_not_the_gaps(corpus_dir):
    spans = spans_by_utt(corpus_dir)
    speech_frames, spoken_frames, speech_fraction = 0, 0, []
    for r in rows(corpus_dir):
        x = load_audio(corpus_dir / r["path"]).samples
        mode3 = vad_masks(x, SSL_GRID)[3]  # (T,)
        centers = SSL_GRID.centers(len(x))
        utt_spans = spans[r["utt_id"]]
        assert 1 <= len(utt_spans) <= 2
        spoken = np.zeros(len(centers), dtype=bool)
        near = np.zeros(len(centers), dtype=bool)
        for a, b in utt_spans:
            spoken |= (centers >= a) & (centers < b)
            near |= (centers >= a - 1600) & (centers < b + HANGOVER)
        speech_frames += int(mode3[spoken].sum())
        spoken_frames += int(spoken.sum())
        assert mode3[spoken].mean() >= 0.8, r["utt_id"]
        # Label-free background, away from speech onsets and WebRTC's hangover, is never speech.
        assert not mode3[~near].any(), r["utt_id"]
        speech_fraction.append(spoken.mean())
    assert speech_frames / spoken_frames >= 0.9
    # Silence dilutes a global average, by a different amount in every utterance.
    assert 0.3 <= np.mean(speech_fraction) <= 0.75
    assert np.std(speech_fraction) > 0.05


def test_read_generates_once_then_reuses(tmp_path):
    root = tmp_path / "syn"
    corpus = synthetic.read(root, classes=CLASSES_4, strict=True, **SMALL)
    assert corpus.name == "synthetic" and len(corpus.utterances) == 32 and not corpus.skipped
    assert corpus.class_counts() == {c: 8 for c in CLASSES_4}
    assert {u.session for u in corpus.utterances} == {"S01", "S02"}
    assert all(u.dataset == "synthetic" and Path(u.path).is_file() for u in corpus.utterances)
    stamp = (root / "manifest.csv").stat().st_mtime_ns
    again = read_corpus("synthetic", root, classes=CLASSES_4, **SMALL)
    assert (root / "manifest.csv").stat().st_mtime_ns == stamp
    assert [u.utt_id for u in again.utterances] == [u.utt_id for u in corpus.utterances]
    # A class subset reads the same folder; the rest is skipped as not selected.
    two = synthetic.read(root, classes=("angry", "sad"), strict=False, **SMALL)
    assert len(two.utterances) == 16


def test_read_refuses_a_folder_made_with_other_options(tmp_path):
    synthetic.generate(tmp_path, seed=0, **SMALL)
    with pytest.raises(CorpusError, match="seed"):
        synthetic.read(tmp_path, classes=CLASSES_4, strict=False, seed=1, **SMALL)
    with pytest.raises(CorpusError, match="utts_per_speaker"):
        synthetic.read(tmp_path, classes=CLASSES_4, strict=False, n_sessions=2, utts_per_speaker=9)
    with pytest.raises(CorpusError, match="unknown synthetic option"):
        synthetic.read(tmp_path, classes=CLASSES_4, strict=False, n_speakers=4)
    with pytest.raises(CorpusError, match="is a file"):
        synthetic.read(tmp_path / "manifest.csv", classes=CLASSES_4, strict=False)


def test_defaults_are_generates_defaults():
    params = inspect.signature(synthetic.generate).parameters
    assert {k: params[k].default for k in synthetic.DEFAULTS} == synthetic.DEFAULTS
    assert params["seed"].default == 0


@pytest.mark.parametrize("options", [dict(n_sessions=0), dict(utts_per_speaker=0), dict(seed=-1),
                                     dict(speech_seconds=(2.0, 1.0)), dict(silence_seconds=(0.0, 1.0))])
def test_bad_options_are_user_errors(tmp_path, options):
    with pytest.raises(CorpusError):
        synthetic.generate(tmp_path, **options)
