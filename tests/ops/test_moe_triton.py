"""The Triton MoE backend (grouped matmul) against the float64 reference.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1)
on CPU tensors, which the backend serves only with GENERALIST_TRITON_ON_CPU=1 (set here). The
interpreter is slow: sizes stay small, and bf16 runs on GPU only (Triton 3.6's interpreter computes
bf16 products wrongly). With a GPU the same tests run on CUDA.
Tolerance: error(kernel vs float64) <= 2 x error(reference backend at the same dtype vs float64)
+ atol, for outputs and for gradients.

Shapes: T rows (sorted by expert), D input features, F output features, E experts.
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

from generalist.ops import MOE_BACKENDS, BackendError, grouped_mm  # noqa: E402
from generalist.ops import moe_triton  # noqa: E402  (registers "triton")
from generalist.ops.moe import grouped_mm_bwd  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}

# (group sizes, D, F); the interpreter's blocks are 32 rows x 64 columns x 32 deep
CASES = [
    ([0, 5, 0, 3], 40, 111),  # empty groups first and in the middle
    ([97, 0, 33, 1, 0], 40, 111),  # several row tiles, a group of 1 row, an empty last group
    ([0, 0, 0], 16, 24),  # T = 0
    ([70], 40, 111),  # E = 1
    ([3, 0, 41, 1, 9, 0, 20], 24, 17),  # E = 7 (not a power of two)
]


@pytest.fixture(autouse=True)
def _triton_on_cpu(monkeypatch):
    if "triton" not in MOE_BACKENDS.available():
        pytest.skip("the triton backend is not registered")
    if DEVICE == "cpu":
        if not moe_triton.kernels.interpreting():
            pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1 at import")
        monkeypatch.setenv("GENERALIST_TRITON_ON_CPU", "1")


def _inputs(gen, sizes, d, f, dtype=torch.float32, device=DEVICE, idx_dtype=torch.int64, requires_grad=False):
    x = torch.randn(sum(sizes), d, generator=gen, dtype=torch.float64).to(device, dtype)
    w = torch.randn(len(sizes), d, f, generator=gen, dtype=torch.float64).to(device, dtype)
    return x.requires_grad_(requires_grad), w.requires_grad_(requires_grad), torch.tensor(sizes, dtype=idx_dtype,
                                                                                          device=device)


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _grads(x, w, gs, dy, backend, dtype=None):
    """(y, dx, dw) of sum(grouped_mm(x, w) * dy), computed at `dtype` (default: the inputs')."""
    xs, ws = x.detach(), w.detach()
    if dtype is not None:
        xs, ws = xs.to(dtype), ws.to(dtype)
    xs, ws = xs.requires_grad_(True), ws.requires_grad_(True)
    y = grouped_mm(xs, ws, gs, backend=backend)
    dx, dw = torch.autograd.grad(y, (xs, ws), dy.to(y.dtype)) if y.numel() else (torch.zeros_like(xs),
                                                                                  torch.zeros_like(ws))
    return y.detach(), dx, dw


def _check_against_float64(x, w, gs, dy, seed, check_grads=True):
    """The triton backend's output (and gradients) against float64, within twice the reference
    backend's error at the same dtype."""
    dtype = x.dtype
    got = _grads(x, w, gs, dy, "triton")
    want = _grads(x, w, gs, dy, "reference", torch.float64)
    same = _grads(x, w, gs, dy, "reference")
    for name, g, wt, s in list(zip(("y", "dx", "dw"), got, want, same))[: 3 if check_grads else 1]:
        assert g.dtype == dtype and g.shape == wt.shape and torch.isfinite(g).all(), name
        err, baseline = _max_err(g, wt), _max_err(s, wt)
        assert err <= 2 * baseline + ATOL[dtype], f"{name}: error {err} vs reference {baseline} (seed {seed})"
    if check_grads:
        for e, n in enumerate(gs.tolist()):
            if n == 0:  # an empty group gets exactly zero gradient (the kernel writes it)
                assert torch.equal(got[2][e], torch.zeros_like(got[2][e])), f"dw[{e}] (seed {seed})"
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("sizes,d,f", CASES)
def test_forward_and_gradients_match_float64(gen, sizes, d, f, dtype):
    x, w, gs = _inputs(gen, sizes, d, f, dtype)
    dy = torch.randn(sum(sizes), f, generator=gen, dtype=torch.float64).to(DEVICE, dtype)
    _check_against_float64(x, w, gs, dy, gen.initial_seed())


def test_int32_group_sizes_and_deterministic(gen):
    sizes, d, f = CASES[1]
    x, w, gs = _inputs(gen, sizes, d, f, idx_dtype=torch.int32)
    dy = torch.randn(sum(sizes), f, generator=gen).to(DEVICE)
    first = _check_against_float64(x, w, gs, dy, gen.initial_seed())
    for a, b in zip(first, _grads(x, w, gs.long(), dy, "triton")):
        assert torch.equal(a, b)  # no atomics: bitwise the same every run


def test_autograd_through_public_op(gen):
    """Gradients reach x and w through torch.autograd (.backward) with backend="triton"."""
    sizes, d, f = [0, 37, 2, 0, 11], 40, 111
    x, w, gs = _inputs(gen, sizes, d, f, requires_grad=True)
    scale = torch.randn(f, generator=gen).to(DEVICE)
    (grouped_mm(torch.tanh(x), w, gs, backend="triton") * scale).square().sum().backward()
    x64, w64 = (t.detach().double().requires_grad_(True) for t in (x, w))
    (grouped_mm(torch.tanh(x64), w64, gs, backend="reference") * scale.double()).square().sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(w.grad.double(), w64.grad, atol=1e-4, rtol=1e-4)
    assert torch.equal(w.grad[0], torch.zeros_like(w.grad[0])) and torch.equal(w.grad[3], torch.zeros_like(w.grad[3]))


def test_strided_inputs(gen):
    """x a column slice, w a transposed view: the kernels take strides, not contiguous copies."""
    sizes, d, f = [9, 0, 40], 24, 40
    x_big = torch.randn(sum(sizes), 2 * d, generator=gen).to(DEVICE)
    x = x_big[:, ::2]
    w = torch.randn(len(sizes), f, d, generator=gen).to(DEVICE).transpose(1, 2)
    gs = torch.tensor(sizes, device=DEVICE)
    assert not x.is_contiguous() and not w.is_contiguous()
    dy = torch.randn(sum(sizes), f, generator=gen).to(DEVICE)
    _check_against_float64(x, w, gs, dy, gen.initial_seed())
    dy_t = torch.randn(f, sum(sizes), generator=gen).to(DEVICE).t()  # the bwd op on a strided dy
    dx, dw = grouped_mm_bwd(dy_t, x, w, gs, "triton")
    dx_ref, dw_ref = grouped_mm_bwd(dy_t.contiguous(), x.contiguous(), w.contiguous(), gs, "reference")
    torch.testing.assert_close(dx, dx_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dw, dw_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("persistence,dtype", [((1, 1), torch.float32), ((1, 1), torch.float16), ((3, 1), torch.float32),
                                               ((2, 2), torch.float32), ((2, 0), torch.float32),
                                               ((0, 1, 3), torch.float32), ((0, 2, 2), torch.float16),
                                               ((0, 0, 4), torch.float32)])
@pytest.mark.parametrize("d,f", [(64, 72), (40, 72), (40, 111)])
def test_dw_program_kinds_match_float64(gen, monkeypatch, persistence, dtype, d, f):
    """dw's persistent programs (INTERPRET_SMS x programs per SM of them, each taking several
    tiles), and its programs of a chunk of tiles each, against float64: through TMA stores,
    whole or in column halves, where dw allows them
    ((64, 72): F ragged against BLOCK_N, which TMA clips; the right half of the last column tile
    lies wholly past F; (40, 72): BLOCK_M does not divide D, so an expert's last D tile is
    clipped at D, not written into the next expert), with plain stores where rows are not 16-byte
    multiples (111 columns), and without TMA stores at all. With a chunk (third entry, no
    programs per SM), a program takes that many tiles of one expert in one pipeline, x and dy
    coming in through TMA from descriptors of that expert's rows (a step past its last row reads
    zeros, not the next expert's; an empty group stores zeros); (40, 111) falls back to pointer
    loads (dy's 444-byte rows)."""
    from generalist.kernels.triton import moe as K

    if DEVICE == "cuda":
        pytest.skip("on a GPU, test_cuda_every_config and test_cuda_dw_through_tma run every configuration")
    monkeypatch.setitem(K._INTERPRET_CONFIGS, "dw", K._INTERPRET_CONFIGS["dw"] + persistence)
    sizes = [0, 37, 2, 5, 70]  # (a tile run over the end of its expert would show in the next one's rows)
    x, w, gs = _inputs(gen, sizes, d, f, dtype)
    dy = torch.randn(sum(sizes), f, generator=gen, dtype=torch.float64).to(DEVICE, dtype)
    _check_against_float64(x, w, gs, dy, gen.initial_seed())


def _dw_keeps_non_finite_rows_to_their_group(gen, dtype, device, config=None):
    """With inf in one group's x rows and NaN in the next group's dy rows, every other group's dw
    is exact: dw[g] reads only group g's rows (a row step running past a group's end must read
    zeros in both operands: 0 * inf is NaN)."""
    from generalist.kernels.triton import moe as K

    sizes, d, f = [0, 37, 2, 5, 70, 300], 256, 208
    x, _, gs = _inputs(gen, sizes, d, f, dtype, device=device)
    dy = torch.randn(sum(sizes), f, generator=gen, dtype=torch.float64).to(device, dtype)
    x[37:39, 5] = float("inf")  # group 2
    dy[39:44, 7] = float("nan")  # group 3
    out = torch.full((len(sizes), d, f), float("nan"), dtype=dtype, device=device)  # shows a tile not written
    got = K._dw(x, dy, gs, len(sizes), out=out, config=config).double()
    starts = [0, 0, 37, 39, 44, 114]
    for e in (0, 1, 4, 5):
        rows = slice(starts[e], starts[e] + sizes[e])
        want = x[rows].double().T @ dy[rows].double()
        assert torch.isfinite(got[e]).all(), (config, e)
        tolerance = 1e-3 if dtype == torch.float32 else 2e-2 * want.abs().max().item()
        assert _max_err(got[e], want) <= tolerance, (config, e)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the NaN group's own dw
@pytest.mark.parametrize("persistence", [(), (1, 1), (2, 0), (0, 1, 3), (0, 0, 2)])
def test_dw_keeps_a_groups_non_finite_rows_to_itself(gen, monkeypatch, persistence):
    """dw[g] reads only the rows of group g, under each kind of program: one per tile, persistent
    with TMA stores or plain ones, and one per chunk of tiles loading through TMA (whose
    descriptors end at the group's last row)."""
    from generalist.kernels.triton import moe as K

    if DEVICE == "cuda":
        pytest.skip("on a GPU, test_cuda_dw_keeps_a_groups_non_finite_rows_to_itself runs every configuration")
    monkeypatch.setitem(K._INTERPRET_CONFIGS, "dw", K._INTERPRET_CONFIGS["dw"] + persistence)
    _dw_keeps_non_finite_rows_to_their_group(gen, torch.float32, DEVICE)


@pytest.mark.parametrize("persistence,dtype", [((1, 0), torch.float32), ((3, 0), torch.float32), ((2, 0), torch.float16),
                                               ((1, 1), torch.float32), ((3, 1), torch.float16)])
@pytest.mark.parametrize("sizes,d,f", [([0, 37, 2, 5, 70, 0, 130], 40, 72), ([0, 0, 3], 40, 72), ([5, 70, 0, 33], 72, 40)])
def test_persistent_mm_matches_float64(gen, monkeypatch, persistence, dtype, sizes, d, f):
    """The forward and dx under persistent programs (INTERPRET_SMS x programs per SM of them,
    each striding over the row tiles that hold rows, GROUP_M of them at a time, a partial last
    group of row tiles included), loading through pointers or TMA, against float64: a tile given
    to the wrong expert or rows, or one left out, shows. Then again with every operand a view
    into a buffer that holds NaNs past its K (D = 40 and F = 40 are ragged against BLOCK_K = 32):
    a load that reads past K, as a TMA load over a 2-D view of w would read the next expert's
    rows, brings them in. TMA loads run here: every operand is laid out for them."""
    from generalist.kernels.triton import moe as K

    if DEVICE == "cuda":
        pytest.skip("on a GPU, test_cuda_every_config runs every persistent configuration")
    monkeypatch.setitem(K._INTERPRET_CONFIGS, "mm", K._INTERPRET_CONFIGS["mm"] + persistence)
    x, w, gs = _inputs(gen, sizes, d, f, dtype)
    dy = torch.randn(sum(sizes), f, generator=gen, dtype=torch.float64).to(DEVICE, dtype)
    assert K.tma_loadable(x, w) and K.tma_loadable(dy, w.transpose(1, 2)) and K._b_transposed(w.transpose(1, 2))
    _check_against_float64(x, w, gs, dy, gen.initial_seed())

    def past_k_nan(t, dim):  # t as a view into a copy 8 longer along dim, NaN there
        shape = list(t.shape)
        shape[dim] += 8
        buffer = torch.full(shape, float("nan"), dtype=t.dtype, device=t.device)
        view = buffer.narrow(dim, 0, t.shape[dim])
        return view.copy_(t)

    want_y = grouped_mm(x.double(), w.double(), gs, backend="reference")
    want_dx = grouped_mm_bwd(dy.double(), x.double(), w.double(), gs, "reference")[0]
    x_p, w_fwd = past_k_nan(x, 1), past_k_nan(w, 1)  # forward: K is D
    dy_p, w_dx = past_k_nan(dy, 1), past_k_nan(w, 2)  # dx: K is F
    assert K.tma_loadable(x_p, w_fwd) and K.tma_loadable(dy_p, w_dx.transpose(1, 2))
    for got, want in ((K._mm(x_p, w_fwd, gs), want_y), (K._mm(dy_p, w_dx.transpose(1, 2), gs), want_dx)):
        assert torch.isfinite(got).all()
        assert _max_err(got, want) <= 2e-3 * max(want.abs().max().item(), 1.0)


def test_tma_storable_layouts():
    """dw goes out through TMA as an (E, D, F) tensor of unit column stride whose other strides
    are positive multiples of 16 bytes, from a 16-byte aligned base."""
    from generalist.kernels.triton.moe import tma_storable

    assert tma_storable(torch.empty(3, 40, 72))  # fp32: 288-byte rows
    assert tma_storable(torch.empty(3, 40, 72, dtype=torch.float16))
    assert tma_storable(torch.empty(3, 40, 80)[:, :, :72])  # padded rows
    assert tma_storable(torch.empty(3, 48, 72)[:, :40])  # experts apart by more than D rows
    assert not tma_storable(torch.empty(3, 40, 111))  # 444-byte rows
    assert not tma_storable(torch.empty(3, 40, 76, dtype=torch.float16))  # 152-byte rows
    assert not tma_storable(torch.empty(3 * 2881).as_strided((3, 40, 72), (2881, 72, 1)))  # experts 11524 bytes apart
    assert not tma_storable(torch.empty(3, 72, 40).transpose(1, 2))  # column stride 72
    assert not tma_storable(torch.empty(1, 40, 72).expand(3, 40, 72))  # experts aliased
    assert not tma_storable(torch.empty(40, 1).expand(40, 72).unsqueeze(0).expand(3, 40, 72))
    assert not tma_storable(torch.empty(3 * 40 * 72 + 1)[1:].view(3, 40, 72))  # 4-byte aligned base


def test_tma_rows_loadable_layouts():
    """dw loads x and dy through TMA where both have unit column strides and row strides of
    16-byte multiples (every group's first row aligned), from 16-byte aligned bases."""
    from generalist.kernels.triton.moe import tma_rows_loadable

    x, dy = torch.empty(10, 40), torch.empty(10, 72)
    assert tma_rows_loadable(x, dy)
    assert tma_rows_loadable(torch.empty(10, 48)[:, :40], dy[:, :64])  # padded rows
    assert tma_rows_loadable(torch.empty(10, 40, dtype=torch.float16), torch.empty(10, 72, dtype=torch.float16))
    assert not tma_rows_loadable(x, torch.empty(10, 111))  # 444-byte rows
    assert not tma_rows_loadable(torch.empty(10, 44, dtype=torch.float16), dy)  # 88-byte rows
    assert not tma_rows_loadable(torch.empty(40, 10).t(), dy)  # column stride 10
    assert not tma_rows_loadable(x, torch.empty(1, 72).expand(10, 72))  # one row for all
    assert not tma_rows_loadable(torch.empty(401)[1:].view(10, 40), dy)  # 4-byte aligned base


def test_dw_asks_for_tma_stores_where_dw_allows(gen, monkeypatch):
    """_dw launches with TMA_OK where its output is TMA-storable, and TMA_LOAD_OK where x and dy
    are TMA-loadable (and the device has TMA)."""
    from generalist.kernels.triton import moe as K

    seen, launch = [], K._launch
    monkeypatch.setattr(K, "_launch", lambda kernel, *a, **kw: (seen.append((kw.get("TMA_OK"), kw.get("TMA_LOAD_OK"))),
                                                                 launch(kernel, *a, **kw)))
    sizes = [3, 0, 9]
    for f in (72, 111):
        x, _, gs = _inputs(gen, sizes, 40, f)
        K._dw(x, torch.randn(sum(sizes), f, generator=gen).to(DEVICE), gs, len(sizes))
    has_tma = K._has_tma(torch.cuda.current_device() if DEVICE == "cuda" else -1)
    assert seen == [(has_tma, has_tma), (False, False)]


def test_launches_with_a_scratch_allocator_and_leave_the_callers(monkeypatch):
    """On a GPU, each launch (whose TMA loads or stores want global scratch) runs with a torch
    allocator set, then the previous one back; an allocator the caller set is the one a launch
    uses. (The launch itself is a stand-in here.)"""
    import triton
    from triton.runtime import _allocation

    from generalist.kernels.triton import moe as K

    seen, before = [], _allocation._allocator.get()
    if before is not _allocation._NULL_ALLOCATOR:
        pytest.skip("an allocator is set in this process already")

    class Launcher:
        def __getitem__(self, grid):
            return lambda *a, **kw: seen.append(_allocation._allocator.get())

    monkeypatch.setattr(K, "_use_interpreter_blocks", lambda: False)
    monkeypatch.setattr(K, "_autotuned", lambda *a: Launcher())
    K._launch("dw", None, torch.device("cpu"), 2)
    K._launch("mm", None, torch.device("cpu"), 2)
    assert seen == [K._torch_scratch, K._torch_scratch]
    assert _allocation._allocator.get() is _allocation._NULL_ALLOCATOR

    def mine(size, alignment, stream):
        return torch.empty(size, dtype=torch.int8)

    triton.set_allocator(mine)
    try:
        K._launch("dw", None, torch.device("cpu"), 2)
        K._launch("mm", None, torch.device("cpu"), 2)
        assert seen[-2:] == [mine, mine] and _allocation._allocator.get() is mine
    finally:
        _allocation._allocator.set(before)


def test_dw_into_a_strided_out(gen):
    """_dw writes into a given (E, D, F) view of any strides, exactly what it returns otherwise
    (empty groups' zeros included), and names what is wrong with an out that does not fit."""
    from generalist.kernels.triton import moe as K

    sizes, d, f = [9, 0, 40], 24, 40
    x, _, gs = _inputs(gen, sizes, d, f)
    dy = torch.randn(sum(sizes), f, generator=gen).to(DEVICE)
    out = torch.full((len(sizes), f, d), float("nan"), device=DEVICE).transpose(1, 2)
    assert K._dw(x, dy, gs, len(sizes), out=out) is out
    assert torch.equal(out, K._dw(x, dy, gs, len(sizes)))
    with pytest.raises(ValueError, match=r"out has shape \(3, 40, 24\), expected \(3, 24, 40\)"):
        K._dw(x, dy, gs, len(sizes), out=torch.empty(len(sizes), f, d, device=DEVICE))
    with pytest.raises(ValueError, match="out has dtype torch.float16"):
        K._dw(x, dy, gs, len(sizes), out=torch.empty(len(sizes), d, f, dtype=torch.float16, device=DEVICE))


def _backward_against_float64(dy, x, w, gs, dx, dw):
    """dx and dw within twice the reference backend's error at their dtype, against float64."""
    want = grouped_mm_bwd(dy.double(), x.double(), w.double(), gs, "reference")
    same = grouped_mm_bwd(dy, x, w, gs, "reference")
    for name, got, wt, s in zip(("dx", "dw"), (dx, dw), want, same):
        assert got.dtype == x.dtype and got.shape == wt.shape and torch.isfinite(got).all(), name
        err, baseline = _max_err(got, wt), _max_err(s, wt)
        assert err <= 2 * baseline + ATOL[x.dtype], f"{name}: error {err} vs reference {baseline}"


def test_backward_under_each_plan(gen):
    """grouped_mm_backward under a given plan: each kernel under the tuner's choice or a given
    configuration (dw's persistent ones with TMA stores here), the two one after the other or side
    by side (which on CPU runs one after the other), each against float64; a kernel's result is the
    same under every plan that gives it the same configuration, and the configuration given is the
    one that ran (16-deep slices of an fp32 sum round differently from 32-deep ones)."""
    from generalist.kernels.triton import moe as K
    from generalist.kernels.triton.moe import Plan

    if DEVICE == "cuda":
        pytest.skip("on a GPU, test_cuda_backward_plans_on_a_user_stream runs the GPU's plans")
    sizes, d, f = [0, 37, 2, 5, 70], 64, 72
    x, w, gs = _inputs(gen, sizes, d, f)
    dy = torch.randn(sum(sizes), f, generator=gen, dtype=torch.float64).to(DEVICE, x.dtype)
    persistent, shallow, shallow_dx = (32, 64, 32, 4, 2, 1, 1), (32, 32, 16, 4, 2, 2, 2), (32, 32, 16, 4, 2)
    results = {}
    for plan in (K.SEQUENTIAL, Plan(True), Plan(False, persistent), Plan(True, persistent),
                 Plan(False, shallow, shallow_dx), Plan(True, shallow, shallow_dx)):
        dx, dw = results[plan] = K.grouped_mm_backward(dy, x, w, gs, plan=plan)
        _backward_against_float64(dy, x, w, gs, dx, dw)
    for plan, (dx, dw) in results.items():
        after = results[plan._replace(side_by_side=False)]
        assert torch.equal(dx, after[0]) and torch.equal(dw, after[1]), plan
        # the interpreter's own blocks are 32 x 64 x 32: only the 16-deep configurations change the bits
        assert torch.equal(dw, results[K.SEQUENTIAL][1]) == (plan.dw != shallow), plan
        assert torch.equal(dx, results[K.SEQUENTIAL][0]) == (plan.dx != shallow_dx), plan


def test_a_kept_plan_is_read_back_from_disk(monkeypatch, tmp_path):
    """A plan timed at a key's first call is written to Triton's cache directory under its digest,
    with every plan's time; a later process (its _PLANS empty) reads it back instead of timing,
    even while capturing. A file that does not read, or names a plan not offered, is ignored."""
    from generalist.kernels.triton import moe as K
    from generalist.kernels.triton.moe import Plan, PlanFile

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(K, "_PLANS", {})
    plans = [K.SEQUENTIAL, Plan(True), Plan(True, (128, 128, 64, 8, 3, 1, 1), (128, 128, 64, 8, 3))]
    times = dict(zip(plans, (3.0, 2.0, 1.0)))
    ran = []
    monkeypatch.setattr(K, "_seconds", lambda fn: (fn(), times[ran[-1]])[1])
    disk = PlanFile("0" * 64)
    assert disk.load(plans) is None
    assert K._planned("k", plans, ran.append, capturing=False, disk=disk) == plans[2] and ran == plans
    files = list(tmp_path.rglob(PlanFile.NAME))
    assert len(files) == 1 and '"seconds"' in files[0].read_text()

    monkeypatch.setattr(K, "_PLANS", {})  # a new process
    assert K._planned("k", plans, ran.append, capturing=True, disk=PlanFile("0" * 64)) == plans[2] and ran == plans
    assert K._PLANS == {"k": plans[2]}
    assert PlanFile("1" * 64).load(plans) is None  # another digest: another file
    assert PlanFile("0" * 64).load(plans[:2]) is None  # a plan no longer offered
    files[0].write_text("{not json")
    assert PlanFile("0" * 64).load(plans) is None


def test_a_kept_plans_digest_names_what_it_depends_on(monkeypatch):
    """The digest a plan is kept under changes with the key (less the device index, which is not
    in it), the plans offered and the target architecture, and with nothing else."""
    from types import SimpleNamespace

    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    from generalist.kernels.triton import moe as K

    target = [GPUTarget("cuda", 90, 32)]
    monkeypatch.setattr(driver, "_active", SimpleNamespace(get_current_target=lambda: target[0]))
    key, plans = (torch.bfloat16, 16384, 2048, 1408, 64), K.backward_plans(2, 90, 232448)
    digest = K._plan_digest(key, plans)
    assert len(digest) == 64 and digest == K._plan_digest(key, list(plans))
    assert digest != K._plan_digest((torch.float16,) + key[1:], plans)
    assert digest != K._plan_digest(key[:-1] + (8,), plans)
    assert digest != K._plan_digest(key, plans[:-1])
    target[0] = GPUTarget("cuda", 100, 32)
    assert digest != K._plan_digest(key, plans)


def test_backward_plans_offered():
    """One after the other first, then side by side as tuned, and with dw under each persistent
    configuration of one program per SM that fits the shared memory, with dx as tuned and under the
    first dx configuration that fits beside it in an SM (Hopper: 228 KB an SM, 1 KB a program)."""
    from generalist.kernels.triton import moe as K
    from generalist.kernels.triton.moe import Plan

    ones = [c for c in K._CONFIGS_16BIT[90]["dw"] if K.persistence(c)[0] == 1]
    tma, wide, plain = (128, 128, 64, 8, 3, 1, 1), (128, 256, 64, 8, 3, 1, 1), (128, 128, 64, 8, 3, 1, 0)
    assert ones == [tma, wide, plain] and K.smem("dw", tma, 2) == 128 * 1024 and K.smem("dw", wide, 2) == 208 * 1024
    dx = K._CONFIGS_16BIT[90]["mm"][0]
    assert K.smem("mm", dx, 2) == 96 * 1024
    hopper = [K.SEQUENTIAL, Plan(True), Plan(True, tma), Plan(True, tma, dx), Plan(True, wide), Plan(True, plain),
              Plan(True, plain, dx)]
    assert K.backward_plans(2, 90) == K.backward_plans(2, 90, smem_limit=232448) == hopper
    # less shared memory: the wide dw goes, and nothing of 96 KB fits beside 128 KB; a 48 KB dx beside 96 KB does
    small = K.backward_plans(2, 90, smem_limit=160 * 1024)
    assert small == [K.SEQUENTIAL, Plan(True), Plan(True, tma), Plan(True, plain), Plan(True, plain, (64, 64, 64, 4, 3))]
    assert K.backward_plans(2, 80) == K.backward_plans(4, 90) == [K.SEQUENTIAL, Plan(True)]


def test_a_plan_is_timed_once_per_key_and_never_in_capture(monkeypatch):
    """_planned times each plan at a key's first call and keeps the fastest; later calls time
    nothing; while a CUDA graph is captured an untimed key gets SEQUENTIAL, timed and kept by
    nobody, and a timed key its plan. Without a GPU (or with tuning off) the plan is SEQUENTIAL."""
    from generalist.kernels.triton import moe as K

    monkeypatch.setattr(K, "_PLANS", {})
    ran = []
    times = {K.SEQUENTIAL: 3.0, (True, None): 2.0, (True, (1,)): 1.0, (True, (2,)): 1.5}  # stand-in plans
    monkeypatch.setattr(K, "_seconds", lambda fn: (fn(), times[ran[-1]])[1])
    plans = list(times)
    assert K._planned("a", plans, ran.append, capturing=True) == K.SEQUENTIAL and ran == []
    assert K._planned("a", plans, ran.append, capturing=False) == (True, (1,)) and ran == plans
    assert K._planned("a", plans, ran.append, capturing=True) == (True, (1,)) and ran == plans
    times[(True, (1,))] = 9.0
    assert K._planned("a", plans, ran.append, capturing=False) == (True, (1,)) and ran == plans
    assert K._planned("b", plans, ran.append, capturing=False) == (True, (2,)) and ran == plans * 2
    assert K._PLANS == {"a": (True, (1,)), "b": (True, (2,))}

    def fails(plan):
        ran.append(plan)
        if plan != K.SEQUENTIAL:
            raise RuntimeError("out of resources")

    assert K._planned("c", plans, fails, capturing=False) == K.SEQUENTIAL  # the plans that fail are passed over
    with pytest.raises(RuntimeError, match="out of resources"):  # unless the first fails: the backward would too
        K._planned("d", plans[1:], fails, capturing=False)
    assert "d" not in K._PLANS
    del K._PLANS["c"]

    sizes, d, f = [3, 4], 8, 16
    x, w = torch.zeros(sum(sizes), d), torch.zeros(len(sizes), d, f)
    gs, dy = torch.tensor(sizes), torch.zeros(sum(sizes), f)
    if DEVICE == "cuda":
        monkeypatch.setenv("GENERALIST_TRITON_AUTOTUNE", "0")
        x, w, gs, dy = (t.cuda() for t in (x, w, gs, dy))
    assert K._plan(dy, x, w, gs) == K.SEQUENTIAL and len(K._PLANS) == 2


def test_opcheck(gen):
    x, w, gs = _inputs(gen, [3, 0, 5, 1], 16, 8, requires_grad=True)
    torch.library.opcheck(torch.ops.generalist.grouped_mm.default, (x, w, gs, "triton"))
    dy = torch.randn(9, 8, generator=gen).to(DEVICE)
    torch.library.opcheck(grouped_mm_bwd._opoverload, (dy, x.detach(), w.detach(), gs.int(), "triton"))


def test_torch_compile_fullgraph(gen):
    x, w, gs = _inputs(gen, [4, 0, 9, 2], 16, 24)
    dy = torch.randn(15, 24, generator=gen).to(DEVICE)

    def loss(x, w, gs):
        return (grouped_mm(torch.tanh(x), w, gs, backend="triton") * dy).sum()

    results = []
    for fn in (loss, torch.compile(loss, fullgraph=True, backend="aot_eager")):
        xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        out = fn(xr, wr, gs)
        out.backward()
        results.append((out.detach(), xr.grad, wr.grad))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want)


def test_errors_name_the_reason(gen, monkeypatch):
    x, w, gs = _inputs(gen, [2, 3], 8, 4, dtype=torch.float64)
    with pytest.raises(BackendError, match="backend 'triton' cannot serve these inputs: dtype torch.float64"):
        grouped_mm(x, w, gs, backend="triton")
    cpu = _inputs(gen, [2, 3], 8, 4, device="cpu")
    # with the opt-in (interpreter only) "auto" prefers triton over the reference
    if moe_triton.kernels.interpreting():
        assert MOE_BACKENDS.resolve("auto", *cpu).name == "triton"
    monkeypatch.delenv("GENERALIST_TRITON_ON_CPU", raising=False)
    with pytest.raises(BackendError, match="backend 'triton' cannot serve these inputs: CPU tensors"):
        grouped_mm(*cpu, backend="triton")
    assert MOE_BACKENDS.resolve("auto", *cpu).name == "reference"  # "auto" never picks the interpreter
    y = grouped_mm(*cpu)  # ... and the default still works on CPU
    torch.testing.assert_close(y, grouped_mm(*cpu, backend="reference"))
    monkeypatch.setenv("GENERALIST_TRITON_ON_CPU", "1")
    if moe_triton.kernels.interpreting():
        bf16 = _inputs(gen, [2, 3], 8, 4, dtype=torch.bfloat16, device="cpu")
        with pytest.raises(BackendError, match="bfloat16"):
            grouped_mm(*bf16, backend="triton")


def test_launcher_checks_layout():
    from generalist.kernels.triton import moe as K

    x, w = torch.zeros(5, 4), torch.zeros(2, 4, 3)
    with pytest.raises(ValueError, match="group_sizes_E must be int32/int64 of shape"):
        K.grouped_mm(x, w, torch.tensor([2.0, 3.0]))
    with pytest.raises(ValueError, match="w_EDF has dtype torch.float16"):
        K.grouped_mm(x, w.half(), torch.tensor([2, 3]))
    with pytest.raises(ValueError, match="do not fit"):
        K.grouped_mm_backward(torch.zeros(5, 4), x, w, torch.tensor([2, 3]))


# Compiling for a GPU needs no GPU: Triton's bundled ptxas builds sm_80 / sm_90 code here, which
# keeps the kernels from rotting where the (more permissive) interpreter would still run them, and
# shows register spills. Every config of the forward, dx and dw launches, specialised as a launch
# on contiguous tensors with D and F multiples of 16 is (unit strides constant, the others and the
# pointers divisible by 16). Ragged D/F (no such divisibility) compile too but may spill: they are
# for correctness, not speed.
_COMPILE_SCRIPT = r"""
import os, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from generalist.kernels.triton import moe as K

arch, dtype = int(sys.argv[1]), sys.argv[2]
elem = 4 if dtype == "fp32" else 2
cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
POINTERS = ("A", "B", "C", "X", "DY", "DW")
LAUNCHES = {"fwd": ("mm", ("stride_ak", "stride_bn", "stride_cn")),  # (kernel, strides that are 1)
            "dx": ("mm", ("stride_ak", "stride_bk", "stride_cn")),
            "dw": ("dw", ("stride_xd", "stride_yf", "stride_wf"))}


def flattened(ttgir):
    # whether the loop around the (first) dot also stores a result: the tile and K loops fused
    # into one, as Triton's loop flattening makes them
    lines = ttgir.splitlines()
    indent = lambda line: len(line) - len(line.lstrip())
    for i, line in enumerate(lines):
        if "warp_group_dot " in line or "tt.dot " in line:
            j = i - 1
            while j >= 0 and not ("scf.for" in lines[j] and indent(lines[j]) < indent(line)):
                j -= 1
            k = j + 1
            while k < len(lines) and not (lines[k].lstrip().startswith("}") and indent(lines[k]) == indent(lines[j])):
                k += 1
            return any("async_tma_copy_local_to_global" in b or "tt.store" in b for b in lines[j:k])
    return False


for launch, (name, unit) in LAUNCHES.items():
    fn = K._KERNELS[name]
    for config in K.configs_for(name, elem, arch, 232448 if arch >= 90 else 166912):
        warps, stages = config[3:5]
        cx = dict(DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", BLOCKED_SUM=dtype == "fp32", BLOCK_E=64,
                  **K._meta(name, config), TMA_OK=True,
                  **({"GROUP_M": 8, "B_TRANSPOSED": launch == "dx"} if name == "mm" else {"TMA_LOAD_OK": True}),
                  **{a: 1 for a in unit})
        sig = {a: "constexpr" if a in cx else "*i64" if a == "SIZES" else f"*{dtype}" if a in POINTERS else "i32"
               for a in fn.arg_names}
        aligned = POINTERS + ("SIZES", "K", "N", "D", "F") + tuple(a for a in fn.arg_names if a.startswith("stride"))
        attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if a in aligned and a not in cx}
        kernel = triton.compile(ASTSource(fn, sig, constexprs=cx, attrs=attrs), target=GPUTarget("cuda", arch, 32),
                                options={"num_warps": warps, "num_stages": stages,
                                         **({"maxnreg": K.maxnreg(config)} if K.maxnreg(config) else {})})
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(kernel.asm["cubin"]); f.flush()
            usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
        # buffers of the software pipeline: the shared-memory tiles' leading dimension
        depth = max((int(n) for n in re.findall(r"memdesc<(\d+)x\d+x\d+x", kernel.asm["ttgir"])), default=1)
        ttgir = kernel.asm["ttgir"]
        tma = (f"TMA_LOADS:{int('async_tma_copy_global_to_local' in ttgir)} "
               f"TMA_STORES:{int('async_tma_copy_local_to_global' in ttgir)}")
        print(launch, dtype, config, *[w for w in usage.split() if w.startswith(("REG", "STACK"))], f"DEPTH:{depth}",
              tma, f"FLAT:{int(flattened(ttgir))}", f"SMEM:{kernel.metadata.shared}")
"""


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
def test_kernels_compile_for_gpu_without_spills(arch, dtype):
    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")):
        pytest.skip("this triton has no bundled CUDA tools")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, str(arch), dtype], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    from generalist.kernels.triton import moe as K

    elem, limit = (4 if dtype == "fp32" else 2), (232448 if arch >= 90 else 166912)
    expected = sum(len(K.configs_for(k, elem, arch, limit)) for k in ("mm", "mm", "dw"))  # fwd, dx, dw
    assert len(lines) == expected, run.stdout
    used = {}  # (launch, config) -> registers and shared memory a program takes in an SM
    for line in lines:
        words = line.split()
        assert "STACK:0" in words, f"register spills: {line}"
        config = ast.literal_eval(line[line.index("("):line.index(")") + 1])
        regs, smem = int(line.split("REG:")[1].split()[0]), int(line.split("SMEM:")[1].split()[0])
        used[(words[0], config)] = (-(-regs // 8) * 8 * config[3] * 32, smem + 1024)  # a thread's rounded up to 8
        # TMA candidates store (dw) or load (mm) through TMA (contiguous, 16-byte rows), the others
        # not; dw's chunked ones load through TMA too
        programs, tma = K.persistence(config)
        loads, stores = (tma > 0, False) if words[0] != "dw" else (K.chunk(config) > 0, tma > 0)
        assert f"TMA_LOADS:{int(loads)}" in words and f"TMA_STORES:{int(stores)}" in words, line
        # persistent mm and chunked dw programs run their tiles' K (row) steps as one pipeline: the
        # loop around the dot stores results too
        flat = programs > 0 if words[0] != "dw" else K.chunk(config) > 0
        assert f"FLAT:{int(flat)}" in words, f"loops {'not ' if flat else ''}flattened: {line}"
        if arch >= 90 and dtype != "fp32":
            # Hopper's tensor-core loops keep num_stages tiles in flight
            assert f"DEPTH:{config[4]}" in words, f"not pipelined {config[4]} deep: {line}"
        if programs > 1:
            # several persistent programs per SM fit its registers and shared memory side by side
            assert programs * config[3] * 32 * regs <= 65536, f"registers for {programs} programs: {line}"
            assert programs * (smem + 1024) <= 233472, f"shared memory for {programs} programs: {line}"
    # a backward plan naming a dx configuration to run beside a persistent dw program fits both in an SM
    beside = [p for p in K.backward_plans(elem, arch, limit) if p.dw and p.dx]
    assert bool(beside) == (arch >= 90 and dtype != "fp32")
    for plan in beside:
        (regs_dw, smem_dw), (regs_dx, smem_dx) = used[("dw", plan.dw)], used[("dx", plan.dx)]
        assert regs_dw + regs_dx <= 65536 and smem_dw + smem_dx <= 233472, (plan, used[("dw", plan.dw)],
                                                                            used[("dx", plan.dx)])


@pytest.mark.gpu
def test_auto_picks_triton_on_cuda(gen):
    x, w, gs = _inputs(gen, [3, 0, 5], 16, 8, device="cuda")
    assert MOE_BACKENDS.resolve("auto", x, w, gs).name == "triton"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("sizes,d,f", [([0, 300, 1, 0, 1025, 77, 0, 129], 256, 320), ([5, 0, 700, 3], 40, 111),
                                       ([0] * 63 + [2000], 128, 64)])
def test_cuda_against_float64(gen, monkeypatch, sizes, d, f, dtype):
    monkeypatch.setenv("GENERALIST_TRITON_AUTOTUNE", "0")  # each table's first config: correctness, not speed
    x, w, gs = _inputs(gen, sizes, d, f, dtype, device="cuda")
    dy = torch.randn(sum(sizes), f, generator=gen, dtype=torch.float64).to("cuda", dtype)
    _check_against_float64(x, w, gs, dy, gen.initial_seed())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_every_config(gen, monkeypatch, dtype):
    """Each tuned configuration of each kernel gives the right answer (ragged D and F). Tuning off:
    each table of one entry runs it, and the backward runs one after the other (no timed plan
    naming configurations of its own)."""
    from generalist.kernels.triton import moe as K

    monkeypatch.setenv("GENERALIST_TRITON_AUTOTUNE", "0")
    sizes, d, f = [0, 300, 1, 0, 128, 517, 64, 77], 200, 136  # 64 and 128: groups of whole row steps
    x, w, gs = _inputs(gen, sizes, d, f, dtype, device="cuda")
    dy = torch.randn(sum(sizes), f, generator=gen, dtype=torch.float64).to("cuda", dtype)
    major, _ = torch.cuda.get_device_capability()
    tables = K._CONFIGS_FP32 if dtype == torch.float32 else K._CONFIGS_16BIT[90 if major >= 9 else 80]
    for kernel in ("mm", "dw"):
        table = list(tables[kernel])
        for config in table:
            monkeypatch.setitem(tables, kernel, [config])
            K._autotuned.cache_clear()
            _check_against_float64(x, w, gs, dy, gen.initial_seed())
        monkeypatch.setitem(tables, kernel, table)
    K._autotuned.cache_clear()


@pytest.mark.gpu
@pytest.mark.parametrize("d,f", [(256, 200), (256, 208), (200, 208)])
def test_cuda_dw_through_tma(gen, d, f):
    """Where dw's TMA stores and loads run (Hopper, bf16, 16-byte rows; F ragged against BLOCK_N
    and D = 200 against BLOCK_M, which TMA clips at each expert's end), each persistent and
    chunked configuration gives the right gradient, empty groups' zeros included; the poisoned
    output shows any tile it did not write. F = 208 makes every stride a multiple of 16, so the
    kernel is compiled as training launches it (deeper pipelines, more shared memory) rather
    than as F = 200's."""
    from generalist.kernels.triton import moe as K

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs Hopper or newer")
    configs = [c for c in K._CONFIGS_16BIT[90]["dw"] if K.persistence(c)[0] or K.chunk(c)]
    assert any(K.persistence(c)[1] for c in configs) and any(K.chunk(c) for c in configs)
    sizes = [0, 300, 1, 0, 128, 517, 64, 77]
    x, _, gs = _inputs(gen, sizes, d, f, torch.bfloat16, device="cuda")
    dy = torch.randn(sum(sizes), f, generator=gen, dtype=torch.float64).to("cuda", torch.bfloat16)
    assert K.tma_storable(torch.empty(len(sizes), d, f, dtype=torch.bfloat16)) and K.tma_rows_loadable(x, dy)
    want = grouped_mm_bwd(dy.double(), x.double(), torch.zeros(len(sizes), d, f, dtype=torch.float64, device="cuda"),
                          gs, "reference")[1]
    for config in configs:
        out = torch.full((len(sizes), d, f), float("nan"), dtype=torch.bfloat16, device="cuda")
        got = K._dw(x, dy, gs, len(sizes), out=out, config=config).double()
        assert torch.isfinite(got).all(), config
        err = (got - want).abs().max().item()
        assert err <= 2e-2 * want.abs().max().item(), (config, err)
        assert torch.equal(got[0], torch.zeros_like(got[0])) and torch.equal(got[3], torch.zeros_like(got[3]))


@pytest.mark.gpu
def test_cuda_dw_keeps_a_groups_non_finite_rows_to_itself(gen):
    """dw[g] reads only group g's rows under every dw configuration of this GPU (bf16)."""
    from generalist.kernels.triton import moe as K

    for config in K.configs_for("dw", 2, *K._arch_and_smem(torch.cuda.current_device())):
        _dw_keeps_non_finite_rows_to_their_group(gen, torch.bfloat16, "cuda", config)


@pytest.mark.gpu
@pytest.mark.parametrize("d,f", [(256, 208), (64, 40)])
def test_cuda_persistent_mm_loads_through_tma(gen, d, f):
    """Each persistent configuration of the forward and dx gives the right result where it loads
    through TMA (Hopper, 16-byte rows; dx's w^T as a transposed descriptor; F ragged against
    BLOCK_K and BLOCK_N, which TMA fills with zeros); D = 256, F = 208 compiles it as training
    launches it (strides multiples of 16; test_cuda_every_config runs F = 136 and D = 200);
    D = 64 and F = 40 make K loops of one step, so that the flattened pipeline's loads run
    several tiles ahead.
    The memory the output is allocated from was NaNs just before, so a tile left unwritten shows
    (the caching allocator hands the freed block back for an allocation of its size)."""
    from generalist.kernels.triton import moe as K

    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs Hopper or newer")
    persistent = [c for c in K._CONFIGS_16BIT[90]["mm"] if K.persistence(c)[0]]
    assert any(K.persistence(c)[1] for c in persistent)
    sizes = [0, 300, 1, 0, 128, 517, 64, 77]
    x, w, gs = _inputs(gen, sizes, d, f, torch.bfloat16, device="cuda")
    dy = torch.randn(sum(sizes), f, generator=gen, dtype=torch.float64).to("cuda", torch.bfloat16)
    assert K.tma_loadable(x, w) and K.tma_loadable(dy, w.transpose(1, 2))
    want_y = grouped_mm(x.double(), w.double(), gs, backend="reference")
    want_dx = grouped_mm_bwd(dy.double(), x.double(), w.double(), gs, "reference")[0]
    for config in persistent:
        for a, b, want in ((x, w, want_y), (dy, w.transpose(1, 2), want_dx)):
            torch.full(want.shape, float("nan"), dtype=torch.bfloat16, device="cuda")  # freed at once
            got = K._mm(a, b, gs, config=config).double()
            assert torch.isfinite(got).all(), config
            err = (got - want).abs().max().item()
            assert err <= 2e-2 * want.abs().max().item(), (config, err)


@pytest.mark.gpu
def test_cuda_tuning_compiles_every_candidate_up_front(gen, monkeypatch):
    """A first call with a new tuning key compiles every candidate (on a thread pool) before the
    tuner times them, and the tuned result is right."""
    from generalist.kernels.triton import moe as K

    monkeypatch.setenv("GENERALIST_TRITON_AUTOTUNE", "1")
    K._autotuned.cache_clear()
    sizes, d, f = [40, 0, 77, 3], 48, 80
    x, w, gs = _inputs(gen, sizes, d, f, torch.bfloat16, device="cuda")
    kernel_cache = K._KERNELS["mm"].device_caches[torch.cuda.current_device()][0]
    kernel_cache.clear()  # the in-memory kernels (Triton's disk cache refills it)
    y = grouped_mm(x, w, gs, backend="triton")
    n_configs = len(K._autotuned("mm", 2, torch.cuda.current_device(), True).tuner.configs)
    assert len(kernel_cache) == n_configs  # one specialisation per candidate, all compiled
    torch.testing.assert_close(y.float(), grouped_mm(x.float(), w.float(), gs, backend="reference"),
                               atol=5e-2, rtol=5e-2)
    K._autotuned.cache_clear()


@pytest.mark.gpu
def test_cuda_backward_plans_on_a_user_stream(gen, monkeypatch):
    """Every plan this GPU offers, run on a stream of the caller's: dx and dw against float64 and
    the same bits as one after the other under the same configurations. Side by side waits for the
    caller's stream before reading (dy is written there behind a sleep four times as long as dw's,
    over NaNs), and the caller's stream waits for dw before going on (dw sleeps first, its output
    poisoned with NaNs, and a copy queued on the caller's stream right after the call must equal
    the final result). Every plan runs once before, so that no compile inside the timed part of
    the loop stretches the host's queueing past the sleeps."""
    from generalist.kernels.triton import moe as K

    cycles = 20_000_000  # about 10 ms
    dw_kernel = K._dw

    def slow_dw(*args, out=None, **kwargs):
        if out is not None:
            out.fill_(float("nan"))
        torch.cuda._sleep(cycles)
        return dw_kernel(*args, out=out, **kwargs)

    monkeypatch.setattr(K, "_dw", slow_dw)
    sizes, d, f = [0, 3000, 1, 0, 1280, 517, 640, 770] * 2, 512, 384
    x, w, gs = _inputs(gen, sizes, d, f, torch.bfloat16, device="cuda")
    dy = torch.randn(sum(sizes), f, generator=gen, dtype=torch.float64).to("cuda", torch.bfloat16)
    dy_live = torch.empty_like(dy)
    plans = K.backward_plans(2, *K._arch_and_smem(torch.cuda.current_device()))
    assert plans[0] == K.SEQUENTIAL and len(plans) >= 2
    for plan in plans:  # compile every configuration first
        K.grouped_mm_backward(dy, x, w, gs, plan=plan)
        K.grouped_mm_backward(dy, x, w, gs, plan=plan._replace(side_by_side=False))
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    results = {}
    for plan in plans:
        dy_live.fill_(float("nan"))
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            torch.cuda._sleep(4 * cycles)
            dy_live.copy_(dy)
            dx, dw = K.grouped_mm_backward(dy_live, x, w, gs, plan=plan)
            snapshot = (dx.clone(), dw.clone())
            after = plan._replace(side_by_side=False)
            if after not in results:
                results[after] = K.grouped_mm_backward(dy_live, x, w, gs, plan=after)
        stream.synchronize()
        results[plan] = (dx, dw)
        _backward_against_float64(dy, x, w, gs, dx, dw)
        assert torch.equal(snapshot[0], dx) and torch.equal(snapshot[1], dw), plan
    for plan, (dx, dw) in results.items():
        after = results[plan._replace(side_by_side=False)]
        assert torch.equal(dx, after[0]) and torch.equal(dw, after[1]), plan


@pytest.mark.gpu
def test_cuda_backward_times_its_plans_at_a_keys_first_call(gen, monkeypatch, tmp_path):
    """With tuning on, a key's first backward times every plan this GPU offers (do_bench, side
    streams and all), keeps the fastest and writes it, with each plan's time, to Triton's cache
    directory; its result matches float64; the key's next backward times nothing and computes the
    same bits; the file reads back as the kept plan."""
    import json

    from generalist.kernels.triton import moe as K

    digests = []

    class PlanFileHere(K.PlanFile):  # the plan's file under tmp_path, the kernels' cache left alone
        def __init__(self, digest):
            digests.append(digest)
            with monkeypatch.context() as m:
                m.setenv("TRITON_CACHE_DIR", str(tmp_path))
                super().__init__(digest)

    monkeypatch.setenv("GENERALIST_TRITON_AUTOTUNE", "1")
    monkeypatch.setattr(K, "_PLANS", {})
    monkeypatch.setattr(K, "PlanFile", PlanFileHere)
    timed, seconds = [], K._seconds
    monkeypatch.setattr(K, "_seconds", lambda fn: timed.append(fn) or seconds(fn))
    sizes, d, f = [0, 300, 1, 0, 128, 517, 64, 77], 256, 208
    x, w, gs = _inputs(gen, sizes, d, f, torch.bfloat16, device="cuda")
    dy = torch.randn(sum(sizes), f, generator=gen, dtype=torch.float64).to("cuda", torch.bfloat16)
    dx, dw = K.grouped_mm_backward(dy, x, w, gs)
    device = torch.cuda.current_device()
    plans = K.backward_plans(2, *K._arch_and_smem(device))
    kept = K._PLANS[(device, torch.bfloat16, K._t_bucket(sum(sizes)), d, f, len(sizes))]
    assert len(timed) == len(plans) and kept in plans
    _backward_against_float64(dy, x, w, gs, dx, dw)
    files = list(tmp_path.rglob(K.PlanFile.NAME))
    assert len(files) == 1
    saved = json.loads(files[0].read_text())
    assert len(saved["seconds"]) == len(plans) and 0 < saved["seconds"][0][1] < 1  # SEQUENTIAL's, in seconds
    assert PlanFileHere(digests[0]).load(plans) == kept
    again = K.grouped_mm_backward(dy, x, w, gs)
    assert len(timed) == len(plans)
    assert torch.equal(again[0], dx) and torch.equal(again[1], dw)


@pytest.mark.gpu
def test_cuda_backward_in_a_cuda_graph(gen, monkeypatch):
    """A backward captured in a CUDA graph: with its key untimed (in this process and on disk) it
    runs one after the other and times nothing; with side by side kept for its key, dw is captured
    on the side stream under the kept configuration; a replay on new inputs (weights and group
    sizes too) gives what an eager call does."""
    from generalist.kernels.triton import moe as K

    monkeypatch.setenv("GENERALIST_TRITON_AUTOTUNE", "1")
    monkeypatch.setattr(K, "_PLANS", {})
    monkeypatch.setattr(K.PlanFile, "load", lambda self, plans: None)
    seen, dw_kernel = [], K._dw

    def recorded_dw(*args, config=None, **kwargs):
        seen.append((torch.cuda.current_stream(), config))
        return dw_kernel(*args, config=config, **kwargs)

    monkeypatch.setattr(K, "_dw", recorded_dw)
    sizes, d, f = [0, 300, 1, 0, 128, 517, 64, 77], 256, 200
    x, w, gs = _inputs(gen, sizes, d, f, torch.bfloat16, device="cuda")
    dy = torch.randn(sum(sizes), f, generator=gen).to("cuda", torch.bfloat16)
    device = torch.cuda.current_device()
    key = (device, torch.bfloat16, K._t_bucket(sum(sizes)), d, f, len(sizes))
    plans = K.backward_plans(2, *K._arch_and_smem(device))
    side_by_side = next((p for p in plans if p.dw and K.persistence(p.dw)[1]), plans[1])  # TMA where there is
    for kept in (None, side_by_side):
        if kept is not None:
            K._PLANS[key] = kept
        warm = torch.cuda.Stream()  # compile and tune outside the capture
        warm.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(warm):
            K.grouped_mm_backward(dy, x, w, gs, plan=kept or K.SEQUENTIAL)
        torch.cuda.current_stream().wait_stream(warm)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            capturing = torch.cuda.current_stream()
            dx, dw = K.grouped_mm_backward(dy, x, w, gs)
        assert K._PLANS == ({} if kept is None else {key: kept})
        stream, config = seen[-1]
        if kept is None:
            assert stream == capturing and config is None
        else:
            assert stream == K._side_stream(device) and stream != capturing and config == kept.dw
        for t in (x, dy, w):
            t.copy_(torch.randn(t.shape, generator=gen).to("cuda", torch.bfloat16))
        gs.copy_(gs.flip(0))
        graph.replay()
        torch.cuda.synchronize()
        want = K.grouped_mm_backward(dy, x, w, gs, plan=kept or K.SEQUENTIAL)
        assert torch.equal(dx, want[0]) and torch.equal(dw, want[1]), kept
