"""Which Hugging Face speech models sapser takes and how it names, loads and identifies them.

Two families, told apart by the checkpoint's config (`model_family`): the wav2vec2
family (WavLM, wav2vec2, HuBERT, data2vec-audio: waveform in, a stack of unpadded
convolutions) and Whisper encoders (log-mel in). Extraction (extract/backends.py,
extract/whisper.py) and fine-tuning (heads/finetune/backbone.py) ask the same questions here.
Models are loaded with the ordinary `from_pretrained`, never with remote code.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from core.errors import UserError

if TYPE_CHECKING:  # torch and transformers are imported where they are used: the extraction
    import torch   # loop's audio workers import this module and need neither

DEFAULT_MODEL = "microsoft/wavlm-large"  # --model of extract and finetune, and the API's default
WAV2VEC2_FAMILY = "wav2vec2 family: WavLM, wav2vec2, HuBERT, data2vec-audio"


class BackendError(UserError):
    """A model that cannot be loaded or used as a feature backend."""


def first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:200]


def model_config(model: str, *, error: type[UserError] = BackendError) -> Any:
    """The checkpoint's transformers config (hub id or folder), or `error` in one line."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model)
    except Exception as exc:  # hub offline, typo, not a model folder: all user-facing
        raise error(f"cannot load model {model!r}: {first_line(exc)}") from None


def model_family(config: Any, model: str, *, error: type[UserError] = BackendError) -> str:
    """"whisper" or "wav2vec2" from a checkpoint's config; `error` for any other model."""
    if config.model_type == "whisper":
        return "whisper"
    if hasattr(config, "conv_kernel") and hasattr(config, "conv_stride"):
        return "wav2vec2"
    raise error(f"{model!r} ({config.model_type}) is not a speech model sapser can use ({WAV2VEC2_FAMILY}; "
                "or Whisper)")


def is_whisper(model: str) -> bool:
    """True when `model`'s config says model_type "whisper" (False when it cannot be read at all)."""
    try:
        return model_config(model).model_type == "whisper"
    except BackendError:  # the loader that is tried next reports why the model cannot be read
        return False


def model_slug(model: str) -> str:
    """A file-name-safe short name: microsoft/wavlm-large -> wavlm-large, /x/my_model/ -> my_model."""
    tail = Path(model.rstrip("/\\")).name or "model"
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in tail)


def load_error(model: str, exc: BaseException) -> str:
    """One line for a model folder or hub id that from_pretrained refused.

    A pickled checkpoint refused by torch.load(weights_only=True) gets its own sentence:
    torch's message goes on to explain how to load it unsafely, which is not our advice.
    """
    import pickle

    if isinstance(exc, pickle.UnpicklingError) or "weights_only" in str(exc):
        return (f"cannot load model {model!r}: its weights are a pickle that is not plain tensors, and loading it "
                "could run code, so it was not loaded; use a checkpoint saved as safetensors")
    return f"cannot load model {model!r}: {first_line(exc)}"


def quiet_from_pretrained(auto_class, model: str) -> torch.nn.Module:
    """from_pretrained without transformers' own progress bar (the extractor draws one)."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return auto_class.from_pretrained(model)
    except Exception as exc:
        raise BackendError(load_error(model, exc)) from None
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def state_dict_sha256(model: torch.nn.Module) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor, in name order.

    Independent of the file format (safetensors or .bin) and of where the
    weights came from; 0.7 s for WavLM Large's 316M parameters on this CPU.
    Call it before moving the model to a GPU.
    """
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():  # the bytes in place (a buffer), not a copy of them
            digest.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def parse_layers(spec: str) -> tuple[int, ...] | None:
    """`all` -> None (every hidden state); `24`, `12-24`, `0,6,12` or `0,10-12` -> sorted indices."""
    spec = spec.strip().lower()
    if spec in ("", "all"):
        return None
    out: set[int] = set()
    try:
        for part in spec.split(","):
            lo, sep, hi = part.strip().partition("-")
            first, last = int(lo), int(hi) if sep else int(lo)
            if first < 0 or last < first:
                raise ValueError(part)
            out.update(range(first, last + 1))
    except ValueError:
        raise BackendError(
            f"--layers {spec!r} is not 'all', a layer (24), a range (12-24) or a list (0,6,12)"
        ) from None
    return tuple(sorted(out))


def check_layers(layers: Sequence[int] | None, available: int, model: str) -> tuple[int, ...]:
    if layers is None:
        return tuple(range(available))
    chosen = tuple(sorted(set(int(i) for i in layers)))
    if not chosen or chosen[0] < 0 or chosen[-1] >= available:
        raise BackendError(
            f"{model} has hidden states 0 to {available - 1}; layers {list(chosen)} are out of range"
        )
    return chosen

