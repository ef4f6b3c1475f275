import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """A test that sets torch's thread count (the demo does, as its command should) must not change it for the
    tests after it: bitwise comparisons between an in-process run and a subprocess assume one thread each."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_hf_janus(tmp_path_factory):
    """(transformers JanusForConditionalGeneration, its save directory) on tiny random weights."""
    from unigen.testing import make_tiny_hf_janus

    directory = tmp_path_factory.mktemp("tiny_hf_janus")
    model = make_tiny_hf_janus(directory, seed=0)
    return model, directory
