"""Every input a caller can get wrong raises a ValueError that names the argument, whichever
backend is asked for (the checks run before a backend is picked)."""

import numpy as np
import pytest
import torch

from generalist.ops import ATTENTION_BACKENDS, BackendError, flash_attn_func, flash_attn_varlen_func, set_value_checks


def _serves_cpu_fp32(name: str) -> bool:
    """Backends that take plain CPU fp32 inputs (Triton does only under an explicit opt-in)."""
    x, cu = torch.zeros(4, 2, 8), torch.tensor([0, 4], dtype=torch.int32)
    try:
        ATTENTION_BACKENDS.resolve(name, x, x, x, cu, cu, 4, 4, 0.35, False, None)
    except BackendError:
        return False
    return True


BACKENDS = [name for name in ATTENTION_BACKENDS.available() if _serves_cpu_fp32(name)]


def _varlen(**over):
    args = dict(q=torch.randn(10, 4, 8), k=torch.randn(12, 2, 8), v=torch.randn(12, 2, 8),
                cu_seqlens_q=torch.tensor([0, 4, 10], dtype=torch.int32),
                cu_seqlens_k=torch.tensor([0, 5, 12], dtype=torch.int32), max_seqlen_q=6, max_seqlen_k=7)
    kw = {k: over.pop(k) for k in ("causal", "prefix_lens", "softmax_scale", "backend") if k in over}
    args.update(over)
    return flash_attn_varlen_func(*args.values(), **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_valid_call_works(backend):
    assert _varlen(backend=backend).shape == (10, 4, 8)


@pytest.mark.parametrize("over,match", [
    (dict(q=torch.randn(10, 4)), r"q must have shape \(Tq, H, D\)"),
    (dict(k=torch.randn(12, 2, 8, 1)), "k must have shape"),
    (dict(q=[[1.0]]), "q must be a torch.Tensor"),
    (dict(v=torch.randn(12, 2, 9)), "k and v must have the same shape"),
    (dict(k=torch.randn(12, 2, 6), v=torch.randn(12, 2, 6)), "k head dim 6 differs from q head dim 8"),
    (dict(k=torch.randn(12, 3, 8), v=torch.randn(12, 3, 8)), r"multiple of k/v's \(3\)"),
    (dict(q=torch.randn(10, 4, 300), k=torch.randn(12, 2, 300), v=torch.randn(12, 2, 300)), "head dim must be between 1 and 256"),
    (dict(k=torch.randn(12, 2, 8).half()), "k has dtype torch.float16 but q has torch.float32"),
    (dict(q=torch.ones(10, 4, 8, dtype=torch.int64)), "q has unsupported dtype"),
    (dict(cu_seqlens_q=torch.tensor([0, 4, 10])), "cu_seqlens_q must be int32"),
    (dict(cu_seqlens_k=torch.tensor([[0, 5, 12]], dtype=torch.int32)), r"cu_seqlens_k must have shape \(B\+1,\)"),
    (dict(cu_seqlens_q=torch.tensor([1, 4, 10], dtype=torch.int32)), "cu_seqlens_q must start at 0"),
    (dict(cu_seqlens_k=torch.tensor([0, 5, 3, 12], dtype=torch.int32),
          cu_seqlens_q=torch.tensor([0, 4, 4, 10], dtype=torch.int32)), "cu_seqlens_k must be non-decreasing"),
    (dict(cu_seqlens_q=torch.tensor([0, 4, 9], dtype=torch.int32)), r"cu_seqlens_q\[-1\] is 9 but the packed tensor has 10"),
    (dict(cu_seqlens_q=torch.tensor([0, 10], dtype=torch.int32)), "cu_seqlens_q has 1 sequences but cu_seqlens_k has 2"),
    (dict(max_seqlen_q=5), "max_seqlen_q is 5 but a sequence in cu_seqlens_q has length 6"),
    (dict(max_seqlen_k=-1), "max_seqlen_k must be >= 0"),
    (dict(max_seqlen_k=7.5), "max_seqlen_k must be an int"),
    (dict(max_seqlen_q=True), "max_seqlen_q must be an int, got bool"),
    (dict(prefix_lens=torch.tensor([1, 2], dtype=torch.int32)), "prefix_lens needs causal=True"),
    (dict(causal=True, prefix_lens=torch.tensor([1, 2]),), "prefix_lens must be int32"),
    (dict(causal=True, prefix_lens=torch.tensor([1, 2, 3], dtype=torch.int32)), "prefix_lens has 3 entries but there are 2 sequences"),
    (dict(causal=True, prefix_lens=torch.tensor([1, -2], dtype=torch.int32)), "prefix_lens must be >= 0"),
    (dict(softmax_scale=float("nan")), "softmax_scale must be finite"),
    # finite as a Python float, inf once the kernels multiply by it in float32
    (dict(softmax_scale=-1e300), "softmax_scale must lie within float32's range"),
    # flash_attn_func(q, k, v, True) puts causal where softmax_scale goes: refused, not a scale of 1
    (dict(softmax_scale=True), "softmax_scale must be a real number or None, got bool"),
    (dict(softmax_scale="0.5"), "softmax_scale must be a real number or None, got str"),
    (dict(softmax_scale=[0.5]), "softmax_scale must be a real number or None, got list"),
    (dict(softmax_scale=torch.ones(2)), "softmax_scale must be a real number or None, got Tensor"),
    # "False" is truthy: it ran causal attention
    (dict(causal="False"), "causal must be True or False, got str 'False'"),
    (dict(causal=1), "causal must be True or False, got int 1"),
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_varlen_input(over, match, backend):
    with pytest.raises(ValueError, match=match):
        _varlen(backend=backend, **over)


@pytest.mark.parametrize("q,k,v,match", [
    (torch.randn(2, 5, 4, 8), torch.randn(3, 5, 4, 8), torch.randn(3, 5, 4, 8), "batch size differs: q has 2, k/v have 3"),
    (torch.randn(2, 5, 4), torch.randn(2, 5, 4, 8), torch.randn(2, 5, 4, 8), r"q must have shape \(B, Sq, H, D\)"),
    (torch.randn(2, 5, 4, 8), torch.randn(2, 6, 4, 8), torch.randn(2, 5, 4, 8), "k and v must have the same shape"),
])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_dense_input(q, k, v, match, backend):
    with pytest.raises(ValueError, match=match):
        flash_attn_func(q, k, v, backend=backend)


def test_causal_takes_numpy_bools_and_refuses_strings():
    q = torch.randn(1, 5, 2, 8)
    torch.testing.assert_close(flash_attn_func(q, q, q, causal=np.bool_(True), backend="reference"),
                               flash_attn_func(q, q, q, causal=True, backend="reference"))
    with pytest.raises(ValueError, match="causal must be True or False, got str 'False'"):
        flash_attn_func(q, q, q, causal="False")


def test_device_mismatch_is_named():
    meta = torch.empty(12, 2, 8, device="meta")
    with pytest.raises(ValueError, match="k is on meta but q is on cpu"):
        _varlen(k=meta, v=meta)
    with pytest.raises(ValueError, match="cu_seqlens_q is on meta but q is on cpu"):
        _varlen(cu_seqlens_q=torch.empty(3, dtype=torch.int32, device="meta"))


def test_meta_tensors_take_the_shape_checks_only():
    """The meta device has no values to check: shape propagation gets the outputs' shapes (the
    op's fake implementation), and a shape error is still named."""
    from generalist.ops import grouped_mm, permute
    from generalist.ops.attention_decode import attention_decode

    meta = dict(device="meta")
    q, cu = torch.empty(10, 2, 16, **meta), torch.empty(3, dtype=torch.int32, **meta)
    out = flash_attn_varlen_func(q, q, q, cu, cu, 5, 5, causal=True, prefix_lens=torch.empty(2, dtype=torch.int32, **meta))
    assert out.is_meta and out.shape == (10, 2, 16)
    with pytest.raises(ValueError, match="cu_seqlens_q has 2 sequences but cu_seqlens_k has 1"):
        flash_attn_varlen_func(q, q, q, cu, cu[:2], 5, 5)
    q1, cache = torch.empty(2, 1, 2, 16, **meta), torch.empty(2, 9, 2, 16, **meta)
    assert attention_decode(q1, cache, cache, torch.empty(2, dtype=torch.int32, **meta)).shape == (2, 1, 2, 16)
    x = torch.empty(10, 8, **meta)
    assert grouped_mm(x, torch.empty(3, 8, 4, **meta), torch.empty(3, dtype=torch.int32, **meta)).shape == (10, 4)
    assert permute(x, torch.empty(10, 2, dtype=torch.int64, **meta), 3)[0].shape == (20, 8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_value_checks_can_be_switched_off(backend):
    old = set_value_checks(False)
    # max_seqlen_q too small is no longer caught up front; these CPU backends do not depend on it
    # (the GPU kernels size their grids by it: there the caller answers for it)
    try:
        torch.manual_seed(0)
        out = _varlen(max_seqlen_q=1, backend=backend)
    finally:
        set_value_checks(old)
    torch.manual_seed(0)
    torch.testing.assert_close(out, _varlen(backend="reference"))


@pytest.mark.parametrize("cu_seqlens_q", [[0, 4, 9], [1, 4, 10], [0, 7, 4, 10]])
def test_cpu_kernel_checks_offsets_itself(cu_seqlens_q):
    """With the value checks off, bad offsets reach the C++ kernel, which must refuse them."""
    if "cpu" not in BACKENDS:
        pytest.skip("the C++ CPU backend is not built")
    cu_k = [0, 5, 12] if len(cu_seqlens_q) == 3 else [0, 5, 5, 12]
    old = set_value_checks(False)
    try:
        with pytest.raises(RuntimeError, match="cu_seqlens"):
            _varlen(cu_seqlens_q=torch.tensor(cu_seqlens_q, dtype=torch.int32),
                    cu_seqlens_k=torch.tensor(cu_k, dtype=torch.int32), backend="cpu")
    finally:
        set_value_checks(old)


def test_value_checks_run_once_per_tensor_and_again_after_a_write(monkeypatch):
    """A cu_seqlens that passed is not read back again (no device sync per layer), but any in-place
    write to it brings the check back."""
    reads = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(1) or tolist(self))
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    q = torch.randn(10, 2, 8)
    flash_attn_varlen_func(q, q, q, cu, cu, 6, 6, backend="reference")
    first = len(reads)
    assert first >= 1
    flash_attn_varlen_func(q, q, q, cu, cu, 6, 6, backend="reference")
    assert len(reads) == first  # remembered
    with pytest.raises(ValueError, match="max_seqlen_q is 5"):  # another bound is checked anew
        flash_attn_varlen_func(q, q, q, cu, cu, 5, 6, backend="reference")
    cu[1] = 11
    with pytest.raises(ValueError, match="cu_seqlens_q must be non-decreasing"):
        flash_attn_varlen_func(q, q, q, cu, cu, 6, 6, backend="reference")
    prefix = torch.tensor([1, 2], dtype=torch.int32)
    cu[1] = 4
    flash_attn_varlen_func(q, q, q, cu, cu, 6, 6, causal=True, prefix_lens=prefix, backend="reference")
    prefix[0] = -1
    with pytest.raises(ValueError, match="prefix_lens must be >= 0"):
        flash_attn_varlen_func(q, q, q, cu, cu, 6, 6, causal=True, prefix_lens=prefix, backend="reference")
    with torch.inference_mode():  # no version counter: checked every time
        cu2 = torch.tensor([0, 4, 10], dtype=torch.int32)
        before = len(reads)
        flash_attn_varlen_func(q, q, q, cu2, cu2, 6, 6, backend="reference")
        flash_attn_varlen_func(q, q, q, cu2, cu2, 6, 6, backend="reference")
        assert len(reads) - before >= 2


def test_trusted_tensors_skip_value_checks_until_written(monkeypatch):
    """trust_values (for tensors library code built from host-checked values) skips every value
    check without reading the tensor back; a write to it brings the checks back."""
    from generalist.ops import _attention_checks as checks

    reads = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(1) or tolist(self))
    cu = checks.trust_values(torch.tensor([0, 4, 10], dtype=torch.int32))
    q = torch.randn(10, 2, 8)
    flash_attn_varlen_func(q, q, q, cu, cu, 6, 6, backend="reference")
    assert reads == []
    cu[1] = 11
    with pytest.raises(ValueError, match="cu_seqlens_q must be non-decreasing"):
        flash_attn_varlen_func(q, q, q, cu, cu, 6, 6, backend="reference")
    assert reads
