"""Attention layers over packed varlen streams: self-attention (bidirectional or causal, with
rotary positions) and cross-attention (decoder queries to the same example's encoder tokens).

Shapes: T packed tokens, B sequences, H query heads, K key/value heads, D head dim, M model dim.
All attention goes through generalist.ops (never a kernel directly). Rotary embeddings use each
token's position inside its own sequence, so packing never leaks positions across examples.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from generalist.ops import flash_attn_func, flash_attn_varlen_func
from generalist.ops.attention_decode import DECODE_BACKENDS, attention_decode


def rotary_angles(pos_T: Tensor, d: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """(cos, sin) (T, 1, D // 2) fp32 of the angles pos * base^(-2i/D): compute once, rotate q and k."""
    half = d // 2
    inv_freq = base ** (-torch.arange(half, device=pos_T.device, dtype=torch.float32) / half)
    ang_TF = pos_T.float()[:, None] * inv_freq[None, :]
    return ang_TF.cos()[:, None, :], ang_TF.sin()[:, None, :]


def rotary(x_THD: Tensor, pos_T: Tensor, base: float = 10000.0, angles: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Rotate pairs (first half, second half) of each head by angle pos * base^(-2i/D);
    `angles`: rotary_angles(pos_T, D, base), when already computed."""
    d = x_THD.shape[-1]
    half = d // 2
    if half == 0:
        return x_THD
    cos, sin = angles if angles is not None else rotary_angles(pos_T, d, base)
    x1, x2 = x_THD[..., :half].float(), x_THD[..., half:2 * half].float()
    out = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos, x_THD[..., 2 * half:].float()], dim=-1)
    return out.to(x_THD.dtype)


class SelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, causal: bool, backend: str = "auto"):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.h, self.hkv, self.d = n_heads, n_kv_heads, d_model // n_heads
        self.causal, self.backend = causal, backend
        self.wq = nn.Linear(d_model, n_heads * self.d, bias=False)
        self.wkv = nn.Linear(d_model, 2 * n_kv_heads * self.d, bias=False)
        self.wo = nn.Linear(n_heads * self.d, d_model, bias=False)

    def project(self, x_TM: Tensor, pos_T: Tensor, angles: tuple[Tensor, Tensor] | None = None
                ) -> tuple[Tensor, Tensor, Tensor]:
        """q, k (rotated) and v of the tokens; `angles`: rotary_angles(pos_T, D), if already made."""
        if angles is None:
            angles = rotary_angles(pos_T, self.d)
        q_THD = self.wq(x_TM).unflatten(-1, (self.h, self.d))
        k_TKD, v_TKD = self.wkv(x_TM).unflatten(-1, (2, self.hkv, self.d)).unbind(1)
        # q's and k's heads rotated in one pass (half the small kernels of one pass each); q and k
        # are views of the result, which the attention ops take as they are (unit stride inside a head)
        q_THD, k_TKD = rotary(torch.cat([q_THD, k_TKD], dim=1), pos_T, angles=angles).split([self.h, self.hkv], 1)
        return q_THD, k_TKD, v_TKD

    def forward(self, x_TM: Tensor, pos_T: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                angles: tuple[Tensor, Tensor] | None = None) -> Tensor:
        q, k, v = self.project(x_TM, pos_T, angles)
        out = flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                     causal=self.causal, backend=self.backend)
        return self.wo(out.flatten(1))

    def step(self, x_BM: Tensor, pos_B: Tensor, cache: dict) -> Tensor:
        """One decoding step for B sequences moving in lockstep: writes this token's k/v into the
        cache and attends to everything cached so far.

        Inference: the cache holds buffers cache["k"], cache["v"] (B, capacity, K, D) whose first
        cache["len"] positions are filled; set cache["capacity"] before the first step to size them
        (else they start at 64 positions; they double when full), so a step copies no cache, and
        the keys are read through views of the filled part by the split-K decoding op
        (attention_decode: "auto" is the Triton kernel on CUDA, the C++ kernel on CPU when the
        extension is built, else the reference; the layer's
        backend when the op knows that name). With grad enabled (the decoding op has no
        backward) the cache is instead the concatenation of every step's k/v, so gradients
        reach all of them, and flash_attn_func attends."""
        q, k, v = self.project(x_BM, pos_B)
        n = cache.get("len", 0)
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            for name, new in (("k", k), ("v", v)):
                cache[name] = new[:, None] if not n else torch.cat([cache[name][:, :n], new[:, None]], 1)
            cache["len"] = n + 1
            out = flash_attn_func(q[:, None], cache["k"], cache["v"], causal=True, backend=self.backend)
            return self.wo(out.flatten(1))
        with torch.no_grad():
            if not n or n == cache["k"].shape[1]:  # first step, or full: (re)allocate
                cap = max(cache.get("capacity", 64), 2 * n, 1)
                for name, new in (("k", k), ("v", v)):
                    buf = new.new_empty((new.shape[0], cap) + tuple(new.shape[1:]))
                    if n:
                        buf[:, :n] = cache[name][:, :n]
                    cache[name] = buf
            cache["k"][:, n] = k
            cache["v"][:, n] = v
        cache["len"] = n + 1
        backend = self.backend if self.backend in DECODE_BACKENDS.known else "auto"
        out = attention_decode(q[:, None], cache["k"][:, :n + 1], cache["v"][:, :n + 1], None,
                               backend=backend)  # no host sync
        return self.wo(out.flatten(1))


def reorder_cache(cache: dict, rows: Tensor) -> None:
    """Make row i of a SelfAttention.step cache a copy of row rows[i] (beam search), in place and
    over the filled positions only."""
    n = cache.get("len", 0)
    for name in ("k", "v"):
        if cache.get(name) is not None and n:
            cache[name][:, :n] = cache[name][rows, :n]


class CrossAttention(nn.Module):
    """Queries from the decoder stream, keys/values from the encoder stream of the same example."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, backend: str = "auto"):
        super().__init__()
        self.h, self.hkv, self.d = n_heads, n_kv_heads, d_model // n_heads
        self.backend = backend
        self.wq = nn.Linear(d_model, n_heads * self.d, bias=False)
        self.wkv = nn.Linear(d_model, 2 * n_kv_heads * self.d, bias=False)
        self.wo = nn.Linear(n_heads * self.d, d_model, bias=False)

    def memory(self, enc_SM: Tensor) -> tuple[Tensor, Tensor]:
        """Encoder keys and values (S, K, D), computed once per batch (and cached when decoding)."""
        k, v = self.wkv(enc_SM).unflatten(-1, (2, self.hkv, self.d)).unbind(1)
        return k, v

    def forward(self, x_TM: Tensor, memory: tuple[Tensor, Tensor], cu_q: Tensor, cu_k: Tensor,
                max_q: int, max_k: int) -> Tensor:
        q = self.wq(x_TM).unflatten(-1, (self.h, self.d))
        out = flash_attn_varlen_func(q, memory[0], memory[1], cu_q, cu_k, max_q, max_k, backend=self.backend)
        return self.wo(out.flatten(1))
