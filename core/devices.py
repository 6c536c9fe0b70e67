"""Where the model runs and in which precision: the one place that turns `--device` and `--amp` into torch's terms.

torch is imported inside the functions: `cli --help` reads the tables below without it.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from core.choices import Choice, Choices
from core.errors import UserError

if TYPE_CHECKING:
    import torch

# --device for training, prediction and fine-tuning (extraction also takes cuda:N, see resolve_device).
DEVICES: Choices[Choice] = Choices("--device", {
    "auto": Choice("a CUDA GPU when torch sees one, else the CPU"), "cpu": Choice(), "cuda": Choice(),
})
# --amp: autocast precision. What `auto` means and what a CPU allows is the caller's (extraction autocasts
# on a CPU too; fine-tuning refuses bf16/fp16 there).
AMP_MODES: Choices[Choice] = Choices("--amp", {
    "auto": Choice("bf16 on CUDA and on CPUs with native bfloat16 dot products (extraction)"),
    "bf16": Choice(), "fp16": Choice(), "none": Choice("float32"),
})
_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def resolve_device(name: str, *, error: type[UserError] = UserError) -> torch.device:
    """`auto` -> cuda when torch sees a GPU, else cpu; `cpu`, `cuda` or `cuda:N` as given.

    A CUDA device without a GPU, or any other name, is `error` (one sentence).
    """
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not _DEVICE.fullmatch(name):
        raise error(f"--device must be auto, cpu or cuda[:N]; got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise error(f"--device {name} was asked for but torch sees no CUDA GPU")
    return torch.device(name)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (x86 AVX512-BF16 or AMX), as torch itself reports.

    Elsewhere (AVX2-only x86, ARM) bfloat16 autocast is emulated and slower than float32.
    """
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def autocast_dtype(name: str, device: torch.device, *, error: type[UserError] = UserError) -> torch.dtype | None:
    """Extraction's compute precision: float32/fp32/none (None: no autocast), bfloat16/bf16, float16/fp16,
    or auto = bfloat16 on CUDA and on CPUs with native bfloat16 (`cpu_has_native_bf16`), float32 elsewhere.

    Why bf16 on such a CPU: on the 2-core Zen 4 development machine it runs WavLM 1.8x faster than
    float32, and the heads trained on its features score as those on float32 features (bench/results/extract-cpu.md); a GPU's default is bf16 for the same reason."""
    import torch

    if name == "auto":
        if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()):
            return torch.bfloat16
        return None
    dtypes = {"float32": None, "fp32": None, "none": None, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
              "float16": torch.float16, "fp16": torch.float16}
    if name not in dtypes:
        raise error(f"compute dtype must be float32, bfloat16 or float16, got {name!r}")
    return dtypes[name]


def training_autocast(amp: str, device: torch.device) -> torch.dtype | None:
    """Fine-tuning's autocast dtype for `--amp`: bf16 where the GPU has it (auto), fp16 on request, else None.

    Unlike extraction, a CPU trains in float32 only: bf16/fp16 there are refused.
    """
    import torch

    AMP_MODES.check(amp)
    if device.type != "cuda":
        if amp in ("bf16", "fp16"):
            raise UserError(f"--amp {amp} needs a CUDA GPU; use --amp none on CPU")
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        raise UserError("--amp bf16 was asked for but this GPU has no bfloat16 support; use fp16 or none")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]
