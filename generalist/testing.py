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
        p_ = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
        outs.append((p_ @ vs).transpose(0, 1))
        lses.append(lse)
        sq, sk = sq + lq, sk + lk
    out = torch.cat(outs) if outs else q.new_zeros(q.shape, dtype=dtype)
    lse = torch.cat(lses, dim=1) if lses else q.new_zeros((h, 0), dtype=dtype)
    return out, lse
