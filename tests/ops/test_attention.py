"""The attention contract (DESIGN.md), held against a naive float64 implementation.

Every backend in the registry is tested here through `backend=` ("reference" always; "cpu" when
the extension is built; compiled/Triton backends join as they register). A backend that cannot
serve a test's inputs (say float64 on "cpu") is skipped there with its own reason.
"""

import os
import subprocess
import sys

import pytest
import torch

from generalist import _ext
from generalist.ops import ATTENTION_BACKENDS, BackendError, flash_attn_func, flash_attn_varlen_func
from generalist.testing import NON_FINITE, check_non_finite, naive_attention, random_varlen

ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
# The backends that serve the CPU tensors of these tests; "triton" and "cuda" run the same
# contract on their own devices in test_attention_triton.py and test_attention_cuda.py.
BACKENDS = [name for name in ATTENTION_BACKENDS.available() if name not in ("triton", "cuda")]

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
    ([64, 65, 127, 1], [64, 65, 130, 1], 4, 2, 32, True, None),  # around 64-token tiles
    ([70, 3], [70, 3], 2, 1, 256, True, "mid"),  # the largest head dim
    ([9, 6], [5, 6], 2, 1, 1, True, "full"),  # head dim 1
]


def _args(case, causal):
    return (case.q, case.k, case.v, case.cu_q, case.cu_k, max(case.lens_q, default=0), max(case.lens_k, default=0),
            case.q.shape[-1] ** -0.5, causal, case.prefix_lens)


def _require(backend, case, causal=False):
    """Skips the test when `backend` cannot serve these inputs (the registry says why)."""
    try:
        ATTENTION_BACKENDS.resolve(backend, *_args(case, causal))
    except BackendError as error:
        pytest.skip(str(error))


def _run(case, causal, backend, **kw):
    return flash_attn_varlen_func(case.q, case.k, case.v, case.cu_q, case.cu_k, max(case.lens_q, default=0),
                                  max(case.lens_k, default=0), causal=causal, prefix_lens=case.prefix_lens,
                                  backend=backend, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lens_q,lens_k,h,hkv,d,causal,prefix", CASES)
def test_forward_matches_float64(gen, lens_q, lens_k, h, hkv, d, causal, prefix, dtype, backend):
    case = random_varlen(lens_q, lens_k, h, hkv, d, dtype=dtype, prefix=prefix, generator=gen)
    _require(backend, case, causal)
    out, lse = _run(case, causal, backend, return_lse=True)
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_without_keys_are_zero_with_lse_minus_inf(gen, backend):
    case = random_varlen([6], [2], 2, 2, 8, generator=gen, requires_grad=True)
    _require(backend, case, True)
    out, lse = _run(case, True, backend, return_lse=True)
    assert torch.equal(out[:4], torch.zeros_like(out[:4]))  # query i sees keys j <= i - 4
    assert torch.isneginf(lse[:, :4]).all() and torch.isfinite(lse[:, 4:]).all()
    (out.sum() + torch.where(torch.isfinite(lse), lse, 0.0).sum()).backward()
    for x in (case.q, case.k, case.v):
        assert torch.isfinite(x.grad).all()
    assert torch.equal(case.q.grad[:4], torch.zeros_like(case.q.grad[:4]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where,causal", NON_FINITE)
def test_non_finite_inputs_reach_the_rows_that_see_them(gen, where, causal, backend):
    _require(backend, random_varlen([90, 5], [90, 5], 2, 1, 24), causal)
    check_non_finite(where, causal, backend, gen)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lens_q,lens_k", [([5], [8]), ([5], [70]), ([3, 13], [8, 21])])
def test_a_key_every_query_scores_minus_inf_gets_zero_gradients(gen, backend, lens_q, lens_k):
    """A key holding -inf where every query is positive scores -inf for all of them: no weight,
    so gradients of zero for it, as the float64 reference has (query tiles of fewer than 8 rows
    once gave it NaN, from their padding: 0 * -inf)."""
    case = random_varlen(lens_q, lens_k, 2, 1, 4, generator=gen, requires_grad=True)
    _require(backend, case, False)
    with torch.no_grad():
        case.q.abs_()
        case.k[3, 0, 2] = float("-inf")
    dout = torch.randn(case.q.shape, generator=gen)
    grads = torch.autograd.grad(_run(case, False, backend), (case.q, case.k, case.v), dout)
    leaves = [x.detach().double().requires_grad_() for x in (case.q, case.k, case.v)]
    want, _ = naive_attention(*leaves, lens_q, lens_k, causal=False)
    wants = torch.autograd.grad(want, leaves, dout.double())
    for name, got, ref in zip("qkv", grads, wants):  # (dq: NaN where it multiplies the -inf, as the reference)
        assert name == "q" or torch.isfinite(got).all(), f"{backend}: d{name} not finite"
        torch.testing.assert_close(got.double(), ref, atol=1e-4, rtol=1e-4, equal_nan=True, msg=f"{backend}: d{name}")
    assert torch.equal(grads[2][3], torch.zeros_like(grads[2][3]))  # dv of the key no query weighs


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_equals_each_sequence_alone(gen, backend):
    lens_q, lens_k = [13, 0, 50, 1], [20, 3, 50, 8]
    case = random_varlen(lens_q, lens_k, 4, 2, 32, prefix=[5, 0, 20, 8], generator=gen)
    _require(backend, case, True)
    out = _run(case, True, backend)
    sq = sk = 0
    for b, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        one = flash_attn_varlen_func(case.q[sq:sq + lq], case.k[sk:sk + lk], case.v[sk:sk + lk],
                                     torch.tensor([0, lq], dtype=torch.int32), torch.tensor([0, lk], dtype=torch.int32),
                                     lq, lk, causal=True, prefix_lens=case.prefix_lens[b:b + 1], backend=backend)
        torch.testing.assert_close(out[sq:sq + lq], one, atol=1e-6, rtol=1e-6)
        sq, sk = sq + lq, sk + lk


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_dense_equals_varlen_with_equal_lengths(gen, causal, backend):
    b, sq, sk, h, hkv, d = 3, 17, 29, 6, 3, 40
    q = torch.randn(b, sq, h, d, generator=gen)
    k, v = torch.randn(2, b, sk, hkv, d, generator=gen)
    cu_q = torch.arange(b + 1, dtype=torch.int32) * sq
    cu_k = torch.arange(b + 1, dtype=torch.int32) * sk
    try:
        ATTENTION_BACKENDS.resolve(backend, q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_q, cu_k, sq, sk,
                                   d ** -0.5, causal, None)
    except BackendError as error:
        pytest.skip(str(error))
    out, lse = flash_attn_func(q, k, v, causal=causal, return_lse=True, backend=backend)
    vout, vlse = flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_q, cu_k, sq, sk,
                                        causal=causal, return_lse=True, backend=backend)
    assert out.shape == (b, sq, h, d) and lse.shape == (b, h, sq)
    assert torch.equal(out.flatten(0, 1), vout)
    assert torch.equal(lse, vlse.view(h, b, sq).transpose(0, 1))
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), enable_gqa=True,
        attn_mask=torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq) if causal else None)
    torch.testing.assert_close(out, sdpa.transpose(1, 2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [0.3, -0.2])
def test_softmax_scale(gen, scale, backend):
    case = random_varlen([9], [11], 2, 1, 16, generator=gen)
    _require(backend, case)
    out = flash_attn_varlen_func(case.q, case.k, case.v, case.cu_q, case.cu_k, 9, 11, softmax_scale=scale,
                                 backend=backend)
    want, _ = naive_attention(case.q, case.k, case.v, [9], [11], scale=scale)
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


def _grads(case, causal, backend, dout, dlse):
    """(dq, dk, dv) of sum(out * dout) + sum(lse * dlse) over rows that see a key."""
    out, lse = _run(case, causal, backend, return_lse=True)
    finite = torch.isfinite(lse)
    ((out.float() * dout).sum() + (lse[finite] * dlse[finite]).sum()).backward()
    grads = [x.grad.clone() for x in (case.q, case.k, case.v)]
    for x in (case.q, case.k, case.v):
        x.grad = None
    return grads, finite


def _naive_grads(case, causal, dout, dlse, finite, dtype=torch.float64):
    """The same gradients from naive attention computed in `dtype` (leaves in `dtype` too)."""
    leaves = [x.detach().to(dtype).requires_grad_() for x in (case.q, case.k, case.v)]
    out, lse = naive_attention(*leaves, case.lens_q, case.lens_k, causal=causal, prefix_lens=case.prefix_lens,
                               dtype=dtype)
    ((out.double() * dout.double()).sum() + (lse.double()[finite] * dlse[finite].double()).sum()).backward()
    return [x.grad for x in leaves]


GRAD_CASES = [c for c in CASES if sum(c[0]) < 300]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lens_q,lens_k,h,hkv,d,causal,prefix", GRAD_CASES)
def test_gradients_match_float64(gen, lens_q, lens_k, h, hkv, d, causal, prefix, backend):
    """float32 gradients (with a gradient on lse too) against float64 ones."""
    case = random_varlen(lens_q, lens_k, h, hkv, d, prefix=prefix, generator=gen, requires_grad=True)
    _require(backend, case, causal)
    dout = torch.randn(case.q.shape, generator=gen)
    dlse = torch.randn(h, sum(lens_q), generator=gen)
    got, finite = _grads(case, causal, backend, dout, dlse)
    want = _naive_grads(case, causal, dout, dlse, finite)
    for name, g, w in zip("qkv", got, want):
        torch.testing.assert_close(g.double(), w, atol=2e-5, rtol=1e-4,
                                   msg=lambda m: f"d{name}: {m} (seed {gen.initial_seed()})")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lens_q,lens_k,h,hkv,d,causal,prefix", [CASES[1], CASES[4], CASES[5], CASES[12]])
def test_low_precision_gradients_match_float64(gen, lens_q, lens_k, h, hkv, d, causal, prefix, dtype, backend):
    """Gradients in fp16/bf16: error <= 2 x that of PyTorch computing in the same dtype + atol."""
    case = random_varlen(lens_q, lens_k, h, hkv, d, dtype=dtype, prefix=prefix, generator=gen, requires_grad=True)
    _require(backend, case, causal)
    dout = torch.randn(case.q.shape, generator=gen)
    dlse = torch.randn(h, sum(lens_q), generator=gen)
    got, finite = _grads(case, causal, backend, dout.to(dtype), dlse)
    want = _naive_grads(case, causal, dout.to(dtype), dlse, finite)
    same = _naive_grads(case, causal, dout.to(dtype), dlse, finite, dtype=dtype)
    for name, g, w, s in zip("qkv", got, want, same):
        assert g.dtype == dtype and torch.isfinite(g).all()
        err, baseline = (g.double() - w).abs().max().item(), (s.double() - w).abs().max().item()
        assert err <= 2 * baseline + ATOL[dtype], f"d{name}: error {err} vs same-dtype PyTorch {baseline} (seed {gen.initial_seed()})"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal,prefix,hkv", [(False, None, 2), (True, None, 1), (True, "mid", 2)])
def test_gradcheck(gen, causal, prefix, hkv, backend):
    """float64 gradcheck, on the backends that serve float64 (the reference)."""
    case = random_varlen([3, 0, 5], [4, 2, 5], 2, hkv, 4, dtype=torch.float64, prefix=prefix, generator=gen)
    _require(backend, case, causal)

    def f(q, k, v):
        out, lse = flash_attn_varlen_func(q, k, v, case.cu_q, case.cu_k, 5, 5, causal=causal,
                                          prefix_lens=case.prefix_lens, return_lse=True, backend=backend)
        return out, torch.where(torch.isfinite(lse), lse, 0.0)

    inputs = tuple(x.detach().requires_grad_() for x in (case.q, case.k, case.v))
    assert torch.autograd.gradcheck(f, inputs)


def _op_args(case, causal, backend):
    return _args(case, causal) + (backend,)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal,prefix", [(False, None), (True, "mid")])
def test_opcheck(gen, causal, prefix, backend):
    case = random_varlen([5, 0, 9], [7, 3, 9], 4, 2, 16, prefix=prefix, generator=gen, requires_grad=True)
    _require(backend, case, causal)
    torch.library.opcheck(torch.ops.generalist.attention_fwd.default, _op_args(case, causal, backend))
    out, lse = torch.ops.generalist.attention_fwd(*_op_args(case, causal, backend))
    bwd_args = (torch.randn_like(out), torch.randn_like(lse), case.q.detach(), case.k.detach(), case.v.detach(),
                out.detach(), lse.detach()) + _op_args(case, causal, backend)[3:]
    torch.library.opcheck(torch.ops.generalist.attention_bwd.default, bwd_args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(gen, backend):
    case = random_varlen([7, 12], [9, 12], 4, 2, 16, prefix=[3, 6], generator=gen, requires_grad=True)
    _require(backend, case, True)

    def f(q, k, v, cu_q, cu_k, prefix_lens):
        out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 12, 12, causal=True, prefix_lens=prefix_lens,
                                     backend=backend)
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

    dense = torch.compile(lambda q, k, v: flash_attn_func(q, k, v, causal=True, backend=backend), fullgraph=True)
    q, k, v = torch.randn(3, 2, 10, 2, 8, generator=gen)
    torch.testing.assert_close(dense(q, k, v), flash_attn_func(q, k, v, causal=True, backend=backend))


def test_backend_selection(gen):
    case = random_varlen([4], [4], 2, 2, 8, generator=gen)
    with pytest.raises(BackendError, match="unknown backend 'fast'"):
        _run(case, False, backend="fast")
    assert isinstance(BackendError("x"), ValueError)
    for name in ATTENTION_BACKENDS.known:
        if name not in ATTENTION_BACKENDS.available():
            with pytest.raises(BackendError, match=f"backend '{name}' is not available"):
                _run(case, False, backend=name)
    torch.testing.assert_close(_run(case, True, backend="auto"), _run(case, True, backend="reference"))


def _needs_cpu_backend():
    if "cpu" not in ATTENTION_BACKENDS.available():
        pytest.skip(f"the C++ CPU backend is not built ({_ext.import_error or 'no attention kernels in generalist._C'})")


def test_auto_picks_cpu_backend_on_cpu(gen, monkeypatch):
    _needs_cpu_backend()
    monkeypatch.delenv("GENERALIST_TRITON_ON_CPU", raising=False)  # the Triton interpreter is opt-in on CPU
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        case = random_varlen([5, 3], [5, 4], 2, 1, 8, dtype=dtype, generator=gen)
        assert ATTENTION_BACKENDS.resolve("auto", *_args(case, True)).name == "cpu"
    case = random_varlen([5], [5], 2, 1, 8, dtype=torch.float64, generator=gen)
    assert ATTENTION_BACKENDS.resolve("auto", *_args(case, True)).name == "reference"


def test_cpu_backend_refuses_float64(gen):
    _needs_cpu_backend()
    case = random_varlen([5], [5], 2, 1, 8, dtype=torch.float64, generator=gen)
    with pytest.raises(BackendError, match="backend 'cpu' cannot serve these inputs: float64 is not supported"):
        _run(case, True, backend="cpu")


def test_cpu_backend_does_not_depend_on_thread_count(gen):
    """Bitwise the same with 1 and 2 threads, although 2 threads switch the backward to two passes."""
    _needs_cpu_backend()
    case = random_varlen([130, 70, 5], [140, 70, 9], 4, 1, 40, prefix="mid", generator=gen, requires_grad=True)
    dout = torch.randn(case.q.shape, generator=gen)
    results = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out, lse = _run(case, True, "cpu", return_lse=True)
            (out * dout).sum().backward()
            results.append([out, lse] + [x.grad.clone() for x in (case.q, case.k, case.v)])
            for x in (case.q, case.k, case.v):
                x.grad = None
    finally:
        torch.set_num_threads(old)
    for a, b in zip(*results):
        assert torch.equal(a, b)


_BASELINE_SCRIPT = """
import torch
from generalist.ops import flash_attn_varlen_func
from generalist.testing import random_varlen
assert torch.backends.cpu.get_cpu_capability() == "DEFAULT"
g = torch.Generator().manual_seed(0)
for dtype, tol in ((torch.float32, 2e-5), (torch.bfloat16, 2e-2)):
    case = random_varlen([1, 97, 0, 70], [5, 97, 3, 70], 4, 2, 44, dtype=dtype, prefix="mid", generator=g,
                         requires_grad=True)
    results = []
    for backend in ("cpu", "reference"):
        out, lse = flash_attn_varlen_func(case.q, case.k, case.v, case.cu_q, case.cu_k, 97, 97, causal=True,
                                          prefix_lens=case.prefix_lens, return_lse=True, backend=backend)
        out.float().square().sum().backward()
        results.append([out.float(), torch.where(torch.isfinite(lse), lse, 0.0)] + [x.grad.float() for x in (case.q, case.k, case.v)])
        for x in (case.q, case.k, case.v):
            x.grad = None
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)
"""


def test_cpu_backend_baseline_kernels():
    """The kernels for CPUs without AVX2 (chosen with ATEN_CPU_CAPABILITY=default) agree too."""
    _needs_cpu_backend()
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    result = subprocess.run([sys.executable, "-c", _BASELINE_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_backend_on_cuda(gen, dtype):
    case = random_varlen([1, 97, 0, 300], [5, 97, 3, 256], 8, 2, 64, dtype=dtype, prefix="mid", device="cuda",
                         generator=gen)
    want, _ = naive_attention(case.q, case.k, case.v, case.lens_q, case.lens_k, causal=True, prefix_lens=case.prefix_lens)
    same, _ = naive_attention(case.q, case.k, case.v, case.lens_q, case.lens_k, causal=True,
                              prefix_lens=case.prefix_lens, dtype=dtype)
    baseline = (same.double() - want).abs().max().item()
    for backend in ATTENTION_BACKENDS.available():
        try:
            ATTENTION_BACKENDS.resolve(backend, *_args(case, True))
        except BackendError:
            continue  # e.g. "cpu" serves CPU tensors only
        out = _run(case, True, backend=backend)
        assert (out.double() - want).abs().max().item() <= 2 * baseline + ATOL[dtype], backend


@pytest.mark.gpu
@pytest.mark.parametrize("where,causal", NON_FINITE)
def test_non_finite_inputs_on_cuda(gen, where, causal):
    for backend in ATTENTION_BACKENDS.available():
        case = random_varlen([90, 5], [90, 5], 2, 1, 24, dtype=torch.float16, device="cuda")
        try:
            ATTENTION_BACKENDS.resolve(backend, *_args(case, causal))
        except BackendError:
            continue
        check_non_finite(where, causal, backend, gen, torch.float16, "cuda")


class _NoOpMode(torch.overrides.TorchFunctionMode):
    """A torch-function mode that changes nothing: while it is active the ops must dispatch."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def test_eager_calls_skip_the_op_dispatch_tracing_uses_it(gen, monkeypatch):
    """In eager mode on plain tensors the registered op (whose Python dispatch is host time per
    call) is skipped: without an autograd graph to record the backend's forward is called as it
    is, with one an autograd.Function calls the backend's forward and backward. Both give what the
    op gives, bit for bit. Under FakeTensorMode, or any torch-function mode, the op runs."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    module = sys.modules["generalist.ops.attention"]
    calls = []
    op = module.attention_fwd
    monkeypatch.setattr(module, "attention_fwd", lambda *a: calls.append(1) or op(*a))
    case = random_varlen([5, 0, 9], [7, 3, 9], 4, 2, 16, generator=gen, requires_grad=True)
    args = (case.q, case.k, case.v, case.cu_q, case.cu_k, 9, 9)
    dout = torch.randn(case.q.shape, generator=gen)

    def run():
        out, lse = flash_attn_varlen_func(*args, causal=True, prefix_lens=case.prefix_lens, return_lse=True,
                                          backend="reference")
        grads = torch.autograd.grad((out * dout).sum() + lse.sum(), (case.q, case.k, case.v))
        return out.detach(), lse.detach(), grads

    with torch.no_grad():
        out = flash_attn_varlen_func(*args, causal=True, backend="reference")
    assert not calls
    eager = run()
    assert not calls
    with _NoOpMode():
        dispatched = run()
    assert calls == [1]
    torch.testing.assert_close(out, eager[0], rtol=0, atol=0)
    torch.testing.assert_close(eager, dispatched, rtol=0, atol=0)
    # only lse used, or only out: the missing gradient is zero either way
    for use in (lambda o, lse: lse.sum(), lambda o, lse: (o * dout).sum()):
        got = torch.autograd.grad(use(*flash_attn_varlen_func(*args, causal=True, return_lse=True,
                                                              backend="reference")), (case.q, case.k))
        with _NoOpMode():
            want = torch.autograd.grad(use(*flash_attn_varlen_func(*args, causal=True, return_lse=True,
                                                                   backend="reference")), (case.q, case.k))
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert calls == [1, 1, 1]
    # create_graph: the same first gradients, and a second backward is refused, not silently wrong
    def dq_of(**kw):
        out = flash_attn_varlen_func(*args, causal=True, backend="reference")
        return torch.autograd.grad((out * dout).sum(), case.q, **kw)[0]

    dq = dq_of(create_graph=True)
    torch.testing.assert_close(dq.detach(), dq_of(), rtol=0, atol=0)
    with pytest.raises(RuntimeError):
        (dq ** 2).sum().backward()
    plain = [t.detach() for t in args[:5]]
    # fake tensors have no values to check
    monkeypatch.setattr(sys.modules["generalist.ops._attention_checks"], "_value_checks", False)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in plain]
        with torch.no_grad():
            assert flash_attn_varlen_func(*fake, 9, 9, causal=True, backend="reference").shape == case.q.shape
    assert calls == [1, 1, 1, 1]

def test_the_reference_computes_in_its_own_precision_under_autocast(gen):
    """Autocast would run the reference's fp32 products in bf16 (and return a bf16 lse): it is
    switched off inside, so forward, lse and gradients equal those without autocast."""
    case = random_varlen([5, 9], [7, 9], 4, 2, 16, generator=gen, requires_grad=True)
    args = (case.q, case.k, case.v, case.cu_q, case.cu_k, 9, 9)

    def run():
        out, lse = flash_attn_varlen_func(*args, causal=True, return_lse=True, backend="reference")
        return out, lse, torch.autograd.grad(out.sum() + lse.sum(), (case.q, case.k, case.v))

    want = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run()
    assert got[1].dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)
