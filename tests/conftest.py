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
    return torch.Generator().manual_seed(seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failing test that drew from `gen` prints the seed that replays it."""
    report = (yield).get_result()
    generator = getattr(item, "funcargs", {}).get("gen")
    if report.failed and isinstance(generator, torch.Generator):
        report.sections.append(("seed", f"replay with GENERALIST_TEST_SEED={generator.initial_seed()}"))
