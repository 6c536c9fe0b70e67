"""Whisper encoders as a feature backend: log-mel in, every encoder hidden state out, on Whisper's own grid.

A Whisper checkpoint (hub id such as `openai/whisper-large-v3`, or a local
folder with config.json, weights and preprocessor_config.json) is loaded with
the ordinary `WhisperModel.from_pretrained` (never remote code); only its
encoder is kept. Its `WhisperFeatureExtractor` config gives the log-mel
parameters (n_fft 400, hop 160, 80 or 128 mel bins, 30 s window).

What differs from the wav2vec2 family, and what we do about it:

- Input: an 80/128-bin log-mel spectrogram, not the waveform. `log_mel` is the
  feature extractor's own torch recipe (centred STFT with reflect padding,
  Slaney mel filters, log10, clamp at max - 8, (x + 4) / 4), batched on the
  device; a test checks it against `WhisperFeatureExtractor.__call__`.
- A fixed 30 s window: the encoder accepts exactly 3000 mel frames (1500
  output frames) and was trained only on zero-padded 30 s windows; it has no
  attention mask. Every utterance is therefore zero-padded to 30 s, exactly
  what the model saw in training and what `ctranslate2`'s Whisper does; a
  batch of different lengths gives each utterance the same input as alone.
  The price: an utterance costs 30 s of encoder compute whatever its length
  (docs/extraction.md).
- Longer than 30 s: cut into consecutive, non-overlapping 30 s windows (as
  Whisper's own long-form transcription does), each encoded alone, frames
  concatenated. 30 s = 1500 frames exactly, so the frame grid runs on
  unbroken; frames within ~0.5 s of a window edge see only their own window.
- The frame grid (`whisper_grid`): mel frame m reads samples
  [160 m - 199, 160 m + 199] (a 400-sample window centred on 160 m; the
  periodic Hann window's first tap is 0); conv1 (kernel 3, stride 1, padding 1)
  and conv2 (kernel 3, stride 2, padding 1) make encoder frame t read mel frames
  2t - 2 .. 2t + 2, i.e. samples [320 t - 519, 320 t + 519]: FrameGrid(window
  1039, stride 320, offset -519), centre 320 t. A frame exists iff its centre
  lies in the audio (320 t < N, T = ceil(N / 320)), the model's own rule (the
  feature extractor's attention mask, subsampled, then
  `_get_feat_extract_output_lengths`). Frames of the zero padding beyond the
  audio are never returned. Self-attention is global, so "reads" means the
  convolutional receptive field; tests check both rules exactly.
- Hidden states: L = encoder_layers + 1. Index 0 is the transformer's input
  (GELU(conv2(GELU(conv1(mel)))) + sinusoidal positions), l = the output of
  layer l, and the last index (L - 1 = encoder_layers) is `last_hidden_state`:
  the output of the last layer AFTER the encoder's final LayerNorm, the tensor
  the decoder (and CTranslate2's `encode`) reads. The last layer's output before
  that LayerNorm is not among them. Indices 0..L-2 are un-normalized residual
  streams (Whisper base: |x| up to ~400 in layers 4-5).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from core.devices import autocast_dtype, resolve_device
from core.frames import SAMPLE_RATE, FrameGrid
from extract.models import BackendError, check_layers, first_line, state_dict_sha256


# ----------------------------------------------------------------------------- the grid and the input


def whisper_grid(n_fft: int = 400, hop: int = 160) -> FrameGrid:
    """Encoder frame t <- mel frames 2t-2..2t+2 <- samples [2 hop t - (2 hop + n_fft/2 - 1), ... + same].

    The conv stack is fixed in every Whisper (conv1: k 3, s 1, p 1; conv2: k 3,
    s 2, p 1; `load_encoder` checks it), so only the STFT parameters vary.
    """
    reach = 2 * hop + n_fft // 2 - 1  # samples either side of the centre with non-zero weight
    return FrameGrid(window=2 * reach + 1, stride=2 * hop, offset=-reach, count="center")


def log_mel(waves: torch.Tensor, mel_filters: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
    """(W, S) zero-padded 30 s windows -> (W, M, S / hop) Whisper log-mel, in float32 on waves' device.

    The feature extractor's recipe; the clamp at (max - 8) uses each window's
    own maximum, so a window's input does not depend on its batch.
    """
    waves = waves.float()
    window = torch.hann_window(n_fft, device=waves.device)
    stft = torch.stft(waves, n_fft, hop, window=window, center=True, pad_mode="reflect",
                      return_complex=True)  # (W, F, S / hop + 1)
    power = stft[..., :-1].abs() ** 2  # (W, F, S / hop): the last frame is dropped, as Whisper does
    mel = mel_filters.T.to(waves.device, torch.float32) @ power  # (W, M, S / hop)
    logs = torch.clamp(mel, min=1e-10).log10()
    peak = logs.amax(dim=(1, 2), keepdim=True)  # (W, 1, 1)
    logs = torch.maximum(logs, peak - 8.0)
    return (logs + 4.0) / 4.0


def windows_of(n_samples: int, window: int) -> list[tuple[int, int]]:
    """[start, end) of the consecutive `window`-sample pieces of an utterance (the last may be shorter)."""
    return [(s, min(s + window, n_samples)) for s in range(0, max(n_samples, 1), window)]


# ----------------------------------------------------------------------------- loading


def load_encoder(source: str, *, weights: bool = True):
    """(WhisperEncoder in float32, WhisperFeatureExtractor) of a Whisper checkpoint.

    `weights=False` builds the architecture from the config only (predict
    rebuilds a fine-tuned encoder, then loads its saved weights over it).
    """
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel
    from transformers.models.whisper.modeling_whisper import WhisperEncoder
    from transformers.utils import logging as hf_logging

    try:
        config = WhisperConfig.from_pretrained(source)
    except Exception as exc:
        raise BackendError(f"cannot load model {source!r}: {first_line(exc)}") from None
    try:
        fe = WhisperFeatureExtractor.from_pretrained(source)
    except Exception as exc:
        raise BackendError(
            f"{source!r} has no usable feature-extractor config (preprocessor_config.json): {first_line(exc)}"
        ) from None
    if fe.sampling_rate != SAMPLE_RATE:
        raise BackendError(f"{source!r} expects {fe.sampling_rate} Hz audio; only 16 kHz models are supported")
    if fe.feature_size != config.num_mel_bins or fe.nb_max_frames != 2 * config.max_source_positions:
        raise BackendError(f"{source!r}: its feature extractor ({fe.feature_size} mel bins, {fe.nb_max_frames} "
                           f"frames) does not fit the model ({config.num_mel_bins} bins, "
                           f"{2 * config.max_source_positions} frames)")
    if not weights:
        return WhisperEncoder(config).float(), fe
    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        # float32 whatever the checkpoint's dtype (hub Whisper weights are float16):
        # autocast chooses the compute precision, not the file.
        whisper, info = WhisperModel.from_pretrained(source, dtype=torch.float32, output_loading_info=True)
    except Exception as exc:
        raise BackendError(f"cannot load model {source!r}: {first_line(exc)}") from None
    finally:
        if was_on:
            hf_logging.enable_progress_bar()
    missing = [k for k in info.get("missing_keys", ()) if k.startswith("encoder.")]
    if missing:
        raise BackendError(f"{source!r} lacks encoder weights ({', '.join(sorted(missing)[:3])} ...); "
                           "refusing to use randomly initialized layers")
    encoder = whisper.get_encoder()
    del whisper  # the decoder is not needed (large-v3: ~0.9 GB)
    _check_conv_stack(encoder, source)
    return encoder, fe


def _check_conv_stack(encoder: torch.nn.Module, source: str) -> None:
    """The grid above assumes Whisper's conv front end; a variant with other strides would misalign masks."""
    shape = [(c.kernel_size[0], c.stride[0], c.padding[0]) for c in (encoder.conv1, encoder.conv2)]
    if shape != [(3, 1, 1), (3, 2, 1)]:
        raise BackendError(f"{source!r}: unexpected Whisper conv front end {shape}; the frame grid would be wrong")


# ----------------------------------------------------------------------------- the backend


class WhisperBackend:
    """A Whisper encoder: all hidden states of every real frame (see the module docstring)."""

    def __init__(self, model: str, *, layers: Sequence[int] | None = None, device: str = "auto",
                 dtype: str = "auto", windows_per_forward: int | None = None) -> None:
        self.name = model
        self.device = resolve_device(device, error=BackendError)
        self.autocast_dtype = autocast_dtype(dtype, self.device, error=BackendError)
        encoder, fe = load_encoder(model)
        self.encoder = encoder.eval()
        self.config = encoder.config
        self.n_fft, self.hop = int(fe.n_fft), int(fe.hop_length)
        self.window_samples = int(fe.n_samples)  # 480000: 30 s
        self.mel_filters = torch.from_numpy(np.asarray(fe.mel_filters, dtype=np.float32))  # (F, M)
        self.grid = whisper_grid(self.n_fft, self.hop)
        self.frames_per_window = self.window_samples // self.grid.stride  # 1500
        self.layers = check_layers(layers, self.config.encoder_layers + 1, model)
        self.n_layers = len(self.layers)
        self.hidden_size = int(self.config.d_model)
        self.weights_sha256 = state_dict_sha256(self.encoder)  # the encoder only: the decoder makes no feature
        self.encoder.to(self.device)
        for p in self.encoder.parameters():
            p.requires_grad_(False)
        # Every window costs the same; more per forward only fills a GPU better.
        self.windows_per_forward = windows_per_forward or (8 if self.device.type == "cuda" else 1)

    def describe(self) -> dict:
        return {
            "backend": "whisper",
            "model": self.name,
            "model_type": "whisper",
            "revision": getattr(self.config, "_commit_hash", None) or "",
            "weights_sha256": self.weights_sha256,
            "layers": list(self.layers),
            "n_layers": self.n_layers,
            "hidden_size": self.hidden_size,
            "n_mels": int(self.config.num_mel_bins),
            "window_seconds": self.window_samples / SAMPLE_RATE,
            "padding": "every utterance zero-padded to the model's 30 s window (no attention mask)",
            "long_audio": "consecutive 30 s windows, encoded alone, frames concatenated",
            "last_layer": "last_hidden_state (after the encoder's final layer_norm)",
            "compute_dtype": str(self.autocast_dtype or torch.float32).removeprefix("torch."),
            **self.grid.as_dict(),
        }

    def n_frames(self, n_samples: Sequence[int]) -> list[int]:
        """The model's own count: mel frames whose hop-sampled attention mask is 1, through the conv lengths."""
        mel = torch.tensor([math.ceil(n / self.hop) for n in n_samples])
        return [int(t) if n else 0 for t, n in zip(self.encoder._get_feat_extract_output_lengths(mel), n_samples)]

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """(W, M, 3000) log-mel -> (W, 1500, L, D) selected hidden states; differentiable, caller sets the mode."""
        out = self.encoder(mel, output_hidden_states=True)
        states = list(out.hidden_states)  # (L_all) x (W, 1500, D)
        if len(states) != self.config.encoder_layers + 1:
            raise RuntimeError(f"the encoder returned {len(states)} hidden states, expected "
                               f"{self.config.encoder_layers + 1}")
        states[-1] = out.last_hidden_state  # after the final layer norm, whatever the transformers version
        return torch.stack([states[i] for i in self.layers], dim=2)  # (W, 1500, L, D)

    def __call__(self, waves: list[np.ndarray]) -> list[np.ndarray]:
        """(N_i,) float32 16 kHz waves -> (T_i, L, D) float32 with T_i = ceil(N_i / 320) = grid.n_frames(N_i)."""
        pieces = [(i, w[a:b]) for i, w in enumerate(waves) for a, b in windows_of(len(w), self.window_samples)]
        parts: list[list[np.ndarray]] = [[] for _ in waves]
        k = self.windows_per_forward
        for s in range(0, len(pieces), k):
            group = pieces[s : s + k]
            for (i, _), feats in zip(group, self._encode([p for _, p in group])):
                parts[i].append(feats)
        out = [np.concatenate(p) if len(p) > 1 else p[0] for p in parts]
        for w, f in zip(waves, out):
            assert f.shape[0] == self.grid.n_frames(len(w)), (f.shape, len(w))
        return out

    def _encode(self, pieces: list[np.ndarray]) -> list[np.ndarray]:
        """Up to windows_per_forward pieces of <= 30 s -> (T_j, L, D) each, the padding frames cut off."""
        values = np.zeros((len(pieces), self.window_samples), dtype=np.float32)  # (W, S)
        for j, p in enumerate(pieces):
            values[j, : len(p)] = p
        frames = [self.grid.n_frames(len(p)) for p in pieces]
        with torch.inference_mode():
            mel = log_mel(torch.from_numpy(values).to(self.device), self.mel_filters, self.n_fft, self.hop)
            with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                                enabled=self.autocast_dtype is not None):
                feats = self.forward(mel)[:, : max(frames)]  # (W, T_max, L, D)
            feats = feats.float().cpu().numpy()
        return [np.ascontiguousarray(feats[j, :t]) for j, t in enumerate(frames)]


# ----------------------------------------------------------------------------- a tiny test model


def tiny_whisper(path: str | Path, *, seed: int = 0) -> Path:
    """Save an untrained 2-layer Whisper (d_model 32) and its feature-extractor config to `path`.

    Real Whisper's input and grid (80 mel bins, 30 s window, 1500 frames, the
    same conv strides); only the widths are small, so a 30 s window takes a few
    milliseconds. The decoder is one tiny layer: WhisperModel needs one.
    """
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    path = Path(path)
    config = WhisperConfig(
        vocab_size=64, num_mel_bins=80, d_model=32, encoder_layers=2, encoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=64,
        max_source_positions=1500, max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        decoder_start_token_id=3, suppress_tokens=[], begin_suppress_tokens=[],
    )
    torch.manual_seed(seed)
    WhisperModel(config).save_pretrained(path)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(path)
    return path


__all__ = ["WhisperBackend", "load_encoder", "log_mel", "tiny_whisper", "whisper_grid", "windows_of"]
