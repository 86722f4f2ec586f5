"""Decoding attention: a few new query tokens per sequence against a KV cache (inference only).

    out, lse = attention_decode(q, k_cache, v_cache, cache_lens, return_lse=True)

Shapes: B sequences, Lq new query tokens per sequence (1 when decoding token by token, a few
for speculative or chunked decoding), S cache capacity, H query heads, K = Hkv key/value heads
(H % K == 0: GQA / MQA), G = H // K, D head dim <= 256.
  q (B, Lq, H, D); k_cache, v_cache (B, S, K, D); cache_lens int32 (B,), 0 <= cache_lens <= S;
  out (B, Lq, H, D) in q's dtype; lse (B, H, Lq) fp32 (fp64 for fp64 inputs, reference only).

Semantics, those of the attention contract (DESIGN.md) for one sequence with Lq queries and
cache_lens[b] keys, causal and bottom-right aligned: the new tokens are already in the cache as
its last Lq valid positions, and query i sees key j when j <= cache_lens[b] - Lq + i. Positions
at or past cache_lens[b] are never read (they may hold anything). A query that sees no key
(cache_lens[b] == 0, or the first rows when cache_lens[b] < Lq) returns zeros and lse = -inf.
It equals flash_attn_varlen_func(causal=True) on the packed problem.

`generalist::attention_decode` is a registered op with a fake implementation (torch.compile,
opcheck) and NO autograd: it is for inference, and `attention_decode` raises a ValueError when
an input requires grad with grad mode on. Backends (`backend=`): "reference" (plain PyTorch in
fp32 / fp64, every device, always there), "cpu" (the C++ attention forward kernel of csrc/cpu/,
when the extension is built: CPU tensors in fp32 / bf16 / fp16), "triton" (split-K
flash-decoding kernels in generalist/kernels/triton/decode.py: CUDA tensors in fp16 / bf16 /
fp32; CPU tensors only under Triton's interpreter with GENERALIST_TRITON_ON_CPU=1, for tests),
"auto" (triton where it can serve, then cpu, else the reference). `num_splits` (0 = chosen by
the kernel; at most 64 are used) only tunes the triton backend.
"""

from __future__ import annotations

import operator

import torch
from torch import Tensor

from generalist.ops import _attention_checks as checks
from generalist.ops import attention_cpu
from generalist.ops._triton_device import OFFSET_LIMIT, device_unsupported, offsets_unsupported
from generalist.ops.attention_reference import exact
from generalist.ops._registry import Implementation, Registry

DECODE_BACKENDS = Registry("attention_decode", known=("reference", "cpu", "triton"))
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = 256


# --------------------------------------------------------------------------------------------
# Reference
# --------------------------------------------------------------------------------------------


def visible_mask(cache_lens: Tensor, q_len: int, capacity: int) -> Tensor:
    """(B, Lq, S) bool: query i of sequence b sees key j when j <= cache_lens[b] - Lq + i."""
    i = torch.arange(q_len, device=cache_lens.device)[None, :, None]
    j = torch.arange(capacity, device=cache_lens.device)[None, None, :]
    return j <= cache_lens.long()[:, None, None] - q_len + i


@exact
def _reference_forward(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_lens: Tensor, softmax_scale: float,
                       num_splits: int) -> tuple[Tensor, Tensor]:
    """Plain PyTorch in fp32 (fp64 for fp64 inputs) over the whole (B, K, G, Lq, S) score tensor."""
    b, lq, h, d = q.shape
    s, hkv = k_cache.shape[1], k_cache.shape[2]
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    mask_BQS = visible_mask(cache_lens, lq, s)
    valid_BS = torch.arange(s, device=q.device)[None, :] < cache_lens.long()[:, None]
    q_BQKGD = q.to(cdt).unflatten(2, (hkv, h // hkv))
    # stale cache entries may hold inf / nan: keep them out of the products, not only the softmax
    k_BSKD = torch.where(valid_BS[:, :, None, None], k_cache.to(cdt), 0.0)
    v_BSKD = torch.where(valid_BS[:, :, None, None], v_cache.to(cdt), 0.0)
    s_BKGQS = torch.einsum("bqkgd,bskd->bkgqs", q_BQKGD, k_BSKD) * softmax_scale
    s_BKGQS = s_BKGQS.masked_fill(~mask_BQS[:, None, None], float("-inf"))
    lse_BKGQ = torch.logsumexp(s_BKGQS, dim=-1)
    # rows with no visible key have lse = -inf; shifting them by 0 keeps exp(-inf) = 0, not NaN
    p_BKGQS = torch.exp(s_BKGQS - torch.where(torch.isneginf(lse_BKGQ), 0.0, lse_BKGQ)[..., None])
    o_BQKGD = torch.einsum("bkgqs,bskd->bqkgd", p_BKGQS, v_BSKD)
    return o_BQKGD.flatten(2, 3).to(q.dtype).contiguous(), lse_BKGQ.flatten(1, 2).contiguous()


DECODE_BACKENDS.register(Implementation(
    name="reference", priority=0, unsupported=lambda *inputs: None, functions={"forward": _reference_forward},
))


# --------------------------------------------------------------------------------------------
# C++ on CPU (registered when the compiled extension is built): csrc/cpu/attention.cpp serves
# the cache with the varlen forward kernel, reading only each sequence's valid positions
# --------------------------------------------------------------------------------------------


def _cpu_forward(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_lens: Tensor, softmax_scale: float,
                 num_splits: int) -> tuple[Tensor, Tensor]:
    return torch.ops.generalist._attention_decode_cpu(q, k_cache, v_cache, cache_lens, softmax_scale)


if attention_cpu.available() and hasattr(torch.ops.generalist, "_attention_decode_cpu"):
    DECODE_BACKENDS.register(Implementation(
        name="cpu", priority=10, unsupported=attention_cpu.unsupported, functions={"forward": _cpu_forward},
    ))


# --------------------------------------------------------------------------------------------
# Triton (registered when triton imports)
# --------------------------------------------------------------------------------------------

try:
    from generalist.kernels.triton import decode as _kernels
except ImportError:  # triton is not installed: the backend is not registered
    _kernels = None


def _triton_unsupported(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_lens: Tensor, softmax_scale: float,
                        num_splits: int) -> str | None:
    """None when the Triton kernels can serve these inputs, else the reason why not."""
    if q.dtype not in _kernels.DTYPES:
        return f"dtype {q.dtype} is not supported (float16, bfloat16, float32)"
    if q.shape[-1] > _kernels.MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} > {_kernels.MAX_HEAD_DIM}"
    # one sequence's cache (S, Hkv, D): the kernels widen only the sequence's start to 64 bits
    ks, vs = k_cache.stride(), v_cache.stride()
    if k_cache.shape[1] * (abs(ks[1]) + abs(vs[1])) + k_cache.shape[2] * (abs(ks[2]) + abs(vs[2])) >= OFFSET_LIMIT:
        reason = offsets_unsupported(("k_cache", k_cache.shape[1:], ks[1:]), ("v_cache", v_cache.shape[1:], vs[1:]))
        if reason:
            return reason
    return device_unsupported(q, _kernels.interpreting())


if _kernels is not None:
    DECODE_BACKENDS.register(Implementation(
        name="triton", priority=20, unsupported=_triton_unsupported, functions={"forward": _kernels.decode_forward},
    ))


# --------------------------------------------------------------------------------------------
# The op
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("generalist::attention_decode", mutates_args=())
def attention_decode_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_lens: Tensor, softmax_scale: float,
                        num_splits: int, backend: str) -> tuple[Tensor, Tensor]:
    """(out (B, Lq, H, D), lse (B, H, Lq)); inputs must be validated (see `attention_decode`)."""
    args = (q, k_cache, v_cache, cache_lens, softmax_scale, num_splits)
    return DECODE_BACKENDS.resolve(backend, *args).functions["forward"](*args)


@attention_decode_op.register_fake
def _(q, k_cache, v_cache, cache_lens, softmax_scale, num_splits, backend):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty(q.shape), q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=lse_dtype)


def _check_inputs(q, k_cache, v_cache, cache_lens, num_splits, values: bool = True) -> int:
    """Every error a caller can cause, as a ValueError naming the argument; returns num_splits.
    `values`: also check the values of cache_lens (a device sync)."""
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("cache_lens", cache_lens)):
        if not isinstance(x, torch.Tensor) and not (name == "cache_lens" and x is None and not values):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    for name, x, layout in (("q", q, "(B, Lq, H, D)"), ("k_cache", k_cache, "(B, S, Hkv, D)"),
                            ("v_cache", v_cache, "(B, S, Hkv, D)")):
        if x.dim() != 4:
            raise ValueError(f"{name} must have shape {layout} (4 dims), got {tuple(x.shape)}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"q has unsupported dtype {q.dtype}; supported: float16, bfloat16, float32 "
                         f"(float64 on the reference backend)")
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache), ("cache_lens", cache_lens)):
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}; all inputs must be on one device")
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
        if x.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {x.dtype} but q has {q.dtype}; q, k_cache and v_cache must share one")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} and "
                         f"{tuple(v_cache.shape)}")
    b, _, h, d = q.shape
    if k_cache.shape[0] != b:
        raise ValueError(f"k_cache holds {k_cache.shape[0]} sequences but q has {b}")
    if k_cache.shape[3] != d:
        raise ValueError(f"k_cache head dim {k_cache.shape[3]} differs from q head dim {d}")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"q head dim must be between 1 and {MAX_HEAD_DIM}, got {d}")
    hkv = k_cache.shape[2]
    if hkv == 0 or h % hkv != 0:
        raise ValueError(f"q's number of heads ({h}) must be a multiple of k_cache's ({hkv}) for GQA/MQA")
    if cache_lens.dtype != torch.int32:
        raise ValueError(f"cache_lens must be int32, got {cache_lens.dtype}")
    if cache_lens.shape != (b,):
        raise ValueError(f"cache_lens must have shape ({b},), one length per sequence, got {tuple(cache_lens.shape)}")
    try:
        num_splits = operator.index(num_splits)
    except TypeError:
        raise ValueError(f"num_splits must be an int, got {type(num_splits).__name__}") from None
    if num_splits < 0:
        raise ValueError(f"num_splits must be >= 0 (0 lets the kernel choose), got {num_splits}")
    if torch.is_grad_enabled():
        for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
            if x.requires_grad:
                raise ValueError(f"{name} requires grad, but attention_decode is inference-only (no backward); "
                                 f"call it under torch.no_grad() or use flash_attn_varlen_func to train")
    if values and checks.value_checks_on(cache_lens) and b:
        lo, hi = int(cache_lens.min()), int(cache_lens.max())  # a device sync; set_value_checks(False) skips it
        if lo < 0 or hi > k_cache.shape[1]:
            raise ValueError(f"cache_lens must lie in [0, {k_cache.shape[1]}] (the cache capacity S), "
                             f"got values from {lo} to {hi}")
    return num_splits


def attention_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_lens: Tensor | None,
                     softmax_scale: float | None = None, *, num_splits: int = 0, return_lse: bool = False,
                     backend: str = "auto"):
    """Causal attention of the last Lq tokens of each sequence to its KV cache (inference only).

    q (B, Lq, H, D); k_cache, v_cache (B, S, Hkv, D) with H % Hkv == 0; cache_lens int32 (B,), the
    number of valid cache positions of each sequence, the Lq new tokens included (None: every
    sequence fills the whole cache, which needs no check of the values). Returns out
    (B, Lq, H, D) in q's dtype, and lse (B, H, Lq) fp32 too when `return_lse`. See the module
    docstring for the mask and the backends.
    """
    DECODE_BACKENDS.check_name(backend)
    full = cache_lens is None
    if full and isinstance(k_cache, torch.Tensor) and isinstance(q, torch.Tensor) and k_cache.dim() == 4:
        cache_lens = torch.full((k_cache.shape[0],), k_cache.shape[1], dtype=torch.int32, device=q.device)
    num_splits = _check_inputs(q, k_cache, v_cache, cache_lens, num_splits, values=not full)
    scale = checks.check_scale(softmax_scale, q.shape[-1])
    # a strided cache_lens (a column of a larger table) is valid; the kernels read a contiguous one
    out, lse = DECODE_BACKENDS.call(attention_decode_op, "forward", backend, q, k_cache, v_cache,
                                    cache_lens.contiguous(), scale, num_splits)
    return (out, lse) if return_lse else out
