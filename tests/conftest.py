import pytest
import torch

from extract.backends import tiny_wavlm


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """The test models are tiny: a second thread gains nothing, and on a busy 2-core
    machine spinning OpenMP threads made such runs 3-6x slower. Subprocesses the
    tests start (spawned fold workers, torchrun) set their own thread counts."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The untrained tiny WavLM (seed 0) saved with save_pretrained; tests only read it."""
    return tiny_wavlm(tmp_path_factory.mktemp("tiny-wavlm") / "wavlm", seed=0)
