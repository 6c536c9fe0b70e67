"""A small synthetic feature cache the head must learn from, written with the real CacheWriter.

Each utterance has T frames of L=3 layers, D=16. Speech frames (VAD mode 3
mask) carry a class-dependent mean in layer 2 (weaker in layer 1, none in
layer 0) plus noise; non-speech frames are loud noise with a speaker
offset, so pooling that ignores non-speech frames has the easier job.
Valence/arousal (1-5) follow the class with noise.

`make_cache(..., varied=True)` is the corpus that can tell rows apart: its
speakers differ in label sequence (each speaker's classes in its own shuffled
order, utterance ids in that order), class balance, utterance lengths and
valence/arousal level, so a table whose rows are shifted by an utterance or a
speaker no longer lines up with its labels. `relabel` changes the labels of
chosen speakers after every draw (so the other speakers' data stays bit for
bit the same), which is how the split-hygiene tests poison held-out speakers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import numpy as np

from cache.writer import CacheWriter
from core.records import CLASSES_4, Utterance

D = 16
LAYERS = (0, 1, 2)
SESSIONS = ("S1", "S2", "S3")
VALENCE = {"angry": 1.5, "happy": 4.5, "neutral": 3.0, "sad": 2.0}
AROUSAL = {"angry": 4.5, "happy": 4.0, "neutral": 2.5, "sad": 1.5}


Relabel = Callable[[str, Optional[str], float, float], tuple[Optional[str], float, float]]


def make_cache(path: Path, *, seed: int = 0, per_class: int = 6, dims: bool = True, emotions: bool = True,
               no_speech_every: int = 0, sessions: tuple[str, ...] = SESSIONS,
               transform: Callable[[str, np.ndarray], np.ndarray] | None = None, varied: bool = False,
               relabel: Relabel | None = None) -> Path:
    """Write the cache at `path` (6 speakers, 2 per session) and return it.

    `transform(speaker, x)` may rescale an utterance's (T, L, D) frames before
    they are written; `relabel(speaker, emotion, valence, arousal)` may change
    its labels; the random draws (hence everything else) stay the same.
    `varied`: speakers differ in label order, class balance, lengths and
    valence/arousal level (module docstring); False keeps the historical corpus.
    """
    if varied:
        return _make_varied(path, seed=seed, per_class=per_class, no_speech_every=no_speech_every,
                            sessions=sessions, transform=transform, relabel=relabel)
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 1, (len(CLASSES_4), D)).astype(np.float32)
    fingerprint = {"model": "synthetic-test", "layers": list(LAYERS), "classes": list(CLASSES_4), "dtype": "float16",
                   "seed": seed}
    n = 0
    with CacheWriter(path, fingerprint) as writer:
        for session in sessions:
            for gender in "FM":
                speaker = f"{session}{gender}"
                offset = rng.normal(0, 1, D).astype(np.float32)
                for c, emotion in enumerate(CLASSES_4):
                    for i in range(per_class):
                        t = int(rng.integers(12, 40))
                        x, speech = _frames(rng, t, means[c], offset, bool(no_speech_every and n % no_speech_every == 0))
                        vad = np.zeros((4, t), dtype=bool)
                        vad[3] = speech
                        vad[:3] = speech | (rng.random(t) < 0.3)
                        label = emotion if emotions else None
                        valence = VALENCE[emotion] + rng.normal(0, 0.3) if dims else float("nan")
                        arousal = AROUSAL[emotion] + rng.normal(0, 0.3) if dims else float("nan")
                        if relabel is not None:
                            label, valence, arousal = relabel(speaker, label, valence, arousal)
                        utt = Utterance(
                            utt_id=f"{speaker}_{emotion}_{i:02d}", path=f"/nowhere/{speaker}_{n}.wav",
                            speaker=speaker, session=session, emotion=label, valence=valence, arousal=arousal,
                            dataset="synthetic",
                        )
                        if transform is not None:
                            x = transform(speaker, x)
                        writer.add(utt, x, vad, duration=t * 0.02, truncated=False)
                        n += 1
    return Path(path)


def _frames(rng: np.random.Generator, t: int, mean: np.ndarray, offset: np.ndarray,
            silent: bool) -> tuple[np.ndarray, np.ndarray]:
    """One utterance's (T, L, D) frames and (T,) speech flags: ~60 % speech (the middle frame always, none
    if `silent`) carrying the class `mean` on layers 1 (weakly) and 2; non-speech frames carry the speaker's
    `offset` and louder noise."""
    speech = rng.random(t) < 0.6
    speech[t // 2] = True
    if silent:
        speech[:] = False
    x = rng.normal(0, 1, (t, len(LAYERS), D)).astype(np.float32)
    x[speech, 1] += 0.5 * mean
    x[speech, 2] += 1.5 * mean
    x[~speech] += 2.0 * offset + rng.normal(0, 2, (int((~speech).sum()), len(LAYERS), D))
    return x, speech


def _make_varied(path: Path, *, seed: int, per_class: int, no_speech_every: int, sessions: tuple[str, ...],
                 transform: Callable[[str, np.ndarray], np.ndarray] | None, relabel: Relabel | None) -> Path:
    """The varied corpus (module docstring). Speaker j (0-based, sorted) has per_class - 1 + (c + j) % 4
    utterances of class c (at least 1; j more of class j % 4), in a shuffled order, lengths from 10 + 4 j
    to 30 + 8 j frames, and valence/arousal shifted by 0.3 j and -0.2 j. VAD modes 0, 1, 2 add 30, 20 and
    10 % random frames to mode 3's speech frames, so every mode's mask differs."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 1, (len(CLASSES_4), D)).astype(np.float32)
    fingerprint = {"model": "synthetic-test", "layers": list(LAYERS), "classes": list(CLASSES_4), "dtype": "float16",
                   "seed": seed, "varied": True}
    n = 0
    with CacheWriter(path, fingerprint) as writer:
        for j, speaker in enumerate(f"{session}{gender}" for session in sessions for gender in "FM"):
            session = speaker[:-1]
            offset = rng.normal(0, 1, D).astype(np.float32)
            counts = [max(1, per_class - 1 + (c + j) % 4) for c in range(len(CLASSES_4))]
            counts[j % len(CLASSES_4)] += j  # and each speaker its own number of utterances
            order = rng.permutation(np.repeat(np.arange(len(CLASSES_4)), counts))  # this speaker's label sequence
            for i, c in enumerate(order):
                emotion = CLASSES_4[c]
                t = int(rng.integers(10 + 4 * j, 30 + 8 * j))
                x, speech = _frames(rng, t, means[c], offset, bool(no_speech_every and n % no_speech_every == 0))
                vad = np.zeros((4, t), dtype=bool)
                vad[3] = speech
                for mode in range(3):  # each mode its own mask, the lower the more frames: a mix-up shows
                    vad[mode] = speech | (rng.random(t) < 0.1 * (3 - mode))
                label: str | None = emotion
                valence = VALENCE[emotion] + 0.3 * j + rng.normal(0, 0.3)
                arousal = AROUSAL[emotion] - 0.2 * j + rng.normal(0, 0.3)
                if relabel is not None:
                    label, valence, arousal = relabel(speaker, label, valence, arousal)
                utt = Utterance(utt_id=f"{speaker}_{i:03d}", path=f"/nowhere/{speaker}_{i:03d}.wav", speaker=speaker,
                                session=session, emotion=label, valence=valence, arousal=arousal, dataset="synthetic")
                if transform is not None:
                    x = transform(speaker, x)
                writer.add(utt, x, vad, duration=t * 0.02, truncated=False)
                n += 1
    return Path(path)
