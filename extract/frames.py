"""Feature frame grids: how many frames N samples give, and where each frame sits.

Every backend declares a grid; VAD masks are put on that grid by one rule
(see `extract.vad`): frame t is speech iff the sample at its centre lies in
a 10 ms VAD frame WebRTC marked as speech.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SAMPLE_RATE = 16_000


@dataclass(frozen=True)
class FrameGrid:
    """Frame t covers samples [stride*t, stride*t + window); no padding at the ends."""

    window: int  # samples
    stride: int  # samples

    def n_frames(self, n_samples: int) -> int:
        """T = floor((N - window) / stride) + 1, and 0 when N < window."""
        if n_samples < self.window:
            return 0
        return (n_samples - self.window) // self.stride + 1

    def centers(self, n_samples: int) -> np.ndarray:
        """(T,) index of each frame's centre sample."""
        t = np.arange(self.n_frames(n_samples), dtype=np.int64)
        return t * self.stride + self.window // 2

    def as_dict(self) -> dict[str, int]:
        return {"frame_window": self.window, "frame_stride": self.stride}


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
