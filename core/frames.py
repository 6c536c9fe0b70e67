"""Feature frame grids: how many frames N samples give, and where each frame sits.

Every backend declares a grid; VAD masks are put on that grid by one rule
(see `extract.vad`): frame t is speech iff the sample at its centre lies in
a 10 ms VAD frame WebRTC marked as speech.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from core.choices import Choice, Choices

SAMPLE_RATE = 16_000

# WebRTC VAD's aggressiveness modes. Every utterance stores one mask per mode, (4, T) on
# its frame grid, so a head can choose its mode without extracting again.
VAD_MODES: Choices[Choice] = Choices("--vad-mode", {
    0: Choice("least aggressive: the most frames count as speech"), 1: Choice(), 2: Choice(),
    3: Choice("most aggressive: the fewest frames count as speech"),
}, note="WebRTC aggressiveness")


@dataclass(frozen=True)
class FrameGrid:
    """Frame t covers samples [offset + stride*t, offset + stride*t + window).

    Which frames exist for N samples depends on how the model counts them:
    - count="window" (unpadded conv front ends: WavLM, fbank, eGeMAPS): frames
      whose whole window lies inside the audio, T = floor((N - window) / stride) + 1;
    - count="center" (front ends that pad, such as Whisper's centred STFT and
      padded convolutions): frames whose centre sample lies inside the audio,
      T = #{t >= 0 : offset + stride*t + window//2 < N}.
    `offset` is negative when the front end reads before sample 0 (padding).
    """

    window: int  # samples
    stride: int  # samples
    offset: int = 0  # first sample of frame 0's window
    count: str = "window"  # "window" | "center"

    def __post_init__(self) -> None:
        if self.count not in ("window", "center"):
            raise ValueError(f"FrameGrid.count must be 'window' or 'center', got {self.count!r}")

    @property
    def first_center(self) -> int:
        return self.offset + self.window // 2

    def n_frames(self, n_samples: int) -> int:
        """The number of frames of N samples (see the class docstring); 0 when there is none."""
        if self.count == "center":
            c0 = self.first_center
            return 0 if n_samples <= c0 else (n_samples - 1 - c0) // self.stride + 1
        if n_samples - self.offset < self.window:
            return 0
        return (n_samples - self.offset - self.window) // self.stride + 1

    def centers(self, n_samples: int) -> np.ndarray:
        """(T,) index of each frame's centre sample."""
        t = np.arange(self.n_frames(n_samples), dtype=np.int64)
        return t * self.stride + self.first_center

    def as_dict(self) -> dict[str, int | str]:
        # offset/count only when they differ from the defaults, so the fingerprints of
        # caches made before they existed stay the same (and those caches resumable)
        d: dict[str, int | str] = {"frame_window": self.window, "frame_stride": self.stride}
        if self.offset or self.count != "window":
            d.update(frame_offset=self.offset, frame_count=self.count)
        return d


# WavLM / wav2vec2 / HuBERT convolutional front end: 25 ms receptive field, 20 ms stride.
SSL_GRID = FrameGrid(window=400, stride=320)


def conv_grid(kernels: tuple[int, ...], strides: tuple[int, ...]) -> FrameGrid:
    """The grid of a stack of unpadded 1-D convolutions (receptive field, total stride).

    For such a stack the cascaded length formula equals the single-window
    formula with these numbers, so `n_frames` matches the model's own
    `_get_feat_extract_output_lengths` (tested).
    """
    window, jump = 1, 1
    for k, s in zip(kernels, strides):
        window += (k - 1) * jump
        jump *= s
    return FrameGrid(window=window, stride=jump)
