"""Mixture-of-experts ops: the grouped matmul over expert groups, and the token permutation
around it (dropless routing, megablocks style).

`grouped_mm` lowers to the registered ops `generalist::grouped_mm` and
`generalist::grouped_mm_bwd`, each with a fake implementation, so `torch.compile(fullgraph=True)`
and `torch.library.opcheck` work. The implementation behind them is picked by `backend` from
MOE_BACKENDS; the reference (a loop over experts with torch.matmul, in the input dtype) is
always there, Triton kernels register themselves when they can run. `permute` / `unpermute` are
plain index ops (sort, index_select, index_copy), traceable and differentiable as they are, and
deterministic: they match a per-token loop exactly.

Shapes: T tokens, D input features, F output features, E experts, K experts per token (top-k),
S kept token-expert assignments (S = T*K when nothing is dropped).
"""

from __future__ import annotations

import torch
from torch import Tensor

from generalist._fields import check_count
from generalist.ops import _attention_checks as checks
from generalist.ops._registry import Implementation, Registry

MOE_BACKENDS = Registry("moe", known=("reference", "triton"))

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INDEX_DTYPES = (torch.int32, torch.int64)


def _grouped_mm_reference(x_TD: Tensor, w_EDF: Tensor, group_sizes_E: Tensor) -> Tensor:
    y_TF = x_TD.new_empty((x_TD.shape[0], w_EDF.shape[2]))
    start = 0
    for e, n in enumerate(group_sizes_E.tolist()):
        if n:
            torch.matmul(x_TD[start:start + n], w_EDF[e], out=y_TF[start:start + n])
        start += n
    return y_TF


def _grouped_mm_bwd_reference(dy_TF: Tensor, x_TD: Tensor, w_EDF: Tensor,
                              group_sizes_E: Tensor) -> tuple[Tensor, Tensor]:
    dx_TD = x_TD.new_empty(x_TD.shape)
    dw_EDF = torch.zeros_like(w_EDF)  # an empty group gets a zero gradient
    start = 0
    for e, n in enumerate(group_sizes_E.tolist()):
        if n:
            rows = slice(start, start + n)
            torch.matmul(dy_TF[rows], w_EDF[e].transpose(0, 1), out=dx_TD[rows])
            torch.matmul(x_TD[rows].transpose(0, 1), dy_TF[rows], out=dw_EDF[e])
        start += n
    return dx_TD, dw_EDF


MOE_BACKENDS.register(Implementation(
    name="reference", priority=0, unsupported=lambda *inputs: None,
    functions={"grouped_mm": _grouped_mm_reference, "grouped_mm_bwd": _grouped_mm_bwd_reference},
))


@torch.library.custom_op("generalist::grouped_mm", mutates_args=())
def grouped_mm_op(x_TD: Tensor, w_EDF: Tensor, group_sizes_E: Tensor, backend: str) -> Tensor:
    """y_TF; inputs must be validated (see `grouped_mm`)."""
    return MOE_BACKENDS.resolve(backend, x_TD, w_EDF, group_sizes_E).functions["grouped_mm"](
        x_TD, w_EDF, group_sizes_E)


@grouped_mm_op.register_fake
def _(x_TD, w_EDF, group_sizes_E, backend):
    return x_TD.new_empty((x_TD.shape[0], w_EDF.shape[2]))


@torch.library.custom_op("generalist::grouped_mm_bwd", mutates_args=())
def grouped_mm_bwd(dy_TF: Tensor, x_TD: Tensor, w_EDF: Tensor, group_sizes_E: Tensor,
                   backend: str) -> tuple[Tensor, Tensor]:
    """(dx_TD, dw_EDF): dx = grouped_mm(dy, w^T), dw_e = x_e^T dy_e (zero for empty groups)."""
    impl = MOE_BACKENDS.resolve(backend, x_TD, w_EDF, group_sizes_E)
    return impl.functions["grouped_mm_bwd"](dy_TF, x_TD, w_EDF, group_sizes_E)


@grouped_mm_bwd.register_fake
def _(dy_TF, x_TD, w_EDF, group_sizes_E, backend):
    return x_TD.new_empty(x_TD.shape), w_EDF.new_empty(w_EDF.shape)


def _setup_context(ctx, inputs, output):
    x_TD, w_EDF, group_sizes_E, backend = inputs
    ctx.save_for_backward(x_TD, w_EDF, group_sizes_E)
    ctx.backend = backend


def _backward(ctx, dy_TF):
    x_TD, w_EDF, group_sizes_E = ctx.saved_tensors
    dx_TD, dw_EDF = grouped_mm_bwd(dy_TF.contiguous(), x_TD, w_EDF, group_sizes_E, ctx.backend)
    return dx_TD, dw_EDF, None, None


grouped_mm_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerGroupedMM(torch.autograd.Function):
    """What the registered op and its autograd do, for eager calls that record a graph, calling
    the resolved backend directly: no op dispatch on the way in or out (Registry.call)."""

    @staticmethod
    def forward(ctx, impl, x_TD, w_EDF, group_sizes_E):
        ctx.save_for_backward(x_TD, w_EDF, group_sizes_E)
        ctx.impl = impl
        return impl.functions["grouped_mm"](x_TD, w_EDF, group_sizes_E)

    @staticmethod
    def backward(ctx, dy_TF):
        x_TD, w_EDF, group_sizes_E = ctx.saved_tensors
        args = (dy_TF.contiguous(), x_TD, w_EDF, group_sizes_E)
        if torch.is_grad_enabled():  # create_graph: the registered op, whose result refuses a second backward
            dx_TD, dw_EDF = grouped_mm_bwd(*args, ctx.impl.name)
        else:
            dx_TD, dw_EDF = ctx.impl.functions["grouped_mm_bwd"](*args)
        return None, dx_TD, dw_EDF, None


def _check_tensor(name: str, t, ndim: int, layout: str) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have shape {layout} ({ndim} dims), got {tuple(t.shape)}")


def grouped_mm(x_TD: Tensor, w_EDF: Tensor, group_sizes_E: Tensor, *, backend: str = "auto",
               check_values: bool = True) -> Tensor:
    """Per-expert matmul over rows sorted by expert: x (T, D), w (E, D, F), group_sizes int32 or
    int64 (E,), non-negative, summing to T. Rows [o_e, o_e + group_sizes[e]) with
    o_e = sum(group_sizes[:e]) are multiplied by w[e]. Returns y (T, F) in x's dtype.

    Value checks on group_sizes need them on the host (a device sync), so they run in eager mode
    only, and are skipped with `check_values=False` (group sizes made by `permute`, as the MoE
    layer does) or `set_value_checks(False)`.
    """
    MOE_BACKENDS.check_name(backend)
    _check_tensor("x_TD", x_TD, 2, "(T, D)")
    _check_tensor("w_EDF", w_EDF, 3, "(E, D, F)")
    _check_tensor("group_sizes_E", group_sizes_E, 1, "(E,)")
    if x_TD.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x_TD has unsupported dtype {x_TD.dtype}; supported: {_FLOAT_DTYPES}")
    if w_EDF.dtype != x_TD.dtype:
        raise ValueError(f"w_EDF has dtype {w_EDF.dtype} but x_TD has {x_TD.dtype}; they must match")
    if group_sizes_E.dtype not in _INDEX_DTYPES:
        raise ValueError(f"group_sizes_E must be int32 or int64, got {group_sizes_E.dtype}")
    for name, t in (("w_EDF", w_EDF), ("group_sizes_E", group_sizes_E)):
        if t.device != x_TD.device:
            raise ValueError(f"{name} is on {t.device} but x_TD is on {x_TD.device}")
    if w_EDF.shape[1] != x_TD.shape[1]:
        raise ValueError(f"w_EDF has {w_EDF.shape[1]} input features but x_TD has {x_TD.shape[1]}")
    if group_sizes_E.shape[0] != w_EDF.shape[0]:
        raise ValueError(f"group_sizes_E has {group_sizes_E.shape[0]} entries but w_EDF has "
                         f"{w_EDF.shape[0]} experts")
    if check_values and checks.value_checks_on(group_sizes_E):
        sizes = group_sizes_E.tolist()
        if any(n < 0 for n in sizes):
            raise ValueError(f"group_sizes_E must be non-negative, got {sizes}")
        if sum(sizes) != x_TD.shape[0]:
            raise ValueError(f"group_sizes_E sums to {sum(sizes)} but x_TD has {x_TD.shape[0]} rows")
    return MOE_BACKENDS.call(grouped_mm_op, "grouped_mm", backend, x_TD, w_EDF, group_sizes_E, autograd=_EagerGroupedMM)


def permute(x_TD: Tensor, expert_idx_TK: Tensor, n_experts: int, capacity: int | None = None, *,
            check_values: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Sort token-expert assignments by expert for `grouped_mm`.

    x (T, D); expert_idx int32/int64 (T, K) with values in [0, n_experts). Assignment
    a = t*K + k goes to expert expert_idx[t, k]; the sort is stable, so inside an expert's group
    assignments keep token order. With `capacity`, each expert keeps at most `capacity`
    assignments: every token's first choice before any token's second (and so on), earlier tokens
    first within one choice (GShard's and Switch's priority: a token loses its first choice only
    when earlier first choices fill the expert); the others are dropped.

    Returns x_sorted (S, D) with x_sorted[s] = x[sort_idx[s] // K], sort_idx int64 (S,) the
    flat assignment index of each kept row, and group_sizes int32 (E,) summing to S.
    The range check on expert_idx is a device sync; `check_values=False` skips it (indices from
    a router's topk are in range by construction).
    """
    _check_tensor("x_TD", x_TD, 2, "(T, D)")
    _check_tensor("expert_idx_TK", expert_idx_TK, 2, "(T, K)")
    if expert_idx_TK.dtype not in _INDEX_DTYPES:
        raise ValueError(f"expert_idx_TK must be int32 or int64, got {expert_idx_TK.dtype}")
    if expert_idx_TK.shape[0] != x_TD.shape[0]:
        raise ValueError(f"expert_idx_TK has {expert_idx_TK.shape[0]} rows but x_TD has {x_TD.shape[0]}")
    n_experts = check_count("n_experts", n_experts, 1)
    capacity = None if capacity is None else check_count("capacity", capacity, 0)
    if check_values and checks.value_checks_on(expert_idx_TK) and expert_idx_TK.numel():
        lo, hi = expert_idx_TK.min().item(), expert_idx_TK.max().item()
        if lo < 0 or hi >= n_experts:
            raise ValueError(f"expert_idx_TK values must lie in [0, {n_experts}), got [{lo}, {hi}]")
    k = expert_idx_TK.shape[1]
    experts_S, sort_idx_S = torch.sort(expert_idx_TK.reshape(-1), stable=True)
    edges = torch.arange(n_experts + 1, device=experts_S.device, dtype=experts_S.dtype)
    starts_E1 = torch.searchsorted(experts_S, edges)  # group e is [starts[e], starts[e+1])
    group_sizes_E = starts_E1[1:] - starts_E1[:-1]
    if capacity is not None and experts_S.numel():
        # each assignment's rank in its expert by (choice, token), then the kept ones in token order
        flat_A = expert_idx_TK.reshape(-1).long()
        choice_A = torch.arange(flat_A.shape[0], device=flat_A.device) % k
        by_priority = torch.sort(flat_A * k + choice_A, stable=True).indices
        rank_A = torch.empty_like(by_priority)
        rank_A[by_priority] = torch.arange(flat_A.shape[0], device=flat_A.device) - starts_E1[flat_A[by_priority]]
        sort_idx_S = sort_idx_S[rank_A[sort_idx_S] < capacity]
        group_sizes_E = group_sizes_E.clamp(max=capacity)
    x_sorted_SD = x_TD.index_select(0, sort_idx_S // k) if k else x_TD[:0]
    return x_sorted_SD, sort_idx_S, group_sizes_E.to(torch.int32)


def unpermute(y_SD: Tensor, sort_idx_S: Tensor, weights_TK: Tensor, T: int | None = None,
              check_values: bool = True) -> Tensor:
    """Inverse of `permute`, weighted: out[t] = sum_k weights[t, k] * y[row of assignment t*K+k].

    y (S, D) rows in `permute` order; sort_idx int64 (S,) from `permute`; weights (T, K).
    Dropped assignments (absent from sort_idx) contribute zero. The K terms are added in k order
    (deterministic, no atomics), in the promoted dtype of y and weights; returns (T, D) in y's
    dtype. `T`, when given, must equal weights_TK.shape[0]. The check that sort_idx holds distinct
    assignments in [0, T*K) is a device sync; `check_values=False` skips it (indices from
    `permute` are by construction).
    """
    _check_tensor("y_SD", y_SD, 2, "(S, D)")
    _check_tensor("sort_idx_S", sort_idx_S, 1, "(S,)")
    _check_tensor("weights_TK", weights_TK, 2, "(T, K)")
    t, k = weights_TK.shape
    if T is not None and T != t:
        raise ValueError(f"T is {T} but weights_TK has {t} rows")
    if sort_idx_S.dtype not in _INDEX_DTYPES:
        raise ValueError(f"sort_idx_S must be int32 or int64, got {sort_idx_S.dtype}")
    if sort_idx_S.shape[0] != y_SD.shape[0] or y_SD.shape[0] > t * k:
        raise ValueError(f"y_SD has {y_SD.shape[0]} rows and sort_idx_S {sort_idx_S.shape[0]}; they must "
                         f"match and be at most T*K = {t * k}")
    if check_values and checks.value_checks_on(sort_idx_S) and sort_idx_S.numel():
        lo, hi = sort_idx_S.min().item(), sort_idx_S.max().item()
        if lo < 0 or hi >= t * k:
            raise ValueError(f"sort_idx_S values must lie in [0, T*K = {t * k}), got [{lo}, {hi}]")
        if torch.unique(sort_idx_S).numel() != sort_idx_S.numel():  # one row would overwrite another
            raise ValueError("sort_idx_S holds an assignment twice; each must appear at most once")
    d = y_SD.shape[1]
    y_TKD = y_SD.new_zeros((t * k, d)).index_copy(0, sort_idx_S.long(), y_SD).view(t, k, d)
    w_TK = weights_TK.to(torch.promote_types(y_SD.dtype, weights_TK.dtype))
    if y_SD.shape[0] < t * k:  # a dropped assignment's weight is left out, not multiplied by a zero row
        # (an inf or NaN weight would make it NaN)
        kept_TK = torch.zeros(t * k, dtype=torch.bool, device=w_TK.device).index_fill(0, sort_idx_S.long(), True)
        w_TK = w_TK.masked_fill(~kept_TK.view(t, k), 0)
    if k == 0:
        return y_SD.new_zeros((t, d))
    out_TD = y_TKD[:, 0] * w_TK[:, 0, None]
    for j in range(1, k):
        out_TD = out_TD + y_TKD[:, j] * w_TK[:, j, None]
    return out_TD.to(y_SD.dtype)


from generalist.ops import moe_triton  # noqa: F401,E402  (registers "triton" when triton imports)
