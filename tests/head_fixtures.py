"""A small synthetic feature cache the head must learn from, written with the real CacheWriter.

Each utterance has T frames of L=3 layers, D=16. Speech frames (VAD mode 3
mask) carry a class-dependent mean in layer 2 (weaker in layer 1, none in
layer 0) plus noise; non-speech frames are loud noise with a speaker
offset, so pooling that ignores non-speech frames has the easier job.
Valence/arousal (1-5) follow the class with noise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from cache.writer import CacheWriter
from core.records import CLASSES_4, Utterance

D = 16
LAYERS = (0, 1, 2)
SESSIONS = ("S1", "S2", "S3")
VALENCE = {"angry": 1.5, "happy": 4.5, "neutral": 3.0, "sad": 2.0}
AROUSAL = {"angry": 4.5, "happy": 4.0, "neutral": 2.5, "sad": 1.5}


def make_cache(path: Path, *, seed: int = 0, per_class: int = 6, dims: bool = True, emotions: bool = True,
               no_speech_every: int = 0, sessions: tuple[str, ...] = SESSIONS,
               transform: Callable[[str, np.ndarray], np.ndarray] | None = None) -> Path:
    """Write the cache at `path` (6 speakers, 2 per session) and return it.

    `transform(speaker, x)` may rescale an utterance's (T, L, D) frames before
    they are written; the random draws (hence everything else) stay the same.
    """
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
                        speech = rng.random(t) < 0.6
                        speech[t // 2] = True
                        if no_speech_every and n % no_speech_every == 0:
                            speech[:] = False
                        x = rng.normal(0, 1, (t, len(LAYERS), D)).astype(np.float32)
                        x[speech, 1] += 0.5 * means[c]
                        x[speech, 2] += 1.5 * means[c]
                        x[~speech] += 2.0 * offset + rng.normal(0, 2, (int((~speech).sum()), len(LAYERS), D))
                        vad = np.zeros((4, t), dtype=bool)
                        vad[3] = speech
                        vad[:3] = speech | (rng.random(t) < 0.3)
                        utt = Utterance(
                            utt_id=f"{speaker}_{emotion}_{i:02d}", path=f"/nowhere/{speaker}_{n}.wav",
                            speaker=speaker, session=session, emotion=emotion if emotions else None,
                            valence=VALENCE[emotion] + rng.normal(0, 0.3) if dims else float("nan"),
                            arousal=AROUSAL[emotion] + rng.normal(0, 0.3) if dims else float("nan"),
                            dataset="synthetic",
                        )
                        if transform is not None:
                            x = transform(speaker, x)
                        writer.add(utt, x, vad, duration=t * 0.02, truncated=False)
                        n += 1
    return Path(path)
