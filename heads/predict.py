"""`cli predict`: a trained fold (or all folds of a run) on new audio -> emotion probabilities, valence, arousal.

Only what the head learned is reported (heads.runfolder): a fold trained without
valence/arousal labels gives no valence/arousal, in lines, JSON and
predictions.csv alike.

`--run RUN/fold-KK` predicts with that fold (the mean of its heads when it was
trained with `--ensemble N`); `--run RUN` with every trained
fold of the run (`Ensemble`): class probabilities and valence/arousal are the
mean over folds, the emotion the argmax of the mean. A file that is one of
the run's corpus utterances (same resolved path; or, failing that, a file
name equal to exactly one utterance id) is flagged with the folds whose
training or validation split held it (`seen_in_training`): those predictions
are optimistic. Runs record their utterances in RUN/utterances.csv.

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

Long recordings (`--segments`, `predict_segments`, `write_segments`): the file
is streamed in blocks, cut into speech segments by the run's WebRTC VAD mode
under a documented rule (extract/segments.py), and each segment is predicted
as `predict_array` predicts those samples; rows go to segments.csv as they
are made, so memory does not grow with the recording's length.
"""

from __future__ import annotations

import abc
import csv
import math
import os
import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

import numpy as np
import torch

from core.devices import resolve_device
from core.errors import UserError
from core.folds import folds_from_config
from core.frames import SAMPLE_RATE, FrameGrid
from extract.audio import AudioError, AudioStream, load_audio
from extract.segments import SegmentRule, segments
from extract.vad import speech_ratio, vad_masks
from heads.model.head import SERHead
from heads.runfolder import (
    BACKBONE_DIR,
    BACKBONE_FILE,
    BASELINE_FILE,
    CONFIG_FILE,
    OUTPUTS,
    SEGMENTS_FILE,
    TIMELINE_PLOT,
    backbone_config,
    fold_number,
    fold_outputs,
    head_file,
    head_fold_dirs,
    is_baseline_fold,
    is_head_fold,
    is_run_dir,
    load_weights,
    member_files,
    read_config,
    read_metrics,
    read_run_utterances,
    settings_value,
)
from heads.train.baseline import LinearModel, utterance_statistics


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
    outputs: tuple[str, ...] = OUTPUTS  # what the head learned; the others are left out of as_dict/format_line
    utt_id: str = ""  # the run's utterance this file is, if any
    seen_in_training: list[int] = field(default_factory=list)  # folds whose train/val split held it

    def as_dict(self) -> dict:
        d = asdict(self)
        for k in ("valence", "arousal", "speech_ratio", "seconds"):
            if isinstance(d[k], float) and not math.isfinite(d[k]):
                d[k] = None
        d["outputs"] = list(self.outputs)
        drop = ({"emotion", "probs"} if "emotion" not in self.outputs else set()) | \
            {k for k in ("valence", "arousal") if k not in self.outputs}
        if not self.utt_id:
            drop |= {"utt_id", "seen_in_training"}
        return {k: v for k, v in d.items() if k not in drop}


def read_run_config(fold_dir: Path) -> dict:
    """RUN/config.json, checked for what prediction reads from it (a one-line PredictError otherwise)."""
    path = fold_dir.parent / CONFIG_FILE
    if not is_head_fold(fold_dir):
        raise PredictError(f"{fold_dir} is not a trained fold folder (no {head_file(1)}); give RUN/fold-KK")
    if not path.is_file():
        raise PredictError(f"{path} is missing: --run must be a fold folder inside a run folder")
    try:
        cfg = read_config(fold_dir.parent)
    except UserError as err:
        raise PredictError(str(err)) from None
    problem = _config_problem(cfg)
    if problem:
        raise PredictError(f"{path} is not a usable run configuration: {problem}")
    return cfg


def _config_problem(cfg: object) -> str | None:
    if not isinstance(cfg, dict):
        return f"a JSON {type(cfg).__name__}, not an object"
    settings = cfg.get("settings")
    if not isinstance(settings, dict):
        return "no 'settings'"
    for key, kind in (("vad_mode", int), ("pooling", str), ("proj_dim", int), ("heads", int), ("dropout", (int, float))):
        if not isinstance(settings.get(key), kind) or isinstance(settings.get(key), bool):
            return f"settings.{key} is {settings.get(key)!r}"
    classes, layers, hidden = cfg.get("classes"), cfg.get("layers"), cfg.get("hidden_size")
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        return f"classes is {classes!r}"
    if not (isinstance(layers, list) and layers):
        return f"layers is {layers!r}"
    if not (isinstance(hidden, int) and hidden > 0):
        return f"hidden_size is {hidden!r}"
    return None


def load_head(head: SERHead, path: Path) -> dict[str, torch.Tensor]:
    """The fold's weights into `head` (and returned); a torn, foreign or mismatched file is one PredictError."""
    try:
        weights = load_weights(path)
    except Exception as err:  # noqa: BLE001 - SafetensorError and friends: a damaged file, not a bug
        raise PredictError(f"{path} cannot be read ({type(err).__name__}: {_first_line(err)}); "
                           "it is damaged or not a safetensors file") from None
    try:
        head.load_state_dict(weights)
    except RuntimeError as err:
        raise PredictError(f"{path} does not fit the head RUN/{CONFIG_FILE} describes ({_first_line(err)})") from None
    return weights


def fold_head_files(fold_dir: Path) -> list[str]:
    """The fold's head files: one, plus the other members' of an --ensemble fold."""
    metrics = read_metrics(fold_dir)
    names = member_files(metrics) if isinstance(metrics, dict) else [head_file(1)]  # older/unfinished: its one head
    missing = [n for n in names if not (fold_dir / n).is_file()]
    if missing:
        raise PredictError(f"{fold_dir} is an ensemble of {len(names)} heads but {', '.join(missing)} is missing; "
                           "train the fold again")
    return names


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return " ".join(lines[:2])[:200]


class _Predicts(abc.ABC):
    """What a fold's Predictor and a run's Ensemble share: files and arrays read and truncated as the
    run's training read its audio, scored by `_predict`, flagged when a fold trained on them."""

    classes: list[str]
    outputs: tuple[str, ...]
    seen: TrainingSets

    @property
    @abc.abstractmethod
    def max_seconds(self) -> float:
        """The longest audio the run trained on (longer input is truncated the same way)."""

    @abc.abstractmethod
    def _predict(self, name: str, samples: np.ndarray, truncated: bool, utt_id: str) -> Prediction:
        """One utterance's prediction from its 16 kHz samples."""

    def predict(self, paths: Sequence[str | Path]) -> list[Prediction]:
        return [self.predict_one(p) for p in paths]

    def predict_one(self, path: str | Path) -> Prediction:
        """A file, read and truncated as the run's training read its audio."""
        try:
            audio = load_audio(path, max_seconds=self.max_seconds)
        except AudioError as err:
            return Prediction(path=str(path), ok=False, error=str(err))
        return self._predict(str(path), audio.samples, audio.truncated, self.seen.match(path))

    def predict_array(self, samples: np.ndarray, sample_rate: int = SAMPLE_RATE, name: str = "<array>") -> Prediction:
        """(N,) or (N, channels) audio at `sample_rate` -> a Prediction (channels averaged, resampled to 16 kHz)."""
        try:
            wave, truncated = prepare_array(samples, sample_rate, self.max_seconds)
        except PredictError as err:
            return Prediction(path=name, ok=False, error=str(err))
        return self._predict(name, wave, truncated, "")

    def predict_segments(self, path: str | Path, rule: SegmentRule | None = None) -> Iterator[SegmentPrediction]:
        """The speech segments of a long recording (`rule`, extract/segments.py), each predicted as soon as
        the stream has passed it; see `predict_segments`."""
        return predict_segments(self, path, rule)

    def _speech(self, samples: np.ndarray, n_frames: int) -> np.ndarray:
        """(T,) bool: the run's VAD mode's mask of 16 kHz samples on the encoder's frame grid (T = n_frames)."""
        vad = vad_masks(samples, self.encoder.grid)[self.vad_mode]  # (T,)
        if len(vad) != n_frames:
            raise RuntimeError(f"{n_frames} feature frames but {len(vad)} VAD frames")
        return vad

    def _prediction(self, name: str, samples: np.ndarray, truncated: bool, utt_id: str, probs: np.ndarray,
                    va: np.ndarray, ratio: float, folds: Sequence[int]) -> Prediction:
        """probs (C,) and valence/arousal (2,) as a Prediction; `folds` are the ones whose training saw utt_id."""
        seen = [k for k in folds if utt_id and self.seen.role(utt_id, k) in ("train", "val")]
        return Prediction(
            path=name, ok=True, emotion=self.classes[int(probs.argmax())],
            probs={c: float(p) for c, p in zip(self.classes, probs)}, valence=float(va[0]), arousal=float(va[1]),
            speech_ratio=ratio, seconds=len(samples) / SAMPLE_RATE, truncated=truncated,
            outputs=self.outputs, utt_id=utt_id, seen_in_training=seen,
        )


class Predictor(_Predicts):
    """One fold's model, ready to predict files (or arrays) one at a time."""

    def __init__(self, fold_dir: str | Path, *, device: str = "cpu", encoder: "_Encoder | None" = None,
                 seen: "TrainingSets | None" = None) -> None:
        self.fold_dir = Path(fold_dir)
        cfg = read_run_config(self.fold_dir)
        self.config = cfg
        self.device = resolve_device(device)
        settings = cfg["settings"]
        self.classes: list[str] = list(cfg["classes"])
        self.vad_mode = int(settings["vad_mode"])
        self.heads: list[SERHead] = []  # one, or an --ensemble's members (outputs averaged)
        for name in fold_head_files(self.fold_dir):
            head = SERHead(int(cfg["hidden_size"]), len(cfg["layers"]), len(self.classes),
                           pooling=settings["pooling"], proj_dim=int(settings["proj_dim"]),
                           heads=int(settings["heads"]), dropout=float(settings["dropout"]),
                           norm=str(settings_value(settings, "norm")),  # runs before --norm stored no statistics
                           spread=bool(settings_value(settings, "spread")),
                           speech_stats=bool(settings_value(settings, "speech_stats")),
                           pooled_norm=str(settings_value(settings, "pooled_norm")))
            state = load_head(head, self.fold_dir / name)
            self.heads.append(head.to(self.device).eval())
            if len(self.heads) == 1:
                self.outputs: tuple[str, ...] = tuple(fold_outputs(self.fold_dir, state))
        self.head = self.heads[0]  # member 1: the fold's only head without --ensemble
        self.fold = fold_number(self.fold_dir) or 0
        self.seen = seen or TrainingSets(self.fold_dir.parent, cfg)  # an ensemble's folds share one
        try:
            if encoder is not None:
                self.encoder: _Encoder = encoder
            elif str(cfg.get("mode", "")).startswith("finetune"):
                self.encoder = _FinetunedEncoder(self.fold_dir, cfg, self.device)
            else:
                self.encoder = _CachedModelEncoder(cfg, self.device)
        except pickle.UnpicklingError as err:  # torch.load(weights_only=True) refused a pickle
            raise PredictError(f"the model of {self.fold_dir} holds a pickled file that is not plain weights; "
                               f"it was not loaded, since loading it could run code ({_first_line(err)[:80]})") from None

    @property
    def max_seconds(self) -> float:
        return self.encoder.max_seconds

    def _predict(self, name: str, samples: np.ndarray, truncated: bool, utt_id: str) -> Prediction:
        probs, va, ratio = self.scores(samples)
        return self._prediction(name, samples, truncated, utt_id, probs, va, ratio, [self.fold])

    @torch.no_grad()
    def scores(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """16 kHz samples (N,) -> class probabilities (C,), valence/arousal (2,) on the corpus scale, speech ratio."""
        feats = self.encoder(samples)  # (1, T, L, D) or (1, T, D)
        t = feats.shape[1]
        vad = self._speech(samples, t)  # (T,)
        padding = torch.ones(1, t, dtype=torch.bool, device=self.device)  # (1, T)
        vad_t = torch.from_numpy(vad)[None].to(self.device)  # (1, T)
        probs, va = [], []
        for head in self.heads:
            out = head(feats, padding, vad_t)
            probs.append(torch.softmax(out.logits.float(), dim=1)[0].cpu().numpy())  # (C,)
            va.append(head.to_corpus_scale(out.va.float())[0].cpu().numpy())  # (2,)
        return np.mean(probs, axis=0), np.mean(va, axis=0), speech_ratio(vad)


class Ensemble(_Predicts):
    """Every trained fold of a run: probabilities and valence/arousal averaged over the folds.

    Head-only runs share one feature extractor (all folds read the same cache);
    fine-tuned runs run each fold's own backbone. Reported outputs are those
    every fold learned.
    """

    def __init__(self, run_dir: str | Path, *, device: str = "cpu") -> None:
        self.run_dir = Path(run_dir)
        folds = head_fold_dirs(self.run_dir)
        if not folds:
            raise PredictError(f"{self.run_dir} holds no trained fold (no fold-KK/{head_file(1)})")
        first = Predictor(folds[0], device=device)
        shared = None if str(first.config.get("mode", "")).startswith("finetune") else first.encoder
        self.members = [first] + [Predictor(f, device=device, encoder=shared, seen=first.seen) for f in folds[1:]]
        self.classes = first.classes
        self.vad_mode = first.vad_mode  # a run's folds share its settings
        self.outputs: tuple[str, ...] = tuple(o for o in OUTPUTS if all(o in m.outputs for m in self.members))
        self.seen = first.seen
        self.folds = [m.fold for m in self.members]

    @property
    def max_seconds(self) -> float:
        return self.members[0].max_seconds

    def _predict(self, name: str, samples: np.ndarray, truncated: bool, utt_id: str) -> Prediction:
        scored = [m.scores(samples) for m in self.members]
        probs = np.mean([p for p, _, _ in scored], axis=0)  # (C,)
        va = np.mean([v for _, v, _ in scored], axis=0)  # (2,)
        return self._prediction(name, samples, truncated, utt_id, probs, va, scored[0][2], self.folds)


def load_predictor(path: str | Path, *, device: str = "cpu") -> Any:
    """A fold folder (RUN/fold-KK) -> its Predictor (a BaselinePredictor for a `cli baseline` fold);
    a run folder (RUN) -> the Ensemble of its trained folds."""
    path = Path(path)
    if is_baseline_fold(path):
        return BaselinePredictor(path, device=device)
    if is_head_fold(path):
        return Predictor(path, device=device)
    if is_run_dir(path):
        return Ensemble(path, device=device)
    raise PredictError(f"{path} is neither a trained fold folder (RUN/fold-KK with {head_file(1)}) "
                       f"nor a run folder (RUN with {CONFIG_FILE})")


def prepare_array(samples: np.ndarray, sample_rate: int, max_seconds: float) -> tuple[np.ndarray, bool]:
    """Audio as an array -> (16 kHz mono float32 in [-1, 1], truncated), as `load_audio` treats files."""
    import soxr

    from extract.audio import MIN_SECONDS, RESAMPLE_QUALITY

    x = np.asarray(samples, dtype=np.float32)
    if x.ndim == 2:
        x = x.mean(axis=1, dtype=np.float32)  # (N, C) -> (N,)
    if x.ndim != 1 or not len(x):
        raise PredictError(f"expected audio of shape (N,) or (N, channels), got {np.shape(samples)}")
    if not np.isfinite(x).all():
        raise PredictError("the audio contains NaN or inf")
    if sample_rate != SAMPLE_RATE:
        x = soxr.resample(x, sample_rate, SAMPLE_RATE, quality=RESAMPLE_QUALITY).astype(np.float32, copy=False)
    truncated = max_seconds > 0 and len(x) > round(max_seconds * SAMPLE_RATE)
    if truncated:
        x = x[: round(max_seconds * SAMPLE_RATE)]
    x = np.clip(x, -1.0, 1.0)
    if len(x) < MIN_SECONDS * SAMPLE_RATE or not x.any():
        raise PredictError(f"the audio is too short (< {MIN_SECONDS * 1000:.0f} ms) or silent")
    return np.ascontiguousarray(x), bool(truncated)


class TrainingSets:
    """Which folds of a run trained or validated on an utterance, and which utterance a file is."""

    def __init__(self, run_dir: Path, cfg: dict) -> None:
        self.folds = {f.fold: f for f in folds_from_config(cfg)}
        self.utts = read_run_utterances(run_dir)  # None: a run made before utterances.csv existed
        self.by_path: dict[str, str] = {}
        self.by_name: dict[str, list[str]] = {}
        if self.utts is not None:
            for utt_id, p in zip(self.utts.index, self.utts["path"]):
                self.by_path.setdefault(os.path.realpath(p), utt_id)
                self.by_name.setdefault(utt_id.rsplit("/", 1)[-1], []).append(utt_id)

    def match(self, path: str | Path) -> str:
        """The run utterance this file is: same resolved path, else a file name equal to one utterance id."""
        if self.utts is None:
            return ""
        hit = self.by_path.get(os.path.realpath(path))
        if hit:
            return hit
        named = self.by_name.get(Path(path).stem, [])
        return named[0] if len(named) == 1 else ""

    def role(self, utt_id: str, fold: int) -> str:
        """"train", "val", "test" or "" for utterance `utt_id` in fold `fold`."""
        f = self.folds.get(fold)
        if f is None or self.utts is None or utt_id not in self.utts.index:
            return ""
        return f.role(str(self.utts.at[utt_id, f.column]))


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
            raise PredictError(f"RUN/{CONFIG_FILE} records no feature model (fingerprint.model); cannot re-extract")
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
        from heads.finetune.backbone import BackboneSettings, load_backbone

        ft = cfg.get("finetune")
        if not isinstance(ft, dict) or not {"model", "full", "top_layers", "max_seconds"} <= set(ft):
            raise PredictError(f"{fold_dir.parent / CONFIG_FILE} has no usable 'finetune' settings")
        try:
            weights = load_weights(fold_dir / BACKBONE_FILE)
        except PredictError:
            raise
        except Exception as err:  # noqa: BLE001 - a damaged weights file
            raise PredictError(f"{fold_dir / BACKBONE_FILE} cannot be read ({type(err).__name__}); "
                               "it is damaged or not a safetensors file") from None
        settings = BackboneSettings(model=ft["model"], full=bool(ft["full"]), top_layers=int(ft["top_layers"]),
                                    freeze_feature_encoder=True, grad_checkpointing=False)
        if settings.full:
            cfg_dir = fold_dir / BACKBONE_DIR
            if not backbone_config(fold_dir).is_file():
                raise PredictError(f"{cfg_dir} is missing: this fine-tuned fold cannot be rebuilt")
            backbone = load_backbone(settings, from_config_dir=cfg_dir)
            try:
                backbone.model.load_state_dict(weights, strict=True)
            except RuntimeError as err:
                raise PredictError(f"{fold_dir / BACKBONE_FILE} does not fit {cfg_dir} "
                                   f"({_first_line(err)})") from None
        else:
            backbone = load_backbone(settings)  # the base model; the trained layers go over it
            result = backbone.model.load_state_dict(weights, strict=False)
            if result.unexpected_keys:
                raise PredictError(f"{fold_dir / BACKBONE_FILE} does not fit {ft['model']} "
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
    """One human-readable line per file, with only the outputs the head learned."""
    if not p.ok:
        return f"{p.path}: error: {p.error}"
    parts = []
    if "emotion" in p.outputs:
        parts.append(f"{p.emotion}  [{' '.join(f'{c} {v:.3f}' for c, v in p.probs.items())}]")
    parts += [f"{d} {getattr(p, d):.2f}" for d in ("valence", "arousal") if d in p.outputs]
    cut = " (truncated)" if p.truncated else ""
    parts.append(f"speech {100 * p.speech_ratio:.0f}%  {p.seconds:.1f} s{cut}")
    return f"{p.path}: " + "  ".join(parts)


def seen_warning(p: Prediction) -> str | None:
    """The warning for a file some fold trained on (None otherwise)."""
    if not p.ok or not p.seen_in_training:
        return None
    folds = ", ".join(str(k) for k in p.seen_in_training)
    return (f"warning: {p.path} is utterance {p.utt_id} of this run's corpus, in the training or validation "
            f"split of fold {folds}: that prediction is optimistic")


class BaselinePredictor(_Predicts):
    """`cli predict` on a baseline fold: features re-extracted as the cache made them (the extractor's
    backend, the cached layers, the storage dtype's rounding), the same statistics, the saved linear model."""

    def __init__(self, fold_dir: str | Path, *, device: str = "cpu") -> None:
        self.fold_dir = Path(fold_dir)
        try:
            cfg = read_config(self.fold_dir.parent)
        except UserError:
            raise PredictError(f"{self.fold_dir.parent / CONFIG_FILE} is missing or not valid JSON: --run must be a "
                               "fold folder inside a run folder") from None
        settings = cfg.get("settings", {})
        self.classes: list[str] = list(cfg["classes"])
        self.statistics, self.frames = settings["statistics"], settings["frames"]
        self.vad_mode = int(settings["vad_mode"])
        self.model = LinearModel.load(self.fold_dir / BASELINE_FILE)
        self.outputs = tuple(fold_outputs(self.fold_dir))
        self.fold = fold_number(self.fold_dir) or 0
        self.seen = TrainingSets(self.fold_dir.parent, cfg)
        self.encoder = _CachedModelEncoder(cfg, resolve_device(device))

    @property
    def max_seconds(self) -> float:
        return self.encoder.max_seconds

    def _predict(self, name: str, samples: np.ndarray, truncated: bool, utt_id: str) -> Prediction:
        x = self.encoder(samples)[0].cpu().numpy()  # (T, L, D), the cache's values
        vad = self._speech(samples, len(x))  # (T,)
        use = vad if self.frames == "speech" and vad.any() else np.ones(len(x), dtype=bool)
        stats = utterance_statistics(x, use, self.statistics).astype(np.float32)  # as cache_statistics stores it
        probs, va = self.model.predict(stats[None])
        return self._prediction(name, samples, truncated, utt_id, probs[0], va[0], speech_ratio(vad), [self.fold])


# --- long recordings: speech segments --------------------------------------------------------


@dataclass
class SegmentPrediction:
    """One speech segment of a long recording: where it lies (seconds, padding included) and its prediction."""

    start: float
    end: float
    prediction: Prediction


def predict_segments(predictor: Any, path: str | Path, rule: SegmentRule | None = None) -> Iterator[SegmentPrediction]:
    """Stream `path` (extract.audio.AudioStream), cut it with `rule` under the run's VAD mode
    (extract.segments) and yield each segment's prediction, made by `predictor.predict_array` on the
    segment's 16 kHz samples. Raises AudioError (a UserError) at once for a file that cannot be opened."""
    rule = rule or SegmentRule()
    rule.validate()
    longest = rule.max_segment + 2 * rule.pad
    if 0 < predictor.max_seconds < longest:
        raise PredictError(f"this run truncates its input at {predictor.max_seconds:g} s, and a segment may last "
                           f"{longest:g} s (--max-segment plus twice --pad); give a --max-segment of at most "
                           f"{predictor.max_seconds - 2 * rule.pad:g}")
    stream = AudioStream(path)  # opened now: a missing or unreadable file fails before anything is written

    def predicted() -> Iterator[SegmentPrediction]:
        for seg in segments(iter(stream), rule, predictor.vad_mode):
            start, end = seg.seconds
            yield SegmentPrediction(start, end, predictor.predict_array(seg.samples, SAMPLE_RATE,
                                                                        name=f"{start:.2f}-{end:.2f} s"))

    return predicted()


def segment_columns(classes: Sequence[str], outputs: Sequence[str]) -> list[str]:
    """segments.csv's header: only the outputs the head learned."""
    emotion = ["emotion", *[f"prob_{c}" for c in classes]] if "emotion" in outputs else []
    return ["start", "end", *emotion, *[d for d in ("valence", "arousal") if d in outputs], "speech_ratio"]


def segment_row(s: SegmentPrediction, columns: Sequence[str]) -> list[str]:
    p = s.prediction
    values = {"start": f"{s.start:.3f}", "end": f"{s.end:.3f}", "emotion": p.emotion,
              "valence": f"{p.valence:.4f}", "arousal": f"{p.arousal:.4f}", "speech_ratio": f"{p.speech_ratio:.4f}",
              **{f"prob_{c}": f"{v:.6f}" for c, v in p.probs.items()}}
    return [values[c] for c in columns]


def write_segments(predictor: Any, path: str | Path, out: str | Path, rule: SegmentRule | None = None, *,
                   on_segment: Callable[[SegmentPrediction], None] | None = None) -> dict[str, Any]:
    """OUT/segments.csv (a row per segment, written and flushed as each is predicted) and OUT/timeline.png
    (drawn from the CSV once the recording has ended); returns what was done."""
    from heads.evaluate.plots import timeline_png

    rule = rule or SegmentRule()
    found = predictor.predict_segments(path, rule)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = out / SEGMENTS_FILE
    columns = segment_columns(predictor.classes, predictor.outputs)
    n = failed = 0
    speech = 0.0
    with table.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        for s in found:
            if on_segment:
                on_segment(s)
            if not s.prediction.ok:
                failed += 1
                continue
            writer.writerow(segment_row(s, columns))
            fh.flush()
            n += 1
            speech += s.end - s.start
    seconds = AudioStream(path).seconds
    plot = timeline_png(table, predictor.classes, predictor.outputs, seconds, out / TIMELINE_PLOT,
                        title=f"{Path(path).name}: {n} speech segments")
    return {"audio": str(path), "seconds": seconds, "segments": n, "segment_seconds": round(speech, 3),
            "failed": failed, "rule": asdict(rule), "vad_mode": predictor.vad_mode, "classes": list(predictor.classes),
            "outputs": list(predictor.outputs), "files": [str(table), str(plot)]}
