import os

import pytest
import torch

# Triton kernels run under the interpreter on machines without a GPU.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def gen():
    """A fresh generator per test; the seed differs between runs unless GENERALIST_TEST_SEED is set."""
    seed = int(os.environ.get("GENERALIST_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    return torch.Generator().manual_seed(seed)  # failures report gen.initial_seed()
