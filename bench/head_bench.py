"""What the head benchmarks share (bench/train_head.py, bench/sap_attention.py, bench/layer_scaling.py):
the IEMOCAP-shaped synthetic cache, dropping a file's pages, peak RSS, and report sections."""

from __future__ import annotations

import math
import os
import resource
from pathlib import Path

import numpy as np

from cache.writer import CacheWriter
from core.records import CLASSES_4, Utterance

FRAMES_PER_SECOND = 50


def build_cache(path: Path, *, utts: int, layers: int, dim: int, frames: int, seed: int = 0) -> Path:
    """10 speakers / 5 sessions, class-dependent means on speech frames; reused when it exists."""
    if path.exists():
        return path
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 0.5, (4, dim)).astype(np.float32)
    fp = {"model": "bench-synthetic", "layers": list(range(layers)), "classes": list(CLASSES_4),
          "dtype": "float16", "utts": utts, "dim": dim, "frames": frames, "seed": seed}
    speakers = [(f"Ses0{s}{g}", f"Ses0{s}") for s in range(1, 6) for g in "FM"]
    with CacheWriter(path, fp) as writer:
        for i in range(utts):
            speaker, session = speakers[i % len(speakers)]
            c = i % 4
            # log-normal lengths: median `frames`, long tail like IEMOCAP's 1-19 s
            t = int(np.clip(rng.lognormal(math.log(frames), 0.5), 50, 950))
            x = rng.standard_normal((t, layers, dim), dtype=np.float32)
            speech = np.repeat(rng.random(t // 10 + 1) < 0.65, 10)[:t]  # 200 ms runs
            x[speech] += means[c]
            vad = np.tile(speech, (4, 1))
            utt = Utterance(utt_id=f"{speaker}_{i:05d}", path=f"/bench/{i}.wav", speaker=speaker, session=session,
                            emotion=CLASSES_4[c], valence=1.0 + c, arousal=5.0 - c, dataset="bench")
            writer.add(utt, x.astype(np.float16), vad, duration=t / FRAMES_PER_SECOND, truncated=False)
    return path


def drop_pages(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def section(text: str, title: str) -> str:
    """The section `title` of a report (its heading up to the next "## " heading), or ""."""
    if title not in text:
        return ""
    body = text[text.index(title):]
    end = body.find("\n## ", len(title))
    return body if end < 0 else body[: end + 1]


def phases(seconds: dict | float) -> str:
    """prepare_inputs' phases as 'scan / weights / mix' seconds ('-' where a phase did not run)."""
    if not isinstance(seconds, dict):
        return "-"
    return " / ".join(f"{seconds[k]:.1f}" if k in seconds else "-" for k in ("scan", "weights", "materialize"))


def write_section(out: Path, title: str, lines: list[str]) -> None:
    """Replace (or append) the section `title` of an existing report, leaving the rest as it was."""
    text = out.read_text() if out.exists() else ""
    head, _, tail = text.partition(title)
    rest = tail[tail.find("\n## ") + 1 :] if "\n## " in tail else ""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(head.rstrip("\n") + "\n\n" + "\n".join(lines) + ("\n" + rest if rest else ""))
