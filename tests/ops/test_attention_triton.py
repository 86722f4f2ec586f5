"""The Triton attention backend against the attention contract (DESIGN.md).

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1)
on CPU tensors, which the backend serves only with GENERALIST_TRITON_ON_CPU=1 (set here). The
interpreter is slow: sizes stay small, longer sequences are `slow`, and bf16 runs on GPU only
(Triton 3.6's interpreter computes bf16 products wrongly). With a GPU the same tests run on CUDA.
Tolerance for fp16: error(kernel vs float64) <= 2 x error(PyTorch at fp16 vs float64) + atol.
"""

import ast
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")
# The interpreter indexes with 1-element arrays, which numpy >= 1.25 flags on every loop.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

from generalist.ops import ATTENTION_BACKENDS, BackendError, flash_attn_func, flash_attn_varlen_func  # noqa: E402
from generalist.ops import attention_triton  # noqa: E402,F401  (registers "triton")
from generalist.testing import (ATOL, NON_FINITE, attention_grads, check_forward, check_non_finite,  # noqa: E402
                                max_err, naive_attention, random_varlen, run_varlen)

BACKEND = "triton"

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (lens_q, lens_k, H, Hkv, D, causal, prefix)
CASES = [
    ([97], [97], 4, 4, 40, False, None),
    ([97], [97], 4, 2, 111, True, None),
    ([1, 37, 0, 13], [1, 37, 0, 13], 8, 1, 16, True, None),  # MQA, an empty sequence, length 1
    ([5, 0, 33], [9, 4, 40], 4, 2, 16, True, "mid"),  # cross: Sq < Sk, bottom-right causal
    ([40, 7], [9, 3], 2, 2, 24, True, None),  # cross: Sq > Sk, the first rows see nothing
    ([40, 7], [9, 3], 2, 2, 24, False, None),
    ([31, 17], [31, 17], 8, 1, 40, True, "zero"),  # GQA 8
    ([31, 17], [31, 17], 4, 2, 40, True, "mid"),  # GQA 2
    ([31, 17], [31, 17], 2, 2, 40, True, "full"),
    ([12, 0], [0, 6], 2, 1, 8, False, None),  # a query sequence with no keys, keys with no queries
    ([37, 64, 50], [70, 50, 50], 2, 1, 64, True, [20, 64, 33]),  # prefixes inside, past and at blocks
]
GRAD_CASES = [CASES[i] for i in (1, 2, 3, 4, 7, 9, 10)]


@pytest.fixture(autouse=True)
def _triton_on_cpu(monkeypatch):
    if "triton" not in ATTENTION_BACKENDS.available():
        pytest.skip("the triton backend is not registered")
    if DEVICE == "cpu":
        if not attention_triton.kernels.interpreting():
            pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1 at import")
        monkeypatch.setenv("GENERALIST_TRITON_ON_CPU", "1")


def _case(lens_q, lens_k, h, hkv, d, prefix, gen, dtype=torch.float32, device=DEVICE, requires_grad=False):
    case = random_varlen(lens_q, lens_k, h, hkv, d, dtype=dtype, prefix=prefix, generator=gen,
                         requires_grad=requires_grad)
    if device != "cpu":
        move = lambda x: None if x is None else x.to(device)
        case.cu_q, case.cu_k, case.prefix_lens = move(case.cu_q), move(case.cu_k), move(case.prefix_lens)
        case.q, case.k, case.v = (x.detach().to(device).requires_grad_(requires_grad) for x in (case.q, case.k, case.v))
    return case










def _float64_grads(case, causal, dout, dlse):
    return attention_grads(case, dout, dlse, lambda: naive_attention(
        case.q, case.k, case.v, case.lens_q, case.lens_k, causal=causal, prefix_lens=case.prefix_lens))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lens_q,lens_k,h,hkv,d,causal,prefix", CASES)
def test_forward_matches_float64(gen, lens_q, lens_k, h, hkv, d, causal, prefix, dtype):
    case = _case(lens_q, lens_k, h, hkv, d, prefix, gen, dtype=dtype)
    check_forward(case, causal, dtype, gen.initial_seed(), BACKEND)


@pytest.mark.parametrize("where,causal", NON_FINITE)
def test_non_finite_inputs_reach_the_rows_that_see_them(gen, where, causal):
    check_non_finite(where, causal, BACKEND, gen, device=DEVICE)


@pytest.mark.parametrize("lens_q,lens_k,h,hkv,d,causal,prefix", CASES)
def test_forward_per_sequence_order_matches_float64(gen, monkeypatch, lens_q, lens_k, h, hkv, d, causal, prefix):
    """The forward's other program order (2-D grid, sequence by sequence), a tuning candidate."""
    from generalist.kernels.triton import attention as K

    monkeypatch.setattr(K, "_FWD_ORDERS", (False, True))
    case = _case(lens_q, lens_k, h, hkv, d, prefix, gen)
    check_forward(case, causal, torch.float32, gen.initial_seed(), BACKEND)


@pytest.mark.parametrize("lens_q,lens_k,h,hkv,d,causal,prefix", GRAD_CASES)
def test_gradients_match_float64(gen, lens_q, lens_k, h, hkv, d, causal, prefix):
    case = _case(lens_q, lens_k, h, hkv, d, prefix, gen, requires_grad=True)
    dout = torch.randn(case.q.shape, generator=gen).to(DEVICE)
    dlse = torch.randn(h, sum(lens_q), generator=gen).to(DEVICE)
    got = attention_grads(case, dout, dlse, lambda: run_varlen(case, causal, BACKEND, return_lse=True))
    want = _float64_grads(case, causal, dout, dlse)
    for name, g, w in zip("qkv", got, want):
        torch.testing.assert_close(g.double(), w.double(), atol=2e-5, rtol=1e-4,
                                   msg=lambda m: f"d{name}: {m} (seed {gen.initial_seed()})")


@pytest.mark.parametrize("lens_q,lens_k,h,hkv,d,causal,prefix", [CASES[1], CASES[3]])
def test_fp16_gradients_within_twice_pytorch_error(gen, lens_q, lens_k, h, hkv, d, causal, prefix):
    case = _case(lens_q, lens_k, h, hkv, d, prefix, gen, dtype=torch.float16, requires_grad=True)
    dout = torch.randn(case.q.shape, generator=gen).to(DEVICE, torch.float16)
    dlse = torch.randn(h, sum(lens_q), generator=gen).to(DEVICE)
    got = attention_grads(case, dout, dlse, lambda: run_varlen(case, causal, BACKEND, return_lse=True))
    want = _float64_grads(case, causal, dout, dlse)
    same = attention_grads(case, dout, dlse, lambda: naive_attention(
        case.q, case.k, case.v, lens_q, lens_k, causal=causal, prefix_lens=case.prefix_lens, dtype=torch.float16))
    for name, g, w, s in zip("qkv", got, want, same):
        assert g.dtype == torch.float16 and torch.isfinite(g).all()
        err, baseline = max_err(g, w), max_err(s, w)
        assert err <= 2 * baseline + ATOL[torch.float16], f"d{name}: {err} vs {baseline} (seed {gen.initial_seed()})"


def test_rows_without_keys_are_zero_with_lse_minus_inf(gen):
    case = _case([6], [2], 2, 2, 8, None, gen, requires_grad=True)
    out, lse = run_varlen(case, True, BACKEND, return_lse=True)
    assert torch.equal(out[:4], torch.zeros_like(out[:4]))  # query i sees keys j <= i - 4
    assert torch.isneginf(lse[:, :4]).all() and torch.isfinite(lse[:, 4:]).all()
    out.sum().backward()
    for x in (case.q, case.k, case.v):
        assert torch.isfinite(x.grad).all()
    assert torch.equal(case.q.grad[:4], torch.zeros_like(case.q.grad[:4]))


def test_deterministic(gen):
    case = _case([33, 20], [40, 20], 2, 1, 32, [10, 0], gen, requires_grad=True)
    dout = torch.randn(case.q.shape, generator=gen).to(DEVICE)
    runs = []
    for _ in range(2):
        out, lse = run_varlen(case, True, BACKEND, return_lse=True)
        runs.append((out, lse, *torch.autograd.grad((out * dout).sum(), (case.q, case.k, case.v))))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_strided_inputs_and_dense_layout(gen):
    """q/k/v as views into one packed qkv tensor (strided heads), and the dense entry point."""
    b, s, h, d = 2, 19, 4, 24
    qkv = torch.randn(b, s, 3, h, d, generator=gen).to(DEVICE)
    q, k, v = qkv.unbind(2)
    out, lse = flash_attn_func(q, k, v, causal=True, return_lse=True, backend="triton")
    want, want_lse = flash_attn_func(q, k, v, causal=True, return_lse=True, backend="reference")
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, want_lse, atol=1e-5, rtol=1e-5)


def test_strided_offsets_and_prefix_lengths(gen):
    """cu_seqlens and prefix_lens as every other element of larger tensors are valid input (the
    op hands the kernels contiguous copies)."""
    case = _case([31, 17], [9, 40], 4, 2, 16, [3, 22], gen)
    spread = lambda t: torch.stack([t, torch.full_like(t, 99)], dim=1).flatten()[::2]
    strided = [spread(t) for t in (case.cu_q, case.cu_k, case.prefix_lens)]
    assert not any(t.is_contiguous() for t in strided)
    args = (case.q, case.k, case.v)
    got = flash_attn_varlen_func(*args, *strided[:2], 31, 40, causal=True, prefix_lens=strided[2],
                                 return_lse=True, backend="triton")
    want = flash_attn_varlen_func(*args, case.cu_q, case.cu_k, 31, 40, causal=True, prefix_lens=case.prefix_lens,
                                  return_lse=True, backend="triton")
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def _op_args(case, causal, backend="triton"):
    return (case.q, case.k, case.v, case.cu_q, case.cu_k, max(case.lens_q), max(case.lens_k),
            case.q.shape[-1] ** -0.5, causal, case.prefix_lens, backend)


def test_opcheck(gen):
    causal = True
    case = _case([5, 0, 9], [7, 3, 9], 2, 1, 16, "mid", gen, requires_grad=True)
    torch.library.opcheck(torch.ops.generalist.attention_fwd.default, _op_args(case, causal))
    out, lse = torch.ops.generalist.attention_fwd(*_op_args(case, causal))
    bwd_args = (torch.randn_like(out), torch.randn_like(lse), case.q.detach(), case.k.detach(), case.v.detach(),
                out.detach(), lse.detach()) + _op_args(case, causal)[3:]
    torch.library.opcheck(torch.ops.generalist.attention_bwd.default, bwd_args)


def test_torch_compile_fullgraph(gen):
    case = _case([7, 12], [9, 12], 2, 1, 16, [3, 6], gen, requires_grad=True)

    def f(q, k, v, cu_q, cu_k, prefix_lens):
        out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 12, 12, causal=True, prefix_lens=prefix_lens,
                                     backend="triton")
        return (out * out).sum()

    args = (case.q, case.k, case.v, case.cu_q, case.cu_k, case.prefix_lens)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
    got_grads = torch.autograd.grad(got, (case.q, case.k, case.v))
    want = f(*args)
    want_grads = torch.autograd.grad(want, (case.q, case.k, case.v))
    torch.testing.assert_close(got, want)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w)


def test_errors_name_the_reason(gen, monkeypatch):
    case = _case([4], [4], 2, 2, 8, None, gen, dtype=torch.float64)
    with pytest.raises(BackendError, match="backend 'triton' cannot serve these inputs: dtype torch.float64"):
        run_varlen(case, False, BACKEND)
    cpu = random_varlen([4], [4], 2, 2, 8, generator=gen)
    monkeypatch.delenv("GENERALIST_TRITON_ON_CPU", raising=False)
    with pytest.raises(BackendError, match="backend 'triton' cannot serve these inputs: CPU tensors"):
        run_varlen(cpu, False, BACKEND)
    args = _op_args(cpu, False)[:-1]
    assert ATTENTION_BACKENDS.resolve("auto", *args).name != "triton"  # "auto" never picks the interpreter
    bf16 = random_varlen([4], [4], 2, 2, 8, dtype=torch.bfloat16, generator=gen)
    monkeypatch.setenv("GENERALIST_TRITON_ON_CPU", "1")
    if attention_triton.kernels.interpreting():
        with pytest.raises(BackendError, match="bfloat16"):
            run_varlen(bf16, False, BACKEND)


def test_offsets_past_32_bits_within_a_sequence_are_refused():
    """The kernels widen a sequence's start to 64 bits, not offsets within it: a sequence whose
    rows, heads and features span 2^31 elements or more goes to another backend (meta tensors:
    the sizes without the memory)."""
    meta = lambda *shape: torch.empty(*shape, device="meta", dtype=torch.float16)
    cu = torch.zeros(2, dtype=torch.int32)
    reason = lambda q, k, max_q, max_k: attention_triton.unsupported(q, k, k, cu, cu, max_q, max_k, 1.0, True, None)
    q, k = meta(600_000, 32, 128), meta(600_000, 8, 128)
    assert "32-bit" not in (reason(q, k, 500_000, 500_000) or "")  # 500k rows of 4096 features fit
    assert "q spans" in reason(q, k, 600_000, 600_000)  # 600k rows do not
    assert "k spans" in reason(q[:1000], k.as_strided(k.shape, (2 ** 22, 128, 1)), 1000, 600)  # a strided k
    from generalist.ops.attention_decode import _triton_unsupported

    cache = meta(1, 2_200_000, 8, 128)
    assert "k_cache spans" in _triton_unsupported(meta(1, 1, 8, 128), cache, cache, cu[:1], 1.0, 0)
    assert "32-bit" not in (_triton_unsupported(meta(1, 1, 8, 128), cache[:, :2_000_000], cache[:, :2_000_000],
                                                cu[:1], 1.0, 0) or "")


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_long_sequence(gen, dtype):
    lens_q = lens_k = [1025, 3]
    case = _case(lens_q, lens_k, 2, 1, 32, None, gen, dtype=dtype, requires_grad=True)
    check_forward(case, True, dtype, gen.initial_seed(), BACKEND)
    if dtype == torch.float32:
        dout = torch.randn(case.q.shape, generator=gen).to(DEVICE)
        dlse = torch.randn(2, sum(lens_q), generator=gen).to(DEVICE)
        got = attention_grads(case, dout, dlse, lambda: run_varlen(case, True, BACKEND, return_lse=True))
        want = _float64_grads(case, True, dout, dlse)
        for name, g, w in zip("qkv", got, want):
            torch.testing.assert_close(g.double(), w.double(), atol=2e-5, rtol=1e-4, msg=lambda m: f"d{name}: {m}")


# Compiling for a GPU needs no GPU: Triton's bundled ptxas builds sm_80 / sm_90 code here, which
# keeps the kernels from rotting where the (more permissive) interpreter would still run them, and
# shows register spills. Each kernel's default config: for a full head dim causal with a prefix,
# specialised as a launch on aligned tensors is (pointers and strides divisible by 16) and not,
# and on aligned tensors without a mask; for a masked head dim causal with a prefix. With "all",
# every config of the table for a full head dim on aligned tensors, causal with a prefix and not.
_COMPILE_SCRIPT = r"""
import os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from generalist.kernels.triton import attention as K

arch, dtype, block_d, every = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4] == "all"
elem = 4 if dtype == "fp32" else 2
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
for name, fn in K._KERNELS.items():
    table = K.configs_for(name, elem, block_d, arch)
    # (config, head dim, (causal, prefix), aligned pointers and strides)
    runs = ([(c, block_d, m, True) for c in table for m in ((False, False), (True, True))] if every else
            [(table[0], block_d, (False, False), True)] +
            [(table[0], hd, (True, True), al) for hd, al in ((block_d, True), (block_d, False), (block_d - 3, False))])
    for (bm, bn, warps, stages), head_dim, (causal, prefix), aligned in runs:
        cx = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, IS_CAUSAL=causal, HAS_PREFIX=prefix,
                  DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", BLOCK_M=bm, BLOCK_N=bn,
                  **({"LONGEST_FIRST": True} if name == "fwd" else {}),
                  **({"BLOCKED_SUM": dtype == "fp32"} if name in ("dkdv", "dq") else {}))
        sig = {a: "constexpr" if a in cx else ("*i32" if a in ("CU_Q", "CU_K", "PREFIX") else
               "*fp32" if a in ("LSE", "DELTA") else f"*{dtype}" if a.isupper() else
               "fp32" if a == "softmax_scale" else "i32") for a in fn.arg_names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names)
                 if aligned and a not in cx and (a.isupper() or a.startswith("stride"))}
        kernel = triton.compile(ASTSource(fn, sig, constexprs=cx, attrs=attrs), target=GPUTarget("cuda", arch, 32),
                                options={"num_warps": warps, "num_stages": stages})
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"]); f.flush()
            usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
        ir = kernel.asm["ttgir"]
        # wgmma dots, and the pipeline's buffers (the shared-memory tiles' leading dimension)
        depth = max((int(n) for n in re.findall(r"memdesc<(\d+)x\d+x\d+x", ir)), default=1)
        print(name, dtype, head_dim, (bm, bn, warps, stages), "causal" if causal else "full",
              "aligned" if aligned else "unaligned",
              *[w for w in usage.split() if w.startswith(("REG", "STACK"))],
              f"WGMMA:{ir.count('warp_group_dot ')}", f"DEPTH:{depth}")
"""


def _compile(arch, dtype, block_d, which):
    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")):
        pytest.skip("this triton has no bundled CUDA tools")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, str(arch), dtype, str(block_d), which], env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout.strip().splitlines()


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype,block_d", [("fp16", 64), ("bf16", 128), ("fp16", 256), ("fp32", 64), ("fp32", 128),
                                           ("fp32", 256)])
def test_kernels_compile_for_gpu_without_spills(arch, dtype, block_d):
    lines = _compile(arch, dtype, block_d, "defaults")
    assert len(lines) == 12, lines
    for line in lines:
        assert "STACK:0" in line.split(), f"register spills: {line}"


@pytest.mark.slow
def test_every_hopper_hdim128_config_compiles_without_spills_and_defaults_use_wgmma():
    """Every bf16 hdim-128 Hopper candidate compiles without spills, causal with a prefix and not;
    those on wgmma keep num_stages tiles in flight; each kernel's default is one of them."""
    lines = _compile(90, "bf16", 128, "all")
    from generalist.kernels.triton import attention as K

    assert len(lines) == 2 * sum(len(K.configs_for(n, 2, 128, 90)) for n in K._KERNELS), lines
    for line in lines:
        words = line.split()
        assert "STACK:0" in words, f"register spills: {line}"
        stages = ast.literal_eval(line[line.index("("):line.index(")") + 1])[3]
        if "WGMMA:0" not in words:
            assert f"DEPTH:{stages}" in words, f"on wgmma but not pipelined {stages} deep: {line}"
    for name in K._KERNELS:
        default = str(K.configs_for(name, 2, 128, 90)[0])
        first = [line for line in lines if line.startswith(f"{name} ") and default in line]
        assert first and all("WGMMA:0" not in line.split() for line in first), f"{name} default not on wgmma: {first}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("d,causal,prefix", [(64, True, "mid"), (128, True, None), (40, False, None),
                                             (256, True, None)])
def test_cuda_against_float64(gen, monkeypatch, dtype, d, causal, prefix):
    monkeypatch.setenv("GENERALIST_TRITON_AUTOTUNE", "0")  # each table's first config: correctness, not speed
    lens_q, lens_k = [1, 97, 0, 1025, 300], [5, 97, 3, 1025, 256]
    case = _case(lens_q, lens_k, 8, 2, d, prefix, gen, dtype=dtype, device="cuda", requires_grad=True)
    check_forward(case, causal, dtype, gen.initial_seed(), BACKEND)
    dout = torch.randn(case.q.shape, generator=gen).to("cuda", dtype)
    dlse = torch.randn(8, sum(lens_q), generator=gen).cuda()
    got = attention_grads(case, dout, dlse, lambda: run_varlen(case, causal, BACKEND, return_lse=True))
    want = _float64_grads(case, causal, dout, dlse)
    same = attention_grads(case, dout, dlse, lambda: naive_attention(
        case.q, case.k, case.v, lens_q, lens_k, causal=causal, prefix_lens=case.prefix_lens, dtype=dtype))
    for name, g, w, s in zip("qkv", got, want, same):
        err, baseline = max_err(g, w), max_err(s, w)
        assert err <= 2 * baseline + ATOL[dtype], f"d{name}: {err} vs {baseline} (seed {gen.initial_seed()})"


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["fwd", "dkdv", "dq"])
def test_cuda_every_config(gen, monkeypatch, kernel):
    """Each tuned configuration of one kernel (bf16, D=128) gives the right answer."""
    from generalist.kernels.triton import attention as K

    lens_q, lens_k = [1, 97, 0, 300], [5, 97, 3, 256]
    case = _case(lens_q, lens_k, 8, 2, 128, "mid", gen, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    dout = torch.randn(case.q.shape, generator=gen).to("cuda", torch.bfloat16)
    dlse = torch.zeros(8, sum(lens_q), device="cuda")
    major, minor = torch.cuda.get_device_capability()
    arch = 90 if major >= 9 else 80
    for config, order in [(c, o) for c in K.configs_for(kernel, 2, 128, arch) for o in (True, False)]:
        if kernel != "fwd" and not order:
            continue
        monkeypatch.setitem(K._CONFIGS_16BIT[arch], (kernel, 128), [config])
        monkeypatch.setattr(K, "_FWD_ORDERS", (order,))
        K._autotuned.cache_clear()
        check_forward(case, True, torch.bfloat16, gen.initial_seed(), BACKEND)
        got = attention_grads(case, dout, dlse, lambda: run_varlen(case, True, BACKEND, return_lse=True))
        want = _float64_grads(case, True, dout, dlse)
        for name, g, w in zip("qkv", got, want):
            assert (g.double() - w).norm() / w.norm() < 2e-2, f"d{name} with {kernel} config {config} {order}"
    K._autotuned.cache_clear()
