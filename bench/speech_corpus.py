"""A real-speech emotion corpus this machine can make: eSpeak NG voices speaking with emotional prosody.

Why: the synthetic corpus (extract/synthetic.py) proves the plumbing, not that a
head learns from speech. No licensed corpus can be downloaded here, but
Debian's `espeak-ng` speaks real words with real formants and phonetics, and
its SSML `<prosody>` changes pitch, pitch range, rate and volume, the cues
acted emotional speech carries most strongly (Banse & Scherer 1996):

| emotion | pitch | range | rate | volume | valence, arousal (1-5) |
|---|---|---|---|---|---|
| angry   | +15 % | +60 % | +15 % | +50 % | 1.8, 4.2 |
| happy   | +30 % | +90 % | +10 % | +20 % | 4.2, 3.6 |
| neutral |   0   |   0   |   0   |   0   | 3.0, 2.5 |
| sad     | -15 % | -50 % | -25 % | -35 % | 1.9, 1.6 |

Each utterance scales its emotion's deviation by an intensity u ~ U(0.5, 1.5)
and adds its own jitter; each speaker has its own voice (eSpeak variant and
accent), base pitch and rate. Valence and arousal follow the emotion, scaled by
u, plus rater-like noise. Every sentence is spoken in every emotion, so the
words carry no label. Audio is resampled to 16 kHz, given 0.1-0.6 s of leading
and trailing background and white noise at 25-40 dB SNR, like a room recording.

The result is a `manifest` corpus (docs/corpora.md): `ROOT/manifest.csv`
with path, speaker, emotion, valence, arousal, session, utt_id; audio under
`ROOT/wav/<speaker>/`. Speakers are `SesNN` + F/M, two per session, so the
leave-one-speaker-out plan validates on the session partner as for IEMOCAP.

    python bench/speech_corpus.py OUT [--sessions 5] [--per-class 10] [--seed 0]

This is acted speech by a formant synthesizer, not human emotion: use it to
check that a head learns from real speech features and beats a baseline on
the same folds, not to estimate IEMOCAP accuracy.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

SAMPLE_RATE = 16_000
EMOTIONS = ("angry", "happy", "neutral", "sad")
# (pitch %, range %, rate %, volume %) deviations at intensity 1, and (valence, arousal) offsets from (3, 2.5)
PROSODY = {
    "angry": ((15, 60, 15, 50), (-1.2, 1.7)),
    "happy": ((30, 90, 10, 20), (1.2, 1.1)),
    "neutral": ((0, 0, 0, 0), (0.0, 0.0)),
    "sad": ((-15, -50, -25, -35), (-1.1, -0.9)),
}
JITTER = (8.0, 20.0, 8.0, 10.0)  # per-utterance standard deviation of each prosody setting, in %
ACCENTS = ("en-us", "en-gb", "en-gb-scotland", "en-029", "en-gb-x-rp")
VARIANTS = {"F": ("f1", "f2", "f3", "f4", "f5"), "M": ("m1", "m2", "m3", "m4", "m5", "m6", "m7")}
SENTENCES = (
    "The meeting was moved to Thursday afternoon.",
    "I put the keys on the kitchen table.",
    "We drove to the station before the train left.",
    "She said the package would arrive tomorrow.",
    "There are seven chairs in the other room.",
    "He opened the window and looked outside.",
    "The report is due at the end of the month.",
    "They painted the fence a different colour.",
    "My brother called me this morning.",
    "The shop on the corner closes at six.",
    "You will find the form on the second page.",
    "We have to talk about what happened yesterday.",
    "The dog was sleeping next to the door.",
    "I did not expect to see you here today.",
    "The results came in just an hour ago.",
    "Nobody told me the flight had been changed.",
    "Bring the blue folder when you come back.",
    "It rained all week in the mountains.",
    "The teacher wrote the answer on the board.",
    "I think we should leave right now.",
    "That is exactly what I told them last time.",
    "The lights went out in the whole building.",
    "Your sister is waiting for you outside.",
    "We finally finished painting the house.",
)


@dataclass(frozen=True)
class Speaker:
    speaker: str  # e.g. Ses01F
    session: str  # e.g. Ses01
    voice: str  # espeak-ng voice, e.g. en-gb+f3
    pitch: float  # base pitch offset, %
    rate: float  # base rate offset, %


def make_speakers(sessions: int, rng: np.random.Generator) -> list[Speaker]:
    speakers = []
    for s in range(1, sessions + 1):
        for gender in ("F", "M"):
            accent = ACCENTS[(s - 1) % len(ACCENTS)]
            variant = VARIANTS[gender][int(rng.integers(len(VARIANTS[gender])))]
            speakers.append(Speaker(f"Ses{s:02d}{gender}", f"Ses{s:02d}", f"{accent}+{variant}",
                                    float(rng.uniform(-15, 15)), float(rng.uniform(-10, 10))))
    return speakers


def ssml(text: str, pitch: float, rng_: float, rate: float, volume: float) -> str:
    def pct(x: float) -> str:
        return f"{x:+.0f}%"

    return (f'<speak><prosody pitch="{pct(pitch)}" range="{pct(rng_)}" rate="{pct(rate)}" '
            f'volume="{pct(volume)}">{text}</prosody></speak>')


def speak(voice: str, markup: str) -> np.ndarray:
    """espeak-ng -> (N,) float32 at 16 kHz."""
    wav = subprocess.run(["espeak-ng", "-m", "-v", voice, "--stdout", markup], capture_output=True, check=True).stdout
    x, sr = sf.read(io.BytesIO(wav), dtype="float32")
    return soxr.resample(x, sr, SAMPLE_RATE).astype(np.float32)


def room(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Leading/trailing background and white noise at 25-40 dB SNR."""
    lead, tail = (int(rng.uniform(0.1, 0.6) * SAMPLE_RATE) for _ in range(2))
    y = np.concatenate([np.zeros(lead, np.float32), x, np.zeros(tail, np.float32)])
    power = float(np.mean(x**2)) + 1e-12
    snr_db = rng.uniform(25, 40)
    y = y + rng.standard_normal(len(y)).astype(np.float32) * np.sqrt(power / 10 ** (snr_db / 10))
    return np.clip(y, -1.0, 1.0).astype(np.float32)


def make_corpus(out: str | Path, *, sessions: int = 5, per_class: int = 10, seed: int = 0,
                threads: int = 2) -> Path:
    """Write the corpus under `out`; returns the manifest path."""
    if shutil.which("espeak-ng") is None:
        raise SystemExit("espeak-ng is not installed (Debian: apt-get install espeak-ng)")
    out = Path(out)
    rng = np.random.default_rng(seed)
    speakers = make_speakers(sessions, rng)
    jobs = []
    for spk in speakers:
        for emotion in EMOTIONS:
            (dp, dr, dv, da), (v_off, a_off) = PROSODY[emotion]
            for i in range(per_class):
                u = float(rng.uniform(0.5, 1.5))
                j = rng.standard_normal(4) * np.array(JITTER)
                settings = (spk.pitch + u * dp + j[0], u * dr + j[1], spk.rate + u * dv + j[2], u * da + j[3])
                text = SENTENCES[int(rng.integers(len(SENTENCES)))]
                valence = float(np.clip(3.0 + u * v_off + rng.normal(0, 0.35), 1, 5))
                arousal = float(np.clip(2.5 + u * a_off + rng.normal(0, 0.35), 1, 5))
                utt_id = f"{spk.speaker}_{emotion[:3]}{i:03d}"
                jobs.append((spk, emotion, utt_id, text, settings, valence, arousal, int(rng.integers(2**31))))

    def render(job: tuple) -> dict:
        spk, emotion, utt_id, text, settings, valence, arousal, noise_seed = job
        x = room(speak(spk.voice, ssml(text, *settings)), np.random.default_rng(noise_seed))
        path = Path("wav") / spk.speaker / f"{utt_id}.wav"
        (out / path).parent.mkdir(parents=True, exist_ok=True)
        sf.write(out / path, x, SAMPLE_RATE, subtype="PCM_16")
        return {"path": path.as_posix(), "speaker": spk.speaker, "emotion": emotion, "valence": f"{valence:.2f}",
                "arousal": f"{arousal:.2f}", "session": spk.session, "utt_id": utt_id}

    with ThreadPoolExecutor(max(1, threads)) as pool:
        rows = list(pool.map(render, jobs))
    manifest = out / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    # what made it: bench/real_speech.py refuses to reuse a corpus made with other options
    (out / "corpus.json").write_text(json.dumps({"sessions": sessions, "per_class": per_class, "seed": seed}) + "\n")
    return manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--sessions", type=int, default=5, help="sessions (2 speakers each)")
    ap.add_argument("--per-class", type=int, default=10, help="utterances per speaker and emotion")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    manifest = make_corpus(args.out, sessions=args.sessions, per_class=args.per_class, seed=args.seed)
    print(f"wrote {manifest}")


if __name__ == "__main__":
    main()
