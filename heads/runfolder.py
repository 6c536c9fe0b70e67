"""The run folder: the only code that knows its file names and what each file holds (as cache/format.py
knows the cache's).

    RUN/
      config.json          every setting, the cache's fingerprint and content digest, classes, layers,
                           the fold plan (`run_config`); a later run into RUN must match it (`prepare_run_dir`)
      utterances.csv       every utterance the folds draw from, with the columns folds group by
      confusion.png, curves.png     `cli report`'s figures
      wave-index.npz       fine-tuning's once-per-run VAD index
      fold-KK/
        metrics.json       written last: a fold folder that has it is finished (`finished_fold`)
        predictions.csv    one row per test utterance (`write_predictions`)
        head.safetensors   the head's weights; `--ensemble N` adds head-2 ... head-N.safetensors
        history.csv        one row per epoch; history-2 ... history-N.csv for the other members
        baseline.safetensors        a `cli baseline` fold holds this instead of heads and histories
        model.safetensors + backbone/   a fine-tuned fold's backbone weights and configs
        checkpoint/        a fine-tuned fold's epoch checkpoints while it trains

    LAYERS/                `cli layers`' folder (not a run folder; it holds some)
      layers.json, layers.png      UA per layer: the probe's (and the heads') mean and 95% CI over folds
      layer-KK/            with --heads: the run folder of the head trained on layer KK alone

`cli predict --segments` writes segments.csv (one row per speech segment, as it is predicted) and
timeline.png into its own folder.

Which outputs a head learned: the classifier and each regressor train only
where the training split had labels. A fold trained on a corpus without
valence/arousal (most manifest corpora) has regressors that never saw a
target: their outputs are noise on no scale, so predictions.csv, `cli
predict` and its JSON leave them out (`trained_outputs`, recorded as
metrics.json["outputs"]; folds made before that record are read from the
head's target-scale buffers, `fold_outputs`).

Runs written before a setting existed are read with the value that reproduces
what they computed (`LEGACY_SETTINGS`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import pandas as pd

from core.errors import UserError
from core.files import replacing
from core.folds import plan

if TYPE_CHECKING:
    import torch

CONFIG_FILE = "config.json"
UTTERANCES_FILE = "utterances.csv"
CONFUSION_PLOT = "confusion.png"
CURVES_PLOT = "curves.png"
WAVE_INDEX_FILE = "wave-index.npz"
METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.csv"
BASELINE_FILE = "baseline.safetensors"
BACKBONE_FILE = "model.safetensors"
BACKBONE_DIR = "backbone"
CHECKPOINT_DIR = "checkpoint"
LAYERS_JSON = "layers.json"
LAYERS_PLOT = "layers.png"
SEGMENTS_FILE = "segments.csv"
TIMELINE_PLOT = "timeline.png"
FOLD_DIR = re.compile(r"^fold-(\d+)$")
HISTORY_COLUMNS = ("epoch", "train_loss", "val_loss", "val_ua", "val_wa", "lr")
UTTERANCE_COLUMNS = ("utt_id", "path", "speaker", "session", "split")
OUTPUTS: tuple[str, ...] = ("emotion", "valence", "arousal")


class RunFolderError(UserError):
    """A run-folder file that is missing or cannot be read."""


# --- names -------------------------------------------------------------------------------


def fold_dir(run: str | Path, k: int) -> Path:
    return Path(run) / f"fold-{k:02d}"


def layer_run_dir(layers_dir: str | Path, layer: int) -> Path:
    """`cli layers --heads`: the run folder of the head trained on one layer."""
    return Path(layers_dir) / f"layer-{layer:02d}"


def fold_number(path: str | Path) -> int | None:
    """K of a folder named fold-KK, else None."""
    m = FOLD_DIR.match(Path(path).name)
    return int(m.group(1)) if m else None


def fold_dirs(run: str | Path) -> list[tuple[int, Path]]:
    """(K, RUN/fold-KK) of every fold folder, finished or not, in fold order."""
    run = Path(run)
    found = [(fold_number(d), d) for d in run.iterdir() if d.is_dir() and fold_number(d) is not None]
    return sorted(found)  # type: ignore[arg-type]


def head_file(member: int) -> str:
    """The weights file of ensemble member `member` (1-based) in a fold folder."""
    return "head.safetensors" if member == 1 else f"head-{member}.safetensors"


def history_file(member: int) -> str:
    return "history.csv" if member == 1 else f"history-{member}.csv"


def member_files(metrics: dict[str, Any]) -> list[str]:
    """Every head file of a finished fold: one per entry of metrics.json["members"] (one without it)."""
    members = metrics.get("members")
    n = len(members) if isinstance(members, list) and members else 1
    return [head_file(i) for i in range(1, n + 1)]  # names from the count only, never paths read from the file


def backbone_config(fold: str | Path) -> Path:
    """The Hugging Face config a fine-tuned fold's backbone is rebuilt from."""
    return Path(fold) / BACKBONE_DIR / "config.json"


def is_head_fold(path: str | Path) -> bool:
    """A trained head's fold folder (train-head or finetune)."""
    return (Path(path) / head_file(1)).is_file()


def is_baseline_fold(path: str | Path) -> bool:
    return (Path(path) / BASELINE_FILE).is_file()


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def head_fold_dirs(run: str | Path) -> list[Path]:
    """The fold folders of RUN that hold a trained head, in fold order."""
    return [d for _, d in fold_dirs(run) if is_head_fold(d)]


# --- JSON --------------------------------------------------------------------------------


def json_safe(obj: Any) -> Any:
    """A copy that `json.dump` writes as strict JSON: NaN/inf -> null, numpy -> Python."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def write_json(path: Path, obj: Any) -> None:
    """Strict JSON, replaced whole (a kill leaves the old file or the new one)."""
    with replacing(path) as tmp:
        tmp.write_text(json.dumps(json_safe(obj), indent=2) + "\n")


# --- config.json -------------------------------------------------------------------------

# Settings that change how fast a run goes, not what it computes.
NOT_RESULT_SETTINGS = ("memory_gb", "device")
# Settings added after runs were first written, with the value that reproduces what those runs did.
LEGACY_SETTINGS = {"protocol": "speaker", "norm": "none", "layer_weights": "joint", "min_steps": 0,
                   "spread": False, "speech_stats": False, "pooled_norm": "none",
                   "pooled_dropout": 0.0, "ema": 0.0, "ensemble": 1, "sap_frames": None,
                   "recipe": "default"}


def sapser_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sapser")
    except PackageNotFoundError:
        return "unknown"


def torch_version() -> str:
    import torch

    return torch.__version__


def run_config(settings: Any, cache: Any, layers: list[int]) -> dict[str, Any]:
    """config.json of a run on a cache: `settings` (a settings dataclass), the cache's identity, the fold plan."""
    return {
        "settings": asdict(settings),
        "cache": (str(Path(cache.path).resolve()) if not hasattr(cache, "caches")  # several: cross-corpus
                  else [str(Path(p).resolve()) for p in cache.paths]),
        "fingerprint": cache.fingerprint,
        "cache_content": cache_content(cache.meta),
        "classes": list(cache.classes),
        "layers": layers,
        "hidden_size": int(cache.hidden_size),
        "folds": [asdict(f) for f in plan(cache.meta, settings.protocol)],
        "versions": {"sapser": sapser_version(), "torch": torch_version()},
    }


def cache_content(meta: pd.DataFrame) -> dict[str, Any]:
    """What the folds train on beyond the fingerprint: the utterances, their lengths and labels.

    A cache keeps its fingerprint when a rerun of `cli extract` adds utterances (e.g. a
    retried model error), so the fingerprint alone cannot tell that a finished fold saw
    other data.
    """
    digest = hashlib.sha256()
    for row in zip(meta.index, meta["n_frames"], meta["speaker"], meta["emotion"], meta["valence"], meta["arousal"]):
        digest.update(repr(tuple(str(x) for x in row)).encode())
    return {"utterances": int(len(meta)), "sha256": digest.hexdigest()}


def run_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What makes two run configs different computations, one short phrase each ([] = the same run)."""
    from cache.format import describe_diff, fingerprint_diff

    new = json_safe(new)
    out = []
    # a run written before a setting existed computed what that setting's legacy value does
    a = {**LEGACY_SETTINGS, **{k: v for k, v in (old.get("settings") or {}).items() if k not in NOT_RESULT_SETTINGS}}
    b = {k: v for k, v in (new.get("settings") or {}).items() if k not in NOT_RESULT_SETTINGS}
    for k in sorted(set(a) | set(b)):
        if a.get(k, "<absent>") != b.get(k, "<absent>"):
            out.append(f"{k} {a.get(k, '<absent>')!r} (run) vs {b.get(k, '<absent>')!r} (now)")
    fa, fb = old.get("fingerprint"), new.get("fingerprint")
    if isinstance(fa, dict) and isinstance(fb, dict):
        keys = fingerprint_diff(fb, fa)
        if keys:
            out.append("cache fingerprint " + describe_diff(keys, fb, fa).replace("(cache)", "(run)"))
    elif fa != fb:
        out.append("cache fingerprint")
    if old.get("layers") != new.get("layers"):
        out.append(f"layers {old.get('layers')} (run) vs {new.get('layers')} (now)")
    ca, cb = old.get("cache_content"), new.get("cache_content")
    if ca is not None and cb is not None and ca != cb:  # runs written before the digest existed have none
        out.append(f"cache contents ({ca.get('utterances')} utterances (run) vs {cb.get('utterances')} (now), "
                   "or other lengths or labels)")
    return out


def prepare_run_dir(out: Path, config: dict[str, Any]) -> None:
    """Write RUN/config.json, refusing a folder that holds a run with other settings or another cache.

    Because they would be the same computation, folds already finished in that folder are
    then kept, not trained again (`finished_fold`).
    """
    path = out / CONFIG_FILE
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            raise UserError(f"{path} exists but is not readable JSON; choose another --out or remove it") from None
        if not isinstance(old, dict):
            raise UserError(f"{path} is not a run configuration (a JSON object); choose another --out or remove it")
        diff = run_differences(old, config)
        if diff:
            shown = "; ".join(diff[:4]) + (f"; and {len(diff) - 4} more" if len(diff) > 4 else "")
            raise UserError(f"{out} already holds a run with other settings or another cache ({shown}); "
                            "choose another --out, or delete that folder to start over")
    out.mkdir(parents=True, exist_ok=True)
    write_json(path, config)


def read_config(run: str | Path) -> Any:
    """RUN/config.json as parsed JSON; a RunFolderError when it is missing or not JSON."""
    path = Path(run) / CONFIG_FILE
    try:
        return json.loads(path.read_text())
    except OSError:
        raise RunFolderError(f"{path} is missing: give a run folder (or a fold folder inside one)") from None
    except ValueError:
        raise RunFolderError(f"{path} is not valid JSON (empty or cut short?)") from None


def settings_value(settings: dict[str, Any], key: str) -> Any:
    """A run's setting, or the value that reproduces what runs written before that setting did."""
    return settings.get(key, LEGACY_SETTINGS.get(key))


# --- a fold's files ------------------------------------------------------------------------


@dataclass
class Predictions:
    """A split's outputs in loader order: what predictions.csv holds for the test split."""

    utt_id: list[str]
    probs: np.ndarray  # (N, C)
    va: np.ndarray  # (N, 2) corpus scale
    emotion: np.ndarray  # (N,) true index, -1 = none
    va_true: np.ndarray  # (N, 2) NaN = none
    no_speech: np.ndarray  # (N,) bool
    loss: float  # total loss over the split


def read_metrics(fold: str | Path) -> Any:
    """fold-KK/metrics.json parsed, or None when absent or unreadable."""
    try:
        return json.loads((Path(fold) / METRICS_FILE).read_text())
    except (OSError, ValueError):
        return None


def finished_fold(run: Path, k: int) -> dict[str, Any] | None:
    """Fold k's metrics if RUN/fold-KK is a complete head fold (metrics.json is written last), else None."""
    folder = fold_dir(run, k)
    metrics = read_metrics(folder)
    if not isinstance(metrics, dict) or metrics.get("fold") != k:
        return None  # absent, or garbage: train it again
    needed = (PREDICTIONS_FILE, history_file(1), *member_files(metrics))
    if not all((folder / name).is_file() for name in needed):
        return None
    return metrics


def write_fold(run: str | Path, metrics: dict[str, Any], predictions: Predictions, classes: Sequence[str],
               config: dict[str, Any], *, heads: Sequence[Mapping[str, torch.Tensor]] = (),
               histories: Sequence[list[dict[str, float]]] = (), baseline: Any = None) -> Path:
    """RUN/fold-KK with the fold's files; returns the folder.

    `heads`: the state dicts of the fold's heads (member i > 1 of an `--ensemble` as
    head-i.safetensors), `histories` theirs; `baseline`: a fitted baseline model (an object
    with `.save(path, metadata)`) for a `cli baseline` fold. Each file is written under a
    temporary name and renamed, and metrics.json goes last: a fold folder with metrics.json
    is complete (a kill or a full disk mid-way leaves none, so a rerun trains that fold again
    instead of keeping half of it).
    """
    folder = fold_dir(run, metrics["fold"])
    folder.mkdir(parents=True, exist_ok=True)
    metadata = {"config": json.dumps(json_safe(config)), "classes": json.dumps(list(classes))}
    with replacing(folder / PREDICTIONS_FILE) as tmp:
        write_predictions(tmp, predictions, tuple(classes), metrics.get("outputs", OUTPUTS))
    for i, history in enumerate(histories, start=1):
        with replacing(folder / history_file(i)) as tmp, tmp.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(HISTORY_COLUMNS))
            writer.writeheader()
            writer.writerows(history)
    for i, state in enumerate(heads, start=1):
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        with replacing(folder / head_file(i)) as tmp:
            write_safetensors(tensors, tmp, metadata=metadata)
    if baseline is not None:
        with replacing(folder / BASELINE_FILE) as tmp:
            baseline.save(tmp, metadata)
    write_json(folder / METRICS_FILE, metrics)
    return folder


def write_predictions(path: Path, pred: Predictions, classes: tuple[str, ...],
                      outputs: tuple[str, ...] | list[str] = OUTPUTS) -> None:
    """One row per utterance; columns of outputs the head did not learn are left out."""
    emo = "emotion" in outputs
    dims = [j for j, d in enumerate(("valence", "arousal")) if d in outputs]
    names = ("valence", "arousal")
    cols = ["utt_id", *(["true", "pred", *[f"prob_{c}" for c in classes]] if emo else []),
            *[names[j] for j in dims], *[f"{names[j]}_true" for j in dims]]
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(cols)
        for i, utt in enumerate(pred.utt_id):
            true = classes[pred.emotion[i]] if pred.emotion[i] >= 0 else ""
            row = [utt, true, classes[int(pred.probs[i].argmax())], *[f"{p:.6f}" for p in pred.probs[i]]] if emo \
                else [utt]
            writer.writerow([*row, *[_num(pred.va[i][j]) for j in dims], *[_num(pred.va_true[i][j]) for j in dims]])


def _num(x: float) -> str:
    return "" if not math.isfinite(x) else f"{x:.6f}"


def read_predictions(fold: str | Path) -> pd.DataFrame:
    return pd.read_csv(Path(fold) / PREDICTIONS_FILE)


def trained_outputs(train_labels: pd.DataFrame) -> list[str]:
    """The outputs with at least one label in the training split (emotion -1 / NaN = no label)."""
    out = ["emotion"] if (train_labels["emotion"] >= 0).any() else []
    return out + [d for d in ("valence", "arousal") if train_labels[d].notna().any()]


def fold_outputs(fold: str | Path, head_state: Mapping[str, torch.Tensor] | None = None) -> list[str]:
    """What a trained fold predicts: metrics.json's record, or (older folds) what its buffers show.

    A regressor without a single training label keeps mean exactly 0 and std exactly 1.
    """
    metrics = read_metrics(fold)
    recorded = metrics.get("outputs") if isinstance(metrics, dict) else None
    if recorded is not None:
        return [o for o in OUTPUTS if o in recorded]
    if head_state is None or "va_mean" not in head_state:
        return list(OUTPUTS)
    mean, std = head_state["va_mean"].tolist(), head_state["va_std"].tolist()
    untrained = {d for d, m, s in zip(("valence", "arousal"), mean, std) if m == 0.0 and s == 1.0}
    return [o for o in OUTPUTS if o not in untrained]


# --- utterances.csv ----------------------------------------------------------------------


def write_run_utterances(run: str | Path, meta: pd.DataFrame) -> Path:
    """RUN/utterances.csv: every utterance the run's folds draw from, with the columns folds group by.

    With config.json's fold plan it tells which fold trained on which file
    (predict warns when asked about one); meta is indexed by utt_id.
    """
    path = Path(run) / UTTERANCES_FILE
    with replacing(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(UTTERANCE_COLUMNS)
        split = meta["split"] if "split" in meta.columns else pd.Series("", index=meta.index)
        for utt_id, p, spk, ses, spl in zip(meta.index, meta["path"], meta["speaker"], meta["session"], split):
            writer.writerow([utt_id, p, spk, ses, spl or ""])
    return path


def read_run_utterances(run: str | Path) -> pd.DataFrame | None:
    """RUN/utterances.csv indexed by utt_id, or None for runs made before it was written."""
    path = Path(run) / UTTERANCES_FILE
    if not path.is_file():
        return None
    return pd.read_csv(path, dtype=str, keep_default_na=False).set_index("utt_id")


# --- weights files -------------------------------------------------------------------------


def save_weights(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    """safetensors file of `tensors` (copied to contiguous CPU memory), written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    tmp = path.with_name(path.name + ".tmp")
    try:
        write_safetensors(plain, tmp, metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_safetensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, with its I/O failures (full disk, read-only folder) as OSError.

    safetensors reports them as SafetensorError("... No space left on device (os error 28)"),
    which callers could not tell from a bug.
    """
    from safetensors.torch import save_file

    try:
        save_file(dict(tensors), str(path), metadata=metadata)
    except OSError:
        raise
    except Exception as err:  # noqa: BLE001 - SafetensorError; anything but I/O is re-raised as is
        match = re.search(r"os error (\d+)", str(err))
        if match is None:
            raise
        code = int(match.group(1))
        raise OSError(code, os.strerror(code), str(path)) from None


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise RunFolderError(f"weights file {path} does not exist")
    return load_file(str(path))
