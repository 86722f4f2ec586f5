"""Helpers shared by the test suite and `generalist check`: random varlen batches and a naive
float64 attention written independently of generalist.ops (a loop over sequences, and each
mask row stated as "the first n_i keys are visible").

Shapes: T packed tokens, H query heads, Hkv key/value heads, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def cu_seqlens(lens: list[int], device="cpu") -> Tensor:
    """[3, 0, 5] -> int32 tensor [0, 3, 3, 8]."""
    out = [0]
    for n in lens:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32, device=device)


@dataclass
class VarlenCase:
    q: Tensor  # (Tq, H, D)
    k: Tensor  # (Tk, Hkv, D)
    v: Tensor  # (Tk, Hkv, D)
    cu_q: Tensor
    cu_k: Tensor
    lens_q: list[int]
    lens_k: list[int]
    prefix_lens: Tensor | None


def random_varlen(lens_q, lens_k, h, hkv, d, dtype=torch.float32, prefix=None, device="cpu",
                  generator: torch.Generator | None = None, requires_grad=False) -> VarlenCase:
    """Random q/k/v for sequences of the given lengths. `prefix` is None, a list of prefix
    lengths, or one of "zero", "mid", "full" (0, half of, or all of each key length)."""
    g = generator
    make = lambda t, heads: torch.randn(t, heads, d, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)
    q, k, v = make(sum(lens_q), h), make(sum(lens_k), hkv), make(sum(lens_k), hkv)
    if requires_grad:
        q, k, v = (x.requires_grad_() for x in (q, k, v))
    if isinstance(prefix, str):
        prefix = {"zero": [0] * len(lens_k), "mid": [n // 2 for n in lens_k], "full": list(lens_k)}[prefix]
    prefix_t = None if prefix is None else torch.tensor(prefix, dtype=torch.int32, device=device)
    return VarlenCase(q, k, v, cu_seqlens(lens_q, device), cu_seqlens(lens_k, device), list(lens_q),
                      list(lens_k), prefix_t)


def visible_keys(lq: int, lk: int, causal: bool, prefix: int | None) -> list[int]:
    """For each of lq queries, how many keys (always a leading run) it may see."""
    if not causal:
        return [lk] * lq
    p = 0 if prefix is None else prefix
    return [min(lk, max(p, i + lk - lq + 1, 0)) for i in range(lq)]


def naive_attention(q: Tensor, k: Tensor, v: Tensor, lens_q, lens_k, scale: float | None = None,
                    causal: bool = False, prefix_lens=None, dtype=torch.float64):
    """Attention sequence by sequence in `dtype`; returns (out (Tq, H, D), lse (H, Tq)) in `dtype`.

    Differentiable (used as the float64 gradient reference)."""
    h, hkv, d = q.shape[1], k.shape[1], q.shape[2]
    scale = d ** -0.5 if scale is None else scale
    prefix = [None] * len(lens_q) if prefix_lens is None else [int(p) for p in prefix_lens]
    outs, lses = [], []
    sq = sk = 0
    for lq, lk, p in zip(lens_q, lens_k, prefix):
        qs = q[sq:sq + lq].to(dtype).transpose(0, 1)  # (H, lq, D)
        ks = k[sk:sk + lk].to(dtype).repeat_interleave(h // hkv, dim=1).transpose(0, 1)
        vs = v[sk:sk + lk].to(dtype).repeat_interleave(h // hkv, dim=1).transpose(0, 1)
        n = torch.tensor(visible_keys(lq, lk, causal, p), device=q.device)
        mask = torch.arange(lk, device=q.device)[None, :] < n[:, None]  # (lq, lk)
        s = (qs @ ks.transpose(1, 2)) * scale
        s = s.masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(s, dim=-1)  # (H, lq)
        p_ = torch.exp(s - torch.where(torch.isneginf(lse), 0.0, lse)[..., None])  # a row of no key: 0
        outs.append((p_ @ vs).transpose(0, 1))
        lses.append(lse)
        sq, sk = sq + lq, sk + lk
    out = torch.cat(outs) if outs else q.new_zeros(q.shape, dtype=dtype)
    lse = torch.cat(lses, dim=1) if lses else q.new_zeros((h, 0), dtype=dtype)
    return out, lse


# ---- checks shared by the backend test files -------------------------------------------------

# atol of the tolerance rule: error(kernel vs float64) <= 2 x error(PyTorch at the dtype) + atol
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def run_varlen(case: VarlenCase, causal: bool, backend: str, **kw):
    """flash_attn_varlen_func on a random_varlen case."""
    from generalist.ops import flash_attn_varlen_func

    return flash_attn_varlen_func(case.q, case.k, case.v, case.cu_q, case.cu_k, max(case.lens_q, default=0),
                                  max(case.lens_k, default=0), causal=causal, prefix_lens=case.prefix_lens,
                                  backend=backend, **kw)


# (where, causal): a NaN in q, k or v, or an inf in k, for check_non_finite
NON_FINITE = [("q", False), ("k", True), ("v", False), ("k_inf", False)]


def check_non_finite(where: str, causal: bool, backend: str, generator: torch.Generator,
                     dtype=torch.float32, device="cpu") -> None:
    """A NaN in q, k or v (or an inf in k) gives NaN wherever the float64 reference does, never
    a row of zeros or a finite row that left the key out; rows that do not see it are those of
    the clean run. Key 70 lies in the second 64-key tile; causal rows before it do not see it."""
    case = random_varlen([90, 5], [90, 5], 2, 1, 24, dtype=dtype, device=device, generator=generator)
    clean = run_varlen(case, causal, backend)
    x = {"q": case.q, "k": case.k, "v": case.v, "k_inf": case.k}[where]
    x[70, 0, 3] = float("inf") if where == "k_inf" else float("nan")  # (a query row of head 0, or key 70)
    out, lse = run_varlen(case, causal, backend, return_lse=True)
    want, want_lse = naive_attention(case.q, case.k, case.v, [90, 5], [90, 5], causal=causal)
    same, _ = naive_attention(case.q, case.k, case.v, [90, 5], [90, 5], causal=causal, dtype=dtype)
    nan = torch.isnan(want)  # (T, H, D)
    assert nan.any() and not nan.all()
    assert torch.equal(torch.isnan(out), nan), f"{backend}: NaN where the reference has none, or none where it has"
    assert torch.equal(torch.isfinite(lse), torch.isfinite(want_lse)), f"{backend}: lse finite elsewhere"
    err, baseline = max_err(out[~nan], want[~nan]), max_err(same[~nan], want[~nan])
    assert err <= 2 * baseline + ATOL[dtype], f"{backend}: error {err} vs same-dtype PyTorch {baseline}"
    if where != "k_inf":
        rows = ~nan.any(-1)
        assert torch.equal(out[rows], clean[rows]), f"{backend}: rows that do not see the NaN changed"


def max_err(a: Tensor, b: Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def check_output(out: Tensor, lse: Tensor, want: Tensor, want_lse: Tensor, same_dtype: Tensor,
                 lse_shape: tuple[int, ...], seed: int) -> None:
    """Asserts a kernel's out / lse against the float64 reference (want, want_lse) by the tolerance
    rule above, `same_dtype` being PyTorch's result at out's dtype; lse fp32 of `lse_shape`, to
    1e-4, and -inf exactly where the reference has it (a row that sees no key)."""
    dtype = same_dtype.dtype
    assert out.dtype == dtype and out.shape == want.shape
    assert lse.dtype == torch.float32 and lse.shape == lse_shape
    assert torch.isfinite(out).all()
    err, baseline = max_err(out, want), max_err(same_dtype, want)
    assert err <= 2 * baseline + ATOL[dtype], f"out: error {err} vs same-dtype PyTorch {baseline} (seed {seed})"
    finite = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse), finite), f"lse finiteness (seed {seed})"
    assert torch.isneginf(lse[~finite]).all()
    torch.testing.assert_close(lse[finite].double(), want_lse[finite], atol=1e-4, rtol=1e-4,
                               msg=lambda m: f"lse: {m} (seed {seed})")


def check_forward(case: VarlenCase, causal: bool, dtype: torch.dtype, seed: int, backend: str) -> None:
    """Asserts out and lse of `backend` against float64 (check_output)."""
    out, lse = run_varlen(case, causal, backend, return_lse=True)
    args = (case.q, case.k, case.v, case.lens_q, case.lens_k)
    want, want_lse = naive_attention(*args, causal=causal, prefix_lens=case.prefix_lens)
    same_dtype, _ = naive_attention(*args, causal=causal, prefix_lens=case.prefix_lens, dtype=dtype)
    assert same_dtype.dtype == dtype
    check_output(out, lse, want, want_lse, same_dtype, (case.q.shape[1], case.q.shape[0]), seed)


def attention_grads(case: VarlenCase, dout: Tensor, dlse: Tensor, fn) -> tuple[Tensor, ...]:
    """(dq, dk, dv) of sum(out * dout) + sum(lse * dlse) over the rows with a finite lse, where
    fn() -> (out, lse)."""
    out, lse = fn()
    finite = torch.isfinite(lse.detach())
    loss = (out * dout.to(out.dtype)).sum().double() + (lse[finite] * dlse[finite].to(lse.dtype)).sum().double()
    return torch.autograd.grad(loss, (case.q, case.k, case.v))
