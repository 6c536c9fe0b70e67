"""A long recording cut into speech segments by WebRTC VAD while it streams, in bounded memory.

`cli predict --segments` (heads/predict.py) predicts each segment as a file of its own. The rule,
`SegmentRule` (defaults and their reasons in docs/reports.md, "Long recordings"):

1. WebRTC VAD, in the run's mode, decides every 10 ms frame of the 16 kHz stream as extract/vad.py
   does for an utterance (int16 input, the last partial frame zero-padded), with one VAD state for
   the whole recording.
2. A speech run is a stretch of speech frames; runs separated by a gap shorter than `merge_gap`
   become one, the gap included.
3. A run shorter than `min_segment` is dropped (a cough, a click, a word on its own).
4. A run longer than `max_segment` is split as it streams: while more than 2 x `max_segment` of it is
   open, its first `max_segment` seconds become a segment; when it ends, a rest longer than
   `max_segment` is halved. So every part lies between max/2 and max, and no more than 2 x max of a
   run is ever held.
5. Each segment gets `pad` seconds of audio on each side (clipped to the file) so soft onsets and
   tails the VAD cut are kept; parts of a split run meet without padding. `pad` is at most half of
   `merge_gap`, so padded segments never overlap.

Memory: audio is kept from the earliest sample a coming segment can need (the open run's start less
`pad`, or the present less `pad`): at most 2 x max_segment + merge_gap + pad seconds plus one
decoded block, whatever the recording's length. The rule itself (`SpanCutter`) sees only the
frame decisions, so it is tested on them directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import webrtcvad

from core.errors import UserError
from core.frames import SAMPLE_RATE
from core.settings import setting
from extract.audio import to_int16
from extract.vad import VAD_FRAME, VAD_FRAME_MS

FRAMES_PER_SECOND = 1000 // VAD_FRAME_MS  # 100 VAD frames per second


@dataclass(frozen=True)
class SegmentRule:
    """How speech runs become segments; seconds, applied on the 10 ms VAD frame grid."""

    min_segment: float = setting(1.0, "segments: drop speech runs shorter than this (seconds)")
    max_segment: float = setting(10.0, "segments: split speech runs longer than this into parts between half "
                                       "and all of it (seconds)")
    merge_gap: float = setting(0.5, "segments: join speech runs separated by a pause shorter than this (seconds)")
    pad: float = setting(0.25, "segments: audio kept before and after each segment (seconds; at most half of "
                              "--merge-gap)")

    def validate(self) -> None:
        checks = [
            (self.min_segment >= 0, "--min-segment must not be negative"),
            (self.max_segment >= 0.1, "--max-segment must be at least 0.1 s"),
            (self.min_segment <= self.max_segment,
             f"--min-segment ({self.min_segment:g} s) must not exceed --max-segment ({self.max_segment:g} s)"),
            (self.merge_gap >= 0 and self.pad >= 0, "--merge-gap and --pad must not be negative"),
            (2 * self.pad <= self.merge_gap + 1e-9,
             f"--pad ({self.pad:g} s) must be at most half of --merge-gap ({self.merge_gap:g} s), "
             "so padded segments never overlap"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)

    def frames(self, seconds: float) -> int:
        return round(seconds * FRAMES_PER_SECOND)


@dataclass(frozen=True)
class Span:
    """A segment in VAD frames: [start, end), and whether each side gets the padding."""

    start: int
    end: int
    pad_before: bool
    pad_after: bool


class SpanCutter:
    """The rule on a stream of frame decisions: `push` one frame, get the spans it completes."""

    def __init__(self, rule: SegmentRule) -> None:
        rule.validate()
        self.min, self.max = rule.frames(rule.min_segment), rule.frames(rule.max_segment)
        self.merge = max(1, rule.frames(rule.merge_gap))  # a gap this long (or longer) ends a run
        self.frame = 0  # frames pushed so far
        self.run_start: int | None = None  # first frame of the open run (of its unsplit rest)
        self.last_end = 0  # one past the open run's last speech frame
        self.split = False  # the open run has given a part already

    def push(self, speech: bool) -> list[Span]:
        i = self.frame
        self.frame += 1
        if speech:
            if self.run_start is None:
                self.run_start, self.split = i, False
            self.last_end = i + 1
            if self.last_end - self.run_start > 2 * self.max:
                part = Span(self.run_start, self.run_start + self.max, not self.split, False)
                self.run_start += self.max
                self.split = True
                return [part]
        elif self.run_start is not None and self.frame - self.last_end >= self.merge:
            return self._close()
        return []

    def finish(self) -> list[Span]:
        """The end of the stream closes the open run."""
        return self._close() if self.run_start is not None else []

    def _close(self) -> list[Span]:
        start, end, whole = self.run_start, self.last_end, not self.split
        self.run_start = None
        n = end - start
        if whole and n < self.min:
            return []
        if n <= self.max:
            return [Span(start, end, whole, True)]
        half = start + n // 2
        return [Span(start, half, whole, False), Span(half, end, False, True)]


@dataclass(frozen=True)
class Segment:
    start: int  # first sample at 16 kHz, padding included
    end: int  # one past the last
    samples: np.ndarray  # (end - start,) float32

    @property
    def seconds(self) -> tuple[float, float]:
        return self.start / SAMPLE_RATE, self.end / SAMPLE_RATE


class Segmenter:
    """16 kHz blocks in (`feed`), finished segments out; `finish` at the end of the recording."""

    def __init__(self, rule: SegmentRule, vad_mode: int) -> None:
        self.cutter = SpanCutter(rule)
        self.vad = webrtcvad.Vad(vad_mode)  # one state for the whole recording
        self.pad = round(rule.pad * SAMPLE_RATE)
        self.buffer = np.zeros(0, dtype=np.float32)  # the audio still needed
        self.offset = 0  # sample index of buffer[0]
        self.pending = np.zeros(0, dtype=np.int16)  # the start of a VAD frame not yet complete
        self.n = 0  # samples fed
        self.peak_buffer = 0  # the most samples ever held (for tests and benchmarks)

    def feed(self, block: np.ndarray) -> list[Segment]:
        """(n,) float32 at 16 kHz -> the segments it completes."""
        self.buffer = np.concatenate([self.buffer, np.asarray(block, dtype=np.float32)])
        self.n += len(block)
        self.peak_buffer = max(self.peak_buffer, len(self.buffer))
        pcm = np.concatenate([self.pending, to_int16(block)])
        whole = len(pcm) // VAD_FRAME * VAD_FRAME
        spans = [s for j in range(0, whole, VAD_FRAME)
                 for s in self.cutter.push(self.vad.is_speech(pcm[j:j + VAD_FRAME].tobytes(), SAMPLE_RATE))]
        self.pending = pcm[whole:]
        segments = [self._cut(s) for s in spans]
        self._trim()
        return segments

    def finish(self) -> list[Segment]:
        """The last partial frame (zero-padded, as extract.vad does) and the open run."""
        spans = []
        if len(self.pending):
            frame = np.concatenate([self.pending, np.zeros(VAD_FRAME - len(self.pending), dtype=np.int16)])
            spans += self.cutter.push(self.vad.is_speech(frame.tobytes(), SAMPLE_RATE))
            self.pending = self.pending[:0]
        spans += self.cutter.finish()
        return [self._cut(s) for s in spans]

    def _cut(self, span: Span) -> Segment:
        start = max(0, span.start * VAD_FRAME - (self.pad if span.pad_before else 0))
        end = min(self.n, span.end * VAD_FRAME + (self.pad if span.pad_after else 0))
        if start < self.offset or end > self.offset + len(self.buffer):  # the trimming rule broke: a bug
            raise RuntimeError(f"segment [{start}, {end}) is outside the held audio [{self.offset}, "
                               f"{self.offset + len(self.buffer)})")
        return Segment(start, end, self.buffer[start - self.offset:end - self.offset].copy())

    def _trim(self) -> None:
        first = self.cutter.run_start if self.cutter.run_start is not None else self.cutter.frame
        keep = max(self.offset, first * VAD_FRAME - self.pad)
        self.buffer = self.buffer[keep - self.offset:]
        self.offset = keep


def segments(blocks: Iterator[np.ndarray], rule: SegmentRule, vad_mode: int) -> Iterator[Segment]:
    """The segments of a stream of 16 kHz blocks, each as soon as it is complete."""
    cutter = Segmenter(rule, vad_mode)
    for block in blocks:
        yield from cutter.feed(block)
    yield from cutter.finish()
