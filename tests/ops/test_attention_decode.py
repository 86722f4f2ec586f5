"""The decoding attention op (generalist::attention_decode) against the attention contract.

References: a float64 attention written independently of generalist.ops (generalist.testing),
run on the equivalent packed problem (Lq queries, cache_lens[b] keys, causal bottom-right), and
flash_attn_varlen_func itself. Cache positions past cache_lens hold nan / inf, so a kernel that
reads them fails. Without a GPU the Triton kernels run in Triton's interpreter (tests/conftest.py)
on CPU tensors, opted in with GENERALIST_TRITON_ON_CPU=1; bf16 runs on GPU only. With a GPU the
same tests run on CUDA. Tolerance: error(kernel vs float64) <= 2 x error(PyTorch at the same dtype
vs float64) + atol.
"""

import itertools
import os
import subprocess
import sys

import pytest
import torch

from generalist.ops import BackendError, flash_attn_varlen_func
from generalist.ops.attention_decode import DECODE_BACKENDS, attention_decode
from generalist.testing import check_output, cu_seqlens, naive_attention

# The interpreter indexes with 1-element arrays, which numpy >= 1.25 flags on every loop.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LENS = [0, 1, 97, 300]  # an empty cache, one key, and lengths off the block size, in one batch

# (q_len, H, Hkv, D, num_splits); num_splits 0 lets the kernel choose
CASES = [
    (1, 4, 4, 40, 1),  # no GQA, one split
    (3, 8, 2, 64, 3),  # GQA 4, several splits; cache length 1 < q_len: the first rows see nothing
    (3, 8, 1, 128, 5),  # MQA: 24 query rows per kv head, two row blocks in fp32
    (1, 8, 1, 40, 0),  # MQA, splits chosen by the kernel
    (3, 4, 4, 128, 1),
]


@pytest.fixture
def triton_backend(monkeypatch):
    """Skips unless the triton backend can run here; on CPU, opts in to the interpreter."""
    if "triton" not in DECODE_BACKENDS.available():
        pytest.skip("the triton backend is not registered (no triton)")
    if DEVICE == "cpu":
        from generalist.kernels.triton import decode

        if not decode.interpreting():
            pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1 at import")
        monkeypatch.setenv("GENERALIST_TRITON_ON_CPU", "1")
    return "triton"


@pytest.fixture
def cpu_backend():
    """The C++ backend; the extension is built wherever the suite runs (make setup checks)."""
    if "cpu" not in DECODE_BACKENDS.available():
        pytest.skip("generalist._C is not built")
    return "cpu"


def _problem(lens, q_len, h, hkv, d, gen, dtype=torch.float32, device=DEVICE, capacity=None):
    """q (B, Lq, H, D), k/v caches (B, S, Hkv, D) with nan / inf past each length, cache_lens."""
    b, s = len(lens), max(lens) + 3 if capacity is None else capacity
    make = lambda *shape: torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)
    q, k, v = make(b, q_len, h, d), make(b, s, hkv, d), make(b, s, hkv, d)
    for i, n in enumerate(lens):
        k[i, n:] = float("nan")
        v[i, n:] = float("inf")
    return q, k, v, torch.tensor(lens, dtype=torch.int32, device=device)


def _packed(q, k, v, lens):
    """The same problem packed for flash_attn_varlen_func: (q (B*Lq, H, D), k, v (sum lens, Hkv, D))."""
    keep = [k[i, :n] for i, n in enumerate(lens)]
    return q.flatten(0, 1), torch.cat(keep), torch.cat([v[i, :n] for i, n in enumerate(lens)])


def _float64(q, k, v, lens, dtype=torch.float64):
    """(out (B, Lq, H, D), lse (B, H, Lq)) of the naive attention in `dtype`."""
    b, lq, h, _ = q.shape
    qp, kp, vp = _packed(q, k, v, lens)
    out, lse = naive_attention(qp, kp, vp, [lq] * b, lens, causal=True, dtype=dtype)
    return out.view(q.shape), lse.view(h, b, lq).transpose(0, 1)


def _check_against_float64(q, k, v, lens, out, lse, seed):
    want, want_lse = _float64(q, k, v, lens)
    same_dtype, _ = _float64(q, k, v, lens, dtype=q.dtype)
    check_output(out, lse, want, want_lse, same_dtype, (q.shape[0], q.shape[2], q.shape[1]), seed)
    rows_empty = ~torch.isfinite(want_lse).transpose(1, 2)  # (B, Lq, H)
    assert torch.equal(out[rows_empty], torch.zeros_like(out[rows_empty]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("q_len,h,hkv,d,num_splits", CASES)
def test_triton_matches_float64(gen, triton_backend, q_len, h, hkv, d, num_splits, dtype):
    q, k, v, lens = _problem(LENS, q_len, h, hkv, d, gen, dtype=dtype)
    out, lse = attention_decode(q, k, v, lens, num_splits=num_splits, return_lse=True, backend=triton_backend)
    _check_against_float64(q, k, v, LENS, out, lse, gen.initial_seed())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("q_len,h,hkv,d,num_splits", CASES + [(70, 2, 1, 256, 0), (2, 6, 3, 1, 0), (1, 6, 2, 24, 0), (1, 80, 1, 16, 0)])
def test_cpu_matches_float64(gen, cpu_backend, q_len, h, hkv, d, num_splits, dtype):
    """Every case of the triton test, and more query rows than one tile (70 > 64) at head dim 256,
    head dim 1, and one new token with GQA 3 and with 80 query heads on one kv head (each kv head's
    query heads are one tile's rows then: more rows than a tile)."""
    q, k, v, lens = _problem(LENS, q_len, h, hkv, d, gen, dtype=dtype, device="cpu")
    out, lse = attention_decode(q, k, v, lens, num_splits=num_splits, return_lse=True, backend=cpu_backend)
    assert out.dtype == dtype and lse.dtype == torch.float32
    _check_against_float64(q, k, v, LENS, out, lse, gen.initial_seed())


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("q_len", [1, 2])
def test_one_sequence(gen, request, backend, q_len):
    """A batch of one sequence (one example decoded alone, the model's usual inference) with GQA
    over several kv heads: one new token folds each kv head's query heads into rows of one
    tensor, whose layout differs with a single sequence."""
    if backend != "reference":
        request.getfixturevalue(f"{backend}_backend")
    if backend == "cpu" and DEVICE != "cpu":
        pytest.skip("the cpu backend serves CPU tensors; this test's inputs are on the GPU here")
    for h, hkv, d, lens in ((4, 2, 16, [37]), (8, 2, 24, [70]), (6, 3, 8, [1])):
        q, k, v, cache_lens = _problem(lens, q_len, h, hkv, d, gen)
        out, lse = attention_decode(q, k, v, cache_lens, return_lse=True, backend=backend)
        _check_against_float64(q, k, v, lens, out, lse, gen.initial_seed())


def test_cpu_strided_caches_thread_counts_and_bad_lengths(gen, cpu_backend, monkeypatch):
    """Views into one (B, S, 2, Hkv, D) buffer (copied before the kernel reads them) and caches
    sliced from longer buffers, as the model's are (read in place; the buffers' rows past the
    slice hold nan); a sliced q; the same bits on 1 thread as on 2; a length past the capacity
    refused by the kernel itself with the value checks off."""
    lens, h, hkv, d = [33, 7, 64, 0], 4, 2, 32
    kv = torch.randn(4, 80, 2, hkv, d, generator=gen)
    buffers = torch.randn(2, 4, 96, hkv, d, generator=gen)
    for i, n in enumerate(lens):  # stale entries past every length, and past the slice
        kv[i, n:] = float("nan")
        buffers[:, i, n:] = float("nan")
    cache_lens = torch.tensor(lens, dtype=torch.int32)
    for (k, v), q_len in itertools.product((kv.unbind(2), buffers[:, :, :80].unbind(0)), (1, 2)):
        # one new token folds each kv head's query heads into one tile
        q = torch.randn(4, q_len, 2 * h, d, generator=gen)[:, :, ::2]
        want, want_lse = attention_decode(q, k, v, cache_lens, return_lse=True, backend="reference")
        threads = torch.get_num_threads()
        try:
            runs = []
            for n in (1, 2):
                torch.set_num_threads(n)
                runs.append(attention_decode(q, k, v, cache_lens, return_lse=True, backend=cpu_backend))
        finally:
            torch.set_num_threads(threads)
        assert all(torch.equal(a, b) for a, b in zip(*runs))
        torch.testing.assert_close(runs[0][0], want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(runs[0][1], want_lse, atol=1e-5, rtol=1e-5)
    from generalist.ops import set_value_checks

    set_value_checks(False)
    try:
        with pytest.raises(RuntimeError, match=r"cache_lens must lie in \[0, 80\].*got 81 for sequence 1"):
            attention_decode(q, k, v, torch.tensor([3, 81, 0, 0], dtype=torch.int32), backend=cpu_backend)
    finally:
        set_value_checks(True)


def test_opcheck_cpu(gen, cpu_backend):
    q, k, v, lens = _problem([9, 0, 4], 2, 4, 2, 16, gen, device="cpu")
    torch.library.opcheck(torch.ops.generalist.attention_decode.default, (q, k, v, lens, 0.25, 0, cpu_backend))


@pytest.mark.parametrize("q_len,h,hkv,d,num_splits", CASES[:3])
def test_reference_matches_float64(gen, q_len, h, hkv, d, num_splits):
    q, k, v, lens = _problem(LENS, q_len, h, hkv, d, gen, device="cpu")
    out, lse = attention_decode(q, k, v, lens, return_lse=True, backend="reference")
    _check_against_float64(q, k, v, LENS, out, lse, gen.initial_seed())
    # float64 inputs are computed in float64
    q, k, v = q.double(), k.double(), v.double()
    out, lse = attention_decode(q, k, v, lens, return_lse=True, backend="reference")
    want, want_lse = _float64(q, k, v, LENS)
    assert out.dtype == lse.dtype == torch.float64
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, want_lse, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("where,pos", [("q", 1), ("k", 69), ("v", 10)])
def test_a_nan_reaches_the_rows_that_see_it(gen, request, backend, where, pos):
    """A NaN in a query row, or in a cached key or value the rows see, makes NaN what it makes
    NaN in the float64 reference (never zeros, nor a finite row that left the key out). Key 69
    of 70 is seen by the last of two new tokens only."""
    if backend != "reference":
        request.getfixturevalue(f"{backend}_backend")
    if backend == "cpu" and DEVICE != "cpu":
        pytest.skip("the cpu backend serves CPU tensors; this test's inputs are on the GPU here")
    lens = [5, 70]
    q, k, v, cache_lens = _problem(lens, 2, 4, 2, 16, gen)
    if where == "q":
        q[1, pos, 0, 3] = float("nan")
    else:
        {"k": k, "v": v}[where][1, pos, 0, 3] = float("nan")
    out, lse = attention_decode(q, k, v, cache_lens, return_lse=True, backend=backend)
    want, want_lse = _float64(q, k, v, lens)
    nan = torch.isnan(want)
    assert nan.any() and not nan.all()
    assert torch.equal(torch.isnan(out), nan)
    assert torch.equal(torch.isfinite(lse), torch.isfinite(want_lse))
    torch.testing.assert_close(out[~nan].double(), want[~nan], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_equals_flash_attn_varlen_on_the_packed_problem(gen, request, backend):
    if backend != "reference":
        request.getfixturevalue(f"{backend}_backend")
    if backend == "cpu" and DEVICE != "cpu":
        pytest.skip("the cpu backend serves CPU tensors; this test's inputs are on the GPU here")
    lens, q_len, h, hkv = [5, 0, 40, 2], 3, 4, 2
    q, k, v, cache_lens = _problem(lens, q_len, h, hkv, 24, gen)
    out, lse = attention_decode(q, k, v, cache_lens, softmax_scale=0.3, num_splits=2, return_lse=True,
                                backend=backend)
    qp, kp, vp = _packed(q, k, v, lens)
    want, want_lse = flash_attn_varlen_func(qp, kp, vp, cu_seqlens([q_len] * 4, DEVICE), cu_seqlens(lens, DEVICE),
                                            q_len, max(lens), softmax_scale=0.3, causal=True, return_lse=True,
                                            backend="reference")
    torch.testing.assert_close(out.flatten(0, 1), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse.view(h, 4, q_len).transpose(0, 1), atol=1e-5, rtol=1e-5)


def test_reference_ignores_autocast(gen):
    """The reference computes in fp32 under autocast too (it is switched off inside)."""
    q, k, v, lens = _problem([5, 9], 2, 4, 2, 16, gen, device="cpu")
    want = attention_decode(q, k, v, lens, return_lse=True, backend="reference")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = attention_decode(q, k, v, lens, return_lse=True, backend="reference")
    assert got[1].dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_triton_strided_caches_and_capacity(gen, triton_backend):
    """k/v caches as views into one (B, S, 2, Hkv, D) buffer, q a slice, cache_lens a column of a
    table; a large unused capacity."""
    lens, h, hkv, d = [33, 7, 64], 4, 2, 32
    kv = torch.randn(3, 80, 2, hkv, d, generator=gen).to(DEVICE)
    k, v = kv.unbind(2)
    q = torch.randn(3, 2, 2 * h, d, generator=gen).to(DEVICE)[:, :, ::2]
    cache_lens = torch.tensor([[n, 0] for n in lens], dtype=torch.int32, device=DEVICE)[:, 0]
    assert not cache_lens.is_contiguous()
    for splits in (1, 3):
        out, lse = attention_decode(q, k, v, cache_lens, num_splits=splits, return_lse=True, backend=triton_backend)
        want, want_lse = attention_decode(q, k, v, cache_lens, return_lse=True, backend="reference")
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)


def test_triton_is_deterministic_and_split_invariant(gen, triton_backend):
    q, k, v, lens = _problem([300, 97], 2, 4, 1, 16, gen)
    runs = [attention_decode(q, k, v, lens, num_splits=n, return_lse=True, backend=triton_backend) for n in (4, 4, 1)]
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    for a, b in zip(runs[0], runs[2]):  # splitting changes only the summation order
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_auto_and_refusals(gen, monkeypatch):
    q, k, v, lens = _problem([4, 2], 1, 2, 2, 8, gen, device="cpu")
    monkeypatch.delenv("GENERALIST_TRITON_ON_CPU", raising=False)
    want = attention_decode(q, k, v, lens, backend="reference")
    # "auto" never picks the interpreter on CPU: the C++ kernel where it is built, else the reference
    auto = "cpu" if "cpu" in DECODE_BACKENDS.available() else "reference"
    assert torch.equal(attention_decode(q, k, v, lens), attention_decode(q, k, v, lens, backend=auto))
    torch.testing.assert_close(attention_decode(q, k, v, lens), want, atol=1e-5, rtol=1e-5)
    if auto == "cpu":
        with pytest.raises(BackendError, match="backend 'cpu' cannot serve these inputs: float64"):
            attention_decode(q.double(), k.double(), v.double(), lens, backend="cpu")
    if "triton" in DECODE_BACKENDS.available():
        with pytest.raises(BackendError, match="backend 'triton' cannot serve these inputs: CPU tensors"):
            attention_decode(q, k, v, lens, backend="triton")
        monkeypatch.setenv("GENERALIST_TRITON_ON_CPU", "1")
        with pytest.raises(BackendError, match="backend 'triton' cannot serve these inputs: dtype torch.float64"):
            attention_decode(q.double(), k.double(), v.double(), lens, backend="triton")
    with pytest.raises(BackendError, match="unknown backend 'cuda'"):
        attention_decode(q, k, v, lens, backend="cuda")


def _bad(name):
    """Valid inputs (B=2, Lq=1, H=4, Hkv=2, D=8, S=5) with one thing broken."""
    q, k, v = torch.randn(2, 1, 4, 8), torch.randn(2, 5, 2, 8), torch.randn(2, 5, 2, 8)
    lens = torch.tensor([5, 3], dtype=torch.int32)
    kw = {}
    if name == "q 3-d":
        q = q[:, 0]
    elif name == "v shape":
        v = v[:, :4]
    elif name == "k dtype":
        k = k.double()
    elif name == "q dtype":
        q, k, v = q.int(), k.int(), v.int()
    elif name == "batch":
        q = q[:1]
    elif name == "head dim":
        k, v = k[..., :6], v[..., :6]
    elif name == "heads":
        q = torch.randn(2, 1, 3, 8)
    elif name == "lens dtype":
        lens = lens.long()
    elif name == "lens shape":
        lens = lens[:1]
    elif name == "lens too long":
        lens = torch.tensor([6, 3], dtype=torch.int32)
    elif name == "lens negative":
        lens = torch.tensor([-1, 3], dtype=torch.int32)
    elif name == "splits":
        kw["num_splits"] = -1
    elif name == "splits type":
        kw["num_splits"] = 2.5
    elif name == "scale":
        kw["softmax_scale"] = float("nan")
    elif name == "grad":
        q.requires_grad_()
    return (q, k, v, lens), kw


@pytest.mark.parametrize("name,match", [
    ("q 3-d", r"q must have shape \(B, Lq, H, D\)"),
    ("v shape", "k_cache and v_cache must have the same shape"),
    ("k dtype", "k_cache has dtype torch.float64"),
    ("q dtype", "q has unsupported dtype"),
    ("batch", "k_cache holds 2 sequences but q has 1"),
    ("head dim", "k_cache head dim 6 differs from q head dim 8"),
    ("heads", r"q's number of heads \(3\) must be a multiple of k_cache's \(2\)"),
    ("lens dtype", "cache_lens must be int32"),
    ("lens shape", r"cache_lens must have shape \(2,\)"),
    ("lens too long", r"cache_lens must lie in \[0, 5\]"),
    ("lens negative", r"cache_lens must lie in \[0, 5\]"),
    ("splits", "num_splits must be >= 0"),
    ("splits type", "num_splits must be an int"),
    ("scale", "softmax_scale must be finite"),
    ("grad", "q requires grad, but attention_decode is inference-only"),
])
def test_bad_inputs_raise_value_errors_naming_the_argument(name, match):
    args, kw = _bad(name)
    with pytest.raises(ValueError, match=match):
        attention_decode(*args, **kw)


def test_no_lengths_means_the_whole_cache_without_a_value_check(gen, monkeypatch):
    """cache_lens=None: every sequence fills its cache (the generate path), and the values are
    never read back to the host."""
    q, k, v, _ = _problem([6, 6, 6], 2, 4, 2, 16, gen, capacity=6)
    full = torch.full((3,), 6, dtype=torch.int32, device=q.device)
    want = attention_decode(q, k, v, full, backend="reference")
    called = []
    monkeypatch.setattr(torch.Tensor, "min", lambda *a, **kw: called.append(1) or torch.tensor(0))
    got = attention_decode(q, k, v, None, backend="reference")
    assert not called
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_no_backward():
    args, _ = _bad("grad")
    with torch.no_grad():  # fine without grad mode
        attention_decode(*args)
    out, _ = torch.ops.generalist.attention_decode(*args, 0.5, 0, "reference")  # the raw op has no autograd
    with pytest.raises(RuntimeError, match="no autograd formula was registered"):
        out.sum().backward()


def test_opcheck_reference(gen):
    q, k, v, lens = _problem([5, 0, 9], 2, 4, 2, 16, gen, device="cpu")
    torch.library.opcheck(torch.ops.generalist.attention_decode.default, (q, k, v, lens, 0.25, 0, "reference"))


def test_opcheck_triton(gen, triton_backend):
    q, k, v, lens = _problem([5, 0, 40], 1, 4, 2, 16, gen)
    torch.library.opcheck(torch.ops.generalist.attention_decode.default, (q, k, v, lens, 0.25, 2, triton_backend))


def test_eager_calls_skip_the_op_dispatch_but_tracing_uses_the_op(gen, monkeypatch):
    """Eager calls on plain tensors go straight to the backend (the registered op's Python dispatch
    costs more host time than a decoding step's kernel); under FakeTensorMode the op (with its fake
    implementation) is used."""
    import sys

    from torch._subclasses.fake_tensor import FakeTensorMode

    M = sys.modules["generalist.ops.attention_decode"]  # the module (the package exports the function)

    q, k, v, lens = _problem([5, 0, 9], 2, 4, 2, 16, gen, device="cpu")
    want = torch.ops.generalist.attention_decode(q, k, v, lens, 0.25, 0, "reference")
    calls = []
    op = M.attention_decode_op
    monkeypatch.setattr(M, "attention_decode_op", lambda *a: calls.append(1) or op(*a))
    got = attention_decode(q, k, v, lens, 0.25, return_lse=True, backend="reference")
    assert not calls
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        out = attention_decode(fq, fk, fv, None, 0.25, backend="reference")  # None: no value check
    assert calls and out.shape == q.shape


def test_torch_compile_fullgraph(gen):
    q, k, v, lens = _problem([5, 0, 9], 1, 4, 1, 16, gen, device="cpu")
    f = lambda q, k, v, lens: attention_decode(q, k, v, lens, return_lse=True, backend="reference")
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, lens)
    for a, b in zip(got, f(q, k, v, lens)):
        torch.testing.assert_close(a, b)


# Compiling for a GPU needs no GPU: Triton's bundled ptxas builds sm_80 / sm_90 code here, which
# keeps the kernels from rotting where the interpreter would still run them, and shows spills.
_COMPILE_SCRIPT = r"""
import os, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from generalist.kernels.triton import decode as K

arch, dtype, block_d = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
elem = 4 if dtype == "fp32" else 2
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
runs = [(K._decode_reduce_kernel, dict(BLOCK_S=K.MAX_SPLITS), (4, 1))]
for max_m, bn, warps, stages in K._CONFIGS[(elem, block_d)]:  # each entry at its largest BLOCK_M
    runs.append((K._decode_split_kernel, dict(BLOCK_M=max_m, BLOCK_N=bn, DOT_PRECISION="ieee" if elem == 4 else "tf32"),
                 (warps, stages)))
# a full head dim on aligned tensors (pointers and strides divisible by 16, as contiguous ones
# with a head dim of 16k are, close to a real launch: there the few strides of the lse buffers that
# are 1 become constants; Hopper only, see decode._CONFIGS) and not, a masked head dim
for head_dim, aligned in ((block_d, True), (block_d, False), (block_d - 3, False)):
    if aligned and arch < 90:
        continue
    for fn, cx, (warps, stages) in runs:
        cx = dict(cx, HEAD_DIM=head_dim, BLOCK_D=block_d)
        sig = {a: "constexpr" if a in cx else ("*i32" if a == "CACHE_LENS" else
               "*fp32" if a in ("LSE", "OUT_PART", "LSE_PART") else f"*{dtype}" if a.isupper() else
               "fp32" if a == "softmax_scale" else "i32") for a in fn.arg_names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
                 if aligned and a not in cx and (a.isupper() or a.startswith("stride"))}
        kernel = triton.compile(ASTSource(fn, sig, constexprs=cx, attrs=attrs), target=GPUTarget("cuda", arch, 32),
                                options={"num_warps": warps, "num_stages": stages})
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"]); f.flush()
            usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
        print(fn.__name__, dtype, head_dim, cx.get("BLOCK_M"), "aligned" if aligned else "unaligned",
              *[w for w in usage.split() if w.startswith(("REG", "STACK"))])
"""


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype,block_d", [("fp16", 64), ("bf16", 128), ("fp16", 256), ("fp32", 64), ("fp32", 128),
                                           ("fp32", 256)])
def test_kernels_compile_for_gpu_without_spills(arch, dtype, block_d):
    """Every configuration of the table, for a full head dim (also on aligned tensors on Hopper) and
    a masked head dim, and the reduce kernel."""
    import triton

    from generalist.kernels.triton import decode

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")):
        pytest.skip("this triton has no bundled CUDA tools")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, str(arch), dtype, str(block_d)],
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    assert len(lines) == (3 if arch >= 90 else 2) * (1 + len(decode._CONFIGS[(4 if dtype == "fp32" else 2, block_d)])), \
        run.stdout
    for line in lines:
        assert "STACK:0" in line.split(), f"register spills: {line}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("q_len,h,hkv,d,num_splits", [(1, 32, 8, 128, 0), (4, 32, 1, 64, 0), (1, 8, 8, 256, 16),
                                                      (2, 16, 2, 40, 1)])
def test_cuda_against_float64(gen, dtype, q_len, h, hkv, d, num_splits):
    lens = [0, 1, 97, 300, 4097, 1025]
    q, k, v, cache_lens = _problem(lens, q_len, h, hkv, d, gen, dtype=dtype, device="cuda", capacity=4200)
    out, lse = attention_decode(q, k, v, cache_lens, num_splits=num_splits, return_lse=True, backend="triton")
    _check_against_float64(q, k, v, lens, out, lse, gen.initial_seed())
    assert DECODE_BACKENDS.resolve("auto", q, k, v, cache_lens, 1.0, 0).name == "triton"


def test_default_split_count(monkeypatch):
    """No split when the programs already cover half the SMs; else about two programs per SM,
    capped by four key blocks per split and MAX_SPLITS. (Needs triton, not a GPU.)"""
    decode = pytest.importorskip("generalist.kernels.triton.decode")
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(decode, "_sm_count", lambda index: 132)
    assert decode.default_num_splits(128, 8192, 64, gpu) == 1  # B16 x 8 kv heads
    assert decode.default_num_splits(66, 8192, 64, gpu) == 1
    assert decode.default_num_splits(65, 8192, 64, gpu) == 5  # cdiv(264, 65)
    assert decode.default_num_splits(8, 32768, 64, gpu) == 33  # B1 x 8 kv heads
    assert decode.default_num_splits(8, 512, 64, gpu) == 2  # 8 key blocks: 4 per split
    assert decode.default_num_splits(1, 1 << 20, 64, gpu) == decode.MAX_SPLITS
    assert decode.default_num_splits(8, 0, 64, gpu) == 1
    # what a launch uses: the request (else the default), within the key blocks and MAX_SPLITS (a
    # request of 100000 made the reduce kernel's tile too large for Triton at long caches)
    assert decode.split_count(0, 8, 32768, 64, gpu) == 33
    assert decode.split_count(7, 8, 32768, 64, gpu) == 7
    assert decode.split_count(100000, 1, 1 << 22, 16, gpu) == decode.MAX_SPLITS
    assert decode.split_count(100000, 1, 100, 16, gpu) == 7  # cdiv(100, 16) key blocks
    assert decode.split_count(5, 1, 0, 16, gpu) == 1
