"""The attention contract (DESIGN.md), held against a naive float64 implementation.

Every backend is tested here through `backend=`; today the registry holds the reference, and
compiled/Triton backends join the parametrization as they register.
"""

import pytest
import torch

from generalist.ops import BackendError, flash_attn_func, flash_attn_varlen_func
from generalist.testing import naive_attention, random_varlen

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}

# (lens_q, lens_k, H, Hkv, D, causal, prefix)
CASES = [
    ([97], [97], 4, 4, 40, False, None),
    ([97], [97], 4, 2, 111, True, None),
    ([1, 97, 0, 13], [1, 97, 0, 13], 8, 1, 64, True, None),  # MQA, an empty sequence, length 1
    ([1025], [1025], 2, 2, 32, True, None),
    ([5, 0, 33], [9, 4, 40], 4, 2, 16, True, "mid"),  # cross: Sq < Sk, bottom-right causal
    ([40, 7], [9, 3], 8, 8, 24, True, None),  # cross: Sq > Sk, first rows see nothing
    ([40, 7], [9, 3], 8, 8, 24, False, None),
    ([31, 17], [31, 17], 8, 1, 40, True, "zero"),
    ([31, 17], [31, 17], 8, 2, 40, True, "mid"),
    ([31, 17], [31, 17], 8, 4, 40, True, "full"),
    ([12, 0], [0, 6], 2, 1, 8, False, None),  # a query sequence with no keys at all
]


def _run(case, causal, backend="reference", **kw):
    return flash_attn_varlen_func(case.q, case.k, case.v, case.cu_q, case.cu_k, max(case.lens_q, default=0),
                                  max(case.lens_k, default=0), causal=causal, prefix_lens=case.prefix_lens,
                                  backend=backend, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lens_q,lens_k,h,hkv,d,causal,prefix", CASES)
def test_forward_matches_float64(gen, lens_q, lens_k, h, hkv, d, causal, prefix, dtype):
    case = random_varlen(lens_q, lens_k, h, hkv, d, dtype=dtype, prefix=prefix, generator=gen)
    out, lse = _run(case, causal, return_lse=True)
    want, want_lse = naive_attention(case.q, case.k, case.v, lens_q, lens_k, causal=causal, prefix_lens=case.prefix_lens)
    same_dtype, _ = naive_attention(case.q, case.k, case.v, lens_q, lens_k, causal=causal,
                                    prefix_lens=case.prefix_lens, dtype=dtype)
    assert out.dtype == dtype and out.shape == case.q.shape
    assert lse.dtype == torch.float32 and lse.shape == (h, sum(lens_q))
    assert torch.isfinite(out).all()
    err = (out.double() - want).abs().max().item() if out.numel() else 0.0
    baseline = (same_dtype.double() - want).abs().max().item() if out.numel() else 0.0
    assert err <= 2 * baseline + ATOL[dtype], f"error {err} vs same-dtype PyTorch {baseline} (seed {gen.initial_seed()})"
    finite = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    torch.testing.assert_close(lse[finite].double(), want_lse[finite], atol=1e-4, rtol=1e-4)


def test_rows_without_keys_are_zero_with_lse_minus_inf(gen):
    case = random_varlen([6], [2], 2, 2, 8, generator=gen, requires_grad=True)
    out, lse = _run(case, causal=True, return_lse=True)
    assert torch.equal(out[:4], torch.zeros_like(out[:4]))  # query i sees keys j <= i - 4
    assert torch.isneginf(lse[:, :4]).all() and torch.isfinite(lse[:, 4:]).all()
    out.sum().backward()
    for x in (case.q, case.k, case.v):
        assert torch.isfinite(x.grad).all()
    assert torch.equal(case.q.grad[:4], torch.zeros_like(case.q.grad[:4]))


def test_varlen_equals_each_sequence_alone(gen):
    lens_q, lens_k = [13, 0, 50, 1], [20, 3, 50, 8]
    case = random_varlen(lens_q, lens_k, 4, 2, 32, prefix=[5, 0, 20, 8], generator=gen)
    out = _run(case, causal=True)
    sq = sk = 0
    for b, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        one = flash_attn_varlen_func(case.q[sq:sq + lq], case.k[sk:sk + lk], case.v[sk:sk + lk],
                                     torch.tensor([0, lq], dtype=torch.int32), torch.tensor([0, lk], dtype=torch.int32),
                                     lq, lk, causal=True, prefix_lens=case.prefix_lens[b:b + 1])
        torch.testing.assert_close(out[sq:sq + lq], one, atol=1e-6, rtol=1e-6)
        sq, sk = sq + lq, sk + lk


@pytest.mark.parametrize("causal", [False, True])
def test_dense_equals_varlen_with_equal_lengths(gen, causal):
    b, sq, sk, h, hkv, d = 3, 17, 29, 6, 3, 40
    q = torch.randn(b, sq, h, d, generator=gen)
    k, v = torch.randn(2, b, sk, hkv, d, generator=gen)
    out, lse = flash_attn_func(q, k, v, causal=causal, return_lse=True)
    cu_q = torch.arange(b + 1, dtype=torch.int32) * sq
    cu_k = torch.arange(b + 1, dtype=torch.int32) * sk
    vout, vlse = flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_q, cu_k, sq, sk,
                                        causal=causal, return_lse=True)
    assert out.shape == (b, sq, h, d) and lse.shape == (b, h, sq)
    assert torch.equal(out.flatten(0, 1), vout)
    assert torch.equal(lse, vlse.view(h, b, sq).transpose(0, 1))
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=True,
        attn_mask=torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq) if causal else None)
    torch.testing.assert_close(out, sdpa.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_softmax_scale(gen):
    case = random_varlen([9], [11], 2, 1, 16, generator=gen)
    out = flash_attn_varlen_func(case.q, case.k, case.v, case.cu_q, case.cu_k, 9, 11, softmax_scale=0.3)
    want, _ = naive_attention(case.q, case.k, case.v, [9], [11], scale=0.3)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("lens_q,lens_k,h,hkv,d,causal,prefix", [c for c in CASES if sum(c[0]) < 200])
def test_gradients_match_float64(gen, lens_q, lens_k, h, hkv, d, causal, prefix):
    case = random_varlen(lens_q, lens_k, h, hkv, d, prefix=prefix, generator=gen, requires_grad=True)
    out, lse = _run(case, causal, return_lse=True)
    dout = torch.randn(out.shape, generator=gen)
    dlse = torch.randn(lse.shape, generator=gen)
    finite = torch.isfinite(lse)
    ((out * dout).sum() + (lse[finite] * dlse[finite]).sum()).backward()
    got = [x.grad.clone() for x in (case.q, case.k, case.v)]
    for x in (case.q, case.k, case.v):
        x.grad = None
    want_out, want_lse = naive_attention(case.q, case.k, case.v, lens_q, lens_k, causal=causal, prefix_lens=case.prefix_lens)
    ((want_out * dout.double()).sum() + (want_lse[finite] * dlse[finite].double()).sum()).backward()
    for name, g, x in zip("qkv", got, (case.q, case.k, case.v)):
        torch.testing.assert_close(g, x.grad, atol=2e-5, rtol=1e-4, msg=lambda m: f"d{name}: {m} (seed {gen.initial_seed()})")


@pytest.mark.parametrize("causal,prefix,hkv", [(False, None, 2), (True, None, 1), (True, "mid", 2)])
def test_gradcheck(gen, causal, prefix, hkv):
    case = random_varlen([3, 0, 5], [4, 2, 5], 2, hkv, 4, dtype=torch.float64, prefix=prefix, generator=gen)

    def f(q, k, v):
        out, lse = flash_attn_varlen_func(q, k, v, case.cu_q, case.cu_k, 5, 5, causal=causal,
                                          prefix_lens=case.prefix_lens, return_lse=True)
        return out, torch.where(torch.isfinite(lse), lse, 0.0)

    inputs = tuple(x.detach().requires_grad_() for x in (case.q, case.k, case.v))
    assert torch.autograd.gradcheck(f, inputs)


def _op_args(case, causal, backend="reference"):
    return (case.q, case.k, case.v, case.cu_q, case.cu_k, max(case.lens_q), max(case.lens_k),
            case.q.shape[-1] ** -0.5, causal, case.prefix_lens, backend)


@pytest.mark.parametrize("causal,prefix", [(False, None), (True, "mid")])
def test_opcheck(gen, causal, prefix):
    case = random_varlen([5, 0, 9], [7, 3, 9], 4, 2, 16, prefix=prefix, generator=gen, requires_grad=True)
    torch.library.opcheck(torch.ops.generalist.attention_fwd.default, _op_args(case, causal))
    out, lse = torch.ops.generalist.attention_fwd(*_op_args(case, causal))
    bwd_args = (torch.randn_like(out), torch.randn_like(lse), case.q.detach(), case.k.detach(), case.v.detach(),
                out.detach(), lse.detach()) + _op_args(case, causal)[3:]
    torch.library.opcheck(torch.ops.generalist.attention_bwd.default, bwd_args)


def test_torch_compile_fullgraph(gen):
    case = random_varlen([7, 12], [9, 12], 4, 2, 16, prefix=[3, 6], generator=gen, requires_grad=True)

    def f(q, k, v, cu_q, cu_k, prefix_lens):
        out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 12, 12, causal=True, prefix_lens=prefix_lens)
        return (out * out).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    args = (case.q, case.k, case.v, case.cu_q, case.cu_k, case.prefix_lens)
    got = compiled(*args)
    got_grads = torch.autograd.grad(got, (case.q, case.k, case.v))
    want = f(*args)
    want_grads = torch.autograd.grad(want, (case.q, case.k, case.v))
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)

    dense = torch.compile(lambda q, k, v: flash_attn_func(q, k, v, causal=True), fullgraph=True)
    q, k, v = torch.randn(3, 2, 10, 2, 8, generator=gen)
    torch.testing.assert_close(dense(q, k, v), flash_attn_func(q, k, v, causal=True))


def test_backend_selection(gen):
    case = random_varlen([4], [4], 2, 2, 8, generator=gen)
    with pytest.raises(BackendError, match="unknown backend 'fast'"):
        _run(case, False, backend="fast")
    assert isinstance(BackendError("x"), ValueError)
    from generalist.ops import ATTENTION_BACKENDS

    for name in ATTENTION_BACKENDS.known:
        if name not in ATTENTION_BACKENDS.available():
            with pytest.raises(BackendError, match=f"backend '{name}' is not available"):
                _run(case, False, backend=name)
    torch.testing.assert_close(_run(case, True, backend="auto"), _run(case, True, backend="reference"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_backend_on_cuda(gen, dtype):
    from generalist.ops import ATTENTION_BACKENDS

    case = random_varlen([1, 97, 0, 300], [5, 97, 3, 256], 8, 2, 64, dtype=dtype, prefix="mid", device="cuda",
                         generator=gen)
    want, _ = naive_attention(case.q, case.k, case.v, case.lens_q, case.lens_k, causal=True, prefix_lens=case.prefix_lens)
    same, _ = naive_attention(case.q, case.k, case.v, case.lens_q, case.lens_k, causal=True,
                              prefix_lens=case.prefix_lens, dtype=dtype)
    baseline = (same.double() - want).abs().max().item()
    for backend in ATTENTION_BACKENDS.available():
        out = _run(case, True, backend=backend)
        assert (out.double() - want).abs().max().item() <= 2 * baseline + ATOL[dtype], backend
