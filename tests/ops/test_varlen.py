import subprocess
import sys

import pytest
import torch

from generalist import _ext
from generalist.ops import varlen_positions
from generalist.ops.varlen import varlen_positions_reference
from generalist.testing import cu_seqlens


def _lens(gen, n):
    lens = torch.randint(0, 9, (n,), generator=gen)
    lens[torch.rand(n, generator=gen) < 0.3] = 0  # plenty of empty sequences
    return lens.tolist()


def test_reference_by_hand():
    seq, pos = varlen_positions_reference(cu_seqlens([2, 0, 3]), 5)
    assert seq.tolist() == [0, 0, 2, 2, 2] and pos.tolist() == [0, 1, 0, 1, 2]


@pytest.mark.parametrize("n", [0, 1, 7, 300])
def test_op_matches_reference_exactly(gen, n):
    lens = _lens(gen, n)
    cu = cu_seqlens(lens)
    got = varlen_positions(cu, sum(lens))
    want = varlen_positions_reference(cu, sum(lens))
    for g, w in zip(got, want):
        assert g.dtype == torch.int32 and torch.equal(g, w)


def test_compiled_kernel_matches_reference(gen):
    if not _ext.has_extension():
        pytest.fail(f"generalist._C was not built: {_ext.import_error} (run `make setup`)")
    lens = _lens(gen, 500)
    cu = cu_seqlens(lens)
    got = torch.ops.generalist._varlen_positions(cu, sum(lens))
    want = varlen_positions_reference(cu, sum(lens))
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    with pytest.raises(RuntimeError, match="non-decreasing"):
        torch.ops.generalist._varlen_positions(torch.tensor([0, 3, 2], dtype=torch.int32), 2)


def test_opcheck(gen):
    torch.library.opcheck(torch.ops.generalist.varlen_positions.default, (cu_seqlens([3, 0, 4]), 7))


@pytest.mark.parametrize("cu,total,match", [
    (torch.tensor([0, 2, 5]), 5, "int32"),
    (torch.tensor([1, 2, 5], dtype=torch.int32), 5, "start at 0"),
    (torch.tensor([0, 3, 2], dtype=torch.int32), 2, "non-decreasing"),
    (torch.tensor([0, 2, 5], dtype=torch.int32), 6, "total is 6"),
    (torch.tensor([0, 2, 5], dtype=torch.int32), 5.0, "total must be an int, got float"),
    (torch.tensor([0, 1], dtype=torch.int32), True, "total must be an int, got bool"),
])
def test_bad_input(cu, total, match):
    with pytest.raises(ValueError, match=match):
        varlen_positions(cu, total)


def test_package_works_without_the_extension():
    """With generalist._C unimportable, import and the ops still work (reference backends)."""
    code = """
import sys, torch
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "generalist._C":
            raise ImportError("blocked for the test")
sys.meta_path.insert(0, Block())
import generalist.ops as ops
from generalist import _ext
assert not _ext.has_extension() and not _ext.cuda_built()
seq, pos = ops.varlen_positions(torch.tensor([0, 2, 2, 5], dtype=torch.int32), 5)
assert seq.tolist() == [0, 0, 2, 2, 2] and pos.tolist() == [0, 1, 0, 1, 2]
q = torch.randn(1, 4, 2, 8)
assert ops.flash_attn_func(q, q, q, causal=True).shape == (1, 4, 2, 8)
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


@pytest.mark.gpu
def test_cuda_kernel_matches_reference(gen):
    assert _ext.cuda_built(), f"generalist._C has no CUDA kernels ({_ext.import_error}); build with GENERALIST_CUDA=ON"
    lens = _lens(gen, 3000)
    cu = cu_seqlens(lens, device="cuda")
    got = varlen_positions(cu, sum(lens))
    want = varlen_positions_reference(cu.cpu(), sum(lens))
    assert all(g.is_cuda and torch.equal(g.cpu(), w) for g, w in zip(got, want))
