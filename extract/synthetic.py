"""The `synthetic` corpus: small, deterministic, emotion-bearing audio for the demo and tests.

Speakers come in session pairs (one F, one M per session, like IEMOCAP and
KEMDy19) so leave-one-speaker-out folds work unchanged. Each utterance is
label-free background (low-level noise, -72 to -64 dBFS: quiet enough that
WebRTC mode 3 never calls it speech) with one or two
"spoken" chunks in it; silence of random length before, between and after the
chunks dilutes a global average over all frames, which is what SAP is for.

A spoken chunk is a source-filter vowel stream: a Rosenberg glottal pulse train
(plus aspiration noise) on an F0 contour, shaped by three formant resonators per
syllable, under a syllable-rate amplitude envelope with occasional fricative
onsets. The emotion sets the prosody and voice quality (`PROSODY`): pitch level
and range, speaking rate, energy, open quotient (tense vs breathy) and spectral
tilt. A per-utterance recording gain of +-7 dB and per-speaker expressivity keep
loudness alone from giving the class away. Valence and arousal (1-5) are the
class's typical values plus noise; the arousal deviation also moves pitch, rate
and energy, so the dimensional labels are learnable too.

Everything is drawn from `numpy.random.default_rng([seed, ...])` keyed by
speaker and utterance, so the same seed writes byte-identical files.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import soundfile as sf
from scipy.signal import lfilter

from core.frames import SAMPLE_RATE
from core.records import CLASSES_4, Corpus, CorpusError
from extract.audio import to_int16

SR = SAMPLE_RATE
GENERATOR_VERSION = 1  # bump when the same options would produce different audio
SETTINGS_FILE = "synthetic.json"
SEGMENTS_FILE = "segments.csv"  # ground-truth speech chunks: utt_id,start,end (seconds)


@dataclass(frozen=True)
class Prosody:
    """How one emotion sounds, and its typical valence/arousal on 1-5."""

    f0_factor: float  # pitch level relative to the speaker's neutral base
    f0_range_st: float  # spread of syllable pitch targets, semitones
    syllable_rate: float  # syllables per second
    level_db: float  # speech RMS in dBFS before the random recording gain
    open_quotient: float  # glottal open phase / period: low = tense/bright, high = breathy
    tilt: float  # one-pole low-pass coefficient on the source: higher = darker
    breath: float  # aspiration noise relative to the voiced source
    articulation: float  # strength of fricative onsets relative to the vowel
    valence: float
    arousal: float


PROSODY: dict[str, Prosody] = {
    "angry": Prosody(1.30, 5.0, 5.8, -16.0, 0.30, 0.05, 0.03, 1.0, 1.8, 4.3),
    "happy": Prosody(1.45, 10.0, 5.0, -18.0, 0.50, 0.40, 0.06, 0.6, 4.3, 3.8),
    "neutral": Prosody(1.00, 3.0, 4.2, -21.0, 0.60, 0.60, 0.10, 0.4, 3.0, 2.6),
    "sad": Prosody(0.82, 1.0, 3.0, -25.0, 0.85, 0.88, 0.35, 0.15, 1.8, 1.8),
}

# (F1, F2, F3) Hz of an adult male voice (Peterson & Barney averages); female voices scale up.
# F4 and F5 are fixed per voice: without them nothing above ~3 kHz is voiced and
# voice quality (tense vs breathy) could not show in the upper spectrum.
VOWELS: tuple[tuple[float, float, float], ...] = (
    (730, 1090, 2440),  # a
    (270, 2290, 3010),  # i
    (300, 870, 2240),  # u
    (530, 1840, 2480),  # e
    (570, 840, 2410),  # o
    (660, 1720, 2410),  # ae
)
HIGH_FORMANTS = (3500.0, 4500.0)
BANDWIDTHS = (90.0, 110.0, 170.0, 250.0, 300.0)


# generate()'s options besides the seed, with their defaults (read() checks against them).
DEFAULTS: dict[str, object] = {
    "n_sessions": 3, "utts_per_speaker": 24, "speech_seconds": (0.8, 1.8), "silence_seconds": (0.1, 1.0),
}


@dataclass(frozen=True)
class Speaker:
    speaker: str
    session: str
    f0_hz: float  # neutral base pitch
    formant_scale: float  # vocal-tract length: ~1.17 for female voices
    expressivity: float  # 0 = every emotion sounds neutral, 1 = full PROSODY contrast
    noise_dbfs: float  # the session's room noise floor


def generate(
    out_dir: str | Path,
    *,
    seed: int = 0,
    n_sessions: int = 3,
    utts_per_speaker: int = 24,
    speech_seconds: tuple[float, float] = (0.8, 1.8),
    silence_seconds: tuple[float, float] = (0.1, 1.0),
) -> Path:
    """Write the corpus (wav/<speaker>/<utt_id>.wav, manifest.csv, segments.csv) and return the manifest path.

    `speech_seconds` bounds the total spoken time per utterance, `silence_seconds`
    each stretch of background before, between and after the spoken chunks.
    """
    if n_sessions < 1 or utts_per_speaker < 1:
        raise CorpusError("the synthetic corpus needs at least one session and one utterance per speaker")
    if seed < 0:
        raise CorpusError(f"the synthetic corpus seed must be >= 0, got {seed}")
    for name, (lo, hi) in (("speech_seconds", speech_seconds), ("silence_seconds", silence_seconds)):
        if not 0 < lo <= hi <= 30:
            raise CorpusError(f"synthetic {name} must be a range 0 < low <= high <= 30 s, got {lo}-{hi}")
    out = Path(out_dir)
    settings = _settings(seed, n_sessions, utts_per_speaker, speech_seconds, silence_seconds)
    rows: list[dict[str, str]] = []
    segments: list[tuple[str, float, float]] = []
    for spk_index, spk in enumerate(make_speakers(seed, n_sessions)):
        (out / "wav" / spk.speaker).mkdir(parents=True, exist_ok=True)
        for k, emotion in enumerate(balanced_emotions(seed, spk_index, utts_per_speaker)):
            rng = np.random.default_rng([seed, spk_index, k])
            utt_id = f"{spk.speaker}_{k + 1:03d}"
            samples, spans, valence, arousal = utterance(
                rng, spk, emotion, speech_seconds=speech_seconds, silence_seconds=silence_seconds
            )
            rel = f"wav/{spk.speaker}/{utt_id}.wav"
            sf.write(str(out / rel), to_int16(samples), SR, subtype="PCM_16")
            rows.append({"path": rel, "speaker": spk.speaker, "emotion": emotion,
                         "valence": f"{valence:.2f}", "arousal": f"{arousal:.2f}",
                         "session": spk.session, "utt_id": utt_id})
            segments += [(utt_id, a / SR, b / SR) for a, b in spans]
    _write_csv(out / SEGMENTS_FILE, ["utt_id", "start", "end"],
               [{"utt_id": u, "start": f"{a:.4f}", "end": f"{b:.4f}"} for u, a, b in segments])
    (out / SETTINGS_FILE).write_text(json.dumps(settings, indent=1) + "\n", encoding="utf-8")
    # The manifest goes last and atomically: its presence means the corpus is complete.
    manifest = out / "manifest.csv"
    _write_csv(manifest.with_suffix(".csv.tmp"), list(rows[0]), rows)
    os.replace(manifest.with_suffix(".csv.tmp"), manifest)
    return manifest


def write_recording(path: str | Path, seconds: float, speech: Sequence[tuple[float, float]], *, seed: int = 0,
                    emotions: Sequence[str] = CLASSES_4) -> list[tuple[float, float, str]]:
    """A long recording for `cli predict --segments`: room noise with spoken chunks at `speech` [(start,
    end) seconds, sorted, disjoint], written piece by piece (never held whole), 16 kHz 16-bit.

    Chunk i speaks emotion `emotions[i % len]` in one synthetic voice. Returns (start, end, emotion) of
    each chunk as written (sample-exact, in seconds).
    """
    spk = make_speakers(seed, 1)[0]
    total = round(seconds * SR)
    bounds = [(round(a * SR), round(b * SR)) for a, b in speech]
    if any(not 0 <= a < b <= total for a, b in bounds) or any(b > c for (_, b), (c, _) in itertools.pairwise(bounds)):
        raise ValueError("speech spans must be sorted, disjoint and inside the recording")
    rng = np.random.default_rng([seed, 7_000_001])
    written = []
    with sf.SoundFile(str(path), "w", samplerate=SR, channels=1, subtype="PCM_16") as fh:
        pos = 0
        for i, (a, b) in enumerate([*bounds, (total, total)]):
            while pos < a:  # room noise, 10 s at a time
                n = min(a - pos, 10 * SR)
                fh.write(to_int16(_background(rng, n, spk.noise_dbfs)))
                pos += n
            if a == total:
                break
            emotion = emotions[i % len(emotions)]
            chunk = voiced_chunk(rng, spk, _expressed(PROSODY[emotion], spk.expressivity), (b - a) / SR, 0.0, 0.0)
            chunk = np.pad(chunk, (0, max(0, b - a - len(chunk))))[: b - a]  # syllable rounding: exactly b - a
            fh.write(to_int16(np.clip(chunk + _background(rng, b - a, spk.noise_dbfs), -0.99, 0.99)))
            written.append((a / SR, b / SR, emotion))
            pos = b
    return written


def read(root: Path, *, classes: tuple[str, ...], strict: bool, seed: int = 0, **gen_options) -> Corpus:
    """Read the synthetic corpus in folder `root`, generating it first if it has no manifest.csv.

    A folder generated with other options is refused rather than silently reused.
    """
    from extract import (
        csv_manifest as manifest_reader,  # another corpus module; imported on use
    )

    unknown = sorted(set(gen_options) - set(DEFAULTS))
    if unknown:
        raise CorpusError(f"unknown synthetic option(s) {', '.join(unknown)}; known: {', '.join(DEFAULTS)}")
    root = Path(root)
    manifest = root / "manifest.csv"
    if root.exists() and not root.is_dir():
        raise CorpusError(f"synthetic root {str(root)!r} is a file; give a folder")
    if manifest.exists():
        _check_settings(root, seed, gen_options)
    else:
        generate(root, seed=seed, **gen_options)
    return manifest_reader.read(manifest, classes=classes, strict=strict, name="synthetic")


def make_speakers(seed: int, n_sessions: int) -> list[Speaker]:
    """Two speakers (F, M) per session, every one with its own base pitch."""
    rng = np.random.default_rng([seed, 1_000_003])
    # Evenly spaced base pitches in shuffled order: distinct by construction.
    f_pitch = rng.permutation(np.linspace(180.0, 240.0, n_sessions))
    m_pitch = rng.permutation(np.linspace(95.0, 135.0, n_sessions))
    out = []
    for s in range(n_sessions):
        session = f"S{s + 1:02d}"
        noise = float(rng.uniform(-72.0, -64.0))
        for sex, f0, scale in (("F", f_pitch[s], 1.17), ("M", m_pitch[s], 1.0)):
            out.append(Speaker(
                speaker=f"{session}{sex}", session=session, f0_hz=float(f0),
                formant_scale=scale * float(rng.uniform(0.95, 1.05)),
                expressivity=float(rng.uniform(0.85, 1.0)), noise_dbfs=noise,
            ))
    return out


def balanced_emotions(seed: int, spk_index: int, n: int) -> list[str]:
    """n labels cycling through the four classes (counts differ by at most one), shuffled."""
    rng = np.random.default_rng([seed, spk_index, 2_000_003])
    start = spk_index % len(CLASSES_4)  # spread the remainder over classes across speakers
    labels = [CLASSES_4[(start + i) % len(CLASSES_4)] for i in range(n)]
    return [labels[i] for i in rng.permutation(n)]


def utterance(
    rng: np.random.Generator,
    spk: Speaker,
    emotion: str,
    *,
    speech_seconds: tuple[float, float],
    silence_seconds: tuple[float, float],
) -> tuple[np.ndarray, list[tuple[int, int]], float, float]:
    """(N,) float32 audio, the [start, stop) samples of each spoken chunk, valence, arousal."""
    p = _expressed(PROSODY[emotion], spk.expressivity)
    valence_latent = p.valence + rng.normal(0.0, 0.4)
    arousal_latent = p.arousal + rng.normal(0.0, 0.4)
    arousal_dev = arousal_latent - PROSODY[emotion].arousal
    n_chunks = 1 if rng.random() < 0.5 else 2
    total = rng.uniform(*speech_seconds)
    shares = rng.dirichlet(np.full(n_chunks, 4.0)) if n_chunks > 1 else np.ones(1)
    gain_db = rng.uniform(-7.0, 7.0)  # recording level: loudness is only a weak cue
    pieces: list[np.ndarray] = []
    spans: list[tuple[int, int]] = []
    pos = 0
    for i in range(n_chunks + 1):
        gap = np.zeros(round(rng.uniform(*silence_seconds) * SR), dtype=np.float64)
        pieces.append(gap)
        pos += len(gap)
        if i == n_chunks:
            break
        chunk = voiced_chunk(rng, spk, p, max(0.4, total * shares[i]), arousal_dev, gain_db)
        pieces.append(chunk)
        spans.append((pos, pos + len(chunk)))
        pos += len(chunk)
    audio = np.concatenate(pieces)  # (N,)
    audio += _background(rng, len(audio), spk.noise_dbfs)
    labels = (valence_latent + rng.normal(0.0, 0.15), arousal_latent + rng.normal(0.0, 0.15))
    valence, arousal = (float(np.clip(round(v, 2), 1.0, 5.0)) for v in labels)
    return np.clip(audio, -0.99, 0.99).astype(np.float32), spans, valence, arousal


def voiced_chunk(
    rng: np.random.Generator, spk: Speaker, p: Prosody, seconds: float, arousal_dev: float, gain_db: float
) -> np.ndarray:
    """(n,) one stretch of vowel-like speech with the prosody `p`."""
    rate = p.syllable_rate * (1.0 + 0.08 * arousal_dev) * rng.uniform(0.9, 1.1)
    durations = _syllable_durations(rng, rate, seconds)  # (S,) samples
    n = int(durations.sum())
    onsets = np.concatenate([[0], np.cumsum(durations)[:-1]])  # (S,)
    f0 = _f0_contour(rng, spk, p, onsets, durations, n, arousal_dev)  # (n,)
    source = _glottal_source(f0, p.open_quotient)
    source += p.breath * np.std(source) * rng.standard_normal(n)
    source = lfilter([1.0 - p.tilt], [1.0, -p.tilt], source)
    out = np.zeros(n + SR // 10)  # room for each syllable's overlap
    attack = 0.35 / rate  # fast rate -> sharp attack, sad -> soft onsets
    for onset, dur in zip(onsets, durations, strict=True):
        length = int(dur * 1.25)
        seg = source[onset : onset + length]
        vowel = VOWELS[rng.integers(len(VOWELS))]
        b, a = _formant_filter([f * spk.formant_scale * rng.uniform(0.95, 1.05) for f in vowel + HIGH_FORMANTS])
        shaped = lfilter(b, a, seg) * _envelope(len(seg), attack) * rng.uniform(0.6, 1.0)
        if rng.random() < 0.4:  # a fricative consonant before the vowel
            shaped[: len(seg) // 4] += _fricative(rng, len(seg) // 4) * np.std(shaped) * p.articulation
        out[onset : onset + len(shaped)] += shaped
    out = out[:n]
    level_db = p.level_db + 3.0 * arousal_dev + gain_db
    return out * (10 ** (level_db / 20) / (np.sqrt(np.mean(out**2)) + 1e-12))


def _expressed(p: Prosody, expressivity: float) -> Prosody:
    """Move the emotion's acoustics toward neutral for a less expressive speaker; labels stay."""
    neutral = PROSODY["neutral"]

    def mix(field: str) -> float:
        return getattr(neutral, field) + expressivity * (getattr(p, field) - getattr(neutral, field))

    acoustic = ("f0_factor", "f0_range_st", "syllable_rate", "level_db", "open_quotient", "tilt", "breath",
                "articulation")
    values = asdict(p) | {f: mix(f) for f in acoustic}
    return Prosody(**values)


def _syllable_durations(rng: np.random.Generator, rate: float, seconds: float) -> np.ndarray:
    n_syll = max(2, round(seconds * rate))
    durations = rng.uniform(0.75, 1.25, n_syll) / rate
    return np.round(durations * seconds / durations.sum() * SR).astype(np.int64)


def _f0_contour(
    rng: np.random.Generator, spk: Speaker, p: Prosody,
    onsets: np.ndarray, durations: np.ndarray, n: int, arousal_dev: float,
) -> np.ndarray:
    """(n,) Hz: one pitch target per syllable, linear between syllable centres, with declination."""
    base = spk.f0_hz * p.f0_factor * 2 ** (1.2 * arousal_dev / 12)
    targets_st = rng.uniform(-0.5, 0.5, len(onsets)) * p.f0_range_st  # (S,)
    centres = onsets + durations / 2
    declination_st = -2.0 * np.arange(n) / n
    st = np.interp(np.arange(n), centres, targets_st) + declination_st
    return base * 2 ** (st / 12)


def _glottal_source(f0: np.ndarray, open_quotient: float) -> np.ndarray:
    """(n,) derivative of a Rosenberg glottal flow pulse train following f0 (n,) Hz."""
    phase = np.cumsum(f0) / SR % 1.0  # position within the period, [0, 1)
    rise = 0.65 * open_quotient
    flow = np.where(
        phase < rise,
        0.5 * (1 - np.cos(np.pi * phase / rise)),
        np.where(phase < open_quotient, np.cos(0.5 * np.pi * (phase - rise) / (open_quotient - rise)), 0.0),
    )
    # Lip radiation differentiates the flow; the closing edge is what makes a voice bright.
    return np.diff(flow, prepend=0.0)


def _formant_filter(formants: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """(b, a) of a cascade of two-pole resonators, unit gain at 0 Hz."""
    a = np.ones(1)
    for f, bw in zip(formants, BANDWIDTHS, strict=True):
        r = math.exp(-math.pi * bw / SR)
        a = np.convolve(a, [1.0, -2 * r * math.cos(2 * math.pi * f / SR), r * r])
    return np.array([a.sum()]), a


def _envelope(n: int, attack_seconds: float) -> np.ndarray:
    """(n,) raised-cosine attack, flat top, raised-cosine release over the last 40 %."""
    env = np.ones(n)
    rise = min(n // 3, max(1, int(attack_seconds * SR)))
    fall = max(1, int(0.4 * n))
    env[:rise] = 0.5 * (1 - np.cos(np.pi * np.arange(rise) / rise))
    env[n - fall :] *= 0.5 * (1 + np.cos(np.pi * np.arange(fall) / fall))
    return env


def _fricative(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n,) high-passed noise burst with a fade-in/out, like /s/ or /f/."""
    noise = np.diff(rng.standard_normal(n + 2), n=2)
    return noise / (np.std(noise) + 1e-12) * np.hanning(n)


def _background(rng: np.random.Generator, n: int, dbfs: float) -> np.ndarray:
    """(n,) room noise: gently low-passed white noise at `dbfs` RMS."""
    noise = lfilter([0.5], [1.0, -0.5], rng.standard_normal(n))
    return noise * (10 ** (dbfs / 20) / (np.std(noise) + 1e-12))


def _settings(seed, n_sessions, utts_per_speaker, speech_seconds, silence_seconds) -> dict:
    return {"generator_version": GENERATOR_VERSION, "seed": int(seed), "n_sessions": int(n_sessions),
            "utts_per_speaker": int(utts_per_speaker),
            "speech_seconds": [float(x) for x in speech_seconds],
            "silence_seconds": [float(x) for x in silence_seconds]}


def _check_settings(root: Path, seed: int, gen_options: dict) -> None:
    """Refuse a folder generated with other options than the ones asked for."""
    path = root / SETTINGS_FILE
    if not path.exists():
        return  # a hand-made manifest in the synthetic layout: read it as it is
    stored = json.loads(path.read_text(encoding="utf-8"))
    wanted = _settings(seed=seed, **(DEFAULTS | gen_options))
    if stored != wanted:
        diff = ", ".join(f"{k}={stored.get(k)} (asked {v})" for k, v in wanted.items() if stored.get(k) != v)
        raise CorpusError(f"{root} holds a synthetic corpus made with {diff}; use another folder or delete it")


def _write_csv(path: Path, columns: list[str], rows: list[dict[str, str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
