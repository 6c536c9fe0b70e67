"""`cli predict`: a trained fold on new audio files -> emotion probabilities, valence, arousal, speech ratio.

Works for both kinds of run folder:
- head-only (`cli train-head`): features are re-extracted with the model the
  cache's fingerprint (in RUN/config.json) names, the same hidden-state
  layers, and rounded to the cache's storage dtype (float16) as training saw
  them; the backend is `extract.backends.load_backend`, the extractor's own;
- fine-tuned (`cli finetune`): the backbone is rebuilt from
  `fold-KK/backbone/` + `fold-KK/model.safetensors` (--full), or from the base
  model with the trained top-K layers loaded over it.

Long files follow the training rule: the first `max_seconds` seconds (19 s
for IEMOCAP runs, 16 s for KEMDy19, none for manifest corpora) are used and
the rest is ignored; the result says `truncated`. Truncation rather than
chunk-and-average keeps an utterance's prediction identical to the one in the
fold's predictions.csv, and the head was never trained on longer inputs.

Each file is predicted alone (no padding). A file that cannot be read is
reported with its reason and the others go on.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch

from extract.audio import AudioError, load_audio
from extract.errors import UserError
from extract.frames import FrameGrid
from extract.vad import speech_ratio, vad_masks
from heads.checkpoint import load_weights
from heads.head import SERHead


class PredictError(UserError):
    """A run folder that cannot be used for prediction."""


@dataclass
class Prediction:
    path: str
    ok: bool
    error: str = ""
    emotion: str = ""
    probs: dict[str, float] = field(default_factory=dict)
    valence: float = math.nan  # on the labels' original scale (e.g. 1-5)
    arousal: float = math.nan
    speech_ratio: float = math.nan  # fraction of frames the VAD (the run's mode) called speech
    seconds: float = math.nan  # audio used (after truncation)
    truncated: bool = False

    def as_dict(self) -> dict:
        d = asdict(self)
        for k in ("valence", "arousal", "speech_ratio", "seconds"):
            if isinstance(d[k], float) and not math.isfinite(d[k]):
                d[k] = None
        return d


def read_run_config(fold_dir: Path) -> dict:
    path = fold_dir.parent / "config.json"
    if not (fold_dir / "head.safetensors").is_file():
        raise PredictError(f"{fold_dir} is not a trained fold folder (no head.safetensors); give RUN/fold-KK")
    if not path.is_file():
        raise PredictError(f"{path} is missing: --run must be a fold folder inside a run folder")
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise PredictError(f"{path} is not valid JSON") from None


class Predictor:
    """One fold's model, ready to predict files one at a time."""

    def __init__(self, fold_dir: str | Path, *, device: str = "cpu") -> None:
        self.fold_dir = Path(fold_dir)
        cfg = read_run_config(self.fold_dir)
        self.config = cfg
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   ("cpu" if device == "auto" else device))
        settings = cfg["settings"]
        self.classes: list[str] = list(cfg["classes"])
        self.vad_mode = int(settings["vad_mode"])
        self.head = SERHead(int(cfg["hidden_size"]), len(cfg["layers"]), len(self.classes),
                            pooling=settings["pooling"], proj_dim=int(settings["proj_dim"]),
                            heads=int(settings["heads"]), dropout=float(settings["dropout"]),
                            norm=str(settings.get("norm", "none")))  # runs before --norm stored no statistics
        self.head.load_state_dict(load_weights(self.fold_dir / "head.safetensors"))
        self.head.to(self.device).eval()
        if str(cfg.get("mode", "")).startswith("finetune"):
            self.encoder: _Encoder = _FinetunedEncoder(self.fold_dir, cfg, self.device)
        else:
            self.encoder = _CachedModelEncoder(cfg, self.device)

    @property
    def max_seconds(self) -> float:
        return self.encoder.max_seconds

    def predict(self, paths: Sequence[str | Path]) -> list[Prediction]:
        return [self.predict_one(p) for p in paths]

    @torch.no_grad()
    def predict_one(self, path: str | Path) -> Prediction:
        try:
            audio = load_audio(path, max_seconds=self.max_seconds)
        except AudioError as err:
            return Prediction(path=str(path), ok=False, error=str(err))
        feats = self.encoder(audio.samples)  # (1, T, L, D) or (1, T, D)
        t = feats.shape[1]
        vad = vad_masks(audio.samples, self.encoder.grid)[self.vad_mode]  # (T,)
        if len(vad) != t:
            raise RuntimeError(f"{path}: {t} feature frames but {len(vad)} VAD frames")
        padding = torch.ones(1, t, dtype=torch.bool, device=self.device)  # (1, T)
        vad_t = torch.from_numpy(vad)[None].to(self.device)  # (1, T)
        out = self.head(feats, padding, vad_t)
        probs = torch.softmax(out.logits.float(), dim=1)[0].cpu().numpy()  # (C,)
        va = self.head.to_corpus_scale(out.va.float())[0].cpu().numpy()  # (2,)
        return Prediction(
            path=str(path), ok=True, emotion=self.classes[int(probs.argmax())],
            probs={c: float(p) for c, p in zip(self.classes, probs)},
            valence=float(va[0]), arousal=float(va[1]), speech_ratio=speech_ratio(vad),
            seconds=len(audio.samples) / 16_000, truncated=audio.truncated,
        )


class _Encoder(Protocol):
    """Audio (N,) -> the head's input features on the device."""

    grid: FrameGrid
    max_seconds: float

    def __call__(self, samples: np.ndarray) -> torch.Tensor: ...


class _CachedModelEncoder:
    """Head-only runs: the extractor's backend, the cached layers, the cache's rounding."""

    def __init__(self, cfg: dict, device: torch.device) -> None:
        from extract.backends import load_backend

        fp = cfg.get("fingerprint") or {}
        if "model" not in fp:
            raise PredictError("RUN/config.json records no feature model (fingerprint.model); cannot re-extract")
        compute = fp.get("compute_dtype", "float32") if device.type == "cuda" else "float32"
        self.backend = load_backend(fp["model"], layers=list(cfg["layers"]), device=str(device), dtype=compute)
        self.grid = self.backend.grid
        self.max_seconds = float(fp.get("max_seconds") or 0.0)
        self.storage = torch.float16 if fp.get("dtype", "float16") == "float16" else torch.float32
        self.device = device

    def __call__(self, samples: np.ndarray) -> torch.Tensor:
        feats = self.backend([samples])[0]  # (T, L, D) float32
        x = torch.from_numpy(feats).to(self.storage).float()  # what the cache held
        return x[None].to(self.device)  # (1, T, L, D)


class _FinetunedEncoder:
    """Fine-tuned runs: the trained backbone, last hidden state."""

    def __init__(self, fold_dir: Path, cfg: dict, device: torch.device) -> None:
        from heads.backbone import BackboneSettings, load_backbone

        ft = cfg["finetune"]
        weights = load_weights(fold_dir / "model.safetensors")
        settings = BackboneSettings(model=ft["model"], full=bool(ft["full"]), top_layers=int(ft["top_layers"]),
                                    freeze_feature_encoder=True, grad_checkpointing=False)
        if settings.full:
            cfg_dir = fold_dir / "backbone"
            if not (cfg_dir / "config.json").is_file():
                raise PredictError(f"{cfg_dir} is missing: this fine-tuned fold cannot be rebuilt")
            backbone = load_backbone(settings, from_config_dir=cfg_dir)
            backbone.model.load_state_dict(weights, strict=True)
        else:
            backbone = load_backbone(settings)  # the base model; the trained layers go over it
            result = backbone.model.load_state_dict(weights, strict=False)
            if result.unexpected_keys:
                raise PredictError(f"{fold_dir / 'model.safetensors'} does not fit {ft['model']} "
                                   f"(unexpected {result.unexpected_keys[:3]})")
        self.backbone = backbone.to(device).eval()
        self.grid = backbone.grid
        self.max_seconds = float(ft["max_seconds"] or 0.0)
        self.device = device

    def __call__(self, samples: np.ndarray) -> torch.Tensor:
        waves = torch.from_numpy(samples)[None].to(self.device)  # (1, N)
        mask = torch.ones_like(waves, dtype=torch.bool)  # (1, N)
        hidden, _ = self.backbone(waves, mask)  # (1, T, D)
        return hidden.float()


def format_line(p: Prediction) -> str:
    """One human-readable line per file."""
    if not p.ok:
        return f"{p.path}: error: {p.error}"
    probs = " ".join(f"{c} {v:.3f}" for c, v in p.probs.items())
    cut = " (truncated)" if p.truncated else ""
    return (f"{p.path}: {p.emotion}  [{probs}]  valence {p.valence:.2f}  arousal {p.arousal:.2f}  "
            f"speech {100 * p.speech_ratio:.0f}%  {p.seconds:.1f} s{cut}")
