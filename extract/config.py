"""ExtractConfig: every setting of an extraction run, each with its default and help in one place.

`cli extract` builds its options from these fields (core.settings), `run_extract` takes
one object instead of a long keyword list, and `validate()` refuses a bad value in one
line before any model is loaded. The corpus (dataset, root) and the output path are not
settings: they say what to extract and where, not how. No torch, no h5py here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from core.devices import AMP_MODES
from core.errors import UserError
from core.records import CLASSES_4, parse_classes
from core.settings import setting
from extract.models import DEFAULT_MODEL, parse_layers

STORAGE_DTYPES = ("float16", "float32")  # = cache.format.DTYPES (not imported: it loads h5py)
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
MiB = 1 << 20


class ExtractError(UserError):
    """An extraction that cannot go on (a bad setting, strict mode, or a model that fails on everything)."""


@dataclass
class ExtractConfig:
    """How to extract: the model, what to keep, how to run it. Defaults are `cli extract`'s."""

    model: str = setting(DEFAULT_MODEL, "Hugging Face hub id or local folder (wav2vec2 family or Whisper), "
                                        "or fbank / egemaps")
    layers: str = setting("all", "hidden states to keep: all, 24, 12-24 or 0,6,12")
    max_seconds: float | None = setting(None, "keep the first S seconds (default: the dataset's; 0 = all)")
    batch_seconds: float | None = setting(None, "padded audio seconds per model batch; 0 = one utterance per "
                                                "forward (default: 0 on CPU, 100 on CUDA)")
    device: str = setting("auto", "auto, cpu or cuda[:N]")
    dtype: str = setting("float16", "storage dtype: float16 or float32")
    amp: str = setting("auto", f"autocast: {AMP_MODES.help()}")
    workers: int | None = setting(None, "audio decoding + VAD processes; 0 = a thread (default: 0 on CPU, "
                                        "cores - 1, at most 8, on CUDA)")
    streams: int | None = setting(None, "model calls at once, each with cores/streams torch threads (default: "
                                        "one per core, at most 8, on CPU; 1 on CUDA)")
    shard: str | None = setting(None, "do part i of n (1-based, e.g. 2/4; default: RANK/WORLD_SIZE under torchrun)")
    strict: bool = setting(False, "stop at the first bad utterance instead of skipping it")
    classes: tuple[str, ...] = setting(CLASSES_4, "comma-separated class set", metavar="A,B,...", parse=parse_classes)
    append: bool = setting(False, "add this corpus's new rows to a cache made from another corpus with the same "
                                  "model and settings (the cache records both corpora)")
    buffer_mb: int = setting(512, "RAM for audio and features between the stages (decoded audio waiting for the "
                                  "model, features waiting for the disk, the part file being built); the model's "
                                  "own memory comes on top")

    def validate(self) -> ExtractConfig:
        """Self, or an ExtractError naming the first bad setting (one line)."""
        if self.dtype not in STORAGE_DTYPES:
            raise ExtractError(f"--dtype is the storage dtype: float16 or float32, got {self.dtype!r}")
        AMP_MODES.check(self.amp)
        if not _DEVICE.fullmatch(str(self.device)):
            raise ExtractError(f"--device must be auto, cpu or cuda[:N]; got {self.device!r}")
        checks = [
            (self.max_seconds is None or self.max_seconds >= 0,
             f"--max-seconds must be >= 0 (0 = no truncation), got {self.max_seconds}"),
            (self.batch_seconds is None or self.batch_seconds >= 0,
             f"--batch-seconds must be >= 0 (0 = one utterance per forward), got {self.batch_seconds}"),
            (self.streams is None or self.streams >= 1, f"--streams must be at least 1, got {self.streams}"),
            (self.workers is None or self.workers >= 0,
             f"--workers must be >= 0 (0 = audio in a thread), got {self.workers}"),
            (len(self.classes) >= 1, "--classes names no class"),
            (self.buffer_mb >= MIN_BUFFER_MB, f"--buffer-mb must be at least {MIN_BUFFER_MB}, got {self.buffer_mb}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ExtractError(message)
        parse_layers(self.layers)
        parse_shard(self.shard, {})
        return self

    def budget(self) -> Budget:
        """--buffer-mb split between the stages (see Budget)."""
        total = int(self.buffer_mb) * MiB
        return Budget(audio=total // 4, queue=total // 2, part=total // 4)


@dataclass(frozen=True)
class Budget:
    """Bytes each stage of the extraction loop may hold between the model and the disk.

    audio: decoded audio (and its VAD masks) loaded ahead of the model streams (always at
           least one batch ahead, however long);
    queue: finished features waiting for the writer thread, as the model returned them plus
           their storage-dtype copy (one utterance always fits);
    part:  the part file being built in RAM before it is written (a kill loses at most one).
    Not in it: the model (weights, activations, and the outputs of the batches being computed:
    batch seconds x 50 frames x layers x hidden size x 4 bytes per stream, plus one batch).
    """

    audio: int
    queue: int
    part: int


MIN_BUFFER_MB = 16  # below this a part would hold a handful of frames: parts and renames dominate


def parse_shard(spec: str | None, env: dict[str, str]) -> tuple[int, int] | None:
    """`--shard i/n` (1-based, 1 <= i <= n) -> (i - 1, n); without it, torchrun's RANK/WORLD_SIZE."""
    if spec is None:
        world = int(env.get("WORLD_SIZE", "1") or 1)
        return (int(env.get("RANK", "0") or 0), world) if world > 1 else None
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise ExtractError(f"--shard must look like i/n (e.g. 1/4), got {spec!r}") from None
    if not 1 <= i <= n:
        raise ExtractError(f"--shard {spec}: i must be between 1 and n")
    return (i - 1, n) if n > 1 else None
