"""MoE ops against per-expert / per-token loops written with explicit slices.

Shapes: T tokens, D input features, F output features, E experts, K experts per token,
S kept assignments.
"""

import numpy as np
import pytest
import torch

from generalist.ops import BackendError
from generalist.ops.moe import MOE_BACKENDS, grouped_mm, grouped_mm_bwd, permute, unpermute

SIZES = [
    [0, 5, 0, 3],  # empty groups first, in the middle
    [1],
    [97, 0, 33, 1, 0],  # empty last group
    [0, 0, 0],  # no rows at all
    [2, 2, 2, 2, 2, 2, 2, 2],
]


def loop_mm(x_TD, w_EDF, sizes):
    outs, start = [], 0
    for e, n in enumerate(sizes):
        outs.append(x_TD[start:start + n] @ w_EDF[e])
        start += n
    return torch.cat(outs) if outs else x_TD.new_zeros((0, w_EDF.shape[2]))


def _inputs(gen, sizes, d=13, f=7, dtype=torch.float32, idx_dtype=torch.int64):
    x = torch.randn(sum(sizes), d, generator=gen, dtype=torch.float64).to(dtype)
    w = torch.randn(len(sizes), d, f, generator=gen, dtype=torch.float64).to(dtype)
    return x, w, torch.tensor(sizes, dtype=idx_dtype)


@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("sizes", SIZES)
def test_grouped_mm_matches_loop(gen, sizes, idx_dtype):
    x, w, gs = _inputs(gen, sizes, idx_dtype=idx_dtype)
    y = grouped_mm(x, w, gs)
    assert y.shape == (sum(sizes), 7) and y.dtype == torch.float32
    torch.testing.assert_close(y, loop_mm(x, w, sizes), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(y.double(), loop_mm(x.double(), w.double(), sizes), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_grouped_mm_low_precision(gen, dtype):
    sizes = [97, 0, 33, 1]
    x, w, gs = _inputs(gen, sizes, d=40, f=24, dtype=dtype)
    y = grouped_mm(x, w, gs)
    want = loop_mm(x.double(), w.double(), sizes)
    err = (y.double() - want).abs().max().item()
    baseline = (loop_mm(x, w, sizes).double() - want).abs().max().item()
    assert y.dtype == dtype and err <= 2 * baseline + 1e-3, (err, baseline, gen.initial_seed())


@pytest.mark.parametrize("sizes", SIZES)
def test_grouped_mm_gradients_match_float64_loop(gen, sizes):
    x, w, gs = _inputs(gen, sizes)
    dy = torch.randn(sum(sizes), 7, generator=gen)
    x.requires_grad_(True)
    w.requires_grad_(True)
    grouped_mm(x, w, gs).backward(dy)
    x64, w64 = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    loop_mm(x64, w64, sizes).backward(dy.double())
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.grad.double(), w64.grad, atol=1e-5, rtol=1e-5)
    for e, n in enumerate(sizes):
        if n == 0:
            assert torch.equal(w.grad[e], torch.zeros_like(w.grad[e]))


def test_opcheck(gen):
    x, w, gs = _inputs(gen, [3, 0, 5, 1])
    torch.library.opcheck(torch.ops.generalist.grouped_mm.default, (x, w, gs, "reference"))
    x.requires_grad_(True)
    w.requires_grad_(True)
    torch.library.opcheck(torch.ops.generalist.grouped_mm.default, (x, w, gs, "reference"))
    dy = torch.randn(9, 7, generator=gen)
    torch.library.opcheck(grouped_mm_bwd._opoverload, (dy, x.detach(), w.detach(), gs.int(), "reference"))


def test_compile_fullgraph_forward_and_backward(gen):
    x, w, gs = _inputs(gen, [4, 0, 9, 2])
    dy = torch.randn(15, 7, generator=gen)

    def loss(x, w, gs):
        return (grouped_mm(torch.tanh(x), w, gs) * dy).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    grads = []
    for fn in (loss, compiled):
        xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        out = fn(xr, wr, gs)
        out.backward()
        grads.append((out.detach(), xr.grad, wr.grad))
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("x,w,gs,match", [
    (torch.randn(5), torch.randn(2, 5, 3), torch.tensor([2, 3]), r"x_TD must have shape \(T, D\)"),
    (torch.randn(5, 4), torch.randn(5, 3), torch.tensor([2, 3]), r"w_EDF must have shape \(E, D, F\)"),
    (torch.randn(5, 4), torch.randn(2, 5, 3), torch.tensor([2, 3]), "w_EDF has 5 input features but x_TD has 4"),
    (torch.randn(5, 4), torch.randn(2, 4, 3).double(), torch.tensor([2, 3]), "w_EDF has dtype torch.float64"),
    (torch.ones(5, 4, dtype=torch.int64), torch.ones(2, 4, 3, dtype=torch.int64), torch.tensor([2, 3]), "x_TD has unsupported dtype"),
    (torch.randn(5, 4), torch.randn(2, 4, 3), torch.tensor([2.0, 3.0]), "group_sizes_E must be int32 or int64"),
    (torch.randn(5, 4), torch.randn(2, 4, 3), torch.tensor([[2, 3]]), r"group_sizes_E must have shape \(E,\)"),
    (torch.randn(5, 4), torch.randn(2, 4, 3), torch.tensor([2, 1, 2]), "group_sizes_E has 3 entries but w_EDF has 2 experts"),
    (torch.randn(5, 4), torch.randn(2, 4, 3), torch.tensor([2, 2]), "group_sizes_E sums to 4 but x_TD has 5 rows"),
    (torch.randn(5, 4), torch.randn(2, 4, 3), torch.tensor([-1, 6]), "group_sizes_E must be non-negative"),
])
def test_grouped_mm_bad_input(x, w, gs, match):
    with pytest.raises(ValueError, match=match):
        grouped_mm(x, w, gs)


def test_unknown_backend():
    x, w, gs = torch.randn(2, 3), torch.randn(1, 3, 4), torch.tensor([2])
    with pytest.raises(BackendError, match="unknown backend 'cuda'"):
        grouped_mm(x, w, gs, backend="cuda")
    assert "reference" in MOE_BACKENDS.available()


def naive_permute(x_TD, expert_idx_TK, n_experts, capacity=None):
    """Expert by expert, token by token: the order the op promises. With a capacity, an expert
    admits first choices (token by token), then second choices, ... until it is full."""
    t, k = expert_idx_TK.shape
    rows, idx, sizes = [], [], []
    for e in range(n_experts):
        admitted = set()
        for j in range(k):
            for tok in range(t):
                if expert_idx_TK[tok, j] == e and (capacity is None or len(admitted) < capacity):
                    admitted.add(tok * k + j)
        for tok in range(t):
            for j in range(k):
                if tok * k + j in admitted:
                    rows.append(x_TD[tok])
                    idx.append(tok * k + j)
        sizes.append(len(admitted))
    x_sorted = torch.stack(rows) if rows else x_TD.new_zeros((0, x_TD.shape[1]))
    return x_sorted, torch.tensor(idx, dtype=torch.int64), torch.tensor(sizes, dtype=torch.int32)


def naive_unpermute(y_SD, sort_idx_S, weights_TK):
    t, k = weights_TK.shape
    row_of = {a: s for s, a in enumerate(sort_idx_S.tolist())}
    out = []
    for tok in range(t):
        acc = torch.zeros(y_SD.shape[1], dtype=y_SD.dtype)
        for j in range(k):
            if tok * k + j in row_of:
                acc = acc + y_SD[row_of[tok * k + j]] * weights_TK[tok, j]
        out.append(acc)
    return torch.stack(out) if out else y_SD.new_zeros((0, y_SD.shape[1]))


def _routing(gen, t, k, e, distinct=True):
    if distinct:  # top-k style: k different experts per token
        return torch.rand(t, e, generator=gen).argsort(dim=1)[:, :k]
    return torch.randint(0, e, (t, k), generator=gen)


@pytest.mark.parametrize("t,k,e,capacity,distinct", [
    (1, 1, 1, None, True),
    (37, 2, 5, None, True),
    (37, 3, 8, None, False),  # repeated experts in a row are allowed by the op
    (64, 4, 4, None, True),
    (37, 2, 5, 6, True),
    (40, 3, 6, 0, True),  # everything dropped
    (0, 2, 3, None, True),
])
def test_permute_unpermute_match_naive_loop_exactly(gen, t, k, e, capacity, distinct):
    x = torch.randn(t, 11, generator=gen)
    idx = _routing(gen, t, k, e, distinct)
    got = permute(x, idx, e, capacity)
    want = naive_permute(x, idx, e, capacity)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and torch.equal(g, w), gen.initial_seed()
    assert int(got[2].sum()) == got[0].shape[0] == got[1].shape[0]
    y = torch.randn(got[0].shape[0], 11, generator=gen)
    weights = torch.rand(t, k, generator=gen)
    out = unpermute(y, got[1], weights)
    assert torch.equal(out, naive_unpermute(y, got[1], weights)), gen.initial_seed()


def test_capacity_keeps_first_choices_before_second_ones():
    """Expert 0 has room for 2: token 1's and token 2's first choices win over token 0's second
    (with earlier tokens first regardless of choice, token 1 would lose its only routed expert)."""
    idx = torch.tensor([[1, 0], [0, 1], [0, 2]])
    x_sorted, sort_idx, sizes = permute(torch.randn(3, 4), idx, 3, capacity=2)
    assert sort_idx.tolist() == [2, 4, 0, 3, 5] and sizes.tolist() == [2, 2, 1]


def test_a_dropped_assignment_leaves_its_weight_out():
    """Expert 0 keeps one assignment; the dropped one's inf or NaN weight does not reach its
    token (0 * inf would be NaN): the token gets its kept row alone."""
    idx = torch.tensor([[0, 0], [0, 0]])
    x_sorted, sort_idx, _ = permute(torch.randn(2, 3), idx, 1, capacity=1)
    assert sort_idx.tolist() == [0]
    for bad in (float("inf"), float("nan")):
        weights = torch.tensor([[2.0, bad], [bad, bad]], requires_grad=True)
        out = unpermute(x_sorted, sort_idx, weights)
        assert torch.equal(out, torch.stack([2 * x_sorted[0], torch.zeros(3)]))
        out.sum().backward()
        assert torch.equal(weights.grad, torch.tensor([[x_sorted[0].sum().item(), 0.0], [0.0, 0.0]]))


def test_permute_is_stable_and_roundtrips(gen):
    idx = torch.zeros(50, 2, dtype=torch.int32)  # all ties: stability decides the order
    idx[::3, 1] = 1
    x = torch.randn(50, 4, generator=gen)
    x_sorted, sort_idx, sizes = permute(x, idx, 2)
    ones = list(range(1, 100, 6))  # assignment (t, 1) for t % 3 == 0
    assert sort_idx.tolist() == [a for a in range(100) if a not in ones] + ones
    assert sizes.tolist() == [83, 17]
    # all-ones weights: each token gets its row back K times
    assert torch.equal(unpermute(x_sorted, sort_idx, torch.ones(50, 2)), x + x)


def test_permute_unpermute_gradients(gen):
    t, k, e = 23, 2, 4
    x = torch.randn(t, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(t, k, generator=gen, dtype=torch.float64, requires_grad=True)
    idx = _routing(gen, t, k, e)
    scale = torch.randn(6, generator=gen, dtype=torch.float64)
    x_sorted, sort_idx, _ = permute(x, idx, e, capacity=5)
    unpermute(x_sorted * scale, sort_idx, weights).square().sum().backward()
    xs, si, _ = naive_permute(x, idx, e, capacity=5)
    x2, w2 = x.detach().clone().requires_grad_(True), weights.detach().clone().requires_grad_(True)
    xs2, _, _ = naive_permute(x2, idx, e, capacity=5)
    naive_unpermute(xs2 * scale, si, w2).square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(weights.grad, w2.grad)


@pytest.mark.parametrize("call,match", [
    (lambda: permute(torch.randn(4, 3), torch.zeros(5, 2, dtype=torch.int64), 2), "expert_idx_TK has 5 rows but x_TD has 4"),
    (lambda: permute(torch.randn(4, 3), torch.zeros(4, 2), 2), "expert_idx_TK must be int32 or int64"),
    (lambda: permute(torch.randn(4, 3), torch.full((4, 2), 2), 2), r"values must lie in \[0, 2\)"),
    (lambda: permute(torch.randn(4, 3), torch.zeros(4, 2, dtype=torch.int64), 0), "n_experts must be an integer >= 1, got 0"),
    (lambda: permute(torch.randn(4, 3), torch.zeros(4, 2, dtype=torch.int64), True), "n_experts must be an integer >= 1, got True"),
    (lambda: permute(torch.randn(4, 3), torch.zeros(4, 2, dtype=torch.int64), 2, -1), "capacity must be an integer >= 0, got -1"),
    (lambda: permute(torch.randn(4, 3), torch.zeros(4, 2, dtype=torch.int64), 2, True), "capacity must be an integer >= 0, got True"),
    (lambda: unpermute(torch.randn(2, 3), torch.tensor([0, 9]), torch.ones(3, 2)), r"sort_idx_S values must lie in \[0, T\*K = 6\), got \[0, 9\]"),
    (lambda: unpermute(torch.randn(2, 3), torch.tensor([-1, 0]), torch.ones(3, 2)), r"got \[-1, 0\]"),
    # one row would overwrite the other: an answer that depends on the order of a scatter
    (lambda: unpermute(torch.randn(2, 3), torch.tensor([0, 0]), torch.ones(3, 2)), "sort_idx_S holds an assignment twice"),
    (lambda: unpermute(torch.randn(9, 3), torch.arange(9), torch.ones(4, 2)), "at most T\\*K = 8"),
    (lambda: unpermute(torch.randn(8, 3), torch.arange(7), torch.ones(4, 2)), "sort_idx_S 7"),
    (lambda: unpermute(torch.randn(8, 3), torch.arange(8), torch.ones(4, 2), T=5), "T is 5 but weights_TK has 4 rows"),
])
def test_permute_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_permute_takes_numpy_integers():
    x, idx = torch.randn(4, 3), torch.tensor([[0, 1], [1, 0], [1, 1], [0, 0]])
    want = permute(x, idx, 2, 3)
    for got, expected in zip(permute(x, idx, np.int64(2), np.int32(3)), want):
        torch.testing.assert_close(got, expected)


def test_value_checks_can_be_skipped():
    """check_values=False (sizes made by permute, indices by a router) skips the host-side reads."""
    x, w = torch.randn(6, 4), torch.randn(2, 4, 3)
    bad_sizes = torch.tensor([2, 3], dtype=torch.int32)  # sums to 5, not 6
    with pytest.raises(ValueError, match="sums to 5"):
        grouped_mm(x, w, bad_sizes, backend="reference")
    good = torch.tensor([2, 4], dtype=torch.int32)
    torch.testing.assert_close(grouped_mm(x, w, good, backend="reference", check_values=False),
                               grouped_mm(x, w, good, backend="reference"))
    assert grouped_mm(x, w, bad_sizes, backend="reference", check_values=False).shape == (6, 3)
    idx = torch.tensor([[0], [2], [1]])
    with pytest.raises(ValueError, match=r"must lie in \[0, 2\)"):
        permute(x[:3], idx, 2)
    xs, _, sizes = permute(x[:3], idx, 2, check_values=False)  # out of range: not counted in any group
    assert sizes.tolist() == [1, 1]


def test_eager_calls_skip_the_op_dispatch(gen, monkeypatch):
    """In eager mode grouped_mm calls the backend directly: as it is without an autograd graph to
    record, through an autograd.Function with one; weights may be nn.Parameters. Under a
    torch-function mode the registered op runs, and the results agree bit for bit."""
    import sys

    module = sys.modules["generalist.ops.moe"]
    calls = []
    op = module.grouped_mm_op
    monkeypatch.setattr(module, "grouped_mm_op", lambda *a: calls.append(1) or op(*a))
    x, w, gs = _inputs(gen, [3, 0, 5])
    w = torch.nn.Parameter(w)
    dy = torch.randn(8, 7, generator=gen)

    class NoOpMode(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    def run(x):
        y = grouped_mm(x, w, gs, backend="reference")
        return (y.detach(), *torch.autograd.grad((y * dy).sum(), (x, w)))

    with torch.no_grad():
        y = grouped_mm(x, w, gs, backend="reference")
    assert not calls
    eager = run(x.clone().requires_grad_())
    assert not calls
    with NoOpMode():
        dispatched = run(x.clone().requires_grad_())
    assert calls == [1]
    torch.testing.assert_close(y, eager[0], rtol=0, atol=0)
    torch.testing.assert_close(eager, dispatched, rtol=0, atol=0)

    # create_graph: the same first gradients, and a second backward is refused, not silently wrong
    x2 = x.clone().requires_grad_()
    dx, = torch.autograd.grad((grouped_mm(x2, w, gs, backend="reference") * dy).sum(), x2, create_graph=True)
    torch.testing.assert_close(dx.detach(), eager[1], rtol=0, atol=0)
    with pytest.raises(RuntimeError):
        (dx ** 2).sum().backward()

    # meta tensors (shapes only) take the op and its fake implementation
    meta = grouped_mm(x.to("meta"), torch.nn.Parameter(w.detach().to("meta")), gs.to("meta"), check_values=False)
    assert meta.shape == (8, 7) and meta.is_meta