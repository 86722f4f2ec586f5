"""The CUDA attention backend (csrc/cuda/attention*, generalist/ops/attention_cuda.py) against the
attention contract (DESIGN.md).

The kernels serve fp16 / bf16 CUDA tensors with head dims 64 and 128; everything else must fall
through to another backend under "auto". Without a GPU (or without a CUDA build of the extension)
only the first test runs: the backend is then absent and the op still works.
Tolerance: error(kernel vs float64) <= 2 x error(PyTorch at the same dtype vs float64) + atol.
"""

import pytest
import torch

from generalist import _ext
from generalist.ops import ATTENTION_BACKENDS, BackendError, flash_attn_func, flash_attn_varlen_func
from generalist.ops import attention_cuda
from generalist.testing import (ATOL, attention_grads, check_forward, max_err, naive_attention,
                                random_varlen, run_varlen)

BACKEND = "cuda"


# (lens_q, lens_k, H, Hkv, causal, prefix); lengths around the 64-token tiles, empty sequences
CASES = [
    ([1, 97, 0, 1025, 300], [5, 97, 3, 1025, 256], 8, 2, True, "mid"),  # GQA 8/2, prefix
    ([1, 97, 0, 1025, 300], [5, 97, 3, 1025, 256], 8, 2, False, None),
    ([1, 97, 0, 1025, 300], [1, 97, 0, 1025, 300], 8, 1, True, None),  # MQA, self-attention
    ([5, 0, 33, 130], [9, 4, 140, 300], 4, 2, True, None),  # cross: Sq < Sk, bottom-right causal
    ([140, 7, 65], [9, 3, 64], 4, 4, True, None),  # cross: Sq > Sk, the first rows see nothing
    ([140, 7, 65], [9, 3, 64], 4, 4, False, None),
    ([37, 64, 150, 10], [70, 50, 150, 12], 2, 1, True, [20, 64, 100, 20]),  # prefixes in, at, past tiles
    ([129, 63], [129, 63], 4, 2, True, "full"),
]
IDS = ["gqa-prefix", "gqa", "mqa-causal", "cross-short-q", "cross-long-q", "cross-long-q-full", "prefixes",
       "prefix-full"]


def _case(lens_q, lens_k, h, hkv, d, prefix, gen, dtype, requires_grad=False):
    return random_varlen(lens_q, lens_k, h, hkv, d, dtype=dtype, prefix=prefix, device="cuda", generator=gen,
                         requires_grad=requires_grad)


def _args(case, causal):
    return (case.q, case.k, case.v, case.cu_q, case.cu_k, max(case.lens_q, default=0), max(case.lens_k, default=0),
            case.q.shape[-1] ** -0.5, causal, case.prefix_lens)










def _naive(case, causal, dtype=torch.float64):
    return lambda: naive_attention(case.q, case.k, case.v, case.lens_q, case.lens_k, causal=causal,
                                   prefix_lens=case.prefix_lens, dtype=dtype)


def _needs_cuda_backend():
    if "cuda" not in ATTENTION_BACKENDS.available():
        pytest.skip(f"the cuda backend is not built (cuda_built={_ext.cuda_built()})")
    if attention_cuda.unsupported(torch.zeros(1, 1, 64, dtype=torch.float16, device="cuda"), None, None) is not None:
        pytest.skip(attention_cuda.unsupported(torch.zeros(1, 1, 64, dtype=torch.float16, device="cuda"), None, None))


# ---------------------------------------------------------------------------------------------
# Without a GPU
# ---------------------------------------------------------------------------------------------


def test_backend_absent_or_refusing_without_cuda_and_op_still_works(gen):
    case = random_varlen([5, 9], [7, 9], 4, 2, 64, dtype=torch.float16, prefix="mid", generator=gen)
    if not attention_cuda.available():
        assert "cuda" not in ATTENTION_BACKENDS.available()
        with pytest.raises(BackendError, match="backend 'cuda' is not available"):
            run_varlen(case, True, "cuda")
    else:  # a CUDA build: CPU tensors are refused with a reason
        with pytest.raises(BackendError, match="backend 'cuda' cannot serve these inputs: runs on CUDA tensors only"):
            run_varlen(case, True, "cuda")
    assert ATTENTION_BACKENDS.resolve("auto", *_args(case, True)).name != "cuda"
    out = run_varlen(case, True, "auto")
    want, _ = naive_attention(case.q, case.k, case.v, case.lens_q, case.lens_k, causal=True,
                              prefix_lens=case.prefix_lens)
    assert (out.double() - want).abs().max().item() <= 2e-2


# ---------------------------------------------------------------------------------------------
# On a GPU
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lens_q,lens_k,h,hkv,causal,prefix", CASES, ids=IDS)
def test_forward_and_backward_against_float64(gen, lens_q, lens_k, h, hkv, causal, prefix, dtype, d):
    _needs_cuda_backend()
    case = _case(lens_q, lens_k, h, hkv, d, prefix, gen, dtype, requires_grad=True)
    assert attention_cuda.unsupported(*_args(case, causal)) is None  # "cuda" serves it (named, below)
    seed = gen.initial_seed()
    check_forward(case, causal, dtype, seed, BACKEND)
    dout = torch.randn(case.q.shape, generator=gen).to("cuda", dtype)
    dlse = torch.randn(h, sum(lens_q), generator=gen).cuda()
    got = attention_grads(case, dout, dlse, lambda: run_varlen(case, causal, BACKEND, return_lse=True))
    want = attention_grads(case, dout, dlse, _naive(case, causal))
    same = attention_grads(case, dout, dlse, _naive(case, causal, dtype))
    for name, g, w, s in zip("qkv", got, want, same):
        assert g.dtype == dtype and g.shape == w.shape and torch.isfinite(g).all(), f"d{name} (seed {seed})"
        err, baseline = max_err(g, w), max_err(s, w)
        assert err <= 2 * baseline + ATOL[dtype], f"d{name}: {err} vs same-dtype PyTorch {baseline} (seed {seed})"


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
def test_rows_without_keys_are_zero_with_lse_minus_inf(gen, d):
    _needs_cuda_backend()
    case = _case([70], [2], 2, 1, d, None, gen, torch.bfloat16, requires_grad=True)
    out, lse = run_varlen(case, True, BACKEND, return_lse=True)
    assert torch.equal(out[:68], torch.zeros_like(out[:68]))  # query i sees keys j <= i - 68
    assert torch.isneginf(lse[:, :68]).all() and torch.isfinite(lse[:, 68:]).all()
    (out.float().sum() + torch.where(torch.isfinite(lse), lse, 0.0).sum()).backward()
    for x in (case.q, case.k, case.v):
        assert torch.isfinite(x.grad).all()
    assert torch.equal(case.q.grad[:68], torch.zeros_like(case.q.grad[:68]))


def _poison_allocator():
    """Fill freed blocks of the caching allocator with 0xFF (NaN in fp16, bf16 and fp32), in the
    large pool and in the small one (allocations <= 1 MB), so unwritten outputs show up as NaN."""
    big = torch.empty(256 << 20, dtype=torch.uint8, device="cuda").fill_(255)
    small = [torch.empty(256 << 10, dtype=torch.uint8, device="cuda").fill_(255) for _ in range(64)]
    del big, small


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
def test_every_output_element_is_written(gen, d):
    _needs_cuda_backend()
    dtype = torch.float16
    case = _case([1, 97, 0, 300, 65], [5, 0, 3, 256, 64], 8, 2, d, "mid", gen, dtype)
    args = _args(case, True)
    torch.cuda.synchronize()
    clean_out, clean_lse = torch.ops.generalist._attention_fwd_cuda(*args)
    dout = torch.randn(case.q.shape, generator=gen).to("cuda", dtype)
    dlse = torch.randn(clean_lse.shape, generator=gen).cuda()
    clean_grads = torch.ops.generalist._attention_bwd_cuda(dout, dlse, case.q, case.k, case.v, clean_out, clean_lse,
                                                          *args[3:])
    for _ in range(2):
        _poison_allocator()
        out, lse = torch.ops.generalist._attention_fwd_cuda(*args)
        _poison_allocator()
        grads = torch.ops.generalist._attention_bwd_cuda(dout, dlse, case.q, case.k, case.v, clean_out, clean_lse,
                                                        *args[3:])
        assert torch.isfinite(out).all() and not torch.isnan(lse).any()
        assert torch.equal(out, clean_out) and torch.equal(lse, clean_lse)
        for name, g, c in zip("qkv", grads, clean_grads):
            assert torch.isfinite(g).all(), f"d{name} has unwritten elements"
            assert torch.equal(g, c), f"d{name} differs between runs"


@pytest.mark.gpu
def test_dlse_none_equals_zeros_and_is_deterministic(gen):
    _needs_cuda_backend()
    case = _case([33, 200], [40, 200], 4, 2, 64, [10, 0], gen, torch.bfloat16)
    args = _args(case, True)
    out, lse = torch.ops.generalist._attention_fwd_cuda(*args)
    out2, lse2 = torch.ops.generalist._attention_fwd_cuda(*args)
    assert torch.equal(out, out2) and torch.equal(lse, lse2)
    dout = torch.randn(case.q.shape, generator=gen).to("cuda", torch.bfloat16)
    bwd = lambda dlse: torch.ops.generalist._attention_bwd_cuda(dout, dlse, case.q, case.k, case.v, out, lse,
                                                               *args[3:])
    none, zeros, again = bwd(None), bwd(torch.zeros_like(lse)), bwd(None)
    for a, b, c in zip(none, zeros, again):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.gpu
def test_strided_and_misaligned_inputs(gen):
    """q/k/v as views into one packed qkv tensor (read in place), and views whose data pointer is
    not 16-byte aligned (copied first): both equal the contiguous inputs' result."""
    _needs_cuda_backend()
    b, s, h, d = 2, 77, 4, 64
    qkv = torch.randn(b, s, 3, h, d, generator=gen).to("cuda", torch.float16)
    q, k, v = qkv.unbind(2)
    want, want_lse = flash_attn_func(*(x.contiguous() for x in (q, k, v)), causal=True, return_lse=True,
                                     backend="cuda")
    out, lse = flash_attn_func(q, k, v, causal=True, return_lse=True, backend="cuda")
    assert torch.equal(out, want) and torch.equal(lse, want_lse)
    flat = torch.empty(qkv.numel() + 1, dtype=qkv.dtype, device="cuda")
    shifted = flat[1:].view(qkv.shape)
    shifted.copy_(qkv)
    out, lse = flash_attn_func(*shifted.unbind(2), causal=True, return_lse=True, backend="cuda")
    assert torch.equal(out, want) and torch.equal(lse, want_lse)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_dense_equals_varlen_and_sdpa(gen, causal):
    _needs_cuda_backend()
    b, sq, sk, h, hkv, d = 3, 100, 130, 8, 2, 128
    q = torch.randn(b, sq, h, d, generator=gen).to("cuda", torch.bfloat16)
    k, v = torch.randn(2, b, sk, hkv, d, generator=gen).to("cuda", torch.bfloat16)
    out = flash_attn_func(q, k, v, causal=causal, backend="cuda")
    cu_q = torch.arange(b + 1, dtype=torch.int32, device="cuda") * sq
    cu_k = torch.arange(b + 1, dtype=torch.int32, device="cuda") * sk
    vout = flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_q, cu_k, sq, sk,
                                  causal=causal, backend="cuda")
    assert torch.equal(out.flatten(0, 1), vout)
    mask = torch.ones(sq, sk, dtype=torch.bool, device="cuda").tril(sk - sq) if causal else None
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2).float(), k.transpose(1, 2).float(), v.transpose(1, 2).float(), enable_gqa=True,
        attn_mask=mask)
    torch.testing.assert_close(out.float(), sdpa.transpose(1, 2), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_opcheck(gen):
    _needs_cuda_backend()
    case = _case([5, 0, 70], [7, 3, 90], 4, 2, 64, "mid", gen, torch.float16, requires_grad=True)
    op_args = _args(case, True) + ("cuda",)
    torch.library.opcheck(torch.ops.generalist.attention_fwd.default, op_args)
    out, lse = torch.ops.generalist.attention_fwd(*op_args)
    bwd_args = (torch.randn_like(out), torch.randn_like(lse), case.q.detach(), case.k.detach(), case.v.detach(),
                out.detach(), lse.detach()) + op_args[3:]
    torch.library.opcheck(torch.ops.generalist.attention_bwd.default, bwd_args)


@pytest.mark.gpu
def test_torch_compile_fullgraph(gen):
    _needs_cuda_backend()
    case = _case([7, 120], [9, 120], 4, 2, 64, [3, 60], gen, torch.bfloat16, requires_grad=True)

    def f(q, k, v, cu_q, cu_k, prefix_lens):
        out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 120, 120, causal=True, prefix_lens=prefix_lens,
                                     backend="cuda")
        return (out.float() ** 2).sum()

    args = (case.q, case.k, case.v, case.cu_q, case.cu_k, case.prefix_lens)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
    got_grads = torch.autograd.grad(got, (case.q, case.k, case.v))
    want = f(*args)
    want_grads = torch.autograd.grad(want, (case.q, case.k, case.v))
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,d,reason", [(torch.float16, 40, "head dim 40"), (torch.float32, 64, "dtype"),
                                            (torch.bfloat16, 256, "head dim 256")])
def test_unsupported_inputs_fall_back_under_auto(gen, monkeypatch, dtype, d, reason):
    _needs_cuda_backend()
    monkeypatch.setenv("GENERALIST_TRITON_AUTOTUNE", "0")  # correctness, not speed
    case = _case([9, 70], [11, 70], 4, 2, d, None, gen, dtype)
    with pytest.raises(BackendError, match=f"backend 'cuda' cannot serve these inputs: {reason}"):
        run_varlen(case, True, "cuda")
    picked = ATTENTION_BACKENDS.resolve("auto", *_args(case, True)).name
    assert picked != "cuda"
    if "triton" in ATTENTION_BACKENDS.available():
        assert picked == "triton"
    out = run_varlen(case, True, "auto")
    want, _ = naive_attention(case.q, case.k, case.v, case.lens_q, case.lens_k, causal=True)
    same, _ = naive_attention(case.q, case.k, case.v, case.lens_q, case.lens_k, causal=True, dtype=dtype)
    assert max_err(out, want) <= 2 * max_err(same, want) + ATOL.get(dtype, 1e-5)
