"""Decoding attention against a KV cache, in Triton: split-K ("flash-decoding"), forward only.

Layout (that of generalist.ops.attention_decode): q, out (B, Lq, H, D); k_cache, v_cache
(B, S, Hkv, D), last dim contiguous, other strides free; cache_lens int32 (B,), contiguous; lse
(B, H, Lq) fp32. Sequence b holds cache_lens[b] <= S valid keys; its Lq queries are the last Lq
of those positions, so query i sees key j when j <= cache_lens[b] - Lq + i (causal, bottom-right
aligned; j < cache_lens[b] follows). Nothing past cache_lens[b] is read. A row that sees no key
(cache_lens[b] == 0, or the first rows when cache_lens[b] < Lq) gives zeros and lse = -inf.
Query head h reads key/value head h // (H // Hkv).

Kernels (one launch each; the second only when the keys are split):
  _decode_split_kernel   grid (B * Hkv * row blocks * splits,): one (sequence, kv head, block of
                         query rows, key split). The rows are the (query head of the GQA group,
                         query token) pairs that read this kv head, so K and V are loaded once
                         for the whole group; q is viewed as (B * Hkv, G * Lq, D) rows (a view
                         when Lq == 1, a small copy otherwise) so the row loads stay affine.
                         Each sequence's keys are cut into `num_splits` runs of whole key
                         blocks; the program runs an online softmax in fp32 over its run and
                         writes the normalized partial output and its lse. With one split it
                         writes the final out (in q's dtype) and lse directly.
  _decode_reduce_kernel  grid (B * Lq * H,): merges the splits of one row with the log-sum-exp
                         trick: lse = log(sum_s exp(lse_s)), out = sum_s exp(lse_s - lse) out_s.
Key blocks every row of the program sees run without a mask; only the last blocks (the causal
diagonal of the Lq new tokens and the cache end) pay for one. Empty splits write lse = -inf.

Scores are kept in base 2 (scaled by softmax_scale * log2(e)) so that exp2 can be used; lse is
stored in natural log. fp32 inputs use exact fp32 products ("ieee"), not tf32.

No backward: this is for inference. The launcher checks layout and dtype only; generalist.ops
validates values. Block sizes come from a small fixed table (no autotuning); under
TRITON_INTERPRET=1 (CPU tests) the key blocks are small. Importing this needs triton, no GPU.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from generalist.kernels.triton.common import cdiv, next_power_of_2

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # log2(e)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)  # ln(2)
MAX_HEAD_DIM = 256
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_SPLITS = 64


@triton.jit
def _decode_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_d, lo, hi, cache_len, limit,
                  qk_scale, MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                  DOT_PRECISION: tl.constexpr):
    d_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if MASKED:
            kv_ok = (offs_n[:, None] < cache_len) & d_ok[None, :]
        else:
            kv_ok = d_ok[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_ok, other=0.0)
        # scores in base 2; keys a row may not see are -inf
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            s = tl.where(offs_n[None, :] < limit[:, None], s, float("-inf"))
        # online softmax; a row with nothing visible yet keeps m = -inf and shifts by 0
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_ok, other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _decode_split_kernel(
    Q, K, V, OUT, LSE, CACHE_LENS,
    softmax_scale, q_len, hkv, rows, num_row_blocks, num_splits,
    stride_qg, stride_qr, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
    stride_og, stride_or, stride_os, stride_lg, stride_lr, stride_ls,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # program -> (sequence b and kv head: group bk, row block, split); a group's splits are adjacent
    pid = tl.program_id(0)
    split = pid % num_splits
    rest = pid // num_splits
    rb = rest % num_row_blocks
    bk = rest // num_row_blocks
    b = bk // hkv
    kvh = bk - b * hkv
    cache_len = tl.load(CACHE_LENS + b)

    # this split's keys: a run of whole key blocks, [lo, hi)
    blocks_per_split = tl.cdiv(tl.cdiv(cache_len, BLOCK_N), num_splits)
    lo = split * blocks_per_split * BLOCK_N
    hi = tl.minimum(lo + blocks_per_split * BLOCK_N, cache_len)

    # rows r = g * Lq + i (query head g of the group, query token i), laid out with one stride so
    # the loads stay affine; row r sees keys j < limit_r
    offs_r = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_r < rows
    limit = cache_len - q_len + 1 + offs_r % q_len
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    bk64 = bk.to(tl.int64)
    q = tl.load(Q + bk64 * stride_qg + offs_r[:, None] * stride_qr + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + kvh * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + kvh * stride_vh
    qk_scale = softmax_scale * LOG2E

    # key blocks every row sees entirely (before the first row's limit), then the masked ones
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full = tl.minimum(tl.maximum(cache_len - q_len + 1, lo), tl.maximum(hi, lo))
    full = lo + ((full - lo) // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _decode_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_d, lo, full,
                                  cache_len, limit, qk_scale, False, HEAD_DIM, BLOCK_N, DOT_PRECISION)
    acc, l_i, m_i = _decode_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_d, full, hi,
                                  cache_len, limit, qk_scale, True, HEAD_DIM, BLOCK_N, DOT_PRECISION)

    # normalize; rows that saw nothing (or an empty split) give zeros and lse = -inf
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    tl.store(OUT + bk64 * stride_og + split * stride_os + offs_r[:, None] * stride_or + offs_d[None, :],
             out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + bk64 * stride_lg + split * stride_ls + offs_r * stride_lr, lse, mask=row_ok)


@triton.jit
def _decode_reduce_kernel(
    OUT_PART, LSE_PART, OUT, LSE, q_len, heads, num_splits,
    stride_pr, stride_ps, stride_lpr, stride_ob, stride_ot, stride_oh, stride_lb, stride_lh, stride_lt,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    # program -> one row of the partials, ordered (sequence, head, query token) like lse
    row = tl.program_id(0).to(tl.int64)
    i = row % q_len
    h = (row // q_len) % heads
    b = row // (q_len * heads)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < num_splits
    lse_s = tl.load(LSE_PART + row * stride_lpr + offs_s, mask=s_ok, other=float("-inf"))

    # weights exp(lse_s - max); a row that no split saw keeps zeros and lse = -inf
    m = tl.max(lse_s, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse_s - m_safe)
    total = tl.sum(w, 0)
    total_safe = tl.where(total == 0.0, 1.0, total)
    parts = tl.load(OUT_PART + row * stride_pr + offs_s[:, None] * stride_ps + offs_d[None, :],
                    mask=s_ok[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    out = tl.sum(parts * w[:, None], 0) / total_safe
    lse = tl.where(total == 0.0, float("-inf"), m_safe + tl.log(total_safe))
    tl.store(OUT + b * stride_ob + i * stride_ot + h * stride_oh + offs_d, out.to(OUT.dtype.element_ty),
             mask=offs_d < HEAD_DIM)
    tl.store(LSE + b * stride_lb + h * stride_lh + i * stride_lt, lse)


# --------------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------------

# By operand width in bytes and BLOCK_D (64 stands for 16..64): (largest BLOCK_M, BLOCK_N,
# num_warps, num_stages) entries, the first whose BLOCK_M fits is used. BLOCK_M (query rows) is
# the GQA group times Lq rounded up to a power of two, at most the table's largest (more rows
# take more programs). Decoding is bound by reading the cache, so tiles stay small and every
# program gets 8 warps: the loop-invariant q tile and the fp32 accumulator then fit in registers.
# Every entry compiles without register spills with Triton 3.6 for sm_80 and sm_90, for full and
# masked head dims, and on sm_90 also as launched on aligned tensors (the slow compile test; on
# sm_80 the bf16 16-row entry at head dim 128 spills 8 bytes there, and keeps the 3 stages it
# was measured with on Hopper); fp32 runs exact fp32 products on the CUDA cores,
# which hold whole operand rows in registers, hence its smaller tiles.
_CONFIGS = {
    (2, 64): [(64, 64, 8, 3)],
    (2, 128): [(16, 64, 8, 3), (64, 32, 8, 3)],
    (2, 256): [(16, 32, 8, 2), (32, 16, 8, 2)],
    (4, 64): [(64, 32, 8, 2)],
    (4, 128): [(16, 32, 8, 2)],
    (4, 256): [(16, 16, 8, 2)],
}
# Under the interpreter: small key blocks, so test sequences span several blocks and splits.
_INTERPRET_BLOCK_N = 32


def config_for(elem: int, block_d: int, rows: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for an operand width in bytes, BLOCK_D and the
    number of query rows per (sequence, kv head)."""
    table = _CONFIGS[(elem, max(64, block_d))]
    block_m = min(max(16, next_power_of_2(rows)), table[-1][0])
    for max_m, block_n, warps, stages in table:
        if block_m <= max_m:
            return block_m, block_n, warps, stages
    raise AssertionError("unreachable: the last entry takes the largest BLOCK_M")


def interpreting() -> bool:
    """True when the kernels run in Triton's interpreter (TRITON_INTERPRET=1 when this module was
    imported); only then can they take CPU tensors."""
    return not isinstance(_decode_split_kernel, triton.runtime.JITFunction)


@functools.lru_cache(maxsize=None)
def _sm_count(device: int) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_num_splits(programs: int, max_len: int, block_n: int, device: torch.device) -> int:
    """How many key splits fill the machine: none when the (sequence, kv head, row block)
    programs already give every other SM one (on an H200, 128 programs ran 1.2x faster unsplit
    than in 3 splits), else enough for about two programs per SM, with at least four key blocks
    per split (under the interpreter: at most 4 splits)."""
    if max_len <= 0:
        return 1
    if device.type != "cuda":
        return max(1, min(4, cdiv(max_len, 4 * block_n)))
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    if 2 * programs >= sms:
        return 1
    splits = min(cdiv(2 * sms, max(programs, 1)), cdiv(max_len, 4 * block_n), MAX_SPLITS)
    return max(1, splits)


def split_count(requested: int, programs: int, max_len: int, block_n: int, device: torch.device) -> int:
    """The key splits a launch uses: `requested`, or default_num_splits's when it is 0; never
    more than the key blocks (waste) nor than MAX_SPLITS (the reduce kernel holds all of a row's
    partial results in one tile, which past that grows beyond what Triton compiles well, and past
    2^20 elements not at all)."""
    n = requested if requested > 0 else default_num_splits(programs, max_len, block_n, device)
    return max(1, min(n, cdiv(max_len, block_n), MAX_SPLITS))


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x with a contiguous last dim (other strides are passed to the kernels)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _check(q, k_cache, v_cache, cache_lens):
    if q.dtype not in DTYPES:
        raise ValueError(f"triton decode attention: q dtype {q.dtype} not supported; use one of {DTYPES}")
    if q.dim() != 4 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.shape[-1] != q.shape[-1] \
            or k_cache.shape[0] != q.shape[0]:
        raise ValueError(f"triton decode attention: expected q (B, Lq, H, D) and k_cache, v_cache (B, S, Hkv, D); "
                         f"got q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"triton decode attention: q, k_cache, v_cache must share a dtype; got {q.dtype}, "
                         f"{k_cache.dtype}, {v_cache.dtype}")
    if not 1 <= q.shape[-1] <= MAX_HEAD_DIM:
        raise ValueError(f"triton decode attention: head dim must be in 1..{MAX_HEAD_DIM}, got {q.shape[-1]}")
    if q.shape[2] % k_cache.shape[2] != 0:
        raise ValueError(f"triton decode attention: {q.shape[2]} query heads are not a multiple of "
                         f"{k_cache.shape[2]} kv heads")
    if cache_lens.dtype != torch.int32 or cache_lens.shape != (q.shape[0],) or not cache_lens.is_contiguous():
        raise ValueError(f"triton decode attention: cache_lens must be a contiguous int32 tensor of shape "
                         f"({q.shape[0]},), got {cache_lens.dtype} {tuple(cache_lens.shape)}")


def _on_device(x: torch.Tensor):
    """Triton launches on the current CUDA device: make it x's."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def decode_forward(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_lens: torch.Tensor,
                   softmax_scale: float, num_splits: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, Lq, H, D), k_cache/v_cache (B, S, Hkv, D), cache_lens int32 (B,) -> out (B, Lq, H, D) in q's
    dtype, lse (B, H, Lq) fp32. num_splits 0 picks the number of key splits (split_count)."""
    _check(q, k_cache, v_cache, cache_lens)
    q, k_cache, v_cache = _rows(q), _rows(k_cache), _rows(v_cache)
    b, lq, h, d = q.shape
    s, hkv = k_cache.shape[1], k_cache.shape[2]
    group = h // hkv
    out = torch.empty((b, lq, h, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, lq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    if s == 0:  # no cache anywhere: every row sees nothing
        return out.zero_(), lse.fill_(float("-inf"))

    block_d = max(16, next_power_of_2(d))
    block_m, block_n, warps, stages = config_for(q.element_size(), block_d, group * lq)
    interp = interpreting()
    if interp:
        block_n = _INTERPRET_BLOCK_N
    row_blocks = cdiv(group * lq, block_m)
    num_splits = split_count(int(num_splits), b * hkv * row_blocks, s, block_n, q.device)
    launch = {} if interp else {"num_warps": warps, "num_stages": stages}
    constexprs = dict(HEAD_DIM=d, BLOCK_D=block_d, DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                      BLOCK_M=block_m, BLOCK_N=block_n)

    # rows of one (sequence, kv head) ordered (query head of the group, query token), one stride
    # apart: free when Lq == 1, a small copy of q otherwise
    q_rows = _rows(q.unflatten(2, (hkv, group)).permute(0, 2, 3, 1, 4).reshape(b * hkv, group * lq, d))
    with _on_device(q):
        if num_splits == 1:  # one split: straight into out (through a row-ordered copy when Lq > 1) and lse
            part_o = out.view(b * hkv, group, d) if lq == 1 else torch.empty_like(q_rows)
            part_l = lse.view(b * hkv, group * lq)
            o_strides = (part_o.stride(0), part_o.stride(1), 0)
            l_strides = (part_l.stride(0), part_l.stride(1), 0)
        else:  # partials in fp32: (group, row, split)
            part_o = torch.empty((b * hkv, group * lq, num_splits, d), dtype=torch.float32, device=q.device)
            part_l = torch.empty((b * hkv, group * lq, num_splits), dtype=torch.float32, device=q.device)
            o_strides = (part_o.stride(0), part_o.stride(1), part_o.stride(2))
            l_strides = part_l.stride()
        _decode_split_kernel[(b * hkv * row_blocks * num_splits,)](
            q_rows, k_cache, v_cache, part_o, part_l, cache_lens,
            float(softmax_scale), lq, hkv, group * lq, row_blocks, num_splits,
            q_rows.stride(0), q_rows.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), *o_strides, *l_strides,
            **constexprs, **launch,
        )
        if num_splits == 1 and lq > 1:
            out.copy_(part_o.view(b, hkv, group, lq, d).permute(0, 3, 1, 2, 4).reshape(b, lq, h, d))
        elif num_splits > 1:
            _decode_reduce_kernel[(b * h * lq,)](
                part_o, part_l, out, lse, lq, h, num_splits,
                part_o.stride(1), part_o.stride(2), part_l.stride(1),
                out.stride(0), out.stride(1), out.stride(2), lse.stride(0), lse.stride(1), lse.stride(2),
                HEAD_DIM=d, BLOCK_D=block_d, BLOCK_S=max(2, next_power_of_2(num_splits)),
                **({} if interp else {"num_warps": 4 if block_d >= 128 else 2}),
            )
    return out, lse
